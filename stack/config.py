"""A node described by a TOML file (`tapstack run --config node.toml`).

    name = "r1"                  # the node's name (control socket, stats)
    netns = "lab"                # namespace the process and its control socket live in
    forwarding = true            # a router; false (the default): a host
    msl = 30                     # TCP maximum segment lifetime, seconds
    cc = "cubic"                 # TCP congestion control: cubic, newreno or bbr

    [[interface]]
    name = "eth0"                # as routes and stats call it
    tap = "r1-eth0"              # TAP device (default: the node's name, '-', this name)
    netns = "lab"                # namespace the TAP is created in (default: the node's)
    bridge = "br-lan"            # attach the TAP to this existing bridge there
    mac = "02:00:00:00:01:01"    # default: derived from the node and interface names
    mtu = 1500
    addresses = ["10.0.1.1/24"]
    host_address = "10.0.1.254/24"   # give the kernel's side of the TAP an address
    offload = false              # virtio-net headers: "csum" (checksum offload), or
                                 # "tso" / true (checksums, TSO out, GSO super-frames in)

    [[route]]
    to = "default"               # or a prefix, "10.2.0.0/16"
    via = "10.0.1.254"           # next hop; or dev = "eth0" for an on-link route
    metric = 0

    [services]
    echo = true                  # echo 7, discard 9, source 19, UDP echo 7
    stream = 5004                # paced numbered chunks on UDP and TCP (or false)
    http = 80                    # port, or false
    dns_zones = ["bob.com.zone"] # authoritative DNS on UDP and TCP 53 (zone files)
    resolver = { root_hints = "root.hints" }   # or { forward = ["192.0.2.53"] }
    https = { port = 443, names = ["www.bob.com"] }   # or true: HTTPS, lab CA (as --tls)

    [conntrack], [nat], [[acl]], [[security_group]]: see config_middlebox.py

A bad file ends with one sentence naming the file, the key and what is wrong.
"""

from __future__ import annotations

import hashlib
import ipaddress
import tomllib
from dataclasses import dataclass, field
from typing import Any

from stack.config_middlebox import parse_middlebox
from stack.net.interface import InterfaceConfig
from stack.net.middlebox import MiddleboxConfig
from stack.net.node import NodeConfig, RouteConfig
from stack.net.route import parse_prefix
from stack.net.tcp.congestion import CONTROLLERS
from stack.net.tcp.congestion import DEFAULT as DEFAULT_CC
from stack.net.tcp.connection import TcpConfig
from stack.wire.ethernet import is_multicast_mac, mac_from_str
from stack.wire.virtio import offload_mode

IFNAMSIZ = 15  # Linux device names: at most 15 characters


class ConfigError(ValueError):
    """One sentence for the user: the file, the key, what is wrong."""


@dataclass(slots=True)
class LinkSpec:
    """Where one interface's TAP lives and how the kernel's side of it is set up."""

    tap: str
    netns: str | None = None  # None: the current namespace
    bridge: str | None = None
    host_cidr: str | None = None
    offload: str = ""  # '' (plain frames), 'csum' or 'tso' (stack.wire.virtio)


@dataclass(slots=True)
class NodeSpec:
    node: NodeConfig
    links: list[LinkSpec]
    netns: str | None = None
    echo: bool = True
    http_port: int | None = 80
    source: str = ""  # the file it came from
    control: str = ""  # control socket name; default node/NAME
    middlebox: MiddleboxConfig | None = None  # NAT, ACLs, security groups
    dns_zones: list[str] = field(default_factory=list)  # served on port 53
    resolver: dict = field(default_factory=dict)  # root_hints or forward: resolve on 53
    https: dict | None = None  # {"port", "names"}: HTTPS from the lab CA (as --tls)
    stream: int | None = None  # the paced stream service's port (UDP and TCP)

    @property
    def control_name(self) -> str:
        return self.control or f"node/{self.node.name}"


def derived_mac(node: str, iface: str) -> bytes:
    """A stable, locally administered unicast MAC for an interface without one."""
    digest = hashlib.sha256(f"{node}/{iface}".encode()).digest()
    return bytes([0x02]) + digest[:5]


