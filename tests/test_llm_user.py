"""tau2's LLM user simulator against a local fake OpenAI-compatible endpoint with injected faults.

`FakeChatServer` is also used by tests/test_eval.py (fault injection through the whole eval).
"""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest


class FakeChatServer:
    """`POST /v1/chat/completions` on 127.0.0.1 (free port), in a thread.

    `plan(request_json, call_index) -> (action, payload)` decides each answer deterministically:
    "ok" (payload: reply text, or a dict {"tool_calls": [...]}), "500", "400", "malformed"
    (200 with broken JSON), "timeout" (holds the request until the server stops; the client's
    timeout fires first) or "empty" (no content, no tool calls).
    """

    def __init__(self, plan):
        self.plan = plan
        self.requests: list[dict] = []
        self._lock = threading.Lock()
        self._release = threading.Event()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):  # /v1/models: what preflight asks
                data = json.dumps({"object": "list", "data": [{"id": "qwen3-4b", "object": "model"}]}).encode()
                self._send(200 if self.path.rstrip("/").endswith("/models") else 404, data)

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                with outer._lock:
                    index = len(outer.requests)
                    outer.requests.append(body)
                action, payload = outer.plan(body, index)
                if action == "timeout":
                    outer._release.wait(30)
                    return
                if action in ("500", "400"):
                    return self._send(int(action), b'{"error": {"message": "injected failure"}}')
                if action == "malformed":
                    return self._send(200, b'{"choices": [{"index": 0, "message": {oops')
                message = {"role": "assistant", "content": None}
                if action == "ok" and isinstance(payload, dict):
                    message["tool_calls"] = [
                        {"id": f"call_{index}_{i}", "type": "function",
                         "function": {"name": tc["name"], "arguments": json.dumps(tc["arguments"])}}
                        for i, tc in enumerate(payload["tool_calls"])
                    ]
                elif action == "ok":
                    message["content"] = payload
                resp = {
                    "id": f"chatcmpl-{index}", "object": "chat.completion", "created": 0, "model": body["model"],
                    "choices": [{"index": 0, "finish_reason": "stop", "message": message}],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                }
                self._send(200, json.dumps(resp).encode())

            def _send(self, code, data):
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self._server.server_port}/v1"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._release.set()
        self._server.shutdown()
        self._server.server_close()


def _user(server, tools=None, **kw):
    from tau2jax.env.llm_user import LLMUser

    args = dict(model="qwen3-4b", base_url=server.base_url, timeout_s=0.5, max_retries=3, backoff_s=0.01)
    args.update(kw)
    return LLMUser(tools, "Your name is Ada. Ask for a refund of order #W1.", **args)


def _agent_says(text):
    from tau2.data_model.message import AssistantMessage

    return AssistantMessage(role="assistant", content=text)


def test_speaks_tau2_prompt_and_stop_signal():
    with FakeChatServer(lambda body, i: ("ok", "Hi, I want a refund. ###STOP###")) as srv:
        user = _user(srv, temperature=0.7)
        state = user.get_init_state()
        msg, state = user.generate_next_message(_agent_says("Hello! How can I help?"), state)
    assert msg.content.startswith("Hi, I want a refund") and user.is_stop(msg)
    assert [m.role for m in state.messages] == ["assistant", "user"]
    (req,) = srv.requests
    assert req["model"] == "qwen3-4b" and req["temperature"] == 0.7
    system = req["messages"][0]
    assert system["role"] == "system" and "<scenario>" in system["content"] and "Ada" in system["content"]
    # tau2 flips roles: the agent's words reach the user LLM as a user message
    assert req["messages"][1] == {"role": "user", "content": "Hello! How can I help?"}


def test_transient_faults_are_retried_without_duplicating_state():
    schedule = ["500", "malformed", "timeout", "empty", "ok"]
    with FakeChatServer(lambda body, i: (schedule[i], "fine, thanks")) as srv:
        user = _user(srv, max_retries=4, timeout_s=0.3)
        state = user.get_init_state()
        msg, state = user.generate_next_message(_agent_says("Anything else?"), state)
    assert msg.content == "fine, thanks"
    assert len(srv.requests) == 5
    # every attempt saw the same conversation; the state holds the turn once
    assert all(r["messages"] == srv.requests[0]["messages"] for r in srv.requests)
    assert [m.role for m in state.messages] == ["assistant", "user"]


def test_persistent_failure_raises_user_simulator_error_and_leaves_state_clean():
    from tau2jax.env.llm_user import UserSimulatorError

    with FakeChatServer(lambda body, i: ("500", None)) as srv:
        user = _user(srv, max_retries=2)
        state = user.get_init_state()
        with pytest.raises(UserSimulatorError, match=r"failed after 3 attempt\(s\).*InternalServerError"):
            user.generate_next_message(_agent_says("Hello"), state)
    assert len(srv.requests) == 3 and state.messages == []


