"""Microseconds of Python per TCP segment, sent and received: one fixed transfer between
two tapstack hosts over the in-memory wire (no TAP, no kernel, no loop), the time each
host spends in its own code measured around its receive() and poll().

    .venv/bin/python tools/segcost.py [--mb 20] [--runs 3] [--json FILE]

The sender's time (its output, timers, and the ACKs it takes in) divided by the data
segments it sent is the cost per sent segment; the receiver's time (the data it takes
in, the ACKs it sends) divided by the data segments it received, per received segment.
The wire's own work (copying frames across) is outside both. Each figure is the best of
`--runs` (the least disturbed by the machine), so that a change to the hot path shows.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stack.link.memory import MemoryWire
from stack.net.host import Host, HostConfig

A_IP, B_IP = bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2])


class Timed:
    """A host whose receive() and poll() add their time to `spent`."""

    def __init__(self, host: Host) -> None:
        self.host = host
        self.spent = 0.0

    def receive(self, frame, now):
        t = time.perf_counter()
        try:
            if type(frame) is tuple:  # --offload csum: the kernel would vouch for it
                return self.host.receive(frame[0], now, checksum_trusted=True)
            return self.host.receive(frame, now)
        finally:
            self.spent += time.perf_counter() - t

    def poll(self, now):
        t = time.perf_counter()
        try:
            return self.host.poll(now)
        finally:
            self.spent += time.perf_counter() - t

    def __getattr__(self, name):
        return getattr(self.host, name)


class Sink:
    """The application: counts what it is given."""

    def __init__(self) -> None:
        self.got = 0
        self.eof = False
        self.established = False

    def on_established(self) -> None:
        self.established = True

    def on_data(self, data: bytes) -> None:
        self.got += len(data)

    def on_eof(self) -> None:
        self.eof = True

    def on_acked(self) -> None:
        pass

    def on_closed(self, exc: Exception | None) -> None:
        pass


_PAYLOADS: dict[int, bytes] = {}


def payload(megabytes: int) -> bytes:
    if megabytes not in _PAYLOADS:
        _PAYLOADS[megabytes] = random.Random(7).randbytes(megabytes * 1_000_000)
    return _PAYLOADS[megabytes]


def one(megabytes: int, offload: str = "") -> dict:
    a = Timed(Host(HostConfig(mac=bytes.fromhex("020000000001"), address=A_IP,
                              offload=offload), random.Random(1)))
    b = Timed(Host(HostConfig(mac=bytes.fromhex("020000000002"), address=B_IP,
                              offload=offload), random.Random(2)))
    wire = MemoryWire(a, b)
    wire.start()
    accepted = []

    def accept(conn):
        conn.user = Sink()
        accepted.append(conn)

    b.tcp.listen(80, accept)
    client = a.tcp.connect(B_IP, 80, wire.now)
    client.user = Sink()
    wire.run(until=lambda: client.user.established and accepted, timeout=60)
    payload(megabytes)  # made before the clock starts
    a.spent = b.spent = 0.0
    # random bytes: the checksums cost what they cost on real data (int.from_bytes is
    # much faster on zeros)
    client.send(payload(megabytes))
    client.shutdown()
    server = accepted[0]
    wire.run(until=lambda: server.user.eof, timeout=3600)
    assert server.user.got == megabytes * 1_000_000, server.user.got
    data_segments = -(-megabytes * 1_000_000 // client.eff_mss)
    return {"sender_us": a.spent / data_segments * 1e6,
            "receiver_us": b.spent / data_segments * 1e6, "segments": data_segments}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mb", type=int, default=20)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--json", metavar="FILE")
    p.add_argument("--quick", action="store_true", help="2 MB, one run (a smoke test)")
    p.add_argument("--offload", choices=["csum"], default="",
                   help="both hosts with checksum offload: TCP checksums neither summed "
                        "when sent nor verified when received (the kernel's work)")
    p.add_argument("--profile", type=int, metavar="N", default=0,
                   help="then one more transfer under cProfile: the N functions with the "
                        "most time of their own, in us per data segment")
    args = p.parse_args()
    if args.quick:
        args.mb, args.runs = 2, 1
    runs = [one(args.mb, args.offload) for _ in range(args.runs)]
    best = {"sender_us": round(min(r["sender_us"] for r in runs), 2),
            "receiver_us": round(min(r["receiver_us"] for r in runs), 2),
            "segments": runs[0]["segments"], "mb": args.mb, "runs": args.runs,
            "offload": args.offload or None}
    print(f"per data segment ({best['segments']} of them, {args.mb} MB, best of "
          f"{args.runs}{', --offload ' + args.offload if args.offload else ''}): "
          f"sender {best['sender_us']} us, receiver {best['receiver_us']} us")
    if args.json:
        Path(args.json).write_text(json.dumps(best, indent=1))
    if args.profile:
        profile(args.mb, args.profile, args.offload)
    return 0


def profile(megabytes: int, top: int, offload: str = "") -> None:
    """Where the time goes (both hosts in one profile; cProfile's own overhead
    inflates every figure, the proportions are what to read)."""
    import cProfile
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    result = one(megabytes, offload)
    prof.disable()
    stats = pstats.Stats(prof)
    rows = sorted(stats.stats.items(), key=lambda kv: kv[1][2], reverse=True)[:top]
    segments = result["segments"]
    print(f"profile, us per data segment ({segments} segments), own time:")
    for (path, line, name), (_, calls, own, cumulative, _) in rows:
        where = f"{Path(path).parent.name}/{Path(path).name}:{line}" if line else path
        print(f"  {own / segments * 1e6:7.2f} own {cumulative / segments * 1e6:7.2f} cum "
              f"{calls / segments:6.2f} calls  {name}  {where}")


if __name__ == "__main__":
    sys.exit(main())
