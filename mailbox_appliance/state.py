"""The appliance's small state database: ``data_dir/state.sqlite3``.

What the door checks must remember across connections and restarts (today
the greylisting triplets) lives here, behind one narrow interface,
``IStateStore``, so a shared database (PostgreSQL for several appliances)
can replace the embedded SQLite file later without the checks noticing.

SQLite calls block (disk, fsync, a lock held by the admin command), so
the store runs every query in one thread of its own, never on the reactor
thread; one thread also means one connection and queries in the order
they were asked. The file is in WAL mode: the ``mailappliance greylist``
command reads and writes it while the appliance runs, readers never block
the writer, and a writer waits (``BUSY_TIMEOUT``) instead of failing.

Growth is bounded: entries carry their own expiry time and a periodic
sweep (a LoopingCall on the injected reactor) deletes the expired ones;
and the table holds at most ``max_entries`` rows (plus 1% between two
checks of the cap). Past the cap the oldest
pending (never passed) entries go first, and only when none is left the
oldest whitelisted ones: a flood of random one-off triplets pushes out its
own kind, not the correspondents that proved they retry.

The SQL lives in plain functions taking a connection (``connect``,
``get_entry``, ...), used by the store's thread and directly by the admin
command, which has no reactor.
"""

from __future__ import annotations

import os
import sqlite3
import urllib.parse
from dataclasses import dataclass

from twisted.application import service
from twisted.internet import defer, task, threads
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool
from zope.interface import Attribute, Interface, implementer

from mailbox_appliance import state_lists

log = Logger(namespace="mailbox_appliance.state")

FILENAME = "state.sqlite3"
SCHEMA_VERSION = 3          # 2: the list server's tables (state_lists); 3: list_posts_seen
BUSY_TIMEOUT = 5.0          # seconds a writer waits for another one (the admin command)
MAX_ENTRIES = 200000        # greylist rows kept at most (a few tens of MB)
EXPIRE_EVERY = 600.0        # seconds between sweeps of expired entries
MAX_FIELD = 512             # characters of a stored network/sender/recipient

_SCHEMA = """
CREATE TABLE IF NOT EXISTS greylist (
    network TEXT NOT NULL,
    sender TEXT NOT NULL,
    recipient TEXT NOT NULL,
    first_seen REAL NOT NULL,
    last_seen REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    passes INTEGER NOT NULL DEFAULT 0,
    whitelisted_until REAL NOT NULL DEFAULT 0,
    expires REAL NOT NULL,
    PRIMARY KEY (network, sender, recipient)
);
CREATE INDEX IF NOT EXISTS greylist_expires ON greylist (expires);
CREATE INDEX IF NOT EXISTS greylist_age ON greylist (whitelisted_until, last_seen);
"""

_COLUMNS = ("network, sender, recipient, first_seen, last_seen, attempts, passes, "
            "whitelisted_until, expires")


@dataclass(frozen=True)
class GreylistEntry:
    """One triplet as stored.

    ``attempts``: deliveries deferred so far; ``passes``: deliveries
    accepted (retry that passed, then each later message while whitelisted);
    ``whitelisted_until``: 0 while pending; ``expires``: when the sweep may
    delete the row (end of the retry window, or of the whitelisting).
    """

    network: str
    sender: str
    recipient: str
    first_seen: float
    last_seen: float
    attempts: int = 0
    passes: int = 0
    whitelisted_until: float = 0.0
    expires: float = 0.0

    @property
    def key(self):
        return (self.network, self.sender, self.recipient)

    def whitelisted(self, now) -> bool:
        return self.whitelisted_until > now

    def as_dict(self):
        return {"network": self.network, "sender": self.sender, "recipient": self.recipient,
                "first_seen": self.first_seen, "last_seen": self.last_seen,
                "attempts": self.attempts, "passes": self.passes,
                "whitelisted_until": self.whitelisted_until or None, "expires": self.expires}


