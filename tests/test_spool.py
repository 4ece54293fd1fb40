"""The durable spool: file format, commit, recovery, quarantine, recycling, disk errors."""

import errno
import json
import os

from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from mailbox_appliance import durable
from mailbox_appliance.queue.spool import (MAGIC, Envelope, IncomingMessage, QueuedMessage,
                                           Spool, SpoolError)

BODY = b"Received: from x\r\nSubject: hi\r\n\r\nHello.\r\n"


def envelope(**kw):
    kw.setdefault("sender", "a@ext.test")
    kw.setdefault("recipients", ["alice@example.test", "bob@example.test"])
    kw.setdefault("arrival", 1700000000.5)
    return Envelope(**kw)


def files(path):
    return sorted(os.listdir(path))


class SpoolTestMixin:

    timeout = 20

    def make_spool(self, root=None):
        root = root or getattr(self, "root", None) or self.mktemp()
        self.root = root
        s = Spool(reactor, root)
        self.addCleanup(s.worker.stop)
        return s

    def incoming(self, spool, body=BODY, chunks=None, **kw):
        inc = spool.new_message(envelope(**kw))
        inc.write_header()
        for c in chunks if chunks is not None else [body]:
            inc.write(c)
        return inc

    def store(self, spool, body=BODY, **kw):
        return spool.commit(self.incoming(spool, body, **kw))

    def settle_io(self, inc):
        """Wait for the spill writes of ``inc`` (without taking their result)."""
        d = defer.Deferred()
        if inc._io is None:
            d.callback(None)
        else:
            inc._io.addBoth(lambda r: (d.callback(None), r)[1])
        return d

    @defer.inlineCallbacks
    def eventually(self, predicate, what="condition"):
        for _ in range(500):
            if predicate():
                return
            yield task.deferLater(reactor, 0.01, lambda: None)
        self.fail(f"timed out waiting for {what}")


