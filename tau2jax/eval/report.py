"""An evaluation's summary and reports: `summary.json`'s content (`build_summary`), the recipe's
markdown table (`render_markdown`: rows Pass@1 / Pass@k, columns Overall + domains; the floor
table; then details), the pass@k plot (`plot_pass_at_k`) and the CLI's headline numbers.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path

from tau2jax.eval import floor as floor_lib
from tau2jax.eval import metrics


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


def build_summary(records: list[dict], tasks, *, k: int, domains: list[str], split: str, config: dict,
                  infra_retries: int | None, run_info: dict, floor: dict[tuple, bool] | None = None) -> dict:
    """records: light records (one per episode); tasks: the (domain, task) evaluated; `config`: the
    run's config as a (redacted) dict, kept in the summary. floor: {(domain, task_id): the null agent
    passes it} (`floor_lib.outcomes`), or None."""
    by_domain = defaultdict(list)
    for r in records:
        by_domain[r["domain"]].append(r)
    per_task = metrics.per_task(records)
    summary = {
        "k": k,
        "domains": domains,
        "split": split,
        "num_tasks": {d: sum(1 for dd, _ in tasks if dd == d) for d in domains},
        "metrics": metrics.compute(records, k),
        "episodes": {"overall": episode_stats(records)} | {d: episode_stats(by_domain[d]) for d in domains},
        "policy_versions": sorted({v for r in records for v in r["policy_versions"]}, key=str),
        "per_task": per_task,
        "infra_retries": infra_retries,
        "run": run_info,
        "config": config,
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
        *[f"{d.capitalize()}'s {split} split inside these tasks: floor {f['passed']}/{f['tasks']}."
          for d in summary["domains"] for split, f in fl.get(d, {}).get("by_split", {}).items()],
        "",
    ]


def _num(x) -> str:
    return "–" if x is None else f"{x:.2f}"


def plot_pass_at_k(summary: dict, path: Path) -> None:
    """Unbiased pass@k (solid) and pass^k (dashed) against k, one colour per domain."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # matplotlib (heavy): only plotting needs it
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


def headline(summary: dict, out_dir: Path) -> dict:
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
