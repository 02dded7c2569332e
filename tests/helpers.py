"""Frames built with dpkt, the independent oracle: tests never build input with our codecs."""

from __future__ import annotations

import socket

import dpkt

STACK_MAC = bytes.fromhex("02000a4d0002")
STACK_IP = socket.inet_aton("10.77.0.2")
HOST_MAC = bytes.fromhex("02aabbccdd01")
HOST_IP = socket.inet_aton("10.77.0.1")
BROADCAST = b"\xff" * 6


def eth(payload: bytes | dpkt.Packet, ethertype: int = dpkt.ethernet.ETH_TYPE_IP,
        dst: bytes = STACK_MAC, src: bytes = HOST_MAC) -> bytes:
    return bytes(dpkt.ethernet.Ethernet(dst=dst, src=src, type=ethertype, data=bytes(payload)))


def arp(op: int, sha: bytes, spa: bytes, tha: bytes, tpa: bytes) -> dpkt.arp.ARP:
    return dpkt.arp.ARP(op=op, sha=sha, spa=spa, tha=tha, tpa=tpa)


def arp_frame(op: int = dpkt.arp.ARP_OP_REQUEST, sha: bytes = HOST_MAC, spa: bytes = HOST_IP,
              tha: bytes = b"\x00" * 6, tpa: bytes = STACK_IP,
              dst: bytes = BROADCAST, src: bytes | None = None) -> bytes:
    return eth(arp(op, sha, spa, tha, tpa), dpkt.ethernet.ETH_TYPE_ARP, dst=dst,
               src=sha if src is None else src)


def ip_packet(payload: bytes | dpkt.Packet, p: int = dpkt.ip.IP_PROTO_ICMP,
              src: bytes = HOST_IP, dst: bytes = STACK_IP, **fields) -> bytes:
    pkt = dpkt.ip.IP(src=src, dst=dst, p=p, ttl=fields.pop("ttl", 64), data=bytes(payload),
                     **fields)
    return bytes(pkt)  # dpkt fills total length and header checksum


def echo_request(ident: int = 0x1234, seq: int = 1, data: bytes = b"abcdefgh" * 7) -> bytes:
    icmp = dpkt.icmp.ICMP(type=dpkt.icmp.ICMP_ECHO, code=0,
                          data=dpkt.icmp.ICMP.Echo(id=ident, seq=seq, data=data))
    return bytes(icmp)


def ping_frame(ident: int = 0x1234, seq: int = 1, data: bytes = b"abcdefgh" * 7,
               **ip_fields) -> bytes:
    return eth(ip_packet(echo_request(ident, seq, data), **ip_fields))


def with_byte(frame: bytes, offset: int, value: int) -> bytes:
    b = bytearray(frame)
    b[offset] = value
    return bytes(b)
