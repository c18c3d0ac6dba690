"""The held-out experiments' pieces: gold SFT on the toy game without a tokenizer, pass@1 scoring
outside the loop, and benchmarks/heldout.py --quick end to end (slow)."""

import json
import os
import subprocess
import sys

import pytest

from cli_runs import LAPTOP_ENV, ROOT
from configs import tiny_sft_toy
from tau2jax.data.sft_data import DataError
from tau2jax.env import toy
from tau2jax.eval import pipeline_report
from tau2jax.inference.engine import SamplingParams, ScriptedEngine
from tau2jax.rl import heldout
from tau2jax.stages import run_stage


def gold_file(path, env):
    path.write_text("".join(json.dumps(toy.gold_record(r)) + "\n" for r in env.tasks()))
    return str(path)


def test_toy_gold_sft_runs_on_token_records_without_a_tokenizer(tmp_path):
    c = tiny_sft_toy.get_config()
    c.workdir = str(tmp_path / "sft")
    c.mesh.data, c.data.batch_size = -1, 8  # the suite's 8 fake devices
    c.data.train_files = gold_file(tmp_path / "gold.jsonl", toy.ToyEnvironment(num_tasks=8, shared_table=False))
    out = run_stage(c)
    assert out["steps"] == c.train.steps and out["final_loss"] < out["first_loss"]
    c.workdir = str(tmp_path / "chat")
    c.data.train_files = "data/tiny_sft.jsonl"  # conversations need a tokenizer the toy model lacks
    with pytest.raises(DataError, match="no tokenizer"):
        run_stage(c)


def test_pass1_counts_greedy_once_and_averages_samples():
    env = toy.ToyEnvironment(num_tasks=2, seed=0, shared_table=False)
    a, b = env.tasks()
    gold = lambda t: [[toy.KEY0 + t.key], [toy.VALUE0 + t.value]]  # noqa: E731
    wrong = lambda t: [[toy.VALUE0 + (t.value + 1) % toy.NUM_VALUES]]  # noqa: E731
    # concurrency 1: episodes run in order (task a: greedy, 2 samples; then task b)
    engine = ScriptedEngine(None, [*gold(a.task), *gold(a.task), *wrong(a.task), *wrong(b.task), *gold(b.task),
                                   *gold(b.task)])
    out = heldout.pass1(env, [a, b], engine=engine, sampling=SamplingParams(temperature=1.0), seed=0, samples=2,
                        concurrency=1)
    assert out == {"greedy_pass1": 0.5, "sampled_pass1": 0.75, "tasks": 2, "samples": 2}


@pytest.mark.slow
def test_heldout_quick_benchmark_writes_its_result(tmp_path):
    out = tmp_path / "q.json"
    run = subprocess.run([sys.executable, "benchmarks/heldout.py", "--quick", "--out", str(out)], cwd=ROOT,
                         env=LAPTOP_ENV, capture_output=True, text=True, timeout=1200)  # one device, as a user
    assert run.returncode == 0, run.stderr[-2000:]
    last = json.loads(run.stdout.strip().splitlines()[-1])
    assert last == json.loads(out.read_text())
    t = last["toy"]
    assert t["tables_shared"] == 0 and t["test_tasks"] > 0
    assert t["grpo_test"] >= t["sft_test"] + 0.1  # the acceptance bar


def test_heldout_curve_keeps_the_last_record_of_each_step_and_plots(tmp_path):
    rows = [{"step": 1, "loss": 0.5}, {"step": 5, "heldout_greedy_pass1": 0.2, "heldout_sampled_pass1": 0.1},
            {"step": 10, "heldout_greedy_pass1": 0.4, "heldout_sampled_pass1": 0.3},
            {"step": 10, "heldout_greedy_pass1": 0.5, "heldout_sampled_pass1": 0.35}]  # a resumed run's rewrite
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    curve = pipeline_report.heldout_curve(str(tmp_path / "metrics.jsonl"))
    assert curve == [{"step": 5, "greedy": 0.2, "sampled": 0.1}, {"step": 10, "greedy": 0.5, "sampled": 0.35}]
    assert pipeline_report.heldout_curve(str(tmp_path / "none.jsonl")) == []
    pipeline_report.plot_heldout({"GRPO": curve}, str(tmp_path / "h.png"))
    assert (tmp_path / "h.png").stat().st_size > 0


@pytest.mark.parametrize("sft_train_greedy", [0.1, 0.5])
def test_family_seed_runs_rl_only_past_the_sft_gate(tmp_path, monkeypatch, sft_train_greedy):
    """benchmarks/heldout.py's family seed with stand-in stages and scores: below the gate GRPO never
    starts and its keys are null; at or above it GRPO runs and the gain is GRPO - SFT."""
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    import heldout as bench  # benchmarks/heldout.py
    from test_pipeline import StandIns

    from configs import tiny_pipeline_family
    from tau2jax.env import task_family
    from tau2jax.stages import pipeline, runner

    stages = StandIns()
    monkeypatch.setattr(runner, "run_stage", stages)
    sampled = {"sft": 0.2, "sft_rft": 0.25, "grpo": 0.6}  # by the step that wrote the params

    def score(config, params, splits, samples):
        step = os.path.basename(os.path.dirname(params))
        greedy = sft_train_greedy if step == "sft" else 0.7
        return {s: {"greedy_pass1": greedy, "sampled_pass1": sampled[step]} for s in splits}

    monkeypatch.setattr(bench, "score", score)
    c = tiny_pipeline_family.get_config()
    c.workdir, c.model.init_from = str(tmp_path / "family"), str(tmp_path / "orbax")  # stand-ins never read it
    c.tau2.data_dir = str(task_family.write_data_dir(tmp_path / "data"))
    out = bench.family_seed(c, seed=3, samples=2)
    ran = [os.path.basename(s.workdir) for s in stages.calls]
    assert ran[:7] == [s for s, _, _ in pipeline.STEPS][:7]  # up to eval_rft, as in every pipeline
    assert out["seed"] == 3 and out["test_task_ids"] and not set(out["train_task_ids"]) & set(out["test_task_ids"])
    assert out["sft_train_greedy"] == sft_train_greedy and out["rft_test"] == 0.25
    if sft_train_greedy < bench.GATE:
        assert "grpo" not in ran and out["sft_gate_passed"] is False
        assert out["grpo_test"] is None and out["grpo_train_greedy"] is None and out["gain_test"] is None
        assert out["pipeline_eval_test_greedy"] is None and out["heldout_curve"] == []
    else:
        assert "grpo" in ran and out["sft_gate_passed"] is True
        assert out["grpo_test"] == 0.6 and out["gain_test"] == pytest.approx(0.6 - 0.2)
        assert out["pipeline_eval_test_greedy"]
