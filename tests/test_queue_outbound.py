"""The queue manager with a remote agent: grouping, lanes, notices, expiry, admin controls.

A scripted fake stands in for the SMTP agent; the spool, the Maildir agent and
the notices are real, so a bounce is a real multipart/report in a real mailbox.
"""

import email
import email.policy
import json
import os

from twisted.internet import defer, reactor, task
from zope.interface import implementer

from mailbox_appliance.delivery.result import BOUNCED, DEFERRED, SENT, RecipientResult
from mailbox_appliance.interfaces import IRemoteDelivery
from mailbox_appliance.queue.manager import QueueManager
from mailbox_appliance.queue.notices import wants
from tests.test_queue_manager import ManagerReactor, QueueManagerTestBase

HOUR = 3600
DAY = 24 * HOUR


@implementer(IRemoteDelivery)
class FakeRemote:
    """Answers per recipient address from ``script`` (default: sent)."""

    def __init__(self):
        self.calls = []
        self.script = {}
        self.hang = set()          # domains whose deliveries never answer
        self.flushed = []
        self.passed_on = False
        self.hanging = []

    def release_hung(self):
        """Answer every hanging delivery: deferred."""
        hung, self.hanging = self.hanging, []
        for d, recipients in hung:
            d.callback({r.idx: RecipientResult(DEFERRED, "4.4.1", "4.4.1 connection timed out")
                        for r in recipients})

    def deliver(self, message, domain, recipients):
        self.calls.append((message.qid, domain, [r.address for r in recipients],
                           [(r.notify, r.orcpt) for r in recipients]))
        if domain in self.hang:
            d = defer.Deferred()
            self.hanging.append((d, recipients))
            return d
        out = {}
        for r in recipients:
            kind = self.script.get(r.address, SENT)
            if kind == SENT:
                out[r.idx] = RecipientResult(SENT, "2.0.0", "250 2.0.0 Ok", "mx." + domain,
                                             True, self.passed_on)
            elif kind == DEFERRED:
                out[r.idx] = RecipientResult(DEFERRED, "4.2.1", "451 4.2.1 Mailbox busy",
                                             "mx." + domain, True)
            else:
                out[r.idx] = RecipientResult(BOUNCED, "5.1.1",
                                             f"550 5.1.1 <{r.address}>: User unknown",
                                             "mx." + domain, True)
        return defer.succeed(out)

    def flush(self, domain=None):
        self.flushed.append(domain)


class OutboundTestBase(QueueManagerTestBase):

    @defer.inlineCallbacks
    def start(self):
        if not hasattr(self, "remote"):
            self.remote = FakeRemote()
        # The manager is built by the base; swap in one that has the remote agent.
        yield super().start()
        yield self.manager.stopService()
        self.manager = QueueManager(ManagerReactor(self.clock), self.config, self.spool,
                                    self.router, self.local, remote_agent=self.remote,
                                    concurrency=4, retry_concurrency=2)
        manager = self.manager
        self.addCleanup(lambda: manager.stopService() if manager.running else None)
        # Cleanups run last-added first: hung deliveries are answered before
        # the manager's stop waits for them.
        self.addCleanup(self.remote.release_hung)
        yield self.manager.startService()
        yield self.manager.when_idle()

    @defer.inlineCallbacks
    def settle(self):
        """Let notices (new messages) be committed and delivered."""
        for _ in range(4):
            yield self.advance(0)

    def notices(self, local="alice"):
        return [email.message_from_bytes(m, policy=email.policy.default)
                for m in self.mailbox(local)]

    @staticmethod
    def report_fields(msg):
        """(per-message fields, [per-recipient fields]) of a delivery-status part."""
        [status] = [p for p in msg.walk() if p.get_content_type() == "message/delivery-status"]
        blocks = status.get_payload()
        return blocks[0], blocks[1:]


