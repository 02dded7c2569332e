"""Routers and multi-interface nodes in labs, driven by real tools: traceroute (UDP, ICMP,
TCP), tracepath, ping, curl, a kernel HTTP server, raw UDP from Python sockets.

The chain `linux a - r1 - r2 - linux b` (middle link MTU 1400) runs twice: with tapstack
routers, and with Linux routers (namespaces with ip_forward=1) as the reference that
proves each test right."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import time
import uuid
from pathlib import Path

import dpkt
import pytest

from tests.integration.conftest import in_ns, tapstack_cmd

CHAIN = """
name = "{name}"
[[segment]]
name = "a"
[[segment]]
name = "mid"
mtu = 1400
[[segment]]
name = "b"

[[node]]
name = "a"
kind = "linux"
[[node.interface]]
segment = "a"
addresses = ["10.1.0.2/24"]
[[node.route]]
to = "default"
via = "10.1.0.1"

[[node]]
name = "r1"
kind = "{kind}"
forwarding = true
[[node.interface]]
segment = "a"
addresses = ["10.1.0.1/24"]
[[node.interface]]
segment = "mid"
addresses = ["10.12.0.1/24"]
[[node.route]]
to = "10.2.0.0/24"
via = "10.12.0.2"

[[node]]
name = "r2"
kind = "{kind}"
forwarding = true
[[node.interface]]
segment = "mid"
addresses = ["10.12.0.2/24"]
[[node.interface]]
segment = "b"
addresses = ["10.2.0.1/24"]
[[node.route]]
to = "10.1.0.0/24"
via = "10.12.0.1"

