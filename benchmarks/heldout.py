"""Does GRPO raise pass@1 on tasks it never trained on? SFT -> GRPO through the project's stages,
scored on a held-out split.

    python benchmarks/heldout.py --quick [--out F]     # the toy game only (a few minutes on 2 cores)
    python benchmarks/heldout.py                       # + the generated tau2 task family, 3 seeds

Toy (tau2jax/env/toy.py, a table per task): gold SFT (configs/tiny_sft_toy.py, deliberately short)
on the train tables' gold episodes, then GRPO (configs/tiny_grpo_toy.py:heldout) from its params,
both scored on the train tables and on test tables disjoint from them (asserted). Only the key
and the looked-up value are visible to the policy, so what transfers is lookup-then-copy.

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

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

from benchmarks import common  # noqa: E402

HEADLINE = "sampled pass@1 at the rollout temperature (samples per task: `samples`); *_greedy: temperature 0"


def score(config, params: str, splits: dict, samples: int) -> dict:
    """{split: {"greedy_pass1", "sampled_pass1", ...}} of the exported `params` on each (env, refs)
    of `splits`, played by the engine `config` builds (GRPO's rollout engine, its sampling)."""
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
        return {name: heldout.pass1(env, refs, engine=engine, sampling=sampling, seed=config.seed, samples=samples,
                                    concurrency=r.concurrency, max_infra_retries=r.max_infra_retries)
                for name, (env, refs) in splits.items()}
    finally:
        engine.close()


def heldout_curve(workdir: str) -> list[dict]:
    """The GRPO run's in-loop held-out pass@1 per evaluated step (metrics.jsonl)."""
    out = {}
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            m = json.loads(line)
            if "heldout_sampled_pass1" in m:
                out[m["step"]] = {"step": m["step"], "greedy": m["heldout_greedy_pass1"],
                                  "sampled": m["heldout_sampled_pass1"], "train_reward": m.get("reward_mean")}
    return [out[s] for s in sorted(out)]


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
    from tau2jax.env import toy as toy_env
    from tau2jax.stages import run_stage

    t0 = time.time()
    grpo = tiny_grpo_toy.get_config("heldout")
    grpo.seed, grpo.workdir = seed, os.path.join(work, "grpo")
    train = toy_env.ToyEnvironment(num_tasks=grpo.rl.toy.tasks, seed=seed, shared_table=False)
    test = toy_env.ToyEnvironment(num_tasks=grpo.rl.heldout_tasks, seed=seed, split="test", shared_table=False)
    train_tables = {r.task.table for r in train.tasks()}
    test_tables = {r.task.table for r in test.tasks()}
    assert not train_tables & test_tables, "toy: a test table is a train table"
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
        "distinct_train_tables": len(train_tables), "distinct_test_tables": len(test_tables), "tables_shared": 0,
        "sft_steps": sft.train.steps, "sft_lr": sft.optim.lr, "grpo_steps": grpo.rl.steps, "grpo_lr": grpo.optim.lr,
        **flat("sft", "grpo", scores),
        "gain_test": scores["grpo"]["test"]["sampled_pass1"] - scores["sft"]["test"]["sampled_pass1"],
        "heldout_curve": heldout_curve(grpo.workdir),
        "wall_s": round(time.time() - t0, 1),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the toy part only")
    p.add_argument("--workdir", default=None, help="run dir, kept (default: a temporary one, removed)")
    p.add_argument("--toy-seed", type=int, default=0)
    p.add_argument("--samples", type=int, default=8, help="sampled episodes per task for sampled pass@1")
    p.add_argument("--out", default=None, help="result file (default benchmarks/results/heldout.json)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="heldout_") as tmp:  # runs kept only under --workdir
        return run(args, os.path.abspath(args.workdir) if args.workdir else tmp)


def run(args, work: str) -> int:
    t0 = time.time()
    load_before = [round(v, 2) for v in os.getloadavg()]

    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)
    result = {"quick": args.quick, "toy": toy(os.path.join(work, "toy"), args.toy_seed, args.samples), "seeds": []}
    t = result["toy"]
    print(f"toy held-out ({t['test_tasks']} test tables, none trained): sampled pass@1 SFT {t['sft_test']:.3f} -> "
          f"GRPO {t['grpo_test']:.3f} (train {t['sft_train']:.3f} -> {t['grpo_train']:.3f}); greedy "
          f"{t['sft_test_greedy']:.3f} -> {t['grpo_test_greedy']:.3f}", flush=True)
    result["wall_s"] = round(time.time() - t0, 1)
    result["load_avg"] = {"before": load_before, "after": [round(v, 2) for v in os.getloadavg()]}
    common.write_result(result, args.out or common.result_path("heldout.json"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
