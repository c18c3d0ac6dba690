"""Policy losses: each term against hand numbers, the whole loss against a naive per-token loop,
exact (sum, count) accumulation over micro-batches, zero gradient where clipped."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tau2jax.rl import losses
from tau2jax.rl.losses import Max, Mean, PolicyLossConfig, diagnostics, policy_loss

# Two packed rows of 8 tokens: row 0 = segments 1 (4 tokens), 2 (3), padding; row 1 = segment 1 (6),
# padding. Row 2 and 3 repeat the pattern with other numbers (for the micro-batch split).
SEG = np.array([[1, 1, 1, 1, 2, 2, 2, 0], [1, 1, 1, 1, 1, 1, 0, 0]] * 2, np.int32)
MASK = np.array([[0, 1, 1, 1, 1, 0, 1, 0], [1, 1, 1, 1, 1, 1, 0, 0]] * 2, np.float32)


def _batch(seed=0, spread=0.4):
    rng = np.random.default_rng(seed)
    shape = SEG.shape
    beh = rng.uniform(-3.0, -0.1, shape).astype(np.float32)
    logp = (beh + rng.normal(0, spread, shape)).astype(np.float32)
    prox = (beh + rng.normal(0, 0.3, shape)).astype(np.float32)
    ref = (logp + rng.normal(0, 0.5, shape)).astype(np.float32)
    ent = rng.uniform(0.0, 2.0, shape).astype(np.float32)
    # One advantage per segment (trajectory level), broadcast to its tokens.
    seg_adv = {(b, s): rng.choice([-1.3, -0.4, 0.7, 1.1]) for b in range(shape[0]) for s in (1, 2)}
    adv = np.array([[seg_adv.get((b, s), 0.0) for s in SEG[b]] for b in range(shape[0])], np.float32)
    return dict(logp=logp, behaviour_logp=beh, advantages=adv, mask=MASK, segment_ids=SEG,
                proximal_logp=prox, ref_logp=ref, entropy=ent)


def _naive(cfg, logp, behaviour_logp, advantages, mask, segment_ids, proximal_logp=None, ref_logp=None,
           entropy=None):
    """The loss written as a loop over segments and tokens in Python floats."""
    total, count = 0.0, 0.0
    for b in range(segment_ids.shape[0]):
        for s in sorted(set(segment_ids[b].tolist()) - {0}):
            toks = [t for t in range(segment_ids.shape[1]) if segment_ids[b, t] == s and mask[b, t] > 0]
            if not toks:
                continue
            prox = {t: float(logp[b, t] if proximal_logp is None else proximal_logp[b, t]) for t in toks}
            lm = {t: prox[t] - float(behaviour_logp[b, t]) for t in toks}
            if cfg.geo_mask and not cfg.geo_mask[0] <= math.exp(sum(lm.values()) / len(toks)) <= cfg.geo_mask[1]:
                continue
            if cfg.veto_threshold and any(math.exp(v) < cfg.veto_threshold for v in lm.values()):
                continue
            use_prox = proximal_logp is not None or cfg.tis_cap
            anchor = {t: prox[t] if use_prox else float(behaviour_logp[b, t]) for t in toks}
            seq_r = math.exp(sum(float(logp[b, t]) - anchor[t] for t in toks) / len(toks))
            per_tok = []
            for t in toks:
                a = float(advantages[b, t])
                r = seq_r if cfg.ratio_level == "sequence" else math.exp(float(logp[b, t]) - anchor[t])
                pg = max(-a * r, -a * min(max(r, 1 - cfg.eps_low), 1 + cfg.eps_high))
                if cfg.dual_clip and a < 0:
                    pg = min(pg, -a * cfg.dual_clip)
                if cfg.tis_cap:
                    pg *= min(math.exp(lm[t]), cfg.tis_cap)
                x = float(logp[b, t] - ref_logp[b, t]) if ref_logp is not None else 0.0
                kl = {"k1": x, "k2": 0.5 * x * x, "k3": min(math.exp(-x) + x - 1, 10.0)}[cfg.kl_type]
                ent = float(entropy[b, t]) if entropy is not None else 0.0
                per_tok.append(pg + cfg.kl_coef * kl - cfg.entropy_coef * ent)
            if cfg.agg_mode == "token-mean":
                total, count = total + sum(per_tok), count + len(per_tok)
            elif cfg.agg_mode == "seq-mean-token-mean":
                total, count = total + sum(per_tok) / len(per_tok), count + 1
            else:
                total, count = total + sum(per_tok) / cfg.norm_len, count + 1
    return total, count


CONFIGS = {
    "ppo": PolicyLossConfig(),
    "dual_clip": PolicyLossConfig(dual_clip=1.5, eps_high=0.2),
    "gspo": PolicyLossConfig(ratio_level="sequence", eps_low=0.05, eps_high=0.05),
    "seq_mean": PolicyLossConfig(agg_mode="seq-mean-token-mean", kl_coef=0.05, kl_type="k1"),
    "dr_grpo": PolicyLossConfig(agg_mode="seq-mean-token-sum-norm", norm_len=8, kl_coef=0.1, kl_type="k2"),
    "kl_entropy": PolicyLossConfig(kl_coef=0.01, entropy_coef=0.001),
    "tis": PolicyLossConfig(tis_cap=1.2),
    "geo_mask": PolicyLossConfig(geo_mask=(0.9, 1.1)),
    "veto": PolicyLossConfig(veto_threshold=0.7),
    "everything": PolicyLossConfig(ratio_level="sequence", agg_mode="seq-mean-token-mean", dual_clip=2.0,
                                   kl_coef=0.02, entropy_coef=0.01, tis_cap=1.5, geo_mask=(0.8, 1.25),
                                   veto_threshold=0.5),
}


def _jnp(batch):
    return {k: None if v is None else jnp.asarray(v) for k, v in batch.items()}


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("with_proximal", [False, True])
def test_policy_loss_matches_naive_loop(name, with_proximal):
    cfg = CONFIGS[name]
    batch = _batch(seed=1)
    if not with_proximal:
        batch["proximal_logp"] = None
    s, n, metrics = jax.jit(lambda b: policy_loss(cfg, **b))(_jnp(batch))
    s_ref, n_ref = _naive(cfg, **batch)
    np.testing.assert_allclose(float(s), s_ref, rtol=1e-5, atol=1e-6)
    assert float(n) == n_ref
    # The component metrics add up to the loss under the same aggregation.
    recon = metrics["pg_loss"].sum + cfg.kl_coef * metrics["kl"].sum - cfg.entropy_coef * metrics["entropy"].sum
    np.testing.assert_allclose(float(recon), float(s), rtol=1e-5, atol=1e-6)
    assert all(float(m.count) == n_ref for m in metrics.values())


def test_mismatch_masks_actually_drop_segments():
    # The naive-loop parity above only means something if the masks bite on that batch.
    batch = _batch(seed=1)
    full = _naive(PolicyLossConfig(), **batch)[1]
    assert _naive(CONFIGS["geo_mask"], **batch)[1] < full
    assert _naive(CONFIGS["veto"], **batch)[1] < full


def test_ppo_clip_hand_numbers_and_zero_gradient_where_clipped():
    ratio = jnp.array([0.5, 0.5, 1.1, 1.5, 1.5, 4.0])
    adv = jnp.array([1.0, -1.0, 1.0, 1.0, -1.0, -1.0])
    f = lambda r: losses.ppo_clip_loss(r, adv, 0.2, 0.28, dual_clip=3.0)  # noqa: E731
    # r=.5,A=1 unclipped; r=.5,A=-1 clipped at .8; r=1.1 inside; r=1.5,A=1 clipped at 1.28;
    # r=1.5,A=-1 unclipped (the pessimistic side); r=4,A=-1 dual-clipped at 3.
    np.testing.assert_allclose(f(ratio), [-0.5, 0.8, -1.1, -1.28, 1.5, 3.0], rtol=1e-6)
    grad = jax.grad(lambda r: f(r).sum())(ratio)
    np.testing.assert_array_equal(grad, [-1.0, 0.0, -1.0, 0.0, 1.0, 0.0])
    # Without dual clip the last token keeps growing with its ratio.
    np.testing.assert_allclose(losses.ppo_clip_loss(ratio, adv, 0.2, 0.28)[-1], 4.0)


def test_policy_loss_gradient_is_zero_on_clipped_tokens():
    cfg = PolicyLossConfig(eps_low=0.1, eps_high=0.1)
    b = _jnp(_batch(seed=2, spread=0.5))
    b["proximal_logp"] = None
    grad = jax.grad(lambda lp: policy_loss(cfg, **{**b, "logp": lp})[0])(b["logp"])
    r = np.exp(np.asarray(b["logp"] - b["behaviour_logp"]))
    a = np.asarray(b["advantages"])
    clipped = ((a > 0) & (r > 1.1)) | ((a < 0) & (r < 0.9))
    trained = np.asarray(b["mask"]) * (np.asarray(b["segment_ids"]) > 0) > 0
    assert clipped[trained].any() and (~clipped[trained]).any()
    assert np.all(grad[clipped] == 0.0)
    # Elsewhere the loss sum's gradient is d(−A·r)/dlogp = −A·r (KL and entropy are off here).
    np.testing.assert_allclose(grad[trained & ~clipped], (-a * r)[trained & ~clipped], rtol=1e-5)
    assert np.all(grad[~trained] == 0.0)


def test_kl_estimators_hand_numbers_and_clamp():
    logp, ref = jnp.array([-1.0, -30.0]), jnp.array([-1.5, 0.0])
    np.testing.assert_allclose(losses.KL_ESTIMATORS["k1"](logp, ref), [0.5, -30.0])
    np.testing.assert_allclose(losses.KL_ESTIMATORS["k2"](logp, ref), [0.125, 450.0])
    # exp(−0.5) − (−0.5) − 1 = 0.1065307; the second is exp(30) − 31, clamped to 10.
    np.testing.assert_allclose(losses.KL_ESTIMATORS["k3"](logp, ref), [0.10653066, 10.0], rtol=1e-6)
    assert losses.KL_ESTIMATORS["low_var_kl"] is losses.KL_ESTIMATORS["k3"]


def test_aggregation_hand_numbers():
    loss = jnp.array([[1.0, 2.0, 3.0, 4.0, 0.0], [6.0, 6.0, 0.0, 0.0, 0.0]])
    mask = jnp.array([[1.0, 1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0, 0.0]])
    seg = jnp.array([[1, 1, 2, 2, 0], [1, 1, 2, 0, 0]])  # row 1 segment 2 has no trained token
    cfg = PolicyLossConfig(agg_mode="seq-mean-token-sum-norm", norm_len=10)
    agg = losses.AGGREGATIONS
    assert tuple(map(float, agg["token-mean"](loss, mask, seg, cfg))) == (16.0, 5.0)
    # Segments: (1+2)/2, (3+4)/2, 6/1 -> 1.5 + 3.5 + 6; three segments with trained tokens.
    assert tuple(map(float, agg["seq-mean-token-mean"](loss, mask, seg, cfg))) == (11.0, 3.0)
    np.testing.assert_allclose(agg["seq-mean-token-sum-norm"](loss, mask, seg, cfg), (1.6, 3.0))


@pytest.mark.parametrize("mode", sorted(losses.AGGREGATIONS))
def test_two_micro_batches_sum_to_the_full_batch(mode):
    cfg = dataclasses.replace(CONFIGS["everything"], agg_mode=mode, norm_len=8)
    full = _jnp(_batch(seed=3))
    halves = [{k: v[i:i + 2] for k, v in full.items()} for i in (0, 2)]
    fn = jax.jit(lambda b: policy_loss(cfg, **b))
    s, n, m = fn(full)
    (s0, n0, m0), (s1, n1, m1) = fn(halves[0]), fn(halves[1])
    np.testing.assert_allclose(float(s0 + s1), float(s), rtol=1e-6)
    assert float(n0 + n1) == float(n) > 0
    # The per-example loss (sum / count) of the halves differs from the full batch's: averaging the
    # halves' means instead of adding sums would be wrong.
    merged = losses.merge_metrics(m0, m1)
    for k in m:
        np.testing.assert_allclose(float(merged[k].sum), float(m[k].sum), rtol=1e-6)
        assert float(merged[k].count) == float(m[k].count)


def test_gspo_gradient_is_the_sequence_ratio_gradient():
    # With no clipping and token-mean: Σ_tokens −A·s with per-token value s equals the sequence
    # objective Σ_seq n_seq·(−A·s_seq), and its gradient must equal that of the plain formula.
    cfg = PolicyLossConfig(ratio_level="sequence", eps_low=0.99, eps_high=100.0)
    b = _jnp(_batch(seed=4))
    b["proximal_logp"] = None
    m = b["mask"] * (b["segment_ids"] > 0)

    def plain(lp):
        total = 0.0
        for row in range(lp.shape[0]):
            for s in (1, 2):
                sel = m[row] * (b["segment_ids"][row] == s)
                n = sel.sum()
                mean_lr = jnp.where(n > 0, (sel * (lp[row] - b["behaviour_logp"][row])).sum() / jnp.maximum(n, 1), 0.0)
                a = (sel * b["advantages"][row]).sum() / jnp.maximum(n, 1)
                total = total + n * (-a * jnp.exp(mean_lr))
        return total

    g = jax.grad(lambda lp: policy_loss(cfg, **{**b, "logp": lp})[0])(b["logp"])
    np.testing.assert_allclose(policy_loss(cfg, **b)[0], plain(b["logp"]), rtol=1e-5)
    np.testing.assert_allclose(g, jax.grad(plain)(b["logp"]), rtol=1e-5, atol=1e-7)


def test_one_step_tis_without_proximal_equals_proximal_is_current():
    # With one optimizer step per batch the proximal recomputation equals the current forward:
    # passing it, or leaving it out, must give the same loss and the same gradient.
    cfg = PolicyLossConfig(tis_cap=1.3)
    b = _jnp(_batch(seed=5))
    without = lambda lp: policy_loss(cfg, **{**b, "logp": lp, "proximal_logp": None})[0]  # noqa: E731
    with_ = lambda lp: policy_loss(cfg, **{**b, "logp": lp, "proximal_logp": lp})[0]  # noqa: E731
    np.testing.assert_allclose(without(b["logp"]), with_(b["logp"]), rtol=1e-6)
    np.testing.assert_allclose(jax.grad(without)(b["logp"]), jax.grad(with_)(b["logp"]), rtol=1e-6)
    # The TIS weight is detached: no gradient reaches the proximal log-probs.
    g_prox = jax.grad(lambda p: policy_loss(cfg, **{**b, "proximal_logp": p})[0])(b["proximal_logp"])
    assert np.all(g_prox == 0.0)


def test_without_tis_or_proximal_the_ratio_is_against_behaviour():
    cfg = PolicyLossConfig()
    b = _jnp(_batch(seed=6))
    b["proximal_logp"] = None
    shifted = {**b, "behaviour_logp": b["behaviour_logp"] - 0.3}  # every ratio × e^0.3
    assert float(policy_loss(cfg, **b)[0]) != pytest.approx(float(policy_loss(cfg, **shifted)[0]))
    d = diagnostics(cfg, **shifted)
    r = np.exp(np.asarray(shifted["logp"] - shifted["behaviour_logp"]))
    trained = np.asarray(b["mask"]) * (np.asarray(b["segment_ids"]) > 0) > 0
    np.testing.assert_allclose(d["ratio_max"].value, r[trained].max(), rtol=1e-6)


def test_diagnostics_hand_numbers():
    # One row, one segment of 4 trained tokens, proximal given.
    logp = jnp.log(jnp.array([[0.5, 0.5, 0.5, 0.5]]))
    prox = jnp.log(jnp.array([[0.25, 0.5, 0.9, 0.5]]))  # ratios 2.0, 1.0, 0.5556, 1.0
    beh = prox - jnp.array([[0.0, 0.1, -0.2, 0.4]])  # log mismatch 0, .1, −.2, .4
    adv = jnp.array([[1.0, 1.0, -1.0, -1.0]])
    mask, seg = jnp.ones((1, 4)), jnp.ones((1, 4), jnp.int32)
    cfg = PolicyLossConfig(dual_clip=1.5, geo_mask=(0.9, 1.05), veto_threshold=0.85)
    d = losses.metric_values(diagnostics(cfg, logp, beh, adv, mask, seg, proximal_logp=prox,
                                         entropy=jnp.array([[1.0, 2.0, 3.0, 6.0]])))
    np.testing.assert_allclose(d["clip_frac_high"], 0.25)  # token 0: A > 0, r = 2 > 1.28
    np.testing.assert_allclose(d["clip_frac_low"], 0.25)  # token 2: A < 0, r = .556 < .8
    np.testing.assert_allclose(d["clip_frac_dual"], 0.0)
    np.testing.assert_allclose(d["ratio_max"], 2.0, rtol=1e-6)
    np.testing.assert_allclose(d["mismatch_abs"], 0.7 / 4, rtol=1e-6)
    np.testing.assert_allclose(d["mismatch_abs_max"], 0.4, rtol=1e-6)
    np.testing.assert_allclose(d["entropy_token_mean"], 3.0)
    # exp(mean(0, .1, −.2, .4)) = exp(.075) = 1.078 > 1.05: masked; exp(−.2) = .819 < .85: vetoed.
    assert d["geo_masked_frac"] == 1.0 and d["veto_masked_frac"] == 1.0
    assert "kl_token_mean" not in d and "kl" not in d and "entropy" not in d


@pytest.mark.parametrize("agg_mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_logged_kl_and_entropy_aggregate_as_the_loss_does(agg_mode):
    """Two segments of 1 and 3 trained tokens: token-mean and seq-mean differ. The logged kl and
    entropy (policy_loss's) follow agg_mode; diagnostics keeps the token means beside them."""
    logp = jnp.log(jnp.full((1, 4), 0.5))
    ref = logp - jnp.array([[0.4, 0.0, 0.0, 0.0]])  # k3 KL nonzero on the first token only
    ent = jnp.array([[4.0, 1.0, 1.0, 1.0]])
    mask, seg = jnp.ones((1, 4)), jnp.array([[1, 2, 2, 2]], jnp.int32)
    cfg = PolicyLossConfig(agg_mode=agg_mode, kl_coef=0.01, entropy_coef=0.001, norm_len=4)
    args = (cfg, logp, logp, jnp.zeros((1, 4)), mask, seg)
    _, count, m = policy_loss(*args, ref_logp=ref, entropy=ent)
    d = losses.metric_values(diagnostics(*args, ref_logp=ref, entropy=ent))
    v = losses.metric_values(m)
    k = float(losses.KL_ESTIMATORS[cfg.kl_type](logp, ref)[0, 0])
    want = {"token-mean": (k / 4, 7.0 / 4), "seq-mean-token-mean": (k / 2, (4.0 + 1.0) / 2),
            "seq-mean-token-sum-norm": ((k / 4) / 2, (4.0 / 4 + 3.0 / 4) / 2)}[agg_mode]
    np.testing.assert_allclose([v["kl"], v["entropy"]], want, rtol=1e-5)
    np.testing.assert_allclose([d["kl_token_mean"], d["entropy_token_mean"]], [k / 4, 7.0 / 4], rtol=1e-5)


def test_metric_merge_and_values():
    a = {"x": Mean(jnp.float32(3.0), jnp.float32(2.0)), "y": Max(jnp.float32(1.0))}
    b = {"x": Mean(jnp.float32(1.0), jnp.float32(2.0)), "y": Max(jnp.float32(5.0))}
    assert losses.metric_values(losses.merge_metrics(a, b)) == {"x": 1.0, "y": 5.0}


def test_bad_inputs_raise_clear_errors():
    b = _jnp(_batch())
    with pytest.raises(ValueError, match="advantages has shape"):
        policy_loss(PolicyLossConfig(), **{**b, "advantages": b["advantages"][:, :3]})
    with pytest.raises(ValueError, match="needs ref_logp"):
        policy_loss(PolicyLossConfig(kl_coef=0.1), **{**b, "ref_logp": None})
    with pytest.raises(ValueError, match="needs the learner's per-token entropy"):
        policy_loss(PolicyLossConfig(entropy_coef=0.1), **{**b, "entropy": None})
    for kw, msg in [(dict(agg_mode="mean"), "agg_mode"), (dict(agg_mode="seq-mean-token-sum-norm"), "norm_len"),
                    (dict(kl_type="k4"), "kl_type"), (dict(dual_clip=0.5), "dual_clip"),
                    (dict(ratio_level="turn"), "ratio_level"), (dict(geo_mask=(1.1, 1.2)), "geo_mask"),
                    (dict(tis_cap=-1.0), "tis_cap")]:
        with pytest.raises(ValueError, match=msg):
            PolicyLossConfig(**kw)
