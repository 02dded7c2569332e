"""Loss recovery: fast retransmit and fast recovery (RFC 5681, RFC 6582, RFC 6675 with
the SACK scoreboard), RACK-TLP (RFC 8985), the retransmission timeout (RFC 6298) with
Eifel's undo of spurious ones (RFC 3522/4015), and undo of spurious recoveries.

The retransmission timer t_rtx has one explicit kind (rtx_kind): RTO, TLP, REORDER or
RECOVERY (states.py). A part of Connection (connection.py), as Linux keeps tcp_recovery.c
and the timeout in tcp_timer.c.
"""

from __future__ import annotations

from stack.net.tcp.seq import seq_add, seq_diff, seq_gt, seq_lt
from stack.net.tcp.states import (
    PROBE_STATES,
    RECOVERY,
    REORDER,
    RTO,
    SYN_RECEIVED,
    SYN_SENT,
    TLP,
    WC_DELACK,
)
from stack.wire.tcp import ACK, FIN, PSH, Segment


class RecoveryMixin:
    """Methods of Connection; the state is Connection's (__slots__ there)."""

    __slots__ = ()

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
        self.env.counters["tcp.fast_retransmits"] += 1
        if self.env.trace.on:
            self._trace("retransmit", now, why="fast retransmit" + (
                " (SACK/RACK)" if sack_says else f" ({self._dupacks} duplicate ACKs)"),
                seq=self.snd_una)
        self._in_recovery = True
        self._recover = self.snd_max
        self.rtx_kind = RTO  # (a pending probe is moot once recovery starts)
        self._rack_left = 3
        # undo (as Linux): if every retransmission of this recovery comes back D-SACKed,
        # or the ACKs show the originals arrived, the reduction is taken back
        self._undo_retrans = 0
        self._undo_tsval = self._ts_now(now) if self.ts_ok else None
        if self._sack:
            self._sack_recovery = True
            self.cc.enter_recovery(outstanding, True, now, reduce=not self._rto_episode)
            self._sack_retransmit(now, first=True)
            if self.rtx_kind != RECOVERY:  # nothing to re-send yet: no stale TLP deadline
                self._arm_recovery_timer(now)
        else:
            self._sack_recovery = False
            self.cc.enter_recovery(outstanding, False, now, reduce=not self._rto_episode)
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
            self.rtx_kind = REORDER
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
        c = self.env.counters
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
                if self.rtx_kind != RECOVERY:
                    self._arm_recovery_timer(now)
                start = end

    def _arm_recovery_timer(self, now: float) -> None:
        """After a retransmission in recovery, expect an ACK within about two round
        trips; if none comes, the retransmissions were lost too (RACK's reasoning,
        RFC 8985 6.3, for when nothing sent later arrives to show it) and they go again,
        a few times, before the RTO takes over."""
        srtt = self.rto.srtt
        if srtt is None or self._rack_left <= 0:
            self.rtx_kind = RTO
            self.t_rtx = now + self.rto.current()
            return
        self.rtx_kind = RECOVERY
        self.t_rtx = now + min(max(2 * srtt + 0.002, 0.01), self.rto.current())

    def _on_reorder_timer(self, now: float) -> None:
        """RFC 8985 6.3: the reordering window of a byte that left before a delivered
        one has passed; it is lost."""
        self.rtx_kind = RTO
        self.env.counters["tcp.reorder_timeouts"] += 1
        if self.env.trace.on:
            self._trace("retransmit", now, why="RACK: reordering window passed",
                        seq=self.snd_una)
        self._detect_loss(now)
        if self._sack_recovery:
            self._sack_retransmit(now)
        if self.t_rtx is None:
            self._arm_rtx(now)

    def _on_recovery_timer(self, now: float) -> None:
        self.rtx_kind = RTO
        if not self._in_recovery or self.snd_una == self.snd_max:
            self._arm_rtx(now)
            return
        self._rack_left -= 1
        self.env.counters["tcp.lost_retransmits"] += 1
        if self.env.trace.on:
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

    def _end_recovery(self, ack: int) -> None:
        sack = self._sack_recovery
        self._in_recovery = False
        self._sack_recovery = False
        self._rack.recovery_done()
        self.cc.exit_recovery(seq_diff(self.snd_max, ack), sack)

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
        self._recover = self.snd_una  # the episode is over: a new loss is a new one
        if self._in_recovery:
            self._in_recovery = False
            self._sack_recovery = False
            self._rack.recovery_done()
        if self.cc.undo():
            self.env.counters["tcp.spurious_recoveries"] += 1
            if self.env.trace.on:
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
        self.env.counters["tcp.spurious_rtos"] += 1
        self.snd_nxt = self.snd_max
        self.cc.undo()

    def _arm_rtx(self, now: float) -> None:
        """The retransmission timer, or a tail loss probe before it (RFC 8985 7.2): after
        2 SRTT (plus the delayed-ACK time when one segment is out) a probe makes the peer
        report a lost tail through SACK or duplicate ACKs, instead of waiting for RTO."""
        if self.snd_una == self.snd_max:
            self.t_rtx = None
            self.rtx_kind = RTO
            return
        if self._sack_recovery:
            self._arm_recovery_timer(now)
            return
        rto = self.rto.current()
        srtt = self.rto.srtt
        if srtt is not None and not self._tlp_done and not self._in_recovery \
                and self.rto.backoff == 0 and self.state in PROBE_STATES:
            pto = 2 * srtt
            if self.flight_size <= self.eff_mss:
                pto += WC_DELACK  # the peer may hold its ACK for a lone segment
            pto = max(pto, 0.01)
            if pto < rto:
                self.t_rtx = now + pto
                self.rtx_kind = TLP
                return
        self.t_rtx = now + rto
        self.rtx_kind = RTO

    def _on_pto(self, now: float) -> None:
        """RFC 8985 7.3: send one new segment if we can, else the last one again."""
        self.rtx_kind = RTO
        self._tlp_done = True
        self.env.counters["tcp.tlp_probes"] += 1
        if self.env.trace.on:
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
            self.env.counters["tcp.retransmits"] += 1
        self.t_rtx = now + self.rto.current()

    def _retransmit_first(self, now: float) -> None:
        """Re-send one segment at SND.UNA (fast retransmit, NewReno partial ACK)."""
        self._rtt_seq = None  # Karn: no sample from retransmitted data
        self.retransmits += 1
        self.env.counters["tcp.retransmits"] += 1
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

    def _on_rto(self, now: float) -> None:
        """RFC 6298 5.4-5.6 and RFC 5681 3.1: back off, collapse cwnd, go back to SND.UNA."""
        c = self.env.counters
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
                f"connection to {self.env.peer_name(self)} timed out"))
            return
        c["tcp.rto_expiries"] += 1
        if self.env.trace.on:
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
        self._rto_episode = True  # until SND.UNA passes SND.MAX of now: no second cut
        self._dupacks = 0
        self._rtt_seq = None  # Karn's rule
        self.snd_nxt = self.snd_una  # go back N: output() re-sends from SND.UNA
        if self.state == SYN_SENT or self.state == SYN_RECEIVED:
            self.snd_nxt = self.iss
        elif self.ts_ok and self._retries == 1:
            # the first timeout of an episode: remember enough to undo it (Eifel)
            self._eifel = self._ts_now(now)
        self.t_rtx = now + self.rto.current()
        if self.env.trace.on:
            self._trace_cc(now, "rto")
