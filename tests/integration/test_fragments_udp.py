"""Fragments, UDP, ICMP errors and PMTUD against the kernel and crafted attacks."""

from __future__ import annotations

import hashlib
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import dpkt

from stack.apps.services import deterministic_sha256
from tests.helpers import STACK_IP as STACK_IP_BYTES
from tests.helpers import STACK_MAC, echo_request
from tests.integration.conftest import STACK_IP, in_ns

INJECT = str(Path(__file__).with_name("inject.py"))
HOST = bytes([10, 77, 0, 1])
SRC_MAC = bytes.fromhex("02aabbccddee")


def loss_free(r: subprocess.CompletedProcess) -> bool:
    return " 0% packet loss" in r.stdout


def inject(ns: str, frames: list[bytes], count: int = 1) -> None:
    r = in_ns(ns, sys.executable, INJECT, "tap0", str(count), *(f.hex() for f in frames))
    assert r.returncode == 0, r.stderr


def frame(ip: dpkt.ip.IP) -> bytes:
    return bytes(dpkt.ethernet.Ethernet(dst=STACK_MAC, src=SRC_MAC, type=0x0800, data=ip))


def frag(ident: int, offset: int, data: bytes, more: bool, p: int = 1) -> bytes:
    return frame(dpkt.ip.IP(src=HOST, dst=STACK_IP_BYTES, p=p, id=ident, ttl=64,
                            mf=int(more), offset=offset >> 3, data=data))


def test_big_pings_are_reassembled_and_answered_in_fragments(start_stack):
    st = start_stack(pcap=False)
    r = in_ns(st.ns, "ping", "-c", "3", "-i", "0.2", "-W", "2", "-s", "8000", STACK_IP)
    assert loss_free(r) and "8008 bytes from 10.77.0.2" in r.stdout, r.stdout
    r = in_ns(st.ns, "ping", "-c", "2", "-i", "0.5", "-W", "3", "-s", "65507", STACK_IP)
    assert loss_free(r) and "65515 bytes from 10.77.0.2" in r.stdout, r.stdout
    ipv4 = st.stats()["ipv4"]
    assert ipv4["reasm_ok"] == 5 and ipv4["tx_fragmented"] == 5


def test_udp_echo_of_30000_bytes_and_port_unreachable(start_stack):
    st = start_stack(pcap=False)
    code = """
import os, socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(3)
data = os.urandom(30000)
s.sendto(data, ("10.77.0.2", 7))
got, addr = s.recvfrom(65535)
print("echo", got == data, addr)
c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); c.settimeout(3)
c.connect(("10.77.0.2", 5555)); c.send(b"anyone?")
try:
    c.recv(100); print("no error")
except ConnectionRefusedError:
    print("refused")
"""
    r = in_ns(st.ns, sys.executable, "-c", code)
    assert "echo True ('10.77.0.2', 7)" in r.stdout and "refused" in r.stdout, r.stdout + r.stderr
    stats = st.stats()
    assert stats["udp"]["rx_no_port"] == 1 and stats["icmp"]["tx_errors"] == 1


def test_mtu_576(start_stack, tmp_path):
    st = start_stack("--mtu", "576", pcap=False)
    r = in_ns(st.ns, "ping", "-c", "3", "-i", "0.2", "-W", "2", "-s", "2000", STACK_IP)
    assert loss_free(r), r.stdout
    data = bytes(range(256)) * 4000
    r = subprocess.run(["ip", "netns", "exec", st.ns, "nc", "-N", STACK_IP, "7"], input=data,
                       capture_output=True, timeout=60)
    assert r.stdout == data
    segs = st.stats()["tcp"]
    assert segs["rx_segments"] > len(data) // 536  # MSS followed the 576-byte MTU


