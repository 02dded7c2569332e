"""ARP for IPv4 over Ethernet (RFC 826)."""

from __future__ import annotations

import struct
from typing import NamedTuple

from stack.wire.errors import MalformedError

ARP_PACKET = struct.Struct("!HHBBH6s4s6s4s")
ARP_LEN = 28
HTYPE_ETHERNET = 1
PTYPE_IPV4 = 0x0800
OP_REQUEST = 1
OP_REPLY = 2


class ArpPacket(NamedTuple):
    op: int
    sender_mac: bytes
    sender_ip: bytes
    target_mac: bytes
    target_ip: bytes


def parse_arp(data: bytes | memoryview) -> ArpPacket:
    """Only Ethernet/IPv4 ARP is accepted; anything else is `bad_format`."""
    if len(data) < ARP_LEN:
        raise MalformedError("truncated")
    htype, ptype, hlen, plen, op, sha, spa, tha, tpa = ARP_PACKET.unpack_from(data, 0)
    if htype != HTYPE_ETHERNET or ptype != PTYPE_IPV4 or hlen != 6 or plen != 4:
        raise MalformedError("bad_format")
    if op not in (OP_REQUEST, OP_REPLY):
        raise MalformedError("bad_opcode")
    return ArpPacket(op, sha, spa, tha, tpa)


def build_arp(op: int, sender_mac: bytes, sender_ip: bytes, target_mac: bytes,
              target_ip: bytes) -> bytes:
    return ARP_PACKET.pack(HTYPE_ETHERNET, PTYPE_IPV4, 6, 4, op, sender_mac, sender_ip,
                           target_mac, target_ip)
