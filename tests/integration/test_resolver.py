"""tapstack's recursive resolver walking a hierarchy of tapstack authoritative servers
(root, com., bob.com.) in a lab, asked by dig and by a Linux host's resolver library."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
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
name = "unbound"
kind = "linux"
commands = ["exec unbound -d -c {unbound_conf}"]
[[node.interface]]
segment = "net"
addresses = ["192.0.2.54/24"]
[[node]]
name = "alice"
kind = "linux"
[[node.interface]]
segment = "net"
addresses = ["192.0.2.100/24"]
"""

# The reference: Debian's Unbound as a plain iterating resolver on the same hierarchy
# (no DNSSEC validation, no query-name minimisation: the same walk as tapstack's).
UNBOUND = """server:
    interface: 192.0.2.54
    access-control: 192.0.2.0/24 allow
    do-ip6: no
    root-hints: "{zones}/root.hints"
    do-not-query-localhost: no
    chroot: ""
    username: ""
    directory: "{tmp}"
    pidfile: ""
    use-syslog: no
    verbosity: 0
    module-config: "iterator"
    qname-minimisation: no
    harden-glue: yes
    minimal-responses: no
remote-control:
    control-enable: no
"""

RESOLVERS = {"tapstack": "192.0.2.53", "unbound": "192.0.2.54"}


@pytest.fixture(scope="module")
def hierarchy(tmp_path_factory):
    require_tool("dig")
    require_tool("unbound")
    tmp = tmp_path_factory.mktemp("dns")
    name = f"d{uuid.uuid4().hex[:6]}"
    conf = tmp / "unbound.conf"
    conf.write_text(UNBOUND.format(zones=ZONES, tmp=tmp))
    path = tmp / f"{name}.toml"
    path.write_text(HIERARCHY.format(name=name, zones=ZONES, unbound_conf=conf))
    lab = Lab(path, name).up()
    lab.tmp = tmp
    try:
        deadline = time.monotonic() + 15
        while lab.run("alice", "dig", "@192.0.2.54", "+time=1", "+tries=1", "a.root",
                      "A").returncode != 0:
            assert time.monotonic() < deadline, "unbound never answered"
            time.sleep(0.2)
        yield lab
    finally:
        assert lab.down().returncode == 0


def dig(lab: Lab, *args: str, server: str = "192.0.2.53") -> str:
    r = lab.run("alice", "dig", f"@{server}", "+time=3", "+tries=1", *args)
    assert r.returncode == 0, r.stderr
    return r.stdout


def resolver_counters(lab: Lab) -> dict:
    r = subprocess.run(tapstack_cmd("stats", "--netns", f"{lab.name}-sw", "--node",
                                    "resolver", "--json"), capture_output=True, text=True,
                       timeout=10)
    return json.loads(r.stdout)["counters"]["resolver"]


def ttl_of(out: str, name: str, rdtype: str) -> int:
    m = re.search(rf"^{re.escape(name)}\s+(\d+)\s+IN\s+{rdtype}\s", out, re.M)
    assert m, out
    return int(m.group(1))


def upstream(lab: Lab, path: Path, resolver: str) -> list[int]:
    """The last byte of every server the resolver sent a query to, in order."""
    out = []
    with open(path, "rb") as f:
        for _ts, raw in dpkt.pcap.Reader(f):
            ip = dpkt.ethernet.Ethernet(raw).data
            if isinstance(ip, dpkt.ip.IP) and isinstance(ip.data, dpkt.udp.UDP) and \
                    ip.data.dport == 53 and ip.src == bytes(map(int, resolver.split("."))):
                out.append(ip.dst[3])
    return out


def answer_records(out: str) -> set[tuple[str, str, str]]:
    section = out.split(";; ANSWER SECTION:\n", 1)[1].split("\n\n", 1)[0]
    return {(f[0], f[3], " ".join(f[4:])) for f in (ln.split() for ln in section.splitlines())}


