"""The built-in server's ASGI completeness on kernel loopback sockets (no root): lifespan,
WebSockets (with the real websockets client), and request lines that are not ones."""

from __future__ import annotations

import asyncio
import re

import pytest
import websockets

from stack.apps.http.lifespan import Lifespan, LifespanFailed
from stack.apps.http.server import HttpServerProtocol


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 20))


async def serve(app, state=None):
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: HttpServerProtocol(app, state=state),
                                      "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def exchange(port: int, raw: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    writer.write_eof()
    data = await reader.read()
    writer.close()
    return data


async def lifespan_app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                scope["state"]["db"] = "connected"
                await send({"type": "lifespan.startup.complete"})
            else:
                scope["state"]["db"] = "closed"
                await send({"type": "lifespan.shutdown.complete"})
                return
    scope["state"]["mine"] = True  # a copy: the next request must not see it
    body = f"{scope['state']}".encode()
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": body})


def test_lifespan_state_reaches_requests_as_a_copy_and_shutdown_runs():
    async def main():
        lifespan = Lifespan(lifespan_app)
        await lifespan.startup()
        server, port = await serve(lifespan_app, lifespan.state)
        first = await exchange(port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        second = await exchange(port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        server.close()
        await lifespan.shutdown()
        return first, second, lifespan.state

    first, second, state = run(main())
    assert first.endswith(b"{'db': 'connected', 'mine': True}")
    assert second.endswith(b"{'db': 'connected', 'mine': True}")
    assert state == {"db": "closed"}


def test_lifespan_failure_and_apps_without_lifespan():
    async def failing(scope, receive, send):
        await receive()
        await send({"type": "lifespan.startup.failed", "message": "no database"})

    async def http_only(scope, receive, send):
        assert scope["type"] == "http"

    async def main():
        with pytest.raises(LifespanFailed, match="no database"):
            await Lifespan(failing).startup()
        quiet = Lifespan(http_only)
        await quiet.startup()  # raising at once means "no lifespan": allowed
        await quiet.shutdown()
        return quiet.supported

    assert run(main()) is False


async def ws_app(scope, receive, send):
    assert scope["type"] == "websocket"
    message = await receive()
    assert message["type"] == "websocket.connect"
    if scope["path"] == "/refuse":
        await send({"type": "websocket.close"})
        return
    await send({"type": "websocket.accept"})
    while True:
        message = await receive()
        if message["type"] == "websocket.disconnect":
            return
        if "text" in message and message["text"] is not None:
            await send({"type": "websocket.send", "text": message["text"].upper()})
        else:
            await send({"type": "websocket.send", "bytes": message["bytes"] * 2})


def test_websocket_echo_refusal_and_version_check():
    async def main():
        server, port = await serve(ws_app)
        async with websockets.connect(f"ws://127.0.0.1:{port}/echo") as ws:
            await ws.send("quiet")
            text = await ws.recv()
            await ws.send(b"ab")
            data = await ws.recv()
        with pytest.raises(websockets.InvalidStatus) as refused:
            async with websockets.connect(f"ws://127.0.0.1:{port}/refuse"):
                pass
        old = await exchange(port, b"GET /echo HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                                   b"Connection: Upgrade\r\nSec-WebSocket-Key: "
                                   b"dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 8"
                                   b"\r\n\r\n")
        server.close()
        return text, data, refused.value.response.status_code, old

    text, data, refused, old = run(main())
    assert (text, data, refused) == ("QUIET", b"abab", 403)
    assert old.startswith(b"HTTP/1.1 426 ") and b"Sec-WebSocket-Version: 13" in old


@pytest.mark.parametrize(("raw", "statuses"), [
    (b"HELLO\r\n\r\n", ["400"]),
    (b"HEL", ["400"]),  # all there is before the client's EOF
    (b"GET\r\n\r\n", ["400"]),
    (b"FROB / HTTP/1.1\r\nHost: x\r\n\r\n", ["501"]),
    (b"get / HTTP/1.1\r\nHost: x\r\n\r\n", ["501"]),  # methods are case-sensitive tokens
    (b"GET / HTTP/1.1\r\nHost: x\r\n\r\nHELLO\r\n\r\n", ["200", "400"]),
])
def test_request_lines_that_are_not_ones(raw, statuses):
    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    async def main():
        server, port = await serve(app)
        data = await exchange(port, raw)
        server.close()
        return data

    data = run(main())
    got = [m.decode() for m in re.findall(rb"HTTP/1\.1 (\d{3}) ", data)]
    assert got == statuses, data


def test_a_body_over_the_limit_is_refused_at_once():
    """The request being answered breaks a limit in its body: 413 at once (not after an
    application that waits for the rest of a body that will never come)."""
    from stack.apps.http.server import Limits

    async def app(scope, receive, send):
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"read it all"})

    async def main():
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: HttpServerProtocol(app, Limits(max_body=1000)), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"800\r\n" + b"a" * 2048 + b"\r\n")
        answer = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        server.close()
        return answer

    assert run(main()).startswith(b"HTTP/1.1 413 ")


