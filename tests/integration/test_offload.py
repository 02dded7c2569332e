"""--offload against the kernel: TSO frames out, GSO frames in, right bytes both ways."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import time

from stack.apps.services import deterministic_sha256
from tests.integration.conftest import STACK_IP, require_tool, sha256_file

URL = f"http://{STACK_IP}"


def download_checked(ns: str, size: int) -> float:
    """curl /bytes/<size> streamed through a hash (not to disk); asserts every byte
    arrived right, returns the seconds it took."""
    p = subprocess.Popen(["ip", "netns", "exec", ns, "curl", "-sS", f"{URL}/bytes/{size}"],
                         stdout=subprocess.PIPE)
    h = hashlib.sha256()
    n = 0
    start = time.monotonic()
    while chunk := p.stdout.read(1 << 20):
        h.update(chunk)
        n += len(chunk)
    assert p.wait(timeout=120) == 0
    seconds = time.monotonic() - start
    assert n == size and h.hexdigest() == deterministic_sha256(size)
    return seconds


def capture_on_tap(ns: str, cap, count: int, what: str) -> subprocess.Popen:
    """tcpdump on tap0 in `ns`, writing `count` frames that match `what` to `cap`;
    returns once it listens."""
    require_tool("tcpdump")
    dump = subprocess.Popen(["ip", "netns", "exec", ns, "tcpdump", "-i", "tap0",
                             "--immediate-mode", "-U", "-n", "-s", "96", "-c", str(count),
                             "-w", str(cap), what], stderr=subprocess.PIPE, text=True)
    for line in dump.stderr:
        if "listening on" in line:
            break
    return dump


def test_offload_download_200mb_upload_100mb_and_tso_on_the_wire(start_stack, tmp_path):
    st = start_stack("--offload", pcap=False)
    cap = tmp_path / "tso.pcap"
    dump = capture_on_tap(st.ns, cap, 20, f"src host {STACK_IP} and tcp and greater 2000")
    seconds = download_checked(st.ns, 209715200)
    dump.wait(timeout=10)
    text = subprocess.run(["tcpdump", "-n", "-r", str(cap)], capture_output=True,
                          text=True).stdout
    lengths = [int(x) for x in re.findall(r"length (\d+)", text)]
    assert lengths and max(lengths) > 10_000, text[:500]  # whole TSO frames on tap0
    assert st.stats()["tcp"]["tso_frames"] > 100

    src = tmp_path / "up"
    src.write_bytes(bytes(range(256)) * 400_000)  # ~100 MB
    start = time.monotonic()
    r = subprocess.run(["ip", "netns", "exec", st.ns, "curl", "-sS", "-T", str(src),
                        URL + "/upload"], capture_output=True, timeout=120)
    up_seconds = time.monotonic() - start
    assert json.loads(r.stdout) == {"length": src.stat().st_size, "sha256": sha256_file(src)}
    stats = st.stats()
    assert stats["tcp"]["rx_bad_checksum"] == 0 and stats["stack"]["internal_errors"] == 0
    print(f"offload: download {209.7 / seconds:.0f} MB/s, upload {102.4 / up_seconds:.0f} MB/s")


def test_offload_download_under_kernel_made_loss_arrives_whole(start_stack):
    """TSO frames lost at the kernel's INPUT (each one up to 44 segments at once): the
    SACK scoreboard and RACK must re-cut and resend them by the MSS."""
    st = start_stack("--offload", pcap=False)
    for chain, flag in (("OUTPUT", "-o"), ("INPUT", "-i")):
        subprocess.run(["ip", "netns", "exec", st.ns, "iptables", "-A", chain, flag, "tap0",
                        "-m", "statistic", "--mode", "random", "--probability", "0.05",
                        "-j", "DROP"], check=True)
    seconds = download_checked(st.ns, 20_000_000)
    stats = st.stats()
    tcp = stats["tcp"]
    assert tcp["tso_frames"] > 0 and tcp["sack_retransmits"] > 0
    assert stats["stack"]["internal_errors"] == 0
    print(f"offload under 5% loss each way: {20 / seconds:.1f} MB/s, "
          f"{tcp['sack_retransmits']} SACK resends, {tcp['rto_expiries']} RTOs")


def test_checksum_offload_frames_stay_mtu_sized_and_the_pcap_shows_whole_checksums(
        start_stack, tmp_path):
    """--offload csum: the kernel finishes tapstack's TCP checksums (tcpdump on the TAP
    sees the partial sums, as on a NIC with TX offload), frames never exceed the MTU,
    the data arrives right both ways, and tapstack's own pcap shows finished, correct
    checksums on every segment, sent and received."""
    import dpkt

    from stack.wire.checksum import checksum_ok, pseudo_header_sum

    st = start_stack("--offload", "csum")
    cap = tmp_path / "tap.pcap"
    dump = capture_on_tap(st.ns, cap, 400, f"src host {STACK_IP} and tcp")
    download_checked(st.ns, 5_000_000)
    dump.wait(timeout=10)
    src = tmp_path / "up"
    src.write_bytes(bytes(range(256)) * 20_000)
    r = subprocess.run(["ip", "netns", "exec", st.ns, "curl", "-sS", "-T", str(src),
                        URL + "/upload"], capture_output=True, timeout=60)
    assert json.loads(r.stdout) == {"length": src.stat().st_size, "sha256": sha256_file(src)}
    text = subprocess.run(["tcpdump", "-vv", "-n", "-r", str(cap)], capture_output=True,
                          text=True).stdout
    lengths = [int(x) for x in re.findall(r"proto TCP \(6\), length (\d+)", text)]
    assert len(lengths) == 400 and max(lengths) <= 1500, text[:500]
    assert "incorrect" in text  # what the learner sees on the TAP, explained in README
    stats = st.stats()
    assert stats["tcp"]["tso_frames"] == 0 and stats["tcp"]["rx_bad_checksum"] == 0
    st.stop()
    sent = received = 0
    with open(st.pcap, "rb") as f:
        for _, buf in dpkt.pcap.Reader(f):
            ip = dpkt.ethernet.Ethernet(buf).data
            if not isinstance(ip, dpkt.ip.IP) or ip.p != 6:
                continue
            segment = buf[14 + ip.hl * 4:14 + ip.len]
            assert len(buf) <= 1514
            assert checksum_ok(segment, pseudo_header_sum(ip.src, ip.dst, 6, len(segment)))
            if ip.src == bytes(map(int, STACK_IP.split("."))):
                sent += 1
            else:
                received += 1
    assert sent > 3000 and received > 300
