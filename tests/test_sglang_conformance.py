"""SGLang conformance of our server, our client and the GPU launcher: context-length handling,
abort finishes, JSON content type, weight versions, tool-call shape, per-request validation before
batching, the log-prob field, and the launcher's SGLang version check and DETERMINISTIC switch.
The servers here follow SGLang 0.5.3's rules as the stand-in does (`SGLANG`), except /health as a
generation (tests/test_sglang_rules.py covers it; here it would eat the scripted replies)."""

import dataclasses
import json
import os
import re
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tau2jax.data.tokenizer import load_tokenizer
from tau2jax.inference import server as server_mod
from tau2jax.inference.engine import ContextLengthError, GenerateResult, SamplingParams, ScriptedEngine
from tau2jax.inference.server import Batcher, RunningServer, Server, create_app
from tau2jax.inference.sglang_client import EngineRequestError, SGLangEngine
from tau2jax.inference.sglang_rules import SGLangRules

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCHER = os.path.join(REPO, "launch", "gpu_node.sh")
CONTEXT = 32
SGLANG = dataclasses.replace(SGLangRules.launched("0.5.3", deterministic=False, tool_call_parser="qwen25"),
                             health_generates=False)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("")


class Echo:
    """Returns fixed results (or raises) and records every engine call's prompts."""

    kind = "scripted"

    def __init__(self, result=None, policy_version=0, error=None, max_seq_len=None):
        self.result, self.policy_version, self.error = result, policy_version, error
        self.calls: list[list[list[int]]] = []
        if max_seq_len is not None:
            self.max_seq_len = max_seq_len

    def generate(self, input_ids, params):
        self.calls.append([list(p) for p in input_ids])
        if self.error is not None:
            raise self.error
        return [self.result or GenerateResult(list(p), [-0.5] * len(p), "length", self.policy_version)
                for p in input_ids]


def counting_app(server):
    """The app plus the list of /generate requests that reached it."""
    app, hits = create_app(server), []

    @app.middleware("http")
    async def count(request, call_next):
        if request.url.path == "/generate":
            hits.append(request.url.path)
        return await call_next(request)

    return app, hits


# -- 2. context length ------------------------------------------------------------------------------------


def test_server_applies_sglang_context_checks_and_reports_max_model_len(tok):
    with RunningServer(create_app(Server(Echo(), tok, context_length=CONTEXT, rules=SGLANG))) as running:
        card = httpx.get(f"{running.url}/v1/models").json()["data"][0]
        assert card["max_model_len"] == CONTEXT

        def post(n_prompt, max_new):
            return httpx.post(f"{running.url}/generate", json={
                "input_ids": [5] * n_prompt, "sampling_params": {"max_new_tokens": max_new}})

        assert post(CONTEXT - 11, 10).status_code == 200  # 21 + 10 < 32
        over = post(CONTEXT - 10, 10)  # 22 + 10 = 32: SGLang rejects a total that reaches the context
        assert over.status_code == 400
        assert "exceeds the model's maximum context length of 32 tokens" in over.json()["error"]["message"]
        full = post(CONTEXT, 1)
        assert full.status_code == 400
        assert "longer than the model's context length (32 tokens)" in full.json()["error"]["message"]
        # the scheduler's own check (0.5.3 tp_worker.py max_req_input_len): room for the prompt is context - 6
        assert post(CONTEXT - 7, 1).status_code == 200
        near = post(CONTEXT - 6, 1)
        assert near.status_code == 400
        assert near.json()["error"]["message"].startswith(
            "Input length (26 tokens) exceeds the maximum allowed length (26 tokens)")


def test_client_caps_max_new_tokens_to_the_room_left(tok):
    engine = ScriptedEngine(tok, [list(range(100, 200))])
    with RunningServer(create_app(Server(engine, tok, context_length=CONTEXT, rules=SGLANG))) as running:
        client = SGLangEngine(running.url)
        [r] = client.generate([[7] * 20], SamplingParams(max_new_tokens=100))
        assert client.context_length == CONTEXT
        client.close()
    assert r.output_ids == list(range(100, 111)) and r.finish_reason == "length"  # 20 + 11 = 31 < 32


