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


def _start(tmp_path, port, version, *extra):
    proc = subprocess.Popen([STANDIN, "-m", "sglang.launch_server", "--model-path", str(tmp_path / "hf"),
                             "--served-model-name", "policy", "--host", "127.0.0.1", "--port", str(port),
                             "--dp-size", "2", "--tp-size", "1", "--context-length", "1024", *extra],
                            env={**ENV, "SGLANG_STANDIN_VERSION": version}, stdout=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 240
    while True:
        try:
            if httpx.get(f"{url}/get_model_info", timeout=10).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        assert proc.poll() is None and time.time() < deadline, "stand-in did not come up"
        time.sleep(0.5)


def _greedy(url):
    return httpx.post(f"{url}/generate", json={"input_ids": [1, 2, 3], "sampling_params": {
        "max_new_tokens": 4, "temperature": 0}}, timeout=120).json()


@pytest.mark.slow
def test_the_standin_fails_a_racing_weight_update_as_each_sglang_version_does(tmp_path):
    """dp-size 2 runs two replicas; the server says "default" until an update names a version; an
    update landing while a finished request is still in the running batch (sglang#14062) kills
    0.5.3's server and makes 0.5.23 swap the weights, answer 400 and keep the old version; the
    client's push (drain, wait for an idle load report, load, verify, flush) never races."""
    from tau2jax.inference import weight_sync
    from tau2jax.inference.engine import SamplingParams
    from tau2jax.inference.sglang_client import SGLangEngine
    from tau2jax.models import qwen3
    from tau2jax.weights.hf_read import load_hf_params
    import jax

    rehearsal.fixture(str(tmp_path))
    cfg = load_hf_params(str(tmp_path / "hf"))[1]
    root = str(tmp_path / "pub")
    path = weight_sync.publish(qwen3.init_params(cfg, jax.random.key(7)), cfg, root, 1)
    for version in ("0.5.3", "0.5.23"):
        proc, url = _start(tmp_path, rehearsal.free_ports(1)[0], version)
        try:
            assert proc.stdout.readline().startswith("sglang stand-in: dp_size=2 replicas=2")
            assert httpx.get(f"{url}/get_model_info").json()["weight_version"] == "default"
            before = _greedy(url)
            assert before["meta_info"]["weight_version"] == "default"
            update = {"model_path": path, "weight_version": "1"}  # right after the response: the request
            if version == "0.5.3":                                # is still in the scheduler's running batch
                with pytest.raises(httpx.TransportError):  # the scheduler's assert takes the server down
                    httpx.post(f"{url}/update_weights_from_disk", json=update, timeout=60)
                assert proc.wait(timeout=30) != 0
                continue
            r = httpx.post(f"{url}/update_weights_from_disk", json=update, timeout=60)
            assert r.status_code == 400 and "cache was not flushed" in r.json()["message"]
            after = _greedy(url)
            assert after["meta_info"]["weight_version"] == "default"  # no version bump ...
            assert after["output_ids"] != before["output_ids"]  # ... but the new weights serve
            client = SGLangEngine(url)
            client.generate([[1, 2, 3]], SamplingParams(max_new_tokens=2))
            client.update_weights(path, 2)  # the safe push, right after a request
            assert client.served_version() == 2 and proc.poll() is None
            client.close()
        finally:
            if proc.poll() is None:
                proc.terminate()
                proc.wait(timeout=30)