class GroupingTests(OutboundTestBase):

    @defer.inlineCallbacks
    def test_one_transaction_per_domain(self):
        q = yield self.enqueue(["a@one.test", "b@one.test", "c@two.test", "bob@example.test"])
        yield self.settle()
        calls = sorted((d, addrs) for _, d, addrs, _ in self.remote.calls)
        self.assertEqual(calls, [("one.test", ["a@one.test", "b@one.test"]),
                                 ("two.test", ["c@two.test"])])
        self.assertEqual(len(self.mailbox("bob")), 1)
        self.assertEqual(self.queued(), [])
        [line] = self.status_lines(q.qid, "a@one.test")
        self.assertIn("relay=mx.one.test, ", line)
        self.assertIn("dsn=2.0.0, status=sent (250 2.0.0 Ok)", line)

    @defer.inlineCallbacks
    def test_mixed_results_are_kept_per_recipient(self):
        self.remote.script = {"busy@one.test": DEFERRED, "gone@one.test": BOUNCED}
        q = yield self.enqueue(["ok@one.test", "busy@one.test", "gone@one.test"],
                               sender="alice@example.test")
        yield self.settle()
        self.assertEqual(q.done, {"0:R:ok@one.test", "0:*", "2:R:gone@one.test", "2:*"})
        # The bounce went to the sender, a local user: a real report in her INBOX.
        [dsn] = self.notices()
        self.assertEqual(dsn.get_content_type(), "multipart/report")
        self.assertEqual(dsn["Auto-Submitted"], "auto-replied")
        _, [rcpt] = self.report_fields(dsn)
        self.assertEqual(rcpt["Final-Recipient"], "rfc822; gone@one.test")
        self.assertEqual(rcpt["Action"], "failed")
        self.assertEqual(rcpt["Status"], "5.1.1")
        self.assertIn("550 5.1.1 <gone@one.test>: User unknown", rcpt["Diagnostic-Code"])
        self.assertIn("mx.one.test", rcpt["Remote-MTA"])
        # Only the deferred one is tried again, and its last error is on record.
        with open(q.path + ".status", "rb") as f:
            record = json.loads(f.read())
        self.assertEqual(record["rcpt"]["1"]["reply"], "451 4.2.1 Mailbox busy")
        self.assertEqual(record["attempts"], 1)
        self.remote.calls.clear()
        self.remote.script = {}
        yield self.advance(60)
        self.assertEqual([c[2] for c in self.remote.calls], [["busy@one.test"]])
        self.assertEqual(self.queued(), [])
        self.assertEqual(len(self.notices()), 1)

    @defer.inlineCallbacks
    def test_dsn_parameters_are_handed_to_the_agent(self):
        q = yield self.commit(["a@one.test", "b@one.test"])
        q.envelope.notify = ["SUCCESS,FAILURE", ""]
        q.envelope.orcpt = ["rfc822;a@one.test", ""]
        self.manager.submit(q)
        yield self.manager.when_idle()
        # (The second call is the "relayed" notice SUCCESS asked for, to a@ext.test.)
        [params] = [c[3] for c in self.remote.calls if c[1] == "one.test"]
        self.assertEqual(params, [("SUCCESS,FAILURE", "rfc822;a@one.test"), ("", "")])

    @defer.inlineCallbacks
    def test_forwarded_local_user_goes_out_through_the_agent(self):
        yield self.enqueue(["carol@example.test"])
        self.assertEqual([c[1:3] for c in self.remote.calls],
                         [("elsewhere.test", ["carol@elsewhere.test"])])
        self.assertEqual(self.queued(), [])


class LaneTests(OutboundTestBase):

    @defer.inlineCallbacks
    def test_backlog_of_retries_does_not_hold_up_fresh_mail(self):
        self.remote.hang.add("dead.test")
        stuck = []
        for _ in range(6):
            q = yield self.commit(["x@dead.test"])
            q.attempts = 3              # a retry, as after earlier failures
            stuck.append(q)
            self.manager.submit(q)
        # Two retry slots are busy for good; four retries wait behind them.
        self.assertEqual(self.manager.retries.active, 2)
        self.assertEqual(len(self.manager.retries.waiting), 4)
        fresh = yield self.commit(["bob@example.test", "y@live.test"])
        self.manager.submit(fresh)
        # (Not self.advance: the manager is never idle while retries hang.)
        for _ in range(200):
            if len(self.mailbox("bob")) == 1 and fresh.qid not in self.manager._inflight:
                break
            yield task.deferLater(reactor, 0.01, lambda: None)
        self.assertEqual(len(self.mailbox("bob")), 1)
        self.assertIn((fresh.qid, "live.test"), [(c[0], c[1]) for c in self.remote.calls])
        self.assertNotIn(fresh.qid, self.queued())


