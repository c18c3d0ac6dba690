"""Stage `grpo`: the synchronous loop — generate K episodes per task, score, step, push weights.

    python -m tau2jax.train --config configs/tiny_grpo_toy.py      # CPU, toy lookup game, ~3 min

Each step: take `rl.tasks_per_step` tasks (re-queued ones first, then an epoch-shuffled order),
play `rl.samples_per_task` episodes of each on the engine (`rl.collector`), turn rewards into
group advantages (`rl.advantages`), pack the trajectories' own tokens (`rl.batch`), take one
optimizer step (`rl.grpo_step`) and push the new weights to the engine every `rl.sync_every`
steps. Every episode gets a ledger line (`{workdir}/rollouts/ledger.jsonl`: trained, dropped with
a reason, or re-queued) and its full record in `{workdir}/rollouts/step_N.jsonl`.

Checkpoints hold the train state and the loop state (step, task order cursor, re-queued tasks,
curriculum tracker, reward history). After a SIGKILL the rerun restores the last checkpoint and
regenerates the steps after it; ledger lines of steps past the checkpoint are discarded, so no
group is ever trained (or counted) twice.
"""

from __future__ import annotations

import json
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from tau2jax import config as config_lib
from tau2jax.env.environments import TaskRef
from tau2jax.inference.engine import SamplingParams
from tau2jax.learn import model_setup
from tau2jax.learn.checkpoint import Checkpointer, abstract_like
from tau2jax.learn.export import export_params
from tau2jax.learn.metric_writer import MetricWriter
from tau2jax.learn.optimizer import make_optimizer
from tau2jax.learn.train_state import create_state, state_shardings
from tau2jax.models import qwen3
from tau2jax.parallel import sharding
from tau2jax.rl import advantages as adv_lib
from tau2jax.rl import collector, rollout_metrics
from tau2jax.rl.batch import BatchConfig, build_batch
from tau2jax.rl.grpo_step import jit_grpo_step, make_grpo_step
from tau2jax.rl.losses import PolicyLossConfig

SUMMARY_WINDOW = 3  # first_reward / final_reward: mean over this many steps at each end


# ----------------------------------------------------------------------------- setup

def make_environment(config):
    """-> (environment, tokenizer or None, model config)."""
    if config.rl.env == "toy":
        from tau2jax.env.toy import ToyEnvironment

        env = ToyEnvironment(num_tasks=config.rl.toy_tasks, seed=config.seed, shared_table=config.rl.toy_shared_table)
        return env, None, model_setup.resolve_model_config(config)
    from tau2jax.data.chat import ChatFormat
    from tau2jax.data.tokenizer import load_tokenizer
    from tau2jax.env.environments import Tau2Environment

    tokenizer = load_tokenizer(config.tokenizer.path or config.model.hf_dir)
    env = Tau2Environment(config, ChatFormat(tokenizer), split="train")
    return env, tokenizer, model_setup.resolve_model_config(config, tokenizer)


def loss_config(rl) -> PolicyLossConfig:
    geo = (rl.geo_mask_low, rl.geo_mask_high) if rl.geo_mask_high > 0 else None
    return PolicyLossConfig(eps_low=rl.eps_low, eps_high=rl.eps_high, dual_clip=rl.dual_clip,
                            ratio_level=rl.ratio_level, agg_mode=rl.agg_mode, norm_len=rl.max_len,
                            kl_coef=rl.kl_coef, kl_type=rl.kl_type, entropy_coef=rl.entropy_coef,
                            tis_cap=rl.tis_cap, geo_mask=geo, veto_threshold=rl.veto_threshold)


def make_engine(config, model_cfg, params, tokenizer, version: int):
    """The rollout engine, holding `params` as policy `version`: the built-in engine in this
    process (weights pushed as device arrays), or SGLang over HTTP (weights published to disk)."""
    if config.engine.kind == "builtin":
        from tau2jax.inference.jax_engine import JaxEngine

        return JaxEngine(params, model_cfg, tokenizer=tokenizer, max_seq_len=config.engine.max_seq_len,
                         max_batch=config.engine.max_batch, policy_version=version, seed=config.seed)
    if config.engine.kind == "sglang":
        from tau2jax.inference.sglang_client import from_config

        return from_config(config)
    raise config_lib.ConfigError(f"config.engine.kind={config.engine.kind!r}: GRPO needs builtin or sglang")


