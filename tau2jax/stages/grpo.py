"""Stage `grpo`: rollout workers play whole groups while the learner steps; score, step, push weights.

    python -m tau2jax.train --config configs/tiny_grpo_toy.py      # CPU, toy lookup game, ~1 min
    ... --config.rl.max_staleness=1                                 # rollouts one step ahead

Each step s (0-based; the learner holds version s): groups of `rl.tasks_per_step` tasks
(re-queued ones first, then an epoch-shuffled order: `rl.groups`) are submitted to `rl.rollout_workers` for
steps s .. s + rl.max_staleness; the workers start a group for step t only once the engine serves
version >= t - max_staleness, so with max_staleness 0 the loop is synchronous and with 1 the next
step's episodes run while the learner trains. The learner takes step s's whole groups (refilling
with more tasks under dynamic sampling), checks each sample's staleness (`rl.staleness`: over the
bound -> dropped, or kept under token TIS with rl.stale_policy="correct"), turns rewards into group
advantages (`rl.advantages`), packs the trajectories' own tokens (`rl.batch`), takes one optimizer
step (`rl.grpo_step`) and pushes the weights every `rl.sync.every` steps (`rl.policy_sync.PolicySync`: the
engine takes them over on a background thread while rollouts go on; the learner waits only if the
previous push is unfinished; the engine pauses only for the swap). Episodes in flight across a push continue on the new weights; their
turns carry the version that sampled them. Every episode gets a ledger line
(`{workdir}/rollouts/ledger.jsonl`: trained, dropped with a reason, or re-queued) and its full record
in `{workdir}/rollouts/step_N.jsonl`. Metrics per step: rollout tokens/s and episodes/s, learner
busy fraction, queue depth, staleness histogram (`staleness/<k>`), on push steps `weight_sync_wait_s` (the
learner's wait) and the previous push's `weight_sync_publish_s` / `weight_sync_pause_s` / `weight_sync_version`.
With `rl.eval_every` > 0, every eval_every steps the pushed weights play the held-out tasks (never
trained on: the toy test split, tau2's test split) greedy and sampled (`rl.heldout`): metrics
`heldout_greedy_pass1` / `heldout_sampled_pass1`; the best greedy pass@1's weights are exported to
`{workdir}/heldout_best/params`, the last to `{workdir}/params` as always.

Faults: an episode failing on infrastructure (engine down, user simulator timeout / 5xx) is retried
with its seed, then its group is re-queued whole; after such a failure, if the engine no longer
serves our version (restarted), the learner re-syncs the current weights. Checkpoints hold the
train state and the loop state (task order cursor, re-queued tasks, curriculum tracker, reward
history), with the groups submitted but not yet trained put back in the re-queue. After a SIGKILL
the rerun restores the last checkpoint and replays them; ledger lines of steps past the checkpoint
are discarded, so no group is ever trained (or counted) twice.

Several processes (launch/multihost.sh, launch/slurm_rl.sbatch): every process plans every job and
plays its share of the groups (`rl.process_share`), sees every process's groups, and so takes the
same decisions; it packs its own groups' rows into the global batch. Process 0 writes the ledger,
dumps and metrics; the checkpoint (train state + loop state) resumes under any process count that
divides rl.tasks_per_step. See docs/CONTRACTS.md "RL loop".
"""

from __future__ import annotations

import collections
import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from tau2jax import config as config_lib
from tau2jax.eval import floor, tau2_results
from tau2jax.inference.engine import SamplingParams
from tau2jax.learn.checkpoint import Checkpointer, abstract_like
from tau2jax.learn.export import export_params
from tau2jax.learn.metric_writer import MetricWriter
from tau2jax.learn.optimizer import make_optimizer
from tau2jax.learn.train_state import abstract_params as make_abstract_params
from tau2jax.learn.train_state import create_state, state_shardings
from tau2jax.models import qwen3
from tau2jax.parallel import distributed, host_gather, sharding
from tau2jax.rl import advantages as adv_lib
from tau2jax.rl import groups as group_lib
from tau2jax.rl import heldout, rollout_metrics, staleness
from tau2jax.rl.batch import BatchConfig, build_batch
from tau2jax.rl.grpo_step import jit_grpo_step, make_grpo_step, micro_batched_grpo_step
from tau2jax.rl.losses import PolicyLossConfig
from tau2jax.rl.policy_sync import PolicySync
from tau2jax.rl.process_share import ProcessShare
from tau2jax.rl.rollout_workers import RolloutWorkers
from tau2jax.stages import builders, resume
from tau2jax.weights.orbax_params import restore_params