def test_prompt_that_fills_the_context_raises_without_a_request(tok):
    app, hits = counting_app(Server(Echo(), tok, context_length=CONTEXT, rules=SGLANG))
    with RunningServer(app) as running:
        client = SGLangEngine(running.url)
        with pytest.raises(ContextLengthError, match="context length"):
            client.generate([[1, 2], [7] * (CONTEXT - 1)], SamplingParams(max_new_tokens=4))
        assert hits == []
        with pytest.raises(ContextLengthError):  # SGLang's scheduler refuses >= context - 6 (tp_worker.py)
            client.generate([[7] * (CONTEXT - 6)], SamplingParams(max_new_tokens=1))
        assert hits == []
        client.generate([[7] * (CONTEXT - 7)], SamplingParams(max_new_tokens=4))  # the longest it takes
        assert hits == ["/generate"]
        client.close()


# -- 3. abort finishes ----------------------------------------------------------------------------------


@pytest.mark.parametrize("result, reason", [
    (GenerateResult([5, 6], [-1.0, -1.0], "stop", 0, "NaN happened"), "NaN"),
    (GenerateResult([5], [-1.0], "abort", 0, "out of memory"), "out of memory"),
])
def test_abort_and_nan_finishes_are_aborts(tok, result, reason):
    with RunningServer(create_app(Server(Echo(result), tok, rules=SGLANG))) as running:
        wire = httpx.post(f"{running.url}/generate", json={"input_ids": [1, 2]}).json()["meta_info"]["finish_reason"]
        client = SGLangEngine(running.url)
        [r] = client.generate([[1, 2]], SamplingParams())
        client.close()
    assert wire["type"] in ("stop", "abort")  # what SGLang sends for each case
    assert r.finish_reason == "abort" and reason in r.stop_reason


# -- 4. JSON content type -----------------------------------------------------------------------------------


def test_post_bodies_must_be_json_and_the_client_sends_json(tok):
    engine = ScriptedEngine(tok, ["ok<|im_end|>"])
    with RunningServer(create_app(Server(engine, tok, rules=SGLANG))) as running:
        body = json.dumps({"input_ids": [1, 2]})
        form = httpx.post(f"{running.url}/generate", content=body,
                          headers={"Content-Type": "application/x-www-form-urlencoded"})  # what curl -d sends
        assert form.status_code == 400 and "Content-Type" in form.json()["error"]["message"]
        client = SGLangEngine(running.url)
        [r] = client.generate([[1, 2]], SamplingParams())
        client.close()
    assert tok.decode(r.output_ids) == "ok<|im_end|>" and engine.prompts == [[1, 2]]


def test_curl_examples_send_json():
    for path in ("docs/gpu_serving.md", "launch/gpu_node.sh", "README.md"):
        with open(os.path.join(REPO, path)) as f:
            posts = [line for line in f if re.search(r"\bcurl\b.*\s-d\s", line)]
        assert all("-H 'Content-Type: application/json'" in line for line in posts), (path, posts)


# -- 5. weight version, chat tool calls ---------------------------------------------------------------------


class Updatable(Echo):
    def update_weights(self, params, version=None):
        self.policy_version = self.policy_version + 1 if version is None else int(version)
        return self.policy_version


def test_update_without_weight_version_keeps_the_version(tok, monkeypatch):
    monkeypatch.setattr(server_mod, "load_hf_params", lambda path: ({}, None))
    engine = Updatable(policy_version=3)
    with RunningServer(create_app(Server(engine, tok, rules=SGLANG))) as running:
        def update(**version):
            r = httpx.post(f"{running.url}/update_weights_from_disk", json={"model_path": "/ckpt/v", **version})
            assert r.json()["success"], r.text
            return httpx.get(f"{running.url}/get_model_info").json()["weight_version"]

        assert update() == "3"  # as SGLang: no weight_version, no change
        assert update(weight_version="7") == "7"


