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
import numpy as np
import optax

from tau2jax.learn.sft_step import accumulate_gradients, apply_gradients
from tau2jax.learn.train_state import TrainState
from tau2jax.models import qwen3
from tau2jax.rl import losses
from tau2jax.rl.logprobs import lm_head_weight, token_logprobs_and_entropy


# what rl.batch.build_batch puts in a batch
BATCH_KEYS = ("tokens", "targets", "loss_mask", "behaviour_logprobs", "temperature", "advantages",
              "policy_version", "group", "segment_ids", "positions")


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


def _policy_loss_fn(model_cfg, loss_cfg: losses.PolicyLossConfig, forward_kw: dict):
    """loss_fn(params, micro, ref_params) -> ((loss_sum, count), metrics), as accumulate_gradients wants."""

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
        # "kl" / "entropy" stay the loss's own (agg_mode); diagnostics adds their token means
        metrics |= losses.diagnostics(*args, ref_logp=ref_logp, entropy=entropy)
        return (loss_sum, count), metrics

    return loss_fn


def _finish(state: TrainState, tx, schedule, grads, loss_sum, count, metrics):
    """Divide the sums once by the global count of trained tokens and take the optimizer step."""
    denom = jnp.maximum(count, 1.0)
    new_state, grad_norm = apply_gradients(state, tx, grads, denom)
    out = losses.metric_values(metrics) | {"loss": loss_sum / denom, "loss_count": count,
                                           "grad_norm": grad_norm, "lr": schedule(state.step)}
    return new_state, out


def make_grpo_step(model_cfg, tx: optax.GradientTransformation, schedule, loss_cfg: losses.PolicyLossConfig, *,
                   grad_accum=1, **forward_kw):
    """-> step(state, batch, ref_params) -> (state, metrics), one executable per batch shape, the
    batch split into `grad_accum` micro-batches. `ref_params` may be None when loss_cfg.kl_coef == 0.
    forward_kw: compute_dtype, remat, loss_chunk, vocab_chunk, attn_chunk, attn_impl, attn_max_segments."""
    loss_fn = _policy_loss_fn(model_cfg, loss_cfg, forward_kw)

    def step(state: TrainState, batch, ref_params):
        sums = accumulate_gradients(lambda p, mb: loss_fn(p, mb, ref_params), state.params, batch, grad_accum,
                                    losses.merge_metrics, losses.empty_metrics)
        return _finish(state, tx, schedule, *sums)

    return step


def micro_batched_grpo_step(model_cfg, tx: optax.GradientTransformation, schedule,
                            loss_cfg: losses.PolicyLossConfig, shardings: TrainState, batch_sharding,
                            ref_shardings=None, *, micro_batch_rows: int, put=None, **forward_kw):
    """-> step(state, host_batch, ref_params) -> (state, metrics) for batches of any multiple of
    `micro_batch_rows` rows. A step's row count follows its rollouts, so one executable per row
    count would compile again whenever a new count appears mid-run; here the host loops over
    micro-batches of a fixed shape (rows j, j+n, j+2n, ... as accumulate_gradients splits them)
    through three executables compiled once (first micro-batch, each further one, the update),
    summing gradients on device. Same result as make_grpo_step with grad_accum = rows / micro.
    `step.compiles()` counts the executables compiled so far. With several processes the batch is
    this process's rows, `micro_batch_rows` its share of a micro-batch, and `put` (host dict ->
    global arrays) joins every process's micro-batch j into the global one."""
    loss_fn = _policy_loss_fn(model_cfg, loss_cfg, forward_kw)
    batch_in = {k: batch_sharding for k in BATCH_KEYS}
    put = put or (lambda b: jax.device_put(b, batch_in))

    def grads_of(params, micro, ref_params):
        return accumulate_gradients(lambda p, mb: loss_fn(p, mb, ref_params), params, micro, 1)

    def add(params, sums, micro, ref_params):
        g, s, n, m = grads_of(params, micro, ref_params)
        return (jax.tree.map(jnp.add, sums[0], g), sums[1] + s, sums[2] + n, losses.merge_metrics(sums[3], m))

    sums_out = (shardings.params, None, None, None)
    first = jax.jit(grads_of, in_shardings=(shardings.params, batch_in, ref_shardings), out_shardings=sums_out)
    more = jax.jit(add, in_shardings=(shardings.params, sums_out, batch_in, ref_shardings),
                   out_shardings=sums_out, donate_argnums=(1,))
    finish = jax.jit(lambda state, sums: _finish(state, tx, schedule, *sums), in_shardings=(shardings, sums_out),
                     out_shardings=(shardings, None), donate_argnums=(0,))

    def step(state: TrainState, batch, ref_params):
        rows = batch["tokens"].shape[0]
        if rows % micro_batch_rows:
            raise ValueError(f"{rows} rows are not a multiple of micro_batch_rows={micro_batch_rows}")
        n = rows // micro_batch_rows
        sums = None
        for j in range(n):
            micro = put({k: np.asarray(batch[k])[j::n] for k in BATCH_KEYS})
            sums = first(state.params, micro, ref_params) if sums is None else more(state.params, sums, micro,
                                                                                   ref_params)
        return finish(state, sums)

    step.compiles = lambda: first._cache_size() + more._cache_size() + finish._cache_size()
    return step


def jit_grpo_step(step_fn, shardings: TrainState, batch_sharding, ref_shardings=None):
    """Explicit shardings; the state is donated; the reference params (sharded like the policy:
    `ref_shardings` = the param shardings, None when there is no reference) are not."""
    batch_in = {k: batch_sharding for k in BATCH_KEYS}
    return jax.jit(step_fn, in_shardings=(shardings, batch_in, ref_shardings),
                   out_shardings=(shardings, None), donate_argnums=(0,))
