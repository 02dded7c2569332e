"""One captured frame opened layer by layer (the OSI picture with real bytes).

tshark dissects the frame (with curl's TLS key log, so the HTTP inside TLS 1.3 is shown
decrypted); this module turns its JSON into a list of layers, outermost first, each with
where its bytes sit in the frame and the header fields a network engineer reads there.

Two things about tshark's JSON (checked with tshark 4.0) shape the code:
- objects repeat keys (`tcp.port`, `ip.addr`, `http.request.line`), so it is read as
  lists of (key, value) pairs, never as dicts, which would keep only the last one;
- with `-x` every field `k` gets a sibling `k_raw` = [hex, offset, length, bitmask,
  type], and that name can collide with a real field (`tcp.seq_raw` is also the raw
  sequence number): a value is a string, a raw array is a list, and both are kept.
A raw array's offset is relative to the data source the bytes came from; for decrypted
HTTP that is the decrypted TLS record, not the frame.
"""

from __future__ import annotations

import html
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

TSHARK_SECONDS = 60

# protocol (tshark's name) -> (what a reader calls it, OSI layer). TLS sits where the
# OSI picture puts encryption: presentation.
KNOWN = {"eth": ("Ethernet", 2), "vlan": ("802.1Q VLAN", 2), "sll": ("Linux cooked", 2),
         "arp": ("ARP", 2), "ip": ("IPv4", 3), "ipv6": ("IPv6", 3), "icmp": ("ICMP", 3),
         "tcp": ("TCP", 4), "udp": ("UDP", 4), "tls": ("TLS", 6), "http": ("HTTP", 7),
         "dns": ("DNS", 7)}
NOT_LAYERS = {"frame", "ethertype", "_ws.malformed", "_ws.expert"}
ETHERTYPES = {0x0800: "IPv4", 0x0806: "ARP", 0x86DD: "IPv6", 0x8100: "802.1Q"}
IP_PROTOCOLS = {1: "ICMP", 6: "TCP", 17: "UDP"}
TLS_TYPES = {20: "change_cipher_spec", 21: "alert", 22: "handshake", 23: "application_data",
             24: "heartbeat"}
TLS_VERSIONS = {0x0300: "SSL 3.0", 0x0301: "TLS 1.0", 0x0302: "TLS 1.1", 0x0303: "TLS 1.2",
                0x0304: "TLS 1.3"}
CHECKSUM_STATUS = {"0": "incorrect", "1": "correct", "2": "not verified by tshark"}
TCP_OPTIONS = {"eol": "EOL", "nop": "NOP", "mss": "MSS", "wscale": "WS",
               "sack_perm": "SACK_PERM", "sack": "SACK", "timestamp": "TS"}
COLOURS = {"eth": "#cfe2ff", "ip": "#d1f0d8", "tcp": "#fff1b8", "tls": "#f8d3e6",
           "http": "#e2d9fb"}
OTHER_COLOUR = "#e4e4e4"


class LayersError(Exception):
    """The frame cannot be opened: tshark is missing or failed, or there is no such frame."""


class _Tree:
    """One JSON object of tshark's, as the (key, value) pairs it wrote, repeats kept."""

    __slots__ = ("pairs",)

    def __init__(self, pairs: list[tuple[str, Any]]) -> None:
        self.pairs = pairs

    def value(self, key: str) -> str | None:
        """The field's shown value (a string), skipping a raw array of the same name."""
        return next((v for k, v in self.pairs if k == key and isinstance(v, str)), None)

    def values(self, key: str) -> list[str]:
        return [v for k, v in self.pairs if k == key and isinstance(v, str)]

    def raw(self, key: str) -> list | None:
        """The [hex, offset, length, bitmask, type] array tshark wrote as `key_raw`."""
        return next((v for k, v in self.pairs if k == key + "_raw" and isinstance(v, list)),
                    None)

    def tree(self, key: str) -> _Tree | None:
        return next((v for k, v in self.pairs if k == key and isinstance(v, _Tree)), None)

    def trees(self, key: str) -> list[_Tree]:
        return [v for k, v in self.pairs if k == key and isinstance(v, _Tree)]

    def find(self, key: str) -> str | None:
        """The first shown value of `key` anywhere below, depth first."""
        for k, v in self.pairs:
            if k == key and isinstance(v, str):
                return v
            if isinstance(v, _Tree) and (found := v.find(key)) is not None:
                return found
        return None

    def find_all(self, key: str) -> list[str]:
        out: list[str] = []
        for k, v in self.pairs:
            if k == key and isinstance(v, str):
                out.append(v)
            elif isinstance(v, _Tree):
                out.extend(v.find_all(key))
        return out


