"""The queue manager with a fake directory and a real spool and Maildir on disk.

The spool and Maildir agents use the real reactor (their disk work runs on
threads); the manager gets a reactor whose timers are a ``Clock``, so retries
happen exactly when a test advances it.
"""

import dataclasses
import errno
import os
import threading

from twisted.internet import defer, reactor, task
from twisted.logger import globalLogPublisher
from twisted.trial import unittest

from mailbox_appliance import config
from mailbox_appliance.delivery.maildir import MaildirDelivery
from mailbox_appliance.delivery.router import Router
from mailbox_appliance.interfaces import DirectoryUnavailable
from mailbox_appliance.queue.manager import QueueManager
from mailbox_appliance.queue.spool import Envelope, Spool
from tests.fakes import FakeDirectory

BODY = b"Received: from x\r\nSubject: hi\r\n\r\nHello.\r\n"
START = 1700000000.0


class ManagerReactor:
    """Threads from the real reactor, time from a Clock."""

    def __init__(self, clock):
        self.clock = clock

    def callLater(self, *a, **kw):
        return self.clock.callLater(*a, **kw)

    def seconds(self):
        return self.clock.seconds()

    def getThreadPool(self):
        return reactor.getThreadPool()

    def callFromThread(self, *a, **kw):
        return reactor.callFromThread(*a, **kw)


class QueueManagerTestBase(unittest.TestCase):

    timeout = 20

    def setUp(self):
        self.root = os.path.abspath(self.mktemp())
        self.clock = task.Clock()
        self.clock.advance(START)
        base = config.Config()
        self.config = dataclasses.replace(
            base,
            server=dataclasses.replace(base.server, data_dir=self.root,
                                       domains=("example.test",)),
            delivery=dataclasses.replace(base.delivery, retry_schedule=("1m", "5m", "15m")))
        self.directory = d = FakeDirectory()
        self.alice = d.add_user("alice", "alice@example.test", "al@example.test")
        self.bob = d.add_user("bob", "bob@example.test")
        self.carol = d.add_user("carol", "carol@example.test", routing="carol@elsewhere.test")
        d.aliases["team@example.test"] = ["alice@example.test", "al@example.test",
                                          "bob@example.test", "ext@remote.test"]
        d.aliases["locals@example.test"] = ["Alice@Example.test", "bob@example.test"]
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)
        return self.start()

    @defer.inlineCallbacks
    def start(self):
        """Build spool, agents and manager on self.root; start (and recover)."""
        self.spool = Spool(reactor, os.path.join(self.root, "queue"))
        self.addCleanup(self.spool.worker.stop)
        self.local = MaildirDelivery(reactor, os.path.join(self.root, "mail"), "mx.example.test")
        self.addCleanup(self.local.worker.stop)
        self.router = Router(self.directory, self.config.server.domains)
        self.manager = QueueManager(ManagerReactor(self.clock), self.config, self.spool,
                                    self.router, self.local)
        manager = self.manager
        self.addCleanup(lambda: manager.stopService() if manager.running else None)
        yield self.manager.startService()
        yield self.manager.when_idle()

    @defer.inlineCallbacks
    def restart(self):
        """Stop everything as a crash would leave the disk, and start again."""
        yield self.manager.stopService()
        self.spool.worker.stop()
        self.local.worker.stop()
        yield self.start()

    @defer.inlineCallbacks
    def commit(self, recipients, body=BODY, sender="a@ext.test"):
        inc = self.spool.new_message(Envelope(sender=sender, recipients=list(recipients),
                                              arrival=self.clock.seconds()))
        inc.write_header()
        inc.write(body)
        q = yield self.spool.commit(inc)
        return q

    @defer.inlineCallbacks
    def enqueue(self, recipients, **kw):
        q = yield self.commit(recipients, **kw)
        self.manager.submit(q)
        yield self.manager.when_idle()
        return q

    @defer.inlineCallbacks
    def advance(self, seconds):
        self.clock.advance(seconds)
        yield self.manager.when_idle()
        # Let disk answers queued by the workers reach the reactor.
        yield task.deferLater(reactor, 0, lambda: None)
        yield self.manager.when_idle()

    def mailbox(self, local):
        new = os.path.join(self.root, "mail", "example.test", local, "Maildir", "new")
        out = []
        for n in sorted(os.listdir(new)) if os.path.isdir(new) else []:
            with open(os.path.join(new, n), "rb") as f:
                out.append(f.read())
        return out

    def queued(self):
        # (The .status records are informational and left out here.)
        return sorted(n for n in os.listdir(self.spool.active_dir)
                      if not n.endswith(".status"))

    def lines(self, qid=None):
        out = [e["mail_log"] for e in self.events if "mail_log" in e]
        return [line for line in out if qid is None or line.startswith(qid + ":")]

    def status_lines(self, qid, to):
        return [line for line in self.lines(qid) if f" to=<{to}>" in line]

    def pending_retries(self):
        return sorted(c.getTime() - self.clock.seconds() for c in self.clock.getDelayedCalls())


