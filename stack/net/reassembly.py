"""IPv4 reassembly (RFC 791, RFC 815) with the defences fragments need.

Fragments are kept per (src, dst, protocol, id) as a sorted list of disjoint pieces.
- Overlap: the whole datagram is dropped and later fragments of it too, until its
  timer ends (RFC 5722's conservative policy, applied to IPv4). An exact duplicate of
  a piece already held is harmless and ignored.
- A datagram that would exceed 65,535 bytes (ping of death) is dropped.
- A first fragment too short to hold its transport header is dropped (RFC 1858).
- Bounded: at most `max_datagrams` pending and `max_bytes` held; the oldest is evicted.
- Incomplete datagrams expire after `timeout` seconds; if the first fragment had
  arrived, the caller sends ICMP Time Exceeded (code 1) quoting it.
"""

from __future__ import annotations

from dataclasses import dataclass

from stack.counters import Counters
from stack.wire.ipv4 import MAX_DATAGRAM, PROTO_ICMP, PROTO_TCP, PROTO_UDP, IPv4Header

# Smallest transport header each protocol needs in the first fragment (RFC 1858).
MIN_FIRST = {PROTO_TCP: 20, PROTO_UDP: 8, PROTO_ICMP: 8}

COUNTERS = (
    "ipv4.reasm_fragments", "ipv4.reasm_ok", "ipv4.reasm_timeouts", "ipv4.reasm_overlaps",
    "ipv4.reasm_duplicates", "ipv4.reasm_too_big", "ipv4.reasm_tiny_first",
    "ipv4.reasm_evicted", "ipv4.reasm_bad_length", "ipv4.reasm_dropped_fragments",
)


@dataclass(slots=True)
class ReassemblyConfig:
    timeout: float = 30.0
    max_datagrams: int = 64
    max_bytes: int = 4 << 20


class _Pending:
    __slots__ = ("bytes", "dead", "expires", "first_header", "pieces", "total")

    def __init__(self, expires: float) -> None:
        self.pieces: list[tuple[int, bytes]] = []  # (offset, data), sorted, disjoint
        self.total: int | None = None  # payload length, known once the last piece came
        self.bytes = 0
        self.expires = expires
        self.first_header: bytes | None = None  # header + 8 bytes, for ICMP
        self.dead = False  # overlapped or oversized: swallow the rest until it expires


class Reassembler:
    def __init__(self, config: ReassemblyConfig, counters: Counters) -> None:
        self.config = config
        self.counters = counters
        self.pending: dict[tuple, _Pending] = {}  # insertion order = age
        self.bytes = 0
        counters.declare(*COUNTERS)

    def add(self, ip: IPv4Header, packet: memoryview, now: float
            ) -> tuple[bytes, bytes] | None:
        """Take one fragment; returns (the first fragment's header, the whole payload)
        when the datagram is complete."""
        c = self.counters
        c["ipv4.reasm_fragments"] += 1
        key = (ip.src, ip.dst, ip.protocol, ip.ident)
        entry = self.pending.get(key)
        if entry is None:
            entry = self._new(key, now)
        if entry.dead:
            c["ipv4.reasm_dropped_fragments"] += 1
            return None
        offset = ip.fragment_offset
        data = bytes(packet[ip.header_length:ip.total_length])
        end = offset + len(data)
        if ip.more_fragments and (len(data) == 0 or len(data) % 8):
            c["ipv4.reasm_bad_length"] += 1  # RFC 791: all but the last are 8-byte multiples
            return self._kill(entry)
        if ip.header_length + end > MAX_DATAGRAM:
            c["ipv4.reasm_too_big"] += 1
            return self._kill(entry)
        if offset == 0:
            if len(data) < MIN_FIRST.get(ip.protocol, 0):
                c["ipv4.reasm_tiny_first"] += 1
                return self._kill(entry)
            entry.first_header = bytes(packet[:ip.header_length]) + data[:8]
        if not ip.more_fragments:
            if entry.total is not None and entry.total != end:
                c["ipv4.reasm_overlaps"] += 1  # two different ends
                return self._kill(entry)
            entry.total = end
        if entry.total is not None and end > entry.total:
            c["ipv4.reasm_overlaps"] += 1
            return self._kill(entry)
        # place the piece; any overlap that is not an exact duplicate kills the datagram
        pieces = entry.pieces
        i = 0
        while i < len(pieces) and pieces[i][0] + len(pieces[i][1]) <= offset:
            i += 1
        if i < len(pieces) and pieces[i][0] < end:
            if pieces[i][0] == offset and pieces[i][1] == data:
                c["ipv4.reasm_duplicates"] += 1
                return None
            c["ipv4.reasm_overlaps"] += 1
            return self._kill(entry)
        pieces.insert(i, (offset, data))
        entry.bytes += len(data)
        self.bytes += len(data)
        self._enforce_bounds(key)
        if entry.total is None or key not in self.pending:
            return None
        # complete when the pieces tile [0, total) without holes
        expect = 0
        for off, piece in pieces:
            if off != expect:
                return None
            expect += len(piece)
        if expect != entry.total:
            return None
        del self.pending[key]
        self.bytes -= entry.bytes
        c["ipv4.reasm_ok"] += 1
        first = entry.first_header or b""
        return first[: len(first) - 8], b"".join(piece for _, piece in pieces)

    def _new(self, key: tuple, now: float) -> _Pending:
        entry = self.pending[key] = _Pending(now + self.config.timeout)
        self._enforce_bounds(key)
        return entry

    def _kill(self, entry: _Pending) -> None:
        """Drop what is held, keep a tombstone so later fragments are swallowed too."""
        self.bytes -= entry.bytes
        entry.pieces = []
        entry.bytes = 0
        entry.dead = True
        entry.first_header = None
        return None

    def _enforce_bounds(self, keep: tuple) -> None:
        cfg = self.config
        while (len(self.pending) > cfg.max_datagrams or self.bytes > cfg.max_bytes) \
                and len(self.pending) > 1:
            oldest = next(iter(self.pending))
            if oldest == keep:
                break
            entry = self.pending.pop(oldest)
            self.bytes -= entry.bytes
            if not entry.dead:
                self.counters["ipv4.reasm_evicted"] += 1
        if self.bytes > cfg.max_bytes and keep in self.pending:
            self.counters["ipv4.reasm_evicted"] += 1
            self._kill(self.pending[keep])

    def expire(self, now: float) -> list[bytes]:
        """Drop datagrams whose time is up; returns the quotes for ICMP Time Exceeded."""
        quotes = []
        while self.pending:
            key, entry = next(iter(self.pending.items()))
            if entry.expires > now:
                break
            del self.pending[key]
            self.bytes -= entry.bytes
            if not entry.dead:
                self.counters["ipv4.reasm_timeouts"] += 1
                if entry.first_header is not None:
                    quotes.append(entry.first_header)
        return quotes

    def next_deadline(self) -> float | None:
        if not self.pending:
            return None
        return next(iter(self.pending.values())).expires
