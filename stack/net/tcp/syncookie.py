"""SYN cookies (RFC 4987 3.6): a stateless SYN-ACK when the SYN queue is full.

The initial sequence number carries everything needed to rebuild the connection when
the client's ACK comes back:

    bits 31-27  a 64-second time counter (mod 32): cookies older than ~2 minutes fail
    bits 26-24  the index of the peer's MSS in MSS_TABLE
    bits 23-0   a keyed hash of the 4-tuple, the client's ISN and the counter

With timestamps, the low 6 bits of our TSval carry window scale (4 bits, 15 = none) and
SACK-permitted (1 bit), as Linux does; without timestamps those options are lost.
"""

from __future__ import annotations

import hashlib

MSS_TABLE = (536, 1200, 1360, 1400, 1440, 1452, 1460, 8960)
PERIOD = 64.0
WS_NONE = 15


def _counter(now: float) -> int:
    return int(now / PERIOD) & 0x1F


def _hash(secret: bytes, four_tuple: bytes, client_isn: int, counter: int) -> int:
    h = hashlib.blake2s(four_tuple + client_isn.to_bytes(4, "big") + bytes([counter]),
                        key=secret, digest_size=3)
    return int.from_bytes(h.digest(), "big")


def make_cookie(secret: bytes, four_tuple: bytes, client_isn: int, peer_mss: int,
                now: float) -> int:
    index = max(i for i, m in enumerate(MSS_TABLE) if m <= max(peer_mss, MSS_TABLE[0]))
    t = _counter(now)
    return (t << 27) | (index << 24) | _hash(secret, four_tuple, client_isn, t)


def check_cookie(secret: bytes, four_tuple: bytes, client_isn: int, cookie: int,
                 now: float) -> int | None:
    """The MSS the cookie encodes, or None when it is forged or too old."""
    t = cookie >> 27
    current = _counter(now)
    if t not in (current, (current - 1) & 0x1F):
        return None
    if cookie & 0xFFFFFF != _hash(secret, four_tuple, client_isn, t):
        return None
    return MSS_TABLE[(cookie >> 24) & 0x7]


def encode_options(ts_val: int, wscale: int | None, sack_ok: bool) -> int:
    """Options in the low 6 bits of a TSval taken 64 ms in the past, so that every later
    TSval of the connection is newer than it (or the peer's PAWS would drop them)."""
    bits = (WS_NONE if wscale is None else min(wscale, 14)) | (0x10 if sack_ok else 0)
    return (((ts_val - 0x40) & ~0x3F) | bits) & 0xFFFFFFFF


def decode_options(ts_ecr: int) -> tuple[int | None, bool]:
    ws = ts_ecr & 0x0F
    return (None if ws == WS_NONE else ws), bool(ts_ecr & 0x10)
