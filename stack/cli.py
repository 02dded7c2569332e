"""The `tapstack` command: `run` a stack on a TAP (or a node from a TOML file), read a
running one's `stats` and `route`, and build `lab` topologies."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

from stack.aio import new_event_loop
from stack.api import Stack
from stack.apps.http.server import HttpServerProtocol
from stack.config import ConfigError, NodeSpec, load_node
from stack.journey.scenarios import SCENARIOS as JOURNEY_SCENARIOS
from stack.lab.build import LabError
from stack.launch import (
    UsageError,
    build_config,
    build_runtime,
    check_port,
    host_spec,
    netns_text,
    require_root,
    stack_environment,
)
from stack.link import LinkError
from stack.link import netns as ns
from stack.runtime import Runtime, control_request, run, stream_control
from stack.serve import (
    load_app,
    load_dns,
    resolve_name,
    resolver_options,
    start_services,
    tls_ca_path,
    tls_context,
    zone_names,
)
from stack.show import format_conns, format_flows, format_routes, format_rules, format_stats
from stack.trace import format_event
from stack.wire.ipv4 import ip_to_str

log = logging.getLogger("tapstack")


# -- argument parsing ---------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tapstack",
                                description="A userspace TCP/IP stack on a Linux TAP device.")
    sub = p.add_subparsers(dest="command", required=True)

    common = argparse.ArgumentParser(add_help=False)
    where = common.add_mutually_exclusive_group()
    where.add_argument("--netns", default="tapstack",
                       help="network namespace to run in, created if missing "
                            "(default: %(default)s)")
    where.add_argument("--no-netns", action="store_true",
                       help="put the TAP in the current namespace (for a dedicated VM)")
    r = common
    r.add_argument("--tap", default="tap0", help="TAP device name (default: %(default)s)")
    r.add_argument("--address", default="10.77.0.2/24",
                   help="tapstack's address/prefix (default: %(default)s)")
    r.add_argument("--host-address", default="10.77.0.1/24",
                   help="address/prefix of the kernel's side of the TAP, or 'none' "
                        "(default: %(default)s)")
    r.add_argument("--gateway", default=None,
                   help="next hop for destinations off the subnet (default: the host address)")
    r.add_argument("--mac", default="02:00:0a:4d:00:02",
                   help="tapstack's MAC address (default: %(default)s)")
    r.add_argument("--mtu", type=int, default=1500, help="link MTU (default: %(default)s)")
    r.add_argument("--pcap", metavar="FILE", help="record every frame received and sent")
    r.add_argument("--log-level", default="info",
                   choices=["debug", "info", "warning", "error"])
    r.add_argument("--asyncio", action="store_true",
                   help="use the standard asyncio loop instead of uvloop")
    r.add_argument("--impair", metavar="SPEC",
                   help="faults on the link in both directions, e.g. "
                        "'loss=1%%,delay=5ms,jitter=2ms,reorder=5%%,duplicate=1%%,"
                        "corrupt=0.5%%,seed=7'")
    r.add_argument("--offload", nargs="?", const="tso", choices=["csum", "tso"],
                   help="open the TAP with virtio-net headers: 'csum' lets the kernel "
                        "finish and check TCP checksums (frames stay MTU-sized); 'tso' (the "
                        "default with no value) adds TSO out and GSO super-frames in; "
                        "without it, TAPSTACK_OFFLOAD=csum|tso sets the mode (not with "
                        "--impair)")
    r.add_argument("--msl", type=float, default=30.0,
                   help="maximum segment lifetime in seconds; TIME-WAIT lasts 2*MSL "
                        "(default: %(default)s)")
    r.add_argument("--cc", default="cubic", metavar="NAME",
                   help="TCP congestion control: cubic (RFC 9438 with HyStart++), newreno "
                        "or bbr (model-based, keeps its rate under random loss) "
                        "(default: %(default)s)")

    r = sub.add_parser("run", parents=[common],
                       help="serve on a TAP device (in a network namespace by default)")
    r.add_argument("--trace", metavar="FILE",
                   help="record the decision trace (JSON lines) from the start")
    r.add_argument("--config", metavar="FILE",
                   help="run the node this TOML file describes (interfaces, routes, "
                        "forwarding, services) instead of the one-interface flags")
    r.add_argument("--workers", metavar="N",
                   help="worker processes on a multi-queue TAP, one per queue; 'auto': one "
                        "per core (default: 1, or TAPSTACK_WORKERS where --config, --pcap "
                        "and --trace are not given; see docs/architecture.md)")
    r.add_argument("--no-services", action="store_true",
                   help="do not start the echo (TCP and UDP 7), discard (9) and source (19) "
                        "services")
    r.add_argument("--stream", type=int, metavar="PORT",
                   help="serve paced numbered chunks on this UDP and TCP port (request: "
                        "STREAM count size interval_ms)")
    _http_options(r)
    r.add_argument("--http-port", type=int, default=80,
                   help="port of the HTTP server (default: %(default)s)")
    r.add_argument("--no-http", action="store_true", help="do not serve HTTP")
    r.add_argument("--server", choices=["builtin", "uvicorn"], default="builtin",
                   help="the HTTP server: tapstack's own, or unmodified uvicorn on "
                        "tapstack's TCP (default: %(default)s)")
    r.add_argument("--tls", action="store_true",
                   help="serve HTTPS too, with a certificate from tapstack's lab CA "
                        "(`tapstack ca` prints its path)")
    r.add_argument("--tls-port", type=int, default=443,
                   help="port of the HTTPS server (default: %(default)s)")
    r.add_argument("--tls-name", action="append", default=[], metavar="NAME",
                   help="a DNS name to hold a certificate for (repeatable; SNI picks it)")
    r.add_argument("--tls-cert", metavar="FILE",
                   help="your own certificate chain (PEM) instead of the lab CA's")
    r.add_argument("--tls-key", metavar="FILE", help="the private key of --tls-cert")
    r.add_argument("--dns-zone", action="append", default=[], metavar="FILE",
                   help="serve this RFC 1035 zone file on UDP and TCP port 53 "
                        "(authoritative; repeatable)")
    r.add_argument("--resolver", action="store_true",
                   help="be a caching, recursive DNS resolver on port 53 (with "
                        "--root-hints or --forward)")
    r.add_argument("--root-hints", metavar="FILE",
                   help="the root servers to start iterating from (named.root format)")
    r.add_argument("--forward", action="append", default=[], metavar="ADDR",
                   help="forward questions to this resolver instead (repeatable)")

    k = sub.add_parser("serve-kernel",
                       help="the same HTTP server on ordinary kernel sockets (uvloop), for "
                            "side-by-side comparisons")
    k.add_argument("--address", default="0.0.0.0", help="address to bind (default: %(default)s)")
    k.add_argument("--port", type=int, default=8080, help="port (default: %(default)s)")
    k.add_argument("--workers", type=int, default=1, metavar="N",
                   help="processes sharing the port with SO_REUSEPORT (default: %(default)s)")
    k.add_argument("--log-level", default="info",
                   choices=["debug", "info", "warning", "error"])
    _http_options(k)

    c = sub.add_parser("connect", parents=[common],
                       help="open a TCP connection from tapstack, like nc: stdin to the "
                            "peer, the peer to stdout")
    c.add_argument("host", help="the peer's IPv4 address or name")
    c.add_argument("port", type=int, help="the peer's TCP port")
    c.add_argument("--nameserver", metavar="ADDR",
                   help="resolve a name through this DNS server, over tapstack's own UDP "
                        "(default: the first nameserver of the namespace's resolv.conf)")

    for name, text in (("stats", "print the counters of a running tapstack"),
                       ("route", "print (or add, del) a running tapstack's routes, like "
                                 "ip route"),
                       ("conntrack", "list the flows a running tapstack tracks, like "
                                     "conntrack -L"),
                       ("rules", "list (or add, del) a running tapstack's ACL and "
                                 "security-group rules, with their hit counters"),
                       ("dns", "a running resolver's cache: dns cache (list it), "
                               "dns flush (empty it)"),
                       ("trace", "follow a running tapstack's decisions, one line per "
                                 "event (Ctrl-C stops)"),
                       ("conns", "list a running tapstack's TCP connections, like ss -tin")):
        s = sub.add_parser(name, help=text)
        if name == "trace":
            s.add_argument("--layer", action="append", default=[],
                           choices=["link", "eth", "arp", "ipv4", "icmp", "udp", "tcp",
                                    "http", "nat", "acl", "sg", "conntrack", "dns"],
                           help="only events of this layer (repeatable)")
            s.add_argument("--address", help="only events to or from this address")
            s.add_argument("--port", type=int, help="only events to or from this port")
            s.add_argument("--count", type=int, metavar="N", help="stop after N events")
            s.add_argument("--seconds", type=float, metavar="S", help="stop after S seconds")
        if name == "conns":
            s.add_argument("--watch", action="store_true",
                           help="refresh every second, with delivery rates")
        if name == "stats":
            s.add_argument("--nonzero", action="store_true", help="hide counters at zero")
            s.add_argument("--watch", action="store_true",
                           help="refresh every second, with rates per second")
        if name == "dns":
            s.add_argument("action", choices=["cache", "flush"])
        if name == "rules":
            _rules_options(s)
        if name == "route":
            s.add_argument("action", nargs="?", choices=["list", "add", "del"], default="list")
            s.add_argument("prefix", nargs="?", help="10.0.0.0/8 or default (add, del)")
            s.add_argument("--via", metavar="GW", help="the next hop (add)")
            s.add_argument("--dev", metavar="IF", help="leave by this interface (add)")
            s.add_argument("--metric", type=int, help="its metric (add; del only that one)")
        swhere = s.add_mutually_exclusive_group()
        swhere.add_argument("--netns", default="tapstack",
                            help="namespace the instance runs in (default: %(default)s)")
        swhere.add_argument("--no-netns", action="store_true",
                            help="the instance runs in the current namespace")
        which = s.add_mutually_exclusive_group()
        which.add_argument("--tap", default="tap0",
                           help="its TAP device (default: %(default)s)")
        which.add_argument("--node", help="the name of a node started with --config")
        s.add_argument("--json", action="store_true", help="print JSON instead of a table")

    pl = sub.add_parser("plot", help="draw one TCP connection of a capture: a time-sequence "
                                     "graph, and cwnd/srtt with --trace (PNG)")
    pl.add_argument("capture", help="a pcap file (tapstack run --pcap, tcpdump -w)")
    pl.add_argument("--trace", metavar="FILE",
                    help="the trace recorded with it (tapstack run --trace): adds cwnd and "
                         "srtt")
    pl.add_argument("--port", type=int, help="the connection using this port (default: the "
                                             "one that moved the most data)")
    pl.add_argument("--out", metavar="PNG", help="where to write (default: CAPTURE.png)")
    j = sub.add_parser("journey", help="Alice opens https://www.bob.com/ on the story's lab: "
                                       "every segment captured, every node traced, told "
                                       "step by step (a summary and a page)")
    j.add_argument("--lab", metavar="FILE", help="the lab (default: labs/alice-bob.toml); "
                                                 "brought up if it is not")
    j.add_argument("--out", metavar="DIR", default="journey",
                   help="where the captures, traces, journey.json and index.html go "
                        "(default: %(default)s)")
    j.add_argument("--url", default="https://www.bob.com/", help="what the client fetches")
    j.add_argument("--client", default="alice", help="the Linux node that runs curl")
    j.add_argument("--scenario", choices=JOURNEY_SCENARIOS,
                   help="break one thing on purpose and show where the packet dies: "
                        + "; ".join(JOURNEY_SCENARIOS) + " (see docs/journey.md)")
    sub.add_parser("cleanup", help="remove network namespaces that killed tapstack "
                                   "instances left behind (those with no process in them)")
    ca = sub.add_parser("ca", help="print the path of tapstack's lab CA certificate "
                                   "(made on first use), for curl --cacert")
    ca.add_argument("--state-dir", help="where the CA lives (default: $TAPSTACK_STATE, "
                                        "else /var/lib/tapstack as root)")

    from stack.lab.cli import add_lab_parser
    from stack.video.cli import add_hls_parser

    add_lab_parser(sub)
    add_hls_parser(sub, common)
    return p


def _rules_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", nargs="?", choices=["list", "add", "del"], default="list")
    p.add_argument("--interface", help="the interface the ACL or group sits on")
    kind = p.add_mutually_exclusive_group()
    kind.add_argument("--acl", dest="kind", action="store_const", const="acl",
                      help="a network ACL rule (numbered, allow or deny)")
    kind.add_argument("--sg", dest="kind", action="store_const", const="sg",
                      help="a security-group rule (allow)")
    way = p.add_mutually_exclusive_group()
    way.add_argument("--inbound", dest="direction", action="store_const", const="inbound",
                     help="into what lies behind the interface")
    way.add_argument("--outbound", dest="direction", action="store_const",
                     const="outbound", help="out of what lies behind the interface")
    p.add_argument("--number", type=int, help="rule number (ACL: order; del: which)")
    p.add_argument("--action", dest="verdict", choices=["allow", "deny"], default="allow")
    p.add_argument("--protocol", default="all", help="tcp, udp, icmp or all")
    p.add_argument("--cidr", default="0.0.0.0/0", help="the far end's prefix")
    p.add_argument("--ports", help="destination ports, like 80 or 1024-65535")


# -- run ----------------------------------------------------------------------------------


def _banner(args: argparse.Namespace, host_cidr: str | None) -> str:
    """The ready line and commands to try; each runs as printed (after a `#`, a note)."""
    ip = args.address.split("/")[0]
    prefix = "" if args.no_netns else f"ip netns exec {args.netns} "
    where = "the current namespace" if args.no_netns else f"namespace {args.netns}"
    me = _me()
    at = (" --no-netns" if args.no_netns else f" --netns {args.netns}") + (
        f" --tap {args.tap}" if args.tap != "tap0" else "")
    host = f", host side {host_cidr}" if host_cidr else ""
    port = "" if args.http_port == 80 else f":{args.http_port}"
    lines = [
        f"tapstack ready: {args.address} ({args.mac}) on {args.tap} in {where}{host}",
        "try:",
        f"  {prefix}ping -c 3 {ip}",
        f"  {prefix}arping -c 3 -I {args.tap} {ip}",
        *([] if args.no_http else [f"  {prefix}curl http://{ip}{port}/"]),
        *([f"  {prefix}curl --cacert {tls_ca_path(args)} https://{ip}"
           f"{'' if args.tls_port == 443 else f':{args.tls_port}'}/"] if args.tls else []),
        *([f"  {prefix}dig @{ip} {z}" for z in zone_names(args.dns_zone)]),
        f"  {prefix}tcpdump -ni {args.tap}",
        *([] if args.no_services else [
            f"  echo hello | {prefix}nc -N {ip} 7   # echo; discard on 9, UDP echo: nc -u",
            f"  echo 1000000 | {prefix}nc -N {ip} 19 | wc -c   # source: N bytes"]),
        f"  {me} stats{at} --nonzero   # counters",
        f"  {me} trace{at}   # every frame and decision, live",
        f"  {me} conns{at}   # the connection table, like ss -tin",
        "Ctrl-C stops it and removes what it created.",
    ]
    return "\n".join(lines)


def _me() -> str:
    """How to call this command again: `tapstack` if the shell finds it, else the path
    that started us (.venv/bin/tapstack after make run), so printed commands work."""
    if shutil.which("tapstack"):
        return "tapstack"
    argv0 = sys.argv[0]
    if os.path.basename(argv0) == "tapstack" and os.path.exists(argv0):
        return os.path.relpath(argv0) if not argv0.startswith("/") else argv0
    venv = os.path.join(os.path.dirname(sys.executable), "tapstack")
    return venv if os.path.exists(venv) else "tapstack"


def _http_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--app", metavar="MODULE:ATTR",
                   help="serve this ASGI application instead of the built-in site")
    p.add_argument("--app-dir", metavar="DIR", default=".",
                   help="where to import --app from (default: the current directory)")
    p.add_argument("--no-access-log", action="store_true",
                   help="no log line per HTTP request")
    p.add_argument("--root", metavar="DIR", help="serve static files from DIR")


def _node_banner(spec: NodeSpec) -> str:
    me = _me()
    in_ns = "" if spec.netns is None else f" --netns {spec.netns}"
    role = "router" if spec.node.forwarding else "host"
    lines = [f"tapstack ready: node {spec.node.name} ({role}) in {netns_text(spec.netns)}"]
    for iface, link in zip(spec.node.interfaces, spec.links, strict=True):
        addrs = ", ".join(f"{ip_to_str(a)}/{p}" for a, p in iface.addresses) or "no address"
        bridge = f", bridge {link.bridge}" if link.bridge else ""
        lines.append(f"  {iface.name}: {addrs} on {link.tap} in {netns_text(link.netns)}"
                     f"{bridge}, mtu {iface.mtu}")
    lines.append(f"  {me} route{in_ns} --node {spec.node.name}")
    lines.append(f"  {me} stats{in_ns} --node {spec.node.name}")
    return "\n".join(lines)


def cmd_run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(), format="tapstack: %(message)s",
                        stream=sys.stderr)
    if args.config:
        try:
            spec = load_node(args.config)
        except ConfigError as exc:
            raise UsageError(str(exc)) from None
        args.no_services = not spec.echo
        args.stream = args.stream or spec.stream
        args.no_http = spec.http_port is None
        args.http_port = spec.http_port or 80
        if spec.https is not None:
            args.tls, args.tls_port = True, spec.https["port"]
            args.tls_name = [*args.tls_name, *spec.https["names"]]

        def banner() -> str:
            return _node_banner(spec)
    else:
        config, host_cidr = build_config(args)
        spec = host_spec(args, config, host_cidr)
        check_port(args.http_port, "--http-port")
        if args.stream is not None:
            check_port(args.stream, "--stream")

        def banner() -> str:
            return _banner(args, host_cidr)
    stats_source: list[Runtime] = []
    app = load_app(args, lambda: stats_source[0].snapshot())
    dns_server = load_dns(args.dns_zone + spec.dns_zones)
    resolving = resolver_options(args, spec)
    tls = tls_context(args, spec)
    if args.server == "uvicorn" and (tls is not None or args.no_http):
        raise UsageError("--server uvicorn serves plain HTTP on --http-port; use the "
                         "built-in server for --tls")
    workers = _workers(args)
    if workers > 1:
        return _run_workers(args, spec, workers, banner, stats_source,
                            start_services(args, app, dns_server, resolving, tls))
    with stack_environment(spec, args.command, args.pcap) as (links, control, pcap):
        runtime = build_runtime(spec, links, pcap, args.impair)
        stats_source.append(runtime)
        if args.trace:
            try:
                runtime.trace_to_file(args.trace)
            except OSError as exc:
                raise UsageError(f"cannot write --trace {args.trace}: {exc.strerror}"
                                 ) from None

        def ready() -> None:
            print(banner(), flush=True)

        run(runtime, control, ready, setup=start_services(args, app, dns_server, resolving, tls),
            loop_factory=lambda: new_event_loop(not args.asyncio))
    return 0


def _workers(args: argparse.Namespace) -> int:
    """--workers as a number; UsageError when it cannot be one here."""
    text = args.workers
    if text is None:  # e.g. a whole test run with workers; never where they cannot be
        text = "1" if args.config or args.pcap or args.trace else \
            os.environ.get("TAPSTACK_WORKERS") or "1"
    if text == "auto":
        count = os.cpu_count() or 1
    elif text.isdigit() and 1 <= int(text) <= 64:
        count = int(text)
    else:
        raise UsageError(f"--workers {text} is not a number of workers (1..64) or 'auto'")
    if count > 1:
        if args.config:
            raise UsageError("--workers runs a host made by flags; a node from a file "
                             "(router, NAT, filters) runs as one process")
        if args.pcap or args.trace:
            raise UsageError("--pcap and --trace record one process; with --workers, "
                             "capture on the TAP (tcpdump -i tap0 in the namespace) or "
                             "follow `tapstack trace`")
    return count


def _run_workers(args: argparse.Namespace, spec: Any, count: int,
                 banner: Callable[[], str], stats_source: list,
                 setup: Callable[[Runtime], Any]) -> int:
    """`run --workers N`: the supervisor here, the stack in N forked workers."""
    from stack.link.steering import attach
    from stack.net.tcp.layer import EPHEMERAL_HIGH, EPHEMERAL_LOW
    from stack.workers import Steering, Supervisor, bind_worker_socket, make_inboxes

    with stack_environment(spec, args.command, queues=count) as (links, control, _):
        refused = "TAPSTACK_STEERING=software" if os.environ.get(
            "TAPSTACK_STEERING") == "software" else \
            attach(links[0].fileno(), count, EPHEMERAL_LOW, EPHEMERAL_HIGH)
        if refused:
            logging.getLogger("tapstack").warning("%s; flows that reach the wrong worker "
                                                  "are handed over in software", refused)
        inboxes = make_inboxes(count)
        senders = [tx for _, tx in inboxes]

        def start_worker(index: int, ready: Callable[[], None]) -> None:
            runtime = build_runtime(spec, [links[index]], None, args.impair)
            runtime.info.update(worker=index, pid=os.getpid())
            if index:  # one announcement of our address, not one per worker
                runtime.node.interfaces[0].arp.config.announcements = 0
            stats_source.append(runtime)
            steering = Steering(runtime.node, index, count, inboxes[index][0], senders)
            steering.install()
            own = bind_worker_socket(spec.control_name, index)

            async def worker_setup(rt: Runtime) -> Any:
                def take() -> None:
                    steering.take_inbox(rt.loop.time())
                    rt.flush_now()

                rt.loop.add_reader(inboxes[index][0].fileno(), take)
                return await setup(rt)

            run(runtime, own, ready, setup=worker_setup,
                loop_factory=lambda: new_event_loop(not args.asyncio))

        def ready() -> None:
            print(banner() + f"\n{count} workers on a multi-queue {spec.links[0].tap}: "
                  "`tapstack stats` sums them, `tapstack conns` names each "
                  "connection's worker", flush=True)

        info = {"node": spec.node.name, "tap": spec.links[0].tap, "netns": spec.netns,
                "steering": "software: " + refused if refused else "ebpf"}

        def worker_fds(index: int) -> set[int]:
            return {links[index].fileno(), *(s.fileno() for pair in inboxes for s in pair)}

        failed = Supervisor(spec.control_name, count, control, start_worker, info,
                            (UsageError, LinkError), worker_fds).run(ready)
    if failed:
        raise UsageError(failed)
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from stack.plot import draw, read_connection

    try:
        series = read_connection(args.capture, args.port, args.trace)
    except FileNotFoundError as exc:
        raise UsageError(f"cannot read {exc.filename}: no such file") from None
    except (ValueError, OSError) as exc:
        raise UsageError(f"cannot plot {args.capture}: {exc}") from None
    out = args.out or (args.capture.rsplit(".", 1)[0] + ".png")
    draw(series, out)
    (sip, sport), (rip, rport) = series.sender, series.receiver
    print(f"{sip}:{sport} -> {rip}:{rport}: {len(series.segments)} data segments, "
          f"{len(series.retransmissions)} retransmissions, {series.bytes:,} bytes in "
          f"{series.duration:.2f} s" + (f", {len(series.cwnd)} cwnd samples"
                                        if series.cwnd else "") + f"; wrote {out}")
    return 0


def cmd_journey(args: argparse.Namespace) -> int:
    require_root("journey")
    from stack import journey

    ok, lines, page = journey.run(args.lab or journey.default_lab(), args.out, args.url,
                                  args.client, args.scenario)
    for line in lines:
        print(line)
    print(f"the walkthrough: {page}; the facts: {os.path.join(args.out, 'journey.json')}")
    print(f"the lab stays up (a second run shows the caches): tapstack lab down "
          f"{args.lab or journey.default_lab()}")
    if not ok:
        with open(os.path.join(args.out, "journey.json")) as f:
            report = json.load(f)
        why = (report.get("scenario") or {}).get("differs") or "some changes were not undone" \
            if args.scenario else report["verdict"].get("text")
        print(f"tapstack: {'scenario ' + args.scenario + ': ' if args.scenario else ''}{why}",
              file=sys.stderr)
    return 0 if ok else 1


def cmd_cleanup(args: argparse.Namespace) -> int:
    require_root("cleanup")
    removed, kept = [], []
    for name in ns.marked_netns():
        if not ns.netns_exists(name):
            ns.unmark(name)
        elif pids := ns.netns_pids(name):
            kept.append(f"{name} (in use by pid {', '.join(map(str, pids))})")
        else:
            ns.delete_netns(name)
            removed.append(name)
    print(f"removed {len(removed)} namespace(s) left by tapstack"
          + (f": {', '.join(removed)}" if removed else ""))
    for line in kept:
        print(f"kept {line}")
    return 0


def cmd_ca(args: argparse.Namespace) -> int:
    from stack.certs import LabCA

    try:
        print(LabCA(args.state_dir).cert_path)
    except OSError as exc:
        raise UsageError(f"cannot make the lab CA: {exc}") from None
    return 0


def cmd_serve_kernel(args: argparse.Namespace) -> int:
    """The same HTTP server and site on the kernel's TCP/IP, for comparisons."""
    logging.basicConfig(level=args.log_level.upper(), format="tapstack: %(message)s",
                        stream=sys.stderr)
    app = load_app(args, None)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        try:
            server = await loop.create_server(
                lambda: HttpServerProtocol(app, access_log=not args.no_access_log),
                args.address, args.port, backlog=1024, reuse_address=True,
                reuse_port=args.workers > 1)
        except OSError as exc:
            raise UsageError(f"cannot listen on {args.address}:{args.port}: "
                             f"{exc.strerror}") from None
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        if first:
            print(f"serve-kernel ready: http://{args.address}:{args.port}/ on kernel "
                  f"sockets ({args.workers} process{'es' if args.workers > 1 else ''})",
                  flush=True)
        await stop.wait()
        server.close()

    import uvloop

    if not 1 <= args.workers <= 64:
        raise UsageError(f"--workers {args.workers} is outside 1..64")
    children = []
    first = True
    for _ in range(args.workers - 1):  # before any loop exists: plain forks
        pid = os.fork()
        if pid == 0:
            first, children = False, []
            import ctypes

            ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # go when the first one goes
            break
        children.append(pid)
    try:
        uvloop.run(main())
    finally:
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            os.waitpid(pid, 0)
    return 0


