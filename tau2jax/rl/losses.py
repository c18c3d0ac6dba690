"""GRPO / PPO policy losses over packed token arrays, as (sum, count).

Every array is [B, T] per token. Rows are packed: several trajectories per row, told apart by
`segment_ids` (0 = padding); sequence-level quantities (GSPO ratios, sequence masks, seq-mean
aggregation) are per segment, and a segment never spans two rows, so micro-batches split by rows
accumulate exactly. `mask` (0/1 float) marks the trained tokens.

Three log-probs of each trained token:
- `logp`: the learner's, under the parameters being differentiated;
- `behaviour_logp`: the rollout engine's (the convention in inference/engine.py `GenerateResult`);
- `proximal_logp` (optional): the learner's recomputation at the start of the step (AReaL's
  proximal policy). Absent, it is taken to be stop_gradient(logp): with one optimizer step per
  batch the recomputation equals the current forward, so no extra forward pass is needed.

The PPO ratio is logp − anchor, where the anchor is the proximal log-prob when given, else the
behaviour log-prob, except with TIS on: then the anchor is the (possibly implicit) proximal one,
because the TIS weight exp(proximal − behaviour) already carries the train/rollout correction and
a ratio against the behaviour policy would apply it a second time.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

_LOG_RATIO_CLAMP = 20.0  # exp overflow guard on log-ratios (verl's value); never reached in practice


class Mean(NamedTuple):
    """A metric as (sum, count): summed over micro-batches and hosts, divided once at the end."""
    sum: jax.Array
    count: jax.Array


class Max(NamedTuple):
    """A metric combined by max across micro-batches and hosts."""
    value: jax.Array


@dataclasses.dataclass(frozen=True)
class PolicyLossConfig:
    """Knobs of `policy_loss`; 0 / None switches a term off. Names follow verl / slime."""

    eps_low: float = 0.2  # ratio clip 1 − eps_low
    eps_high: float = 0.28  # clip-higher (DAPO): 1 + eps_high
    dual_clip: float = 0.0  # c > 1: for A < 0 the loss is at most c·|A| (0 = off; verl uses 3.0)
    ratio_level: str = "token"  # "token" (PPO) | "sequence" (GSPO geometric-mean ratio per segment)
    agg_mode: str = "token-mean"  # key of AGGREGATIONS
    norm_len: int = 0  # seq-mean-token-sum-norm's constant normaliser (e.g. max_len)
    kl_coef: float = 0.0
    kl_type: str = "k3"  # key of KL_ESTIMATORS
    entropy_coef: float = 0.0
    tis_cap: float = 0.0  # truncated IS on tokens: min(exp(proximal − behaviour), cap); 0 = off
    geo_mask: tuple[float, float] | None = None  # keep a segment if exp(mean log mismatch) in [lo, hi]
    veto_threshold: float = 0.0  # drop a segment with any token mismatch ratio below this; 0 = off

    def __post_init__(self):
        if not (0 <= self.eps_low < 1 and self.eps_high >= 0):
            raise ValueError(f"need 0 <= eps_low < 1 and eps_high >= 0, got {self.eps_low}, {self.eps_high}")
        if self.dual_clip and self.dual_clip <= 1:
            raise ValueError(f"dual_clip must be > 1 (or 0 = off), got {self.dual_clip}")
        if self.ratio_level not in ("token", "sequence"):
            raise ValueError(f"ratio_level must be 'token' or 'sequence', got {self.ratio_level!r}")
        if self.agg_mode not in AGGREGATIONS:
            raise ValueError(f"agg_mode {self.agg_mode!r} not in {sorted(AGGREGATIONS)}")
        if self.agg_mode == "seq-mean-token-sum-norm" and self.norm_len <= 0:
            raise ValueError("agg_mode 'seq-mean-token-sum-norm' needs norm_len > 0 (e.g. the max length)")
        if self.kl_type not in KL_ESTIMATORS:
            raise ValueError(f"kl_type {self.kl_type!r} not in {sorted(KL_ESTIMATORS)}")
        if self.tis_cap < 0 or self.veto_threshold < 0:
            raise ValueError("tis_cap and veto_threshold must be >= 0 (0 = off)")
        if self.geo_mask is not None and not 0 < self.geo_mask[0] <= 1 <= self.geo_mask[1]:
            raise ValueError(f"geo_mask (lo, hi) needs 0 < lo <= 1 <= hi, got {self.geo_mask}")


# ----------------------------------------------------------------------------- segments

def _segment_index(segment_ids: jax.Array) -> tuple[jax.Array, int]:
    """A batch-wide segment index per token (row b, segment s -> b·(T+1) + s) and their number.
    Segment ids must lie in [0, T], as the packer's 1..n do."""
    b, t = segment_ids.shape
    return segment_ids + (t + 1) * jnp.arange(b)[:, None], b * (t + 1)


