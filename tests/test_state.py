"""The SQLite state store: schema, WAL, the greylist queries, expiry and the cap.

The store runs its SQL in its own thread and answers on the real reactor;
time (the expiry sweep, "now") is a Clock through ``ClockedReactor``.
"""

import os
import shutil
import sqlite3
import tempfile
import threading

from twisted.internet import defer
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from mailbox_appliance import state
from mailbox_appliance.state import GreylistEntry, IStateStore, SQLiteStateStore
from tests.sink_helpers import ClockedReactor

NET = "192.0.2.0/24"


def entry(n=0, first_seen=1000.0, **kw):
    kw.setdefault("last_seen", first_seen)
    kw.setdefault("attempts", 1)
    kw.setdefault("expires", first_seen + 3600)
    return GreylistEntry(NET, f"s{n}@ext.test", "bob@example.test", first_seen, **kw)


class StoreTestBase(unittest.TestCase):

    timeout = 30
    max_entries = state.MAX_ENTRIES

    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="state-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.path = os.path.join(self.dir, "var", state.FILENAME)
        self.reactor = ClockedReactor()
        self.reactor.clock.advance(1000)
        self.store = SQLiteStateStore(self.path, self.reactor, max_entries=self.max_entries)
        self.addCleanup(self.store.close)
        return self.store.open()


class SchemaTests(StoreTestBase):

    def test_provides_the_interface(self):
        verifyObject(IStateStore, self.store)

    def test_file_created_in_wal_mode_with_schema(self):
        self.assertTrue(os.path.exists(self.path))
        conn = sqlite3.connect(self.path)
        self.addCleanup(conn.close)
        self.assertEqual(conn.execute("PRAGMA journal_mode").fetchone()[0], "wal")
        self.assertEqual(conn.execute("PRAGMA user_version").fetchone()[0],
                         state.SCHEMA_VERSION)
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
        self.assertIn("greylist", tables)
        self.assertIn("greylist_expires", tables)

    @defer.inlineCallbacks
    def test_queries_run_off_the_reactor_thread(self):
        seen = []
        main = threading.current_thread()
        yield self.store._query(lambda conn: seen.append(threading.current_thread()))
        self.assertNotEqual(seen[0], main)

    @defer.inlineCallbacks
    def test_reopen_keeps_data(self):
        yield self.store.greylist_put(entry())
        yield self.store.close()
        again = SQLiteStateStore(self.path, self.reactor)
        self.addCleanup(again.close)
        yield again.open()
        got = yield again.greylist_get(NET, "s0@ext.test", "bob@example.test")
        self.assertEqual(got, entry())

    def test_newer_schema_refused(self):
        other = os.path.join(self.dir, "newer.sqlite3")
        conn = sqlite3.connect(other)
        conn.execute("PRAGMA user_version=99")
        conn.close()
        self.assertRaises(sqlite3.DatabaseError, state.connect, other)

    @defer.inlineCallbacks
    def test_unopenable_file_fails_queries(self):
        blocker = os.path.join(self.dir, "file")
        open(blocker, "w").close()
        broken = SQLiteStateStore(os.path.join(blocker, "state.sqlite3"), self.reactor)
        self.addCleanup(broken.close)
        yield broken.open()         # logged, not raised
        self.flushLoggedErrors()
        with self.assertRaises(RuntimeError):
            yield broken.greylist_get(NET, "", "bob@example.test")
        self.flushLoggedErrors()

    @defer.inlineCallbacks
    def test_closed_store_fails_queries(self):
        yield self.store.close()
        with self.assertRaises(RuntimeError):
            yield self.store.greylist_count()