class FormatAndCommitTests(SpoolTestMixin, unittest.TestCase):

    @defer.inlineCallbacks
    def test_commit_writes_magic_envelope_and_body(self):
        s = self.make_spool()
        inc = self.incoming(s)
        q = yield s.commit(inc)
        self.assertIsInstance(q, QueuedMessage)
        self.assertEqual(q.qid, inc.qid)
        self.assertEqual(q.path, os.path.join(s.active_dir, q.qid))
        with open(q.path, "rb") as f:
            raw = f.read()
        self.assertTrue(raw.startswith(MAGIC))
        line, _, body = raw[len(MAGIC):].partition(b"\n")
        self.assertEqual(json.loads(line)["recipients"], ["alice@example.test", "bob@example.test"])
        self.assertEqual(json.loads(line)["sender"], "a@ext.test")
        self.assertEqual(body, BODY)
        self.assertEqual(q.body_offset, len(MAGIC) + len(line) + 1)
        self.assertEqual(raw[q.body_offset:], BODY)
        self.assertEqual(q.size, len(BODY))
        self.assertEqual(q.data, BODY)          # small: kept in memory for the first attempt
        self.assertFalse(q.recovered)
        self.assertEqual(q.done, set())
        self.assertEqual(files(s.tmp_dir), [])
        self.assertEqual(os.stat(q.path).st_mode & 0o777, 0o600)

    @defer.inlineCallbacks
    def test_file_appears_in_active_only_after_commit(self):
        s = self.make_spool()
        inc = self.incoming(s)
        self.assertEqual(files(s.active_dir), [])
        self.assertEqual(files(s.tmp_dir), [])     # small: nothing on disk yet
        d = s.commit(inc)
        q = yield d
        self.assertEqual(files(s.active_dir), [q.qid])

    @defer.inlineCallbacks
    def test_answer_comes_after_file_and_directory_fsync(self):
        s = self.make_spool()
        events = []
        real_fsync = os.fsync

        def fsync(fd):
            events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
            return real_fsync(fd)
        self.patch(os, "fsync", fsync)
        inc = self.incoming(s)
        d = s.commit(inc)
        d.addCallback(lambda q: events.append(("answer", q.qid)) or q)
        q = yield d
        self.assertEqual(events[-1], ("answer", q.qid))
        paths = [p for kind, p in events if kind == "fsync"]
        # The file's data, then the directory that now names it.
        self.assertIn(os.path.realpath(s.active_dir), paths)
        i_dir = paths.index(os.path.realpath(s.active_dir))
        self.assertTrue(any(p.startswith(os.path.realpath(s.tmp_dir)) or
                            p.startswith(os.path.realpath(s.free_dir)) for p in paths[:i_dir]))

    @defer.inlineCallbacks
    def test_many_commits_share_directory_fsyncs(self):
        s = self.make_spool()
        synced = []
        real = durable.fsync_dir
        self.patch(durable, "fsync_dir", lambda p: (synced.append(p), real(p)))
        qs = yield defer.gatherResults([self.store(s, body=b"m%d\r\n" % i) for i in range(40)])
        self.assertEqual(len({q.qid for q in qs}), 40)
        self.assertEqual(len(files(s.active_dir)), 40)
        self.assertTrue(1 <= len(synced) <= 40)
        for i, q in enumerate(qs):
            with open(q.path, "rb") as f:
                self.assertEqual(f.read()[q.body_offset:], b"m%d\r\n" % i)

    def test_qids_are_unique(self):
        s = self.make_spool()
        qids = [s.new_qid() for _ in range(5000)]
        self.assertEqual(len(set(qids)), 5000)
        self.assertTrue(all(q.isalnum() for q in qids))

    @defer.inlineCallbacks
    def test_large_message_spills_to_tmp_and_commits(self):
        s = self.make_spool()
        block = b"x" * 998 + b"\r\n"
        chunks = [block * 100 for _ in range(5)]      # 5 x 100 kB, past SPILL
        inc = self.incoming(s, chunks=chunks)
        self.assertTrue(inc.spilled)
        yield self.settle_io(inc)
        self.assertEqual(files(s.tmp_dir), [inc.qid])
        self.assertEqual(files(s.active_dir), [])
        q = yield s.commit(inc)
        self.assertIsNone(q.data)                     # read from the file when delivering
        self.assertEqual(q.size, 500000)
        self.assertEqual(files(s.tmp_dir), [])
        self.assertEqual(files(s.active_dir), [q.qid])
        with open(q.path, "rb") as f:
            raw = f.read()
        self.assertEqual(raw[q.body_offset:], b"".join(chunks))
        self.assertTrue(raw.startswith(MAGIC + inc.envelope.to_json() + b"\n"))
        again = s.read(q.qid, q.path)
        self.assertEqual((again.body_offset, again.size), (q.body_offset, q.size))

    @defer.inlineCallbacks
    def test_content_and_replace_of_a_small_message(self):
        s = self.make_spool()
        inc = self.incoming(s)
        self.assertEqual((yield inc.content()), BODY)
        env = envelope(folder="Junk", recipients=["bob@example.test"])
        inc.replace(b"X-Spam-Flag: YES\r\n" + BODY, env)
        q = yield s.commit(inc)
        self.assertEqual(q.data, b"X-Spam-Flag: YES\r\n" + BODY)
        again = s.read(q.qid, q.path)
        self.assertEqual(again.envelope.folder, "Junk")
        self.assertEqual(again.envelope.recipients, ["bob@example.test"])
        self.assertEqual(again.size, len(BODY) + 18)

    @defer.inlineCallbacks
    def test_content_and_replace_of_a_spilled_message(self):
        s = self.make_spool()
        block = b"x" * 998 + b"\r\n"
        chunks = [block * 100 for _ in range(3)] + [b"tail\r\n"]
        inc = self.incoming(s, chunks=chunks)
        self.assertTrue(inc.spilled)
        got = yield inc.content()
        self.assertEqual(got, b"".join(chunks))
        inc.replace(b"Top: 1\r\n" + got)
        q = yield s.commit(inc)
        with open(q.path, "rb") as f:
            raw = f.read()
        # Written anew: the new envelope header, then exactly the new content.
        self.assertTrue(raw.startswith(MAGIC + inc.envelope.to_json() + b"\n"))
        self.assertEqual(raw[q.body_offset:], b"Top: 1\r\n" + b"".join(chunks))
        self.assertEqual(q.data, raw[q.body_offset:])
        self.assertEqual(files(s.tmp_dir), [])

    @defer.inlineCallbacks
    def test_held_commit_goes_to_hold(self):
        s = self.make_spool()
        inc = self.incoming(s)
        inc.hold = True
        q = yield s.commit(inc)
        self.assertTrue(q.held)
        self.assertEqual(files(s.active_dir), [])
        self.assertEqual(files(s.hold_dir), [q.qid])

    @defer.inlineCallbacks
    def test_abort_removes_the_tmp_file(self):
        s = self.make_spool()
        inc = self.incoming(s, chunks=[b"y" * (IncomingMessage.SPILL + 10)])
        yield self.settle_io(inc)
        self.assertEqual(files(s.tmp_dir), [inc.qid])
        inc.write(b"more\r\n")
        inc.abort()
        yield self.eventually(lambda: files(s.tmp_dir) == [] and inc.fd is None, "tmp cleanup")
        self.assertEqual(files(s.active_dir), [])

    def test_abort_of_a_small_message_touches_nothing(self):
        s = self.make_spool()
        inc = self.incoming(s)
        inc.abort()
        self.assertEqual(files(s.tmp_dir), [])
        self.assertEqual(files(s.active_dir), [])

    @defer.inlineCallbacks
    def test_abort_while_spilling(self):
        s = self.make_spool()
        inc = self.incoming(s, chunks=[b"z" * (IncomingMessage.SPILL + 1)] * 3)
        inc.abort()                                   # writes may still be running
        yield self.eventually(lambda: files(s.tmp_dir) == [] and inc.fd is None, "tmp cleanup")
        yield self.settle_io(inc)
        self.assertEqual(files(s.tmp_dir), [])


