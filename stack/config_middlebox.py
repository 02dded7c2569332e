"""The middlebox part of a node file: connection tracking, NAT, network ACLs and security
groups.

    [conntrack]                      # timeouts in seconds; the table's size
    max_entries = 65536
    tcp_established = 7440
    tcp_transitory = 240
    udp = 300
    icmp = 60

    [nat]
    filtering = "address"            # or "endpoint", "address-port"
    port_range = [1024, 65535]
    ports_per_subscriber = 0         # carrier-grade NAT: ports per inside address
    masquerade = [{ interface = "wan", sources = ["192.168.1.0/24"] }]   # address = ...
    static = [{ public = "198.51.100.10", private = "10.0.1.10" }]
    forward = [{ protocol = "tcp", interface = "wan", port = 8080, to = "192.168.1.3:80" }]

    [[acl]]                          # stateless, first match wins, implicit deny
    interface = "subnet"             # guards what lies behind this interface
    inbound = [{ number = 100, action = "allow", protocol = "tcp", cidr = "0.0.0.0/0",
                 ports = [80, 80] }]
    outbound = [{ number = 100, action = "allow", protocol = "all", cidr = "0.0.0.0/0" }]

    [[security_group]]               # stateful, allow only; outbound default: all
    interface = "subnet"
    inbound = [{ protocol = "tcp", cidr = "0.0.0.0/0", ports = [443, 443] }]
"""

from __future__ import annotations

import ipaddress
from typing import Any

from stack.net.conntrack import ConntrackConfig
from stack.net.filters import Acl, SecurityGroup, make_rule
from stack.net.interface import InterfaceConfig
from stack.net.middlebox import MiddleboxConfig
from stack.net.nat import FILTERING, Masquerade, NatConfig, PortForward, StaticNat

PROTOCOL_NUMBERS = {"tcp": 6, "udp": 17, "icmp": 1}


