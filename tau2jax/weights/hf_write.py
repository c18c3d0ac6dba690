"""Writing our params as a HF Qwen3 directory (sharded safetensors + index + config.json +
generation_config.json) that transformers' AutoModelForCausalLM.from_pretrained and SGLang load.

`export_hf` writes into a temp dir next to the target, fsyncs every file, then renames, so a reader
never sees a half-written directory. Peak host memory beyond the params is one stacked parameter
plus one shard. Used by the export CLI (`checkpoints_tools.orbax_to_hf`) and weight sync.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile

import jax
import numpy as np
from safetensors.numpy import save_file

from tau2jax.models.configs import to_hf_config
from tau2jax.weights import mapping, orbax_params
from tau2jax.weights.hf_read import INDEX_FILE

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9,  # as transformers: GB = 10^9
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def export_hf(params, cfg, out_dir: str, dtype: str | None = None, *, max_shard_size="2GB",
              extra_dir: str | None = None, overwrite: bool = False) -> str:
    """Writes `params` as a HF checkpoint at `out_dir`; `dtype` ("float32"/"bfloat16", None keeps
    each array's dtype). `extra_dir` holds files to carry over (the source config.json, tokenizer,
    generation_config.json). Arrays sharded across processes are gathered, so on multi-host every
    process must call this; only process 0 writes."""
    out_dir = os.path.abspath(out_dir)
    writer = jax.process_index() == 0
    if writer and os.path.exists(out_dir) and not overwrite:
        raise FileExistsError(f"{out_dir} already exists; remove it or pass overwrite=True")
    out_dtype = None if dtype is None else mapping.np_dtype(dtype)
    # Layer-major would interleave all stacked params; row-major keeps one on the host at a time.
    plan = [(name, row, layer) for name, (row, layer) in mapping.hf_tensors(cfg).items()]
    shards = _plan_shards(plan, params, cfg, out_dtype, parse_size(max_shard_size))

    tmp = None
    if writer:
        os.makedirs(os.path.dirname(out_dir), exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=os.path.basename(out_dir) + ".tmp-",
                               dir=os.path.dirname(out_dir))
    try:
        weight_map, total, cached = {}, 0, (None, None)
        for k, shard in enumerate(shards):
            fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
            tensors = {}
            for name, row, layer in shard:
                if cached[0] != row.ours:
                    cached = (row.ours, _to_host(mapping.get_path(params, row.ours)))
                value = cached[1] if layer is None else cached[1][layer]
                tensors[name] = np.ascontiguousarray(row.hook.to_hf(value), dtype=out_dtype)
                weight_map[name] = fname
                total += tensors[name].nbytes
            if writer:
                path = os.path.join(tmp, fname)
                save_file(tensors, path, metadata={"format": "pt"})  # transformers requires "pt"
                fsync(path)
        if writer:
            _write_metadata(tmp, cfg, weight_map, total, out_dtype or _dtype_of(params), extra_dir)
            fsync(tmp)
            _replace_dir(tmp, out_dir)
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(f"export_hf:{out_dir}")
    return out_dir


def _plan_shards(plan, params, cfg, out_dtype, max_bytes: int):
    """Greedy split of the tensor list into shards of at most max_bytes (a bigger tensor gets its
    own shard), as transformers does."""
    shards, current, size = [], [], 0
    for name, row, layer in plan:
        dt = out_dtype or mapping.get_path(params, row.ours).dtype
        n = mapping.num_bytes(mapping.hf_shape(row, cfg), dt)
        if current and size + n > max_bytes:
            shards.append(current)
            current, size = [], 0
        current.append((name, row, layer))
        size += n
    shards.append(current)
    return shards


def _write_metadata(tmp, cfg, weight_map, total, dtype, extra_dir):
    extra = {}
    if extra_dir and os.path.isdir(extra_dir):
        extra = {n: os.path.join(extra_dir, n) for n in os.listdir(extra_dir)
                 if not n.endswith(".safetensors") and n != INDEX_FILE}  # weights are ours
    # Start from the source config.json (keeps token ids, rope scaling, ...); model fields win.
    hf = {}
    if "config.json" in extra:
        with open(extra.pop("config.json")) as f:
            hf = json.load(f)
    hf.update(to_hf_config(cfg, dtype=np.dtype(dtype).name))
    orbax_params.write_json_atomic(os.path.join(tmp, "config.json"), hf)
    if "generation_config.json" not in extra:
        gen = {k: hf[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")
               if hf.get(k) is not None}
        orbax_params.write_json_atomic(os.path.join(tmp, "generation_config.json"), gen)
    for name, src in extra.items():
        shutil.copy2(src, os.path.join(tmp, name))
        fsync(os.path.join(tmp, name))
    orbax_params.write_json_atomic(os.path.join(tmp, INDEX_FILE),
                               {"metadata": {"total_size": total}, "weight_map": weight_map})


def _replace_dir(tmp: str, out_dir: str) -> None:
    # Issue 16.6: mkdtemp/mkstemp give 0700/0600; a server run as another user must read it.
    for f in os.listdir(tmp):
        os.chmod(os.path.join(tmp, f), 0o644)
    os.chmod(tmp, 0o755)
    if not os.path.exists(out_dir):
        os.rename(tmp, out_dir)
    else:  # overwrite: swap in, then delete the old copy
        old = tempfile.mkdtemp(prefix=os.path.basename(out_dir) + ".old-",
                               dir=os.path.dirname(out_dir))
        os.rename(out_dir, os.path.join(old, "d"))
        os.rename(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    fsync(os.path.dirname(out_dir))


def _to_host(x) -> np.ndarray:
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils
        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(x)


def _dtype_of(params):
    return mapping.get_path(params, "embed").dtype


def fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def parse_size(size) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]I?B|B)?\s*", str(size).upper())
    if not m:
        raise ValueError(f"bad size {size!r}: use e.g. 2GB, 500MB, 4GiB or a byte count")
    return int(float(m.group(1)) * _UNITS[m.group(2) or ""])