def _tshark(pcap: Path, keylog: Path | None, *args: str) -> str:
    if shutil.which("tshark") is None:
        raise LayersError("tshark is not installed (Debian package tshark)")
    if not Path(pcap).is_file():
        raise LayersError(f"the capture {pcap} does not exist")
    if keylog is not None and not Path(keylog).is_file():
        raise LayersError(f"the TLS key log {keylog} does not exist")
    # -n: no name resolution, so reading a capture never sends a DNS query
    cmd = ["timeout", "-k", "5", str(TSHARK_SECONDS), "tshark", "-n", "-r", str(pcap)]
    if keylog is not None:
        cmd += ["-o", f"tls.keylog_file:{keylog}"]
    try:
        r = subprocess.run([*cmd, *args], capture_output=True, text=True,
                           timeout=TSHARK_SECONDS + 10)
    except subprocess.TimeoutExpired:
        raise LayersError(f"tshark did not finish reading {pcap} in "
                          f"{TSHARK_SECONDS} s") from None
    if r.returncode == 124:
        raise LayersError(f"tshark did not finish reading {pcap} in {TSHARK_SECONDS} s")
    if r.returncode != 0:
        said = [line.strip() for line in r.stderr.splitlines()
                if line.strip() and not line.startswith("Running as user")]
        raise LayersError(f"tshark could not read {pcap}: "
                          f"{said[0] if said else f'exit status {r.returncode}'}")
    return r.stdout


def request_frame(pcap: Path, keylog: Path) -> int | None:
    """The number (1-based, as tshark and Wireshark count) of the first frame whose
    decrypted payload is an HTTP request; None if no request could be decrypted."""
    out = _tshark(pcap, keylog, "-Y", "http.request", "-T", "fields", "-e", "frame.number")
    for line in out.splitlines():
        if line.strip().isdigit():
            return int(line.strip())
    return None