def test_chat_tool_calls_have_an_index_and_only_a_stop_finishes_as_tool_calls(tok):
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]
    calls = '<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>\n' \
            '<tool_call>\n{"name": "f", "arguments": {"a": 2}}\n</tool_call>'
    engine = ScriptedEngine(tok, [calls + "<|im_end|>", calls])  # the second is cut by max_tokens
    with RunningServer(create_app(Server(engine, tok, rules=SGLANG))) as running:
        def chat(max_tokens):
            return httpx.post(f"{running.url}/v1/chat/completions", json={
                "messages": [{"role": "user", "content": "go"}], "tools": tools,
                "max_tokens": max_tokens}).json()["choices"][0]

        stopped, cut = chat(200), chat(len(tok.encode(calls)))
    assert stopped["finish_reason"] == "tool_calls"
    # 0.5.3's qwen25 detector leaves every non-streamed call's index at -1 (0.5.23 numbers them 0..)
    assert [(c["index"], json.loads(c["function"]["arguments"])) for c in stopped["message"]["tool_calls"]] == [
        (-1, {"a": 1}), (-1, {"a": 2})]
    assert cut["finish_reason"] == "length"


def test_chat_without_max_tokens_takes_the_room_the_context_leaves(tok):
    messages = [{"role": "user", "content": "go"}]
    n_prompt = len(Server(Echo(), tok).chat.render(messages, None, add_generation_prompt=True)[0])
    engine = ScriptedEngine(tok, [list(range(100, 200))])
    # the smallest context that admits the prompt (scheduler: len < context - 6), room context - 2 - len
    # (scheduler.py init_req_max_new_tokens: max_req_len - len - 1, max_req_len = context - 1)
    with RunningServer(create_app(Server(engine, tok, context_length=n_prompt + 7, rules=SGLANG))) as running:
        r = httpx.post(f"{running.url}/v1/chat/completions", json={"messages": messages})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 5 and r.json()["choices"][0]["finish_reason"] == "length"


# -- 6. per-request validation before batching -------------------------------------------------------------


class GatedEcho(Echo):
    """Like JaxEngine, raises for a prompt that does not fit; the first call waits for `release`."""

    def __init__(self):
        super().__init__(max_seq_len=CONTEXT)
        self.release = threading.Event()

    def generate(self, input_ids, params):
        self.calls.append([list(p) for p in input_ids])
        assert self.release.wait(30)
        if any(len(p) >= self.max_seq_len for p in input_ids):
            raise ContextLengthError("prompt longer than the model's context length")
        return [GenerateResult(p[::-1], [-0.5] * len(p), "length", 0) for p in input_ids]


def test_a_bad_request_fails_alone_and_the_others_run_batched(tok):
    engine, n = GatedEcho(), 4
    server = Server(engine, tok, max_batch=16, batch_window_s=0.0, rules=SGLANG)
    with RunningServer(create_app(server)) as running:
        post = lambda ids: httpx.post(f"{running.url}/generate", json={  # noqa: E731
            "input_ids": ids, "sampling_params": {"max_new_tokens": 2}}, timeout=60)
        prompts = [[i + 1, i + 2] for i in range(n)]
        with ThreadPoolExecutor(n + 1) as pool:
            first = pool.submit(post, prompts[0])
            deadline = time.monotonic() + 30
            while not engine.calls:  # the first request holds the engine; the others queue behind it
                assert time.monotonic() < deadline
                time.sleep(0.01)
            rest = [pool.submit(post, p) for p in prompts[1:]]
            bad = pool.submit(post, [9] * CONTEXT).result()
            while server.batcher.pending() < n - 1:
                assert time.monotonic() < deadline, server.batcher.pending()
                time.sleep(0.01)
            engine.release.set()
            good = [first.result()] + [f.result() for f in rest]
    assert bad.status_code == 400 and "context length" in bad.json()["error"]["message"]
    assert [r.json()["output_ids"] for r in good] == [p[::-1] for p in prompts]
    assert [sorted(c) for c in engine.calls] == [prompts[:1], prompts[1:]]  # the bad prompt reached no batch


def test_an_engine_failure_fails_its_batch_once(tok):
    engine = Echo(error=RuntimeError("device lost"))
    batcher = Batcher(engine, max_batch=3, window_s=10.0)  # the batch closes when 3 are queued
    futures = [batcher.submit([i + 1], SamplingParams()) for i in range(3)]
    errors = [f.exception(timeout=30) for f in futures]
    batcher.close()
    assert all(isinstance(e, RuntimeError) and "device lost" in str(e) for e in errors)
    assert len(engine.calls) == 1  # no prompt-by-prompt rerun


