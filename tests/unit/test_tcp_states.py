"""The RFC 9293 state machine, asserted by the segments tapstack sends (virtual clock)."""

import struct

import pytest

from stack.net.tcp.connection import TcpConfig
from tests.unit.tcp_peer import (
    ACK,
    FIN,
    PSH,
    RST,
    SYN,
    Peer,
    User,
    opts,
    parse_opts,
    state_name,
)

PEER_IP = "10.77.0.1"


def states(peer: Peer) -> list[str]:
    return [c.state_name for c in peer.iface.tcp.connections.values()]


# -- opening ----------------------------------------------------------------------------------


def test_syn_ack_offers_what_the_peer_offered():
    peer = Peer()
    peer.listen()
    peer.send(SYN, 1000, options=opts(mss=1400, wscale=7, sack_ok=True, ts=(555, 0)))
    (synack,) = peer.out()
    assert synack.flags == SYN | ACK and synack.ack == 1001
    o = parse_opts(synack)
    assert struct.unpack("!H", o[2])[0] == 1460  # MTU - 40
    assert o[3] == bytes([7]) and 4 in o
    ts_val, ts_ecr = struct.unpack("!II", o[8])
    assert ts_ecr == 555
    assert synack.win <= 65535  # never scaled in a SYN
    assert states(peer) == ["SYN-RECEIVED"]


def test_syn_without_options_gets_only_mss_and_unscaled_windows():
    peer = Peer()
    peer.listen()
    conn, seq, ack = peer.handshake(options=b"")
    peer.send(ACK | PSH, seq, ack, b"x" * 10)
    (seg,) = peer.out()
    assert parse_opts(seg) == {}  # no timestamps without the peer offering them
    assert seg.win == 65535  # our 1 MB buffer, but unscaled: capped at 65535
    assert conn.snd_wscale == 0 and conn.rcv_wscale == 0
    assert conn.eff_mss == 536  # RFC 9293 3.7.1: no MSS option means 536


def test_established_delivers_data_and_tcp_info_counts():
    peer = Peer()
    peer.listen()
    conn, seq, ack = peer.handshake()
    peer.send(ACK | PSH, seq, ack, b"hello")
    assert bytes(peer.server_user.data) == b"hello"
    assert states(peer) == ["ESTABLISHED"]
    assert peer.iface.counters["tcp.passive_opens"] == 1


def test_closed_port_answers_rst():
    peer = Peer()
    peer.send(SYN, 5000, dport=81)
    (rst,) = peer.out()
    assert rst.flags == RST | ACK and rst.seq == 0 and rst.ack == 5001
    peer.send(ACK, 5001, 777, dport=81)
    (rst,) = peer.out()
    assert rst.flags == RST and rst.seq == 777
    peer.send(RST, 5001, dport=81)
    assert peer.out() == []  # never answer a RST


def test_ack_to_a_listener_gets_rst():
    peer = Peer()
    peer.listen()
    peer.send(ACK, 1, 4242)
    (rst,) = peer.out()
    assert rst.flags == RST and rst.seq == 4242


def test_listen_backlog_is_bounded_and_overflow_gets_a_syn_cookie():
    peer = Peer()
    peer.listen(backlog=2)
    for port in (40001, 40002, 40003):
        peer.send(SYN, 1, sport=port)
    assert len(peer.out()) == 3  # two from the SYN queue, the third stateless
    assert len(peer.iface.tcp.connections) == 2
    assert peer.iface.counters["tcp.listen_overflows"] == 1
    assert peer.iface.counters["tcp.syncookies_sent"] == 1


def test_syn_cookie_handshake_establishes_with_options_from_the_timestamp():
    peer = Peer()
    peer.listen(backlog=0)  # every SYN overflows
    peer.send(SYN, 7000, options=opts(mss=1400, wscale=6, sack_ok=True, ts=(111, 0)))
    (synack,) = peer.out()
    assert peer.iface.tcp.connections == {}  # nothing kept
    o = parse_opts(synack)
    ts_val = struct.unpack("!II", o[8])[0]
    assert o[3] == bytes([7]) and 4 in o
    peer.send(ACK | PSH, 7001, synack.seq + 1, b"GET / HTTP/1.1\r\n",
              options=opts(ts=(112, ts_val)))
    (conn,) = peer.iface.tcp.connections.values()
    assert conn.state_name == "ESTABLISHED" and conn.peer_mss == 1400  # from the table
    assert conn.snd_wscale == 6 and conn.sack_ok and conn.ts_ok
    assert bytes(peer.server_user.data) == b"GET / HTTP/1.1\r\n"
    assert peer.iface.counters["tcp.syncookies_ok"] == 1
    conn.send(b"reply")
    (d,) = [s for s in peer.out() if s.data]
    assert bytes(d.data) == b"reply" and d.seq == synack.seq + 1
    later_ts = struct.unpack("!II", parse_opts(d)[8])[0]
    assert (later_ts - ts_val) % (1 << 32) < 1 << 31  # later TSvals are newer (PAWS)


