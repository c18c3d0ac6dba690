"""Learner log-probs / entropies at the rollout temperature: equal to the dense computation (values
and gradients) for every length / vocab chunking, equal to the engine's behaviour log-probs, and
without [B, T, V] logits in memory."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tau2jax.inference import sampling
from tau2jax.models import qwen3
from tau2jax.models.configs import get_model_config
from tau2jax.rl.logprobs import lm_head_weight, token_logprobs_and_entropy

B, T, D, V = 2, 8, 16, 37  # V prime: every vocab chunk below leaves a ragged last block


def _inputs(seed=0):
    k = jax.random.split(jax.random.key(seed), 3)
    hidden = jax.random.normal(k[0], (B, T, D))
    head_w = 0.7 * jax.random.normal(k[1], (V, D))
    targets = jax.random.randint(k[2], (B, T), 0, V)
    return hidden, head_w, targets


# Per token: row 0 holds a T=0.7 trajectory then a greedy (T=0) one, row 1 a T=1.3 one.
TEMP_TOKEN = jnp.array([[0.7] * 4 + [0.0] * 4, [1.3] * 8])


def _dense(hidden, head_w, targets, temperature):
    t = jnp.broadcast_to(jnp.asarray(temperature, jnp.float32).reshape(-1, 1) if jnp.ndim(temperature) == 1
                         else jnp.asarray(temperature, jnp.float32), (B, T))
    logp_all = jax.nn.log_softmax(hidden @ head_w.T / jnp.where(t > 0, t, 1.0)[..., None], axis=-1)
    logp = jnp.take_along_axis(logp_all, targets[..., None], axis=-1)[..., 0]
    return logp, -(jnp.exp(logp_all) * logp_all).sum(-1)


CHUNKS = [(0, 0), (4, 0), (2, 8), (8, 10), (4, 36), (1, 1)]
TEMPS = {"scalar": 0.8, "per_row": jnp.array([0.5, 1.0]), "per_token": TEMP_TOKEN}


@pytest.mark.parametrize("chunk,vocab_chunk", CHUNKS)
@pytest.mark.parametrize("temp", sorted(TEMPS))
def test_equals_dense_log_softmax_and_entropy(chunk, vocab_chunk, temp):
    hidden, head_w, targets = _inputs()
    logp, ent = token_logprobs_and_entropy(hidden, targets, head_w, TEMPS[temp], chunk, vocab_chunk)
    ref_logp, ref_ent = _dense(hidden, head_w, targets, TEMPS[temp])
    np.testing.assert_allclose(logp, ref_logp, atol=1e-5)
    np.testing.assert_allclose(ent, ref_ent, atol=1e-5)


@pytest.mark.parametrize("chunk,vocab_chunk", CHUNKS)
def test_gradients_equal_dense(chunk, vocab_chunk):
    hidden, head_w, targets = _inputs(1)
    weights = jax.random.normal(jax.random.key(9), (2, B, T))  # an arbitrary mix of both outputs

    def objective(fn):
        def f(h, w):
            lp, ent = fn(h, w)
            return (weights[0] * lp + weights[1] * ent).sum()
        return jax.grad(f, argnums=(0, 1))(hidden, head_w)

    got = objective(lambda h, w: token_logprobs_and_entropy(h, targets, w, TEMP_TOKEN, chunk, vocab_chunk))
    want = objective(lambda h, w: _dense(h, w, targets, TEMP_TOKEN))
    for g, r in zip(got, want):
        np.testing.assert_allclose(g, r, atol=2e-5)


def test_equals_the_engines_behaviour_logprobs():
    # The engine samples with a top-k filter on; its behaviour log-prob is before the filter, and
    # the learner's recomputation must reproduce it from the same hidden states.
    hidden, head_w, _ = _inputs(2)
    logits = (hidden @ head_w.T).reshape(B * T, V)
    temp = TEMP_TOKEN.reshape(-1)
    keys = jax.random.split(jax.random.key(3), B * T)
    tokens, behaviour, sampled = sampling.sample(keys, logits, temp, 5, 1.0)
    tokens = tokens.reshape(B, T)
    logp, _ = token_logprobs_and_entropy(hidden, tokens, head_w, TEMP_TOKEN, chunk=4, vocab_chunk=8)
    np.testing.assert_allclose(logp, behaviour.reshape(B, T), atol=1e-5)
    np.testing.assert_allclose(logp, sampling.temperature_logprobs(logits, tokens.reshape(-1), temp).reshape(B, T),
                               atol=1e-5)
    assert not np.allclose(logp, sampled.reshape(B, T), atol=1e-3)  # the filtered one differs


@pytest.mark.parametrize("tie", [True, False])
def test_lm_head_weight_matches_the_model_head(tie):
    cfg = get_model_config("tiny", vocab_size=64, tie_word_embeddings=tie)
    params = qwen3.init_params(cfg, jax.random.key(0))
    hidden = jax.random.normal(jax.random.key(1), (1, 4, cfg.hidden_size))
    targets = jnp.arange(4)[None] * 7
    logp, _ = token_logprobs_and_entropy(hidden, targets, lm_head_weight(params, cfg), 1.0)
    ref = jax.nn.log_softmax(qwen3.logits_from_hidden(params, cfg, hidden), -1)
    np.testing.assert_allclose(logp, jnp.take_along_axis(ref, targets[..., None], -1)[..., 0], atol=1e-5)


def test_vocab_chunks_bound_the_memory_of_the_backward_pass():
    # Dense logits of one 256-token row over 8192 ids are 8 MiB; 32 x 512 blocks are 64 KiB.
    t, v, d = 256, 8192, 32
    hidden = jnp.ones((1, t, d))
    head_w = jnp.ones((v, d))
    targets = jnp.zeros((1, t), jnp.int32)

    def temp_bytes(chunk, vocab_chunk):
        f = lambda h, w: token_logprobs_and_entropy(h, targets, w, 0.7, chunk, vocab_chunk)[0].sum()  # noqa: E731
        return jax.jit(jax.grad(f, argnums=(0, 1))).lower(hidden, head_w).compile().memory_analysis().temp_size_in_bytes

    # Beyond the weight's own gradient (v·d floats, unavoidable), the chunked pass keeps under an
    # eighth of the dense logits; chunking the length alone (32 x 8192 blocks) does not.
    budget = head_w.nbytes + t * v * 4 / 8
    assert temp_bytes(0, 0) >= t * v * 4
    assert temp_bytes(32, 0) > budget
    assert temp_bytes(32, 512) < budget


def test_bad_shapes_are_rejected():
    hidden, head_w, targets = _inputs()
    with pytest.raises(ValueError, match=r"\[V, D\]"):
        token_logprobs_and_entropy(hidden, targets, head_w.T, 1.0)
