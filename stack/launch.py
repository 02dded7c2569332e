"""Setting up and tearing down what one node needs from the machine: namespaces, TAPs
(each in its interface's namespace, optionally on a bridge), the control socket and the
pcap file, then the runtime over them. Used by `tapstack run`, `tapstack connect` and
the lab's tapstack nodes."""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import logging
import os
import random
import signal
import socket
from collections.abc import Iterator
from typing import Any

from stack.config import LinkSpec, NodeSpec
from stack.link import netns as ns
from stack.link.impair import Impairment, ImpairSpecError
from stack.link.pcap import PcapTee
from stack.link.tap import TapLink
from stack.net.host import HostConfig
from stack.net.middlebox import Middlebox
from stack.net.node import Node
from stack.net.tcp.congestion import CONTROLLERS
from stack.net.tcp.congestion import DEFAULT as DEFAULT_CC
from stack.net.tcp.connection import TcpConfig
from stack.runtime import Runtime, bind_control_socket, control_request, running_instances
from stack.wire.ethernet import is_multicast_mac, mac_from_str
from stack.wire.ipv4 import ip_to_str
from stack.wire.virtio import offload_mode

log = logging.getLogger("tapstack")


class UsageError(Exception):
    """A bad option or environment; the message is one sentence for the user."""


def require_root(what: str) -> None:
    if os.geteuid() != 0:
        raise UsageError(f"tapstack {what} needs root (TAP devices and network namespaces); "
                         f"run it with sudo")


def _raise_exit(signum: int, _frame: Any) -> None:
    raise SystemExit(0)


def netns_text(netns: str | None) -> str:
    return "the current namespace" if netns is None else f"namespace {netns}"


def _interface(text: str, what: str) -> ipaddress.IPv4Interface:
    try:
        iface = ipaddress.IPv4Interface(text)
    except ValueError:
        raise UsageError(f"{what} {text!r} is not an IPv4 address with a prefix, "
                         "like 10.77.0.2/24") from None
    net = iface.network
    if net.prefixlen < 31 and iface.ip in (net.network_address, net.broadcast_address):
        raise UsageError(f"{what} {text} is the network's own or broadcast address")
    return iface


def check_name(text: str, what: str) -> None:
    """An interface or namespace name the kernel takes: 1..15 characters for a device,
    no '/', no white space, not '.' or '..'."""
    limit = 15 if what == "--tap" else 64
    if not text or len(text) > limit or "/" in text or text in (".", "..") or \
            any(c.isspace() for c in text):
        raise UsageError(f"{what} {text!r} is not a valid name: 1 to {limit} characters, "
                         "no '/' or spaces")


def check_port(port: int, what: str) -> None:
    if not 0 < port < 65536:
        raise UsageError(f"{what} {port} is not a port number (1..65535)")


def build_config(args: argparse.Namespace) -> tuple[HostConfig, str | None]:
    """Validate `run`'s options; returns the interface config and the host-side CIDR."""
    check_name(args.tap, "--tap")
    if not args.no_netns:
        check_name(args.netns, "--netns")
    address = _interface(args.address, "--address")
    if address.network.prefixlen > 30:
        raise UsageError(f"--address {args.address} leaves no room for a host side; "
                         "use a prefix of /30 or shorter")
    try:
        mac = mac_from_str(args.mac)
    except ValueError as exc:
        raise UsageError(f"--mac: {exc}") from None
    if is_multicast_mac(mac):
        raise UsageError(f"--mac {args.mac} is a multicast address; the first byte must be even")
    if not 576 <= args.mtu <= 9000:
        raise UsageError(f"--mtu {args.mtu} is outside 576..9000")
    host_cidr: str | None = None
    gateway = None
    if args.host_address.lower() != "none":
        host = _interface(args.host_address, "--host-address")
        if host.network != address.network or host.ip == address.ip:
            raise UsageError(f"--host-address {args.host_address} must be another address "
                             f"in {address.network}")
        host_cidr = str(host)
        gateway = host.ip.packed
    if args.gateway:
        try:
            gateway = ipaddress.IPv4Address(args.gateway).packed
        except ValueError:
            raise UsageError(f"--gateway {args.gateway!r} is not an IPv4 address") from None
    if not 0 < args.msl <= 600:
        raise UsageError(f"--msl {args.msl:g} must be more than 0 and at most 600 seconds")
    cc = getattr(args, "cc", DEFAULT_CC)
    if cc not in CONTROLLERS:
        raise UsageError(f"--cc {cc} is not one of {', '.join(CONTROLLERS)}")
    offload_arg = getattr(args, "offload", None)
    if offload_arg is None and not args.impair:  # e.g. a whole test run with offload on
        offload_arg = os.environ.get("TAPSTACK_OFFLOAD") or None
    try:
        offload = offload_mode(offload_arg)
    except ValueError as exc:
        raise UsageError(f"--offload: {exc}") from None
    if args.impair:
        try:
            Impairment.parse(args.impair)
        except ImpairSpecError as exc:
            raise UsageError(f"--impair: {exc}") from None
        if offload:
            raise UsageError("--impair works on plain frames; drop --offload to use it")
    config = HostConfig(mac=mac, address=address.ip.packed,
                        prefixlen=address.network.prefixlen, gateway=gateway,
                        mtu=args.mtu, tcp=TcpConfig(msl=args.msl, cc=cc),
                        offload=offload)
    return config, host_cidr


