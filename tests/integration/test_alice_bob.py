"""The story's lab (labs/alice-bob.toml), every network role a tapstack node: Alice's real
curl resolves www.bob.com through her home router's forwarder and the ISP's resolver
walking root, com. and bob.com., then fetches https://www.bob.com/ through NAT, three
routers, an internet gateway's 1:1 NAT, a network ACL and a security group."""

from __future__ import annotations

import json
import re
import subprocess

import pytest

from tests.integration.conftest import REPO, tapstack_cmd

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