def test_crafted_fragment_attacks_are_counted_and_bounded(start_stack):
    st = start_stack(pcap=False)
    assert loss_free(in_ns(st.ns, "ping", "-c", "1", "-W", "2", STACK_IP))
    ping = echo_request(ident=1, seq=1, data=b"A" * 1200)
    attacks = [
        # overlapping: the second piece rewrites bytes of the first
        frag(100, 0, ping[:800], True), frag(100, 400, b"B" * 808, False),
        # ping of death: ends beyond 65,535
        frag(101, 65528, b"Z" * 100, False),
        # tiny first fragment of a TCP datagram (RFC 1858)
        frag(102, 0, b"12345678", True, p=6),
    ]
    inject(st.ns, attacks)
    time.sleep(0.2)
    ipv4 = st.stats()["ipv4"]
    assert ipv4["reasm_overlaps"] == 1 and ipv4["reasm_too_big"] == 1
    assert ipv4["reasm_tiny_first"] == 1 and st.stats()["icmp"]["tx_echo_replies"] == 1

    # a flood of first fragments that never complete, while a ping runs
    flood = [frag(1000 + i, 0, b"F" * 1400, True) for i in range(400)]
    pinger = {}

    def ping_during():
        pinger["r"] = in_ns(st.ns, "ping", "-c", "10", "-i", "0.1", "-W", "2", STACK_IP)

    t = threading.Thread(target=ping_during)
    t.start()
    for _ in range(5):
        inject(st.ns, flood)
    t.join(timeout=30)
    assert loss_free(pinger["r"]), pinger["r"].stdout
    stats = st.stats()["ipv4"]
    assert stats["reasm_datagrams_held"] <= 64 and stats["reasm_bytes_held"] <= 4 << 20
    assert stats["reasm_evicted"] >= 400 - 64
    assert loss_free(in_ns(st.ns, "ping", "-c", "3", "-i", "0.2", "-W", "2", STACK_IP))


def read_segments(pcap: Path) -> list[tuple[float, dpkt.ip.IP]]:
    out = []
    with open(pcap, "rb") as f:
        try:
            for ts, buf in dpkt.pcap.Reader(f):
                eth = dpkt.ethernet.Ethernet(buf)
                if eth.type == 0x0800:
                    out.append((ts, eth.data))
        except (dpkt.NeedData, ValueError):
            pass  # the writer is mid-record
    return out


def frag_needed(seg_ip: dpkt.ip.IP, mtu: int, seq: int) -> bytes:
    tcp = seg_ip.data
    quoted = bytes(seg_ip)[:seg_ip.hl * 4] + struct.pack("!HHI", tcp.sport, tcp.dport, seq)
    icmp = dpkt.icmp.ICMP(type=3, code=4, data=dpkt.icmp.ICMP.Unreach(mtu=mtu, data=quoted))
    return frame(dpkt.ip.IP(src=HOST, dst=STACK_IP_BYTES, p=1, ttl=64, data=icmp))


def test_pmtud_frag_needed_shrinks_a_live_connection(start_stack, tmp_path):
    st = start_stack()
    # A path that silently drops big packets (a PMTU black hole) until someone says why.
    in_ns(st.ns, "iptables", "-A", "INPUT", "-i", "tap0", "-p", "tcp", "--sport", "19",
          "-m", "length", "--length", "1001:65535", "-j", "DROP", check=True)
    out = tmp_path / "download"
    with open(out, "wb") as f:
        client = subprocess.Popen(["ip", "netns", "exec", st.ns, "nc", "-N", STACK_IP, "19"],
                                  stdin=subprocess.PIPE, stdout=f)
        client.stdin.write(b"2000000\n")
        client.stdin.flush()
        try:
            big = []
            for _ in range(50):
                time.sleep(0.1)
                big = [ip for _, ip in read_segments(st.pcap)
                       if ip.src == STACK_IP_BYTES and ip.p == 6 and ip.len > 1000]
                if big:
                    break
            assert big, "no large segment left tapstack"
            seg = big[-1]
            # one quoting a sequence number nowhere near the flight: ignored (RFC 5927)
            inject(st.ns, [frag_needed(seg, 1000, (seg.data.seq + 50_000_000) & 0xFFFFFFFF)])
            time.sleep(0.3)
            stats = st.stats()
            assert stats["tcp"]["icmp_bad_seq"] == 1 and stats["ipv4"]["pmtu_updates"] == 0
            sent_at = time.time()
            inject(st.ns, [frag_needed(seg, 1000, seg.data.seq)])
            client.stdin.close()
            assert client.wait(timeout=60) == 0
        finally:
            if client.poll() is None:
                client.kill()
    data = out.read_bytes()
    assert len(data) == 2_000_000
    assert hashlib.sha256(data).hexdigest() == deterministic_sha256(2_000_000)
    assert st.stats()["ipv4"]["pmtu_updates"] == 1
    # From the Frag Needed's arrival in tapstack's own capture (not the test's clock:
    # an RTO retransmission may leave between the injection and its arrival), plus
    # 10 ms for the flush in progress, which may already hold a full-size segment.
    frames = read_segments(st.pcap)
    arrived = max(ts for ts, ip in frames
                  if ip.p == 1 and ip.data.type == 3 and ip.data.code == 4
                  and bytes(ip.data.data.data)[24:28] == seg.data.seq.to_bytes(4, "big"))
    assert arrived >= sent_at
    after = [ip for ts, ip in frames
             if ts > arrived + 0.01 and ip.src == STACK_IP_BYTES and ip.p == 6]
    assert len(after) > 100 and max(ip.len for ip in after) <= 1000
