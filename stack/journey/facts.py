"""The facts of one journey, from its captures and traces only (journey.json)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

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
    """(frame number, time, Ethernet) for each frame; an empty or truncated capture
    gives what it holds."""
    rows: list[tuple[int, float, Any]] = []
    try:
        with open(path, "rb") as f:
            for number, (ts, buf) in enumerate(dpkt.pcap.Reader(f), start=1):
                try:
                    rows.append((number, ts, dpkt.ethernet.Ethernet(buf)))
                except (dpkt.UnpackError, dpkt.NeedData):
                    continue
    except (OSError, ValueError, dpkt.Error):
        pass
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
                                       "seconds": rec.curl.get("seconds"),
                                       "error": _curl_error(rec.curl.get("verbose", ""))}}
    report["dns"] = _dns_steps(lab, traces, rec.clock_offset)
    _dns_frames(lab, report["dns"], packets)
    report["tls"] = _tls_facts(rec.curl.get("verbose", ""))
    client_addr = lab.nodes[client].interfaces[0].addresses[0].split("/")[0]
    client_seg = lab.nodes[client].interfaces[0].segment
    syn = next(((n, ts, eth) for n, ts, eth in packets[client_seg]
                if _tcp(eth) and _ip(eth.data.src) == client_addr
                and _flags(eth) == dpkt.tcp.TH_SYN), None)
    report["hops"], report["return"] = [], []
    if syn is not None:
        seq = syn[2].data.data.seq
        report["hops"] = _follow(lab, packets, traces, client, seq, "S")
        synack = _find_synack(packets, seq)
        if synack is not None:
            server = next((h["next_node"] for h in reversed(report["hops"])
                           if h.get("arrived")), None)
            report["return"] = _follow(lab, packets, traces, server, synack, "S.")
    report["http"] = _http_facts(traces)
    report["segmentation"] = _segmentation(packets, report["hops"])
    report["icmp_to_client"] = _icmp_to(packets[client_seg], client_addr)
    report["verdict"] = _verdict(report, client, client_seg, packets)
    report["sequence"] = _sequence(lab, report, client)
    report["captures"] = {name: str(path) for name, path in rec.pcaps.items()}
    report["traces"] = {name: str(path) for name, path in rec.traces.items()}
    return report


def _tcp(eth: Any) -> bool:
    return isinstance(eth.data, dpkt.ip.IP) and isinstance(eth.data.data, dpkt.tcp.TCP)


_HANDSHAKE = dpkt.tcp.TH_SYN | dpkt.tcp.TH_ACK | dpkt.tcp.TH_FIN | dpkt.tcp.TH_RST


def _flags(eth: Any) -> int:
    """SYN, ACK, FIN, RST of a segment (not ECE, CWR, PSH, URG: an ECN-setup SYN is a
    SYN)."""
    return eth.data.data.flags & _HANDSHAKE


def _curl_error(verbose: str) -> str | None:
    """curl's own one-line error (-sS prints it last)."""
    for line in reversed(verbose.splitlines()):
        if line.startswith("curl: ("):
            return line.strip()
    return None


def _dns_steps(lab: Lab, traces: dict[str, list[dict]], offset: float) -> list[dict]:
    """Every DNS message a tapstack node received for itself (not the ones its routers
    forwarded), in time order: who asked whom what, and what came back. `time` is on
    the captures' clock."""
    steps = []
    for node, events in traces.items():
        mine = {a.split("/")[0] for i in lab.nodes[node].interfaces for a in i.addresses}
        for e in events:
            if e.get("layer") == "link" and e.get("event") == "rx" and "dns" in e \
                    and e.get("dst") in mine:
                d = e["dns"]
                steps.append({"t": e["t"], "time": e["t"] + offset, "node": node,
                              "from": e["src"], "to": e["dst"],
                              "kind": d.get("kind", "malformed"),
                              **{k: d[k] for k in ("id", "question", "rcode", "aa",
                                                   "answers", "referral", "soa") if k in d}})
    steps.sort(key=lambda s: s["t"])
    return steps


