"""NAT with real Linux hosts on both sides, in labs: a home router that masquerades a LAN
(tapstack, and a Linux router with iptables MASQUERADE as the reference that proves each
test), a 1:1 gateway, NAT444, and the connection tracker's limits.

    laptop 192.168.1.2, laptop2 192.168.1.3 (http.server :8000)
      | home
    router 192.168.1.1 | 203.0.113.1 (NAT)
      | internet: server 203.0.113.10 (http :8080, UDP echo :7), server2 .20 (UDP echo),
      |           r2 203.0.113.254 (Linux router)
    r2 198.51.100.1 | far (MTU 1400): farhost 198.51.100.10 (TCP sink :9000)
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
import uuid
from pathlib import Path

import dpkt
import pytest

from tests.integration.conftest import require_tool, tapstack_cmd
from tests.integration.test_lab import Lab, capture, lab_cli

HOME = """
name = "{name}"
[[segment]]
name = "home"
[[segment]]
name = "internet"
[[segment]]
name = "far"
mtu = 1400

[[node]]
name = "laptop"
kind = "linux"
[[node.interface]]
segment = "home"
addresses = ["192.168.1.2/24"]
[[node.route]]
to = "default"
via = "192.168.1.1"

[[node]]
name = "laptop2"
kind = "linux"
commands = ["cd {www} && exec python3 -m http.server 8000 --bind 192.168.1.3"]
[[node.interface]]
segment = "home"
addresses = ["192.168.1.3/24"]
[[node.route]]
to = "default"
via = "192.168.1.1"

[[node]]
name = "router"
kind = "{kind}"
forwarding = true
{router_extra}
[[node.interface]]
name = "lan"
segment = "home"
addresses = ["192.168.1.1/24"]
[[node.interface]]
name = "wan"
segment = "internet"
addresses = ["203.0.113.1/24"]
[[node.route]]
to = "198.51.100.0/24"
via = "203.0.113.254"

[[node]]
name = "server"
kind = "linux"
commands = ["cd {www} && exec python3 -m http.server 8080 --bind 203.0.113.10",
            "exec socat UDP4-RECVFROM:7,bind=203.0.113.10,fork EXEC:cat"]
[[node.interface]]
segment = "internet"
addresses = ["203.0.113.10/24"]
[[node.route]]
to = "198.51.100.0/24"
via = "203.0.113.254"

[[node]]
name = "server2"
kind = "linux"
commands = ["exec socat UDP4-RECVFROM:7,bind=203.0.113.20,fork EXEC:cat"]
[[node.interface]]
segment = "internet"
addresses = ["203.0.113.20/24"]

[[node]]
name = "r2"
kind = "linux"
forwarding = true
[[node.interface]]
segment = "internet"
addresses = ["203.0.113.254/24"]
[[node.interface]]
segment = "far"
addresses = ["198.51.100.1/24"]

