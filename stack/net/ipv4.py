"""IPv4 input checks and output routing (RFC 791, RFC 1122 3.2.1)."""

from __future__ import annotations

import random
from collections.abc import Callable

from stack.net.arp import ArpEngine
from stack.net.counters import Counters
from stack.wire.errors import MalformedError
from stack.wire.ethernet import BROADCAST_MAC, ETHERTYPE_IPV4, build_ethernet
from stack.wire.ipv4 import IPV4_HLEN, LIMITED_BROADCAST, IPv4Header, build_ipv4, parse_ipv4

# (header, payload, now) -> None. The payload is a memoryview trimmed to total length.
ProtocolHandler = Callable[[IPv4Header, memoryview, float], None]

COUNTERS = (
    "ipv4.rx_packets", "ipv4.rx_delivered", "ipv4.rx_truncated", "ipv4.rx_bad_version",
    "ipv4.rx_bad_header_length", "ipv4.rx_bad_total_length", "ipv4.rx_bad_checksum",
    "ipv4.rx_not_for_us", "ipv4.rx_bad_source", "ipv4.rx_ttl_zero", "ipv4.rx_options_skipped",
    "ipv4.rx_fragments_dropped", "ipv4.rx_unknown_protocol",
    "ipv4.tx_packets", "ipv4.tx_no_route", "ipv4.tx_too_big",
)


def _to_int(addr: bytes) -> int:
    return int.from_bytes(addr, "big")


class IPv4Layer:
    """One address on one link. Transport engines register in `handlers` by protocol."""

    def __init__(self, mac: bytes, address: bytes, prefixlen: int, gateway: bytes | None,
                 mtu: int, arp: ArpEngine, counters: Counters,
                 transmit: Callable[[bytes], None], rng: random.Random) -> None:
        self.mac = mac
        self.address = address
        self.prefixlen = prefixlen
        self.gateway = gateway
        self.mtu = mtu
        self.arp = arp
        self.counters = counters
        self._transmit = transmit
        self.handlers: dict[int, ProtocolHandler] = {}
        mask = (0xFFFFFFFF << (32 - prefixlen)) & 0xFFFFFFFF
        self._mask = mask
        self._network = _to_int(address) & mask
        self.directed_broadcast = (self._network | (~mask & 0xFFFFFFFF)).to_bytes(4, "big")
        self._ident = rng.randrange(0x10000)
        counters.declare(*COUNTERS)

    # -- input ---------------------------------------------------------------------------

    def is_broadcast(self, addr: bytes) -> bool:
        return addr == LIMITED_BROADCAST or addr == self.directed_broadcast

    def is_martian_source(self, src: bytes) -> bool:
        """Sources no host may use (RFC 1122 3.2.1.3): ours, 0/8, loopback, class D/E,
        broadcast."""
        first = src[0]
        return (src == self.address or first == 0 or first == 127 or first >= 224
                or src == self.directed_broadcast)

    def receive(self, packet: memoryview, now: float) -> None:
        c = self.counters
        c["ipv4.rx_packets"] += 1
        try:
            ip = parse_ipv4(packet)
        except MalformedError as exc:
            c["ipv4.rx_" + exc.reason] += 1
            return
        dst = ip.dst
        if dst != self.address and not self.is_broadcast(dst):
            c["ipv4.rx_not_for_us"] += 1
            return
        if self.is_martian_source(ip.src):
            c["ipv4.rx_bad_source"] += 1
            return
        if ip.ttl == 0:
            c["ipv4.rx_ttl_zero"] += 1  # RFC 1122 3.2.1.7: no host sends TTL 0
            return
        if ip.is_fragment:
            c["ipv4.rx_fragments_dropped"] += 1  # reassembly is not built yet
            return
        hlen = ip.header_length
        if hlen > IPV4_HLEN:
            c["ipv4.rx_options_skipped"] += 1  # RFC 1122 3.2.1.8: ignore unknown options
        handler = self.handlers.get(ip.protocol)
        if handler is None:
            c["ipv4.rx_unknown_protocol"] += 1
            return
        c["ipv4.rx_delivered"] += 1
        handler(ip, packet[hlen:ip.total_length], now)

    # -- output --------------------------------------------------------------------------

    def next_hop(self, dst: bytes) -> bytes | None:
        if _to_int(dst) & self._mask == self._network:
            return dst
        return self.gateway

    def send(self, dst: bytes, protocol: int, payload: bytes, now: float, ttl: int = 64,
             tos: int = 0, flags_fragment: int = 0) -> bool:
        """Route, address and transmit one datagram; False when it was dropped here."""
        c = self.counters
        if IPV4_HLEN + len(payload) > self.mtu:
            c["ipv4.tx_too_big"] += 1  # fragmentation is not built yet
            return False
        self._ident = (self._ident + 1) & 0xFFFF
        packet = build_ipv4(self.address, dst, protocol, len(payload), self._ident, ttl, tos,
                            flags_fragment) + payload
        c["ipv4.tx_packets"] += 1
        if self.is_broadcast(dst):
            self._transmit(build_ethernet(BROADCAST_MAC, self.mac, ETHERTYPE_IPV4) + packet)
            return True
        hop = self.next_hop(dst)
        if hop is None:
            c["ipv4.tx_no_route"] += 1
            return False
        mac = self.arp.lookup(hop, now)
        if mac is None:
            self.arp.resolve_and_send(hop, packet, now)
        else:
            self._transmit(build_ethernet(mac, self.mac, ETHERTYPE_IPV4) + packet)
        return True
