"""Stage `grpo`: rollout workers play whole groups while the learner steps; score, step, push weights.

    python -m tau2jax.train --config configs/tiny_grpo_toy.py      # CPU, toy lookup game, ~1 min
    ... --config.rl.max_staleness=1                                 # rollouts one step ahead

Each step s (0-based; the learner holds version s): groups of `rl.tasks_per_step` tasks
(re-queued ones first, then an epoch-shuffled order) are submitted to `rl.rollout_workers` for
steps s .. s + rl.max_staleness; the workers start a group for step t only once the engine serves
version >= t - max_staleness, so with max_staleness 0 the loop is synchronous and with 1 the next
step's episodes run while the learner trains. The learner takes step s's whole groups (refilling
with more tasks under dynamic sampling), checks each sample's staleness (`rl.staleness`: over the
bound -> dropped, or kept under token TIS with rl.stale_policy="correct"), turns rewards into group
advantages (`rl.advantages`), packs the trajectories' own tokens (`rl.batch`), takes one optimizer
step (`rl.grpo_step`) and pushes the weights every `rl.sync_every` steps (`sync_weights`: pause and
transfer seconds logged apart). Episodes in flight across a push continue on the new weights; their
turns carry the version that sampled them. Every episode gets a ledger line
(`{workdir}/rollouts/ledger.jsonl`: trained, dropped with a reason, or re-queued) and its full record
in `{workdir}/rollouts/step_N.jsonl`. Metrics per step: rollout tokens/s and episodes/s, learner
busy fraction, queue depth, staleness histogram (`staleness/<k>`), weight-sync pause/transfer.

Faults: an episode failing on infrastructure (engine down, user simulator timeout / 5xx) is retried
with its seed, then its group is re-queued whole; after such a failure, if the engine no longer
serves our version (restarted), the learner re-syncs the current weights. Checkpoints hold the
train state and the loop state (task order cursor, re-queued tasks, curriculum tracker, reward
history), with the groups submitted but not yet trained put back in the re-queue. After a SIGKILL
the rerun restores the last checkpoint and replays them; ledger lines of steps past the checkpoint
are discarded, so no group is ever trained (or counted) twice.
"""

from __future__ import annotations

import json
import math
import os
import time

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
from tau2jax.rl import collector, rollout_metrics, staleness
from tau2jax.rl.batch import BatchConfig, build_batch
from tau2jax.rl.grpo_step import jit_grpo_step, make_grpo_step, micro_batched_grpo_step
from tau2jax.rl.losses import PolicyLossConfig
from tau2jax.rl.rollout_workers import Job, RolloutWorkers

SUMMARY_WINDOW = 3  # first_reward / final_reward: mean over this many steps at each end


# ----------------------------------------------------------------------------- setup

def make_environment(config):
    """-> (environment, tokenizer or None, model config)."""
    if config.rl.env == "toy":
        from tau2jax.env.toy import ToyEnvironment

        env = ToyEnvironment(num_tasks=config.rl.toy_tasks, seed=config.seed, shared_table=config.rl.toy_shared_table,
                             turn_latency_s=config.rl.toy_turn_latency_s)
        return env, None, model_setup.resolve_model_config(config)
    from tau2jax.data.chat import ChatFormat
    from tau2jax.data.tokenizer import load_tokenizer
    from tau2jax.env.environments import Tau2Environment

    tokenizer = load_tokenizer(config.tokenizer.path or config.model.hf_dir)
    env = Tau2Environment(config, ChatFormat(tokenizer), split="train")
    return env, tokenizer, model_setup.resolve_model_config(config, tokenizer)


def null_solvable_tasks(config, env) -> set[str] | None:
    """"domain/task_id" of the tau2 tasks a do-nothing agent passes (eval/floor.py, cached): the
    share of successes on them tells learning from a policy collapsing to refusals."""
    if config.rl.env != "tau2" or not config.eval.floor:
        return None
    from tau2jax.eval import floor

    tasks = [(ref.domain, ref.task) for ref in env.tasks()]
    passes = floor.outcomes(tasks, chat=env.chat, style=env.style, cache_dir=config.eval.floor_cache_dir)
    return {f"{d}/{t}" for (d, t), ok in passes.items() if ok}


