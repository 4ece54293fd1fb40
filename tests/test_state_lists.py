"""The list server's tables in the state database (``state_lists``, ``IListStore``)."""

import os
import sqlite3
import tempfile

from twisted.internet import defer, reactor
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from mailbox_appliance import state, state_lists as sl
from mailbox_appliance.state_lists import ListError

LIST = "team@lists.example.test"
TOKEN = bytes(range(32))


class TablesCase(unittest.TestCase):

    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="lists-")
        self.addCleanup(lambda: __import__("shutil").rmtree(self.dir, True))
        self.conn = state.connect(os.path.join(self.dir, state.FILENAME))
        self.addCleanup(self.conn.close)

    def tx(self, fn, *args, **kw):
        return state.in_transaction(self.conn, fn, *args, **kw)


class ListTests(TablesCase):

    def test_create_get_and_list(self):
        ml = self.tx(sl.create_list, "Team@Lists.Example.Test", subject="Our team",
                     settings={"subject_tag": "[team]"}, now=100.0)
        self.assertEqual((ml.address, ml.name, ml.domain, ml.subject, ml.settings, ml.created),
                         (LIST, "team", "lists.example.test", "Our team",
                          {"subject_tag": "[team]"}, 100.0))
        self.assertEqual(self.tx(sl.get_list, "TEAM@lists.example.test"), ml)
        self.tx(sl.create_list, "other@else.test")
        self.assertEqual([m.address for m in self.tx(sl.all_lists)],
                         ["other@else.test", LIST])
        self.assertEqual([m.address for m in self.tx(sl.all_lists, "lists.example.test")],
                         [LIST])

    def test_names_refused(self):
        for bad in ("team-request@x.test", "listmaster@x.test", "lists@x.test",
                    "-team@x.test", "Tëam@x.test", "team@localhost", "a" * 51 + "@x.test",
                    "te am@x.test", "team-bounces@x.test", "team-confirm@x.test"):
            with self.assertRaises(ListError, msg=bad):
                self.tx(sl.create_list, bad)
        # The robot's configured name is reserved too.
        with self.assertRaises(ListError):
            self.tx(sl.create_list, "robot@x.test", robot="robot")
        self.assertEqual(self.tx(sl.all_lists), [])

    def test_duplicate_refused(self):
        self.tx(sl.create_list, LIST)
        with self.assertRaises(ListError) as e:
            self.tx(sl.create_list, LIST.upper())
        self.assertIn("already exists", str(e.exception))

    def test_update_and_post_sequence(self):
        self.tx(sl.create_list, LIST)
        ml = self.tx(sl.update_list, LIST, subject="New\x00 subject\r\n",
                     settings={"send": "private"})
        self.assertEqual((ml.subject, ml.settings), ("New subject", {"send": "private"}))
        self.assertEqual([self.tx(sl.next_post, LIST) for _ in range(3)], [1, 2, 3])
        with self.assertRaises(ListError):
            self.tx(sl.update_list, LIST, settings={"x": "y" * sl.MAX_SETTINGS})

    def test_delete_takes_everything_with_it(self):
        self.tx(sl.create_list, LIST)
        self.tx(sl.add_member, LIST, "ann@example.test")
        self.tx(sl.add_role, LIST, "own@example.test", "owner")
        self.tx(sl.hold, LIST, "post", TOKEN, expires=10)
        self.tx(sl.remember_post, LIST, "<p@x>", 1.0)
        self.assertEqual(self.tx(sl.delete_list, LIST), 1)
        self.assertEqual(self.tx(sl.delete_list, LIST), 0)
        for table in ("list_members", "list_roles", "list_held", "list_posts_seen"):
            self.assertEqual(self.conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0],
                             0, table)

    def test_posts_seen(self):
        self.tx(sl.create_list, LIST)
        self.assertFalse(self.tx(sl.post_seen, LIST, "<a@x>", 0.0))
        self.tx(sl.remember_post, LIST, "<a@x>", 100.0)
        self.assertTrue(self.tx(sl.post_seen, LIST, "<a@x>", 99.0))
        self.assertFalse(self.tx(sl.post_seen, LIST, "<a@x>", 100.0))   # too old
        self.assertFalse(self.tx(sl.post_seen, "other@lists.example.test", "<a@x>", 0.0))
        self.tx(sl.remember_post, LIST, "<a@x>", 200.0)                 # seen again
        self.tx(sl.remember_post, LIST, "<b@x>", 150.0)
        self.assertEqual(self.tx(sl.forget_posts, 160.0), 1)
        self.assertEqual([r[0] for r in self.conn.execute(
            "SELECT message_id FROM list_posts_seen")], ["<a@x>"])

    def test_no_such_list(self):
        for fn, args in ((sl.add_member, ("a@b.test",)), (sl.members, ()),
                         (sl.add_role, ("a@b.test", "owner")), (sl.next_post, ())):
            with self.assertRaises(ListError):
                self.tx(fn, "nope@x.test", *args)
        self.assertIsNone(self.tx(sl.get_member, "nope@x.test", "a@b.test"))
        self.assertFalse(self.tx(sl.has_role, "nope@x.test", "a@b.test", "owner"))


