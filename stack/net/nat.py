"""NAT: source NAT ("masquerade") with endpoint-independent mapping (RFC 4787, RFC 5382,
RFC 5508), static 1:1 NAT and port forwards (destination NAT), per-subscriber port
limits (RFC 6888, for carrier-grade NAT).

A mapping ties an inside endpoint (protocol, address, port or ICMP identifier) to a
public one, for every destination alike (endpoint-independent mapping, RFC 4787 REQ-1):
the same inside port appears as the same public port to every server. The inside port
is kept when it is free (port preservation, REQ-3), else a random free one from the
range is taken. A mapping lives as long as a tracked flow uses it.

Filtering decides which unsolicited inbound packets may use a mapping (RFC 4787 REQ-8):
"endpoint" (any), "address" (from an address the inside endpoint has sent to), or
"address-port" (from an address and port it has sent to). The default is "address": of
the two behaviours RFC 4787 and RFC 5382 recommend, the one that lets through only hosts
the inside endpoint chose to talk to, while still letting peer-to-peer applications
(hole punching through a server's introduction) work.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from stack.counters import Counters

FILTERING = ("endpoint", "address", "address-port")
PEERS_PER_MAPPING = 256  # remembered destinations (filtering); the oldest is forgotten

COUNTERS = (
    "nat.mappings_created", "nat.mappings_released", "nat.ports_exhausted",
    "nat.subscriber_limit", "nat.filtered", "nat.unsolicited", "nat.hairpinned",
    "nat.translated_errors", "nat.static", "nat.forwarded_ports",
)


@dataclass(slots=True)
class Masquerade:
    """Source NAT for what leaves by `interface`: inside sources (all, or those in
    `sources`) take `address` (default: the interface's first address)."""

    interface: str
    address: bytes | None = None
    sources: list[tuple[int, int]] | None = None  # (network, mask); None: any not ours

    def covers(self, src: bytes) -> bool:
        if self.sources is None:
            return True
        value = int.from_bytes(src, "big")
        return any(value & mask == network for network, mask in self.sources)


@dataclass(slots=True)
class StaticNat:
    """1:1: `public` stands for `private` both ways, every port (an internet gateway's
    elastic address)."""

    public: bytes
    private: bytes


@dataclass(slots=True)
class PortForward:
    protocol: int
    public: bytes
    port: int
    private: bytes
    private_port: int


@dataclass(slots=True)
class NatConfig:
    masquerade: list[Masquerade] = field(default_factory=list)
    static: list[StaticNat] = field(default_factory=list)
    forwards: list[PortForward] = field(default_factory=list)
    port_range: tuple[int, int] = (1024, 65535)
    filtering: str = "address"
    ports_per_subscriber: int = 0  # 0: no limit (RFC 6888 REQ-4 for carrier-grade NAT)

    @property
    def enabled(self) -> bool:
        return bool(self.masquerade or self.static or self.forwards)


class Mapping:
    __slots__ = ("flows", "inside", "iport", "peers", "pport", "protocol", "public")

    def __init__(self, protocol: int, inside: bytes, iport: int, public: bytes,
                 pport: int) -> None:
        self.protocol = protocol
        self.inside = inside
        self.iport = iport
        self.public = public
        self.pport = pport
        self.flows = 0
        self.peers: dict[tuple[bytes, int], None] = {}  # (address, port) sent to

    def remember(self, address: bytes, port: int) -> None:
        key = (address, port)
        if key not in self.peers:
            if len(self.peers) >= PEERS_PER_MAPPING:
                del self.peers[next(iter(self.peers))]
            self.peers[key] = None

    def admits(self, filtering: str, address: bytes, port: int) -> bool:
        if filtering == "endpoint":
            return True
        if filtering == "address-port":
            return (address, port) in self.peers
        return any(a == address for a, _ in self.peers)


class NatTable:
    """The mappings, both ways, and the port allocator."""

    def __init__(self, config: NatConfig, counters: Counters, rng: random.Random) -> None:
        self.config = config
        self.counters = counters
        self.rng = rng
        self.by_inside: dict[tuple[int, bytes, int, bytes], Mapping] = {}
        self.by_public: dict[tuple[int, bytes, int], Mapping] = {}
        self.per_subscriber: dict[bytes, int] = {}
        self.idle: set[Mapping] = set()  # no confirmed flow holds them (yet, or any more)
        self.port_in_use_locally = lambda protocol, address, port: False
        # (protocol, src, sport, dst, dport) -> True when a tracked flow has that tuple
        self.tuple_in_use = lambda t: False
        counters.declare(*COUNTERS)

    def public_port_taken(self, protocol: int, public: bytes, port: int,
                          remote: tuple[bytes, int] | None = None) -> bool:
        """The port is a mapping's, a port forward's, a local socket's, or (towards
        `remote`) already the public end of a tracked flow (as after a socket closed
        while its flow lingers in TIME-WAIT)."""
        if (protocol, public, port) in self.by_public or \
                self.port_in_use_locally(protocol, public, port):
            return True
        if any(f.protocol == protocol and f.public == public and f.port == port
               for f in self.config.forwards):
            return True
        if remote is not None:
            rport = port if protocol == 1 else remote[1]
            return self.tuple_in_use((protocol, remote[0], rport, public, port))
        return False

    def mapping_for(self, protocol: int, inside: bytes, iport: int, public: bytes,
                    remote: tuple[bytes, int] | None = None) -> Mapping | None:
        """The inside endpoint's mapping on `public`, made if needed (None: no port left,
        or the subscriber's limit reached; counted). A new mapping is idle until a flow
        that uses it is confirmed (hold); sweep() drops those no flow took."""
        key = (protocol, inside, iport, public)
        mapping = self.by_inside.get(key)
        if mapping is not None:
            return mapping
        limit = self.config.ports_per_subscriber
        if limit and self.per_subscriber.get(inside, 0) >= limit:
            self.counters["nat.subscriber_limit"] += 1
            return None
        pport = self._allocate(protocol, public, iport, remote)
        if pport is None:
            self.counters["nat.ports_exhausted"] += 1
            return None
        mapping = Mapping(protocol, inside, iport, public, pport)
        self.by_inside[key] = mapping
        self.by_public[(protocol, public, pport)] = mapping
        self.per_subscriber[inside] = self.per_subscriber.get(inside, 0) + 1
        self.counters["nat.mappings_created"] += 1
        self.idle.add(mapping)
        return mapping

    def _allocate(self, protocol: int, public: bytes, wanted: int,
                  remote: tuple[bytes, int] | None) -> int | None:
        low, high = self.config.port_range
        if protocol == 1:
            low, high = 1, 65535  # ICMP identifiers: any non-zero value
        if low <= wanted <= high and \
                not self.public_port_taken(protocol, public, wanted, remote):
            return wanted  # port preservation (RFC 4787 REQ-3)
        span = high - low + 1
        start = self.rng.randrange(span)
        for i in range(span):
            port = low + (start + i) % span
            if not self.public_port_taken(protocol, public, port, remote):
                return port
        return None

    def hold(self, mapping: Mapping) -> None:
        """A confirmed flow uses the mapping."""
        mapping.flows += 1

    def release(self, mapping: Mapping) -> None:
        """A flow that used the mapping is gone; the last one idles it."""
        mapping.flows -= 1
        if mapping.flows <= 0:
            self.idle.add(mapping)

    def sweep(self) -> None:
        """Drop the mappings no flow holds: made for a datagram that was then dropped
        (an ACL, a full table, no route), or left by their last flow."""
        for mapping in self.idle:
            if mapping.flows <= 0:
                self._drop(mapping)
        self.idle.clear()

    def _drop(self, mapping: Mapping) -> None:
        inside = (mapping.protocol, mapping.inside, mapping.iport, mapping.public)
        public = (mapping.protocol, mapping.public, mapping.pport)
        if self.by_inside.get(inside) is not mapping:
            return  # dropped already
        del self.by_inside[inside]
        if self.by_public.get(public) is mapping:
            del self.by_public[public]
        left = self.per_subscriber.get(mapping.inside, 0) - 1
        if left > 0:
            self.per_subscriber[mapping.inside] = left
        else:
            self.per_subscriber.pop(mapping.inside, None)
        self.counters["nat.mappings_released"] += 1

    def inbound(self, protocol: int, public: bytes, port: int) -> Mapping | None:
        return self.by_public.get((protocol, public, port))

    def forward_for(self, protocol: int, public: bytes, port: int) -> PortForward | None:
        for fwd in self.config.forwards:
            if fwd.protocol == protocol and fwd.public == public and fwd.port == port:
                return fwd
        return None

    def static_by_public(self, address: bytes) -> StaticNat | None:
        for rule in self.config.static:
            if rule.public == address:
                return rule
        return None

    def static_by_private(self, address: bytes) -> StaticNat | None:
        for rule in self.config.static:
            if rule.private == address:
                return rule
        return None
