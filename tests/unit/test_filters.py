"""Network ACLs (stateless, first match wins) and security groups (stateful, allow only)
on a tapstack router between a client and a subnet, under a virtual clock."""

import random
import socket

import pytest

from stack.link.memory import MemoryLan
from stack.net.filters import Acl, SecurityGroup, make_rule
from stack.net.host import Host, HostConfig
from stack.net.interface import InterfaceConfig
from stack.net.middlebox import Middlebox, MiddleboxConfig
from stack.net.node import Node, NodeConfig
from tests.unit.tcp_peer import User


def ip(text: str) -> bytes:
    return socket.inet_aton(text)


CLIENT, SERVER = "198.51.100.7", "10.0.1.10"


class Vpc:
    """client (198.51.100.7) - router - server (10.0.1.10); filters on the router's
    interface to the subnet ("subnet")."""

    def __init__(self, acl_in: Acl | None = None, acl_out: Acl | None = None,
                 group: SecurityGroup | None = None) -> None:
        self.lan = MemoryLan()
        self.router = Node(NodeConfig(forwarding=True, interfaces=[
            InterfaceConfig("internet", bytes.fromhex("020000000001"),
                            [(ip("198.51.100.1"), 24)]),
            InterfaceConfig("subnet", bytes.fromhex("020000000002"), [(ip("10.0.1.1"), 24)])]),
            random.Random(1))
        config = MiddleboxConfig()
        if acl_in is not None:
            config.acl_in["subnet"] = acl_in
        if acl_out is not None:
            config.acl_out["subnet"] = acl_out
        if group is not None:
            config.groups["subnet"] = group
        self.box = Middlebox(self.router, config, random.Random(2))
        self.client = Host(HostConfig(mac=bytes.fromhex("02000000c001"), address=ip(CLIENT),
                                      gateway=ip("198.51.100.1")), random.Random(3))
        self.server = Host(HostConfig(mac=bytes.fromhex("02000000c002"), address=ip(SERVER),
                                      gateway=ip("10.0.1.1")), random.Random(4))
        self.lan.plug(self.router, 0, "internet")
        self.lan.plug(self.router, 1, "subnet")
        self.lan.plug(self.client.node, 0, "internet")
        self.lan.plug(self.server.node, 0, "subnet")
        self.accepted = []
        for port in (22, 80, 443):
            self.server.tcp.listen(port, self._accept)
        self.lan.start()

    def _accept(self, conn) -> None:
        conn.user = User()
        self.accepted.append(conn)

    def connect(self, port: int, timeout: float = 3.0):
        conn = self.client.tcp.connect(ip(SERVER), port, self.lan.now)
        conn.user = User()
        self.lan.run(lambda: conn.user.established, timeout)
        return conn

    def exchange(self, conn, timeout: float = 3.0) -> bool:
        """Can the client still get data through, and an answer back?"""
        def mine():
            return next((c for c in self.accepted if c.remote_port == conn.local_port), None)

        self.lan.run(lambda: mine() is not None, timeout)
        server = mine()
        before, sent = len(conn.user.data), len(server.user.data)
        conn.send(b"ping")
        self.lan.run(lambda: len(server.user.data) > sent, timeout)
        if len(server.user.data) == sent:
            return False
        server.send(b"pong")
        self.lan.run(lambda: len(conn.user.data) > before, timeout)
        return len(conn.user.data) > before


def acl(*rules) -> Acl:
    table = Acl()
    for number, action, proto, cidr, ports in rules:
        table.add(make_rule(number, action, proto, cidr, ports))
    return table


EPHEMERAL = (100, "allow", "tcp", "0.0.0.0/0", [1024, 65535])


@pytest.mark.parametrize(("rules", "port", "opens"), [
    ([(100, "allow", "tcp", "0.0.0.0/0", [80, 80]), (200, "deny", "tcp", "0.0.0.0/0", None)],
     80, True),  # an allow at 100 beats a deny at 200
    ([(50, "deny", "tcp", "198.51.100.0/24", None),
      (100, "allow", "tcp", "0.0.0.0/0", [80, 80]), (200, "deny", "tcp", "0.0.0.0/0", None)],
     80, False),  # a deny at 50 beats both
    ([(100, "allow", "tcp", "0.0.0.0/0", [80, 80])], 443, False),  # the implicit deny
    ([(100, "allow", "tcp", "203.0.113.0/24", [80, 80])], 80, False),  # not that source
])
def test_acl_first_match_wins(rules, port, opens):
    vpc = Vpc(acl_in=acl(*rules), acl_out=acl(EPHEMERAL))
    conn = vpc.connect(port)
    assert conn.user.established == opens
    denied = vpc.router.counters["acl.denied_in"]
    assert (denied == 0) == opens
    table = vpc.box.acl_in[1]
    if opens:
        assert table.rules[[r.number for r in table.rules].index(
            next(r[0] for r in rules if r[1] == "allow"))].hits >= 1


