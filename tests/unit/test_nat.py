"""NAT and connection tracking under a virtual clock: inside hosts, a tapstack NAT router,
outside hosts, all tapstack, on in-memory segments. What each side sees is read from the
frames it receives (dpkt), or from its sockets."""

import random
import socket

import dpkt

from stack.link.memory import MemoryLan
from stack.net.conntrack import ESTABLISHED, ConntrackConfig
from stack.net.host import Host, HostConfig
from stack.net.interface import InterfaceConfig
from stack.net.middlebox import Middlebox, MiddleboxConfig
from stack.net.nat import Masquerade, NatConfig, PortForward, StaticNat
from stack.net.node import Node, NodeConfig
from tests.unit.tcp_peer import User

PUBLIC = "203.0.113.1"


def ip(text: str) -> bytes:
    return socket.inet_aton(text)


class Tap:
    """Records the IPv4 datagrams a node receives (a capture on its interface)."""

    def __init__(self, host: Host) -> None:
        self.seen: list[dpkt.ip.IP] = []
        inner = host.node.receive

        def receive(ifindex, frame, now, *a):
            eth = dpkt.ethernet.Ethernet(bytes(frame))
            if eth.type == 0x0800 and eth.dst in (host.mac, b"\xff" * 6):
                self.seen.append(eth.data)
            inner(ifindex, frame, now, *a)

        host.node.receive = receive


class Net:
    def __init__(self, filtering: str = "address", conntrack: ConntrackConfig | None = None,
                 forwards: list[PortForward] | None = None, limit: int = 0,
                 static: list[StaticNat] | None = None) -> None:
        self.lan = MemoryLan()
        self.router = Node(NodeConfig(name="r", forwarding=True, interfaces=[
            InterfaceConfig("lan", bytes.fromhex("020000000a01"), [(ip("192.168.1.1"), 24)]),
            InterfaceConfig("wan", bytes.fromhex("020000000b01"), [(ip(PUBLIC), 24)])]),
            random.Random(7))
        self.box = Middlebox(self.router, MiddleboxConfig(
            conntrack=conntrack or ConntrackConfig(),
            nat=NatConfig(masquerade=[Masquerade("wan")], filtering=filtering,
                          forwards=forwards or [], ports_per_subscriber=limit,
                          static=static or [])),
            random.Random(8))
        self.lan.plug(self.router, 0, "lan")
        self.lan.plug(self.router, 1, "wan")
        self.inside = [self.host(f"192.168.1.{i}", "192.168.1.1", "lan", i) for i in (2, 3)]
        self.outside = [self.host(f"203.0.113.{i}", None, "wan", i) for i in (10, 20)]
        self.taps = {h.address: Tap(h) for h in self.inside + self.outside}
        self.lan.start()

    def host(self, address: str, gateway: str | None, segment: str, n: int) -> Host:
        h = Host(HostConfig(mac=bytes([2, 0, 0, 0, 0xCC, n + (0 if segment == "lan" else 100)]),
                            address=ip(address), gateway=ip(gateway) if gateway else None),
                 random.Random(n))
        self.lan.plug(h.node, 0, segment)
        return h

    def run(self, until=None, timeout: float = 30.0) -> None:
        self.lan.run(until, timeout)


def connect(net: Net, client: Host, server: Host, dport: int, sport: int | None = None):
    accepted = []

    def accept(conn):
        conn.user = User()
        accepted.append(conn)

    if dport not in server.tcp.listeners:
        server.tcp.listen(dport, accept)
    server.tcp.listeners[dport].on_accept = accept
    conn = client.tcp.connect(server.address, dport, net.lan.now, local_port=sport)
    conn.user = User()
    net.run(lambda: conn.user.established and accepted)
    return conn, accepted[0] if accepted else None


