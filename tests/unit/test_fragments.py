"""Reassembly, fragmentation, ICMP errors, UDP and path MTU under a virtual clock."""

import itertools
import os
import random
import struct

import dpkt
import pytest

from stack.net.host import Host, HostConfig
from stack.net.reassembly import ReassemblyConfig
from tests.helpers import HOST_IP, STACK_IP, STACK_MAC, arp_frame, echo_request, eth
from tests.unit.tcp_peer import ACK, Peer, opts


def make(**reasm) -> Host:
    iface = Host(HostConfig(mac=STACK_MAC, address=STACK_IP, gateway=HOST_IP,
                                      reassembly=ReassemblyConfig(**reasm)),
                      random.Random(3))
    iface.receive(arp_frame(), 0.0)
    iface.poll(0.0)
    return iface


def fragments(payload: bytes, size: int, ident: int = 77, p: int = 1,
              src: bytes = HOST_IP) -> list[bytes]:
    """The datagram cut by dpkt-built headers into `size`-byte pieces (8-byte multiples)."""
    out = []
    for off in range(0, len(payload), size):
        piece = payload[off:off + size]
        more = off + size < len(payload)
        ip = dpkt.ip.IP(src=src, dst=STACK_IP, p=p, id=ident, ttl=64, mf=int(more),
                        offset=off >> 3, data=piece)
        out.append(eth(bytes(ip)))
    return out


def replies(iface: Host, now: float = 0.0) -> list[dpkt.ip.IP]:
    """Every IPv4 datagram sent, reassembled from our fragments by our own test code."""
    pieces: dict[int, list] = {}
    whole = []
    for frame in iface.poll(now):
        e = dpkt.ethernet.Ethernet(frame)
        if e.type != 0x0800:
            continue
        ip = e.data
        if not ip.mf and ip.offset == 0:
            whole.append(ip)
            continue
        pieces.setdefault(ip.id, []).append(ip)
    for group in pieces.values():
        group.sort(key=lambda x: x.offset)
        data = b"".join(bytes(x.data) for x in group)
        first = group[0]
        joined = dpkt.ip.IP(src=first.src, dst=first.dst, p=first.p, id=first.id, data=data)
        whole.append(dpkt.ip.IP(bytes(joined)))  # parsed again: the payload decoded
    return whole


PING = echo_request(ident=5, seq=9, data=bytes(range(256)) * 11 + b"tail")  # 2824 bytes


@pytest.mark.parametrize("order", list(itertools.permutations(range(4))))
def test_every_arrival_order_reassembles_once(order):
    iface = make()
    frags = fragments(PING, 720)
    assert len(frags) == 4
    for i in order:
        iface.receive(frags[i], 0.0)
    (reply,) = replies(iface)
    assert reply.data.type == 0 and bytes(reply.data.data.data) == PING[8:]
    assert iface.counters["ipv4.reasm_ok"] == 1
    assert iface.ipv4.reassembler.pending == {} and iface.ipv4.reassembler.bytes == 0


def test_duplicates_are_harmless():
    iface = make()
    frags = fragments(PING, 720)
    for f in frags[:2] + frags[:2] + frags[2:]:
        iface.receive(f, 0.0)
    assert len(replies(iface)) == 1
    assert iface.counters["ipv4.reasm_duplicates"] == 2


def test_overlap_drops_the_whole_datagram_and_its_later_fragments():
    iface = make()
    frags = fragments(PING, 720)
    evil = dpkt.ip.IP(src=HOST_IP, dst=STACK_IP, p=1, id=77, ttl=64, mf=1, offset=80 >> 3,
                      data=b"X" * 80)  # overlaps the first piece with other bytes
    iface.receive(frags[0], 0.0)
    iface.receive(eth(bytes(evil)), 0.0)
    for f in frags[1:]:
        iface.receive(f, 0.0)
    assert replies(iface) == []
    assert iface.counters["ipv4.reasm_overlaps"] == 1
    assert iface.counters["ipv4.reasm_dropped_fragments"] == 3


def test_ping_of_death_is_dropped():
    iface = make()
    last = dpkt.ip.IP(src=HOST_IP, dst=STACK_IP, p=1, id=9, ttl=64, offset=65528 >> 3,
                      data=b"Z" * 100)  # ends past 65,535
    iface.receive(eth(bytes(last)), 0.0)
    assert iface.counters["ipv4.reasm_too_big"] == 1


