"""Stage `sft`: supervised fine-tuning on chat JSONL, resumable, mesh-sharded.

    python -m tau2jax.train --config configs/tiny_sft.py

Rerunning the same command after an interruption resumes from the last checkpoint in
`workdir/checkpoints` (params, optimizer, step, rng), with any number of processes / devices: Orbax
reshards the state onto this run's mesh, and the data position is re-derived from the step.
"""

from __future__ import annotations

import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from tau2jax import config as config_lib
from tau2jax.data.pipeline import make_sft_dataset
from tau2jax.learn.checkpoint import Checkpointer, abstract_like
from tau2jax.learn.export import export_params
from tau2jax.learn.metric_writer import MetricWriter
from tau2jax.learn.optimizer import make_optimizer
from tau2jax.learn.sft_step import jit_step, make_sft_step
from tau2jax.learn.train_state import abstract_params as make_abstract_params
from tau2jax.learn.train_state import create_state, state_shardings
from tau2jax.models import qwen3
from tau2jax.parallel import sharding
from tau2jax.stages import builders, resume


def _dataset(config, tokenizer, vocab_size: int):
    files = config_lib.csv(config.data.train_files)
    if not files:
        raise config_lib.ConfigError("config.data.train_files: no SFT data files given")
    return make_sft_dataset(
        files, tokenizer, vocab_size=vocab_size, max_len=config.data.max_len, batch_size=config.data.batch_size,
        seed=config.seed, num_epochs=config.data.num_epochs, overlong=config.data.overlong,
        shuffle=config.data.shuffle, process_index=jax.process_index(), process_count=jax.process_count(),
        prompt_style=config.tau2.prompt_style)


