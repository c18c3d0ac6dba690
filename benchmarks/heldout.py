"""Does GRPO raise pass@1 on tasks it never trained on? SFT -> GRPO through the project's stages,
scored on a held-out split.

    python benchmarks/heldout.py --quick [--out F]     # the toy game only (a few minutes on 2 cores)
    python benchmarks/heldout.py [--workdir D]         # + the generated tau2 task family, 3 seeds
    python benchmarks/heldout.py --toy-from benchmarks/results/heldout.json   # the family, toy part kept

Toy (tau2jax/env/toy.py, a table per task): gold SFT (configs/tiny_sft_toy.py, deliberately short)
on the train tables' gold episodes, then GRPO (configs/tiny_grpo_toy.py:heldout) from its params,
both scored on the train tables and on test tables disjoint from them (asserted). Only the key
and the looked-up value are visible to the policy, so what transfers is lookup-then-copy.

Family (tau2jax/env/task_family.py: `create_task(user_id, title)`, held-out (user, title)
combinations): per seed configs/tiny_pipeline_family.py (the `tiny` model, scripted user) runs
demos -> SFT -> RFT -> SFT -> GRPO with evals on the test split; then the SFT, RFT and GRPO params
are scored on the train and test tasks. A seed's RL is judged only if its SFT reaches GATE greedy
pass@1 on the train tasks (`sft_gate_passed`, checked before GRPO: a seed that misses it runs no
RL and has null GRPO keys); `family_mean_gain_test` averages judged seeds.

Headline numbers (`*_test`, `*_train`) are sampled pass@1 at the rollout temperature, averaged
over `--samples` episodes per task (`rl.heldout.pass1`); `*_greedy` beside them. Settings are
fixed in the configs; the test split is only ever scored. Last stdout line: the result JSON (also
`--out`, default benchmarks/results/heldout.json).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import common  # noqa: E402  benchmarks/common.py; also puts the repo root on sys.path

GATE = 0.3  # a family seed's RL is judged only if its SFT reaches this greedy pass@1 on the train tasks
HEADLINE = "sampled pass@1 at the rollout temperature (samples per task: `samples`); *_greedy: temperature 0"


def score(config, params: str, splits: dict, samples: int) -> dict:
    """{split: {"greedy_pass1", "sampled_pass1", ...}} of the exported `params` on each (env, refs)
    of `splits` (or a callable giving them), played by the engine `config` builds (GRPO's rollout
    engine, its sampling)."""
    from tau2jax.inference.engine import SamplingParams
    from tau2jax.rl import heldout
    from tau2jax.stages import builders
    from tau2jax.weights.orbax_params import restore_params

    p, _ = restore_params(params)
    tok = builders.tokenizer(config)
    engine = builders.rollout_engine(config, builders.model_config(config, tok), p, tok, 0)
    r = config.rl.rollout
    sampling = SamplingParams(temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
                              max_new_tokens=config.engine.max_new_tokens)
    try:
        return {name: heldout.pass1(*(split() if callable(split) else split), engine=engine, sampling=sampling,
                                    seed=config.seed, samples=samples, concurrency=r.concurrency,
                                    max_infra_retries=r.max_infra_retries)
                for name, split in splits.items()}
    finally:
        engine.close()


def flat(before: str, after: str, scores: dict) -> dict:
    """The result's keys: {before,after}_{train,test} sampled, and *_greedy beside them."""
    out = {}
    for policy, s in ((before, scores[before]), (after, scores[after])):
        for split, v in s.items():
            out[f"{policy}_{split}"] = v["sampled_pass1"]
            out[f"{policy}_{split}_greedy"] = v["greedy_pass1"]
    return out


