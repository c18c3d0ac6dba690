"""Writes benchmarks/RESULTS.md from the benchmark result files, so the page never drifts from them.

    python benchmarks/make_results.py     # reads benchmarks/results/*.json and results/h100/**/*.json

Each file is recognised by its fields (what the script that wrote it puts there), not by its name,
so renamed copies (results/h100/) and extra runs (--out ..._quick.json) are read too. Every figure
on the page is copied from a file (floats rounded to 4 decimals) and its table row names that file;
nothing is computed or estimated here. The command column is rebuilt from the file's own config
(every option spelled out). Files are read in sorted order and the page holds no timestamp: the
same files give the same page. What the benchmark issue asks for but no file holds is listed under
"Not measured", decided from the files' contents.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
NA = "not recorded"

# kind -> a field only that script's result has; the first match wins (mfu files have no other).
KINDS = (("mfu", "mfu"), ("rl_overlap", "async_speedup"), ("grpo_mock", "per_seed"), ("rollout", "speedup_vs_reprefill"),
         ("weight_sync", "in_process"), ("decode", "engine_tokens_per_s"), ("train_step", "loss_first_jax"),
         ("forward", "jax_tokens_per_s"))


def kind_of(data: dict) -> str | None:
    return next((kind for kind, field in KINDS if field in data), None)


def load(results_dir: str) -> list[tuple[str, str | None, dict]]:
    """[(path, kind or None, data)] of results_dir/*.json and results_dir/h100/**/*.json, sorted by path."""
    paths = sorted(glob.glob(os.path.join(results_dir, "*.json"))
                   + glob.glob(os.path.join(results_dir, "h100", "**", "*.json"), recursive=True))
    out = []
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        out.append((path, kind_of(data), data))
    return out


def fmt(v) -> str:
    """A cell: floats rounded to 4 decimals, None as NA, anything else as it is."""
    if v is None:
        return NA
    if isinstance(v, float):
        return repr(round(v, 4))
    return str(v)


def table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(fmt(c) for c in r) + " |" for r in rows]


# ----------------------------------------------------------------------------- per-file facts

def size_flag(size) -> str:
    return " --quick" if size == "quick" else ""


def command(path: str, kind: str, d: dict) -> str:
    """The script invocation that writes this result, rebuilt from its recorded config."""
    c = d.get("config", {})
    out = f" --out {os.path.relpath(path, os.path.dirname(HERE))}"
    if kind == "forward":
        args = f"forward.py{size_flag(c.get('size'))} --iters {c['iters']} --threads {c['cpu_threads']}{out}"
    elif kind == "decode":
        args = (f"decode.py{size_flag(c.get('size'))} --decode-chunk {c['decode_chunk']} "
                f"--threads {c['cpu_threads']}{out}")
    elif kind == "train_step":
        args = f"train_step.py{size_flag(c.get('size'))} --iters {c['iters']} --threads {d['threads']}{out}"
    elif kind == "rollout":
        args = f"rollout.py{size_flag(c.get('size'))} --threads {c['cpu_threads']}{out}"
    elif kind == "rl_overlap":
        args = f"rl_overlap.py{size_flag(c.get('mode'))} --latency {c['turn_latency_s']}{out}"
    elif kind == "grpo_mock":
        seeds = ",".join(str(r["seed"]) for r in d["per_seed"])
        args = f"grpo_mock.py --seeds {seeds} --sampled {d['sampled_eval_samples']} --grpo-steps {d['grpo_steps']}{out}"
    elif kind == "weight_sync":  # writes weight_sync[_<model>].json; h100/ holds moved copies
        model = " --quick" if d["model"] == "tiny" else f" --model {d['model']} --layers {d['num_layers']}"
        args = f"weight_sync.py{model} --repeats {d['repeats']}{out}"
    else:  # mfu
        impl = f" --attn-impl {c['attn_impl']}" if "attn_impl" in c else ""
        args = (f"train_step.py --mfu{' --grpo' if d.get('step') == 'grpo' else ''} --layers {c['num_layers']} "
                f"--seq-len {c['seq_len']}{impl} --attn-chunk {c['attn_chunk']} --remat {c['remat']} "
                f"--max-batch {c['batch']} --iters {c['iters']}{out}")
    return f"`python benchmarks/{args}`"


def machine(d: dict) -> str:
    c = d.get("config", {})
    if "device" in c or "device" in d:
        return c.get("device") or d["device"]
    threads = c.get("cpu_threads", d.get("threads"))
    parts = [c.get("machine"), f"{c['cpu_count']} CPUs" if "cpu_count" in c else None,
             f"jax {c['jax_backend']}" if "jax_backend" in c else None,
             f"{threads} thread(s)" if threads is not None else None]
    return ", ".join(p for p in parts if p) or NA


def load_average(d: dict) -> str:
    """The 1-minute load average the file recorded (train_step.py: before and after the timing)."""
    c = d.get("config", {})
    if "load_avg" in d:
        return f"{fmt(d['load_avg']['before'][0])} before, {fmt(d['load_avg']['after'][0])} after"
    for key in ("load_average_1m", "loadavg_1m"):
        if key in c:
            return fmt(c[key])
    return NA


# ----------------------------------------------------------------------------- sections

def link(path: str, out_dir: str) -> str:
    rel = os.path.relpath(path, out_dir)
    return f"[`{rel}`]({rel})"


def vs_transformers(files, out_dir) -> list[str]:
    rows = []
    for path, kind, d in files:
        c = d.get("config", {})
        if kind == "forward":
            ours, check = d["jax_tokens_per_s"], "—"
        elif kind == "train_step":
            ours, check = d["jax_tokens_per_s"], f"first loss {d['loss_first_jax']} vs {d['loss_first_hf']}"
        elif kind == "decode":
            ours, check = d["engine_tokens_per_s"], f"{d['rows_identical']} of {c['batch']} greedy rows identical"
        else:
            continue
        rows.append([link(path, out_dir), kind, c.get("size", NA), c["hidden_size"], c["num_layers"], c["batch"],
                     ours, d["hf_tokens_per_s"], d["speedup_vs_hf"], check])
    return table(["file", "benchmark", "size", "hidden", "layers", "batch", "tau2jax tokens/s",
                  "transformers tokens/s", "speedup_vs_hf", "same computation"], rows)


def rollout(files, out_dir) -> list[str]:
    rows = []
    for path, kind, d in files:
        if kind != "rollout":
            continue
        c = d["config"]
        for mode in ("reprefill", "prefix_cache"):
            r = d[mode]
            rows.append([link(path, out_dir), c.get("size", NA), c["episodes"], mode, r["seconds"],
                         r["episode_tokens_per_s"], r["prompt_tokens"], r["prefill_tokens"], r["prefix_hits"],
                         d["speedup_vs_reprefill"], d["trajectories_identical"]])
    return table(["file", "size", "episodes", "mode", "seconds (median round)", "episode tokens/s", "prompt tokens",
                  "prefilled tokens", "prefix hits", "speedup_vs_reprefill", "identical trajectories"], rows)


def rl_overlap(files, out_dir) -> list[str]:
    rows = []
    for path, kind, d in files:
        if kind != "rl_overlap":
            continue
        c = d["config"]
        for run in ("sync", "async"):
            staleness = d["max_staleness_seen_sync"] if run == "sync" else d["max_staleness_seen"]
            rows.append([link(path, out_dir), c["mode"], c["steps"], run, d["timed_steps"], d[f"wall_s_{run}"],
                         d[f"learner_busy_frac_{run}"], staleness, d[f"first_reward_{run}"],
                         d[f"final_reward_{run}"], d.get(f"weight_sync_wait_frac_{run}", "-"), d["async_speedup"]])
    return table(["file", "mode", "steps", "run", "timed steps", "wall s", "learner busy fraction",
                  "max staleness seen", "first reward", "final reward", "weight-sync wait / step",
                  "async_speedup"], rows)


def grpo_mock(files, out_dir) -> list[str]:
    rows = []
    for path, kind, d in files:
        if kind != "grpo_mock":
            continue
        for r in d["per_seed"]:
            b, a = r["before"], r["after"]
            k = f"pass@{d['sampled_eval_samples']}"
            rows.append([link(path, out_dir), r["seed"], d["sft_steps"], d["grpo_steps"], d["rollout_temperature"],
                         r["greedy"]["sft"], b["greedy"]["pass@1"], a["greedy"]["pass@1"], r["margin"]["greedy"],
                         b["sampled"]["pass@1"], a["sampled"]["pass@1"], r["margin"]["sampled"],
                         b["sampled"][k], a["sampled"][k], r["grpo_first_reward"], r["grpo_final_reward"]])
    return table(["file", "seed", "SFT steps", "GRPO steps", "rollout T", "greedy pass@1 SFT",
                  "greedy pass@1 GRPO's start (RFT)", "greedy pass@1 GRPO", "greedy margin over start",
                  "sampled pass@1 start", "sampled pass@1 GRPO", "sampled margin", "sampled pass@k start",
                  "sampled pass@k GRPO", "GRPO first reward", "GRPO final reward"], rows)


def weight_sync(files, out_dir) -> list[str]:
    rows = []
    for path, kind, d in files:
        if kind != "weight_sync":
            continue
        disk = d["disk"]  # files before issue 17 have no GB/s nor old-writer figures
        rows.append([link(path, out_dir), d["device"], d["model"], d["num_layers"], d["params"], d["engine_dtype"],
                     d["repeats"], d["in_process"]["pause_s"], disk["transfer_s"], disk.get("publish_gb_per_s", "-"),
                     disk.get("old_publish_gb_per_s", "-"), disk["pause_s"], disk["checkpoint_bytes"]])
    return table(["file", "device", "model", "layers", "params", "engine dtype", "repeats", "in-process pause s",
                  "disk publish s", "publish GB/s", "old publish GB/s", "disk reload pause s", "checkpoint bytes"],
                 rows)


def compiles(files, out_dir) -> list[str]:
    """Compile counts after warm-up, from whichever files record one."""
    rows = []
    for path, kind, d in files:
        if "compiles_after_warmup" in d:
            rows.append([link(path, out_dir), "SFT step (jit_step); goal 0",
                         f"{d['config']['iters']} timed steps", d["compiles_after_warmup"]])
        if "compiles_in_timed_rounds" in d:
            rows.append([link(path, out_dir), "engine, every XLA compile after warmup(); goal 0",
                         f"{d['config']['timed_rounds']} timed rounds per mode", d["compiles_in_timed_rounds"]])
        for run in ("sync", "async"):
            if f"learner_compiles_{run}" in d:
                rows.append([link(path, out_dir), f"GRPO learner step shapes, {run} run (row buckets; rl.batch.micro_batch_rows: 3 at most)",
                             f"{d['config']['steps']} steps, first included", d[f"learner_compiles_{run}"]])
    return table(["file", "what", "counted over", "compiles"], rows)


def mfu(files, out_dir) -> list[str]:
    def key(item):
        c = item[2]["config"]
        return c["seq_len"], c["num_layers"], c.get("attn_impl", "xla"), item[2].get("step", "sft"), item[0]

    rows = []
    for path, _, d in sorted((f for f in files if f[1] == "mfu"), key=key):
        c = d["config"]
        rows.append([link(path, out_dir), d.get("step", "sft"), c["num_layers"], c["batch"], c["seq_len"],
                     c.get("attn_impl", "xla"), c["attn_chunk"], c["remat"], d.get("step_s"), d["tokens_per_s"],
                     d["mfu"], d.get("mfu_causal"), c["memory_gib"], c["device"]])
    return table(["file", "step", "layers", "batch", "seq", "attention", "attn chunk", "remat", "step s", "tokens/s",
                  "MFU (of bf16 peak)", "MFU, causal attention FLOPs", "memory GiB", "device"], rows)


def sources(files, out_dir) -> list[str]:
    rows = [[link(path, out_dir), kind or "not recognised", machine(d), load_average(d),
             command(path, kind, d) if kind else "—"] for path, kind, d in files]
    return table(["file", "benchmark", "machine", "load average (1 min)", "command (rebuilt from the file)"], rows)


# What the benchmark issue asks for, and how to tell from the files whether it was measured.
def _sweep(files) -> bool:
    """Step time at 3+ (seq, batch) points with everything else fixed."""
    groups: dict = {}
    for _, kind, d in files:
        if kind == "mfu":
            c = d["config"]
            g = (d.get("step", "sft"), c["num_layers"], c.get("attn_impl", "xla"), c["attn_chunk"], c["remat"])
            groups.setdefault(g, set()).add((c["seq_len"], c["batch"]))
    return any(len(points) >= 3 for points in groups.values())


WANTED = (
    ("SFT / GRPO step time vs sequence length and batch (a sweep with layers, attention and remat fixed)", _sweep),
    ("cuDNN attention on GPU (`--attn-impl cudnn`)",
     lambda fs: any(k == "mfu" and d["config"].get("attn_impl") == "cudnn" for _, k, d in fs)),
    ("MFU of the full 36-layer Qwen3-4B step (8 GPUs, FSDP)",
     lambda fs: any(k == "mfu" and d["config"]["num_layers"] == 36 for _, k, d in fs)),
    ("Weight sync at the full 36-layer Qwen3-4B",
     lambda fs: any(k == "weight_sync" and d["model"] == "qwen3_4b" and d["num_layers"] == 36 for _, k, d in fs)),
    ("SFT step compiles after warm-up (`train_step.py` `compiles_after_warmup`)",
     lambda fs: any("compiles_after_warmup" in d for _, _, d in fs)),
    ("GRPO learner shapes compiled over a run (`rl_overlap.py` `learner_compiles_*`)",
     lambda fs: any("learner_compiles_sync" in d for _, _, d in fs)),
    ("Engine compiles while timing (`rollout.py` `compiles_in_timed_rounds`)",
     lambda fs: any("compiles_in_timed_rounds" in d for _, _, d in fs)),
)


def render(results_dir: str, out_dir: str) -> str:
    files = load(results_dir)
    on_gpu = os.path.join(results_dir, "h100") + os.sep
    cpu = [f for f in files if not f[0].startswith(on_gpu)]
    gpu = [f for f in files if f not in cpu]
    lines = ["# Benchmark results", "",
             "Written by `python benchmarks/make_results.py` from the result files; do not edit by hand. Every "
             "figure is copied from the file its row names (floats rounded to 4 decimals); nothing here is "
             "estimated. Machines, load averages and commands are under Sources. The CPU machine's cores are "
             "shared with other jobs: compare numbers within one file (each ratio is measured in one run).", "",
             "## CPU: tau2jax vs transformers + torch (same weights, one run each)", "", *vs_transformers(cpu, out_dir),
             "", "## CPU: tau2 rollouts, prefix cache vs re-prefill", "", *rollout(cpu, out_dir),
             "", "## CPU: GRPO on the toy env, asynchronous vs synchronous loop", "", *rl_overlap(cpu, out_dir),
             "", "## CPU: GRPO on tau2 mock in the demo's pipeline, per seed", "",
             "The demo's setting (configs/tiny_pipeline.py) per seed: SFT stopped early, RFT, then GRPO from the "
             "RFT step's SFT checkpoint (its start) for the steps shown (the demo runs 10). "
             "Pass@1 on the mock tasks a do-nothing agent fails (8), greedy and sampled at the rollout "
             "temperature (k samples per task: sampled pass@1 is the mean over all of them, pass@k any of them); "
             "GRPO trains on the same tasks (mock has no split: fitting, not generalisation). Rewards are the "
             "GRPO run's mean task reward at its first / last step.", "",
             *grpo_mock(cpu, out_dir),
             "", "## Weight sync (learner -> engine)", "", *weight_sync(cpu, out_dir),
             "", "## Compile counts after warm-up", "",
             "Compiles after the warm-up (the GRPO learner: every shape it compiled in the run; rl_overlap.py "
             "packs each step into one row, so one bucket).", "",
             *compiles(files, out_dir), ""]
    if gpu:
        lines += ["## GPU", "",
                  "Qwen3-4B-shaped train steps on one GPU, sorted by sequence length, layers, attention and step, "
                  "so SFT vs GRPO and cuDNN vs flash vs XLA attention rows sit together; rows of one sequence "
                  "length and layer count at several batches are the step-time sweep. Compare rows from one "
                  "directory (one run on one machine): `session3/` holds cuDNN and flash measured in the same "
                  "run. Files without `attn_impl` or `step` predate those options: XLA attention, SFT step. "
                  "MFU counts attention over all T keys (PaLM's convention); the causal column halves it, what a "
                  "causal kernel computes. GRPO's MFU counts the frozen reference's forward too (8N FLOPs a "
                  "token, not 6N) and attention over each trajectory's length (4 a row). All 36 layers did not "
                  "fit one H100 at any batch (`session3/suite_scale.log`: out of memory beside the 48 GB fp32 "
                  "state).", "", *mfu(gpu, out_dir), "",
                  "Weight sync at Qwen3-4B shape:", "", *weight_sync(gpu, out_dir), ""]
    missing = [what for what, measured in WANTED if not measured(files)]
    lines += ["## Not measured", "", "Asked for by the benchmark issue; no result file holds it yet:", "",
              *([f"- {what}" for what in missing] or ["- (nothing)"]), "",
              "## Sources", "", *sources(files, out_dir), ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", default=os.path.join(HERE, "results"), help="directory of the result files")
    p.add_argument("--out", default=os.path.join(HERE, "RESULTS.md"))
    args = p.parse_args(argv)
    text = render(args.results, os.path.dirname(os.path.abspath(args.out)))
    with open(args.out, "w") as f:
        f.write(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
