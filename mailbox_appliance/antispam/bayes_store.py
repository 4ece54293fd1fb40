"""The Bayesian filter's token database: ``data_dir/bayes.sqlite3``.

Kept apart from ``state.sqlite3`` (the door checks' greylist): its writes
are big batches (a learned message updates up to 3,000 rows) that must not
hold up the greylist's, and it can be thrown away (or copied from another
appliance) on its own. It is built the same way as ``state.py``:

- SQLite in WAL mode, so ``mailappliance bayes train`` learns from a
  mailbox while the appliance classifies with the same file; a writer waits
  ``BUSY_TIMEOUT`` for the other one instead of failing;
- the SQL as plain functions taking a connection (``connect``, ``lookup``,
  ``learn``, ``forget``, ``expire``...), used by the store's own thread and
  directly by the command line, which has no reactor;
- ``BayesStore``, the running appliance's service, with one thread of its
  own that runs every query (and the tokenising around it) off the reactor
  thread, in the order asked;
- bounded growth: tokens not learned for ``token_max_age`` are deleted by a
  periodic sweep, and past ``max_tokens`` rows the rarest tokens go first
  (then the oldest); the record of learned messages is bounded likewise.

Tables: ``users`` (id 0 is the global database, name ""; others are
addresses, with how many spam and ham messages each has learned),
``tokens`` (user id, token hash, spam count, ham count, day last learned)
and ``learned`` (user id, message digest, as spam or not): learning a
message twice changes nothing, learning it as the other class first
untrains what it was learned as.
"""

from __future__ import annotations

import os
import sqlite3
import time

from twisted.application import service
from twisted.internet import defer, task, threads
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from mailbox_appliance.state import IBayesStore

log = Logger(namespace="mailbox_appliance.antispam.bayes_store")

FILENAME = "bayes.sqlite3"
SCHEMA_VERSION = 1
BUSY_TIMEOUT = 10.0         # seconds a writer waits for another (the train command)
EXPIRE_EVERY = 3600.0       # seconds between sweeps
MAX_TOKENS = 1000000
MAX_AGE = 180 * 86400.0
MAX_USER = 320              # characters of a user's name (an address)
LOOKUP_CHUNK = 900          # ids per IN (...) query (SQLite's old 999-variable limit)
DAY = 86400.0
MAX_CACHED = 300000         # token counts kept in memory by the filter's thread

_SCHEMA = """
CREATE TABLE IF NOT EXISTS users (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    nspam INTEGER NOT NULL DEFAULT 0,
    nham INTEGER NOT NULL DEFAULT 0
);
INSERT OR IGNORE INTO users (id, name) VALUES (0, '');
CREATE TABLE IF NOT EXISTS tokens (
    uid INTEGER NOT NULL,
    token INTEGER NOT NULL,
    spam INTEGER NOT NULL DEFAULT 0,
    ham INTEGER NOT NULL DEFAULT 0,
    atime INTEGER NOT NULL,
    PRIMARY KEY (uid, token)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS learned (
    uid INTEGER NOT NULL,
    digest BLOB NOT NULL,
    spam INTEGER NOT NULL,
    time REAL NOT NULL,
    PRIMARY KEY (uid, digest)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS learned_time ON learned (time);
"""


# -- the SQL, on a connection (any thread that owns it) ------------------------------------

def connect(path, read_only=False):
    """Open (creating) the database at ``path``: WAL mode, schema in place.

    ``read_only``: an existing file, opened so that nothing is written
    (``spam explain`` beside the running appliance).
    """
    if read_only:
        from mailbox_appliance.state import open_read_only
        return open_read_only(path, "SELECT count(*) FROM users")
    conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT, isolation_level=None,
                           check_same_thread=False)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        # A crash of the process loses nothing; a power cut at most the last
        # second of learning, which the next training repeats.
        conn.execute("PRAGMA synchronous=NORMAL")
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise sqlite3.DatabaseError(f"{path}: schema version {version} is newer than "
                                        f"this program's ({SCHEMA_VERSION})")
        if version < SCHEMA_VERSION:
            with transaction(conn):
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
    except BaseException:
        conn.close()
        raise
    return conn


