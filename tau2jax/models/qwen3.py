"""Qwen3 dense decoder as pure functions over a params pytree (see docs/CONTRACTS.md).

Numerics follow transformers' Qwen3 exactly: RMSNorm statistics in fp32 with the normalised value
cast back before the weight multiply, per-head q/k RMSNorm before RoPE, rotate_half RoPE with fp32
angles, GQA, SwiGLU. Layers are stacked on a leading axis and run with `jax.lax.scan`, so compile
time does not grow with depth. Weights are cast to `compute_dtype` one layer at a time inside the
scan (fp32 masters stay fp32); logits are always float32.
"""

from __future__ import annotations

import math

import numpy as np

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from tau2jax.models.configs import ModelConfig
from tau2jax.parallel.sharding import constrain, tree_shardings

# The layer body always runs inside lax.scan, where CSE across the remat boundary cannot happen,
# so prevent_cse=False is safe and avoids needless optimisation barriers.
_REMAT = {
    "none": lambda fn: fn,
    # Saves only the layer input; recomputes the whole layer in the backward pass.
    "full": lambda fn: jax.checkpoint(fn, prevent_cse=False),
    # Saves weight-matmul outputs (no batch dims). Plain checkpoint_dots would also save the
    # [B, H, T, T] attention scores, which cost more memory than everything else at long T.
    "dots": lambda fn: jax.checkpoint(fn, prevent_cse=False,
                                      policy=jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims),
    # Saves the q/k/v projections, the attention kernel's outputs (result and softmax statistics)
    # and the residual stream after attention: the backward pass recomputes only the MLP's gate/up
    # matmuls and the elementwise norms and RoPE, not the projections or the attention forward.
    "attn": lambda fn: jax.checkpoint(fn, prevent_cse=False, policy=_save_attention),
}
_ATTN_SAVED = ("q_proj", "k_proj", "v_proj", "attn_residual")
# Flash kernels (Pallas; cuDNN's fused-attention forward) return the softmax statistics the
# backward kernel needs as extra outputs: saving only the named result would recompute the kernel.
_ATTN_KERNELS = ("custom_vjp_call",)


def _save_attention(prim, *_, **params) -> bool:
    if prim.name == "name":
        return params["name"] in _ATTN_SAVED
    return prim.name in _ATTN_KERNELS


def _save_dots_and_kernels(prim, *_, **params) -> bool:
    return prim.name == "dot_general" or prim.name in _ATTN_KERNELS


def init_params(cfg: ModelConfig, key: jax.Array, dtype=jnp.float32) -> dict:
    """Normal(0, 0.02) weights, with the residual-output projections (o_proj, down_proj) scaled by
    1/sqrt(2L) so the residual stream's variance does not grow with depth; norm weights are 1."""
    V, D, F = cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size
    L, H, K, Dh = cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    ks = jax.random.split(key, 9)
    out_scale = (2 * L) ** -0.5

    def normal(k, shape, scale=1.0):
        return (0.02 * scale * jax.random.normal(k, shape, jnp.float32)).astype(dtype)

    def ones(shape):
        return jnp.ones(shape, dtype)

    params = {
        "embed": normal(ks[0], (V, D)),
        "layers": {
            "attn_norm": ones((L, D)),
            "q_proj": normal(ks[1], (L, D, H, Dh)),
            "k_proj": normal(ks[2], (L, D, K, Dh)),
            "v_proj": normal(ks[3], (L, D, K, Dh)),
            "o_proj": normal(ks[4], (L, H, Dh, D), out_scale),
            "q_norm": ones((L, Dh)),
            "k_norm": ones((L, Dh)),
            "mlp_norm": ones((L, D)),
            "gate_proj": normal(ks[5], (L, D, F)),
            "up_proj": normal(ks[6], (L, D, F)),
            "down_proj": normal(ks[7], (L, F, D), out_scale),
        },
        "final_norm": ones((D,)),
    }
    if not cfg.tie_word_embeddings:
        params["lm_head"] = normal(ks[8], (D, V))
    return params


