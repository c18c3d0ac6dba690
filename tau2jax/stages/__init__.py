"""The stage runners, and the CLI's stage table: the only modules that read the run's ConfigDict.

Each stage is a `run(config) -> dict` function; `tau2jax.train` prints the dict as the last stdout
line. Below this room, library modules take plain arguments or config sections (`builders` turns a
config into the pieces they take).
"""

from __future__ import annotations

import importlib

from tau2jax import config as config_lib


def run_stage(config) -> dict:
    """Validates the config, checks what would fail later (`preflight`: mesh, memory, servers, disk),
    then runs `tau2jax.stages.<config.stage>.run` (one module per name in `config.STAGES`, imported
    lazily so `sft` never pays for tau2/litellm imports)."""
    from tau2jax.stages import preflight

    config_lib.validate(config)
    preflight.check(config)
    return importlib.import_module(f"tau2jax.stages.{config.stage}").run(config)