def open_frame(pcap: Path, frame: int, keylog: Path | None) -> dict[str, Any]:
    """Frame `frame` of `pcap` dissected by tshark, as its layers, outermost first.

    Returns {"frame": n, "length": bytes on the wire, "captured": bytes in the file,
    "hex": the whole frame, "protocols": tshark's "eth:ethertype:ip:tcp:tls:http",
    "keylog": whether a key log was given, "layers": [layer, ...]}, where a layer is
    {"protocol": tshark's name, "name": "IPv4", "osi": 3 (None if unknown),
    "offset": its first byte in the frame (None when its bytes are not in the frame,
    as for HTTP decrypted from TLS), "length": bytes, "hex": those bytes,
    "decrypted": True for what only the key log revealed, "fields": [(field, value)],
    and for HTTP "text": the decrypted message as text}.
    """
    if frame < 1:
        raise LayersError(f"frame {frame} does not exist: frames are numbered from 1")
    out = _tshark(pcap, keylog, "-Y", f"frame.number == {frame}", "-T", "json", "-x")
    try:
        packets = json.loads(out, object_pairs_hook=_Tree)
    except ValueError:
        raise LayersError(f"tshark wrote no JSON for frame {frame} of {pcap}") from None
    if not packets:
        raise LayersError(f"{pcap} has no frame {frame}")
    source = packets[0].tree("_source")
    top = source.tree("layers") if source else None
    meta = top.tree("frame") if top else None
    frame_raw = top.raw("frame") if top else None
    if top is None or meta is None or frame_raw is None:
        raise LayersError(f"tshark's JSON for frame {frame} of {pcap} has no frame bytes")
    frame_hex = frame_raw[0]
    opened: dict[str, Any] = {
        "frame": frame, "length": int(meta.value("frame.len") or len(frame_hex) // 2),
        "captured": len(frame_hex) // 2, "hex": frame_hex,
        "protocols": meta.value("frame.protocols") or "", "keylog": keylog is not None,
        "layers": []}
    layers: list[dict[str, Any]] = opened["layers"]
    tls_trees = top.trees("tls")
    tcp_tree = top.tree("tcp")
    for i, (key, tree) in enumerate(top.pairs):
        if not isinstance(tree, _Tree) or key in NOT_LAYERS:
            continue
        if key == "tls":
            if tree is tls_trees[0]:  # every TLS record of the frame, as one layer
                layers.append(_tls(tls_trees, tcp_tree, frame_hex, keylog is not None))
            continue
        # a protocol's bytes are the `_raw` pair just before it (a protocol may repeat)
        before = top.pairs[i - 1] if i else ("", None)
        raw = before[1] if before[0] == key + "_raw" and isinstance(before[1], list) else None
        layer = _layer(key, raw, frame_hex)
        if key == "eth":
            layer["fields"] = _ethernet(tree)
        elif key == "ip":
            layer["fields"] = _ipv4(tree)
        elif key == "tcp":
            layer["fields"] = _tcp(tree)
        elif key == "http":
            layer["fields"], layer["text"] = _http(tree, raw)
            layer["decrypted"] = bool(tls_trees) and layer["offset"] is None
        else:
            layer["fields"] = _leaves(tree)
        layers.append(layer)
    return opened


def _layer(key: str, raw: list | None, frame_hex: str) -> dict[str, Any]:
    name, osi = KNOWN.get(key, (key.upper(), None))
    hexa = raw[0] if raw else ""
    offset = raw[1] if raw else None
    # a raw array whose bytes are not the frame's at its offset comes from another data
    # source (a reassembled or decrypted buffer): the layer is not in the frame as such
    if offset is not None and frame_hex[2 * offset:2 * offset + len(hexa)] != hexa:
        offset = None
    return {"protocol": key, "name": name, "osi": osi, "offset": offset,
            "length": len(hexa) // 2, "hex": hexa, "decrypted": False, "fields": []}


def _named(value: str | None, names: dict[int, str]) -> str:
    if value is None:
        return "?"
    try:
        number = int(value, 0)
    except ValueError:
        return value
    return f"{value} ({names[number]})" if number in names else value


def _bytes(count: str | None) -> str:
    return "?" if count is None else f"{count} byte{'' if count == '1' else 's'}"


def _checksum(tree: _Tree, key: str) -> str:
    status = CHECKSUM_STATUS.get(tree.value(key + ".status") or "", "")
    return f"{tree.value(key)}{f' ({status})' if status else ''}"


def _ethernet(eth: _Tree) -> list[tuple[str, str]]:
    return [("Destination MAC", eth.value("eth.dst") or "?"),
            ("Source MAC", eth.value("eth.src") or "?"),
            ("EtherType", _named(eth.value("eth.type"), ETHERTYPES))]


def _ipv4(ip: _Tree) -> list[tuple[str, str]]:
    flags = ip.tree("ip.flags_tree") or _Tree([])
    named = [n for k, n in (("ip.flags.rb", "reserved"), ("ip.flags.df", "Don't fragment"),
                            ("ip.flags.mf", "More fragments")) if flags.value(k) == "1"]
    ident = ip.value("ip.id") or "?"
    hdr = ip.value("ip.hdr_len") or "?"
    return [("Version", ip.value("ip.version") or "?"),
            ("Header length", f"{hdr} bytes" + (f" (IHL {int(hdr) // 4})"
                                               if hdr.isdigit() else "")),
            ("DSCP / ECN", f"{ip.find('ip.dsfield.dscp')} / {ip.find('ip.dsfield.ecn')}"),
            ("Total length", _bytes(ip.value("ip.len"))),
            ("Identification", f"{ident} ({int(ident, 0)})" if ident != "?" else ident),
            ("Flags", f"{ip.value('ip.flags')}" + (f" ({', '.join(named)})" if named else "")),
            ("Fragment offset", ip.value("ip.frag_offset") or "0"),
            ("TTL", ip.value("ip.ttl") or "?"),
            ("Protocol", _named(ip.value("ip.proto"), IP_PROTOCOLS)),
            ("Header checksum", _checksum(ip, "ip.checksum")),
            ("Source address", ip.value("ip.src") or "?"),
            ("Destination address", ip.value("ip.dst") or "?")]


def _tcp(tcp: _Tree) -> list[tuple[str, str]]:
    flags = tcp.tree("tcp.flags_tree") or _Tree([])
    named = [n for k, n in (("cwr", "CWR"), ("ece", "ECE"), ("urg", "URG"), ("ack", "ACK"),
                            ("push", "PSH"), ("reset", "RST"), ("syn", "SYN"), ("fin", "FIN"))
             if flags.value(f"tcp.flags.{k}") == "1"]
    hdr = tcp.value("tcp.hdr_len") or "?"
    window = tcp.value("tcp.window_size_value") or "?"
    scale = tcp.value("tcp.window_size_scalefactor") or ""
    if scale.isdigit() and scale != "1":
        window += f" (x{scale} = {tcp.value('tcp.window_size')} bytes, scale from the SYN)"
    fields = [("Source port", tcp.value("tcp.srcport") or "?"),
              ("Destination port", tcp.value("tcp.dstport") or "?"),
              ("Sequence number", _relative(tcp, "tcp.seq")),
              ("Acknowledgment number", _relative(tcp, "tcp.ack")),
              ("Header length", f"{hdr} bytes" + (f" (data offset {int(hdr) // 4})"
                                                  if hdr.isdigit() else "")),
              ("Flags", f"{tcp.value('tcp.flags')} ({', '.join(named) or 'none'})"),
              ("Window", window),
              ("Checksum", _checksum(tcp, "tcp.checksum")),
              ("Urgent pointer", tcp.value("tcp.urgent_pointer") or "0"),
              ("Options", _tcp_options(tcp.tree("tcp.options_tree")))]
    fields.append(("Payload", _bytes(tcp.value("tcp.len") or "0")))
    return fields


def _relative(tcp: _Tree, key: str) -> str:
    """The number on the wire, and the one Wireshark shows (relative to the ISN)."""
    raw = tcp.value(key + "_raw")  # a field too, not only the raw array (see above)
    if raw is None and (arr := tcp.raw(key)) is not None:
        raw = str(int(arr[0], 16))
    rel = tcp.value(key)
    if raw is None:
        return rel or "?"
    return raw + (f" (relative {rel})" if rel is not None and rel != raw else "")


def _tcp_options(opts: _Tree | None) -> str:
    if opts is None:
        return "none"
    parts = []
    for i, (key, value) in enumerate(opts.pairs):
        if not key.startswith("tcp.options.") or not isinstance(value, str):
            continue
        kind = key.removeprefix("tcp.options.")
        # an option's details are the `_tree` pair right after it
        following = opts.pairs[i + 1] if i + 1 < len(opts.pairs) else ("", None)
        detail = following[1] if following[0] == key + "_tree" else None
        if not isinstance(detail, _Tree):
            detail = _Tree([])
        name = TCP_OPTIONS.get(kind, kind)
        if kind == "mss":
            name += f"={detail.value('tcp.options.mss_val')}"
        elif kind == "wscale":
            name += f"={detail.value('tcp.options.wscale.shift')}"
        elif kind == "timestamp":
            name += (f" val {detail.value('tcp.options.timestamp.tsval')}"
                     f" ecr {detail.value('tcp.options.timestamp.tsecr')}")
        elif kind == "sack":
            edges = zip(detail.values("tcp.options.sack_le"),
                        detail.values("tcp.options.sack_re"), strict=False)
            name += " " + " ".join(f"{le}-{re}" for le, re in edges)
        parts.append(name)
    return ", ".join(parts) or "none"


def _tls(trees: list[_Tree], tcp: _Tree | None, frame_hex: str,
         keylog: bool) -> dict[str, Any]:
    """The TLS bytes this frame carries (its TCP payload: whole records or pieces of
    one), with each record's header as sent on the wire."""
    layer = _layer("tls", tcp.raw("tcp.payload") if tcp else None, frame_hex)
    records = [r for t in trees for r in t.trees("tls.record")]
    fields: list[tuple[str, str]] = []
    for n, record in enumerate(records, start=1):
        tag = f"Record {n}: " if len(records) > 1 else ""
        outer = record.value("tls.record.opaque_type")
        inner = record.value("tls.record.content_type")
        wire = outer if outer is not None else inner
        fields.append((f"{tag}Content type (on the wire)", _named(wire, TLS_TYPES)))
        version = record.value("tls.record.version")
        fields.append((f"{tag}Version", _named(version, TLS_VERSIONS)))
        fields.append((f"{tag}Length", _bytes(record.value("tls.record.length"))))
        if outer is not None:  # RFC 8446 5.2: the real type travels inside the ciphertext
            if inner is not None:
                real = _named(inner, TLS_TYPES) + ", decrypted with the key log"
            else:
                real = ("hidden: encrypted with the record (RFC 8446 5.2)"
                        + ("" if keylog else "; no key log given"))
            fields.append((f"{tag}Real content type", real))
    if any(r.value("tls.record.opaque_type") is not None for r in records):
        fields.append(("Note", "TLS 1.3 records say 0x0303 (TLS 1.2) and "
                               "application_data on the wire (RFC 8446 5.1)"))
    if not records:
        fields.append(("Records", "none start here: a piece of a record that spans "
                                  "several segments"))
    layer["fields"] = fields
    return layer


def _http(http: _Tree, raw: list | None) -> tuple[list[tuple[str, str]], str]:
    text = bytes.fromhex(raw[0]).decode("latin-1") if raw else ""
    fields: list[tuple[str, str]] = []
    method = http.find("http.request.method")
    if method is not None:
        fields.append(("Request line", f"{method} {http.find('http.request.uri')} "
                                       f"{http.find('http.request.version')}"))
        lines = http.values("http.request.line")
    else:
        code = http.find("http.response.code")
        fields.append(("Status line", f"{http.find('http.response.version')} {code} "
                                      f"{http.find('http.response.phrase') or ''}".strip()))
        lines = http.values("http.response.line")
    for line in lines:
        name, _, value = line.rstrip("\r\n").partition(":")
        fields.append((name.strip(), value.strip()))
    return fields, text


def _leaves(tree: _Tree, limit: int = 40) -> list[tuple[str, str]]:
    """Any other protocol: its fields as tshark names them."""
    out: list[tuple[str, str]] = []
    for key, value in tree.pairs:
        if len(out) >= limit:
            break
        if isinstance(value, str) and not key.startswith("_ws."):
            out.append((key, value))
        elif isinstance(value, _Tree):
            out.extend(_leaves(value, limit - len(out)))
    return out


def _colour(layer: dict[str, Any]) -> str:
    return COLOURS.get(layer["protocol"], OTHER_COLOUR)


def _hex_rows(data: str, owner: list[dict[str, Any] | None], base: int = 0) -> str:
    """16 bytes a row, offset first, each byte on the colour of the layer it belongs to."""
    rows = []
    for start in range(0, len(data) // 2, 16):
        cells = []
        for i in range(start, min(start + 16, len(data) // 2)):
            byte = html.escape(data[2 * i:2 * i + 2])
            who = owner[i]
            cells.append(f"<span style='background:{_colour(who)}' title='"
                         f"{html.escape(who['name'])}'>{byte}</span>" if who else byte)
        rows.append(f"{base + start:04x}  " + " ".join(cells))
    return "\n".join(rows)


def _osi(layer: dict[str, Any]) -> str:
    return "" if layer["osi"] is None else f"layer {layer['osi']}: "


def layers_html(opened: dict[str, Any]) -> str:
    """The frame in hex, every byte on its layer's colour, then the layers as nested
    blocks (each inside the one that carries it), outermost first: a table of header
    fields and the layer's own bytes; decrypted HTTP also as text. Static: no script,
    nothing fetched."""
    e = html.escape
    layers = opened["layers"]
    owner: list[dict[str, Any] | None] = [None] * (len(opened["hex"]) // 2)
    for layer in layers:
        if layer["offset"] is not None:
            end = min(layer["offset"] + layer["length"], len(owner))
            for i in range(layer["offset"], end):
                owner[i] = layer
    legend = " ".join(f"<span style='background:{_colour(ly)};padding:0 .4em'>"
                      f"{e(_osi(ly) + ly['name'])}</span>" for ly in layers)
    parts = [f"<div class='frame-layers'><p>Frame {int(opened['frame'])}: "
             f"{int(opened['length'])} bytes on the wire ({e(opened['protocols'])}). "
             f"{legend}</p>",
             f"<pre class='frame-hex'>{_hex_rows(opened['hex'], owner)}</pre>"]
    for layer in layers:
        if layer["offset"] is not None:
            where = (f"bytes {layer['offset']}-{layer['offset'] + layer['length'] - 1} of "
                     f"the frame ({layer['length']} bytes)")
        else:
            where = f"{layer['length']} bytes, not in the frame as such"
        if layer["decrypted"]:
            where += ", decrypted from the TLS record above with the TLS key log"
        parts.append(
            f"<div class='layer layer-{e(layer['protocol'])}' style='border-left:.5em solid "
            f"{_colour(layer)};margin:.3em 0 .3em .8em;padding-left:.5em'>"
            f"<table><caption style='text-align:left'>"
            f"{e(_osi(layer).capitalize() + layer['name'])}, {e(where)}</caption>"
            "<tr><th>field</th><th>value</th></tr>"
            + "".join(f"<tr><td>{e(str(k))}</td><td><code>{e(str(v))}</code></td></tr>"
                      for k, v in layer["fields"]) + "</table>")
        if layer.get("text"):
            parts.append(f"<pre class='decrypted'>{e(layer['text'])}</pre>")
        if layer["hex"]:
            own = [layer] * layer["length"]
            base = layer["offset"] or 0
            parts.append(f"<pre class='layer-hex'>{_hex_rows(layer['hex'], own, base)}</pre>")
    parts.append("</div>" * len(layers) + "</div>")
    return "\n".join(parts)
