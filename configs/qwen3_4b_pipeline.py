"""The recipe end to end for Qwen3-4B-Instruct-2507 on one 8×H100 node with SGLang: gold demos → SFT →
RFT → SFT → GRPO, with the recipe's eval (test split, 4 samples, T 0.8, top_k 20) of the base model
and after each training stage, then the performance table ({workdir}/report.{md,json,png}).

    python -m checkpoints_tools.hf_to_orbax --hf-dir /models/Qwen3-4B-Instruct-2507 --out /ckpt/qwen3_4b
    SGLANG_PYTHON=/opt/sglang/bin/python POLICY_MODEL=/models/Qwen3-4B-Instruct-2507 \
    USER_MODEL=/models/Qwen3-4B-Instruct-2507 launch/gpu_node.sh \
      --config configs/qwen3_4b_pipeline.py \
      --config.model.hf_dir=/models/Qwen3-4B-Instruct-2507 --config.model.init_from=/ckpt/qwen3_4b

The policy server (:30000) is re-pointed at each stage's weights (published as HF safetensors under
{workdir}/served/, loaded with update_weights_from_disk); GRPO syncs its own. Rerunning the command
resumes: finished steps are reused, a changed setting of one is refused by name. Each stage's
settings are its own config file's (configs/qwen3_4b_{sft,rft,grpo}.py, configs/eval.py), except
the sections every step shares (model, tau2, user, engine, reward), which come from
qwen3_4b_grpo.py: RFT in the pipeline scores partial rewards with GRPO's `recipe_code` preset,
where qwen3_4b_rft.py alone uses the default weights. Not run end to end yet (no SGLang on the
machines we have); the recipe reports ~2 h of GRPO and ~2 h per eval on its hardware.
"""

import ml_collections

from configs import eval as eval_config
from configs import qwen3_4b_grpo, qwen3_4b_rft, qwen3_4b_sft


def _sections(config, *names) -> ml_collections.ConfigDict:
    """Those sections of a stage's own config file, as pipeline overrides."""
    return ml_collections.ConfigDict({n: config[n].to_dict() for n in names})


def get_config(arg: str = ""):
    c = qwen3_4b_grpo.get_config()  # model, mesh, tau2 domains, LLM user, SGLang engine, rewards
    c.stage = "pipeline"
    c.workdir = "runs/qwen3_4b_pipeline"
    c.tau2.split = "test"  # the evals; demos, RFT and GRPO take the train split

    c.pipeline.demos = ml_collections.ConfigDict({
        "user": {"kind": "scripted"},  # offline; performs telecom's user-side actions
    })
    sft = qwen3_4b_sft.get_config()
    c.pipeline.sft = _sections(sft, "data", "train", "optim")
    c.pipeline.sft_rft = _sections(sft, "data", "train", "optim")  # 2 epochs of kept episodes + demos
    c.pipeline.rft = _sections(qwen3_4b_rft.get_config(), "rft")
    grpo = qwen3_4b_grpo.get_config()
    c.pipeline.grpo = _sections(grpo, "rl", "train", "optim")
    ev = eval_config.get_config()
    c.pipeline.eval = ml_collections.ConfigDict({
        "eval": ev.eval.to_dict(),
        "engine": {"max_new_tokens": ev.engine.max_new_tokens},  # 1200 per turn at eval, 4096 in training
    })
    if arg:
        raise ValueError(f"configs/qwen3_4b_pipeline.py takes no arg, got {arg!r}")
    return c