def param_axes(cfg: ModelConfig) -> dict:
    """Logical axis names of every parameter (same pytree as init_params; leaves are tuples)."""
    axes = {
        "embed": ("vocab", "embed"),
        "layers": {
            "attn_norm": ("layers", "norm"),
            "q_proj": ("layers", "embed", "heads", "head_dim"),
            "k_proj": ("layers", "embed", "kv_heads", "head_dim"),
            "v_proj": ("layers", "embed", "kv_heads", "head_dim"),
            "o_proj": ("layers", "heads", "head_dim", "embed"),
            "q_norm": ("layers", "norm"),
            "k_norm": ("layers", "norm"),
            "mlp_norm": ("layers", "norm"),
            "gate_proj": ("layers", "embed", "mlp"),
            "up_proj": ("layers", "embed", "mlp"),
            "down_proj": ("layers", "mlp", "embed"),
        },
        "final_norm": ("norm",),
    }
    if not cfg.tie_word_embeddings:
        axes["lm_head"] = ("embed", "vocab")
    return axes


# --------------------------------------------------------------------------- building blocks



def param_shardings(cfg: ModelConfig, mesh):
    """NamedSharding for every parameter (same pytree as init_params), from `param_axes`."""
    shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    return tree_shardings(mesh, shapes, param_axes(cfg))

