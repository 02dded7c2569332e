"""An HTTP/1.1 server as an asyncio Protocol, speaking ASGI 3 to the application.

It runs unchanged on tapstack transports and on kernel sockets. Parsing is httptools
(llhttp, the parser uvicorn uses); everything about connections is here: persistent
connections and pipelining, HTTP/1.0, Content-Length and chunked bodies, Expect:
100-continue, HEAD, limits with the right status codes, an idle timeout.
"""

from __future__ import annotations

import asyncio
import collections
import collections.abc
import contextlib
import email.utils
import logging
import re
import socket
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

import httptools

from stack.apps.http.websocket import WebSocketSession, upgrade_problem, wants_websocket

log = logging.getLogger("tapstack.http")
access = logging.getLogger("tapstack.access")
# RFC 9112 3: method SP request-target SP HTTP-version; a method is a token
REQUEST_LINE = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+ [^ \r\n]+ HTTP/\d\.\d\r?")

STATUS_TEXT = {
    100: "Continue", 200: "OK", 201: "Created", 204: "No Content", 206: "Partial Content",
    304: "Not Modified", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
    408: "Request Timeout", 409: "Conflict", 411: "Length Required",
    413: "Content Too Large", 414: "URI Too Long", 416: "Range Not Satisfiable",
    431: "Request Header Fields Too Large", 500: "Internal Server Error",
    501: "Not Implemented", 503: "Service Unavailable", 505: "HTTP Version Not Supported",
    507: "Insufficient Storage",
}
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"})
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


@dataclass(slots=True)
class Limits:
    max_url: int = 8192  # 414 beyond
    max_header_bytes: int = 65536  # all header lines together; 431 beyond
    max_headers: int = 100  # 431 beyond
    max_body: int = 1 << 30  # 413 beyond (Content-Length or streamed)
    keepalive_timeout: float = 15.0  # idle connection, or headers not complete
    body_buffer: int = 1 << 20  # request bytes buffered before reading pauses


class _Reject(Exception):
    def __init__(self, status: int, close: bool = True) -> None:
        super().__init__(status)
        self.status = status
        self.close = close


class _Date:
    """The Date header, formatted once a second."""

    value = b""
    second = -1

    @classmethod
    def get(cls) -> bytes:
        now = int(time.time())
        if now != cls.second:
            cls.second = now
            cls.value = email.utils.formatdate(now, usegmt=True).encode()
        return cls.value


