"""Convert a local HF Qwen3 checkpoint (config.json + safetensors) to tau2jax Orbax weights.

    python -m checkpoints_tools.hf_to_orbax --hf-dir /models/Qwen3-4B-Instruct-2507 \
        --out /ckpt/qwen3_4b [--dtype float32|bfloat16]

Everything is validated from the safetensors headers before any weight is read (each error names
the tensor and file). Weights then stream one tensor at a time into preallocated stacked [L, ...]
arrays: one copy of the model in the target dtype (plus one tensor). Orbax then copies every array
to host before writing, so the peak is about two copies (a 2 GiB float32 model peaks at 4.2 GiB
RSS). Output is written to a temp dir next to --out and renamed, so a failed run leaves nothing at
--out. The last stdout line is JSON with sizes, peak RSS and time.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time

import jax
import psutil

from tau2jax.weights import mapping, orbax_params
from tau2jax.weights.hf_read import EXTRA_FILES, HF_EXTRA_DIR, ConversionError, load_hf_params


def convert(hf_dir: str, out: str, dtype: str = "float32") -> dict:
    """Converts `hf_dir` into a new directory `out`; returns stats (sizes, peak RSS, time)."""
    t0 = time.perf_counter()
    rss0 = psutil.Process().memory_info().rss
    hf_dir, out = os.path.abspath(hf_dir), os.path.abspath(out)
    target = mapping.np_dtype(dtype)
    if os.path.exists(out):
        raise ConversionError(f"--out {out} already exists; remove it or pick a new path")
    params, cfg = load_hf_params(hf_dir, target)
    params = _to_cpu_jax(params)

    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(out) + ".tmp-", dir=os.path.dirname(out))
    try:
        orbax_params.save_params(tmp, params, cfg)
        extras = [f for f in EXTRA_FILES if os.path.isfile(os.path.join(hf_dir, f))]
        if extras:
            os.makedirs(os.path.join(tmp, HF_EXTRA_DIR))
            for name in extras:
                shutil.copy2(os.path.join(hf_dir, name), os.path.join(tmp, HF_EXTRA_DIR, name))
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    param_bytes = sum(a.nbytes for a in _leaves(params))
    return {
        "out": out, "dtype": target.name, "num_params": len(jax.tree.leaves(params)),
        "param_mb": round(param_bytes / 2**20, 1),
        "rss_before_mb": round(rss0 / 2**20, 1),
        # ru_maxrss is in KiB on Linux: the process's high-water mark, imports included.
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10, 1),
        "seconds": round(time.perf_counter() - t0, 2),
    }

def _to_cpu_jax(tree: dict) -> dict:
    """numpy -> CPU jax arrays (zero-copy when aligned), leaf by leaf so at most one leaf is ever
    duplicated. Orbax copies each array to host before writing: from a jax array that is one
    extra copy of the model; from numpy it keeps more (measured ~1.4 copies)."""
    cpu = jax.local_devices(backend="cpu")[0]
    out = {}
    for key in list(tree):
        value = tree.pop(key)  # drop the numpy reference before converting the next leaf
        out[key] = _to_cpu_jax(value) if isinstance(value, dict) else jax.device_put(value, cpu)
    return out


def _leaves(tree):
    for v in tree.values():
        yield from (_leaves(v) if isinstance(v, dict) else (v,))


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
        print("error: " + " ".join(str(e).split()), file=sys.stderr)
        return 2
    print(f"wrote {stats['out']} ({stats['param_mb']} MiB {stats['dtype']}, "
          f"{stats['num_params']} stacked arrays) in {stats['seconds']} s; "
          f"peak RSS {stats['peak_rss_mb']} MiB (before loading: {stats['rss_before_mb']} MiB)")
    print(json.dumps(stats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
