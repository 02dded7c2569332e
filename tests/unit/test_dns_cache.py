"""The resolver's cache on a virtual clock, and the rules for believing an answer."""

import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

from stack.apps.dns.cache import Cache, in_bailiwick, matches, with_ttl

IN = dns.rdataclass.IN


def rrset(name: str, rdtype: str, ttl: int, *values: str) -> dns.rrset.RRset:
    return dns.rrset.from_text(name, ttl, "IN", rdtype, *values)


def test_ttls_count_down_and_expire():
    cache = Cache()
    cache.put(rrset("www.bob.com.", "A", 300, "198.51.100.10"), now=100.0, source="ns1")
    entry, left = cache.get(dns.name.from_text("www.bob.com."), dns.rdatatype.A, IN, 100.0)
    assert left == 300
    entry, left = cache.get(dns.name.from_text("www.bob.com."), dns.rdatatype.A, IN, 250.5)
    assert left == 149 and with_ttl(entry.rrset, left).ttl == 149
    assert cache.get(dns.name.from_text("www.bob.com."), dns.rdatatype.A, IN, 400.0) is None
    assert cache.counters["cache_hits"] == 2 and cache.counters["cache_expired"] == 1


def test_negative_ttl_is_the_soa_ttl_capped_by_its_minimum():
    cache = Cache()
    soa = rrset("bob.com.", "SOA", 3600, "ns1.bob.com. h.bob.com. 1 7200 900 1209600 300")
    name = dns.name.from_text("nope.bob.com.")
    cache.put_negative(name, dns.rdatatype.A, IN, dns.rcode.NXDOMAIN, soa, 0.0, "ns1")
    entry, left = cache.get(name, dns.rdatatype.A, IN, 10.0)
    assert entry.rrset is None and entry.rcode == dns.rcode.NXDOMAIN and left == 290
    assert cache.get(name, dns.rdatatype.A, IN, 301.0) is None
    assert cache.counters["negative_hits"] == 1


def test_the_cache_is_bounded_least_recently_used_first():
    cache = Cache(max_entries=3)
    for i in range(3):
        cache.put(rrset(f"h{i}.bob.com.", "A", 60, f"192.0.2.{i}"), 0.0, "ns1")
    cache.get(dns.name.from_text("h0.bob.com."), dns.rdatatype.A, IN, 1.0)  # h0 is fresh
    cache.put(rrset("h3.bob.com.", "A", 60, "192.0.2.3"), 1.0, "ns1")
    names = {str(k[0]) for k in cache.entries}
    assert names == {"h0.bob.com.", "h2.bob.com.", "h3.bob.com."}
    assert cache.counters["cache_evictions"] == 1


def test_rfc5452_matching():
    query = dns.message.make_query("wWw.BoB.cOm.", "A")
    good = dns.message.make_response(query)
    server = ("203.0.113.53", 53)
    assert matches(query, good, server, server) is None
    assert matches(query, good, server, ("203.0.113.99", 53)) == "wrong_source"
    assert matches(query, good, server, ("203.0.113.53", 5353)) == "wrong_source"
    forged = dns.message.make_response(query)
    forged.id = (query.id + 1) & 0xFFFF
    assert matches(query, forged, server, server) == "wrong_id"
    other = dns.message.make_response(dns.message.make_query("www.bob.com.", "A"))
    other.id = query.id
    assert matches(query, other, server, server) == "wrong_question"  # 0x20 case differs
    assert matches(query, query, server, server) == "not_a_response"


def test_bailiwick_drops_what_a_server_may_not_say():
    zone = dns.name.from_text("bob.com.")
    given = [rrset("www.bob.com.", "A", 60, "198.51.100.10"),
             rrset("www.alice.org.", "A", 60, "6.6.6.6"),
             rrset("bob.com.", "NS", 60, "ns1.bob.com.")]
    kept, dropped = in_bailiwick(given, zone)
    assert [str(r.name) for r in kept] == ["www.bob.com.", "bob.com."] and dropped == 1


def test_names_are_cached_in_lower_case_whatever_case_the_answer_echoed():
    cache = Cache()
    cache.put(rrset("WwW.bOB.Com.", "A", 60, "198.51.100.10"), 0.0, "ns1")
    assert [e["name"] for e in cache.listing(1.0)] == ["www.bob.com."]
    entry, _ = cache.get(dns.name.from_text("www.BOB.com."), dns.rdatatype.A, IN, 1.0)
    assert str(entry.rrset.name) == "www.bob.com."


def test_the_cache_is_bounded_in_bytes_too():
    cache = Cache(max_entries=1000, max_bytes=16 * 1024)
    for i in range(200):
        cache.put(rrset(f"h{i}.bob.com.", "TXT", 60, '"' + "x" * 100 + '"'), 0.0, "ns1")
    assert cache.bytes <= 16 * 1024 and len(cache.entries) < 200
    assert cache.counters["cache_evictions"] > 0
    assert "h199.bob.com." in {str(k[0]) for k in cache.entries}  # the newest stays
    huge = rrset("huge.bob.com.", "TXT", 60, *[f'"{"y" * 250}{i}"' for i in range(8)])
    cache.put(huge, 0.0, "ns1")
    assert cache.counters["cache_too_big"] == 1
    assert cache.get(huge.name, dns.rdatatype.TXT, IN, 1.0) is None
