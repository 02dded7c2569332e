"""IPv4 input checks, reassembly, routing, fragmentation and path MTU (RFC 791,
RFC 1122 3.2.1, RFC 1191)."""

from __future__ import annotations

import errno
import random
from collections.abc import Callable

from stack.net.arp import ArpEngine
from stack.net.counters import Counters
from stack.net.reassembly import Reassembler, ReassemblyConfig
from stack.wire.errors import MalformedError
from stack.wire.ethernet import BROADCAST_MAC, ETHERTYPE_IPV4, build_ethernet
from stack.wire.ipv4 import (
    FLAG_DF,
    FLAG_MF,
    IPV4_HEADER,
    IPV4_HLEN,
    LIMITED_BROADCAST,
    IPv4Header,
    build_ipv4,
    parse_ipv4,
)

# (header, payload, now) -> None. The payload is trimmed to the datagram's length.
ProtocolHandler = Callable[[IPv4Header, memoryview, float], None]
# (icmp type, code, next-hop MTU, quoted header, quoted payload, now) -> None
ErrorHandler = Callable[[int, int, int, IPv4Header, memoryview, float], None]

MIN_PMTU = 552  # never believe a Fragmentation Needed below this (issue 4, Linux: 552)
PMTU_TTL = 600.0  # RFC 1191 6.3: raise the estimate again after ten minutes
PMTU_ENTRIES = 1024

COUNTERS = (
    "ipv4.rx_packets", "ipv4.rx_delivered", "ipv4.rx_truncated", "ipv4.rx_bad_version",
    "ipv4.rx_bad_header_length", "ipv4.rx_bad_total_length", "ipv4.rx_bad_checksum",
    "ipv4.rx_not_for_us", "ipv4.rx_bad_source", "ipv4.rx_ttl_zero", "ipv4.rx_options_skipped",
    "ipv4.rx_unknown_protocol",
    "ipv4.tx_packets", "ipv4.tx_no_route", "ipv4.tx_too_big", "ipv4.tx_fragmented",
    "ipv4.tx_fragments", "ipv4.pmtu_updates",
)


def _to_int(addr: bytes) -> int:
    return int.from_bytes(addr, "big")


def parse_quoted(quote: memoryview, min_data: int = 8
                 ) -> tuple[IPv4Header, memoryview] | None:
    """The datagram quoted by an ICMP error: its header (lengths not checked, it was cut)
    and what follows of it (at least `min_data` bytes)."""
    if len(quote) < IPV4_HLEN:
        return None
    ver_ihl, tos, total, ident, frag, ttl, proto, _c, src, dst = IPV4_HEADER.unpack_from(
        quote, 0)
    hlen = (ver_ihl & 0x0F) << 2
    if ver_ihl >> 4 != 4 or hlen < IPV4_HLEN or len(quote) < hlen + min_data:
        return None
    return IPv4Header(hlen, tos, total, ident, frag, ttl, proto, src, dst), quote[hlen:]


