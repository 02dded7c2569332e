"""What the inspection commands print: counters, routes, tracked flows, rules. Each
takes the JSON a running node answered on its control socket."""

from __future__ import annotations

from typing import Any

# what a reader could misread, said next to the number
NOTES = {
    ("tcp", "listeners"): "listening ports, not connections",
    ("tcp", "connections"): "in the table, every state but CLOSED",
    ("tcp", "state_time_wait"): "closed, waiting 2*MSL for strays",
    ("link", "tx_errors"): "frames the TAP refused",
    ("stack", "internal_errors"): "bugs caught; see last internal error",
}


def format_stats(snapshot: dict[str, Any], nonzero: bool = False,
                 previous: dict[str, Any] | None = None, interval: float = 1.0) -> str:
    """Counters grouped by layer. `nonzero` hides zeros; with `previous` (the snapshot
    `interval` seconds before, --watch) each changed counter shows its rate per second."""
    info = snapshot.get("info", {})
    where = f"namespace {info['netns']}" if info.get("netns") else "the current namespace"
    interfaces = snapshot.get("interfaces", {})
    if len(interfaces) > 1:
        title = f"tapstack node {info.get('node')} ({len(interfaces)} interfaces)"
    else:
        title = f"tapstack {info.get('address')} on {info.get('tap')}"
    lines = [f"{title} in {where}, pid {info.get('pid')}, up {info.get('uptime_s', 0):.0f} s"]
    if info.get("workers"):  # run --workers N: the counters are the sum of them all
        lines.append(f"{len(info['workers'])} workers (steering: {info.get('steering')}), "
                     "counters summed: " + ", ".join(
                         f"worker {w['index']} pid {w['pid']}"
                         + (f" restarted {w['restarts']}x" if w["restarts"] else "")
                         for w in info["workers"]))

    def table(groups: dict[str, dict[str, int]], before: dict[str, dict[str, int]],
              indent: str) -> None:
        for layer, values in groups.items():
            shown = {k: v for k, v in values.items() if v or not nonzero}
            if not shown:
                continue
            lines.append(f"{indent}{layer}")
            width = max(len(k) for k in shown)
            for name, value in shown.items():
                line = f"{indent}  {name:<{width}}  {value:>12}"
                old = before.get(layer, {}).get(name)
                if previous is not None and old is not None and value != old:
                    line += f"  {(value - old) / interval:>+12,.0f}/s"
                if (layer, name) in NOTES:
                    line += f"  ({NOTES[(layer, name)]})"
                lines.append(line)

    table(snapshot.get("counters", {}), (previous or {}).get("counters", {}), "")
    if len(interfaces) > 1:
        for name, entry in interfaces.items():
            addrs = ", ".join(entry.get("addresses", [])) or "no address"
            lines.append(f"interface {name} ({entry.get('device')}, {addrs})")
            old = ((previous or {}).get("interfaces", {}).get(name) or {}).get("counters", {})
            table(entry.get("counters", {}), old, "  ")
    if snapshot.get("last_internal_error"):
        lines.append(f"last internal error: {snapshot['last_internal_error']}")
    return "\n".join(lines)


def format_routes(snapshot: dict[str, Any]) -> str:
    """One line per route, as `ip route` prints them."""
    lines = []
    for r in snapshot.get("routes", []):
        words = [r["prefix"]]
        if r.get("gateway"):
            words += ["via", r["gateway"]]
        words += ["dev", r["dev"], "proto", r["proto"]]
        if r["proto"] == "kernel":
            words += ["scope", "link"]
        if r.get("src"):
            words += ["src", r["src"]]
        if r.get("metric"):
            words += ["metric", str(r["metric"])]
        lines.append(" ".join(words))
    return "\n".join(lines)


def format_flows(answer: dict[str, Any]) -> str:
    """As `conntrack -L` prints them."""
    numbers = {"tcp": 6, "udp": 17, "icmp": 1}
    lines = []
    for f in answer["flows"]:
        o, r = f["original"], f["reply"]
        words = [f"{f['protocol']:<8} {numbers.get(f['protocol'], 0):<2} {f['timeout']}"]
        if f["protocol"] == "tcp":
            words.append(f["state"])
        for side in (o, r):
            words.append(f"src={side['src']} dst={side['dst']}")
            if f["protocol"] == "icmp":
                words.append(f"id={side['sport']}")
            else:
                words.append(f"sport={side['sport']} dport={side['dport']}")
            words.append(f"packets={side['packets']} bytes={side['bytes']}")
            if side is o and not r["packets"]:
                words.append("[UNREPLIED]")
        if f["assured"]:
            words.append("[ASSURED]")
        lines.append(" ".join(words))
    lines.append(f"tapstack conntrack: {answer['entries']} flow entries "
                 f"(max {answer['max_entries']})")
    return "\n".join(lines)


