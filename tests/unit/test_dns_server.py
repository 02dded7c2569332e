"""The authoritative DNS server, message in, message out; dnspython reads our answers."""

from pathlib import Path

import dns.edns
import dns.flags
import dns.message
import dns.opcode
import dns.rcode
import dns.rdatatype
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stack.apps.dns.server import DnsServer
from stack.apps.dns.zone import ZoneError, Zones, load_zone

ZONES = Path(__file__).parent / "zones"


@pytest.fixture(scope="module")
def server() -> DnsServer:
    return DnsServer(Zones([load_zone(str(ZONES / "bob.com.zone")),
                            load_zone(str(ZONES / "100.51.198.in-addr.arpa.zone"))]))


def ask(server: DnsServer, name: str, rdtype: str = "A", udp: bool = True, **kw
        ) -> dns.message.Message:
    query = dns.message.make_query(name, rdtype, **kw)
    wire = server.handle(query.to_wire(), udp)
    assert wire is not None
    response = dns.message.from_wire(wire)
    assert response.id == query.id and response.flags & dns.flags.QR
    return response


def records(section) -> set[tuple[str, str, str]]:
    return {(str(r.name), dns.rdatatype.to_text(r.rdtype), rd.to_text())
            for r in section for rd in r}


def test_a_record_is_authoritative(server):
    r = ask(server, "bob.com.")
    assert r.rcode() == dns.rcode.NOERROR and r.flags & dns.flags.AA
    assert records(r.answer) == {("bob.com.", "A", "198.51.100.10")}
    assert not r.flags & dns.flags.RA


@pytest.mark.parametrize(("name", "rdtype", "expected"), [
    ("www6.bob.com.", "AAAA", {("www6.bob.com.", "AAAA", "2001:db8::10")}),
    ("bob.com.", "MX", {("bob.com.", "MX", "10 mail.bob.com.")}),
    ("bob.com.", "TXT", {("bob.com.", "TXT", '"v=spf1 mx -all"')}),
    ("bob.com.", "NS", {("bob.com.", "NS", "ns1.bob.com."), ("bob.com.", "NS", "ns2.bob.com.")}),
    ("10.100.51.198.in-addr.arpa.", "PTR",
     {("10.100.51.198.in-addr.arpa.", "PTR", "bob.com.")}),
])
def test_record_types(server, name, rdtype, expected):
    r = ask(server, name, rdtype)
    assert r.rcode() == dns.rcode.NOERROR and r.flags & dns.flags.AA
    assert records(r.answer) == expected


def test_glue_and_additional_addresses(server):
    r = ask(server, "bob.com.", "MX")
    assert ("mail.bob.com.", "A", "198.51.100.25") in records(r.additional)
    r = ask(server, "bob.com.", "NS")
    assert {("ns1.bob.com.", "A", "203.0.113.53"), ("ns2.bob.com.", "A", "203.0.113.54")} \
        <= records(r.additional)


def test_cname_is_followed_inside_the_zone(server):
    r = ask(server, "www.bob.com.")
    assert records(r.answer) == {("www.bob.com.", "CNAME", "bob.com."),
                                 ("bob.com.", "A", "198.51.100.10")}
    r = ask(server, "www.bob.com.", "CNAME")
    assert records(r.answer) == {("www.bob.com.", "CNAME", "bob.com.")}


def test_nxdomain_and_nodata_carry_the_soa_with_the_negative_ttl(server):
    r = ask(server, "nope.bob.com.")
    assert r.rcode() == dns.rcode.NXDOMAIN and r.flags & dns.flags.AA and not r.answer
    (soa,) = r.authority
    assert soa.rdtype == dns.rdatatype.SOA and soa.ttl == 300  # min(3600, minimum 300)
    r = ask(server, "mail.bob.com.", "AAAA")  # the name exists, not that type: NODATA
    assert r.rcode() == dns.rcode.NOERROR and not r.answer
    assert r.authority[0].rdtype == dns.rdatatype.SOA


def test_an_empty_non_terminal_is_nodata_not_nxdomain(server):
    for name in ("deep.bob.com.", "b.deep.bob.com."):
        r = ask(server, name)
        assert r.rcode() == dns.rcode.NOERROR and not r.answer, name
    assert ask(server, "c.deep.bob.com.").rcode() == dns.rcode.NXDOMAIN