class NoticeTests(OutboundTestBase):

    def test_notify_rules(self):
        self.assertTrue(wants("", "FAILURE"))
        self.assertTrue(wants("", "DELAY"))
        self.assertFalse(wants("", "SUCCESS"))
        self.assertFalse(wants("NEVER", "FAILURE"))
        self.assertTrue(wants("success,delay", "DELAY"))
        self.assertFalse(wants("SUCCESS", "FAILURE"))

    @defer.inlineCallbacks
    def test_delay_warning_once_then_bounce_at_max_age(self):
        self.remote.script = {"slow@one.test": DEFERRED}
        q = yield self.enqueue(["slow@one.test"], sender="alice@example.test")
        yield self.settle()
        self.assertEqual(self.notices(), [])
        yield self.advance(4 * HOUR)
        yield self.settle()
        [warning] = self.notices()
        self.assertIn("Delayed", warning["Subject"])
        _, [rcpt] = self.report_fields(warning)
        self.assertEqual(rcpt["Action"], "delayed")
        self.assertEqual(rcpt["Status"], "4.2.1")
        self.assertIn("Will-Retry-Until", rcpt)
        # Headers only in a delay notice: the body is not returned.
        self.assertNotIn(b"Hello.", self.mailbox("alice")[0])
        for _ in range(30):
            yield self.advance(HOUR)
        yield self.settle()
        self.assertEqual(len(self.notices()), 1)        # no second warning
        yield self.advance(5 * DAY)
        yield self.settle()
        notices = self.notices()
        self.assertEqual(len(notices), 2)
        bounce = notices[1]
        self.assertIn("Undelivered", bounce["Subject"])
        _, [rcpt] = self.report_fields(bounce)
        self.assertEqual(rcpt["Action"], "failed")
        self.assertIn("delivery time expired", rcpt["Diagnostic-Code"])
        self.assertNotIn(q.qid, self.queued())
        self.assertEqual(self.pending_retries(), [])

    @defer.inlineCallbacks
    def test_last_retry_falls_on_max_age(self):
        self.remote.script = {"slow@one.test": DEFERRED}
        self.config = self.config.__class__(**{**self.config.__dict__, "delivery":
                                                self.config.delivery.__class__(
                                                    **{**self.config.delivery.__dict__,
                                                       "max_age": "10m"})})
        yield self.restart()
        yield self.enqueue(["slow@one.test"], sender="alice@example.test")
        self.assertEqual(self.pending_retries(), [60])
        yield self.advance(60)
        self.assertEqual(self.pending_retries(), [300])
        yield self.advance(300)
        self.assertEqual(self.pending_retries(), [240])   # 15m would pass max_age
        yield self.advance(240)
        yield self.settle()
        self.assertEqual(self.pending_retries(), [])
        [bounce] = self.notices()
        self.assertIn("Undelivered", bounce["Subject"])

    @defer.inlineCallbacks
    def test_success_notice_only_when_asked(self):
        q = yield self.commit(["bob@example.test", "far@one.test", "quiet@one.test"],
                              sender="alice@example.test")
        q.envelope.notify = ["SUCCESS", "SUCCESS,FAILURE", ""]
        self.manager.submit(q)
        yield self.manager.when_idle()
        yield self.settle()
        [report] = self.notices()
        _, rcpts = self.report_fields(report)
        actions = {r["Final-Recipient"]: r["Action"] for r in rcpts}
        self.assertEqual(actions, {"rfc822; bob@example.test": "delivered",
                                   "rfc822; far@one.test": "relayed"})

    @defer.inlineCallbacks
    def test_no_success_notice_when_the_next_hop_took_the_request(self):
        self.remote.passed_on = True
        q = yield self.commit(["far@one.test"], sender="alice@example.test")
        q.envelope.notify = ["SUCCESS"]
        self.manager.submit(q)
        yield self.manager.when_idle()
        yield self.settle()
        self.assertEqual(self.notices(), [])

    @defer.inlineCallbacks
    def test_notify_never_means_no_bounce(self):
        self.remote.script = {"gone@one.test": BOUNCED}
        q = yield self.commit(["gone@one.test"], sender="alice@example.test")
        q.envelope.notify = ["NEVER"]
        self.manager.submit(q)
        yield self.manager.when_idle()
        yield self.settle()
        self.assertEqual(self.notices(), [])
        self.assertEqual(self.queued(), [])

    @defer.inlineCallbacks
    def test_null_sender_failure_goes_to_the_postmaster_once(self):
        # The postmaster is bob here; a notice is never sent to <>.
        self.directory.users["postmaster@example.test"] = self.bob
        self.remote.script = {"gone@one.test": BOUNCED}
        yield self.enqueue(["gone@one.test"], sender="")
        yield self.settle()
        [copy] = self.notices("bob")
        self.assertIn("Undelivered", copy["Subject"])
        self.assertEqual(self.queued(), [])

    @defer.inlineCallbacks
    def test_undeliverable_postmaster_copy_is_dropped(self):
        # postmaster@ is unknown: the copy itself fails, and nothing follows.
        self.remote.script = {"gone@one.test": BOUNCED}
        q = yield self.enqueue(["gone@one.test"], sender="")
        for _ in range(6):
            yield self.settle()
        self.assertEqual(self.queued(), [])
        self.assertTrue([l for l in self.lines() if "postmaster notice undeliverable" in l])
        self.assertEqual(len([l for l in self.lines(q.qid) if "postmaster notification" in l]),
                         1)

    @defer.inlineCallbacks
    def test_unknown_local_user_at_delivery_time_is_reported(self):
        yield self.enqueue(["gone@example.test"], sender="alice@example.test")
        yield self.settle()
        [bounce] = self.notices()
        _, [rcpt] = self.report_fields(bounce)
        self.assertEqual(rcpt["Status"], "5.1.1")


