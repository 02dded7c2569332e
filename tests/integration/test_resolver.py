"""tapstack's recursive resolver walking a hierarchy of tapstack authoritative servers
(root, com., bob.com.) in a lab, asked by dig and by a Linux host's resolver library."""

from __future__ import annotations

import re
import signal
import subprocess
import time
import uuid
from pathlib import Path

import dpkt
import pytest

from tests.integration.conftest import require_tool, tapstack_cmd
from tests.integration.test_lab import Lab, capture

ZONES = Path(__file__).resolve().parent / "zones"

HIERARCHY = """
name = "{name}"
nameserver = "192.0.2.53"
[[segment]]
name = "net"
[[node]]
name = "root"
kind = "tapstack"
services = {{ echo = false, http = false, dns_zones = ["{zones}/root.zone"] }}
[[node.interface]]
segment = "net"
addresses = ["192.0.2.1/24"]
[[node]]
name = "com"
kind = "tapstack"
services = {{ echo = false, http = false, dns_zones = ["{zones}/com.zone"] }}
[[node.interface]]
segment = "net"
addresses = ["192.0.2.2/24"]
[[node]]
name = "bob"
kind = "tapstack"
services = {{ echo = false, http = false, dns_zones = ["{zones}/bob.com.zone"] }}
[[node.interface]]
segment = "net"
addresses = ["192.0.2.3/24"]
[[node]]
name = "resolver"
kind = "tapstack"
services = {{ echo = false, http = false, resolver = {{ root_hints = "{zones}/root.hints" }} }}
[[node.interface]]
segment = "net"
addresses = ["192.0.2.53/24"]
[[node]]
name = "alice"
kind = "linux"
[[node.interface]]
segment = "net"
addresses = ["192.0.2.100/24"]
"""


@pytest.fixture(scope="module")
def hierarchy(tmp_path_factory):
    require_tool("dig")
    tmp = tmp_path_factory.mktemp("dns")
    name = f"d{uuid.uuid4().hex[:6]}"
    path = tmp / f"{name}.toml"
    path.write_text(HIERARCHY.format(name=name, zones=ZONES))
    lab = Lab(path, name).up()
    lab.tmp = tmp
    try:
        yield lab
    finally:
        assert lab.down().returncode == 0


def dig(lab: Lab, *args: str) -> str:
    r = lab.run("alice", "dig", "@192.0.2.53", "+time=3", "+tries=1", *args)
    assert r.returncode == 0, r.stderr
    return r.stdout


def resolver_counters(lab: Lab) -> dict:
    r = subprocess.run(tapstack_cmd("stats", "--netns", f"{lab.name}-sw", "--node",
                                    "resolver", "--json"), capture_output=True, text=True,
                       timeout=10)
    return __import__("json").loads(r.stdout)["counters"]["resolver"]


def ttl_of(out: str, name: str, rdtype: str) -> int:
    m = re.search(rf"^{re.escape(name)}\s+(\d+)\s+IN\s+{rdtype}\s", out, re.M)
    assert m, out
    return int(m.group(1))


def test_resolution_walks_root_tld_and_leaf_then_answers_from_cache(hierarchy):
    lab = hierarchy
    path = lab.tmp / "net.pcap"
    cap = capture(lab, "net", path)
    out = dig(lab, "www.bob.com", "A")
    assert "status: NOERROR" in out and " ra" in out
    assert re.search(r"^www\.bob\.com\.\s+\d+\s+IN\s+CNAME\s+bob\.com\.$", out, re.M)
    assert re.search(r"^bob\.com\.\s+\d+\s+IN\s+A\s+198\.51\.100\.10$", out, re.M)
    first = ttl_of(out, "bob.com.", "A")
    asked = resolver_counters(lab)["upstream_queries"]
    time.sleep(2.2)
    out = dig(lab, "www.bob.com", "A")  # again: from the cache, its TTL counted down
    assert ttl_of(out, "bob.com.", "A") <= first - 2
    assert resolver_counters(lab)["upstream_queries"] == asked
    cap.send_signal(signal.SIGINT)
    cap.wait(timeout=10)
    servers = []
    with open(path, "rb") as f:
        for _ts, raw in dpkt.pcap.Reader(f):
            eth = dpkt.ethernet.Ethernet(raw)
            ip = eth.data
            if isinstance(ip, dpkt.ip.IP) and isinstance(ip.data, dpkt.udp.UDP) and \
                    ip.data.dport == 53 and ip.src == bytes([192, 0, 2, 53]):
                servers.append(ip.dst[3])
    assert servers == [1, 2, 3]  # root, then com., then bob.com., once each


def test_nxdomain_is_cached(hierarchy):
    lab = hierarchy
    out = dig(lab, "nope.bob.com", "A")
    assert "status: NXDOMAIN" in out and "SOA" in out
    before = resolver_counters(lab)
    assert "status: NXDOMAIN" in dig(lab, "nope.bob.com", "A")
    after = resolver_counters(lab)
    assert after["negative_hits"] == before["negative_hits"] + 1
    assert after["upstream_queries"] == before["upstream_queries"]


def test_a_linux_host_resolves_through_tapstack(hierarchy):
    r = hierarchy.run("alice", "getent", "hosts", "www.bob.com")
    assert r.returncode == 0 and "198.51.100.10" in r.stdout, r.stdout + r.stderr
    r = hierarchy.run("alice", "dig", "+short", "bob.com", "MX")
    assert r.stdout.strip() == "10 mail.bob.com."
