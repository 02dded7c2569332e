"""UDP codec (RFC 768)."""

from __future__ import annotations

import struct

from stack.wire.checksum import internet_checksum, ones_sum
from stack.wire.errors import MalformedError

UDP_HEADER = struct.Struct("!HHHH")
UDP_HLEN = 8


def parse_udp(datagram: memoryview, src: bytes, dst: bytes,
              verify_checksum: bool = True) -> tuple[int, int, memoryview]:
    """(source port, destination port, payload). A zero checksum means none was sent
    (RFC 768), which IPv4 allows."""
    if len(datagram) < UDP_HLEN:
        raise MalformedError("truncated")
    sport, dport, length, csum = UDP_HEADER.unpack_from(datagram, 0)
    if length < UDP_HLEN or length > len(datagram):
        raise MalformedError("bad_length")
    datagram = datagram[:length]  # IPv4 may carry padding past the UDP length
    if verify_checksum and csum != 0:
        pseudo = int.from_bytes(src + dst, "big") + 17 + length
        if ones_sum(datagram, pseudo) != 0:
            raise MalformedError("bad_checksum")
    return sport, dport, datagram[UDP_HLEN:]


def build_udp(src: bytes, dst: bytes, sport: int, dport: int,
              payload: bytes | bytearray | memoryview) -> bytes:
    length = UDP_HLEN + len(payload)
    header = UDP_HEADER.pack(sport, dport, length, 0)
    pseudo = int.from_bytes(src + dst, "big") + 17 + length
    csum = internet_checksum(header + payload, pseudo) or 0xFFFF  # 0 means "no checksum"
    return UDP_HEADER.pack(sport, dport, length, csum) + payload
