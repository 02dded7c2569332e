"""The ICMP errors a node sends (RFC 792, RFC 1122 3.2.2, RFC 1812 4.3.2): built here,
suppressed where the rules say never, rate limited, then routed like any datagram."""

from __future__ import annotations

from typing import TYPE_CHECKING

from stack.counters import Counters
from stack.wire.icmp import ERROR_TYPES, build_error
from stack.wire.ipv4 import PROTO_ICMP, parse_quoted

if TYPE_CHECKING:
    from stack.net.ipv4 import IPv4Layer

COUNTERS = ("icmp.tx_errors", "icmp.tx_rate_limited", "icmp.tx_error_suppressed")


class IcmpErrorSender:
    def __init__(self, ipv4: IPv4Layer, counters: Counters, rate: float = 100.0,
                 burst: float = 50.0) -> None:
        self.ipv4 = ipv4
        self.counters = counters
        # token bucket for the errors we emit (RFC 1812 4.3.2.8, Linux icmp_ratelimit)
        self.rate = rate
        self.burst = burst
        self._tokens = burst
        self._tokens_at = 0.0
        counters.declare(*COUNTERS)

    def send(self, icmp_type: int, code: int, quote: bytes, now: float,
             next_hop_mtu: int = 0) -> bool:
        """An error about the datagram quoted (its header and at least 8 bytes).

        RFC 1122 3.2.2 / RFC 1812 4.3.2.7: never about an ICMP error, a broadcast or
        multicast datagram, a non-initial fragment, or a datagram whose source is not one
        host; those are counted as suppressed. The error goes back to the quoted source,
        from the address of the interface the route back leaves by (RFC 1812 4.3.2.4).
        """
        c = self.counters
        parsed = parse_quoted(memoryview(quote), min_data=0)
        ipv4 = self.ipv4
        if parsed is None:
            c["icmp.tx_error_suppressed"] += 1
            return False
        header, data = parsed
        if ipv4.is_broadcast(header.dst) or header.dst[0] >= 224 or \
                ipv4.is_martian_source(header.src) or \
                (header.protocol == PROTO_ICMP and (not data or data[0] in ERROR_TYPES)) or \
                header.flags_fragment & 0x1FFF:
            c["icmp.tx_error_suppressed"] += 1
            return False
        elapsed = now - self._tokens_at
        self._tokens_at = now
        self._tokens = min(self.burst, self._tokens + elapsed * self.rate)
        if self._tokens < 1.0:
            c["icmp.tx_rate_limited"] += 1
            return False
        self._tokens -= 1.0
        message = build_error(icmp_type, code, quote, next_hop_mtu)
        if ipv4.send(header.src, PROTO_ICMP, message, now):
            c["icmp.tx_errors"] += 1
            return True
        return False
