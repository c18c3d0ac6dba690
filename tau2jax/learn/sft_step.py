"""The SFT train step: masked next-token loss over packed rows, gradient accumulation, AdamW.

Batches are dicts of [B, T] arrays: tokens, targets, loss_mask, positions, segment_ids
(see tau2jax/data/pipeline.py). Loss and gradients are accumulated as sums and divided once by the
global count of trained tokens, so 4 micro-batches of 1 row equal 1 batch of 4 rows, and the
data-parallel average is over tokens, not over devices.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from tau2jax.learn.loss import chunked_token_logprobs, masked_nll
from tau2jax.learn.train_state import TrainState
from tau2jax.models import qwen3


def sequence_logprobs(params, model_cfg, batch, *, compute_dtype=jnp.float32, remat="none", loss_chunk=0,
                      attn_chunk=0, attn_impl="xla", attn_max_segments=16):
    """log p(targets) per position [B, T], float32; 0 in length chunks (`loss_chunk`) where the batch's
    `loss_mask` (if any) has no trained token: those skip the vocabulary head."""
    hidden = qwen3.forward(params, model_cfg, batch["tokens"], batch["positions"], batch["segment_ids"],
                           compute_dtype=compute_dtype, remat=remat, return_hidden=True,
                           attn_chunk=attn_chunk, attn_impl=attn_impl, attn_max_segments=attn_max_segments)
    head = functools.partial(qwen3.logits_from_hidden, params, model_cfg)
    chunk = loss_chunk or hidden.shape[1]
    needed = batch["loss_mask"] > 0 if "loss_mask" in batch else None
    return chunked_token_logprobs(hidden, batch["targets"], head, chunk, needed=needed)


def accumulate_gradients(loss_fn, params, batch, grad_accum: int, merge_aux=None, aux_init=None):
    """Sum `loss_fn`'s gradients over `grad_accum` micro-batches of `batch`.

    loss_fn(params, micro) -> ((loss_sum, count), aux) with `aux` a pytree of sums (or whatever
    `merge_aux(a, b)` combines, starting from `aux_init(shapes)`; default: add, from zeros). Returns
    (grads, loss_sum, count, aux), all summed: the caller divides once by the global count, so
    accumulation and the data-parallel average are exact. Shared by the SFT and GRPO steps.
    """
    merge_aux = merge_aux or (lambda a, b: jax.tree.map(jnp.add, a, b))
    aux_init = aux_init or (lambda shapes: jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes))
    def split(p, mb):
        (s, n), aux = loss_fn(p, mb)
        return s, (n, aux)

    grad_fn = jax.value_and_grad(split, has_aux=True)
    if grad_accum == 1:  # no accumulator: saves a params-sized fp32 buffer on large models
        (loss_sum, (count, aux)), grads = grad_fn(params, batch)
        return grads, loss_sum, count, aux
    # Micro-batch i takes rows i, i+A, i+2A, …: each micro-batch stays spread over every
    # data-parallel device instead of living on a slice of them.
    micro = jax.tree.map(lambda x: x.reshape(-1, grad_accum, *x.shape[1:]).swapaxes(0, 1), batch)

    def add(carry, mb):
        g_acc, s_acc, n_acc, aux_acc = carry
        (s, (n, aux)), g = grad_fn(params, mb)
        return (jax.tree.map(jnp.add, g_acc, g), s_acc + s, n_acc + n, merge_aux(aux_acc, aux)), None

    # One traced copy of the backward pass (inside the scan): the carry starts from zeros and aux_init.
    aux_shapes = jax.eval_shape(lambda: split(params, jax.tree.map(lambda x: x[0], micro))[1][1])
    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), aux_init(aux_shapes))
    (grads, loss_sum, count, aux), _ = jax.lax.scan(add, init, micro)
    return grads, loss_sum, count, aux


def apply_gradients(state: TrainState, tx: optax.GradientTransformation, grads, denom):
    """Divide the summed gradients by `denom` and take one optimizer step. -> (state, grad_norm)."""
    grads = jax.tree.map(lambda g, p: (g / denom).astype(p.dtype), grads, state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    new_state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                              opt_state=opt_state)
    return new_state, optax.global_norm(grads)


def make_sft_step(model_cfg, tx: optax.GradientTransformation, schedule, *, grad_accum=1,
                  compute_dtype=jnp.float32, remat="none", loss_chunk=0, attn_chunk=0, attn_impl="xla",
                  attn_max_segments=16):
    def loss_fn(params, micro):
        lp = sequence_logprobs(params, model_cfg, micro, compute_dtype=compute_dtype, remat=remat,
                               loss_chunk=loss_chunk, attn_chunk=attn_chunk, attn_impl=attn_impl,
                               attn_max_segments=attn_max_segments)
        return masked_nll(lp, micro["loss_mask"]), {}

    def step(state: TrainState, batch):
        grads, loss_sum, count, _ = accumulate_gradients(loss_fn, state.params, batch, grad_accum)
        denom = jnp.maximum(count, 1.0)
        new_state, grad_norm = apply_gradients(state, tx, grads, denom)
        metrics = {"loss": loss_sum / denom, "tokens": count, "grad_norm": grad_norm, "lr": schedule(state.step)}
        return new_state, metrics

    return step


def jit_step(step_fn, shardings: TrainState, batch_sharding):
    """Explicit in/out shardings; the old state is donated so params and moments update in place."""
    return jax.jit(step_fn, in_shardings=(shardings, batch_sharding), out_shardings=(shardings, None),
                   donate_argnums=(0,))
