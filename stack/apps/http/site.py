"""The built-in site: an ASGI 3 application.

    /              what the stack saw of the visitor, and this connection's TCP state
    /store/<key>   an in-memory key-value store: POST, GET, HEAD, PUT, DELETE
    /bytes/<n>     n deterministic bytes, streamed (Range supported)
    /upload        any body; answers its length and sha256
    /_stats        the stack's counters as JSON
    anything else  a static file under --root, if one was given
"""

from __future__ import annotations

import hashlib
import html
import json
import mimetypes
import os
import re
from collections.abc import Callable
from email.utils import formatdate, parsedate_to_datetime
from typing import Any

from stack.apps.services import deterministic_bytes
from stack.video.hls import CONTENT_TYPES as STREAM_TYPES

Scope = dict[str, Any]
MAX_BYTES = 1 << 40
STORE_MAX_KEYS = 10_000
STORE_MAX_VALUE = 16 << 20
CHUNK = 256 * 1024
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


def header(scope: Scope, name: bytes) -> bytes | None:
    for k, v in scope["headers"]:
        if k == name:
            return v
    return None


async def respond(send: Callable, status: int, body: bytes = b"",
                  content_type: bytes = b"text/plain; charset=utf-8",
                  headers: list | None = None) -> None:
    hdrs = [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status,
                "headers": hdrs + list(headers or [])})
    await send({"type": "http.response.body", "body": body})


async def read_body(receive: Callable, limit: int) -> bytes | None:
    """The whole request body, or None when it exceeds `limit`."""
    parts, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        parts.append(chunk)
        if not message.get("more_body"):
            return b"".join(parts)


def parse_range(value: bytes | None, size: int) -> tuple[int, int] | bool | None:
    """A single byte range -> (start, end inclusive); None: no/ignored header;
    False: not satisfiable (416)."""
    if value is None:
        return None
    m = _RANGE.match(value.decode("latin-1").strip())
    if not m or (not m.group(1) and not m.group(2)):
        return None  # several ranges or nonsense: RFC 9110 14.2 lets us ignore it
    if m.group(1):
        start = int(m.group(1))
        end = int(m.group(2)) if m.group(2) else size - 1
    else:
        start, end = max(size - int(m.group(2)), 0), size - 1
    if start >= size or start > end:
        return False
    return start, min(end, size - 1)


class Site:
    def __init__(self, stats: Callable[[], dict] | None = None, root: str | None = None,
                 server_name: str = "tapstack") -> None:
        self.stats = stats
        self.root = os.path.realpath(root) if root else None
        self.store: dict[str, tuple[bytes, bytes]] = {}
        self.server_name = server_name

    async def __call__(self, scope: Scope, receive: Callable, send: Callable) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        path = scope["path"]
        method = scope["method"]
        if path == "/" and self.root and os.path.isfile(os.path.join(self.root, "index.html")):
            return await self._static(scope, send, path)  # the user's own front page
        if path == "/":
            if method not in ("GET", "HEAD"):
                return await self._not_allowed(send, "GET, HEAD")
            return await respond(send, 200, self._home(scope), b"text/html; charset=utf-8")
        if path.startswith("/store/"):
            return await self._store(scope, receive, send, path[len("/store/"):])
        if path.startswith("/bytes/"):
            return await self._bytes(scope, send, path[len("/bytes/"):])
        if path == "/upload":
            return await self._upload(scope, receive, send)
        if path == "/_stats":
            if method not in ("GET", "HEAD"):
                return await self._not_allowed(send, "GET, HEAD")
            data = self.stats() if self.stats else {"counters": {}}
            return await respond(send, 200, json.dumps(data, indent=1).encode(),
                                 b"application/json")
        if self.root is not None:
            return await self._static(scope, send, path)
        return await respond(send, 404, b"404 Not Found\n")

    async def _not_allowed(self, send: Callable, allow: str) -> None:
        await respond(send, 405, b"405 Method Not Allowed\n",
                      headers=[(b"allow", allow.encode())])

    # -- / ------------------------------------------------------------------------------------

    def _home(self, scope: Scope) -> bytes:
        client = scope.get("client") or ("?", 0)
        ext = scope.get("extensions", {}).get("tapstack")
        e = html.escape
        rows = [("your address", client[0]), ("your port", str(client[1])),
                ("your MAC", (ext or {}).get("peer_mac") or "unknown (kernel socket)"),
                ("server", f"{scope['server'][0]}:{scope['server'][1]}"
                 if scope.get("server") else "?"),
                ("HTTP", f"{scope['method']} {scope['path']} HTTP/{scope['http_version']}")]
        tcp_rows = ""
        if ext:
            info = ext["tcp_info"]
            tcp_rows = "".join(
                f"<tr><th>{e(k)}</th><td>{e(str(v))}</td></tr>" for k, v in info.items())
            path = ("TAP fd &rarr; Ethernet (our MAC) &rarr; ARP had resolved you &rarr; "
                    "IPv4 (header checksum checked) &rarr; TCP (4-tuple lookup, sequence "
                    "checks, in-order delivery) &rarr; asyncio transport &rarr; HTTP/1.1 "
                    "(httptools) &rarr; ASGI &rarr; this page, and back down the same way.")
        else:
            path = "This server runs on kernel sockets: the kernel's own TCP/IP carried it."
        table = "".join(f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in rows)
        page = f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{e(self.server_name)}</title>
