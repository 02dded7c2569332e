"""Edges found by review and by a raw-packet conformance tester, each as it looks on the
wire, under a virtual clock."""

import pytest

from stack.net.tcp import layer as tcp_layer
from stack.net.tcp.connection import TIME_WAIT, Connection, TcpConfig
from tests.unit.tcp_peer import ACK, FIN, PSH, SYN, Peer, User, opts

SACK_OPTS = opts(mss=1460, wscale=7, sack_ok=True)


def established(**kw):
    peer = Peer(TcpConfig(**kw))
    peer.listen()
    conn, seq, ack = peer.handshake(options=SACK_OPTS)
    return peer, conn, seq, ack


def sack_opt(*blocks):
    import struct
    body = b"".join(struct.pack("!II", s & 0xFFFFFFFF, e & 0xFFFFFFFF) for s, e in blocks)
    out = b"\x01\x01" + bytes([5, 2 + len(body)]) + body
    return out


# -- the handshake -------------------------------------------------------------------------


def test_zero_window_in_the_final_handshake_ack_allows_only_probes():
    """RFC 9293 3.10.7.4: SND.WND comes from the ACK that completes the handshake."""
    peer = Peer()
    peer.listen()
    peer.send(SYN, 1000, options=SACK_OPTS)
    (synack,) = peer.out()
    peer.send(ACK, 1001, synack.seq + 1, window=0)
    conn = peer.accepted[0]
    conn.send(b"z" * 200)
    assert peer.out() == []
    assert conn.snd_wnd == 0
    # the receiver answers each probe, its window still shut: only probes go out (the
    # answers repeat SND.UNA but are not duplicate ACKs that would re-send the data)
    sizes = []
    for _ in range(6):
        probes = peer.advance(peer.iface.next_deadline() - peer.now)
        sizes += [len(p.data) for p in probes]
        peer.send(ACK, 1001, synack.seq + 1, window=0)
    assert sizes == [1] * 6
    peer.send(ACK, 1001, synack.seq + 1, window=100)  # it opens: all of it goes
    assert sum(len(s.data) for s in peer.out()) == 200


def test_syn_fin_to_a_listener_is_dropped_and_counted():
    peer = Peer()
    peer.listen()
    peer.send(SYN | FIN, 1000, options=SACK_OPTS)
    assert peer.out() == []
    assert peer.iface.counters["tcp.rx_syn_fin"] == 1
    assert not peer.iface.tcp.connections
    peer.send(SYN, 1000, options=SACK_OPTS)  # a proper SYN still works
    (synack,) = peer.out()
    assert synack.flags & (SYN | ACK) == SYN | ACK


# -- zero-window probing ends --------------------------------------------------------------


def test_unanswered_window_probes_give_up_with_a_timeout():
    peer, conn, seq, ack = established()
    conn.send(b"p" * 100)
    (first,) = peer.out()
    peer.send(ACK, seq, ack + 100, window=0)
    conn.send(b"q" * 100)
    assert peer.out() == []
    probes = []
    for _ in range(40):
        d = peer.iface.next_deadline()
        if d is None:
            break
        probes += [s for s in peer.advance(d - peer.now) if len(s.data) == 1]
    assert len(probes) == conn.config.retries
    assert isinstance(peer.server_user.closed[0], TimeoutError)
    assert not peer.iface.tcp.connections
    assert peer.iface.counters["tcp.window_probe_timeouts"] == 1


def test_answered_probes_keep_a_connection_but_not_an_orphan():
    """RFC 1122 4.2.2.17: stay while the receiver answers; once the user closed it, the
    peer cannot keep it forever by holding its window shut."""
    peer, conn, seq, ack = established()
    conn.send(b"p" * 100)
    peer.out()
    peer.send(ACK, seq, ack + 100, window=0)
    conn.send(b"q" * 100)
    assert peer.out() == []
    answered = 0
    for _ in range(30):
        out = peer.advance(peer.iface.next_deadline() - peer.now)
        if any(len(s.data) == 1 for s in out):
            answered += 1
            peer.send(ACK, seq, ack + 100, window=0)  # still shut
    assert answered == 30 and peer.iface.tcp.connections  # alive while it answers
    conn.close()
    for _ in range(30):
        d = peer.iface.next_deadline()
        if d is None:
            break
        out = peer.advance(d - peer.now)
        if any(len(s.data) == 1 for s in out):
            peer.send(ACK, seq, ack + 100, window=0)
    assert not peer.iface.tcp.connections
    assert peer.iface.counters["tcp.window_probe_timeouts"] == 1


