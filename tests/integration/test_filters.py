"""A cloud subnet's network ACL (stateless) and security group (stateful) on the router in
front of it, changed at run time while flows are open. The same test drives a Linux
router with the same semantics written in iptables: the ACL as stateless rules in the
mangle table, the security group as conntrack-state rules in the filter table.

    client 198.51.100.7 -- pub | gw | vpc -- bob 10.0.1.10 (TCP echo :7, http :80)
"""

from __future__ import annotations

import select
import subprocess
import time
import uuid

import pytest

from tests.integration.conftest import require_tool, tapstack_cmd
from tests.integration.test_lab import Lab

VPC = """
name = "{name}"
[[segment]]
name = "internet"
[[segment]]
name = "vpc"
[[node]]
name = "client"
kind = "linux"
commands = ["exec socat TCP4-LISTEN:9000,bind=198.51.100.7,reuseaddr,fork EXEC:cat"]
[[node.interface]]
segment = "internet"
addresses = ["198.51.100.7/24"]
[[node.route]]
to = "10.0.1.0/24"
via = "198.51.100.1"
[[node]]
name = "gw"
kind = "{kind}"
forwarding = true
{extra}
[[node.interface]]
name = "pub"
segment = "internet"
addresses = ["198.51.100.1/24"]
[[node.interface]]
name = "vpc"
segment = "vpc"
addresses = ["10.0.1.1/24"]
[[node]]
name = "bob"
kind = "linux"
commands = ["exec socat TCP4-LISTEN:7,bind=10.0.1.10,reuseaddr,fork EXEC:cat",
            "cd /tmp && exec python3 -m http.server 80 --bind 10.0.1.10"]
[[node.interface]]
segment = "vpc"
addresses = ["10.0.1.10/24"]
[[node.route]]
to = "default"
via = "10.0.1.1"
"""


def rule(number: int, action: str, ports: str) -> str:
    low, _, high = ports.partition("-")
    return (f'{{ number = {number}, action = "{action}", protocol = "tcp", '
            f'cidr = "0.0.0.0/0", ports = [{low}, {high or low}] }}')


TAPSTACK = (
    "services = { echo = false, http = false }\n"
    'acl = [{ interface = "vpc", '
    f'inbound = [{rule(100, "allow", "7")}, {rule(110, "allow", "80")}, '
    f'{rule(120, "allow", "1024-65535")}], '
    f'outbound = [{rule(100, "allow", "1024-65535")}, {rule(110, "allow", "9000")}] }}]\n'
    'security_group = [{ interface = "vpc", inbound = ['
    '{ protocol = "tcp", cidr = "0.0.0.0/0", ports = [7, 7] }, '
    '{ protocol = "tcp", cidr = "0.0.0.0/0", ports = [80, 80] }] }]')

LINUX = [
    # the ACL: stateless, mangle table, first match, implicit deny
    "iptables -t mangle -A FORWARD -o vpc -p tcp --dport 7 -j RETURN",
    "iptables -t mangle -A FORWARD -o vpc -p tcp --dport 80 -j RETURN",
    "iptables -t mangle -A FORWARD -o vpc -p tcp --dport 1024:65535 -j RETURN",
    "iptables -t mangle -A FORWARD -o vpc -j DROP",
    "iptables -t mangle -A FORWARD -i vpc -p tcp --dport 1024:65535 -j RETURN",
    "iptables -t mangle -A FORWARD -i vpc -p tcp --dport 9000 -j RETURN",
    "iptables -t mangle -A FORWARD -i vpc -j DROP",
    # the security group: conntrack states, allow only
    "iptables -A FORWARD -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT",
    "iptables -A FORWARD -o vpc -p tcp --dport 7 -m conntrack --ctstate NEW -j ACCEPT",
    "iptables -A FORWARD -o vpc -p tcp --dport 80 -m conntrack --ctstate NEW -j ACCEPT",
    "iptables -A FORWARD -i vpc -m conntrack --ctstate NEW -j ACCEPT",
    "iptables -A FORWARD -j DROP",
]


class Gateway:
    """Changes rules on the gateway, whichever kind it is."""

    def __init__(self, lab: Lab, kind: str) -> None:
        self.lab, self.kind = lab, kind

    def tapstack(self, *args: str) -> str:
        r = subprocess.run(tapstack_cmd("rules", *args, "--netns", f"{self.lab.name}-sw",
                                        "--node", "gw"), capture_output=True, text=True,
                           timeout=10)
        assert r.returncode == 0, r.stderr
        return r.stdout

    def iptables(self, cmd: str) -> None:
        r = self.lab.run("gw", "sh", "-c", cmd)
        assert r.returncode == 0, (cmd, r.stderr)

    def drop_group_rule_for_7(self) -> None:
        if self.kind == "tapstack":
            self.tapstack("del", "--interface", "vpc", "--sg", "--inbound", "--number", "1")
        else:
            self.iptables("iptables -D FORWARD -o vpc -p tcp --dport 7 -m conntrack "
                          "--ctstate NEW -j ACCEPT")

    def drop_acl_inbound_7(self) -> None:
        if self.kind == "tapstack":
            self.tapstack("del", "--interface", "vpc", "--acl", "--inbound", "--number", "100")
        else:
            self.iptables("iptables -t mangle -D FORWARD -o vpc -p tcp --dport 7 -j RETURN")

    def drop_acl_outbound_ephemeral(self) -> None:
        if self.kind == "tapstack":
            self.tapstack("del", "--interface", "vpc", "--acl", "--outbound", "--number",
                          "100")
        else:
            self.iptables("iptables -t mangle -D FORWARD -i vpc -p tcp --dport 1024:65535 "
                          "-j RETURN")