def segment_sums(x: jax.Array, segment_ids: jax.Array) -> jax.Array:
    """Σ of x [B, T] per segment -> [B·(T+1)] (padding segments included; mask them out)."""
    idx, n = _segment_index(segment_ids)
    return jax.ops.segment_sum(x.ravel(), idx.ravel(), n)


def _per_token(seg_values: jax.Array, segment_ids: jax.Array) -> jax.Array:
    """Broadcast per-segment values back to the tokens of each segment."""
    return seg_values[_segment_index(segment_ids)[0]]


def segment_mean_per_token(x, mask, segment_ids):
    """Masked mean of x over each segment's trained tokens, broadcast to its tokens."""
    return _per_token(segment_sums(x * mask, segment_ids) / jnp.maximum(segment_sums(mask, segment_ids), 1.0),
                      segment_ids)


# ----------------------------------------------------------------------------- aggregation
# Each returns (sum, count) with sum / count = the mode's loss, and sums/counts of row-split
# micro-batches add up to the full batch's. count: trained tokens (token-mean) or segments with at
# least one trained token (the seq-mean modes).

def _token_mean(loss, mask, segment_ids, cfg):
    return (loss * mask).sum(), mask.sum()


def _seq_mean_token_mean(loss, mask, segment_ids, cfg):
    n = segment_sums(mask, segment_ids)
    per_seq = segment_sums(loss * mask, segment_ids) / jnp.maximum(n, 1.0)
    return per_seq.sum(), (n > 0).sum().astype(jnp.float32)


def _seq_mean_token_sum_norm(loss, mask, segment_ids, cfg):
    n = segment_sums(mask, segment_ids)
    return (loss * mask).sum() / cfg.norm_len, (n > 0).sum().astype(jnp.float32)


AGGREGATIONS = {"token-mean": _token_mean, "seq-mean-token-mean": _seq_mean_token_mean,
                "seq-mean-token-sum-norm": _seq_mean_token_sum_norm}


# ----------------------------------------------------------------------------- terms

def ppo_clip_loss(ratio, advantages, eps_low, eps_high, dual_clip=0.0):
    """Per-token −min(r·A, clip(r, 1−eps_low, 1+eps_high)·A); with dual_clip c, capped at −c·A for
    A < 0 (a huge ratio on a bad token cannot blow the loss up). Zero gradient where clipped."""
    unclipped = -advantages * ratio
    clipped = -advantages * jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high)
    loss = jnp.maximum(unclipped, clipped)
    if dual_clip:
        loss = jnp.where(advantages < 0, jnp.minimum(loss, -advantages * dual_clip), loss)
    return loss


def _k1(logp, ref_logp):
    return logp - ref_logp


def _k2(logp, ref_logp):
    return 0.5 * (logp - ref_logp) ** 2


def _k3(logp, ref_logp):
    """Schulman's low-variance estimator exp(ref − logp) − (ref − logp) − 1, clamped to [−10, 10]
    as slime / verl's `low_var_kl`."""
    d = ref_logp - logp
    return jnp.clip(jnp.exp(d) - d - 1.0, -10.0, 10.0)


KL_ESTIMATORS = {"k1": _k1, "k2": _k2, "k3": _k3, "low_var_kl": _k3}


def _log_ratio(logp, anchor):
    return jnp.clip(logp - anchor, -_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)


def token_ratio(logp, anchor):
    return jnp.exp(_log_ratio(logp, anchor))


def sequence_ratio(logp, anchor, mask, segment_ids):
    """GSPO: s = exp(mean over the segment's trained tokens of (logp − anchor)), with per-token
    value s and gradient s·∇logp_t (the paper's sg(s)·π/sg(π) form), so token-mean aggregation over a
    segment gives s·mean_t ∇logp_t·A, the GSPO gradient."""
    seq_lr = jax.lax.stop_gradient(segment_mean_per_token(_log_ratio(logp, anchor), mask, segment_ids))
    return jnp.exp(jnp.clip(seq_lr + logp - jax.lax.stop_gradient(logp), -_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP))


