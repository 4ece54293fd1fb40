"""Where mail for a domain goes: MX records to an ordered list of hosts (RFC 5321 5.1).

The MX records are sorted by preference, equal preferences shuffled so that
load spreads over them; each host name is then looked up for its IPv4 and
IPv6 addresses. A domain without MX records is its own mail host (the
"implicit MX"). A domain whose only MX is "." (RFC 7505 null MX) takes no
mail: that is a permanent failure at once, as is a domain that does not
exist. Every other DNS trouble (SERVFAIL, timeouts, refusals) is temporary:
mail is deferred, never bounced, for a name server's bad day.

An address literal (``[192.0.2.1]``, ``[IPv6:2001:db8::1]``) names the host
directly, without DNS.
"""

from __future__ import annotations

import ipaddress
import random
import re
import socket
from dataclasses import dataclass

from twisted.internet import defer
from twisted.names import dns
from twisted.names.error import DNSNameError

MAX_HOSTS = 10          # MX hosts tried per delivery (Postfix smtp_mx_address_limit is 5 addresses)
MAX_ADDRESSES = 4       # addresses kept per host
MAX_CNAME_DEPTH = 5


class MXLookupError(Exception):
    """The destination could not be resolved; ``permanent`` says whether to bounce."""

    def __init__(self, permanent: bool, enhanced: str, text: str):
        super().__init__(f"{enhanced} {text}")
        self.permanent = permanent
        self.enhanced = enhanced
        self.text = text

    @property
    def reply(self) -> str:
        return f"{self.enhanced} {self.text}"


@dataclass(frozen=True)
class MailHost:
    """One host to try: its name (for TLS checks and logs) and its addresses."""

    name: str
    preference: int
    addresses: tuple


def address_literal(domain: str):
    """The IP address in ``[192.0.2.1]`` or ``[IPv6:...]``, None if not a literal.

    Raises MXLookupError for a bracketed text that is not an address.
    """
    if not (domain.startswith("[") and domain.endswith("]")):
        return None
    inner = domain[1:-1]
    is_v6 = inner[:5].lower() == "ipv6:"
    if is_v6:
        inner = inner[5:]
    try:
        ip = ipaddress.ip_address(inner)
    except ValueError:
        ip = None
    if ip is None or (ip.version == 6) != is_v6:
        raise MXLookupError(True, "5.1.2", f"Bad address literal {domain}")
    return str(ip)


def order_by_preference(records, rng) -> list:
    """(preference, name) pairs sorted by preference, equal ones in random order."""
    keyed = [(pref, rng.random(), name) for pref, name in records]
    keyed.sort()
    return [(pref, name) for pref, _, name in keyed]


def _usable(ip: str) -> bool:
    # An MX "address" of 0.0.0.0, :: or a multicast group is a broken zone,
    # not a host: connecting there means nothing sensible.
    a = ipaddress.ip_address(ip)
    return not (a.is_unspecified or a.is_multicast or
                (a.version == 4 and a == ipaddress.IPv4Address("255.255.255.255")))


_HOST_NAME = re.compile(r"^[a-z0-9_]([a-z0-9_-]{0,62})(\.[a-z0-9_]([a-z0-9_-]{0,62}))*$")


def _name(payload_name) -> str:
    """A host name from a DNS answer, or "" when it is not a usable one.

    DNS labels are binary: a name with spaces, CR/LF or other bytes would
    reach log lines and TLS name checks, so it is taken as no name at all
    (an MX that points to nothing).
    """
    name = payload_name.name.decode("ascii", "replace").rstrip(".").lower()
    if not name or len(name) > 253 or not _HOST_NAME.match(name):
        return ""
    return name