def cmd_connect(args: argparse.Namespace) -> int:
    """Like `nc HOST PORT`, but the TCP connection is tapstack's own (active open)."""
    logging.basicConfig(level=args.log_level.upper(), format="tapstack: %(message)s",
                        stream=sys.stderr)
    config, host_cidr = build_config(args)
    result: list[BaseException] = []
    tasks: list[asyncio.Task] = []

    async def session(runtime: Runtime) -> None:
        loop = asyncio.get_running_loop()
        stack = Stack(runtime)
        try:
            host = await resolve_name(stack, args.host, args.nameserver, spec.netns)
            reader, writer = await stack.open_connection(host, args.port)
        except OSError as exc:
            result.append(exc)
            runtime.stop()
            return
        print(f"tapstack connected: {args.address.split('/')[0]}:"
              f"{writer.get_extra_info('sockname')[1]} -> {args.host}:{args.port}",
              file=sys.stderr, flush=True)

        async def upload() -> None:
            stdin = sys.stdin.buffer
            while chunk := await loop.run_in_executor(None, stdin.read1, 256 * 1024):
                writer.write(chunk)
                await writer.drain()
            writer.write_eof()

        async def download() -> None:
            out = sys.stdout.buffer
            while chunk := await reader.read(256 * 1024):
                out.write(chunk)
            out.flush()

        async def both() -> None:
            try:
                await asyncio.gather(upload(), download())
                info = writer.get_extra_info("tcp_info")
                log.info("done: %s", json.dumps(info))
                writer.close()
                await asyncio.sleep(0.05)  # let our FIN and last ACK leave
            except OSError as exc:
                result.append(exc)
            finally:
                runtime.stop()

        tasks.append(loop.create_task(both()))

    spec = host_spec(args, config, host_cidr)
    with stack_environment(spec, args.command, args.pcap) as (links, control, pcap):
        runtime = build_runtime(spec, links, pcap, args.impair)
        run(runtime, control, None, use_uvloop=not args.asyncio, setup=session)
    if result:
        raise UsageError(f"connect {args.host}:{args.port}: {result[0]}")
    return 0