<style>body{{font-family:sans-serif;max-width:50em;margin:2em auto}}
th{{text-align:left;padding-right:1em}}</style></head>
<body><h1>Hello from {e(self.server_name)}</h1>
<p>Every byte of this page went through a TCP/IP stack written in Python.</p>
<h2>What the stack saw of you</h2><table>{table}</table>
<h2>This connection's TCP state</h2>
<table>{tcp_rows or '<tr><td>not available on kernel sockets</td></tr>'}</table>
<h2>The way your request travelled</h2><p>{path}</p>
<p>Try <code>/bytes/1000000</code>, <code>/store/hello</code>, <code>/upload</code>,
<code>/_stats</code>.</p></body></html>
"""
        return page.encode()

    # -- /store/<key> -------------------------------------------------------------------------

    async def _store(self, scope: Scope, receive: Callable, send: Callable, key: str) -> None:
        method = scope["method"]
        if not key or "/" in key:
            return await respond(send, 404, b"404 Not Found: use /store/<key>\n")
        if method in ("GET", "HEAD"):
            item = self.store.get(key)
            if item is None:
                return await respond(send, 404, b"404 Not Found\n")
            return await respond(send, 200, item[0], item[1])
        if method in ("PUT", "POST"):
            if method == "POST" and key in self.store:
                return await respond(send, 409, b"409 Conflict: it exists, PUT replaces\n")
            if key not in self.store and len(self.store) >= STORE_MAX_KEYS:
                return await respond(send, 507, b"507 Insufficient Storage: the store is full\n")
            body = await read_body(receive, STORE_MAX_VALUE)
            if body is None:
                return await respond(send, 413, b"413 Content Too Large\n")
            ctype = header(scope, b"content-type") or b"application/octet-stream"
            existed = key in self.store
            self.store[key] = (body, ctype)
            if existed:
                return await respond(send, 204)
            return await respond(send, 201, b"201 Created\n",
                                 headers=[(b"location", f"/store/{key}".encode())])
        if method == "DELETE":
            if self.store.pop(key, None) is None:
                return await respond(send, 404, b"404 Not Found\n")
            return await respond(send, 204)
        return await self._not_allowed(send, "GET, HEAD, PUT, POST, DELETE")

    # -- /bytes/<n> -----------------------------------------------------------------------------

    async def _bytes(self, scope: Scope, send: Callable, arg: str) -> None:
        if scope["method"] not in ("GET", "HEAD"):
            return await self._not_allowed(send, "GET, HEAD")
        if not arg.isdigit() or int(arg) > MAX_BYTES:
            return await respond(send, 404, b"404 Not Found: /bytes/<n>, n <= 2**40\n")
        size = int(arg)
        await self._stream(scope, send, size, lambda off, n: deterministic_bytes(off, n),
                           b"application/octet-stream", [])

    async def _stream(self, scope: Scope, send: Callable, size: int,
                      read: Callable[[int, int], bytes], ctype: bytes, extra: list) -> None:
        """Send [0, size) or the requested range, in chunks, with flow control."""
        rng = parse_range(header(scope, b"range"), size)
        if rng is False:
            return await respond(send, 416, b"416 Range Not Satisfiable\n",
                                 headers=[(b"content-range", f"bytes */{size}".encode())])
        status, start, end = (206, *rng) if rng else (200, 0, size - 1)
        length = end - start + 1 if size else 0
        headers = [(b"content-type", ctype), (b"content-length", str(length).encode()),
                   (b"accept-ranges", b"bytes"), *extra]
        if rng:
            headers.append((b"content-range", f"bytes {start}-{end}/{size}".encode()))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        if scope["method"] == "HEAD" or length == 0:
            return await send({"type": "http.response.body", "body": b""})
        offset = start
        while offset <= end:
            n = min(CHUNK, end - offset + 1)
            await send({"type": "http.response.body", "body": read(offset, n),
                        "more_body": offset + n <= end})
            offset += n

    # -- /upload ------------------------------------------------------------------------------

    async def _upload(self, scope: Scope, receive: Callable, send: Callable) -> None:
        if scope["method"] not in ("POST", "PUT"):
            return await self._not_allowed(send, "POST, PUT")
        digest = hashlib.sha256()
        length = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            digest.update(chunk)
            length += len(chunk)
            if not message.get("more_body"):
                break
        body = json.dumps({"length": length, "sha256": digest.hexdigest()}).encode() + b"\n"
        await respond(send, 200, body, b"application/json")

    # -- static files -----------------------------------------------------------------------

    async def _static(self, scope: Scope, send: Callable, path: str) -> None:
        if scope["method"] not in ("GET", "HEAD"):
            return await self._not_allowed(send, "GET, HEAD")
        full = os.path.realpath(os.path.join(self.root, path.lstrip("/")))
        if full != self.root and not full.startswith(self.root + os.sep):
            return await respond(send, 404, b"404 Not Found\n")
        if os.path.isdir(full):
            full = os.path.join(full, "index.html")  # no directory listings
        try:
            st = os.stat(full)
            f = open(full, "rb")  # noqa: SIM115 - closed below
        except OSError:
            return await respond(send, 404, b"404 Not Found\n")
        with f:
            etag = f'"{st.st_size:x}-{int(st.st_mtime_ns):x}"'.encode()
            modified = formatdate(st.st_mtime, usegmt=True).encode()
            validators = [(b"etag", etag), (b"last-modified", modified)]
            if self._not_modified(scope, etag, st.st_mtime):
                await send({"type": "http.response.start", "status": 304,
                            "headers": validators})
                return await send({"type": "http.response.body", "body": b""})
            ext = os.path.splitext(full)[1].lower()
            ctype = (STREAM_TYPES.get(ext) or mimetypes.guess_type(full)[0]
                     or "application/octet-stream").encode()
            if ctype.startswith(b"text/"):
                ctype += b"; charset=utf-8"
            if ext == ".m3u8":
                # a live playlist changes every segment: revalidate it each time
                validators.append((b"cache-control", b"no-cache"))
            elif ext in STREAM_TYPES:
                validators.append((b"cache-control", b"max-age=86400"))  # a segment never

            def read(offset: int, n: int) -> bytes:
                f.seek(offset)
                return f.read(n)

            await self._stream(scope, send, st.st_size, read, ctype, validators)

    @staticmethod
    def _not_modified(scope: Scope, etag: bytes, mtime: float) -> bool:
        """RFC 9110 13.1: If-None-Match wins over If-Modified-Since."""
        inm = header(scope, b"if-none-match")
        if inm is not None:
            tags = [t.strip() for t in inm.split(b",")]
            return b"*" in tags or etag in tags or b"W/" + etag in tags
        ims = header(scope, b"if-modified-since")
        if ims is not None:
            try:
                return int(mtime) <= parsedate_to_datetime(ims.decode()).timestamp()
            except (TypeError, ValueError):
                return False
        return False