class MXResolver:
    """Resolves a destination domain to the hosts to try, best first."""

    def __init__(self, resolver, rng=None, max_hosts=MAX_HOSTS, max_addresses=MAX_ADDRESSES):
        self.resolver = resolver
        self.rng = rng or random.Random()
        self.max_hosts = max_hosts
        self.max_addresses = max_addresses

    @defer.inlineCallbacks
    def resolve(self, domain: str):
        """Fire with a non-empty list of L{MailHost}, or fail with L{MXLookupError}."""
        literal = address_literal(domain)
        if literal is not None:
            return [MailHost(literal, 0, (literal,))]
        name = self._ascii(domain)
        records = yield self._mx_records(name)
        if not records:
            # RFC 5321 5.1: no MX records, the domain itself is the host.
            hosts = [(0, name)]
            implicit = True
        else:
            exchanges = [(pref, host) for pref, host in records if host]
            if not exchanges:
                raise MXLookupError(True, "5.1.10", f"Domain {domain} does not accept mail "
                                                    f"(null MX, RFC 7505)")
            hosts = order_by_preference(exchanges, self.rng)[:self.max_hosts]
            implicit = False
        found = yield defer.gatherResults(
            [self._addresses(host) for _, host in hosts], consumeErrors=True)
        result, temporary, problems = [], [], []
        for (pref, host), (addresses, temp, problem) in zip(hosts, found):
            if addresses:
                result.append(MailHost(host, pref, tuple(addresses)))
            else:
                (temporary if temp else problems).append(problem)
        if result:
            return result
        if temporary:
            # One host that could not be looked up now may be the one that
            # works: never bounce on that.
            raise MXLookupError(False, "4.4.3", f"Host or domain name not found. {temporary[0]}")
        if implicit:
            raise MXLookupError(True, "5.1.2", f"Host or domain name not found. {problems[0]}")
        raise MXLookupError(True, "5.4.4", f"No address for any mail host of {domain}. "
                                           f"{problems[0]}")

    @defer.inlineCallbacks
    def resolve_host(self, name: str):
        """A L{MailHost} for one host name (a smarthost): its A/AAAA, no MX.

        An IP address is taken as it is. Fails with L{MXLookupError}.
        """
        try:
            ip = str(ipaddress.ip_address(name.strip("[]")))
        except ValueError:
            ip = None
        if ip is not None:
            return MailHost(ip, 0, (ip,))
        host = self._ascii(name)
        addresses, temporary, problem = yield self._addresses(host)
        if addresses:
            return MailHost(host, 0, tuple(addresses))
        raise MXLookupError(not temporary, "4.4.3" if temporary else "5.4.4",
                            f"Host or domain name not found. {problem}")

    def _ascii(self, domain: str) -> str:
        domain = domain.rstrip(".").lower()
        try:
            # The IDNA codec also refuses empty and over-long labels.
            ascii_name = domain.encode("idna").decode("ascii")
        except UnicodeError:
            ascii_name = ""
        if not ascii_name or len(ascii_name) > 253 or any(
                not (c.isalnum() or c in "-.") for c in ascii_name):
            raise MXLookupError(True, "5.1.2", f"Bad destination domain name {domain!r}")
        return ascii_name

    @defer.inlineCallbacks
    def _mx_records(self, name):
        """[(preference, host)] for ``name`` ("" host for the root, a null MX)."""
        for _ in range(MAX_CNAME_DEPTH):
            try:
                answers, _auth, _extra = yield self.resolver.lookupMailExchange(name)
            except DNSNameError:
                raise MXLookupError(True, "5.1.2", f"Host or domain name not found. Name service "
                                                   f"error for name={name} type=MX: Host not found")
            except Exception as e:
                raise MXLookupError(False, "4.4.3", f"Host or domain name not found. Name service "
                                                    f"error for name={name} type=MX: Host not "
                                                    f"found, try again ({_why(e)})")
            records = [(rr.payload.preference, _name(rr.payload.name))
                       for rr in answers if rr.type == dns.MX]
            if records:
                return records
            # The name may be an alias whose target's MX records the server
            # did not include: follow it (a few steps, loops end there).
            cnames = [_name(rr.payload.name) for rr in answers if rr.type == dns.CNAME
                      and _name(rr.name) == name]
            if not cnames:
                return []
            name = cnames[0]
        raise MXLookupError(False, "4.4.3", f"Too many aliases (CNAME) for {name}")

    @defer.inlineCallbacks
    def _addresses(self, host):
        """(addresses, temporary, problem) for one host name; never fails."""
        v4, v6 = yield defer.gatherResults([
            self._lookup(self.resolver.lookupAddress, host, "A"),
            self._lookup(self.resolver.lookupIPV6Address, host, "AAAA"),
        ], consumeErrors=True)
        addresses = []
        for rr in v4[0]:
            if rr.type == dns.A:
                addresses.append(rr.payload.dottedQuad())
        for rr in v6[0]:
            if rr.type == dns.AAAA:
                addresses.append(socket.inet_ntop(socket.AF_INET6, rr.payload.address))
        # IPv4 first: it works everywhere, while a host without IPv6 routes
        # would spend a connect timeout on every AAAA address.
        seen, kept = set(), []
        for a in addresses:
            if a not in seen and _usable(a):
                seen.add(a)
                kept.append(a)
        temporary = v4[1] or v6[1]
        problem = v4[2] or v6[2] or f"Name service error for name={host}: no address records"
        return kept[:self.max_addresses], temporary, problem

    @defer.inlineCallbacks
    def _lookup(self, method, host, rtype):
        """(answers, temporary, problem) of one address lookup."""
        try:
            answers, _auth, _extra = yield method(host)
        except DNSNameError:
            return [], False, f"Name service error for name={host} type={rtype}: Host not found"
        except Exception as e:
            return [], True, (f"Name service error for name={host} type={rtype}: "
                              f"Host not found, try again ({_why(e)})")
        return answers, False, ""


def _why(exc) -> str:
    names = {
        "DNSServerError": "SERVFAIL",
        "DNSQueryRefusedError": "REFUSED",
        "DNSFormatError": "FORMERR",
        "DNSNotImplementedError": "NOTIMP",
        "TimeoutError": "timeout",
        "DNSQueryTimeoutError": "timeout",
    }
    return names.get(type(exc).__name__, type(exc).__name__)
