"""A tapstack router under a virtual clock: what it forwards, what it answers with ICMP,
what it refuses, and what its hooks do. Input frames are built with dpkt."""

import random
import socket

import dpkt
import pytest

from stack.net.hooks import Hooks
from stack.net.interface import InterfaceConfig
from stack.net.node import Node, NodeConfig, RouteConfig
from stack.net.tcp.connection import ESTABLISHED
from stack.wire.ipv4 import parse_quoted

R0, R1 = bytes.fromhex("020000000100"), bytes.fromhex("020000000101")
A_MAC, B_MAC, GW_MAC = (bytes.fromhex("02aa00000002"), bytes.fromhex("02bb00000002"),
                        bytes.fromhex("02cc000000fe"))


def ip(text: str) -> bytes:
    return socket.inet_aton(text)


A, B, GW = ip("10.1.0.2"), ip("10.2.0.2"), ip("10.2.0.254")
NEIGHBOURS = {(0, A): A_MAC, (1, B): B_MAC, (1, GW): GW_MAC}


def router(forwarding: bool = True, mtu1: int = 1400) -> Node:
    node = Node(NodeConfig(
        name="r", forwarding=forwarding,
        interfaces=[InterfaceConfig("eth0", R0, [(ip("10.1.0.1"), 24)]),
                    InterfaceConfig("eth1", R1, [(ip("10.2.0.1"), 24)], mtu=mtu1)],
        routes=[RouteConfig("10.9.0.0/16", GW)]), random.Random(5))
    node.start(0.0)
    node.poll(0.0)  # the gratuitous ARPs
    return node


def frame(packet: bytes, src_mac: bytes = A_MAC, dst_mac: bytes = R0) -> bytes:
    return bytes(dpkt.ethernet.Ethernet(dst=dst_mac, src=src_mac, type=0x0800, data=packet))


def udp(src: bytes = A, dst: bytes = B, size: int = 100, ttl: int = 64, df: bool = False,
        sport: int = 5000) -> bytes:
    u = dpkt.udp.UDP(sport=sport, dport=9, data=bytes(size))
    u.ulen = 8 + size
    pkt = dpkt.ip.IP(src=src, dst=dst, p=17, ttl=ttl, id=99, data=u)
    pkt.df = int(df)
    pkt.len = 20 + len(bytes(u))
    return bytes(pkt)


def drain(node: Node, now: float = 0.0) -> dict[int, list[dpkt.ethernet.Ethernet]]:
    """Frames sent per interface; ARP requests for known neighbours are answered."""
    out: dict[int, list] = {0: [], 1: []}
    for _ in range(10):
        batch = node.poll(now)
        if not batch:
            break
        for iface, frames in batch:
            for raw in frames:
                eth = dpkt.ethernet.Ethernet(raw)
                if eth.type == 0x0806 and eth.data.op == 1:
                    mac = NEIGHBOURS.get((iface.index, eth.data.tpa))
                    if mac is not None:
                        reply = dpkt.arp.ARP(op=2, sha=mac, spa=eth.data.tpa, tha=iface.mac,
                                             tpa=eth.data.spa)
                        node.receive(iface.index, bytes(dpkt.ethernet.Ethernet(
                            dst=iface.mac, src=mac, type=0x0806, data=reply)), now)
                    continue
                out[iface.index].append(eth)
    return out


def icmp_of(eth: dpkt.ethernet.Ethernet) -> tuple[dpkt.ip.IP, dpkt.icmp.ICMP]:
    assert eth.type == 0x0800 and eth.data.p == 1
    return eth.data, eth.data.data


def test_forwarded_with_ttl_down_by_one_and_a_valid_checksum():
    node = router()
    node.receive(0, frame(udp(ttl=64)), 0.0)
    out = drain(node)
    (eth,) = out[1]
    assert (eth.dst, eth.src) == (B_MAC, R1)
    pkt = eth.data
    assert pkt.ttl == 63 and pkt.src == A and pkt.dst == B
    claimed = pkt.sum
    pkt.sum = 0
    assert dpkt.ip.IP(bytes(pkt)).sum == claimed  # dpkt recomputes: ours was right
    assert node.counters["ipv4.forwarded"] == 1 and out[0] == []


def test_next_hop_is_the_gateway_of_the_route():
    node = router()
    node.receive(0, frame(udp(dst=ip("10.9.3.4"))), 0.0)
    (eth,) = drain(node)[1]
    assert eth.dst == GW_MAC and eth.data.dst == ip("10.9.3.4")


