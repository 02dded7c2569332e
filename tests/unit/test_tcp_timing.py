"""Timers and the send/receive policies, under a virtual clock; baselines.md traps as
regression tests."""

import itertools
import struct

import pytest

from stack.net.tcp.connection import TcpConfig
from tests.unit.tcp_peer import ACK, PSH, Peer, opts, parse_opts


def established(mss=1460, window=65535, ts=False, **kw):
    peer = Peer(TcpConfig(**kw))
    peer.listen()
    o = opts(mss=mss, wscale=7, sack_ok=True, ts=(100, 0) if ts else None)
    conn, seq, ack = peer.handshake(options=o, window=window)
    return peer, conn, seq, ack


# -- receiving: delayed ACK ------------------------------------------------------------------


def test_delayed_ack_waits_at_most_40ms_for_a_lone_segment():
    peer, conn, seq, ack = established(quickack_segments=0)
    peer.send(ACK | PSH, seq, ack, b"x" * 100)
    assert peer.out() == []
    assert peer.advance(0.039) == []
    (a,) = peer.advance(0.002)
    assert a.ack == seq + 100


def test_trap2_every_second_full_segment_is_acked_at_once():
    """baselines.md trap 2: ACK at least every second full-sized segment (RFC 5681 4.2)."""
    peer, conn, seq, ack = established(quickack_segments=0)
    peer.send(ACK, seq, ack, b"a" * 1460)
    assert peer.out() == []
    peer.send(ACK, seq + 1460, ack, b"b" * 1460)
    (a,) = peer.out()
    assert a.ack == seq + 2920


def test_trap2_window_is_scaled_and_large():
    """Trap 2/3: a fixed 64 KB window caps uploads; we scale a 1 MB buffer by 2**7."""
    peer, conn, seq, ack = established()
    peer.send(ACK | PSH, seq, ack, b"x")
    (a,) = peer.out()
    assert a.win << 7 >= 1_000_000


def test_trap3_window_scale_we_announce_is_the_one_we_apply():
    peer = Peer()
    peer.listen()
    peer.send(0x02, 1000, options=opts(mss=1460, wscale=7))
    (synack,) = peer.out()
    shift = parse_opts(synack)[3][0]
    assert shift == 7
    peer.send(ACK, 1001, synack.seq + 1)
    peer.send(ACK | PSH, 1001, synack.seq + 1, b"x" * 10)
    (a,) = peer.out()
    conn = peer.accepted[0]
    assert a.win << shift == conn.rcv_adv - conn.rcv_nxt  # what we honour is what we said


def test_out_of_order_segment_is_acked_at_once_with_sack():
    peer, conn, seq, ack = established()
    peer.send(ACK, seq + 1000, ack, b"b" * 500)
    (dup,) = peer.out()
    assert dup.ack == seq
    left, right = struct.unpack("!II", parse_opts(dup)[5])
    assert (left, right) == (seq + 1000, seq + 1500)
    peer.send(ACK, seq, ack, b"a" * 1000)
    (a,) = peer.out()
    assert a.ack == seq + 1500 and 5 not in parse_opts(a)
    assert bytes(peer.server_user.data) == b"a" * 1000 + b"b" * 500


def test_each_out_of_order_segment_of_a_batch_gets_its_own_dupack():
    peer, conn, seq, ack = established()
    for i in range(1, 4):
        peer.send(ACK, seq + 1000 * i, ack, b"z" * 1000)
    dups = peer.out()
    assert [d.ack for d in dups] == [seq] * 3


def test_overlapping_segments_are_trimmed():
    peer, conn, seq, ack = established()
    peer.send(ACK, seq, ack, b"0123456789")
    peer.send(ACK, seq + 5, ack, b"56789abcde")
    assert bytes(peer.server_user.data) == b"0123456789abcde"


