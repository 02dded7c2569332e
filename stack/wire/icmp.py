"""ICMP for IPv4 (RFC 792): the header and echo messages."""

from __future__ import annotations

import struct

from stack.wire.checksum import internet_checksum
from stack.wire.errors import MalformedError

ICMP_ECHO = struct.Struct("!BBHHH")
ICMP_HLEN = 8

TYPE_ECHO_REPLY = 0
TYPE_DEST_UNREACHABLE = 3
TYPE_ECHO_REQUEST = 8
TYPE_TIME_EXCEEDED = 11

# Destination Unreachable codes (RFC 792, RFC 1191)
CODE_PROTOCOL_UNREACHABLE = 2
CODE_PORT_UNREACHABLE = 3
CODE_FRAGMENTATION_NEEDED = 4
# Time Exceeded codes
CODE_REASSEMBLY_TIME_EXCEEDED = 1

ICMP_ERROR = struct.Struct("!BBHHH")  # type, code, checksum, unused, next-hop MTU
QUOTE_LIMIT = 576 - 20 - 8  # RFC 1812 4.3.2.3: the error datagram fits in 576 bytes

# Error messages (RFC 1122 3.2.2): never answered with another error.
ERROR_TYPES = frozenset({3, 4, 5, 11, 12})


def parse_echo(message: bytes | memoryview) -> tuple[int, int, int, int]:
    """(type, code, identifier, sequence) of an echo request or reply."""
    if len(message) < ICMP_HLEN:
        raise MalformedError("truncated")
    icmp_type, code, _, ident, seq = ICMP_ECHO.unpack_from(message, 0)
    return icmp_type, code, ident, seq


def build_echo(icmp_type: int, ident: int, seq: int, payload: bytes | memoryview) -> bytes:
    """An echo request or reply with its checksum."""
    header = ICMP_ECHO.pack(icmp_type, 0, 0, ident, seq)
    csum = internet_checksum(header + payload)
    return header[:2] + csum.to_bytes(2, "big") + header[4:] + payload


def build_error(icmp_type: int, code: int, offending: bytes | memoryview,
                next_hop_mtu: int = 0) -> bytes:
    """An ICMP error quoting the offending datagram's header and as much data as fits."""
    quote = bytes(offending[:QUOTE_LIMIT])
    header = ICMP_ERROR.pack(icmp_type, code, 0, 0, next_hop_mtu)
    csum = internet_checksum(header + quote)
    return header[:2] + csum.to_bytes(2, "big") + header[4:] + quote


def parse_error(message: bytes | memoryview) -> tuple[int, int, int, memoryview]:
    """(type, code, next-hop MTU, quoted datagram) of an ICMP error message."""
    if len(message) < ICMP_HLEN + 20 + 8:
        raise MalformedError("truncated")
    icmp_type, code, _, _, mtu = ICMP_ERROR.unpack_from(message, 0)
    return icmp_type, code, mtu, memoryview(message)[ICMP_HLEN:]
