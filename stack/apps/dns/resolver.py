"""A caching, recursive resolver: iterative from root hints, or forwarding upstream.

    resolver = Resolver(network, loop.time, Cache(), root_hints=load_hints("root.hints"))
    result = await resolver.resolve(dns.name.from_text("www.bob.com."), dns.rdatatype.A)

`network` is anything with asyncio's create_datagram_endpoint (tapstack's Stack, or an
event loop), so the same resolver runs on tapstack or on kernel sockets.

Iteration (RFC 1034 5.3.3): start from the closest zone whose servers the cache knows
(else the root), ask one of its servers (no recursion wanted), and follow referrals down,
believing only what each server is authoritative for (its bailiwick), until an answer,
a CNAME to chase, NXDOMAIN or NODATA. Every query has a fresh random ID and a fresh
random source port, and its answer must match both, the question (case included, with
0x20) and the server's address (RFC 5452). Limits: referrals per resolution, queries per
resolution, CNAMEs per chain; each counted when hit.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import dns.zonefile

from stack.apps.dns.cache import Cache, in_bailiwick, matches, with_ttl
from stack.apps.dns.server import TCP_IDLE, encode, header_error, take_messages

MAX_REFERRALS = 16
MAX_QUERIES = 40
MAX_CNAMES = 8
QUERY_TIMEOUT = 1.0

COUNTERS = ("resolutions", "upstream_queries", "upstream_queries_tcp",
            "truncated_answers", "timeouts", "servfail", "wrong_id",
            "wrong_question", "wrong_source", "not_a_response", "malformed_answers",
            "out_of_bailiwick", "referral_limit", "query_limit", "lame")

IN = dns.rdataclass.IN


def load_hints(path: str) -> list[tuple[dns.name.Name, str]]:
    """Root hints (the named.root format): the root's NS names and their addresses."""
    with open(path) as f:
        rrsets = dns.zonefile.read_rrsets(f.read(), origin=dns.name.root,
                                          relativize=False, default_ttl=3600000,
                                          rdclass=None)
    names = [rd.target for r in rrsets if r.rdtype == dns.rdatatype.NS for rd in r]
    addresses = {r.name: [rd.address for rd in r] for r in rrsets
                 if r.rdtype == dns.rdatatype.A}
    hints = [(n, a) for n in names for a in addresses.get(n, [])]
    if not hints:
        raise ValueError(f"{path}: no root server with an address (NS and A records)")
    return hints


@dataclass
class Result:
    rcode: int = dns.rcode.NOERROR
    answer: list[dns.rrset.RRset] = field(default_factory=list)
    authority: list[dns.rrset.RRset] = field(default_factory=list)


class _Budget:
    __slots__ = ("queries",)

    def __init__(self) -> None:
        self.queries = 0


class _Exchange(asyncio.DatagramProtocol):
    """One query to one server: the first datagram that answers it, all else counted."""

    def __init__(self, query: dns.message.Message, server: tuple[str, int],
                 done: asyncio.Future, counters: Counter) -> None:
        self.query, self.server, self.done, self.counters = query, server, done, counters

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        try:
            response = dns.message.from_wire(data)
        except dns.exception.DNSException:
            self.counters["malformed_answers"] += 1
            return
        why = matches(self.query, response, self.server, (addr[0], addr[1]))
        if why is not None:
            self.counters[why] += 1  # a forgery, or a late answer: keep waiting
            return
        if not self.done.done():
            self.done.set_result(response)

    def error_received(self, exc: Exception) -> None:
        if not self.done.done():
            self.done.set_result(None)  # ICMP unreachable: this server is not there


