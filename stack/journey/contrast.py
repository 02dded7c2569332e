"""The UDP contrast: Bob streams the same numbered chunks to Alice over UDP and over TCP
at the same pace, through the same path, while the kernel in Alice's namespace drops a
share of what arrives from the stream's port (iptables' statistic match: loss on the
last link). Over UDP a lost chunk is gone and the others come on time; over TCP every
chunk arrives, in order, but those behind a loss wait for its retransmission.

    python -m stack.journey.contrast HOST PORT COUNT SIZE INTERVAL_MS

is Alice's side (the kernel's sockets, run in her namespace): it asks for both streams
at once and prints, per transport, each chunk's number and one-way delay (the server
stamps each chunk with the monotonic clock, which every namespace of one machine
shares). `measure()` runs it around a capture of Alice's segment and `analyse()` /
`html_section()` tell the result.
"""

from __future__ import annotations

import html
import json
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import dpkt

from stack.apps.stream import HEADER, read_header
from stack.journey.record import expect, stop
from stack.lab.build import LabError

PORT = 5004
COUNT, SIZE, INTERVAL_MS = 200, 1000, 10.0  # 2 s of a 0.8 Mbit/s stream
LOSS = 0.05


# -- Alice's side ---------------------------------------------------------------------------


def receive_udp(host: str, port: int, count: int, size: int, interval: float) -> dict:
    """Ask, then take datagrams until the last one or a silence; tell the server every
    half second that we are still here (it stops a stream nobody reports on)."""
    arrivals: list[tuple[int, float, float]] = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((host, port))
        s.send(f"STREAM {count} {size} {interval * 1000:g}\n".encode())
        s.settimeout(0.25)
        last_heard = reported = time.monotonic()
        idle = max(1.0, 50 * interval)
        error = None
        while len(arrivals) < count:
            now = time.monotonic()
            if now - reported >= 0.5:
                s.send(b"ALIVE\n")
                reported = now
            try:
                data = s.recv(65535)
            except TimeoutError:
                if time.monotonic() - last_heard > idle:
                    break
                continue
            except OSError as exc:  # an ICMP error: nobody serves the stream
                error = str(exc)
                break
            now = last_heard = time.monotonic()
            if len(data) >= HEADER.size:
                seq, sent, _ = read_header(data)
                arrivals.append((seq, now - sent, now))
    return {"arrivals": arrivals, **({"error": error} if error else {})}


def receive_tcp(host: str, port: int, count: int, size: int, interval: float) -> dict:
    """Ask, then read the stream to its end; each chunk arrives when its last byte does.
    On an error, what arrived before it is kept."""
    arrivals: list[tuple[int, float, float]] = []
    try:
        with socket.create_connection((host, port), timeout=10) as s:
            s.sendall(f"STREAM {count} {size} {interval * 1000:g}\n".encode())
            s.settimeout(max(10.0, count * interval + 10))
            buffer = b""
            while True:
                data = s.recv(65536)
                if not data:
                    break
                now = time.monotonic()
                buffer += data
                while len(buffer) >= size:
                    seq, sent, _ = read_header(buffer)
                    arrivals.append((seq, now - sent, now))
                    buffer = buffer[size:]
    except OSError as exc:
        return {"arrivals": arrivals, "error": str(exc)}
    return {"arrivals": arrivals}