def _rule_text(r: dict[str, Any], acl: bool) -> str:
    ports = "" if r["ports"] is None else (
        f" port {r['ports'][0]}" if r["ports"][0] == r["ports"][1]
        else f" ports {r['ports'][0]}-{r['ports'][1]}")
    head = f"{r['number']:>5} {r['action']:<5} " if acl else f"{r['number']:>5} allow "
    return f"  {head}{r['protocol']:<4} {r['cidr']}{ports}  (hits {r['hits']}, " \
           f"bytes {r['bytes']})"


def format_rules(answer: dict[str, Any]) -> str:
    lines = []
    for name, entry in answer["acl"].items():
        for direction in ("inbound", "outbound"):
            lines.append(f"network ACL on {name}, {direction}:")
            lines += [_rule_text(r, True) for r in entry.get(direction, [])]
            lines.append(f"      * deny  all  0.0.0.0/0  "
                         f"(hits {entry.get(direction + '_default_denied', 0)})")
    for name, entry in answer["security_groups"].items():
        for direction in ("inbound", "outbound"):
            lines.append(f"security group on {name}, {direction}:")
            lines += [_rule_text(r, False) for r in entry[direction]] or ["  (none)"]
    nat = answer["nat"]
    masq = ", ".join(f"{m['interface']} as {m['address']}" for m in nat["masquerade"])
    lines.append(f"nat: masquerade {masq or 'none'}; filtering {nat['filtering']}; ports "
                 f"{nat['port_range'][0]}-{nat['port_range'][1]}; "
                 f"{nat['mappings']} mappings")
    lines += [f"nat: {s['public']} = {s['private']} (1:1)" for s in nat["static"]]
    lines += [f"nat: {f['protocol']} {f['public']} -> {f['to']}" for f in nat["forward"]]
    return "\n".join(lines)


def format_conns(answer: dict[str, Any], previous: dict[str, int] | None = None) -> str:
    """`tapstack conns`: like `ss -tin`, one line per connection and one of TCP details;
    with `previous` (byte counts a second ago, --watch), the delivery rate."""
    rows = answer["connections"]
    lines = [f"{'State':<13}{'Recv-Q':>7}{'Send-Q':>9}  {'Local':<22}{'Peer':<22}"]
    for c in sorted(rows, key=lambda c: (c["state"], c["local"], c["remote"])):
        if "cwnd" not in c:  # a TIME-WAIT record: addresses and time left, nothing else
            lines.append(f"{c['state']:<13}{0:>7}{0:>9}  {c['local']:<22}{c['remote']:<22}"
                         f"timer:({c['expires_in_s']:g}s)"
                         + (f" worker {c['worker']}" if "worker" in c else ""))
            continue
        lines.append(f"{c['state']:<13}{c['recv_queue']:>7}{c['send_queue']:>9}  "
                     f"{c['local']:<22}{c['remote']:<22}"
                     + (f"worker {c['worker']}" if "worker" in c else ""))
        srtt = "-" if c["srtt_ms"] is None else f"{c['srtt_ms']:g}"
        ssthresh = "-" if c["ssthresh"] is None else c["ssthresh"]
        detail = (f"\t {c['congestion_control']} rtt:{srtt}/{c['rttvar_ms']:g} "
                  f"rto:{c['rto_ms']:g} mss:{c['mss']} cwnd:{c['cwnd']} ssthresh:{ssthresh} "
                  f"unacked:{c['unacked']} retrans:{c['retransmits']} "
                  f"snd_wnd:{c['snd_wnd']} rcv_wnd:{c['rcv_wnd']}")
        if previous is not None:
            key = f"{c['local']} {c['remote']}"
            moved = c["bytes_acked"] + c["bytes_received"]
            if key in previous:
                detail += f" delivery:{(moved - previous[key]) * 8 / 1e6:.2f}Mbit/s"
        lines.append(detail)
    states: dict[str, int] = {}
    for c in rows:
        states[c["state"]] = states.get(c["state"], 0) + 1
    summary = ", ".join(f"{n} {s}" for s, n in sorted(states.items())) or "no connections"
    lines.append(f"{summary}; listening on {', '.join(answer['listeners']) or 'nothing'}")
    return "\n".join(lines)
