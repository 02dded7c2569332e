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
    changes: Callable[[Lab, str], list[Change]] = field(default=lambda lab, client: [])
    max_time: float = 4.0  # curl's limit; a broken path fails by timeout
    breaks: bool = True  # the request is meant to fail
    contrast: bool = False  # stream over UDP and TCP after the request
    expect: dict[str, Any] = field(default_factory=dict)  # what the verdict must say

    def met(self, report: dict[str, Any]) -> str | None:
        """None if the run ended as the scenario means it to; else what differs."""
        verdict = report.get("verdict", {})
        if bool(verdict.get("ok")) == self.breaks:
            return ("the request went through" if self.breaks else
                    f"the request failed: {verdict.get('text')}")
        wrong = {k: verdict.get(k) for k, v in self.expect.items() if verdict.get(k) != v}
        if wrong:
            return f"it stopped elsewhere: {verdict.get('text')}"
        if self.contrast and "udp" not in report.get("contrast", {}):
            return f"the contrast was not measured: {report.get('contrast', {}).get('error')}"
        return None


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
    if node not in lab.nodes:
        raise LabError(f"this scenario needs a node named {node} (the story's lab has one)")
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


def _table(rules: dict, key: str, node: str, iface: str) -> dict:
    try:
        return rules[key][iface]
    except KeyError:
        raise LabError(f"{node} has no {key.replace('_', ' ')} on an interface {iface}") \
            from None


def _without_rule(kind: str, direction: str, ports: list[int]
                  ) -> Callable[[Lab, str], list[Change]]:
    """The change that removes the subnet router's TCP rule for `ports` on Bob's side
    (and puts it back after)."""
    def changes(lab: Lab, client: str) -> list[Change]:
        node, iface = "subnet", "bob"
        table = _table(_rules(lab, node), "acl" if kind == "acl" else "security_groups",
                       node, iface)
        delete, add = _rule_args(kind, iface, direction, _find(table[direction], "tcp",
                                                               ports))
        return [Change(node, delete, add)]
    return changes


_sg_without_https = _without_rule("sg", "inbound", [443, 443])
_acl_without_return = _without_rule("acl", "outbound", [1024, 65535])


def _isp_without_default(lab: Lab, client: str) -> list[Change]:
    """Every default route goes (each restored as it was: gateway, metric, interface);
    a route to the DNS servers' network comes, so the name still resolves."""
    node = "isp"
    if node not in lab.nodes:
        raise LabError("this scenario needs a node named isp (the story's lab has one)")
    r = _tapstack(lab, node, "route", "--json")
    if r.returncode != 0:
        raise LabError(f"cannot read the routes of {node}: {r.stderr.strip()}")
    routes = json.loads(r.stdout)
    defaults = [x for x in routes if x["prefix"] == "default" and x.get("gateway")]
    if not defaults:
        raise LabError(f"{node} has no default route to remove")
    if any(x["prefix"] == DNS_NETWORK for x in routes):
        raise LabError(f"{node} already has a route to {DNS_NETWORK}")
    via = defaults[0]["gateway"]
    changes = [Change(node, ["route", "add", DNS_NETWORK, "--via", via],
                      ["route", "del", DNS_NETWORK, "--via", via])]
    for d in defaults:
        changes.append(Change(node, ["route", "del", "default", "--via", d["gateway"],
                                     "--metric", str(d["metric"])],
                              ["route", "add", "default", "--via", d["gateway"], "--metric",
                               str(d["metric"]), "--dev", d["dev"]]))
    return changes


DNS_NETWORK = "192.0.2.0/24"


def _lossy_last_link(lab: Lab, client: str) -> list[Change]:
    """The kernel in the client's namespace drops a share of what arrives from the
    stream's port, UDP and TCP alike (so only the contrast suffers, not the lookups)."""
    from stack.journey.contrast import LOSS, PORT

    netns = lab.netns(lab.nodes[client])
    changes = []
    for proto in ("udp", "tcp"):
        rule = ["INPUT", "-p", proto, "--sport", str(PORT), "-m", "statistic", "--mode",
                "random", "--probability", str(LOSS), "-j", "DROP"]
        changes.append(Change(client, ["iptables", "-I", *rule], ["iptables", "-D", *rule],
                              netns))
    return changes


SCENARIOS: dict[str, Scenario] = {s.name: s for s in (
    Scenario("sg-no-https", "Bob's security group without its HTTPS rule",
             "A security group is stateful and allows only what a rule names: Alice's SYN "
             "is a new flow to port 443 that no rule allows, so it dies at the subnet "
             "router, and curl waits in vain (no error comes back).",
             changes=_sg_without_https,
             expect={"stage": "tcp", "way": "forward", "where": "subnet", "filter": "sg"}),
    Scenario("acl-no-return", "A network ACL without the rule for return traffic",
             "A network ACL is stateless: it does not know that Bob's SYN-ACK answers "
             "Alice's SYN. Inbound, the rule for port 443 lets the SYN in; outbound, no rule "
             "allows the reply to Alice's ephemeral port, so the implicit deny (*) drops it.",
             changes=_acl_without_return,
             expect={"stage": "tcp", "way": "return", "where": "subnet", "filter": "acl"}),
    Scenario("wrong-name", "A certificate for another name",
             "Every packet arrives, but Bob's server has no certificate naming bob.com: "
             "for a name it does not know (SNI) it presents its default one, which names "
             "only its own address. curl finishes the TLS handshake, checks the name, and "
             "refuses to send the request: authentication failed, not encryption.",
             url="https://bob.com/", expect={"stage": "tls"}),
    Scenario("nxdomain", "A name that does not exist",
             "No packet is sent to any Bob: com.'s servers answer NXDOMAIN for "
             "www.bobb.com, with com.'s SOA record, whose minimum field says how long "
             "resolvers may remember that the name does not exist.",
             url="https://www.bobb.com/", expect={"stage": "dns"}),
    Scenario("no-route", "A router without a route",
             "The ISP's router has lost its default route: it cannot forward Alice's SYN, "
             "so it drops it and sends an ICMP destination unreachable (network) back; "
             "her home router's NAT translates the error like the flow it quotes, and "
             "curl fails at once instead of waiting.",
             changes=_isp_without_default,
             expect={"stage": "tcp", "way": "forward", "where": "isp",
                     "counter": "ipv4.fwd_no_route"}),
    Scenario("udp-vs-tcp", "UDP and TCP on a lossy link",
             "The request itself goes through; then Bob streams the same numbered chunks "
             "over UDP and over TCP while Alice's last link loses 5 % of them: UDP "
             "delivers the rest on time and never the lost ones, TCP delivers all of them "
             "in order, the ones behind a loss late.",
             changes=_lossy_last_link, max_time=20.0, breaks=False, contrast=True),
)}


def apply(lab: Lab, scenario: Scenario, client: str) -> list[Change]:
    """Make the scenario's changes; on a failure, undo what was made and raise."""
    made: list[Change] = []
    try:
        for change in scenario.changes(lab, client):
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
        try:
            r = _run(lab, change, change.undo)
        except (OSError, subprocess.SubprocessError) as exc:
            failed.append(f"{change.shown(change.undo)}: {exc}")
            continue
        if r.returncode != 0:
            failed.append(f"{change.shown(change.undo)}: {r.stderr.strip()}")
    return failed