SUMMARY_WINDOW = 3  # first_reward / final_reward: mean over this many steps at each end
HELDOUT_BEST = "heldout_best"  # {workdir}/heldout_best/params: the best held-out greedy pass@1 (rl.eval_every)


def null_solvable_tasks(config, env) -> set[str] | None:
    """"domain/task_id" of the tau2 tasks a do-nothing agent passes (eval/floor.py, cached): the
    share of successes on them tells learning from a policy collapsing to refusals."""
    if config.rl.env != "tau2" or not config.eval.floor:
        return None
    tasks = [(ref.domain, ref.task) for ref in env.tasks()]
    passes = floor.outcomes(tasks, chat=env.chat, style=env.style, cache_dir=config.eval.floor_cache_dir)
    return {f"{d}/{t}" for (d, t), ok in passes.items() if ok}


def loss_config(config, engine) -> PolicyLossConfig:
    """rl.loss -> the loss; tis_cap -1: the engine's default (token TIS against an engine whose
    numerics differ from the learner's)."""
    loss = config.rl.loss
    cap = loss.tis_cap if loss.tis_cap >= 0 else engine.default_tis_cap
    geo = (loss.geo_mask_low, loss.geo_mask_high) if loss.geo_mask_high > 0 else None
    return PolicyLossConfig(eps_low=loss.eps_low, eps_high=loss.eps_high, dual_clip=loss.dual_clip,
                            ratio_level=loss.ratio_level, agg_mode=loss.agg_mode, norm_len=config.rl.batch.max_len,
                            kl_coef=loss.kl_coef, kl_type=loss.kl_type, entropy_coef=loss.entropy_coef,
                            tis_cap=staleness.tis_cap(config.rl.stale_policy, cap), geo_mask=geo,
                            veto_threshold=loss.veto_threshold)


def check_processes(config) -> None:
    """A multi-process launch that cannot work fails here, on every process, naming the fix: the
    processes' configs differ, or the step's groups do not divide over them."""
    n = jax.process_count()
    if n == 1:
        return
    distributed.check_same_config(config)
    if config.rl.tasks_per_step % n:
        raise config_lib.ConfigError(
            f"config.rl.tasks_per_step={config.rl.tasks_per_step} does not divide over {n} processes (each "
            f"plays whole groups): set it to a multiple of {n}, e.g. {-(-config.rl.tasks_per_step // n) * n}, "
            "or launch a process count that divides it")


class Learner:
    """The learner's static pieces: optimizer, shardings, batch packing, and `put` (this process's
    rows -> global arrays, every process's rows in process order)."""

    def __init__(self, config, model_cfg, mesh):
        rl, nproc = config.rl, jax.process_count()
        self.tx, self.schedule = make_optimizer(config.optim, rl.steps)
        self.p_shard = qwen3.param_shardings(model_cfg, mesh)
        self.abstract_params = make_abstract_params(model_cfg, config.model.param_dtype)
        self.shardings = state_shardings(self.tx, self.abstract_params, self.p_shard, mesh)
        self.batch_sharding = sharding.batch_sharding(mesh)
        dp = mesh.shape["data"] * mesh.shape["fsdp"]
        if dp % nproc:
            raise config_lib.ConfigError(f"config.mesh: the data-parallel size {dp} does not divide over {nproc} "
                                         "processes; each process feeds its own rows (use mesh.data=-1)")
        # rows per process: a multiple of its data-parallel share (dp // nproc) times the micro-batch
        # (rl.batch.micro_batch_rows rows, or optim.grad_accum micro-batches)
        b = rl.batch
        self.micro = dp // nproc * (b.micro_batch_rows or config.optim.grad_accum)
        self.batch_cfg = BatchConfig(max_len=b.max_len, overlong=b.overlong, keep_length_cut=b.keep_length_cut,
                                     malformed_turns=b.malformed_turns, row_multiple=self.micro)

    def put(self, local):
        if jax.process_count() == 1:
            return jax.device_put(local, self.batch_sharding)
        return {k: jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(v)) for k, v in local.items()}

    def step_fn(self, config, model_cfg, engine, with_ref: bool):
        """-> (step(state, batch, ref) -> (state, metrics), compiles() -> executables compiled)."""
        ref_shardings = self.p_shard if with_ref else None
        kw = dict(compute_dtype=jnp.dtype(config.model.compute_dtype), remat=config.model.remat,
                  loss_chunk=config.train.loss_chunk, vocab_chunk=config.rl.batch.vocab_chunk,
                  attn_chunk=config.model.attn_chunk, attn_impl=config.model.attn_impl,
                  attn_max_segments=config.model.attn_max_segments)
        loss = loss_config(config, engine)
        if config.rl.batch.micro_batch_rows:  # fixed-shape micro-batches: compiled once, whatever a step's row count
            fn = micro_batched_grpo_step(model_cfg, self.tx, self.schedule, loss, self.shardings, self.batch_sharding,
                                         ref_shardings, micro_batch_rows=self.micro, put=self.put, **kw)
            return fn, fn.compiles
        jitted = jit_grpo_step(make_grpo_step(model_cfg, self.tx, self.schedule, loss,
                                              grad_accum=config.optim.grad_accum, **kw),
                               self.shardings, self.batch_sharding, ref_shardings)
        return (lambda st, b, ref: jitted(st, self.put(b), ref)), jitted._cache_size  # one per row bucket


