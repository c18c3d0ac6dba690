"""Forward-pass throughput: our jitted JAX Qwen3 vs transformers (torch, no_grad) on the same weights.

    python benchmarks/forward.py [--quick]     # ~1 min on 2 CPU cores; --quick ~15 s

Both run float32 on --threads CPU cores (default 1), on the same random tokens and identical
weights (a random HF Qwen3 converted with hf_to_orbax), full logits [B, T, V] out. Warm-up (JAX compile, torch first call) is excluded;
then --iters passes of each, alternating, and tokens/s from the median pass. Prints a table and,
as the last line, a JSON object that is also written to benchmarks/results/forward.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # runnable as a script without installing the package

import numpy as np  # noqa: E402

SIZES = {
    # Big enough that matmuls, not dispatch, dominate on CPU.
    "full": dict(model=dict(vocab_size=4096, hidden_size=256, intermediate_size=768, num_layers=4,
                            num_heads=4, num_kv_heads=2, head_dim=64), batch=4, seq_len=256),
    "quick": dict(model=dict(vocab_size=2048, hidden_size=128, intermediate_size=384, num_layers=2,
                             num_heads=4, num_kv_heads=2, head_dim=32), batch=2, seq_len=128),
}


def _interleaved(fns: dict, iters: int) -> dict[str, float]:
    """Median seconds per call of each fn. Calls alternate between the fns so that load from
    other processes on a shared machine hits both alike; the median drops outlier iterations."""
    for fn in fns.values():
        fn()  # warm-up: JAX compile, torch first-call allocations
    times = {name: [] for name in fns}
    for _ in range(iters):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: float(np.median(ts)) for name, ts in times.items()}


def run(size: str, iters: int, threads: int) -> dict:
    import jax
    import torch
    import transformers

    from checkpoints_tools import hf_to_orbax, orbax_io
    from checkpoints_tools.tiny_hf import make_tiny_hf_dir
    from tau2jax.models import qwen3

    torch.set_num_threads(threads)
    spec = SIZES[size]
    b, t = spec["batch"], spec["seq_len"]
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = make_tiny_hf_dir(os.path.join(tmp, "hf"), tied=True, **spec["model"])
        hf_to_orbax.convert(hf_dir, os.path.join(tmp, "orbax"))
        params, cfg = orbax_io.restore_params(os.path.join(tmp, "orbax"))
        model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()

    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (b, t), dtype=np.int32)
    positions = np.broadcast_to(np.arange(t, dtype=np.int32), (b, t))
    segment_ids = np.ones_like(tokens)
    fwd = jax.jit(lambda p, x, pos, seg: qwen3.forward(p, cfg, x, pos, seg))
    torch_tokens = torch.from_numpy(tokens.astype(np.int64))

    def hf_forward():
        with torch.no_grad():
            return model(input_ids=torch_tokens).logits

    sec = _interleaved({"jax": lambda: fwd(params, tokens, positions, segment_ids).block_until_ready(),
                        "hf": hf_forward}, iters)
    n = b * t
    return {
        "jax_tokens_per_s": round(n / sec["jax"], 1),
        "hf_tokens_per_s": round(n / sec["hf"], 1),
        "speedup_vs_hf": round(sec["hf"] / sec["jax"], 3),
        "config": {**spec["model"], "batch": b, "seq_len": t, "iters": iters, "dtype": "float32",
                   "size": size, "jax_backend": jax.default_backend(),
                   "cpu_threads": threads, "hf_attn": model.config._attn_implementation,
                   "cpu_count": os.cpu_count(), "machine": platform.machine()},
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smaller model and batch")
    p.add_argument("--iters", type=int, default=5, help="timed forward passes per framework (median is reported)")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU cores for both frameworks (process affinity + torch threads). 1 by "
                        "default: on a shared machine torch's OpenMP threads degrade several-fold "
                        "under contention, which would inflate the speedup")
    p.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "forward.json"))
    args = p.parse_args(argv)
    cores = sorted(os.sched_getaffinity(0))
    if not 1 <= args.threads <= len(cores):
        p.error(f"--threads must be in 1..{len(cores)}")
    os.sched_setaffinity(0, cores[:args.threads])  # before JAX/torch create their thread pools
    result = run("quick" if args.quick else "full", args.iters, args.threads)
    c = result["config"]
    print(f"Qwen3 forward, hidden {c['hidden_size']}, {c['num_layers']} layers, vocab {c['vocab_size']}, "
          f"batch {c['batch']} x seq {c['seq_len']}, float32, {c['cpu_threads']} CPU thread(s), "
          f"median of {c['iters']} iters")
    print(f"{'impl':<30}{'tokens/s':>12}")
    print(f"{'tau2jax (jax.jit, ' + c['jax_backend'] + ')':<30}{result['jax_tokens_per_s']:>12.0f}")
    print(f"{'transformers (torch, no_grad)':<30}{result['hf_tokens_per_s']:>12.0f}")
    print(f"speedup vs transformers: {result['speedup_vs_hf']:.2f}x")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
