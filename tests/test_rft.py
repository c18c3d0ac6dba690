"""Stage rft (tau2jax/rl/rft.py): the keep rule, the kept file as SFT data, the ledger and stats
adding up, resuming; end to end on the mock domain with the gold agent and planned outcomes."""

import json
import os

import numpy as np
import pytest

from tau2jax import config as config_lib
from tau2jax.env.trajectory import Trajectory
from tau2jax.rl import rft
from tau2jax.stages import rft as rft_stage
from cli_runs import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(ROOT, "data", "tiny_sft.jsonl")
GOLD_FAILS = "update_task_with_history_and_env_assertions"  # tau2 mock task the gold script cannot pass
MOCK_TASKS = 9


def _config(workdir, **overrides):
    c = config_lib.default_config()
    c.stage = "rft"
    c.workdir = str(workdir)
    c.tau2.domains = "mock"
    c.tau2.split = "train"
    c.engine.kind = "gold"
    c.user.kind = "scripted"
    c.rft.samples = 2
    c.rft.concurrency = 2
    c.eval.floor_cache_dir = str(workdir / "floor")
    for dotted, value in overrides.items():
        section, key = dotted.split("__")
        c[section][key] = value
    config_lib.validate(c)
    return c


def _lines(path):
    return [json.loads(line) for line in open(path)]


def _check_stats_add_up(stats, ledger, samples):
    for name in [k for k in stats if k not in ("per_task", "run")]:
        g = stats[name]
        recs = [r for r in ledger if name == "overall" or r["task"].startswith(name + "/")]
        assert g["episodes"] == len(recs) == g["kept"] + sum(g["dropped"].values())
        assert g["kept"] == g["kept_success"] + g["kept_partial"]
        assert g["samples"] == g["tasks_finished"] * samples
        assert g["infra_failures"] == sum(r["reason"] == "infra_error" for r in recs)
    rows = stats["per_task"].values()
    assert sum(r["kept"] for r in rows) == stats["overall"]["kept"]
    assert stats["overall"]["tasks_none_kept"] == sum(r["finished"] and not r["kept"] for r in rows)


def _traj(i, reward, partial):
    return Trajectory(task_id="t", domain="mock", prompt_style="native", sample_index=i, reward=reward,
                      partial_reward=partial)


def test_keep_rule():
    def decide(*outcomes, min_partial=0.6):
        trajs = [_traj(i, r, p) for i, (r, p) in enumerate(outcomes)]
        return [(t.sample_index, status, reason) for t, status, reason in rft.select(trajs, min_partial)]

    # every success is kept, and nothing else, however good its partial reward
    assert decide((1.0, 1.0), (0.0, 0.9), (1.0, 0.2)) == [
        (0, "kept", "success"), (1, "dropped", "failed"), (2, "kept", "success")]
    # no success: only the best partial, when it reaches min_partial (inclusive); ties -> first sample
    assert decide((0.0, 0.3), (0.0, 0.6), (0.0, 0.6)) == [
        (0, "dropped", "not_best"), (1, "kept", "best_partial"), (2, "dropped", "not_best")]
    assert decide((0.0, 0.59), (0.0, None)) == [(0, "dropped", "partial_below_min"), (1, "dropped", "partial_below_min")]
    assert decide((0.0, 0.59), min_partial=0.5) == [(0, "kept", "best_partial")]


