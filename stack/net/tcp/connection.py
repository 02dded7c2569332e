"""One TCP connection: the RFC 9293 state machine with its timers, pure and clock-free.

Input:  segment_arrives(seg, now), on_timer(now), and the user calls send(), shutdown(),
        close(), abort(), pause_reading(), resume_reading().
Output: output(now) emits segments through the environment it was given (TcpEnv: the
        TCP layer); the user object is told about establishment, data, end of stream,
        progress of the send buffer and the end.

The engine is split by concern, as Linux splits tcp_input/tcp_output/tcp_timer:
this file holds the TCB and the user calls; tcp_input.py segment arrival; tcp_output.py
what to send; recovery.py loss detection and repair; timers.py the timers;
congestion.py the congestion window; timewait.py the record TIME-WAIT leaves.

Nothing is transmitted from inside a user call: the connection marks itself dirty and
the layer calls output() when the runtime flushes, so writes made in one event-loop
iteration leave as few, full segments.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from stack.net.tcp.buffers import OutOfOrderQueue, SendBuffer
from stack.net.tcp.congestion import DEFAULT as DEFAULT_CC
from stack.net.tcp.congestion import make as make_cc
from stack.net.tcp.rack import Rack
from stack.net.tcp.recovery import RecoveryMixin
from stack.net.tcp.rto import RtoEstimator
from stack.net.tcp.sack import SackScoreboard
from stack.net.tcp.seq import (
    MASK,
    seq_add,
    seq_diff,
    seq_gt,
)
from stack.net.tcp.states import (  # noqa: F401 - the names other modules import here
    CLOSE_WAIT,
    CLOSED,
    CLOSING,
    ESTABLISHED,
    FIN_WAIT_1,
    FIN_WAIT_2,
    LAST_ACK,
    LISTEN,
    RECV_STATES,
    RTO,
    STATE_NAMES,
    SYN_RECEIVED,
    SYN_SENT,
    TIME_WAIT,
    TS_OPTION_LEN,
)
from stack.net.tcp.tcp_input import InputMixin
from stack.net.tcp.tcp_output import OutputMixin
from stack.net.tcp.timers import TimerMixin
from stack.wire.ipv4 import ip_to_str
from stack.wire.tcp import Segment


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
    # Inside one batch of received frames, ACK at once after this many full segments;
    # the batch's end ACKs the rest (from 2 segments on). 44 segments is 64 KB, what
    # Linux acknowledges at most per GRO super-packet; 2 would be RFC 5681 4.2 to the
    # letter (measured: uploads 4 % slower plain, 14 % slower with --offload).
    ack_every: int = 44
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


class TcpEnv(Protocol):
    """What a connection needs from the stack around it, passed in (the TCP layer is
    one): it never imports the layer. Times are the event loop's; `counters` (with its
    `hot` slots) and `trace` are the node's."""

    now: float
    counters: Any
    hot: Any  # counters.hot: the per-segment counters as slots (stack/counters.py)
    trace: Any

    def emit(self, conn: Connection, seq: int, ack: int, flags: int, window: int,
             options: bytes, payload: bytes) -> None: ...
    def send_rst(self, local_ip: bytes, local_port: int, remote_ip: bytes, remote_port: int,
                 seq: int, ack: int, with_ack: bool) -> None: ...
    def link_mtu(self, dst: bytes) -> int: ...
    def path_mtu(self, dst: bytes) -> int: ...
    def tso_limit(self, conn: Connection) -> int: ...
    def peer_name(self, conn: Connection) -> str: ...
    def mark_dirty(self, conn: Connection) -> None: ...
    def state_changed(self, conn: Connection, old: int, new: int) -> None: ...
    def established(self, conn: Connection) -> None: ...
    def remove(self, conn: Connection) -> None: ...
    def enter_time_wait(self, conn: Connection, window: int, now: float) -> None: ...
    def allow_challenge_ack(self, now: float) -> bool: ...


