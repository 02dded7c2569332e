"""An adaptive-bitrate HLS player, in Python: it plays a ladder in real time (downloads
segments, keeps a buffer that playback drains at one second per second, stalls when it
runs dry) and chooses each segment's rendition by one of two rules:

- `ewma` (throughput): the download rate of each segment feeds two exponentially
  weighted moving averages, a fast one (half-life 3 s of download time) and a slow one
  (9 s), bias-corrected while they warm up; the estimate is the lower of the two. The
  player takes the highest rendition whose BANDWIDTH fits in 70 % of the estimate when
  climbing, 95 % when staying or going down, and fills its buffer up to a ceiling.
  This is the rule hls.js uses.
- `bola` (buffer): BOLA-BASIC (Spiteri, Urgaonkar, Sitaraman, "BOLA: Near-Optimal Bitrate
  Adaptation for Online Videos", 2016). The utility of rendition m is ln(S_m / S_1)
  (S: segment size); with the buffer at Q segments, it fetches the rendition that
  maximises (V (v_m + gp) - Q) / S_m, and nothing while every score is negative (the
  buffer is full enough). V and gp follow from the buffer target: the lowest rendition
  below one segment of buffer, nothing above the target.

Both abandon a download that would stall playback when a lower rendition would arrive in
time (after 0.5 s, if what is left at the rate so far would take longer than the buffer
holds), as hls.js does, and fetch that segment again lower.

Every segment is logged: the rendition chosen, its size, download time, measured
throughput, the estimate, the buffer before and after, and any stall. With `shape`, the
player also runs a `tc tbf` schedule on a link (a namespace and device) and logs the
rate it set, so that one file tells the whole run (`tapstack hls plot` draws it).
"""

from __future__ import annotations

import http.client
import itertools
import math
import subprocess
import threading
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urljoin, urlsplit

from stack.video.hls import HlsError, parse_master, parse_media

RULES = ("ewma", "bola", "fixed")


@dataclass
class Variant:
    bandwidth: int
    name: str
    resolution: str
    segments: list[tuple[float, str]]  # (duration, absolute URL)


class Http:
    """GETs over one persistent connection (HTTP/1.1 keep-alive, as players do),
    reopened when the server or an abandoned download closed it."""

    def __init__(self, url: str, timeout: float = 30.0) -> None:
        parts = urlsplit(url)
        self.host, self.port = parts.hostname or "", parts.port or 80
        self.timeout = timeout
        self.conn: http.client.HTTPConnection | None = None
        self.connections = 0

    def _connection(self) -> http.client.HTTPConnection:
        if self.conn is None:
            self.conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
            self.connections += 1
        return self.conn

    def get(self, url: str, progress=None) -> tuple[bytes | None, int]:
        """The body (None if `progress(bytes so far, total)` said stop) and its size so
        far; HlsError when the server does not answer 200."""
        path = urlsplit(url).path or "/"
        for attempt in (1, 2):
            conn = self._connection()
            try:
                conn.request("GET", path)
                resp = conn.getresponse()
                break
            except (http.client.HTTPException, OSError):
                self.close()
                if attempt == 2:
                    raise
        if resp.status != 200:
            resp.read()
            raise HlsError(f"{url}: HTTP {resp.status}")
        total = int(resp.getheader("Content-Length") or 0)
        chunks, got = [], 0
        while True:
            data = resp.read1(65536)
            if not data:
                break
            chunks.append(data)
            got += len(data)
            if progress is not None and not progress(got, total):
                self.close()  # abandoned: the rest of the body is not wanted
                return None, got
        resp.read()  # at the end: marks the response done, so the connection is reused
        if resp.will_close:
            self.close()
        return b"".join(chunks), got

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def load(url: str, client: Http) -> list[Variant]:
    """The master playlist and every media playlist, lowest BANDWIDTH first."""
    body, _ = client.get(url)
    variants = []
    for attrs, uri in parse_master(body.decode()):
        media_url = urljoin(url, uri)
        text, _ = client.get(media_url)
        pl = parse_media(text.decode(), uri)
        variants.append(Variant(int(attrs["BANDWIDTH"]), uri.split("/")[0],
                                attrs.get("RESOLUTION", "?"),
                                [(d, urljoin(media_url, s)) for d, s in pl.segments]))
    variants.sort(key=lambda v: v.bandwidth)
    if len({len(v.segments) for v in variants}) != 1:
        raise HlsError("the renditions do not have the same number of segments")
    return variants


