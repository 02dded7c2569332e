"""`tapstack journey`: Alice's request to www.bob.com on the story's lab, recorded on every
segment (one capture each) and in every tapstack node's trace, then told step by step:
the DNS lookup, the TCP and TLS handshakes, the HTTP exchange, how the response was
segmented, and each hop (interfaces, route, TTL, MACs, NAT before and after, the ACL rule
and the security group decision), with the frame numbers of each hop's capture.

    record()   captures and traces around one real curl in the client's namespace
    analyse()  the facts, from the captures and traces only (journey.json)
    render()   the terminal summary and a static walkthrough page (index.html)
"""

from __future__ import annotations

import html
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dpkt

from stack.lab.build import LabError, find_lab, running_labs, up
from stack.lab.topology import Lab, load_lab

DEFAULT_LAB = Path(__file__).resolve().parents[1] / "labs" / "alice-bob.toml"


def _tapstack() -> list[str]:
    return [sys.executable, "-m", "stack.cli"]


@dataclass
class Recording:
    out: Path
    pcaps: dict[str, Path] = field(default_factory=dict)
    traces: dict[str, Path] = field(default_factory=dict)
    curl: dict[str, Any] = field(default_factory=dict)


def ensure_up(path: str) -> Lab:
    lab = load_lab(path)
    if lab.name not in running_labs():
        up(lab)
    return find_lab(lab.name)


def record(lab: Lab, out: Path, url: str, client: str, ca: str) -> Recording:
    """One curl with every segment captured and every tapstack node traced."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "captures").mkdir(exist_ok=True)
    (out / "traces").mkdir(exist_ok=True)
    rec = Recording(out)
    procs: list[subprocess.Popen] = []
    try:
        for name, seg in lab.segments.items():
            path = out / "captures" / f"{name}.pcap"
            rec.pcaps[name] = path
            p = subprocess.Popen(["ip", "netns", "exec", lab.switch_netns, "tcpdump", "-i",
                                  seg.bridge, "-U", "--immediate-mode", "-n", "-Z", "root",
                                  "-s", "0", "-w", str(path)],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            procs.append(p)
            _expect(p, "listening on", f"tcpdump on segment {name}")
        for node in lab.nodes.values():
            if node.kind != "tapstack":
                continue
            path = out / "traces" / f"{node.name}.jsonl"
            rec.traces[node.name] = path
            f = open(path, "w")  # noqa: SIM115 - the child holds it; closed below
            p = subprocess.Popen([*_tapstack(), "trace", "--netns", lab.switch_netns,
                                  "--node", node.name, "--json"],
                                 stdout=f, stderr=subprocess.PIPE, text=True)
            f.close()
            procs.append(p)
            _expect(p, "tracing node", f"the trace of node {node.name}")
        keys = out / "tls-keys.log"
        body = out / "body.html"
        target = lab.nodes[client]
        start = time.time()
        r = subprocess.run(["timeout", "-k", "2", "30", "ip", "netns", "exec",
                            lab.netns(target), "env", f"SSLKEYLOGFILE={keys}", "curl", "-sS",
                            "-v", "--max-time", "20", "--cacert", ca, "-o", str(body),
                            "-w", "%{json}", url], capture_output=True, text=True)
        rec.curl = {"exit": r.returncode, "verbose": r.stderr, "url": url,
                    "seconds": round(time.time() - start, 3)}
        try:
            rec.curl["info"] = json.loads(r.stdout)
        except ValueError:
            rec.curl["info"] = {}
        _settle(rec)
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT if p.args[0] == "ip" else signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
    return rec


def _expect(p: subprocess.Popen, prefix: str, what: str) -> None:
    """The child's first line on stderr says it is ready; anything else: why it is not
    (it has exited, or printed its error)."""
    line = p.stderr.readline()
    if prefix not in line:
        raise LabError(f"{what} did not start: {line.strip() or 'it exited'}")


def _settle(rec: Recording, limit: float = 3.0) -> None:
    """Until the server's side of the connection has closed (the last frames are in),
    or `limit` seconds."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        for path in rec.traces.values():
            with open(path) as f:
                if any(('"new": "CLOSED"' in line and '"local_port": 443' in line)
                       or ('"new": "TIME-WAIT"' in line and '"local_port": 443' in line)
                       for line in f):
                    return
        time.sleep(0.05)


# -- the facts ----------------------------------------------------------------------------


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


# -- telling it ---------------------------------------------------------------------------


def summary(report: dict[str, Any]) -> list[str]:
    lines = [f"journey: {report['url']} from the lab {report['lab']}: curl exit "
             f"{report['curl']['exit']} in {report['curl']['seconds']} s"]
    dns = report["dns"]
    queried = sorted({s["node"] for s in dns if s.get("kind") == "query"})
    lines.append(f"dns: {len(dns)} messages; asked: {', '.join(queried) or 'nobody'}"
                 + ("" if any(s["node"] != "home" for s in dns if s.get("kind") == "query")
                    else " (answered from the home router's cache)"))
    tls = report["tls"]
    lines.append(f"tls: {tls.get('version')} {tls.get('cipher')}, certificate "
                 f"{tls.get('subject')}, {'verified' if tls.get('verified') else 'NOT verified'}")
    for hop in report["hops"]:
        step = (f"hop: {hop['segment']:<8} frame #{hop['frame']:<4} {hop['src']}:{hop['sport']}"
                f" > {hop['dst']}:{hop['dport']} ttl {hop['ttl']}")
        if hop.get("next_node"):
            step += f"  -> {hop['next_node']}"
            forward = next((d for d in hop.get("decisions", []) if d.get("event") == "forward"),
                           None)
            if forward:
                via = "on-link" if forward["next_hop"] == hop["dst"] or \
                    (forward["next_hop"] not in (None, "") and forward["route"].endswith(
                        "/32")) else f"via {forward['next_hop']}"
                step += f" (route {forward['route']} {via})"
        lines.append(step)
    http = report["http"]
    if http:
        lines.append(f"http: {http['request']} -> {http['status']}, {http['body_bytes']} "
                     f"bytes; {http['server']} saw the client as {http['client_seen']}")
    seg = report["segmentation"]
    if seg:
        lines.append(f"segments: {seg['data_segments']} data segments ({seg['bytes']} bytes, "
                     f"MSS {seg['mss']}) on {seg['segment']}")
    return lines


