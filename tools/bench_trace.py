"""make bench, the decision trace: what it costs the core, off and on.

    python tools/bench_trace.py           20 MB each run, best of 5
    python tools/bench_trace.py --quick   5 MB, best of 2

Two hosts on the in-memory wire (the sans-I/O core alone, no TAP, no event loop) move
the same bytes three ways: nobody tracing, a subscriber that discards events, and a
subscriber that writes every event as a JSON line (what --trace FILE does). Reports
seconds per run and the ratio to "off". Writes bench/results/trace.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from stack.link.memory import MemoryWire  # noqa: E402
from stack.net.host import Host, HostConfig  # noqa: E402
from tests.unit.tcp_peer import User  # noqa: E402

A, B = bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2])


def transfer(size: int, mode: str) -> tuple[float, int]:
    a = Host(HostConfig(mac=bytes.fromhex("020000000001"), address=A), random.Random(1))
    b = Host(HostConfig(mac=bytes.fromhex("020000000002"), address=B), random.Random(2))
    events = [0]
    sink_file = open(os.devnull, "w")  # noqa: SIM115 - closed below

    def discard(event: dict) -> None:
        events[0] += 1

    def write(event: dict) -> None:
        events[0] += 1
        sink_file.write(json.dumps(event) + "\n")

    if mode != "off":
        for host in (a, b):
            host.node.trace.subscribe(discard if mode == "discard" else write)
    wire = MemoryWire(a, b)
    wire.start()
    accepted: list = []

    def accept(conn) -> None:
        conn.user = User()
        accepted.append(conn)

    b.tcp.listen(80, accept)
    client = a.tcp.connect(B, 80, wire.now)
    client.user = User()
    wire.run(until=lambda: accepted and client.user.established, timeout=10)
    start = time.perf_counter()
    client.send(bytes(size))
    wire.run(until=lambda: len(accepted[0].user.data) >= size, timeout=10_000)
    elapsed = time.perf_counter() - start
    sink_file.close()
    return elapsed, events[0]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=str(REPO / "bench" / "results"))
    args = p.parse_args()
    size, runs = (5_000_000, 2) if args.quick else (20_000_000, 5)
    best: dict[str, float] = {}
    counts: dict[str, int] = {}
    for _ in range(runs):  # interleaved, so a slow moment hurts every mode alike
        for mode in ("off", "discard", "json"):
            elapsed, n = transfer(size, mode)
            best[mode] = min(best.get(mode, elapsed), elapsed)
            counts[mode] = n
    results = {m: {"seconds": round(best[m], 4), "ratio": round(best[m] / best["off"], 3),
                   "events": counts[m]} for m in best}
    md = (f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: {size:,} bytes "
          f"between two hosts on the in-memory wire, best of {runs}.\n\n"
          "| trace | seconds | ratio to off | events |\n|---|---|---|---|\n"
          + "".join(f"| {m} | {r['seconds']} | {r['ratio']:.2f} | {r['events']:,} |\n"
                    for m, r in results.items()))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "trace-quick" if args.quick else "trace"
    (out / f"{name}.md").write_text(md)
    (out / f"{name}.json").write_text(json.dumps(results, indent=1))
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
