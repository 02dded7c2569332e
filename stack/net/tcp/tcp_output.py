"""What to send (RFC 9293 3.8.6, RFC 896 with Minshall's change): SYN and SYN-ACK, data
cut by MSS within the congestion and receive windows, the segment builder with its
options, and the receive window we advertise (receiver SWS avoidance).

A part of Connection (connection.py), kept apart by concern as Linux keeps tcp_output.c.
"""

from __future__ import annotations

from stack.net.tcp.seq import MASK, seq_add, seq_diff, seq_ge, seq_gt, seq_le, seq_lt
from stack.net.tcp.states import (
    CLOSE_WAIT,
    CLOSED,
    CLOSING,
    ESTABLISHED,
    FIN_WAIT_1,
    LAST_ACK,
    MAX_SACK_BLOCKS,
    RTO,
    SEND_STATES,
    SYN_RECEIVED,
    SYN_SENT,
    TLP,
    TS_OPTION_LEN,
)
from stack.wire.tcp import ACK, FIN, PSH, SYN, build_options


class OutputMixin:
    """Methods of Connection; the state is Connection's (__slots__ there)."""

    __slots__ = ()

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
        timer_idle = self.t_rtx is None
        if state in SEND_STATES or (state in (FIN_WAIT_1, CLOSING, LAST_ACK)
                                     and not self._fin_sent()):
            sent = self._send_data(now)
        if sent and timer_idle and self.rtx_kind in (RTO, TLP) and not self._in_recovery:
            # The timer was armed as the burst's first segment left, when one segment
            # was out and a probe would have waited for a delayed ACK. Choose again for
            # the whole burst (RFC 8985 7.2: the probe timeout of the flight sent).
            self._arm_rtx(now)
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
            opts = build_options(mss=self.env.link_mtu(self.remote_ip) - 40,
                                 wscale=self.rcv_wscale if self.ws_ok else None,
                                 sack_permitted=self.sack_ok,
                                 ts=(self._ts_now(now), self.ts_recent) if self.ts_ok else None)
        else:
            opts = build_options(mss=self.env.link_mtu(self.remote_ip) - 40, wscale=cfg.wscale,
                                 sack_permitted=cfg.sack,
                                 ts=(self._ts_now(now), 0) if cfg.timestamps else None)
        flags = SYN | (ACK if ack else 0)
        self._last_ack_sent = self.rcv_nxt
        self.rcv_adv = seq_add(self.rcv_nxt, rcv_window) if ack else 0
        self.env.emit(self, self.iss, self.rcv_nxt if ack else 0, flags, rcv_window, opts,
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
        # The ACK side of every segment of one burst (window field, options) is the same:
        # nothing is received while it leaves and the clock does not move. The first
        # segment works it out, the rest reuse it (None: work it out again each time,
        # as while SACK blocks are being reported).
        memo = None
        seg_limit = self.env.tso_limit(self)  # one MSS, or up to 64 KB with TSO
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
            if self._sack.blocks:
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
                    if self.flight_size == 0 and self.t_persist is None:
                        # nothing in flight will bring an ACK: the override timer of
                        # RFC 9293 3.8.6.2.1 sends what the window allows, if no update
                        # comes first (a lost one would otherwise stall us for good)
                        self._arm_persist(now)
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
            if memo is None:
                memo = self._emit(self.snd_nxt, flags, payload, now)
            else:
                self._emit_more(self.snd_nxt, flags, payload, now, memo)
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
            self.env.counters["tcp.retransmits"] += 1
        if seq_gt(self.snd_nxt, self.snd_max):
            if self._rtt_seq is None:
                self._rtt_seq, self._rtt_time = start, now
            self.snd_max = self.snd_nxt
        if self.t_rtx is None:
            self._arm_rtx(now)

    def _emit(self, seq: int, flags: int, payload: bytes, now: float
              ) -> tuple[int, bytes] | None:
        """Send one segment; returns its window field and options when a segment that
        follows at once may reuse them (see `_emit_more`), else None."""
        wnd = self._window_to_advertise()
        ts = (self._ts_now(now), self.ts_recent) if self.ts_ok else None
        reported = self.ooo.sack_blocks(MAX_SACK_BLOCKS) if self.sack_ok and self.ooo.blocks \
            else ()
        sack = reported
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
        field = wnd >> self.rcv_wscale
        self.env.emit(self, seq, self.rcv_nxt, flags, field, opts, payload)
        self._sent_one(seq, flags, payload, now)
        # with SACK blocks to report, how many fit depends on each segment's length
        return None if reported or not flags & ACK else (field, opts)

    def _emit_more(self, seq: int, flags: int, payload: bytes, now: float,
                   memo: tuple[int, bytes]) -> None:
        """The next segment of a burst, with `_emit`'s window field and options: with
        no data taken in since and the same `now`, working them out again gives the same
        (the advertised edge moved once, on the first) and the ACK bookkeeping is done.
        This holds while nothing `_send_data` calls between two segments (the send
        buffer, `env.emit`, `_after_send`, the timers) touches the receive side or calls
        the application (tests/unit/test_burst_emit.py)."""
        if self._quickack > 0:
            self._quickack -= 1
        self.env.emit(self, seq, self.rcv_nxt, flags, memo[0], memo[1], payload)
        self._sent_one(seq, flags, payload, now)

    def _sent_one(self, seq: int, flags: int, payload: bytes, now: float) -> None:
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
