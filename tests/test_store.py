"""The store: folder names, the UID index and its crash safety, Maildir
interoperability (files by Dovecot/mutt), messages (read, append, flags,
expunge, copy, move), change notification, folders and subscriptions.

Most tests run the store's blocking work inline (``run_inline``) so they are
synchronous; a few run it in real threads.
"""

import errno
import os
import time

from twisted.internet import defer, reactor, threads
from twisted.trial import unittest

from mailbox_appliance import durable
from mailbox_appliance.store import index as index_mod
from mailbox_appliance.store import mailbox as mailbox_mod
from mailbox_appliance.store import names
from mailbox_appliance.store import (Changes, FolderExists, FolderHasChildren, FolderNameError,
                                     MailStore, Mailbox, NoSuchFolder, NoSuchMessage, StoreError,
                                     StoreUnavailable, run_inline)
from mailbox_appliance.store.index import INDEX_NAME, IndexFile
from mailbox_appliance.store.interfaces import IMailbox, IMailStore, IUserStore

MSG = b"From: a@ext.test\r\nSubject: hi\r\n\r\nHello.\r\nline two\r\n"
OLD = 1_600_000_000


# --- names -------------------------------------------------------------------

class ModifiedUTF7Tests(unittest.TestCase):

    def test_round_trips(self):
        cases = {
            "Entwürfe": "Entw&APw-rfe",
            "&": "&-",
            "Tom & Jerry": "Tom &- Jerry",
            "~peter/mail/台北/日本語": "~peter/mail/&U,BTFw-/&ZeVnLIqe-",   # RFC 3501 example
            "Brouillons é": "Brouillons &AOk-",
            "📧 mail": "&2D3c5w- mail",                                       # a surrogate pair
            "plain": "plain",
            "": "",
        }
        for text, wire in cases.items():
            self.assertEqual(names.encode_mutf7(text), wire, text)
            self.assertEqual(names.decode_mutf7(wire), text, wire)

    def test_refuses_non_canonical_and_broken_forms(self):
        for wire in ["Entwürfe",            # raw 8-bit
                     "&U,BTFw",             # unterminated
                     "&AGE-",               # an encoded printable ASCII "a"
                     "&U,BTFw-&ZeVnLIqe-",  # two adjacent encoded runs
                     "&2D0-",               # a lone high surrogate
                     "&AA-",                # odd number of bytes
                     "&A/Q-",               # '/' is not in the modified alphabet
                     "a\tb"]:
            with self.assertRaises(FolderNameError, msg=wire):
                names.decode_mutf7(wire)

    def test_nonzero_pad_bits_refused(self):
        self.assertEqual(names.encode_mutf7("ü"), "&APw-")
        with self.assertRaises(FolderNameError):
            names.decode_mutf7("&APx-")     # same bytes, different padding bits

    def test_wire_helpers(self):
        self.assertEqual(names.from_wire("Entw&APw-rfe"), "Entwürfe")
        self.assertEqual(names.from_wire("inbox"), "INBOX")
        self.assertEqual(names.to_wire("Entwürfe.Alt"), "Entw&APw-rfe.Alt")


class FolderNameTests(unittest.TestCase):

    def test_refusals(self):
        for bad in ["", ".", "..", ".hidden", "trailing.", "a..b", "a/b", "../etc", "a\x00b",
                    "a\nb", "a\x7fb", "/abs", "a.", "x" * 300, "ü" * 100, "\ud800"]:
            with self.assertRaises(FolderNameError, msg=repr(bad)):
                names.normalize(bad)

    def test_length_limit_counts_encoded_bytes(self):
        names.normalize("x" * names.MAX_NAME_BYTES)
        with self.assertRaises(FolderNameError):
            names.normalize("x" * (names.MAX_NAME_BYTES + 1))
        # "ü" takes 5 bytes alone ("&APw-"), 8 bytes per 3 in a run.
        names.normalize("ü" * 94)
        with self.assertRaises(FolderNameError):
            names.normalize("ü" * 96)

    def test_wildcards_only_refused_when_creating(self):
        self.assertEqual(names.normalize("50%"), "50%")
        for bad in ["50%", "a*"]:
            with self.assertRaises(FolderNameError):
                names.normalize(bad, creating=True)

    def test_inbox_is_case_insensitive(self):
        self.assertEqual(names.normalize("inbox"), "INBOX")
        self.assertEqual(names.normalize("InBoX.Sub"), "INBOX.Sub")
        self.assertEqual(names.normalize("Inboxes"), "Inboxes")

    def test_paths_stay_inside_the_maildir(self):
        md = "/srv/mail/example.test/alice/Maildir"
        self.assertEqual(names.folder_path(md, "inbox"), md)
        self.assertEqual(names.folder_path(md, "Sent"), md + "/.Sent")
        self.assertEqual(names.folder_path(md, "a.b"), md + "/.a.b")
        self.assertEqual(names.folder_path(md, "Entwürfe"), md + "/.Entw&APw-rfe")
        for bad in ["..", "../x", "a/../../b", "...", ".x/y"]:
            with self.assertRaises(FolderNameError):
                names.folder_path(md, bad)

    def test_names_of_directory_entries(self):
        self.assertEqual(names.name_from_dirname(".Sent"), "Sent")
        self.assertEqual(names.name_from_dirname(".Entw&APw-rfe"), "Entwürfe")
        self.assertEqual(names.name_from_dirname(".INBOX.x"), "INBOX.x")
        for entry in [".", "..", "cur", ".a..b", ".inbox.x", ".Entwürfe", ".&AGE-", "..x"]:
            self.assertIsNone(names.name_from_dirname(entry), entry)

    def test_list_patterns(self):
        folders = ["INBOX", "INBOX.x", "a", "a.b", "a.b.c", "ab"]

        def m(p):
            match = names.pattern_matcher(p)
            return [f for f in folders if match(f)]
        self.assertEqual(m("*"), folders)
        self.assertEqual(m("%"), ["INBOX", "a", "ab"])
        self.assertEqual(m("a.%"), ["a.b"])
        self.assertEqual(m("a*"), ["a", "a.b", "a.b.c", "ab"])
        self.assertEqual(m("inbox"), ["INBOX"])
        self.assertEqual(m("Inbox.*"), ["INBOX.x"])
        self.assertEqual(m("a.b"), ["a.b"])


# --- helpers -------------------------------------------------------------------

class StoreTestCase(unittest.TestCase):

    timeout = 30

    def setUp(self):
        self.root = os.path.abspath(self.mktemp())
        os.makedirs(self.root)
        self.store = self.new_store()
        self.user = self.store.open_user("Example.test", "Alice")
        self.maildir = os.path.join(self.root, "example.test", "alice", "Maildir")

    def new_store(self):
        """Another MailStore on the same disk: what a restart (or a second
        process) sees."""
        return MailStore(None, self.root, hostname="test.host", run_in_thread=run_inline)

    def ok(self, d):
        return self.successResultOf(d)

    def inbox(self, store=None):
        user = (store or self.store).open_user("example.test", "alice")
        return self.ok(user.mailbox("INBOX"))

    def folder(self, name, store=None):
        user = (store or self.store).open_user("example.test", "alice")
        return self.ok(user.mailbox(name))

    def drop(self, folder, sub, name, data=MSG, mtime=None):
        """A file written into the Maildir by another program."""
        path = os.path.join(folder, sub, name)
        with open(path, "wb") as f:
            f.write(data)
        if mtime is not None:
            os.utime(path, (mtime, mtime))
        return path

    def entries(self, folder, sub):
        return sorted(os.listdir(os.path.join(folder, sub)))

    def index_text(self, folder):
        with open(os.path.join(folder, INDEX_NAME), encoding="utf-8") as f:
            return f.read()

    def age_dirs(self, folder):
        """Move new/ and cur/ times into the past, so change checks trust them."""
        for sub in ("new", "cur"):
            os.utime(os.path.join(folder, sub), (OLD, OLD))


