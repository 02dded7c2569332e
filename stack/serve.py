"""What a node serves and how it finds names: the built-in services (echo, discard,
source), HTTP (the built-in site, static files or an ASGI app), DNS (zones or a
resolver), and the stub lookup `tapstack connect` uses. The CLI parses; this sets up."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import inspect
import ipaddress
import os
import ssl
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import dns.exception
import dns.name
import dns.rcode
import dns.rdatatype

from stack.api import Stack
from stack.apps.dns.cache import Cache
from stack.apps.dns.resolver import (
    Resolver,
    ResolverServer,
    ResolverTcpProtocol,
    ResolverUdpProtocol,
    load_hints,
)
from stack.apps.dns.server import DnsServer, DnsTcpProtocol, DnsUdpProtocol
from stack.apps.dns.zone import ZoneError, Zones, load_zone
from stack.apps.http.lifespan import Lifespan, LifespanFailed
from stack.apps.http.server import HttpServerProtocol
from stack.apps.http.site import Site
from stack.apps.services import (
    DiscardProtocol,
    EchoProtocol,
    SourceProtocol,
    UdpEchoProtocol,
)
from stack.apps.stream import Streams, StreamTcpProtocol, StreamUdpProtocol
from stack.config import NodeSpec
from stack.launch import UsageError
from stack.names import Names
from stack.runtime import Runtime
from stack.wire.ipv4 import ip_to_str

SERVICES = {7: EchoProtocol, 9: DiscardProtocol, 19: SourceProtocol}


def zone_names(paths: list[str]) -> list[str]:
    """The zones the files name, for the banner's dig lines."""
    names = []
    for path in paths:
        try:
            names.append(str(load_zone(path).origin))
        except ZoneError:
            continue
    return names


def load_app(args: argparse.Namespace, stats: Callable[[], dict] | None) -> Any:
    """The ASGI app to serve: --app module:attr (imported from --app-dir), or the
    built-in site. UsageError unless it is an ASGI 3 application."""
    if args.root and not os.path.isdir(args.root):
        raise UsageError(f"--root {args.root} is not a directory")
    if not args.app:
        return Site(stats=stats, root=args.root)
    module_name, _, attr = args.app.partition(":")
    if not module_name or not attr:
        raise UsageError(f"--app {args.app!r} must look like module:attribute")
    app_dir = os.path.abspath(args.app_dir)
    if not os.path.isdir(app_dir):
        raise UsageError(f"--app-dir {args.app_dir} is not a directory")
    sys.path.insert(0, app_dir)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UsageError(f"--app {args.app}: cannot import {module_name} from {app_dir} "
                         f"({exc})") from None
    except Exception as exc:
        raise UsageError(f"--app {args.app}: importing {module_name} failed: "
                         f"{type(exc).__name__}: {exc}") from None
    app = module
    for part in attr.split("."):
        if not hasattr(app, part):
            raise UsageError(f"--app {args.app}: {module_name} has no attribute {attr}")
        app = getattr(app, part)
    check_asgi(app, args.app)
    return app


def check_asgi(app: Any, name: str) -> None:
    """An ASGI 3 application is an awaitable callable of (scope, receive, send)."""
    if not callable(app):
        raise UsageError(f"--app {name} is a {type(app).__name__}, not an ASGI application")
    call = app if inspect.isfunction(app) or inspect.ismethod(app) else \
        getattr(app, "__call__", None)  # noqa: B004 (the method itself is inspected)
    if inspect.isclass(app) or not inspect.iscoroutinefunction(call):
        raise UsageError(f"--app {name} is not an ASGI 3 application: it must be an async "
                         "function (or an object with async __call__) of scope, receive, "
                         "send")
    try:
        inspect.signature(call).bind(None, None, None)
    except TypeError:
        raise UsageError(f"--app {name} does not take (scope, receive, send)") from None


def load_dns(paths: list[str]) -> DnsServer | None:
    """The authoritative server for these zone files; UsageError when one is bad."""
    if not paths:
        return None
    try:
        return DnsServer(Zones([load_zone(path) for path in paths]))
    except ZoneError as exc:
        raise UsageError(f"--dns-zone {exc}") from None


