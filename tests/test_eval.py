"""The eval stage end to end: gold engine -> Pass@1 = 1 and the written reports; resuming; fault
injection through tau2's LLM user simulator (a local fake endpoint) -> retries and infrastructure
failures kept apart from model metrics, no episode lost."""

import json

import pytest

from test_llm_user import FakeChatServer  # tests/ is on sys.path under pytest

from tau2jax import config as config_lib


def _config(workdir, **overrides):
    c = config_lib.default_config()
    c.stage = "eval"
    c.workdir = str(workdir)
    c.engine.kind = "gold"
    c.user.kind = "scripted"
    c.eval.concurrency = 2
    c.eval.floor = False  # tests/test_eval_floor.py covers it
    for dotted, value in overrides.items():
        section, key = dotted.split("__")
        c[section][key] = value
    config_lib.validate(c)
    return c


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_gold_eval_writes_reports_and_resumes(tmp_path):
    from tau2jax.stages import eval as eval_lib
    from tau2jax.env.trajectory import Trajectory

    cfg = _config(tmp_path, tau2__domains="mock,telecom", tau2__split="test",
                  eval__max_tasks_per_domain=3, eval__num_samples=2)  # fmt: skip
    result = eval_lib.run(cfg)

    out = tmp_path / "eval"
    assert result["pass@1"] == {"overall": 1.0, "mock": 1.0, "telecom": 1.0}
    assert result["pass@2"]["overall"] == 1.0 and result["episodes"] == 12 and result["infra_failures"] == 0
    trajs = [Trajectory.from_json(line) for line in (out / "trajectories.jsonl").read_text().splitlines()]
    keys = {(t.domain, t.task_id, t.sample_index) for t in trajs}
    assert len(trajs) == len(keys) == 12 and {s for _, _, s in keys} == {0, 1}
    assert all(t.reward == 1.0 and t.token_ids and t.infra_error is None for t in trajs)

    summary = json.loads((out / "summary.json").read_text())
    m = summary["metrics"]
    assert m["overall"]["num_tasks"] == 6 and m["telecom"]["num_tasks"] == 3
    assert m["overall"]["pass@k_unbiased"] == {"1": 1.0, "2": 1.0} and m["overall"]["pass^k"]["2"] == 1.0
    assert summary["episodes"]["overall"]["scored_episodes"] == 12
    assert summary["episodes"]["telecom"]["mean_agent_turns"] > 1
    assert summary["config"]["eval"]["num_samples"] == 2
    md = (out / "summary.md").read_text()
    assert "| | Overall | Mock | Telecom |" in md
    assert "| Pass@1 | 100.0% | 100.0% | 100.0% |" in md and "| Pass@2 |" in md
    assert (out / "pass_at_k.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Resume: a crash left a torn line and lost one record -> only that episode runs again.
    lines = (out / "trajectories.jsonl").read_text().splitlines(keepends=True)
    (out / "trajectories.jsonl").write_text("".join(lines[:-1]) + lines[-1][:100])
    again = eval_lib.run(cfg)
    assert again["episodes"] == 12
    assert json.loads((out / "summary.json").read_text())["run"]["episodes_run"] == 1
    recs = _lines(out / "trajectories.jsonl")
    assert len(recs) == len({(r["domain"], r["task_id"], r["sample_index"]) for r in recs}) == 12

    # Other sampling settings in the same workdir would mix two evaluations: refused by name.
    with pytest.raises(config_lib.ConfigError, match="eval.temperature"):
        eval_lib.run(_config(tmp_path, tau2__domains="mock,telecom", tau2__split="test",
                             eval__max_tasks_per_domain=3, eval__num_samples=2, eval__temperature=0.5))  # fmt: skip


def test_unknown_engine_kind_is_a_clear_error():
    from tau2jax.stages import builders

    cfg = config_lib.default_config()
    cfg.engine.kind = "vllm"
    with pytest.raises(builders.EngineUnavailable, match="unknown engine"):
        builders.engine_factory(cfg, chat=None, style=None)


# Fault schedule, per mock task (one sample each, so every conversation is its own):
ALWAYS_DOWN = "create_task_1"  # every user-simulator call fails -> infrastructure failure
FLAKY_TURNS = "update_task_1"  # each turn's first try fails (a timeout, then malformed JSON) -> user retry
FLAKY_EPISODE = "create_task_1_nl_eval"  # first turn fails on both tries -> the episode is run again
HEALTHY = "impossible_task_1"
FAULTS = ["timeout", "malformed"]


def _reply(body):
    """A cooperative user: stops once the (gold) agent gives its final answer."""
    agent_said = body["messages"][-1]["content"] or ""
    done = "taken care of" in agent_said or "not able to make that change" in agent_said
    return "ok", "Thanks. ###STOP###" if done else "Yes, please go ahead."


def _fault_plan(instructions):
    """plan(request, i) for FakeChatServer; the scenario text in the system prompt names the task."""
    seen, served = {}, []

    def plan(body, i):
        system = body["messages"][0]["content"]
        task = next(t for t, text in instructions.items() if text in system)
        turn = len(body["messages"])  # same conversation point -> same key across retries
        tries = seen[(task, turn)] = seen.get((task, turn), 0) + 1
        if task == ALWAYS_DOWN:
            return "500", None
        if task == FLAKY_TURNS and tries == 1:
            served.append(FAULTS[(turn // 2 - 1) % len(FAULTS)])
            return served[-1], None
        if task == FLAKY_EPISODE and turn == 2 and tries <= 2:
            return "500", None
        return _reply(body)

    plan.served = served  # the faults FLAKY_TURNS got, in order
    return plan


def test_user_simulator_faults_are_retried_or_recorded_as_infra_failures(tmp_path):
    from tau2jax.stages import eval as eval_lib
    from tau2jax.env import tau2_env

    ids = [ALWAYS_DOWN, FLAKY_TURNS, FLAKY_EPISODE, HEALTHY]
    instructions = {t.id: t.user_scenario.instructions for t in tau2_env.load_tasks("mock", "base", ids)}
    overrides = dict(tau2__domains="mock", tau2__task_ids=",".join(ids), eval__num_samples=1,
                     eval__max_infra_retries=1, user__kind="llm", user__max_retries=1, user__timeout_s=1.0,
                     user__retry_backoff_s=0.01)  # fmt: skip
    out = tmp_path / "eval"
    plan = _fault_plan(instructions)
    with FakeChatServer(plan) as srv:
        result = eval_lib.run(_config(tmp_path, user__base_url=srv.base_url, **overrides))
        assert plan.served == ["timeout", "malformed"]  # one per user turn of update_task_1

        recs = {r["task_id"]: r for r in _lines(out / "trajectories.jsonl")}
        assert len(_lines(out / "trajectories.jsonl")) == len(recs) == 4  # one final record per episode
        down = recs[ALWAYS_DOWN]
        assert down["infra_error"].startswith("user: UserSimulatorError") and down["reward"] is None
        assert "failed after 2 attempt(s)" in down["infra_error"]
        for t in (FLAKY_TURNS, FLAKY_EPISODE, HEALTHY):
            assert recs[t]["infra_error"] is None and recs[t]["reward"] == 1.0, recs[t]["termination_reason"]
        # 2 tries x 2 episode attempts reached the server for the task that is always down
        down_text = instructions[ALWAYS_DOWN]
        assert sum(down_text in r["messages"][0]["content"] for r in srv.requests) == 4
        retried = _lines(out / "infra_retries.jsonl")
        assert sorted(r["task_id"] for r in retried) == [ALWAYS_DOWN, FLAKY_EPISODE]

        assert result["infra_failures"] == 1 and result["infra_retries"] == 2
        assert result["pass@1"]["overall"] == 1.0  # the outage is not a model failure
        summary = json.loads((out / "summary.json").read_text())
        assert summary["metrics"]["overall"]["num_tasks"] == 3
        assert summary["metrics"]["overall"]["infra_failures"] == 1
        assert summary["episodes"]["overall"]["termination_reasons"]["infra_error"] == 1
        assert "| infrastructure failures | 1 | 1 |" in (out / "summary.md").read_text()

        # The simulator is back (same URL: another one would be another user simulator, refused):
        # a rerun plays only the failed episode.
        srv.plan = lambda body, i: _reply(body)
        result = eval_lib.run(_config(tmp_path, user__base_url=srv.base_url, **overrides))
    recs = _lines(out / "trajectories.jsonl")
    assert len(recs) == 4 and all(r["infra_error"] is None and r["reward"] == 1.0 for r in recs)
    assert result["infra_failures"] == 0 and result["pass@1"]["overall"] == 1.0
    assert json.loads((out / "summary.json").read_text())["run"]["episodes_run"] == 1


def test_reports_never_carry_the_api_key():
    c = config_lib.default_config()
    c.user.api_key = "sk-secret"
    assert config_lib.redacted(c)["user"]["api_key"] == "<redacted>"
    assert c.user.api_key == "sk-secret"  # the run itself keeps it