class LocalDeliveryTests(QueueManagerTestBase):

    @defer.inlineCallbacks
    def test_local_recipients_delivered_then_queue_file_removed(self):
        q = yield self.enqueue(["alice@example.test", "Bob@Example.TEST"])
        [a] = self.mailbox("alice")
        [b] = self.mailbox("bob")
        self.assertTrue(a.startswith(b"Return-Path: <a@ext.test>\nDelivered-To: alice@example.test\n"))
        self.assertTrue(b.startswith(b"Return-Path: <a@ext.test>\nDelivered-To: bob@example.test\n"))
        self.assertTrue(a.endswith(b"\nSubject: hi\n\nHello.\n"))
        self.assertEqual(self.queued(), [])
        self.assertEqual(len(os.listdir(self.spool.free_dir)), 1)
        self.assertEqual(self.pending_retries(), [])
        self.assertIsNone(q.data)          # no bytes kept after the attempt
        self.assertEqual(self.lines(q.qid)[-1], f"{q.qid}: removed")

    @defer.inlineCallbacks
    def test_postfix_style_log_lines(self):
        q = yield self.commit(["Bob@Example.TEST", "al@example.test"])
        self.clock.advance(5)
        self.manager.submit(q)
        yield self.manager.when_idle()
        lines = self.lines(q.qid)
        self.assertEqual(lines, [
            # Case alone does not make an orig_to.
            f"{q.qid}: to=<bob@example.test>, delay=5.00, dsn=2.0.0, "
            "status=sent (delivered to maildir)",
            f"{q.qid}: to=<alice@example.test>, orig_to=<al@example.test>, delay=5.00, "
            "dsn=2.0.0, status=sent (delivered to maildir)",
            f"{q.qid}: removed",
        ])
        sent = [e for e in self.events if e.get("status") == "sent"]
        self.assertEqual({e["qid"] for e in sent}, {q.qid})

    @defer.inlineCallbacks
    def test_same_address_case_is_not_repeated_as_orig_to(self):
        q = yield self.enqueue(["alice@example.test"])
        [line] = self.status_lines(q.qid, "alice@example.test")
        self.assertRegex(line, r"^\w+: to=<alice@example\.test>, delay=\d+\.\d\d, "
                               r"dsn=2\.0\.0, status=sent \(delivered to maildir\)$")

    @defer.inlineCallbacks
    def test_alias_expansion_delivers_to_each_member_once(self):
        q = yield self.enqueue(["locals@example.test"])
        self.assertEqual(len(self.mailbox("alice")), 1)
        self.assertEqual(len(self.mailbox("bob")), 1)
        self.assertEqual(self.queued(), [])
        self.assertEqual(len(self.status_lines(q.qid, "alice@example.test")), 1)
        self.assertIn("orig_to=<locals@example.test>", self.status_lines(q.qid, "bob@example.test")[0])

    @defer.inlineCallbacks
    def test_large_message_is_delivered_from_the_file(self):
        body = b"Subject: big\r\n\r\n" + (b"y" * 78 + b"\r\n") * 5000
        q = yield self.enqueue(["alice@example.test"], body=body)
        self.assertIsNone(q.data)
        [m] = self.mailbox("alice")
        self.assertTrue(m.endswith(body.replace(b"\r\n", b"\n")))

    @defer.inlineCallbacks
    def test_many_messages(self):
        qs = yield defer.gatherResults([self.commit(["alice@example.test"], body=b"n%d\r\n" % i)
                                        for i in range(30)])
        for q in qs:
            self.manager.submit(q)
        yield self.manager.when_idle()
        self.assertEqual(len(self.mailbox("alice")), 30)
        self.assertEqual(self.queued(), [])


