"""The newcomer's path: bad input gets one sentence and exit 2, a namespace left by a
killed instance is taken back and removed, `tapstack cleanup` removes leftovers."""

from __future__ import annotations

import signal
import subprocess
import time

import pytest

from tests.integration.conftest import (
    REPO,
    StackProcess,
    netns_exists,
    tapstack_cmd,
    unique_name,
)


@pytest.mark.parametrize(("args", "sentence"), [
    (["--http-port", "70000"], "--http-port 70000 is not a port number (1..65535)"),
    (["--tls", "--tls-port", "0"], "--tls-port 0 is not a port number (1..65535)"),
    (["--msl", "0"], "--msl 0 must be more than 0 and at most 600 seconds"),
    (["--tap", ""], "--tap '' is not a valid name: 1 to 15 characters, no '/' or spaces"),
    (["--tap", "a-name-far-too-long"], "--tap 'a-name-far-too-long' is not a valid name"),
    (["--app", "tests.apps.failing_app:not_asgi", "--app-dir", str(REPO)],
     "is not an ASGI 3 application"),
])
def test_bad_input_is_one_sentence_and_exit_2(args, sentence):
    ns = unique_name()
    r = subprocess.run(tapstack_cmd("run", "--netns", ns, *args), cwd=REPO,
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tapstack: ") and sentence in lines[0], \
        r.stderr
    assert not netns_exists(ns)


def test_a_second_stack_with_the_same_address_is_refused(start_stack):
    st = start_stack(pcap=False)
    r = subprocess.run(tapstack_cmd("run", "--netns", st.ns, "--tap", "tap1",
                                    "--host-address", "none"),
                       cwd=REPO, capture_output=True, text=True, timeout=30)
    assert r.returncode == 2
    assert r.stderr.strip() == (f"tapstack: 10.77.0.2 is already the address of the "
                                f"tapstack on tap0 in namespace {st.ns}; give this one "
                                "another --address")
    assert netns_exists(st.ns)  # the first one's namespace is untouched


def test_after_kill_9_the_next_run_takes_the_namespace_back_and_removes_it():
    ns = unique_name()
    first = StackProcess(ns, [], None).start()
    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait(timeout=10)
    assert netns_exists(ns)  # left behind: nobody could clean up
    second = StackProcess(ns, [], None).start()
    try:
        assert second.stop() == 0
        assert f"reusing network namespace {ns}, left by an earlier tapstack" in \
            second.stderr
        assert not netns_exists(ns)
    finally:
        subprocess.run(["ip", "netns", "delete", ns], capture_output=True)


def test_cleanup_removes_leftovers_and_keeps_namespaces_in_use():
    left, busy = unique_name(), unique_name()
    procs = []
    try:
        for ns in (left, busy):
            st = StackProcess(ns, [], None).start()
            st.proc.send_signal(signal.SIGKILL)
            st.proc.wait(timeout=10)
        holder = subprocess.Popen(["ip", "netns", "exec", busy, "sleep", "60"])
        procs.append(holder)
        deadline = time.monotonic() + 5
        while not subprocess.run(["ip", "netns", "pids", busy], capture_output=True,
                                 text=True).stdout.strip():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        r = subprocess.run(tapstack_cmd("cleanup"), cwd=REPO, capture_output=True,
                           text=True, timeout=30)
        assert r.returncode == 0, r.stderr
        assert left in r.stdout.splitlines()[0]
        assert f"kept {busy} (in use by pid {holder.pid})" in r.stdout
        assert not netns_exists(left) and netns_exists(busy)
    finally:
        for p in procs:
            p.kill()
            p.wait()
        for ns in (left, busy):
            subprocess.run(["ip", "netns", "delete", ns], capture_output=True)
            subprocess.run(["rm", "-f", f"/run/tapstack/netns/{ns}"])


def test_the_banner_commands_run_as_printed(start_stack):
    """Every line under "try:" is a shell command that works as printed (a `#` starts a
    note); the ones that run until stopped (tcpdump, trace) run for two seconds."""
    st = start_stack("--tls", pcap=False, env={"TAPSTACK_STATE": "/run/tapstack/test-state"})
    lines = st.stdout_lines
    start = lines.index("try:") + 1
    commands = [ln.strip() for ln in lines[start:] if ln.startswith("  ")]
    assert len(commands) >= 10, lines
    for command in commands:
        forever = "tcpdump" in command or " trace " in command + " "
        r = subprocess.run(["timeout", "-k", "2", "3" if forever else "30", "bash", "-c",
                            command], cwd=REPO, capture_output=True, text=True,
                           env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
                                "TAPSTACK_STATE": "/run/tapstack/test-state"})
        assert r.returncode == (124 if forever else 0), (command, r.stdout, r.stderr)
        if "nc -N" in command and " 7 " in command:
            assert r.stdout == "hello\n"
        if "wc -c" in command:
            assert r.stdout.strip() == "1000000"