def simple_response(status: int, body: bytes | None = None, extra: list | None = None,
                    close: bool = False, head: bool = False) -> bytes:
    text = STATUS_TEXT.get(status, "Unknown")
    if body is None:
        body = f"{status} {text}\n".encode()
    lines = [f"HTTP/1.1 {status} {text}".encode(), b"Date: " + _Date.get(),
             b"Server: tapstack", b"Content-Type: text/plain; charset=utf-8",
             b"Content-Length: " + str(len(body)).encode()]
    for name, value in extra or ():
        lines.append(name + b": " + value)
    if close:
        lines.append(b"Connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n" + (b"" if head else body)


class _Request:
    __slots__ = ("body", "body_bytes", "buffered", "complete", "event", "expect_continue",
                 "headers", "keep_alive", "method", "upgrade", "url", "version")

    def __init__(self) -> None:
        self.url = bytearray()
        self.headers: list[tuple[bytes, bytes]] = []
        self.method = ""
        self.version = "1.1"
        self.keep_alive = True
        self.body: collections.deque[bytes] = collections.deque()
        self.body_bytes = 0
        self.buffered = 0  # bytes in `body`, not yet given to the application
        self.complete = False
        self.event = asyncio.Event()
        self.expect_continue = False
        self.upgrade = False  # a WebSocket opening handshake


class HttpServerProtocol(asyncio.Protocol):
    __slots__ = ("access_log", "app", "bad_line", "can_write", "client", "closing",
                 "closing_after_pipeline", "current", "extra_scope", "header_bytes",
                 "idle_handle", "limits", "loop", "on_tapstack", "parser", "paused_reading",
                 "pipeline", "rejected", "runner", "scheme", "server", "state", "trace",
                 "transport", "upgraded", "ws")

    def __init__(self, app: Any, limits: Limits | None = None, scheme: str = "http",
                 extra_scope: dict | None = None, state: dict | None = None,
                 access_log: bool = False) -> None:
        self.app = app
        self.state = state  # what the app's lifespan startup kept; a copy per request
        self.access_log = access_log and access.isEnabledFor(logging.INFO)
        self.bad_line: bytearray | None = None  # a request line llhttp refused
        self.rejected: bytes | None = None  # the error answer, once a request is refused
        self.upgraded: bytearray | None = None  # bytes after a WebSocket upgrade request
        self.ws: WebSocketSession | None = None
        self.limits = limits or Limits()
        self.scheme = scheme
        self.extra_scope = extra_scope or {}
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.pipeline: list[_Request] = []  # requests parsed, answered in order
        self.current: _Request | None = None  # being parsed
        self.runner: asyncio.Task | None = None
        self.closing = False
        self.header_bytes = 0
        self.paused_reading = False
        # set while the transport asked us to pause; made only then (an idle keep-alive
        # connection should cost little)
        self.can_write: asyncio.Event | None = None
        self.idle_handle: asyncio.TimerHandle | None = None
        self.closing_after_pipeline = False
        self.on_tapstack = False
        self.trace = None
        self.loop = asyncio.get_event_loop()

    # -- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        peer = transport.get_extra_info("peername")
        sock = transport.get_extra_info("sockname")
        self.client = (peer[0], peer[1]) if peer else None
        self.server = (sock[0], sock[1]) if sock else None
        stack = transport.get_extra_info("stack")
        self.on_tapstack = stack is not None
        # the node's decision trace: requests and responses are events in it
        self.trace = stack.runtime.node.trace if stack is not None else None
        # as uvicorn does: a response is written whole in one go, so Nagle has nothing
        # to gather and could only hold its tail back for the client's delayed ACK
        sock_obj = transport.get_extra_info("socket")
        if sock_obj is not None:
            with contextlib.suppress(OSError, AttributeError):
                sock_obj.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._arm_idle()

    def data_received(self, data: bytes) -> None:
        if self.ws is not None:
            self.ws.feed(data)
            return
        if self.upgraded is not None:
            self.upgraded += data  # frames sent before the session started
            if len(self.upgraded) > 1 << 20:
                self.transport.abort()  # a client that floods before the answer
            return
        if self.rejected:
            return  # the stream is unusable past a refused request
        if self.bad_line is not None:
            self.bad_line += data
            self._judge_bad_line()
            return
        if self.closing or self.parser is None:
            return
        try:
            self.parser.feed_data(data)
        except _Reject as exc:
            self._reject(exc.status)
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            self._reject(cause.status if isinstance(cause, _Reject) else 400)
        except httptools.HttpParserInvalidMethodError:
            # an unknown method (501) or no request line at all (400): see the whole line
            self.bad_line = bytearray(data[_refused_message_start(data):])
            self._judge_bad_line()
        except httptools.HttpParserUpgrade as exc:
            if self.pipeline and self.pipeline[-1].upgrade:
                self.upgraded = bytearray(data[exc.args[0]:] if exc.args else b"")
            else:
                # other upgrades (h2c, ...) are not offered: the request is answered as
                # plain HTTP/1.1, then the connection ends (the parser stays in upgrade
                # mode, so nothing after it on this connection could be read)
                if self.pipeline:
                    self.pipeline[-1].keep_alive = False
                self.closing_after_pipeline = True
        except httptools.HttpParserError as exc:
            # llhttp refuses versions it does not know (HTTP/3.0) before our own check
            self._reject(505 if "HTTP version" in str(exc) else 400)

    def eof_received(self) -> bool:
        if self.ws is not None:  # a FIN with no close frame: the client is gone
            self.ws.connection_lost()
            return False
        if self.bad_line is not None and not self.rejected:  # all there is of that line
            self._reject(501 if REQUEST_LINE.fullmatch(self.bad_line.partition(b"\n")[0])
                         else 400)
        # The client half-closed: finish what it asked for, then close.
        if self.runner is None or self.runner.done():
            return False
        self.closing_after_pipeline = True
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self._cancel_idle()
        if self.ws is not None:
            # the application hears websocket.disconnect and ends on its own (its
            # clean-up runs); cancelled only if it does not within a while
            self.ws.connection_lost()
            self.parser = None
            if self.runner is not None and not self.runner.done():
                self.loop.call_later(10.0, self.runner.cancel)
            return
        for req in list(self.pipeline) + ([self.current] if self.current else []):
            req.event.set()
        if self.can_write is not None:
            self.can_write.set()
        if self.runner is not None and not self.runner.done():
            self.runner.cancel()
        self.parser = None  # the parser holds us through its callbacks: break the cycle

    def pause_writing(self) -> None:
        if self.can_write is None:
            self.can_write = asyncio.Event()
        self.can_write.clear()

    def resume_writing(self) -> None:
        if self.can_write is not None:
            self.can_write.set()

    # -- httptools callbacks -----------------------------------------------------------------

    def on_message_begin(self) -> None:
        self.current = _Request()
        self.header_bytes = 0

    def on_url(self, url: bytes) -> None:
        self.current.url += url
        if len(self.current.url) > self.limits.max_url:
            raise _Reject(414)

    def on_header(self, name: bytes, value: bytes) -> None:
        req = self.current
        self.header_bytes += len(name) + len(value) + 4
        req.headers.append((name.lower(), value))
        if self.header_bytes > self.limits.max_header_bytes or \
                len(req.headers) > self.limits.max_headers:
            raise _Reject(431)

    def on_headers_complete(self) -> None:
        req = self.current
        parser = self.parser
        req.method = parser.get_method().decode("ascii", "replace")
        req.version = parser.get_http_version()
        req.keep_alive = parser.should_keep_alive()
        req.upgrade = parser.should_upgrade() and wants_websocket(req)
        if req.version not in ("1.0", "1.1"):
            raise _Reject(505)
        if req.method not in KNOWN_METHODS:
            raise _Reject(501)
        headers = dict(req.headers)
        length = headers.get(b"content-length")
        chunked = b"chunked" in headers.get(b"transfer-encoding", b"").lower()
        if length is not None:
            if not length.isdigit():
                raise _Reject(400)
            if int(length) > self.limits.max_body:
                raise _Reject(413)
        elif req.method in BODY_METHODS and not chunked:
            raise _Reject(411)
        if headers.get(b"expect", b"").lower() == b"100-continue" and (length or chunked):
            # Answer at once: curl otherwise waits a second before sending the body.
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        self._cancel_idle()
        if self.trace is not None and self.trace.on:
            self._trace("request", method=req.method, target=bytes(req.url).decode("latin-1"),
                        version=req.version)
        self.pipeline.append(req)
        if self.runner is None or self.runner.done():
            self.runner = self.loop.create_task(self._run_pipeline())

    def on_body(self, body: bytes) -> None:
        req = self.current
        req.body_bytes += len(body)
        if req.body_bytes > self.limits.max_body:
            raise _Reject(413)
        req.body.append(body)
        req.buffered += len(body)
        req.event.set()
        if not self.paused_reading and req.buffered > self.limits.body_buffer:
            self.paused_reading = True
            self.transport.pause_reading()

    def on_message_complete(self) -> None:
        req = self.current
        req.complete = True
        req.event.set()
        self.current = None

    # -- running requests ----------------------------------------------------------------------

    async def _run_pipeline(self) -> None:
        while self.pipeline and not self.closing:
            req = self.pipeline[0]
            keep = await self._run_one(req)
            del self.pipeline[0]
            if not keep:
                self._close()
                return
        if self.rejected and not self.closing:
            self._send_rejection()
        elif self.closing_after_pipeline:
            self._close()
        elif not self.closing and self.current is None:
            self._arm_idle()

    async def _run_one(self, req: _Request) -> bool:
        path_bytes, _, query = bytes(req.url).partition(b"?")
        path = unquote(path_bytes.decode("latin-1"), errors="replace")
        scope = {
            "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": req.version, "method": req.method, "scheme": self.scheme,
            "path": path, "raw_path": path_bytes, "query_string": query,
            "root_path": "", "headers": req.headers, "client": self.client,
            "server": self.server, "extensions": {},
        }
        scope.update(self.extra_scope)
        if self.state is not None:
            scope["state"] = self.state.copy()
        if self.on_tapstack:  # what the stack knows of this connection, read on demand
            scope["extensions"]["tapstack"] = _ConnectionInfo(self.transport)
        if req.upgrade:
            return await self._websocket(req, scope)
        state = _ResponseState(req)
        receive_done = False

        async def receive() -> dict:
            nonlocal receive_done
            while True:
                if self.closing:
                    return {"type": "http.disconnect"}
                if req.body:
                    # everything that came since the last call, as one message (a batch
                    # of segments is parsed before the application runs again)
                    body = req.body
                    chunk = body.popleft() if len(body) == 1 else b"".join(body)
                    body.clear()
                    req.buffered = 0
                    if self.paused_reading:
                        self.paused_reading = False
                        # (on tapstack this hands over what waited at once, inside the
                        # call: the rest of the body, its end included, may be in now)
                        self.transport.resume_reading()
                    return {"type": "http.request", "body": chunk,
                            "more_body": not (req.complete and not req.body)}
                if req.complete:
                    if not receive_done:
                        receive_done = True
                        return {"type": "http.request", "body": b"", "more_body": False}
                    req.event.clear()
                    await req.event.wait()  # until disconnect
                    continue
                req.event.clear()
                await req.event.wait()

        async def send(message: dict) -> None:
            await self._send(state, message)

        try:
            await self.app(scope, receive, send)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("ASGI application failed on %s %s", req.method, path)
            if not state.started:
                self.transport.write(simple_response(500, close=True))
                self.log_access(req, 500, 0)
            return False
        if not state.started:
            self.transport.write(simple_response(500, close=True))
            self.log_access(req, 500, 0)
            return False
        if not state.finished:
            await self._send(state, {"type": "http.response.body", "body": b"",
                                     "more_body": False})
        # A request whose body the app did not read: drain it or give up the connection.
        if not req.complete:
            return False
        return state.keep_alive and not self.closing

    async def _websocket(self, req: _Request, scope: dict) -> bool:
        """Hand the connection to a WebSocket session; it never returns to HTTP."""
        problem = upgrade_problem(req)
        if problem is not None:
            status, headers = problem
            self.transport.write(simple_response(status, extra=headers, close=True))
            self.log_access(req, status, 0)
            return False
        self._cancel_idle()
        self.ws = WebSocketSession(self, req, scope)
        early, self.upgraded = self.upgraded or b"", None
        if early:
            self.ws.feed(bytes(early))
        await self.ws.run()
        return False

    def _trace(self, event: str, **fields: Any) -> None:
        self.trace.emit("http", event, self.loop.time(), client=self.client[0],
                        remote_port=self.client[1], local_port=self.server[1], **fields)

    def log_access(self, req: _Request, status: int, sent: int) -> None:
        """One line per request, like a web server's access log (--no-access-log)."""
        if self.access_log:
            client = f"{self.client[0]}:{self.client[1]}" if self.client else "-"
            access.info('%s - "%s %s HTTP/%s" %d %d', client, req.method,
                        bytes(req.url).decode("latin-1"), req.version, status, sent)

    async def _send(self, state: _ResponseState, message: dict) -> None:
        if self.closing:
            return
        kind = message["type"]
        req = state.req
        if kind == "http.response.start":
            if state.started:
                raise RuntimeError("response already started")
            state.started = True
            state.status = message["status"]
            state.headers = [(bytes(k).lower(), bytes(v)) for k, v in
                             message.get("headers", [])]
            return
        if kind != "http.response.body" or not state.started or state.finished:
            raise RuntimeError(f"unexpected ASGI message {kind}")
        body = message.get("body", b"")
        more = message.get("more_body", False)
        write = self.transport.write
        if not state.headers_sent:
            write(self._head(state, None if more else len(body)))
            state.headers_sent = True
        if req.method != "HEAD" and state.status not in (204, 304) and body:
            state.sent += len(body)
            if state.chunked:
                write(b"%x\r\n" % len(body) + body + b"\r\n")
            else:
                write(body)
        if not more:
            state.finished = True
            if self.access_log:
                self.log_access(req, state.status, state.sent)
            if self.trace is not None and self.trace.on:
                self._trace("response", method=req.method, status=state.status,
                            sent=state.sent)
            if state.chunked and req.method != "HEAD":
                write(b"0\r\n\r\n")
        if self.can_write is not None and not self.can_write.is_set():
            await self.can_write.wait()

    def _head(self, state: _ResponseState, body_length: int | None) -> bytes:
        req = state.req
        names = {k for k, _ in state.headers}
        keep = req.keep_alive
        lines = [f"HTTP/1.1 {state.status} {STATUS_TEXT.get(state.status, 'Unknown')}"
                 .encode()]
        if b"date" not in names:
            lines.append(b"Date: " + _Date.get())
        if b"server" not in names:
            lines.append(b"Server: tapstack")
        for k, v in state.headers:
            if k == b"connection":
                keep = keep and v.lower() != b"close"
                continue
            lines.append(k + b": " + v)
        if b"content-length" not in names and state.status not in (204, 304) \
                and not 100 <= state.status < 200:
            if body_length is not None:
                lines.append(b"Content-Length: " + str(body_length).encode())
            elif req.version == "1.1":
                lines.append(b"Transfer-Encoding: chunked")
                state.chunked = True
            else:
                keep = False  # HTTP/1.0 without a length: the end of the body is the close
        if not keep:
            lines.append(b"Connection: close")
        elif req.version == "1.0":
            lines.append(b"Connection: keep-alive")
        state.keep_alive = keep
        return b"\r\n".join(lines) + b"\r\n\r\n"

    # -- errors, timers, closing -------------------------------------------------------------

    def _judge_bad_line(self) -> None:
        """llhttp refused the method: 501 if the request line is well formed (RFC 9110
        9.1: a method we do not implement), 400 if it is not a request line at all."""
        line, newline, _ = self.bad_line.partition(b"\n")
        if not newline and len(line) < self.limits.max_url:
            return  # wait for the rest of the line
        self._reject(501 if REQUEST_LINE.fullmatch(line) else 400)

    def _reject(self, status: int) -> None:
        """A request we will not serve: the status, then close (the stream is unusable).
        Requests pipelined before it are answered first, in order."""
        if self.transport is None or self.closing or self.rejected:
            return
        head = self.bad_line is None and self.current is not None and \
            self.parser.get_method() == b"HEAD"
        self.rejected = simple_response(status, close=True, head=head)
        refused_is_new = self.current is None or self.current not in self.pipeline
        if refused_is_new and self.runner is not None and not self.runner.done():
            self.closing_after_pipeline = True  # _run_pipeline writes it at the end
            return
        # the request being answered is the one refused (its body broke a limit): the
        # error now, and the connection ends (the application's task is cancelled)
        self._send_rejection()

    def _send_rejection(self) -> None:
        self.transport.write(self.rejected)
        self._close()

    def _close(self) -> None:
        if not self.closing:
            self.closing = True
            self._cancel_idle()
            self.transport.close()

    def _arm_idle(self) -> None:
        self._cancel_idle()
        self.idle_handle = self.loop.call_later(self.limits.keepalive_timeout, self._idle)

    def _cancel_idle(self) -> None:
        if self.idle_handle is not None:
            self.idle_handle.cancel()
            self.idle_handle = None

    def _idle(self) -> None:
        self.idle_handle = None
        if self.current is not None and not self.closing:
            self.transport.write(simple_response(408, close=True))  # headers never came
        self._close()


def _refused_message_start(data: bytes) -> int:
    """Where, in a chunk, the message llhttp refused begins: the first message start
    (the chunk's, or one after a blank line) that is not a method we know. Requests
    before it in the chunk were parsed (a body holding a blank line can fool this; the
    answer is an error status either way)."""
    start = 0
    while True:
        method = data[start:start + 8].split(b" ", 1)[0]
        if method.decode("latin-1") not in KNOWN_METHODS:
            return start
        end = data.find(b"\r\n\r\n", start)
        if end < 0:
            return start
        start = end + 4


class _ConnectionInfo(collections.abc.Mapping):
    """scope["extensions"]["tapstack"]: tcp_info and peer_mac, computed when read (most
    requests never look, and a tcp_info snapshot is not free)."""

    KEYS = ("tcp_info", "peer_mac")

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport

    def __getitem__(self, key: str) -> Any:
        if key not in self.KEYS:
            raise KeyError(key)
        return self._transport.get_extra_info(key)

    def __iter__(self):
        return iter(self.KEYS)

    def __len__(self) -> int:
        return len(self.KEYS)


class _ResponseState:
    __slots__ = ("chunked", "finished", "headers", "headers_sent", "keep_alive", "req",
                 "sent", "started", "status")

    def __init__(self, req: _Request) -> None:
        self.req = req
        self.started = False
        self.headers_sent = False
        self.finished = False
        self.chunked = False
        self.keep_alive = True
        self.status = 200
        self.sent = 0
        self.headers: list[tuple[bytes, bytes]] = []
