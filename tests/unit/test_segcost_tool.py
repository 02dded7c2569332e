"""tools/segcost.py (first in `make bench`) moves every byte and reports both figures,
plain and with checksum offload (nothing about speed)."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_segcost_quick_reports_both_sides_plain_and_offloaded(tmp_path):
    for extra in ([], ["--offload", "csum"]):
        out = tmp_path / "segcost.json"
        r = subprocess.run([sys.executable, "tools/segcost.py", "--quick", "--json",
                            str(out), *extra], cwd=REPO, capture_output=True, text=True,
                           timeout=100)
        assert r.returncode == 0, r.stderr
        figures = json.loads(out.read_text())
        assert figures["segments"] == -(-2_000_000 // 1448)  # 2 MB in 1,448-byte segments
        assert figures["sender_us"] > 0 and figures["receiver_us"] > 0
        assert figures["offload"] == (extra[1] if extra else None)
        assert "per data segment" in r.stdout
