"""HF Qwen3 <-> tau2jax parameter mapping, as a table.

Each row names one HF tensor (``{i}`` = layer index), the path of our parameter (layer rows are
stacked on a leading [L] axis under ``layers/``), our per-layer shape in config dimensions, and a
hook: a named pair of pure numpy functions converting HF layout <-> ours. Model sizes come from
`ModelConfig`; nothing here depends on a size, so adding one is adding config data.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import ml_dtypes
import numpy as np

# Config dimension symbols used in the table -> ModelConfig field.
DIMS = {
    "V": "vocab_size",
    "D": "hidden_size",
    "F": "intermediate_size",
    "H": "num_heads",
    "K": "num_kv_heads",
    "Dh": "head_dim",
}


@dataclasses.dataclass(frozen=True)
class Hook:
    """HF layout <-> our layout for one tensor (one layer's slice for layer rows)."""
    name: str
    to_ours: Callable[[np.ndarray, tuple[int, ...]], np.ndarray]  # (hf tensor, our shape)
    to_hf: Callable[[np.ndarray], np.ndarray]
    hf_shape: Callable[[tuple[int, ...]], tuple[int, ...]]  # our shape -> HF shape


def _split_heads_to_ours(w, shape):  # q/k/v: [N*Dh, D] -> [D, N, Dh]
    return w.T.reshape(shape)


def _split_heads_to_hf(w):  # [D, N, Dh] -> [N*Dh, D]
    d, n, dh = w.shape
    return w.reshape(d, n * dh).T


def _merge_heads_to_ours(w, shape):  # o: [D, H*Dh] -> [H, Dh, D]
    return w.T.reshape(shape)


def _merge_heads_to_hf(w):  # [H, Dh, D] -> [D, H*Dh]
    h, dh, d = w.shape
    return w.reshape(h * dh, d).T


IDENTITY = Hook("identity", lambda w, shape: w, lambda w: w, lambda s: s)
# torch Linear stores [out, in]; we store [in, out] so x @ w needs no transpose.
TRANSPOSE = Hook("transpose", lambda w, shape: w.T, lambda w: w.T, lambda s: s[::-1])
SPLIT_HEADS = Hook("split_heads", _split_heads_to_ours, _split_heads_to_hf,
                   lambda s: (s[1] * s[2], s[0]))
MERGE_HEADS = Hook("merge_heads", _merge_heads_to_ours, _merge_heads_to_hf,
                   lambda s: (s[2], s[0] * s[1]))


@dataclasses.dataclass(frozen=True)
class Row:
    hf: str                 # HF tensor name; "{i}" marks a per-layer tensor
    ours: str               # "/"-separated path in our params pytree
    shape: tuple[str, ...]  # our (per-layer) shape in DIMS symbols
    hook: Hook
    untied_only: bool = False  # lm_head: absent when embeddings are tied

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.hf


_L = "model.layers.{i}."
QWEN3: tuple[Row, ...] = (
    Row("model.embed_tokens.weight", "embed", ("V", "D"), IDENTITY),
    Row(_L + "input_layernorm.weight", "layers/attn_norm", ("D",), IDENTITY),
    Row(_L + "self_attn.q_proj.weight", "layers/q_proj", ("D", "H", "Dh"), SPLIT_HEADS),
    Row(_L + "self_attn.k_proj.weight", "layers/k_proj", ("D", "K", "Dh"), SPLIT_HEADS),
    Row(_L + "self_attn.v_proj.weight", "layers/v_proj", ("D", "K", "Dh"), SPLIT_HEADS),
    Row(_L + "self_attn.o_proj.weight", "layers/o_proj", ("H", "Dh", "D"), MERGE_HEADS),
    Row(_L + "self_attn.q_norm.weight", "layers/q_norm", ("Dh",), IDENTITY),
    Row(_L + "self_attn.k_norm.weight", "layers/k_norm", ("Dh",), IDENTITY),
    Row(_L + "post_attention_layernorm.weight", "layers/mlp_norm", ("D",), IDENTITY),
    Row(_L + "mlp.gate_proj.weight", "layers/gate_proj", ("D", "F"), TRANSPOSE),
    Row(_L + "mlp.up_proj.weight", "layers/up_proj", ("D", "F"), TRANSPOSE),
    Row(_L + "mlp.down_proj.weight", "layers/down_proj", ("F", "D"), TRANSPOSE),
    Row("model.norm.weight", "final_norm", ("D",), IDENTITY),
    Row("lm_head.weight", "lm_head", ("D", "V"), TRANSPOSE, untied_only=True),
)
TIED_LM_HEAD = "lm_head.weight"  # may still be stored by HF for tied models (must equal embed)


def rows(cfg) -> list[Row]:
    """The table rows that exist for this config (drops lm_head when tied)."""
    return [r for r in QWEN3 if not (r.untied_only and cfg.tie_word_embeddings)]


def layer_shape(row: Row, cfg) -> tuple[int, ...]:
    """Our per-layer shape of `row` (no [L] axis)."""
    return tuple(int(getattr(cfg, DIMS[s])) for s in row.shape)


def param_shape(row: Row, cfg) -> tuple[int, ...]:
    """Our full parameter shape ([L, ...] for layer rows)."""
    shape = layer_shape(row, cfg)
    return (cfg.num_layers, *shape) if row.per_layer else shape


def hf_shape(row: Row, cfg) -> tuple[int, ...]:
    return tuple(row.hook.hf_shape(layer_shape(row, cfg)))


def hf_tensors(cfg) -> dict[str, tuple[Row, int | None]]:
    """Every HF tensor name this config has -> (row, layer index or None), in table order."""
    out = {}
    for row in rows(cfg):
        if row.per_layer:
            for i in range(cfg.num_layers):
                out[row.hf.format(i=i)] = (row, i)
        else:
            out[row.hf] = (row, None)
    return out


def param_shapes(cfg) -> dict[str, Any]:
    """Nested dict of our parameter shapes, same structure as the params pytree."""
    tree: dict[str, Any] = {}
    for row in rows(cfg):
        set_path(tree, row.ours, param_shape(row, cfg))
    return tree


def get_path(tree, path: str):
    for key in path.split("/"):
        tree = tree[key]
    return tree


def set_path(tree: dict, path: str, value) -> None:
    *parents, leaf = path.split("/")
    for key in parents:
        tree = tree.setdefault(key, {})
    tree[leaf] = value


def np_dtype(name: str) -> np.dtype:
    """"float32" / "bfloat16" -> numpy dtype (bfloat16 from ml_dtypes: numpy has none)."""
    dtypes = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}
    if name not in dtypes:
        raise ValueError(f"dtype {name!r} is not supported; use one of {sorted(dtypes)}")
    return np.dtype(dtypes[name])


def num_bytes(shape: tuple[int, ...], dtype) -> int:
    return math.prod(shape) * np.dtype(dtype).itemsize