class MemberTests(TablesCase):

    def setUp(self):
        super().setUp()
        self.tx(sl.create_list, LIST)

    def test_add_once_and_remove(self):
        self.assertTrue(self.tx(sl.add_member, LIST, "Ann@Example.Test", "Ann Smith", now=5))
        self.assertFalse(self.tx(sl.add_member, LIST, "ann@example.test"))
        m = self.tx(sl.get_member, LIST, "ANN@example.test")
        self.assertEqual((m.address, m.name, m.mode, m.joined), ("ann@example.test",
                                                                 "Ann Smith", "mail", 5))
        self.assertEqual(self.tx(sl.count_members, LIST), 1)
        self.assertTrue(self.tx(sl.remove_member, LIST, "ann@EXAMPLE.test"))
        self.assertFalse(self.tx(sl.remove_member, LIST, "ann@example.test"))
        self.assertEqual(self.tx(sl.count_members, LIST), 0)

    def test_injection_is_data(self):
        for bad in ("x@y.test\r\nBcc: all@evil.test", "'; DROP TABLE lists; --@x.test",
                    "a@b", "", "a" * 250 + "@b.test", None):
            with self.assertRaises(ListError, msg=repr(bad)):
                self.tx(sl.add_member, LIST, bad)
        self.tx(sl.add_member, LIST, "o'brien@example.test", "Robert'); DROP TABLE lists;--")
        m = self.tx(sl.get_member, LIST, "o'brien@example.test")
        self.assertEqual(m.name, "Robert'); DROP TABLE lists;--")
        self.assertIsNotNone(self.tx(sl.get_list, LIST))
        # Control characters never reach a stored name (it ends in headers).
        self.tx(sl.add_member, LIST, "cc@example.test", "Eve\r\nBcc: x@y.test")
        self.assertEqual(self.tx(sl.get_member, LIST, "cc@example.test").name,
                         "EveBcc: x@y.test")

    def test_pages_in_address_order(self):
        for n in range(25):
            self.tx(sl.add_member, LIST, f"m{n:02d}@example.test")
        seen, after = [], ""
        while True:
            page = self.tx(sl.members, LIST, limit=10, after=after)
            if not page:
                break
            seen += [m.address for m in page]
            after = page[-1].address
        self.assertEqual(seen, [f"m{n:02d}@example.test" for n in range(25)])

    def test_set_member(self):
        self.tx(sl.add_member, LIST, "ann@example.test")
        self.assertTrue(self.tx(sl.set_member, LIST, "ann@example.test", mode="nomail",
                                bounce_score=2.5, last_bounce=7, disabled_since=9,
                                concealed=True))
        m = self.tx(sl.get_member, LIST, "ann@example.test")
        self.assertEqual((m.mode, m.bounce_score, m.last_bounce, m.disabled_since, m.concealed),
                         ("nomail", 2.5, 7, 9, 1))
        # Every reception mode the SET command knows can be stored.
        from mailbox_appliance.lists.commands import MODES
        for mode in set(MODES.values()) - {"conceal", "noconceal"}:
            self.assertTrue(self.tx(sl.set_member, LIST, "ann@example.test", mode=mode))
        with self.assertRaises(ListError):
            self.tx(sl.set_member, LIST, "ann@example.test", mode="everything")
        self.assertFalse(self.tx(sl.set_member, LIST, "bob@example.test", mode="mail"))

    def test_member_cap(self):
        self.patch(sl, "MAX_MEMBERS", 2)
        self.tx(sl.add_member, LIST, "a@example.test")
        self.tx(sl.add_member, LIST, "b@example.test")
        with self.assertRaises(ListError):
            self.tx(sl.add_member, LIST, "c@example.test")


class RoleTests(TablesCase):

    def test_owners_and_moderators(self):
        self.tx(sl.create_list, LIST)
        self.assertTrue(self.tx(sl.add_role, LIST, "Own@Example.Test", "owner", "The Owner"))
        self.assertFalse(self.tx(sl.add_role, LIST, "own@example.test", "owner"))
        self.tx(sl.add_role, LIST, "mod@example.test", "moderator")
        self.assertEqual(self.tx(sl.role_holders, LIST, "owner"),
                         [("own@example.test", "The Owner")])
        self.assertTrue(self.tx(sl.has_role, LIST, "OWN@example.test", "owner"))
        self.assertFalse(self.tx(sl.has_role, LIST, "own@example.test", "moderator"))
        with self.assertRaises(ListError):
            self.tx(sl.add_role, LIST, "x@example.test", "listmaster")
        self.assertTrue(self.tx(sl.remove_role, LIST, "mod@example.test", "moderator"))
        self.assertEqual(self.tx(sl.role_holders, LIST, "moderator"), [])


