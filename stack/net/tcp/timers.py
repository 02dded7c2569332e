"""The connection's timers: one deadline for the layer's heap, and what each timer does
when it fires (retransmission by kind, zero-window probes, delayed ACK, keepalive, the
FIN-WAIT-2 timeout of an orphan).

A part of Connection (connection.py), as Linux keeps tcp_timer.c.
"""

from __future__ import annotations

from stack.net.tcp.seq import seq_add, seq_diff, seq_gt
from stack.net.tcp.states import (
    CLOSED,
    ESTABLISHED,
    RECOVERY,
    REORDER,
    SEND_STATES,
    TLP,
)
from stack.wire.tcp import ACK, PSH


class TimerMixin:
    """Methods of Connection; the state is Connection's (__slots__ there)."""

    __slots__ = ()

    def deadline(self) -> float | None:
        best = None
        for t in (self.t_rtx, self.t_delack, self.t_persist, self.t_keepalive,
                  self.t_fin_wait_2):
            if t is not None and (best is None or t < best):
                best = t
        return best

    def on_timer(self, now: float) -> None:
        if self.t_fin_wait_2 is not None and self.t_fin_wait_2 <= now:
            self.t_fin_wait_2 = None
            self._terminate(None)
            return
        if self.t_rtx is not None and self.t_rtx <= now:
            self.t_rtx = None
            kind = self.rtx_kind
            if kind == REORDER:
                self._on_reorder_timer(now)
            elif kind == RECOVERY:
                self._on_recovery_timer(now)
            elif kind == TLP:
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

    def _arm_persist(self, now: float) -> None:
        delay = min(max(self.rto.current(), 0.2) * (1 << self._persist_backoff), 60.0)
        self.t_persist = now + delay

    def _on_persist(self, now: float) -> None:
        """RFC 9293 3.8.6.1: probe a zero window with one byte, backing off. RFC 1122
        4.2.2.17 keeps the connection while the receiver answers; like the RTO, probes
        that go unanswered end it, and so do a few more once the user has closed (an
        orphan that a receiver could otherwise hold forever by keeping its window shut)."""
        unsent = seq_diff(self.snd_buf.end, self.snd_nxt)
        if self.snd_wnd > 0 and unsent > 0 and self.snd_nxt == self.snd_una \
                and self.state in SEND_STATES:
            # the SWS override: a small window and nothing in flight for a while
            n = min(unsent, self.snd_wnd, self.eff_mss)
            self._emit(self.snd_nxt, ACK | PSH, self.snd_buf.get(self.snd_nxt, n), now)
            self._after_send(n, now)
            self._persist_backoff = 0
            return
        if self.snd_wnd > 0 or seq_diff(self.snd_buf.end, self.snd_una) <= 0:
            self._persist_backoff = 0
            return
        cfg = self.config
        if self._probes_unanswered >= cfg.retries or (
                self._user_closed and self._orphan_probes >= cfg.orphan_retries):
            c = self.env.counters
            c["tcp.window_probe_timeouts"] += 1
            c["tcp.timeouts"] += 1
            if self._probes_unanswered < cfg.retries:  # it is alive: tell it we are gone
                self.env.send_rst(self.local_ip, self.local_port, self.remote_ip,
                                    self.remote_port, self.snd_max, 0, with_ack=False)
                c["tcp.resets_sent"] += 1
            self._terminate(TimeoutError(
                f"{self.env.peer_name(self)} kept its window shut and the probes "
                "went unanswered" if self._probes_unanswered >= cfg.retries else
                f"{self.env.peer_name(self)} kept its window shut after the close"))
            return
        self._probes_unanswered += 1
        if self._user_closed:
            self._orphan_probes += 1
        self.env.counters["tcp.window_probes"] += 1
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
            self.env.counters["tcp.keepalive_timeouts"] += 1
            self._terminate(TimeoutError(
                f"keepalive: {self.env.peer_name(self)} stopped answering"))
            return
        self._keepalive_probes += 1
        self.env.counters["tcp.keepalive_probes"] += 1
        # A segment one below SND.NXT with no data: the peer must answer with an ACK.
        self._emit(seq_add(self.snd_max, -1), ACK, b"", now)
        self.t_keepalive = now + cfg.keepalive_interval
