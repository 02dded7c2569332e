"""One TCP connection: the RFC 9293 state machine with its timers, pure and clock-free.

Input:  segment_arrives(seg, now), on_timer(now), and the user calls send(), shutdown(),
        close(), abort(), pause_reading(), resume_reading().
Output: output(now) emits segments through the layer; the user object is told about
        establishment, data, end of stream, progress of the send buffer and the end.

Nothing is transmitted from inside a user call: the connection marks itself dirty and
the layer calls output() when the runtime flushes, so writes made in one event-loop
iteration leave as few, full segments.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from stack.net.tcp.buffers import OutOfOrderQueue, SendBuffer
from stack.net.tcp.congestion import DEFAULT as DEFAULT_CC
from stack.net.tcp.congestion import make as make_cc
from stack.net.tcp.rack import Rack
from stack.net.tcp.rto import RtoEstimator
from stack.net.tcp.sack import SackScoreboard
from stack.net.tcp.seq import (
    MASK,
    seq_add,
    seq_diff,
    seq_ge,
    seq_gt,
    seq_le,
    seq_lt,
)
from stack.wire.ipv4 import ip_to_str
from stack.wire.tcp import ACK, FIN, PSH, RST, SYN, Segment, build_options

if TYPE_CHECKING:
    from stack.net.tcp.layer import TcpLayer

# States (RFC 9293 3.3.2). CLOSED is where a connection ends; LISTEN lives in Listener.
CLOSED, LISTEN, SYN_SENT, SYN_RECEIVED, ESTABLISHED, FIN_WAIT_1, FIN_WAIT_2, CLOSE_WAIT, \
    CLOSING, LAST_ACK, TIME_WAIT = range(11)
STATE_NAMES = ("CLOSED", "LISTEN", "SYN-SENT", "SYN-RECEIVED", "ESTABLISHED", "FIN-WAIT-1",
               "FIN-WAIT-2", "CLOSE-WAIT", "CLOSING", "LAST-ACK", "TIME-WAIT")

# States in which we may still send data, and in which received data is delivered.
_SEND_STATES = frozenset({ESTABLISHED, CLOSE_WAIT})
_PROBE_STATES = frozenset({ESTABLISHED, CLOSE_WAIT, FIN_WAIT_1, CLOSING, LAST_ACK})
_RECV_STATES = frozenset({ESTABLISHED, FIN_WAIT_1, FIN_WAIT_2})

TS_OPTION_LEN = 12  # NOP NOP TS: what every data segment carries when timestamps are on
MAX_SACK_BLOCKS = 3  # with timestamps, 3 blocks fit in 40 option bytes (RFC 2018 3)
WC_DELACK = 0.2  # RFC 8985 7.2 WCDelAckT: the longest a peer may delay an ACK
PAWS_IDLE = 24 * 86400.0  # RFC 7323 5.5: TS.Recent is invalid after 24 days idle


@dataclass(slots=True)
class TcpConfig:
    msl: float = 30.0  # TIME-WAIT lasts 2 * msl
    rcvbuf: int = 1 << 20  # receive window and the bytes held for a paused reader
    ooo_limit: int = 1 << 20  # out-of-order bytes held per connection
    ooo_max_blocks: int = 512  # and islands of them
    wscale: int = 7
    sack: bool = True
    timestamps: bool = True
    initial_rto: float = 1.0
    min_rto: float = 0.2
    max_rto: float = 120.0
    syn_retries: int = 6  # like Linux tcp_syn_retries
    synack_retries: int = 4  # the handshake timeout: SYN-ACKs at 1+2+4+8+16 s, then gone
    retries: int = 15  # data retransmissions (or window probes) unanswered before giving up
    orphan_retries: int = 8  # window probes, answered or not, once the user has closed
    delayed_ack: float = 0.04
    quickack_segments: int = 16  # ACK every segment at first, so the peer's slow start runs
    keepalive: bool = False
    keepalive_idle: float = 7200.0
    keepalive_interval: float = 75.0
    keepalive_count: int = 9
    nodelay: bool = False
    cc: str = DEFAULT_CC  # congestion control: cubic, newreno or bbr
    syncookies: bool = True  # answer with SYN cookies when a SYN queue is full
    max_connections: int = 65536  # in the table, TIME-WAIT aside; new ones are refused beyond
    max_time_wait: int = 32768  # TIME-WAIT records; beyond, the oldest is recycled
    max_per_source: int = 0  # per remote address; 0: no limit


class ConnectionUser(Protocol):
    """What the connection tells the application side (the API's transport)."""

    def on_established(self) -> None: ...
    def on_data(self, data: bytes) -> None: ...
    def on_eof(self) -> None: ...
    def on_acked(self) -> None: ...
    def on_closed(self, exc: Exception | None) -> None: ...


class Connection:
    __slots__ = (
        "_ack_now", "_closed_notified", "_eof_pending", "_dupacks", "_fin_queued", "_in_recovery",
        "_keepalive_probes", "_last_ack_sent", "_persist_backoff", "_quickack",
        "_rcv_buffer", "_recover", "_retries", "_rtt_seq", "_rtt_time", "_segs_unacked",
        "_ts_offset", "_user_closed", "cc", "config", "eff_mss", "iss", "irs", "layer",
        "local_ip", "local_port", "max_snd_wnd", "ooo", "passive", "peer_mss",
        "rcv_adv", "rcv_nxt", "rcv_wscale", "reading_paused", "remote_ip", "remote_port",
        "rto", "sack_ok", "segs_in", "segs_out", "retransmits", "snd_buf", "snd_max",
        "snd_nxt", "snd_una", "snd_wl1", "snd_wl2", "snd_wnd", "snd_wscale", "state",
        "t_delack", "t_keepalive", "t_persist", "t_rtx", "t_timewait", "timer_at",
        "ts_ok", "ts_recent", "ws_ok", "ts_recent_time", "user", "last_recv", "nodelay",
        "_listener", "keepalive", "_sack", "_sack_recovery", "_rack", "_tlp_armed",
        "_tlp_done", "_rack_armed", "_rack_left", "_eifel", "_reo_armed", "_probes_unanswered",
        "_orphan_probes", "_snd_sml", "_cwnd_limited", "_undo_retrans", "_undo_tsval",
    )

    def __init__(self, layer: TcpLayer, local_ip: bytes, local_port: int, remote_ip: bytes,
                 remote_port: int, iss: int, config: TcpConfig, ts_offset: int) -> None:
        self.layer = layer
        self.config = config
        self.local_ip, self.local_port = local_ip, local_port
        self.remote_ip, self.remote_port = remote_ip, remote_port
        self.state = CLOSED
        self.user: ConnectionUser | None = None
        self.passive = False
        self._listener = None
        self.nodelay = config.nodelay
        self.keepalive = config.keepalive
        # send side
        self.iss = iss
        self.snd_una = iss
        self.snd_nxt = iss
        self.snd_max = iss
        self.snd_wnd = 0
        self.max_snd_wnd = 0
        self.snd_wl1 = 0
        self.snd_wl2 = 0
        self.snd_wscale = 0
        self.snd_buf = SendBuffer(seq_add(iss, 1))
        self._fin_queued = False
        self.peer_mss = 536  # RFC 9293 3.7.1: the default when no MSS option arrives
        self.eff_mss = 536
        self.cc = make_cc(config.cc, 536)
        self._cwnd_limited = False  # the last send stopped at cwnd (RFC 7661)
        self._undo_retrans = -1  # retransmissions of this recovery not yet D-SACKed
        self._undo_tsval: int | None = None  # TSval when this recovery began
        self.rto = RtoEstimator(config.initial_rto, config.min_rto, config.max_rto)
        self._dupacks = 0
        self._in_recovery = False
        self._sack = SackScoreboard()  # what the peer told us it holds beyond SND.UNA
        self._sack_recovery = False  # this recovery is driven by the scoreboard
        self._rack = Rack(iss)  # when each outstanding byte left (RFC 8985)
        self._reo_armed = False  # t_rtx is RACK's reordering timer
        self._tlp_armed = False  # t_rtx is a tail loss probe timer, not the RTO
        self._tlp_done = False  # one probe per flight (RFC 8985 7.2)
        self._rack_armed = False  # t_rtx waits for a retransmission's ACK (see below)
        self._rack_left = 3  # timer-driven re-sends allowed before the RTO decides
        self._recover = iss
        # RFC 3522/4015 (Eifel): after an RTO, (TSval of the retransmission, cwnd and
        # ssthresh before it) until the first ACK tells whether the timeout was spurious
        self._eifel: int | None = None  # the TSval of the retransmission
        self._retries = 0
        self._rtt_seq: int | None = None
        self._rtt_time = 0.0
        self._persist_backoff = 0
        self._probes_unanswered = 0  # window probes since the peer last sent an ACK
        self._orphan_probes = 0  # window probes since the user closed
        self._snd_sml = iss  # end of the last small segment sent (Minshall's Nagle)
        # receive side
        self.irs = 0
        self.rcv_nxt = 0
        self.rcv_adv = 0  # right edge of the window we advertised
        self.rcv_wscale = 0
        self.ooo = OutOfOrderQueue(config.ooo_limit, config.ooo_max_blocks)
        self._rcv_buffer = bytearray()  # held while the reader is paused
        self._eof_pending = False
        self.reading_paused = False
        self._ack_now = False
        self._segs_unacked = 0
        self._quickack = config.quickack_segments
        self._last_ack_sent = 0
        # options
        self.sack_ok = False
        self.ws_ok = False
        self.ts_ok = False
        self.ts_recent = 0
        self.ts_recent_time = 0.0
        self._ts_offset = ts_offset
        # timers: absolute times or None; timer_at is what the layer has scheduled
        self.t_rtx: float | None = None
        self.t_delack: float | None = None
        self.t_persist: float | None = None
        self.t_keepalive: float | None = None
        self.t_timewait: float | None = None
        self.timer_at: float | None = None
        self._keepalive_probes = 0
        self.last_recv = 0.0
        # bookkeeping
        self._user_closed = False
        self._closed_notified = False
        self.segs_in = 0
        self.segs_out = 0
        self.retransmits = 0

    # == helpers ===========================================================================

    @property
    def state_name(self) -> str:
        return STATE_NAMES[self.state]

    @property
    def flight_size(self) -> int:
        return seq_diff(self.snd_nxt, self.snd_una)

    def _ts_now(self, now: float) -> int:
        return (int(now * 1000) + self._ts_offset) & MASK

    def _set_state(self, state: int) -> None:
        self.layer.state_changed(self, self.state, state)
        if self.layer.trace.on:
            self._trace("state", self.layer.now, old=STATE_NAMES[self.state],
                        new=STATE_NAMES[state])
        self.state = state

    def _trace(self, event: str, now: float, **fields: object) -> None:
        """An event about this connection in the node's trace (callers check it is on)."""
        self.layer.trace.emit("tcp", event, now, local=ip_to_str(self.local_ip),
                              local_port=self.local_port, remote=ip_to_str(self.remote_ip),
                              remote_port=self.remote_port, **fields)

    def _trace_cc(self, now: float, why: str) -> None:
        rto = self.rto
        self._trace("cwnd", now, why=why, cwnd=self.cc.cwnd, ssthresh=self.cc.ssthresh_shown,
                    srtt_ms=round((rto.srtt or 0.0) * 1000, 3),
                    in_flight=self.flight_size)

    def _mark(self) -> None:
        self.layer.mark_dirty(self)

    def _fin_seq(self) -> int:
        """Sequence number our FIN occupies (once queued): just past the data."""
        return self.snd_buf.end

    def _fin_sent(self) -> bool:
        return self._fin_queued and seq_gt(self.snd_nxt, self._fin_seq())

    def _fin_acked(self) -> bool:
        return self._fin_queued and seq_gt(self.snd_una, self._fin_seq())

    def _setup_mss(self, peer_mss: int | None) -> None:
        """RFC 9293 3.7.1: send at most the peer's MSS (and what the path carries), minus
        our option bytes (RFC 6691)."""
        local_max = self.layer.link_mtu(self.remote_ip) - 40
        self.peer_mss = min(peer_mss if peer_mss else 536, local_max)
        self.eff_mss = self._mss_for(self.layer.path_mtu(self.remote_ip))
        self.cc = type(self.cc)(self.eff_mss)

    def _mss_for(self, path_mtu: int) -> int:
        return max(min(self.peer_mss, path_mtu - 40) - (TS_OPTION_LEN if self.ts_ok else 0),
                   64)

    def path_mtu_changed(self, path_mtu: int) -> None:
        """RFC 1191: a smaller path MTU; segments in flight are sent again, re-cut to the
        new size (like Linux's tcp_simple_retransmit: no congestion response)."""
        mss = self._mss_for(path_mtu)
        if mss >= self.eff_mss:
            return
        self.eff_mss = mss
        self.cc.set_mss(mss)
        if self.state not in (SYN_SENT, SYN_RECEIVED) and self.snd_nxt != self.snd_una:
            self.snd_nxt = self.snd_una
            self._rtt_seq = None
        self._mark()

    # == opening ===========================================================================

    def _negotiate(self, opts, now: float) -> None:
        """Options from the peer's SYN: each is on only if both sides offered it."""
        cfg = self.config
        if opts.wscale is not None and cfg.wscale is not None:
            self.ws_ok = True
            self.snd_wscale = opts.wscale
            self.rcv_wscale = cfg.wscale
        self.sack_ok = cfg.sack and opts.sack_permitted
        if cfg.timestamps and opts.ts_val is not None:
            self.ts_ok = True
            self.ts_recent = opts.ts_val
            self.ts_recent_time = now
        self._setup_mss(opts.mss)

    def open_active(self, now: float) -> None:
        """RFC 9293 3.10.1 OPEN, active: send SYN, enter SYN-SENT."""
        self._set_state(SYN_SENT)
        self._mark()

    def open_passive(self, seg: Segment, now: float) -> None:
        """A SYN arrived at a listener (RFC 9293 3.10.7.2): answer SYN-ACK."""
        self.passive = True
        opts = seg.options
        self.irs = seg.seq
        self.rcv_nxt = seq_add(seg.seq, 1)
        self.snd_wnd = seg.window  # never scaled in a SYN (RFC 7323 2.2)
        self.max_snd_wnd = self.snd_wnd
        self.snd_wl1, self.snd_wl2 = seg.seq, self.iss
        self._negotiate(opts, now)
        self.last_recv = now
        self._set_state(SYN_RECEIVED)
        self._mark()

    def open_from_cookie(self, seg: Segment, mss: int, wscale: int | None, sack_ok: bool,
                         now: float) -> None:
        """ESTABLISHED straight from a valid SYN-cookie ACK (RFC 4987 3.6)."""
        self.passive = True
        cfg = self.config
        self.irs = seq_add(seg.seq, -1)
        self.rcv_nxt = seg.seq
        self.snd_una = self.snd_nxt = self.snd_max = seg.ack
        self.snd_buf = SendBuffer(seg.ack)
        self._recover = self.iss
        self._rack.reset(seg.ack)
        if wscale is not None and cfg.wscale is not None:
            self.ws_ok = True
            self.snd_wscale, self.rcv_wscale = wscale, cfg.wscale
        self.sack_ok = sack_ok and cfg.sack
        if cfg.timestamps and seg.options.ts_val is not None and seg.options.ts_ecr:
            self.ts_ok = True
            self.ts_recent = seg.options.ts_val
            self.ts_recent_time = now
            # the cookie's TSval came from the bare clock: continue from it, or the peer's
            # PAWS would see our next TSval as older and drop every segment
            self._ts_offset = 0
        self.peer_mss = min(mss, self.layer.link_mtu(self.remote_ip) - 40)
        self.eff_mss = self._mss_for(self.layer.path_mtu(self.remote_ip))
        self.cc = type(self.cc)(self.eff_mss)
        self.snd_wnd = seg.window << self.snd_wscale
        self.max_snd_wnd = self.snd_wnd
        self.snd_wl1, self.snd_wl2 = seg.seq, seg.ack
        self.rcv_adv = seq_add(self.rcv_nxt, 0xFFFF)  # the SYN-ACK offered 65535
        self._last_ack_sent = self.rcv_nxt
        self.last_recv = now
        self._set_state(ESTABLISHED)

    # == user calls =======================================================================

    def send(self, data: bytes | bytearray | memoryview) -> None:
        if not data:
            return
        if self._fin_queued or self.state not in (SYN_SENT, SYN_RECEIVED, ESTABLISHED,
                                                  CLOSE_WAIT):
            raise ConnectionError("connection is closing")
        self.snd_buf.append(data)
        self._mark()

    def set_keepalive(self, enabled: bool, now: float) -> None:
        """SO_KEEPALIVE for this connection (RFC 1122 4.2.3.6: off by default)."""
        self.keepalive = enabled
        self._keepalive_probes = 0
        self.t_keepalive = now + self.config.keepalive_idle \
            if enabled and self.state == ESTABLISHED else None
        self._mark()

    def set_congestion_control(self, name: str) -> None:
        """Change controller (like TCP_CONGESTION): the new one starts from the current
        window and threshold."""
        new = make_cc(name, self.eff_mss)
        new.cwnd, new.ssthresh = self.cc.cwnd, self.cc.ssthresh
        self.cc = new

    def send_buffer_size(self) -> int:
        """Bytes written and not yet acknowledged (asyncio's write buffer size)."""
        return len(self.snd_buf)

    def shutdown(self) -> None:
        """Half-close: send FIN after the queued data (RFC 9293 3.10.4 CLOSE)."""
        if self._fin_queued:
            return
        if self.state == SYN_SENT:
            self._terminate(None)  # RFC 9293 3.10.4: CLOSE in SYN-SENT deletes the TCB
            return
        if self.state in (SYN_SENT, SYN_RECEIVED, ESTABLISHED, CLOSE_WAIT):
            self._fin_queued = True
            self._mark()

    def close(self) -> None:
        """The user is done: FIN after queued data; reset if unread data would be lost
        (RFC 1122 4.2.2.13)."""
        self._user_closed = True
        if self._rcv_buffer:
            self.abort()
            return
        self.shutdown()

    def abort(self) -> None:
        """RFC 9293 3.10.5 ABORT: RST (in synchronized states) and forget everything."""
        if self.state in (SYN_RECEIVED, ESTABLISHED, FIN_WAIT_1, FIN_WAIT_2, CLOSE_WAIT):
            self.layer.send_rst(self.local_ip, self.local_port, self.remote_ip,
                                self.remote_port, self.snd_max, 0, with_ack=False)
            self.layer.counters["tcp.resets_sent"] += 1
        self._terminate(None, notify=False)

    def pause_reading(self) -> None:
        self.reading_paused = True

    def resume_reading(self) -> None:
        if not self.reading_paused:
            return
        self.reading_paused = False
        if self._rcv_buffer:
            data = bytes(self._rcv_buffer)
            self._rcv_buffer.clear()
            if self.user is not None:
                self.user.on_data(data)
        if self._eof_pending and not self.reading_paused and self.user is not None:
            self._eof_pending = False
            self.user.on_eof()
        # A window that was closing may have reopened: tell the peer (RFC 9293 3.8.6.2.2).
        if self.state in _RECV_STATES and self._window_update_due():
            self._ack_now = True
            self._mark()

    # == segment arrival ==================================================================

    def segment_arrives(self, seg: Segment, now: float) -> None:
        self.segs_in += 1
        self.last_recv = now
        if self.keepalive and self.state == ESTABLISHED:
            self._keepalive_probes = 0
            self.t_keepalive = now + self.config.keepalive_idle
        tracing = self.layer.trace.on
        if tracing:
            before = (self.cc.cwnd, self.cc.ssthresh)
        if self.state == SYN_SENT:
            self._arrive_syn_sent(seg, now)
        elif not self._predicted_ack(seg, now):
            self._arrive_synchronized(seg, now)
        if tracing and (self.cc.cwnd, self.cc.ssthresh) != before and self.state != CLOSED:
            self._trace_cc(now, "recovery" if self._in_recovery else "ack")
        if self.state != CLOSED:
            self._mark()

    def _predicted_ack(self, seg: Segment, now: float) -> bool:
        """Header prediction (RFC 9293's classic fast path, as in Van Jacobson's): in
        ESTABLISHED, a pure ACK at RCV.NXT that acknowledges new data, leaves the window
        as it was, carries no SACK and passes PAWS changes nothing but SND.UNA. Every
        check of the full path would pass; take the short way. False: take the long way."""
        if self.state != ESTABLISHED or seg.flags & 0x37 != ACK or seg.payload \
                or seg.seq != self.rcv_nxt or self._in_recovery or self._sack \
                or self._dupacks:
            return False
        ack = seg.ack
        if not (seq_gt(ack, self.snd_una) and seq_le(ack, self.snd_max)) \
                or (seg.window << self.snd_wscale) != self.snd_wnd:
            return False
        opts = seg.options
        if opts.sack_blocks:
            return False
        if self.ts_ok:
            ts = opts.ts_val
            if ts is None or seq_lt(ts, self.ts_recent):
                return False
            if seq_le(seg.seq, self._last_ack_sent):
                self.ts_recent = ts
                self.ts_recent_time = now
        flight = seq_diff(self.snd_max, self.snd_una)
        acked, rtt = self._ack_advanced(seg, now)
        self.snd_wl1, self.snd_wl2 = seg.seq, ack
        self._cc_ack(acked, rtt, now, flight)
        self.layer.counters["tcp.predicted_acks"] += 1
        return True

    def _arrive_syn_sent(self, seg: Segment, now: float) -> None:
        """RFC 9293 3.10.7.3."""
        flags = seg.flags
        c = self.layer.counters
        if flags & ACK:
            if seq_le(seg.ack, self.iss) or seq_gt(seg.ack, self.snd_max):
                if not flags & RST:
                    self.layer.send_rst(self.local_ip, self.local_port, self.remote_ip,
                                        self.remote_port, seg.ack, 0, with_ack=False)
                    c["tcp.resets_sent"] += 1
                return
        if flags & RST:
            if flags & ACK:  # acceptable ACK: the peer refused us
                c["tcp.resets_received"] += 1
                self._terminate(ConnectionRefusedError(
                    f"connection refused by {self.layer.peer_name(self)}"))
            return
        if not flags & SYN:
            return
        opts = seg.options
        self.irs = seg.seq
        self.rcv_nxt = seq_add(seg.seq, 1)
        # the window our SYN offered, unscaled
        self.rcv_adv = seq_add(self.rcv_nxt, min(self._free_space(), 0xFFFF))
        self._negotiate(opts, now)
        if flags & ACK:
            self._ack_advanced(seg, now)
            self.snd_wnd = seg.window  # unscaled in a SYN
            self.max_snd_wnd = self.snd_wnd
            self.snd_wl1, self.snd_wl2 = seg.seq, seg.ack
            self._set_state(ESTABLISHED)
            self._ack_now = True
            self._established()
            if seg.payload:
                self._receive_data(seg, now)
        else:
            # Simultaneous open (RFC 9293 3.10.7.3 fifth check): SYN-RECEIVED, SYN-ACK.
            self.snd_wnd = seg.window
            self.max_snd_wnd = self.snd_wnd
            self.snd_wl1 = seg.seq
            self.snd_nxt = self.iss  # the SYN-ACK re-sends our SYN
            self._set_state(SYN_RECEIVED)

    def _acceptable(self, seg: Segment, seg_len: int) -> bool:
        """RFC 9293 3.10.7.4 first check: the four cases of segment acceptability."""
        rcv_wnd = seq_diff(self.rcv_adv, self.rcv_nxt)
        if rcv_wnd < 0:
            rcv_wnd = 0
        seq = seg.seq
        if seg_len == 0:
            if rcv_wnd == 0:
                return seq == self.rcv_nxt
            return 0 <= seq_diff(seq, self.rcv_nxt) < rcv_wnd
        if rcv_wnd == 0:
            return False
        start = seq_diff(seq, self.rcv_nxt)
        end = start + seg_len - 1
        return 0 <= start < rcv_wnd or 0 <= end < rcv_wnd or (start < 0 and end >= rcv_wnd)

    def _arrive_synchronized(self, seg: Segment, now: float) -> None:
        """RFC 9293 3.10.7.4 in its order: sequence, RST, SYN, ACK, data, FIN."""
        layer = self.layer
        c = layer.counters
        flags = seg.flags
        seg_len = seg.seg_len
        opts = seg.options
        # RFC 7323 5.3 R1: PAWS, before the sequence check.
        if self.ts_ok and opts.ts_val is not None and not flags & RST:
            if seq_lt(opts.ts_val, self.ts_recent) and now - self.ts_recent_time < PAWS_IDLE:
                c["tcp.paws_rejected"] += 1
                self._ack_now = True
                return
        # first: sequence number
        drop_text = False
        if not self._acceptable(seg, seg_len):
            if seg.seq == self.rcv_nxt and seq_diff(self.rcv_adv, self.rcv_nxt) <= 0:
                # RFC 9293 3.10.7.4: with a zero window, still accept valid ACKs and RSTs;
                # only the text (and a FIN behind it) is dropped.
                drop_text = True
                c["tcp.zero_window_drops"] += 1
                self._ack_now = True
            elif not flags & RST:
                c["tcp.out_of_window"] += 1
                self._ack_now = True  # RFC 9293: send an ACK, drop the segment
                return
            else:
                c["tcp.rst_out_of_window"] += 1
                return
        # RFC 7323 4.3: remember the timestamp of the segment that holds RCV.NXT.
        if self.ts_ok and opts.ts_val is not None and seq_le(seg.seq, self._last_ack_sent) \
                and seq_ge(opts.ts_val, self.ts_recent):
            self.ts_recent = opts.ts_val
            self.ts_recent_time = now
        # second: RST (RFC 5961 3.2: only an exact match resets; in-window is challenged)
        if flags & RST:
            if seg.seq != self.rcv_nxt:
                c["tcp.rst_challenged"] += 1
                self._challenge_ack(now)
                return
            c["tcp.resets_received"] += 1
            if self.state == SYN_RECEIVED and self.passive:
                self._terminate(None, notify=False)  # back to LISTEN: the listener stays
                return
            if self.state == SYN_RECEIVED:
                self._terminate(ConnectionRefusedError(
                    f"connection refused by {layer.peer_name(self)}"))
            elif self.state in (CLOSING, LAST_ACK):
                self._terminate(None)
            else:
                self._terminate(ConnectionResetError(
                    f"connection reset by {layer.peer_name(self)}"))
            return
        # fourth: SYN in a synchronized state (RFC 5961 4.2: challenge ACK)
        if flags & SYN:
            if self.state == SYN_RECEIVED and self.passive and seg.seq == self.irs:
                self.snd_nxt = self.iss  # retransmitted SYN: repeat our SYN-ACK
                return
            c["tcp.syn_challenged"] += 1
            self._challenge_ack(now)
            return
        # fifth: ACK
        if not flags & ACK:
            return
        if self.state == SYN_RECEIVED:
            if seq_gt(seg.ack, self.snd_una) and seq_le(seg.ack, self.snd_max):
                self._set_state(ESTABLISHED)
                self.snd_wnd = seg.window << self.snd_wscale
                self.max_snd_wnd = max(self.max_snd_wnd, self.snd_wnd)
                self.snd_wl1, self.snd_wl2 = seg.seq, seg.ack
                self._ack_advanced(seg, now)
                self._established()
                if self.state == CLOSED:
                    return
            else:
                layer.send_rst(self.local_ip, self.local_port, self.remote_ip,
                               self.remote_port, seg.ack, 0, with_ack=False)
                c["tcp.resets_sent"] += 1
                return
        else:
            if not self._process_ack(seg, now):
                return
            if self.state == CLOSED:
                return
        if drop_text:
            return
        # seventh: segment text
        if seg.payload:
            if self.state in _RECV_STATES:
                self._receive_data(seg, now)
            # CLOSE-WAIT, CLOSING, LAST-ACK: the peer already sent FIN; ignore the text.
        # eighth: FIN
        if flags & FIN:
            fin_seq = seq_add(seg.seq, len(seg.payload))
            if fin_seq == self.rcv_nxt:
                self._receive_fin(now)
            elif seq_gt(fin_seq, self.rcv_nxt):
                c["tcp.out_of_order_fin"] += 1  # its data is missing; the peer re-sends it

    def _challenge_ack(self, now: float) -> None:
        if self.layer.allow_challenge_ack(now):
            self._ack_now = True

    def _process_ack(self, seg: Segment, now: float) -> bool:
        """RFC 9293 3.10.7.4 fifth check in synchronized states; False to stop here."""
        c = self.layer.counters
        ack = seg.ack
        # RFC 5961 5.2: acceptable if SND.UNA - MAX.SND.WND <= SEG.ACK <= SND.NXT
        if seq_gt(ack, self.snd_max):
            c["tcp.ack_unsent"] += 1
            self._challenge_ack(now)
            return False
        if seq_lt(ack, seq_add(self.snd_una, -max(self.max_snd_wnd, 1))):
            c["tcp.ack_too_old"] += 1
            self._challenge_ack(now)
            return False
        window = seg.window << self.snd_wscale
        old_una = self.snd_una
        flight = seq_diff(self.snd_max, old_una)
        self._probes_unanswered = 0  # the peer is there
        delivered = 0
        sacked = False
        if self.sack_ok and (seg.options.sack_blocks or self._sack):
            blocks = seg.options.sack_blocks
            if blocks and (seq_le(blocks[0][1], ack) or (
                    len(blocks) > 1 and seq_ge(blocks[0][0], blocks[1][0])
                    and seq_le(blocks[0][1], blocks[1][1]))):
                c["tcp.dsacks_received"] += 1  # RFC 2883: the first block is a duplicate
                self._rack.dsack(self.snd_max)
                self._dsack_undo(seq_diff(blocks[0][1], blocks[0][0]), now)
            # an old (reordered) ACK still carries valid blocks; the board stays on SND.UNA
            base = ack if seq_gt(ack, old_una) else old_una
            fresh = self._sack.update(seg.options.sack_blocks, base, self.snd_max, old_una)
            if fresh:
                self._rack.delivered(fresh, now)
                delivered = sum(e - s for s, e in fresh)
            sacked = True
        rtt = None
        if seq_gt(ack, self.snd_una):
            acked, rtt = self._ack_advanced(seg, now)
            if not sacked:
                delivered = acked
            if self.state == CLOSED:
                return False
        elif ack == self.snd_una:
            self._maybe_dupack(seg, window)
        self._detect_loss(now)
        if self._sack_recovery:
            self.cc.recovery_ack(delivered, self._pipe(now))
        self._cc_ack(delivered, rtt, now, flight)
        # window update (RFC 9293 3.10.7.4: SND.WL1/SND.WL2 rule)
        if seq_lt(self.snd_wl1, seg.seq) or (
                self.snd_wl1 == seg.seq and seq_le(self.snd_wl2, ack)):
            if window > self.snd_wnd and self.t_persist is not None:
                self.t_persist = None  # the window opened: stop probing
                self._persist_backoff = 0
            self.snd_wnd = window
            self.max_snd_wnd = max(self.max_snd_wnd, window)
            self.snd_wl1, self.snd_wl2 = seg.seq, ack
        # state-specific ACK processing
        state = self.state
        if state == FIN_WAIT_1 and self._fin_acked():
            self._set_state(FIN_WAIT_2)
            if self._user_closed:
                # Like Linux's tcp_fin_timeout: an orphan does not wait forever for a FIN.
                self.t_timewait = now + 2 * self.config.msl
        elif state == CLOSING and self._fin_acked():
            self._enter_time_wait(now)
            return False
        elif state == LAST_ACK and self._fin_acked():
            self._terminate(None)
            return False
        return True

    def _maybe_dupack(self, seg: Segment, window: int) -> None:
        """RFC 5681 2: a duplicate ACK carries no data, no SYN/FIN, acknowledges SND.UNA
        with data outstanding, and leaves the window unchanged."""
        if seg.payload or seg.flags & (SYN | FIN) or self.snd_una == self.snd_max \
                or window != self.snd_wnd or window == 0:
            # (answers to window probes repeat SND.UNA with a zero window: not a sign
            # of loss, and a fast retransmit would push data into the shut window)
            self._dupacks = 0
            return
        self._dupacks += 1
        if self._in_recovery and not self._sack_recovery:
            self.cc.on_dupack_in_recovery()

    def _detect_loss(self, now: float) -> None:
        """Enter fast recovery on DupThresh duplicate ACKs, or when SACKs show more than
        (DupThresh - 1) segments above SND.UNA (RFC 6675 5), with RFC 5827's early
        retransmit lowering DupThresh when little is outstanding and nothing is waiting."""
        if self._in_recovery or self.snd_una == self.snd_max:
            return
        mss = self.eff_mss
        outstanding = seq_diff(self.snd_max, self.snd_una)
        thresh = 3
        segments = -(-outstanding // mss)
        if segments < 4 and seq_diff(self.snd_buf.end, self.snd_nxt) <= 0:
            thresh = max(segments - 1, 1)
        sack_says = bool(self._sack) and (self._sack.sacked_bytes() > (thresh - 1) * mss
                                          or bool(self._rack_scan(now)[0]))
        past_recovery = seq_gt(self.snd_una, self._recover) or self._recover == self.iss
        # RFC 6582 3.2 step 2 keeps duplicate ACKs from before the last recovery point
        # (they may be old) from starting another one; SACK blocks name the bytes held, so
        # they may: after an RTO, a lost retransmission is recovered without another RTO.
        # RACK (RFC 8985) enters on a single SACK once a reordering window has passed.
        if not (sack_says or (self._dupacks >= thresh and past_recovery)):
            return
        self.layer.counters["tcp.fast_retransmits"] += 1
        if self.layer.trace.on:
            self._trace("retransmit", now, why="fast retransmit" + (
                " (SACK/RACK)" if sack_says else f" ({self._dupacks} duplicate ACKs)"),
                seq=self.snd_una)
        self._in_recovery = True
        self._recover = self.snd_max
        self._tlp_armed = False
        self._rack_left = 3
        # undo (as Linux): if every retransmission of this recovery comes back D-SACKed,
        # or the ACKs show the originals arrived, the reduction is taken back
        self._undo_retrans = 0
        self._undo_tsval = self._ts_now(now) if self.ts_ok else None
        if self._sack:
            self._sack_recovery = True
            self.cc.enter_recovery(outstanding, True, now, reduce=past_recovery)
            self._sack_retransmit(now, first=True)
            if not self._rack_armed:  # nothing to re-send yet: no stale TLP deadline
                self._arm_recovery_timer(now)
        else:
            self._sack_recovery = False
            self.cc.enter_recovery(outstanding, False, now, reduce=past_recovery)
            self._retransmit_first(now)

    def _rack_scan(self, now: float) -> tuple[list[tuple[int, int]], int]:
        """Lost byte ranges (offsets from SND.UNA) by RFC 6675's IsLost for bytes never
        re-sent and RACK's clock for all, and the pipe (RFC 6675 4 SetPipe): what is
        outstanding less what is lost, SACKed, or past SND.NXT after a go-back-N rewind
        (RFC 6675 5.1: after an RTO all of it is lost; _send_data re-sends it in order).
        Arms RACK's reordering timer for the next pending byte."""
        una = self.snd_una
        outstanding = seq_diff(self.snd_max, una)
        board = self._sack
        mss = self.eff_mss
        sacked = board.sacked_bytes()
        undelivered = board.holes(2 * mss)
        top = board.blocks[-1][1] if board.blocks else 0
        if top < outstanding:
            undelivered.append((top, outstanding, False))
        rack = self._rack
        reo = rack.reo_wnd(self._in_recovery, sacked // mss, self.rto.srtt)
        limit = seq_diff(self.snd_nxt, una)
        lost, deadline = rack.lost(undelivered, limit, reo, now)
        if limit < outstanding:
            for hs, he, _ in undelivered:
                if he > limit:
                    sacked += he - max(hs, limit)
        if deadline is not None and (self.t_rtx is None or deadline < self.t_rtx):
            self.t_rtx = deadline
            self._reo_armed = True
            self._tlp_armed = self._rack_armed = False
        return lost, outstanding - sacked - sum(e - s for s, e in lost)

    def _pipe(self, now: float) -> int:
        """RFC 6675 4 SetPipe: bytes believed to be in the network."""
        outstanding = seq_diff(self.snd_max, self.snd_una)
        if not self._sack and not self._sack_recovery:
            return outstanding
        return self._rack_scan(now)[1]

    def _sack_retransmit(self, now: float, first: bool = False) -> None:
        """RFC 6675 NextSeg rule 1: re-send lost bytes, lowest first, while cwnd - pipe
        allows; on entering recovery the first one goes whatever the pipe (5 step 4.3)."""
        mss = self.eff_mss
        una = self.snd_una
        data_end = seq_diff(self.snd_buf.end, una)
        lost, pipe = self._rack_scan(now)
        cwnd = self.cc.cwnd
        c = self.layer.counters
        for start, stop in lost:
            while start < stop:
                if cwnd - pipe < mss and not first:
                    return
                first = False
                end = min(stop, start + mss, data_end)
                seq = seq_add(una, start)
                if end > start:
                    self._emit(seq, ACK, self.snd_buf.get(seq, end - start), now)
                elif start == data_end and self._fin_sent():
                    self._emit(seq, FIN | ACK, b"", now)
                    end = start + 1
                else:
                    return
                pipe += end - start
                self._rtt_seq = None  # Karn
                self._undo_retrans += 1
                self.retransmits += 1
                c["tcp.retransmits"] += 1
                c["tcp.sack_retransmits"] += 1
                if not self._rack_armed:
                    self._arm_recovery_timer(now)
                start = end

    def _arm_recovery_timer(self, now: float) -> None:
        """After a retransmission in recovery, expect an ACK within about two round
        trips; if none comes, the retransmissions were lost too (RACK's reasoning,
        RFC 8985 6.3, for when nothing sent later arrives to show it) and they go again,
        a few times, before the RTO takes over."""
        srtt = self.rto.srtt
        if srtt is None or self._rack_left <= 0:
            self._rack_armed = self._reo_armed = False
            self._tlp_armed = False
            self.t_rtx = now + self.rto.current()
            return
        self._rack_armed = True
        self._tlp_armed = self._reo_armed = False
        self.t_rtx = now + min(max(2 * srtt + 0.002, 0.01), self.rto.current())

    def _on_reorder_timer(self, now: float) -> None:
        """RFC 8985 6.3: the reordering window of a byte that left before a delivered
        one has passed; it is lost."""
        self._reo_armed = False
        self.layer.counters["tcp.reorder_timeouts"] += 1
        if self.layer.trace.on:
            self._trace("retransmit", now, why="RACK: reordering window passed",
                        seq=self.snd_una)
        self._detect_loss(now)
        if self._sack_recovery:
            self._sack_retransmit(now)
        if self.t_rtx is None:
            self._arm_rtx(now)

    def _on_recovery_timer(self, now: float) -> None:
        self._rack_armed = False
        if not self._in_recovery or self.snd_una == self.snd_max:
            self._arm_rtx(now)
            return
        self._rack_left -= 1
        self.layer.counters["tcp.lost_retransmits"] += 1
        if self.layer.trace.on:
            self._trace("retransmit", now, why="RACK: a retransmission was lost too",
                        seq=self.snd_una)
        if self._sack_recovery:
            # what was re-sent more than a round trip ago and not heard of is lost
            self._rack.expire_retransmissions(now - (self.rto.srtt or 0.0) - 0.002)
            self._sack_retransmit(now)
            if self.t_rtx is None:
                self._arm_rtx(now)
        else:
            self._retransmit_first(now)

    def _ack_advanced(self, seg: Segment, now: float) -> tuple[int, float | None]:
        """New data (or our SYN/FIN) acknowledged: buffers, RTT, recovery, timers.
        Returns the data bytes acknowledged and the round-trip sample, if any."""
        ack = seg.ack
        # RTT sample (RFC 7323 4.1 timestamps, else Karn's rule on one timed segment);
        # the timed segment is on the event loop's clock, finer than the millisecond
        # timestamps, and is what the congestion controller prefers
        opts = seg.options
        sample = fine = None
        if self._rtt_seq is not None and seq_gt(ack, self._rtt_seq):
            fine = now - self._rtt_time
            self._rtt_seq = None
        if self.ts_ok and opts.ts_val is not None and opts.ts_ecr:
            rtt = (self._ts_now(now) - opts.ts_ecr) & MASK
            if rtt < 600_000:
                sample = rtt / 1000.0
        else:
            sample = fine
        if sample is not None:
            self.rto.sample(sample)
            if self.sack_ok:
                self._rack.rtt_sample(sample)
        if self._eifel is not None:
            self._eifel_check(seg, ack)
        self.snd_una = ack
        if self.sack_ok:
            self._rack.acked(ack, now, self._in_recovery or bool(self._sack))
        if seq_lt(self.snd_nxt, ack):
            self.snd_nxt = ack
        # data bytes acknowledged (SYN and FIN occupy sequence space, not the window)
        acked = self.snd_buf.acknowledge(
            ack if seq_le(ack, self.snd_buf.end) else self.snd_buf.end)
        self._retries = 0
        self._dupacks = 0
        self._rack_left = 3
        if self._in_recovery:
            if seq_ge(ack, self._recover):
                if self._undo_tsval is not None and opts.ts_ecr is not None \
                        and seq_lt(opts.ts_ecr, self._undo_tsval):
                    # the ACK echoes a time before the first retransmission: the
                    # originals arrived, the loss was reordering (Linux's undo)
                    self._undo(now)
                else:
                    self._end_recovery(ack)
            elif not self._sack_recovery:
                self.cc.on_partial_ack(acked)  # RFC 6582 3.2 step 5
                self._retransmit_first(now)
            # with SACK, output() re-sends the next holes as the pipe drains
        # RFC 6298 5.2/5.3: stop the timer when all is acked, else restart it (or the
        # tail loss probe in its place, RFC 8985 7.2).
        self._tlp_done = False
        self._arm_rtx(now)
        if self.user is not None:
            self.user.on_acked()
        return acked, fine if fine is not None else sample

    def _end_recovery(self, ack: int) -> None:
        sack = self._sack_recovery
        self._in_recovery = False
        self._sack_recovery = False
        self._rack.recovery_done()
        self.cc.exit_recovery(seq_diff(self.snd_max, ack), sack)

    def _cc_ack(self, delivered: int, rtt: float | None, now: float, flight: int) -> None:
        """Tell the controller what this ACK delivered. The window grows only while it is
        what limits the sender (RFC 7661): the last send stopped at cwnd, or the flight
        before this ACK filled at least half of it (slow start)."""
        cc = self.cc
        cc.on_ack(delivered, rtt, now, self.snd_una, self.snd_nxt, flight,
                  self._cwnd_limited or 2 * flight >= cc.cwnd, self._in_recovery)

    def _dsack_undo(self, length: int, now: float) -> None:
        """A D-SACK reports bytes that arrived twice. When every retransmission of the
        last recovery is reported so, none was needed: undo its reduction."""
        if self._undo_retrans <= 0:
            return
        self._undo_retrans -= max(-(-length // self.eff_mss), 1)
        if self._undo_retrans <= 0:
            self._undo(now)

    def _undo(self, now: float) -> None:
        self._undo_retrans = -1
        self._undo_tsval = None
        if self._in_recovery:
            self._in_recovery = False
            self._sack_recovery = False
            self._rack.recovery_done()
        if self.cc.undo():
            self.layer.counters["tcp.spurious_recoveries"] += 1
            if self.layer.trace.on:
                self._trace_cc(now, "undo: the loss was reordering")

    def _eifel_check(self, seg: Segment, ack: int) -> None:
        """RFC 3522 detection on the first ACK of new data after an RTO: if it echoes a
        timestamp older than the retransmission's, it was sent for the original, and the
        timeout was spurious (a stalled peer or path, not a loss). RFC 4015 response:
        resume with new data at SND.MAX instead of sending the whole window again, and
        give back the congestion window the timeout took."""
        rtx_ts = self._eifel
        self._eifel = None
        ecr = seg.options.ts_ecr
        if ecr is None or not seq_lt(ecr, rtx_ts):
            return  # the retransmission was needed, or we cannot tell: go back N
        self.layer.counters["tcp.spurious_rtos"] += 1
        self.snd_nxt = self.snd_max
        self.cc.undo()

    def _established(self) -> None:
        self.layer.established(self)
        if self.keepalive:
            self.t_keepalive = self.last_recv + self.config.keepalive_idle

    # == receiving data ===================================================================

    def _receive_data(self, seg: Segment, now: float) -> None:
        c = self.layer.counters
        data = seg.payload
        seq = seg.seq
        offset = seq_diff(self.rcv_nxt, seq)
        if offset > 0:  # starts before RCV.NXT: trim what we already have
            data = data[offset:]
            seq = self.rcv_nxt
        # trim to the window we advertised
        room = seq_diff(self.rcv_adv, seq)
        if len(data) > room:
            data = data[: max(room, 0)]
        if not data:
            # a duplicate: the peer missed our ACK (RFC 5681 4.2: ACK it at once)
            self._emit(self.snd_max, ACK, b"", now)
            return
        if seq != self.rcv_nxt:
            c["tcp.out_of_order_segments"] += 1
            if not self.ooo.add(self.rcv_nxt, seq, data):
                c["tcp.ooo_dropped"] += 1
            # RFC 5681 4.2: one immediate duplicate ACK per out-of-order segment, never
            # coalesced with others of the same batch: the sender counts them.
            self._emit(self.snd_max, ACK, b"", now)
            return
        filled_gap = bool(self.ooo.blocks)
        self.rcv_nxt = seq_add(self.rcv_nxt, len(data))
        self._deliver(data)
        if filled_gap:
            while (more := self.ooo.pop_ready(self.rcv_nxt)) is not None:
                if more:
                    self.rcv_nxt = seq_add(self.rcv_nxt, len(more))
                    self._deliver(more)
            self._ack_now = True  # RFC 5681 4.2: ACK a segment that fills a gap at once
        # RFC 5681 4.2 / RFC 9293 3.8.6.3: ACK at least every second full-sized segment,
        # otherwise within the delayed-ACK time.
        self._segs_unacked += 1
        if self._segs_unacked >= 2 or len(data) > self.eff_mss + 40:
            # at once, not at the end of the batch: a batch may hold hundreds of segments
            # and the sender's ACK clock needs to hear of them as they come
            self._emit(self.snd_max, ACK, b"", now)
        elif self._quickack > 0:
            self._ack_now = True
        elif self.t_delack is None:
            self.t_delack = now + self.config.delayed_ack

    def _deliver(self, data: bytes | memoryview) -> None:
        if self.reading_paused or self.user is None:
            self._rcv_buffer += data
        else:
            self.user.on_data(bytes(data))

    def _receive_fin(self, now: float) -> None:
        """RFC 9293 3.10.7.4 eighth check."""
        self.rcv_nxt = seq_add(self.rcv_nxt, 1)
        self._ack_now = True
        self.ooo.clear()
        state = self.state
        if state in (SYN_RECEIVED, ESTABLISHED):
            self._set_state(CLOSE_WAIT)
        elif state == FIN_WAIT_2 or (state == FIN_WAIT_1 and self._fin_acked()):
            # TIME-WAIT lets the application go: it must see the end of the stream
            # first (after a half-close it is still reading), even while paused.
            if self.user is not None:
                if self._rcv_buffer:
                    data = bytes(self._rcv_buffer)
                    self._rcv_buffer.clear()
                    self.user.on_data(data)
                if self.user is not None:
                    self.user.on_eof()
            self._enter_time_wait(now)
            return
        elif state == FIN_WAIT_1:
            self._set_state(CLOSING)
        if self.user is not None and state in (SYN_RECEIVED, ESTABLISHED, FIN_WAIT_1,
                                               FIN_WAIT_2):
            if self.reading_paused and self._rcv_buffer:
                self._eof_pending = True  # reported after the buffered data, on resume
                return
            self.user.on_eof()

    def _enter_time_wait(self, now: float) -> None:
        """The application is told the end; what is left is a small TIME-WAIT record in
        the layer's own table (timewait.py), which answers for the 4-tuple for 2 MSL."""
        if self._ack_now:
            self._emit(self.snd_max, ACK, b"", now)  # the ACK of their FIN
        window = self._window_to_advertise() >> self.rcv_wscale
        self._set_state(TIME_WAIT)
        self.t_rtx = self.t_persist = self.t_keepalive = self.t_delack = None
        self.t_timewait = None
        self._notify_closed(None)
        self.user = None
        self.layer.enter_time_wait(self, window, now)

    # == receive window ===================================================================

    def _free_space(self) -> int:
        return max(self.config.rcvbuf - len(self._rcv_buffer) - self.ooo.bytes, 0)

    def _window_update_due(self) -> bool:
        current = max(seq_diff(self.rcv_adv, self.rcv_nxt), 0)
        threshold = min(self.config.rcvbuf // 2, self.eff_mss)
        return self._free_space() - current >= threshold

    def _window_to_advertise(self) -> int:
        """RFC 9293 3.8.6.2.2 receiver SWS avoidance; never shrink the right edge."""
        current = max(seq_diff(self.rcv_adv, self.rcv_nxt), 0)
        free = self._free_space()
        threshold = min(self.config.rcvbuf // 2, self.eff_mss)
        wnd = free if free - current >= threshold else current
        wnd = min(wnd, 0xFFFF << self.rcv_wscale)
        # round down to what the scaled field can express
        wnd = (wnd >> self.rcv_wscale) << self.rcv_wscale
        if wnd < current:
            wnd = current
        edge = seq_add(self.rcv_nxt, wnd)
        if seq_gt(edge, self.rcv_adv):
            self.rcv_adv = edge
        return wnd

    # == output ===========================================================================

    def output(self, now: float) -> None:
        """Send whatever the state, the windows and Nagle allow; then any owed ACK."""
        state = self.state
        if state == CLOSED:
            return
        if state == SYN_SENT:
            if self.snd_nxt == self.iss:
                self._send_syn(now, ack=False)
            return
        if state == SYN_RECEIVED:
            if self.snd_nxt == self.iss:
                self._send_syn(now, ack=True)
            elif self._ack_now:
                self._emit(self.snd_nxt, ACK, b"", now)
            return
        sent = False
        if self._sack_recovery:
            self._sack_retransmit(now)
        if state in _SEND_STATES or (state in (FIN_WAIT_1, CLOSING, LAST_ACK)
                                     and not self._fin_sent()):
            sent = self._send_data(now)
        if self._ack_now and not sent:
            # Pure ACKs carry SND.MAX: after a go-back-N rewind an older sequence number
            # would make the peer ignore our window updates (the SND.WL1 rule).
            self._emit(self.snd_max, ACK, b"", now)
        # after a FIN the state moves; data states send FIN from _send_data
        if self._fin_queued and self.state in (ESTABLISHED, CLOSE_WAIT) and self._fin_sent():
            self._set_state(FIN_WAIT_1 if self.state == ESTABLISHED else LAST_ACK)

    def _send_syn(self, now: float, ack: bool) -> None:
        """SYN offers every option we support; SYN-ACK only those the peer offered
        (RFC 7323 1.3, RFC 2018 2). The window in either is never scaled."""
        cfg = self.config
        rcv_window = min(self._free_space(), 0xFFFF)
        if ack:
            opts = build_options(mss=self.layer.link_mtu(self.remote_ip) - 40,
                                 wscale=self.rcv_wscale if self.ws_ok else None,
                                 sack_permitted=self.sack_ok,
                                 ts=(self._ts_now(now), self.ts_recent) if self.ts_ok else None)
        else:
            opts = build_options(mss=self.layer.link_mtu(self.remote_ip) - 40, wscale=cfg.wscale,
                                 sack_permitted=cfg.sack,
                                 ts=(self._ts_now(now), 0) if cfg.timestamps else None)
        flags = SYN | (ACK if ack else 0)
        self._last_ack_sent = self.rcv_nxt
        self.rcv_adv = seq_add(self.rcv_nxt, rcv_window) if ack else 0
        self.layer.emit(self, self.iss, self.rcv_nxt if ack else 0, flags, rcv_window, opts,
                        b"")
        self.segs_out += 1
        self.snd_nxt = seq_add(self.iss, 1)
        if seq_gt(self.snd_nxt, self.snd_max):
            self.snd_max = self.snd_nxt
        if self.t_rtx is None:
            self.t_rtx = now + self.rto.current()
        if self._rtt_seq is None and self._retries == 0:
            self._rtt_seq, self._rtt_time = self.iss, now
        self._ack_now = False

    def _send_data(self, now: float) -> bool:
        """Segment by effective MSS within min(cwnd, snd_wnd); Nagle and sender SWS."""
        sent = False
        buf = self.snd_buf
        mss = self.eff_mss
        seg_limit = self.layer.tso_limit(self)  # one MSS, or up to 64 KB with TSO
        pipe = self._pipe(now) if self._sack_recovery else 0
        while True:
            data_end = buf.end
            unsent = seq_diff(data_end, self.snd_nxt)
            if unsent < 0:
                unsent = 0
            cwnd = self.cc.cwnd
            if 0 < self._dupacks < 3 and not self._in_recovery:
                cwnd += self._dupacks * mss  # RFC 3042 limited transmit
            window = min(self.snd_wnd, cwnd)
            if self._sack_recovery:
                usable = min(cwnd - pipe,
                             self.snd_wnd - seq_diff(self.snd_nxt, self.snd_una))
            else:
                usable = window - seq_diff(self.snd_nxt, self.snd_una)
            room = unsent
            if self._sack:
                # after an RTO rewind, do not send again what the peer said it holds
                off = seq_diff(self.snd_nxt, self.snd_una)
                skip_to = self._sack.covering(off)
                if skip_to is not None:
                    self.snd_nxt = seq_add(self.snd_una, skip_to)
                    continue
                nxt_block = self._sack.next_start(off)
                if nxt_block is not None:
                    room = nxt_block - off  # stop short of data the peer already holds
            fin_ready = self._fin_queued and not self._fin_sent()
            if unsent == 0:
                self._cwnd_limited = False  # the application has nothing more to send
                if fin_ready:
                    self._emit(self.snd_nxt, FIN | ACK, b"", now)
                    self._after_send(1, now)
                    sent = True
                break
            if usable <= 0:
                self._cwnd_limited = cwnd <= self.snd_wnd
                if self.snd_wnd == 0 and self.flight_size == 0 and self.t_persist is None:
                    self._arm_persist(now)
                break
            n = min(unsent, usable, seg_limit, room)
            if n < mss and n < unsent and n < room:
                # window-limited small segment: RFC 9293 3.8.6.2.1 sender SWS avoidance
                if n < self.max_snd_wnd // 2 or self.flight_size > 0:
                    break
            elif n < mss and not self.nodelay and not fin_ready \
                    and seq_gt(self._snd_sml, self.snd_una) \
                    and seq_le(self._snd_sml, self.snd_nxt):
                # Nagle (RFC 896) with Minshall's change, as Linux: one small segment
                # unacknowledged at a time, so a reply of a full segment and a bit leaves
                # whole instead of waiting for the peer's delayed ACK (a re-send after a
                # rewind below that small segment is not held)
                break
            payload = buf.get(self.snd_nxt, n)
            if n < mss:
                self._snd_sml = seq_add(self.snd_nxt, n)
            last = n == unsent
            flags = ACK | (PSH if last else 0)
            if last and fin_ready:
                flags |= FIN
            self._emit(self.snd_nxt, flags, payload, now)
            self._after_send(n + (1 if flags & FIN else 0), now)
            pipe += n
            sent = True
            if flags & FIN:
                break
        return sent

    def _after_send(self, seq_len: int, now: float) -> None:
        start = self.snd_nxt
        self.snd_nxt = seq_add(self.snd_nxt, seq_len)
        if seq_lt(start, self.snd_max):
            # going back N after an RTO (or a smaller path MTU): each resend counts
            self.retransmits += 1
            self.layer.counters["tcp.retransmits"] += 1
        if seq_gt(self.snd_nxt, self.snd_max):
            if self._rtt_seq is None:
                self._rtt_seq, self._rtt_time = start, now
            self.snd_max = self.snd_nxt
        if self.t_rtx is None:
            self._arm_rtx(now)

    def _arm_rtx(self, now: float) -> None:
        """The retransmission timer, or a tail loss probe before it (RFC 8985 7.2): after
        2 SRTT (plus the delayed-ACK time when one segment is out) a probe makes the peer
        report a lost tail through SACK or duplicate ACKs, instead of waiting for RTO."""
        self._rack_armed = self._reo_armed = False
        if self.snd_una == self.snd_max:
            self.t_rtx = None
            self._tlp_armed = False
            return
        if self._sack_recovery:
            self._arm_recovery_timer(now)
            return
        rto = self.rto.current()
        srtt = self.rto.srtt
        if srtt is not None and not self._tlp_done and not self._in_recovery \
                and self.rto.backoff == 0 and self.state in _PROBE_STATES:
            pto = 2 * srtt
            if self.flight_size <= self.eff_mss:
                pto += WC_DELACK  # the peer may hold its ACK for a lone segment
            pto = max(pto, 0.01)
            if pto < rto:
                self.t_rtx = now + pto
                self._tlp_armed = True
                return
        self.t_rtx = now + rto
        self._tlp_armed = False

    def _on_pto(self, now: float) -> None:
        """RFC 8985 7.3: send one new segment if we can, else the last one again."""
        self._tlp_armed = False
        self._tlp_done = True
        self.layer.counters["tcp.tlp_probes"] += 1
        if self.layer.trace.on:
            self._trace("retransmit", now, why="TLP: tail loss probe", seq=self.snd_nxt)
        mss = self.eff_mss
        unsent = seq_diff(self.snd_buf.end, self.snd_nxt)
        if unsent > 0 and self.snd_wnd > self.flight_size:
            n = min(unsent, mss, self.snd_wnd - self.flight_size)
            self._emit(self.snd_nxt, ACK | PSH, self.snd_buf.get(self.snd_nxt, n), now)
            self._after_send(n, now)
        else:
            data_end = self.snd_buf.end  # the last segment sent, not beyond SND.MAX
            if seq_gt(data_end, self.snd_max):
                data_end = self.snd_max
            start = data_end if seq_diff(data_end, self.snd_una) <= 0 \
                else seq_add(data_end, -min(mss, seq_diff(data_end, self.snd_una)))
            flags = ACK | (FIN if self._fin_sent() else 0)
            n = seq_diff(data_end, start)
            if n <= 0 and not flags & FIN:
                self.t_rtx = now + self.rto.current()
                return
            self._emit(start, flags, self.snd_buf.get(start, n), now)
            self._rtt_seq = None
            self.retransmits += 1
            self.layer.counters["tcp.retransmits"] += 1
        self.t_rtx = now + self.rto.current()

    def _retransmit_first(self, now: float) -> None:
        """Re-send one segment at SND.UNA (fast retransmit, NewReno partial ACK)."""
        self._rtt_seq = None  # Karn: no sample from retransmitted data
        self.retransmits += 1
        self.layer.counters["tcp.retransmits"] += 1
        seq = self.snd_una
        avail = seq_diff(self.snd_buf.end, seq)
        # never beyond SND.MAX: a re-send repeats what left, it does not push new data
        # (after a window probe, SND.MAX is one byte past a shut window)
        n = min(max(avail, 0), self.eff_mss, max(seq_diff(self.snd_max, seq), 0))
        flags = ACK
        if self._fin_sent() and n == avail:
            flags |= FIN
        if n == 0 and not flags & FIN:
            return
        self._undo_retrans += 1
        self._emit(seq, flags, self.snd_buf.get(seq, n), now)
        self._arm_recovery_timer(now)

    def _emit(self, seq: int, flags: int, payload: bytes, now: float) -> None:
        wnd = self._window_to_advertise()
        ts = (self._ts_now(now), self.ts_recent) if self.ts_ok else None
        sack = self.ooo.sack_blocks(MAX_SACK_BLOCKS) if self.sack_ok and self.ooo.blocks \
            else ()
        if sack and payload:
            # SACK blocks must not push a full segment past the MSS or the path MTU
            # (eff_mss is both, less the timestamps): send fewer or none. A datagram
            # too big for the path would be refused at the IP layer, again at every
            # retransmission.
            room = (self.eff_mss + (TS_OPTION_LEN if self.ts_ok else 0) - len(payload)
                    - (TS_OPTION_LEN if ts else 0) - 4) // 8
            sack = sack[: max(room, 0)]
        opts = build_options(ts=ts, sack_blocks=sack) if ts or sack else b""
        if flags & ACK:
            self._ack_now = False
            self._segs_unacked = 0
            self.t_delack = None
            self._last_ack_sent = self.rcv_nxt
            if self._quickack > 0:
                self._quickack -= 1
        self.layer.emit(self, seq, self.rcv_nxt, flags, wnd >> self.rcv_wscale, opts, payload)
        self.segs_out += 1
        if self._sack_recovery and payload:
            self.cc.sent_in_recovery(len(payload))
        if (payload or flags & FIN) and self.sack_ok:
            end = (seq + len(payload) + (1 if flags & FIN else 0)) & MASK
            rack = self._rack
            last = rack.ents[-1] if rack.ents else None
            if last is not None and last[0] == seq and last[1] == now \
                    and last[3] == rack.serial and not last[2]:
                last[0] = end  # more of the same burst of new data: the hot path
            elif seq_ge(seq, self.snd_una):
                rack.sent(seq, end, now, seq_lt(seq, self.snd_max))

    def _arm_persist(self, now: float) -> None:
        delay = min(max(self.rto.current(), 0.2) * (1 << self._persist_backoff), 60.0)
        self.t_persist = now + delay

    # == timers ===========================================================================

    def deadline(self) -> float | None:
        best = None
        for t in (self.t_rtx, self.t_delack, self.t_persist, self.t_keepalive,
                  self.t_timewait):
            if t is not None and (best is None or t < best):
                best = t
        return best

    def on_timer(self, now: float) -> None:
        if self.t_timewait is not None and self.t_timewait <= now:
            self.t_timewait = None
            self._terminate(None)
            return
        if self.t_rtx is not None and self.t_rtx <= now:
            self.t_rtx = None
            if self._reo_armed:
                self._on_reorder_timer(now)
            elif self._rack_armed:
                self._on_recovery_timer(now)
            elif self._tlp_armed:
                self._on_pto(now)
            else:
                self._on_rto(now)
            if self.state == CLOSED:
                return
        if self.t_persist is not None and self.t_persist <= now:
            self.t_persist = None
            self._on_persist(now)
        if self.t_delack is not None and self.t_delack <= now:
            self.t_delack = None
            self._ack_now = True
        if self.t_keepalive is not None and self.t_keepalive <= now:
            self.t_keepalive = None
            self._on_keepalive(now)
        if self.state != CLOSED:
            self._mark()

    def _on_rto(self, now: float) -> None:
        """RFC 6298 5.4-5.6 and RFC 5681 3.1: back off, collapse cwnd, go back to SND.UNA."""
        c = self.layer.counters
        if self.snd_una == self.snd_max and self.state not in (SYN_SENT, SYN_RECEIVED):
            return
        self._retries += 1
        limit = {SYN_SENT: self.config.syn_retries,
                 SYN_RECEIVED: self.config.synack_retries}.get(self.state, self.config.retries)
        if self._retries > limit:
            c["tcp.timeouts"] += 1
            if self.state == SYN_RECEIVED and self.passive:
                self._terminate(None, notify=False)
                return
            self._terminate(TimeoutError(
                f"connection to {self.layer.peer_name(self)} timed out"))
            return
        c["tcp.rto_expiries"] += 1
        if self.layer.trace.on:
            self._trace("retransmit", now, why=f"RTO expired (backoff {self._retries})",
                        seq=self.snd_una, rto_ms=round(self.rto.current() * 1000, 1))
        if self.state in (SYN_SENT, SYN_RECEIVED):
            c["tcp.retransmits"] += 1  # (data resends are counted as they leave)
            self.retransmits += 1
        self.rto.back_off()
        if self.state not in (SYN_SENT, SYN_RECEIVED):
            self.cc.on_timeout(seq_diff(self.snd_max, self.snd_una), now,
                               first=self._retries == 1)
        self._undo_retrans = -1  # Eifel decides about timeouts
        self._undo_tsval = None
        self._in_recovery = False
        self._sack_recovery = False
        # RFC 2018 8 / RFC 6675 5.1: the receiver may have reneged on what it SACKed;
        # re-send it unless it is reported again
        self._sack.clear()
        self._recover = self.snd_max  # RFC 6582 4: no fast retransmit for these old dupacks
        self._dupacks = 0
        self._rtt_seq = None  # Karn's rule
        self.snd_nxt = self.snd_una  # go back N: output() re-sends from SND.UNA
        if self.state == SYN_SENT or self.state == SYN_RECEIVED:
            self.snd_nxt = self.iss
        elif self.ts_ok and self._retries == 1:
            # the first timeout of an episode: remember enough to undo it (Eifel)
            self._eifel = self._ts_now(now)
        self.t_rtx = now + self.rto.current()
        if self.layer.trace.on:
            self._trace_cc(now, "rto")

    def _on_persist(self, now: float) -> None:
        """RFC 9293 3.8.6.1: probe a zero window with one byte, backing off. RFC 1122
        4.2.2.17 keeps the connection while the receiver answers; like the RTO, probes
        that go unanswered end it, and so do a few more once the user has closed (an
        orphan that a receiver could otherwise hold forever by keeping its window shut)."""
        if self.snd_wnd > 0 or seq_diff(self.snd_buf.end, self.snd_una) <= 0:
            self._persist_backoff = 0
            return
        cfg = self.config
        if self._probes_unanswered >= cfg.retries or (
                self._user_closed and self._orphan_probes >= cfg.orphan_retries):
            c = self.layer.counters
            c["tcp.window_probe_timeouts"] += 1
            c["tcp.timeouts"] += 1
            if self._probes_unanswered < cfg.retries:  # it is alive: tell it we are gone
                self.layer.send_rst(self.local_ip, self.local_port, self.remote_ip,
                                    self.remote_port, self.snd_max, 0, with_ack=False)
                c["tcp.resets_sent"] += 1
            self._terminate(TimeoutError(
                f"{self.layer.peer_name(self)} kept its window shut and the probes "
                "went unanswered" if self._probes_unanswered >= cfg.retries else
                f"{self.layer.peer_name(self)} kept its window shut after the close"))
            return
        self._probes_unanswered += 1
        if self._user_closed:
            self._orphan_probes += 1
        self.layer.counters["tcp.window_probes"] += 1
        seq = self.snd_una
        self._emit(seq, ACK, self.snd_buf.get(seq, 1), now)
        # The probe byte is sent beside the stream, like a retransmission: SND.NXT stays,
        # so an opened window resends from SND.UNA (and Nagle never waits on the probe),
        # while SND.MAX covers it in case the peer accepts and acknowledges it.
        probe_end = seq_add(seq, 1)
        if seq_gt(probe_end, self.snd_max):
            self.snd_max = probe_end
        self._persist_backoff = min(self._persist_backoff + 1, 10)
        self._arm_persist(now)

    def _on_keepalive(self, now: float) -> None:
        cfg = self.config
        if self.state != ESTABLISHED:
            return
        if self._keepalive_probes >= cfg.keepalive_count:
            self.layer.counters["tcp.keepalive_timeouts"] += 1
            self._terminate(TimeoutError(
                f"keepalive: {self.layer.peer_name(self)} stopped answering"))
            return
        self._keepalive_probes += 1
        self.layer.counters["tcp.keepalive_probes"] += 1
        # A segment one below SND.NXT with no data: the peer must answer with an ACK.
        self._emit(seq_add(self.snd_max, -1), ACK, b"", now)
        self.t_keepalive = now + cfg.keepalive_interval

    # == the end ==========================================================================

    def _notify_closed(self, exc: Exception | None) -> None:
        if not self._closed_notified:
            self._closed_notified = True
            if self.user is not None:
                self.user.on_closed(exc)

    def _terminate(self, exc: Exception | None, notify: bool = True) -> None:
        """Enter CLOSED and leave no trace: timers, buffers and the table entry go."""
        self.t_rtx = self.t_delack = self.t_persist = self.t_keepalive = None
        self.t_timewait = None
        self._set_state(CLOSED)
        self.layer.remove(self)
        if notify:
            self._notify_closed(exc)
        else:
            self._closed_notified = True
        self.user = None
