"""The congestion controllers on their own (a simulated ACK clock), and each in the engine
between two stacks under seeded random loss (virtual time)."""

from __future__ import annotations

import random

import pytest

from stack.net.tcp.congestion import INFINITE, Bbr, Cubic, NewReno, make

MSS = 1000


def run_rounds(cc, rounds: int, rtt: float, now: float = 0.0, una: int = 0,
               per_ack: int = 2 * MSS, rtts: list[float] | None = None):
    """Each round delivers the whole window in ACKs of two segments."""
    for r in range(rounds):
        window = cc.cwnd
        sent_end = una + window
        delivered = 0
        while delivered < window:
            step = min(per_ack, window - delivered)
            delivered += step
            una += step
            sample = rtts[r] if rtts else rtt
            cc.on_ack(step, sample, now + rtt, una, sent_end, window, True, False)
        now += rtt
    return now, una


def test_newreno_doubles_in_slow_start_and_adds_one_segment_per_round_after():
    cc = NewReno(MSS)
    assert cc.cwnd == 10 * MSS
    run_rounds(cc, 3, 0.01)
    assert cc.cwnd == 80 * MSS
    cc.enter_recovery(80 * MSS, True, 1.0)
    assert cc.ssthresh == 40 * MSS
    cc.exit_recovery(40 * MSS, True)
    assert cc.cwnd == 40 * MSS
    run_rounds(cc, 5, 0.01, now=1.0)
    assert cc.cwnd == 45 * MSS


def test_an_application_limited_sender_does_not_grow_its_window():
    """RFC 7661: ACKs for a flight that did not fill the window say nothing about it."""
    for cc in (NewReno(MSS), Cubic(MSS)):
        before = cc.cwnd
        for i in range(100):
            cc.on_ack(MSS, 0.01, i * 0.01, (i + 1) * MSS, (i + 2) * MSS, 2 * MSS, False,
                      False)
        assert cc.cwnd == before


def test_cubic_backs_off_to_70_percent_and_regains_the_old_maximum_after_k():
    """RFC 9438: W(t) = C (t - K)^3 + W_max; after a loss at W_max, the window is back
    at W_max about K seconds later, K = cbrt(W_max (1 - beta) / C)."""
    cc = Cubic(MSS)
    cc.ssthresh = 100 * MSS  # as if slow start had ended there
    cc.cwnd = 100 * MSS
    cc.enter_recovery(100 * MSS, True, 10.0)
    assert cc.ssthresh == 70 * MSS
    cc.exit_recovery(70 * MSS, True)
    assert cc.cwnd == 70 * MSS
    k = (100 * 0.3 / 0.4) ** (1 / 3)  # about 4.2 s
    rtt = 0.1
    now, una = 10.0, 0
    sizes = []
    while now < 10.0 + k + 1.0:
        now, una = run_rounds(cc, 1, rtt, now=now, una=una)
        sizes.append((now - 10.0, cc.cwnd / MSS))
    at_k = min(sizes, key=lambda s: abs(s[0] - k))[1]
    assert 92 <= at_k <= 108  # at the plateau near W_max
    early = [w for t, w in sizes if t < k / 2]
    assert early[1] - early[0] > sizes[-1][1] - sizes[-2][1] or sizes[-1][1] > 100
    # concave first (fast, then slowing toward W_max), convex after: growth picks up
    mid = [w for t, w in sizes if k - 0.5 < t < k + 0.5]
    assert max(mid) - min(mid) < 10


def test_cubic_fast_convergence_lowers_the_target_when_maxima_fall():
    cc = Cubic(MSS)
    cc.cwnd = cc.ssthresh = 100 * MSS
    cc.enter_recovery(100 * MSS, True, 0.0)
    cc.exit_recovery(0, True)
    cc.cwnd = 80 * MSS  # the next loss comes below the last maximum
    cc.enter_recovery(80 * MSS, True, 1.0)
    assert cc._w_max == pytest.approx(80 * (1 + 0.7) / 2)


def test_hystart_leaves_slow_start_when_delay_rises_without_a_loss():
    """RFC 9406: rounds whose minimum RTT rose by more than clamp(min/8, 4, 16 ms) move
    to Conservative Slow Start, and after five such rounds to congestion avoidance."""
    cc = Cubic(MSS)
    rtts = [0.020] * 3 + [0.040] * 20  # a queue starts building in round 4
    run_rounds(cc, 12, 0.02, rtts=rtts)
    assert cc.ssthresh < INFINITE  # slow start ended without any loss
    flat = Cubic(MSS)
    run_rounds(flat, 8, 0.02)
    assert flat.ssthresh == INFINITE and flat.cwnd > cc.cwnd


def test_prr_spreads_the_reduction_over_the_round_and_ends_at_ssthresh():
    """RFC 6937: with pipe above ssthresh, what may be sent is proportional to what is
    delivered, so the window comes down smoothly instead of in one step."""
    cc = NewReno(MSS)
    cc.cwnd = 20 * MSS
    cc.enter_recovery(20 * MSS, True, 0.0)
    assert cc.ssthresh == 10 * MSS
    pipe, sent = 19 * MSS, 0  # one segment lost
    for _ in range(19):  # each ACK delivers one segment
        pipe -= MSS
        cc.recovery_ack(MSS, pipe)
        can = max(cc.cwnd - pipe, 0) // MSS * MSS
        cc.sent_in_recovery(can)
        pipe += can
        sent += can
    assert 9 * MSS <= sent <= 10 * MSS  # about ssthresh/RecoverFS of what was delivered
    cc.exit_recovery(pipe, True)
    assert cc.cwnd == 10 * MSS


