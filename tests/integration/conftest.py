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
from pathlib import Path

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

    def __init__(self, ns: str, args: list[str], pcap: Path | None) -> None:
        self.ns = ns
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
                                     stderr=subprocess.PIPE, text=True)
        ready = threading.Event()

        def pump() -> None:
            for line in self.proc.stdout:
                self.stdout_lines.append(line.rstrip("\n"))
                if line.startswith("tapstack ready"):
                    ready.set()

        threading.Thread(target=pump, daemon=True).start()
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
            _, self.stderr = self.proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, self.stderr = self.proc.communicate(timeout=5)
        return self.proc.returncode


@pytest.fixture
def start_stack(tmp_path):
    """Factory: start_stack(*extra_args, ns=None) -> a ready StackProcess.

    tapstack creates the namespace itself unless the test made it first; teardown stops the
    process and removes whatever namespace is left.
    """
    started: list[StackProcess] = []

    def factory(*args: str, ns: str | None = None, pcap: bool = True) -> StackProcess:
        name = ns or unique_name()
        sp = StackProcess(name, list(args), tmp_path / f"{name}.pcap" if pcap else None)
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


def require_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed (make test installs it)")
    return path


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
