"""RACK (RFC 8985): the transmit-time map alone, then loss found by time in a connection
under a virtual clock."""

from stack.net.tcp.rack import NEVER, Rack
from tests.unit.tcp_peer import ACK, SYN, Peer, opts
from tests.unit.test_tcp_timing import established, sack_opt

UNA = 0xFFFF_F000  # near the wrap, so offsets and sequence numbers must be kept apart


def seq(off: int) -> int:
    return (UNA + off) & 0xFFFF_FFFF


def layout(r: Rack) -> list[tuple[int, float, bool]]:
    """(end offset, time, retransmitted) per entry."""
    return [((e[0] - UNA) & 0xFFFF_FFFF, e[1], e[2]) for e in r.ents]


def test_a_burst_is_one_entry_and_a_resend_splits_it():
    r = Rack(UNA)
    for i in range(5):  # five segments in one batch of the event loop
        r.sent(seq(i * 1000), seq(i * 1000 + 1000), 1.0, False)
    r.sent(seq(5000), seq(6000), 2.0, False)
    assert layout(r) == [(5000, 1.0, False), (6000, 2.0, False)]
    r.sent(seq(2000), seq(3000), 3.0, True)  # a hole re-sent
    assert layout(r) == [(2000, 1.0, False), (3000, 3.0, True), (5000, 1.0, False),
                         (6000, 2.0, False)]
    r.sent(seq(4500), seq(5500), 3.5, True)  # across two entries
    assert layout(r) == [(2000, 1.0, False), (3000, 3.0, True), (4500, 1.0, False),
                         (5500, 3.5, True), (6000, 2.0, False)]
    r.sent(seq(-10), seq(0), 4.0, True)  # below SND.UNA: ignored
    r.acked(seq(2500), 4.0, True)  # SND.UNA moves into the re-sent entry
    assert r.base == seq(2500)
    assert [((e[0] - seq(2500)) & 0xFFFF_FFFF) for e in r.ents] == [500, 2000, 3000, 3500]
    r.expire_retransmissions(before=3.6)  # the resend at 3.5 is old enough
    assert [(e[1], e[2]) for e in r.ents] == [(NEVER, False), (1.0, False), (NEVER, False),
                                              (2.0, False)]


def test_loss_is_what_left_before_the_latest_delivery_an_rtt_and_a_window_ago():
    r = Rack(UNA)
    r.sent(seq(0), seq(3000), 0.0, False)  # segments 0-2, one burst
    r.sent(seq(3000), seq(4000), 0.001, False)  # segment 3, later
    r.delivered([(2000, 3000)], 0.010)  # segment 2 SACKed: 10 ms round trip
    assert r.rtt == 0.010 and r.min_rtt == 0.010
    undelivered = [(0, 2000, False), (3000, 4000, False)]
    # 0-1 left in the same burst before 2: lost once 10 ms + the window have passed;
    # 3 left after 2, so nothing says it is lost yet
    assert r.lost(undelivered, 4000, 0.0025, 0.011) == ([], 0.0125)
    assert r.lost(undelivered, 4000, 0.0025, 0.0125) == ([(0, 2000)], None)
    assert r.lost(undelivered, 1000, 0.0025, 0.0125) == ([(0, 1000)], None)  # SND.NXT
    # IsLost alone marks bytes never re-sent, whatever the clock says
    assert r.lost([(3000, 4000, True)], 4000, 0.0, 0.0)[0] == [(3000, 4000)]


def test_a_retransmission_is_not_lost_by_the_delivery_of_what_it_repaired_before_it():
    r = Rack(UNA)
    r.sent(seq(0), seq(4000), 0.0, False)
    r.delivered([(1000, 4000)], 0.010)
    r.sent(seq(0), seq(1000), 0.010, True)  # re-sent in the same tick as the ACK came
    assert r.lost([(0, 1000, True)], 4000, 0.0, 0.020) == ([], None)
    r.sent(seq(4000), seq(5000), 0.010, False)  # new data, after the resend
    r.delivered([(4000, 5000)], 0.021)
    assert r.lost([(0, 1000, True)], 5000, 0.0, 0.021) == ([(0, 1000)], None)


def test_reordering_is_noticed_and_widens_the_window():
    r = Rack(UNA)
    r.sent(seq(0), seq(3000), 0.0, False)
    r.delivered([(2000, 3000)], 0.008)
    assert r.reo_wnd(False, 3, 0.01) == 0.0  # three SACKed and no reordering: none
    r.delivered([(1000, 2000)], 0.009)  # an original below what was already reported
    assert r.reordering
    assert r.reo_wnd(True, 3, 0.01) == 0.002  # min RTT / 4


