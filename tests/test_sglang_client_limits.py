"""SGLang limits the client must meet: /health is a one-token generation (seconds on a busy server,
or during a weight update), and the scheduler refuses prompts of >= context - 6 tokens."""

import http.server
import threading
import time

from tau2jax.inference import sglang_client
from tau2jax.inference.sglang_client import SGLangEngine


def _server(delay_s: float, status: int = 200):
    class Slow(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            time.sleep(delay_s)
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Slow)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


def test_a_health_check_slower_than_ten_seconds_is_healthy():
    srv = _server(10.5)  # the old fixed 10 s timeout called this server down
    try:
        client = SGLangEngine(f"http://127.0.0.1:{srv.server_address[1]}")
        assert sglang_client.HEALTH_TIMEOUT_S >= 30
        assert client.health()
    finally:
        srv.shutdown()


def test_starting_server_503_is_not_ready():
    srv = _server(0.0, status=503)
    try:
        assert not SGLangEngine(f"http://127.0.0.1:{srv.server_address[1]}").health()
    finally:
        srv.shutdown()


def _mock_client(handler):
    import httpx

    client = SGLangEngine("http://sglang.test", max_retries=0)
    transport = httpx.MockTransport(handler)  # generation and control calls alike
    client._client = httpx.Client(base_url=client.url, transport=transport)
    client._control = httpx.Client(base_url=client.url, transport=transport)
    return client


def test_sglangs_input_length_rejection_is_context_exhaustion():
    """SGLang 0.5.3's scheduler text (managers/utils.py) for a prompt of >= context - 6 tokens."""
    import httpx
    import pytest

    from tau2jax.inference.engine import ContextLengthError, SamplingParams

    text = ("Input length (32762 tokens) exceeds the maximum allowed length (32762 tokens). "
            "Use a shorter input or enable --allow-auto-truncate.")

    def handler(request):
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"data": [{}]})  # no context length stated: the server decides
        return httpx.Response(400, json={"error": {"message": text}})

    with pytest.raises(ContextLengthError, match="exceeds the maximum allowed length"):
        _mock_client(handler).generate([[1] * 8], SamplingParams(max_new_tokens=2))


def test_a_prompt_within_six_tokens_of_the_context_is_refused_before_sending():
    import httpx
    import pytest

    from tau2jax.inference.engine import ContextLengthError, SamplingParams

    sent = []

    def handler(request):
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"data": [{"max_model_len": 64}]})
        sent.append(request.url.path)
        return httpx.Response(200, json={"text": "", "meta_info": {"output_token_logprobs": [],
                                                                   "finish_reason": {"type": "length", "length": 1}}})

    client = _mock_client(handler)
    with pytest.raises(ContextLengthError):
        client.generate([[1] * 58], SamplingParams(max_new_tokens=1))  # 58 >= 64 - 6
    client.generate([[1] * 57], SamplingParams(max_new_tokens=1))
    assert sent == ["/generate"]


def _generate_answer(finish_reason, ids):
    import httpx

    meta = {"output_token_logprobs": [[-0.5, t, None] for t in ids], "finish_reason": finish_reason,
            "weight_version": "3"}
    return _mock_client(lambda r: httpx.Response(200, json={"data": [{}]}) if r.url.path == "/v1/models"
                        else httpx.Response(200, json={"text": "", "meta_info": meta}))


def test_finish_reasons_of_sglang_053_and_of_later_versions_agree():
    """0.5.3 reports a stop token sampled as the last allowed token as "length" (it checks the
    length first) and a stop by token id; later versions "stop", and a stop string as the string."""
    from tau2jax.inference.engine import SamplingParams

    p = SamplingParams(max_new_tokens=2, stop_token_ids=(151645,), stop_strings=("</tool_call>",))
    cases = [({"type": "length", "length": 2}, [5, 151645], ("stop", 151645)),  # 0.5.3
             ({"type": "stop", "matched": 151645}, [5, 151645], ("stop", 151645)),  # later
             ({"type": "stop", "matched": "</tool_call>"}, [5, 6], ("stop", "</tool_call>")),  # 0.5.23
             ({"type": "length", "length": 2}, [5, 6], ("length", None))]  # a real cut stays one
    for wire, ids, want in cases:
        [r] = _generate_answer(wire, ids).generate([[1, 2]], p)
        assert (r.finish_reason, r.stop_reason) == want and r.output_ids == ids and r.policy_version == 3
