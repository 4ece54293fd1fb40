"""``badmx``: the sender's domain must be able to receive mail (replies, bounces).

Postfix's ``reject_unknown_sender_domain`` plus its "bad MX" address checks,
at MAIL:

- the domain does not exist (NXDOMAIN), or has neither MX records nor an
  A/AAAA record of its own: ``553 5.1.8 <sender>: Sender address rejected:
  Domain not found``;
- its only MX is "." (RFC 7505 null MX: it declares it sends no mail that
  could be answered): ``550 5.7.27 <sender>: Sender address rejected:
  Domain <domain> does not accept mail (nullMX)`` - the code RFC 7505 4.2
  asks for, as Postfix answers;
- every MX host resolves only to addresses nobody outside could reach
  (loopback, RFC 1918, link-local, ...), or to no address at all:
  ``553 5.1.8 <sender>: Sender address rejected: Domain <domain> has bad MX``;
- DNS trouble (SERVFAIL, timeouts), for the domain or for any host that
  might have been the good one, or no answer within ``[antispam.dns]
  timeout``: ``451 4.1.8 <sender>: Sender address rejected: Domain lookup
  failed, try again``. Never a 5xx.

The null sender ``<>``, address literals (``user@[192.0.2.1]``: no DNS to
ask), our own domains, relay_networks and authenticated
clients and listeners other than the MX are not checked. The networks that
count as unreachable are a constructor argument: the tests, which run on
loopback, pass their own.
"""

from __future__ import annotations

import ipaddress
import re
import socket

from twisted.internet import defer
from twisted.names import dns
from twisted.names.error import DNSNameError
from zope.interface import implementer

from mailbox_appliance.config import parse_duration
from mailbox_appliance.interfaces import IPolicyCheck
from mailbox_appliance.antispam.dnsbl import with_deadline
from mailbox_appliance.antispam.verdicts import note, refuse

UNREACHABLE_NETWORKS = tuple(ipaddress.ip_network(n) for n in (
    "0.0.0.0/8", "10.0.0.0/8", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12",
    "192.168.0.0/16", "::1/128", "::/128", "fc00::/7", "fe80::/10"))

MAX_HOSTS = 10          # MX hosts looked at (the best ones by preference)

_LABEL = re.compile(r"^[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?$")

# Outcomes of the resolution.
OK, NOT_FOUND, NULL_MX, BAD_MX, TEMPORARY = "ok", "not-found", "null-mx", "bad-mx", "temporary"


def _host(payload_name) -> str:
    """An MX target as a host name; "" for the root (null MX) or a name that is not one."""
    name = payload_name.name.decode("ascii", "replace").rstrip(".").lower()
    if not name or len(name) > 253 or not all(_LABEL.match(l) for l in name.split(".")):
        return ""
    return name


