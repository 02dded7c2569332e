"""The asyncio-shaped surface of the stack (docs/architecture.md, rule 2).

    stack = Stack(runtime)
    server = await stack.create_server(protocol_factory, port=7)
    transport, protocol = await stack.create_connection(protocol_factory, "10.77.0.1", 5000)
    reader, writer = await stack.open_connection("10.77.0.1", 5000)
    server = await stack.start_server(client_connected_cb, port=8000)

The transports honour asyncio's contract, so the same Protocol runs here or on kernel
sockets. Apps never import this module: they only see asyncio objects.
"""

from __future__ import annotations

import asyncio
import collections
import ipaddress
import socket
import ssl as _ssl
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from stack.net.tcp.connection import CLOSED, TIME_WAIT, Connection
from stack.net.tcp.info import fin_acked, tcp_info, unsent_bytes
from stack.tls import TlsProtocol, client_hostname, start_tls
from stack.wire.ipv4 import ip_to_str

if TYPE_CHECKING:
    from stack.names import Names
    from stack.runtime import Runtime

DEFAULT_HIGH_WATER = 64 * 1024
DEFAULT_LOW_WATER = 16 * 1024


def _ip(host: str) -> bytes:
    try:
        return ipaddress.IPv4Address(host).packed
    except ValueError:
        raise OSError(f"{host!r} is not an IPv4 address (tapstack does not resolve names)"
                      ) from None


