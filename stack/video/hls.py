"""HTTP Live Streaming (RFC 8216): a bitrate ladder made with ffmpeg from a synthetic
source, and a checker for the playlists it wrote.

The ladder: three renditions (240p, 360p, 720p at about 0.4, 1 and 3 Mbit/s), H.264 and
AAC in MPEG-TS segments, every rendition cut at the same instants (a keyframe forced
every SEGMENT seconds, no scene-cut keyframes), so a player may switch between them at
any segment boundary. ffmpeg writes the media playlists and the master playlist
(BANDWIDTH, AVERAGE-BANDWIDTH, RESOLUTION, CODECS per variant); tapstack's HTTP server
serves the directory (`tapstack run --root DIR`).

The checker reads what a player would read, with RFC 8216's rules: the master's
variants and their attributes, each media playlist's target duration against every
rounded EXTINF (4.3.3.1), the media sequence, the end list of a VOD playlist, every
segment there, and the renditions cut alike.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field


class HlsError(Exception):
    """A one-sentence reason the ladder could not be made or read."""


@dataclass(frozen=True)
class Rendition:
    name: str
    width: int
    height: int
    video_bps: int
    audio_bps: int


LADDER = (
    Rendition("240p", 426, 240, 400_000, 64_000),
    Rendition("360p", 640, 360, 1_000_000, 96_000),
    Rendition("720p", 1280, 720, 3_000_000, 128_000),
)
FPS = 25

CONTENT_TYPES = {  # RFC 8216 4: the playlist's type; the segments' (RFC 3555, RFC 4337)
    ".m3u8": "application/vnd.apple.mpegurl",
    ".ts": "video/mp2t",
    ".m4s": "video/iso.segment",
    ".mp4": "video/mp4",
    ".aac": "audio/aac",
}


def ffmpeg_command(out: str, duration: float, segment: float,
                   ladder: tuple[Rendition, ...] = LADDER, window: int | None = None
                   ) -> list[str]:
    """The one ffmpeg run that encodes every rendition from one synthetic source. With
    `window`, live: the source is read in real time (-re) and each media playlist keeps
    the last `window` segments, EXT-X-MEDIA-SEQUENCE counting those that left (RFC 8216
    6.2.2), the files of old segments deleted; EXT-X-ENDLIST comes when the event ends."""
    live = ["-re"] if window else []
    gop = round(FPS * segment)
    split = f"[0:v]split={len(ladder)}" + "".join(f"[s{i}]" for i in range(len(ladder)))
    scales = [f"[s{i}]scale={r.width}:{r.height}[v{i}]" for i, r in enumerate(ladder)]
    cmd = ["ffmpeg", "-hide_banner", "-loglevel", "error", "-nostdin", "-y",
           *live, "-f", "lavfi", "-i", f"testsrc2=size=1280x720:rate={FPS}",
           *live, "-f", "lavfi", "-i", "sine=frequency=440:sample_rate=48000",
           "-t", f"{duration:g}", "-filter_complex", ";".join([split, *scales])]
    for i in range(len(ladder)):
        cmd += ["-map", f"[v{i}]", "-map", "1:a"]
    for i, r in enumerate(ladder):
        cmd += [f"-c:v:{i}", "libx264", f"-b:v:{i}", str(r.video_bps),
                f"-maxrate:v:{i}", str(int(r.video_bps * 1.1)),
                f"-bufsize:v:{i}", str(r.video_bps * 2),
                f"-c:a:{i}", "aac", f"-b:a:{i}", str(r.audio_bps)]
    cmd += ["-preset", "veryfast", "-profile:v", "main", "-pix_fmt", "yuv420p",
            "-g", str(gop), "-keyint_min", str(gop), "-sc_threshold", "0",
            "-force_key_frames", f"expr:gte(t,n_forced*{segment:g})",
            "-ar", "48000", "-ac", "2",
            "-f", "hls", "-hls_time", f"{segment:g}",
            *(["-hls_list_size", str(window), "-hls_flags", "delete_segments"] if window
              else ["-hls_playlist_type", "vod"]),
            "-hls_segment_type", "mpegts",
            "-hls_segment_filename", os.path.join(out, "%v", "seg_%03d.ts"),
            "-master_pl_name", "master.m3u8",
            "-var_stream_map", " ".join(f"v:{i},a:{i},name:{r.name}"
                                        for i, r in enumerate(ladder)),
            os.path.join(out, "%v", "index.m3u8")]
    return cmd


# The page `tapstack run --root DIR` serves at /: the browser's own HLS player (Chromium
# and Safari have one) plays the master playlist; the line below it says what is shown.
PLAYER_PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>tapstack HLS</title>
</head><body style="font-family:sans-serif">
<video id="v" src="master.m3u8" controls autoplay muted width="640"></video>
<p id="o">waiting for video</p>
<script>
var v = document.getElementById("v"), o = document.getElementById("o");
function note() {
  o.textContent = v.error ? "error: " + v.error.message :
    v.videoWidth + "x" + v.videoHeight + " at " + v.currentTime.toFixed(1) + " s";
}
["loadedmetadata", "resize", "timeupdate", "error"].forEach(function (n) {
  v.addEventListener(n, note);
});
</script></body></html>
"""


