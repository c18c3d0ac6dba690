"""HF Qwen3 checkpoint (config.json + safetensors) -> tau2jax Orbax weights: `convert`, the library
side of the `python -m checkpoints_tools.hf_to_orbax` CLI (the demo, the rehearsal, benchmarks and
tests call it directly).

Everything is validated from the safetensors headers before any weight is read (each error names
the tensor and file). Weights then stream one tensor at a time into preallocated stacked [L, ...]
arrays: one copy of the model in the target dtype (plus one tensor). Orbax then copies every array
to host before writing, so the peak is about two copies (a 2 GiB float32 model peaks at 4.2 GiB
RSS). Output is written to a temp dir next to `out` and renamed, so a failed run leaves nothing at
`out`.
"""

from __future__ import annotations

import os
import resource
import shutil
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
        os.chmod(tmp, 0o755)  # mkdtemp's 0700; the files inside are 0644: as every other export (hf_write)
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
