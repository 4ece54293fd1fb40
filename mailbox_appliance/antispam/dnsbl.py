"""DNS block lists: the client's address (DNSBL) and the sender's domain (RHSBL).

Postfix's ``reject_rbl_client`` and ``reject_rhsbl_sender``. A client
192.0.2.1 is listed by ``zen.example`` when ``1.2.0.192.zen.example`` has an A
record in 127.0.0.0/8; an IPv6 client is asked by its 32 nibbles in reverse
(RFC 5782 2.4). The TXT record of the same name gives the reason, which is
quoted (sanitised and bounded) in the reply.

- ``dnsbl``: the lookups start when the client connects, every zone at once,
  and run while the dialogue goes on; the answer is given at RCPT (as
  Postfix does), so the log line carries the sender and the recipient and
  the greeting never waits for DNS. ``554 5.7.1 Service unavailable;
  client [ip] blocked using <zone>; <reason>``.
- ``rhsbl``: the sender's domain under each zone, at MAIL:
  ``554 5.7.1 <sender>: Sender address rejected: <domain> listed by <zone>``.

What is not a listing: an answer outside 127/8 (a zone that has stopped
working and answers everything with some address), 127.255.255.0/24
(Spamhaus' codes for a refused query: an open resolver, a blocked user, an
over-quota account - never a listing, and an answer carrying one is not a
listing whatever else it says), and 127.0.0.1, which no list uses as a
listing code and several return for errors or test queries (treated as an
error code too); NXDOMAIN and NODATA; SERVFAIL, refusals and
timeouts (logged as a warning). A DNS problem never refuses mail.

All zones are asked in parallel and the whole round ends at
``[antispam.dns] timeout`` whatever the resolver's own retries are doing:
a zone that has not answered by then counts as not listing. Answers are
kept for their TTL (negative answers for the SOA's negative TTL, at most
``NEGATIVE_MAX_TTL``) in a bounded table shared by both checks; a lookup
already under way for the same name is joined, not repeated.

``Blocklists.is_listed(ip, zones)`` is the same machinery for other checks
(greylisting longer the clients of some lists).
"""

from __future__ import annotations

import collections
import ipaddress
import re
from dataclasses import dataclass

from twisted.internet import defer
from twisted.logger import Logger
from twisted.names import dns
from twisted.names.error import DNSNameError
from zope.interface import implementer

from mailbox_appliance.config import parse_duration
from mailbox_appliance.interfaces import IPolicyCheck
from mailbox_appliance.antispam.verdicts import note, refuse

log = Logger(namespace="mailbox_appliance.antispam")

LISTING_NET = ipaddress.ip_network("127.0.0.0/8")
# Spamhaus: 127.255.255.252 typing error, .254 query through a public
# resolver, .255 excessive number of queries: the query failed.
ERROR_NET = ipaddress.ip_network("127.255.255.0/24")
ERROR_CODES = frozenset({ipaddress.ip_address("127.0.0.1")})

MAX_TTL = 3600              # positive answers kept at most this long
NEGATIVE_MAX_TTL = 300      # NXDOMAIN/NODATA at most this long (RFC 2308 SOA rule)
MAX_ENTRIES = 10000         # cached answers (least recently used dropped)
MAX_SESSIONS = 10000        # sessions with a lookup remembered
MAX_REASON = 200            # characters of a TXT reason quoted in a reply


@dataclass(frozen=True)
class Answer:
    """What one block list said about one name.

    ``listed``: a listing code was among the A records. ``codes``: the A
    records in 127/8 (listing or not). ``error``: why the lookup failed
    ("" when it did not). ``reason``: the sanitised TXT text of a listing.
    """

    listed: bool
    codes: tuple = ()
    error: str = ""
    reason: str = ""


NOT_LISTED = Answer(False)


