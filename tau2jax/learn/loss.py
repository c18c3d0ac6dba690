"""Masked next-token cross-entropy as (sum, count).

Returning the sum and the token count (not the mean) keeps gradient accumulation and data-parallel
averaging exact: the step divides the summed gradient by the global token count once.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def token_logprobs(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """log p(target) per position, in float32."""
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return picked - lse


def map_length_chunks(fn, chunk: int, *arrays, needed: jax.Array | None = None):
    """fn over chunks of the length axis (axis 1) of [B, T, ...] arrays, each chunk rematerialised in
    the backward pass, so the [B, chunk, V] logits inside fn exist for one chunk at a time. fn maps
    [B, c, ...] arrays to a pytree of [B, c, ...] arrays; the chunk results are concatenated along
    T. A chunk that does not divide T falls back to one chunk (callers pick one dividing max_len).

    needed: optional [B, T] bool; a chunk with no needed position skips fn (forward and backward)
    and yields zeros there. In a tau2 conversation most positions are prompt without loss, and the
    vocabulary head in fn is most of a small model's FLOPs.
    """
    b, t = arrays[0].shape[:2]
    if t % chunk:
        chunk = t
    n = t // chunk
    if needed is not None:
        arrays = (*arrays, needed)
    split = [a.reshape(b, n, chunk, *a.shape[2:]).swapaxes(0, 1) for a in arrays]  # [n, B, c, ...]

    def body(xs):
        if needed is None:
            return fn(*xs)
        *ins, need = xs
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(fn, *ins))
        return jax.lax.cond(need.any(), lambda: fn(*ins), lambda: zeros)

    # One chunk saves no memory by remat, which would only recompute the vocabulary head.
    out = jax.lax.map(jax.checkpoint(body) if n > 1 else body, split)
    return jax.tree.map(lambda o: o.swapaxes(0, 1).reshape(b, t, *o.shape[3:]), out)


def chunked_token_logprobs(hidden: jax.Array, targets: jax.Array, head_fn, chunk: int,
                           needed: jax.Array | None = None) -> jax.Array:
    """token_logprobs without materialising [B, T, V] logits (see map_length_chunks). With Qwen3's
    151k vocabulary this keeps the memory of the loss at O(B·chunk·V) instead of O(B·T·V).
    needed [B, T]: positions whose log-prob is used (chunks with none return 0 and skip the head).
    """
    return map_length_chunks(lambda h, y: token_logprobs(head_fn(h), y), chunk, hidden, targets, needed=needed)


def masked_nll(logprobs: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    mask = mask.astype(jnp.float32)
    return -(logprobs * mask).sum(), mask.sum()