class IStateStore(Interface):
    """Persistent state of the door checks. Every method returns a Deferred."""

    max_entries = Attribute("Greylist rows kept at most.")

    def greylist_get(network, sender, recipient):
        """The L{GreylistEntry} of the triplet, or None."""

    def greylist_put(entry):
        """Insert or replace the triplet's entry (all fields as given)."""

    def greylist_whitelist(network, sender, recipient, now, until, passes=1):
        """Whitelist the triplet until ``until`` (creating it if needed), count
        ``passes`` passes.

        Fires with the stored L{GreylistEntry}.
        """

    def greylist_add_passes(network, sender, recipient, passes, now):
        """Count ``passes`` more passes of a triplet still stored (seen at
        ``now``); nothing when it is gone. Fires with 1 or 0."""

    def greylist_expire(now):
        """Delete entries whose ``expires`` is past, then enforce the cap; fires
        with the number deleted."""

    def greylist_list(limit=None):
        """Entries, the most recently seen first (at most ``limit``)."""

    def greylist_delete(network, sender, recipient):
        """Delete the triplet; fires with 1 if it existed, else 0."""

    def greylist_count():
        """How many entries are stored."""


class IBayesStore(Interface):
    """The Bayesian filter's token counts, global and per user.

    The embedded implementation is ``antispam.bayes_store.BayesStore`` (its
    own SQLite file beside this one: its big learning batches must not hold
    up the greylist's writes); a shared database can implement this too.
    Every method returns a Deferred.
    """

    def classify(message, user, min_spam, min_ham):
        """The ``bayes.Classification`` of a ScannedMessage, with ``user``'s
        tokens (an address, "" for none) added to the global ones; no
        probability until ``min_spam`` spam and ``min_ham`` ham are learned."""

    def learn(user, raw, spam):
        """Learn the message bytes ``raw`` as spam (True) or ham for ``user``
        ("" = global): fires with "learned", "relearned" (untrained from the
        other class first) or "already"."""

    def totals(user=""):
        """(spam, ham) messages learned for ``user`` ("" = global)."""

    def expire_now():
        """Drop tokens past their age and the rarest past the cap; fires with
        how many were deleted."""


class IListStore(Interface):
    """The list server's lists, members, owners, moderators and held requests.

    The SQLite implementation is ``SQLiteStateStore`` (tables and semantics in
    ``state_lists``); each method is the function of that name there without
    its connection argument, run in one transaction, returning a Deferred.
    """

    def create_list(address, subject="", settings=None, now=0.0, robot="lists"):
        """A new MailingList; fails with ListError when taken, reserved or malformed."""

    def get_list(address):
        """The MailingList, or None."""

    def all_lists(domain=None):
        """Every list (of one domain), by address."""

    def update_list(address, subject=None, settings=None):
        """Change the subject or the settings."""

    def delete_list(address):
        """Delete a list with everything about it; 1 if it existed."""

    def next_post(address):
        """The next post sequence number."""

    def add_member(list_address, address, name="", mode="mail", now=0.0):
        """True if subscribed, False if already a member."""

    def remove_member(list_address, address):
        """True if it was a member."""

    def get_member(list_address, address):
        """The Member, or None."""

    def member_by_id(list_address, member_id):
        """The Member with that id, or None."""

    def post_seen(list_address, message_id, since):
        """Whether the list took a post with that Message-ID after ``since``."""

    def remember_post(list_address, message_id, now):
        """Record a post the list took (distributed or held)."""

    def forget_posts(before):
        """Drop posts recorded before ``before``; how many."""

    def members(list_address, limit=None, after=""):
        """Members in address order, a page at a time."""

    def count_members(list_address):
        """How many members."""

    def set_member(list_address, address, name=None, mode=None, bounce_score=None,
                   last_bounce=None, disabled_since=None, concealed=None,
                   bounce_notices=None):
        """Change a member; True if it exists."""

    def add_role(list_address, address, role, name=""):
        """Make an owner or moderator; True if new."""

    def remove_role(list_address, address, role):
        """True if it held the role."""

    def role_holders(list_address, role):
        """[(address, name)] of the owners or moderators."""

    def has_role(list_address, address, role):
        """Whether ``address`` is an owner (moderator) of the list."""

    def hold(list_address, kind, token_hash, expires, now=0.0, action="", target="",
             requester="", name="", subject="", message=None):
        """Keep a post or request until its token returns; the Held record."""

    def find_held(token_hash, now):
        """The unexpired Held of a token hash (handled ones too), or None."""

    def held_message(held_id):
        """The held message's bytes, or None."""

    def settle_held(held_id, by, now):
        """True for the first to act on a held request, False after."""

    def held_failed(held_id):
        """Count a wrong use of a held request's token; the new count."""

    def held_waiting(list_address, kind=None):
        """The list's waiting requests, oldest first."""

    def expire_held(now, keep_handled=7 * 86400):
        """Delete what is past its time; the expired waiting requests."""


