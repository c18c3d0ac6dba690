"""Every concurrent episode is played here: the eval, the gold demos, the do-nothing floor, RFT and
GRPO (`rl.rollout_workers` schedules GRPO's through `play_episode`).

`play` runs episodes on a thread pool and yields each as it finishes, with a progress bar
counting successes and infrastructure failures. An episode that ends in an infrastructure
failure (engine outage, user-simulator timeout, evaluator crash) is played again with the same
seed, up to `max_infra_retries` times; the retried attempts come back beside the final one, so
whoever writes the records loses none.

`groups` plays K samples of each task and yields each group once it is whole, in completion
order (`collect`: all of them, in job order). A group is complete only if every sample scored:
otherwise it is `requeued` by GRPO (its task goes back to the queue) and its finished samples are
dropped with the reason "group_incomplete", never scored as model failures and never trained on
a partial group.

Every episode that ran, retried attempts included, gets one ledger record (`ledger_record`):
{step, group_id, task, sample_index, attempt, status, reason, reward, ...}; statuses are
"trained", "dropped" (reason) and "requeued" (GRPO), "kept" (RFT).
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field

from tqdm import tqdm

from tau2jax.env.environments import Environment, TaskRef, retry_infra
from tau2jax.env.episode import derive_seed
from tau2jax.env.trajectory import Trajectory
from tau2jax.inference.engine import Engine, SamplingParams


@dataclass(frozen=True)
class Episode:
    """One episode to play: the task, its sample index, its sampling (the seed is the episode's)
    and the engine that plays it."""
    ref: TaskRef
    sample_index: int
    sampling: SamplingParams
    engine: Engine


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


def play(env: Environment, episodes: Iterable[Episode], *, concurrency: int, max_infra_retries: int,
         progress: dict | None = None, pool: ThreadPoolExecutor | None = None,
         ) -> Iterator[tuple[Episode, Trajectory, list[Trajectory]]]:
    """Play `episodes`, `concurrency` at a time, yielding (episode, final attempt, earlier attempts
    that failed on infrastructure) as each finishes. `progress`: tqdm's arguments (desc, total,
    initial, unit) for a bar on stderr; None: no bar. `pool`: run on this executor (shared by
    several callers) instead of a new one. Closing the iterator early cancels what has not started."""
    own = pool is None
    pool = pool or ThreadPoolExecutor(concurrency, thread_name_prefix="episode")
    futures = {pool.submit(play_episode, env, e.ref, engine=e.engine, sampling=e.sampling,
                           sample_index=e.sample_index, max_infra_retries=max_infra_retries): e
               for e in episodes}  # fmt: skip
    bar = tqdm(**({"total": len(futures), "unit": "ep"} | progress), file=sys.stderr, dynamic_ncols=True) \
        if progress is not None else contextlib.nullcontext()
    ok = infra = 0
    try:
        with bar:
            for fut in as_completed(futures):
                traj, failed = fut.result()  # episodes never raise: a raise is a bug
                yield futures[fut], traj, failed
                if progress is not None:
                    ok += traj.success
                    infra += traj.infra_error is not None
                    bar.update()
                    bar.set_postfix(success=ok, infra_failed=infra)
    finally:
        if own:
            pool.shutdown(wait=False, cancel_futures=True)
        else:
            for fut in futures:
                fut.cancel()


def group_episodes(jobs: list[tuple[str, TaskRef]], *, engine_for: Callable[[TaskRef], Engine],
                   sampling: SamplingParams, samples: int, seed: int) -> list[tuple[str, Episode]]:
    """(group_id, episode) for `samples` episodes of each (group_id, task); each episode's seed
    comes from (seed, group_id, sample_index), as the rollout workers derive it."""
    return [(gid, Episode(ref, i, dataclasses.replace(sampling, seed=derive_seed(seed, gid, i)), engine_for(ref)))
            for gid, ref in jobs for i in range(samples)]


def groups(env: Environment, jobs: list[tuple[str, TaskRef]], *, engine_for: Callable[[TaskRef], Engine],
           sampling: SamplingParams, samples: int, seed: int, concurrency: int, max_infra_retries: int,
           progress: dict | None = None) -> Iterator[Group]:
    """Play `samples` episodes of each (group_id, task) of `jobs`, all concurrently; yield each
    group once all its samples finished (completion order), samples in index order. `progress`:
    as for `play`, counting groups."""
    planned = group_episodes(jobs, engine_for=engine_for, sampling=sampling, samples=samples, seed=seed)
    gid_of = {id(e): gid for gid, e in planned}
    open_groups = {gid: (Group(gid, ref), [samples]) for gid, ref in jobs}
    bar = tqdm(**({"total": len(jobs), "unit": "task"} | progress), file=sys.stderr, dynamic_ncols=True) \
        if progress is not None else contextlib.nullcontext()
    with bar:
        for episode, traj, failed in play(env, (e for _, e in planned), concurrency=concurrency,
                                          max_infra_retries=max_infra_retries):
            g, left = open_groups[gid_of[id(episode)]]
            g.add(traj, failed)
            left[0] -= 1
            if left[0] == 0:
                g.trajectories.sort(key=lambda t: t.sample_index)
                if progress is not None:
                    bar.update()
                yield g


def collect(env: Environment, jobs: list[tuple[str, TaskRef]], *, engine: Engine, sampling: SamplingParams,
            samples: int, seed: int, concurrency: int, max_infra_retries: int) -> list[Group]:
    """`groups` with one engine, all of them, in `jobs` order."""
    done = {g.group_id: g for g in groups(env, jobs, engine_for=lambda ref: engine, sampling=sampling, samples=samples,
                                          seed=seed, concurrency=concurrency, max_infra_retries=max_infra_retries)}
    return [done[gid] for gid, _ in jobs]


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
