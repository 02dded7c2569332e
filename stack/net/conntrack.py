"""Connection tracking: every flow through (or to, or from) a node, in both directions.

An entry holds the flow's tuple as first seen (ORIGINAL) and the tuple its replies will
carry (REPLY, after any NAT), a state, and a timeout. TCP is followed through its
handshake and teardown with states named like Linux conntrack's, and a segment outside
the windows both ends advertised is not trusted to change the state (a blind RST cannot
tear a flow down). ICMP errors are RELATED to the flow of the datagram they quote.

Timeouts follow RFC 5382 (TCP: established >= 2 h 4 min, transitory >= 4 min), RFC 4787
(UDP: >= 2 min, 5 min recommended) and RFC 5508 (ICMP query: 60 s); all configurable.
The table is bounded: when it is full, the oldest unassured entry (one that never saw
traffic both ways, or a TCP flow never established) is evicted for the new one; assured
entries are never evicted, and when only they are left new flows are refused and
counted. A flood of half-open junk cannot push out established flows.
"""

from __future__ import annotations

import heapq
import itertools
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

from stack.counters import Counters
from stack.net.tcp.seq import seq_add, seq_ge, seq_gt, seq_le, seq_lt
from stack.wire.rewrite import ICMP_ERROR_TYPES, ICMP_QUERY_TYPES

ORIGINAL, REPLY = 0, 1
PROTO_ICMP, PROTO_TCP, PROTO_UDP = 1, 6, 17

# TCP states (Linux conntrack's names)
(TCP_NONE, SYN_SENT, SYN_RECV, ESTABLISHED, FIN_WAIT, CLOSE_WAIT, LAST_ACK, TIME_WAIT,
 CLOSE, SYN_SENT2) = range(10)
TCP_STATE_NAMES = ("NONE", "SYN_SENT", "SYN_RECV", "ESTABLISHED", "FIN_WAIT", "CLOSE_WAIT",
                   "LAST_ACK", "TIME_WAIT", "CLOSE", "SYN_SENT2")

_TCP = struct.Struct("!HHIIBBH")  # ports, seq, ack, offset, flags, window
FIN, SYN, RST, ACK = 0x01, 0x02, 0x04, 0x10

COUNTERS = (
    "conntrack.new", "conntrack.destroyed", "conntrack.expired", "conntrack.evicted",
    "conntrack.table_full", "conntrack.clash", "conntrack.invalid",
    "conntrack.out_of_window", "conntrack.related", "conntrack.related_unmatched",
    "conntrack.no_entry",
)


class FlowTuple(NamedTuple):
    proto: int
    src: bytes
    sport: int  # TCP/UDP port; ICMP query identifier; 0 otherwise
    dst: bytes
    dport: int


def invert(t: FlowTuple) -> FlowTuple:
    return FlowTuple(t.proto, t.dst, t.dport, t.src, t.sport)


@dataclass(slots=True)
class ConntrackConfig:
    max_entries: int = 65536
    tcp_established: float = 7440.0  # RFC 5382 REQ-5: at least 2 h 4 min
    tcp_transitory: float = 240.0  # RFC 5382 REQ-5: at least 4 min (opening, closing)
    tcp_close: float = 10.0  # after a RST
    udp: float = 300.0  # RFC 4787 REQ-5: at least 2 min, 5 min recommended
    icmp: float = 60.0  # RFC 5508 REQ-1: ICMP query mappings, 60 s
    generic: float = 600.0  # other protocols


class _Window:
    """What one direction of a TCP flow has sent and may send (sequence space)."""

    __slots__ = ("end", "maxack", "maxend", "maxwin", "scale")

    def __init__(self) -> None:
        self.end = 0  # highest seq + len sent
        self.maxend = 0  # highest seq the other side's ACK + window allow
        self.maxwin = 0  # largest window advertised (scaled); 0: nothing seen yet
        self.scale = 0
        self.maxack: int | None = None  # highest ACK this side sent


class ConntrackEntry:
    __slots__ = ("assured", "bytes", "confirmed", "created", "expires", "fin_dir", "nat",
                 "orig", "packets", "reply", "seen_reply", "state", "windows")

    def __init__(self, orig: FlowTuple, now: float) -> None:
        self.orig = orig
        self.reply = invert(orig)
        self.state = TCP_NONE
        self.expires = now
        self.created = now
        self.assured = False
        self.seen_reply = False
        self.confirmed = False
        self.fin_dir = -1
        self.packets = [0, 0]
        self.bytes = [0, 0]
        self.windows: tuple[_Window, _Window] | None = None
        self.nat: Any = None  # what the NAT keeps for this flow (its mappings)

    @property
    def state_name(self) -> str:
        if self.orig.proto == PROTO_TCP:
            return TCP_STATE_NAMES[self.state]
        return "REPLIED" if self.seen_reply else "UNREPLIED"


