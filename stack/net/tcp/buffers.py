"""Send buffer and out-of-order queue, both addressed by sequence number."""

from __future__ import annotations

from stack.net.tcp.seq import MASK, seq_add, seq_diff


class SendBuffer:
    """Bytes written by the application and not yet acknowledged.

    `start` is the sequence number of the first byte held. Acknowledged bytes are dropped
    by moving an offset; the bytearray is compacted only when the dead prefix is large,
    so an ACK costs O(1) instead of a memmove of the whole buffer.
    """

    __slots__ = ("_buf", "_off", "end", "start")

    def __init__(self, start: int) -> None:
        self._buf = bytearray()
        self._off = 0
        self.start = start
        self.end = start  # sequence number just past the last byte held (kept, not derived:
        # it is read several times per segment on the hot path)

    def __len__(self) -> int:
        return len(self._buf) - self._off

    def append(self, data: bytes | bytearray | memoryview) -> None:
        self._buf += data
        self.end = (self.end + len(data)) & MASK

    def acknowledge(self, upto: int) -> int:
        """Drop bytes before `upto`; returns how many were dropped."""
        n = min(max(seq_diff(upto, self.start), 0), len(self))
        if n:
            self._off += n
            self.start = (self.start + n) & MASK
            if self._off >= 65536 and self._off * 2 >= len(self._buf):
                del self._buf[: self._off]
                self._off = 0
            elif self._off == len(self._buf):
                self._buf.clear()
                self._off = 0
        return n

    def get(self, seq: int, length: int) -> bytes:
        """Up to `length` bytes starting at sequence number `seq`."""
        i = self._off + seq_diff(seq, self.start)
        return bytes(self._buf[i : i + length])


class OutOfOrderQueue:
    """Segments that arrived beyond RCV.NXT: sorted, merged, bounded in bytes."""

    __slots__ = ("blocks", "bytes", "last_added", "limit")

    def __init__(self, limit: int) -> None:
        self.blocks: list[list] = []  # [start_seq, bytearray], sorted, disjoint
        self.bytes = 0
        self.limit = limit
        self.last_added: int | None = None  # start of the block touched last (RFC 2018 4)

    def add(self, base: int, seq: int, data: bytes | memoryview) -> bool:
        """Store `data` at `seq` (positions relative to `base` = RCV.NXT), merging it with
        blocks it overlaps or touches. False, and nothing stored, when over the limit."""
        if not data:
            return True
        s_new = seq_diff(seq, base)
        e_new = s_new + len(data)
        new = bytearray(data)
        out: list[list] = []
        inserted = False
        for start_seq, buf in self.blocks:
            s = seq_diff(start_seq, base)
            e = s + len(buf)
            if e < s_new:  # wholly before, not touching
                out.append([start_seq, buf])
            elif s > e_new:  # wholly after, not touching
                if not inserted:
                    out.append([seq_add(base, s_new), new])
                    inserted = True
                out.append([start_seq, buf])
            else:  # overlapping or adjacent: fold into the new block
                if s < s_new:
                    new[:0] = buf[: s_new - s]
                    s_new = s
                if e > e_new:
                    new += buf[e_new - s :]
                    e_new = e
        if not inserted:
            out.append([seq_add(base, s_new), new])
        total = sum(len(b) for _, b in out)
        if total > self.limit:
            return False
        self.blocks = out
        self.bytes = total
        self.last_added = seq_add(base, s_new)
        return True

    def pop_ready(self, rcv_nxt: int) -> bytes | None:
        """The data now contiguous with RCV.NXT (trimmed of anything before it), or None."""
        if not self.blocks:
            return None
        start_seq, buf = self.blocks[0]
        rel = seq_diff(start_seq, rcv_nxt)
        if rel > 0:
            return None
        self.blocks.pop(0)
        self.bytes -= len(buf)
        skip = -rel
        return bytes(buf[skip:]) if skip < len(buf) else b""

    def sack_blocks(self, limit: int) -> list[tuple[int, int]]:
        """Up to `limit` blocks, the most recently changed first (RFC 2018 4)."""
        blocks = [(s, seq_add(s, len(b))) for s, b in self.blocks]
        if self.last_added is not None:
            blocks.sort(key=lambda blk: blk[0] != self.last_added)
        return blocks[:limit]

    def clear(self) -> None:
        self.blocks.clear()
        self.bytes = 0
        self.last_added = None
