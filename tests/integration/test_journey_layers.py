"""One frame opened layer by layer: real curl fetches https://www.bob.com:8443/ (TLS 1.3,
HTTP/1.1) from openssl s_server on the loopback of a namespace of the test's own, tcpdump
captures it with curl's key log beside it, and tshark's dissection is checked against the
bytes of the capture read independently with dpkt."""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import subprocess
from pathlib import Path

import dpkt
import pytest

from stack.certs import LabCA
from stack.journey.layers import LayersError, layers_html, open_frame, request_frame
from tests.integration.conftest import listening, require_tool, wait_for

PORT = 8443


def _tool(name: str) -> None:
    """Skip where the tool is absent, except in CI, which must run every test."""
    if shutil.which(name) is None and not os.environ.get("CI"):
        pytest.skip(f"{name} is not installed")
    require_tool(name)


def _stop(p: subprocess.Popen, sig: int) -> None:
    if p.poll() is None:
        p.send_signal(sig)
    try:
        p.wait(timeout=10)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait(timeout=5)


@pytest.fixture(scope="module")
def capture(tmp_path_factory):
    """(pcap, key log) of one curl to www.bob.com:8443 inside the namespace's loopback."""
    for tool in ("tshark", "openssl", "curl", "tcpdump"):
        _tool(tool)
    d = tmp_path_factory.mktemp("layers")
    ca = LabCA(str(d))
    cert, key = ca.issue(["www.bob.com"])
    pcap, keylog = d / "lo.pcap", d / "tls-keys.log"
    ns = f"tslayers-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True, capture_output=True)
    procs: list[subprocess.Popen] = []
    try:
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        server = subprocess.Popen(
            ["ip", "netns", "exec", ns, "timeout", "-k", "2", "60", "openssl", "s_server",
             "-accept", f"127.0.0.1:{PORT}", "-www", "-tls1_3", "-cert", cert, "-key", key,
             "-quiet"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)
        procs.append(server)
        assert wait_for(lambda: listening(ns, PORT), bool), "openssl s_server did not listen"
        dump = subprocess.Popen(
            ["ip", "netns", "exec", ns, "timeout", "-k", "2", "60", "tcpdump", "-i", "lo",
             "-U", "--immediate-mode", "-n", "-s", "0", "-Z", "root", "-w", str(pcap)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        procs.append(dump)
        line = dump.stderr.readline()
        assert "listening on" in line, f"tcpdump did not start: {line}"
        r = subprocess.run(
            ["ip", "netns", "exec", ns, "env", f"SSLKEYLOGFILE={keylog}", "timeout", "-k",
             "2", "30", "curl", "-sS", "--http1.1", "--max-time", "20", "--resolve",
             f"www.bob.com:{PORT}:127.0.0.1", "--cacert", ca.cert_path, "-o", os.devnull,
             f"https://www.bob.com:{PORT}/"], capture_output=True, text=True, timeout=40)
        assert r.returncode == 0, r.stderr
        _stop(dump, signal.SIGINT)  # tcpdump writes out what it holds and exits
    finally:
        for p in reversed(procs):
            _stop(p, signal.SIGTERM)
        subprocess.run(["ip", "netns", "delete", ns], check=False, capture_output=True)
    assert keylog.stat().st_size > 0, "curl wrote no TLS key log"
    return pcap, keylog


def _frame_bytes(pcap: Path, number: int) -> bytes:
    """Frame `number` (1-based) as the file holds it, read without tshark."""
    with open(pcap, "rb") as f:
        for n, (_ts, buf) in enumerate(dpkt.pcap.Reader(f), start=1):
            if n == number:
                return bytes(buf)
    raise AssertionError(f"{pcap} has no frame {number}")


def _fields(layer: dict) -> dict[str, str]:
    return dict(layer["fields"])


@pytest.mark.timeout(60)
def test_the_request_frame_is_found_with_the_key_log(capture):
    pcap, keylog = capture
    number = request_frame(pcap, keylog)
    assert number is not None
    eth = dpkt.ethernet.Ethernet(_frame_bytes(pcap, number))
    tcp = eth.data.data
    assert tcp.dport == PORT
    assert tcp.data[:1] == b"\x17"  # an application_data record: nothing readable on the wire
    assert b"GET" not in tcp.data


@pytest.mark.timeout(60)
def test_layers_in_order_tile_the_frame(capture):
    pcap, keylog = capture
    number = request_frame(pcap, keylog)
    opened = open_frame(pcap, number, keylog)
    wire = _frame_bytes(pcap, number)
    assert opened["frame"] == number
    assert opened["length"] == len(wire)
    assert bytes.fromhex(opened["hex"]) == wire
    layers = opened["layers"]
    assert [ly["name"] for ly in layers] == ["Ethernet", "IPv4", "TCP", "TLS", "HTTP"]
    assert [ly["osi"] for ly in layers] == [2, 3, 4, 6, 7]
    on_wire = layers[:4]
    assert on_wire[0]["offset"] == 0
    for before, after in itertools.pairwise(on_wire):
        assert after["offset"] == before["offset"] + before["length"], (before, after)
    assert on_wire[-1]["offset"] + on_wire[-1]["length"] == len(wire)
    for layer in on_wire:
        start = layer["offset"]
        assert bytes.fromhex(layer["hex"]) == wire[start:start + layer["length"]]
    eth, ip, tcp, tls, http = layers
    assert eth["length"] == 14
    ihl = (wire[14] & 0x0F) * 4
    assert ip["length"] == ihl
    assert _fields(ip)["Header length"].startswith(f"{ihl} bytes")
    data_offset = (wire[14 + ihl + 12] >> 4) * 4
    assert tcp["length"] == data_offset
    assert _fields(tcp)["Header length"].startswith(f"{data_offset} bytes")
    assert http["offset"] is None and http["decrypted"] is True


@pytest.mark.timeout(60)
def test_fields_say_what_the_wire_carried(capture):
    pcap, keylog = capture
    number = request_frame(pcap, keylog)
    eth, ip, tcp, tls, http = open_frame(pcap, number, keylog)["layers"]
    seg = dpkt.ethernet.Ethernet(_frame_bytes(pcap, number)).data.data
    assert _fields(eth)["EtherType"].startswith("0x0800")
    f = _fields(ip)
    assert f["Source address"] == f["Destination address"] == "127.0.0.1"
    assert f["Version"] == "4"
    assert f["Protocol"].startswith("6")
    f = _fields(tcp)
    assert f["Destination port"] == str(PORT)
    assert f["Source port"] == str(seg.sport)
    assert f["Sequence number"].split()[0] == str(seg.seq)  # the raw number, not relative
    assert f["Acknowledgment number"].split()[0] == str(seg.ack)
    assert "ACK" in f["Flags"]
    assert "TS" in f["Options"]
    f = _fields(tls)
    assert f["Content type (on the wire)"].startswith("23 (application_data)")
    assert f["Version"].startswith("0x0303")
    assert f["Length"] == f"{int.from_bytes(seg.data[3:5], 'big')} bytes"
    assert "decrypted with the key log" in f["Real content type"]
    fields = http["fields"]
    assert fields[0] == ("Request line", "GET / HTTP/1.1")
    assert ("Host", f"www.bob.com:{PORT}") in fields
    assert http["text"].startswith(f"GET / HTTP/1.1\r\nHost: www.bob.com:{PORT}\r\n")
    assert bytes.fromhex(http["hex"]).decode("latin-1") == http["text"]


@pytest.mark.timeout(60)
def test_without_the_key_log_tls_stays_opaque(capture):
    pcap, keylog = capture
    number = request_frame(pcap, keylog)
    opened = open_frame(pcap, number, None)
    assert [ly["name"] for ly in opened["layers"]] == ["Ethernet", "IPv4", "TCP", "TLS"]
    tls = _fields(opened["layers"][-1])
    assert tls["Content type (on the wire)"].startswith("23")
    assert tls["Real content type"].startswith("hidden")
    empty = keylog.with_name("no-keys.log")
    empty.write_text("")
    assert request_frame(pcap, empty) is None  # no secrets, no HTTP to find


@pytest.mark.timeout(60)
def test_html_shows_each_layer_and_the_decrypted_request(capture):
    pcap, keylog = capture
    number = request_frame(pcap, keylog)
    page = layers_html(open_frame(pcap, number, keylog))
    for name in ("Ethernet", "IPv4", "TCP", "TLS", "HTTP"):
        assert name in page
    assert "GET / HTTP/1.1" in page
    assert f"Host: www.bob.com:{PORT}" in page
    assert "decrypted" in page
    lowered = page.lower()
    for forbidden in ("<script", "src=", "href=", "@import", "url("):
        assert forbidden not in lowered


@pytest.mark.timeout(60)
def test_a_missing_frame_is_one_clear_error(capture):
    pcap, keylog = capture
    with pytest.raises(LayersError, match="no frame 100000"):
        open_frame(pcap, 100000, keylog)
    with pytest.raises(LayersError, match="does not exist"):
        open_frame(pcap.with_name("absent.pcap"), 1, None)
