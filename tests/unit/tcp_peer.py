"""A scripted TCP peer for driving one tapstack interface under a virtual clock.

Segments going in are built with dpkt (the independent implementation); segments coming
out are parsed with dpkt, so tests assert what would be on the wire.
"""

from __future__ import annotations

import random
import struct

import dpkt

from stack.net.host import Host, HostConfig
from stack.net.tcp.connection import TcpConfig
from tests.helpers import HOST_IP, HOST_MAC, STACK_IP, STACK_MAC, arp_frame

FIN, SYN, RST, PSH, ACK = 0x01, 0x02, 0x04, 0x08, 0x10


class User:
    """Records what the connection tells the application."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.eof = False
        self.established = False
        self.closed: list[Exception | None] = []
        self.acked = 0

    def on_established(self) -> None:
        self.established = True

    def on_data(self, data: bytes) -> None:
        self.data += data

    def on_eof(self) -> None:
        self.eof = True

    def on_acked(self) -> None:
        self.acked += 1

    def on_closed(self, exc: Exception | None) -> None:
        self.closed.append(exc)


def state_name(layer, conn) -> str:
    """The state of `conn`, looking in the TIME-WAIT table once it was handed over."""
    tw = layer.time_wait.get((conn.remote_ip, conn.remote_port, conn.local_ip,
                              conn.local_port))
    return tw.state_name if tw is not None else conn.state_name


def opts(mss=None, wscale=None, sack_ok=False, ts=None) -> bytes:
    out = b""
    if mss is not None:
        out += struct.pack("!BBH", 2, 4, mss)
    if sack_ok:
        out += b"\x04\x02"
    if ts is not None:
        out += struct.pack("!BBII", 8, 10, *ts)
    if wscale is not None:
        out += struct.pack("!BBB", 3, 3, wscale)
    while len(out) % 4:
        out += b"\x01"
    return out


def parse_opts(seg: dpkt.tcp.TCP) -> dict[int, bytes]:
    return dict(dpkt.tcp.parse_opts(seg.opts))


class Peer:
    """The far end: sends crafted segments, collects what tapstack answers."""

    def __init__(self, tcp: TcpConfig | None = None, mtu: int = 1500, port: int = 40000,
                 seed: int = 1) -> None:
        self.iface = Host(HostConfig(mac=STACK_MAC, address=STACK_IP,
                                               gateway=HOST_IP, mtu=mtu,
                                               tcp=tcp or TcpConfig()),
                               random.Random(seed))
        self.now = 0.0
        self.port = port
        self.iface.receive(arp_frame(), self.now)  # we know each other's MAC already
        self.iface.poll(self.now)
        self.server_user: User | None = None
        self.accepted = []

    # -- in ---------------------------------------------------------------------------------

    def send(self, flags: int, seq: int, ack: int = 0, data: bytes = b"",
             window: int = 65535, options: bytes = b"", sport: int | None = None,
             dport: int = 80) -> None:
        tcp = dpkt.tcp.TCP(sport=sport or self.port, dport=dport, seq=seq & 0xFFFFFFFF,
                           ack=ack & 0xFFFFFFFF, flags=flags, win=window, opts=options,
                           data=data)
        tcp.off = (20 + len(options)) // 4
        ip = dpkt.ip.IP(src=HOST_IP, dst=STACK_IP, p=6, ttl=64, data=tcp)
        ip.len = 20 + len(bytes(tcp))
        frame = dpkt.ethernet.Ethernet(dst=STACK_MAC, src=HOST_MAC, type=0x0800, data=ip)
        self.iface.receive(bytes(frame), self.now)

    # -- out ---------------------------------------------------------------------------------

    def out(self) -> list[dpkt.tcp.TCP]:
        """Every TCP segment tapstack sends now (after running due timers)."""
        segs = []
        frames = self.iface.poll(self.now)
        while frames:
            frame = frames.pop(0)
            eth = dpkt.ethernet.Ethernet(frame)
            if eth.type == 0x0806 and eth.data.op == 1 and eth.data.tpa == HOST_IP:
                # the host answers ARP, as the kernel would (the cache ages out)
                self.iface.receive(arp_frame(op=2, tpa=STACK_IP, tha=STACK_MAC,
                                             dst=STACK_MAC), self.now)
                frames += self.iface.poll(self.now)
                continue
            if eth.type != 0x0800 or eth.data.p != 6:
                continue
            ip = eth.data
            assert ip.df, "TCP leaves with DF set"
            tcp = ip.data
            # the checksum must verify (dpkt recomputes it when the field is zeroed)
            sent = tcp.sum
            tcp.sum = 0
            ip2 = dpkt.ip.IP(src=ip.src, dst=ip.dst, p=6, data=tcp)
            ip2.len = 20 + len(bytes(tcp))
            bytes(ip2)
            assert tcp.sum == sent, "bad TCP checksum"
            segs.append(tcp)
        return segs

    def advance(self, seconds: float) -> list[dpkt.tcp.TCP]:
        """Move the clock, running every deadline on the way; return what went out."""
        end = self.now + seconds
        out = []
        while True:
            d = self.iface.next_deadline()
            if d is None or d > end:
                break
            self.now = max(d, self.now)
            out += self.out()
        self.now = end
        out += self.out()
        return out

    # -- conveniences ------------------------------------------------------------------------

    def listen(self, port: int = 80, backlog: int = 16) -> None:
        def accept(conn):
            user = User()
            conn.user = user
            self.server_user = user
            self.accepted.append(conn)

        self.iface.tcp.listen(port, accept, backlog)

    def handshake(self, iss: int = 1000, window: int = 65535, options: bytes | None = None,
                  port: int = 80):
        """Open a connection to our listener; returns (connection, our next seq, their isn)."""
        self.send(SYN, iss, window=window,
                  options=opts(mss=1460, wscale=7, sack_ok=True) if options is None
                  else options, dport=port)
        (synack,) = self.out()
        assert synack.flags & (SYN | ACK) == SYN | ACK
        assert synack.ack == iss + 1
        self.send(ACK, iss + 1, synack.seq + 1, window=window, dport=port)
        assert self.out() == []
        return self.accepted[-1], iss + 1, synack.seq + 1


def open_pair(wire, a, b, port: int = 80, timeout: float = 60):
    """A connection from host `a` to a listener on host `b` over `wire` (started), with
    a User on each end; returns (client, server) once both are established."""
    accepted = []

    def accept(conn):
        conn.user = User()
        accepted.append(conn)

    b.tcp.listen(port, accept)
    client = a.tcp.connect(b.ipv4.interfaces[0].addresses[0][0], port, wire.now)
    client.user = User()
    wire.run(until=lambda: client.user.established and accepted, timeout=timeout)
    assert client.user.established and accepted
    return client, accepted[0]