def established_4ms(mss: int):
    """A connection whose handshake took 4 ms (RACK's minimum RTT starts there)."""
    peer = Peer()
    peer.listen()
    peer.send(SYN, 1000, options=opts(mss=mss, wscale=7, sack_ok=True))
    (synack,) = peer.out()
    peer.advance(0.004)
    peer.send(ACK, 1001, synack.seq + 1)
    return peer, peer.accepted[0], 1001, synack.seq + 1


def test_one_sack_beyond_a_hole_starts_recovery_after_the_reordering_window():
    peer, conn, theirs, base = established_4ms(mss=1000)
    conn.send(b"r" * 30_000)
    assert len(peer.out()) == 10  # the initial window
    peer.advance(0.004)
    peer.send(ACK, theirs, base + 8000)  # 0-7 arrived
    assert len(peer.out()) > 0  # the window moved on
    peer.send(ACK, theirs, base + 8000, options=sack_opt((base + 9000, base + 10_000)))
    # one segment beyond the hole: fewer than DupThresh, and reordering is possible, so
    # nothing is re-sent yet (limited transmit may send new data)
    assert [s.seq - base for s in peer.out() if s.data and s.seq - base < 18_000] == []
    resent = [s.seq - base for s in peer.advance(0.002) if s.data and s.seq - base < 18_000]
    assert resent == [8000]
    c = peer.iface.counters
    assert c["tcp.fast_retransmits"] == 1 and c["tcp.rto_expiries"] == 0
    assert c["tcp.tlp_probes"] == 0


def test_a_lost_retransmission_goes_again_when_later_data_arrives():
    peer, conn, theirs, base = established(mss=1000)
    conn.send(b"l" * 10_000)
    assert len(peer.out()) == 10
    peer.advance(0.005)
    blocks = [(base + 2000, base + 4000), (base + 5000, base + 10_000)]
    for i in range(3):
        peer.send(ACK, theirs, base + 1000, options=sack_opt(*blocks[: 1 + (i > 0)]))
    first = sorted(s.seq - base for s in peer.out() if s.data)
    assert first == [1000, 4000]
    peer.advance(0.005)
    # the resend of 4000 arrived, the resend of 1000 did not
    peer.send(ACK, theirs, base + 1000, options=sack_opt((base + 2000, base + 10_000)))
    again = [s.seq - base for s in peer.out() if s.data]
    assert again == [1000]
    c = peer.iface.counters
    assert c["tcp.lost_retransmits"] == 0 and c["tcp.rto_expiries"] == 0
    peer.send(ACK, theirs, base + 10_000)
    assert conn.snd_una == base + 10_000 and not conn._in_recovery


def test_dsacks_widen_the_window_once_per_round_trip_and_it_shrinks_back():
    r = Rack(UNA)
    r.rtt_sample(0.008)
    r.dsack(seq(10_000))
    r.dsack(seq(12_000))  # the same round trip: no second step
    assert r.reordering and r.reo_mult == 2
    assert r.reo_wnd(True, 5, 0.1) == 0.004  # 2 x min RTT / 4
    r.acked(seq(10_001), 0.02, False)  # SND.UNA passed the round's end
    r.dsack(seq(20_000))
    assert r.reo_mult == 3
    assert r.reo_wnd(True, 5, 0.005) == 0.005  # never more than SRTT
    for _ in range(16):
        r.recovery_done()
    assert r.reo_mult == 1


def test_a_duplicate_report_from_the_peer_is_counted_as_a_dsack():
    peer, conn, theirs, base = established_4ms(mss=1000)
    conn.send(b"d" * 4000)
    peer.out()
    peer.send(ACK, theirs, base + 4000)
    # RFC 2883: the first block lies below the cumulative ACK
    peer.send(ACK, theirs, base + 4000, options=sack_opt((base + 1000, base + 2000)))
    assert peer.iface.counters["tcp.dsacks_received"] == 1
    assert conn._rack.reordering and conn._rack.reo_mult == 2


def test_after_an_rto_sacks_send_every_hole_at_once_not_one_per_timeout():
    """Go-back-N leaves SND.NXT at SND.UNA; the bytes past it are not in the network,
    so the pipe must not count them (a review found recovery stalled on exactly this)."""
    peer, conn, theirs, base = established_4ms(mss=1000)
    conn.send(b"g" * 10_000)
    assert len(peer.out()) == 10
    segs = peer.advance(0.3)  # a tail loss probe, then the RTO re-sends SND.UNA
    assert peer.iface.counters["tcp.rto_expiries"] == 1
    assert 0 in [s.seq - base for s in segs if s.data]
    # the peer got that resend and holds 7-9: holes 1-6, all lost
    peer.send(ACK, theirs, base + 1000, options=sack_opt((base + 7000, base + 10_000)))
    resent = [s.seq - base for s in peer.out() if s.data]
    assert resent[:4] == [1000, 2000, 3000, 4000]  # as far as the window allows, now