def test_a_request_whose_caller_gave_up_does_not_stop_the_batcher(tok):
    """A /health probe past its wait cancels its queued request; the worker that answers it must
    go on serving (set_result on a cancelled future raised and killed the one batcher thread)."""
    batcher = Batcher(Echo(), max_batch=2, window_s=10.0)  # the batch closes when 2 are queued
    gone = batcher.submit([1], SamplingParams())
    assert gone.cancel()
    kept = batcher.submit([2], SamplingParams())
    assert kept.result(timeout=30).output_ids == [2]
    later = batcher.submit([3], SamplingParams())
    batcher.submit([4], SamplingParams())
    assert later.result(timeout=30).output_ids == [3]
    batcher.close()


# -- 7./8. log-probs, versions ----------------------------------------------------------------------------


def test_server_serves_the_behaviour_logprobs_and_client_returns_them(tok):
    result = GenerateResult([5, 6], [-0.7, -1.2], "length", 0, None, sampled_logprobs=[-0.1, -0.2])
    with RunningServer(create_app(Server(Echo(result), tok, rules=SGLANG))) as running:
        meta = httpx.post(f"{running.url}/generate", json={"input_ids": [1], "return_logprob": True}).json()
        client = SGLangEngine(running.url)
        [r] = client.generate([[1]], SamplingParams())
        client.close()
    assert meta["meta_info"]["output_token_logprobs"] == [[-0.7, 5, None], [-1.2, 6, None]]
    assert r.logprobs == [-0.7, -1.2] and r.output_ids == [5, 6]
    assert client.kind == "sglang" and client.url == running.url


def test_a_push_aborts_nothing_and_an_answer_keeps_the_version_that_served_it(tok, tmp_path):
    """A request the server finished on the old weights while a push was under way (SGLang drains
    running requests before its swap) is a normal answer stamped with the old version, never an
    abort: the learner judges its staleness (issue 16, fix 2)."""
    import jax

    from tau2jax.inference import weight_sync
    from tau2jax.models import configs, qwen3

    class Client(SGLangEngine):
        def update_weights(self, path, version):  # the load itself: the server tests' business
            self.policy_version = version

    cfg = configs.get_model_config("toy")
    with RunningServer(create_app(Server(Echo(policy_version=6), tok, rules=SGLANG))) as running:
        client = Client(running.url, policy_version=6, publication=weight_sync.Publication(cfg, str(tmp_path / "w")))
        weight_sync.push(client, qwen3.init_params(cfg, jax.random.key(0)), 7)
        [late] = client.generate([[1, 2]], SamplingParams(max_new_tokens=2))  # served before the swap
        client.close()
    assert (late.finish_reason, late.policy_version) == ("length", 6)


# -- 1. the launcher -------------------------------------------------------------------------------------


def launcher(tmp_path, snippet, version=None, **env):
    """Sources launch/gpu_node.sh (functions only) with a stub python that reports `version` as
    sglang's (or cannot import it), runs `snippet`, returns the CompletedProcess."""
    stub = tmp_path / "python"
    stub.write_text("#!/bin/sh\n" + (f"echo {version}\n" if version else "echo 'No module named sglang' >&2; exit 1\n"))
    stub.chmod(0o755)
    return subprocess.run(["bash", "-c", f'source "{LAUNCHER}"; {snippet}'], capture_output=True, text=True,
                          env={"PATH": os.environ["PATH"], "SGLANG_PYTHON": str(stub), **env}, timeout=30)


def test_launcher_parses():
    assert subprocess.run(["bash", "-n", LAUNCHER]).returncode == 0


@pytest.mark.parametrize("version, ok", [("0.5.2", False), ("0.4.10", False), ("0.5.3", True),
                                         ("0.5.10", True), ("0.5.3.post1", True), ("1.0.0", True), (None, False)])
def test_launcher_requires_sglang_0_5_3(tmp_path, version, ok):
    r = launcher(tmp_path, "check_sglang_version", version)
    assert (r.returncode == 0) == ok, r.stderr
    if not ok:
        assert ">=0.5.3" in r.stderr.replace(" ", "") and "error:" in r.stderr


