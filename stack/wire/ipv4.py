"""IPv4 header codec (RFC 791)."""

from __future__ import annotations

import ipaddress
import socket
import struct
from typing import NamedTuple

from stack.wire.checksum import internet_checksum, ones_sum
from stack.wire.errors import MalformedError

IPV4_HEADER = struct.Struct("!BBHHHBBH4s4s")
IPV4_HLEN = 20
MAX_DATAGRAM = 65535

PROTO_ICMP = 1
PROTO_TCP = 6
PROTO_UDP = 17

FLAG_DF = 0x4000
FLAG_MF = 0x2000
OFFSET_MASK = 0x1FFF

LIMITED_BROADCAST = b"\xff\xff\xff\xff"


class IPv4Header(NamedTuple):
    header_length: int
    tos: int
    total_length: int
    ident: int
    flags_fragment: int  # DF, MF and the offset in 8-byte units, as on the wire
    ttl: int
    protocol: int
    src: bytes
    dst: bytes

    @property
    def fragment_offset(self) -> int:
        """Offset of this fragment's data in bytes."""
        return (self.flags_fragment & OFFSET_MASK) << 3

    @property
    def more_fragments(self) -> bool:
        return bool(self.flags_fragment & FLAG_MF)

    @property
    def is_fragment(self) -> bool:
        return bool(self.flags_fragment & (FLAG_MF | OFFSET_MASK))


def ip_from_str(text: str) -> bytes:
    """'10.77.0.2' -> 4 bytes; ValueError with a readable message otherwise."""
    try:
        return ipaddress.IPv4Address(text).packed
    except ValueError:
        raise ValueError(f"{text!r} is not an IPv4 address like 10.77.0.2") from None


def ip_to_str(addr: bytes) -> str:
    return socket.inet_ntoa(addr)


def parse_ipv4(packet: bytes | memoryview, verify_checksum: bool = True) -> IPv4Header:
    """Validate and decode the header; the caller slices the payload with the lengths.

    Checks in the order of RFC 1122 3.2.1: version, header length, total length against
    what arrived, header checksum.
    """
    if len(packet) < IPV4_HLEN:
        raise MalformedError("truncated")
    ver_ihl, tos, total, ident, frag, ttl, proto, _csum, src, dst = IPV4_HEADER.unpack_from(
        packet, 0)
    if ver_ihl >> 4 != 4:
        raise MalformedError("bad_version")
    hlen = (ver_ihl & 0x0F) << 2
    if hlen < IPV4_HLEN:
        raise MalformedError("bad_header_length")
    if total < hlen or total > len(packet):
        raise MalformedError("bad_total_length")
    if verify_checksum and ones_sum(packet[:hlen]) != 0:
        raise MalformedError("bad_checksum")
    return IPv4Header(hlen, tos, total, ident, frag, ttl, proto, src, dst)


def build_ipv4(src: bytes, dst: bytes, protocol: int, payload_length: int, ident: int,
               ttl: int = 64, tos: int = 0, flags_fragment: int = 0) -> bytes:
    """A 20-byte header (no options) with its checksum filled in."""
    header = IPV4_HEADER.pack(0x45, tos, IPV4_HLEN + payload_length, ident, flags_fragment,
                              ttl, protocol, 0, src, dst)
    csum = internet_checksum(header)
    return header[:10] + csum.to_bytes(2, "big") + header[12:]
