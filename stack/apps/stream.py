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

A UDP stream lasts only while its receiver says it is there: any datagram from it (the
receiver sends one every half second, as an RTP receiver sends its reports) keeps it
going for another two seconds. A forged request therefore costs at most two seconds of
one stream, and never more than the caps allow:

- at most 10,000 chunks of 16..1400 bytes, one a millisecond at most (11.2 Mbit/s);
- at most 8 streams at once (UDP and TCP together), one UDP stream per client address;
- a TCP client has 5 s to send its request line; a stream pauses while the client's
  TCP does not take more (pause_writing) instead of queueing.

A request outside them is counted (`services.stream_bad_requests`, `stream_refused`) and
ignored. Not started by default: `stream = 5004` in a node's [services], or
`tapstack run --stream 5004`.
"""

from __future__ import annotations

import asyncio
import struct
import time
from collections.abc import Callable
from typing import Any

from stack.apps.services import deterministic_bytes

HEADER = struct.Struct("!IdI")
MAX_COUNT = 10_000
MIN_SIZE, MAX_SIZE = HEADER.size, 1400
MIN_INTERVAL_MS = 1.0
MAX_STREAMS = 8
ALIVE_FOR = 2.0  # seconds a UDP stream goes on after the receiver was last heard
REQUEST_TIMEOUT = 5.0
CATCH_UP = 8  # chunks one late tick may send; beyond that the pace starts again


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


class Streams:
    """What every stream of one node shares: the cap and the counters."""

    def __init__(self, counters: dict[str, int] | None = None) -> None:
        self.active = 0
        self.counters: dict[str, int] = counters if counters is not None else {}

    def count(self, name: str) -> None:
        self.counters[name] = self.counters.get(name, 0) + 1

    def admit(self) -> bool:
        if self.active >= MAX_STREAMS:
            self.count("stream_refused")
            return False
        self.active += 1
        return True

    def release(self) -> None:
        self.active -= 1


class _Pacer:
    """Calls `send(seq)` for seq in 0..count-1, one every `interval`, on the loop's
    clock; a late tick sends what is due (at most CATCH_UP chunks), so the average rate
    holds. `done()` once, when the last chunk is sent or the pacer is stopped."""

    def __init__(self, loop: asyncio.AbstractEventLoop, count: int, interval: float,
                 send: Callable[[int], None], done: Callable[[], None]) -> None:
        self.loop, self.count, self.interval = loop, count, interval
        self.send, self.done = send, done
        self.start = loop.time()
        self.next = 0
        self.finished = False
        self.handle: asyncio.TimerHandle | asyncio.Handle | None = loop.call_soon(self._tick)

    def _tick(self) -> None:
        self.handle = None
        due = min(self.count, int((self.loop.time() - self.start) / self.interval) + 1)
        if due - self.next > CATCH_UP:  # very late: keep the pace, not the schedule
            self.start = self.loop.time() - self.next * self.interval
            due = self.next + 1
        while self.next < due:
            self.send(self.next)
            self.next += 1
        if self.next >= self.count:
            self.stop()
            return
        self.handle = self.loop.call_at(self.start + self.next * self.interval, self._tick)

    def pause(self) -> None:
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None

    def resume(self) -> None:
        if self.handle is None and not self.finished:
            self.start = self.loop.time() - self.next * self.interval
            self.handle = self.loop.call_soon(self._tick)

    def stop(self) -> None:
        self.pause()
        if not self.finished:
            self.finished = True
            self.done()


class StreamUdpProtocol(asyncio.DatagramProtocol):
    """One paced stream per client address, alive while the client is heard from."""

    def __init__(self, streams: Streams) -> None:
        self.streams = streams
        self.active: dict[str, tuple[_Pacer, list[float]]] = {}  # address -> (pacer, heard)

    def connection_made(self, transport: asyncio.DatagramTransport) -> None:
        self.transport = transport
        self.loop = asyncio.get_running_loop()

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if addr[0] in self.active:
            self.active[addr[0]][1][0] = self.loop.time()  # the receiver is there
            return
        asked = parse_request(data)
        if asked is None:
            self.streams.count("stream_bad_requests")
            return
        if not self.streams.admit():
            return
        count, size, interval = asked
        self.streams.count("stream_udp_streams")
        heard = [self.loop.time()]

        def send(seq: int) -> None:
            if self.loop.time() - heard[0] > ALIVE_FOR:
                self.streams.count("stream_udp_timeouts")
                self.loop.call_soon(pacer.stop)  # the receiver has gone quiet
                return
            self.transport.sendto(chunk(seq, count, size, time.monotonic()), addr)
            self.streams.count("stream_udp_chunks")

        def done() -> None:
            self.active.pop(addr[0], None)
            self.streams.release()

        pacer = _Pacer(self.loop, count, interval, send, done)
        self.active[addr[0]] = (pacer, heard)

    def error_received(self, exc: Exception) -> None:
        # an ICMP error about a chunk: the receiver's silence will end its stream
        self.streams.count("stream_udp_errors")

    def connection_lost(self, exc: Exception | None) -> None:
        for pacer, _ in list(self.active.values()):
            pacer.stop()


class StreamTcpProtocol(asyncio.Protocol):
    """The same chunks on one connection, then a FIN."""

    def __init__(self, streams: Streams) -> None:
        self.streams = streams
        self.buffer = b""
        self.pacer: _Pacer | None = None
        self.waiting: asyncio.TimerHandle | None = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.waiting = asyncio.get_running_loop().call_later(REQUEST_TIMEOUT, self._slow)

    def _slow(self) -> None:
        self.waiting = None
        if not self.transport.is_closing():
            self.streams.count("stream_bad_requests")
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self.pacer is not None or self.transport.is_closing():
            return
        self.buffer += data
        if b"\n" not in self.buffer:
            if len(self.buffer) > 100:
                self._refuse()
            return
        if self.waiting is not None:
            self.waiting.cancel()
            self.waiting = None
        asked = parse_request(self.buffer.split(b"\n", 1)[0])
        if asked is None:
            self._refuse()
            return
        if not self.streams.admit():
            self.transport.close()
            return
        count, size, interval = asked
        self.streams.count("stream_tcp_streams")

        def send(seq: int) -> None:
            self.transport.write(chunk(seq, count, size, time.monotonic()))
            self.streams.count("stream_tcp_chunks")

        def done() -> None:
            self.streams.release()
            self.transport.close()  # after everything written: a FIN at the end

        self.pacer = _Pacer(asyncio.get_running_loop(), count, interval, send, done)

    def _refuse(self) -> None:
        if self.waiting is not None:
            self.waiting.cancel()
            self.waiting = None
        self.streams.count("stream_bad_requests")
        self.transport.close()

    def eof_received(self) -> bool:
        return True  # a client that half-closed after asking still gets its stream

    def pause_writing(self) -> None:
        if self.pacer is not None:
            self.pacer.pause()

    def resume_writing(self) -> None:
        if self.pacer is not None:
            self.pacer.resume()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.waiting is not None:
            self.waiting.cancel()
        if self.pacer is not None:
            self.pacer.stop()
