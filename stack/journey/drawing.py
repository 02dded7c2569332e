"""Pictures for the walkthrough page, as inline SVG text (no script, no fonts to fetch).

topology_svg() draws the lab the way a network engineer sketches it: hosts and routers as
boxes, each layer-2 segment (one broadcast domain, a bridge in the lab) as a line that
the boxes attach to. The packet's way through the lab runs left to right along the top
row; whatever hangs off that way (name servers, the ISP's resolver) hangs below the node
or segment it is reached through. sequence_svg() draws who sent what to whom, in time
order, one lifeline per node: the classic ladder diagram of a protocol exchange.

Both are pure functions of their arguments and lay out deterministically: the same lab
and the same messages give the same bytes.
"""

from __future__ import annotations

import html
from collections import deque
from dataclasses import dataclass, field
from itertools import pairwise

from stack.lab.topology import Lab, LabNode

SANS = "DejaVu Sans, Helvetica, Arial, sans-serif"
MONO = "DejaVu Sans Mono, Menlo, Consolas, monospace"
PATH = "#e8590c"          # the packet's path: boxes and segments it crossed
WIRE = "#868e96"          # every other segment
FILL = {"linux": "#e7f5ff", "tapstack": "#fff4e0"}
KIND_COLOURS = {"dns": "#1971c2", "tcp": "#495057", "tls": "#7048e8", "http": "#2f9e44",
                "icmp": "#d9480f", "drop": "#e03131"}
DROP = "#e03131"


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _n(v: float) -> str:
    return f"{v:.1f}".removesuffix(".0")


def _width(text: str, size: float, mono: bool = False, bold: bool = False) -> float:
    """A generous guess at the rendered width: SVG text cannot be measured without a
    browser, so boxes are sized for the widest of the usual sans and monospace fonts."""
    return len(text) * size * (0.62 if mono else 0.66 if bold else 0.6)


def _text(x: float, y: float, text: str, size: float = 11, anchor: str = "middle",
          fill: str = "#212529", mono: bool = False, extra: str = "") -> str:
    family = f' font-family="{MONO}"' if mono else ""
    return (f'<text x="{_n(x)}" y="{_n(y)}" font-size="{_n(size)}" text-anchor="{anchor}" '
            f'fill="{fill}"{family}{extra}>{_e(text)}</text>')


def _svg(width: float, height: float, title: str, body: list[str]) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{_n(width)}" '
            f'height="{_n(height)}" viewBox="0 0 {_n(width)} {_n(height)}" role="img" '
            f'aria-label="{_e(title)}" font-family="{SANS}" '
            f'style="max-width:100%;height:auto"><title>{_e(title)}</title>'
            + "".join(body) + "</svg>")


# ---------------------------------------------------------------- topology

GAP = 18            # between neighbouring boxes in a row below the path
SEG_MIN = 48        # the shortest line drawn for a segment between two boxes on the path
DROP_H = 34         # from the lowest box of a row to the segment lines of the row below
RISE = 20           # from a segment line down to the boxes attached to it
TOP = 16


@dataclass(slots=True)
class _Box:
    """A node, drawn as a box: its name, its kind, then one address per line."""
    node: LabNode
    level: int                                   # 0 is the top row: the packet's path
    groups: list[_Group] = field(default_factory=list)
    x: float = 0.0                               # centre
    y: float = 0.0                               # top

    @property
    def addresses(self) -> list[str]:
        return [a for i in self.node.interfaces for a in i.addresses]

    @property
    def w(self) -> float:
        return max(84.0, _width(self.node.name, 13, bold=True) + 20,
                   _width(self.node.kind, 11) + 20,
                   *(_width(a, 11, mono=True) + 18 for a in self.addresses))

    @property
    def h(self) -> float:
        return 40.0 + 14 * len(self.addresses)


@dataclass(slots=True)
class _Group:
    """A segment hanging below a box (or below a segment of the top row): a horizontal
    line with the boxes attached to it underneath."""
    segment: str
    level: int                                   # the row of its line and of its boxes
    members: list[_Box] = field(default_factory=list)
    labelled: bool = True                        # False: the top row already names it
    x: float = 0.0                               # where the line from above comes down
    bus_y: float = 0.0
    left: float = 0.0                            # the room it has in its row
    span: float = 0.0


