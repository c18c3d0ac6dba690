"""GRPO rollouts split over processes: each process plays whole groups, every process sees them all.

Every process plans the same jobs (the loop state is identical everywhere) and submits to its own
`RolloutWorkers` the groups it owns: job j of a submission belongs to process j % process_count.
A group's K samples stay on one process, and each episode's seed comes from (run seed, group id,
sample index) with group ids naming (step, refill round, position), so the split does not change
what is sampled, and a resume on another process count samples the same episodes.

`take(step)` returns every process's groups of that step in plan order (the records are exchanged
through `parallel.host_gather`), so the decisions that follow (dynamic sampling refills,
staleness, zero-variance drops, the curriculum tracker, re-queues, advantages, metrics) are computed
from the same data by the same code on every process: one decision per group, identical
everywhere. `own(group_id)` tells which groups' rows this process packs into the global batch.
With one process it is a pass-through (nothing is serialised).
"""

from __future__ import annotations

import jax

from tau2jax.env.trajectory import Trajectory
from tau2jax.parallel import host_gather
from tau2jax.rl.collector import Group
from tau2jax.rl.rollout_workers import Job, RolloutWorkers


def _record(g: Group) -> dict:
    return {"id": g.group_id, "complete": g.complete, "trajectories": [t.to_dict() for t in g.trajectories],
            "failed": [t.to_dict() for t in g.failed_attempts]}


class ProcessShare:
    """The loop's view of the rollout workers of every process (see the module docstring)."""

    def __init__(self, workers: RolloutWorkers):
        self.workers = workers
        self.rank, self.count = jax.process_index(), jax.process_count()
        self._planned: list[Job] = []  # submitted by the loop, not taken yet, in submit order
        self._own: dict[str, int] = {}  # group id -> target, of this process's groups

    def submit(self, jobs: list[Job]) -> None:
        self._planned += jobs
        mine = [job for j, job in enumerate(jobs) if j % self.count == self.rank]
        self._own |= {job.group_id: job.target for job in mine}
        if mine:
            self.workers.submit(mine)

    def own(self, group_id: str) -> bool:
        return group_id in self._own

    def take(self, target: int, resync=None) -> list[Group]:
        """Every process's whole groups for `target`, in submit order."""
        jobs = [j for j in self._planned if j.target == target]
        if not jobs:
            raise ValueError(f"no group was submitted for step {target}")
        self._planned = [j for j in self._planned if j.target != target]
        self._own = {k: t for k, t in self._own.items() if t >= target}  # earlier steps are trained
        mine = self.workers.take(target, resync) if any(j.group_id in self._own for j in jobs) else []
        if self.count == 1:
            return mine
        records = {r["id"]: r for part in host_gather.allgather(f"groups_{target}", [_record(g) for g in mine])
                   for r in part}
        groups = []
        for job in jobs:
            r = records[job.group_id]
            g = Group(job.group_id, job.ref, [Trajectory.from_dict(t) for t in r["trajectories"]],
                      [Trajectory.from_dict(t) for t in r["failed"]], r["complete"])
            groups.append(g)
        return groups

    def in_flight_keys(self) -> list[str]:
        """Task keys of the groups submitted on any process and not taken, in submit order (what a
        checkpoint re-queues): known on every process, since every process plans every job."""
        return [j.ref.key for j in self._planned]