def is_listing_code(address) -> bool:
    """An A record that means "listed" (127/8 minus the error codes)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return (ip.version == 4 and ip in LISTING_NET and ip not in ERROR_NET
            and ip not in ERROR_CODES)


def reverse_name(ip_text: str) -> str:
    """``4.3.2.1`` for 1.2.3.4; the 32 reversed nibbles for an IPv6 address.

    An IPv4-mapped IPv6 address (``::ffff:1.2.3.4``, an IPv4 client seen on
    an IPv6 socket) is its IPv4 address. Raises ValueError for non-addresses.
    """
    ip = ipaddress.ip_address(ip_text.split("%", 1)[0])
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.version == 4:
        return ".".join(reversed(str(ip).split(".")))
    return ".".join(reversed(ip.exploded.replace(":", "")))


_LABEL = re.compile(r"^[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?$")


def domain_query_name(domain: str, zone: str):
    """``domain.zone`` in ASCII, or None when the domain cannot be asked about.

    Address literals, names that are not LDH host names (after IDNA) and
    names too long to be put in front of the zone are not looked up.
    """
    domain = domain.rstrip(".").lower()
    if not domain or domain.startswith("["):
        return None
    try:
        domain = domain.encode("idna").decode("ascii")
    except UnicodeError:
        return None
    if not all(_LABEL.match(label) for label in domain.split(".")):
        return None
    name = f"{domain}.{zone.rstrip('.').lower()}"
    return name if len(name) <= 253 else None


def sanitise_reason(strings) -> str:
    """The TXT strings as one line of printable ASCII, at most ``MAX_REASON`` long.

    A TXT record is binary: CR/LF would end our reply line early and let the
    zone write SMTP replies of its own, so every control or non-ASCII byte
    becomes a space (non-ASCII a "?") and runs of spaces are squeezed.
    """
    raw = b" ".join(s if isinstance(s, bytes) else str(s).encode("utf-8", "replace")
                    for s in strings)[:MAX_REASON * 4]
    chars = []
    for b in raw:
        if 0x20 <= b < 0x7f:
            chars.append(chr(b))
        elif b >= 0x80:
            chars.append("?")
        else:
            chars.append(" ")
    text = " ".join("".join(chars).split())
    if len(text) > MAX_REASON:
        text = text[:MAX_REASON - 3].rstrip() + "..."
    return text


def _negative_ttl(authority) -> int:
    for rr in authority or ():
        if rr.type == dns.SOA:
            return max(0, min(rr.ttl, rr.payload.minimum, NEGATIVE_MAX_TTL))
    return 0


def _why(failure) -> str:
    names = {"DNSServerError": "SERVFAIL", "DNSQueryRefusedError": "REFUSED",
             "DNSFormatError": "FORMERR", "DNSNotImplementedError": "NOTIMP",
             "TimeoutError": "timeout", "DNSQueryTimeoutError": "timeout",
             "DNSLookupError": "lookup failed"}
    return names.get(type(failure.value).__name__, type(failure.value).__name__)


class Shared:
    """One result that several callers may wait for (a Deferred per caller)."""

    def __init__(self):
        self.fired = False
        self.result = None
        self.timer = None       # the deadline's DelayedCall, if any
        self._waiters = []

    def wait(self):
        if self.fired:
            return defer.succeed(self.result)
        d = defer.Deferred()
        self._waiters.append(d)
        return d

    def fire(self, result):
        if self.fired:
            return
        self.fired = True
        self.result = result
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.callback(result)


def with_deadline(reactor, seconds, d, on_timeout):
    """A Shared that fires with ``d``'s result, or ``on_timeout()`` after ``seconds``.

    ``d`` must not fail. It goes on after the deadline (twisted.names queries
    cannot all be cancelled) and its late result is simply not used here.
    """
    shared = Shared()

    def expired():
        shared.fire(on_timeout())

    timer = shared.timer = reactor.callLater(seconds, expired)

    def landed(result):
        if timer.active():
            timer.cancel()
        shared.fire(result)
        return result
    d.addCallback(landed)
    return shared


class SessionResults:
    """Per-session lookups started at connect and read later (bounded).

    Keyed by the session object's id, with the object kept alongside so the
    id cannot be reused while the entry lives; dropped at "disconnect", the
    oldest dropped first past ``limit``.
    """

    def __init__(self, limit=MAX_SESSIONS):
        self.limit = limit
        self._entries = collections.OrderedDict()

    def __len__(self):
        return len(self._entries)

    def get(self, session):
        entry = self._entries.get(id(session))
        if entry is not None and entry[0] is session:
            return entry[1]
        return None

    def put(self, session, shared):
        while len(self._entries) >= self.limit:
            self._entries.popitem(last=False)
        self._entries[id(session)] = (session, shared)

    def drop(self, session):
        """Forget the session's lookup; its deadline timer goes too (nobody waits now)."""
        entry = self._entries.get(id(session))
        if entry is not None and entry[0] is session:
            del self._entries[id(session)]
            timer = entry[1].timer
            if timer is not None and timer.active():
                timer.cancel()