def test_tcp_through_the_nat_shows_only_the_public_address_and_keeps_the_port():
    net = Net()
    a, x = net.inside[0], net.outside[0]
    conn, server = connect(net, a, x, 80, sport=40000)
    assert server is not None and server.remote_ip == ip(PUBLIC)
    assert server.remote_port == 40000  # port preservation
    conn.send(b"GET / HTTP/1.0\r\n\r\n")
    server.send(b"hello from outside")
    net.run(lambda: conn.user.data and server.user.data)
    assert bytes(server.user.data) == b"GET / HTTP/1.0\r\n\r\n"
    assert bytes(conn.user.data) == b"hello from outside"
    assert {p.src for p in net.taps[x.address].seen if p.p == 6} == {ip(PUBLIC)}
    (entry,) = [e for e in net.box.conntrack.entries() if e.orig.proto == 6]
    assert entry.state == ESTABLISHED and entry.assured
    assert entry.reply.dst == ip(PUBLIC) and entry.orig.src == a.address


def test_two_inside_hosts_with_the_same_port_get_distinct_mappings():
    net = Net()
    x = net.outside[0]
    c1, s1 = connect(net, net.inside[0], x, 80, sport=40000)
    c2, s2 = connect(net, net.inside[1], x, 80, sport=40000)
    assert s1.remote_port == 40000 and s2.remote_port != 40000
    assert s1.remote_ip == s2.remote_ip == ip(PUBLIC)


def test_endpoint_independent_mapping_same_public_port_towards_two_servers():
    net = Net()
    a = net.inside[0]
    other = net.inside[1]
    connect(net, other, net.outside[0], 81, sport=50000)  # takes public port 50000
    _, s1 = connect(net, a, net.outside[0], 80, sport=50000)
    _, s2 = connect(net, a, net.outside[1], 80, sport=50000)
    assert s1.remote_port != 50000  # not preserved: taken
    assert s1.remote_port == s2.remote_port  # but the same to both servers (REQ-1)


def udp_user(log: list):
    return type("U", (), {"on_datagram": lambda s, d, addr: log.append((d, addr)),
                          "on_error": lambda s, e: log.append(e)})()


def test_udp_request_response_and_filtering():
    net = Net(filtering="address")
    a, x, y = net.inside[0], net.outside[0], net.outside[1]
    got_a, got_x, got_y = [], [], []
    ep_x = x.udp.bind(53, udp_user(got_x))
    ep_y = y.udp.bind(53, udp_user(got_y))
    ep_a = a.udp.bind(5353, udp_user(got_a))
    a.udp.sendto(ep_a, b"query", x.address, 53, net.lan.now)
    net.run(lambda: got_x)
    data, (src, sport) = got_x[0]
    assert (data, src, sport) == (b"query", PUBLIC, 5353)
    x.udp.sendto(ep_x, b"answer", ip(PUBLIC), 5353, net.lan.now)
    net.run(lambda: got_a)
    assert got_a == [(b"answer", ("203.0.113.10", 53))]
    # address-dependent filtering: x may use the mapping from another port, y may not
    ep_x2 = x.udp.bind(54, udp_user([]))
    x.udp.sendto(ep_x2, b"other port", ip(PUBLIC), 5353, net.lan.now)
    y.udp.sendto(ep_y, b"stranger", ip(PUBLIC), 5353, net.lan.now)
    net.run(timeout=1.0)
    assert [d for d, _ in got_a] == [b"answer", b"other port"]
    assert net.router.counters["nat.filtered"] == 1


def test_unsolicited_syn_is_dropped_in_silence():
    net = Net()
    x = net.outside[0]
    conn = x.tcp.connect(ip(PUBLIC), 40000, net.lan.now)
    conn.user = User()
    net.run(timeout=2.0)
    assert not conn.user.established and conn.user.closed == []  # no RST came back
    assert net.router.counters["nat.unsolicited"] >= 1
    assert net.router.counters["tcp.resets_sent"] == 0


def test_ping_identifiers_are_mapped_and_replies_find_their_way():
    net = Net()
    x = net.outside[0]
    echo = dpkt.icmp.ICMP(type=8, data=dpkt.icmp.ICMP.Echo(id=77, seq=1, data=b"hi" * 8))
    for h in net.inside:  # both inside hosts ping with identifier 77
        h.ipv4.send(x.address, 1, bytes(echo), net.lan.now)
    net.run(timeout=1.0)
    requests = [p for p in net.taps[x.address].seen if p.p == 1 and p.data.type == 8]
    assert len({p.data.data.id for p in requests}) == 2  # distinct outside
    assert all(p.src == ip(PUBLIC) for p in requests)
    for h in net.inside:
        replies = [p for p in net.taps[h.address].seen if p.p == 1 and p.data.type == 0]
        assert [p.data.data.id for p in replies] == [77]  # each got its own back


