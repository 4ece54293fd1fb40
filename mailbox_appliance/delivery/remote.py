"""The remote delivery agent: queued mail to other domains over SMTP.

For each (message, domain, recipients) the queue manager hands over, it
finds the hosts (MX lookup, or the configured smarthost), tries them in
order and reports a result per recipient (``delivery/result.py``):

* a host that cannot be reached, greets with 4xx/5xx, fails TLS that the
  policy requires, or defers recipients: the next host (address) is tried,
  for the recipients still deferred;
* a 5xx to MAIL, RCPT or the data from a host that talked bounces;
* nothing worked: deferred with the last reason.

Connections are kept for a few seconds after a message and reused for the
next one to the same host address (Postfix's connection cache), within
``[delivery] max_connections`` in total and ``max_per_domain`` deliveries at
once per destination domain; waiters queue in order. A destination whose
every host could not be reached is remembered as dead for
``dead_destination_time``: its mail is deferred at once, without DNS or
connection attempts, until then or until :meth:`RemoteDelivery.flush`.

DNS answers are kept for their TTL (``dns.CachingResolver``): mail to a
domain asks its MX, A and AAAA questions once, not once per message. A flush
of a domain forgets them, so a zone just fixed is looked at again.
"""

from __future__ import annotations

import collections

from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from mailbox_appliance import tls
from mailbox_appliance.dns import CachingResolver, make_resolver
from mailbox_appliance.config import parse_duration
from mailbox_appliance.delivery import smtp_client
from mailbox_appliance.delivery.mx import MailHost, MXLookupError, MXResolver
from mailbox_appliance.delivery.result import BOUNCED, DEFERRED, RecipientResult
from mailbox_appliance.delivery.smtp_client import (
    TLS_ENCRYPT, TLS_MAY, TLS_NONE, TLS_VERIFY, ClientSettings, SessionError, StaleSession)
from mailbox_appliance.interfaces import IRemoteDelivery
from mailbox_appliance.slots import Slots

# Connection attempts (addresses) and SMTP sessions per delivery, as
# Postfix's smtp_mx_address_limit and smtp_mx_session_limit: a domain with
# ten black-holed MX hosts must not hold a delivery for ten connect timeouts.
MAX_CONNECT_ATTEMPTS = 5
MAX_SESSIONS = 2
MAX_DEAD_ENTRIES = 10000


class _Pool:
    """Idle SMTP sessions by (address, port, TLS level, verified name, auth)."""

    def __init__(self, reactor, idle_time):
        self.reactor = reactor
        self.idle_time = idle_time
        self._idle = collections.OrderedDict()      # session -> (key, timer)

    def put(self, key, session):
        timer = self.reactor.callLater(self.idle_time, self._expire, session)
        self._idle[session] = (key, timer)

    def take(self, key):
        """The most recently used idle session for ``key`` that is still up."""
        for session in reversed(list(self._idle)):
            k, timer = self._idle[session]
            if k != key:
                continue
            self._drop(session)
            if session.usable:
                return session
            session.abort("found closed")
        return None

    def has(self, key) -> bool:
        return any(k == key for k, _ in self._idle.values())

    def evict_oldest(self) -> bool:
        """Close the longest idle session (to free its connection slot)."""
        if not self._idle:
            return False
        session = next(iter(self._idle))
        self._drop(session)
        session.quit()
        return True

    def close_all(self):
        for session in list(self._idle):
            self._drop(session)
            session.abort("shutting down")

    def _expire(self, session):
        if session in self._idle:
            del self._idle[session]
            session.quit()

    def _drop(self, session):
        _key, timer = self._idle.pop(session)
        if timer.active():
            timer.cancel()


def parse_smarthost(text: str):
    """``"host:port"`` or ``"[ip]:port"`` -> (host, port); host without brackets."""
    host, _, port = text.strip().rpartition(":")
    bracketed = host.startswith("[") and host.endswith("]")
    return (host[1:-1] if bracketed else host), int(port), bracketed


