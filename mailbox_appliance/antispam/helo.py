"""HELO/EHLO name checks (Postfix's ``reject_*_helo_hostname`` restrictions).

- ``helo_invalid``: the name must be a fully-qualified domain name (LDH
  labels, at least one dot, not all-numeric at the end) or an address
  literal (``[192.0.2.1]``, ``[IPv6:2001:db8::1]``, RFC 5321 4.1.3).
  Malformed: 501 5.5.2 "Invalid name"; one label only: 504 5.5.2 "need
  fully-qualified hostname".
- ``helo_our_name``: a stranger that greets with our host name, one of our
  domains or the address of the interface it reached is lying (550 5.7.1
  "You are not me").
- ``helo_resolvable`` (optional): the name must have an A or AAAA record;
  450 4.7.1 when it has none, and a DNS failure lets the client through.

Only on the MX port, and neither for relay_networks clients nor for
authenticated ones.
"""

from __future__ import annotations

import ipaddress
import re

from twisted.internet import defer
from twisted.names import dns
from twisted.names.error import DNSNameError
from zope.interface import implementer

from mailbox_appliance.interfaces import IPolicyCheck
from mailbox_appliance.antispam.verdicts import note, refuse

_LABEL = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")


def _exempt(session) -> bool:
    return session.may_relay or session.listener != "smtp"


def address_literal(name: str):
    """The IP address of an address literal ``[1.2.3.4]`` / ``[IPv6:...]``, else None."""
    if not (name.startswith("[") and name.endswith("]")):
        return None
    inner = name[1:-1]
    try:
        if inner[:5].lower() == "ipv6:":
            addr = ipaddress.IPv6Address(inner[5:])
            return addr.ipv4_mapped or addr
        return ipaddress.IPv4Address(inner)
    except ValueError:
        return None


def classify(name: str) -> str:
    """"literal", "fqdn", "single" (one valid label) or "invalid"."""
    if address_literal(name) is not None:
        return "literal"
    host = name[:-1] if name.endswith(".") else name
    if not host or len(host) > 253:
        return "invalid"
    labels = host.split(".")
    if not all(_LABEL.match(l) for l in labels):
        return "invalid"
    if len(labels) == 1:
        return "single"
    # A dotted quad without brackets is an address, not a name (RFC 5321 wants
    # address literals in brackets), and no top-level domain is all digits.
    if labels[-1].isdigit():
        return "invalid"
    return "fqdn"


def _same_address(literal, ip_text) -> bool:
    try:
        addr = ipaddress.ip_address(ip_text)
    except ValueError:
        return False
    if addr.version == 6 and addr.ipv4_mapped:
        addr = addr.ipv4_mapped
    return addr == literal


@implementer(IPolicyCheck)
class HeloSyntax:
    """reject_invalid_helo_hostname and reject_non_fqdn_helo_hostname in one."""

    name = "helo_invalid"
    stages = frozenset({"helo"})

    def check(self, stage, session, name):
        if _exempt(session):
            return None
        kind = classify(name)
        if kind == "invalid":
            return refuse(self.name, session, 501, "5.5.2",
                          f"<{name}>: Helo command rejected: Invalid name")
        if kind == "single":
            return refuse(self.name, session, 504, "5.5.2",
                          f"<{name}>: Helo command rejected: need fully-qualified hostname")
        return None


@implementer(IPolicyCheck)
class HeloNotOurs:
    """Refuse a stranger greeting with our own name, domain or address."""

    name = "helo_our_name"
    stages = frozenset({"helo"})

    def __init__(self, hostname, domains):
        self.names = frozenset(n.lower().rstrip(".") for n in (hostname, *domains))

    def check(self, stage, session, name):
        if _exempt(session):
            return None
        literal = address_literal(name)
        if literal is not None:
            ours = _same_address(literal, getattr(session, "server_ip", ""))
        else:
            ours = name.lower().rstrip(".") in self.names
        if ours:
            return refuse(self.name, session, 550, "5.7.1",
                          f"<{name}>: Helo command rejected: You are not me")
        return None


@implementer(IPolicyCheck)
class HeloResolvable:
    """reject_unknown_helo_hostname: the name must have an A or AAAA record.

    Both are asked at once. No record of either (NXDOMAIN or no data) is a
    450 4.7.1; a lookup that fails otherwise (timeout, SERVFAIL) counts as
    found, so a DNS problem never refuses mail. Address literals and names
    that are not domain names are not looked up (``helo_invalid`` judges
    those).
    """

    name = "helo_resolvable"
    stages = frozenset({"helo"})

    def __init__(self, resolver):
        self.resolver = resolver

    def check(self, stage, session, name):
        if _exempt(session) or classify(name) != "fqdn":
            return None
        host = name.rstrip(".")
        lookups = [self._has(self.resolver.lookupAddress(host), dns.A),
                   self._has(self.resolver.lookupIPV6Address(host), dns.AAAA)]

        def judged(results):
            found = [r for ok, r in results if ok]
            if any(r is True for r in found):
                return None
            if any(r is None for r in found):
                note(self.name, "dns-error")
                return None
            return refuse(self.name, session, 450, "4.7.1",
                          f"<{name}>: Helo command rejected: Host not found")
        return defer.DeferredList(lookups, consumeErrors=True).addCallback(judged)

    @staticmethod
    def _has(d, rtype):
        """A Deferred of True (records), False (none: NXDOMAIN or NODATA), None (error)."""
        def answered(result):
            answers = result[0]
            return any(rr.type == rtype for rr in answers)

        def failed(f):
            # NXDOMAIN only: SERVFAIL and the like are DomainErrors too.
            if f.check(DNSNameError):
                return False
            return None
        return d.addCallbacks(answered, failed)


def checks(config, reactor, resolver, state=None):
    """The HELO checks ``[antispam.helo]`` enables, cheapest first."""
    h = config.antispam.helo
    out = []
    if h.reject_invalid:
        out.append(HeloSyntax())
    if h.reject_our_name:
        out.append(HeloNotOurs(config.server.hostname, config.server.domains))
    if h.require_resolvable:
        out.append(HeloResolvable(resolver))
    return out
