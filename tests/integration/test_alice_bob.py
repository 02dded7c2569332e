"""The story's lab (labs/alice-bob.toml), every network role a tapstack node: Alice's real
curl resolves www.bob.com through her home router's forwarder and the ISP's resolver
walking root, com. and bob.com., then fetches https://www.bob.com/ through NAT, three
routers, an internet gateway's 1:1 NAT, a network ACL and a security group."""

from __future__ import annotations

import json
import os
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
    network ACL, which lets only ICMP and TCP 80, 443 and 5004 into Bob's subnet, and
    UDP only to 5004.)"""
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
    # the HTTP request's frame on Alice's segment, opened layer by layer, decrypted
    frame = report["frame"]
    assert [x["name"] for x in frame["layers"]] == ["Ethernet", "IPv4", "TCP", "TLS", "HTTP"]
    assert frame["layers"][-1]["decrypted"] and frame["http"].startswith("GET / HTTP/1.1\r\n")
    assert "Host: www.bob.com" in frame["http"]
    shown = subprocess.run(["tshark", "-n", "-r", report["captures"]["home"], "-o",
                            f"tls.keylog_file:{out / 'tls-keys.log'}", "-Y",
                            f"frame.number=={frame['frame']} && http.request", "-T", "fields",
                            "-e", "ip.src", "-e", "http.request.method"],
                           capture_output=True, text=True, timeout=60).stdout.split()
    assert shown == ["192.168.1.2", "GET"], shown
    # the SYN-ACK came back the same way, each router one TTL further
    back = report["return"]
    assert [h["segment"] for h in back] == ["subnet", "vpc", "edge", "transit", "access",
                                           "home"]
    assert [h["ttl"] for h in back] == [64, 63, 62, 61, 60, 59]
    assert back[-1]["dst"] == "192.168.1.2" and back[-1]["arrived"]
    assert report["verdict"]["ok"]
    # every DNS message a node received is linked to its frame, and is that message
    for step in report["dns"]:
        seen = _frame(report, step["segment"], step["frame"], "ip.src", "ip.dst", "dns.id",
                      "dns.flags.response")
        assert seen == [step["from"], step["to"], f"0x{step['id']:04x}",
                        "1" if step["kind"] == "response" else "0"], (step, seen)
    _check_page_in_a_browser(out / "index.html", len(hops), len(back), tmp_path)
    # again: the name comes from the home router's cache, nobody upstream is asked
    again = tmp_path / "second"
    r = _tapstack(env, "journey", "--lab", LAB, "--out", str(again), timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads((again / "journey.json").read_text())
    assert {s["node"] for s in report["dns"] if s["kind"] == "query"} == {"home"}


CHROMIUM = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update",
            "--disable-sync"]


def _check_page_in_a_browser(page, hops: int, back: int, tmp_path) -> None:
    """Debian's Chromium loads the page from disk (in a namespace of its own with only
    loopback: a browser may try to phone home): the DOM it built holds one section per
    step, one row per hop each way, the two drawings and the opened frame, and a
    screenshot comes out."""
    chromium = require_tool("chromium")
    profile = tmp_path / "chromium-profile"
    ns = f"jview{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        browse = ["timeout", "-k", "5", "60", "ip", "netns", "exec", ns, chromium, *CHROMIUM,
                  f"--user-data-dir={profile}"]
        dom = subprocess.run([*browse, "--dump-dom", page.as_uri()], capture_output=True,
                             text=True, timeout=70).stdout
        ids = re.findall(r'<section id="([a-z]+)"', dom)
        assert ids == ["outcome", "dns", "hops", "tls", "http", "frame", "sequence", "lab"], ids
        assert dom.count('<tr class="hop">') == hops and dom.count('<tr class="back">') == back
        assert dom.count("<svg") >= 2 and "GET / HTTP/1.1" in dom
        shot = tmp_path / "page.png"
        subprocess.run([*browse, f"--screenshot={shot}", "--window-size=1200,1400",
                        page.as_uri()], capture_output=True, timeout=70)
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20000
    finally:
        subprocess.run(["ip", "netns", "delete", ns], check=False)


def _journey(env, tmp_path, scenario):
    out = tmp_path / scenario
    r = _tapstack(env, "journey", "--lab", LAB, "--scenario", scenario, "--out", str(out),
                  timeout=120)
    # a scenario is meant to fail: exit 0 says the request stopped and the run was told
    assert r.returncode == 0, r.stdout + r.stderr
    assert "could not undo" not in r.stdout, r.stdout
    report = json.loads((out / "journey.json").read_text())
    page = (out / "index.html").read_text()
    return report, page


def _frame(report, segment, number, *fields):
    """What tshark reads in one frame of a segment's capture."""
    cmd = ["tshark", "-n", "-r", report["captures"][segment], "-Y", f"frame.number=={number}",
           "-T", "fields", "-E", "occurrence=f", *[x for f in fields for x in ("-e", f)]]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60).stdout.split()