def _row_span(spans: list[float]) -> float:
    return sum(spans) + GAP * (len(spans) - 1) if spans else 0.0


def _box_span(b: _Box) -> float:
    return max(b.w, _row_span([_group_span(g) for g in b.groups]))


def _group_span(g: _Group) -> float:
    label = 2 * (_width(g.segment, 11) + 12) if g.labelled else 0.0
    return max(label, 40.0, _row_span([_box_span(m) for m in g.members]))


def _segments_of(node: LabNode) -> list[str]:
    return list(dict.fromkeys(i.segment for i in node.interfaces))


def _spine(lab: Lab, path: list[str] | None,
           segs: dict[str, list[str]]) -> tuple[list[str], list[str]]:
    """The top row: the given path if each step shares a segment with the next; else the
    shortest way (breadth first along segments) from the first Linux host to the node
    farthest from it, which in a lab drawn as a story is the server at its end."""
    names = [n for n in path or [] if n in lab.nodes]
    if names and len(set(names)) == len(names):
        between = [next((s for s in segs[a] if s in segs[b]), None)
                   for a, b in pairwise(names)]
        if all(between):
            return names, [s for s in between if s]
    if not lab.nodes:
        return [], []
    start = names[0] if names else next(
        (n for n, node in lab.nodes.items() if node.kind == "linux"), next(iter(lab.nodes)))
    parent: dict[str, tuple[str, str] | None] = {start: None}
    queue = deque([start])
    while queue:
        here = queue.popleft()
        for s in segs[here]:
            for other in lab.nodes:
                if other not in parent and s in segs[other]:
                    parent[other] = (here, s)
                    queue.append(other)
    end = names[-1] if names and names[-1] in parent else list(parent)[-1]
    nodes, links = [end], []
    while (step := parent[nodes[-1]]) is not None:
        nodes.append(step[0])
        links.append(step[1])
    return nodes[::-1], links[::-1]


def _hang(lab: Lab, spine: list[str], spine_segs: list[str], segs: dict[str, list[str]]
          ) -> tuple[dict[str, _Box], list[_Group], list[_Box | _Group]]:
    """Breadth first from the top row: each segment not yet drawn hangs below the box it
    is first reached from, each node not yet drawn below the segment it is first reached
    through. Returns the boxes, the groups under the top row's segments, and whatever the
    top row does not reach at all (drawn at the end of the second row)."""
    boxes = {n: _Box(lab.nodes[n], 0) for n in spine}
    under_links = [_Group(s, 1, labelled=False) for s in spine_segs]
    seen = set(spine_segs)
    queue: deque[_Box | _Group] = deque()
    for i, n in enumerate(spine):
        queue.append(boxes[n])
        if i < len(under_links):
            queue.append(under_links[i])
    loose: list[_Box | _Group] = []

    def drain() -> None:
        while queue:
            item = queue.popleft()
            if isinstance(item, _Box):
                for s in segs[item.node.name]:
                    if s not in seen:
                        seen.add(s)
                        item.groups.append(_Group(s, item.level + 1))
                        queue.append(item.groups[-1])
            else:
                for n in lab.nodes:
                    if n not in boxes and item.segment in segs[n]:
                        boxes[n] = _Box(lab.nodes[n], item.level)
                        item.members.append(boxes[n])
                        queue.append(boxes[n])

    drain()
    for n in lab.nodes:
        if n not in boxes:
            boxes[n] = _Box(lab.nodes[n], 1)
            loose.append(boxes[n])
            queue.append(boxes[n])
            drain()
    loose += [_Group(s, 1) for s in lab.segments if s not in seen]
    return boxes, under_links, loose


def _place_box(b: _Box, cx: float, tops: dict[int, float], buses: dict[int, float],
               left: float | None = None) -> None:
    """Puts the box's centre at cx and its groups side by side below it, from `left`
    (centred under the box unless told). Each group's line comes down from the box's
    middle if the group reaches under it, else from the box edge nearest to it."""
    b.x, b.y = cx, tops[b.level]
    if left is None:
        left = cx - _row_span([_group_span(g) for g in b.groups]) / 2
    inner = (cx - b.w / 2 + 10, cx + b.w / 2 - 10)
    for g in b.groups:
        span = _group_span(g)
        middle, near = left + span / 2, min(max(left + span / 2, inner[0]), inner[1])
        drop = next((x for x in (cx, near) if left + 8 <= x <= left + span - 8), middle)
        _place_group(g, left, tops, buses, drop)
        left += span + GAP


