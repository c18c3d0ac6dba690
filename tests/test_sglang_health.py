"""SGLang's /health is a one-token generation: on a busy server (or during a weight update) it
answers after seconds, and the client must wait for it rather than call the server down."""

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