class transaction:
    """``BEGIN IMMEDIATE`` ... ``COMMIT`` (or ``ROLLBACK`` on error)."""

    def __init__(self, conn):
        self.conn = conn

    def __enter__(self):
        self.conn.execute("BEGIN IMMEDIATE")
        return self.conn

    def __exit__(self, kind, value, tb):
        self.conn.execute("COMMIT" if kind is None else "ROLLBACK")
        return False


def _name(user):
    return (user or "")[:MAX_USER]


def user_totals(conn, user=""):
    """(spam, ham) messages learned by ``user`` ("" = the global database)."""
    row = conn.execute("SELECT nspam, nham FROM users WHERE name=?", (_name(user),)).fetchone()
    return (row[0], row[1]) if row else (0, 0)


def _user_id(conn, user, create=False):
    row = conn.execute("SELECT id FROM users WHERE name=?", (_name(user),)).fetchone()
    if row is not None:
        return row[0]
    if not create:
        return None
    return conn.execute("INSERT INTO users (name) VALUES (?)", (_name(user),)).lastrowid


class CountCache:
    """Token counts already read, for the filter's thread (bounded).

    Valid while nothing was written: neither by this connection (its
    ``total_changes``) nor by another one, such as the train command
    (SQLite's ``PRAGMA data_version``). Any write empties it, which is rare
    next to the lookups (a user's move, a training run, the hourly sweep).
    Absent tokens are remembered too (as None).
    """

    def __init__(self, max_entries=MAX_CACHED):
        self.max_entries = max_entries
        self.entries = {}
        self.key = None

    def check(self, conn):
        key = (conn.execute("PRAGMA data_version").fetchone()[0], conn.total_changes)
        if key != self.key or len(self.entries) > self.max_entries:
            self.entries.clear()
            self.key = key


def lookup(conn, ids, user="", cache=None):
    """({token id: (spam, ham)}, spam learned, ham learned) for the global
    database plus ``user``'s ("" = global only), in one read transaction.
    ``cache`` (a CountCache) spares the queries for tokens already read."""
    conn.execute("BEGIN")
    try:
        if cache is not None:
            cache.check(conn)
        users = [(0,) + user_totals(conn, "")]
        if user:
            row = conn.execute("SELECT id, nspam, nham FROM users WHERE name=?",
                               (_name(user),)).fetchone()
            if row is not None:
                users.append(row)
        counts = {}
        nspam = sum(u[1] for u in users)
        nham = sum(u[2] for u in users)
        ids = list(ids)
        for uid, _, _ in users:
            found = {}
            if cache is None:
                wanted = ids
            else:
                entries = cache.entries
                wanted = []
                for t in ids:
                    c = entries.get((uid, t), False)
                    if c is False:
                        wanted.append(t)
                    elif c is not None:
                        found[t] = c
            for i in range(0, len(wanted), LOOKUP_CHUNK):
                chunk = wanted[i:i + LOOKUP_CHUNK]
                sql = ("SELECT token, spam, ham FROM tokens WHERE uid=? AND token IN ("
                       + ",".join("?" * len(chunk)) + ")")
                read = {token: (spam, ham) for token, spam, ham
                        in conn.execute(sql, [uid] + chunk)}
                found.update(read)
                if cache is not None:
                    for t in chunk:
                        cache.entries[(uid, t)] = read.get(t)
            for token, c in found.items():
                old = counts.get(token)
                counts[token] = c if old is None else (old[0] + c[0], old[1] + c[1])
    finally:
        conn.execute("COMMIT")
    return counts, nspam, nham


def _train(conn, uid, ids, spam, day):
    conn.executemany(
        "INSERT INTO tokens (uid, token, spam, ham, atime) VALUES (?,?,?,?,?) "
        "ON CONFLICT (uid, token) DO UPDATE SET spam=spam+excluded.spam, "
        "ham=ham+excluded.ham, atime=excluded.atime",
        [(uid, t, 1 if spam else 0, 0 if spam else 1, day) for t in ids])
    column = "nspam" if spam else "nham"
    conn.execute(f"UPDATE users SET {column}={column}+1 WHERE id=?", (uid,))


def _untrain(conn, uid, ids, spam):
    column = "spam" if spam else "ham"
    # Counts never go below zero: the tokens may have expired, or the
    # message looked a little different when it was learned.
    conn.executemany(f"UPDATE tokens SET {column}=max({column}-1, 0) WHERE uid=? AND token=?",
                     [(uid, t) for t in ids])
    conn.executemany("DELETE FROM tokens WHERE uid=? AND token=? AND spam=0 AND ham=0",
                     [(uid, t) for t in ids])
    total = "nspam" if spam else "nham"
    conn.execute(f"UPDATE users SET {total}=max({total}-1, 0) WHERE id=?", (uid,))


