"""Rollout throughput: tau2 episodes through the built-in engine, prefix cache off vs on.

    python benchmarks/rollout.py [--quick]

Episodes of the tau2 `mock` domain (ScriptedUser, `run_episode`, one thread per episode, all
sharing one JaxEngine that batches their turns) with the tiny random Qwen3 and the real Qwen3
tokenizer, T=1, 32 new tokens a turn. A random model never writes a parseable tool call, so with
the `recipe` prompt style every turn is answered with a format-repair prompt and regenerated
(2 repairs with --quick, else 3): each engine call extends the previous prompt by the last
output and the repair message, as a multi-turn episode does. With the prefix cache off every turn
prefills the whole conversation again; on, it prefills only what is new since the cached prefix
(and the system prompt is shared across episodes).

Each round runs the same seeded episodes on a fresh engine (compiled code is shared, the prefix
cache is not): `JaxEngine.warmup()` compiles every (batch, cache) bucket first, one untimed round
per mode follows, then timed rounds alternating between the modes; the median round counts.
`compiles_in_untimed_rounds` / `compiles_in_timed_rounds` count every XLA compile after the
warm-up (both should be 0). Episode tokens/s counts every trajectory token (prompt, sampled
and forced) over the round's wall time. Prints a table and, as the last line, a JSON object with
`speedup_vs_reprefill` (tokens/s on / off), also written to benchmarks/results/rollout.json.

    python benchmarks/rollout.py [--quick] --compare-batching

The engine's schedulers on the serving path: `concurrency` (16) episode threads play a queue of
episodes back to back (as rollout workers keep that many in flight), each turn through the
server's `Batcher` (`tau2jax.inference.server`, its defaults) in front of a JaxEngine with the
prefix cache on; `static` (each batch runs until its longest row ends; the Batcher gathers
batches for it) vs `continuous` (the Batcher hands each request to `submit`; rows join and
leave the running batch between decode chunks). A random model never stops on its own, so
each turn's max_new_tokens is drawn from TURN_BUDGETS per (episode, turn): the short, uneven
turns of a trained agent (tool calls, answers). Compiled code is warmed first (`warmup()` for
both), then one untimed round each, then timed rounds alternating; the median round counts.
One more untimed round each at T=0 gives `greedy_identical_frac` (greedy episodes token-identical
between the schedulers). Last line: JSON with `continuous_vs_static` (episode tokens/s ratio),
`greedy_identical_frac`, `compiles_in_timed_rounds`, `concurrency`; also written to
benchmarks/results/rollout_batching.json.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import sys
import time

import numpy as np

import common  # benchmarks/common.py; also puts the repo root on sys.path
from tau2jax.config import default_config  # noqa: E402

SIZES = {"full": dict(episodes=8, repairs=3, rounds=3), "quick": dict(episodes=4, repairs=2, rounds=2)}
MAX_NEW_TOKENS = 32
# --compare-batching: episodes played back to back by CONCURRENCY threads, turn budgets per (episode, turn)
CONCURRENCY = 16
COMPARE_SIZES = {"full": dict(episodes=64, repairs=3, rounds=3), "quick": dict(episodes=32, repairs=2, rounds=1)}
TURN_BUDGETS = (4, 6, 8, 8, 12, 16, 16, 24, 32, 64)
# Decode steps a dispatch, both schedulers: a request joins the running batch at a chunk's end, so
# short chunks keep admission quick (a static batch exits its chunk once every row is done).
DECODE_CHUNK = 4
PREFIX_CACHE_TOKENS = default_config().engine.prefix_cache_tokens  # what a run gets by default


_COMPILES = [0]


def _count_compiles() -> None:
    """Counts every XLA compile in this process (any function, any thread) into _COMPILES."""
    import jax

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            _COMPILES[0] += 1

    jax.monitoring.register_event_duration_secs_listener(listener)


def _compiles() -> int:
    """XLA compiles so far: the engine's (prefill, decode, cache and prefix-block copies) and any other."""
    return _COMPILES[0]


def run_round(tasks, engine, chat, repairs: int) -> tuple[float, list]:
    from tau2jax.env.episode import run_episode
    from tau2jax.env.scripted_user import ScriptedUser
    from tau2jax.inference.engine import SamplingParams

    def episode(i):
        task = tasks[i % len(tasks)]
        return run_episode(task, "mock", engine=engine, user=ScriptedUser(task), chat=chat, style="recipe",
                           sampling=SamplingParams(temperature=1.0, max_new_tokens=MAX_NEW_TOKENS, seed=i),
                           max_repairs=repairs, max_errors=repairs + 2, sample_index=i)

    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(len(tasks)) as pool:
        trajs = list(pool.map(episode, range(len(tasks))))
    return time.perf_counter() - t0, trajs