class Ewma:
    """An exponentially weighted moving average of throughput, weighted by download
    time, with the warm-up bias removed (divide by 1 - alpha^total weight)."""

    def __init__(self, half_life: float) -> None:
        self.alpha = math.exp(math.log(0.5) / half_life)
        self.value = 0.0
        self.weight = 0.0

    def sample(self, seconds: float, bps: float) -> None:
        a = self.alpha ** seconds
        self.value = bps * (1 - a) + a * self.value
        self.weight += seconds

    def estimate(self) -> float | None:
        if self.weight == 0:
            return None
        return self.value / (1 - self.alpha ** self.weight)


@dataclass
class Throughput:
    """hls.js's rule: the lower of a fast and a slow EWMA, with safety factors."""
    default_bps: float = 500_000.0
    up_factor: float = 0.7
    factor: float = 0.95
    fast: Ewma = field(default_factory=lambda: Ewma(3.0))
    slow: Ewma = field(default_factory=lambda: Ewma(9.0))

    def sample(self, seconds: float, bits: float) -> None:
        if seconds <= 0:
            return
        for ewma in (self.fast, self.slow):
            ewma.sample(seconds, bits / seconds)

    def estimate(self) -> float:
        both = [e.estimate() for e in (self.fast, self.slow)]
        known = [x for x in both if x is not None]
        return min(known) if known else self.default_bps

    def choose(self, variants: list[Variant], current: int, buffer: float,
               max_buffer: float, duration: float) -> int | None:
        if buffer + duration > max_buffer:
            return None  # full enough: wait
        estimate = self.estimate()
        best = 0
        for i, v in enumerate(variants):
            if v.bandwidth <= estimate * (self.up_factor if i > current else self.factor):
                best = i
        return best


@dataclass
class _Logged:
    """A rule that does not use throughput still logs hls.js's estimate of it."""
    throughput: Throughput = field(default_factory=Throughput)

    def sample(self, seconds: float, bits: float) -> None:
        self.throughput.sample(seconds, bits)

    def estimate(self) -> float:
        return self.throughput.estimate()


@dataclass
class Fixed(_Logged):
    """No adaptation: one rendition throughout (to compare transports, not rules)."""
    index: int = field(default=0, kw_only=True)

    def choose(self, variants: list[Variant], current: int, buffer: float,
               max_buffer: float, duration: float) -> int | None:
        return None if buffer + duration > max_buffer else min(self.index, len(variants) - 1)


@dataclass
class Bola(_Logged):
    """BOLA-BASIC over the buffer in segments; `gp` and `V` put the lowest rendition's
    threshold at one segment of buffer and the top of the buffer at `max_buffer`."""

    def choose(self, variants: list[Variant], current: int, buffer: float,
               max_buffer: float, duration: float) -> int | None:
        sizes = [v.bandwidth * duration for v in variants]
        utility = [math.log(s / sizes[0]) for s in sizes]
        q_max = max(max_buffer / duration, 2.0)  # the target, in segments
        # the lowest rendition's score crosses zero at Q = V * gp = 1 segment; every
        # score is negative above Q = V * (v_max + gp) = q_max - 1
        gp = utility[-1] / (q_max - 2) if q_max > 2 and utility[-1] > 0 else 1.0
        v = 1 / gp
        q = buffer / duration
        scores = [(v * (u + gp) - q) / s for u, s in zip(utility, sizes, strict=True)]
        best = max(range(len(variants)), key=lambda i: scores[i])
        if scores[best] < 0:
            return None  # the buffer is above its target: wait
        return best