class TcpTransport(asyncio.Transport):
    """An asyncio Transport over one tapstack TCP connection (its ConnectionUser)."""

    __slots__ = ("_closing", "_conn", "_high", "_lost", "_low", "_made", "_paused_writing",
                 "_peername", "_protocol", "_sockname", "_stack", "_waiter")

    def __init__(self, stack: Stack, conn: Connection, protocol: asyncio.BaseProtocol,
                 waiter: asyncio.Future | None = None) -> None:
        super().__init__()
        self._stack = stack
        self._conn = conn
        self._protocol = protocol
        self._waiter = waiter
        self._closing = False
        self._lost = False
        self._made = False
        self._paused_writing = False
        self._high = DEFAULT_HIGH_WATER
        self._low = DEFAULT_LOW_WATER
        self._peername = (ip_to_str(conn.remote_ip), conn.remote_port)
        self._sockname = (ip_to_str(conn.local_ip), conn.local_port)
        conn.user = self

    # -- ConnectionUser: called by the engine ---------------------------------------------

    def _call(self, method: Callable, *args: Any) -> Any:
        try:
            return method(*args)
        except Exception as exc:  # the application's bug: report it, drop the connection
            self._stack.loop.call_exception_handler({
                "message": f"exception in {type(self._protocol).__name__}.{method.__name__}",
                "exception": exc, "transport": self, "protocol": self._protocol})
            self.abort()
            return None

    def start(self) -> None:
        """connection_made: for accepted connections at once, for ours on establishment."""
        self._made = True
        self._call(self._protocol.connection_made, self)

    def on_established(self) -> None:
        self.start()
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def on_data(self, data: bytes) -> None:
        if not self._closing and not self._lost:
            self._call(self._protocol.data_received, data)

    def on_eof(self) -> None:
        if self._closing or self._lost:
            return
        keep_open = self._call(self._protocol.eof_received)
        if not keep_open and not self._lost:
            self.close()

    def on_acked(self) -> None:
        if self._paused_writing and self.get_write_buffer_size() <= self._low:
            self._paused_writing = False
            self._call(self._protocol.resume_writing)
        if self._closing and self._conn.state not in (CLOSED,) and fin_acked(self._conn):
            self._connection_lost(None)  # like a kernel socket: closed once our FIN is acked

    def on_closed(self, exc: Exception | None) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(exc or ConnectionResetError("connection closed"))
            return
        self._connection_lost(exc)

    def _connection_lost(self, exc: Exception | None) -> None:
        if self._lost:
            return
        self._lost = True
        self._closing = True
        if self._made:
            self._stack.loop.call_soon(self._call_connection_lost, exc)

    def _call_connection_lost(self, exc: Exception | None) -> None:
        try:
            self._protocol.connection_lost(exc)
        finally:
            self._protocol = None  # as asyncio's transports do: no cycles left behind

    # -- asyncio.Transport ----------------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"data must be bytes-like, not {type(data).__name__}")
        if self._closing:
            return  # asyncio ignores writes after close(); so do we
        if not data:
            return
        self._conn.send(data)
        self._stack.kick()
        self._maybe_pause()

    def writelines(self, list_of_data) -> None:
        self.write(b"".join(list_of_data))

    def write_eof(self) -> None:
        if self._closing:
            return
        self._conn.shutdown()
        self._stack.kick()

    def can_write_eof(self) -> bool:
        return True

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        conn = self._conn
        if conn.state in (CLOSED, TIME_WAIT):
            self._connection_lost(None)
            return
        conn.close()
        self._stack.kick()
        if conn.state == CLOSED:
            self._connection_lost(None)

    def abort(self) -> None:
        self._closing = True
        if self._conn.state != CLOSED:
            self._conn.abort()
            self._stack.kick()
        self._connection_lost(None)

    def is_closing(self) -> bool:
        return self._closing

    def pause_reading(self) -> None:
        self._conn.pause_reading()

    def resume_reading(self) -> None:
        self._conn.resume_reading()
        self._stack.kick()

    def is_reading(self) -> bool:
        return not self._conn.reading_paused and not self._closing

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None
                                ) -> None:
        if high is None:
            high = DEFAULT_HIGH_WATER if low is None else 4 * low
        if low is None:
            low = high // 4
        if not high >= low >= 0:
            raise ValueError(f"high ({high!r}) must be >= low ({low!r}) must be >= 0")
        self._high, self._low = high, low
        self._maybe_pause()

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._low, self._high

    def get_write_buffer_size(self) -> int:
        """Bytes written and not yet sent (what sits beyond the 'socket buffer')."""
        return unsent_bytes(self._conn)

    def _maybe_pause(self) -> None:
        if not self._paused_writing and self.get_write_buffer_size() > self._high:
            self._paused_writing = True
            self._call(self._protocol.pause_writing)

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._protocol

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "peername":
            return self._peername
        if name == "sockname":
            return self._sockname
        if name == "tcp_info":
            return tcp_info(self._conn)
        if name == "peer_mac":
            mac = self._stack.peer_mac(self._conn.remote_ip)
            return mac
        if name == "stack":
            return self._stack
        if name == "socket":
            return ConnectionSocket(self)
        return default

    def set_keepalive(self, enabled: bool = True) -> None:
        """SO_KEEPALIVE: probe an idle connection (idle/interval/count from TcpConfig)."""
        self._conn.set_keepalive(enabled, self._stack.loop.time())
        self._stack.kick()

    def set_nodelay(self, enabled: bool = True) -> None:
        """TCP_NODELAY: turn Nagle's algorithm off for this connection."""
        self._conn.nodelay = enabled
        self._stack.kick()

    def set_congestion_control(self, name: str) -> None:
        """TCP_CONGESTION: "cubic", "newreno" or "bbr" for this connection from now on
        (the window it has is kept). ValueError for another name."""
        self._conn.set_congestion_control(name)
        self._stack.kick()


