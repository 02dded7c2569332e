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

import json
import os
import subprocess
from pathlib import Path

from stack.journey.facts import analyse
from stack.journey.page import render, summary
from stack.journey.record import _tapstack, ensure_up, record
from stack.lab.build import LabError

DEFAULT_LAB = Path(__file__).resolve().parents[2] / "labs" / "alice-bob.toml"


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