def test_client_errors_are_not_retried():
    from tau2jax.env.llm_user import UserSimulatorError

    with FakeChatServer(lambda body, i: ("400", None)) as srv:
        user = _user(srv, max_retries=3)
        with pytest.raises(UserSimulatorError, match="BadRequestError"):
            user.generate_next_message(_agent_says("Hello"), user.get_init_state())
    assert len(srv.requests) == 1


def test_user_tool_calls_come_back_with_user_requestor():
    """Telecom: the user owns device tools; tau2's simulator re-tags its calls requestor='user'."""
    from tau2.registry import registry

    from tau2jax.config import default_config
    from tau2jax.stages.builders import user_factory

    task = registry.get_tasks_loader("telecom")("small")[0]
    call = {"tool_calls": [{"name": "toggle_airplane_mode", "arguments": {}}]}
    with FakeChatServer(lambda body, i: ("ok", call)) as srv:
        cfg = default_config()
        cfg.user.kind, cfg.user.base_url = "llm", srv.base_url
        user = user_factory(cfg)(task, "telecom")
        msg, _ = user.generate_next_message(_agent_says("Please toggle airplane mode."), user.get_init_state())
    assert msg.tool_calls[0].name == "toggle_airplane_mode" and msg.tool_calls[0].requestor == "user"
    tool_names = {t["function"]["name"] for t in srv.requests[0]["tools"]}
    assert "toggle_airplane_mode" in tool_names
    assert srv.requests[0]["model"] == "qwen3-4b"  # "openai/" prefix is litellm's routing, not sent


# ----------------------------------------------------------------------------- several user servers

PINNED = {"temperature": 0.7, "top_p": 1.0, "top_k": -1, "min_p": 0.0, "presence_penalty": 0.0,
          "frequency_penalty": 0.0, "repetition_penalty": 1.0, "max_tokens": 1024}  # the config's defaults


def _cooperative(body, i):
    """A user that stops once the (gold) agent gives its final answer."""
    agent_said = body["messages"][-1]["content"] or ""
    done = "taken care of" in agent_said or "not able to make that change" in agent_said
    return "ok", "Thanks. ###STOP###" if done else "Yes, please go ahead."


def test_each_episode_stays_on_one_user_server_and_episodes_spread_over_them(tmp_path):
    """Two user servers (one per rollout node), an eval of four mock tasks two at a time: every
    request of an episode reaches one server, each server gets two episodes, every request pins all
    sampling parameters and max_tokens."""
    from tau2jax import config as config_lib
    from tau2jax.env import tau2_env
    from tau2jax.stages import eval as eval_lib

    ids = ["create_task_1", "update_task_1", "create_task_1_nl_eval", "impossible_task_1"]
    scenario = {t.id: t.user_scenario.instructions for t in tau2_env.load_tasks("mock", "base", ids)}
    with FakeChatServer(_cooperative) as a, FakeChatServer(_cooperative) as b:
        c = config_lib.default_config()
        c.stage, c.workdir, c.engine.kind, c.eval.floor = "eval", str(tmp_path), "gold", False
        c.tau2.domains, c.tau2.task_ids, c.eval.num_samples, c.eval.concurrency = "mock", ",".join(ids), 1, 2
        c.user.kind, c.user.base_url = "llm", f" {a.base_url} ,{b.base_url}"  # whitespace tolerated
        config_lib.validate(c)
        result = eval_lib.run(c)
    assert result["pass@1"]["overall"] == 1.0 and result["infra_failures"] == 0
    served = {}  # task -> the servers its requests reached
    for name, srv in (("a", a), ("b", b)):
        for req in srv.requests:
            task = next(t for t, text in scenario.items() if text in req["messages"][0]["content"])
            served.setdefault(task, set()).add(name)
            assert {k: req.get(k) for k in PINNED} == PINNED
    assert set(served) == set(ids) and all(len(s) == 1 for s in served.values()), served
    assert sorted(next(iter(s)) for s in served.values()) == ["a", "a", "b", "b"]
    assert sum(len(r["messages"]) > 2 for r in a.requests + b.requests) >= 1  # multi-turn episodes


