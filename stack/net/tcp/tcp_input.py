"""Segment arrival (RFC 9293 3.10.7): header prediction, SYN-SENT, the synchronized
states' checks in their order (sequence, RST, SYN, ACK, text, FIN), the ACK's effects
(SND.UNA, RTT, the window, what the controller is told) and receiving data.

A part of Connection (connection.py), kept apart by concern as Linux keeps tcp_input.c.
"""

from __future__ import annotations

from stack.net.tcp.seq import MASK, seq_add, seq_diff, seq_ge, seq_gt, seq_le, seq_lt
from stack.net.tcp.states import (
    CLOSE_WAIT,
    CLOSED,
    CLOSING,
    ESTABLISHED,
    FIN_WAIT_1,
    FIN_WAIT_2,
    LAST_ACK,
    PAWS_IDLE,
    RECV_STATES,
    SYN_RECEIVED,
    SYN_SENT,
    TIME_WAIT,
)
from stack.wire.tcp import ACK, FIN, RST, SYN, Segment

PREDICT = True  # header prediction on (the tests turn it off to compare the two paths)


class InputMixin:
    """Methods of Connection; the state is Connection's (__slots__ there)."""

    __slots__ = ()

    def segment_arrives(self, seg: Segment, now: float) -> None:
        self.segs_in += 1
        self.last_recv = now
        if self.keepalive and self.state == ESTABLISHED:
            self._keepalive_probes = 0
            self.t_keepalive = now + self.config.keepalive_idle
        tracing = self.env.trace.on
        if tracing:
            before = (self.cc.cwnd, self.cc.ssthresh)
        if self.state == SYN_SENT:
            self._arrive_syn_sent(seg, now)
        elif not (self._predicted_data(seg, now) if seg.payload else
                  self._predicted_ack(seg, now)):
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
        if not PREDICT or self.state != ESTABLISHED or seg.flags & 0x37 != ACK \
                or seg.payload \
                or seg.seq != self.rcv_nxt or self._in_recovery or self._sack \
                or self._dupacks:
            return False
        ack = seg.ack
        if not (seq_gt(ack, self.snd_una) and seq_le(ack, self.snd_max)) \
                or (seg.window << self.snd_wscale) != self.snd_wnd:
            return False
        if not self._predicted_options(seg, now):
            return False
        flight = seq_diff(self.snd_max, self.snd_una)
        acked, rtt = self._ack_advanced(seg, now)
        self.snd_wl1, self.snd_wl2 = seg.seq, ack
        self._cc_ack(acked, rtt, now, flight)
        self.env.hot.tcp_predicted_acks += 1
        return True

    def _predicted_data(self, seg: Segment, now: float) -> bool:
        """Header prediction for data (the receiver's half of the fast path): in
        ESTABLISHED with nothing of ours in flight, the next in-order segment, within
        the window we offered, acknowledging what was already acknowledged, the window
        unchanged, no SACK blocks, passing PAWS. The full path would take only its text
        and move SND.WL1; do just that (the same state either way:
        tests/unit/test_tcp_fastpath.py). False: take the long way."""
        if not PREDICT or self.state != ESTABLISHED or seg.flags & 0x37 != ACK \
                or seg.seq != self.rcv_nxt or seg.ack != self.snd_una \
                or self.snd_una != self.snd_max or self._in_recovery or self._sack \
                or self.ooo.blocks or (seg.window << self.snd_wscale) != self.snd_wnd \
                or len(seg.payload) > seq_diff(self.rcv_adv, self.rcv_nxt):
            return False
        if not self._predicted_options(seg, now):
            return False
        # what the fifth check does with an ACK of SND.UNA on a data segment
        self._probes_unanswered = 0
        self._dupacks = 0
        self._cc_ack(0, None, now, 0)
        if seq_lt(self.snd_wl1, seg.seq) or (
                self.snd_wl1 == seg.seq and seq_le(self.snd_wl2, seg.ack)):
            self.snd_wl1, self.snd_wl2 = seg.seq, seg.ack
        self.env.hot.tcp_predicted_data += 1
        self._receive_data(seg, now)
        return True

    def _predicted_options(self, seg: Segment, now: float) -> bool:
        """For both predictions: no SACK blocks, and PAWS passed (RFC 7323 5.3), the
        timestamp remembered if the segment holds RCV.NXT (4.3). False: the long way."""
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
        return True

    def _arrive_syn_sent(self, seg: Segment, now: float) -> None:
        """RFC 9293 3.10.7.3."""
        flags = seg.flags
        c = self.env.counters
        if flags & ACK:
            if seq_le(seg.ack, self.iss) or seq_gt(seg.ack, self.snd_max):
                if not flags & RST:
                    self.env.send_rst(self.local_ip, self.local_port, self.remote_ip,
                                        self.remote_port, seg.ack, 0, with_ack=False)
                    c["tcp.resets_sent"] += 1
                return
        if flags & RST:
            if flags & ACK:  # acceptable ACK: the peer refused us
                c["tcp.resets_received"] += 1
                self._terminate(ConnectionRefusedError(
                    f"connection refused by {self.env.peer_name(self)}"))
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
            if seg.payload and self.state != CLOSED:  # (the application may have aborted)
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
        layer = self.env
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
            if self.state in RECV_STATES:
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
        if self.env.allow_challenge_ack(now):
            self._ack_now = True

    def _process_ack(self, seg: Segment, now: float) -> bool:
        """RFC 9293 3.10.7.4 fifth check in synchronized states; False to stop here."""
        c = self.env.counters
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
                self.t_fin_wait_2 = now + 2 * self.config.msl
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
        self._probes_unanswered = 0  # the peer is there (a probe may be what it acked)
        if self._rto_episode and seq_gt(ack, self._recover):
            self._rto_episode = False
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

    def _cc_ack(self, delivered: int, rtt: float | None, now: float, flight: int) -> None:
        """Tell the controller what this ACK delivered. The window grows only while it is
        what limits the sender (RFC 7661): the last send stopped at cwnd, or the flight
        before this ACK filled at least half of it (slow start)."""
        cc = self.cc
        cc.on_ack(delivered, rtt, now, self.snd_una, self.snd_nxt, flight,
                  self._cwnd_limited or 2 * flight >= cc.cwnd, self._in_recovery)

    def _established(self) -> None:
        self.env.established(self)
        if self.keepalive:
            self.t_keepalive = self.last_recv + self.config.keepalive_idle

    def _receive_data(self, seg: Segment, now: float) -> None:
        c = self.env.counters
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
        if self.state == CLOSED:
            return  # the application aborted while reading
        if filled_gap:
            while (more := self.ooo.pop_ready(self.rcv_nxt)) is not None:
                if more:
                    self.rcv_nxt = seq_add(self.rcv_nxt, len(more))
                    self._deliver(more)
                    if self.state == CLOSED:
                        return
            self._ack_now = True  # RFC 5681 4.2: ACK a segment that fills a gap at once
        # RFC 5681 4.2 / RFC 9293 3.8.6.3: ACK at least every second full-sized segment,
        # otherwise within the delayed-ACK time.
        # Segments that arrive in one batch are acknowledged together at its end (as
        # Linux does for a GRO super-packet), but no more than ack_every of them: a batch
        # may hold hundreds, and the sender's ACK clock must hear of them as they come.
        self._segs_unacked += 1
        if self._segs_unacked >= self.config.ack_every or len(data) > self.eff_mss + 40:
            self._emit(self.snd_max, ACK, b"", now)
        elif self._segs_unacked >= 2 or self._quickack > 0:
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
            if self.state != CLOSED:  # (unless the application aborted meanwhile)
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
        self.t_fin_wait_2 = None
        self._notify_closed(None)
        self.user = None
        self.env.enter_time_wait(self, window, now)
