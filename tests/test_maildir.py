"""Local Maildir delivery: format, names, safety, exactly-once after a crash, disk errors."""

import errno
import hashlib
import os
import re

from twisted.internet import defer, reactor
from twisted.trial import unittest

from mailbox_appliance import durable
from mailbox_appliance.delivery import maildir
from mailbox_appliance.delivery.maildir import (DeliveryError, MaildirDelivery, maildir_path)
from mailbox_appliance.directory.model import User
from mailbox_appliance.queue.spool import MAGIC, Envelope, QueuedMessage

BODY = (b"Received: from x ([192.0.2.1])\r\n\tby mx.example.test\r\nSubject: hi\r\n\r\n"
        b"Hello.\r\nline two\r\n")
ALICE = User(dn="uid=alice,ou=people,dc=example,dc=test", uid="alice",
             mail="Alice@example.test")
KEY = "L:" + ALICE.dn
ARRIVAL = 1700000000.75


class MaildirTestMixin:

    timeout = 30

    def setUp(self):
        self.root = os.path.abspath(self.mktemp())
        self.mail_root = os.path.join(self.root, "mail")
        self.agent = MaildirDelivery(reactor, self.mail_root, "mx.example.test")
        self.addCleanup(self.agent.worker.stop)

    def message(self, body=BODY, qid="0ABC1234DEF0001", in_memory=True, recovered=False,
                sender="a@ext.test"):
        """A queued message; its file exists either way, ``data`` only in memory."""
        env = Envelope(sender=sender, recipients=["alice@example.test"], arrival=ARRIVAL)
        head = MAGIC + env.to_json() + b"\n"
        path = os.path.join(self.root, "queue-" + qid)
        os.makedirs(self.root, exist_ok=True)
        with open(path, "wb") as f:
            f.write(head + body)
        return QueuedMessage(qid=qid, envelope=env, path=path, body_offset=len(head),
                             size=len(body), data=body if in_memory else None,
                             recovered=recovered)

    def box(self, user=ALICE):
        return os.path.join(self.mail_root, "example.test", user.mail.split("@")[0].lower(),
                            "Maildir")

    def entries(self, sub, user=ALICE):
        p = os.path.join(self.box(user), sub)
        return sorted(os.listdir(p)) if os.path.isdir(p) else []

    def read_new(self, user=ALICE):
        out = []
        for n in self.entries("new", user):
            with open(os.path.join(self.box(user), "new", n), "rb") as f:
                out.append(f.read())
        return out

    def deliver(self, q, user=ALICE, to="alice@example.test", idx=0, key=KEY):
        return self.agent.deliver(q, user, to, idx, key)


