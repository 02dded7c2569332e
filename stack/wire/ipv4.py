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


def parse_quoted(quote: bytes | memoryview, min_data: int = 8
                 ) -> tuple[IPv4Header, memoryview] | None:
    """The datagram quoted by an ICMP error: its header (lengths not checked, it was cut)
    and what follows of it (at least `min_data` bytes)."""
    if len(quote) < IPV4_HLEN:
        return None
    ver_ihl, tos, total, ident, frag, ttl, proto, _c, src, dst = IPV4_HEADER.unpack_from(
        quote, 0)
    hlen = (ver_ihl & 0x0F) << 2
    if ver_ihl >> 4 != 4 or hlen < IPV4_HLEN or len(quote) < hlen + min_data:
        return None
    return IPv4Header(hlen, tos, total, ident, frag, ttl, proto, src, dst), \
        memoryview(quote)[hlen:]


def decrement_ttl(packet: bytearray) -> None:
    """TTL minus one, the header checksum updated incrementally (RFC 1624 eqn. 3:
    HC' = ~(~HC + ~m + m'), m the 16-bit word holding TTL and protocol)."""
    old = (packet[8] << 8) | packet[9]
    new = old - 0x100
    packet[8] -= 1
    hc = (packet[10] << 8) | packet[11]
    s = (~hc & 0xFFFF) + (~old & 0xFFFF) + new
    s = (s & 0xFFFF) + (s >> 16)
    s = (s & 0xFFFF) + (s >> 16)
    csum = ~s & 0xFFFF
    packet[10] = csum >> 8
    packet[11] = csum & 0xFF


def copied_options(options: bytes | memoryview) -> bytes:
    """The options every fragment repeats: those with the copied flag (RFC 791 3.1),
    padded to 4 bytes. Malformed options copy nothing further."""
    out = bytearray()
    i = 0
    while i < len(options):
        kind = options[i]
        if kind == 0:
            break
        if kind == 1:
            i += 1
            continue
        if i + 1 >= len(options) or options[i + 1] < 2 or i + options[i + 1] > len(options):
            break
        length = options[i + 1]
        if kind & 0x80:
            out += options[i:i + length]
        i += length
    while len(out) % 4:
        out.append(0)
    return bytes(out)


def fragment_datagram(packet: bytes | bytearray | memoryview, mtu: int) -> list[bytes]:
    """Cut a whole datagram (or a fragment of one) into pieces that fit `mtu`, on 8-byte
    boundaries (RFC 791 3.2, RFC 1812 5.2.6): the first keeps every option, the rest only
    the copied ones; the last keeps the original MF flag."""
    ver_ihl, tos, total, ident, frag, ttl, proto, _c, src, dst = IPV4_HEADER.unpack_from(
        packet, 0)
    hlen = (ver_ihl & 0x0F) << 2
    view = memoryview(packet)
    options = bytes(view[IPV4_HLEN:hlen])
    later_options = copied_options(options) if options else b""
    payload = view[hlen:total]
    base = (frag & OFFSET_MASK) << 3
    keep = frag & FLAG_DF
    orig_mf = frag & FLAG_MF
    out = []
    offset = 0
    first = True
    while offset < len(payload) or first:
        opts = options if first else later_options
        room = (mtu - IPV4_HLEN - len(opts)) & ~7
        piece = payload[offset:offset + room]
        last = offset + len(piece) >= len(payload)
        flags = keep | (orig_mf if last else FLAG_MF) | ((base + offset) >> 3)
        hdr = IPV4_HEADER.pack(0x40 | ((IPV4_HLEN + len(opts)) >> 2), tos,
                               IPV4_HLEN + len(opts) + len(piece), ident, flags, ttl, proto,
                               0, src, dst) + opts
        csum = internet_checksum(hdr)
        out.append(hdr[:10] + csum.to_bytes(2, "big") + hdr[12:] + piece)
        offset += len(piece)
        first = False
    return out
