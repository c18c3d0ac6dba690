"""tau2's own file format for our episodes (tau2jax/eval/tau2_results.py): per domain, our
Trajectory -> tau2 Results file -> loaded by tau2 -> the same reward and messages, and tau2's own
evaluator re-scores it to our reward (a gold success, a do-nothing failure, a context-exhausted
episode); the eval writes the files incrementally and resumes them; bad files are clear errors;
the leaderboard submission; tau2 files as SFT data and as an eval report."""

import json

import pytest

from tau2jax.env import tau2_env  # noqa: F401  (first: quiets tau2's import-time logging)

from tau2jax import config as config_lib
from tau2jax.data.chat import ChatFormat
from tau2jax.data.tokenizer import load_tokenizer
from tau2jax.env import prompts
from tau2jax.env.episode import run_episode
from tau2jax.env.gold import GoldEngine, NullEngine
from tau2jax.env.scripted_user import ScriptedUser
from tau2jax.eval import tau2_results
from tau2jax.inference.engine import ContextLengthError, SamplingParams


@pytest.fixture(scope="module")
def chat():
    return ChatFormat(load_tokenizer())


class _OutOfContext:
    """Answers the first turn like the gold agent, then the conversation no longer fits."""

    policy_version = 0

    def __init__(self, gold):
        self.gold, self.calls = gold, 0

    def generate(self, input_ids, params):
        self.calls += 1
        if self.calls > 1:
            raise ContextLengthError("prompt longer than the model's context length")
        return self.gold.generate(input_ids, params)


def _episodes(domain, chat):
    """(gold success, do-nothing failure, context-exhausted) on the first test task the null agent fails."""
    from tau2jax.eval import floor

    style = prompts.get_style("native")
    tasks = tau2_env.load_tasks(domain, "test")
    task = next(t for t in tasks[:6] if not floor.play(t, domain, chat=chat, style=style).success)
    out = []
    for i, engine in enumerate([GoldEngine(task, style, chat), NullEngine(task, style, chat),
                                _OutOfContext(GoldEngine(task, style, chat))]):  # fmt: skip
        out.append(run_episode(task, domain, engine=engine, user=ScriptedUser(task), chat=chat, style=style,
                               sampling=SamplingParams(temperature=0.0, seed=100 + i), sample_index=i))
    return task, out


def _info(domain, trials):
    return tau2_results.make_info(domain, agent={"implementation": "tau2jax.native", "llm": "test-model"},
                                  user={"implementation": "tau2jax.scripted_user"}, num_trials=trials,
                                  max_steps=100, max_errors=10, seed=0)  # fmt: skip


@pytest.mark.parametrize("domain", ["airline", "retail", "telecom"])
def test_round_trip_through_tau2(domain, chat, tmp_path):
    from tau2.data_model.simulation import Results
    from tau2.scripts.evaluate_trajectories import compute_simulation_rewards

    task, trajs = _episodes(domain, chat)
    ok, failed, exhausted = trajs
    assert ok.reward == 1.0 and failed.reward == 0.0 and exhausted.context_exhausted and exhausted.reward == 0.0
    assert exhausted.termination_reason == "agent_error"
    (path,) = tau2_results.write_results(tmp_path, [t.to_dict() for t in trajs], {domain: _info(domain, 3)},
                                         {domain: [task]})  # fmt: skip
    res = Results.load(path)  # tau2's own loader
    assert res.info.environment_info.domain_name == domain and [t.id for t in res.tasks] == [task.id]
    assert [s.trial for s in res.simulations] == [0, 1, 2]
    for sim, traj in zip(res.simulations, trajs):
        assert sim.reward_info.reward == traj.reward
        assert sim.termination_reason.value == traj.termination_reason
        assert sim.seed == traj.turns[0]["seed"] and sim.duration == traj.timings["total"]
        got = [m.model_dump(mode="json", exclude={"turn_idx"}) for m in sim.messages]
        want = [{k: v for k, v in m.items() if k != "turn_idx"} for m in traj.tau2_messages]
        assert got == want
    if domain == "telecom":  # dual control: the user's own tool calls and their results are in the file
        msgs = res.simulations[0].messages
        assert any(m.role == "user" and m.tool_calls for m in msgs)
        assert any(m.role == "tool" and m.requestor == "user" for m in msgs)
    again = compute_simulation_rewards(res)  # tau2's evaluator, from the file alone
    assert [s.reward_info.reward for s in again.simulations] == [1.0, 0.0, 0.0]

    # and back: our report's records from the file
    d, tasks, records, _ = tau2_results.records_from_results(path)
    assert d == domain and [r["reward"] for r in records] == [1.0, 0.0, 0.0]
    assert [r["sample_index"] for r in records] == [0, 1, 2]


