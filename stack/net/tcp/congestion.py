"""Congestion control behind a small interface; NewReno (RFC 5681, RFC 6582) first.

The connection owns loss detection and retransmission; the controller owns cwnd and
ssthresh and is told what happened.
"""

from __future__ import annotations


class CongestionControl:
    """The interface. Sizes are in bytes."""

    cwnd: int
    ssthresh: int

    def on_ack(self, acked: int, mss: int, in_recovery: bool) -> None: ...
    def on_fast_retransmit(self, flight: int, mss: int) -> None: ...
    def on_dupack_in_recovery(self, mss: int) -> None: ...
    def on_partial_ack(self, acked: int, mss: int) -> None: ...
    def on_recovery_exit(self, flight: int, mss: int) -> None: ...
    def on_timeout(self, flight: int, mss: int) -> None: ...


class NewReno(CongestionControl):
    __slots__ = ("_avoid_acc", "cwnd", "ssthresh")

    def __init__(self, mss: int) -> None:
        # RFC 6928: an initial window of ten segments (bounded by 14600 bytes).
        self.cwnd = min(10 * mss, max(2 * mss, 14600))
        self.ssthresh = 1 << 30  # RFC 5681 3.1: arbitrarily high
        self._avoid_acc = 0

    def on_ack(self, acked: int, mss: int, in_recovery: bool) -> None:
        if in_recovery:
            return
        if self.cwnd < self.ssthresh:
            # Slow start counting every byte acknowledged (RFC 3465 without the L limit,
            # as Linux does): stretch ACKs are the norm with GRO and TSO, and L = 2 would
            # grow the window by two segments per 64 KB acknowledged.
            self.cwnd += acked
        else:
            # Congestion avoidance: one MSS per cwnd of data acknowledged.
            self._avoid_acc += acked
            if self._avoid_acc >= self.cwnd:
                self._avoid_acc -= self.cwnd
                self.cwnd += mss

    def on_fast_retransmit(self, flight: int, mss: int) -> None:
        # RFC 5681 3.2 steps 2-3 (RFC 6582 3.2 step 2).
        self.ssthresh = max(flight // 2, 2 * mss)
        self.cwnd = self.ssthresh + 3 * mss

    def on_dupack_in_recovery(self, mss: int) -> None:
        self.cwnd += mss  # RFC 5681 3.2 step 4: inflate for each segment that left

    def on_partial_ack(self, acked: int, mss: int) -> None:
        # RFC 6582 3.2 step 5: deflate by what was acked, add back one MSS.
        self.cwnd = max(self.cwnd - acked + (mss if acked >= mss else 0), mss)

    def on_recovery_exit(self, flight: int, mss: int) -> None:
        # RFC 6582 3.2 step 5 (full ACK), option 1 bounded by the flight size.
        self.cwnd = min(self.ssthresh, max(flight, mss) + mss)

    def on_timeout(self, flight: int, mss: int) -> None:
        # RFC 5681 3.1 equation 4, and a loss window of one segment.
        self.ssthresh = max(flight // 2, 2 * mss)
        self.cwnd = mss
        self._avoid_acc = 0