# -- stats --------------------------------------------------------------------------------


def cmd_stats(args: argparse.Namespace) -> int:
    snapshot = _request(args, {"cmd": "stats"})
    if args.json:
        print(json.dumps(snapshot, indent=2))
        return 0
    if not args.watch:
        print(format_stats(snapshot, nonzero=args.nonzero))
        return 0
    previous, then = None, time.monotonic()
    try:
        while True:
            now = time.monotonic()
            print("\033[H\033[2J" + format_stats(snapshot, args.nonzero, previous,
                                                 max(now - then, 1e-3)), flush=True)
            previous, then = snapshot, now
            time.sleep(1.0)
            snapshot = control_request(_reach_name(args), {"cmd": "stats"})
    except KeyboardInterrupt:
        return 0


def _reach(args: argparse.Namespace) -> tuple[str, str, str]:
    """Go where the instance runs; its control name, and how to name it in errors."""
    name = f"node/{args.node}" if args.node else args.tap
    what = f"node {args.node}" if args.node else args.tap
    where_text = "the current namespace" if args.no_netns else f"namespace {args.netns}"
    if not args.no_netns:
        require_root(f"{args.command} --netns")
        if not ns.netns_exists(args.netns):
            raise UsageError(f"no tapstack is running in namespace {args.netns} "
                             "(it does not exist)")
        ns.enter_netns(args.netns)
    return name, what, where_text


