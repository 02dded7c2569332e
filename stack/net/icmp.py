"""ICMP (RFC 792, RFC 1122 3.2.2): echo, and the errors we receive, handed to the
transport whose datagram they quote. The errors a node sends are in icmp_errors.py."""

from __future__ import annotations

from stack.counters import Counters
from stack.net.ipv4 import IPv4Layer
from stack.net.packet import PacketInfo
from stack.wire.checksum import ones_sum
from stack.wire.errors import MalformedError
from stack.wire.icmp import (
    TYPE_DEST_UNREACHABLE,
    TYPE_ECHO_REPLY,
    TYPE_ECHO_REQUEST,
    TYPE_TIME_EXCEEDED,
    build_echo,
    parse_echo,
    parse_error,
)
from stack.wire.ipv4 import PROTO_ICMP, IPv4Header, parse_quoted

COUNTERS = (
    "icmp.rx_messages", "icmp.rx_truncated", "icmp.rx_bad_checksum", "icmp.rx_echo_requests",
    "icmp.rx_echo_replies", "icmp.rx_other_types", "icmp.rx_broadcast_echo_ignored",
    "icmp.rx_dest_unreachable", "icmp.rx_time_exceeded", "icmp.rx_errors_unmatched",
    "icmp.tx_echo_replies",
)


class IcmpEngine:
    def __init__(self, ipv4: IPv4Layer, counters: Counters) -> None:
        self.ipv4 = ipv4
        self.counters = counters
        counters.declare(*COUNTERS)
        ipv4.handlers[PROTO_ICMP] = self.receive

    # -- input ----------------------------------------------------------------------------

    def receive(self, ip: IPv4Header, message: memoryview, now: float,
                info: PacketInfo) -> None:
        c = self.counters
        c["icmp.rx_messages"] += 1
        try:
            icmp_type, _code, ident, seq = parse_echo(message)
        except MalformedError as exc:
            c["icmp.rx_" + exc.reason] += 1
            return
        if not info.trusted and ones_sum(message) != 0:
            c["icmp.rx_bad_checksum"] += 1
            return
        if icmp_type == TYPE_ECHO_REQUEST:
            c["icmp.rx_echo_requests"] += 1
            if info.broadcast:
                # Like Linux's icmp_echo_ignore_broadcasts=1 (smurf amplification).
                c["icmp.rx_broadcast_echo_ignored"] += 1
                return
            # RFC 1122 3.2.2.6: the reply carries the request's identifier, sequence and data.
            reply = build_echo(TYPE_ECHO_REPLY, ident, seq, message[8:])
            if self.ipv4.send(ip.src, PROTO_ICMP, reply, now, tos=ip.tos, src=ip.dst):
                c["icmp.tx_echo_replies"] += 1
        elif icmp_type == TYPE_ECHO_REPLY:
            c["icmp.rx_echo_replies"] += 1
        elif icmp_type in (TYPE_DEST_UNREACHABLE, TYPE_TIME_EXCEEDED):
            self._receive_error(message, now)
        else:
            c["icmp.rx_other_types"] += 1

    def _receive_error(self, message: memoryview, now: float) -> None:
        """RFC 1122 3.2.2.1: pass the error to the transport that sent the quoted datagram."""
        c = self.counters
        try:
            icmp_type, code, mtu, quote = parse_error(message)
        except MalformedError:
            c["icmp.rx_truncated"] += 1
            return
        c["icmp.rx_dest_unreachable" if icmp_type == TYPE_DEST_UNREACHABLE
          else "icmp.rx_time_exceeded"] += 1
        quoted = parse_quoted(quote)
        if quoted is None or quoted[0].src not in self.ipv4.local:
            c["icmp.rx_errors_unmatched"] += 1  # not a datagram of ours
            return
        header, data = quoted
        handler = self.ipv4.error_handlers.get(header.protocol)
        if handler is None:
            c["icmp.rx_errors_unmatched"] += 1
            return
        handler(icmp_type, code, mtu, header, data, now)