LIST_OPERATIONS = tuple(IListStore.names())


def in_transaction(conn, fn, *args, **kwargs):
    """``fn(conn, *args, **kwargs)`` in one write transaction."""
    with _transaction(conn):
        return fn(conn, *args, **kwargs)


# -- the SQL, on a connection (any thread that owns it) ------------------------------------

def give_to_owner_of(owner_path, paths):
    """Run as root (an admin command), give the existing ``paths`` to the
    owner of ``owner_path`` (data_dir, or the database file): root must not
    leave files the appliance's own user cannot write."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return
    owner = os.stat(owner_path)
    for name in paths:
        try:
            st = os.stat(name)
            if (st.st_uid, st.st_gid) != (owner.st_uid, owner.st_gid):
                os.chown(name, owner.st_uid, owner.st_gid)
        except OSError:
            pass


def open_for_writing(path, connect_to=None):
    """``connect_to(path)`` (this module's ``connect`` by default), the file
    and its folder created if needed and left to the folder's owner."""
    created = not os.path.exists(path)
    if created:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    conn = (connect_to or connect)(path)
    if created:
        give_to_owner_of(os.path.dirname(path), (path, path + "-wal", path + "-shm"))
    return conn


def open_read_only(path, probe):
    """An existing SQLite file opened so that nothing is written; ``probe``
    (a query) is run at once. Reading a WAL database makes its -wal and -shm
    files when no writer has them open: they are left to the database
    file's owner, the appliance's user."""
    uri = "file:" + urllib.parse.quote(os.path.abspath(path)) + "?mode=ro"
    conn = sqlite3.connect(uri, uri=True, timeout=BUSY_TIMEOUT, isolation_level=None,
                           check_same_thread=False)
    try:
        conn.execute(probe).fetchall()
        give_to_owner_of(path, (path + "-wal", path + "-shm"))
    except BaseException:
        conn.close()
        raise
    return conn


def connect(path):
    """Open (creating) the database at ``path``: WAL mode, schema in place."""
    conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT, isolation_level=None,
                           check_same_thread=False)
    try:
        # WAL lets the admin command read while the appliance writes (and the
        # other way round); synchronous=NORMAL is durable across a crash of
        # the process, and losing the last second of greylist writes to a
        # power cut only means a sender is greylisted once more.
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise sqlite3.DatabaseError(f"{path}: schema version {version} is newer than "
                                        f"this program's ({SCHEMA_VERSION})")
        if version < SCHEMA_VERSION:
            # Only a new (or older) file is written to: opening a current one
            # to read it (``greylist list``) takes no write lock.
            with _transaction(conn):
                # Every statement is CREATE ... IF NOT EXISTS: an older file
                # gets the tables it lacks and keeps its rows.
                for statement in (_SCHEMA + ";" + state_lists.SCHEMA).split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
    except BaseException:
        conn.close()
        raise
    return conn


class _transaction:
    """``BEGIN IMMEDIATE`` ... ``COMMIT`` (or ``ROLLBACK`` on error)."""

    def __init__(self, conn):
        self.conn = conn

    def __enter__(self):
        # IMMEDIATE takes the write lock up front, so a read-then-write
        # cannot fail half-way with SQLITE_BUSY (it waits BUSY_TIMEOUT instead).
        self.conn.execute("BEGIN IMMEDIATE")
        return self.conn

    def __exit__(self, kind, value, tb):
        self.conn.execute("COMMIT" if kind is None else "ROLLBACK")
        return False


def _bounded(text):
    return str(text)[:MAX_FIELD]


def _entry(row):
    return None if row is None else GreylistEntry(*row)


def get_entry(conn, network, sender, recipient):
    row = conn.execute(f"SELECT {_COLUMNS} FROM greylist WHERE network=? AND sender=? "
                       "AND recipient=?",
                       (_bounded(network), _bounded(sender), _bounded(recipient))).fetchone()
    return _entry(row)