def test_gold_rft_keeps_every_passing_sample_as_loadable_token_records(tmp_path):
    from tau2jax.data.pipeline import make_sft_dataset
    from tau2jax.data.tokenizer import load_tokenizer

    out = rft_stage.run(_config(tmp_path, rft__mix_files=FIXTURE))
    ledger, kept_trajs = _lines(tmp_path / "rft/ledger.jsonl"), _lines(tmp_path / "rft/kept_trajectories.jsonl")
    assert out["kept"] == 2 * (MOCK_TASKS - 1) and out["mixed"] == 6 and out["file"] == str(tmp_path / "rft/kept.jsonl")
    assert len(ledger) == 2 * MOCK_TASKS and all(r["status"] == "kept" for r in ledger if GOLD_FAILS not in r["task"])
    assert {r["reason"] for r in ledger if GOLD_FAILS in r["task"]} == {"partial_below_min"}

    # kept.jsonl: each kept episode's ids and mask exactly as sampled, then the mix file verbatim
    lines = open(out["file"]).read().splitlines()
    records, mixed = [json.loads(x) for x in lines[: out["kept"]]], lines[out["kept"]:]
    assert mixed == [x for x in open(FIXTURE).read().splitlines() if x.strip()]
    by_key = {(f"{t['domain']}/{t['task_id']}", t["sample_index"]): t for t in kept_trajs}
    for rec in records:
        t = by_key[(rec["task"], rec["sample_index"])]
        assert rec["token_ids"] == t["token_ids"] and rec["loss_mask"] == t["loss_mask"]
        assert rec["reward"] == 1.0 and rec["kept_as"] == "success" and rec["source"] == "rft"

    tok = load_tokenizer()
    ds = make_sft_dataset([out["file"]], tok, max_len=4096, batch_size=4, seed=0, process_index=0,
                          process_count=1)  # fmt: skip
    assert ds.stats.conversations == ds.stats.kept == out["kept"] + 6
    rft_loss = sum(int(np.sum(r["loss_mask"][1:])) for r in records)
    assert rft_loss > 0 and ds.stats.loss_tokens > rft_loss

    stats = json.loads((tmp_path / "rft/stats.json").read_text())
    _check_stats_add_up(stats, ledger, samples=2)
    assert stats["mock"]["success_rate"] == out["success_rate"]["mock"] == round(8 / 9, 4)
    assert stats["mock"]["tasks_none_kept"] == 1 and stats["per_task"][f"mock/{GOLD_FAILS}"]["kept"] == 0
    # the do-nothing agent passes create_task_1_nl_eval (nothing to change, nothing it must say right)
    assert stats["per_task"]["mock/create_task_1_nl_eval"]["null_agent_passes"] is True
    assert stats["mock"]["kept_on_null_agent_passing_tasks"] == 2
    assert "| kept: success | 16 | 16 |" in (tmp_path / "rft/stats.md").read_text()

    # resume: nothing is played again, the outputs are the same
    before = open(out["file"]).read()
    again = rft_stage.run(_config(tmp_path, rft__mix_files=FIXTURE))
    assert again["kept"] == out["kept"] and open(out["file"]).read() == before
    assert len(_lines(tmp_path / "rft/ledger.jsonl")) == len(ledger)
    with pytest.raises(config_lib.ConfigError, match=r"rft.min_partial: 0.6 -> 0.5"):
        rft_stage.run(_config(tmp_path, rft__min_partial=0.5))
    # a field the earlier run did not record counts as changed (as in eval): no silent mixing
    settings_path = tmp_path / "rft/settings.json"
    recorded = json.loads(settings_path.read_text())
    del recorded["rft.samples"]
    settings_path.write_text(json.dumps(recorded))
    with pytest.raises(config_lib.ConfigError, match=r"an rft run with other settings \(rft.samples: None -> 2\)"):
        rft_stage.run(_config(tmp_path, rft__mix_files=FIXTURE))


class _Down:
    """An engine whose server is down: every episode that uses it is an infrastructure failure."""

    kind = "scripted"
    policy_version = 0

    def generate(self, input_ids, params):
        raise ConnectionError("policy server unreachable")


def _planned_environment(plan, played):
    """Tau2Environment whose episodes follow `plan[task_id][sample_index]`, one behaviour per
    attempt (the last repeats): "gold", "null" (only apologises: reward 0, partial 0), "extra"
    (gold plus a stray create_task: reward 0, partial 1.0 under the precision-blind cookbook credit;
    the default's precision factor and wrong-call penalty take it below rft.min_partial) or "down"."""
    from tau2jax.env import environments
    from tau2jax.env.gold import GoldEngine, NullEngine, gold_script
    from tau2jax.env.prompts import AgentAction

    class Planned(environments.Tau2Environment):
        def play(self, ref, *, engine, sampling, sample_index):
            attempt = played.setdefault((ref.task_id, sample_index), 0)
            played[(ref.task_id, sample_index)] += 1
            behaviours = plan[ref.task_id][sample_index]
            behaviour = behaviours[min(attempt, len(behaviours) - 1)]
            script = gold_script(ref.task)
            engine = {
                "gold": lambda: GoldEngine(ref.task, self.style, self.chat),
                "null": lambda: NullEngine(ref.task, self.style, self.chat),
                "extra": lambda: GoldEngine(ref.task, self.style, self.chat, script=script[:-1] + [
                    AgentAction.call("create_task", {"user_id": "user_1", "title": "Extra"}), script[-1]]),
                "down": _Down,
            }[behaviour]()  # fmt: skip
            return super().play(ref, engine=engine, sampling=sampling, sample_index=sample_index)

    return Planned