class _Reader:
    def __init__(self, path: str) -> None:
        self.path = path

    def fail(self, key: str, what: str) -> ConfigError:
        return ConfigError(f"{self.path}: {key}: {what}")

    def get(self, table: dict, key: str, where: str, kind: type | tuple, default: Any = None,
            required: bool = False) -> Any:
        name = f"{where}.{key}" if where else key
        if key not in table:
            if required:
                raise self.fail(name, "is missing")
            return default
        value = table[key]
        if (kind is int and isinstance(value, bool)) or not isinstance(value, kind):
            expected = {str: "a string", int: "an integer", bool: "true or false",
                        list: "a list", dict: "a table", float: "a number"}
            want = kind if isinstance(kind, type) else kind[0]
            raise self.fail(name, f"must be {expected.get(want, want.__name__)}, "
                                  f"not {value!r}")
        return value

    def unknown(self, table: dict, allowed: set[str], where: str) -> None:
        for key in table:
            if key not in allowed:
                name = f"{where}.{key}" if where else key
                raise self.fail(name, f"is not a known key (known: {', '.join(sorted(allowed))})")


def _cidr(r: _Reader, text: str, key: str) -> ipaddress.IPv4Interface:
    try:
        iface = ipaddress.IPv4Interface(text)
    except ValueError:
        raise r.fail(key, f"{text!r} is not an address with a prefix, like 10.0.1.1/24"
                     ) from None
    if "/" not in text:
        raise r.fail(key, f"{text!r} needs a prefix length, like {text}/24")
    net = iface.network
    if net.prefixlen < 31 and iface.ip in (net.network_address, net.broadcast_address):
        raise r.fail(key, f"{text} is the network's own or broadcast address")
    return iface


def _address(r: _Reader, text: str, key: str) -> bytes:
    try:
        return ipaddress.IPv4Address(text).packed
    except ValueError:
        raise r.fail(key, f"{text!r} is not an IPv4 address") from None