class RemoteAndRetryTests(QueueManagerTestBase):

    @defer.inlineCallbacks
    def test_forwarded_user_stays_queued_and_is_retried_on_schedule(self):
        q = yield self.enqueue(["carol@example.test"])
        self.assertEqual(self.queued(), [q.qid])
        self.assertEqual(self.mailbox("carol"), [])
        [line] = self.status_lines(q.qid, "carol@elsewhere.test")
        self.assertIn("orig_to=<carol@example.test>", line)
        self.assertIn("status=deferred (4.4.0 remote delivery is not enabled)", line)
        self.assertEqual(self.pending_retries(), [60])
        yield self.advance(59)
        self.assertEqual(q.attempts, 1)
        yield self.advance(1)
        self.assertEqual(q.attempts, 2)
        self.assertEqual(len(self.status_lines(q.qid, "carol@elsewhere.test")), 2)
        self.assertEqual(self.pending_retries(), [300])
        yield self.advance(300)
        self.assertEqual(self.pending_retries(), [900])
        yield self.advance(900)
        self.assertEqual(self.pending_retries(), [900])     # the last, repeated
        self.assertEqual(q.attempts, 4)
        self.assertEqual(self.queued(), [q.qid])
        self.assertFalse([e for e in self.events if e.get("status") == "bounced"])

    @defer.inlineCallbacks
    def test_non_local_recipient_stays_queued(self):
        q = yield self.enqueue(["someone@remote.test"])
        self.assertEqual(self.queued(), [q.qid])
        [line] = self.status_lines(q.qid, "someone@remote.test")
        self.assertIn("status=deferred", line)
        self.assertEqual(self.pending_retries(), [60])

    @defer.inlineCallbacks
    def test_alias_with_an_outside_member(self):
        q = yield self.enqueue(["team@example.test"])
        self.assertEqual(len(self.mailbox("alice")), 1)
        self.assertEqual(len(self.mailbox("bob")), 1)
        self.assertEqual(self.queued(), [q.qid, q.qid + ".done"])
        [line] = self.status_lines(q.qid, "ext@remote.test")
        self.assertIn("orig_to=<team@example.test>, ", line)
        self.assertIn("status=deferred", line)
        yield self.advance(60)
        # Only the outside member is tried again.
        self.assertEqual(len(self.mailbox("alice")), 1)
        self.assertEqual(len(self.mailbox("bob")), 1)
        self.assertEqual(len(self.status_lines(q.qid, "alice@example.test")), 1)
        self.assertEqual(len(self.status_lines(q.qid, "ext@remote.test")), 2)

    @defer.inlineCallbacks
    def test_remote_mail_survives_a_restart(self):
        q = yield self.enqueue(["carol@example.test", "x@remote.test"])
        yield self.restart()
        self.assertEqual(self.queued(), [q.qid])
        # Its next attempt was due in a minute: a restart keeps that slot
        # (and the schedule goes on from the attempts on record).
        self.assertEqual(len(self.status_lines(q.qid, "carol@elsewhere.test")), 1)
        self.assertEqual(self.pending_retries(), [60])
        yield self.advance(60)
        self.assertEqual(len(self.status_lines(q.qid, "carol@elsewhere.test")), 2)
        self.assertEqual(self.pending_retries(), [300])