def test_keep_rule_and_infra_failures_end_to_end_with_resume(tmp_path, monkeypatch):
    from tau2jax.env import environments

    plan = {
        "create_task_1": [["gold"], ["null"]],  # one success: kept; the other failed
        "create_task_1_with_env_assertions": [["null"], ["extra"]],  # no success: best partial 1.0 kept
        "update_task_1": [["null"], ["null"]],  # nothing reaches 0.6: none kept
        "impossible_task_1": [["down", "gold"], ["down"]],  # a retried sample, then one that stays down
    }
    played = {}
    monkeypatch.setattr(environments, "Tau2Environment", _planned_environment(plan, played))
    cfg = _config(tmp_path, tau2__task_ids=",".join(plan), rft__max_infra_retries=1, reward__preset="cookbook")
    out = rft_stage.run(cfg)
    assert out["kept"] == 2 and out["tasks_unfinished"] == 1
    ledger = _lines(tmp_path / "rft/ledger.jsonl")
    got = sorted((r["task"].split("/")[1], r["sample_index"], r["status"], r["reason"]) for r in ledger)
    assert got == sorted([
        ("create_task_1", 0, "kept", "success"), ("create_task_1", 1, "dropped", "failed"),
        ("create_task_1_with_env_assertions", 0, "dropped", "not_best"),
        ("create_task_1_with_env_assertions", 1, "kept", "best_partial"),
        ("update_task_1", 0, "dropped", "partial_below_min"), ("update_task_1", 1, "dropped", "partial_below_min"),
        # infrastructure failures are never scored or kept; a group that lost a sample is not used
        ("impossible_task_1", 0, "dropped", "infra_error"), ("impossible_task_1", 0, "dropped", "group_incomplete"),
        ("impossible_task_1", 1, "dropped", "infra_error"), ("impossible_task_1", 1, "dropped", "infra_error"),
    ])  # fmt: skip
    assert all(r["reward"] is None for r in ledger if r["reason"] == "infra_error")
    records = _lines(out["file"])
    assert [(r["task"], r["sample_index"], r["kept_as"]) for r in records] == [
        ("mock/create_task_1", 0, "success"), ("mock/create_task_1_with_env_assertions", 1, "best_partial")]
    assert records[1]["reward"] == 0.0 and records[1]["partial_reward"] == 1.0
    stats = json.loads((tmp_path / "rft/stats.json").read_text())
    _check_stats_add_up(stats, ledger, samples=2)
    assert (stats["mock"]["kept_success"], stats["mock"]["kept_partial"], stats["mock"]["tasks_none_kept"]) == (1, 1, 1)

    # rerun once the server is back: only the unfinished task is played, and its group is kept whole
    plan["impossible_task_1"] = [["gold"], ["gold"]]
    played.clear()
    out = rft_stage.run(cfg)
    assert set(played) == {("impossible_task_1", 0), ("impossible_task_1", 1)}
    assert out["kept"] == 4 and out["tasks_unfinished"] == 0
    assert [(r["task"], r["sample_index"]) for r in _lines(out["file"])][2:] == [
        ("mock/impossible_task_1", 0), ("mock/impossible_task_1", 1)]
    ledger = _lines(tmp_path / "rft/ledger.jsonl")
    assert len(ledger) == 10 + 2  # the earlier attempts stay accounted for
    stats = json.loads((tmp_path / "rft/stats.json").read_text())
    _check_stats_add_up(stats, ledger, samples=2)
    assert stats["mock"]["dropped"] == {"failed": 1, "group_incomplete": 1, "infra_error": 3, "not_best": 1,
                                        "partial_below_min": 2}  # fmt: skip


def test_refuses_test_split_and_bad_mix_files(tmp_path):
    with pytest.raises(config_lib.ConfigError, match="train tasks only"):
        rft_stage.run(_config(tmp_path, tau2__split="test"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"token_ids": [1, 2], "loss_mask": [0, 1, 1]}) + "\n")
    from tau2jax.data.sft_data import DataError

    with pytest.raises(DataError, match=f"{bad}:1: loss_mask"):
        rft_stage.run(_config(tmp_path, rft__mix_files=str(bad)))
    assert not (tmp_path / "rft" / "ledger.jsonl").exists()  # refused before any episode ran


@pytest.mark.slow
def test_builtin_engine_rft_keeps_only_passing_episodes_and_sft_learns_them(tmp_path):
    # An under-trained tiny policy (4 SFT steps) samples the mock tasks with the builtin engine.
    sft = train("--config", "configs/tiny_sft.py", f"--config.workdir={tmp_path}/sft", "--config.train.steps=4")
    out = train("--config", "configs/tiny_rft.py", f"--config.workdir={tmp_path}/rft", "--config.rft.samples=2",
               f"--config.engine.checkpoint={sft['params']}", f"--config.eval.floor_cache_dir={tmp_path}/floor")
    records = _lines(out["file"])
    # It passes what a do-nothing agent passes (create_task_1_nl_eval), so something is kept.
    assert out["kept"] == len(records) > 0
    for r in records:
        assert r["reward"] >= 1.0 or (r["kept_as"] == "best_partial" and r["partial_reward"] >= 0.6), r["task"]
    ledger = _lines(tmp_path / "rft/rft/ledger.jsonl")
    assert {(r["task"], r["sample_index"]) for r in ledger if r["status"] == "kept"} == {
        (r["task"], r["sample_index"]) for r in records}
    # SFT from the same policy on the kept file lowers the loss of its own kept samples.
    again = train("--config", "configs/tiny_sft.py", f"--config.workdir={tmp_path}/sft2", "--config.train.steps=5",
                 f"--config.model.init_from={sft['params']}", f"--config.data.train_files={out['file']}",
                 "--config.data.max_len=1024")  # fmt: skip
    assert again["first_loss"] > again["final_loss"]
