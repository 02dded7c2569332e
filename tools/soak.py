"""Soak: wrk against tapstack for a while, with kernel-made loss, watching its memory.

    python tools/soak.py --duration 600        (make soak)
    python tools/soak.py --duration 30 --quick (the bounded run inside make test)

Everything happens in a namespace made for the run; it is removed at the end. Writes
bench/results/soak.json and, with matplotlib, soak.png (RSS over time). Exit status 1
when wrk saw errors or RSS kept growing.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STACK_IP = "10.77.0.2"


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--duration", type=int, default=600, help="seconds of load")
    p.add_argument("--connections", type=int, default=100)
    p.add_argument("--loss", type=float, default=0.01, help="drop probability each way")
    p.add_argument("--path", default="/bytes/1000")
    p.add_argument("--out", default=str(REPO / "bench" / "results"))
    args = p.parse_args()
    ns = f"soak-{uuid.uuid4().hex[:6]}"
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stack = subprocess.Popen([sys.executable, "-m", "stack.cli", "run", "--netns", ns,
                              "--log-level", "warning"], cwd=REPO, stdout=subprocess.PIPE,
                             text=True)
    samples: list[tuple[float, int]] = []
    result: dict = {"duration_s": args.duration, "connections": args.connections,
                    "loss": args.loss}
    try:
        line = stack.stdout.readline()
        if not line.startswith("tapstack ready"):
            print("soak: tapstack did not start", file=sys.stderr)
            return 1
        for chain, flag in (("OUTPUT", "-o"), ("INPUT", "-i")):
            subprocess.run(["ip", "netns", "exec", ns, "iptables", "-A", chain, flag, "tap0",
                            "-m", "statistic", "--mode", "random", "--probability",
                            str(args.loss), "-j", "DROP"], check=True)
        start = time.monotonic()
        wrk = subprocess.Popen(["ip", "netns", "exec", ns, "wrk", "-d", f"{args.duration}s",
                                "-c", str(args.connections), "-t", "2", "--timeout", "10s",
                                f"http://{STACK_IP}{args.path}"], stdout=subprocess.PIPE,
                               text=True)
        while wrk.poll() is None:
            samples.append((round(time.monotonic() - start, 1), rss_kb(stack.pid)))
            time.sleep(1.0)
        report = wrk.stdout.read()
        time.sleep(1.0)
        samples.append((round(time.monotonic() - start, 1), rss_kb(stack.pid)))
        requests = int(m.group(1)) if (m := re.search(r"(\d+) requests in", report)) else 0
        errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), "
                           r"timeout (\d+)", report)
        non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", report)
        result.update({
            "requests": requests,
            "requests_per_s": round(requests / max(args.duration, 1), 1),
            "socket_errors": sum(map(int, errors.groups())) if errors else 0,
            "non_2xx": int(non2xx.group(1)) if non2xx else 0,
            "rss_kb_start": samples[0][1] if samples else 0,
            "rss_kb_max": max(s[1] for s in samples) if samples else 0,
            "rss_kb_end": samples[-1][1] if samples else 0,
            "samples": samples,
        })
        stats = subprocess.run([sys.executable, "-m", "stack.cli", "stats", "--netns", ns,
                                "--json"], cwd=REPO, capture_output=True, text=True)
        if stats.returncode == 0:
            tcp = json.loads(stats.stdout)["counters"]["tcp"]
            result["tcp"] = {k: tcp[k] for k in ("retransmits", "rto_expiries",
                                                 "fast_retransmits", "tlp_probes",
                                                 "connections")}
    finally:
        if stack.poll() is None:
            stack.send_signal(signal.SIGTERM)
            stack.wait(timeout=15)
        subprocess.run(["ip", "netns", "delete", ns], capture_output=True)
    (out_dir / "soak.json").write_text(json.dumps(result, indent=1))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 3.5))
        ax.plot([s[0] for s in samples], [s[1] / 1024 for s in samples])
        ax.set_xlabel("seconds")
        ax.set_ylabel("tapstack RSS (MiB)")
        ax.set_title(f"soak: wrk -c {args.connections}, {args.loss:.0%} loss each way")
        ax.set_ylim(bottom=0)
        fig.tight_layout()
        fig.savefig(out_dir / "soak.png")
    except ImportError:
        pass
    summary = {k: v for k, v in result.items() if k != "samples"}
    print(json.dumps(summary))
    growth = result.get("rss_kb_end", 0) - result.get("rss_kb_start", 0)
    ok = result.get("socket_errors", 1) == 0 and result.get("non_2xx", 1) == 0 \
        and result.get("requests", 0) > 0 and growth < 100 * 1024
    return 0 if ok else 1


if __name__ == "__main__":
    if os.geteuid() != 0:
        sys.exit("soak: needs root (network namespaces, a TAP)")
    sys.exit(main())