def put_entry(conn, entry, max_entries=None):
    with _transaction(conn):
        conn.execute(f"INSERT OR REPLACE INTO greylist ({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?)",
                     (_bounded(entry.network), _bounded(entry.sender),
                      _bounded(entry.recipient), entry.first_seen, entry.last_seen,
                      entry.attempts, entry.passes, entry.whitelisted_until, entry.expires))
        if max_entries is not None:
            _cap(conn, max_entries)


def whitelist_entry(conn, network, sender, recipient, now, until, max_entries=None,
                    passes=1):
    key = (_bounded(network), _bounded(sender), _bounded(recipient))
    with _transaction(conn):
        conn.execute(
            f"INSERT INTO greylist ({_COLUMNS}) VALUES (?,?,?,?,?,0,?,?,?) "
            "ON CONFLICT (network, sender, recipient) DO UPDATE SET last_seen=excluded.last_seen, "
            "passes=passes+excluded.passes, whitelisted_until=excluded.whitelisted_until, "
            "expires=excluded.expires",
            key + (now, now, int(passes), until, until))
        if max_entries is not None:
            _cap(conn, max_entries)
    return get_entry(conn, *key)


def add_passes(conn, network, sender, recipient, passes, now):
    with _transaction(conn):
        return conn.execute(
            "UPDATE greylist SET passes = passes + ?, last_seen = max(last_seen, ?) "
            "WHERE network=? AND sender=? AND recipient=?",
            (int(passes), now, _bounded(network), _bounded(sender), _bounded(recipient))
        ).rowcount


def expire_entries(conn, now, max_entries=None):
    with _transaction(conn):
        deleted = conn.execute("DELETE FROM greylist WHERE expires < ?", (now,)).rowcount
        if max_entries is not None:
            deleted += _cap(conn, max_entries)
    return deleted


def _cap(conn, max_entries):
    """Delete the oldest rows past ``max_entries``: pending ones first."""
    excess = count_entries(conn) - max_entries
    if excess <= 0:
        return 0
    deleted = conn.execute(
        "DELETE FROM greylist WHERE rowid IN (SELECT rowid FROM greylist "
        "WHERE whitelisted_until = 0 ORDER BY last_seen LIMIT ?)", (excess,)).rowcount
    if excess > deleted:
        deleted += conn.execute(
            "DELETE FROM greylist WHERE rowid IN (SELECT rowid FROM greylist "
            "ORDER BY whitelisted_until, last_seen LIMIT ?)", (excess - deleted,)).rowcount
    return deleted


def list_entries(conn, limit=None):
    sql = f"SELECT {_COLUMNS} FROM greylist ORDER BY last_seen DESC, network, sender, recipient"
    if limit is not None:
        return [_entry(r) for r in conn.execute(sql + " LIMIT ?", (int(limit),))]
    return [_entry(r) for r in conn.execute(sql)]


def delete_entry(conn, network, sender, recipient):
    with _transaction(conn):
        return conn.execute("DELETE FROM greylist WHERE network=? AND sender=? AND recipient=?",
                            (_bounded(network), _bounded(sender), _bounded(recipient))).rowcount


def count_entries(conn):
    return conn.execute("SELECT count(*) FROM greylist").fetchone()[0]


# -- the store of the running appliance ---------------------------------------------------

def _list_operation(name):
    fn = getattr(state_lists, name)

    def operation(self, *args, **kwargs):
        return self._query(in_transaction, fn, *args, **kwargs)
    operation.__name__ = name
    operation.__doc__ = fn.__doc__
    return operation