def host_spec(args: argparse.Namespace, config: HostConfig, host_cidr: str | None
              ) -> NodeSpec:
    """The one-interface node that `run`'s flags describe."""
    netns = None if args.no_netns else args.netns
    node = config.node_config()
    node.name = args.tap
    return NodeSpec(node, [LinkSpec(args.tap, netns, None, host_cidr, config.offload)], netns,
                    control=args.tap)


def _refuse_duplicate_address(spec: NodeSpec) -> None:
    """Two stacks with one address in one namespace would answer each other's ARP and
    split the traffic: refuse to be the second (asked over the first one's socket)."""
    ours = {a for iface in spec.node.interfaces for a, _ in iface.addresses}
    for name in running_instances():
        if name == spec.control_name:
            continue
        try:
            snapshot = control_request(name, {"cmd": "stats"}, timeout=1.0)
        except (OSError, ValueError):
            continue
        for iface in snapshot.get("interfaces", {}).values():
            for cidr in iface.get("addresses", []):
                address = ipaddress.IPv4Interface(cidr).ip.packed
                if address in ours:
                    where = name.removeprefix("node/")
                    raise UsageError(f"{ip_to_str(address)} is already the address of the "
                                     f"tapstack on {where} in {netns_text(spec.netns)}; "
                                     "give this one another --address")


@contextlib.contextmanager
def stack_environment(spec: NodeSpec, command: str, pcap_path: str | None = None,
                      queues: int = 1
                      ) -> Iterator[tuple[list[TapLink], socket.socket, PcapTee | None]]:
    """Namespaces, TAPs, control socket and pcap for one node; all undone on exit.
    With `queues` > 1 (one interface only), the TAP is a multi-queue one and the links
    are its queues, one per worker (stack/workers.py).

    Each TAP is created in its interface's namespace (made if missing, and then removed
    at the end); the process settles in the node's namespace, where its control socket
    lives."""
    require_root(command)
    if not os.path.exists("/dev/net/tun"):
        raise UsageError("/dev/net/tun is missing; this kernel or container has no TUN/TAP "
                         "support")
    # Until the event loop takes over, SIGTERM unwinds through the finally below.
    previous = signal.signal(signal.SIGTERM, _raise_exit)
    created: list[str] = []
    links: list[TapLink] = []
    control = None
    pcap = None
    start = ns.current_netns()
    try:
        for name in [spec.netns, *(link.netns for link in spec.links)]:
            if name is None or name in created:
                continue
            if ns.netns_exists(name) and ns.is_marked(name) and not ns.netns_pids(name):
                # made by a tapstack that was killed: ours now, removed at exit
                log.info("reusing network namespace %s, left by an earlier tapstack", name)
                created.append(name)
            elif not ns.netns_exists(name):
                ns.create_netns(name, mark=True)
                created.append(name)
                log.info("created network namespace %s", name)
                ns.enter_netns(name)
                ns.ip_link_up("lo")
                ns.return_to_netns(start)
        # the control socket first: a second instance of the same node stops here
        if spec.netns is not None:
            ns.enter_netns(spec.netns)
        control = bind_control_socket(spec.control_name, netns_text(spec.netns))
        _refuse_duplicate_address(spec)
        ns.return_to_netns(start)
        for link_spec, iface in zip(spec.links, spec.node.interfaces, strict=True):
            if link_spec.netns is not None:
                ns.enter_netns(link_spec.netns)
            for _ in range(queues):
                link = TapLink(link_spec.tap, link_spec.offload, multi_queue=queues > 1)
                link.open(netns_text(link_spec.netns))
                links.append(link)
            ns.configure_host_side(link_spec.tap, link_spec.host_cidr, iface.mtu)
            if link_spec.bridge:
                ns.attach_to_bridge(link_spec.tap, link_spec.bridge)
            ns.return_to_netns(start)
        if spec.netns is not None:
            ns.enter_netns(spec.netns)
        if pcap_path:
            try:
                pcap = PcapTee(pcap_path)
            except OSError as exc:
                raise UsageError(f"cannot write --pcap {pcap_path}: {exc.strerror}") from None
        yield links, control, pcap
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # cleanup is not interrupted
        for link in links:
            link.close()
        if control is not None:
            control.close()
        if pcap is not None:
            pcap.close()
        ns.return_to_netns(start)  # a program that goes on is where it started
        for name in created:
            ns.delete_netns(name)
            log.info("removed network namespace %s", name)
        os.close(start)
        signal.signal(signal.SIGTERM, previous)


def build_runtime(spec: NodeSpec, links: list[TapLink], pcap: PcapTee | None,
             impair: str | None = None) -> Runtime:
    iface = spec.node.interfaces[0]
    info = {"address": ", ".join(f"{ip_to_str(a)}/{p}" for a, p in iface.addresses),
            "mac": ":".join(f"{b:02x}" for b in iface.mac), "tap": spec.links[0].tap,
            "netns": spec.netns, "mtu": iface.mtu, "pid": os.getpid()}
    pcaps: list[PcapTee | None] = [pcap] + [None] * (len(links) - 1)
    node = Node(spec.node, random.Random())
    if spec.middlebox is not None and spec.middlebox.enabled:
        Middlebox(node, spec.middlebox)
    return Runtime(node, links, pcaps, info, impair=impair)