class FormatTests(MaildirTestMixin, unittest.TestCase):

    @defer.inlineCallbacks
    def test_headers_first_and_lf_line_ends(self):
        written = yield self.deliver(self.message())
        self.assertTrue(written)
        [m] = self.read_new()
        self.assertEqual(m, b"Return-Path: <a@ext.test>\nDelivered-To: alice@example.test\n"
                            + BODY.replace(b"\r\n", b"\n"))
        self.assertNotIn(b"\r", m)
        self.assertEqual(self.entries("tmp"), [])
        self.assertEqual(self.entries("cur"), [])

    @defer.inlineCallbacks
    def test_null_sender(self):
        yield self.deliver(self.message(sender=""))
        [m] = self.read_new()
        self.assertTrue(m.startswith(b"Return-Path: <>\nDelivered-To: alice@example.test\n"))

    @defer.inlineCallbacks
    def test_maildir_is_under_the_primary_address(self):
        yield self.deliver(self.message())
        # Primary mail "Alice@example.test": the local part names the folder.
        self.assertTrue(os.path.isdir(os.path.join(self.mail_root, "example.test", "alice",
                                                   "Maildir", "new")))
        for sub in ("tmp", "new", "cur"):
            self.assertTrue(os.path.isdir(os.path.join(self.box(), sub)))

    @defer.inlineCallbacks
    def test_file_name_carries_unique_parts_and_sizes(self):
        q = self.message()
        yield self.deliver(q, idx=3)
        [name] = self.entries("new")
        tag = hashlib.sha1(KEY.encode()).hexdigest()[:8]
        m = re.match(r"^(\d+)\.Q(\w+)R(\d+)T([0-9a-f]{8})\.([\w.-]+),S=(\d+),W=(\d+)$", name)
        self.assertIsNotNone(m, name)
        self.assertEqual(m.group(1), str(int(ARRIVAL)))
        self.assertEqual(m.group(2), q.qid)
        self.assertEqual(m.group(3), "3")
        self.assertEqual(m.group(4), tag)
        self.assertEqual(m.group(5), "mx.example.test")
        [content] = self.read_new()
        self.assertEqual(int(m.group(6)), len(content))
        self.assertEqual(int(m.group(6)), os.path.getsize(os.path.join(self.box(), "new", name)))
        self.assertEqual(int(m.group(7)), len(content.replace(b"\n", b"\r\n")))
        self.assertEqual(os.stat(os.path.join(self.box(), "new", name)).st_mode & 0o777, 0o600)

    @defer.inlineCallbacks
    def test_each_recipient_and_target_gets_its_own_file(self):
        q = self.message()
        yield self.deliver(q, idx=0)
        yield self.deliver(q, idx=1)
        yield self.deliver(q, idx=1, key="L:uid=other")
        self.assertEqual(len(self.entries("new")), 3)

    def test_hostname_is_sanitised(self):
        agent = MaildirDelivery(reactor, self.mail_root, "mx/bad:host,name")
        q = self.message()
        self.assertNotRegex(agent.unique_name(q, 0, KEY), r"[/:,]")

    @defer.inlineCallbacks
    def test_directory_fsyncs(self):
        synced = []
        real = durable.fsync_dir
        self.patch(durable, "fsync_dir", lambda p: (synced.append(p), real(p)))
        yield self.deliver(self.message())
        # A new mailbox: every directory that got a new entry, then new/.
        box = self.box()
        self.assertEqual(synced, [box, os.path.dirname(box), os.path.dirname(os.path.dirname(box)),
                                  self.mail_root, self.root, os.path.join(box, "new")])
        del synced[:]
        yield self.deliver(self.message(), idx=1)
        self.assertEqual(synced, [os.path.join(box, "new")])
        del synced[:]
        yield self.deliver(self.message(recovered=True), idx=2)
        self.assertEqual(synced, [os.path.join(box, "new")])

    @defer.inlineCallbacks
    def test_no_header_injection(self):
        q = self.message(sender="a@ext.test>\r\nX-Injected: 1\r\nX-B: <b")
        yield self.deliver(q, to="alice@example.test\nX-Other: 2")
        [m] = self.read_new()
        head = m.split(b"\n")
        self.assertTrue(head[0].startswith(b"Return-Path: <a@ext.test>X-Injected"))
        self.assertTrue(head[1].startswith(b"Delivered-To: alice@example.testX-Other"))
        self.assertTrue(head[2].startswith(b"Received: "))

    def test_ensure_maildir_relative_path(self):
        cwd = os.getcwd()
        os.makedirs(self.root, exist_ok=True)
        os.chdir(self.root)
        self.addCleanup(os.chdir, cwd)
        maildir.ensure_maildir(os.path.join("rel", "Maildir"))
        maildir.ensure_maildir(os.path.join("rel", "Maildir"))
        self.assertTrue(os.path.isdir(os.path.join(self.root, "rel", "Maildir", "cur")))


class SafetyTests(MaildirTestMixin, unittest.TestCase):

    def test_unsafe_names_are_permanent_errors(self):
        for domain, local in [("example.test", ".."), ("example.test", "."),
                              ("example.test", "a/b"), ("example.test", ".hidden"),
                              ("example.test", "a..b"), ("..", "alice"),
                              ("example.test/../..", "x"), ("example.test", ""),
                              ("", "alice"), ("example.test", "a\x00b"),
                              ("example.test", "a\nb"), ("example.test", "x" * 65),
                              (".example.test", "alice")]:
            with self.assertRaises(DeliveryError) as cm:
                maildir_path(self.mail_root, domain, local)
            self.assertTrue(cm.exception.permanent, (domain, local))

    def test_safe_names(self):
        self.assertEqual(maildir_path("/m", "Example.TEST", "John.Doe+x"),
                         "/m/example.test/john.doe+x/Maildir")

    @defer.inlineCallbacks
    def test_deliver_to_an_unsafe_mailbox_fails_permanently(self):
        for mail in ["../../etc@example.test", ".profile@example.test", "a/b@example.test",
                     "x@../../tmp"]:
            user = User(dn="uid=evil", uid="evil", mail=mail)
            try:
                d = self.deliver(self.message(), user=user)
            except DeliveryError as e:
                err = e
            else:
                err = yield self.assertFailure(d, DeliveryError)
            self.assertTrue(err.permanent, mail)
        self.assertEqual(os.listdir(self.mail_root) if os.path.isdir(self.mail_root) else [], [])
        self.assertEqual(sorted(os.listdir(self.root)), ["queue-0ABC1234DEF0001"])