def test_a_forged_cookie_is_refused():
    peer = Peer()
    peer.listen(backlog=0)
    peer.send(SYN, 7000, options=opts(mss=1460))
    (synack,) = peer.out()
    peer.send(ACK, 7001, synack.seq + 12345)
    (rst,) = peer.out()
    assert rst.flags == RST and peer.iface.tcp.connections == {}
    assert peer.iface.counters["tcp.syncookies_failed"] == 1


def test_connection_limits_total_and_per_source():
    peer = Peer(TcpConfig(max_connections=3))
    peer.listen()
    for port in range(40001, 40006):
        peer.send(SYN, 1, sport=port)
    assert len(peer.out()) == 3 and peer.iface.counters["tcp.connection_limit"] == 2
    peer = Peer(TcpConfig(max_per_source=2))
    peer.listen()
    for port in range(40001, 40005):
        peer.send(SYN, 1, sport=port)
    assert len(peer.out()) == 2 and peer.iface.counters["tcp.per_source_limit"] == 2


def test_active_open_and_refused():
    peer = Peer()
    user = User()
    conn = peer.iface.tcp.connect(bytes([10, 77, 0, 1]), 5000, peer.now)
    conn.user = user
    (syn,) = peer.out()
    assert syn.flags == SYN and syn.dport == 5000 and 32768 <= syn.sport <= 60999
    o = parse_opts(syn)
    assert {2, 3, 4, 8} <= set(o)
    peer.send(RST | ACK, 0, syn.seq + 1, sport=5000, dport=syn.sport)
    assert isinstance(user.closed[0], ConnectionRefusedError)
    assert peer.iface.tcp.connections == {}


def test_syn_retransmissions_back_off_then_time_out():
    peer = Peer(TcpConfig(syn_retries=3))
    user = User()
    peer.iface.tcp.connect(bytes([10, 77, 0, 1]), 5000, peer.now).user = user
    peer.out()
    times = []
    while not user.closed and peer.now < 60:
        if peer.advance(peer.iface.next_deadline() - peer.now):
            times.append(round(peer.now, 3))
    assert times == [1.0, 3.0, 7.0]  # 1 s, then doubling (RFC 6298 5.5)
    assert isinstance(user.closed[0], TimeoutError)  # given up at 15 s
    assert peer.iface.tcp.connections == {}


def test_simultaneous_open():
    peer = Peer()
    user = User()
    conn = peer.iface.tcp.connect(bytes([10, 77, 0, 1]), 5000, peer.now)
    conn.user = user
    (syn,) = peer.out()
    peer.send(SYN, 9000, sport=5000, dport=syn.sport, options=opts(mss=1460))
    (synack,) = peer.out()
    assert synack.flags == SYN | ACK and synack.seq == syn.seq and synack.ack == 9001
    assert conn.state_name == "SYN-RECEIVED"
    peer.send(SYN | ACK, 9000, syn.seq + 1, sport=5000, dport=syn.sport)
    peer.send(ACK, 9001, syn.seq + 1, sport=5000, dport=syn.sport)
    assert conn.state_name == "ESTABLISHED" and user.established


# -- closing ---------------------------------------------------------------------------------


def test_passive_close_close_wait_last_ack_closed():
    peer = Peer()
    peer.listen()
    conn, seq, ack = peer.handshake()
    peer.send(FIN | ACK, seq, ack)
    (a,) = peer.out()
    assert a.flags == ACK and a.ack == seq + 1
    assert conn.state_name == "CLOSE-WAIT" and peer.server_user.eof
    conn.send(b"late reply")  # half-close: we may still send
    (d,) = peer.out()
    assert bytes(d.data) == b"late reply"
    conn.close()
    (fin,) = peer.out()
    assert fin.flags & FIN and fin.seq == ack + 10 and conn.state_name == "LAST-ACK"
    peer.send(ACK, seq + 1, ack + 11)
    assert peer.iface.tcp.connections == {}
    assert peer.server_user.closed == [None]