def test_paused_reader_closes_the_window_and_reopens_it():
    peer, conn, seq, ack = established(rcvbuf=4096)
    conn.pause_reading()
    peer.send(ACK, seq, ack, b"q" * 4096)
    (a,) = peer.out()
    assert a.ack == seq + 4096 and a.win == 0
    conn.resume_reading()
    (update,) = peer.out()
    assert update.win > 0 and bytes(peer.server_user.data) == b"q" * 4096


# -- sending: Nagle, MSS, windows ---------------------------------------------------------


def test_nagle_holds_a_small_segment_while_one_is_unacknowledged():
    peer, conn, seq, ack = established()
    conn.send(b"a" * 100)
    (first,) = peer.out()
    conn.send(b"b" * 100)
    assert peer.out() == []
    peer.send(ACK, seq, ack + 100)
    (second,) = peer.out()
    assert bytes(second.data) == b"b" * 100


def test_nodelay_sends_small_segments_at_once():
    peer, conn, seq, ack = established(nodelay=True)
    conn.send(b"a" * 100)
    peer.out()
    conn.send(b"b" * 100)
    assert [bytes(s.data) for s in peer.out()] == [b"b" * 100]


def test_trap4_full_segments_with_timestamps_are_not_held_by_nagle():
    """baselines.md trap 4: a full segment is MSS minus option bytes (1448 with
    timestamps), and such segments never wait for an ACK."""
    peer, conn, seq, ack = established(ts=True)
    conn.send(b"x" * (1448 * 4))
    segs = peer.out()
    assert [len(s.data) for s in segs] == [1448] * 4
    assert all(len(s.opts) == 12 for s in segs)


def test_segments_respect_the_peer_mss_and_initial_window():
    peer, conn, seq, ack = established(mss=1000)
    conn.send(b"y" * 100_000)
    segs = peer.out()
    assert all(len(s.data) <= 1000 for s in segs)
    assert sum(len(s.data) for s in segs) == 10_000  # RFC 6928: ten segments


def test_trap1_sending_is_driven_by_acks_not_by_a_tick():
    """baselines.md trap 1: every ACK releases new segments at once; nothing waits."""
    peer, conn, seq, ack = established(mss=1000)
    conn.send(b"y" * 200_000)
    segs = peer.out()
    sent = sum(len(s.data) for s in segs)
    peer.send(ACK, seq, ack + sent)
    more = peer.out()
    # all of it acknowledged: slow start doubled the window, and it left at once
    assert sum(len(s.data) for s in more) == 2 * sent


def test_zero_window_is_probed_with_backoff_until_it_opens():
    peer, conn, seq, ack = established()
    conn.send(b"p" * 2920)  # two full segments
    segs = peer.out()
    sent = sum(len(s.data) for s in segs)
    peer.send(ACK, seq, ack + sent, window=0)
    conn.send(b"q" * 100)
    assert peer.out() == []
    probes = []
    for _ in range(4):
        out = peer.advance(peer.iface.next_deadline() - peer.now)
        probes += [(round(peer.now, 3), len(s.data)) for s in out]
    assert [n for _, n in probes] == [1, 1, 1, 1]
    gaps = [round(b[0] - a[0], 3) for a, b in itertools.pairwise(probes)]
    assert gaps[1] == 2 * gaps[0] and gaps[2] == 2 * gaps[1]  # backing off
    peer.send(ACK, seq, ack + sent, window=512)  # scaled: 64 KB
    (data,) = peer.out()
    assert len(data.data) == 100


# -- loss: RTO and fast retransmit ---------------------------------------------------------


