"""Unmodified asyncio programs on tapstack (stack.run and the TapstackLoop): aiohttp's web
server answering curl; httpx, websockets and asyncio streams reaching servers on the
kernel's sockets across the TAP, HTTPS included."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest

from tests.integration.conftest import REPO, STACK_IP, in_ns, tapstack_cmd


def _program(name: str, *args: str) -> list[str]:
    return [sys.executable, "-m", f"tests.integration.programs.{name}", *args]


@pytest.fixture
def kernel_servers(netns, tmp_path):
    """HTTP, HTTPS and a websockets echo on the kernel side of the namespace."""
    env = {"TAPSTACK_STATE": str(tmp_path), "PATH": "/usr/bin:/bin"}
    proc = subprocess.Popen(["ip", "netns", "exec", netns, *_program("kernel_servers")],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    try:
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
        ca = subprocess.run(tapstack_cmd("ca"), cwd=REPO, env=env, capture_output=True,
                            text=True, check=True).stdout.strip()
        yield netns, ca
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_httpx_websockets_and_streams_on_the_tapstack_loop(kernel_servers):
    netns, ca = kernel_servers
    r = subprocess.run(["timeout", "-k", "5", "60", *_program("clients", netns, ca)],
                       cwd=REPO, capture_output=True, text=True, timeout=70)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.splitlines()[-1])
    assert out["loop"] == "TapstackLoop"
    # the kernel server saw tapstack's address: the request crossed the TAP
    assert out["http"] == f"kernel says hello to {STACK_IP} over http\n"
    assert out["http_by_name"] == out["http"]
    assert out["http_by_dns"] == out["http"]  # dns.test came from the kernel's DNS server
    assert out["https"] == f"kernel says hello to {STACK_IP} over https\n"
    assert out["websocket"] == "echo: over tapstack"
    assert out["streams_tls"] == "HTTP/1.0 200 OK"
    assert out["streams_tls_version"] == "TLSv1.3"
    assert out["start_tls"] == f"kernel says hello to {STACK_IP} over https"
    assert out["sock_connect"].startswith("loop.sock_connect() needs a kernel socket")
    # a UDP callback that raises is the application's error: reported and counted as
    # such, the next datagram still arrives, and the stack counts no bug of its own
    assert out["udp_handler_saw"] == "exception in Flaky.datagram_received"
    assert out["udp_answer"] == "10.77.0.1"
    assert out["udp_app_errors"] == 1 and out["internal_errors"] == 0


WS_CLIENT = """
import asyncio, sys, websockets
async def main():
    async with websockets.connect(sys.argv[1]) as ws:
        await ws.send("hi")
        print(await ws.recv())
asyncio.run(asyncio.wait_for(main(), 20))
"""


def test_aiohttp_and_websockets_servers_on_tapstack(tmp_path):
    from tests.integration.conftest import netns_exists, unique_name

    ns = unique_name("aio")
    env = {"TAPSTACK_STATE": str(tmp_path), "PATH": "/usr/bin:/bin"}
    proc = subprocess.Popen(["timeout", "-k", "5", "90", *_program("aiohttp_server", ns)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    try:
        line = proc.stdout.readline()
        assert line.startswith("ready http://0.0.0.0:8000"), proc.stderr.read()
        r = in_ns(ns, "curl", "-sS", f"http://{STACK_IP}:8000/hello")
        assert r.stdout == "aiohttp on tapstack, you are 10.77.0.1\n", r.stderr
        r = in_ns(ns, "curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}",
                  f"http://{STACK_IP}:8000/missing")
        assert r.stdout == "404"
        ca = subprocess.run(tapstack_cmd("ca"), cwd=REPO, env=env, capture_output=True,
                            text=True, check=True).stdout.strip()
        r = in_ns(ns, "curl", "-sS", "--cacert", ca, f"https://{STACK_IP}:8443/hello")
        assert r.stdout == "aiohttp on tapstack, you are 10.77.0.1\n", r.stderr
        r = in_ns(ns, sys.executable, "-c", WS_CLIENT, f"ws://{STACK_IP}:8765", cwd=REPO)
        assert r.stdout == "tapstack echo: hi\n", r.stderr
        # the stack's own counters saw the connections
        stats = subprocess.run(tapstack_cmd("stats", "--netns", ns, "--json"), cwd=REPO,
                               capture_output=True, text=True, timeout=10, check=True)
        assert json.loads(stats.stdout)["counters"]["tcp"]["passive_opens"] >= 2
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=15)
    assert proc.returncode == 0, proc.stderr.read()
    assert not netns_exists(ns)  # open_stack removed the namespace it made