@pytest.mark.parametrize("kind", ["tapstack", "unbound"])
def test_resolution_walks_root_tld_and_leaf_then_answers_from_cache(hierarchy, kind):
    lab, server = hierarchy, RESOLVERS[kind]
    name = "mail.bob.com"  # a name no other test asks first
    first_cap = lab.tmp / f"{kind}-first.pcap"
    cap = capture(lab, "net", first_cap)
    out = dig(lab, name, "A", server=server)
    cap.send_signal(signal.SIGINT)
    cap.wait(timeout=10)
    assert "status: NOERROR" in out and " ra" in out
    assert answer_records(out) == {("mail.bob.com.", "A", "198.51.100.25")}
    first = ttl_of(out, "mail.bob.com.", "A")
    asked = upstream(lab, first_cap, server)
    assert {1, 2, 3} <= set(asked)  # root, com., bob.com.
    if kind == "tapstack":
        assert asked == [1, 2, 3]  # once each
    time.sleep(2.2)
    second_cap = lab.tmp / f"{kind}-second.pcap"
    cap = capture(lab, "net", second_cap)
    out = dig(lab, name, "A", server=server)  # again: from the cache, TTL counted down
    cap.send_signal(signal.SIGINT)
    cap.wait(timeout=10)
    assert ttl_of(out, "mail.bob.com.", "A") <= first - 2
    assert upstream(lab, second_cap, server) == []


def test_tapstack_and_unbound_give_the_same_answers(hierarchy):
    for args in (("www.bob.com", "A"), ("bob.com", "MX"), ("www.bob.com", "CNAME"),
                 ("big.bob.com", "TXT")):
        ours = answer_records(dig(hierarchy, *args, server=RESOLVERS["tapstack"]))
        theirs = answer_records(dig(hierarchy, *args, server=RESOLVERS["unbound"]))
        assert ours == theirs, args


@pytest.mark.parametrize("kind", ["tapstack", "unbound"])
def test_nxdomain_is_cached(hierarchy, kind):
    lab, server = hierarchy, RESOLVERS[kind]
    out = dig(lab, f"nope-{kind}.bob.com", "A", server=server)
    assert "status: NXDOMAIN" in out and "SOA" in out
    path = lab.tmp / f"{kind}-nx.pcap"
    cap = capture(lab, "net", path)
    assert "status: NXDOMAIN" in dig(lab, f"nope-{kind}.bob.com", "A", server=server)
    cap.send_signal(signal.SIGINT)
    cap.wait(timeout=10)
    assert upstream(lab, path, server) == []
    if kind == "tapstack":
        assert resolver_counters(lab)["negative_hits"] >= 1


def test_a_linux_host_resolves_through_tapstack(hierarchy):
    r = hierarchy.run("alice", "getent", "hosts", "www.bob.com")
    assert r.returncode == 0 and "198.51.100.10" in r.stdout, r.stdout + r.stderr
    r = hierarchy.run("alice", "dig", "+short", "bob.com", "MX")
    assert r.stdout.strip() == "10 mail.bob.com."


FORGER = r"""
import socket, struct, sys
import dns.message, dns.rrset, dns.flags
sniff = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0800))
sniff.bind(("eth0", 0))
sniff.settimeout(10)
print("ready", flush=True)
while True:
    frame = sniff.recv(65535)
    ip = frame[14:]
    hl = (ip[0] & 15) * 4
    if ip[9] == 17 and ip[16:20] == socket.inet_aton("192.0.2.99") and \
            struct.unpack("!H", ip[hl + 2:hl + 4])[0] == 53:
        break
sport = struct.unpack("!H", ip[hl:hl + 2])[0]
query = dns.message.from_wire(ip[hl + 8:])
q = query.question[0]
def answer(qname, ident, address, extra=None):
    r = dns.message.make_response(query)
    r.id = ident
    r.flags |= dns.flags.AA
    r.answer = [dns.rrset.from_text(qname, 300, "IN", "A", address)]
    if extra:
        r.additional = [extra]
    return r
target = ("192.0.2.53", sport)
good = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
good.bind(("192.0.2.99", 53))
other = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
other.bind(("192.0.2.99", 5353))
wrong_id = answer(q.name, (query.id + 1) & 0xFFFF, "6.6.6.1")
good.sendto(wrong_id.to_wire(), target)
wrong_q = dns.message.make_query("www.evil.com.", "A")
wrong_q.id = query.id
forged = dns.message.make_response(wrong_q)
forged.answer = [dns.rrset.from_text("www.evil.com.", 300, "IN", "A", "6.6.6.2")]
good.sendto(forged.to_wire(), target)
other.sendto(answer(q.name, query.id, "6.6.6.3").to_wire(), target)
poison = dns.rrset.from_text("evil.bob.com.", 300, "IN", "A", "6.6.6.4")
good.sendto(answer(q.name, query.id, "203.0.113.99", poison).to_wire(), target)
print("sent", q.name, flush=True)
"""


