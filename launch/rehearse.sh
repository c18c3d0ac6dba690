#!/usr/bin/env bash
# Rehearse the README's one-node GPU command on CPU: launch/gpu_node.sh runs unchanged, with the
# SGLang stand-in (launch/sglang_standin/python) as $SGLANG_PYTHON for the policy and user servers,
# TRAIN_GPUS setting how many CPU devices the trainer gets (XLA's host device count), and
# configs/qwen3_4b_pipeline.py shrunk by size overrides only (model, steps, lengths, task counts).
#
#   launch/rehearse.sh            # synchronous GRPO (the config's rl.max_staleness=0)
#   launch/rehearse.sh --async    # rollouts one step ahead of the learner (rl.max_staleness=1)
#   launch/rehearse.sh --async --fault kill-policy
#                                 # ... and the policy server SIGKILLed once GRPO's first step is done
#                                 # (what SGLang 0.5.3's flush assert does); gpu_node.sh restarts it
#                                 # and the trainer rides through (rl/policy_sync.py)
#
# Every pipeline step runs: demos, the base eval, SFT, eval, RFT, SFT, eval, GRPO (pushing its
# weights to the policy server each step), eval. Last stdout line, one JSON object (launch/rehearsal.py):
# steps_done, weight_pushes, turns_aborted_by_push, episodes_unaccounted, grpo_steps,
# grpo_optimizer_updates, policy_restarts, turns_stamped_wrong (turns whose recorded version is not
# the one the stand-in's request log says served them), policy_replicas, policy_dp_size,
# rollout_concurrency, max_requests_in_flight, wall_s.
# REHEARSE_DIR (default runs/rehearsal_{sync,async}) is wiped first unless REHEARSE_RESUME=1 (the
# pipeline then resumes, as the GPU command does). Logs: $REHEARSE_DIR/logs/{policy,user}.log, train.log.
set -euo pipefail
cd "$(dirname "$0")/.."

mode=sync; staleness=0; fault=""
usage="usage: launch/rehearse.sh [--async] [--fault kill-policy]"
while (($#)); do
  case "$1" in
    --async) mode=async; staleness=1 ;;
    --fault) [[ ${2:-} == kill-policy ]] || { echo "$usage" >&2; exit 2; }; fault=$2; shift ;;
    *) echo "$usage" >&2; exit 2 ;;
  esac
  shift
done
[[ -z $fault ]] || mode=$mode-$fault
PY=${PYTHON:-.venv/bin/python}
[[ -x $PY ]] || { echo "error: $PY not found: run 'make install' first" >&2; exit 1; }
WORK=$(realpath -m "${REHEARSE_DIR:-runs/rehearsal_$mode}")
[[ ${REHEARSE_RESUME:-0} == 1 ]] || rm -rf "$WORK"
mkdir -p "$WORK/logs"
start=$(date +%s)

"$PY" launch/rehearsal.py fixture "$WORK"   # random tiny Qwen3, the real vocabulary + tokenizer files
# a resumed run keeps its ports: the servers' URLs are part of each finished step's settings
if [[ ${REHEARSE_RESUME:-0} == 1 && -f $WORK/ports ]]; then
  read -r policy_port user_port < "$WORK/ports"
else
  read -r policy_port user_port < <("$PY" launch/rehearsal.py ports)
  echo "$policy_port $user_port" > "$WORK/ports"
fi

# The trainer's devices: as many CPU devices as TRAIN_GPUS names (gpu_node.sh's default 4,5,6,7: 4).
export TRAIN_GPUS=${TRAIN_GPUS:-4,5,6,7}
export JAX_PLATFORMS=cpu XLA_FLAGS="--xla_force_host_platform_device_count=$(awk -F, '{print NF}' <<<"$TRAIN_GPUS")"
export SGLANG_PYTHON=${SGLANG_PYTHON:-launch/sglang_standin/python}
[[ -x $SGLANG_PYTHON ]] || { echo "error: SGLANG_PYTHON=$SGLANG_PYTHON is not executable: point it at a python" \
  "with sglang, or leave it unset for the stand-in" >&2; exit 1; }