def resolver_options(args: argparse.Namespace, spec: NodeSpec
                     ) -> tuple[list, list[str]] | None:
    """(root hints, forwarders) when this node resolves; UsageError when that is wrong."""
    conf = spec.resolver or {}
    if not (args.resolver or conf):
        if args.root_hints or args.forward:
            raise UsageError("--root-hints and --forward need --resolver")
        return None
    if args.dns_zone or spec.dns_zones:
        raise UsageError("a node serves zones or resolves, not both on port 53")
    hints_file = args.root_hints or conf.get("root_hints")
    forward = args.forward or list(conf.get("forward", []))
    if bool(hints_file) == bool(forward):
        raise UsageError("--resolver needs --root-hints FILE or --forward ADDR (one of them)")
    for addr in forward:
        try:
            ipaddress.IPv4Address(addr)
        except ValueError:
            raise UsageError(f"--forward {addr!r} is not an IPv4 address") from None
    hints = []
    if hints_file:
        try:
            hints = load_hints(hints_file)
        except (OSError, ValueError, dns.exception.DNSException) as exc:
            raise UsageError(f"--root-hints {hints_file}: {exc}") from None
    return hints, forward


def tls_ca_path(args: argparse.Namespace) -> str:
    """What `curl --cacert` needs for this run's certificate."""
    if args.tls_cert:
        return args.tls_cert
    from stack.certs import LabCA

    return LabCA().cert_path


def tls_context(args: argparse.Namespace, spec: NodeSpec) -> ssl.SSLContext | None:
    """The HTTPS server's context (--tls): one lab certificate for the node's addresses
    (served without SNI), one more per --tls-name (SNI picks it), or the user's own
    --tls-cert/--tls-key."""
    if not getattr(args, "tls", False):
        if args.tls_cert or args.tls_key or args.tls_name:
            raise UsageError("--tls-cert, --tls-key and --tls-name need --tls")
        return None
    from stack.certs import LabCA, ServerCert, server_context

    if not 0 < args.tls_port < 65536:
        raise UsageError(f"--tls-port {args.tls_port} is not a port number (1..65535)")
    if not args.no_http and args.tls_port == args.http_port:
        raise UsageError(f"--tls-port {args.tls_port} is also the HTTP port")
    if bool(args.tls_cert) != bool(args.tls_key):
        raise UsageError("--tls-cert and --tls-key go together")
    if args.tls_cert:
        certs = [ServerCert(args.tls_cert, args.tls_key, [])]
    else:
        addresses = [ip_to_str(a) for iface in spec.node.interfaces
                     for a, _ in iface.addresses]
        try:
            ca = LabCA()
            certs = [ServerCert(*ca.issue(addresses), [])]  # no SNI, or an address
            for name in args.tls_name:
                certs.append(ServerCert(*ca.issue([name]), [name]))
        except OSError as exc:
            raise UsageError(f"--tls: cannot keep the lab CA: {exc}") from None
        except ValueError as exc:
            raise UsageError(f"--tls-name: {exc}") from None
    try:
        return server_context(certs)
    except ValueError as exc:
        raise UsageError(f"--tls-cert: {exc}") from None


