"""Logit parity of our Qwen3 forward against transformers (the numerical reference).

    python -m checkpoints_tools.parity --hf-dir /models/Qwen3-4B-Instruct-2507 [--orbax-dir OUT]
    python -m checkpoints_tools.parity --random-tiny [--dtype float32|bfloat16] [--tokens N]

The comparison itself is the library's `tau2jax.weights.parity.compare`. Both models run on the
same random token ids. Without --orbax-dir the HF dir is converted into a temp dir first (so this
also checks the conversion, `tau2jax.weights.convert`). The last stdout line is one JSON object:
max_abs_logit_diff, mean_abs_logit_diff, greedy_match (fraction of positions whose argmax agrees),
dtype, num_tokens, ...
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

from tau2jax.models.tiny_hf import make_tiny_hf_dir
from tau2jax.weights import hf_read, orbax_params
from tau2jax.weights.parity import compare


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m checkpoints_tools.parity", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--hf-dir", help="local HF Qwen3 model dir")
    src.add_argument("--random-tiny", action="store_true",
                     help="build a tiny random HF Qwen3 in a temp dir and compare against it")
    p.add_argument("--orbax-dir", help="our converted weights of --hf-dir (default: convert now)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--tokens", type=int, default=32, help="sequence length (batch of 2)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.orbax_dir and args.random_tiny:
        p.error("--orbax-dir needs --hf-dir")

    try:
        if args.random_tiny:
            with tempfile.TemporaryDirectory() as tmp:
                hf_dir = make_tiny_hf_dir(os.path.join(tmp, "hf"), seed=args.seed, dtype=args.dtype)
                result = compare(hf_dir, dtype=args.dtype, num_tokens=args.tokens, seed=args.seed)
            result["source"] = "random-tiny"
        else:
            result = compare(args.hf_dir, args.orbax_dir, dtype=args.dtype, num_tokens=args.tokens,
                             seed=args.seed)
            result["source"] = os.path.abspath(args.hf_dir)
    except (hf_read.ConversionError, orbax_params.CheckpointFormatError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"max |logit diff| {result['max_abs_logit_diff']:.3g} (max |logit| "
          f"{result['max_abs_logit']:.3g}), greedy match {result['greedy_match']:.4f}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