def test_forged_answers_are_ignored_and_the_real_one_wins(hierarchy):
    """The resolver asks ns1.slow.com. (192.0.2.99, which only alice's sniffer hears):
    answers with the wrong ID, for the wrong question, from the wrong port, are dropped
    and counted; the real one is believed, but not the record it carries for another
    zone (bailiwick)."""
    lab = hierarchy
    lab.run("alice", "ip", "addr", "add", "192.0.2.99/24", "dev", "eth0")
    lab.run("alice", "iptables", "-A", "INPUT", "-d", "192.0.2.99", "-p", "udp",
            "--dport", "53", "-j", "DROP")  # alice's kernel must not answer for it
    before = resolver_counters(lab)
    forger = subprocess.Popen(["ip", "netns", "exec", f"{lab.name}-alice",
                               sys.executable, "-c", FORGER],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert forger.stdout.readline().strip() == "ready"
        out = dig(lab, "www.slow.com", "A")
        forger.wait(timeout=15)
    finally:
        if forger.poll() is None:
            forger.kill()
            forger.wait()
    assert re.search(r"^www\.slow\.com\.\s+\d+\s+IN\s+A\s+203\.0\.113\.99$", out, re.M), \
        out + forger.stderr.read()
    after = resolver_counters(lab)
    assert after["wrong_id"] == before["wrong_id"] + 1
    assert after["wrong_question"] == before["wrong_question"] + 1
    assert after["out_of_bailiwick"] >= before["out_of_bailiwick"] + 1
    r = subprocess.run(tapstack_cmd("stats", "--netns", f"{lab.name}-sw", "--node",
                                    "resolver", "--json"), capture_output=True, text=True,
                       timeout=10)
    assert json.loads(r.stdout)["counters"]["udp"]["rx_filtered"] >= 1
    # the poisoned record was not believed: bob.com.'s own server says there is none
    assert "status: NXDOMAIN" in dig(lab, "evil.bob.com", "A")


def test_dns_cache_lists_and_flush_empties(hierarchy):
    lab = hierarchy
    dig(lab, "bob.com", "MX")

    def dns(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(tapstack_cmd("dns", *args, "--netns", f"{lab.name}-sw",
                                           "--node", "resolver"),
                              capture_output=True, text=True, timeout=10)

    listing = dns("cache")
    assert listing.returncode == 0 and re.search(r"^bob\.com\.\s+MX\s+\d+ s  from "
                                                 r"192\.0\.2\.3$", listing.stdout, re.M), \
        listing.stdout
    assert "flushed" in dns("flush").stdout
    assert dns("cache").stdout.strip().endswith("tapstack dns: 0 entries")
    r = subprocess.run(tapstack_cmd("dns", "cache", "--netns", f"{lab.name}-sw", "--node",
                                    "bob"), capture_output=True, text=True, timeout=10)
    assert r.returncode == 2 and "runs no resolver" in r.stderr


def test_a_truncated_upstream_answer_is_fetched_over_tcp(hierarchy):
    out = dig(hierarchy, "big.bob.com", "TXT")  # too big for UDP at every hop
    assert len(re.findall(r"^big\.bob\.com\..*TXT", out, re.M)) == 8, out
    counters = resolver_counters(hierarchy)
    assert counters["truncated_answers"] >= 1 and counters["upstream_queries_tcp"] >= 1
