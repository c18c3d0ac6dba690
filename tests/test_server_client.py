"""The engine HTTP server + SGLang client: the same engine cases in-process and over HTTP, SGLang's
wire format, batching, retries, a real litellm call for the user simulator, and weight updates."""

import json
import math
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import jax
import numpy as np
import pytest

from tau2jax.weights import mapping, orbax_params
from tau2jax.config import default_config
from tau2jax.data.chat import ChatFormat
from tau2jax.data.tokenizer import load_tokenizer
from tau2jax.models.configs import get_model_config
from tau2jax.inference.engine import GenerateResult, SamplingParams, ScriptedEngine
from tau2jax.inference.jax_engine import JaxEngine
from tau2jax.inference.server import RunningServer, Server, create_app, wait_healthy
from tau2jax.inference.sglang_client import EngineRequestError, EngineUnavailableError, SGLangEngine
from tau2jax.inference.weight_sync import publish, sync_engine, version_dir
from tau2jax.stages.builders import sglang_engine

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = get_model_config("tiny", vocab_size=512)
ENGINE_KW = dict(max_seq_len=128, max_batch=4)
PROMPTS = [[1, 2, 3, 4, 5], [7, 8, 9]]
GREEDY = SamplingParams(temperature=0.0, max_new_tokens=12)
SAMPLED = SamplingParams(temperature=0.8, top_k=50, top_p=0.9, seed=7, max_new_tokens=12)


def random_params(seed):
    """Norms 1 + 0.1·N(0,1), matrices 0.1·N(0,1): O(1) logits, so greedy picks are not near-ties."""
    rng = np.random.default_rng(seed)

    def leaf(path, shape):
        noise = rng.standard_normal(shape, np.float32)
        return 1.0 + 0.1 * noise if "norm" in jax.tree_util.keystr(path) else 0.1 * noise

    return jax.tree_util.tree_map_with_path(leaf, mapping.param_shapes(CFG), is_leaf=lambda x: isinstance(x, tuple))


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ckpt") / "tiny")
    orbax_params.save_params(out, random_params(0), CFG)
    return out


@pytest.fixture(scope="module")
def inprocess(ckpt, tok):
    engine = JaxEngine.from_checkpoint(ckpt, tokenizer=tok, **ENGINE_KW)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def http_client(ckpt, tok):
    """SGLangEngine -> our server -> its own JaxEngine (same checkpoint, separate instance)."""
    engine = JaxEngine.from_checkpoint(ckpt, tokenizer=tok, **ENGINE_KW)
    with RunningServer(create_app(Server(engine, tok, model_path=ckpt, max_batch=4))) as running:
        client = SGLangEngine(running.url, concurrency=4, timeout_s=60)
        yield client
        client.close()
    engine.close()


@pytest.fixture(params=["inprocess", "http"])
def engine(request):
    return request.getfixturevalue("inprocess" if request.param == "inprocess" else "http_client")


# -- the same cases on both paths ------------------------------------------------------------------


def test_greedy_is_deterministic_and_batch_invariant(engine):
    a = engine.generate([PROMPTS[0]], GREEDY)[0]
    b = engine.generate([PROMPTS[0]], GREEDY)[0]
    assert a.output_ids == b.output_ids and a.logprobs == b.logprobs
    assert len(a.output_ids) == 12 and a.finish_reason == "length" and a.stop_reason is None
    both = engine.generate(PROMPTS, GREEDY)
    assert both[0].output_ids == a.output_ids
    np.testing.assert_allclose(both[0].logprobs, a.logprobs, atol=1e-5)
    assert both[1].output_ids != a.output_ids


def test_prompt_longer_than_the_context_is_a_context_length_error(engine):
    """The episode runner ends an episode on this error instead of retrying it as infrastructure."""
    from tau2jax.inference.engine import ContextLengthError

    with pytest.raises(ContextLengthError, match="context length"):
        engine.generate([[1] * (ENGINE_KW["max_seq_len"] + 1)], GREEDY)