def run(size: str, threads: int) -> dict:
    import jax

    from tau2jax.data.chat import ChatFormat
    from tau2jax.data.tokenizer import load_tokenizer
    from tau2jax.env import tau2_env
    from tau2jax.inference.jax_engine import JaxEngine
    from tau2jax.models import qwen3
    from tau2jax.models.configs import get_model_config

    spec = SIZES[size]
    n, repairs, rounds = spec["episodes"], spec["repairs"], spec["rounds"]
    tok = load_tokenizer("")
    chat = ChatFormat(tok)
    cfg = get_model_config("tiny")
    params = qwen3.init_params(cfg, jax.random.key(0))
    tasks = tau2_env.load_tasks("mock")[:n]

    def engine(prefix_tokens):
        # batch_wait_s: the episodes' next turns arrive a few ms apart; let them share one batch.
        return JaxEngine(params, cfg, tokenizer=tok, max_seq_len=4096, max_batch=n, batch_wait_s=0.05,
                         prefix_cache_tokens=prefix_tokens, seed=0)

    modes = {"reprefill": 0, "prefix_cache": PREFIX_CACHE_TOKENS}
    # The engine's shapes are a fixed set, one per (batch bucket, cache bucket): warmup() compiles
    # them all (compiled code is shared by every engine of one static config), whatever batches
    # the episode threads' timing makes. Then one untimed round per mode, for everything else.
    _count_compiles()
    t0, eng = time.perf_counter(), engine(0)
    buckets = eng.warmup()
    eng.close()
    warmup_s, warmup_compiles = time.perf_counter() - t0, _compiles()
    for prefix_tokens in modes.values():
        eng = engine(prefix_tokens)
        run_round(tasks, eng, chat, repairs)
        eng.close()
    compiles = _compiles()
    secs, trajs, stats = {name: [] for name in modes}, {}, {}
    for _ in range(rounds):  # alternating, so that other load on the machine hits both alike
        for name, prefix_tokens in modes.items():
            eng = engine(prefix_tokens)
            sec, trajs[name] = run_round(tasks, eng, chat, repairs)
            secs[name].append(sec)
            stats[name] = eng.stats()
            eng.close()
    rows = {}
    for name in modes:
        errors = [t.infra_error for t in trajs[name] if t.infra_error]
        assert not errors, errors[0]
        sec, st = float(np.median(secs[name])), stats[name]
        episode_tokens = sum(len(t.token_ids) for t in trajs[name])
        rows[name] = {"seconds": round(sec, 3), "episode_tokens": episode_tokens,
                      "episode_tokens_per_s": round(episode_tokens / sec, 1),
                      "sampled_tokens": sum(turn["end"] - turn["start"] for t in trajs[name] for turn in t.turns),
                      "engine_calls": st["requests"], "prompt_tokens": st["prompt_tokens"],
                      "prefill_tokens": st["prefill_tokens"], "prefix_hits": st["prefix_hits"]}
    same = sum(a.token_ids == b.token_ids for a, b in zip(trajs["reprefill"], trajs["prefix_cache"]))
    return {
        "speedup_vs_reprefill": round(rows["prefix_cache"]["episode_tokens_per_s"]
                                      / rows["reprefill"]["episode_tokens_per_s"], 3),
        **rows,
        "trajectories_identical": same,
        "compiles_in_timed_rounds": _compiles() - compiles,
        "compiles_in_untimed_rounds": compiles - warmup_compiles,
        "warmup": {"seconds": round(warmup_s, 1), "buckets": buckets, "compiles": warmup_compiles},
        "config": {"model": "tiny", **{k: getattr(cfg, k) for k in ("vocab_size", "hidden_size", "num_layers")},
                   "episodes": n, "max_repairs": repairs, "timed_rounds": rounds, "prompt_style": "recipe",
                   "domain": "mock",
                   "max_new_tokens": MAX_NEW_TOKENS, "temperature": 1.0, "prefix_cache_tokens": PREFIX_CACHE_TOKENS,
                   "size": size, "jax_backend": jax.default_backend(), "cpu_threads": threads,
                   "load_average_1m": round(os.getloadavg()[0], 2)},
    }


