"""A whole network in one process under a virtual clock: host a - router r1 - router r2 -
host b, the middle link with a 1400-byte MTU and faults. TCP between the hosts finds the
path MTU from r2's Fragmentation Needed and moves its data whole through both routers."""

import hashlib
import random
import socket

from stack.link.impair import Impairment
from stack.link.memory import MemoryLan
from stack.net.host import Host, HostConfig
from stack.net.interface import InterfaceConfig
from stack.net.node import Node, NodeConfig, RouteConfig
from tests.unit.tcp_peer import User


def ip(text: str) -> bytes:
    return socket.inet_aton(text)


def chain(faults: str | None = None, seed: int = 1):
    a = Host(HostConfig(mac=bytes.fromhex("02aa00000001"), address=ip("10.1.0.2"),
                        gateway=ip("10.1.0.1")), random.Random(seed))
    b = Host(HostConfig(mac=bytes.fromhex("02bb00000001"), address=ip("10.2.0.2"),
                        gateway=ip("10.2.0.1")), random.Random(seed + 1))
    r1 = Node(NodeConfig(name="r1", forwarding=True, interfaces=[
        InterfaceConfig("eth0", bytes.fromhex("021100000000"), [(ip("10.1.0.1"), 24)]),
        InterfaceConfig("eth1", bytes.fromhex("021100000001"), [(ip("10.12.0.1"), 24)],
                        mtu=1400)],
        routes=[RouteConfig("10.2.0.0/24", ip("10.12.0.2"))]), random.Random(seed + 2))
    r2 = Node(NodeConfig(name="r2", forwarding=True, interfaces=[
        InterfaceConfig("eth0", bytes.fromhex("022200000000"), [(ip("10.12.0.2"), 24)],
                        mtu=1400),
        InterfaceConfig("eth1", bytes.fromhex("022200000001"), [(ip("10.2.0.1"), 24)])],
        routes=[RouteConfig("10.1.0.0/24", ip("10.12.0.1"))]), random.Random(seed + 3))
    lan = MemoryLan()
    lan.plug(a.node, 0, "a")
    lan.plug(r1, 0, "a")
    mid = {}
    if faults:
        mid = {"impair": Impairment.parse(f"{faults},seed={seed}", prefix="mid1")}
    lan.plug(r1, 1, "mid", **mid)
    if faults:
        mid = {"impair": Impairment.parse(f"{faults},seed={seed + 9}", prefix="mid2")}
    lan.plug(r2, 0, "mid", **mid)
    lan.plug(r2, 1, "b")
    lan.plug(b.node, 0, "b")
    lan.start()
    return lan, a, b, r1, r2


def test_tcp_through_two_routers_finds_the_path_mtu_and_survives_faults():
    lan, a, b, r1, r2 = chain("loss=2%,reorder=2%,delay=1ms")
    accepted = []

    def accept(conn):
        conn.user = User()
        accepted.append(conn)

    b.tcp.listen(80, accept)
    client = a.tcp.connect(ip("10.2.0.2"), 80, lan.now)
    client.user = User()
    lan.run(until=lambda: client.user.established and accepted, timeout=60)
    server = accepted[0]
    cu, su = client.user, server.user  # the engine forgets its user once closed
    up = random.Random(1).randbytes(2_000_000)
    down = random.Random(2).randbytes(2_000_000)
    client.send(up)
    server.send(down)
    client.shutdown()
    server.shutdown()
    lan.run(until=lambda: cu.eof and su.eof, timeout=3000)
    got_up, got_down = bytes(su.data), bytes(cu.data)
    assert hashlib.sha256(got_up).digest() == hashlib.sha256(up).digest()
    assert hashlib.sha256(got_down).digest() == hashlib.sha256(down).digest()
    # both ends began with 1460-byte segments; both routers' 1400-byte side refused them
    assert r1.counters["ipv4.fwd_frag_needed"] >= 1
    assert r2.counters["ipv4.fwd_frag_needed"] >= 1
    assert a.counters["ipv4.pmtu_updates"] == 1 and b.counters["ipv4.pmtu_updates"] == 1
    assert client.eff_mss <= 1400 - 40 and server.eff_mss <= 1400 - 40
    assert r1.counters["ipv4.forwarded"] > 2 * 2_000_000 // 1400
    assert r1.counters["stack.internal_errors"] == r2.counters["stack.internal_errors"] == 0


def test_ping_a_router_on_its_far_address():
    lan, a, b, r1, r2 = chain()
    received = []
    ep = a.udp.bind(0, type("U", (), {"on_datagram": lambda s, d, addr: received.append(d),
                                      "on_error": lambda s, e: received.append(e)})())
    a.udp.sendto(ep, b"hello", ip("10.12.0.2"), 7, lan.now)  # r2's near side: no echo
    lan.run(until=lambda: received, timeout=10)
    (err,) = received
    assert isinstance(err, ConnectionRefusedError)  # r2's port unreachable, routed back
    assert r2.counters["icmp.tx_errors"] == 1 and r1.counters["ipv4.forwarded"] == 2