def test_a_websocket_app_hears_the_disconnect_instead_of_being_cancelled():
    import socket

    ended = []

    async def app(scope, receive, send):
        await receive()
        await send({"type": "websocket.accept"})
        try:
            message = await receive()
            ended.append(message["type"])
        except asyncio.CancelledError:
            ended.append("cancelled")
            raise

    async def main():
        server, port = await serve(app)
        ws = await websockets.connect(f"ws://127.0.0.1:{port}/")
        sock = ws.transport.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        ws.transport.abort()  # a reset, no close frame
        for _ in range(100):
            if ended:
                break
            await asyncio.sleep(0.01)
        server.close()

    run(main())
    assert ended == ["websocket.disconnect"]


def test_an_upgrade_we_do_not_offer_is_answered_then_the_connection_ends():
    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"plain"})

    async def main():
        server, port = await serve(app)
        data = await exchange(port, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\n"
                                    b"Upgrade: h2c\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n")
        server.close()
        return data

    data = run(main())
    assert data.startswith(b"HTTP/1.1 200 ") and b"Connection: close" in data
    assert data.endswith(b"plain")



def test_a_large_body_arrives_whole_through_pauses():
    """Reading pauses while more than `body_buffer` waits for the application, and
    resumes when it takes it: the body arrives whole and in order."""
    import hashlib

    from stack.apps.http.server import Limits

    body = bytes(range(256)) * 12_000  # about 3 MB
    pauses = []

    async def app(scope, receive, send):
        digest = hashlib.sha256()
        while True:
            message = await receive()
            digest.update(message["body"])
            await asyncio.sleep(0.001)  # a slow reader: the buffer fills meanwhile
            if not message.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": digest.hexdigest().encode()})

    class Counting(HttpServerProtocol):
        def connection_made(self, transport):
            pause = transport.pause_reading

            def counted():
                pauses.append(1)
                pause()

            transport.pause_reading = counted
            super().connection_made(transport)

    async def main():
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: Counting(app, Limits(body_buffer=64 * 1024)), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        answer = await exchange(port, b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: "
                                + str(len(body)).encode() + b"\r\n\r\n" + body)
        server.close()
        return answer

    answer = run(main())
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert answer.endswith(hashlib.sha256(body).hexdigest().encode())
    assert pauses, "reading never paused"


class TapLikeTransport(asyncio.Transport):
    """As tapstack's transport behaves: while reading is paused, data waits in the
    connection; resume_reading() hands it all over at once, inside the call."""

    def __init__(self, protocol):
        super().__init__()
        self.protocol = protocol
        self.out = bytearray()
        self.paused = False
        self.held = bytearray()

    def write(self, data):
        self.out += data

    def get_extra_info(self, name, default=None):
        return {"peername": ("192.0.2.1", 4000),
                "sockname": ("192.0.2.2", 80)}.get(name, default)

    def is_closing(self):
        return False

    def close(self):
        pass

    def pause_reading(self):
        self.paused = True

    def resume_reading(self):
        self.paused = False
        if self.held:
            data = bytes(self.held)
            self.held.clear()
            self.protocol.data_received(data)

    def deliver(self, data):
        if self.paused:
            self.held += data
        else:
            self.protocol.data_received(data)


def collecting_app(messages: list):
    async def app(scope, receive, send):
        while True:
            message = await receive()
            messages.append(message["body"])
            if not message.get("more_body"):
                break
        body = str(sum(map(len, messages))).encode()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": body})
    return app


async def answered(transport: TapLikeTransport) -> bytes:
    while not transport.out:
        await asyncio.sleep(0)
    return bytes(transport.out)


def post(body: bytes) -> bytes:
    return f"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body


def test_body_pieces_that_waited_reach_the_application_as_one_message():
    """A TCP stack that delivers segment by segment (tapstack does) parses a batch of
    them before the application runs again: it gets them in one message, not one each."""
    messages = []
    body = bytes(range(256)) * 60
    raw = post(body)
    pieces = [raw[i:i + 1448] for i in range(0, len(raw), 1448)]

    async def main():
        protocol = HttpServerProtocol(collecting_app(messages))
        transport = TapLikeTransport(protocol)
        protocol.connection_made(transport)
        for piece in pieces[:6]:
            transport.deliver(piece)  # one batch: the application has not run
        while not messages:
            await asyncio.sleep(0)
        for piece in pieces[6:]:
            transport.deliver(piece)
        return await answered(transport)

    answer = run(main())
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert b"".join(messages) == body
    assert messages[0] == b"".join(pieces[:6])[len(raw) - len(body):]
    assert len(messages) <= 3, [len(m) for m in messages]


def test_the_rest_of_a_body_handed_over_on_resume_is_not_lost():
    """Reading paused with the body's end still waiting in the connection: taking the
    waiting pieces resumes reading, which hands the end over inside that call. The
    application must still be told there is more, and get it."""
    from stack.apps.http.server import Limits

    messages = []
    body = bytes(range(256)) * 400  # 100 KB against a 64 KB buffer
    raw = post(body)

    async def main():
        protocol = HttpServerProtocol(collecting_app(messages), Limits(body_buffer=64 * 1024))
        transport = TapLikeTransport(protocol)
        protocol.connection_made(transport)
        for i in range(0, len(raw), 1448):
            transport.deliver(raw[i:i + 1448])  # all of it, before the application runs
        assert transport.paused and transport.held
        return await answered(transport)

    answer = run(main())
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert b"".join(messages) == body
    assert answer.endswith(str(len(body)).encode())
