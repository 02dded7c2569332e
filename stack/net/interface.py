"""One Ethernet interface and everything above it, as a sans-I/O engine.

    iface.receive(frame, now)   feed one frame read from the link
    iface.poll(now)             run due timers, return the frames to transmit
    iface.next_deadline()       when poll() must be called next (None: never)

Nothing here reads a clock or touches a file descriptor; the runtime does.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from stack.net.arp import ArpConfig, ArpEngine
from stack.net.counters import Counters
from stack.net.icmp import IcmpEngine
from stack.net.ipv4 import IPv4Layer
from stack.net.reassembly import ReassemblyConfig
from stack.net.tcp.connection import TcpConfig
from stack.net.tcp.layer import TcpLayer
from stack.net.udp import UdpLayer
from stack.wire.ethernet import (
    BROADCAST_MAC,
    ETH_HEADER,
    ETH_HLEN,
    ETHERTYPE_ARP,
    ETHERTYPE_IPV4,
)

COUNTERS = (
    "link.rx_frames", "link.rx_bytes", "link.tx_frames", "link.tx_bytes",
    "eth.rx_runt", "eth.rx_not_for_us", "eth.rx_bad_source", "eth.rx_unknown_ethertype",
    "stack.internal_errors",
)


@dataclass(slots=True)
class InterfaceConfig:
    mac: bytes
    address: bytes
    prefixlen: int = 24
    gateway: bytes | None = None
    mtu: int = 1500
    arp: ArpConfig = field(default_factory=ArpConfig)
    tcp: TcpConfig = field(default_factory=TcpConfig)
    reassembly: ReassemblyConfig = field(default_factory=ReassemblyConfig)
    offload: bool = False  # the link takes virtio-net headers: checksum offload and TSO


class Interface:
    def __init__(self, config: InterfaceConfig, rng: random.Random | None = None) -> None:
        self.config = config
        self.mac = config.mac
        self.counters = Counters()
        self.counters.declare(*COUNTERS)
        self.rng = rng or random.Random()
        # frames to send: bytes, or (frame, virtio-net header) when offloaded
        self._tx: list[bytes | tuple[bytes, bytes]] = []
        self.arp = ArpEngine(config.mac, config.address, config.arp, self.counters,
                             self._tx.append)
        self.ipv4 = IPv4Layer(config.mac, config.address, config.prefixlen, config.gateway,
                              config.mtu, self.arp, self.counters, self._tx.append, self.rng,
                              config.reassembly)
        self.icmp = IcmpEngine(self.ipv4, self.counters)
        self.tcp = TcpLayer(self.ipv4, self.counters, config.tcp, self.rng)
        self.udp = UdpLayer(self.ipv4, self.counters, self.rng)
        self.tcp.offload = config.offload
        self.last_internal_error: str | None = None

    def start(self, now: float) -> None:
        self.arp.start(now)

    def receive(self, frame: bytes | bytearray | memoryview, now: float,
                checksum_trusted: bool = False) -> None:
        """Process one Ethernet frame (without FCS). Never raises. `checksum_trusted`:
        the link's virtio-net header says the kernel owns or verified the checksums."""
        c = self.counters
        c["link.rx_frames"] += 1
        c["link.rx_bytes"] += len(frame)
        if len(frame) < ETH_HLEN:
            c["eth.rx_runt"] += 1
            return
        dst, src, ethertype = ETH_HEADER.unpack_from(frame, 0)
        if dst != self.mac and dst != BROADCAST_MAC:
            c["eth.rx_not_for_us"] += 1  # other unicast, or multicast we never joined
            return
        if src[0] & 1:
            c["eth.rx_bad_source"] += 1  # a group address cannot send
            return
        try:
            if ethertype == ETHERTYPE_IPV4:
                self.ipv4.receive(memoryview(frame)[ETH_HLEN:], now, checksum_trusted)
            elif ethertype == ETHERTYPE_ARP:
                self.arp.receive(memoryview(frame)[ETH_HLEN:], now)
            else:
                c["eth.rx_unknown_ethertype"] += 1
        except Exception as exc:  # a bug, never the peer's fault: count it, keep serving
            c["stack.internal_errors"] += 1
            self.last_internal_error = f"{type(exc).__name__}: {exc}"

    def poll(self, now: float) -> list[bytes | tuple[bytes, bytes]]:
        """Run timers that are due and hand over every frame waiting to be sent."""
        self.arp.poll(now)
        self.ipv4.poll(now)
        self.tcp.poll(now)
        if not self._tx:
            return []
        out = self._tx[:]
        self._tx.clear()
        c = self.counters
        c["link.tx_frames"] += len(out)
        c["link.tx_bytes"] += sum(len(f) if type(f) is not tuple else len(f[0]) for f in out)
        return out

    def next_deadline(self) -> float | None:
        times = [t for t in (self.arp.next_deadline(), self.ipv4.next_deadline(),
                             self.tcp.next_deadline()) if t is not None]
        return min(times) if times else None

    def gauges(self) -> dict[str, int]:
        """Current sizes of the bounded tables, for stats."""
        return {
            "arp.cache_entries": len(self.arp.cache),
            "arp.pending_resolutions": len(self.arp.pending),
            "ipv4.reasm_datagrams_held": len(self.ipv4.reassembler.pending),
            "ipv4.reasm_bytes_held": self.ipv4.reassembler.bytes,
            "ipv4.pmtu_entries": len(self.ipv4.pmtu),
            "udp.endpoints": len(self.udp.endpoints),
            **self.tcp.gauges(),
        }

    def stats(self) -> dict[str, dict[str, int]]:
        snapshot = Counters(self.counters)
        snapshot.update(self.gauges())
        return snapshot.grouped()