class GreylistQueryTests(StoreTestBase):

    @defer.inlineCallbacks
    def test_get_missing_is_none(self):
        got = yield self.store.greylist_get(NET, "", "bob@example.test")
        self.assertIsNone(got)

    @defer.inlineCallbacks
    def test_put_replaces(self):
        yield self.store.greylist_put(entry())
        yield self.store.greylist_put(entry(last_seen=1100.0, attempts=2))
        got = yield self.store.greylist_get(NET, "s0@ext.test", "bob@example.test")
        self.assertEqual((got.first_seen, got.last_seen, got.attempts), (1000.0, 1100.0, 2))
        self.assertEqual((yield self.store.greylist_count()), 1)

    @defer.inlineCallbacks
    def test_whitelist_new_and_existing(self):
        got = yield self.store.greylist_whitelist(NET, "a@ext.test", "b@example.test",
                                                  2000.0, 9000.0)
        self.assertEqual((got.first_seen, got.passes, got.whitelisted_until, got.expires),
                         (2000.0, 1, 9000.0, 9000.0))
        self.assertTrue(got.whitelisted(8999))
        self.assertFalse(got.whitelisted(9000))
        yield self.store.greylist_put(entry(attempts=3))
        got = yield self.store.greylist_whitelist(NET, "s0@ext.test", "bob@example.test",
                                                  1400.0, 5000.0)
        # first_seen and attempts stay; the pass is counted.
        self.assertEqual((got.first_seen, got.last_seen, got.attempts, got.passes,
                          got.whitelisted_until), (1000.0, 1400.0, 3, 1, 5000.0))
        got = yield self.store.greylist_whitelist(NET, "s0@ext.test", "bob@example.test",
                                                  1500.0, 6000.0)
        self.assertEqual((got.passes, got.whitelisted_until), (2, 6000.0))

    @defer.inlineCallbacks
    def test_list_and_delete(self):
        for n in range(3):
            yield self.store.greylist_put(entry(n, first_seen=1000.0 + n))
        listed = yield self.store.greylist_list()
        self.assertEqual([e.sender for e in listed], ["s2@ext.test", "s1@ext.test",
                                                      "s0@ext.test"])
        self.assertEqual(len((yield self.store.greylist_list(limit=2))), 2)
        self.assertEqual((yield self.store.greylist_delete(NET, "s1@ext.test",
                                                           "bob@example.test")), 1)
        self.assertEqual((yield self.store.greylist_delete(NET, "s1@ext.test",
                                                           "bob@example.test")), 0)
        self.assertEqual((yield self.store.greylist_count()), 2)

    @defer.inlineCallbacks
    def test_oversized_fields_are_bounded(self):
        long = "x" * 5000 + "@ext.test"
        yield self.store.greylist_put(GreylistEntry(NET, long, long, 1.0, 1.0, expires=9e9))
        got = yield self.store.greylist_get(NET, long, long)
        self.assertEqual(len(got.sender), state.MAX_FIELD)

    @defer.inlineCallbacks
    def test_sql_metacharacters_are_data(self):
        nasty = "a'); DROP TABLE greylist; --@ext.test"
        yield self.store.greylist_put(GreylistEntry(NET, nasty, nasty, 1.0, 1.0, expires=9e9))
        got = yield self.store.greylist_get(NET, nasty, nasty)
        self.assertEqual(got.sender, nasty)


class ExpiryTests(StoreTestBase):

    @defer.inlineCallbacks
    def test_expire_deletes_only_past_entries(self):
        yield self.store.greylist_put(entry(0, expires=1500.0))
        yield self.store.greylist_put(entry(1, expires=2500.0))
        yield self.store.greylist_whitelist(NET, "w@ext.test", "b@example.test", 1000, 1800)
        deleted = yield self.store.greylist_expire(2000.0)
        self.assertEqual(deleted, 2)
        left = yield self.store.greylist_list()
        self.assertEqual([e.sender for e in left], ["s1@ext.test"])

    @defer.inlineCallbacks
    def test_periodic_sweep_on_the_clock(self):
        yield self.store.greylist_put(entry(0, expires=1500.0))
        yield self.store.greylist_put(entry(1, expires=1000.0 + 2 * state.EXPIRE_EVERY + 1))
        self.reactor.clock.advance(state.EXPIRE_EVERY)     # now 1600: the first expires
        yield self.store._query(lambda conn: None)         # the sweep's query ran before
        self.assertEqual((yield self.store.greylist_count()), 1)
        self.reactor.clock.advance(state.EXPIRE_EVERY)
        yield self.store._query(lambda conn: None)
        self.assertEqual((yield self.store.greylist_count()), 1)
        self.reactor.clock.advance(state.EXPIRE_EVERY)
        yield self.store._query(lambda conn: None)
        self.assertEqual((yield self.store.greylist_count()), 0)

    @defer.inlineCallbacks
    def test_sweep_stops_with_the_store(self):
        yield self.store.close()
        self.assertEqual(self.reactor.clock.getDelayedCalls(), [])

    @defer.inlineCallbacks
    def test_sweeps_do_not_pile_up(self):
        # A sweep still running when the next is due is not doubled.
        gate = threading.Event()
        self.store._query(lambda conn: gate.wait(10))
        first = self.store.expire_now()
        second = self.store.expire_now()
        self.assertEqual(second.result, 0)
        gate.set()
        yield first


