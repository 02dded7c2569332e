"""One Ethernet interface of a node: the link layer only.

Its MAC, MTU, Ethernet demultiplexing, its own ARP engine and neighbour cache, and its
addresses (several, each with a prefix length). IPv4 above it belongs to the node; an
interface hands IPv4 packets up through `deliver` and sends them down with `send_ipv4`.
Frames to transmit collect in `tx` until the node's poll hands them to the runtime.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from stack.counters import Counters
from stack.net.arp import ArpConfig, ArpEngine
from stack.trace import OFF, Trace
from stack.wire.ethernet import (
    BROADCAST_MAC,
    ETH_HEADER,
    ETH_HLEN,
    ETHERTYPE_ARP,
    ETHERTYPE_IPV4,
    build_ethernet,
    mac_to_str,
)
from stack.wire.ipv4 import ip_to_str
from stack.wire.virtio import offload_mode

COUNTERS = (
    "link.rx_frames", "link.rx_bytes", "link.tx_frames", "link.tx_bytes",
    "eth.rx_runt", "eth.rx_not_for_us", "eth.rx_bad_source", "eth.rx_unknown_ethertype",
)

# (interface, IPv4 packet, now, checksum trusted, arrived as link broadcast, vnet header)
Deliver = Callable[["Interface", memoryview, float, bool, bool, "bytes | memoryview | None"],
                   None]

Frame = bytes | tuple[bytes, bytes]  # a frame, or (frame, virtio-net header) when offloaded


def _mask(prefixlen: int) -> int:
    return (0xFFFFFFFF << (32 - prefixlen)) & 0xFFFFFFFF


@dataclass(slots=True)
class InterfaceConfig:
    name: str
    mac: bytes
    addresses: list[tuple[bytes, int]] = field(default_factory=list)  # (address, prefix)
    mtu: int = 1500
    arp: ArpConfig = field(default_factory=ArpConfig)
    offload: str = ""  # virtio-net headers: "csum" (checksum offload) or "tso" (and TSO/GSO)


class Interface:
    trace: Trace = OFF  # the node's, once added to one
    def __init__(self, index: int, config: InterfaceConfig, deliver: Deliver,
                 on_unresolved: Callable[[list, float], None] | None = None) -> None:
        self.index = index
        self.config = config
        self.name = config.name
        self.mac = config.mac
        self.mtu = config.mtu
        self.offload = offload_mode(config.offload)  # True (older callers) means "tso"
        self.counters = Counters()
        self.counters.declare(*COUNTERS)
        self.hot = self.counters.hot  # link.rx_frames and link.rx_bytes (counters.py)
        self.tx: list[Frame] = []
        self._deliver = deliver
        self.addresses: list[tuple[bytes, int]] = []
        self.local: set[bytes] = set()  # our addresses on this interface
        self.directed_broadcasts: set[bytes] = set()
        self._subnets: list[tuple[int, int, bytes]] = []  # (network, mask, our address)
        for address, prefixlen in config.addresses:
            self.add_address(address, prefixlen)
        self.arp = ArpEngine(self, config.arp, self.counters, self.tx.append, on_unresolved)

    # -- addresses ------------------------------------------------------------------------

    def add_address(self, address: bytes, prefixlen: int) -> None:
        if address in self.local:
            raise ValueError("address already on this interface")
        self.addresses.append((address, prefixlen))
        self.local.add(address)
        mask = _mask(prefixlen)
        network = int.from_bytes(address, "big") & mask
        self._subnets.append((network, mask, address))
        if prefixlen < 31:  # RFC 3021: a /31 has no broadcast address
            self.directed_broadcasts.add((network | (~mask & 0xFFFFFFFF)).to_bytes(4, "big"))

    @property
    def primary(self) -> bytes | None:
        return self.addresses[0][0] if self.addresses else None

    def source_for(self, dst: bytes) -> bytes | None:
        """Our address on `dst`'s subnet, else the primary one (RFC 1122 3.3.4.3)."""
        addr = int.from_bytes(dst, "big")
        for network, mask, ours in self._subnets:
            if addr & mask == network:
                return ours
        return self.primary

    def on_link(self, dst: bytes) -> bool:
        addr = int.from_bytes(dst, "big")
        return any(addr & mask == network for network, mask, _ in self._subnets)

    # -- input ----------------------------------------------------------------------------

    def start(self, now: float) -> None:
        self.arp.start(now)

    def receive(self, frame: bytes | bytearray | memoryview, now: float,
                checksum_trusted: bool = False,
                vnet: bytes | memoryview | None = None) -> None:
        """One Ethernet frame (without FCS). Exceptions are the node's to catch."""
        c = self.counters
        hot = self.hot
        hot.link_rx_frames += 1
        hot.link_rx_bytes += len(frame)
        if len(frame) < ETH_HLEN:
            c["eth.rx_runt"] += 1
            return
        dst, src, ethertype = ETH_HEADER.unpack_from(frame, 0)
        broadcast = dst == BROADCAST_MAC
        if dst != self.mac and not broadcast:
            c["eth.rx_not_for_us"] += 1  # other unicast, or multicast we never joined
            return
        if src[0] & 1:
            c["eth.rx_bad_source"] += 1  # a group address cannot send
            return
        if ethertype == ETHERTYPE_IPV4:
            self._deliver(self, memoryview(frame)[ETH_HLEN:], now, checksum_trusted, broadcast,
                          vnet)
        elif ethertype == ETHERTYPE_ARP:
            self.arp.receive(memoryview(frame)[ETH_HLEN:], now)
        else:
            c["eth.rx_unknown_ethertype"] += 1

    # -- output ---------------------------------------------------------------------------

    def send_ipv4(self, packet: bytes | bytearray, next_hop: bytes, now: float,
                  vnet: bytes | None = None) -> None:
        """Frame an IPv4 packet for `next_hop`, resolving it first if needed."""
        mac = self.arp.lookup(next_hop, now)
        if self.trace.on:
            self.trace.emit("arp", "hit" if mac else "miss", now, iface=self.name,
                            next_hop=ip_to_str(next_hop),
                            **({"mac": mac_to_str(mac)} if mac else {"queued": True}))
        if mac is None:
            self.arp.resolve_and_send(next_hop, packet if vnet is None else (packet, vnet),
                                      now)
            return
        frame = build_ethernet(mac, self.mac, ETHERTYPE_IPV4) + packet
        self.tx.append(frame if vnet is None else (frame, vnet))

    def send_ipv4_broadcast(self, packet: bytes | bytearray) -> None:
        self.tx.append(build_ethernet(BROADCAST_MAC, self.mac, ETHERTYPE_IPV4) + packet)

    def take(self) -> list[Frame]:
        """Hand over every frame waiting to be sent, counting them."""
        out = self.tx[:]
        self.tx.clear()
        c = self.counters
        c["link.tx_frames"] += len(out)
        c["link.tx_bytes"] += sum(len(f) if type(f) is not tuple else len(f[0]) for f in out)
        return out

    def gauges(self) -> dict[str, int]:
        return {"arp.cache_entries": len(self.arp.cache),
                "arp.pending_resolutions": len(self.arp.pending)}
