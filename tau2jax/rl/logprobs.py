"""Learner log-probs and entropies at the rollout temperature, without [B, T, V] logits.

The behaviour convention (tau2jax/inference/engine.py `GenerateResult`): log_softmax(logits / T)
at the sampled token, before top-k / top-p; T = 0 -> log_softmax(logits). The learner recomputes
exactly that, plus the entropy −Σ p log p of the same distribution (for the entropy bonus and
diagnostics). Chunked over the length axis (learn/loss.py `map_length_chunks`) and, with
`vocab_chunk` > 0, over the vocabulary too with an online logsumexp, so the peak memory of the
head is O(B·chunk·vocab_chunk) instead of O(B·T·V) (~7 GB fp32 for one 12k-token Qwen3 row).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from tau2jax.learn.loss import map_length_chunks


def lm_head_weight(params: dict, cfg) -> jax.Array:
    """The unembedding as [V, D] (the tied embedding's layout) for `token_logprobs_and_entropy`."""
    return params["embed"] if cfg.tie_word_embeddings else params["lm_head"].T


def _logits(h: jax.Array, w: jax.Array, inv_t: jax.Array) -> jax.Array:
    """[B, c, D] x [v, D] -> temperature-scaled float32 logits [B, c, v] (matmul in h.dtype with fp32
    accumulation, as qwen3.logits_from_hidden)."""
    x = jnp.einsum("bcd,vd->bcv", h, w.astype(h.dtype), preferred_element_type=jnp.float32)
    return x * inv_t[..., None]


def _dense_stats(h, y, inv_t, w):
    z = _logits(h, w, inv_t)
    logp_all = jax.nn.log_softmax(z, axis=-1)
    logp = jnp.take_along_axis(logp_all, y[..., None], axis=-1)[..., 0]
    return logp, -(jnp.exp(logp_all) * logp_all).sum(-1)


def _block_update(carry, z, y, start):
    """Fold one vocab block of logits z [B, c, v] (ids start..start+v) into the running
    (max m, s = Σe^(z−m), u = Σe^(z−m)·(z−m), target logit). u is kept relative to m so the
    entropy log s − u/s does not cancel two logit-sized numbers."""
    m, s, u, picked = carry
    m_new = jnp.maximum(m, jax.lax.stop_gradient(z.max(-1)))  # any shift is exact; keep it out of autodiff
    scale = jnp.exp(m - m_new)
    zc = z - m_new[..., None]
    e = jnp.exp(zc)
    local = y - start
    inside = (local >= 0) & (local < z.shape[-1])
    hit = jnp.take_along_axis(z, jnp.clip(local, 0, z.shape[-1] - 1)[..., None], axis=-1)[..., 0]
    u = scale * (u + (m - m_new) * s) + (e * zc).sum(-1)
    return m_new, s * scale + e.sum(-1), u, jnp.where(inside, hit, picked)


def _vocab_chunked_stats(h, y, inv_t, w, vocab_chunk: int):
    """Online logsumexp over vocab blocks: lse = m + log s, log p(y) = z_y − lse and
    entropy = lse − Σ p·z = log s − u / s. A ragged last block is folded in separately (no padding copy
    of the weight). Each block is rematerialised in the backward pass, so only the [B, c] running
    statistics are kept per block."""
    V = w.shape[0]
    n_full = V // vocab_chunk
    z0 = _logits(h, w[:vocab_chunk], inv_t)
    m0 = jax.lax.stop_gradient(z0.max(-1))
    carry = _block_update((m0, jnp.zeros_like(m0), jnp.zeros_like(m0), jnp.zeros_like(m0)), z0, y, 0)

    @jax.checkpoint
    def body(carry, i):
        start = i * vocab_chunk
        wb = jax.lax.dynamic_slice_in_dim(w, start, vocab_chunk, axis=0)
        return _block_update(carry, _logits(h, wb, inv_t), y, start), None

    carry, _ = jax.lax.scan(body, carry, jnp.arange(1, n_full))
    if V % vocab_chunk:
        carry = _block_update(carry, _logits(h, w[n_full * vocab_chunk:], inv_t), y, n_full * vocab_chunk)
    m, s, u, picked = carry
    lse = m + jnp.log(s)
    return picked - lse, jnp.log(s) - u / s


def token_logprobs_and_entropy(hidden: jax.Array, targets: jax.Array, head_w: jax.Array, temperature,
                               chunk: int = 0, vocab_chunk: int = 0,
                               needed: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """(log p(targets), entropy), both [B, T] float32, under softmax(hidden @ head_wᵀ / T).

    hidden [B, T, D] final-normed (qwen3.forward(..., return_hidden=True)); targets [B, T] int;
    head_w [V, D] (`lm_head_weight`); temperature a scalar, per row [B] or per token [B, T]
    (packed rows hold trajectories sampled at different temperatures); T = 0 -> T = 1, the greedy
    convention. chunk: length-chunk size (0 = whole row; falls back to one chunk if it does not
    divide T); vocab_chunk: vocab block size (0 = the whole vocabulary at once); needed: [B, T] bool
    (e.g. the loss mask), length chunks without a needed position skip the head and give 0, 0.
    """
    b, t = targets.shape
    if hidden.shape[:2] != (b, t) or head_w.shape[1] != hidden.shape[2]:
        raise ValueError(f"hidden {hidden.shape}, targets {targets.shape} and head_w {head_w.shape} "
                         "must be [B, T, D], [B, T] and [V, D]")
    temp = jnp.asarray(temperature, jnp.float32)
    if temp.ndim == 1:
        temp = temp[:, None]
    temp = jnp.broadcast_to(temp, (b, t))
    inv_t = 1.0 / jnp.where(temp > 0, temp, 1.0)
    vc = vocab_chunk if 0 < vocab_chunk < head_w.shape[0] else 0

    def stats(h, y, it):
        if vc:
            return _vocab_chunked_stats(h, y, it, head_w, vc)
        return _dense_stats(h, y, it, head_w)

    return map_length_chunks(stats, chunk or t, hidden, targets, inv_t, needed=needed)
