"""Fuzzing `Host.receive` with well-formed outer layers and hostile TCP/UDP/ICMP
inside (valid checksums, so the engines themselves are exercised). The budget is
FUZZ_EXAMPLES (default 1000 per target); `make fuzz` runs a much larger one."""

import os
import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stack.net.host import Host, HostConfig
from stack.net.tcp.connection import CLOSED, SYN_RECEIVED, SYN_SENT
from stack.net.tcp.seq import seq_add, seq_le, seq_lt
from stack.wire.checksum import internet_checksum
from stack.wire.ipv4 import build_ipv4
from tests.helpers import HOST_IP, STACK_IP, STACK_MAC, arp_frame, eth
from tests.unit.tcp_peer import User

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "1000"))
SETTINGS = settings(max_examples=EXAMPLES, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def stack_with_a_connection():
    iface = Host(HostConfig(mac=STACK_MAC, address=STACK_IP, gateway=HOST_IP),
                      random.Random(0))
    iface.receive(arp_frame(), 0.0)
    iface.tcp.listen(80, lambda conn: setattr(conn, "user", User()))
    iface.udp.bind(7, type("U", (), {"on_datagram": lambda *a: None,
                                     "on_error": lambda *a: None})())
    return iface


def check_invariants(iface) -> None:
    """What must hold after any input: sequence order, bounded and well-formed buffers,
    state counts that match the table."""
    tcp = iface.tcp
    counted = [0] * len(tcp.state_counts)
    for key, conn in tcp.connections.items():
        assert conn.state != CLOSED, "a closed connection left in the table"
        assert key == (conn.remote_ip, conn.remote_port, conn.local_ip, conn.local_port)
        counted[conn.state] += 1
        if conn.state not in (SYN_SENT, SYN_RECEIVED):
            assert seq_le(conn.snd_una, conn.snd_nxt) and seq_le(conn.snd_nxt, conn.snd_max), \
                (conn.snd_una, conn.snd_nxt, conn.snd_max)
        ooo = conn.ooo
        assert ooo.bytes == sum(len(b) for _, b in ooo.blocks) <= ooo.limit
        assert len(ooo.blocks) <= ooo.max_blocks
        for (s1, b1), (s2, _) in zip(ooo.blocks, ooo.blocks[1:], strict=False):
            assert seq_lt(seq_add(s1, len(b1)), s2), "out-of-order blocks overlap or touch"
        assert seq_le(conn.snd_buf.start, conn.snd_buf.end)
    assert counted == tcp.state_counts, (counted, tcp.state_counts)
    assert len(tcp.time_wait) <= tcp.time_wait.limit
    assert iface.counters["stack.internal_errors"] == 0, iface.last_internal_error


def ip_frame(proto: int, segment: bytes, csum_at: int | None, frag: int = 0) -> bytes:
    if csum_at is not None and len(segment) >= csum_at + 2:
        seg = bytearray(segment)
        seg[csum_at:csum_at + 2] = b"\0\0"
        pseudo = int.from_bytes(HOST_IP + STACK_IP, "big") + proto + len(seg)
        value = internet_checksum(seg, pseudo) if proto != 1 else internet_checksum(seg)
        seg[csum_at:csum_at + 2] = value.to_bytes(2, "big")
        segment = bytes(seg)
    return eth(build_ipv4(HOST_IP, STACK_IP, proto, len(segment), 1, flags_fragment=frag)
               + segment)


tcp_segments = st.builds(
    lambda sport, seq, ack, off, flags, win, urg, opts, data: (
        sport.to_bytes(2, "big") + (80).to_bytes(2, "big") + seq.to_bytes(4, "big")
        + ack.to_bytes(4, "big") + bytes([off << 4, flags]) + win.to_bytes(2, "big")
        + b"\0\0" + urg.to_bytes(2, "big") + opts + data),
    st.sampled_from([40000, 40001]), st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1),
    st.integers(0, 15), st.integers(0, 255), st.integers(0, 65535), st.integers(0, 65535),
    st.binary(max_size=40), st.binary(max_size=64))


