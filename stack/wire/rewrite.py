"""Rewriting addresses, ports and ICMP identifiers in a datagram, as a NAT does.

Checksums follow incrementally (RFC 1624, eqn. 3: HC' = ~(~HC + ~m + m')): the IPv4
header's over the address, the TCP or UDP checksum over the pseudo-header address and
the port, the ICMP checksum over the identifier. An ICMP error quoting a translated
datagram is rewritten inside as well; its small message gets its checksums recomputed.
"""

from __future__ import annotations

import struct

from stack.wire.checksum import internet_checksum

PROTO_ICMP, PROTO_TCP, PROTO_UDP = 1, 6, 17
ICMP_QUERY_TYPES = frozenset({0, 8, 13, 14})  # echo and timestamp, request and reply
ICMP_ERROR_TYPES = frozenset({3, 4, 5, 11, 12})

_U16 = struct.Struct("!H")


def checksum_update(csum: int, old: bytes, new: bytes) -> int:
    """The checksum after the bytes `old` (even length, aligned on 16 bits in the
    covered data) became `new`."""
    s = ~csum & 0xFFFF
    for i in range(0, len(old), 2):
        s += (~((old[i] << 8) | old[i + 1]) & 0xFFFF) + ((new[i] << 8) | new[i + 1])
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def _patch(pkt: bytearray, offset: int, old: bytes, new: bytes, partial: bool = False
           ) -> None:
    """Update the 16-bit checksum at `offset` for a change from `old` to `new`. A
    `partial` field (virtio NEEDS_CSUM) holds the uncomplemented pseudo-header sum the
    kernel will finish: it moves the other way round."""
    csum = (pkt[offset] << 8) | pkt[offset + 1]
    if partial:
        _U16.pack_into(pkt, offset, ~checksum_update(~csum & 0xFFFF, old, new) & 0xFFFF)
    else:
        _U16.pack_into(pkt, offset, checksum_update(csum, old, new))


def header_length(pkt: bytes | bytearray) -> int:
    return (pkt[0] & 0x0F) << 2


def is_first_fragment(pkt: bytes | bytearray) -> bool:
    """True unless the datagram is a non-initial fragment (no transport header)."""
    return ((pkt[6] & 0x1F) << 8 | pkt[7]) == 0


def _l4_checksum_offset(proto: int, pkt: bytearray, hl: int, partial: bool
                        ) -> int | None:
    """Where the transport checksum that covers the pseudo-header lives, if it does."""
    if proto == PROTO_TCP and len(pkt) >= hl + 18:
        return hl + 16
    if proto == PROTO_UDP and len(pkt) >= hl + 8 and (partial or pkt[hl + 6] or pkt[hl + 7]):
        return hl + 6  # a zero UDP checksum means "none" (a partial sum is never that)
    return None


def rewrite(pkt: bytearray, source: bool, addr: bytes, port: int | None,
            partial: bool = False) -> None:
    """Set the source (or destination) address, and port (TCP/UDP) or identifier (ICMP
    query), of a whole datagram or a first fragment, checksums updated incrementally.
    `partial`: the transport checksum is one the kernel will finish (offloads)."""
    hl = header_length(pkt)
    proto = pkt[9]
    at = 12 if source else 16
    old_addr = bytes(pkt[at:at + 4])
    l4 = _l4_checksum_offset(proto, pkt, hl, partial) if is_first_fragment(pkt) else None
    if old_addr != addr:
        pkt[at:at + 4] = addr
        _patch(pkt, 10, old_addr, addr)
        if l4 is not None:
            _patch(pkt, l4, old_addr, addr, partial)
            if proto == PROTO_UDP and not partial and pkt[l4] == 0 and pkt[l4 + 1] == 0:
                pkt[l4:l4 + 2] = b"\xff\xff"  # RFC 768: a computed zero is sent as ones
    if port is None or not is_first_fragment(pkt):
        return
    if proto in (PROTO_TCP, PROTO_UDP):
        where = hl if source else hl + 2
    elif proto == PROTO_ICMP and len(pkt) >= hl + 8 and pkt[hl] in ICMP_QUERY_TYPES:
        where, l4, partial = hl + 4, hl + 2, False  # the identifier, under the ICMP sum
    else:
        return
    old = bytes(pkt[where:where + 2])
    new = _U16.pack(port)
    if old != new:
        pkt[where:where + 2] = new
        # a partial sum covers the pseudo-header only: the kernel adds the ports itself
        # when it finishes the checksum (as Linux's csum_replace2 with pseudohdr false)
        if l4 is not None and not partial:
            _patch(pkt, l4, old, new)
            if proto == PROTO_UDP and pkt[l4] == 0 and pkt[l4 + 1] == 0:
                pkt[l4:l4 + 2] = b"\xff\xff"


def rewrite_quoted(pkt: bytearray, source: bool, addr: bytes, port: int | None) -> bool:
    """In an ICMP error, set the quoted datagram's source (or destination) address and
    port. The quoted header's checksum and the ICMP checksum are recomputed (the
    message is small); the quoted TCP or UDP checksum, when the quote holds it, is
    updated incrementally, as the sender would have computed it. False when the quote
    is too short to hold what must change."""
    hl = header_length(pkt)
    inner = hl + 8
    if len(pkt) < inner + 20:
        return False
    ihl = (pkt[inner] & 0x0F) << 2
    if ihl < 20 or len(pkt) < inner + ihl + 4:
        return False
    proto = pkt[inner + 9]
    l4 = inner + ihl
    l4sum = None
    if proto == PROTO_TCP and len(pkt) >= l4 + 18:
        l4sum = l4 + 16
    elif proto == PROTO_UDP and len(pkt) >= l4 + 8 and (pkt[l4 + 6] or pkt[l4 + 7]):
        l4sum = l4 + 6
    at = inner + (12 if source else 16)
    old_addr = bytes(pkt[at:at + 4])
    pkt[at:at + 4] = addr
    if l4sum is not None:
        _patch(pkt, l4sum, old_addr, addr)
    pkt[inner + 10:inner + 12] = b"\0\0"
    pkt[inner + 10:inner + 12] = _U16.pack(internet_checksum(bytes(pkt[inner:inner + ihl])))
    if port is not None:
        where = None
        if proto in (PROTO_TCP, PROTO_UDP):
            where = l4 if source else l4 + 2
        elif proto == PROTO_ICMP and len(pkt) >= l4 + 8 and pkt[l4] in ICMP_QUERY_TYPES:
            where, l4sum = l4 + 4, l4 + 2
        if where is not None:
            old = bytes(pkt[where:where + 2])
            pkt[where:where + 2] = _U16.pack(port)
            if l4sum is not None:
                _patch(pkt, l4sum, old, bytes(pkt[where:where + 2]))
                if proto == PROTO_UDP and pkt[l4sum] == 0 and pkt[l4sum + 1] == 0:
                    pkt[l4sum:l4sum + 2] = b"\xff\xff"
    pkt[hl + 2:hl + 4] = b"\0\0"
    pkt[hl + 2:hl + 4] = _U16.pack(internet_checksum(bytes(pkt[hl:])))
    return True
