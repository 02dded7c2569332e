"""The only module that knows the event loop: a thin adapter around the sans-I/O core.

One reader on the TAP fd drains every ready frame per wakeup, feeds them all to the
interface, then flushes everything the interface wants to send. One timer handle sits at
the interface's next deadline; an idle stack has no timer and uses no CPU.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import signal
import socket
import time
from collections.abc import Callable
from typing import Any

from stack.link import LinkError
from stack.link.pcap import PcapTee
from stack.link.tap import TapLink
from stack.net.interface import Interface

log = logging.getLogger("tapstack")


def control_address(tap: str) -> str:
    """The control socket's name: abstract, so it lives in the stack's network namespace
    (two namespaces may each run a tapstack on tap0) and vanishes with the process."""
    return f"\0tapstack/{tap}"


def bind_control_socket(tap: str, where: str) -> socket.socket:
    """Claim the control socket; a second instance on the same TAP fails here, clearly."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(control_address(tap))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise LinkError(f"another tapstack is already running on {tap} in {where}") from None
        raise
    sock.listen(16)
    sock.setblocking(False)
    return sock


class Runtime:
    def __init__(self, iface: Interface, link: TapLink, pcap: PcapTee | None = None,
                 info: dict[str, Any] | None = None) -> None:
        self.iface = iface
        self.link = link
        self.pcap = pcap
        self.info = dict(info or {})
        self.loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._started = time.time()
        self._stopped: asyncio.Event | None = None

    # -- the frame path ------------------------------------------------------------------

    def _on_readable(self) -> None:
        frames = self.link.read_batch()
        now = self.loop.time()
        if self.pcap is not None:
            ts = time.time()
            for frame in frames:
                self.pcap.write(frame, ts)
        receive = self.iface.receive
        for frame in frames:
            receive(frame, now)
        self._flush(now)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        self._flush(self.loop.time())

    def _flush(self, now: float) -> None:
        out = self.iface.poll(now)
        if out:
            write = self.link.write
            for frame in out:
                write(frame)
            if self.pcap is not None:
                ts = time.time()
                for frame in out:
                    self.pcap.write(frame, ts)
                self.pcap.flush()
        elif self.pcap is not None:
            self.pcap.flush()
        deadline = self.iface.next_deadline()
        if deadline != self._timer_at:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = (self.loop.call_at(deadline, self._on_timer)
                           if deadline is not None else None)
            self._timer_at = deadline

    # -- control socket ------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        counters = self.iface.stats()
        counters.setdefault("link", {})["tx_errors"] = self.link.tx_errors
        return {
            "info": {**self.info, "uptime_s": round(time.time() - self._started, 3)},
            "counters": counters,
            "last_internal_error": self.iface.last_internal_error,
        }

    async def _serve_control(self, reader: asyncio.StreamReader,
                             writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            writer.write(json.dumps(self.snapshot()).encode() + b"\n")
            await writer.drain()
        writer.close()

    # -- lifecycle -----------------------------------------------------------------------

    async def serve(self, control: socket.socket | None,
                    on_ready: Callable[[], None] | None = None) -> None:
        """Run until SIGINT/SIGTERM."""
        self.loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.loop.add_signal_handler(sig, self._stopped.set)
        server = None
        if control is not None:
            server = await asyncio.start_unix_server(self._serve_control, sock=control)
        self.loop.add_reader(self.link.fileno(), self._on_readable)
        now = self.loop.time()
        self.iface.start(now)
        self._flush(now)
        if on_ready is not None:
            on_ready()
        try:
            await self._stopped.wait()
        finally:
            log.info("stopping")
            self.loop.remove_reader(self.link.fileno())
            if self._timer is not None:
                self._timer.cancel()
            if server is not None:
                server.close()
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.loop.remove_signal_handler(sig)


def run(runtime: Runtime, control: socket.socket | None,
        on_ready: Callable[[], None] | None = None, use_uvloop: bool = True) -> None:
    if use_uvloop:
        import uvloop

        uvloop.run(runtime.serve(control, on_ready))
    else:
        asyncio.run(runtime.serve(control, on_ready))


def read_stats(tap: str, timeout: float = 3.0) -> dict[str, Any]:
    """Fetch a running instance's snapshot over its control socket (current namespace)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(control_address(tap))
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return json.loads(b"".join(chunks))
