"""make bench, forwarding: one router between two Linux hosts, tapstack against Linux.

    python tools/bench_forward.py           three runs per figure, medians (~2 minutes)
    python tools/bench_forward.py --quick   one short run per figure, a smoke test

The lab is client - router - server (two segments, Linux bridges). The router is a
tapstack node (plain, then with offloads) or a Linux namespace with ip_forward=1, in the
same topology, with the same iperf3 clients. Figures: bulk TCP (MB/s), 64-byte UDP
(datagrams per second that arrived), and, in process, what an empty hook list costs per
forwarded packet. Writes bench/results/forward.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import timeit
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

LAB = """
name = "{name}"
[[segment]]
name = "c"
[[segment]]
name = "s"
[[node]]
name = "client"
kind = "linux"
[[node.interface]]
segment = "c"
addresses = ["10.31.0.2/24"]
[[node.route]]
to = "default"
via = "10.31.0.1"
[[node]]
name = "router"
kind = "{kind}"
forwarding = true
offload = {offload}
{services}
[[node.interface]]
segment = "c"
addresses = ["10.31.0.1/24"]
[[node.interface]]
segment = "s"
addresses = ["10.32.0.1/24"]
[[node]]
name = "server"
kind = "linux"
[[node.interface]]
segment = "s"
addresses = ["10.32.0.2/24"]
[[node.route]]
to = "default"
via = "10.32.0.1"
"""

SERVER = "10.32.0.2"


def lab(*args: str) -> None:
    r = subprocess.run([sys.executable, "-m", "stack.cli", "lab", *args], capture_output=True,
                       text=True, timeout=120, cwd=REPO)
    if r.returncode != 0:
        raise RuntimeError(r.stderr.strip())


def iperf(name: str, *client_args: str, seconds: int) -> dict:
    server = subprocess.Popen(["ip", "netns", "exec", f"{name}-server", "timeout", "-k", "2",
                               str(seconds + 20), "iperf3", "-s", "-1", "-B", SERVER],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:  # until the server listens
            r = subprocess.run(["ip", "netns", "exec", f"{name}-server", "ss", "-ltnH",
                                "sport = :5201"], capture_output=True, text=True)
            if r.stdout.strip() or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        r = subprocess.run(["ip", "netns", "exec", f"{name}-client", "timeout", "-k", "2",
                            str(seconds + 15), "iperf3", "-c", SERVER, "-J", "-t",
                            str(seconds), *client_args], capture_output=True, text=True)
        return json.loads(r.stdout)
    finally:
        server.wait(timeout=30)


def bulk(name: str, seconds: int) -> float:
    result = iperf(name, seconds=seconds)
    return result["end"]["sum_received"]["bytes"] / result["end"]["sum_received"]["seconds"] \
        / 1e6


def small_udp(name: str, seconds: int) -> float:
    result = iperf(name, "-u", "-l", "64", "-b", "0", seconds=seconds)
    s = result["end"]["sum"]
    return (s["packets"] - s["lost_packets"]) / s["seconds"]


def new_flows(name: str, quick: bool) -> float:
    """Connections per second through the router: ab, one new connection per request,
    against the HTTP server of this repository on the server's kernel sockets."""
    server = subprocess.Popen(["ip", "netns", "exec", f"{name}-server", sys.executable, "-m",
                               "stack.cli", "serve-kernel", "--address", SERVER,
                               "--port", "8080", "--log-level", "warning"],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                              cwd=REPO)
    try:
        server.stdout.readline()  # "serve-kernel ready"
        r = subprocess.run(["ip", "netns", "exec", f"{name}-client", "timeout", "-k", "2",
                            "60", "ab", "-q", "-n", "1000" if quick else "5000", "-c", "10",
                            f"http://{SERVER}:8080/bytes/100"],
                           capture_output=True, text=True)
        line = next((ln for ln in r.stdout.splitlines()
                     if ln.startswith("Requests per second")), None)
        return float(line.split()[3]) if line else 0.0
    finally:
        server.terminate()
        server.wait(timeout=10)