def restore_or_init(config, learner: Learner, ckpt: Checkpointer, model_cfg, mesh):
    """-> (start step, train state, loop state, KL reference params or None)."""
    init_params = builders.initial_params(config, model_cfg, mesh, learner.p_shard)
    abstract = jax.eval_shape(lambda p: create_state(p, learner.tx, learner.shardings, config.seed),
                              learner.abstract_params)
    settings = resume.train_settings(config, config.rl.steps)
    if (listed := resume.latest_listed_step(ckpt.directory)) is not None:  # before a restore sets a step aside
        resume.check_train_resume(config.workdir, config, settings, listed)
    start, state, meta = ckpt.restore_latest(abstract_like(abstract, learner.shardings), meta=True)
    start = start or 0
    if start:
        for note in resume.check_train_resume(config.workdir, config, settings, start):
            builders.say(f"note: {note}")
        builders.say(f"resuming from step {start} of {config.rl.steps} ({ckpt.step_dir(start)})")
    else:
        state = create_state(init_params, learner.tx, learner.shardings, config.seed)
        meta = {"cursor": 0, "requeue": [], "tracker": None, "rewards": [], "episodes": 0}
    resume.record_train_settings(config.workdir, settings)
    ref = None
    if config.rl.loss.kl_coef:  # rl.loss.reference, else the initial weights (model.init_from or the seeded init), frozen
        ref = restore_params(config.rl.loss.reference, mesh=mesh)[0] if config.rl.loss.reference else init_params
    return start, state, meta, ref


def learner_step(config, step_fn, state, batch, ref_params, step: int, ckpt: Checkpointer):
    """One optimizer step on `batch` -> (state, metrics, learner tokens)."""
    if config.model.attn_impl == "cudnn":
        try:
            qwen3.check_segments(batch["segment_ids"], config.model.attn_max_segments)
        except ValueError as e:
            raise config_lib.ConfigError(f"config.{e}") from None
    state, metrics = step_fn(state, batch, ref_params)
    m = {k: float(v) for k, v in jax.device_get(metrics).items()}
    if not math.isfinite(m["loss"]):
        raise FloatingPointError(f"non-finite GRPO loss at step {step + 1}; the last good checkpoint is step "
                                 f"{ckpt.latest_step()} in {ckpt.directory}. Lower optim.lr or check the rewards.")
    return state, m, int((batch["segment_ids"] > 0).sum())


