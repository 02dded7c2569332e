"""The sender's SACK scoreboard (RFC 2018, RFC 6675): which bytes beyond SND.UNA the
peer holds, which holes are lost, and how much is really in the network (pipe)."""

from __future__ import annotations

from stack.net.tcp.seq import seq_diff

MAX_BLOCKS = 64  # a peer cannot make us keep more (each SACK option carries at most 4)


class SackScoreboard:
    __slots__ = ("blocks",)

    def __init__(self) -> None:
        self.blocks: list[tuple[int, int]] = []  # (start, end) offsets from una, sorted

    def __bool__(self) -> bool:
        return bool(self.blocks)

    def update(self, sack: list[tuple[int, int]], una: int, snd_max: int,
               old_una: int) -> list[tuple[int, int]]:
        """Merge the peer's blocks; offsets are kept relative to SND.UNA, so the board is
        first re-based from `old_una` to `una` (which drops what the ACK covered).

        Returns what this ACK delivered that the board did not hold before, cumulative
        part included, as (start, end) offsets from `old_una` (for RACK)."""
        shift = seq_diff(una, old_una)
        limit = seq_diff(snd_max, una)
        fresh = self._fresh(sack, shift, seq_diff(snd_max, old_una), old_una)
        blocks = [(s - shift, e - shift) for s, e in self.blocks if e - shift > 0]
        for left, right in sack:
            s, e = seq_diff(left, una), seq_diff(right, una)
            if s < 0:
                s = 0
            if e > limit:
                e = limit
            if s < e:  # a valid block above SND.UNA (D-SACKs and junk fall out here)
                blocks.append((s, e))
        blocks.sort()
        merged: list[tuple[int, int]] = []
        for s, e in blocks:
            if merged and s <= merged[-1][1]:
                if e > merged[-1][1]:
                    merged[-1] = (merged[-1][0], e)
            else:
                merged.append((max(s, 0), e))
        self.blocks = merged[-MAX_BLOCKS:]
        return fresh

    def _fresh(self, sack: list[tuple[int, int]], shift: int, limit: int,
               old_una: int) -> list[tuple[int, int]]:
        cand = [(0, shift)] if shift > 0 else []
        for left, right in sack:
            s, e = max(seq_diff(left, old_una), 0), min(seq_diff(right, old_una), limit)
            if s < e:
                cand.append((s, e))
        if not cand:
            return []
        cand.sort()
        out: list[tuple[int, int]] = []
        old = self.blocks
        for s, e in cand:
            for os_, oe in old:  # subtract what was already held
                if oe <= s or os_ >= e:
                    continue
                if os_ > s:
                    _put(out, s, os_)
                s = max(s, oe)
                if s >= e:
                    break
            if s < e:
                _put(out, s, e)
        return out

    def clear(self) -> None:
        self.blocks = []

    def sacked_bytes(self) -> int:
        return sum(e - s for s, e in self.blocks)

    def holes(self, lost_above: int) -> list[tuple[int, int, bool]]:
        """Gaps below the highest SACKed byte, as (start, end, lost) offsets from SND.UNA.
        RFC 6675 IsLost: more than `lost_above` bytes are SACKed beyond the hole."""
        out = []
        above = self.sacked_bytes()
        prev = 0
        for s, e in self.blocks:
            if s > prev:
                out.append((prev, s, above > lost_above))
            above -= e - s
            prev = e
        return out

    def covering(self, offset: int) -> int | None:
        """If `offset` is SACKed, the end of its block; else None."""
        for s, e in self.blocks:
            if s <= offset < e:
                return e
            if s > offset:
                break
        return None

    def next_start(self, offset: int) -> int | None:
        """The start of the first SACKed block beyond `offset`, if any."""
        for s, _ in self.blocks:
            if s > offset:
                return s
        return None



def _put(out: list[tuple[int, int]], s: int, e: int) -> None:
    """Append [s, e) to sorted ranges, merging with the last one where they touch."""
    if out and s <= out[-1][1]:
        if e > out[-1][1]:
            out[-1] = (out[-1][0], e)
    else:
        out.append((s, e))
