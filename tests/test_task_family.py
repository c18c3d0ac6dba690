"""The generated task family (tau2jax/env/task_family.py): a disjoint split of slot combinations,
tasks tau2 loads from the generated data dir, gold replays scoring 1 and a do-nothing agent 0."""

import json

import pytest

from tau2jax.env import tau2_env  # noqa: F401  (first: quiets tau2's import-time logging)

from tau2jax.config import ConfigError
from tau2jax.data.chat import ChatFormat
from tau2jax.data.tokenizer import load_tokenizer
from tau2jax.env import prompts, task_family
from tau2jax.env.episode import run_episode
from tau2jax.env.gold import GoldEngine, NullEngine
from tau2jax.env.scripted_user import ScriptedUser
from tau2jax.inference.engine import SamplingParams


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """tau2 pointed at a generated family for this module, then back at the data it used."""
    before = tau2_env.init_tau2()
    root = task_family.write_data_dir(tmp_path_factory.mktemp("family"))
    tau2_env.init_tau2(str(root))
    yield root
    tau2_env.init_tau2(str(before))


def test_the_wheels_mock_keeps_every_task_under_every_split_name():
    """Outside a generated dir (first: the module's fixture re-points tau2 until the module ends),
    mock's split file names only `base`: all 9 tasks under any split name."""
    assert tau2_env.task_splits("mock") is None
    assert len(tau2_env.load_tasks("mock", "train")) == len(tau2_env.load_tasks("mock", "test")) == 9


def test_split_holds_out_combinations_of_trained_slot_values():
    s = task_family.split()
    assert s["test"] and not set(s["train"]) & set(s["test"])
    assert sorted(s["base"]) == sorted(s["train"] + s["test"])
    slots = lambda ids: {tuple(i.split("_")[1::2]) for i in ids}  # noqa: E731  (title, user)
    train, test = slots(s["train"]), slots(s["test"])
    assert {k for k, _ in test} <= {k for k, _ in train} and {v for _, v in test} <= {v for _, v in train}


def test_the_same_files_every_time(tmp_path):
    a, b = (task_family.write_data_dir(tmp_path / n) / "tau2" / "domains" / "mock" for n in ("a", "b"))
    for name in ("tasks.json", "db.json", "split_tasks.json", "policy.md"):
        assert (a / name).read_bytes() == (b / name).read_bytes()


def test_tasks_load_through_tau2_by_split(family):
    split = json.loads((family / "tau2" / "domains" / "mock" / "split_tasks.json").read_text())
    for name in ("train", "test"):
        assert [t.id for t in tau2_env.load_tasks("mock", name)] == split[name]
    task = tau2_env.load_tasks("mock", "test")[0]
    said = task.user_scenario.instructions
    assert 0 <= said.index('"ava"') < said.index('"apple"')  # the slots in the call's argument order


def test_gold_replays_score_one_and_doing_nothing_scores_zero(family):
    chat = ChatFormat(load_tokenizer())
    style = prompts.get_style("native")
    for task in tau2_env.load_tasks("mock", "base"):
        for engine, want in ((GoldEngine(task, style, chat), 1.0), (NullEngine(task, style, chat), 0.0)):
            traj = run_episode(task, "mock", engine=engine, user=ScriptedUser(task), chat=chat, style="native",
                               sampling=SamplingParams(temperature=0.0, max_new_tokens=4096))
            assert traj.infra_error is None and traj.reward == want, (task.id, engine.kind, traj.reward_info)


def test_the_agent_prompt_shows_only_the_familys_tool(family):
    # agent_tools.json: mock's other schemas would be most of a small model's prompt
    assert [t["function"]["name"] for t in tau2_env.domain_spec("mock").tools] == ["create_task"]
    assert len(tau2_env.make_environment("mock").get_tools()) > 1  # the environment keeps them all
    tok = load_tokenizer()
    shown = json.dumps(tau2_env.domain_spec("mock").tools)
    assert len(tok.encode(shown)) < 125  # mock's all: 440
    assert '"title": "' not in shown  # pydantic's "title" keys, a copy target beside the user's title word
    real = [t.openai_schema for t in tau2_env.make_environment("mock").get_tools() if t.name == "create_task"][0]
    assert '"title": "User Id"' in json.dumps(real)  # what tau2 itself writes


_FEWER = json.dumps([{"type": "function", "function": {"name": "create_task", "parameters": {
    "properties": {"user_id": {"type": "string"}}, "required": ["user_id"]}}}])


@pytest.mark.parametrize("text, says", [('["create_task", "fly"]', r"must list some of the mock agent tools .*unknown: 'fly'"),
                                         ("create_task", r"must list some of the mock agent tools .*not JSON"),
                                         ("[]", r"must list some of the mock agent tools"),
                                         ('[{"name": "create_task"}]', r"must list .*unknown: \{'name'"),
                                         (_FEWER, r"the schema of 'create_task' has properties \['user_id'\]; "
                                                  r"the tool has \['description', 'title', 'user_id'\]")])
def test_a_bad_agent_tools_file_is_a_config_error_naming_it(tmp_path, text, says):
    root = task_family.write_data_dir(tmp_path / "bad")  # conftest points tau2 back after the test
    (root / "tau2" / "domains" / "mock" / tau2_env.AGENT_TOOLS_FILE).write_text(text)
    tau2_env.init_tau2(str(root))
    with pytest.raises(ConfigError, match="agent_tools.json: " + says):
        tau2_env.domain_spec("mock")