class DiskErrorTests(SpoolTestMixin, unittest.TestCase):
    """R6: a failed write never ends in active/ and never reports success."""

    def failing(self, name, err=errno.EIO, when=lambda *a: True):
        real = getattr(os, name)

        def f(*a):
            if when(*a):
                raise OSError(err, os.strerror(err))
            return real(*a)
        self.patch(os, name, f)

    @defer.inlineCallbacks
    def assertCommitFails(self, s, inc):
        e = yield self.assertFailure(s.commit(inc), SpoolError)
        self.assertEqual(files(s.active_dir), [])
        self.assertEqual(files(s.tmp_dir), [])
        self.assertIsNone(inc.fd)
        return e

    @defer.inlineCallbacks
    def test_file_fsync_error(self):
        s = self.make_spool()
        self.failing("fsync")
        e = yield self.assertCommitFails(s, self.incoming(s))
        self.assertIn("commit failed", str(e))

    @defer.inlineCallbacks
    def test_write_error_disk_full(self):
        s = self.make_spool()
        self.failing("writev", errno.ENOSPC)
        e = yield self.assertCommitFails(s, self.incoming(s))
        self.assertIn("No space left", str(e))

    @defer.inlineCallbacks
    def test_open_error(self):
        s = self.make_spool()
        self.failing("open", errno.EACCES, when=lambda path, *a: str(path).startswith(s.root))
        yield self.assertCommitFails(s, self.incoming(s))

    @defer.inlineCallbacks
    def test_directory_fsync_error_leaves_nothing_in_active(self):
        # The file was renamed into active/ but the rename is not durable: the
        # client hears 451 and sends again, so a later restart must not find
        # and deliver this copy as well.
        s = self.make_spool()

        def bad(path):
            raise OSError(errno.EIO, "dir fsync failed")
        self.patch(durable, "fsync_dir", bad)
        yield self.assertCommitFails(s, self.incoming(s))

    @defer.inlineCallbacks
    def test_rename_error(self):
        s = self.make_spool()
        self.failing("rename", errno.EXDEV)
        yield self.assertCommitFails(s, self.incoming(s))

    @defer.inlineCallbacks
    def test_spill_write_error(self):
        s = self.make_spool()
        self.failing("writev", errno.ENOSPC)
        inc = self.incoming(s, chunks=[b"q" * (IncomingMessage.SPILL + 1), b"tail\r\n"])
        yield self.settle_io(inc)
        self.assertIsInstance(inc.error, OSError)
        yield self.assertCommitFails(s, inc)

    @defer.inlineCallbacks
    def test_error_with_a_recycled_file(self):
        s = self.make_spool()
        q = yield self.store(s)
        yield s.remove(q)
        self.assertEqual(len(files(s.free_dir)), 1)
        self.failing("fsync")
        yield self.assertCommitFails(s, self.incoming(s))
        # The half-written spare is not reused for a later message.
        self.assertEqual(files(s.free_dir), [])
        self.assertEqual(s._free, [])

    @defer.inlineCallbacks
    def test_spool_works_again_after_the_error(self):
        s = self.make_spool()
        broken = [True]
        self.failing("fsync", when=lambda fd: broken[0])
        yield self.assertFailure(self.store(s), SpoolError)
        broken[0] = False
        q = yield self.store(s)
        self.assertEqual(files(s.active_dir), [q.qid])


