"""Sampling math shared by the built-in engine (behaviour) and the learner (recomputation).

A token is drawn, for temperature T > 0, from

    softmax(filter(logits / T))

where `filter` keeps the top-k logits (k = 0: off) and then the top-p nucleus of the resulting
distribution (the smallest set of most likely tokens whose mass reaches p; p = 1: off), in
transformers' order (temperature -> top-k -> top-p), setting everything else to -inf. Ties at
either threshold are kept. Temperature 0 is greedy: the token is argmax(logits).

Two log-probs of a sampled token (see `GenerateResult`):

- the behaviour log-prob, `temperature_logprobs`: log_softmax(logits / T)[token], *before*
  filtering (SGLang's `output_token_logprobs`); T = 0 -> log_softmax(logits)[token]. Every engine
  reports this, and the learner recomputes it from its full-forward logits with the same function,
  so RL importance ratios compare like with like whichever engine sampled.
- the sampled log-prob, `sampled_logprobs`: under the filtered distribution actually drawn from
  (= the behaviour log-prob when no filter is on; T = 0 -> log_softmax(logits)). A token the
  learner's filter would drop (possible only when its logit sits on a threshold and the two
  forwards differ by rounding) gets -inf there.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Top-k alone with every k at most this uses lax.top_k instead of sorting the whole vocabulary
# (the common eval setting top_k=20 on a 152K vocabulary).
_TOPK_FAST = 64
# Vocabulary block of the two-level inverse-CDF draw (`_draw`): ~sqrt(152K), so that both levels'
# sums stay short and the mass of a block is summed in float32 without losing small tokens.
_DRAW_BLOCK = 512


def _per_row(x, shape, dtype) -> jax.Array:
    return jnp.broadcast_to(jnp.asarray(x, dtype), shape)


def filter_logits(logits: jax.Array, temperature, top_k, top_p) -> jax.Array:
    """logits [..., V] -> logits / T with tokens outside top-k / top-p set to -inf (float32).

    temperature, top_k, top_p: scalars or arrays broadcastable to logits.shape[:-1] (one value
    per row). Rows with temperature 0 are scaled by 1 (see `sample` for greedy rows).
    """
    lead, V = logits.shape[:-1], logits.shape[-1]
    t = _per_row(temperature, lead, jnp.float32)
    k = _per_row(top_k, lead, jnp.int32)
    p = _per_row(top_p, lead, jnp.float32)
    x = _scaled(logits, t)
    k = jnp.where((k <= 0) | (k > V), V, k)  # V = no top-k
    neg_inf = jnp.float32(-jnp.inf)

    def no_filter(x):
        return x

    def top_k_only(x):
        vals = jax.lax.top_k(x, min(_TOPK_FAST, V))[0]
        kth = jnp.take_along_axis(vals, jnp.clip(k - 1, 0, vals.shape[-1] - 1)[..., None], axis=-1)
        kth = jnp.where((k < V)[..., None], kth, neg_inf)
        return jnp.where(x >= kth, x, neg_inf)

    def sort_filter(x):
        s = -jnp.sort(-x, axis=-1)  # descending
        rank = jnp.arange(V)
        in_k = rank < k[..., None]
        probs = jax.nn.softmax(jnp.where(in_k, s, neg_inf), axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        # p >= 1 keeps all of top-k even where the float cumsum reaches 1 early.
        keep = in_k & ((mass_before < p[..., None]) | (p >= 1)[..., None])
        n_keep = jnp.maximum(keep.sum(-1), 1)  # rank 0 is always kept; guard anyway
        thresh = jnp.take_along_axis(s, (n_keep - 1)[..., None], axis=-1)
        return jnp.where(x >= thresh, x, neg_inf)

    needs_sort = jnp.any(p < 1) | jnp.any((k > _TOPK_FAST) & (k < V))
    branch = jnp.where(needs_sort, 2, jnp.where(jnp.any(k < V), 1, 0))
    return jax.lax.switch(branch, (no_filter, top_k_only, sort_filter), x)


def _logprob_at(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    return jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), tokens[..., None], axis=-1)[..., 0]


def _scaled(logits: jax.Array, temperature) -> jax.Array:
    """logits / T in float32; rows with T = 0 unscaled (the greedy convention)."""
    t = _per_row(temperature, logits.shape[:-1], jnp.float32)
    return logits.astype(jnp.float32) / jnp.where(t > 0, t, 1.0)[..., None]


def temperature_logprobs(logits: jax.Array, tokens: jax.Array, temperature) -> jax.Array:
    """The behaviour log-prob: log_softmax(logits / T) at `tokens` [...], given the logits [..., V]
    that preceded each token (e.g. a full forward's logits[:, :-1] and tokens[:, 1:]); T = 0 ->
    log_softmax(logits). temperature: a scalar or per-row array. What the learner recomputes."""
    return _logprob_at(_scaled(logits, temperature), tokens)


def sampled_logprobs(logits: jax.Array, tokens: jax.Array, temperature, top_k=0, top_p=1.0) -> jax.Array:
    """Log-prob of `tokens` under the filtered distribution they were drawn from (arguments as in
    `temperature_logprobs`, plus top_k / top_p, scalars or per row); T = 0 -> log_softmax(logits).
    Sorts the vocabulary when top_p < 1 or top_k > 64: chunk long sequences if [..., V] sorts do
    not fit."""
    filtered = filter_logits(logits, temperature, top_k, top_p)
    t = _per_row(temperature, tokens.shape, jnp.float32)
    return jnp.where(t > 0, _logprob_at(filtered, tokens), _logprob_at(logits.astype(jnp.float32), tokens))


def _first_reaching(cum: jax.Array, target: jax.Array) -> jax.Array:
    """Per row, the first index i with cum[i] > target (cum nondecreasing [..., n], target [...]);
    where rounding leaves none, the first index reaching cum's total: the last one with mass."""
    above = jnp.sum(cum <= target[..., None], axis=-1)
    last = jnp.argmax(cum >= cum[..., -1:], axis=-1)
    return jnp.minimum(above, last)


def _argmax(x: jax.Array) -> jax.Array:
    """jnp.argmax over the last axis (the first maximum), as a max and a masked min: XLA:CPU's
    variadic argmax reduction costs 4x as much on [16, 152K] (13 ms vs 3 ms)."""
    V = x.shape[-1]
    first = jnp.min(jnp.where(x == jnp.max(x, axis=-1, keepdims=True), jnp.arange(V), V), axis=-1)
    return jnp.minimum(first, V - 1)  # NaN rows match nothing: a valid id, as garbage as argmax's


def _draw(keys: jax.Array, x: jax.Array) -> jax.Array:
    """One token per row from softmax(x) (x [B, V] float32, -inf = never), by inverse CDF in two
    levels: a block of _DRAW_BLOCK tokens by its mass, then a token within it by its own. Exactly
    the categorical distribution, from two uniforms a row: the Gumbel-max draw needs a random
    number per vocabulary entry, most of a small model's decode step on a 152K vocabulary."""
    B, V = x.shape
    blk = min(_DRAW_BLOCK, V)
    nb = -(-V // blk)
    p = jnp.exp(x - jnp.max(x, axis=-1, keepdims=True))
    p = jnp.pad(p, ((0, 0), (0, nb * blk - V))).reshape(B, nb, blk)
    u = jax.vmap(lambda k: jax.random.uniform(k, (2,)))(keys)
    block_cum = jnp.cumsum(p.sum(-1), axis=-1)
    j = _first_reaching(block_cum, u[:, 0] * block_cum[:, -1])
    within = jnp.cumsum(jnp.take_along_axis(p, j[:, None, None], axis=1)[:, 0], axis=-1)
    i = _first_reaching(within, u[:, 1] * within[:, -1])
    return j * blk + i


def sample(keys: jax.Array, logits: jax.Array, temperature, top_k, top_p):
    """One token per row. keys: typed PRNG keys [B]; logits [B, V]; params scalars or [B].
    Returns (tokens [B] int32, logprobs [B] = `temperature_logprobs`, sampled [B] =
    `sampled_logprobs`)."""
    filtered = filter_logits(logits, temperature, top_k, top_p)
    t = _per_row(temperature, logits.shape[:-1], jnp.float32)
    greedy = _argmax(logits)
    # All-greedy batches skip the draw's pass over [B, V].
    drawn = jax.lax.cond(jnp.any(t > 0), lambda: _draw(keys, filtered), lambda: greedy)
    tokens = jnp.where(t > 0, drawn, greedy).astype(jnp.int32)
    behaviour = temperature_logprobs(logits, tokens, temperature)
    # With no top-k / top-p on any row the filtered distribution is the tempered one: its
    # log-prob is the behaviour log-prob, without a second log_softmax over the vocabulary.
    V = logits.shape[-1]
    k, p = _per_row(top_k, t.shape, jnp.int32), _per_row(top_p, t.shape, jnp.float32)
    any_filter = jnp.any(p < 1) | jnp.any((k > 0) & (k < V))
    sampled = jax.lax.cond(any_filter, lambda: _logprob_at(filtered, tokens), lambda: behaviour)
    return tokens, behaviour, jnp.where(t > 0, sampled, behaviour)
