"""ARP (RFC 826): answer for our address, resolve next hops, hold a bounded cache.

The cache follows RFC 826's merge rule, tightened as RFC 5227 and common practice
suggest: an ARP packet refreshes an entry that already exists; a new entry is created
only by a request aimed at us (we are about to talk to that host) or by a reply to a
resolution we started. Unsolicited replies never create entries.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from stack.counters import Counters
from stack.trace import OFF, Trace
from stack.wire.arp import OP_REPLY, OP_REQUEST, build_arp, parse_arp
from stack.wire.errors import MalformedError
from stack.wire.ethernet import (
    BROADCAST_MAC,
    ETHERTYPE_ARP,
    ETHERTYPE_IPV4,
    ZERO_MAC,
    build_ethernet,
    mac_to_str,
)
from stack.wire.ipv4 import ip_to_str

UNSPECIFIED = b"\x00\x00\x00\x00"


@dataclass(slots=True)
class ArpConfig:
    cache_size: int = 256  # entries; the oldest is evicted past this
    cache_ttl: float = 60.0  # seconds an entry is trusted without being refreshed
    queue_per_neighbour: int = 16  # packets held while a next hop is being resolved
    max_pending: int = 64  # next hops being resolved at once
    retries: int = 3  # requests sent before giving up on a next hop
    retry_interval: float = 1.0
    announcements: int = 2  # gratuitous ARPs at start (RFC 5227 2.3: two, two seconds apart)
    announce_interval: float = 2.0


class _Pending:
    """A next hop being resolved and the IPv4 packets waiting for it."""

    __slots__ = ("next_try", "packets", "tries")

    def __init__(self, now: float) -> None:
        self.packets: list[Queued] = []
        self.tries = 0
        self.next_try = now


COUNTERS = (
    "arp.rx_requests", "arp.rx_replies", "arp.tx_requests", "arp.tx_replies",
    "arp.rx_truncated", "arp.rx_bad_format", "arp.rx_bad_opcode", "arp.rx_not_for_us",
    "arp.rx_bad_sender", "arp.address_conflicts", "arp.unsolicited_replies",
    "arp.cache_evictions", "arp.cache_expired", "arp.queue_overflow", "arp.pending_overflow",
    "arp.resolve_failed", "arp.resolve_dropped_packets",
)


class ArpOwner(Protocol):
    """The interface an engine serves: its MAC and addresses."""

    mac: bytes
    local: set[bytes]
    addresses: list[tuple[bytes, int]]

    def source_for(self, dst: bytes) -> bytes | None: ...


# A packet waiting for its next hop: IPv4 bytes, or (bytes, virtio-net header)
Queued = bytes | bytearray | tuple


class ArpEngine:
    trace: Trace = OFF  # the node's, once its interface is added to one
    """Owns one interface's neighbour cache. Frames to send go to `transmit` (a list's
    append); packets given up on go to `on_unresolved` (the node answers them with ICMP
    Host Unreachable where it forwarded them)."""

    def __init__(self, owner: ArpOwner, config: ArpConfig, counters: Counters,
                 transmit: Callable[[object], None],
                 on_unresolved: Callable[[list, float], None] | None = None) -> None:
        self.owner = owner
        self.mac = owner.mac
        self.config = config
        self.counters = counters
        self._transmit = transmit
        self._on_unresolved = on_unresolved
        # ip -> (mac, expires); dict order is insertion order, oldest first.
        self.cache: dict[bytes, tuple[bytes, float]] = {}
        self.pending: dict[bytes, _Pending] = {}
        # with several workers: hands every ARP packet taken in to the others (learn())
        self.share: Callable[[bytes], None] | None = None
        self._announce_left = 0
        self._next_announce: float | None = None
        counters.declare(*COUNTERS)

    # -- start-up ----------------------------------------------------------------------

    def start(self, now: float) -> None:
        """Announce our address (gratuitous ARP request, RFC 5227 2.3)."""
        self._announce_left = self.config.announcements
        self._next_announce = now if self._announce_left else None
        self.poll(now)

    def _announce(self) -> None:
        for address, _ in self.owner.addresses:
            self._send_request(address, BROADCAST_MAC, sender_ip=address)

    # -- input ---------------------------------------------------------------------------

    def receive(self, data: bytes | memoryview, now: float) -> None:
        c = self.counters
        try:
            pkt = parse_arp(data)
        except MalformedError as exc:
            c["arp.rx_" + exc.reason] += 1
            return
        op, sha, spa, _tha, tpa = pkt
        c["arp.rx_requests" if op == OP_REQUEST else "arp.rx_replies"] += 1
        if self.share is not None:
            self.share(bytes(data))  # the other workers learn from it too
        if sha[0] & 1 or sha == ZERO_MAC:
            c["arp.rx_bad_sender"] += 1  # broadcast/multicast/zero hardware address
            return
        local = self.owner.local
        if spa in local:
            if sha != self.mac:
                c["arp.address_conflicts"] += 1  # someone else claims our address
            return
        for_us = tpa in local
        if spa != UNSPECIFIED:  # RFC 5227 probes (sender 0.0.0.0) teach nothing
            # RFC 826 merge: refresh what we know; learn from a reply we asked for, or
            # from a request aimed at us (we are about to answer that host).
            known = spa in self.cache
            asked = op == OP_REPLY and spa in self.pending
            if known or asked or (for_us and op == OP_REQUEST):
                self._store(spa, sha, now)
            elif op == OP_REPLY and self.share is None:  # with workers: maybe another's
                c["arp.unsolicited_replies"] += 1
        if not for_us:
            c["arp.rx_not_for_us"] += 1
            return
        if op == OP_REQUEST:
            frame = build_ethernet(sha, self.mac, ETHERTYPE_ARP) + build_arp(
                OP_REPLY, self.mac, tpa, sha, spa)
            self._transmit(frame)
            c["arp.tx_replies"] += 1

    def learn(self, data: bytes | memoryview, now: float) -> None:
        """An ARP packet another worker took in (stack/workers.py): learn from it by the
        same rule as `receive`, without counting it again or answering it (that
        worker did)."""
        try:
            op, sha, spa, _tha, tpa = parse_arp(data)
        except MalformedError:
            return
        local = self.owner.local
        if sha[0] & 1 or sha == ZERO_MAC or spa in local or spa == UNSPECIFIED:
            return
        if spa in self.cache or (op == OP_REPLY and spa in self.pending) or \
                (tpa in local and op == OP_REQUEST):
            self._store(spa, sha, now)

    def _store(self, ip: bytes, mac: bytes, now: float) -> None:
        cache = self.cache
        if ip in cache:
            del cache[ip]  # re-insert at the young end
        elif len(cache) >= self.config.cache_size:
            del cache[next(iter(cache))]
            self.counters["arp.cache_evictions"] += 1
        cache[ip] = (mac, now + self.config.cache_ttl)
        waiting = self.pending.pop(ip, None)
        if self.trace.on:
            self.trace.emit("arp", "resolved" if waiting is not None else "learned", now,
                            ip=ip_to_str(ip), mac=mac_to_str(mac),
                            released=len(waiting.packets) if waiting is not None else 0)
        if waiting is not None:
            header = build_ethernet(mac, self.mac, ETHERTYPE_IPV4)
            for packet in waiting.packets:
                if type(packet) is tuple:  # (packet, virtio-net header)
                    self._transmit((header + packet[0], packet[1]))
                else:
                    self._transmit(header + packet)

    # -- output --------------------------------------------------------------------------

    def lookup(self, ip: bytes, now: float) -> bytes | None:
        """The MAC for `ip` if known and fresh, else None."""
        entry = self.cache.get(ip)
        if entry is None:
            return None
        if entry[1] < now:
            del self.cache[ip]
            self.counters["arp.cache_expired"] += 1
            return None
        return entry[0]

    def resolve_and_send(self, next_hop: bytes, packet: Queued, now: float) -> None:
        """Queue an IPv4 packet until `next_hop` answers; start resolving it if needed."""
        c = self.counters
        waiting = self.pending.get(next_hop)
        if waiting is None:
            if len(self.pending) >= self.config.max_pending:
                c["arp.pending_overflow"] += 1
                return
            waiting = self.pending[next_hop] = _Pending(now)
            self._retry(next_hop, waiting, now)
        if len(waiting.packets) >= self.config.queue_per_neighbour:
            waiting.packets.pop(0)  # keep the newest, like Linux's unresolved queue
            c["arp.queue_overflow"] += 1
        waiting.packets.append(packet)

    def _retry(self, ip: bytes, waiting: _Pending, now: float) -> None:
        waiting.tries += 1
        waiting.next_try = now + self.config.retry_interval
        sender = self.owner.source_for(ip)
        if sender is not None:
            self._send_request(ip, BROADCAST_MAC, sender_ip=sender)

    def _send_request(self, target_ip: bytes, dst_mac: bytes, sender_ip: bytes) -> None:
        frame = build_ethernet(dst_mac, self.mac, ETHERTYPE_ARP) + build_arp(
            OP_REQUEST, self.mac, sender_ip, ZERO_MAC, target_ip)
        self._transmit(frame)
        self.counters["arp.tx_requests"] += 1

    # -- timers --------------------------------------------------------------------------

    def poll(self, now: float) -> None:
        if self._next_announce is not None and self._next_announce <= now:
            self._announce()
            self._announce_left -= 1
            self._next_announce = (now + self.config.announce_interval
                                   if self._announce_left > 0 else None)
        if not self.pending:
            return
        c = self.counters
        for ip, waiting in list(self.pending.items()):
            if waiting.next_try > now:
                continue
            if waiting.tries >= self.config.retries:
                del self.pending[ip]
                c["arp.resolve_failed"] += 1
                c["arp.resolve_dropped_packets"] += len(waiting.packets)
                if self._on_unresolved is not None and waiting.packets:
                    self._on_unresolved(waiting.packets, now)
            else:
                self._retry(ip, waiting, now)

    def next_deadline(self) -> float | None:
        times = [p.next_try for p in self.pending.values()]
        if self._next_announce is not None:
            times.append(self._next_announce)
        return min(times) if times else None