def loss_config(rl) -> PolicyLossConfig:
    geo = (rl.geo_mask_low, rl.geo_mask_high) if rl.geo_mask_high > 0 else None
    return PolicyLossConfig(eps_low=rl.eps_low, eps_high=rl.eps_high, dual_clip=rl.dual_clip,
                            ratio_level=rl.ratio_level, agg_mode=rl.agg_mode, norm_len=rl.max_len,
                            kl_coef=rl.kl_coef, kl_type=rl.kl_type, entropy_coef=rl.entropy_coef,
                            tis_cap=staleness.tis_cap(rl.stale_policy, rl.tis_cap), geo_mask=geo,
                            veto_threshold=rl.veto_threshold)


def make_engine(config, model_cfg, params, tokenizer, version: int):
    """The rollout engine, holding `params` as policy `version`: the built-in engine in this
    process (weights pushed as device arrays), or SGLang over HTTP (weights published to disk)."""
    if config.engine.kind == "builtin":
        from tau2jax.inference.jax_engine import JaxEngine, engine_dtype

        dtype = engine_dtype(config.engine.dtype)
        return JaxEngine(jax.tree.map(lambda x: x.astype(dtype), params), model_cfg, tokenizer=tokenizer,
                         max_seq_len=config.engine.max_seq_len, max_batch=config.engine.max_batch,
                         compute_dtype=dtype, prefix_cache_tokens=config.engine.prefix_cache_tokens,
                         policy_version=version, seed=config.seed)
    if config.engine.kind == "sglang":
        from tau2jax.inference.sglang_client import from_config

        return from_config(config)
    raise config_lib.ConfigError(f"config.engine.kind={config.engine.kind!r}: GRPO needs builtin or sglang")


def sync_weights(engine, config, params, model_cfg, version: int) -> dict:
    """New policy weights into the engine as `version` -> {"pause_s", "transfer_s"}: seconds the
    engine could not serve, and seconds spent moving the weights.

    builtin: `update_weights` copies the arrays onto the engine's shardings (transfer), then swaps
    a reference under the engine's lock; running batches finish on the old weights, so nothing
    waits (pause 0). SGLang: `weight_sync.publish` writes safetensors (transfer, the server keeps
    serving), then `/update_weights_from_disk` with the version (pause: SGLang drains and loads);
    `expect_version` then turns any answer from another version into an abort (a retried
    infrastructure failure), so no token is trained under the wrong version."""
    t = time.perf_counter()
    if config.engine.kind == "builtin":
        engine.update_weights(params, version=version)
        return {"pause_s": 0.0, "transfer_s": time.perf_counter() - t}
    from tau2jax.inference import weight_sync

    path = weight_sync.publish(params, model_cfg, os.path.join(config.workdir, "weights"), version)
    t1 = time.perf_counter()
    engine.update_weights_from_disk(path, version)
    engine.expect_version = version
    return {"pause_s": time.perf_counter() - t1, "transfer_s": t1 - t}


def served_version(engine) -> int | None:
    """The version the engine serves now (None: cannot tell). An in-process engine knows it; an
    HTTP server is asked (`weight_version` of /get_model_info), which sees through a restart."""
    if not hasattr(engine, "model_info"):
        return engine.policy_version
    try:
        v = str(engine.model_info().get("weight_version", ""))
    except Exception:  # noqa: BLE001  (server down: the retries will tell)
        return None
    return int(v) if v.isdigit() else -1


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


def plan_jobs(tasks: list[TaskRef], meta: dict, *, target: int, round_: int, n: int, seed: int) -> list[Job]:
    """`n` groups for learner step `target` (0-based); group ids name the step (1-based) and the
    refill round, so a replay after a resume samples with the same seeds."""
    refs = next_tasks(tasks, meta, n, seed)
    return [Job(target, f"s{target + 1}r{round_}g{j}:{ref.key}", ref) for j, ref in enumerate(refs)]


def checkpoint_meta(meta: dict, in_flight: list[str]) -> dict:
    """The loop state to save: groups submitted but not trained yet go back to the front of the
    re-queue (a resumed run replays them; the ledger has no line of them yet)."""
    return meta | {"requeue": list(in_flight) + list(meta["requeue"])}


# ----------------------------------------------------------------------------- one step's data