class ControlTests(OutboundTestBase):

    @defer.inlineCallbacks
    def test_hold_release_delete(self):
        self.remote.script = {"x@one.test": DEFERRED}
        q = yield self.enqueue(["x@one.test"])
        count = yield self.manager.hold(q.qid)
        self.assertEqual(count, 1)
        self.assertEqual(self.queued(), [])
        self.assertIn(q.qid, os.listdir(self.spool.hold_dir))
        self.assertEqual(self.pending_retries(), [])
        yield self.advance(3600)
        self.assertEqual(len(self.remote.calls), 1)
        # Held messages survive a restart as held.
        yield self.restart()
        self.assertIn(q.qid, self.manager._held)
        self.remote.script = {}
        count = yield self.manager.release(q.qid)
        self.assertEqual(count, 1)
        yield self.manager.when_idle()
        self.assertEqual(len(self.remote.calls), 2)
        self.assertEqual(self.queued(), [])
        self.assertRaises(KeyError, self.manager.delete, "NOSUCHID")

    @defer.inlineCallbacks
    def test_delete_drops_without_notice(self):
        self.remote.script = {"x@one.test": DEFERRED}
        q = yield self.enqueue(["x@one.test"], sender="alice@example.test")
        yield self.manager.delete(q.qid)
        self.assertEqual(self.queued(), [])
        self.assertEqual(self.pending_retries(), [])
        yield self.settle()
        self.assertEqual(self.notices(), [])

    @defer.inlineCallbacks
    def test_hold_during_an_attempt_waits_for_it(self):
        self.remote.hang.add("one.test")
        q = yield self.commit(["x@one.test"])
        self.manager.submit(q)
        self.assertEqual(self.manager.hold(q.qid), 1)
        [(_, _, _, _)] = self.remote.calls
        self.assertIn(q.qid, self.queued())
        self.remote.release_hung()
        yield self.manager.when_idle()
        yield self.advance(0)
        self.assertNotIn(q.qid, self.queued())
        self.assertIn(q.qid, os.listdir(self.spool.hold_dir))
        self.assertEqual(self.pending_retries(), [])

    @defer.inlineCallbacks
    def test_flush_by_domain_and_all(self):
        self.remote.script = {"x@one.test": DEFERRED, "y@two.test": DEFERRED}
        yield self.enqueue(["x@one.test"])
        yield self.enqueue(["y@two.test"])
        self.remote.calls.clear()
        self.assertEqual(self.manager.flush("one.test"), 1)
        yield self.manager.when_idle()
        self.assertEqual([c[1] for c in self.remote.calls], ["one.test"])
        self.assertEqual(self.remote.flushed, ["one.test"])
        self.assertEqual(self.manager.flush(), 2)
        yield self.manager.when_idle()
        self.assertEqual(len(self.remote.calls), 3)


