"""GRPO on real tau2 episodes: does it raise a tiny policy's success on mock, seed after seed?

    python benchmarks/grpo_mock.py [--seeds 0,1,2] [--sampled 16] [--grpo-steps N] [--workdir runs/grpo_mock]

Per seed (`config.seed`: SFT batch order, rollout and eval sampling), the demo's whole pipeline
(configs/tiny_pipeline.py: the real tokenizer, the scripted user, tau2's evaluator): demos -> SFT ->
RFT -> SFT on its successes -> GRPO, greedy evals between. GRPO starts from the RFT step's SFT
checkpoint; that checkpoint and the GRPO policy are also evaluated sampled (`--sampled` samples per
task at the rollout temperature; pass@1 averages all samples, `pass@1_first_attempt` keeps the
first's). GRPO straight from the first SFT checkpoint was tried: its T=1
episodes succeed too rarely (reward 0.07 -> 0.02 in two steps, seed 0), see WORKSPACE.md.
Success is on the mock tasks a do-nothing agent fails. Mock has no train/test split: GRPO trains
on the tasks it is evaluated on (fitting, not generalisation). Rerunning reuses finished steps. Last
stdout line: one JSON object (also benchmarks/results/grpo_mock.json); `benchmarks/make_results.py`
puts it in RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

from benchmarks import common  # noqa: E402


def _eval(config, name: str, params: str, temperature: float, samples: int) -> dict:
    """Pass@1 (and Pass@samples) beyond the floor of `params`, from `config`'s eval step config."""
    from tau2jax.stages import run_stage

    c = config.copy_and_resolve_references()
    c.workdir = os.path.join(os.path.dirname(config.workdir), name)
    c.engine.checkpoint = params
    c.eval.temperature, c.eval.num_samples = temperature, samples
    r = run_stage(c)
    with open(os.path.join(r["out_dir"], "summary.json")) as f:
        beyond = json.load(f)["metrics_beyond_floor"]["overall"]
    unbiased = beyond["pass@k_unbiased"]  # pass@1 over all samples: a finer estimate than the first attempt's
    return {"pass@1": unbiased.get("1"), "pass@1_first_attempt": beyond["pass@1"],
            f"pass@{samples}": unbiased.get(str(samples)), "tasks": beyond["num_tasks"], "samples": samples,
            "temperature": temperature}


def _grpo_signal(workdir: str) -> list[dict]:
    """Per GRPO step: mean episode reward and success, groups kept (with reward variance). A resumed
    run appends to metrics.jsonl: the last record of a step is the one its checkpoint holds."""
    keys = ("reward_mean", "success_rate", "groups_trained", "groups_zero_variance", "loss")
    by_step = {}
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            m = json.loads(line)
            by_step[m["step"]] = {"step": m["step"], **{k: m.get(k) for k in keys}}
    return [by_step[s] for s in sorted(by_step)]


def run_seed(base, seed: int, sampled: int) -> dict:
    from tau2jax.stages import pipeline

    c = base.copy_and_resolve_references()
    c.seed = seed
    c.workdir = os.path.join(base.workdir, f"seed_{seed}")
    t0 = time.time()
    r = pipeline.run(c)
    greedy = {p: v["pass@1"] for p, v in r["stages"].items()}
    start = os.path.join(c.workdir, "sft_rft", "params")  # GRPO's init (stages/pipeline.py)
    ev = pipeline.step_config(c, "eval_rft", {"params": {"sft_rft": start}})
    temperature = c.pipeline.grpo.rl.rollout.temperature
    out = {"seed": seed, "greedy": greedy, "grpo_steps": _grpo_signal(os.path.join(c.workdir, "grpo"))}
    steps = out["grpo_steps"]
    # The GRPO step's own record (a rerun keeps it): its wall time, and resumed_from > 0 if it continued a checkpoint
    with open(os.path.join(c.workdir, "grpo", pipeline.DONE)) as f:
        grpo = json.load(f)["result"]
    out["grpo_resumed_from"], out["grpo_wall_s"] = grpo.get("resumed_from"), grpo.get("wall_s")
    out["grpo_first_reward"], out["grpo_final_reward"] = steps[0]["reward_mean"], steps[-1]["reward_mean"]
    for stage, params, policy in (("before", start, "rft"), ("after", os.path.join(c.workdir, "grpo", "params"), "grpo")):
        out[stage] = {"greedy": {"pass@1": greedy[policy]},
                      "sampled": _eval(ev, f"{stage}_sampled_{sampled}", params, temperature, sampled)}
    out["margin"] = {m: out["after"][m]["pass@1"] - out["before"][m]["pass@1"] for m in ("greedy", "sampled")}
    out["margin_vs_first_sft_greedy"] = greedy["grpo"] - greedy["sft"]
    out["wall_s"] = round(time.time() - t0, 1)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="runs/grpo_mock")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--sampled", type=int, default=16, help="samples per task of the sampled eval (16: 128 episodes, "
                   "so one episode moves pass@1 by 0.008, not 0.03 as with 4)")
    p.add_argument("--grpo-steps", type=int, default=None, help="GRPO steps (default: the demo's)")
    p.add_argument("--out", default=None, help="result file (default benchmarks/results/grpo_mock.json)")
    args = p.parse_args(argv)
    work = os.path.abspath(args.workdir)
    os.makedirs(work, exist_ok=True)
    t0 = time.time()
    load_before = common.load_average()

    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)
    from configs import tiny_pipeline
    from tau2jax.demo import convert_and_check

    orbax_dir, _ = convert_and_check(work)
    c = tiny_pipeline.get_config()
    c.workdir, c.model.init_from = work, orbax_dir
    if args.grpo_steps:
        c.pipeline.grpo.rl.steps = args.grpo_steps
    seeds = [run_seed(c, int(s), args.sampled) for s in args.seeds.split(",")]

    g = c.pipeline.grpo
    result = {
        "setting": "configs/tiny_pipeline.py per seed; GRPO from the RFT step's SFT checkpoint (before = that checkpoint)",
        "train_task_ids": c.pipeline.train_task_ids, "sft_steps": c.pipeline.sft.train.steps,
        "grpo_steps": g.rl.steps, "samples_per_task": g.rl.samples_per_task,
        "rollout_temperature": g.rl.rollout.temperature, "grpo_lr": g.optim.lr, "sampled_eval_samples": args.sampled,
        "per_seed": seeds,
        "grpo_above_start_greedy": sum(s["margin"]["greedy"] > 0 for s in seeds),
        "grpo_above_start_sampled": sum(s["margin"]["sampled"] > 0 for s in seeds),
        "min_margin_greedy": min(s["margin"]["greedy"] for s in seeds),
        "min_margin_sampled": min(s["margin"]["sampled"] for s in seeds),
        "wall_s": round(time.time() - t0, 1),
        "load_avg": {"before": load_before, "after": common.load_average()},
    }
    for s in seeds:
        print(f"seed {s['seed']}: greedy pass@1 SFT {s['greedy']['sft']:.3f}, RFT (GRPO's start) {s['greedy']['rft']:.3f} -> "
              f"GRPO {s['greedy']['grpo']:.3f}; sampled RFT {s['before']['sampled']['pass@1']:.3f} -> "
              f"GRPO {s['after']['sampled']['pass@1']:.3f}")
    common.write_result(result, args.out or common.result_path("grpo_mock.json"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