def test_icmp_error_is_translated_back_to_the_inside_host():
    net = Net()
    a, x = net.inside[0], net.outside[0]
    got = []
    ep = a.udp.bind(6000, udp_user(got))
    a.udp.sendto(ep, b"anyone?", x.address, 9999, net.lan.now)  # x: port unreachable
    net.run(lambda: got)
    assert isinstance(got[0], ConnectionRefusedError)
    (err,) = [p for p in net.taps[a.address].seen if p.p == 1]
    quoted = dpkt.ip.IP(bytes(err.data.data.data) + bytes(8))  # pad the cut quote
    assert err.dst == a.address and quoted.src == a.address and quoted.data.sport == 6000
    assert net.router.counters["nat.translated_errors"] == 1


def test_entries_expire_on_schedule_and_release_their_mapping():
    net = Net(conntrack=ConntrackConfig(udp=5.0))
    a, x = net.inside[0], net.outside[0]
    ep = a.udp.bind(7000, udp_user([]))
    x.udp.bind(53, udp_user([]))
    a.udp.sendto(ep, b"q", x.address, 53, net.lan.now)
    net.run(lambda: net.box.conntrack.count == 1, timeout=1.0)
    (entry,) = net.box.conntrack.entries()
    assert len(net.box.nat.by_public) == 1
    net.run(lambda: net.box.conntrack.count == 0, timeout=20)
    assert 5.0 <= net.lan.now - entry.created <= 5.5  # the last datagram plus 5 s
    assert net.box.nat.by_public == {} and net.router.counters["conntrack.expired"] == 1


def test_port_forward_and_hairpinning():
    net = Net(forwards=[PortForward(6, ip(PUBLIC), 8080, ip("192.168.1.3"), 80)])
    server_host = net.inside[1]
    accepted = []

    def accept(conn):
        conn.user = User()
        accepted.append(conn)

    server_host.tcp.listen(80, accept)
    # from outside, through the forward
    conn = net.outside[0].tcp.connect(ip(PUBLIC), 8080, net.lan.now)
    conn.user = User()
    net.run(lambda: conn.user.established and accepted)
    assert conn.user.established and accepted[0].remote_ip == ip("203.0.113.10")
    # from inside, to the public address (hairpin): the server sees the public address
    accepted.clear()
    inner = net.inside[0].tcp.connect(ip(PUBLIC), 8080, net.lan.now)
    inner.user = User()
    net.run(lambda: inner.user.established and accepted)
    assert inner.user.established and accepted[0].remote_ip == ip(PUBLIC)
    assert net.router.counters["nat.hairpinned"] == 1


def test_subscriber_port_limit():
    net = Net(limit=2)
    a, x = net.inside[0], net.outside[0]
    x.udp.bind(53, udp_user([]))
    for port in (1001, 1002, 1003):
        a.udp.sendto(a.udp.bind(port, udp_user([])), b"q", x.address, 53, net.lan.now)
    net.run(timeout=1.0)
    assert len(net.box.nat.by_public) == 2 and net.router.counters["nat.subscriber_limit"] == 1


# -- found by review: each of these failed on the first version --------------------------


def test_a_dropped_first_datagram_leaves_no_mapping_behind():
    from stack.net.filters import Acl, make_rule

    net = Net()
    net.box.acl_in[1] = Acl([make_rule(100, "allow", "all", "203.0.113.20/32", None)])
    a, x = net.inside[0], net.outside[0]
    for port in range(7000, 7010):  # towards x, which wan's ACL denies
        a.udp.sendto(a.udp.bind(port, udp_user([])), b"q", x.address, 53, net.lan.now)
    net.run(timeout=1.0)
    assert net.router.counters["acl.denied_in"] == 10
    assert net.box.conntrack.count == 0 and net.box.nat.by_public == {}
    assert net.box.nat.per_subscriber == {}


