"""What benchmarks/{forward,decode,train_step}.py share: model shapes, CPU pinning, the tiny random
checkpoint both frameworks load, the machine fields of the result, and writing the result.

Imported as `import common`: a script's own directory is first on sys.path.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # the scripts run without installing the package

# Tiny Qwen3 shapes, the same in every benchmark so that their results read side by side.
MODELS = {
    # Big enough that matmuls, not dispatch, dominate on CPU.
    "full": dict(vocab_size=4096, hidden_size=256, intermediate_size=768, num_layers=4,
                 num_heads=4, num_kv_heads=2, head_dim=64),
    "quick": dict(vocab_size=2048, hidden_size=128, intermediate_size=384, num_layers=2,
                  num_heads=4, num_kv_heads=2, head_dim=32),
}
# forward.py and train_step.py time the same B rows x T tokens, so their tokens/s compare.
SIZES = {
    "full": dict(model=MODELS["full"], batch=4, seq_len=256),
    "quick": dict(model=MODELS["quick"], batch=2, seq_len=128),
}


def result_path(name: str) -> str:
    """Default result file: benchmarks/results/<name>."""
    return os.path.join(REPO, "benchmarks", "results", name)


def add_threads_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, default=1,
                   help="CPU cores for both frameworks (process affinity + torch threads). 1 by "
                        "default: on a shared machine torch's OpenMP threads degrade several-fold "
                        "under contention, which would inflate the speedup")


def pin_threads(p: argparse.ArgumentParser, threads: int) -> None:
    """Restricts this process to the first `threads` allowed cores; call it before JAX or torch
    create their thread pools, so that those pools live on these cores only."""
    cores = sorted(os.sched_getaffinity(0))
    if not 1 <= threads <= len(cores):
        p.error(f"--threads must be in 1..{len(cores)}")
    os.sched_setaffinity(0, cores[:threads])


@contextlib.contextmanager
def tiny_hf_dir(model: dict):
    """A random HF Qwen3 checkpoint of shape `model` (tied embeddings) in a temporary directory,
    deleted on exit: both frameworks load their weights from it, so they compute the same model."""
    from tau2jax.models.tiny_hf import make_tiny_hf_dir

    with tempfile.TemporaryDirectory() as tmp:
        yield make_tiny_hf_dir(os.path.join(tmp, "hf"), tied=True, **model)


def load_hf(hf_dir: str):
    """The transformers model in float32 (the dtype our side runs in); the caller sets eval/train."""
    import torch
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)


def tiny_qwen3(model: dict):
    """(params, cfg, hf_model): our params, converted with tau2jax.weights.convert as a real checkpoint would
    be, and the transformers model, both from one random checkpoint of shape `model`."""
    from tau2jax.weights import orbax_params
    from tau2jax.weights.convert import convert

    with tiny_hf_dir(model) as hf_dir:
        orbax_dir = os.path.join(os.path.dirname(hf_dir), "orbax")
        convert(hf_dir, orbax_dir)
        params, cfg = orbax_params.restore_params(orbax_dir)
        return params, cfg, load_hf(hf_dir)


def interleaved(fns: dict, iters: int) -> tuple[dict, dict[str, float]]:
    """(first-call results, median seconds per later call) of each fn. The first call is the
    warm-up (JAX compile, torch first-call allocations); later calls alternate between the fns so
    that load from other processes on a shared machine hits both alike; the median drops outlier
    iterations."""
    first = {name: fn() for name, fn in fns.items()}
    times = {name: [] for name in fns}
    for _ in range(iters):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return first, {name: float(np.median(ts)) for name, ts in times.items()}


def machine_config(hf_model, threads: int | None = None) -> dict:
    """The result's "config" fields that say where and how it ran; cpu_threads only if given
    (train_step.py reports its threads at the top level)."""
    import jax

    return {"jax_backend": jax.default_backend(),
            **({} if threads is None else {"cpu_threads": threads}),
            "hf_attn": hf_model.config._attn_implementation,
            "cpu_count": os.cpu_count(), "machine": platform.machine()}


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages, rounded: the machine's load a result records."""
    return [round(v, 2) for v in os.getloadavg()]


def write_result(result: dict, out: str) -> None:
    """Writes `result` to `out` and prints it as one JSON line, the last line of the output, for
    whatever runs the benchmark to parse."""
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    print(json.dumps(result))