def test_rto_backs_off_exponentially_from_the_200ms_floor():
    peer, conn, seq, ack = established()
    conn.send(b"r" * 100)
    (first,) = peer.out()
    times = []
    for _ in range(5):
        out = peer.advance(peer.iface.next_deadline() - peer.now)
        assert bytes(out[0].data) == b"r" * 100 and out[0].seq == first.seq
        times.append(round(peer.now, 3))
    # one segment out: a tail loss probe would wait 2 SRTT + 200 ms for a delayed ACK
    # (RFC 8985 7.2), which is not before the RTO, so the RTO goes:
    # max(SRTT + 4 RTTVAR, 200 ms), doubling each time
    assert times == [0.2, 0.6, 1.4, 3.0, 6.2]
    assert peer.iface.counters["tcp.tlp_probes"] == 0
    assert peer.iface.counters["tcp.rto_expiries"] == 5


def tsval(seg) -> int:
    return struct.unpack("!II", parse_opts(seg)[8])[0]


def stalled_flight(data: int):
    """A timestamped connection whose peer stalls: a flight leaves, the tail loss probe
    and then the RTO fire, and the RTO re-sends the first segment."""
    peer, conn, seq, ack = established(mss=1000, ts=True)
    conn.send(b"e" * data)
    flight = peer.out()
    assert len(flight) == 10 and flight[0].seq == ack
    first_rto = None
    while first_rto is None:
        for s in peer.advance(peer.iface.next_deadline() - peer.now):
            if s.seq == ack:
                first_rto = s
    assert peer.iface.counters["tcp.rto_expiries"] == 1
    return peer, conn, seq, ack, flight, first_rto


def test_a_spurious_rto_is_undone_eifel_and_the_window_is_not_sent_again():
    """RFC 3522/4015: the peer was only slow. Its ACK for the original flight echoes the
    original timestamp, so only the one segment is sent twice, and sending resumes with
    new data at the congestion window the timeout took away."""
    peer, conn, seq, ack, flight, rtx = stalled_flight(30_000)
    assert tsval(rtx) > tsval(flight[0])
    cwnd_before = 10 * conn.eff_mss  # the initial window (RFC 6928) the flight used
    assert conn.cc.cwnd == conn.eff_mss  # what the timeout left
    end = flight[-1].seq + len(flight[-1].data)
    peer.send(ACK, seq, end, options=opts(ts=(200, tsval(flight[-1]))))
    after = peer.out()
    assert after and all(s.seq >= end for s in after), "old data sent again"
    assert peer.iface.counters["tcp.spurious_rtos"] == 1
    assert conn.cc.cwnd >= cwnd_before
    assert conn.cc.ssthresh == 1 << 30  # still slow-starting, as before the stall


def test_a_needed_rto_goes_back_n_and_counts_every_resend():
    """The ACK echoes the retransmission's timestamp: the flight really was lost, so the
    rest of it goes again (go back N), and each resend is counted."""
    peer, conn, seq, ack, flight, rtx = stalled_flight(10_000)
    retransmits = peer.iface.counters["tcp.retransmits"]
    mss = conn.eff_mss  # 1000 less the timestamp option
    peer.send(ACK, seq, ack + mss, options=opts(ts=(200, tsval(rtx))))
    after = peer.out()
    assert [s.seq for s in after] == [ack + mss, ack + 2 * mss]  # slow start from 1 MSS
    assert peer.iface.counters["tcp.spurious_rtos"] == 0
    assert peer.iface.counters["tcp.retransmits"] == retransmits + 2
    assert conn.cc.cwnd == 2 * mss


def test_gives_up_after_the_retry_limit_and_tells_the_user():
    peer, conn, seq, ack = established(retries=3)
    conn.send(b"r" * 100)
    peer.out()
    while not peer.server_user.closed and peer.now < 100:
        peer.advance(peer.iface.next_deadline() - peer.now)
    assert isinstance(peer.server_user.closed[0], TimeoutError)
    assert peer.iface.tcp.connections == {}


