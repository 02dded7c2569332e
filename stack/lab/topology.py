"""A lab file: segments (layer-2 broadcast domains) and the nodes attached to them.

    name = "chain"                    # unique per lab: namespaces are chain-NODE, chain-sw

    [[segment]]
    name = "ab"                       # a Linux bridge (br-ab) in the lab's switch namespace
    mtu = 1500                        # default MTU of the interfaces on it

    [[node]]
    name = "a"
    kind = "linux"                    # a network namespace with a veth into each segment
    forwarding = false
    commands = ["python3 -m http.server 8000"]   # started in the background at `up`
    [[node.interface]]
    segment = "ab"
    addresses = ["10.1.0.2/24"]
    [[node.route]]
    to = "default"
    via = "10.1.0.1"

    [[node]]
    name = "r1"
    kind = "tapstack"                 # a tapstack process, one TAP per interface
    forwarding = true
    offload = false
    services = { echo = true, http = false }
    ...

Errors name the file, the key and what is wrong, in one sentence.
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass, field

from stack.config import ConfigError, read_toml
from stack.config_middlebox import parse_middlebox
from stack.net.interface import InterfaceConfig
from stack.wire.virtio import offload_mode

KINDS = ("tapstack", "linux")


def _files_beside(path: str, services: dict) -> None:
    """Zone and hints files named in a lab are relative to the lab file (its nodes run
    from elsewhere)."""
    base = os.path.dirname(os.path.abspath(path))
    if isinstance(services.get("dns_zones"), list):
        services["dns_zones"] = [os.path.join(base, z) if isinstance(z, str) else z
                                 for z in services["dns_zones"]]
    resolver = services.get("resolver")
    if isinstance(resolver, dict) and isinstance(resolver.get("root_hints"), str):
        services["resolver"] = {**resolver,
                                "root_hints": os.path.join(base, resolver["root_hints"])}
MIDDLEBOX_KEYS = ("conntrack", "nat", "acl", "security_group")
_NAME = re.compile(r"^[a-z0-9][a-z0-9-]*$")


@dataclass(slots=True)
class LabInterface:
    name: str
    segment: str
    addresses: list[str]
    mtu: int
    mac: str | None = None


@dataclass(slots=True)
class LabRoute:
    to: str
    via: str | None = None
    dev: str | None = None
    metric: int = 0


@dataclass(slots=True)
class LabNode:
    name: str
    kind: str
    interfaces: list[LabInterface]
    routes: list[LabRoute] = field(default_factory=list)
    forwarding: bool = False
    commands: list[str] = field(default_factory=list)
    offload: str = ""  # "", "csum" or "tso" (stack.wire.virtio)
    echo: bool = True
    http: int | None = None
    middlebox: dict = field(default_factory=dict)  # conntrack, nat, acl, security_group
    dns: dict = field(default_factory=dict)  # services: dns_zones, resolver, https, stream


@dataclass(slots=True)
class Segment:
    name: str
    mtu: int = 1500

    @property
    def bridge(self) -> str:
        return f"br-{self.name}"


@dataclass(slots=True)
class Lab:
    name: str
    segments: dict[str, Segment]
    nodes: dict[str, LabNode]
    path: str = ""
    nameserver: str = "127.0.0.1"  # what the Linux nodes' resolv.conf names

    @property
    def switch_netns(self) -> str:
        """Where the bridges, the tapstack nodes' TAPs and control sockets live."""
        return f"{self.name}-sw"

    def netns(self, node: LabNode) -> str:
        """A Linux node's namespace; a tapstack node's process lives in the switch's."""
        return f"{self.name}-{node.name}" if node.kind == "linux" else self.switch_netns

    @staticmethod
    def port(node: LabNode, iface: LabInterface) -> str:
        """The device on the bridge: a TAP for tapstack, the veth's far end for Linux."""
        return f"{node.name}.{iface.name}"


