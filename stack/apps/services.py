"""Test services in the tradition of RFC 862 (echo), RFC 863 (discard) and RFC 864
(chargen), as asyncio Protocols.

`source` differs from chargen on purpose: the client sends a decimal byte count and a
newline, the server sends exactly that many deterministic bytes and closes, so a test
can check a download's length and sha256.
"""

from __future__ import annotations

import asyncio
import hashlib

_BLOCK = bytes(range(256)) * 256  # 64 KiB; byte i of the stream is i % 256


def deterministic_bytes(offset: int, length: int) -> bytes:
    """Bytes [offset, offset+length) of the endless stream 00 01 02 ... ff 00 01 ..."""
    out = bytearray()
    while length > 0:
        start = offset % len(_BLOCK)
        chunk = _BLOCK[start : start + length]
        out += chunk
        offset += len(chunk)
        length -= len(chunk)
    return bytes(out)


def deterministic_sha256(length: int) -> str:
    h = hashlib.sha256()
    for offset in range(0, length, len(_BLOCK)):
        h.update(deterministic_bytes(offset, min(len(_BLOCK), length - offset)))
    return h.hexdigest()


class EchoProtocol(asyncio.Protocol):
    """Send back what arrives; stop reading while the peer is not taking our output."""

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)

    def pause_writing(self) -> None:
        self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.transport.resume_reading()

    def eof_received(self) -> bool:
        self.transport.write_eof()  # half-close: everything was echoed before this
        return True  # keep the transport until the peer closes too

    def connection_lost(self, exc: Exception | None) -> None:
        pass


class DiscardProtocol(asyncio.Protocol):
    """Counts what it is given (in `counters`, shown by `tapstack stats` as
    services.discard_bytes) and drops it."""

    def __init__(self, counters: dict[str, int] | None = None) -> None:
        self.counters = counters if counters is not None else {"discard_bytes": 0}

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self.received = 0

    def data_received(self, data: bytes) -> None:
        self.received += len(data)
        self.counters["discard_bytes"] += len(data)

    def eof_received(self) -> bool:
        return False  # close our side too


class SourceProtocol(asyncio.Protocol):
    """Reads 'N\\n', then sends N deterministic bytes with flow control and closes."""

    MAX_REQUEST = 32
    CHUNK = 256 * 1024

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self.request = bytearray()
        self.remaining = -1
        self.offset = 0
        self.paused = False

    def data_received(self, data: bytes) -> None:
        if self.remaining >= 0:
            return
        self.request += data
        if b"\n" not in self.request:
            if len(self.request) > self.MAX_REQUEST:
                self.transport.write(b"error: send a byte count and a newline\n")
                self.transport.close()
            return
        line = bytes(self.request.split(b"\n", 1)[0]).strip()
        if not line.isdigit():
            self.transport.write(b"error: send a byte count and a newline\n")
            self.transport.close()
            return
        self.remaining = int(line)
        self._produce()

    def _produce(self) -> None:
        while self.remaining > 0 and not self.paused:
            n = min(self.CHUNK, self.remaining)
            self.transport.write(deterministic_bytes(self.offset, n))
            self.offset += n
            self.remaining -= n
        if self.remaining == 0:
            self.remaining = -2
            self.transport.close()

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self._produce()

    def eof_received(self) -> bool:
        return self.remaining > 0  # keep sending if the client half-closed after asking


class UdpEchoProtocol(asyncio.DatagramProtocol):
    """RFC 862 over UDP: each datagram goes back to its sender."""

    def connection_made(self, transport: asyncio.DatagramTransport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.transport.sendto(data, addr)

    def error_received(self, exc: Exception) -> None:
        pass  # an ICMP error about an earlier reply: nothing to do for echo
