"""Congestion control: every change of cwnd and ssthresh happens here.

The connection owns loss detection (SACK, RACK-TLP, RTO) and retransmission; a controller
owns the congestion window and is told what happened:

    on_ack(...)          data delivered (cumulatively or by SACK): grow, or model
    enter_recovery(...)  a loss was detected: fast recovery begins
    recovery_ack(...)    an ACK during SACK recovery: PRR (RFC 6937) sizes what may go
    on_dupack_in_recovery / on_partial_ack: recovery without SACK (RFC 6582)
    exit_recovery(...)   recovery is over
    on_timeout(...)      the RTO fired
    undo()               the last reduction was spurious (Eifel, D-SACK): take it back

Three controllers:

* NewReno (RFC 5681, RFC 6582): halve on loss, one MSS per round trip after.
* CUBIC (RFC 9438, the default, as in Linux): the window after a loss follows a cubic
  function of the time since it, with a Reno-friendly floor, fast convergence, beta 0.7;
  slow start ends early with HyStart++ (RFC 9406) when round-trip times start to rise.
* BBR (a model-based controller after BBR v1, draft-cardwell-iccrg-bbr-congestion-
  control-00): the window is a multiple of the bandwidth-delay product it measures, and
  a loss only holds the window at what is in flight for a round trip, so random,
  non-congestive loss does not cut the rate. What it leaves out: pacing (tapstack
  sends as ACKs arrive; the pacing gain of each phase is applied to the window instead),
  BBR v2/v3's loss and ECN bounds (which would cut the rate under random loss, the very
  thing this controller is for), and the long-term (policer) model.

Loss-based controllers share the recovery machinery in the base class: PRR during SACK
recovery, RFC 6582's inflation without SACK, RFC 7661's rule that an application-
limited sender does not grow its window, and undo. Sizes are in bytes, times in seconds.
"""

from __future__ import annotations

INFINITE = 1 << 30  # "arbitrarily high" ssthresh (RFC 5681 3.1)


def initial_window(mss: int) -> int:
    """RFC 6928: ten segments, bounded by 14600 bytes (but at least two segments)."""
    return min(10 * mss, max(2 * mss, 14600))