def _check_name(path: str, key: str, value: object, limit: int) -> str:
    if not isinstance(value, str) or not _NAME.match(value) or len(value) > limit:
        raise ConfigError(f"{path}: {key}: {value!r} must be lower-case letters, digits and "
                          f"'-', at most {limit} characters")
    return value


def _keys(path: str, table: dict, allowed: set[str], where: str) -> None:
    for key in table:
        if key not in allowed:
            raise ConfigError(f"{path}: {where + '.' if where else ''}{key}: is not a known "
                              "key (known: "
                              f"{', '.join(sorted(allowed))})")


def parse_lab(data: dict, path: str) -> Lab:
    _keys(path, data, {"name", "segment", "node", "nameserver"}, "")
    nameserver = data.get("nameserver", "127.0.0.1")
    try:
        ipaddress.IPv4Address(nameserver)
    except ValueError:
        raise ConfigError(f"{path}: nameserver: {nameserver!r} is not an IPv4 address"
                          ) from None
    name = _check_name(path, "name", data.get("name"), 20)
    segments: dict[str, Segment] = {}
    for i, t in enumerate(data.get("segment", [])):
        where = f"segment[{i}]"
        if not isinstance(t, dict):
            raise ConfigError(f"{path}: {where}: must be a table ([[segment]])")
        _keys(path, t, {"name", "mtu"}, where)
        seg = _check_name(path, f"{where}.name", t.get("name"), 12)
        if seg in segments:
            raise ConfigError(f"{path}: {where}.name: segment {seg} is defined twice")
        mtu = t.get("mtu", 1500)
        if not isinstance(mtu, int) or not 576 <= mtu <= 9000:
            raise ConfigError(f"{path}: {where}.mtu: {mtu!r} is outside 576..9000")
        segments[seg] = Segment(seg, mtu)
    if not segments:
        raise ConfigError(f"{path}: segment: a lab needs at least one [[segment]]")
    nodes: dict[str, LabNode] = {}
    for i, t in enumerate(data.get("node", [])):
        where = f"node[{i}]"
        if not isinstance(t, dict):
            raise ConfigError(f"{path}: {where}: must be a table ([[node]])")
        _keys(path, t, {"name", "kind", "interface", "route", "forwarding", "commands",
                        "offload", "services", *MIDDLEBOX_KEYS}, where)
        node_name = _check_name(path, f"{where}.name", t.get("name"), 8)
        if node_name in nodes or node_name == "sw":
            raise ConfigError(f"{path}: {where}.name: {node_name} is used twice (or is 'sw')")
        kind = t.get("kind", "linux")
        if kind not in KINDS:
            raise ConfigError(f"{path}: {where}.kind: {kind!r} is not one of "
                              f"{', '.join(KINDS)}")
        ifaces = []
        for k, it in enumerate(t.get("interface", [])):
            iw = f"{where}.interface[{k}]"
            if not isinstance(it, dict):
                raise ConfigError(f"{path}: {iw}: must be a table")
            _keys(path, it, {"name", "segment", "addresses", "mtu", "mac"}, iw)
            ifname = _check_name(path, f"{iw}.name", it.get("name", f"eth{k}"), 6)
            seg = it.get("segment")
            if seg not in segments:
                raise ConfigError(f"{path}: {iw}.segment: {seg!r} is not a segment of this "
                                  "lab")
            addresses = it.get("addresses", [])
            for a, text in enumerate(addresses):
                try:
                    ipaddress.IPv4Interface(text)
                    if "/" not in text:
                        raise ValueError
                except (ValueError, TypeError):
                    raise ConfigError(f"{path}: {iw}.addresses[{a}]: {text!r} is not an "
                                      "address with a prefix, like 10.0.1.1/24") from None
            mtu = it.get("mtu", segments[seg].mtu)
            if not isinstance(mtu, int) or not 576 <= mtu <= 9000:
                raise ConfigError(f"{path}: {iw}.mtu: {mtu!r} is outside 576..9000")
            if any(x.name == ifname for x in ifaces):
                raise ConfigError(f"{path}: {iw}.name: {ifname} is used twice")
            ifaces.append(LabInterface(ifname, seg, list(addresses), mtu, it.get("mac")))
        if not ifaces:
            raise ConfigError(f"{path}: {where}.interface: node {node_name} needs at least "
                              "one [[node.interface]]")
        routes = []
        for k, rt in enumerate(t.get("route", [])):
            rw = f"{where}.route[{k}]"
            if not isinstance(rt, dict) or "to" not in rt:
                raise ConfigError(f"{path}: {rw}: needs 'to' (a prefix or 'default')")
            _keys(path, rt, {"to", "via", "dev", "metric"}, rw)
            if rt.get("via") is None and rt.get("dev") is None:
                raise ConfigError(f"{path}: {rw}: needs 'via' (a next hop) or 'dev'")
            routes.append(LabRoute(rt["to"], rt.get("via"), rt.get("dev"),
                                   rt.get("metric", 0)))
        commands = t.get("commands", [])
        if not isinstance(commands, list) or not all(isinstance(c, str) for c in commands):
            raise ConfigError(f"{path}: {where}.commands: must be a list of strings")
        if commands and kind != "linux":
            raise ConfigError(f"{path}: {where}.commands: only Linux nodes run commands")
        services = t.get("services", {})
        if not isinstance(services, dict):
            raise ConfigError(f"{path}: {where}.services: must be a table")
        _keys(path, services, {"echo", "http", "https", "dns_zones", "resolver", "stream"},
              f"{where}.services")
        http = services.get("http", False)
        forwarding = t.get("forwarding", False)
        if not isinstance(forwarding, bool):
            raise ConfigError(f"{path}: {where}.forwarding: must be true or false")
        middlebox = {k: t[k] for k in MIDDLEBOX_KEYS if k in t}
        dns_services = {k: services[k] for k in ("dns_zones", "resolver", "https", "stream")
                        if k in services}
        _files_beside(path, dns_services)
        if dns_services and kind != "tapstack":
            raise ConfigError(f"{path}: {where}.services: only tapstack nodes serve DNS "
                              "or HTTPS (give a Linux node commands)")
        if middlebox and kind != "tapstack":
            raise ConfigError(f"{path}: {where}.{next(iter(middlebox))}: only tapstack nodes "
                              "take NAT and filter settings (give a Linux node commands)")
        if middlebox:
            _check_middlebox(path, where, middlebox, ifaces)
        try:
            offload = offload_mode(t.get("offload", False))
        except ValueError as exc:
            raise ConfigError(f"{path}: {where}.offload: {exc}") from None
        nodes[node_name] = LabNode(node_name, kind, ifaces, routes, forwarding, commands,
                                   offload,
                                   bool(services.get("echo", True)),
                                   None if http is False else http, middlebox,
                                   dns_services)
    if not nodes:
        raise ConfigError(f"{path}: node: a lab needs at least one [[node]]")
    return Lab(name, segments, nodes, path, nameserver)


def _check_middlebox(path: str, where: str, data: dict, ifaces: list[LabInterface]) -> None:
    """The node's NAT and filters, checked now so that a mistake is one sentence here,
    not a node that dies at `lab up`."""
    configs = [InterfaceConfig(i.name, b"\x02" + bytes(5), [
        (ipaddress.IPv4Interface(a).ip.packed, ipaddress.IPv4Interface(a).network.prefixlen)
        for a in i.addresses]) for i in ifaces]

    def fail(key: str, what: str) -> ConfigError:
        return ConfigError(f"{path}: {where}.{key}: {what}")

    parse_middlebox(data, configs, fail)


def load_lab(path: str) -> Lab:
    return parse_lab(read_toml(path), path)