class CapTests(StoreTestBase):

    max_entries = 100

    def fill(self, conn, count, start=0, whitelisted=False):
        for n in range(start, start + count):
            wl = 5e9 if whitelisted else 0.0
            state.put_entry(conn, GreylistEntry(NET, f"s{n}@ext.test", "b@example.test",
                                                float(n), float(n), 1, int(whitelisted), wl,
                                                9e9))

    @defer.inlineCallbacks
    def test_many_random_triplets_stay_bounded(self):
        # 20x the cap written through the store: it never holds more than
        # the cap plus the 1% checked between writes.
        for n in range(2000):
            yield self.store.greylist_put(entry(n, first_seen=float(n), expires=9e9))
        count = yield self.store.greylist_count()
        self.assertLessEqual(count, self.max_entries + self.store._cap_every)
        yield self.store.greylist_expire(0)
        self.assertEqual((yield self.store.greylist_count()), self.max_entries)
        # The newest were kept.
        newest = yield self.store.greylist_list(limit=1)
        self.assertEqual(newest[0].sender, "s1999@ext.test")

    @defer.inlineCallbacks
    def test_pending_dropped_before_whitelisted(self):
        # 60 old whitelisted entries, then 80 newer pending ones: 40 must go,
        # all pending (the oldest of them).
        yield self.store._query(self.fill, 60, 0, True)
        yield self.store._query(self.fill, 80, 1000, False)
        deleted = yield self.store.greylist_expire(0)
        self.assertEqual(deleted, 40)
        left = yield self.store.greylist_list()
        self.assertEqual(sum(1 for e in left if e.whitelisted_until), 60)
        self.assertNotIn("s1000@ext.test", {e.sender for e in left})
        self.assertIn("s1079@ext.test", {e.sender for e in left})

    @defer.inlineCallbacks
    def test_whitelisted_dropped_oldest_first_when_only_they_are_left(self):
        yield self.store._query(self.fill, 120, 0, True)
        deleted = yield self.store.greylist_expire(0)
        self.assertEqual(deleted, 20)
        left = {e.sender for e in (yield self.store.greylist_list())}
        self.assertNotIn("s19@ext.test", left)
        self.assertIn("s20@ext.test", left)


class SideBySideTests(StoreTestBase):
    """Another connection (the admin command) writes while the store is open."""

    @defer.inlineCallbacks
    def test_other_connection_sees_and_changes_entries(self):
        yield self.store.greylist_put(entry())
        conn = state.connect(self.path)
        self.addCleanup(conn.close)
        self.assertEqual(state.get_entry(conn, NET, "s0@ext.test", "bob@example.test"),
                         entry())
        state.whitelist_entry(conn, NET, "hand@ext.test", "bob@example.test", 1000, 5000)
        got = yield self.store.greylist_get(NET, "hand@ext.test", "bob@example.test")
        self.assertEqual(got.whitelisted_until, 5000)
        self.assertEqual(state.delete_entry(conn, NET, "s0@ext.test", "bob@example.test"), 1)
        self.assertIsNone((yield self.store.greylist_get(NET, "s0@ext.test",
                                                         "bob@example.test")))


class ServiceTests(unittest.TestCase):
    """The store as the Appliance runs it: a Service on data_dir/state.sqlite3."""

    @defer.inlineCallbacks
    def test_open_store_starts_and_stops_as_a_service(self):
        from mailbox_appliance import config as config_module
        data_dir = tempfile.mkdtemp(prefix="state-svc-")
        self.addCleanup(shutil.rmtree, data_dir, True)
        cfg = config_module.Config(server=config_module.ServerConfig(data_dir=data_dir))
        reactor = ClockedReactor()
        store = state.open_store(cfg, reactor)
        self.assertEqual(store.path, os.path.join(data_dir, "state.sqlite3"))
        store.startService()
        yield store.greylist_put(entry())
        self.assertEqual((yield store.greylist_count()), 1)
        yield store.stopService()
        self.assertFalse(store.running)
        self.assertEqual(reactor.clock.getDelayedCalls(), [])
        # Reloaded intact after a stop (SIGTERM).
        store.startService()
        self.addCleanup(store.stopService)
        self.assertEqual((yield store.greylist_count()), 1)
