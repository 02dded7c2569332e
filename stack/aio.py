"""Programs on tapstack: start a stack from Python, and an event loop whose network calls
go through it, so that asyncio programs (uvicorn, aiohttp, httpx, websockets) run on
tapstack unchanged.

    import stack

    async def main() -> None:
        server = await asyncio.start_server(handle, port=8000)   # on tapstack's TCP
        reader, writer = await asyncio.open_connection("10.77.0.1", 8080)

    stack.run(main(), netns="demo", address="10.77.0.2/24")

`run` makes a `TapstackLoop` (uvloop underneath), opens the stack with `open_stack`, and
runs `main` while it is open. `open_stack` alone works on any loop and gives a `Stack`
with create_server, create_connection, ... of its own.

What the loop routes where:
  - create_connection, create_server, create_datagram_endpoint, open_connection,
    start_server, getaddrinfo, start_tls: through tapstack, unless the address is
    loopback (127.0.0.0/8, "localhost") or a unix socket, which stay with the kernel;
  - names: the `hosts` given, the namespace's hosts file, then DNS over tapstack's UDP
    to the namespace's name server (or `nameserver=`);
  - calls that need a kernel socket (sock_connect, sock_recv, ..., sock= arguments)
    raise a RuntimeError naming the call, since tapstack's connections have none;
  - everything else (timers, subprocesses, files, signals) is uvloop's.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import signal
import socket
import ssl as _ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import uvloop

from stack.api import Server, Stack, TcpTransport
from stack.launch import build_config, build_runtime, host_spec, stack_environment
from stack.names import Names
from stack.tls import TlsTransport, start_tls

T = TypeVar("T")
_LOOPBACK = ipaddress.IPv4Network("127.0.0.0/8")


@contextlib.asynccontextmanager
async def open_stack(*, netns: str | None = "tapstack", tap: str = "tap0",
                     address: str = "10.77.0.2/24", host_address: str | None = "10.77.0.1/24",
                     gateway: str | None = None, mac: str = "02:00:0a:4d:00:02",
                     mtu: int = 1500, pcap: str | None = None, impair: str | None = None,
                     offload: bool | str = False, msl: float = 30.0, cc: str = "cubic",
                     hosts: dict[str, str] | None = None, nameserver: str | None = None
                     ) -> AsyncIterator[Stack]:
    """A tapstack on a TAP, as `tapstack run` would start it (same defaults, same
    one-sentence errors as `stack.launch.UsageError`), open until the block ends.

    netns=None puts the TAP in the current namespace (`--no-netns`); host_address=None
    leaves the kernel's side unconfigured. While the block runs, the process is in the
    stack's namespace, and `tapstack stats --netns NS` reads its counters. If the
    running loop is a TapstackLoop, its network calls go through this stack."""
    args = argparse.Namespace(netns=netns or "tapstack", no_netns=netns is None, tap=tap,
                              address=address, host_address=host_address or "none",
                              gateway=gateway, mac=mac, mtu=mtu, impair=impair,
                              offload=offload, msl=msl, cc=cc)
    config, host_cidr = build_config(args)
    spec = host_spec(args, config, host_cidr)
    loop = asyncio.get_running_loop()
    with stack_environment(spec, "open_stack", pcap) as (links, control, pcap_tee):
        runtime = build_runtime(spec, links, pcap_tee, impair)
        control_server = await asyncio.start_unix_server(runtime._serve_control,
                                                         sock=control)
        runtime.attach()
        stack = Stack(runtime)
        stack.names = Names(stack, spec.netns, hosts, nameserver)
        routing = isinstance(loop, _OverTapstack)
        if routing:
            loop.use_stack(stack)
        task = asyncio.current_task()

        def terminate() -> None:
            stack.terminated = True
            task.cancel()

        stack.terminated = False
        loop.add_signal_handler(signal.SIGTERM, terminate)
        try:
            yield stack
        finally:
            loop.remove_signal_handler(signal.SIGTERM)
            if routing:
                loop.use_stack(None)
            runtime.detach()
            control_server.close()


def run(main: Coroutine[Any, Any, T] | Callable[[Stack], Awaitable[T]], *,
        debug: bool | None = None, **options: Any) -> T:
    """Run `main` (a coroutine, or a function of the Stack) on a new TapstackLoop with a
    stack opened by open_stack(**options); the stack is taken down afterwards. SIGTERM
    cancels `main` and makes run() return None."""
    async def wrapper() -> T | None:
        stack = None
        try:
            async with open_stack(**options) as stack:
                return await (main(stack) if callable(main) else main)
        except asyncio.CancelledError:
            if stack is not None and stack.terminated:
                return None
            raise
        finally:
            if stack is None and not callable(main):
                main.close()  # the stack never opened: main never ran

    with asyncio.Runner(loop_factory=new_event_loop, debug=debug) as runner:
        return runner.run(wrapper())


def _is_loopback(host: Any) -> bool:
    if host in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.IPv4Address(host) in _LOOPBACK
    except (ValueError, TypeError):
        return False


def _any_address(host: Any) -> bool:
    return host in (None, "", "0.0.0.0", "::")


def _kernel_only(call: str) -> RuntimeError:
    return RuntimeError(f"loop.{call} needs a kernel socket, and connections over tapstack "
                        "have none; use create_connection/open_connection (or "
                        "create_server/start_server) with a host and port instead")


class _OverTapstack:
    """The routing, mixed into an event loop class (uvloop's or asyncio's)."""

    _tapstack: Stack | None = None

    def use_stack(self, stack: Stack | None) -> None:
        """Route this loop's network calls through `stack` (None: back to the kernel)."""
        self._tapstack = stack

    @property
    def tapstack(self) -> Stack | None:
        return self._tapstack

    def _stack_for(self, host: Any, sock: socket.socket | None, call: str) -> Stack | None:
        """The stack to use, or None for the kernel."""
        stack = self._tapstack
        if stack is None:
            return None
        if sock is not None:
            if sock.family == socket.AF_UNIX or _socket_on_loopback(sock):
                return None
            raise _kernel_only(f"{call}(sock=...)")
        if _is_loopback(host):
            return None
        return stack

    # -- names ----------------------------------------------------------------------------

    async def getaddrinfo(self, host: Any, port: Any, *, family: int = 0, type: int = 0,
                          proto: int = 0, flags: int = 0) -> list[tuple]:
        stack = self._tapstack
        if stack is None or _is_loopback(host):
            return await super().getaddrinfo(host, port, family=family, type=type,
                                             proto=proto, flags=flags)
        if family not in (0, socket.AF_INET, socket.AF_UNSPEC):
            raise socket.gaierror(socket.EAI_FAMILY, "tapstack speaks IPv4 only")
        if isinstance(host, bytes):
            host = host.decode("idna")
        if host is None:
            addresses = ["0.0.0.0" if flags & socket.AI_PASSIVE else "127.0.0.1"]
        else:
            addresses = await self._addresses(stack, host)
        number = _port_number(port, type)
        kinds = [type] if type else [socket.SOCK_STREAM, socket.SOCK_DGRAM]
        protos = {socket.SOCK_STREAM: socket.IPPROTO_TCP, socket.SOCK_DGRAM: socket.IPPROTO_UDP}
        return [(socket.AF_INET, kind, proto or protos.get(kind, 0), "", (address, number))
                for address in addresses for kind in kinds]

    async def _addresses(self, stack: Stack, host: str) -> list[str]:
        try:
            return await stack.names.addresses(host)
        except OSError as exc:
            raise socket.gaierror(socket.EAI_NONAME, str(exc)) from None

    # -- TCP ------------------------------------------------------------------------------

    async def create_connection(self, protocol_factory: Callable[[], asyncio.BaseProtocol],
                                host: str | None = None, port: int | None = None,
                                **kw: Any) -> tuple[asyncio.Transport, asyncio.BaseProtocol]:
        stack = self._stack_for(host, kw.get("sock"), "create_connection")
        if stack is None:
            return await super().create_connection(protocol_factory, host, port, **kw)
        if host is None or port is None:
            raise ValueError("host and port are needed (tapstack has no sock= to take)")
        ssl = kw.get("ssl")
        server_hostname = kw.get("server_hostname")
        if ssl and server_hostname is None:
            server_hostname = host
        local_ip, local_port = None, None
        if kw.get("local_addr"):
            local_ip, local_port = kw["local_addr"]
            local_port = local_port or None
        errors: list[OSError] = []
        for address in await self._addresses(stack, host):
            try:
                return await stack.create_connection(
                    protocol_factory, address, int(port), local_port=local_port,
                    local_ip=local_ip, ssl=ssl, server_hostname=server_hostname,
                    ssl_handshake_timeout=kw.get("ssl_handshake_timeout"))
            except OSError as exc:
                errors.append(exc)
        if len(errors) == 1:
            raise errors[0]
        raise OSError(f"multiple errors connecting to {host}:{port}: "
                      + "; ".join(map(str, errors)))

    async def create_server(self, protocol_factory: Callable[[], asyncio.BaseProtocol],
                            host: Any = None, port: int | None = None, **kw: Any) -> Any:
        hosts = host if isinstance(host, (list, tuple)) else [host]
        stack = self._stack_for(hosts[0], kw.get("sock"), "create_server")
        if stack is None or any(_is_loopback(h) for h in hosts):
            return await super().create_server(protocol_factory, host, port, **kw)
        addresses: list[str | None] = []
        for h in hosts:
            if _any_address(h):
                addresses = [None]
                break
            addresses.extend(await self._addresses(stack, h))
        servers = []
        try:
            for address in dict.fromkeys(addresses):
                server = await stack.create_server(
                    protocol_factory, address, port or 0, backlog=kw.get("backlog", 100),
                    ssl=kw.get("ssl"), ssl_handshake_timeout=kw.get("ssl_handshake_timeout"))
                port = server.port  # a port picked for 0 is the same on every address
                servers.append(server)
        except BaseException:
            for server in servers:
                server.close()
            raise
        return servers[0] if len(servers) == 1 else _Servers(self, servers)

    async def start_tls(self, transport: asyncio.BaseTransport,
                        protocol: asyncio.BaseProtocol, sslcontext: _ssl.SSLContext, *,
                        server_side: bool = False, server_hostname: str | None = None,
                        ssl_handshake_timeout: float | None = None,
                        ssl_shutdown_timeout: float | None = None) -> asyncio.Transport:
        if not isinstance(transport, (TcpTransport, TlsTransport)):
            return await super().start_tls(transport, protocol, sslcontext,
                                           server_side=server_side,
                                           server_hostname=server_hostname,
                                           ssl_handshake_timeout=ssl_handshake_timeout,
                                           ssl_shutdown_timeout=ssl_shutdown_timeout)
        return await start_tls(self, transport, protocol, sslcontext,
                               server_side=server_side, server_hostname=server_hostname,
                               handshake_timeout=ssl_handshake_timeout)

    # -- UDP ------------------------------------------------------------------------------

    async def create_datagram_endpoint(self, protocol_factory: Callable[[], Any],
                                       local_addr: tuple | None = None,
                                       remote_addr: tuple | None = None, **kw: Any) -> Any:
        probe = (remote_addr or local_addr or (None,))[0]
        unix = kw.get("family") == socket.AF_UNIX or (isinstance(probe, str) and "/" in probe)
        stack = None if unix else self._stack_for(probe, kw.get("sock"),
                                                  "create_datagram_endpoint")
        if stack is None or (local_addr and _is_loopback(local_addr[0])):
            return await super().create_datagram_endpoint(
                protocol_factory, local_addr=local_addr, remote_addr=remote_addr, **kw)
        if remote_addr is not None:
            address = (await self._addresses(stack, remote_addr[0]))[0]
            remote_addr = (address, remote_addr[1])
        if local_addr is not None and _any_address(local_addr[0]):
            local_addr = ("", local_addr[1])
        return await stack.create_datagram_endpoint(protocol_factory, local_addr=local_addr,
                                                    remote_addr=remote_addr)

    # -- calls that need a kernel socket -------------------------------------------------

    def _check_socket(self, call: str, sock: socket.socket, address: Any = None) -> None:
        if self._tapstack is None or sock.family == socket.AF_UNIX:
            return
        if address is not None and _is_loopback(address[0]):
            return
        if address is None and _socket_on_loopback(sock):
            return
        raise _kernel_only(call)

    async def sock_connect(self, sock: socket.socket, address: Any) -> None:
        self._check_socket("sock_connect()", sock, address)
        return await super().sock_connect(sock, address)

    async def sock_accept(self, sock: socket.socket) -> Any:
        self._check_socket("sock_accept()", sock)
        return await super().sock_accept(sock)

    async def sock_recv(self, sock: socket.socket, n: int) -> bytes:
        self._check_socket("sock_recv()", sock)
        return await super().sock_recv(sock, n)

    async def sock_recv_into(self, sock: socket.socket, buf: Any) -> int:
        self._check_socket("sock_recv_into()", sock)
        return await super().sock_recv_into(sock, buf)

    async def sock_sendall(self, sock: socket.socket, data: Any) -> None:
        self._check_socket("sock_sendall()", sock)
        return await super().sock_sendall(sock, data)

    async def sock_sendto(self, sock: socket.socket, data: Any, address: Any) -> int:
        self._check_socket("sock_sendto()", sock, address)
        return await super().sock_sendto(sock, data, address)

    async def sock_recvfrom(self, sock: socket.socket, bufsize: int) -> Any:
        self._check_socket("sock_recvfrom()", sock)
        return await super().sock_recvfrom(sock, bufsize)

    async def connect_accepted_socket(self, protocol_factory: Callable, sock: socket.socket,
                                      **kw: Any) -> Any:
        self._check_socket("connect_accepted_socket()", sock)
        return await super().connect_accepted_socket(protocol_factory, sock, **kw)