def mismatch_keep(log_mismatch, mask, segment_ids, cfg):
    """(keep_geo, keep_veto) per token (1 keeps the token's segment), from the detached
    log(π_proximal / π_behaviour): the geometric sequence mask and the outlier veto."""
    keep_geo = jnp.ones_like(mask)
    if cfg.geo_mask is not None:
        lo, hi = cfg.geo_mask
        geo = jnp.exp(segment_mean_per_token(log_mismatch, mask, segment_ids))
        keep_geo = ((geo >= lo) & (geo <= hi)).astype(mask.dtype)
    keep_veto = jnp.ones_like(mask)
    if cfg.veto_threshold:
        bad = (mask > 0) & (log_mismatch < jnp.log(cfg.veto_threshold))
        keep_veto = (_per_token(segment_sums(bad.astype(mask.dtype), segment_ids), segment_ids) == 0)
        keep_veto = keep_veto.astype(mask.dtype)
    return keep_geo, keep_veto


class _Parts(NamedTuple):
    ratio: jax.Array  # PPO / GSPO ratio per token (differentiable)
    log_mismatch: jax.Array  # detached log(π_proximal / π_behaviour)
    is_weight: jax.Array  # detached TIS weight (1 when off)
    keep_geo: jax.Array
    keep_veto: jax.Array


def _parts(cfg, logp, behaviour_logp, mask, segment_ids, proximal_logp) -> _Parts:
    proximal = jax.lax.stop_gradient(logp if proximal_logp is None else proximal_logp)
    log_mismatch = jax.lax.stop_gradient(_log_ratio(proximal, behaviour_logp))
    anchor = proximal if (proximal_logp is not None or cfg.tis_cap) else behaviour_logp
    if cfg.ratio_level == "sequence":
        ratio = sequence_ratio(logp, anchor, mask, segment_ids)
    else:
        ratio = token_ratio(logp, anchor)
    is_weight = jnp.minimum(jnp.exp(log_mismatch), cfg.tis_cap) if cfg.tis_cap else jnp.ones_like(logp)
    return _Parts(ratio, log_mismatch, is_weight, *mismatch_keep(log_mismatch, mask, segment_ids, cfg))


def _check(arrays: dict):
    shape = arrays["logp"].shape
    for name, a in arrays.items():
        if a is not None and a.shape != shape:
            raise ValueError(f"{name} has shape {a.shape}, expected {shape} (all policy-loss inputs are [B, T])")
    if len(shape) != 2:
        raise ValueError(f"policy-loss inputs must be [B, T], got {shape}")


# ----------------------------------------------------------------------------- loss and metrics

def policy_loss(cfg: PolicyLossConfig, logp, behaviour_logp, advantages, mask, segment_ids, *,
                proximal_logp=None, ref_logp=None, entropy=None):
    """(loss_sum, count, {"pg_loss", "kl", "entropy": Mean}) for one micro-batch.

    Per token: is_weight·ppo_clip(ratio, A) + kl_coef·KL − entropy_coef·entropy, over the trained
    tokens of the segments the sequence mask and veto keep, aggregated by cfg.agg_mode. Dropped
    segments leave the count as well as the sum (they behave as if absent). The metrics use the same
    aggregation, so pg_loss + kl_coef·kl − entropy_coef·entropy = loss, sums and counts alike.
    `entropy` [B, T] is the learner's (logprobs.token_logprobs_and_entropy), differentiable.
    """
    _check(dict(logp=logp, behaviour_logp=behaviour_logp, advantages=advantages, mask=mask,
                segment_ids=segment_ids, proximal_logp=proximal_logp, ref_logp=ref_logp, entropy=entropy))
    if cfg.kl_coef and ref_logp is None:
        raise ValueError("kl_coef > 0 needs ref_logp (the frozen reference's log-probs)")
    if cfg.entropy_coef and entropy is None:
        raise ValueError("entropy_coef > 0 needs the learner's per-token entropy")
    mask = mask.astype(jnp.float32) * (segment_ids > 0)
    p = _parts(cfg, logp, behaviour_logp, mask, segment_ids, proximal_logp)
    mask = mask * p.keep_geo * p.keep_veto
    agg = AGGREGATIONS[cfg.agg_mode]
    terms = {"pg_loss": p.is_weight * ppo_clip_loss(p.ratio, advantages, cfg.eps_low, cfg.eps_high, cfg.dual_clip)}
    if ref_logp is not None:
        terms["kl"] = KL_ESTIMATORS[cfg.kl_type](logp, ref_logp)
    if entropy is not None:
        terms["entropy"] = entropy
    metrics = {k: Mean(*agg(v, mask, segment_ids, cfg)) for k, v in terms.items()}
    total = terms["pg_loss"] + cfg.kl_coef * terms.get("kl", 0.0) - cfg.entropy_coef * terms.get("entropy", 0.0)
    loss_sum, count = agg(total, mask, segment_ids, cfg)
    return loss_sum, count, metrics


