"""Send buffer and out-of-order queue, both addressed by sequence number."""

from __future__ import annotations

from bisect import bisect_left

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

    def get(self, seq: int, length: int) -> bytearray:
        """Up to `length` bytes starting at sequence number `seq`: a copy of its own (the
        buffer moves on while the segment waits in a queue)."""
        i = self._off + seq_diff(seq, self.start)
        return self._buf[i : i + length]


class OutOfOrderQueue:
    """Segments that arrived beyond RCV.NXT: sorted, merged, bounded in bytes and in
    blocks (islands). An insert finds its place by bisection and touches only the blocks
    it overlaps, so a peer that scatters one-byte islands costs O(log n) per segment,
    and at most `max_blocks` of them are kept."""

    __slots__ = ("blocks", "bytes", "last_added", "limit", "max_blocks")

    def __init__(self, limit: int, max_blocks: int = 512) -> None:
        self.blocks: list[list] = []  # [start_seq, bytearray], sorted, disjoint
        self.bytes = 0
        self.limit = limit
        self.max_blocks = max_blocks
        self.last_added: int | None = None  # start of the block touched last (RFC 2018 4)

    def add(self, base: int, seq: int, data: bytes | memoryview) -> bool:
        """Store `data` at `seq` (positions relative to `base` = RCV.NXT), merging it with
        blocks it overlaps or touches. False, and nothing stored, when over a limit."""
        if not data:
            return True
        blocks = self.blocks
        s_new = seq_diff(seq, base)
        e_new = s_new + len(data)
        # the first block that starts at or after the new one, then one back if that one
        # reaches it
        i = bisect_left(blocks, s_new, key=lambda blk: seq_diff(blk[0], base))
        if i > 0 and seq_diff(blocks[i - 1][0], base) + len(blocks[i - 1][1]) >= s_new:
            i -= 1
        j = i
        while j < len(blocks) and seq_diff(blocks[j][0], base) <= e_new:
            j += 1
        if i == j:  # a new island
            if self.bytes + len(data) > self.limit or len(blocks) >= self.max_blocks:
                return False
            blocks.insert(i, [seq_add(base, s_new), bytearray(data)])
            self.bytes += len(data)
            self.last_added = seq_add(base, s_new)
            return True
        first_s = seq_diff(blocks[i][0], base)
        last_buf = blocks[j - 1][1]
        last_e = seq_diff(blocks[j - 1][0], base) + len(last_buf)
        old = sum(len(b) for _, b in blocks[i:j])
        start = min(first_s, s_new)
        if self.bytes - old + max(last_e, e_new) - start > self.limit:
            return False
        # the blocks wholly inside the new data are replaced by it; keep what sticks out
        # of the last one (copied out first: it may be the first block, cut below)
        tail = bytes(memoryview(last_buf)[e_new - (last_e - len(last_buf)):]) \
            if last_e > e_new else b""
        if first_s < s_new:
            # the first block grows in place: segments that arrive in order behind a
            # hole append to it instead of copying all it holds each time
            new = blocks[i][1]
            del new[s_new - first_s:]
        else:
            new = bytearray()
        new += data
        new += tail
        # blocks between the first and the last lie inside [s_new, e_new]: the new data
        # covers them
        blocks[i:j] = [[seq_add(base, start), new]]
        self.bytes += len(new) - old
        self.last_added = seq_add(base, start)
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
        if skip >= len(buf):
            return b""
        # one copy into the bytes the application gets (buf[skip:] would copy first)
        return bytes(buf) if not skip else bytes(memoryview(buf)[skip:])

    def sack_blocks(self, limit: int) -> list[tuple[int, int]]:
        """Up to `limit` blocks, the most recently changed first (RFC 2018 4), then the
        lowest others: O(limit), however many islands there are."""
        blocks = self.blocks
        out: list[tuple[int, int]] = []
        first = self.last_added
        if first is not None and blocks:
            base = blocks[0][0]
            i = bisect_left(blocks, seq_diff(first, base),
                            key=lambda blk: seq_diff(blk[0], base))
            if i < len(blocks) and blocks[i][0] == first:
                out.append((first, seq_add(first, len(blocks[i][1]))))
        for s, b in blocks:
            if len(out) >= limit:
                break
            if s != first:
                out.append((s, seq_add(s, len(b))))
        return out

    def clear(self) -> None:
        self.blocks.clear()
        self.bytes = 0
        self.last_added = None