class Shaper:
    """A `tc tbf` schedule on one link, run in the background: [(rate in bit/s,
    seconds or None for the rest)]; logs (time, rate) as it sets each."""

    def __init__(self, netns: str, dev: str, steps: list[tuple[int, float | None]],
                 clock) -> None:
        self.netns, self.dev, self.steps, self.clock = netns, dev, steps, clock
        self.log: list[tuple[float, int]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def set(self, rate: int) -> None:
        burst = max(3000, rate // 8 // 50)  # 20 ms of data, at least two frames
        r = subprocess.run(["ip", "netns", "exec", self.netns, "tc", "qdisc", "replace",
                            "dev", self.dev, "root", "tbf", "rate", f"{rate}bit", "burst",
                            str(burst), "latency", "300ms"], capture_output=True, text=True,
                           timeout=10)
        if r.returncode != 0:
            raise HlsError(f"tc on {self.dev} in {self.netns}: {r.stderr.strip()}")
        self.log.append((self.clock(), rate))

    def start(self) -> None:
        self.set(self.steps[0][0])
        self.thread.start()

    def _run(self) -> None:
        for i, (_rate, seconds) in enumerate(self.steps):
            if seconds is None or self.stop.wait(seconds):
                return
            if i + 1 < len(self.steps):
                self.set(self.steps[i + 1][0])

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=15)
        subprocess.run(["ip", "netns", "exec", self.netns, "tc", "qdisc", "del", "dev",
                        self.dev, "root"], capture_output=True, timeout=10)


def parse_schedule(text: str) -> list[tuple[int, float | None]]:
    """'5mbit:10,600kbit:16,5mbit' -> [(5000000, 10.0), (600000, 16.0), (5000000, None)]."""
    steps: list[tuple[int, float | None]] = []
    units = {"kbit": 1_000, "mbit": 1_000_000, "gbit": 1_000_000_000, "bit": 1}
    for i, part in enumerate(p.strip() for p in text.split(",")):
        rate_text, _, secs = part.partition(":")
        rate_text = rate_text.strip().lower()
        unit = next((u for u in units if rate_text.endswith(u)), None)
        try:
            rate = int(float(rate_text[: -len(unit)]) * units[unit]) if unit else None
            seconds = float(secs) if secs else None
        except ValueError:
            rate = None
            seconds = None
        if rate is None or rate < 8000 or (secs and (seconds is None or seconds <= 0)):
            raise HlsError(f"schedule step {part!r} must look like 600kbit:16 (a rate of at "
                           "least 8kbit, seconds after the colon)")
        if seconds is None and i + 1 < len(text.split(",")):
            raise HlsError(f"schedule step {part!r}: only the last step may omit its seconds")
        steps.append((rate, seconds))
    if not steps:
        raise HlsError("the schedule is empty")
    return steps


class Player:
    def __init__(self, url: str, rule: str = "ewma", max_buffer: float = 8.0,
                 segments: int | None = None, shaper: tuple[str, str, list] | None = None,
                 variant: str | None = None) -> None:
        if rule not in RULES:
            raise HlsError(f"rule {rule!r} must be one of {', '.join(RULES)}")
        if (rule == "fixed") != (variant is not None):
            raise HlsError("--variant NAME goes with --rule fixed, and only with it")
        self.variant = variant
        if not 2 <= max_buffer <= 120:
            raise HlsError(f"--max-buffer {max_buffer:g} must be between 2 and 120 seconds")
        self.url, self.rule_name, self.max_buffer = url, rule, max_buffer
        self.limit = segments
        self.rule: Throughput | Bola | Fixed = Throughput() if rule == "ewma" else \
            Bola() if rule == "bola" else Fixed()
        self.http = Http(url)
        self.start = time.monotonic()
        self.shaper = Shaper(*shaper, self.now) if shaper else None
        # playback
        self.buffer = 0.0
        self.playing = False
        self.started_at: float | None = None
        self.last = 0.0
        self.stalls: list[list[float]] = []  # [start, end]
        self.log: list[dict[str, Any]] = []

    def now(self) -> float:
        return time.monotonic() - self.start

    def _advance(self) -> None:
        """Playback drains the buffer; a dry buffer is a stall."""
        now = self.now()
        if self.playing:
            self.buffer -= now - self.last
            if self.buffer <= 0:
                self.stalls.append([now + self.buffer, None])  # it ran dry back then
                self.buffer = 0.0
                self.playing = False
        self.last = now

    def _added(self, seconds: float, resume_at: float) -> None:
        self.buffer += seconds
        if not self.playing and self.buffer >= resume_at:
            self.playing = True
            if self.started_at is None:
                self.started_at = self.now()
            elif self.stalls and self.stalls[-1][1] is None:
                self.stalls[-1][1] = self.now()

    def run(self) -> dict[str, Any]:
        variants = load(self.url, self.http)
        if isinstance(self.rule, Fixed):
            names = [v.name for v in variants]
            if self.variant not in names:
                raise HlsError(f"no rendition {self.variant} (there are {', '.join(names)})")
            self.rule.index = names.index(self.variant)
        count = len(variants[0].segments)
        if self.limit is not None:
            count = min(count, self.limit)
        if self.shaper is not None:
            self.shaper.start()
        try:
            current = self.rule.index if isinstance(self.rule, Fixed) else 0
            self.last = self.now()
            for seq in range(count):
                current = self._fetch(variants, seq, current)
        finally:
            if self.shaper is not None:
                self.shaper.close()
            self.http.close()
        self._advance()
        if self.stalls and self.stalls[-1][1] is None:  # ran dry after the last download
            self.stalls.pop()
        return self.summary(variants)

    def _fetch(self, variants: list[Variant], seq: int, current: int) -> int:
        duration = variants[0].segments[seq][0]
        waited = 0.0
        while True:
            self._advance()
            choice = self.rule.choose(variants, current, self.buffer, self.max_buffer,
                                      duration)
            if choice is not None:
                break
            pause = min(0.25, max(self.buffer - 0.1, 0.01))
            time.sleep(pause)  # playback goes on; a buffer ceiling is not a stall
            waited += pause
        before = self.buffer
        abandoned_from = None
        while True:
            t0 = self.now()
            deadline = {"level": None}

            def progress(got: int, total: int, t0=t0, choice=choice,
                         deadline=deadline) -> bool:
                elapsed = self.now() - t0
                if choice == 0 or elapsed < 0.5 or not total or isinstance(self.rule, Fixed):
                    return True
                rate = got * 8 / elapsed
                self._advance()
                left = (total - got) * 8 / rate
                if left <= self.buffer:
                    return True
                lower = max((i for i in range(choice) if
                             variants[i].bandwidth * duration / rate < self.buffer),
                            default=0)
                deadline["level"] = lower
                return False

            body, got = self.http.get(variants[choice].segments[seq][1], progress)
            seconds = self.now() - t0
            self.rule.sample(seconds, got * 8)
            if body is not None:
                break
            abandoned_from, choice = choice, deadline["level"]
        self._advance()
        stalled_before = sum((s[1] or self.now()) - max(s[0], t0) for s in self.stalls
                             if (s[1] is None or s[1] > t0))
        self._added(duration, min(duration, 2.0))
        self.log.append({
            "seq": seq, "t": round(t0, 3), "variant": choice, "name": variants[choice].name,
            "bandwidth": variants[choice].bandwidth, "bytes": got,
            "seconds": round(seconds, 3), "throughput_bps": round(got * 8 / seconds)
            if seconds > 0 else None, "estimate_bps": round(self.rule.estimate()),
            "buffer_before": round(before, 3), "buffer_after": round(self.buffer, 3),
            "stall_s": round(stalled_before, 3), "waited_s": round(waited, 3),
            "abandoned_from": abandoned_from})
        return choice

    def summary(self, variants: list[Variant]) -> dict[str, Any]:
        stalls = [round(e - s, 3) for s, e in self.stalls if e is not None]
        choices = [r["variant"] for r in self.log]
        return {
            "url": self.url, "rule": self.rule_name, "max_buffer": self.max_buffer,
            "variants": [{"name": v.name, "bandwidth": v.bandwidth,
                          "resolution": v.resolution} for v in variants],
            "startup_s": round(self.started_at, 3) if self.started_at is not None else None,
            "stalls": stalls, "stall_total_s": round(sum(stalls), 3),
            "switches": sum(1 for a, b in itertools.pairwise(choices) if a != b),
            "abandoned": sum(1 for r in self.log if r["abandoned_from"] is not None),
            "connections": self.http.connections,
            "link": [{"t": round(t, 3), "bps": r} for t, r in
                     (self.shaper.log if self.shaper else [])],
            "segments": self.log}


def plot(run: dict[str, Any], out: str) -> str:
    """One run as a PNG: the bitrate of each segment fetched (a step from the start of
    its download) against the link's rate, stalls shaded; below, the buffer level."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    segs = run["segments"]
    fig, (top, low) = plt.subplots(2, 1, figsize=(11, 6.5), sharex=True,
                                   gridspec_kw={"height_ratios": [3, 2]})
    end = max([s["t"] + s["seconds"] for s in segs] + [1.0])
    if run.get("link"):
        xs = [p["t"] for p in run["link"]] + [end]
        ys = [p["bps"] / 1e6 for p in run["link"]]
        top.step(xs, ys + ys[-1:], where="post", color="#888", lw=2, label="link rate (tbf)")
    top.step([s["t"] for s in segs] + [end], [s["bandwidth"] / 1e6 for s in segs]
             + [segs[-1]["bandwidth"] / 1e6 if segs else 0], where="post", color="#1f77b4",
             lw=2, label=f"rendition fetched ({run['rule']})")
    top.plot([s["t"] + s["seconds"] for s in segs],
             [(s["throughput_bps"] or 0) / 1e6 for s in segs], "o", ms=4, color="#e67e22",
             label="measured per segment")
    gave_up = [s for s in segs if s["abandoned_from"] is not None]
    if gave_up:  # at the rendition given up, when the download that replaced it began
        top.plot([s["t"] for s in gave_up],
                 [run["variants"][s["abandoned_from"]]["bandwidth"] / 1e6 for s in gave_up],
                 "x", ms=9, color="#c0392b", label="download abandoned")
    top.set_ylabel("Mbit/s")
    top.set_yscale("log")
    top.legend(loc="upper right", fontsize=8)
    low.plot([s["t"] + s["seconds"] for s in segs], [s["buffer_after"] for s in segs],
             "-o", ms=3, color="#2ca02c", label="buffer after each segment")
    for start, length in _stall_spans(run):
        for ax in (top, low):
            ax.axvspan(start, start + length, color="#c0392b", alpha=0.2)
    low.set_ylabel("buffer (s)")
    low.set_xlabel("seconds since the player started")
    low.legend(loc="upper right", fontsize=8)
    fig.suptitle(f"{run['url']}: rule {run['rule']}, startup {run['startup_s']} s, "
                 f"{len(run['stalls'])} stalls ({run['stall_total_s']} s), "
                 f"{run['switches']} switches, {run['abandoned']} abandoned")
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def _stall_spans(run: dict[str, Any]) -> list[tuple[float, float]]:
    """Where stalls fell: each segment's stall time, ending when it arrived."""
    return [(s["t"] + s["seconds"] - s["stall_s"], s["stall_s"]) for s in run["segments"]
            if s["stall_s"] > 0]
