"""Which calls the TapstackLoop sends through tapstack and which stay with the kernel.
The stack here is a recorder (no TAP, no root); the kernel side is real loopback."""

from __future__ import annotations

import asyncio
import socket

import pytest

from stack.aio import TapstackAsyncioLoop, TapstackLoop
from stack.names import Names


class RecordingStack:
    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self.names = Names(self, None, hosts={"www.bob.test": "192.0.2.7"})

    async def create_connection(self, factory, host, port, **kw):
        self.calls.append(("create_connection", host, port, kw.get("server_hostname")))
        return "tapstack-transport", factory()

    async def create_server(self, factory, host, port, **kw):
        self.calls.append(("create_server", host, port))

        class _S:
            pass

        server = _S()
        server.port = port
        return server

    async def create_datagram_endpoint(self, factory, local_addr=None, remote_addr=None):
        self.calls.append(("create_datagram_endpoint", local_addr, remote_addr))
        return "tapstack-udp", factory()


@pytest.fixture(params=[TapstackLoop, TapstackAsyncioLoop])
def run(request):
    def runner(coro_fn):
        async def main():
            loop = asyncio.get_running_loop()
            stack = RecordingStack()
            loop.use_stack(stack)
            return await asyncio.wait_for(coro_fn(loop, stack), 10)

        with asyncio.Runner(loop_factory=request.param) as r:
            return r.run(main())
    return runner


def test_routing_table(run):
    async def body(loop, stack):
        await loop.create_connection(asyncio.Protocol, "10.1.2.3", 80)
        await loop.create_connection(asyncio.Protocol, "www.bob.test", 443)
        await loop.create_server(asyncio.Protocol, port=8000)
        await loop.create_server(asyncio.Protocol, "0.0.0.0", 8001)
        await loop.create_datagram_endpoint(asyncio.DatagramProtocol,
                                            remote_addr=("www.bob.test", 53))
        # loopback stays with the kernel: a real server and a real connection
        got = asyncio.Event()

        class Rx(asyncio.Protocol):
            def data_received(self, data):
                got.set()

        server = await loop.create_server(Rx, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        transport, _ = await loop.create_connection(asyncio.Protocol, "127.0.0.1", port)
        transport.write(b"x")
        await got.wait()
        transport.close()
        server.close()
        return stack.calls

    calls = run(body)
    assert calls == [
        ("create_connection", "10.1.2.3", 80, None),
        ("create_connection", "192.0.2.7", 443, None),
        ("create_server", None, 8000),
        ("create_server", None, 8001),
        ("create_datagram_endpoint", None, ("192.0.2.7", 53)),
    ]


def test_ssl_names_the_host_asked_for(run):
    async def body(loop, stack):
        await loop.create_connection(asyncio.Protocol, "www.bob.test", 443, ssl=True)
        return stack.calls

    assert run(body) == [("create_connection", "192.0.2.7", 443, "www.bob.test")]


def test_getaddrinfo_static_names_and_ipv4_only(run):
    async def body(loop, stack):
        infos = await loop.getaddrinfo("www.bob.test", "https", type=socket.SOCK_STREAM)
        both = await loop.getaddrinfo("192.0.2.9", 53)
        with pytest.raises(socket.gaierror):
            await loop.getaddrinfo("www.bob.test", 80, family=socket.AF_INET6)
        return infos, both

    infos, both = run(body)
    assert infos == [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "",
                      ("192.0.2.7", 443))]
    assert {(i[1], i[4]) for i in both} == {(socket.SOCK_STREAM, ("192.0.2.9", 53)),
                                            (socket.SOCK_DGRAM, ("192.0.2.9", 53))}


def test_kernel_socket_calls_fail_naming_the_call(run):
    async def body(loop, stack):
        errors = []
        with socket.socket() as sock:
            sock.setblocking(False)
            for call in (lambda: loop.sock_connect(sock, ("10.1.2.3", 80)),
                         lambda: loop.create_connection(asyncio.Protocol, sock=sock)):
                try:
                    await call()
                except RuntimeError as exc:
                    errors.append(str(exc))
        return errors

    errors = run(body)
    assert errors[0].startswith("loop.sock_connect() needs a kernel socket")
    assert errors[1].startswith("loop.create_connection(sock=...) needs a kernel socket")


def test_unix_sockets_stay_with_the_kernel(run, tmp_path):
    path = str(tmp_path / "s")

    async def body(loop, stack):
        async def echo(reader, writer):
            writer.write(await reader.readline())
            await writer.drain()
            writer.close()

        server = await asyncio.start_unix_server(echo, path)
        reader, writer = await asyncio.open_unix_connection(path)
        writer.write(b"ping\n")
        line = await reader.readline()
        writer.close()
        server.close()
        return line, stack.calls

    assert run(body) == (b"ping\n", [])