STYLE = ("body{font-family:sans-serif;max-width:72em;margin:2em auto}"
         "table{border-collapse:collapse}td,th{border:1px solid #bbb;padding:.25em .5em;"
         "font-size:90%;vertical-align:top}code{background:#f4f4f4}")


def render(report: dict[str, Any], out: Path) -> Path:
    """A static page (no external resources): one section per step, one row per hop."""
    e = html.escape
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>The journey: "
             f"{e(str(report['url']))}</title><style>{STYLE}</style></head><body>",
             f"<h1>The journey of {e(str(report['url']))}</h1>",
             f"<p>curl exit {report['curl']['exit']} in {report['curl']['seconds']} s. "
             "Every fact below comes from the captures (one per segment) and the nodes' "
             "traces recorded during this run.</p>"]
    parts.append("<section id='dns'><h2>1. The name: DNS</h2><table><tr><th>node</th>"
                 "<th>from</th><th>to</th><th>message</th></tr>")
    for s in report["dns"]:
        what = s.get("kind", "malformed") + " " + s.get("question", "")
        if s.get("kind") == "response":
            what += f" {s.get('rcode')}{' (authoritative)' if s.get('aa') else ''}: " + \
                ", ".join(s.get("answers") or s.get("referral") or [])
        parts.append(f"<tr><td>{e(s['node'])}</td><td>{e(s['from'])}</td><td>{e(s['to'])}"
                     f"</td><td>{e(what)}</td></tr>")
    parts.append("</table></section>")
    tls = report["tls"]
    parts.append("<section id='tls'><h2>2. Proving Bob is Bob: TLS</h2><ul>" + "".join(
        f"<li>{e(k)}: <code>{e(str(v))}</code></li>" for k, v in tls.items()) +
        "</ul></section>")
    parts.append("<section id='hops'><h2>3. Hop by hop: the first SYN</h2><table><tr>"
                 "<th>segment</th><th>frame</th><th>source</th><th>destination</th>"
                 "<th>TTL</th><th>MACs</th><th>next node and its decisions</th></tr>")
    for hop in report["hops"]:
        decisions = "; ".join(_decision_text(d) for d in hop.get("decisions", []))
        parts.append(
            f"<tr class='hop'><td>{e(hop['segment'])}</td><td>"
            f"<a href='captures/{e(hop['segment'])}.pcap'>#{hop['frame']}</a></td>"
            f"<td>{e(hop['src'])}:{hop['sport']}</td><td>{e(hop['dst'])}:{hop['dport']}</td>"
            f"<td>{hop['ttl']}</td><td>{e(hop['eth_src'])} &rarr; {e(hop['eth_dst'])}</td>"
            f"<td>{e(hop.get('next_node') or '(arrived)')}: {e(decisions)}</td></tr>")
    parts.append("</table></section>")
    http = report["http"]
    seg = report["segmentation"]
    parts.append("<section id='http'><h2>4. The request and the answer: HTTP</h2><p>"
                 + (f"<code>{e(http['request'])}</code> answered {http['status']} with "
                    f"{http['body_bytes']} bytes; {e(http['server'])} saw the client as "
                    f"<code>{e(str(http['client_seen']))}</code>." if http else "none")
                 + "</p>" + (f"<p>On {e(seg['segment'])}, the answer took "
                             f"{seg['data_segments']} TCP segments ({seg['bytes']} bytes, "
                             f"MSS {seg['mss']}).</p>" if seg else "") + "</section>")
    parts.append("</body></html>")
    page = out / "index.html"
    page.write_text("\n".join(parts))
    return page


def _decision_text(d: dict) -> str:
    layer, event = d.get("layer"), d.get("event")
    if event == "forward":
        return f"route {d['route']} via {d['next_hop']} out {d['out']}, TTL now {d['ttl']}"
    if event == "count":
        return f"{layer}.{d['name']}"
    if layer in ("acl", "sg"):
        return f"{layer} {d.get('direction')} {event} (rule {d.get('rule')})"
    return f"{layer} {event}"


def run(lab_path: str, out: str, url: str, client: str) -> tuple[int, list[str], Path]:
    lab = ensure_up(lab_path)
    if client not in lab.nodes:
        raise LabError(f"lab {lab.name} has no node named {client}")
    ca = subprocess.run([*_tapstack(), "ca"], capture_output=True, text=True,
                        check=True).stdout.strip()
    rec = record(lab, Path(out), url, client, ca)
    report = analyse(lab, rec, client)
    (Path(out) / "journey.json").write_text(json.dumps(report, indent=1))
    page = render(report, Path(out))
    return rec.curl["exit"], summary(report), page


def default_lab() -> str:
    return str(DEFAULT_LAB) if DEFAULT_LAB.exists() else os.path.join("labs", "alice-bob.toml")
