"""The demo's pipeline (`tau2jax.demo_config.tiny_pipeline_config`, where its settings are explained):
the whole recipe on CPU with the `tiny` Qwen3 on tau2 mock.

    python -m tau2jax.demo                     # converts a random tiny HF model, then runs this
    python -m tau2jax.train --config configs/tiny_pipeline.py --config.model.init_from=ORBAX_DIR
"""

from tau2jax.demo_config import tiny_pipeline_config


def get_config(arg: str = ""):
    if arg:
        raise ValueError(f"configs/tiny_pipeline.py takes no arg, got {arg!r}")
    return tiny_pipeline_config()
