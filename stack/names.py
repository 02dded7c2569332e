"""Names to addresses for programs on tapstack: static names (a dict, then the hosts file
a process in the namespace would read), then DNS through a stub resolver on tapstack's
own UDP, asking the namespace's name server. Answers are cached for their TTL."""

from __future__ import annotations

import ipaddress
from typing import TYPE_CHECKING

import dns.exception
import dns.name
import dns.rcode
import dns.rdatatype

if TYPE_CHECKING:
    from stack.api import Stack


def _netns_paths(netns: str | None, name: str) -> list[str]:
    """`ip netns exec` shows /etc/netns/NS/NAME in place of /etc/NAME."""
    return ([f"/etc/netns/{netns}/{name}"] if netns else []) + [f"/etc/{name}"]


def nameserver_of(netns: str | None) -> str | None:
    """The first IPv4 nameserver a host in this namespace would ask."""
    for path in _netns_paths(netns, "resolv.conf"):
        try:
            with open(path) as f:
                for line in f:
                    words = line.split()
                    if len(words) >= 2 and words[0] == "nameserver":
                        try:
                            ipaddress.IPv4Address(words[1])
                        except ValueError:
                            continue
                        return words[1]
        except OSError:
            continue
    return None


def hosts_file_lookup(netns: str | None, host: str) -> list[str]:
    """IPv4 addresses the namespace's hosts file gives `host` (first file found only)."""
    wanted = host.lower().rstrip(".")
    for path in _netns_paths(netns, "hosts"):
        try:
            with open(path) as f:
                lines = f.readlines()
        except OSError:
            continue
        found = []
        for line in lines:
            words = line.split("#", 1)[0].split()
            if len(words) >= 2 and wanted in (w.lower() for w in words[1:]):
                try:
                    ipaddress.IPv4Address(words[0])
                except ValueError:
                    continue
                found.append(words[0])
        return found
    return []


class Names:
    """How one stack turns names into IPv4 addresses."""

    def __init__(self, stack: Stack, netns: str | None, hosts: dict[str, str] | None = None,
                 nameserver: str | None = None) -> None:
        self.stack = stack
        self.netns = netns
        self.hosts = {k.lower().rstrip("."): v for k, v in (hosts or {}).items()}
        self.nameserver = nameserver
        self._resolver = None

    async def addresses(self, host: str) -> list[str]:
        """Every IPv4 address of `host` (itself when it is one); OSError when none."""
        try:
            ipaddress.IPv4Address(host)
            return [host]
        except ValueError:
            pass
        key = host.lower().rstrip(".")
        if key in self.hosts:
            return [self.hosts[key]]
        if found := hosts_file_lookup(self.netns, host):
            return found
        server = self.nameserver or nameserver_of(self.netns)
        if server is None:
            raise OSError(f"cannot resolve {host}: not in the hosts file and no name server "
                          "(give nameserver=... or a resolv.conf for the namespace)")
        if self._resolver is None:
            from stack.apps.dns.cache import Cache
            from stack.apps.dns.resolver import Resolver

            self._resolver = Resolver(self.stack, self.stack.loop.time, Cache(),
                                      forward=[server])
        try:
            result = await self._resolver.resolve(dns.name.from_text(host), dns.rdatatype.A)
        except dns.exception.DNSException as exc:
            raise OSError(f"cannot resolve {host}: {exc}") from None
        found = [rd.address for r in result.answer if r.rdtype == dns.rdatatype.A
                 for rd in r]
        if not found:
            raise OSError(f"cannot resolve {host}: {dns.rcode.to_text(result.rcode)} from "
                          f"{server}")
        return found
