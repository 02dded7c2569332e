"""run --workers N: a multi-queue TAP, one worker process per queue, flows kept on one
worker (an eBPF steering program, or hand-over in software), every worker serving."""

from __future__ import annotations

import ctypes
import json
import os
import random
import signal
import struct
import subprocess
import sys
import threading
import time

import dpkt
import pytest

from stack.link.steering import SYS_BPF, _load, program
from stack.net.tcp.layer import EPHEMERAL_HIGH, EPHEMERAL_LOW
from stack.workers import owner_of
from tests.integration.conftest import REPO, STACK_IP, tapstack_cmd, wait_for


def run_program(fd: int, frame: bytes) -> int:
    """BPF_PROG_TEST_RUN on one frame. A socket filter's test run starts after an
    Ethernet header (it pulls one), where on a TAP it starts at it: 14 bytes go first."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    data = bytes(12) + b"\x08\x00" + frame
    buf = ctypes.create_string_buffer(data, len(data))
    out = ctypes.create_string_buffer(len(data) + 256)
    attr = ctypes.create_string_buffer(128)
    struct.pack_into("<IIIIQQII", attr, 0, fd, 0, len(data), len(out),
                     ctypes.addressof(buf), ctypes.addressof(out), 1, 0)
    if libc.syscall(ctypes.c_long(SYS_BPF), ctypes.c_long(10), attr,
                    ctypes.c_long(len(attr))) < 0:
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
    return struct.unpack_from("<I", attr, 4)[0]


def frame(proto: int, remote: bytes, rport: int, lport: int, more: int = 0) -> bytes:
    body = dpkt.tcp.TCP(sport=rport, dport=lport, flags=2) if proto == 6 else \
        dpkt.udp.UDP(sport=rport, dport=lport, data=b"q") if proto == 17 else \
        dpkt.icmp.ICMP(type=8, data=dpkt.icmp.ICMP.Echo(id=1, seq=1))
    ip = dpkt.ip.IP(src=remote, dst=bytes(map(int, STACK_IP.split("."))), p=proto,
                    data=body, mf=more)
    return bytes(dpkt.ethernet.Ethernet(dst=b"\x02" * 6, src=b"\x04" * 6, type=0x0800,
                                        data=ip))


@pytest.mark.parametrize("count", [2, 3])
def test_the_steering_program_names_the_owner_the_workers_agree_on(count):
    """The eBPF program (run by the kernel on real frames) and `owner_of` give each
    flow the same worker: ephemeral local ports by their remainder, others by the
    hash; fragments, pings and ARP go to worker 0."""
    fd = _load(program(count, EPHEMERAL_LOW, EPHEMERAL_HIGH))
    try:
        rng = random.Random(count)
        for _ in range(300):
            remote = bytes(rng.randrange(256) for _ in range(4))
            rport = rng.randrange(1, 65536)
            lport = rng.choice([80, 443, 53, rng.randrange(1, 65536),
                                rng.randrange(EPHEMERAL_LOW, EPHEMERAL_HIGH + 1)])
            proto = rng.choice([6, 17])
            assert run_program(fd, frame(proto, remote, rport, lport)) % count == \
                owner_of(remote, rport, lport, count)
        remote = b"\xc6\x33\x64\x07"
        assert run_program(fd, frame(6, remote, 999, 80, more=1)) % count == 0
        assert run_program(fd, frame(1, remote, 0, 0)) % count == 0
        arp = bytes(dpkt.ethernet.Ethernet(dst=b"\xff" * 6, src=b"\x04" * 6, type=0x0806,
                                           data=b"\0" * 28))
        assert run_program(fd, arp) % count == 0
    finally:
        os.close(fd)


class Trace:
    """`tapstack trace --json` in a thread: the link-layer events, tagged by worker."""

    def __init__(self, ns: str) -> None:
        self.proc = subprocess.Popen(
            tapstack_cmd("trace", "--netns", ns, "--json", "--layer", "link"), cwd=REPO,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.events: list[dict] = []
        assert "tracing node" in self.proc.stderr.readline()  # every worker listens
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.events.append(json.loads(line))

    def workers_by_port(self, kind: str) -> dict[int, set[int]]:
        seen: dict[int, set[int]] = {}
        for e in list(self.events):
            if e.get("event") == kind and e.get("proto") == "tcp":
                port = e["dport"] if kind == "tx" else e["sport"]
                seen.setdefault(port, set()).add(e["worker"])
        return seen

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


def snapshot(ns: str) -> dict:
    out = subprocess.run(tapstack_cmd("stats", "--netns", ns, "--json"), cwd=REPO,
                         capture_output=True, text=True, timeout=10, check=True)
    return json.loads(out.stdout)


@pytest.mark.parametrize("steering", ["ebpf", "software"])
def test_two_workers_serve_200_concurrent_connections_each_from_one_worker(start_stack,
                                                                           steering):
    env = {"TAPSTACK_STEERING": steering} if steering == "software" else None
    st = start_stack("--workers", "2", "--no-access-log", pcap=False, env=env)
    info = snapshot(st.ns)["info"]
    assert [w["index"] for w in info["workers"]] == [0, 1]
    assert info["steering"].startswith(steering)
    trace = Trace(st.ns)
    try:
        client = subprocess.run(
            ["ip", "netns", "exec", st.ns, sys.executable, "-m",
             "tests.integration.http_clients", "concurrent", STACK_IP, "200", "3"],
            cwd=REPO, capture_output=True, text=True, timeout=120)
        result = json.loads(client.stdout)
        assert result["errors"] == [] and result["all_open"], result["errors"]
        assert len(result["ports"]) == 200 and result["ok"] == 600
        ports = set(result["ports"])
        sent = wait_for(lambda: trace.workers_by_port("tx"), lambda s: ports <= set(s), 15)
    finally:
        trace.stop()
    assert ports <= set(sent)
    # every connection's segments left from one worker, and both workers served
    assert all(len(sent[p]) == 1 for p in ports), {p: sent[p] for p in ports
                                                      if len(sent[p]) != 1}
    assert {next(iter(sent[p])) for p in ports} == {0, 1}
    counters = snapshot(st.ns)["counters"]
    assert counters["tcp"]["passive_opens"] >= 200
    assert counters["stack"]["internal_errors"] == 0
    if steering == "ebpf":  # the kernel put every frame on its owner's queue
        assert counters["worker"]["handoffs_out"] == 0
        received = trace.workers_by_port("rx")
        assert all(received.get(p, sent[p]) == sent[p] for p in ports)
    else:  # about half the flows reached the other worker first and were handed over
        worker = wait_for(lambda: snapshot(st.ns)["counters"]["worker"],
                          lambda w: w["handoffs_in"] == w["handoffs_out"])
        assert worker["handoffs_in"] == worker["handoffs_out"] > 50


def worker_routes(ns: str, index: int) -> list[str]:
    """The routing table one worker holds, asked over its own control socket."""
    code = ("import json, socket, sys; from stack.workers import worker_address; "
            "s = socket.socket(socket.AF_UNIX); s.connect(worker_address('tap0', "
            f"{index})); s.sendall(b'{{\"cmd\": \"stats\"}}\\n'); "
            "print(json.dumps([r['prefix'] for r in "
            "json.loads(s.makefile().read())['routes']]))")
    r = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", code], cwd=REPO,
                       capture_output=True, text=True, timeout=20)
    return json.loads(r.stdout) if r.returncode == 0 else [r.stderr]


def test_a_killed_worker_is_restarted_and_the_other_keeps_its_connections(start_stack):
    st = start_stack("--workers", "2", "--no-access-log", pcap=False)
    added = subprocess.run(tapstack_cmd("route", "add", "198.51.100.0/24", "--via",
                                        "10.77.0.1", "--netns", st.ns), cwd=REPO,
                           capture_output=True, text=True, timeout=20)
    assert added.returncode == 0, added.stderr
    for index in (0, 1):  # every worker took the change
        assert "198.51.100.0/24" in worker_routes(st.ns, index)
    client = subprocess.Popen(["ip", "netns", "exec", st.ns, sys.executable, "-m",
                               "tests.integration.http_clients", "hold", STACK_IP, "16"],
                              cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    try:
        ports = json.loads(client.stdout.readline())["ports"]
        conns = subprocess.run(tapstack_cmd("conns", "--netns", st.ns, "--json"), cwd=REPO,
                               capture_output=True, text=True, timeout=10, check=True)
        owner = {int(c["remote"].rsplit(":", 1)[1]): c["worker"]
                 for c in json.loads(conns.stdout)["connections"]}
        assert set(ports) <= set(owner) and set(owner[p] for p in ports) == {0, 1}
        before = snapshot(st.ns)["info"]["workers"]
        os.kill(before[0]["pid"], signal.SIGKILL)
        after = wait_for(lambda: snapshot(st.ns)["info"]["workers"],
                         lambda w: w[0]["ready"] and w[0]["pid"] != before[0]["pid"], 20)
        assert after[0]["restarts"] == 1 and after[0]["pid"] != before[0]["pid"]
        assert after[1]["pid"] == before[1]["pid"] and after[1]["restarts"] == 0
        # the new worker 0 was given the run-time route again
        assert "198.51.100.0/24" in wait_for(lambda: worker_routes(st.ns, 0),
                                             lambda r: "198.51.100.0/24" in r, 10)
        client.stdin.write("go\n")
        client.stdin.flush()
        answered = {int(p): ok for p, ok in
                    json.loads(client.stdout.readline())["answered"].items()}
    finally:
        client.kill()
        client.wait(timeout=10)
    # worker 1's connections went on; worker 0's died with it (its successor resets them)
    assert all(answered[p] for p in ports if owner[p] == 1)
    assert not any(answered[p] for p in ports if owner[p] == 0)
    again = subprocess.run(["ip", "netns", "exec", st.ns, sys.executable, "-m",
                            "tests.integration.http_clients", "concurrent", STACK_IP, "20",
                            "2"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert json.loads(again.stdout)["ok"] == 40
    assert st.stop() == 0
    assert "worker 0" in st.stderr and "starting it again" in st.stderr


def test_ctrl_c_stops_every_worker_at_once_and_restarts_none(tmp_path):
    """SIGINT to the whole process group, as a terminal's Ctrl-C sends it: the
    supervisor stops the workers (their own group does not get it), starts none again,
    and everything is gone within a few seconds."""
    ns = f"wc-{os.getpid() % 100000}"
    proc = subprocess.Popen(tapstack_cmd("run", "--netns", ns, "--workers", "2"), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        for line in proc.stdout:
            if "workers on" in line:
                break
        workers = [w["pid"] for w in snapshot(ns)["info"]["workers"]]
        start = time.monotonic()
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=20) == 0
        took = time.monotonic() - start
        stderr = proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        subprocess.run(["ip", "netns", "delete", ns], capture_output=True)
    assert "starting it again" not in stderr and "killing it" not in stderr, stderr
    assert took < 10, stderr
    assert not [p for p in workers if os.path.exists(f"/proc/{p}")]


def test_a_trace_follows_a_restarted_worker_and_leaves_none_behind(start_stack):
    """A worker restarted while `tapstack trace` runs: its successor's events come in
    the same trace, and once the trace ends no worker is left tracing (a restarted
    worker holds none of the supervisor's sockets)."""
    st = start_stack("--workers", "2", "--no-access-log", pcap=False)
    trace = Trace(st.ns)
    try:
        before = snapshot(st.ns)["info"]["workers"]
        os.kill(before[1]["pid"], signal.SIGKILL)
        # the trace subscribes to the new worker 1 by itself (within half a second)
        wait_for(lambda: snapshot(st.ns)["info"]["workers"][1],
                 lambda w: w["pid"] != before[1]["pid"] and w["tracing"] == 1, 20)
        client = subprocess.run(
            ["ip", "netns", "exec", st.ns, sys.executable, "-m",
             "tests.integration.http_clients", "concurrent", STACK_IP, "16", "1"],
            cwd=REPO, capture_output=True, text=True, timeout=60)
        assert json.loads(client.stdout)["ok"] == 16
        seen = wait_for(lambda: {w for s in trace.workers_by_port("tx").values()
                                 for w in s}, lambda w: w == {0, 1}, 10)
        assert seen == {0, 1}  # the new worker 1's segments are in the trace
    finally:
        trace.stop()
    # no worker keeps a subscription once the trace is gone
    workers = wait_for(lambda: snapshot(st.ns)["info"]["workers"],
                       lambda ws: all(w.get("tracing") == 0 for w in ws), 10)
    assert [w.get("tracing") for w in workers] == [0, 0]


def test_workers_option_errors_are_one_sentence(tmp_path):
    for args, words in ((["--workers", "0"], "--workers 0 is not a number of workers"),
                        (["--workers", "2", "--pcap", str(tmp_path / "x.pcap")],
                         "--pcap and --trace record one process")):
        r = subprocess.run(tapstack_cmd("run", "--netns", "never-made-w", *args), cwd=REPO,
                           capture_output=True, text=True, timeout=20)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1, r.stderr
        assert lines[0].startswith(f"tapstack: {words}")