def diagnostics(cfg: PolicyLossConfig, logp, behaviour_logp, advantages, mask, segment_ids, *,
                proximal_logp=None, ref_logp=None, entropy=None) -> dict:
    """Detached health metrics over all trained tokens (before the sequence mask / veto), as
    Mean(sum, count) or Max: clip fractions (low: A < 0 and r < 1−eps_low; high: A > 0 and
    r > 1+eps_high; dual: A < 0 and r > c, i.e. where the gradient is zero), max ratio, mean / max
    |log π_proximal − log π_behaviour| (train/rollout mismatch), fraction of segments dropped by
    the geometric mask and by the veto, and the token means of KL (cfg.kl_type) and entropy when
    given ("kl_token_mean", "entropy_token_mean"; the logged "kl" and "entropy" are policy_loss's,
    aggregated by cfg.agg_mode over the segments the loss keeps, as the loss itself)."""
    sg = jax.lax.stop_gradient
    logp, proximal_logp = sg(logp), None if proximal_logp is None else sg(proximal_logp)
    mask = mask.astype(jnp.float32) * (segment_ids > 0)
    p = _parts(cfg, logp, behaviour_logp, mask, segment_ids, proximal_logp)
    n_tok = mask.sum()

    def frac(cond):
        return Mean((mask * cond).sum(), n_tok)

    def masked_max(x):
        return Max(jnp.where(mask > 0, x, -jnp.inf).max())

    seg_n = segment_sums(mask, segment_ids)
    n_seq = (seg_n > 0).sum().astype(jnp.float32)

    def seq_frac(keep):  # segments with trained tokens that `keep` drops
        dropped = segment_sums(mask * (1.0 - keep), segment_ids) > 0
        return Mean(dropped.sum().astype(jnp.float32), n_seq)

    out = {"clip_frac_low": frac((advantages < 0) & (p.ratio < 1 - cfg.eps_low)),
           "clip_frac_high": frac((advantages > 0) & (p.ratio > 1 + cfg.eps_high)),
           "ratio_max": masked_max(p.ratio),
           "mismatch_abs": Mean((mask * jnp.abs(p.log_mismatch)).sum(), n_tok),
           "mismatch_abs_max": masked_max(jnp.abs(p.log_mismatch)),
           "geo_masked_frac": seq_frac(p.keep_geo), "veto_masked_frac": seq_frac(p.keep_veto)}
    if cfg.dual_clip:
        out["clip_frac_dual"] = frac((advantages < 0) & (p.ratio > cfg.dual_clip))
    if ref_logp is not None:
        out["kl_token_mean"] = Mean((mask * KL_ESTIMATORS[cfg.kl_type](logp, ref_logp)).sum(), n_tok)
    if entropy is not None:
        out["entropy_token_mean"] = Mean((mask * sg(entropy)).sum(), n_tok)
    return out


def empty_metrics(shapes: dict) -> dict:
    """The identity of `merge_metrics` for metrics of these shapes: zero sums, -inf maxima."""
    return {k: Max(jnp.full(m.value.shape, -jnp.inf, m.value.dtype)) if isinstance(m, Max)
            else Mean(jnp.zeros(m.sum.shape, m.sum.dtype), jnp.zeros(m.count.shape, m.count.dtype))
            for k, m in shapes.items()}


def merge_metrics(a: dict, b: dict) -> dict:
    """Combine two micro-batches' (or hosts') metrics: Mean adds, Max takes the max."""
    return {k: Max(jnp.maximum(a[k].value, b[k].value)) if isinstance(a[k], Max)
            else Mean(a[k].sum + b[k].sum, a[k].count + b[k].count) for k in a}


def metric_values(metrics: dict) -> dict:
    """Final values: sum / count for Mean (0 where nothing was counted), the value for Max."""
    return {k: m.value if isinstance(m, Max) else m.sum / jnp.maximum(m.count, 1.0) for k, m in metrics.items()}