class ConnectionSocket:
    """get_extra_info("socket") for a tapstack connection: libraries read its family and
    addresses and set TCP_NODELAY or SO_KEEPALIVE on it; there is no descriptor
    (fileno() is -1), so anything needing a kernel socket fails."""

    family = socket.AF_INET
    type = socket.SOCK_STREAM
    proto = socket.IPPROTO_TCP

    def __init__(self, transport: TcpTransport) -> None:
        self._transport = transport

    def getsockname(self) -> tuple[str, int]:
        return self._transport._sockname

    def getpeername(self) -> tuple[str, int]:
        return self._transport._peername

    def fileno(self) -> int:
        return -1

    def setsockopt(self, level: int, option: int, value: Any) -> None:
        if (level, option) == (socket.IPPROTO_TCP, socket.TCP_NODELAY):
            self._transport.set_nodelay(bool(value))
        elif (level, option) == (socket.SOL_SOCKET, socket.SO_KEEPALIVE):
            self._transport.set_keepalive(bool(value))
        else:
            raise OSError(92, f"tapstack does not take socket option {level}/{option}")

    def getsockopt(self, level: int, option: int, *args: Any) -> int:
        if (level, option) == (socket.IPPROTO_TCP, socket.TCP_NODELAY):
            return int(self._transport._conn.nodelay)
        raise OSError(92, f"tapstack does not have socket option {level}/{option}")

    def __repr__(self) -> str:
        return f"<tapstack connection {self.getsockname()} -> {self.getpeername()}>"


class UdpTransport(asyncio.DatagramTransport):
    """An asyncio DatagramTransport over a tapstack UDP endpoint (its DatagramUser)."""

    def __init__(self, stack: Stack, protocol: asyncio.DatagramProtocol, local_port: int,
                 remote: tuple[str, int] | None, local_ip: bytes | None = None) -> None:
        super().__init__()
        self._stack = stack
        self._protocol = protocol
        self._closing = False
        node = stack.runtime.node
        self._remote = remote
        self._endpoint = node.udp.bind(local_port, self,
                                       (_ip(remote[0]), remote[1]) if remote else None,
                                       local_ip)
        shown = local_ip or (node.ipv4.source_for(_ip(remote[0])) if remote else None)
        self._sockname = (ip_to_str(shown) if shown else "0.0.0.0", self._endpoint.port)

    # DatagramUser
    def on_datagram(self, data: bytes, addr: tuple[str, int]) -> None:
        if not self._closing:
            self._call(self._protocol.datagram_received, data, addr)

    def on_error(self, exc: Exception) -> None:
        if not self._closing:
            self._call(self._protocol.error_received, exc)

    def _call(self, method: Callable, *args: Any) -> None:
        """The application's bug is the application's: reported to the loop's exception
        handler, as asyncio does, and counted; never a stack internal error."""
        try:
            method(*args)
        except Exception as exc:
            self._stack.runtime.node.counters["udp.app_errors"] += 1
            self._stack.loop.call_exception_handler({
                "message": f"exception in {type(self._protocol).__name__}.{method.__name__}",
                "exception": exc, "transport": self, "protocol": self._protocol})

    # asyncio.DatagramTransport
    def sendto(self, data: bytes | bytearray | memoryview,
               addr: tuple[str, int] | None = None) -> None:
        if self._closing:
            return
        if addr is None:
            if self._remote is None:
                raise ValueError("an address is required on an unconnected endpoint")
            addr = self._remote
        elif self._remote is not None and tuple(addr) != self._remote:
            raise ValueError(f"invalid address: must be None or {self._remote}")
        try:
            self._stack.runtime.node.udp.sendto(self._endpoint, bytes(data), _ip(addr[0]),
                                                addr[1], self._stack.loop.time())
        except OSError as exc:
            self._protocol.error_received(exc)  # as asyncio reports send errors
            return
        self._stack.kick()

    def abort(self) -> None:
        self.close()

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        self._stack.runtime.node.udp.unbind(self._endpoint)
        self._stack.loop.call_soon(self._protocol.connection_lost, None)

    def is_closing(self) -> bool:
        return self._closing

    def get_write_buffer_size(self) -> int:
        return 0

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "sockname":
            return self._sockname
        if name == "peername":
            return self._remote if self._remote is not None else default
        return default

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._protocol

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol


