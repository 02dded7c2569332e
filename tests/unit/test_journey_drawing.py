"""The journey page's pictures: the lab drawing shows every node with its addresses and
every segment, boxes never overlap, and the packet's path stands out; the sequence
diagram draws one arrow per message, pointing from sender to receiver, top to bottom,
with a cross where a packet died and every label escaped."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from itertools import pairwise
from pathlib import Path

import pytest

from stack.journey.drawing import PATH, sequence_svg, topology_svg
from stack.lab.topology import load_lab, parse_lab

LABS = sorted((Path(__file__).resolve().parents[2] / "labs").glob("*.toml"))
NS = {"s": "http://www.w3.org/2000/svg"}
STORY = ["alice", "home", "isp", "core", "igw", "subnet", "bob"]


def _parse(svg: str) -> ET.Element:
    root = ET.fromstring(svg)
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    assert "<script" not in svg and "href" not in svg      # nothing runs, nothing fetched
    return root


def _nodes(root: ET.Element) -> dict[str, ET.Element]:
    return {g.get("data-node"): g for g in root.iterfind(".//s:g[@class='node']", NS)}


def _segments(root: ET.Element) -> dict[str, list[ET.Element]]:
    found: dict[str, list[ET.Element]] = {}
    for g in root.iter("{http://www.w3.org/2000/svg}g"):
        if (g.get("class") or "").split()[:1] == ["segment"]:
            found.setdefault(g.get("data-segment"), []).append(g)
    return found


def _texts(el: ET.Element) -> list[str]:
    return [t.text or "" for t in el.iter("{http://www.w3.org/2000/svg}text")]


def _rect(g: ET.Element) -> tuple[float, float, float, float]:
    r = g.find("s:rect", NS)
    return (float(r.get("x")), float(r.get("y")), float(r.get("width")),
            float(r.get("height")))


def _check_layout(lab, root: ET.Element) -> None:
    nodes = _nodes(root)
    assert sorted(nodes) == sorted(lab.nodes)
    for name, g in nodes.items():
        assert len(g.findall("s:rect", NS)) == 1
        texts = _texts(g)
        assert texts[:2] == [name, lab.nodes[name].kind]
        assert texts[2:] == [a for i in lab.nodes[name].interfaces for a in i.addresses]
    segments = _segments(root)
    assert set(segments) == set(lab.segments)
    for s, groups in segments.items():
        assert s in [t for g in groups for t in _texts(g)], f"segment {s} is not labelled"
    width, height = (float(v) for v in root.get("viewBox").split()[2:])
    rects = {n: _rect(g) for n, g in nodes.items()}
    for n, (x, y, w, h) in rects.items():
        assert x >= 0 and x + w <= width and y >= 0 and y + h <= height, n
        for m, (x2, y2, w2, h2) in rects.items():
            if n < m:
                assert x + w <= x2 or x2 + w2 <= x or y + h <= y2 or y2 + h2 <= y, \
                    f"{n} and {m} overlap"


@pytest.mark.parametrize("path", LABS, ids=lambda p: p.stem)
def test_every_lab_draws_every_node_address_and_segment(path):
    lab = load_lab(str(path))
    svg = topology_svg(lab)
    _check_layout(lab, _parse(svg))
    assert svg == topology_svg(lab)                          # deterministic
    assert PATH not in svg                                   # no path, no highlight


def test_the_packets_path_is_highlighted_and_nothing_else():
    lab = load_lab(str(next(p for p in LABS if p.stem == "alice-bob")))
    root = _parse(topology_svg(lab, STORY))
    _check_layout(lab, root)
    for name, g in _nodes(root).items():
        rect = g.find("s:rect", NS)
        assert (rect.get("stroke") == PATH) == (name in STORY), name
        assert ("on-path" in rect.get("class").split()) == (name in STORY), name
    hot = {s for s, groups in _segments(root).items()
           if any("on-path" in g.get("class").split() for g in groups)}
    assert hot == {"home", "access", "transit", "edge", "vpc", "subnet"}
    # the path runs left to right along the top row; the name servers hang below it
    rects = {n: _rect(g) for n, g in _nodes(root).items()}
    assert [rects[n][0] for n in STORY] == sorted(rects[n][0] for n in STORY)
    assert len({rects[n][1] for n in STORY}) == 1
    assert all(rects[n][1] > rects["core"][1] + rects["core"][3]
               for n in ("resolver", "root", "comns", "bobns"))


def test_an_awkward_lab_still_draws_everything_once():
    """A host on two segments already drawn elsewhere, a tree two levels deep, a node
    the path never reaches, a segment nobody is on, and a path that is not a path."""
    def node(name, *segs, kind="tapstack"):
        return {"name": name, "kind": kind,
                "interface": [{"segment": s, "addresses": [f"10.{k}.{i}.1/24"]}
                              for k, (i, s) in enumerate(enumerate(segs))]}
    data = {"name": "odd",
            "segment": [{"name": s} for s in ("a", "b", "c", "d", "lonely", "far")],
            "node": [node("h", "a", kind="linux"), node("r", "a", "b", "c"),
                     node("s", "b"), node("t", "c", "d"), node("u", "d"),
                     node("multi", "b", "c"), node("island", "far")]}
    lab = parse_lab(data, "odd.toml")
    for path in (None, ["h", "r", "s"], ["h", "u", "nobody"], ["island"]):
        svg = topology_svg(lab, path)
        root = _parse(svg)
        _check_layout(lab, root)
        for name, g in _nodes(root).items():
            assert (g.find("s:rect", NS).get("stroke") == PATH) == (name in (path or []))
    assert 'stroke-dasharray="5 4"' in topology_svg(lab)     # multi's second segment


LANES = ["alice", "home", "isp", "core", "bob"]


def _messages() -> list[dict]:
    return [
        {"t": 10.0, "from": "alice", "to": "home", "label": "DNS query www.bob.com A",
         "kind": "dns"},
        {"t": 10.0125, "from": "home", "to": "alice", "label": "answer www.bob.com A",
         "kind": "dns"},
        {"t": 10.02, "from": "alice", "to": "home", "label": "SYN", "kind": "tcp",
         "segment": "home", "frame": 7},
        {"from": "alice", "to": "nobody", "label": "not a lane"},
        {"t": 10.03, "from": "home", "to": "core", "label": "SYN", "kind": "tcp",
         "segment": "transit", "frame": 3, "dropped": True},
        {"t": None, "from": "core", "to": "alice", "label": "ICMP unreachable",
         "kind": "icmp"},
        {"from": "bob", "to": "alice", "label": "<script>alert(1)</script>",
         "kind": "http"},
    ]


def _lane_x(root: ET.Element) -> dict[str, float]:
    xs: dict[str, float] = {}
    for g in root.iterfind(".//s:g[@class='lane']", NS):
        x, _, w, _ = _rect(g)
        xs.setdefault(g.get("data-lane"), x + w / 2)
    return xs


def test_one_arrow_per_message_pointing_from_sender_to_receiver():
    msgs = _messages()
    svg = sequence_svg(LANES, msgs)
    root = _parse(svg)
    lane_x = _lane_x(root)
    assert list(lane_x) == LANES
    assert [float(x) for x in lane_x.values()] == sorted(lane_x.values())
    drawn = root.findall(".//s:g[@class='msg']", NS)
    shown = [m for m in msgs if m["to"] in LANES]
    assert [(g.get("data-from"), g.get("data-to")) for g in drawn] == \
        [(m["from"], m["to"]) for m in shown]
    ys = []
    for g, m in zip(drawn, shown, strict=True):
        line = g.find("s:line[@class='arrow']", NS)
        x1, x2 = float(line.get("x1")), float(line.get("x2"))
        assert x1 == pytest.approx(lane_x[m["from"]], abs=0.2)
        assert (x2 > x1) == (LANES.index(m["to"]) > LANES.index(m["from"]))
        assert x2 == pytest.approx(lane_x[m["to"]], abs=0.2)
        if m.get("dropped"):     # a cross on the lane of the node that dropped it
            assert g.find("s:g[@class='drop-cross']", NS) is not None
        else:
            assert g.find("s:g[@class='drop-cross']", NS) is None
        assert line.get("y1") == line.get("y2")
        ys.append(float(line.get("y1")))
        assert m["label"] in _texts(g)
    assert all(a < b for a, b in pairwise(ys))
    assert "<script>" not in svg and "&lt;script&gt;" in svg
    titles = [t.text for t in root.iterfind(".//s:g[@class='msg']/s:title", NS)]
    assert titles == ["segment home frame #7", "segment transit frame #3"]
    texts = _texts(root)
    assert "+0.0 ms" in texts and "+12.5 ms" in texts and "+30.0 ms" in texts
    assert "not a lane" not in texts


def test_height_grows_with_the_messages_and_output_is_stable():
    def height(n: int) -> float:
        msgs = [{"from": "alice", "to": "bob", "label": f"m{i}"} for i in range(n)]
        return float(ET.fromstring(sequence_svg(LANES, msgs)).get("height"))
    assert height(20) - height(10) == pytest.approx(220)
    assert sequence_svg(LANES, _messages()) == sequence_svg(LANES, _messages())
    empty = _parse(sequence_svg([], [{"from": "a", "to": "b", "label": "x"}]))
    assert empty.findall(".//s:g[@class='msg']", NS) == []