@SETTINGS
@given(st.lists(tcp_segments, min_size=1, max_size=12))
def test_tcp_segments_never_break_the_stack(segments):
    iface = stack_with_a_connection()
    now = 0.0
    for segment in segments:
        iface.receive(ip_frame(6, segment, 16), now)
        iface.poll(now)
        check_invariants(iface)
        now += 0.05
    for _ in range(5):  # let the timers run over whatever state was made
        now = (iface.next_deadline() or now) + 0.001
        iface.poll(now)
        check_invariants(iface)


@SETTINGS
@given(st.integers(0, 2), st.binary(min_size=0, max_size=120), st.booleans(),
       st.integers(0, 0x3FFF))
def test_udp_icmp_and_fragments_never_break_the_stack(which, body, fix_csum, frag):
    iface = stack_with_a_connection()
    proto, csum_at = [(17, 6), (1, 2), (6, 16)][which]
    iface.receive(ip_frame(proto, body, csum_at if fix_csum else None, frag), 0.0)
    iface.poll(0.0)
    iface.poll(31.0)  # reassembly timeouts
    assert iface.counters["stack.internal_errors"] == 0, iface.last_internal_error


def handshake(iface) -> tuple[int, int]:
    """Open a connection from port 40000; returns (our next seq, their next seq)."""
    import dpkt

    syn = dpkt.tcp.TCP(sport=40000, dport=80, seq=1000, flags=0x02, win=65535,
                       opts=b"\x02\x04\x05\xb4\x04\x02\x08\x0a\x00\x00\x00\x01\x00\x00\x00\x00"
                            b"\x01\x03\x03\x07")
    syn.off = (20 + len(syn.opts)) // 4
    iface.receive(ip_frame(6, bytes(syn), 16), 0.0)
    out = [dpkt.ethernet.Ethernet(f) for f in iface.poll(0.0)]
    synack = next(e.data.data for e in out if e.type == 0x0800)
    ack = dpkt.tcp.TCP(sport=40000, dport=80, seq=1001, ack=synack.seq + 1, flags=0x10,
                       win=512)
    iface.receive(ip_frame(6, bytes(ack), 16), 0.0)
    return 1001, synack.seq + 1


established_segments = st.lists(st.tuples(
    st.integers(-70000, 70000), st.integers(-70000, 70000), st.integers(0, 255),
    st.integers(0, 65535), st.binary(max_size=24), st.binary(max_size=200),
    st.booleans()), min_size=1, max_size=20)


@SETTINGS
@given(established_segments)
def test_segments_on_an_established_connection_never_break_it(segments):
    iface = stack_with_a_connection()
    seq0, ack0 = handshake(iface)
    (conn,) = iface.tcp.connections.values()
    conn.send(b"x" * 5000)
    now = 0.0
    for dseq, dack, flags, win, opts, data, ts in segments:
        if ts:
            opts = b"\x01\x01\x08\x0a" + (int(now * 1000) + 5).to_bytes(4, "big") + \
                b"\x00\x00\x00\x01" + opts[:16]
        opts = opts + b"\x00" * (-len(opts) % 4)
        header = (40000).to_bytes(2, "big") + (80).to_bytes(2, "big") + \
            ((seq0 + dseq) % 2**32).to_bytes(4, "big") + \
            ((ack0 + dack) % 2**32).to_bytes(4, "big") + \
            bytes([(20 + len(opts)) // 4 << 4, flags]) + win.to_bytes(2, "big") + \
            b"\0\0\0\0"
        iface.receive(ip_frame(6, header + opts + data, 16), now)
        iface.poll(now)
        check_invariants(iface)
        now += 0.01
    for _ in range(8):
        now = (iface.next_deadline() or now) + 0.001
        iface.poll(now)
        check_invariants(iface)
