"""aiohttp's web server (HTTP on 8000, HTTPS on 8443 with a lab certificate) and the
websockets library's server (8765), unmodified, on the tapstack loop."""

import asyncio
import sys

import websockets
from aiohttp import web

import stack
from stack.certs import LabCA, ServerCert, server_context


async def main() -> None:
    async def hello(request: web.Request) -> web.Response:
        peer = request.transport.get_extra_info("peername")
        return web.Response(text=f"aiohttp on tapstack, you are {peer[0]}\n")

    app = web.Application()
    app.router.add_get("/hello", hello)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, port=8000)
    await site.start()
    tls = server_context([ServerCert(*LabCA().issue(["10.77.0.2"]), [])])
    await web.TCPSite(runner, port=8443, ssl_context=tls).start()

    async def echo(ws) -> None:
        async for message in ws:
            await ws.send(f"tapstack echo: {message}")

    async with websockets.serve(echo, port=8765):
        print(f"ready {site.name}", flush=True)
        try:
            await asyncio.Event().wait()
        finally:
            await runner.cleanup()


if __name__ == "__main__":
    stack.run(main(), netns=sys.argv[1])  # until SIGTERM
