"""`tapstack journey`: Alice's request to www.bob.com on the story's lab, recorded on every
segment (one capture each) and in every tapstack node's trace, then told step by step:
the DNS lookup, the TCP and TLS handshakes, the HTTP exchange, how the response was
segmented, and each hop (interfaces, route, TTL, MACs, NAT before and after, the ACL rule
and the security group decision), with the frame numbers of each hop's capture.

    record.record()   captures and traces around one real curl in the client's namespace
    facts.analyse()   the facts, from the captures and traces only (journey.json)
    page.render()     the terminal summary and a static walkthrough page (index.html)
"""

from __future__ import annotations

import html
import json
import os
import subprocess
from pathlib import Path

from stack.lab.build import LabError

DEFAULT_LAB = Path(__file__).resolve().parents[2] / "labs" / "alice-bob.toml"


def run(lab_path: str, out: str, url: str, client: str, scenario: str | None = None
        ) -> tuple[bool, list[str], Path]:
    """Record, analyse and tell one journey. Returns whether it went as meant (curl
    succeeded; with a scenario: it stopped where the scenario breaks, and every change
    was undone after), the summary's lines and the page."""
    from stack.journey import scenarios  # here: the CLI imports this package for its names
    from stack.journey.facts import analyse
    from stack.journey.page import render, summary
    from stack.journey.record import _tapstack, ensure_up, record
    from stack.journey.scenarios import SCENARIOS

    lab = ensure_up(lab_path)
    if client not in lab.nodes:
        raise LabError(f"lab {lab.name} has no node named {client}")
    ca = subprocess.run([*_tapstack(), "ca"], capture_output=True, text=True,
                        check=True).stdout.strip()
    chosen = SCENARIOS[scenario] if scenario else None
    made = scenarios.apply(lab, chosen, client) if chosen else []
    contrast = None
    try:
        rec = record(lab, Path(out), chosen.url or url if chosen else url, client, ca,
                     chosen.max_time if chosen else 20.0)
        if chosen and chosen.contrast:
            contrast = _contrast(lab, client, Path(out), url)
    finally:
        failed = scenarios.undo(lab, made)
    report = analyse(lab, rec, client)
    if contrast is not None:
        report["contrast"] = contrast
    if chosen:
        report["scenario"] = {"name": chosen.name, "title": chosen.title,
                              "as_meant": chosen.met(report) is None,
                              "differs": chosen.met(report),
                              "lesson": chosen.lesson,
                              "changes": [{"node": c.node, "run": c.shown(),
                                           "undone_by": c.shown(c.undo)} for c in made],
                              "not_undone": failed}
    frame_html = _open_request_frame(report, Path(out), rec.pcaps,
                                     lab.nodes[client].interfaces[0].segment)
    drawings = _draw(lab, report, Path(out), client)
    (Path(out) / "journey.json").write_text(json.dumps(report, indent=1))
    page = render(report, Path(out), drawings, frame_html)
    lines = summary(report)
    if failed:
        lines += [f"could not undo: {f}" for f in failed]
    # with a scenario: the run did what it meant, and left the lab as it was
    ok = report["scenario"]["as_meant"] and not failed if chosen else rec.curl["exit"] == 0
    return ok, lines, page


def _contrast(lab, client: str, out: Path, url: str) -> dict:
    """The same chunks over UDP and TCP from the server to the client (contrast.py)."""
    from urllib.parse import urlsplit

    from stack.journey import contrast

    netns = lab.netns(lab.nodes[client])
    segment = lab.nodes[client].interfaces[0].segment
    result = contrast.measure(netns, lab.switch_netns, lab.segments[segment].bridge,
                              urlsplit(url).hostname or "www.bob.com", out)
    if "error" in result:
        return {"error": result["error"]}
    return contrast.analyse(result, contrast.dropped_by_iptables(netns))


def _open_request_frame(report: dict, out: Path, pcaps: dict[str, Path],
                        segment: str) -> str | None:
    """The frame that carried the HTTP request on the client's own segment, opened layer
    by layer with curl's key log (report["frame"] keeps what the page shows)."""
    from stack.journey.layers import LayersError, layers_html, open_frame, request_frame

    keys = out / "tls-keys.log"
    if not keys.exists() or segment not in pcaps:
        return None
    try:
        number = request_frame(pcaps[segment], keys)
        if number is None:
            return None
        opened = open_frame(pcaps[segment], number, keys)
    except LayersError as exc:
        report["frame"] = {"error": str(exc)}
        return f"<p>{html.escape(str(exc))}</p>"
    report["frame"] = {"segment": segment, "frame": number, "length": opened["length"],
                       "layers": [{k: layer.get(k) for k in ("name", "osi", "offset",
                                                            "length", "decrypted")}
                                  for layer in opened["layers"]],
                       "http": next((layer.get("text") for layer in opened["layers"]
                                     if layer["protocol"] == "http"), None)}
    return (f"<p>Frame <a href='captures/{html.escape(segment)}.pcap'>#{number}</a> on "
            f"{html.escape(segment)}, the one that carried Alice's request: each layer wraps "
            "the next. The HTTP inside TLS is shown decrypted with the session keys curl "
            "wrote (SSLKEYLOGFILE, in tls-keys.log); on the wire it is ciphertext.</p>"
            + layers_html(opened))


def _draw(lab, report: dict, out: Path, client: str) -> dict[str, str]:
    """The sequence diagram and the lab's picture, as inline SVG and as files."""
    from stack.journey.drawing import sequence_svg, topology_svg

    path = [client] + [h["next_node"] for h in report["hops"] if h.get("next_node")]
    drawings = {"sequence": sequence_svg(report["sequence"]["lanes"],
                                         report["sequence"]["messages"]),
                "topology": topology_svg(lab, path)}
    for name, svg in drawings.items():
        (out / f"{name}.svg").write_text(svg)
    return drawings


def default_lab() -> str:
    return str(DEFAULT_LAB) if DEFAULT_LAB.exists() else os.path.join("labs", "alice-bob.toml")
