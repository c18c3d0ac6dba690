"""The stage runners, and the CLI's stage table: the only modules that read the run's ConfigDict.

Each stage is a `run(config) -> dict` function; `tau2jax.train` prints the dict as the last stdout
line. Below this room, library modules take plain arguments or config sections (`builders` turns a
config into the pieces they take). `run_stage` (`stages/runner.py`) runs the stage a config names.
"""

from __future__ import annotations

from tau2jax.stages.runner import run_stage

__all__ = ["run_stage"]
