"""Test environment: CPU only, 8 fake devices (sharding tests), no network, quiet tau2/litellm."""

import os

# Must precede any jax import: 8 host devices let sharding tests build (data, fsdp, tensor) meshes.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


import json  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture
def short_sft_jsonl(tmp_path):
    """24 two-turn conversations of a few tokens each: SFT runs that take seconds, not minutes."""
    path = tmp_path / "short.jsonl"
    with open(path, "w") as f:
        for i in range(24):
            msgs = [{"role": "user", "content": f"What is {i} plus {i}?"},
                    {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]
            f.write(json.dumps({"messages": msgs}) + "\n")
    return path