[[node]]
name = "farhost"
kind = "linux"
commands = ["exec socat -u TCP4-LISTEN:9000,bind=198.51.100.10,reuseaddr,fork OPEN:/dev/null"]
[[node.interface]]
segment = "far"
mtu = 1500  # it offers a 1460-byte MSS: only r2's 1400-byte side knows better
addresses = ["198.51.100.10/24"]
[[node.route]]
to = "default"
via = "198.51.100.1"
"""

TAPSTACK_NAT = (
    'services = { echo = false, http = false }\n'
    'conntrack = { udp = 4 }\n'
    'nat = { masquerade = [{ interface = "wan" }], forward = [{ protocol = "tcp", '
    'interface = "wan", port = 8080, to = "192.168.1.3:8000" }] }')

# The reference: what a Linux home router is configured with. Hairpinning needs its own
# SNAT rule on Linux (tapstack does it by itself, RFC 4787 REQ-9).
LINUX_NAT = [
    "iptables -t nat -A POSTROUTING -o wan -j MASQUERADE",
    "iptables -t nat -A PREROUTING -d 203.0.113.1 -p tcp --dport 8080 "
    "-j DNAT --to-destination 192.168.1.3:8000",
    "iptables -t nat -A POSTROUTING -s 192.168.1.0/24 -d 192.168.1.3 -p tcp --dport 8000 "
    "-j SNAT --to-source 203.0.113.1",
    "sysctl -qw net.netfilter.nf_conntrack_udp_timeout=4",
    "sysctl -qw net.netfilter.nf_conntrack_udp_timeout_stream=4",
    "echo 0 > /proc/sys/net/ipv4/icmp_ratelimit",
]

PUBLIC = "203.0.113.1"
INSIDE = ("192.168.1.2", "192.168.1.3")


def make(tmp: Path, template: str, **fields) -> Lab:
    name = f"n{uuid.uuid4().hex[:6]}"
    path = tmp / f"{name}.toml"
    path.write_text(template.format(name=name, **fields))
    return Lab(path, name)


@pytest.fixture(scope="module", params=["tapstack", "linux"])
def home(request, tmp_path_factory):
    for tool in ("socat", "iptables", "traceroute", "tracepath"):
        require_tool(tool)
    tmp = tmp_path_factory.mktemp("home")
    www = tmp / "www"
    www.mkdir()
    (www / "index.html").write_text("laptop2's page\n")
    kind = request.param
    lab = make(tmp, HOME, kind=kind, www=www,
               router_extra=TAPSTACK_NAT if kind == "tapstack" else "")
    lab.kind = kind
    lab.tmp = tmp
    lab.up()
    try:
        if kind == "linux":
            for cmd in LINUX_NAT:
                r = lab.run("router", "sh", "-c", cmd)
                assert r.returncode == 0, (cmd, r.stderr)
        deadline = time.monotonic() + 15
        while lab.run("laptop", "curl", "-s", "-o", "/dev/null", "-m", "2",
                      "http://203.0.113.10:8080/").returncode != 0:
            assert time.monotonic() < deadline, "the server never answered through the NAT"
            time.sleep(0.2)
        yield lab
    finally:
        assert lab.down().returncode == 0


def frames(path: Path) -> list[dpkt.ip.IP]:
    out = []
    with open(path, "rb") as f:
        for _ts, raw in dpkt.pcap.Reader(f):
            eth = dpkt.ethernet.Ethernet(raw)
            if isinstance(eth.data, dpkt.ip.IP):
                out.append(eth.data)
    return out


def addr(b: bytes) -> str:
    return ".".join(str(x) for x in b)


class Capture:
    def __init__(self, lab: Lab, segment: str) -> None:
        self.path = lab.tmp / f"{segment}-{uuid.uuid4().hex[:6]}.pcap"
        self.proc = capture(lab, segment, self.path)

    def stop(self) -> list[dpkt.ip.IP]:
        time.sleep(0.2)  # the last replies
        self.proc.send_signal(signal.SIGINT)
        self.proc.wait(timeout=10)
        return frames(self.path)


def udp_exchange(lab: Lab, node: str, dst: str, sport: int, payload: str = "hi") -> str:
    r = lab.run(node, "sh", "-c", f"echo {payload} | timeout -k 1 3 socat -t 1 - "
                                  f"UDP4:{dst}:7,sourceport={sport},reuseaddr")
    return r.stdout.strip()


def test_tcp_udp_and_ping_leave_with_the_public_address_only(home):
    cap = Capture(home, "internet")
    assert home.run("laptop", "curl", "-sf", "-m", "5", "http://203.0.113.10:8080/"
                    ).returncode == 0
    assert udp_exchange(home, "laptop", "203.0.113.10", 41000) == "hi"
    assert " 0% packet loss" in home.run("laptop", "ping", "-c", "2", "-W", "2",
                                         "203.0.113.10").stdout
    seen = cap.stop()
    ends = {addr(p.src) for p in seen} | {addr(p.dst) for p in seen}
    assert PUBLIC in ends and "203.0.113.10" in ends
    assert not any(a.startswith("192.168.") for a in ends), ends
    assert {p.p for p in seen} >= {1, 6, 17}


def test_two_lan_hosts_with_the_same_port_get_distinct_mappings(home):
    cap = Capture(home, "internet")
    assert udp_exchange(home, "laptop", "203.0.113.10", 42000) == "hi"
    assert udp_exchange(home, "laptop2", "203.0.113.10", 42000) == "hi"
    sports = {p.data.sport for p in cap.stop()
              if p.p == 17 and addr(p.src) == PUBLIC and p.data.dport == 7}
    assert len(sports) == 2 and 42000 in sports  # the first keeps its port


def test_same_inside_port_same_public_port_towards_two_servers(home):
    cap = Capture(home, "internet")
    assert udp_exchange(home, "laptop", "203.0.113.10", 43000) == "hi"
    assert udp_exchange(home, "laptop", "203.0.113.20", 43000) == "hi"
    sent = cap.stop()
    ports = {addr(p.dst): p.data.sport for p in sent
             if p.p == 17 and addr(p.src) == PUBLIC and p.data.dport == 7}
    assert ports == {"203.0.113.10": 43000, "203.0.113.20": 43000}


def test_mapping_stays_endpoint_independent_when_the_port_is_taken(home):
    """laptop2 holds public port 44000 first; laptop's port 44000 then needs another
    one, and both servers must see that same one (RFC 4787 REQ-1). Linux's MASQUERADE
    makes no such promise (it picks per connection); here it is only observed."""
    assert udp_exchange(home, "laptop2", "203.0.113.10", 44000) == "hi"
    cap = Capture(home, "internet")
    assert udp_exchange(home, "laptop", "203.0.113.10", 44000) == "hi"
    assert udp_exchange(home, "laptop", "203.0.113.20", 44000) == "hi"
    ports = {addr(p.dst): p.data.sport for p in cap.stop()
             if p.p == 17 and addr(p.src) == PUBLIC and p.data.dport == 7}
    assert ports["203.0.113.10"] != 44000
    if home.kind == "tapstack":
        assert ports["203.0.113.20"] == ports["203.0.113.10"]
    else:
        print(f"Linux MASQUERADE chose {ports} for one inside endpoint")


def test_port_forward_and_hairpinning(home):
    # from the internet, through the forward
    r = home.run("server", "curl", "-sf", "-m", "5", "http://203.0.113.1:8080/")
    assert r.stdout == "laptop2's page\n", r.stderr
    # from the LAN, through the public address: laptop2 must see the public address
    cap = Capture(home, "home")
    r = home.run("laptop", "curl", "-sf", "-m", "5", "http://203.0.113.1:8080/")
    assert r.stdout == "laptop2's page\n", r.stderr
    syns = [p for p in cap.stop() if p.p == 6 and p.data.flags & dpkt.tcp.TH_SYN
            and not p.data.flags & dpkt.tcp.TH_ACK and p.data.dport == 8000]
    assert [addr(p.src) for p in syns] == [PUBLIC]


def test_traceroute_from_behind_the_nat(home):
    r = home.run("laptop", "timeout", "-k", "2", "30", "traceroute", "-n", "-q", "1", "-w",
                 "2", "198.51.100.10")
    hops = [line.split()[1] for line in r.stdout.splitlines()[1:]]
    assert hops == ["192.168.1.1", "203.0.113.254", "198.51.100.10"], r.stdout


def test_path_mtu_discovery_through_the_nat(home):
    """r2's Fragmentation Needed goes to the public address; the NAT must turn it back
    to laptop, quote and all, or the upload stalls in a PMTU black hole."""
    home.run("laptop", "ip", "route", "flush", "cache")
    r = home.run("laptop", "sh", "-c", "head -c 3000000 /dev/zero | "
                                       "timeout -k 2 60 socat -u - TCP4:198.51.100.10:9000",
                 timeout=90)
    assert r.returncode == 0, r.stderr
    assert "mtu 1400" in home.run("laptop", "ip", "route", "get", "198.51.100.10").stdout
    r = home.run("laptop", "timeout", "-k", "2", "30", "tracepath", "-n", "198.51.100.10")
    assert "pmtu 1400" in r.stdout, r.stdout


def test_unsolicited_syn_on_the_public_address(home):
    """RFC 5382 REQ-4: no answer to an unsolicited SYN. tapstack stays silent; Linux
    answers with a RST (its own TCP owns the port)."""
    cap = Capture(home, "internet")
    home.run("server", "timeout", "3", "socat", "-T", "1", "-",
             "TCP4:203.0.113.1:45000,connect-timeout=1")
    resets = [p for p in cap.stop() if p.p == 6 and addr(p.src) == PUBLIC
              and p.data.flags & dpkt.tcp.TH_RST]
    if home.kind == "tapstack":
        assert resets == []
        assert home.stats("router")["counters"]["nat"]["unsolicited"] >= 1
    else:
        assert resets


def test_udp_entries_expire_on_the_shortened_schedule(home):
    assert udp_exchange(home, "laptop", "203.0.113.10", 46000) == "hi"
    if home.kind == "tapstack":
        def entries() -> list:
            r = subprocess.run(tapstack_cmd("conntrack", "--netns", f"{home.name}-sw",
                                            "--node", "router", "--json"),
                               capture_output=True, text=True, timeout=10)
            flows = json.loads(r.stdout)["flows"]
            return [f for f in flows if f["original"]["sport"] == 46000]
    else:
        def entries() -> list:
            r = home.run("router", "conntrack", "-L", "-p", "udp", "--sport", "46000")
            return [ln for ln in r.stdout.splitlines() if "46000" in ln]
        require_tool("conntrack")
    assert entries()
    start = time.monotonic()
    while entries():
        assert time.monotonic() - start < 15, "the UDP entry did not expire"
        time.sleep(0.25)
    assert time.monotonic() - start >= 2.5  # 4 s after the reply, minus what passed


INJECT = r"""
import socket, struct, sys
def csum(b):
    if len(b) % 2: b += b"\0"
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    while s >> 16: s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF
src, dst = socket.inet_aton("203.0.113.10"), socket.inet_aton("203.0.113.1")
inner = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 28, 1, 0, 64, 17, 0, dst, src)
inner = inner[:10] + struct.pack("!H", csum(inner)) + inner[12:]
inner += struct.pack("!HHHH", 55555, 7, 8, 0)
icmp = struct.pack("!BBHI", 3, 3, 0, 0) + inner
icmp = icmp[:2] + struct.pack("!H", csum(icmp)) + icmp[4:]
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
s.sendto(icmp, ("203.0.113.1", 0))
"""


def test_an_icmp_error_for_no_tracked_flow_goes_nowhere(home):
    tapstack = home.kind == "tapstack"
    if tapstack:
        before = home.stats("router")["counters"]["conntrack"]["related_unmatched"]
    cap = Capture(home, "home")
    assert home.run("server", "python3", "-c", INJECT).returncode == 0
    time.sleep(0.3)
    assert [p for p in cap.stop() if p.p == 1] == []  # nothing reaches the LAN
    if tapstack:
        after = home.stats("router")["counters"]["conntrack"]["related_unmatched"]
        assert after == before + 1


GATEWAY = """
name = "{name}"
[[segment]]
name = "internet"
[[segment]]
name = "vpc"
[[node]]
name = "client"
kind = "linux"
[[node.interface]]
segment = "internet"
addresses = ["198.51.100.7/24"]
[[node]]
name = "igw"
kind = "{kind}"
forwarding = true
{extra}
[[node.interface]]
name = "pub"
segment = "internet"
addresses = ["198.51.100.1/24", "198.51.100.10/24"]
[[node.interface]]
name = "vpc"
segment = "vpc"
addresses = ["10.0.1.1/24"]
[[node]]
name = "bob"
kind = "linux"
commands = ["cd {www} && exec python3 -m http.server 80 --bind 10.0.1.10"]
[[node.interface]]
segment = "vpc"
addresses = ["10.0.1.10/24"]
[[node.route]]
to = "default"
via = "10.0.1.1"
"""


@pytest.mark.parametrize("kind", ["tapstack", "linux"])
def test_one_to_one_nat_reaches_a_private_server_on_its_public_address(tmp_path, kind):
    www = tmp_path / "www"
    www.mkdir()
    (www / "index.html").write_text("bob\n")
    extra = ('services = { echo = false, http = false }\n'
             'nat = { static = [{ public = "198.51.100.10", private = "10.0.1.10" }] }'
             if kind == "tapstack" else "")
    lab = make(tmp_path, GATEWAY, kind=kind, extra=extra, www=www).up()
    lab.tmp = tmp_path
    try:
        if kind == "linux":
            for cmd in ("iptables -t nat -A PREROUTING -d 198.51.100.10 "
                        "-j DNAT --to-destination 10.0.1.10",
                        "iptables -t nat -A POSTROUTING -s 10.0.1.10 -o pub "
                        "-j SNAT --to-source 198.51.100.10"):
                assert lab.run("igw", "sh", "-c", cmd).returncode == 0
        cap = Capture(lab, "internet")
        deadline = time.monotonic() + 10
        while True:
            r = lab.run("client", "curl", "-sf", "-m", "2", "http://198.51.100.10/")
            if r.stdout == "bob\n" or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert r.stdout == "bob\n", r.stderr
        seen = cap.stop()
        from_bob = {addr(p.src) for p in seen if p.p == 6 and p.data.sport == 80}
        assert from_bob == {"198.51.100.10"}
    finally:
        assert lab.down().returncode == 0


NAT444 = """
name = "{name}"
[[segment]]
name = "home"
[[segment]]
name = "isp"
[[segment]]
name = "internet"
[[node]]
name = "laptop"
kind = "linux"
[[node.interface]]
segment = "home"
addresses = ["192.168.1.2/24"]
[[node.route]]
to = "default"
via = "192.168.1.1"
[[node]]
name = "home"
kind = "tapstack"
forwarding = true
services = {{ echo = false, http = false }}
nat = {{ masquerade = [{{ interface = "wan" }}] }}
[[node.interface]]
name = "lan"
segment = "home"
addresses = ["192.168.1.1/24"]
[[node.interface]]
name = "wan"
segment = "isp"
addresses = ["100.64.0.2/24"]
[[node.route]]
to = "default"
via = "100.64.0.1"
[[node]]
name = "cgn"
kind = "tapstack"
forwarding = true
services = {{ echo = false, http = false }}
nat = {{ masquerade = [{{ interface = "wan", sources = ["100.64.0.0/10"] }}], \
ports_per_subscriber = 1000 }}
[[node.interface]]
name = "inside"
segment = "isp"
addresses = ["100.64.0.1/24"]
[[node.interface]]
name = "wan"
segment = "internet"
addresses = ["203.0.113.1/24"]
[[node]]
name = "server"
kind = "linux"
commands = ["cd /tmp && exec python3 -m http.server 8080 --bind 203.0.113.10"]
[[node.interface]]
segment = "internet"
addresses = ["203.0.113.10/24"]
"""


def conntrack_of(lab: Lab, node: str) -> list[dict]:
    r = subprocess.run(tapstack_cmd("conntrack", "--netns", f"{lab.name}-sw", "--node", node,
                                    "--json"), capture_output=True, text=True, timeout=10)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)["flows"]


def test_nat444_each_layer_translates_once(tmp_path):
    lab = make(tmp_path, NAT444).up()
    try:
        deadline = time.monotonic() + 10
        while lab.run("laptop", "curl", "-sf", "-m", "2", "-o", "/dev/null",
                      "http://203.0.113.10:8080/").returncode != 0:
            assert time.monotonic() < deadline, "no way through two NATs"
            time.sleep(0.2)
        home_flows = [f for f in conntrack_of(lab, "home") if f["protocol"] == "tcp"]
        cgn_flows = [f for f in conntrack_of(lab, "cgn") if f["protocol"] == "tcp"]
        assert {(f["original"]["src"], f["reply"]["dst"]) for f in home_flows} == \
            {("192.168.1.2", "100.64.0.2")}
        assert {(f["original"]["src"], f["reply"]["dst"]) for f in cgn_flows} == \
            {("100.64.0.2", "203.0.113.1")}
    finally:
        assert lab.down().returncode == 0


FLOOD = """
name = "{name}"
[[segment]]
name = "home"
[[segment]]
name = "internet"
[[node]]
name = "laptop"
kind = "linux"
[[node.interface]]
segment = "home"
addresses = ["192.168.1.2/24"]
[[node.route]]
to = "default"
via = "192.168.1.1"
[[node]]
name = "attacker"
kind = "linux"
[[node.interface]]
segment = "home"
addresses = ["192.168.1.66/24"]
[[node.route]]
to = "default"
via = "192.168.1.1"
[[node]]
name = "router"
kind = "tapstack"
forwarding = true
services = {{ echo = false, http = false }}
conntrack = {{ max_entries = 200 }}
nat = {{ masquerade = [{{ interface = "wan" }}] }}
[[node.interface]]
name = "lan"
segment = "home"
addresses = ["192.168.1.1/24"]
[[node.interface]]
name = "wan"
segment = "internet"
addresses = ["203.0.113.1/24"]
[[node]]
name = "server"
kind = "linux"
commands = ["cd {www} && exec python3 -m http.server 8080 --bind 203.0.113.10"]
[[node.interface]]
segment = "internet"
addresses = ["203.0.113.10/24"]
"""


def test_a_table_full_of_spoofed_syns_does_not_stop_an_established_download(tmp_path):
    require_tool("hping3")
    www = tmp_path / "www"
    www.mkdir()
    blob = os.urandom(30_000_000)
    (www / "blob").write_bytes(blob)
    lab = make(tmp_path, FLOOD, www=www).up()
    try:
        deadline = time.monotonic() + 10
        while lab.run("laptop", "curl", "-sf", "-m", "2", "-o", "/dev/null",
                      "http://203.0.113.10:8080/").returncode != 0:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        # a slow download, so that the flood overlaps it
        download = subprocess.Popen(
            ["ip", "netns", "exec", f"{lab.name}-laptop", "sh", "-c",
             "curl -sf -m 60 --limit-rate 5M http://203.0.113.10:8080/blob | sha256sum"],
            stdout=subprocess.PIPE, text=True)
        time.sleep(0.5)
        flood = subprocess.Popen(
            ["ip", "netns", "exec", f"{lab.name}-attacker", "timeout", "-k", "2", "-s",
             "INT", "4", "hping3", "-q", "-S", "-i", "u200", "-p", "8080", "--rand-source",
             "203.0.113.10"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)
        try:
            flood.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(flood.pid, signal.SIGKILL)
            flood.wait()
        out, _ = download.communicate(timeout=90)
        assert out.split()[0] == hashlib.sha256(blob).hexdigest()
        counters = lab.stats("router")["counters"]["conntrack"]
        assert counters["evicted"] + counters["table_full"] > 0, counters
        assert lab.stats("router")["counters"]["conntrack"]["entries"] <= 200
    finally:
        assert lab.down().returncode == 0


def test_lab_rejects_nat_on_a_linux_node(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('name = "bad"\n[[segment]]\nname = "s"\n[[node]]\nname = "a"\n'
                    'kind = "linux"\nnat = { masquerade = [] }\n[[node.interface]]\n'
                    'segment = "s"\n')
    r = lab_cli("up", str(path))
    assert r.returncode == 2 and "only tapstack nodes take NAT" in r.stderr
    assert not os.path.exists("/run/netns/bad-sw")