def test_ttl_one_gets_time_exceeded_quoting_header_and_eight_bytes():
    node = router()
    original = udp(ttl=1)
    node.receive(0, frame(original), 0.0)
    out = drain(node)
    assert out[1] == []
    pkt, icmp = icmp_of(out[0][0])
    assert (icmp.type, icmp.code) == (11, 0)
    assert pkt.src == ip("10.1.0.1") and pkt.dst == A  # from the interface back to A
    assert bytes(icmp.data.data) == original[:28]  # RFC 792: header + 64 bits
    assert node.counters["ipv4.fwd_ttl_exceeded"] == 1


def test_no_route_gets_net_unreachable():
    node = router()
    node.receive(0, frame(udp(dst=ip("192.0.2.7"))), 0.0)
    pkt, icmp = icmp_of(drain(node)[0][0])
    assert (icmp.type, icmp.code) == (3, 0) and pkt.dst == A
    header, _ = parse_quoted(bytes(icmp.data.data))
    assert header.dst == ip("192.0.2.7") and node.counters["ipv4.fwd_no_route"] == 1


def test_a_next_hop_that_never_answers_arp_gets_host_unreachable():
    node = router()
    silent = ip("10.2.0.77")
    node.receive(0, frame(udp(dst=silent)), 0.0)
    now = 0.0
    errors = []
    while now < 5.0:
        errors += drain(node, now)[0]
        now += 0.5
    pkt, icmp = icmp_of(errors[0])
    assert (icmp.type, icmp.code) == (3, 1) and pkt.dst == A
    assert node.counters["ipv4.fwd_host_unreachable"] == 1


def test_df_too_big_gets_fragmentation_needed_with_the_next_hop_mtu():
    node = router(mtu1=1400)
    node.receive(0, frame(udp(size=1472, df=True)), 0.0)
    out = drain(node)
    assert out[1] == []
    _, icmp = icmp_of(out[0][0])
    assert (icmp.type, icmp.code) == (3, 4)
    assert icmp.data.mtu == 1400  # RFC 1191: the next-hop MTU in the low 16 bits
    assert node.counters["ipv4.fwd_frag_needed"] == 1


def test_df_clear_is_fragmented_to_the_egress_mtu_and_reassembles():
    node = router(mtu1=1400)
    original = udp(size=2972)  # a 3,000-byte datagram
    node.receive(0, frame(original), 0.0)
    pieces = [eth.data for eth in drain(node)[1]]
    assert len(pieces) == 3 and all(len(bytes(p)) <= 1400 for p in pieces)
    assert all(p.ttl == 63 and p.id == 99 for p in pieces)
    data = b"".join(bytes(p.data) for p in sorted(pieces, key=lambda p: p.offset))
    assert data == bytes(dpkt.ip.IP(original).data)
    assert node.counters["ipv4.fwd_fragmented"] == 1


def test_martians_link_broadcasts_and_hosts_are_not_forwarded():
    node = router()
    node.receive(0, frame(udp(src=ip("127.0.0.1"))), 0.0)
    node.receive(0, frame(udp(dst=ip("224.0.0.9"))), 0.0)
    node.receive(0, frame(udp(), dst_mac=b"\xff" * 6), 0.0)
    node.receive(0, frame(udp(dst=ip("10.2.0.255"))), 0.0)  # eth1's directed broadcast
    out = drain(node)
    assert out[1] == [] and out[0] == []
    c = node.counters
    assert c["ipv4.fwd_bad_source"] == 1 and c["ipv4.fwd_martian_destination"] == 1
    assert c["ipv4.fwd_link_broadcast"] == 1
    # the directed broadcast of eth1's subnet is the router's own (no port, no ICMP)
    assert c["udp.rx_no_port"] == 1 and c["icmp.tx_errors"] == 0
    host = router(forwarding=False)
    host.receive(0, frame(udp()), 0.0)
    assert drain(host)[1] == [] and host.counters["ipv4.rx_not_for_us"] == 1


