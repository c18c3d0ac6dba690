"""Concurrent episodes -> whole groups (K samples of one task), with every trajectory accounted for.

`play_group` runs the K episodes of one task; an episode that ends in an infrastructure failure
(engine outage, user-simulator timeout, evaluator crash) is played again with the same seed, up to
`max_infra_retries` times. A group is released only whole: if a sample still failed, the group is
`requeued` (its task goes back to the queue) and its finished samples are dropped with the reason
"group_incomplete", never scored as model failures and never trained on a partial group.

Every episode that ran, retried attempts included, gets one ledger record (`ledger_record`):
{step, group_id, task, sample_index, attempt, status, reason, reward, ...}; statuses are
"trained", "dropped" (reason) and "requeued". `collect` runs many groups on one thread pool.
"""

from __future__ import annotations

import contextlib
import dataclasses
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from tau2jax.env.environments import Environment, TaskRef, retry_infra
from tau2jax.env.episode import derive_seed
from tau2jax.env.trajectory import Trajectory
from tau2jax.inference.engine import Engine, SamplingParams


@dataclass
class Group:
    group_id: str
    ref: TaskRef
    trajectories: list[Trajectory] = field(default_factory=list)  # complete groups only
    failed_attempts: list[Trajectory] = field(default_factory=list)  # infra failures, retried
    complete: bool = True

    def add(self, traj: Trajectory, failed: list[Trajectory]) -> None:
        """One sample's outcome (`play_episode`): scored, or still an infrastructure failure after
        its retries, which leaves the group incomplete."""
        self.failed_attempts += failed
        if traj.infra_error is None:
            self.trajectories.append(traj)
        else:
            self.failed_attempts.append(traj)
            self.complete = False


def play_episode(env: Environment, ref: TaskRef, *, engine: Engine, sampling: SamplingParams,
                 sample_index: int, max_infra_retries: int) -> tuple[Trajectory, list[Trajectory]]:
    """-> (last attempt, earlier attempts that failed on infrastructure)."""
    return retry_infra(lambda: env.play(ref, engine=engine, sampling=sampling, sample_index=sample_index),
                       max_infra_retries)


def collect(env: Environment, jobs: list[tuple[str, TaskRef]], *, engine: Engine, sampling: SamplingParams,
            samples: int, seed: int, concurrency: int, max_infra_retries: int,
            pool: ThreadPoolExecutor | None = None) -> list[Group]:
    """Play `samples` episodes for each (group_id, task) of `jobs`, all concurrently, and return
    the groups in `jobs` order. Each episode's seed comes from (seed, group_id, sample_index).
    `pool`: run the episodes on this executor (shared by several callers) instead of a new one."""
    with contextlib.nullcontext(pool) if pool else ThreadPoolExecutor(concurrency, "rollout") as pool:
        futures = {
            (gid, i): pool.submit(play_episode, env, ref, engine=engine, sample_index=i,
                                  sampling=dataclasses.replace(sampling, seed=derive_seed(seed, gid, i)),
                                  max_infra_retries=max_infra_retries)
            for gid, ref in jobs for i in range(samples)
        }  # fmt: skip
        groups = []
        for gid, ref in jobs:
            g = Group(gid, ref)
            for i in range(samples):
                g.add(*futures[(gid, i)].result())  # episodes never raise: a raise is a bug
            groups.append(g)
        return groups


def ledger_record(traj: Trajectory, *, step: int, group_id: str, status: str, reason: str = "",
                  **extra) -> dict:
    """What the ledger keeps of one episode (token arrays stay in the rollout dump)."""
    return {
        "step": step, "group_id": group_id, "task": f"{traj.domain}/{traj.task_id}",
        "sample_index": traj.sample_index, "status": status, "reason": reason,
        "reward": traj.reward, "shaped_reward": traj.shaped_reward, "partial_reward": traj.partial_reward,
        "termination_reason": traj.termination_reason, "infra_error": traj.infra_error,
        "policy_versions": traj.policy_versions, "num_turns": len(traj.turns), **extra,
    }  # fmt: skip
