"""Hostile traffic, floods, faults and churn: tapstack keeps serving and stays bounded."""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import dpkt
import pytest

from stack.apps.services import deterministic_sha256
from tests.helpers import STACK_IP as STACK_IP_BYTES
from tests.helpers import STACK_MAC
from tests.integration.conftest import (
    REPO,
    STACK_IP,
    forward_loss,
    in_ns,
    require_tool,
    sha256_file,
    wait_for,
)

HERE = Path(__file__).parent
URL = f"http://{STACK_IP}"
RSS_BOUND_KB = 400 * 1024  # what a flood may make tapstack hold, at most


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(ln.split()[1]) for ln in f if ln.startswith("VmRSS:"))


def curl_status(ns: str, path: str = "/bytes/10", timeout: float = 15) -> str:
    r = subprocess.run(["ip", "netns", "exec", ns, "curl", "-s", "-o", "/dev/null", "-w",
                        "%{http_code}", "--max-time", str(timeout), URL + path],
                       capture_output=True, text=True, timeout=timeout + 5)
    return r.stdout


def hping_syn_flood(ns: str, seconds: int, rate_args: list[str]) -> subprocess.Popen:
    """hping3 SYNs from random sources to port 80, bounded by `timeout`.

    SIGINT makes hping3 print its statistics, but its handler is not async-signal-safe:
    about one run in ten deadlocks in it (measured here: 3 of 30), so `timeout` follows
    up with SIGKILL after 2 s. The statistics are only printed, never asserted on."""
    return subprocess.Popen(["ip", "netns", "exec", ns, "timeout", "-k", "2", "-s", "INT",
                             str(seconds), "hping3", "-q", "-S", *rate_args, "--rand-source",
                             "-p", "80", STACK_IP], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def hping_wait(flood: subprocess.Popen) -> str:
    """hping3's output once `timeout` has ended it (and killed it if need be)."""
    try:
        return flood.communicate(timeout=30)[0]
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):  # `timeout` leads its own group
            os.killpg(flood.pid, signal.SIGKILL)
        return flood.communicate()[0]


def test_syn_flood_while_curl_keeps_working(start_stack):
    require_tool("hping3")
    st = start_stack(pcap=False)
    assert curl_status(st.ns) == "200"
    # A paced flood that overflows the SYN queue at once, at a rate tapstack keeps up
    # with (hping3 -i u100: ~10,000 SYNs a second): every curl must get through on
    # cookies. (At hping3's fastest paced rate, about half the flood, and sometimes all
    # four SYNs of one curl in 8 s, die in the kernel's full TAP queue before tapstack
    # sees them: a lottery about the machine's speed, not about tapstack's decisions.
    # The unpaced flood below checks that the stack survives overload.)
    flood = hping_syn_flood(st.ns, 8, ["-i", "u100"])
    statuses = []
    try:
        time.sleep(1.0)
        for _ in range(10):
            statuses.append(curl_status(st.ns, timeout=8))
        peak = rss_kb(st.proc.pid)
    finally:
        sent = hping_wait(flood)
    tcp = st.stats()["tcp"]
    print(f"SYN flood: {tcp['rx_segments']} segments, cookies {tcp['syncookies_sent']}, "
          f"curl {statuses.count('200')}/{len(statuses)} OK, RSS {peak // 1024} MiB; "
          f"hping3: {[ln for ln in sent.splitlines() if 'transmitted' in ln] or 'killed'}")
    assert statuses == ["200"] * 10, (statuses, {k: v for k, v in tcp.items() if v},
                                      st.stats()["ipv4"], st.stats()["link"])
    # the flood was real: the SYN queue overflowed and cookies answered (how many SYNs
    # hping3 gets out in 8 s depends on the machine: ~100,000 here, ~7,000 in an emulated VM)
    assert tcp["syncookies_sent"] > 1000 and tcp["listen_overflows"] > 0
    assert peak < RSS_BOUND_KB
    # Unpaced (--flood): more than the TAP queue holds; the stack must come out of it.
    flood = hping_syn_flood(st.ns, 3, ["--flood"])
    time.sleep(1.5)
    peak = max(peak, rss_kb(st.proc.pid))
    hping_wait(flood)
    assert peak < RSS_BOUND_KB
    assert curl_status(st.ns) == "200"
    assert st.stats()["stack"]["internal_errors"] == 0


