"""A resolver's cache, and the rules for believing an answer (RFC 2308, RFC 5452).

The cache is keyed by (name, type, class); an entry remembers when it expires, so what
it hands out carries the TTL that is left (the clock is passed in). Negative answers
(NXDOMAIN, NODATA) are cached for the SOA's negative TTL. The cache is bounded in
entries; the least recently used entry goes first, and the evictions are counted.

An answer is believed only if it matches the question we asked, from the server and
port we asked, with our random ID (RFC 5452 9.1), and only for names the server is
authoritative for (its bailiwick): a server for bob.com. may not tell us about
alice.org.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from dataclasses import dataclass

import dns.flags
import dns.message
import dns.name
import dns.rdatatype
import dns.rrset

COUNTERS = ("cache_hits", "cache_misses", "negative_hits", "cache_evictions",
            "cache_expired", "cache_stored", "cache_too_big")

NEGATIVE_CAP = 10800.0  # RFC 2308 5: at most three hours
POSITIVE_CAP = 86400.0  # at most a day, whatever a zone says


@dataclass(slots=True)
class CacheEntry:
    expires: float
    rrset: dns.rrset.RRset | None  # None: a negative entry
    rcode: int  # NOERROR (answer or NODATA) or NXDOMAIN
    source: str  # the server it came from
    soa: dns.rrset.RRset | None = None  # negative entries: the SOA that said so
    size: int = 0  # what it counts against the byte bound (its text form's length)


Key = tuple[dns.name.Name, int, int]


class Cache:
    def __init__(self, max_entries: int = 10000, max_bytes: int = 4 << 20) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.bytes = 0
        self.entries: OrderedDict[Key, CacheEntry] = OrderedDict()
        self.counters: Counter[str] = Counter({name: 0 for name in COUNTERS})

    def put(self, rrset: dns.rrset.RRset, now: float, source: str) -> None:
        ttl = min(float(rrset.ttl), POSITIVE_CAP)
        # in lower case: an answer echoes our 0x20-mixed question, not the zone's names
        stored = dns.rrset.RRset(rrset.name.canonicalize(), rrset.rdclass, rrset.rdtype)
        stored.update(rrset)
        self._store((stored.name, rrset.rdtype, rrset.rdclass),
                    CacheEntry(now + ttl, stored, 0, source))

    def put_negative(self, name: dns.name.Name, rdtype: int, rdclass: int, rcode: int,
                     soa: dns.rrset.RRset, now: float, source: str) -> None:
        """RFC 2308 5: the negative TTL is the SOA record's TTL capped by its MINIMUM."""
        ttl = min(float(soa.ttl), float(soa[0].minimum), NEGATIVE_CAP)
        self._store((name.canonicalize(), rdtype, rdclass),
                    CacheEntry(now + ttl, None, rcode, source, soa))

    def _store(self, key: Key, entry: CacheEntry) -> None:
        record = entry.rrset if entry.rrset is not None else entry.soa
        entry.size = 64 + (len(record.to_text()) if record is not None else 0)
        if entry.size > self.max_bytes // 16:
            self.counters["cache_too_big"] += 1  # one huge RRset may not crowd out all
            return
        old = self.entries.pop(key, None)
        if old is not None:
            self.bytes -= old.size
        while self.entries and (len(self.entries) >= self.max_entries
                                or self.bytes + entry.size > self.max_bytes):
            _, victim = self.entries.popitem(last=False)
            self.bytes -= victim.size
            self.counters["cache_evictions"] += 1
        self.entries[key] = entry
        self.bytes += entry.size
        self.counters["cache_stored"] += 1

    def get(self, name: dns.name.Name, rdtype: int, rdclass: int, now: float
            ) -> tuple[CacheEntry, int] | None:
        """(the entry, its remaining TTL in whole seconds), or None (a miss)."""
        key = (name, rdtype, rdclass)
        entry = self.entries.get(key)
        if entry is None:
            self.counters["cache_misses"] += 1
            return None
        left = int(entry.expires - now)
        if left <= 0:
            del self.entries[key]
            self.bytes -= entry.size
            self.counters["cache_expired"] += 1
            self.counters["cache_misses"] += 1
            return None
        self.entries.move_to_end(key)
        self.counters["negative_hits" if entry.rrset is None else "cache_hits"] += 1
        return entry, left

    def flush(self) -> int:
        n = len(self.entries)
        self.entries.clear()
        self.bytes = 0
        return n

    def listing(self, now: float) -> list[dict]:
        out = []
        for (name, rdtype, _), entry in self.entries.items():
            left = int(entry.expires - now)
            if left > 0:
                out.append({"name": str(name), "type": dns.rdatatype.to_text(rdtype),
                            "ttl": left, "negative": entry.rrset is None,
                            "from": entry.source})
        return out


def with_ttl(rrset: dns.rrset.RRset, ttl: int) -> dns.rrset.RRset:
    """A copy of a cached RRset that says how long it is still good for."""
    copy = dns.rrset.RRset(rrset.name, rrset.rdclass, rrset.rdtype)
    copy.update(rrset)
    copy.ttl = ttl
    return copy


def matches(query: dns.message.Message, response: dns.message.Message,
            asked: tuple[str, int], came_from: tuple[str, int]) -> str | None:
    """Why a response is not the answer to our query (None: it is). RFC 5452 9.1: the
    same ID, the same question (name compared exactly, so that 0x20 case randomisation
    counts), from the address and port we sent to."""
    if came_from != asked:
        return "wrong_source"
    if response.id != query.id:
        return "wrong_id"
    if not response.flags & dns.flags.QR:
        return "not_a_response"
    if len(response.question) != 1 or len(query.question) != 1:
        return "wrong_question"
    q, r = query.question[0], response.question[0]
    if (q.name.to_text() != r.name.to_text() or q.rdtype != r.rdtype
            or q.rdclass != r.rdclass):
        return "wrong_question"
    return None


def in_bailiwick(rrsets: list[dns.rrset.RRset], zone: dns.name.Name
                 ) -> tuple[list[dns.rrset.RRset], int]:
    """The records a server authoritative for `zone` may give us, and how many it gave
    that it may not (they are dropped, not cached: cache poisoning's oldest trick)."""
    kept = [r for r in rrsets if r.name.is_subdomain(zone)]
    return kept, len(rrsets) - len(kept)
