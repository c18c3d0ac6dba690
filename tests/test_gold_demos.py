"""Gold replays through the full path (prompt style, chat format, tool-call parsing, tau2
environment, scripted user, tau2 evaluator) score 1.0; the demos stage writes them as SFT data."""

import json

import pytest

from tau2jax.env import tau2_env  # noqa: F401  (first: quiets tau2's import-time logging)

from tau2jax.config import ConfigError, default_config
from tau2jax.data.chat import ChatFormat
from tau2jax.data.sft_data import validate_conversation
from tau2jax.data.tokenizer import load_tokenizer
from tau2jax.env import prompts
from tau2jax.stages import demos
from tau2jax.env.gold import GoldEngine
from tau2jax.inference.engine import SamplingParams
from tau2jax.env.episode import run_episode
from tau2jax.env.scripted_user import ScriptedUser

STYLES = ("native", "recipe")
# This mock task asserts a state change (task_2 completed) that none of its expected actions makes,
# so no replay of expected actions can pass it.
MOCK_WITHOUT_GOLD = "update_task_with_history_and_env_assertions"


@pytest.fixture(scope="module")
def chat():
    return ChatFormat(load_tokenizer())


def gold(task, domain, style, chat):
    return run_episode(task, domain, engine=GoldEngine(task, prompts.get_style(style), chat), user=ScriptedUser(task),
                       chat=chat, style=style, sampling=SamplingParams(temperature=0.0, max_new_tokens=4096))


def check_gold(traj, task, chat):
    assert traj.infra_error is None and traj.num_format_errors == 0  # (some gold calls do fail, by design)
    assert traj.reward == 1.0, traj.reward_info
    # the stream is the chat template's rendering of the recorded messages, token for token;
    # trained tokens are a subset of what SFT trains (minus forced <|im_end|>s and the greeting)
    ids, mask = chat.render(traj.messages, traj.tools)
    assert ids == traj.token_ids
    assert all(a <= b for a, b in zip(traj.loss_mask, mask))
    # a real conversation around the actions
    roles = [m["role"] for m in traj.messages]
    assert roles[0] == "system" and roles.count("user") >= 1 and roles[-1] == "assistant"
    final = traj.tau2_messages[-2] if traj.termination_reason == "user_stop" else traj.tau2_messages[-1]
    assert final["role"] == "assistant"
    for info in task.evaluation_criteria.communicate_info or []:
        assert info.lower() in final["content"].lower().replace(",", "")
    # the SFT record is valid for the SFT reader and renders to the same ids
    rec = validate_conversation(json.loads(json.dumps(traj.sft_record())), "gold")
    assert chat.render(rec.messages, rec.tools)[0] == ids


@pytest.mark.parametrize("style", STYLES)
def test_gold_mock(style, chat):
    for task in tau2_env.load_tasks("mock"):
        traj = gold(task, "mock", style, chat)
        if task.id == MOCK_WITHOUT_GOLD:
            assert traj.reward == 0.0 and [c["met"] for c in traj.reward_info["env_assertions"]] == [False]
        else:
            check_gold(traj, task, chat)


def _sample(domain):
    """A few train tasks with different shapes: communicate_info, no actions, ACTION basis, user actions."""
    tasks = tau2_env.load_tasks(domain, "train")
    picks = [
        next((t for t in tasks if t.evaluation_criteria.communicate_info), None),
        next((t for t in tasks if not t.evaluation_criteria.actions), None),
        next((t for t in tasks if "ACTION" in t.evaluation_criteria.reward_basis), None),
        next((t for t in tasks if any(a.requestor == "user" for a in t.evaluation_criteria.actions or [])), None),
    ]
    return list({t.id: t for t in picks if t is not None}.values())


@pytest.mark.parametrize("domain", ["airline", "retail", "telecom"])
def test_gold_sample_of_train_tasks(domain, chat):
    tasks = _sample(domain)
    assert len(tasks) >= 2
    for i, task in enumerate(tasks):
        style = STYLES[i % 2]
        check_gold(gold(task, domain, style, chat), task, chat)


def demos_config(tmp_path, **tau2):
    c = default_config()
    c.stage = "demos"
    c.workdir = str(tmp_path)
    c.tau2.split = "train"
    for k, v in tau2.items():
        setattr(c.tau2, k, v)
    return c


def test_demos_stage(tmp_path):
    telecom_id = tau2_env.load_tasks("telecom", "train")[0].id
    out = demos.run(demos_config(tmp_path, domains="airline,telecom", task_ids=f"1,{telecom_id}", prompt_style="recipe"))
    assert out == {
        "airline": {"replayed": 1, "reward_1": 1, "file": str(tmp_path / "airline.jsonl")},
        "telecom": {"replayed": 1, "reward_1": 1, "file": str(tmp_path / "telecom.jsonl")},
    }
    (rec,) = [json.loads(line) for line in open(tmp_path / "telecom.jsonl")]
    assert rec["tools"] == [] and rec["messages"][0]["content"].startswith("## Output Format")
    assert all(m["content"].startswith("<tool_call>") for m in rec["messages"] if m["role"] == "assistant")


def test_demos_stage_refuses_test_tasks(tmp_path):
    test_id = tau2_env.task_splits("airline")["test"][0]
    with pytest.raises(ConfigError, match="test-split"):
        demos.run(demos_config(tmp_path, domains="airline", task_ids=test_id))
    with pytest.raises(ConfigError, match="train split only"):
        demos.run(demos_config(tmp_path, domains="airline", split="test"))
    with pytest.raises(ConfigError, match="not train tasks"):
        demos.run(demos_config(tmp_path, domains="airline", task_ids="no_such_task"))


@pytest.mark.slow
@pytest.mark.parametrize("style", STYLES)
def test_full_gold_replay(style, tmp_path):
    out = demos.run(demos_config(tmp_path, domains="airline,retail,telecom", prompt_style=style))
    counts = {d: (v["replayed"], v["reward_1"]) for d, v in out.items()}
    assert counts == {"airline": (30, 30), "retail": (74, 74), "telecom": (74, 74)}