@implementer(IRemoteDelivery)
class RemoteDelivery:
    """Sends queued mail to other domains (see the module docstring)."""

    log = Logger()

    def __init__(self, reactor, config, resolver=None, tls_client=None, rng=None):
        self.reactor = reactor
        self.config = config
        dl = config.delivery
        if resolver is None:
            resolver = make_resolver(reactor, config)
        # The appliance passes its shared cache; anything else gets one of its own.
        self.dns_cache = (resolver if isinstance(resolver, CachingResolver)
                          else CachingResolver(resolver, reactor))
        self.mx = MXResolver(self.dns_cache, rng=rng)
        self.tls_client = tls_client if tls_client is not None else \
            tls.ClientTLS(dl.tls_ca_file)
        self.settings = ClientSettings(helo_name=config.server.hostname,
                                       connect_timeout=dl.connect_timeout,
                                       command_timeout=dl.command_timeout,
                                       data_timeout=dl.data_timeout)
        self.policy = {k.lower().rstrip("."): v for k, v in dl.tls_policy.items()}
        self.smarthost = parse_smarthost(dl.smarthost) if dl.smarthost else None
        self.auth = (dl.smarthost_user, dl.smarthost_password) \
            if self.smarthost and dl.smarthost_user else None
        self.dead_time = parse_duration(dl.dead_destination_time)
        self.max_messages = dl.connection_max_messages
        self.max_per_domain = dl.max_per_domain
        self._connections = Slots(dl.max_connections)
        self._domains = {}              # domain -> Slots
        self._pool = _Pool(reactor, dl.connection_idle)
        self._dead = {}                 # destination key -> (until, RecipientResult)
        self._sessions = set()
        self._closed = False

    # -- IRemoteDelivery ----------------------------------------------------

    def deliver(self, message, domain, recipients):
        recipients = list(recipients)
        d = self._deliver(message, domain.lower(), recipients)

        def crashed(failure):
            self.log.failure("{qid}: delivery to {domain} failed", failure,
                             qid=getattr(message, "qid", "?"), domain=domain)
            result = RecipientResult(DEFERRED, "4.3.0", "4.3.0 remote delivery failed: "
                                     + smtp_client.clean_text(failure.getErrorMessage(), 200))
            return {r.idx: result for r in recipients}
        return d.addErrback(crashed)

    def flush(self, domain=None):
        if domain is None:
            self._dead.clear()
            self.dns_cache.clear()
            return
        self._dead.pop(domain.lower(), None)
        self.dns_cache.forget(domain.lower())
        if self.smarthost:
            self._dead.pop(self._key(domain.lower()), None)

    def close(self):
        """Close every connection (idle ones and those in use); fires when all are down.

        Deliveries in progress or waiting for a slot end as deferred.
        """
        self._closed = True
        for slots in [self._connections] + list(self._domains.values()):
            for d in list(slots.waiting):
                d.cancel()
        self._pool.close_all()
        waits = []
        for session in list(self._sessions):
            session.abort("shutting down")
            waits.append(session.proto.closed)
        return defer.DeferredList(waits)

    # -- one delivery ---------------------------------------------------------

    def _key(self, domain):
        return "[smarthost]" if self.smarthost else domain

    def _dead_result(self, key):
        entry = self._dead.get(key)
        if entry is None:
            return None
        until, result = entry
        if self.reactor.seconds() >= until:
            del self._dead[key]
            return None
        return result

    def _mark_dead(self, key, result):
        if self.dead_time <= 0:
            return
        now = self.reactor.seconds()
        if len(self._dead) >= MAX_DEAD_ENTRIES:
            for k in [k for k, (until, _) in self._dead.items() if until <= now]:
                del self._dead[k]
            if len(self._dead) >= MAX_DEAD_ENTRIES:
                self._dead.pop(next(iter(self._dead)))
        self._dead[key] = (now + self.dead_time, result)

    @defer.inlineCallbacks
    def _deliver(self, message, domain, recipients):
        key = self._key(domain)
        dead = self._dead_result(key)
        if dead is not None:
            return {r.idx: dead for r in recipients}
        if self._closed:
            result = RecipientResult(DEFERRED, "4.3.2", "4.3.2 shutting down")
            return {r.idx: result for r in recipients}
        slots = self._domains.get(domain)
        if slots is None:
            slots = self._domains[domain] = Slots(self.max_per_domain)
        try:
            yield slots.acquire()
        except defer.CancelledError:
            result = RecipientResult(DEFERRED, "4.3.2", "4.3.2 shutting down")
            return {r.idx: result for r in recipients}
        try:
            # Found dead by a delivery this one waited behind?
            dead = self._dead_result(key)
            if dead is not None:
                return {r.idx: dead for r in recipients}
            try:
                hosts, port = yield self._destinations(domain)
            except MXLookupError as e:
                # A smarthost that does not resolve is our configuration's
                # trouble, never the recipient's: defer.
                bounce = e.permanent and not self.smarthost
                self.log.info("{domain}: {reason}", domain=domain, reason=e.reply)
                result = RecipientResult(BOUNCED, e.enhanced, e.reply) if bounce else \
                    RecipientResult(DEFERRED, "4" + e.enhanced[1:], "4" + e.reply[1:])
                return {r.idx: result for r in recipients}
            results = yield self._deliver_to_hosts(message, domain, key, hosts, port,
                                                   recipients)
            return results
        finally:
            slots.release()
            if slots.idle and self._domains.get(domain) is slots:
                del self._domains[domain]

    @defer.inlineCallbacks
    def _destinations(self, domain):
        if self.smarthost:
            name, port, bracketed = self.smarthost
            if bracketed:
                return [MailHost(name, 0, (name,))], port
            host = yield self.mx.resolve_host(name)
            return [host], port
        hosts = yield self.mx.resolve(domain)
        return hosts, self.config.delivery.smtp_port

    def _tls_level(self, domain):
        if self.smarthost:
            name = self.smarthost[0].lower()
            level = self.policy.get(name) or self.policy.get(f"[{name}]")
            if self.auth is not None:
                # Credentials only over TLS; by default to a verified server
                # (security B7), or any server when set to "encrypt".
                level = level if level in (TLS_ENCRYPT, TLS_VERIFY) else \
                    (TLS_ENCRYPT if level else TLS_VERIFY)
            return level or TLS_MAY
        return self.policy.get(domain, TLS_MAY)

    @defer.inlineCallbacks
    def _deliver_to_hosts(self, message, domain, key, hosts, port, recipients):
        level = self._tls_level(domain)
        # Among hosts of equal preference, one with an idle connection first.
        hosts = sorted(hosts, key=lambda h: (h.preference, not any(
            self._pool.has(self._pool_key(h, a, port, level)) for a in h.addresses)))
        remaining, results = list(recipients), {}
        last_error, talked, attempts, sessions = None, False, 0, 0
        for host in hosts:
            for address in host.addresses:
                if not remaining or attempts >= MAX_CONNECT_ATTEMPTS or sessions >= MAX_SESSIONS:
                    break
                attempts += 1
                try:
                    outcome = yield self._attempt(message, host, address, port, level, remaining)
                except SessionError as e:
                    self.log.warn("{domain}: {reason}", domain=domain, reason=e.reply)
                    last_error = e
                    if not e.unreachable:
                        talked = True
                        sessions += 1
                    continue
                talked = True
                sessions += 1
                results.update(outcome.results)
                remaining = [r for r in remaining if r.idx in outcome.retry]
        if remaining and last_error is not None:
            failure = RecipientResult(DEFERRED, last_error.enhanced, last_error.reply,
                                      last_error.remote_mta, last_error.from_remote)
            for r in remaining:
                results.setdefault(r.idx, failure)
            if not talked:
                self._mark_dead(key, failure)
        for r in recipients:
            results.setdefault(r.idx, RecipientResult(DEFERRED, "4.4.0",
                                                      "4.4.0 no host could be tried"))
        return results

    # -- connections ----------------------------------------------------------

    def _pool_key(self, host, address, port, level):
        return (address, port, level, host.name if level == TLS_VERIFY else "",
                self.auth is not None)

    @defer.inlineCallbacks
    def _attempt(self, message, host, address, port, level, recipients):
        """One host address: a pooled or new session, then the message."""
        pkey = self._pool_key(host, address, port, level)
        session = self._pool.take(pkey)
        reused = session is not None
        if session is None:
            session = yield self._open(host, address, port, level)
        try:
            outcome = yield session.send(message, recipients)
        except StaleSession as e:
            session.abort("gone")
            if not reused:
                raise SessionError("4.4.2", f"4.4.2 lost connection with {session.label} "
                                            f"({e})", remote_mta=host.name)
            # The server closed the idle connection meanwhile: a new one.
            session = yield self._open(host, address, port, level)
            try:
                outcome = yield session.send(message, recipients)
            except StaleSession as e:
                session.abort("gone")
                raise SessionError("4.4.2", f"4.4.2 lost connection with {session.label} "
                                            f"({e})", remote_mta=host.name)
        self._done_with(pkey, session)
        return outcome

    def _done_with(self, pkey, session):
        if (session.usable and session.messages < self.max_messages and not self._closed
                and not self._connections.waiting):
            self._pool.put(pkey, session)
        else:
            session.quit()

    @defer.inlineCallbacks
    def _open(self, host, address, port, level):
        """A new session that greeted, said EHLO and did TLS/AUTH as required."""
        if self._closed:
            raise SessionError("4.3.2", "4.3.2 shutting down")
        if self._connections.used >= self._connections.limit:
            # An idle connection makes room for a delivery that waits.
            self._pool.evict_oldest()
        try:
            yield self._connections.acquire()
        except defer.CancelledError:
            raise SessionError("4.3.2", "4.3.2 shutting down")
        try:
            session = yield smtp_client.connect(self.reactor, self.settings, host.name,
                                                address, port)
        except BaseException:
            self._connections.release()
            raise
        self._sessions.add(session)

        def lost(proto):
            self._sessions.discard(session)
            self._connections.release()
        session.proto.on_lost.append(lost)
        try:
            try:
                yield session.open(level,
                                   lambda verify: self.tls_client.creator(host.name, verify),
                                   self.auth)
            except SessionError:
                raise
            except Exception as e:
                # Anything else (a name the TLS layer refuses, say) ends this
                # session like a failed one, not the whole delivery.
                raise SessionError("4.4.2", f"4.4.2 session failed: "
                                   f"{smtp_client.clean_text(str(e), 200)}")
        except SessionError as e:
            if not session.proto.closing:
                session.abort("failed")
            if e.tls_failed and level == TLS_MAY:
                # Opportunistic TLS that does not work: plain text beats no
                # mail (Postfix does the same); required TLS never falls back.
                self.log.warn("{label}: TLS failed, trying again without TLS: {reason}",
                              label=session.label, reason=e.reply)
                session = yield self._open(host, address, port, TLS_NONE)
                return session
            raise
        return session
