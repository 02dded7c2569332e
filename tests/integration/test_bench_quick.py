"""The benchmarks' --quick runs (tools/bench.py, bench_forward.py, bench_dns.py,
bench_tls.py, bench_trace.py, bench_matrix.py) produce every figure for every target
(nothing about speed)."""

import json
import subprocess
import sys

import pytest

from tests.integration.conftest import REPO, require_tool


@pytest.mark.timeout(480)  # six servers measured one after the other, about 90 s here
def test_bench_quick_produces_every_figure(tmp_path):
    for tool in ("wrk", "ab", "curl", "ping"):
        require_tool(tool)
    r = subprocess.run([sys.executable, "tools/bench.py", "--quick", "--out", str(tmp_path)],
                       cwd=REPO, capture_output=True, text=True, timeout=480)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    results = json.loads((tmp_path / "quick.json").read_text())
    assert set(results) == {"tapstack", "tapstack --offload csum", "tapstack --offload",
                            "tapstack --workers 2", "kernel", "kernel --workers 2"}
    keys = {"download", "upload", "wrk1", "wrk1_p99", "wrk50", "wrk50_p99", "wrk10_2k",
            "wrk10_2k_p99", "ab", "ping_p50", "ping_p99", "idle_kb", "idle_cpu"}
    for name, figures in results.items():
        assert set(figures) == keys, name
        assert all(figures[k] > 0 for k in keys - {"idle_cpu"}), (name, figures)
    table = (tmp_path / "quick.md").read_text()
    assert "| bulk download, curl /bytes/ (MB/s) |" in table
    assert (tmp_path / "quick.png").stat().st_size > 1000


def test_bench_forward_quick_produces_every_figure(tmp_path):
    for tool in ("iperf3", "ab", "iptables"):
        require_tool(tool)
    r = subprocess.run([sys.executable, "tools/bench_forward.py", "--quick", "--out",
                        str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    results = json.loads((tmp_path / "forward-quick.json").read_text())
    routers = {"tapstack", "tapstack offload", "linux", "tapstack nat",
               "tapstack offload nat", "linux nat"}
    assert set(results) == routers | {"hooks", "conntrack_bytes_per_flow"}
    for name in routers:
        figures = results[name]
        assert figures["bulk_MBps"] > 0 and figures["udp64_pps"] > 0, name
        assert figures["new_flows_per_s"] > 0, name
    assert results["hooks"]["us_per_packet"] > 0
    assert results["conntrack_bytes_per_flow"]["bytes"] > 0
    table = (tmp_path / "forward-quick.md").read_text()
    assert "| bulk TCP through the router, iperf3 (MB/s) |" in table


def test_bench_dns_quick_produces_every_figure(tmp_path):
    require_tool("dnsperf")
    r = subprocess.run([sys.executable, "tools/bench_dns.py", "--quick", "--out",
                        str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    results = json.loads((tmp_path / "dns-quick.json").read_text())
    assert set(results) == {"tapstack", "kernel sockets", "tapstack resolver, cache hits"}
    for name, figures in results.items():
        assert figures["qps"] > 0 and figures["latency_ms_one_at_a_time"] > 0, name


def test_bench_tls_quick_produces_every_figure(tmp_path):
    for tool in ("wrk", "ab", "curl"):
        require_tool(tool)
    r = subprocess.run([sys.executable, "tools/bench_tls.py", "--quick", "--out",
                        str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    results = json.loads((tmp_path / "tls-quick.json").read_text())
    assert set(results["tapstack"]) == {"https_download", "tls_new", "https_wrk50",
                                        "http_wrk50"}
    assert set(results["tapstack uvicorn"]) == {"http_wrk50"}
    assert set(results["kernel uvicorn"]) == {"https_download", "tls_new", "https_wrk50"}
    assert all(v > 0 for figures in results.values() for v in figures.values()), results
    assert "| new TLS connection per request, ab -c 10 (req/s) |" in \
        (tmp_path / "tls-quick.md").read_text()


def test_bench_trace_quick_produces_every_figure(tmp_path):
    r = subprocess.run([sys.executable, "tools/bench_trace.py", "--quick", "--out",
                        str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    results = json.loads((tmp_path / "trace-quick.json").read_text())
    assert set(results) == {"off", "discard", "json"}
    assert results["off"]["events"] == 0 and results["json"]["events"] > 1000
    assert all(r["seconds"] > 0 for r in results.values())


def test_bench_matrix_quick_produces_every_cell(tmp_path):
    """Loss 0 and 5 % at RTT +0: every sender delivers bytes in every cell, the loss is
    really applied (and only where asked), and the tables and heat map are written."""
    for tool in ("curl", "iptables", "ping", "timeout"):
        require_tool(tool)
    # --time-limit: the tool stops and cleans up by itself well before the kill below
    r = subprocess.run([sys.executable, "tools/bench_matrix.py", "--quick", "--time-limit",
                        "100", "--out", str(tmp_path)], cwd=REPO, capture_output=True,
                       text=True, timeout=150)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    results = json.loads((tmp_path / "matrix-quick.json").read_text())
    senders = set(results["senders"])
    assert {"tapstack cubic", "tapstack newreno", "tapstack bbr", "kernel reno"} <= senders
    best = results["best_pairing"]
    assert best in senders and best.endswith(" -> tapstack"), best
    assert [(c["loss_pct"], c["rtt_added_ms"]) for c in results["cells"]] == [(0, 0), (5, 0)]
    for cell in results["cells"]:
        assert set(cell["results"]) == senders
        for name, figures in cell["results"].items():
            assert figures["MBps"] > 0, (cell["loss_pct"], name, figures)
            if cell["loss_pct"] == 0:
                assert figures["complete"], (name, figures)
        assert cell["ping_ms"] > 0
    assert results["cells"][0]["measured_loss_pct"] == 0
    assert results["cells"][1]["measured_loss_pct"] > 0
    assert "tapstack bbr / " + best in results["cells"][0]["ratios"]
    table = (tmp_path / "matrix-quick.md").read_text()
    assert "| loss each way (%) | RTT added (ms) |" in table
    assert (tmp_path / "matrix-quick.png").stat().st_size > 1000
