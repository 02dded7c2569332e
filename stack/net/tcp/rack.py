"""RACK (RFC 8985): time-based loss detection for a SACK sender.

The sender keeps, for every outstanding byte, when it last left, in which burst, and
whether that was a retransmission. Bytes sent back to back share one entry, so the map
holds one entry per burst in flight, not one per segment. When the peer reports bytes
delivered, RACK remembers the latest transmission it has heard of. Any byte still
undelivered that left before that one, more than an RTT plus a reordering window ago, is
lost: a lost retransmission or a lost tail is found about a round trip later, not after
the 200 ms RTO.

Which transmission came first is decided by burst serial, then sequence (a burst sends
in sequence order), not by the clock: the event loop's clock is read once per batch, so
a retransmission and the data it races against can carry the same time.

Sequence numbers are absolute (mod 2**32); offsets are from SND.UNA.
"""

from __future__ import annotations

from stack.net.tcp.seq import seq_add, seq_diff, seq_gt

MAX_ENTRIES = 2048  # beyond this the two lowest entries merge, keeping the older stamp
NEVER = -1.0  # the transmit time of bytes a recovery timer declared lost again

END, TIME, RTX, SER = 0, 1, 2, 3  # an entry: [end seq, time, retransmitted, burst serial]


class Rack:
    __slots__ = ("base", "ents", "serial", "xser", "end", "rtt", "min_rtt",
                 "reordering", "fack", "reo_mult", "dsack_until", "recoveries")

    def __init__(self, una: int) -> None:
        self.base = una  # where the first entry starts (SND.UNA)
        self.ents: list[list] = []  # in sequence order, contiguous from base
        self.serial = 0  # the current burst
        self.xser = -1  # RACK.xmit_ts as a burst serial: the latest delivered burst,
        self.end = una  # and RACK.end_seq
        self.rtt = 0.0  # RACK.rtt: that transmission's round trip
        self.min_rtt: float | None = None
        self.reordering = False  # RACK.reordering_seen
        self.fack = una  # the highest byte the peer reported
        self.reo_mult = 1  # RACK.reo_wnd_mult: grows with D-SACKs (spurious resends)
        self.dsack_until: int | None = None  # one step per round trip
        self.recoveries = 0  # since the last D-SACK

    def reset(self, una: int) -> None:
        self.base = self.end = self.fack = una
        self.ents = []
        self.xser = -1

    # == what left ========================================================================

    def sent(self, start: int, end: int, now: float, rtx: bool) -> None:
        """Record [start, end) leaving at `now`."""
        ents = self.ents
        if not ents:
            self.base = start  # nothing outstanding: the map starts over at SND.UNA
        elif start == ents[-1][END]:  # new data after the last: the hot path
            last = ents[-1]
            if last[TIME] == now and last[RTX] == rtx and last[SER] == self.serial:
                last[END] = end
                return
        elif seq_diff(start, self.base) >= 0:
            self._overwrite(start, end, now, rtx)
            return
        else:
            return  # below SND.UNA: nothing to record
        self.serial += 1
        ents.append([end, now, rtx, self.serial])
        if len(ents) > MAX_ENTRIES:
            _merge_oldest(ents)

    def _overwrite(self, start: int, end: int, now: float, rtx: bool) -> None:
        """Re-stamp [start, end) inside the map, splitting the entries it cuts."""
        base = self.base
        s, e = seq_diff(start, base), seq_diff(end, base)
        self.serial += 1
        new = [end, now, rtx, self.serial]
        out: list[list] = []
        prev = 0
        placed = False
        for ent in self.ents:
            ee = seq_diff(ent[END], base)
            if prev < s:  # the part of this entry below the new range
                out.append([seq_add(base, min(ee, s)), ent[TIME], ent[RTX], ent[SER]])
            if ee > e:  # the part above it
                if not placed:
                    out.append(new)
                    placed = True
                out.append(ent)
            prev = ee
        if not placed:
            out.append(new)
        while len(out) > MAX_ENTRIES:
            _merge_oldest(out)
        self.ents = out

    # == what arrived =====================================================================

    def _take(self, ent: list, dend: int, now: float) -> None:
        """RFC 8985 6.2 step 2 for an entry with bytes up to offset `dend` delivered."""
        t = ent[TIME]
        if ent[SER] < 0:
            return  # expired by a recovery timer: when it left is no longer known
        if ent[RTX] and self.min_rtt is not None and now - t < self.min_rtt:
            return  # too soon to be this retransmission's ACK: the original's, maybe
        rtt = now - t
        if self.min_rtt is None or rtt < self.min_rtt:
            self.min_rtt = rtt
        ser = ent[SER]
        if ser > self.xser or (ser == self.xser and dend > seq_diff(self.end, self.base)):
            self.xser, self.rtt = ser, rtt
            self.end = seq_add(self.base, dend)

    def delivered(self, ranges: list[tuple[int, int]], now: float) -> None:
        """Newly delivered [s, e) offsets from SND.UNA (before this ACK moves it): advance
        RACK's latest delivered transmission and notice reordering (6.2 steps 2-3)."""
        if not ranges:
            return
        base = self.base
        fack = seq_diff(self.fack, base)
        prev = 0
        ri = 0
        nr = len(ranges)
        for ent in self.ents:
            ee = seq_diff(ent[END], base)
            while ri < nr and ranges[ri][1] <= prev:
                ri += 1
            if ri == nr:
                break
            k = ri
            while k < nr and ranges[k][0] < ee:  # every range that touches this entry
                dend = min(ee, ranges[k][1])
                if not ent[RTX] and ent[SER] >= 0 and dend < fack:
                    self.reordering = True  # an original arrived after a later one
                self._take(ent, dend, now)
                k += 1
            prev = ee
        top = ranges[-1][1]
        if top > fack:
            self.fack = seq_add(base, top)

    def acked(self, una: int, now: float, track: bool) -> None:
        """Drop what SND.UNA has passed. With `track`, what it covered counts as delivered
        (the cheap form of delivered()); without, only the map moves: in the common case,
        nothing lost, the first SACK block will name a transmission later than these."""
        ents = self.ents
        n = len(ents)
        i = 0
        if track:
            start = self.base
            while i < n and seq_gt(una, start):  # entry i has bytes below `una`
                ent = ents[i]
                if seq_gt(ent[END], una):
                    self._take(ent, seq_diff(una, self.base), now)
                    break
                self._take(ent, seq_diff(ent[END], self.base), now)
                start = ent[END]
                i += 1
        else:
            while i < n and not seq_gt(ents[i][END], una):
                i += 1
        if i:
            del ents[:i]
        if seq_gt(una, self.base):
            self.base = una
        if seq_gt(una, self.fack):
            self.fack = una
        if self.dsack_until is not None and seq_gt(una, self.dsack_until):
            self.dsack_until = None  # that round trip is over

    def rtt_sample(self, rtt: float) -> None:
        """Any RTT measurement (timestamps, Karn) keeps RACK's minimum current."""
        if self.min_rtt is None or rtt < self.min_rtt:
            self.min_rtt = rtt

    def expire_retransmissions(self, before: float) -> None:
        """A recovery timer decided the retransmissions that left before `before` were
        lost: they count as never re-sent and as older than anything delivered, so both
        rules find them."""
        for ent in self.ents:
            if ent[RTX] and ent[TIME] <= before:
                ent[TIME], ent[RTX], ent[SER] = NEVER, False, -1

    # == what is lost =====================================================================

    def dsack(self, snd_max: int) -> None:
        """The peer reported a duplicate (RFC 2883): something was re-sent too early, so
        the window grows by a quarter of the minimum RTT, once per round trip."""
        self.reordering = True
        self.recoveries = 0
        if self.dsack_until is None:
            self.reo_mult = min(self.reo_mult + 1, 64)
            self.dsack_until = snd_max

    def recovery_done(self) -> None:
        """RFC 8985 6.2 step 4: after 16 recoveries without a D-SACK, start over."""
        self.recoveries += 1
        if self.recoveries >= 16:
            self.reo_mult, self.recoveries = 1, 0

    def reo_wnd(self, in_recovery: bool, sacked_segments: int, srtt: float | None) -> float:
        """RFC 8985 6.2 step 4."""
        if not self.reordering and (in_recovery or sacked_segments >= 3):
            return 0.0
        if self.min_rtt is None:
            return 0.0
        wnd = self.reo_mult * self.min_rtt / 4
        return min(wnd, srtt) if srtt is not None else wnd

    def lost(self, undelivered: list[tuple[int, int, bool]], limit: int, reo_wnd: float,
             now: float) -> tuple[list[tuple[int, int]], float | None]:
        """Lost byte ranges (offsets from SND.UNA), and when the next pending byte will
        be lost if nothing arrives first.

        `undelivered` holds (start, end, is_lost) with RFC 6675's IsLost verdict; bytes
        past `limit` (SND.NXT after a go-back-N rewind) are left alone. A byte is lost if
        it was never re-sent and IsLost says so, or (RACK) it left before the latest
        delivered transmission, more than RACK.rtt plus the window ago."""
        base = self.base
        out: list[tuple[int, int]] = []
        deadline = None
        xser, xend = self.xser, seq_diff(self.end, base)
        wait = self.rtt + reo_wnd
        ents = self.ents
        n = len(ents)
        i = 0
        prev = 0  # where entry i starts
        for hs, he, islost in undelivered:
            if hs >= limit:
                break
            he = min(he, limit)
            while i < n:  # skip the entries wholly below this range
                ee = seq_diff(ents[i][END], base)
                if ee > hs:
                    break
                prev = ee
                i += 1
            j, p = i, prev
            while j < n and p < he:
                ent = ents[j]
                ee = seq_diff(ent[END], base)
                s, e = max(hs, p), min(he, ee)
                if s < e:
                    if islost and not ent[RTX]:
                        _add(out, s, e)
                    else:
                        ser = ent[SER]
                        if ser == xser:
                            e = min(e, xend)  # the same burst: only what went before
                        if ser <= xser and s < e:
                            due = ent[TIME] + wait
                            if due <= now:
                                _add(out, s, e)
                            elif deadline is None or due < deadline:
                                deadline = due
                p = ee
                j += 1
        return out, deadline


def _merge_oldest(ents: list[list]) -> None:
    """Fold the lowest entry into the next: the pair keeps the older time and serial and
    counts as never re-sent, so a lost byte there is found no later than it would be."""
    a, b = ents[0], ents[1]
    if (a[TIME], a[SER]) < (b[TIME], b[SER]):
        b[TIME], b[SER] = a[TIME], a[SER]
    b[RTX] = False
    del ents[0]


def _add(out: list[tuple[int, int]], s: int, e: int) -> None:
    if out and out[-1][1] == s:
        out[-1] = (out[-1][0], e)
    else:
        out.append((s, e))