def test_launcher_deterministic_switch(tmp_path):
    assert launcher(tmp_path, "deterministic_args", "0.5.3").stdout.strip() == ""
    on = launcher(tmp_path, "deterministic_args", "0.5.3", DETERMINISTIC="1")
    # SGLang 0.5.3 refuses the flag without a batch-invariant attention backend (server_args.py)
    assert on.stdout.split() == ["--enable-deterministic-inference", "--attention-backend", "fa3"]
    triton = launcher(tmp_path, "deterministic_args", "0.5.3", DETERMINISTIC="1", ATTENTION_BACKEND="triton")
    assert triton.stdout.split()[-1] == "triton"
    bad = launcher(tmp_path, "deterministic_args", "0.5.3", DETERMINISTIC="yes")
    assert bad.returncode != 0 and "DETERMINISTIC must be 0 or 1" in bad.stderr


# -- issue 33: bad input gets one clear 400 (or exit 2) and changes nothing ----------------------------------


def _chat(url, **body):  # json.dumps: NaN and Infinity as Python (and SGLang's parser) read them
    return httpx.post(f"{url}/v1/chat/completions", headers={"Content-Type": "application/json"},
                      content=json.dumps({"messages": [{"role": "user", "content": "hi"}], **body}))


@pytest.mark.parametrize("tools, words", [
    ("oops", "tools must be a list"),  # once rendered as four tools named o, o, p, s
    ([{"type": "function", "function": {"description": "no name"}}], "tools[0].function.name must be a non-empty"),
    ([{"type": "function"}], "tools[0].function must be an object"),
    (["get_weather"], "tools[0] must be an object"),
    ([{"type": "retrieval", "function": {"name": "f"}}], 'tools[0].type must be "function"'),
])
def test_chat_tools_are_checked_as_sglang_checks_them(tok, tools, words):
    engine = Echo()
    with RunningServer(create_app(Server(engine, tok, rules=SGLANG))) as running:
        r = _chat(running.url, tools=tools)
        ok = _chat(running.url, tools=[{"type": "function", "function": {"name": "f"}}], max_tokens=2)
    assert r.status_code == 400 and words in r.json()["error"]["message"], r.text
    assert "\n" not in r.json()["error"]["message"]
    assert ok.status_code == 200 and len(engine.calls) == 1  # the bad one never reached the engine


@pytest.mark.parametrize("sp, words", [
    ({"temperature": float("nan")}, "temperature must be a non-negative finite number, got nan."),
    ({"temperature": float("inf")}, "temperature must be a non-negative finite number, got inf."),
    ({"temperature": -0.5}, "temperature must be a non-negative finite number, got -0.5."),
    ({"top_p": float("nan")}, "top_p must be in (0, 1], got nan."),
    ({"top_p": 0}, "top_p must be in (0, 1], got 0.0."),
    ({"top_k": 0}, "top_k must be -1 (disable) or at least 1, got 0."),
    ({"max_new_tokens": -1}, "max_new_tokens must be at least 0, got -1."),
    ({"max_new_tokens": float("nan")}, "max_new_tokens must be a finite integer, got nan"),
    ({"temperature": "hot"}, "temperature must be a finite number, got 'hot'"),
])
def test_generate_sampling_values_are_verified_as_sglang_does(tok, sp, words):
    engine = Echo()
    with RunningServer(create_app(Server(engine, tok, rules=SGLANG))) as running:
        # json.dumps writes NaN/Infinity, which SGLang's and our JSON parser both accept
        r = httpx.post(f"{running.url}/generate", content=json.dumps({"input_ids": [1, 2], "sampling_params": sp}),
                       headers={"Content-Type": "application/json"})
        chat = _chat(running.url, **{{"max_new_tokens": "max_tokens"}.get(k, k): v for k, v in sp.items()}) \
            if "max_new_tokens" not in sp else None
    assert r.status_code == 400 and r.json()["error"]["message"] == words, r.text
    if chat is not None:  # the OpenAI endpoint checks the same values
        assert chat.status_code == 400 and chat.json()["error"]["message"] == words, chat.text
    assert engine.calls == []


def test_chat_min_p_and_repetition_penalty_are_verified(tok):
    with RunningServer(create_app(Server(Echo(), tok, rules=SGLANG))) as running:
        r = _chat(running.url, min_p=1.5)
        r2 = _chat(running.url, repetition_penalty=0)
    assert r.status_code == 400 and r.json()["error"]["message"] == "min_p must be in [0, 1], got 1.5."
    assert r2.status_code == 400 and "repetition_penalty must be in (0, 2]" in r2.json()["error"]["message"]


