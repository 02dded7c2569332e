"""TCP header and options codec (RFC 9293 3.1, RFC 7323, RFC 2018)."""

from __future__ import annotations

import struct

from stack.wire.checksum import internet_checksum, ones_sum
from stack.wire.errors import MalformedError

TCP_HEADER = struct.Struct("!HHIIBBHHH")
TCP_HLEN = 20

FIN = 0x01
SYN = 0x02
RST = 0x04
PSH = 0x08
ACK = 0x10
URG = 0x20
ECE = 0x40
CWR = 0x80

OPT_END = 0
OPT_NOP = 1
OPT_MSS = 2
OPT_WSCALE = 3
OPT_SACK_PERMITTED = 4
OPT_SACK = 5
OPT_TIMESTAMP = 8

_TS = struct.Struct("!II")
_MSS = struct.Struct("!H")
# NOP NOP TS(10): the layout every stack uses, so the header stays 32-bit aligned.
_TS_ALIGNED = struct.Struct("!BBBBII")
TS_ALIGNED_WORD = 0x0101080A  # its first four bytes read as one word

# An IPv4 header without options and the TCP header behind it, in one unpack (the fused
# receive path of stack/net/ipv4.py); the second form reads on through the first option
# word and the two timestamps, where NOP NOP TS(10) puts them.
IPV4_TCP = struct.Struct("!BBHHHBBH4s4sHHIIBBHHH")
IPV4_TCP_TS = struct.Struct("!BBHHHBBH4s4sHHIIBBHHHIII")


class TcpOptions:
    """The options this stack understands; unknown ones are skipped by their length."""

    __slots__ = ("mss", "sack_blocks", "sack_permitted", "ts_ecr", "ts_val", "wscale")

    def __init__(self) -> None:
        self.mss: int | None = None
        self.wscale: int | None = None
        self.sack_permitted = False
        self.ts_val: int | None = None
        self.ts_ecr = 0
        self.sack_blocks: list[tuple[int, int]] = []


NO_OPTIONS = TcpOptions()


def timestamp_options(ts_val: int, ts_ecr: int) -> TcpOptions:
    """What parse_options makes of NOP NOP TS(10) and nothing else."""
    opts = TcpOptions()
    opts.ts_val = ts_val
    opts.ts_ecr = ts_ecr
    return opts


class Segment:
    """One parsed TCP segment. `payload` is a view into the received frame."""

    __slots__ = ("ack", "dst_port", "flags", "options", "payload", "seq", "src_port",
                 "urgent", "window")

    def __init__(self, src_port: int, dst_port: int, seq: int, ack: int, flags: int,
                 window: int, urgent: int, options: TcpOptions,
                 payload: bytes | memoryview) -> None:
        self.src_port = src_port
        self.dst_port = dst_port
        self.seq = seq
        self.ack = ack
        self.flags = flags
        self.window = window
        self.urgent = urgent
        self.options = options
        self.payload = payload

    @property
    def seg_len(self) -> int:
        """SEG.LEN: payload plus one for each of SYN and FIN (RFC 9293 3.4)."""
        return len(self.payload) + (self.flags & SYN) // SYN + (self.flags & FIN)


def parse_options(data: bytes | memoryview) -> TcpOptions:
    """Decode options; a length of 0 or 1, or one running past the header, is malformed."""
    opts = TcpOptions()
    i, end = 0, len(data)
    while i < end:
        kind = data[i]
        if kind == OPT_END:
            break
        if kind == OPT_NOP:
            i += 1
            continue
        if i + 1 >= end:
            raise MalformedError("bad_option")
        length = data[i + 1]
        if length < 2 or i + length > end:
            raise MalformedError("bad_option")
        if kind == OPT_MSS and length == 4:
            opts.mss = _MSS.unpack_from(data, i + 2)[0]
        elif kind == OPT_WSCALE and length == 3:
            opts.wscale = min(data[i + 2], 14)  # RFC 7323 2.3: treat more than 14 as 14
        elif kind == OPT_SACK_PERMITTED and length == 2:
            opts.sack_permitted = True
        elif kind == OPT_TIMESTAMP and length == 10:
            opts.ts_val, opts.ts_ecr = _TS.unpack_from(data, i + 2)
        elif kind == OPT_SACK and length >= 10 and (length - 2) % 8 == 0:
            opts.sack_blocks = [_TS.unpack_from(data, j) for j in range(i + 2, i + length, 8)]
        i += length
    return opts


