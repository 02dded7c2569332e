"""Two tapstack instances over the in-memory wire, with seeded faults."""

import hashlib
import random

import pytest

from stack.link.impair import Impairment
from stack.link.memory import MemoryWire
from stack.net.host import Host, HostConfig
from stack.net.tcp.connection import TcpConfig
from tests.unit.tcp_peer import User, state_name

A_IP, B_IP = bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2])
FAULTS = "loss=5%,reorder=5%,duplicate=1%,corrupt=1%,delay=1ms"


def pair(faults: str | None, seed: int, msl: float = 30.0):
    def make(mac: str, ip: bytes, s: int) -> Host:
        return Host(HostConfig(mac=bytes.fromhex(mac), address=ip,
                                         tcp=TcpConfig(msl=msl)), random.Random(s))

    a = make("020000000001", A_IP, seed)
    b = make("020000000002", B_IP, seed + 1)
    ab = Impairment.parse(f"{faults},seed={seed}", prefix="ab") if faults else None
    ba = Impairment.parse(f"{faults},seed={seed + 7}", prefix="ba") if faults else None
    wire = MemoryWire(a, b, ab, ba)
    wire.start()
    return wire, a, b


def connect(wire, a, b, port=80):
    accepted = []

    def accept(conn):
        conn.user = User()
        accepted.append(conn)

    if port not in b.tcp.listeners:
        b.tcp.listen(port, accept)
    else:
        b.tcp.listeners[port].on_accept = accept
    client = a.tcp.connect(B_IP, port, wire.now)
    client.user = User()
    wire.run(until=lambda: client.user.established and accepted, timeout=60)
    assert client.user.established and accepted
    return client, accepted[0], client.user, accepted[0].user


@pytest.mark.parametrize("seed", [1, 2])
def test_ten_megabytes_each_way_under_faults(seed):
    wire, a, b = pair(FAULTS, seed)
    client, server, cu, su = connect(wire, a, b)
    up = random.Random(seed).randbytes(10_000_000)
    down = random.Random(seed + 100).randbytes(10_000_000)
    client.send(up)
    server.send(down)
    client.shutdown()
    server.shutdown()
    wire.run(until=lambda: cu.eof and su.eof, timeout=3000)
    assert hashlib.sha256(su.data).digest() == hashlib.sha256(up).digest()
    assert hashlib.sha256(cu.data).digest() == hashlib.sha256(down).digest()
    damage = {k: v for k, v in wire.a_to_b.counters.items() if v}
    assert damage["ab.dropped"] > 100 and damage["ab.corrupted"] > 20  # faults happened
    assert a.counters["tcp.retransmits"] > 0 and b.counters["tcp.rx_bad_checksum"] > 0
    assert a.counters["stack.internal_errors"] == b.counters["stack.internal_errors"] == 0
    wire.run(timeout=200)  # both sides finish closing, TIME-WAIT expires
    assert a.tcp.connections == {} and b.tcp.connections == {}
    assert cu.closed == [None] and su.closed == [None]


def test_simultaneous_close_between_two_stacks():
    wire, a, b = pair(None, 5, msl=1.0)
    client, server, cu, su = connect(wire, a, b)
    client.close()
    server.close()
    seen = set()
    wire.run(until=lambda: seen.add((state_name(a.tcp, client),
                                     state_name(b.tcp, server))) or False, timeout=10)
    # the FINs crossed: both went FIN-WAIT-1 -> CLOSING -> TIME-WAIT (RFC 9293 fig. 13)
    assert ("CLOSING", "CLOSING") in seen and ("TIME-WAIT", "TIME-WAIT") in seen
    assert a.tcp.connections == {} and b.tcp.connections == {}
    assert cu.closed == [None] and su.closed == [None]


def test_many_short_connections_leave_an_empty_table():
    wire, a, b = pair("loss=1%,delay=1ms", 9, msl=0.5)
    for i in range(200):
        client, server, cu, su = connect(wire, a, b)
        client.send(b"GET %d\n" % i)
        wire.run(until=lambda s=su: len(s.data) > 0, timeout=60)
        server.send(b"reply")
        server.close()
        wire.run(until=lambda c=cu: c.eof, timeout=60)
        client.close()
    wire.run(timeout=30)
    assert a.tcp.connections == {} and b.tcp.connections == {}
    assert a.next_deadline() is None and b.next_deadline() is None
    assert b.counters["tcp.passive_opens"] == 200
