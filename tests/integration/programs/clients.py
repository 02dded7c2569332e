"""Unmodified client libraries on the tapstack loop: httpx (HTTP, HTTPS with a test CA,
a name from `hosts`, a name from DNS over tapstack's UDP), the websockets client,
asyncio streams with TLS from the start and by start_tls; a call that needs a kernel
socket, which must fail naming itself; and a UDP protocol whose callback raises once (the
application's error, not the stack's). Prints one JSON object."""

import asyncio
import json
import socket
import ssl
import sys

import dns.message
import httpx
import websockets

import stack


class Flaky(asyncio.DatagramProtocol):
    """Raises on the first datagram (the application's own bug), keeps the next."""

    def __init__(self) -> None:
        self.calls = 0
        self.got: asyncio.Future = asyncio.get_running_loop().create_future()

    def datagram_received(self, data: bytes, addr) -> None:
        self.calls += 1
        if self.calls == 1:
            raise ValueError("the application's own bug")
        if not self.got.done():
            self.got.set_result(data)


async def udp_with_a_bug(st, out: dict) -> None:
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda loop, context: out.setdefault(
        "udp_handler_saw", context["message"]))
    transport, proto = await loop.create_datagram_endpoint(
        Flaky, remote_addr=("10.77.0.1", 53))
    query = dns.message.make_query("dns.test", "A").to_wire()
    while not proto.got.done():
        transport.sendto(query)
        await asyncio.wait([proto.got], timeout=0.5)
    transport.close()
    loop.set_exception_handler(None)
    out["udp_answer"] = str(dns.message.from_wire(proto.got.result()).answer[0][0])
    counters = st.runtime.node.counters
    out["udp_app_errors"] = counters["udp.app_errors"]
    out["internal_errors"] = counters["stack.internal_errors"]


async def main(st, netns: str, ca: str) -> dict:
    loop = asyncio.get_running_loop()
    out = {"loop": type(loop).__name__}
    async with httpx.AsyncClient(timeout=10) as client:
        r = await client.get("http://10.77.0.1:8081/")
        out["http"] = r.text
        r = await client.get("http://kernel.test:8081/")
        out["http_by_name"] = r.text
        r = await client.get("http://dns.test:8081/")
        out["http_by_dns"] = r.text
    async with httpx.AsyncClient(timeout=10, verify=ssl.create_default_context(cafile=ca)
                                 ) as client:
        r = await client.get("https://kernel.test:8443/")
        out["https"] = r.text
    async with websockets.connect("ws://10.77.0.1:8765") as ws:
        await ws.send("over tapstack")
        out["websocket"] = await ws.recv()
    reader, writer = await asyncio.open_connection(
        "kernel.test", 8443, ssl=ssl.create_default_context(cafile=ca))
    writer.write(b"GET / HTTP/1.0\r\nHost: kernel.test\r\n\r\n")
    out["streams_tls"] = (await reader.read()).decode().splitlines()[0]
    out["streams_tls_version"] = writer.get_extra_info("ssl_object").version()
    writer.close()
    reader, writer = await asyncio.open_connection("kernel.test", 8443)
    await writer.start_tls(ssl.create_default_context(cafile=ca),
                           server_hostname="kernel.test")
    writer.write(b"GET / HTTP/1.0\r\nHost: kernel.test\r\n\r\n")
    out["start_tls"] = (await reader.read()).decode().splitlines()[-1]
    writer.close()
    sock = socket.socket()
    sock.setblocking(False)
    try:
        await loop.sock_connect(sock, ("10.77.0.1", 8081))
        out["sock_connect"] = "connected (should not)"
    except RuntimeError as exc:
        out["sock_connect"] = str(exc)
    finally:
        sock.close()
    await udp_with_a_bug(st, out)
    return out


if __name__ == "__main__":
    netns, ca = sys.argv[1], sys.argv[2]
    result = stack.run(lambda st: main(st, netns, ca), netns=netns,
                       hosts={"kernel.test": "10.77.0.1"}, nameserver="10.77.0.1")
    print(json.dumps(result), flush=True)
