"""Stage `pipeline`: wiring, resume and refusal with stand-in stages; the report."""

import json
import os

import ml_collections
import pytest

from configs import tiny_pipeline
from tau2jax.eval import pipeline_report
from tau2jax.stages import pipeline
from tau2jax.config import ConfigError
from tau2jax.env import tau2_env

# Pass@1 of each policy on the 8 mock tasks the do-nothing agent fails (the stand-in eval's outcome)
PASSES = {"base": 0, "sft": 5, "rft": 6, "grpo": 6}


class StandIns:
    """Stand-in stages: record each config they get, write what the real stage would hand on."""

    def __init__(self):
        self.calls = []

    def __call__(self, c):
        self.calls.append(c)
        os.makedirs(c.workdir, exist_ok=True)
        if c.stage == "demos":
            return {"mock": {"file": os.path.join(c.workdir, "mock.jsonl"), "replayed": 9, "reward_1": 8}}
        if c.stage in ("sft", "grpo"):
            return {"params": os.path.join(c.workdir, "params")}
        if c.stage == "rft":
            return {"file": os.path.join(c.workdir, "rft", "kept.jsonl")}
        policy = {s: p for s, (p, _) in pipeline.EVALS.items()}[os.path.basename(c.workdir)]
        return self._eval(c, PASSES[policy])

    @staticmethod
    def _eval(c, passes):
        out = os.path.join(c.workdir, "eval")
        os.makedirs(out)
        # k = 1: metrics.compute's "pass@k" key is "pass@1"
        beyond = {"pass@1": passes / 8, "pass^k": {"1": passes / 8}, "num_tasks": 8}
        every = {"pass@1": (passes + 1) / 9, "pass^k": {"1": (passes + 1) / 9}, "num_tasks": 9}
        summary = {"k": 1, "split": "test", "domains": ["mock"],
                   "metrics": {"overall": every, "mock": every},
                   "metrics_beyond_floor": {"overall": beyond, "mock": beyond},
                   "floor": {g: {"pass_rate": 1 / 9, "passed": 1, "tasks": 9} for g in ("overall", "mock")},
                   "per_task": {"mock": {t.id: {} for t in tau2_env.load_tasks("mock", "test")}}}
        with open(os.path.join(out, "summary.json"), "w") as f:
            json.dump(summary, f)
        return {"stage": "eval", "out_dir": out}


@pytest.fixture
def config(tmp_path):
    c = tiny_pipeline.get_config()
    c.workdir = str(tmp_path / "p")
    c.model.init_from = str(tmp_path / "orbax")  # stand-in stages never read it
    return c


def test_steps_run_in_order_each_fed_by_the_one_before(config):
    stages = StandIns()
    out = pipeline.run(config, run_stage=stages)
    by_step = {os.path.basename(c.workdir): c for c in stages.calls}
    assert list(by_step) == [s for s, _, _ in pipeline.STEPS]
    w = config.workdir
    assert by_step["sft"].data.train_files == f"{w}/demos/mock.jsonl"
    assert by_step["sft"].train.steps == config.pipeline.sft.train.steps  # the step's overrides
    assert by_step["rft"].engine.checkpoint == f"{w}/sft/params"
    assert by_step["rft"].rft.mix_files == f"{w}/demos/mock.jsonl"
    assert by_step["sft_rft"].model.init_from == f"{w}/sft/params"
    assert by_step["sft_rft"].data.train_files == f"{w}/rft/rft/kept.jsonl"
    assert by_step["grpo"].model.init_from == f"{w}/sft_rft/params"
    assert {s: by_step[s].engine.checkpoint for s in pipeline.EVALS} == {
        "eval_base": config.model.init_from, "eval_sft": f"{w}/sft/params",
        "eval_rft": f"{w}/sft_rft/params", "eval_grpo": f"{w}/grpo/params"}
    # training steps take train tasks; every eval the same settings (pipeline.eval)
    assert {by_step[s].tau2.split for s in ("demos", "rft", "grpo")} == {"train"}
    assert len({json.dumps(by_step[s].eval.to_dict()) + by_step[s].tau2.split for s in pipeline.EVALS}) == 1
    assert out["stages"] == {p: {"pass@1": n / 8, "pass@k": n / 8} for p, n in PASSES.items()}


