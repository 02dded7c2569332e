"""Telling one journey: the terminal summary and the static walkthrough page (one file,
no scripts, no external resources: the pictures are inline SVG)."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

e = html.escape


def summary(report: dict[str, Any]) -> list[str]:
    lines = [f"journey: {report['url']} from the lab {report['lab']}: curl exit "
             f"{report['curl']['exit']} in {report['curl']['seconds']} s"]
    if report.get("scenario"):
        s = report["scenario"]
        lines.append(f"scenario {s['name']}: {s['title']}; "
                     + "; ".join(c["run"] for c in s["changes"]))
    dns = report["dns"]
    queried = sorted({s["node"] for s in dns if s.get("kind") == "query"})
    lines.append(f"dns: {len(dns)} messages; asked: {', '.join(queried) or 'nobody'}"
                 + ("" if any(s["node"] != "home" for s in dns if s.get("kind") == "query")
                    else " (answered from the home router's cache)"))
    tls = report["tls"]
    if tls:
        lines.append(f"tls: {tls.get('version')} {tls.get('cipher')}, certificate "
                     f"{tls.get('subject')}, "
                     f"{'verified' if tls.get('verified') else 'NOT verified'}")
    for what, hops in (("hop", report["hops"]), ("back", report.get("return", []))):
        for hop in hops:
            lines.append(f"{what}: {_hop_line(hop)}")
    http = report["http"]
    if http:
        lines.append(f"http: {http['request']} -> {http['status']}, {http['body_bytes']} "
                     f"bytes; {http['server']} saw the client as {http['client_seen']}")
    seg = report["segmentation"]
    if seg and seg.get("data_segments"):
        lines.append(f"segments: {seg['data_segments']} data segments ({seg['bytes']} bytes, "
                     f"MSS {seg['mss']}) on {seg['segment']}")
    c = report.get("contrast")
    if c and "udp" in c:
        lines.append(f"contrast: {c['count']} chunks each way, {c['loss']:.0%} loss on the "
                     f"last link: UDP {c['udp']['received']} arrived, "
                     f"{len(c['udp']['lost'])} lost, max delay {c['udp']['delay_ms']['max']} "
                     f"ms; TCP {c['tcp']['received']} arrived in order, "
                     f"{c['tcp'].get('retransmitted', '?')} retransmitted, max delay "
                     f"{c['tcp']['delay_ms']['max']} ms")
    elif c:
        lines.append(f"contrast: not measured: {c.get('error')}")
    v = report.get("verdict", {})
    if v and not v.get("ok"):
        lines.append(f"stopped: {v['text']}")
    return lines


def _hop_line(hop: dict) -> str:
    step = (f"{hop['segment']:<8} frame #{hop['frame']:<4} {hop['src']}:{hop['sport']}"
            f" > {hop['dst']}:{hop['dport']} ttl {hop['ttl']}")
    if hop.get("next_node"):
        step += f"  -> {hop['next_node']}"
        forward = next((d for d in hop.get("decisions", []) if d.get("event") == "forward"),
                       None)
        if forward:
            step += f" (route {forward['route']} {_via(forward, hop)})"
        if "dropped" in hop:
            step += f" DROPPED: {hop['dropped']['why']}"
        elif hop.get("arrived"):
            step += " (arrived)"
    return step


def _via(forward: dict, hop: dict) -> str:
    if forward["next_hop"] == forward.get("dst", hop["dst"]):
        return "on-link"
    return f"via {forward['next_hop']}"


STYLE = ("body{font-family:sans-serif;max-width:76em;margin:2em auto;line-height:1.35}"
         "table{border-collapse:collapse}td,th{border:1px solid #bbb;padding:.25em .5em;"
         "font-size:90%;vertical-align:top}code{background:#f4f4f4}"
         ".verdict{padding:.6em 1em;border-left:6px solid #2a7}"
         ".verdict.failed{border-color:#c33;background:#fff4f4}"
         "tr.dropped td{background:#fdd}svg{max-width:100%;height:auto}")


def render(report: dict[str, Any], out: Path, drawings: dict[str, str] | None = None,
           frame_html: str | None = None) -> Path:
    """The walkthrough: one section per step of the story, one row per hop. `drawings`
    holds inline SVG (the sequence diagram, the lab); `frame_html` one frame opened layer
    by layer."""
    drawings = drawings or {}
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>The journey: "
             f"{e(str(report['url']))}</title><style>{STYLE}</style></head><body>",
             f"<h1>The journey of {e(str(report['url']))}</h1>",
             f"<p>curl exit {report['curl']['exit']} in {report['curl']['seconds']} s. "
             "Every fact below comes from the captures (one per segment, in "
             "<code>captures/</code>) and the nodes' traces (<code>traces/</code>) recorded "
             "during this run.</p>"]
    parts.append(_outcome(report))
    parts.append(_dns(report))
    parts.append(_hops(report))
    parts.append(_tls(report))
    parts.append(_http(report))
    parts.append("<section id='frame'><h2>5. One frame, layer by layer</h2>"
                 + (frame_html or "<p>No frame carried an HTTP request in this run.</p>")
                 + "</section>")
    parts.append("<section id='sequence'><h2>6. The whole exchange</h2>"
                 "<p>Each arrow is a message; the SYN and the SYN-ACK are drawn once per hop "
                 "(hover an arrow for its segment and frame).</p>"
                 + drawings.get("sequence", "<p>(no drawing)</p>") + "</section>")
    parts.append("<section id='lab'><h2>7. The lab</h2><p>The nodes and the segments "
                 "between them; the path this request took is highlighted.</p>"
                 + drawings.get("topology", "<p>(no drawing)</p>") + "</section>")
    if "contrast" in report:
        from stack.journey.contrast import html_section

        parts.append(html_section(report["contrast"]))
    parts.append("</body></html>")
    page = out / "index.html"
    page.write_text("\n".join(parts))
    return page


def _outcome(report: dict[str, Any]) -> str:
    v = report.get("verdict", {})
    s = report.get("scenario")
    parts = ["<section id='outcome'><h2>What happened</h2>"]
    if s:
        parts.append(f"<p><b>Scenario {e(s['name'])}: {e(s['title'])}.</b> {e(s['lesson'])}"
                     "</p><p>Changed for this run (and undone after it):</p><ul>"
                     + "".join(f"<li><code>{e(c['run'])}</code> (undone by "
                               f"<code>{e(c['undone_by'])}</code>)</li>"
                               for c in s["changes"]) + "</ul>")
    if v.get("ok"):
        parts.append(f"<p class='verdict'>{e(v['text'])}.</p>")
    elif v:
        link = ""
        if v.get("segment") and v.get("frame"):
            link = (f" See <a href='captures/{e(v['segment'])}.pcap'>{e(v['segment'])}"
                    f".pcap</a>, frame #{v['frame']}.")
        parts.append(f"<p class='verdict failed'><b>Stopped at {e(str(v.get('where')))}</b>"
                     f": {e(v['text'])}.{link}</p>")
        if v.get("error"):
            parts.append(f"<p>What Alice saw: <code>{e(v['error'])}</code></p>")
    parts.append("</section>")
    return "".join(parts)


def _dns(report: dict[str, Any]) -> str:
    parts = ["<section id='dns'><h2>1. The name: DNS</h2><p>Every DNS message a tapstack "
             "node received, in time order (the home router forwards, the ISP's resolver "
             "walks the hierarchy, the authoritative servers answer).</p><table><tr>"
             "<th>node</th><th>frame</th><th>from</th><th>to</th><th>message</th></tr>"]
    for s in report["dns"]:
        what = s.get("kind", "malformed") + " " + s.get("question", "")
        if s.get("kind") == "response":
            what += f" {s.get('rcode')}{' (authoritative)' if s.get('aa') else ''}: " + \
                ", ".join(s.get("answers") or s.get("referral") or s.get("soa") or [])
        frame = (f"<a href='captures/{e(s['segment'])}.pcap'>{e(s['segment'])} "
                 f"#{s['frame']}</a>" if s.get("frame") else "")
        parts.append(f"<tr class='dns'><td>{e(s['node'])}</td><td>{frame}</td>"
                     f"<td>{e(s['from'])}</td><td>{e(s['to'])}</td><td>{e(what)}</td></tr>")
    parts.append("</table></section>")
    return "".join(parts)


def _hops(report: dict[str, Any]) -> str:
    parts = ["<section id='hops'><h2>2. Hop by hop: the SYN and the SYN-ACK</h2>"
             "<p>The first segment of the TCP handshake, found on every segment of the lab "
             "by its sequence number (the lab's NATs rewrite addresses and ports, not that), "
             "and what each node it met decided; then Bob's answer on its way back.</p>"]
    for title, hops, cls in (("Alice to Bob: the SYN", report["hops"], "hop"),
                             ("Bob to Alice: the SYN-ACK", report.get("return", []), "back")):
        if not hops:
            continue
        parts.append(f"<h3>{title}</h3><table><tr><th>segment</th><th>frame</th><th>source"
                     "</th><th>destination</th><th>TTL</th><th>MACs</th><th>next node and "
                     "its decisions</th></tr>")
        for hop in hops:
            decisions = "; ".join(_decision_text(d) for d in hop.get("decisions", []))
            end = ""
            if "dropped" in hop:
                end = f" DROPPED: {hop['dropped']['why']}"
            elif hop.get("arrived"):
                end = " (arrived)"
            row = f"{cls} dropped" if "dropped" in hop else cls
            parts.append(
                f"<tr class='{row}'><td>{e(hop['segment'])}</td><td>"
                f"<a href='captures/{e(hop['segment'])}.pcap'>#{hop['frame']}</a></td>"
                f"<td>{e(hop['src'])}:{hop['sport']}</td><td>{e(hop['dst'])}:{hop['dport']}"
                f"</td><td>{hop['ttl']}</td><td>{e(hop['eth_src'])} &rarr; "
                f"{e(hop['eth_dst'])}</td><td>{e(hop.get('next_node') or '?')}: "
                f"{e(decisions)}{e(end)}</td></tr>")
        parts.append("</table>")
    if not report["hops"]:
        parts.append("<p>No SYN left the client.</p>")
    parts.append("</section>")
    return "".join(parts)


def _tls(report: dict[str, Any]) -> str:
    tls = report["tls"]
    body = ("<ul>" + "".join(f"<li>{e(k)}: <code>{e(str(v))}</code></li>"
                             for k, v in tls.items()) + "</ul>") if tls else \
        "<p>No TLS handshake took place.</p>"
    return f"<section id='tls'><h2>3. Proving Bob is Bob: TLS</h2>{body}</section>"


def _http(report: dict[str, Any]) -> str:
    http, seg = report["http"], report["segmentation"]
    text = (f"<code>{e(http['request'])}</code> answered {http['status']} with "
            f"{http['body_bytes']} bytes; {e(http['server'])} saw the client as "
            f"<code>{e(str(http['client_seen']))}</code>." if http else
            "No request reached a server.")
    cut = (f"<p>On {e(seg['segment'])}, the answer took {seg['data_segments']} TCP segments "
           f"({seg['bytes']} bytes, MSS {seg['mss']}).</p>"
           if seg and seg.get("data_segments") else "")
    return (f"<section id='http'><h2>4. The request and the answer: HTTP</h2><p>{text}</p>"
            f"{cut}</section>")


def _decision_text(d: dict) -> str:
    layer, event = d.get("layer"), d.get("event")
    if event == "forward":
        return f"route {d['route']} via {d['next_hop']} out {d['out']}, TTL now {d['ttl']}"
    if event == "count":
        return f"{layer}.{d['name']}"
    if layer in ("acl", "sg"):
        return f"{layer} {d.get('direction')} {event} (rule {d.get('rule')})"
    return f"{layer} {event}"
