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


@pytest.fixture(autouse=True)
def _tau2_points_back_at_its_data():
    """A test that points tau2 at a generated data dir (a task family) must not leave it there: the
    next test reading airline or retail would find no tasks (CI's stop 39 lost 33 tests that way).
    Restores the dir in use before the test, so a module-scoped family fixture holds for its module."""
    from tau2jax.env import tau2_env

    before = tau2_env.init_tau2()
    yield
    tau2_env.init_tau2(str(before))
