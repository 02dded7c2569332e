"""`tapstack plot`: one TCP connection of a capture as a time-sequence graph (Stevens and
tcptrace style) and, with the trace, its congestion window and smoothed RTT over time.

    data segments   vertical bars from the first to the last byte, at the time sent
    retransmissions the same bars in red, marked with a cross
    ACK line        the receiver's cumulative ACK, a step line
    receive window  ACK + advertised window (scaled), the sender's upper bound
    SACK blocks     the ranges the receiver says it holds beyond the ACK

Sequence numbers are relative to the sender's first data byte. The sender is the side
that sent the most payload. Times are seconds from the connection's first frame.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import dpkt

from stack.wire.tcp import SYN, parse_options


@dataclass
class Series:
    """What the plot draws, as plain lists (the tests read them)."""

    sender: tuple[str, int]
    receiver: tuple[str, int]
    segments: list[tuple[float, int, int]] = field(default_factory=list)  # t, start, end
    retransmissions: list[tuple[float, int, int]] = field(default_factory=list)
    retransmission_frames: list[int] = field(default_factory=list)  # capture numbers
    acks: list[tuple[float, int]] = field(default_factory=list)
    windows: list[tuple[float, int]] = field(default_factory=list)  # t, ack + window
    sacks: list[tuple[float, int, int]] = field(default_factory=list)
    cwnd: list[tuple[float, int]] = field(default_factory=list)
    srtt_ms: list[tuple[float, float]] = field(default_factory=list)
    bytes: int = 0
    duration: float = 0.0


def _ip(addr: bytes) -> str:
    return ".".join(map(str, addr))


def _tcp_packets(path: str) -> list[tuple[int, float, Any, Any]]:
    """(frame number, time, IPv4, TCP) for every TCP segment in an Ethernet capture."""
    out = []
    with open(path, "rb") as f:
        for number, (ts, buf) in enumerate(dpkt.pcap.Reader(f), start=1):
            try:
                eth = dpkt.ethernet.Ethernet(buf)
            except (dpkt.UnpackError, dpkt.NeedData):
                continue
            ip = eth.data
            if isinstance(ip, dpkt.ip.IP) and isinstance(ip.data, dpkt.tcp.TCP):
                out.append((number, ts, ip, ip.data))
    return out


def read_connection(path: str, port: int | None = None, trace: str | None = None
                    ) -> Series:
    """The series of the busiest connection in the capture (or the busiest one using
    `port`); ValueError when there is none."""
    packets = _tcp_packets(path)
    payload: dict[tuple, int] = {}
    for _, _, ip, tcp in packets:
        if port is not None and port not in (tcp.sport, tcp.dport):
            continue
        key = ((_ip(ip.src), tcp.sport), (_ip(ip.dst), tcp.dport))
        payload[key] = payload.get(key, 0) + len(tcp.data)
    if not payload or max(payload.values()) == 0:
        raise ValueError(f"{path} holds no TCP data" + (f" on port {port}" if port else ""))
    sender, receiver = max(payload, key=payload.get)
    series = Series(sender, receiver)
    base_seq = None
    rcv_scale = 0  # the receiver's window scale, from its SYN
    t0 = None
    highest = None  # the end of the highest data sent so far
    frames_time: dict[int, float] = {}
    for number, ts, ip, tcp in packets:
        src, dst = (_ip(ip.src), tcp.sport), (_ip(ip.dst), tcp.dport)
        if {src, dst} != {sender, receiver}:
            continue
        if t0 is None:
            t0 = ts
        t = ts - t0
        frames_time[number] = t
        try:
            opts = parse_options(tcp.opts) if tcp.opts else None
        except ValueError:
            opts = None
        if src == sender:
            if tcp.flags & SYN:
                base_seq = (tcp.seq + 1) & 0xFFFFFFFF
                continue
            if not tcp.data:
                continue
            if base_seq is None:
                base_seq = tcp.seq  # the capture began after the handshake
            start = (tcp.seq - base_seq) & 0xFFFFFFFF
            end = start + len(tcp.data)
            if highest is not None and start < highest:
                series.retransmissions.append((t, start, end))
                series.retransmission_frames.append(number)
            else:
                series.segments.append((t, start, end))
            highest = end if highest is None else max(highest, end)
        else:
            if tcp.flags & SYN:
                if opts is not None and opts.wscale is not None:
                    rcv_scale = opts.wscale
                continue
            if base_seq is None or not tcp.flags & dpkt.tcp.TH_ACK:
                continue
            ack = (tcp.ack - base_seq) & 0xFFFFFFFF
            if ack > 1 << 31:  # before the first byte (the SYN's ACK)
                ack = 0
            series.acks.append((t, ack))
            series.windows.append((t, ack + (tcp.win << rcv_scale)))
            if opts is not None:
                for left, right in opts.sack_blocks:
                    series.sacks.append((t, (left - base_seq) & 0xFFFFFFFF,
                                         (right - base_seq) & 0xFFFFFFFF))
    series.bytes = highest or 0
    series.duration = (max(frames_time.values()) if frames_time else 0.0)
    if trace:
        _read_trace(series, trace, frames_time)
    return series


def _read_trace(series: Series, path: str, frames_time: dict[int, float]) -> None:
    """cwnd and srtt of the sender, from its `tcp cwnd` events. The trace runs on the
    stack's own clock; each event names the capture frame it was decided on, which
    places it on the capture's time axis."""
    (sip, sport), (rip, rport) = series.sender, series.receiver
    with open(path) as f:
        for line in f:
            e = json.loads(line)
            if e.get("layer") != "tcp" or e.get("event") != "cwnd" or "frame" not in e:
                continue
            ours = (e["local"], e["local_port"], e["remote"], e["remote_port"])
            if ours != (sip, sport, rip, rport):
                continue
            t = frames_time.get(e["frame"])
            if t is None:
                continue
            series.cwnd.append((t, e["cwnd"]))
            series.srtt_ms.append((t, e["srtt_ms"]))


