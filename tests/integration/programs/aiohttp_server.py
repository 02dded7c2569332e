"""aiohttp's web server, unmodified, on the tapstack loop: port 8000 of the stack."""

import asyncio
import sys

from aiohttp import web

import stack


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
    print(f"ready {site.name}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


if __name__ == "__main__":
    stack.run(main(), netns=sys.argv[1])  # until SIGTERM