class Connection(InputMixin, OutputMixin, RecoveryMixin, TimerMixin):
    """The TCB (RFC 9293 3.3.1) and what the user calls. Segment arrival is in
    tcp_input.py, sending in tcp_output.py, loss recovery in recovery.py, timers in
    timers.py, the window in congestion.py, TIME-WAIT in timewait.py."""

    __slots__ = (
        "_ack_now", "_closed_notified", "_eof_pending", "_dupacks", "_fin_queued", "_in_recovery",
        "_keepalive_probes", "_last_ack_sent", "_persist_backoff", "_quickack",
        "_rcv_buffer", "_recover", "_retries", "_rtt_seq", "_rtt_time", "_segs_unacked",
        "_ts_offset", "_user_closed", "cc", "config", "eff_mss", "frame_template", "iss",
        "irs", "env",
        "local_ip", "local_port", "max_snd_wnd", "ooo", "passive", "peer_mss",
        "rcv_adv", "rcv_nxt", "rcv_wscale", "reading_paused", "remote_ip", "remote_port",
        "rto", "sack_ok", "segs_in", "segs_out", "retransmits", "snd_buf", "snd_max",
        "snd_nxt", "snd_una", "snd_wl1", "snd_wl2", "snd_wnd", "snd_wscale", "state",
        "t_delack", "t_keepalive", "t_persist", "t_rtx", "t_fin_wait_2", "timer_at",
        "ts_ok", "ts_recent", "ws_ok", "ts_recent_time", "user", "last_recv", "nodelay",
        "_listener", "keepalive", "_sack", "_sack_recovery", "_rack", "rtx_kind",
        "_tlp_done", "_rack_left", "_eifel", "_probes_unanswered",
        "_orphan_probes", "_snd_sml", "_cwnd_limited", "_undo_retrans", "_undo_tsval",
        "_rto_episode",
    )

    def __init__(self, env: TcpEnv, local_ip: bytes, local_port: int, remote_ip: bytes,
                 remote_port: int, iss: int, config: TcpConfig, ts_offset: int) -> None:
        self.env = env
        self.frame_template = None  # built at the first send (template.py)
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
        self._rto_episode = False  # after an RTO, until what it covered is acknowledged
        self.rto = RtoEstimator(config.initial_rto, config.min_rto, config.max_rto)
        self._dupacks = 0
        self._in_recovery = False
        self._sack = SackScoreboard()  # what the peer told us it holds beyond SND.UNA
        self._sack_recovery = False  # this recovery is driven by the scoreboard
        self._rack = Rack(iss)  # when each outstanding byte left (RFC 8985)
        self.rtx_kind = RTO  # what t_rtx waits for (states.py: RTO, TLP, REORDER, RECOVERY)
        self._tlp_done = False  # one probe per flight (RFC 8985 7.2)
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
        self.t_fin_wait_2: float | None = None
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
        self.env.state_changed(self, self.state, state)
        if self.env.trace.on:
            self._trace("state", self.env.now, old=STATE_NAMES[self.state],
                        new=STATE_NAMES[state])
        self.state = state

    def _trace(self, event: str, now: float, **fields: object) -> None:
        """An event about this connection in the node's trace (callers check it is on)."""
        self.env.trace.emit("tcp", event, now, local=ip_to_str(self.local_ip),
                              local_port=self.local_port, remote=ip_to_str(self.remote_ip),
                              remote_port=self.remote_port, **fields)

    def _trace_cc(self, now: float, why: str) -> None:
        rto = self.rto
        self._trace("cwnd", now, why=why, cwnd=self.cc.cwnd, ssthresh=self.cc.ssthresh_shown,
                    srtt_ms=round((rto.srtt or 0.0) * 1000, 3),
                    in_flight=self.flight_size)

    def _mark(self) -> None:
        self.env.mark_dirty(self)

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
        local_max = self.env.link_mtu(self.remote_ip) - 40
        self.peer_mss = min(peer_mss if peer_mss else 536, local_max)
        self.eff_mss = self._mss_for(self.env.path_mtu(self.remote_ip))
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
        self._snd_sml = seg.ack
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
        self.peer_mss = min(mss, self.env.link_mtu(self.remote_ip) - 40)
        self.eff_mss = self._mss_for(self.env.path_mtu(self.remote_ip))
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
        old = self.cc
        new.cwnd, new.ssthresh = old.cwnd, old.ssthresh
        # a recovery under way goes on under the new controller's rules
        new.prr_delivered, new.prr_out, new.recover_fs = \
            old.prr_delivered, old.prr_out, old.recover_fs
        new.round_end = old.round_end
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
            self.env.send_rst(self.local_ip, self.local_port, self.remote_ip,
                                self.remote_port, self.snd_max, 0, with_ack=False)
            self.env.counters["tcp.resets_sent"] += 1
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
        if self.state in RECV_STATES and self._window_update_due():
            self._ack_now = True
            self._mark()

    # == segment arrival ==================================================================

    # == receiving data ===================================================================

    # == receive window ===================================================================

    # == output ===========================================================================

    # == timers ===========================================================================

    # == the end ==========================================================================

    def _notify_closed(self, exc: Exception | None) -> None:
        if not self._closed_notified:
            self._closed_notified = True
            if self.user is not None:
                self.user.on_closed(exc)

    def _terminate(self, exc: Exception | None, notify: bool = True) -> None:
        """Enter CLOSED and leave no trace: timers, buffers and the table entry go."""
        self.t_rtx = self.t_delack = self.t_persist = self.t_keepalive = None
        self.t_fin_wait_2 = None
        self._set_state(CLOSED)
        self.env.remove(self)
        if notify:
            self._notify_closed(exc)
        else:
            self._closed_notified = True
        self.user = None