def parse_middlebox(data: dict, interfaces: list[InterfaceConfig], fail: Any
                    ) -> MiddleboxConfig:
    """`fail(key, what)` makes the error for the file; interfaces are the node's."""
    names = {i.name for i in interfaces}
    config = MiddleboxConfig()

    def table(value: Any, key: str) -> dict:
        if not isinstance(value, dict):
            raise fail(key, "must be a table")
        return value

    def listing(value: Any, key: str) -> list:
        if not isinstance(value, list):
            raise fail(key, "must be a list")
        return value

    def only(t: dict, allowed: set[str], key: str) -> None:
        for k in t:
            if k not in allowed:
                raise fail(f"{key}.{k}", f"is not a known key (known: "
                                         f"{', '.join(sorted(allowed))})")

    def interface(t: dict, key: str) -> str:
        name = t.get("interface")
        if name not in names:
            raise fail(f"{key}.interface", f"{name!r} is not an interface of this node")
        return name

    def address(text: Any, key: str) -> bytes:
        try:
            return ipaddress.IPv4Address(text).packed
        except (ValueError, TypeError):
            raise fail(key, f"{text!r} is not an IPv4 address") from None

    ct = table(data.get("conntrack", {}), "conntrack")
    defaults = ConntrackConfig()
    only(ct, set(ConntrackConfig.__slots__), "conntrack")
    for k, v in ct.items():
        if isinstance(v, bool) or not isinstance(v, int | float) or v <= 0:
            raise fail(f"conntrack.{k}", f"must be a positive number, not {v!r}")
        setattr(defaults, k, int(v) if k == "max_entries" else float(v))
    config.conntrack = defaults

    nat = table(data.get("nat", {}), "nat")
    only(nat, {"filtering", "port_range", "ports_per_subscriber", "masquerade", "static",
               "forward"}, "nat")
    nc = NatConfig()
    filtering = nat.get("filtering", nc.filtering)
    if filtering not in FILTERING:
        raise fail("nat.filtering", f"{filtering!r} is not one of {', '.join(FILTERING)}")
    nc.filtering = filtering
    pr = nat.get("port_range", list(nc.port_range))
    if not (isinstance(pr, list) and len(pr) == 2 and all(isinstance(p, int) for p in pr)
            and 1 <= pr[0] <= pr[1] <= 65535):
        raise fail("nat.port_range", f"{pr!r} must be [low, high] within 1..65535")
    nc.port_range = (pr[0], pr[1])
    limit = nat.get("ports_per_subscriber", 0)
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
        raise fail("nat.ports_per_subscriber", f"must be a count, not {limit!r}")
    nc.ports_per_subscriber = limit
    by_name = {i.name: i for i in interfaces}
    for n, m in enumerate(listing(nat.get("masquerade", []), "nat.masquerade")):
        key = f"nat.masquerade[{n}]"
        m = table(m, key)
        only(m, {"interface", "address", "sources"}, key)
        name = interface(m, key)
        public = address(m["address"], f"{key}.address") if "address" in m else None
        if public is None and not by_name[name].addresses:
            raise fail(f"{key}.interface", f"{name} has no address to masquerade with")
        sources = None
        if "sources" in m:
            sources = []
            for k, text in enumerate(listing(m["sources"], f"{key}.sources")):
                try:
                    net = ipaddress.IPv4Network(text)
                except (ValueError, TypeError):
                    raise fail(f"{key}.sources[{k}]", f"{text!r} is not a prefix like "
                                                      "192.168.1.0/24") from None
                sources.append((int(net.network_address), int(net.netmask)))
        nc.masquerade.append(Masquerade(name, public, sources))
    for n, s in enumerate(listing(nat.get("static", []), "nat.static")):
        key = f"nat.static[{n}]"
        s = table(s, key)
        only(s, {"public", "private"}, key)
        nc.static.append(StaticNat(address(s.get("public"), f"{key}.public"),
                                   address(s.get("private"), f"{key}.private")))
    for n, f in enumerate(listing(nat.get("forward", []), "nat.forward")):
        key = f"nat.forward[{n}]"
        f = table(f, key)
        only(f, {"protocol", "interface", "public", "port", "to"}, key)
        proto = PROTOCOL_NUMBERS.get(f.get("protocol", "tcp"))
        if proto not in (6, 17):
            raise fail(f"{key}.protocol", "must be tcp or udp")
        if "public" in f:
            public = address(f["public"], f"{key}.public")
        else:
            iface = by_name[interface(f, key)]
            if not iface.addresses:
                raise fail(f"{key}.interface", f"{iface.name} has no address")
            public = iface.addresses[0][0]
        port = f.get("port")
        if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
            raise fail(f"{key}.port", f"must be a port, not {port!r}")
        to = f.get("to", "")
        host, _, to_port = str(to).rpartition(":")
        if not to_port.isdigit() or not 1 <= int(to_port) <= 65535:
            raise fail(f"{key}.to", f"{to!r} must look like 192.168.1.3:80")
        nc.forwards.append(PortForward(proto, public, port, address(host, f"{key}.to"),
                                       int(to_port)))
    config.nat = nc

    def rules(items: Any, key: str, numbered: bool) -> list:
        out = []
        for k, rule in enumerate(listing(items, key)):
            rkey = f"{key}[{k}]"
            rule = table(rule, rkey)
            only(rule, {"number", "action", "protocol", "cidr", "ports"} if numbered
                 else {"protocol", "cidr", "ports"}, rkey)
            try:
                out.append(make_rule(rule.get("number", k + 1) if numbered else k + 1,
                                     rule.get("action", "allow") if numbered else "allow",
                                     str(rule.get("protocol", "all")),
                                     str(rule.get("cidr", "0.0.0.0/0")), rule.get("ports")))
            except ValueError as exc:
                raise fail(rkey, str(exc)) from None
        return out

    for n, a in enumerate(listing(data.get("acl", []), "acl")):
        key = f"acl[{n}]"
        a = table(a, key)
        only(a, {"interface", "inbound", "outbound"}, key)
        name = interface(a, key)
        for direction, target in (("inbound", config.acl_in), ("outbound", config.acl_out)):
            acl = Acl()
            for rule in rules(a.get(direction, []), f"{key}.{direction}", True):
                try:
                    acl.add(rule)
                except ValueError as exc:
                    raise fail(f"{key}.{direction}", str(exc)) from None
            target[name] = acl
    for n, g in enumerate(listing(data.get("security_group", []), "security_group")):
        key = f"security_group[{n}]"
        g = table(g, key)
        only(g, {"interface", "inbound", "outbound"}, key)
        name = interface(g, key)
        group = SecurityGroup(inbound=rules(g.get("inbound", []), f"{key}.inbound", False))
        if "outbound" in g:
            group.outbound = rules(g["outbound"], f"{key}.outbound", False)
        group.next_number = max([r.number for r in group.inbound + group.outbound] + [0]) + 1
        config.groups[name] = group
    return config