class RecyclingTests(SpoolTestMixin, unittest.TestCase):

    @defer.inlineCallbacks
    def test_remove_recycles_the_file_and_commit_reuses_it(self):
        s = self.make_spool()
        long_body = b"L" * 5000 + b"\r\n"
        q1 = yield self.store(s, body=long_body, recipients=["x@example.test"] * 30)
        ino = os.stat(q1.path).st_ino
        yield s.remove(q1)
        self.assertEqual(files(s.active_dir), [])
        self.assertEqual(len(files(s.free_dir)), 1)
        q2 = yield self.store(s, body=b"short\r\n", recipients=["y@example.test"])
        self.assertEqual(os.stat(q2.path).st_ino, ino)      # no new inode
        self.assertEqual(files(s.free_dir), [])
        with open(q2.path, "rb") as f:
            raw = f.read()
        # O_TRUNC: nothing of the longer previous message is left.
        self.assertEqual(raw, MAGIC + q2.envelope.to_json() + b"\n" + b"short\r\n")
        back = s.read(q2.qid, q2.path)
        self.assertEqual(back.envelope.recipients, ["y@example.test"])
        self.assertEqual(back.size, len(b"short\r\n"))

    @defer.inlineCallbacks
    def test_remove_drops_the_done_record(self):
        s = self.make_spool()
        q = yield self.store(s)
        yield s.mark_done(q, ["0:*"])
        yield s.remove(q)
        self.assertEqual(files(s.active_dir), [])

    @defer.inlineCallbacks
    def test_remove_beyond_max_free_unlinks(self):
        s = self.make_spool()
        self.patch(Spool, "MAX_FREE", 2)
        qs = yield defer.gatherResults([self.store(s) for _ in range(4)])
        yield defer.gatherResults([s.remove(q) for q in qs])
        self.assertEqual(files(s.active_dir), [])
        self.assertEqual(len(files(s.free_dir)), 2)
        self.assertEqual(len(s._free), 2)

    @defer.inlineCallbacks
    def test_remove_of_a_vanished_file(self):
        s = self.make_spool()
        q = yield self.store(s)
        os.unlink(q.path)
        yield s.remove(q)
        self.assertEqual(s._free, [])
        self.assertEqual(s._freeing, 0)

    @defer.inlineCallbacks
    def test_remove_when_free_cannot_take_the_file(self):
        s = self.make_spool()
        q = yield self.store(s)
        yield s.mark_done(q, ["0:*"])
        real = os.rename

        def rename(src, dst):
            if dst.startswith(s.free_dir):
                raise OSError(errno.ENOSPC, "full")
            return real(src, dst)
        self.patch(os, "rename", rename)
        yield s.remove(q)
        self.assertEqual(files(s.active_dir), [])
        self.assertEqual(files(s.free_dir), [])
        self.assertEqual((s._free, s._freeing), ([], 0))

    @defer.inlineCallbacks
    def test_remove_error_is_reported_and_keeps_the_done_record(self):
        s = self.make_spool()
        q = yield self.store(s)
        yield s.mark_done(q, ["0:*"])

        def fail(*a):
            raise OSError(errno.EIO, "io")
        self.patch(os, "rename", fail)
        self.patch(os, "unlink", fail)
        yield self.assertFailure(s.remove(q), OSError)
        self.assertEqual(files(s.active_dir), [q.qid, q.qid + ".done"])
        self.assertEqual((s._free, s._freeing), ([], 0))

    @defer.inlineCallbacks
    def test_large_message_does_not_take_a_spare(self):
        s = self.make_spool()
        q = yield self.store(s)
        yield s.remove(q)
        inc = self.incoming(s, chunks=[b"b" * (IncomingMessage.SPILL + 5)])
        q2 = yield s.commit(inc)
        self.assertEqual(len(files(s.free_dir)), 1)
        with open(q2.path, "rb") as f:
            self.assertEqual(f.read()[q2.body_offset:], b"b" * (IncomingMessage.SPILL + 5))

    @defer.inlineCallbacks
    def test_spares_survive_a_restart(self):
        s = self.make_spool()
        q = yield self.store(s)
        ino = os.stat(q.path).st_ino
        yield s.remove(q)
        s.worker.stop()
        s2 = self.make_spool(self.root)
        self.assertEqual(s2.recover(), [])
        q2 = yield self.store(s2, body=b"next\r\n")
        self.assertEqual(os.stat(q2.path).st_ino, ino)
        with open(q2.path, "rb") as f:
            self.assertEqual(f.read()[q2.body_offset:], b"next\r\n")