class Resolver:
    def __init__(self, network: Any, clock: Callable[[], float], cache: Cache,
                 root_hints: list[tuple[dns.name.Name, str]] | None = None,
                 forward: list[str] | None = None, rng: random.Random | None = None,
                 case_randomisation: bool = True) -> None:
        if not root_hints and not forward:
            raise ValueError("a resolver needs root hints or servers to forward to")
        self.network = network
        self.clock = clock
        self.cache = cache
        self.hints = root_hints or []
        self.forward = forward or []
        self.rng = rng or random.SystemRandom()
        self.case_randomisation = case_randomisation
        self.counters: Counter[str] = Counter({name: 0 for name in COUNTERS})

    # -- the public call ----------------------------------------------------------------

    async def resolve(self, qname: dns.name.Name, rdtype: int, rdclass: int = IN) -> Result:
        self.counters["resolutions"] += 1
        result = Result()
        budget = _Budget()
        name = qname
        for _ in range(MAX_CNAMES):
            part = await self._lookup(name, rdtype, rdclass, budget, 0)
            result.answer += part.answer
            result.rcode, result.authority = part.rcode, part.authority
            cname = [r for r in part.answer if r.rdtype == dns.rdatatype.CNAME
                     and r.name == name]
            if part.rcode != dns.rcode.NOERROR or not cname or rdtype == dns.rdatatype.CNAME \
                    or any(r.rdtype == rdtype for r in part.answer if r.name != name):
                return result
            name = cname[0][0].target  # chase the CNAME (it may lead into another zone)
        return result

    # -- one name ------------------------------------------------------------------------

    def _from_cache(self, name: dns.name.Name, rdtype: int, rdclass: int) -> Result | None:
        now = self.clock()
        hit = self.cache.get(name, rdtype, rdclass, now)
        if hit is not None:
            entry, left = hit
            if entry.rrset is None:
                return Result(entry.rcode, [], [with_ttl(entry.soa, left)] if entry.soa
                              else [])
            return Result(dns.rcode.NOERROR, [with_ttl(entry.rrset, left)])
        if rdtype != dns.rdatatype.CNAME:
            hit = self.cache.get(name, dns.rdatatype.CNAME, rdclass, now)
            if hit is not None and hit[0].rrset is not None:
                return Result(dns.rcode.NOERROR, [with_ttl(hit[0].rrset, hit[1])])
        return None

    async def _lookup(self, name: dns.name.Name, rdtype: int, rdclass: int,
                      budget: _Budget, depth: int) -> Result:
        cached = self._from_cache(name, rdtype, rdclass)
        if cached is not None:
            return cached
        if self.forward:
            return await self._forwarded(name, rdtype, rdclass, budget)
        zone, servers = self._closest_servers(name, rdclass)
        for _ in range(MAX_REFERRALS):
            response, server = await self._ask(servers, name, rdtype, rdclass, budget,
                                               recursion=False)
            if response is None:
                self.counters["servfail"] += 1
                return Result(dns.rcode.SERVFAIL)
            answer, bad1 = in_bailiwick(response.answer, zone)
            authority, bad2 = in_bailiwick(response.authority, zone)
            additional, bad3 = in_bailiwick(response.additional, zone)
            self.counters["out_of_bailiwick"] += bad1 + bad2 + bad3
            now = self.clock()
            rcode = response.rcode()
            soa = next((r for r in authority if r.rdtype == dns.rdatatype.SOA), None)
            if rcode == dns.rcode.NXDOMAIN:
                if soa is not None:
                    self.cache.put_negative(name, rdtype, rdclass, rcode, soa, now, server)
                return Result(rcode, [], [soa] if soa else [])
            if rcode != dns.rcode.NOERROR:
                self.counters["servfail"] += 1
                return Result(dns.rcode.SERVFAIL)
            mine = [r for r in answer if r.name == name
                    and r.rdtype in (rdtype, dns.rdatatype.CNAME)]
            if mine:
                for r in answer:  # the CNAME chain inside the zone, and the answer
                    self.cache.put(r, now, server)
                return Result(dns.rcode.NOERROR, answer)
            ns = next((r for r in authority if r.rdtype == dns.rdatatype.NS
                       and r.name != zone and name.is_subdomain(r.name)), None)
            if ns is None:
                if response.flags & dns.flags.AA:  # NODATA
                    if soa is not None:
                        self.cache.put_negative(name, rdtype, rdclass, rcode, soa, now,
                                                server)
                    return Result(rcode, [], [soa] if soa else [])
                self.counters["lame"] += 1
                return Result(dns.rcode.SERVFAIL)
            # a referral: one zone closer; remember its servers and their addresses
            self.cache.put(ns, now, server)
            for r in additional:
                if r.rdtype == dns.rdatatype.A:
                    self.cache.put(r, now, server)
            zone = ns.name
            servers = await self._addresses(ns, rdclass, budget, depth)
            if not servers:
                self.counters["servfail"] += 1
                return Result(dns.rcode.SERVFAIL)
        self.counters["referral_limit"] += 1
        return Result(dns.rcode.SERVFAIL)

    def _closest_servers(self, name: dns.name.Name, rdclass: int
                         ) -> tuple[dns.name.Name, list[str]]:
        """The deepest zone above `name` whose servers' addresses the cache knows."""
        now = self.clock()
        zone = name
        while zone != dns.name.root:
            hit = self.cache.get(zone, dns.rdatatype.NS, rdclass, now)
            if hit is not None and hit[0].rrset is not None:
                addresses = []
                for rd in hit[0].rrset:
                    a = self.cache.get(rd.target, dns.rdatatype.A, rdclass, now)
                    if a is not None and a[0].rrset is not None:
                        addresses += [r.address for r in a[0].rrset]
                if addresses:
                    return zone, addresses
            zone = zone.parent()
        return dns.name.root, [address for _, address in self.hints]

    async def _addresses(self, ns: dns.rrset.RRset, rdclass: int, budget: _Budget,
                         depth: int) -> list[str]:
        now = self.clock()
        found = []
        for rd in ns:
            hit = self.cache.get(rd.target, dns.rdatatype.A, rdclass, now)
            if hit is not None and hit[0].rrset is not None:
                found += [r.address for r in hit[0].rrset]
        if found or depth >= 2:
            return found
        for rd in ns:  # no glue: find a server's address on the side
            result = await self._lookup(rd.target, dns.rdatatype.A, rdclass, budget,
                                        depth + 1)
            found = [r.address for rrset in result.answer
                     if rrset.rdtype == dns.rdatatype.A for r in rrset]
            if found:
                return found
        return []

    async def _forwarded(self, name: dns.name.Name, rdtype: int, rdclass: int,
                         budget: _Budget) -> Result:
        response, server = await self._ask(self.forward, name, rdtype, rdclass, budget,
                                           recursion=True)
        if response is None:
            self.counters["servfail"] += 1
            return Result(dns.rcode.SERVFAIL)
        now = self.clock()
        rcode = response.rcode()
        soa = next((r for r in response.authority if r.rdtype == dns.rdatatype.SOA), None)
        if rcode == dns.rcode.NOERROR and response.answer:
            for r in response.answer:
                self.cache.put(r, now, server)
        elif rcode in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN) and soa is not None:
            self.cache.put_negative(name, rdtype, rdclass, rcode, soa, now, server)
        return Result(rcode, list(response.answer), [soa] if soa else [])

    # -- the wire ------------------------------------------------------------------------

    def _qname(self, name: dns.name.Name) -> dns.name.Name:
        """0x20: a random mix of cases, that a genuine answer must echo exactly."""
        if not self.case_randomisation:
            return name
        text = "".join(ch.upper() if ch.isalpha() and self.rng.random() < 0.5 else ch.lower()
                       for ch in name.to_text())
        return dns.name.from_text(text)

    async def _ask(self, servers: list[str], name: dns.name.Name, rdtype: int,
                   rdclass: int, budget: _Budget, recursion: bool
                   ) -> tuple[dns.message.Message | None, str]:
        order = list(servers)
        self.rng.shuffle(order)
        for server in order:
            if budget.queries >= MAX_QUERIES:
                self.counters["query_limit"] += 1
                return None, ""
            budget.queries += 1
            query = dns.message.make_query(self._qname(name), rdtype, rdclass,
                                           use_edns=0, payload=1232)
            query.id = self.rng.getrandbits(16)
            if not recursion:
                query.flags &= ~dns.flags.RD
            response = await self._exchange(query, (server, 53))
            if response is not None and response.flags & dns.flags.TC:
                # cut to fit UDP: the whole answer comes over TCP (RFC 7766 5)
                self.counters["truncated_answers"] += 1
                response = await self._exchange_tcp(query, (server, 53))
            if response is not None:
                return response, server
        return None, ""

    async def _exchange_tcp(self, query: dns.message.Message, server: tuple[str, int]
                            ) -> dns.message.Message | None:
        """The same question over TCP, two-byte length first; None when the network
        offers no streams or the server does not answer."""
        opener = getattr(self.network, "open_connection", None)
        if opener is None:
            return None
        self.counters["upstream_queries_tcp"] += 1
        writer = None
        try:
            reader, writer = await asyncio.wait_for(opener(*server), QUERY_TIMEOUT)
            wire = query.to_wire()
            writer.write(len(wire).to_bytes(2, "big") + wire)
            size = int.from_bytes(await asyncio.wait_for(reader.readexactly(2),
                                                         QUERY_TIMEOUT), "big")
            data = await asyncio.wait_for(reader.readexactly(size), QUERY_TIMEOUT)
            response = dns.message.from_wire(data)
        except (TimeoutError, OSError, asyncio.IncompleteReadError, dns.exception.DNSException):
            self.counters["timeouts"] += 1
            return None
        finally:
            if writer is not None:
                writer.close()
        why = matches(query, response, server, server)  # a stream has only its peer
        if why is not None:
            self.counters[why] += 1
            return None
        return response

    async def _exchange(self, query: dns.message.Message, server: tuple[str, int]
                        ) -> dns.message.Message | None:
        self.counters["upstream_queries"] += 1
        loop = asyncio.get_running_loop()
        done: asyncio.Future = loop.create_future()
        transport, _ = await self.network.create_datagram_endpoint(
            lambda: _Exchange(query, server, done, self.counters), remote_addr=server)
        try:
            transport.sendto(query.to_wire())
            return await asyncio.wait_for(done, QUERY_TIMEOUT)
        except TimeoutError:
            self.counters["timeouts"] += 1
            return None
        finally:
            transport.close()


