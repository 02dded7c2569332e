"""Bring a lab up and down: namespaces, bridges, veths, TAPs and processes.

Layout of a lab named L:
  L-sw      the switch namespace: one bridge per segment (br-SEG), every node's port on
            it (NODE.IF: a veth end for a Linux node, a TAP for a tapstack node), and
            the tapstack processes themselves, whose control sockets live there.
  L-NODE    one namespace per Linux node, holding the other end of each veth (IF).
State (pids, the tapstack nodes' generated configs and logs) is kept under
/run/tapstack/labs/L; `down` needs none of it to clean up: everything the lab made is
in namespaces named after it, and deleting them removes every link inside.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from typing import Any

from stack.lab.topology import Lab, LabNode, load_lab
from stack.link import LinkError
from stack.link import netns as ns
from stack.runtime import read_stats

STATE_ROOT = "/run/tapstack/labs"
ETC_NETNS = "/etc/netns"
READY_TIMEOUT = 20.0


class LabError(Exception):
    """One sentence for the user."""


def state_dir(name: str) -> str:
    return os.path.join(STATE_ROOT, name)


def _run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, capture_output=True, text=True)
    if check and r.returncode != 0:
        detail = (r.stderr or r.stdout).strip().splitlines()
        raise LabError(f"'{' '.join(cmd)}' failed: {detail[-1] if detail else r.returncode}")
    return r


def _in(netns: str, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    return _run("ip", "netns", "exec", netns, *cmd, check=check)


def _quiet_namespace(netns: str) -> None:
    """No IPv6 (router solicitations, MLD, DAD would fill every capture), loopback up."""
    _in(netns, "sh", "-c", "echo 1 > /proc/sys/net/ipv6/conf/all/disable_ipv6; "
                           "echo 1 > /proc/sys/net/ipv6/conf/default/disable_ipv6", check=False)
    _run("ip", "-n", netns, "link", "set", "lo", "up")


def _node_toml(lab: Lab, node: LabNode, log_dir: str) -> str:
    """The `tapstack run --config` file for a tapstack node of the lab."""
    sw = lab.switch_netns
    lines = [f"name = {json.dumps(node.name)}", f"netns = {json.dumps(sw)}",
             f"forwarding = {'true' if node.forwarding else 'false'}", ""]
    for iface in node.interfaces:
        lines += ["[[interface]]", f"name = {json.dumps(iface.name)}",
                  f"tap = {json.dumps(lab.port(node, iface))}",
                  f"bridge = {json.dumps(lab.segments[iface.segment].bridge)}",
                  f"mtu = {iface.mtu}", f"addresses = {json.dumps(iface.addresses)}",
                  f"offload = {json.dumps(node.offload) if node.offload else 'false'}"]
        if iface.mac:
            lines.append(f"mac = {json.dumps(iface.mac)}")
        lines.append("")
    for route in node.routes:
        lines.append("[[route]]")
        lines.append(f"to = {json.dumps(route.to)}")
        if route.via:
            lines.append(f"via = {json.dumps(route.via)}")
        if route.dev:
            lines.append(f"dev = {json.dumps(route.dev)}")
        lines += [f"metric = {route.metric}", ""]
    services = {"echo": node.echo, "http": node.http if node.http is not None else False,
                **node.dns}
    # services, NAT and filters as the lab file gave them: top-level keys (inline tables)
    head = [f"services = {toml_value(services)}"]
    head += [f"{key} = {toml_value(value)}" for key, value in node.middlebox.items()]
    return "\n".join(lines[:3] + head + lines[3:]) + "\n"


def toml_value(value: Any) -> str:
    """A value as inline TOML (strings, numbers, booleans, lists, tables)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(v)}"
                               for k, v in value.items()) + "}"
    raise ValueError(f"cannot write {value!r} as TOML")


def _save_state(lab: Lab, state: dict[str, Any]) -> None:
    with open(os.path.join(state_dir(lab.name), "state.json"), "w") as f:
        json.dump(state, f, indent=2)