def learned_as(conn, user, digest):
    """True (spam), False (ham) or None (not learned) for a message digest."""
    uid = _user_id(conn, user)
    if uid is None:
        return None
    row = conn.execute("SELECT spam FROM learned WHERE uid=? AND digest=?",
                       (uid, digest)).fetchone()
    return None if row is None else bool(row[0])


def learn(conn, user, ids, digest, spam, now=None):
    """Learn the message (its token ``ids`` and ``digest``) as spam or ham for
    ``user`` ("" = global): "learned", "relearned" (it had been learned as
    the other class, now untrained first) or "already"."""
    now = time.time() if now is None else now
    spam = bool(spam)
    with transaction(conn):
        uid = _user_id(conn, user, create=True)
        row = conn.execute("SELECT spam FROM learned WHERE uid=? AND digest=?",
                           (uid, digest)).fetchone()
        if row is not None and bool(row[0]) == spam:
            return "already"
        if row is not None:
            _untrain(conn, uid, ids, bool(row[0]))
        _train(conn, uid, ids, spam, int(now // DAY))
        conn.execute("INSERT OR REPLACE INTO learned (uid, digest, spam, time) VALUES (?,?,?,?)",
                     (uid, digest, int(spam), now))
    return "relearned" if row is not None else "learned"


def forget(conn, user, ids, digest):
    """Untrain a learned message; True if it had been learned."""
    with transaction(conn):
        uid = _user_id(conn, user)
        if uid is None:
            return False
        row = conn.execute("SELECT spam FROM learned WHERE uid=? AND digest=?",
                           (uid, digest)).fetchone()
        if row is None:
            return False
        _untrain(conn, uid, ids, bool(row[0]))
        conn.execute("DELETE FROM learned WHERE uid=? AND digest=?", (uid, digest))
    return True


def count_tokens(conn):
    return conn.execute("SELECT count(*) FROM tokens").fetchone()[0]


def expire(conn, now, max_age=MAX_AGE, max_tokens=MAX_TOKENS):
    """Delete tokens not learned for ``max_age`` seconds, then the rarest (and
    oldest) past ``max_tokens``; forget learned-message records as old, and
    keep at most ``max_tokens`` of them. Fires with the tokens deleted."""
    with transaction(conn):
        deleted = conn.execute("DELETE FROM tokens WHERE atime < ?",
                               (int((now - max_age) // DAY),)).rowcount
        excess = count_tokens(conn) - max_tokens
        if excess > 0:
            # Tokens seen once are most of the table and the least useful.
            deleted += conn.execute(
                "DELETE FROM tokens WHERE (uid, token) IN (SELECT uid, token FROM tokens "
                "ORDER BY spam + ham, atime LIMIT ?)", (excess,)).rowcount
        conn.execute("DELETE FROM learned WHERE time < ?", (now - max_age,))
        excess = conn.execute("SELECT count(*) FROM learned").fetchone()[0] - max_tokens
        if excess > 0:
            conn.execute("DELETE FROM learned WHERE (uid, digest) IN (SELECT uid, digest "
                         "FROM learned ORDER BY time LIMIT ?)", (excess,))
    return deleted


def summary(conn):
    """[(user, spam learned, ham learned, tokens)] of every user, global first."""
    out = []
    for uid, name, nspam, nham in conn.execute(
            "SELECT id, name, nspam, nham FROM users ORDER BY id").fetchall():
        n = conn.execute("SELECT count(*) FROM tokens WHERE uid=?", (uid,)).fetchone()[0]
        out.append((name, nspam, nham, n))
    return out


# -- the store of the running appliance ---------------------------------------------------

@implementer(IBayesStore)
class BayesStore(service.Service):
    """The token database of the running appliance, every query in one thread.

    ``call(fn, *args)`` runs ``fn(connection, *args)`` in that thread and
    returns a Deferred of its result: the filter tokenises and looks up a
    message there in one hop, the learner parses, tokenises and learns.
    The sweep (``expire``) runs every ``expire_every`` seconds of
    ``clock`` (the reactor unless given), the first one at start.
    """

    name = "bayes"

    def __init__(self, path, reactor, max_tokens=MAX_TOKENS, max_age=MAX_AGE,
                 expire_every=EXPIRE_EVERY, now=time.time, clock=None, read_only=False):
        self.path = path
        # Read only: an existing file, no sweep, nothing written (spam explain).
        self.read_only = read_only
        # What paces the sweep (a test's Clock); results come back through
        # ``reactor`` either way.
        self.clock = clock or reactor
        # Wall-clock time, as the command line's learning uses.
        self.now = now
        self.reactor = reactor
        self.max_tokens = max_tokens
        self.max_age = max_age
        self.expire_every = expire_every
        self._pool = None
        self._conn = None
        self._sweep = None
        self._opened = None
        self._sweeping = False
        self.cache = CountCache()       # used in the thread only

    def open(self):
        """Start the thread and open the database in it; a Deferred of the open."""
        if self._opened is None:
            self._pool = ThreadPool(minthreads=1, maxthreads=1, name="bayes-sqlite")
            self._pool.start()
            self._opened = self._run(self._open_in_thread)
            self._opened.addErrback(self._open_failed)
            self._sweep = task.LoopingCall(self._tick)
            self._sweep.clock = self.clock
            if not self.read_only:
                self._sweep.start(self.expire_every, now=True)
        return self._opened

    def _open_in_thread(self):
        if self.read_only:
            self._conn = connect(self.path, read_only=True)
            return
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), mode=0o700, exist_ok=True)
        self._conn = connect(self.path)

    def _open_failed(self, failure):
        # Not fatal: the filter fails (logged, skipped by the scan) and mail flows.
        log.failure("Bayes database {path} could not be opened", failure, path=self.path)

    def close(self):
        if self._sweep is not None and self._sweep.running:
            self._sweep.stop()
        if self._opened is None:
            return defer.succeed(None)
        self._opened = None
        d = self._run(self._close_in_thread)
        d.addErrback(lambda f: log.failure("closing the Bayes database", f))
        pool = self._pool

        def stop_pool(_):
            pool.stop()
        return d.addBoth(stop_pool)

    def _close_in_thread(self):
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def startService(self):
        service.Service.startService(self)
        self.open()

    def stopService(self):
        service.Service.stopService(self)
        return self.close()

    def _run(self, fn, *args):
        return threads.deferToThreadPool(self.reactor, self._pool, fn, *args)

    def call(self, fn, *args):
        """``fn(connection, *args)`` in the database thread; a Deferred."""
        if self._opened is None:
            return defer.fail(RuntimeError("the Bayes database is not open"))

        def in_thread():
            if self._conn is None:
                raise RuntimeError(f"the Bayes database {self.path} is not open")
            return fn(self._conn, *args)
        return self._run(in_thread)

    def totals(self, user=""):
        return self.call(user_totals, user)

    def classify(self, message, user, min_spam, min_ham):
        # Tokenised in the database thread too: one hop for the whole work.
        from mailbox_appliance.antispam.bayes import classify_in_thread
        return self.call(classify_in_thread, message, user, min_spam, min_ham, self.cache)

    def learn(self, user, raw, spam):
        from mailbox_appliance.antispam.bayes_train import learn_raw
        return self.call(learn_raw, user, raw, spam)

    def expire_now(self):
        """One sweep; logged, never raised; a sweep still running is not doubled."""
        if self._sweeping or self._opened is None:
            return defer.succeed(0)
        self._sweeping = True
        d = self.call(expire, self.now(), self.max_age, self.max_tokens)

        def done(deleted):
            if deleted:
                log.info("bayes: {n} old or excess tokens deleted", n=deleted)
            return deleted

        def failed(f):
            log.failure("bayes: expiry sweep failed", f)
            return 0

        def finished(result):
            self._sweeping = False
            return result
        d.addCallbacks(done, failed).addBoth(finished)
        return d

    def _tick(self):
        self.expire_now()       # not returned: the LoopingCall must not wait on the disk


def path_of(config):
    return os.path.join(config.server.data_dir, FILENAME)


def open_bayes(config, reactor):
    """The appliance's token database (a Service, not started), or None when
    the Bayes filter is off."""
    from mailbox_appliance.config import parse_duration
    b = config.antispam.bayes
    if not b.enabled:
        return None
    return BayesStore(path_of(config), reactor, max_tokens=b.max_tokens,
                      max_age=parse_duration(b.token_max_age))
