"""The rl section split by concern (rl.rollout, rl.sync, rl.loss, rl.batch, rl.toy): every old key
names its new one, on the command line and in a pipeline override, and nothing else moved."""

import os
import subprocess
import sys

import ml_collections
import pytest

from tau2jax import config as config_lib
from tau2jax.stages import pipeline

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_moved_key_exists_where_it_moved_and_not_where_it_was():
    c = config_lib.default_config()
    for old, new in config_lib.MOVED.items():
        section, leaf = new.rsplit(".", 1)
        node = c
        for name in section.split("."):
            node = node[name]
        assert leaf in node, new
        assert old.split(".", 1)[1] not in c.rl, old
    assert set(c.rl.keys()) - {"rollout", "sync", "loss", "batch", "toy"} == {
        "env", "steps", "tasks_per_step", "samples_per_task", "std_normalize", "dynamic_sampling",
        "max_refill_rounds", "max_empty_rounds", "curriculum", "repeat_penalty", "max_staleness", "stale_policy",
        "eval_every", "heldout_tasks"}


def test_an_old_override_key_fails_naming_its_new_key():
    out = subprocess.run([sys.executable, "-m", "tau2jax.train", "--config", "configs/tiny_grpo_toy.py",
                          "--config.rl.kl_coef=0.1"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "error: config.rl.kl_coef: this key moved to config.rl.loss.kl_coef (the rl section is split by concern: "
        "rl.rollout, rl.sync, rl.loss, rl.batch, rl.toy); use --config.rl.loss.kl_coef"]
    assert config_lib.moved_key("pipeline.grpo.rl.sync_every") == "pipeline.grpo.rl.sync.every"
    assert config_lib.moved_key("rl.steps") is None


def test_an_old_key_in_a_pipeline_override_names_its_new_key():
    c = config_lib.default_config()
    with pytest.raises(config_lib.ConfigError, match=r"config.pipeline.grpo.rl.toy_tasks: no such config field; "
                                                     r"it moved to config.pipeline.grpo.rl.toy.tasks"):
        pipeline.apply_overrides(ml_collections.ConfigDict(c.to_dict()),
                                 ml_collections.ConfigDict({"rl": {"toy_tasks": 4}}), "pipeline.grpo")