# --- the index -------------------------------------------------------------------

class IndexPersistenceTests(StoreTestCase):

    def test_same_uidvalidity_and_uids_after_restart(self):
        box = self.inbox()
        uids = [self.ok(box.append(MSG + b"%d" % i)) for i in range(3)]
        self.assertEqual(uids, [1, 2, 3])
        self.drop(box.path, "new", "1700000001.ext.host", mtime=OLD)
        self.ok(box.sync())
        before = (box.uidvalidity, list(box.uids), [m.size for m in box.messages])

        again = self.inbox(self.new_store())
        self.assertIsNot(again, box)
        self.assertEqual((again.uidvalidity, list(again.uids), [m.size for m in again.messages]),
                         before)
        self.assertEqual(again.uidnext, 5)
        self.assertEqual(self.ok(again.append(MSG)), 5)

    def test_index_format(self):
        box = self.inbox()
        uid = self.ok(box.append(MSG, ["\\Seen"], internaldate=OLD + 0.7))
        text = self.index_text(box.path)
        header, line = text.splitlines()
        self.assertEqual(header, f"MAILBOX_APPLIANCE_INDEX 1 {box.uidvalidity} 1")
        u, date, size, base = line.split(" ", 3)
        self.assertEqual((int(u), int(date), int(size)), (uid, OLD, len(MSG)))
        [name] = self.entries(box.path, "cur")
        self.assertEqual(name, base + ":2,S")

    def test_uids_never_reused_after_expunge_and_restart(self):
        box = self.inbox()
        for _ in range(3):
            self.ok(box.append(MSG))
        self.ok(box.set_flags([2, 3], ["\\Deleted"]))
        self.assertEqual(self.ok(box.expunge()), [2, 3])
        again = self.inbox(self.new_store())
        self.assertEqual(list(again.uids), [1])
        self.assertEqual(again.uidnext, 4)
        self.assertEqual(self.ok(again.append(MSG)), 4)

    def test_uidnext_survives_compaction_of_an_emptied_folder(self):
        self.patch(mailbox_mod, "COMPACT_MIN_DEAD", 5)
        box = self.inbox()
        for _ in range(20):
            self.ok(box.append(MSG))
        self.ok(box.remove(list(box.uids)))
        self.assertEqual(self.index_text(box.path).splitlines(),
                         [f"MAILBOX_APPLIANCE_INDEX 1 {box.uidvalidity} 21"])
        again = self.inbox(self.new_store())
        self.assertEqual((len(again), again.uidnext), (0, 21))
        self.assertEqual(self.ok(again.append(MSG)), 21)

    def test_compaction_keeps_live_messages(self):
        self.patch(mailbox_mod, "COMPACT_MIN_DEAD", 5)
        box = self.inbox()
        for _ in range(30):
            self.ok(box.append(MSG))
        self.ok(box.remove(range(1, 21)))
        lines = self.index_text(box.path).splitlines()
        self.assertEqual(len(lines), 11)
        again = self.inbox(self.new_store())
        self.assertEqual(list(again.uids), list(range(21, 31)))
        self.assertEqual(again.uidnext, 31)

    def test_file_that_comes_back_after_expunge_gets_a_new_uid(self):
        box = self.inbox()
        self.drop(box.path, "cur", "1700000000.back.host:2,S", mtime=OLD)
        self.ok(box.sync())
        self.assertEqual(list(box.uids), [1])
        self.ok(box.remove([1]))
        # Restored from a backup, or delivered again under the same name.
        self.drop(box.path, "cur", "1700000000.back.host:2,S", mtime=OLD)
        again = self.inbox(self.new_store())
        self.assertEqual(list(again.uids), [2])


