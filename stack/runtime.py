"""The only module that knows the event loop: a thin adapter around the sans-I/O core.

One reader per link (a TAP per interface) drains every ready frame per wakeup, feeds
them all to the node, then flushes everything the node wants to send, each frame to the
link of its interface. One timer handle sits at the node's next deadline; an idle stack
has no timer and uses no CPU.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import gc
import inspect
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
from stack.net.node import Node, RouteConfig
from stack.net.tcp.info import tcp_info
from stack.trace import TraceBuffer, describe_frame, matches
from stack.wire.ipv4 import ip_from_str, ip_to_str
from stack.wire.virtio import as_captured

log = logging.getLogger("tapstack")

try:  # glibc: return free heap pages to the system (absent elsewhere: then only gc)
    _malloc_trim = ctypes.CDLL(None).malloc_trim
except (OSError, AttributeError):
    _malloc_trim = None


def control_address(name: str) -> str:
    """The control socket's name: abstract, so it lives in the stack's network namespace
    (two namespaces may each run a tapstack on tap0) and vanishes with the process.
    `name` is the TAP of a one-interface stack, or `node/NAME` for a configured node."""
    return f"\0tapstack/{name}"


def running_instances() -> list[str]:
    """The control socket names of the tapstacks in this process's current namespace
    (abstract unix sockets are listed per namespace in /proc/self/net/unix)."""
    names = []
    try:
        with open("/proc/self/net/unix") as f:
            for line in f:
                path = line.split()[-1] if len(line.split()) >= 8 else ""
                if path.startswith("@tapstack/"):
                    names.append(path.removeprefix("@tapstack/"))
    except OSError:
        return []
    return sorted(set(names))


def bind_control_socket(name: str, where: str) -> socket.socket:
    """Claim the control socket; a second instance on the same TAP fails here, clearly."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(control_address(name))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            what = name.removeprefix("node/")
            raise LinkError(f"another tapstack is already running on {what} in {where}"
                            ) from None
        raise
    sock.listen(16)
    sock.setblocking(False)
    return sock


Link = Any  # TapLink or SocketPairLink: fileno, read_batch, write, split, vnet_hdr


async def serve_control_connection(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
        answer: Callable[[dict[str, Any]], Any],
        stream_trace: Callable[..., Awaitable[None]]) -> None:
    """One connection to a control socket: a JSON request line, then one JSON answer
    (`answer` may be a coroutine function), or the trace as a stream of lines."""
    with contextlib.suppress(ConnectionError, asyncio.TimeoutError):
        line = await asyncio.wait_for(reader.readline(), 2.0)
        try:
            request = json.loads(line) if line.strip() else {}
        except ValueError:
            request = {"cmd": "?"}
        if not isinstance(request, dict):
            request = {"cmd": "?"}
        if request.get("cmd") == "trace":
            await stream_trace(request, reader, writer)
        else:
            reply = answer(request)
            if inspect.isawaitable(reply):
                reply = await reply
            writer.write(json.dumps(reply).encode() + b"\n")
            await writer.drain()
    writer.close()


