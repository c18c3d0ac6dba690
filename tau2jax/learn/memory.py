"""A per-device memory estimate of a learner step, to refuse a run that cannot fit before it starts.

Terms, in bytes per device (FSDP shards params, optimizer state, gradients and the reference over
`shards` devices): fp32-or-param-dtype weights, Adam's two fp32 moments, fp32 gradients, the frozen
KL reference, and the largest activation term of one micro-batch: the layer inputs remat keeps for
the backward pass (all layers), one layer's working set, or a chunk of the 151k-vocabulary logits
with its gradient. It is an estimate (XLA's buffer assignment decides), meant to catch the order of
magnitude errors: a 4B model on too few devices, rows too long for the memory left.
"""

from __future__ import annotations

import numpy as np

from tau2jax.models.configs import ModelConfig, num_params


def learner_bytes(cfg: ModelConfig, *, param_dtype: str, compute_dtype: str, shards: int, rows: int, seq_len: int,
                  remat: str, loss_chunk: int, reference: bool) -> dict[str, int]:
    """-> {"params", "optimizer", "gradients", "reference", "activations", "total"} per device;
    `rows` x `seq_len`: one device's micro-batch."""
    n = num_params(cfg)
    pb, cb = np.dtype(param_dtype).itemsize, np.dtype(compute_dtype).itemsize
    tokens = rows * seq_len
    per_layer_working = tokens * cb * (cfg.hidden_size * 4 + (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
                                       + 3 * cfg.intermediate_size)
    saved = tokens * cfg.hidden_size * cb * cfg.num_layers if remat == "full" else per_layer_working * cfg.num_layers
    logits = rows * min(loss_chunk or seq_len, seq_len) * cfg.vocab_size * 4 * 2  # fp32 chunk + its gradient
    terms = {"params": n * pb // shards, "optimizer": 2 * n * 4 // shards, "gradients": n * 4 // shards,
             "reference": n * pb // shards if reference else 0,
             "activations": max(saved + per_layer_working, logits)}
    return terms | {"total": sum(terms.values())}
