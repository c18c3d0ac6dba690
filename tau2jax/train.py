"""The one CLI: `python -m tau2jax.train --config configs/FILE.py[:arg] --config.key=value`.

`config.stage` picks what runs (`tau2jax.stages`: each stage is a `run(config) -> dict` function); the
dict is printed as the last stdout line (one JSON object) so scripts and tests can read the outcome.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # litellm fetches prices at import otherwise

from absl import app, logging
from ml_collections import config_flags

from tau2jax import cli
from tau2jax import config as config_lib
from tau2jax.data.sft_data import DataError
from tau2jax.parallel import distributed
from tau2jax.stages import run_stage
from tau2jax.weights.orbax_params import CheckpointFormatError

_CONFIG = None  # the --config flag, defined only when this module is the program


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    # Orbax and grain log every save at INFO; our progress bar and metrics say what matters.
    logging.set_verbosity(logging.WARNING)
    if _CONFIG.value is None:
        raise app.UsageError("--config is required, e.g. --config configs/tiny_sft.py")
    try:
        distributed.initialize()  # multi-process runs join here, before anything touches devices
        summary = run_stage(_CONFIG.value)
    except EXPECTED as e:
        fail(e)
    print(json.dumps(summary, sort_keys=True), flush=True)


# Bad input, not bugs: one line `error: <setting or path>: <problem>; <fix>` and exit 2. Anything
# else is a bug and keeps its traceback.
EXPECTED = (config_lib.ConfigError, DataError, distributed.DistributedConfigError, CheckpointFormatError)


def fail(e: Exception) -> None:
    sys.exit(cli.bad_input(e))


def precheck(argv) -> None:
    """Before the flags parse (ml_collections ends a missing file or an unknown key in a traceback):
    the config file exists and every `--config.<key>=` override names one of its keys."""
    config_lib.check_override_keys(argv)  # moved keys, named even without a config file
    spec = config_lib.config_file_arg(argv)
    if spec is not None:
        config_lib.check_override_keys(argv, config_lib.load_config_file(spec))


if __name__ == "__main__":
    try:
        precheck(sys.argv[1:])
    except EXPECTED as e:
        fail(e)
    _CONFIG = config_flags.DEFINE_config_file("config", None, "Python config file returning a ConfigDict.",
                                              lock_config=True)
    app.run(main)