def test_a_delegation_cut_answers_with_a_referral_and_glue(server):
    for name in ("shop.bob.com.", "www.shop.bob.com."):
        r = ask(server, name)
        assert r.rcode() == dns.rcode.NOERROR and not r.flags & dns.flags.AA
        assert not r.answer
        assert records(r.authority) == {("shop.bob.com.", "NS", "ns.shop.bob.com.")}
        assert records(r.additional) >= {("ns.shop.bob.com.", "A", "203.0.113.77")}


def test_refused_for_other_zones_and_notimp_for_other_opcodes(server):
    r = ask(server, "alice.org.")
    assert r.rcode() == dns.rcode.REFUSED and not r.flags & dns.flags.AA
    query = dns.message.make_query("bob.com.", "A")
    query.set_opcode(dns.opcode.STATUS)
    r = dns.message.from_wire(server.handle(query.to_wire(), True))
    assert r.rcode() == dns.rcode.NOTIMP


def test_edns_size_and_badvers(server):
    r = ask(server, "bob.com.", use_edns=0, payload=4096)
    assert r.edns == 0 and r.payload == 1232
    r = ask(server, "bob.com.", use_edns=1)
    assert r.rcode() == dns.rcode.BADVERS and r.edns == 0 and not r.answer


def test_truncation_over_udp_and_the_whole_answer_over_tcp(server):
    r = ask(server, "big.bob.com.", "TXT")  # no EDNS: 512 bytes
    assert r.flags & dns.flags.TC and not r.answer
    r = ask(server, "big.bob.com.", "TXT", use_edns=0, payload=1232)
    assert r.flags & dns.flags.TC  # ~1,650 bytes do not fit 1232 either
    r = ask(server, "big.bob.com.", "TXT", udp=False)
    assert not r.flags & dns.flags.TC and len(list(r.answer[0])) == 8


def test_malformed_messages_get_formerr_or_nothing(server):
    before = server.counters["dropped_malformed"]
    assert server.handle(b"\x12\x34\x01", True) is None  # no header: dropped, counted
    assert server.counters["dropped_malformed"] == before + 1
    wire = server.handle(b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\xff", True)
    r = dns.message.from_wire(wire)
    assert r.id == 0x1234 and r.rcode() == dns.rcode.FORMERR
    response = dns.message.make_response(dns.message.make_query("bob.com.", "A"))
    assert server.handle(response.to_wire(), True) is None  # never answer an answer


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_arbitrary_bytes_never_raise(server, data):
    wire = server.handle(data, True)
    if wire is not None:
        assert len(wire) >= 12


def test_zone_file_errors_are_one_sentence(tmp_path):
    bad = tmp_path / "bad.zone"
    bad.write_text("$ORIGIN x.\n$TTL 60\n@ IN A 1.2.3.4\n")
    with pytest.raises(ZoneError, match="no SOA"):
        load_zone(str(bad))
    bad.write_text("$ORIGIN x.\n@ IN A 1.2.3.4\n")
    with pytest.raises(ZoneError, match=r"bad.zone:\d+: Missing default TTL"):
        load_zone(str(bad))
    with pytest.raises(ZoneError, match="no such zone file"):
        load_zone(str(tmp_path / "missing.zone"))


QUERIES = [dns.message.make_query(n, t, use_edns=e).to_wire()
           for n, t, e in (("bob.com.", "A", -1), ("www.bob.com.", "AAAA", 0),
                           ("big.bob.com.", "TXT", 0), ("shop.bob.com.", "NS", -1))]


@settings(max_examples=500, deadline=None)
@given(st.sampled_from(QUERIES), st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)),
                                          max_size=6), st.integers(0, 60))
def test_mutated_queries_never_raise_and_answer_or_count(server, wire, flips, cut):
    data = bytearray(wire)
    for at, value in flips:
        if at < len(data):
            data[at] = value
    data = bytes(data[:len(data) - cut] if cut < len(data) else data)
    before = sum(server.counters.values())
    out = server.handle(data, udp=True)
    assert sum(server.counters.values()) > before  # every message is counted somewhere
    if out is not None:
        reply = dns.message.from_wire(out)
        assert reply.flags & dns.flags.QR and reply.id == int.from_bytes(data[:2], "big")