class ExactlyOnceTests(MaildirTestMixin, unittest.TestCase):

    @defer.inlineCallbacks
    def test_recovered_message_already_in_new_is_not_written_again(self):
        yield self.deliver(self.message())
        before = self.entries("new")
        q = self.message(recovered=True, in_memory=False)
        written = yield self.deliver(q)
        self.assertFalse(written)
        self.assertEqual(self.entries("new"), before)
        self.assertEqual(self.entries("tmp"), [])

    @defer.inlineCallbacks
    def test_recovered_message_already_read_into_cur_is_not_written_again(self):
        yield self.deliver(self.message())
        [name] = self.entries("new")
        os.rename(os.path.join(self.box(), "new", name),
                  os.path.join(self.box(), "cur", name + ":2,S"))
        written = yield self.deliver(self.message(recovered=True, in_memory=False))
        self.assertFalse(written)
        self.assertEqual(self.entries("new"), [])
        self.assertEqual(self.entries("cur"), [name + ":2,S"])

    @defer.inlineCallbacks
    def test_recovered_message_not_yet_delivered_is_written(self):
        written = yield self.deliver(self.message(recovered=True, in_memory=False))
        self.assertTrue(written)
        self.assertEqual(len(self.entries("new")), 1)

    @defer.inlineCallbacks
    def test_recovered_check_is_per_recipient_and_target(self):
        yield self.deliver(self.message(), idx=0)
        q = self.message(recovered=True)
        self.assertFalse((yield self.deliver(q, idx=0)))
        self.assertTrue((yield self.deliver(q, idx=1)))
        self.assertTrue((yield self.deliver(q, idx=10)))   # R1 is no prefix of R10
        self.assertTrue((yield self.deliver(q, idx=0, key="L:uid=bob")))
        self.assertEqual(len(self.entries("new")), 4)

    @defer.inlineCallbacks
    def test_other_message_with_similar_name_does_not_count(self):
        # Another host's delivery of the same queue id (a name that merely
        # starts with ours) is not ours.
        yield self.deliver(self.message())
        [name] = self.entries("new")
        base = name.split(",")[0]
        os.rename(os.path.join(self.box(), "new", name),
                  os.path.join(self.box(), "new", base + "2,S=1,W=1"))
        self.assertTrue((yield self.deliver(self.message(recovered=True))))

    @defer.inlineCallbacks
    def test_leftover_tmp_file_of_a_crashed_delivery_is_overwritten(self):
        q = self.message()
        base = self.agent.unique_name(q, 0, KEY)
        for sub in ("tmp", "new", "cur"):
            os.makedirs(os.path.join(self.box(), sub))
        with open(os.path.join(self.box(), "tmp", base), "wb") as f:
            f.write(b"half a message, much longer than the real one " * 100)
        q.recovered = True
        self.assertTrue((yield self.deliver(q)))
        self.assertEqual(self.entries("tmp"), [])
        [m] = self.read_new()
        self.assertTrue(m.endswith(b"line two\n"))