def test_tiny_first_fragment_is_dropped():
    iface = make()
    tiny = dpkt.ip.IP(src=HOST_IP, dst=STACK_IP, p=6, id=10, ttl=64, mf=1, data=b"8bytes!!")
    iface.receive(eth(bytes(tiny)), 0.0)
    assert iface.counters["ipv4.reasm_tiny_first"] == 1


def test_timeout_sends_time_exceeded_quoting_the_first_fragment():
    iface = make(timeout=30.0)
    frags = fragments(PING, 720)
    iface.receive(frags[0], 0.0)
    iface.receive(frags[2], 0.0)
    assert iface.next_deadline() == 30.0
    assert replies(iface, 29.9) == []
    (err,) = replies(iface, 30.0)
    assert (err.data.type, err.data.code) == (11, 1)
    quoted = dpkt.ip.IP(bytes(err.data.data.data))
    assert quoted.id == 77 and quoted.mf and quoted.offset == 0
    assert iface.counters["ipv4.reasm_timeouts"] == 1
    assert iface.next_deadline() is None


def test_timeout_without_the_first_fragment_sends_nothing():
    iface = make(timeout=30.0)
    iface.receive(fragments(PING, 720)[1], 0.0)
    assert replies(iface, 31.0) == []
    assert iface.counters["ipv4.reasm_timeouts"] == 1


def test_a_flood_of_incomplete_datagrams_stays_bounded():
    iface = make(max_datagrams=64, max_bytes=256 * 1024)
    for ident in range(5000):
        iface.receive(fragments(PING, 720, ident=ident)[0], 0.0)
    r = iface.ipv4.reassembler
    assert len(r.pending) <= 64 and r.bytes <= 256 * 1024
    assert iface.counters["ipv4.reasm_evicted"] >= 5000 - 64
    frags = fragments(PING, 720, ident=65000)  # a real datagram still gets through
    for f in frags:
        iface.receive(f, 0.0)
    assert any(x.data.type == 0 for x in replies(iface))


def test_fragmentation_on_output_checked_by_dpkt():
    iface = make()
    for f in fragments(PING, 1480):
        iface.receive(f, 0.0)
    frames = [dpkt.ethernet.Ethernet(f) for f in iface.poll(0.0)]
    ips = [f.data for f in frames if f.type == 0x0800]
    assert len(ips) == 2
    assert all(len(bytes(ip)) <= 1500 for ip in ips)
    assert [ip.offset for ip in ips] == [0, 1480 >> 3] and [ip.mf for ip in ips] == [1, 0]
    assert len(ips[0].data) % 8 == 0 and len({ip.id for ip in ips}) == 1
    for ip in ips:  # each fragment's header checksum verifies
        claimed = ip.sum
        ip.sum = 0
        assert dpkt.ip.IP(bytes(ip)).sum == claimed
    data = b"".join(bytes(ip.data) for ip in ips)
    assert dpkt.icmp.ICMP(data).data.data == PING[8:]


# -- UDP and ICMP errors ------------------------------------------------------------------


def udp_frame(dport: int, data: bytes, sport: int = 5000, csum: bool = True) -> bytes:
    u = dpkt.udp.UDP(sport=sport, dport=dport, data=data)
    u.ulen = 8 + len(data)
    ip = dpkt.ip.IP(src=HOST_IP, dst=STACK_IP, p=17, ttl=64, data=u)
    raw = bytes(ip)
    if not csum:
        raw = raw[:26] + b"\x00\x00" + raw[28:]
    return eth(raw)


class Recorder:
    def __init__(self):
        self.got, self.errors = [], []

    def on_datagram(self, data, addr):
        self.got.append((data, addr))

    def on_error(self, exc):
        self.errors.append(exc)


def test_udp_delivery_zero_checksum_and_closed_port():
    iface = make()
    rec = Recorder()
    iface.udp.bind(7, rec)
    iface.receive(udp_frame(7, b"hello"), 0.0)
    iface.receive(udp_frame(7, b"nosum", csum=False), 0.0)  # RFC 768: zero means none
    assert rec.got == [(b"hello", ("10.77.0.1", 5000)), (b"nosum", ("10.77.0.1", 5000))]
    iface.receive(udp_frame(9999, b"anyone?"), 0.0)
    (err,) = replies(iface)
    assert (err.data.type, err.data.code) == (3, 3)
    quoted = dpkt.ip.IP(bytes(err.data.data.data))
    assert struct.unpack("!HH", bytes(quoted.data)[:4]) == (5000, 9999)


