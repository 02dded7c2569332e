"""Telling one journey: the terminal summary and the static walkthrough page."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any


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
