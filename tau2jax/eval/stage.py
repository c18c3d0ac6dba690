"""Stage "eval": Pass@k / pass^k of a policy on tau2-bench, per domain and overall.

    python -m tau2jax.train --config configs/eval.py[:gold]

Every (domain, task, sample) is one episode (`env.episode.run_episode`), num_samples per
task, run `eval.concurrency` at a time on a thread pool. Outputs, under `<workdir>/eval/`:

- `trajectories.jsonl`: one `Trajectory` JSON per line (`Trajectory.from_json` reads it back),
  appended and flushed as each episode finishes, so a crash loses only episodes in flight.
- `infra_retries.jsonl`: one line per attempt cut by an infrastructure failure and tried again.
- `summary.json` (metrics, per-task outcomes, the do-nothing floor, episode statistics, timings,
  policy versions, the config), `summary.md` (the recipe's table: rows Pass@1 / Pass@k, columns
  Overall + domains; the floor table; then details), `pass_at_k.png`.
- `settings.json`: what a resumed run must match (below).

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

import importlib
import json
import os
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from tau2jax import config as config_lib
from tau2jax.eval import floor as floor_lib
from tau2jax.env.environments import retry_infra, user_factory
from tau2jax.eval import metrics

TRAJECTORIES = "trajectories.jsonl"
INFRA_RETRIES = "infra_retries.jsonl"
SETTINGS = "settings.json"

# Config fields that change what an episode produces: a resumed run must not mix values (plus the
# sampling section's temperature/top_p/top_k and every reward.* field: `run_settings`).
RESULT_FIELDS = (
    "seed", "tau2.split", "tau2.prompt_style", "tau2.max_steps", "tau2.max_errors", "tau2.max_repairs",
    "tokenizer.path", "model.hf_dir",  # the tokenizer (model.hf_dir when tokenizer.path is "")
    "engine.kind", "engine.max_new_tokens",
    "user.kind",
)  # fmt: skip
# ... and those that matter for one engine or user kind only (the served weights: Engine.identity).
ENGINE_FIELDS = {"builtin": ("engine.checkpoint", "engine.max_seq_len", "engine.dtype"),
                 "sglang": ("engine.url",), "gold": ()}  # fmt: skip
USER_FIELDS = {"llm": ("user.model", "user.base_url", "user.temperature"), "scripted": ()}

# Engines shared by all episodes: engine.kind -> "module:function(config) -> Engine" (thread-safe).
SHARED_ENGINES = {
    "builtin": "tau2jax.inference.jax_engine:from_config",
    "sglang": "tau2jax.inference.sglang_client:from_config",
}


class EngineUnavailable(RuntimeError):
    """engine.kind names an engine whose module is not in this build."""


def engine_factory(config, chat, style):
    """-> `engine_for(task) -> Engine`. Gold engines are per task (they play that task's script);
    the others are one engine shared by every episode."""
    kind = config.engine.kind
    if kind == "gold":
        from tau2jax.env.gold import GoldEngine

        return lambda task: GoldEngine(task, style, chat)
    if kind not in SHARED_ENGINES:
        raise EngineUnavailable(f"engine.kind={kind!r}: unknown engine; known: gold, {', '.join(SHARED_ENGINES)}")
    module_name, fn_name = SHARED_ENGINES[kind].split(":")
    fn = getattr(importlib.import_module(module_name), fn_name)
    engine = fn(config)
    return lambda task: engine


def select_tasks(config) -> list[tuple[str, object]]:
    """(domain, tau2 Task) for the configured domains and split, in split order.

    `tau2.task_ids` (comma-separated) keeps tasks with those ids in any configured domain (airline
    and retail ids overlap: pick the domain with `tau2.domains`); `eval.max_tasks_per_domain`
    then keeps the first N of each domain.
    """
    from tau2jax.env import tau2_env

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


def run_settings(config, data_root, sampling: str = "eval", extra: tuple = ()) -> dict:
    """The config values that decide what an episode produces (plus the tau2 data in use); `sampling`
    names the section holding temperature/top_p/top_k (eval, rft); `extra`: the stage's own fields."""
    fields = (RESULT_FIELDS + tuple(f"{sampling}.{k}" for k in ("temperature", "top_p", "top_k"))
              + tuple(f"reward.{k}" for k in config.reward) + tuple(extra)
              + ENGINE_FIELDS.get(config.engine.kind, ()) + USER_FIELDS.get(config.user.kind, ()))
    out = {f: _cfg_get(config, f) for f in fields} | {"tau2.data_root": str(data_root)}
    if config.engine.kind == "builtin":  # "auto" is another dtype on another platform
        from tau2jax.inference.jax_engine import engine_dtype

        out["engine.dtype"] = engine_dtype(config.engine.dtype).name
    return out


def load_settings(out_dir: Path) -> dict | None:
    """The settings an earlier run in out_dir recorded, or None."""
    path = out_dir / SETTINGS
    return json.loads(path.read_text()) if path.exists() else None


def check_same_settings(out_dir: Path, earlier: dict | None, current: dict, stage: str = "eval") -> None:
    """Refuses, naming each field, to resume a run recorded with other settings (a field the
    earlier run did not record counts as changed). Shared by the eval and rft stages."""
    if earlier is None:
        return
    diff = {f: (earlier.get(f), v) for f, v in current.items() if earlier.get(f) != v}
    if diff:
        lines = ", ".join(f"{f}: {a!r} -> {b!r}" for f, (a, b) in diff.items())
        raise config_lib.ConfigError(
            f"workdir {str(out_dir)!r} holds an {stage} run with other settings ({lines}); "
            "use a new config.workdir, or the earlier values to resume"
        )


def record_settings(out_dir: Path, earlier: dict | None, settings: dict, identity: dict | None,
                    stage: str = "eval") -> dict:
    """Adds the engine's identity (None when no episode runs, so no engine was built: the earlier
    run's fields stand), checks it against the earlier run, writes settings.json. -> the settings."""
    if identity is not None:
        settings = settings | identity
        check_same_settings(out_dir, earlier, settings, stage)
    else:
        settings = settings | {k: v for k, v in (earlier or {}).items() if k not in settings}
    write_atomic(out_dir / SETTINGS, json.dumps(settings, indent=2, sort_keys=True))
    return settings


def check_records(out_dir: Path, finished: dict[tuple, dict], policy_version) -> None:
    """Every kept record must come from the run's policy version (else the report mixes policies)."""
    for key, rec in sorted(finished.items()):
        other = [v for v in rec["policy_versions"] if v != policy_version]
        if other:
            raise config_lib.ConfigError(
                f"workdir {str(out_dir)!r}: the record of {key} has policy_version {other[0]!r}, this run's "
                f"engine serves {policy_version!r}; use a new config.workdir (one report, one policy)"
            )


def _cfg_get(config, dotted: str):
    section, _, key = dotted.rpartition(".")
    return (config[section] if section else config)[key]


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def process_index() -> int:
    import jax  # lazily: stages that never touch a device should not pay for it

    return jax.process_index()


def run(config) -> dict:
    index = process_index()
    if index != 0:
        return {"stage": "eval", "process_index": index, "note": "process 0 runs the evaluation"}

    from tqdm import tqdm

    from tau2jax.data.chat import ChatFormat
    from tau2jax.data.tokenizer import load_tokenizer
    from tau2jax.env import prompts, rewards, tau2_env
    from tau2jax.inference.engine import SamplingParams
    from tau2jax.env.episode import derive_seed, run_episode

    t_start = time.time()
    data_root = tau2_env.init_tau2(config.tau2.data_dir)
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

    chat = ChatFormat(load_tokenizer(config.tokenizer.path or config.model.hf_dir))
    style = prompts.get_style(config.tau2.prompt_style)
    engine_for = engine_factory(config, chat, style) if pending else None
    # nothing to run (no engine built): the earlier run's policy is the report's
    identity = engine_for(pending[0][1]).identity() if engine_for is not None else None
    settings = record_settings(out_dir, earlier, settings, identity)
    check_records(out_dir, finished, settings.get("policy_version"))
    user_for = user_factory(config.user)
    reward_config = rewards.RewardConfig.from_config(config.reward)

    def play(domain, task, sample_index):
        """One (task, sample): rerun while it ends in an infrastructure failure, up to the limit.
        -> (final trajectory, infra errors of the attempts that were retried)."""
        sampling = SamplingParams(
            temperature=config.eval.temperature,
            top_p=config.eval.top_p,
            top_k=config.eval.top_k,
            max_new_tokens=config.engine.max_new_tokens,
            seed=derive_seed(config.seed, domain, task.id, sample_index)  # stable across resumes
        )
        traj, failed = retry_infra(lambda: run_episode(
            task, domain,
            engine=engine_for(task), user=user_for(task, domain), chat=chat, style=style,
            sampling=sampling, max_steps=config.tau2.max_steps, max_errors=config.tau2.max_errors,
            max_repairs=config.tau2.max_repairs, reward_config=reward_config, sample_index=sample_index,
        ), config.eval.max_infra_retries)  # fmt: skip
        return traj, [t.infra_error for t in failed]

    new: dict[tuple, dict] = {}
    pool = ThreadPoolExecutor(max_workers=config.eval.concurrency, thread_name_prefix="eval")
    try:
        with (
            open(out_dir / TRAJECTORIES, "a", encoding="utf-8") as traj_file,
            open(out_dir / INFRA_RETRIES, "a", encoding="utf-8") as retry_file,
            tqdm(total=len(planned), initial=len(planned) - len(pending), desc="eval", unit="ep") as bar,
        ):
            futures = [pool.submit(play, *job) for job in pending]
            ok = infra = 0
            for fut in as_completed(futures):
                traj, retried = fut.result()  # the runner turns outages into records: an exception is a bug
                rec = traj.to_dict()
                traj_file.write(json.dumps(rec, ensure_ascii=False) + "\n")
                traj_file.flush()
                for attempt, err in enumerate(retried):
                    retry_file.write(json.dumps({"domain": traj.domain, "task_id": traj.task_id,
                                                 "sample_index": traj.sample_index, "attempt": attempt,
                                                 "infra_error": err}) + "\n")  # fmt: skip
                retry_file.flush()
                new[_key(rec)] = _light(rec)
                ok += metrics.is_success(traj.reward) and traj.infra_error is None
                infra += traj.infra_error is not None
                bar.update()
                bar.set_postfix(success=ok, infra_failed=infra)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)

    records = [r for key, r in {**finished, **new}.items() if key in planned_keys]
    floor = (
        floor_lib.outcomes(tasks, chat=chat, style=style, cache_dir=config.eval.floor_cache_dir)
        if config.eval.floor else None
    )  # fmt: skip
    summary = build_summary(
        records, config, tasks, floor=floor,
        infra_retries=sum(_key(r) in planned_keys for r in _read_jsonl(out_dir / INFRA_RETRIES)),
        run_info={"wall_s": round(time.time() - t_start, 2), "episodes_run": len(pending),
                  "episodes_resumed": len(planned) - len(pending)},
    )  # fmt: skip
    write_atomic(out_dir / "summary.json", json.dumps(summary, indent=2, sort_keys=True))
    write_atomic(out_dir / "summary.md", render_markdown(summary))
    plot_pass_at_k(summary, out_dir / "pass_at_k.png")
    return _cli_result(summary, out_dir)


