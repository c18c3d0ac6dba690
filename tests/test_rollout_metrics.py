"""The reward-hacking guards GRPO logs every step: tool calls (and wrong ones) per episode, repeated
identical tool calls, refusals, the share of successes a do-nothing agent would also get, and how
much of the step's signal is partial credit in groups that failed whole."""

import pytest

from tau2jax.env import tau2_env  # noqa: F401  (first: quiets tau2's import-time logging)

from tau2jax.config import default_config
from tau2jax.data.chat import ChatFormat
from tau2jax.data.tokenizer import load_tokenizer
from tau2jax.env.trajectory import Trajectory
from tau2jax.rl import rollout_metrics
from tau2jax.stages.builders import tau2_environment
from tau2jax.stages.grpo import null_solvable_tasks


def _call(name, args):
    return {"role": "assistant", "content": None,
            "tool_calls": [{"id": "c", "type": "function", "function": {"name": name, "arguments": args}}]}


def _traj(task, messages, reward):
    return Trajectory(task, "mock", "native", messages=messages, reward=reward, shaped_reward=reward,
                      turns=[{"start": 0, "end": 1}])


def test_guards_count_repeats_refusals_and_null_solvable_wins():
    looping = _traj("a", [_call("get", {"id": 1}), _call("get", {"id": 1}), _call("get", {"id": 2}),
                          _call("get", {"id": 2})], 0.0)
    refusing = _traj("b", [{"role": "assistant", "content": "Sorry, I can't."}], 1.0)
    # the greeting tau2 plays is not the policy's: its (weight 0) calls never count
    acting = _traj("c", [{**_call("get", {"id": 1}), "weight": 0}, _call("put", {"id": 1})], 1.0)
    assert rollout_metrics.repeated_tool_calls(looping) == 2
    assert rollout_metrics.repeated_tool_calls(acting) == 0
    assert rollout_metrics.refused(refusing) and not rollout_metrics.refused(acting)
    m = rollout_metrics.episode_metrics([looping, refusing, acting], null_solvable={"mock/b"})
    assert m["refusal_rate"] == 1 / 3 and m["repeated_tool_calls_per_episode"] == 2 / 3
    assert m["null_solvable_share_of_successes"] == 0.5 and m["success_rate/mock"] == 2 / 3
    assert m["tool_calls_per_episode"] == 5 / 3


def test_partial_credit_signal_and_wrong_calls():
    def ep(task, reward, shaped, wrong):
        t = _traj(task, [_call("put", {"id": 1})] * (wrong + 1), reward)
        t.shaped_reward, t.call_audit = shaped, {"calls": wrong + 1, "hits": 1, "wrong": wrong}
        return t

    # task a failed whole: its spread (0.1 vs 0.3) is all partial credit; task b mixes a win and a loss
    trajs = [ep("a", 0.0, 0.1, 3), ep("a", 0.0, 0.3, 0), ep("b", 1.0, 1.3, 0), ep("b", 0.0, 0.3, 1)]
    m = rollout_metrics.episode_metrics(trajs)
    assert m["groups_all_failed_share"] == 0.5
    assert m["partial_credit_signal_share"] == pytest.approx(0.01 / (0.01 + 0.25))
    assert m["wrong_tool_calls_per_episode"] == 1.0 and m["tool_calls_per_episode"] == 2.0


def test_null_solvable_tasks_on_mock(tmp_path):
    c = default_config()
    c.tau2.domains, c.tau2.split, c.rl.env = "mock", "train", "tau2"
    c.eval.floor_cache_dir = str(tmp_path)
    env = tau2_environment(c, ChatFormat(load_tokenizer()), split="train")
    assert null_solvable_tasks(c, env) == {"mock/create_task_1_nl_eval"}
    c.eval.floor = False
    assert null_solvable_tasks(c, env) is None
