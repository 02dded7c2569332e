"""TCP against the real kernel as the peer: nc, socat-free Python clients, tshark."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from stack.apps.services import deterministic_sha256
from tests.integration.conftest import (
    HOST_IP,
    REPO,
    STACK_IP,
    forward_loss,
    in_ns,
    listening,
    sha256_file,
    tapstack_cmd,
    wait_for,
)

HERE = Path(__file__).parent


def nc_through(ns: str, src: Path, dst: Path, port: int, timeout: float) -> float:
    start = time.monotonic()
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        r = subprocess.run(["ip", "netns", "exec", ns, "nc", "-N", STACK_IP, str(port)],
                           stdin=fin, stdout=fout, stderr=subprocess.PIPE, timeout=timeout)
    assert r.returncode == 0, r.stderr
    return time.monotonic() - start


def test_echo_50mb_with_nc(start_stack, random_files, tmp_path):
    st = start_stack(pcap=False)
    out = tmp_path / "echoed"
    seconds = nc_through(st.ns, random_files["50m"], out, 7, timeout=120)
    assert sha256_file(out) == sha256_file(random_files["50m"])
    print(f"echo 50 MB each way: {50 / seconds:.1f} MB/s")


def test_discard_100mb(start_stack):
    st = start_stack(pcap=False)
    r = in_ns(st.ns, "sh", "-c", f"head -c 100000000 /dev/zero | nc -N {STACK_IP} 9",
              timeout=120)
    assert r.returncode == 0, r.stderr
    # every byte acknowledged reached the service, and the connection is gone
    stats = wait_for(st.stats, lambda s: s["tcp"]["connections"] == 0)
    assert stats["services"]["discard_bytes"] == 100_000_000
    assert stats["link"]["rx_bytes"] > 100_000_000


def test_source_to_nc(start_stack, tmp_path):
    st = start_stack(pcap=False)
    out = tmp_path / "source"
    with open(out, "wb") as f:
        r = subprocess.run(["ip", "netns", "exec", st.ns, "nc", "-N", STACK_IP, "19"],
                           input=b"30000000\n", stdout=f, stderr=subprocess.PIPE, timeout=120)
    assert r.returncode == 0, r.stderr
    assert out.stat().st_size == 30_000_000
    assert sha256_file(out) == deterministic_sha256(30_000_000)


def test_tapstack_as_the_client(netns, random_files, tmp_path):
    """`tapstack connect` (create_connection) to a kernel `nc -l` listener."""
    to_kernel, from_kernel = tmp_path / "to_kernel", tmp_path / "from_kernel"
    with open(random_files["50m"], "rb") as fin, open(to_kernel, "wb") as fout:
        listener = subprocess.Popen(["ip", "netns", "exec", netns, "nc", "-l", "-N", "-p",
                                     "5000"], stdin=fin, stdout=fout)
    try:
        assert wait_for(lambda: listening(netns, 5000), bool)
        with open(random_files["20m"], "rb") as fin, open(from_kernel, "wb") as fout:
            r = subprocess.run(tapstack_cmd("connect", "--netns", netns, HOST_IP, "5000"),
                               cwd=REPO, stdin=fin, stdout=fout, stderr=subprocess.PIPE,
                               text=False, timeout=120)
        assert r.returncode == 0, r.stderr
        listener.wait(timeout=30)
    finally:
        if listener.poll() is None:
            listener.kill()
    assert sha256_file(to_kernel) == sha256_file(random_files["20m"])
    assert sha256_file(from_kernel) == sha256_file(random_files["50m"])


def test_connect_to_a_closed_port_is_refused(netns):
    r = subprocess.run(tapstack_cmd("connect", "--netns", netns, HOST_IP, "5999"), cwd=REPO,
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2
    assert "connection refused by 10.77.0.1:5999" in r.stderr


def test_thousand_short_connections_then_an_empty_table(start_stack):
    st = start_stack("--msl", "1", pcap=False)
    r = in_ns(st.ns, sys.executable, str(HERE / "short_conns.py"), STACK_IP, "7", "1000",
              timeout=120)
    assert "ok=1000 failed=0" in r.stdout, r.stdout + r.stderr
    print(r.stdout.strip())
    # past TIME-WAIT (2 x MSL): nothing left, records included
    tcp = wait_for(lambda: st.stats()["tcp"],
                   lambda t: t["connections"] == 0 and t["state_time_wait"] == 0)
    assert tcp["connections"] == 0 and tcp["state_time_wait"] == 0
    assert tcp["passive_opens"] == 1000


def test_echo_20mb_under_kernel_made_loss(routed_client, random_files, tmp_path):
    st, client = routed_client
    forward_loss(st.ns, 0.05)
    out = tmp_path / "echoed"
    seconds = nc_through(client, random_files["20m"], out, 7, timeout=240)
    assert sha256_file(out) == sha256_file(random_files["20m"])
    tcp = st.stats()["tcp"]
    assert tcp["retransmits"] > 0 and tcp["out_of_order_segments"] > 0
    print(f"echo 20 MB under 5% loss each way: {seconds:.1f} s, "
          f"{tcp['fast_retransmits']} fast retransmits, {tcp['rto_expiries']} RTOs")


def test_echo_20mb_under_tapstack_impairment(start_stack, random_files, tmp_path):
    st = start_stack("--impair", "delay=2ms,jitter=1ms,reorder=5%,duplicate=1%,seed=4",
                     pcap=False)
    out = tmp_path / "echoed"
    seconds = nc_through(st.ns, random_files["20m"], out, 7, timeout=240)
    assert sha256_file(out) == sha256_file(random_files["20m"])
    stats = st.stats()
    assert stats["impair_rx"]["reordered"] > 0 and stats["impair_tx"]["duplicated"] > 0
    print(f"echo 20 MB under delay/reorder/duplicate: {seconds:.1f} s")


def kernel_mib(ns: str, *names: str) -> dict[str, int]:
    """The kernel's own TCP counters in a namespace (nstat: absolute, zeros included)."""
    r = subprocess.run(["ip", "netns", "exec", ns, "nstat", "-asz", *names],
                       capture_output=True, text=True, timeout=10, check=True)
    return {f[0]: int(f[1]) for f in (line.split() for line in r.stdout.splitlines()[1:])}


