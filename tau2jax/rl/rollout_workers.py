"""Rollout workers: whole groups produced on threads while the learner steps, staleness bounded.

The loop `submit`s jobs (one group = `samples` episodes of one task) tagged with the learner step
they are for (`target`, 0-based: the step that turns version `target` into `target + 1`). Episodes
run on a pool of `concurrency` threads through `collector.play_episode` (infrastructure failures are
retried with the same seed). An episode of a job starts only while

    target <= served_version + max_staleness

where `served_version` is the policy version the engine serves (`set_version` after each weight
sync). So at most max_staleness + 1 steps of prompts are in flight, max_staleness = 0 is the
synchronous loop, and a trajectory trained at step `target` was started on a version at most
`max_staleness` behind (`staleness.check` verifies it when the batch is formed). Lower targets
start first, so a refill for the current step overtakes prefetching.

Episodes in flight across a weight update continue (no abort, no restart): with the built-in
engine a turn sampled after the update carries the new version, so one trajectory may hold several
versions (`Trajectory.turns[].policy_version`); the oldest one is its staleness. Partial rollouts are
that and nothing more.

Finished groups wait, released whole, until the learner `take`s its step's groups (in submit
order). Faults: a worker that sees an infrastructure failure asks `lost_weights(traj)` whether the
engine dropped its weights (a restart); if so the learner thread re-syncs the current weights the
next time it waits in `take` (weights belong to the learner thread: its step donates them).
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

from tau2jax.env.environments import Environment, TaskRef
from tau2jax.env.trajectory import Trajectory
from tau2jax.inference.engine import Engine, SamplingParams
from tau2jax.env.episode import derive_seed
from tau2jax.rl import collector
from tau2jax.rl.policy_sync import EngineOutageError


@dataclass(frozen=True)
class Job:
    target: int  # the learner step (0-based) this group is for
    group_id: str
    ref: TaskRef


@dataclass
class _Slot:
    job: Job
    group: collector.Group
    seq: int
    waiting: int  # episodes not finished yet
    error: BaseException | None = None


@dataclass
class Throughput:
    episodes: int = 0
    sampled_tokens: int = 0
    since: float = field(default_factory=time.perf_counter)


class _Watched:
    """The environment, each attempt let through the engine gate and its infrastructure failure
    reported to the workers."""

    def __init__(self, env: Environment, on_infra: Callable[[Trajectory], None], gate: Callable[[], None] | None):
        self.env, self.on_infra, self.gate = env, on_infra, gate

    def play(self, ref: TaskRef, **kw) -> Trajectory:
        if self.gate is not None:
            self.gate()  # an engine that is down or not at our version: wait, do not burn a retry
        traj = self.env.play(ref, **kw)
        if traj.infra_error is not None:
            self.on_infra(traj)
        return traj


class RolloutWorkers:
    """See the module docstring. `version`: the policy version the engine serves now.
    `lost_weights(traj) -> bool`: called on a worker thread after an infrastructure failure.
    `await_engine()`: called on a worker thread before each episode attempt; blocks while the
    engine cannot serve us (`PolicySync.await_serving`), raises `EngineOutageError` to stop the run."""

    def __init__(self, env: Environment, *, engine: Engine, sampling: SamplingParams, samples: int, seed: int,
                 concurrency: int, max_infra_retries: int, max_staleness: int, version: int,
                 lost_weights: Callable[[Trajectory], bool] | None = None,
                 await_engine: Callable[[], None] | None = None):
        self._env = _Watched(env, self._on_infra, await_engine)
        self._engine, self._sampling, self._samples, self._seed = engine, sampling, samples, seed
        self._concurrency, self._retries, self._max_staleness = concurrency, max_infra_retries, max_staleness
        self._lost_weights = lost_weights
        self._cv = threading.Condition()
        self._version = version
        self._slots: dict[str, _Slot] = {}  # submitted, not taken yet
        self._pending: list[tuple[int, int, int, str]] = []  # heap of (target, seq, sample, group_id)
        self._seq = itertools.count()
        self._active = 0
        self._resync = False
        self._closed = False
        self._counts = Throughput()
        self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="rollout")

    # ------------------------------------------------------------------ the learner's side

    def submit(self, jobs: list[Job]) -> None:
        with self._cv:
            for job in jobs:
                if job.group_id in self._slots:
                    raise ValueError(f"group {job.group_id!r} is already submitted")
                seq = next(self._seq)
                self._slots[job.group_id] = _Slot(job, collector.Group(job.group_id, job.ref), seq, self._samples)
                for i in range(self._samples):
                    heapq.heappush(self._pending, (job.target, seq, i, job.group_id))
            self._pump()

    def set_version(self, version: int) -> None:
        """The engine now serves `version`: jobs up to version + max_staleness may start."""
        with self._cv:
            self._version = version
            self._pump()

    def take(self, target: int, resync: Callable[[], None] | None = None) -> list[collector.Group]:
        """Blocks until every submitted group for `target` is whole; removes and returns them in
        submit order. While waiting, runs `resync()` (on this thread) when a worker asked for one."""
        with self._cv:
            while True:
                if self._resync and resync is not None:
                    self._resync = False
                    self._cv.release()
                    try:
                        resync()
                    finally:
                        self._cv.acquire()
                    continue
                mine = sorted((s for s in self._slots.values() if s.job.target == target), key=lambda s: s.seq)
                if not mine:
                    raise ValueError(f"no group was submitted for step {target}")
                if all(s.waiting == 0 for s in mine):
                    break
                self._cv.wait()
            for s in mine:
                del self._slots[s.job.group_id]
        for s in mine:
            if isinstance(s.error, EngineOutageError):  # the engine stayed down: stop, naming it
                raise s.error
            if s.error is not None:  # episodes never raise; a raise is a bug, so stop the run
                raise RuntimeError(f"rollout of group {s.job.group_id} raised") from s.error
        return [s.group for s in mine]

    def in_flight_keys(self) -> list[str]:
        """Task keys of the groups submitted and not taken (queued, running or finished), in submit
        order: what a checkpoint re-queues, since none of them is trained yet."""
        with self._cv:
            return [s.job.ref.key for s in sorted(self._slots.values(), key=lambda s: s.seq)]

    def ready_groups(self) -> int:
        """Whole groups waiting for the learner (the queue depth)."""
        with self._cv:
            return sum(s.waiting == 0 for s in self._slots.values())

    def throughput(self) -> dict:
        """Episodes/s and sampled tokens/s since the previous call."""
        with self._cv:
            c, self._counts = self._counts, Throughput()
        dt = max(self._counts.since - c.since, 1e-9)
        return {"rollout_episodes_per_s": c.episodes / dt, "rollout_tokens_per_s": c.sampled_tokens / dt}

    def close(self) -> None:
        """Starts nothing more; episodes already running finish on their threads."""
        with self._cv:
            self._closed = True
            self._pending.clear()
            self._cv.notify_all()
        self._pool.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ the workers' side

    def _pump(self) -> None:
        """Start pending episodes the staleness bound and the concurrency allow (lock held)."""
        while (not self._closed and self._pending and self._active < self._concurrency
               and self._pending[0][0] <= self._version + self._max_staleness):
            _, _, i, gid = heapq.heappop(self._pending)
            self._active += 1
            self._pool.submit(self._play, self._slots[gid], i)

    def _play(self, slot: _Slot, i: int) -> None:
        error, traj, failed = None, None, []
        try:
            seed = derive_seed(self._seed, slot.job.group_id, i)  # as collector.collect does
            sampling = dataclasses.replace(self._sampling, seed=seed)
            traj, failed = collector.play_episode(self._env, slot.job.ref, engine=self._engine, sampling=sampling,
                                                  sample_index=i, max_infra_retries=self._retries)
        except BaseException as e:  # noqa: BLE001  (reported by take, never lost on a pool thread)
            error = e
        with self._cv:
            self._active -= 1
            slot.waiting -= 1
            g = slot.group
            if error is not None:
                slot.error, g.complete = error, False
            else:
                g.add(traj, failed)
                if traj.infra_error is None:
                    self._counts.episodes += 1
                    self._counts.sampled_tokens += sum(t["end"] - t["start"] for t in traj.turns)
            if slot.waiting == 0:  # episodes finish in any order; groups list samples by index
                g.trajectories.sort(key=lambda t: t.sample_index)
            self._pump()
            self._cv.notify_all()

    def request_resync(self) -> None:
        """Any thread: the learner runs its `resync` the next time it waits in `take` (the engine
        lost our weights, or a background weight push failed: resync raises that)."""
        with self._cv:
            self._resync = True
            self._cv.notify_all()

    def _on_infra(self, traj: Trajectory) -> None:
        if self._lost_weights is not None and self._lost_weights(traj):
            self.request_resync()
