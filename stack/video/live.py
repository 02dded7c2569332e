"""Live video over UDP: one rendition of a ladder sent as MPEG-TS over tapstack's UDP, as
IPTV and many live encoders send it (RFC 2250's layout without the RTP header: seven
188-byte transport packets per datagram, 1316 bytes), paced at the stream's own rate.
A receiver such as `ffmpeg -i udp://@:5006` decodes what arrives; a lost datagram is
seven lost packets: a gap in the continuity counters, damaged pictures that the decoder
conceals, never a wait. Over TCP (HLS) the same loss costs time instead.

    tapstack hls send DIR/360p udp://10.78.0.2:5006     # from tapstack's own UDP

`receiver_report()` reads what ffmpeg said while decoding: frames decoded, continuity
errors, packets it found corrupt, macroblocks it concealed.
"""

from __future__ import annotations

import asyncio
import os
import re
from typing import Any
from urllib.parse import urlsplit

from stack.video.hls import HlsError, parse_media

TS_PACKET = 188
PER_DATAGRAM = 7  # 1316 bytes: fits any Ethernet path with room to spare


def rendition(directory: str) -> tuple[bytes, float]:
    """A rendition's segments, joined (MPEG-TS segments concatenate into one valid
    stream), and its duration from the playlist."""
    playlist = os.path.join(directory, "index.m3u8")
    try:
        with open(playlist) as f:
            pl = parse_media(f.read(), playlist)
        data = b"".join(open(os.path.join(directory, uri), "rb").read()  # noqa: SIM115
                        for _, uri in pl.segments)
    except OSError as exc:
        raise HlsError(f"cannot read the rendition in {directory}: {exc.strerror}") from None
    duration = sum(d for d, _ in pl.segments)
    if not data or len(data) % TS_PACKET or data[0] != 0x47 or duration <= 0:
        raise HlsError(f"{directory} holds no MPEG-TS stream (188-byte packets, sync 0x47)")
    return data, duration


def parse_target(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    if parts.scheme != "udp" or not parts.hostname or not parts.port:
        raise HlsError(f"{url!r} must look like udp://HOST:PORT")
    return parts.hostname, parts.port


async def send(stack: Any, data: bytes, duration: float, host: str, port: int,
               tick: float = 0.01) -> dict[str, Any]:
    """Send `data` to host:port in 1316-byte datagrams at len(data)/duration bytes a
    second, a tick's worth at a time (the pace a live encoder keeps)."""
    loop = asyncio.get_running_loop()
    transport, _ = await stack.create_datagram_endpoint(asyncio.DatagramProtocol,
                                                        remote_addr=(host, port))
    size = TS_PACKET * PER_DATAGRAM
    chunks = [data[i:i + size] for i in range(0, len(data), size)]
    rate = len(chunks) / duration  # datagrams per second
    start = loop.time()
    sent = 0
    try:
        while sent < len(chunks):
            due = min(len(chunks), int((loop.time() - start) * rate) + 1)
            while sent < due:
                transport.sendto(chunks[sent])
                sent += 1
            await asyncio.sleep(tick)
    finally:
        transport.close()
    return {"datagrams": sent, "bytes": len(data), "seconds": round(loop.time() - start, 3),
            "bps": round(len(data) * 8 / duration)}


_FRAMES = re.compile(r"frame=\s*(\d+)")
_COUNTS = {  # what ffmpeg (6.x) prints for each kind of damage
    "continuity": re.compile(r"[Cc]ontinuity check failed"),
    "corrupt_packets": re.compile(r"corrupt input packet"),
    "corrupt_frames": re.compile(r"corrupt decoded frame"),
    "decode_errors": re.compile(r"error while decoding|Invalid NAL|decode_slice_header "
                                r"error|no frame!|missing picture"),
}
_CONCEAL = re.compile(r"concealing (\d+) DC, (\d+) AC, (\d+) MV errors")


def receiver_report(stderr: str) -> dict[str, int]:
    """ffmpeg's own account of a decode: frames out, and each kind of damage seen."""
    frames = [int(x) for x in _FRAMES.findall(stderr)]
    out = {"frames": frames[-1] if frames else 0}
    for name, pattern in _COUNTS.items():
        out[name] = len(pattern.findall(stderr))
    concealed = _CONCEAL.findall(stderr)
    out["concealed_frames"] = len(concealed)
    out["concealed_blocks"] = sum(int(dc) for dc, _, _ in concealed)
    return out
