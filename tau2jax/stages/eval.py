"""Stage "eval": Pass@k / pass^k of a policy on tau2-bench, per domain and overall.

    python -m tau2jax.train --config configs/eval.py[:gold]

Every (domain, task, sample) is one episode (`env.episode.run_episode`), num_samples per
task, run `eval.concurrency` at a time by the episode collector (`rl.collector.play`). Outputs, under `<workdir>/eval/`:

- `trajectories.jsonl`: one `Trajectory` JSON per line (`Trajectory.from_json` reads it back),
  appended and flushed as each episode finishes, so a crash loses only episodes in flight.
- `infra_retries.jsonl`: one line per attempt cut by an infrastructure failure and tried again.
- `summary.json` (metrics, per-task outcomes, the do-nothing floor, episode statistics, timings,
  policy versions, the config), `summary.md` (the recipe's table: rows Pass@1 / Pass@k, columns
  Overall + domains; the floor table; then details), `pass_at_k.png` (`tau2jax.eval.report`).
- `settings.json`: what a resumed run must match (below; `tau2jax.stages.resume`).

Infrastructure failures (engine or user-simulator outage, recorded by the episode runner as
`infra_error`) are retried up to `eval.max_infra_retries` times; an episode still failing is
written with its `infra_error` and kept out of the model metrics (see `tau2jax.eval.metrics`).

Resuming: a rerun with the same workdir skips every (domain, task, sample) that has a scored
record, and runs the rest, including earlier infrastructure failures (their records are dropped
first, so the file keeps exactly one final record per episode). Settings that change what an
episode produces (`run_settings`: sampling, limits, engine and its weights, user simulator,
reward weights, data) must match the earlier run; `settings.json` holds them, and a mismatch is
a `ConfigError` naming the field and both values rather than a silently mixed report. The policy
itself is checked too: the engine's policy version (SGLang: the served `weight_version` and
`model_path`, read once at start) against the earlier run's, and every kept record's turns
against it. Which tasks and how many samples may change (a resumed run may extend the task set).

The do-nothing floor (`eval.floor`, `tau2jax.eval.floor`): which tasks tau2 passes for an agent
that only apologises, per domain (`summary["floor"]`), per task (`per_task[domain][id]
["null_agent_passes"]`), and Pass@k over the tasks it fails (`metrics_beyond_floor`).

Multi-host: process 0 runs the episodes and writes every file; the other processes return at
once (episodes are host-side work; a policy engine sharded over hosts serves process 0's
requests).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

from tau2jax import config as config_lib
from tau2jax.data.chat import ChatFormat
from tau2jax.data.sft_data import DataError, expand_files
from tau2jax.env import prompts, tau2_env
from tau2jax.env.environments import TaskRef
from tau2jax.env.episode import derive_seed
from tau2jax.eval import floor as floor_lib
from tau2jax.eval import report
from tau2jax.eval import tau2_results
from tau2jax.inference.engine import SamplingParams
from tau2jax.rl import collector
from tau2jax.stages import builders
from tau2jax.stages.resume import check_records, check_same_settings, load_settings, record_settings, run_settings, write_atomic

TRAJECTORIES = "trajectories.jsonl"
INFRA_RETRIES = "infra_retries.jsonl"


def select_tasks(config) -> list[tuple[str, object]]:
    """(domain, tau2 Task) for the configured domains and split, in split order.

    `tau2.task_ids` (comma-separated) keeps tasks with those ids in any configured domain (airline
    and retail ids overlap: pick the domain with `tau2.domains`); `eval.max_tasks_per_domain`
    then keeps the first N of each domain.
    """
    wanted = config_lib.csv(config.tau2.task_ids)
    found: set[str] = set()
    out = []
    for domain in config_lib.csv(config.tau2.domains):
        tasks = tau2_env.load_tasks(domain, config.tau2.split)
        if wanted:
            tasks = [t for t in tasks if t.id in wanted]
            found.update(t.id for t in tasks)
        if config.eval.max_tasks_per_domain:
            tasks = tasks[: config.eval.max_tasks_per_domain]
        out += [(domain, t) for t in tasks]
    missing = [t for t in wanted if t not in found]
    if missing:
        raise config_lib.ConfigError(
            f"config.tau2.task_ids: {missing} not in split {config.tau2.split!r} of {config.tau2.domains!r}"
        )
    return out


def _key(rec: dict) -> tuple[str, str, int]:
    return rec["domain"], str(rec["task_id"]), int(rec["sample_index"])


def _light(rec: dict) -> dict:
    """What the summary needs from a record (token arrays and messages stay on disk)."""
    return {
        "domain": rec["domain"],
        "task_id": str(rec["task_id"]),
        "sample_index": int(rec["sample_index"]),
        "reward": rec.get("reward"),
        "partial_reward": rec.get("partial_reward"),
        "infra_error": rec.get("infra_error"),
        "termination_reason": rec.get("termination_reason"),
        "num_steps": rec.get("num_steps", 0),
        "agent_turns": sum(t.get("kind") != "repair" for t in rec.get("turns", [])),
        "num_tool_errors": rec.get("num_tool_errors", 0),
        "num_format_errors": rec.get("num_format_errors", 0),
        "num_repairs": rec.get("num_repairs", 0),
        "timings": rec.get("timings", {}),
        "policy_versions": sorted({t["policy_version"] for t in rec.get("turns", [])} or {rec.get("policy_version")}),
    }


def load_finished(path: Path) -> dict[tuple, dict]:
    """Scored records of an earlier run, by (domain, task_id, sample_index), light form.

    Rewrites the file without infrastructure failures (they will be run again) and without a
    torn last line (a crash mid-write), so it keeps exactly one record per episode.
    """
    if not path.exists():
        return {}
    kept_lines, done, dropped = [], {}, 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                rec = json.loads(line)
                key = _key(rec)
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                dropped += 1
                continue
            if rec.get("infra_error") or key in done:
                dropped += 1
                continue
            done[key] = _light(rec)
            kept_lines.append(line if line.endswith("\n") else line + "\n")
    if dropped:
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(kept_lines), encoding="utf-8")
        os.replace(tmp, path)
    return done


def run(config) -> dict:
    index = builders.process_index()
    if index != 0:
        return {"stage": "eval", "process_index": index, "note": "process 0 runs the evaluation"}

    t_start = time.time()
    data_root = tau2_env.init_tau2(config.tau2.data_dir)
    if config.eval.from_tau2_results:  # someone else's tau2 run: the report from its files, no episodes
        return report_from_files(config, Path(config.workdir) / "eval")
    out_dir = Path(config.workdir) / "eval"
    out_dir.mkdir(parents=True, exist_ok=True)
    earlier = load_settings(out_dir)
    settings = run_settings(config, data_root)
    check_same_settings(out_dir, earlier, settings)  # before anything touches the earlier run's files

    tasks = select_tasks(config)
    # sample-major order: an interrupted run has Pass@1 for every task first
    planned = [(d, t, s) for s in range(config.eval.num_samples) for d, t in tasks]
    planned_keys = {(d, t.id, s) for d, t, s in planned}
    finished = load_finished(out_dir / TRAJECTORIES)
    pending = [(d, t, s) for d, t, s in planned if (d, t.id, s) not in finished]

    chat = ChatFormat(builders.tokenizer(config))
    style = prompts.get_style(config.tau2.prompt_style)
    engine_for = builders.engine_factory(config, chat, style) if pending else None
    # nothing to run (no engine built): the earlier run's policy is the report's
    identity = engine_for(pending[0][1]).identity() if engine_for is not None else None
    settings = record_settings(out_dir, earlier, settings, identity)
    check_records(out_dir, finished, settings.get("policy_version"))
    env = builders.tau2_environment(config, chat, tasks=[])
    sampling = SamplingParams(temperature=config.eval.temperature, top_p=config.eval.top_p, top_k=config.eval.top_k,
                              max_new_tokens=config.engine.max_new_tokens)
    episodes = [collector.Episode(TaskRef(d, t.id, t), s, engine=engine_for(t),
                                  sampling=dataclasses.replace(sampling, seed=derive_seed(config.seed, d, t.id, s)))
                for d, t, s in pending]  # seeds stable across resumes  # fmt: skip

    results_writer = tau2_results.eval_writer(config, out_dir, tasks, {k for k in finished if k in planned_keys},
                                              out_dir / TRAJECTORIES)  # fmt: skip
    new: dict[tuple, dict] = {}
    with (
        open(out_dir / TRAJECTORIES, "a", encoding="utf-8") as traj_file,
        open(out_dir / INFRA_RETRIES, "a", encoding="utf-8") as retry_file,
    ):
        for _, traj, retried in collector.play(
                env, episodes, concurrency=config.eval.concurrency, max_infra_retries=config.eval.max_infra_retries,
                progress={"desc": builders.progress_name(config, "eval"), "total": len(planned), "initial": len(planned) - len(pending)}):
            rec = traj.to_dict()
            traj_file.write(json.dumps(rec, ensure_ascii=False) + "\n")
            traj_file.flush()
            for attempt, t in enumerate(retried):
                retry_file.write(json.dumps({"domain": traj.domain, "task_id": traj.task_id,
                                             "sample_index": traj.sample_index, "attempt": attempt,
                                             "infra_error": t.infra_error}) + "\n")  # fmt: skip
            retry_file.flush()
            new[_key(rec)] = _light(rec)
            results_writer.add(rec)
    results_writer.close()  # tau2 Results files, one per domain: <out_dir>/trajectories/<domain>.json

    records = [r for key, r in {**finished, **new}.items() if key in planned_keys]
    floor = (
        floor_lib.outcomes(tasks, chat=chat, style=style, cache_dir=config.eval.floor_cache_dir)
        if config.eval.floor else None
    )  # fmt: skip
    summary = report.build_summary(
        records, tasks, k=config.eval.num_samples, domains=config_lib.csv(config.tau2.domains),
        split=config.tau2.split, config=config_lib.redacted(config), floor=floor,
        infra_retries=sum(_key(r) in planned_keys for r in _read_jsonl(out_dir / INFRA_RETRIES)),
        run_info={"wall_s": round(time.time() - t_start, 2), "episodes_run": len(pending),
                  "episodes_resumed": len(planned) - len(pending)},
    )  # fmt: skip
    tau2_results.eval_submission(config, out_dir, results_writer, records, config.tau2.split)
    write_atomic(out_dir / "summary.json", json.dumps(summary, indent=2, sort_keys=True))
    write_atomic(out_dir / "summary.md", report.render_markdown(summary))
    report.plot_pass_at_k(summary, out_dir / "pass_at_k.png")
    return report.headline(summary, out_dir)


def report_from_files(config, out_dir) -> dict:
    """The eval's report (summary.json / .md, the plot, the do-nothing floor) on tau2 Results files
    alone (`config.eval.from_tau2_results`: comma-separated paths or globs, one file per domain),
    e.g. another agent's `tau2 run`: Pass@k and pass^k over its simulations, no episode played."""
    t_start = time.time()
    out_dir = Path(out_dir)
    if load_settings(out_dir) is not None:  # a played eval's report is not ours to replace
        raise config_lib.ConfigError(f"config.workdir: {out_dir} holds an eval that played episodes; use another "
                                     "config.workdir for a report from tau2 Results files")
    try:
        paths = expand_files(config_lib.csv(config.eval.from_tau2_results))
    except DataError as e:
        raise config_lib.ConfigError(f"config.eval.from_tau2_results: {e}") from None
    records, tasks, domains, k, seen, agents = [], [], [], 0, {}, {}
    for p in paths:
        domain, dtasks, recs, info = tau2_results.records_from_results(p)
        agents[domain] = (info.agent_info.model_dump(), info.user_info.model_dump())
        if domain in seen:
            raise config_lib.ConfigError(f"config.eval.from_tau2_results: {p} and {seen[domain]} are both {domain} runs; give one Results file per domain")
        seen[domain] = p
        domains.append(domain)
        tasks += [(domain, t) for t in dtasks]
        records += recs
        per_task = {}
        for r in recs:
            per_task[r["task_id"]] = per_task.get(r["task_id"], 0) + 1
        k = max(k, max(per_task.values(), default=0))
    floor = None
    if config.eval.floor:
        chat = ChatFormat(builders.tokenizer(config))
        floor = floor_lib.outcomes(tasks, chat=chat, style=prompts.get_style(config.tau2.prompt_style),
                                   cache_dir=config.eval.floor_cache_dir)  # fmt: skip
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = report.build_summary(
        records, tasks, k=k, domains=domains, split="(from tau2 Results files)", config=config_lib.redacted(config),
        floor=floor, infra_retries=None,
        run_info={"wall_s": round(time.time() - t_start, 2), "episodes_run": 0, "episodes_resumed": 0,
                  "tau2_results": [str(p) for p in paths]},
    )  # fmt: skip
    write_atomic(out_dir / "summary.json", json.dumps(summary, indent=2, sort_keys=True))
    md = report.render_markdown(summary).split("\n", 1)
    about = "; ".join(f"{d}: agent {a['llm'] or a['implementation']}, user {u['llm'] or u['implementation']}"
                      for d, (a, u) in agents.items())  # fmt: skip
    md.insert(1, f"\nFrom tau2 Results files alone ({about}): {', '.join(str(p) for p in paths)}. No episode was "
                 "played; the settings line below is this command's config, not the files' run.\n")
    write_atomic(out_dir / "summary.md", "\n".join(md))
    report.plot_pass_at_k(summary, out_dir / "pass_at_k.png")
    return report.headline(summary, out_dir)


def _read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


