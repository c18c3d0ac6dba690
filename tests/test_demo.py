"""`make demo` end to end: every stage runs and reports what it should."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_demo_runs_the_whole_pipeline(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one device, like a laptop
    proc = subprocess.run([sys.executable, "-m", "tau2jax.demo", "--workdir", str(tmp_path)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["parity"]["max_abs_logit_diff"] <= 1e-4 and summary["parity"]["greedy_match"] == 1.0
    assert summary["sft"]["loss_halved"] is True
    ev = summary["eval"]
    assert ev["episodes"] == 3 * 2  # the demo evaluates 3 mock tasks, 2 samples each
    for name in ("summary.json", "summary.md", "pass_at_k.png", "trajectories.jsonl"):
        assert os.path.isfile(os.path.join(ev["out_dir"], name)), name
    with open(os.path.join(ev["out_dir"], "trajectories.jsonl")) as f:
        records = [json.loads(line) for line in f]
    assert len({(r["task_id"], r["sample_index"]) for r in records}) == ev["episodes"]
    # Token-in/token-out: every record carries the sampled ids with their behaviour log-probs.
    assert all(len(r["token_ids"]) == len(r["loss_mask"]) == len(r["behaviour_logprobs"]) for r in records)
