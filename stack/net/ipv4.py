"""IPv4 for a node: input checks, local delivery or forwarding, routing, fragmentation,
path MTU, and the hook points (RFC 791, RFC 1122 3.2.1, RFC 1191, RFC 1812).

    received ─► prerouting ─┬─► (ours) reassembly ─► input ─► transport
                            └─► (not ours, forwarding on) forward ─► postrouting ─► link
    originated ─► route ─► output ─► postrouting ─► fragment ─► link
"""

from __future__ import annotations

import errno
import random
from collections.abc import Callable

from stack.counters import Counters
from stack.net.hooks import Hooks, run_hooks
from stack.net.icmp_errors import IcmpErrorSender
from stack.net.interface import Interface
from stack.net.packet import LOCAL, PacketInfo
from stack.net.reassembly import Reassembler, ReassemblyConfig
from stack.net.route import Route, RouteTable
from stack.trace import OFF, Trace
from stack.wire.checksum import internet_checksum, mod_ffff
from stack.wire.errors import MalformedError
from stack.wire.ipv4 import (
    FLAG_DF,
    FLAG_MF,
    IPV4_HLEN,
    LIMITED_BROADCAST,
    OFFSET_MASK,
    PROTO_TCP,
    IPv4Header,
    build_ipv4,
    decrement_ttl,
    fragment_datagram,
    ip_to_str,
    parse_ipv4,
)
from stack.wire.tcp import (
    IPV4_TCP,
    IPV4_TCP_TS,
    NO_OPTIONS,
    TS_ALIGNED_WORD,
    Segment,
    timestamp_options,
)
from stack.wire.virtio import F_NEEDS_CSUM, GSO_NONE, VNET_HDR

# (header, payload, now, info) -> None. The payload is trimmed to the datagram's length.
ProtocolHandler = Callable[[IPv4Header, memoryview, float, PacketInfo], None]
# (source, destination, segment, now) -> None: TCP's input after its own checks
FusedTcpHandler = Callable[[bytes, bytes, Segment, float], None]

FUSED = True  # the fused IPv4+TCP parse on (the tests turn it off to compare the two paths)
# (icmp type, code, next-hop MTU, quoted header, quoted payload, now) -> None
ErrorHandler = Callable[[int, int, int, IPv4Header, memoryview, float], None]

MIN_PMTU = 552  # never believe a Fragmentation Needed below this (Linux: 552)
PMTU_TTL = 600.0  # RFC 1191 6.3: raise the estimate again after ten minutes
PMTU_ENTRIES = 1024

COUNTERS = (
    "ipv4.rx_packets", "ipv4.rx_delivered", "ipv4.rx_truncated", "ipv4.rx_bad_version",
    "ipv4.rx_bad_header_length", "ipv4.rx_bad_total_length", "ipv4.rx_bad_checksum",
    "ipv4.rx_not_for_us", "ipv4.rx_bad_source", "ipv4.rx_ttl_zero", "ipv4.rx_options_skipped",
    "ipv4.rx_unknown_protocol", "ipv4.rx_hook_dropped",
    "ipv4.tx_packets", "ipv4.tx_no_route", "ipv4.tx_too_big", "ipv4.tx_fragmented",
    "ipv4.tx_fragments", "ipv4.tx_hook_dropped", "ipv4.pmtu_updates",
    "ipv4.forwarded", "ipv4.fwd_ttl_exceeded", "ipv4.fwd_no_route", "ipv4.fwd_frag_needed",
    "ipv4.fwd_fragmented", "ipv4.fwd_bad_source", "ipv4.fwd_martian_destination",
    "ipv4.fwd_link_broadcast", "ipv4.fwd_host_unreachable",
    "ipv4.fwd_hook_dropped", "ipv4.fwd_gso_whole", "ipv4.fwd_gso_unsupported",
    "ipv4.fwd_checksum_completed",
)


def _martian_destination(dst: bytes) -> bool:
    """Never forwarded (RFC 1812 5.3.7, 4.2.2.11): 0/8, 127/8, multicast and class E,
    which includes the limited broadcast."""
    first = dst[0]
    return first == 0 or first == 127 or first >= 224