def _reach_name(args: argparse.Namespace) -> str:
    return f"node/{args.node}" if args.node else args.tap


def _request(args: argparse.Namespace, request: dict[str, Any]) -> dict[str, Any]:
    """Ask the running instance the command names; its 'error' is ours."""
    name, what, where_text = _reach(args)
    try:
        answer = control_request(name, request)
    except (ConnectionRefusedError, FileNotFoundError):
        raise UsageError(f"no tapstack is running on {what} in {where_text}") from None
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read {args.command} from {what} in {where_text}: {exc}"
                         ) from None
    if "error" in answer:
        raise UsageError(answer["error"])
    return answer


class _Stop(Exception):
    pass


def cmd_trace(args: argparse.Namespace) -> int:
    """Follow the decision trace: one readable line (or JSON) per event."""
    name, what, where_text = _reach(args)
    request = {"cmd": "trace", "layers": args.layer, "address": args.address,
               "port": args.port}
    if args.seconds:
        def stop(*_: Any) -> None:
            raise _Stop

        signal.signal(signal.SIGALRM, stop)
        signal.setitimer(signal.ITIMER_REAL, args.seconds)
    seen = 0
    try:
        for event in stream_control(name, request):
            if "tracing" in event:
                print(f"tracing node {event['tracing']} ({what} in {where_text}); Ctrl-C "
                      "stops", file=sys.stderr, flush=True)
                continue
            if "dropped" in event:
                print(f"... {event['dropped']} events dropped (this terminal is slower "
                      "than the stack)", file=sys.stderr, flush=True)
                continue
            print(json.dumps(event) if args.json else format_event(event), flush=True)
            seen += 1
            if args.count and seen >= args.count:
                break
    except (ConnectionRefusedError, FileNotFoundError):
        raise UsageError(f"no tapstack is running on {what} in {where_text}") from None
    except (_Stop, KeyboardInterrupt):
        pass
    return 0


