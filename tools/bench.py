"""make bench: tapstack (plain, --offload csum, --offload, --workers 2) against the kernel
(one process, and two with SO_REUSEPORT), same app, same clients.

    python tools/bench.py           three runs per figure, medians (a few minutes)
    python tools/bench.py --quick   one short run per figure (under a minute), a smoke test

tapstack runs on a TAP in its own namespace; the kernel runs the very same HTTP server
(`tapstack serve-kernel`) in a namespace joined to the client's by a veth pair.
`tapstack --workers 2` is compared with `serve-kernel --workers 2`: the same number of
processes on each side; every other tapstack with the one-process kernel. Every
client (curl, wrk, ab, ping, a Python socket client) runs in a namespace of this run;
everything is removed at the end. Writes bench/results/latest.{md,json} and ratios.png.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TAP_IP = "10.77.0.2"
VETH_SERVER, VETH_CLIENT = "10.78.0.2", "10.78.0.1"

IDLE_CLIENT = r"""
import resource, socket, sys, time
n = int(sys.argv[2])
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, n + 100), max(hard, n + 100)))
socks = []
for i in range(n):
    s = socket.create_connection((sys.argv[1], 80), timeout=10)
    socks.append(s)
print("open", len(socks), flush=True)
sys.stdin.readline()
"""


def sh(ns: str, *cmd: str, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", "netns", "exec", ns, *cmd], capture_output=True, text=True,
                          timeout=timeout, **kw)


def family(pid: int) -> list[int]:
    """The process and its children (workers)."""
    r = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
    return [pid] + [int(p) for p in r.stdout.split()]


def proc_cpu_seconds(pid: int) -> float:
    total = 0.0
    for p in family(pid):
        with open(f"/proc/{p}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def rss_kb(pid: int) -> int:
    total = 0
    for p in family(pid):
        with open(f"/proc/{p}/status") as f:
            total += next(int(ln.split()[1]) for ln in f if ln.startswith("VmRSS:"))
    return total


class Target:
    """One server under test: where it listens, where clients run, its process."""

    def __init__(self, name: str, client_ns: str, ip: str, pid: int, cleanup) -> None:
        self.name, self.client_ns, self.ip, self.pid = name, client_ns, ip, pid
        self.cleanup = cleanup


def start_tapstack(*extra: str) -> Target:
    ns = f"bench-{uuid.uuid4().hex[:6]}"
    args = [sys.executable, "-m", "stack.cli", "run", "--netns", ns, "--log-level",
            "warning", *extra]
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, text=True)
    if not proc.stdout.readline().startswith("tapstack ready"):
        raise SystemExit("bench: tapstack did not start")

    def cleanup() -> None:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=15)
        subprocess.run(["ip", "netns", "delete", ns], capture_output=True)

    return Target(" ".join(["tapstack", *extra]), ns, TAP_IP, proc.pid, cleanup)


def veth_namespaces(prefix: str) -> tuple[str, str]:
    """A server and a client namespace joined by a veth pair (VETH_SERVER, VETH_CLIENT),
    both with loopback up; (server, client)."""
    tag = uuid.uuid4().hex[:6]
    srv, cli = f"{prefix}s-{tag}", f"{prefix}c-{tag}"
    for ns in (srv, cli):
        subprocess.run(["ip", "netns", "add", ns], check=True)
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
    subprocess.run(["ip", "link", "add", "bv0", "netns", srv, "type", "veth", "peer", "name",
                    "bv1", "netns", cli], check=True)
    for ns, dev, addr in ((srv, "bv0", VETH_SERVER), (cli, "bv1", VETH_CLIENT)):
        subprocess.run(["ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", dev], check=True)
        subprocess.run(["ip", "-n", ns, "link", "set", dev, "up"], check=True)
    return srv, cli


def start_kernel(workers: int = 1) -> Target:
    srv, cli = veth_namespaces("bench-k")
    proc = subprocess.Popen(["ip", "netns", "exec", srv, sys.executable, "-m", "stack.cli",
                             "serve-kernel", "--port", "80", "--log-level", "warning",
                             "--workers", str(workers)],
                            cwd=REPO, stdout=subprocess.PIPE, text=True)
    if "ready" not in proc.stdout.readline():
        raise SystemExit("bench: serve-kernel did not start")

    def cleanup() -> None:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=15)
        for ns in (srv, cli):
            subprocess.run(["ip", "netns", "delete", ns], capture_output=True)

    return Target("kernel" + (f" --workers {workers}" if workers > 1 else ""), cli,
                  VETH_SERVER, proc.pid, cleanup)


def baseline(name: str) -> str:
    """The kernel figure a tapstack figure is compared with: same number of processes."""
    return "kernel --workers 2" if "--workers 2" in name else "kernel"


def run_targets(starts, measure_one) -> dict[str, dict[str, float]]:
    """Start each target in turn, measure it, always clean it up; figures by name."""
    results: dict[str, dict[str, float]] = {}
    for start in starts:
        target = start()
        try:
            results[target.name] = measure_one(target)
        finally:
            target.cleanup()
        print(target.name, json.dumps(results[target.name]), flush=True)
    return results


def save(out: Path, name: str, quick: bool, body: str, results: dict) -> str:
    """bench/results/NAME.{md,json}: the table under a line saying when and how."""
    md = (f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on "
          f"{os.cpu_count()} CPUs{' (--quick: one short run)' if quick else ''}; "
          "medians of 3 runs.\n\n" + body + "\n")
    (out / f"{name}.md").write_text(md)
    (out / f"{name}.json").write_text(json.dumps(results, indent=1))
    print(md)
    return md


# -- figures -------------------------------------------------------------------------------


def download(t: Target, size: int) -> float:
    r = sh(t.client_ns, "curl", "-sS", "-o", "/dev/null", "-w", "%{speed_download}",
           f"http://{t.ip}/bytes/{size}")
    return float(r.stdout) / 1e6


def upload(t: Target, path: str) -> float:
    r = sh(t.client_ns, "curl", "-sS", "-o", "/dev/null", "-w", "%{speed_upload}", "-T", path,
           f"http://{t.ip}/upload")
    return float(r.stdout) / 1e6


def wrk(t: Target, connections: int, seconds: int, path: str = "/bytes/100"
        ) -> tuple[float, float]:
    r = sh(t.client_ns, "wrk", "-d", f"{seconds}s", "-c", str(connections), "-t",
           "2" if connections > 1 else "1", "--latency", f"http://{t.ip}{path}",
           timeout=seconds + 30)
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", r.stdout).group(1))
    m = re.search(r"99%\s+([\d.]+)(us|ms|s)", r.stdout)
    p99 = float(m.group(1)) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[m.group(2)]
    return rps, p99


def ab(t: Target, n: int) -> float:
    r = sh(t.client_ns, "ab", "-q", "-n", str(n), "-c", "10", f"http://{t.ip}/bytes/100")
    return float(re.search(r"Requests per second:\s+([\d.]+)", r.stdout).group(1))


def ping(t: Target, count: int) -> tuple[float, float]:
    r = sh(t.client_ns, "ping", "-c", str(count), "-i", "0.005", "-W", "1", t.ip)
    times = sorted(float(x) for x in re.findall(r"time=([\d.]+) ms", r.stdout))
    return times[len(times) // 2], times[min(len(times) - 1, int(len(times) * 0.99))]


def idle(t: Target, n: int) -> tuple[float, float]:
    """Memory per idle keep-alive connection (KB of server RSS) and server CPU % over
    five idle seconds with all of them open."""
    before = rss_kb(t.pid)
    client = subprocess.Popen(["ip", "netns", "exec", t.client_ns, sys.executable, "-c",
                               IDLE_CLIENT, t.ip, str(n)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        line = client.stdout.readline()
        if not line.startswith("open"):
            raise RuntimeError(f"idle client failed: {line!r}")
        time.sleep(1.0)
        held = rss_kb(t.pid)
        cpu0, wall0 = proc_cpu_seconds(t.pid), time.monotonic()
        time.sleep(5.0)
        cpu = (proc_cpu_seconds(t.pid) - cpu0) / (time.monotonic() - wall0) * 100
    finally:
        client.stdin.close()
        client.wait(timeout=30)
    return (held - before) / n, cpu


FIGURES = [
    ("download", "bulk download, curl /bytes/ (MB/s)", True),
    ("upload", "bulk upload, curl -T /upload (MB/s)", True),
    ("wrk1", "keep-alive GETs, wrk -c 1 (req/s)", True),
    ("wrk1_p99", "wrk -c 1 p99 latency (ms)", False),
    ("wrk50", "keep-alive GETs, wrk -c 50 (req/s)", True),
    ("wrk50_p99", "wrk -c 50 p99 latency (ms)", False),
    # a response a little over one MSS: Nagle without Minshall's change would hold its
    # tail for the client's delayed ACK (about 40 ms a request)
    ("wrk10_2k", "keep-alive GETs of a 2 KB page, wrk -c 10 (req/s)", True),
    ("wrk10_2k_p99", "wrk -c 10 2 KB p99 latency (ms)", False),
    ("ab", "new connection per request, ab -c 10 (req/s)", True),
    ("ping_p50", "ping RTT p50 (ms)", False),
    ("ping_p99", "ping RTT p99 (ms)", False),
    ("idle_kb", "memory per idle keep-alive connection (KB, server RSS)", False),
    ("idle_cpu", "server CPU with them all idle (%)", False),
]


def measure(t: Target, quick: bool, upfile: str) -> dict[str, float]:
    runs = 1 if quick else 3
    size = 20_000_000 if quick else 209_715_200
    seconds = 2 if quick else 5
    out: dict[str, list[float]] = {k: [] for k, _, _ in FIGURES}
    for _ in range(runs):
        out["download"].append(download(t, size))
        out["upload"].append(upload(t, upfile))
        rps, p99 = wrk(t, 1, seconds)
        out["wrk1"].append(rps)
        out["wrk1_p99"].append(p99)
        rps, p99 = wrk(t, 50, seconds)
        out["wrk50"].append(rps)
        out["wrk50_p99"].append(p99)
        rps, p99 = wrk(t, 10, seconds, "/bytes/2000")
        out["wrk10_2k"].append(rps)
        out["wrk10_2k_p99"].append(p99)
        out["ab"].append(ab(t, 1000 if quick else 5000))
        p50, p99 = ping(t, 50 if quick else 200)
        out["ping_p50"].append(p50)
        out["ping_p99"].append(p99)
    kb, cpu = idle(t, 1000 if quick else 10_000)
    out["idle_kb"].append(kb)
    out["idle_cpu"].append(cpu)
    return {k: round(statistics.median(v), 3) for k, v in out.items()}


def table(results: dict[str, dict[str, float]]) -> str:
    names = list(results)
    ours = [n for n in names if not n.startswith("kernel")]
    head = "| figure | " + " | ".join(names) + " | " + " | ".join(
        f"{n} / {baseline(n)}" for n in ours) + " |"
    lines = [head, "|" + "---|" * (1 + len(names) + len(ours))]
    for key, label, _ in FIGURES:
        vals = [results[n][key] for n in names]
        ratios = [f"{results[n][key] / results[baseline(n)][key]:.2f}"
                  if results[baseline(n)][key] else "-" for n in ours]
        lines.append(f"| {label} | " + " | ".join(f"{v:,.3g}" if v < 100 else f"{v:,.0f}"
                                                   for v in vals)
                     + " | " + " | ".join(ratios) + " |")
    return "\n".join(lines)


def chart(results: dict[str, dict[str, float]], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    keys = [k for k, _, higher in FIGURES if higher]
    fig, ax = plt.subplots(figsize=(9, 4))
    ours = [n for n in results if not n.startswith("kernel")]
    width = 0.8 / len(ours)
    for i, name in enumerate(ours):
        kernel = results[baseline(name)]
        ratios = [results[name][k] / kernel[k] if kernel[k] else 0 for k in keys]
        ax.bar([x + i * width for x in range(len(keys))], ratios, width, label=name)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([x + width * (len(ours) - 1) / 2 for x in range(len(keys))], keys)
    ax.set_ylabel("tapstack / kernel (higher is better)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="one short run of each figure")
    p.add_argument("--out", default=str(REPO / "bench" / "results"))
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(prefix="bench-up-", dir="/tmp") as up:
        up.write(os.urandom(10_000_000 if args.quick else 100_000_000))
        up.flush()

        def measure_one(target: Target) -> dict[str, float]:
            time.sleep(0.5)
            return measure(target, args.quick, up.name)

        results = run_targets((start_tapstack,
                               lambda: start_tapstack("--offload", "csum"),
                               lambda: start_tapstack("--offload"),
                               lambda: start_tapstack("--workers", "2"),
                               start_kernel, lambda: start_kernel(2)), measure_one)
    name = "quick" if args.quick else "latest"
    save(out, name, args.quick, table(results), results)
    chart(results, out / f"{name}.png")
    missing = [k for r in results.values() for k, v in r.items() if v is None]
    return 1 if missing else 0


if __name__ == "__main__":
    if os.geteuid() != 0:
        sys.exit("bench: needs root (network namespaces, a TAP, veth)")
    sys.exit(main())