class FromFileTests(MaildirTestMixin, unittest.TestCase):

    @defer.inlineCallbacks
    def assertSameFromFileAndMemory(self, body):
        q_mem = self.message(body, qid="0000000000A0001")
        q_file = self.message(body, qid="0000000000A0001", in_memory=False)
        yield self.deliver(q_mem, idx=0)
        yield self.deliver(q_file, idx=1)
        names = self.entries("new")
        contents = self.read_new()
        self.assertEqual(len(contents), 2)
        self.assertEqual(contents[0], contents[1])
        self.assertEqual([n.split(",", 1)[1] for n in names][0],
                         [n.split(",", 1)[1] for n in names][1])
        header = b"Return-Path: <a@ext.test>\nDelivered-To: alice@example.test\n"
        self.assertEqual(contents[0], header + body.replace(b"\r\n", b"\n"))
        m = re.search(r",S=(\d+),W=(\d+)$", names[0])
        self.assertEqual(int(m.group(1)), len(contents[0]))
        self.assertEqual(int(m.group(2)), len(contents[0]) + contents[0].count(b"\n"))
        return contents[0]

    @defer.inlineCallbacks
    def test_cr_at_the_copy_chunk_boundary(self):
        # The first read takes COPY_CHUNK bytes of the body: put its CRLF
        # across the boundary, CR last in the first block.
        head = b"Subject: big\r\n\r\n"
        fill = maildir.COPY_CHUNK - 1 - len(head)
        body = head + b"a" * fill + b"\r\n" + b"b" * 100 + b"\r\n"
        self.assertEqual(body[maildir.COPY_CHUNK - 1:maildir.COPY_CHUNK + 1], b"\r\n")
        out = yield self.assertSameFromFileAndMemory(body)
        self.assertIn(b"a\nbbb", out)
        self.assertNotIn(b"\r", out)

    @defer.inlineCallbacks
    def test_every_boundary_with_a_small_chunk(self):
        self.patch(maildir, "COPY_CHUNK", 3)
        body = b"S: x\r\n\r\n\r\n\r\nab\rc\r\n\rd\n\r\r\n\r"
        yield self.assertSameFromFileAndMemory(body)

    @defer.inlineCallbacks
    def test_bare_cr_at_end_of_file(self):
        self.patch(maildir, "COPY_CHUNK", 4)
        yield self.assertSameFromFileAndMemory(b"S: x\r\n\r\nabc\r")

    @defer.inlineCallbacks
    def test_large_body_from_file(self):
        line = b"0123456789" * 7 + b"\r\n"
        body = b"Subject: s\r\n\r\n" + line * 40000        # ~2.9 MB, three chunks
        yield self.assertSameFromFileAndMemory(body)


class DiskErrorTests(MaildirTestMixin, unittest.TestCase):
    """R6: disk trouble defers the delivery, never bounces it."""

    def failing(self, name, err, when=lambda *a: True):
        real = getattr(os, name)

        def f(*a, **kw):
            if when(*a):
                raise OSError(err, os.strerror(err))
            return real(*a, **kw)
        self.patch(os, name, f)

    @defer.inlineCallbacks
    def assertTemporary(self, q=None):
        e = yield self.assertFailure(self.deliver(q or self.message()), DeliveryError)
        self.assertFalse(e.permanent)
        self.assertEqual(self.entries("new"), [])
        self.assertEqual(self.entries("tmp"), [])
        return e

    def ours(self, fd, *a):
        # Only the Maildir's files: the reactor's waker writes too.
        try:
            return os.readlink(f"/proc/self/fd/{fd}").startswith(self.mail_root)
        except OSError:
            return False

    @defer.inlineCallbacks
    def test_disk_full_on_write(self):
        self.failing("write", errno.ENOSPC, when=self.ours)
        e = yield self.assertTemporary()
        self.assertIn("No space left", str(e))

    @defer.inlineCallbacks
    def test_quota_on_write(self):
        self.failing("write", errno.EDQUOT, when=self.ours)
        yield self.assertTemporary()

    @defer.inlineCallbacks
    def test_fsync_error(self):
        self.failing("fsync", errno.EIO)
        yield self.assertTemporary()

    @defer.inlineCallbacks
    def test_directory_fsync_error(self):
        def bad(path):
            raise OSError(errno.EIO, "io")
        self.patch(durable, "fsync_dir", bad)
        e = yield self.assertFailure(self.deliver(self.message()), DeliveryError)
        self.assertFalse(e.permanent)

    @defer.inlineCallbacks
    def test_cannot_create_the_maildir(self):
        os.makedirs(os.path.join(self.mail_root, "example.test"))
        with open(os.path.join(self.mail_root, "example.test", "alice"), "w") as f:
            f.write("not a directory")
        e = yield self.assertFailure(self.deliver(self.message()), DeliveryError)
        self.assertFalse(e.permanent)
        e = yield self.assertFailure(self.deliver(self.message(recovered=True)), DeliveryError)
        self.assertFalse(e.permanent)

    @defer.inlineCallbacks
    def test_queue_file_unreadable(self):
        q = self.message(in_memory=False)
        os.unlink(q.path)
        yield self.assertTemporary(q)

    @defer.inlineCallbacks
    def test_rename_error(self):
        self.failing("rename", errno.EIO)
        yield self.assertTemporary()

    @defer.inlineCallbacks
    def test_works_again_after_the_error(self):
        broken = [True]
        self.failing("fsync", errno.EIO, when=lambda fd: broken[0])
        yield self.assertTemporary()
        broken[0] = False
        self.assertTrue((yield self.deliver(self.message())))
        self.assertEqual(len(self.entries("new")), 1)