@pytest.mark.parametrize("cmd", [
    ["-m", "tau2jax.inference.server", "--checkpoint", "/nonexistent"],
    [os.path.join("launch", "sglang_standin", "launch_server.py"), "--model-path", "/nonexistent"],
])
@pytest.mark.parametrize("port", ["99999", "0", "-1"])
def test_a_port_outside_1_65535_is_one_line_and_exit_2(cmd, port):
    import sys

    proc = subprocess.run([sys.executable, *cmd, "--port", port], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip() == f"error: --port {port} is outside 1..65535; pick a free port in that range" and proc.stdout == ""


def _published(tmp_path, name="pub", version=1):
    """A real HF dir (toy Qwen3) published under tmp_path/name -> (root, version dir)."""
    import jax

    from tau2jax.inference import weight_sync
    from tau2jax.models import configs, qwen3

    cfg = configs.get_model_config("toy")
    root = str(tmp_path / name)
    return root, weight_sync.publish(qwen3.init_params(cfg, jax.random.key(version)), cfg, root, version, dtype=None)


def _update(url, path, version=None, **kw):
    body = {"model_path": path, **({} if version is None else {"weight_version": str(version)})}
    return httpx.post(f"{url}/update_weights_from_disk", json=body, timeout=60, **kw)


def test_a_truncated_safetensors_is_a_400_and_the_old_weights_keep_serving(tok, tmp_path):
    _, path = _published(tmp_path)
    shard = next(os.path.join(path, f) for f in sorted(os.listdir(path)) if f.endswith(".safetensors"))
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) // 2)
    engine = Updatable(policy_version=3)
    with RunningServer(create_app(Server(engine, tok, rules=SGLANG, weights_roots=[str(tmp_path)]))) as running:
        r = _update(running.url, path, 1)  # the version LATEST names
        served = httpx.get(f"{running.url}/get_model_info").json()["weight_version"]
    body = r.json()
    assert r.status_code == 400 and body["success"] is False, r.text  # was a bare 500
    assert body["message"].startswith(f"cannot load {path}: ") and "\n" not in body["message"]
    assert served == "3" and engine.policy_version == 3  # nothing swapped


def test_update_weights_loads_only_under_the_weights_root_and_says_nothing_of_other_paths(tok, tmp_path):
    root, inside = _published(tmp_path, "pub")
    _, outside = _published(tmp_path, "elsewhere")  # a complete checkpoint, but outside the root
    os.symlink(outside, os.path.join(root, "link"))  # a link inside the root that leads out of it
    engine = Updatable(policy_version=0)
    with RunningServer(create_app(Server(engine, tok, rules=SGLANG, weights_roots=[root]))) as running:
        refused = {p: _update(running.url, p, 1) for p in (
            outside, str(tmp_path / "missing"), "/etc", os.path.join(root, "..", "elsewhere", os.path.basename(outside)),
            os.path.join(root, "link"))}
        assert engine.policy_version == 0
        ok = _update(running.url, inside, 1)
    for p, r in refused.items():
        assert r.status_code == 400 and r.json()["message"] == (
            f"model_path {p!r} is outside the server's weights root ({root}; --weights-root): refused"), p
    assert ok.json()["success"] and engine.policy_version == 1


def test_weight_versions_only_move_forward_and_the_same_version_reloads(tok, monkeypatch, tmp_path):
    monkeypatch.setattr(server_mod, "load_hf_params", lambda path: ({}, None))
    pub, other = os.path.realpath(tmp_path / "pub"), os.path.realpath(tmp_path / "grpo")
    engine = Updatable(policy_version=0)
    with RunningServer(create_app(Server(engine, tok, rules=SGLANG))) as running:
        assert _update(running.url, f"{pub}/version_000005", 5).json()["success"]
        back = _update(running.url, f"{pub}/version_000004", 4)  # a stale or replayed push
        assert engine.policy_version == 5
        again = _update(running.url, f"{pub}/version_000005", 5)  # a reload (SGLangEngine.reload, a re-push)
        ahead = _update(running.url, f"{pub}/version_000006", 6)
        # another publish dir is its own sequence (the pipeline: evals' steps 0..7, then GRPO's 0, 1, ...)
        fresh = _update(running.url, f"{other}/version_000000", 0)
        negative = _update(running.url, f"{pub}/version_000007", -2)
    engine = Updatable(policy_version=-1)  # a server reporting "default": a push naming no version keeps it
    with RunningServer(create_app(Server(engine, tok, rules=SGLANG))) as running:
        keep = _update(running.url, f"{pub}/version_000001")
        assert keep.json()["success"] and httpx.get(f"{running.url}/get_model_info").json()["weight_version"] == "default"
    assert back.status_code == 400 and back.json() == {"success": False, "message": (
        f"weight_version 4 is older than weight_version 5, the last loaded from {pub}: a publish dir's "
        "versions only move forward (the same version reloads)")}
    assert again.json()["success"] and ahead.json()["success"] and fresh.json()["success"]
    assert negative.status_code == 400 and "got -2" in negative.json()["message"]


