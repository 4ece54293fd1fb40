"""Greylisting at RCPT, as milter-greylist and postgrey do it.

A delivery is known by its triplet: the client's network (its /24 for
IPv4, its /64 for IPv6, an IPv4-mapped IPv6 address counting as IPv4, so
that a sender's pool of outbound servers retries as one), the envelope
sender and the recipient, both lower-cased (``<>`` is the empty sender).
Each recipient of a transaction is its own triplet.

- First sight: ``451 4.7.1 Greylisted, try again in N seconds``; the time
  is written down.
- A retry before ``delay`` has passed: 451 again, with the seconds left;
  the first-seen time is kept (retrying harder does not help).
- A retry after ``delay`` and no later than ``retry_window`` after that:
  accepted, and the triplet is whitelisted for ``auto_whitelist``; its
  later messages pass at once and push the whitelisting further out.
- A retry after the window: a first sight again.

The window opens when the delay ends (not at first sight): with the
longer ``dnsbl_delay`` (12h by default) for clients listed on one of
``[antispam.greylist] dnsbl`` zones, a window counted from first sight
(4h by default) would be over before the delay, and such clients could
never get through.

Never greylisted: authenticated and ``relay_networks`` clients, other
listeners than the MX, ``whitelist_networks`` clients, senders of
``whitelist_senders`` domains (and their subdomains), recipients of
``whitelist_recipients`` (an address, or ``@domain``), and with
``whitelist_spf_pass`` senders whose SPF check passed
(``session.spf_result == "pass"``, set by the SPF check).

The triplets live in the state store (``mailbox_appliance.state``), which
expires and caps them. A block-list lookup that fails or times out means
"not listed" (the short delay).

A known sender sends many messages, and each would read and then rewrite
its triplet in the store's thread. So a triplet found whitelisted is
remembered for ``CONFIRM_EVERY`` seconds (at most ``MAX_REMEMBERED`` of
them): its messages meanwhile pass from memory. Their passes are written
to the store at the next look there, when the triplet is pushed out of
memory, by the sweep that the first check after each ``CONFIRM_EVERY``
runs over the remembered triplets, and at a stop (``flush_now``). An
administrator's ``greylist delete`` therefore takes up to that long to
show.
"""

from __future__ import annotations

import collections
import ipaddress

from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from mailbox_appliance.config import parse_duration
from mailbox_appliance.interfaces import IPolicyCheck
from mailbox_appliance.netaddr import networks_predicate
from mailbox_appliance.state import GreylistEntry, IStateStore
from mailbox_appliance.antispam.verdicts import note, refuse

log = Logger(namespace="mailbox_appliance.antispam")

IPV4_PREFIX = 24
IPV6_PREFIX = 64
CONFIRM_EVERY = 60
MAX_REMEMBERED = 10000


def client_network(ip_text):
    """The triplet's network of a client address ("192.0.2.0/24"), or None.

    IPv4 clients seen on an IPv6 socket (``::ffff:192.0.2.1``) count as
    IPv4; a zone index (``fe80::1%eth0``) is dropped; anything that is not an
    IP address (a UNIX socket) has no network.
    """
    try:
        ip = ipaddress.ip_address(str(ip_text).split("%", 1)[0])
    except ValueError:
        return None
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    prefix = IPV4_PREFIX if ip.version == 4 else IPV6_PREFIX
    return str(ipaddress.ip_network(f"{ip}/{prefix}", strict=False))


def path_text(path) -> str:
    """A Path (or text) as the triplet stores it: lower-case, ``<>`` as ""."""
    if path is None or getattr(path, "null", False):
        return ""
    text = path.address if hasattr(path, "address") else str(path)
    text = text.strip()
    if text in ("<>", ""):
        return ""
    if text.startswith("<") and text.endswith(">"):
        text = text[1:-1]
    return text.lower()


def triplet(client_ip, sender, recipient):
    """(network, sender, recipient) of a delivery, or None if the client has no IP."""
    network = client_network(client_ip)
    if network is None:
        return None
    return network, path_text(sender), path_text(recipient)


def _domain_matches(domain, domains):
    domain = domain.lower().rstrip(".")
    return any(domain == d or domain.endswith("." + d) for d in domains)


def _exempt(session) -> bool:
    return session.may_relay or session.listener != "smtp"