class HeldTests(TablesCase):

    def setUp(self):
        super().setUp()
        self.tx(sl.create_list, LIST)

    def test_hold_find_and_settle_once(self):
        h = self.tx(sl.hold, LIST, "moderation", TOKEN, expires=1000, now=10,
                    requester="ann@example.test", subject="Hello", message=b"the post")
        self.assertEqual((h.list_address, h.kind, h.requester, h.subject, h.handled_at),
                         (LIST, "moderation", "ann@example.test", "Hello", 0))
        self.assertEqual(self.tx(sl.find_held, TOKEN, 20), h)
        self.assertEqual(self.tx(sl.held_message, h.id), b"the post")
        self.assertEqual(self.tx(sl.held_waiting, LIST), [h])
        self.assertTrue(self.tx(sl.settle_held, h.id, "mod@example.test", 30))
        # The second moderator is told it was already handled, and by whom.
        self.assertFalse(self.tx(sl.settle_held, h.id, "other@example.test", 31))
        again = self.tx(sl.find_held, TOKEN, 40)
        self.assertEqual((again.handled_by, again.handled_at), ("mod@example.test", 30))
        self.assertIsNone(self.tx(sl.held_message, h.id))      # not kept once handled
        self.assertEqual(self.tx(sl.held_waiting, LIST), [])

    def test_unknown_and_expired_tokens(self):
        self.tx(sl.hold, LIST, "request", TOKEN, expires=100, now=0, action="subscribe")
        self.assertIsNone(self.tx(sl.find_held, bytes(32), 50))
        self.assertIsNone(self.tx(sl.find_held, TOKEN, 100))

    def test_expiry(self):
        a = self.tx(sl.hold, LIST, "post", TOKEN, expires=100, now=0, requester="a@x.test")
        b = self.tx(sl.hold, LIST, "post", bytes(range(1, 33)), expires=500, now=0)
        self.tx(sl.settle_held, b.id, "mod@x.test", 200)
        self.assertEqual(self.tx(sl.expire_held, 150, keep_handled=1000), [a])
        self.assertEqual(self.tx(sl.expire_held, 1300, keep_handled=1000), [])
        self.assertEqual(self.conn.execute("SELECT count(*) FROM list_held").fetchone()[0], 0)

    def test_bounds(self):
        with self.assertRaises(ListError):
            self.tx(sl.hold, LIST, "post", b"short", expires=1)
        with self.assertRaises(ListError):
            self.tx(sl.hold, LIST, "gift", TOKEN, expires=1)
        with self.assertRaises(sqlite3.IntegrityError):
            self.tx(sl.hold, LIST, "post", TOKEN, expires=1)
            self.tx(sl.hold, LIST, "post", TOKEN, expires=1)
        self.patch(sl, "MAX_HELD_BYTES", 10)
        with self.assertRaises(ListError):
            self.tx(sl.hold, LIST, "post", bytes(range(3, 35)), expires=1, message=b"x" * 11)
        self.patch(sl, "MAX_HELD_BYTES", 1000)
        self.patch(sl, "MAX_ALL_HELD_BYTES", 10)
        with self.assertRaises(ListError):
            self.tx(sl.hold, LIST, "post", bytes(range(3, 35)), expires=1, message=b"x" * 11)
        self.patch(sl, "MAX_HELD", 1)
        with self.assertRaises(ListError):
            self.tx(sl.hold, LIST, "post", bytes(range(2, 34)), expires=1)


class SchemaTests(TablesCase):

    def test_an_older_file_gets_the_tables_and_keeps_its_rows(self):
        path = os.path.join(self.dir, "old.sqlite3")
        old = sqlite3.connect(path)
        old.executescript(state._SCHEMA)
        old.execute("INSERT INTO greylist VALUES ('192.0.2.0/24','a@x.test','b@y.test',"
                    "1,1,1,0,0,99)")
        old.execute("PRAGMA user_version=1")
        # (a file of schema 2 had the list tables but not list_posts_seen: the same path)
        old.commit()
        old.close()
        conn = state.connect(path)
        self.addCleanup(conn.close)
        self.assertEqual(conn.execute("PRAGMA user_version").fetchone()[0],
                         state.SCHEMA_VERSION)
        self.assertEqual(state.count_entries(conn), 1)
        state.in_transaction(conn, sl.create_list, LIST)
        self.assertEqual(len(state.in_transaction(conn, sl.all_lists)), 1)


class StoreTests(unittest.TestCase):
    """The running appliance's store: the same operations, off the reactor thread."""

    @defer.inlineCallbacks
    def test_operations_through_the_store(self):
        path = os.path.join(tempfile.mkdtemp(prefix="lists-"), state.FILENAME)
        store = state.SQLiteStateStore(path, reactor)
        verifyObject(state.IListStore, store)
        yield store.open()
        self.addCleanup(store.close)
        ml = yield store.create_list(LIST, subject="Team", now=1.0)
        self.assertEqual(ml.address, LIST)
        self.assertTrue((yield store.add_member(LIST, "ann@example.test", name="Ann")))
        self.assertEqual((yield store.count_members(LIST)), 1)
        with self.assertRaises(ListError):
            yield store.create_list(LIST)
        self.assertEqual([m.address for m in (yield store.members(LIST))],
                         ["ann@example.test"])