def advantage_reward(t, rl) -> float:
    """The reward group advantages are computed from: shaped, minus the repeat penalty."""
    r = t.shaped_reward if t.shaped_reward is not None else (t.reward or 0.0)
    return r - rl.repeat_penalty * rollout_metrics.repeated_tool_calls(t) if rl.repeat_penalty else r


def assemble(groups, rl, tracker, *, step: int, learner_version: int):
    """Complete groups -> (batch items, ledger records, counters, staleness per scored trajectory).
    Incomplete groups are re-queued; samples over the staleness bound are dropped (`rl.stale_policy`
    "drop") and leave their group's statistics; with dynamic sampling, zero-variance groups are
    dropped. Every drop is counted and has a ledger reason."""
    ledger, items = [], []
    counts = {"groups_requeued": 0, "groups_zero_variance": 0, "groups_trained": 0, "samples_stale": 0}
    rewards = {id(t): advantage_reward(t, rl) for g in groups for t in g.trajectories}
    kept, ages = [], []
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
        if tracker is not None:
            for t in g.trajectories:
                tracker.record(g.ref.key, t.success)
        age, fresh = staleness.check(g.trajectories, learner_version, rl.max_staleness, rl.stale_policy)
        ages += age
        for t, a, ok in zip(g.trajectories, age, fresh):
            if not ok:
                counts["samples_stale"] += 1
                ledger.append(collector.ledger_record(t, step=step, group_id=g.group_id, status="dropped",
                                                      reason="stale", staleness=a))
        rs = [rewards[id(t)] for t, ok in zip(g.trajectories, fresh) if ok]
        if rl.dynamic_sampling and rs and max(rs) == min(rs):
            counts["groups_zero_variance"] += 1
            for t, ok in zip(g.trajectories, fresh):
                if ok:
                    ledger.append(collector.ledger_record(t, step=step, group_id=g.group_id, status="dropped",
                                                          reason="zero_variance"))
            continue
        if rs:
            kept.append((gi, g, [(t, rewards[id(t)], a) for t, a, ok in zip(g.trajectories, age, fresh) if ok]))
    if not kept:
        return items, ledger, counts, ages
    flat_r = [r for _, _, ts in kept for _, r, _ in ts]
    flat_g = [gi for gi, _, ts in kept for _ in ts]
    adv = adv_lib.group_advantages(flat_r, flat_g, std_normalize=rl.std_normalize)
    i = 0
    for gi, g, ts in kept:
        w = tracker.weight(g.ref.key) if tracker is not None else 1.0
        counts["groups_trained"] += 1
        for t, _, a in ts:
            items.append((t, float(adv[i]) * w, gi))
            ledger.append(collector.ledger_record(t, step=step, group_id=g.group_id, status="trained",
                                                  advantage=float(adv[i]) * w, staleness=a))
            i += 1
    return items, ledger, counts, ages


def useful(g, rl) -> bool:
    """Counts toward the step's tasks_per_step: whole, and with dynamic sampling not zero-variance."""
    return g.complete and not (rl.dynamic_sampling and len({advantage_reward(t, rl) for t in g.trajectories}) == 1)


