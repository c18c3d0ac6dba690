"""AdamW with warmup + cosine (or constant) schedule and global-norm clipping, from config.optim."""

from __future__ import annotations

import jax
import optax


def make_schedule(optim_cfg, total_steps: int) -> optax.Schedule:
    warmup = int(round(optim_cfg.warmup_frac * total_steps))
    if optim_cfg.schedule == "constant":
        if warmup == 0:
            return optax.constant_schedule(optim_cfg.lr)
        return optax.join_schedules(
            [optax.linear_schedule(0.0, optim_cfg.lr, warmup), optax.constant_schedule(optim_cfg.lr)], [warmup])
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0 if warmup else optim_cfg.lr,
        peak_value=optim_cfg.lr,
        warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1),
        end_value=optim_cfg.lr * optim_cfg.min_lr_ratio,
    )


def _decay_mask(params):
    # No weight decay on norm scales (1-D), as in the usual LLM recipes.
    return jax.tree.map(lambda p: p.ndim > 1, params)


def make_optimizer(optim_cfg, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    schedule = make_schedule(optim_cfg, total_steps)
    tx = optax.chain(
        optax.clip_by_global_norm(optim_cfg.clip_norm),
        optax.adamw(schedule, b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps,
                    weight_decay=optim_cfg.weight_decay, mask=_decay_mask),
    )
    return tx, schedule
