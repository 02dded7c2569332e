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


class _VirtualTime:
    """Driving a simulation: step() until a condition holds or nothing is left."""

    now: float

    def step(self) -> bool:
        raise NotImplementedError

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


class MemoryWire(_VirtualTime):
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



class Port:
    """One interface of a node plugged into a segment of a MemoryLan, with the faults of
    what it sends."""

    __slots__ = ("ifindex", "node", "queue", "segment")

    def __init__(self, node: object, ifindex: int, segment: str, queue: Impairment) -> None:
        self.node = node
        self.ifindex = ifindex
        self.segment = segment
        self.queue = queue


class MemoryLan(_VirtualTime):
    """Whole networks in one process: nodes (anything with receive(ifindex, frame, now),
    poll(now) -> [(interface with .index, frames)], next_deadline(), start(now)) whose
    interfaces sit on named segments. A segment is a hub: every frame reaches every other
    port on it (interfaces drop what is not for their MAC), after the sending port's
    impairment, if any."""

    def __init__(self, now: float = 0.0) -> None:
        self.now = now
        self.ports: dict[tuple[int, int], Port] = {}  # (id(node), ifindex) -> port
        self.nodes: list = []

    def plug(self, node: object, ifindex: int, segment: str,
             impair: Impairment | None = None) -> None:
        if node not in self.nodes:
            self.nodes.append(node)
        self.ports[(id(node), ifindex)] = Port(
            node, ifindex, segment, impair or Impairment(prefix=f"lan_{segment}"))

    def start(self) -> None:
        for node in self.nodes:
            node.start(self.now)

    def step(self) -> bool:
        """Move every frame and fire every timer due now; advance to the next event.
        False when nothing is left to happen."""
        now = self.now
        for node in self.nodes:
            for iface, frames in node.poll(now):
                port = self.ports.get((id(node), iface.index))
                if port is None:
                    continue  # an interface plugged nowhere: its frames go nowhere
                for frame in frames:
                    port.queue.push(frame[0] if type(frame) is tuple else frame, now)
        delivered = False
        for sender in self.ports.values():
            for frame in sender.queue.pop_due(now):
                for port in self.ports.values():
                    if port.segment == sender.segment and port is not sender:
                        port.node.receive(port.ifindex, frame, now)
                        delivered = True
        if delivered:
            return True
        times = [t for t in (*(n.next_deadline() for n in self.nodes),
                             *(p.queue.next_deadline() for p in self.ports.values()))
                 if t is not None]
        if not times:
            return False
        self.now = max(min(times), now + 1e-6)  # step past a deadline poll() just served
        return True
