"""``require_rdns``: the client must have a forward-confirmed reverse DNS name.

Postfix's ``reject_unknown_client_hostname``: the client's address has a PTR
record, and the name it gives resolves (A for an IPv4 client, AAAA for IPv6)
back to that address. Bots on dial-up and cloud ranges mostly have none.

The lookups start when the client connects and run while it greets; the
answer is given at RCPT (the greeting does not wait for DNS, and the log
line has the sender). With ``require_rdns = "tempfail"`` a client without a
confirmed name gets ``450 4.7.25 Client host rejected: cannot find your
hostname, [ip]`` (a legitimate server's admin has time to notice and fix
it), with ``"reject"`` ``550 5.7.25``. A DNS error or no answer within
``[antispam.dns] timeout`` is a 450 in both modes, never a 5xx.

A confirmed name is put in ``session.client_name`` (for the Received:
field); the attribute is only set then.

At most ``MAX_NAMES`` PTR names are tried: a reverse zone may list many,
and each costs a forward lookup.
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
from mailbox_appliance.antispam.dnsbl import SessionResults, Shared, reverse_name, with_deadline
from mailbox_appliance.antispam.verdicts import note, refuse

MAX_NAMES = 5

CONFIRMED, UNKNOWN, ERROR = "confirmed", "unknown", "error"

_LABEL = re.compile(r"^[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?$")


def ptr_name(ip_text: str) -> str:
    """The in-addr.arpa / ip6.arpa name of an address (IPv4-mapped as IPv4)."""
    ip = ipaddress.ip_address(ip_text.split("%", 1)[0])
    if ip.version == 6 and ip.ipv4_mapped is None:
        return reverse_name(ip_text) + ".ip6.arpa"
    return reverse_name(ip_text) + ".in-addr.arpa"


def _host(payload_name) -> str:
    """A PTR target as a host name, "" when it is not one (DNS names are binary)."""
    name = payload_name.name.decode("ascii", "replace").rstrip(".").lower()
    if not name or len(name) > 253 or not all(_LABEL.match(l) for l in name.split(".")):
        return ""
    return name


class ReverseResolver:
    """Forward-confirmed reverse DNS of one address: (CONFIRMED, name), (UNKNOWN, ""), (ERROR, why)."""

    def __init__(self, resolver, max_names=MAX_NAMES):
        self.resolver = resolver
        self.max_names = max_names

    @defer.inlineCallbacks
    def resolve(self, ip_text: str):
        try:
            ip = ipaddress.ip_address(ip_text.split("%", 1)[0])
        except ValueError:
            return UNKNOWN, ""
        if ip.version == 6 and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        try:
            answers, _, _ = yield self.resolver.lookupPointer(ptr_name(str(ip)))
        except DNSNameError:
            return UNKNOWN, ""
        except Exception as e:
            return ERROR, f"PTR lookup failed ({type(e).__name__})"
        names = []
        for rr in answers:
            if rr.type == dns.PTR:
                name = _host(rr.payload.name)
                if name and name not in names:
                    names.append(name)
        if not names:
            return UNKNOWN, ""
        names = names[:self.max_names]
        method = self.resolver.lookupAddress if ip.version == 4 else \
            self.resolver.lookupIPV6Address
        results = yield defer.gatherResults(
            [self._forward(method, name, ip) for name in names])
        for name, outcome in zip(names, results):
            if outcome is True:
                return CONFIRMED, name
        if any(outcome is None for outcome in results):
            return ERROR, "forward lookup failed"
        return UNKNOWN, ""

    @staticmethod
    def _forward(method, name, ip):
        """True when ``name`` resolves to ``ip``, False when not, None on a DNS error."""
        def answered(result):
            for rr in result[0]:
                if rr.type == dns.A and ip.version == 4:
                    if ipaddress.ip_address(rr.payload.dottedQuad()) == ip:
                        return True
                elif rr.type == dns.AAAA and ip.version == 6:
                    text = socket.inet_ntop(socket.AF_INET6, rr.payload.address)
                    if ipaddress.ip_address(text) == ip:
                        return True
            return False

        def failed(f):
            return False if f.check(DNSNameError) else None
        return defer.maybeDeferred(method, name).addCallbacks(answered, failed)


@implementer(IPolicyCheck)
class RequireReverseDNS:
    """reject_unknown_client_hostname, looked up at connect and answered at RCPT."""

    name = "require_rdns"
    stages = frozenset({"connect", "rcpt", "disconnect"})

    def __init__(self, resolver, reactor, timeout, mode="tempfail"):
        if mode not in ("tempfail", "reject"):
            raise ValueError(mode)
        self.reverse = ReverseResolver(resolver)
        self.reactor = reactor
        self.timeout = timeout
        self.mode = mode
        self.sessions = SessionResults()

    def check(self, stage, session, argument):
        if stage == "disconnect":
            self.sessions.drop(session)
            return None
        if session.may_relay or session.listener != "smtp":
            return None
        shared = self.sessions.get(session)
        if shared is None:
            shared = self._start(session)
            self.sessions.put(session, shared)
        if stage == "connect":
            return None
        if shared.fired:
            return self._verdict(session, shared.result)
        return shared.wait().addCallback(lambda r: self._verdict(session, r))

    def _start(self, session) -> Shared:
        d = defer.maybeDeferred(self.reverse.resolve, session.client_ip)
        d.addErrback(lambda f: (ERROR, f"lookup failed ({f.type.__name__})"))

        def named(result):
            if result[0] == CONFIRMED:
                session.client_name = result[1]
            return result
        d.addCallback(named)
        return with_deadline(self.reactor, self.timeout, d, lambda: (ERROR, "timeout"))

    def _verdict(self, session, result):
        kind, _detail = result
        if kind == CONFIRMED:
            note(self.name, "pass")
            return None
        text = f"Client host rejected: cannot find your hostname, [{session.client_ip}]"
        if kind == ERROR:
            note(self.name, "dns-error")
            return refuse(self.name, session, 450, "4.7.25", text)
        if self.mode == "reject":
            return refuse(self.name, session, 550, "5.7.25", text)
        return refuse(self.name, session, 450, "4.7.25", text)


def checks(config, reactor, resolver, state=None):
    """[RequireReverseDNS] unless ``[antispam.dns] require_rdns = "off"``."""
    d = config.antispam.dns
    if d.require_rdns == "off":
        return []
    return [RequireReverseDNS(resolver, reactor, parse_duration(d.timeout), d.require_rdns)]
