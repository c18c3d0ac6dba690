"""`make demo` end to end: the whole pipeline runs, reports, and its learning shows (the full demo,
a few minutes on 2 cores; the pipeline-demo-learns acceptance check records its wall time)."""

import json
import os
import subprocess
import sys

import pytest

from cli_runs import LAPTOP_ENV, ROOT


@pytest.mark.heavy
def test_demo_learns_on_tasks_a_do_nothing_agent_fails(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "tau2jax.demo", "--workdir", str(tmp_path)], cwd=ROOT,
                          env=LAPTOP_ENV, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["parity"]["max_abs_logit_diff"] <= 1e-4 and summary["parity"]["greedy_match"] == 1.0
    p1 = {name: s["pass@1"] for name, s in summary["stages"].items()}
    assert set(p1) == {"base", "sft", "rft", "grpo"}
    assert p1["sft"] >= p1["base"] + 0.3, p1  # SFT on the gold demos clearly above the untrained model
    # SFT leaves room (configs/tiny_pipeline.py); RFT keeps what it learnt; GRPO adds 2 of the 8 tasks
    assert p1["rft"] >= p1["sft"] and p1["grpo"] >= p1["sft"] + 0.25, p1
    for ext in ("md", "json", "png"):
        assert os.path.getsize(summary["report"][ext]) > 0
    with open(summary["report"]["md"]) as f:
        report = f.read()
    assert all(f"| {name} |" in report for name in p1) and "do-nothing" in report
    assert summary["generate"]["num_tokens"] > 0
    # Token-in/token-out: every eval record carries the sampled ids with their behaviour log-probs.
    with open(os.path.join(tmp_path, "pipeline", "eval_grpo", "eval", "trajectories.jsonl")) as f:
        records = [json.loads(line) for line in f]
    assert len(records) == 9  # the 9 mock tasks, one greedy sample each
    assert all(len(r["token_ids"]) == len(r["loss_mask"]) == len(r["behaviour_logprobs"]) for r in records)