def measure(kind: str, offload: bool, quick: bool, nat: bool = False) -> dict[str, float]:
    name = f"bf{uuid.uuid4().hex[:5]}"
    services = ""
    if kind == "tapstack":
        services = 'services = { echo = false, http = false }'
        if nat:
            services += '\nnat = { masquerade = [{ interface = "eth1" }] }'
    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as f:
        f.write(LAB.format(name=name, kind=kind, offload=str(offload).lower(),
                           services=services))
    runs, seconds = (1, 2) if quick else (3, 5)
    try:
        lab("up", f.name)
        if kind == "linux":  # a Linux router forwards what it receives
            subprocess.run(["ip", "netns", "exec", f"{name}-router", "sh", "-c",
                            "echo 0 > /proc/sys/net/ipv4/icmp_ratelimit"], check=True)
            if nat:
                subprocess.run(["ip", "netns", "exec", f"{name}-router", "iptables", "-t",
                                "nat", "-A", "POSTROUTING", "-o", "eth1", "-j",
                                "MASQUERADE"], check=True)
        mbs = [bulk(name, seconds) for _ in range(runs)]
        pps = [small_udp(name, seconds) for _ in range(runs)]
        flows = [new_flows(name, quick) for _ in range(runs)]
    finally:
        lab("down", f.name)
        os.unlink(f.name)
    return {"bulk_MBps": statistics.median(mbs), "udp64_pps": statistics.median(pps),
            "new_flows_per_s": statistics.median(flows)}


def conntrack_memory(flows: int) -> float:
    """Bytes of Python heap per tracked, NATed flow: SYNs of distinct flows through a
    masquerading router, in process, measured with tracemalloc."""
    import tracemalloc

    import dpkt

    from stack.net.interface import InterfaceConfig
    from stack.net.middlebox import Middlebox, MiddleboxConfig
    from stack.net.nat import Masquerade, NatConfig
    from stack.net.node import Node, NodeConfig

    def ip(t: str) -> bytes:
        return socket.inet_aton(t)

    node = Node(NodeConfig(forwarding=True, interfaces=[
        InterfaceConfig("lan", bytes.fromhex("020000000001"), [(ip("10.31.0.1"), 16)]),
        InterfaceConfig("wan", bytes.fromhex("020000000002"), [(ip("10.32.0.1"), 24)])]),
        random.Random(1))
    Middlebox(node, MiddleboxConfig(nat=NatConfig(masquerade=[Masquerade("wan")])),
              random.Random(2))
    node.interfaces[1].arp._store(ip(SERVER), bytes.fromhex("02000000aa02"), 0.0)
    frames = []
    for i in range(flows):
        src = ip(f"10.31.{1 + i // 250}.{1 + i % 250}")
        syn = dpkt.tcp.TCP(sport=40000 + i % 1000, dport=80, flags=dpkt.tcp.TH_SYN, seq=i)
        frames.append(bytes(dpkt.ethernet.Ethernet(
            dst=node.interfaces[0].mac, src=bytes.fromhex("02000000aa01"), type=0x0800,
            data=dpkt.ip.IP(src=src, dst=ip(SERVER), p=6, ttl=64, data=syn))))
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for i, frame in enumerate(frames):
        node.receive(0, frame, 1.0)
        if i % 64 == 63:
            node.poll(1.0)
    node.poll(1.0)
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    assert node.middlebox.conntrack.count == flows, node.middlebox.conntrack.count
    return (after - before) / flows