def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """fp32 statistics; normalised value cast back to x.dtype before the weight multiply (as HF)."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return y.astype(x.dtype) * weight.astype(x.dtype)


def rope_cos_sin(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos, sin [..., head_dim] in fp32 for integer positions [...] (HF's cat(freqs, freqs) layout)."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [B, T, N, Dh]; cos/sin [B, T, Dh]. rotate_half convention; cos/sin cast to x.dtype as HF."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    cos = cos[:, :, None, :].astype(x.dtype)
    sin = sin[:, :, None, :].astype(x.dtype)
    return x * cos + rotated * sin


def _cast(tree, dtype):
    return jax.tree.map(lambda w: w.astype(dtype), tree)


def _matmul(x: jax.Array, w: jax.Array, n_in: int) -> jax.Array:
    """Contracts the last n_in dims of x [..., *in] with the first n_in dims of w [*in, *out] as
    one 2-D matmul on flattened views: [prod(lead), prod(in)] @ [prod(in), prod(out)]. Same result
    as the einsum; on XLA:CPU the weight gradient of a multi-dimensional einsum (contracting over
    batch and length, producing a 3-D weight) lowered to transposes plus a slow dot, while the 2-D
    form gets the fast GEMM path both ways."""
    lead, out = x.shape[:-n_in], w.shape[n_in:]
    k = math.prod(w.shape[:n_in])
    y = x.reshape(-1, k) @ w.reshape(k, -1)
    return y.reshape(*lead, *out)


def _qkv(lp: dict, cfg: ModelConfig, x: jax.Array, cos: jax.Array, sin: jax.Array):
    h = rms_norm(x, lp["attn_norm"], cfg.rms_norm_eps)
    q = checkpoint_name(_matmul(h, lp["q_proj"], 1), "q_proj")
    k = checkpoint_name(_matmul(h, lp["k_proj"], 1), "k_proj")
    v = checkpoint_name(_matmul(h, lp["v_proj"], 1), "v_proj")
    q = apply_rope(rms_norm(q, lp["q_norm"], cfg.rms_norm_eps), cos, sin)
    k = apply_rope(rms_norm(k, lp["k_norm"], cfg.rms_norm_eps), cos, sin)
    q = constrain(q, ("batch", "length", "heads", "head_dim"))
    k = constrain(k, ("batch", "length", "kv_heads", "head_dim"))
    v = constrain(v, ("batch", "length", "kv_heads", "head_dim"))
    return q, k, v


ATTENTION_IMPLS = ("xla", "flash", "cudnn")


def segment_runs(segment_ids: jax.Array, max_segments: int) -> tuple[jax.Array, jax.Array]:
    """Contiguous runs of equal segment id per row (padding, id 0, is a run of its own), in the
    packed layout cuDNN takes: offsets [B, M+1] (each run's first index) and lengths [B, M], -1
    where a row has fewer than M = max_segments runs. Runs beyond M are not represented: callers
    check count_segments first."""
    B, T = segment_ids.shape
    starts = jnp.concatenate([jnp.ones((B, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)

    def row(s):
        idx = jnp.nonzero(s, size=max_segments + 1, fill_value=T)[0].astype(jnp.int32)
        lengths = jnp.where(idx[:-1] < T, idx[1:] - idx[:-1], -1)
        return jnp.where(idx < T, idx, -1), lengths

    return jax.vmap(row)(starts)


def count_segments(segment_ids) -> int:
    """Most contiguous runs (as segment_runs counts them) in any row of a host [B, T] array."""
    seg = np.asarray(segment_ids)
    return int((1 + (seg[:, 1:] != seg[:, :-1]).sum(axis=1)).max()) if seg.size else 0


def check_segments(segment_ids, max_segments: int) -> None:
    """The cuDNN path sees at most max_segments runs a row; refuse a batch with more, by name."""
    n = count_segments(segment_ids)
    if n > max_segments:
        raise ValueError(f"model.attn_max_segments={max_segments}, but a packed row holds {n} segments "
                         "(padding counts as one): raise it for attn_impl='cudnn'")


def segment_causal_attention(q, k, v, segment_ids, scale: float, chunk: int = 0, impl: str = "xla",
                             max_segments: int = 16):
    """Causal attention within segments (packed rows). q [B, T, H, Dh]; k, v [B, T, K, Dh].

    impl="xla": `jax.nn.dot_product_attention` with a boolean mask, `chunk` queries at a time.
      Dense scores are [B, H, T, T]: 32 GiB per row for Qwen3-4B at T=16k, where tau2
      conversations live. Chunked, each step holds [B, H, chunk, T], and the inner checkpoint
      makes the backward pass recompute one chunk's scores at a time instead of saving them all.
      chunk=0 (or a T it does not divide) is the dense path; every query row still takes its
      softmax over all T keys, so the result is the same. On CPU, chunk=0 runs 4 query blocks,
      each against the keys up to its end.
    impl="flash": the Pallas (Triton) flash-attention kernel with segment ids (GPU; interpreted on
      CPU, for tests only): no score matrix in memory and causal blocks above the diagonal skipped.
      Needs T to be a multiple of 128.
    impl="cudnn": cuDNN's fused flash attention in its packed (THD) layout: each row's segments
      given as offsets and lengths (segment_runs, at most `max_segments` a row), causal within
      each, GQA native. Hopper or later, bf16/fp16. The public jax.nn.dot_product_attention
      (implementation="cudnn") cannot express packed rows except as a dense [B, 1, T, T] mask,
      which it turns into an additive bias: T^2 memory again, so this calls the cuDNN module's
      packed entry point (jax._src.cudnn; same in jax 0.10 and 0.11).
    """
    if impl == "flash":
        from jax.experimental.pallas.ops.gpu import attention as pallas_attention  # GPU kernels: only on a GPU

        groups = q.shape[2] // k.shape[2]  # the kernel wants as many kv heads as query heads
        k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
        return pallas_attention.mha(q, k, v, segment_ids, sm_scale=scale, causal=True,
                                    interpret=jax.default_backend() == "cpu")
    if impl == "cudnn":
        from jax._src.cudnn import fused_attention_stablehlo as cudnn_attention

        offsets, lengths = segment_runs(segment_ids, max_segments)
        return cudnn_attention.dot_product_attention(
            q, k, v, None, None, lengths, lengths, offsets, offsets, scale=scale,
            mask_type=cudnn_attention.MaskType.PADDING_CAUSAL, qkv_layout="BTNH")
    if impl != "xla":
        raise ValueError(f"attention impl must be one of {ATTENTION_IMPLS}, got {impl!r}")
    T = q.shape[1]
    key_idx = jnp.arange(T)

    def attend(qc, seg_c, idx_c, end=T):  # queries qc against keys [0, end)
        mask = (seg_c[:, :, None] == segment_ids[:, None, :end]) & (idx_c[:, None] >= key_idx[None, :end])
        # XLA implementation: softmax statistics in fp32; GQA is handled natively (H % K == 0).
        return jax.nn.dot_product_attention(qc, k[:, :end], v[:, :end], mask=mask[:, None], scale=scale)

    if not chunk and jax.default_backend() == "cpu":
        # XLA:CPU has no causal kernel: 4 query blocks, each against the keys up to its own end,
        # skip 3/8 of the scores (masked ones, exact zeros after the softmax anyway).
        ends = [T * i // 4 for i in range(5)]
        return jnp.concatenate([attend(q[:, s:e], segment_ids[:, s:e], key_idx[s:e], e)
                                for s, e in zip(ends, ends[1:]) if e > s], axis=1)
    if not chunk or chunk >= T:
        return attend(q, segment_ids, key_idx)
    if T % chunk:  # a silent dense fallback would hide a [T, T] memory peak
        raise ValueError(f"attn_chunk={chunk} does not divide the sequence length {T}")
    n = T // chunk
    qs = q.reshape(q.shape[0], n, chunk, *q.shape[2:]).swapaxes(0, 1)
    segs = segment_ids.reshape(-1, n, chunk).swapaxes(0, 1)
    out = jax.lax.map(lambda a: jax.checkpoint(attend)(*a), (qs, segs, key_idx.reshape(n, chunk)))
    return out.swapaxes(0, 1).reshape(q.shape)


def _attend_and_mlp(lp: dict, cfg: ModelConfig, x, attn):
    """Output projection of the attention result, then the SwiGLU MLP, both residual."""
    x = x + _matmul(attn, lp["o_proj"], 2)
    x = checkpoint_name(constrain(x, ("batch", "length", None)), "attn_residual")
    h = rms_norm(x, lp["mlp_norm"], cfg.rms_norm_eps)
    gate = _matmul(h, lp["gate_proj"], 1)
    up = _matmul(h, lp["up_proj"], 1)
    act = constrain(jax.nn.silu(gate) * up, ("batch", "length", "mlp"))
    x = x + _matmul(act, lp["down_proj"], 1)
    return constrain(x, ("batch", "length", None))


def _remat(fn, remat: str):
    if remat not in _REMAT:
        raise ValueError(f"remat must be one of {sorted(_REMAT)}, got {remat!r}")
    if remat == "none" and jax.default_backend() == "cpu":
        # XLA:CPU page-faults a fresh temp buffer every step: recomputing the layer's elementwise
        # ops in the backward pass costs less than saving them (full-size SFT step 16% faster).
        return jax.checkpoint(fn, prevent_cse=False, policy=_save_dots_and_kernels)
    return _REMAT[remat](fn)


def _embed(params: dict, tokens: jax.Array, dtype) -> jax.Array:
    x = jnp.take(params["embed"], tokens, axis=0).astype(dtype)
    return constrain(x, ("batch", "length", None))


# --------------------------------------------------------------------------- full-sequence forward


def forward(params: dict, cfg: ModelConfig, tokens: jax.Array, positions: jax.Array, segment_ids: jax.Array, *,
            compute_dtype=jnp.float32, remat: str = "none", return_hidden: bool = False,
            attn_chunk: int = 0, attn_impl: str = "xla", attn_max_segments: int = 16) -> jax.Array:
    """tokens, positions, segment_ids: int [B, T]. Packed rows: a token attends causally to earlier
    tokens of its own segment only. Segment 0 is padding: padding tokens attend only to padding, so
    their rows stay finite and never touch real tokens. Returns logits [B, T, V] float32, or the
    final-normed hidden states [B, T, D] (compute_dtype) when return_hidden (see logits_from_hidden).
    attn_chunk, attn_impl, attn_max_segments: how attention is computed (see segment_causal_attention)."""
    x = _embed(params, tokens, compute_dtype)
    cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta)

    def layer(x, lp):
        lp = _cast(lp, compute_dtype)
        q, k, v = _qkv(lp, cfg, x, cos, sin)
        attn = segment_causal_attention(q, k, v, segment_ids, cfg.head_dim ** -0.5, attn_chunk, attn_impl,
                                        attn_max_segments)
        return _attend_and_mlp(lp, cfg, x, attn), None

    x, _ = jax.lax.scan(_remat(layer, remat), x, params["layers"])
    hidden = rms_norm(x, params["final_norm"].astype(compute_dtype), cfg.rms_norm_eps)
    if return_hidden:
        return hidden
    return logits_from_hidden(params, cfg, hidden)


def logits_from_hidden(params: dict, cfg: ModelConfig, hidden: jax.Array) -> jax.Array:
    """LM head on final-normed hidden [..., D] -> float32 logits [..., V] (matmul in hidden.dtype,
    fp32 accumulation). Kept separate so losses can apply it chunk by chunk over T."""
    if cfg.tie_word_embeddings:
        w = params["embed"].astype(hidden.dtype)
        logits = jnp.einsum("...d,vd->...v", hidden, w, preferred_element_type=jnp.float32)
    else:
        w = params["lm_head"].astype(hidden.dtype)
        logits = jnp.einsum("...d,dv->...v", hidden, w, preferred_element_type=jnp.float32)
    if logits.ndim == 3:
        logits = constrain(logits, ("batch", "length", "vocab"))
    return logits


# --------------------------------------------------------------------------- KV-cache decoding


def cache_axes() -> dict:
    """Logical axes of the init_cache pytree (for placing a cache on a mesh)."""
    axes = ("layers", "batch", "cache_length", "kv_heads", "head_dim")
    return {"k": axes, "v": axes}


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=jnp.float32) -> dict:
    """Empty cache: k, v [L, B, max_len, K, Dh]. Which slots are filled is tracked by the caller's
    `lengths`, not by the cache."""
    shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


def forward_cached(params: dict, cfg: ModelConfig, tokens: jax.Array, cache: dict, lengths: jax.Array,
                   valid: jax.Array | None = None, *, compute_dtype=jnp.float32,
                   return_hidden: bool = False) -> tuple[jax.Array, dict]:
    """Runs a chunk tokens [B, T] on top of a cache. Row b's tokens sit at positions
    lengths[b] + arange(T); their k/v are written into those slots and each token attends to slots
    <= its own position. `valid` [B, T] (right-padded, True first) marks real tokens: invalid ones
    are not written (so they cannot be attended later) and, being after every valid token of their
    row, cannot affect them. Writes past max_len are dropped. Returns (logits [B, T, V] float32, or
    final-normed hidden [B, T, D] if return_hidden, new cache); the caller advances `lengths` by the
    number of valid tokens. Static shapes throughout: jit once per (B, T, max_len)."""
    B, T = tokens.shape
    S = cache["k"].shape[2]
    positions = lengths[:, None].astype(jnp.int32) + jnp.arange(T, dtype=jnp.int32)[None, :]
    if valid is None:
        valid = jnp.ones((B, T), dtype=bool)
    # Out-of-range slot index S makes the scatter drop invalid tokens' writes.
    write_pos = jnp.where(valid, positions, S)
    rows = jnp.arange(B)[:, None]
    mask = (jnp.arange(S)[None, None, :] <= positions[:, :, None])[:, None]  # [B, 1, T, S]
    x = _embed(params, tokens, compute_dtype)
    cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta)

    def layer(carry, xs):
        x, ck, cv = carry
        lp, i = xs
        lp = _cast(lp, compute_dtype)
        q, k, v = _qkv(lp, cfg, x, cos, sin)
        # The whole cache rides in the carry (a scanned output would hold a second copy of it).
        # The new k/v are scattered straight into it, in place, touching only the B x T written
        # slots; attention then reads layer i's slice. Updating a copy of the slice and writing
        # it back moved the whole [B, S, K, Dh] slice twice more per layer and step: on one H100,
        # Qwen3-4B shapes in bf16 at batch 32, cache 4096, 45.0 -> 31.7 ms per decode step.
        ck = ck.at[i, rows, write_pos].set(k.astype(ck.dtype), mode="drop")
        cv = cv.at[i, rows, write_pos].set(v.astype(cv.dtype), mode="drop")
        # astype is a no-op when the cache is already in compute_dtype.
        attn = jax.nn.dot_product_attention(q, ck[i].astype(compute_dtype), cv[i].astype(compute_dtype),
                                            mask=mask, scale=cfg.head_dim ** -0.5)
        x = _attend_and_mlp(lp, cfg, x, attn)
        return (x, ck, cv), None

    (x, ck, cv), _ = jax.lax.scan(layer, (x, cache["k"], cache["v"]),
                                  (params["layers"], jnp.arange(cfg.num_layers)))
    hidden = rms_norm(x, params["final_norm"].astype(compute_dtype), cfg.rms_norm_eps)
    out = hidden if return_hidden else logits_from_hidden(params, cfg, hidden)
    return out, {"k": ck, "v": cv}