@pytest.mark.parametrize(("cc", "ssthresh"), [
    ("newreno", max(9000 // 2, 2000)),  # half the flight (RFC 5681 equation 4)
    ("cubic", int(11_000 * 0.7)),  # beta 0.7 of the window (RFC 9438 4.6)
])
def test_three_dupacks_trigger_a_fast_retransmit(cc, ssthresh):
    peer, conn, seq, ack = established(mss=1000, cc=cc)
    conn.send(b"f" * 10_000)
    segs = peer.out()
    peer.send(ACK, seq, ack + 1000)  # the first arrived, the second was lost
    assert conn.cc.cwnd == 11_000  # slow start: ten segments and the one acknowledged
    for _ in range(3):
        peer.send(ACK, seq, ack + 1000)  # three duplicates
    out = peer.out()
    assert out[0].seq == ack + 1000 and len(out[0].data) == 1000
    assert peer.iface.counters["tcp.fast_retransmits"] == 1
    assert conn.cc.ssthresh == ssthresh
    assert len(segs) == 10


# -- keepalive ---------------------------------------------------------------------------------


def test_keepalive_is_off_by_default_and_probes_when_switched_on():
    peer, conn, seq, ack = established(keepalive_idle=60.0, keepalive_interval=5.0,
                                       keepalive_count=3)
    assert peer.iface.next_deadline() is None  # off: an idle connection costs nothing
    conn.set_keepalive(True, peer.now)
    assert peer.out() == []  # (the runtime flushes after such a call)
    out = peer.advance(60.0)
    (probe,) = out
    assert probe.seq == ack - 1 and len(probe.data) == 0  # one below SND.NXT: forces an ACK
    peer.send(ACK, seq, ack)  # the peer answers: idle timer restarts
    assert peer.advance(59.0) == []
    probes = peer.advance(1.0 + 5.0 * 3 + 0.1)
    assert len(probes) == 3
    assert isinstance(peer.server_user.closed[0], TimeoutError)
    assert peer.iface.counters["tcp.keepalive_timeouts"] == 1


def sack_opt(*blocks):
    body = b"".join(struct.pack("!II", left & 0xFFFFFFFF, right & 0xFFFFFFFF)
                    for left, right in blocks)
    return b"\x01\x01" + bytes([5, 2 + len(body)]) + body


def test_sack_recovery_repairs_every_hole_without_waiting_a_round_trip_each():
    peer, conn, seq, ack = established(mss=1000)
    conn.send(b"s" * 10_000)
    segs = peer.out()
    assert len(segs) == 10
    base = ack  # segment i covers [base + 1000 i, base + 1000 (i + 1))
    peer.send(ACK, seq, base + 1000)  # segment 0 arrived; 1 and 4 were lost
    blocks = [(base + 2000, base + 4000), (base + 5000, base + 10_000)]
    for i in range(3):
        peer.send(ACK, seq, base + 1000, options=sack_opt(*blocks[: 1 + (i > 0)]))
    out = peer.out()
    resent = sorted({s.seq - base for s in out if len(s.data)})
    assert resent[:2] == [1000, 4000]  # both holes at once, nothing SACKed re-sent
    assert all(r not in (2000, 3000, 5000, 6000, 7000, 8000, 9000) for r in resent)
    assert peer.iface.counters["tcp.sack_retransmits"] == 2
    peer.send(ACK, seq, base + 10_000)
    assert conn.snd_una == base + 10_000 and not conn._in_recovery


def test_header_prediction_takes_plain_acks_and_nothing_else():
    peer, conn, seq, ack = established(mss=1000)
    conn.send(b"h" * 5000)
    peer.out()
    peer.send(ACK, seq, ack + 2000)  # pure ACK of new data: predicted
    assert conn.snd_una == ack + 2000
    peer.send(ACK, seq, ack + 2000)  # a duplicate: the full path counts it
    peer.send(ACK, seq, ack + 3000, window=100)  # the window changed: full path
    assert conn.snd_una == ack + 3000 and conn.snd_wnd == 100 << 7
    assert peer.iface.counters["tcp.predicted_acks"] == 1
    assert conn._dupacks == 0
