"""`tapstack hls make|check DIR`: an HLS bitrate ladder to serve with `tapstack run --root`."""

from __future__ import annotations

import argparse
import json
import sys

from stack.video.abr import RULES, Player, parse_schedule, plot
from stack.video.hls import LADDER, HlsError, check, make_ladder


def add_hls_parser(sub: argparse._SubParsersAction,
                   common: argparse.ArgumentParser | None = None) -> None:
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
    p = cmds.add_parser("live", help="the same ladder live, in real time: sliding playlists "
                                     "(serve DIR with tapstack run --root DIR meanwhile)")
    p.add_argument("dir")
    p.add_argument("--duration", type=float, default=60.0,
                   help="seconds the live event lasts (default: %(default)s)")
    p.add_argument("--segment", type=float, default=2.0,
                   help="seconds per segment (default: %(default)s)")
    p.add_argument("--window", type=int, default=5,
                   help="segments each playlist keeps (default: %(default)s)")
    p = cmds.add_parser("check", help="validate the playlists (RFC 8216) and read every "
                                      "segment with ffprobe")
    p.add_argument("dir")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p = cmds.add_parser("play", help="play a master playlist in real time with an adaptive "
                                     "bitrate rule, one log line per segment")
    p.add_argument("url", help="the master playlist, e.g. http://10.77.0.2/master.m3u8")
    p.add_argument("--rule", choices=RULES, default="ewma",
                   help="ewma: throughput (as hls.js); bola: buffer (BOLA-BASIC); fixed: "
                        "the --variant throughout (default: %(default)s)")
    p.add_argument("--variant", metavar="NAME", help="with --rule fixed: e.g. 360p")
    p.add_argument("--max-buffer", type=float, default=8.0,
                   help="seconds of video to keep ahead (default: %(default)s)")
    p.add_argument("--segments", type=int, help="stop after this many segments")
    p.add_argument("--shape", metavar="NETNS:DEV",
                   help="run --schedule with tc tbf on this device in this namespace (the "
                        "link towards the player)")
    p.add_argument("--schedule", default="5mbit:10,600kbit:16,5mbit",
                   help="rates and how long each lasts (default: %(default)s)")
    p.add_argument("--log", metavar="FILE", help="write the run (JSON) here")
    p = cmds.add_parser("send", parents=[common] if common else [],
                        help="send one rendition live as MPEG-TS over tapstack's UDP, at its "
                             "own rate (receive with ffmpeg -i udp://@:PORT)")
    p.add_argument("rendition", help="a rendition's directory, e.g. DIR/360p")
    p.add_argument("target", help="udp://HOST:PORT")
    p = cmds.add_parser("plot", help="draw a run written by hls play --log (PNG)")
    p.add_argument("log")
    p.add_argument("--out", metavar="PNG", help="where to write (default: LOG.png)")


def cmd_hls(args: argparse.Namespace) -> int:
    try:
        if args.hls_command == "play":
            return _play(args)
        if args.hls_command == "send":
            return _send(args)
        if args.hls_command == "plot":
            with open(args.log) as f:
                run = json.load(f)
            print(plot(run, args.out or args.log.rsplit(".", 1)[0] + ".png"))
            return 0
        if args.hls_command == "live":
            print(f"tapstack: live for {args.duration:g} s into {args.dir}/master.m3u8 "
                  f"(window {args.window} segments); serve it with tapstack run --root "
                  f"{args.dir}", file=sys.stderr, flush=True)
            summary = make_ladder(args.dir, args.duration, args.segment, args.window)
        elif args.hls_command == "make":
            summary = make_ladder(args.dir, args.duration, args.segment)
        else:
            summary = check(args.dir)
    except (HlsError, OSError, ValueError, KeyError) as exc:
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


def _play(args: argparse.Namespace) -> int:
    shaper = None
    if args.shape:
        netns, _, dev = args.shape.partition(":")
        if not netns or not dev:
            raise HlsError(f"--shape {args.shape!r} must look like NETNS:DEV")
        shaper = (netns, dev, parse_schedule(args.schedule))
    player = Player(args.url, args.rule, args.max_buffer, args.segments, shaper,
                    args.variant)
    run = player.run()
    for s in run["segments"]:
        print(f"{s['t']:7.2f} s  #{s['seq']:<3} {s['name']:>5}  {s['bytes']:>8} B in "
              f"{s['seconds']:6.2f} s  = {(s['throughput_bps'] or 0) / 1e6:6.2f} Mbit/s  "
              f"estimate {s['estimate_bps'] / 1e6:5.2f}  buffer {s['buffer_before']:5.2f} -> "
              f"{s['buffer_after']:5.2f} s"
              + (f"  stalled {s['stall_s']:.2f} s" if s["stall_s"] else "")
              + (f"  (abandoned {run['variants'][s['abandoned_from']]['name']})"
                 if s["abandoned_from"] is not None else ""))
    print(f"startup {run['startup_s']} s, {len(run['stalls'])} stalls "
          f"({run['stall_total_s']} s), {run['switches']} switches, {run['abandoned']} "
          f"abandoned, {run['connections']} TCP connections")
    if args.log:
        with open(args.log, "w") as f:
            json.dump(run, f, indent=1)
    return 0


def _send(args: argparse.Namespace) -> int:
    """A tapstack of its own (as `tapstack connect` runs one) sends the rendition."""
    import asyncio

    from stack.api import Stack
    from stack.launch import build_config, build_runtime, host_spec, stack_environment
    from stack.runtime import run
    from stack.video.live import parse_target, rendition, send

    data, duration = rendition(args.rendition)
    host, port = parse_target(args.target)
    config, host_cidr = build_config(args)
    spec = host_spec(args, config, host_cidr)
    result: dict = {}

    async def session(runtime) -> None:
        async def go() -> None:
            try:
                result.update(await send(Stack(runtime), data, duration, host, port))
            except OSError as exc:
                result["error"] = str(exc)
            finally:
                await asyncio.sleep(0.05)  # the last datagrams leave
                runtime.stop()

        asyncio.get_running_loop().create_task(go())

    print(f"tapstack: sending {args.rendition} ({len(data)} bytes, {duration:g} s) to "
          f"{host}:{port} over UDP", file=sys.stderr, flush=True)
    with stack_environment(spec, args.command, args.pcap) as (links, control, pcap):
        runtime = build_runtime(spec, links, pcap, args.impair)
        run(runtime, control, None, use_uvloop=not args.asyncio, setup=session)
    if "error" in result:
        raise HlsError(f"send to {host}:{port}: {result['error']}")
    print(json.dumps(result))
    return 0