class DirectoryOutageTests(QueueManagerTestBase):

    @defer.inlineCallbacks
    def test_directory_down_defers_then_delivers(self):
        self.directory.down = True
        q = yield self.enqueue(["alice@example.test", "bob@example.test"])
        self.assertEqual(self.queued(), [q.qid])
        self.assertEqual(self.mailbox("alice"), [])
        lines = self.lines(q.qid)
        self.assertEqual(len(lines), 2)
        for line in lines:
            self.assertIn("status=deferred (4.4.3 directory unavailable", line)
        self.assertEqual(self.pending_retries(), [60])
        self.directory.down = False
        yield self.advance(60)
        self.assertEqual(len(self.mailbox("alice")), 1)
        self.assertEqual(len(self.mailbox("bob")), 1)
        self.assertEqual(self.queued(), [])
        self.assertEqual(self.pending_retries(), [])

    @defer.inlineCallbacks
    def test_directory_down_for_some_recipients_only(self):
        real = self.directory.lookup
        calls = []

        def lookup(address):
            calls.append(address)
            if address.startswith("bob") and self.directory.down_for_bob:
                return defer.fail(DirectoryUnavailable("timeout"))
            return real(address)
        self.directory.down_for_bob = True
        self.patch(self.directory, "lookup", lookup)
        q = yield self.enqueue(["alice@example.test", "bob@example.test"])
        self.assertEqual(len(self.mailbox("alice")), 1)
        self.assertEqual(self.queued(), [q.qid, q.qid + ".done"])
        self.directory.down_for_bob = False
        yield self.advance(60)
        self.assertEqual(len(self.mailbox("alice")), 1)
        self.assertEqual(len(self.mailbox("bob")), 1)
        self.assertEqual(self.queued(), [])

    @defer.inlineCallbacks
    def test_unexpected_directory_error_defers(self):
        def broken(address):
            return defer.fail(RuntimeError("ldap client bug"))
        self.patch(self.directory, "expand", broken)
        q = yield self.enqueue(["alice@example.test"])
        self.flushLoggedErrors(RuntimeError)
        self.assertEqual(self.queued(), [q.qid])
        [line] = self.lines(q.qid)
        self.assertIn("status=deferred", line)
        self.assertEqual(self.pending_retries(), [60])

    @defer.inlineCallbacks
    def test_unknown_user_at_delivery_time_bounces_once(self):
        q = yield self.enqueue(["gone@example.test", "alice@example.test"],
                               sender="bob@example.test")
        [line] = self.status_lines(q.qid, "gone@example.test")
        self.assertRegex(line, r"status=bounced \(5\.1\.1 user unknown\)$")
        self.assertEqual(len(self.mailbox("alice")), 1)
        yield self.advance(0)
        self.assertEqual(self.queued(), [])
        [bounce] = self.mailbox("bob")          # the sender is told, once
        self.assertIn(b"Final-Recipient: rfc822; gone@example.test", bounce)
        self.assertEqual(self.pending_retries(), [])
        yield self.advance(3600)
        self.assertEqual(len(self.status_lines(q.qid, "gone@example.test")), 1)

    @defer.inlineCallbacks
    def test_unknown_user_is_not_retried_while_others_are(self):
        q = yield self.enqueue(["gone@example.test", "carol@example.test"])
        self.assertIn("0:*", q.done)
        yield self.advance(60)
        self.assertEqual(len(self.status_lines(q.qid, "gone@example.test")), 1)
        self.assertEqual(len(self.status_lines(q.qid, "carol@elsewhere.test")), 2)


