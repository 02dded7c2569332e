"""WebSockets (RFC 6455) for the built-in HTTP server, speaking ASGI's websocket scope.

The upgrade request is checked and answered here (101 with Sec-WebSocket-Accept, or 403
when the application closes before accepting); the frames after it are wsproto's
(a sans-I/O library: masking, fragmentation, control frames, close codes).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, Any

from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import (
    BytesMessage,
    CloseConnection,
    Message,
    Ping,
    TextMessage,
)
from wsproto.utilities import LocalProtocolError, RemoteProtocolError, generate_accept_token

if TYPE_CHECKING:
    from stack.apps.http.server import HttpServerProtocol, _Request

log = logging.getLogger("tapstack.http")

MAX_MESSAGE = 16 * 1024 * 1024  # a bigger message closes with 1009
MAX_EARLY = 1 << 20  # bytes a client may send before the application accepts
INBOX_HIGH, INBOX_LOW = 64, 16  # messages waiting for the application: pause, resume
CLOSE_WAIT = 5.0  # seconds to wait for the peer's close frame after ours


class WebSocketDisconnected(OSError):
    """send() on a WebSocket the client has left (ASGI spec 2.4)."""


def upgrade_problem(req: _Request) -> tuple[int, list[tuple[bytes, bytes]]] | None:
    """None if `req` is a valid WebSocket opening handshake, else (status, headers)."""
    headers = dict(req.headers)
    if req.method != "GET" or req.version != "1.1":
        return 400, []
    if headers.get(b"sec-websocket-version", b"").strip() != b"13":
        return 426, [(b"Sec-WebSocket-Version", b"13")]
    if not headers.get(b"sec-websocket-key"):
        return 400, []
    return None


def wants_websocket(req: _Request) -> bool:
    headers = dict(req.headers)
    return b"websocket" in headers.get(b"upgrade", b"").lower() and \
        b"upgrade" in headers.get(b"connection", b"").lower()


class WebSocketSession:
    """One WebSocket: the ASGI app on one side, wsproto and the transport on the other."""

    def __init__(self, http: HttpServerProtocol, req: _Request, scope: dict[str, Any]
                 ) -> None:
        self.http = http
        self.req = req
        self.transport = http.transport
        headers = dict(req.headers)
        protocols = headers.get(b"sec-websocket-protocol", b"").decode("latin-1")
        self.scope = {**scope, "type": "websocket",
                      "scheme": "wss" if http.scheme == "https" else "ws",
                      "subprotocols": [p.strip() for p in protocols.split(",") if p.strip()]}
        self.scope.pop("method", None)
        self.key = headers[b"sec-websocket-key"].strip()
        self.inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.inbox.put_nowait({"type": "websocket.connect"})
        self.conn: Connection | None = None
        self.accepted = False
        self.closed = False  # we sent a close frame, or refused the handshake
        self.gone = False  # the client left (close frame or connection lost)
        self.early: list[bytes] = []  # frames that came before we accepted
        self.parts: list[Any] = []
        self.size = 0
        self.peer_closed = asyncio.Event()
        self.paused = False

    # -- from the transport (through the HTTP protocol) ------------------------------------

    def feed(self, data: bytes) -> None:
        if self.conn is None:
            self.early.append(data)
            if sum(map(len, self.early)) > MAX_EARLY:  # frames before any accept: hostile
                self.early.clear()
                self._lost(1009)
                self.transport.abort()
            return
        try:
            self.conn.receive_data(data)
            for event in self.conn.events():
                self._event(event)
        except RemoteProtocolError as exc:
            log.debug("websocket protocol error from the client: %s", exc)
            self._lost(1002)
            self.transport.close()

    def _event(self, event: Any) -> None:
        if isinstance(event, (TextMessage, BytesMessage)):
            self.parts.append(event.data)
            self.size += len(event.data)
            if self.size > MAX_MESSAGE:
                self._close_frame(1009, "message too big")
                self._lost(1009)
                return
            if event.message_finished:
                if isinstance(event, TextMessage):
                    message = {"type": "websocket.receive", "text": "".join(self.parts)}
                else:
                    message = {"type": "websocket.receive", "bytes": b"".join(self.parts)}
                self.parts, self.size = [], 0
                self.inbox.put_nowait(message)
                if self.inbox.qsize() >= INBOX_HIGH and not self.paused:
                    self.paused = True  # the application is slower than the client
                    self.transport.pause_reading()
        elif isinstance(event, Ping):
            self.transport.write(self.conn.send(event.response()))
        elif isinstance(event, CloseConnection):
            self.peer_closed.set()
            if self.conn.state == ConnectionState.REMOTE_CLOSING:
                self.transport.write(self.conn.send(event.response()))
                self.closed = True
            self._lost(event.code)
            self.transport.close()

    def connection_lost(self) -> None:
        self.peer_closed.set()
        self._lost(1006)

    def _lost(self, code: int) -> None:
        if not self.gone:
            self.gone = True
            self.inbox.put_nowait({"type": "websocket.disconnect", "code": code})

    # -- the application ---------------------------------------------------------------

    async def run(self) -> None:
        app = self.http.app
        try:
            await app(self.scope, self.receive, self.send)
        except WebSocketDisconnected:
            pass
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("ASGI application failed on websocket %s", self.scope["path"])
            if not self.accepted and not self.closed:
                self._refuse(500)
                return
        if not self.accepted and not self.closed:
            self._refuse(403)  # the app returned without accepting
        elif not self.closed and not self.gone:
            self._close_frame(1000, "")
        if self.closed and not self.peer_closed.is_set() and not self.gone:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.peer_closed.wait(), CLOSE_WAIT)
        self.transport.close()

    async def receive(self) -> dict[str, Any]:
        message = await self.inbox.get()
        if self.paused and self.inbox.qsize() <= INBOX_LOW and not self.gone:
            self.paused = False
            self.transport.resume_reading()
        return message

    async def send(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        if self.gone or self.closed:
            raise WebSocketDisconnected(f"{kind} on a closed websocket")
        if kind == "websocket.accept":
            if self.accepted:
                raise RuntimeError("websocket.accept sent twice")
            self._accept(message)
        elif kind == "websocket.send":
            if not self.accepted:
                raise RuntimeError("websocket.send before websocket.accept")
            text, data = message.get("text"), message.get("bytes")
            payload = text if text is not None else data
            if payload is None:
                raise RuntimeError("websocket.send needs 'bytes' or 'text'")
            self.transport.write(self.conn.send(Message(data=payload)))
            can_write = self.http.can_write
            if can_write is not None and not can_write.is_set():
                await can_write.wait()
        elif kind == "websocket.close":
            if not self.accepted:
                self._refuse(403)
            else:
                self._close_frame(message.get("code", 1000), message.get("reason") or "")
        else:
            raise RuntimeError(f"unexpected ASGI message {kind} on a websocket")

    def _accept(self, message: dict[str, Any]) -> None:
        lines = [b"HTTP/1.1 101 Switching Protocols", b"Upgrade: websocket",
                 b"Connection: Upgrade",
                 b"Sec-WebSocket-Accept: " + generate_accept_token(self.key)]
        if message.get("subprotocol"):
            lines.append(b"Sec-WebSocket-Protocol: " + message["subprotocol"].encode())
        for name, value in message.get("headers", []):
            lines.append(bytes(name) + b": " + bytes(value))
        self.transport.write(b"\r\n".join(lines) + b"\r\n\r\n")
        self.http.log_access(self.req, 101, 0)
        self.accepted = True
        self.conn = Connection(ConnectionType.SERVER)
        early, self.early = self.early, []
        for data in early:
            self.feed(data)

    def _refuse(self, status: int) -> None:
        from stack.apps.http.server import simple_response

        self.closed = True
        self.transport.write(simple_response(status, close=True))
        self.http.log_access(self.req, status, 0)

    def _close_frame(self, code: int, reason: str) -> None:
        if self.closed or self.conn is None:
            return
        self.closed = True
        with contextlib.suppress(LocalProtocolError):
            self.transport.write(self.conn.send(CloseConnection(code=code, reason=reason)))
