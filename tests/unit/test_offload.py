"""Offloads: the virtio-net header, TSO frames we build, GSO super-frames we accept."""

import random
import struct

import dpkt

from stack.net.host import Host, HostConfig
from stack.wire.checksum import checksum_ok, pseudo_header_sum
from stack.wire.tcp import build_tcp_offloaded
from stack.wire.virtio import (
    F_DATA_VALID,
    F_NEEDS_CSUM,
    GSO_TCPV4,
    VNET_HDR,
    as_captured,
    checksum_trusted,
    offload_mode,
    tcp_offload_header,
)
from tests.helpers import HOST_IP, HOST_MAC, STACK_IP, STACK_MAC, arp_frame
from tests.unit.tcp_peer import ACK, SYN, User, opts


def test_virtio_header_golden():
    gso = tcp_offload_header(20, 32, 60000, 1448)
    assert gso == struct.pack("<BBHHHH", 1, 1, 66, 1448, 34, 16)
    assert tcp_offload_header(20, 32, 1000, 1448) == struct.pack("<BBHHHH", 1, 0, 0, 0, 34, 16)
    assert checksum_trusted(bytes([F_NEEDS_CSUM]) + bytes(9))
    assert checksum_trusted(bytes([F_DATA_VALID]) + bytes(9))
    assert not checksum_trusted(bytes(10))


def tcp_frame(flags, seq, ack, data=b"", options=b"", corrupt_checksum=False) -> bytes:
    tcp = dpkt.tcp.TCP(sport=40000, dport=80, seq=seq, ack=ack, flags=flags, win=65535,
                       opts=options, data=data)
    tcp.off = (20 + len(options)) // 4
    ip = dpkt.ip.IP(src=HOST_IP, dst=STACK_IP, p=6, ttl=64, data=tcp)
    raw = bytes(ip)
    if corrupt_checksum:  # what a GSO super-frame carries: not a finished checksum
        raw = raw[:36] + b"\x12\x34" + raw[38:]
    return bytes(dpkt.ethernet.Ethernet(dst=STACK_MAC, src=HOST_MAC, type=0x0800)) + raw


def offloaded_stack(mode="tso"):
    iface = Host(HostConfig(mac=STACK_MAC, address=STACK_IP, gateway=HOST_IP,
                            offload=mode), random.Random(5))
    iface.receive(arp_frame(), 0.0)
    iface.poll(0.0)
    users = []

    def accept(conn):
        conn.user = User()
        users.append(conn)

    iface.tcp.listen(80, accept)
    iface.receive(tcp_frame(SYN, 1000, 0, options=opts(mss=1460, wscale=7, ts=(9, 0))), 0.0)
    (synack,) = iface.poll(0.0)
    frame, header = synack
    ours = dpkt.ethernet.Ethernet(frame).data.data
    ts_ecr = struct.unpack("!II", dict(dpkt.tcp.parse_opts(ours.opts))[8])[0]
    iface.receive(tcp_frame(ACK, 1001, ours.seq + 1, options=opts(ts=(10, ts_ecr))), 0.0)
    return iface, users[0], ours.seq + 1


def test_tso_frames_carry_up_to_64kb_and_a_pseudo_header_checksum_seed():
    iface, conn, snd = offloaded_stack()
    conn.send(bytes(range(256)) * 1000)  # 256,000 bytes
    out = iface.poll(0.1)
    assert out and all(type(f) is tuple for f in out)
    frame, header = out[0]
    flags, gso_type, hdr_len, gso_size, csum_start, csum_offset = VNET_HDR.unpack(header)
    ip = dpkt.ethernet.Ethernet(frame).data
    tcp = ip.data
    payload = len(tcp.data)
    assert payload == 10 * 1448  # the initial window (RFC 6928), in one frame
    assert len(frame) <= 14 + 65535 and ip.len == len(frame) - 14
    assert conn.eff_mss == 1448  # 1460 minus the timestamp option
    assert (flags, gso_type, gso_size) == (F_NEEDS_CSUM, GSO_TCPV4, 1448)
    assert (hdr_len, csum_start, csum_offset) == (14 + 20 + 32, 34, 16)
    # the checksum field: folded, not inverted, pseudo-header sum over the TCP length
    words = struct.unpack("!4H", STACK_IP + HOST_IP)
    seed = sum(words) + 6 + (len(frame) - 34)
    while seed >> 16:
        seed = (seed & 0xFFFF) + (seed >> 16)
    assert tcp.sum == seed
    assert ip.df and iface.counters["tcp.tso_frames"] >= 1
    assert len(out) == 1
    # as the window opens, frames grow to the largest whole number of MSS under 64 KB
    acked = 1001
    una = snd + payload
    biggest = payload
    for step in range(4):
        iface.receive(tcp_frame(ACK, acked, una), 0.2 + step / 10)
        for f, _ in iface.poll(0.2 + step / 10):
            n = len(dpkt.ethernet.Ethernet(f).data.data.data)
            biggest = max(biggest, n)
            una += n
    assert biggest == (65535 - 80) // 1448 * 1448


