"""Partial and shaped rewards from hand-built tau2 RewardInfo objects, and tau2's own verdicts."""

import pytest

from tau2jax.env import tau2_env  # noqa: F401  (first: quiets tau2's import-time logging)

from tau2.data_model.message import AssistantMessage, UserMessage
from tau2.data_model.simulation import ActionCheck, CommunicateCheck, DBCheck, EnvAssertionCheck, RewardInfo
from tau2.data_model.tasks import Action, EnvAssertion

from tau2jax.config import default_config
from tau2jax.data.chat import ChatFormat
from tau2jax.data.tokenizer import load_tokenizer
from tau2jax.env import prompts, rewards
from tau2jax.env.episode import run_episode
from tau2jax.env.rewards import PRESETS, CallAudit, RewardConfig, partial_components, partial_reward, shaped_reward
from tau2jax.env.scripted_user import ScriptedUser
from tau2jax.inference.engine import SamplingParams, ScriptedEngine

CREATE = {"user_id": "user_1", "title": "Important Meeting"}


def _actions(*matches):
    return [
        ActionCheck(action=Action(action_id=f"a{i}", name="f", arguments={}), action_match=m, action_reward=float(m))
        for i, m in enumerate(matches)
    ]


def _env(*mets):
    return [
        EnvAssertionCheck(env_assertion=EnvAssertion(env_type="user", func_name="g", arguments={}), met=m, reward=float(m))
        for m in mets
    ]


def _comm(*mets):
    return [CommunicateCheck(info=f"i{i}", met=m, justification="") for i, m in enumerate(mets)]


def test_all_components_weighted_by_the_recipe():
    info = RewardInfo(reward=0.0, action_checks=_actions(True, False), env_assertions=_env(True, True, False, False),
                      communicate_checks=_comm(True))
    assert partial_components(info) == {"action": 0.5, "env_assertion": 0.5, "communicate": 1.0}
    assert partial_reward(info) == pytest.approx(0.7 * 0.5 + 0.2 * 0.5 + 0.1 * 1.0)


def test_weights_renormalise_over_the_components_a_task_has():
    # airline/retail: actions + communicate, no env assertions
    info = RewardInfo(reward=0.0, action_checks=_actions(True, True, True, False), communicate_checks=_comm(False),
                      db_check=DBCheck(db_match=False, db_reward=0.0))
    assert partial_reward(info) == pytest.approx((0.7 * 0.75 + 0.1 * 0.0) / 0.8)
    # telecom ENV_ASSERTION tasks: only env assertions count, DB match is never a component
    info = RewardInfo(reward=0.0, env_assertions=_env(True, False), db_check=DBCheck(db_match=True, db_reward=1.0))
    assert partial_reward(info) == pytest.approx(0.5)


def test_no_components_gives_zero():
    # what tau2 returns for an episode that hit max_steps: no checks at all
    assert partial_reward(RewardInfo(reward=0.0, reward_basis=None, info={"note": "premature"})) == 0.0
    assert partial_reward(RewardInfo(reward=1.0, action_checks=[], communicate_checks=[])) == 0.0


def test_dict_input_matches_object_input():
    info = RewardInfo(reward=1.0, action_checks=_actions(True, False, True), communicate_checks=_comm(True, False))
    assert partial_reward(info.model_dump(mode="json")) == pytest.approx(partial_reward(info))


def test_shaped_reward_and_config():
    cfg = RewardConfig.from_config(default_config().reward)
    assert cfg == RewardConfig(alpha=0.3, w_action=0.7, w_env_assertion=0.2, w_communicate=0.1,
                               action_precision=True, wrong_call_penalty=0.05)
    assert shaped_reward(1.0, 0.5, cfg) == pytest.approx(1.15)
    assert shaped_reward(0.0, 1.0, cfg) == pytest.approx(0.3)
    custom = RewardConfig(alpha=0.25, w_action=0.5, w_env_assertion=0.35, w_communicate=0.15)
    info = RewardInfo(reward=0.0, action_checks=_actions(True), env_assertions=_env(False))
    assert partial_reward(info, custom) == pytest.approx(0.5 / 0.85)
    assert shaped_reward(0.0, partial_reward(info, custom), custom) == pytest.approx(0.25 * 0.5 / 0.85)


