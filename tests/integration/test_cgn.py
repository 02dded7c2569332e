"""The story behind carrier-grade NAT (labs/alice-bob-cgn.toml): the home router's WAN has
a shared address (RFC 6598, 100.64.0.2) and the ISP router translates its customers
again to its own public address (203.0.113.33) on the way out: NAT444. Alice's real curl
still reaches https://www.bob.com/, Bob sees the ISP's address, each NAT holds its own
half of the translation, and traceroute and the journey see every router once."""

from __future__ import annotations

import json
import os
import re
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.integration.conftest import REPO, tapstack_cmd

LAB = str(REPO / "labs" / "alice-bob-cgn.toml")
SW = "alice-bob-cgn-sw"
ALICE, HOME_WAN, CGN = "192.168.1.2", "100.64.0.2", "203.0.113.33"


def _tapstack(env, *args, timeout=60):
    return subprocess.run(tapstack_cmd(*args), cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=env)


def _ask(env, *requests: tuple[str, str]) -> list[dict]:
    """`tapstack stats` or `conntrack` (--json) of several nodes at once: each is a
    process of its own, so they run side by side."""
    def one(request: tuple[str, str]) -> dict:
        command, node = request
        r = _tapstack(env, command, "--netns", SW, "--node", node, "--json", timeout=20)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    with ThreadPoolExecutor(len(requests)) as pool:
        return list(pool.map(one, requests))


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    state = tmp_path_factory.mktemp("state")
    env = {**os.environ, "TAPSTACK_STATE": str(state)}
    ours = True
    try:
        r = _tapstack(env, "lab", "up", LAB, timeout=120)
        # the lab's names are fixed: another run's lab is not ours to take down
        ours = "is already up" not in r.stderr
        assert r.returncode == 0, r.stdout + r.stderr
        ca = _tapstack(env, "ca").stdout.strip()
        yield env, ca
    finally:
        if ours:
            _tapstack(env, "lab", "down", LAB)


def test_alice_reaches_bob_through_two_nats(lab):
    env, ca = lab
    r = _tapstack(env, "lab", "exec", "--lab", "alice-bob-cgn", "alice", "--", "curl", "-sS",
                  "-v", "--max-time", "20", "--cacert", ca, "https://www.bob.com/")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "SSL connection using TLSv1.3" in r.stderr
    assert "SSL certificate verify ok" in r.stderr
    assert 'subjectAltName: host "www.bob.com" matched' in r.stderr
    # Bob's page names the address and port it saw: the ISP's public address, shared by
    # its customers; the home router's shared address never reached him
    seen = dict(re.findall(r"<tr><th>(your address|your port)</th><td>([^<]*)</td>",
                           r.stdout))
    assert seen.get("your address") == CGN, r.stdout[:2000]
    assert "100.64." not in r.stdout
    # each NAT holds its half of the one connection (asked at once: a closed flow stays
    # 10 s): the ISP's maps 100.64.0.2:P to the port Bob saw, the home router's maps
    # Alice's port to P
    home_ct, isp_ct, home, isp = _ask(env, ("conntrack", "home"), ("conntrack", "isp"),
                                      ("stats", "home"), ("stats", "isp"))
    at_isp = [f for f in isp_ct["flows"] if f["protocol"] == "tcp"
              and f["reply"]["dst"] == CGN and f["reply"]["dport"] == int(seen["your port"])]
    assert len(at_isp) == 1, isp_ct["flows"]
    assert at_isp[0]["original"]["src"] == HOME_WAN
    assert at_isp[0]["original"]["dst"] == "198.51.100.10"
    at_home = [f for f in home_ct["flows"] if f["protocol"] == "tcp"
               and f["reply"]["dst"] == HOME_WAN
               and f["reply"]["dport"] == at_isp[0]["original"]["sport"]]
    assert len(at_home) == 1, home_ct["flows"]
    assert at_home[0]["original"]["src"] == ALICE and at_home[0]["assured"]
    assert home["counters"]["nat"]["mappings_created"] >= 1
    assert isp["counters"]["nat"]["mappings_created"] >= 1
    # the ISP's resolver was asked by the home router's shared address, untranslated
    assert any(f["protocol"] == "udp" and f["original"]["src"] == HOME_WAN
               and f["original"]["dst"] == "203.0.113.18" and f["reply"]["dst"] == HOME_WAN
               for f in isp_ct["flows"]), isp_ct["flows"]


def test_traceroute_through_both_nats_sees_every_router_once(lab):
    """A TCP traceroute to Bob's HTTPS port: each router's Time Exceeded comes back
    through every NAT between it and Alice, which rewrites the quoted header; the ISP's
    router answers from its shared address, inside its CGN."""
    env, _ = lab
    before = [s["counters"]["nat"]["translated_errors"]
              for s in _ask(env, ("stats", "home"), ("stats", "isp"))]
    r = _tapstack(env, "lab", "exec", "--lab", "alice-bob-cgn", "alice", "--", "traceroute",
                  "-n", "-T", "-p", "443", "-w", "2", "-q", "1", "-m", "8", "198.51.100.10")
    lines = [line.split() for line in r.stdout.splitlines()[1:]]
    assert [int(line[0]) for line in lines] == list(range(1, 7)), r.stdout + r.stderr
    assert [line[1] for line in lines] == ["192.168.1.1", "100.64.0.1", "192.0.2.2",
                                           "198.51.100.2", "10.0.0.2", "198.51.100.10"], \
        r.stdout + r.stderr
    after = [s["counters"]["nat"]["translated_errors"]
             for s in _ask(env, ("stats", "home"), ("stats", "isp"))]
    # home: the errors of isp, core, igw and subnet; isp: those of core, igw and subnet
    assert [a - b for a, b in zip(after, before, strict=True)] == [4, 3]


def test_the_journey_sees_the_source_change_twice(lab, tmp_path):
    env, _ = lab
    out = tmp_path / "journey"
    r = _tapstack(env, "journey", "--lab", LAB, "--out", str(out), timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads((out / "journey.json").read_text())
    assert report["tls"]["version"] == "TLSv1.3" and report["tls"]["verified"]
    hops = report["hops"]
    assert [h["segment"] for h in hops] == ["home", "access", "transit", "edge", "vpc",
                                           "subnet"]
    assert [h["ttl"] for h in hops] == [64, 63, 62, 61, 60, 59]
    assert [h["src"] for h in hops] == [ALICE, HOME_WAN, CGN, CGN, CGN, CGN]
    assert [h["dst"] for h in hops[3:5]] == ["198.51.100.10", "10.0.1.10"]
    assert [h["next_node"] for h in hops[:2]] == ["home", "isp"]
    for hop in hops[:2]:  # each NAT made its mapping for this SYN
        assert any(d.get("layer") == "nat" and d.get("name") == "mappings_created"
                   for d in hop["decisions"]), hop
    assert report["http"]["client_seen"] == CGN and report["http"]["status"] == 200
