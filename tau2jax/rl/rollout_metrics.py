"""What a step's episodes say about the policy: reward, success per domain, turns, errors, and the
reward-hacking guards (tool calls and wrong calls per episode, repeated identical tool calls,
refusals, successes a do-nothing agent gets, how much of the learning signal is partial credit).
"""

from __future__ import annotations

import json
from collections import defaultdict

import numpy as np

from tau2jax.env.trajectory import Trajectory


def _calls(traj: Trajectory) -> list[str]:
    """The policy's tool calls in order, each as a canonical (name, arguments) string."""
    out = []
    for m in traj.messages:
        if m.get("role") == "assistant" and m.get("weight", 1) != 0:
            for c in m.get("tool_calls") or []:
                f = c.get("function", {})
                out.append(json.dumps([f.get("name"), f.get("arguments")], sort_keys=True, default=str))
    return out


def repeated_tool_calls(traj: Trajectory) -> int:
    """Tool calls identical to the policy's previous call (a looping agent)."""
    calls = _calls(traj)
    return sum(a == b for a, b in zip(calls, calls[1:]))


def refused(traj: Trajectory) -> bool:
    """The policy never called a tool: on tau2 tasks that change state, that is a refusal."""
    return not _calls(traj)


def partial_credit_signal(trajs: list[Trajectory]) -> dict:
    """Groups (a step's episodes of one task) where every episode failed: their shaped rewards
    differ only by partial credit. -> the share of groups that failed whole, and the share of the
    step's within-group shaped-reward variance (what the advantages are made of) they hold."""
    groups = defaultdict(list)
    for t in trajs:
        groups[(t.domain, t.task_id)].append(t)
    variance, failing_variance, failing = 0.0, 0.0, 0
    for g in groups.values():
        v = float(np.var([t.shaped_reward if t.shaped_reward is not None else (t.reward or 0.0) for t in g]))
        variance += v
        if not any(t.success for t in g):
            failing += 1
            failing_variance += v
    return {"groups_all_failed_share": failing / len(groups),
            "partial_credit_signal_share": failing_variance / variance if variance > 0 else 0.0}


def episode_metrics(trajs: list[Trajectory], null_solvable: set[str] | None = None) -> dict:
    """Means over the step's scored episodes. `null_solvable`: "domain/task_id" keys a do-nothing
    agent passes (the share of successes on them says whether learning is refusal)."""
    if not trajs:
        return {"episodes": 0}
    r = np.array([t.reward or 0.0 for t in trajs])
    shaped = np.array([t.shaped_reward if t.shaped_reward is not None else (t.reward or 0.0) for t in trajs])
    out = {
        "episodes": len(trajs), "reward_mean": float(r.mean()), "reward_std": float(r.std()),
        "shaped_reward_mean": float(shaped.mean()), "shaped_reward_std": float(shaped.std()),
        "success_rate": float(np.mean([t.success for t in trajs])),
        "turns_per_episode": float(np.mean([len(t.turns) for t in trajs])),
        "format_errors_per_episode": float(np.mean([t.num_format_errors for t in trajs])),
        "tool_errors_per_episode": float(np.mean([t.num_tool_errors for t in trajs])),
        "repeated_tool_calls_per_episode": float(np.mean([repeated_tool_calls(t) for t in trajs])),
        "context_exhausted_rate": float(np.mean([t.context_exhausted for t in trajs])),
        "sampled_tokens_per_episode": float(np.mean([sum(x["end"] - x["start"] for x in t.turns) for t in trajs])),
    }  # fmt: skip
    chats = [t for t in trajs if t.messages]  # environments with a conversation (not the toy)
    if chats:
        out["refusal_rate"] = float(np.mean([refused(t) for t in chats]))
        out["tool_calls_per_episode"] = float(np.mean([len(_calls(t)) for t in chats]))
    audited = [t.call_audit for t in trajs if t.call_audit]
    if audited:
        out["wrong_tool_calls_per_episode"] = float(np.mean([a["wrong"] for a in audited]))
        out["extra_reads_per_episode"] = float(np.mean([a.get("extra_reads", 0) for a in audited]))
    out |= partial_credit_signal(trajs)
    by_domain = defaultdict(list)
    for t in trajs:
        by_domain[t.domain].append(t.success)
    out |= {f"success_rate/{d}": float(np.mean(v)) for d, v in by_domain.items()}
    if null_solvable is not None:
        wins = [t for t in trajs if t.success]
        out["null_solvable_share_of_successes"] = (
            float(np.mean([f"{t.domain}/{t.task_id}" in null_solvable for t in wins])) if wins else 0.0)
    return out
