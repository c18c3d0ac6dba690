"""Stage `pipeline`: the recipe end to end, each step's output the next one's input.

    python -m tau2jax.train --config configs/tiny_pipeline.py       # CPU, tau2 mock (make demo)
    python -m tau2jax.train --config configs/qwen3_4b_pipeline.py   # one 8×H100 node with SGLang

Steps, in order, each in its own `{workdir}/{step}/`:

    demos      gold demonstrations of the train tasks                    -> SFT JSONL
    eval_base  eval of model.init_from (the untrained policy)
    sft        SFT from model.init_from on the demos                     -> params
    eval_sft
    rft        samples of the SFT policy; successes kept (+ the demos)   -> rft/kept.jsonl
    sft_rft    SFT from the SFT params on kept.jsonl                     -> params
    eval_rft
    grpo       GRPO from the RFT params (also its KL reference)          -> params
    eval_grpo

then `{workdir}/report.{md,json,png}`: Pass@1, Pass@k and pass^k per domain per step, beside the
do-nothing floor, over all tasks and over the tasks the do-nothing agent fails.

Config: every step starts from the pipeline's whole config; `pipeline.<kind>` (same keys as the
config itself) overrides it for that kind of step (`pipeline.eval` for all four evals, so they
compare), then the pipeline wires the step to its inputs (`step_config`).

Resume: a step is finished once its `pipeline_step.json` (its config and result) is written; a rerun
reuses it without running it, and refuses (ConfigError naming the fields) if the config it derives
for that step now differs. An unfinished step runs again and resumes by its own rules (SFT and
GRPO checkpoints, eval and RFT records).

Engines: the built-in engine loads each step's params from disk (`engine.checkpoint`). Against
policy servers (SGLang: `builders.policy_servers`) the server is re-pointed before an eval or RFT
step that reads other params than the server was last given in this run: they are published
(`inference.weight_sync`, under `{workdir}/served/`) and loaded with `update_weights_from_disk`, as the version of the step
that produced them (0: the start weights), so the same weights always carry the same version and
a resumed eval or RFT step sees the version it recorded. GRPO pushes its own weights every step.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import jax

from tau2jax import config as config_lib
from tau2jax.env import tau2_env
from tau2jax.eval import pipeline_report
from tau2jax.inference import weight_sync
from tau2jax.parallel import host_gather
from tau2jax.stages import builders, runner
from tau2jax.stages.pipeline_steps import (  # noqa: F401  (DEMOS_ENGINE, apply_overrides: pipeline.* names too)
    DEMOS_ENGINE, EVALS, STEPS, apply_overrides, step_config)
from tau2jax.stages.resume import write_atomic
from tau2jax.weights.hf_read import HF_EXTRA_DIR
from tau2jax.weights.orbax_params import restore_params

DONE = "pipeline_step.json"
# Stages process 0 runs alone in a multi-process run (no collective in them); the learner stages
# (sft, grpo) run on every process.
MAIN_ONLY = ("demos", "eval", "rft")
PIPELINE_WAIT_S = 7 * 24 * 3600  # the other processes wait this long for process 0's eval / RFT
# The config sections a stage reads: a finished step is refused only when one of these changed (a
# GRPO setting changed after SFT finished is GRPO's business, not SFT's).
SECTIONS = {
    "demos": ("seed", "tokenizer", "model", "tau2", "user", "engine", "reward"),
    "sft": ("seed", "tokenizer", "model", "mesh", "data", "optim", "train"),
    "eval": ("seed", "tokenizer", "model", "tau2", "user", "engine", "reward", "eval"),
    "rft": ("seed", "tokenizer", "model", "tau2", "user", "engine", "reward", "eval", "rft"),
    "grpo": ("seed", "tokenizer", "model", "mesh", "tau2", "user", "engine", "reward", "optim", "train", "rl"),
}


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out |= _flatten(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out


# How the servers are reached, not what they compute: a requeued SLURM job gets other hosts, ports
# and a fresh API key (slurm_rl.sbatch, rehearse.sh), and its finished steps still count.
REACH_FIELDS = ("user.base_url", "user.api_key", "user.timeout_s", "user.max_retries", "user.retry_backoff_s",
                "engine.url", "engine.api_key", "engine.timeout_s", "engine.max_retries")


def _relevant(config_dict: dict, stage: str) -> dict:
    """The dotted fields of the sections `stage` reads, but how its servers are reached."""
    return {k: v for k, v in _flatten(config_dict).items()
            if k.split(".")[0] in SECTIONS[stage] and k not in REACH_FIELDS}


def finished(step_dir: str, config) -> dict | None:
    """The result of a finished step, or None; a finished step with other settings is refused."""
    path = os.path.join(step_dir, DONE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        done = json.load(f)
    # JSON round trip: tuples become lists, as in the stored copy
    before = _relevant(done["config"], config.stage)
    now = _relevant(json.loads(json.dumps(config.to_dict())), config.stage)
    diff = {k: (before.get(k), now.get(k)) for k in sorted(before.keys() | now.keys()) if before.get(k) != now.get(k)}
    if diff:
        lines = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
        raise config_lib.ConfigError(
            f"pipeline step {os.path.basename(step_dir)!r} finished in {step_dir!r} with other settings ({lines}); "
            f"use a new config.workdir, or delete {step_dir!r} to run that step (and the ones after it) again")
    return done["result"]


def _mark_finished(step_dir: str, config, result: dict) -> None:
    write_atomic(Path(step_dir) / DONE,
                 json.dumps({"config": config_lib.redacted(config), "result": result}, indent=2, sort_keys=True, default=str))


def serve(config, params_dir: str, version: int) -> None:
    """Re-point the SGLang policy server at `params_dir` as `version` (publish, then load from disk)."""
    root = os.path.join(os.path.dirname(config.workdir), "served")
    params, model_cfg = restore_params(params_dir)
    extra = os.path.join(params_dir, HF_EXTRA_DIR)
    # every process (publish ends in a barrier); process 0 writes, and alone re-points the server
    weight_sync.publish(params, model_cfg, root, version, extra_dir=extra if os.path.isdir(extra) else None)
    if jax.process_index():
        return
    engine = builders.sglang_engine(config)
    try:
        weight_sync.sync_engine(engine, root, version)
    finally:
        engine.close()


def served_version(params_dir: str, inputs: dict) -> int:
    """The weight version params are served as: the index of the step that produced them, 0 for
    the start weights."""
    producer = next((s for s, p in inputs["params"].items() if p == params_dir), None)
    return 0 if producer is None else [s for s, _, _ in STEPS].index(producer)


def collect_inputs(step: str, result: dict, inputs: dict) -> None:
    """Record what `step` produced for the steps after it."""
    stage = next(st for s, st, _ in STEPS if s == step)
    if stage == "demos":
        inputs["demo_files"] = [v["file"] for v in result.values() if isinstance(v, dict) and v.get("file")]
    elif stage in ("sft", "grpo"):
        inputs["params"][step] = result["params"]
    elif stage == "rft":
        inputs["rft_file"] = result["file"]
    elif stage == "eval":
        inputs["evals"][step] = os.path.join(result["out_dir"], "summary.json")


def from_main(name: str, fn):
    """`fn()` as process 0 computed it, on every process (fn runs on process 0 only; a ConfigError
    it raises is raised on every process). One process: `fn()`."""
    if jax.process_count() == 1:
        return fn()
    value = None
    if jax.process_index() == 0:
        try:
            value = {"value": fn()}
        except config_lib.ConfigError as e:
            value = {"error": str(e)}
    value = host_gather.allgather(name, value, timeout=PIPELINE_WAIT_S)[0]
    if "error" in value:
        raise config_lib.ConfigError(value["error"])
    return value["value"]


def run(config, run_stage=None) -> dict:
    """Every step in order (finished ones reused), then the report. `run_stage(step_config) -> dict`
    runs one stage (default: `tau2jax.stages.runner.run_stage`; tests pass stand-ins).

    Several processes: every process walks the steps; process 0 decides which are finished, runs
    demos, evals and RFT alone (the others take its result), writes the step records and the
    report; SFT and GRPO run on every process."""
    is_main = jax.process_index() == 0
    if run_stage is None:
        run_stage = runner.run_stage
    if not config.model.init_from:
        raise config_lib.ConfigError("config.model.init_from: the pipeline starts from converted weights "
                                     "(checkpoints_tools.hf_to_orbax); eval_base evaluates them")
    t_start = time.time()
    inputs: dict = {"params": {}, "evals": {}}
    timings = {}
    served = None  # the params dir the SGLang server was last re-pointed at by this run
    for step, stage, _ in STEPS:
        c = step_config(config, step, inputs)
        step_dir = c.workdir
        result = from_main(f"pipeline/{step}/finished", lambda: finished(step_dir, c))
        if result is None:
            t = time.time()
            if stage in ("eval", "rft") and builders.policy_servers(c) and c.engine.checkpoint != served:
                serve(c, c.engine.checkpoint, version=served_version(c.engine.checkpoint, inputs))
                served = c.engine.checkpoint
            builders.pipeline_step = step  # the step's progress bars name it
            try:
                if stage in MAIN_ONLY:
                    result = from_main(f"pipeline/{step}/result", lambda: run_stage(c))
                else:
                    result = run_stage(c)
            finally:
                builders.pipeline_step = ""
            timings[step] = round(time.time() - t, 1)
            result.setdefault("wall_s", timings[step])
            if is_main:
                os.makedirs(step_dir, exist_ok=True)
                _mark_finished(step_dir, c, result)
        collect_inputs(step, result, inputs)
    report = from_main("pipeline/report", lambda: write_report(config, inputs["evals"]))
    return {"stage": "pipeline", "workdir": config.workdir, "report": report["files"],
            "stages": report["headline"], "steps_run": timings, "wall_s": round(time.time() - t_start, 1)}


def trained_on(config, summary: dict) -> dict:
    """Per domain: how many train tasks the policy learnt from (and their ids), how many tasks the
    eval scored, how many of those it learnt from (the overlap), and whether the domain has a
    train/test split."""
    tau2_env.init_tau2(config.tau2.data_dir)
    wanted = set(config_lib.csv(config.pipeline.train_task_ids or config.tau2.task_ids))
    out = {}
    for domain, tasks in summary["per_task"].items():
        train = {t.id for t in tau2_env.load_tasks(domain, "train")}
        train = train & wanted if wanted else train
        out[domain] = {"trained": len(train), "evaluated": len(tasks), "overlap": len(train & set(tasks)),
                       "has_split": tau2_env.task_splits(domain) is not None, "trained_ids": sorted(train)}
    return out


def write_report(config, evals: dict) -> dict:
    """{workdir}/report.{json,md,png} -> {"files", "headline": {policy: {"pass@1", "pass@k"}} over the
    tasks the do-nothing agent fails, all domains pooled}."""
    summaries = {}
    for step, path in evals.items():
        with open(path) as f:
            summaries[EVALS[step][0]] = json.load(f)
    curve = pipeline_report.heldout_curve(os.path.join(config.workdir, "grpo", "metrics.jsonl"))
    data = pipeline_report.report_data(summaries, trained_on(config, next(iter(summaries.values()))), curve)
    files = {ext: os.path.join(config.workdir, f"report.{ext}") for ext in ("json", "md", "png")}
    if curve:
        files["heldout_png"] = os.path.join(config.workdir, "report_heldout.png")
        pipeline_report.plot_heldout({"GRPO": curve}, files["heldout_png"])
    with open(files["json"], "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
    with open(files["md"], "w") as f:
        f.write(pipeline_report.render_report(data))
    pipeline_report.plot_report(data, files["png"])
    headline = {p: {m: row["overall"]["beyond_floor"][m] for m in ("pass@1", "pass@k")} for p, row in data["rows"].items()}
    return {"files": files, "headline": headline}
