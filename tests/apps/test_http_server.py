"""The HTTP server and site on kernel loopback sockets (no root): the same Protocol that
runs on tapstack, checked with raw requests so every byte of the answer is visible."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os

import pytest

from stack.apps.http.server import HttpServerProtocol, Limits
from stack.apps.http.site import Site


async def serve(app, limits=None):
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: HttpServerProtocol(app, limits), "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def exchange(port: int, raw: bytes, until_close: bool = True) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 10) if until_close else b""
    writer.close()
    return data


def status_lines(data: bytes) -> list[str]:
    return [ln.decode() for ln in data.split(b"\r\n") if ln.startswith(b"HTTP/1.")]


def run(coro):
    return asyncio.run(coro)


@pytest.mark.parametrize(("raw", "status"), [
    (b"GET / HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n", "400"),
    (b"GET /nothing-here HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", "404"),
    (b"DELETE /bytes/5 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", "405"),
    (b"POST /upload HTTP/1.1\r\nHost: x\r\n\r\n", "411"),
    (b"PUT /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 2000\r\n\r\n", "413"),
    (b"GET /" + b"a" * 300 + b" HTTP/1.1\r\nHost: x\r\n\r\n", "414"),
    (b"GET / HTTP/1.1\r\n" + b"X-A: " + b"b" * 600 + b"\r\n\r\n", "431"),
    (b"BREW /pot HTTP/1.1\r\nHost: x\r\n\r\n", "501"),
    (b"GET / HTTP/2.0\r\nHost: x\r\n\r\n", "505"),
])
def test_errors_have_the_right_status_and_close(raw, status):
    async def main():
        server, port = await serve(Site(), Limits(max_url=200, max_header_bytes=500,
                                                  max_body=1000))
        data = await exchange(port, raw)
        server.close()
        return data

    data = run(main())
    lines = status_lines(data)
    assert lines[0].split()[1] == status, data
    assert b"\r\nContent-Length: " in data or b"\r\ncontent-length: " in data
    assert b"\r\nDate: " in data and b"\r\nServer: tapstack" in data


def test_pipelined_requests_are_answered_in_order_on_one_connection():
    async def main():
        server, port = await serve(Site())
        raw = (b"GET /bytes/3 HTTP/1.1\r\nHost: x\r\n\r\n"
               b"HEAD /bytes/4 HTTP/1.1\r\nHost: x\r\n\r\n"
               b"GET /bytes/5 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = await exchange(port, raw)
        server.close()
        return data

    data = run(main())
    assert data.count(b"HTTP/1.1 200 OK\r\n") == 3
    assert data.count(b"content-length: 3") == 1 and data.count(b"content-length: 4") == 1
    assert data.endswith(b"\x00\x01\x02\x03\x04")  # HEAD sent no body: 3 + 0 + 5 bytes
    assert b"\x00\x01\x02HTTP/1.1 200" in data


def test_http10_and_chunked_bodies_and_100_continue():
    async def main():
        server, port = await serve(Site())
        out = {}
        out["http10"] = await exchange(port, b"GET /bytes/2 HTTP/1.0\r\n\r\n")
        body = os.urandom(5000)
        chunked = b"".join(b"%x\r\n" % len(body[i:i + 700]) + body[i:i + 700] + b"\r\n"
                           for i in range(0, len(body), 700)) + b"0\r\n\r\n"
        out["chunked"] = await exchange(
            port, b"POST /upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                  b"Connection: close\r\n\r\n" + chunked)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"PUT /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n"
                     b"Expect: 100-continue\r\nConnection: close\r\n\r\n")
        out["continue"] = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2)
        writer.write(b"abc")
        out["after"] = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        server.close()
        return out, body

    out, body = run(main())
    assert out["http10"].startswith(b"HTTP/1.1 200 OK") and b"Connection: close" in out["http10"]
    assert json.loads(out["chunked"].split(b"\r\n\r\n", 1)[1]) == {
        "length": 5000, "sha256": hashlib.sha256(body).hexdigest()}
    assert out["continue"] == b"HTTP/1.1 100 Continue\r\n\r\n"
    assert b'"length": 3' in out["after"]


def test_static_files_types_ranges_and_conditional_get(tmp_path):
    (tmp_path / "index.html").write_text("<h1>hi</h1>")
    (tmp_path / "data.txt").write_text("0123456789")
    (tmp_path / "sub").mkdir()

    async def main():
        server, port = await serve(Site(root=str(tmp_path)))
        r = {}
        r["index"] = await exchange(port, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        r["dir"] = await exchange(port, b"GET /sub/ HTTP/1.1\r\nConnection: close\r\n\r\n")
        r["escape"] = await exchange(port, b"GET /../../etc/passwd HTTP/1.1\r\n"
                                           b"Connection: close\r\n\r\n")
        r["range"] = await exchange(port, b"GET /data.txt HTTP/1.1\r\nRange: bytes=2-4\r\n"
                                          b"Connection: close\r\n\r\n")
        r["416"] = await exchange(port, b"GET /data.txt HTTP/1.1\r\nRange: bytes=50-60\r\n"
                                        b"Connection: close\r\n\r\n")
        first = await exchange(port, b"GET /data.txt HTTP/1.1\r\nConnection: close\r\n\r\n")
        etag = next(ln.split(b": ", 1)[1] for ln in first.split(b"\r\n")
                    if ln.lower().startswith(b"etag:"))
        r["etag"] = await exchange(port, b"GET /data.txt HTTP/1.1\r\nIf-None-Match: " + etag
                                   + b"\r\nConnection: close\r\n\r\n")
        server.close()
        return r

    r = run(main())
    assert r["index"].startswith(b"HTTP/1.1 200") and b"text/html" in r["index"]
    assert r["index"].endswith(b"<h1>hi</h1>")
    assert r["dir"].startswith(b"HTTP/1.1 404")  # no index.html there, no listing
    assert r["escape"].startswith(b"HTTP/1.1 404")
    assert r["range"].startswith(b"HTTP/1.1 206") and r["range"].endswith(b"234")
    assert b"content-range: bytes 2-4/10" in r["range"]
    assert r["416"].startswith(b"HTTP/1.1 416")
    assert r["etag"].startswith(b"HTTP/1.1 304")


def test_idle_keepalive_connections_are_closed():
    async def main():
        server, port = await serve(Site(), Limits(keepalive_timeout=0.3))
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /bytes/1 HTTP/1.1\r\nHost: x\r\n\r\n")
        data = await asyncio.wait_for(reader.read(), 3)  # returns once the server closes
        writer.close()
        reader2, writer2 = await asyncio.open_connection("127.0.0.1", port)
        writer2.write(b"GET /bytes/1 HTTP/1.1\r\n")  # a slow client: headers never end
        slow = await asyncio.wait_for(reader2.read(), 3)
        writer2.close()
        server.close()
        return data, slow

    data, slow = run(main())
    assert data.startswith(b"HTTP/1.1 200") and data.endswith(b"\x00")
    assert slow.startswith(b"HTTP/1.1 408")


def test_a_starlette_app_serves_json():
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def hello(request):
        return JSONResponse({"hello": request.path_params["name"],
                             "client": request.client.host})

    app = Starlette(routes=[Route("/hello/{name}", hello)])

    async def main():
        server, port = await serve(app)
        data = await exchange(port, b"GET /hello/net HTTP/1.1\r\nHost: x\r\n"
                                    b"Connection: close\r\n\r\n")
        server.close()
        return data

    data = run(main())
    assert data.startswith(b"HTTP/1.1 200")
    assert json.loads(data.split(b"\r\n\r\n", 1)[1]) == {"hello": "net", "client": "127.0.0.1"}