def toy(work: str, seed: int, samples: int) -> dict:
    from configs import tiny_grpo_toy, tiny_sft_toy
    from tau2jax.eval import pipeline_report
    from tau2jax.env import toy as toy_env
    from tau2jax.stages import run_stage

    t0 = time.time()
    grpo = tiny_grpo_toy.get_config("heldout")
    grpo.seed, grpo.workdir = seed, os.path.join(work, "grpo")
    train = toy_env.ToyEnvironment(num_tasks=grpo.rl.toy.tasks, seed=seed, shared_table=False)
    test = toy_env.ToyEnvironment(num_tasks=grpo.rl.heldout_tasks, seed=seed, split="test", shared_table=False)
    train_tables = {r.task.table for r in train.tasks()}
    test_tables = {r.task.table for r in test.tasks()}  # never a train table (ToyEnvironment asserts it)
    os.makedirs(work, exist_ok=True)
    gold = os.path.join(work, "gold_train.jsonl")
    with open(gold, "w") as f:
        f.writelines(json.dumps(toy_env.gold_record(r)) + "\n" for r in train.tasks())

    sft = tiny_sft_toy.get_config()
    sft.seed, sft.workdir, sft.data.train_files = seed, os.path.join(work, "sft"), gold
    sft_out = run_stage(sft)
    grpo.model.init_from = sft_out["params"]
    grpo_out = run_stage(grpo)
    splits = {"train": (train, train.tasks()), "test": (test, test.tasks())}
    scores = {"sft": score(grpo, sft_out["params"], splits, samples),
              "grpo": score(grpo, grpo_out["params"], splits, samples)}
    return {
        "setting": "configs/tiny_sft_toy.py on the train tables' gold episodes -> configs/tiny_grpo_toy.py:heldout",
        "seed": seed, "headline": HEADLINE, "samples": samples, "temperature": grpo.rl.rollout.temperature,
        "train_tasks": len(train.tasks()), "test_tasks": len(test.tasks()),
        "distinct_train_tables": len(train_tables), "distinct_test_tables": len(test_tables), "tables_shared": len(train_tables & test_tables),
        "sft_steps": sft.train.steps, "sft_lr": sft.optim.lr, "grpo_steps": grpo.rl.steps, "grpo_lr": grpo.optim.lr,
        **flat("sft", "grpo", scores),
        "gain_test": scores["grpo"]["test"]["sampled_pass1"] - scores["sft"]["test"]["sampled_pass1"],
        "heldout_curve": pipeline_report.heldout_curve(os.path.join(grpo.workdir, "metrics.jsonl")),
        "wall_s": round(time.time() - t0, 1),
    }


class _GateFailed(Exception):
    """SFT missed GATE on the train tasks: the seed's RL would not be judged, so it is not run."""


def family_seed(base, seed: int, samples: int) -> dict:
    """One seed of configs/tiny_pipeline_family.py (demos -> SFT -> RFT -> SFT -> GRPO, evals on the
    test split), then the SFT, RFT and GRPO params scored on the train and test tasks. RL runs only
    if SFT reaches GATE greedy pass@1 on its train tasks (checked before GRPO starts); a seed that
    misses it is recorded without GRPO numbers."""
    from tau2jax.data.chat import ChatFormat
    from tau2jax.eval import pipeline_report
    from tau2jax.stages import builders, pipeline, runner

    t0 = time.time()
    c = base.copy_and_resolve_references()
    c.seed, c.workdir = seed, os.path.join(base.workdir, f"seed_{seed}")
    params = {p: os.path.join(c.workdir, step, "params") for p, step in (("sft", "sft"), ("rft", "sft_rft"), ("grpo", "grpo"))}
    grpo = pipeline.step_config(c, "grpo", {"params": params | {"sft_rft": params["rft"]}})

    def split(name):
        env = builders.tau2_environment(grpo, ChatFormat(builders.tokenizer(grpo)), split=name)
        return env, env.tasks()

    splits = {"train": lambda: split("train"), "test": lambda: split("test")}
    scores = {}

    def run_stage(stage_config):
        if stage_config.stage == "grpo":
            scores["sft"] = score(grpo, params["sft"], splits, samples)
            if scores["sft"]["train"]["greedy_pass1"] < GATE:
                raise _GateFailed
        return runner.run_stage(stage_config)

    try:
        r = pipeline.run(c, run_stage)
        gate = True
    except _GateFailed:
        r, gate = None, False
        del params["grpo"]
    scores |= {p: score(grpo, params[p], splits, samples) for p in params if p not in scores}
    ids = {s: [ref.task_id for ref in split(s)[1]] for s in ("train", "test")}
    assert ids["test"] and not set(ids["train"]) & set(ids["test"])
    if not gate:  # no GRPO: its keys are null
        scores["grpo"] = {s: {"sampled_pass1": None, "greedy_pass1": None} for s in splits}
    out = {"seed": seed, "train_task_ids": ids["train"], "test_task_ids": ids["test"],
           **flat("sft", "grpo", scores),
           "rft_test": scores["rft"]["test"]["sampled_pass1"], "rft_test_greedy": scores["rft"]["test"]["greedy_pass1"],
           "rft_train": scores["rft"]["train"]["sampled_pass1"],
           "rft_train_greedy": scores["rft"]["train"]["greedy_pass1"],
           "pipeline_eval_test_greedy": {p: v["pass@1"] for p, v in r["stages"].items()} if r else None,
           "heldout_curve": pipeline_report.heldout_curve(os.path.join(c.workdir, "grpo", "metrics.jsonl")) if r else []}
    out["sft_gate_passed"] = gate
    out["gain_test"] = out["grpo_test"] - out["sft_test"] if gate else None
    out["wall_s"] = round(time.time() - t0, 1)
    return out