class ReviewRegressionTests(OutboundTestBase):
    """Failure paths between the steps of an attempt."""

    @defer.inlineCallbacks
    def test_a_notice_that_could_not_be_queued_is_sent_by_the_next_attempt(self):
        self.remote.script = {"gone@one.test": BOUNCED}
        real_commit = self.spool.commit
        calls = []

        def failing_once(inc):
            calls.append(inc)
            if len(calls) == 2:         # the first is the message, the second its bounce
                inc.abort()
                return defer.fail(OSError(28, "No space left on device"))
            return real_commit(inc)
        self.patch(self.spool, "commit", failing_once)
        q = yield self.enqueue(["gone@one.test"], sender="alice@example.test")
        self.flushLoggedErrors(OSError)
        self.assertIn(q.qid, self.queued())
        self.assertNotIn("0:*", q.done)
        self.assertEqual(self.pending_retries(), [60])
        yield self.advance(60)
        yield self.settle()
        [bounce] = self.notices()
        self.assertIn("Undelivered", bounce["Subject"])
        self.assertNotIn(q.qid, self.queued())

    @defer.inlineCallbacks
    def test_lmtp_failures_are_left_to_the_client(self):
        q = yield self.commit(["gone@example.test", "bob@example.test"],
                              sender="alice@example.test")
        statuses = yield self.manager.deliver_now(q)
        self.assertEqual(statuses, {0: "bounced", 1: "sent"})
        yield self.settle()
        self.assertEqual(self.notices(), [])      # the LMTP client got the 550

    @defer.inlineCallbacks
    def test_lmtp_crash_after_delivery_does_not_hand_back_delivered_recipients(self):
        q = yield self.commit(["bob@example.test", "carol@example.test"])

        def broken(qmsg, keys):
            return defer.fail(OSError(5, "Input/output error"))
        self.patch(self.spool, "mark_done", broken)
        statuses = yield self.manager.deliver_now(q)
        self.flushLoggedErrors(OSError)
        # bob has his copy; carol's forward stays with the queue.
        self.assertEqual(statuses, {0: "sent", 1: "queued"})
        self.assertEqual(len(self.mailbox("bob")), 1)

    @defer.inlineCallbacks
    def test_release_cancels_a_hold_asked_during_an_attempt(self):
        self.remote.hang.add("one.test")
        q = yield self.commit(["x@one.test"])
        self.manager.submit(q)
        self.assertEqual(self.manager.hold(q.qid), 1)
        self.assertEqual(self.manager.release(q.qid), 1)
        self.remote.release_hung()
        yield self.manager.when_idle()
        self.assertNotIn(q.qid, os.listdir(self.spool.hold_dir))
        self.assertEqual(self.pending_retries(), [60])

    @defer.inlineCallbacks
    def test_flush_of_one_message_forgets_only_its_destinations(self):
        self.remote.script = {"x@one.test": DEFERRED}
        q = yield self.enqueue(["x@one.test"])
        self.remote.flushed.clear()
        self.assertEqual(self.manager.flush(q.qid), 1)
        yield self.manager.when_idle()
        self.assertEqual(self.remote.flushed, ["one.test"])

    @defer.inlineCallbacks
    def test_etrn_at_domain_takes_subdomains_and_routed_destinations(self):
        self.remote.script = {"x@a.one.test": DEFERRED, "carol@elsewhere.test": DEFERRED,
                              "y@two.test": DEFERRED}
        yield self.enqueue(["x@a.one.test"])
        yield self.enqueue(["carol@example.test"])
        yield self.enqueue(["y@two.test"])
        self.remote.calls.clear()
        self.assertEqual(self.manager.flush("@one.test"), 1)
        self.assertEqual(self.manager.flush("one.test"), 0)
        yield self.manager.when_idle()
        # The forward's real destination counts, not only the envelope domain.
        self.assertEqual(self.manager.flush("elsewhere.test"), 1)
        yield self.manager.when_idle()
        self.assertEqual(sorted(c[1] for c in self.remote.calls),
                         ["a.one.test", "elsewhere.test"])