# -- SACK after a timeout ------------------------------------------------------------------


def test_sacked_data_is_sent_again_after_an_rto_unless_sacked_again():
    """RFC 2018 8: after a timeout the SACKed bits are forgotten; a receiver that reneged
    gets the data again."""
    peer, conn, seq, ack = established()
    conn.send(b"d" * (1460 * 4))
    segs = peer.out()
    assert len(segs) == 4
    # the receiver holds segments 2-4 and says so, then the first is lost for good
    peer.send(ACK, seq, ack, options=sack_opt((ack + 1460, ack + 5840)))
    peer.out()
    # nothing more: the retransmissions (and the RTO) fire; the receiver reneges
    sent = []
    while not peer.iface.counters["tcp.rto_expiries"]:
        sent += peer.advance(peer.iface.next_deadline() - peer.now)
    assert sent and all(s.seq == ack for s in sent)
    # it now acknowledges the first segment only, with no SACK blocks: the rest must go
    peer.send(ACK, seq, ack + 1460)
    again = peer.out()
    assert (ack + 1460) in [s.seq for s in again]


# -- the out-of-order queue ----------------------------------------------------------------


def test_out_of_order_islands_are_bounded_in_number():
    peer, conn, seq, ack = established()
    limit = conn.ooo.max_blocks
    for i in range(limit + 200):
        peer.send(ACK, seq + 2 + 2 * i, ack, b"i")
    peer.out()
    assert len(conn.ooo.blocks) == limit
    assert peer.iface.counters["tcp.ooo_dropped"] == 200
    # filling the first gap still delivers what was held contiguously after it
    peer.send(ACK, seq, ack, b"ab")
    peer.out()
    assert bytes(peer.server_user.data) == b"abi"


def test_out_of_order_queue_inserts_anywhere_and_merges():
    from stack.net.tcp.buffers import OutOfOrderQueue
    q = OutOfOrderQueue(1 << 20)
    base = 0xFFFFFF00  # across the wrap
    for off in (50, 10, 30, 20, 40):
        assert q.add(base, (base + off) & 0xFFFFFFFF, b"x" * 5)
    assert [((s - base) & 0xFFFFFFFF, len(b)) for s, b in q.blocks] == \
        [(10, 5), (20, 5), (30, 5), (40, 5), (50, 5)]
    assert q.add(base, (base + 15) & 0xFFFFFFFF, b"y" * 25)  # bridges 10..40
    assert [((s - base) & 0xFFFFFFFF, len(b)) for s, b in q.blocks] == [(10, 35), (50, 5)]
    assert q.bytes == 40
    # the most recently changed block is reported first (RFC 2018 4)
    assert q.sack_blocks(3)[0] == ((base + 10) & 0xFFFFFFFF, (base + 45) & 0xFFFFFFFF)


# -- TIME-WAIT -----------------------------------------------------------------------------


def close_actively(peer, conn, seq, ack):
    conn.close()
    (fin,) = peer.out()
    assert fin.flags & FIN
    peer.send(ACK | FIN, seq, ack + 1)
    (last,) = peer.out()
    assert last.ack == seq + 1


def test_time_wait_does_not_count_against_the_connection_limit():
    peer = Peer(TcpConfig(max_connections=3))
    peer.listen()
    for i in range(3):
        peer.port = 41000 + i
        conn, seq, ack = peer.handshake(options=SACK_OPTS)
        close_actively(peer, conn, seq, ack)
    layer = peer.iface.tcp
    assert len(layer.time_wait) == 3 and not layer.connections
    assert layer.gauges()["tcp.state_time_wait"] == 3
    peer.port = 42000
    conn, seq, ack = peer.handshake(options=SACK_OPTS)  # accepted
    assert peer.iface.counters["tcp.connection_limit"] == 0