def trainable_rollouts(config, share, learner: Learner, tasks, meta, tracker, null_solvable, step: int, *, resync):
    """Step `step`'s whole groups, assembled and packed; played again on fresh groups (round numbers
    continue, so seeds never repeat) while nothing in them is trainable (every rollout failed, or
    every sample was dropped): a step is an optimizer update, an empty one is never counted,
    checkpointed or pushed. -> (batch, batch stats, every group played, metrics incl. the ledger
    records, staleness per scored trajectory)."""
    rl, groups, ledger, ages, counts, first = config.rl, [], [], [], {}, 0
    for attempt in range(rl.max_empty_rounds + 1):
        if attempt:
            share.submit(group_lib.plan_jobs(tasks, meta, target=step, round_=first, n=rl.tasks_per_step,
                                             seed=config.seed))
        got, rounds = group_lib.gather(share, tasks, meta, rl, step=step, seed=config.seed, resync=resync,
                                       first_round=first)
        first += rounds + 1
        items, records, c, a = group_lib.assemble(got, rl, tracker, step=step + 1, learner_version=step)
        groups, ledger, ages = groups + got, ledger + records, ages + a
        counts = {k: counts.get(k, 0) + v for k, v in c.items()}
        # this process packs the rows of its own groups; every process pads to the same count
        mine = [(t, adv, gi + len(groups) - len(got)) for t, adv, gi in items if share.own(got[gi].group_id)]
        agree = (lambda n: max(host_gather.allgather(f"rows_{step}_{attempt}", n))) if jax.process_count() > 1 else None
        batch, bstats = build_batch(mine, learner.batch_cfg, agree)
        if batch is not None:
            break
    else:
        raise RuntimeError(f"GRPO step {step + 1}: {rl.max_empty_rounds + 1} rounds of rollouts gave nothing to "
                           f"train ({counts}); {_why_empty(groups, counts)}; see "
                           f"{os.path.join(config.workdir, 'rollouts', 'ledger.jsonl')}")
    trajs = [t for g in groups if g.complete for t in g.trajectories]
    m = rollout_metrics.episode_metrics(trajs, null_solvable) | counts | staleness.histogram(ages)
    m |= {"refill_rounds": first - 1 - attempt, "empty_rounds": attempt, "staleness_max": max(ages, default=0),
          "episodes": len(trajs), "ledger": ledger}
    return batch, bstats, groups, m, ages


def _why_empty(groups, counts: dict) -> str:
    """The likeliest cause of a step with nothing to train, from what its rounds played."""
    done = [g for g in groups if g.complete]
    if done and counts.get("groups_zero_variance", 0) == len(done):
        ok = [t.success for g in done for t in g.trajectories]
        if not any(ok):
            return ("every group was zero-variance and no episode succeeded: the policy solves none of these tasks "
                    "(train it further first, e.g. SFT, or raise rl.samples_per_task / the rollout temperature)")
        if all(ok):
            return "every group was zero-variance and every episode succeeded: these tasks are already solved"
        return "every group was zero-variance (each all-pass or all-fail): raise rl.samples_per_task"
    if not done:
        return "no group completed: the rollouts' infra errors (an engine or user simulator down?)"
    return "rl.batch.max_len / overlong (every sample cut?) or stale samples (rl.max_staleness)"


def summed_counters(step: int, bstats, workers, queue_depth: int, learner_tokens: int) -> dict:
    """Counters of every process, summed: rows and tokens packed, episodes and tokens sampled."""
    local = {"batch_" + k: v for k, v in vars(bstats).items()} | workers.throughput()
    local |= {"queue_depth": queue_depth, "learner_tokens": learner_tokens}
    return {k: sum(p[k] for p in host_gather.allgather(f"counts_{step}", local)) for k in local}


class RolloutLog:
    """Process 0's record of every episode: `rollouts/ledger.jsonl` (trained, dropped with a reason,
    or re-queued) and `rollouts/step_N.jsonl` (full trajectories, failed attempts included)."""

    def __init__(self, workdir: str, start: int, is_main: bool, config=None):
        self.dir, self.is_main, self.config = os.path.join(workdir, "rollouts"), is_main, config
        os.makedirs(self.dir, exist_ok=True)
        self.ledger = os.path.join(self.dir, "ledger.jsonl")
        if is_main:  # lines of steps past the checkpoint go: their groups are replayed
            group_lib.truncate_ledger(self.ledger, start)

    def write(self, step: int, ledger: list[dict], groups) -> None:
        if not self.is_main:
            return
        with open(self.ledger, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in ledger)
        with open(os.path.join(self.dir, f"step_{step}.jsonl"), "w") as f:
            f.writelines(t.to_json() + "\n" for g in groups for t in [*g.trajectories, *g.failed_attempts])
        if self.config is not None:  # tau2's own files of the step: rollouts/step_N/<domain>.json
            # complete groups only (an incomplete one is re-queued and written when it is replayed);
            # a task played by several groups (refill rounds) gets trials 0..n-1, never one overwritten
            recs, trials = [], collections.Counter()
            for t in (t for g in groups if g.complete for t in g.trajectories if t.domain != "toy"):
                recs.append(t.to_dict() | {"sample_index": trials[t.domain, t.task_id]})
                trials[t.domain, t.task_id] += 1
            if recs:
                r = self.config.rl.rollout
                tau2_results.write_records(os.path.join(self.dir, f"step_{step}"), recs, config=self.config,
                                           num_trials=max(trials.values()),
                                           sampling={"temperature": r.temperature, "top_p": r.top_p, "top_k": r.top_k})


