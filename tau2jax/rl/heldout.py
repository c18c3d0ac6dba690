"""Held-out evaluation inside the GRPO loop (`rl.eval_every` > 0).

Every `rl.eval_every` steps, right after that step's weights are served, the engine plays each
held-out task twice: once greedy (temperature 0) and once sampled at the rollout settings (seed
from the run seed, the step and the task). The held-out tasks are a split never trained on: the
toy game's "test" tasks (`ToyEnvironment(split="test")`, ids `test_i`), tau2's test split. Pass@1
is the share of tasks whose episode succeeded (tau2: reward >= 1); infrastructure failures count
as failures, as in the eval stage. Several processes: process r plays tasks r, r + N, ...; the
counts are summed over processes.
"""

from __future__ import annotations

import dataclasses
import time

from tau2jax.env.episode import derive_seed
from tau2jax.inference.engine import SamplingParams
from tau2jax.parallel import host_gather
from tau2jax.rl import collector


def interleave_domains(refs: list) -> list:
    """Refs round-robin over their domains (each domain's order kept), so the first N held-out
    tasks span every domain."""
    by_domain: dict[str, list] = {}
    for r in refs:
        by_domain.setdefault(r.domain, []).append(r)
    queues = list(by_domain.values())
    return [q[i] for i in range(max(map(len, queues), default=0)) for q in queues if i < len(q)]


def _wins(env, refs, *, engine, sampling: SamplingParams, greedy_seed: int, sample_seed, samples: int,
          concurrency: int, max_infra_retries: int) -> list[int]:
    """[greedy successes, sampled successes] over `refs`: per task one greedy episode (sample 0)
    and `samples` sampled ones (samples 1.., seeds `sample_seed(ref, i)`)."""
    greedy = dataclasses.replace(sampling, temperature=0.0, seed=greedy_seed)
    episodes = []
    for ref in refs:
        episodes.append(collector.Episode(ref, 0, greedy, engine))
        episodes += [collector.Episode(ref, i, dataclasses.replace(sampling, seed=sample_seed(ref, i)), engine)
                     for i in range(1, samples + 1)]
    wins = [0, 0]
    for ep, traj, _ in collector.play(env, episodes, concurrency=concurrency, max_infra_retries=max_infra_retries):
        wins[ep.sample_index > 0] += bool(traj.infra_error is None and traj.success)
    return wins


def pass1(env, refs, *, engine, sampling: SamplingParams, seed: int, samples: int, concurrency: int,
          max_infra_retries: int = 2) -> dict:
    """Greedy and sampled pass@1 of `engine` on `refs` outside a training loop (benchmarks/heldout.py
    scores the SFT and GRPO exports with it): one greedy episode per task, and `samples` sampled
    episodes per task averaged, so the sampled number's noise shrinks with `samples`.
    -> {"greedy_pass1", "sampled_pass1", "tasks", "samples"}."""
    wins = _wins(env, refs, engine=engine, sampling=sampling, greedy_seed=derive_seed(seed, "pass1", "greedy"),
                 sample_seed=lambda ref, i: derive_seed(seed, f"pass1:{ref.key}", i), samples=samples,
                 concurrency=concurrency, max_infra_retries=max_infra_retries)
    n = max(len(refs), 1)
    return {"greedy_pass1": wins[0] / n, "sampled_pass1": wins[1] / (n * max(samples, 1)), "tasks": len(refs),
            "samples": samples}


def evaluate(env, refs, *, engine, sampling: SamplingParams, seed: int, step: int, concurrency: int,
             max_infra_retries: int, process: int = 0, processes: int = 1) -> dict:
    """-> {"heldout_greedy_pass1", "heldout_sampled_pass1", "heldout_tasks", "heldout_s"} at `step`."""
    t0 = time.perf_counter()
    wins = _wins(env, refs[process::processes], engine=engine, sampling=sampling,
                 greedy_seed=derive_seed(seed, f"heldout{step}", "greedy"),
                 sample_seed=lambda ref, i: derive_seed(seed, f"heldout{step}:{ref.key}", i - 1), samples=1,
                 concurrency=concurrency, max_infra_retries=max_infra_retries)
    if processes > 1:
        wins = [sum(x) for x in zip(*host_gather.allgather(f"heldout_{step}", wins))]
    n = max(len(refs), 1)
    return {"heldout_greedy_pass1": wins[0] / n, "heldout_sampled_pass1": wins[1] / n,
            "heldout_tasks": len(refs), "heldout_s": time.perf_counter() - t0}