def test_hooks_drop_and_rewrite():
    node = router()
    seen = []

    def drop_port_5001(packet: bytearray, info, now):
        seen.append(info.iface)
        return None if packet[20:22] == (5001).to_bytes(2, "big") else packet

    node.ipv4.hooks.add("forward", drop_port_5001)
    node.receive(0, frame(udp(sport=5001)), 0.0)
    node.receive(0, frame(udp(sport=5000)), 0.0)
    out = drain(node)
    assert [eth.data.data.sport for eth in out[1]] == [5000]
    assert seen == [0, 0] and node.counters["ipv4.fwd_hook_dropped"] == 1

    def set_tos(packet: bytearray, info, now):
        packet[1] = 0x10  # then fix the checksum the way a real rewriter must
        packet[10:12] = b"\0\0"
        from stack.wire.checksum import internet_checksum
        packet[10:12] = internet_checksum(bytes(packet[:20])).to_bytes(2, "big")
        return packet

    node.ipv4.hooks.add("postrouting", set_tos)
    node.receive(0, frame(udp()), 0.0)
    (eth,) = drain(node)[1]
    assert eth.data.tos == 0x10
    pkt = eth.data
    claimed = pkt.sum
    pkt.sum = 0
    assert dpkt.ip.IP(bytes(pkt)).sum == claimed


def test_prerouting_rewrite_redirects_to_a_local_address():
    """A rewrite before the routing decision changes it: the datagram becomes ours."""
    node = router()
    local = ip("10.1.0.1")

    def to_us(packet: bytearray, info, now):
        packet[16:20] = local
        packet[10:12] = b"\0\0"
        from stack.wire.checksum import internet_checksum
        packet[10:12] = internet_checksum(bytes(packet[:20])).to_bytes(2, "big")
        return packet

    node.ipv4.hooks.add("prerouting", to_us)
    echo = dpkt.icmp.ICMP(type=8, data=dpkt.icmp.ICMP.Echo(id=1, seq=1, data=b"x" * 8))
    node.receive(0, frame(bytes(dpkt.ip.IP(src=A, dst=B, p=1, data=echo))), 0.0)
    pkt, icmp = icmp_of(drain(node)[0][0])
    assert icmp.type == 0 and pkt.src == local and node.counters["ipv4.forwarded"] == 0


def test_unknown_hook_name_is_refused():
    try:
        Hooks().add("prerouteing", lambda p, i, n: p)
    except ValueError as exc:
        assert "no hook point named 'prerouteing'" in str(exc)
    else:
        raise AssertionError("accepted a misspelt hook")


def test_a_two_interface_host_answers_on_both_and_replies_by_the_route():
    """Source address selection and the weak host model: a SYN from A to the address of
    eth1 is answered from that address, out of eth0 (the route back to A)."""
    node = router(forwarding=False)
    node.tcp.listen(80, lambda conn: None)
    for dst in (ip("10.1.0.1"), ip("10.2.0.1")):
        syn = dpkt.tcp.TCP(sport=40000, dport=80, seq=1000, flags=dpkt.tcp.TH_SYN,
                           win=65535)
        node.receive(0, frame(bytes(dpkt.ip.IP(src=A, dst=dst, p=6, data=syn))), 0.0)
        out = drain(node)
        assert out[1] == []
        (eth,) = out[0]
        assert eth.data.src == dst and eth.data.dst == A
        assert eth.data.data.flags == dpkt.tcp.TH_SYN | dpkt.tcp.TH_ACK
    assert len(node.tcp.connections) == 2  # the full 4-tuple keeps them apart
    conn = node.tcp.connect(B, 80, 0.0)  # an active open picks the route's source
    assert conn.local_ip == ip("10.2.0.1")
    (eth,) = drain(node)[1]
    assert eth.data.src == ip("10.2.0.1") and conn.state != ESTABLISHED


def test_a_static_route_removed_at_run_time_is_gone_and_connected_ones_stay():
    """`tapstack route del`: the datagram that used the route now meets ICMP network
    unreachable; a connected route cannot be removed, nor a route that is not there."""
    node = router()
    node.receive(0, frame(udp(dst=ip("10.9.1.1"))), 0.0)
    assert node.counters["ipv4.forwarded"] == 1 and drain(node)[1]
    assert node.remove_route("10.9.0.0/16").gateway == GW
    node.receive(0, frame(udp(dst=ip("10.9.1.1"))), 0.0)
    assert node.counters["ipv4.fwd_no_route"] == 1
    back = drain(node)[0]
    icmp = [f.data.data for f in back if isinstance(f.data, dpkt.ip.IP) and f.data.p == 1]
    assert [(m.type, m.code) for m in icmp] == [(3, 0)]
    for wrong in ("10.9.0.0/16", "10.1.0.0/24", "10.9.0.1/16"):
        with pytest.raises(ValueError):
            node.remove_route(wrong)
    node.add_route(RouteConfig("10.9.0.0/16", GW))  # and back, as the journey undoes it
    node.receive(0, frame(udp(dst=ip("10.9.1.1"))), 0.0)
    assert node.counters["ipv4.forwarded"] == 2