PROTOCOL_NAMES = {1: "icmp", 6: "tcp", 17: "udp"}


class IPv4Layer:
    trace: Trace = OFF  # the node's
    """Transports register in `handlers` (and `error_handlers` for ICMP errors that
    quote their datagrams) by protocol number."""

    def __init__(self, interfaces: list[Interface], routes: RouteTable, counters: Counters,
                 rng: random.Random, reassembly: ReassemblyConfig | None = None,
                 forwarding: bool = False) -> None:
        self.interfaces = interfaces  # by index; the node's list, shared
        self.routes = routes
        self.counters = counters
        self.hot = counters.hot  # the per-packet counters (counters.py)
        self.forwarding = forwarding
        self.hooks = Hooks()
        self.handlers: dict[int, ProtocolHandler] = {}
        self.error_handlers: dict[int, ErrorHandler] = {}
        self.local: set[bytes] = set()  # every address of the node
        self.broadcasts: set[bytes] = {LIMITED_BROADCAST}
        self._ident = rng.randrange(0x10000)
        self.reassembler = Reassembler(reassembly or ReassemblyConfig(), counters)
        self.pmtu: dict[bytes, tuple[int, float]] = {}  # dst -> (path MTU, expires)
        self.last_error = 0  # errno of the last send() that returned False
        self.errors = IcmpErrorSender(self, counters)
        # Reassemble fragments before the hooks see them (connection tracking needs the
        # transport header of every datagram, as Linux's nf_defrag does); a forwarded
        # datagram is cut again for its egress link if it must be.
        self.defrag = False
        # With several workers (stack/workers.py): steer(ip, header, payload, info)
        # hands a datagram whose flow another worker owns to that worker (True) or
        # lets it in here (False).
        self.steer: Callable[..., bool] | None = None
        # and owns(remote address, remote port, local port): whether this worker owns a
        # TCP flow, for the fused path (one it does not own takes the general path)
        self.owns: Callable[[bytes, int, int], bool] | None = None
        # TCP's input for a segment the fused path parsed (set by the TCP layer, with
        # handlers[PROTO_TCP]); None: every datagram takes the general path
        self.fused_tcp: FusedTcpHandler | None = None
        counters.declare(*COUNTERS)

    def addresses_changed(self) -> None:
        self.local = set().union(*(i.local for i in self.interfaces))
        self.broadcasts = {LIMITED_BROADCAST}.union(
            *(i.directed_broadcasts for i in self.interfaces))

    # -- input ---------------------------------------------------------------------------

    def is_broadcast(self, addr: bytes) -> bool:
        return addr in self.broadcasts

    def is_martian_source(self, src: bytes) -> bool:
        """Sources no host may use (RFC 1122 3.2.1.3, RFC 1812 5.3.7): ours, 0/8,
        loopback, class D/E, broadcast."""
        first = src[0]
        return (first == 0 or first == 127 or first >= 224 or src in self.local
                or src in self.broadcasts)

    def receive(self, iface: Interface, packet: memoryview, now: float,
                checksum_trusted: bool = False, link_broadcast: bool = False,
                vnet: bytes | memoryview | None = None) -> None:
        if self.fused_tcp is not None and self._receive_fused(packet, now, checksum_trusted):
            return
        c = self.counters
        self.hot.ipv4_rx_packets += 1
        try:
            ip = parse_ipv4(packet)
        except MalformedError as exc:
            c["ipv4.rx_" + exc.reason] += 1
            return
        info = PacketInfo(iface.index, checksum_trusted, link_broadcast, vnet)
        if self.defrag and ip.is_fragment:
            whole = self.reassembler.add(ip, packet, now)
            if whole is None:
                return
            if len(whole[0]) + len(whole[1]) > 65535:
                c["ipv4.reasm_too_big"] += 1  # the first header's options made it too big
                return
            packet = memoryview(rebuild_datagram(whole[0], whole[1], ip.flags_fragment & FLAG_DF))
            ip = parse_ipv4(packet, verify_checksum=False)
            if self.trace.on:
                self.trace.emit("ipv4", "reassembled", now, src=ip_to_str(ip.src),
                                dst=ip_to_str(ip.dst), ip_id=ip.ident, length=len(packet))
        arrived = packet  # as it came: what an ICMP error about it must quote
        if self.hooks.prerouting:
            result = run_hooks(self.hooks.prerouting, bytearray(packet[:ip.total_length]),
                               info, now)
            if result is None:
                c["ipv4.rx_hook_dropped"] += 1
                return
            packet = memoryview(result)
            ip = parse_ipv4(packet, verify_checksum=False)
        dst = ip.dst
        if dst not in self.local:
            if dst in self.broadcasts:
                # directed broadcasts of our subnets are ours, never forwarded
                # (RFC 1812 5.3.5.2: forwarding them is off by default)
                info.broadcast = True
            elif self.forwarding:
                self._forward(ip, packet, iface, now, info, arrived)
                return
            else:
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
            info.header, data = whole
            ip = ip._replace(total_length=hlen + len(data), flags_fragment=0)
            payload = memoryview(data)
            if self.trace.on:
                self.trace.emit("ipv4", "reassembled", now, src=ip_to_str(ip.src),
                                dst=ip_to_str(ip.dst), ip_id=ip.ident,
                                length=ip.total_length)
        else:
            info.header = packet[:hlen]
            payload = packet[hlen:ip.total_length]
        if self.steer is not None and self.steer(ip, info.header, payload, info):
            # another worker's flow, handed over whole: that worker counts it received
            self.hot.ipv4_rx_packets -= 1
            if hlen > IPV4_HLEN:
                c["ipv4.rx_options_skipped"] -= 1
            return
        if self.hooks.input:
            result = run_hooks(self.hooks.input, bytearray(info.header) + payload, info, now)
            if result is None:
                c["ipv4.rx_hook_dropped"] += 1
                return
            view = memoryview(result)
            ip = parse_ipv4(view, verify_checksum=False)
            info.header = view[:ip.header_length]
            payload = view[ip.header_length:ip.total_length]
        handler = self.handlers.get(ip.protocol)
        if handler is None:
            c["ipv4.rx_unknown_protocol"] += 1
            if not info.broadcast:
                self.errors.send(3, 2, info.quote(payload), now)  # protocol unreachable
            return
        self.hot.ipv4_rx_delivered += 1
        if self.trace.on:
            self.trace.emit("ipv4", "deliver", now, src=ip_to_str(ip.src),
                            dst=ip_to_str(ip.dst), proto=PROTOCOL_NAMES.get(ip.protocol,
                                                                             ip.protocol),
                            iface=iface.name, ttl=ip.ttl)
        handler(ip, payload, now, info)

    def _receive_fused(self, packet: memoryview, now: float, checksum_trusted: bool) -> bool:
        """The common case in one pass: a TCP segment to one of our addresses, IPv4
        without options, not a fragment, no hook and no trace, its TCP options none or
        NOP NOP TS(10) alone. One unpack reads both headers (and the timestamps); the
        checks are the general path's, and both checksums are verified as it verifies
        them. Anything else, a bad checksum included, returns False before anything is
        counted or changed, and the general path takes the datagram from the start (the
        same frames and counters either way: tests/unit/test_fused_receive.py)."""
        if not FUSED or self.hooks.prerouting or self.hooks.input or self.trace.on:
            return False
        n = len(packet)
        if n >= 52:
            (ver_ihl, tos, total, ident, frag, ttl, proto, csum, src, dst, sport, dport,
             seq, ack, off, flags, window, _, urgent, word, ts_val, ts_ecr
             ) = IPV4_TCP_TS.unpack_from(packet, 0)
        elif n >= 40:
            (ver_ihl, tos, total, ident, frag, ttl, proto, csum, src, dst, sport, dport,
             seq, ack, off, flags, window, _, urgent) = IPV4_TCP.unpack_from(packet, 0)
            word = ts_val = ts_ecr = 0
        else:
            return False
        tcp_hlen = (off >> 4) << 2
        if ver_ihl != 0x45 or proto != PROTO_TCP or frag & (FLAG_MF | OFFSET_MASK) \
                or ttl == 0 or total > n or total < 20 + tcp_hlen:
            return False
        if tcp_hlen == 20:
            options = NO_OPTIONS
        elif tcp_hlen == 32 and word == TS_ALIGNED_WORD:
            options = timestamp_options(ts_val, ts_ecr)
        else:
            return False  # other options (SYN, SACK) or a bad data offset
        if dst not in self.local or self.is_martian_source(src):
            return False
        if self.owns is not None and not self.owns(src, sport, dport):
            return False  # another worker's: the general path hands it over
        # RFC 1071: the header's 16-bit words sum to ones' complement zero; the addresses
        # are read once, for it and for TCP's pseudo-header
        addresses = int.from_bytes(packet[12:20], "big")
        if ((ver_ihl << 8 | tos) + total + ident + frag + (ttl << 8 | proto) + csum
                + addresses) % 0xFFFF:
            return False
        segment = packet[20:total]
        if not checksum_trusted:
            tcp_len = total - 20
            body = int.from_bytes(segment, "big")
            if tcp_len & 1:
                body <<= 8  # padded with a zero byte (ones_sum)
            if mod_ffff(body + addresses + PROTO_TCP + tcp_len):
                return False
        hot = self.hot
        hot.ipv4_rx_packets += 1
        hot.ipv4_rx_delivered += 1
        self.fused_tcp(src, dst, Segment(sport, dport, seq, ack, flags, window, urgent,
                                         options, segment[tcp_hlen:]), now)
        return True

    def poll(self, now: float) -> None:
        for quote in self.reassembler.expire(now):
            self.errors.send(11, 1, quote, now)  # reassembly time exceeded

    def next_deadline(self) -> float | None:
        return self.reassembler.next_deadline()

    # -- forwarding (RFC 1812 5.2, 5.3) ----------------------------------------------------

    def _forward(self, ip: IPv4Header, packet: memoryview, iface: Interface, now: float,
                 info: PacketInfo, arrived: memoryview | None = None) -> None:
        c = self.counters
        if info.link_broadcast:
            c["ipv4.fwd_link_broadcast"] += 1  # RFC 1812 5.3.4
            return
        if self.is_martian_source(ip.src):
            c["ipv4.fwd_bad_source"] += 1  # RFC 1812 5.3.7
            return
        if _martian_destination(ip.dst):
            c["ipv4.fwd_martian_destination"] += 1
            return
        # An error quotes the datagram as it arrived (RFC 1812 4.3.2.3), before a NAT
        # rewrote it here: that is what its sender can match (a traceroute through a
        # port forward or a 1:1 NAT sees this hop).
        if arrived is None:
            arrived = packet
        quote = bytes(arrived[:(arrived[0] & 0x0F) * 4 + 8])
        if ip.ttl <= 1:
            c["ipv4.fwd_ttl_exceeded"] += 1  # RFC 1812 5.3.1
            self.errors.send(11, 0, quote, now)
            return
        route = self.routes.lookup(ip.dst)
        if route is None:
            c["ipv4.fwd_no_route"] += 1
            self.errors.send(3, 0, quote, now)  # network unreachable
            return
        out = self.interfaces[route.ifindex]
        info.out_iface = out.index
        if self.trace.on:
            self.trace.emit("ipv4", "forward", now, src=ip_to_str(ip.src),
                            dst=ip_to_str(ip.dst), iface=iface.name, out=out.name,
                            route=route.prefix_str(), next_hop=ip_to_str(route.gateway or ip.dst),
                            ttl=ip.ttl - 1)
        data = bytearray(packet[:ip.total_length])
        decrement_ttl(data)
        for handlers in (self.hooks.forward, self.hooks.postrouting):
            if handlers:
                result = run_hooks(handlers, data, info, now)
                if result is None:
                    c["ipv4.fwd_hook_dropped"] += 1
                    return
                data = result
        hop = route.gateway or ip.dst
        vnet = info.vnet
        if vnet is not None and self._forward_offloaded(data, vnet, out, hop, now, quote):
            return
        mtu = out.mtu
        if len(data) <= mtu:
            out.send_ipv4(data, hop, now)
        elif ip.flags_fragment & FLAG_DF:
            c["ipv4.fwd_frag_needed"] += 1  # RFC 1191: tell the sender the next-hop MTU
            self.errors.send(3, 4, quote, now, mtu)
            return
        else:
            c["ipv4.fwd_fragmented"] += 1
            pieces = fragment_datagram(data, mtu)
            c["ipv4.tx_fragments"] += len(pieces)
            for piece in pieces:
                out.send_ipv4(piece, hop, now)
        c["ipv4.forwarded"] += 1

    def _forward_offloaded(self, data: bytearray, vnet: bytes | memoryview, out: Interface,
                           hop: bytes, now: float, quote: bytes) -> bool:
        """A frame that came with a virtio-net header. A GSO super-frame goes out whole
        when the egress link takes offloads and its segments fit the egress MTU (the
        kernel cuts it there); a checksum the kernel left to finish is finished here when
        the egress link is plain. True when the datagram was dealt with."""
        c = self.counters
        flags, gso_type, hdr_len, gso_size, csum_start, csum_offset = VNET_HDR.unpack_from(
            vnet, 0)
        if gso_type & 0x7F == GSO_NONE:
            if out.offload:
                if len(data) > out.mtu:
                    return False  # the ordinary path fragments or answers Frag Needed
                out.send_ipv4(data, hop, now, vnet=bytes(vnet))
                c["ipv4.forwarded"] += 1
                return True
            if flags & F_NEEDS_CSUM:
                _finish_checksum(data, csum_start - 14, csum_offset)
                c["ipv4.fwd_checksum_completed"] += 1
            return False
        segment = hdr_len - 14 + gso_size  # one segment's IPv4 datagram
        if out.offload and segment <= out.mtu:
            out.send_ipv4(data, hop, now, vnet=bytes(vnet))
            c["ipv4.fwd_gso_whole"] += 1
            c["ipv4.forwarded"] += 1
            return True
        if segment > out.mtu:
            c["ipv4.fwd_frag_needed"] += 1  # TSO sets DF on every segment
            self.errors.send(3, 4, quote, now, out.mtu)
        else:
            c["ipv4.fwd_gso_unsupported"] += 1  # a plain egress link: no software GSO
        return True

    def unresolved(self, packets: list, now: float) -> None:
        """An interface gave up resolving a next hop: answer the packets we forwarded
        with Host Unreachable (RFC 1812 4.3.3.1); our own just go (the sender times out)."""
        for item in packets:
            packet = item[0] if type(item) is tuple else item
            if len(packet) < IPV4_HLEN or bytes(packet[12:16]) in self.local:
                continue
            self.counters["ipv4.fwd_host_unreachable"] += 1
            hlen = (packet[0] & 0x0F) << 2
            self.errors.send(3, 1, bytes(packet[:hlen + 8]), now)

    # -- path MTU ------------------------------------------------------------------------

    def link_mtu(self, dst: bytes) -> int:
        """The MTU of the interface a datagram to `dst` leaves by."""
        route = self.routes.lookup(dst)
        if route is None:
            return self.interfaces[0].mtu if self.interfaces else 1500
        return self.interfaces[route.ifindex].mtu

    def path_mtu(self, dst: bytes, now: float) -> int:
        entry = self.pmtu.get(dst)
        if entry is None:
            return self.link_mtu(dst)
        if entry[1] <= now:
            del self.pmtu[dst]  # aged out: try the link MTU again (RFC 1191 6.3)
            return self.link_mtu(dst)
        return entry[0]

    def update_pmtu(self, dst: bytes, mtu: int, now: float) -> int | None:
        """A Fragmentation Needed said `mtu`; returns the new path MTU, None if unchanged."""
        mtu = max(min(mtu, self.link_mtu(dst)), MIN_PMTU)
        if mtu >= self.path_mtu(dst, now):
            return None
        if dst not in self.pmtu and len(self.pmtu) >= PMTU_ENTRIES:
            del self.pmtu[next(iter(self.pmtu))]
        self.pmtu[dst] = (mtu, now + PMTU_TTL)
        self.counters["ipv4.pmtu_updates"] += 1
        return mtu

    # -- output --------------------------------------------------------------------------

    def source_for(self, dst: bytes) -> bytes | None:
        """The source address a datagram to `dst` would carry (None: no route)."""
        route = self.routes.lookup(dst)
        if route is None:
            return None
        return route.source or self.interfaces[route.ifindex].source_for(dst)

    def can_offload(self, dst: bytes, now: float, tso: bool = False) -> bool:
        """Unicast leaving by an offloading interface with a resolved next hop: a frame
        may go with a virtio-net header (with `tso`: one that asks for segmentation)."""
        route = self.routes.lookup(dst)
        if route is None:
            return False
        out = self.interfaces[route.ifindex]
        if self.hooks.output or self.hooks.postrouting:
            return False  # the hooks see (and may rewrite) whole, checksummed datagrams
        if not out.offload or (tso and out.offload != "tso"):
            return False
        return out.arp.lookup(route.gateway or dst, now) is not None

    def _broadcast_route(self, src: bytes | None) -> Route | None:
        """The limited broadcast leaves by the interface that owns `src`, else the first
        interface with an address."""
        for iface in self.interfaces:
            if (src in iface.local if src is not None else iface.addresses):
                return Route(0, 0, iface.index, None, source=src or iface.primary)
        return None

    def send(self, dst: bytes, protocol: int, payload: bytes, now: float, ttl: int = 64,
             tos: int = 0, flags_fragment: int = 0, offload: bytes | None = None,
             src: bytes | None = None) -> bool:
        """Route, fragment if needed, address and transmit one datagram. False when it was
        dropped here; `last_error` then says why (EMSGSIZE, ENETUNREACH).

        `src` defaults to the route's source address. `offload` is a virtio-net header
        for the link (checksum offload or TSO): the datagram may then be up to 64 KB and
        leaves unfragmented; the caller made sure it may (see can_offload)."""
        c = self.counters
        route = self.routes.lookup(dst) if dst != LIMITED_BROADCAST else \
            self._broadcast_route(src)
        if route is None:
            c["ipv4.tx_no_route"] += 1
            self.last_error = errno.ENETUNREACH
            return False
        out = self.interfaces[route.ifindex]
        if src is None:
            src = route.source or out.source_for(dst)
        hop = route.gateway or dst
        self._ident = ident = (self._ident + 1) & 0xFFFF
        if offload is not None:
            self.hot.ipv4_tx_packets += 1
            out.send_ipv4(build_ipv4(src, dst, protocol, len(payload), ident, ttl, tos,
                                     flags_fragment) + payload, hop, now, vnet=offload)
            return True
        mtu = self.path_mtu(dst, now) if self.pmtu else out.mtu
        if self.hooks.output or self.hooks.postrouting:
            return self._send_hooked(out, route, src, dst, hop, protocol, payload, now, ttl,
                                     tos, flags_fragment, mtu, ident)
        if IPV4_HLEN + len(payload) <= mtu:
            packets = [build_ipv4(src, dst, protocol, len(payload), ident, ttl, tos,
                                  flags_fragment) + payload]
        elif flags_fragment & FLAG_DF or IPV4_HLEN + len(payload) > 65535:
            c["ipv4.tx_too_big"] += 1  # DF: the sender must make it smaller
            self.last_error = errno.EMSGSIZE
            return False
        else:
            packets = self._fragment(src, dst, protocol, payload, ident, ttl, tos, mtu)
        self.hot.ipv4_tx_packets += 1
        if dst == LIMITED_BROADCAST or dst in out.directed_broadcasts:
            for packet in packets:
                out.send_ipv4_broadcast(packet)
            return True
        for packet in packets:
            out.send_ipv4(packet, hop, now)
        return True

    def _send_hooked(self, out: Interface, route: Route, src: bytes, dst: bytes, hop: bytes,
                     protocol: int, payload: bytes, now: float, ttl: int, tos: int,
                     flags_fragment: int, mtu: int, ident: int) -> bool:
        """The output path when hooks are installed: the whole datagram passes output and
        postrouting before it is fragmented."""
        c = self.counters
        if IPV4_HLEN + len(payload) > 65535:
            c["ipv4.tx_too_big"] += 1
            self.last_error = errno.EMSGSIZE
            return False
        packet: bytearray | None = bytearray(
            build_ipv4(src, dst, protocol, len(payload), ident, ttl, tos, flags_fragment))
        packet += payload
        info = PacketInfo(LOCAL)
        info.out_iface = out.index
        for handlers in (self.hooks.output, self.hooks.postrouting):
            if handlers:
                packet = run_hooks(handlers, packet, info, now)
                if packet is None:
                    c["ipv4.tx_hook_dropped"] += 1
                    self.last_error = errno.EPERM
                    return False
        if len(packet) <= mtu:
            packets = [packet]
        elif packet[6] & 0x40:  # DF
            c["ipv4.tx_too_big"] += 1
            self.last_error = errno.EMSGSIZE
            return False
        else:
            packets = fragment_datagram(packet, mtu)
            c["ipv4.tx_fragmented"] += 1
            c["ipv4.tx_fragments"] += len(packets)
        self.hot.ipv4_tx_packets += 1
        broadcast = dst == LIMITED_BROADCAST or dst in out.directed_broadcasts
        for piece in packets:
            if broadcast:
                out.send_ipv4_broadcast(piece)
            else:
                out.send_ipv4(piece, hop, now)
        return True

    def _fragment(self, src: bytes, dst: bytes, protocol: int, payload: bytes, ident: int,
                  ttl: int, tos: int, mtu: int) -> list[bytes]:
        """RFC 791 3.2: pieces on 8-byte boundaries, MF on all but the last."""
        step = (mtu - IPV4_HLEN) & ~7
        c = self.counters
        c["ipv4.tx_fragmented"] += 1
        out = []
        view = memoryview(payload)
        for offset in range(0, len(payload), step):
            piece = view[offset:offset + step]
            more = FLAG_MF if offset + step < len(payload) else 0
            out.append(build_ipv4(src, dst, protocol, len(piece), ident, ttl, tos,
                                  more | (offset >> 3)) + piece)
        c["ipv4.tx_fragments"] += len(out)
        if self.trace.on:
            self.trace.emit("ipv4", "fragment", self.trace.now, src=ip_to_str(src),
                            dst=ip_to_str(dst), ip_id=ident, pieces=len(out), mtu=mtu)
        return out


def rebuild_datagram(header: bytes, payload: bytes, df: int) -> bytes:
    """A reassembled datagram as one: the first fragment's header with the whole length,
    no fragment offset or MF, and a fresh checksum."""
    hdr = bytearray(header)
    total = len(hdr) + len(payload)
    hdr[2:4] = total.to_bytes(2, "big")
    hdr[6:8] = df.to_bytes(2, "big")
    hdr[10:12] = b"\0\0"
    hdr[10:12] = internet_checksum(bytes(hdr)).to_bytes(2, "big")
    return bytes(hdr) + payload


def _finish_checksum(packet: bytearray, start: int, offset: int) -> None:
    """Complete a checksum the sender left partial (virtio NEEDS_CSUM): the field holds
    the pseudo-header sum; the one's complement of the sum from `start` is the answer."""
    if start < 0 or start + offset + 2 > len(packet):
        return
    csum = internet_checksum(packet[start:]) or 0xFFFF  # UDP: 0 would mean "none"
    packet[start + offset] = csum >> 8
    packet[start + offset + 1] = csum & 0xFF