def _socket_on_loopback(sock: socket.socket) -> bool:
    try:
        name = sock.getsockname()
    except OSError:
        return False
    return isinstance(name, tuple) and _is_loopback(name[0])


def _port_number(port: Any, kind: int) -> int:
    if port is None:
        return 0
    if isinstance(port, bytes):
        port = port.decode()
    if isinstance(port, str) and not port.isdigit():
        try:
            return socket.getservbyname(port, "udp" if kind == socket.SOCK_DGRAM else "tcp")
        except OSError:
            raise socket.gaierror(socket.EAI_SERVICE, f"unknown service {port!r}") from None
    return int(port)


class _Servers(asyncio.AbstractServer):
    """Listeners on several addresses, closed together (create_server with a host list)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, servers: list[Server]) -> None:
        self._loop = loop
        self._servers = servers

    def close(self) -> None:
        for server in self._servers:
            server.close()

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def is_serving(self) -> bool:
        return any(s.is_serving() for s in self._servers)

    async def start_serving(self) -> None:
        return None

    async def serve_forever(self) -> None:
        await asyncio.gather(*(s.serve_forever() for s in self._servers))

    async def wait_closed(self) -> None:
        await asyncio.gather(*(s.wait_closed() for s in self._servers))

    @property
    def sockets(self) -> tuple:
        return tuple(sock for s in self._servers for sock in s.sockets)

    async def __aenter__(self) -> _Servers:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()
        await self.wait_closed()


class TapstackLoop(_OverTapstack, uvloop.Loop):
    """uvloop, with its network calls routed through a tapstack (see use_stack)."""


class TapstackAsyncioLoop(_OverTapstack, asyncio.SelectorEventLoop):
    """The same routing over the standard library's loop."""


def new_event_loop(use_uvloop: bool = True) -> asyncio.AbstractEventLoop:
    return TapstackLoop() if use_uvloop else TapstackAsyncioLoop()


class EventLoopPolicy(asyncio.DefaultEventLoopPolicy):
    """For programs that take a policy: asyncio.set_event_loop_policy(EventLoopPolicy())."""

    def new_event_loop(self) -> asyncio.AbstractEventLoop:
        return new_event_loop()