def _eval_config(workdir, **overrides):
    c = config_lib.default_config()
    c.stage = "eval"
    c.workdir = str(workdir)
    c.engine.kind = "gold"
    c.user.kind = "scripted"
    c.eval.concurrency = 2
    c.eval.floor = False
    c.tau2.split = "test"
    for dotted, value in overrides.items():
        section, key = dotted.split("__")
        c[section][key] = value
    config_lib.validate(c)
    return c


def test_eval_writes_results_files_and_resumes_them(tmp_path):
    from tau2.data_model.simulation import Results

    from tau2jax.stages import eval as eval_lib

    cfg = _eval_config(tmp_path, tau2__domains="mock,telecom", eval__max_tasks_per_domain=2, eval__num_samples=2)
    eval_lib.run(cfg)
    out = tmp_path / "eval"
    files = sorted((out / "trajectories").glob("*.json"))
    assert [f.name for f in files] == ["mock.json", "telecom.json"]
    assert not list((out / "trajectories").glob("*.tmp"))  # nothing half-written left behind
    assert not (out / "submission.json").exists()  # not the three leaderboard domains
    first = {f.name: Results.load(f) for f in files}
    assert all(len(r.simulations) == 4 and r.info.num_trials == 2 for r in first.values())
    assert first["mock.json"].info.agent_info.llm == "gold"

    # a crash lost the last record: only it runs again, the file keeps the others as written
    lines = (out / "trajectories.jsonl").read_text().splitlines(keepends=True)
    lost = json.loads(lines[-1])
    (out / "trajectories.jsonl").write_text("".join(lines[:-1]))
    eval_lib.run(cfg)
    path = out / "trajectories" / f"{lost['domain']}.json"
    res = Results.load(path)
    assert len(res.simulations) == 4
    before = {(s.task_id, s.trial): s.start_time for s in first[path.name].simulations}
    after = {(s.task_id, s.trial): s.start_time for s in res.simulations}
    changed = [k for k in before if before[k] != after[k]]
    assert changed == [(lost["task_id"], lost["sample_index"])]


def test_three_domain_eval_writes_an_accepted_submission(tmp_path):
    from tau2.scripts.leaderboard.submission import Submission

    from tau2jax.stages import eval as eval_lib

    cfg = _eval_config(tmp_path, tau2__domains="airline,retail,telecom", eval__max_tasks_per_domain=1,
                       eval__num_samples=2, eval__model_name="my-model", eval__organization="my-lab",
                       eval__contact_email="me@example.org")  # fmt: skip
    eval_lib.run(cfg)
    sub = Submission.model_validate_json((tmp_path / "eval" / "submission.json").read_text())
    assert sub.model_name == "my-model" and sub.organization == "my-lab" and sub.contact_info.email == "me@example.org"
    for d in ("airline", "retail", "telecom"):
        r = sub.results.get_domain_results(d)
        assert (r.pass_1, r.pass_2, r.pass_3) == (100.0, 100.0, None)
    assert "not a leaderboard run" in sub.methodology.notes