def test_train_task_ids_reach_the_training_steps_only(config):
    config.pipeline.train_task_ids = "create_task_1,update_task_with_message_history"
    stages = StandIns()
    pipeline.run(config, run_stage=stages)
    by_step = {os.path.basename(c.workdir): c for c in stages.calls}
    assert {s: by_step[s].tau2.task_ids for s in ("demos", "rft", "grpo")} == dict.fromkeys(
        ("demos", "rft", "grpo"), config.pipeline.train_task_ids)
    assert {by_step[s].tau2.task_ids for s in pipeline.EVALS} == {""}  # evals keep the whole split
    report = json.load(open(os.path.join(config.workdir, "report.json")))
    assert report["trained_on"]["mock"]["trained"] == 2


def test_finished_steps_are_reused_and_an_unfinished_one_reruns(config):
    pipeline.run(config, run_stage=StandIns())
    again = StandIns()
    out = pipeline.run(config, run_stage=again)
    assert again.calls == [] and out["steps_run"] == {}
    os.remove(os.path.join(config.workdir, "grpo", pipeline.DONE))  # as if killed during GRPO
    os.rename(os.path.join(config.workdir, "eval_grpo"), os.path.join(config.workdir, "eval_grpo.old"))
    resumed = StandIns()
    out = pipeline.run(config, run_stage=resumed)
    assert [os.path.basename(c.workdir) for c in resumed.calls] == ["grpo", "eval_grpo"]
    assert out["stages"]["grpo"]["pass@1"] == PASSES["grpo"] / 8


def test_sglang_is_repointed_only_when_the_params_change_and_each_keeps_one_version(config, monkeypatch):
    served = []
    monkeypatch.setattr(pipeline, "serve", lambda c, params, version: served.append((os.path.basename(c.workdir),
                                                                                      params, version)))
    config.engine.kind = "sglang"
    pipeline.run(config, run_stage=StandIns())
    w = config.workdir
    # eval_sft and rft read the same SFT params: published once; versions name the producing step
    assert served == [("eval_base", config.model.init_from, 0), ("eval_sft", f"{w}/sft/params", 2),
                      ("eval_rft", f"{w}/sft_rft/params", 5), ("eval_grpo", f"{w}/grpo/params", 7)]
    # resumed at rft (a fresh process: the server's state unknown), the same params keep their version
    os.remove(os.path.join(w, "rft", pipeline.DONE))
    served.clear()
    pipeline.run(config, run_stage=StandIns())
    assert served == [("rft", f"{w}/sft/params", 2)]


def test_a_changed_setting_of_a_finished_step_is_refused_by_name(config):
    pipeline.run(config, run_stage=StandIns())
    n = config.pipeline.sft.train.steps
    config.pipeline.sft.train.steps = n + 1
    with pytest.raises(ConfigError, match=rf"'sft'.*train\.steps: {n} -> {n + 1}"):
        pipeline.run(config, run_stage=StandIns())
    config.pipeline.sft.train.steps = n
    config.eval.temperature = 0.5  # shared by every eval: the first finished one refuses it
    with pytest.raises(ConfigError, match=r"'eval_base'.*eval\.temperature: 0\.0 -> 0\.5"):
        pipeline.run(config, run_stage=StandIns())


def test_a_requeued_job_with_new_servers_and_keys_keeps_its_finished_steps_and_no_key_is_stored(config):
    """slurm_rl.sbatch makes a fresh API key per job start and a requeue lands on other hosts: the
    finished steps still count, and the DONE files never held the keys."""
    config.user.api_key, config.engine.api_key = "job-1-user-key", "job-1-policy-key"
    pipeline.run(config, run_stage=StandIns())
    stored = [open(os.path.join(d, f)).read() for d, _, fs in os.walk(config.workdir) for f in fs if f == pipeline.DONE]
    assert stored and not any("job-1" in text for text in stored)
    config.user.api_key, config.engine.api_key = "job-2-user-key", "job-2-policy-key"
    config.user.base_url, config.engine.url = "http://node7:30001/v1", "http://node7:30000"
    served = StandIns()
    pipeline.run(config, run_stage=served)
    assert served.calls == []  # every step was finished


