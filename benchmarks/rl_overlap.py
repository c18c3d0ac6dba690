"""Asynchronous vs synchronous GRPO: the same work on the toy environment, rollouts overlapping the learner.

    python benchmarks/rl_overlap.py [--quick]    # ~3 min on 2 CPU cores; --quick ~2 min

Runs stage `grpo` (`tau2jax.stages.grpo.run`) on `configs/tiny_grpo_toy.py` (the "toy" Qwen3, the
built-in engine, CPU) twice in one process, identical except `rl.max_staleness`: 0 (synchronous:
the next step's episodes start after the weight push) and 1 (they start while the learner trains).
Each agent turn sleeps `rl.toy.turn_latency_s`, standing in for what dominates real tau2 rollouts
and uses no CPU here: the user simulator's and the tools' latency. Both runs get the same episode
concurrency (enough for two steps of groups, which only the asynchronous run can use).

Compiles are kept out of the timings: the engine's batch buckets are compiled up front (compiled
code is shared across engines), each step packs into one learner row of 1024 tokens (one shape),
a short untimed warm-up run fills JAX's persistent compilation cache with the learner step (each
run jits its own step, which then loads from the cache), and each run's first step is left out
of its timed wall.
`async_speedup` = synchronous wall / asynchronous wall over the same steps. The last stdout line is
one JSON object (also written to benchmarks/results/rl_overlap.json) with `async_speedup`,
`learner_busy_frac_sync` / `_async` (learner seconds / step wall, mean over timed steps),
`max_staleness_seen` (of the asynchronous run; bound 1) and both runs' first/final reward (mean task
reward over their first / last 3 steps: the asynchronous run must learn as the synchronous one),
and `learner_compiles_sync` / `_async`: the learner-step shapes each run compiled (goal 1: one row bucket);
`weight_sync_wait_frac_sync` / `_async`: the learner's wait on weight sync over its step time, from each
run's metrics (a push every step, published in the background: goal <= 0.05).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import common  # benchmarks/common.py; also puts the repo root on sys.path

SIZES = {"full": dict(steps=40, warmup=6), "quick": dict(steps=24, warmup=4)}
# Per agent turn. A step waits for its slowest episode (up to 3 turns): ~0.3 s of rollout against a
# learner step of ~0.35 s on 2 busy cores; overlap matters when the two are of similar size.
TURN_LATENCY_S = 0.1
CONCURRENCY = 128  # two steps of 8 tasks x 8 samples


def grpo_config(workdir: str, *, steps: int, max_staleness: int, latency: float):
    sys.path.insert(0, os.path.join(common.REPO, "configs"))
    import tiny_grpo_toy

    c = tiny_grpo_toy.get_config()
    c.workdir = workdir
    c.rl.steps = steps
    c.rl.max_staleness = max_staleness
    c.rl.toy.turn_latency_s = latency
    c.rl.rollout.concurrency = CONCURRENCY
    c.engine.max_batch = CONCURRENCY
    c.train.checkpoint_every = steps  # the final one only: checkpoint I/O is not what is compared
    # One packed row per step (64 episodes of <= 14 tokens): a fixed learner shape, compiled once.
    # With 64-token rows the row count moves between power-of-two buckets and a new one recompiles
    # mid-run, which would time XLA instead of the overlap.
    c.rl.batch.max_len = 1024
    return c


def warm_engine(config) -> None:
    """Compile the built-in engine's prefill/decode for every batch bucket the runs can use."""
    import jax

    from tau2jax.inference.engine import SamplingParams
    from tau2jax.models import qwen3
    from tau2jax.stages import builders

    cfg = builders.model_config(config)
    engine = builders.rollout_engine(config, cfg, qwen3.init_params(cfg, jax.random.key(0)), None, 0)
    sampling = SamplingParams(temperature=config.rl.rollout.temperature, max_new_tokens=1)
    b = 1
    while b <= config.engine.max_batch:
        engine.generate([[1, 5, 4, 2]] * b, sampling)
        b *= 2
    engine.close()


def weight_sync_wait_frac(metrics_path: str) -> float:
    """The learner's wait on weight sync (`weight_sync_wait_s`, a push every step) over its step time,
    summed over the timed steps (the first, compiling, left out)."""
    rows = [json.loads(line) for line in open(metrics_path)][1:]
    return sum(r.get("weight_sync_wait_s", 0.0) for r in rows) / sum(r["step_s"] for r in rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--latency", type=float, default=TURN_LATENCY_S, help="seconds per agent turn")
    p.add_argument("--out", default=common.result_path("rl_overlap.json"))
    p.add_argument("--workdir", default="", help="keep the runs' workdirs here (default: a temp dir)")
    args = p.parse_args()
    size = SIZES["quick" if args.quick else "full"]
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    import jax

    from tau2jax.stages import grpo

    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        d = args.workdir or tmp
        jax.config.update("jax_compilation_cache_dir", os.path.join(tmp, "jax_cache"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
        warm_engine(grpo_config(d, steps=1, max_staleness=0, latency=0.0))
        grpo.run(grpo_config(os.path.join(d, "warmup"), steps=size["warmup"], max_staleness=1, latency=args.latency))
        for name, k in (("sync", 0), ("async", 1)):
            runs[name] = grpo.run(grpo_config(os.path.join(d, name), steps=size["steps"], max_staleness=k,
                                              latency=args.latency))
            runs[name]["weight_sync_wait_frac"] = weight_sync_wait_frac(os.path.join(d, name, "metrics.jsonl"))
    timed = size["steps"] - 1
    print(f"{'run':<6} {'max_staleness':>13} {'wall_s':>7} {'s/step':>7} {'learner_busy':>12} "
          f"{'staleness_seen':>14} {'compiles':>8} {'reward first -> final':>22}")
    for name, r in runs.items():
        print(f"{name:<6} {r['max_staleness']:>13} {r['steady_s']:>7.2f} {r['steady_s'] / timed:>7.3f} "
              f"{r['learner_busy_frac']:>12.3f} {r['max_staleness_seen']:>14} {r['learner_compiles']:>8} "
              f"{r['first_reward']:>10.3f} -> {r['final_reward']:.3f}")
    s, a = runs["sync"], runs["async"]
    result = {
        "async_speedup": round(s["steady_s"] / a["steady_s"], 3),
        "learner_busy_frac_sync": round(s["learner_busy_frac"], 3),
        "learner_busy_frac_async": round(a["learner_busy_frac"], 3),
        "max_staleness_seen": a["max_staleness_seen"], "max_staleness_bound": a["max_staleness"],
        "max_staleness_seen_sync": s["max_staleness_seen"],
        "first_reward_sync": s["first_reward"], "final_reward_sync": s["final_reward"],
        "first_reward_async": a["first_reward"], "final_reward_async": a["final_reward"],
        "wall_s_sync": s["steady_s"], "wall_s_async": a["steady_s"], "timed_steps": timed,
        "learner_compiles_sync": s["learner_compiles"], "learner_compiles_async": a["learner_compiles"],
        "weight_sync_wait_frac_sync": round(s["weight_sync_wait_frac"], 4),
        "weight_sync_wait_frac_async": round(a["weight_sync_wait_frac"], 4),
        "config": {"mode": "quick" if args.quick else "full", "turn_latency_s": args.latency,
                   "concurrency": CONCURRENCY, "steps": size["steps"], "loadavg_1m": os.getloadavg()[0],
                   "cpu_count": os.cpu_count()},
    }  # fmt: skip
    common.write_result(result, args.out)


if __name__ == "__main__":
    main()