def push_weights(engine, config, params, model_cfg, version: int) -> float:
    """New policy weights into the engine; -> seconds the engine was paused."""
    t = time.perf_counter()
    if config.engine.kind == "builtin":
        engine.update_weights(params, version=version)
    else:
        from tau2jax.inference import weight_sync

        path = weight_sync.publish(params, model_cfg, os.path.join(config.workdir, "weights"), version)
        engine.update_weights_from_disk(path, version)
    return time.perf_counter() - t


# ----------------------------------------------------------------------------- task order

def next_tasks(tasks: list[TaskRef], meta: dict, n: int, seed: int) -> list[TaskRef]:
    """Re-queued tasks first, then the next ones of an order reshuffled every epoch."""
    by_key = {t.key: t for t in tasks}
    out = [by_key[k] for k in meta["requeue"][:n]]
    meta["requeue"] = meta["requeue"][len(out):]
    while len(out) < n:
        epoch, pos = divmod(meta["cursor"], len(tasks))
        order = np.random.default_rng([seed, epoch]).permutation(len(tasks))
        out.append(tasks[order[pos]])
        meta["cursor"] += 1
    return out


# ----------------------------------------------------------------------------- one step's data

def _rewards(groups, rl) -> dict:
    """Per trajectory: the reward the advantages use (shaped, minus the repeat penalty)."""
    out = {}
    for g in groups:
        for t in g.trajectories:
            r = t.shaped_reward if t.shaped_reward is not None else (t.reward or 0.0)
            out[id(t)] = r - rl.repeat_penalty * rollout_metrics.repeated_tool_calls(t)
    return out


def assemble(groups, rl, tracker, *, step: int):
    """Complete groups -> (batch items, ledger records, counters). Incomplete groups are re-queued;
    with dynamic sampling, zero-variance groups are dropped (counted)."""
    ledger, items, counts = [], [], {"groups_requeued": 0, "groups_zero_variance": 0, "groups_trained": 0}
    rewards = _rewards(groups, rl)
    kept = []
    for gi, g in enumerate(groups):
        for t in g.failed_attempts:
            ledger.append(collector.ledger_record(t, step=step, group_id=g.group_id, status="dropped",
                                                  reason="infra_error_retried"))
        if not g.complete:
            counts["groups_requeued"] += 1
            for t in g.trajectories:
                ledger.append(collector.ledger_record(t, step=step, group_id=g.group_id, status="requeued",
                                                      reason="group_incomplete"))
            continue
        rs = [rewards[id(t)] for t in g.trajectories]
        if tracker is not None:
            for t in g.trajectories:
                tracker.record(g.ref.key, t.success)
        if rl.dynamic_sampling and max(rs) == min(rs):
            counts["groups_zero_variance"] += 1
            for t in g.trajectories:
                ledger.append(collector.ledger_record(t, step=step, group_id=g.group_id, status="dropped",
                                                      reason="zero_variance"))
            continue
        kept.append((gi, g, rs))
    if not kept:
        return items, ledger, counts
    flat_r = [r for _, _, rs in kept for r in rs]
    flat_g = [gi for gi, g, rs in kept for _ in rs]
    adv = adv_lib.group_advantages(flat_r, flat_g, std_normalize=rl.std_normalize)
    i = 0
    for gi, g, rs in kept:
        w = tracker.weight(g.ref.key) if tracker is not None else 1.0
        counts["groups_trained"] += 1
        for t in g.trajectories:
            items.append((t, float(adv[i]) * w, gi))
            ledger.append(collector.ledger_record(t, step=step, group_id=g.group_id, status="trained",
                                                  advantage=float(adv[i]) * w))
            i += 1
    return items, ledger, counts


