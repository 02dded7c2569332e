"""make bench, HTTPS and uvicorn: TLS on tapstack's TCP against the same app on kernel
sockets, and unmodified uvicorn on tapstack against tapstack's own server, in one run.

    python tools/bench_tls.py           three runs per figure, medians
    python tools/bench_tls.py --quick   one short run, a smoke test

Targets (the app is always the built-in site, tools/bench_app.py):
  tapstack          `tapstack run --tls`: the built-in server, HTTP on 80, HTTPS on 443
  tapstack uvicorn  `tapstack run --server uvicorn`: uvicorn on tapstack, HTTP on 80
  kernel uvicorn    uvicorn on kernel sockets with a certificate from the same lab CA,
                    HTTPS on 443, across a veth pair
Clients run in namespaces of this run: curl (bulk HTTPS), ab (a new TLS connection per
request), wrk (keep-alive). Writes bench/results/tls.{md,json}.
"""

from __future__ import annotations

import argparse
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import TAP_IP, VETH_SERVER, Target, run_targets, save, sh, veth_namespaces

REPO = Path(__file__).resolve().parents[1]
APP = ["--app", "bench_app:app", "--app-dir", str(REPO / "tools")]

FIGURES = [
    ("https_download", "bulk HTTPS download, curl (MB/s)"),
    ("tls_new", "new TLS connection per request, ab -c 10 (req/s)"),
    ("https_wrk50", "keep-alive HTTPS GETs, wrk -c 50 (req/s)"),
    ("http_wrk50", "keep-alive HTTP GETs, wrk -c 50 (req/s)"),
]


def start_tapstack(state: str, uvicorn: bool) -> Target:
    ns = f"bench-t-{uuid.uuid4().hex[:6]}"
    args = [sys.executable, "-m", "stack.cli", "run", "--netns", ns, "--log-level",
            "warning", "--no-access-log", "--no-services", *APP]
    args += ["--server", "uvicorn"] if uvicorn else ["--tls"]
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "TAPSTACK_STATE": state})
    for line in proc.stdout:
        if line.startswith("tapstack ready"):
            break
    else:
        raise SystemExit("bench_tls: tapstack did not start")

    def cleanup() -> None:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)
        subprocess.run(["ip", "netns", "delete", ns], capture_output=True)

    return Target("tapstack uvicorn" if uvicorn else "tapstack", ns, TAP_IP, proc.pid,
                  cleanup)


def start_kernel_uvicorn(state: str) -> Target:
    from stack.certs import LabCA

    cert, key = LabCA(state).issue([VETH_SERVER])
    srv, cli = veth_namespaces("bench-u")
    proc = subprocess.Popen(["ip", "netns", "exec", srv, sys.executable, "-m", "uvicorn",
                             "bench_app:app", "--app-dir", str(REPO / "tools"), "--host",
                             "0.0.0.0", "--port", "443", "--ssl-certfile", cert,
                             "--ssl-keyfile", key, "--no-access-log", "--log-level",
                             "warning", "--backlog", "1024"],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while sh(cli, "curl", "-sk", "-o", "/dev/null", f"https://{VETH_SERVER}/bytes/1"
             ).returncode != 0:
        if time.monotonic() > deadline or proc.poll() is not None:
            raise SystemExit("bench_tls: uvicorn on the kernel did not start")
        time.sleep(0.2)

    def cleanup() -> None:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)
        for ns in (srv, cli):
            subprocess.run(["ip", "netns", "delete", ns], capture_output=True)

    return Target("kernel uvicorn", cli, VETH_SERVER, proc.pid, cleanup)


def https_download(t: Target, ca: str, size: int) -> float:
    r = sh(t.client_ns, "curl", "-sS", "--cacert", ca, "-o", "/dev/null", "-w",
           "%{speed_download}", f"https://{t.ip}/bytes/{size}")
    return float(r.stdout) / 1e6


def ab_tls(t: Target, n: int) -> float:
    r = sh(t.client_ns, "ab", "-q", "-n", str(n), "-c", "10", f"https://{t.ip}/bytes/100")
    return float(re.search(r"Requests per second:\s+([\d.]+)", r.stdout).group(1))


def wrk(t: Target, scheme: str, seconds: int) -> float:
    r = sh(t.client_ns, "wrk", "-d", f"{seconds}s", "-c", "50", "-t", "2",
           f"{scheme}://{t.ip}/bytes/100", timeout=seconds + 30)
    return float(re.search(r"Requests/sec:\s+([\d.]+)", r.stdout).group(1))


def measure(t: Target, ca: str, quick: bool) -> dict[str, float]:
    runs, seconds = (1, 2) if quick else (3, 5)
    size = 20_000_000 if quick else 100_000_000
    out: dict[str, list[float]] = {}
    for _ in range(runs):
        if t.name != "tapstack uvicorn":
            out.setdefault("https_download", []).append(https_download(t, ca, size))
            out.setdefault("tls_new", []).append(ab_tls(t, 300 if quick else 2000))
            out.setdefault("https_wrk50", []).append(wrk(t, "https", seconds))
        if t.name != "kernel uvicorn":
            out.setdefault("http_wrk50", []).append(wrk(t, "http", seconds))
    return {k: round(statistics.median(v), 1) for k, v in out.items()}


def table(results: dict[str, dict[str, float]]) -> str:
    names = list(results)
    lines = ["| figure | " + " | ".join(names) + " | tapstack / kernel uvicorn | "
             "tapstack uvicorn / tapstack |", "|---" * (len(names) + 3) + "|"]
    for key, label in FIGURES:
        vals = [results[n].get(key) for n in names]
        a, b, k = (results[n].get(key) for n in ("tapstack", "tapstack uvicorn",
                                                   "kernel uvicorn"))
        lines.append(f"| {label} | " + " | ".join("-" if v is None else f"{v:,.0f}"
                                                   for v in vals)
                     + f" | {f'{a / k:.2f}' if a and k else '-'}"
                     + f" | {f'{b / a:.2f}' if a and b else '-'} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="one short run of each figure")
    p.add_argument("--out", default=str(REPO / "bench" / "results"))
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench-tls-") as state:
        from stack.certs import LabCA

        ca = LabCA(state).cert_path
        results = run_targets((lambda: start_tapstack(state, False),
                               lambda: start_tapstack(state, True),
                               lambda: start_kernel_uvicorn(state)),
                              lambda target: measure(target, ca, args.quick))
    save(out, "tls-quick" if args.quick else "tls", args.quick, table(results), results)
    return 0


if __name__ == "__main__":
    if os.geteuid() != 0:
        sys.exit("bench_tls: needs root (network namespaces, a TAP, veth)")
    sys.exit(main())
