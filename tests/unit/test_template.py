"""The per-connection frame template makes byte for byte the frames the general path
makes (Ethernet, IPv4 and TCP built one after the other), and gives way when the route,
the neighbour, the path MTU or the interface changes."""

import random

import dpkt
from hypothesis import given, settings
from hypothesis import strategies as st

from stack.link.memory import MemoryWire
from stack.net.host import Host, HostConfig
from stack.net.node import RouteConfig
from stack.net.tcp.template import make_template
from stack.wire.checksum import checksum_ok, pseudo_header_sum
from stack.wire.ipv4 import FLAG_DF
from stack.wire.tcp import build_options, build_tcp
from tests.unit.tcp_peer import open_pair

A_IP, B_IP = bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2])


def connected():
    a = Host(HostConfig(mac=bytes.fromhex("020000000001"), address=A_IP), random.Random(1))
    b = Host(HostConfig(mac=bytes.fromhex("020000000002"), address=B_IP), random.Random(2))
    wire = MemoryWire(a, b)
    wire.start()
    conn, peer = open_pair(wire, a, b)
    return wire, a, b, conn, peer


WIRE, A, B, CONN, _ = connected()


def general(conn, seq, ack, flags, window, options, payload, ident):
    """The frame the general path (ipv4.send, then the interface) puts in the queue."""
    segment = build_tcp(conn.local_ip, conn.remote_ip, conn.local_port, conn.remote_port,
                        seq, ack, flags, window, options, payload)
    A.ipv4._ident = (ident - 1) & 0xFFFF  # it takes the next identification
    assert A.ipv4.send(conn.remote_ip, 6, segment, WIRE.now, flags_fragment=FLAG_DF,
                       src=conn.local_ip)
    return bytes(A.node.interfaces[0].tx.pop())


OPTION_SETS = [b"", build_options(ts=(1, 2)), build_options(mss=1460, wscale=7,
                                                            sack_permitted=True,
                                                            ts=(0xFFFFFFFF, 0)),
               build_options(ts=(5, 6), sack_blocks=[(100, 200), (300, 400), (500, 600)]),
               build_options(sack_permitted=True)]


@settings(max_examples=300, deadline=None)
@given(seq=st.integers(0, 2**32 - 1), ack=st.integers(0, 2**32 - 1),
       flags=st.integers(0, 0xFF), window=st.integers(0, 0xFFFF),
       options=st.sampled_from(OPTION_SETS), size=st.integers(0, 1448),
       ident=st.integers(0, 0xFFFF), fill=st.integers(0, 255))
def test_the_template_frame_is_the_general_paths_frame(seq, ack, flags, window, options,
                                                       size, ident, fill):
    tpl = make_template(A.ipv4, CONN, WIRE.now)
    assert tpl is not None
    size = min(size, 1460 - len(options))  # one MTU: the general path refuses more (DF)
    payload = bytes((fill + i * 7) & 0xFF for i in range(size))  # odd and even sizes
    got = tpl.frame(seq, ack, flags, window, options, payload, ident)
    want = general(CONN, seq, ack, flags, window, options, payload, ident)
    assert bytes(got) == want


def test_segments_sent_through_it_carry_good_checksums_and_arrive():
    data = bytes(range(256)) * 20
    CONN.send(data)
    sent = [f for _, out in A.node.poll(WIRE.now) for f in out]
    assert len(sent) >= 3 and CONN.frame_template is not None
    for frame in sent:
        eth = dpkt.ethernet.Ethernet(bytes(frame))
        ip = bytes(frame[14:34])
        segment = bytes(frame[34:])
        assert checksum_ok(ip)
        assert checksum_ok(segment, pseudo_header_sum(A_IP, B_IP, 6, len(segment)))
        assert eth.data.df and eth.data.data.dport == 80
        B.receive(frame, WIRE.now)
    server = B.tcp.connections[(A_IP, CONN.local_port, B_IP, 80)]
    assert bytes(server.user.data).endswith(data)  # taken in order, checksums and all


def test_it_gives_way_when_the_route_the_neighbour_or_the_mtu_changes():
    now = WIRE.now
    tpl = make_template(A.ipv4, CONN, now)
    assert tpl.still_valid(A.ipv4, now)
    # a new route (any change to the table)
    A.node.add_route(RouteConfig("192.0.2.0/24", bytes([10, 0, 0, 9])))
    assert not tpl.still_valid(A.ipv4, now)
    tpl = make_template(A.ipv4, CONN, now)
    # the neighbour answers ARP with another MAC: the next frame goes to it
    iface = A.node.interfaces[0]
    mac, expires = iface.arp.cache[B_IP]
    iface.arp.cache[B_IP] = (bytes.fromhex("02000000beef"), expires)
    assert not tpl.still_valid(A.ipv4, now)
    assert make_template(A.ipv4, CONN, now).eth_dst == bytes.fromhex("02000000beef")
    iface.arp.cache[B_IP] = (mac, expires)
    tpl = make_template(A.ipv4, CONN, now)
    # a Fragmentation Needed lowers the path MTU
    A.ipv4.update_pmtu(B_IP, 1200, now)
    assert not tpl.still_valid(A.ipv4, now)
    assert make_template(A.ipv4, CONN, now).mtu == 1200
    # a hook that comes later (a filter on the host) sees every later segment
    tpl = make_template(A.ipv4, CONN, now)
    seen = []
    A.ipv4.hooks.output.append(lambda pkt, info, t: seen.append(len(pkt)) or pkt)
    try:
        assert not tpl.still_valid(A.ipv4, now)
        CONN.send(b"x" * 3000)  # full segments (Nagle holds a small one back)
        A.node.poll(now)
        assert seen, "the hook was bypassed"
    finally:
        A.ipv4.hooks.output.clear()
    # while tracing, the general path (it tells each ARP lookup)
    A.node.trace.on = True
    try:
        assert make_template(A.ipv4, CONN, now) is None
    finally:
        A.node.trace.on = False