class Session:
    """One long-lived TCP connection from the client to bob's echo, line by line."""

    def __init__(self, lab: Lab) -> None:
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", f"{lab.name}-client", "socat", "-", "TCP4:10.0.1.10:7"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)

    def echo(self, line: str, timeout: float = 3.0) -> bool:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        return bool(ready) and self.proc.stdout.readline().strip() == line

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


def new_connection_works(lab: Lab, port: int) -> bool:
    r = lab.run("client", "sh", "-c", f"echo x | timeout -k 1 3 socat -T 2 - "
                                      f"TCP4:10.0.1.10:{port},connect-timeout=2")
    return r.stdout.strip() == "x"


@pytest.mark.parametrize("kind", ["tapstack", "linux"])
def test_security_group_keeps_tracked_flows_and_acl_cuts_at_once(tmp_path, kind):
    for tool in ("socat", "iptables"):
        require_tool(tool)
    name = f"f{uuid.uuid4().hex[:6]}"
    path = tmp_path / f"{name}.toml"
    path.write_text(VPC.format(name=name, kind=kind,
                               extra=TAPSTACK if kind == "tapstack" else ""))
    lab = Lab(path, name).up()
    gw = Gateway(lab, kind)
    session = None
    try:
        if kind == "linux":
            for cmd in LINUX:
                gw.iptables(cmd)
        deadline = time.monotonic() + 10
        while not new_connection_works(lab, 7):
            assert time.monotonic() < deadline, "bob's echo never answered"
            time.sleep(0.2)
        session = Session(lab)
        assert session.echo("one")
        # the group's rule goes: the open flow goes on, a new one is refused
        gw.drop_group_rule_for_7()
        assert session.echo("two")
        assert not new_connection_works(lab, 7)
        assert lab.run("client", "curl", "-sf", "-m", "3", "-o", "/dev/null",
                       "http://10.0.1.10/").returncode == 0
        # bob calls out: the group allows all outbound, and the replies need no inbound
        # group rule (the ACL still needs its own, rule 120: ephemeral ports)
        r = lab.run("bob", "sh", "-c", "echo out | timeout -k 1 3 socat -T 2 - "
                                       "TCP4:198.51.100.7:9000")
        assert r.stdout.strip() == "out"
        # the ACL's allow goes: the same open flow is cut at once
        gw.drop_acl_inbound_7()
        assert not session.echo("three", timeout=2.0)
        # without the ACL's ephemeral-port rule, replies to the client stop too
        gw.drop_acl_outbound_ephemeral()
        assert lab.run("client", "curl", "-sf", "-m", "2", "-o", "/dev/null",
                       "http://10.0.1.10/").returncode != 0
        if kind == "tapstack":
            counters = lab.stats("gw")["counters"]
            assert counters["acl"]["denied_in"] >= 1 and counters["acl"]["denied_out"] >= 1
            assert counters["sg"]["denied_in"] >= 1
            listing = gw.tapstack("list")
            assert "network ACL on vpc, inbound:" in listing and "(hits" in listing
    finally:
        if session is not None:
            session.close()
        assert lab.down().returncode == 0


def test_rules_commands_explain_mistakes(tmp_path):
    name = f"f{uuid.uuid4().hex[:6]}"
    path = tmp_path / f"{name}.toml"
    path.write_text(VPC.format(name=name, kind="tapstack", extra=TAPSTACK))
    lab = Lab(path, name).up()
    try:
        def rules(*args: str) -> subprocess.CompletedProcess:
            return subprocess.run(tapstack_cmd("rules", *args, "--netns", f"{name}-sw",
                                               "--node", "gw"),
                                  capture_output=True, text=True, timeout=10)

        r = rules("add", "--interface", "pub", "--acl", "--inbound", "--number", "5")
        assert r.returncode == 2 and "pub has no network ACL" in r.stderr
        r = rules("del", "--interface", "vpc", "--acl", "--inbound", "--number", "999")
        assert r.returncode == 2 and "no rule 999" in r.stderr
        r = rules("add", "--interface", "vpc", "--acl", "--inbound", "--number", "100")
        assert r.returncode == 2 and "rule 100 exists already" in r.stderr
        r = rules("add", "--interface", "vpc", "--acl", "--inbound", "--number", "50",
                  "--action", "deny", "--protocol", "tcp", "--ports", "7")
        assert r.returncode == 0 and "added ACL rule 50" in r.stdout
        # a deny at 50 now beats the allow at 100
        assert not new_connection_works(lab, 7)
        conntrack = subprocess.run(tapstack_cmd("conntrack", "--netns", f"{name}-sw",
                                                "--node", "gw"),
                                   capture_output=True, text=True, timeout=10)
        assert conntrack.returncode == 0 and "flow entries" in conntrack.stdout
    finally:
        assert lab.down().returncode == 0
