"""The decision trace: structured events from inside the stack, one per frame and per
decision, for `tapstack trace`, `tapstack run --trace FILE` and the journey pages.

An event is a dict: `t` (the node's clock), `node`, `layer`, `event`, the pcap `frame`
number when one is being received or was just sent (with --pcap), and fields of its
own. Nothing is built when nobody listens: every emitting site reads `trace.on` first,
and the counters only report while tracing (their class is switched).

Sources:
  - the runtime: every frame in and out (`link rx`/`link tx`), decoded into a summary;
  - the engines: ARP resolution, IPv4 delivery and forwarding, TCP state changes,
    retransmissions and their reason, congestion window changes, HTTP requests;
  - every counter that counts a decision (a drop and its reason, a denial, a
    retransmission, an error), as a `count` event named like the counter.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from typing import Any

from stack.counters import Counters
from stack.wire.ethernet import ETH_HEADER, ETHERTYPE_ARP, ETHERTYPE_IPV4, mac_to_str
from stack.wire.ipv4 import (
    FLAG_DF,
    FLAG_MF,
    OFFSET_MASK,
    PROTO_ICMP,
    PROTO_TCP,
    PROTO_UDP,
    ip_to_str,
)
from stack.wire.tcp import TCP_HEADER, parse_options

Event = dict[str, Any]
Sink = Callable[[Event], None]

# Counters that count volume, not decisions: not traced (the frames themselves are).
VOLUME = frozenset({
    "link.rx_frames", "link.rx_bytes", "link.tx_frames", "link.tx_bytes",
    "ipv4.rx_packets", "ipv4.tx_packets", "ipv4.rx_delivered", "ipv4.rx_bytes",
    "ipv4.tx_bytes", "tcp.rx_segments", "tcp.tx_segments", "tcp.predicted_acks",
    "tcp.predicted_data",
    "tcp.rx_bytes", "tcp.tx_bytes", "udp.rx_datagrams", "udp.tx_datagrams",
    "tcp.tso_frames", "arp.rx_requests", "arp.rx_replies", "arp.tx_requests",
    "arp.tx_replies", "icmp.rx_messages", "icmp.tx_messages", "ipv4.fwd_packets",
    "conntrack.new", "tcp.delayed_acks", "tcp.rx_pure_acks", "tcp.rx_data_segments",
})

# Counters whose decision is traced as a richer event of its own.
EXPLAINED = frozenset({
    "ipv4.forwarded", "tcp.retransmits", "tcp.fast_retransmits", "tcp.rto_expiries",
    "tcp.tlp_probes", "tcp.lost_retransmits", "tcp.reorder_timeouts",
})


class Trace:
    """One node's event stream. `on` is True while at least one sink listens."""

    __slots__ = ("counters", "frame", "node", "now", "on", "sinks")

    def __init__(self, node: str, counters: Counters | None = None) -> None:
        self.node = node
        self.on = False
        self.now = 0.0  # the node's clock, kept while tracing (for counted decisions)
        self.sinks: list[Sink] = []
        self.frame: int | None = None  # the pcap number of the frame being handled
        self.counters = counters

    def subscribe(self, sink: Sink) -> None:
        self.sinks.append(sink)
        self._switch()

    def unsubscribe(self, sink: Sink) -> None:
        if sink in self.sinks:
            self.sinks.remove(sink)
        self._switch()

    def _switch(self) -> None:
        self.on = bool(self.sinks)
        if self.counters is not None:  # counted decisions become events while tracing
            self.counters.__class__ = TracingCounters if self.on else Counters
            self.counters._trace = self

    def emit(self, layer: str, event: str, now: float, **fields: Any) -> None:
        record: Event = {"t": round(now, 6), "node": self.node, "layer": layer,
                         "event": event}
        if self.frame is not None:
            record["frame"] = self.frame
        record.update(fields)
        for sink in list(self.sinks):
            sink(record)


class TracingCounters(Counters):
    """The node's counters while tracing: a decision counted is also an event."""

    _trace: Trace

    def __setitem__(self, key: str, value: int) -> None:
        old = self.get(key, 0)
        super().__setitem__(key, value)
        if value > old and key not in VOLUME and key not in EXPLAINED:
            layer, _, name = key.partition(".")
            self._trace.emit(layer, "count", self._trace.now, name=name, by=value - old)


OFF = Trace("-")  # what engines hold until a node gives them its own; never switched on