def test_tau2_evaluator_verdicts():
    task = next(t for t in tau2_env.load_tasks("mock") if t.id == "create_task_1")
    greeting = tau2_env.initial_messages(task)
    ask = UserMessage(role="user", content="Please create the task 'Important Meeting' for user_1.")
    done = AssistantMessage(role="assistant", content="Sorry, I did nothing.")
    # premature end: tau2 does not evaluate, so reward and partial are 0
    info = rewards.evaluate(task, "mock", greeting + [ask, done], "max_steps")
    assert info.reward == 0.0 and partial_reward(info) == 0.0
    # a proper stop without the expected create_task call: DB mismatch, action check unmet
    info = rewards.evaluate(task, "mock", greeting + [ask, done, UserMessage(role="user", content="###STOP###")], "user_stop")
    assert info.reward == 0.0
    assert info.db_check.db_match is False and [c.action_match for c in info.action_checks] == [False]
    assert partial_reward(info) == 0.0


def test_env_assertion_on_state_the_agent_never_created_scores_zero_not_infra():
    """mock's create_task_1_with_env_assertions asserts on task_2; an agent that stops without
    creating it makes tau2's assertion raise. That is a model failure (reward 0)."""
    from tau2.data_model.message import AssistantMessage, UserMessage

    from tau2jax.env import rewards, tau2_env

    tau2_env.init_tau2("")
    task = next(t for t in tau2_env.load_tasks("mock", "base") if t.id == "create_task_1_with_env_assertions")
    msgs = [AssistantMessage(role="assistant", content="Hi! How can I help you today?"),
            UserMessage(role="user", content="Please create a task."),
            AssistantMessage(role="assistant", content="Sorry, I cannot.")]
    info = rewards.evaluate(task, "mock", msgs, "user_stop")
    assert info.reward == 0.0
    assert "task_2" in info.info["env_assertion_error"]


def test_reward_presets_cookbook_and_recipe_code():
    """recipe_code: renormalised 0.5/0.35/0.15 (db weight 0), alpha 0.25 × (retail 0.8, telecom 1.6),
    telecom's own weights 0.35/0.35/0.30 — worked by hand."""
    from tau2jax.env.rewards import PRESETS

    cookbook, code = PRESETS["cookbook"], PRESETS["recipe_code"]
    assert cookbook == RewardConfig()
    info = RewardInfo(reward=0.0, action_checks=_actions(True, False), env_assertions=_env(True),
                      communicate_checks=_comm(False), db_check=DBCheck(db_match=True, db_reward=1.0))
    # db is a component of weight 0: it changes nothing
    assert partial_reward(info, code, "airline") == pytest.approx(0.5 * 0.5 + 0.35 * 1.0 + 0.15 * 0.0)
    assert partial_reward(info, code, "telecom") == pytest.approx(0.35 * 0.5 + 0.30 * 1.0 + 0.35 * 0.0)
    assert shaped_reward(1.0, 0.5, code, "airline") == pytest.approx(1.0 + 0.25 * 0.5)
    assert shaped_reward(1.0, 0.5, code, "retail") == pytest.approx(1.0 + 0.2 * 0.5)
    assert shaped_reward(0.0, 0.5, code, "telecom") == pytest.approx(0.4 * 0.5)
    section = default_config().reward
    section.preset = "recipe_code"
    assert RewardConfig.from_config(section) == code
    section.preset = "nope"
    with pytest.raises(Exception, match="reward.preset"):
        RewardConfig.from_config(section)


@pytest.fixture(scope="module")
def chat():
    return ChatFormat(load_tokenizer())