def cmd_conns(args: argparse.Namespace) -> int:
    previous: dict[str, int] = {}
    while True:
        answer = _request(args, {"cmd": "conns"})
        if args.json and not args.watch:
            print(json.dumps(answer, indent=2))
            return 0
        text = format_conns(answer, previous if args.watch else None)
        if args.watch:
            print("\033[H\033[2J" + text, flush=True)
            previous = {f"{c['local']} {c['remote']}": c["bytes_acked"] + c["bytes_received"]
                        for c in answer["connections"] if "bytes_acked" in c}  # not TIME-WAIT
            try:
                time.sleep(1.0)
            except KeyboardInterrupt:
                return 0
        else:
            print(text)
            return 0


def cmd_conntrack(args: argparse.Namespace) -> int:
    answer = _request(args, {"cmd": "conntrack"})
    print(json.dumps(answer, indent=2) if args.json else format_flows(answer))
    return 0


def cmd_rules(args: argparse.Namespace) -> int:
    if args.action == "list":
        answer = _request(args, {"cmd": "rules"})
        print(json.dumps(answer, indent=2) if args.json else format_rules(answer))
        return 0
    if not args.interface or not args.kind or not args.direction:
        raise UsageError(f"rules {args.action} needs --interface, --acl or --sg, and "
                         "--inbound or --outbound")
    request: dict[str, Any] = {"cmd": "rule", "op": args.action, "interface": args.interface,
                               "kind": args.kind, "direction": args.direction}
    if args.action == "del" or args.kind == "acl":
        if args.number is None:
            raise UsageError(f"rules {args.action} --{args.kind} needs --number")
    if args.number is not None:  # a security group numbers new rules itself otherwise
        request["number"] = args.number
    if args.action == "add":
        request.update(action=args.verdict, protocol=args.protocol, cidr=args.cidr)
        if args.ports:
            low, _, high = args.ports.partition("-")
            if not low.isdigit() or (high and not high.isdigit()):
                raise UsageError(f"--ports {args.ports!r} must look like 80 or 1024-65535")
            request["ports"] = [int(low), int(high or low)]
    print(_request(args, request)["done"])
    return 0


