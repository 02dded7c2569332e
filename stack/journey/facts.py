"""The facts of one journey, from its captures and traces only (journey.json)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import dpkt

from stack.journey.record import Recording
from stack.lab.topology import Lab


def _events(path: Path) -> list[dict]:
    out = []
    with open(path) as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
    return out


def _segments_packets(path: Path) -> list[tuple[int, float, Any]]:
    rows = []
    with open(path, "rb") as f:
        try:
            reader = dpkt.pcap.Reader(f)
        except ValueError:
            return rows
        for number, (ts, buf) in enumerate(reader, start=1):
            try:
                rows.append((number, ts, dpkt.ethernet.Ethernet(buf)))
            except (dpkt.UnpackError, dpkt.NeedData):
                continue
    return rows


def _ip(b: bytes) -> str:
    return ".".join(map(str, b))


def _mac(b: bytes) -> str:
    return ":".join(f"{x:02x}" for x in b)


def analyse(lab: Lab, rec: Recording, client: str) -> dict[str, Any]:
    traces = {name: _events(path) for name, path in rec.traces.items()}
    packets = {name: _segments_packets(path) for name, path in rec.pcaps.items()}
    report: dict[str, Any] = {"lab": lab.name, "url": rec.curl.get("url"),
                              "curl": {"exit": rec.curl.get("exit"),
                                       "seconds": rec.curl.get("seconds")}}
    report["dns"] = _dns_steps(lab, traces)
    report["tls"] = _tls_facts(rec.curl.get("verbose", ""))
    client_addr = lab.nodes[client].interfaces[0].addresses[0].split("/")[0]
    client_seg = lab.nodes[client].interfaces[0].segment
    syn = next(((n, ts, eth) for n, ts, eth in packets[client_seg]
                if isinstance(eth.data, dpkt.ip.IP) and isinstance(eth.data.data, dpkt.tcp.TCP)
                and _ip(eth.data.src) == client_addr and eth.data.data.flags == dpkt.tcp.TH_SYN
                and eth.data.data.dport == 443), None)
    report["hops"] = _hops(lab, packets, traces, syn[2].data.data.seq) if syn else []
    report["http"] = _http_facts(traces)
    report["segmentation"] = _segmentation(packets, report["hops"])
    report["captures"] = {name: str(path) for name, path in rec.pcaps.items()}
    report["traces"] = {name: str(path) for name, path in rec.traces.items()}
    return report


def _dns_steps(lab: Lab, traces: dict[str, list[dict]]) -> list[dict]:
    """Every DNS message a tapstack node received for itself (not the ones its routers
    forwarded), in time order: who asked whom what, and what came back."""
    steps = []
    for node, events in traces.items():
        mine = {a.split("/")[0] for i in lab.nodes[node].interfaces for a in i.addresses}
        for e in events:
            if e.get("layer") == "link" and e.get("event") == "rx" and "dns" in e \
                    and e.get("dst") in mine:
                d = e["dns"]
                steps.append({"t": e["t"], "node": node, "from": e["src"], "to": e["dst"],
                              "kind": d.get("kind", "malformed"),
                              **{k: d[k] for k in ("question", "rcode", "aa", "answers",
                                                   "referral") if k in d}})
    steps.sort(key=lambda s: s["t"])
    return steps


def _tls_facts(verbose: str) -> dict[str, Any]:
    facts: dict[str, Any] = {}
    for line in verbose.splitlines():
        line = line.lstrip("* ").strip()
        if line.startswith("SSL connection using "):
            version, _, cipher = line.removeprefix("SSL connection using ").partition(" / ")
            facts.update(version=version, cipher=cipher)
        elif line.startswith("subject:"):
            facts["subject"] = line.removeprefix("subject:").strip()
        elif line.startswith("issuer:"):
            facts["issuer"] = line.removeprefix("issuer:").strip()
        elif line.startswith("subjectAltName:"):
            facts["name_check"] = line.removeprefix("subjectAltName:").strip()
        elif line.startswith("SSL certificate verify ok"):
            facts["verified"] = True
        elif line.startswith("ALPN: server accepted"):
            facts["alpn"] = line.rsplit(" ", 1)[-1]
    return facts


def _http_facts(traces: dict[str, list[dict]]) -> dict[str, Any]:
    for node, events in traces.items():
        req = next((e for e in events if e.get("layer") == "http"
                    and e.get("event") == "request"), None)
        if req is None:
            continue
        resp = next((e for e in events if e.get("layer") == "http"
                     and e.get("event") == "response"), {})
        return {"server": node, "client_seen": req.get("client"),
                "request": f"{req.get('method')} {req.get('target')} HTTP/{req.get('version')}",
                "status": resp.get("status"), "body_bytes": resp.get("sent")}
    return {}


def _find_syn(rows: list, seq: int) -> tuple[int, float, Any] | None:
    for n, ts, eth in rows:
        ip = eth.data
        if isinstance(ip, dpkt.ip.IP) and isinstance(ip.data, dpkt.tcp.TCP) \
                and ip.data.flags == dpkt.tcp.TH_SYN and ip.data.seq == seq:
            return n, ts, eth
    return None


def _hops(lab: Lab, packets: dict[str, list], traces: dict[str, list[dict]],
          seq: int) -> list[dict]:
    """The SYN (found on each segment by its sequence number, which no NAT changes), in
    time order; between two segments, the node that took it from one to the other and
    what it decided."""
    seen = []
    for name, rows in packets.items():
        found = _find_syn(rows, seq)
        if found is not None:
            n, ts, eth = found
            ip = eth.data
            seen.append({"segment": name, "frame": n, "time": ts,
                         "src": _ip(ip.src), "dst": _ip(ip.dst), "sport": ip.data.sport,
                         "dport": ip.data.dport, "ttl": ip.ttl,
                         "eth_src": _mac(eth.src), "eth_dst": _mac(eth.dst)})
    seen.sort(key=lambda h: h["time"])
    for before, after in itertools.pairwise(seen):
        node = next((nd for nd in lab.nodes.values()
                     if {i.segment for i in nd.interfaces} >= {before["segment"],
                                                             after["segment"]}), None)
        before["next_node"] = node.name if node else None
        if node is not None and node.name in traces:
            before["decisions"] = _decisions(traces[node.name], seq)
    return seen


def _decisions(events: list[dict], seq: int) -> list[dict]:
    """What a node decided about one datagram: the events between its `link rx` and its
    `link tx` (found by the TCP sequence number)."""
    out = []
    inside = False
    for e in events:
        if e.get("layer") == "link" and e.get("seq") == seq and e.get("flags") == "S":
            if e["event"] == "rx":
                inside = True
                continue
            if inside:
                break
        if inside and e.get("layer") != "link" and not (e.get("layer") == "arp"
                                                        and e.get("event") == "hit"):
            out.append({k: v for k, v in e.items() if k not in ("node", "t")})
    return out


def _segmentation(packets: dict[str, list], hops: list[dict]) -> dict[str, Any]:
    """How the server's answer was cut: on the server's segment, its data segments to
    the client (MSS from the SYN-ACK)."""
    if not hops:
        return {}
    last = hops[-1]
    rows = packets[last["segment"]]
    server, client, port = last["dst"], last["src"], last["sport"]
    data, mss = [], None
    for n, _ts, eth in rows:
        ip = eth.data
        if not (isinstance(ip, dpkt.ip.IP) and isinstance(ip.data, dpkt.tcp.TCP)):
            continue
        tcp = ip.data
        if _ip(ip.src) != server or _ip(ip.dst) != client or tcp.dport != port:
            continue
        if tcp.flags & dpkt.tcp.TH_SYN:
            for kind, value in dpkt.tcp.parse_opts(tcp.opts):
                if kind == dpkt.tcp.TCP_OPT_MSS:
                    mss = int.from_bytes(value, "big")
        elif tcp.data:
            data.append((n, len(tcp.data)))
    return {"segment": last["segment"], "mss": mss, "data_segments": len(data),
            "bytes": sum(size for _, size in data), "largest": max((s for _, s in data),
                                                                  default=0),
            "frames": [n for n, _ in data]}
