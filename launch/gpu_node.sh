#!/usr/bin/env bash
# One 8xH100 node: two SGLang servers beside the JAX trainer.
#
#   launch/gpu_node.sh                       # start both servers, wait until healthy, keep serving
#   launch/gpu_node.sh --config configs/X.py [--config.key=value ...]
#                                            # ... then run `python -m tau2jax.train` with these args on
#                                            # the trainer GPUs; the servers stop when it exits
#
#   port 30000  policy          SGLang on POLICY_GPUS (data parallel: one replica per GPU).
#                               Rollouts call /generate with token ids (tau2jax SGLangEngine,
#                               config.engine.kind=sglang, config.engine.url=http://127.0.0.1:30000);
#                               the trainer pushes new weights with /update_weights_from_disk
#                               (tau2jax.inference.weight_sync: publish + sync_engine). A server
#                               that dies is restarted (MAX_RESTARTS, logged: supervise below).
#   port 30001  user simulator  SGLang on USER_GPUS; tau2's user simulator calls its OpenAI endpoint
#                               through litellm (config.user.kind=llm,
#                               config.user.base_url=http://127.0.0.1:30001/v1,
#                               config.user.model=openai/$USER_NAME).
#   TRAIN_GPUS                  the JAX trainer (FSDP mesh over these GPUs).
#                               With --config.rl.max_staleness >= 1 (tau2jax/rl/rollout_workers.py)
#                               POLICY_GPUS sample the next step while TRAIN_GPUS train: split the
#                               GPUs so that a rollout step and a learner step take similar time.
#
# Separate GPUs per process: JAX preallocates 75% of every GPU it sees and SGLang reserves
# --mem-fraction-static of its own, so sharing a GPU between them runs out of memory.
# Both servers bind 127.0.0.1 only: nothing off the node can reach them. BIND_HOST=<this node's
# cluster address> (launch/slurm_rl.sbatch sets it on its rollout nodes) makes them reachable from
# other nodes, for learners elsewhere; the script says so loudly, since anyone on that network can
# then call the servers unless TAU2JAX_API_KEY is set (slurm_rl.sbatch makes one per job): both
# servers then get --api-key (SGLang: every endpoint but /health needs "Authorization: Bearer KEY",
# /update_weights_from_disk included, which on SGLang loads any path the server can read), and
# the trainer sends it (SGLangEngine reads $TAU2JAX_API_KEY; the user simulator gets
# --config.user.api_key). README.md "Trust model" has the rest.
#
# SGLang >= 0.5.3 (checked at launch): --weight-version on updates needs 0.5.1, the per-request
# sampling_seed 0.5.3. DETERMINISTIC=1 launches both servers with --enable-deterministic-inference,
# without which SGLang ignores sampling_seed (seeded episodes are then not reproducible); it costs
# ~34% overhead (batch-invariant kernels; see docs/gpu_serving.md). SGLang 0.5.3 refuses that flag
# unless --attention-backend is flashinfer, fa3 or triton (server_args.py; later versions pick fa3
# themselves), so it comes with --attention-backend $ATTENTION_BACKEND (default fa3: Hopper).
#
# Everything is a local path (no hub downloads). Override any variable from the environment:
#   POLICY_MODEL=/models/export USER_MODEL=/models/Qwen3-4B-Instruct-2507 launch/gpu_node.sh ...
set -euo pipefail

SGLANG_PYTHON=${SGLANG_PYTHON:-python}    # SGLang lives in its own env (its torch/CUDA pins clash with ours)
SGLANG_MIN_VERSION=0.5.3
DETERMINISTIC=${DETERMINISTIC:-0}
ATTENTION_BACKEND=${ATTENTION_BACKEND:-fa3}  # with DETERMINISTIC=1: flashinfer | fa3 | triton

check_sglang_version() {  # fails, saying what to do, unless $SGLANG_PYTHON has sglang >= SGLANG_MIN_VERSION
  local have
  if ! have=$("$SGLANG_PYTHON" -c 'import sglang; print(sglang.__version__)' 2>/dev/null); then
    echo "error: '$SGLANG_PYTHON' cannot import sglang; install it in its own venv" \
      "(pip install 'sglang[all]>=$SGLANG_MIN_VERSION') and point SGLANG_PYTHON at that python" >&2
    return 1
  fi
  if [[ $(printf '%s\n' "$SGLANG_MIN_VERSION" "$have" | sort -V | head -n 1) != "$SGLANG_MIN_VERSION" ]]; then
    echo "error: sglang $have at '$SGLANG_PYTHON' is too old: tau2jax needs >= $SGLANG_MIN_VERSION" \
      "(sampling_seed; --weight-version); upgrade with: $SGLANG_PYTHON -m pip install 'sglang[all]>=$SGLANG_MIN_VERSION'" >&2
    return 1
  fi
}

