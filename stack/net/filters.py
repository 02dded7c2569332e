"""Packet filters with cloud semantics: a stateless network ACL and a stateful security
group (as AWS documents its NACLs and security groups).

Both sit on a router interface and guard what lies behind it, the way a subnet's ACL or
an instance's security group does: *inbound* is traffic the router sends out of that
interface (into the subnet), *outbound* is traffic that arrives on it (from the subnet).
A rule's address is the far end: the source for inbound, the destination for outbound;
its port range is the destination port (TCP, UDP; ICMP matches any).

- ACL: numbered rules, evaluated in ascending order, first match wins, allow or deny,
  an implicit deny at the end; every packet is checked, so a reply needs a rule of its
  own (the ephemeral ports), and a change takes effect at once.
- Security group: allow rules only, checked when a flow starts; the flow's replies and
  later packets pass whatever the rules say, and removing a rule refuses only new
  flows. Default: all outbound allowed, nothing inbound.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

PROTOCOLS = {"all": None, "-1": None, "icmp": 1, "tcp": 6, "udp": 17}
PROTOCOL_NAMES = {None: "all", 1: "icmp", 6: "tcp", 17: "udp"}


@dataclass(slots=True)
class Rule:
    """One ACL or security-group rule. `number` and `action` matter for ACLs only."""

    number: int
    action: str  # "allow" or "deny"
    protocol: int | None  # None: every protocol
    network: int
    mask: int
    ports: tuple[int, int] | None  # destination port range; None: every port
    hits: int = 0
    bytes: int = 0

    def matches(self, protocol: int, far: bytes, port: int) -> bool:
        if self.protocol is not None and protocol != self.protocol:
            return False
        if int.from_bytes(far, "big") & self.mask != self.network:
            return False
        if self.ports is not None and protocol in (6, 17):
            return self.ports[0] <= port <= self.ports[1]
        return True

    def describe(self) -> dict:
        prefix = ipaddress.IPv4Network((self.network, bin(self.mask).count("1")))
        return {"number": self.number, "action": self.action,
                "protocol": PROTOCOL_NAMES.get(self.protocol, str(self.protocol)),
                "cidr": str(prefix),
                "ports": None if self.ports is None else list(self.ports),
                "hits": self.hits, "bytes": self.bytes}


def make_rule(number: int, action: str, protocol: str, cidr: str,
              ports: tuple[int, int] | list[int] | None) -> Rule:
    """A rule from its written form; ValueError with a readable message when bad."""
    if action not in ("allow", "deny"):
        raise ValueError(f"action {action!r} must be allow or deny")
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol {protocol!r} must be one of {', '.join(PROTOCOLS)}")
    try:
        net = ipaddress.IPv4Network(cidr)
    except ValueError:
        raise ValueError(f"cidr {cidr!r} is not a prefix like 10.0.0.0/16 (host bits "
                         "zero)") from None
    if ports is not None:
        if len(ports) != 2 or not all(isinstance(p, int) and 0 <= p <= 65535 for p in ports) \
                or ports[0] > ports[1]:
            raise ValueError(f"ports {ports!r} must be [low, high] within 0..65535")
        ports = (ports[0], ports[1])
    if not 1 <= number <= 32766:
        raise ValueError(f"rule number {number} is outside 1..32766")
    return Rule(number, action, PROTOCOLS[protocol], int(net.network_address),
                int(net.netmask), ports)


@dataclass(slots=True)
class Acl:
    """One direction of a network ACL: first match wins, then the implicit deny."""

    rules: list[Rule] = field(default_factory=list)
    default_hits: int = 0
    last: int | None = None  # the rule that decided the last packet (None: the default)

    def add(self, rule: Rule) -> None:
        if any(r.number == rule.number for r in self.rules):
            raise ValueError(f"rule {rule.number} exists already")
        self.rules.append(rule)
        self.rules.sort(key=lambda r: r.number)

    def remove(self, number: int) -> bool:
        before = len(self.rules)
        self.rules = [r for r in self.rules if r.number != number]
        return len(self.rules) != before

    def allows(self, protocol: int, far: bytes, port: int, size: int) -> bool:
        """The first rule that matches decides (its number is left in `last`); none: the
        default deny (`last` is None)."""
        for rule in self.rules:
            if rule.matches(protocol, far, port):
                rule.hits += 1
                rule.bytes += size
                self.last = rule.number
                return rule.action == "allow"
        self.default_hits += 1
        self.last = None
        return False


@dataclass(slots=True)
class SecurityGroup:
    inbound: list[Rule] = field(default_factory=list)
    outbound: list[Rule] = field(default_factory=lambda: [
        make_rule(1, "allow", "all", "0.0.0.0/0", None)])
    next_number: int = 2
    last: int | None = None  # the rule that allowed the last new flow

    def allows(self, rules: list[Rule], protocol: int, far: bytes, port: int,
               size: int) -> bool:
        """Any rule that matches allows (its number is left in `last`)."""
        for rule in rules:
            if rule.matches(protocol, far, port):
                rule.hits += 1
                rule.bytes += size
                self.last = rule.number
                return True
        self.last = None
        return False
