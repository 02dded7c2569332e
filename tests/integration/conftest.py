"""Integration fixtures: each test gets its own network namespace and tapstack process.

Everything runs inside namespaces the test created (or that tapstack created for it);
nothing is addressed outside them. Processes are stopped by PID; namespaces are removed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
STACK_IP = "10.77.0.2"
HOST_IP = "10.77.0.1"
STACK_MAC_TEXT = "02:00:0a:4d:00:02"


def _requirements() -> str | None:
    if os.geteuid() != 0:
        return "integration tests need root (TAP devices, network namespaces)"
    if not os.path.exists("/dev/net/tun"):
        return "integration tests need /dev/net/tun"
    return None


def pytest_collection_modifyitems(config, items):
    why = _requirements()
    if why is None:
        return
    if os.environ.get("CI"):
        raise pytest.UsageError(f"CI must run every test, but {why}")
    for item in items:
        if "integration" in str(item.fspath):
            item.add_marker(pytest.mark.skip(reason=why))


def unique_name(prefix: str = "ts") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def netns_exists(name: str) -> bool:
    return os.path.exists(f"/run/netns/{name}")


def in_ns(ns: str, *cmd: str, timeout: float = 30, check: bool = False,
          **kw) -> subprocess.CompletedProcess:
    """Run a command inside the namespace, bounded in time; output as text."""
    return subprocess.run(["ip", "netns", "exec", ns, *cmd], capture_output=True, text=True,
                          timeout=timeout, check=check, **kw)


def tapstack_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "stack.cli", *args]


class StackProcess:
    """`tapstack run` in its namespace, started and stopped by PID."""

    def __init__(self, ns: str, args: list[str], pcap: Path | None,
                 env: dict[str, str] | None = None) -> None:
        self.ns = ns
        self.env = env
        self.pcap = pcap
        self.args = args
        self.proc: subprocess.Popen | None = None
        self.stdout_lines: list[str] = []
        self.stderr = ""
        self.started_at = 0.0

    def start(self, timeout: float = 15.0) -> StackProcess:
        cmd = tapstack_cmd("run", "--netns", self.ns, *self.args)
        if self.pcap is not None:
            cmd += ["--pcap", str(self.pcap)]
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, **(self.env or {})})
        ready = threading.Event()
        self.stderr_lines: list[str] = []

        def pump() -> None:
            for line in self.proc.stdout:
                self.stdout_lines.append(line.rstrip("\n"))
                if line.startswith("tapstack ready"):
                    ready.set()

        def pump_err() -> None:  # read as it comes: a full pipe would stall the stack
            for line in self.proc.stderr:
                self.stderr_lines.append(line.rstrip("\n"))

        threading.Thread(target=pump, daemon=True).start()
        self.err_thread = threading.Thread(target=pump_err, daemon=True)
        self.err_thread.start()
        if not ready.wait(timeout):
            self.stop()
            raise AssertionError(f"tapstack did not become ready: {self.stderr}")
        self.started_at = time.monotonic()
        return self

    def stats(self) -> dict[str, dict[str, int]]:
        out = subprocess.run(tapstack_cmd("stats", "--netns", self.ns, "--json"), cwd=REPO,
                             capture_output=True, text=True, timeout=10, check=True)
        return json.loads(out.stdout)["counters"]

    def counter(self, name: str) -> int:
        layer, _, rest = name.partition(".")
        return self.stats()[layer][rest]

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)
        self.err_thread.join(timeout=5)
        self.stderr = "\n".join(self.stderr_lines)
        return self.proc.returncode


@pytest.fixture
def start_stack(tmp_path):
    """Factory: start_stack(*extra_args, ns=None) -> a ready StackProcess.

    tapstack creates the namespace itself unless the test made it first; teardown stops the
    process and removes whatever namespace is left.
    """
    started: list[StackProcess] = []

    def factory(*args: str, ns: str | None = None, pcap: bool = True,
                env: dict[str, str] | None = None) -> StackProcess:
        name = ns or unique_name()
        sp = StackProcess(name, list(args), tmp_path / f"{name}.pcap" if pcap else None,
                          env)
        started.append(sp)
        return sp.start()

    yield factory
    for sp in started:
        sp.stop()
        if netns_exists(sp.ns):
            subprocess.run(["ip", "netns", "delete", sp.ns], check=False)


@pytest.fixture
def netns():
    """A namespace made by the test itself (tapstack must leave it in place)."""
    name = unique_name("tn")
    subprocess.run(["ip", "netns", "add", name], check=True)
    yield name
    subprocess.run(["ip", "netns", "delete", name], check=False)


@pytest.fixture
def routed_client(start_stack, netns):
    """tapstack in `netns`, and a client one hop away in a namespace of its own, the
    first namespace's kernel routing between them (veth 10.78.0.0/24 <-> tap0).

    Loss made in FORWARD is loss on a path for both senders. The kernel's own OUTPUT
    chain is not: a segment refused there stays queued and goes again, nothing is lost.
    The client's veth sends one segment per packet (gso_max_segs 1), so a drop is a
    segment, not a 64 KB GSO train."""
    st = start_stack(ns=netns, pcap=False)
    client = add_routed_client(netns)
    try:
        yield st, client
    finally:
        subprocess.run(["ip", "netns", "delete", client], check=False)


def add_routed_client(netns: str, n: int = 0) -> str:
    """A namespace of its own one hop from `netns` (veth 10.78.N.2 <-> 10.78.N.1, rtN in
    `netns`, named rt1 in the client for N = 0), the kernel of `netns` routing between it
    and tap0; returns its name (the caller deletes it). Several, with N = 0, 1, ..."""
    client = unique_name("tc")
    here, there = f"rt{n}" if n else "rt0", "rt1"
    subprocess.run(["ip", "netns", "add", client], check=True)
    try:
        for cmd in (["ip", "link", "add", here, "netns", netns, "type", "veth", "peer",
                     "name", there, "netns", client],
                    ["ip", "-n", netns, "addr", "add", f"10.78.{n}.1/24", "dev", here],
                    ["ip", "-n", netns, "link", "set", here, "up"],
                    ["ip", "-n", client, "link", "set", there, "gso_max_segs", "1"],
                    ["ip", "-n", client, "addr", "add", f"10.78.{n}.2/24", "dev", there],
                    ["ip", "-n", client, "link", "set", there, "up"],
                    ["ip", "-n", client, "link", "set", "lo", "up"],
                    ["ip", "-n", client, "route", "add", "default", "via", f"10.78.{n}.1"],
                    ["ip", "netns", "exec", netns, "sysctl", "-qw",
                     "net.ipv4.ip_forward=1"]):
            subprocess.run(cmd, check=True, capture_output=True)
    except BaseException:
        subprocess.run(["ip", "netns", "delete", client], check=False)
        raise
    return client


def forward_loss(ns: str, probability: float) -> None:
    """Drop one segment in `probability` each way in FORWARD, between tap0 and the
    routed client: loss on the path, made by the kernel (iptables statistic)."""
    for flag in ("-i", "-o"):
        in_ns(ns, "iptables", "-A", "FORWARD", flag, "tap0", "-m", "statistic", "--mode",
              "random", "--probability", str(probability), "-j", "DROP", check=True)


def require_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed (make test installs it)")
    return path


def stream_sha256(cmd: list[str], timeout: float = 120) -> tuple[int, str]:
    """Run a command (a download to stdout) and hash its output as it comes: (bytes,
    sha256), without holding it in memory. AssertionError if it fails."""
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE)
    h = hashlib.sha256()
    n = 0
    while chunk := p.stdout.read(1 << 20):
        h.update(chunk)
        n += len(chunk)
    assert p.wait(timeout=timeout) == 0, cmd
    return n, h.hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


@pytest.fixture(scope="session")
def random_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    files = {}
    for name, size in (("5m", 5_000_000), ("20m", 20_000_000), ("50m", 50_000_000)):
        p = d / name
        with open(p, "wb") as f:
            f.write(os.urandom(size))
        files[name] = p
    return files


def wait_for(read: Callable[[], Any], ok: Callable[[Any], bool], timeout: float = 10.0,
             interval: float = 0.05) -> Any:
    """Read until `ok(value)` holds or `timeout` passes; returns the last value read, so
    the caller's assertion shows what was seen when it did not."""
    deadline = time.monotonic() + timeout
    while True:
        value = read()
        if ok(value) or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


def listening(ns: str, port: int, proto: str = "t") -> bool:
    """A socket in `ns` listens on `port` (TCP, or UDP with proto="u")."""
    r = subprocess.run(["ip", "netns", "exec", ns, "ss", f"-{proto}lnH", "sport", "=",
                        f":{port}"], capture_output=True, text=True)
    return bool(r.stdout.strip())