def draw(series: Series, out: str, title: str | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = 2 if series.cwnd else 1
    fig, axes = plt.subplots(rows, 1, figsize=(11, 7 if rows == 2 else 5), squeeze=False,
                             sharex=True, gridspec_kw={"height_ratios": [3, 1][:rows]})
    ax = axes[0][0]
    if series.windows:
        t, w = zip(*series.windows, strict=True)
        ax.step(t, w, where="post", color="#d4a017", linewidth=0.9, label="receive window")
    if series.acks:
        t, a = zip(*series.acks, strict=True)
        ax.step(t, a, where="post", color="#2e8b57", linewidth=0.9, label="ACK")
    if series.segments:
        ax.vlines([s[0] for s in series.segments], [s[1] for s in series.segments],
                  [s[2] for s in series.segments], color="#1f4e9c", linewidth=1.2,
                  label="data segment")
    if series.sacks:
        ax.vlines([s[0] for s in series.sacks], [s[1] for s in series.sacks],
                  [s[2] for s in series.sacks], color="#8e44ad", linewidth=2.5, alpha=0.5,
                  label="SACK block")
    if series.retransmissions:
        r = series.retransmissions
        ax.vlines([s[0] for s in r], [s[1] for s in r], [s[2] for s in r], color="#d62728",
                  linewidth=2.0, label=f"retransmission ({len(r)})")
        ax.scatter([s[0] for s in r], [s[2] for s in r], marker="x", color="#d62728", s=25)
    (sip, sport), (rip, rport) = series.sender, series.receiver
    ax.set_title(title or f"{sip}:{sport} -> {rip}:{rport}: {series.bytes:,} bytes in "
                 f"{series.duration:.2f} s, {len(series.retransmissions)} retransmissions")
    ax.set_ylabel("sequence offset (bytes)")
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)
    if rows == 2:
        bx = axes[1][0]
        t, c = zip(*series.cwnd, strict=True)
        bx.step(t, c, where="post", color="#1f4e9c", label="cwnd (bytes)")
        bx.set_ylabel("cwnd (bytes)")
        tx = bx.twinx()
        t, r = zip(*series.srtt_ms, strict=True)
        tx.plot(t, r, color="#e67e22", linewidth=0.9, label="srtt (ms)")
        tx.set_ylabel("srtt (ms)")
        bx.grid(alpha=0.3)
        bx.set_xlabel("time (s)")
    else:
        ax.set_xlabel("time (s)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
