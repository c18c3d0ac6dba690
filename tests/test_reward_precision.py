"""The precision rule (env/rewards.py) on real tau2 tasks, scored by tau2's own evaluator: adding
calls the task does not expect (a repeated read, a read of another real id, a read of a missing
id, a `calculate`) to the gold trajectory or to a failing one never raises the partial or shaped
reward; the published presets stay precision-blind."""

import pytest

from tau2jax.env import tau2_env  # noqa: F401  (first: quiets tau2's import-time logging)

from tau2.data_model.message import AssistantMessage, ToolCall, UserMessage
from tau2.data_model.simulation import ActionCheck, RewardInfo
from tau2.data_model.tasks import Action
from tau2.environment.toolkit import ToolType

from tau2jax.config import default_config
from tau2jax.env import rewards
from tau2jax.env.gold import gold_final_message
from tau2jax.env.rewards import PRESETS, CallAudit, RewardConfig, partial_reward, shaped_reward

DEFAULT = RewardConfig.from_config(default_config().reward)
TASKS_PER_DOMAIN = 2


def _play(task, domain, actions, final_text):
    """tau2 messages of an episode taking `actions` (tau2 Actions, in order) then saying
    `final_text`; -> (RewardInfo, CallAudit) from tau2's evaluator and `rewards.audit_calls`."""
    env = tau2_env.make_environment(domain)
    init = task.initial_state
    history = tau2_env.initial_messages(task)
    has_history = init is not None and bool(init.message_history)
    env.set_state(initialization_data=init.initialization_data if init is not None else None,
                  initialization_actions=init.initialization_actions if init is not None else None,
                  message_history=history if has_history else [])
    msgs = list(history)
    for i, a in enumerate(actions):
        call = ToolCall(id=f"call_{i}", name=a.name, arguments=dict(a.arguments), requestor=a.requestor)
        mine = a.requestor == "assistant"
        msgs.append((AssistantMessage if mine else UserMessage)(role="assistant" if mine else "user", tool_calls=[call]))
        msgs.append(env.get_response(call))
    msgs.append(AssistantMessage(role="assistant", content=final_text))
    msgs.append(UserMessage(role="user", content="###STOP###"))
    info = rewards.evaluate(task, domain, msgs, "user_stop")
    return info, rewards.audit_calls(task, msgs[len(history):], env.tools)


def _act(name, **arguments):
    return Action(action_id=f"extra_{name}", name=name, arguments=arguments, requestor="assistant")


def _kind(env, a):
    return env.tools.tool_type(a.name) if a.requestor == "assistant" and env.tools.has_tool(a.name) else None


def _extras(task, domain, pool, env):
    """{label: [extra Actions]}: calls this task does not expect."""
    expected = [a for a in task.evaluation_criteria.actions or [] if a.requestor == "assistant"]
    reads = [a for a in expected if _kind(env, a) == ToolType.READ]
    out = {}
    if reads:
        out["repeat_read"] = [reads[0]]
        out["missing_id"] = [_act(reads[0].name, **{k: "no_such_id_0" for k in reads[0].arguments})]
    elif expected:  # telecom expects no agent reads: repeat what it does expect (a write: wrong)
        out["repeat_call"] = [expected[0]]
    if domain == "telecom":  # a real customer of the DB; and one that is not there
        pool = [_act("get_customer_by_id", customer_id=env.tools.db.customers[0].customer_id)]
        out["missing_id"] = [_act("get_customer_by_id", customer_id="no_such_id_0")]
    other = next((a for a in pool if not any(rewards.takes_action(e, ToolCall(
        id="x", name=a.name, arguments=a.arguments)) for e in expected)), None)
    if other is not None:
        out["other_real_id"] = [other]
    if env.tools.has_tool("calculate"):
        out["calculate"] = [_act("calculate", expression="2 + 2")]
    return out


def _domain_sample(domain):
    """The first train tasks with an expected agent action (a read where there are any), and a
    pool of other tasks' reads (real ids)."""
    env = tau2_env.make_environment(domain)
    tasks = [t for t in tau2_env.load_tasks(domain, "train")
             if any(a.requestor == "assistant" for a in t.evaluation_criteria.actions or [])]
    with_reads = [t for t in tasks if any(_kind(env, a) == ToolType.READ for a in t.evaluation_criteria.actions)]
    sample = (with_reads or tasks)[:TASKS_PER_DOMAIN]
    pool = [a for t in with_reads[TASKS_PER_DOMAIN:] for a in t.evaluation_criteria.actions
            if _kind(env, a) == ToolType.READ]
    return env, sample, pool