def describe_frame(frame: bytes | bytearray | memoryview) -> dict[str, Any]:
    """What a frame is, field by field (Ethernet, ARP, IPv4, TCP/UDP/ICMP)."""
    out: dict[str, Any] = {"len": len(frame)}
    if len(frame) < 14:
        return out
    dst, src, ethertype = ETH_HEADER.unpack_from(frame, 0)
    out.update(eth_src=mac_to_str(src), eth_dst=mac_to_str(dst))
    body = memoryview(frame)[14:]
    if ethertype == ETHERTYPE_ARP and len(body) >= 28:
        op = int.from_bytes(body[6:8], "big")
        out.update(proto="arp", op="request" if op == 1 else "reply" if op == 2 else op,
                   sender_mac=mac_to_str(bytes(body[8:14])),
                   sender=ip_to_str(bytes(body[14:18])), target=ip_to_str(bytes(body[24:28])))
        return out
    if ethertype != ETHERTYPE_IPV4 or len(body) < 20:
        out["ethertype"] = hex(ethertype)
        return out
    ihl = (body[0] & 0x0F) * 4
    flags_frag = int.from_bytes(body[6:8], "big")
    proto = body[9]
    out.update(src=ip_to_str(bytes(body[12:16])), dst=ip_to_str(bytes(body[16:20])),
               ttl=body[8], ip_len=int.from_bytes(body[2:4], "big"),
               ip_id=int.from_bytes(body[4:6], "big"))
    if flags_frag & FLAG_DF:
        out["df"] = True
    offset = (flags_frag & OFFSET_MASK) << 3
    if flags_frag & FLAG_MF or offset:
        out.update(frag_offset=offset, more_fragments=bool(flags_frag & FLAG_MF))
    payload = body[ihl:]
    if offset:
        out["proto"] = {PROTO_TCP: "tcp", PROTO_UDP: "udp", PROTO_ICMP: "icmp"}.get(
            proto, proto)
        return out
    if proto == PROTO_TCP and len(payload) >= 20:
        sport, dport, seq, ack, off, flags, window, _c, _u = TCP_HEADER.unpack_from(payload)
        hlen = (off >> 4) * 4
        out.update(proto="tcp", sport=sport, dport=dport, flags=tcp_flags(flags), seq=seq,
                   ack=ack, win=window, data=max(len(payload) - hlen, 0))
        if hlen > 20:
            try:
                opts = parse_options(payload[20:hlen])
            except ValueError:
                opts = None
            if opts is not None:
                o = {}
                if opts.mss is not None:
                    o["mss"] = opts.mss
                if opts.wscale is not None:
                    o["wscale"] = opts.wscale
                if opts.sack_permitted:
                    o["sack_ok"] = True
                if opts.ts_val is not None:
                    o["ts"] = [opts.ts_val, opts.ts_ecr]
                if opts.sack_blocks:
                    o["sack"] = [list(b) for b in opts.sack_blocks]
                if o:
                    out["options"] = o
    elif proto == PROTO_UDP and len(payload) >= 8:
        sport, dport = int.from_bytes(payload[0:2], "big"), int.from_bytes(payload[2:4], "big")
        out.update(proto="udp", sport=sport, dport=dport, data=len(payload) - 8)
        if 53 in (sport, dport):
            out["dns"] = describe_dns(bytes(payload[8:]))
    elif proto == PROTO_ICMP and len(payload) >= 4:
        out.update(proto="icmp", type=payload[0], code=payload[1])
    else:
        out["proto"] = proto
    return out


def describe_dns(wire: bytes) -> dict[str, Any]:
    """A DNS message in a few fields: the question, and for a response its code, whether
    it is authoritative, its answers and the name servers it refers to."""
    import dns.exception
    import dns.flags
    import dns.message
    import dns.rcode
    import dns.rdatatype

    try:
        msg = dns.message.from_wire(wire)
    except (dns.exception.DNSException, ValueError):
        return {"malformed": True}
    out: dict[str, Any] = {"id": msg.id}
    if msg.question:
        q = msg.question[0]
        out["question"] = f"{q.name} {dns.rdatatype.to_text(q.rdtype)}"
    if not msg.flags & dns.flags.QR:
        out["kind"] = "query"
        return out
    out.update(kind="response", rcode=dns.rcode.to_text(msg.rcode()),
               aa=bool(msg.flags & dns.flags.AA))
    answers = [f"{r.name} {dns.rdatatype.to_text(r.rdtype)} {rd}" for r in msg.answer
               for rd in r]
    if answers:
        out["answers"] = answers
    referral = [f"{r.name} NS {rd}" for r in msg.authority
                if r.rdtype == dns.rdatatype.NS for rd in r]
    if referral and not answers:
        out["referral"] = referral
    soa = [f"{r.name} SOA {rd}" for r in msg.authority if r.rdtype == dns.rdatatype.SOA
           for rd in r]
    if soa and not answers:  # NXDOMAIN or no data: the zone that says so (RFC 2308)
        out["soa"] = soa
    return out


