"""Codecs: golden bytes, and round trips against dpkt as the independent implementation."""

import dpkt
import pytest

from stack.wire.arp import OP_REPLY, OP_REQUEST, build_arp, parse_arp
from stack.wire.errors import MalformedError
from stack.wire.ethernet import (
    ETHERTYPE_ARP,
    build_ethernet,
    mac_from_str,
    mac_to_str,
    parse_ethernet,
)
from stack.wire.icmp import TYPE_ECHO_REPLY, build_echo, parse_echo
from stack.wire.ipv4 import (
    FLAG_DF,
    PROTO_UDP,
    build_ipv4,
    ip_from_str,
    ip_to_str,
    parse_ipv4,
)
from tests.helpers import HOST_IP, HOST_MAC, STACK_IP, STACK_MAC, echo_request, ip_packet


def test_mac_text_round_trip_and_errors():
    assert mac_from_str("02:00:0a:4d:00:02") == STACK_MAC
    assert mac_to_str(STACK_MAC) == "02:00:0a:4d:00:02"
    for bad in ("02:00:0a:4d:00", "zz:00:0a:4d:00:02", "0200.0a4d.0002", "123:0:0:0:0:0"):
        with pytest.raises(ValueError, match="not a MAC address"):
            mac_from_str(bad)


def test_ip_text_round_trip_and_errors():
    assert ip_from_str("10.77.0.2") == STACK_IP
    assert ip_to_str(HOST_IP) == "10.77.0.1"
    for bad in ("10.77.0", "10.77.0.256", "ten.0.0.1", ""):
        with pytest.raises(ValueError, match="not an IPv4 address"):
            ip_from_str(bad)


def test_ethernet_golden_and_dpkt():
    header = build_ethernet(HOST_MAC, STACK_MAC, ETHERTYPE_ARP)
    assert header == bytes.fromhex("02aabbccdd01" "02000a4d0002" "0806")
    parsed = dpkt.ethernet.Ethernet(header + bytes(28))
    assert (parsed.dst, parsed.src, parsed.type) == (HOST_MAC, STACK_MAC, ETHERTYPE_ARP)
    frame = bytes(dpkt.ethernet.Ethernet(dst=STACK_MAC, src=HOST_MAC, type=0x0800, data=b"x"))
    assert parse_ethernet(frame) == (STACK_MAC, HOST_MAC, 0x0800)
    with pytest.raises(MalformedError) as err:
        parse_ethernet(frame[:13])
    assert err.value.reason == "runt"


def test_arp_golden_and_dpkt_both_ways():
    ours = build_arp(OP_REPLY, STACK_MAC, STACK_IP, HOST_MAC, HOST_IP)
    assert ours == bytes.fromhex(
        "0001" "0800" "06" "04" "0002" "02000a4d0002" "0a4d0002" "02aabbccdd01" "0a4d0001")
    d = dpkt.arp.ARP(ours)
    assert (d.op, d.sha, d.spa, d.tha, d.tpa) == (2, STACK_MAC, STACK_IP, HOST_MAC, HOST_IP)
    theirs = bytes(dpkt.arp.ARP(op=1, sha=HOST_MAC, spa=HOST_IP, tha=bytes(6), tpa=STACK_IP))
    assert parse_arp(theirs) == (OP_REQUEST, HOST_MAC, HOST_IP, bytes(6), STACK_IP)


@pytest.mark.parametrize(("mutate", "reason"), [
    (lambda b: b[:27], "truncated"),
    (lambda b: b[:4] + b"\x08" + b[5:], "bad_format"),  # hardware length 8
    (lambda b: b[:5] + b"\x10" + b[6:], "bad_format"),  # protocol length 16
    (lambda b: b"\x00\x06" + b[2:], "bad_format"),  # IEEE 802 hardware type
    (lambda b: b[:6] + b"\x00\x03" + b[8:], "bad_opcode"),  # RARP request
])
def test_arp_malformed(mutate, reason):
    good = bytes(dpkt.arp.ARP(op=1, sha=HOST_MAC, spa=HOST_IP, tha=bytes(6), tpa=STACK_IP))
    with pytest.raises(MalformedError) as err:
        parse_arp(mutate(good))
    assert err.value.reason == reason


def test_ipv4_build_parses_in_dpkt_with_valid_checksum():
    header = build_ipv4(STACK_IP, HOST_IP, PROTO_UDP, 100, ident=0xBEEF, ttl=17, tos=0x10,
                        flags_fragment=FLAG_DF)
    d = dpkt.ip.IP(header + bytes(100))
    assert (d.v, d.hl, d.len, d.id, d.ttl, d.p, d.tos) == (4, 5, 120, 0xBEEF, 17, 17, 0x10)
    assert d.df and not d.mf and d.offset == 0
    assert (d.src, d.dst) == (STACK_IP, HOST_IP)
    claimed = d.sum
    d.sum = 0
    assert dpkt.ip.IP(bytes(d)).sum == claimed  # dpkt recomputes the same checksum


def test_ipv4_golden_header():
    header = build_ipv4(bytes([192, 168, 0, 1]), bytes([192, 168, 0, 199]), PROTO_UDP, 95,
                        ident=0, flags_fragment=FLAG_DF)
    assert header == bytes.fromhex("450000730000400040110000c0a80001c0a800c7"[:20] + "b861"
                                   + "c0a80001c0a800c7")


def test_ipv4_parse_dpkt_packet_with_options_and_fragment_fields():
    pkt = dpkt.ip.IP(src=HOST_IP, dst=STACK_IP, p=1, ttl=9, id=77, mf=1, offset=3,
                     hl=6, opts=b"\x01\x01\x01\x00", data=b"payload!")
    raw = bytes(pkt)
    ip = parse_ipv4(raw)
    assert ip.header_length == 24 and ip.total_length == len(raw)
    assert (ip.ident, ip.ttl, ip.protocol, ip.src, ip.dst) == (77, 9, 1, HOST_IP, STACK_IP)
    assert ip.more_fragments and ip.fragment_offset == 24 and ip.is_fragment


@pytest.mark.parametrize(("mutate", "reason"), [
    (lambda b: b[:19], "truncated"),
    (lambda b: b"\x65" + b[1:], "bad_version"),
    (lambda b: b"\x44" + b[1:], "bad_header_length"),
    (lambda b: b[:2] + (len(b) + 1).to_bytes(2, "big") + b[4:], "bad_total_length"),
    (lambda b: b[:2] + (19).to_bytes(2, "big") + b[4:], "bad_total_length"),
    (lambda b: b[:8] + bytes([b[8] ^ 1]) + b[9:], "bad_checksum"),
])
def test_ipv4_malformed(mutate, reason):
    good = ip_packet(echo_request())
    with pytest.raises(MalformedError) as err:
        parse_ipv4(mutate(good))
    assert err.value.reason == reason


def test_echo_round_trip_with_dpkt():
    ours = build_echo(TYPE_ECHO_REPLY, 0x1234, 7, b"hello world")
    d = dpkt.icmp.ICMP(ours)
    assert (d.type, d.code, d.data.id, d.data.seq, d.data.data) == (0, 0, 0x1234, 7,
                                                                    b"hello world")
    claimed = d.sum
    d.sum = 0
    assert dpkt.icmp.ICMP(bytes(d)).sum == claimed
    assert parse_echo(echo_request(ident=9, seq=65535)) == (8, 0, 9, 65535)