class DiskTroubleTests(QueueManagerTestBase):

    @defer.inlineCallbacks
    def test_maildir_disk_error_defers_and_retries(self):
        broken = [True]
        real = os.fsync

        def fsync(fd):
            if broken[0] and "/mail/" in os.readlink(f"/proc/self/fd/{fd}"):
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(fd)
        self.patch(os, "fsync", fsync)
        q = yield self.enqueue(["alice@example.test"])
        [line] = self.lines(q.qid)
        self.assertIn("status=deferred (cannot write mailbox", line)
        self.assertEqual(self.queued(), [q.qid])
        broken[0] = False
        yield self.advance(60)
        self.assertEqual(len(self.mailbox("alice")), 1)
        self.assertEqual(self.queued(), [])

    @defer.inlineCallbacks
    def test_unsafe_mailbox_bounces(self):
        self.directory.add_user("evil", "../../etc@example.test")
        q = yield self.enqueue(["../../etc@example.test"], sender="")
        for _ in range(3):
            yield self.advance(0)
        [line] = self.lines(q.qid)[:1]
        self.assertIn("status=bounced (unsafe mailbox name", line)
        self.assertEqual(self.queued(), [])
        self.assertFalse(os.path.exists(os.path.join(self.root, "etc")))

    @defer.inlineCallbacks
    def test_failed_removal_does_not_deliver_again(self):
        real = self.spool.remove
        calls = []

        def remove(qmsg):
            calls.append(qmsg.qid)
            if len(calls) == 1:
                return defer.fail(OSError(errno.EIO, "I/O error"))
            return real(qmsg)
        self.patch(self.spool, "remove", remove)
        q = yield self.enqueue(["alice@example.test", "bob@example.test"])
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
        self.assertEqual(self.pending_retries(), [60])
        # Alice reads her copy meanwhile: it moves to cur/.
        box = os.path.join(self.root, "mail", "example.test", "alice", "Maildir")
        [name] = os.listdir(os.path.join(box, "new"))
        os.rename(os.path.join(box, "new", name), os.path.join(box, "cur", name + ":2,S"))
        yield self.advance(60)
        self.assertEqual(calls, [q.qid, q.qid])
        self.assertEqual(self.mailbox("alice"), [])
        self.assertEqual(len(self.mailbox("bob")), 1)
        self.assertEqual(len(self.status_lines(q.qid, "alice@example.test")), 1)
        self.assertEqual(self.queued(), [])

    @defer.inlineCallbacks
    def test_failed_done_record_does_not_deliver_again(self):
        real = self.spool.mark_done

        def mark_done(qmsg, keys):
            qmsg.done.update(keys)
            return defer.fail(OSError(errno.EIO, "I/O error"))
        self.patch(self.spool, "mark_done", mark_done)
        q = yield self.enqueue(["alice@example.test", "carol@example.test"])
        self.flushLoggedErrors(OSError)
        self.patch(self.spool, "mark_done", real)
        yield self.advance(60)
        self.assertEqual(len(self.mailbox("alice")), 1)
        self.assertEqual(len(self.status_lines(q.qid, "alice@example.test")), 1)

    @defer.inlineCallbacks
    def test_crashing_agent_does_not_redeliver_earlier_recipients(self):
        real = self.local.deliver

        def deliver(qmsg, user, to, idx, key):
            if user.uid == "bob":
                raise RuntimeError("agent bug")
            return real(qmsg, user, to, idx, key)
        self.patch(self.local, "deliver", deliver)
        q = yield self.enqueue(["alice@example.test", "bob@example.test"])
        self.flushLoggedErrors(RuntimeError)
        self.assertEqual(len(self.mailbox("alice")), 1)
        self.assertIn("status=deferred", self.status_lines(q.qid, "bob@example.test")[0])
        self.patch(self.local, "deliver", real)
        yield self.advance(60)
        self.assertEqual(len(self.mailbox("alice")), 1)
        self.assertEqual(len(self.mailbox("bob")), 1)
        self.assertEqual(self.queued(), [])