export POLICY_MODEL=$WORK/hf USER_MODEL=$WORK/hf POLICY_PORT=$policy_port USER_PORT=$user_port
export LOG_DIR=$WORK/logs READY_TIMEOUT_S=${READY_TIMEOUT_S:-300} PYTHON=$PY
export SGLANG_STANDIN_LOG_DIR=$WORK/logs  # the stand-in's request log: which weights served each turn
# The trust model as a cluster run has it: a key shared by the servers and the trainer, and the
# stand-in loading weights only where this run publishes them (eval's {workdir}/served, GRPO's
# /dev/shm/tau2jax-<uid>/...: weight_sync.default_root)
export TAU2JAX_API_KEY=${TAU2JAX_API_KEY:-rehearsal-$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')}
export SGLANG_STANDIN_WEIGHTS_ROOT=${SGLANG_STANDIN_WEIGHTS_ROOT:-$WORK/run:/dev/shm/tau2jax-$(id -u)}
export RESTART_DELAY_S=${RESTART_DELAY_S:-1}
export LITELLM_LOCAL_MODEL_COST_MAP=True

telecom_task='[mms_issue]airplane_mode_on|bad_network_preference|bad_wifi_calling|break_apn_mms_setting|break_app_both_permissions|data_mode_off|data_usage_exceeded|unseat_sim_card|user_abroad_roaming_disabled_off[PERSONA:Hard]'
size=(  # sizes only; everything else is configs/qwen3_4b_pipeline.py as a GPU user runs it
  --config.model.hf_dir="$WORK/hf" --config.model.init_from="$WORK/orbax"   # the README's own flags
  --config.model.attn_impl=xla             # the one non-size change: cuDNN attention has no CPU kernel
  --config.workdir="$WORK/run"
  --config.pipeline.train_task_ids="0,1,$telecom_task"  # airline 0,1 + retail 0,1 + one telecom task
  --config.pipeline.eval.eval.max_tasks_per_domain=1 --config.pipeline.eval.eval.num_samples=2
  --config.tau2.max_steps=8 --config.engine.max_new_tokens=16 --config.pipeline.eval.engine.max_new_tokens=16
  --config.user.max_tokens=64  # the random user model never stops: its turns end where the config says
  # SFT steps follow the data (the config's 2 epochs of the 5 demos); a tau2 prompt with its
  # tools is ~5-6k tokens, so shorter rows keep no assistant token
  --config.pipeline.sft.data.max_len=8192 --config.pipeline.sft.data.batch_size=4
  --config.pipeline.sft_rft.data.max_len=8192 --config.pipeline.sft_rft.data.batch_size=4
  --config.pipeline.rft.rft.samples=2
  --config.pipeline.grpo.rl.steps=3 --config.pipeline.grpo.rl.tasks_per_step=2
  --config.pipeline.grpo.rl.samples_per_task=2 --config.pipeline.grpo.rl.batch.max_len=8192
  --config.pipeline.grpo.rl.rollout.concurrency=4  # the step's 2 x 2 episodes all in flight
  --config.pipeline.grpo.rl.max_staleness=$staleness
  # a random policy never emits a parsable action and never stops: every turn is malformed and cut at
  # max_new_tokens, both masked by default, so no step would have a token to train; trained down
  # instead (a malformed turn only where its advantage is negative)
  --config.pipeline.grpo.rl.batch.malformed_turns=nonpositive --config.pipeline.grpo.rl.batch.keep_length_cut=True
)
echo "rehearsal ($mode): $WORK; servers on :$policy_port (policy) and :$user_port (user)" >&2
kill_policy_after_first_grpo_step() {  # the fault: SIGKILL the policy server (and its replicas)
  local metrics=$WORK/run/grpo/metrics.jsonl pid
  until [[ -s $metrics ]]; do sleep 1; done
  pid=$(cat "$LOG_DIR/policy.pid")
  echo "rehearse.sh: fault: SIGKILL the policy server (pid $pid) after GRPO step 1" >&2
  pkill -KILL -P "$pid" 2>/dev/null || true
  kill -KILL "$pid" 2>/dev/null || true
}
killer=""
if [[ -n $fault ]]; then kill_policy_after_first_grpo_step & killer=$!; fi
rc=0
bash launch/gpu_node.sh --config configs/qwen3_4b_pipeline.py "${size[@]}" 2>&1 | tee "$WORK/logs/train.log" >&2 || rc=$?
[[ -z $killer ]] || kill "$killer" 2>/dev/null || true
"$PY" launch/rehearsal.py summary "$WORK/run" "$(( $(date +%s) - start ))" "$WORK/logs"
exit $rc
