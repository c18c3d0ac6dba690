"""The SGLang rules our server follows (tau2jax/inference/sglang_rules.py, each from SGLang's source):
a weight update drains the requests in flight and holds new ones back, /health as a one-token
generation behind it, seeds by launch flag, the finish order and tool-call shapes by version, the
served model name."""

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tau2jax.data.tokenizer import load_tokenizer
from tau2jax.inference import server as server_mod
from tau2jax.inference.engine import GenerateResult
from tau2jax.inference.server import RunningServer, Server, create_app
from tau2jax.inference.sglang_rules import SGLangRules

STRICT_053 = SGLangRules.launched("0.5.3", deterministic=False, tool_call_parser="qwen25")
STRICT_LATEST = SGLangRules.launched("0.5.23", deterministic=False, tool_call_parser="qwen25")


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("")


class Gated:
    """Answers each prompt with one token stamped with its current version; a call waits for
    `release` while `gate` is set, and every call and update is logged in order."""

    kind = "scripted"

    def __init__(self, result=None):
        self.policy_version, self.result = 0, result
        self.gate, self.release, self.entered = False, threading.Event(), threading.Event()
        self.log: list[str] = []
        self.seeds: list = []

    def generate(self, input_ids, params):
        self.seeds += [p.seed for p in params]
        self.log.append(f"generate v{self.policy_version}")
        if self.gate:
            self.entered.set()
            assert self.release.wait(30)
        if self.result is not None:
            return [self.result for _ in input_ids]
        return [GenerateResult([7], [-0.1], "length", self.policy_version) for _ in input_ids]

    def update_weights(self, params, version=None):
        self.log.append(f"update v{version}")
        self.policy_version = version


