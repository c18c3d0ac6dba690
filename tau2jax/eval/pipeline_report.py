"""The pipeline's report: Pass@1, Pass@k and pass^k per domain per policy (base, SFT, RFT, GRPO),
beside the do-nothing floor, over all tasks and over the tasks the do-nothing agent fails; as data
(`report_data`), markdown (`render_report`) and a bar plot (`plot_report`). `stages/pipeline.py`
gathers the eval summaries and writes `{workdir}/report.{json,md,png}`.
"""

from __future__ import annotations


def _group_row(summary: dict, group: str, key: str) -> dict:
    """Pass@1, Pass@k and pass^k of one domain (or "overall") from an eval summary's `key`
    ("metrics": all tasks, "metrics_beyond_floor": the tasks the do-nothing agent fails)."""
    k = summary["k"]
    m = summary.get(key, {}).get(group, {})
    return {"tasks": m.get("num_tasks", 0), "pass@1": m.get("pass@1"), "pass@k": m.get(f"pass@{k}"),
            "pass^k": m.get("pass^k", {}).get(str(k))}


def report_data(summaries: dict, trained_on: dict) -> dict:
    """summaries: {policy: its eval summary.json} in pipeline order; trained_on: per domain, what the
    policy learnt from (`stages.pipeline.trained_on`).
    -> {"k", "split", "groups", "trained_on", "rows": {policy: {group: {"floor", "all", "beyond_floor"}}}}."""
    first = next(iter(summaries.values()))
    groups = ["overall", *first["domains"]]
    rows = {policy: {g: {"floor": s.get("floor", {}).get(g), "all": _group_row(s, g, "metrics"),
                         "beyond_floor": _group_row(s, g, "metrics_beyond_floor")} for g in groups}
            for policy, s in summaries.items()}
    return {"k": first["k"], "split": first["split"], "groups": groups, "rows": rows, "trained_on": trained_on}


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def _metrics(k: int) -> list[tuple[str, str]]:
    """(key, label) of the report's columns; with one sample per task the three would agree."""
    return [("pass@1", "Pass@1")] + ([("pass@k", f"Pass@{k}"), ("pass^k", f"pass^{k}")] if k > 1 else [])


def render_report(data: dict) -> str:
    k, groups = data["k"], data["groups"]
    metrics = _metrics(k)
    lines = ["# tau2jax pipeline: base → SFT → RFT → GRPO", ""]
    for domain, t in data["trained_on"].items():
        note = (f"{domain}: evaluated on {t['evaluated']} tasks ({data['split']} split); trained on {t['trained']} "
                f"train-split tasks; {t['overlap']} of the evaluated tasks were trained on")
        if not t["has_split"]:
            note += " (the domain has no train/test split: these numbers measure fitting, not generalisation)"
        if t.get("trained_ids") and t["trained"] <= 20:
            note += f"; trained on: {', '.join(t['trained_ids'])}"
        lines.append(f"- {note}.")
    for title, key in (("Tasks the do-nothing agent fails (what shows learning)", "beyond_floor"),
                       ("All tasks", "all")):
        head = ["policy"] + [f"{g} {label}" for g in groups for _, label in metrics]
        lines += ["", f"## {title}", "", "| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
        for policy, row in data["rows"].items():
            cells = [_pct(row[g][key][m]) for g in groups for m, _ in metrics]
            lines.append(f"| {policy} | " + " | ".join(cells) + " |")
    floor = next(iter(data["rows"].values()))
    lines += ["", "Do-nothing floor (tasks tau2 passes for an agent that only apologises): "
              + ", ".join(f"{g} {_pct((floor[g]['floor'] or {}).get('pass_rate'))} of {(floor[g]['floor'] or {}).get('tasks', 0)}"
                          for g in groups) + ".",
              f"Pass@1: the first of {k} samples succeeds; Pass@{k}: any does; pass^{k}: all do (tau2's estimator)."
              if k > 1 else "One sample per task: Pass@1 = Pass@k = pass^k.", ""]
    return "\n".join(lines)


def plot_report(data: dict, path: str) -> None:
    """Pass@1 / Pass@k / pass^k per policy on the tasks the do-nothing agent fails, one panel per group."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # matplotlib (heavy): only plotting needs it
    from matplotlib.figure import Figure

    groups, policies, k = data["groups"], list(data["rows"]), data["k"]
    fig = Figure(figsize=(3.2 * len(groups) + 1, 3.6), dpi=100)
    FigureCanvasAgg(fig)
    for i, g in enumerate(groups):
        ax = fig.add_subplot(1, len(groups), i + 1)
        metrics = _metrics(k)
        width = 0.8 / len(metrics)
        for j, (m, label) in enumerate(metrics):
            vals = [100 * (data["rows"][p][g]["beyond_floor"][m] or 0.0) for p in policies]
            ax.bar([x + width * (j - (len(metrics) - 1) / 2) for x in range(len(policies))], vals, width=width,
                   label=label)
        ax.set_xticks(range(len(policies)), policies)
        ax.set_ylim(0, 102)
        n = data["rows"][policies[0]][g]["beyond_floor"]["tasks"]
        ax.set_title(f"{g}: {n} tasks the do-nothing agent fails", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    fig.axes[0].set_ylabel("%")
    fig.axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
