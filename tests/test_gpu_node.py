"""launch/gpu_node.sh keeps its servers up: one that dies after it was healthy is restarted (bounded,
logged), one that never came up is a launch failure, and past MAX_RESTARTS the launcher gives up."""

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import httpx

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FAKE_SGLANG = textwrap.dedent(f"""\
    #!{sys.executable}
    # answers gpu_node.sh's version check, and serves /health on --port as sglang.launch_server would
    import http.server, sys
    if sys.argv[1] == "-c":  # gpu_node.sh asks the version
        print("0.5.3"); sys.exit(0)
    port = int(sys.argv[sys.argv.index("--port") + 1])
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200); self.end_headers(); self.wfile.write(b"ok")
        def log_message(self, *a):
            pass
    http.server.HTTPServer(("127.0.0.1", port), H).serve_forever()
""")


def _ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _until(cond, timeout_s=30.0):
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def _up(port) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200
    except httpx.TransportError:
        return False


def test_a_dead_server_is_restarted_then_given_up_on(tmp_path):
    fake = tmp_path / "python"
    fake.write_text(FAKE_SGLANG)
    fake.chmod(0o755)
    policy_port, user_port = _ports(2)
    logs = tmp_path / "logs"
    env = os.environ | {"SGLANG_PYTHON": str(fake), "POLICY_MODEL": str(tmp_path), "USER_MODEL": str(tmp_path),
                        "POLICY_PORT": str(policy_port), "USER_PORT": str(user_port), "LOG_DIR": str(logs),
                        "MAX_RESTARTS": "1", "RESTART_DELAY_S": "0.1", "READY_TIMEOUT_S": "30"}
    proc = subprocess.Popen(["bash", os.path.join(REPO, "launch", "gpu_node.sh")], env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        _until(lambda: (logs / "policy.ready").exists() and (logs / "user.ready").exists())
        first = int((logs / "policy.pid").read_text())
        os.kill(first, signal.SIGKILL)  # as SGLang 0.5.3's scheduler assert takes the server down
        _until(lambda: (logs / "restarts.log").exists() and _up(policy_port))
        assert int((logs / "policy.pid").read_text()) != first
        assert (logs / "restarts.log").read_text().split()[1:3] == ["policy", "1"]
        assert _up(user_port)  # the other server untouched
        os.kill(int((logs / "policy.pid").read_text()), signal.SIGKILL)  # past MAX_RESTARTS
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(10)
    assert proc.returncode == 1
    assert "policy server exited (rc 137); restart 1/1" in out and "after 1 restarts; giving up" in out
    _until(lambda: not _up(user_port), 10)  # the launcher stopped what it started


def test_the_api_key_reaches_both_servers(tmp_path):
    """Issue 33: TAU2JAX_API_KEY becomes SGLang's --api-key on the policy and the user server."""
    fake = tmp_path / "python"
    fake.write_text(FAKE_SGLANG.replace('port = int(', 'open(f"{sys.argv[0]}.{sys.argv[sys.argv.index(\'--port\') + 1]}", "w")'
                                        '.write("\\n".join(sys.argv))\nport = int(', 1))
    fake.chmod(0o755)
    for key in ("k3y-123", ""):
        ports, logs = _ports(2), tmp_path / f"logs{key}"
        env = os.environ | {"SGLANG_PYTHON": str(fake), "POLICY_MODEL": str(tmp_path), "USER_MODEL": str(tmp_path),
                            "POLICY_PORT": str(ports[0]), "USER_PORT": str(ports[1]), "LOG_DIR": str(logs),
                            "READY_TIMEOUT_S": "30", "TAU2JAX_API_KEY": key}
        proc = subprocess.Popen(["bash", os.path.join(REPO, "launch", "gpu_node.sh")], env=env, cwd=tmp_path,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            _until(lambda: (logs / "policy.ready").exists() and (logs / "user.ready").exists())
            argvs = [(tmp_path / f"python.{p}").read_text().split("\n") for p in ports]
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(10)
        for argv in argvs:
            if key:
                assert argv[argv.index("--api-key") + 1] == key, argv
            else:
                assert "--api-key" not in argv, argv


def test_a_python_without_sglang_is_one_error_line_and_no_traceback(tmp_path):
    """The version probe's ImportError traceback came before the launcher's own line."""
    proc = subprocess.run(["bash", os.path.join(REPO, "launch", "gpu_node.sh")], cwd=tmp_path, timeout=60,
                          capture_output=True, text=True,
                          env=os.environ | {"SGLANG_PYTHON": sys.executable, "POLICY_MODEL": str(tmp_path),
                                            "USER_MODEL": str(tmp_path), "LOG_DIR": str(tmp_path / "logs")})
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"error: '{sys.executable}' cannot import sglang; install it in its own venv (pip install "
        "'sglang[all]>=0.5.3') and point SGLANG_PYTHON at that python"]