def hook_cost(packets: int) -> dict[str, float]:
    """Forward `packets` frames in process (no I/O): microseconds per packet, and what
    the three empty hook checks on the forwarding path cost of that."""
    import dpkt

    from stack.net.interface import InterfaceConfig
    from stack.net.node import Node, NodeConfig

    def ip(t: str) -> bytes:
        return socket.inet_aton(t)

    node = Node(NodeConfig(forwarding=True, interfaces=[
        InterfaceConfig("c", bytes.fromhex("020000000001"), [(ip("10.31.0.1"), 24)]),
        InterfaceConfig("s", bytes.fromhex("020000000002"), [(ip("10.32.0.1"), 24)])]),
        random.Random(1))
    server_mac = bytes.fromhex("02000000aa02")
    node.interfaces[1].arp._store(ip(SERVER), server_mac, 0.0)
    payload = dpkt.tcp.TCP(sport=5000, dport=5201, flags=dpkt.tcp.TH_ACK, data=bytes(1448))
    frame = bytes(dpkt.ethernet.Ethernet(
        dst=node.interfaces[0].mac, src=bytes.fromhex("02000000aa01"), type=0x0800,
        data=dpkt.ip.IP(src=ip("10.31.0.2"), dst=ip(SERVER), p=6, ttl=64, data=payload)))

    def run() -> float:
        start = time.perf_counter()
        receive, poll = node.receive, node.poll
        for i in range(packets):
            receive(0, frame, 1.0)
            if i % 64 == 63:
                poll(1.0)  # the runtime flushes once per batch
        poll(1.0)
        return (time.perf_counter() - start) / packets * 1e6

    empty = min(run() for _ in range(3))
    hooks = node.ipv4.hooks

    def checks() -> None:  # what _forward and receive test per packet
        if hooks.prerouting:
            pass
        if hooks.forward:
            pass
        if hooks.postrouting:
            pass

    check_us = min(timeit.repeat(checks, number=200_000, repeat=3)) / 200_000 * 1e6
    for name in ("prerouting", "forward", "postrouting"):
        hooks.add(name, lambda packet, info, now: packet)
    used = min(run() for _ in range(3))
    return {"us_per_packet": empty, "empty_checks_us": check_us,
            "empty_hooks_pct": 100 * check_us / empty, "pass_through_hooks_us": used}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="one short run of each figure")
    p.add_argument("--out", default=str(REPO / "bench" / "results"))
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, float]] = {}
    for label, kind, offload, nat in (("tapstack", "tapstack", False, False),
                                      ("tapstack offload", "tapstack", True, False),
                                      ("linux", "linux", False, False),
                                      ("tapstack nat", "tapstack", False, True),
                                      ("tapstack offload nat", "tapstack", True, True),
                                      ("linux nat", "linux", False, True)):
        results[label] = measure(kind, offload, args.quick, nat)
        print(label, json.dumps(results[label]), flush=True)
    hooks = hook_cost(5_000 if args.quick else 50_000)
    per_flow = conntrack_memory(2_000 if args.quick else 20_000)
    rows = [("bulk TCP through the router, iperf3 (MB/s)", "bulk_MBps"),
            ("64-byte UDP through the router (datagrams/s arrived)", "udp64_pps"),
            ("new connections through the router, ab -c 10 (conn/s)", "new_flows_per_s")]
    md = [f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on "
          f"{os.cpu_count()} CPUs; "
          f"{'one short run (--quick)' if args.quick else 'medians of 3 runs of 5 s'}. "
          "Ratios against the Linux router in the same run.", ""]
    for suffix, title in (("", "Forwarding"), (" nat", "Masquerading (NAT)")):
        md += [f"**{title}** (Linux: {'iptables MASQUERADE' if suffix else 'ip_forward'})", "",
               "| figure | tapstack | ratio | tapstack offload | ratio | Linux router |",
               "|---|---|---|---|---|---|"]
        linux = results["linux" + suffix]
        for text, key in rows:
            a, b, k = (results["tapstack" + suffix][key],
                       results["tapstack offload" + suffix][key], linux[key])
            md.append(f"| {text} | {a:,.0f} | {a / k:.2f} | {b:,.0f} | {b / k:.2f} "
                      f"| {k:,.0f} |")
        md.append("")
    md += ["", f"In process, no I/O: {hooks['us_per_packet']:.1f} us per forwarded 1500-byte "
           f"packet with empty hooks; the three empty checks cost "
           f"{hooks['empty_checks_us'] * 1000:.0f} ns of it "
           f"({hooks['empty_hooks_pct']:.1f} %); a pass-through handler on prerouting, "
           f"forward and postrouting makes it {hooks['pass_through_hooks_us']:.1f} us.", "",
           f"A tracked, masqueraded TCP flow costs {per_flow:,.0f} bytes of Python heap "
           "(conntrack entry, both tuples in the table, NAT mapping), measured with "
           "tracemalloc over SYNs of distinct flows.", ""]
    text = "\n".join(md)
    results["hooks"] = hooks
    results["conntrack_bytes_per_flow"] = {"bytes": per_flow}
    name = "forward-quick" if args.quick else "forward"
    (out / f"{name}.md").write_text(text)
    (out / f"{name}.json").write_text(json.dumps(results, indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    if os.geteuid() != 0:
        sys.exit("bench: needs root (network namespaces, TAPs, bridges)")
    sys.exit(main())
