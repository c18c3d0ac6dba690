"""Qwen3 decoder: parity with transformers, KV-cache decoding, packing, remat, configs."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from tau2jax.models import configs, qwen3

VOCAB = 512  # small vocabulary keeps the tests fast; the architecture is the tiny model's


def tiny_cfg(**kw):
    return configs.get_model_config("tiny", vocab_size=VOCAB, **kw)


def hf_model(cfg, seed=0):
    """Random transformers Qwen3 with non-trivial norm weights (HF initialises them to 1)."""
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(Qwen3Config(**configs.to_hf_config(cfg, "float32"))).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
    return model


def params_from_hf(model, cfg):
    """HF state_dict -> our params (the transposes of the CONTRACTS.md table, inline)."""
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    D, H, K, Dh = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim

    def stack(name, fn=lambda w: w):
        return jnp.asarray(np.stack([fn(sd[f"model.layers.{i}.{name}"]) for i in range(cfg.num_layers)]))

    params = {
        "embed": jnp.asarray(sd["model.embed_tokens.weight"]),
        "final_norm": jnp.asarray(sd["model.norm.weight"]),
        "layers": {
            "attn_norm": stack("input_layernorm.weight"),
            "q_proj": stack("self_attn.q_proj.weight", lambda w: w.T.reshape(D, H, Dh)),
            "k_proj": stack("self_attn.k_proj.weight", lambda w: w.T.reshape(D, K, Dh)),
            "v_proj": stack("self_attn.v_proj.weight", lambda w: w.T.reshape(D, K, Dh)),
            "o_proj": stack("self_attn.o_proj.weight", lambda w: w.T.reshape(H, Dh, D)),
            "q_norm": stack("self_attn.q_norm.weight"),
            "k_norm": stack("self_attn.k_norm.weight"),
            "mlp_norm": stack("post_attention_layernorm.weight"),
            "gate_proj": stack("mlp.gate_proj.weight", lambda w: w.T),
            "up_proj": stack("mlp.up_proj.weight", lambda w: w.T),
            "down_proj": stack("mlp.down_proj.weight", lambda w: w.T),
        },
    }
    if not cfg.tie_word_embeddings:
        params["lm_head"] = jnp.asarray(sd["lm_head.weight"].T)
    return params


@functools.partial(jax.jit, static_argnames=("cfg", "compute_dtype", "remat"))
def fwd(params, tokens, positions, segment_ids, cfg, compute_dtype=jnp.float32, remat="none"):
    return qwen3.forward(params, cfg, tokens, positions, segment_ids, compute_dtype=compute_dtype, remat=remat)


def _inputs(B, T, seed=0, offset=0):
    tokens = np.random.RandomState(seed).randint(0, VOCAB, (B, T)).astype(np.int32)
    positions = np.broadcast_to(np.arange(offset, offset + T, dtype=np.int32), (B, T))
    return tokens, positions, np.ones((B, T), np.int32)


@pytest.mark.parametrize("tied", [True, False])
def test_logits_match_transformers(tied):
    cfg = tiny_cfg(tie_word_embeddings=tied)
    model = hf_model(cfg)
    params = params_from_hf(model, cfg)
    # Positions start at 1000 so RoPE at large angles (rope_theta) is exercised too.
    tokens, positions, segs = _inputs(2, 16, offset=1000)
    with torch.no_grad():
        ref = model(torch.tensor(tokens, dtype=torch.long), position_ids=torch.tensor(positions, dtype=torch.long)).logits.numpy()
    out = np.asarray(fwd(params, tokens, positions, segs, cfg))
    assert out.dtype == np.float32 and out.shape == (2, 16, VOCAB)
    assert np.abs(out - ref).max() <= 1e-4

    if tied:
        # bf16 compute vs the fp32 reference, next to transformers' own bf16 error. Measured
        # (3 seeds, logits std ~0.16): ours 0.0052-0.0064, transformers bf16 0.0055. A wrong norm
        # or RoPE detail gives errors of order 0.1, well above these bounds.
        out16 = np.asarray(fwd(params, tokens, positions, segs, cfg, compute_dtype=jnp.bfloat16))
        with torch.no_grad():
            ref16 = model.to(torch.bfloat16)(torch.tensor(tokens, dtype=torch.long),
                                             position_ids=torch.tensor(positions, dtype=torch.long)).logits
        err16, hf_err16 = np.abs(out16 - ref).max(), np.abs(ref16.float().numpy() - ref).max()
        assert out16.dtype == np.float32
        assert err16 <= 0.02 and err16 <= 2 * hf_err16


def test_num_params_matches_transformers():
    for tied in (True, False):
        cfg = tiny_cfg(tie_word_embeddings=tied)
        model = Qwen3ForCausalLM(Qwen3Config(**configs.to_hf_config(cfg, "float32")))
        assert configs.num_params(cfg) == sum(p.numel() for p in model.parameters())
        params = jax.eval_shape(lambda: qwen3.init_params(cfg, jax.random.key(0)))
        assert configs.num_params(cfg) == sum(x.size for x in jax.tree.leaves(params))
        shapes = jax.tree.map(lambda x: x.ndim, params)
        assert jax.tree.map(len, qwen3.param_axes(cfg), is_leaf=lambda x: isinstance(x, tuple)) == shapes


def test_kv_cache_decode_matches_full_forward():
    cfg = tiny_cfg()
    params = qwen3.init_params(cfg, jax.random.key(1))
    B, full_len, max_len = 2, 10, 16
    seqs = np.random.RandomState(3).randint(0, VOCAB, (B, full_len)).astype(np.int32)
    prompt_lens = np.array([6, 3])
    step = jax.jit(functools.partial(qwen3.forward_cached, cfg=cfg))

    def run(tokens, cache, lengths, valid):
        return step(params, tokens=tokens, cache=cache, lengths=lengths, valid=valid)

    # Prefill: one right-padded chunk holding both prompts.
    T0 = prompt_lens.max()
    valid = np.arange(T0)[None] < prompt_lens[:, None]
    chunk = np.where(valid, seqs[:, :T0], 0)
    cache = qwen3.init_cache(cfg, B, max_len)
    got = [[] for _ in range(B)]
    logits, cache = run(chunk, cache, jnp.zeros(B, jnp.int32), valid)
    for b in range(B):
        got[b].append(np.asarray(logits[b, : prompt_lens[b]]))
    lengths = prompt_lens.copy()
    # A 2-token chunk where row 1 has only one valid token, then token-by-token decoding.
    valid2 = np.array([[True, True], [True, False]])
    chunk2 = np.stack([seqs[0, 6:8], [seqs[1, 3], 0]])
    logits, cache = run(chunk2, cache, jnp.asarray(lengths), valid2)
    got[0].append(np.asarray(logits[0])), got[1].append(np.asarray(logits[1, :1]))
    lengths += valid2.sum(1)
    while lengths.min() < full_len:
        tok = seqs[np.arange(B), np.minimum(lengths, full_len - 1)][:, None]
        ok = (lengths < full_len)[:, None]
        logits, cache = run(tok, cache, jnp.asarray(lengths), ok)
        for b in range(B):
            if ok[b, 0]:
                got[b].append(np.asarray(logits[b]))
        lengths += ok[:, 0]

    _, positions, segs = _inputs(B, full_len)
    ref = np.asarray(fwd(params, seqs, positions, segs, cfg))
    for b in range(B):
        np.testing.assert_allclose(np.concatenate(got[b]), ref[b], atol=1e-5, rtol=0)


def test_cache_writes_past_max_len_are_dropped():
    cfg = tiny_cfg(num_layers=1)
    params = qwen3.init_params(cfg, jax.random.key(2))
    cache = qwen3.init_cache(cfg, 1, 4)
    tokens = np.array([[5, 6, 7]], np.int32)
    logits, cache = jax.jit(qwen3.forward_cached, static_argnums=1)(
        params, cfg, tokens, cache, jnp.array([2]), jnp.array([[True, False, False]]))
    k = np.asarray(cache["k"][0, 0])
    assert np.all(k[[0, 1, 3]] == 0) and np.any(k[2] != 0)  # only the one valid token landed, in slot 2
    assert np.isfinite(np.asarray(logits)).all()


def test_packed_segments_match_separate_sequences():
    cfg = tiny_cfg()
    params = qwen3.init_params(cfg, jax.random.key(4))
    a, b = _inputs(1, 5, seed=5)[0][0], _inputs(1, 4, seed=6)[0][0]
    tokens = np.concatenate([a, b, [0, 0, 0]])[None]
    positions = np.concatenate([np.arange(5), np.arange(4), np.zeros(3, int)])[None].astype(np.int32)
    segs = np.array([[1] * 5 + [2] * 4 + [0] * 3], np.int32)
    packed = np.asarray(fwd(params, tokens, positions, segs, cfg))
    assert np.isfinite(packed).all()  # padding tail included
    for seq, sl in ((a, slice(0, 5)), (b, slice(5, 9))):
        n = len(seq)
        alone = np.asarray(fwd(params, seq[None], np.arange(n)[None], np.ones((1, n), np.int32), cfg))
        np.testing.assert_allclose(packed[:, sl], alone, atol=1e-5, rtol=0)


def test_remat_gives_identical_gradients():
    cfg = tiny_cfg()
    params = qwen3.init_params(cfg, jax.random.key(7))
    tokens, positions, segs = _inputs(2, 8, seed=8)

    def loss(p, remat):
        logits = qwen3.forward(p, cfg, tokens, positions, segs, remat=remat)
        logp = jax.nn.log_softmax(logits[:, :-1])
        return -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1).mean()

    # One jit for all the policies: a single (slow, on CPU) compile instead of four.
    g_none, *others = jax.jit(lambda p: [jax.grad(loss)(p, r) for r in ("none", "full", "dots", "attn")])(params)
    for g in others:
        for x, y in zip(jax.tree.leaves(g_none), jax.tree.leaves(g)):
            np.testing.assert_allclose(x, y, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="remat must be one of"):
        qwen3.forward(params, cfg, tokens, positions, segs, remat="sometimes")


def test_model_configs():
    with pytest.raises(ValueError, match="qwen3_4b"):
        configs.get_model_config("qwen3_5b")
    with pytest.raises(ValueError, match="unknown ModelConfig field"):
        configs.get_model_config("tiny", hidden=3)
    big = configs.get_model_config("qwen3_4b")
    assert (big.hidden_size, big.num_layers, big.rope_theta, big.max_position_embeddings) == (2560, 36, 5e6, 262144)
    assert round(configs.num_params(big) / 1e9, 2) == 4.02  # the published 4.0B
    assert configs.flops_per_token(big, 4096) > 6 * configs.num_params(big, include_embedding=False)

    hf = Qwen3Config(**configs.to_hf_config(big)).to_dict()  # transformers accepts it
    assert configs.from_hf_config(hf) == big
    # Classic config.json keys, as the published checkpoints have them.
    legacy = {k: v for k, v in configs.to_hf_config(big).items() if k != "rope_parameters"}
    assert configs.from_hf_config(legacy) == big
    with pytest.raises(ValueError, match="rope scaling"):
        configs.from_hf_config({**legacy, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(ValueError, match="MoE"):
        configs.from_hf_config({**legacy, "model_type": "qwen3_moe"})


def test_chunked_attention_equals_dense_on_packed_rows():
    """Query-chunked attention (long tau2 rows) gives the dense result, values and gradients."""
    cfg = configs.get_model_config("tiny", vocab_size=512)
    params = qwen3.init_params(cfg, jax.random.key(3))
    rng = np.random.default_rng(0)
    T = 32
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, T)), jnp.int32)
    seg = np.zeros((2, T), np.int32); pos = np.zeros((2, T), np.int32)
    for row, cuts in enumerate([(0, 11, 27), (0, 5, 20)]):  # two segments, then padding
        for s_id, (a, b) in enumerate(zip(cuts[:-1], cuts[1:]), start=1):
            seg[row, a:b] = s_id; pos[row, a:b] = np.arange(b - a)
    seg, pos = jnp.asarray(seg), jnp.asarray(pos)

    def loss(p, chunk):
        return qwen3.forward(p, cfg, tokens, pos, seg, attn_chunk=chunk).astype(jnp.float32).mean()

    dense = qwen3.forward(params, cfg, tokens, pos, seg)
    chunked = qwen3.forward(params, cfg, tokens, pos, seg, attn_chunk=8)
    np.testing.assert_allclose(np.asarray(chunked), np.asarray(dense), atol=1e-5, rtol=0)
    g_dense = jax.grad(loss)(params, 0)
    g_chunk = jax.grad(loss)(params, 8)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=0), g_chunk, g_dense)
    with pytest.raises(ValueError, match="attn_chunk=12 does not divide"):  # no silent dense fallback
        qwen3.forward(params, cfg, tokens, pos, seg, attn_chunk=12)


def test_flash_attention_kernel_equals_xla_on_packed_rows():
    """The Pallas flash kernel (interpreted on CPU) computes the same packed causal attention,
    with GQA, as the XLA path: values and gradients."""
    rng = np.random.default_rng(1)
    B, T, H, K, Dh = 1, 128, 4, 2, 16
    q, k, v = (jnp.asarray(rng.standard_normal((B, T, n, Dh)), jnp.float32) for n in (H, K, K))
    seg = np.zeros((B, T), np.int32)
    seg[0, :50], seg[0, 50:110] = 1, 2  # two conversations, then padding
    seg = jnp.asarray(seg)
    scale = Dh ** -0.5

    def f(impl, q, k, v):
        out = qwen3.segment_causal_attention(q, k, v, seg, scale, impl=impl)
        return (out * (seg > 0)[:, :, None, None]).sum(), out

    (_, ref), g_ref = jax.value_and_grad(functools.partial(f, "xla"), argnums=(0, 1, 2), has_aux=True)(q, k, v)
    (_, out), g_out = jax.value_and_grad(functools.partial(f, "flash"), argnums=(0, 1, 2), has_aux=True)(q, k, v)
    real = np.asarray(seg > 0)[0]
    # Interpreted on CPU the kernel is exact to fp32 rounding; on a GPU its fp32 dots run in TF32
    # (measured 7.5e-4 on an H100).
    tol = 1e-5 if jax.default_backend() == "cpu" else 2e-3
    np.testing.assert_allclose(np.asarray(out)[0, real], np.asarray(ref)[0, real], atol=tol, rtol=0)
    for a, b in zip(g_out, g_ref):
        np.testing.assert_allclose(np.asarray(a)[0, real], np.asarray(b)[0, real], atol=10 * tol, rtol=0)


def _packed_segments(B, T, rng):
    """Rows of random contiguous segments (ids 1, 2, ...), some ending in padding (id 0)."""
    seg = np.zeros((B, T), np.int32)
    for b in range(B):
        cuts = np.sort(rng.choice(np.arange(1, T), size=rng.integers(0, 5), replace=False))
        bounds = [0, *cuts, T]
        for i in range(len(bounds) - 1):
            seg[b, bounds[i]:bounds[i + 1]] = i + 1
        if b % 2:
            seg[b, T - rng.integers(1, T // 3):] = 0
    return seg


def test_segment_runs_encode_exactly_the_packed_causal_mask():
    """cuDNN's packed layout (offsets + lengths per run) describes the same attention mask as the
    segment ids: same-segment, causal; padding attends within its own run. Rows with fewer runs
    than max_segments fill with -1, as cuDNN's packed API wants."""
    rng = np.random.default_rng(0)
    B, T, M = 6, 40, 8
    seg = _packed_segments(B, T, rng)
    assert qwen3.count_segments(seg) <= M
    offsets, lengths = map(np.asarray, qwen3.segment_runs(jnp.asarray(seg), M))
    assert offsets.shape == (B, M + 1) and lengths.shape == (B, M)
    idx = np.arange(T)
    want = (seg[:, :, None] == seg[:, None, :]) & (idx[:, None] >= idx[None, :])
    for b in range(B):
        n = int((lengths[b] >= 0).sum())
        assert n == 1 + int((seg[b, 1:] != seg[b, :-1]).sum())
        assert (offsets[b, n:] == -1).all() and (lengths[b, n:] == -1).all()
        run = np.full(T, -1)
        for r in range(n):
            run[offsets[b, r]:offsets[b, r] + lengths[b, r]] = r
        assert (run >= 0).all() and lengths[b, :n].sum() == T
        got = (run[:, None] == run[None, :]) & (idx[:, None] >= idx[None, :])
        np.testing.assert_array_equal(got, want[b])


