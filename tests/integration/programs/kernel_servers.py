"""Servers on the kernel's sockets, inside a namespace: HTTP (8081), HTTPS (8443, a
certificate from a lab CA in $TAPSTACK_STATE), a websockets echo (8765) and a DNS server
(UDP 53) that knows one name, dns.test. Prints 'ready' once all listen; runs until
SIGTERM."""

import asyncio
import signal
import ssl
import sys

import dns.message
import dns.rrset
import websockets
from aiohttp import web

from stack.certs import LabCA, ServerCert, server_context


async def main() -> None:
    ca = LabCA()
    cert, key = ca.issue(["kernel.test", "10.77.0.1"])
    tls = server_context([ServerCert(cert, key, [])])

    async def hello(request: web.Request) -> web.Response:
        return web.Response(text=f"kernel says hello to {request.remote} over "
                                 f"{request.scheme}\n")

    app = web.Application()
    app.router.add_get("/", hello)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "0.0.0.0", 8081).start()
    await web.TCPSite(runner, "0.0.0.0", 8443, ssl_context=tls).start()

    async def echo(ws) -> None:
        async for message in ws:
            await ws.send(f"echo: {message}")

    class Dns(asyncio.DatagramProtocol):
        def connection_made(self, transport):
            self.transport = transport

        def datagram_received(self, data, addr):
            query = dns.message.from_wire(data)
            answer = dns.message.make_response(query)
            question = query.question[0]
            if question.name.to_text().lower() == "dns.test.":  # resolvers vary the case
                answer.answer.append(dns.rrset.from_text(question.name, 60, "IN", "A",
                                                         "10.77.0.1"))
            self.transport.sendto(answer.to_wire(), addr)

    await asyncio.get_running_loop().create_datagram_endpoint(Dns, ("0.0.0.0", 53))
    async with websockets.serve(echo, "0.0.0.0", 8765):
        print("ready", flush=True)
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
    await runner.cleanup()


if __name__ == "__main__":
    assert isinstance(ssl.OPENSSL_VERSION, str)
    asyncio.run(main())
    sys.exit(0)