def post_generate(url, **sp):
    r = httpx.post(f"{url}/generate", json={"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 1, **sp}},
                   timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def test_an_update_drains_the_requests_in_flight_and_holds_new_ones_back(tok, monkeypatch):
    monkeypatch.setattr(server_mod, "load_hf_params", lambda path: ({}, None))
    engine = Gated()
    with RunningServer(create_app(Server(engine, tok, batch_window_s=0.0))) as running, \
            ThreadPoolExecutor(3) as pool:
        engine.gate = True
        in_flight = pool.submit(post_generate, running.url)
        assert engine.entered.wait(30)
        update = pool.submit(httpx.post, f"{running.url}/update_weights_from_disk",
                             json={"model_path": "/ckpt/v1", "weight_version": "1"}, timeout=60)
        time.sleep(0.5)
        arrived_during = pool.submit(post_generate, running.url)
        time.sleep(0.5)
        assert not update.done() and not arrived_during.done()  # the update waits for the one in flight
        engine.gate = False
        engine.release.set()
        assert in_flight.result()["meta_info"]["weight_version"] == "0"  # finished on the old weights
        assert update.result().json()["success"]
        assert arrived_during.result()["meta_info"]["weight_version"] == "1"  # held back, then served on v1
    assert engine.log == ["generate v0", "update v1", "generate v1"]


def test_health_is_a_generation_that_waits_behind_an_update(tok, monkeypatch):
    loading = threading.Event()

    def slow_load(path):
        loading.set()
        time.sleep(3.0)
        return {}, None

    monkeypatch.setattr(server_mod, "load_hf_params", slow_load)
    monkeypatch.setattr(server_mod, "HEALTH_CHECK_TIMEOUT_S", 1.5)
    engine = Gated()
    with RunningServer(create_app(Server(engine, tok, rules=STRICT_053))) as running, \
            ThreadPoolExecutor(2) as pool:
        engine.log.clear()  # RunningServer's readiness wait was a health generation too
        t0 = time.monotonic()
        assert httpx.get(f"{running.url}/health", timeout=30).status_code == 200
        assert time.monotonic() - t0 >= 1.0 and engine.log == ["generate v0"]  # it generated, polled each second
        update = pool.submit(httpx.post, f"{running.url}/update_weights_from_disk",
                             json={"model_path": "/ckpt/v1", "weight_version": "1"}, timeout=60)
        assert loading.wait(30)
        assert httpx.get(f"{running.url}/health", timeout=30).status_code == 503  # stalled behind the load
        assert update.result().json()["success"]
        assert httpx.get(f"{running.url}/health", timeout=30).status_code == 200


@pytest.mark.parametrize("rules,sent,seen", [
    (SGLangRules(), 5, 5),  # the built-in server honours seeds
    (STRICT_053, 5, None),  # SGLang without --enable-deterministic-inference never reads them
    (SGLangRules.launched("0.5.3", True, None), None, 42),  # with it, an unseeded request gets 42
    (SGLangRules.launched("0.5.3", True, None), 5, 5),
])
def test_seeds_follow_the_launch_flag(tok, rules, sent, seen):
    engine = Gated()
    with RunningServer(create_app(Server(engine, tok, rules=rules))) as running:
        post_generate(running.url, **({} if sent is None else {"sampling_seed": sent}))
    assert engine.seeds[-1] == seen


@pytest.mark.parametrize("rules,want", [(STRICT_053, {"type": "length", "length": 2}),
                                        (STRICT_LATEST, {"type": "stop", "matched": 151645})])
def test_a_stop_token_as_the_last_allowed_token_finishes_by_version(tok, rules, want):
    im_end = tok.end_of_turn_ids[0]
    assert im_end == 151645
    engine = Gated(GenerateResult([9, im_end], [-0.1, -0.2], "stop", 0, stop_reason=im_end))
    with RunningServer(create_app(Server(engine, tok, rules=rules))) as running:
        r = post_generate(running.url, max_new_tokens=2)
    assert r["meta_info"]["finish_reason"] == want


TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]
GOOD = 'ok <tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>\n' \
       '<tool_call>\n{"name": "g", "arguments": {}}\n</tool_call>'  # g: not offered, dropped
BROKEN = 'ok <tool_call>\n{"name": "f", "arguments": \n</tool_call>'


@pytest.mark.parametrize("rules,reply,finish,content,calls", [
    (STRICT_053, GOOD, "tool_calls", "ok", [(-1, "f", {"a": 1})]),
    (STRICT_LATEST, GOOD, "tool_calls", "ok", [(0, "f", {"a": 1})]),
    (STRICT_053, BROKEN, "tool_calls", BROKEN, []),  # 0.5.3: the marker alone turns the finish
    (STRICT_LATEST, BROKEN, "stop", BROKEN, None),
    (SGLangRules.launched("0.5.3", False, None), GOOD, "stop", GOOD, None),  # no --tool-call-parser
])
def test_chat_tool_calls_follow_the_parser_and_version(tok, rules, reply, finish, content, calls):
    im_end = tok.end_of_turn_ids[0]
    ids = tok.encode(reply) + [im_end]
    engine = Gated(GenerateResult(ids, [-0.1] * len(ids), "stop", 0, stop_reason=im_end))
    with RunningServer(create_app(Server(engine, tok, rules=rules))) as running:
        choice = httpx.post(f"{running.url}/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "go"}], "tools": TOOLS, "max_tokens": 200},
            timeout=60).json()["choices"][0]
    got = choice["message"].get("tool_calls")
    got = None if got is None else [(c["index"], c["function"]["name"], json.loads(c["function"]["arguments"]))
                                    for c in got]
    assert (choice["finish_reason"], choice["message"]["content"], got) == (finish, content, calls)


def test_models_lists_the_served_name_then_the_path_after_an_update(tok, monkeypatch):
    monkeypatch.setattr(server_mod, "load_hf_params", lambda path: ({}, None))
    with RunningServer(create_app(Server(Gated(), tok, model_path="/hf/base", served_model_name="policy"))) as running:
        assert httpx.get(f"{running.url}/v1/models").json()["data"][0]["id"] == "policy"
        httpx.post(f"{running.url}/update_weights_from_disk", json={"model_path": "/ckpt/v1"}, timeout=60)
        assert httpx.get(f"{running.url}/v1/models").json()["data"][0]["id"] == "/ckpt/v1"
