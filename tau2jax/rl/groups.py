"""A GRPO step's groups: which tasks it plays (re-queued first, then an epoch-shuffled order), the
jobs planned for a learner step, the whole groups gathered (refilled under dynamic sampling), and
their assembly into batch items and ledger records (staleness, zero-variance groups, advantages).
Used by `stages/grpo.py`; every drop is counted and has a ledger reason.
"""

from __future__ import annotations

import json
import os

import numpy as np

from tau2jax.env.environments import TaskRef
from tau2jax.rl import advantages as adv_lib
from tau2jax.rl import collector, rollout_metrics, staleness
from tau2jax.rl.rollout_workers import Job


# ----------------------------------------------------------------------------- task order

def next_tasks(tasks: list[TaskRef], meta: dict, n: int, seed: int) -> list[TaskRef]:
    """Re-queued tasks first, then the next ones of an order reshuffled every epoch."""
    by_key = {t.key: t for t in tasks}
    out = [by_key[k] for k in meta["requeue"][:n]]
    meta["requeue"] = meta["requeue"][len(out):]
    while len(out) < n:
        epoch, pos = divmod(meta["cursor"], len(tasks))
        order = np.random.default_rng([seed, epoch]).permutation(len(tasks))
        out.append(tasks[order[pos]])
        meta["cursor"] += 1
    return out


def plan_jobs(tasks: list[TaskRef], meta: dict, *, target: int, round_: int, n: int, seed: int) -> list[Job]:
    """`n` groups for learner step `target` (0-based); group ids name the step (1-based) and the
    refill round, so a replay after a resume samples with the same seeds."""
    refs = next_tasks(tasks, meta, n, seed)
    return [Job(target, f"s{target + 1}r{round_}g{j}:{ref.key}", ref) for j, ref in enumerate(refs)]


def checkpoint_meta(meta: dict, in_flight: list[str]) -> dict:
    """The loop state to save: groups submitted but not trained yet go back to the front of the
    re-queue (a resumed run replays them; the ledger has no line of them yet)."""
    return meta | {"requeue": list(in_flight) + list(meta["requeue"])}


# ----------------------------------------------------------------------------- one step's data

def advantage_reward(t, rl) -> float:
    """The reward group advantages are computed from: shaped, minus the repeat penalty."""
    r = t.shaped_reward if t.shaped_reward is not None else (t.reward or 0.0)
    return r - rl.repeat_penalty * rollout_metrics.repeated_tool_calls(t) if rl.repeat_penalty else r


def assemble(groups, rl, tracker, *, step: int, learner_version: int):
    """Complete groups -> (batch items, ledger records, counters, staleness per scored trajectory).
    Incomplete groups are re-queued; samples over the staleness bound are dropped (`rl.stale_policy`
    "drop") and leave their group's statistics; with dynamic sampling, zero-variance groups are
    dropped. Every drop is counted and has a ledger reason. `samples_stale` counts the samples over
    the bound under either policy (dropped under "drop", trained under "correct")."""
    ledger, items = [], []
    counts = {"groups_requeued": 0, "groups_zero_variance": 0, "groups_trained": 0, "samples_stale": 0,
              "samples_unknown_version": 0}
    rewards = {id(t): advantage_reward(t, rl) for g in groups for t in g.trajectories}
    kept, ages = [], []
    for gi, g in enumerate(groups):
        for t in g.failed_attempts:
            ledger.append(collector.ledger_record(t, step=step, group_id=g.group_id, status="dropped",
                                                  reason="infra_error_retried"))
        if not g.complete:
            counts["groups_requeued"] += 1
            for t in g.trajectories:
                ledger.append(collector.ledger_record(t, step=step, group_id=g.group_id, status="requeued",
                                                      reason="group_incomplete"))
            continue
        if tracker is not None:
            for t in g.trajectories:
                tracker.record(g.ref.key, t.success)
        age, fresh = staleness.check(g.trajectories, learner_version, rl.max_staleness, rl.stale_policy)
        ages += age
        for t, a, ok in zip(g.trajectories, age, fresh):
            if ok and a > rl.max_staleness:  # "correct": over the bound but kept (token TIS)
                counts["samples_stale"] += 1
            if not ok:
                reason = "unknown_version" if staleness.unknown(t) else "stale"
                counts[f"samples_{reason}"] += 1
                ledger.append(collector.ledger_record(t, step=step, group_id=g.group_id, status="dropped",
                                                      reason=reason, staleness=a))
        rs = [rewards[id(t)] for t, ok in zip(g.trajectories, fresh) if ok]
        if rl.dynamic_sampling and rs and max(rs) == min(rs):
            counts["groups_zero_variance"] += 1
            for t, ok in zip(g.trajectories, fresh):
                if ok:
                    ledger.append(collector.ledger_record(t, step=step, group_id=g.group_id, status="dropped",
                                                          reason="zero_variance"))
            continue
        if rs:
            kept.append((gi, g, [(t, rewards[id(t)], a) for t, a, ok in zip(g.trajectories, age, fresh) if ok]))
    if not kept:
        return items, ledger, counts, ages
    flat_r = [r for _, _, ts in kept for _, r, _ in ts]
    flat_g = [gi for gi, _, ts in kept for _ in ts]
    adv = adv_lib.group_advantages(flat_r, flat_g, std_normalize=rl.std_normalize)
    i = 0
    for gi, g, ts in kept:
        w = tracker.weight(g.ref.key) if tracker is not None else 1.0
        counts["groups_trained"] += 1
        for t, _, a in ts:
            items.append((t, float(adv[i]) * w, gi))
            ledger.append(collector.ledger_record(t, step=step, group_id=g.group_id, status="trained",
                                                  advantage=float(adv[i]) * w, staleness=a))
            i += 1
    return items, ledger, counts, ages


def useful(g, rl) -> bool:
    """Counts toward the step's tasks_per_step: whole, and with dynamic sampling not zero-variance."""
    return g.complete and not (rl.dynamic_sampling and len({advantage_reward(t, rl) for t in g.trajectories}) == 1)


def gather(workers, tasks, meta, rl, *, step: int, seed: int, resync, first_round: int = 0) -> tuple[list, int]:
    """Step `step`'s whole groups (submitted as round `first_round`), refilled with more tasks under
    dynamic sampling -> (groups, refill rounds). Tasks of incomplete groups go back to the re-queue."""
    groups, rounds = workers.take(step, resync), 0
    want = rl.tasks_per_step - sum(useful(g, rl) for g in groups)
    while rl.dynamic_sampling and want > 0 and rounds < rl.max_refill_rounds:
        rounds += 1
        workers.submit(plan_jobs(tasks, meta, target=step, round_=first_round + rounds, n=want, seed=seed))
        new = workers.take(step, resync)
        groups += new
        want -= sum(useful(g, rl) for g in new)
    meta["requeue"] += [g.ref.key for g in groups if not g.complete]
    return groups, rounds


def truncate_ledger(path: str, last_step: int) -> None:
    """Drop lines of steps after `last_step` (a run killed before its next checkpoint)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        keep = [line for line in f if json.loads(line)["step"] <= last_step]
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(keep)
    os.replace(tmp, path)
