"""Recording one journey: every segment captured (tcpdump on the lab's bridges, one pcap
each) and every tapstack node traced, around one real curl in the client's namespace."""

from __future__ import annotations

import json
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from stack.lab.build import LabError, find_lab, running_labs, up
from stack.lab.topology import Lab, load_lab


def _tapstack() -> list[str]:
    return [sys.executable, "-m", "stack.cli"]


@dataclass
class Recording:
    out: Path
    pcaps: dict[str, Path] = field(default_factory=dict)
    traces: dict[str, Path] = field(default_factory=dict)
    curl: dict[str, Any] = field(default_factory=dict)
    # wall clock minus the monotonic clock the nodes' traces are stamped with (one
    # machine, one monotonic clock): puts trace events on the captures' time axis
    clock_offset: float = field(default_factory=lambda: time.time() - time.monotonic())


def ensure_up(path: str) -> Lab:
    lab = load_lab(path)
    if lab.name not in running_labs():
        up(lab)
    return find_lab(lab.name)


def record(lab: Lab, out: Path, url: str, client: str, ca: str,
           max_time: float = 20.0) -> Recording:
    """One curl with every segment captured and every tapstack node traced."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "captures").mkdir(exist_ok=True)
    (out / "traces").mkdir(exist_ok=True)
    rec = Recording(out)
    procs: list[subprocess.Popen] = []
    ready: list[tuple[subprocess.Popen, str, str]] = []
    try:
        for name, seg in lab.segments.items():
            path = out / "captures" / f"{name}.pcap"
            rec.pcaps[name] = path
            p = subprocess.Popen(["ip", "netns", "exec", lab.switch_netns, "tcpdump", "-i",
                                  seg.bridge, "-U", "--immediate-mode", "-n", "-Z", "root",
                                  "-s", "0", "-w", str(path)],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            procs.append(p)
            ready.append((p, "listening on", f"tcpdump on segment {name}"))
        for node in lab.nodes.values():
            if node.kind != "tapstack":
                continue
            path = out / "traces" / f"{node.name}.jsonl"
            rec.traces[node.name] = path
            f = open(path, "w")  # noqa: SIM115 - the child holds it; closed below
            p = subprocess.Popen([*_tapstack(), "trace", "--netns", lab.switch_netns,
                                  "--node", node.name, "--json"],
                                 stdout=f, stderr=subprocess.PIPE, text=True)
            f.close()
            procs.append(p)
            ready.append((p, "tracing node", f"the trace of node {node.name}"))
        for p, prefix, what in ready:  # all started at once, then each waited for
            expect(p, prefix, what)
        keys = out / "tls-keys.log"
        body = out / "body.html"
        for old in (keys, body):  # curl appends to a key log; a failed run writes no body
            old.unlink(missing_ok=True)
        target = lab.nodes[client]
        start, began = time.time(), time.monotonic()
        r = subprocess.run(["timeout", "-k", "2", str(max_time + 10), "ip", "netns", "exec",
                            lab.netns(target), "env", f"SSLKEYLOGFILE={keys}", "curl", "-sS",
                            "-v", "--max-time", str(max_time), "--cacert", ca, "-o", str(body),
                            "-w", "%{json}", url], capture_output=True, text=True)
        rec.curl = {"exit": r.returncode, "verbose": r.stderr, "url": url,
                    "seconds": round(time.time() - start, 3)}
        try:
            rec.curl["info"] = json.loads(r.stdout)
        except ValueError:
            rec.curl["info"] = {}
        # a failed run has no close to wait for: only the frames still in flight
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        _settle(rec, port, began, 3.0 if r.returncode == 0 else 0.5)
    finally:
        stop(procs)
    return rec


def stop(procs: list[subprocess.Popen]) -> None:
    """Stop the recorders (tcpdump by SIGINT, so that it writes out what it holds), by
    PID, and close their pipes."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGINT if p.args[0] == "ip" else signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        if p.stderr is not None:
            p.stderr.close()


def expect(p: subprocess.Popen, prefix: str, what: str, timeout: float = 15.0) -> None:
    """The child's first line on stderr says it is ready; anything else, or nothing
    within `timeout`: why it is not (it has exited, printed its error, or hangs)."""
    ready, _, _ = select.select([p.stderr], [], [], timeout)
    if not ready:
        raise LabError(f"{what} did not start within {timeout:g} s")
    line = p.stderr.readline()
    if prefix not in line:
        raise LabError(f"{what} did not start: {line.strip() or 'it exited'}")



def _settle(rec: Recording, port: int, began: float, limit: float = 3.0) -> None:
    """Until a server's connection on `port` that was open during the run has closed
    (FIN exchanged: CLOSED or TIME-WAIT, not an older TIME-WAIT expiring), so that the
    last frames are in; or `limit` seconds. Trace times are the monotonic clock."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        for path in rec.traces.values():
            with open(path) as f:
                for line in f:
                    if '"state"' not in line or f'"local_port": {port}' not in line:
                        continue
                    try:
                        e = json.loads(line)
                    except ValueError:
                        continue
                    if e.get("new") in ("CLOSED", "TIME-WAIT") and \
                            e.get("old") != "TIME-WAIT" and e.get("t", 0) >= began:
                        return
        time.sleep(0.05)
