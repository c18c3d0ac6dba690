"""Eval settings: tau2.max_repairs reaches the episodes, and a resumed run refuses (ConfigError naming
the field and both values) any change that alters what an episode produces: a config field of
each class, the engine's policy version, a kept record from another policy. Extending the task
set resumes."""

import json

import pytest

from tau2jax import config as config_lib
from tau2jax.inference.engine import FixedEngine
from tau2jax.stages import builders, resume


def _config(workdir, **overrides):
    c = config_lib.default_config()
    c.stage = "eval"
    c.workdir = str(workdir)
    c.engine.kind = "gold"
    c.user.kind = "scripted"
    c.tau2.domains = "mock"
    c.eval.num_samples = 1
    c.eval.max_tasks_per_domain = 1
    c.eval.concurrency = 1
    c.eval.floor = False
    for dotted, value in overrides.items():
        section, key = dotted.split("__")
        c[section][key] = value
    config_lib.validate(c)
    return c


class _Garbage(FixedEngine):
    """An engine whose every turn is an unparseable tool call."""

    kind = "scripted"
    policy_version = 0

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def generate(self, input_ids, params):
        from tau2jax.inference.engine import _finish

        ids = self.tokenizer.encode("<tool_call>{not json</tool_call>") + [self.tokenizer.im_end_id]
        return [_finish(ids, params, self.policy_version) for _ in input_ids]


@pytest.mark.parametrize("max_repairs", [0, 3])
def test_max_repairs_reaches_the_episodes(tmp_path, monkeypatch, max_repairs):
    from tau2jax.stages import eval as eval_lib

    monkeypatch.setattr(builders, "engine_factory", lambda config, chat, style: lambda task: _Garbage(chat.tokenizer))
    eval_lib.run(_config(tmp_path, tau2__max_repairs=max_repairs))
    (rec,) = [json.loads(line) for line in (tmp_path / "eval" / "trajectories.jsonl").read_text().splitlines()]
    assert rec["num_repairs"] == max_repairs and rec["num_format_errors"] == max_repairs + 1
    assert rec["termination_reason"] == "agent_error"


# (field, the earlier run's value, overrides of this run): one per class of setting.
CHANGES = [
    ("tau2.max_repairs", 2, {}),  # episode limits
    ("reward.alpha", 0.5, {}),  # reward shaping
    ("tau2.data_root", "/elsewhere/data", {}),  # the tau2 data in use
    ("tokenizer.path", "/other/tokenizer", {}),
    ("eval.top_k", 50, {}),  # sampling
    ("user.base_url", "http://other:30001/v1", {"user__kind": "llm"}),  # the LLM user simulator
    ("engine.url", "http://other:30000", {"engine__kind": "sglang"}),  # the policy server
    ("engine.checkpoint", "/other/params", {"engine__kind": "builtin"}),  # builtin engine's weights
    ("engine.dtype", "bfloat16", {"engine__kind": "builtin"}),  # "auto" resolves to float32 on CPU
]


@pytest.mark.parametrize("field,earlier_value,overrides", CHANGES, ids=[c[0] for c in CHANGES])
def test_a_changed_setting_refuses_to_resume(tmp_path, field, earlier_value, overrides):
    from tau2jax.env import tau2_env
    from tau2jax.stages import eval as eval_lib

    cfg = _config(tmp_path, **overrides)
    earlier = resume.run_settings(cfg, tau2_env.init_tau2()) | {"policy_version": 0}
    current = earlier[field]
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "settings.json").write_text(json.dumps(earlier | {field: earlier_value}))
    with pytest.raises(config_lib.ConfigError, match=f"{field}: {earlier_value!r} -> {current!r}"):
        eval_lib.run(cfg)  # raises before any engine or user is built


def test_engine_and_user_fields_count_only_for_their_kind(tmp_path):
    gold = resume.run_settings(_config(tmp_path), "/data")
    assert not {"engine.url", "engine.checkpoint", "user.base_url", "user.model"} & set(gold)
    llm = resume.run_settings(_config(tmp_path, user__kind="llm", engine__kind="sglang"), "/data")
    assert {"engine.url", "user.base_url", "user.model", "user.temperature", "user.top_p", "user.top_k", "user.min_p",
            "user.repetition_penalty", "user.max_tokens", "user.sglang_params"} <= set(llm)


def _served(info):
    """An SGLang client whose server reports `info` at /get_model_info."""
    from tau2jax.inference.sglang_client import SGLangEngine

    engine = SGLangEngine("http://127.0.0.1:9")
    engine.model_info = lambda: info
    return engine


def test_engine_identity_reads_the_served_weights():
    assert _served({"weight_version": "7", "model_path": "/ckpt/v7"}).identity() == {
        "policy_version": 7, "engine.model_path": "/ckpt/v7", "engine.weight_version": "7"}  # fmt: skip
    # SGLang's default version is not an integer: results then carry the client's own version
    assert _served({"weight_version": "default", "model_path": "/m"}).identity()["policy_version"] == 0


def _gold_at(version):
    from tau2jax.env.gold import GoldEngine

    return lambda config, chat, style: lambda task: GoldEngine(task, style, chat, policy_version=version)


def test_another_policy_version_refuses_to_resume(tmp_path, monkeypatch):
    from tau2jax.stages import eval as eval_lib

    eval_lib.run(_config(tmp_path))
    monkeypatch.setattr(builders, "engine_factory", _gold_at(3))  # the server now serves other weights
    with pytest.raises(config_lib.ConfigError, match="policy_version: 0 -> 3"):
        eval_lib.run(_config(tmp_path, eval__max_tasks_per_domain=2))


def test_a_record_of_another_policy_refuses_to_resume(tmp_path):
    from tau2jax.stages import eval as eval_lib

    eval_lib.run(_config(tmp_path, eval__max_tasks_per_domain=2))
    path = tmp_path / "eval" / "trajectories.jsonl"
    recs = [json.loads(line) for line in path.read_text().splitlines()]
    recs[1]["turns"][-1]["policy_version"] = 5  # weights swapped mid-episode in the earlier run
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    with pytest.raises(config_lib.ConfigError, match=r"has policy_version 5, this run's engine serves 0"):
        eval_lib.run(_config(tmp_path, eval__max_tasks_per_domain=2))  # nothing left to run: still checked


def test_a_superset_of_tasks_resumes(tmp_path):
    from tau2jax.stages import eval as eval_lib

    eval_lib.run(_config(tmp_path))
    result = eval_lib.run(_config(tmp_path, eval__max_tasks_per_domain=3, eval__num_samples=2))
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert summary["run"] == summary["run"] | {"episodes_run": 5, "episodes_resumed": 1}
    assert result["episodes"] == 6 and summary["policy_versions"] == [0]
