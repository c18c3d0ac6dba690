"""Export tau2jax weights as a HF Qwen3 directory (sharded safetensors + index + config.json +
generation_config.json) that transformers' AutoModelForCausalLM.from_pretrained and SGLang load.

    python -m checkpoints_tools.orbax_to_hf --orbax-dir /ckpt/qwen3_4b --out /models/qwen3_4b_sft \
        [--dtype bfloat16] [--max-shard-size 2GB]

The writing itself is the library's `tau2jax.weights.hf_write.export_hf` (weight sync uses it too).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax

from tau2jax import cli
from tau2jax.weights import orbax_params
from tau2jax.weights.hf_read import HF_EXTRA_DIR
from tau2jax.weights.hf_write import export_hf, parse_size


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m checkpoints_tools.orbax_to_hf", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--orbax-dir", required=True, help="weights from hf_to_orbax / training export")
    p.add_argument("--out", required=True, help="new HF model directory")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                   help="dtype of the safetensors (default: as stored)")
    p.add_argument("--max-shard-size", default="2GB", help="per safetensors file (default 2GB)")
    args = p.parse_args(argv)
    jax.config.update("jax_platforms", "cpu")  # host-side conversion: keep accelerators free
    out = os.path.abspath(args.out)
    if os.path.exists(out):
        print(f"error: --out {out} already exists; remove it or pick a new path", file=sys.stderr)
        return 2
    try:
        parse_size(args.max_shard_size)
        params, cfg = orbax_params.restore_params(args.orbax_dir, dtype=args.dtype)
        orbax_params.check_finite(params, args.orbax_dir)
    except (ValueError, orbax_params.CheckpointFormatError) as e:
        return cli.bad_input(e)
    print(f"exporting {args.orbax_dir} -> {out} ...", file=sys.stderr, flush=True)
    export_hf(params, cfg, out, max_shard_size=args.max_shard_size,
              extra_dir=os.path.join(os.path.abspath(args.orbax_dir), HF_EXTRA_DIR))
    files = sorted(os.listdir(out))
    print(f"wrote {out}: {', '.join(files)}")
    print(json.dumps({"out": out, "files": files}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