def test_rst_and_out_of_window_flood_leaves_a_connection_alone(start_stack):
    st = start_stack(pcap=False)
    client = subprocess.Popen(["ip", "netns", "exec", st.ns, sys.executable,
                               str(HERE / "raw_conn.py"), STACK_IP], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert "200 OK" in client.stdout.readline()
        port = int(client.stdout.readline().split()[1])
        rng = random.Random(7)
        frames = []
        for i in range(3000):
            flags = 0x04 if i % 2 else 0x10  # RSTs and ACK-with-data at random sequences
            tcp = dpkt.tcp.TCP(sport=port, dport=80, seq=rng.getrandbits(32),
                               ack=rng.getrandbits(32), flags=flags, win=512,
                               data=b"" if flags == 0x04 else b"garbage")
            ip = dpkt.ip.IP(src=bytes([10, 77, 0, 1]), dst=STACK_IP_BYTES, p=6, ttl=64,
                            data=tcp)
            frames.append(bytes(dpkt.ethernet.Ethernet(dst=STACK_MAC,
                                                       src=bytes.fromhex("02aabbccddee"),
                                                       type=0x0800, data=ip)).hex())
        for chunk in range(0, len(frames), 500):
            r = in_ns(st.ns, sys.executable, str(HERE / "inject.py"), "tap0", "1",
                      *frames[chunk:chunk + 500])
            assert r.returncode == 0, r.stderr
        client.stdin.write("go\n")
        client.stdin.flush()
        second = client.stdout.readline()
        assert "second HTTP/1.1 200 OK" in second, second
    finally:
        client.kill()
    tcp = st.stats()["tcp"]
    assert tcp["resets_received"] == 0
    refused = tcp["rst_out_of_window"] + tcp["rst_challenged"] + tcp["out_of_window"] + \
        tcp["ack_unsent"] + tcp["ack_too_old"]
    assert refused >= 2900, tcp
    assert tcp["rst_out_of_window"] > 1400 and tcp["out_of_window"] > 1400


def download_and_upload(ns: str, src: Path, tmp: Path, size: int = 20_000_000,
                        timeout: float = 300) -> tuple[float, float]:
    start = time.monotonic()
    out = tmp / "download"
    r = subprocess.run(["ip", "netns", "exec", ns, "curl", "-sS", "-o", str(out),
                        f"{URL}/bytes/{size}"], capture_output=True, timeout=timeout)
    assert r.returncode == 0, r.stderr
    down = time.monotonic() - start
    assert out.stat().st_size == size and sha256_file(out) == deterministic_sha256(size)
    start = time.monotonic()
    r = subprocess.run(["ip", "netns", "exec", ns, "curl", "-sS", "-T", str(src),
                        URL + "/upload"], capture_output=True, timeout=timeout)
    up = time.monotonic() - start
    assert json.loads(r.stdout) == {"length": src.stat().st_size,
                                    "sha256": sha256_file(src)}
    return down, up


@pytest.mark.timeout(300)  # 10 % each way is slow by nature, slower still in an emulated VM
@pytest.mark.parametrize(("loss", "mb"), [(0.01, 20), (0.05, 20), (0.10, 5)])
def test_http_both_ways_under_kernel_made_loss(routed_client, random_files, tmp_path, loss,
                                               mb):
    st, client = routed_client
    forward_loss(st.ns, loss)
    down, up = download_and_upload(client, random_files[f"{mb}m"], tmp_path,
                                   size=mb * 1_000_000)
    dropped = in_ns(st.ns, "iptables", "-L", "FORWARD", "-v", "-n", "-x").stdout
    counts = [int(ln.split()[0]) for ln in dropped.splitlines() if "DROP" in ln]
    tcp = st.stats()["tcp"]
    print(f"{loss:.0%} loss (FORWARD, {counts} dropped), {mb} MB: download (tapstack sends) "
          f"{mb / down:.2f} MB/s, upload (kernel sends) {mb / up:.2f} MB/s")
    assert len(counts) == 2 and min(counts) > 0  # both directions really lost segments
    assert tcp["sack_retransmits"] > 0 and tcp["out_of_order_segments"] > 0


def test_http_under_a_20mbit_tbf(start_stack, random_files, tmp_path):
    st = start_stack(pcap=False)
    in_ns(st.ns, "tc", "qdisc", "add", "dev", "tap0", "root", "tbf", "rate", "20mbit",
          "burst", "32kbit", "latency", "20ms", check=True)
    down, up = download_and_upload(st.ns, random_files["20m"], tmp_path)
    assert up > 6.0  # the shaper really was in the way (20 MB at 20 Mbit/s is 8 s)
    print(f"tbf 20 Mbit/s: download {20 / down:.2f} MB/s, upload {20 / up:.2f} MB/s")


def test_http_under_impairment_with_corruption(start_stack, random_files, tmp_path):
    st = start_stack("--impair", "delay=1ms,jitter=500us,reorder=2%,duplicate=1%,"
                     "corrupt=0.5%,seed=11", pcap=False)
    down, up = download_and_upload(st.ns, random_files["20m"], tmp_path)
    stats = st.stats()
    assert stats["impair_rx"]["corrupted"] > 0 and stats["impair_tx"]["corrupted"] > 0
    bad = stats["tcp"]["rx_bad_checksum"] + stats["ipv4"]["rx_bad_checksum"]
    assert bad > 0  # corrupted frames were caught, not delivered
    print(f"impaired: download {20 / down:.2f} MB/s, upload {20 / up:.2f} MB/s")


def test_nmap_scan_finishes_and_leaves_nothing_stuck(start_stack):
    require_tool("nmap")
    st = start_stack(pcap=False)
    r = in_ns(st.ns, "nmap", "-n", "-sS", "-sU", "-O", "-p", "T:7,9,19,80,81,U:7,9",
              "--max-retries", "1", "--host-timeout", "100s", STACK_IP, timeout=150)
    assert r.returncode == 0, r.stderr
    assert re.search(r"80/tcp\s+open", r.stdout) and re.search(r"81/tcp\s+closed", r.stdout)
    assert curl_status(st.ns) == "200"

    def live() -> dict[str, int]:
        return {k: v for k, v in st.stats()["tcp"].items() if k.startswith("state_") and v
                and k not in ("state_time_wait", "state_syn_received")}

    left = wait_for(live, lambda s: s == {}, timeout=5)
    assert left == {}, left
    assert st.stats()["stack"]["internal_errors"] == 0


def test_twenty_thousand_short_connections(start_stack):
    require_tool("ab")
    st = start_stack("--msl", "2", pcap=False)
    assert curl_status(st.ns) == "200"
    before = rss_kb(st.proc.pid)
    r = in_ns(st.ns, "ab", "-q", "-n", "20000", "-c", "10", URL + "/bytes/100", timeout=120)
    assert "Complete requests:      20000" in r.stdout, r.stdout + r.stderr
    assert "Failed requests:        0" in r.stdout and "Non-2xx" not in r.stdout
    tcp = st.stats()["tcp"]
    others = {k: v for k, v in tcp.items() if k.startswith("state_") and v
              and k != "state_time_wait"}
    assert others == {} and tcp["state_time_wait"] > 0
    peak = rss_kb(st.proc.pid)
    # 2 x MSL, then the memory trim that follows an empty table (2 s later)
    tcp = wait_for(lambda: st.stats()["tcp"],
                   lambda t: t["connections"] == 0 and t["state_time_wait"] == 0, timeout=15)
    assert tcp["connections"] == 0 and tcp["state_time_wait"] == 0
    after = wait_for(lambda: rss_kb(st.proc.pid), lambda kb: kb - before < 16 * 1024,
                     timeout=5)
    rate = re.search(r"Requests per second:\s+([\d.]+)", r.stdout).group(1)
    print(f"churn: {rate} req/s, RSS {before // 1024} -> {peak // 1024} -> "
          f"{after // 1024} MiB")
    assert after - before < 16 * 1024  # back close to where it started


def test_soak_30_seconds():
    r = subprocess.run([sys.executable, "tools/soak.py", "--duration", "30",
                        "--out", "/tmp/tapstack-soak"], cwd=REPO, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["socket_errors"] == 0 and summary["requests"] > 1000
    print("soak:", summary)
