"""The websockets client on the kernel's sockets (run inside a namespace): text, binary,
a big message, ping, and the server's close; prints one JSON object."""

import asyncio
import json
import sys

import websockets


async def main(url: str) -> dict:
    out = {}
    async with websockets.connect(url, subprotocols=["chat"], max_size=None) as ws:
        out["subprotocol"] = ws.subprotocol
        await ws.send("hello")
        out["text"] = await ws.recv()
        await ws.send(b"\x01\x02\x03")
        out["bytes"] = list(await ws.recv())
        big = bytes(range(256)) * 4096  # 1 MB, many frames' worth on the wire
        await ws.send(big)
        out["big_ok"] = (await ws.recv()) == big[::-1]
        pong = await ws.ping()
        await asyncio.wait_for(pong, 5)
        out["pong"] = True
        await ws.send("bye")
        try:
            await ws.recv()
        except websockets.ConnectionClosed as exc:
            out["close_code"] = exc.rcvd.code if exc.rcvd else None
            out["close_reason"] = exc.rcvd.reason if exc.rcvd else None
    try:
        async with websockets.connect(url.rsplit("/", 1)[0] + "/refuse"):
            out["refused"] = None
    except websockets.InvalidStatus as exc:
        out["refused"] = exc.response.status_code
    return out


if __name__ == "__main__":
    print(json.dumps(asyncio.run(asyncio.wait_for(main(sys.argv[1]), 30))))