def _place_group(g: _Group, left: float, tops: dict[int, float],
                 buses: dict[int, float], drop: float | None = None) -> None:
    g.left, g.span = left, _group_span(g)
    g.x, g.bus_y = left + g.span / 2 if drop is None else drop, buses[g.level]
    x = left + (g.span - _row_span([_box_span(m) for m in g.members])) / 2
    for m in g.members:
        _place_box(m, x + _box_span(m) / 2, tops, buses)
        x += _box_span(m) + GAP


def _draw_box(b: _Box, on_path: bool) -> str:
    left = b.x - b.w / 2
    stroke = (f'stroke="{PATH}" stroke-width="3"' if on_path
              else 'stroke="#495057" stroke-width="1.2"')
    tip = "; ".join(f"{i.name} on {i.segment} (MTU {i.mtu})"
                    + (f" {' '.join(i.addresses)}" if i.addresses else "")
                    for i in b.node.interfaces)
    out = [f'<g class="node" data-node="{_e(b.node.name)}"><title>{_e(tip)}</title>',
           f'<rect class="box{" on-path" if on_path else ""}" x="{_n(left)}" y="{_n(b.y)}" '
           f'width="{_n(b.w)}" height="{_n(b.h)}" rx="6" '
           f'fill="{FILL.get(b.node.kind, "#f1f3f5")}" {stroke}/>',
           _text(b.x, b.y + 18, b.node.name, 13, extra=' font-weight="bold"'),
           _text(b.x, b.y + 32, b.node.kind, 11, fill="#6c757d",
                 extra=' font-style="italic"')]
    out += [_text(b.x, b.y + 47 + 14 * k, a, 11, mono=True)
            for k, a in enumerate(b.addresses)]
    return "".join(out) + "</g>"


def _line(x1: float, y1: float, x2: float, y2: float, colour: str, width: float,
          extra: str = "") -> str:
    return (f'<line x1="{_n(x1)}" y1="{_n(y1)}" x2="{_n(x2)}" y2="{_n(y2)}" '
            f'stroke="{colour}" stroke-width="{_n(width)}"{extra}/>')


def _seg_label(x: float, y: float, name: str, anchor: str, on_path: bool) -> str:
    return _text(x, y, name, 11, anchor, fill=PATH if on_path else "#495057",
                 extra=' font-weight="bold" stroke="white" stroke-width="3" '
                       'paint-order="stroke"')


def _draw_group(g: _Group, on_path: bool, top: tuple[float, float] | None,
                box: _Box | None) -> str:
    """A hanging segment: the line down from what it hangs off (`box`, or the point `top`
    on a segment of the top row), its own horizontal line, and a drop to each member."""
    colour, width = (PATH, 3.5) if on_path else (WIRE, 2.5)
    out = [f'<g class="segment{" on-path" if on_path else ""}" data-segment="{_e(g.segment)}">']
    if top is not None:
        out.append(_line(top[0], top[1], g.x, g.bus_y, colour, width))
    elif box is not None:
        bottom, inner = box.y + box.h, (box.x - box.w / 2 + 10, box.x + box.w / 2 - 10)
        px = min(max(g.x, inner[0]), inner[1])
        if px == g.x:
            out.append(_line(g.x, bottom, g.x, g.bus_y, colour, width))
        else:   # the group sits beside its box: go down, across, then down again
            knee = g.bus_y - 16
            out.append(f'<path d="M{_n(px)} {_n(bottom)}V{_n(knee)}H{_n(g.x)}V{_n(g.bus_y)}" '
                       f'fill="none" stroke="{colour}" stroke-width="{_n(width)}"/>')
    xs = [g.x] + [m.x for m in g.members]
    lo, hi = min(xs), max(xs)
    if hi - lo < 28:
        lo, hi = (lo + hi) / 2 - 14, (lo + hi) / 2 + 14
    out.append(_line(lo, g.bus_y, hi, g.bus_y, colour, width, ' stroke-linecap="round"'))
    out += [_line(m.x, g.bus_y, m.x, m.y, colour, width / 2 + 0.5) for m in g.members]
    if g.labelled:     # beside the line from above, on the side with room for it
        if g.x + 6 + _width(g.segment, 11) <= g.left + g.span:
            out.append(_seg_label(g.x + 6, g.bus_y - 6, g.segment, "start", on_path))
        else:
            out.append(_seg_label(g.x - 6, g.bus_y - 6, g.segment, "end", on_path))
    return "".join(out) + "</g>"


