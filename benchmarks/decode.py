"""Generation throughput: the built-in JAX engine vs transformers `generate` on the same weights.

    python benchmarks/decode.py [--quick]     # ~1 min on 2 CPU cores; --quick ~20 s

Both run float32 greedy decoding with a KV cache (transformers: use_cache=True) on --threads CPU
cores (default 1), for the same batch of random prompts (all the same length, so neither side
pads) and the same number of new tokens (no stop token: every row generates all of them).
Warm-up (JAX compile, torch first call) is excluded; then one timed run each. Tokens/s counts
generated tokens over the whole call (prefill included, as a caller sees it). Prints a table and,
as the last line, a JSON object that is also written to benchmarks/results/decode.json.
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
    "full": dict(model=dict(vocab_size=4096, hidden_size=256, intermediate_size=768, num_layers=4,
                            num_heads=4, num_kv_heads=2, head_dim=64), batch=8, prompt_len=64, new_tokens=128),
    "quick": dict(model=dict(vocab_size=2048, hidden_size=128, intermediate_size=384, num_layers=2,
                             num_heads=4, num_kv_heads=2, head_dim=32), batch=8, prompt_len=32, new_tokens=32),
}


def run(size: str, threads: int, decode_chunk: int) -> dict:
    import torch
    import transformers

    from checkpoints_tools.tiny_hf import make_tiny_hf_dir
    from tau2jax.rollout.engine import SamplingParams
    from tau2jax.rollout.jax_engine import JaxEngine

    torch.set_num_threads(threads)
    spec = SIZES[size]
    b, p, n = spec["batch"], spec["prompt_len"], spec["new_tokens"]
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = make_tiny_hf_dir(os.path.join(tmp, "hf"), tied=True, **spec["model"])
        # The KV cache is exactly prompt + new tokens long, as transformers' cache ends up.
        engine = JaxEngine.from_hf_dir(hf_dir, max_seq_len=p + n, max_batch=b, decode_chunk=decode_chunk)
        model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()

    prompts = np.random.default_rng(0).integers(0, engine.cfg.vocab_size, (b, p))
    greedy = SamplingParams(temperature=0.0, max_new_tokens=n)
    torch_prompts = torch.from_numpy(prompts)

    def jax_generate():
        return [r.output_ids for r in engine.generate(prompts.tolist(), greedy)]

    def hf_generate():
        with torch.no_grad():
            out = model.generate(torch_prompts, attention_mask=torch.ones_like(torch_prompts), do_sample=False,
                                 max_new_tokens=n, min_new_tokens=n, use_cache=True, pad_token_id=0)
        return out[:, p:].tolist()

    sec, outputs = {}, {}
    for name, fn in (("jax", jax_generate), ("hf", hf_generate)):
        fn()  # warm-up
        t0 = time.perf_counter()
        outputs[name] = fn()
        sec[name] = time.perf_counter() - t0
    engine.close()
    assert all(len(o) == n for o in outputs["jax"]), "the engine stopped early"
    return {
        "engine_tokens_per_s": round(b * n / sec["jax"], 1),
        "hf_tokens_per_s": round(b * n / sec["hf"], 1),
        "speedup_vs_hf": round(sec["hf"] / sec["jax"], 3),
        # fp32 on both sides: the greedy tokens should agree (a near-tie could flip one late token)
        "rows_identical": sum(a == h for a, h in zip(outputs["jax"], outputs["hf"])),
        "config": {**spec["model"], "batch": b, "prompt_len": p, "new_tokens": n, "decode_chunk": decode_chunk,
                   "dtype": "float32", "size": size, "jax_backend": __import__("jax").default_backend(),
                   "cpu_threads": threads, "hf_attn": model.config._attn_implementation,
                   "cpu_count": os.cpu_count(), "machine": platform.machine()},
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smaller model, fewer tokens")
    p.add_argument("--decode-chunk", type=int, default=16, help="engine decode steps per dispatch")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU cores for both frameworks (process affinity + torch threads). 1 by "
                        "default: on a shared machine torch's OpenMP threads degrade several-fold "
                        "under contention, which would inflate the speedup")
    p.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "decode.json"))
    args = p.parse_args(argv)
    cores = sorted(os.sched_getaffinity(0))
    if not 1 <= args.threads <= len(cores):
        p.error(f"--threads must be in 1..{len(cores)}")
    os.sched_setaffinity(0, cores[:args.threads])  # before JAX/torch create their thread pools
    result = run("quick" if args.quick else "full", args.threads, args.decode_chunk)
    c = result["config"]
    print(f"Qwen3 greedy generation, hidden {c['hidden_size']}, {c['num_layers']} layers, vocab {c['vocab_size']}, "
          f"batch {c['batch']}, prompt {c['prompt_len']} + {c['new_tokens']} new tokens, float32, "
          f"{c['cpu_threads']} CPU thread(s), one timed run after warm-up")
    print(f"{'impl':<40}{'tokens/s':>12}")
    print(f"{'tau2jax JaxEngine (' + c['jax_backend'] + ')':<40}{result['engine_tokens_per_s']:>12.0f}")
    print(f"{'transformers generate (torch, use_cache)':<40}{result['hf_tokens_per_s']:>12.0f}")
    print(f"speedup vs transformers: {result['speedup_vs_hf']:.2f}x; "
          f"identical greedy rows: {result['rows_identical']}/{c['batch']}")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
