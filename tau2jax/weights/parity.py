"""Logit parity of our Qwen3 forward against transformers (the numerical reference): `compare`,
the library side of `python -m checkpoints_tools.parity` (the demo calls it directly).

Both models run on the same random token ids. Without `orbax_dir` the HF dir is converted into a
temp dir first (so this also checks the conversion, `tau2jax.weights.convert`).
"""

from __future__ import annotations

import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from tau2jax.models import qwen3
from tau2jax.weights import orbax_params
from tau2jax.weights.convert import convert


def compare(hf_dir: str, orbax_dir: str | None = None, *, dtype: str = "float32",
            num_tokens: int = 32, batch: int = 2, seed: int = 0, log=print) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        if orbax_dir is None:
            orbax_dir = os.path.join(tmp, "orbax")
            convert(hf_dir, orbax_dir, dtype=dtype)
        params, cfg = orbax_params.restore_params(orbax_dir, dtype=dtype)
    tokens = np.random.default_rng(seed).integers(0, cfg.vocab_size, (batch, num_tokens), dtype=np.int32)
    log(f"model: {cfg.num_layers} layers, hidden {cfg.hidden_size}, vocab {cfg.vocab_size}, "
        f"tied={cfg.tie_word_embeddings}; tokens {batch}x{num_tokens}, dtype {dtype}")

    t0 = time.perf_counter()
    ref = _hf_logits(hf_dir, tokens, dtype)
    log(f"transformers forward: {time.perf_counter() - t0:.2f} s")

    t0 = time.perf_counter()
    positions = np.broadcast_to(np.arange(num_tokens, dtype=np.int32), tokens.shape)
    segment_ids = np.ones_like(tokens)
    fwd = jax.jit(lambda p, t, pos, seg: qwen3.forward(p, cfg, t, pos, seg,
                                                       compute_dtype=jnp.dtype(dtype)))
    ours = np.asarray(fwd(params, tokens, positions, segment_ids), dtype=np.float32)
    log(f"tau2jax forward (incl. compile): {time.perf_counter() - t0:.2f} s")

    diff = np.abs(ours - ref)
    return {
        "max_abs_logit_diff": float(diff.max()),
        "mean_abs_logit_diff": float(diff.mean()),
        "max_abs_logit": float(np.abs(ref).max()),
        "greedy_match": float((ours.argmax(-1) == ref.argmax(-1)).mean()),
        "dtype": dtype,
        "num_tokens": int(tokens.size),
        "batch": batch,
        "seq_len": num_tokens,
    }


def _hf_logits(hf_dir: str, tokens: np.ndarray, dtype: str) -> np.ndarray:
    import torch  # torch + transformers (heavy, optional): only the reference side needs them
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        hf_dir, dtype=getattr(torch, dtype), attn_implementation="eager")  # eager: exact softmax
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=torch.from_numpy(tokens.astype(np.int64))).logits
    return logits.float().numpy()