def test_too_many_segments_for_cudnn_is_refused_by_name():
    seg = np.repeat(np.arange(1, 11, dtype=np.int32), 4)[None]  # 10 segments
    qwen3.check_segments(seg, 10)
    with pytest.raises(ValueError, match="model.attn_max_segments=8"):
        qwen3.check_segments(seg, 8)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN attention runs on NVIDIA GPUs only")
def test_cudnn_attention_equals_xla_on_packed_rows():
    """GPU: the cuDNN packed-layout path computes the XLA path's attention (bf16, GQA, several
    segments and padding a row): values and gradients."""
    rng = np.random.default_rng(1)
    B, T, H, K, Dh = 4, 256, 8, 2, 128
    q, k, v = (jnp.asarray(rng.standard_normal((B, T, n, Dh)), jnp.bfloat16) for n in (H, K, K))
    seg = jnp.asarray(_packed_segments(B, T, rng))

    def f(impl, q, k, v):
        out = qwen3.segment_causal_attention(q, k, v, seg, Dh ** -0.5, impl=impl, max_segments=8)
        return (out.astype(jnp.float32) * (seg > 0)[:, :, None, None]).sum(), out

    grad = functools.partial(jax.value_and_grad, argnums=(0, 1, 2), has_aux=True)
    (_, ref), g_ref = grad(functools.partial(f, "xla"))(q, k, v)
    (_, out), g_out = grad(functools.partial(f, "cudnn"))(q, k, v)
    real = np.asarray(seg > 0)
    f32 = lambda x: np.asarray(x.astype(jnp.float32))
    np.testing.assert_allclose(f32(out)[real], f32(ref)[real], atol=3e-2, rtol=0)
    for a, b in zip(g_out, g_ref):
        np.testing.assert_allclose(f32(a)[real], f32(b)[real], atol=1e-1, rtol=3e-2)


