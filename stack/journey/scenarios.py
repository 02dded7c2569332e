"""Scenarios that break the story on purpose, one thing each, so that the walkthrough
shows where the packet died and why.

A scenario is a list of changes to running nodes, each made with the same command a user
would type (`tapstack rules del ...`, `tapstack route del ...`) and undone the same way
after the run, and sometimes another URL for Alice. The changes find what they remove by
what it is (the security group's HTTPS rule, the ACL's rule for ephemeral ports), so they
work whatever the rules are numbered in the lab file.

    sg-no-https     Bob's security group has no rule for HTTPS: the SYN dies at the
                    subnet router (a stateful filter: new flows need a rule)
    acl-no-return   the network ACL has no outbound rule for the clients' ephemeral ports:
                    the SYN reaches Bob, his SYN-ACK dies on its way out (a stateless
                    filter: replies need rules of their own)
    wrong-name      Alice opens https://bob.com/, a name none of Bob's certificates carry:
                    every packet arrives, and curl refuses the server (TLS authentication)
    nxdomain        Alice opens https://www.bobb.com/: the com. servers say no such name
                    (NXDOMAIN, with the SOA that bounds how long to remember it)
    no-route        the ISP's router loses its default route: it answers Alice's SYN with
                    an ICMP destination unreachable (network), which her NAT carries back
    udp-vs-tcp      nothing breaks the request; then Bob streams numbered chunks over UDP
                    and TCP while Alice's link loses 5 % (contrast.py)
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from stack.lab.build import LabError
from stack.lab.topology import Lab


@dataclass
class Change:
    """One command run on a node, and the command that undoes it: a tapstack command for
    a tapstack node, or a command in a Linux node's namespace (`netns`)."""
    node: str
    args: list[str]
    undo: list[str]
    netns: str | None = None

    def shown(self, args: list[str] | None = None) -> str:
        args = args if args is not None else self.args
        if self.netns:
            return f"ip netns exec {self.netns} " + " ".join(args)
        return "tapstack " + " ".join(args) + f" --node {self.node}"


@dataclass
class Scenario:
    name: str
    title: str
    lesson: str  # what the run should show, one or two sentences
    url: str | None = None  # instead of the default
    changes: Callable[[Lab], list[Change]] = field(default=lambda lab: [])
    max_time: float = 4.0  # curl's limit; a broken path fails by timeout
    breaks: bool = True  # the request is meant to fail
    contrast: bool = False  # stream over UDP and TCP after the request


def _run(lab: Lab, change: Change, args: list[str]) -> subprocess.CompletedProcess:
    if change.netns:
        return subprocess.run(["ip", "netns", "exec", change.netns, *args],
                              capture_output=True, text=True, timeout=30)
    return _tapstack(lab, change.node, *args)


def _tapstack(lab: Lab, node: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stack.cli", *args, "--netns",
                           lab.switch_netns, "--node", node], capture_output=True,
                          text=True, timeout=30)


def _rules(lab: Lab, node: str) -> dict[str, Any]:
    r = _tapstack(lab, node, "rules", "--json")
    if r.returncode != 0:
        raise LabError(f"cannot read the rules of {node}: {r.stderr.strip()}")
    return json.loads(r.stdout)


def _find(rules: list[dict], protocol: str, ports: list[int]) -> dict:
    for rule in rules:
        if rule["protocol"] == protocol and rule["ports"] == ports:
            return rule
    raise LabError(f"no {protocol} rule for ports {ports[0]}-{ports[1]} to remove")


def _rule_args(kind: str, interface: str, direction: str, rule: dict) -> tuple[list, list]:
    where = ["--interface", interface, f"--{kind}", f"--{direction}"]
    delete = ["rules", "del", *where, "--number", str(rule["number"])]
    add = ["rules", "add", *where, "--number", str(rule["number"]), "--protocol",
           rule["protocol"], "--cidr", rule["cidr"]]
    if rule["ports"]:
        add += ["--ports", f"{rule['ports'][0]}-{rule['ports'][1]}"]
    if kind == "acl":
        add += ["--action", rule["action"]]
    return delete, add


def _sg_without_https(lab: Lab) -> list[Change]:
    node, iface = "subnet", "bob"
    group = _rules(lab, node)["security_groups"][iface]
    delete, add = _rule_args("sg", iface, "inbound", _find(group["inbound"], "tcp",
                                                             [443, 443]))
    return [Change(node, delete, add)]


def _acl_without_return(lab: Lab) -> list[Change]:
    node, iface = "subnet", "bob"
    acl = _rules(lab, node)["acl"][iface]
    delete, add = _rule_args("acl", iface, "outbound", _find(acl["outbound"], "tcp",
                                                              [1024, 65535]))
    return [Change(node, delete, add)]


