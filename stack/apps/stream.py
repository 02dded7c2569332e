"""A paced stream of numbered chunks, over UDP or TCP: the same bytes both ways, so that
a lossy path shows what each transport makes of a loss.

The client asks with one line, `STREAM <count> <size> <interval_ms>` (a datagram, or the
first line on a TCP connection); the server then sends `count` chunks of `size` bytes,
one every `interval_ms`, each led by a header:

    seq (4 bytes) | sent at (8 bytes, the sender's monotonic clock, float seconds) |
    count (4 bytes)

and filled with the deterministic bytes of the `source` service. Over UDP a chunk is one
datagram and a lost one is gone; over TCP the chunks are one byte stream, and a loss
holds back every later chunk until the retransmission arrives (head-of-line blocking).
On one machine every namespace reads the same monotonic clock, so the receiver can
subtract: the chunk's one-way delay.

Bounded: at most 10,000 chunks of 16..1400 bytes, one per millisecond at most, and one
stream per client address and port at a time (UDP); a bad request is counted and
ignored.
"""

from __future__ import annotations

import asyncio
import struct
import time
from collections.abc import Callable

from stack.apps.services import deterministic_bytes

HEADER = struct.Struct("!IdI")
MAX_COUNT = 10_000
MIN_SIZE, MAX_SIZE = HEADER.size, 1400
MIN_INTERVAL_MS = 1.0


def parse_request(line: bytes) -> tuple[int, int, float] | None:
    """`STREAM count size interval_ms` -> (count, size, interval in s); None if bad."""
    parts = line.strip().split()
    if len(parts) != 4 or parts[0] != b"STREAM":
        return None
    try:
        count, size, interval = int(parts[1]), int(parts[2]), float(parts[3])
    except ValueError:
        return None
    if not (1 <= count <= MAX_COUNT and MIN_SIZE <= size <= MAX_SIZE
            and MIN_INTERVAL_MS <= interval <= 10_000):
        return None
    return count, size, interval / 1000.0


def chunk(seq: int, count: int, size: int, now: float) -> bytes:
    return HEADER.pack(seq, now, count) + deterministic_bytes(seq * size, size - HEADER.size)


def read_header(data: bytes) -> tuple[int, float, int]:
    return HEADER.unpack_from(data)


class _Pacer:
    """Calls `send(seq)` for seq in 0..count-1, one every `interval`, on the loop's
    clock (a late tick sends what is due, so the average rate holds)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, count: int, interval: float,
                 send: Callable[[int], bool], done: Callable[[], None]) -> None:
        self.loop, self.count, self.interval = loop, count, interval
        self.send, self.done = send, done
        self.start = loop.time()
        self.next = 0
        self.handle: asyncio.TimerHandle | asyncio.Handle | None = loop.call_soon(self._tick)

    def _tick(self) -> None:
        due = min(self.count, int((self.loop.time() - self.start) / self.interval) + 1)
        while self.next < due:
            if not self.send(self.next):
                self.cancel()
                return
            self.next += 1
        if self.next >= self.count:
            self.handle = None
            self.done()
            return
        self.handle = self.loop.call_at(self.start + self.next * self.interval, self._tick)

    def cancel(self) -> None:
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None
        self.done()


class StreamUdpProtocol(asyncio.DatagramProtocol):
    """One paced stream per requesting address and port."""

    def __init__(self, counters: dict[str, int]) -> None:
        self.counters = counters
        self.active: dict[tuple[str, int], _Pacer] = {}

    def connection_made(self, transport: asyncio.DatagramTransport) -> None:
        self.transport = transport
        self.loop = asyncio.get_running_loop()

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        asked = parse_request(data)
        if asked is None or addr in self.active:
            self.counters["stream_bad_requests"] += 1
            return
        count, size, interval = asked
        self.counters["stream_udp_streams"] += 1

        def send(seq: int) -> bool:
            self.transport.sendto(chunk(seq, count, size, time.monotonic()), addr)
            self.counters["stream_udp_chunks"] += 1
            return True

        self.active[addr] = _Pacer(self.loop, count, interval, send,
                                   lambda: self.active.pop(addr, None))

    def error_received(self, exc: Exception) -> None:
        # an ICMP error (the client is gone): the stream it was about cannot be told
        # apart here, so each stream simply runs to its end
        self.counters["stream_udp_errors"] += 1


class StreamTcpProtocol(asyncio.Protocol):
    """The same chunks on one connection, then a close."""

    def __init__(self, counters: dict[str, int]) -> None:
        self.counters = counters
        self.buffer = b""
        self.pacer: _Pacer | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self.pacer is not None:
            return
        self.buffer += data
        if b"\n" not in self.buffer:
            if len(self.buffer) > 100:
                self.counters["stream_bad_requests"] += 1
                self.transport.close()
            return
        asked = parse_request(self.buffer.split(b"\n", 1)[0])
        if asked is None:
            self.counters["stream_bad_requests"] += 1
            self.transport.close()
            return
        count, size, interval = asked
        self.counters["stream_tcp_streams"] += 1

        def send(seq: int) -> bool:
            if self.transport.is_closing():
                return False
            self.transport.write(chunk(seq, count, size, time.monotonic()))
            self.counters["stream_tcp_chunks"] += 1
            return True

        self.pacer = _Pacer(asyncio.get_running_loop(), count, interval, send, self._done)

    def _done(self) -> None:
        if self.pacer is not None and self.pacer.next >= self.pacer.count:
            self.transport.close()  # after everything written: a FIN at the end

    def connection_lost(self, exc: Exception | None) -> None:
        if self.pacer is not None and self.pacer.handle is not None:
            self.pacer.handle.cancel()
            self.pacer.handle = None