def family(work: str, seeds: list[int], samples: int) -> tuple[dict, list[dict]]:
    from configs import tiny_pipeline_family
    from tau2jax.demo import convert_and_check
    from tau2jax.env import task_family

    data = task_family.write_data_dir(os.path.join(work, "family_data"))
    orbax_dir, _ = convert_and_check(work)
    c = tiny_pipeline_family.get_config()
    c.workdir, c.model.init_from, c.tau2.data_dir = work, orbax_dir, str(data)
    runs = []
    for s in seeds:
        runs.append(family_seed(c, s, samples))
        f = runs[-1]
        if not f["sft_gate_passed"]:
            print(f"family seed {s}: SFT greedy pass@1 on train {f['sft_train_greedy']:.3f} < gate {GATE}: no RL "
                  f"(test SFT {f['sft_test']:.3f}, RFT {f['rft_test']:.3f})", flush=True)
            continue
        print(f"family seed {s}: sampled pass@1 test SFT {f['sft_test']:.3f} RFT {f['rft_test']:.3f} -> GRPO "
              f"{f['grpo_test']:.3f} (train SFT {f['sft_train']:.3f} -> GRPO {f['grpo_train']:.3f}); greedy test "
              f"{f['sft_test_greedy']:.3f} -> {f['grpo_test_greedy']:.3f}", flush=True)
    g = c.pipeline.grpo
    setting = {"config": "configs/tiny_pipeline_family.py", "model": c.model.name, "family": "tau2jax/env/task_family.py",
               "split": "test = held-out (user, title) combinations", "headline": HEADLINE, "samples": samples,
               "sft_gate": f"SFT greedy pass@1 on train tasks >= {GATE}", "sft_steps": c.pipeline.sft.train.steps,
               "sft_rft_steps": c.pipeline.sft_rft.train.steps, "grpo_steps": g.rl.steps, "grpo_lr": g.optim.lr,
               "grpo_tasks_per_step": g.rl.tasks_per_step, "grpo_samples_per_task": g.rl.samples_per_task,
               "temperature": g.rl.rollout.temperature}
    return setting, runs


def plot_curves(result: dict, path: str) -> None:
    """Held-out pass@1 against GRPO step of the toy run and of each family seed."""
    from tau2jax.eval import pipeline_report

    curves = {"toy": result["toy"]["heldout_curve"]} | {f"family seed {s['seed']}": s["heldout_curve"]
                                                         for s in result["seeds"]}
    pipeline_report.plot_heldout(curves, path)
    result["plot"] = os.path.basename(path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the toy part only")
    p.add_argument("--workdir", default=None, help="run dir, kept (default: a temporary one, removed)")
    p.add_argument("--toy-seed", type=int, default=0)
    p.add_argument("--samples", type=int, default=8, help="sampled episodes per task for sampled pass@1 (toy)")
    p.add_argument("--seeds", default="0,1,2", help="the family's seeds (full run)")
    p.add_argument("--toy-from", default=None, help="take the toy part from an earlier result file (its `toy` object) "
                   "instead of running it again (~30 minutes on 2 cores); recorded as `toy_from`")
    p.add_argument("--family-samples", type=int, default=8, help="sampled episodes per task for sampled pass@1 (family)")
    p.add_argument("--out", default=None, help="result file (default benchmarks/results/heldout.json)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="heldout_") as tmp:  # runs kept only under --workdir
        return run(args, os.path.abspath(args.workdir) if args.workdir else tmp)


def run(args, work: str) -> int:
    t0 = time.time()
    load_before = common.load_average()

    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)
    if args.toy_from:
        with open(args.toy_from) as f:
            earlier = json.load(f)
        result = {"quick": args.quick, "toy": earlier["toy"], "seeds": [],
                  "toy_from": {"file": args.toy_from, "wall_s": earlier.get("wall_s")}}
    else:
        result = {"quick": args.quick, "toy": toy(os.path.join(work, "toy"), args.toy_seed, args.samples), "seeds": []}
    t = result["toy"]
    print(f"toy held-out ({t['test_tasks']} test tables, none trained): sampled pass@1 SFT {t['sft_test']:.3f} -> "
          f"GRPO {t['grpo_test']:.3f} (train {t['sft_train']:.3f} -> {t['grpo_train']:.3f}); greedy "
          f"{t['sft_test_greedy']:.3f} -> {t['grpo_test_greedy']:.3f}", flush=True)
    if not args.quick:
        result["family"], result["seeds"] = family(os.path.join(work, "family"), [int(x) for x in args.seeds.split(",")],
                                                   args.family_samples)
        judged = [s for s in result["seeds"] if s["sft_gate_passed"]]
        result["family_mean_gain_test"] = (sum(s["gain_test"] for s in judged) / len(judged)) if judged else None
        result["family_seeds_judged"] = len(judged)
    result["wall_s"] = round(time.time() - t0, 1)
    result["load_avg"] = {"before": load_before, "after": common.load_average()}
    out = args.out or common.result_path("heldout.json")
    plot_curves(result, os.path.splitext(out)[0] + ".png")
    common.write_result(result, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
