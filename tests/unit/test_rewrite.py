"""Address and port rewriting: the incrementally updated checksums equal a recompute,
for finished checksums and for partial ones (virtio NEEDS_CSUM) the kernel finishes."""

import struct

from hypothesis import given
from hypothesis import strategies as st

from stack.net.ipv4 import _finish_checksum
from stack.wire.checksum import internet_checksum, ones_sum, pseudo_header_sum
from stack.wire.ipv4 import build_ipv4
from stack.wire.rewrite import rewrite


def segment(proto: int, sport: int, dport: int, payload: bytes) -> bytearray:
    if proto == 6:
        return bytearray(struct.pack("!HHIIBBHHH", sport, dport, 1, 2, 0x50, 0x10, 1000, 0,
                                     0)) + payload
    return bytearray(struct.pack("!HHHH", sport, dport, 8 + len(payload), 0)) + payload


def datagram(proto, src, dst, sport, dport, payload, partial):
    seg = segment(proto, sport, dport, payload)
    pkt = bytearray(build_ipv4(src, dst, proto, len(seg), 1)) + seg
    at = 20 + (16 if proto == 6 else 6)
    ph = pseudo_header_sum(src, dst, proto, len(seg))
    if partial:  # what a sender leaves for the kernel: the folded pseudo-header sum
        value = ph or 0xFFFF
    else:
        value = internet_checksum(bytes(seg), ph) or (0xFFFF if proto == 17 else 0)
    struct.pack_into("!H", pkt, at, value)
    return pkt, at


def valid(pkt: bytearray, proto: int) -> bool:
    seg = bytes(pkt[20:])
    return ones_sum(pkt[:20]) == 0 and ones_sum(seg, pseudo_header_sum(
        bytes(pkt[12:16]), bytes(pkt[16:20]), proto, len(seg))) == 0


addr = st.binary(min_size=4, max_size=4)
port = st.integers(0, 65535)


@given(st.sampled_from([6, 17]), addr, addr, port, port, st.binary(max_size=41),
       st.booleans(), addr, port, st.booleans())
def test_incremental_equals_recompute(proto, src, dst, sport, dport, payload, source,
                                      new_addr, new_port, partial):
    pkt, at = datagram(proto, src, dst, sport, dport, payload, partial)
    rewrite(pkt, source, new_addr, new_port, partial)
    if partial:
        _finish_checksum(pkt, 20, at - 20)  # what the kernel does on the way out
    assert valid(pkt, proto)
    assert bytes(pkt[12:16] if source else pkt[16:20]) == new_addr
    assert struct.unpack_from("!H", pkt, 20 if source else 22)[0] == new_port


def test_a_zero_udp_checksum_stays_none():
    pkt, at = datagram(17, bytes(4), bytes(4), 1, 2, b"x", False)
    pkt[at:at + 2] = b"\0\0"
    rewrite(pkt, True, b"\x01\x02\x03\x04", 99)
    assert pkt[at:at + 2] == b"\0\0" and ones_sum(pkt[:20]) == 0