def receive_both(host: str, port: int, count: int, size: int, interval: float) -> dict:
    out: dict[str, Any] = {}

    def run(name: str, fn) -> None:
        try:
            out[name] = fn(host, port, count, size, interval)
        except OSError as exc:
            out[name] = {"arrivals": [], "error": str(exc)}

    threads = [threading.Thread(target=run, args=(n, f))
               for n, f in (("udp", receive_udp), ("tcp", receive_tcp))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


# -- around it ------------------------------------------------------------------------------


def measure(netns: str, switch_netns: str, bridge: str, host: str, out: Path) -> dict:
    """Alice's receiver in her namespace, with the segment captured; the receiver's
    report plus the capture's path."""
    pcap = out / "captures" / "contrast.pcap"
    dump = subprocess.Popen(["ip", "netns", "exec", switch_netns, "tcpdump", "-i", bridge,
                             "-U", "--immediate-mode", "-n", "-Z", "root", "-s", "200",
                             "-w", str(pcap), "port", str(PORT)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        try:
            expect(dump, "listening on", f"tcpdump on {bridge}")
        except LabError as exc:
            return {"error": str(exc)}
        limit = COUNT * INTERVAL_MS / 1000 + 30
        r = subprocess.run(["timeout", "-k", "2", str(limit), "ip", "netns", "exec", netns,
                            sys.executable, "-m", "stack.journey.contrast", host, str(PORT),
                            str(COUNT), str(SIZE), str(INTERVAL_MS)],
                           capture_output=True, text=True, cwd=Path(__file__).parents[2])
        if r.returncode != 0:
            return {"error": r.stderr.strip().splitlines()[-1] if r.stderr.strip()
                    else f"exit {r.returncode}"}
        try:
            result = json.loads(r.stdout)
        except ValueError:
            return {"error": f"the receiver wrote no result: {r.stdout[-200:]!r}"}
    finally:
        stop([dump])
    result["capture"] = str(pcap)
    return result


def dropped_by_iptables(netns: str) -> dict[str, int]:
    """What the loss rules in Alice's namespace dropped, per protocol."""
    r = subprocess.run(["ip", "netns", "exec", netns, "iptables", "-L", "INPUT", "-v", "-x",
                        "-n"], capture_output=True, text=True, timeout=10)
    out = {"udp": 0, "tcp": 0}
    names = {"udp": "udp", "17": "udp", "tcp": "tcp", "6": "tcp"}  # iptables-nft: numbers
    for line in r.stdout.splitlines():
        parts = line.split()
        if len(parts) > 3 and parts[2] == "DROP" and parts[3] in names and \
                f"spt:{PORT}" in line:
            out[names[parts[3]]] += int(parts[0])
    return out


def analyse(result: dict, dropped: dict[str, int]) -> dict[str, Any]:
    """Per transport: what arrived, what was lost, what came out of order, the delays;
    for TCP also what was retransmitted (from the capture of Alice's segment)."""
    report: dict[str, Any] = {"count": COUNT, "size": SIZE, "interval_ms": INTERVAL_MS,
                              "loss": LOSS, "dropped_by_kernel": dropped}
    for name in ("udp", "tcp"):
        got = result.get(name, {})
        arrivals = got.get("arrivals", [])
        seqs = [a[0] for a in arrivals]
        highest, late_order = -1, 0
        for seq in seqs:
            if seq < highest:
                late_order += 1
            highest = max(highest, seq)
        delays = [a[1] * 1000 for a in arrivals]
        report[name] = {
            "received": len(set(seqs)), "lost": sorted(set(range(COUNT)) - set(seqs)),
            "out_of_order": late_order, "in_order": seqs == sorted(seqs),
            "delay_ms": {"median": round(statistics.median(delays), 2) if delays else None,
                         "max": round(max(delays), 2) if delays else None},
            "duration_s": round(arrivals[-1][2] - arrivals[0][2], 3) if arrivals else 0,
            "points": [(a[0], round(a[1] * 1000, 2)) for a in arrivals],
            **({"error": got["error"]} if "error" in got else {})}
    base = report["udp"]["delay_ms"]["median"] or 0
    tcp = report["tcp"]
    tcp["held_back"] = sum(1 for _, d in tcp["points"] if d > base + 2 * INTERVAL_MS)
    if result.get("capture"):
        wire = _retransmissions(Path(result["capture"]))
        report["udp_on_wire"] = wire.pop("udp_on_wire")
        tcp.update(wire)
        report["capture"] = result["capture"]
    return report


def _frames(pcap: Path):
    """(number, bytes) of each frame; a truncated file ends the list, not the run."""
    try:
        with open(pcap, "rb") as f:
            for n, (_ts, buf) in enumerate(dpkt.pcap.Reader(f), start=1):
                yield n, buf
    except (OSError, ValueError, dpkt.Error):
        return


def _retransmissions(pcap: Path) -> dict[str, Any]:
    """Data segments from the stream's port that carry bytes sent before, on Alice's
    segment (seen before her kernel dropped anything: the capture mirrors the bridge)."""
    base: int | None = None
    highest = 0  # the end of the stream so far, relative to the first byte
    again, frames, udp_on_wire = 0, [], 0
    for n, buf in _frames(pcap):
        try:
            ip = dpkt.ethernet.Ethernet(buf).data
        except (dpkt.UnpackError, dpkt.NeedData):
            continue
        if not isinstance(ip, dpkt.ip.IP):
            continue
        seg = ip.data
        if isinstance(seg, dpkt.udp.UDP) and seg.sport == PORT:
            udp_on_wire += 1
        if not isinstance(seg, dpkt.tcp.TCP) or seg.sport != PORT:
            continue
        size = ip.len - ip.hl * 4 - seg.off * 4
        if size <= 0:
            continue
        if base is None:
            base = seg.seq
        start = (seg.seq - base) % 2**32
        if start < highest:
            again += 1
            frames.append(n)
        highest = max(highest, start + size)
    return {"retransmitted": again, "retransmitted_frames": frames[:20],
            "udp_on_wire": udp_on_wire}


# -- telling it -----------------------------------------------------------------------------


def html_section(c: dict[str, Any]) -> str:
    e = html.escape
    if "udp" not in c:
        return ("<section id='contrast'><h2>8. UDP and TCP on a lossy link</h2><p>"
                f"{e(str(c.get('error', 'not measured')))}</p></section>")
    u, t = c["udp"], c["tcp"]
    rows = [("chunks asked", c["count"], c["count"]),
            ("dropped by Alice's kernel (iptables)", c["dropped_by_kernel"]["udp"],
             c["dropped_by_kernel"]["tcp"]),
            ("retransmitted by Bob", "never", t.get("retransmitted", "?")),
            ("arrived at the application", u["received"], t["received"]),
            ("lost for good", len(u["lost"]), len(t["lost"])),
            ("out of order", u["out_of_order"], t["out_of_order"]),
            ("median one-way delay (ms)", u["delay_ms"]["median"], t["delay_ms"]["median"]),
            ("largest delay (ms)", u["delay_ms"]["max"], t["delay_ms"]["max"]),
            ("chunks held back behind a loss", 0, t["held_back"])]
    table = "".join(f"<tr><td>{e(str(a))}</td><td>{e(str(b))}</td><td>{e(str(d))}</td></tr>"
                    for a, b, d in rows)
    lost = ", ".join(str(s) for s in u["lost"][:40]) + (" ..." if len(u["lost"]) > 40 else "")
    return (
        "<section id='contrast'><h2>8. UDP and TCP on a lossy link</h2>"
        f"<p>Bob sent {c['count']} numbered chunks of {c['size']} bytes, one every "
        f"{c['interval_ms']:g} ms, over UDP and over TCP at once, from port {PORT}; Alice's "
        f"kernel dropped about {c['loss']:.0%} of what arrived from that port (iptables, "
        "statistic match, chosen at random). UDP delivered what survived, on time, and "
        "nothing else: the application sees the gaps. TCP delivered every byte, in order; "
        "the chunks behind a lost segment waited in Alice's kernel for its retransmission "
        "(head-of-line blocking), which is the spikes below.</p>"
        f"<table><tr><th></th><th>UDP</th><th>TCP</th></tr>{table}</table>"
        f"<p>UDP chunks lost: {e(lost) or 'none'}.</p>" + delay_svg(c) + "</section>")


def delay_svg(c: dict[str, Any]) -> str:
    """Each chunk's one-way delay by its number: UDP dots, TCP dots, lost UDP chunks as
    red marks along the bottom."""
    width, height, left, bottom, top = 1000, 260, 50, 30, 20
    points = c["udp"]["points"] + c["tcp"]["points"]
    ymax = max([d for _, d in points] + [1.0]) * 1.1
    plot_w, plot_h = width - left - 20, height - bottom - top

    def x(seq: float) -> float:
        return left + plot_w * seq / max(c["count"] - 1, 1)

    def y(ms: float) -> float:
        return top + plot_h * (1 - ms / ymax)

    parts = [f"<svg xmlns='http://www.w3.org/2000/svg' viewBox='0 0 {width} {height}' "
             f"width='{width}' height='{height}' font-family='sans-serif' font-size='11'>",
             f"<line x1='{left}' y1='{top + plot_h}' x2='{width - 20}' y2='{top + plot_h}' "
             "stroke='#444'/>",
             f"<line x1='{left}' y1='{top}' x2='{left}' y2='{top + plot_h}' stroke='#444'/>"]
    for frac in (0, 0.5, 1):
        ms = ymax / 1.1 * frac
        parts.append(f"<text x='{left - 4}' y='{y(ms) + 4:.1f}' text-anchor='end'>"
                     f"{ms:.0f}</text>")
    parts.append(f"<text x='{left}' y='{top - 6}'>one-way delay (ms)</text>")
    parts.append(f"<text x='{width - 20}' y='{height - 4}' text-anchor='end'>chunk number"
                 "</text>")
    for name, colour in (("tcp", "#e67e22"), ("udp", "#1f77b4")):
        for seq, ms in c[name]["points"]:
            parts.append(f"<circle cx='{x(seq):.1f}' cy='{y(ms):.1f}' r='2.2' "
                         f"fill='{colour}'><title>{name.upper()} chunk {seq}: {ms} ms"
                         "</title></circle>")
    for seq in c["udp"]["lost"]:
        parts.append(f"<text x='{x(seq):.1f}' y='{top + plot_h + 14}' fill='#c0392b' "
                     f"text-anchor='middle'>&#x2715;<title>UDP chunk {seq} lost</title></text>")
    parts.append(f"<g transform='translate({width - 260},{top})'>"
                 "<circle cx='0' cy='0' r='4' fill='#1f77b4'/><text x='8' y='4'>UDP</text>"
                 "<circle cx='60' cy='0' r='4' fill='#e67e22'/><text x='68' y='4'>TCP</text>"
                 "<text x='110' y='4' fill='#c0392b'>&#x2715; UDP lost</text></g></svg>")
    return "".join(parts)


def main(argv: list[str]) -> int:
    host, port, count, size, interval_ms = argv
    result = receive_both(host, int(port), int(count), int(size), float(interval_ms) / 1000)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
