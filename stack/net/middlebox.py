"""A node's middlebox: connection tracking, NAT, network ACLs and security groups on the
IPv4 hook points.

    prerouting   ACL (outbound, on the arrival interface) -> track -> DNAT / un-SNAT
    forward      security groups, for a flow's first datagram
    input        the flow joins the table (delivered to us)
    output       track what we originate
    postrouting  SNAT / un-DNAT -> ACL (inbound, on the egress interface) -> the flow
                 joins the table

A flow's first datagram makes an entry; the NAT decides its reply tuple (DNAT when it
arrives, SNAT when it leaves); the entry joins the table only once the datagram is
through (a datagram dropped on the way leaves nothing behind). Every later datagram is
rewritten from the entry, in both directions, and ICMP errors about it are rewritten
inside too.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from stack.counters import Counters
from stack.net.conntrack import (
    CLOSE,
    ORIGINAL,
    REPLY,
    TIME_WAIT,
    Conntrack,
    ConntrackConfig,
    ConntrackEntry,
    FlowTuple,
    invert,
    is_pure_syn,
    parse_flow,
)
from stack.net.filters import Acl, SecurityGroup, make_rule
from stack.net.nat import Mapping, NatConfig, NatTable
from stack.net.packet import LOCAL, PacketInfo
from stack.wire.ipv4 import ip_to_str
from stack.wire.rewrite import ICMP_QUERY_TYPES, rewrite, rewrite_quoted
from stack.wire.virtio import F_NEEDS_CSUM

COUNTERS = ("acl.denied_in", "acl.denied_out", "sg.denied_in", "sg.denied_out")

PRE, POST = 0, 1


@dataclass(slots=True)
class MiddleboxConfig:
    conntrack: ConntrackConfig = field(default_factory=ConntrackConfig)
    nat: NatConfig = field(default_factory=NatConfig)
    acl_in: dict[str, Acl] = field(default_factory=dict)  # by interface name
    acl_out: dict[str, Acl] = field(default_factory=dict)
    groups: dict[str, SecurityGroup] = field(default_factory=dict)

    @property
    def enabled(self) -> bool:
        return bool(self.nat.enabled or self.acl_in or self.acl_out or self.groups)


class NatFlow:
    """What the NAT holds for one tracked flow: the mappings it keeps alive."""

    __slots__ = ("mappings",)

    def __init__(self) -> None:
        self.mappings: list[Mapping] = []


def _transport_port(pkt: bytes | bytearray) -> int:
    hl = (pkt[0] & 0x0F) << 2
    if pkt[9] in (6, 17) and len(pkt) >= hl + 4 and not (pkt[6] & 0x1F or pkt[7]):
        return (pkt[hl + 2] << 8) | pkt[hl + 3]
    return 0


class Middlebox:
    def __init__(self, node, config: MiddleboxConfig, rng: random.Random | None = None
                 ) -> None:
        self.node = node
        self.config = config
        self.ipv4 = node.ipv4
        self.counters: Counters = node.counters
        self.counters.declare(*COUNTERS)
        self.conntrack = Conntrack(config.conntrack, self.counters)
        self.conntrack.on_destroy.append(self._destroyed)
        self.conntrack.on_confirm.append(self._confirmed)
        self.nat = NatTable(config.nat, self.counters, rng or random.Random())
        self.nat.port_in_use_locally = self._local_port
        self.nat.tuple_in_use = self.conntrack.table.__contains__
        index = {i.name: i.index for i in node.interfaces}
        for table in (config.acl_in, config.acl_out, config.groups):
            for name in table:
                if name not in index:
                    raise ValueError(f"no interface named {name}")
        self.acl_in = {index[n]: a for n, a in config.acl_in.items()}
        self.acl_out = {index[n]: a for n, a in config.acl_out.items()}
        self.groups = {index[n]: g for n, g in config.groups.items()}
        # masquerade: egress interface index -> (rule, public address)
        self.masquerade = {}
        for rule in config.nat.masquerade:
            if rule.interface not in index:
                raise ValueError(f"masquerade: no interface named {rule.interface}")
            iface = node.interfaces[index[rule.interface]]
            public = rule.address or iface.primary
            if public is None:
                raise ValueError(f"masquerade: interface {rule.interface} has no address")
            self.masquerade[iface.index] = (rule, public)
        self.public = {p for _, p in self.masquerade.values()}
        self.public |= {s.public for s in config.nat.static}
        self.public |= {f.public for f in config.nat.forwards}
        hooks = self.ipv4.hooks
        hooks.add("prerouting", self._prerouting)
        hooks.add("forward", self._forward)
        hooks.add("input", self._input)
        hooks.add("output", self._output)
        hooks.add("postrouting", self._postrouting)
        self.ipv4.defrag = True
        node.tcp.reserved = node.udp.reserved = self._reserved
        node.timers.append(self)
        node.middlebox = self

    def poll(self, now: float) -> None:
        self.conntrack.poll(now)
        self.nat.sweep()  # mappings made for datagrams that were then dropped

    def next_deadline(self) -> float | None:
        return self.conntrack.next_deadline()

    # -- helpers ----------------------------------------------------------------------------

    def _local_port(self, protocol: int, address: bytes, port: int) -> bool:
        if protocol == 6:
            return self.node.tcp.port_in_use(address, port)
        if protocol == 17:
            endpoint = self.node.udp.endpoints.get(port)
            return endpoint is not None and endpoint.address in (None, address)
        return False

    def _reserved(self, protocol: int, address: bytes, port: int) -> bool:
        return (protocol, address, port) in self.nat.by_public

    def _confirmed(self, entry: ConntrackEntry) -> None:
        if entry.nat is not None:
            for mapping in entry.nat.mappings:
                self.nat.hold(mapping)

    def _destroyed(self, entry: ConntrackEntry) -> None:
        if entry.nat is not None:
            for mapping in entry.nat.mappings:
                self.nat.release(mapping)
            entry.nat = None

    @staticmethod
    def _attach(entry: ConntrackEntry, mapping: Mapping) -> None:
        """The flow will hold the mapping once it is confirmed (see _confirmed)."""
        if entry.nat is None:
            entry.nat = NatFlow()
        entry.nat.mappings.append(mapping)

    def _acl(self, acl: Acl, pkt: bytearray, inbound: bool) -> bool:
        """Inbound (into the subnet): the far end is the source; outbound: the
        destination. The port is the destination port either way."""
        far = bytes(pkt[12:16]) if inbound else bytes(pkt[16:20])
        port = _transport_port(pkt)
        allowed = acl.allows(pkt[9], far, port, len(pkt))
        if self.node.trace.on:
            self.node.trace.emit("acl", "allow" if allowed else "deny", self.node.trace.now,
                                 direction="inbound" if inbound else "outbound",
                                 rule=acl.last if acl.last is not None else "default (*)",
                                 src=ip_to_str(bytes(pkt[12:16])),
                                 dst=ip_to_str(bytes(pkt[16:20])), protocol=pkt[9],
                                 port=port)
        return allowed

    # -- rewriting --------------------------------------------------------------------------

    @staticmethod
    def _targets(entry: ConntrackEntry, d: int, stage: int
                 ) -> tuple[tuple[bytes, int], tuple[bytes, int]]:
        """(what the address and port are as the datagram arrives, what they become)."""
        o, r = entry.orig, entry.reply
        if stage == PRE:  # the destination: DNAT (original) or un-SNAT (reply)
            if d == ORIGINAL:
                return (o.dst, o.dport), (r.src, r.sport)
            return (r.dst, r.dport), (o.src, o.sport)
        if d == ORIGINAL:  # the source: SNAT (original) or un-DNAT (reply)
            return (o.src, o.sport), (r.dst, r.dport)
        return (r.src, r.sport), (o.dst, o.dport)

    def _translate(self, pkt: bytearray, info: PacketInfo, entry: ConntrackEntry, d: int,
                   stage: int) -> None:
        cur, new = self._targets(entry, d, stage)
        if cur == new:
            return
        partial = info.vnet is not None and bool(info.vnet[0] & F_NEEDS_CSUM)
        rewrite(pkt, stage == POST, new[0], new[1] if new[1] != cur[1] else None, partial)

    def _translate_error(self, pkt: bytearray, entry: ConntrackEntry, d: int,
                         stage: int) -> None:
        """An ICMP error travelling in direction `d`: its outer address (when it is the
        flow's endpoint, not a router on the way) and the quoted datagram's other side."""
        cur, new = self._targets(entry, d, stage)
        if cur == new:
            return
        outer = slice(16, 20) if stage == PRE else slice(12, 16)
        if bytes(pkt[outer]) == cur[0]:
            rewrite(pkt, stage == POST, new[0], None)
        if rewrite_quoted(pkt, stage == PRE, new[0], new[1]):
            self.counters["nat.translated_errors"] += 1

    # -- hooks ------------------------------------------------------------------------------

    def _prerouting(self, pkt: bytearray, info: PacketInfo, now: float) -> bytearray | None:
        acl = self.acl_out.get(info.iface)
        if acl is not None and not self._acl(acl, pkt, inbound=False):
            self.counters["acl.denied_out"] += 1
            return None
        return self._track(pkt, info, now, PRE)

    def _output(self, pkt: bytearray, info: PacketInfo, now: float) -> bytearray | None:
        return self._track(pkt, info, now, LOCAL)

    def _track(self, pkt: bytearray, info: PacketInfo, now: float, stage: int
               ) -> bytearray | None:
        parsed = parse_flow(pkt)
        if parsed is None:
            if pkt[9] in (1, 6, 17):
                # too short to read, or an error about an error: it cannot belong to a
                # flow, and must not slip past what flows are checked by
                self.counters["conntrack.invalid"] += 1
                return None
            return pkt  # another protocol's non-first fragment (seen only without defrag)
        t, is_error = parsed
        ct = self.conntrack
        if is_error:
            found = ct.lookup(invert(t))
            if found is None:
                self.counters["conntrack.related_unmatched"] += 1
                # ours to judge (the ICMP layer matches it to a socket), or our own
                return pkt if stage == LOCAL or t.src in self.ipv4.local else None
            self.counters["conntrack.related"] += 1
            info.conntrack = (found[0], found[1], True)
            if stage == PRE:
                self._translate_error(pkt, found[0], found[1], PRE)
            return pkt
        found = ct.lookup(t)
        if found is not None and t.proto == 6 and found[1] == ORIGINAL and \
                found[0].state in (TIME_WAIT, CLOSE) and is_pure_syn(pkt):
            ct.remove(found[0])  # a new connection on the old tuple
            found = None
        if found is not None:
            entry, d = found
            ct.update(entry, d, pkt, now)
            if stage == PRE:
                self._translate(pkt, info, entry, d, PRE)
            info.conntrack = (entry, d, False)
            return pkt
        if t.proto == 6 and not is_pure_syn(pkt):
            self.counters["conntrack.no_entry"] += 1
            # our own TCP answers strays to its addresses (with a RST); nothing else
            # passes without a flow, and nothing at all on a port the NAT owns
            ours = stage == LOCAL or (t.dst in self.ipv4.local and
                                      (6, t.dst, t.dport) not in self.nat.by_public)
            return pkt if ours else None
        entry = ct.new(t, now)
        if stage == PRE and t.dst in self.public and not self._dnat(entry, t, info):
            return None
        ct.update(entry, ORIGINAL, pkt, now)
        if stage == PRE:
            self._translate(pkt, info, entry, ORIGINAL, PRE)
        info.conntrack = (entry, ORIGINAL, False)
        return pkt

    def _hairpin(self, src: bytes, inside: bytes) -> bool:
        """Both ends are on the same side of us: the way back to the source leaves by the
        interface the flow will leave by."""
        routes = self.ipv4.routes
        a, b = routes.lookup(src), routes.lookup(inside)
        return a is not None and b is not None and a.ifindex == b.ifindex

    def _dnat(self, entry: ConntrackEntry, t: FlowTuple, info: PacketInfo) -> bool:
        """A new flow to one of our public addresses: where it really goes. False: drop."""
        nat, c = self.nat, self.counters
        static = nat.static_by_public(t.dst)
        if static is not None:
            entry.reply = FlowTuple(t.proto, static.private, t.dport, t.src, t.sport)
            c["nat.static"] += 1
            return True
        fwd = nat.forward_for(t.proto, t.dst, t.dport)
        if fwd is not None:
            entry.reply = FlowTuple(t.proto, fwd.private, fwd.private_port, t.src, t.sport)
            c["nat.forwarded_ports"] += 1
            return True
        mapping = nat.inbound(t.proto, t.dst, t.dport)
        if mapping is not None:
            src, sport = t.src, t.sport
            if self._hairpin(t.src, mapping.inside):
                # the source will reach the target as its own public endpoint: filter
                # by that (RFC 4787 REQ-9); and it has now "sent to" the target's public
                # endpoint, as it would have through another NAT, so that the target's
                # answer passes its own mapping: two inside hosts can meet
                mine = nat.by_inside.get((t.proto, t.src, t.sport, t.dst))
                src, sport = t.dst, (mine.pport if mine is not None else -1)
                if mine is not None:
                    mine.remember(t.dst, t.dport)
            if not mapping.admits(self.config.nat.filtering, src, sport):
                c["nat.filtered"] += 1
                return False
            port = mapping.iport
            entry.reply = FlowTuple(t.proto, mapping.inside, port, t.src,
                                    port if t.proto == 1 else t.sport)
            self._attach(entry, mapping)
            return True
        if t.proto == 1 or self._local_port(t.proto, t.dst, t.dport):
            return True  # ours: ping, or a service of this node
        # RFC 5382 REQ-4a, RFC 4787 REQ-8: an unsolicited packet for no mapping is
        # dropped in silence (no RST, no ICMP: nothing tells a scanner we are here)
        c["nat.unsolicited"] += 1
        return False

    def _forward(self, pkt: bytearray, info: PacketInfo, now: float) -> bytearray | None:
        ct_info = info.conntrack
        if ct_info is None or ct_info[0].confirmed or ct_info[2]:
            return pkt  # a known flow (or its ICMP errors): groups are for new flows
        if not self.groups:
            return pkt
        entry = ct_info[0]
        proto, src, dst = entry.orig.proto, entry.orig.src, entry.reply.src
        port = entry.reply.sport if proto in (6, 17) else 0
        size = len(pkt)
        trace = self.node.trace
        group = self.groups.get(info.iface)  # from behind this interface: outbound
        if group is not None:
            allowed = group.allows(group.outbound, proto, dst, port, size)
            if trace.on:
                self._trace_group(group, allowed, "outbound", src, dst, proto, port)
            if not allowed:
                self.counters["sg.denied_out"] += 1
                return None
        group = self.groups.get(info.out_iface)  # towards what is behind it: inbound
        if group is not None:
            allowed = group.allows(group.inbound, proto, src, port, size)
            if trace.on:
                self._trace_group(group, allowed, "inbound", src, dst, proto, port)
            if not allowed:
                self.counters["sg.denied_in"] += 1
                return None
        return pkt

    def _trace_group(self, group: SecurityGroup, allowed: bool, direction: str, src: bytes,
                     dst: bytes, proto: int, port: int) -> None:
        """A security group decided a new flow (later datagrams of it pass as tracked)."""
        self.node.trace.emit("sg", "allow new flow" if allowed else "deny new flow",
                             self.node.trace.now, direction=direction,
                             rule=group.last if allowed else "none matches",
                             src=ip_to_str(src), dst=ip_to_str(dst), protocol=proto,
                             port=port)

    def _input(self, pkt: bytearray, info: PacketInfo, now: float) -> bytearray | None:
        ct_info = info.conntrack
        if ct_info is not None and not ct_info[0].confirmed and not ct_info[2] and \
                not self.conntrack.confirm(ct_info[0], now):
            return None
        return pkt

    def _postrouting(self, pkt: bytearray, info: PacketInfo, now: float
                     ) -> bytearray | None:
        ct_info = info.conntrack
        if ct_info is not None:
            entry, d, related = ct_info
            if related:
                self._translate_error(pkt, entry, d, POST)
            else:
                if not entry.confirmed and not self._snat(entry, info, pkt):
                    return None
                self._translate(pkt, info, entry, d, POST)
        acl = self.acl_in.get(info.out_iface)
        if acl is not None and not self._acl(acl, pkt, inbound=True):
            self.counters["acl.denied_in"] += 1
            return None
        if ct_info is not None and not ct_info[2] and not ct_info[0].confirmed and \
                not self.conntrack.confirm(ct_info[0], now):
            return None
        return pkt

    def _snat(self, entry: ConntrackEntry, info: PacketInfo, pkt: bytearray) -> bool:
        """A new flow leaving: the source it takes. False: drop (no port left)."""
        src = entry.orig.src
        if src in self.ipv4.local:
            return True  # our own traffic leaves with our own address
        out = self.node.interfaces[info.out_iface]
        nat = self.nat
        o, r = entry.orig, entry.reply
        static = nat.static_by_private(src)
        if (r.src, r.sport) != (o.dst, o.dport) and o.dst in self.public and \
                self._hairpin(src, r.src):
            # hairpinning (RFC 4787 REQ-9): an inside host reached another through one
            # of our public addresses; it must appear as its own public endpoint, or
            # the replies would go straight back and miss us
            self.counters["nat.hairpinned"] += 1
            if static is not None:
                entry.reply = FlowTuple(r.proto, r.src, r.sport, static.public, r.dport)
                return True
            masquerade = [p for _, p in self.masquerade.values()]
            return self._map(entry, o.dst if o.dst in masquerade or not masquerade
                             else masquerade[0], pkt)
        if static is not None and not out.on_link(src):
            entry.reply = FlowTuple(r.proto, r.src, r.sport, static.public, r.dport)
            self.counters["nat.static"] += 1
            return True
        rule = self.masquerade.get(out.index)
        if rule is not None and rule[0].covers(src):
            return self._map(entry, rule[1], pkt)
        return True

    def _map(self, entry: ConntrackEntry, public: bytes, pkt: bytearray) -> bool:
        o, r = entry.orig, entry.reply
        hl = (pkt[0] & 0x0F) << 2
        if r.proto not in (6, 17) and not (r.proto == 1 and len(pkt) > hl
                                           and pkt[hl] in ICMP_QUERY_TYPES):
            # no ports to map (GRE, ESP, other ICMP): the address alone
            entry.reply = FlowTuple(r.proto, r.src, r.sport, public, r.dport)
            return True
        mapping = self.nat.mapping_for(o.proto, o.src, o.sport, public, (r.src, r.sport))
        if mapping is None:
            return False
        self._attach(entry, mapping)
        mapping.remember(r.src, r.sport)  # where it went, for filtering replies to it
        port = mapping.pport
        entry.reply = FlowTuple(r.proto, r.src, port if r.proto == 1 else r.sport, public,
                                port)
        return True

    # -- observation ------------------------------------------------------------------------

    def gauges(self) -> dict[str, int]:
        return {"conntrack.entries": self.conntrack.count,
                "nat.mappings": len(self.nat.by_public)}

    def describe_flows(self, now: float) -> list[dict]:
        """Every tracked flow, as `conntrack -L` shows it: both tuples, state, timeout."""
        names = {1: "icmp", 6: "tcp", 17: "udp"}
        out = []
        for e in self.conntrack.entries():
            sides = []
            for d, t in ((ORIGINAL, e.orig), (REPLY, e.reply)):
                sides.append({"src": ip_to_str(t.src), "dst": ip_to_str(t.dst),
                              "sport": t.sport, "dport": t.dport,
                              "packets": e.packets[d], "bytes": e.bytes[d]})
            out.append({"protocol": names.get(e.orig.proto, str(e.orig.proto)),
                        "state": e.state_name, "timeout": max(round(e.expires - now), 0),
                        "assured": e.assured, "original": sides[0], "reply": sides[1],
                        "nat": e.orig.src != e.reply.dst or e.orig.dst != e.reply.src})
        out.sort(key=lambda f: (f["protocol"], f["original"]["src"], f["original"]["sport"]))
        return out

    def describe_rules(self) -> dict:
        names = {i.index: i.name for i in self.node.interfaces}
        acls: dict[str, dict] = {}
        for direction, table in (("inbound", self.acl_in), ("outbound", self.acl_out)):
            for index, acl in table.items():
                entry = acls.setdefault(names[index], {})
                entry[direction] = [r.describe() for r in acl.rules]
                entry[f"{direction}_default_denied"] = acl.default_hits
        groups = {names[i]: {"inbound": [r.describe() for r in g.inbound],
                             "outbound": [r.describe() for r in g.outbound]}
                  for i, g in self.groups.items()}
        nat = self.config.nat
        return {
            "acl": acls, "security_groups": groups,
            "nat": {
                "filtering": nat.filtering, "port_range": list(nat.port_range),
                "ports_per_subscriber": nat.ports_per_subscriber,
                "masquerade": [{"interface": names[i], "address": ip_to_str(p)}
                               for i, (_, p) in self.masquerade.items()],
                "static": [{"public": ip_to_str(s.public), "private": ip_to_str(s.private)}
                           for s in nat.static],
                "forward": [{"protocol": {6: "tcp", 17: "udp"}[f.protocol],
                             "public": f"{ip_to_str(f.public)}:{f.port}",
                             "to": f"{ip_to_str(f.private)}:{f.private_port}"}
                            for f in nat.forwards],
                "mappings": len(self.nat.by_public),
            },
        }

    def change_rule(self, request: dict) -> str:
        """Add or delete one ACL or security-group rule at run time. Returns what was
        done; ValueError (one sentence) when the request is wrong."""
        index = {i.name: i.index for i in self.node.interfaces}
        name = request.get("interface")
        if name not in index:
            raise ValueError(f"no interface named {name}")
        kind, direction = request.get("kind"), request.get("direction")
        if kind not in ("acl", "sg") or direction not in ("inbound", "outbound"):
            raise ValueError("say --acl or --sg, and inbound or outbound")
        op = request.get("op")
        i = index[name]
        if kind == "acl":
            table = (self.acl_in if direction == "inbound" else self.acl_out).get(i)
            if table is None:
                raise ValueError(f"{name} has no network ACL (add an [[acl]] for it in the "
                                 "node's file)")
            if op == "del":
                if not table.remove(int(request.get("number", -1))):
                    raise ValueError(f"{name} {direction} has no rule {request.get('number')}")
                return f"deleted ACL rule {request['number']} ({name} {direction})"
            rule = make_rule(int(request.get("number", 0)), request.get("action", "allow"),
                             request.get("protocol", "all"), request.get("cidr", "0.0.0.0/0"),
                             request.get("ports"))
            table.add(rule)
            return f"added ACL rule {rule.number} ({name} {direction})"
        group = self.groups.get(i)
        if group is None:
            raise ValueError(f"{name} has no security group (add a [[security_group]] for it "
                             "in the node's file)")
        rules = group.inbound if direction == "inbound" else group.outbound
        if op == "del":
            number = int(request.get("number", -1))
            kept = [r for r in rules if r.number != number]
            if len(kept) == len(rules):
                raise ValueError(f"{name} {direction} has no security-group rule {number}")
            rules[:] = kept
            return f"deleted security-group rule {number} ({name} {direction})"
        number = int(request.get("number") or group.next_number)
        if any(r.number == number for r in rules):
            raise ValueError(f"{name} {direction} already has a security-group rule {number}")
        rule = make_rule(number, "allow", request.get("protocol", "all"),
                         request.get("cidr", "0.0.0.0/0"), request.get("ports"))
        group.next_number = max(group.next_number, number + 1)
        rules.append(rule)
        return f"added security-group rule {rule.number} ({name} {direction})"