def run(config) -> dict:
    tokenizer = builders.tokenizer(config)
    model_cfg = builders.model_config(config, tokenizer)
    mesh = builders.mesh(config)
    dp = mesh.shape["data"] * mesh.shape["fsdp"]
    if (config.data.batch_size // config.optim.grad_accum) % dp:
        raise config_lib.ConfigError(
            f"config.data.batch_size: {config.data.batch_size} rows / {config.optim.grad_accum} micro-batches "
            f"must divide over the {dp} data-parallel devices (mesh.data × mesh.fsdp)")
    compute_dtype = jnp.dtype(config.model.compute_dtype)

    # Conversations are rendered once, here; iterating packs them (cheap, host-side), so counting the
    # optimizer steps in `num_epochs` of data is one extra pass over the packed rows.
    dataset = _dataset(config, tokenizer, model_cfg.vocab_size)
    total_steps = config.train.steps or sum(1 for _ in dataset)
    if total_steps <= 0:
        raise config_lib.ConfigError("config.data.train_files: the data yields no batch")
    tx, schedule = make_optimizer(config.optim, total_steps)

    param_shardings = qwen3.param_shardings(model_cfg, mesh)
    abstract_params = make_abstract_params(model_cfg, config.model.param_dtype)
    shardings = state_shardings(tx, abstract_params, param_shardings, mesh)
    batch_sharding = sharding.batch_sharding(mesh)

    ckpt_dir = os.path.join(config.workdir, "checkpoints")
    settings = resume.train_settings(config, total_steps)
    state = None
    if not resume.has_checkpoints(ckpt_dir):  # first weights checked before anything is written
        state = create_state(builders.initial_params(config, model_cfg, mesh, param_shardings), tx, shardings,
                             config.seed)
    ckpt = Checkpointer(ckpt_dir, save_every=config.train.checkpoint_every,
                        keep=config.train.keep_checkpoints, async_save=config.train.async_checkpoint)
    start = 0
    if state is None:  # refuse other settings before a restore can set an unreadable step aside
        resume.check_train_resume(config.workdir, config, settings, resume.latest_listed_step(ckpt_dir))
        abstract_state = jax.eval_shape(lambda p: create_state(p, tx, shardings, config.seed), abstract_params)
        start, state, _ = ckpt.restore_latest(abstract_like(abstract_state, shardings))
        if start is None:
            start, state = 0, create_state(builders.initial_params(config, model_cfg, mesh, param_shardings), tx,
                                           shardings, config.seed)
    if start:
        for note in resume.check_train_resume(config.workdir, config, settings, start):
            builders.say(f"note: {note}")
        builders.say(f"resuming from step {start} of {total_steps} ({ckpt.step_dir(start)})")
    resume.record_train_settings(config.workdir, settings)
    # Global batch `start` is the same under any process count: no per-process iterator state.
    data_iter = dataset.iterator(start)

    step_fn = jit_step(make_sft_step(model_cfg, tx, schedule, grad_accum=config.optim.grad_accum,
                                     compute_dtype=compute_dtype, remat=config.model.remat,
                                     loss_chunk=config.train.loss_chunk, attn_chunk=config.model.attn_chunk,
                                     attn_impl=config.model.attn_impl,
                                     attn_max_segments=config.model.attn_max_segments),
                     shardings, batch_sharding)

    writer = MetricWriter(config.workdir)
    is_main = jax.process_index() == 0
    losses = []
    bar = tqdm(total=total_steps, initial=start, desc=builders.progress_name(config, "sft"), disable=not is_main, dynamic_ncols=True)
    t_start = time.perf_counter()
    input_tokens = 0
    with jax.set_mesh(mesh):  # activates the model's activation-sharding hints
        for step in range(start, total_steps):
            local = next(data_iter, None)
            if local is None:
                ckpt.close()
                raise config_lib.ConfigError(
                    f"config.train.steps={total_steps}: the data ends after step {step}; "
                    "raise data.num_epochs or lower train.steps")
            if config.model.attn_impl == "cudnn":
                try:
                    qwen3.check_segments(local["segment_ids"], config.model.attn_max_segments)
                except ValueError as e:
                    bar.close()
                    raise config_lib.ConfigError(f"config.{e}") from None
            batch = {k: jax.make_array_from_process_local_data(batch_sharding, np.asarray(v))
                     for k, v in local.items()}
            if step == start:
                builders.say(f"compiling the sft step ({model_cfg.num_layers} layers, {config.data.batch_size} rows "
                             f"x {config.data.max_len} tokens); the first step waits for it ...")
            t0 = time.perf_counter()
            state, metrics = step_fn(state, batch)
            metrics = jax.device_get(metrics)
            dt = time.perf_counter() - t0
            loss = float(metrics["loss"])
            if not math.isfinite(loss):
                ckpt.close()
                raise FloatingPointError(
                    f"non-finite loss ({loss}) at step {step + 1}; the last good checkpoint is step "
                    f"{ckpt.latest_step()} in {ckpt.directory}. Lower optim.lr or check the data.")
            n_input = int(np.sum(local["segment_ids"] > 0)) * jax.process_count()
            input_tokens += n_input
            metrics["tokens_per_s"] = n_input / dt
            losses.append(loss)
            if (step + 1) % config.train.log_every == 0 or step + 1 == total_steps:
                writer.write(step + 1, metrics)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{float(metrics['lr']):.2e}")
            bar.update(1)
            ckpt.save(step + 1, state, force=step + 1 == total_steps)
    bar.close()
    elapsed = time.perf_counter() - t_start
    ckpt.close()
    writer.close()
    params_dir = export_params(config.workdir, state.params, model_cfg, total_steps, builders.hf_extra_dir(config))
    summary = {
        "stage": "sft",
        "steps": total_steps,
        "resumed_from": start,
        "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None,
        "checkpoint": ckpt.step_dir(total_steps),
        "params": params_dir,
        "params_step": total_steps,
        "tokens_per_s": input_tokens / elapsed if elapsed > 0 else None,
    }
    if losses:
        summary["loss_halved"] = losses[-1] <= 0.5 * losses[0]
    return summary