class _Serving:
    """An episode's engine that is the serving path: each prompt submitted to the server's
    Batcher and awaited, as a /generate handler does; max_new_tokens set per (episode, turn) from
    TURN_BUDGETS (the episode is named by its seed)."""

    def __init__(self, engine):
        import collections
        import threading

        from tau2jax.inference.server import Batcher

        self.engine, self.batcher = engine, Batcher(engine)  # the Server's defaults: 32 a batch, 5 ms window
        self._turns, self._lock = collections.Counter(), threading.Lock()

    @property
    def policy_version(self) -> int:
        return self.engine.policy_version

    def generate(self, input_ids, params):
        import dataclasses

        with self._lock:
            turn = self._turns[params.seed]
            self._turns[params.seed] += 1
        budget = TURN_BUDGETS[(params.seed * 7 + turn * 3) % len(TURN_BUDGETS)]
        p = dataclasses.replace(params, max_new_tokens=budget)
        return [f.result() for f in [self.batcher.submit(list(ids), p) for ids in input_ids]]

    def close(self) -> None:
        self.batcher.close()
        self.engine.close()


def run_pool(tasks, engine, chat, repairs: int, episodes: int, temperature: float) -> tuple[float, list]:
    from tau2jax.env.episode import run_episode
    from tau2jax.env.scripted_user import ScriptedUser
    from tau2jax.inference.engine import SamplingParams

    def episode(i):
        task = tasks[i % len(tasks)]
        return run_episode(task, "mock", engine=engine, user=ScriptedUser(task), chat=chat, style="recipe",
                           sampling=SamplingParams(temperature=temperature, max_new_tokens=MAX_NEW_TOKENS, seed=i),
                           max_repairs=repairs, max_errors=repairs + 2, sample_index=i)

    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(CONCURRENCY) as pool:
        trajs = list(pool.map(episode, range(episodes)))
    return time.perf_counter() - t0, trajs


def _progress(what: str, t0: list = [time.perf_counter()]) -> None:
    print(f"[{time.perf_counter() - t0[0]:7.1f}s] {what}", file=sys.stderr, flush=True)


