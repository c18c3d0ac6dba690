"""Forward-pass throughput: our jitted JAX Qwen3 vs transformers (torch, no_grad) on the same weights.

    python benchmarks/forward.py [--quick]     # ~1 min on 2 CPU cores; --quick ~15 s

Both run float32 on --threads CPU cores (default 1), on the same random tokens and identical
weights (a random HF Qwen3 converted with hf_to_orbax), full logits [B, T, V] out. Warm-up (JAX compile, torch first call) is excluded;
then --iters passes of each, alternating, and tokens/s from the median pass. Prints a table and,
as the last line, a JSON object that is also written to benchmarks/results/forward.json.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

import common  # benchmarks/common.py; also puts the repo root on sys.path


def run(size: str, iters: int, threads: int) -> dict:
    import jax
    import torch

    from tau2jax.models import qwen3

    torch.set_num_threads(threads)
    spec = common.SIZES[size]
    b, t = spec["batch"], spec["seq_len"]
    params, cfg, model = common.tiny_qwen3(spec["model"])
    model.eval()

    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (b, t), dtype=np.int32)
    positions = np.broadcast_to(np.arange(t, dtype=np.int32), (b, t))
    segment_ids = np.ones_like(tokens)
    fwd = jax.jit(lambda p, x, pos, seg: qwen3.forward(p, cfg, x, pos, seg))
    torch_tokens = torch.from_numpy(tokens.astype(np.int64))

    def hf_forward():
        with torch.no_grad():
            return model(input_ids=torch_tokens).logits

    _, sec = common.interleaved({"jax": lambda: fwd(params, tokens, positions, segment_ids).block_until_ready(),
                                 "hf": hf_forward}, iters)
    n = b * t
    return {
        "jax_tokens_per_s": round(n / sec["jax"], 1),
        "hf_tokens_per_s": round(n / sec["hf"], 1),
        "speedup_vs_hf": round(sec["hf"] / sec["jax"], 3),
        "config": {**spec["model"], "batch": b, "seq_len": t, "iters": iters, "dtype": "float32",
                   "size": size, **common.machine_config(model, threads)},
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smaller model and batch")
    p.add_argument("--iters", type=int, default=5, help="timed forward passes per framework (median is reported)")
    common.add_threads_arg(p)
    p.add_argument("--out", default=common.result_path("forward.json"))
    args = p.parse_args(argv)
    common.pin_threads(p, args.threads)
    result = run("quick" if args.quick else "full", args.iters, args.threads)
    c = result["config"]
    print(f"Qwen3 forward, hidden {c['hidden_size']}, {c['num_layers']} layers, vocab {c['vocab_size']}, "
          f"batch {c['batch']} x seq {c['seq_len']}, float32, {c['cpu_threads']} CPU thread(s), "
          f"median of {c['iters']} iters")
    print(f"{'impl':<30}{'tokens/s':>12}")
    print(f"{'tau2jax (jax.jit, ' + c['jax_backend'] + ')':<30}{result['jax_tokens_per_s']:>12.0f}")
    print(f"{'transformers (torch, no_grad)':<30}{result['hf_tokens_per_s']:>12.0f}")
    print(f"speedup vs transformers: {result['speedup_vs_hf']:.2f}x")
    common.write_result(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