class IndexCrashTests(StoreTestCase):

    def test_file_renamed_into_cur_without_index_line_gets_the_next_uid(self):
        """A crash after append's rename into cur/ and before the index line:
        the file is picked up with the next UID, never an old one."""
        box = self.inbox()
        for _ in range(3):
            self.ok(box.append(MSG))
        self.ok(box.remove([3]))
        self.drop(box.path, "cur", "1700000009.M1P2Q3.test.host,S=10,W=12:2,S")
        again = self.inbox(self.new_store())
        self.assertEqual(list(again.uids), [1, 2, 4])
        self.assertEqual(again.flags(4), {"\\Seen"})
        self.assertEqual(again.uidnext, 5)

    def test_torn_last_line_is_ignored_and_its_uid_skipped(self):
        box = self.inbox()
        self.ok(box.append(MSG))
        with open(os.path.join(box.path, INDEX_NAME), "ab") as f:
            f.write(b"2 1700000000 4")          # crash in the middle of an append
        again = self.inbox(self.new_store())
        self.assertEqual((again.uidvalidity, list(again.uids)), (box.uidvalidity, [1]))
        self.assertEqual(self.ok(again.append(MSG)), 3)
        text = self.index_text(box.path)
        self.assertNotIn("1700000000 4", text)      # cut off before appending
        self.assertEqual([ln.split()[0] for ln in text.splitlines()[1:]], ["1", "3"])
        self.assertEqual(list(self.inbox(self.new_store()).uids), [1, 3])

    def test_corrupt_index_gives_a_new_larger_uidvalidity(self):
        box = self.inbox()
        for _ in range(3):
            self.ok(box.append(MSG))
        old = box.uidvalidity
        path = os.path.join(box.path, INDEX_NAME)
        with open(path, "r+b") as f:
            data = f.read()
            f.seek(data.index(b"\n") + 1)
            f.write(b"garbage!")
        again = self.inbox(self.new_store())
        self.assertGreater(again.uidvalidity, old)
        self.assertEqual(list(again.uids), [1, 2, 3])
        self.assertEqual(self.inbox(self.new_store()).uidvalidity, again.uidvalidity)

    def test_unreadable_header_gives_a_new_larger_uidvalidity(self):
        box = self.inbox()
        self.ok(box.append(MSG))
        old = box.uidvalidity
        with open(os.path.join(box.path, INDEX_NAME), "wb") as f:
            f.write(b"\x00\x00\x00")
        self.assertGreater(self.inbox(self.new_store()).uidvalidity, old)

    def test_lost_index_gives_a_new_larger_uidvalidity_even_in_the_same_second(self):
        box = self.inbox()
        self.ok(box.append(MSG))
        seen = [box.uidvalidity]
        for _ in range(3):
            os.unlink(os.path.join(box.path, INDEX_NAME))
            again = self.inbox(self.new_store())
            self.assertGreater(again.uidvalidity, seen[-1])
            seen.append(again.uidvalidity)
            self.assertEqual(list(again.uids), [1])

    def test_index_removed_while_open_is_written_again_from_memory(self):
        box = self.inbox()
        for _ in range(2):
            self.ok(box.append(MSG))
        uv = box.uidvalidity
        os.unlink(os.path.join(box.path, INDEX_NAME))
        self.ok(box.sync())
        self.assertEqual((box.uidvalidity, list(box.uids)), (uv, [1, 2]))
        self.assertEqual(self.ok(box.append(MSG)), 3)
        again = self.inbox(self.new_store())
        self.assertEqual((again.uidvalidity, list(again.uids)), (uv, [1, 2, 3]))

    def test_uid_line_is_durable_before_append_answers(self):
        box = self.inbox()
        synced = []
        real_fsync = os.fsync

        def fsync(fd):
            synced.append(os.readlink(f"/proc/self/fd/{fd}"))
            return real_fsync(fd)
        self.patch(os, "fsync", fsync)
        self.patch(durable, "fsync_dir", lambda p: synced.append(p + "/"))
        uid = self.ok(box.append(MSG))
        index = os.path.join(box.path, INDEX_NAME)
        self.assertIn(f"\n{uid} ", self.index_text(box.path))
        cur = os.path.join(box.path, "cur") + "/"
        # message file, then cur/ (the rename), then the index line.
        self.assertEqual(synced[-2:], [cur, index])
        self.assertTrue(synced[0].startswith(os.path.join(box.path, "tmp")))

    def test_failed_append_leaves_nothing(self):
        box = self.inbox()

        def full(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        self.patch(durable, "fsync_dir", full)
        f = self.failureResultOf(box.append(MSG), StoreUnavailable)
        self.assertEqual(f.value.errno, errno.ENOSPC)
        self.assertEqual(self.entries(box.path, "cur"), [])
        self.assertEqual(self.entries(box.path, "tmp"), [])
        self.assertEqual(len(box), 0)
        self.assertEqual(len(self.index_text(box.path).splitlines()), 1)

    def test_two_processes_never_hand_out_the_same_uid(self):
        a = self.inbox()
        b = self.inbox(self.new_store())
        self.assertIsNot(a, b)
        heard = []
        a.add_listener(heard.append)
        got = []
        for i in range(6):
            got.append(self.ok((a if i % 2 else b).append(MSG)))
        self.assertEqual(got, [1, 2, 3, 4, 5, 6])
        self.assertEqual(sorted(u for c in heard for u in c.new), [1, 2, 3, 4, 5, 6])
        self.ok(b.sync())
        self.assertEqual(list(a.uids), [1, 2, 3, 4, 5, 6])
        self.assertEqual(list(b.uids), [1, 2, 3, 4, 5, 6])

    def test_torn_tail_uid_is_skipped(self):
        box = self.inbox()
        path = os.path.join(box.path, INDEX_NAME)
        with open(path, "ab") as f:
            f.write(b"7 17")
        loaded = IndexFile(path).load()
        self.assertEqual((loaded.uids, loaded.uidnext), ([], 8))   # its UID is skipped
        with open(path, "ab") as f:
            f.write(b"00 5 x")
        self.assertEqual(IndexFile(path).load().uidnext, 8)
        with open(path, "ab") as f:
            f.write(b"\n")
        loaded = IndexFile(path).load()
        self.assertEqual((loaded.uids, loaded.bases, loaded.uidnext), ([7], ["x"], 8))


class IndexFileTests(unittest.TestCase):

    def write(self, text):
        path = os.path.join(os.path.abspath(self.mktemp()))
        os.makedirs(path)
        path = os.path.join(path, INDEX_NAME)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        return IndexFile(path)

    def test_expunge_lines_and_last_record_per_file_name(self):
        idx = self.write("MAILBOX_APPLIANCE_INDEX 1 77 3\n"
                         "1 100 10 a\n2 200 20 b b\n3 300 30 c\n"
                         "- 1\n"
                         "5 500 50 c\n")
        got = idx.load()
        self.assertEqual((got.uidvalidity, got.uidnext), (77, 6))
        self.assertEqual(got.uids, [2, 5])
        self.assertEqual(got.bases, ["b b", "c"])
        self.assertEqual((got.dates, got.sizes), ([200, 500], [20, 50]))
        self.assertEqual(got.by_base, {"b b": 2, "c": 5})
        self.assertEqual(got.lines, 5)

    def test_unreadable_files(self):
        for text, hint in [("", None), ("garbage\n", None), ("MAILBOX_APPLIANCE_INDEX 1 0 1\n", None),
                           ("MAILBOX_APPLIANCE_INDEX 2 9 1\n", 9),
                           ("MAILBOX_APPLIANCE_INDEX 1 9 1\n2 1 1 a\n1 1 1 b\n", 9),
                           ("MAILBOX_APPLIANCE_INDEX 1 9 1\n1 1 1 a\n1 1 1 b\n", 9),
                           ("MAILBOX_APPLIANCE_INDEX 1 9 1\n1 x 1 a\n", 9),
                           ("MAILBOX_APPLIANCE_INDEX 1 9 1\n1 1 1\n", 9),
                           ("MAILBOX_APPLIANCE_INDEX 1 9 1\n- one\n", 9)]:
            with self.assertRaises(index_mod.IndexCorrupt, msg=text) as cm:
                self.write(text).load()
            self.assertEqual(cm.exception.uidvalidity, hint, text)

    def test_rewrite_is_atomic_and_append_checks_names(self):
        idx = self.write("")
        idx.rewrite(5, 10, [(3, 1, 2, "x y"), (4, 1, 2, "z")])
        self.assertEqual(os.listdir(os.path.dirname(idx.path)), [INDEX_NAME])
        self.assertFalse(idx.changed())
        self.assertRaises(ValueError, idx.append, [(11, 1, 1, "bad\nname")])
        self.assertRaises(ValueError, idx.append, [(11, 1, 1, ".hidden")])
        idx.append([(11, 1, 1, "ok")], [3])
        got = IndexFile(idx.path).load()
        self.assertEqual((got.uids, got.uidnext), ([4, 11], 12))

    def test_uidvalidity_counter(self):
        path = os.path.join(os.path.abspath(self.mktemp()))
        a = index_mod.next_uidvalidity(path)
        self.assertGreaterEqual(a, int(time.time()) - 1)
        b = index_mod.next_uidvalidity(path)
        self.assertGreater(b, a)
        self.assertEqual(index_mod.next_uidvalidity(path, at_least=b + 100), b + 101)
        with open(path, "rb") as f:
            self.assertEqual(f.read(), b"%010d\n" % (b + 101))


# --- Maildir interoperability ----------------------------------------------------

class ExternalChangesTests(StoreTestCase):

    def test_files_of_other_programs_get_uids_in_date_order(self):
        box = self.inbox()
        self.drop(box.path, "new", "1700000300.b.host", mtime=OLD + 300)
        self.drop(box.path, "cur", "1700000100.c.host:2,RS", mtime=OLD + 100)   # mutt
        self.drop(box.path, "new", "1700000200.a.host", mtime=OLD + 100)
        self.drop(box.path, "cur", ".hidden", mtime=OLD)                          # ignored
        changes = self.ok(box.sync())
        self.assertEqual(changes.new, (1, 2, 3))
        order = [box.view.bases[box.position(u)] for u in box.uids]
        self.assertEqual(order, ["1700000100.c.host", "1700000200.a.host", "1700000300.b.host"])
        self.assertEqual(box.flags(1), {"\\Answered", "\\Seen"})
        self.assertEqual(box.info(2).internaldate, float(OLD + 100))
        self.assertEqual(box.pending_recent(), [2, 3])

    def test_delivery_named_sizes_are_trusted_else_counted_once(self):
        box = self.inbox()
        self.drop(box.path, "new", "1.q.mx,S=40,W=999", b"a\nb\n")
        self.drop(box.path, "new", "2.lf.host", b"a\nb\n")
        self.drop(box.path, "new", "3.crlf.host", b"a\r\nb\r\n")
        self.drop(box.path, "new", "4.mixed.host", b"a\r\nb\nc")
        self.ok(box.sync())
        self.assertEqual([m.size for m in box.messages], [999, 6, 6, 7])
        # Sizes are kept in the index: no file is read again for them.
        self.patch(mailbox_mod, "_file_wire_size", lambda p: self.fail("read again"))
        self.assertEqual([m.size for m in self.inbox(self.new_store()).messages],
                         [999, 6, 6, 7])

    def test_flag_change_by_rename_and_deletion_are_seen(self):
        box = self.inbox()
        self.drop(box.path, "cur", "1.a.host:2,", mtime=OLD)
        self.drop(box.path, "cur", "2.b.host:2,S", mtime=OLD + 1)
        self.drop(box.path, "cur", "3.c.host:2,S", mtime=OLD + 2)
        self.ok(box.sync())
        self.age_dirs(box.path)
        self.ok(box.sync(force=True))
        self.assertFalse(box.changed_on_disk())
        cur = os.path.join(box.path, "cur")
        os.rename(os.path.join(cur, "1.a.host:2,"), os.path.join(cur, "1.a.host:2,FS"))
        os.rename(os.path.join(cur, "2.b.host:2,S"), os.path.join(cur, "2.b.host:2,Sa"))
        os.unlink(os.path.join(cur, "3.c.host:2,S"))
        self.assertTrue(box.changed_on_disk())
        changes = self.ok(box.sync())
        self.assertEqual(changes.flags, (1,))       # a keyword letter is not a flag change
        self.assertEqual(changes.expunged, (3,))
        self.assertEqual(box.flags(1), {"\\Flagged", "\\Seen"})
        self.assertEqual(list(box.uids), [1, 2])
        # The expunge is recorded: after a restart 3 stays gone.
        self.assertIn("- 3", self.index_text(box.path))

    def test_a_message_moved_to_cur_by_another_program(self):
        box = self.inbox()
        self.drop(box.path, "new", "1.a.host", mtime=OLD)
        self.ok(box.sync())
        os.rename(os.path.join(box.path, "new", "1.a.host"),
                  os.path.join(box.path, "cur", "1.a.host:2,S"))
        changes = self.ok(box.sync())
        self.assertEqual((changes.new, changes.expunged, changes.flags), ((), (), (1,)))
        self.assertEqual(box.pending_recent(), [])

    def test_only_new_is_read_when_only_new_changed(self):
        box = self.inbox()
        self.drop(box.path, "cur", "1.a.host:2,S", mtime=OLD)
        self.ok(box.sync())
        self.age_dirs(box.path)
        self.ok(box.sync(force=True))
        scanned = []
        real = Mailbox._scan

        def scan(self_, where, out):
            scanned.append(where)
            return real(self_, where, out)
        self.patch(Mailbox, "_scan", scan)
        self.drop(box.path, "new", "2.b.host", mtime=OLD + 5)
        self.assertEqual(self.ok(box.sync()).new, (2,))
        self.assertEqual(scanned, [mailbox_mod.NEW])

    def test_nothing_changed_means_no_scan(self):
        box = self.inbox()
        self.drop(box.path, "cur", "1.a.host:2,S", mtime=OLD)
        self.ok(box.sync())
        self.age_dirs(box.path)
        self.ok(box.sync(force=True))
        self.patch(Mailbox, "_scan", lambda *a: self.fail("scanned"))
        self.assertFalse(self.ok(box.sync()))

    def test_recently_changed_directories_are_looked_at_again(self):
        box = self.inbox()
        self.ok(box.sync())
        # Just written: a change in the same clock tick could hide, so the
        # times are not trusted yet.
        self.assertTrue(box.changed_on_disk())

    def test_folder_written_by_dovecot_is_listed_and_read(self):
        path = os.path.join(self.maildir, ".Entw&APw-rfe")
        for sub in ("cur", "new", "tmp"):
            os.makedirs(os.path.join(path, sub))
        self.drop(path, "cur", "1700000000.M1P1.dove,S=20,W=22:2,DS", b"Subject: x\n\ndraft\n")
        self.ok(self.user.ensure_special_folders())
        listed = [f.name for f in self.ok(self.user.list_folders())]
        self.assertIn("Entwürfe", listed)
        box = self.folder("Entwürfe")
        self.assertEqual(box.flags(1), {"\\Draft", "\\Seen"})
        self.assertEqual(self.ok(box.read(1)), b"Subject: x\r\n\r\ndraft\r\n")

    def test_missing_new_or_cur_is_made_again(self):
        box = self.inbox()
        self.ok(box.append(MSG))
        os.rmdir(os.path.join(box.path, "new"))
        self.ok(box.sync(force=True))
        self.assertTrue(os.path.isdir(os.path.join(box.path, "new")))
        self.assertEqual(list(box.uids), [1])


# --- messages ----------------------------------------------------------------------

class ReadTests(StoreTestCase):

    def test_lf_files_read_as_crlf_and_crlf_files_unchanged(self):
        box = self.inbox()
        self.drop(box.path, "new", "1.lf", b"A: 1\nB: 2\n\nbody\nend\n")
        self.drop(box.path, "new", "2.crlf", b"A: 1\r\n\r\nbody\r\n")
        self.drop(box.path, "new", "3.mixed", b"A: 1\r\nB: 2\n\nx\ry\n")
        self.ok(box.sync())
        self.assertEqual(self.ok(box.read(1)), b"A: 1\r\nB: 2\r\n\r\nbody\r\nend\r\n")
        self.assertEqual(self.ok(box.read(2)), b"A: 1\r\n\r\nbody\r\n")
        self.assertEqual(self.ok(box.read(3)), b"A: 1\r\nB: 2\r\n\r\nx\ry\r\n")
        for m in box.messages:
            self.assertEqual(m.size, len(self.ok(box.read(m.uid))))

    def test_headers(self):
        box = self.inbox()
        self.drop(box.path, "new", "1", b"A: 1\nB: 2\n\nbody\n\nmore\n")
        self.drop(box.path, "new", "2", b"\nno headers\n")
        self.drop(box.path, "new", "3", b"A: only headers\n")
        self.ok(box.sync())
        self.assertEqual(self.ok(box.read_headers(1)), b"A: 1\r\nB: 2\r\n\r\n")
        self.assertEqual(self.ok(box.read_headers(2)), b"\r\n")
        self.assertEqual(self.ok(box.read_headers(3)), b"A: only headers\r\n")

    def test_ranges_across_block_boundaries(self):
        self.patch(mailbox_mod, "READ_CHUNK", 7)
        box = self.inbox()
        data = b"H: v\n\n" + b"".join(b"line %d\r\nx\n" % i for i in range(30)) + b"\r"
        self.drop(box.path, "new", "1", data)
        self.ok(box.sync())
        whole = mailbox_mod.to_crlf(data)
        self.assertEqual(self.ok(box.read(1)), whole)
        self.assertEqual(box.info(1).size, len(whole))
        for start, length in [(0, 5), (3, 40), (6, 7), (100, 1000), (len(whole) - 2, 10),
                              (len(whole) + 5, 3)]:
            self.assertEqual(self.ok(box.read_range(1, start, length)),
                             whole[start:start + length], (start, length))

    def test_cr_lf_split_between_blocks_is_not_doubled(self):
        self.patch(mailbox_mod, "READ_CHUNK", 4)
        box = self.inbox()
        self.drop(box.path, "new", "1", b"abc\r\ndef\n")
        self.ok(box.sync())
        self.assertEqual(self.ok(box.read_range(1, 0, 100)), b"abc\r\ndef\r\n")
        self.assertEqual(box.info(1).size, 10)

    def test_file_renamed_by_another_program_is_found_by_its_base(self):
        box = self.inbox()
        self.drop(box.path, "new", "1.a.host", b"x\n")
        self.ok(box.sync())
        os.rename(os.path.join(box.path, "new", "1.a.host"),
                  os.path.join(box.path, "cur", "1.a.host:2,S"))
        self.assertEqual(self.ok(box.read(1)), b"x\r\n")
        os.unlink(os.path.join(box.path, "cur", "1.a.host:2,S"))
        self.failureResultOf(box.read(1), NoSuchMessage)
        self.failureResultOf(box.read(99), NoSuchMessage)


class AppendTests(StoreTestCase):

    def test_append_stores_lf_with_sizes_in_the_name(self):
        box = self.inbox()
        uid = self.ok(box.append(MSG, ["\\seen", "\\Flagged", "\\Recent"], internaldate=OLD))
        [name] = self.entries(box.path, "cur")
        lf = MSG.replace(b"\r\n", b"\n")
        self.assertRegex(name, r"^\d+\.M\d+P\d+Q\d+\.test\.host,S=%d,W=%d:2,FS$"
                         % (len(lf), len(MSG)))
        path = os.path.join(box.path, "cur", name)
        with open(path, "rb") as f:
            self.assertEqual(f.read(), lf)
        self.assertEqual(os.stat(path).st_mtime, OLD)
        self.assertEqual(box.info(uid), (uid, {"\\Seen", "\\Flagged"}, float(OLD), len(MSG)))
        self.assertEqual(self.ok(box.read(uid)), MSG)
        self.assertEqual(self.entries(box.path, "new"), [])
        self.assertEqual(self.entries(box.path, "tmp"), [])

    def test_append_refuses_keywords(self):
        box = self.inbox()
        self.assertRaises(ValueError, box.append, MSG, ["$Junk"])

    def test_unseen_counts(self):
        box = self.inbox()
        for flags in [["\\Seen"], [], ["\\Seen", "\\Flagged"], []]:
            self.ok(box.append(MSG, flags))
        view = box.view
        self.assertEqual((view.count_without("\\Seen"), view.first_without("\\Seen")), (2, 1))
        self.assertEqual(view.count_without("\\Flagged"), 3)
        self.assertEqual(view.first_without("\\Draft"), 0)
        self.assertEqual(box.view.first_without("\\Recent"), 0)
        self.ok(box.set_flags([2, 4], ["\\Seen"], "add"))
        self.assertEqual((box.view.count_without("\\Seen"), box.view.first_without("\\Seen")),
                         (0, -1))

    def test_a_held_view_does_not_change(self):
        box = self.inbox()
        self.ok(box.append(MSG))
        view = box.view
        self.ok(box.append(MSG))
        self.ok(box.set_flags([1], ["\\Seen"]))
        self.assertEqual((list(view.uids), view.flags(1)), ([1], frozenset()))
        self.assertEqual((list(box.uids), box.flags(1)), ([1, 2], {"\\Seen"}))
        self.assertEqual((view.position(1), view.position(2), box.position(2)), (0, -1, 1))


class FlagTests(StoreTestCase):

    def test_modes_and_file_names(self):
        box = self.inbox()
        self.drop(box.path, "cur", "1.a.host:2,Pa", mtime=OLD)    # passed + a keyword letter
        self.ok(box.sync())
        self.assertEqual(self.ok(box.set_flags([1], ["\\Seen", "\\Answered"], "add")),
                         {1: {"\\Seen", "\\Answered"}})
        self.assertEqual(self.entries(box.path, "cur"), ["1.a.host:2,PRSa"])
        self.ok(box.set_flags([1], ["\\seen"], "remove"))
        self.assertEqual(self.entries(box.path, "cur"), ["1.a.host:2,PRa"])
        self.ok(box.set_flags([1], ["\\Deleted", "\\Draft", "\\Flagged"], "set"))
        self.assertEqual(self.entries(box.path, "cur"), ["1.a.host:2,DFPTa"])
        self.assertEqual(box.flags(1), {"\\Deleted", "\\Draft", "\\Flagged"})
        self.assertEqual(self.ok(box.set_flags([1, 42], [], "set")), {1: frozenset()})
        self.assertEqual(self.entries(box.path, "cur"), ["1.a.host:2,Pa"])
        self.assertRaises(ValueError, box.set_flags, [1], ["$Label1"])
        self.assertRaises(ValueError, box.set_flags, [1], ["\\Seen"], "toggle")

    def test_flags_on_a_new_message_move_it_to_cur(self):
        box = self.inbox()
        self.drop(box.path, "new", "1.a.host")
        self.ok(box.sync())
        self.ok(box.set_flags([1], ["\\Seen"]))
        self.assertEqual(self.entries(box.path, "new"), [])
        self.assertEqual(self.entries(box.path, "cur"), ["1.a.host:2,S"])
        self.assertEqual(box.pending_recent(), [])

    def test_flags_on_a_file_renamed_meanwhile(self):
        box = self.inbox()
        self.drop(box.path, "cur", "1.a.host:2,", mtime=OLD)
        self.drop(box.path, "cur", "2.b.host:2,", mtime=OLD + 1)
        self.ok(box.sync())
        cur = os.path.join(box.path, "cur")
        os.rename(os.path.join(cur, "1.a.host:2,"), os.path.join(cur, "1.a.host:2,F"))
        os.unlink(os.path.join(cur, "2.b.host:2,"))
        self.assertEqual(self.ok(box.set_flags([1, 2], ["\\Seen"], "add")),
                         {1: {"\\Seen", "\\Flagged"}})
        self.assertEqual(self.entries(box.path, "cur"), ["1.a.host:2,FS"])
        self.assertEqual(self.ok(box.sync()).expunged, (2,))


class ExpungeCopyMoveTests(StoreTestCase):

    def setUp(self):
        super().setUp()
        self.ok(self.user.ensure_special_folders())
        self.box = self.inbox()
        for i in range(4):
            self.ok(self.box.append(MSG + b"%d\r\n" % i, internaldate=OLD + i))

    def test_expunge_removes_deleted_only(self):
        box = self.box
        self.ok(box.set_flags([2, 4], ["\\Deleted"]))
        self.assertEqual(self.ok(box.expunge()), [2, 4])
        self.assertEqual(list(box.uids), [1, 3])
        self.assertEqual(len(self.entries(box.path, "cur")), 2)
        self.assertEqual(self.ok(box.expunge()), [])

    def test_uid_expunge_limits_to_the_given_uids(self):
        box = self.box
        self.ok(box.set_flags([1, 2, 3], ["\\Deleted"]))
        self.assertEqual(self.ok(box.expunge([2, 3, 4])), [2, 3])
        self.assertEqual(list(box.uids), [1, 4])

    def test_copy_links_and_keeps_flags_and_dates(self):
        box = self.box
        trash = self.folder("Trash")
        self.ok(box.set_flags([2], ["\\Seen", "\\Flagged"]))
        pairs = self.ok(box.copy([2, 3, 99], trash))
        self.assertEqual(pairs, [(2, 1), (3, 2)])
        self.assertEqual(trash.flags(1), {"\\Seen", "\\Flagged"})
        self.assertEqual([m.internaldate for m in trash.messages], [OLD + 1.0, OLD + 2.0])
        self.assertEqual(self.ok(trash.read(2)), self.ok(box.read(3)))
        self.assertEqual(os.stat(os.path.join(trash.path, trash.view.relpath(0))).st_ino,
                         os.stat(os.path.join(box.path, box.view.relpath(1))).st_ino)
        self.assertEqual(list(box.uids), [1, 2, 3, 4])
        again = self.folder("Trash", self.new_store())
        self.assertEqual(list(again.uids), [1, 2])
        self.assertEqual([m.size for m in again.messages], [box.info(2).size, box.info(3).size])

    def test_copy_falls_back_to_copying_when_links_fail(self):
        def no_links(src, dst):
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        self.patch(os, "link", no_links)
        trash = self.folder("Trash")
        self.assertEqual(self.ok(self.box.copy([1], trash)), [(1, 1)])
        self.assertEqual(self.ok(trash.read(1)), self.ok(self.box.read(1)))
        self.assertEqual(trash.info(1).internaldate, float(OLD))
        self.assertEqual(self.entries(trash.path, "tmp"), [])

    def test_copy_into_the_same_folder(self):
        self.assertEqual(self.ok(self.box.copy([1], self.box)), [(1, 5)])
        self.assertEqual(self.ok(self.box.read(5)), self.ok(self.box.read(1)))

    def test_move_removes_exactly_those_messages(self):
        box = self.box
        archive = self.folder("Archive")
        self.ok(box.set_flags([4], ["\\Deleted"]))
        self.assertEqual(self.ok(box.move([1, 2], archive)), [(1, 1), (2, 2)])
        self.assertEqual(list(box.uids), [3, 4])
        self.assertEqual(list(archive.uids), [1, 2])
        self.assertEqual(len(self.entries(box.path, "cur")), 2)

    def test_listeners_hear_about_changes_with_their_origin(self):
        box, heard = self.box, []
        box.add_listener(heard.append)
        self.ok(box.set_flags([1], ["\\Seen"], origin="session-1"))
        self.ok(box.set_flags([1, 2], ["\\Deleted"], "add"))
        self.ok(box.expunge(origin="session-2"))
        uid = self.ok(box.append(MSG))
        self.assertEqual(heard, [Changes(flags=(1,), origin="session-1"),
                                 Changes(flags=(1, 2)),
                                 Changes(expunged=(1, 2), origin="session-2"),
                                 Changes(new=(uid,))])
        box.remove_listener(heard.append)
        self.ok(box.append(MSG))
        self.assertEqual(len(heard), 4)


# --- \Recent and notification ------------------------------------------------------

class RecentAndNotifyTests(StoreTestCase):

    def test_take_recent_moves_new_to_cur_once(self):
        box = self.inbox()
        self.drop(box.path, "new", "1.a.host", mtime=OLD)
        examined = self.ok(box.sync())
        self.assertEqual((examined.new, examined.recent), ((1,), ()))
        self.assertEqual(self.entries(box.path, "new"), ["1.a.host"])
        selected = self.ok(box.sync(take_recent=True))
        self.assertEqual((selected.new, selected.recent), ((), (1,)))
        self.assertEqual(self.entries(box.path, "cur"), ["1.a.host:2,"])
        self.assertEqual(self.ok(box.sync(take_recent=True)).recent, ())
        self.assertEqual(box.flags(1), frozenset())

    def test_only_the_first_selecting_listener_gets_recent(self):
        box = self.inbox()
        first, second, examiner = [], [], []
        box.add_listener(examiner.append)
        box.add_listener(first.append, take_recent=True)
        box.add_listener(second.append, take_recent=True)
        self.drop(box.path, "new", "1.a.host")
        self.ok(box.sync())
        self.assertEqual(first, [Changes(new=(1,), recent=(1,))])
        self.assertEqual(second, [Changes(new=(1,))])
        self.assertEqual(examiner, [Changes(new=(1,))])

    @defer.inlineCallbacks
    def test_delivery_reaches_an_idle_session_at_once(self):
        """The real local delivery writes; the hook wakes the open INBOX."""
        from mailbox_appliance.delivery.maildir import MaildirDelivery
        from mailbox_appliance.directory.model import User
        from mailbox_appliance.queue.spool import MAGIC, Envelope, QueuedMessage

        store = MailStore(reactor, self.root, hostname="test.host")
        box = yield store.open_user("example.test", "alice").mailbox("INBOX")
        heard = []
        box.add_listener(heard.append, take_recent=True)
        agent = MaildirDelivery(reactor, self.root, "mx.example.test")
        self.addCleanup(agent.worker.stop)
        env = Envelope(sender="a@ext.test", recipients=["alice@example.test"], arrival=OLD)
        qpath = os.path.join(self.root, "queue-1")
        with open(qpath, "wb") as f:
            f.write(MAGIC + env.to_json() + b"\n" + MSG)
        q = QueuedMessage(qid="0ABC", envelope=env, path=qpath,
                          body_offset=len(MAGIC + env.to_json() + b"\n"), size=len(MSG),
                          data=MSG, recovered=False)
        user = User(dn="uid=alice,dc=example,dc=test", uid="alice", mail="alice@example.test")
        yield agent.deliver(q, user, "alice@example.test", 0, "L:alice")
        yield store.notify_delivered("example.test", "Alice")
        self.assertEqual(heard, [Changes(new=(1,), recent=(1,))])
        data = yield box.read(1)
        self.assertTrue(data.startswith(b"Return-Path: <a@ext.test>\r\nDelivered-To: "))
        self.assertEqual(len(data), box.info(1).size)
        self.assertEqual(box.pending_recent(), [])

    def test_deliver_writes_into_new_and_wakes_open_sessions(self):
        """What LMTP will call: no index is loaded for it."""
        self.ok(self.user.create("Lists"))
        base = self.ok(self.user.deliver(MSG))
        self.assertEqual(self.entries(self.maildir, "new"), [base])
        lf = MSG.replace(b"\r\n", b"\n")
        self.assertTrue(base.endswith(",S=%d,W=%d" % (len(lf), len(MSG))))
        with open(os.path.join(self.maildir, "new", base), "rb") as f:
            self.assertEqual(f.read(), lf)
        lists = self.folder("Lists")
        heard = []
        lists.add_listener(heard.append, take_recent=True)
        self.ok(self.user.deliver(MSG, "Lists"))
        self.assertEqual(heard, [Changes(new=(1,), recent=(1,))])
        self.assertEqual(self.ok(lists.read(1)), MSG)
        self.failureResultOf(self.user.deliver(MSG, "Nope"), NoSuchFolder)
        self.failureResultOf(self.user.deliver(MSG, "../x"), FolderNameError)
        self.assertEqual(self.entries(self.maildir, "tmp"), [])

    def test_notify_without_open_sessions_does_nothing(self):
        self.assertIsNone(self.ok(self.store.notify_delivered("example.test", "bob")))
        self.assertIsNone(self.ok(self.store.notify_delivered("../x", "bob")))
        box = self.inbox()
        self.patch(Mailbox, "sync", lambda *a, **k: self.fail("synced"))
        self.assertIsNone(self.ok(self.store.notify_delivered("example.test", "alice")))
        self.assertEqual(len(box), 0)

    def test_syncs_waiting_together_are_done_once(self):
        box = self.inbox()
        self.ok(box._lock.acquire())
        ds = [box.sync() for _ in range(5)]
        calls = []
        real = box._t_sync

        def counting(*a):
            calls.append(1)
            return real(*a)
        self.patch(box, "_t_sync", counting)
        self.drop(box.path, "new", "1.a.host")
        box._lock.release()
        results = [self.ok(d) for d in ds]
        self.assertEqual(len(calls), 1)
        self.assertEqual(results, [Changes(new=(1,))] * 5)


class ThreadedTests(StoreTestCase):
    """The default: blocking work in reactor threads."""

    @defer.inlineCallbacks
    def test_operations_in_threads(self):
        store = MailStore(reactor, self.root, hostname="test.host")
        user = store.open_user("example.test", "alice")
        created = yield user.ensure_special_folders()
        self.assertEqual(created, ["Sent", "Drafts", "Trash", "Junk", "Archive"])
        box = yield user.mailbox("INBOX")
        uids = yield defer.gatherResults([box.append(MSG + b"%d" % i) for i in range(10)])
        self.assertEqual(sorted(uids), list(range(1, 11)))
        self.assertEqual(list(box.uids), list(range(1, 11)))
        sent = yield user.mailbox("Sent")
        yield defer.gatherResults([box.move([1, 2], sent), box.copy([3], sent),
                                   box.set_flags([4], ["\\Seen"])])
        self.assertEqual(len(sent), 3)
        self.assertEqual(list(box.uids), list(range(3, 11)))
        data = yield sent.read(sent.uids[0])
        self.assertTrue(data.startswith(MSG))
        again = yield threads.deferToThread(lambda: len(os.listdir(os.path.join(box.path, "cur"))))
        self.assertEqual(again, 8)


# --- folders ------------------------------------------------------------------------

class FolderTests(StoreTestCase):

    def listing(self, pattern="*"):
        return {f.name: f.attributes for f in self.ok(self.user.list_folders(pattern))}

    def test_interfaces(self):
        self.assertTrue(IMailStore.providedBy(self.store))
        self.assertTrue(IUserStore.providedBy(self.user))
        self.assertTrue(IMailbox.providedBy(self.inbox()))

    def test_special_folders(self):
        self.assertEqual(self.ok(self.user.ensure_special_folders()),
                         ["Sent", "Drafts", "Trash", "Junk", "Archive"])
        self.assertEqual(self.ok(self.user.ensure_special_folders()), [])
        listed = self.ok(self.user.list_folders())
        self.assertEqual([f.name for f in listed],
                         ["INBOX", "Archive", "Drafts", "Junk", "Sent", "Trash"])
        attrs = {f.name: (f.special_use, f.attributes) for f in listed}
        self.assertEqual(attrs["Sent"], ("\\Sent", {"\\Sent", "\\HasNoChildren"}))
        self.assertEqual(attrs["Junk"][0], "\\Junk")
        self.assertEqual(attrs["INBOX"], (None, {"\\HasNoChildren"}))
        for name in ["Sent", "Drafts", "Trash", "Junk", "Archive"]:
            path = os.path.join(self.maildir, "." + name)
            self.assertEqual(sorted(os.listdir(path)), ["cur", "maildirfolder", "new", "tmp"])
        self.assertEqual(self.ok(self.user.subscriptions()),
                         ["Sent", "Drafts", "Trash", "Junk", "Archive"])
        self.assertEqual(os.listdir(os.path.join(self.maildir, "tmp")), [])

    def test_create_and_list_hierarchy(self):
        self.ok(self.user.create("Projects.2024.Q1"))
        self.ok(self.user.create("Projects"))
        self.ok(self.user.create("Entwürfe."))          # trailing delimiter dropped
        self.ok(self.user.create("inbox.Sub"))
        got = self.listing()
        self.assertEqual(got["Projects"], {"\\HasChildren"})
        self.assertEqual(got["Projects.2024"], {"\\Noselect", "\\HasChildren"})
        self.assertEqual(got["Projects.2024.Q1"], {"\\HasNoChildren"})
        self.assertEqual(got["Entwürfe"], {"\\HasNoChildren"})
        self.assertEqual(got["INBOX"], {"\\HasChildren"})
        self.assertEqual(got["INBOX.Sub"], {"\\HasNoChildren"})
        self.assertTrue(os.path.isdir(os.path.join(self.maildir, ".Entw&APw-rfe", "cur")))
        self.assertEqual(sorted(self.listing("%")), ["Entwürfe", "INBOX", "Projects"])
        self.assertEqual(sorted(self.listing("Projects.%")), ["Projects.2024"])
        self.assertEqual(sorted(self.listing("inbox*")), ["INBOX", "INBOX.Sub"])
        self.failureResultOf(self.user.mailbox("Projects.2024"), NoSuchFolder)

    def test_create_refusals(self):
        self.ok(self.user.create("Work"))
        self.failureResultOf(self.user.create("Work"), FolderExists)
        self.failureResultOf(self.user.create("inbox"), FolderExists)
        for bad in ["", "..", "../../../etc", "a/b", "a\x00b", "a..b", ".x", "x" * 300, "a*b"]:
            f = self.failureResultOf(self.user.create(bad), FolderNameError)
            self.assertTrue(str(f.value))
        self.assertEqual(sorted(os.listdir(self.root)), ["example.test"])
        self.assertEqual(sorted(e for e in os.listdir(self.maildir) if e.startswith(".")),
                         [".Work"])

    def test_users_cannot_escape_mail_root(self):
        for domain, local in [("..", "x"), ("example.test", ".."), ("example.test", "a/b"),
                              ("a/../b", "x"), ("example.test", "")]:
            self.assertRaises(StoreError, self.store.open_user, domain, local)

    def test_symlinked_folders_are_not_followed(self):
        os.makedirs(os.path.join(self.maildir, "cur"))
        outside = os.path.join(self.root, "outside")
        for sub in ("cur", "new", "tmp"):
            os.makedirs(os.path.join(outside, sub))
        os.symlink(outside, os.path.join(self.maildir, ".Evil"))
        self.assertNotIn("Evil", self.listing())
        self.failureResultOf(self.user.mailbox("Evil"), NoSuchFolder)
        self.failureResultOf(self.user.delete("Evil"), NoSuchFolder)

    def test_mailboxes_and_users_are_shared(self):
        self.assertIs(self.store.open_user("EXAMPLE.test", "alice"), self.user)
        self.ok(self.user.create("Work"))
        a = self.folder("Work")
        b = self.ok(self.store.open_user("example.test", "ALICE").mailbox("work".title()))
        self.assertIs(a, b)
        self.assertIs(self.inbox(), self.folder("inbox"))
        self.failureResultOf(self.user.mailbox("Nope"), NoSuchFolder)
        self.failureResultOf(self.user.mailbox("../x"), FolderNameError)

    def test_delete(self):
        self.ok(self.user.create("Old"))
        self.ok(self.user.create("Parent.Child"))
        self.ok(self.user.create("Parent"))
        old = self.folder("Old")
        uv = old.uidvalidity
        self.ok(old.append(MSG))
        heard = []
        old.add_listener(heard.append)
        self.ok(self.user.delete("Old"))
        self.assertEqual(heard, [Changes(expunged=(1,), gone=True)])
        self.failureResultOf(old.append(MSG), NoSuchFolder)
        self.assertFalse(os.path.exists(os.path.join(self.maildir, ".Old")))
        self.assertEqual(os.listdir(os.path.join(self.maildir, "tmp")), [])
        self.failureResultOf(self.user.delete("Old"), NoSuchFolder)
        self.failureResultOf(self.user.delete("INBOX"), StoreError)
        self.failureResultOf(self.user.delete("Parent"), FolderHasChildren)
        self.ok(self.user.delete("Parent.Child"))
        self.ok(self.user.delete("Parent"))
        # Made again under the same name, in the same second: a new UIDVALIDITY.
        self.ok(self.user.create("Old"))
        again = self.folder("Old")
        self.assertGreater(again.uidvalidity, uv)
        self.assertEqual((len(again), again.uidnext), (0, 1))

    def test_delete_of_an_open_folder_seen_by_its_sync(self):
        """Removed by another program: the next sync says it is gone."""
        self.ok(self.user.create("Gone"))
        box = self.folder("Gone")
        self.ok(box.append(MSG))
        heard = []
        box.add_listener(heard.append)
        import shutil
        shutil.rmtree(box.path)
        self.failureResultOf(box.sync(), NoSuchFolder)
        self.assertEqual(heard, [Changes(expunged=(1,), gone=True)])
        self.assertTrue(box.gone)

    def test_rename_with_children(self):
        self.ok(self.user.create("A"))
        self.ok(self.user.create("A.B"))
        self.ok(self.user.create("A.B.C"))
        self.ok(self.user.create("AB"))
        a = self.folder("A")
        self.ok(a.append(MSG))
        uv = a.uidvalidity
        heard = []
        a.add_listener(heard.append)
        self.ok(self.user.rename("A", "Z"))
        self.assertEqual(sorted(self.listing()), ["AB", "INBOX", "Z", "Z.B", "Z.B.C"])
        self.assertEqual(heard, [Changes(expunged=(1,), gone=True)])
        z = self.folder("Z")
        self.assertEqual((z.uidvalidity, list(z.uids)), (uv, [1]))

    def test_rename_refusals(self):
        for n in ["A", "A.B", "C", "D.B"]:
            self.ok(self.user.create(n))
        self.failureResultOf(self.user.rename("A", "C"), FolderExists)
        self.failureResultOf(self.user.rename("A", "A.X"), StoreError)
        self.failureResultOf(self.user.rename("Nope", "Y"), NoSuchFolder)
        self.failureResultOf(self.user.rename("C", "INBOX"), FolderExists)
        self.failureResultOf(self.user.rename("C", "../x"), FolderNameError)
        # A child's new name is taken: nothing is renamed.
        self.failureResultOf(self.user.rename("A", "D"), FolderExists)
        self.assertEqual(sorted(self.listing()), ["A", "A.B", "C", "D", "D.B", "INBOX"])

    def test_rename_inbox_moves_its_messages(self):
        box = self.inbox()
        self.ok(self.user.create("INBOX.Keep"))
        for i in range(3):
            self.ok(box.append(MSG + b"%d" % i, ["\\Seen"] if i else []))
        self.drop(box.path, "new", "1700000000.new.host")
        uv = box.uidvalidity
        self.ok(self.user.rename("INBOX", "Old Mail"))
        self.assertEqual(len(box), 0)
        self.assertEqual(self.entries(box.path, "cur") + self.entries(box.path, "new"), [])
        self.assertEqual(box.uidvalidity, uv)
        old = self.folder("Old Mail")
        self.assertEqual(list(old.uids), [1, 2, 3, 4])
        self.assertEqual(old.flags(2), {"\\Seen"})
        self.assertIn("INBOX.Keep", self.listing())
        self.assertEqual(self.ok(box.append(MSG)), 5)

    def test_subscriptions(self):
        self.assertEqual(self.ok(self.user.subscriptions()), [])
        self.ok(self.user.subscribe("Entwürfe"))
        self.ok(self.user.subscribe("Not.There.Yet"))
        self.ok(self.user.subscribe("inbox"))
        self.ok(self.user.subscribe("Entwürfe"))
        self.assertEqual(self.ok(self.user.subscriptions()), ["Entwürfe", "Not.There.Yet", "INBOX"])
        with open(os.path.join(self.maildir, "subscriptions"), "rb") as f:
            self.assertEqual(f.read(), b"Entw&APw-rfe\nNot.There.Yet\nINBOX\n")
        self.assertTrue(self.ok(self.user.unsubscribe("Not.There.Yet")))
        self.assertFalse(self.ok(self.user.unsubscribe("Not.There.Yet")))
        self.assertEqual(self.ok(self.user.subscriptions()), ["Entwürfe", "INBOX"])
        self.failureResultOf(self.user.subscribe("../x"), FolderNameError)
        self.assertNotIn("subscriptions.tmp", os.listdir(self.maildir))

    def test_subscriptions_written_by_dovecot_2_3(self):
        os.makedirs(self.maildir)
        with open(os.path.join(self.maildir, "subscriptions"), "wb") as f:
            f.write(b"V\t2\n\nSent\nLists\tTwisted\nEntw&APw-rfe\n")
        self.assertEqual(self.ok(self.user.subscriptions()), ["Sent", "Lists.Twisted", "Entwürfe"])
