"""Seeing inside: `tapstack trace` during a real curl (matched to the --pcap capture by
frame number), `tapstack run --trace FILE`, `tapstack conns` during a slow download."""

from __future__ import annotations

import json
import subprocess
import time

from tests.integration.conftest import REPO, STACK_IP, in_ns, require_tool, tapstack_cmd


def _trace_process(ns: str, *args: str) -> subprocess.Popen:
    proc = subprocess.Popen(tapstack_cmd("trace", "--netns", ns, *args), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stderr.readline()  # "tracing node ...": it is subscribed
    assert line.startswith("tracing node"), line
    return proc


def test_trace_during_curl_matches_the_capture(start_stack, tmp_path):
    require_tool("tshark")
    st = start_stack()
    tracer = _trace_process(st.ns, "--json", "--seconds", "20")
    r = in_ns(st.ns, "curl", "-sS", "-o", "/dev/null", f"http://{STACK_IP}/bytes/3000")
    assert r.returncode == 0, r.stderr
    events = []
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        line = tracer.stdout.readline()
        if not line:
            break
        events.append(json.loads(line))
        if events[-1]["event"] == "state" and events[-1]["new"] == "CLOSED":
            break
    tracer.terminate()
    tracer.wait(timeout=10)
    story = []
    for e in events:
        if (e["layer"] == "arp" and e["event"] != "hit") or \
                (e["layer"] == "link" and e.get("proto") == "arp"):
            story.append("arp")  # the kernel asks, we learn it and answer
        elif e["event"] == "state":
            story.append(f"{e['old']}->{e['new']}")
        elif e["layer"] == "http" and e["event"] == "request":
            story.append(f"{e['method']} {e['target']}")
        elif e["layer"] == "link" and e.get("proto") == "tcp" and "F" in e["flags"]:
            story.append(f"FIN {e['event']}")
    compact = [s for i, s in enumerate(story) if i == 0 or s != story[i - 1]]
    assert compact[0] == "arp", compact  # the kernel asked who we are first
    assert compact[1:] == ["CLOSED->SYN-RECEIVED", "SYN-RECEIVED->ESTABLISHED",
                           "GET /bytes/3000", "FIN rx", "ESTABLISHED->CLOSE-WAIT",
                           "CLOSE-WAIT->LAST-ACK", "FIN tx", "LAST-ACK->CLOSED"], compact
    # every frame event names the capture's frame, and tshark agrees on what it is
    frames = {e["frame"]: e for e in events if e["layer"] == "link" and "frame" in e
              and e.get("proto") == "tcp"}
    assert len(frames) >= 8
    st.stop()
    out = subprocess.run(["tshark", "-r", str(st.pcap), "-Y", "tcp", "-T", "fields",
                          "-e", "frame.number", "-e", "ip.src", "-e", "tcp.srcport",
                          "-e", "tcp.seq_raw", "-e", "tcp.len"],
                         capture_output=True, text=True, timeout=60)
    seen = {}
    for line in out.stdout.splitlines():
        number, src, sport, seq, length = line.split("\t")
        seen[int(number)] = (src, int(sport), int(seq), int(length))
    for number, e in frames.items():
        assert seen[number] == (e["src"], e["sport"], e["seq"], e["data"]), (number, e)


def test_run_trace_file_records_from_the_start(start_stack, tmp_path):
    path = tmp_path / "trace.jsonl"
    st = start_stack("--trace", str(path), pcap=False)
    in_ns(st.ns, "ping", "-c", "2", "-i", "0.2", STACK_IP)
    st.stop()
    events = [json.loads(line) for line in path.read_text().splitlines()]
    assert events[0]["layer"] == "link" and events[0]["event"] == "tx"  # the announcement
    assert events[0]["op"] == "request" and events[0]["target"] == STACK_IP
    echo = [e for e in events if e["layer"] == "link" and e.get("proto") == "icmp"]
    assert [(e["event"], e["type"]) for e in echo] == [("rx", 8), ("tx", 0)] * 2


def test_conns_during_a_slow_download(start_stack):
    st = start_stack(pcap=False)
    curl = subprocess.Popen(["ip", "netns", "exec", st.ns, "curl", "-sS", "-o", "/dev/null",
                             "--limit-rate", "300k", f"http://{STACK_IP}/bytes/3000000"])
    try:
        found = None
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and found is None:
            r = subprocess.run(tapstack_cmd("conns", "--netns", st.ns, "--json"), cwd=REPO,
                               capture_output=True, text=True, timeout=10, check=True)
            answer = json.loads(r.stdout)
            for c in answer["connections"]:
                if c["local"] == f"{STACK_IP}:80" and c["state"] == "ESTABLISHED" \
                        and c["srtt_ms"] and c["bytes_acked"] > 100_000:
                    found = c
            time.sleep(0.2)
        assert found is not None, answer
        assert found["cwnd"] > 0 and found["rto_ms"] >= 200
        assert found["congestion_control"] == "cubic"
        assert "*:80" in answer["listeners"]
        text = subprocess.run(tapstack_cmd("conns", "--netns", st.ns), cwd=REPO,
                              capture_output=True, text=True, timeout=10).stdout
        assert "ESTABLISHED" in text and "cwnd:" in text and "rtt:" in text
    finally:
        curl.kill()
        curl.wait()


def test_stats_nonzero_and_a_closed_pipe(start_stack):
    st = start_stack(pcap=False)
    r = subprocess.run(tapstack_cmd("stats", "--netns", st.ns, "--nonzero"), cwd=REPO,
                       capture_output=True, text=True, timeout=10)
    values = [line.split() for line in r.stdout.splitlines()[1:] if line.startswith("  ")]
    assert values and all(int(v[1]) != 0 for v in values), r.stdout
    assert "listeners" in r.stdout and "listening ports, not connections" in r.stdout
    assert "state_listen" not in subprocess.run(
        tapstack_cmd("stats", "--netns", st.ns), cwd=REPO, capture_output=True, text=True,
        timeout=10).stdout
    me = " ".join(tapstack_cmd("stats", "--netns", st.ns))
    r = subprocess.run(["bash", "-c", f"set -o pipefail; {me} | head -1"], cwd=REPO,
                       capture_output=True, text=True, timeout=10)
    assert r.stdout.startswith("tapstack 10.77.0.2/24 on tap0") and r.stderr == ""


def test_plot_of_a_lossy_download_marks_its_retransmissions(start_stack, tmp_path):
    """Loss made by tapstack's own impairment (2 % each way, seeded): the plot's
    retransmissions are exactly the data segments tshark flags as resent or out of
    order, and the trace gives cwnd and srtt on the capture's time axis."""
    require_tool("tshark")
    from stack.plot import read_connection

    trace = tmp_path / "t.jsonl"
    st = start_stack("--impair", "loss=2%,seed=11", "--trace", str(trace))
    r = in_ns(st.ns, "curl", "-sS", "-o", "/dev/null", f"http://{STACK_IP}/bytes/2000000",
              timeout=60)
    assert r.returncode == 0, r.stderr
    st.stop()
    series = read_connection(str(st.pcap), 80, str(trace))
    assert series.sender == (STACK_IP, 80) and series.bytes == max(
        end for _, _, end in series.segments + series.retransmissions)
    assert series.bytes > 2_000_000  # the body and the response head
    assert len(series.retransmissions) >= 3
    out = subprocess.run(["tshark", "-r", str(st.pcap), "-Y",
                          "tcp.srcport==80 and tcp.len>0 and (tcp.analysis.retransmission or "
                          "tcp.analysis.fast_retransmission or "
                          "tcp.analysis.spurious_retransmission or tcp.analysis.out_of_order)",
                          "-T", "fields", "-e", "frame.number"],
                         capture_output=True, text=True, timeout=60)
    assert set(series.retransmission_frames) == {int(n) for n in out.stdout.split()}
    assert len(series.cwnd) > 10 and all(c > 0 for _, c in series.cwnd)
    assert all(0 <= t <= series.duration for t, _ in series.cwnd)
    png = tmp_path / "plot.png"
    r = subprocess.run(tapstack_cmd("plot", str(st.pcap), "--trace", str(trace), "--port",
                                    "80", "--out", str(png)),
                       cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert f"{len(series.retransmissions)} retransmissions" in r.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20000
