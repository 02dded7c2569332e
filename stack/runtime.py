"""The only module that knows the event loop: a thin adapter around the sans-I/O core.

One reader on the TAP fd drains every ready frame per wakeup, feeds them all to the
interface, then flushes everything the interface wants to send. One timer handle sits at
the interface's next deadline; an idle stack has no timer and uses no CPU.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import gc
import json
import logging
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

from stack.link import LinkError
from stack.link.impair import Impairment
from stack.link.pcap import PcapTee
from stack.link.tap import TapLink
from stack.net.interface import Interface

log = logging.getLogger("tapstack")

try:  # glibc: return free heap pages to the system (absent elsewhere: then only gc)
    _malloc_trim = ctypes.CDLL(None).malloc_trim
except (OSError, AttributeError):
    _malloc_trim = None


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
                 info: dict[str, Any] | None = None, impair: str | None = None,
                 seed: int | None = None) -> None:
        self.iface = iface
        self.link = link
        self.pcap = pcap
        self.info = dict(info or {})
        self.loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._kick_pending = False
        self._had_connections = False  # since the last memory trim
        self._trim_handle: asyncio.TimerHandle | None = None
        self._started = time.time()
        self._stopped: asyncio.Event | None = None
        # Faults on both directions of the link (--impair): the kernel peer really sees
        # delay, reordering, duplication and corruption. The pcap shows the clean frames
        # tapstack received and sent, i.e. what it saw, after the fault on input.
        self.rx_impair: Impairment | None = None
        self.tx_impair: Impairment | None = None
        if impair:
            spec_seed = f",seed={seed}" if seed is not None and "seed=" not in impair else ""
            self.rx_impair = Impairment.parse(impair + spec_seed, counters=iface.counters,
                                              prefix="impair_rx")
            tx_seed = self.rx_impair.rng.randrange(1 << 30)
            self.tx_impair = Impairment.parse(impair, counters=iface.counters,
                                              prefix="impair_tx")
            self.tx_impair.rng.seed(tx_seed)

    # -- the frame path ------------------------------------------------------------------

    def _on_readable(self) -> None:
        frames = self.link.read_batch()
        now = self.loop.time()
        if self.link.vnet_hdr:
            self._receive_offloaded(frames, now)
            return
        if self.rx_impair is not None:
            for frame in frames:
                self.rx_impair.push(frame, now)
            frames = self.rx_impair.pop_due(now)
        if self.pcap is not None:
            ts = time.time()
            for frame in frames:
                self.pcap.write(frame, ts)
        receive = self.iface.receive
        for frame in frames:
            receive(frame, now)
        self._flush(now)

    def _receive_offloaded(self, frames: list[bytes], now: float) -> None:
        """Frames led by a virtio-net header; GSO super-frames come whole (offloads.md)."""
        receive = self.iface.receive
        split = self.link.split
        pcap = self.pcap
        ts = time.time()
        for raw in frames:
            frame, trusted = split(raw)
            if pcap is not None:
                pcap.write(bytes(frame), ts)
            receive(frame, now, trusted)
        self._flush(now)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        now = self.loop.time()
        if self.rx_impair is not None:
            receive = self.iface.receive
            for frame in self.rx_impair.pop_due(now):
                if self.pcap is not None:
                    self.pcap.write(frame)
                receive(frame, now)
        self._flush(now)

    def _trim_memory(self) -> None:
        """The connection table emptied: collect cycles and give freed heap back to the
        system, so a burst of connections does not leave the process at its peak."""
        self._trim_handle = None
        if self.iface.tcp.connections:
            return
        self._had_connections = False
        gc.collect()
        if _malloc_trim is not None:
            _malloc_trim(0)

    def kick(self) -> None:
        """The application wrote or closed: flush once, after the current callback."""
        if not self._kick_pending:
            self._kick_pending = True
            self.loop.call_soon(self._on_kick)

    def _on_kick(self) -> None:
        self._kick_pending = False
        self._flush(self.loop.time())

    def _flush(self, now: float) -> None:
        out = self.iface.poll(now)
        if self.tx_impair is not None:
            if self.pcap is not None:
                for frame in out:
                    self.pcap.write(frame)
            for frame in out:
                self.tx_impair.push(frame, now)
            for frame in self.tx_impair.pop_due(now):
                self.link.write(frame)
            out = []
        if out:
            write = self.link.write
            for frame in out:
                if type(frame) is tuple:
                    write(frame[0], frame[1])  # with its virtio-net header (offload)
                else:
                    write(frame)
            if self.pcap is not None:
                ts = time.time()
                for frame in out:
                    self.pcap.write(frame[0] if type(frame) is tuple else frame, ts)
                self.pcap.flush()
        elif self.pcap is not None:
            self.pcap.flush()
        if self.iface.tcp.connections:
            self._had_connections = True
        elif self._had_connections and self._trim_handle is None:
            self._trim_handle = self.loop.call_later(2.0, self._trim_memory)
        deadline = self.iface.next_deadline()
        for imp in (self.rx_impair, self.tx_impair):
            if imp is not None and (d := imp.next_deadline()) is not None:
                deadline = d if deadline is None else min(deadline, d)
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

    def attach(self) -> None:
        """Start reading the link and announce ourselves (the loop must be running)."""
        self.loop = asyncio.get_running_loop()
        self.loop.add_reader(self.link.fileno(), self._on_readable)
        now = self.loop.time()
        self.iface.start(now)
        self._flush(now)

    def detach(self) -> None:
        """Reset every open connection (RFC 9293 ABORT), send that, stop reading."""
        self.iface.tcp.abort_all()
        self._flush(self.loop.time())
        self.loop.remove_reader(self.link.fileno())
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
            self._timer_at = None

    def stop(self) -> None:
        if self._stopped is not None:
            self._stopped.set()

    async def serve(self, control: socket.socket | None,
                    on_ready: Callable[[], None] | None = None,
                    setup: Callable[[Runtime], Awaitable[None]] | None = None) -> None:
        """Run until SIGINT/SIGTERM (or stop())."""
        self.loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.loop.add_signal_handler(sig, self._stopped.set)
        server = None
        if control is not None:
            server = await asyncio.start_unix_server(self._serve_control, sock=control)
        self.attach()
        if setup is not None:
            await setup(self)
        if on_ready is not None:
            on_ready()
        try:
            await self._stopped.wait()
        finally:
            log.info("stopping")
            self.detach()
            if server is not None:
                server.close()
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.loop.remove_signal_handler(sig)


def run(runtime: Runtime, control: socket.socket | None,
        on_ready: Callable[[], None] | None = None, use_uvloop: bool = True,
        setup: Callable[[Runtime], Awaitable[None]] | None = None) -> None:
    if use_uvloop:
        import uvloop

        uvloop.run(runtime.serve(control, on_ready, setup))
    else:
        asyncio.run(runtime.serve(control, on_ready, setup))


def read_stats(tap: str, timeout: float = 3.0) -> dict[str, Any]:
    """Fetch a running instance's snapshot over its control socket (current namespace)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(control_address(tap))
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return json.loads(b"".join(chunks))
