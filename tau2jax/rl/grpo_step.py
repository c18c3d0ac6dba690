"""The GRPO train step: the policy loss over packed trajectory rows, on the SFT step's machinery.

Batches come from `rl.batch.build_batch` ([B, T] arrays). The learner's log-probs and entropy are
recomputed at each token's rollout temperature (`rl.logprobs`, chunked, no [B, T, V] logits); the
frozen reference's log-probs come from the same forward on `ref_params` (sharded like the policy,
no gradient) when the KL term is on. Gradient accumulation, the (sum, count) division and the
optimizer update are `learn.sft_step`'s, so micro-batches and data-parallel averages are exact.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from tau2jax.learn.sft_step import accumulate_gradients, apply_gradients
from tau2jax.learn.train_state import TrainState
from tau2jax.models import qwen3
from tau2jax.rl import losses
from tau2jax.rl.logprobs import lm_head_weight, token_logprobs_and_entropy


def learner_logprobs(params, model_cfg, batch, *, compute_dtype=jnp.float32, remat="none", loss_chunk=0,
                     vocab_chunk=0, attn_chunk=0, attn_impl="xla", attn_max_segments=16, needed=None):
    """(log p(target), entropy) per token [B, T] at each token's rollout temperature; with `needed`
    [B, T] bool, 0 in length chunks (`loss_chunk`) that hold no needed token (they skip the head)."""
    hidden = qwen3.forward(params, model_cfg, batch["tokens"], batch["positions"], batch["segment_ids"],
                           compute_dtype=compute_dtype, remat=remat, return_hidden=True,
                           attn_chunk=attn_chunk, attn_impl=attn_impl, attn_max_segments=attn_max_segments)
    return token_logprobs_and_entropy(hidden, batch["targets"], lm_head_weight(params, model_cfg).astype(hidden.dtype),
                                      batch["temperature"], chunk=loss_chunk, vocab_chunk=vocab_chunk,
                                      needed=needed)


def make_grpo_step(model_cfg, tx: optax.GradientTransformation, schedule, loss_cfg: losses.PolicyLossConfig, *,
                   grad_accum=1, micro_batch_rows=0, **forward_kw):
    """-> step(state, batch, ref_params) -> (state, metrics). `ref_params` may be None when
    loss_cfg.kl_coef == 0. forward_kw: compute_dtype, remat, loss_chunk, vocab_chunk, attn_chunk, attn_impl, attn_max_segments.

    A step's row count follows its rollouts (rl.batch buckets it), so memory is bounded per
    micro-batch: with `micro_batch_rows` > 0 the step accumulates rows // micro_batch_rows
    micro-batches (the batch's rows must be a multiple), else `grad_accum` of them."""

    def loss_fn(params, micro, ref_params):
        # only trained tokens enter the loss and diagnostics: prompt-only chunks skip the vocabulary head
        needed = micro["loss_mask"] > 0
        logp, entropy = learner_logprobs(params, model_cfg, micro, needed=needed, **forward_kw)
        ref_logp = None
        if ref_params is not None:
            ref_logp = jax.lax.stop_gradient(
                learner_logprobs(ref_params, model_cfg, micro, needed=needed, **forward_kw)[0])
        args = (loss_cfg, logp, micro["behaviour_logprobs"], micro["advantages"],
                micro["loss_mask"].astype(jnp.float32), micro["segment_ids"])
        loss_sum, count, metrics = losses.policy_loss(*args, ref_logp=ref_logp, entropy=entropy)
        metrics |= losses.diagnostics(*args, ref_logp=ref_logp, entropy=entropy)
        return (loss_sum, count), metrics

    def step(state: TrainState, batch, ref_params):
        rows = batch["tokens"].shape[0]
        if micro_batch_rows and rows % micro_batch_rows:
            raise ValueError(f"{rows} rows are not a multiple of micro_batch_rows={micro_batch_rows}")
        n_micro = rows // micro_batch_rows if micro_batch_rows else grad_accum
        grads, loss_sum, count, metrics = accumulate_gradients(
            lambda p, mb: loss_fn(p, mb, ref_params), state.params, batch, n_micro, losses.merge_metrics,
            losses.empty_metrics)
        denom = jnp.maximum(count, 1.0)
        new_state, grad_norm = apply_gradients(state, tx, grads, denom)
        out = losses.metric_values(metrics) | {"loss": loss_sum / denom, "loss_count": count,
                                               "grad_norm": grad_norm, "lr": schedule(state.step)}
        return new_state, out

    return step


def jit_grpo_step(step_fn, shardings: TrainState, batch_sharding, ref_shardings=None):
    """Explicit shardings; the state is donated; the reference params (sharded like the policy:
    `ref_shardings` = the param shardings, None when there is no reference) are not."""
    batch_in = {k: batch_sharding for k in
                ("tokens", "targets", "loss_mask", "behaviour_logprobs", "temperature", "advantages",
                 "policy_version", "group", "segment_ids", "positions")}
    return jax.jit(step_fn, in_shardings=(shardings, batch_in, ref_shardings),
                   out_shardings=(shardings, None), donate_argnums=(0,))
