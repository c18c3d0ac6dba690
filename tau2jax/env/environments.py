"""Environments as the RL stages see them: a list of tasks, and `play` = one scored episode.

An `Environment` hides what an episode is (a tau2 conversation with a user simulator, or the toy
lookup game in `env/toy.py`); RFT, GRPO and the rollout workers only call `tasks()` and `play()`,
and get back a `Trajectory` (token ids, loss mask, behaviour log-probs, turns, rewards).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from tau2jax.env.episode import run_episode
from tau2jax.env.rewards import RewardConfig
from tau2jax.env.trajectory import Trajectory
from tau2jax.inference.engine import Engine, SamplingParams


@dataclass(frozen=True)
class TaskRef:
    domain: str
    task_id: str
    task: Any = None  # the environment's own task object

    @property
    def key(self) -> str:
        return f"{self.domain}/{self.task_id}"


class Environment(Protocol):
    def tasks(self) -> list[TaskRef]: ...

    def play(self, ref: TaskRef, *, engine: Engine, sampling: SamplingParams, sample_index: int) -> Trajectory:
        """One episode, scored. Never raises for engine/user failures: those come back with
        `infra_error` set (retry them; they are not model failures)."""


def retry_infra(play, max_infra_retries: int) -> tuple[Trajectory, list[Trajectory]]:
    """Run `play()` (one episode) again while it ends in an infrastructure failure, at most
    `max_infra_retries` more times. -> (last attempt, earlier attempts that failed on infrastructure)."""
    failed = []
    for _ in range(max_infra_retries + 1):
        traj = play()
        if traj.infra_error is None:
            return traj, failed
        failed.append(traj)
    return failed.pop(), failed


class Tau2Environment:
    """tau2 tasks played by `run_episode` with one prompt style, user simulator (`user_for(task,
    domain)`, fresh per episode), limits and reward weights (`stages.builders.tau2_environment`
    builds one from a config)."""

    def __init__(self, tasks: list[TaskRef], chat, *, style, user_for, reward_config=None, max_steps: int = 100,
                 max_errors: int = 10, max_repairs: int = 1):
        self._tasks = list(tasks)
        self.chat = chat
        self.style = style
        self.user_for = user_for
        self.reward_config = reward_config or RewardConfig()
        self.limits = dict(max_steps=max_steps, max_errors=max_errors, max_repairs=max_repairs)

    def tasks(self) -> list[TaskRef]:
        return list(self._tasks)

    def play(self, ref: TaskRef, *, engine: Engine, sampling: SamplingParams, sample_index: int) -> Trajectory:
        return run_episode(ref.task, ref.domain, engine=engine, user=self.user_for(ref.task, ref.domain),
                           chat=self.chat, style=self.style, sampling=sampling,
                           reward_config=self.reward_config, sample_index=sample_index, **self.limits)
