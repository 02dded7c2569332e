"""Retransmission timeout per RFC 6298, with Linux's 200 ms floor under the variance term.

RTO = SRTT + max(4 RTTVAR, 200 ms), as Linux computes it, rather than
max(SRTT + 4 RTTVAR, 200 ms): a receiver may hold the ACK of a lone segment up to 200 ms
after it arrived (Linux does, when sending it would not open its window), so a timeout
of exactly 200 ms after the send races that ACK and fires spuriously. Measured here at
5 % loss against a Linux receiver: 10 of 12 RTOs per 20 MB were spurious before."""

from __future__ import annotations


class RtoEstimator:
    __slots__ = ("backoff", "max_rto", "min_rto", "rto", "rttvar", "srtt")

    def __init__(self, initial: float = 1.0, min_rto: float = 0.2, max_rto: float = 120.0):
        self.srtt: float | None = None
        self.rttvar = 0.0
        self.rto = initial  # RFC 6298 2.1: 1 second before the first measurement
        self.min_rto = min_rto
        self.max_rto = max_rto
        self.backoff = 0

    def sample(self, rtt: float) -> None:
        """RFC 6298 2.2/2.3, alpha 1/8, beta 1/4, K = 4, G and the floor folded into the
        variance term (see above)."""
        rtt = max(rtt, 0.0)
        if self.srtt is None:
            self.srtt = rtt
            self.rttvar = rtt / 2
        else:
            self.rttvar = 0.75 * self.rttvar + 0.25 * abs(self.srtt - rtt)
            self.srtt = 0.875 * self.srtt + 0.125 * rtt
        self.backoff = 0
        self.rto = min(self.srtt + max(4 * self.rttvar, self.min_rto), self.max_rto)

    def current(self) -> float:
        """The timeout to arm now, with exponential backoff (RFC 6298 5.5)."""
        return min(self.rto * (1 << self.backoff), self.max_rto)

    def back_off(self) -> None:
        self.backoff = min(self.backoff + 1, 16)
