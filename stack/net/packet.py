"""What travels with one received datagram besides its bytes: a small value passed down
the layers as an argument, never kept as layer state (a node serves many interfaces)."""

from __future__ import annotations

from typing import Any


class PacketInfo:
    """Per-packet facts. `header` is the IPv4 header as received (an ICMP error about
    the datagram quotes it); `trusted`: the link's virtio-net header says the kernel owns
    or verified the transport checksum; `broadcast`: addressed to a broadcast address;
    `link_broadcast`: arrived in a broadcast Ethernet frame; `vnet`: the virtio-net header
    it came with, when offloads are on (a GSO super-frame keeps it when forwarded);
    `conntrack`: the connection-tracking entry and direction, once a tracker is on the
    hooks; `out_iface`: where the route sends it (forward and postrouting)."""

    __slots__ = ("broadcast", "conntrack", "header", "iface", "link_broadcast", "out_iface",
                 "trusted", "vnet")

    def __init__(self, iface: int, trusted: bool = False, link_broadcast: bool = False,
                 vnet: bytes | memoryview | None = None) -> None:
        self.iface = iface  # index of the interface it arrived on (-1: local output)
        self.out_iface = -1  # index of the interface it leaves by, once routed
        self.trusted = trusted
        self.link_broadcast = link_broadcast
        self.vnet = vnet
        self.header: bytes | memoryview = b""
        self.broadcast = False
        self.conntrack: Any = None

    def quote(self, payload: bytes | memoryview) -> bytes:
        """The datagram as an ICMP error quotes it: its header and 8 bytes of data."""
        return bytes(self.header) + bytes(payload[:8])


LOCAL = -1  # PacketInfo.iface of a datagram this node originated