# ----------------------------------------------------------------------------- the stage

def run(config) -> dict:
    rl, is_main, t_start = config.rl, jax.process_index() == 0, time.perf_counter()
    check_processes(config)
    # --- setup: environment, mesh, the learner's pieces
    env, tokenizer, model_cfg = builders.rl_environment(config)
    null_solvable, tasks = null_solvable_tasks(config, env), env.tasks()
    mesh = builders.mesh(config)
    learner = Learner(config, model_cfg, mesh)

    # --- state: the last checkpoint, else the initial (SFT) weights
    ckpt = Checkpointer(os.path.join(config.workdir, "checkpoints"), save_every=config.train.checkpoint_every,
                        keep=config.train.keep_checkpoints, async_save=config.train.async_checkpoint)
    start, state, meta, ref_params = restore_or_init(config, learner, ckpt, model_cfg, mesh)
    tracker = adv_lib.CurriculumTracker() if rl.curriculum else None
    if tracker is not None and meta["tracker"]:
        tracker.load_state_dict(meta["tracker"])

    # --- rollouts: the engine at the state's version, workers producing whole groups (every process
    # plays its share of the groups on its own engine: `rl.process_share`)
    engine = builders.rollout_engine(config, model_cfg, state.params, tokenizer, version=start)
    step_fn, learner_compiles = learner.step_fn(config, model_cfg, engine, ref_params is not None)
    sync = PolicySync(engine, start)
    ro = rl.rollout
    sampling = SamplingParams(temperature=ro.temperature, top_p=ro.top_p, top_k=ro.top_k,
                              max_new_tokens=config.engine.max_new_tokens)
    workers = RolloutWorkers(env, engine=engine, sampling=sampling, samples=rl.samples_per_task, seed=config.seed,
                             concurrency=ro.concurrency, max_infra_retries=ro.max_infra_retries,
                             max_staleness=rl.max_staleness, version=start, lost_weights=sync.lost,
                             await_engine=sync.await_serving)
    sync.listen(workers)
    share = ProcessShare(workers)
    sync.start(state.params, start)  # a server that starts from other weights gets ours
    log, writer = RolloutLog(config.workdir, start, is_main, config), MetricWriter(config.workdir)
    hold = builders.heldout_environment(config) if rl.eval_every else None  # (env, task refs) never trained on
    bar = tqdm(total=rl.steps, initial=start, desc=builders.progress_name(config, "grpo"), disable=not is_main,
               dynamic_ncols=True)
    planned, max_seen, busy = start, 0, []
    t_prev = t_first = time.perf_counter()

    # --- loop
    try:
        with jax.set_mesh(mesh):
            for step in range(start, rl.steps):
                # prompts for this step and up to max_staleness steps ahead (the workers gate them)
                while planned < min(step + rl.max_staleness + 1, rl.steps):
                    share.submit(group_lib.plan_jobs(tasks, meta, target=planned, round_=0, n=rl.tasks_per_step,
                                                     seed=config.seed))
                    planned += 1
                queue_depth, t0 = workers.ready_groups(), time.perf_counter()
                batch, bstats, groups, m, ages = trainable_rollouts(
                    config, share, learner, tasks, meta, tracker, null_solvable, step,
                    resync=lambda: sync.resync(state.params, int(state.step)))
                m = {"rollout_wait_s": time.perf_counter() - t0} | m
                max_seen = max([max_seen, *ages])
                if step == start:
                    builders.say(f"compiling the grpo step ({model_cfg.num_layers} layers, rows of "
                                 f"{rl.batch.max_len} tokens); the first update waits for it ...")
                t1 = time.perf_counter()
                state, learned, learner_tokens = learner_step(config, step_fn, state, batch, ref_params, step, ckpt)
                m |= learned | {"learner_s": time.perf_counter() - t1}
                m |= summed_counters(step, bstats, workers, queue_depth, learner_tokens)
                m["tokens_per_s"] = m.pop("learner_tokens") / m["learner_s"]

                # --- weights: push every rl.sync.every steps (wait: the learner blocked on the previous
                # push; publish / pause: that push's, handed over while this step ran)
                if (step + 1) % rl.sync.every == 0 or step + 1 == rl.steps:
                    pushed = sync.push(state.params, step + 1)
                    m |= {f"weight_sync_{k}": v for k, v in pushed.items()}
                    if "version" in pushed:  # every process's engines serve that finished push (summed)
                        m["engines_behind"] = sum(host_gather.allgather(
                            f"served_{step}", sync.engines_behind(pushed["version"])))
                m["engine_resyncs"] = sync.resyncs
                if hold is not None and (step + 1) % rl.eval_every == 0:
                    m |= heldout_step(config, hold, engine, sync, sampling, state, model_cfg, meta, step)

                # --- records and checkpoint
                meta["rewards"].append(m["reward_mean"])
                meta["episodes"] += m["episodes"]
                meta["tracker"] = tracker.state_dict() if tracker is not None else None
                log.write(step + 1, m.pop("ledger"), groups)
                now = time.perf_counter()
                m["step_s"], t_prev = now - t_prev, now
                m["learner_busy_frac"] = m["learner_s"] / m["step_s"]
                busy.append(m["learner_busy_frac"])
                if step == start:
                    t_first = now  # steady-state timings start after the first step (compiles)
                writer.write(step + 1, m)
                bar.set_postfix(reward=f"{m['reward_mean']:.3f}", loss=f"{m['loss']:.4f}")
                bar.update(1)
                ckpt.save(step + 1, state, meta=group_lib.checkpoint_meta(meta, share.in_flight_keys()),
                          force=step + 1 == rl.steps)
        last_push = sync.wait()  # the final version served (and any error raised) before teardown
    finally:
        for close in (sync.close, workers.close, bar.close, ckpt.close, writer.close, engine.close):
            close()
    params_dir = export_params(config.workdir, state.params, model_cfg, rl.steps, builders.hf_extra_dir(config))
    return summary(config, meta, start, params_dir, max_seen, busy, t_prev - t_first, sync, last_push,
                   learner_compiles(), t_start, int(jax.device_get(state.step)))


