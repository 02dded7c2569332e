"""The same video over UDP (live MPEG-TS) and over TCP (HLS), at several loss rates on
the viewer's link: what each costs the viewer. Prints a Markdown table.

    sudo .venv/bin/python tools/video_loss.py [--seconds 20] [--loss 0,1,5]

One tapstack serves a ladder over HTTP in a namespace of its own; a second tapstack in
the same namespace (tap1) sends the 360p rendition live over UDP; the viewer is a
namespace one routed hop away, and the kernel drops the given share of what is
forwarded towards it (iptables statistic, UDP and TCP alike). Per loss rate:

- UDP: ffmpeg decodes `udp://`: frames out of those sent, and the damage it reports;
- TCP: ffmpeg decodes the HLS rendition (every frame, or not), tapstack's
  retransmissions, and the Python player fixed to 360p: startup delay and stalls.

Everything it makes lives in namespaces it creates and deletes; it kills only what it
started.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from stack.video.live import receiver_report  # noqa: E402

TAPSTACK = [sys.executable, "-m", "stack.cli"]
SERVER, VIEWER = "vloss-srv", "vloss-view"


def sh(*cmd: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=check,
                          cwd=REPO)


def in_ns(ns: str, *cmd: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return sh("ip", "netns", "exec", ns, *cmd, timeout=timeout, check=False)


def setup() -> None:
    sh("ip", "netns", "add", SERVER)
    sh("ip", "netns", "add", VIEWER)
    for cmd in (["ip", "link", "add", "rt0", "netns", SERVER, "type", "veth", "peer", "name",
                 "rt1", "netns", VIEWER],
                ["ip", "-n", SERVER, "addr", "add", "10.78.0.1/24", "dev", "rt0"],
                ["ip", "-n", SERVER, "link", "set", "rt0", "up"],
                ["ip", "-n", VIEWER, "addr", "add", "10.78.0.2/24", "dev", "rt1"],
                ["ip", "-n", VIEWER, "link", "set", "rt1", "up"],
                ["ip", "-n", VIEWER, "link", "set", "lo", "up"],
                ["ip", "-n", VIEWER, "route", "add", "default", "via", "10.78.0.1"],
                ["ip", "netns", "exec", SERVER, "sysctl", "-qw", "net.ipv4.ip_forward=1"]):
        sh(*cmd)


def teardown() -> None:
    for ns in (VIEWER, SERVER):
        sh("ip", "netns", "delete", ns, check=False)


def one(ladder: Path, seconds: float, loss: float) -> dict:
    sh("ip", "netns", "exec", SERVER, "iptables", "-F", "FORWARD")
    if loss:
        sh("ip", "netns", "exec", SERVER, "iptables", "-A", "FORWARD", "-o", "rt0", "-m",
           "statistic", "--mode", "random", "--probability", str(loss), "-j", "DROP")
    ff = subprocess.Popen(["ip", "netns", "exec", VIEWER, "timeout", "-k", "5",
                           str(seconds + 30), "ffmpeg", "-hide_banner", "-nostdin", "-i",
                           "udp://0.0.0.0:5006?timeout=3000000&fifo_size=100000", "-f",
                           "null", "-"], stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)  # ffmpeg opens its socket (a tool, not a test: a pause is enough)
    sent = sh(*TAPSTACK, "hls", "send", "--netns", SERVER, "--tap", "tap1", "--address",
              "10.77.1.2/24", "--host-address", "10.77.1.1/24", "--mac", "02:00:0a:4d:01:02",
              str(ladder / "360p"), "udp://10.78.0.2:5006", timeout=seconds + 30)
    udp = receiver_report(ff.communicate(timeout=seconds + 40)[1])
    stats = [*TAPSTACK, "stats", "--netns", SERVER, "--json"]
    before = json.loads(sh(*stats).stdout)["counters"]["tcp"].get("retransmits", 0)
    hls = in_ns(VIEWER, "timeout", "-k", "5", str(seconds * 4 + 30), "ffmpeg",
                "-hide_banner", "-nostdin", "-i", "http://10.77.0.2/360p/index.m3u8", "-f",
                "null", "-", timeout=seconds * 4 + 40)
    tcp = receiver_report(hls.stderr)
    log = Path(tempfile.mkstemp(suffix=".json")[1])
    in_ns(VIEWER, *TAPSTACK, "hls", "play", "http://10.77.0.2/master.m3u8", "--rule",
          "fixed", "--variant", "360p", "--log", str(log), timeout=seconds * 4 + 40)
    run = json.loads(log.read_text()) if log.stat().st_size else {}
    log.unlink()
    after = json.loads(sh(*stats).stdout)["counters"]["tcp"].get("retransmits", 0)
    return {"loss": loss, "sent": json.loads(sent.stdout)["datagrams"], "udp": udp,
            "tcp": tcp, "retransmits": after - before, "startup": run.get("startup_s"),
            "stalls": run.get("stalls", []), "stall_total": run.get("stall_total_s")}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=20.0, help="video length")
    p.add_argument("--loss", default="0,1,5", help="loss rates in percent")
    p.add_argument("--plot", metavar="PNG", help="also draw the comparison here")
    p.add_argument("--json", metavar="FILE", help="also write the rows here")
    args = p.parse_args()
    if os.geteuid() != 0:
        print("tools/video_loss.py: run as root (namespaces, iptables)", file=sys.stderr)
        return 2
    frames = int(args.seconds * 25)
    with tempfile.TemporaryDirectory() as tmp:
        ladder = Path(tmp) / "ladder"
        sh(*TAPSTACK, "hls", "make", str(ladder), "--duration", f"{args.seconds:g}",
           timeout=600)
        teardown()
        setup()
        server = subprocess.Popen([*TAPSTACK, "run", "--netns", SERVER, "--root",
                                   str(ladder), "--no-access-log"], cwd=REPO,
                                  stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        rows = []
        try:
            server.stdout.readline()  # its banner: it is up
            for pct in (float(x) for x in args.loss.split(",")):
                rows.append(one(ladder, args.seconds, pct / 100))
        finally:
            server.terminate()
            server.wait(timeout=20)
            teardown()
    print(f"| loss | UDP: frames decoded (of {frames}) | UDP: damage ffmpeg reported | "
          "TCP/HLS: frames decoded | TCP: retransmissions | HLS player (360p): startup, "
          "stalls |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        u, t = r["udp"], r["tcp"]
        damage = (f"{u['corrupt_packets']} corrupt packets, {u['concealed_frames']} "
                  f"pictures concealed, {u['decode_errors']} decode errors")
        print(f"| {r['loss']:.0%} | {u['frames']} | {damage} | {t['frames']} "
              f"({t['corrupt_packets'] + t['concealed_frames']} damaged) | {r['retransmits']}"
              f" | {r['startup']} s, {len(r['stalls'])} stalls ({r['stall_total']} s) |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    if args.plot:
        plot(rows, frames, args.plot)
    return 0


def plot(rows: list[dict], frames: int, out: str) -> None:
    """Per loss rate: what UDP cost in pictures (lost, concealed), what TCP cost in time
    (startup, stalls) and in retransmissions."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['loss']:.0%}" for r in rows]
    xs = range(len(rows))
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.bar([x - 0.2 for x in xs], [frames - r["udp"]["frames"] for r in rows], 0.4,
          label="frames never decoded", color="#c0392b")
    a.bar([x + 0.2 for x in xs], [r["udp"]["concealed_frames"] for r in rows], 0.4,
          label="pictures concealed", color="#e67e22")
    a.set_title(f"live over UDP (of {frames} frames)")
    b.bar([x - 0.2 for x in xs], [(r["startup"] or 0) + (r["stall_total"] or 0)
                                  for r in rows], 0.4, label="startup + stalls (s)",
          color="#1f77b4")
    b2 = b.twinx()
    b2.bar([x + 0.2 for x in xs], [r["retransmits"] for r in rows], 0.4,
           label="TCP retransmissions", color="#7f7f7f")
    b.set_title("HLS over TCP: every frame decoded")
    for ax in (a, b):
        ax.set_xticks(list(xs), labels)
        ax.set_xlabel("loss towards the viewer")
    a.legend(fontsize=8)
    b.legend(loc="upper left", fontsize=8)
    b2.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