def test_pass_hat_k_is_taus():
    recs = [{"task_id": "a", "reward": r} for r in (1.0, 1.0, 0.0, 1.0)] + \
           [{"task_id": "b", "reward": r} for r in (0.0, 0.0, 0.0, 1.0)]  # fmt: skip
    ks = tau2_results.pass_hat_ks(recs, ["a", "b"])
    assert ks[1] == pytest.approx((3 / 4 + 1 / 4) / 2)
    assert ks[2] == pytest.approx((3 / 6 + 0) / 2) and ks[4] == 0.0
    # a trial lost to the infrastructure is no outcome: k = 4 is scored on task a alone
    lost = [r if i != 7 else {"task_id": "b", "reward": None} for i, r in enumerate(recs)]
    ks = tau2_results.pass_hat_ks(lost, ["a", "b"])
    assert ks[1] == pytest.approx((3 / 4 + 0 / 3) / 2) and ks[4] == 0.0 and ks[3] == pytest.approx((1 / 4 + 0) / 2)
    assert tau2_results.pass_hat_ks([{"task_id": "a", "reward": None}], ["a"]) == {}


def test_bad_results_files_name_file_and_field(tmp_path, chat):
    task = tau2_env.load_tasks("mock")[0]
    ok = run_episode(task, "mock", engine=GoldEngine(task, prompts.get_style("native"), chat),
                     user=ScriptedUser(task), chat=chat, style="native", sampling=SamplingParams(temperature=0.0))
    (path,) = tau2_results.write_results(tmp_path, [ok.to_dict()], {"mock": _info("mock", 1)}, {"mock": [task]})
    data = json.loads(path.read_text())

    del data["simulations"][0]["termination_reason"]
    bad = tmp_path / "missing.json"
    bad.write_text(json.dumps(data))
    with pytest.raises(tau2_results.Tau2ResultsError, match=r"missing\.json.*simulations\.0\.termination_reason"):
        tau2_results.load_results(bad)
    from tau2jax.data.sft_data import DataError, load_conversations

    with pytest.raises(DataError, match=r"missing\.json.*simulations\.0\.termination_reason"):  # as SFT data too
        load_conversations([str(bad)])

    data = json.loads(path.read_text())
    data["info"]["environment_info"] = {"domain": "mock"}  # another version's layout
    other = tmp_path / "other_version.json"
    other.write_text(json.dumps(data))
    with pytest.raises(tau2_results.Tau2ResultsError, match=r"other_version\.json.*info\.environment_info"):
        tau2_results.load_results(other)

    torn = tmp_path / "torn.json"
    torn.write_text(path.read_text()[:200])
    with pytest.raises(tau2_results.Tau2ResultsError, match=r"torn\.json"):
        tau2_results.load_results(torn)


def _mock_results_file(tmp_path, chat, n=4):
    """A tau2 Results file of the mock domain: n gold successes and one do-nothing failure."""
    style = prompts.get_style("native")
    tasks = tau2_env.load_tasks("mock")[:n]
    trajs = [run_episode(t, "mock", engine=GoldEngine(t, style, chat), user=ScriptedUser(t), chat=chat, style=style,
                         sampling=SamplingParams(temperature=0.0)) for t in tasks]  # fmt: skip
    trajs.append(run_episode(tasks[0], "mock", engine=NullEngine(tasks[0], style, chat), user=ScriptedUser(tasks[0]),
                             chat=chat, style=style, sampling=SamplingParams(temperature=0.0), sample_index=1))
    infos = {"mock": _info("mock", 2)}
    (path,) = tau2_results.write_results(tmp_path, [t.to_dict() for t in trajs], infos, {"mock": tasks})
    return path, trajs


def test_tau2_results_file_is_sft_data(tmp_path, chat):
    from tau2jax.data.sft_data import load_conversations, render_conversation

    path, trajs = _mock_results_file(tmp_path, chat)
    ok = [t for t in trajs if t.success]
    convs = load_conversations([str(path)])
    assert len(convs) == len(ok) == 4  # the failed simulation is not a demonstration
    for conv, traj in zip(convs, ok):
        # the same conversation as the policy saw it in our own episode: same tokens, same targets
        assert conv.tools == traj.tools
        ids, mask = render_conversation(chat, conv)
        want_ids, want_mask = render_conversation(chat, load_conversations_from(traj, tmp_path))
        assert ids.tolist() == want_ids.tolist() and mask.tolist() == want_mask.tolist()