def make_ladder(out: str, duration: float = 20.0, segment: float = 2.0,
                window: int | None = None) -> dict:
    """Encode the ladder into `out` (made if missing); returns the checker's summary.
    With `window`, live: this takes `duration` seconds, the playlists sliding as it goes
    (serve `out` meanwhile)."""
    if shutil.which("ffmpeg") is None:
        raise HlsError("ffmpeg is not installed (apt-get install ffmpeg)")
    if not 1 <= duration <= 3600:
        raise HlsError(f"--duration {duration:g} must be between 1 and 3600 seconds")
    if not 1 <= segment <= 10 or segment > duration:
        raise HlsError(f"--segment {segment:g} must be between 1 and 10 seconds, and no "
                       "longer than the video")
    if window is not None and not 2 <= window <= 100:
        raise HlsError(f"--window {window} must be between 2 and 100 segments")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "index.html"), "w") as f:
        f.write(PLAYER_PAGE)
    r = subprocess.run(ffmpeg_command(out, duration, segment, window=window),
                       capture_output=True, text=True, timeout=max(120, duration * 10))
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["no message"])[-1]
        raise HlsError(f"ffmpeg failed: {last}")
    return check(out)


# -- the checker ---------------------------------------------------------------------------

_ATTR = re.compile(r'([A-Z0-9-]+)=("[^"]*"|[^,]*)')


def attributes(text: str) -> dict[str, str]:
    """An attribute list (RFC 8216 4.2), quotes removed."""
    return {k: v.strip('"') for k, v in _ATTR.findall(text)}


@dataclass
class MediaPlaylist:
    uri: str
    target: int = 0
    version: int | None = None
    media_sequence: int = 0
    playlist_type: str | None = None
    endlist: bool = False
    segments: list[tuple[float, str]] = field(default_factory=list)  # (EXTINF, uri)


def parse_media(text: str, uri: str) -> MediaPlaylist:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines or lines[0] != "#EXTM3U":
        raise HlsError(f"{uri}: the first line must be #EXTM3U (RFC 8216 4.3.1.1)")
    pl = MediaPlaylist(uri)
    seen_target = 0
    pending: float | None = None
    for ln in lines[1:]:
        if ln.startswith("#EXT-X-TARGETDURATION:"):
            pl.target = int(ln.split(":", 1)[1])
            seen_target += 1
        elif ln.startswith("#EXT-X-VERSION:"):
            pl.version = int(ln.split(":", 1)[1])
        elif ln.startswith("#EXT-X-MEDIA-SEQUENCE:"):
            if pl.segments:
                raise HlsError(f"{uri}: EXT-X-MEDIA-SEQUENCE after the first segment "
                               "(RFC 8216 4.3.3.2)")
            pl.media_sequence = int(ln.split(":", 1)[1])
        elif ln.startswith("#EXT-X-PLAYLIST-TYPE:"):
            pl.playlist_type = ln.split(":", 1)[1]
        elif ln == "#EXT-X-ENDLIST":
            pl.endlist = True
        elif ln.startswith("#EXTINF:"):
            pending = float(ln.split(":", 1)[1].split(",", 1)[0])
        elif not ln.startswith("#"):
            if pending is None:
                raise HlsError(f"{uri}: segment {ln} has no EXTINF (RFC 8216 4.3.2.1)")
            pl.segments.append((pending, ln))
            pending = None
    if seen_target != 1:
        raise HlsError(f"{uri}: needs exactly one EXT-X-TARGETDURATION (RFC 8216 4.3.3.1)")
    for duration, seg in pl.segments:
        if round(duration) > pl.target:  # 4.3.3.1: rounded to the nearest integer
            raise HlsError(f"{uri}: {seg} lasts {duration:g} s, over the target duration "
                           f"{pl.target} (RFC 8216 4.3.3.1)")
    if pl.playlist_type == "VOD" and not pl.endlist:
        raise HlsError(f"{uri}: a VOD playlist must end with EXT-X-ENDLIST (RFC 8216 "
                       "4.3.3.5)")
    return pl


