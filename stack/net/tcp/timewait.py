"""TIME-WAIT (RFC 9293 3.10.7.4): what is left of a connection after an active close.

A connection that enters TIME-WAIT is replaced by this small record: the 4-tuple, the
sequence numbers, the window and the timestamps needed to answer a retransmitted FIN
and to judge a new SYN for the same 4-tuple (RFC 6191). The application is gone, the
buffers are gone. Records live in their own table (TimeWaitTable), in the order they
expire, bounded: when it is full the oldest is recycled, as Linux's tw_buckets are, so
a host closing thousands of connections a second never refuses new ones because of
them.
"""

from __future__ import annotations

from stack.net.tcp.seq import MASK, seq_gt
from stack.net.tcp.states import TIME_WAIT
from stack.wire.tcp import FIN, RST, SYN, Segment, build_options


class TimeWait:
    __slots__ = ("expires", "life", "local_ip", "local_port", "rcv_nxt", "rcv_wscale",
                 "remote_ip", "remote_port", "snd_nxt", "ts_offset", "ts_ok", "ts_recent",
                 "window")

    state = TIME_WAIT
    state_name = "TIME-WAIT"

    def __init__(self, local_ip: bytes, local_port: int, remote_ip: bytes, remote_port: int,
                 snd_nxt: int, rcv_nxt: int, window: int, rcv_wscale: int, ts_ok: bool,
                 ts_recent: int, ts_offset: int, expires: float, life: float) -> None:
        self.local_ip, self.local_port = local_ip, local_port
        self.remote_ip, self.remote_port = remote_ip, remote_port
        self.snd_nxt = snd_nxt  # just past our FIN
        self.rcv_nxt = rcv_nxt  # just past theirs
        self.window = window  # the field value last advertised (already scaled down)
        self.rcv_wscale = rcv_wscale
        self.ts_ok = ts_ok
        self.ts_recent = ts_recent
        self.ts_offset = ts_offset
        self.expires = expires
        self.life = life  # 2 MSL, as its connection was configured

    @property
    def key(self) -> tuple[bytes, int, bytes, int]:
        return (self.remote_ip, self.remote_port, self.local_ip, self.local_port)

    def reusable_by(self, seg: Segment) -> bool:
        """RFC 9293 3.10.7.4 / RFC 6191: a new SYN may take this 4-tuple when its sequence
        number (or, with timestamps, its TSval) is beyond the old connection's."""
        ts = seg.options.ts_val
        if self.ts_ok and ts is not None:
            return seq_gt(ts, self.ts_recent)
        return seq_gt(seg.seq, self.rcv_nxt)

    def arrives(self, seg: Segment) -> str:
        """What to do with a segment for this 4-tuple: "ignore", "ack" (again), or
        "restart" (a repeated FIN: our last ACK was lost; ACK it and wait 2 MSL again)."""
        flags = seg.flags
        if flags & RST:
            return "ignore"  # RFC 1337: RST in TIME-WAIT is ignored
        if flags & FIN and not flags & SYN and \
                (seg.seq + len(seg.payload)) & MASK == (self.rcv_nxt - 1) & MASK:
            return "restart"  # their FIN again, exactly where it was: our ACK was lost
        if seg.seg_len > 0 or flags & SYN:
            return "ack"  # anything else is answered (rate limited), and changes nothing
        return "ignore"

    def ack_options(self, now: float) -> bytes:
        if not self.ts_ok:
            return b""
        return build_options(ts=((int(now * 1000) + self.ts_offset) & MASK, self.ts_recent))


class TimeWaitTable:
    """Records by 4-tuple, kept in expiry order (every record lasts the same 2 MSL, and a
    restarted one moves to the end), bounded by `limit`."""

    __slots__ = ("limit", "records")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.records: dict[tuple[bytes, int, bytes, int], TimeWait] = {}

    def __len__(self) -> int:
        return len(self.records)

    def __contains__(self, key: object) -> bool:
        return key in self.records

    def get(self, key: tuple[bytes, int, bytes, int]) -> TimeWait | None:
        return self.records.get(key)

    def values(self):
        return self.records.values()

    def add(self, record: TimeWait) -> TimeWait | None:
        """File `record`; returns the record recycled to make room, if any."""
        recycled = None
        if len(self.records) >= self.limit and record.key not in self.records:
            oldest = next(iter(self.records))
            recycled = self.records.pop(oldest)
        self.records.pop(record.key, None)
        self.records[record.key] = record
        return recycled

    def restart(self, record: TimeWait, expires: float) -> None:
        record.expires = expires
        self.records.pop(record.key, None)
        self.records[record.key] = record

    def remove(self, record: TimeWait) -> None:
        if self.records.get(record.key) is record:
            del self.records[record.key]

    def expired(self, now: float) -> list[TimeWait]:
        """Take out every record whose 2 MSL are over."""
        out = []
        records = self.records
        while records:
            key = next(iter(records))
            record = records[key]
            if record.expires > now:
                break
            del records[key]
            out.append(record)
        return out

    def next_deadline(self) -> float | None:
        for record in self.records.values():
            return record.expires
        return None
