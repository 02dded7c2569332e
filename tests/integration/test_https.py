"""HTTPS on tapstack's own TCP (`tapstack run --tls`), checked by real curl, openssl,
tshark and testssl.sh from the namespace."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess

import pytest

from stack.apps.services import deterministic_sha256
from tests.integration.conftest import (
    REPO,
    STACK_IP,
    StackProcess,
    in_ns,
    require_tool,
    stream_sha256,
    tapstack_cmd,
    unique_name,
)


@pytest.fixture(scope="module")
def https(tmp_path_factory):
    """tapstack serving HTTP and HTTPS (lab CA in a state directory of the test's own),
    with a certificate for www.bob.test besides its address, and a key log for tshark."""
    state = tmp_path_factory.mktemp("state")
    keylog = state / "keys.log"
    pcap = state / "https.pcap"
    env = {"TAPSTACK_STATE": str(state), "SSLKEYLOGFILE": str(keylog)}
    sp = StackProcess(unique_name(), ["--tls", "--tls-name", "www.bob.test"], pcap, env)
    sp.start()
    ca = subprocess.run(tapstack_cmd("ca"), cwd=REPO, capture_output=True, text=True,
                        env={"TAPSTACK_STATE": str(state), "PATH": "/usr/bin:/bin"},
                        check=True).stdout.strip()
    sp.ca, sp.keylog, sp.pcap_path = ca, keylog, pcap
    yield sp
    sp.stop()
    subprocess.run(["ip", "netns", "delete", sp.ns], check=False, capture_output=True)


def curl(sp, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", "netns", "exec", sp.ns, "curl", "-sS", "--cacert", sp.ca,
                           *args], capture_output=True, timeout=timeout)


def test_the_banner_says_how_to_reach_it(https):
    assert any(f"curl --cacert {https.ca} https://{STACK_IP}/" in line
               for line in https.stdout_lines), https.stdout_lines


def test_curl_by_address_tls13_verified(https):
    r = curl(https, "-v", f"https://{STACK_IP}/")
    err = r.stderr.decode()
    assert r.returncode == 0, err
    assert "SSL connection using TLSv1.3" in err
    assert "ALPN: server accepted http/1.1" in err
    assert f'host "{STACK_IP}" matched cert\'s IP address' in err
    assert STACK_IP.encode() in r.stdout  # the page itself came through
    tls = https.stats()["tls"]
    assert tls["handshakes"] >= 1 and tls["close_notify_received"] >= 1  # curl closed well


def test_curl_by_name_sni_picks_its_certificate(https):
    r = curl(https, "-v", "--resolve", f"www.bob.test:443:{STACK_IP}",
             "https://www.bob.test/")
    err = r.stderr.decode()
    assert r.returncode == 0, err
    assert "subject: CN=www.bob.test" in err


def test_a_name_not_on_the_certificate_fails_in_curl(https):
    r = curl(https, "--resolve", f"www.eve.test:443:{STACK_IP}", "https://www.eve.test/")
    assert r.returncode == 60, r.stderr  # CURLE_PEER_FAILED_VERIFICATION
    assert b"www.eve.test" in r.stderr


def test_an_unknown_ca_fails_the_handshake_on_both_sides(https, tmp_path):
    """curl checks the chain inside the handshake and sends an alert: tapstack's side of
    the handshake fails too, and counts it. (A wrong name, above, is checked by curl
    after a completed handshake: tapstack sees a clean close_notify then.)"""
    from stack.certs import LabCA

    other = LabCA(str(tmp_path)).cert_path
    failures = https.stats().get("tls", {}).get("handshake_failures", 0)
    r = subprocess.run(["ip", "netns", "exec", https.ns, "curl", "-sS", "--cacert", other,
                        f"https://{STACK_IP}/"], capture_output=True, timeout=30)
    assert r.returncode == 60, r.stderr
    assert https.stats()["tls"]["handshake_failures"] == failures + 1


def test_tls12_still_offered_with_forward_secrecy(https):
    r = curl(https, "-v", "--tls-max", "1.2", f"https://{STACK_IP}/", "-o", "/dev/null")
    err = r.stderr.decode()
    assert r.returncode == 0, err
    assert re.search(r"SSL connection using TLSv1\.2 / ECDHE-ECDSA-(AES\d+-GCM|CHACHA20)",
                     err), err


def test_openssl_s_client_shows_tls13_and_the_chain(https):
    r = in_ns(https.ns, "openssl", "s_client", "-connect", f"{STACK_IP}:443",
              "-CAfile", https.ca, "-verify_return_error", "-showcerts",
              input="", timeout=30)
    out = r.stdout
    assert r.returncode == 0, r.stderr
    assert "New, TLSv1.3, Cipher is TLS_AES" in out
    assert "Verify return code: 0 (ok)" in out
    assert re.search(r"0 s:\s?CN\s?=\s?10\.77\.0\.2", out), out
    assert re.search(r"i:\s?O\s?=\s?tapstack lab, CN\s?=\s?tapstack lab CA", out), out


def test_50mb_download_and_upload_over_https(https, random_files):
    size = 50_000_000
    assert stream_sha256(["ip", "netns", "exec", https.ns, "curl", "-sS", "--cacert",
                          https.ca, f"https://{STACK_IP}/bytes/{size}"]) == \
        (size, deterministic_sha256(size))
    path = random_files["50m"]
    r = curl(https, "--data-binary", f"@{path}", f"https://{STACK_IP}/upload", timeout=120)
    assert r.returncode == 0, r.stderr
    answer = json.loads(r.stdout)
    assert answer == {"length": 50_000_000,
                      "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


def test_tshark_decrypts_the_capture_with_the_key_log(https):
    require_tool("tshark")
    marker = "/store/decrypt-me-" + unique_name()
    r = curl(https, "-X", "PUT", "--data-binary", "secret", f"https://{STACK_IP}{marker}")
    assert r.returncode == 0, r.stderr
    assert https.keylog.exists() and "CLIENT_TRAFFIC_SECRET_0" in https.keylog.read_text()
    raw = https.pcap_path.read_bytes()
    assert marker.encode() not in raw  # on the wire it is ciphertext
    out = subprocess.run(["tshark", "-r", str(https.pcap_path), "-o",
                          f"tls.keylog_file:{https.keylog}", "-Y", "http.request",
                          "-T", "fields", "-e", "http.request.method",
                          "-e", "http.request.uri"],
                         capture_output=True, text=True, timeout=60)
    assert f"PUT\t{marker}" in out.stdout.splitlines(), out.stdout + out.stderr


def test_testssl_finds_nothing_high_or_critical(https, tmp_path):
    """Debian's testssl.sh against the HTTPS port; the lab CA is added as a trust anchor.
    A lab CA has no CRL or OCSP address: that finding may stay."""
    testssl = require_tool("testssl")
    report = tmp_path / "testssl.json"
    r = subprocess.run(["timeout", "-k", "5", "300", "ip", "netns", "exec", https.ns,
                        testssl, "--quiet", "--color", "0", "--add-ca", https.ca,
                        "--jsonfile", str(report), "--ip", "one", f"{STACK_IP}:443"],
                       capture_output=True, text=True, timeout=320, cwd=tmp_path)
    findings = json.loads(report.read_text())
    bad = [(f["id"], f["severity"], f["finding"]) for f in findings
           if f.get("severity") in ("HIGH", "CRITICAL") and f["id"] != "cert_revocation"]
    assert findings and not bad, (bad, r.stdout[-2000:])
    offered = {f["id"]: f["finding"] for f in findings}
    assert offered["TLS1_3"].startswith("offered")
    assert offered["TLS1"] == "not offered" and offered["SSLv3"] == "not offered"
