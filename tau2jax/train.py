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

from tau2jax import config as config_lib
from tau2jax.data.sft_data import DataError
from tau2jax.parallel import distributed
from tau2jax.stages import run_stage

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
    except (config_lib.ConfigError, DataError, distributed.DistributedConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(summary, sort_keys=True), flush=True)


if __name__ == "__main__":
    try:  # before the flags parse: an old key would end there in ml_collections' AttributeError
        config_lib.check_override_keys(sys.argv[1:])
    except config_lib.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    _CONFIG = config_flags.DEFINE_config_file("config", None, "Python config file returning a ConfigDict.",
                                              lock_config=True)
    app.run(main)
