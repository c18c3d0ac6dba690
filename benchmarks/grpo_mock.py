"""GRPO on real tau2 episodes: does it raise an under-trained tiny SFT policy's success on mock?

    python benchmarks/grpo_mock.py [--sft-steps 120] [--grpo-steps 20] [--temperature 0.5] [--workdir runs/grpo_mock]

1. gold demos of mock -> SFT of the `tiny` Qwen3 for only `--sft-steps` steps (under-trained, so its
   sampled episodes sometimes succeed and sometimes fail: groups carry reward variance);
2. eval of that checkpoint: greedy and sampled (T = the rollout temperature, 4 samples);
3. GRPO from it (configs/tiny_grpo.py settings: scripted user, built-in engine);
4. the same evals of the GRPO policy.
Success is measured on the mock tasks a do-nothing agent fails (`create_task_1_nl_eval` left out).
Mock has no train/test split: GRPO trains on the tasks it is evaluated on (fitting, not
generalisation). Last stdout line: one JSON object (also benchmarks/results/grpo_mock.json).
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


def _evals(config_mod, params: str, workdir: str, temperature: float) -> dict:
    from tau2jax.train import run_stage

    out = {}
    for name, temp, samples in (("greedy", 0.0, 1), ("sampled", temperature, 4)):
        c = config_mod.get_config("tiny")
        c.workdir = os.path.join(workdir, name)
        c.engine.kind, c.engine.checkpoint = "builtin", params
        c.engine.max_seq_len, c.engine.max_new_tokens, c.engine.max_batch = 2048, 48, 36
        c.tau2.domains, c.tau2.max_steps, c.tau2.max_repairs = "mock", 12, 1
        c.eval.max_tasks_per_domain, c.eval.num_samples, c.eval.concurrency = 0, samples, 9
        c.eval.temperature, c.eval.top_k = temp, 0
        r = run_stage(c)
        with open(os.path.join(r["out_dir"], "summary.json")) as f:
            beyond = json.load(f)["metrics_beyond_floor"]["overall"]
        out[name] = {"pass@1_all": r["pass@1"]["overall"], "pass@1_beyond_floor": beyond["pass@1"],
                     f"pass@{r['k']}_beyond_floor": beyond[f"pass@{r['k']}"], "out_dir": r["out_dir"]}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="runs/grpo_mock")
    p.add_argument("--sft-steps", type=int, default=120)
    p.add_argument("--grpo-steps", type=int, default=20)
    p.add_argument("--temperature", type=float, default=0.5,
                   help="rollout and sampled-eval temperature (a tiny model at T=1 rarely succeeds: no group variance)")
    p.add_argument("--sft-params", default="", help="start from these SFT params (skip demos + SFT)")
    p.add_argument("--out", default=None, help="result file (default benchmarks/results/grpo_mock.json)")
    args = p.parse_args(argv)
    work = os.path.abspath(args.workdir)
    t0 = time.time()
    load_before = [round(v, 2) for v in os.getloadavg()]

    from configs import demos as demos_config
    from configs import eval as eval_config
    from configs import tiny_grpo, tiny_sft
    from tau2jax.train import run_stage

    if args.sft_params:
        sft = {"params": os.path.abspath(args.sft_params), "final_loss": None}
    else:
        c = demos_config.get_config("native")
        c.workdir, c.tau2.domains, c.tau2.task_ids = os.path.join(work, "demos"), "mock", ""
        demos = run_stage(c)
        c = tiny_sft.get_config()
        c.workdir, c.data.train_files = os.path.join(work, "sft"), demos["mock"]["file"]
        c.data.max_len, c.train.steps, c.train.loss_chunk, c.train.checkpoint_every = 1024, args.sft_steps, 64, 50
        sft = run_stage(c)
    before = _evals(eval_config, sft["params"], os.path.join(work, "eval_sft"), args.temperature)

    c = tiny_grpo.get_config()
    c.workdir, c.model.init_from = os.path.join(work, "grpo"), sft["params"]
    c.rl.steps, c.rl.temperature, c.rl.max_len, c.train.loss_chunk = args.grpo_steps, args.temperature, 1024, 64
    c.rl.dynamic_sampling, c.rl.max_refill_rounds = True, 0
    grpo = run_stage(c)
    after = _evals(eval_config, grpo["params"], os.path.join(work, "eval_grpo"), args.temperature)

    result = {"sft_steps": args.sft_steps, "sft_params": sft["params"], "sft_final_loss": sft["final_loss"], "grpo_steps": args.grpo_steps,
              "rollout_temperature": args.temperature, "grpo_first_reward": grpo["first_reward"],
              "grpo_final_reward": grpo["final_reward"], "before": before, "after": after,
              "wall_s": round(time.time() - t0, 1), "load_avg": {"before": load_before, "after": [round(v, 2) for v in os.getloadavg()]}}
    for name in ("greedy", "sampled"):
        b, a = before[name]["pass@1_beyond_floor"], after[name]["pass@1_beyond_floor"]
        print(f"{name:8s} pass@1 beyond the floor: SFT {b} -> GRPO {a}")
    common.write_result(result, args.out or common.result_path("grpo_mock.json"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
