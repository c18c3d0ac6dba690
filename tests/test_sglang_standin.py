"""launch/sglang_standin: gpu_node.sh's $SGLANG_PYTHON for the CPU rehearsal. It reports a version,
refuses flags SGLang's launcher would not get from gpu_node.sh, and serves an HF model dir (the
rehearsal's fixture) over the endpoints tau2jax calls."""

import importlib.util
import os
import subprocess
import sys
import time

import httpx
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STANDIN = os.path.join(ROOT, "launch", "sglang_standin", "python")
_spec = importlib.util.spec_from_file_location("rehearsal", os.path.join(ROOT, "launch", "rehearsal.py"))
rehearsal = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(rehearsal)
ENV = {**os.environ, "STANDIN_PYTHON": sys.executable, "JAX_PLATFORMS": "cpu"}


def test_version_and_unknown_flags():
    out = subprocess.run([STANDIN, "-c", "import sglang; print(sglang.__version__)"], capture_output=True,
                         text=True, env={**ENV, "SGLANG_STANDIN_VERSION": "0.5.23"}, timeout=30)
    assert out.stdout.strip() == "0.5.23"
    bad = subprocess.run([STANDIN, "-m", "sglang.launch_server", "--model-path", "x", "--no-such-flag"],
                         capture_output=True, text=True, env=ENV, timeout=60)
    assert bad.returncode == 2 and "unrecognized arguments: --no-such-flag" in bad.stderr
    det = subprocess.run([STANDIN, "-m", "sglang.launch_server", "--model-path", "x",
                          "--enable-deterministic-inference"], capture_output=True, text=True, env=ENV, timeout=60)
    assert det.returncode == 2 and "--attention-backend" in det.stderr  # SGLang 0.5.3 server_args.py


@pytest.mark.slow
def test_serves_an_hf_dir_like_sglang(tmp_path):
    rehearsal.fixture(str(tmp_path))
    port = rehearsal.free_ports(1)[0]
    proc = subprocess.Popen([STANDIN, "-m", "sglang.launch_server", "--model-path", str(tmp_path / "hf"),
                             "--served-model-name", "policy", "--host", "127.0.0.1", "--port", str(port),
                             "--dp-size", "1", "--tp-size", "1", "--dtype", "bfloat16", "--context-length", "4096",
                             "--mem-fraction-static", "0.85", "--weight-version", "0"], env=ENV)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 240
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=60).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.time() < deadline, "stand-in did not come up"
            time.sleep(1)
        g = httpx.post(f"{url}/generate", json={"input_ids": [1, 2, 3], "return_logprob": True,
                                                "sampling_params": {"max_new_tokens": 3, "temperature": 0}},
                       timeout=120).json()
        assert g["meta_info"]["weight_version"] == "0" and len(g["meta_info"]["output_token_logprobs"]) <= 3
        chat = httpx.post(f"{url}/v1/chat/completions", json={"model": "policy", "messages": [
            {"role": "user", "content": "hi"}]}, timeout=120).json()
        assert chat["choices"][0]["message"]["role"] == "assistant"
        assert chat["usage"]["completion_tokens"] <= 64  # SGLANG_STANDIN_MAX_TOKENS's default
        card = httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]
        assert (card["id"], card["max_model_len"]) == ("policy", 4096)  # --served-model-name, --context-length
        t0 = time.time()
        assert httpx.get(f"{url}/health", timeout=60).status_code == 200
        assert time.time() - t0 >= 1.0  # SGLang's /health: a generation, polled each second
    finally:
        proc.terminate()
        proc.wait(timeout=30)
