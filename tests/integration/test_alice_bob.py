"""The story's lab (labs/alice-bob.toml), every network role a tapstack node: Alice's real
curl resolves www.bob.com through her home router's forwarder and the ISP's resolver
walking root, com. and bob.com., then fetches https://www.bob.com/ through NAT, three
routers, an internet gateway's 1:1 NAT, a network ACL and a security group."""

from __future__ import annotations

import json
import re
import subprocess

import pytest

from tests.integration.conftest import REPO, require_tool, tapstack_cmd

LAB = str(REPO / "labs" / "alice-bob.toml")


def _tapstack(env, *args, timeout=120):
    return subprocess.run(tapstack_cmd(*args), cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    import os

    state = tmp_path_factory.mktemp("state")
    env = {**os.environ, "TAPSTACK_STATE": str(state)}
    r = _tapstack(env, "lab", "up", LAB)
    try:
        assert r.returncode == 0, r.stdout + r.stderr
        ca = _tapstack(env, "ca").stdout.strip()
        yield env, ca
    finally:
        _tapstack(env, "lab", "down", LAB)


def _counters(env, node):
    r = _tapstack(env, "stats", "--netns", "alice-bob-sw", "--node", node, "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)["counters"]


def _dns_load(env):
    """Questions each authoritative server has answered, and what the ISP resolver
    sent upstream."""
    load = {node: sum(v for k, v in _counters(env, node).get("dns", {}).items()
                      if k in ("answers", "referrals", "nodata", "nxdomain"))
            for node in ("root", "comns", "bobns")}
    load["resolver_upstream"] = _counters(env, "resolver")["resolver"]["upstream_queries"]
    return load


def _alice_curl(env, ca, url="https://www.bob.com/"):
    return _tapstack(env, "lab", "exec", "--lab", "alice-bob", "alice", "--", "curl",
                     "-sS", "-v", "--max-time", "20", "--cacert", ca, url, timeout=60)


def test_alice_fetches_bob_over_https_through_every_role(lab):
    env, ca = lab
    before = _dns_load(env)
    r = _alice_curl(env, ca)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "SSL connection using TLSv1.3" in r.stderr
    assert 'subjectAltName: host "www.bob.com" matched' in r.stderr
    # Bob's page names the address it saw: the home router's public one (the internet
    # gateway translated only the destination, 198.51.100.10 -> 10.0.1.10)
    assert re.search(r"\b203\.0\.113\.1\b", r.stdout), r.stdout[:2000]
    first = _dns_load(env)
    for server in ("root", "comns", "bobns"):
        assert first[server] > before[server], (server, before, first)
    # again: the home router answers from its cache; nobody upstream is asked
    r = _alice_curl(env, ca)
    assert r.returncode == 0, r.stderr[-3000:]
    assert _dns_load(env) == first
    home = _counters(env, "home")
    assert home["nat"]["mappings_created"] >= 1
    igw = _counters(env, "igw")
    assert igw["nat"]["static"] >= 1
    subnet = _counters(env, "subnet")
    assert subnet["acl"]["denied_in"] == 0 and subnet["sg"]["denied_in"] == 0


def test_every_router_is_one_hop_on_the_way_to_bob(lab):
    """A TCP traceroute to Bob's public HTTPS port: each router answers at its own TTL
    (each takes exactly one off), the internet gateway too although it rewrote the
    destination, and the last hop is Bob's public address. (The subnet router answers
    from its private address, as a router inside a VPC does; UDP probes die at the
    network ACL, which lets only 80, 443 and ICMP into Bob's subnet.)"""
    env, _ = lab
    r = _tapstack(env, "lab", "exec", "--lab", "alice-bob", "alice", "--", "traceroute",
                  "-n", "-T", "-p", "443", "-w", "2", "-q", "1", "-m", "8", "198.51.100.10",
                  timeout=90)
    hops = [line.split()[1] for line in r.stdout.splitlines()[1:]]
    assert hops == ["192.168.1.1", "203.0.113.14", "192.0.2.2", "198.51.100.2",
                    "10.0.0.2", "198.51.100.10"], r.stdout + r.stderr


def test_the_journey_records_and_tells_every_hop(lab, tmp_path):
    """`tapstack journey` on cold caches, then again: assertions on what it recorded
    (captures and traces), not on its prose."""
    env, _ = lab
    for node in ("home", "resolver"):
        assert _tapstack(env, "dns", "flush", "--netns", "alice-bob-sw", "--node",
                         node).returncode == 0
    out = tmp_path / "first"
    r = _tapstack(env, "journey", "--lab", LAB, "--out", str(out), timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.splitlines()[0].startswith("journey: https://www.bob.com/")
    report = json.loads((out / "journey.json").read_text())
    asked = {s["node"] for s in report["dns"] if s["kind"] == "query"}
    assert {"home", "resolver", "root", "comns", "bobns"} <= asked, report["dns"]
    referrals = [s for s in report["dns"] if s.get("referral")]
    # the resolver walked down: root referred it to com., com. to bob.com. (names in
    # mixed case: it varies the case of its questions, the 0x20 defence against forged answers)
    said = {r.lower() for s in referrals for r in s["referral"]}
    assert {"com. ns ns1.com.", "bob.com. ns ns1.bob.com."} <= said, said
    assert report["tls"]["version"] == "TLSv1.3" and report["tls"]["verified"]
    hops = report["hops"]
    assert [h["segment"] for h in hops] == ["home", "access", "transit", "edge", "vpc",
                                           "subnet"]
    assert [h["ttl"] for h in hops] == [64, 63, 62, 61, 60, 59]  # one per router
    assert hops[0]["src"] == "192.168.1.2" and hops[1]["src"] == "203.0.113.1"  # NAT
    assert hops[3]["dst"] == "198.51.100.10" and hops[4]["dst"] == "10.0.1.10"  # 1:1 NAT
    assert hops[0]["eth_src"] == "00:1a:2b:3c:4d:5e"  # Alice's own MAC, first hop only
    assert report["http"]["client_seen"] == "203.0.113.1"
    assert report["http"]["status"] == 200
    at_subnet = hops[4]["decisions"]
    acl = next(d for d in at_subnet if d["layer"] == "acl")
    assert (acl["event"], acl["direction"], acl["rule"]) == ("allow", "inbound", 100)
    assert any(d["layer"] == "sg" and d["event"] == "allow new flow" for d in at_subnet)
    assert any(d.get("name") == "static" for d in hops[3]["decisions"])  # the gateway
    # each frame the report names is in that segment's capture, and is that SYN
    for hop in hops:
        fields = subprocess.run(["tshark", "-r", report["captures"][hop["segment"]],
                                 "-Y", f"frame.number=={hop['frame']}", "-T", "fields",
                                 "-e", "ip.src", "-e", "ip.dst", "-e", "ip.ttl",
                                 "-e", "tcp.flags.syn", "-e", "tcp.flags.ack"],
                                capture_output=True, text=True, timeout=60).stdout.split()
        assert fields == [hop["src"], hop["dst"], str(hop["ttl"]), "1", "0"], (hop, fields)
    _check_page_in_a_browser(out / "index.html", len(hops), tmp_path)
    # again: the name comes from the home router's cache, nobody upstream is asked
    again = tmp_path / "second"
    r = _tapstack(env, "journey", "--lab", LAB, "--out", str(again), timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads((again / "journey.json").read_text())
    assert {s["node"] for s in report["dns"] if s["kind"] == "query"} == {"home"}


CHROMIUM = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update",
            "--disable-sync"]


def _check_page_in_a_browser(page, hops: int, tmp_path) -> None:
    """Debian's Chromium loads the page from disk: the DOM it built holds one section per
    step and one row per hop, and a screenshot comes out."""
    chromium = require_tool("chromium")
    profile = tmp_path / "chromium-profile"
    dom = subprocess.run(["timeout", "-k", "5", "60", chromium, *CHROMIUM,
                          f"--user-data-dir={profile}", "--dump-dom", page.as_uri()],
                         capture_output=True, text=True, timeout=70).stdout
    assert dom.count("<section") == 4 and dom.count('<tr class="hop">') == hops, dom[:500]
    assert "<h2>3. Hop by hop" in dom
    shot = tmp_path / "page.png"
    subprocess.run(["timeout", "-k", "5", "60", chromium, *CHROMIUM,
                    f"--user-data-dir={profile}", f"--screenshot={shot}",
                    "--window-size=1200,1400", page.as_uri()],
                   capture_output=True, timeout=70)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20000
