"""The pipeline's steps and the config each one runs with (`step_config`): what the `pipeline`
stage walks and what `preflight` checks before it starts (the learner steps' meshes and memory),
so preflight reads the steps without importing the stage that runs them."""

from __future__ import annotations

import os

import ml_collections

from tau2jax import config as config_lib

# (step, stage it runs, pipeline.<kind> overrides it takes)
STEPS = (
    ("demos", "demos", "demos"),
    ("eval_base", "eval", "eval"),
    ("sft", "sft", "sft"),
    ("eval_sft", "eval", "eval"),
    ("rft", "rft", "rft"),
    ("sft_rft", "sft", "sft_rft"),
    ("eval_rft", "eval", "eval"),
    ("grpo", "grpo", "grpo"),
    ("eval_grpo", "eval", "eval"),
)
# eval step -> (the policy's name in reports, the step whose params it evaluates; None = model.init_from)
EVALS = {"eval_base": ("base", None), "eval_sft": ("sft", "sft"), "eval_rft": ("rft", "sft_rft"),
         "eval_grpo": ("grpo", "grpo")}
# The demos step plays the gold agent, whatever engine the pipeline's policy runs on.
DEMOS_ENGINE = ml_collections.ConfigDict({"engine": {"kind": "gold"}})


def apply_overrides(config, overrides, where: str) -> None:
    """Set every leaf of `overrides` (a nested ConfigDict) in `config`; an unknown key or a value
    of the wrong type is a ConfigError naming `where.key`."""
    for key, value in overrides.items():
        if key not in config:
            new = config_lib.moved_key(f"{where}.{key}")
            raise config_lib.ConfigError(f"config.{where}.{key}: no such config field"
                                         + (f"; it moved to config.{new}" if new else ""))
        if isinstance(value, ml_collections.ConfigDict):
            if not isinstance(config[key], ml_collections.ConfigDict):
                raise config_lib.ConfigError(f"config.{where}.{key}: {key!r} is a value, not a section")
            apply_overrides(config[key], value, f"{where}.{key}")
            continue
        try:
            config[key] = value
        except TypeError as e:
            raise config_lib.ConfigError(f"config.{where}.{key}: {e}") from None


def step_config(config, step: str, inputs: dict) -> ml_collections.ConfigDict:
    """The config one step runs with: the pipeline's, its overrides, then its inputs.

    inputs: what finished steps produced — "demo_files" (list), "params" (step -> params dir),
    "rft_file"; only those this step reads need to be there.
    """
    stage, kind = next((st, k) for s, st, k in STEPS if s == step)
    c = ml_collections.ConfigDict(config.to_dict())  # a deep, unlocked copy
    c.stage = stage
    c.workdir = os.path.join(config.workdir, step)
    apply_overrides(c, config.pipeline[kind], f"pipeline.{kind}")
    if stage in ("demos", "rft", "grpo"):
        c.tau2.split = "train"  # these stages make training data; the evals keep the configured split
        if config.pipeline.train_task_ids:
            c.tau2.task_ids = config.pipeline.train_task_ids
    if step == "demos":
        apply_overrides(c, DEMOS_ENGINE, "the demos step")
    elif step == "sft":
        c.data.train_files = ",".join(inputs["demo_files"])
    elif step == "rft":
        c.engine.checkpoint = inputs["params"]["sft"]
        c.rft.mix_files = ",".join(inputs["demo_files"]) if config.pipeline.rft_mix_demos else ""
    elif step == "sft_rft":
        c.model.init_from = inputs["params"]["sft"]
        c.data.train_files = inputs["rft_file"]
    elif step == "grpo":
        c.model.init_from = inputs["params"]["sft_rft"]
        c.rl.loss.reference = ""  # the KL reference is the init: the RFT policy
    elif stage == "eval":
        source = EVALS[step][1]
        c.engine.checkpoint = inputs["params"][source] if source else config.model.init_from
    c.lock()
    return c
