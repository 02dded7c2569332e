"""The sans-I/O interface under a virtual clock: what goes in, what comes out, what is counted."""

import random

import dpkt
import pytest

from stack.net.arp import ArpConfig
from stack.net.host import Host, HostConfig
from tests.helpers import (
    BROADCAST,
    HOST_IP,
    HOST_MAC,
    STACK_IP,
    STACK_MAC,
    arp_frame,
    echo_request,
    eth,
    ip_packet,
    ping_frame,
    with_byte,
)

OTHER_IP = bytes([10, 77, 0, 99])
OTHER_MAC = bytes.fromhex("02aabbccdd63")


def make_iface(**arp) -> Host:
    config = HostConfig(mac=STACK_MAC, address=STACK_IP, prefixlen=24, gateway=HOST_IP,
                             arp=ArpConfig(**arp))
    return Host(config, random.Random(1))


def learn_host(iface: Host, now: float = 0.0) -> None:
    """The host asks for us first, as the kernel does before its first ping."""
    iface.receive(arp_frame(), now)
    iface.poll(now)


def parse(frame: bytes) -> dpkt.ethernet.Ethernet:
    return dpkt.ethernet.Ethernet(frame)


def valid_checksums(ip: dpkt.ip.IP) -> bool:
    """Let dpkt recompute both checksums and compare with what we sent."""
    sent_ip, sent_icmp = ip.sum, ip.data.sum
    copy = dpkt.ip.IP(bytes(ip))
    copy.sum = 0
    copy.data.sum = 0
    again = dpkt.ip.IP(bytes(copy))
    return (again.sum, again.data.sum) == (sent_ip, sent_icmp)


# -- ARP ------------------------------------------------------------------------------------


def test_start_announces_twice_two_seconds_apart():
    iface = make_iface()
    iface.start(0.0)
    first = iface.poll(0.0)
    assert len(first) == 1
    e = parse(first[0])
    assert e.dst == BROADCAST and e.src == STACK_MAC and e.type == dpkt.ethernet.ETH_TYPE_ARP
    assert (e.data.op, e.data.spa, e.data.tpa, e.data.sha) == (1, STACK_IP, STACK_IP,
                                                               STACK_MAC)
    assert iface.next_deadline() == 2.0
    assert iface.poll(1.9) == []
    assert len(iface.poll(2.0)) == 1
    assert iface.next_deadline() is None  # nothing left to do: no timer at all


def test_request_for_our_address_gets_a_reply_and_teaches_us_the_sender():
    iface = make_iface()
    iface.receive(arp_frame(), 0.0)
    (frame,) = iface.poll(0.0)
    e = parse(frame)
    assert (e.dst, e.src) == (HOST_MAC, STACK_MAC)
    assert (e.data.op, e.data.sha, e.data.spa, e.data.tha, e.data.tpa) == (
        2, STACK_MAC, STACK_IP, HOST_MAC, HOST_IP)
    assert iface.arp.lookup(HOST_IP, 1.0) == HOST_MAC
    assert iface.counters["arp.tx_replies"] == 1


def test_request_for_another_address_is_ignored_and_learns_nothing():
    iface = make_iface()
    iface.receive(arp_frame(tpa=OTHER_IP), 0.0)
    assert iface.poll(0.0) == []
    assert iface.counters["arp.rx_not_for_us"] == 1
    assert iface.arp.cache == {}


def test_unsolicited_reply_creates_no_entry_but_refreshes_an_existing_one():
    iface = make_iface()
    iface.receive(arp_frame(op=2, sha=OTHER_MAC, spa=OTHER_IP, tpa=STACK_IP), 0.0)
    assert OTHER_IP not in iface.arp.cache
    assert iface.counters["arp.unsolicited_replies"] == 1
    learn_host(iface)
    new_mac = bytes.fromhex("02aabbccddee")
    iface.receive(arp_frame(op=2, sha=new_mac, spa=HOST_IP, tpa=STACK_IP), 30.0)
    assert iface.arp.lookup(HOST_IP, 80.0) == new_mac  # refreshed at 30 s: valid to 90 s


def test_someone_else_claiming_our_address_is_counted():
    iface = make_iface()
    iface.receive(arp_frame(sha=OTHER_MAC, spa=STACK_IP, tpa=STACK_IP), 0.0)
    assert iface.counters["arp.address_conflicts"] == 1
    assert iface.poll(0.0) == []


def test_entries_age_out():
    iface = make_iface(cache_ttl=60.0)
    learn_host(iface, 0.0)
    assert iface.arp.lookup(HOST_IP, 59.0) == HOST_MAC
    assert iface.arp.lookup(HOST_IP, 61.0) is None
    assert iface.counters["arp.cache_expired"] == 1


