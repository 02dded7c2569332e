"""ICMP (RFC 792, RFC 1122 3.2.2): echo replies for now."""

from __future__ import annotations

from stack.net.counters import Counters
from stack.net.ipv4 import IPv4Layer
from stack.wire.checksum import ones_sum
from stack.wire.errors import MalformedError
from stack.wire.icmp import TYPE_ECHO_REPLY, TYPE_ECHO_REQUEST, build_echo, parse_echo
from stack.wire.ipv4 import PROTO_ICMP, IPv4Header

COUNTERS = (
    "icmp.rx_messages", "icmp.rx_truncated", "icmp.rx_bad_checksum", "icmp.rx_echo_requests",
    "icmp.rx_echo_replies", "icmp.rx_other_types", "icmp.rx_broadcast_echo_ignored",
    "icmp.tx_echo_replies",
)


class IcmpEngine:
    def __init__(self, ipv4: IPv4Layer, counters: Counters) -> None:
        self.ipv4 = ipv4
        self.counters = counters
        counters.declare(*COUNTERS)
        ipv4.handlers[PROTO_ICMP] = self.receive

    def receive(self, ip: IPv4Header, message: memoryview, now: float) -> None:
        c = self.counters
        c["icmp.rx_messages"] += 1
        try:
            icmp_type, _code, ident, seq = parse_echo(message)
        except MalformedError as exc:
            c["icmp.rx_" + exc.reason] += 1
            return
        if ones_sum(message) != 0:
            c["icmp.rx_bad_checksum"] += 1
            return
        if icmp_type == TYPE_ECHO_REQUEST:
            c["icmp.rx_echo_requests"] += 1
            if ip.dst != self.ipv4.address:
                # Like Linux's icmp_echo_ignore_broadcasts=1 (smurf amplification).
                c["icmp.rx_broadcast_echo_ignored"] += 1
                return
            # RFC 1122 3.2.2.6: the reply carries the request's identifier, sequence and data.
            reply = build_echo(TYPE_ECHO_REPLY, ident, seq, message[8:])
            if self.ipv4.send(ip.src, PROTO_ICMP, reply, now, tos=ip.tos):
                c["icmp.tx_echo_replies"] += 1
        elif icmp_type == TYPE_ECHO_REPLY:
            c["icmp.rx_echo_replies"] += 1
        else:
            c["icmp.rx_other_types"] += 1