@implementer(IPolicyCheck)
class Greylist:
    """The greylisting check (RCPT). ``blocklists``: a ``dnsbl.Blocklists`` or None.

    Durations in seconds. ``reactor.seconds()`` is "now".
    """

    name = "greylist"
    stages = frozenset({"rcpt"})

    def __init__(self, store, reactor, delay, retry_window, auto_whitelist, dnsbl_delay=None,
                 dnsbl_zones=(), blocklists=None, whitelist_networks=(),
                 whitelist_senders=(), whitelist_recipients=(), whitelist_spf_pass=False):
        if not IStateStore.providedBy(store):
            raise TypeError(f"greylisting needs an IStateStore, got {store!r}")
        self.store = store
        self.reactor = reactor
        self.delay = delay
        self.retry_window = retry_window
        self.auto_whitelist = auto_whitelist
        self.dnsbl_delay = delay if dnsbl_delay is None else dnsbl_delay
        self.dnsbl_zones = tuple(dnsbl_zones)
        self.blocklists = blocklists if self.dnsbl_zones else None
        self._trusted_network = networks_predicate(
            ipaddress.ip_network(n, strict=False) for n in whitelist_networks)
        self.whitelist_senders = tuple(d.lower().strip().lstrip("@").rstrip(".")
                                       for d in whitelist_senders)
        recipients = [r.lower().strip() for r in whitelist_recipients]
        self.whitelist_rcpt_domains = tuple(r[1:] for r in recipients if r.startswith("@"))
        self.whitelist_rcpt_addresses = frozenset(path_text(r) for r in recipients
                                                  if not r.startswith("@"))
        self.whitelist_spf_pass = whitelist_spf_pass
        # key -> [when the store said so, whitelisted until, passes not yet
        # written], least recently used first (module docstring).
        self._remembered = collections.OrderedDict()
        self.max_remembered = MAX_REMEMBERED
        self._next_sweep = 0.0      # the first check sets the pace

    # -- the decision

    def whitelisted_by_config(self, session, recipient):
        """Why this delivery is never greylisted ("network", ...), or None."""
        if self._trusted_network(session.client_ip):
            return "network"
        sender = session.sender
        if (sender is not None and not getattr(sender, "null", False)
                and getattr(sender, "domain", "")
                and _domain_matches(sender.domain, self.whitelist_senders)):
            return "sender"
        rcpt = path_text(recipient)
        if rcpt in self.whitelist_rcpt_addresses:
            return "recipient"
        domain = rcpt.rpartition("@")[2]
        if domain and "@" in rcpt and _domain_matches(domain, self.whitelist_rcpt_domains):
            return "recipient"
        # Another check sets spf_result; without one, there is no SPF pass.
        if self.whitelist_spf_pass and getattr(session, "spf_result", None) == "pass":
            return "spf"
        return None

    def check(self, stage, session, recipient):
        if _exempt(session):
            return None
        why = self.whitelisted_by_config(session, recipient)
        if why is not None:
            note(self.name, "whitelist-" + why)
            return None
        key = triplet(session.client_ip, session.sender, recipient)
        if key is None:
            note(self.name, "skip")
            return None
        now = self.reactor.seconds()
        if now >= self._next_sweep:
            self._sweep_remembered(now)
        known = self._remembered.pop(key, None)
        unwritten = 0
        if known is not None:
            confirmed, until, unwritten = known
            if now - confirmed < CONFIRM_EVERY and until > now:
                known[2] += 1
                self._remembered[key] = known
                note(self.name, "whitelisted")
                return None
        d = self._decide(session, key, unwritten)
        # Fail open: a broken or unreachable state store (disk full, a
        # corrupt file, a locked database) accepts the mail instead of
        # deferring it. A 451 would hold back all inbound mail, including
        # the retries of senders that had already passed, for as long as
        # the store is down; accepting only loses the spam filtering of
        # greylisting for that time, and the other checks still run.
        d.addErrback(self._failed, session, key)
        return d

    def _remember(self, key, now, until):
        if self.max_remembered <= 0:
            return
        while len(self._remembered) >= self.max_remembered:
            old, (_, _, unwritten) = self._remembered.popitem(last=False)
            self._write_passes(old, now, unwritten)
        self._remembered[key] = [now, until, 0]

    def _sweep_remembered(self, now):
        """Forget the triplets the store has not been asked about for
        CONFIRM_EVERY, writing the passes they answered."""
        self._next_sweep = now + CONFIRM_EVERY
        for key, (confirmed, _, unwritten) in list(self._remembered.items()):
            if now - confirmed >= CONFIRM_EVERY:
                del self._remembered[key]
                self._write_passes(key, now, unwritten)

    def _write_passes(self, key, now, passes):
        if passes <= 0:
            return defer.succeed(None)
        # Counted only if still stored: an administrator's delete stands.
        d = self.store.greylist_add_passes(*key, passes, now)
        return d.addErrback(lambda f: log.warn("greylist: passes of {key} not written: {why}",
                                               key=key, why=f.getErrorMessage()))

    def flush_now(self):
        """Write every remembered triplet's passes (at a stop); a Deferred."""
        now = self.reactor.seconds()
        pending = [self._write_passes(key, now, unwritten)
                   for key, (_, _, unwritten) in self._remembered.items()]
        self._remembered.clear()
        return defer.gatherResults(pending, consumeErrors=True)

    @defer.inlineCallbacks
    def _decide(self, session, key, unwritten=0):
        now = self.reactor.seconds()
        entry = yield self.store.greylist_get(*key)
        if entry is not None and entry.whitelisted(now):
            until = now + self.auto_whitelist
            yield self.store.greylist_whitelist(*key, now, until, passes=1 + unwritten)
            self._remember(key, now, until)
            note(self.name, "whitelisted")
            return None
        delay = yield self._delay_for(session.client_ip)
        if entry is not None and entry.whitelisted_until == 0:
            elapsed = now - entry.first_seen
            if delay <= elapsed <= delay + self.retry_window:
                yield self.store.greylist_whitelist(*key, now, now + self.auto_whitelist)
                self._remember(key, now, now + self.auto_whitelist)
                note(self.name, "pass")
                log.info("greylist: pass [{ip}] {net} <{sender}> -> <{rcpt}> after {s}s "
                         "({n} deferred)", ip=session.client_ip, net=key[0], sender=key[1],
                         rcpt=key[2], s=int(elapsed), n=entry.attempts)
                return None
            if 0 <= elapsed < delay:
                yield self.store.greylist_put(GreylistEntry(
                    *key, first_seen=entry.first_seen, last_seen=now,
                    attempts=entry.attempts + 1, passes=entry.passes,
                    expires=max(entry.expires, entry.first_seen + delay + self.retry_window)))
                return self._greylisted(session, delay - elapsed)
        # First sight: never seen, whitelisting over, or the window missed.
        yield self.store.greylist_put(GreylistEntry(
            *key, first_seen=now, last_seen=now, attempts=1, passes=0,
            expires=now + delay + self.retry_window))
        return self._greylisted(session, delay)

    def _greylisted(self, session, seconds):
        seconds = max(1, int(seconds + 0.999))
        return refuse(self.name, session, 451, "4.7.1",
                      f"Greylisted, try again in {seconds} seconds")

    def _delay_for(self, client_ip):
        """``dnsbl_delay`` for a client listed on a zone, else ``delay``; never fails."""
        if self.blocklists is None or self.dnsbl_delay == self.delay:
            return defer.succeed(self.delay)
        d = defer.maybeDeferred(self.blocklists.is_listed, client_ip, self.dnsbl_zones)

        def lookup_failed(failure):
            log.warn("greylist: block list lookup for {ip} failed: {why}", ip=client_ip,
                     why=failure.getErrorMessage())
            return False
        d.addErrback(lookup_failed)
        return d.addCallback(lambda listed: self.dnsbl_delay if listed else self.delay)

    def _failed(self, failure, session, key):
        note(self.name, "error")
        log.failure("greylist: state store failed for [{ip}] {net} <{sender}> -> <{rcpt}>; "
                    "accepting (fail open)", failure, ip=session.client_ip, net=key[0],
                    sender=key[1], rcpt=key[2])
        return None


def _store_of(state):
    """The IStateStore in ``state``: the store itself, or a dict holding it."""
    if IStateStore.providedBy(state):
        return state
    if isinstance(state, dict):
        for value in state.values():
            if IStateStore.providedBy(value):
                return value
    return None


def checks(config, reactor, resolver, state=None):
    """The greylisting check, or [] when disabled or without a state store."""
    g = config.antispam.greylist
    store = _store_of(state)
    if not g.enabled or store is None:
        return []
    blocklists = None
    if g.dnsbl:
        from mailbox_appliance.antispam import dnsbl
        # Shares the block-list cache when ``state`` is the registry's dict.
        blocklists = dnsbl.blocklists(config, reactor, resolver,
                                      state if isinstance(state, dict) else None)
    return [Greylist(store, reactor, parse_duration(g.delay), parse_duration(g.retry_window),
                     parse_duration(g.auto_whitelist), parse_duration(g.dnsbl_delay),
                     g.dnsbl, blocklists, g.whitelist_networks, g.whitelist_senders,
                     g.whitelist_recipients, g.whitelist_spf_pass)]