def _dns_frames(lab: Lab, steps: list[dict], packets: dict[str, list]) -> None:
    """Each DNS message's frame in the capture of the segment it arrived on (the
    receiving node's interface with that address; matched by addresses and DNS id)."""
    for step in steps:
        segment = next((i.segment for i in lab.nodes[step["node"]].interfaces
                        if step["to"] in {a.split("/")[0] for a in i.addresses}), None)
        if segment is None or "id" not in step:
            continue
        for n, _ts, eth in packets.get(segment, []):
            ip = eth.data
            if isinstance(ip, dpkt.ip.IP) and isinstance(ip.data, dpkt.udp.UDP) \
                    and _ip(ip.src) == step["from"] and _ip(ip.dst) == step["to"] \
                    and len(ip.data.data) >= 2 \
                    and int.from_bytes(ip.data.data[:2], "big") == step["id"]:
                step["segment"], step["frame"] = segment, n
                break


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


def _find_synack(packets: dict[str, list], syn_seq: int) -> int | None:
    """The server's initial sequence number, from its SYN-ACK to this SYN (tapstack's
    NATs, like most, rewrite addresses and ports, not sequence numbers)."""
    want = (syn_seq + 1) & 0xFFFFFFFF
    for rows in packets.values():
        for _n, _ts, eth in rows:
            if _tcp(eth) and _flags(eth) == dpkt.tcp.TH_SYN | dpkt.tcp.TH_ACK \
                    and eth.data.data.ack == want:
                return eth.data.data.seq
    return None


_FLAGS = {"S": dpkt.tcp.TH_SYN, "S.": dpkt.tcp.TH_SYN | dpkt.tcp.TH_ACK}


def _follow(lab: Lab, packets: dict[str, list], traces: dict[str, list[dict]],
            sender: str | None, seq: int, flags: str) -> list[dict]:
    """One packet (the first with these flags and this sequence number, which the lab's
    NATs leave alone) on every segment it crossed, in time order. Each hop names the node that
    took it further and what that node decided; the last names the node that received it
    and either kept it (`arrived`) or dropped it (`dropped`, with the reason)."""
    seen = []
    for name, rows in packets.items():
        for n, ts, eth in rows:
            if _tcp(eth) and _flags(eth) == _FLAGS[flags] and eth.data.data.seq == seq:
                ip = eth.data
                seen.append({"segment": name, "frame": n, "time": ts,
                             "src": _ip(ip.src), "dst": _ip(ip.dst), "sport": ip.data.sport,
                             "dport": ip.data.dport, "ttl": ip.ttl,
                             "eth_src": _mac(eth.src), "eth_dst": _mac(eth.dst)})
                break
    seen.sort(key=lambda h: h["time"])
    if seen:
        seen[0]["sender"] = sender
    previous = sender
    for i, hop in enumerate(seen):
        on = {nd.name for nd in lab.nodes.values()
              if hop["segment"] in {x.segment for x in nd.interfaces}} - {previous}
        if i + 1 < len(seen):
            nxt = seen[i + 1]["segment"]
            node = next((n for n in on if nxt in {x.segment for x in lab.nodes[n].interfaces}),
                        None)
        else:  # the last segment: whoever took it in
            node = next((n for n in sorted(on) if n in traces and _received(
                traces[n], seq, flags)), None)
            if node is None:
                node = next((n for n in on if hop["dst"] in _addresses(lab, n)), None)
        hop["next_node"] = node
        if node is not None and node in traces:
            hop["decisions"] = _decisions(traces[node], seq, flags)
        if i + 1 == len(seen) and node is not None:
            if hop["dst"] in _addresses(lab, node):
                hop["arrived"] = True
            else:
                hop["dropped"] = _drop_reason(hop.get("decisions", []))
        previous = node
    return seen


def _addresses(lab: Lab, node: str) -> set[str]:
    return {a.split("/")[0] for i in lab.nodes[node].interfaces for a in i.addresses}


def _received(events: list[dict], seq: int, flags: str) -> bool:
    return any(e.get("layer") == "link" and e.get("event") == "rx" and e.get("seq") == seq
               and e.get("flags") == flags for e in events)


