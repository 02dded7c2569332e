"""A host: a node with one Ethernet interface and forwarding off, driven like one link.

    host.receive(frame, now)   host.poll(now) -> frames   host.next_deadline()

This is what `tapstack run` builds from its flags, and what the unit tests and the
in-memory wire drive: one address, one subnet, one default gateway.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from stack.counters import Counters
from stack.net.arp import ArpConfig
from stack.net.interface import Frame, InterfaceConfig
from stack.net.node import Node, NodeConfig, RouteConfig
from stack.net.reassembly import ReassemblyConfig
from stack.net.tcp.connection import TcpConfig


@dataclass(slots=True)
class HostConfig:
    mac: bytes
    address: bytes
    prefixlen: int = 24
    gateway: bytes | None = None
    mtu: int = 1500
    arp: ArpConfig = field(default_factory=ArpConfig)
    tcp: TcpConfig = field(default_factory=TcpConfig)
    reassembly: ReassemblyConfig = field(default_factory=ReassemblyConfig)
    offload: str = ""  # virtio-net headers: "csum" (checksum offload) or "tso" (and TSO/GSO)
    name: str = "eth0"

    def node_config(self) -> NodeConfig:
        iface = InterfaceConfig(self.name, self.mac, [(self.address, self.prefixlen)],
                                self.mtu, self.arp, self.offload)
        routes = [RouteConfig("default", self.gateway)] if self.gateway else []
        return NodeConfig(interfaces=[iface], routes=routes, tcp=self.tcp,
                          reassembly=self.reassembly)


class Host:
    """One-interface view of a Node: frames in and out without interface indexes."""

    def __init__(self, config: HostConfig, rng: random.Random | None = None) -> None:
        self.config = config
        self.node = Node(config.node_config(), rng)
        self.iface = self.node.interfaces[0]
        self.mac = config.mac
        self.address = config.address
        self.ipv4 = self.node.ipv4
        self.icmp = self.node.icmp
        self.tcp = self.node.tcp
        self.udp = self.node.udp
        self.arp = self.iface.arp

    @property
    def counters(self) -> Counters:
        """Every counter of the host (a snapshot: read it, do not write to it)."""
        return self.node.all_counters()

    @property
    def last_internal_error(self) -> str | None:
        return self.node.last_internal_error

    def start(self, now: float) -> None:
        self.node.start(now)

    def receive(self, frame: bytes | bytearray | memoryview, now: float,
                checksum_trusted: bool = False) -> None:
        self.node.receive(0, frame, now, checksum_trusted)

    def poll(self, now: float) -> list[Frame]:
        out = self.node.poll(now)
        return out[0][1] if out else []

    def next_deadline(self) -> float | None:
        return self.node.next_deadline()

    def stats(self) -> dict[str, dict[str, int]]:
        return self.node.stats()
