"""A time-limited cache in front of another directory.

Every SMTP recipient is looked up and every accepted message expanded, so
answers are kept for ``ttl`` seconds -- positive ("alice is a user") and
negative ("nobody has that address") alike.  Failures are never kept: once
the directory is back the next call asks it again.  ``authenticate`` is never
cached.  Identical lookups made while one is in flight share its query.
"""

from __future__ import annotations

from collections import OrderedDict

from twisted.internet import defer
from twisted.python.failure import Failure
from zope.interface import implementer

from mailbox_appliance.directory.ldap import normalize_address
from mailbox_appliance.interfaces import IDirectory


@implementer(IDirectory)
class CachingDirectory:
    """IDirectory caching ``lookup`` and ``expand`` of another IDirectory.

    @param directory: the IDirectory asked on a miss.
    @param ttl: seconds an answer is kept; 0 keeps nothing (but concurrent
        identical calls still share one query).
    @param clock: an IReactorTime (the reactor, or a Clock in tests).
    @param max_entries: bound of the cache; the oldest entries go first.
    """

    def __init__(self, directory, ttl=60, clock=None, max_entries=10000):
        if clock is None:
            from twisted.internet import reactor as clock
        self.directory = directory
        self.ttl = ttl
        self.max_entries = max_entries
        self._clock = clock
        self._entries = OrderedDict()   # key -> (expires, value), oldest first
        self._inflight = {}             # key -> [Deferred, ...]

    def __len__(self):
        return len(self._entries)

    def clear(self):
        """Forget every cached answer (queries in flight are not affected)."""
        self._entries.clear()

    def lookup(self, address):
        """Cached L{IDirectory.lookup}."""
        return self._cached("lookup", address, self.directory.lookup)

    def expand(self, address):
        """Cached L{IDirectory.expand}."""
        return self._cached("expand", address, self.directory.expand)

    def authenticate(self, login, password):
        """L{IDirectory.authenticate}, never cached."""
        return self.directory.authenticate(login, password)

    def _cached(self, kind, address, fetch):
        normalized = normalize_address(address)
        if normalized is None:
            # Refused without a query anyway; nothing worth keeping.
            return defer.maybeDeferred(fetch, address)
        key = (kind, normalized)
        now = self._clock.seconds()
        hit = self._entries.get(key)
        if hit is not None:
            expires, value = hit
            if now < expires:
                return defer.succeed(value)
            del self._entries[key]
        mine = defer.Deferred()
        if key in self._inflight:
            self._inflight[key].append(mine)
            return mine
        self._inflight[key] = [mine]
        defer.maybeDeferred(fetch, address).addBoth(self._answered, key)
        return mine

    def _answered(self, outcome, key):
        waiting = self._inflight.pop(key, [])
        if not isinstance(outcome, Failure) and self.ttl > 0:
            self._store(key, outcome)
        for d in waiting:
            if isinstance(outcome, Failure):
                d.errback(outcome)
            else:
                d.callback(outcome)
        return None

    def _store(self, key, value):
        self._entries.pop(key, None)
        self._entries[key] = (self._clock.seconds() + self.ttl, value)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
