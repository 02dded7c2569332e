"""One tapstack on every core: a multi-queue TAP, one worker process per queue.

`tapstack run --workers N` opens the TAP with IFF_MULTI_QUEUE, N times: each open is a
queue, and the kernel spreads the frames it sends among the queues. One process, the
supervisor, owns the namespace, the TAP and the control socket; it forks N workers, one
per queue, and restarts a worker that dies. Each worker is a whole tapstack (node,
runtime, services) reading and writing only its own queue.

Flows stay on one worker. Every flow has an owner, worked out from the packet alone:

- a flow whose local port is one of the ephemeral ports (an outgoing connection, a
  query the resolver sent) belongs to worker `port % N`; each worker picks its ephemeral
  ports among its own (the TCP and UDP layers' `reserved` rule skips the others);
- any other flow (a client connecting to our port 80) belongs to the worker a hash of
  its addresses and ports names.

The kernel picks the queue of a frame it sends by a hash of the flow, and remembers the
queue that last wrote each flow (the TAP's flow table, for a few seconds): once the
owner has answered, the flow's frames come to the owner. A datagram that comes to
another worker (a connection's first SYN, a flow silent for a while, fragments, ICMP
errors that quote a flow) is handed whole to its owner over a unix datagram socket,
after reassembly, before any transport sees it (`ipv4.steer`), and counted in
`worker.handoffs_out` (and `worker.handoffs_in` at the owner).

Per worker: connections, listeners (every worker listens on every port, as
SO_REUSEPORT does), ARP cache, PMTU cache, counters, the services' state (a resolver's
cache), a trace. Shared: the configuration (routes, addresses), ARP learning (every ARP
packet a worker takes in is handed to the others, which learn from it without answering
it), and `tapstack route` (the supervisor applies it in every worker). `tapstack
stats` sums the workers' counters, `tapstack conns` lists every worker's connections
with a `worker` column, `tapstack trace` merges their events, each tagged with its
worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import os
import signal
import socket
import struct
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

from stack.link import LinkError
from stack.net.ipv4 import rebuild_datagram
from stack.net.node import Node
from stack.net.packet import PacketInfo
from stack.net.tcp.layer import EPHEMERAL_HIGH, EPHEMERAL_LOW
from stack.runtime import serve_control_connection
from stack.wire.ipv4 import FLAG_DF, IPv4Header, ip_to_str

log = logging.getLogger("tapstack")

HANDOFF = struct.Struct("!BBB")  # kind, interface index, flags
TRUSTED, LINK_BROADCAST = 1, 2  # the flags: checksum vouched for, came in a broadcast frame
STOP_SIGNALS = {signal.SIGCHLD, signal.SIGTERM, signal.SIGINT}
# gauges every worker holds a copy of: shown once, not summed
REPLICATED = {"routes", "listeners", "endpoints", "cache_entries"}
KIND_IPV4, KIND_ARP = 0, 1
ICMP_ERRORS = (3, 4, 5, 11, 12)  # they quote a datagram of ours: its flow's owner
RESTARTS = 5  # a worker that dies more often than this in RESTART_WINDOW is given up on
RESTART_WINDOW = 30.0


def worker_address(name: str, index: int) -> str:
    """A worker's own control socket (abstract, in the node's namespace); not listed by
    `tapstack stats`, which asks the supervisor."""
    return f"\0tapstack-worker/{name}/{index}"


def owner_of(remote_ip: bytes, remote_port: int, local_port: int, count: int) -> int:
    """The worker that owns a flow (see the module's text)."""
    if EPHEMERAL_LOW <= local_port <= EPHEMERAL_HIGH:
        return local_port % count
    h = (int.from_bytes(remote_ip, "big") * 0x9E3779B1 + remote_port * 0x85EBCA6B
         + local_port) & 0xFFFFFFFF
    return ((h ^ (h >> 15)) * 0x2C1B3C6D & 0xFFFFFFFF) % count


class Steering:
    """A worker's side of the hand-over: who owns what arrives, and the inbox."""

    def __init__(self, node: Node, index: int, count: int, inbox: socket.socket,
                 peers: list[socket.socket]) -> None:
        self.node, self.index, self.count = node, index, count
        self.inbox, self.peers = inbox, peers
        c = node.counters
        c.declare("worker.handoffs_out", "worker.handoffs_in", "worker.handoff_drops",
                  "worker.arp_shared")
        self.counters = c

    def install(self) -> None:
        node = self.node
        node.ipv4.steer = self.steer
        node.ipv4.owns = node.tcp.owns = self.owns
        for iface in node.interfaces:
            iface.arp.share = (lambda data, i=iface.index: self._share_arp(i, data))
        node.tcp.reserved = node.udp.reserved = self._not_ours

    def owns(self, remote_ip: bytes, remote_port: int, local_port: int) -> bool:
        return owner_of(remote_ip, remote_port, local_port, self.count) == self.index

    def _not_ours(self, _protocol: int, _address: bytes, port: int) -> bool:
        """Ephemeral ports of the other workers: never picked here."""
        return port % self.count != self.index

    def owner(self, ip: IPv4Header, payload: memoryview) -> int:
        proto = ip.protocol
        if proto == 6 or proto == 17:
            if len(payload) < 4:
                return self.index  # the transport counts it malformed
            return owner_of(ip.src, payload[0] << 8 | payload[1],
                            payload[2] << 8 | payload[3], self.count)
        if proto == 1 and len(payload) >= 8 + 20 + 4 and payload[0] in ICMP_ERRORS:
            inner = payload[8:]  # the datagram we sent: we are its source
            ihl = (inner[0] & 0x0F) * 4
            first = not (inner[6] & 0x1F or inner[7])  # ports only in a first fragment
            if inner[9] in (6, 17) and ihl >= 20 and first and len(inner) >= ihl + 4:
                return owner_of(bytes(inner[16:20]), inner[ihl + 2] << 8 | inner[ihl + 3],
                                inner[ihl] << 8 | inner[ihl + 1], self.count)
        return self.index  # pings, and what no worker owns, are answered where they land

    def steer(self, ip: IPv4Header, header: memoryview, payload: memoryview,
              info: PacketInfo) -> bool:
        """IPv4's hook: False to take the datagram in here, True when it went to its
        owner."""
        owner = self.owner(ip, payload)
        if owner == self.index:
            return False
        if int.from_bytes(header[2:4], "big") == len(header) + len(payload) and \
                not int.from_bytes(header[6:8], "big") & 0x3FFF:
            datagram = bytes(header) + bytes(payload)
        else:  # reassembled here: one datagram again
            datagram = rebuild_datagram(bytes(header), bytes(payload),
                                        FLAG_DF if header[6] & 0x40 else 0)
        flags = (TRUSTED if info.trusted else 0) | \
            (LINK_BROADCAST if info.link_broadcast else 0)
        self._send(owner, HANDOFF.pack(KIND_IPV4, info.iface, flags) + datagram)
        self.counters["worker.handoffs_out"] += 1
        trace = self.node.trace
        if trace.on:
            fields = {"src": ip_to_str(ip.src), "dst": ip_to_str(ip.dst)}
            if ip.protocol in (6, 17) and len(payload) >= 4:
                fields.update(sport=payload[0] << 8 | payload[1],
                              dport=payload[2] << 8 | payload[3])
            if ip.protocol == 6 and len(payload) >= 14:
                fields["flags"] = payload[13]
            trace.emit("worker", "handoff", trace.now, to=owner, proto=ip.protocol,
                       **fields)
        return True

    def _share_arp(self, ifindex: int, data: bytes) -> None:
        message = HANDOFF.pack(KIND_ARP, ifindex, 0) + data
        for i in range(self.count):
            if i != self.index:
                self._send(i, message)
        self.counters["worker.arp_shared"] += 1

    def _send(self, worker: int, message: bytes) -> None:
        try:
            self.peers[worker].send(message)
        except OSError:  # its inbox is full, or it is being restarted: lost, as on a wire
            self.counters["worker.handoff_drops"] += 1

    def take_inbox(self, now: float) -> None:
        """What the other workers handed over, all of it."""
        node = self.node
        recv = self.inbox.recv
        while True:
            try:
                message = recv(1 << 17)
            except (BlockingIOError, InterruptedError):
                return
            if len(message) < HANDOFF.size:
                continue
            kind, ifindex, flags = HANDOFF.unpack_from(message)
            if ifindex >= len(node.interfaces):
                continue
            body = memoryview(message)[HANDOFF.size:]
            if kind == KIND_IPV4:
                self.counters["worker.handoffs_in"] += 1
                node.receive_ipv4(ifindex, body, now, bool(flags & TRUSTED),
                                  bool(flags & LINK_BROADCAST))
            elif kind == KIND_ARP:
                node.interfaces[ifindex].arp.learn(body, now)


def bind_worker_socket(name: str, index: int) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(worker_address(name, index))
    except OSError as exc:
        sock.close()
        raise LinkError(f"worker {index}: cannot bind its control socket: {exc.strerror}"
                        ) from None
    sock.listen(16)
    sock.setblocking(False)
    return sock


def make_inboxes(count: int) -> list[tuple[socket.socket, socket.socket]]:
    """One (receive end, send end) pair per worker; every worker keeps every send end."""
    pairs = []
    for _ in range(count):
        rx, tx = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        for s in (rx, tx):
            s.setblocking(False)
            with contextlib.suppress(OSError):
                s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 21)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 21)
        pairs.append((rx, tx))
    return pairs


