"""Recording one journey: every segment captured (tcpdump on the lab's bridges, one pcap
each) and every tapstack node traced, around one real curl in the client's namespace."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
            _expect(p, prefix, what)
        keys = out / "tls-keys.log"
        body = out / "body.html"
        target = lab.nodes[client]
        start = time.time()
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
        _settle(rec, 3.0 if r.returncode == 0 else 0.5)
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT if p.args[0] == "ip" else signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
    return rec


def _expect(p: subprocess.Popen, prefix: str, what: str) -> None:
    """The child's first line on stderr says it is ready; anything else: why it is not
    (it has exited, or printed its error)."""
    line = p.stderr.readline()
    if prefix not in line:
        raise LabError(f"{what} did not start: {line.strip() or 'it exited'}")


def _settle(rec: Recording, limit: float = 3.0) -> None:
    """Until the server's side of the connection has closed (the last frames are in),
    or `limit` seconds."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        for path in rec.traces.values():
            with open(path) as f:
                if any(('"new": "CLOSED"' in line and '"local_port": 443' in line)
                       or ('"new": "TIME-WAIT"' in line and '"local_port": 443' in line)
                       for line in f):
                    return
        time.sleep(0.05)
