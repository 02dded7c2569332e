"""An HLS ladder made by `tapstack hls make` (real ffmpeg), served by tapstack, read by
curl, ffprobe and ffmpeg as a player in the namespace."""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest

from stack.video.live import receiver_report
from tests.integration.conftest import (
    REPO,
    STACK_IP,
    in_ns,
    listening,
    require_tool,
    tapstack_cmd,
    wait_for,
)

URL = f"http://{STACK_IP}"


def make(out, seconds: int):
    """`tapstack hls make` with 2-second segments, as a user would run it."""
    require_tool("ffmpeg")
    require_tool("ffprobe")
    r = subprocess.run(tapstack_cmd("hls", "make", str(out), "--duration", str(seconds),
                                    "--segment", "2"), cwd=REPO, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "master.m3u8 is valid" in r.stdout
    return out


@pytest.fixture(scope="module")
def ladder(tmp_path_factory):
    return make(tmp_path_factory.mktemp("hls"), 6)


def test_the_ladder_has_three_aligned_renditions(ladder):
    r = subprocess.run(tapstack_cmd("hls", "check", str(ladder), "--json"), cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    variants = summary["variants"]
    assert [v["resolution"] for v in variants] == ["426x240", "640x360", "1280x720"]
    assert [v["segments"] for v in variants] == [3, 3, 3]
    assert all(v["target_duration"] == 2 for v in variants)
    bandwidth = [v["bandwidth"] for v in variants]
    assert bandwidth == sorted(bandwidth) and bandwidth[0] < 1e6 < bandwidth[2]
    assert all(v["codecs"].startswith("avc1.") and "mp4a.40.2" in v["codecs"]
               for v in variants)
    # each rendition's real rate lies below what the master promises (BANDWIDTH is a peak)
    assert all(v["measured_bps"] <= v["bandwidth"] for v in variants)


def test_a_broken_ladder_is_refused_in_one_sentence(ladder, tmp_path):
    r = subprocess.run(tapstack_cmd("hls", "check", str(tmp_path)), cwd=REPO,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert r.stderr.startswith("tapstack: ") and "master.m3u8 is missing" in r.stderr
    assert r.stderr.count("\n") == 1


def curl_head(ns: str, *args: str) -> dict[str, str]:
    r = in_ns(ns, "curl", "-sS", "-D", "-", "-o", "/dev/null", *args, timeout=30)
    lines = r.stdout.replace("\r", "").splitlines()
    headers = {"status": lines[0].split(" ")[1]}
    for ln in lines[1:]:
        if ":" in ln:
            k, v = ln.split(":", 1)
            headers[k.strip().lower()] = v.strip()
    return headers


def test_tapstack_serves_it_with_the_right_types_ranges_and_caching(ladder, start_stack):
    st = start_stack("--root", str(ladder), pcap=False)
    master = curl_head(st.ns, f"{URL}/master.m3u8")
    assert master["status"] == "200"
    assert master["content-type"] == "application/vnd.apple.mpegurl"
    assert master["cache-control"] == "no-cache"  # playlists change when live
    seg = curl_head(st.ns, f"{URL}/360p/seg_001.ts")
    assert seg["status"] == "200" and seg["content-type"] == "video/mp2t"
    assert seg["cache-control"].startswith("max-age=")
    size = (ladder / "360p" / "seg_001.ts").stat().st_size
    assert int(seg["content-length"]) == size
    # a byte range: the second transport-stream packet, 188 bytes starting with 0x47
    r = subprocess.run(["ip", "netns", "exec", st.ns, "curl", "-sS", "-r", "188-375", "-w",
                        "%{http_code}", f"{URL}/360p/seg_001.ts"], capture_output=True,
                       timeout=30)
    body = r.stdout
    assert body.endswith(b"206") and len(body) == 188 + 3 and body[0] == 0x47
    assert body[:188] == (ladder / "360p" / "seg_001.ts").read_bytes()[188:376]
    # ffprobe reads a segment over HTTP from tapstack
    r = in_ns(st.ns, "ffprobe", "-v", "error", "-show_entries", "stream=codec_name,width",
              "-of", "json", f"{URL}/720p/seg_000.ts", timeout=60)
    streams = json.loads(r.stdout)["streams"]
    assert {"h264", "aac"} <= {s["codec_name"] for s in streams}
    assert any(s.get("width") == 1280 for s in streams)
    # / is the ladder's player page: the browser's own HLS player on the master
    page = in_ns(st.ns, "curl", "-sS", f"{URL}/", timeout=30).stdout
    assert '<video id="v" src="master.m3u8"' in page


def test_ffmpeg_plays_the_master_playlist_from_tapstack(ladder, start_stack):
    """A real HLS client: ffmpeg reads the master, picks a variant, fetches every segment
    over tapstack's TCP, and decodes all six seconds."""
    st = start_stack("--root", str(ladder), pcap=False)
    r = in_ns(st.ns, "timeout", "-k", "5", "60", "ffmpeg", "-hide_banner", "-nostdin",
              "-i", f"{URL}/master.m3u8", "-map", "0:v:0", "-f", "null", "-",
              timeout=90)
    assert r.returncode == 0, r.stderr[-2000:]
    frames = [int(x) for x in re.findall(r"frame=\s*(\d+)", r.stderr)]
    assert frames and frames[-1] >= 6 * 25 - 1  # every frame of the 6 s at 25 fps
    st.stop()
    # tapstack's access log: the master first, then the playlists and segments (ffmpeg
    # asks for ranges, "bytes=0-", so they are 206s); every segment of the variant it
    # played was fetched
    got = re.findall(r'"GET (\S+) HTTP/1\.1" 20[06]', st.stderr)
    assert got and got[0] == "/master.m3u8", st.stderr[-1000:]
    assert any({f"/{v}/seg_00{i}.ts" for i in range(3)} <= set(got)
               for v in ("240p", "360p", "720p")), got


PLAY_PAGE = """<html><body><video id=v src="{src}" autoplay muted></video><div id=o></div>
<script>
var v = document.getElementById('v'), o = document.getElementById('o'), seen = [];
function note() {{ o.textContent = JSON.stringify({{sizes: seen, t: v.currentTime,
                                                   error: v.error && v.error.message}}); }}
['loadedmetadata', 'resize', 'playing', 'timeupdate', 'error'].forEach(function (n) {{
  v.addEventListener(n, function () {{
    var s = v.videoWidth + 'x' + v.videoHeight;
    if (v.videoWidth && seen[seen.length - 1] !== s) seen.push(s);
    note();
  }});
}});
</script></body></html>
"""

LEVELS = {"240p": 0, "360p": 1, "720p": 2}


def chromium_plays(client_ns: str, page: str, seconds: int) -> dict:
    """Headless Chromium (its own HLS player) plays the page; what the page saw."""
    r = subprocess.run(["ip", "netns", "exec", client_ns, "timeout", "-k", "5", "90",
                        "chromium", "--headless", "--no-sandbox", "--disable-gpu",
                        "--autoplay-policy=no-user-gesture-required",
                        f"--virtual-time-budget={seconds * 1000}", "--dump-dom", page],
                       capture_output=True, text=True, timeout=120)
    m = re.search(r'<div id="o">([^<]*)</div>', r.stdout)
    assert m and m.group(1), r.stdout[-500:] + r.stderr[-1500:]
    return json.loads(m.group(1).replace("&quot;", '"'))


def levels_fetched(stderr: str) -> list[int]:
    """The rendition of every segment tapstack served, in order (its access log)."""
    return [LEVELS[v] for v in re.findall(r'"GET /(\d+p)/seg_\d+\.ts HTTP/1\.1" 20[06]',
                                          stderr)]


@pytest.fixture(scope="module")
def long_ladder(tmp_path_factory):
    out = make(tmp_path_factory.mktemp("hls-long"), 16)
    (out / "play.html").write_text(PLAY_PAGE.format(src="/master.m3u8"))
    return out


def test_chromium_plays_from_tapstack_and_adapts_to_a_shaped_link(long_ladder, start_stack,
                                                                  netns):
    """Chromium's own HLS player, one routed hop from tapstack, plays the ladder twice:
    on the bare link, then with the hop shaped to 700 kbit/s (tbf), where only 240p
    fits. Shaped, it fetches lower renditions than it chose unshaped (the renditions
    are read from tapstack's access log: what went over the wire) at the first switch
    point. How far it climbs later is the player's business: under headless Chromium's
    virtual time it fills its buffer and then probes upwards even on the slow link."""
    require_tool("chromium")
    st = start_stack("--root", str(long_ladder), ns=netns, pcap=False)
    from tests.integration.conftest import add_routed_client

    client = add_routed_client(netns)
    try:
        fast = chromium_plays(client, f"{URL}/play.html", 14)
        subprocess.run(["ip", "netns", "exec", netns, "tc", "qdisc", "add", "dev", "rt0",
                        "root", "tbf", "rate", "700kbit", "burst", "16kbit", "latency",
                        "500ms"], check=True, capture_output=True)
        slow = chromium_plays(client, f"{URL}/play.html", 14)
    finally:
        subprocess.run(["ip", "netns", "delete", client], check=False)
    st.stop()
    first, _, second = st.stderr.rpartition('"GET /play.html ')
    unshaped, shaped = levels_fetched(first), levels_fetched(second)
    for seen in (fast, slow):
        assert seen["error"] is None and seen["sizes"], seen  # it decoded and showed video
    assert len(unshaped) >= 2 and len(shaped) >= 2, (unshaped, shaped)
    # both start at the lowest rendition; at the first switch point, with the link
    # measured, the fast link goes up and the shaped one stays down
    assert unshaped[0] == shaped[0] == 0
    assert unshaped[1] >= 1 and shaped[1] == 0, (unshaped, shaped)
    print(f"renditions fetched (0=240p, 1=360p, 2=720p): unshaped {unshaped}, shaped to "
          f"700 kbit/s {shaped}")


# -- the Python ABR player under a shaping schedule ------------------------------------------

SCHEDULE = "8mbit:6,700kbit:10,8mbit"  # 720p fits, then only 240p, then 720p again
STALL_BOUND = 2.0  # seconds: one segment


@pytest.fixture(scope="module")
def abr_ladder(tmp_path_factory):
    return make(tmp_path_factory.mktemp("hls-abr"), 40)


def _phases(run: dict) -> tuple[float, float]:
    """When the link went down and up again, from the player's own log of the tc calls."""
    rates = [(p["t"], p["bps"]) for p in run["link"]]
    assert [r for _, r in rates] == [8_000_000, 700_000, 8_000_000], rates
    return rates[1][0], rates[2][0]


def test_the_python_player_adapts_to_a_shaping_schedule_with_each_rule(abr_ladder,
                                                                         start_stack, netns,
                                                                         tmp_path):
    """Two players, one per rule (ewma: throughput, as hls.js; bola: buffer), at once from
    one tapstack, each on a link of its own shaped by the same tbf schedule (8 Mbit/s for
    6 s, 700 kbit/s for 10 s, 8 Mbit/s again). Each climbs above 240p on the fast link,
    is at 240p within three segments of the drop, climbs again after the recovery, and
    never stalls longer than a segment. Assertions on the players' logs."""
    start_stack("--root", str(abr_ladder), "--no-access-log", ns=netns, pcap=False)
    from tests.integration.conftest import add_routed_client

    clients = [add_routed_client(netns, n) for n in (0, 1)]
    procs, logs = [], {}
    try:
        for n, (client, rule) in enumerate(zip(clients, ("ewma", "bola"), strict=True)):
            logs[rule] = tmp_path / f"abr-{rule}.json"
            procs.append(subprocess.Popen(
                ["ip", "netns", "exec", client, "timeout", "-k", "5", "120",
                 *tapstack_cmd("hls", "play", f"{URL}/master.m3u8", "--rule", rule,
                               "--shape", f"{netns}:rt{n}", "--schedule", SCHEDULE,
                               "--segments", "20", "--log", str(logs[rule]))],
                cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        outputs = [p.communicate(timeout=150) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for client in clients:
            subprocess.run(["ip", "netns", "delete", client], check=False)
    for p, (out, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out[-2000:] + err[-2000:]
    for rule, path in logs.items():
        run = json.loads(path.read_text())
        down, up = _phases(run)
        segs = run["segments"]
        assert len(segs) == 20 and run["rule"] == rule
        before = [s for s in segs if s["t"] + s["seconds"] <= down]
        during = [s for s in segs if s["t"] + s["seconds"] > down and s["t"] < up]
        after = [s for s in segs if s["t"] >= up]
        where = (rule, [(s["t"], s["name"], s["abandoned_from"]) for s in segs])
        assert max(s["variant"] for s in before) >= 1, where  # it climbed
        assert any(s["variant"] == 0 for s in during[:3]), where  # down within 3 segments
        assert len(after) >= 4 and max(s["variant"] for s in after) >= 1, where  # and up
        assert all(stall <= STALL_BOUND for stall in run["stalls"]), (run["stalls"], where)
        print(f"{rule}: " + " ".join(s["name"] + ("*" if s["abandoned_from"] is not None
                                                  else "") for s in segs)
              + f"; stalls {run['stalls']}")
    png = subprocess.run(tapstack_cmd("hls", "plot", str(logs["bola"])), cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert png.returncode == 0, png.stderr
    assert Path(png.stdout.strip()).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# -- live over UDP, next to the same rendition over TCP ---------------------------------------


def _lossy_towards(ns: str, dev: str, probability: float) -> None:
    """The kernel drops a share of what it forwards out of `dev` (towards the viewer):
    loss on the last link, the same for UDP and TCP."""
    in_ns(ns, "iptables", "-A", "FORWARD", "-o", dev, "-m", "statistic", "--mode", "random",
          "--probability", str(probability), "-j", "DROP", check=True)


def test_live_udp_keeps_decoding_through_loss_while_hls_delivers_every_frame(ladder,
                                                                            start_stack,
                                                                            netns):
    """5 % loss towards the viewer. Live: a second tapstack in the namespace (tap1) sends
    the 360p rendition as MPEG-TS over UDP at its own rate to ffmpeg one hop away, which
    decodes what arrives and reports the damage (corrupt packets, concealed pictures).
    HLS: ffmpeg reads the same rendition from tapstack over HTTP through the same loss and
    decodes every frame without an error, while tapstack retransmits; the Python player
    (fixed to 360p) says what the wait cost: startup and stalls."""
    require_tool("ffmpeg")
    st = start_stack("--root", str(ladder), "--no-access-log", ns=netns, pcap=False)
    from tests.integration.conftest import add_routed_client

    client = add_routed_client(netns)
    try:
        _lossy_towards(netns, "rt0", 0.05)
        ff = subprocess.Popen(["ip", "netns", "exec", client, "timeout", "-k", "5", "60",
                               "ffmpeg", "-hide_banner", "-nostdin", "-i",
                               "udp://0.0.0.0:5006?timeout=3000000&fifo_size=100000",
                               "-f", "null", "-"], stderr=subprocess.PIPE, text=True)
        wait_for(lambda: listening(client, 5006, "u"), bool, 15)
        sent = subprocess.run(tapstack_cmd("hls", "send", "--netns", netns, "--tap", "tap1",
                                           "--address", "10.77.1.2/24", "--host-address",
                                           "10.77.1.1/24", "--mac", "02:00:0a:4d:01:02",
                                           str(ladder / "360p"), "udp://10.78.0.2:5006"),
                              cwd=REPO, capture_output=True, text=True, timeout=60)
        assert sent.returncode == 0, sent.stderr
        udp = receiver_report(ff.communicate(timeout=60)[1])
        before = st.counter("tcp.retransmits")
        hls = in_ns(client, "timeout", "-k", "5", "90", "ffmpeg", "-hide_banner", "-nostdin",
                    "-i", f"{URL}/360p/index.m3u8", "-f", "null", "-", timeout=100)
        tcp = receiver_report(hls.stderr)
        retransmitted = st.counter("tcp.retransmits") - before
        played = in_ns(client, *tapstack_cmd("hls", "play", f"{URL}/master.m3u8", "--rule",
                                             "fixed", "--variant", "360p"), timeout=60)
    finally:
        subprocess.run(["ip", "netns", "delete", client], check=False)
    datagrams = json.loads(sent.stdout)["datagrams"]
    frames = 6 * 25
    # UDP: it kept decoding, and said what the loss cost
    assert 0 < udp["frames"] <= frames and datagrams > 500, (udp, datagrams)
    assert udp["corrupt_packets"] + udp["corrupt_frames"] + udp["concealed_frames"] > 0, udp
    # TCP: every frame, no damage, at the price of retransmissions
    assert hls.returncode == 0 and tcp["frames"] >= frames - 1, (tcp, hls.stderr[-3000:])
    assert tcp["corrupt_packets"] == tcp["corrupt_frames"] == tcp["concealed_frames"] == 0
    assert retransmitted > 0
    assert played.returncode == 0 and "stalls" in played.stdout, played.stderr
    print(f"5 % loss: UDP {udp}; HLS {tcp}, {retransmitted} retransmissions; player: "
          f"{played.stdout.splitlines()[-1]}")


def test_a_live_ladder_slides_its_window_while_tapstack_serves_it(tmp_path, start_stack):
    """`tapstack hls live` (ffmpeg in real time) writes into the directory tapstack
    serves; read over HTTP while it runs, each media playlist holds at most its window,
    has no EXT-X-ENDLIST yet, numbers its first segment with EXT-X-MEDIA-SEQUENCE (which
    grows as segments leave, RFC 8216 6.2.2) and names segments that are there; ffmpeg
    plays the live master; at the end the event closes with EXT-X-ENDLIST."""
    require_tool("ffmpeg")
    from stack.video.hls import parse_media

    live = tmp_path / "live"
    live.mkdir()
    st = start_stack("--root", str(live), "--no-access-log", pcap=False)
    maker = subprocess.Popen(tapstack_cmd("hls", "live", str(live), "--duration", "16",
                                          "--segment", "2", "--window", "3"), cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen, played = [], None
    try:
        while maker.poll() is None:
            r = in_ns(st.ns, "curl", "-sf", f"{URL}/360p/index.m3u8", timeout=10)
            if r.returncode == 0 and r.stdout.startswith("#EXTM3U"):
                pl = parse_media(r.stdout, "360p/index.m3u8")
                if not pl.endlist and pl.segments:
                    last = pl.segments[-1][1]
                    got = in_ns(st.ns, "curl", "-sf", "-o", "/dev/null", "-w",
                                "%{http_code}", f"{URL}/360p/{last}", timeout=10).stdout
                    seen.append((pl.media_sequence, [u for _, u in pl.segments], got))
                if played is None and len(pl.segments) >= 2 and not pl.endlist:
                    played = in_ns(st.ns, "timeout", "-k", "5", "40", "ffmpeg",
                                   "-hide_banner", "-nostdin", "-i", f"{URL}/master.m3u8",
                                   "-map", "0:v:0", "-t", "3", "-f", "null", "-", timeout=50)
            time.sleep(0.5)
        out, err = maker.communicate(timeout=60)
    finally:
        if maker.poll() is None:
            maker.kill()
    assert maker.returncode == 0, err
    assert seen, "no live playlist was read"
    for sequence, segments, code in seen:
        assert 1 <= len(segments) <= 3, segments
        assert segments == [f"seg_{sequence + i:03d}.ts" for i in range(len(segments))]
        assert code == "200", (sequence, segments, code)
    assert max(s for s, _, _ in seen) >= 2, seen  # the window slid
    assert played is not None and played.returncode == 0, played and played.stderr[-1500:]
    assert receiver_report(played.stderr)["frames"] >= 70  # 3 s at 25 fps, live
    final = parse_media((live / "360p" / "index.m3u8").read_text(), "360p/index.m3u8")
    assert final.endlist and final.media_sequence >= 2 and len(final.segments) <= 3
