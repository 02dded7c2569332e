"""Hook points on the IPv4 path, named like netfilter's.

    prerouting   every datagram received, before the local-or-forward decision
    input        datagrams for this node, after reassembly, before the transport
    forward      datagrams being routed through, after the TTL is decremented
    output       datagrams this node originates, after the route is chosen
    postrouting  every datagram leaving, forwarded or local, before fragmentation

A handler is `handler(packet, info, now)`: `packet` is a bytearray holding the whole
datagram, which the handler may rewrite in place (fixing the checksums it touches). It
returns the datagram to continue with (the same bytearray, or a new one) or None to drop
it. Handlers run in the order they were added; the first None ends the walk.

An empty hook point costs one truth test of a list on the hot path.
"""

from __future__ import annotations

from collections.abc import Callable

from stack.net.packet import PacketInfo

Handler = Callable[[bytearray, PacketInfo, float], "bytearray | None"]

HOOK_NAMES = ("prerouting", "input", "forward", "output", "postrouting")


class Hooks:
    __slots__ = HOOK_NAMES

    def __init__(self) -> None:
        self.prerouting: list[Handler] = []
        self.input: list[Handler] = []
        self.forward: list[Handler] = []
        self.output: list[Handler] = []
        self.postrouting: list[Handler] = []

    def add(self, name: str, handler: Handler) -> None:
        if name not in HOOK_NAMES:
            raise ValueError(f"no hook point named {name!r} (one of {', '.join(HOOK_NAMES)})")
        getattr(self, name).append(handler)


def run_hooks(handlers: list[Handler], packet: bytearray, info: PacketInfo, now: float
              ) -> bytearray | None:
    for handler in handlers:
        result = handler(packet, info, now)
        if result is None:
            return None
        packet = result
    return packet