def _scores(info, audit, domain):
    p = partial_reward(info, DEFAULT, domain, audit)
    return p, shaped_reward(info.reward, p, DEFAULT, domain)


@pytest.mark.parametrize("domain", ["airline", "retail", "telecom"])
def test_calls_the_task_does_not_expect_never_raise_partial_credit(domain):
    env, sample, pool = _domain_sample(domain)
    assert sample
    for task in sample:
        actions = list(task.evaluation_criteria.actions)
        bases = {
            "gold": (actions, gold_final_message(task)),
            # a failing episode: the lookups only, no write, no user action, nothing communicated
            "reads_only": ([a for a in actions if _kind(env, a) in (ToolType.READ, ToolType.GENERIC)],
                           "Sorry, I could not help."),
        }
        extras = _extras(task, domain, pool, env)
        for base_name, (base_actions, text) in bases.items():
            info, audit = _play(task, domain, base_actions, text)
            p0, s0 = _scores(info, audit, domain)
            if base_name == "gold":
                assert info.reward == 1.0 and p0 == pytest.approx(1.0), (task.id, audit)
            for label, extra in extras.items():
                if label == "repeat_call" and base_name != "gold":
                    continue  # not a repeat there: the expected write itself (it earns credit)
                # before the closing message; after the gold's writes, a read sees the new state
                info2, audit2 = _play(task, domain, base_actions + extra, text)
                p, s = _scores(info2, audit2, domain)
                where = (domain, task.id, base_name, label, audit, audit2)
                assert info2.reward <= info.reward, where  # equal but for a repeated write
                assert p <= p0 + 1e-9 and s <= s0 + 1e-9, where
                if label == "calculate":
                    assert p == pytest.approx(p0), where  # a generic tool is not a wrong call
                elif audit.hits:
                    assert p < p0, where  # an unexpected read costs precision when there is credit
                for name in ("cookbook", "recipe_code"):  # the published credit is precision-blind
                    cfg = PRESETS[name]
                    if label in ("repeat_read", "calculate", "other_real_id"):  # succeed, take nothing
                        assert partial_reward(info2, cfg, domain, audit2) == pytest.approx(
                            partial_reward(info, cfg, domain, audit)), (where, name)


def test_a_failed_call_without_arguments_earns_none_of_tau2s_matches():
    """tau2's check matches a failing call with no arguments against every expected call of that
    name (compare_args None compares only the call's own keys); the rule's recall counts hits only."""
    info = RewardInfo(reward=0.0, action_checks=[
        ActionCheck(action=Action(action_id=f"a{i}", name="get_order_details", arguments={"order_id": f"#W{i}"}),
                    action_match=True, action_reward=1.0) for i in range(3)])
    assert partial_reward(info, PRESETS["cookbook"]) == 1.0
    assert partial_reward(info, DEFAULT, calls=CallAudit(calls=1, hits=0, wrong=1)) == pytest.approx(-0.05)
    one_hit = partial_reward(info, DEFAULT, calls=CallAudit(calls=2, hits=1, wrong=1))
    assert one_hit == pytest.approx(1 / 3 * 1 / 2 - 0.05)


def test_max_matching_never_loses_a_hit_to_call_order():
    """Expected A(x) and B(x) ... the matching is one-to-one and maximal whatever the call order."""
    a = Action(action_id="a", name="f", arguments={"x": 1, "y": 1}, compare_args=["x"])
    b = Action(action_id="b", name="f", arguments={"x": 1, "y": 2})
    wide = ToolCall(id="1", name="f", arguments={"x": 1, "y": 2})  # matches a and b
    narrow = ToolCall(id="2", name="f", arguments={"x": 1, "y": 1})  # matches a only
    assert len(rewards._max_matching([wide, narrow], [a, b])) == 2
    assert len(rewards._max_matching([narrow, wide], [a, b])) == 2
    assert len(rewards._max_matching([wide, wide], [a, b])) == 2
    assert len(rewards._max_matching([narrow, narrow], [a, b])) == 1
    bare = ToolCall(id="3", name="f", arguments={})  # tau2's check matches it against both
    assert b.compare_with_tool_call(bare) and not rewards.takes_action(b, bare, failed=True)
    assert len(rewards._max_matching([bare, bare], [a, b], frozenset({"3"}))) == 0
    # the same call succeeding ran with its defaults: one expected action, one-to-one
    assert rewards.takes_action(b, bare) and len(rewards._max_matching([bare], [a, b])) == 1