def _decisions(events: list[dict], seq: int, flags: str) -> list[dict]:
    """What a node decided about one datagram: the events its arrival caused, from its
    `link rx` to the next frame's (a node handles one frame at a time; what it sends is
    written after the batch)."""
    out = []
    inside = False
    for e in events:
        if e.get("layer") == "link" and e.get("event") == "rx":
            if inside:
                break
            inside = e.get("seq") == seq and e.get("flags") == flags
            continue
        if inside and e.get("layer") != "link" and not (e.get("layer") == "arp"
                                                        and e.get("event") == "hit"):
            out.append({k: v for k, v in e.items() if k not in ("node", "t")})
    return out


def _drop_reason(decisions: list[dict]) -> dict[str, Any]:
    """Why a node kept a datagram that was not for it: the filter's decision, or the
    counter it counted the drop in."""
    for d in decisions:
        if d.get("layer") == "acl" and d.get("event") == "deny":
            return {"why": f"network ACL {d['direction']}: rule {d['rule']} denies it",
                    "rule": d["rule"], "filter": "acl", "direction": d["direction"],
                    "counter": f"acl.denied_{'in' if d['direction'] == 'inbound' else 'out'}"}
        if d.get("layer") == "sg" and d.get("event") == "deny new flow":
            return {"why": f"security group {d['direction']}: no rule allows a new flow to "
                           f"port {d.get('port')}", "rule": d.get("rule"), "filter": "sg",
                    "direction": d["direction"],
                    "counter": f"sg.denied_{'in' if d['direction'] == 'inbound' else 'out'}"}
    counted = [d for d in decisions if d.get("event") == "count" and _is_drop(d)]
    if counted:  # the first: the decision; what follows are its consequences
        d = counted[0]
        words = {"fwd_no_route": "no route to the destination",
                 "fwd_ttl_exceeded": "its TTL ran out",
                 "fwd_host_unreachable": "the next hop did not answer ARP",
                 "fwd_frag_needed": "too big for the next link, and Don't Fragment set",
                 "unsolicited": "the NAT has no mapping it may use for it",
                 "filtered": "the NAT's filtering refuses its source"}
        return {"why": words.get(d["name"], f"counted as {d['layer']}.{d['name']}"),
                "counter": f"{d['layer']}.{d['name']}"}
    return {"why": "no decision was recorded (the node was not traced, or the frame was "
                   "lost on the wire)"}


# The counters that count a datagram not passed on (others count what a node did to one
# it passed: a NAT mapping made, a checksum completed, a flow confirmed).
DROPS = frozenset(
    [f"ipv4.fwd_{x}" for x in ("bad_source", "frag_needed", "gso_unsupported",
                               "hook_dropped", "host_unreachable", "link_broadcast",
                               "martian_destination", "no_route", "ttl_exceeded")]
    + [f"ipv4.rx_{x}" for x in ("bad_checksum", "bad_header_length", "bad_source",
                                "bad_total_length", "bad_version", "hook_dropped",
                                "not_for_us", "truncated", "ttl_zero", "unknown_protocol")]
    + [f"conntrack.{x}" for x in ("invalid", "no_entry", "out_of_window", "table_full",
                                  "clash")]
    + [f"nat.{x}" for x in ("filtered", "unsolicited", "ports_exhausted",
                            "subscriber_limit")]
    + ["acl.denied_in", "acl.denied_out", "sg.denied_in", "sg.denied_out"])


def _is_drop(d: dict) -> bool:
    return f"{d.get('layer')}.{d.get('name')}" in DROPS


def _icmp_to(rows: list, client: str) -> list[dict]:
    """ICMP errors that reached the client: destination unreachable, time exceeded."""
    out = []
    for n, ts, eth in rows:
        ip = eth.data
        if isinstance(ip, dpkt.ip.IP) and isinstance(ip.data, dpkt.icmp.ICMP) \
                and _ip(ip.dst) == client and ip.data.type in (3, 11, 12):
            out.append({"frame": n, "time": ts, "from": _ip(ip.src), "type": ip.data.type,
                        "code": ip.data.code})
    return out


