"""The vocabulary head skips length chunks that hold no trained token, in the SFT loss and the RL
log-probs alike, without changing the loss or its gradients."""

import jax
import jax.numpy as jnp
import numpy as np

from tau2jax.learn.loss import chunked_token_logprobs
from tau2jax.rl.logprobs import token_logprobs_and_entropy


def _head_inputs(seed=0, b=2, t=16, d=8, v=32):
    k = jax.random.split(jax.random.key(seed), 3)
    hidden = jax.random.normal(k[0], (b, t, d))
    w = jax.random.normal(k[1], (v, d))
    targets = jax.random.randint(k[2], (b, t), 0, v)
    mask = np.zeros((b, t), bool)
    mask[0, 5:7] = mask[1, 13] = True  # chunks of 4: two of the four hold a trained token
    return hidden, w, targets, jnp.asarray(mask)


def test_skipping_chunks_without_loss_keeps_the_loss_and_its_gradients():
    hidden, w, targets, mask = _head_inputs()

    def loss(h, w, needed):
        lp = chunked_token_logprobs(h, targets, lambda x: x @ w.T, 4, needed=needed)
        return -(lp * mask).sum(), lp

    (full, lp_full), g_full = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(hidden, w, None)
    (skip, lp_skip), g_skip = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(hidden, w, mask)
    np.testing.assert_allclose(skip, full, rtol=1e-6)
    for a, b in zip(g_skip, g_full):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # skipped: chunks 0 and 2 of row 0's chunk grid (no row has a trained token there) are zeros
    assert np.all(np.asarray(lp_skip)[:, 0:4] == 0) and np.all(np.asarray(lp_full)[:, 0:4] != 0)
    np.testing.assert_allclose(np.asarray(lp_skip)[np.asarray(mask)], np.asarray(lp_full)[np.asarray(mask)], rtol=1e-6)


def test_rl_logprobs_skip_chunks_without_trained_tokens_too():
    hidden, w, targets, mask = _head_inputs(seed=1)

    def objective(h, w, needed):
        lp, ent = token_logprobs_and_entropy(h, targets, w, 0.7, chunk=4, vocab_chunk=8, needed=needed)
        return ((lp + 0.1 * ent) * mask).sum()

    full, g_full = jax.value_and_grad(objective, argnums=(0, 1))(hidden, w, None)
    skip, g_skip = jax.value_and_grad(objective, argnums=(0, 1))(hidden, w, mask)
    np.testing.assert_allclose(skip, full, rtol=1e-6)
    for a, b in zip(g_skip, g_full):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