def test_unknown_override_keys_and_wrong_types_are_refused_by_name(config):
    config.pipeline.sft = ml_collections.ConfigDict({"train": {"stepz": 3}})
    with pytest.raises(ConfigError, match=r"pipeline\.sft\.train\.stepz"):
        pipeline.run(config, run_stage=StandIns())
    config.pipeline.sft = ml_collections.ConfigDict({"train": {"steps": "many"}})
    with pytest.raises(ConfigError, match=r"pipeline\.sft\.train\.steps"):
        pipeline.run(config, run_stage=StandIns())


def test_the_report_has_every_policy_beside_the_floor_and_says_what_was_trained(config):
    out = pipeline.run(config, run_stage=StandIns())
    md = open(out["report"]["md"]).read()
    for policy, n in PASSES.items():
        assert f"| {policy} | {100 * n / 8:.1f}% |" in md  # tasks beyond the floor come first
    assert "11.1% of 9" in md  # the do-nothing floor
    assert "no train/test split" in md and "7 of the evaluated tasks were trained on" in md
    assert "trained on: create_task_1, " in md and "create_task_1_nl_eval" not in md.split("trained on: ")[1]
    data = json.load(open(out["report"]["json"]))
    assert data["rows"]["sft"]["mock"]["all"]["pass@1"] == pytest.approx(6 / 9)
    assert os.path.getsize(out["report"]["png"]) > 0


def test_the_h100_pipeline_takes_each_stage_from_its_own_config_file():
    from configs import eval as eval_config
    from configs import qwen3_4b_grpo, qwen3_4b_pipeline, qwen3_4b_rft, qwen3_4b_sft

    c = qwen3_4b_pipeline.get_config()
    inputs = {"demo_files": ["d.jsonl"], "params": {"sft": "s", "sft_rft": "r", "grpo": "g"}, "rft_file": "k.jsonl"}
    steps = {s: pipeline.step_config(c, s, inputs) for s, _, _ in pipeline.STEPS}
    assert steps["sft"].optim.to_dict() == qwen3_4b_sft.get_config().optim.to_dict()
    assert steps["sft_rft"].data.to_dict() == qwen3_4b_sft.get_config().data.to_dict() | {"train_files": "k.jsonl"}
    assert steps["rft"].rft.to_dict() == qwen3_4b_rft.get_config().rft.to_dict() | {"mix_files": "d.jsonl"}
    grpo = qwen3_4b_grpo.get_config()
    assert steps["grpo"].rl.to_dict() == grpo.rl.to_dict() and steps["grpo"].optim.to_dict() == grpo.optim.to_dict()
    assert steps["grpo"].engine.max_new_tokens == 4096 and steps["demos"].user.kind == "scripted"
    ev = eval_config.get_config()
    for s in pipeline.EVALS:
        assert steps[s].eval.to_dict() == ev.eval.to_dict() and steps[s].tau2.split == "test"
        assert steps[s].engine.kind == "sglang" and steps[s].engine.max_new_tokens == ev.engine.max_new_tokens


def test_with_several_samples_the_report_gives_pass_at_k_and_pass_hat_k_columns():
    cell = {"tasks": 8, "pass@1": 0.25, "pass@k": 0.5, "pass^k": 0.125}
    row = {"overall": {"floor": {"pass_rate": 0.1, "tasks": 10}, "all": cell, "beyond_floor": cell}}
    data = {"k": 4, "split": "test", "groups": ["overall"], "trained_on": {}, "rows": {"sft": row}}
    md = pipeline_report.render_report(data)
    assert "| policy | overall Pass@1 | overall Pass@4 | overall pass^4 |" in md
    assert "| sft | 25.0% | 50.0% | 12.5% |" in md


def test_the_cli_runs_the_stage_and_refuses_a_pipeline_without_start_weights(tmp_path):
    from cli_runs import run_train

    proc = run_train("--config", "configs/tiny_pipeline.py", f"--config.workdir={tmp_path}", check=False, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]  # the stage imports the CLI module without redefining flags
    assert "config.model.init_from" in proc.stderr