class DoneRecordTests(SpoolTestMixin, unittest.TestCase):

    @defer.inlineCallbacks
    def test_mark_done_appends_and_fsyncs(self):
        s = self.make_spool()
        q = yield self.store(s)
        synced = []
        real = os.fsync

        def fsync(fd):
            synced.append(os.readlink(f"/proc/self/fd/{fd}"))
            return real(fd)
        self.patch(os, "fsync", fsync)
        yield s.mark_done(q, ["0:L:uid=alice,ou=people", "0:*"])
        yield s.mark_done(q, ["1:R:x@remote.test"])
        self.assertEqual(q.done, {"0:L:uid=alice,ou=people", "0:*", "1:R:x@remote.test"})
        with open(q.path + ".done", "rb") as f:
            self.assertEqual(f.read(), b"0:L:uid=alice,ou=people\n0:*\n1:R:x@remote.test\n")
        self.assertEqual(synced.count(os.path.realpath(q.path + ".done")), 2)
        back = s.read(q.qid, q.path)
        self.assertEqual(back.done, q.done)

    @defer.inlineCallbacks
    def test_mark_done_error_is_reported(self):
        s = self.make_spool()
        q = yield self.store(s)

        def bad(fd):
            raise OSError(errno.EIO, "io")
        self.patch(os, "fsync", bad)
        yield self.assertFailure(s.mark_done(q, ["0:*"]), OSError)


