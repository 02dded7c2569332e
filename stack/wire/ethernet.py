"""Ethernet II framing (IEEE 802.3 with an EtherType, as RFC 894 carries IPv4)."""

from __future__ import annotations

import struct

from stack.wire.errors import MalformedError

ETH_HEADER = struct.Struct("!6s6sH")
ETH_HLEN = 14

ETHERTYPE_IPV4 = 0x0800
ETHERTYPE_ARP = 0x0806
ETHERTYPE_IPV6 = 0x86DD

BROADCAST_MAC = b"\xff" * 6
ZERO_MAC = b"\x00" * 6


def mac_from_str(text: str) -> bytes:
    """'02:00:0a:4d:00:02' -> 6 bytes; ValueError with a readable message otherwise."""
    parts = text.replace("-", ":").split(":")
    if len(parts) != 6 or not all(len(p) in (1, 2) for p in parts):
        raise ValueError(f"{text!r} is not a MAC address like 02:00:0a:4d:00:02")
    try:
        return bytes(int(p, 16) for p in parts)
    except ValueError:
        raise ValueError(f"{text!r} is not a MAC address like 02:00:0a:4d:00:02") from None


def mac_to_str(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


def is_multicast_mac(mac: bytes) -> bool:
    """Group bit set: broadcast and multicast destinations (and invalid as a source)."""
    return bool(mac[0] & 1)


def parse_ethernet(frame: bytes | memoryview) -> tuple[bytes, bytes, int]:
    """(destination, source, ethertype) of a frame; MalformedError when under 14 bytes."""
    if len(frame) < ETH_HLEN:
        raise MalformedError("runt")
    return ETH_HEADER.unpack_from(frame, 0)


def build_ethernet(dst: bytes, src: bytes, ethertype: int) -> bytes:
    return ETH_HEADER.pack(dst, src, ethertype)
