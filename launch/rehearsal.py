"""Fixture and tally for `launch/rehearse.sh` (the README's one-node GPU command, rehearsed on CPU).

    python launch/rehearsal.py fixture WORK   # WORK/hf: a random Qwen3 of the `tiny` size with the
                                              # real Qwen3 vocabulary and tokenizer files (what
                                              # SGLang needs in a model dir); WORK/orbax: it converted
    python launch/rehearsal.py ports          # two free TCP ports on 127.0.0.1
    python launch/rehearsal.py summary WORK/run WALL_S [WORK/logs]   # the last-line JSON, from the run's
                                              # own files (and the launcher's and stand-in's logs)

The tally reads only what the run wrote: a pipeline step is done when its `pipeline_step.json` marker
exists; a weight push is a GRPO step row with weight-sync metrics (plus the push that starts the
server on the learner's weights); a turn aborted by a push is an episode whose infrastructure error
is an engine abort (an aborted turn ends its episode); an episode is unaccounted when GRPO's
rollout dump (`rollouts/step_N.jsonl`, every attempt) holds it and the ledger has no line for it.
From the logs: a policy restart is a `restarts.log` line of gpu_node.sh's supervisor; a turn is
stamped wrong when the version its trajectory records is not what the stand-in's request log
(`policy-requests.jsonl`: weight version per prompt + output digest) says served it, or the log has
no such request; requests in flight are the stand-in's count when each arrived.
"""

from __future__ import annotations

import collections
import glob
import json
import os
import shutil
import socket
import sys

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root


def fixture(work: str) -> None:
    from tau2jax.data.tokenizer import load_tokenizer, shipped_tokenizer_dir
    from tau2jax.models.tiny_hf import make_tiny_hf_dir
    from tau2jax.weights.convert import convert

    hf, orbax = os.path.join(work, "hf"), os.path.join(work, "orbax")
    if os.path.isdir(orbax):
        return
    shutil.rmtree(hf, ignore_errors=True)
    make_tiny_hf_dir(hf, vocab_size=load_tokenizer().vocab_size, seed=0)
    for name in os.listdir(shipped_tokenizer_dir()):  # tokenizer.json, tokenizer_config.json (chat template), ...
        shutil.copy(os.path.join(shipped_tokenizer_dir(), name), hf)
    convert(hf, orbax)


def free_ports(n: int) -> list[int]:
    """`n` distinct TCP ports free on 127.0.0.1 now (the OS picks them)."""
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _turn_versions(logs: str) -> tuple[dict, int]:
    """The stand-in's request log -> ({(prompt digest, output digest): {versions served}}, most in flight)."""
    from tau2jax.inference.engine import UNKNOWN_VERSION

    path = os.path.join(logs, "policy-requests.jsonl")
    served, most = collections.defaultdict(set), 0
    for r in _jsonl(path) if os.path.exists(path) else []:
        if r.get("endpoint", "/generate") != "/generate":  # policy turns only, not OpenAI chat calls
            continue
        v = r["weight_version"]
        served[r["prompt"], r["output"]].add(int(v) if v.isdigit() else UNKNOWN_VERSION)
        most = max(most, r["in_flight"])
    return served, most


def stamped_wrong(trajectories: list[dict], served: dict) -> int:
    """Sampled turns whose recorded policy_version is not one the server says it served them with."""
    from tau2jax.inference.server import token_digest

    wrong = 0
    for t in trajectories:
        ids = t["token_ids"]
        for turn in t["turns"]:
            key = (token_digest(ids[:turn["start"]]), token_digest(ids[turn["start"]:turn["end"]]))
            wrong += turn["policy_version"] not in served.get(key, ())
    return wrong


def _restarts(logs: str, name: str) -> int:
    path = os.path.join(logs, "restarts.log")
    return sum(line.split()[1] == name for line in open(path)) if os.path.exists(path) else 0


def summary(run: str, wall_s: float, logs: str | None = None) -> dict:
    from tau2jax.stages import pipeline

    steps_done = [s for s, _, _ in pipeline.STEPS if os.path.exists(os.path.join(run, s, pipeline.DONE))]
    grpo = os.path.join(run, "grpo")
    metrics = _jsonl(os.path.join(grpo, "metrics.jsonl")) if os.path.exists(os.path.join(grpo, "metrics.jsonl")) else []
    pushes = sum(any(k.startswith("weight_sync_") for k in m) for m in metrics)
    pushes += bool(metrics)  # the push that put the learner's starting weights on the server

    # every episode record the run wrote: GRPO's dumps, the evals' and RFT's trajectories and retries
    records = [r for p in glob.glob(os.path.join(run, "**", "*.jsonl"), recursive=True)
               if os.path.basename(p) not in ("ledger.jsonl", "metrics.jsonl") for r in _jsonl(p)
               if isinstance(r, dict) and "infra_error" in r]
    aborted = sum("abort" in (r.get("infra_error") or "") for r in records)

    dumped, grpo_trajs = collections.Counter(), []
    for p in glob.glob(os.path.join(grpo, "rollouts", "step_*.jsonl")):
        step = int(os.path.basename(p)[len("step_"):-len(".jsonl")])
        grpo_trajs += _jsonl(p)
        dumped.update((step, f"{r['domain']}/{r['task_id']}", r["sample_index"]) for r in _jsonl(p))
    ledger_path = os.path.join(grpo, "rollouts", "ledger.jsonl")
    ledger = collections.Counter((r["step"], r["task"], r["sample_index"])
                                 for r in (_jsonl(ledger_path) if os.path.exists(ledger_path) else []))
    out = {"steps_done": steps_done, "weight_pushes": pushes, "turns_aborted_by_push": aborted,
           "episodes_unaccounted": sum((dumped - ledger).values()), "episodes_dumped": sum(dumped.values()),
           "grpo_steps": len(metrics), "wall_s": wall_s}
    done = os.path.join(grpo, pipeline.DONE)
    if os.path.exists(done):
        with open(done) as f:
            step = json.load(f)
        out["grpo_optimizer_updates"] = step["result"].get("optimizer_updates")
        out["rollout_concurrency"] = step["config"]["rl"]["rollout"]["concurrency"]
    if logs is not None:
        served, out["max_requests_in_flight"] = _turn_versions(logs)
        out["turns_stamped_wrong"] = stamped_wrong(grpo_trajs, served) if served else None
        out["policy_restarts"] = _restarts(logs, "policy")
        out |= _replicas(logs)
    return out


def _replicas(logs: str) -> dict:
    """The stand-in's replicas and --dp-size, from its startup line in policy.log (the last start)."""
    found = {}
    path = os.path.join(logs, "policy.log")
    for line in open(path) if os.path.exists(path) else []:
        if line.startswith("sglang stand-in: ") and "dp_size=" in line:
            fields = dict(kv.split("=", 1) for kv in line.split()[2:] if "=" in kv)
            found = {"policy_dp_size": int(fields["dp_size"]), "policy_replicas": int(fields["replicas"])}
    return found


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "fixture":
        fixture(*args)
    elif cmd == "ports":
        print(*free_ports(2))
    elif cmd == "summary":
        print(json.dumps(summary(args[0], float(args[1]), *args[2:3])))
    else:
        raise SystemExit(f"usage: {sys.argv[0]} fixture WORK | ports | summary RUN WALL_S")