class Blocklists:
    """Asks block lists: cached, shared and bounded by a deadline.

    ``timeout`` seconds bound one name's lookup (A, then TXT for a listing);
    ``max_entries`` answers are kept, each for its TTL.
    """

    def __init__(self, resolver, reactor, timeout, max_entries=MAX_ENTRIES):
        self.resolver = resolver
        self.reactor = reactor
        self.timeout = timeout
        self.max_entries = max_entries
        self._cache = collections.OrderedDict()     # name -> (expiry, Answer)
        self._flights = {}                          # name -> Shared, lookups under way

    def __len__(self):
        return len(self._cache)

    def lookup(self, name: str):
        """A Deferred of the L{Answer} for ``name`` (an already built query name). Never fails."""
        key = name.lower().rstrip(".")
        entry = self._cache.get(key)
        if entry is not None:
            if self.reactor.seconds() < entry[0]:
                self._cache.move_to_end(key)
                return defer.succeed(entry[1])
            del self._cache[key]
        flight = self._flights.get(key)
        if flight is None:
            # A listing whose TXT reason is late is still a listing.
            partial = {}
            flight = with_deadline(
                self.reactor, self.timeout, self._ask(key, partial),
                lambda: partial.get("listed") or self._failed_answer(key, "timeout"))
            if not flight.fired:
                self._flights[key] = flight
                flight.wait().addCallback(lambda _: self._flights.pop(key, None))
        return flight.wait()

    def first_listing(self, names):
        """Ask every (zone, name) at once; fires with (zone, Answer) of the first
        listing zone in the given order, or None."""
        pairs = [(zone, name) for zone, name in names if name]
        if not pairs:
            return defer.succeed(None)
        d = defer.gatherResults([self.lookup(name) for _, name in pairs])

        def judged(answers):
            for (zone, _), answer in zip(pairs, answers):
                if answer.listed:
                    return zone, answer
            return None
        return d.addCallback(judged)

    def check_ip(self, ip: str, zones):
        """(zone, Answer) of the first zone listing ``ip``, or None."""
        try:
            rev = reverse_name(ip)
        except ValueError:
            return defer.succeed(None)
        return self.first_listing([(z, f"{rev}.{z.rstrip('.').lower()}") for z in zones])

    def check_domain(self, domain: str, zones):
        """(zone, Answer) of the first zone listing ``domain``, or None."""
        return self.first_listing([(z, domain_query_name(domain, z)) for z in zones])

    def is_listed(self, ip: str, zones):
        """A Deferred of True when any of ``zones`` lists ``ip`` (for other checks)."""
        return self.check_ip(ip, zones).addCallback(lambda found: found is not None)

    # -- one name

    def _ask(self, key, partial):
        d = defer.maybeDeferred(self.resolver.lookupAddress, key)
        d.addCallbacks(self._addresses, self._a_failed, callbackArgs=(key, partial),
                       errbackArgs=(key,))
        # Whatever goes wrong in here is a failed lookup, not a failed check.
        d.addErrback(lambda f: self._failed_answer(key, _why(f)))
        return d

    def _addresses(self, result, key, partial):
        answers, authority, _ = result
        codes = tuple(rr.payload.dottedQuad() for rr in answers if rr.type == dns.A)
        ours = tuple(c for c in codes if ipaddress.ip_address(c) in LISTING_NET)
        # One error code makes the whole answer a failed query: the other
        # codes of a list that refuses us cannot be trusted either.
        refused = any(ipaddress.ip_address(c) in ERROR_NET or
                      ipaddress.ip_address(c) in ERROR_CODES for c in ours)
        listing = () if refused else tuple(c for c in ours if is_listing_code(c))
        if not codes:
            self._store(key, _negative_ttl(authority), NOT_LISTED)
            return NOT_LISTED
        ttl = min(MAX_TTL, min(rr.ttl for rr in answers if rr.type == dns.A))
        if not listing:
            # Error codes or answers from outside 127/8: the list is not
            # working for us (refused, over quota, expired domain). Not a
            # listing; kept like any answer so we do not hammer it.
            log.warn("dnsbl: {name} answered {codes}: a query error, not a listing",
                     name=key, codes=",".join(codes))
            answer = Answer(False, ours, error="error code")
            self._store(key, ttl, answer)
            return answer
        partial["listed"] = Answer(True, ours)
        return self._reason(key).addCallback(self._listed, key, ttl, ours)

    def _listed(self, reason, key, ttl, codes):
        answer = Answer(True, codes, reason=reason)
        self._store(key, ttl, answer)
        return answer

    def _reason(self, key):
        """The TXT reason of a listing, "" when there is none or it fails."""
        def found(result):
            strings = []
            for rr in result[0]:
                if rr.type == dns.TXT:
                    strings.extend(rr.payload.data)
                    break           # one reason is enough
            return sanitise_reason(strings)
        return defer.maybeDeferred(self.resolver.lookupText, key).addCallbacks(
            found, lambda f: "")

    def _a_failed(self, failure, key):
        if failure.check(DNSNameError):
            message = failure.value.args[0] if failure.value.args else None
            self._store(key, _negative_ttl(getattr(message, "authority", ())), NOT_LISTED)
            return NOT_LISTED
        return self._failed_answer(key, _why(failure))

    def _failed_answer(self, key, why):
        log.warn("dnsbl: lookup of {name} failed ({why}): taken as not listed", name=key,
                 why=why)
        return Answer(False, error=why)

    def _store(self, key, ttl, answer):
        if ttl <= 0 or self.max_entries <= 0:
            return
        self._cache.pop(key, None)
        while len(self._cache) >= self.max_entries:
            self._cache.popitem(last=False)
        self._cache[key] = (self.reactor.seconds() + ttl, answer)