def test_logprobs_present_and_length_finish(engine):
    [r] = engine.generate([PROMPTS[1]], SamplingParams(temperature=0.8, seed=3, max_new_tokens=7))
    assert r.finish_reason == "length" and len(r.output_ids) == len(r.logprobs) == 7
    assert all(math.isfinite(lp) and lp <= 0.0 for lp in r.logprobs)
    assert r.policy_version == 0
    [again] = engine.generate([PROMPTS[1]], SamplingParams(temperature=0.8, seed=3, max_new_tokens=7))
    assert again.output_ids == r.output_ids  # a seed fixes the sample


def test_stop_token_is_kept_and_ends_generation(engine):
    [full] = engine.generate([PROMPTS[0]], GREEDY)
    stop = full.output_ids[3]
    j = full.output_ids.index(stop)
    [r] = engine.generate([PROMPTS[0]], SamplingParams(temperature=0.0, max_new_tokens=12, stop_token_ids=(stop, 511)))
    assert r.output_ids == full.output_ids[: j + 1]
    assert (r.finish_reason, r.stop_reason) == ("stop", stop)
    np.testing.assert_allclose(r.logprobs, full.logprobs[: j + 1], atol=1e-5)


def test_stop_string_ends_at_the_completing_token(engine, tok):
    [full] = engine.generate([PROMPTS[0]], GREEDY)
    ids = full.output_ids
    piece = next(p for i in range(2, len(ids)) if (p := tok.decode([ids[i]]).strip()) and "\ufffd" not in p)
    k = next(k for k in range(1, len(ids) + 1) if piece in tok.decode(ids[:k]))
    [r] = engine.generate([PROMPTS[0]], SamplingParams(temperature=0.0, max_new_tokens=12, stop_strings=(piece,)))
    assert r.output_ids == ids[:k]
    assert (r.finish_reason, r.stop_reason) == ("stop", piece)


def test_inprocess_and_http_agree(inprocess, http_client):
    for sp in (GREEDY, SAMPLED):
        local = inprocess.generate(PROMPTS, sp)
        remote = http_client.generate(PROMPTS, sp)
        for a, b in zip(local, remote, strict=True):
            assert a.output_ids == b.output_ids and a.finish_reason == b.finish_reason
            np.testing.assert_allclose(a.logprobs, b.logprobs, rtol=0, atol=1e-5)


# -- weight updates ------------------------------------------------------------------------------------


def test_update_weights_from_disk_equals_fresh_load(ckpt, tok, tmp_path):
    root = str(tmp_path / "publish")
    publish(random_params(1), CFG, root, 1, dtype=None)
    engine = JaxEngine.from_checkpoint(ckpt, tokenizer=tok, **ENGINE_KW)
    with RunningServer(create_app(Server(engine, tok, model_path=ckpt))) as running:
        client = SGLangEngine(running.url)
        before = client.generate([PROMPTS[0]], GREEDY)[0]
        with pytest.raises(EngineRequestError, match="could not load|rejected"):
            client.update_weights(str(tmp_path / "missing"), 5)
        assert client.policy_version == 0 and client.model_info()["weight_version"] == "0"

        assert sync_engine(client, root) == 1
        after = client.generate([PROMPTS[0]], GREEDY)[0]
        info = client.model_info()
        client.close()
    engine.close()
    fresh = JaxEngine.from_hf_dir(version_dir(root, 1), tokenizer=tok, **ENGINE_KW)
    [expected] = fresh.generate([PROMPTS[0]], GREEDY)
    fresh.close()
    assert after.output_ids == expected.output_ids != before.output_ids
    np.testing.assert_allclose(after.logprobs, expected.logprobs, rtol=0, atol=1e-5)
    assert after.policy_version == client.policy_version == 1
    assert info["weight_version"] == "1" and info["model_path"] == version_dir(root, 1)


# -- server behaviour with controlled engines ---------------------------------------------------------------


