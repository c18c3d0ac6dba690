"""Stage "rft": rejection-sampling fine-tuning data, sampled from the current policy.

    python -m tau2jax.train --config configs/tiny_rft.py        # CPU, mock domain
    python -m tau2jax.train --config configs/qwen3_4b_rft.py    # 8×H100, SGLang

Every train task is played `rft.samples` times (`rft.temperature`, `top_p`, `top_k`) by the
configured engine (`engine.*`, as the eval) against the configured user (`user.*`), through
`rl.collector` (infrastructure failures are retried and never scored). The keep rule
(`rl.rft.select`), per task: every episode with reward >= 1.0; if there is none, the one with the best
partial reward when that is >= `rft.min_partial`; else nothing.

Outputs, under `{workdir}/rft/`:
- `kept.jsonl`: SFT token records of the kept episodes, exactly as sampled
  ({"token_ids", "loss_mask", "source": "rft", "task", "sample_index", "reward",
  "partial_reward", "kept_as", "policy_versions"}; repair turns are mask 0 already), in task
  order, then the lines of `rft.mix_files` as they are (e.g. the demos stage's gold demos).
- `ledger.jsonl`: one record per episode played, retried attempts included
  (`collector.ledger_record`): status "kept" (reason "success" | "best_partial") or "dropped"
  (reason "failed" | "not_best" | "partial_below_min" | "infra_error" | "group_incomplete").
- `kept_trajectories.jsonl`: the kept episodes' full `Trajectory` JSON (messages, turns, rewards).
- `stats.json` + `stats.md`: per domain and overall (`build_stats`), with the do-nothing floor.

Resuming: a task is finished once the ledger holds its scored group; a rerun plays only the
others (an incomplete group, one whose sample kept failing on infrastructure, is played again).
Settings that change what an episode produces must match the earlier run (`settings.json`).
Multi-host: process 0 plays and writes everything; the others return at once.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from tau2jax import config as config_lib
from tau2jax.data.chat import ChatFormat
from tau2jax.data.sft_data import expand_files, load_conversations
from tau2jax.env import tau2_env
from tau2jax.env.trajectory import Trajectory
from tau2jax.eval import floor as floor_lib
from tau2jax.inference.engine import SamplingParams
from tau2jax.rl import collector
from tau2jax.rl.rft import (KEPT, KEPT_TRAJECTORIES, LEDGER, build_stats, finished_tasks, group_records, read_jsonl,
                            render_markdown, token_record)
from tau2jax.stages import builders
from tau2jax.stages.resume import check_same_settings, load_settings, record_settings, run_settings, write_atomic

# What an rft run keeps, beside what shapes its episodes (`resume.run_settings`): a resumed run
# must not mix values.
RFT_FIELDS = ("rft.samples", "rft.min_partial")


def _append(path: Path, records: list[dict]) -> None:
    """One write per group, flushed: a crash loses at most the group being written."""
    if records:
        with open(path, "a", encoding="utf-8") as f:
            f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
            f.flush()


def write_kept(out_dir: Path, records: list[dict], order: list[str], mix_files: list[str]) -> tuple[int, int]:
    """kept.jsonl from the ledger's kept episodes (their last stored trajectory) and `mix_files`
    -> (rft records, mixed lines)."""
    kept = {(r["task"], r["sample_index"]): r["reason"] for r in records if r["status"] == "kept"}
    trajs = {(f"{t['domain']}/{t['task_id']}", t["sample_index"]): t
             for t in read_jsonl(out_dir / KEPT_TRAJECTORIES)}  # the last copy of a replayed task wins
    rank = {task: i for i, task in enumerate(order)}
    lines = []
    for key in sorted(kept, key=lambda k: (rank[k[0]], k[1])):
        lines.append(json.dumps(token_record(Trajectory.from_dict(trajs[key]), kept[key])))
    mixed = [line.rstrip("\n") for path in mix_files for line in open(path, encoding="utf-8") if line.strip()]
    write_atomic(out_dir / KEPT, "".join(line + "\n" for line in lines + mixed))
    return len(lines), len(mixed)


def play_pending(env, pending: list, engine_for, config, out_dir: Path) -> None:
    """Plays `rft.samples` episodes of each pending task; as each task's group completes, appends
    its kept trajectories, then its ledger records (so the ledger never names a kept episode that
    was not stored)."""
    r = config.rft
    sampling = SamplingParams(temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
                              max_new_tokens=config.engine.max_new_tokens)
    # Episodes start in task order, so groups finish (and are written) about one by one.
    for group in collector.groups(env, [(ref.key, ref) for ref in pending], engine_for=lambda ref: engine_for(ref.task),
                                  sampling=sampling, samples=r.samples, seed=config.seed, concurrency=r.concurrency,
                                  max_infra_retries=r.max_infra_retries, progress={"desc": builders.progress_name(config, "rft")}):
        records, kept = group_records(group, r.min_partial)
        _append(out_dir / KEPT_TRAJECTORIES, [t.to_dict() for t in kept])
        _append(out_dir / LEDGER, records)


def run(config) -> dict:
    index = builders.process_index()
    if index != 0:
        return {"stage": "rft", "process_index": index, "note": "process 0 samples and writes the RFT data"}

    if config.tau2.split != "train":
        raise config_lib.ConfigError(f"config.tau2.split: RFT samples train tasks only, got {config.tau2.split!r} "
                                     "(test tasks must not become training data)")
    t_start = time.time()
    tokenizer = builders.tokenizer(config)
    mix_files = expand_files(config_lib.csv(config.rft.mix_files))
    if results := [f for f in mix_files if f.endswith(".json")]:  # its lines are not records to copy
        raise config_lib.ConfigError(f"config.rft.mix_files: {results[0]} is a tau2 Results file, which kept.jsonl "
                                     "cannot hold line by line; list it in the next SFT's data.train_files instead")
    if mix_files:  # bad data fails now, not after hours of sampling
        load_conversations(mix_files, tokenizer.vocab_size)
    chat = ChatFormat(tokenizer)
    env = builders.tau2_environment(config, chat, split="train")
    refs = env.tasks()
    order = [r.key for r in refs]
    out_dir = Path(config.workdir) / "rft"
    out_dir.mkdir(parents=True, exist_ok=True)
    earlier = load_settings(out_dir)
    settings = run_settings(config, tau2_env.init_tau2(config.tau2.data_dir), "rft", RFT_FIELDS)
    check_same_settings(out_dir, earlier, settings, "rft")  # before anything touches the earlier run's files

    done = finished_tasks(read_jsonl(out_dir / LEDGER))
    pending = [r for r in refs if r.key not in done]
    engine_for = builders.engine_factory(config, chat, env.style) if pending else None
    identity = engine_for(pending[0].task).identity() if pending else None
    record_settings(out_dir, earlier, settings, identity, "rft")
    if pending:
        play_pending(env, pending, engine_for, config, out_dir)

    planned = set(order)
    records = [r for r in read_jsonl(out_dir / LEDGER) if r["task"] in planned]
    floor = floor_lib.outcomes([(r.domain, r.task) for r in refs], chat=chat, style=env.style,
                               cache_dir=config.eval.floor_cache_dir) if config.eval.floor else None
    stats = build_stats(records, [(r.domain, r.task_id) for r in refs], floor)
    n_kept, n_mixed = write_kept(out_dir, records, order, mix_files)
    stats["run"] = {"wall_s": round(time.time() - t_start, 2), "tasks_played": len(pending),
                    "tasks_resumed": len(refs) - len(pending), "kept_records": n_kept, "mixed_records": n_mixed,
                    "mix_files": mix_files}  # fmt: skip
    write_atomic(out_dir / "stats.json", json.dumps(stats, indent=2, sort_keys=True))
    domains = list(dict.fromkeys(r.domain for r in refs))
    write_atomic(out_dir / "stats.md", render_markdown(stats, domains, config.workdir))
    groups = ["overall", *domains]
    return {
        "stage": "rft", "file": str(out_dir / KEPT), "kept": n_kept, "mixed": n_mixed,
        "success_rate": {g: stats[g]["success_rate"] for g in groups},
        "kept_by_domain": {g: stats[g]["kept"] for g in groups},
        "tasks_unfinished": stats["overall"]["tasks"] - stats["overall"]["tasks_finished"],
        "wall_s": stats["run"]["wall_s"],
    }  # fmt: skip