[[node]]
name = "b"
kind = "linux"
commands = ["cd {www} && exec python3 -m http.server 80 --bind 10.2.0.2"]
[[node.interface]]
segment = "b"
addresses = ["10.2.0.2/24"]
[[node.route]]
to = "default"
via = "10.2.0.1"
"""

HOPS = ["10.1.0.1", "10.12.0.2", "10.2.0.2"]
DOWNLOAD_BYTES = 100 * 1024 * 1024


def lab_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(tapstack_cmd("lab", *args), capture_output=True, text=True,
                          timeout=timeout)


class Lab:
    def __init__(self, path: Path, name: str) -> None:
        self.path = path
        self.name = name

    def up(self) -> Lab:
        r = lab_cli("up", str(self.path))
        assert r.returncode == 0, r.stderr
        return self

    def down(self) -> subprocess.CompletedProcess:
        return lab_cli("down", str(self.path))

    def run(self, node: str, *cmd: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return in_ns(f"{self.name}-{node}", *cmd, timeout=timeout)

    def status(self) -> dict:
        r = lab_cli("status", str(self.path), "--json")
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    def stats(self, node: str) -> dict:
        r = subprocess.run(tapstack_cmd("stats", "--netns", f"{self.name}-sw", "--node", node,
                                        "--json"), capture_output=True, text=True, timeout=10)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)


def make_lab(tmp_path: Path, template: str, **fields) -> Lab:
    name = f"l{uuid.uuid4().hex[:6]}"
    path = tmp_path / f"{name}.toml"
    path.write_text(template.format(name=name, **fields))
    return Lab(path, name)


@pytest.fixture(scope="module", params=["tapstack", "linux"])
def chain(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("chain")
    www = tmp / "www"
    www.mkdir()
    blob = os.urandom(DOWNLOAD_BYTES)
    (www / "blob").write_bytes(blob)
    lab = make_lab(tmp, CHAIN, kind=request.param, www=www)
    lab.kind = request.param
    lab.blob_sha = hashlib.sha256(blob).hexdigest()
    lab.up()
    try:
        if lab.kind == "linux":
            # the kernel allows one ICMP error per second per destination after a burst
            # of 6 (tapstack: 100/s for all, burst 50); the tests send them back to back
            for router in ("r1", "r2"):
                lab.run(router, "sh", "-c", "echo 0 > /proc/sys/net/ipv4/icmp_ratelimit")
        deadline = time.monotonic() + 15
        while lab.run("a", "curl", "-s", "-o", "/dev/null", "-m", "2",
                      "http://10.2.0.2/").returncode != 0:
            assert time.monotonic() < deadline, "b's HTTP server never answered"
            time.sleep(0.2)
        yield lab
    finally:
        r = lab.down()
        assert r.returncode == 0, r.stderr


def hops(out: str) -> list[str]:
    """The address of each hop of `traceroute -n -q 1` output, '*' where none answered."""
    found = []
    for line in out.splitlines()[1:]:
        m = re.match(r"\s*\d+\s+(\S+)", line)
        if m:
            found.append(m.group(1))
    return found


@pytest.mark.parametrize("mode", [[], ["-I"], ["-T", "-p", "80"]],
                         ids=["udp", "icmp", "tcp80"])
def test_traceroute_lists_both_routers_in_order(chain, mode):
    r = chain.run("a", "timeout", "-k", "2", "30", "traceroute", "-n", "-q", "1", "-w", "2",
                  *mode, "10.2.0.2")
    assert r.returncode == 0, r.stderr
    assert hops(r.stdout) == HOPS, r.stdout


def test_tracepath_finds_the_smaller_mtu_of_the_middle_link(chain):
    r = chain.run("a", "timeout", "-k", "2", "30", "tracepath", "-n", "10.2.0.2")
    assert "pmtu 1400" in r.stdout and "reached" in r.stdout, r.stdout


def test_ping_no_route_and_ttl_one(chain):
    # r1 knows only 10.2.0.0/24 beyond itself: anything else is unreachable there
    r = chain.run("a", "ping", "-n", "-c", "1", "-W", "2", "10.99.0.1")
    assert "From 10.1.0.1" in r.stdout and "Destination Net Unreachable" in r.stdout, r.stdout
    r = chain.run("a", "ping", "-n", "-c", "1", "-W", "2", "-t", "1", "10.2.0.2")
    assert "From 10.1.0.1" in r.stdout and "Time to live exceeded" in r.stdout, r.stdout
    r = chain.run("a", "ping", "-n", "-c", "2", "-W", "2", "b")  # the lab's names
    assert "PING b (10.2.0.2)" in r.stdout, r.stdout
    assert " 0% packet loss" in r.stdout and "ttl=62" in r.stdout, r.stdout


def test_100_mb_download_through_both_routers_finds_the_path_mtu(chain):
    # Forget what earlier tests taught both ends (tracepath leaves a to advertise a
    # 1360-byte MSS, and b would never send too big): b must learn it now.
    for node in ("a", "b"):
        assert chain.run(node, "ip", "route", "flush", "cache").returncode == 0
    before = chain.stats("r2")["counters"]["ipv4"] if chain.kind == "tapstack" else None
    r = chain.run("a", "sh", "-c", "curl -sf -m 150 http://10.2.0.2/blob | sha256sum",
                  timeout=180)
    assert r.stdout.split()[0] == chain.blob_sha, r.stderr
    # b's kernel learnt the 1400-byte path from a Fragmentation Needed
    r = chain.run("b", "ip", "route", "get", "10.1.0.2")
    assert "mtu 1400" in r.stdout, r.stdout
    if before is not None:
        after = chain.stats("r2")["counters"]["ipv4"]
        assert after["fwd_frag_needed"] > before["fwd_frag_needed"]
        assert after["forwarded"] - before["forwarded"] > DOWNLOAD_BYTES // 1400


RECEIVER = """
import hashlib, socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("10.2.0.2", 9999))
s.settimeout(10)
print("ready", flush=True)
data, _ = s.recvfrom(65535)
print(len(data), hashlib.sha256(data).hexdigest(), flush=True)
"""

SENDER = """
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IP, 10, 0)  # IP_MTU_DISCOVER = IP_PMTUDISC_DONT: DF clear
s.sendto(bytes(range(250)) * 12, ("10.2.0.2", 9999))
"""


def test_df_clear_udp_of_3000_bytes_is_fragmented_by_the_router_and_arrives_whole(chain):
    recv = subprocess.Popen(["ip", "netns", "exec", f"{chain.name}-b", "python3", "-c",
                             RECEIVER], stdout=subprocess.PIPE, text=True)
    try:
        assert recv.stdout.readline().strip() == "ready"
        assert chain.run("a", "python3", "-c", SENDER).returncode == 0
        line = recv.stdout.readline().split()
    finally:
        recv.kill()
        recv.wait()
    assert line == ["3000", hashlib.sha256(bytes(range(250)) * 12).hexdigest()]
    if chain.kind == "tapstack":
        assert chain.stats("r1")["counters"]["ipv4"]["fwd_fragmented"] >= 1


DUO = """
name = "{name}"
[[segment]]
name = "s1"
[[segment]]
name = "s2"
[[node]]
name = "x"
kind = "linux"
[[node.interface]]
segment = "s1"
addresses = ["10.5.1.2/24"]
[[node.route]]
to = "10.5.2.0/24"
via = "10.5.1.1"
[[node]]
name = "y"
kind = "linux"
[[node.interface]]
segment = "s2"
addresses = ["10.5.2.2/24"]
[[node]]
name = "srv"
kind = "tapstack"
services = {{ echo = false, http = 80 }}
[[node.interface]]
segment = "s1"
addresses = ["10.5.1.1/24"]
[[node.interface]]
segment = "s2"
addresses = ["10.5.2.1/24"]
"""


def capture(lab: Lab, segment: str, path: Path) -> subprocess.Popen:
    proc = subprocess.Popen(tapstack_cmd("lab", "capture", "--lab", lab.name, segment, "-w",
                                         str(path)), stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:  # tcpdump says so once it is listening
        if "listening on" in line:
            return proc
    raise AssertionError("tcpdump did not start")


def http_frames(path: Path) -> list[tuple[bytes, bytes]]:
    out = []
    with open(path, "rb") as f:
        for _ts, raw in dpkt.pcap.Reader(f):
            eth = dpkt.ethernet.Ethernet(raw)
            if isinstance(eth.data, dpkt.ip.IP) and isinstance(eth.data.data, dpkt.tcp.TCP) \
                    and 80 in (eth.data.data.sport, eth.data.data.dport):
                out.append((eth.data.src, eth.data.dst))
    return out


def test_a_node_with_two_interfaces_serves_both_and_replies_by_the_route(tmp_path):
    lab = make_lab(tmp_path, DUO).up()
    try:
        for node, url in (("x", "http://10.5.1.1/"), ("y", "http://10.5.2.1/")):
            r = lab.run(node, "curl", "-sf", "-m", "10", url)
            assert r.returncode == 0 and "tapstack" in r.stdout, r.stderr
        per_if = lab.stats("srv")["interfaces"]
        assert per_if["eth0"]["counters"]["link"]["tx_frames"] > 0
        assert per_if["eth1"]["counters"]["link"]["tx_frames"] > 0
        # x asks for the address of eth1: the answer comes from it, but leaves by eth0,
        # the interface the route back to x chooses; nothing of it crosses s2
        s1, s2 = tmp_path / "s1.pcap", tmp_path / "s2.pcap"
        caps = [capture(lab, "s1", s1), capture(lab, "s2", s2)]
        r = lab.run("x", "curl", "-sf", "-m", "10", "http://10.5.2.1/")
        assert r.returncode == 0, r.stderr
        for proc in caps:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=10)
        on_s1 = http_frames(s1)
        assert (bytes([10, 5, 2, 1]), bytes([10, 5, 1, 2])) in on_s1, on_s1
        assert http_frames(s2) == []
    finally:
        assert lab.down().returncode == 0


SMALL = """
name = "{name}"
[[segment]]
name = "s"
[[node]]
name = "h"
kind = "linux"
commands = ["exec sleep 600"]
[[node.interface]]
segment = "s"
addresses = ["10.6.0.2/24"]
[[node]]
name = "r"
kind = "tapstack"
[[node.interface]]
segment = "s"
addresses = ["10.6.0.1/24"]
"""


def test_lab_down_after_kill_9_leaves_nothing(tmp_path):
    lab = make_lab(tmp_path, SMALL).up()
    status = lab.status()
    (tapstack,) = [n for n in status["nodes"] if n["kind"] == "tapstack"]
    assert tapstack["health"] == "up"
    assert lab.run("h", "ping", "-c", "1", "-W", "2", "10.6.0.1").returncode == 0
    pids = [int(p) for p in subprocess.run(["ip", "netns", "pids", f"{lab.name}-h"],
                                           capture_output=True, text=True).stdout.split()]
    pids.append(tapstack["pid"])
    os.kill(tapstack["pid"], signal.SIGKILL)
    r = lab.down()
    assert r.returncode == 0, r.stderr
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert lab.name not in left
    for pid in pids:  # gone, or a zombie not yet reaped by its parent
        stat = Path(f"/proc/{pid}/stat")
        assert not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] == "Z"
    # every port lived in the lab's namespaces; none leaked into ours
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert "r.eth0" not in links and "h.eth0" not in links
    assert not os.path.exists(f"/run/tapstack/labs/{lab.name}")
    assert not os.path.exists(f"/etc/netns/{lab.name}-h")
    # a second down is harmless
    assert "nothing was up" in lab.down().stdout