def test_time_wait_table_recycles_the_oldest_and_still_acks_a_repeated_fin():
    peer = Peer(TcpConfig(max_time_wait=2))
    peer.listen()
    ends = []
    for i in range(3):
        peer.port = 41000 + i
        conn, seq, ack = peer.handshake(options=SACK_OPTS)
        close_actively(peer, conn, seq, ack)
        ends.append((peer.port, seq, ack))
    layer = peer.iface.tcp
    assert len(layer.time_wait) == 2
    assert peer.iface.counters["tcp.time_wait_recycled"] == 1
    port, seq, ack = ends[-1]
    peer.port = port
    peer.send(ACK | FIN, seq, ack + 1)  # our last ACK was lost: the FIN comes again
    (again,) = peer.out()
    assert again.flags & ACK and again.ack == seq + 1 and again.seq == ack + 1
    assert peer.iface.counters["tcp.time_wait_fin_acked"] == 1
    # it ends after 2 MSL and then the port answers like any closed one
    peer.advance(2 * 30.0 + 1)
    assert not layer.time_wait
    peer.send(ACK, seq + 1, ack + 1)
    (rst,) = peer.out()
    assert rst.flags & 0x04


def test_time_wait_record_keeps_the_state_name_for_inspection():
    peer, conn, seq, ack = established()
    close_actively(peer, conn, seq, ack)
    (tw,) = peer.iface.tcp.time_wait.values()
    assert tw.state == TIME_WAIT and tw.state_name == "TIME-WAIT"


# -- tail loss probe -----------------------------------------------------------------------


def test_tail_loss_probe_with_one_segment_out_waits_for_a_200ms_delayed_ack():
    """RFC 8985 7.2: with one segment in flight, PTO adds WCDelAckT (200 ms)."""
    peer, conn, seq, ack = established()
    conn.send(b"a" * 1460 * 2)
    peer.out()
    peer.now += 0.010
    peer.send(ACK, seq, ack + 2920)  # SRTT about 10 ms
    peer.out()
    conn.send(b"b" * 100)
    (one,) = peer.out()
    assert peer.advance(0.199) == []  # a peer may delay its ACK this long
    again = peer.advance(0.05)  # then the probe, or the RTO if that comes first
    assert again and again[0].seq == one.seq


# -- ACKs for a batch of data --------------------------------------------------------------


