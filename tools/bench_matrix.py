"""make bench, congestion control: a loss x RTT matrix of TCP senders over one impaired path.

    python tools/bench_matrix.py           loss 0,1,2,5,10 % x RTT +0,10,50 ms, 20 MB,
                                           medians of 3 runs (long: about 1.5 hours)
    python tools/bench_matrix.py --quick   loss 0,5 % x RTT +0 ms, 2 MB, one run (a smoke test)

Senders, each measured in every cell, over the same path:

    tapstack cubic, tapstack newreno, tapstack bbr   tapstack run --cc NAME, serving
                                                     /bytes/N to a kernel receiver (curl)
    kernel reno, kernel bbr                          `tapstack serve-kernel` (the same HTTP
                                                     app on kernel sockets) in a namespace
                                                     whose tcp_congestion_control is that
    kernel bbr -> tapstack                           the "best pairing": a kernel sender
                                                     (BBR) PUTting to tapstack's /upload

bbr is used only when the host allows it (tcp_available_congestion_control and
tcp_allowed_congestion_control); otherwise the output says so and the best pairing
uses reno.

Topology (every namespace, link and address is made here and removed at the end; the
root namespace gets nothing; addresses are 10.91.x inside these namespaces only):

    senders' side                                                  receivers' side
    TAP ts-cubic   10.91.11.2 ─┐                              ┌─ 10.91.22.2 kr (veth):
    TAP ts-newreno 10.91.12.2 ─┤                              │   the kernel receiver
    TAP ts-bbr     10.91.13.2 ─┤  lr ── core ── rr ───────────┤   (curl, counts bytes)
    ksb (veth)     10.91.3.2  ─┤  Linux        Linux          └─ 10.91.21.2 TAP ts-rx:
    ksr (veth)     10.91.4.2  ─┘  router       router             tapstack's receiver
                                  (loss)

Every flow crosses lr, then the core, then rr, so every sender has the same hops.

- Loss: in lr, `iptables -A FORWARD -p tcp -m statistic --mode random --probability P
  -j DROP`: data and ACKs alike, P each way. A drop is one segment: tapstack's TAPs are
  plain (no offloads), the veths have gso_max_segs 1 (no ethtool here; a kernel
  sender's TCP then builds one-segment packets), and veths do no GRO. The loss
  measured by the rule's counters is in the JSON.
- Delay: this kernel has no netem (nor fq or etf). With RTT +0 ms the core is a veth
  between lr and rr. With RTT +X ms it is a tapstack router (`tapstack run --config`,
  two plain TAPs, one in lr and one in rr) run with `--impair delay=X/4 ms`: tapstack
  delays every frame on receive and on send, so each direction waits twice (X/2) and
  the round trip grows by X. The same router carries every sender's flow, so the
  delay columns stay comparable across senders, but a Python router forwards far less
  than Linux (docs/benchmarks.md: about 100 MB/s plain): in those columns it bounds
  every sender, the kernel's too. The measured ping RTT through the path is in the
  table (the router's timers add a few ms at +10).

Throughput is bytes delivered / time from connection established to the last byte
(curl's time_total - time_connect for downloads; for the upload, until tapstack's
answer). A transfer is capped at --max-seconds; a capped one counts the bytes that
were delivered by then (curl's size_download; TCP_INFO bytes_acked for the upload) and
is marked with * in the table. Writes bench/results/matrix.{md,json,png} (--quick:
matrix-quick.*): MB/s per sender and cell, ratios against the kernel senders and the
best pairing measured in the same run, and a heat map of tapstack bbr / best pairing
and tapstack cubic / kernel reno.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

TAPSTACK_CCS = ("cubic", "newreno", "bbr")
KERNEL_CCS = ("reno", "bbr")
SENDER_SIDE, RECEIVER_SIDE = "10.91.0.0/20", "10.91.16.0/20"
TS_SENDER = {"cubic": "10.91.11", "newreno": "10.91.12", "bbr": "10.91.13"}  # .2 is tapstack
KERNEL_SENDER = {"bbr": "10.91.3", "reno": "10.91.4"}  # .1 is lr, .2 is the sender
TS_RECEIVER, KERNEL_RECEIVER = "10.91.21", "10.91.22"  # .1 is rr, .2 the receiver
CORE_LR, CORE_RR = "10.91.100", "10.91.101"  # lr side .1, router .2 / router .1, rr .2

UPLOAD_CLIENT = r"""
import json, socket, struct, sys, time
host, size, limit = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
s = socket.create_connection((host, 80), timeout=limit)
t0 = time.monotonic()
deadline = t0 + limit
head = (f"PUT /upload HTTP/1.1\r\nHost: {host}\r\nContent-Length: {size}\r\n"
        "Connection: close\r\n\r\n").encode()
