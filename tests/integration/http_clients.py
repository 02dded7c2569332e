"""HTTP/1.1 keep-alive clients for the worker tests, run inside a namespace:

    python -m tests.integration.http_clients concurrent HOST N REQUESTS
        N connections open at once (each has made one request before any makes its
        second), REQUESTS requests on each; prints one JSON line.
    python -m tests.integration.http_clients hold HOST N
        N connections, one request each; prints their local ports as JSON, waits for a
        line on stdin, makes one more request on each, prints which answered.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys


async def get(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
              path: str = "/bytes/2000") -> bool:
    writer.write(f"GET {path} HTTP/1.1\r\nHost: bob\r\n\r\n".encode())
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 20)
    length = int(re.search(rb"content-length: *(\d+)", head, re.I).group(1))
    body = await asyncio.wait_for(reader.readexactly(length), 20)
    return head.split(b" ", 2)[1] == b"200" and len(body) == length


async def concurrent(host: str, n: int, requests: int) -> dict:
    opened = 0
    all_open = asyncio.Event()

    async def one() -> tuple[int, int]:
        nonlocal opened
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, 80), 20)
        port = writer.get_extra_info("sockname")[1]
        ok = int(await get(reader, writer))
        opened += 1
        if opened == n:
            all_open.set()
        await asyncio.wait_for(all_open.wait(), 30)  # all N are open at this moment
        for _ in range(requests - 1):
            ok += await get(reader, writer)
        writer.close()
        return port, ok

    results = await asyncio.gather(*(one() for _ in range(n)), return_exceptions=True)
    done = [r for r in results if isinstance(r, tuple)]
    errors = sorted({f"{type(r).__name__}: {r}" for r in results if not isinstance(r, tuple)})
    return {"ports": [p for p, _ in done], "ok": sum(ok for _, ok in done),
            "all_open": all_open.is_set(), "errors": errors}


async def hold(host: str, n: int) -> None:
    conns = []
    for _ in range(n):
        reader, writer = await asyncio.open_connection(host, 80)
        assert await get(reader, writer)
        conns.append((writer.get_extra_info("sockname")[1], reader, writer))
    print(json.dumps({"ports": [p for p, _, _ in conns]}), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    answered = {}
    for port, reader, writer in conns:
        try:
            answered[port] = await get(reader, writer)
        except (TimeoutError, OSError, asyncio.IncompleteReadError, AttributeError):
            answered[port] = False
    print(json.dumps({"answered": answered}), flush=True)


def main() -> None:
    mode, host, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if mode == "concurrent":
        print(json.dumps(asyncio.run(concurrent(host, n, int(sys.argv[4])))), flush=True)
    else:
        asyncio.run(hold(host, n))


if __name__ == "__main__":
    main()
