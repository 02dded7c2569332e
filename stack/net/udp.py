"""UDP (RFC 768): a port table, datagrams in and out, ICMP errors to the endpoint."""

from __future__ import annotations

import errno
import random
from collections.abc import Callable
from typing import Protocol

from stack.counters import Counters
from stack.net.ipv4 import IPv4Layer
from stack.net.packet import PacketInfo
from stack.wire.errors import MalformedError
from stack.wire.ipv4 import PROTO_UDP, IPv4Header, ip_to_str
from stack.wire.udp import UDP_HEADER, build_udp, parse_udp

MAX_PAYLOAD = 65535 - 20 - 8  # 65,507
EPHEMERAL_LOW, EPHEMERAL_HIGH = 32768, 60999

COUNTERS = (
    "udp.rx_datagrams", "udp.rx_truncated", "udp.rx_bad_length", "udp.rx_bad_checksum",
    "udp.rx_no_port", "udp.rx_filtered", "udp.tx_datagrams", "udp.tx_errors",
    "udp.icmp_errors", "udp.app_errors",
)


class DatagramUser(Protocol):
    def on_datagram(self, data: bytes, addr: tuple[str, int]) -> None: ...
    def on_error(self, exc: Exception) -> None: ...


class UdpEndpoint:
    __slots__ = ("address", "port", "remote", "user")

    def __init__(self, port: int, remote: tuple[bytes, int] | None, user: DatagramUser,
                 address: bytes | None = None):
        self.port = port
        self.remote = remote  # a connected endpoint only hears its peer
        self.user = user
        self.address = address  # bound to one local address; None: any


class UdpLayer:
    def __init__(self, ipv4: IPv4Layer, counters: Counters, rng: random.Random) -> None:
        self.ipv4 = ipv4
        self.counters = counters
        self.rng = rng
        self.endpoints: dict[int, UdpEndpoint] = {}
        # set by a NAT: (protocol, address, port) -> True when that public port is its own
        self.reserved: Callable[[int, bytes, int], bool] | None = None
        counters.declare(*COUNTERS)
        ipv4.handlers[PROTO_UDP] = self.receive
        ipv4.error_handlers[PROTO_UDP] = self.receive_error

    def bind(self, port: int, user: DatagramUser, remote: tuple[bytes, int] | None = None,
             address: bytes | None = None) -> UdpEndpoint:
        """One endpoint per port; `address` limits it to datagrams for that address."""
        if address is not None and address not in self.ipv4.local:
            raise OSError(errno.EADDRNOTAVAIL, "not a local address")
        if port == 0:
            span = EPHEMERAL_HIGH - EPHEMERAL_LOW + 1
            start = self.rng.randrange(span)
            for i in range(span):
                candidate = EPHEMERAL_LOW + (start + i) % span
                if candidate not in self.endpoints and not (
                        self.reserved is not None and any(
                            self.reserved(17, a, candidate) for a in self.ipv4.local)):
                    port = candidate
                    break
            else:
                raise OSError(errno.EADDRINUSE, "no free UDP port")
        elif port in self.endpoints:
            raise OSError(errno.EADDRINUSE, f"UDP port {port} is in use")
        endpoint = self.endpoints[port] = UdpEndpoint(port, remote, user, address)
        return endpoint

    def unbind(self, endpoint: UdpEndpoint) -> None:
        if self.endpoints.get(endpoint.port) is endpoint:
            del self.endpoints[endpoint.port]

    def sendto(self, endpoint: UdpEndpoint, data: bytes, dst: bytes, dport: int,
               now: float) -> None:
        """Send one datagram (fragmented by IPv4 if needed); OSError when it cannot go."""
        if len(data) > MAX_PAYLOAD:
            self.counters["udp.tx_errors"] += 1
            raise OSError(errno.EMSGSIZE, "message too long")
        src = endpoint.address or self.ipv4.source_for(dst)
        if src is None:
            self.counters["udp.tx_errors"] += 1
            self.counters["ipv4.tx_no_route"] += 1
            raise OSError(errno.ENETUNREACH, "network is unreachable")
        datagram = build_udp(src, dst, endpoint.port, dport, data)
        if not self.ipv4.send(dst, PROTO_UDP, datagram, now, src=src):
            self.counters["udp.tx_errors"] += 1
            raise OSError(self.ipv4.last_error, "cannot send")
        self.counters["udp.tx_datagrams"] += 1

    def receive(self, ip: IPv4Header, payload: memoryview, now: float,
                info: PacketInfo) -> None:
        c = self.counters
        c["udp.rx_datagrams"] += 1
        try:
            sport, dport, data = parse_udp(payload, ip.src, ip.dst,
                                           verify_checksum=not info.trusted)
        except MalformedError as exc:
            c["udp.rx_" + exc.reason] += 1
            return
        endpoint = self.endpoints.get(dport)
        if endpoint is not None and endpoint.address is not None and \
                endpoint.address != ip.dst and not info.broadcast:
            endpoint = None  # bound to another of our addresses
        if endpoint is None:
            c["udp.rx_no_port"] += 1
            if not info.broadcast:
                # RFC 1122 4.1.3.1: port unreachable (never for broadcasts)
                self.ipv4.errors.send(3, 3, info.quote(payload), now)
            return
        if endpoint.remote is not None and endpoint.remote != (ip.src, sport):
            c["udp.rx_filtered"] += 1
            return
        endpoint.user.on_datagram(bytes(data), (ip_to_str(ip.src), sport))

    def receive_error(self, icmp_type: int, code: int, mtu: int, header: IPv4Header,
                      data: memoryview, now: float) -> None:
        sport, dport, _length, _csum = UDP_HEADER.unpack_from(data, 0)
        endpoint = self.endpoints.get(sport)
        if endpoint is None or (endpoint.address not in (None, header.src)) or \
                (endpoint.remote is not None
                                and endpoint.remote != (header.dst, dport)):
            self.counters["icmp.rx_errors_unmatched"] += 1
            return
        self.counters["udp.icmp_errors"] += 1
        if icmp_type == 3 and code == 4:
            self.ipv4.update_pmtu(header.dst, mtu, now)
            exc: Exception = OSError(errno.EMSGSIZE, "message too long for the path")
        elif icmp_type == 3 and code in (2, 3):
            exc = ConnectionRefusedError(errno.ECONNREFUSED, "connection refused")
        elif icmp_type == 3:
            exc = OSError(errno.EHOSTUNREACH, "destination unreachable")
        else:
            exc = OSError(errno.ETIMEDOUT, "time exceeded")
        endpoint.user.on_error(exc)