def test_datagrams_dying_on_the_way_do_not_pin_a_mapping():
    net = Net(filtering="endpoint", conntrack=ConntrackConfig(udp=3.0))
    a, x = net.inside[0], net.outside[0]
    x.udp.bind(53, udp_user([]))
    a.udp.sendto(a.udp.bind(7000, udp_user([])), b"q", x.address, 53, net.lan.now)
    net.run(lambda: net.box.conntrack.count == 1, timeout=1.0)
    (mapping,) = net.box.nat.by_public.values()
    probe = dpkt.udp.UDP(sport=999, dport=mapping.pport, data=b"z")
    probe.ulen = len(probe)
    packet = dpkt.ip.IP(src=net.outside[1].address, dst=ip(PUBLIC), p=17, ttl=1, data=probe)
    packet.len = len(packet)
    for _ in range(5):  # TTL 1 after DNAT: Time Exceeded, never confirmed
        net.router.receive(1, bytes(dpkt.ethernet.Ethernet(
            dst=net.router.interfaces[1].mac, src=net.outside[1].mac, type=0x0800,
            data=packet)), net.lan.now)
    assert mapping.flows == 1
    net.run(lambda: net.box.nat.by_public == {}, timeout=20)
    assert net.box.nat.by_public == {} and mapping.flows == 0


def test_two_inside_hosts_meet_through_the_public_address_under_address_filtering():
    net = Net(filtering="address")
    a, b, x = net.inside[0], net.inside[1], net.outside[0]
    x.udp.bind(3478, udp_user([]))  # a "STUN server" each of them talks to first
    got_a, got_b = [], []
    ep_a = a.udp.bind(7000, udp_user(got_a))
    ep_b = b.udp.bind(8000, udp_user(got_b))
    a.udp.sendto(ep_a, b"hello", x.address, 3478, net.lan.now)
    b.udp.sendto(ep_b, b"hello", x.address, 3478, net.lan.now)
    net.run(timeout=0.5)
    for _ in range(3):  # both punch towards the other's public endpoint
        a.udp.sendto(ep_a, b"hi from a", ip(PUBLIC), 8000, net.lan.now)
        b.udp.sendto(ep_b, b"hi from b", ip(PUBLIC), 7000, net.lan.now)
        net.run(timeout=0.5)
    assert (b"hi from b", (PUBLIC, 8000)) in got_a
    assert (b"hi from a", (PUBLIC, 7000)) in got_b


def test_a_table_of_closing_flows_still_takes_new_ones():
    net = Net(conntrack=ConntrackConfig(max_entries=3))
    a, x = net.inside[0], net.outside[0]
    for port in (41000, 41001, 41002, 41003):
        conn, server = connect(net, a, x, 80, sport=port)
        assert conn.user.established, port
        conn.close()
        server.close()
        net.run(lambda c=conn: c.state_name in ("TIME-WAIT", "CLOSED"), timeout=5)
    assert net.router.counters["conntrack.table_full"] == 0
    assert net.router.counters["conntrack.evicted"] >= 1


def test_a_blind_rst_does_not_close_the_flow():
    net = Net()
    a, x = net.inside[0], net.outside[0]
    conn, server = connect(net, a, x, 80, sport=42000)
    conn.send(b"x" * 3000)
    net.run(lambda: len(server.user.data) == 3000)
    (entry,) = [e for e in net.box.conntrack.entries() if e.orig.proto == 6]
    rst = dpkt.tcp.TCP(sport=80, dport=42000, flags=dpkt.tcp.TH_RST,
                       seq=(server.snd_nxt - 1000) & 0xFFFFFFFF)  # in the window, not exact
    packet = dpkt.ip.IP(src=x.address, dst=ip(PUBLIC), p=6, data=rst)
    net.router.receive(1, bytes(dpkt.ethernet.Ethernet(
        dst=net.router.interfaces[1].mac, src=x.mac, type=0x0800, data=packet)), net.lan.now)
    assert entry.state == ESTABLISHED
    assert net.router.counters["conntrack.out_of_window"] >= 1