def _read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _mean(xs) -> float | None:
    xs = [x for x in xs if x is not None]
    return round(sum(xs) / len(xs), 4) if xs else None


def episode_stats(records: list[dict]) -> dict:
    """Counts and means over a group of final records (model statistics over scored ones only)."""
    valid = [r for r in records if not r["infra_error"]]
    timing_keys = sorted({k for r in valid for k in r["timings"]})
    return {
        "episodes": len(records),
        "scored_episodes": len(valid),
        "infra_failures": len(records) - len(valid),
        "success_rate": _mean([float(metrics.is_success(r["reward"])) for r in valid]),
        "mean_reward": _mean([r["reward"] for r in valid]),
        "mean_partial_reward": _mean([r["partial_reward"] for r in valid]),
        "mean_steps": _mean([r["num_steps"] for r in valid]),
        "mean_agent_turns": _mean([r["agent_turns"] for r in valid]),
        "tool_call_errors": sum(r["num_tool_errors"] for r in valid),
        "format_errors": sum(r["num_format_errors"] for r in valid),
        "repairs": sum(r["num_repairs"] for r in valid),
        "termination_reasons": dict(Counter(r["termination_reason"] for r in records)),
        "mean_timings_s": {k: _mean([r["timings"].get(k) for r in valid]) for k in timing_keys},
    }