def parse_master(text: str) -> list[tuple[dict[str, str], str]]:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines or lines[0] != "#EXTM3U":
        raise HlsError("master.m3u8: the first line must be #EXTM3U (RFC 8216 4.3.1.1)")
    variants = []
    for i, ln in enumerate(lines):
        if ln.startswith("#EXT-X-STREAM-INF:"):
            attrs = attributes(ln.split(":", 1)[1])
            if i + 1 >= len(lines) or lines[i + 1].startswith("#"):
                raise HlsError("master.m3u8: EXT-X-STREAM-INF not followed by a URI "
                               "(RFC 8216 4.3.4.2)")
            variants.append((attrs, lines[i + 1]))
    if not variants:
        raise HlsError("master.m3u8 names no variant stream")
    for attrs, uri in variants:
        for need in ("BANDWIDTH", "RESOLUTION", "CODECS"):
            if need not in attrs:
                raise HlsError(f"master.m3u8: variant {uri} has no {need} (RFC 8216 4.3.4.2; "
                               "CODECS and RESOLUTION SHOULD be there)")
    return variants


def probe(path: str) -> dict:
    """What ffprobe reads in one segment: its streams and duration."""
    r = subprocess.run(["ffprobe", "-v", "error", "-show_entries",
                        "stream=codec_type,codec_name,width,height:format=duration",
                        "-of", "json", path], capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        raise HlsError(f"ffprobe cannot read {path}: {r.stderr.strip()[-200:]}")
    return json.loads(r.stdout)


def check(directory: str, with_ffprobe: bool = True) -> dict:
    """Validate the ladder in `directory`; returns a summary (variants, segments)."""
    master_path = os.path.join(directory, "master.m3u8")
    try:
        with open(master_path) as f:
            variants = parse_master(f.read())
    except OSError:
        raise HlsError(f"{master_path} is missing: make the ladder first "
                       "(tapstack hls make DIR)") from None
    summary = {"variants": []}
    cuts = None
    for attrs, uri in variants:
        path = os.path.join(directory, uri)
        with open(path) as f:
            pl = parse_media(f.read(), uri)
        durations = [d for d, _ in pl.segments]
        if cuts is None:
            cuts = durations
        elif len(durations) != len(cuts) or any(abs(a - b) > 0.05
                                                for a, b in zip(durations, cuts, strict=True)):
            raise HlsError(f"{uri}: its segments are not cut where the others are "
                           "(keyframes not aligned: players cannot switch cleanly)")
        base = os.path.dirname(path)
        width, height = (int(x) for x in attrs["RESOLUTION"].split("x"))
        for _, seg in pl.segments:
            seg_path = os.path.join(base, seg)
            if not os.path.isfile(seg_path):
                raise HlsError(f"{uri}: segment {seg} is missing")
            if with_ffprobe:
                streams = probe(seg_path)["streams"]
                video = [s for s in streams if s.get("codec_type") == "video"]
                if not video or (video[0]["width"], video[0]["height"]) != (width, height):
                    raise HlsError(f"{seg_path}: video is not {width}x{height} as the "
                                   "master says")
        size = sum(os.path.getsize(os.path.join(base, s)) for _, s in pl.segments)
        seconds = sum(durations)
        summary["variants"].append({
            "uri": uri, "bandwidth": int(attrs["BANDWIDTH"]),
            "resolution": attrs["RESOLUTION"], "codecs": attrs["CODECS"],
            "segments": len(pl.segments), "target_duration": pl.target,
            "seconds": round(seconds, 3),
            "measured_bps": int(size * 8 / seconds) if seconds else 0})
    summary["segment_seconds"] = cuts
    return summary
