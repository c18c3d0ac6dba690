"""RFT's data rules: which sampled episodes to keep (`select`), their token records and ledger
lines, and the per-domain statistics. The stage that samples and writes them is `stages/rft.py`.

The keep rule, per task: every episode with reward >= 1.0; if there is none, the one with the
best partial reward when that is >= `min_partial`; else nothing.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from tau2jax.eval.metrics import is_success
from tau2jax.rl.collector import ledger_record

LEDGER = "ledger.jsonl"
KEPT = "kept.jsonl"
KEPT_TRAJECTORIES = "kept_trajectories.jsonl"
KEPT_REASONS = ("success", "best_partial")
MODEL_DROP_REASONS = ("failed", "not_best", "partial_below_min")
# the reasons of a finished task's scored episodes (infra failures and incomplete groups excluded)
FINAL_REASONS = KEPT_REASONS + MODEL_DROP_REASONS



def select(trajectories: list, min_partial: float) -> list[tuple[object, str, str]]:
    """The keep rule on one task's scored episodes -> [(trajectory, status, reason)] in order."""
    if any(t.success for t in trajectories):
        return [(t, "kept", "success") if t.success else (t, "dropped", "failed") for t in trajectories]
    best = max(trajectories, key=lambda t: (t.partial_reward or 0.0, -t.sample_index))
    if (best.partial_reward or 0.0) < min_partial:
        return [(t, "dropped", "partial_below_min") for t in trajectories]
    return [(t, "kept", "best_partial") if t is best else (t, "dropped", "not_best") for t in trajectories]


def group_records(group, min_partial: float) -> tuple[list[dict], list]:
    """-> (ledger records of every episode of a collected group, kept trajectories)."""
    def rec(traj, status, reason):
        return ledger_record(traj, step=0, group_id=group.group_id, status=status, reason=reason)

    records = [rec(t, "dropped", "infra_error") for t in group.failed_attempts]
    if not group.complete:  # scored samples of a group that lost one: played again on a rerun
        return records + [rec(t, "dropped", "group_incomplete") for t in group.trajectories], []
    decisions = select(group.trajectories, min_partial)
    return records + [rec(*d) for d in decisions], [t for t, status, _ in decisions if status == "kept"]


def token_record(traj, reason: str) -> dict:
    """A kept episode as an SFT token record (`data.sft_data`): the ids and mask as sampled."""
    return {
        "token_ids": traj.token_ids, "loss_mask": traj.loss_mask, "source": "rft",
        "task": f"{traj.domain}/{traj.task_id}", "sample_index": traj.sample_index, "reward": traj.reward,
        "partial_reward": traj.partial_reward, "kept_as": reason, "policy_versions": traj.policy_versions,
    }  # fmt: skip


def read_jsonl(path: Path) -> list[dict]:
    """Records of a JSONL file we append to; a torn last line (a crash mid-write) is skipped."""
    if not path.exists():
        return []
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def finished_tasks(ledger: list[dict]) -> set[str]:
    """Tasks whose scored group is in the ledger (a finished task is never played again)."""
    return {r["task"] for r in ledger if r["reason"] in FINAL_REASONS}


def build_stats(records: list[dict], tasks: list[tuple[str, str]], floor: dict[tuple, bool] | None) -> dict:
    """From the ledger records of `tasks` ((domain, task_id)), every attempt included.
    Per domain and overall: tasks, episodes (= kept + dropped), scored samples, success rate,
    kept by reason, dropped by reason, tasks with none kept, kept episodes on tasks the do-nothing
    agent passes; `per_task` rows carry `null_agent_passes` (None without a floor)."""
    per_task = {f"{d}/{t}": {"domain": d, "task_id": t, "samples": 0, "successes": 0, "kept": 0,
                             "kept_as": [], "finished": False,
                             "null_agent_passes": None if floor is None else floor.get((d, t))}
                for d, t in tasks}  # fmt: skip
    for r in records:
        row = per_task[r["task"]]
        if r["reason"] in FINAL_REASONS:
            row["finished"] = True
            row["samples"] += 1
            row["successes"] += is_success(r["reward"])
        if r["status"] == "kept":
            row["kept"] += 1
            row["kept_as"].append(r["reason"])

    def group(domain: str | None) -> dict:
        recs = [r for r in records if domain is None or r["task"].split("/", 1)[0] == domain]
        rows = [row for row in per_task.values() if domain is None or row["domain"] == domain]
        kept = Counter(r["reason"] for r in recs if r["status"] == "kept")
        dropped = Counter(r["reason"] for r in recs if r["status"] == "dropped")
        samples = sum(row["samples"] for row in rows)
        successes = sum(row["successes"] for row in rows)
        return {
            "tasks": len(rows), "tasks_finished": sum(row["finished"] for row in rows),
            "episodes": len(recs), "samples": samples, "successes": successes,
            "success_rate": round(successes / samples, 4) if samples else None,
            "kept": sum(kept.values()), "kept_success": kept["success"], "kept_partial": kept["best_partial"],
            "dropped": dict(sorted(dropped.items())), "infra_failures": dropped["infra_error"],
            "tasks_none_kept": sum(row["finished"] and not row["kept"] for row in rows),
            "null_agent_passing_tasks": None if floor is None else sum(bool(row["null_agent_passes"]) for row in rows),
            "kept_on_null_agent_passing_tasks": None if floor is None else sum(
                row["kept"] for row in rows if row["null_agent_passes"]),
        }  # fmt: skip

    domains = list(dict.fromkeys(d for d, _ in tasks))
    return {"overall": group(None)} | {d: group(d) for d in domains} | {"per_task": per_task}


def render_markdown(stats: dict, domains: list[str], workdir: str) -> str:
    cols = ["overall", *domains]
    rows = [
        ("tasks (finished)", lambda g: f"{g['tasks']} ({g['tasks_finished']})"),
        ("episodes played (incl. retried)", lambda g: str(g["episodes"])),
        ("scored samples", lambda g: str(g["samples"])),
        ("success rate", lambda g: "–" if g["success_rate"] is None else f"{100 * g['success_rate']:.1f}%"),
        ("kept: success", lambda g: str(g["kept_success"])),
        ("kept: best partial", lambda g: str(g["kept_partial"])),
        ("tasks with none kept", lambda g: str(g["tasks_none_kept"])),
        ("do-nothing agent passes (tasks)", lambda g: str(g["null_agent_passing_tasks"])),
        ("kept on those tasks", lambda g: str(g["kept_on_null_agent_passing_tasks"])),
        ("infrastructure failures", lambda g: str(g["infra_failures"])),
    ]
    lines = [f"# RFT: {workdir}", "", "| | " + " | ".join(c.capitalize() for c in cols) + " |",
             "|---" * (len(cols) + 1) + "|"]  # fmt: skip
    lines += [f"| {name} | " + " | ".join(fn(stats[c]) for c in cols) + " |" for name, fn in rows]
    lines += ["", "Kept: every episode with reward ≥ 1; on a task with none, its best one if its partial "
              "reward reaches rft.min_partial. Episodes on tasks the do-nothing agent passes teach little.", ""]
    return "\n".join(lines)
