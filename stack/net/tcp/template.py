"""A per-connection frame template: what every segment of a connection has in common,
worked out once, so that sending one costs a single pack and a single copy of the
payload.

The general path builds a TCP segment (header, options, payload, checksum), then looks
up the route, builds an IPv4 header (with its checksum), looks up the neighbour's MAC
and prepends an Ethernet header, copying the payload at each step. A connection sends
to one address from one address, by one route to one neighbour, so the template keeps:

- the Ethernet header (the neighbour's MAC, ours, 0x0800);
- the IPv4 header's constant fields (version, DF, TTL 64, protocol 6, addresses) and the
  ones' complement sum of them, so the header checksum needs only the length and the
  identification added (RFC 1624's incremental form);
- the TCP ports and the pseudo-header's sum (addresses and protocol).

Per segment: one `pack_into` of the variable fields (length, identification, both
checksums, sequence and acknowledgement numbers, offset, flags, window), the TCP
checksum summed over header and payload separately (the header is a multiple of four
bytes long, so the payload's sum lines up), and one concatenation. The frame is byte for
byte what the general path makes (tests/unit/test_template.py).

It stays valid while no hook or trace has been switched on and the routing table, the
neighbour's ARP entry, the path MTU entry and the interface's MTU are the very ones it
was made from (identity checks, no lookups); otherwise the connection makes a new one.
It is not used while hooks (NAT, filters on the host itself) or a trace are on, or for
broadcasts: those take the general path. On a link with checksum offload (`--offload`)
the frame leaves with a virtio-net header that asks the kernel to finish the TCP
checksum: the field holds the pseudo-header sum and the payload is never summed here.
TSO super-frames (more than one MSS) take the general path.
"""

from __future__ import annotations

import struct
from typing import Any

from stack.wire.checksum import mod_ffff
from stack.wire.ipv4 import FLAG_DF
from stack.wire.virtio import CSUM_TCPV4

ETH_IP_TCP = struct.Struct("!6s6sH" "BBHHHBBH4s4s" "HHIIBBHHH")
HEADERS = ETH_IP_TCP.size  # 14 + 20 + 20
TTL = 64


class FrameTemplate:
    __slots__ = ("arp_entry", "dport", "dst", "eth_dst", "eth_src", "hop", "iface",
                 "iface_mtu", "ip_base", "mtu", "mtu_entry", "pseudo", "route_generation",
                 "sport", "src", "vnet")

    def __init__(self, iface: Any, eth_dst: bytes, src: bytes, dst: bytes, sport: int,
                 dport: int, hop: bytes, arp_entry: tuple, mtu: int, mtu_entry: Any,
                 route_generation: int) -> None:
        self.iface, self.eth_dst, self.eth_src = iface, eth_dst, iface.mac
        self.src, self.dst, self.sport, self.dport = src, dst, sport, dport
        self.hop, self.arp_entry, self.mtu, self.mtu_entry = hop, arp_entry, mtu, mtu_entry
        self.route_generation = route_generation
        self.iface_mtu = iface.mtu
        addresses = int.from_bytes(src + dst, "big")
        # IPv4 words that never change: 0x4500 (tos 0), DF, TTL and protocol, addresses
        self.ip_base = (0x4500 + FLAG_DF + (TTL << 8 | 6) + addresses) % 0xFFFF
        self.pseudo = (addresses + 6) % 0xFFFF
        # checksum offload: frames go as (frame, virtio-net header), the kernel sums
        self.vnet = CSUM_TCPV4 if iface.offload else None

    def frame(self, seq: int, ack: int, flags: int, window: int, options: bytes,
              payload: bytes | bytearray | memoryview, ident: int
              ) -> bytearray | tuple[bytearray, bytes]:
        hlen = 20 + len(options)
        tcp_len = hlen + len(payload)
        total = 20 + tcp_len
        s = (self.ip_base + total + ident) % 0xFFFF
        ip_csum = 0xFFFF - s if s else 0
        header = bytearray(HEADERS)
        off_flags = (hlen >> 2) << 4
        ETH_IP_TCP.pack_into(header, 0, self.eth_dst, self.eth_src, 0x0800,
                             0x45, 0, total, ident, FLAG_DF, TTL, 6, ip_csum, self.src,
                             self.dst, self.sport, self.dport, seq, ack, off_flags, flags,
                             window, 0, 0)
        if self.vnet is not None:
            # the kernel finishes the sum: the field holds the pseudo-header's, folded
            # and not inverted (0 is written as 0xFFFF, as build_tcp_offloaded does)
            seed = (self.pseudo + tcp_len) % 0xFFFF or 0xFFFF
            header[50] = seed >> 8
            header[51] = seed & 0xFF
            if options:
                header += options
            header += payload
            return header, self.vnet
        # the TCP checksum: pseudo-header, header, options, payload, each summed on its
        # own (each starts at an even offset: the header and options are whole words)
        total_sum = self.pseudo + tcp_len + int.from_bytes(header[34:], "big")
        if options:
            total_sum += int.from_bytes(options, "big")
        if payload:
            if len(payload) & 1:
                total_sum += int.from_bytes(payload, "big") << 8
            else:
                total_sum += int.from_bytes(payload, "big")
        folded = mod_ffff(total_sum)
        csum = 0xFFFF - folded if folded else 0
        header[50] = csum >> 8
        header[51] = csum & 0xFF
        if options:
            header += options
        header += payload  # the one copy of the payload
        return header

    def still_valid(self, ipv4: Any, now: float) -> bool:
        """No hooks or trace came since, and the routing table, the neighbour's entry,
        the path MTU entry and the interface's MTU are still the ones it was made
        from."""
        entry = self.arp_entry
        hooks = ipv4.hooks
        return (not (hooks.output or hooks.postrouting or ipv4.trace.on)
                and ipv4.routes.generation == self.route_generation
                and self.iface.arp.cache.get(self.hop) is entry and entry[1] >= now
                and ipv4.pmtu.get(self.dst) is self.mtu_entry
                and (self.mtu_entry is None or self.mtu_entry[1] > now)
                and self.iface.mtu == self.iface_mtu)


def make_template(ipv4: Any, conn: Any, now: float) -> FrameTemplate | None:
    """The template for `conn`, or None when its segments must take the general path."""
    dst, src = conn.remote_ip, conn.local_ip
    if ipv4.hooks.output or ipv4.hooks.postrouting or ipv4.trace.on:
        return None
    route = ipv4.routes.lookup(dst)
    if route is None:
        return None
    out = ipv4.interfaces[route.ifindex]
    if dst in out.directed_broadcasts or dst == b"\xff\xff\xff\xff":
        return None
    hop = route.gateway or dst
    entry = out.arp.cache.get(hop)
    if entry is None or entry[1] < now:
        return None  # the general path resolves it first
    mtu = ipv4.path_mtu(dst, now)  # ages out a stale entry first
    mtu_entry = ipv4.pmtu.get(dst)
    return FrameTemplate(out, entry[0], src, dst, conn.local_port, conn.remote_port, hop,
                         entry, mtu, mtu_entry, ipv4.routes.generation)
