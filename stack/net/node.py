"""A node: N interfaces, one IPv4 layer with its routing table and hook points, and one
ICMP, UDP and TCP layer, as a sans-I/O engine.

    node.receive(ifindex, frame, now)   feed one frame read from an interface's link
    node.poll(now)                      run due timers; [(interface, frames to send)]
    node.next_deadline()                when poll() must be called next (None: never)

A host is a node with forwarding off; a router is a node with forwarding on. Nothing
here reads a clock or touches a file descriptor; the runtime does.

Application callbacks (an accept's connection_made, data_received) run inside
receive() and poll(): the engine calls the transport, which calls the protocol. That
keeps one frame's consequences in one pass (a request and its response leave in the
same flush); a protocol must not block, exactly as under asyncio.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from stack.counters import Counters
from stack.net.icmp import IcmpEngine
from stack.net.interface import Frame, Interface, InterfaceConfig
from stack.net.ipv4 import IPv4Layer
from stack.net.reassembly import ReassemblyConfig
from stack.net.route import PROTO_KERNEL, PROTO_STATIC, Route, RouteTable, parse_prefix
from stack.net.tcp.connection import TcpConfig
from stack.net.tcp.layer import TcpLayer
from stack.net.udp import UdpLayer
from stack.trace import Trace
from stack.wire.ipv4 import ip_to_str

COUNTERS = ("stack.internal_errors",)


@dataclass(slots=True)
class RouteConfig:
    prefix: str  # "10.0.0.0/8" or "default"
    gateway: bytes | None = None
    interface: str | None = None  # leave by this interface (on-link when no gateway)
    metric: int = 0


@dataclass(slots=True)
class NodeConfig:
    name: str = "tapstack"
    interfaces: list[InterfaceConfig] = field(default_factory=list)
    routes: list[RouteConfig] = field(default_factory=list)
    forwarding: bool = False
    tcp: TcpConfig = field(default_factory=TcpConfig)
    reassembly: ReassemblyConfig = field(default_factory=ReassemblyConfig)


class Node:
    def __init__(self, config: NodeConfig, rng: random.Random | None = None) -> None:
        self.config = config
        self.name = config.name
        self.rng = rng or random.Random()
        self.counters = Counters()
        self.counters.declare(*COUNTERS)
        self.interfaces: list[Interface] = []
        self.routes = RouteTable()
        self.ipv4 = IPv4Layer(self.interfaces, self.routes, self.counters, self.rng,
                              config.reassembly, config.forwarding)
        self.icmp = IcmpEngine(self.ipv4, self.counters)
        self.tcp = TcpLayer(self.ipv4, self.counters, config.tcp, self.rng)
        self.tcp.on_internal_error = self._internal_error
        self.udp = UdpLayer(self.ipv4, self.counters, self.rng)
        self.trace = Trace(self.name, self.counters)  # on while someone listens
        self.ipv4.trace = self.tcp.trace = self.trace
        self.last_internal_error: str | None = None
        # more engines with timers (a middlebox's connection tracker): poll(now) and
        # next_deadline()
        self.timers: list = []
        self.middlebox = None  # connection tracking, NAT and filters, once installed
        for ic in config.interfaces:
            self.add_interface(ic)
        for rc in config.routes:
            self.add_route(rc)

    @property
    def forwarding(self) -> bool:
        return self.ipv4.forwarding

    @forwarding.setter
    def forwarding(self, on: bool) -> None:
        self.ipv4.forwarding = on

    # -- configuration --------------------------------------------------------------------

    def add_interface(self, config: InterfaceConfig) -> Interface:
        if any(i.name == config.name for i in self.interfaces):
            raise ValueError(f"interface {config.name} exists already")
        iface = Interface(len(self.interfaces), config, self.ipv4.receive, self.ipv4.unresolved)
        iface.trace = iface.arp.trace = self.trace
        self.interfaces.append(iface)
        for address, prefixlen in iface.addresses:
            self._connected_route(iface, address, prefixlen)
        self.ipv4.addresses_changed()
        self.tcp.offload = any(i.offload for i in self.interfaces)
        return iface

    def add_address(self, ifname: str, address: bytes, prefixlen: int) -> None:
        iface = self.interface(ifname)
        iface.add_address(address, prefixlen)
        self._connected_route(iface, address, prefixlen)
        self.ipv4.addresses_changed()

    def _connected_route(self, iface: Interface, address: bytes, prefixlen: int) -> None:
        mask = (0xFFFFFFFF << (32 - prefixlen)) & 0xFFFFFFFF
        network = int.from_bytes(address, "big") & mask
        if any(r.network == network and r.prefixlen == prefixlen and r.proto == PROTO_KERNEL
               for r in self.routes.routes):
            return  # a second address in a subnet we already reach
        self.routes.add(Route(network, prefixlen, iface.index, None, 0, address, PROTO_KERNEL))

    def interface(self, name: str) -> Interface:
        for iface in self.interfaces:
            if iface.name == name:
                return iface
        raise ValueError(f"no interface named {name}")

    def add_route(self, rc: RouteConfig) -> Route:
        """A static route. Without an interface, the gateway must be on the subnet of one
        of ours (RFC 1812 5.2.4: the next hop is a neighbour). ValueError otherwise."""
        try:
            network, prefixlen = parse_prefix(rc.prefix)
        except ValueError:
            raise ValueError(f"{rc.prefix!r} is not a prefix like 10.0.0.0/8 or 'default' "
                             "(host bits must be zero)") from None
        if rc.interface is not None:
            iface = self.interface(rc.interface)
            if rc.gateway is not None and not iface.on_link(rc.gateway):
                raise ValueError(f"gateway {ip_to_str(rc.gateway)} is not on the subnet of "
                                 f"{iface.name} (a next hop must be a neighbour)")
        elif rc.gateway is not None:
            found = [i for i in self.interfaces if i.on_link(rc.gateway)]
            if not found:
                raise ValueError(f"gateway {ip_to_str(rc.gateway)} is not on the subnet of "
                                 "any interface")
            iface = found[0]
        else:
            raise ValueError(f"route {rc.prefix} needs a gateway or an interface")
        route = Route(network, prefixlen, iface.index, rc.gateway, rc.metric,
                      None, PROTO_STATIC)
        self.routes.add(route)
        return route

    def remove_route(self, prefix: str, metric: int | None = None,
                     gateway: bytes | None = None) -> Route:
        """Remove one static route for `prefix` (of that metric, through that gateway,
        if given; the lowest metric first), as `ip route del` does; connected routes
        stay while their address does. ValueError if none matches."""
        try:
            network, prefixlen = parse_prefix(prefix)
        except ValueError:
            raise ValueError(f"{prefix!r} is not a prefix like 10.0.0.0/8 or 'default'") \
                from None
        matching = sorted((r for r in self.routes.routes
                           if (r.network, r.prefixlen) == (network, prefixlen)
                           and r.proto == PROTO_STATIC and metric in (None, r.metric)
                           and gateway in (None, r.gateway)), key=lambda r: r.metric)
        if not matching:
            raise ValueError(f"no static route to {prefix}"
                             + (f" metric {metric}" if metric is not None else "")
                             + (f" via {ip_to_str(gateway)}" if gateway else ""))
        self.routes.discard(matching[0])
        return matching[0]

    # -- the frame path -------------------------------------------------------------------

    def start(self, now: float) -> None:
        for iface in self.interfaces:
            iface.start(now)

    def receive(self, ifindex: int, frame: bytes | bytearray | memoryview, now: float,
                checksum_trusted: bool = False, vnet: bytes | memoryview | None = None
                ) -> None:
        """Process one Ethernet frame (without FCS) that arrived on interface `ifindex`.
        Never raises: a bug is counted in stack.internal_errors, never the peer's fault."""
        if self.trace.on:
            self.trace.now = now
        try:
            self.interfaces[ifindex].receive(frame, now, checksum_trusted, vnet)
        except Exception as exc:
            self._internal_error(exc)

    def receive_ipv4(self, ifindex: int, packet: bytes | memoryview, now: float,
                     checksum_trusted: bool = False, link_broadcast: bool = False) -> None:
        """An IPv4 datagram that came in on interface `ifindex` through another worker
        (stack/workers.py), without its Ethernet header. Never raises."""
        if self.trace.on:
            self.trace.now = now
        try:
            self.ipv4.receive(self.interfaces[ifindex], memoryview(packet), now,
                              checksum_trusted, link_broadcast)
        except Exception as exc:
            self._internal_error(exc)

    def _internal_error(self, exc: Exception) -> None:
        self.counters["stack.internal_errors"] += 1
        self.last_internal_error = f"{type(exc).__name__}: {exc}"

    def poll(self, now: float) -> list[tuple[Interface, list[Frame]]]:
        """Run timers that are due; hand over every frame waiting, per interface."""
        if self.trace.on:
            self.trace.now = now
            self.trace.frame = None  # what leaves is numbered as it is written
        for iface in self.interfaces:
            iface.arp.poll(now)
        self.ipv4.poll(now)
        for engine in self.timers:
            engine.poll(now)
        self.tcp.poll(now)
        return [(iface, iface.take()) for iface in self.interfaces if iface.tx]

    def next_deadline(self) -> float | None:
        times = [iface.arp.next_deadline() for iface in self.interfaces]
        times += [self.ipv4.next_deadline(), self.tcp.next_deadline()]
        times += [engine.next_deadline() for engine in self.timers]
        due = [t for t in times if t is not None]
        return min(due) if due else None

    # -- observation ----------------------------------------------------------------------

    def neighbour_mac(self, ip: bytes) -> bytes | None:
        """The MAC a neighbour last announced, from whichever interface's cache has it."""
        for iface in self.interfaces:
            entry = iface.arp.cache.get(ip)
            if entry is not None:
                return entry[0]
        return None

    def gauges(self) -> dict[str, int]:
        """Current sizes of the bounded tables, for stats."""
        g = {
            "arp.cache_entries": sum(len(i.arp.cache) for i in self.interfaces),
            "arp.pending_resolutions": sum(len(i.arp.pending) for i in self.interfaces),
            "ipv4.reasm_datagrams_held": len(self.ipv4.reassembler.pending),
            "ipv4.reasm_bytes_held": self.ipv4.reassembler.bytes,
            "ipv4.pmtu_entries": len(self.ipv4.pmtu),
            "ipv4.routes": len(self.routes.routes),
            "udp.endpoints": len(self.udp.endpoints),
        }
        g.update(self.tcp.gauges())
        if self.middlebox is not None:
            g.update(self.middlebox.gauges())
        return g

    def all_counters(self) -> Counters:
        """The node's counters with every interface's link, Ethernet and ARP counters
        summed in."""
        total = self.counters.snapshot()
        for iface in self.interfaces:
            total.update(iface.counters.snapshot())
        return total

    def stats(self) -> dict[str, dict[str, int]]:
        snapshot = self.all_counters()
        snapshot.update(self.gauges())
        return snapshot.grouped()

    def interface_stats(self) -> dict[str, dict[str, dict[str, int]]]:
        out = {}
        for iface in self.interfaces:
            snapshot = iface.counters.snapshot()
            snapshot.update(iface.gauges())
            out[iface.name] = snapshot.grouped()
        return out