class IPv4Layer:
    """One address on one link. Transports register in `handlers` (and `error_handlers`
    for ICMP errors that quote their datagrams) by protocol number."""

    def __init__(self, mac: bytes, address: bytes, prefixlen: int, gateway: bytes | None,
                 mtu: int, arp: ArpEngine, counters: Counters,
                 transmit: Callable[[bytes], None], rng: random.Random,
                 reassembly: ReassemblyConfig | None = None) -> None:
        self.mac = mac
        self.address = address
        self.prefixlen = prefixlen
        self.gateway = gateway
        self.mtu = mtu
        self.arp = arp
        self.counters = counters
        self._transmit = transmit
        self.handlers: dict[int, ProtocolHandler] = {}
        self.error_handlers: dict[int, ErrorHandler] = {}
        # Set by the ICMP engine: (type, code, quote, now, mtu) -> None
        self.send_icmp_error: Callable[..., None] | None = None
        mask = (0xFFFFFFFF << (32 - prefixlen)) & 0xFFFFFFFF
        self._mask = mask
        self._network = _to_int(address) & mask
        self.directed_broadcast = (self._network | (~mask & 0xFFFFFFFF)).to_bytes(4, "big")
        self._ident = rng.randrange(0x10000)
        self.reassembler = Reassembler(reassembly or ReassemblyConfig(), counters)
        self.pmtu: dict[bytes, tuple[int, float]] = {}  # dst -> (path MTU, expires)
        self.current_header = b""  # header of the datagram being delivered, for ICMP
        # The frame being delivered came with a checksum the kernel owns or verified
        # (virtio-net header): transports skip their own verification.
        self.rx_checksum_trusted = False
        self.last_error = 0  # errno of the last send() that returned False
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

    def receive(self, packet: memoryview, now: float, checksum_trusted: bool = False) -> None:
        self.rx_checksum_trusted = checksum_trusted
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
        hlen = ip.header_length
        if hlen > IPV4_HLEN:
            c["ipv4.rx_options_skipped"] += 1  # RFC 1122 3.2.1.8: ignore unknown options
        if ip.is_fragment:
            whole = self.reassembler.add(ip, packet, now)
            if whole is None:
                return
            header = self.reassembler.completed_header
            ip = ip._replace(total_length=hlen + len(whole), flags_fragment=0)
            payload = memoryview(whole)
        else:
            header = packet[:hlen]
            payload = packet[hlen:ip.total_length]
        handler = self.handlers.get(ip.protocol)
        self.current_header = header
        if handler is None:
            c["ipv4.rx_unknown_protocol"] += 1
            if dst == self.address and self.send_icmp_error is not None:
                self.send_icmp_error(3, 2, bytes(header) + bytes(payload[:8]), now)
            return
        c["ipv4.rx_delivered"] += 1
        handler(ip, payload, now)

    def quote_current(self, payload: memoryview | bytes) -> bytes:
        """The datagram being delivered, as an ICMP error quotes it."""
        return bytes(self.current_header) + bytes(payload[:8])

    def poll(self, now: float) -> None:
        for quote in self.reassembler.expire(now):
            if self.send_icmp_error is not None:
                self.send_icmp_error(11, 1, quote, now)  # reassembly time exceeded

    def next_deadline(self) -> float | None:
        return self.reassembler.next_deadline()

    # -- path MTU ------------------------------------------------------------------------

    def path_mtu(self, dst: bytes, now: float) -> int:
        entry = self.pmtu.get(dst)
        if entry is None:
            return self.mtu
        if entry[1] <= now:
            del self.pmtu[dst]  # aged out: try the link MTU again (RFC 1191 6.3)
            return self.mtu
        return entry[0]

    def update_pmtu(self, dst: bytes, mtu: int, now: float) -> int | None:
        """A Fragmentation Needed said `mtu`; returns the new path MTU, None if unchanged."""
        mtu = max(min(mtu, self.mtu), MIN_PMTU)
        if mtu >= self.path_mtu(dst, now):
            return None
        if dst not in self.pmtu and len(self.pmtu) >= PMTU_ENTRIES:
            del self.pmtu[next(iter(self.pmtu))]
        self.pmtu[dst] = (mtu, now + PMTU_TTL)
        self.counters["ipv4.pmtu_updates"] += 1
        return mtu

    # -- output --------------------------------------------------------------------------

    def can_offload(self, dst: bytes, now: float) -> bool:
        """Unicast with a resolved next hop: a frame may leave with an offload header."""
        hop = self.next_hop(dst)
        return hop is not None and self.arp.lookup(hop, now) is not None

    def next_hop(self, dst: bytes) -> bytes | None:
        if _to_int(dst) & self._mask == self._network:
            return dst
        return self.gateway

    def send(self, dst: bytes, protocol: int, payload: bytes, now: float, ttl: int = 64,
             tos: int = 0, flags_fragment: int = 0, offload: bytes | None = None) -> bool:
        """Route, fragment if needed, address and transmit one datagram. False when it was
        dropped here; `last_error` then says why (EMSGSIZE, EHOSTUNREACH).

        `offload` is a virtio-net header for the link (checksum offload or TSO): the
        datagram may then be up to 64 KB and leaves unfragmented; the caller made sure
        the next hop is resolved (see can_offload)."""
        if offload is not None:
            self._ident = (self._ident + 1) & 0xFFFF
            mac = self.arp.lookup(self.next_hop(dst), now)
            packet = build_ipv4(self.address, dst, protocol, len(payload), self._ident, ttl,
                                tos, flags_fragment) + payload
            self.counters["ipv4.tx_packets"] += 1
            self._transmit((build_ethernet(mac, self.mac, ETHERTYPE_IPV4) + packet, offload))
            return True
        c = self.counters
        mtu = self.path_mtu(dst, now) if self.pmtu else self.mtu
        hop = None
        if not self.is_broadcast(dst):
            hop = self.next_hop(dst)
            if hop is None:
                c["ipv4.tx_no_route"] += 1
                self.last_error = errno.EHOSTUNREACH
                return False
        self._ident = ident = (self._ident + 1) & 0xFFFF
        if IPV4_HLEN + len(payload) <= mtu:
            packets = [build_ipv4(self.address, dst, protocol, len(payload), ident, ttl, tos,
                                  flags_fragment) + payload]
        elif flags_fragment & FLAG_DF or IPV4_HLEN + len(payload) > 65535:
            c["ipv4.tx_too_big"] += 1  # DF: the sender must make it smaller
            self.last_error = errno.EMSGSIZE
            return False
        else:
            packets = self._fragment(dst, protocol, payload, ident, ttl, tos, mtu)
        c["ipv4.tx_packets"] += 1
        if hop is None:
            header = build_ethernet(BROADCAST_MAC, self.mac, ETHERTYPE_IPV4)
            for packet in packets:
                self._transmit(header + packet)
            return True
        mac = self.arp.lookup(hop, now)
        if mac is None:
            for packet in packets:
                self.arp.resolve_and_send(hop, packet, now)
        else:
            header = build_ethernet(mac, self.mac, ETHERTYPE_IPV4)
            for packet in packets:
                self._transmit(header + packet)
        return True

    def _fragment(self, dst: bytes, protocol: int, payload: bytes, ident: int, ttl: int,
                  tos: int, mtu: int) -> list[bytes]:
        """RFC 791 3.2: pieces on 8-byte boundaries, MF on all but the last."""
        step = (mtu - IPV4_HLEN) & ~7
        c = self.counters
        c["ipv4.tx_fragmented"] += 1
        out = []
        view = memoryview(payload)
        for offset in range(0, len(payload), step):
            piece = view[offset:offset + step]
            more = FLAG_MF if offset + step < len(payload) else 0
            out.append(build_ipv4(self.address, dst, protocol, len(piece), ident, ttl, tos,
                                  more | (offset >> 3)) + piece)
        c["ipv4.tx_fragments"] += len(out)
        return out