def cmd_dns(args: argparse.Namespace) -> int:
    try:
        answer = _request(args, {"cmd": f"dns-{args.action}"})
    except UsageError as exc:
        if "unknown request" in str(exc):
            raise UsageError("that tapstack runs no resolver (run it with --resolver)"
                             ) from None
        raise
    if args.action == "flush":
        print(answer["done"])
    elif args.json:
        print(json.dumps(answer, indent=2))
    else:
        for e in answer["entries"]:
            what = "negative" if e["negative"] else e["type"]
            print(f"{e['name']:<40} {what:<8} {e['ttl']:>7} s  from {e['from']}")
        print(f"tapstack dns: {len(answer['entries'])} entries")
    return 0


def cmd_route(args: argparse.Namespace) -> int:
    if args.action != "list":
        if not args.prefix:
            raise UsageError(f"route {args.action} needs a prefix (10.0.0.0/8 or default)")
        print(_request(args, {"cmd": "route", "op": args.action, "to": args.prefix,
                              "via": args.via, "dev": args.dev, "metric": args.metric})["done"])
        return 0
    snapshot = _request(args, {"cmd": "stats"})
    print(json.dumps(snapshot.get("routes", []), indent=2) if args.json
          else format_routes(snapshot))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "run":
            return cmd_run(args)
        if args.command == "connect":
            return cmd_connect(args)
        if args.command == "serve-kernel":
            return cmd_serve_kernel(args)
        if args.command == "route":
            return cmd_route(args)
        if args.command == "ca":
            return cmd_ca(args)
        if args.command == "cleanup":
            return cmd_cleanup(args)
        if args.command == "trace":
            return cmd_trace(args)
        if args.command == "plot":
            return cmd_plot(args)
        if args.command == "journey":
            return cmd_journey(args)
        if args.command == "conns":
            return cmd_conns(args)
        if args.command == "conntrack":
            return cmd_conntrack(args)
        if args.command == "rules":
            return cmd_rules(args)
        if args.command == "dns":
            return cmd_dns(args)
        if args.command == "lab":
            from stack.lab.cli import cmd_lab

            return cmd_lab(args)
        if args.command == "hls":
            from stack.video.cli import cmd_hls

            return cmd_hls(args)
        return cmd_stats(args)
    except (UsageError, LinkError, ConfigError, LabError) as exc:
        print(f"tapstack: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `tapstack stats | head`: the reader left, nothing to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
