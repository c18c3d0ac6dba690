"""Writing our params as a HF Qwen3 directory (sharded safetensors + index + config.json +
generation_config.json) that transformers' AutoModelForCausalLM.from_pretrained and SGLang load.

`export_hf` = `device_tensors` (cast and HF-layout transposes on the devices, jitted) streamed by
`write_hf` straight into the safetensors shards: headers first (offsets follow from the shapes),
then each parameter fetched from its device and its bytes written in place by a few threads; no
whole-model host copy. It writes into a temp dir next to the target, fsyncs every file once, then
renames, so a reader never sees a half-written directory (dirs 0755, files 0644: a server run as
another user reads them). Used by the export CLI (`checkpoints_tools.orbax_to_hf`) and weight sync.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import json
import os
import re
import shutil
import struct
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from tau2jax.models.configs import to_hf_config
from tau2jax.weights import mapping, orbax_params
from tau2jax.weights.hf_read import INDEX_FILE

WRITE_THREADS = 4  # parameters fetched and written at once
_ST_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}  # numpy name -> safetensors
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9,  # as transformers: GB = 10^9
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def export_hf(params, cfg, out_dir: str, dtype: str | None = None, *, max_shard_size="2GB",
              extra_dir: str | None = None, overwrite: bool = False, threads: int = WRITE_THREADS) -> str:
    """Writes `params` as a HF checkpoint at `out_dir`; `dtype` ("float32"/"bfloat16", None keeps
    each array's dtype). `extra_dir` holds files to carry over (the source config.json, tokenizer,
    generation_config.json). Arrays sharded across processes are gathered on the devices, so on
    multi-host every process must call this; only process 0 writes. Converts one parameter at a
    time (lazily), so the extra device memory is a few parameters, not a model copy."""
    return write_hf(device_tensors(params, cfg, dtype), cfg, out_dir, max_shard_size=max_shard_size,
                    extra_dir=extra_dir, overwrite=overwrite, threads=threads)


def device_tensors(params, cfg, dtype: str | None = None):
    """Yields (row, array): each mapping row's parameter in HF layout (layer rows: [L, *hf_shape]),
    cast to `dtype`, computed on the devices (jitted: cast and transposes never touch the host).
    A parameter not addressable from this process comes back replicated, so every process can read
    it whole. `list(...)` it for a snapshot that outlives the params (donated by the next step)."""
    out_dtype = None if dtype is None else jnp.dtype(mapping.np_dtype(dtype))
    for row in mapping.rows(cfg):
        x = mapping.get_path(params, row.ours)
        if not isinstance(x, jax.Array):
            x = jnp.asarray(x)
        gather = None if x.is_fully_addressable else NamedSharding(x.sharding.mesh, PartitionSpec())
        yield row, _converter(row.hook, row.per_layer, out_dtype or x.dtype, gather)(x)


@functools.lru_cache(maxsize=None)
def _converter(hook, per_layer: bool, dtype, out_sharding):
    to_hf = jax.vmap(hook.to_hf) if per_layer else hook.to_hf
    # copy=True: an identity row already in `dtype` must not come back as the (donatable) input
    return jax.jit(lambda x: jnp.array(to_hf(x).astype(dtype), copy=True), out_shardings=out_sharding)


def write_hf(tensors, cfg, out_dir: str, *, max_shard_size="2GB", extra_dir: str | None = None,
             overwrite: bool = False, threads: int = WRITE_THREADS, barrier: bool = True) -> str:
    """Streams `tensors` ((row, array) pairs in `mapping.rows` order, as `device_tensors` gives)
    into safetensors shards at `out_dir`: every shard's header is written first (offsets follow from
    the known shapes), then each array is fetched from its device and its layers' bytes written at
    their offsets, `threads` arrays at a time (the fetch and the writes release the GIL). One fsync
    per file, then the directory is renamed into place. Peak host memory: `threads` parameters.
    `barrier`: on multi-host, all processes sync at the end (off on a background thread)."""
    out_dir = os.path.abspath(out_dir)
    writer = jax.process_index() == 0
    if writer and os.path.exists(out_dir) and not overwrite:
        raise FileExistsError(f"{out_dir} already exists; remove it or pass overwrite=True")
    tmp, fds = None, []
    if writer:
        os.makedirs(os.path.dirname(out_dir), exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=os.path.basename(out_dir) + ".tmp-", dir=os.path.dirname(out_dir))
    try:
        with concurrent.futures.ThreadPoolExecutor(max(1, threads), thread_name_prefix="hf_write") as pool:
            pending, layout, dtype = collections.deque(), None, None
            for row, array in tensors:
                if layout is None:  # the first array fixes the dtype (all rows share it)
                    dtype = np.dtype(array.dtype)
                    layout = _layout(cfg, dtype, parse_size(max_shard_size))
                    if writer:
                        fds = [_open_shard(os.path.join(tmp, fname), header) for fname, header, _ in layout.shards]
                if not writer:  # its part in the gather is done; nothing to write
                    continue
                places = [(fds[k], off) for k, off in layout.places[row.hf]]
                pending.append(pool.submit(_write_array, array, places))
                while len(pending) > threads:
                    pending.popleft().result()
            for f in pending:
                f.result()
        if writer:
            for fd in fds:
                os.fsync(fd)
            _close(fds)
            fds = []
            weight_map = {n: fname for fname, header, _ in layout.shards for n in header if n != "__metadata__"}
            total = sum(size for _, _, size in layout.shards)
            _write_metadata(tmp, cfg, weight_map, total, dtype, extra_dir)
            fsync(tmp)
            _replace_dir(tmp, out_dir)
    except BaseException:
        _close(fds)
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if barrier and jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"export_hf:{out_dir}")
    return out_dir


@dataclasses.dataclass
class _Layout:
    shards: list  # (file name, safetensors header dict, data bytes)
    places: dict  # row.hf template -> [(shard index, file offset)] per layer (one for a global row)


def _layout(cfg, dtype: np.dtype, max_bytes: int) -> _Layout:
    """Greedy split of the HF tensors (row-major: a stacked parameter's layers stay together) into
    shards of at most max_bytes (a bigger tensor gets its own), as transformers does; each
    tensor's header entry and its absolute offset in the file."""
    groups, current, size = [], [], 0
    for name, (row, layer) in mapping.hf_tensors(cfg).items():
        shape = mapping.hf_shape(row, cfg)
        n = mapping.num_bytes(shape, dtype)
        if current and size + n > max_bytes:
            groups.append(current)
            current, size = [], 0
        current.append((name, row, shape, n))
        size += n
    groups.append(current)
    shards, places = [], collections.defaultdict(list)
    for k, group in enumerate(groups):
        header, at = {"__metadata__": {"format": "pt"}}, 0  # transformers requires "pt"
        for name, _, shape, n in group:
            header[name] = {"dtype": _ST_DTYPES[dtype.name], "shape": list(shape), "data_offsets": [at, at + n]}
            at += n
        start = 8 + len(_header_bytes(header))
        for name, row, _, _ in group:
            places[row.hf].append((k, start + header[name]["data_offsets"][0]))
        shards.append((f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors", header, at))
    return _Layout(shards, dict(places))


def _header_bytes(header: dict) -> bytes:
    js = json.dumps(header, separators=(",", ":")).encode()
    return js + b" " * (-len(js) % 8)  # the data starts 8-byte aligned, as safetensors writes it


def _open_shard(path: str, header: dict) -> int:
    js = _header_bytes(header)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    _pwrite_all(fd, struct.pack("<Q", len(js)) + js, 0)
    return fd


def _write_array(array, places) -> None:
    """Device -> host (one parameter), then each layer's bytes to its shard offset."""
    host = np.ascontiguousarray(np.asarray(array))
    parts = [host] if len(places) == 1 else list(host)  # a layer row: one tensor per layer
    for part, (fd, offset) in zip(parts, places, strict=True):
        _pwrite_all(fd, memoryview(part.reshape(-1).view(np.uint8)), offset)


def _pwrite_all(fd: int, data, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _close(fds) -> None:
    for fd in fds:
        os.close(fd)


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
