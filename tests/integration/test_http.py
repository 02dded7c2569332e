"""The HTTP server on tapstack, driven by real curl, nc, ab and wrk from the namespace."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time

import pytest

from stack.apps.services import deterministic_bytes, deterministic_sha256
from tests.integration.conftest import (
    STACK_IP,
    in_ns,
    require_tool,
    sha256_file,
    stream_sha256,
    wait_for,
)

URL = f"http://{STACK_IP}"


@pytest.fixture(scope="module")
def web(tmp_path_factory):
    """One tapstack for the read-mostly tests of this module (started once)."""
    from tests.integration.conftest import StackProcess, unique_name

    sp = StackProcess(unique_name(), [], None).start()
    yield sp
    sp.stop()
    subprocess.run(["ip", "netns", "delete", sp.ns], check=False, capture_output=True)


def curl(ns: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", "netns", "exec", ns, "curl", "-sS", *args],
                          capture_output=True, timeout=timeout)


def test_home_page_names_the_client(web):
    r = curl(web.ns, URL + "/")
    page = r.stdout.decode()
    assert r.returncode == 0 and "<h1>Hello from tapstack</h1>" in page
    assert "<td>10.77.0.1</td>" in page  # the client's address as the stack saw it
    assert "<th>state</th><td>ESTABLISHED</td>" in page and "<th>mss</th>" in page


def test_store_methods(web):
    if os.environ.get("TAPSTACK_WORKERS", "1") != "1":
        pytest.skip("the store lives in each worker's memory (docs/architecture.md)")
    def do(*args: str) -> tuple[int, bytes]:
        r = curl(web.ns, "-o", "-", "-w", "\n%{http_code}", *args)
        body, _, code = r.stdout.rpartition(b"\n")
        return int(code), body

    key = URL + "/store/greeting"
    assert do(key)[0] == 404
    assert do("-X", "POST", "--data-binary", "hello", key)[0] == 201
    assert do(key) == (200, b"hello")
    assert do("-X", "POST", "--data-binary", "again", key)[0] == 409
    assert do("-X", "PUT", "--data-binary", "bonjour", key)[0] == 204
    assert do(key) == (200, b"bonjour")
    head = curl(web.ns, "-I", key).stdout
    assert head.startswith(b"HTTP/1.1 200") and b"content-length: 7" in head
    assert head.endswith(b"\r\n\r\n")  # HEAD: headers only
    assert do("-X", "DELETE", key)[0] == 204
    assert do("-X", "DELETE", key)[0] == 404


def test_upload_20mb_with_100_continue_and_no_stall(web, random_files):
    r = curl(web.ns, "-T", str(random_files["20m"]), "-w",
             "\n%{time_pretransfer} %{time_starttransfer}", URL + "/upload", timeout=120)
    body, _, times = r.stdout.rpartition(b"\n")
    result = json.loads(body)
    assert result == {"length": 20_000_000, "sha256": sha256_file(random_files["20m"])}
    pre, start = map(float, times.split())
    # The 100 Continue came back at once: curl did not sit out its one-second wait.
    assert start - pre < 0.5, (pre, start)


def test_chunked_upload(web, random_files):
    with open(random_files["5m"], "rb") as f:
        r = subprocess.run(["ip", "netns", "exec", web.ns, "curl", "-sS", "-H",
                            "Transfer-Encoding: chunked", "-T", "-", URL + "/upload"],
                           stdin=f, capture_output=True, timeout=60)
    assert json.loads(r.stdout) == {"length": 5_000_000,
                                    "sha256": sha256_file(random_files["5m"])}


def test_range_http10_and_connection_reuse(web):
    r = curl(web.ns, "-r", "0-99", "-D", "-", URL + "/bytes/1000")
    head, _, body = r.stdout.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 206") and b"content-range: bytes 0-99/1000" in head
    assert body == deterministic_bytes(0, 100)
    r = curl(web.ns, "--http1.0", "-D", "-", URL + "/bytes/10")
    assert b"Connection: close" in r.stdout and r.stdout.endswith(deterministic_bytes(0, 10))
    r = curl(web.ns, "-v", "-o", "/dev/null", "-o", "/dev/null", URL + "/bytes/5",
             URL + "/bytes/6")
    assert b"Re-using existing connection" in r.stderr
    assert r.stderr.count(b"Connected to") == 1


def test_download_100mb(web):
    assert stream_sha256(["ip", "netns", "exec", web.ns, "curl", "-sS",
                          URL + "/bytes/104857600"]) == (104857600,
                                                         deterministic_sha256(104857600))


@pytest.mark.parametrize(("raw", "status"), [
    (b"GET / HTTP/1.1\r\nHost: x\r\nbroken header line\r\n\r\n", b"400"),
    (b"GET /" + b"u" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", b"414"),
    (b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: %s\r\n" % (i, b"v" * 1000) for i in range(80))
     + b"\r\n", b"431"),
    (b"POST /upload HTTP/1.1\r\nHost: x\r\n\r\n", b"411"),
    (b"PUT /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999\r\n\r\n", b"413"),
    (b"FROB / HTTP/1.1\r\nHost: x\r\n\r\n", b"501"),
    (b"GET / HTTP/3.0\r\nHost: x\r\n\r\n", b"505"),
])
def test_bad_requests_over_nc(web, raw, status):
    start = time.monotonic()
    # nc -N half-closes after the request; it exits once the server closes (-w 10 bounds it)
    r = subprocess.run(["ip", "netns", "exec", web.ns, "nc", "-N", "-w", "10", STACK_IP, "80"],
                       input=raw, capture_output=True, timeout=30)
    assert r.stdout.split(b"\r\n", 1)[0].split(b" ")[1] == status, r.stdout[:200]
    assert b"Connection: close" in r.stdout
    assert time.monotonic() - start < 5  # the server closed the connection


def test_ab_and_wrk_have_no_errors_and_leave_nothing_stuck(web):
    require_tool("ab")
    require_tool("wrk")
    r = in_ns(web.ns, "ab", "-n", "2000", "-c", "10", URL + "/bytes/100", timeout=60)
    assert "Complete requests:      2000" in r.stdout, r.stdout + r.stderr
    assert "Failed requests:        0" in r.stdout and "Non-2xx" not in r.stdout
    r = in_ns(web.ns, "wrk", "-d", "3s", "-c", "20", "-t", "2", URL + "/bytes/100",
              timeout=60)
    assert "Socket errors" not in r.stdout and "Non-2xx" not in r.stdout, r.stdout
    assert int(re.search(r"(\d+) requests in", r.stdout).group(1)) > 1000
    def stuck() -> dict[str, int]:
        return {k: v for k, v in web.stats()["tcp"].items() if k.startswith("state_") and v
                and k not in ("state_time_wait",)}

    left = wait_for(stuck, lambda s: s == {}, timeout=5)
    assert left == {}, left


def test_a_starlette_app_through_tapstack(start_stack):
    st = start_stack("--app", "tests.apps.starlette_app:app", pcap=False)
    r = curl(st.ns, URL + "/hello/world")
    assert json.loads(r.stdout) == {"hello": "world", "client": "10.77.0.1",
                                    "via": "starlette"}


KEEPALIVE_CLIENT = """
import http.client, sys
c = http.client.HTTPConnection(sys.argv[1], 80, timeout=10)
for size in [2000, 3500] * 5:
    c.request("GET", f"/bytes/{size}")
    r = c.getresponse()
    assert len(r.read()) == size