def build_summary(records: list[dict], config, tasks, *, infra_retries: int | None, run_info: dict,
                  floor: dict[tuple, bool] | None = None) -> dict:
    """floor: {(domain, task_id): the null agent passes it} (`floor_lib.outcomes`), or None."""
    k = config.eval.num_samples
    domains = config_lib.csv(config.tau2.domains)
    by_domain = defaultdict(list)
    for r in records:
        by_domain[r["domain"]].append(r)
    per_task = metrics.per_task(records)
    summary = {
        "k": k,
        "domains": domains,
        "split": config.tau2.split,
        "num_tasks": {d: sum(1 for dd, _ in tasks if dd == d) for d in domains},
        "metrics": metrics.compute(records, k),
        "episodes": {"overall": episode_stats(records)} | {d: episode_stats(by_domain[d]) for d in domains},
        "policy_versions": sorted({v for r in records for v in r["policy_versions"]}, key=str),
        "per_task": per_task,
        "infra_retries": infra_retries,
        "run": run_info,
        "config": config_lib.redacted(config),
    }
    if floor is not None:
        for (domain, task_id), passes in floor.items():
            if task_id in per_task.get(domain, {}):
                per_task[domain][task_id]["null_agent_passes"] = passes
        summary["floor"] = floor_lib.summarize(floor, domains)
        # what shows learning: Pass@k over the tasks an agent that does nothing fails
        summary["metrics_beyond_floor"] = metrics.compute(
            [r for r in records if not floor.get((r["domain"], r["task_id"]), False)], k)
    return summary


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def render_markdown(summary: dict) -> str:
    k, domains, m, ep = summary["k"], summary["domains"], summary["metrics"], summary["episodes"]
    cols = ["overall", *domains]
    cfg = summary["config"]

    def row(label, fn):
        return f"| {label} | " + " | ".join(fn(c) for c in cols) + " |"

    def metric(c, key):
        return _pct(m.get(c, {}).get(key))

    def est(c, name, kk):
        return _pct(m.get(c, {}).get(name, {}).get(kk))

    head = ["| | " + " | ".join(c.capitalize() for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    lines = [
        f"# tau2 eval: {cfg['workdir']}",
        "",
        f"Split `{summary['split']}`, {k} samples per task, T={cfg['eval']['temperature']}, "
        f"top_p={cfg['eval']['top_p']}, top_k={cfg['eval']['top_k']}, max_steps={cfg['tau2']['max_steps']}, "
        f"engine `{cfg['engine']['kind']}`, user `{cfg['user']['kind']}`"
        + (f" ({cfg['user']['model']}, T={cfg['user']['temperature']})" if cfg["user"]["kind"] == "llm" else "")
        + f", prompt style `{cfg['tau2']['prompt_style']}`.",
        "",
        *head,
        row("Pass@1", lambda c: metric(c, "pass@1")),
    ]
    if k > 1:
        lines.append(row(f"Pass@{k}", lambda c: metric(c, f"pass@{k}")))
    lines += [
        "",
        "Success = tau2 reward ≥ 1. Pass@1: the first attempt; "
        f"Pass@{k}: any of the {k} attempts; averaged over tasks (overall pools all tasks). "
        "Infrastructure failures are excluded from these numbers (counts below).",
        "",
        *_floor_lines(summary),
        "## Estimators (unbiased pass@k, tau2 pass^k)",
        "",
        *head,
        *[row(f"pass@{kk}", lambda c, kk=kk: est(c, "pass@k_unbiased", kk)) for kk in range(1, k + 1)],
        *[row(f"pass^{kk}", lambda c, kk=kk: est(c, "pass^k", kk)) for kk in range(1, k + 1)],
        "",
        "## Episodes",
        "",
        *head,
        row("tasks scored", lambda c: str(m.get(c, {}).get("num_tasks", 0))),
        row("episodes (scored)", lambda c: f"{ep[c]['episodes']} ({ep[c]['scored_episodes']})"),
        row("infrastructure failures", lambda c: str(ep[c]["infra_failures"])),
        row("mean reward", lambda c: _num(ep[c]["mean_reward"])),
        row("mean agent turns", lambda c: _num(ep[c]["mean_agent_turns"])),
        row("tool-call errors", lambda c: str(ep[c]["tool_call_errors"])),
        row("format repairs", lambda c: str(ep[c]["repairs"])),
        row("mean episode time (s)", lambda c: _num(ep[c]["mean_timings_s"].get("total"))),
        "",
        f"Attempts retried after an infrastructure failure: {summary['infra_retries']}. "
        f"Run: {summary['run']['episodes_run']} episodes in {summary['run']['wall_s']} s, "
        f"{summary['run']['episodes_resumed']} resumed from an earlier run.",
        "",
    ]
    return "\n".join(lines)


def _floor_lines(summary: dict) -> list[str]:
    """The do-nothing floor beside Pass@1 / Pass@k, per domain, and Pass@k over the tasks it fails."""
    if "floor" not in summary:
        return []
    k, m, beyond, fl = summary["k"], summary["metrics"], summary["metrics_beyond_floor"], summary["floor"]
    passk = [f"Pass@{k}"] if k > 1 else []
    head = ["Tasks", "Do-nothing floor", "Pass@1", *passk, "Tasks it fails", "Pass@1 on those",
            *[f"{p} on those" for p in passk]]  # fmt: skip

    def row(name):
        f, g, b = fl.get(name, {}), m.get(name, {}), beyond.get(name, {})
        cells = [str(f.get("tasks", 0)), f"{_pct(f.get('pass_rate'))} ({f.get('passed', 0)})", _pct(g.get("pass@1")),
                 *[_pct(g.get(p.lower())) for p in passk], str(f.get("tasks", 0) - f.get("passed", 0)),
                 _pct(b.get("pass@1")), *[_pct(b.get(p.lower())) for p in passk]]  # fmt: skip
        return f"| {name.capitalize()} | " + " | ".join(cells) + " |"

    return [
        "## Against the do-nothing floor",
        "",
        "| | " + " | ".join(head) + " |",
        "|---" * (len(head) + 1) + "|",
        *[row(name) for name in ["overall", *summary["domains"]]],
        "",
        "Do-nothing floor: the tasks tau2 passes for an agent that only says \"I'm sorry, I can't help with "
        "that.\" (scripted user, tau2's evaluator). Learning shows on the tasks it fails.",
        "",
    ]


def _num(x) -> str:
    return "–" if x is None else f"{x:.2f}"


def plot_pass_at_k(summary: dict, path: Path) -> None:
    """Unbiased pass@k (solid) and pass^k (dashed) against k, one colour per domain."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.2), dpi=100)
    FigureCanvasAgg(fig)  # no pyplot: no global backend state, safe in any thread or process
    ax = fig.add_subplot()
    for name in ["overall", *summary["domains"]]:
        m = summary["metrics"].get(name)
        if not m or not m["pass@k_unbiased"]:
            continue
        ks = sorted(m["pass@k_unbiased"])
        (line,) = ax.plot(ks, [100 * m["pass@k_unbiased"][kk] for kk in ks], marker="o", label=f"{name} pass@k")
        ax.plot(ks, [100 * m["pass^k"][kk] for kk in ks], ls="--", marker="x", color=line.get_color(),
                label=f"{name} pass^k")  # fmt: skip
    ax.set_xlabel("k (samples)")
    ax.set_ylabel("%")
    ax.set_ylim(0, 102)  # headroom: a 100% line stays visible
    ax.set_xticks(range(1, summary["k"] + 1))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    ax.set_title(f"tau2 {summary['split']}: pass@k (solid) and pass^k (dashed)")
    fig.tight_layout()
    fig.savefig(path)


def _cli_result(summary: dict, out_dir: Path) -> dict:
    """The CLI's last JSON line: headline numbers and where the reports are."""
    k, m = summary["k"], summary["metrics"]
    return {
        "stage": "eval",
        "out_dir": str(out_dir),
        "k": k,
        "pass@1": {name: g["pass@1"] for name, g in m.items()},
        f"pass@{k}": {name: g[f"pass@{k}"] for name, g in m.items()},
        "floor": {name: f["pass_rate"] for name, f in summary.get("floor", {}).items()},
        "episodes": summary["episodes"]["overall"]["episodes"],
        "infra_failures": summary["episodes"]["overall"]["infra_failures"],
        "infra_retries": summary["infra_retries"],
        "wall_s": summary["run"]["wall_s"],
    }

