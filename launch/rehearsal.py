"""Fixture and tally for `launch/rehearse.sh` (the README's one-node GPU command, rehearsed on CPU).

    python launch/rehearsal.py fixture WORK   # WORK/hf: a random Qwen3 of the `tiny` size with the
                                              # real Qwen3 vocabulary and tokenizer files (what
                                              # SGLang needs in a model dir); WORK/orbax: it converted
    python launch/rehearsal.py ports          # two free TCP ports on 127.0.0.1
    python launch/rehearsal.py summary WORK/run WALL_S   # the last-line JSON, from the run's own files

The tally reads only what the run wrote: a pipeline step is done when its `pipeline_step.json` marker
exists; a weight push is a GRPO step row with weight-sync metrics (plus the push that starts the
server on the learner's weights); a turn aborted by a push is an episode whose infrastructure error
is an engine abort (an aborted turn ends its episode); an episode is unaccounted when GRPO's
rollout dump (`rollouts/step_N.jsonl`, every attempt) holds it and the ledger has no line for it.
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
    from checkpoints_tools import hf_to_orbax
    from checkpoints_tools.tiny_hf import make_tiny_hf_dir
    from tau2jax.data.tokenizer import load_tokenizer, shipped_tokenizer_dir

    hf, orbax = os.path.join(work, "hf"), os.path.join(work, "orbax")
    if os.path.isdir(orbax):
        return
    shutil.rmtree(hf, ignore_errors=True)
    make_tiny_hf_dir(hf, vocab_size=load_tokenizer().vocab_size, seed=0)
    for name in os.listdir(shipped_tokenizer_dir()):  # tokenizer.json, tokenizer_config.json (chat template), ...
        shutil.copy(os.path.join(shipped_tokenizer_dir(), name), hf)
    hf_to_orbax.convert(hf, orbax)


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


def summary(run: str, wall_s: float) -> dict:
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

    dumped = collections.Counter()
    for p in glob.glob(os.path.join(grpo, "rollouts", "step_*.jsonl")):
        step = int(os.path.basename(p)[len("step_"):-len(".jsonl")])
        dumped.update((step, f"{r['domain']}/{r['task_id']}", r["sample_index"]) for r in _jsonl(p))
    ledger_path = os.path.join(grpo, "rollouts", "ledger.jsonl")
    ledger = collections.Counter((r["step"], r["task"], r["sample_index"])
                                 for r in (_jsonl(ledger_path) if os.path.exists(ledger_path) else []))
    return {"steps_done": steps_done, "weight_pushes": pushes, "turns_aborted_by_push": aborted,
            "episodes_unaccounted": sum((dumped - ledger).values()), "episodes_dumped": sum(dumped.values()),
            "grpo_steps": len(metrics), "wall_s": wall_s}


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "fixture":
        fixture(*args)
    elif cmd == "ports":
        print(*free_ports(2))
    elif cmd == "summary":
        print(json.dumps(summary(args[0], float(args[1]))))
    else:
        raise SystemExit(f"usage: {sys.argv[0]} fixture WORK | ports | summary RUN WALL_S")