def test_cache_is_bounded_and_evicts_the_oldest():
    iface = make_iface(cache_size=4)
    for i in range(10, 16):
        mac = bytes([2, 0, 0, 0, 0, i])
        iface.receive(arp_frame(sha=mac, spa=bytes([10, 77, 0, i])), float(i))
    assert len(iface.arp.cache) == 4
    assert set(iface.arp.cache) == {bytes([10, 77, 0, i]) for i in range(12, 16)}
    assert iface.counters["arp.cache_evictions"] == 2


# -- resolution of next hops ------------------------------------------------------------------


def test_reply_to_unknown_host_waits_for_arp_then_goes_out():
    iface = make_iface()
    iface.receive(ping_frame(seq=5), 0.0)
    (request,) = iface.poll(0.0)
    e = parse(request)
    assert e.dst == BROADCAST and e.data.op == 1 and e.data.tpa == HOST_IP
    iface.receive(arp_frame(op=2, tpa=STACK_IP, tha=STACK_MAC, dst=STACK_MAC), 0.01)
    (reply,) = iface.poll(0.01)
    e = parse(reply)
    assert e.dst == HOST_MAC and e.data.data.type == 0 and e.data.data.data.seq == 5


def test_resolution_retries_then_gives_up_and_drops_the_queue():
    iface = make_iface(retries=3, retry_interval=1.0)
    for seq in range(3):
        iface.receive(ping_frame(seq=seq), 0.0)
    assert len(iface.poll(0.0)) == 1  # one ARP request, not one per queued packet
    assert iface.next_deadline() == 1.0
    assert len(iface.poll(1.0)) == 1
    assert len(iface.poll(2.0)) == 1
    assert iface.poll(3.0) == []
    c = iface.counters
    assert (c["arp.tx_requests"], c["arp.resolve_failed"], c["arp.resolve_dropped_packets"]) == (
        3, 1, 3)
    assert iface.next_deadline() is None and iface.arp.pending == {}


def test_pending_queue_and_pending_table_are_bounded():
    iface = make_iface(queue_per_neighbour=2, max_pending=1)
    for seq in range(5):
        iface.receive(ping_frame(seq=seq), 0.0)
    other = ping_frame(seq=9, src=bytes([10, 77, 0, 50]))
    iface.receive(other, 0.0)
    assert iface.counters["arp.queue_overflow"] == 3
    assert iface.counters["arp.pending_overflow"] == 1
    iface.poll(0.0)
    iface.receive(arp_frame(op=2, tpa=STACK_IP, tha=STACK_MAC, dst=STACK_MAC), 0.1)
    seqs = [parse(f).data.data.data.seq for f in iface.poll(0.1)]
    assert seqs == [3, 4]  # the newest two were kept


# -- ICMP echo ----------------------------------------------------------------------------------


def test_echo_reply_carries_identifier_sequence_and_data():
    iface = make_iface()
    learn_host(iface)
    data = bytes(range(256)) * 5
    iface.receive(ping_frame(ident=0xABCD, seq=42, data=data, tos=0x10), 1.0)
    (frame,) = iface.poll(1.0)
    e = parse(frame)
    ip = e.data
    assert (e.src, e.dst) == (STACK_MAC, HOST_MAC)
    assert (ip.src, ip.dst, ip.p, ip.ttl, ip.tos) == (STACK_IP, HOST_IP, 1, 64, 0x10)
    assert (ip.data.type, ip.data.code) == (0, 0)
    assert (ip.data.data.id, ip.data.data.seq, ip.data.data.data) == (0xABCD, 42, data)
    assert valid_checksums(ip)


def test_ethernet_padding_is_not_echoed():
    iface = make_iface()
    learn_host(iface)
    frame = ping_frame(data=b"")  # 42 bytes: a real NIC pads it to 60
    iface.receive(frame + bytes(18), 0.0)
    (reply,) = iface.poll(0.0)
    assert parse(reply).data.data.data.data == b""
    assert len(reply) == len(frame)


def test_ip_options_are_skipped_and_the_ping_answered():
    iface = make_iface()
    learn_host(iface)
    pkt = dpkt.ip.IP(src=HOST_IP, dst=STACK_IP, p=1, ttl=64, hl=6, opts=b"\x01\x01\x01\x00",
                     data=echo_request(seq=3))
    iface.receive(eth(bytes(pkt)), 0.0)
    (reply,) = iface.poll(0.0)
    assert parse(reply).data.data.data.seq == 3
    assert iface.counters["ipv4.rx_options_skipped"] == 1


def test_broadcast_echo_is_ignored():
    iface = make_iface()
    learn_host(iface)
    for dst in (b"\xff\xff\xff\xff", bytes([10, 77, 0, 255])):
        iface.receive(eth(ip_packet(echo_request(), dst=dst), dst=BROADCAST), 0.0)
    assert iface.poll(0.0) == []
    assert iface.counters["icmp.rx_broadcast_echo_ignored"] == 2


