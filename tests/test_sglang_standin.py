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
    flag = subprocess.run([STANDIN, "-m", "sglang.launch_server", "--model-path", "x", "--sampling-defaults", "model"],
                          capture_output=True, text=True, env=ENV, timeout=60)
    assert flag.returncode == 2 and "unrecognized arguments: --sampling-defaults" in flag.stderr  # 0.5.2x only
    bad = subprocess.run([STANDIN, "-m", "sglang.launch_server", "--model-path", "x", "--sampling-defaults", "hf"],
                         capture_output=True, text=True, env={**ENV, "SGLANG_STANDIN_VERSION": "0.5.23"}, timeout=60)
    assert bad.returncode == 2 and "invalid choice: 'hf'" in bad.stderr


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
            {"role": "user", "content": "hi"}], "max_tokens": 8}, timeout=120).json()
        assert chat["choices"][0]["message"]["role"] == "assistant"
        assert chat["usage"]["completion_tokens"] <= 8
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
            # the safe push, right after a request: the next published version (a publish dir
            # loads only the version its LATEST names)
            client.update_weights(weight_sync.publish(qwen3.init_params(cfg, jax.random.key(8)), cfg, root, 2), 2)
            assert client.served_version() == 2 and proc.poll() is None
            client.close()
        finally:
            if proc.poll() is None:
                proc.terminate()
                proc.wait(timeout=30)


# -- chat as SGLang serves it: the model's own template, no max_tokens = to the context, sampling defaults --

# A template unlike Qwen3's (and unlike tau2jax's built-in ChatFormat), using what transformers passes
# a template: messages, add_generation_prompt, tools, the special tokens, raise_exception, tojson, loop
# controls; trim_blocks/lstrip_blocks matter for the whitespace
CUSTOM_TEMPLATE = """{%- for message in messages %}
    {%- if message.role not in ['system', 'user', 'assistant', 'tool'] %}{{ raise_exception('bad role') }}{% endif %}
[[{{ loop.index }}:{{ message.role | upper }}]] {{ message.content }}{{ eos_token }}
{% endfor %}
{%- if tools %}TOOLS={{ tools | tojson }}
{% endif %}
{%- if add_generation_prompt %}[[ASSISTANT SPEAKS]]{% endif %}"""
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi <there> & \u00e9"},
            {"role": "assistant", "content": None}, {"role": "user", "content": [{"type": "text", "text": "a"},
                                                                             {"type": "text", "text": "b"}]}]


def _model_dir(path, template=CUSTOM_TEMPLATE, jinja_file=None, generation=None, tiny=False):
    """The shipped Qwen3 tokenizer files with `template` as tokenizer_config.json's chat_template (None:
    no template), `jinja_file` as chat_template.jinja; `tiny`: a random tiny Qwen3's weights too."""
    import json
    import shutil

    from tau2jax.data.tokenizer import load_tokenizer, shipped_tokenizer_dir

    os.makedirs(path, exist_ok=True)
    if tiny:
        from tau2jax.models.tiny_hf import make_tiny_hf_dir
        make_tiny_hf_dir(str(path), vocab_size=load_tokenizer().vocab_size, seed=0)
    for name in os.listdir(shipped_tokenizer_dir()):
        shutil.copy(os.path.join(shipped_tokenizer_dir(), name), path)
    with open(os.path.join(path, "tokenizer_config.json")) as f:
        config = json.load(f)
    config.pop("chat_template")
    if template is not None:
        config["chat_template"] = template
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump(config, f)
    if jinja_file is not None:
        with open(os.path.join(path, "chat_template.jinja"), "w") as f:
            f.write(jinja_file)
    if generation is not None:
        with open(os.path.join(path, "generation_config.json"), "w") as f:
            json.dump(generation, f)
    return str(path)