def _primitive_counts(jaxpr, counts=None):
    """How often each primitive occurs in a jaxpr, sub-jaxprs (scan body, kernels' calls) included."""
    import collections

    counts = collections.Counter() if counts is None else counts
    for eqn in jaxpr.eqns:
        counts[eqn.primitive.name] += 1
        for value in eqn.params.values():
            for sub in value if isinstance(value, (list, tuple)) else [value]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    _primitive_counts(inner, counts)
    return counts


def test_attn_remat_recomputes_only_the_mlp_matmuls_and_never_the_attention_kernel():
    """remat="attn" keeps the q/k/v projections, the flash kernel's outputs (and so its softmax
    statistics) and the post-attention residual: the backward pass re-runs no attention kernel and
    only the gate/up matmuls, where "full" re-runs the kernel and every projection. Same gradients."""
    cfg = tiny_cfg(num_layers=2)
    params = qwen3.init_params(cfg, jax.random.key(3))
    T = 128  # the flash kernel's block
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, VOCAB, (1, T)), jnp.int32)
    positions, segs = jnp.arange(T, dtype=jnp.int32)[None], jnp.ones((1, T), jnp.int32)

    def grad(remat):
        return jax.grad(lambda p: qwen3.forward(p, cfg, tokens, positions, segs, remat=remat, attn_impl="flash").sum())

    counts = {r: _primitive_counts(jax.make_jaxpr(grad(r))(params).jaxpr) for r in ("none", "full", "attn")}
    assert counts["attn"]["pallas_call"] == counts["none"]["pallas_call"] < counts["full"]["pallas_call"]
    assert counts["attn"]["dot_general"] == counts["none"]["dot_general"] + 2  # gate and up
    assert counts["full"]["dot_general"] >= counts["none"]["dot_general"] + 7  # every projection
    g_none, g_attn = grad("none")(params), grad("attn")(params)
    for x, y in zip(jax.tree.leaves(g_none), jax.tree.leaves(g_attn)):  # gradients ~1: fp32 reordering
        np.testing.assert_allclose(x, y, atol=1e-5, rtol=1e-4)