def _play(chat, task_id, responses):
    task = next(t for t in tau2_env.load_tasks("mock") if t.id == task_id)
    return run_episode(task, "mock", engine=ScriptedEngine(chat.tokenizer, responses), user=ScriptedUser(task),
                       chat=chat, style="native", sampling=SamplingParams(max_new_tokens=512),
                       reward_config=RewardConfig.from_config(default_config().reward))


def _partial(traj, cfg):
    return partial_reward(traj.reward_info, cfg, traj.domain, CallAudit(**traj.call_audit))


def test_wrong_calls_lower_partial_credit_that_tau2s_action_check_ignores(chat):
    """The same winning episode plus calls that fail in the environment (tau2 leaves the DB and
    the action check as they were): strictly less partial credit by default, the same under the
    published presets."""
    call = prompts.tool_call_text
    clean = _play(chat, "create_task_1", [call("create_task", CREATE), "Created it.<|im_end|>"])
    noisy = _play(chat, "create_task_1", [
        call("get_users", {}),  # a read the task does not expect: lowers precision, no penalty
        call("delete_all_tasks", {}),  # unknown tool: fails
        call("create_task", {"user": "user_1"}),  # bad arguments: fails
        call("create_task", CREATE), "Created it.<|im_end|>"])
    assert clean.reward == noisy.reward == 1.0
    assert clean.call_audit == {"calls": 1, "hits": 1, "wrong": 0, "extra_reads": 0}
    assert noisy.call_audit == {"calls": 4, "hits": 1, "wrong": 2, "extra_reads": 1}
    assert partial_components(noisy.reward_info) == partial_components(clean.reward_info)
    assert noisy.partial_reward < clean.partial_reward and noisy.shaped_reward < clean.shaped_reward
    for name in ("cookbook", "recipe_code"):
        assert _partial(noisy, PRESETS[name]) == _partial(clean, PRESETS[name])


def test_spraying_writes_in_a_failing_episode_earns_less_than_tau2s_fraction(chat):
    """A duplicate of the expected write is wrong (one-to-one matching): tau2 still counts the
    action as taken, the precision factor and the penalty take that credit back."""
    call = prompts.tool_call_text
    spray = _play(chat, "create_task_1", [call("create_task", CREATE), call("create_task", CREATE),
                                          call("create_task", {**CREATE, "title": "Meeting"}), "Done.<|im_end|>"])
    assert spray.reward == 0.0 and spray.call_audit == {"calls": 3, "hits": 1, "wrong": 2, "extra_reads": 0}
    assert partial_components(spray.reward_info)["action"] == 1.0
    default = RewardConfig.from_config(default_config().reward)
    assert _partial(spray, default) < _partial(spray, PRESETS["cookbook"])


@pytest.mark.parametrize("hits", [0, 1, 2])
def test_each_wrong_call_strictly_lowers_the_partial_score(hits):
    cfg = RewardConfig.from_config(default_config().reward)
    info = RewardInfo(reward=0.0, action_checks=_actions(*[True] * hits, False), communicate_checks=_comm(True))
    scores = [partial_reward(info, cfg, calls=CallAudit(calls=hits + w, hits=hits, wrong=w)) for w in range(5)]
    assert all(a > b for a, b in zip(scores, scores[1:]))
    assert scores[0] == pytest.approx(partial_reward(info, cfg))  # no wrong call: tau2's fractions


def test_the_audit_counts_the_policys_calls_not_the_tasks_history(chat):
    """update_task_with_message_history starts from a conversation holding an assistant tool call."""
    task = next(t for t in tau2_env.load_tasks("mock") if t.id == "update_task_with_message_history")
    assert any(m.is_tool_call() for m in tau2_env.initial_messages(task) if m.role == "assistant")
    traj = _play(chat, task.id, [prompts.tool_call_text("update_task_status", {"task_id": "task_2", "status": "completed"}),
                                 "Marked it completed.<|im_end|>"])
    assert traj.reward == 1.0 and traj.call_audit == {"calls": 1, "hits": 1, "wrong": 0, "extra_reads": 0}