def _rules_of(env, node):
    r = _tapstack(env, "rules", "--netns", "alice-bob-sw", "--node", node, "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_without_the_https_rule_the_syn_dies_at_the_security_group(lab, tmp_path):
    env, _ = lab
    denied = _counters(env, "subnet")["sg"]["denied_in"]
    report, page = _journey(env, tmp_path, "sg-no-https")
    v = report["verdict"]
    assert (v["stage"], v["way"], v["where"], v["filter"], v["direction"], v["counter"]) == \
        ("tcp", "forward", "subnet", "sg", "inbound", "sg.denied_in"), v
    assert report["curl"]["exit"] == 28 and report["return"] == []  # no answer: a timeout
    last = report["hops"][-1]
    assert last["segment"] == "vpc" and last["next_node"] == "subnet" and "dropped" in last
    assert _frame(report, "vpc", v["frame"], "ip.dst", "tcp.dstport", "tcp.flags.syn",
                  "tcp.flags.ack") == ["10.0.1.10", "443", "1", "0"]
    assert _counters(env, "subnet")["sg"]["denied_in"] > denied
    assert "Stopped at subnet" in page and "sg.denied_in" in page
    # undone: the group allows HTTPS again
    group = _rules_of(env, "subnet")["security_groups"]["bob"]["inbound"]
    assert any(r["protocol"] == "tcp" and r["ports"] == [443, 443] for r in group)


def test_without_the_ephemeral_rule_the_syn_ack_dies_at_the_network_acl(lab, tmp_path):
    """The stateless lesson: the SYN is let in (rule 100), Bob answers, and the answer
    to Alice's ephemeral port meets the implicit deny on its way out."""
    env, _ = lab
    report, page = _journey(env, tmp_path, "acl-no-return")
    v = report["verdict"]
    assert (v["way"], v["where"], v["filter"], v["rule"], v["counter"]) == \
        ("return", "subnet", "acl", "default (*)", "acl.denied_out"), v
    assert report["hops"][-1]["next_node"] == "bob" and report["hops"][-1]["arrived"]
    acl_in = next(d for d in report["hops"][-2]["decisions"] if d["layer"] == "acl")
    assert (acl_in["event"], acl_in["rule"]) == ("allow", 100)
    assert [h["segment"] for h in report["return"]] == ["subnet"]
    assert _frame(report, "subnet", v["frame"], "ip.src", "tcp.srcport", "tcp.flags.syn",
                  "tcp.flags.ack") == ["10.0.1.10", "443", "1", "1"]
    assert "Stopped at subnet" in page and "acl.denied_out" in page
    outbound = _rules_of(env, "subnet")["acl"]["bob"]["outbound"]
    assert any(r["number"] == 100 and r["ports"] == [1024, 65535] for r in outbound)


def test_a_certificate_for_another_name_is_refused_by_curl(lab, tmp_path):
    env, _ = lab
    report, page = _journey(env, tmp_path, "wrong-name")
    v = report["verdict"]
    assert report["curl"]["exit"] == 60 and (v["stage"], v["where"]) == ("tls", "alice"), v
    assert "no alternative certificate subject name matches" in v["error"]
    assert report["hops"][-1]["arrived"] and report["http"] == {}  # no request was sent
    assert report["tls"].get("verified") is None and report["tls"]["version"] == "TLSv1.3"
    flags = _frame(report, "home", v["frame"], "ip.src", "tcp.flags.fin", "tcp.flags.reset")
    assert flags[0] == "192.168.1.2" and "1" in flags[1:], flags
    assert "Stopped at alice" in page


def test_a_name_that_does_not_exist_ends_in_nxdomain_with_the_soa(lab, tmp_path):
    env, _ = lab
    for node in ("home", "resolver"):
        assert _tapstack(env, "dns", "flush", "--netns", "alice-bob-sw", "--node",
                         node).returncode == 0
    report, page = _journey(env, tmp_path, "nxdomain")
    v = report["verdict"]
    assert report["curl"]["exit"] == 6 and (v["stage"], v["where"]) == ("dns", "comns"), v
    assert v["authoritative"] and v["soa"][0].lower().startswith("com. soa ns1.com.")
    assert report["hops"] == []  # no SYN left Alice
    rcode = _frame(report, "home", v["frame"], "ip.dst", "dns.flags.rcode", "dns.qry.name")
    assert rcode[:2] == ["192.168.1.2", "3"] and rcode[2].lower() == "www.bobb.com", rcode
    assert "Stopped at comns" in page and "NXDOMAIN" in page


def test_a_missing_route_sends_an_icmp_unreachable_back_to_alice(lab, tmp_path):
    env, _ = lab
    report, page = _journey(env, tmp_path, "no-route")
    v = report["verdict"]
    assert report["curl"]["exit"] == 7  # refused at once, not a timeout
    assert (v["where"], v["counter"], v["segment"]) == ("isp", "ipv4.fwd_no_route",
                                                        "access"), v
    icmp = report["icmp_to_client"][0]
    assert (icmp["type"], icmp["code"], icmp["from"]) == (3, 0, "203.0.113.14")
    assert _frame(report, "home", icmp["frame"], "ip.src", "ip.dst", "icmp.type",
                  "icmp.code") == ["203.0.113.14", "192.168.1.2", "3", "0"]
    assert "Stopped at isp" in page and "ipv4.fwd_no_route" in page
    r = _tapstack(env, "route", "--netns", "alice-bob-sw", "--node", "isp", "--json")
    routes = {x["prefix"]: x["gateway"] for x in json.loads(r.stdout)}
    assert routes.get("default") == "192.0.2.2" and "192.0.2.0/24" not in routes
    # the route command says what is wrong in one line, as ip route does
    isp = ("--netns", "alice-bob-sw", "--node", "isp")
    for args, said in ((("del", "10.99.0.0/16"), "no static route to 10.99.0.0/16"),
                       (("add", "10.99.0.0/16", "--via", "192.0.2.2", "--dev", "acc"),
                        "is not on the subnet of acc"),
                       (("del", "203.0.113.0/28"), "no static route")):  # connected: stays
        r = _tapstack(env, "route", *args, *isp)
        assert r.returncode != 0 and said in r.stderr and r.stderr.count("\n") == 1, r.stderr


def test_on_a_lossy_link_udp_loses_chunks_and_tcp_delivers_them_late(lab, tmp_path):
    """The UDP contrast: the same paced chunks both ways while Alice's kernel drops 5 %
    of what comes from the stream's port (iptables statistic; ~200 chunks each way, so
    no loss at all has a chance of about 1 in 30,000)."""
    env, _ = lab
    report, page = _journey(env, tmp_path, "udp-vs-tcp")
    assert report["curl"]["exit"] == 0 and report["verdict"]["ok"]  # the request itself
    c = report["contrast"]
    u, t, dropped = c["udp"], c["tcp"], c["dropped_by_kernel"]
    # UDP: every datagram reached Alice's wire; what her kernel dropped is gone for good
    assert c["udp_on_wire"] == c["count"]
    assert dropped["udp"] > 0 and len(u["lost"]) == dropped["udp"]
    assert u["received"] == c["count"] - dropped["udp"]
    # TCP: everything, in order, some of it twice on the wire and late at the application
    assert dropped["tcp"] > 0 and t["retransmitted"] >= 1
    assert t["received"] == c["count"] and t["in_order"] and t["lost"] == []
    # a lost chunk cannot be repaired before a later one (sent one interval later) tells
    # Bob of the gap: its delay is at least that interval
    assert t["delay_ms"]["max"] >= c["interval_ms"]
    assert "8. UDP and TCP on a lossy link" in page
    out = subprocess.run(["ip", "netns", "exec", "alice-bob-alice", "iptables", "-S",
                          "INPUT"], capture_output=True, text=True, timeout=10).stdout
    assert "statistic" not in out  # undone