def heldout_step(config, hold, engine, sync, sampling, state, model_cfg, meta, step: int) -> dict:
    """Held-out pass@1 on the weights of step + 1 (rl/heldout.py); a new best greedy pass@1 (ties:
    the earlier step) exports them to {workdir}/heldout_best/params, noted in meta["heldout_best"]."""
    sync.wait()  # the push of this step's weights has landed: the engine serves version step + 1
    ro = config.rl.rollout
    out = heldout.evaluate(*hold, engine=engine, sampling=sampling, seed=config.seed, step=step + 1,
                           concurrency=ro.concurrency, max_infra_retries=ro.max_infra_retries,
                           process=jax.process_index(), processes=jax.process_count())
    best = meta.get("heldout_best")
    if best is None or out["heldout_greedy_pass1"] > best["heldout_greedy_pass1"]:
        export_params(os.path.join(config.workdir, HELDOUT_BEST), state.params, model_cfg, step + 1,
                      builders.hf_extra_dir(config))
        meta["heldout_best"] = {"step": step + 1, "heldout_greedy_pass1": out["heldout_greedy_pass1"],
                                "heldout_sampled_pass1": out["heldout_sampled_pass1"]}
    return out


def summary(config, meta, start, params_dir, max_seen, busy, steady, sync, last_push, compiles, t_start,
            updates) -> dict:
    rl, hist = config.rl, meta["rewards"]
    w = min(SUMMARY_WINDOW, max(1, len(hist) // 2))
    return {
        "stage": "grpo", "env": rl.env, "steps": rl.steps, "resumed_from": start,
        "first_reward": float(np.mean(hist[:w])) if hist else None,
        "final_reward": float(np.mean(hist[-w:])) if hist else None,
        "episodes": meta["episodes"], "params": params_dir, "max_staleness": rl.max_staleness,
        "max_staleness_seen": max_seen,
        "learner_busy_frac": float(np.mean(busy[1:])) if len(busy) > 1 else None,
        "steady_s": round(steady, 3), "engine_resyncs": sync.resyncs, "last_weight_sync": last_push,
        "optimizer_updates": updates, "push_failures": sync.push_failures, "engine_outages": sync.outages,
        # learner executables compiled this run: one per power-of-two row bucket met, or with
        # rl.batch.micro_batch_rows at most three (first micro-batch, the others, the update)
        "learner_compiles": compiles,
        # rl.eval_every > 0: the best held-out greedy pass@1 {step, ..., params} (None when off)
        "heldout_best": ({**meta["heldout_best"], "params": os.path.join(os.path.abspath(config.workdir), HELDOUT_BEST,
                                                                        "params")} if meta.get("heldout_best") else None),
        "wall_s": round(time.perf_counter() - t_start, 1),
    }  # fmt: skip