class ListenerSocket:
    """A listener's stand-in for a socket: family, type and getsockname, no descriptor."""

    family = 2  # AF_INET
    type = 1  # SOCK_STREAM
    proto = 6

    def __init__(self, ip: str, port: int) -> None:
        self._name = (ip, port)

    def getsockname(self) -> tuple[str, int]:
        return self._name

    def fileno(self) -> int:
        return -1

    def __repr__(self) -> str:
        return f"<tapstack listener {self._name[0]}:{self._name[1]}>"


class Server(asyncio.AbstractServer):
    def __init__(self, stack: Stack, port: int, address: bytes | None = None) -> None:
        self._stack = stack
        self.port = port
        self.address = address
        self._serving = True
        self._closed = asyncio.Event()

    def close(self) -> None:
        if self._serving:
            self._serving = False
            self._stack.runtime.node.tcp.unlisten(self.port, self.address)
            self._closed.set()

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self._stack.loop

    def is_serving(self) -> bool:
        return self._serving

    async def start_serving(self) -> None:
        return None

    async def serve_forever(self) -> None:
        await self._closed.wait()

    async def wait_closed(self) -> None:
        await self._closed.wait()

    @property
    def sockets(self) -> tuple:
        """What asyncio's servers list: here stand-ins that only tell their address."""
        if not self._serving:
            return ()
        ip = "0.0.0.0" if self.address is None else ip_to_str(self.address)
        return (ListenerSocket(ip, self.port),)

    async def __aenter__(self) -> Server:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()
        await self.wait_closed()