class CongestionControl:
    """The interface and the loss-based machinery (used as is by NewReno)."""

    name = "base"
    __slots__ = ("_avoid_acc", "_prior", "cwnd", "mss", "prr_delivered", "prr_out",
                 "recover_fs", "round_end", "rounds", "ssthresh")

    def __init__(self, mss: int) -> None:
        self.mss = mss
        self.cwnd = initial_window(mss)
        self.ssthresh = INFINITE
        self._avoid_acc = 0
        self._prior: tuple | None = None  # what undo() restores
        self.prr_delivered = 0  # RFC 6937 state
        self.prr_out = 0
        self.recover_fs = 0
        self.round_end: int | None = None  # a round trip ends when SND.UNA passes this
        self.rounds = 0

    # -- what the connection reports --------------------------------------------------------

    @property
    def ssthresh_shown(self) -> int | None:
        return self.ssthresh if self.ssthresh < INFINITE else None

    def _new_round(self, una: int, snd_nxt: int, delivered: int) -> bool:
        """True once per round trip: when an ACK that delivers data reaches the mark set
        a round ago (RFC 9406's windowEnd), or passes it. An ACK that delivers nothing
        while SND.UNA sits on the mark (nothing was in flight when it was set: the peer's
        data arriving while we are idle, duplicate ACKs after a rewind) ends no round."""
        end = self.round_end
        if end is not None:
            past = (una - end) & 0xFFFFFFFF
            if past >= 0x80000000 or (past == 0 and delivered <= 0):
                return False
        self.round_end = snd_nxt
        self.rounds += 1
        return True

    def on_ack(self, delivered: int, rtt: float | None, now: float, una: int, snd_nxt: int,
               flight: int, cwnd_limited: bool, in_recovery: bool) -> None:
        """`delivered` bytes newly reached the peer (cumulative ACK and new SACKs);
        `flight` is what was outstanding before this ACK."""
        self._new_round(una, snd_nxt, delivered)
        if in_recovery or not cwnd_limited or delivered <= 0:
            return  # RFC 7661: an application-limited window is not grown
        if self.cwnd < self.ssthresh:
            self._slow_start(delivered, rtt, now)
        else:
            self._avoid(delivered, rtt, now)

    def _slow_start(self, acked: int, rtt: float | None, now: float) -> None:
        # counting every byte acknowledged (RFC 3465 without the L limit, as Linux does:
        # stretch ACKs are the norm with batching, GRO and TSO)
        self.cwnd += acked
        if self.cwnd > self.ssthresh:
            self.cwnd = max(self.ssthresh, self.mss)

    def _avoid(self, acked: int, rtt: float | None, now: float) -> None:
        # one MSS per cwnd of data acknowledged (RFC 5681 3.1)
        self._avoid_acc += acked
        if self._avoid_acc >= self.cwnd:
            self._avoid_acc -= self.cwnd
            self.cwnd += self.mss

    def _loss_ssthresh(self, flight: int) -> int:
        return max(flight // 2, 2 * self.mss)  # RFC 5681 equation 4

    def _save(self) -> None:
        self._prior = (self.cwnd, self.ssthresh, self._avoid_acc)

    def undo(self) -> bool:
        """Restore the window from before the last reduction; False if nothing to undo."""
        if self._prior is None:
            return False
        cwnd, ssthresh, self._avoid_acc = self._prior[:3]
        self.cwnd = max(self.cwnd, cwnd)
        self.ssthresh = max(self.ssthresh, ssthresh) if ssthresh < INFINITE else ssthresh
        self._prior = None
        return True

    # -- recovery ----------------------------------------------------------------------------

    def enter_recovery(self, flight: int, sack: bool, now: float, reduce: bool = True
                       ) -> None:
        """Fast recovery begins. `reduce` is False when it starts inside the loss episode
        of a timeout, which already cut the window: then it only repairs."""
        if reduce:
            self._save()
            self.ssthresh = self._loss_ssthresh(flight)
            self._on_loss(flight, now)
        if sack:
            # RFC 6937: PRR paces the recovery (recovery_ack, from this very ACK on)
            self.prr_delivered = self.prr_out = 0
            self.recover_fs = flight
            if reduce:
                self.cwnd = self.ssthresh
        else:
            self.cwnd = self.ssthresh + 3 * self.mss  # RFC 5681 3.2 step 3

    def _on_loss(self, flight: int, now: float) -> None:
        """A controller's own bookkeeping at a congestion event (CUBIC's epoch)."""

    def recovery_ack(self, delivered: int, pipe: int) -> None:
        """RFC 6937 PRR with the slow-start reduction bound (PRR-SSRB)."""
        mss = self.mss
        self.prr_delivered += delivered
        if pipe > self.ssthresh:
            # proportional: send as the peer delivers, scaled to end at ssthresh
            sndcnt = -(-self.prr_delivered * self.ssthresh // max(self.recover_fs, 1)) \
                - self.prr_out
        else:
            limit = max(self.prr_delivered - self.prr_out, delivered) + mss
            sndcnt = min(self.ssthresh - pipe, limit)
        self.cwnd = pipe + max(sndcnt, 0)

    def sent_in_recovery(self, n: int) -> None:
        self.prr_out += n

    def on_dupack_in_recovery(self) -> None:
        self.cwnd += self.mss  # RFC 5681 3.2 step 4: inflate for each segment that left

    def on_partial_ack(self, acked: int) -> None:
        # RFC 6582 3.2 step 5: deflate by what was acked, add back one MSS
        mss = self.mss
        self.cwnd = max(self.cwnd - acked + (mss if acked >= mss else 0), mss)

    def exit_recovery(self, flight: int, sack: bool) -> None:
        if self.ssthresh >= INFINITE:
            return  # nothing was reduced (undone, or a controller switched mid-way)
        if sack:
            self.cwnd = self.ssthresh  # RFC 6937: the reduction is complete
        else:
            # RFC 6582 3.2 step 5 (full ACK), option 1 bounded by the flight size
            self.cwnd = min(self.ssthresh, max(flight, self.mss) + self.mss)

    def on_timeout(self, flight: int, now: float, first: bool = True) -> None:
        # RFC 5681 3.1 equation 4, and a loss window of one segment; undo() goes back to
        # before the first timeout of a series
        if first:  # (a backed-off timeout of the same episode does not cut again)
            self._save()
            self.ssthresh = self._loss_ssthresh(flight)
            self._on_loss(flight, now)
        self.cwnd = self.mss
        self._avoid_acc = 0

    def set_mss(self, mss: int) -> None:
        self.mss = mss


class NewReno(CongestionControl):
    name = "newreno"
    __slots__ = ()


# -- CUBIC (RFC 9438) with HyStart++ (RFC 9406) -----------------------------------------------

CUBIC_C = 0.4
CUBIC_BETA = 0.7
CUBIC_ALPHA = 3 * (1 - CUBIC_BETA) / (1 + CUBIC_BETA)  # Reno-friendly growth per RTT
HYSTART_MIN_SAMPLES = 8  # N_RTT_SAMPLE
HYSTART_MIN_THRESH = 0.004
HYSTART_MAX_THRESH = 0.016
CSS_GROWTH_DIVISOR = 4
CSS_ROUNDS = 5


class Cubic(CongestionControl):
    name = "cubic"
    __slots__ = ("_css_baseline", "_css_rounds", "_epoch", "_frac", "_k", "_last_round_min",
                 "_round_min", "_round_samples", "_w_est", "_w_max", "_w_max_prev",
                 "min_rtt")

    def __init__(self, mss: int) -> None:
        super().__init__(mss)
        self._epoch: float | None = None  # when the current congestion-avoidance epoch began
        self._w_max = 0.0  # segments, the window at the last congestion event
        self._w_max_prev = 0.0
        self._k = 0.0
        self._w_est = 0.0  # the Reno-friendly estimate, segments
        self._frac = 0.0  # growth not yet a whole byte
        self.min_rtt: float | None = None
        # HyStart++
        self._round_min = float("inf")
        self._last_round_min = float("inf")
        self._round_samples = 0
        self._css_baseline: float | None = None  # in Conservative Slow Start when set
        self._css_rounds = 0

    def on_ack(self, delivered: int, rtt: float | None, now: float, una: int, snd_nxt: int,
               flight: int, cwnd_limited: bool, in_recovery: bool) -> None:
        if rtt is not None and (self.min_rtt is None or rtt < self.min_rtt):
            self.min_rtt = rtt
        if self._new_round(una, snd_nxt, delivered) and self.cwnd < self.ssthresh:
            self._hystart_round()
        if in_recovery or not cwnd_limited or delivered <= 0:
            return
        if self.cwnd < self.ssthresh:
            if rtt is not None and self._round_samples < HYSTART_MIN_SAMPLES:
                self._round_samples += 1
                self._round_min = min(self._round_min, rtt)
            self._slow_start(delivered, rtt, now)
        else:
            self._avoid(delivered, rtt, now)

    # -- HyStart++ (RFC 9406 4.2) -------------------------------------------------------------

    def _hystart_round(self) -> None:
        """At the end of each slow-start round: compare its RTTs with the last round's."""
        last, cur = self._last_round_min, self._round_min
        if self._round_samples >= HYSTART_MIN_SAMPLES and last < float("inf"):
            if self._css_baseline is None:
                thresh = min(max(last / 8, HYSTART_MIN_THRESH), HYSTART_MAX_THRESH)
                if cur >= last + thresh:
                    self._css_baseline = cur  # delay is rising: slow down
                    self._css_rounds = 0
            elif cur < self._css_baseline:
                self._css_baseline = None  # a false alarm: back to slow start
            else:
                self._css_rounds += 1
                if self._css_rounds >= CSS_ROUNDS:
                    self.ssthresh = self.cwnd  # into congestion avoidance
                    self._css_baseline = None
        self._last_round_min = cur
        self._round_min = float("inf")
        self._round_samples = 0

    def _slow_start(self, acked: int, rtt: float | None, now: float) -> None:
        if self._css_baseline is not None:
            self.cwnd += acked // CSS_GROWTH_DIVISOR  # Conservative Slow Start
            return
        super()._slow_start(acked, rtt, now)

    # -- the cubic window (RFC 9438 4) --------------------------------------------------------

    def _avoid(self, acked: int, rtt: float | None, now: float) -> None:
        mss = self.mss
        cwnd_seg = self.cwnd / mss
        if self._epoch is None:
            self._epoch = now
            if self._w_max < cwnd_seg:  # no loss yet, or it has grown past the old max
                self._w_max = cwnd_seg
                self._k = 0.0
            else:
                self._k = ((self._w_max - cwnd_seg) / CUBIC_C) ** (1 / 3)
            self._w_est = cwnd_seg
        srtt = rtt if rtt is not None else (self.min_rtt or 0.0)
        t = now - self._epoch + srtt
        target = CUBIC_C * (t - self._k) ** 3 + self._w_max
        target = min(max(target, cwnd_seg), 1.5 * cwnd_seg)
        acked_seg = acked / mss
        # RFC 9438 4.3: the Reno-friendly estimate, alpha becoming 1 past the old maximum
        alpha = 1.0 if self._w_est >= self._w_max else CUBIC_ALPHA
        self._w_est += alpha * acked_seg / cwnd_seg
        if target < self._w_est:
            desired = self._w_est  # the Reno-friendly region
        else:
            desired = cwnd_seg + (target - cwnd_seg) / cwnd_seg * acked_seg
        self._frac += desired * mss - self.cwnd
        if self._frac >= 1.0:
            grow = int(self._frac)
            self.cwnd += grow
            self._frac -= grow
        elif self._frac < 0.0:
            self._frac = 0.0

    def _loss_ssthresh(self, flight: int) -> int:
        return max(int(self.cwnd * CUBIC_BETA), 2 * self.mss)

    def _on_loss(self, flight: int, now: float) -> None:
        cwnd_seg = self.cwnd / self.mss
        # fast convergence (RFC 9438 4.7): a flow whose maximum keeps falling gives way
        if cwnd_seg < self._w_max_prev:
            self._w_max = cwnd_seg * (1 + CUBIC_BETA) / 2
        else:
            self._w_max = cwnd_seg
        self._w_max_prev = cwnd_seg
        self._epoch = None
        self._css_baseline = None

    def _save(self) -> None:
        self._prior = (self.cwnd, self.ssthresh, self._avoid_acc, self._w_max,
                       self._w_max_prev, self._epoch)

    def undo(self) -> bool:
        prior = self._prior
        if not super().undo():
            return False
        self._w_max, self._w_max_prev, self._epoch = prior[3:]
        return True


# -- BBR (after v1) ---------------------------------------------------------------------------

STARTUP, DRAIN, PROBE_BW, PROBE_RTT = "startup", "drain", "probe_bw", "probe_rtt"
HIGH_GAIN = 2.885  # 2 / ln 2: doubles the delivery rate each round in STARTUP
CWND_GAIN = 2.0
PACING_CYCLE = (1.25, 0.75, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0)
BW_WINDOW_ROUNDS = 10
MIN_RTT_WINDOW = 10.0
PROBE_RTT_TIME = 0.2
MIN_RTT_FLOOR = 0.001  # timestamps tick in milliseconds: a LAN's "0 ms" is below this
BATCH_BUDGET = 16  # segments of headroom for the batches a Python stack sends and reads in


class Bbr(CongestionControl):
    name = "bbr"
    __slots__ = ("_bw_samples", "_cycle_index", "_cycle_start", "_delivered",
                 "_filled_rounds", "_full_bw", "_interval", "_interval_delivered",
                 "_interval_start", "_target",
                 "_min_rtt_stamp", "_probe_rtt_done", "_recovery_round", "btl_bw",
                 "min_rtt", "mode", "pacing_gain", "prior_cwnd")

    def __init__(self, mss: int) -> None:
        super().__init__(mss)
        self.mode = STARTUP
        self.pacing_gain = HIGH_GAIN
        self.btl_bw = 0.0  # bytes per second: the windowed maximum of delivery rate
        self._bw_samples: list[tuple[int, float]] = []  # (round, rate)
        self.min_rtt: float | None = None
        self._min_rtt_stamp = 0.0
        self._delivered = 0
        self._interval_start: float | None = None
        self._interval_delivered = 0
        self._full_bw = 0.0
        self._filled_rounds = 0
        self._cycle_index = 0
        self._cycle_start = 0.0
        self._probe_rtt_done: float | None = None
        self.prior_cwnd = 0
        self._recovery_round: int | None = None  # packet conservation during this round
        self._interval = MIN_RTT_FLOOR  # a rate sample spans at least this (min RTT)
        self._target = initial_window(mss)  # the window the model asks for

    @property
    def ssthresh_shown(self) -> int | None:
        return None  # BBR has no slow-start threshold

    def _bdp(self, gain: float) -> int:
        if self.min_rtt is None or self.btl_bw <= 0:
            return initial_window(self.mss)
        return int(min(gain * self.btl_bw * max(self.min_rtt, MIN_RTT_FLOOR), INFINITE))

    def _target_cwnd(self) -> int:
        mode = self.mode
        if mode == PROBE_RTT:
            return 4 * self.mss
        if mode == STARTUP:
            gain = HIGH_GAIN
        elif mode == DRAIN:
            gain = 1.0  # no pacing: the window, not the rate, lets the queue drain
        else:
            gain = CWND_GAIN * self.pacing_gain  # the phase's gain acts on the window
        # (bounded: with no bottleneck but the receiver's window, the model could grow
        # without end)
        return min(max(self._bdp(gain) + BATCH_BUDGET * self.mss, 4 * self.mss), INFINITE)

    def on_ack(self, delivered: int, rtt: float | None, now: float, una: int, snd_nxt: int,
               flight: int, cwnd_limited: bool, in_recovery: bool) -> None:
        # per ACK only what must be: the round, the delivered count, a lower RTT, and the
        # window; the model and the state machine move once per interval or round
        new_round = self._new_round(una, snd_nxt, delivered)
        self._delivered += delivered
        if rtt is not None and (self.min_rtt is None or rtt <= self.min_rtt):
            self.min_rtt = rtt
            self._min_rtt_stamp = now
        start = self._interval_start
        if start is None:
            self._interval_start = now
            self._interval_delivered = self._delivered
        elif new_round or now - start >= self._interval or self.mode != PROBE_BW:
            self._update_model(now, rtt, flight, cwnd_limited, new_round)
        # the window: towards the target, by what was delivered
        if in_recovery and self._recovery_round is not None \
                and self.rounds <= self._recovery_round:
            if flight > self.cwnd:
                self.cwnd = flight  # packet conservation: what was out
            return
        target = self._target
        cwnd = self.cwnd
        if cwnd < target:
            cwnd += delivered
            self.cwnd = cwnd if cwnd < target else target
        else:
            self.cwnd = target

    def _update_model(self, now: float, rtt: float | None, flight: int, cwnd_limited: bool,
                      new_round: bool) -> None:
        span = now - self._interval_start
        interval = self._interval
        if span >= interval and span > 0:
            # the delivery rate over about a round trip
            rate = (self._delivered - self._interval_delivered) / span
            if cwnd_limited or rate > self.btl_bw:  # app-limited samples only raise it
                self._bw_samples.append((self.rounds, rate))
                floor = self.rounds - BW_WINDOW_ROUNDS
                self._bw_samples = [s for s in self._bw_samples if s[0] > floor]
                self.btl_bw = max(r for _, r in self._bw_samples)
            self._interval_start = now
            self._interval_delivered = self._delivered
        # the minimum RTT unconfirmed for 10 s (decided before this sample refreshes it,
        # or PROBE_RTT would never come with an RTT on every ACK)
        expired = self.min_rtt is not None and now - self._min_rtt_stamp > MIN_RTT_WINDOW
        if expired and rtt is not None:
            self.min_rtt = rtt
            self._min_rtt_stamp = now
        if self.mode == STARTUP and new_round and cwnd_limited:
            if self.btl_bw >= self._full_bw * 1.25:
                self._full_bw = self.btl_bw
                self._filled_rounds = 0
            else:
                self._filled_rounds += 1
                if self._filled_rounds >= 3:  # the pipe is full: drain the queue made
                    self.mode = DRAIN
                    self.pacing_gain = 1 / HIGH_GAIN
        if self.mode == DRAIN and flight <= self._bdp(1.0) + BATCH_BUDGET * self.mss:
            self._enter_probe_bw(now)
        if self.mode == PROBE_BW and now - self._cycle_start > interval:
            self._cycle_index = (self._cycle_index + 1) % len(PACING_CYCLE)
            self._cycle_start = now
            self.pacing_gain = PACING_CYCLE[self._cycle_index]
        if self.mode != PROBE_RTT and expired:
            self.mode = PROBE_RTT  # the minimum is old: let the queue drain to see it
            self.prior_cwnd = max(self.prior_cwnd, self.cwnd)
            self._probe_rtt_done = now + PROBE_RTT_TIME
        if self.mode == PROBE_RTT and self._probe_rtt_done is not None \
                and now >= self._probe_rtt_done:
            self._min_rtt_stamp = now
            self.cwnd = max(self.cwnd, self.prior_cwnd)
            self._enter_probe_bw(now)
        self._interval = max(self.min_rtt or 0.0, MIN_RTT_FLOOR)
        self._target = self._target_cwnd()

    def _enter_probe_bw(self, now: float) -> None:
        self.mode = PROBE_BW
        self._cycle_index = 2  # not the probing phase first (the draft picks at random)
        self.pacing_gain = PACING_CYCLE[self._cycle_index]
        self._cycle_start = now

    def _save(self) -> None:
        self._prior = (self.cwnd, self.ssthresh, self._avoid_acc)
        self.prior_cwnd = max(self.prior_cwnd if self._recovery_round is not None else 0,
                              self.cwnd)

    def enter_recovery(self, flight: int, sack: bool, now: float, reduce: bool = True
                       ) -> None:
        """A loss holds the window at what is in flight for one round trip; the model,
        not the loss, decides the rate after that."""
        if not reduce:
            return  # inside a timeout's episode: the window grows back by delivery
        self._save()
        self._recovery_round = self.rounds + 1
        self.cwnd = max(flight, 4 * self.mss)

    def recovery_ack(self, delivered: int, pipe: int) -> None:
        if self._recovery_round is not None and self.rounds <= self._recovery_round:
            self.cwnd = max(self.cwnd, pipe + delivered)

    def on_dupack_in_recovery(self) -> None:
        pass

    def on_partial_ack(self, acked: int) -> None:
        pass

    def exit_recovery(self, flight: int, sack: bool) -> None:
        self.cwnd = max(self.cwnd, self.prior_cwnd)
        self._recovery_round = None
        self.prior_cwnd = 0

    def on_timeout(self, flight: int, now: float, first: bool = True) -> None:
        if first:
            self._save()
        self._recovery_round = None
        self.cwnd = self.mss  # it grows back by what is delivered, up to the model's
        self._interval_start = None

    def undo(self) -> bool:
        if self._prior is None:
            return False
        self.cwnd = max(self.cwnd, self._prior[0])
        self._prior = None
        return True


CONTROLLERS: dict[str, type[CongestionControl]] = {
    "cubic": Cubic, "newreno": NewReno, "bbr": Bbr}
DEFAULT = "cubic"


def make(name: str, mss: int) -> CongestionControl:
    try:
        return CONTROLLERS[name](mss)
    except KeyError:
        raise ValueError(f"unknown congestion control {name!r} "
                         f"(choose from {', '.join(CONTROLLERS)})") from None
