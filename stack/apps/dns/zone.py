"""Zones and the authoritative answer to one question (RFC 1034 4.3.2, RFC 2308).

Zones are RFC 1035 zone files, read by dnspython. A zone is searched as the tree it is:
from the apex down towards the name asked, label by label, so that a delegation cut (NS
records below the apex) answers with a referral, an empty non-terminal (a name with no
records but with names below it) answers NODATA, and only a name that is not in the tree
at all is NXDOMAIN.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import dns.exception
import dns.name
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import dns.zone

MAX_CNAME_CHAIN = 8


class ZoneError(ValueError):
    """One sentence: which file, and what is wrong with it."""


@dataclass
class Answer:
    rcode: str = "NOERROR"  # NOERROR, NXDOMAIN, REFUSED
    authoritative: bool = True
    answer: list[dns.rrset.RRset] = field(default_factory=list)
    authority: list[dns.rrset.RRset] = field(default_factory=list)
    additional: list[dns.rrset.RRset] = field(default_factory=list)
    kind: str = "answer"  # answer, nodata, nxdomain, referral, refused


def load_zone(path: str, origin: str | None = None) -> dns.zone.Zone:
    """A zone file; its $ORIGIN (or `origin`) names the zone. ZoneError when bad."""
    try:
        zone = dns.zone.from_file(path, origin=origin, relativize=False,
                                  check_origin=True)
    except FileNotFoundError:
        raise ZoneError(f"{path}: no such zone file") from None
    except OSError as exc:
        raise ZoneError(f"{path}: cannot read it ({exc.strerror})") from None
    except dns.zone.NoSOA:
        raise ZoneError(f"{path}: the zone has no SOA record at its apex") from None
    except dns.zone.NoNS:
        raise ZoneError(f"{path}: the zone has no NS records at its apex") from None
    except dns.zone.UnknownOrigin:
        raise ZoneError(f"{path}: no $ORIGIN line says which zone this is") from None
    except dns.exception.DNSException as exc:
        text = str(exc)  # dnspython names the file and line itself: say it once
        raise ZoneError(text if text.startswith(path) else f"{path}: {text}") from None
    return zone


class Zones:
    """The zones one server is authoritative for."""

    def __init__(self, zones: list[dns.zone.Zone] | None = None) -> None:
        self.zones: dict[dns.name.Name, dns.zone.Zone] = {}
        for zone in zones or []:
            self.add(zone)

    def add(self, zone: dns.zone.Zone) -> None:
        if zone.origin in self.zones:
            raise ZoneError(f"zone {zone.origin} is loaded twice")
        self.zones[zone.origin] = zone

    def find(self, qname: dns.name.Name) -> dns.zone.Zone | None:
        """The closest enclosing zone: the one whose origin is the longest suffix."""
        name = qname
        while True:
            zone = self.zones.get(name)
            if zone is not None:
                return zone
            if name == dns.name.root:
                return None
            name = name.parent()

    def answer(self, qname: dns.name.Name, qtype: int, qclass: int = dns.rdataclass.IN
               ) -> Answer:
        zone = self.find(qname)
        if zone is None or qclass != zone.rdclass:
            return Answer("REFUSED", authoritative=False, kind="refused")
        return _resolve(zone, qname, qtype)


def _soa_negative(zone: dns.zone.Zone) -> dns.rrset.RRset:
    """The SOA for a negative answer, with TTL min(SOA TTL, SOA MINIMUM) (RFC 2308 3)."""
    rdataset = zone.find_rdataset(zone.origin, dns.rdatatype.SOA)
    soa = rdataset[0]
    rrset = dns.rrset.RRset(zone.origin, zone.rdclass, dns.rdatatype.SOA)
    rrset.update(rdataset)
    rrset.ttl = min(rdataset.ttl, soa.minimum)
    return rrset


def _rrset(name: dns.name.Name, rdataset) -> dns.rrset.RRset:
    rrset = dns.rrset.RRset(name, rdataset.rdclass, rdataset.rdtype)
    rrset.update(rdataset)
    return rrset


def _cut(zone: dns.zone.Zone, qname: dns.name.Name) -> dns.name.Name | None:
    """The highest delegation point between the apex (excluded) and qname (included)."""
    labels = qname.relativize(zone.origin).labels
    name = zone.origin
    for label in reversed(labels):
        name = dns.name.Name((label, *name.labels))
        node = zone.get_node(name)
        if node is not None and node.get_rdataset(zone.rdclass, dns.rdatatype.NS):
            return name
    return None


def _glue(zone: dns.zone.Zone, ns_rrset: dns.rrset.RRset) -> list[dns.rrset.RRset]:
    out = []
    for rdata in ns_rrset:
        target = rdata.target
        if not target.is_subdomain(zone.origin):
            continue
        node = zone.get_node(target)
        if node is None:
            continue
        for rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
            rdataset = node.get_rdataset(zone.rdclass, rdtype)
            if rdataset:
                out.append(_rrset(target, rdataset))
    return out


def _has_descendant(zone: dns.zone.Zone, name: dns.name.Name) -> bool:
    return any(n != name and n.is_subdomain(name) for n in zone.nodes)


def _resolve(zone: dns.zone.Zone, qname: dns.name.Name, qtype: int) -> Answer:
    result = Answer()
    for _ in range(MAX_CNAME_CHAIN):
        cut = _cut(zone, qname)
        if cut is not None and not (cut == qname and qtype == dns.rdatatype.DS):
            # below (or at) a delegation: not ours to answer, point there (RFC 1034 4.3.2)
            ns = _rrset(cut, zone.get_node(cut).get_rdataset(zone.rdclass,
                                                             dns.rdatatype.NS))
            if not result.answer:
                result.authoritative = False
                result.kind = "referral"
            result.authority.append(ns)
            result.additional.extend(_glue(zone, ns))
            return result
        node = zone.get_node(qname)
        if node is None:
            if _has_descendant(zone, qname):
                result.kind = "nodata" if not result.answer else result.kind
            else:
                result.rcode = "NXDOMAIN"
                result.kind = "nxdomain"
            result.authority.append(_soa_negative(zone))
            return result
        rdataset = node.get_rdataset(zone.rdclass, qtype)
        if rdataset:
            result.answer.append(_rrset(qname, rdataset))
            if qtype == dns.rdatatype.NS and qname == zone.origin:
                result.additional.extend(_glue(zone, result.answer[-1]))
            elif qtype == dns.rdatatype.MX:
                for rdata in rdataset:
                    result.additional.extend(_address_of(zone, rdata.exchange))
            return result
        cname = node.get_rdataset(zone.rdclass, dns.rdatatype.CNAME)
        if cname and qtype != dns.rdatatype.CNAME:
            result.answer.append(_rrset(qname, cname))
            target = cname[0].target
            if not target.is_subdomain(zone.origin):
                return result  # the resolver follows it elsewhere
            qname = target
            continue
        if qtype == dns.rdatatype.ANY:
            for rds in node.rdatasets:
                result.answer.append(_rrset(qname, rds))
            return result
        result.kind = "nodata" if not result.answer else result.kind
        result.authority.append(_soa_negative(zone))
        return result
    return result  # a CNAME loop: what was found so far


def _address_of(zone: dns.zone.Zone, name: dns.name.Name) -> list[dns.rrset.RRset]:
    if not name.is_subdomain(zone.origin):
        return []
    node = zone.get_node(name)
    if node is None:
        return []
    out = []
    for rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
        rdataset = node.get_rdataset(zone.rdclass, rdtype)
        if rdataset:
            out.append(_rrset(name, rdataset))
    return out
