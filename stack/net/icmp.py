"""ICMP (RFC 792, RFC 1122 3.2.2): echo, the errors we send (rate limited), and the errors
we receive, handed to the transport whose datagram they quote."""

from __future__ import annotations

from stack.net.counters import Counters
from stack.net.ipv4 import IPv4Layer, parse_quoted
from stack.wire.checksum import ones_sum
from stack.wire.errors import MalformedError
from stack.wire.icmp import (
    ERROR_TYPES,
    TYPE_DEST_UNREACHABLE,
    TYPE_ECHO_REPLY,
    TYPE_ECHO_REQUEST,
    TYPE_TIME_EXCEEDED,
    build_echo,
    build_error,
    parse_echo,
    parse_error,
)
from stack.wire.ipv4 import PROTO_ICMP, IPv4Header

COUNTERS = (
    "icmp.rx_messages", "icmp.rx_truncated", "icmp.rx_bad_checksum", "icmp.rx_echo_requests",
    "icmp.rx_echo_replies", "icmp.rx_other_types", "icmp.rx_broadcast_echo_ignored",
    "icmp.rx_dest_unreachable", "icmp.rx_time_exceeded", "icmp.rx_errors_unmatched",
    "icmp.tx_echo_replies", "icmp.tx_errors", "icmp.tx_rate_limited",
    "icmp.tx_error_suppressed",
)


class IcmpEngine:
    def __init__(self, ipv4: IPv4Layer, counters: Counters, error_rate: float = 100.0,
                 error_burst: float = 50.0) -> None:
        self.ipv4 = ipv4
        self.counters = counters
        # token bucket for the errors we emit (RFC 1812 4.3.2.8, Linux icmp_ratelimit)
        self.error_rate = error_rate
        self.error_burst = error_burst
        self._tokens = error_burst
        self._tokens_at = 0.0
        counters.declare(*COUNTERS)
        ipv4.handlers[PROTO_ICMP] = self.receive
        ipv4.send_icmp_error = self.send_error

    # -- input ----------------------------------------------------------------------------

    def receive(self, ip: IPv4Header, message: memoryview, now: float) -> None:
        c = self.counters
        c["icmp.rx_messages"] += 1
        try:
            icmp_type, _code, ident, seq = parse_echo(message)
        except MalformedError as exc:
            c["icmp.rx_" + exc.reason] += 1
            return
        if not self.ipv4.rx_checksum_trusted and ones_sum(message) != 0:
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
        if quoted is None or quoted[0].src != self.ipv4.address:
            c["icmp.rx_errors_unmatched"] += 1  # not a datagram of ours
            return
        header, data = quoted
        handler = self.ipv4.error_handlers.get(header.protocol)
        if handler is None:
            c["icmp.rx_errors_unmatched"] += 1
            return
        handler(icmp_type, code, mtu, header, data, now)

    # -- output ---------------------------------------------------------------------------

    def send_error(self, icmp_type: int, code: int, quote: bytes, now: float,
                   next_hop_mtu: int = 0) -> None:
        """An error about the datagram quoted (its header and at least 8 bytes).

        RFC 1122 3.2.2: never about an ICMP error, a broadcast or multicast datagram, or
        a datagram whose source is not one host; those are counted as suppressed.
        """
        c = self.counters
        parsed = parse_quoted(memoryview(quote), min_data=0)
        if parsed is None:
            c["icmp.tx_error_suppressed"] += 1
            return
        header, data = parsed
        if self.ipv4.is_broadcast(header.dst) or header.dst[0] >= 224 or \
                self.ipv4.is_martian_source(header.src) or \
                (header.protocol == PROTO_ICMP and (not data or data[0] in ERROR_TYPES)) or \
                header.flags_fragment & 0x1FFF:
            c["icmp.tx_error_suppressed"] += 1
            return
        elapsed = now - self._tokens_at
        self._tokens_at = now
        self._tokens = min(self.error_burst, self._tokens + elapsed * self.error_rate)
        if self._tokens < 1.0:
            c["icmp.tx_rate_limited"] += 1
            return
        self._tokens -= 1.0
        message = build_error(icmp_type, code, quote, next_hop_mtu)
        if self.ipv4.send(header.src, PROTO_ICMP, message, now):
            c["icmp.tx_errors"] += 1