def parse_flow(pkt: bytes | bytearray | memoryview) -> tuple[FlowTuple, bool] | None:
    """(the datagram's tuple, True if it is an ICMP error). For an ICMP error the tuple
    is that of the datagram it quotes. None when there is not enough to tell (a non-first
    fragment, a truncated header)."""
    if len(pkt) < 20:
        return None
    hl = (pkt[0] & 0x0F) << 2
    proto = pkt[9]
    src, dst = bytes(pkt[12:16]), bytes(pkt[16:20])
    if (pkt[6] & 0x1F) or pkt[7]:
        return None  # a non-first fragment carries no transport header
    if proto in (PROTO_TCP, PROTO_UDP):
        if len(pkt) < hl + 4:
            return None
        return FlowTuple(proto, src, (pkt[hl] << 8) | pkt[hl + 1], dst,
                         (pkt[hl + 2] << 8) | pkt[hl + 3]), False
    if proto == PROTO_ICMP:
        if len(pkt) < hl + 8:
            return None
        icmp_type = pkt[hl]
        if icmp_type in ICMP_QUERY_TYPES:
            ident = (pkt[hl + 4] << 8) | pkt[hl + 5]
            return FlowTuple(proto, src, ident, dst, ident), False
        if icmp_type in ICMP_ERROR_TYPES:
            inner = parse_flow(pkt[hl + 8:]) if len(pkt) >= hl + 28 else None
            if inner is None or inner[1]:
                return None  # never an error about an error (RFC 1122 3.2.2)
            return inner[0], True
        return FlowTuple(proto, src, 0, dst, 0), False
    return FlowTuple(proto, src, 0, dst, 0), False