@pytest.mark.parametrize(("every", "segments", "acked_at"), [
    (2, 10, [2, 4, 6, 8, 10]),  # RFC 5681 4.2 to the letter
    (44, 100, [44, 88, 100]),  # the default: at most 64 KB per ACK, as Linux with GRO
    (44, 3, [3]),  # a small batch: one ACK at its end, not a delayed one
])
def test_a_batch_of_segments_is_acked_as_it_arrives(every, segments, acked_at):
    """Many segments may arrive before the stack runs its output: the ACKs may not wait
    for the end of the batch (which once meant one ACK per 256 frames)."""
    peer, conn, seq, ack = established(quickack_segments=0, ack_every=every)
    for i in range(segments):
        peer.send(ACK, seq + 1460 * i, ack, b"s" * 1460)
    acks = peer.out()
    assert [(a.ack - seq) // 1460 for a in acks] == acked_at


# -- Nagle with Minshall's modification ----------------------------------------------------


@pytest.mark.parametrize("size", [1460 + 600, 2 * 1460 + 500])
def test_a_response_of_two_or_three_segments_leaves_whole(size):
    """Nagle holds a small segment only while another small one is unacknowledged
    (Minshall), so a reply a little over one MSS does not wait for the delayed ACK."""
    peer, conn, seq, ack = established()
    conn.send(b"r" * size)
    out = peer.out()
    assert sum(len(s.data) for s in out) == size
    conn.send(b"t" * 10)  # a second small one waits for the first to be acknowledged
    assert peer.out() == []
    peer.send(ACK, seq, ack + size)
    (t,) = peer.out()
    assert bytes(t.data) == b"t" * 10


# -- SYN cookies ---------------------------------------------------------------------------


def test_stray_acks_are_not_checked_as_cookies_when_none_were_sent(monkeypatch):
    calls = []
    real = tcp_layer.check_cookie
    monkeypatch.setattr(tcp_layer, "check_cookie",
                        lambda *a: calls.append(a) or real(*a))
    peer = Peer()
    peer.listen()
    peer.send(ACK, 5000, 7000)
    (rst,) = peer.out()
    assert rst.flags & 0x04 and calls == []
    # once cookies were sent (the SYN queue overflowed), ACKs are checked
    peer = Peer()
    peer.listen(backlog=1)
    peer.send(SYN, 1000, options=SACK_OPTS)
    peer.port += 1
    peer.send(SYN, 2000, options=SACK_OPTS)
    assert peer.iface.counters["tcp.syncookies_sent"] == 1
    peer.port += 1
    peer.send(ACK, 5000, 7000)
    assert len(calls) == 1


# -- bugs do not leave half-updated connections -------------------------------------------


def test_an_internal_error_in_a_segment_aborts_that_connection(monkeypatch):
    peer, conn, seq, ack = established()

    def broken(*a):
        raise RuntimeError("a bug")

    monkeypatch.setattr(Connection, "_receive_data", broken)
    peer.send(ACK | PSH, seq, ack, b"x")
    out = peer.out()
    assert [s.flags & 0x04 for s in out] == [0x04]
    assert not peer.iface.tcp.connections
    assert peer.iface.counters["stack.internal_errors"] == 1
    assert peer.iface.counters["tcp.aborted_on_error"] == 1


def test_a_burst_gets_a_tail_loss_probe_not_the_lone_segment_delay():
    """The timer is armed when the burst's first segment leaves; the probe timeout must be
    the one for the whole burst (2 SRTT), not for one segment (2 SRTT + 200 ms, which is
    later than the RTO: a Linux receiver holding its ACK then meets a spurious RTO)."""
    peer, conn, seq, ack = established()
    conn.send(b"a" * 1460 * 2)
    peer.out()
    peer.now += 0.002
    peer.send(ACK, seq, ack + 2920)  # SRTT about 2 ms; nothing outstanding
    peer.out()
    conn.send(b"b" * 1460 * 6)
    burst = peer.out()
    assert len(burst) == 6
    probe = peer.advance(0.05)
    assert probe and peer.iface.counters["tcp.tlp_probes"] == 1
    assert peer.iface.counters["tcp.rto_expiries"] == 0


# -- found by review -------------------------------------------------------------------------


def test_probes_whose_byte_is_taken_count_as_answered():
    """A receiver that accepts each probe byte and keeps its window shut answers with an
    ACK that takes the fast path: the connection must stay (RFC 1122 4.2.2.17)."""
    peer = Peer(TcpConfig(retries=4))
    peer.listen()
    conn, seq, ack = peer.handshake(options=SACK_OPTS)
    conn.send(b"a" * 100)
    peer.out()
    peer.send(ACK, seq, ack + 100, window=0)
    conn.send(b"b" * 5000)
    peer.out()
    edge, probes = ack + 100, 0
    while probes < 10:
        for s in peer.advance(peer.iface.next_deadline() - peer.now):
            if s.data:
                probes += 1
                edge = max(edge, s.seq + len(s.data))
                peer.send(ACK, seq, edge, window=0)  # taken; still shut
    assert conn.state_name == "ESTABLISHED" and peer.server_user.closed == []


def test_an_application_that_aborts_on_the_last_fin_leaves_no_time_wait():
    peer = Peer()
    peer.listen()
    other, _, _ = peer.handshake(iss=5000)  # another connection from the same host
    peer.port = 40001
    conn, seq, ack = peer.handshake()

    class AbortOnEof(User):
        def on_eof(self):
            conn.abort()  # what the transport does when eof_received raises

    conn.user = AbortOnEof()
    conn.shutdown()
    (fin,) = peer.out()
    peer.send(ACK, seq, fin.seq + 1)
    peer.send(ACK | FIN, seq, fin.seq + 1)
    assert [s.flags & 0x04 for s in peer.out()] == [0x04]  # the RST, and no ACK after it
    layer = peer.iface.tcp
    assert len(layer.connections) == 1 and not layer.time_wait
    assert layer.state_counts[4] == 1 and sum(layer.state_counts) == 1  # ESTABLISHED
    assert sum(layer.per_source.values()) == 1 and sum(layer.local_ports.values()) == 1


def sacks(*blocks):
    import struct
    return b"\x01\x01" + struct.pack("!BB", 5, 2 + 8 * len(blocks)) + b"".join(
        struct.pack("!II", s & 0xFFFFFFFF, e & 0xFFFFFFFF) for s, e in blocks)


@pytest.mark.parametrize("cc", ["cubic", "newreno"])
def test_a_loss_after_an_undone_recovery_is_reduced_and_bounded(cc):
    """Undo restores an infinite ssthresh on a first loss; the next loss must still be a
    loss (reduced), and ending its recovery must never set cwnd to that infinity."""
    peer = Peer(TcpConfig(cc=cc))
    peer.listen()
    conn, seq, their = peer.handshake(options=SACK_OPTS)
    mss = conn.eff_mss

    def s(k):
        return their + k * mss

    conn.send(b"y" * (20 * mss))
    peer.out()
    peer.now += 0.01
    peer.send(ACK, seq, s(10))
    peer.out()
    peer.now += 0.01
    peer.send(ACK, seq, s(10), options=sacks((s(11), s(18)), (s(19), s(20))))
    peer.out()  # holes 10 and 18 re-sent
    peer.now += 0.01
    peer.send(ACK, seq, s(18), options=sacks((s(10), s(11)), (s(19), s(20))))  # D-SACK
    peer.send(ACK, seq, s(20), options=sacks((s(18), s(19))))  # D-SACK: all spurious
    peer.out()
    assert peer.iface.counters["tcp.spurious_recoveries"] == 1
    conn.send(b"z" * (10 * mss))
    peer.out()
    peer.now += 0.01
    peer.send(ACK, seq, s(20), options=sacks((s(21), s(24))))  # a real loss: segment 20
    peer.out()
    assert conn.cc.ssthresh < 1 << 30  # reduced
    peer.now += 0.01
    peer.send(ACK, seq, conn.snd_max)
    peer.out()
    assert conn.cc.cwnd < 100 * mss
    conn.send(b"w" * (400 * mss))
    assert len(peer.out()) < 100


def test_bbr_probes_for_the_minimum_rtt_even_with_a_sample_on_every_ack():
    from stack.net.tcp.congestion import Bbr
    cc = Bbr(1000)
    now, una, modes = 0.0, 0, set()
    while now < 20.0:
        rtt = 0.010 if now < 1.0 else 0.015  # a queue builds after the first second
        window = min(cc.cwnd, 200_000)  # the receiver's window bounds the flight
        una += window
        cc.on_ack(window, rtt, now + rtt, una, una + window, window, True, False)
        modes.add(cc.mode)
        now += rtt
    assert "probe_rtt" in modes


def test_a_small_window_with_nothing_in_flight_is_not_a_stall():
    """Sender SWS avoidance holds a segment smaller than half the largest window seen;
    with nothing in flight no ACK will come, so the override timer sends it (RFC 9293
    3.8.6.2.1) if the receiver's window update is lost."""
    peer, conn, seq, ack = established()
    conn.send(b"a" * 1460)
    peer.out()
    peer.send(ACK, seq, ack + 1460, window=2)  # scaled by 2**7: 256 bytes open
    conn.send(b"b" * 5000)
    assert peer.out() == []  # 256 bytes: too small to send at once
    later = peer.advance(1.0)
    assert later and len(later[0].data) == 256