def parse_node(data: dict, path: str) -> NodeSpec:
    r = _Reader(path)
    r.unknown(data, {"name", "netns", "forwarding", "msl", "cc", "interface", "route",
                     "services",
                     "conntrack", "nat", "acl", "security_group"}, "")
    name = r.get(data, "name", "", str, "tapstack")
    netns = r.get(data, "netns", "", str, None)
    forwarding = r.get(data, "forwarding", "", bool, False)
    msl = r.get(data, "msl", "", (int, float), 30.0)
    if not 0 < msl <= 600:
        raise r.fail("msl", f"{msl} is outside 0..600 seconds")
    cc = r.get(data, "cc", "", str, DEFAULT_CC)
    if cc not in CONTROLLERS:
        raise r.fail("cc", f"{cc!r} is not one of {', '.join(CONTROLLERS)}")
    raw_ifaces = r.get(data, "interface", "", list, required=True)
    if not raw_ifaces:
        raise r.fail("interface", "needs at least one [[interface]]")
    interfaces: list[InterfaceConfig] = []
    links: list[LinkSpec] = []
    seen_taps: set[tuple[str | None, str]] = set()
    for i, t in enumerate(raw_ifaces):
        where = f"interface[{i}]"
        if not isinstance(t, dict):
            raise r.fail(where, "must be a table ([[interface]])")
        r.unknown(t, {"name", "tap", "netns", "bridge", "mac", "mtu", "addresses",
                      "host_address", "offload"}, where)
        ifname = r.get(t, "name", where, str, f"eth{i}")
        if any(c.name == ifname for c in interfaces):
            raise r.fail(f"{where}.name", f"{ifname} is used twice")
        tap = r.get(t, "tap", where, str, f"{name}-{ifname}")
        if not 0 < len(tap) <= IFNAMSIZ or "/" in tap or " " in tap:
            raise r.fail(f"{where}.tap", f"{tap!r} is not a device name of 1..15 characters")
        tap_ns = r.get(t, "netns", where, str, netns)
        if (tap_ns, tap) in seen_taps:
            raise r.fail(f"{where}.tap", f"{tap} is used twice in the same namespace")
        seen_taps.add((tap_ns, tap))
        mac_text = r.get(t, "mac", where, str, None)
        if mac_text is None:
            mac = derived_mac(name, ifname)
        else:
            try:
                mac = mac_from_str(mac_text)
            except ValueError as exc:
                raise r.fail(f"{where}.mac", str(exc)) from None
            if is_multicast_mac(mac):
                raise r.fail(f"{where}.mac", f"{mac_text} is a multicast address")
        mtu = r.get(t, "mtu", where, int, 1500)
        if not 576 <= mtu <= 9000:
            raise r.fail(f"{where}.mtu", f"{mtu} is outside 576..9000")
        addresses = []
        for k, text in enumerate(r.get(t, "addresses", where, list, [])):
            key = f"{where}.addresses[{k}]"
            if not isinstance(text, str):
                raise r.fail(key, f"must be a string like 10.0.1.1/24, not {text!r}")
            cidr = _cidr(r, text, key)
            addresses.append((cidr.ip.packed, cidr.network.prefixlen))
        host = r.get(t, "host_address", where, str, None)
        if host is not None:
            cidr = _cidr(r, host, f"{where}.host_address")
            if any(cidr.ip.packed == a for a, _ in addresses):
                raise r.fail(f"{where}.host_address", f"{host} is tapstack's own address")
        try:
            offload = offload_mode(r.get(t, "offload", where, (bool, str), False))
        except ValueError as exc:
            raise r.fail(f"{where}.offload", str(exc)) from None
        interfaces.append(InterfaceConfig(ifname, mac, addresses, mtu, offload=offload))
        links.append(LinkSpec(tap, tap_ns, r.get(t, "bridge", where, str, None), host,
                              offload))
    routes = []
    for i, t in enumerate(r.get(data, "route", "", list, [])):
        where = f"route[{i}]"
        if not isinstance(t, dict):
            raise r.fail(where, "must be a table ([[route]])")
        r.unknown(t, {"to", "via", "dev", "metric"}, where)
        to = r.get(t, "to", where, str, required=True)
        try:
            parse_prefix(to)
        except ValueError:
            raise r.fail(f"{where}.to", f"{to!r} is not a prefix like 10.2.0.0/16 or "
                                        "'default' (host bits must be zero)") from None
        via = r.get(t, "via", where, str, None)
        dev = r.get(t, "dev", where, str, None)
        if via is None and dev is None:
            raise r.fail(where, "needs 'via' (a next hop) or 'dev' (an interface)")
        if dev is not None and all(c.name != dev for c in interfaces):
            raise r.fail(f"{where}.dev", f"there is no interface named {dev}")
        gateway = _address(r, via, f"{where}.via") if via is not None else None
        if gateway is not None and dev is None:
            on_link = any(
                ipaddress.IPv4Address(gateway) in ipaddress.IPv4Interface(
                    (a, p)).network for c in interfaces for a, p in c.addresses)
            if not on_link:
                raise r.fail(f"{where}.via", f"{via} is not on the subnet of any interface")
        metric = r.get(t, "metric", where, int, 0)
        routes.append(RouteConfig(to, gateway, dev, metric))
    services = r.get(data, "services", "", dict, {})
    r.unknown(services, {"echo", "http", "https", "dns_zones", "resolver", "stream"},
              "services")
    resolver = r.get(services, "resolver", "services", dict, {})
    r.unknown(resolver, {"root_hints", "forward"}, "services.resolver")
    echo = r.get(services, "echo", "services", bool, True)
    dns_zones = r.get(services, "dns_zones", "services", list, [])
    if not all(isinstance(z, str) for z in dns_zones):
        raise r.fail("services.dns_zones", "must be a list of zone file paths")
    http = services.get("http", 80)
    if http is False:
        http_port = None
    elif isinstance(http, int) and not isinstance(http, bool) and 0 < http < 65536:
        http_port = http
    else:
        raise r.fail("services.http", f"must be a port (1..65535) or false, not {http!r}")
    stream = services.get("stream", False)
    if stream is not False and (not isinstance(stream, int) or isinstance(stream, bool)
                                or not 0 < stream < 65536):
        raise r.fail("services.stream", f"must be a port (1..65535) or false, not {stream!r}")
    https = services.get("https", False)
    if https is True:
        https = {}
    if https is not False:
        if not isinstance(https, dict):
            raise r.fail("services.https", "must be true, false or a table {port, names}")
        r.unknown(https, {"port", "names"}, "services.https")
        port = https.get("port", 443)
        if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
            raise r.fail("services.https.port", f"must be a port (1..65535), not {port!r}")
        names = https.get("names", [])
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise r.fail("services.https.names", "must be a list of DNS names")
        https = {"port": port, "names": names}
    node = NodeConfig(name=name, interfaces=interfaces, routes=routes, forwarding=forwarding,
                      tcp=TcpConfig(msl=float(msl), cc=cc))
    middlebox = parse_middlebox(data, interfaces, r.fail)
    return NodeSpec(node, links, netns, echo, http_port, path, middlebox=middlebox,
                    dns_zones=dns_zones, resolver=resolver, https=https or None,
                    stream=stream or None)


def read_toml(path: str) -> dict:
    """A TOML file as a dict; ConfigError (one sentence) when it cannot be read."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read it ({exc.strerror})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None


def load_node(path: str) -> NodeSpec:
    """Read and check a node file; ConfigError (one sentence) when anything is wrong."""
    return parse_node(read_toml(path), path)