@implementer(IStateStore, IListStore)
class SQLiteStateStore(service.Service):
    """``IStateStore`` on an SQLite file, every query in one thread of its own.

    ``reactor`` receives the results from the thread and paces the expiry
    sweep (every ``expire_every`` seconds; its ``seconds()`` is "now").
    Besides each sweep, the cap is enforced every
    ``max_entries // 100`` writes, so between sweeps the table can pass it
    by at most 1% (a COUNT per write would cost a scan each time).
    """

    name = "state"

    def __init__(self, path, reactor, max_entries=MAX_ENTRIES, expire_every=EXPIRE_EVERY):
        self.path = path
        self.reactor = reactor
        self.max_entries = max_entries
        self.expire_every = expire_every
        self._pool = None
        self._conn = None
        self._sweep = None
        self._opened = None
        self._sweeping = False
        self._cap_every = max(1, max_entries // 100)
        self._writes = 0            # since the last cap check; touched in the thread only

    # -- lifecycle

    def open(self):
        """Start the thread and open the database in it; a Deferred of the open."""
        if self._opened is None:
            # A new pool each time: a stopped ThreadPool cannot start again.
            self._pool = ThreadPool(minthreads=1, maxthreads=1, name="state-sqlite")
            self._pool.start()
            self._opened = self._run(self._open_in_thread)
            self._opened.addErrback(self._open_failed)
            self._sweep = task.LoopingCall(self._tick)
            self._sweep.clock = self.reactor
            # The first sweep at start clears what expired while we were down.
            self._sweep.start(self.expire_every, now=True)
        return self._opened

    def _open_in_thread(self):
        directory = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(directory, mode=0o700, exist_ok=True)
        self._conn = connect(self.path)

    def _open_failed(self, failure):
        # Not fatal: every query fails afterwards and the checks fail open.
        log.failure("state database {path} could not be opened", failure, path=self.path)

    def close(self):
        """Stop the sweep, close the database and end the thread; a Deferred."""
        if self._sweep is not None and self._sweep.running:
            self._sweep.stop()
        if self._opened is None:
            return defer.succeed(None)
        self._opened = None
        d = self._run(self._close_in_thread)
        d.addErrback(lambda f: log.failure("closing the state database", f))

        pool = self._pool       # not a pool opened again meanwhile

        def stop_pool(_):
            pool.stop()             # the thread is idle now: a short join
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

    # -- running SQL in the thread

    def _run(self, fn, *args):
        return threads.deferToThreadPool(self.reactor, self._pool, fn, *args)

    def _query(self, fn, *args, **kwargs):
        if self._opened is None:
            return defer.fail(RuntimeError("the state database is not open"))

        def in_thread():
            if self._conn is None:
                raise RuntimeError(f"the state database {self.path} is not open")
            return fn(self._conn, *args, **kwargs)
        return self._run(in_thread)

    # -- IStateStore

    def greylist_get(self, network, sender, recipient):
        return self._query(get_entry, network, sender, recipient)

    def _cap_due(self):
        """``max_entries`` when this write should enforce the cap, else None (thread)."""
        self._writes += 1
        if self._writes >= self._cap_every:
            self._writes = 0
            return self.max_entries
        return None

    def greylist_put(self, entry):
        return self._query(lambda conn: put_entry(conn, entry, self._cap_due()))

    def greylist_whitelist(self, network, sender, recipient, now, until, passes=1):
        return self._query(lambda conn: whitelist_entry(conn, network, sender, recipient,
                                                        now, until, self._cap_due(), passes))

    def greylist_add_passes(self, network, sender, recipient, passes, now):
        return self._query(add_passes, network, sender, recipient, passes, now)

    def greylist_expire(self, now):
        return self._query(expire_entries, now, self.max_entries)

    def greylist_list(self, limit=None):
        return self._query(list_entries, limit)

    def greylist_delete(self, network, sender, recipient):
        return self._query(delete_entry, network, sender, recipient)

    def greylist_count(self):
        return self._query(count_entries)

    def _tick(self):
        self.expire_now()       # not returned: the LoopingCall must not wait on the disk

    def expire_now(self):
        """One sweep (the LoopingCall's); a failure is logged, never raised.

        Fires when the sweep is done. The LoopingCall does not wait for it
        (its pace stays the reactor's); a sweep still running when the next
        is due is not doubled, the next one is skipped.
        """
        if self._sweeping:
            return defer.succeed(0)
        self._sweeping = True
        d = self.greylist_expire(self.reactor.seconds())

        def done(deleted):
            if deleted:
                log.info("state: {n} expired or excess greylist entries deleted", n=deleted)
            return deleted

        def failed(f):
            log.failure("state: expiry sweep failed", f)
            return 0

        def finished(result):
            self._sweeping = False
            return result
        d.addCallbacks(done, failed).addBoth(finished)
        return d


def open_store(config, reactor):
    """The appliance's store on ``data_dir/state.sqlite3`` (a Service; not started)."""
    return SQLiteStateStore(os.path.join(config.server.data_dir, FILENAME), reactor)


# IListStore: each state_lists function, in the store's thread, in one transaction.
for _name in LIST_OPERATIONS:
    setattr(SQLiteStateStore, _name, _list_operation(_name))
del _name