def test_truncated_transport_headers_do_not_slip_past_tracking():
    net = Net()
    x = net.outside[0]
    short = dpkt.ip.IP(src=x.address, dst=ip(PUBLIC), p=17, data=b"\x00\x35\x1f")
    net.router.receive(1, bytes(dpkt.ethernet.Ethernet(
        dst=net.router.interfaces[1].mac, src=x.mac, type=0x0800, data=short)), net.lan.now)
    assert net.router.counters["conntrack.invalid"] == 1


def test_protocols_without_ports_are_masqueraded_by_address():
    net = Net()
    a, x = net.inside[0], net.outside[0]
    a.ipv4.send(x.address, 47, b"\x00\x00\x08\x00" + b"gre payload", net.lan.now)
    net.run(timeout=0.5)
    seen = [p for p in net.taps[x.address].seen if p.p == 47]
    assert [p.src for p in seen] == [ip(PUBLIC)]
    x.ipv4.send(ip(PUBLIC), 47, b"\x00\x00\x08\x00" + b"gre answer", net.lan.now)
    net.run(timeout=0.5)
    assert [p.src for p in net.taps[a.address].seen if p.p == 47] == [x.address]


def test_hairpinning_to_a_one_to_one_public_address():
    net = Net(static=[StaticNat(ip("203.0.113.5"), ip("192.168.1.3"))])
    net.router.add_address("wan", ip("203.0.113.5"), 24)
    a, b = net.inside
    accepted = []
    b.tcp.listen(80, lambda c: (setattr(c, "user", User()), accepted.append(c)))
    conn = a.tcp.connect(ip("203.0.113.5"), 80, net.lan.now)
    conn.user = User()
    net.run(lambda: conn.user.established and accepted, timeout=3)
    assert conn.user.established and accepted[0].remote_ip == ip(PUBLIC)


def test_an_oversized_datagram_in_fragments_is_dropped_and_counted():
    net = Net()
    x = net.outside[0]
    options = bytes([0x94, 4, 0, 0]) * 10  # 40 bytes: a 60-byte first header
    data = bytes(65515 - 8)  # ends at 65515 with the UDP header: 65575 with that header
    whole = dpkt.udp.UDP(sport=1, dport=2, data=data)
    whole.ulen = 8 + len(data)
    body = bytes(whole)
    frames, offset, step = [], 0, 1480
    while offset < len(body):
        piece = body[offset:offset + step]
        more = offset + step < len(body)
        frag = dpkt.ip.IP(src=x.address, dst=ip(PUBLIC), p=17, id=9, data=piece,
                          mf=int(more), offset=offset >> 3)
        if offset == 0:
            frag.opts = options
            frag.hl = 15
        frag.len = frag.hl * 4 + len(piece)
        frames.append(bytes(dpkt.ethernet.Ethernet(
            dst=net.router.interfaces[1].mac, src=x.mac, type=0x0800, data=frag)))
        offset += step
    for f in frames:
        net.router.receive(1, f, net.lan.now)
    assert net.router.counters["ipv4.reasm_too_big"] == 1
    assert net.router.counters["stack.internal_errors"] == 0


def test_time_exceeded_at_a_one_to_one_nat_quotes_what_was_sent():
    """A traceroute probe to the public address dies at the NAT itself: the error quotes
    the datagram as it arrived (public destination), not as the NAT rewrote it, so the
    sender can match it (RFC 1812 4.3.2.3; Linux reverses the NAT in the quote too)."""
    from stack.wire.udp import build_udp

    net = Net(static=[StaticNat(ip("203.0.113.5"), ip("192.168.1.3"))])
    net.router.add_address("wan", ip("203.0.113.5"), 24)
    x = net.outside[0]
    probe = build_udp(x.address, ip("203.0.113.5"), 40000, 33434, b"probe")
    x.ipv4.send(ip("203.0.113.5"), 17, probe, net.lan.now, ttl=1)
    net.run(lambda: any(p.p == 1 for p in net.taps[x.address].seen), timeout=3)
    (err,) = [p for p in net.taps[x.address].seen if p.p == 1]
    assert err.data.type == 11 and err.src == ip(PUBLIC)
    quoted = dpkt.ip.IP(bytes(err.data.data.data) + bytes(8))
    assert quoted.dst == ip("203.0.113.5") and quoted.data.dport == 33434
    assert net.router.counters["ipv4.fwd_ttl_exceeded"] == 1
