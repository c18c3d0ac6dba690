"""`make demo`: the whole pipeline on CPU with a tiny model, in a few minutes, offline.

1. a tiny random HF Qwen3 (the real Qwen3 vocabulary) → Orbax → parity against transformers;
2. gold demonstrations of tau2 train tasks through the real environments and evaluator;
3. SFT from the converted checkpoint (`configs/tiny_sft.py`), resumable, with TensorBoard logs;
4. the SFT weights exported back to HF safetensors and served by the built-in JAX engine;
5. Pass@k evaluation of that policy on tau2's mock domain (tiny random model: expect ~0).

Every stage is the same code path the GPU configs use; only the sizes differ.
    python -m tau2jax.demo [--workdir runs/demo]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

from rich.console import Console
from rich.table import Table

console = Console()


def _stage(title: str):
    console.rule(f"[bold]{title}")
    return time.perf_counter()


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m tau2jax.demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="runs/demo")
    ap.add_argument("--fresh", action="store_true", help="delete the workdir first")
    args = ap.parse_args(argv)
    work = os.path.abspath(args.workdir)
    if args.fresh:
        shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work, exist_ok=True)

    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)
    from checkpoints_tools import hf_to_orbax, orbax_to_hf, parity
    from checkpoints_tools.tiny_hf import make_tiny_hf_dir
    from configs import eval as eval_config
    from configs import demos as demos_config
    from configs import tiny_sft
    from tau2jax.data.tokenizer import load_tokenizer
    from tau2jax.train import run_stage

    results, timings = {}, {}

    t = _stage("1/5  HF → Orbax conversion and parity with transformers")
    hf_dir, orbax_dir = os.path.join(work, "hf_tiny"), os.path.join(work, "orbax_tiny")
    if not os.path.isdir(orbax_dir):
        shutil.rmtree(hf_dir, ignore_errors=True)
        vocab = load_tokenizer().vocab_size
        make_tiny_hf_dir(hf_dir, vocab_size=vocab, seed=0)
        hf_to_orbax.convert(hf_dir, orbax_dir)
    results["parity"] = parity.compare(hf_dir, orbax_dir, log=console.print)
    timings["convert+parity"] = time.perf_counter() - t

    t = _stage("2/5  Gold demonstrations (tau2 train tasks, real environments and evaluator)")
    c = demos_config.get_config("native")
    c.workdir = os.path.join(work, "demos")
    c.tau2.domains = "mock,airline"
    c.tau2.task_ids = ""
    results["demos"] = run_stage(c)
    timings["demos"] = time.perf_counter() - t

    t = _stage("3/5  SFT from the converted checkpoint (configs/tiny_sft.py)")
    c = tiny_sft.get_config()
    c.workdir = os.path.join(work, "sft")
    c.model.init_from = orbax_dir
    results["sft"] = run_stage(c)
    timings["sft"] = time.perf_counter() - t

    t = _stage("4/5  Export to HF safetensors and generate with the built-in engine")
    from checkpoints_tools.orbax_io import restore_params
    from tau2jax.data.chat import ChatFormat
    from tau2jax.inference.engine import SamplingParams
    from tau2jax.inference.jax_engine import JaxEngine

    export_dir = os.path.join(work, "sft_hf")
    params, cfg = restore_params(results["sft"]["params"])
    orbax_to_hf.export_hf(params, cfg, export_dir, overwrite=True)
    tokenizer = load_tokenizer()
    chat = ChatFormat(tokenizer)
    engine = JaxEngine.from_hf_dir(export_dir, tokenizer=tokenizer, max_seq_len=512, max_batch=2)
    prompt, _ = chat.render([{"role": "user", "content": "I need to cancel my reservation."}],
                            add_generation_prompt=True)
    out = engine.generate([prompt], SamplingParams(temperature=0.0, max_new_tokens=24,
                                                   stop_token_ids=(tokenizer.im_end_id,)))[0]
    engine.close()
    results["generate"] = {"text": tokenizer.decode(out.output_ids), "finish_reason": out.finish_reason,
                           "num_tokens": len(out.output_ids), "exported_to": export_dir}
    console.print(f"reply: {results['generate']['text']!r}")
    timings["export+generate"] = time.perf_counter() - t

    t = _stage("5/5  Pass@k evaluation of the SFT policy on tau2 (mock domain, scripted user)")
    c = eval_config.get_config("tiny")
    c.workdir = os.path.join(work, "eval")
    c.engine.kind = "builtin"
    c.engine.checkpoint = results["sft"]["params"]
    c.engine.max_new_tokens = 48
    c.tau2.domains = "mock"
    c.tau2.max_steps = 8
    c.eval.num_samples = 2
    c.eval.max_tasks_per_domain = 3
    results["eval"] = run_stage(c)
    timings["eval"] = time.perf_counter() - t

    table = Table(title="tau2jax demo")
    table.add_column("stage"); table.add_column("result"); table.add_column("seconds", justify="right")
    p = results["parity"]
    table.add_row("convert + parity", f"max |Δlogit| {p['max_abs_logit_diff']:.1e}, greedy match {p['greedy_match']:.0%}",
                  f"{timings['convert+parity']:.0f}")
    demos = ", ".join(f"{d}: {v['reward_1']}/{v['replayed']} score 1.0" for d, v in results["demos"].items()
                      if isinstance(v, dict) and "replayed" in v)
    table.add_row("gold demos", demos, f"{timings['demos']:.0f}")
    s = results["sft"]
    table.add_row("sft", f"loss {s['first_loss']:.2f} → {s['final_loss']:.2f} in {s['steps']} steps",
                  f"{timings['sft']:.0f}")
    table.add_row("export + generate", f"{results['generate']['num_tokens']} tokens, {results['generate']['finish_reason']}",
                  f"{timings['export+generate']:.0f}")
    e = results["eval"]
    k = e["k"]
    table.add_row("eval (mock)", f"Pass@1 {e['pass@1']['overall']:.0%}, Pass@{k} {e[f'pass@{k}']['overall']:.0%} over "
                  f"{e['episodes']} episodes, {e['infra_failures']} infra failures; report in {e['out_dir']}",
                  f"{timings['eval']:.0f}")
    console.print(table)
    console.print(f"outputs under {work}; TensorBoard: tensorboard --logdir {work}/sft/tensorboard")
    summary = {"parity": p, "sft": {k: s[k] for k in ("first_loss", "final_loss", "steps", "loss_halved")},
               "eval": e, "workdir": work}
    print(json.dumps(summary, default=str))
    return summary


if __name__ == "__main__":
    main()