def test_active_close_fin_wait_time_wait_and_retransmitted_fin():
    peer = Peer(TcpConfig(msl=5.0))
    peer.listen()
    conn, seq, ack = peer.handshake()
    conn.close()
    (fin,) = peer.out()
    assert fin.flags == FIN | ACK and conn.state_name == "FIN-WAIT-1"
    peer.send(ACK, seq, ack + 1)
    assert conn.state_name == "FIN-WAIT-2"
    peer.send(FIN | ACK, seq, ack + 1)
    (a,) = peer.out()
    assert a.flags == ACK and a.ack == seq + 1 and state_name(peer.iface.tcp, conn) == "TIME-WAIT"
    assert peer.server_user.closed == [None]
    peer.advance(3.0)
    peer.send(FIN | ACK, seq, ack + 1)  # our ACK was lost: the FIN comes again
    (a,) = peer.out()
    assert a.ack == seq + 1 and state_name(peer.iface.tcp, conn) == "TIME-WAIT"
    peer.advance(9.9)  # 2 MSL from the retransmitted FIN
    assert state_name(peer.iface.tcp, conn) == "TIME-WAIT"
    peer.advance(0.2)
    assert peer.iface.tcp.connections == {} and not peer.iface.tcp.time_wait
    assert peer.iface.next_deadline() is None  # trap 5: nothing left ticking


@pytest.mark.parametrize("fin_acked_first", [True, False])
def test_half_close_then_their_fin_reports_eof_before_time_wait(fin_acked_first):
    """After shutdown() the application still reads: the peer's FIN must reach it as EOF
    before TIME-WAIT lets it go (FIN-WAIT-2, or FIN-WAIT-1 with the FIN acked at once)."""
    peer = Peer(TcpConfig(msl=1.0))
    peer.listen()
    conn, seq, ack = peer.handshake()
    conn.shutdown()
    (fin,) = peer.out()
    assert fin.flags == FIN | ACK and conn.state_name == "FIN-WAIT-1"
    if fin_acked_first:
        peer.send(ACK, seq, ack + 1)
        assert conn.state_name == "FIN-WAIT-2"
    peer.send(FIN | ACK | PSH, seq, ack + 1, data=b"last words")
    assert state_name(peer.iface.tcp, conn) == "TIME-WAIT"
    user = peer.server_user
    assert bytes(user.data) == b"last words" and user.eof and user.closed == [None]


def test_simultaneous_close_goes_through_closing():
    peer = Peer(TcpConfig(msl=1.0))
    peer.listen()
    conn, seq, ack = peer.handshake()
    conn.close()
    (fin,) = peer.out()
    peer.send(FIN | ACK, seq, ack)  # their FIN crosses ours: it does not ack our FIN
    (a,) = peer.out()
    assert a.ack == seq + 1 and conn.state_name == "CLOSING"
    peer.send(ACK, seq + 1, ack + 1)
    assert state_name(peer.iface.tcp, conn) == "TIME-WAIT"
    peer.advance(2.1)
    assert peer.iface.tcp.connections == {}


def test_half_close_data_keeps_flowing_to_us():
    peer = Peer()
    peer.listen()
    conn, seq, ack = peer.handshake()
    conn.shutdown()  # write_eof
    (fin,) = peer.out()
    peer.send(ACK, seq, ack + 1)
    assert conn.state_name == "FIN-WAIT-2"
    peer.send(ACK | PSH, seq, ack + 1, b"still talking")
    assert bytes(peer.server_user.data) == b"still talking"


def test_time_wait_accepts_a_new_syn_with_a_higher_sequence_number():
    peer = Peer()
    peer.listen()
    conn, seq, ack = peer.handshake()
    conn.close()
    peer.out()
    peer.send(ACK, seq, ack + 1)
    peer.send(FIN | ACK, seq, ack + 1)
    peer.out()
    assert state_name(peer.iface.tcp, conn) == "TIME-WAIT"
    peer.send(SYN, seq + 100000, options=opts(mss=1460))
    (synack,) = peer.out()
    assert synack.flags == SYN | ACK and synack.ack == seq + 100001
    assert peer.iface.counters["tcp.time_wait_reused"] == 1
    assert states(peer) == ["SYN-RECEIVED"]


# -- RFC 5961 and friends ---------------------------------------------------------------------


def established(**kw):
    peer = Peer(TcpConfig(**kw))
    peer.listen()
    conn, seq, ack = peer.handshake()
    return peer, conn, seq, ack


def test_exact_rst_resets():
    peer, conn, seq, ack = established()
    peer.send(RST, seq)
    assert peer.iface.tcp.connections == {}
    assert isinstance(peer.server_user.closed[0], ConnectionResetError)


def test_in_window_rst_gets_a_challenge_ack_and_changes_nothing():
    peer, conn, seq, ack = established()
    peer.send(RST, seq + 100)
    (a,) = peer.out()
    assert a.flags == ACK and a.ack == seq
    assert conn.state_name == "ESTABLISHED"
    assert peer.iface.counters["tcp.rst_challenged"] == 1