def _verdict(report: dict[str, Any], client: str, client_seg: str,
             packets: dict[str, list]) -> dict[str, Any]:
    """Where the request stopped and why, from the facts above: one sentence, the node,
    the rule or counter, and the frame to look at."""
    curl = report["curl"]
    if curl["exit"] == 0:
        return {"ok": True, "where": report["http"].get("server"),
                "text": f"delivered: {report['http'].get('request')} answered "
                        f"{report['http'].get('status')}"}
    host = urlsplit(report["url"] or "").hostname or ""
    bad = next((s for s in report["dns"] if s.get("rcode") == "NXDOMAIN" and _within(
        host, s.get("question", "")) and s.get("aa")), None)
    if bad is not None:
        answered_by = _dns_server_of(report["dns"], bad)
        frame = _dns_frame(packets[client_seg], "NXDOMAIN")
        return {"ok": False, "stage": "dns", "where": answered_by,
                "text": f"{answered_by} answered NXDOMAIN for "
                        f"{bad.get('question', '').lower()}: the "
                        "name does not exist" + (f" (the SOA says: {bad['soa'][0]})"
                                                 if bad.get("soa") else ""),
                "soa": bad.get("soa"), "segment": client_seg, "frame": frame,
                "error": curl["error"], "authoritative": bool(bad.get("aa"))}
    for direction, hops in (("forward", report["hops"]), ("return", report["return"])):
        if hops and "dropped" in hops[-1]:
            last = hops[-1]
            what = "SYN" if direction == "forward" else "SYN-ACK"
            drop = last["dropped"]
            text = (f"the {what} died at {last['next_node']}: {drop['why']}"
                    + (f" (counter {drop['counter']})" if drop.get("counter") else "")
                    + f"; last seen on {last['segment']}, frame #{last['frame']}")
            icmp = report["icmp_to_client"]
            if icmp:
                text += (f"; an ICMP error (type {icmp[0]['type']} code {icmp[0]['code']}) "
                         f"came back to {client}, frame #{icmp[0]['frame']} on {client_seg}")
            return {"ok": False, "stage": "tcp", "way": direction,
                    "where": last["next_node"], "segment": last["segment"],
                    "frame": last["frame"], "error": curl["error"], "text": text, **drop}
    if not report["hops"]:
        return {"ok": False, "stage": "client", "where": client, "error": curl["error"],
                "text": f"{client} sent no SYN: {curl['error']}"}
    if "SSL" in (curl["error"] or "") or curl["exit"] in (35, 51, 58, 60):
        fin = _client_close(packets[client_seg], report["hops"][0])
        return {"ok": False, "stage": "tls", "where": client, "error": curl["error"],
                "segment": client_seg, "frame": fin,
                "text": f"curl on {client} refused the server after the TLS handshake: "
                        f"{curl['error']}; no HTTP request was sent"
                        + (f"; {client} closed the connection, frame #{fin} on {client_seg}"
                           if fin else "")}
    return {"ok": False, "stage": "other", "where": client, "error": curl["error"],
            "text": f"curl failed: {curl['error']}"}


def _within(host: str, question: str) -> bool:
    """Whether a DNS question ('bobB.com. A') asks for the host or one of its parents
    (a resolver that minimises its questions asks com.'s servers for bobb.com only)."""
    name = question.split(" ")[0].lower().rstrip(".")
    return bool(name) and (host == name or host.endswith("." + name))


def _dns_server_of(steps: list[dict], response: dict) -> str:
    """The node that sent a response: the one that received the query it answers (the
    question, from the response's receiver's address)."""
    for s in reversed(steps):
        if s["t"] <= response["t"] and s.get("kind") == "query" and \
                s.get("question", "").lower() == response.get("question", "").lower() and \
                s["from"] == response["to"]:
            return s["node"]
    return response["from"]


def _dns_frame(rows: list, rcode: str) -> int | None:
    code = {"NXDOMAIN": 3}[rcode]
    for n, _ts, eth in rows:
        ip = eth.data
        if isinstance(ip, dpkt.ip.IP) and isinstance(ip.data, dpkt.udp.UDP) \
                and ip.data.sport == 53 and len(ip.data.data) >= 4 \
                and ip.data.data[3] & 0x0F == code:
            return n
    return None