def test_tshark_finds_nothing_wrong_in_a_clean_transfer(start_stack, random_files, tmp_path):
    st = start_stack()
    out = tmp_path / "echoed"
    nc_through(st.ns, random_files["5m"], out, 7, timeout=60)
    time.sleep(0.2)
    tcp = st.stats()["tcp"]
    mib = kernel_mib(st.ns, "TcpExtTCPLossProbes", "TcpExtTCPTimeouts")
    assert st.stop() == 0

    def count(display_filter: str) -> int:
        r = subprocess.run(["tshark", "-r", str(st.pcap), "-o", "tcp.check_checksum:TRUE",
                            "-o", "ip.check_checksum:TRUE", "-Y", display_filter],
                           capture_output=True, text=True, check=True)
        return len(r.stdout.splitlines())

    assert count("tcp.len > 0 && ip.src == 10.77.0.2") > 3000
    assert count("tcp.checksum.status == \"Good\" && ip.src == 10.77.0.2") > 3000
    # Linux now and then sends 0xFFFF where the sum computes to 0x0000: both are zero
    # in ones' complement (RFC 1624 3) and both verify, but tshark flags the first
    bad_tcp_sum = ("tcp.checksum.status == \"Bad\" && !(ip.src == 10.77.0.1 "
                   "&& tcp.checksum == 0xffff && tcp.checksum_calculated == 0)")
    for bad in ("tcp.analysis.ack_lost_segment", "tcp.analysis.lost_segment",
                bad_tcp_sum, "ip.checksum.status == \"Bad\"",
                "_ws.malformed", "_ws.expert.severity >= error"):
        assert count(bad) == 0, bad
    # Nothing is lost on this link, so nothing needs sending twice. On a fast machine no
    # timer fires and both counts are 0; on a slow one (an emulated VM) a stalled peer
    # may make a loss probe or RTO fire, and each such event may cost one segment, not a
    # window: tapstack's RTOs are undone when they prove spurious (Eifel, RFC 3522).
    ours = count("tcp.analysis.retransmission && ip.src == 10.77.0.2")
    assert ours <= tcp["tlp_probes"] + tcp["rto_expiries"], (ours, tcp)
    assert ours <= tcp["retransmits"], (ours, tcp)
    theirs = count("tcp.analysis.retransmission && ip.src == 10.77.0.1")
    assert theirs <= mib["TcpExtTCPLossProbes"] + mib["TcpExtTCPTimeouts"], (theirs, mib)
    # tapstack's window closes only if the kernel's did first (nc reading slowly makes
    # the echo service stop reading): never by itself
    if count("tcp.analysis.zero_window && ip.src == 10.77.0.1") == 0:
        assert count("tcp.analysis.zero_window && ip.src == 10.77.0.2") == 0
    print(f"retransmissions: tapstack {ours} (TLPs {tcp['tlp_probes']}, RTOs "
          f"{tcp['rto_expiries']}, spurious {tcp.get('spurious_rtos', 0)}), kernel {theirs}")