class Stack:
    """The application's handle on a running tapstack."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.names: Names | None = None  # set by open_stack: how names become addresses
        self.terminated = False  # open_stack: SIGTERM came
        self.tls_counters: collections.Counter = collections.Counter()  # servers' TLS

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self.runtime.loop

    def kick(self) -> None:
        self.runtime.kick()

    def peer_mac(self, ip: bytes) -> str | None:
        """The MAC of a neighbour, from the cache of whichever interface knows it."""
        mac = self.runtime.node.neighbour_mac(ip)
        return None if mac is None else ":".join(f"{b:02x}" for b in mac)

    def _local(self, host: str | None) -> bytes | None:
        """A local address to bind to, None for every address; OSError if not ours."""
        if host in (None, "", "0.0.0.0"):
            return None
        address = _ip(host)
        if address not in self.runtime.node.ipv4.local:
            raise OSError(99, f"{host} is not an address of this stack")
        return address

    async def create_server(self, protocol_factory: Callable[[], asyncio.BaseProtocol],
                            host: str | None = None, port: int = 0, backlog: int = 128,
                            ssl: _ssl.SSLContext | None = None,
                            ssl_handshake_timeout: float | None = None) -> Server:
        """Listen on `port` of every address of the stack, or of `host` only; with `ssl`,
        each connection reaches the protocol after a TLS handshake (stack/tls.py)."""
        address = self._local(host)
        if ssl is not None and not isinstance(ssl, _ssl.SSLContext):
            raise TypeError("ssl must be an SSLContext for a server")
        if not port:
            port = self._free_port(address)
        if ssl is not None:  # `tapstack stats` shows them as tls.*
            self.runtime.app_counters.setdefault("tls", lambda: dict(self.tls_counters))

        def on_accept(conn: Connection) -> None:
            try:
                protocol = protocol_factory()
            except Exception as exc:
                self.loop.call_exception_handler({"message": "protocol_factory failed",
                                                  "exception": exc})
                conn.abort()
                return
            if ssl is not None:
                protocol = TlsProtocol(protocol, ssl, server_side=True, loop=self.loop,
                                       handshake_timeout=ssl_handshake_timeout,
                                       counters=self.tls_counters)
            TcpTransport(self, conn, protocol).start()

        self.runtime.node.tcp.listen(port, on_accept, backlog, address)
        return Server(self, port, address)

    def _free_port(self, address: bytes | None) -> int:
        """A port nobody listens on, from the ephemeral range (create_server with 0)."""
        tcp = self.runtime.node.tcp
        taken = set(tcp.listeners) | {p for _, p in tcp.bound_listeners}
        rng = self.runtime.node.rng
        for _ in range(1000):
            port = rng.randrange(32768, 61000)
            if port not in taken:
                return port
        raise OSError(98, "no free port to listen on")

    async def create_connection(self, protocol_factory: Callable[[], asyncio.BaseProtocol],
                                host: str, port: int, local_port: int | None = None,
                                nodelay: bool = False, local_ip: str | None = None,
                                ssl: _ssl.SSLContext | bool | None = None,
                                server_hostname: str | None = None,
                                ssl_handshake_timeout: float | None = None
                                ) -> tuple[asyncio.Transport, asyncio.BaseProtocol]:
        """An active open; with `ssl` (a context, or True for the default one), a TLS
        handshake that checks the certificate against `server_hostname` (default: host)."""
        if ssl is True:
            ssl = _ssl.create_default_context()
        if server_hostname is not None and not ssl:
            raise ValueError("server_hostname is only meaningful with ssl")
        waiter = self.loop.create_future()
        conn = self.runtime.node.tcp.connect(_ip(host), port, self.loop.time(), local_port,
                                             local_ip=self._local(local_ip))
        conn.nodelay = nodelay
        protocol = protocol_factory()
        tls = None
        if ssl:
            tls = TlsProtocol(protocol, ssl, server_side=False,
                              server_hostname=client_hostname(host, server_hostname),
                              waiter=self.loop.create_future(),
                              handshake_timeout=ssl_handshake_timeout, loop=self.loop)
            handshake = tls.waiter
        transport = TcpTransport(self, conn, tls or protocol, waiter)
        self.kick()
        try:
            await waiter  # TCP established; the TLS handshake has started
            if tls is not None:
                await handshake
        except asyncio.CancelledError:
            transport.abort()
            raise
        if tls is not None:
            return tls.transport, protocol
        return transport, protocol

    async def create_datagram_endpoint(
            self, protocol_factory: Callable[[], asyncio.DatagramProtocol],
            local_addr: tuple[str, int] | None = None,
            remote_addr: tuple[str, int] | None = None
    ) -> tuple[UdpTransport, asyncio.DatagramProtocol]:
        port = 0
        local_ip = None
        if local_addr is not None:
            host, port = local_addr
            local_ip = self._local(host)
        if remote_addr is not None:
            _ip(remote_addr[0])
            remote_addr = (remote_addr[0], remote_addr[1])
        protocol = protocol_factory()
        transport = UdpTransport(self, protocol, port, remote_addr, local_ip)
        protocol.connection_made(transport)
        return transport, protocol

    async def start_tls(self, transport: asyncio.Transport, protocol: asyncio.BaseProtocol,
                        sslcontext: _ssl.SSLContext, *, server_side: bool = False,
                        server_hostname: str | None = None,
                        ssl_handshake_timeout: float | None = None) -> asyncio.Transport:
        """loop.start_tls for any transport: the protocol goes on over TLS."""
        return await start_tls(self.loop, transport, protocol, sslcontext,
                               server_side=server_side, server_hostname=server_hostname,
                               handshake_timeout=ssl_handshake_timeout)

    async def open_connection(self, host: str, port: int, limit: int = 2 ** 16, **kw: Any
                              ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader = asyncio.StreamReader(limit=limit, loop=self.loop)
        protocol = asyncio.StreamReaderProtocol(reader, loop=self.loop)
        transport, _ = await self.create_connection(lambda: protocol, host, port, **kw)
        writer = asyncio.StreamWriter(transport, protocol, reader, self.loop)
        return reader, writer

    async def start_server(self, client_connected_cb: Callable, host: str | None = None,
                           port: int = 0, limit: int = 2 ** 16, backlog: int = 128) -> Server:
        def factory() -> asyncio.StreamReaderProtocol:
            reader = asyncio.StreamReader(limit=limit, loop=self.loop)
            return asyncio.StreamReaderProtocol(reader, client_connected_cb, loop=self.loop)

        return await self.create_server(factory, host, port, backlog)
