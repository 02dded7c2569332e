"""`tapstack lab up|down|status|exec|capture`: drive a lab from the command line."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from stack.config import ConfigError
from stack.lab.build import LabError, down, find_lab, status, up
from stack.lab.topology import load_lab


def add_lab_parser(sub: argparse._SubParsersAction) -> None:
    lab = sub.add_parser("lab", help="topologies of tapstack nodes and Linux hosts in "
                                     "network namespaces")
    cmds = lab.add_subparsers(dest="lab_command", required=True)
    p = cmds.add_parser("up", help="build the lab a file describes, wait until it is ready")
    p.add_argument("file")
    p = cmds.add_parser("down", help="remove everything the lab made, even after a crash")
    p.add_argument("file")
    p = cmds.add_parser("status", help="nodes, their addresses and health")
    p.add_argument("file")
    p.add_argument("--json", action="store_true", help="machine-readable")
    p = cmds.add_parser("exec", help="run a command in a Linux node: lab exec NODE -- CMD")
    p.add_argument("--lab", help="the lab's file or name (default: the only one up)")
    p.add_argument("node")
    p.add_argument("cmd", nargs=argparse.REMAINDER)
    p = cmds.add_parser("capture", help="write a segment's frames to a pcap (a mirror port)")
    p.add_argument("--lab", help="the lab's file or name (default: the only one up)")
    p.add_argument("segment")
    p.add_argument("-w", "--write", metavar="FILE",
                   help="pcap file (default: SEGMENT.pcap in the current directory)")
    p.add_argument("-c", "--count", type=int, help="stop after this many frames")
    p.add_argument("--duration", type=float, help="stop after this many seconds")


def _root() -> None:
    if os.geteuid() != 0:
        raise LabError("tapstack lab needs root (namespaces, bridges, TAP devices); "
                       "run it with sudo")


def cmd_lab(args: argparse.Namespace) -> int:
    try:
        return _dispatch(args)
    except (LabError, ConfigError) as exc:
        print(f"tapstack: {exc}", file=sys.stderr)
        return 2


def _dispatch(args: argparse.Namespace) -> int:
    c = args.lab_command
    if c in ("up", "down", "status"):
        lab = load_lab(args.file)
        _root()
        if c == "up":
            up(lab)
            print(f"lab {lab.name} is up:")
            _print_status(status(lab))
            print(f"try: tapstack lab status {args.file}; tapstack lab exec NODE -- CMD; "
                  f"tapstack lab down {args.file}")
        elif c == "down":
            removed = down(lab)
            print(f"lab {lab.name} is down" + (f" (removed {', '.join(removed)})"
                                               if removed else " (nothing was up)"))
        else:
            entries = status(lab)
            if args.json:
                print(json.dumps({"lab": lab.name, "switch_namespace": lab.switch_netns,
                                  "nodes": entries}, indent=2))
            else:
                _print_status(entries)
        return 0
    _root()
    lab = find_lab(args.lab)
    if c == "exec":
        cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
        if not cmd:
            raise LabError("lab exec needs a command: tapstack lab exec NODE -- CMD")
        node = lab.nodes.get(args.node)
        if node is None:
            raise LabError(f"lab {lab.name} has no node named {args.node}")
        if node.kind != "linux":
            raise LabError(f"{args.node} is a tapstack node; lab exec runs commands in "
                           "Linux nodes (see tapstack stats/route --node)")
        return subprocess.call(["ip", "netns", "exec", lab.netns(node), *cmd])
    if args.segment not in lab.segments:
        raise LabError(f"lab {lab.name} has no segment named {args.segment}")
    out = args.write or f"{args.segment}.pcap"
    cmd = ["ip", "netns", "exec", lab.switch_netns, "tcpdump", "-i",
           lab.segments[args.segment].bridge, "-U", "--immediate-mode", "-n",
           "-Z", "root", "-w", out]
    if args.count:
        cmd += ["-c", str(args.count)]
    if args.duration:
        cmd = ["timeout", "-s", "INT", "-k", "2", str(args.duration), *cmd]
    print(f"capturing segment {args.segment} to {out} (Ctrl-C stops)", file=sys.stderr,
          flush=True)
    os.execvp(cmd[0], cmd)  # tcpdump itself takes Ctrl-C and SIGINT, and writes the file
    return 0


def _print_status(entries: list[dict]) -> None:
    for e in entries:
        where = e.get("namespace") or f"process in {e.get('control_namespace')}"
        role = "router" if e["forwarding"] else "host"
        print(f"  {e['name']:<8} {e['kind']:<8} {role:<6} {e['health']:<4}  {where}")
        for i in e["interfaces"]:
            print(f"      {i['name']:<6} segment {i['segment']:<8} mtu {i['mtu']:<5} "
                  f"{', '.join(i['addresses']) or '-'}")
