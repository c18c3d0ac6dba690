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
import sys
import time

import numpy as np

import common  # benchmarks/common.py; also puts the repo root on sys.path

SIZES = {
    "full": dict(model=common.MODELS["full"], batch=8, prompt_len=64, new_tokens=128),
    "quick": dict(model=common.MODELS["quick"], batch=8, prompt_len=32, new_tokens=32),
}


def run(size: str, threads: int, decode_chunk: int) -> dict:
    import torch

    from tau2jax.inference.engine import SamplingParams
    from tau2jax.inference.jax_engine import JaxEngine

    torch.set_num_threads(threads)
    spec = SIZES[size]
    b, p, n = spec["batch"], spec["prompt_len"], spec["new_tokens"]
    with common.tiny_hf_dir(spec["model"]) as hf_dir:
        # The KV cache is exactly prompt + new tokens long, as transformers' cache ends up.
        engine = JaxEngine.from_hf_dir(hf_dir, max_seq_len=p + n, max_batch=b, decode_chunk=decode_chunk)
        model = common.load_hf(hf_dir).eval()

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
                   "dtype": "float32", "size": size, **common.machine_config(model, threads)},
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smaller model, fewer tokens")
    p.add_argument("--decode-chunk", type=int, default=16, help="engine decode steps per dispatch")
    common.add_threads_arg(p)
    p.add_argument("--out", default=common.result_path("decode.json"))
    args = p.parse_args(argv)
    common.pin_threads(p, args.threads)
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
    common.write_result(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
