"""The routing table: connected, static and default routes, longest-prefix match
(RFC 1812 5.2.4.3), and a per-destination cache so the hot path pays one dict lookup.

A route says where a datagram leaves (an interface index), to which next hop (its
gateway, or the destination itself on a connected route) and, for locally originated
datagrams, which source address to use (the interface's address on that subnet).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from stack.wire.ipv4 import ip_to_str

CACHE_LIMIT = 4096  # destinations remembered; the cache is cleared when it fills

PROTO_KERNEL = "kernel"  # a connected route, derived from an interface address
PROTO_STATIC = "static"


@dataclass(frozen=True, slots=True)
class Route:
    network: int  # the prefix, as an integer
    prefixlen: int
    ifindex: int
    gateway: bytes | None  # None: the destination is on the link
    metric: int = 0
    source: bytes | None = None  # preferred source address (connected routes)
    proto: str = PROTO_STATIC

    @property
    def mask(self) -> int:
        return (0xFFFFFFFF << (32 - self.prefixlen)) & 0xFFFFFFFF

    def prefix_str(self) -> str:
        if self.prefixlen == 0:
            return "default"
        net = ip_to_str(self.network.to_bytes(4, "big"))
        return net if self.prefixlen == 32 else f"{net}/{self.prefixlen}"


def parse_prefix(text: str) -> tuple[int, int]:
    """'10.0.0.0/8' or 'default' -> (network as int, prefix length). ValueError if the
    text is not a prefix or has host bits set."""
    if text == "default":
        return 0, 0
    net = ipaddress.IPv4Network(text)  # strict: host bits set is a ValueError
    return int(net.network_address), net.prefixlen


class RouteTable:
    def __init__(self) -> None:
        self.routes: list[Route] = []
        # prefix length -> {network: best route}; lengths searched longest first
        self._by_len: dict[int, dict[int, Route]] = {}
        self._lengths: list[int] = []
        self._cache: dict[bytes, Route | None] = {}
        self.generation = 0  # bumped on every change, for callers that cache routes

    def add(self, route: Route) -> None:
        if route.network & ~route.mask & 0xFFFFFFFF:
            raise ValueError(f"{ip_to_str(route.network.to_bytes(4, 'big'))}/"
                             f"{route.prefixlen} has host bits set")
        for old in self.routes:
            if (old.network, old.prefixlen, old.metric) == (route.network, route.prefixlen,
                                                            route.metric):
                raise ValueError(f"route {route.prefix_str()} metric {route.metric} "
                                 "already exists")
        self.routes.append(route)
        self._rebuild()

    def remove(self, network: int, prefixlen: int, ifindex: int | None = None) -> int:
        """Remove matching routes (on `ifindex` only, if given); returns how many."""
        keep = [r for r in self.routes
                if not (r.network == network and r.prefixlen == prefixlen
                        and (ifindex is None or r.ifindex == ifindex))]
        removed = len(self.routes) - len(keep)
        self.routes = keep
        self._rebuild()
        return removed

    def discard(self, route: Route) -> None:
        """Remove this very route (`ip route del` removes one of several alike)."""
        self.routes = [r for r in self.routes if r is not route]
        self._rebuild()

    def _rebuild(self) -> None:
        by_len: dict[int, dict[int, Route]] = {}
        for r in self.routes:
            slot = by_len.setdefault(r.prefixlen, {})
            best = slot.get(r.network)
            # equal prefixes: the lowest metric wins, then the one added first
            if best is None or r.metric < best.metric:
                slot[r.network] = r
        self._by_len = by_len
        self._lengths = sorted(by_len, reverse=True)
        self._cache.clear()
        self.generation += 1

    def lookup(self, dst: bytes) -> Route | None:
        """The route for `dst`: the longest matching prefix (RFC 1812 5.2.4.3), then the
        lowest metric."""
        cache = self._cache
        try:
            return cache[dst]
        except KeyError:
            pass
        addr = int.from_bytes(dst, "big")
        found = None
        for plen in self._lengths:
            mask = (0xFFFFFFFF << (32 - plen)) & 0xFFFFFFFF
            found = self._by_len[plen].get(addr & mask)
            if found is not None:
                break
        if len(cache) >= CACHE_LIMIT:
            cache.clear()
        cache[dst] = found
        return found

    def sorted_routes(self) -> list[Route]:
        """As `ip route` lists them: default first, then by prefix."""
        return sorted(self.routes, key=lambda r: (r.prefixlen != 0, r.network, -r.prefixlen,
                                                  r.metric))