deterministic_args() {  # the SGLang flags DETERMINISTIC asks for
  case "$DETERMINISTIC" in
    0) ;;
    1) echo --enable-deterministic-inference --attention-backend "$ATTENTION_BACKEND" ;;
    *) echo "error: DETERMINISTIC must be 0 or 1, got '$DETERMINISTIC'" >&2; return 1 ;;
  esac
}

# Sourced (tests): the functions above only.
if [[ "${BASH_SOURCE[0]}" != "$0" ]]; then return 0; fi

check_sglang_version
EXTRA_SGLANG_ARGS=$(deterministic_args)
POLICY_MODEL=${POLICY_MODEL:?set POLICY_MODEL to the HF dir the policy starts from (e.g. the orbax_to_hf export of the SFT checkpoint)}
USER_MODEL=${USER_MODEL:?set USER_MODEL to the HF dir of the user-simulator model (e.g. /models/Qwen3-4B-Instruct-2507)}
USER_NAME=${USER_NAME:-qwen3-4b}          # served model name; litellm calls it openai/$USER_NAME
POLICY_GPUS=${POLICY_GPUS:-0,1,2}
USER_GPUS=${USER_GPUS:-3}
TRAIN_GPUS=${TRAIN_GPUS:-4,5,6,7}
POLICY_PORT=${POLICY_PORT:-30000}
USER_PORT=${USER_PORT:-30001}
# tau2 conversations with tool schemas reach ~10-20K tokens; 32K leaves room for max_new_tokens.
CONTEXT_LENGTH=${CONTEXT_LENGTH:-32768}
MEM_FRACTION=${MEM_FRACTION:-0.85}        # weights (8 GB bf16) + KV cache; the rest for activations
READY_TIMEOUT_S=${READY_TIMEOUT_S:-900}   # model load + CUDA graph capture take minutes
MAX_RESTARTS=${MAX_RESTARTS:-5}           # a server that dies after it was healthy is restarted this often
RESTART_DELAY_S=${RESTART_DELAY_S:-5}
LOG_DIR=${LOG_DIR:-runs/gpu_node_logs}
BIND_HOST=${BIND_HOST:-127.0.0.1}         # the address both servers listen on
TAU2JAX_API_KEY=${TAU2JAX_API_KEY:-}     # shared by both servers (--api-key) and the trainer; "" = none
auth_args=()
if [[ -n "$TAU2JAX_API_KEY" ]]; then auth_args=(--api-key "$TAU2JAX_API_KEY"); export TAU2JAX_API_KEY; fi
if [[ "$BIND_HOST" != 127.0.0.1 ]]; then
  if [[ -n "$TAU2JAX_API_KEY" ]]; then
    echo "WARNING: gpu_node.sh: BIND_HOST=$BIND_HOST: the policy and user servers accept connections from" \
         "other hosts on that address (each request needs TAU2JAX_API_KEY)" >&2
  else
    echo "WARNING: gpu_node.sh: BIND_HOST=$BIND_HOST: the policy and user servers accept connections from" \
         "other hosts on that address (no authentication: set TAU2JAX_API_KEY); unset BIND_HOST to keep them on 127.0.0.1" >&2
  fi
fi
PYTHON=${PYTHON:-.venv/bin/python}        # the venv with tau2jax and jax[cuda12]

mkdir -p "$LOG_DIR"
num_gpus() { awk -F, '{print NF}' <<<"$1"; }