def test_acl_is_stateless_replies_need_their_own_rule():
    vpc = Vpc(acl_in=acl((100, "allow", "tcp", "0.0.0.0/0", [80, 80])),
              acl_out=acl((100, "allow", "tcp", "0.0.0.0/0", [80, 80])))  # no ephemeral
    conn = vpc.connect(80)
    assert not conn.user.established  # the SYN-ACK to the client's port was denied
    assert vpc.router.counters["acl.denied_out"] >= 1 and vpc.accepted == []


def test_security_group_replies_pass_without_an_inbound_rule_and_removal_spares_flows():
    group = SecurityGroup(inbound=[make_rule(1, "allow", "tcp", "0.0.0.0/0", [80, 80])])
    vpc = Vpc(group=group)
    conn = vpc.connect(80)
    assert conn.user.established and vpc.exchange(conn)
    group.inbound.clear()  # the rule goes: the flow it let in stays
    assert vpc.exchange(conn)
    assert not vpc.connect(80).user.established  # a new one is refused
    assert vpc.router.counters["sg.denied_in"] >= 1
    # outbound from the subnet is open by default, and its replies need no inbound rule
    out = vpc.server.tcp.connect(ip(CLIENT), 22, vpc.lan.now)
    out.user = User()
    vpc.client.tcp.listen(22, lambda c: setattr(c, "user", User()))
    vpc.lan.run(lambda: out.user.established, 3.0)
    assert out.user.established


def test_an_acl_change_cuts_a_flow_at_once_a_group_change_does_not():
    inbound = acl((100, "allow", "tcp", "0.0.0.0/0", [80, 80]))
    group = SecurityGroup(inbound=[make_rule(1, "allow", "tcp", "0.0.0.0/0", [80, 80])])
    vpc = Vpc(acl_in=inbound, acl_out=acl(EPHEMERAL), group=group)
    conn = vpc.connect(80)
    assert vpc.exchange(conn)
    group.inbound.clear()
    assert vpc.exchange(conn)
    inbound.remove(100)
    assert not vpc.exchange(conn, timeout=1.0)
    assert vpc.router.counters["acl.denied_in"] >= 1


def test_bad_rules_are_refused_with_a_reason():
    with pytest.raises(ValueError, match="must be allow or deny"):
        make_rule(1, "permit", "tcp", "0.0.0.0/0", None)
    with pytest.raises(ValueError, match="host bits"):
        make_rule(1, "allow", "tcp", "10.0.0.1/8", None)
    with pytest.raises(ValueError, match="low, high"):
        make_rule(1, "allow", "tcp", "0.0.0.0/0", [90, 80])
    table = acl((100, "allow", "tcp", "0.0.0.0/0", None))
    with pytest.raises(ValueError, match="exists already"):
        table.add(make_rule(100, "deny", "udp", "0.0.0.0/0", None))


def test_a_security_group_rule_comes_back_under_its_old_number():
    """`rules del` then `rules add --number N` (how a journey scenario undoes itself): the
    rule returns as it was, a number in use is refused, and new rules number after it."""
    group = SecurityGroup(inbound=[make_rule(1, "allow", "tcp", "0.0.0.0/0", (443, 443)),
                                   make_rule(2, "allow", "tcp", "0.0.0.0/0", (80, 80))],
                          next_number=3)
    vpc = Vpc(group=group)
    where = {"interface": "subnet", "kind": "sg", "direction": "inbound"}
    vpc.box.change_rule({**where, "op": "del", "number": 1})
    assert [r.number for r in group.inbound] == [2]
    with pytest.raises(ValueError, match="already has a security-group rule 2"):
        vpc.box.change_rule({**where, "op": "add", "number": 2, "protocol": "tcp"})
    vpc.box.change_rule({**where, "op": "add", "number": 1, "protocol": "tcp",
                         "ports": [443, 443]})
    assert sorted((r.number, r.ports) for r in group.inbound) == [(1, (443, 443)),
                                                                 (2, (80, 80))]
    vpc.box.change_rule({**where, "op": "add", "number": 7, "protocol": "udp"})
    vpc.box.change_rule({**where, "op": "add", "protocol": "icmp"})
    assert [r.number for r in group.inbound][-2:] == [7, 8]
    # outbound numbers are their own: its default rule 1 does not clash with inbound's 1
    assert [r.number for r in group.outbound] == [1]
