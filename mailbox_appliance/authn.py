"""Password logins for the front ends (IMAP, POP3, SMTP AUTH), with penalties.

The directory checks the password (an LDAP bind); this module adds what a
server owes its users on top: a failed login costs the client time, more with
every failure (like Dovecot's auth penalty: 2 s doubling up to 15 s), counted
per client address and per account, so parallel connections share the count
and guessing one account from many addresses is slowed too. An unknown user
and a wrong password look the same, in answer and in timing.
"""

from __future__ import annotations

import unicodedata

from twisted.internet import defer, task
from twisted.logger import Logger

from mailbox_appliance.interfaces import DirectoryUnavailable

FIRST_PENALTY = 2.0
MAX_PENALTY = 15.0
FORGET_AFTER = 15 * 60.0        # failures older than this no longer count
MAX_TRACKED = 50000             # bound on remembered clients and accounts


def login_key(login: str) -> str:
    """The account a login names, for counting: case, spaces and NULs do not matter."""
    login = unicodedata.normalize("NFC", login).replace("\x00", "").strip()
    return login.lower()


class _Failures:
    """Failure counts with their last time, bounded in size."""

    def __init__(self, clock):
        self.clock = clock
        self.counts = {}

    def count(self, key):
        entry = self.counts.get(key)
        if entry is None:
            return 0
        n, when = entry
        if self.clock.seconds() - when > FORGET_AFTER:
            del self.counts[key]
            return 0
        return n

    def add(self, key):
        if len(self.counts) >= MAX_TRACKED:
            # Drop the oldest half; a flood of addresses must not grow memory.
            for k, _ in sorted(self.counts.items(), key=lambda kv: kv[1][1])[:MAX_TRACKED // 2]:
                del self.counts[k]
        self.counts[key] = (self.count(key) + 1, self.clock.seconds())

    def clear(self, key):
        self.counts.pop(key, None)


class Authenticator:
    """Checks logins against the directory and slows down repeated failures."""

    log = Logger()

    def __init__(self, directory, clock):
        self.directory = directory
        self.clock = clock
        self.by_client = _Failures(clock)
        self.by_account = _Failures(clock)

    def penalty(self, client_ip, login):
        """Seconds a login attempt from ``client_ip`` for ``login`` must wait first."""
        n = max(self.by_client.count(client_ip), self.by_account.count(login_key(login)))
        if n == 0:
            return 0.0
        return min(MAX_PENALTY, FIRST_PENALTY * 2 ** (n - 1))

    @defer.inlineCallbacks
    def login(self, login, password, client_ip):
        """Fire with the User, or None for bad credentials, after any penalty.

        Fails with DirectoryUnavailable when the directory cannot answer: the
        front end must say "try later", and no failure is counted.
        """
        wait = self.penalty(client_ip, login)
        if wait:
            yield task.deferLater(self.clock, wait, lambda: None)
        if not password:
            # An empty password is never a login, whatever the directory would
            # say (an LDAP bind without one is "unauthenticated", RFC 4513
            # 5.1.2, and succeeds on many servers): a failure like any other.
            user = None
        else:
            try:
                user = yield self.directory.authenticate(login, password)
            except DirectoryUnavailable:
                raise
        if user is None:
            self.record_failure(client_ip, login)
            return None
        # Only the client's count is forgiven: failures against the account
        # from elsewhere (someone guessing) keep counting.
        self.by_client.clear(client_ip)
        return user

    def record_failure(self, client_ip, login):
        """Count a failed login (also for a right password used wrongly, e.g. a
        SASL authorization identity that is not the user's own)."""
        key = login_key(login)
        self.by_client.add(client_ip)
        self.by_account.add(key)
        self.log.info("authentication failed for {login!r} from [{ip}]",
                      login=key[:64], ip=client_ip)
