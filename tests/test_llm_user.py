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