def gather(workers, tasks, meta, rl, *, step: int, seed: int, resync) -> tuple[list, int]:
    """Step `step`'s whole groups, refilled with more tasks under dynamic sampling -> (groups, refill
    rounds). Tasks of incomplete groups go back to the re-queue."""
    groups, rounds = workers.take(step, resync), 0
    want = rl.tasks_per_step - sum(useful(g, rl) for g in groups)
    while rl.dynamic_sampling and want > 0 and rounds < rl.max_refill_rounds:
        rounds += 1
        workers.submit(plan_jobs(tasks, meta, target=step, round_=rounds, n=want, seed=seed))
        new = workers.take(step, resync)
        groups += new
        want -= sum(useful(g, rl) for g in new)
    meta["requeue"] += [g.ref.key for g in groups if not g.complete]
    return groups, rounds


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
    null_solvable = null_solvable_tasks(config, env)
    tasks = env.tasks()
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    compute_dtype = jnp.dtype(config.model.compute_dtype)
    tx, schedule = make_optimizer(config.optim, rl.steps)
    p_shard = qwen3.param_shardings(model_cfg, mesh)
    abstract_params = model_setup.abstract_params(model_cfg, config.model.param_dtype)
    shardings = state_shardings(tx, abstract_params, p_shard, mesh)
    batch_sharding = sharding.batch_sharding(mesh)
    dp = mesh.shape["data"] * mesh.shape["fsdp"]
    # rows: a multiple of the data-parallel size times the micro-batch (rl.micro_batch_rows rows, or
    # optim.grad_accum micro-batches)
    micro = dp * rl.micro_batch_rows if rl.micro_batch_rows else dp * config.optim.grad_accum
    batch_cfg = BatchConfig(max_len=rl.max_len, overlong=rl.overlong, keep_length_cut=rl.keep_length_cut,
                            malformed_turns=rl.malformed_turns, row_multiple=micro)

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

    forward_kw = dict(compute_dtype=compute_dtype, remat=config.model.remat, loss_chunk=config.train.loss_chunk,
                      vocab_chunk=rl.vocab_chunk, attn_chunk=config.model.attn_chunk,
                      attn_impl=config.model.attn_impl, attn_max_segments=config.model.attn_max_segments)
    ref_shardings = p_shard if ref_params is not None else None
    if rl.micro_batch_rows:  # fixed-shape micro-batches: compiled once, whatever a step's row count
        step_fn = micro_batched_grpo_step(model_cfg, tx, schedule, loss_config(rl), shardings, batch_sharding,
                                          ref_shardings, micro_batch_rows=dp * rl.micro_batch_rows, **forward_kw)
        learner_compiles = step_fn.compiles
    else:  # one executable per row bucket
        jitted = jit_grpo_step(make_grpo_step(model_cfg, tx, schedule, loss_config(rl),
                                              grad_accum=config.optim.grad_accum, **forward_kw),
                               shardings, batch_sharding, ref_shardings)
        step_fn = lambda st, b, ref: jitted(st, jax.device_put(b, batch_sharding), ref)  # noqa: E731
        learner_compiles = jitted._cache_size

    # --- rollouts: the engine at the state's version, workers producing whole groups
    engine = make_engine(config, model_cfg, state.params, tokenizer, version=start)
    if config.engine.kind != "builtin":
        sync_weights(engine, config, state.params, model_cfg, start)
    synced = {"version": start, "resyncs": 0}

    def lost_weights(traj) -> bool:  # worker thread, after an infrastructure failure
        v = served_version(engine)  # below the last completed sync: restarted (mid-sync it is old or new)
        return v is not None and v < synced["version"]

    def resync():  # learner thread: the engine restarted without our weights
        sync_weights(engine, config, state.params, model_cfg, int(state.step))
        synced["version"], synced["resyncs"] = int(state.step), synced["resyncs"] + 1
        workers.set_version(synced["version"])

    sampling = SamplingParams(temperature=rl.temperature, top_p=rl.top_p, top_k=rl.top_k,
                              max_new_tokens=config.engine.max_new_tokens)
    workers = RolloutWorkers(env, engine=engine, sampling=sampling, samples=rl.samples_per_task, seed=config.seed,
                             concurrency=rl.concurrency, max_infra_retries=rl.max_infra_retries,
                             max_staleness=rl.max_staleness, version=start, lost_weights=lost_weights)

    rollouts_dir = os.path.join(config.workdir, "rollouts")
    os.makedirs(rollouts_dir, exist_ok=True)
    ledger_path = os.path.join(rollouts_dir, "ledger.jsonl")
    _truncate_ledger(ledger_path, start)
    writer = MetricWriter(config.workdir)
    bar = tqdm(total=rl.steps, initial=start, desc="grpo", dynamic_ncols=True)
    planned, max_seen, busy = start, 0, []
    t_prev = t_first = time.perf_counter()

    # --- loop
    try:
        with jax.set_mesh(mesh):
            for step in range(start, rl.steps):
                # prompts for this step and up to max_staleness steps ahead (the workers gate them)
                while planned < min(step + rl.max_staleness + 1, rl.steps):
                    workers.submit(plan_jobs(tasks, meta, target=planned, round_=0, n=rl.tasks_per_step,
                                             seed=config.seed))
                    planned += 1
                m = {"queue_depth": workers.ready_groups()}
                t0 = time.perf_counter()
                groups, rounds = gather(workers, tasks, meta, rl, step=step, seed=config.seed, resync=resync)
                m["rollout_wait_s"] = time.perf_counter() - t0
                items, ledger, counts, ages = assemble(groups, rl, tracker, step=step + 1, learner_version=step)
                max_seen = max([max_seen, *ages])
                trajs = [t for g in groups if g.complete for t in g.trajectories]
                m |= rollout_metrics.episode_metrics(trajs, null_solvable) | counts | staleness.histogram(ages)
                m |= {"refill_rounds": rounds, "staleness_max": max(ages, default=0)} | workers.throughput()
                batch, bstats = build_batch(items, batch_cfg)
                t1 = time.perf_counter()
                if batch is not None:
                    if config.model.attn_impl == "cudnn":
                        try:
                            qwen3.check_segments(batch["segment_ids"], config.model.attn_max_segments)
                        except ValueError as e:
                            raise config_lib.ConfigError(f"config.{e}") from None
                    state, learner = step_fn(state, batch, ref_params)
                    learner = jax.device_get(learner)
                    m |= {k: float(v) for k, v in learner.items()}
                    m["tokens_per_s"] = float((batch["segment_ids"] > 0).sum()) / (time.perf_counter() - t1)
                    if not math.isfinite(m["loss"]):
                        raise FloatingPointError(
                            f"non-finite GRPO loss at step {step + 1}; the last good checkpoint is step "
                            f"{ckpt.latest_step()} in {ckpt.directory}. Lower optim.lr or check the rewards.")
                else:
                    # nothing trainable: the optimizer does not move, the step still counts
                    state = state.replace(step=state.step + 1)
                m["learner_s"] = time.perf_counter() - t1
                m |= {"batch_" + k: v for k, v in vars(bstats).items()}
                if (step + 1) % rl.sync_every == 0 or step + 1 == rl.steps:
                    m |= {f"weight_sync_{k}": v for k, v in
                          sync_weights(engine, config, state.params, model_cfg, step + 1).items()}
                    synced["version"] = step + 1
                    workers.set_version(step + 1)
                m["engine_resyncs"] = synced["resyncs"]
                meta["rewards"].append(m.get("reward_mean", 0.0))
                meta["episodes"] += len(trajs)
                meta["tracker"] = tracker.state_dict() if tracker is not None else None
                with open(ledger_path, "a") as f:
                    f.writelines(json.dumps(r) + "\n" for r in ledger)
                with open(os.path.join(rollouts_dir, f"step_{step + 1}.jsonl"), "w") as f:
                    f.writelines(t.to_json() + "\n" for g in groups for t in [*g.trajectories, *g.failed_attempts])
                now = time.perf_counter()
                m["step_s"], t_prev = now - t_prev, now
                m["learner_busy_frac"] = m["learner_s"] / m["step_s"]
                busy.append(m["learner_busy_frac"])
                if step == start:
                    t_first = now  # steady-state timings start after the first step (compiles)
                writer.write(step + 1, m)
                bar.set_postfix(reward=f"{m.get('reward_mean', 0.0):.3f}", loss=f"{m.get('loss', 0.0):.4f}")
                bar.update(1)
                ckpt.save(step + 1, state, meta=checkpoint_meta(meta, workers.in_flight_keys()),
                          force=step + 1 == rl.steps)
    finally:
        workers.close()
        bar.close()
        ckpt.close()
        writer.close()
        if hasattr(engine, "close"):
            engine.close()
    steady = t_prev - t_first  # the timed steps, not the teardown above
    params_dir = export_params(config.workdir, state.params, model_cfg, rl.steps)
    hist = meta["rewards"]
    w = min(SUMMARY_WINDOW, max(1, len(hist) // 2))
    return {
        "stage": "grpo", "env": rl.env, "steps": rl.steps, "resumed_from": start,
        "first_reward": float(np.mean(hist[:w])) if hist else None,
        "final_reward": float(np.mean(hist[-w:])) if hist else None,
        "episodes": meta["episodes"], "params": params_dir, "max_staleness": rl.max_staleness,
        "max_staleness_seen": max_seen,
        "learner_busy_frac": float(np.mean(busy[1:])) if len(busy) > 1 else None,
        "steady_s": round(steady, 3), "engine_resyncs": synced["resyncs"],
        # learner executables compiled this run: one per power-of-two row bucket met, or with
        # rl.micro_batch_rows at most three (first micro-batch, the others, the update)
        "learner_compiles": learner_compiles(),
        "wall_s": round(time.perf_counter() - t_start, 1),
    }  # fmt: skip
