"""The routing table, the RFC 1624 TTL update and the fragmenter, against oracles."""

import socket

import dpkt
import pytest
from hypothesis import given
from hypothesis import strategies as st

from stack.net.route import Route, RouteTable, parse_prefix
from stack.wire.checksum import internet_checksum
from stack.wire.ipv4 import copied_options, decrement_ttl, fragment_datagram


def ip(text: str) -> bytes:
    return socket.inet_aton(text)


def route(prefix: str, ifindex: int, gateway: str | None = None, metric: int = 0) -> Route:
    network, plen = parse_prefix(prefix)
    return Route(network, plen, ifindex, ip(gateway) if gateway else None, metric)


def table(*routes: Route) -> RouteTable:
    t = RouteTable()
    for r in routes:
        t.add(r)
    return t


def test_longest_prefix_wins_over_shorter_and_default():
    t = table(route("default", 0, "10.0.0.1"), route("10.0.0.0/8", 1),
              route("10.1.0.0/16", 2), route("10.1.2.0/24", 3), route("10.1.2.3/32", 4))
    assert t.lookup(ip("10.1.2.3")).ifindex == 4
    assert t.lookup(ip("10.1.2.4")).ifindex == 3
    assert t.lookup(ip("10.1.3.4")).ifindex == 2
    assert t.lookup(ip("10.200.0.1")).ifindex == 1
    assert t.lookup(ip("192.0.2.1")).ifindex == 0
    assert t.lookup(ip("192.0.2.1")).gateway == ip("10.0.0.1")


def test_no_default_means_no_route_and_slash_zero_matches_everything():
    t = table(route("10.0.0.0/8", 1))
    assert t.lookup(ip("11.0.0.1")) is None
    t.add(route("0.0.0.0/0", 2, "10.0.0.1"))
    assert t.lookup(ip("11.0.0.1")).ifindex == 2
    assert t.lookup(ip("255.255.255.254")).ifindex == 2


def test_equal_prefixes_lowest_metric_wins_and_removal_falls_back():
    t = table(route("10.0.0.0/8", 1, metric=10), route("10.0.0.0/8", 2, metric=5))
    assert t.lookup(ip("10.9.9.9")).ifindex == 2
    assert t.remove(*parse_prefix("10.0.0.0/8"), ifindex=2) == 1
    assert t.lookup(ip("10.9.9.9")).ifindex == 1  # the cache was invalidated


def test_the_cache_follows_changes():
    t = table(route("default", 0, "10.0.0.1"))
    assert t.lookup(ip("10.1.2.3")).ifindex == 0
    t.add(route("10.1.2.0/24", 5))
    assert t.lookup(ip("10.1.2.3")).ifindex == 5


def test_bad_routes_are_refused():
    with pytest.raises(ValueError):
        parse_prefix("10.1.2.3/8")  # host bits set
    t = table(route("10.0.0.0/8", 1))
    with pytest.raises(ValueError, match="already exists"):
        t.add(route("10.0.0.0/8", 2))


@given(st.binary(min_size=20, max_size=20), st.integers(min_value=1, max_value=255))
def test_incremental_ttl_update_equals_a_full_recompute(header, ttl):
    h = bytearray(header)
    h[0] = 0x45
    h[8] = ttl
    h[10:12] = b"\0\0"
    h[10:12] = internet_checksum(bytes(h)).to_bytes(2, "big")
    decrement_ttl(h)
    assert h[8] == ttl - 1
    # the incremental result verifies, and equals a recompute (RFC 1624 avoids -0)
    full = bytearray(h)
    full[10:12] = b"\0\0"
    assert internet_checksum(bytes(h)) == 0
    assert h[10:12] == internet_checksum(bytes(full)).to_bytes(2, "big")


def datagram(size: int, df: bool = False, mf: bool = False, offset: int = 0,
             opts: bytes = b"") -> bytes:
    pkt = dpkt.ip.IP(src=ip("10.1.0.2"), dst=ip("10.2.0.2"), p=17, id=4242, ttl=63,
                     data=bytes(range(256)) * (size // 256) + bytes(size % 256))
    pkt.opts = opts
    pkt.hl = 5 + len(opts) // 4
    pkt.df, pkt.mf, pkt.offset = int(df), int(mf), offset >> 3  # dpkt: 8-byte units
    pkt.len = 20 + len(opts) + size
    pkt.sum = 0
    return bytes(pkt)


def test_forwarding_fragmentation_offsets_and_flags():
    whole = datagram(3000)
    pieces = [dpkt.ip.IP(p) for p in fragment_datagram(whole, 1400)]
    assert [len(bytes(p)) for p in pieces] == [1396, 1396, 20 + 3000 - 2 * 1376]
    assert [p.offset << 3 for p in pieces] == [0, 1376, 2752]  # 8-byte multiples
    assert [p.mf for p in pieces] == [1, 1, 0]
    assert all(p.id == 4242 and p.ttl == 63 for p in pieces)
    for p in pieces:  # dpkt recomputes the checksum when we clear it: ours must match
        claimed = p.sum
        p.sum = 0
        assert dpkt.ip.IP(bytes(p)).sum == claimed
    assert b"".join(bytes(p.data) for p in pieces) == bytes(dpkt.ip.IP(whole).data)


def test_fragmenting_a_fragment_keeps_its_offset_and_its_more_fragments_flag():
    first_half = datagram(1480, mf=True, offset=0)
    second = datagram(1480, mf=True, offset=1480)  # a middle fragment of something larger
    for original, base in ((first_half, 0), (second, 1480)):
        pieces = [dpkt.ip.IP(p) for p in fragment_datagram(original, 1000)]
        assert [p.offset << 3 for p in pieces] == [base, base + 976]
        assert all(p.mf for p in pieces)  # the original had MF set


def test_only_copied_options_repeat_in_later_fragments():
    # security (type 130, copied) and record route (type 7, not copied), NOP padded
    sec = bytes([130, 11]) + bytes(9)
    rr = bytes([7, 7, 4]) + bytes(4)
    opts = sec + rr + b"\x01\x00"
    assert len(opts) == 20
    pieces = [dpkt.ip.IP(p) for p in fragment_datagram(datagram(2000, opts=opts), 1000)]
    assert pieces[0].opts == opts
    assert all(p.opts == copied_options(opts) == sec + b"\x00" for p in pieces[1:])
    assert b"".join(bytes(p.data) for p in pieces) == bytes(dpkt.ip.IP(
        datagram(2000, opts=opts)).data)