pids=()
cleanup() {  # stop only the servers this script started (their supervisors stop their child)
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait "${pids[@]}" 2>/dev/null || true
}
trap cleanup EXIT INT TERM
rm -f "$LOG_DIR"/*.ready

# supervise NAME CMD...: runs the server, and restarts it when it dies after it was once healthy
# (SGLang 0.5.3's scheduler asserts on a failed cache flush and takes the server down; a CUDA
# fault does too), at most MAX_RESTARTS times, each logged to stderr, $LOG_DIR/NAME.log and
# $LOG_DIR/restarts.log. A server that dies before its first health check is a launch failure:
# no restart. The trainer rides through a restart (tau2jax.rl.policy_sync: rollouts wait, then the
# weights are pushed again, since a restarted SGLang serves its start checkpoint as "default").
supervise() {
  local name=$1 restarts=0 child rc
  shift
  trap '[[ -n ${child:-} ]] && kill "$child" 2>/dev/null; wait "${child:-}" 2>/dev/null; exit 0' TERM INT
  while true; do
    "$@" >>"$LOG_DIR/$name.log" 2>&1 &
    child=$!
    echo "$child" >"$LOG_DIR/$name.pid"
    rc=0; wait "$child" || rc=$?
    if [[ ! -f $LOG_DIR/$name.ready ]]; then exit "$rc"; fi  # never healthy: wait_healthy reports it
    if ((restarts >= MAX_RESTARTS)); then
      echo "gpu_node.sh: $name server exited (rc $rc) after $restarts restarts; giving up" | tee -a "$LOG_DIR/$name.log" >&2
      exit 1
    fi
    restarts=$((restarts + 1))
    echo "gpu_node.sh: $name server exited (rc $rc); restart $restarts/$MAX_RESTARTS in ${RESTART_DELAY_S}s" \
      | tee -a "$LOG_DIR/$name.log" >&2
    echo "$(date +%s) $name $restarts $rc" >>"$LOG_DIR/restarts.log"
    sleep "$RESTART_DELAY_S"
  done
}

# Policy. No --weight-version: SGLang then reports weight_version "default" until the trainer's
# first /update_weights_from_disk names one, in /get_model_info and every /generate's meta_info,
# so a turn is attributed to the exact policy version that sampled it (SGLangEngine reads it) and
# a restarted server's start checkpoint is never mistaken for one of ours. No --tool-call-parser:
# the policy is driven token-in/token-out and tau2jax parses <tool_call> itself.
# Log-probs: SGLang returns log-softmax(logits / temperature) of the sampled token, before
# top-k/top-p: tau2jax's behaviour log-prob convention (what the learner recomputes).
CUDA_VISIBLE_DEVICES=$POLICY_GPUS supervise policy "$SGLANG_PYTHON" -m sglang.launch_server \
  --model-path "$POLICY_MODEL" --served-model-name policy \
  --host "$BIND_HOST" --port "$POLICY_PORT" \
  --dp-size "$(num_gpus "$POLICY_GPUS")" --tp-size 1 \
  --dtype bfloat16 --context-length "$CONTEXT_LENGTH" --mem-fraction-static "$MEM_FRACTION" \
  "${auth_args[@]}" $EXTRA_SGLANG_ARGS &
pids+=($!)

# User simulator. --tool-call-parser qwen25 turns Qwen3's <tool_call> blocks into OpenAI
# tool_calls (telecom's user owns device tools); the chat template is the model's own.
CUDA_VISIBLE_DEVICES=$USER_GPUS supervise user "$SGLANG_PYTHON" -m sglang.launch_server \
  --model-path "$USER_MODEL" --served-model-name "$USER_NAME" \
  --host "$BIND_HOST" --port "$USER_PORT" \
  --dp-size "$(num_gpus "$USER_GPUS")" --tp-size 1 \
  --dtype bfloat16 --context-length "$CONTEXT_LENGTH" --mem-fraction-static "$MEM_FRACTION" \
  --tool-call-parser qwen25 "${auth_args[@]}" $EXTRA_SGLANG_ARGS &
pids+=($!)

wait_healthy() {  # name port pid
  local deadline=$((SECONDS + READY_TIMEOUT_S))
  until curl -sf "http://$BIND_HOST:$2/health" >/dev/null; do
    if ! kill -0 "$3" 2>/dev/null; then
      echo "$1 server exited during startup; see $LOG_DIR/$1.log" >&2; tail -n 30 "$LOG_DIR/$1.log" >&2; exit 1
    fi
    if ((SECONDS > deadline)); then
      echo "$1 server not healthy after ${READY_TIMEOUT_S}s; see $LOG_DIR/$1.log" >&2; exit 1
    fi
    sleep 5
  done
  touch "$LOG_DIR/$1.ready"  # from now on its supervisor restarts it when it dies
  echo "$1 server ready on http://$BIND_HOST:$2"
}
wait_healthy policy "$POLICY_PORT" "${pids[0]}"
wait_healthy user "$USER_PORT" "${pids[1]}"

if (($# == 0)); then
  echo "serving (Ctrl-C stops both servers; a dead one is restarted up to $MAX_RESTARTS times); logs in $LOG_DIR"
  wait -n "${pids[@]}"
  exit 1  # a server died past its restarts
fi

# The trainer on its own GPUs, pointed at both servers.
CUDA_VISIBLE_DEVICES=$TRAIN_GPUS "$PYTHON" -m tau2jax.train "$@" \
  --config.engine.kind=sglang --config.engine.url="http://$BIND_HOST:$POLICY_PORT" \
  --config.user.kind=llm --config.user.base_url="http://$BIND_HOST:$USER_PORT/v1" \
  --config.user.model="openai/$USER_NAME" ${TAU2JAX_API_KEY:+"--config.user.api_key=$TAU2JAX_API_KEY"}
