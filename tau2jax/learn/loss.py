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


def chunked_token_logprobs(hidden: jax.Array, targets: jax.Array, head_fn, chunk: int) -> jax.Array:
    """token_logprobs without materialising [B, T, V] logits: the length axis is processed in chunks,
    each rematerialised in the backward pass. With Qwen3's 151k vocabulary this is what keeps the
    memory of the loss at O(B·chunk·V) instead of O(B·T·V).
    """
    b, t, d = hidden.shape
    if t % chunk:
        chunk = t  # fall back to one chunk; callers choose a chunk that divides max_len
    n = t // chunk
    h = hidden.reshape(b, n, chunk, d).swapaxes(0, 1)  # [n, B, c, D]
    y = targets.reshape(b, n, chunk).swapaxes(0, 1)

    @jax.checkpoint
    def one(args):
        hc, yc = args
        return token_logprobs(head_fn(hc), yc)

    lp = jax.lax.map(one, (h, y))  # [n, B, c]
    return lp.swapaxes(0, 1).reshape(b, t)


def masked_nll(logprobs: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    mask = mask.astype(jnp.float32)
    return -(logprobs * mask).sum(), mask.sum()