class SenderDomainResolver:
    """Resolves a sender domain to one of OK, NOT_FOUND, NULL_MX, BAD_MX, TEMPORARY."""

    def __init__(self, resolver, unreachable=UNREACHABLE_NETWORKS, max_hosts=MAX_HOSTS):
        self.resolver = resolver
        self.unreachable = tuple(unreachable)
        self.max_hosts = max_hosts

    def reachable(self, address: str) -> bool:
        ip = ipaddress.ip_address(address)
        if ip.version == 6 and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if ip.is_multicast or ip.is_unspecified:
            return False
        return not any(ip.version == n.version and ip in n for n in self.unreachable)

    @defer.inlineCallbacks
    def resolve(self, domain: str):
        try:
            name = domain.rstrip(".").lower().encode("idna").decode("ascii")
        except UnicodeError:
            return NOT_FOUND
        if not name or len(name) > 253 or not all(_LABEL.match(l) for l in name.split(".")):
            return NOT_FOUND
        try:
            answers, _, _ = yield self.resolver.lookupMailExchange(name)
        except DNSNameError:
            return NOT_FOUND
        except Exception:
            return TEMPORARY
        # A recursive server follows a CNAME and includes the target's MX
        # records: any MX record of the answer counts.
        records = sorted((rr.payload.preference, _host(rr.payload.name))
                         for rr in answers if rr.type == dns.MX)
        if not records:
            # RFC 5321 5.1: no MX, the domain is its own mail host.
            found = yield self._addresses(name)
            kind, addresses = found
            if kind == TEMPORARY:
                return TEMPORARY
            if not addresses:
                return NOT_FOUND
            return OK if any(self.reachable(a) for a in addresses) else BAD_MX
        hosts = [h for _, h in records if h]
        if not hosts:
            return NULL_MX
        results = yield defer.gatherResults([self._addresses(h) for h in hosts[:self.max_hosts]])
        if any(self.reachable(a) for _, addresses in results for a in addresses):
            return OK
        # No good host for sure: unless one we could not ask is the good one.
        if any(kind == TEMPORARY for kind, _ in results):
            return TEMPORARY
        return BAD_MX

    def _addresses(self, host):
        """A Deferred of (OK or TEMPORARY, [addresses]) for the A and AAAA of ``host``."""
        def answered(result, rtype):
            out = []
            for rr in result[0]:
                if rr.type == rtype == dns.A:
                    out.append(rr.payload.dottedQuad())
                elif rr.type == rtype == dns.AAAA:
                    out.append(socket.inet_ntop(socket.AF_INET6, rr.payload.address))
            return OK, out

        def failed(f):
            return (OK, []) if f.check(DNSNameError) else (TEMPORARY, [])
        lookups = [defer.maybeDeferred(self.resolver.lookupAddress, host).addCallbacks(
                       answered, failed, callbackArgs=(dns.A,)),
                   defer.maybeDeferred(self.resolver.lookupIPV6Address, host).addCallbacks(
                       answered, failed, callbackArgs=(dns.AAAA,))]

        def merged(results):
            kinds = {k for k, _ in results}
            addresses = [a for _, found in results for a in found]
            # An address from either family is enough to judge; a failed
            # other family matters only when nothing was found.
            kind = TEMPORARY if TEMPORARY in kinds and not addresses else OK
            return kind, addresses
        return defer.gatherResults(lookups).addCallback(merged)


@implementer(IPolicyCheck)
class SenderMX:
    """check_sender_mx: refuse senders whose domain cannot receive mail, at MAIL."""

    name = "badmx"
    stages = frozenset({"mail"})

    def __init__(self, resolver, reactor, timeout, our_domains=(),
                 unreachable=UNREACHABLE_NETWORKS):
        self.domains = SenderDomainResolver(resolver, unreachable)
        self.reactor = reactor
        self.timeout = timeout
        self.ours = frozenset(d.lower().rstrip(".") for d in our_domains)

    def check(self, stage, session, sender):
        if (session.may_relay or session.listener != "smtp" or sender is None or sender.null
                or not sender.domain or sender.domain.startswith("[")
                or sender.domain.rstrip(".").lower() in self.ours):
            return None
        d = defer.maybeDeferred(self.domains.resolve, sender.domain)
        d.addErrback(lambda f: TEMPORARY)
        waited = with_deadline(self.reactor, self.timeout, d, lambda: TEMPORARY)
        return waited.wait().addCallback(self._verdict, session, sender)

    def _verdict(self, kind, session, sender):
        who = f"<{sender.address}>: Sender address rejected:"
        domain = sender.domain
        if kind == OK:
            note(self.name, "pass")
            return None
        if kind == TEMPORARY:
            note(self.name, "dns-error")
            return refuse(self.name, session, 451, "4.1.8",
                          f"{who} Domain lookup failed, try again")
        if kind == NULL_MX:
            return refuse(self.name, session, 550, "5.7.27",
                          f"{who} Domain {domain} does not accept mail (nullMX)")
        if kind == BAD_MX:
            return refuse(self.name, session, 553, "5.1.8", f"{who} Domain {domain} has bad MX")
        return refuse(self.name, session, 553, "5.1.8", f"{who} Domain not found")


def checks(config, reactor, resolver, state=None, unreachable=None):
    """[SenderMX] when ``[antispam.dns] check_sender_mx`` is on."""
    d = config.antispam.dns
    if not d.check_sender_mx:
        return []
    if unreachable is None:
        unreachable = tuple(ipaddress.ip_network(n, strict=False) for n in d.bad_mx_networks)
    return [SenderMX(resolver, reactor, parse_duration(d.timeout), config.server.domains,
                     unreachable)]