def _truncate_ledger(path: str, last_step: int) -> None:
    """Drop lines of steps after `last_step` (a run killed before its next checkpoint)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        keep = [line for line in f if json.loads(line)["step"] <= last_step]
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(keep)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- the stage

def run(config) -> dict:
    rl = config.rl
    if jax.process_count() > 1:
        raise config_lib.ConfigError("stage grpo runs in one process (rollouts on this host); "
                                     "multi-process GRPO is not built yet")
    t_start = time.perf_counter()
    # --- setup
    env, tokenizer, model_cfg = make_environment(config)
    tasks = env.tasks()
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    compute_dtype = jnp.dtype(config.model.compute_dtype)
    tx, schedule = make_optimizer(config.optim, rl.steps)
    p_shard = qwen3.param_shardings(model_cfg, mesh)
    abstract_params = model_setup.abstract_params(model_cfg, config.model.param_dtype)
    shardings = state_shardings(tx, abstract_params, p_shard, mesh)
    batch_sharding = sharding.batch_sharding(mesh)
    dp = mesh.shape["data"] * mesh.shape["fsdp"]
    batch_cfg = BatchConfig(max_len=rl.max_len, overlong=rl.overlong, keep_length_cut=rl.keep_length_cut,
                            row_multiple=dp * config.optim.grad_accum)

    # --- state: the last checkpoint, else the initial (SFT) weights
    ckpt = Checkpointer(os.path.join(config.workdir, "checkpoints"), save_every=config.train.checkpoint_every,
                        keep=config.train.keep_checkpoints, async_save=config.train.async_checkpoint)
    start = ckpt.latest_step() or 0
    init_params = model_setup.initial_params(config, model_cfg, mesh, p_shard)
    if start:
        abstract_state = jax.eval_shape(lambda p: create_state(p, tx, shardings, config.seed), abstract_params)
        state = ckpt.restore(start, abstract_like(abstract_state, shardings))
        meta = ckpt.restore_meta(start)
    else:
        state = create_state(init_params, tx, shardings, config.seed)
        meta = {"cursor": 0, "requeue": [], "tracker": None, "rewards": [], "episodes": 0}
    ref_params = None
    if rl.kl_coef:
        if rl.reference:
            from checkpoints_tools.orbax_io import restore_params

            ref_params, _ = restore_params(rl.reference, mesh=mesh)
        else:  # the initial weights (model.init_from, or the seeded random init), frozen
            ref_params = init_params
    else:
        del init_params
    tracker = adv_lib.CurriculumTracker() if rl.curriculum else None
    if tracker is not None and meta["tracker"]:
        tracker.load_state_dict(meta["tracker"])

    step_fn = jit_grpo_step(
        make_grpo_step(model_cfg, tx, schedule, loss_config(rl), grad_accum=config.optim.grad_accum,
                       compute_dtype=compute_dtype, remat=config.model.remat, loss_chunk=config.train.loss_chunk,
                       vocab_chunk=rl.vocab_chunk, attn_chunk=config.model.attn_chunk,
                       attn_impl=config.model.attn_impl),
        shardings, batch_sharding, p_shard if ref_params is not None else None)
    engine = make_engine(config, model_cfg, state.params, tokenizer, version=start)
    if config.engine.kind != "builtin":
        push_weights(engine, config, state.params, model_cfg, start)
    sampling = SamplingParams(temperature=rl.temperature, top_p=rl.top_p, top_k=rl.top_k,
                              max_new_tokens=config.engine.max_new_tokens)

    rollouts_dir = os.path.join(config.workdir, "rollouts")
    os.makedirs(rollouts_dir, exist_ok=True)
    ledger_path = os.path.join(rollouts_dir, "ledger.jsonl")
    _truncate_ledger(ledger_path, start)
    writer = MetricWriter(config.workdir)
    pool = ThreadPoolExecutor(max_workers=rl.concurrency, thread_name_prefix="rollout")
    bar = tqdm(total=rl.steps, initial=start, desc="grpo", dynamic_ncols=True)

    # --- loop
    try:
        with jax.set_mesh(mesh):
            for step in range(start, rl.steps):
                t0 = time.perf_counter()
                groups, rounds = [], 0
                want = rl.tasks_per_step
                while want > 0 and rounds <= (rl.max_refill_rounds if rl.dynamic_sampling else 0):
                    refs = next_tasks(tasks, meta, want, config.seed)
                    jobs = [(f"s{step + 1}r{rounds}g{j}:{ref.key}", ref) for j, ref in enumerate(refs)]
                    new = collector.collect(env, jobs, engine=engine, sampling=sampling, samples=rl.samples_per_task,
                                            seed=config.seed, concurrency=rl.concurrency,
                                            max_infra_retries=rl.max_infra_retries, pool=pool)
                    groups += new
                    meta["requeue"] += [g.ref.key for g in new if not g.complete]
                    useful = [g for g in new if g.complete and not (rl.dynamic_sampling and len(set(g.rewards)) == 1)]
                    want -= len(useful)
                    rounds += 1
                t_rollout = time.perf_counter() - t0
                items, ledger, counts = assemble(groups, rl, tracker, step=step + 1)
                trajs = [t for g in groups if g.complete for t in g.trajectories]
                m = rollout_metrics.episode_metrics(trajs) | counts | {"refill_rounds": rounds - 1,
                                                                        "rollout_s": t_rollout}
                batch, bstats = build_batch(items, batch_cfg)
                if batch is not None:
                    t1 = time.perf_counter()
                    state, learner = step_fn(state, jax.device_put(batch, batch_sharding), ref_params)
                    learner = jax.device_get(learner)
                    m |= {k: float(v) for k, v in learner.items()}
                    m["learner_s"] = time.perf_counter() - t1
                    m["tokens_per_s"] = float((batch["segment_ids"] > 0).sum()) / m["learner_s"]
                    if not math.isfinite(m["loss"]):
                        raise FloatingPointError(
                            f"non-finite GRPO loss at step {step + 1}; the last good checkpoint is step "
                            f"{ckpt.latest_step()} in {ckpt.directory}. Lower optim.lr or check the rewards.")
                else:
                    # nothing trainable: the optimizer does not move, the step still counts
                    state = state.replace(step=state.step + 1)
                m |= {"batch_" + k: v for k, v in vars(bstats).items()}
                if (step + 1) % rl.sync_every == 0 or step + 1 == rl.steps:
                    m["weight_sync_s"] = push_weights(engine, config, state.params, model_cfg, step + 1)
                meta["rewards"].append(m.get("reward_mean", 0.0))
                meta["episodes"] += len(trajs)
                meta["tracker"] = tracker.state_dict() if tracker is not None else None
                with open(ledger_path, "a") as f:
                    f.writelines(json.dumps(r) + "\n" for r in ledger)
                with open(os.path.join(rollouts_dir, f"step_{step + 1}.jsonl"), "w") as f:
                    f.writelines(t.to_json() + "\n" for g in groups for t in [*g.trajectories, *g.failed_attempts])
                m["step_s"] = time.perf_counter() - t0
                writer.write(step + 1, m)
                bar.set_postfix(reward=f"{m.get('reward_mean', 0.0):.3f}", loss=f"{m.get('loss', 0.0):.4f}")
                bar.update(1)
                ckpt.save(step + 1, state, meta=meta, force=step + 1 == rl.steps)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        bar.close()
        ckpt.close()
        writer.close()
        if hasattr(engine, "close"):
            engine.close()
    params_dir = export_params(config.workdir, state.params, model_cfg, rl.steps)
    hist = meta["rewards"]
    w = min(SUMMARY_WINDOW, max(1, len(hist) // 2))
    return {
        "stage": "grpo", "env": rl.env, "steps": rl.steps, "resumed_from": start,
        "first_reward": float(np.mean(hist[:w])) if hist else None,
        "final_reward": float(np.mean(hist[-w:])) if hist else None,
        "episodes": meta["episodes"], "params": params_dir,
        "wall_s": round(time.perf_counter() - t_start, 1),
    }  # fmt: skip
