"""Reading a local HF Qwen3 checkpoint (config.json + safetensors) into our params pytree.

Everything is validated from the safetensors headers before any weight is read (each error names
the tensor and file); weights then stream one tensor at a time into preallocated stacked [L, ...]
numpy arrays: one copy of the model in the target dtype (plus one tensor). Used by the conversion
(`tau2jax.weights.convert`, CLI `checkpoints_tools.hf_to_orbax`), the built-in engine and weight
sync's reading side.
"""

from __future__ import annotations

import json
import os

import numpy as np
from safetensors import SafetensorError, safe_open

from tau2jax.models.configs import from_hf_config
from tau2jax.weights import mapping

INDEX_FILE = "model.safetensors.index.json"
# Non-weight files carried through (under <out>/hf_extra/) so an export writes a complete HF dir
# (config.json too: it keeps fields ModelConfig does not model, such as token ids).
EXTRA_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "vocab.json", "merges.txt", "special_tokens_map.json", "added_tokens.json",
               "chat_template.jinja")
HF_EXTRA_DIR = "hf_extra"
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


class ConversionError(ValueError):
    """Bad or inconsistent input checkpoint; the message names the file or tensor."""


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


def open_safetensors(file: str):
    """safe_open (a context manager), its errors (a truncated or foreign file) a ConversionError naming the file."""
    try:
        return safe_open(file, framework="np")
    except (SafetensorError, OSError) as e:
        raise ConversionError(f"{file}: not a readable safetensors file ({e}); copy or export it again") from None


def inventory(files: list[str], cfg) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Reads headers only; checks nothing is unknown, missing, duplicated, mis-shaped or non-float.
    Returns name -> (file, shape)."""
    expected = mapping.hf_tensors(cfg)
    found: dict[str, tuple[str, tuple[int, ...]]] = {}
    for file in files:
        with open_safetensors(file) as f:
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
        with open_safetensors(file) as f:
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
    with open_safetensors(embed_file) as f:
        embed = f.get_tensor("model.embed_tokens.weight")
    with open_safetensors(head_file) as f:
        head = f.get_tensor(mapping.TIED_LM_HEAD)
    if not np.array_equal(embed, head):
        raise ConversionError(
            f"config.json says tie_word_embeddings=true but {mapping.TIED_LM_HEAD} in {head_file} "
            "differs from model.embed_tokens.weight; set tie_word_embeddings=false if they are separate")