block = bytes(range(256)) * 4096
out = [head]
left = size
def acked():
    info = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    return struct.unpack_from("<Q", info, 120)[0], struct.unpack_from("<I", info, 100)[0]
done = False
try:
    while out or left:
        if not out:
            n = min(left, len(block))
            out.append(block[:n])
            left -= n
        s.settimeout(max(0.01, deadline - time.monotonic()))
        sent = s.send(out[0])
        out[0] = out[0][sent:]
        if not out[0]:
            out.pop(0)
    reply = b""
    while b"}" not in reply:
        s.settimeout(max(0.01, deadline - time.monotonic()))
        chunk = s.recv(4096)
        if not chunk:
            break
        reply += chunk
    length = json.loads(reply[reply.index(b"{"):reply.rindex(b"}") + 1])["length"]
    done = length == size
except (OSError, ValueError):
    pass
seconds = time.monotonic() - t0
delivered, retrans = acked()
delivered = size if done else max(0, delivered - len(head))
print(json.dumps({"bytes": delivered, "seconds": seconds, "complete": done,
                  "retransmissions": retrans}))
"""


def _die_with_parent() -> None:
    """preexec_fn: a child gets SIGTERM if this script dies (even by SIGKILL)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class Bench:
    """The namespaces and processes of one run: all made here, all removed by close()."""

    def __init__(self, workdir: Path) -> None:
        self.tag = uuid.uuid4().hex[:5]
        self.workdir = workdir
        self.namespaces: list[str] = []
        self.procs: dict[str, subprocess.Popen] = {}
        self.notes: list[str] = []

    # -- plumbing ---------------------------------------------------------------------------

    def ns(self, role: str) -> str:
        return f"mx{self.tag}-{role}"

    def run(self, *cmd: str, timeout: float = 30, check: bool = True
            ) -> subprocess.CompletedProcess:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)}: {r.stderr.strip() or r.stdout.strip()}")
        return r

    def in_ns(self, role: str, *cmd: str, timeout: float = 30, check: bool = True
              ) -> subprocess.CompletedProcess:
        return self.run("ip", "netns", "exec", self.ns(role), *cmd, timeout=timeout,
                        check=check)

    def add_ns(self, role: str, forwarding: bool = False) -> None:
        name = self.ns(role)
        self.run("ip", "netns", "add", name)
        self.namespaces.append(name)
        self.run("ip", "-n", name, "link", "set", "lo", "up")
        self.in_ns(role, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1",
                   "net.ipv6.conf.default.disable_ipv6=1")
        if forwarding:
            self.in_ns(role, "sysctl", "-qw", "net.ipv4.ip_forward=1")

    def veth(self, a: str, a_dev: str, a_addr: str, b: str, b_dev: str, b_addr: str) -> None:
        """A veth pair made inside namespaces a and b (never in the root namespace), one
        segment per packet (gso_max_segs 1), addresses /24, up."""
        self.run("ip", "-n", self.ns(a), "link", "add", a_dev, "type", "veth", "peer", "name",
                 b_dev, "netns", self.ns(b))
        for role, dev, addr in ((a, a_dev, a_addr), (b, b_dev, b_addr)):
            self.run("ip", "-n", self.ns(role), "link", "set", dev, "gso_max_segs", "1",
                     "gso_max_size", "1500")
            self.run("ip", "-n", self.ns(role), "addr", "add", f"{addr}/24", "dev", dev)
            self.run("ip", "-n", self.ns(role), "link", "set", dev, "up")

    def start(self, key: str, cmd: list[str], ready: str, timeout: float = 30) -> bool:
        """Start a long-running process (output to a log file), wait for its ready line;
        False (and the log's tail as a note) if it does not come."""
        log = self.workdir / f"{key.replace(' ', '_')}.log"
        with open(log, "w") as f:
            proc = subprocess.Popen(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)
        self.procs[key] = proc
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ready in log.read_text(errors="replace"):
                return True
            if proc.poll() is not None:
                break
            time.sleep(0.1)
        tail = log.read_text(errors="replace").strip().splitlines()[-3:]
        self.notes.append(f"{key} did not start: {' / '.join(tail) or 'no output'}")
        self.stop(key)
        return False

    def stop(self, key: str) -> None:
        proc = self.procs.pop(key, None)
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)

    def close(self) -> None:
        for key in list(self.procs):
            with contextlib.suppress(Exception):
                self.stop(key)
        for name in reversed(self.namespaces):
            subprocess.run(["ip", "netns", "delete", name], capture_output=True, timeout=30)
        self.namespaces.clear()

    # -- the topology -----------------------------------------------------------------------

    def build(self, kernel_ccs: list[str]) -> list[str]:
        """Routers, kernel endpoints, tapstack senders and receiver; the core comes per
        delay column (core_up). Returns the tapstack senders that started."""
        self.add_ns("lr", forwarding=True)
        self.add_ns("rr", forwarding=True)
        self.add_ns("kr")
        self.veth("rr", "kr0", f"{KERNEL_RECEIVER}.1", "kr", "eth0", f"{KERNEL_RECEIVER}.2")
        self.in_ns("kr", "ip", "route", "add", "default", "via", f"{KERNEL_RECEIVER}.1")
        for cc in kernel_ccs:
            role = f"k{cc}"
            self.add_ns(role)
            self.in_ns(role, "sysctl", "-qw", f"net.ipv4.tcp_congestion_control={cc}")
            net = KERNEL_SENDER[cc]
            self.veth("lr", role, f"{net}.1", role, "eth0", f"{net}.2")
            self.in_ns(role, "ip", "route", "add", "default", "via", f"{net}.1")
        tapstack = [sys.executable, "-m", "stack.cli", "run", "--log-level", "warning",
                    "--no-services", "--no-access-log"]
        waiting = []
        for cc in kernel_ccs:
            cmd = ["ip", "netns", "exec", self.ns(f"k{cc}"), sys.executable, "-m", "stack.cli",
                   "serve-kernel", "--port", "80", "--log-level", "warning", "--no-access-log"]
            waiting.append((f"kernel {cc}", cmd, "serve-kernel ready"))
        for i, cc in enumerate(TAPSTACK_CCS):
            net = TS_SENDER[cc]
            waiting.append((f"tapstack {cc}", [
                *tapstack, "--netns", self.ns("lr"), "--tap", f"ts-{cc}", "--address",
                f"{net}.2/24", "--host-address", f"{net}.1/24", "--mac", f"02:00:0a:5b:{i:02x}:02",
                "--cc", cc], "tapstack ready"))
        waiting.append(("tapstack receiver", [
            *tapstack, "--netns", self.ns("rr"), "--tap", "ts-rx", "--address",
            f"{TS_RECEIVER}.2/24", "--host-address", f"{TS_RECEIVER}.1/24", "--mac",
            "02:00:0a:5b:15:02"], "tapstack ready"))
        # start them one after another: each is a Python start-up, and the CPUs are shared
        started = [key for key, cmd, ready in waiting if self.start(key, cmd, ready)]
        missing = [k for k, _, _ in waiting if k not in started and not k.startswith("tapstack ")]
        if missing or "tapstack receiver" not in started:
            raise RuntimeError("; ".join(self.notes))
        return [k for k in started if k.startswith("tapstack ") and k != "tapstack receiver"]

    def core_up(self, rtt_added_ms: float) -> None:
        """lr -- rr directly (a veth), or through a tapstack router that delays each frame
        by rtt_added_ms / 4 as it arrives and again as it leaves."""
        if rtt_added_ms <= 0:
            self.veth("lr", "core", f"{CORE_LR}.1", "rr", "core", f"{CORE_LR}.2")
            lr_via, rr_via = f"{CORE_LR}.2", f"{CORE_LR}.1"
        else:
            conf = self.workdir / "delay-router.toml"
            conf.write_text(f"""
name = "delay"
netns = "{self.ns('lr')}"
forwarding = true
services = {{ echo = false, http = false }}
[[interface]]
name = "eth0"
tap = "dly0"
netns = "{self.ns('lr')}"
addresses = ["{CORE_LR}.2/24"]
host_address = "{CORE_LR}.1/24"
[[interface]]
name = "eth1"
tap = "dly1"
netns = "{self.ns('rr')}"
addresses = ["{CORE_RR}.1/24"]
host_address = "{CORE_RR}.2/24"
[[route]]
to = "{SENDER_SIDE}"
via = "{CORE_LR}.1"
[[route]]
to = "{RECEIVER_SIDE}"
via = "{CORE_RR}.2"
""")
            delay = f"{rtt_added_ms / 4:g}ms"
            if not self.start("delay router", [sys.executable, "-m", "stack.cli", "run",
                                               "--config", str(conf), "--impair",
                                               f"delay={delay}", "--log-level", "warning",
                                               "--no-access-log"], "tapstack ready"):
                raise RuntimeError("; ".join(self.notes))
            lr_via, rr_via = f"{CORE_LR}.2", f"{CORE_RR}.1"
        self.run("ip", "-n", self.ns("lr"), "route", "replace", RECEIVER_SIDE, "via", lr_via)
        self.run("ip", "-n", self.ns("rr"), "route", "replace", SENDER_SIDE, "via", rr_via)

    def core_down(self) -> None:
        if "delay router" in self.procs:
            self.stop("delay router")  # its TAPs, and the routes through them, go with it
        else:
            self.run("ip", "-n", self.ns("lr"), "link", "delete", "core", check=False)

    def set_loss(self, pct: float) -> None:
        self.in_ns("lr", "iptables", "-F", "FORWARD")
        self.in_ns("lr", "iptables", "-Z", "FORWARD")
        if pct > 0:
            self.in_ns("lr", "iptables", "-A", "FORWARD", "-p", "tcp", "-m", "statistic",
                       "--mode", "random", "--probability", f"{pct / 100:.6f}", "-j", "DROP")
        self.in_ns("lr", "iptables", "-A", "FORWARD", "-p", "tcp", "-j", "ACCEPT")

    def measured_loss(self) -> float | None:
        """Percent of TCP packets lr dropped since set_loss (both directions)."""
        r = self.in_ns("lr", "iptables", "-L", "FORWARD", "-v", "-x", "-n", check=False)
        dropped = accepted = 0
        for line in r.stdout.splitlines():
            fields = line.split()
            if len(fields) > 2 and fields[0].isdigit():
                if fields[2] == "DROP":
                    dropped += int(fields[0])
                elif fields[2] == "ACCEPT":
                    accepted += int(fields[0])
        total = dropped + accepted
        return round(100 * dropped / total, 2) if total else None

    def ping_ms(self, count: int) -> float | None:
        """Median RTT from the kernel receiver to a kernel sender, across the core."""
        target = f"{KERNEL_SENDER['reno']}.2"
        r = self.in_ns("kr", "ping", "-n", "-c", str(count), "-i", "0.2", "-W", "2", target,
                       timeout=count + 15, check=False)
        times = [float(x) for x in re.findall(r"time=([\d.]+) ms", r.stdout)]
        return round(statistics.median(times), 3) if times else None

    def tapstack_health(self, key: str) -> str | None:
        """A note when a tapstack instance caught internal errors (a bug: the transfer
        it was in may have stalled); None when it has none."""
        if key == "tapstack receiver":
            netns, tap = self.ns("rr"), "ts-rx"
        else:
            netns, tap = self.ns("lr"), f"ts-{key.removeprefix('tapstack ')}"
        r = self.run(sys.executable, "-m", "stack.cli", "stats", "--netns", netns, "--tap", tap,
                     "--json", check=False)
        try:
            snap = json.loads(r.stdout)
        except ValueError:
            return f"{key}: no answer to `tapstack stats` ({r.stderr.strip()[-200:]})"
        errors = snap.get("counters", {}).get("stack", {}).get("internal_errors", 0)
        if not errors:
            return None
        return f"{key}: {errors} internal errors, last: {snap.get('last_internal_error')}"

    # -- transfers --------------------------------------------------------------------------

    def download(self, server: str, size: int, limit: float) -> dict:
        """The kernel receiver fetches /bytes/SIZE from server with curl."""
        r = self.in_ns("kr", "timeout", "-k", "2", str(int(limit) + 10), "curl", "-sS",
                       "-o", "/dev/null", "--max-time", f"{limit:g}", "-w",
                       "%{http_code} %{size_download} %{time_connect} %{time_total}",
                       f"http://{server}/bytes/{size}", timeout=limit + 20, check=False)
        m = re.fullmatch(r"(\d+) (\d+) ([\d.]+) ([\d.]+)", r.stdout.strip())
        if not m:
            return {"bytes": 0, "seconds": limit, "complete": False,
                    "error": (r.stderr or r.stdout).strip()[-200:]}
        code, got, connect, total = int(m[1]), int(m[2]), float(m[3]), float(m[4])
        return {"bytes": got, "seconds": max(total - connect, 1e-6),
                "complete": code == 200 and got == size and r.returncode == 0}

    def upload(self, client: str, size: int, limit: float) -> dict:
        """A kernel sender PUTs SIZE bytes to tapstack's /upload."""
        r = self.in_ns(client, "timeout", "-k", "2", str(int(limit) + 10), sys.executable,
                       "-c", UPLOAD_CLIENT, f"{TS_RECEIVER}.2", str(size), f"{limit:g}",
                       timeout=limit + 20, check=False)
        try:
            return json.loads(r.stdout.strip().splitlines()[-1])
        except (IndexError, ValueError):
            return {"bytes": 0, "seconds": limit, "complete": False,
                    "error": (r.stderr or r.stdout).strip()[-200:]}


