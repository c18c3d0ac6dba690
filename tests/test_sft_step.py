"""SFT step: packing exactness, sharded == single device, gradient accumulation exactness."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from tau2jax.learn.optimizer import make_optimizer
from tau2jax.learn.sft_step import jit_step, make_sft_step, sequence_logprobs
from tau2jax.learn.loss import masked_nll
from tau2jax.learn.train_state import create_state, state_shardings
from tau2jax.models import qwen3
from tau2jax.models.configs import get_model_config
from tau2jax.parallel import sharding

CFG = get_model_config("tiny", vocab_size=256)


def _optim(**kw):
    # eps=1e-3 keeps Adam's update Lipschitz in the gradient (lr/eps): with eps=1e-8 a gradient of
    # 1e-9 becomes a full ±lr step, so rounding-level gradient noise would dominate the comparison.
    c = ml_collections.ConfigDict(dict(lr=1e-2, schedule="cosine", warmup_frac=0.0, min_lr_ratio=0.0,
                                       weight_decay=0.01, b1=0.9, b2=0.999, eps=1e-3, clip_norm=1.0))
    c.update(kw)
    return c


def _row(rng, lengths, T):
    """One packed row: segments of the given lengths, then padding (segment 0)."""
    tokens = np.zeros(T, np.int32); targets = np.zeros(T, np.int32); mask = np.zeros(T, np.float32)
    pos = np.zeros(T, np.int32); seg = np.zeros(T, np.int32)
    off = 0
    for s, n in enumerate(lengths, start=1):
        seq = rng.integers(0, CFG.vocab_size, n + 1)
        tokens[off:off + n] = seq[:-1]; targets[off:off + n] = seq[1:]
        mask[off:off + n] = rng.random(n) < 0.6
        pos[off:off + n] = np.arange(n); seg[off:off + n] = s
        off += n
    return dict(tokens=tokens, targets=targets, loss_mask=mask, positions=pos, segment_ids=seg)


def _batch(seed, B=8, T=32):
    rng = np.random.default_rng(seed)
    rows = [_row(rng, [int(rng.integers(4, 14)), int(rng.integers(4, 14))], T) for _ in range(B)]
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def test_packed_loss_equals_sum_of_separate_losses():
    params = qwen3.init_params(CFG, jax.random.key(0))
    rng = np.random.default_rng(1)
    row = _row(rng, [9, 7, 5], 32)
    packed = jax.tree.map(lambda x: x[None], row)
    s_packed, n_packed = masked_nll(sequence_logprobs(params, CFG, packed), packed["loss_mask"])
    s_sep, n_sep = 0.0, 0.0
    for sid in (1, 2, 3):
        idx = np.where(row["segment_ids"] == sid)[0]
        one = {k: v[idx][None] for k, v in row.items()}
        s, n = masked_nll(sequence_logprobs(params, CFG, one), one["loss_mask"])
        s_sep += s; n_sep += n
    assert float(n_packed) == float(n_sep) > 0
    np.testing.assert_allclose(float(s_packed), float(s_sep), rtol=1e-5)


def _run_steps(mesh, batches, grad_accum=1):
    tx, schedule = make_optimizer(_optim(), total_steps=10)
    p_shard = qwen3.param_shardings(CFG, mesh)
    params = jax.jit(lambda k: qwen3.init_params(CFG, k), out_shardings=p_shard)(jax.random.key(0))
    shardings = state_shardings(tx, jax.eval_shape(lambda: params), p_shard, mesh)
    state = create_state(params, tx, shardings, seed=0)
    step = jit_step(make_sft_step(CFG, tx, schedule, grad_accum=grad_accum), shardings, sharding.batch_sharding(mesh))
    losses = []
    for b in batches:
        state, m = step(state, {k: jnp.asarray(v) for k, v in b.items()})
        losses.append(float(m["loss"]))
    return losses, jax.device_get(state.params)


def test_sharded_step_equals_single_device():
    assert jax.device_count() == 8
    batches = [_batch(0), _batch(0)]  # the same batch twice: the second loss must be lower
    one = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    eight = sharding.make_mesh(2, 2, 2)
    l1, p1 = _run_steps(one, batches)
    l8, p8 = _run_steps(eight, batches)
    np.testing.assert_allclose(l8, l1, atol=1e-5, rtol=0)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=0), p8, p1)
    assert l1[1] < l1[0]


def test_grad_accumulation_is_exact():
    """4 micro-batches of 1 row == 1 batch of 4 rows (same tokens, same update)."""
    batches = [_batch(7, B=4)]
    mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    l_full, p_full = _run_steps(mesh, batches, grad_accum=1)
    l_acc, p_acc = _run_steps(mesh, batches, grad_accum=4)
    np.testing.assert_allclose(l_acc, l_full, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=0), p_acc, p_full)