class RecoveryTests(SpoolTestMixin, unittest.TestCase):

    def write_active(self, s, name, data):
        with open(os.path.join(s.active_dir, name), "wb") as f:
            f.write(data)

    @defer.inlineCallbacks
    def test_recover_returns_committed_messages(self):
        s = self.make_spool()
        q1 = yield self.store(s, body=b"one\r\n")
        q2 = yield self.store(s, body=b"two\r\n", recipients=["c@example.test"])
        yield s.mark_done(q1, ["0:L:uid=alice", "0:*"])
        s.worker.stop()
        s2 = self.make_spool(self.root)
        found = {m.qid: m for m in s2.recover()}
        self.assertEqual(sorted(found), sorted([q1.qid, q2.qid]))
        r1, r2 = found[q1.qid], found[q2.qid]
        self.assertEqual(r1.envelope, q1.envelope)
        self.assertEqual(r2.envelope.recipients, ["c@example.test"])
        self.assertEqual((r1.body_offset, r1.size), (q1.body_offset, q1.size))
        self.assertEqual(r1.done, {"0:L:uid=alice", "0:*"})
        self.assertEqual(r2.done, set())
        self.assertTrue(r1.recovered and r2.recovered)
        self.assertIsNone(r1.data)
        self.assertEqual(r1.path, q1.path)

    @defer.inlineCallbacks
    def test_uncommitted_tmp_file_is_removed_not_delivered(self):
        # A crash during DATA leaves a spilled body in tmp/: it was never
        # acknowledged, so recovery drops it.
        s = self.make_spool()
        inc = self.incoming(s, chunks=[b"t" * (IncomingMessage.SPILL + 1)])
        yield self.settle_io(inc)
        self.assertEqual(files(s.tmp_dir), [inc.qid])
        with open(os.path.join(s.tmp_dir, "stray"), "wb") as f:
            f.write(MAGIC + envelope().to_json() + b"\nbody\r\n")
        s.worker.stop()
        s2 = self.make_spool(self.root)
        self.assertEqual(s2.recover(), [])
        self.assertEqual(files(s2.tmp_dir), [])
        self.assertEqual(files(s2.active_dir), [])

    @defer.inlineCallbacks
    def test_partially_delivered_message_keeps_its_done_targets(self):
        s = self.make_spool()
        q = yield self.store(s)
        yield s.mark_done(q, ["0:L:uid=alice,ou=people,dc=example,dc=test", "0:*"])
        # A crash in the middle of appending: the last line is cut short.
        with open(q.path + ".done", "ab") as f:
            f.write(b"1:R:someone@rem")
        s.worker.stop()
        [m] = self.make_spool(self.root).recover()
        self.assertEqual(m.done, {"0:L:uid=alice,ou=people,dc=example,dc=test", "0:*",
                                  "1:R:someone@rem"})
        self.assertNotIn("1:*", m.done)

    def test_corrupt_files_are_quarantined_and_startup_continues(self):
        s = self.make_spool()
        good = MAGIC + envelope().to_json() + b"\nok\r\n"
        bad = {
            "BADMAGIC": b"MAQ2\n" + envelope().to_json() + b"\nbody",
            "EMPTY": b"",
            "TRUNCATED": MAGIC + envelope().to_json()[:20],
            "GARBAGE": MAGIC + b"{not json at all\nbody",
            "NOTOBJECT": MAGIC + b"[1,2,3]\nbody",
            "NORCPTS": MAGIC + b'{"sender":"a@b"}\nbody',
            "NOSENDER": MAGIC + b'{"recipients":["a@b"]}\nbody',
            "BADTYPES": MAGIC + b'{"sender":1,"recipients":["a@b"]}\nbody',
            "BADRCPT": MAGIC + b'{"sender":"a","recipients":[["x"]]}\nbody',
            "BADARRIVAL": MAGIC + b'{"sender":"a","recipients":["a@b"],"arrival":"soon"}\nb',
            "BADHELO": MAGIC + b'{"sender":"a","recipients":["a@b"],"helo":{"x":1}}\nb',
            "BINARY": MAGIC + b'\xff\xfe\x00\x01\nbody',
        }
        self.write_active(s, "GOOD", good)
        for name, data in bad.items():
            self.write_active(s, name, data)
        with open(os.path.join(s.active_dir, "GARBAGE.done"), "wb") as f:
            f.write(b"0:*\n")
        found = s.recover()
        self.assertEqual([m.qid for m in found], ["GOOD"])
        self.assertEqual(files(s.corrupt_dir), sorted(list(bad) + ["GARBAGE.done"]))
        self.assertEqual(files(s.active_dir), ["GOOD"])
        for name, data in bad.items():
            with open(os.path.join(s.corrupt_dir, name), "rb") as f:
                self.assertEqual(f.read(), data)       # kept as found, for the admin

    def test_quarantine_is_logged(self):
        from twisted.logger import globalLogPublisher
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        s = self.make_spool()
        self.write_active(s, "BROKEN", b"junk")
        self.assertEqual(s.recover(), [])
        msgs = [e for e in events if e.get("qid") == "BROKEN"]
        self.assertEqual(len(msgs), 1)
        self.assertIn("corrupt", msgs[0]["log_format"])
        self.assertEqual(msgs[0]["log_level"].name, "error")

    def test_quarantine_failure_does_not_stop_startup(self):
        s = self.make_spool()
        self.write_active(s, "A-BROKEN", b"junk")
        self.write_active(s, "B-GOOD", MAGIC + envelope().to_json() + b"\nok\r\n")
        real = os.rename

        def rename(src, dst):
            if "corrupt" in dst:
                raise OSError(errno.EIO, "cannot move")
            return real(src, dst)
        self.patch(os, "rename", rename)
        self.assertEqual([m.qid for m in s.recover()], ["B-GOOD"])

    def test_orphan_done_records_are_removed(self):
        s = self.make_spool()
        with open(os.path.join(s.active_dir, "GONE.done"), "wb") as f:
            f.write(b"0:*\n")
        self.assertEqual(s.recover(), [])
        self.assertEqual(files(s.active_dir), [])

    def test_records_left_behind_by_a_cut_short_hold_go_with_the_message(self):
        # A hold moves the records first; a crash before the message itself
        # moved leaves the message in active/ and its records in hold/.
        s = self.make_spool()
        self.write_active(s, "HALF", MAGIC + envelope().to_json() + b"\nok\r\n")
        with open(os.path.join(s.hold_dir, "HALF.done"), "wb") as f:
            f.write(b"0:*\n")
        with open(os.path.join(s.hold_dir, "HALF.status"), "wb") as f:
            f.write(b'{"attempts": 3, "next": 5.0, "warned": [], "rcpt": {}}')
        [m] = s.recover()
        self.assertEqual(m.done, {"0:*"})
        self.assertEqual(m.attempts, 3)
        self.assertEqual(files(s.hold_dir), [])
        self.assertEqual(s.held(), [])

    def test_held_messages_and_status_records(self):
        s = self.make_spool()
        self.write_active(s, "HELD", MAGIC + envelope().to_json() + b"\nok\r\n")
        [m] = s.recover()
        m.attempts, m.last = 2, {0: {"status": "deferred", "reply": "451 busy"}}
        d = s.write_status(m).addCallback(lambda _: s.move(m, to_hold=True))

        def moved(m2):
            self.assertTrue(m2.held)
            self.assertEqual(files(s.active_dir), [])
            [h] = s.held()
            self.assertEqual((h.attempts, h.last[0]["reply"], h.held), (2, "451 busy", True))
            return s.move(h, to_hold=False).addCallback(
                lambda h2: self.assertEqual([x.qid for x in s.recover()], ["HELD"]))
        return d.addCallback(moved)

    def test_vanished_file_is_skipped(self):
        # A message removed while recovery lists the directory is not corrupt.
        s = self.make_spool()
        self.write_active(s, "GOING", MAGIC + envelope().to_json() + b"\nok\r\n")
        real_read = s.read

        def read(qid, path):
            os.unlink(path)
            return real_read(qid, path)
        s.read = read
        self.assertEqual(s.recover(), [])
        self.assertEqual(files(s.corrupt_dir), [])

    def test_envelope_round_trip(self):
        e = envelope(client_ip="192.0.2.1", helo="h", protocol="ESMTPSA", auth="alice")
        self.assertEqual(Envelope.from_json(e.to_json()), e)
        # Unknown keys written by a later version are ignored.
        raw = json.loads(e.to_json())
        raw["future"] = 1
        self.assertEqual(Envelope.from_json(json.dumps(raw).encode()), e)


class BacklogTests(SpoolTestMixin, unittest.TestCase):
    """Spilled bytes waiting for the writer thread are bounded by back-pressure."""

    def test_backlogged_until_written(self):
        spool = self.make_spool()
        gates = []

        def slow_thread(f, *a):
            # Writes happen only when the test lets them.
            d = defer.Deferred()
            gates.append(lambda: d.callback(f(*a)))
            return d
        spool._thread = slow_thread
        inc = spool.new_message(envelope())
        inc.write_header()
        block = b"z" * IncomingMessage.SPILL
        while not inc.backlogged:
            inc.write(block)
        drained = []
        inc.when_drained(lambda: drained.append(True))
        self.assertEqual(drained, [])
        while gates:
            gates.pop(0)()
        self.assertEqual(drained, [True])
        self.assertEqual(inc.unwritten, 0)
        self.assertFalse(inc.backlogged)
        inc.abort()
