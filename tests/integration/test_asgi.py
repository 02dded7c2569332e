"""A FastAPI app (lifespan state, HTTP routes, a WebSocket route) served over tapstack,
by unmodified uvicorn (`--server uvicorn`) and by the built-in server (`--app`); real curl
and the real websockets client from the namespace."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.integration.conftest import REPO, STACK_IP, in_ns, tapstack_cmd, unique_name

APP = ["--app", "tests.apps.fastapi_app:app", "--app-dir", str(REPO), "--no-services"]


@pytest.mark.parametrize("server", ["uvicorn", "builtin"])
def test_fastapi_lifespan_http_and_websocket(start_stack, server):
    if os.environ.get("TAPSTACK_WORKERS", "1") != "1":
        pytest.skip("the app's visit counter lives in each worker's memory")
    st = start_stack("--server", server, *APP, pcap=False)
    for visit in (1, 2):
        r = in_ns(st.ns, "curl", "-sS", f"http://{STACK_IP}/state")
        assert json.loads(r.stdout) == {"greeting": "hello from the lifespan",
                                        "visits": visit, "events": ["startup"],
                                        "client": "10.77.0.1"}, r.stderr
    r = in_ns(st.ns, "curl", "-sS", "--data-binary", "x" * 100000, f"http://{STACK_IP}/echo")
    assert json.loads(r.stdout) == {"length": 100000}
    r = in_ns(st.ns, "timeout", "-k", "5", "40", sys.executable,
              "tests/integration/programs/ws_client.py", f"ws://{STACK_IP}/ws",
              cwd=REPO, timeout=50)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"subprotocol": "chat", "text": "echo: hello",
                                    "bytes": [3, 2, 1], "big_ok": True, "pong": True,
                                    "close_code": 4000, "close_reason": "asked to",
                                    "refused": 403}
    assert st.stop() == 0
    if server == "builtin":  # uvicorn's access log needs its own logging config
        assert '10.77.0.1:' in st.stderr and '"GET /state HTTP/1.1" 200' in st.stderr
        assert '"GET /ws HTTP/1.1" 101' in st.stderr
    else:
        assert "Application shutdown complete" in st.stderr  # uvicorn ran the shutdown


def test_no_access_log_flag(start_stack):
    st = start_stack("--no-access-log", "--no-services", pcap=False)
    r = in_ns(st.ns, "curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}",
              f"http://{STACK_IP}/")
    assert r.stdout == "200"
    st.stop()
    assert '"GET / HTTP/1.1"' not in st.stderr


def test_a_failed_lifespan_startup_is_one_sentence_and_exit_2():
    ns = unique_name()
    r = subprocess.run(tapstack_cmd("run", "--netns", ns, "--app",
                                    "tests.apps.failing_app:app", "--app-dir", str(REPO)),
                       cwd="/", capture_output=True, text=True, timeout=30)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == (
        "tapstack: the application's startup failed: the database is not there")
    assert "tapstack ready" not in r.stdout
    assert not subprocess.run(["ip", "netns", "list"], capture_output=True,
                              text=True).stdout.count(ns)


@pytest.mark.parametrize(("app", "message"), [
    ("tests.apps.failing_app:not_asgi", "is not an ASGI 3 application"),
    ("tests.apps.failing_app:nothing", "has no attribute nothing"),
    ("tests.apps.no_such_module:app", "cannot import tests.apps.no_such_module"),
])
def test_an_app_that_is_not_asgi_is_refused_before_ready(app, message):
    r = subprocess.run(tapstack_cmd("run", "--netns", unique_name(), "--app", app,
                                    "--app-dir", str(REPO)),
                       cwd="/", capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_hello_alone_is_a_bad_request_and_frob_not_implemented(start_stack):
    st = start_stack("--no-services", pcap=False)
    for raw, status in ((b"HELLO\r\n\r\n", b"400"), (b"GET\r\n\r\n", b"400"),
                        (b"FROB / HTTP/1.1\r\nHost: x\r\n\r\n", b"501")):
        r = subprocess.run(["ip", "netns", "exec", st.ns, "nc", "-N", "-w", "10", STACK_IP,
                            "80"], input=raw, capture_output=True, timeout=30)
        assert r.stdout.split(b"\r\n", 1)[0] == b"HTTP/1.1 " + status + (
            b" Bad Request" if status == b"400" else b" Not Implemented"), r.stdout
