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
import numpy as np
import psutil
from safetensors import safe_open

from checkpoints_tools import mapping, orbax_io
from tau2jax.models.configs import from_hf_config

INDEX_FILE = "model.safetensors.index.json"
# Non-weight files carried through (under <out>/hf_extra/) so orbax_to_hf writes a complete HF dir
# (config.json too: it keeps fields ModelConfig does not model, such as token ids).
EXTRA_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "vocab.json", "merges.txt", "special_tokens_map.json", "added_tokens.json",
               "chat_template.jinja")
HF_EXTRA_DIR = "hf_extra"
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


class ConversionError(ValueError):
    """Bad or inconsistent input checkpoint; the message names the file or tensor."""


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
        orbax_io.save_params(tmp, params, cfg)
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


def load_hf_params(hf_dir: str, dtype="float32"):
    """(params as numpy arrays in `dtype`, ModelConfig) from a HF Qwen3 directory, every tensor
    checked against the config before any is read. Used by convert, weight sync and the engine."""
    cfg = read_config(hf_dir)
    files = find_safetensors(hf_dir)
    found = inventory(files, cfg)
    params, tied_head_file = fill(files, cfg, mapping.np_dtype(dtype) if isinstance(dtype, str) else dtype)
    if tied_head_file is not None:
        _check_tied_head(found, tied_head_file)
    return params, cfg


def read_config(hf_dir: str):
    if not os.path.isdir(hf_dir):
        raise ConversionError(f"--hf-dir {hf_dir} does not exist or is not a directory")
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise ConversionError(f"{path} not found: --hf-dir must be a HF model directory")
    try:
        with open(path) as f:
            hf = json.load(f)
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path} is not valid JSON: {e}") from None
    try:
        return from_hf_config(hf)
    except (KeyError, TypeError, ValueError) as e:
        raise ConversionError(f"{path}: cannot read the model config: {e}") from None


def find_safetensors(hf_dir: str) -> list[str]:
    """The weight files: from the shard index if there is one, else model.safetensors / *.safetensors."""
    index = os.path.join(hf_dir, INDEX_FILE)
    if os.path.isfile(index):
        with open(index) as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
        for name in names:
            if not os.path.isfile(os.path.join(hf_dir, name)):
                raise ConversionError(f"{index} lists {name}, which is missing from {hf_dir}")
    else:
        names = sorted(n for n in os.listdir(hf_dir) if n.endswith(".safetensors"))
    if not names:
        raise ConversionError(
            f"no *.safetensors files in {hf_dir} (.bin checkpoints are not supported: re-save the "
            "model with save_pretrained(..., safe_serialization=True))")
    return [os.path.join(hf_dir, n) for n in names]


def inventory(files: list[str], cfg) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Reads headers only; checks nothing is unknown, missing, duplicated, mis-shaped or non-float.
    Returns name -> (file, shape)."""
    expected = mapping.hf_tensors(cfg)
    found: dict[str, tuple[str, tuple[int, ...]]] = {}
    for file in files:
        with safe_open(file, framework="np") as f:
            for name in f.keys():
                if name in found:
                    raise ConversionError(f"tensor {name} is stored twice: {found[name][0]} and {file}")
                sl = f.get_slice(name)
                shape, dt = tuple(sl.get_shape()), sl.get_dtype()
                if name in expected:
                    want = mapping.hf_shape(expected[name][0], cfg)
                elif name == mapping.TIED_LM_HEAD and cfg.tie_word_embeddings:
                    want = (cfg.vocab_size, cfg.hidden_size)
                else:
                    raise ConversionError(
                        f"unknown tensor {name} in {file}: not part of a Qwen3 model with this "
                        f"config.json ({cfg.num_layers} layers, tie_word_embeddings="
                        f"{cfg.tie_word_embeddings})")
                if shape != want:
                    raise ConversionError(
                        f"tensor {name} in {file} has shape {shape}, config.json implies {want}")
                if dt not in FLOAT_DTYPES:
                    raise ConversionError(f"tensor {name} in {file} has dtype {dt}, expected a float")
                found[name] = (file, shape)
    missing = [n for n in expected if n not in found]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ConversionError(f"tensor {missing[0]}{more} is missing: not in any of {files}")
    return found


def fill(files: list[str], cfg, target: np.dtype):
    """Streams every tensor into preallocated params. Returns (params, file of a stored tied
    lm_head or None)."""
    expected = mapping.hf_tensors(cfg)
    params: dict = {}
    for row in mapping.rows(cfg):
        mapping.set_path(params, row.ours, np.empty(mapping.param_shape(row, cfg), target))
    tied_head_file = None
    for file in files:
        with safe_open(file, framework="np") as f:
            for name in f.keys():
                if name not in expected:  # inventory() allowed only a tied lm_head here
                    tied_head_file = file
                    continue
                row, layer = expected[name]
                value = row.hook.to_ours(f.get_tensor(name), mapping.layer_shape(row, cfg))
                dst = mapping.get_path(params, row.ours)
                if layer is None:
                    dst[...] = value
                else:
                    dst[layer] = value
    return params, tied_head_file


def _check_tied_head(found, head_file: str) -> None:
    embed_file = found["model.embed_tokens.weight"][0]
    with safe_open(embed_file, framework="np") as f:
        embed = f.get_tensor("model.embed_tokens.weight")
    with safe_open(head_file, framework="np") as f:
        head = f.get_tensor(mapping.TIED_LM_HEAD)
    if not np.array_equal(embed, head):
        raise ConversionError(
            f"config.json says tie_word_embeddings=true but {mapping.TIED_LM_HEAD} in {head_file} "
            "differs from model.embed_tokens.weight; set tie_word_embeddings=false if they are separate")


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
    try:
        stats = convert(args.hf_dir, args.out, args.dtype)
    except (ConversionError, orbax_io.CheckpointFormatError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {stats['out']} ({stats['param_mb']} MiB {stats['dtype']}, "
          f"{stats['num_params']} stacked arrays) in {stats['seconds']} s; "
          f"peak RSS {stats['peak_rss_mb']} MiB (before loading: {stats['rss_before_mb']} MiB)")
    print(json.dumps(stats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