def load_conversations_from(traj, tmp_path):
    from tau2jax.data.sft_data import load_conversations

    p = tmp_path / "one.jsonl"
    p.write_text(json.dumps(traj.sft_record()) + "\n")
    return load_conversations([str(p)])[0]


def test_sft_on_a_tau2_results_file_lowers_the_loss(tmp_path, chat):
    from cli_runs import train  # tests/ is on sys.path under pytest

    path, _ = _mock_results_file(tmp_path, chat)
    out = train("--config", "configs/tiny_sft.py", f"--config.workdir={tmp_path / 'sft'}",
                f"--config.data.train_files={path}", "--config.data.max_len=1024", "--config.train.steps=12",
                "--config.train.checkpoint_every=100")  # fmt: skip
    assert out["final_loss"] < 0.7 * out["first_loss"], out


def test_eval_report_from_tau2_files_alone(tmp_path, chat):
    import importlib

    from tau2jax.stages import eval as eval_lib

    path, _ = _mock_results_file(tmp_path, chat)
    out = tmp_path / "report"
    c = importlib.import_module("configs.eval").get_config()  # the real eval config: SGLang, LLM user, never used
    c.workdir, c.eval.from_tau2_results, c.eval.floor = str(out), str(path), False
    config_lib.validate(c)
    head = eval_lib.run(c)
    assert head["episodes"] == 5 and head["k"] == 2
    summary = json.loads((out / "eval" / "summary.json").read_text())
    m = summary["metrics"]["mock"]
    assert m["num_tasks"] == 4 and m["pass^k"]["1"] == pytest.approx(3.5 / 4)  # task 0: 1 of 2 trials
    assert (out / "eval" / "summary.md").exists() and (out / "eval" / "pass_at_k.png").exists()
    # a workdir that holds an eval which played episodes keeps its report
    (out / "eval" / "settings.json").write_text("{}")
    with pytest.raises(config_lib.ConfigError, match="holds an eval that played episodes"):
        eval_lib.run(c)
    assert json.loads((out / "eval" / "summary.json").read_text()) == summary


def test_demos_and_grpo_steps_write_tau2_files(tmp_path, chat):
    import types

    from tau2.data_model.simulation import Results

    from tau2jax.env.trajectory import Trajectory
    from tau2jax.stages import demos
    from tau2jax.stages.grpo import RolloutLog

    c = config_lib.default_config()
    c.stage, c.workdir, c.tau2.split, c.tau2.domains = "demos", str(tmp_path / "demos"), "train", "telecom"
    c.tau2.task_ids = tau2_env.load_tasks("telecom", "train")[0].id
    config_lib.validate(c)
    demos.run(c)
    res = Results.load(tmp_path / "demos" / "trajectories" / "telecom.json")
    assert [s.reward_info.reward for s in res.simulations] == [1.0] and res.info.agent_info.llm == "gold"

    # a GRPO step: rollouts/step_N/<domain>.json beside rollouts/step_N.jsonl, K trials per task
    path, trajs = _mock_results_file(tmp_path, chat, n=1)
    # two complete groups of one task (a refill round) and an incomplete one (re-queued: written when replayed)
    groups = [types.SimpleNamespace(trajectories=trajs, failed_attempts=[], complete=True),
              types.SimpleNamespace(trajectories=trajs[:1], failed_attempts=[], complete=False),
              types.SimpleNamespace(trajectories=trajs, failed_attempts=[], complete=True)]
    c.rl.samples_per_task = 2
    c.rl.rollout.top_p = 0.9
    RolloutLog(str(tmp_path / "grpo"), 0, True, c).write(3, [], groups)
    step = Results.load(tmp_path / "grpo" / "rollouts" / "step_3" / "mock.json")
    assert step.info.num_trials == 4 and [s.trial for s in step.simulations] == [0, 1, 2, 3]  # none overwritten
    assert [s.reward_info.reward for s in step.simulations] == [t.reward for t in trajs] * 2
    assert step.info.agent_info.llm_args["top_p"] == 0.9  # the rollout's sampling, not the eval's
    assert len([Trajectory.from_json(x) for x in open(tmp_path / "grpo" / "rollouts" / "step_3.jsonl")]) == 5
