"""The preflight refuses, in seconds and before any step output exists, what would fail hours into a
run: a mesh that does not fit the devices, a learner too big for them, an unreachable server, a
served model directory SGLang cannot launch from."""

import os
import time

import pytest

from tau2jax.config import ConfigError, default_config
from tau2jax.stages import run_stage


def _pipeline(tmp_path, **sections):
    from configs import qwen3_4b_pipeline

    c = qwen3_4b_pipeline.get_config()
    c.workdir = str(tmp_path / "run")
    c.model.init_from = ""  # model.name qwen3_4b: no weights needed to size it
    for dotted, value in sections.items():
        section, key = dotted.split("__")
        c[section][key] = value
    return c


def _refused(config, match):
    t = time.perf_counter()
    with pytest.raises(ConfigError, match=match):
        run_stage(config)
    assert time.perf_counter() - t < 30
    assert not os.path.exists(config.workdir)  # nothing written


def test_a_mesh_that_does_not_fit_is_refused_before_the_first_step(tmp_path):
    """The 4B pipeline with a fixed 3-way FSDP mesh on the 8 test devices: refused at once (the first
    wave ran demos and the base eval, then died at sft)."""
    _refused(_pipeline(tmp_path, mesh__fsdp=3, engine__kind="builtin", user__kind="scripted"),
             r"mesh.fsdp=3.*8 devices.*sft step")


def test_a_learner_too_big_for_the_devices_is_refused(tmp_path):
    """Qwen3-4B's fp32 masters + Adam + gradients on 8 CPU devices sharing this host's RAM."""
    _refused(_pipeline(tmp_path, engine__kind="builtin", user__kind="scripted"), r"GiB per device.*mesh.fsdp")


def test_an_unreachable_policy_server_is_refused(tmp_path):
    c = default_config()
    c.stage, c.workdir, c.engine.kind = "eval", str(tmp_path / "run"), "sglang"
    c.engine.url = "http://127.0.0.1:9"  # nothing listens there
    _refused(c, r"config.engine.url: policy server http://127.0.0.1:9 unreachable")


def test_an_unreachable_user_simulator_is_refused(tmp_path):
    c = default_config()
    c.stage, c.workdir, c.engine.kind, c.engine.checkpoint = "eval", str(tmp_path / "run"), "gold", ""
    c.user.kind, c.user.base_url = "llm", "http://127.0.0.1:9/v1"
    _refused(c, r"config.user.base_url: user simulator http://127.0.0.1:9/v1 unreachable")


def test_a_served_directory_without_tokenizer_is_refused(tmp_path):
    from tau2jax.data.tokenizer import load_tokenizer
    from tau2jax.inference.engine import ScriptedEngine
    from tau2jax.inference.server import RunningServer, Server, create_app

    served = tmp_path / "served"
    served.mkdir()
    (served / "config.json").write_text("{}")
    (served / "model.safetensors").write_bytes(b"")
    tok = load_tokenizer()
    with RunningServer(create_app(Server(ScriptedEngine(tok, []), tok, model_path=str(served)))) as running:
        c = default_config()
        c.stage, c.workdir, c.engine.kind, c.engine.url = "rft", str(tmp_path / "run"), "sglang", running.url
        c.tau2.split = "train"
        _refused(c, r"serves .*served, which lacks tokenizer.json.*orbax_to_hf")


def test_one_unreachable_user_simulator_of_several_is_refused_by_name(tmp_path):
    from test_llm_user import FakeChatServer  # tests/ is on sys.path under pytest

    with FakeChatServer(lambda body, i: ("ok", "hi")) as up:
        c = default_config()
        c.stage, c.workdir, c.engine.kind, c.engine.checkpoint = "eval", str(tmp_path / "run"), "gold", ""
        c.user.kind, c.user.base_url = "llm", f"{up.base_url},http://127.0.0.1:9/v1"
        _refused(c, r"config.user.base_url: user simulator http://127.0.0.1:9/v1 unreachable")
        c.user.base_url = f"http://127.0.0.1:9/v1, {up.base_url}"  # first or not
        _refused(c, r"config.user.base_url: user simulator http://127.0.0.1:9/v1 unreachable")


def test_every_listed_user_simulator_is_checked(tmp_path):
    from test_llm_user import FakeChatServer

    from tau2jax.stages import preflight

    with FakeChatServer(lambda body, i: ("ok", "hi")) as a, FakeChatServer(lambda body, i: ("ok", "hi")) as b:
        c = default_config()
        c.user.kind, c.user.base_url = "llm", f"{a.base_url},{b.base_url}/"
        preflight.check_user_server(c)  # both answer /models


def test_the_preflight_sends_the_servers_key(tmp_path, monkeypatch):
    """Servers started with --api-key (gpu_node.sh with TAU2JAX_API_KEY) answer 401 without it: the
    preflight asks with the key the clients use, and a wrong key is named as such."""
    from tau2jax.data.tokenizer import load_tokenizer
    from tau2jax.inference.engine import ScriptedEngine
    from tau2jax.inference.server import RunningServer, Server, create_app
    from tau2jax.stages import preflight

    tok = load_tokenizer()
    with RunningServer(create_app(Server(ScriptedEngine(tok, []), tok, api_key="s3cret"))) as running:
        c = default_config()
        c.engine.kind, c.engine.url, c.engine.api_key = "sglang", running.url, ""
        c.user.kind, c.user.base_url = "llm", f"{running.url}/v1"
        monkeypatch.setenv("TAU2JAX_API_KEY", "s3cret")
        c.user.api_key = "s3cret"
        preflight.check_policy_server(c)
        preflight.check_user_server(c)
        c.engine.api_key, c.user.api_key = "wrong", "wrong"
        with pytest.raises(ConfigError, match=r"config.engine.api_key: .* refused the key \(401\)"):
            preflight.check_policy_server(c)
        with pytest.raises(ConfigError, match=r"config.user.api_key: .* refused the key \(401\)"):
            preflight.check_user_server(c)