def _client_close(rows: list, syn_hop: dict) -> int | None:
    """The client's first FIN or RST on this connection."""
    for n, _ts, eth in rows:
        if _tcp(eth) and _ip(eth.data.src) == syn_hop["src"] and \
                eth.data.data.sport == syn_hop["sport"] and \
                eth.data.data.flags & (dpkt.tcp.TH_FIN | dpkt.tcp.TH_RST):
            return n
    return None


def _sequence(lab: Lab, report: dict[str, Any], client: str) -> dict[str, Any]:
    """The messages for the sequence diagram: the DNS exchange node to node, the SYN and
    SYN-ACK hop by hop (a drop ends with a cross), the ICMP error, then the TLS and HTTP
    exchange end to end."""
    owner = {a: n for n in lab.nodes for a in _addresses(lab, n)}
    msgs: list[dict] = []
    for s in report["dns"]:
        src = owner.get(s["from"])
        if src is None:
            continue
        what = s.get("question", "")
        if s.get("kind") == "response":
            what = (f"{s.get('rcode')} {what}" if s.get("rcode") != "NOERROR" else
                    ("answer " if s.get("answers") else "referral " if s.get("referral")
                     else "no data ") + what)
        else:
            what = f"query {what}"
        msgs.append({"t": s["time"], "from": src, "to": s["node"], "label": what,
                     "kind": "dns"})
    for flags, hops in (("SYN", report["hops"]), ("SYN-ACK", report["return"])):
        sender = hops[0].get("sender") if hops else None
        for hop in hops:
            if sender is None or hop.get("next_node") is None:
                break
            msgs.append({"t": hop["time"], "from": sender, "to": hop["next_node"],
                         "label": f"{flags} ttl {hop['ttl']}", "kind": "tcp",
                         "segment": hop["segment"], "frame": hop["frame"],
                         "dropped": "dropped" in hop})
            sender = hop["next_node"]
    v = report["verdict"]
    for icmp in report["icmp_to_client"][:1]:
        source = owner.get(icmp["from"])
        if source and source != client:
            msgs.append({"t": icmp["time"], "from": source, "to": client, "kind": "icmp",
                         "label": f"ICMP type {icmp['type']} code {icmp['code']}",
                         "frame": icmp["frame"]})
    server = report["http"].get("server") or next(
        (h["next_node"] for h in report["hops"] if h.get("arrived")), None)
    if server and report["return"] and "dropped" not in report["return"][-1]:
        msgs.append({"t": None, "from": client, "to": server, "label": "ACK", "kind": "tcp"})
        if report["tls"].get("version"):
            msgs += [{"t": None, "from": client, "to": server, "kind": "tls",
                      "label": "TLS ClientHello (SNI)"},
                     {"t": None, "from": server, "to": client, "kind": "tls",
                      "label": "ServerHello .. certificate .. Finished"},
                     {"t": None, "from": client, "to": server, "kind": "tls",
                      "label": "Finished"}]
        if report["http"]:
            msgs += [{"t": None, "from": client, "to": server, "kind": "http",
                      "label": report["http"]["request"]},
                     {"t": None, "from": server, "to": client, "kind": "http",
                      "label": f"{report['http']['status']}, "
                               f"{report['segmentation'].get('data_segments', '?')} "
                               "segments"}]
        elif v.get("stage") == "tls":
            msgs.append({"t": None, "from": client, "to": server, "kind": "drop",
                         "label": "curl refuses the name: close", "dropped": True})
    timed = sorted((m for m in msgs if m["t"] is not None), key=lambda m: m["t"])
    msgs = timed + [m for m in msgs if m["t"] is None]
    path = [client] + [h["next_node"] for h in report["hops"] if h.get("next_node")]
    dns_nodes = [m["to"] for m in msgs if m["kind"] == "dns"] + \
        [m["from"] for m in msgs if m["kind"] == "dns"]
    lanes = list(dict.fromkeys([client, *path[1:2], *dns_nodes, *path]))
    return {"lanes": [n for n in lanes if n], "messages": msgs}


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