def run_compare(size: str, threads: int) -> dict:
    import jax

    from tau2jax.data.chat import ChatFormat
    from tau2jax.data.tokenizer import load_tokenizer
    from tau2jax.env import tau2_env
    from tau2jax.inference.jax_engine import JaxEngine
    from tau2jax.models import qwen3
    from tau2jax.models.configs import get_model_config

    spec = COMPARE_SIZES[size]
    n, repairs, rounds = spec["episodes"], spec["repairs"], spec["rounds"]
    tok = load_tokenizer("")
    chat = ChatFormat(tok)
    cfg = get_model_config("tiny")
    params = qwen3.init_params(cfg, jax.random.key(0))
    tasks = tau2_env.load_tasks("mock")
    max_seq_len = 2048  # the mock episodes' ~1.5K-token conversations fit

    def engine(scheduler):
        return _Serving(JaxEngine(params, cfg, tokenizer=tok, max_seq_len=max_seq_len, max_batch=CONCURRENCY,
                                  decode_chunk=DECODE_CHUNK, prefix_cache_tokens=PREFIX_CACHE_TOKENS, seed=0, scheduler=scheduler))

    modes = ("static", "continuous")
    _count_compiles()
    t0 = time.perf_counter()
    buckets = 0
    for name in modes:
        eng = engine(name)
        buckets = eng.engine.warmup()
        eng.close()
        _progress(f"warmed up {name}")
    warmup_s, warmup_compiles = time.perf_counter() - t0, _compiles()
    for name in modes:
        eng = engine(name)
        _progress(f"untimed round {name}: {run_pool(tasks, eng, chat, repairs, n, 1.0)[0]:.1f}s")
        eng.close()
    compiles = _compiles()
    secs, trajs, stats = {name: [] for name in modes}, {}, {}
    for _ in range(rounds):
        for name in modes:
            eng = engine(name)
            sec, trajs[name] = run_pool(tasks, eng, chat, repairs, n, 1.0)
            secs[name].append(sec)
            _progress(f"timed round {name}: {sec:.1f}s")
            stats[name] = eng.engine.stats()
            eng.close()
    timed_compiles = _compiles() - compiles
    greedy = {}
    for name in modes:
        eng = engine(name)
        greedy[name] = run_pool(tasks, eng, chat, repairs, n, 0.0)[1]
        eng.close()
        _progress(f"greedy round {name}")
    rows = {}
    for name in modes:
        errors = [t.infra_error for t in trajs[name] + greedy[name] if t.infra_error]
        assert not errors, errors[0]
        sec, st = float(np.median(secs[name])), stats[name]
        episode_tokens = sum(len(t.token_ids) for t in trajs[name])
        rows[name] = {"seconds": round(sec, 3), "rounds_s": [round(x, 3) for x in secs[name]],
                      "episode_tokens": episode_tokens, "episode_tokens_per_s": round(episode_tokens / sec, 1),
                      "sampled_tokens": sum(turn["end"] - turn["start"] for t in trajs[name] for turn in t.turns),
                      "engine_calls": st["requests"], "prompt_tokens": st["prompt_tokens"],
                      "prefill_tokens": st["prefill_tokens"], "prefix_hits": st["prefix_hits"]}
    same = sum(a.token_ids == b.token_ids for a, b in zip(greedy["static"], greedy["continuous"]))
    sampled_same = sum(a.token_ids == b.token_ids for a, b in zip(trajs["static"], trajs["continuous"]))
    return {
        "continuous_vs_static": round(rows["continuous"]["episode_tokens_per_s"]
                                      / rows["static"]["episode_tokens_per_s"], 3),
        "greedy_identical_frac": round(same / n, 3),
        "sampled_identical_frac": round(sampled_same / n, 3),
        "compiles_in_timed_rounds": timed_compiles,
        "compiles_in_untimed_rounds": _compiles() - warmup_compiles - timed_compiles,
        "concurrency": CONCURRENCY,
        **rows,
        "warmup": {"seconds": round(warmup_s, 1), "buckets": buckets, "compiles": warmup_compiles},
        "config": {"model": "tiny", **{k: getattr(cfg, k) for k in ("vocab_size", "hidden_size", "num_layers")},
                   "episodes": n, "concurrency": CONCURRENCY, "max_repairs": repairs, "timed_rounds": rounds,
                   "prompt_style": "recipe", "domain": "mock", "turn_budgets": list(TURN_BUDGETS),
                   "temperature": 1.0, "max_seq_len": max_seq_len, "max_batch": CONCURRENCY,
                   "decode_chunk": DECODE_CHUNK,
                   "prefix_cache_tokens": PREFIX_CACHE_TOKENS, "serving_path": "server.Batcher (defaults)",
                   "size": size, "jax_backend": jax.default_backend(), "cpu_threads": threads,
                   "load_average_1m": round(os.getloadavg()[0], 2)},
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer episodes and repair turns")
    common.add_threads_arg(p)
    p.add_argument("--compare-batching", action="store_true",
                   help="the static vs the continuous scheduler on the serving path (see above)")
    p.add_argument("--out", default=None, help="default: benchmarks/results/rollout.json "
                                                "(--compare-batching: rollout_batching.json)")
    args = p.parse_args(argv)
    common.pin_threads(p, args.threads)
    if args.compare_batching:
        result = run_compare("quick" if args.quick else "full", args.threads)
        c = result["config"]
        print(f"tau2 mock rollouts on the serving path: {c['episodes']} episodes, {c['concurrency']} at a time, "
              f"x {c['max_repairs'] + 1} engine calls, turn budgets {c['turn_budgets']}, tiny random Qwen3, T=1, "
              f"{c['cpu_threads']} CPU thread(s), median of {c['timed_rounds']} timed round(s)")
        print(f"{'scheduler':<14}{'s':>8}{'episode tok/s':>15}{'calls':>7}{'prefilled':>11}{'hits':>6}")
        for name in ("static", "continuous"):
            r = result[name]
            print(f"{name:<14}{r['seconds']:>8.2f}{r['episode_tokens_per_s']:>15.0f}{r['engine_calls']:>7}"
                  f"{r['prefill_tokens']:>11}{r['prefix_hits']:>6}")
        print(f"continuous vs static: {result['continuous_vs_static']:.2f}x; greedy identical "
              f"{result['greedy_identical_frac']}; compiles in timed rounds {result['compiles_in_timed_rounds']}")
        common.write_result(result, args.out or common.result_path("rollout_batching.json"))
        return 0
    args.out = args.out or common.result_path("rollout.json")
    result = run("quick" if args.quick else "full", args.threads)
    c = result["config"]
    print(f"tau2 mock rollouts: {c['episodes']} concurrent episodes x {c['max_repairs'] + 1} engine calls, tiny "
          f"random Qwen3 (vocab {c['vocab_size']}), T=1, {c['max_new_tokens']} new tokens a turn, "
          f"{c['cpu_threads']} CPU thread(s), median of {c['timed_rounds']} timed rounds")
    print(f"{'engine':<28}{'s':>8}{'episode tok/s':>15}{'prompt tok':>12}{'prefilled':>11}{'hits':>6}")
    for name in ("reprefill", "prefix_cache"):
        r = result[name]
        print(f"{name:<28}{r['seconds']:>8.2f}{r['episode_tokens_per_s']:>15.0f}{r['prompt_tokens']:>12}"
              f"{r['prefill_tokens']:>11}{r['prefix_hits']:>6}")
    print(f"speedup vs re-prefill: {result['speedup_vs_reprefill']:.2f}x; identical trajectories: "
          f"{result['trajectories_identical']}/{c['episodes']}")
    common.write_result(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