class Conntrack:
    def __init__(self, config: ConntrackConfig, counters: Counters) -> None:
        self.config = config
        self.counters = counters
        self.table: dict[FlowTuple, ConntrackEntry] = {}
        self.count = 0  # entries (each is in the table under two tuples)
        self._unassured: dict[ConntrackEntry, None] = {}  # insertion order: oldest first
        self._closing: dict[ConntrackEntry, None] = {}  # TCP flows going away, oldest first
        self._timers: list[tuple[float, int, ConntrackEntry]] = []
        self._order = itertools.count()
        self.on_destroy: list[Callable[[ConntrackEntry], None]] = []
        self.on_confirm: list[Callable[[ConntrackEntry], None]] = []
        counters.declare(*COUNTERS)

    # -- lookup and creation ----------------------------------------------------------------

    def lookup(self, t: FlowTuple) -> tuple[ConntrackEntry, int] | None:
        entry = self.table.get(t)
        if entry is None:
            return None
        return entry, (ORIGINAL if entry.orig == t else REPLY)

    def new(self, t: FlowTuple, now: float) -> ConntrackEntry:
        """An unconfirmed entry for a flow's first datagram. It joins the table at
        confirm(), once the datagram has passed every check (so a datagram that is
        dropped on the way evicts nothing)."""
        return ConntrackEntry(t, now)

    def _evict(self) -> bool:
        """Room for one more: the oldest flow never assured goes, else the oldest TCP
        flow already closing (as Linux's early drop). Established flows never go."""
        for table in (self._unassured, self._closing):
            for victim in table:
                self.remove(victim)
                self.counters["conntrack.evicted"] += 1
                return True
        return False

    def confirm(self, entry: ConntrackEntry, now: float) -> bool:
        """Put a new entry in the table under both tuples (its reply tuple is final now:
        NAT has chosen). False on a clash with an existing flow (counted, not added)."""
        if entry.confirmed:
            return True
        if entry.orig in self.table or entry.reply in self.table:
            self.counters["conntrack.clash"] += 1
            return False
        if self.count >= self.config.max_entries and not self._evict():
            self.counters["conntrack.table_full"] += 1
            return False
        entry.confirmed = True
        self.table[entry.orig] = entry
        self.table[entry.reply] = entry
        self.count += 1
        if not entry.assured:
            self._unassured[entry] = None
        self.counters["conntrack.new"] += 1
        heapq.heappush(self._timers, (entry.expires, next(self._order), entry))
        for callback in self.on_confirm:
            callback(entry)
        return True

    def remove(self, entry: ConntrackEntry) -> None:
        if not entry.confirmed:
            return
        entry.confirmed = False
        for t in (entry.orig, entry.reply):
            if self.table.get(t) is entry:
                del self.table[t]
        self.count -= 1
        self._unassured.pop(entry, None)
        self._closing.pop(entry, None)
        self.counters["conntrack.destroyed"] += 1
        for callback in self.on_destroy:
            callback(entry)

    def _assure(self, entry: ConntrackEntry) -> None:
        if not entry.assured:
            entry.assured = True
            self._unassured.pop(entry, None)

    # -- state ------------------------------------------------------------------------------

    def update(self, entry: ConntrackEntry, direction: int, pkt: bytes | bytearray,
               now: float) -> bool:
        """Account one datagram of the flow and move its state. False when it is not
        valid for the flow (TCP: out of window, or a flag that makes no sense now): the
        state is then left alone."""
        entry.packets[direction] += 1
        entry.bytes[direction] += len(pkt)
        cfg = self.config
        proto = entry.orig.proto
        if direction == REPLY and not entry.seen_reply:
            entry.seen_reply = True
            if proto != PROTO_TCP:
                self._assure(entry)
        if proto == PROTO_TCP:
            return self._tcp(entry, direction, pkt, now)
        entry.expires = now + (cfg.udp if proto == PROTO_UDP else
                               cfg.icmp if proto == PROTO_ICMP else cfg.generic)
        return True

    def _tcp(self, entry: ConntrackEntry, d: int, pkt: bytes | bytearray, now: float) -> bool:
        hl = (pkt[0] & 0x0F) << 2
        if len(pkt) < hl + 20:
            self.counters["conntrack.invalid"] += 1
            return False
        _sp, _dp, seq, ack, off, flags, win = _TCP.unpack_from(pkt, hl)
        thl = (off >> 4) << 2
        total = (pkt[2] << 8) | pkt[3]
        datalen = max(total - hl - thl, 0)
        state = entry.state
        if entry.windows is None:
            entry.windows = (_Window(), _Window())
        sender, receiver = entry.windows[d], entry.windows[1 - d]
        end = seq_add(seq, datalen + (1 if flags & SYN else 0) + (1 if flags & FIN else 0))
        if flags & SYN:
            scale = _wscale(pkt, hl, thl)
            if not flags & ACK:
                if state == TCP_NONE and d == ORIGINAL:
                    sender.end = sender.maxend = end
                    sender.maxwin = max(win, 1)
                    sender.scale = scale if scale is not None else -1
                    entry.state = SYN_SENT
                    entry.expires = now + self.config.tcp_transitory
                    return True
                if state == SYN_SENT and d == REPLY:  # simultaneous open
                    entry.state = SYN_SENT2
                elif state in (SYN_SENT, SYN_SENT2) and d == ORIGINAL:
                    pass  # a retransmitted SYN
                else:
                    self.counters["conntrack.invalid"] += 1
                    return False
            elif state in (SYN_SENT, SYN_SENT2) and d == REPLY and ack == sender_end(entry):
                # the SYN-ACK: now both windows are known
                receiver_scale = receiver.scale
                if scale is None or receiver_scale < 0:
                    receiver.scale = sender.scale = 0  # RFC 7323: both or neither
                else:
                    sender.scale = scale
                sender.end = sender.maxend = end
                sender.maxwin = max(win, 1)
                receiver.maxend = seq_add(ack, max(win, 1))
                sender.maxend = seq_add(sender.end, receiver.maxwin)
                entry.state = SYN_RECV
                entry.expires = now + self.config.tcp_transitory
                return True
            elif state == SYN_SENT2:
                entry.state = SYN_RECV  # a simultaneous open's SYN-ACK, either way
                entry.expires = now + self.config.tcp_transitory
                return True
            elif state in (SYN_RECV, ESTABLISHED) and d == REPLY:
                return True  # a retransmitted SYN-ACK
            else:
                self.counters["conntrack.invalid"] += 1
                return False
        if flags & RST and state in (SYN_SENT, SYN_SENT2) and d == REPLY:
            # a refusal must answer the SYN exactly (RFC 9293 3.10.7.3)
            if not flags & ACK or ack != receiver.end:
                self.counters["conntrack.invalid"] += 1
                return False
        elif flags & RST and receiver.maxack is not None and \
                seq_lt(seq, receiver.maxack):
            # RFC 5961: a RST below what the other side has acknowledged is blind
            self.counters["conntrack.out_of_window"] += 1
            return False
        if not self._in_window(sender, receiver, seq, ack, win, flags, end):
            self.counters["conntrack.out_of_window"] += 1
            return False
        if flags & RST:
            self._set_tcp(entry, CLOSE)
            entry.expires = now + self.config.tcp_close
            return True
        if flags & FIN:
            if state in (ESTABLISHED, SYN_RECV):
                entry.fin_dir = d
                self._set_tcp(entry, FIN_WAIT)
            elif state in (FIN_WAIT, CLOSE_WAIT) and d != entry.fin_dir:
                self._set_tcp(entry, LAST_ACK)
        elif flags & ACK:
            if state == SYN_RECV and d == ORIGINAL:
                entry.state = ESTABLISHED
                self._assure(entry)
            elif state == FIN_WAIT and d != entry.fin_dir:
                self._set_tcp(entry, CLOSE_WAIT)
            elif state == LAST_ACK and d == entry.fin_dir:
                self._set_tcp(entry, TIME_WAIT)
        entry.expires = now + (self.config.tcp_established if entry.state == ESTABLISHED
                               else self.config.tcp_transitory)
        return True

    def _set_tcp(self, entry: ConntrackEntry, state: int) -> None:
        """A move into a closing state makes the flow evictable when the table fills."""
        entry.state = state
        if entry.confirmed and entry not in self._closing:
            self._closing[entry] = None

    @staticmethod
    def _in_window(sender: _Window, receiver: _Window, seq: int, ack: int, win: int,
                   flags: int, end: int) -> bool:
        """The segment lies where its sender may send, and acknowledges what its
        receiver did send (in the spirit of Linux's tcp_in_window)."""
        if receiver.maxwin == 0 or sender.maxwin == 0:
            return True  # a direction not seen yet: nothing to check against
        if not flags & ACK:
            ack = receiver.end
        slack = max(sender.maxwin, receiver.maxwin, 66000)
        ok = (seq_le(seq, sender.maxend)
              and seq_ge(end, seq_add(sender.end, -receiver.maxwin - 1))
              and seq_le(ack, receiver.end)
              and seq_ge(ack, seq_add(receiver.end, -slack)))
        if not ok:
            return False
        if seq_gt(end, sender.end):
            sender.end = end
        scaled = win << max(sender.scale, 0)
        if scaled > sender.maxwin:
            sender.maxwin = scaled
        if flags & ACK:
            limit = seq_add(ack, max(scaled, 1))
            if seq_gt(limit, receiver.maxend):
                receiver.maxend = limit
            if sender.maxack is None or seq_gt(ack, sender.maxack):
                sender.maxack = ack
        if seq_gt(sender.end, sender.maxend):
            sender.maxend = sender.end
        return True

    # -- timers -----------------------------------------------------------------------------

    def poll(self, now: float) -> None:
        timers = self._timers
        while timers and timers[0][0] <= now:
            _, _, entry = heapq.heappop(timers)
            if not entry.confirmed:
                continue
            if entry.expires > now:  # refreshed since: file it again
                heapq.heappush(timers, (entry.expires, next(self._order), entry))
                continue
            self.counters["conntrack.expired"] += 1
            self.remove(entry)

    def next_deadline(self) -> float | None:
        timers = self._timers
        while timers and not timers[0][2].confirmed:
            heapq.heappop(timers)
        return timers[0][0] if timers else None

    def entries(self) -> list[ConntrackEntry]:
        seen: dict[int, ConntrackEntry] = {}
        for entry in self.table.values():
            seen.setdefault(id(entry), entry)
        return list(seen.values())


def is_pure_syn(pkt: bytes | bytearray) -> bool:
    """A TCP segment that opens a connection: SYN without ACK, RST or FIN."""
    hl = (pkt[0] & 0x0F) << 2
    return len(pkt) >= hl + 14 and pkt[hl + 13] & (SYN | ACK | RST | FIN) == SYN


def sender_end(entry: ConntrackEntry) -> int:
    """What the original side's SYN (and data) reached: a SYN-ACK must acknowledge it."""
    assert entry.windows is not None
    return entry.windows[ORIGINAL].end


def _wscale(pkt: bytes | bytearray, hl: int, thl: int) -> int | None:
    """The window-scale option of a SYN, if any (RFC 7323 2.2)."""
    i, end = hl + 20, min(hl + thl, len(pkt))
    while i < end:
        kind = pkt[i]
        if kind == 0:
            break
        if kind == 1:
            i += 1
            continue
        if i + 1 >= end or pkt[i + 1] < 2:
            break
        if kind == 3 and pkt[i + 1] == 3 and i + 2 < end:
            return min(pkt[i + 2], 14)
        i += pkt[i + 1]
    return None
