"""make bench, DNS: queries per second with dnsperf, tapstack against the same server on
kernel sockets, in one run.

    python tools/bench_dns.py           three runs of 5 s per figure, medians
    python tools/bench_dns.py --quick   one run of 2 s, a smoke test

One namespace: tapstack on tap0 (10.77.0.2) serves tests/unit/zones/bob.com.zone; the
very same DnsServer runs on kernel sockets at the host side (10.77.0.1); dnsperf asks
both the same five questions. Then tapstack as a caching resolver forwarding to the
kernel-side server: after one warm-up pass every answer is a cache hit, so its rate and
latency are those of the cache. Writes bench/results/dns.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ZONE = REPO / "tests" / "unit" / "zones" / "bob.com.zone"
QUESTIONS = "bob.com A\nwww.bob.com A\nmail.bob.com A\nbob.com MX\nnope.bob.com A\n"

KERNEL_SERVER = """
import asyncio, sys
import uvloop
from stack.apps.dns.server import DnsServer, DnsUdpProtocol
from stack.apps.dns.zone import Zones, load_zone
async def main():
    server = DnsServer(Zones([load_zone(sys.argv[1])]))
    await asyncio.get_running_loop().create_datagram_endpoint(
        lambda: DnsUdpProtocol(server), local_addr=("10.77.0.1", 53))
    print("ready", flush=True)
    await asyncio.Event().wait()
uvloop.run(main())
"""


def dnsperf(ns: str, server: str, data: str, seconds: int, outstanding: int = 200
            ) -> tuple[float, float]:
    """(queries per second, average latency in ms) with `outstanding` queries in flight."""
    r = subprocess.run(["ip", "netns", "exec", ns, "timeout", "-k", "2", str(seconds + 20),
                        "dnsperf", "-s", server, "-d", data, "-l", str(seconds), "-c",
                        "4" if outstanding > 1 else "1", "-q", str(outstanding)],
                       capture_output=True, text=True)
    qps = re.search(r"Queries per second:\s+([\d.]+)", r.stdout)
    latency = re.search(r"Average Latency \(s\):\s+([\d.]+)", r.stdout)
    if not qps or not latency:
        raise RuntimeError(f"dnsperf said: {r.stdout[-500:]} {r.stderr[-500:]}")
    return float(qps.group(1)), float(latency.group(1)) * 1000


def start(cmd: list[str], ready: str) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True, cwd=REPO)
    for line in proc.stdout:
        if line.startswith(ready):
            return proc
    raise RuntimeError(f"{cmd[:6]} did not start")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=str(REPO / "bench" / "results"))
    args = p.parse_args()
    runs, seconds = (1, 2) if args.quick else (3, 5)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ns = f"bd-{uuid.uuid4().hex[:6]}"
    cli = [sys.executable, "-m", "stack.cli"]
    results: dict[str, dict[str, float]] = {}
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write(QUESTIONS)
    procs: list[subprocess.Popen] = []
    try:
        subprocess.run(["ip", "netns", "add", ns], check=True)
        # dnsperf and the kernel-side server talk over loopback: it must be up
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        tapstack = start([*cli, "run", "--netns", ns, "--dns-zone", str(ZONE), "--no-http",
                          "--no-services", "--log-level", "warning"], "tapstack ready")
        procs.append(tapstack)
        kernel = start(["ip", "netns", "exec", ns, sys.executable, "-c", KERNEL_SERVER,
                        str(ZONE)], "ready")
        procs.append(kernel)
        for label, server in (("tapstack", "10.77.0.2"), ("kernel sockets", "10.77.0.1")):
            figures = [dnsperf(ns, server, f.name, seconds) for _ in range(runs)]
            idle = [dnsperf(ns, server, f.name, 2, outstanding=1)[1] for _ in range(runs)]
            results[label] = {"qps": statistics.median(q for q, _ in figures),
                              "latency_ms": statistics.median(m for _, m in figures),
                              "latency_ms_one_at_a_time": statistics.median(idle)}
            print(label, json.dumps(results[label]), flush=True)
        stop(tapstack)
        procs.remove(tapstack)
        time.sleep(0.5)
        resolver = start([*cli, "run", "--netns", ns, "--resolver", "--forward",
                          "10.77.0.1", "--no-http", "--no-services", "--log-level",
                          "warning"], "tapstack ready")
        procs.append(resolver)
        dnsperf(ns, "10.77.0.2", f.name, 1)  # warm the cache
        figures = [dnsperf(ns, "10.77.0.2", f.name, seconds) for _ in range(runs)]
        idle = [dnsperf(ns, "10.77.0.2", f.name, 2, outstanding=1)[1] for _ in range(runs)]
        results["tapstack resolver, cache hits"] = {
            "qps": statistics.median(q for q, _ in figures),
            "latency_ms": statistics.median(m for _, m in figures),
            "latency_ms_one_at_a_time": statistics.median(idle)}
        print("resolver", json.dumps(results["tapstack resolver, cache hits"]), flush=True)
    finally:
        for proc in procs:
            stop(proc)
        subprocess.run(["ip", "netns", "delete", ns], check=False)
        os.unlink(f.name)
    k = results["kernel sockets"]
    md = [f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on "
          f"{os.cpu_count()} CPUs; {'one run of 2 s' if args.quick else 'medians of 3 runs of 5 s'}"
          "; dnsperf -c 4 -q 200, five questions (answers, a CNAME, MX, NXDOMAIN).", "",
          "| server | queries/s | ratio to kernel sockets | latency, 200 in flight (ms) "
          "| latency, one at a time (ms) |",
          "|---|---|---|---|---|"]
    for label, figures in results.items():
        md.append(f"| {label} | {figures['qps']:,.0f} | {figures['qps'] / k['qps']:.2f} | "
                  f"{figures['latency_ms']:.2f} | {figures['latency_ms_one_at_a_time']:.3f} |")
    md += ["", "The same DnsServer (dnspython reading and writing every message) runs on "
           "both stacks: at saturation it, not the network under it, sets the rate."]
    text = "\n".join(md) + "\n"
    name = "dns-quick" if args.quick else "dns"
    (out / f"{name}.md").write_text(text)
    (out / f"{name}.json").write_text(json.dumps(results, indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    if os.geteuid() != 0:
        sys.exit("bench: needs root (a network namespace, a TAP)")
    sys.exit(main())
