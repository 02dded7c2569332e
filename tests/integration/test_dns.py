"""tapstack's authoritative DNS server on its own UDP and TCP, asked by dig and kdig."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.conftest import REPO, STACK_IP, in_ns, require_tool, tapstack_cmd

ZONES = Path(__file__).resolve().parents[1] / "unit" / "zones"


@pytest.fixture
def dns_stack(start_stack):
    require_tool("dig")
    return start_stack("--dns-zone", str(ZONES / "bob.com.zone"), "--dns-zone",
                       str(ZONES / "100.51.198.in-addr.arpa.zone"))


def dig(ns: str, *args: str) -> str:
    r = in_ns(ns, "dig", f"@{STACK_IP}", "+time=2", "+tries=1", *args)
    assert r.returncode == 0, r.stderr
    return r.stdout


def answers(out: str) -> set[str]:
    section = out.split(";; ANSWER SECTION:\n", 1)
    if len(section) == 1:
        return set()
    lines = section[1].split("\n\n", 1)[0].splitlines()
    return {" ".join(line.split()[i] for i in (0, 3, 4)) + " " + " ".join(line.split()[4:])
            for line in lines}


def test_dig_gets_every_record_kind(dns_stack):
    ns = dns_stack.ns
    out = dig(ns, "bob.com", "A")
    assert "status: NOERROR" in out
    assert re.search(r";; flags: qr aa rd;", out), out  # authoritative, no recursion
    assert re.search(r"^bob\.com\.\s+3600\s+IN\s+A\s+198\.51\.100\.10$", out, re.M)
    cases = {
        ("www6.bob.com", "AAAA"): r"AAAA\s+2001:db8::10",
        ("www.bob.com", "A"): r"CNAME\s+bob\.com\.",
        ("bob.com", "MX"): r"MX\s+10 mail\.bob\.com\.",
        ("bob.com", "TXT"): r'TXT\s+"v=spf1 mx -all"',
        ("bob.com", "NS"): r"NS\s+ns1\.bob\.com\.",
        ("bob.com", "SOA"): r"SOA\s+ns1\.bob\.com\. hostmaster\.bob\.com\. 2026120201",
    }
    for (name, rdtype), pattern in cases.items():
        assert re.search(pattern, dig(ns, name, rdtype)), (name, rdtype)
    assert re.search(r"PTR\s+bob\.com\.", dig(ns, "-x", "198.51.100.10"))


def test_nxdomain_with_soa_and_refused(dns_stack):
    out = dig(dns_stack.ns, "nope.bob.com", "A")
    assert "status: NXDOMAIN" in out
    assert re.search(r"AUTHORITY SECTION:\nbob\.com\.\s+300\s+IN\s+SOA", out)
    assert "status: REFUSED" in dig(dns_stack.ns, "alice.org", "A")


def test_tcp_truncation_fallback_and_badvers(dns_stack):
    ns = dns_stack.ns
    out = dig(dns_stack.ns, "+tcp", "bob.com", "MX")
    assert "status: NOERROR" in out and "MX" in out
    # eight long TXT strings do not fit UDP: dig sees TC and asks again over TCP
    out = dig(ns, "big.bob.com", "TXT")
    assert "Truncated, retrying in TCP mode" in out
    assert len(re.findall(r"^big\.bob\.com\..*TXT", out, re.M)) == 8
    out = dig(ns, "+edns=1", "+noednsnegotiation", "bob.com", "A")
    assert "status: BADVERS" in out
    stats = dns_stack.stats()["dns"]
    assert stats["truncated"] >= 1 and stats["queries_tcp"] >= 2 and stats["badvers"] == 1


def test_kdig_several_queries_on_one_tcp_connection(dns_stack):
    require_tool("kdig")
    r = in_ns(dns_stack.ns, "kdig", f"@{STACK_IP}", "+tcp", "+keepopen", "bob.com", "A",
              "bob.com", "MX", "www6.bob.com", "AAAA", timeout=20)
    assert r.returncode == 0, r.stderr
    assert "198.51.100.10" in r.stdout and "mail.bob.com." in r.stdout
    assert "2001:db8::10" in r.stdout
    stats = dns_stack.stats()
    assert stats["dns"]["queries_tcp"] == 3
    assert stats["tcp"]["passive_opens"] == 1  # one connection carried all three


KERNEL_DNS = """
import asyncio, sys
from stack.apps.dns.server import DnsServer, DnsUdpProtocol
from stack.apps.dns.zone import Zones, load_zone
async def main():
    server = DnsServer(Zones([load_zone(sys.argv[1])]))
    loop = asyncio.get_running_loop()
    await loop.create_datagram_endpoint(lambda: DnsUdpProtocol(server),
                                        local_addr=("0.0.0.0", 53))
    print("ready", flush=True)
    await asyncio.sleep(60)
asyncio.run(main())
"""


def test_tapstack_connect_resolves_a_name_over_its_own_udp(netns, tmp_path):
    """The same DNS server on kernel sockets answers tapstack's stub query; tapstack
    then connects to the address it learnt."""
    require_tool("socat")
    zone = tmp_path / "bob.test.zone"
    zone.write_text("$ORIGIN bob.test.\n$TTL 60\n"
                    "@ IN SOA ns.bob.test. h.bob.test. 1 60 60 60 60\n@ IN NS ns.bob.test.\n"
                    "ns IN A 10.77.0.1\nwww IN A 10.77.0.1\n")
    dns_server = subprocess.Popen(["ip", "netns", "exec", netns, sys.executable, "-c",
                                   KERNEL_DNS, str(zone)], stdout=subprocess.PIPE,
                                  text=True, cwd=REPO)
    peer = subprocess.Popen(["ip", "netns", "exec", netns, "socat", "-u",
                             "SYSTEM:echo hello-from-the-kernel", "TCP4-LISTEN:7000,reuseaddr"])
    try:
        assert dns_server.stdout.readline().strip() == "ready"
        r = subprocess.run(tapstack_cmd("connect", "--netns", netns, "--nameserver",
                                        "10.77.0.1", "www.bob.test", "7000"),
                           cwd=REPO, capture_output=True, text=True, timeout=60,
                           stdin=subprocess.DEVNULL)
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == "hello-from-the-kernel"
        assert "-> www.bob.test:7000" in r.stderr
        r = subprocess.run(tapstack_cmd("connect", "--netns", netns, "--nameserver",
                                        "10.77.0.1", "nope.bob.test", "7000"),
                           cwd=REPO, capture_output=True, text=True, timeout=60,
                           stdin=subprocess.DEVNULL)
        assert r.returncode == 2 and "cannot resolve nope.bob.test: NXDOMAIN" in r.stderr
    finally:
        for proc in (dns_server, peer):
            proc.kill()
            proc.wait()