def test_in_a_publish_dir_only_the_version_latest_names_loads_so_a_resumed_run_rewinds(tok, monkeypatch, tmp_path):
    """A resumed GRPO run republishes its checkpoint's step, older than its last push, into the same
    dir and rewinds LATEST: a server that kept running must follow it (forward-only refused it and
    the resumed run died as an engine outage), and still refuse a stale or replayed push."""
    monkeypatch.setattr(server_mod, "load_hf_params", lambda path: ({}, None))
    root = os.path.realpath(tmp_path / "grpo")
    os.makedirs(root)

    def latest(v):
        with open(os.path.join(root, "LATEST"), "w") as f:
            f.write(f"{v}\n")

    engine = Updatable(policy_version=0)
    with RunningServer(create_app(Server(engine, tok, rules=SGLANG))) as running:
        latest(5)
        assert _update(running.url, f"{root}/version_000005", 5).json()["success"]
        stale = _update(running.url, f"{root}/version_000004", 4)  # a replayed push
        wrong_dir = _update(running.url, f"{root}/version_000004", 5)  # the right number, old files
        latest(3)  # the run resumed from step 3 and republished it
        rewound = _update(running.url, f"{root}/version_000003", 3)
        served = engine.policy_version
    assert stale.status_code == 400 and stale.json()["message"] == (
        f"weight_version 4 at {root}/version_000004 is not {root}/version_000005, the version {root}/LATEST "
        "names: only a publish dir's newest version loads")
    assert wrong_dir.status_code == 400
    assert rewound.json()["success"] and served == 3


def test_the_api_key_guards_every_endpoint_but_health(tok, monkeypatch):
    monkeypatch.setattr(server_mod, "load_hf_params", lambda path: ({}, None))
    engine = Updatable(policy_version=0)
    with RunningServer(create_app(Server(engine, tok, rules=SGLANG, api_key="s3cret"))) as running:
        url = running.url
        assert httpx.get(f"{url}/health").status_code == 200  # probes need no key (SGLang)
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            for r in (httpx.post(f"{url}/generate", json={"input_ids": [1]}, headers=headers),
                      httpx.get(f"{url}/get_model_info", headers=headers),
                      _update(url, "/ckpt/v1", 1, headers=headers)):
                assert (r.status_code, r.json()) == (401, {"error": "Unauthorized"}), (headers, r.request.url)
        assert engine.calls == [] and engine.policy_version == 0

        client = SGLangEngine(url, api_key="s3cret")
        [res] = client.generate([[1, 2]], SamplingParams(max_new_tokens=2))
        client.update_weights("/ckpt/v1", 1)
        client.close()
        monkeypatch.setenv("TAU2JAX_API_KEY", "s3cret")  # the trainer's default: gpu_node.sh exports it
        from_env = SGLangEngine(url)
        assert from_env.served_version() == 1
        from_env.close()
        monkeypatch.delenv("TAU2JAX_API_KEY")
        keyless = SGLangEngine(url, max_retries=0)
        with pytest.raises(EngineRequestError, match="401 Unauthorized: the server was started with --api-key"):
            keyless.wait_ready(10)  # /health passes; the key is checked before any episode starts
        with pytest.raises(EngineRequestError, match="401"):
            keyless.generate([[1, 2]], SamplingParams(max_new_tokens=2))
        keyless.close()
    assert res.output_ids == [1, 2] and engine.policy_version == 1