def test_undo_takes_back_a_spurious_reduction():
    for cc in (NewReno(MSS), Cubic(MSS)):
        cc.cwnd = 50 * MSS
        cc.ssthresh = 60 * MSS
        cc.enter_recovery(50 * MSS, True, 0.0)
        assert cc.cwnd < 50 * MSS
        assert cc.undo() and cc.cwnd == 50 * MSS and cc.ssthresh == 60 * MSS
        assert not cc.undo()  # once


def test_bbr_measures_the_bottleneck_and_keeps_its_window_through_random_losses():
    """A link of 10 MB/s and 20 ms: the model finds the rate, the window becomes about
    two bandwidth-delay products, and a loss holds it for one round, not halves it."""
    cc = Bbr(MSS)
    rate, rtt = 10e6, 0.02
    now, una = 0.0, 0
    for _ in range(60):
        window = min(cc.cwnd, int(rate * rtt * 3))  # the link holds a queue beyond BDP
        queue_delay = max(window - rate * rtt, 0) / rate
        sent_end = una + window
        steps = max(window // (2 * MSS), 1)
        for i in range(steps):
            una += window // steps
            t = now + (rtt + queue_delay) * (i + 1) / steps
            cc.on_ack(window // steps, rtt + queue_delay, t, una, sent_end, window, True,
                      False)
        now += rtt + queue_delay
    assert cc.mode == "probe_bw"
    assert 0.8 * rate <= cc.btl_bw <= 1.3 * rate
    bdp = rate * rtt
    assert 1.5 * bdp <= cc.cwnd <= 3.5 * bdp
    before = cc.cwnd
    cc.enter_recovery(before, True, now)
    cc.recovery_ack(MSS, before - MSS)
    cc.exit_recovery(before - MSS, True)
    assert cc.cwnd >= before  # no multiplicative decrease


def test_controllers_are_chosen_by_name():
    assert [make(n, MSS).name for n in ("cubic", "newreno", "bbr")] == \
        ["cubic", "newreno", "bbr"]
    with pytest.raises(ValueError, match="unknown congestion control 'vegas'"):
        make("vegas", MSS)


# -- in the engine, two stacks, random loss -------------------------------------------------


def transfer(cc: str, loss: str, size: int, seed: int = 3):
    from tests.unit.test_tcp_two_stacks import connect, pair

    wire, a, b = pair(f"loss={loss},delay=5ms", seed)
    client, server, cu, su = connect(wire, a, b)
    server.set_congestion_control(cc)
    start = wire.now
    data = random.Random(seed).randbytes(size)
    server.send(data)
    windows = []
    wire.run(until=lambda: windows.append(server.cc.cwnd) or len(cu.data) >= size,
             timeout=600)
    assert bytes(cu.data) == data
    return wire.now - start, windows, server, b


@pytest.mark.parametrize("cc", ["newreno", "cubic", "bbr"])
def test_each_controller_delivers_everything_through_random_loss(cc):
    took, windows, server, b = transfer(cc, "2%", 2_000_000)
    assert server.cc.name == cc
    assert b.counters["tcp.retransmits"] > 0  # losses happened and were repaired
    assert b.counters["stack.internal_errors"] == 0


def test_bbr_holds_a_larger_window_than_loss_based_controllers_under_random_loss():
    """Virtual time, seeded loss: the same 3 MB through 3 % loss each way. NewReno halves
    at each loss; BBR's window follows its model of the path."""
    results = {cc: transfer(cc, "3%", 3_000_000) for cc in ("newreno", "bbr")}
    mean = {cc: sum(w) / len(w) for cc, (_, w, _, _) in results.items()}
    assert mean["bbr"] > 2 * mean["newreno"]
    assert results["bbr"][0] < results["newreno"][0]  # and so it finishes sooner


@pytest.mark.parametrize("cc", [NewReno, Cubic, Bbr])
def test_a_round_ends_when_data_is_delivered_up_to_the_mark(cc):
    """RFC 9406's rounds: one per window sent and acknowledged. ACKs that deliver
    nothing while SND.UNA sits on the mark (the peer's data coming in while we have
    nothing in flight, duplicate ACKs) end no round."""
    c = cc(MSS)
    _, una = run_rounds(c, 4, 0.01)
    assert c.round_end == una  # all acknowledged, nothing in flight
    rounds = c.rounds
    for _ in range(50):  # idle, the peer sending to us: every segment is an ACK of UNA
        c.on_ack(0, None, 1.0, una, una, 0, False, False)
    assert c.rounds == rounds
    c.on_ack(MSS, 0.01, 1.1, una + MSS, una + 3 * MSS, 3 * MSS, True, False)
    assert c.rounds == rounds + 1  # new data sent and acknowledged past the mark
    c.on_ack(0, None, 1.1, una + MSS, una + 3 * MSS, 2 * MSS, True, False)
    assert c.rounds == rounds + 1  # a duplicate ACK
    c.on_ack(2 * MSS, 0.01, 1.2, una + 3 * MSS, una + 3 * MSS, 2 * MSS, True, False)
    assert c.rounds == rounds + 2  # reaching the mark exactly, delivering data


def test_a_receiver_counts_no_rounds_for_the_data_it_takes_in():
    from tests.unit.test_tcp_two_stacks import connect, pair

    wire, a, b = pair("", 5)
    client, server, cu, su = connect(wire, a, b)
    before = client.cc.rounds
    server.send(random.Random(5).randbytes(500_000))
    wire.run(until=lambda: len(cu.data) >= 500_000, timeout=60)
    # the receiver: some 350 segments, and one round (its first ACK's)
    assert client.cc.rounds <= before + 1
    assert 3 <= server.cc.rounds < 100  # the sender: a round per window
