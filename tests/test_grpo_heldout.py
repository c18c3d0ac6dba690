"""Held-out evaluation inside the GRPO loop (rl.eval_every, rl/heldout.py) on the toy game."""

import json

import pytest

from tau2jax.config import ConfigError, default_config, validate
from tau2jax.env.toy import ToyEnvironment
from cli_runs import train


def test_heldout_metrics_every_eval_every_steps_on_tasks_never_trained(tmp_path):
    summary = train("--config", "configs/tiny_grpo_toy.py", f"--config.workdir={tmp_path}", "--config.rl.steps=4",
                    "--config.rl.tasks_per_step=2", "--config.rl.samples_per_task=2", "--config.rl.toy.tasks=4",
                    "--config.rl.eval_every=2", "--config.rl.heldout_tasks=3")
    metrics = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    evals = [m for m in metrics if "heldout_greedy_pass1" in m]
    assert [m["step"] for m in evals] == [2, 4], metrics
    for m in evals:
        assert 0.0 <= m["heldout_greedy_pass1"] <= 1.0 and 0.0 <= m["heldout_sampled_pass1"] <= 1.0
        assert m["heldout_tasks"] == 3
    held = {f"{r.domain}/{r.task_id}" for r in ToyEnvironment(num_tasks=3, seed=default_config().seed, split="test").tasks()}
    ledger = [json.loads(line) for line in open(tmp_path / "rollouts" / "ledger.jsonl")]
    assert ledger and not held & {r["task"] for r in ledger}
    best = summary["heldout_best"]
    assert best["step"] in (2, 4) and best["heldout_greedy_pass1"] == max(m["heldout_greedy_pass1"] for m in evals)
    assert (tmp_path / "heldout_best" / "params").exists() and (tmp_path / "params").exists()


def test_eval_every_must_be_a_multiple_of_the_sync_interval():
    c = default_config()
    c.rl.sync.every, c.rl.max_staleness, c.rl.eval_every = 2, 1, 3
    with pytest.raises(ConfigError, match="rl.eval_every"):
        validate(c)


def test_heldout_tasks_are_taken_round_robin_over_domains():
    from tau2jax.env.environments import TaskRef
    from tau2jax.rl.heldout import interleave_domains

    refs = [TaskRef("airline", "a0"), TaskRef("airline", "a1"), TaskRef("retail", "r0"), TaskRef("telecom", "t0"),
            TaskRef("telecom", "t1"), TaskRef("telecom", "t2")]
    assert [r.task_id for r in interleave_domains(refs)] == ["a0", "r0", "t0", "a1", "t1", "t2"]


def test_the_4b_grpo_config_evaluates_held_out_tasks(tmp_path):
    from configs import qwen3_4b_grpo

    c = qwen3_4b_grpo.get_config()
    c.model.init_from = str(tmp_path)  # the user's converted weights (a 4B never random-inits)
    validate(c)
    assert c.rl.eval_every > 0