def topology_svg(lab: Lab, path: list[str] | None = None) -> str:
    """The lab as boxes (nodes) on lines (segments). Nodes in `path`, and the segments
    between consecutive ones, are drawn in the path colour."""
    segs = {n: _segments_of(node) for n, node in lab.nodes.items()}
    spine, links = _spine(lab, path, segs)
    boxes, under_links, loose = _hang(lab, spine, links, segs)
    hot_nodes = set(path or [])
    hot_segs = {s for a, b in pairwise(path or [])
                if a in segs and b in segs for s in segs[a] if s in segs[b]}

    # rows: the top of each row of boxes and the height of its segment lines
    heights: dict[int, float] = {}
    for b in boxes.values():
        heights[b.level] = max(heights.get(b.level, 0.0), b.h)
    deepest = max([*heights, *(g.level for b in boxes.values() for g in b.groups),
                   1 if loose else 0])
    tops, buses = {0: float(TOP)}, {}
    for level in range(1, deepest + 1):
        buses[level] = tops[level - 1] + heights.get(level - 1, 0.0) + DROP_H
        tops[level] = buses[level] + RISE
    link_y = TOP + 24.0

    # the top row left to right; what hangs below an item is centred under it, and the
    # item moves right when that would overlap what hangs below the item before it
    x, hang_end = 16.0, 16.0 - GAP
    items: list[_Box | _Group] = []
    for i, n in enumerate(spine):
        items.append(boxes[n])
        if i < len(under_links):
            items.append(under_links[i])
    link_x: dict[str, float] = {}
    for item in items:
        if isinstance(item, _Box):
            own, below = item.w, [_group_span(g) for g in item.groups]
        else:
            own = max(SEG_MIN, _width(item.segment, 11) + 18)
            below = [_group_span(item)] if item.members else []
        cx, hang_left = x + own / 2, 0.0
        if below:
            # what hangs below may sit off-centre, as long as it still reaches under the
            # item; only the rest of the overlap moves the item itself
            span = _row_span(below)
            need = max(0.0, hang_end + GAP - (cx - span / 2))
            slack = max(0.0, span / 2 - own / 2) if isinstance(item, _Box) else span / 2 - 20
            cx += need - min(need, slack)
            hang_left = cx - span / 2 + min(need, slack)
            hang_end = hang_left + span
        if isinstance(item, _Box):
            _place_box(item, cx, tops, buses, hang_left if below else None)
        else:
            link_x[item.segment] = cx
            if item.members:
                _place_group(item, hang_left, tops, buses, cx)
        x = cx + own / 2
    for item in loose:
        left = hang_end + GAP
        if isinstance(item, _Box):
            _place_box(item, left + _box_span(item) / 2, tops, buses)
            hang_end = left + _box_span(item)
        else:
            _place_group(item, left, tops, buses)
            hang_end = left + _group_span(item)

    body: list[str] = []
    drawn: set[tuple[str, str]] = set()
    where: dict[str, tuple[float, float]] = {}     # a point on each segment's line
    for i, s in enumerate(links):
        a, b = boxes[spine[i]], boxes[spine[i + 1]]
        hot = s in hot_segs
        cx = link_x[s]
        where[s] = (cx, link_y)
        drawn |= {(a.node.name, s), (b.node.name, s)}
        body.append(f'<g class="segment{" on-path" if hot else ""}" data-segment="{_e(s)}">'
                    + _line(a.x + a.w / 2, link_y, b.x - b.w / 2, link_y,
                            PATH if hot else WIRE, 3.5 if hot else 2.5)
                    + _seg_label(cx, link_y - 7, s, "middle", hot) + "</g>")
        if under_links[i].members:     # the packet only crossed the line above
            body.append(_draw_group(under_links[i], False, (cx, link_y), None))
    groups: list[tuple[_Group, _Box | None]] = [
        (g, b) for b in boxes.values() for g in b.groups]
    groups += [(g, None) for g in loose if isinstance(g, _Group)]
    for g, parent in groups:
        body.append(_draw_group(g, g.segment in hot_segs, None, parent))
        where[g.segment] = (g.x, g.bus_y)
        if parent is not None:
            drawn.add((parent.node.name, g.segment))
    for g in [*under_links, *(g for g, _ in groups)]:
        drawn |= {(m.node.name, g.segment) for m in g.members}
    # attachments the tree above does not show (a node on two segments both drawn
    # elsewhere): a dashed line from the box to the segment
    for n, b in boxes.items():
        for s in segs[n]:
            if (n, s) not in drawn and s in where:
                sx, sy = where[s]
                by = b.y if sy < b.y else b.y + b.h
                body.append(_line(b.x, by, sx, sy, WIRE, 1.5, ' stroke-dasharray="5 4"'))
    body += [_draw_box(b, n in hot_nodes) for n, b in boxes.items()]

    right = max([b.x + b.w / 2 for b in boxes.values()]
                + [g.left + g.span for g, _ in groups] + [x, hang_end, 300.0])
    bottom = max([b.y + b.h for b in boxes.values()] + list(buses.values()) + [TOP + 40.0])
    legend_y = bottom + 26
    legend = [f'<rect x="16" y="{_n(legend_y - 11)}" width="22" height="14" rx="3" '
              f'fill="{FILL["linux"]}" stroke="#495057"/>',
              _text(44, legend_y, "Linux host (the kernel's stack)", 11, "start"),
              f'<rect x="236" y="{_n(legend_y - 11)}" width="22" height="14" rx="3" '
              f'fill="{FILL["tapstack"]}" stroke="#495057"/>',
              _text(264, legend_y, "tapstack node", 11, "start"),
              _line(376, legend_y - 4, 404, legend_y - 4, WIRE, 2.5),
              _text(410, legend_y, "segment (one broadcast domain)", 11, "start")]
    if path:
        legend += [_line(622, legend_y - 4, 650, legend_y - 4, PATH, 3.5),
                   _text(656, legend_y, "the packet's path", 11, "start")]
    return _svg(max(right + 16, 780.0), legend_y + 14, f"The lab {lab.name}",
                body + legend)