def test_users_go_round_robin_over_the_servers_in_call_order():
    from tau2.registry import registry

    from tau2jax.config import default_config
    from tau2jax.stages.builders import user_factory

    task = registry.get_tasks_loader("mock")()[0]
    cfg = default_config()
    cfg.user.kind, cfg.user.base_url = "llm", "http://a:1/v1,http://b:2/v1,http://c:3/v1"
    user_for = user_factory(cfg)  # process 0 (the only one here) starts on the first server
    assert [user_for(task, "mock").base_url for _ in range(5)] == [
        "http://a:1/v1", "http://b:2/v1", "http://c:3/v1", "http://a:1/v1", "http://b:2/v1"]
    user_for = user_factory(cfg, start=1)  # process 1 of a multi-process run
    assert [user_for(task, "mock").base_url for _ in range(3)] == ["http://b:2/v1", "http://c:3/v1", "http://a:1/v1"]


def test_every_request_pins_the_sampling_parameters_from_the_config():
    from tau2.registry import registry

    from tau2jax.config import default_config
    from tau2jax.stages.builders import user_factory

    task = registry.get_tasks_loader("mock")()[0]
    with FakeChatServer(lambda body, i: ("ok", "Sure.")) as srv:
        cfg = default_config()
        cfg.user.kind, cfg.user.base_url = "llm", srv.base_url
        cfg.user.temperature, cfg.user.top_p, cfg.user.top_k, cfg.user.min_p = 0.3, 0.9, 20, 0.05
        cfg.user.presence_penalty, cfg.user.frequency_penalty, cfg.user.repetition_penalty = 0.1, 0.2, 1.05
        cfg.user.max_tokens = 256
        user = user_factory(cfg)(task, "mock")
        state = user.get_init_state()
        for _ in range(2):
            _, state = user.generate_next_message(_agent_says("How can I help?"), state)
        cfg.user.sglang_params = False  # an endpoint that rejects fields outside OpenAI's API
        user = user_factory(cfg)(task, "mock")
        user.generate_next_message(_agent_says("How can I help?"), user.get_init_state())
    want = {"temperature": 0.3, "top_p": 0.9, "top_k": 20, "min_p": 0.05, "presence_penalty": 0.1,
            "frequency_penalty": 0.2, "repetition_penalty": 1.05, "max_tokens": 256}
    assert len(srv.requests) == 3
    for req in srv.requests[:2]:
        assert {k: req.get(k) for k in want} == want
    openai_only = srv.requests[2]
    assert not {"top_k", "min_p", "repetition_penalty"} & set(openai_only)
    assert {k: openai_only[k] for k in ("temperature", "top_p", "presence_penalty", "frequency_penalty",
                                        "max_tokens")} == {k: want[k] for k in ("temperature", "top_p",
                                        "presence_penalty", "frequency_penalty", "max_tokens")}  # fmt: skip


def test_a_failing_turn_names_the_server_the_episode_used():
    from tau2.registry import registry

    from tau2jax.config import default_config
    from tau2jax.env.llm_user import UserSimulatorError
    from tau2jax.stages.builders import user_factory

    task = registry.get_tasks_loader("mock")()[0]
    with FakeChatServer(lambda body, i: ("ok", "fine")) as good, FakeChatServer(lambda body, i: ("500", None)) as bad:
        cfg = default_config()
        cfg.user.kind, cfg.user.base_url, cfg.user.max_retries, cfg.user.retry_backoff_s = (
            "llm", f"{good.base_url},{bad.base_url}", 0, 0.0)
        user_for = user_factory(cfg, start=0)
        first, second = user_for(task, "mock"), user_for(task, "mock")
        first.generate_next_message(_agent_says("Hi"), first.get_init_state())
        with pytest.raises(UserSimulatorError, match=f"at {bad.base_url} failed"):
            second.generate_next_message(_agent_says("Hi"), second.get_init_state())


@pytest.mark.parametrize("value,match", [
    ("http://a/v1,,http://b/v1", r"config.user.base_url: 'http://a/v1,,http://b/v1' has an empty entry"),
    ("http://a/v1, ", r"config.user.base_url: .* has an empty entry"),
    (" , ", r"config.user.base_url: no URL given"),
    ("", r"config.user.base_url: no URL given"),
])
def test_a_user_url_list_with_an_empty_entry_is_refused(value, match):
    from tau2jax import config as config_lib

    c = config_lib.default_config()
    c.user.kind, c.user.base_url = "llm", value
    with pytest.raises(config_lib.ConfigError, match=match):
        config_lib.validate(c)
    c.user.kind = "scripted"  # a scripted user has no server: the field is not read
    config_lib.validate(c)


def test_a_user_url_list_is_parsed_with_whitespace_tolerated():
    from tau2jax import config as config_lib
    from tau2jax.stages import builders

    c = config_lib.default_config()
    c.user.kind, c.user.base_url = "llm", " http://r1:30001/v1 ,http://r2:30001/v1\t"
    config_lib.validate(c)
    assert builders.user_servers(c) == ["http://r1:30001/v1", "http://r2:30001/v1"]
    c.user.kind = "scripted"
    assert builders.user_servers(c) == []