def kernel_ccs_here() -> tuple[list[str], list[str]]:
    """The kernel senders this host allows (reno always), and notes on what is missing."""
    def read(name: str) -> set[str]:
        try:
            return set(Path(f"/proc/sys/net/ipv4/{name}").read_text().split())
        except OSError:
            return set()

    available = read("tcp_available_congestion_control")
    allowed = read("tcp_allowed_congestion_control") | {"reno"}
    notes = []
    ccs = ["reno"]
    if "bbr" in available and "bbr" in allowed:
        ccs.append("bbr")
    else:
        why = "not available" if "bbr" not in available else "not allowed in a namespace"
        notes.append(f"kernel bbr skipped: bbr is {why} on this host "
                     f"(available: {' '.join(sorted(available)) or '?'}; "
                     f"allowed: {' '.join(sorted(allowed))}); the best pairing uses reno")
    return ccs, notes


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


def tables(result: dict) -> str:
    senders, best = result["senders"], result["best_pairing"]
    tapstack = [s for s in senders if s.startswith("tapstack ")]
    refs = [r for r in ("kernel reno", "kernel bbr", best) if r in senders]
    head = ["loss each way (%)", "RTT added (ms)", "ping RTT (ms)", "loss measured (%)"]
    lines = ["**Throughput (MB/s)**, * = a capped transfer in the median", "",
             "| " + " | ".join(head + senders) + " |", "|" + "---|" * (len(head) + len(senders))]
    for cell in result["cells"]:
        row = [f"{cell['loss_pct']:g}", f"{cell['rtt_added_ms']:g}",
               "-" if cell["ping_ms"] is None else f"{cell['ping_ms']:.3g}",
               "-" if cell["measured_loss_pct"] is None else f"{cell['measured_loss_pct']:g}"]
        for s in senders:
            r = cell["results"][s]
            row.append(f"{r['MBps']:.3g}{'' if r['complete'] else '*'}")
        lines.append("| " + " | ".join(row) + " |")
    names = [f"{t.removeprefix('tapstack ')} / {ref}" for t in tapstack for ref in refs]
    lines += ["", f"**Ratios** (tapstack sender / reference; best pairing = {best})", "",
              "| loss each way (%) | RTT added (ms) | " + " | ".join(names) + " |",
              "|" + "---|" * (2 + len(names))]
    for cell in result["cells"]:
        vals = [cell["ratios"].get(f"{t} / {ref}") for t in tapstack for ref in refs]
        lines.append(f"| {cell['loss_pct']:g} | {cell['rtt_added_ms']:g} | "
                     + " | ".join("-" if v is None else f"{v:.2f}" for v in vals) + " |")
    return "\n".join(lines)