def test_out_of_window_rst_is_ignored():
    peer, conn, seq, ack = established()
    peer.send(RST, seq + 10_000_000)
    assert peer.out() == [] and conn.state_name == "ESTABLISHED"


def test_syn_on_an_established_connection_gets_a_challenge_ack():
    peer, conn, seq, ack = established()
    peer.send(SYN, seq + 5)
    (a,) = peer.out()
    assert a.flags == ACK and a.ack == seq
    assert conn.state_name == "ESTABLISHED"


def test_ack_of_unsent_data_is_answered_and_ignored():
    peer, conn, seq, ack = established()
    peer.send(ACK, seq, ack + 5000)
    (a,) = peer.out()
    assert a.flags == ACK and a.seq == ack
    assert conn.snd_una == ack
    assert peer.iface.counters["tcp.ack_unsent"] == 1


def test_challenge_acks_are_rate_limited():
    peer, conn, seq, ack = established()
    peer.iface.tcp._challenge_limit = 5
    for i in range(20):
        peer.send(RST, seq + 1 + i)
    assert len(peer.out()) <= 5
    assert peer.iface.counters["tcp.challenge_acks_limited"] == 15


def test_out_of_window_data_gets_an_ack_and_is_dropped():
    peer, conn, seq, ack = established()
    peer.send(ACK, seq - 5000, ack, b"old!")
    (a,) = peer.out()
    assert a.ack == seq and peer.server_user.data == b""


def test_paws_drops_an_old_timestamp():
    peer = Peer()
    peer.listen()
    o = opts(mss=1460, ts=(1000, 0))
    conn, seq, ack = peer.handshake(options=o)
    ts = lambda v: opts(ts=(v, 1))  # noqa: E731
    peer.send(ACK | PSH, seq, ack, b"new", options=ts(2000))
    peer.out()
    peer.send(ACK | PSH, seq + 3, ack, b"old", options=ts(1500))
    (a,) = peer.out()
    assert bytes(peer.server_user.data) == b"new" and a.ack == seq + 3
    assert peer.iface.counters["tcp.paws_rejected"] == 1


@pytest.mark.parametrize("flags", [SYN | FIN, ACK | FIN | RST | SYN, 0])
def test_odd_flag_combinations_do_not_break_a_connection(flags):
    peer, conn, seq, ack = established()
    peer.send(flags, seq, ack)
    peer.out()
    assert peer.iface.counters["stack.internal_errors"] == 0


# -- the remaining arrows of the state diagram ------------------------------------------------


def test_rst_in_syn_received_returns_to_listen():
    peer = Peer()
    peer.listen()
    peer.send(SYN, 1000, options=opts(mss=1460))
    (synack,) = peer.out()
    peer.send(RST, 1001)
    assert peer.iface.tcp.connections == {} and 80 in peer.iface.tcp.listeners
    peer.send(SYN, 2000, options=opts(mss=1460))  # the listener still answers
    assert peer.out()[0].flags == SYN | ACK


def test_close_in_syn_received_sends_fin_after_establishment():
    peer = Peer()
    peer.listen()
    peer.send(SYN, 1000, options=opts(mss=1460))
    (synack,) = peer.out()
    conn = peer.iface.tcp.connections[next(iter(peer.iface.tcp.connections))]
    conn.close()
    assert peer.out() == []  # RFC 9293 3.10.4: queue the FIN until ESTABLISHED
    peer.send(ACK, 1001, synack.seq + 1)
    (fin,) = peer.out()
    assert fin.flags & FIN and conn.state_name == "FIN-WAIT-1"


def test_close_in_syn_sent_forgets_the_connection():
    peer = Peer()
    conn = peer.iface.tcp.connect(bytes([10, 77, 0, 1]), 5000, peer.now)
    conn.user = User()
    peer.out()
    conn.close()
    assert peer.iface.tcp.connections == {} and peer.iface.next_deadline() is None


def test_fin_acking_our_fin_goes_straight_to_time_wait():
    peer = Peer(TcpConfig(msl=1.0))
    peer.listen()
    conn, seq, ack = peer.handshake()
    conn.close()
    peer.out()
    peer.send(FIN | ACK, seq, ack + 1)  # acks our FIN and carries theirs
    (a,) = peer.out()
    assert a.ack == seq + 1 and state_name(peer.iface.tcp, conn) == "TIME-WAIT"


def test_rst_in_close_wait_and_last_ack_closes_quietly():
    peer = Peer()
    peer.listen()
    conn, seq, ack = peer.handshake()
    peer.send(FIN | ACK, seq, ack)
    peer.out()
    conn.close()
    peer.out()
    assert conn.state_name == "LAST-ACK"
    peer.send(RST, seq + 1)
    assert peer.iface.tcp.connections == {} and peer.server_user.closed == [None]