class Runtime:
    """Drives one node: `links[i]` carries the frames of the node's interface i (and
    `pcaps[i]`, if set, records them)."""

    def __init__(self, node: Node, links: list[Link] | Link,
                 pcaps: list[PcapTee | None] | PcapTee | None = None,
                 info: dict[str, Any] | None = None, impair: str | None = None,
                 seed: int | None = None) -> None:
        self.node = node
        self.links: list[Link] = links if isinstance(links, list) else [links]
        if not isinstance(pcaps, list):
            pcaps = [pcaps] + [None] * (len(self.links) - 1)
        self.pcaps: list[PcapTee | None] = pcaps
        if len(self.links) != len(node.interfaces) or len(pcaps) != len(self.links):
            raise ValueError("one link (and one pcap slot) per interface")
        self.info = dict(info or {})
        # counters of the applications on this node (name -> a function giving them)
        self.app_counters: dict[str, Callable[[], dict[str, int]]] = {}
        # control requests the applications answer (name -> a function of the request)
        self.app_commands: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {}
        self.loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._kick_pending = False  # the application wrote since the last flush
        self._kick_scheduled = False  # an _on_kick is waiting in the loop
        self._had_connections = False  # since the last memory trim
        self._trim_handle: asyncio.TimerHandle | None = None
        self._started = time.time()
        self._stopped: asyncio.Event | None = None
        # Faults on both directions of every link (--impair): the kernel peer really sees
        # delay, reordering, duplication and corruption. The pcap shows the clean frames
        # tapstack received and sent, i.e. what it saw, after the fault on input.
        n = len(self.links)
        self.rx_impair: list[Impairment | None] = [None] * n
        self.tx_impair: list[Impairment | None] = [None] * n
        if impair:
            spec_seed = f",seed={seed}" if seed is not None and "seed=" not in impair else ""
            for i in range(n):
                rx = Impairment.parse(impair + spec_seed, counters=node.counters,
                                      prefix="impair_rx")
                if i:
                    rx.rng.seed(self.rx_impair[0].rng.randrange(1 << 30) + i)
                tx = Impairment.parse(impair, counters=node.counters, prefix="impair_tx")
                tx.rng.seed(rx.rng.randrange(1 << 30))
                self.rx_impair[i], self.tx_impair[i] = rx, tx
        self._impaired = [imp for imp in self.rx_impair + self.tx_impair if imp is not None]
        self._trace_files: list[Any] = []

    # -- the frame path ------------------------------------------------------------------

    def _on_readable(self, index: int) -> None:
        link = self.links[index]
        frames = link.read_batch()
        now = self.loop.time()
        if link.vnet_hdr:
            self._receive_offloaded(index, link, frames, now)
            return
        rx = self.rx_impair[index]
        if rx is not None:
            for frame in frames:
                rx.push(frame, now)
            frames = rx.pop_due(now)
        pcap = self.pcaps[index]
        if self.node.trace.on:
            self._receive_traced(index, frames, now)
            return
        if pcap is not None:
            ts = time.time()
            for frame in frames:
                pcap.write(frame, ts)
        receive = self.node.receive
        for frame in frames:
            receive(index, frame, now)
        self._flush(now)

    def _receive_traced(self, index: int, frames: list, now: float,
                        trusted: list[bool] | None = None, vnets: list | None = None) -> None:
        """The same, with a `link rx` event per frame; the decisions it causes carry its
        pcap frame number."""
        trace = self.node.trace
        pcap = self.pcaps[index]
        name = self.node.interfaces[index].name
        ts = time.time()
        for i, frame in enumerate(frames):
            if pcap is not None:
                pcap.write(bytes(as_captured(frame, vnets[i] if vnets else None)), ts)
                trace.frame = pcap.count
            trace.emit("link", "rx", now, iface=name, **describe_frame(frame))
            self.node.receive(index, frame, now, trusted[i] if trusted else False,
                              vnets[i] if vnets else None)
        trace.frame = None
        self._flush(now)

    def _receive_offloaded(self, index: int, link: Link, frames: list[bytes],
                           now: float) -> None:
        """Frames led by a virtio-net header; GSO super-frames come whole (see
        docs/architecture.md, "Offloads")."""
        receive = self.node.receive
        split = link.split
        pcap = self.pcaps[index]
        ts = time.time()
        if self.node.trace.on:
            parts = [split(raw) for raw in frames]
            self._receive_traced(index, [p[1] for p in parts], now,
                                 [p[2] for p in parts], [p[0] for p in parts])
            return
        for raw in frames:
            vnet, frame, trusted = split(raw)
            if pcap is not None:  # with the checksum the kernel left partial finished
                pcap.write(bytes(as_captured(frame, vnet)), ts)
            receive(index, frame, now, trusted, vnet)
        self._flush(now)

    def _trace_out(self, iface: Any, out: list, now: float) -> None:
        """`link tx` events for what is about to leave, numbered as the pcap will number
        it (frames go to the pcap in this order, below)."""
        pcap = self.pcaps[iface.index]
        count = pcap.count if pcap is not None else None
        trace = self.node.trace
        for frame in out:
            if count is not None:
                count += 1
                trace.frame = count
            trace.emit("link", "tx", now, iface=iface.name,
                       **describe_frame(frame[0] if type(frame) is tuple else frame))
        trace.frame = None

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        now = self.loop.time()
        receive = self.node.receive
        for index, rx in enumerate(self.rx_impair):
            if rx is None:
                continue
            if self.node.trace.on:
                self._receive_traced(index, rx.pop_due(now), now)
                continue
            pcap = self.pcaps[index]
            for frame in rx.pop_due(now):
                if pcap is not None:
                    pcap.write(frame)
                receive(index, frame, now)
        self._flush(now)

    def _trim_memory(self) -> None:
        """The connection table emptied: collect cycles and give freed heap back to the
        system, so a burst of connections does not leave the process at its peak."""
        self._trim_handle = None
        if self.node.tcp.connections:
            return
        self._had_connections = False
        gc.collect()
        if _malloc_trim is not None:
            _malloc_trim(0)

    def kick(self) -> None:
        """The application wrote or closed: flush once, after the current callback.
        A flush that happens first (the application wrote while taking in a batch,
        which is flushed at its end) clears the kick: one flush per wakeup."""
        if not self._kick_pending:
            self._kick_pending = True
            if not self._kick_scheduled:
                self._kick_scheduled = True
                self.loop.call_soon(self._on_kick)

    def _on_kick(self) -> None:
        self._kick_scheduled = False
        if self._kick_pending:
            self._flush(self.loop.time())

    def flush_now(self) -> None:
        """Send what the node has to send (after input that came another way: a worker's
        hand-over, stack/workers.py)."""
        self._flush(self.loop.time())

    def _flush(self, now: float) -> None:
        self._kick_pending = False  # what the application wrote goes out now
        trace = self.node.trace
        for iface, out in self.node.poll(now):
            index = iface.index
            if trace.on:
                self._trace_out(iface, out, now)
            link = self.links[index]
            pcap = self.pcaps[index]
            tx = self.tx_impair[index]
            if tx is not None:
                if pcap is not None:
                    for frame in out:
                        pcap.write(frame)
                for frame in out:
                    tx.push(frame, now)
                out = []
            write = link.write
            for frame in out:
                if type(frame) is tuple:
                    write(frame[0], frame[1])  # with its virtio-net header (offload)
                else:
                    write(frame)
            if pcap is not None:
                ts = time.time()
                for frame in out:  # offloaded: as the kernel will finish it
                    pcap.write(as_captured(*frame) if type(frame) is tuple else frame, ts)
        for index, tx in enumerate(self.tx_impair):
            if tx is not None:
                write = self.links[index].write
                for frame in tx.pop_due(now):
                    write(frame)
        for pcap in self.pcaps:
            if pcap is not None:
                pcap.flush()
        for f, _ in self._trace_files:
            f.flush()
        if self.node.tcp.connections:
            self._had_connections = True
        elif self._had_connections and self._trim_handle is None:
            self._trim_handle = self.loop.call_later(2.0, self._trim_memory)
        deadline = self.node.next_deadline()
        for imp in self._impaired:
            if (d := imp.next_deadline()) is not None:
                deadline = d if deadline is None else min(deadline, d)
        # The loop's timer moves only when the deadline comes earlier: a later one (an
        # RTO pushed back by every ACK) lets the armed timer fire early, find nothing
        # due, and arm the next; that costs one wakeup per timer period instead of a
        # cancel and a new timer per batch.
        if deadline is not None and (self._timer_at is None or deadline < self._timer_at):
            if self._timer is not None:
                self._timer.cancel()
            self._timer = self.loop.call_at(deadline, self._on_timer)
            self._timer_at = deadline

    # -- control socket ------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        node = self.node
        counters = node.stats()
        counters.setdefault("link", {})["tx_errors"] = sum(link.tx_errors
                                                           for link in self.links)
        for name, read in self.app_counters.items():
            counters[name] = dict(sorted(read().items()))
        interfaces = {}
        for iface, link, per in zip(node.interfaces, self.links,
                                    node.interface_stats().values(), strict=True):
            per.setdefault("link", {})["tx_errors"] = link.tx_errors
            interfaces[iface.name] = {
                "index": iface.index, "mac": ":".join(f"{b:02x}" for b in iface.mac),
                "mtu": iface.mtu, "device": getattr(link, "name", None),
                "addresses": [f"{ip_to_str(a)}/{p}" for a, p in iface.addresses],
                "counters": per,
            }
        routes = [{"prefix": r.prefix_str(),
                   "gateway": ip_to_str(r.gateway) if r.gateway else None,
                   "dev": node.interfaces[r.ifindex].name, "metric": r.metric,
                   "proto": r.proto, "src": ip_to_str(r.source) if r.source else None}
                  for r in node.routes.sorted_routes()]
        return {
            "info": {**self.info, "uptime_s": round(time.time() - self._started, 3),
                     "node": node.name, "forwarding": node.forwarding,
                     "tracing": len(node.trace.sinks)},  # who follows its trace
            "counters": counters,
            "interfaces": interfaces,
            "routes": routes,
            "last_internal_error": node.last_internal_error,
        }

    def answer(self, request: dict[str, Any]) -> dict[str, Any]:
        """One control request: {"cmd": "stats" | "conntrack" | "rules" | "rule", ...}."""
        cmd = request.get("cmd", "stats")
        if cmd == "stats":
            return self.snapshot()
        if cmd == "conns":
            return self.connections()
        if cmd in self.app_commands:
            return self.app_commands[cmd](request)
        if cmd == "route":
            return self._change_route(request)
        box = self.node.middlebox
        if cmd in ("conntrack", "rules", "rule") and box is None:
            return {"error": f"node {self.node.name} tracks no connections and has no NAT "
                             "or filters (see [nat], [[acl]], [[security_group]])"}
        if cmd == "conntrack":
            return {"flows": box.describe_flows(self.loop.time()),
                    "entries": box.conntrack.count,
                    "max_entries": box.conntrack.config.max_entries}
        if cmd == "rules":
            return box.describe_rules()
        if cmd == "rule":
            try:
                return {"done": box.change_rule(request)}
            except (ValueError, TypeError) as exc:
                return {"error": str(exc)}
        return {"error": f"unknown request {cmd!r}"}

    def _change_route(self, request: dict[str, Any]) -> dict[str, Any]:
        """{"cmd": "route", "op": "add" | "del", "to": PREFIX, "via": GW, "dev": IF,
        "metric": N}: change the routing table at run time, as `ip route` does."""
        op, to = request.get("op"), str(request.get("to"))
        try:
            if op == "del":
                via = request.get("via")
                gone = self.node.remove_route(to, request.get("metric"),
                                              ip_from_str(via) if via else None)
                how = f"via {ip_to_str(gone.gateway)}" if gone.gateway else "on-link"
                return {"done": f"deleted route {gone.prefix_str()} {how} metric "
                                f"{gone.metric}"}
            if op == "add":
                via = request.get("via")
                route = self.node.add_route(RouteConfig(
                    to, ip_from_str(via) if via else None, request.get("dev"),
                    int(request.get("metric") or 0)))
                how = f"via {via}" if via else "on-link"
                return {"done": f"added route {route.prefix_str()} {how} dev "
                                f"{self.node.interfaces[route.ifindex].name}"}
        except (ValueError, TypeError) as exc:
            return {"error": str(exc)}
        return {"error": "a route request says add or del"}

    async def _serve_control(self, reader: asyncio.StreamReader,
                             writer: asyncio.StreamWriter) -> None:
        await serve_control_connection(reader, writer, self.answer, self._stream_trace)

    async def _stream_trace(self, request: dict[str, Any], reader: asyncio.StreamReader,
                            writer: asyncio.StreamWriter) -> None:
        """`tapstack trace`: events as JSON lines until the client goes away. A slow
        client loses events (counted in a {"dropped": N} line), never slows the stack."""
        layers = set(request.get("layers") or []) or None
        address, port = request.get("address"), request.get("port")
        buffer = TraceBuffer()
        ready = asyncio.Event()
        buffer.wakeup = ready.set

        def sink(event: dict[str, Any]) -> None:
            if matches(event, layers, address, port):
                buffer(event)

        trace = self.node.trace
        trace.subscribe(sink)
        gone = asyncio.ensure_future(reader.read())  # EOF: the client left
        try:
            writer.write(json.dumps({"tracing": self.node.name}).encode() + b"\n")
            while not gone.done():
                waiter = asyncio.ensure_future(ready.wait())
                await asyncio.wait({waiter, gone}, return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()
                ready.clear()
                lines = [json.dumps(e) for e in buffer.events]
                buffer.events.clear()
                if buffer.dropped:
                    lines.append(json.dumps({"dropped": buffer.dropped}))
                    buffer.dropped = 0
                if lines:
                    writer.write("\n".join(lines).encode() + b"\n")
                    await writer.drain()
        finally:
            trace.unsubscribe(sink)
            gone.cancel()

    def trace_to_file(self, path: str) -> None:
        """--trace FILE: every event from the start, as JSON lines."""
        f = open(path, "w", buffering=1 << 16)  # noqa: SIM115 - closed in detach()

        def sink(event: dict[str, Any]) -> None:
            f.write(json.dumps(event) + "\n")

        self._trace_files.append((f, sink))
        self.node.trace.subscribe(sink)

    def connections(self) -> dict[str, Any]:
        """`tapstack conns`: every connection like `ss -tin`, listeners, TIME-WAIT."""
        tcp = self.node.tcp
        rows = []
        for conn in list(tcp.connections.values()):
            info = tcp_info(conn)
            rows.append({"local": f"{ip_to_str(conn.local_ip)}:{conn.local_port}",
                         "remote": f"{ip_to_str(conn.remote_ip)}:{conn.remote_port}",
                         **info})
        for tw in list(tcp.time_wait.values()):  # what is left of active closes
            rows.append({"local": f"{ip_to_str(tw.local_ip)}:{tw.local_port}",
                         "remote": f"{ip_to_str(tw.remote_ip)}:{tw.remote_port}",
                         "state": tw.state_name,
                         "expires_in_s": round(max(tw.expires - tcp.now, 0.0), 1)})
        listeners = sorted([f"*:{port}" for port in tcp.listeners]
                           + [f"{ip_to_str(a)}:{p}" for a, p in tcp.bound_listeners])
        return {"connections": rows, "listeners": listeners}

    # -- lifecycle -----------------------------------------------------------------------

    def attach(self) -> None:
        """Start reading the link and announce ourselves (the loop must be running)."""
        self.loop = asyncio.get_running_loop()
        for index, link in enumerate(self.links):
            self.loop.add_reader(link.fileno(), self._on_readable, index)
        now = self.loop.time()
        self.node.start(now)
        self._flush(now)

    def detach(self) -> None:
        """Reset every open connection (RFC 9293 ABORT), send that, stop reading."""
        self.node.tcp.abort_all()
        self._flush(self.loop.time())
        for link in self.links:
            self.loop.remove_reader(link.fileno())
        for f, sink in self._trace_files:
            self.node.trace.unsubscribe(sink)  # later events (clean-ups) go nowhere
            f.close()
        self._trace_files.clear()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
            self._timer_at = None

    def stop(self) -> None:
        if self._stopped is not None:
            self._stopped.set()

    async def serve(self, control: socket.socket | None,
                    on_ready: Callable[[], None] | None = None,
                    setup: Callable[[Runtime], Awaitable[Any]] | None = None) -> None:
        """Run until SIGINT/SIGTERM (or stop()). `setup` may return a coroutine function
        to run before the stack goes down."""
        self.loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.loop.add_signal_handler(sig, self._stopped.set)
        server = None
        if control is not None:
            server = await asyncio.start_unix_server(self._serve_control, sock=control)
        self.attach()
        teardown = await setup(self) if setup is not None else None
        if on_ready is not None:
            on_ready()
        try:
            await self._stopped.wait()
        finally:
            log.info("stopping")
            if teardown is not None:  # e.g. the application's lifespan shutdown
                try:
                    await asyncio.wait_for(teardown(), 15)
                except Exception:
                    log.exception("stopping the services failed")
            self.detach()
            if server is not None:
                server.close()
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.loop.remove_signal_handler(sig)


def run(runtime: Runtime, control: socket.socket | None,
        on_ready: Callable[[], None] | None = None, use_uvloop: bool = True,
        setup: Callable[[Runtime], Awaitable[None]] | None = None,
        loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None) -> None:
    if loop_factory is None and use_uvloop:
        import uvloop

        loop_factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(runtime.serve(control, on_ready, setup))


def read_stats(name: str, timeout: float = 3.0) -> dict[str, Any]:
    """Fetch a running instance's snapshot over its control socket (current namespace)."""
    return control_request(name, {"cmd": "stats"}, timeout)


def control_request(name: str, request: dict[str, Any], timeout: float = 3.0
                    ) -> dict[str, Any]:
    """Ask a running instance (in the current namespace) one question."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(control_address(name))
        sock.sendall(json.dumps(request).encode() + b"\n")
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return json.loads(b"".join(chunks))


def stream_control(name: str, request: dict[str, Any]):
    """Ask a running instance for a stream (the trace): yields each JSON line it sends,
    until it closes or the caller stops iterating."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(3.0)
        sock.connect(control_address(name))
        sock.sendall(json.dumps(request).encode() + b"\n")
        sock.settimeout(None)
        with sock.makefile("rb") as lines:
            for line in lines:
                yield json.loads(line)
    finally:
        sock.close()