class ResolverServer:
    """What stubs (dig, a host's resolver library) talk to: recursion on port 53."""

    def __init__(self, resolver: Resolver) -> None:
        self.resolver = resolver
        self.counters: Counter[str] = Counter({"queries": 0, "formerr": 0, "notimp": 0,
                                               "dropped_malformed": 0})

    async def handle(self, wire: bytes, udp: bool) -> bytes | None:
        self.counters["queries"] += 1
        try:
            query = dns.message.from_wire(wire)
        except dns.exception.DNSException:
            answer = header_error(wire, dns.rcode.FORMERR)
            self.counters["formerr" if answer else "dropped_malformed"] += 1
            return answer
        if query.flags & dns.flags.QR:
            self.counters["dropped_malformed"] += 1
            return None
        response = dns.message.make_response(query, our_payload=1232)
        response.flags |= dns.flags.RA
        if query.opcode() != dns.opcode.QUERY or len(query.question) != 1:
            self.counters["notimp"] += 1
            response.set_rcode(dns.rcode.NOTIMP)
        else:
            q = query.question[0]
            result = await self.resolver.resolve(q.name, q.rdtype, q.rdclass)
            response.set_rcode(result.rcode)
            response.answer = result.answer
            response.authority = result.authority
        wire_out, _ = encode(response, query, udp)
        return wire_out

    def counters_all(self) -> dict[str, int]:
        out = dict(self.counters)
        out.update(self.resolver.counters)
        out.update(self.resolver.cache.counters)
        out["cache_entries"] = len(self.resolver.cache.entries)
        out["cache_bytes"] = self.resolver.cache.bytes
        return out


class ResolverUdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, server: ResolverServer) -> None:
        self.server = server
        self.transport: Any = None
        self.tasks: set[asyncio.Task] = set()

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        task = asyncio.get_running_loop().create_task(self._answer(data, addr))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _answer(self, data: bytes, addr: tuple[str, int]) -> None:
        response = await self.server.handle(data, udp=True)
        if response is not None and not self.transport.is_closing():
            self.transport.sendto(response, addr)

    def error_received(self, exc: Exception) -> None:
        pass


class ResolverTcpProtocol(asyncio.Protocol):
    """RFC 7766 framing; answers go back in the order of the questions."""

    def __init__(self, server: ResolverServer) -> None:
        self.server = server
        self.buffer = bytearray()
        self.transport: Any = None
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.worker: asyncio.Task | None = None
        self.idle: asyncio.TimerHandle | None = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.worker = asyncio.get_running_loop().create_task(self._work())
        self._arm()

    def _arm(self) -> None:
        """RFC 7766 6.2.3: a connection that asks nothing for a while is closed."""
        if self.idle is not None:
            self.idle.cancel()
        self.idle = asyncio.get_running_loop().call_later(TCP_IDLE, self.transport.close)

    def data_received(self, data: bytes) -> None:
        self._arm()
        self.buffer += data
        for message in take_messages(self.buffer):
            self.queue.put_nowait(message)

    async def _work(self) -> None:
        while True:
            message = await self.queue.get()
            if message is None:  # the client is done asking, and all of it is answered
                self.transport.close()
                return
            response = await self.server.handle(message, udp=False)
            if response is not None and not self.transport.is_closing():
                self.transport.write(len(response).to_bytes(2, "big") + response)

    def eof_received(self) -> bool:
        self.queue.put_nowait(None)  # close once the questions before it are answered
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        if self.worker is not None:
            self.worker.cancel()
        if self.idle is not None:
            self.idle.cancel()