def test_no_icmp_error_for_broadcasts_and_a_rate_limit_for_the_rest():
    iface = make()
    u = dpkt.udp.UDP(sport=1, dport=9999, data=b"x")
    u.ulen = 9
    bcast = dpkt.ip.IP(src=HOST_IP, dst=b"\xff" * 4, p=17, ttl=64, data=u)
    iface.receive(eth(bytes(bcast), dst=b"\xff" * 6), 0.0)
    assert replies(iface) == []
    for _ in range(200):
        iface.receive(udp_frame(9999, b"x"), 0.0)
    assert len(replies(iface)) == 50  # the burst, then the token bucket says no
    assert iface.counters["icmp.tx_rate_limited"] == 150


def test_port_unreachable_reaches_the_udp_endpoint():
    iface = make()
    rec = Recorder()
    ep = iface.udp.bind(0, rec, remote=(HOST_IP, 53))
    iface.udp.sendto(ep, b"query", HOST_IP, 53, 0.0)
    (sent,) = replies(iface)
    err = dpkt.icmp.ICMP(type=3, code=3, data=dpkt.icmp.ICMP.Unreach(data=bytes(sent)[:28]))
    iface.receive(eth(bytes(dpkt.ip.IP(src=HOST_IP, dst=STACK_IP, p=1, ttl=64,
                                       data=err))), 0.0)
    assert len(rec.errors) == 1 and isinstance(rec.errors[0], ConnectionRefusedError)


def test_df_datagram_too_big_is_refused_to_the_sender():
    iface = make()
    with pytest.raises(OSError) as err:
        iface.udp.sendto(iface.udp.bind(0, Recorder()), os.urandom(70000), HOST_IP, 9, 0.0)
    assert err.value.errno == 90  # EMSGSIZE


# -- path MTU discovery ----------------------------------------------------------------------


def frag_needed(seg: dpkt.tcp.TCP, mtu: int, seq: int | None = None) -> bytes:
    """The router's ICMP Fragmentation Needed quoting one of our segments."""
    quoted_tcp = struct.pack("!HHI", seg.sport, seg.dport, seg.seq if seq is None else seq)
    quoted_ip = dpkt.ip.IP(src=STACK_IP, dst=HOST_IP, p=6, ttl=64, df=1,
                           data=quoted_tcp)
    icmp = dpkt.icmp.ICMP(type=3, code=4,
                          data=dpkt.icmp.ICMP.Unreach(mtu=mtu, data=bytes(quoted_ip)))
    return eth(bytes(dpkt.ip.IP(src=HOST_IP, dst=STACK_IP, p=1, ttl=64, data=icmp)))


def sending(size: int):
    """A connection that has just sent `size` bytes: (peer, conn, seq, ack, segments)."""
    peer = Peer()
    peer.listen()
    conn, seq, ack = peer.handshake(options=opts(mss=1460))
    conn.send(b"d" * size)
    return peer, conn, seq, ack, peer.out()


def test_frag_needed_shrinks_the_segments_of_that_connection():
    peer, conn, seq, ack, first = sending(20000)
    assert max(len(s.data) for s in first) == 1460
    peer.iface.receive(frag_needed(first[0], 1000), peer.now)
    again = peer.out()  # what was in flight goes again, re-cut
    assert again and all(len(s.data) <= 1000 - 40 for s in again)
    assert again[0].seq == ack
    peer.send(ACK, seq, ack + 20000)
    assert conn.eff_mss == 960 and peer.iface.counters["ipv4.pmtu_updates"] == 1


def test_frag_needed_with_a_wrong_sequence_number_is_ignored():
    peer, conn, seq, ack, first = sending(5000)
    peer.iface.receive(frag_needed(first[0], 1000, seq=ack + 1_000_000), peer.now)
    assert peer.out() == [] and conn.eff_mss == 1460
    assert peer.iface.counters["tcp.icmp_bad_seq"] == 1


def test_frag_needed_below_552_is_clamped():
    peer, conn, seq, ack, first = sending(5000)
    peer.iface.receive(frag_needed(first[0], 300), peer.now)
    assert conn.eff_mss == 552 - 40
