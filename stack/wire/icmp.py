"""ICMP for IPv4 (RFC 792): the header and echo messages."""

from __future__ import annotations

import struct

from stack.wire.checksum import internet_checksum
from stack.wire.errors import MalformedError

ICMP_HEADER = struct.Struct("!BBH")
ICMP_ECHO = struct.Struct("!BBHHH")
ICMP_HLEN = 8

TYPE_ECHO_REPLY = 0
TYPE_DEST_UNREACHABLE = 3
TYPE_ECHO_REQUEST = 8
TYPE_TIME_EXCEEDED = 11

# Error messages (RFC 1122 3.2.2): never answered with another error.
ERROR_TYPES = frozenset({3, 4, 5, 11, 12})


def parse_icmp(message: bytes | memoryview) -> tuple[int, int]:
    """(type, code) after checking length; the checksum is checked by the caller."""
    if len(message) < ICMP_HLEN:
        raise MalformedError("truncated")
    icmp_type, code, _ = ICMP_HEADER.unpack_from(message, 0)
    return icmp_type, code


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
