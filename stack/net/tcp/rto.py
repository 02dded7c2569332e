"""Retransmission timeout per RFC 6298, with Linux's 200 ms floor."""

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
        """RFC 6298 2.2/2.3, alpha 1/8, beta 1/4, K = 4, G folded into the floor."""
        rtt = max(rtt, 0.0)
        if self.srtt is None:
            self.srtt = rtt
            self.rttvar = rtt / 2
        else:
            self.rttvar = 0.75 * self.rttvar + 0.25 * abs(self.srtt - rtt)
            self.srtt = 0.875 * self.srtt + 0.125 * rtt
        self.backoff = 0
        self.rto = min(max(self.srtt + 4 * self.rttvar, self.min_rto), self.max_rto)

    def current(self) -> float:
        """The timeout to arm now, with exponential backoff (RFC 6298 5.5)."""
        return min(self.rto * (1 << self.backoff), self.max_rto)

    def back_off(self) -> None:
        self.backoff = min(self.backoff + 1, 16)