def test_generate_speaks_sglang_format(tok):
    engine = ScriptedEngine(tok, ["Hi there<|im_end|>never sent", "one two three four", "x<|im_end|>y"])
    with RunningServer(create_app(Server(engine, tok, model_path="scripted"))) as running:
        r = httpx.post(f"{running.url}/generate", json={
            "input_ids": [1, 2, 3], "sampling_params": {"max_new_tokens": 16, "temperature": 0},
            "return_logprob": True}).json()
        ids = tok.encode("Hi there<|im_end|>")
        assert r["text"] == "Hi there" and r["output_ids"] == ids  # the stop token: in ids, not text
        meta = r["meta_info"]
        assert meta["finish_reason"] == {"type": "stop", "matched": tok.im_end_id}  # EOS stops by default
        assert meta["output_token_logprobs"] == [[0.0, t, None] for t in ids]
        assert (meta["prompt_tokens"], meta["completion_tokens"], meta["weight_version"]) == (3, len(ids), "0")

        batch = httpx.post(f"{running.url}/generate", json={
            "input_ids": [[1], [2, 3]],
            "sampling_params": [{"max_new_tokens": 2}, {"max_new_tokens": 16, "ignore_eos": True}]}).json()
        assert batch[0]["meta_info"]["finish_reason"] == {"type": "length", "length": 2}
        assert batch[1]["output_ids"] == tok.encode("x<|im_end|>y")  # ignore_eos: <|im_end|> did not stop it
        assert batch[1]["meta_info"]["finish_reason"]["type"] == "length"
        assert "output_token_logprobs" not in batch[0]["meta_info"]

        bad = httpx.post(f"{running.url}/generate",
                         json={"input_ids": [1], "sampling_params": {"frequency_penalty": 1}})
        assert bad.status_code == 400 and "frequency_penalty" in bad.json()["error"]["message"]
        bad = httpx.post(f"{running.url}/generate", json={"input_ids": [10**6]})
        assert bad.status_code == 400 and "vocabulary" in bad.json()["error"]["message"]
        info = httpx.get(f"{running.url}/get_model_info").json()
        assert info["is_generation"] is True and info["model_path"] == "scripted"


class GatedEcho:
    """Answers each prompt with its reverse; the first generate call blocks until `release`, so
    requests sent meanwhile pile up in the server's queue."""

    policy_version = 0

    def __init__(self):
        self.calls: list[int] = []
        self.release = threading.Event()

    def generate(self, input_ids, params):
        self.calls.append(len(input_ids))
        assert self.release.wait(30)
        return [GenerateResult(p[::-1], [-0.5] * len(p), "length", 0) for p in input_ids]


def test_concurrent_requests_share_engine_calls(tok):
    engine, n = GatedEcho(), 8
    server = Server(engine, tok, max_batch=16, batch_window_s=0.0)
    with RunningServer(create_app(server)) as running:
        client = SGLangEngine(running.url, concurrency=n)
        prompts = [[i + 1, i + 2, i + 3] for i in range(n)]
        with ThreadPoolExecutor(n) as pool:
            futures = [pool.submit(client.generate, [p], SamplingParams()) for p in prompts]
            # poll (bounded) until all n prompts are in the engine's first call or queued behind it
            deadline = time.monotonic() + 30
            while not (engine.calls and engine.calls[0] + server.batcher.pending() == n):
                assert time.monotonic() < deadline, (engine.calls, server.batcher.pending())
                time.sleep(0.01)
            engine.release.set()
            results = [f.result()[0] for f in futures]
        client.close()
    assert [r.output_ids for r in results] == [p[::-1] for p in prompts]
    assert sum(engine.calls) == n and len(engine.calls) <= 2, engine.calls


def test_client_retries_server_errors_but_not_bad_requests(tok):
    engine = ScriptedEngine(tok, [RuntimeError("injected engine crash"), "ok<|im_end|>"])
    app = create_app(Server(engine, tok))
    hits = []

    @app.middleware("http")
    async def count(request, call_next):
        if request.url.path == "/generate":
            hits.append(request.url.path)
        return await call_next(request)

    with RunningServer(app) as running:
        client = SGLangEngine(running.url, max_retries=2, backoff_s=0.01)
        [r] = client.generate([[1, 2, 3]], SamplingParams(max_new_tokens=8, stop_token_ids=(tok.im_end_id,)))
        assert tok.decode(r.output_ids) == "ok<|im_end|>" and r.finish_reason == "stop"
        assert hits == ["/generate", "/generate"]  # a 500, then the retry
        hits.clear()
        with pytest.raises(EngineRequestError, match="top_p"):
            client.generate([[1]], SamplingParams(top_p=5.0))
        assert hits == ["/generate"]  # a 400 is not retried
        client.close()