def start_services(args: argparse.Namespace, app: Any, dns_server: DnsServer | None = None,
                   resolving: tuple[list, list[str]] | None = None,
                   tls: ssl.SSLContext | None = None
                   ) -> Callable[[Runtime], Awaitable[Callable[[], Awaitable[None]] | None]]:
    """What `tapstack run` starts on the stack once it is up; the function it returns
    (if any) runs before the stack goes down."""
    async def setup(runtime: Runtime) -> Callable[[], Awaitable[None]] | None:
        stack = Stack(runtime)
        stack.names = Names(stack, runtime.info.get("netns"))
        loop = asyncio.get_running_loop()
        if hasattr(loop, "use_stack"):  # the app's own asyncio calls go through tapstack
            loop.use_stack(stack)
        if resolving is not None:
            hints, forward = resolving
            service = ResolverServer(Resolver(stack, runtime.loop.time, Cache(),
                                              root_hints=hints, forward=forward))
            await stack.create_datagram_endpoint(lambda: ResolverUdpProtocol(service),
                                                 local_addr=("", 53))
            await stack.create_server(lambda: ResolverTcpProtocol(service), port=53)
            runtime.app_counters["resolver"] = service.counters_all
            cache = service.resolver.cache
            runtime.app_commands["dns-cache"] = lambda request: {
                "entries": cache.listing(runtime.loop.time())}
            runtime.app_commands["dns-flush"] = lambda request: {
                "done": f"flushed {cache.flush()} cache entries"}
        if dns_server is not None:
            await stack.create_datagram_endpoint(lambda: DnsUdpProtocol(dns_server),
                                                 local_addr=("", 53))
            await stack.create_server(lambda: DnsTcpProtocol(dns_server), port=53)
            runtime.app_counters["dns"] = lambda: dict(dns_server.counters)
        if not args.no_services:
            counted = {"discard_bytes": 0}  # what the discard service was given
            runtime.app_counters["services"] = lambda: dict(counted)
            for port, protocol in SERVICES.items():
                factory = (lambda: DiscardProtocol(counted)) if protocol is DiscardProtocol \
                    else protocol
                await stack.create_server(factory, port=port)
            await stack.create_datagram_endpoint(UdpEchoProtocol, local_addr=("", 7))
        if getattr(args, "stream", None):
            streams = Streams()
            runtime.app_counters["stream"] = lambda: dict(streams.counters)
            await stack.create_datagram_endpoint(lambda: StreamUdpProtocol(streams),
                                                 local_addr=("", args.stream))
            await stack.create_server(lambda: StreamTcpProtocol(streams), port=args.stream)
        if args.no_http and tls is None:
            return None
        if getattr(args, "server", "builtin") == "uvicorn":
            return await start_uvicorn(args, app, runtime)
        return await start_http(args, app, stack, tls)

    return setup


async def start_http(args: argparse.Namespace, app: Any, stack: Stack,
                     tls: ssl.SSLContext | None) -> Callable[[], Awaitable[None]]:
    """The built-in server: the app's lifespan startup first, then HTTP and HTTPS;
    returns what to run at the end (the lifespan shutdown)."""
    lifespan = Lifespan(app)
    try:
        await lifespan.startup()
    except LifespanFailed as exc:
        raise UsageError(f"the application's startup failed: {exc}") from None
    state = lifespan.state if lifespan.supported else None
    access_log = not args.no_access_log
    if not args.no_http:
        await stack.create_server(
            lambda: HttpServerProtocol(app, state=state, access_log=access_log),
            port=args.http_port, backlog=1024)
    if tls is not None:
        await stack.create_server(
            lambda: HttpServerProtocol(app, scheme="https", state=state,
                                       access_log=access_log),
            port=args.tls_port, backlog=1024, ssl=tls)
    return lifespan.shutdown


async def start_uvicorn(args: argparse.Namespace, app: Any, runtime: Runtime
                        ) -> Callable[[], Awaitable[None]]:
    """Unmodified uvicorn serving the app on tapstack's TCP (the TapstackLoop routes
    its create_server here); its lifespan, protocols and logs are uvicorn's own."""
    import uvicorn

    config = uvicorn.Config(app, host="0.0.0.0", port=args.http_port, loop="none",
                            lifespan="auto", access_log=not args.no_access_log,
                            log_config=None, log_level=args.log_level, backlog=1024,
                            timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    task = asyncio.get_running_loop().create_task(server.serve())
    while not server.started:
        if task.done():
            exc = task.exception()
            why = "the application's startup failed" if isinstance(exc, SystemExit) else \
                f"{type(exc).__name__}: {exc}" if exc else "it stopped"
            raise UsageError(f"uvicorn did not start: {why}")
        await asyncio.sleep(0.01)  # uvicorn offers no event for "started"
    task.add_done_callback(lambda _: runtime.stop())  # uvicorn ended (a signal): stop

    async def stop() -> None:
        server.should_exit = True
        await task

    return stop


async def resolve_name(stack: Stack, host: str, nameserver: str | None,
                       netns: str | None) -> str:
    """An address for `host`: itself, the hosts file's, or the first A record a stub
    query over tapstack's own UDP finds. OSError (one sentence) when there is none."""
    return (await Names(stack, netns, nameserver=nameserver).addresses(host))[0]
