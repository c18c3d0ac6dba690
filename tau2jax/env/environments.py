"""Environments as the RL stages see them: a list of tasks, and `play` = one scored episode.

An `Environment` hides what an episode is (a tau2 conversation with a user simulator, or the toy
lookup game in `env/toy.py`); RFT, GRPO and the rollout workers only call `tasks()` and `play()`,
and get back a `Trajectory` (token ids, loss mask, behaviour log-probs, turns, rewards).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Protocol

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


def user_factory(user_cfg):
    """-> `user_for(task, domain) -> tau2 BaseUser`, fresh per episode (`config.user`)."""
    if user_cfg.kind == "scripted":
        from tau2jax.env.scripted_user import ScriptedUser

        return lambda task, domain: ScriptedUser(task)
    from tau2jax.env import tau2_env
    from tau2jax.env.llm_user import make_llm_user

    tools: dict[str, list | None] = {}  # user tool schemas per domain (only schemas are used)
    lock = threading.Lock()

    def user_for(task, domain):
        with lock:
            if domain not in tools:
                env = tau2_env.make_environment(domain)
                tools[domain] = env.get_user_tools() if env.user_tools is not None else None
        return make_llm_user(user_cfg, task, tools[domain])

    return user_for


class Tau2Environment:
    """tau2 tasks of `config.tau2.domains` / `split` (optionally `tau2.task_ids`), played by
    `run_episode` with the configured prompt style, user simulator, limits and reward weights."""

    def __init__(self, config, chat, *, split: str | None = None):
        from tau2jax import config as config_lib
        from tau2jax.env import prompts, rewards, tau2_env

        tau2_env.init_tau2(config.tau2.data_dir)
        self.chat = chat
        self.style = prompts.get_style(config.tau2.prompt_style)
        self.user_for = user_factory(config.user)
        self.reward_config = rewards.RewardConfig.from_config(config.reward)
        self.limits = dict(max_steps=config.tau2.max_steps, max_errors=config.tau2.max_errors,
                           max_repairs=config.tau2.max_repairs)
        wanted = set(config_lib.csv(config.tau2.task_ids))
        split = split or config.tau2.split
        self._tasks = [TaskRef(d, t.id, t) for d in config_lib.csv(config.tau2.domains)
                       for t in tau2_env.load_tasks(d, split) if not wanted or t.id in wanted]
        if not self._tasks:
            raise config_lib.ConfigError(
                f"config.tau2: no task in domains {config.tau2.domains!r}, split {split!r}"
                + (f", ids {sorted(wanted)}" if wanted else ""))

    def tasks(self) -> list[TaskRef]:
        return list(self._tasks)

    def play(self, ref: TaskRef, *, engine: Engine, sampling: SamplingParams, sample_index: int) -> Trajectory:
        from tau2jax.env.episode import run_episode

        return run_episode(ref.task, ref.domain, engine=engine, user=self.user_for(ref.task, ref.domain),
                           chat=self.chat, style=self.style, sampling=sampling,
                           reward_config=self.reward_config, sample_index=sample_index, **self.limits)
