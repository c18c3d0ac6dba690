"""Logit parity of our Qwen3 forward against transformers (the numerical reference).

    python -m checkpoints_tools.parity --hf-dir /models/Qwen3-4B-Instruct-2507 [--orbax-dir OUT]
    python -m checkpoints_tools.parity --random-tiny [--dtype float32|bfloat16] [--tokens N]

The comparison itself is the library's `tau2jax.weights.parity.compare`. Both models run on the
same random token ids. Without --orbax-dir the HF dir is converted into a temp dir first (so this
also checks the conversion, `tau2jax.weights.convert`). The last stdout line is one JSON object:
max_abs_logit_diff, mean_abs_logit_diff, greedy_match (fraction of positions whose argmax agrees),
dtype, num_tokens, ..., "ok" and, when not ok, "failed" (the metrics outside their tolerance).

Exit status: 0 when max_abs_logit_diff <= --max-diff and greedy_match >= --min-greedy-match, 1
otherwise (one stderr line naming each metric outside its tolerance), 2 for weights that cannot be
read. Default tolerances per dtype (`TOLERANCES`): float32 1e-4 and 1.0 (what the tests hold a
tiny random Qwen3 to); bfloat16 1.0 and 0.9 (its 8-bit mantissa rounds logits of O(10) by ~0.1;
the tiny one scores 0.05 and 0.97, near-ties flip). Wrong weights score far outside either (greedy match ~0.1, diffs of several
logits).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

from tau2jax import cli
from tau2jax.models.tiny_hf import make_tiny_hf_dir
from tau2jax.weights import hf_read, orbax_params
from tau2jax.weights.parity import compare


# dtype -> (max |logit diff|, min greedy match) a correct conversion stays within
TOLERANCES = {"float32": (1e-4, 1.0), "bfloat16": (1.0, 0.9)}


def failures(result: dict, max_diff: float, min_greedy_match: float) -> list[str]:
    """One line per metric of `result` outside its tolerance (empty: parity holds)."""
    out = []
    if not result["max_abs_logit_diff"] <= max_diff:  # NaN fails too
        out.append(f"max_abs_logit_diff {result['max_abs_logit_diff']:.4g} is above the tolerance {max_diff:g} "
                   "(--max-diff)")
    if not result["greedy_match"] >= min_greedy_match:
        out.append(f"greedy_match {result['greedy_match']:.4f} is below the tolerance {min_greedy_match:g} "
                   "(--min-greedy-match)")
    return out


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
    p.add_argument("--max-diff", type=float, default=None,
                   help="largest max |logit diff| that passes (default: float32 1e-4, bfloat16 1.0)")
    p.add_argument("--min-greedy-match", type=float, default=None,
                   help="smallest greedy match that passes (default: float32 1.0, bfloat16 0.9)")
    args = p.parse_args(argv)
    if args.orbax_dir and args.random_tiny:
        p.error("--orbax-dir needs --hf-dir")
    max_diff, min_greedy = TOLERANCES[args.dtype]
    max_diff = max_diff if args.max_diff is None else args.max_diff
    min_greedy = min_greedy if args.min_greedy_match is None else args.min_greedy_match

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
        return cli.bad_input(e)
    failed = failures(result, max_diff, min_greedy)
    result.update(ok=not failed, max_diff_tolerance=max_diff, min_greedy_match_tolerance=min_greedy)
    if failed:
        result["failed"] = failed
    print(f"max |logit diff| {result['max_abs_logit_diff']:.3g} (max |logit| "
          f"{result['max_abs_logit']:.3g}), greedy match {result['greedy_match']:.4f}")
    print(json.dumps(result))
    if failed:
        print(f"error: parity fails: {'; '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
