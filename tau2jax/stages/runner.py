"""`run_stage`: validate a run's config, preflight it, then run its stage (the CLI's and the
pipeline's way to run one stage; `tau2jax.stages.run_stage` is this function)."""

from __future__ import annotations

import importlib

from tau2jax import config as config_lib
from tau2jax.stages import preflight


def run_stage(config) -> dict:
    """Validates the config, checks what would fail later (`preflight`: mesh, memory, servers, disk),
    then runs `tau2jax.stages.<config.stage>.run` (one module per name in `config.STAGES`, imported
    lazily so `sft` never pays for tau2/litellm imports)."""
    config_lib.validate(config)
    preflight.check(config)
    return importlib.import_module(f"tau2jax.stages.{config.stage}").run(config)
