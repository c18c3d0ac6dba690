"""`make demo`: the recipe on CPU with a tiny model on tau2 mock, offline, and it visibly learns.

1. a tiny random HF Qwen3 (the real Qwen3 vocabulary) → Orbax → logit parity against transformers;
2. the `pipeline` stage (`tau2jax/demo_config.py`, the CLI's `configs/tiny_pipeline.py`): gold
   demos → SFT → RFT → SFT → GRPO, with a greedy eval of the untrained model and after each
   training stage, ending with the performance table (`{workdir}/pipeline/report.{md,json,png}`);
3. the final GRPO weights exported back to HF safetensors and served by the built-in JAX engine.

Every step is the code path the GPU configs use; only the sizes differ. Rerunning resumes (finished
steps are reused). The last stdout line is one JSON object: `stages` = {base, sft, rft, grpo:
{"pass@1", "pass@k"}} on the mock tasks a do-nothing agent fails, and `wall_s`.

    python -m tau2jax.demo [--workdir runs/demo] [--fresh]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

from absl import logging as absl_logging
from rich.console import Console
from rich.markdown import Markdown

from tau2jax.data.chat import ChatFormat
from tau2jax.data.tokenizer import load_tokenizer
from tau2jax.demo_config import tiny_pipeline_config
from tau2jax.inference.engine import SamplingParams
from tau2jax.inference.jax_engine import JaxEngine
from tau2jax.models.tiny_hf import make_tiny_hf_dir
from tau2jax.stages import run_stage
from tau2jax.weights.convert import convert
from tau2jax.weights.hf_write import export_hf
from tau2jax.weights.orbax_params import restore_params
from tau2jax.weights.parity import compare

console = Console()


def convert_and_check(work: str) -> tuple[str, dict]:
    """A tiny random HF Qwen3 converted to Orbax (once) -> (orbax dir, parity against transformers)."""
    hf_dir, orbax_dir = os.path.join(work, "hf_tiny"), os.path.join(work, "orbax_tiny")
    if not os.path.isdir(orbax_dir):
        shutil.rmtree(hf_dir, ignore_errors=True)
        make_tiny_hf_dir(hf_dir, vocab_size=load_tokenizer().vocab_size, seed=0)
        convert(hf_dir, orbax_dir)
    return orbax_dir, compare(hf_dir, orbax_dir, log=console.print)


def export_and_generate(params_dir: str, export_dir: str) -> dict:
    """Orbax params -> HF safetensors -> the built-in engine answers one greedy turn."""
    params, cfg = restore_params(params_dir)
    export_hf(params, cfg, export_dir, overwrite=True)
    tokenizer = load_tokenizer()
    engine = JaxEngine.from_hf_dir(export_dir, tokenizer=tokenizer, max_seq_len=512, max_batch=2)
    prompt, _ = ChatFormat(tokenizer).render([{"role": "user", "content": "I need to update my task."}],
                                             add_generation_prompt=True)
    out = engine.generate([prompt], SamplingParams(temperature=0.0, max_new_tokens=24,
                                                   stop_token_ids=(tokenizer.im_end_id,)))[0]
    engine.close()
    return {"text": tokenizer.decode(out.output_ids), "finish_reason": out.finish_reason,
            "num_tokens": len(out.output_ids), "exported_to": export_dir}


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
    t_start = time.perf_counter()

    absl_logging.set_verbosity(absl_logging.WARNING)

    console.rule("[bold]1/3  HF → Orbax conversion and parity with transformers")
    orbax_dir, parity = convert_and_check(work)

    console.rule("[bold]2/3  Pipeline: demos → SFT → RFT → SFT → GRPO, evals between (tau2jax/demo_config.py)")
    c = tiny_pipeline_config()
    c.workdir = os.path.join(work, "pipeline")
    c.model.init_from = orbax_dir
    result = run_stage(c)

    console.rule("[bold]3/3  Export the GRPO policy to HF safetensors and generate with the built-in engine")
    grpo_params = os.path.join(c.workdir, "grpo", "params")
    generated = export_and_generate(grpo_params, os.path.join(work, "grpo_hf"))
    console.print(f"reply: {generated['text']!r}")

    with open(result["report"]["md"]) as f:
        console.print(Markdown(f.read()))
    console.print(f"outputs under {work}; report {result['report']['md']} and {result['report']['png']}")
    summary = {"stages": result["stages"], "parity": parity, "generate": generated,
               "steps_run_s": result["steps_run"], "report": result["report"], "workdir": work,
               "wall_s": round(time.perf_counter() - t_start, 1)}
    print(json.dumps(summary, default=str))
    return summary


if __name__ == "__main__":
    main()