# ---------------------------------------------------------------- sequence

ROW = 22            # vertical distance between two messages
HEAD = 24           # height of a lane's name box


def _arrow_head(x: float, y: float, direction: int, colour: str) -> str:
    back = x - 9 * direction
    return (f'<path d="M{_n(x)} {_n(y)}L{_n(back)} {_n(y - 4)}L{_n(back)} {_n(y + 4)}Z" '
            f'fill="{colour}"/>')


def _lane_heads(xs: list[float], lanes: list[str], y: float) -> list[str]:
    out = []
    for x, name in zip(xs, lanes, strict=True):
        w = _width(name, 12, bold=True) + 16
        out.append(f'<g class="lane" data-lane="{_e(name)}"><rect x="{_n(x - w / 2)}" '
                   f'y="{_n(y)}" width="{_n(w)}" height="{HEAD}" rx="4" fill="#f1f3f5" '
                   f'stroke="#495057"/>' + _text(x, y + 16, name, 12,
                                                  extra=' font-weight="bold"') + "</g>")
    return out


def sequence_svg(lanes: list[str], messages: list[dict]) -> str:
    """A ladder diagram: one lifeline per lane, one arrow per message, top to bottom in
    list order. m['from'], m['to'] name lanes (others are skipped); m['label'] is the
    text; optional: m['kind'] (dns, tcp, tls, http, icmp, drop) picks the colour,
    m['dropped'] ends the arrow in a red cross on the receiving lane (the node that
    dropped the packet),
    m['segment'] and m['frame'] make a tooltip pointing into that segment's capture, and
    m['t'] (seconds) shows the time since the first message at the left margin."""
    lanes = list(dict.fromkeys(lanes))
    col = {name: i for i, name in enumerate(lanes)}
    shown = [m for m in messages if m.get("from") in col and m.get("to") in col]
    times = [m["t"] for m in shown if isinstance(m.get("t"), (int, float))]
    left = 84.0 if times else 24.0
    heads = [_width(n, 12, bold=True) + 16 for n in lanes] or [0.0]
    spacing = max(max(heads) + 12, 96.0,
                  min(180.0, (1100 - left - 70) / max(1, len(lanes) - 1)))
    first = left + heads[0] / 2 if lanes else left
    xs = [first + i * spacing for i in range(len(lanes))]
    width = max((xs[-1] + max(heads[-1] / 2, 60.0) + 16) if xs else 0.0, 320.0)

    kinds = [k for k in KIND_COLOURS if any(m.get("kind") == k for m in shown)]
    legend_y, lane_y = 16.0, 32.0
    body: list[str] = []
    lx = left
    for k in kinds:
        body += [_line(lx, legend_y - 4, lx + 20, legend_y - 4, KIND_COLOURS[k], 2),
                 _text(lx + 25, legend_y, k.upper(), 11, "start", fill=KIND_COLOURS[k])]
        lx += 34 + _width(k, 11)
    if any(m.get("dropped") for m in shown):
        body += [_cross(lx + 6, legend_y - 4),
                 _text(lx + 16, legend_y, "dropped here", 11, "start", fill=DROP)]

    y0 = lane_y + HEAD + 22
    ys = [y0 + ROW * i for i in range(len(shown))]
    end = (ys[-1] if ys else y0) + 16
    body += [_line(x, lane_y + HEAD, x, end, "#adb5bd", 1.2, ' stroke-dasharray="4 4"')
             for x in xs]
    body += _lane_heads(xs, lanes, lane_y) + _lane_heads(xs, lanes, end)

    t0 = times[0] if times else 0.0
    for m, y in zip(shown, ys, strict=True):
        body.append(_message(m, y, xs[col[m["from"]]], xs[col[m["to"]]], width, left))
        if isinstance(m.get("t"), (int, float)):
            body.append(_text(left - 10, y + 4, f"+{(m['t'] - t0) * 1000:.1f} ms", 10, "end",
                              fill="#868e96", mono=True))
    return _svg(width, end + HEAD + 10, "Sequence of messages", body)