def tcp_flags(flags: int) -> str:
    return "".join(ch for bit, ch in ((0x02, "S"), (0x01, "F"), (0x04, "R"), (0x08, "P"),
                                      (0x10, "."), (0x20, "U"), (0x40, "E"), (0x80, "C"))
                   if flags & bit) or "none"


# -- reading the trace --------------------------------------------------------------------


def matches(event: Event, layers: set[str] | None = None, address: str | None = None,
            port: int | None = None) -> bool:
    """The `tapstack trace` filters: any of the layers, an address on either side, a
    port on either side (events without addresses or ports pass those filters only when
    they name none)."""
    if layers and event.get("layer") not in layers:
        return False
    if address is not None and address not in (event.get("src"), event.get("dst"),
                                               event.get("local"), event.get("remote"),
                                               event.get("sender"), event.get("target"),
                                               event.get("client"), event.get("next_hop")):
        return False
    return port is None or port in (event.get("sport"), event.get("dport"),
                                    event.get("local_port"), event.get("remote_port"))


def _endpoints(e: Event) -> str:
    if "sport" in e:
        return f"{e.get('src')}:{e['sport']} > {e.get('dst')}:{e['dport']}"
    if "src" in e:
        return f"{e['src']} > {e.get('dst')}"
    if "local" in e:
        return f"{e['local']}:{e.get('local_port')} - {e.get('remote')}:{e.get('remote_port')}"
    return ""


def format_event(e: Event) -> str:
    """One line a student can read: time, node, frame number, layer, what happened."""
    frame = f"#{e['frame']:<5}" if "frame" in e else "      "
    head = f"{e['t']:12.6f} {e['node']:<8} {frame} {e['layer']:<5}"
    kind = e["event"]
    if e["layer"] == "link":
        what = _frame_text(e)
        return f"{head} {'<' if kind == 'rx' else '>'} {e.get('iface', '')} {what}"
    if kind == "count":
        return f"{head} {e['name']} (counted{'' if e.get('by', 1) == 1 else ' x' + str(e['by'])})"
    if kind == "state":
        return f"{head} {_endpoints(e)} {e['old']} -> {e['new']}"
    skip = {"t", "node", "frame", "layer", "event", "src", "dst", "sport", "dport", "local",
            "local_port", "remote", "remote_port"}
    rest = " ".join(f"{k}={v}" for k, v in e.items() if k not in skip)
    ends = _endpoints(e)
    return f"{head} {kind}{' ' + ends if ends else ''}{' ' + rest if rest else ''}"


def _frame_text(e: Event) -> str:
    proto = e.get("proto")
    if proto == "arp":
        if e["op"] == "request":
            return f"ARP who-has {e['target']} tell {e['sender']}"
        return f"ARP {e['sender']} is-at {e['sender_mac']}"
    if proto == "tcp":
        opts = e.get("options", {})
        extra = " ".join(f"{k}={v}" for k, v in opts.items())
        return (f"TCP {e['src']}:{e['sport']} > {e['dst']}:{e['dport']} [{e['flags']}] "
                f"seq={e['seq']} ack={e['ack']} win={e['win']} len={e['data']}"
                f"{' ' + extra if extra else ''}")
    if proto == "udp":
        dns = e.get("dns")
        what = ""
        if dns and dns.get("kind") == "query":
            what = f" DNS query {dns.get('question')}"
        elif dns:
            what = (f" DNS {dns.get('rcode')}{' aa' if dns.get('aa') else ''} "
                    f"{dns.get('question')} -> "
                    + ", ".join(dns.get("answers") or dns.get("referral") or ["(none)"]))
        return f"UDP {e['src']}:{e['sport']} > {e['dst']}:{e['dport']} len={e['data']}{what}"
    if proto == "icmp":
        return f"ICMP {e['src']} > {e['dst']} type={e['type']} code={e['code']}"
    if "src" in e:
        frag = f" frag offset={e['frag_offset']}" if "frag_offset" in e else ""
        return f"IPv4 {e['src']} > {e['dst']} proto={proto}{frag}"
    return f"ethertype {e.get('ethertype')} len={e['len']}"


class TraceBuffer:
    """A bounded queue of events for one slow reader (a `tapstack trace` client): when
    it is full, events are dropped and counted, the stack never waits."""

    def __init__(self, limit: int = 20000) -> None:
        self.events: collections.deque[Event] = collections.deque()
        self.limit = limit
        self.dropped = 0
        self.wakeup: Callable[[], None] | None = None

    def __call__(self, event: Event) -> None:
        if len(self.events) >= self.limit:
            self.dropped += 1
            return
        self.events.append(event)
        if self.wakeup is not None:
            self.wakeup()
