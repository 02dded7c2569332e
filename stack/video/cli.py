"""`tapstack hls make|check DIR`: an HLS bitrate ladder to serve with `tapstack run --root`."""

from __future__ import annotations

import argparse
import json
import sys

from stack.video.hls import LADDER, HlsError, check, make_ladder


def add_hls_parser(sub: argparse._SubParsersAction) -> None:
    hls = sub.add_parser("hls", help="HTTP Live Streaming: make a bitrate ladder with ffmpeg "
                                     "(serve it with tapstack run --root DIR), check one")
    cmds = hls.add_subparsers(dest="hls_command", required=True)
    p = cmds.add_parser("make", help="encode a synthetic video into " + ", ".join(
        f"{r.name} ({r.video_bps / 1e6:g} Mbit/s)" for r in LADDER)
        + " with aligned segments and a master playlist")
    p.add_argument("dir")
    p.add_argument("--duration", type=float, default=20.0,
                   help="seconds of video (default: %(default)s)")
    p.add_argument("--segment", type=float, default=2.0,
                   help="seconds per segment (default: %(default)s)")
    p = cmds.add_parser("check", help="validate the playlists (RFC 8216) and read every "
                                      "segment with ffprobe")
    p.add_argument("dir")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")


def cmd_hls(args: argparse.Namespace) -> int:
    try:
        if args.hls_command == "make":
            summary = make_ladder(args.dir, args.duration, args.segment)
        else:
            summary = check(args.dir)
    except HlsError as exc:
        print(f"tapstack: {exc}", file=sys.stderr)
        return 2
    if getattr(args, "json", False):
        print(json.dumps(summary, indent=2))
        return 0
    for v in summary["variants"]:
        print(f"{v['uri']:<18} {v['resolution']:>9}  BANDWIDTH {v['bandwidth']:>8}  "
              f"measured {v['measured_bps'] / 1e6:.2f} Mbit/s  {v['segments']} segments, "
              f"target {v['target_duration']} s  {v['codecs']}")
    print(f"{args.dir}/master.m3u8 is valid; serve it with: tapstack run --root {args.dir}"
          f"  (then http://10.77.0.2/master.m3u8)")
    return 0
