"""tapstack on a TAP in a namespace, driven by the real ping, arping, tcpdump and tshark."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import dpkt

from tests.helpers import eth, ping_frame, with_byte
from tests.integration.conftest import (
    REPO,
    STACK_IP,
    STACK_MAC_TEXT,
    in_ns,
    netns_exists,
    require_tool,
    tapstack_cmd,
)

INJECT = str(Path(__file__).with_name("inject.py"))


def loss(output: str) -> float:
    m = re.search(r"([\d.]+)% packet loss", output)
    assert m, output
    return float(m.group(1))


def test_ping_five_and_ready_banner(start_stack):
    require_tool("ping")
    st = start_stack()
    banner = "\n".join(st.stdout_lines)
    assert f"tapstack ready: 10.77.0.2/24 ({STACK_MAC_TEXT}) on tap0 in namespace {st.ns}" in banner
    assert f"ip netns exec {st.ns} ping -c 3 {STACK_IP}" in banner
    assert f"ip netns exec {st.ns} tcpdump -ni tap0" in banner
    r = in_ns(st.ns, "ping", "-c", "5", "-i", "0.2", "-W", "2", STACK_IP)
    assert r.returncode == 0 and loss(r.stdout) == 0.0, r.stdout + r.stderr
    assert r.stdout.count(f"bytes from {STACK_IP}: icmp_seq=") == 5
    assert st.counter("icmp.tx_echo_replies") == 5
    # the stats command the banner prints works as printed, from the repository, with
    # nothing on PATH but the system's (a newcomer after make run)
    (line,) = [ln.strip() for ln in st.stdout_lines if " stats --netns" in ln]
    r = subprocess.run(line, shell=True, cwd=REPO, capture_output=True, text=True,
                       timeout=30, env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
    assert r.returncode == 0 and "tx_echo_replies" in r.stdout, (line, r.stderr)


def test_ping_full_size_frames(start_stack):
    st = start_stack()
    r = in_ns(st.ns, "ping", "-c", "3", "-i", "0.2", "-W", "2", "-s", "1472", "-M", "do",
              STACK_IP)
    assert loss(r.stdout) == 0.0, r.stdout + r.stderr
    assert "1480 bytes from 10.77.0.2" in r.stdout


def test_flood_ping_loses_nothing(start_stack):
    st = start_stack()
    r = in_ns(st.ns, "ping", "-f", "-c", "2000", "-W", "1", STACK_IP, timeout=60)
    assert re.search(r"2000 packets transmitted, 2000 received", r.stdout), r.stdout + r.stderr
    assert st.counter("icmp.tx_echo_replies") == 2000


def test_arping_gets_replies_and_unknown_address_is_ignored(start_stack):
    require_tool("arping")
    st = start_stack()
    r = in_ns(st.ns, "arping", "-c", "3", "-w", "5", "-I", "tap0", STACK_IP)
    assert "Received 3 response(s)" in r.stdout, r.stdout + r.stderr
    assert STACK_MAC_TEXT.upper() in r.stdout
    replies = st.counter("arp.tx_replies")
    r = in_ns(st.ns, "arping", "-c", "2", "-w", "3", "-I", "tap0", "10.77.0.99")
    assert "Received 0 response(s)" in r.stdout, r.stdout + r.stderr
    stats = st.stats()
    assert stats["arp"]["tx_replies"] == replies
    assert stats["arp"]["rx_not_for_us"] >= 2


def test_gratuitous_arp_seen_by_tcpdump_and_found_namespace_is_kept(start_stack, netns,
                                                                    tmp_path):
    require_tool("tcpdump")
    cap = tmp_path / "garp.pcap"
    # "-i any" also captures devices created after tcpdump starts: the TAP does not exist yet.
    # --immediate-mode: without it the last frames sit in the capture ring when we stop.
    dump = subprocess.Popen(["ip", "netns", "exec", netns, "tcpdump", "-i", "any",
                             "--immediate-mode", "-U", "-n", "-w", str(cap), "arp"],
                            stderr=subprocess.PIPE, text=True)
    try:
        for line in dump.stderr:  # "data link type ...", then "listening on any ..."
            if "listening on" in line:
                break
        st = start_stack(ns=netns)
        time.sleep(2.5)  # the second announcement comes two seconds after the first
    finally:
        dump.send_signal(signal.SIGINT)
        dump.communicate(timeout=10)
    text = subprocess.run(["tcpdump", "-n", "-r", str(cap)], capture_output=True, text=True,
                          check=True).stdout
    announcements = [ln for ln in text.splitlines()
                     if f"Request who-has {STACK_IP} tell {STACK_IP}" in ln]
    assert len(announcements) == 2, text
    assert st.stop() == 0
    assert netns_exists(netns), "tapstack removed a namespace it did not create"


def test_pcap_has_every_frame_and_tshark_finds_no_bad_checksum(start_stack):
    tshark = require_tool("tshark")
    st = start_stack()
    in_ns(st.ns, "ping", "-c", "10", "-i", "0.05", "-s", "1000", STACK_IP)
    in_ns(st.ns, "ping", "-c", "10", "-i", "0.05", "-s", "0", STACK_IP)
    in_ns(st.ns, "arping", "-c", "2", "-w", "3", "-I", "tap0", STACK_IP)
    time.sleep(max(0.0, st.started_at + 2.5 - time.monotonic()))  # past both announcements
    link = st.stats()["link"]
    assert st.stop() == 0
    with open(st.pcap, "rb") as f:
        frames = list(dpkt.pcap.Reader(f))
    assert len(frames) == link["rx_frames"] + link["tx_frames"]
    assert link["tx_frames"] >= 24  # 20 echo replies, 2 ARP replies, 2 announcements
    opts = ["-o", "ip.check_checksum:TRUE"]
    ours = f"eth.src == {STACK_MAC_TEXT}"

    def count(display_filter: str) -> int:
        out = subprocess.run([tshark, "-r", str(st.pcap), *opts, "-Y", display_filter],
                             capture_output=True, text=True, check=True).stdout
        return len(out.splitlines())

    assert count(f"{ours} && icmp.type == 0 && ip.checksum.status == \"Good\" "
                 "&& icmp.checksum.status == \"Good\"") == 20
    assert count(f"{ours} && (ip.checksum.status == \"Bad\" || icmp.checksum.status == \"Bad\" "
                 "|| _ws.malformed || _ws.expert.severity >= error)") == 0


def test_malformed_frames_are_counted_and_ping_still_works(start_stack):
    st = start_stack()
    in_ns(st.ns, "ping", "-c", "1", "-W", "2", STACK_IP)  # the kernel learns our MAC
    good = ping_frame(src=bytes([10, 77, 0, 1]))
    cases = {
        "ipv4.rx_truncated": good[:24],
        "ipv4.rx_bad_checksum": with_byte(good, 24, good[24] ^ 0xFF),
        "ipv4.rx_bad_header_length": with_byte(good, 14, 0x44),
        "ipv4.rx_bad_version": with_byte(good, 14, 0x65),
        "icmp.rx_bad_checksum": with_byte(good, len(good) - 1, good[-1] ^ 1),
        "arp.rx_truncated": eth(b"\x00\x01\x08\x00\x06\x04\x00\x01", 0x0806),
    }
    before = st.stats()
    r = in_ns(st.ns, sys.executable, INJECT, "tap0", "3", *(f.hex() for f in cases.values()))
    assert r.returncode == 0, r.stderr
    time.sleep(0.3)
    after = st.stats()
    for name in cases:
        layer, _, what = name.partition(".")
        assert after[layer][what] - before[layer][what] == 3, name
    assert after["stack"]["internal_errors"] == 0
    r = in_ns(st.ns, "ping", "-c", "3", "-i", "0.2", "-W", "2", STACK_IP)
    assert loss(r.stdout) == 0.0


def test_sigint_and_sigterm_exit_zero_and_remove_the_namespace(start_stack):
    for sig in (signal.SIGINT, signal.SIGTERM):
        st = start_stack()
        assert netns_exists(st.ns)
        assert st.stop(sig) == 0, st.stderr
        assert not netns_exists(st.ns)


def test_no_netns_mode_inside_a_namespace(netns):
    """--no-netns (the VM mode) leaves namespaces alone and serves in the current one."""
    proc = subprocess.Popen(["ip", "netns", "exec", netns, *tapstack_cmd("run", "--no-netns")],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("tapstack ready") and "the current namespace" in line, line
        r = in_ns(netns, "ping", "-c", "2", "-i", "0.2", "-W", "2", STACK_IP)
        assert loss(r.stdout) == 0.0
        stats = in_ns(netns, *tapstack_cmd("stats", "--no-netns"), cwd=REPO)
        assert "tx_echo_replies" in stats.stdout, stats.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=10)
    assert proc.returncode == 0
    assert netns_exists(netns)


# -- CLI error paths: one sentence, exit 2 ----------------------------------------------------


def run_cli(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(tapstack_cmd(*args), cwd=REPO, capture_output=True, text=True,
                          timeout=30, **kw)


def assert_one_sentence(r: subprocess.CompletedProcess, fragment: str) -> None:
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = [ln for ln in r.stderr.splitlines() if not ln.startswith("tapstack: created")
             and not ln.startswith("tapstack: removed")]
    assert len(lines) == 1 and lines[0].startswith("tapstack: ") and fragment in lines[0], \
        r.stderr
    assert "Traceback" not in r.stderr


def test_second_instance_fails_clearly(start_stack):
    st = start_stack()
    r = run_cli("run", "--netns", st.ns)
    assert_one_sentence(r, f"another tapstack is already running on tap0 in namespace {st.ns}")
    assert st.proc.poll() is None  # the first one is unharmed
    assert loss(in_ns(st.ns, "ping", "-c", "1", "-W", "2", STACK_IP).stdout) == 0.0


def test_busy_tap_fails_clearly(netns):
    holder = subprocess.Popen(
        ["ip", "netns", "exec", netns, sys.executable, "-c",
         "import pytun, sys; d = pytun.TunTapDevice(name='tap0', "
         "flags=pytun.IFF_TAP | pytun.IFF_NO_PI); print('open', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "open"
        r = run_cli("run", "--netns", netns)
        assert_one_sentence(r, f"TAP device tap0 in namespace {netns} is already in use")
    finally:
        holder.stdin.close()
        holder.wait(timeout=10)


def test_stats_without_an_instance_fails_clearly(netns):
    assert_one_sentence(run_cli("stats", "--netns", netns), "no tapstack is running on tap0")