def test_client_gives_up_on_unreachable_server():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    client = SGLangEngine(f"http://127.0.0.1:{port}", max_retries=2, backoff_s=0.01)
    assert not client.health()
    with pytest.raises(EngineUnavailableError, match="not ready"):
        client.wait_ready(timeout_s=0.2, interval_s=0.05)
    with pytest.raises(EngineUnavailableError, match="after 3 attempt"):
        client.generate([[1, 2]], SamplingParams())


def test_engine_from_config(tok):
    config = default_config()
    with RunningServer(create_app(Server(ScriptedEngine(tok, ["fine<|im_end|>"]), tok))) as running:
        config.engine.url = running.url
        engine = sglang_engine(config)
        [r] = engine.generate([[1, 2]], SamplingParams(stop_token_ids=(tok.im_end_id,)))
        engine.close()
    assert tok.decode(r.output_ids) == "fine<|im_end|>" and engine.url == running.url


def test_litellm_chat_reply_and_tool_call(tok):
    import litellm

    tools = [{"type": "function", "function": {
        "name": "get_weather", "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>'
    engine = ScriptedEngine(tok, ["Which city?<|im_end|>", call, "It is sunny in Paris.<|im_end|>"])
    chat = ChatFormat(tok)
    with RunningServer(create_app(Server(engine, tok, model_path="scripted"))) as running:
        kw = dict(model="openai/user-sim", api_base=f"{running.url}/v1", api_key="EMPTY", tools=tools,
                  temperature=0.7, num_retries=0)
        msgs = [{"role": "system", "content": "You are a customer."}, {"role": "user", "content": "Weather?"}]
        r1 = litellm.completion(messages=msgs, **kw)
        assert r1.choices[0].message.content == "Which city?" and not r1.choices[0].message.tool_calls
        assert r1.choices[0].finish_reason == "stop"

        msgs += [{"role": "assistant", "content": "Which city?"}, {"role": "user", "content": "Paris"}]
        r2 = litellm.completion(messages=msgs, **kw)
        [tc] = r2.choices[0].message.tool_calls
        assert tc.function.name == "get_weather" and json.loads(tc.function.arguments) == {"city": "Paris"}
        assert tc.id.startswith("call_") and r2.choices[0].finish_reason == "tool_calls"
        assert r2.usage.prompt_tokens == len(engine.prompts[1])
        assert r2.usage.completion_tokens == len(tok.encode(call))

        msgs += [{"role": "assistant", "content": None, "tool_calls": [tc.model_dump()]},
                 {"role": "tool", "tool_call_id": tc.id, "content": '{"sky": "sunny"}'}]
        r3 = litellm.completion(messages=msgs, **kw)
        assert r3.choices[0].message.content == "It is sunny in Paris."
    # the engine saw the Qwen3 chat format with the tools, ready for an assistant turn
    assert engine.prompts[1] == chat.render(msgs[:4], tools, add_generation_prompt=True)[0]
    assert engine.prompts[2] == chat.render(msgs, tools, add_generation_prompt=True)[0]


# -- the CLI -------------------------------------------------------------------------------------------


def test_cli_serves_checkpoint(ckpt, inprocess):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "tau2jax.inference.server", "--checkpoint", ckpt, "--port", str(port),
           "--max-seq-len", "128", "--max-batch", "4", "--log-level", "warning"]
    proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "PYTHONPATH": REPO},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_healthy(f"http://127.0.0.1:{port}", timeout_s=60)
        client = SGLangEngine(f"http://127.0.0.1:{port}")
        [remote] = client.generate([PROMPTS[0]], GREEDY)
        client.close()
    finally:
        proc.terminate()
        out = proc.communicate(timeout=30)[0]
    [local] = inprocess.generate([PROMPTS[0]], GREEDY)
    assert remote.output_ids == local.output_ids, out[-2000:]