def _isp_without_default(lab: Lab) -> list[Change]:
    """Only the DNS servers' network stays reachable (so the name still resolves)."""
    node = "isp"
    r = _tapstack(lab, node, "route", "--json")
    if r.returncode != 0:
        raise LabError(f"cannot read the routes of {node}: {r.stderr.strip()}")
    default = next((x for x in json.loads(r.stdout) if x["prefix"] == "default"), None)
    if default is None or not default.get("gateway"):
        raise LabError(f"{node} has no default route to remove")
    via = default["gateway"]
    return [Change(node, ["route", "add", "192.0.2.0/24", "--via", via],
                   ["route", "del", "192.0.2.0/24"]),
            Change(node, ["route", "del", "default"],
                   ["route", "add", "default", "--via", via])]


def _lossy_last_link(lab: Lab) -> list[Change]:
    """The kernel in Alice's namespace drops a share of what arrives from the stream's
    port, UDP and TCP alike (so only the contrast suffers, not the name lookups)."""
    from stack.journey.contrast import LOSS, PORT

    netns = lab.netns(lab.nodes["alice"])
    changes = []
    for proto in ("udp", "tcp"):
        rule = ["INPUT", "-p", proto, "--sport", str(PORT), "-m", "statistic", "--mode",
                "random", "--probability", str(LOSS), "-j", "DROP"]
        changes.append(Change("alice", ["iptables", "-I", *rule], ["iptables", "-D", *rule],
                              netns))
    return changes


SCENARIOS: dict[str, Scenario] = {s.name: s for s in (
    Scenario("sg-no-https", "Bob's security group without its HTTPS rule",
             "A security group is stateful and allows only what a rule names: Alice's SYN "
             "is a new flow to port 443 that no rule allows, so it dies at the subnet "
             "router, and curl waits in vain (no error comes back).",
             changes=_sg_without_https),
    Scenario("acl-no-return", "A network ACL without the rule for return traffic",
             "A network ACL is stateless: it does not know that Bob's SYN-ACK answers "
             "Alice's SYN. Inbound, rule 100 lets the SYN in; outbound, no rule allows "
             "the reply to Alice's ephemeral port, so the implicit deny (*) drops it.",
             changes=_acl_without_return),
    Scenario("wrong-name", "A certificate for another name",
             "Every packet arrives, but Bob's server has no certificate naming bob.com: "
             "for a name it does not know (SNI) it presents its default one, which names "
             "only its own address. curl finishes the TLS handshake, checks the name, and "
             "refuses to send the request: authentication failed, not encryption.",
             url="https://bob.com/"),
    Scenario("nxdomain", "A name that does not exist",
             "No packet is sent to any Bob: com.'s servers answer NXDOMAIN for "
             "www.bobb.com, with com.'s SOA record, whose minimum field says how long "
             "resolvers may remember that the name does not exist.",
             url="https://www.bobb.com/"),
    Scenario("no-route", "A router without a route",
             "The ISP's router has lost its default route: it cannot forward Alice's SYN, "
             "so it drops it and sends an ICMP destination unreachable (network) back; "
             "her home router's NAT translates the error like the flow it quotes, and "
             "curl fails at once instead of waiting.",
             changes=_isp_without_default),
    Scenario("udp-vs-tcp", "UDP and TCP on a lossy link",
             "The request itself goes through; then Bob streams the same numbered chunks "
             "over UDP and over TCP while Alice's last link loses 5 % of them: UDP "
             "delivers the rest on time and never the lost ones, TCP delivers all of them "
             "in order, the ones behind a loss late.",
             changes=_lossy_last_link, max_time=20.0, breaks=False, contrast=True),
)}


def apply(lab: Lab, scenario: Scenario) -> list[Change]:
    """Make the scenario's changes; on a failure, undo what was made and raise."""
    made: list[Change] = []
    try:
        for change in scenario.changes(lab):
            r = _run(lab, change, change.args)
            if r.returncode != 0:
                raise LabError(f"scenario {scenario.name}: {change.shown()} failed: "
                               f"{r.stderr.strip()}")
            made.append(change)
    except BaseException:
        undo(lab, made)
        raise
    return made


def undo(lab: Lab, made: list[Change]) -> list[str]:
    """Undo in reverse order; what could not be undone, in words (the lab needs a
    `lab down` and `up` then)."""
    failed = []
    for change in reversed(made):
        r = _run(lab, change, change.undo)
        if r.returncode != 0:
            failed.append(f"{change.shown(change.undo)}: {r.stderr.strip()}")
    return failed