print("ok")
"""


def test_keep_alive_responses_of_two_and_three_segments_leave_without_waiting(start_stack):
    """A response a little over one or two MSS leaves whole: its last, short segment does
    not wait for the client's (delayed) ACK of the full ones. Checked in tapstack's own
    capture: within each response, no data follows an ACK from the client."""
    import dpkt

    sp = start_stack()
    r = in_ns(sp.ns, "python3", "-c", KEEPALIVE_CLIENT, STACK_IP, timeout=60)
    assert r.stdout.strip() == "ok", r.stderr
    sp.stop()
    responses, stalls = 0, []
    acked_in_response = False
    with open(sp.pcap, "rb") as f:
        for _ts, frame in dpkt.pcap.Reader(f):
            ip = dpkt.ethernet.Ethernet(frame).data
            if not isinstance(ip, dpkt.ip.IP) or not isinstance(ip.data, dpkt.tcp.TCP):
                continue
            tcp = ip.data
            from_client = tcp.dport == 80
            if from_client and tcp.data:  # a request: a new response begins
                responses += 1
                acked_in_response = False
            elif from_client and tcp.flags & dpkt.tcp.TH_ACK and responses:
                acked_in_response = True
            elif not from_client and tcp.data and acked_in_response:
                stalls.append((responses, len(tcp.data)))
    assert responses == 10
    assert stalls == []
