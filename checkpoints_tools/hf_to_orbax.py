"""Convert a local HF Qwen3 checkpoint (config.json + safetensors) to tau2jax Orbax weights.

    python -m checkpoints_tools.hf_to_orbax --hf-dir /models/Qwen3-4B-Instruct-2507 \
        --out /ckpt/qwen3_4b [--dtype float32|bfloat16]

The conversion itself is the library's `tau2jax.weights.convert.convert` (validated from the
safetensors headers before any weight is read; peak about two copies of the model in host memory;
written to a temp dir and renamed, so a failed run leaves nothing at --out). The last stdout line
is JSON with sizes, peak RSS and time.
"""

from __future__ import annotations

import argparse
import json
import sys

import jax

from tau2jax import cli
from tau2jax.weights import orbax_params
from tau2jax.weights.convert import convert
from tau2jax.weights.hf_read import ConversionError


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m checkpoints_tools.hf_to_orbax", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf-dir", required=True, help="local HF model dir (config.json + *.safetensors)")
    p.add_argument("--out", required=True, help="new directory for the Orbax weights")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="stored dtype (float32: master weights for training)")
    args = p.parse_args(argv)
    jax.config.update("jax_platforms", "cpu")  # host-side conversion: keep accelerators free
    print(f"converting {args.hf_dir} -> {args.out} ({args.dtype}) ...", file=sys.stderr, flush=True)
    try:
        stats = convert(args.hf_dir, args.out, args.dtype)
    except (ConversionError, orbax_params.CheckpointFormatError) as e:
        return cli.bad_input(e)
    print(f"wrote {stats['out']} ({stats['param_mb']} MiB {stats['dtype']}, "
          f"{stats['num_params']} stacked arrays) in {stats['seconds']} s; "
          f"peak RSS {stats['peak_rss_mb']} MiB (before loading: {stats['rss_before_mb']} MiB)")
    print(json.dumps(stats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