class CrashRecoveryTests(QueueManagerTestBase):

    @defer.inlineCallbacks
    def test_partial_delivery_is_recorded_and_not_repeated_after_restart(self):
        q = yield self.enqueue(["alice@example.test", "carol@example.test"])
        self.assertEqual(len(self.mailbox("alice")), 1)
        with open(q.path + ".done", "rb") as f:
            record = f.read().decode().split("\n")
        self.assertIn(f"0:L:{self.alice.dn}", record)
        self.assertIn("0:*", record)
        self.assertNotIn("1:*", record)
        yield self.restart()
        yield self.advance(60)          # its next slot, kept across the restart
        self.assertEqual(len(self.mailbox("alice")), 1)
        self.assertEqual(len(self.status_lines(q.qid, "alice@example.test")), 1)
        self.assertEqual(len(self.status_lines(q.qid, "carol@elsewhere.test")), 2)
        self.assertEqual(self.queued(), [q.qid, q.qid + ".done"])

    @defer.inlineCallbacks
    def test_crash_between_maildir_rename_and_queue_removal(self):
        # The previous process wrote the Maildir file and died before its
        # done-record or the removal: the recovered message finds the file.
        q = yield self.commit(["alice@example.test", "bob@example.test"])
        written = yield self.local.deliver(q, self.alice, "alice@example.test", 0,
                                           "L:" + self.alice.dn)
        self.assertTrue(written)
        yield self.restart()
        self.assertEqual(len(self.mailbox("alice")), 1)
        self.assertEqual(len(self.mailbox("bob")), 1)
        [line] = self.status_lines(q.qid, "alice@example.test")
        self.assertIn("status=sent (already delivered)", line)
        self.assertEqual(self.queued(), [])

    @defer.inlineCallbacks
    def test_message_committed_before_a_crash_is_delivered_once_after_restart(self):
        body = b"Subject: s\r\n\r\nfrom the file\r\n"
        q = yield self.commit(["alice@example.test"], body=body)
        yield self.restart()
        [m] = self.mailbox("alice")
        self.assertTrue(m.endswith(b"\n\nfrom the file\n"))
        self.assertEqual(self.queued(), [])
        self.assertIn(f"{q.qid}: removed", self.lines(q.qid))

    @defer.inlineCallbacks
    def test_uncommitted_message_is_not_delivered_after_restart(self):
        inc = self.spool.new_message(Envelope(sender="a@ext.test",
                                              recipients=["alice@example.test"]))
        inc.write_header()
        inc.write(b"Subject: x\r\n\r\n" + b"z" * (inc.SPILL + 10))
        for _ in range(200):
            if os.listdir(self.spool.tmp_dir):
                break
            yield task.deferLater(reactor, 0.01, lambda: None)
        self.assertEqual(os.listdir(self.spool.tmp_dir), [inc.qid])
        yield self.restart()
        self.assertEqual(self.mailbox("alice"), [])
        self.assertEqual(os.listdir(self.spool.tmp_dir), [])
        self.assertEqual(self.queued(), [])

    @defer.inlineCallbacks
    def test_corrupt_queue_file_does_not_stop_recovery(self):
        good = yield self.commit(["alice@example.test"])
        with open(os.path.join(self.spool.active_dir, "00BAD"), "wb") as f:
            f.write(b"MAQ1\n{garbage\nbody")
        yield self.restart()
        self.assertEqual(len(self.mailbox("alice")), 1)
        self.assertEqual(os.listdir(self.spool.corrupt_dir), ["00BAD"])
        self.assertEqual(self.queued(), [])
        self.assertIn(f"{good.qid}: removed", self.lines(good.qid))

    @defer.inlineCallbacks
    def test_message_received_during_recovery_is_attempted_once(self):
        # The listeners run while recovery lists active/ in a thread; a
        # message committed then is submitted by its receiver and may be
        # listed by recovery too.
        yield self.manager.stopService()
        gate = threading.Event()
        real_recover = self.spool.recover

        def slow_recover():
            gate.wait(10)
            return real_recover()
        self.patch(self.spool, "recover", slow_recover)
        self.addCleanup(gate.set)
        wait = defer.Deferred()
        self.directory.delay = wait
        recovered = self.manager.startService()
        q = yield self.commit(["alice@example.test", "carol@example.test"])
        self.manager.submit(q)          # its attempt waits for the directory
        gate.set()
        yield task.deferLater(reactor, 0.05, lambda: None)
        yield recovered
        self.directory.delay = None
        wait.callback(None)
        yield self.manager.when_idle()
        yield task.deferLater(reactor, 0, lambda: None)
        yield self.manager.when_idle()
        self.assertEqual(len(self.mailbox("alice")), 1)
        self.assertEqual(len(self.status_lines(q.qid, "alice@example.test")), 1)
        self.assertEqual(len(self.status_lines(q.qid, "carol@elsewhere.test")), 1)
        self.assertEqual(self.pending_retries(), [60])

    @defer.inlineCallbacks
    def test_submit_while_waiting_or_in_flight_is_ignored(self):
        q = yield self.commit(["carol@example.test"])
        wait = defer.Deferred()
        self.directory.delay = wait
        self.manager.submit(q)
        self.manager.submit(q)
        self.directory.delay = None
        wait.callback(None)
        yield self.manager.when_idle()
        self.assertEqual(q.attempts, 1)
        self.assertEqual(self.pending_retries(), [60])
        self.manager.submit(q)          # an early retry replaces the timer
        yield self.manager.when_idle()
        self.assertEqual(q.attempts, 2)
        self.assertEqual(self.pending_retries(), [300])

    @defer.inlineCallbacks
    def test_stop_cancels_retries(self):
        yield self.enqueue(["carol@example.test"])
        self.assertEqual(self.pending_retries(), [60])
        yield self.manager.stopService()
        self.assertEqual(self.pending_retries(), [])