def parse_tcp(segment: memoryview, src: bytes, dst: bytes, verify_checksum: bool = True
              ) -> Segment:
    """Decode a segment carried in an IPv4 datagram from `src` to `dst`."""
    n = len(segment)
    if n < TCP_HLEN:
        raise MalformedError("truncated")
    sport, dport, seq, ack, off, flags, window, _csum, urgent = TCP_HEADER.unpack_from(
        segment, 0)
    hlen = (off >> 4) << 2
    if hlen < TCP_HLEN or hlen > n:
        raise MalformedError("bad_data_offset")
    if verify_checksum:
        pseudo = int.from_bytes(src + dst, "big") + 6 + n
        if ones_sum(segment, pseudo) != 0:
            raise MalformedError("bad_checksum")
    options = parse_options(segment[TCP_HLEN:hlen]) if hlen > TCP_HLEN else NO_OPTIONS
    return Segment(sport, dport, seq, ack, flags, window, urgent, options, segment[hlen:])


def build_options(mss: int | None = None, wscale: int | None = None,
                  sack_permitted: bool = False, ts: tuple[int, int] | None = None,
                  sack_blocks: list[tuple[int, int]] | tuple = ()) -> bytes:
    """Options padded to a multiple of four bytes, laid out as Linux does."""
    out = bytearray()
    if mss is not None:
        out += bytes((OPT_MSS, 4)) + _MSS.pack(mss)
    if sack_permitted and ts is not None:
        out += bytes((OPT_SACK_PERMITTED, 2, OPT_TIMESTAMP, 10)) + _TS.pack(*ts)
    elif ts is not None:
        out += _TS_ALIGNED.pack(OPT_NOP, OPT_NOP, OPT_TIMESTAMP, 10, *ts)
    elif sack_permitted:
        out += bytes((OPT_NOP, OPT_NOP, OPT_SACK_PERMITTED, 2))
    if wscale is not None:
        out += bytes((OPT_NOP, OPT_WSCALE, 3, wscale))
    if sack_blocks:
        out += bytes((OPT_NOP, OPT_NOP, OPT_SACK, 2 + 8 * len(sack_blocks)))
        for left, right in sack_blocks:
            out += _TS.pack(left, right)
    return bytes(out)


def build_tcp(src: bytes, dst: bytes, sport: int, dport: int, seq: int, ack: int, flags: int,
              window: int, options: bytes = b"", payload: bytes | bytearray = b"") -> bytes:
    """Header + options + payload with the checksum over the IPv4 pseudo-header."""
    hlen = TCP_HLEN + len(options)
    header = TCP_HEADER.pack(sport, dport, seq, ack, (hlen >> 2) << 4, flags, window, 0, 0)
    segment = header + options + payload
    pseudo = int.from_bytes(src + dst, "big") + 6 + len(segment)
    csum = internet_checksum(segment, pseudo)
    return segment[:16] + csum.to_bytes(2, "big") + segment[18:]


def build_tcp_offloaded(src: bytes, dst: bytes, sport: int, dport: int, seq: int, ack: int,
                        flags: int, window: int, options: bytes = b"",
                        payload: bytes | bytearray = b"") -> bytes:
    """Like build_tcp, for checksum offload: the field holds the folded, non-inverted
    pseudo-header sum and the kernel adds the rest (virtio NEEDS_CSUM)."""
    hlen = TCP_HLEN + len(options)
    length = hlen + len(payload)
    seed = (int.from_bytes(src + dst, "big") + 6 + length) % 0xFFFF or 0xFFFF
    return TCP_HEADER.pack(sport, dport, seq, ack, (hlen >> 2) << 4, flags, window, seed,
                           0) + options + payload
