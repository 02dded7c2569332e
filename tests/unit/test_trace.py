"""The decision trace from the sans-I/O core: the events of a scripted handshake, a data
exchange with one segment lost, and the close; and no work at all when nobody listens."""

from __future__ import annotations

import random

from stack.counters import Counters
from stack.link.impair import Impairment
from stack.link.memory import MemoryWire
from stack.net.host import Host, HostConfig
from stack.net.tcp.connection import TcpConfig
from stack.trace import Trace, TracingCounters, describe_frame, format_event, matches
from stack.wire.ethernet import ETH_HLEN
from tests.unit.tcp_peer import User

A_IP, B_IP = bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2])


class DropOnce(Impairment):
    """Loses the second data segment the first time it is sent."""

    def __init__(self) -> None:
        super().__init__(prefix="drop")
        self.data_seen = 0
        self.dropped = None

    def push(self, frame, now):
        ip = ETH_HLEN
        if len(frame) > ip + 40 and frame[ip + 9] == 6:
            ihl = (frame[ip] & 15) * 4
            tcp = ip + ihl
            hlen = (frame[tcp + 12] >> 4) * 4
            seq = int.from_bytes(frame[tcp + 4:tcp + 8], "big")
            if len(frame) - tcp - hlen > 0:
                self.data_seen += 1
                if self.data_seen == 2 and self.dropped is None:
                    self.dropped = seq
                    return
        super().push(frame, now)


def run_scripted(trace_on: bool):
    def make(mac: str, ip: bytes, seed: int) -> Host:
        return Host(HostConfig(mac=bytes.fromhex(mac), address=ip, tcp=TcpConfig(msl=1.0)),
                    random.Random(seed))

    a, b = make("020000000001", A_IP, 1), make("020000000002", B_IP, 2)
    events = []
    if trace_on:
        a.node.trace.subscribe(events.append)
    drop = DropOnce()
    wire = MemoryWire(a, b, drop, None)
    wire.start()
    accepted = []

    def accept(conn):
        conn.user = User()
        accepted.append(conn)

    b.tcp.listen(80, accept)
    client = a.tcp.connect(B_IP, 80, wire.now)
    client.user = User()
    wire.run(until=lambda: client.user.established and accepted, timeout=10)
    client.send(bytes(5 * 1000))
    wire.run(until=lambda: len(accepted[0].user.data) == 5000, timeout=30)
    client.close()
    wire.run(until=lambda: accepted[0].user.eof, timeout=10)
    accepted[0].close()
    wire.run(timeout=10)
    return events, drop, a


def test_handshake_loss_and_close_as_events():
    events, drop, a = run_scripted(True)
    assert drop.dropped is not None
    assert all(e["node"] == a.node.name and isinstance(e["t"], float) for e in events)
    story = [(e["layer"], e["event"], e.get("old"), e.get("new"), e.get("why"))
             for e in events if e["event"] in ("state", "retransmit", "resolved", "miss")]
    assert story == [
        ("tcp", "state", "CLOSED", "SYN-SENT", None),
        ("arp", "miss", None, None, None),
        ("arp", "resolved", None, None, None),
        ("tcp", "state", "SYN-SENT", "ESTABLISHED", None),
        ("tcp", "retransmit", None, None, "fast retransmit (SACK/RACK)"),
        ("tcp", "state", "ESTABLISHED", "FIN-WAIT-1", None),
        ("tcp", "state", "FIN-WAIT-1", "FIN-WAIT-2", None),
        ("tcp", "state", "FIN-WAIT-2", "TIME-WAIT", None),
        ("tcp", "state", "TIME-WAIT", "CLOSED", None),
    ], story
    retransmit = next(e for e in events if e["event"] == "retransmit")
    assert retransmit["seq"] == drop.dropped  # the segment that was lost, named
    assert (retransmit["local"], retransmit["remote"], retransmit["remote_port"]) == \
        ("10.0.0.1", "10.0.0.2", 80)
    resolved = next(e for e in events if e["event"] == "resolved")
    assert resolved["ip"] == "10.0.0.2" and resolved["mac"] == "02:00:00:00:00:02" \
        and resolved["released"] == 1  # the SYN waited for the answer
    cwnd = [e for e in events if e["event"] == "cwnd"]
    assert cwnd and any(e["why"] == "recovery" for e in cwnd)  # the loss halved it
    # the counted decisions came too, e.g. the duplicate ACKs of the loss
    counted = {e["name"] for e in events if e["event"] == "count"}
    assert "active_opens" in counted
    delivered = [e for e in events if e["event"] == "deliver"]
    assert delivered and all(e["proto"] == "tcp" and e["src"] == "10.0.0.2"
                             for e in delivered)
    line = format_event(next(e for e in events if e["event"] == "state"))
    assert "10.0.0.1:" in line and "CLOSED -> SYN-SENT" in line


def test_tracing_off_builds_nothing(monkeypatch):
    def boom(*args, **kw):
        raise AssertionError("an event was built with nobody listening")

    monkeypatch.setattr(Trace, "emit", boom)
    events, drop, a = run_scripted(False)
    assert events == [] and drop.dropped is not None
    assert type(a.node.counters) is Counters  # not the tracing kind
    assert a.counters["tcp.fast_retransmits"] == 1


def test_subscribing_switches_the_counters_and_back():
    trace = Trace("n", Counters())
    sink = []
    trace.subscribe(sink.append)
    assert trace.on and type(trace.counters) is TracingCounters
    trace.now = 5.0
    trace.counters["ipv4.rx_bad_checksum"] += 1
    trace.counters["link.rx_frames"] += 1  # volume: not an event
    trace.unsubscribe(sink.append)
    assert not trace.on and type(trace.counters) is Counters
    trace.counters["ipv4.rx_bad_checksum"] += 1
    assert sink == [{"t": 5.0, "node": "n", "layer": "ipv4", "event": "count",
                     "name": "rx_bad_checksum", "by": 1}]
    assert trace.counters["ipv4.rx_bad_checksum"] == 2


def test_describe_frame_and_filters():
    from stack.wire.ethernet import ETHERTYPE_IPV4, build_ethernet
    from stack.wire.ipv4 import build_ipv4
    from stack.wire.tcp import SYN, build_options, build_tcp

    opts = build_options(mss=1460, wscale=7, sack_permitted=True)
    seg = build_tcp(A_IP, B_IP, 40000, 80, 1000, 0, SYN, 65535, opts, b"")
    frame = build_ethernet(b"\x02" * 6, b"\x04" * 6, ETHERTYPE_IPV4) + \
        build_ipv4(A_IP, B_IP, 6, len(seg), 7, 64, 0, 0x4000) + seg
    d = describe_frame(frame)
    assert d["proto"] == "tcp" and d["flags"] == "S" and d["seq"] == 1000
    assert d["options"] == {"mss": 1460, "wscale": 7, "sack_ok": True} and d["df"]
    event = {"layer": "link", "event": "rx", **d}
    assert matches(event, {"link"}, "10.0.0.2", 80)
    assert not matches(event, {"tcp"}) and not matches(event, None, "10.9.9.9")
    assert not matches(event, None, None, 22)
