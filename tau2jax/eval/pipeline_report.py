"""The pipeline's report: Pass@1, Pass@k and pass^k per domain per policy (base, SFT, RFT, GRPO),
beside the do-nothing floor, over all tasks and over the tasks the do-nothing agent fails; as data
(`report_data`), markdown (`render_report`) and a bar plot (`plot_report`). `stages/pipeline.py`
gathers the eval summaries and writes `{workdir}/report.{json,md,png}`; with GRPO's in-loop
held-out evaluation on (`rl.eval_every`), also held-out pass@1 against step (`heldout_curve`,
`plot_heldout`: `report_heldout.png`).
"""

from __future__ import annotations

import json
import os


def heldout_curve(metrics_path: str) -> list[dict]:
    """[{"step", "greedy", "sampled"}] of a GRPO run's metrics.jsonl held-out records (a resumed run's
    later record of a step wins); [] without any."""
    by_step = {}
    if os.path.exists(metrics_path):
        with open(metrics_path) as f:
            for line in f:
                m = json.loads(line)
                if "heldout_sampled_pass1" in m:
                    by_step[m["step"]] = {"step": m["step"], "greedy": m["heldout_greedy_pass1"],
                                          "sampled": m["heldout_sampled_pass1"]}
    return [by_step[s] for s in sorted(by_step)]


def plot_heldout(curves: dict, path: str) -> None:
    """Held-out greedy (solid) and sampled (dashed) pass@1 against GRPO step, one colour per curve
    of `curves` ({label: heldout_curve(...)})."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 3.6), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for i, (label, curve) in enumerate(curves.items()):
        steps = [r["step"] for r in curve]
        ax.plot(steps, [r["greedy"] for r in curve], color=f"C{i}", marker="o", ms=3, label=f"{label} greedy")
        ax.plot(steps, [r["sampled"] for r in curve], color=f"C{i}", ls="--", label=f"{label} sampled")
    ax.set_xlabel("GRPO step")
    ax.set_ylabel("held-out pass@1")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)


def _group_row(summary: dict, group: str, key: str) -> dict:
    """Pass@1, Pass@k and pass^k of one domain (or "overall") from an eval summary's `key`
    ("metrics": all tasks, "metrics_beyond_floor": the tasks the do-nothing agent fails)."""
    k = summary["k"]
    m = summary.get(key, {}).get(group, {})
    return {"tasks": m.get("num_tasks", 0), "pass@1": m.get("pass@1"), "pass@k": m.get(f"pass@{k}"),
            "pass^k": m.get("pass^k", {}).get(str(k))}


def report_data(summaries: dict, trained_on: dict, heldout: list | None = None) -> dict:
    """summaries: {policy: its eval summary.json} in pipeline order; trained_on: per domain, what the
    policy learnt from (`stages.pipeline.trained_on`); heldout: GRPO's `heldout_curve`.
    -> {"k", "split", "groups", "trained_on", "rows": {policy: {group: {"floor", "all", "beyond_floor"}}},
    "heldout_curve"}."""
    first = next(iter(summaries.values()))
    groups = ["overall", *first["domains"]]
    rows = {policy: {g: {"floor": s.get("floor", {}).get(g), "all": _group_row(s, g, "metrics"),
                         "beyond_floor": _group_row(s, g, "metrics_beyond_floor")} for g in groups}
            for policy, s in summaries.items()}
    return {"k": first["k"], "split": first["split"], "groups": groups, "rows": rows, "trained_on": trained_on,
            "heldout_curve": heldout or []}


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
    if data.get("heldout_curve"):
        lines += ["## GRPO's held-out pass@1 by step (tasks never trained on; report_heldout.png)", "",
                  "| step | greedy | sampled |", "|---|---|---|"]
        lines += [f"| {r['step']} | {_pct(r['greedy'])} | {_pct(r['sampled'])} |" for r in data["heldout_curve"]]
        lines.append("")
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