def _exempt(session) -> bool:
    return session.may_relay or session.listener != "smtp"


def _because(answer) -> str:
    return f"; {answer.reason}" if answer.reason else ""


@implementer(IPolicyCheck)
class ClientBlocklist:
    """reject_rbl_client: the client's address in any of ``zones``, answered at RCPT.

    The lookups start at "connect" (the answer is not awaited there) and
    the first RCPT waits for what is left of them; later RCPTs of the
    session are answered from memory.
    """

    name = "dnsbl"
    stages = frozenset({"connect", "rcpt", "disconnect"})

    def __init__(self, blocklists, zones, sessions=None):
        self.blocklists = blocklists
        self.zones = tuple(zones)
        self.sessions = sessions or SessionResults()

    def check(self, stage, session, argument):
        if stage == "disconnect":
            self.sessions.drop(session)
            return None
        if _exempt(session):
            return None
        shared = self.sessions.get(session)
        if shared is None:
            shared = Shared()
            self.blocklists.check_ip(session.client_ip, self.zones).addCallback(shared.fire)
            self.sessions.put(session, shared)
        if stage == "connect":
            return None
        if shared.fired:
            return self._verdict(session, shared.result)
        return shared.wait().addCallback(lambda found: self._verdict(session, found))

    def _verdict(self, session, found):
        if found is None:
            note(self.name, "pass")
            return None
        zone, answer = found
        return refuse(self.name, session, 554, "5.7.1",
                      f"Service unavailable; client [{session.client_ip}] blocked using "
                      f"{zone}{_because(answer)}")


@implementer(IPolicyCheck)
class SenderBlocklist:
    """reject_rhsbl_sender: the sender's domain in any of ``zones``, at MAIL."""

    name = "rhsbl"
    stages = frozenset({"mail"})

    def __init__(self, blocklists, zones):
        self.blocklists = blocklists
        self.zones = tuple(zones)

    def check(self, stage, session, sender):
        if _exempt(session) or sender is None or sender.null or not sender.domain:
            return None

        def judged(found):
            if found is None:
                note(self.name, "pass")
                return None
            zone, answer = found
            return refuse(self.name, session, 554, "5.7.1",
                          f"<{sender.address}>: Sender address rejected: {sender.domain} "
                          f"listed by {zone}{_because(answer)}")
        return self.blocklists.check_domain(sender.domain, self.zones).addCallback(judged)


def blocklists(config, reactor, resolver, state=None):
    """The Blocklists of the process: one per ``state`` dict (shared cache), else new.

    Other checks (greylisting) get the same object, and its cache, with
    ``blocklists(config, reactor, resolver, state).is_listed(ip, zones)``.
    """
    if isinstance(state, dict) and "dnsbl" in state:
        return state["dnsbl"]
    made = Blocklists(resolver, reactor, parse_duration(config.antispam.dns.timeout))
    if isinstance(state, dict):
        state["dnsbl"] = made
    return made


def checks(config, reactor, resolver, state=None):
    """``rhsbl`` (at MAIL) and ``dnsbl`` (connect, answered at RCPT) when zones are set."""
    d = config.antispam.dns
    out = []
    if not (d.dnsbl or d.rhsbl):
        return out
    lists = blocklists(config, reactor, resolver, state)
    if d.rhsbl:
        out.append(SenderBlocklist(lists, d.rhsbl))
    if d.dnsbl:
        out.append(ClientBlocklist(lists, d.dnsbl))
    return out
