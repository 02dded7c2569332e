"""The TCP layer: demultiplexing by 4-tuple, listeners, RSTs for closed ports, ISNs,
ephemeral ports, and one timer structure for every connection.

Timers: each connection has at most one entry that matters in a heap; an entry is pushed
only when the connection's deadline moves earlier than what is scheduled, and a stale
entry (the deadline moved later) just causes one cheap re-check. A connection with no
timer costs nothing; a closed one leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import random
import struct
from collections.abc import Callable

from stack.counters import Counters
from stack.net.ipv4 import IPv4Layer
from stack.net.packet import PacketInfo
from stack.net.tcp.connection import (
    CLOSED,
    LISTEN,
    STATE_NAMES,
    SYN_SENT,
    Connection,
    TcpConfig,
)
from stack.net.tcp.seq import MASK, seq_add, seq_ge, seq_lt
from stack.net.tcp.syncookie import check_cookie, decode_options, encode_options, make_cookie
from stack.net.tcp.template import make_template
from stack.net.tcp.timewait import TimeWait, TimeWaitTable
from stack.trace import OFF, Trace
from stack.wire.errors import MalformedError
from stack.wire.ipv4 import FLAG_DF, PROTO_TCP, IPv4Header, ip_to_str
from stack.wire.tcp import (
    ACK,
    FIN,
    RST,
    SYN,
    Segment,
    build_options,
    build_tcp,
    build_tcp_offloaded,
    parse_tcp,
)
from stack.wire.virtio import tcp_offload_header

EPHEMERAL_LOW, EPHEMERAL_HIGH = 32768, 60999  # Linux's default range
_QUOTED_TCP = struct.Struct("!HHI")  # the 8 quoted bytes: ports and sequence number

COUNTERS = (
    "tcp.rx_segments", "tcp.tx_segments", "tcp.rx_truncated", "tcp.rx_bad_data_offset",
    "tcp.rx_bad_checksum", "tcp.rx_bad_option", "tcp.rx_to_broadcast",
    "tcp.active_opens", "tcp.passive_opens", "tcp.resets_sent", "tcp.resets_received",
    "tcp.rx_closed_port", "tcp.retransmits", "tcp.fast_retransmits", "tcp.rto_expiries",
    "tcp.timeouts", "tcp.out_of_order_segments", "tcp.out_of_order_fin", "tcp.ooo_dropped",
    "tcp.out_of_window", "tcp.rst_out_of_window", "tcp.rst_challenged", "tcp.syn_challenged",
    "tcp.ack_unsent", "tcp.ack_too_old", "tcp.paws_rejected", "tcp.challenge_acks",
    "tcp.challenge_acks_limited", "tcp.listen_overflows", "tcp.window_probes",
    "tcp.keepalive_probes", "tcp.keepalive_timeouts", "tcp.time_wait_reused",
    "tcp.time_wait_fin_acked", "tcp.ephemeral_exhausted", "tcp.zero_window_drops",
    "tcp.icmp_errors", "tcp.icmp_bad_seq", "tcp.sack_retransmits", "tcp.tlp_probes",
    "tcp.syncookies_sent", "tcp.syncookies_ok", "tcp.syncookies_failed",
    "tcp.connection_limit", "tcp.per_source_limit", "tcp.lost_retransmits",
    "tcp.tso_frames", "tcp.predicted_acks", "tcp.predicted_data", "tcp.spurious_rtos",
    "tcp.dsacks_received",
    "tcp.reorder_timeouts", "tcp.rx_syn_fin", "tcp.window_probe_timeouts",
    "tcp.time_wait_recycled", "tcp.aborted_on_error", "tcp.spurious_recoveries",
)
COOKIE_LIFE = 128.0  # a cookie stays valid for two of its 64 s periods


class Listener:
    """A passive open on a port (on one local address, or on all when `address` is
    None); `on_accept(conn)` attaches the application."""

    __slots__ = ("address", "backlog", "on_accept", "port", "syn_queue")

    def __init__(self, port: int, backlog: int, on_accept: Callable[[Connection], None],
                 address: bytes | None = None):
        self.port = port
        self.address = address
        self.backlog = backlog
        self.on_accept = on_accept
        self.syn_queue: set[Connection] = set()


class TcpLayer:
    trace: Trace = OFF  # the node's
    def __init__(self, ipv4: IPv4Layer, counters: Counters, config: TcpConfig,
                 rng: random.Random, challenge_ack_limit: int = 1000) -> None:
        self.ipv4 = ipv4
        self.counters = counters
        self.hot = counters.hot  # the per-segment counters (counters.py)
        self.config = config
        self.rng = rng
        self.offload = False  # some interface takes TSO and checksum offload (--offload)
        self.now = 0.0
        # the full 4-tuple: (remote ip, remote port, local ip, local port)
        self.connections: dict[tuple[bytes, int, bytes, int], Connection] = {}
        self.time_wait = TimeWaitTable(config.max_time_wait)  # same keys, apart
        # a bug met while handling one connection: the node counts and records it
        self.on_internal_error: Callable[[Exception], None] | None = None
        self._cookies_until = -1.0  # SYN cookies were sent recently: ACKs may carry one
        self.listeners: dict[int, Listener] = {}  # on every local address, by port
        self.bound_listeners: dict[tuple[bytes, int], Listener] = {}  # (address, port)
        self.state_counts = [0] * len(STATE_NAMES)
        self.per_source: dict[bytes, int] = {}  # remote address -> connections
        self.local_ports: dict[tuple[bytes, int], int] = {}  # (address, port) -> connections
        # set by a NAT: (protocol, address, port) -> True when that public port is its own
        self.reserved: Callable[[int, bytes, int], bool] | None = None
        # with workers: owns(remote address, remote port, local port), whether the
        # replies of a connection would come to this worker (stack/workers.py)
        self.owns: Callable[[bytes, int, int], bool] | None = None
        self._dirty: dict[Connection, None] = {}
        self._timers: list[tuple[float, int, Connection]] = []
        self._tiebreak = itertools.count()
        self._secret = rng.randbytes(16)
        self._challenge_limit = challenge_ack_limit
        self._challenge_window = -1
        self._challenge_count = 0
        counters.declare(*COUNTERS)
        ipv4.handlers[PROTO_TCP] = self.receive
        ipv4.fused_tcp = self.receive_fused  # the same input, parsed by IPv4's fast path
        ipv4.error_handlers[PROTO_TCP] = self.receive_error

    # == the application side ==============================================================

    def listen(self, port: int, on_accept: Callable[[Connection], None],
               backlog: int = 128, address: bytes | None = None) -> Listener:
        """Listen on `port` of every local address, or of `address` only."""
        taken = port in self.listeners or (
            any(p == port for _, p in self.bound_listeners) if address is None
            else (address, port) in self.bound_listeners)
        if taken:
            raise OSError(98, f"TCP port {port} is already listening")
        if address is None:
            listener = self.listeners[port] = Listener(port, backlog, on_accept)
            return listener
        if address not in self.ipv4.local:
            raise OSError(99, "cannot listen on an address that is not ours")
        listener = self.bound_listeners[(address, port)] = Listener(port, backlog, on_accept,
                                                                    address)
        return listener

    def unlisten(self, port: int, address: bytes | None = None) -> None:
        listener = self.listeners.pop(port, None) if address is None else \
            self.bound_listeners.pop((address, port), None)
        if listener is not None:
            for conn in list(listener.syn_queue):
                conn.abort()

    def connect(self, remote_ip: bytes, remote_port: int, now: float,
                local_port: int | None = None, config: TcpConfig | None = None,
                local_ip: bytes | None = None) -> Connection:
        """Active open (RFC 9293 3.10.1); the SYN leaves at the next poll. The local
        address is the route's source address unless given."""
        self.now = now
        if local_ip is None:
            local_ip = self.ipv4.source_for(remote_ip)
            if local_ip is None:
                raise OSError(101, "network is unreachable (no route)")
        elif local_ip not in self.ipv4.local:
            raise OSError(99, "cannot bind to an address that is not ours")
        if local_port is None:
            local_port = self._ephemeral_port(local_ip, remote_ip, remote_port)
        elif self.owns is not None and not self.owns(remote_ip, remote_port, local_port):
            raise OSError(99, f"local port {local_port} to that peer belongs to another "
                              "worker (let the stack pick the port)")
        key = (remote_ip, remote_port, local_ip, local_port)
        if key in self.connections or key in self.time_wait:
            raise OSError(98, "that connection already exists")
        conn = self._new_connection(local_ip, remote_ip, remote_port, local_port,
                                    config or self.config, now)
        self.connections[key] = conn
        self.counters["tcp.active_opens"] += 1
        conn.open_active(now)
        return conn

    def _ephemeral_port(self, local_ip: bytes, remote_ip: bytes, remote_port: int) -> int:
        """RFC 6056 3.3.1 (algorithm 1): a random start, then the next free port."""
        span = EPHEMERAL_HIGH - EPHEMERAL_LOW + 1
        start = self.rng.randrange(span)
        for i in range(span):
            port = EPHEMERAL_LOW + (start + i) % span
            key = (remote_ip, remote_port, local_ip, port)
            if key not in self.connections and key not in self.time_wait \
                    and port not in self.listeners \
                    and not (self.reserved is not None and self.reserved(6, local_ip, port)):
                return port
        self.counters["tcp.ephemeral_exhausted"] += 1
        raise OSError(99, "no free ephemeral port")

    def isn(self, local_ip: bytes, local_port: int, remote_ip: bytes, remote_port: int,
            now: float) -> int:
        """RFC 6528: a 4-microsecond clock plus a keyed hash of the connection's 4-tuple."""
        digest = hashlib.blake2s(
            local_ip + local_port.to_bytes(2, "big") + remote_ip
            + remote_port.to_bytes(2, "big"), key=self._secret, digest_size=4).digest()
        return (int(now * 250_000) + int.from_bytes(digest, "big")) & MASK

    def _new_connection(self, local_ip: bytes, remote_ip: bytes, remote_port: int,
                        local_port: int, config: TcpConfig, now: float) -> Connection:
        iss = self.isn(local_ip, local_port, remote_ip, remote_port, now)
        conn = Connection(self, local_ip, local_port, remote_ip, remote_port, iss, config,
                          self.rng.getrandbits(32))
        self.state_counts[CLOSED] += 1
        self.per_source[remote_ip] = self.per_source.get(remote_ip, 0) + 1
        here = (local_ip, local_port)
        self.local_ports[here] = self.local_ports.get(here, 0) + 1
        return conn

    # == input ============================================================================

    def receive(self, ip: IPv4Header, payload: memoryview, now: float,
                info: PacketInfo) -> None:
        self.now = now
        c = self.counters
        self.hot.tcp_rx_segments += 1
        if info.broadcast:
            c["tcp.rx_to_broadcast"] += 1  # RFC 1122 4.2.3.10: TCP is unicast only
            return
        try:
            seg = parse_tcp(payload, ip.src, ip.dst, verify_checksum=not info.trusted)
        except MalformedError as exc:
            c["tcp.rx_" + exc.reason] += 1
            return
        self._segment_arrives(ip.src, ip.dst, seg, now)

    def receive_fused(self, src: bytes, dst: bytes, seg: Segment, now: float) -> None:
        """A segment the IPv4 layer's fused path parsed and checked (unicast, checksum
        good): what receive() does once it has parsed one."""
        self.now = now
        self.hot.tcp_rx_segments += 1
        self._segment_arrives(src, dst, seg, now)

    def _segment_arrives(self, src: bytes, dst: bytes, seg: Segment, now: float) -> None:
        """To its connection, its TIME-WAIT record, a listener, or the closed port."""
        c = self.counters
        key = (src, seg.src_port, dst, seg.dst_port)
        conn = self.connections.get(key)
        if conn is not None:
            try:
                conn.segment_arrives(seg, now)
            except Exception:
                self._abort_broken(conn)
                raise  # the node counts it as an internal error
            return
        if self.time_wait.records:
            tw = self.time_wait.get(key)
            if tw is not None:
                if seg.flags & (SYN | ACK | RST | FIN) == SYN and tw.reusable_by(seg):
                    c["tcp.time_wait_reused"] += 1
                    self._end_time_wait(tw)
                else:
                    self._time_wait_input(tw, seg, now)
                    return
        listener = None
        if self.bound_listeners:
            listener = self.bound_listeners.get((dst, seg.dst_port))
        if listener is None:
            listener = self.listeners.get(seg.dst_port)
        if listener is not None:
            self._listen_input(listener, dst, src, seg, now)
        else:
            self._closed_input(dst, src, seg)

    def receive_error(self, icmp_type: int, code: int, mtu: int, header: IPv4Header,
                      data: memoryview, now: float) -> None:
        """An ICMP error quoting one of our segments (RFC 1122 4.2.3.9, RFC 5927)."""
        self.now = now
        c = self.counters
        sport, dport, seq = _QUOTED_TCP.unpack_from(data, 0)
        conn = self.connections.get((header.dst, dport, header.src, sport))
        if conn is None:
            c["icmp.rx_errors_unmatched"] += 1
            return
        # RFC 5927 4.1: believe only errors about a sequence number still in flight
        if not (seq_ge(seq, conn.snd_una) and seq_lt(seq, conn.snd_max)):
            c["tcp.icmp_bad_seq"] += 1
            return
        c["tcp.icmp_errors"] += 1
        if icmp_type == 3 and code == 4:
            new = self.ipv4.update_pmtu(header.dst, mtu, now)
            if new is not None:
                for other in list(self.connections.values()):
                    if other.remote_ip == header.dst:
                        other.path_mtu_changed(new)
        elif icmp_type == 3 and code in (2, 3) and conn.state == SYN_SENT:
            conn._terminate(ConnectionRefusedError(
                f"connection refused by {self.peer_name(conn)} (ICMP)"))
        # other errors are soft (RFC 1122 4.2.3.9): the retransmission timer decides

    def path_mtu(self, dst: bytes) -> int:
        return self.ipv4.path_mtu(dst, self.now)

    def link_mtu(self, dst: bytes) -> int:
        """The MTU of the link towards `dst`: our MSS is derived from it."""
        return self.ipv4.link_mtu(dst)

    # -- TIME-WAIT ------------------------------------------------------------------------

    def enter_time_wait(self, conn: Connection, window: int, now: float) -> None:
        """Replace `conn` (which just entered TIME-WAIT) by a small record, 2 MSL long."""
        tw = TimeWait(conn.local_ip, conn.local_port, conn.remote_ip, conn.remote_port,
                      conn.snd_max, conn.rcv_nxt, window, conn.rcv_wscale, conn.ts_ok,
                      conn.ts_recent, conn._ts_offset, now + 2 * conn.config.msl,
                      2 * conn.config.msl)
        self.state_changed(conn, conn.state, CLOSED)
        conn.state = CLOSED
        self.remove(conn)
        recycled = self.time_wait.add(tw)
        if recycled is not None:
            self.counters["tcp.time_wait_recycled"] += 1
            self._forget_time_wait(recycled)
        here = (tw.local_ip, tw.local_port)
        self.local_ports[here] = self.local_ports.get(here, 0) + 1

    def _time_wait_input(self, tw: TimeWait, seg: Segment, now: float) -> None:
        what = tw.arrives(seg)
        if what == "ignore":
            return
        if what == "restart":
            self.counters["tcp.time_wait_fin_acked"] += 1
            self.time_wait.restart(tw, now + tw.life)
        elif not self.allow_challenge_ack(now):
            return
        segment = build_tcp(tw.local_ip, tw.remote_ip, tw.local_port, tw.remote_port,
                            tw.snd_nxt, tw.rcv_nxt, ACK, tw.window, tw.ack_options(now))
        self.hot.tcp_tx_segments += 1
        self.ipv4.send(tw.remote_ip, PROTO_TCP, segment, now, flags_fragment=FLAG_DF,
                       src=tw.local_ip)

    def _end_time_wait(self, tw: TimeWait) -> None:
        self.time_wait.remove(tw)
        self._forget_time_wait(tw)

    def _forget_time_wait(self, tw: TimeWait) -> None:
        _decrement(self.local_ports, (tw.local_ip, tw.local_port))
        if self.trace.on:
            self.trace.emit("tcp", "state", self.now, local=ip_to_str(tw.local_ip),
                            local_port=tw.local_port, remote=ip_to_str(tw.remote_ip),
                            remote_port=tw.remote_port, old="TIME-WAIT", new="CLOSED")

    # -- bugs -------------------------------------------------------------------------------

    def _abort_broken(self, conn: Connection) -> None:
        """A bug met half-way through this connection's work: its state may be half
        updated, so it must not go on. Reset it and forget it."""
        self.counters["tcp.aborted_on_error"] += 1
        if conn.state == CLOSED:
            self.remove(conn)  # it had ended already; make sure the table knows
            return
        try:
            conn.abort()
        except Exception:
            if conn.state != CLOSED:  # could not even reset: at least forget it
                self.state_changed(conn, conn.state, CLOSED)
                conn.state = CLOSED
                self.remove(conn)

    def _listen_input(self, listener: Listener, local: bytes, src: bytes, seg: Segment,
                      now: float) -> None:
        """RFC 9293 3.10.7.2."""
        flags = seg.flags
        if flags & RST:
            return
        if flags & ACK:
            if not flags & SYN and self.config.syncookies and now < self._cookies_until \
                    and self._accept_cookie(listener, local, src, seg, now):
                return
            self.send_rst(local, seg.dst_port, src, seg.src_port, seg.ack, 0, False)
            self.counters["tcp.resets_sent"] += 1
            return
        if not flags & SYN:
            return
        if flags & FIN:
            self.counters["tcp.rx_syn_fin"] += 1  # illegal; scanners use it
            return
        if not self._admit(src):
            return
        if len(listener.syn_queue) >= listener.backlog:
            self.counters["tcp.listen_overflows"] += 1
            if self.config.syncookies:
                self._send_cookie(local, src, seg, now)
            return
        conn = self._new_connection(local, src, seg.src_port, seg.dst_port, self.config, now)
        conn._listener = listener
        listener.syn_queue.add(conn)
        self.connections[(src, seg.src_port, local, seg.dst_port)] = conn
        self.counters["tcp.passive_opens"] += 1
        conn.open_passive(seg, now)

    # -- limits and SYN cookies -------------------------------------------------------------

    def _admit(self, src: bytes) -> bool:
        """Room for one more connection, in total and from this source?"""
        cfg = self.config
        if len(self.connections) >= cfg.max_connections:
            self.counters["tcp.connection_limit"] += 1
            return False
        if cfg.max_per_source and self.per_source.get(src, 0) >= cfg.max_per_source:
            self.counters["tcp.per_source_limit"] += 1
            return False
        return True

    @staticmethod
    def _four_tuple(local: bytes, src: bytes, seg: Segment) -> bytes:
        return local + seg.dst_port.to_bytes(2, "big") + src + seg.src_port.to_bytes(2, "big")

    def _send_cookie(self, local: bytes, src: bytes, seg: Segment, now: float) -> None:
        """Answer the SYN statelessly (RFC 4987 3.6): all we need is in the ISN."""
        opts = seg.options
        cookie = make_cookie(self._secret, self._four_tuple(local, src, seg), seg.seq,
                             opts.mss or 536, now)
        cfg = self.config
        ts = None
        if cfg.timestamps and opts.ts_val is not None:
            # the peer's window scale (ours is in the config) and whether SACK is on
            ts_val = encode_options((int(now * 1000)) & MASK,
                                    opts.wscale if cfg.wscale is not None else None,
                                    cfg.sack and opts.sack_permitted)
            ts = (ts_val, opts.ts_val)
        options = build_options(mss=self.link_mtu(src) - 40,
                                wscale=cfg.wscale if ts and opts.wscale is not None else None,
                                sack_permitted=bool(ts) and cfg.sack and opts.sack_permitted,
                                ts=ts)
        segment = build_tcp(local, src, seg.dst_port, seg.src_port, cookie,
                            seq_add(seg.seq, 1), SYN | ACK, 0xFFFF, options)
        self.hot.tcp_tx_segments += 1
        self.counters["tcp.syncookies_sent"] += 1
        self._cookies_until = now + COOKIE_LIFE
        self.ipv4.send(src, PROTO_TCP, segment, now, flags_fragment=FLAG_DF, src=local)

    def _accept_cookie(self, listener: Listener, local: bytes, src: bytes, seg: Segment,
                       now: float) -> bool:
        """The third segment of a cookie handshake: rebuild the connection, ESTABLISHED."""
        c = self.counters
        client_isn = seq_add(seg.seq, -1)
        cookie = seq_add(seg.ack, -1)
        mss = check_cookie(self._secret, self._four_tuple(local, src, seg), client_isn, cookie,
                           now)
        if mss is None:
            c["tcp.syncookies_failed"] += 1
            return False
        if not self._admit(src):
            return True  # valid, but no room: drop it, the client will retry
        wscale, sack_ok = None, False
        ts = seg.options.ts_val
        if ts is not None and seg.options.ts_ecr:
            wscale, sack_ok = decode_options(seg.options.ts_ecr)
        conn = self._new_connection(local, src, seg.src_port, seg.dst_port, self.config, now)
        conn.iss = cookie
        self.connections[(src, seg.src_port, local, seg.dst_port)] = conn
        c["tcp.syncookies_ok"] += 1
        c["tcp.passive_opens"] += 1
        conn.open_from_cookie(seg, mss, wscale, sack_ok, now)
        listener.on_accept(conn)
        conn.segment_arrives(seg, now)  # any data riding on the ACK
        return True

    def _closed_input(self, local: bytes, src: bytes, seg: Segment) -> None:
        """RFC 9293 3.10.7.1: answer anything but a RST with a RST."""
        c = self.counters
        c["tcp.rx_closed_port"] += 1
        if seg.flags & RST:
            return
        if seg.flags & ACK:
            self.send_rst(local, seg.dst_port, src, seg.src_port, seg.ack, 0, False)
        else:
            self.send_rst(local, seg.dst_port, src, seg.src_port, 0,
                          seq_add(seg.seq, seg.seg_len), True)
        c["tcp.resets_sent"] += 1

    # == called by connections ============================================================

    def established(self, conn: Connection) -> None:
        listener = conn._listener
        if listener is None:
            if conn.user is not None:
                conn.user.on_established()
            return
        listener.syn_queue.discard(conn)
        conn._listener = None
        current = self.listeners.get(listener.port) if listener.address is None else \
            self.bound_listeners.get((listener.address, listener.port))
        if current is not listener:
            conn.abort()  # the listener was closed meanwhile
            return
        listener.on_accept(conn)

    def state_changed(self, conn: Connection, old: int, new: int) -> None:
        counts = self.state_counts
        counts[old] -= 1
        counts[new] += 1

    def mark_dirty(self, conn: Connection) -> None:
        self._dirty[conn] = None

    def remove(self, conn: Connection) -> None:
        """Take a CLOSED connection out of the table and the counts (once: a second
        call, e.g. an abort after a bug, changes nothing)."""
        key = (conn.remote_ip, conn.remote_port, conn.local_ip, conn.local_port)
        if conn._listener is not None:
            conn._listener.syn_queue.discard(conn)
            conn._listener = None
        self._dirty.pop(conn, None)
        if self.connections.get(key) is not conn:
            return
        del self.connections[key]
        self.state_counts[CLOSED] -= 1
        _decrement(self.per_source, conn.remote_ip)
        _decrement(self.local_ports, (conn.local_ip, conn.local_port))

    def allow_challenge_ack(self, now: float) -> bool:
        """RFC 5961 7: a global per-second budget for challenge ACKs."""
        second = int(now)
        if second != self._challenge_window:
            self._challenge_window = second
            self._challenge_count = 0
        self._challenge_count += 1
        if self._challenge_count > self._challenge_limit:
            self.counters["tcp.challenge_acks_limited"] += 1
            return False
        self.counters["tcp.challenge_acks"] += 1
        return True

    def peer_name(self, conn: Connection) -> str:
        return f"{ip_to_str(conn.remote_ip)}:{conn.remote_port}"

    def tso_limit(self, conn: Connection) -> int:
        """The most payload one segment may carry: one MSS, or with TSO as many MSS as fit
        a 64 KB IPv4 datagram (the kernel cuts them)."""
        if not self.offload or not self.ipv4.can_offload(conn.remote_ip, self.now, tso=True):
            return conn.eff_mss
        mss = conn.eff_mss
        return max((65535 - 20 - 60) // mss, 1) * mss

    def emit(self, conn: Connection, seq: int, ack: int, flags: int, window: int,
             options: bytes, payload: bytes) -> None:
        self.hot.tcp_tx_segments += 1
        tpl = conn.frame_template
        ipv4 = self.ipv4
        if tpl is None or not tpl.still_valid(ipv4, self.now):
            tpl = conn.frame_template = make_template(ipv4, conn, self.now)
        if tpl is not None and 40 + len(options) + len(payload) <= tpl.mtu:
            ipv4._ident = ident = (ipv4._ident + 1) & 0xFFFF
            ipv4.hot.ipv4_tx_packets += 1
            tpl.iface.tx.append(tpl.frame(seq, ack, flags, window, options, payload, ident))
            return
        if self.offload and self.ipv4.can_offload(conn.remote_ip, self.now):
            segment = build_tcp_offloaded(conn.local_ip, conn.remote_ip, conn.local_port,
                                          conn.remote_port, seq, ack, flags, window, options,
                                          payload)
            header = tcp_offload_header(20, 20 + len(options), len(payload), conn.eff_mss)
            if len(payload) > conn.eff_mss:
                self.counters["tcp.tso_frames"] += 1
            self.ipv4.send(conn.remote_ip, PROTO_TCP, segment, self.now,
                           flags_fragment=FLAG_DF, offload=header, src=conn.local_ip)
            return
        segment = build_tcp(conn.local_ip, conn.remote_ip, conn.local_port, conn.remote_port,
                            seq, ack, flags, window, options, payload)
        ipv4.send(conn.remote_ip, PROTO_TCP, segment, self.now, flags_fragment=FLAG_DF,
                  src=conn.local_ip)

    def send_rst(self, local_ip: bytes, local_port: int, remote_ip: bytes, remote_port: int,
                 seq: int, ack: int, with_ack: bool) -> None:
        flags = RST | (ACK if with_ack else 0)
        segment = build_tcp(local_ip, remote_ip, local_port, remote_port, seq, ack, flags, 0)
        self.hot.tcp_tx_segments += 1
        self.ipv4.send(remote_ip, PROTO_TCP, segment, self.now, flags_fragment=FLAG_DF,
                       src=local_ip)

    # == timers and output ================================================================

    def poll(self, now: float) -> None:
        """Fire due timers, then let every connection that changed send what it can."""
        self.now = now
        timers = self._timers
        while timers and timers[0][0] <= now:
            at, _, conn = heapq.heappop(timers)
            if conn.timer_at != at or conn.state == CLOSED:
                continue  # stale: the deadline moved, or the connection is gone
            conn.timer_at = None
            try:
                conn.on_timer(now)
            except Exception as exc:
                self._broken_in_poll(conn, exc)
                continue
            if conn.state != CLOSED:
                self._dirty[conn] = None
        if self.time_wait.records:
            for tw in self.time_wait.expired(now):
                self._forget_time_wait(tw)
        while self._dirty:
            dirty = self._dirty
            self._dirty = {}
            for conn in dirty:
                if conn.state != CLOSED:
                    try:
                        conn.output(now)
                    except Exception as exc:
                        self._broken_in_poll(conn, exc)
                        continue
                    self._schedule(conn)

    def _broken_in_poll(self, conn: Connection, exc: Exception) -> None:
        self._abort_broken(conn)
        if self.on_internal_error is not None:
            self.on_internal_error(exc)
        else:
            raise exc

    def _schedule(self, conn: Connection) -> None:
        at = conn.deadline()
        if at is not None and (conn.timer_at is None or at < conn.timer_at):
            conn.timer_at = at
            heapq.heappush(self._timers, (at, next(self._tiebreak), conn))

    def next_deadline(self) -> float | None:
        """The earliest real deadline. Stale heads are dropped and heads whose connection
        moved its deadline later are re-filed, so an idle stack never wakes for nothing."""
        tw = self.time_wait.next_deadline() if self.time_wait.records else None
        conn = self._next_connection_deadline()
        if tw is None or (conn is not None and conn < tw):
            return conn
        return tw

    def _next_connection_deadline(self) -> float | None:
        timers = self._timers
        while timers:
            at, _, conn = timers[0]
            if conn.timer_at != at or conn.state == CLOSED:
                heapq.heappop(timers)
                continue
            actual = conn.deadline()
            if actual is not None and actual <= at:
                return at
            heapq.heappop(timers)
            conn.timer_at = None
            if actual is not None:
                self._schedule(conn)
        return None

    def port_in_use(self, address: bytes, port: int) -> bool:
        """A listener or a connection of ours holds this local address and port."""
        return port in self.listeners or (address, port) in self.bound_listeners or \
            (address, port) in self.local_ports

    def gauges(self) -> dict[str, int]:
        g = {"tcp.connections": len(self.connections),
             "tcp.listeners": len(self.listeners) + len(self.bound_listeners)}
        for state, name in enumerate(STATE_NAMES):
            # a listener is not a connection: no connection is ever in LISTEN here, so
            # `listeners` (above) counts them and there is no state_listen to confuse
            if state not in (CLOSED, LISTEN):
                g["tcp.state_" + name.lower().replace("-", "_")] = self.state_counts[state]
        g["tcp.state_time_wait"] = len(self.time_wait)  # records, not connections
        return g

    def abort_all(self) -> None:
        """Shutdown: reset every synchronized connection, forget the rest."""
        for conn in list(self.connections.values()):
            conn.abort()


def _decrement(counts: dict, key: object) -> None:
    """One fewer for `key`; the entry goes at zero (the tables stay as small as what is
    in use)."""
    left = counts.get(key, 0) - 1
    if left > 0:
        counts[key] = left
    else:
        counts.pop(key, None)