# -- malformed input: each case ends in its own counter -----------------------------------------

GOOD = ping_frame()
IP_START = 14


MALFORMED = [
    ("runt", GOOD[:13], "eth.rx_runt"),
    ("other unicast MAC", eth(ip_packet(echo_request()), dst=OTHER_MAC), "eth.rx_not_for_us"),
    ("multicast MAC", eth(ip_packet(echo_request()), dst=bytes.fromhex("01005e000001")),
     "eth.rx_not_for_us"),
    ("multicast source MAC", eth(ip_packet(echo_request()), src=bytes.fromhex("03aabbccdd01")),
     "eth.rx_bad_source"),
    ("IPv6", eth(b"\x60" + bytes(39), ethertype=0x86DD), "eth.rx_unknown_ethertype"),
    ("truncated IPv4", GOOD[:IP_START + 10], "ipv4.rx_truncated"),
    ("IPv4 version 6", with_byte(GOOD, IP_START, 0x65), "ipv4.rx_bad_version"),
    ("IHL 4", with_byte(GOOD, IP_START, 0x44), "ipv4.rx_bad_header_length"),
    ("total length past the frame", GOOD[:-8], "ipv4.rx_bad_total_length"),
    ("bad header checksum", with_byte(GOOD, IP_START + 10, GOOD[IP_START + 10] ^ 0xFF),
     "ipv4.rx_bad_checksum"),
    ("not our address", eth(ip_packet(echo_request(), dst=OTHER_IP)), "ipv4.rx_not_for_us"),
    ("source is our address", eth(ip_packet(echo_request(), src=STACK_IP)),
     "ipv4.rx_bad_source"),
    ("source is broadcast", eth(ip_packet(echo_request(), src=b"\xff" * 4)),
     "ipv4.rx_bad_source"),
    ("source is loopback", eth(ip_packet(echo_request(), src=bytes([127, 0, 0, 1]))),
     "ipv4.rx_bad_source"),
    ("TTL 0", eth(ip_packet(echo_request(), ttl=0)), "ipv4.rx_ttl_zero"),
    ("unknown protocol to broadcast", eth(ip_packet(b"abcd", p=200, dst=b"\xff" * 4),
                                          dst=BROADCAST), "ipv4.rx_unknown_protocol"),
    ("truncated ICMP", eth(ip_packet(b"\x08\x00\x00")), "icmp.rx_truncated"),
    ("bad ICMP checksum", with_byte(GOOD, len(GOOD) - 1, GOOD[-1] ^ 1),
     "icmp.rx_bad_checksum"),
    ("truncated ARP", arp_frame()[:30], "arp.rx_truncated"),
    ("ARP with 8-byte hardware addresses", with_byte(arp_frame(), 18, 8), "arp.rx_bad_format"),
    ("ARP opcode 3", with_byte(arp_frame(), 21, 3), "arp.rx_bad_opcode"),
    ("ARP from a broadcast MAC", arp_frame(sha=BROADCAST, src=HOST_MAC), "arp.rx_bad_sender"),
]


@pytest.mark.parametrize(("frame", "counter"), [m[1:] for m in MALFORMED],
                         ids=[m[0] for m in MALFORMED])
def test_malformed_frame_is_dropped_and_counted(frame, counter):
    iface = make_iface()
    learn_host(iface)
    before = dict(iface.counters)
    iface.receive(frame, 1.0)
    assert iface.poll(1.0) == []
    changed = {k for k, v in iface.counters.items() if v != before.get(k, 0)}
    drops = {k for k in changed if not k.endswith(("_frames", "_bytes", "_packets",
                                                   "_messages", "_requests", "_replies",
                                                   "_delivered"))}
    assert drops == {counter}
    assert iface.counters["stack.internal_errors"] == 0
    # and the stack still answers afterwards
    iface.receive(ping_frame(seq=77), 2.0)
    (reply,) = iface.poll(2.0)
    assert parse(reply).data.data.data.seq == 77


def test_unknown_protocol_gets_protocol_unreachable():
    iface = make_iface()
    learn_host(iface)
    iface.receive(eth(ip_packet(b"abcdefghij", p=200)), 1.0)
    (frame,) = iface.poll(1.0)
    ip = parse(frame).data
    assert (ip.p, ip.data.type, ip.data.code) == (1, 3, 2)
    quoted = dpkt.ip.IP(bytes(ip.data.data.data))  # RFC 792: header + 8 bytes quoted
    assert quoted.p == 200 and bytes(quoted.data)[:8] == b"abcdefgh"
    assert iface.counters["icmp.tx_errors"] == 1
