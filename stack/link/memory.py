"""Two stations joined by an in-memory wire, under a virtual clock.

This is how the hardest TCP behaviour is tested in milliseconds: loss, reordering,
duplication and corruption on a seeded schedule, timeouts without waiting.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from stack.link.impair import Impairment


class Station(Protocol):
    """Anything with one link to drive: a host of stack.net.host, for instance."""

    def start(self, now: float) -> None: ...
    def receive(self, frame: bytes, now: float) -> None: ...
    def poll(self, now: float) -> list: ...
    def next_deadline(self) -> float | None: ...


class MemoryWire:
    def __init__(self, a: Station, b: Station, a_to_b: Impairment | None = None,
                 b_to_a: Impairment | None = None, now: float = 0.0) -> None:
        self.a, self.b = a, b
        self.a_to_b = a_to_b or Impairment(prefix="wire_ab")
        self.b_to_a = b_to_a or Impairment(prefix="wire_ba")
        self.now = now

    def start(self) -> None:
        self.a.start(self.now)
        self.b.start(self.now)

    def step(self) -> bool:
        """Move every frame and fire every timer due now; advance to the next event.
        False when nothing is left to happen."""
        now = self.now
        for src, imp in ((self.a, self.a_to_b), (self.b, self.b_to_a)):
            for frame in src.poll(now):
                imp.push(frame, now)
        delivered = False
        for dst, imp in ((self.b, self.a_to_b), (self.a, self.b_to_a)):
            for frame in imp.pop_due(now):
                dst.receive(frame, now)
                delivered = True
        if delivered:
            return True
        times = [t for t in (self.a.next_deadline(), self.b.next_deadline(),
                             self.a_to_b.next_deadline(), self.b_to_a.next_deadline())
                 if t is not None]
        if not times:
            return False
        # a deadline that is already due was just served by poll(): step past it
        self.now = max(min(times), now + 1e-6)
        return True

    def run(self, until: Callable[[], bool] | None = None, timeout: float = 600.0) -> float:
        """Run until `until()` holds (checked after every step), nothing is left to do, or
        `timeout` virtual seconds pass. Returns the virtual time."""
        limit = self.now + timeout
        while self.now <= limit:
            if until is not None and until():
                return self.now
            if not self.step():
                break
        return self.now