def load_state(name: str) -> dict[str, Any]:
    try:
        with open(os.path.join(state_dir(name), "state.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _tapstack_command() -> list[str]:
    return [sys.executable, "-m", "stack.cli"]


def node_ready(lab: Lab, node: LabNode) -> dict[str, Any] | None:
    """The running tapstack node's snapshot, None if it does not answer."""
    start = ns.current_netns()
    try:
        ns.enter_netns(lab.switch_netns)
        return read_stats(f"node/{node.name}", timeout=2.0)
    except (OSError, ValueError, LinkError):
        return None
    finally:
        ns.return_to_netns(start)
        os.close(start)


def up(lab: Lab) -> None:
    if ns.netns_exists(lab.switch_netns):
        raise LabError(f"lab {lab.name} is already up (run: tapstack lab down "
                       f"{lab.path or lab.name})")
    directory = state_dir(lab.name)
    shutil.rmtree(directory, ignore_errors=True)
    os.makedirs(directory)
    shutil.copyfile(lab.path, os.path.join(directory, "lab.toml"))
    state: dict[str, Any] = {"file": os.path.abspath(lab.path), "pids": {}}
    try:
        _build(lab, state, directory)
    except BaseException:
        with contextlib.suppress(Exception):
            down(lab)
        raise
    _save_state(lab, state)


def _build(lab: Lab, state: dict[str, Any], directory: str) -> None:
    sw = lab.switch_netns
    ns.create_netns(sw)
    _quiet_namespace(sw)
    for seg in lab.segments.values():
        _run("ip", "-n", sw, "link", "add", seg.bridge, "mtu", str(seg.mtu), "type", "bridge")
        _run("ip", "-n", sw, "link", "set", seg.bridge, "up")
    for node in lab.nodes.values():
        if node.kind == "linux":
            _build_linux(lab, node)
    procs: dict[str, subprocess.Popen] = {}
    for node in lab.nodes.values():
        if node.kind != "tapstack":
            continue
        config = os.path.join(directory, f"{node.name}.toml")
        with open(config, "w") as f:
            f.write(_node_toml(lab, node, directory))
        log = open(os.path.join(directory, f"{node.name}.log"), "w")  # noqa: SIM115
        procs[node.name] = subprocess.Popen(
            [*_tapstack_command(), "run", "--config", config, "--log-level", "warning"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True)
        log.close()
        state["pids"][node.name] = procs[node.name].pid
        _save_state(lab, state)
    deadline = time.monotonic() + READY_TIMEOUT
    for name, proc in procs.items():
        node = lab.nodes[name]
        while node_ready(lab, node) is None:
            if proc.poll() is not None or time.monotonic() > deadline:
                with open(os.path.join(directory, f"{name}.log")) as f:
                    tail = [ln for ln in f.read().strip().splitlines() if ln][-1:] or ["?"]
                what = "exited" if proc.poll() is not None else "did not become ready"
                raise LabError(f"tapstack node {name} {what}: {tail[0]}")
            time.sleep(0.05)
    for node in lab.nodes.values():
        for k, command in enumerate(node.commands):
            log = open(os.path.join(directory, f"{node.name}.cmd{k}.log"), "w")  # noqa: SIM115
            proc = subprocess.Popen(["ip", "netns", "exec", lab.netns(node), "sh", "-c",
                                     command], stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
            log.close()
            state["pids"][f"{node.name}.cmd{k}"] = proc.pid
    _save_state(lab, state)


def _hosts_file(lab: Lab) -> str:
    """Every node by name: `ip netns exec` puts this over /etc/hosts in a Linux node.
    The machine's own name too, as Debian's /etc/hosts has it (127.0.1.1): a namespace
    shares the machine's host name, and programs that look it up (curl -v does) would
    otherwise ask the lab's DNS for it (unless a node has that name: the node wins)."""
    lines = ["127.0.0.1 localhost"]
    names = set()
    for node in lab.nodes.values():
        for k, (iface, address) in enumerate(
                (i, a) for i in node.interfaces for a in i.addresses):
            name = node.name if k == 0 else f"{node.name}-{iface.name}"
            names.add(name)
            lines.append(f"{address.split('/')[0]} {name}")
    if socket.gethostname() not in names:
        lines.append(f"127.0.1.1 {socket.gethostname()}")
    return "\n".join(lines) + "\n"


def _etc(lab: Lab, node: LabNode) -> None:
    """/etc/netns/NS: the lab's names, and the lab's name server (by default none: an
    address lookup that asks one, as Python's http.server does at start, then fails at
    once instead of waiting out the machine's resolver)."""
    etc = os.path.join(ETC_NETNS, lab.netns(node))
    os.makedirs(etc, exist_ok=True)
    with open(os.path.join(etc, "hosts"), "w") as f:
        f.write(_hosts_file(lab))
    with open(os.path.join(etc, "resolv.conf"), "w") as f:
        f.write(f"# tapstack lab {lab.name}\nnameserver {lab.nameserver}\n")


def _build_linux(lab: Lab, node: LabNode) -> None:
    sw, name = lab.switch_netns, lab.netns(node)
    ns.create_netns(name)
    _etc(lab, node)
    _quiet_namespace(name)
    for iface in node.interfaces:
        port = lab.port(node, iface)
        _run("ip", "-n", sw, "link", "add", port, "mtu", str(iface.mtu), "type", "veth",
             "peer", "name", iface.name, "netns", name)
        _run("ip", "-n", sw, "link", "set", port, "master",
             lab.segments[iface.segment].bridge, "up")
        _run("ip", "-n", name, "link", "set", iface.name, "mtu", str(iface.mtu))
        if iface.mac:
            _run("ip", "-n", name, "link", "set", iface.name, "address", iface.mac)
        for address in iface.addresses:
            _run("ip", "-n", name, "addr", "add", address, "dev", iface.name)
        _run("ip", "-n", name, "link", "set", iface.name, "up")
    if node.forwarding:
        _in(name, "sh", "-c", "echo 1 > /proc/sys/net/ipv4/ip_forward")
    for route in node.routes:
        cmd = ["ip", "-n", name, "route", "add", route.to]
        if route.via:
            cmd += ["via", route.via]
        if route.dev:
            cmd += ["dev", route.dev]
        if route.metric:
            cmd += ["metric", str(route.metric)]
        _run(*cmd)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie of ours counts as gone
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _namespace_pids(netns: str) -> list[int]:
    if not ns.netns_exists(netns):
        return []
    r = _run("ip", "netns", "pids", netns, check=False)
    return [int(p) for p in r.stdout.split() if p.isdigit()]


def down(lab: Lab) -> list[str]:
    """Stop every process the lab started and delete its namespaces (with every link in
    them). Works after a crash or a kill -9: nothing here needs the state file. Returns
    what was removed."""
    removed: list[str] = []
    state = load_state(lab.name)
    pids = [int(p) for p in state.get("pids", {}).values()]
    names = [lab.netns(n) for n in lab.nodes.values() if n.kind == "linux"]
    names.append(lab.switch_netns)
    for name in names:
        pids += _namespace_pids(name)
    # tapstack nodes first get SIGTERM (they reset their connections and close their
    # TAPs); commands get it for their whole process group
    for pid in set(pids):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGTERM) if _is_group_leader(pid) else \
                os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline and any(_alive(p) for p in set(pids)):
        time.sleep(0.05)
    for pid in set(pids):
        if _alive(pid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
    for name in names:
        for pid in _namespace_pids(name):  # anything still inside (started by hand)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        if ns.netns_exists(name):
            _run("ip", "netns", "delete", name, check=False)
            removed.append(name)
        shutil.rmtree(os.path.join(ETC_NETNS, name), ignore_errors=True)
    shutil.rmtree(state_dir(lab.name), ignore_errors=True)
    return removed


def _is_group_leader(pid: int) -> bool:
    try:
        return os.getpgid(pid) == pid
    except ProcessLookupError:
        return False


def status(lab: Lab) -> list[dict[str, Any]]:
    """Each node: name, kind, namespace, interfaces (segment, addresses), health."""
    out = []
    for node in lab.nodes.values():
        entry: dict[str, Any] = {"name": node.name, "kind": node.kind}
        if node.kind == "linux":
            entry["namespace"] = lab.netns(node)
            entry["health"] = "up" if ns.netns_exists(lab.netns(node)) else "down"
        else:
            entry["namespace"] = None
            entry["control_namespace"] = lab.switch_netns
            snapshot = node_ready(lab, node) if ns.netns_exists(lab.switch_netns) else None
            entry["health"] = "up" if snapshot is not None else "down"
            if snapshot is not None:
                entry["pid"] = snapshot.get("info", {}).get("pid")
        entry["forwarding"] = node.forwarding
        entry["interfaces"] = [
            {"name": i.name, "segment": i.segment, "addresses": i.addresses, "mtu": i.mtu,
             "port": lab.port(node, i)} for i in node.interfaces]
        out.append(entry)
    return out


def running_labs() -> list[str]:
    try:
        return sorted(d for d in os.listdir(STATE_ROOT)
                      if os.path.exists(os.path.join(STATE_ROOT, d, "lab.toml")))
    except FileNotFoundError:
        return []


def find_lab(which: str | None) -> Lab:
    """A lab by file or by name; with neither, the only one that is up."""
    if which and os.path.exists(which) and not os.path.isdir(which):
        return load_lab(which)
    names = running_labs()
    if which:
        if which not in names:
            raise LabError(f"no lab named {which} is up (up: {', '.join(names) or 'none'})")
        name = which
    elif len(names) == 1:
        name = names[0]
    else:
        raise LabError("name the lab with --lab FILE-or-NAME "
                       f"(up: {', '.join(names) or 'none'})")
    lab = load_lab(os.path.join(state_dir(name), "lab.toml"))
    lab.path = load_state(name).get("file", lab.path)
    return lab