def test_gso_super_frames_are_accepted_when_the_kernel_owns_the_checksum():
    iface, conn, snd = offloaded_stack()
    big = bytes(range(256)) * 250  # 64,000 bytes in one segment
    iface.receive(tcp_frame(ACK, 1001, snd, big, corrupt_checksum=True), 0.1,
                  checksum_trusted=True)
    assert bytes(conn.user.data) == big
    iface.receive(tcp_frame(ACK, 1001 + len(big), snd, b"tail", corrupt_checksum=True), 0.2)
    assert bytes(conn.user.data) == big  # not trusted: verified, and this one is bad
    assert iface.counters["tcp.rx_bad_checksum"] == 1


def test_offload_modes_from_flags_and_files():
    assert [offload_mode(v) for v in (None, False, True, "csum", "tso")] == \
        ["", "", "tso", "csum", "tso"]
    for bad in ("yes", "gso", 1):
        try:
            offload_mode(bad)
        except ValueError as exc:
            assert "not an offload mode" in str(exc)
        else:
            raise AssertionError(f"{bad!r} was taken")


def test_checksum_offload_sends_mtu_sized_frames_the_kernel_finishes():
    """--offload csum: every segment is one MSS at most, leaves with NEEDS_CSUM and no
    GSO, carries the pseudo-header sum the general offload path would put there, and
    is, once the kernel (here: as_captured) finishes the sum, a correct TCP segment."""
    iface, conn, snd = offloaded_stack("csum")
    data = bytes(random.Random(3).randrange(256) for _ in range(20000))
    conn.send(data)
    out = iface.poll(0.1)
    assert len(out) == 10 and all(type(f) is tuple for f in out)  # the initial window
    assert conn.frame_template is not None and conn.frame_template.vnet is not None
    for frame, header in out:
        assert header == VNET_HDR.pack(F_NEEDS_CSUM, 0, 0, 0, 34, 16)
        ip = dpkt.ethernet.Ethernet(bytes(frame)).data
        tcp = ip.data
        assert len(tcp.data) == conn.eff_mss and len(frame) <= 14 + 1500
        want = build_tcp_offloaded(STACK_IP, HOST_IP, 80, 40000, tcp.seq, tcp.ack, tcp.flags,
                                   tcp.win, bytes(frame[54:34 + tcp.off * 4]), tcp.data)
        assert bytes(frame[34:]) == want  # what the general offload path would send
        segment = bytes(frame[34:])
        assert not checksum_ok(segment, pseudo_header_sum(STACK_IP, HOST_IP, 6, len(segment)))
        finished = bytes(as_captured(frame, header))[34:]
        assert checksum_ok(finished, pseudo_header_sum(STACK_IP, HOST_IP, 6, len(finished)))
        assert finished[:16] == segment[:16] and finished[18:] == segment[18:]


def test_as_captured_finishes_udp_and_leaves_plain_frames_alone():
    udp = dpkt.udp.UDP(sport=53, dport=40000, data=b"x" * 33)
    udp.ulen = len(udp)
    ip = dpkt.ip.IP(src=STACK_IP, dst=HOST_IP, p=17, ttl=64, data=udp)
    raw = bytearray(bytes(dpkt.ethernet.Ethernet(dst=HOST_MAC, src=STACK_MAC, type=0x0800,
                                                 data=ip)))
    seed = pseudo_header_sum(STACK_IP, HOST_IP, 17, len(udp)) % 0xFFFF
    raw[40:42] = seed.to_bytes(2, "big")
    header = VNET_HDR.pack(F_NEEDS_CSUM, 0, 0, 0, 34, 6)
    done = bytes(as_captured(raw, header))
    assert checksum_ok(done[34:], pseudo_header_sum(STACK_IP, HOST_IP, 17, len(udp)))
    assert dpkt.ethernet.Ethernet(done).data.data.data == b"x" * 33
    assert as_captured(raw, None) is raw and as_captured(raw, bytes(10)) is raw
