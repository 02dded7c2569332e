"""The authoritative server: one DNS message in, one out (or none), over UDP and TCP.

    server = DnsServer(Zones([load_zone("bob.com.zone")]))
    await loop.create_datagram_endpoint(lambda: DnsUdpProtocol(server), local_addr=...)
    await loop.create_server(lambda: DnsTcpProtocol(server), port=53)

Behaviour (RFC 1035, 2308, 6891, 7766): the AA flag on answers from our zones; REFUSED
for zones we do not serve; NOTIMP for opcodes other than QUERY; FORMERR when a message
cannot be read but its header can (else it is dropped and counted); EDNS(0) answered
with a 1232-byte UDP size (RFC 8020-era guidance), BADVERS for EDNS versions above 0;
over UDP an answer that does not fit the client's size is cut to its question with TC
set, and the client asks again over TCP, where length-prefixed messages follow one
another on one connection.
"""

from __future__ import annotations

import asyncio
import struct
from collections import Counter
from typing import Any

import dns.edns
import dns.exception
import dns.flags
import dns.message
import dns.opcode
import dns.rcode
import dns.rdatatype

from stack.apps.dns.zone import Zones

EDNS_SIZE = 1232  # our UDP payload size (DNS flag day 2020)
PLAIN_UDP = 512  # RFC 1035 4.2.1, without EDNS
TCP_IDLE = 10.0  # seconds a TCP connection may sit idle between queries (RFC 7766 6.2.3)

COUNTERS = ("queries_udp", "queries_tcp", "answers", "referrals", "nodata", "nxdomain",
            "refused", "notimp", "formerr", "badvers", "truncated", "dropped_malformed",
            "dropped_responses")


def encode(response: dns.message.Message, query: dns.message.Message, udp: bool
           ) -> tuple[bytes, bool]:
    """The response's wire form, and whether it had to be truncated: over UDP it must fit
    the client's size (512 bytes without EDNS); if not, it is cut to its question with TC
    set (RFC 2181 9) and the client asks again over TCP."""
    if not udp:
        return response.to_wire(max_size=65535), False
    limit = PLAIN_UDP if query.edns < 0 else max(min(query.payload, EDNS_SIZE), PLAIN_UDP)
    try:
        return response.to_wire(max_size=limit), False
    except dns.exception.TooBig:
        response.flags |= dns.flags.TC
        response.answer, response.authority, response.additional = [], [], []
        return response.to_wire(max_size=limit), True


def header_error(wire: bytes, rcode: int) -> bytes | None:
    """An error answer built from the header alone (the rest could not be read); None
    when not even that is there, or it is a response (never answered)."""
    if len(wire) < 12:
        return None
    ident, flags = struct.unpack_from("!HH", wire, 0)
    if flags & 0x8000:
        return None
    opcode = (flags >> 11) & 0xF
    out_flags = 0x8000 | (opcode << 11) | (flags & 0x0100) | rcode  # QR, opcode, RD
    return struct.pack("!HHHHHH", ident, out_flags, 0, 0, 0, 0)


class DnsServer:
    def __init__(self, zones: Zones) -> None:
        self.zones = zones
        self.counters: Counter[str] = Counter({name: 0 for name in COUNTERS})

    def handle(self, wire: bytes, udp: bool) -> bytes | None:
        """The response to one message (None: nothing to send)."""
        c = self.counters
        c["queries_udp" if udp else "queries_tcp"] += 1
        try:
            query = dns.message.from_wire(wire)
        except dns.message.BadEDNS:
            return self._header_error(wire, dns.rcode.FORMERR)
        except (dns.exception.DNSException, ValueError, IndexError, struct.error):
            return self._header_error(wire, dns.rcode.FORMERR)
        if query.flags & dns.flags.QR:
            c["dropped_responses"] += 1  # a response is never answered (no loops)
            return None
        response = dns.message.make_response(query, our_payload=EDNS_SIZE)
        response.flags &= ~dns.flags.RA  # we do not recurse
        if query.edns > 0:
            c["badvers"] += 1
            response.use_edns(0, payload=EDNS_SIZE)
            response.set_rcode(dns.rcode.BADVERS)
            return self._wire(response, query, udp)
        if query.opcode() != dns.opcode.QUERY:
            c["notimp"] += 1
            response.set_rcode(dns.rcode.NOTIMP)
            return self._wire(response, query, udp)
        if len(query.question) != 1:
            c["formerr"] += 1
            response.set_rcode(dns.rcode.FORMERR)
            return self._wire(response, query, udp)
        question = query.question[0]
        result = self.zones.answer(question.name, question.rdtype, question.rdclass)
        c[{"answer": "answers", "referral": "referrals", "nodata": "nodata",
           "nxdomain": "nxdomain", "refused": "refused"}[result.kind]] += 1
        response.set_rcode(dns.rcode.from_text(result.rcode))
        if result.authoritative:
            response.flags |= dns.flags.AA
        response.answer = result.answer
        response.authority = result.authority
        response.additional = result.additional
        return self._wire(response, query, udp)

    def _wire(self, response: dns.message.Message, query: dns.message.Message,
              udp: bool) -> bytes:
        wire, truncated = encode(response, query, udp)
        self.counters["truncated"] += truncated
        return wire

    def _header_error(self, wire: bytes, rcode: int) -> bytes | None:
        """FORMERR with the query's ID when at least the header could be read."""
        answer = header_error(wire, rcode)
        self.counters["formerr" if answer is not None else
                      "dropped_malformed" if len(wire) < 12 else "dropped_responses"] += 1
        return answer


def take_messages(buffer: bytearray) -> list[bytes]:
    """The whole length-prefixed messages at the front of a TCP stream's buffer
    (RFC 7766 8), removed from it; a partial one stays for the next read."""
    out = []
    while len(buffer) >= 2:
        length = (buffer[0] << 8) | buffer[1]
        if len(buffer) < 2 + length:
            break
        out.append(bytes(buffer[2:2 + length]))
        del buffer[:2 + length]
    return out


class DnsUdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, server: DnsServer) -> None:
        self.server = server
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        response = self.server.handle(data, udp=True)
        if response is not None:
            self.transport.sendto(response, addr)

    def error_received(self, exc: Exception) -> None:
        pass  # an ICMP error about an answer we sent: nothing to do


class DnsTcpProtocol(asyncio.Protocol):
    """RFC 7766: two-byte length, then the message; several per connection, answered in
    order; the connection closes after TCP_IDLE seconds without a query."""

    def __init__(self, server: DnsServer) -> None:
        self.server = server
        self.buffer = bytearray()
        self.transport: Any = None
        self.idle: asyncio.TimerHandle | None = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self._arm()

    def _arm(self) -> None:
        if self.idle is not None:
            self.idle.cancel()
        self.idle = asyncio.get_running_loop().call_later(TCP_IDLE, self.transport.close)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        for message in take_messages(self.buffer):
            response = self.server.handle(message, udp=False)
            if response is not None:
                self.transport.write(struct.pack("!H", len(response)) + response)
        self._arm()

    def eof_received(self) -> bool:
        return False  # close once our answers are out

    def connection_lost(self, exc: Exception | None) -> None:
        if self.idle is not None:
            self.idle.cancel()
            self.idle = None