# -- the supervisor ----------------------------------------------------------------------


def _die_with_parent(parent: int) -> None:
    """A worker whose supervisor is gone (even killed) stops too: no orphan keeps the
    TAP's queue."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # it went before the request took hold
        os._exit(1)


def _close_all_but(keep: set[int]) -> None:
    try:
        fds = [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError:
        return
    for fd in fds:
        if fd not in keep:
            with contextlib.suppress(OSError):
                os.close(fd)


def _sum_into(total: dict[str, Any], part: dict[str, Any]) -> None:
    """Add `part`'s numbers into `total`, dict by dict (counters of all workers); a
    table every worker holds a copy of (REPLICATED) counts once."""
    for key, value in part.items():
        if isinstance(value, dict):
            _sum_into(total.setdefault(key, {}), value)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            total[key] = max(total.get(key, 0), value) if key in REPLICATED else \
                total.get(key, 0) + value
        else:
            total.setdefault(key, value)


class Supervisor:
    """Forks the workers, restarts one that dies, answers the node's control socket for
    all of them. `start_worker(index)` runs in the child and never returns."""

    def __init__(self, name: str, count: int, control: socket.socket,
                 start_worker: Callable[[int, Callable[[], None]], None],
                 info: dict[str, Any],
                 usage_errors: tuple[type[Exception], ...] = (),
                 worker_fds: Callable[[int], set[int]] = lambda index: set()) -> None:
        """`usage_errors`: what a worker raises to say, in one sentence, why it cannot
        start (the supervisor reports that sentence, once); `worker_fds(index)`: the
        descriptors worker `index` needs (its queue, the inboxes); it closes the rest."""
        self.name, self.count, self.control = name, count, control
        self.start_worker = start_worker
        self.usage_errors = usage_errors
        self.worker_fds = worker_fds
        self.info = info
        self.pids: list[int | None] = [None] * count
        self.restarts = [0] * count
        self.deaths: list[list[float]] = [[] for _ in range(count)]
        self.ready_fds: list[int | None] = [None] * count
        self.stopping = False
        self.failed: str | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._all_ready: asyncio.Event | None = None
        self._ready = [False] * count
        self._stopped: asyncio.Event | None = None
        # run-time changes every worker took (`tapstack route`): a restarted worker
        # starts from the configuration and is given them again
        self.changes: list[dict[str, Any]] = []
        self._tasks: set[asyncio.Future] = set()

    # -- workers -------------------------------------------------------------------------

    def _fork(self, index: int) -> None:
        r, w = os.pipe()
        parent = os.getpid()
        # No signal between the fork and the child's own handlers: the supervisor's
        # (asyncio's) would swallow a SIGTERM meant for the child
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        pid = os.fork()
        if pid == 0:  # the worker: never returns into the supervisor's code
            code = 1
            try:
                signal.set_wakeup_fd(-1)
                for sig in STOP_SIGNALS:
                    signal.signal(sig, signal.SIG_DFL)
                os.setpgid(0, 0)  # a terminal's Ctrl-C reaches the supervisor alone
                _die_with_parent(parent)
                self.control.close()
                # nothing of the supervisor's: its control connections, its relays, its
                # loop (a restart forks from inside it), the other workers' pipes
                _close_all_but({0, 1, 2, w, *self.worker_fds(index)})
                signal.pthread_sigmask(signal.SIG_SETMASK, blocked)

                def ready() -> None:
                    os.write(w, b"r")
                    os.close(w)

                self.start_worker(index, ready)
                code = 0
            except self.usage_errors as exc:  # told to the supervisor, not printed here
                with contextlib.suppress(OSError):
                    os.write(w, b"e" + str(exc).encode()[:4000])
                code = 2
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        os.close(w)
        self.pids[index] = pid
        self.ready_fds[index] = r
        self._ready[index] = False
        if self.loop is not None:
            self.loop.add_reader(r, self._on_ready, index)

    def _on_ready(self, index: int) -> None:
        fd = self.ready_fds[index]
        if fd is None:
            return
        try:
            os.set_blocking(fd, False)
            got = os.read(fd, 4096)
        except OSError:
            got = b""
        self.loop.remove_reader(fd)
        os.close(fd)
        self.ready_fds[index] = None
        if got.startswith(b"e"):  # it could not start: why, in its words
            why = got[1:].decode(errors="replace")
            if self._all_ready.is_set():  # a restart that failed: counted as a death
                log.warning("worker %d could not start again: %s", index, why)
                return
            if self.failed is None:
                self.failed = why
            self._stopped.set()
            return
        if got:
            self._ready[index] = True
            log.info("worker %d ready (pid %d)", index, self.pids[index])
            if self._all_ready.is_set() and self.changes:  # a restarted worker
                task = asyncio.ensure_future(self._replay(index))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            if all(self._ready) and self._all_ready is not None:
                self._all_ready.set()

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid not in self.pids:
                continue
            index = self.pids.index(pid)
            self.pids[index] = None
            if self.ready_fds[index] is not None:
                self._on_ready(index)  # what it wrote before it ended: why it could not
            if self.stopping:
                continue
            how = f"signal {-os.waitstatus_to_exitcode(status)}" if os.WIFSIGNALED(status) \
                else f"exit code {os.waitstatus_to_exitcode(status)}"
            if not self._all_ready.is_set():
                if self.failed is None:
                    self.failed = f"worker {index} did not start ({how})"
                self._stopped.set()
                continue
            now = time.monotonic()
            deaths = [t for t in self.deaths[index] if now - t < RESTART_WINDOW] + [now]
            self.deaths[index] = deaths
            if len(deaths) > RESTARTS:
                self.failed = (f"worker {index} died {len(deaths)} times in "
                               f"{RESTART_WINDOW:.0f} s; giving up")
                self._stopped.set()
                continue
            self.restarts[index] += 1
            log.warning("worker %d (pid %d) ended with %s; starting it again", index, pid,
                        how)
            self._fork(index)

    # -- control -------------------------------------------------------------------------

    async def _ask(self, index: int, request: dict[str, Any], timeout: float = 2.0
                   ) -> dict[str, Any] | None:
        """One worker's answer, or None after `timeout` (under the 3 s a `tapstack`
        command waits, so the others' answers still get through)."""
        try:
            return await asyncio.wait_for(self._ask_now(index, request), timeout)
        except (TimeoutError, OSError, ValueError):
            return None

    async def _ask_now(self, index: int, request: dict[str, Any]) -> dict[str, Any]:
        reader, writer = await asyncio.open_unix_connection(worker_address(self.name, index))
        try:
            writer.write(json.dumps(request).encode() + b"\n")
            await writer.drain()
            return json.loads(await reader.read())
        finally:
            writer.close()

    async def _ask_all(self, request: dict[str, Any]) -> list[dict[str, Any] | None]:
        return list(await asyncio.gather(*(self._ask(i, request)
                                           for i in range(self.count))))

    def _workers_info(self) -> list[dict[str, Any]]:
        return [{"index": i, "pid": self.pids[i], "ready": self._ready[i],
                 "restarts": self.restarts[i]} for i in range(self.count)]

    async def answer(self, request: dict[str, Any]) -> dict[str, Any]:
        cmd = request.get("cmd", "stats")
        answers = await self._ask_all(request)
        got = [(i, a) for i, a in enumerate(answers) if a is not None]
        if not got:
            return {"error": "no worker answered"}
        if cmd == "stats":
            return self._merge_stats(got)
        if cmd == "conns":
            rows, listeners = [], set()
            for i, a in got:
                rows += [{**row, "worker": i} for row in a.get("connections", [])]
                listeners.update(a.get("listeners", []))
            return {"connections": rows, "listeners": sorted(listeners),
                    "workers": self._workers_info()}
        errors = [a["error"] for _, a in got if "error" in a]
        if errors:
            return {"error": errors[0]}
        if cmd == "route":
            self.changes.append(request)
        return got[0][1]  # a change made in every worker, or worker 0's view

    async def _replay(self, index: int) -> None:
        for request in list(self.changes):
            answer = await self._ask(index, request)
            if answer is None or "error" in answer:
                log.warning("worker %d did not take %s again: %s", index, request,
                            (answer or {}).get("error", "no answer"))

    def _merge_stats(self, got: list[tuple[int, dict[str, Any]]]) -> dict[str, Any]:
        first = got[0][1]
        counters: dict[str, Any] = {}
        interfaces: dict[str, Any] = {}
        for _, a in got:
            _sum_into(counters, a.get("counters", {}))
            for name, iface in a.get("interfaces", {}).items():
                merged = interfaces.setdefault(name, {k: v for k, v in iface.items()
                                                      if k != "counters"})
                _sum_into(merged.setdefault("counters", {}), iface.get("counters", {}))
        errors = [a.get("last_internal_error") for _, a in got if a.get("last_internal_error")]
        tracing = {i: a.get("info", {}).get("tracing") for i, a in got}
        workers = [{**w, "tracing": tracing.get(w["index"])} for w in self._workers_info()]
        return {"info": {**first.get("info", {}), **self.info, "pid": os.getpid(),
                         "workers": workers,
                         "answered": [i for i, _ in got]},
                "counters": counters, "interfaces": interfaces,
                "routes": first.get("routes", []),
                "last_internal_error": errors[0] if errors else None}

    async def _stream_trace(self, request: dict[str, Any], reader: asyncio.StreamReader,
                            writer: asyncio.StreamWriter) -> None:
        """Every worker's events, as they come, each tagged with its worker (and its
        node named NODE/wN). The first line goes out once every worker listens."""
        queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize=10000)
        dropped = 0
        listening = [asyncio.Event() for _ in range(self.count)]

        async def relay(index: int) -> None:
            """One worker's events; again from its successor if it is restarted."""
            nonlocal dropped
            while True:
                try:
                    r, w = await asyncio.open_unix_connection(
                        worker_address(self.name, index))
                except OSError:
                    listening[index].set()
                    await asyncio.sleep(0.5)  # restarting: its successor will listen
                    continue
                try:
                    w.write(json.dumps(request).encode() + b"\n")
                    await w.drain()
                    while line := await r.readline():
                        event = json.loads(line)
                        if "tracing" in event:
                            listening[index].set()
                            continue
                        event["worker"] = index
                        event["node"] = f"{event.get('node', self.name)}/w{index}"
                        try:
                            queue.put_nowait(json.dumps(event).encode() + b"\n")
                        except asyncio.QueueFull:
                            dropped += 1
                except (OSError, ValueError):
                    pass
                finally:
                    listening[index].set()
                    w.close()
                await asyncio.sleep(0.5)

        relays = [asyncio.ensure_future(relay(i)) for i in range(self.count)]
        gone = asyncio.ensure_future(reader.read())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in listening)), 5.0)
        try:
            writer.write(json.dumps({"tracing": self.info.get("node", self.name),
                                     "workers": self.count}).encode() + b"\n")
            while not gone.done():
                getter = asyncio.ensure_future(queue.get())
                await asyncio.wait({getter, gone}, return_when=asyncio.FIRST_COMPLETED)
                if not getter.done():
                    getter.cancel()
                    break
                lines = [getter.result()]
                while not queue.empty():
                    lines.append(queue.get_nowait())
                if dropped:
                    lines.append(json.dumps({"dropped": dropped}).encode() + b"\n")
                    dropped = 0
                writer.write(b"".join(lines))
                await writer.drain()
        finally:
            for task in relays:
                task.cancel()
            gone.cancel()

    async def _serve_control(self, reader: asyncio.StreamReader,
                             writer: asyncio.StreamWriter) -> None:
        await serve_control_connection(reader, writer, self.answer, self._stream_trace)

    # -- running -------------------------------------------------------------------------

    def run(self, on_ready: Callable[[], None], start_timeout: float = 60.0) -> str | None:
        """Start every worker, serve until SIGINT/SIGTERM, stop them; returns why it
        failed (None: it ran and stopped as asked)."""
        for index in range(self.count):  # before any event loop: a plain fork
            self._fork(index)
        return asyncio.run(self._serve(on_ready, start_timeout))

    async def _serve(self, on_ready: Callable[[], None], start_timeout: float) -> str | None:
        self.loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        self._all_ready = asyncio.Event()
        for index, fd in enumerate(self.ready_fds):
            if fd is not None:
                self.loop.add_reader(fd, self._on_ready, index)
        self.loop.add_signal_handler(signal.SIGCHLD, self._reap)
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.loop.add_signal_handler(sig, self._stop)
        self._reap()  # a worker may have ended before the handler was in place
        server = await asyncio.start_unix_server(self._serve_control, sock=self.control)
        try:
            waiter = asyncio.ensure_future(self._all_ready.wait())
            stopper = asyncio.ensure_future(self._stopped.wait())
            await asyncio.wait({waiter, stopper}, timeout=start_timeout,
                               return_when=asyncio.FIRST_COMPLETED)
            stopper.cancel()
            if not self._all_ready.is_set():
                waiter.cancel()
                if self.failed is None and not self._stopped.is_set():
                    self.failed = f"the workers were not ready in {start_timeout:.0f} s"
            else:
                on_ready()
                await self._stopped.wait()
        finally:
            self.stopping = True
            server.close()
            await self._stop_workers()
            self.loop.remove_signal_handler(signal.SIGCHLD)
        return self.failed

    def _stop(self) -> None:
        """SIGINT/SIGTERM: from now on a worker that ends is not started again (its
        SIGCHLD may be handled in this same pass of the loop)."""
        self.stopping = True
        self._stopped.set()

    async def _stop_workers(self, grace: float = 15.0) -> None:
        for pid in self.pids:
            if pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while any(p is not None for p in self.pids) and time.monotonic() < deadline:
            self._reap()
            await asyncio.sleep(0.05)
        for index, pid in enumerate(self.pids):
            if pid is not None:
                log.warning("worker %d (pid %d) did not stop; killing it", index, pid)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, 0)
                self.pids[index] = None