def test_the_models_own_chat_template_renders_as_transformers_renders_it(tmp_path):
    """The stand-in's prompt text is `apply_chat_template(messages, add_generation_prompt=True)` of the
    model dir's tokenizer, for the messages and tools as each SGLang version hands them over."""
    transformers = pytest.importorskip("transformers")
    from tau2jax.data.tokenizer import shipped_tokenizer_dir
    from tau2jax.inference.chat_template import HFChatTemplate, read_chat_template, sglang_messages
    from tau2jax.inference.sglang_rules import template_tools

    tools = [{"type": "function", "function": {"name": "f", "description": "do f", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer"}}}}}]
    cases = [(_model_dir(tmp_path / "custom"), MESSAGES),
             (_model_dir(tmp_path / "jinja", jinja_file=CUSTOM_TEMPLATE.replace("SPEAKS", "FROM FILE")), MESSAGES),
             (shipped_tokenizer_dir(), [  # Qwen3's own template, a tool round trip
                 {"role": "user", "content": "hi"},
                 {"role": "assistant", "content": None, "tool_calls": [
                     {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}]},
                 {"role": "tool", "tool_call_id": "c1", "content": "ok"}])]
    for model_dir, messages in cases:
        hf = transformers.AutoTokenizer.from_pretrained(model_dir)
        ours = HFChatTemplate.from_dir(model_dir)
        for version in ("0.5.3", "0.5.23"):
            msgs, sg_tools = sglang_messages(messages), template_tools(version, tools)
            want = hf.apply_chat_template(msgs, tools=sg_tools, add_generation_prompt=True, tokenize=False)
            assert ours.render(msgs, sg_tools) == want
    assert "FROM FILE" in HFChatTemplate.from_dir(tmp_path / "jinja").render(sglang_messages(MESSAGES))
    assert read_chat_template(_model_dir(tmp_path / "none", template=None)) is None
    # what each version passes as the template's tools (serving_chat.py _process_messages)
    assert template_tools("0.5.3", tools)[0] == {"description": "do f", "name": "f", "strict": False,
                                                  "parameters": tools[0]["function"]["parameters"]}
    assert template_tools("0.5.23", tools)[0] == {**tools[0], "defer_loading": None}


@pytest.mark.parametrize("call", ["oops", 3, {"function": "f"}])
def test_a_malformed_tool_call_in_the_history_is_the_clients_error(call):
    """A non-object tool call raised AttributeError, which the server answered with a 500; the
    TypeError it raises now is a 400 (`cannot render messages`)."""
    from tau2jax.inference.chat_template import sglang_messages

    with pytest.raises(TypeError, match="a tool call must be an object with a function object"):
        sglang_messages([{"role": "assistant", "content": None, "tool_calls": [call]}])


def _log(path):
    import json
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_chat_uses_the_template_runs_to_the_context_and_takes_the_versions_sampling_defaults(tmp_path):
    """In-process (the stand-in's Server wiring): the engine is prompted with the custom template's
    tokens, a request without max_tokens gets context - prompt - 2 tokens and finishes "length", the
    omitted sampling parameters are the version's, and a dir without a template answers 400."""
    import dataclasses
    import json

    from tau2jax.data.tokenizer import load_tokenizer
    from tau2jax.inference.chat_template import NO_TEMPLATE_MESSAGE, HFChatTemplate, MissingChatTemplate
    from tau2jax.inference.engine import ScriptedEngine
    from tau2jax.inference.server import RunningServer, Server, create_app, token_digest
    from tau2jax.inference.sglang_rules import SGLangRules, chat_sampling_defaults

    transformers = pytest.importorskip("transformers")
    generation = {"temperature": 0.0, "top_p": 0.8, "top_k": 20, "eos_token_id": [151645, 151643]}
    model_dir = _model_dir(tmp_path / "m", generation=generation)
    tok = load_tokenizer(model_dir)
    want = tok.encode(transformers.AutoTokenizer.from_pretrained(model_dir).apply_chat_template(
        MESSAGES[:2], add_generation_prompt=True, tokenize=False))
    context = len(want) + 20
    gen = json.loads(open(os.path.join(model_dir, "generation_config.json")).read())
    for version, flag, sampling in [
            ("0.5.3", None, {"temperature": 0.7, "top_p": 1.0, "top_k": -1}),  # ChatCompletionRequest defaults
            ("0.5.23", "openai", {"temperature": 1.0, "top_p": 1.0, "top_k": -1}),
            ("0.5.23", "model", {"temperature": 0.0, "top_p": 0.8, "top_k": 20})]:  # generation_config.json
        log = tmp_path / f"{version}-{flag}.jsonl"
        engine = ScriptedEngine(tok, [list(range(100, 200))] * 2)
        rules = dataclasses.replace(SGLangRules.launched(version, deterministic=False, tool_call_parser="qwen25"),
                                    health_generates=False)  # the scripted engine answers requests only
        server = Server(engine, tok, context_length=context, rules=rules, default_max_tokens=None,
                        chat_template=HFChatTemplate.from_dir(model_dir), request_log=str(log),
                        chat_defaults=chat_sampling_defaults(version, flag, gen))
        with RunningServer(create_app(server)) as running:
            r = httpx.post(f"{running.url}/v1/chat/completions", json={"messages": MESSAGES[:2]})
            asked = httpx.post(f"{running.url}/v1/chat/completions", json={
                "messages": MESSAGES[:2], "temperature": 0.5, "top_p": 0.9, "top_k": 5, "max_tokens": 3})
        assert r.status_code == 200, r.text
        assert engine.prompts[0] == want  # the model's template, not the built-in Qwen3 format
        assert r.json()["usage"] == {"prompt_tokens": len(want), "completion_tokens": context - len(want) - 2,
                                     "total_tokens": context - 2}
        assert r.json()["choices"][0]["finish_reason"] == "length"
        first, second = _log(log)
        assert (first["endpoint"], first["prompt"]) == ("/v1/chat/completions", token_digest(want))
        assert first["sampling"] == {**sampling, "min_p": 0.0, "repetition_penalty": 1.0,
                                     "max_new_tokens": context - len(want) - 2}
        assert second["sampling"] == {"temperature": 0.5, "top_p": 0.9, "top_k": 5, "min_p": 0.0,
                                      "repetition_penalty": 1.0, "max_new_tokens": 3}  # the request's own win
        assert asked.json()["usage"]["completion_tokens"] == 3
    with RunningServer(create_app(Server(ScriptedEngine(tok, []), tok, chat_template=MissingChatTemplate()))) as running:
        r = httpx.post(f"{running.url}/v1/chat/completions", json={"messages": MESSAGES[:2]})
    assert r.status_code == 400 and NO_TEMPLATE_MESSAGE in r.json()["error"]["message"]


@pytest.mark.slow
def test_the_standin_serves_chat_with_the_models_template_to_the_context(tmp_path):
    """The stand-in itself, 0.5.23 with --sampling-defaults left at its default (model): a random tiny
    Qwen3 with a custom template and a small context; no max_tokens runs to the context limit."""
    from tau2jax.data.tokenizer import load_tokenizer
    from tau2jax.inference.server import token_digest

    transformers = pytest.importorskip("transformers")
    model_dir = _model_dir(tmp_path / "hf", tiny=True, generation={"temperature": 0.0, "top_k": 20})
    want = load_tokenizer(model_dir).encode(transformers.AutoTokenizer.from_pretrained(model_dir).apply_chat_template(
        MESSAGES[:2], add_generation_prompt=True, tokenize=False))
    context = len(want) + 24
    port = rehearsal.free_ports(1)[0]
    proc = subprocess.Popen([STANDIN, "-m", "sglang.launch_server", "--model-path", model_dir, "--served-model-name",
                             "user", "--port", str(port), "--context-length", str(context)],
                            env={**ENV, "SGLANG_STANDIN_VERSION": "0.5.23", "SGLANG_STANDIN_LOG_DIR": str(tmp_path)},
                            stdout=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 240
        while True:
            try:
                if httpx.get(f"{url}/get_model_info", timeout=10).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.time() < deadline, "stand-in did not come up"
            time.sleep(0.5)
        r = httpx.post(f"{url}/v1/chat/completions", json={"model": "user", "messages": MESSAGES[:2]}, timeout=120)
        assert r.status_code == 200, r.text
        usage = r.json()["usage"]
        assert usage["prompt_tokens"] == len(want)
        # a random model over Qwen3's 151k vocabulary essentially never samples an EOS in 22 tokens
        assert usage["completion_tokens"] == context - len(want) - 2
        assert r.json()["choices"][0]["finish_reason"] == "length"
        (line,) = _log(tmp_path / "user-requests.jsonl")
        assert line["prompt"] == token_digest(want)
        assert line["sampling"] == {"temperature": 0.0, "top_p": 1.0, "top_k": 20, "min_p": 0.0,
                                    "repetition_penalty": 1.0, "max_new_tokens": context - len(want) - 2}
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.slow
def test_the_standin_takes_the_api_key_and_a_weights_root(tmp_path):
    """Issue 33: --api-key as SGLang's (401 but for /health; the client sends the key) and
    SGLANG_STANDIN_WEIGHTS_ROOT (loads only under it, in the same words whether a path exists)."""
    import jax

    from tau2jax.inference import weight_sync
    from tau2jax.inference.sglang_client import EngineRequestError, SGLangEngine
    from tau2jax.models import qwen3
    from tau2jax.weights.hf_read import load_hf_params

    rehearsal.fixture(str(tmp_path))
    cfg = load_hf_params(str(tmp_path / "hf"))[1]
    root = str(tmp_path / "pub")
    path = weight_sync.publish(qwen3.init_params(cfg, jax.random.key(7)), cfg, root, 1)
    port = rehearsal.free_ports(1)[0]
    proc = subprocess.Popen([STANDIN, "-m", "sglang.launch_server", "--model-path", str(tmp_path / "hf"),
                             "--port", str(port), "--context-length", "1024", "--api-key", "k3y"],
                            env={**ENV, "SGLANG_STANDIN_WEIGHTS_ROOT": root}, stdout=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 240
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=30).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.time() < deadline, "stand-in did not come up"
            time.sleep(0.5)
        assert httpx.get(f"{url}/get_model_info").status_code == 401
        client = SGLangEngine(url, api_key="k3y")
        for outside in (str(tmp_path / "hf"), "/nonexistent"):
            with pytest.raises(EngineRequestError, match="outside the server's weights root"):
                client.update_weights(outside, 1)
        client = SGLangEngine(url, api_key="k3y")  # a failed update holds generation: a fresh client
        client.update_weights(path, 1)
        assert client.served_version() == 1
        client.close()
    finally:
        proc.terminate()
        proc.wait(30)