def _cross(x: float, y: float) -> str:
    return (f'<g class="drop-cross">{_line(x - 5, y - 5, x + 5, y + 5, DROP, 2.5)}'
            f'{_line(x - 5, y + 5, x + 5, y - 5, DROP, 2.5)}</g>')


def _message(m: dict, y: float, x1: float, x2: float, width: float, left: float) -> str:
    """One arrow with its label above it; a message to oneself is a small loop."""
    colour = KIND_COLOURS.get(str(m.get("kind")), "#212529")
    label = str(m.get("label", ""))
    tip = ""
    if m.get("frame") is not None:
        tip = (f"segment {m['segment']} " if m.get("segment") else "") + f"frame #{m['frame']}"
    out = [f'<g class="msg" data-from="{_e(m["from"])}" data-to="{_e(m["to"])}">']
    if tip:
        out.append(f"<title>{_e(tip)}</title>")
    if x1 == x2:
        out.append(f'<path class="arrow loop" d="M{_n(x1)} {_n(y - 6)}h26v12h-24" '
                   f'fill="none" stroke="{colour}" stroke-width="1.6"/>'
                   + _arrow_head(x1, y + 6, -1, colour))
        lx, anchor = x1 + 32, "start"
        if lx + _width(label, 11) > width - 4:     # no room right of the last lane
            lx, anchor = x1 - 6, "end"
    else:
        direction = 1 if x2 > x1 else -1
        tip_x = x2  # a drop: the cross sits on the lifeline of the node that dropped it
        out.append(_line(x1, y, tip_x, y, colour, 1.6, ' class="arrow"'))
        out.append(_cross(tip_x, y) if m.get("dropped") else _arrow_head(x2, y, direction,
                                                                        colour))
        half = _width(label, 11) / 2
        lx = min(max((x1 + tip_x) / 2, left + half), width - half - 4)
        anchor = "middle"
    out.append(_text(lx, y - 5, label, 11, anchor, fill=colour,
                     extra=' class="label" stroke="white" stroke-width="3" '
                           'paint-order="stroke"'))
    return "".join(out) + "</g>"