def heatmap(result: dict, path: Path) -> str | None:
    """tapstack bbr / best pairing and tapstack cubic / kernel reno, per cell."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.colors import LogNorm
    except ImportError:
        return "no heat map: matplotlib is not installed (pip install matplotlib)"
    losses = sorted({c["loss_pct"] for c in result["cells"]})
    rtts = sorted({c["rtt_added_ms"] for c in result["cells"]})
    panels = [("tapstack bbr", result["best_pairing"]), ("tapstack cubic", "kernel reno")]
    fig, axes = plt.subplots(1, 2, figsize=(4 + 2.2 * len(rtts), 1.5 + 0.6 * len(losses)),
                             squeeze=False)
    for ax, (num, den) in zip(axes[0], panels, strict=True):
        grid = [[float("nan")] * len(rtts) for _ in losses]
        for c in result["cells"]:
            v = c["ratios"].get(f"{num} / {den}")
            if v:
                grid[losses.index(c["loss_pct"])][rtts.index(c["rtt_added_ms"])] = v
        im = ax.imshow(grid, cmap="RdYlGn", norm=LogNorm(vmin=0.1, vmax=10), aspect="auto")
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                ax.text(j, i, "-" if v != v else f"{v:.2f}", ha="center", va="center",
                        fontsize=9)
        ax.set_xticks(range(len(rtts)), [f"+{r:g}" for r in rtts])
        ax.set_yticks(range(len(losses)), [f"{p:g} %" for p in losses])
        ax.set_xlabel("RTT added (ms)")
        ax.set_ylabel("loss each way")
        ax.set_title(f"{num} / {den}", fontsize=10)
        fig.colorbar(im, ax=ax, shrink=0.8)
    fig.suptitle("throughput ratio per cell: above 1 (green), the tapstack sender is faster",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return None


def save(out: Path, name: str, args: argparse.Namespace, result: dict) -> str:
    """bench/results/NAME.{md,json}: the tables under a line saying when and how."""
    runs = "one run" if args.runs == 1 else f"medians of {args.runs} runs"
    md = (f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on "
          f"{os.cpu_count()} CPUs{' (--quick)' if args.quick else ''}; "
          f"{args.size_mb:g} MB per transfer, {runs}, each capped at {args.max_seconds:g} s. "
          "Loss: iptables random drop of TCP in a Linux router, each way. RTT added: a "
          "tapstack router with --impair delay on the path (absent at +0). Every sender "
          "crosses the same path to a Linux receiver (curl), the best pairing to "
          "tapstack's /upload. MB/s = 10^6 bytes/s.\n\n"
          + tables(result) + "\n")
    if result["notes"]:
        md += "\n" + "\n".join(f"- {n}" for n in result["notes"]) + "\n"
    (out / f"{name}.md").write_text(md)
    (out / f"{name}.json").write_text(json.dumps(result, indent=1))
    print(md)
    return md


def numbers(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help="loss 0,5 %% x RTT +0 ms, 2 MB, one run, 15 s cap (a smoke test)")
    p.add_argument("--loss", type=numbers, help="loss percentages, each way "
                   "(default: 0,1,2,5,10)")
    p.add_argument("--rtt", type=numbers, help="RTT added, ms (default: 0,10,50)")
    p.add_argument("--size-mb", type=float, help="MB (2^20 bytes) per transfer (default: 20)")
    p.add_argument("--runs", type=int, help="runs per cell, median (default: 3)")
    p.add_argument("--max-seconds", type=float,
                   help="cap on one transfer; a capped one counts what it delivered "
                        "(default: 60)")
    p.add_argument("--senders", help="comma-separated subset of: tapstack cubic, tapstack "
                   "newreno, tapstack bbr, kernel reno, kernel bbr, best")
    p.add_argument("--time-limit", type=float, default=0,
                   help="stop (and clean up) after this many seconds; 0: no limit")
    p.add_argument("--out", default=str(REPO / "bench" / "results"))
    args = p.parse_args()
    defaults = ((0, 5), (0,), 2, 1, 15) if args.quick else ((0, 1, 2, 5, 10), (0, 10, 50), 20,
                                                             3, 60)
    args.loss = args.loss or list(defaults[0])
    args.rtt = args.rtt or list(defaults[1])
    args.size_mb = args.size_mb or defaults[2]
    args.runs = args.runs or defaults[3]
    args.max_seconds = args.max_seconds or defaults[4]
    if any(not 0 <= x < 100 for x in args.loss) or any(x < 0 for x in args.rtt):
        p.error("--loss takes percentages in [0, 100), --rtt milliseconds >= 0")
    for tool in ("ip", "iptables", "curl", "ping", "timeout"):
        if shutil.which(tool) is None:
            p.error(f"{tool} is not installed")
    size = int(args.size_mb * 1024 * 1024)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def stop_now(signum, _frame):
        raise TimeoutError("--time-limit reached" if signum == signal.SIGALRM
                           else f"signal {signum}")

    signal.signal(signal.SIGTERM, stop_now)
    signal.signal(signal.SIGALRM, stop_now)
    if args.time_limit:
        signal.setitimer(signal.ITIMER_REAL, args.time_limit)

    kernel_ccs, notes = kernel_ccs_here()
    best = f"kernel {kernel_ccs[-1]} -> tapstack"
    wanted = [f"tapstack {cc}" for cc in TAPSTACK_CCS] + [f"kernel {cc}" for cc in KERNEL_CCS]
    wanted = [s for s in wanted if not s.startswith("kernel ") or s[7:] in kernel_ccs] + [best]
    if args.senders:
        chosen = {s.strip() for s in args.senders.split(",")}
        wanted = [s for s in wanted if s in chosen or (s == best and "best" in chosen)]
    failed = False
    workdir = Path(tempfile.mkdtemp(prefix="bench-matrix-"))
    bench = Bench(workdir)
    cells = []
    senders = wanted
    diagnosed: set[str] = set()
    try:
        tapstack_up = bench.build(kernel_ccs)
        lost = [s for s in wanted if s.startswith("tapstack ") and s not in tapstack_up]
        failed = bool(lost)
        senders = [s for s in wanted if s not in lost]
        for rtt in args.rtt:
            bench.core_up(rtt)
            try:
                ping = bench.ping_ms(3 if args.quick else 10)
                if ping is None:
                    raise RuntimeError(f"no ping answer across the path (RTT +{rtt:g} ms)")
                for loss in args.loss:
                    bench.set_loss(loss)
                    runs: dict[str, list[dict]] = {s: [] for s in senders}
                    for _ in range(args.runs):
                        for s in senders:  # interleaved: drift hits every sender alike
                            if s == best:
                                r = bench.upload(f"k{kernel_ccs[-1]}", size, args.max_seconds)
                            elif s.startswith("tapstack "):
                                r = bench.download(f"{TS_SENDER[s[9:]]}.2", size,
                                                   args.max_seconds)
                            else:
                                r = bench.download(f"{KERNEL_SENDER[s[7:]]}.2", size,
                                                   args.max_seconds)
                            r["MBps"] = round(r["bytes"] / r["seconds"] / 1e6, 3)
                            runs[s].append(r)
                            time.sleep(0.2)
                    cell = {"loss_pct": loss, "rtt_added_ms": rtt,
                            "delay_per_pass_ms": rtt / 4, "ping_ms": ping,
                            "measured_loss_pct": bench.measured_loss(), "results": {}}
                    for s, rs in runs.items():
                        med = statistics.median(r["MBps"] for r in rs)
                        cell["results"][s] = {"MBps": round(med, 3), "runs": rs,
                                              "complete": all(r["complete"] for r in rs)}
                    mbps = {s: v["MBps"] for s, v in cell["results"].items()}
                    for s, v in mbps.items():  # nothing delivered: say why, if tapstack knows
                        key = "tapstack receiver" if s == best else s
                        if not v and key.startswith("tapstack ") and key not in diagnosed:
                            diagnosed.add(key)
                            if note := bench.tapstack_health(key):
                                notes.append(note)
                    cell["ratios"] = {f"{t} / {ref}": ratio(mbps[t], mbps[ref])
                                      for t in senders if t.startswith("tapstack ")
                                      for ref in ("kernel reno", "kernel bbr", best)
                                      if ref in mbps}
                    cells.append(cell)
                    print(f"loss {loss:g} % RTT +{rtt:g} ms (ping {ping} ms):",
                          json.dumps(mbps), flush=True)
            finally:
                bench.core_down()
    except (TimeoutError, RuntimeError) as exc:
        notes.append(f"stopped early: {exc}")
        failed = True
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the cleanup is not interrupted
        bench.close()
        notes += bench.notes
        shutil.rmtree(workdir, ignore_errors=True)
    if not cells:
        print("bench_matrix: nothing measured;", "; ".join(notes), file=sys.stderr)
        return 1
    if any(c["rtt_added_ms"] > 0 for c in cells):
        notes.append("columns with RTT added go through a tapstack (Python) router: its "
                     "forwarding rate bounds every sender there, the kernel's too")
    result = {"params": {"loss_pct": args.loss, "rtt_added_ms": args.rtt, "bytes": size,
                         "runs": args.runs, "max_seconds": args.max_seconds,
                         "quick": args.quick},
              "senders": senders, "best_pairing": best, "notes": notes, "cells": cells}
    name = "matrix-quick" if args.quick else "matrix"
    problem = heatmap(result, out / f"{name}.png")
    if problem:
        result["notes"].append(problem)
        print(problem)
    save(out, name, args, result)
    return 1 if failed else 0


if __name__ == "__main__":
    if os.geteuid() != 0:
        sys.exit("bench: needs root (network namespaces, TAPs, veth, iptables)")
    sys.exit(main())
