"""Per-recipient envelope senders (``Envelope.senders``) through the queue.

A list's distribution is one queue entry whose copies each carry their
member's VERP address as envelope sender: the remote agent is called once
per distinct sender with a view of the message carrying that sender, and
a notice about a copy goes to that copy's sender, one notice per sender.
The spool, Maildir agent and notices are real; the remote agent is a fake
recording (envelope sender, domain, [addresses]) of each call.
"""

import dataclasses
import email
import email.policy
import json

from twisted.internet import defer, reactor, task
from twisted.trial import unittest
from zope.interface import implementer

from mailbox_appliance.delivery.result import BOUNCED, DEFERRED, SENT, RecipientResult
from mailbox_appliance.interfaces import IRemoteDelivery
from mailbox_appliance.queue import manager as manager_module
from mailbox_appliance.queue.spool import Envelope, read_queue_file
from mailbox_appliance.slots import Slots
from tests.test_queue_outbound import OutboundTestBase

ALICE, BOB = "alice@example.test", "bob@example.test"    # local users of the base fixture
S1 = "team-bounces+aaaaaaaaaaaaaaaa@lists.test"
S2 = "team-bounces+bbbbbbbbbbbbbbbb@lists.test"


@implementer(IRemoteDelivery)
class SenderRecorder:
    """Records (envelope sender, domain, [addresses]) per call and answers from
    ``script`` (address -> SENT, DEFERRED, BOUNCED or an exception to raise).
    Domains in ``hang`` answer only when ``release`` is called."""

    def __init__(self):
        self.calls = []
        self.views = []
        self.script = {}
        self.hang = set()
        self.hanging = []

    def deliver(self, message, domain, recipients):
        self.calls.append((message.envelope.sender, domain, [r.address for r in recipients]))
        self.views.append(message)
        for r in recipients:
            if isinstance(self.script.get(r.address), Exception):
                raise self.script[r.address]
        out = {}
        for r in recipients:
            kind = self.script.get(r.address, SENT)
            if kind == SENT:
                out[r.idx] = RecipientResult(SENT, "2.0.0", "250 2.0.0 Ok", "mx." + domain, True)
            elif kind == DEFERRED:
                out[r.idx] = RecipientResult(DEFERRED, "4.2.1", "451 4.2.1 Mailbox busy",
                                             "mx." + domain, True)
            else:
                out[r.idx] = RecipientResult(BOUNCED, "5.1.1",
                                             f"550 5.1.1 <{r.address}>: User unknown",
                                             "mx." + domain, True)
        if domain in self.hang:
            d = defer.Deferred()
            self.hanging.append((d, out))
            return d
        return defer.succeed(out)

    def release(self, n=None):
        """Answer the first ``n`` (all) hanging deliveries with their results."""
        n = len(self.hanging) if n is None else n
        now, self.hanging = self.hanging[:n], self.hanging[n:]
        for d, out in now:
            d.callback(out)

    def release_hung(self):
        self.release()

    def flush(self, domain=None):
        pass


class VerpQueueTests(OutboundTestBase):

    def setUp(self):
        self.remote = SenderRecorder()
        return super().setUp()

    @defer.inlineCallbacks
    def commit_verp(self, recipients, senders, sender="team-bounces@lists.test", **env):
        inc = self.spool.new_message(Envelope(sender=sender, recipients=list(recipients),
                                              arrival=self.clock.seconds(),
                                              senders=list(senders), **env))
        inc.write_header()
        inc.write(b"Received: from x\r\nFrom: a@lists.test\r\nSubject: post\r\n\r\nHi.\r\n")
        q = yield self.spool.commit(inc)
        return q

    @defer.inlineCallbacks
    def enqueue_verp(self, recipients, senders, **kw):
        q = yield self.commit_verp(recipients, senders, **kw)
        self.manager.submit(q)
        yield self.settle()
        return q

    def dsns(self, local):
        out = []
        for raw in self.mailbox(local):
            msg = email.message_from_bytes(raw, policy=email.policy.default)
            _, blocks = self.report_fields(msg)
            out.append((msg, [(b["Final-Recipient"], b["Action"], b["Status"])
                              for b in blocks]))
        return out

    @defer.inlineCallbacks
    def test_one_call_per_distinct_sender(self):
        q = yield self.enqueue_verp(
            ["a@one.test", "b@one.test", "c@one.test", "d@two.test", "e@one.test"],
            [S1, S2, S1, S1, ""])
        calls = sorted(self.remote.calls)
        self.assertEqual(calls, sorted([
            (S1, "one.test", ["a@one.test", "c@one.test"]),
            (S2, "one.test", ["b@one.test"]),
            (S1, "two.test", ["d@two.test"]),
            # An empty entry means the envelope's own sender.
            ("team-bounces@lists.test", "one.test", ["e@one.test"])]))
        # Each view is the same message with its own sender and no per-copy senders.
        for view in self.remote.views:
            self.assertEqual((view.qid, view.size, view.body_offset),
                             (q.qid, q.size, q.body_offset))
            self.assertEqual(view.envelope.recipients, q.envelope.recipients)
            if view is not q:
                self.assertEqual(view.envelope.senders, [])
        # The queue entry itself is unchanged, and gone once all are sent.
        self.assertEqual(q.envelope.sender, "team-bounces@lists.test")
        self.assertEqual(q.envelope.senders, [S1, S2, S1, S1, ""])
        self.assertEqual(self.queued(), [])

    @defer.inlineCallbacks
    def test_without_senders_one_call_per_domain(self):
        yield self.enqueue_verp(["a@one.test", "b@one.test"], [])
        self.assertEqual(self.remote.calls,
                         [("team-bounces@lists.test", "one.test", ["a@one.test", "b@one.test"])])

    @defer.inlineCallbacks
    def test_bounce_goes_to_the_copy_sender(self):
        self.remote.script = {"b@one.test": BOUNCED, "c@one.test": BOUNCED}
        yield self.enqueue_verp(["a@one.test", "b@one.test", "c@one.test"],
                                [ALICE, BOB, ALICE], sender="owner@far.test")
        [(to_alice, alice_blocks)] = self.dsns("alice")
        [(to_bob, bob_blocks)] = self.dsns("bob")
        self.assertEqual(alice_blocks, [("rfc822; c@one.test", "failed", "5.1.1")])
        self.assertEqual(bob_blocks, [("rfc822; b@one.test", "failed", "5.1.1")])
        self.assertEqual(to_alice["To"], ALICE)
        self.assertEqual(to_bob["To"], BOB)
        # Nothing to the envelope's own sender (it would be a remote call to far.test).
        self.assertNotIn("far.test", [d for _, d, _ in self.remote.calls])
        self.assertEqual(self.queued(), [])

    @defer.inlineCallbacks
    def test_one_notice_per_sender(self):
        self.remote.script = {"a@one.test": BOUNCED, "c@two.test": BOUNCED}
        yield self.enqueue_verp(["a@one.test", "b@one.test", "c@two.test"],
                                [ALICE, BOB, ALICE])
        [(_, blocks)] = self.dsns("alice")
        self.assertEqual(sorted(blocks), [("rfc822; a@one.test", "failed", "5.1.1"),
                                          ("rfc822; c@two.test", "failed", "5.1.1")])
        self.assertEqual(self.dsns("bob"), [])

    @defer.inlineCallbacks
    def test_retry_keeps_the_copy_sender(self):
        self.remote.script = {"b@one.test": DEFERRED}
        q = yield self.enqueue_verp(["a@one.test", "b@one.test"], [S1, S2])
        self.assertEqual(q.done, {"0:R:a@one.test", "0:*"})
        self.remote.calls.clear()
        self.remote.script = {}
        yield self.advance(60)
        self.assertEqual(self.remote.calls, [(S2, "one.test", ["b@one.test"])])
        self.assertEqual(self.queued(), [])

    @defer.inlineCallbacks
    def test_senders_survive_a_restart(self):
        q = yield self.commit_verp(["a@one.test", "b@one.test"], [S1, S2])
        self.assertEqual(read_queue_file(q.qid, q.path).envelope.senders, [S1, S2])
        yield self.restart()
        # (The base fixture's first manager, without a remote agent, recovers it
        # first and defers it: the real attempt is the retry a minute later.)
        yield self.advance(60)
        self.assertEqual(sorted(self.remote.calls), [(S1, "one.test", ["a@one.test"]),
                                                     (S2, "one.test", ["b@one.test"])])
        self.assertEqual(self.queued(), [])

    @defer.inlineCallbacks
    def test_crash_for_one_sender_does_not_lose_the_others(self):
        self.remote.script = {"b@one.test": RuntimeError("agent bug")}
        q = yield self.enqueue_verp(["a@one.test", "b@one.test", "c@one.test"], [S1, S2, S1])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(q.done, {"0:R:a@one.test", "0:*", "2:R:c@one.test", "2:*"})
        self.assertEqual(q.last[1]["status"], DEFERRED)
        self.assertIn("agent bug", q.last[1]["reply"])
        self.remote.calls.clear()
        self.remote.script = {}
        yield self.advance(60)
        self.assertEqual(self.remote.calls, [(S2, "one.test", ["b@one.test"])])

    @defer.inlineCallbacks
    def test_senders_to_one_domain_share_its_worker_limit(self):
        self.manager.config = dataclasses.replace(
            self.config, delivery=dataclasses.replace(self.config.delivery, max_per_domain=2))
        self.remote.hang.add("one.test")
        senders = [f"team-bounces+{c * 16}@lists.test" for c in "abcde"]
        rcpts = [f"{c}@one.test" for c in "abcde"]
        q = yield self.commit_verp(rcpts, senders)
        self.manager.submit(q)
        # Two transactions at a time, the next one when one of them answers.
        self.assertEqual(len(self.remote.calls), 2)
        self.remote.release(1)
        self.assertEqual(len(self.remote.calls), 3)
        for _ in range(5):
            self.remote.release()
        yield self.settle()
        self.assertEqual(sorted(c[0] for c in self.remote.calls), senders)
        self.assertEqual(self.queued(), [])

    @defer.inlineCallbacks
    def test_transactions_across_domains_capped_at_max_connections(self):
        """A post to members at many domains starts no more transactions than there
        can be connections; the others start as those answer."""
        self.manager.config = dataclasses.replace(
            self.config, delivery=dataclasses.replace(self.config.delivery,
                                                      max_connections=3))
        domains = [f"d{i}.test" for i in range(8)]
        self.remote.hang.update(domains)
        rcpts = [f"m@{d}" for d in domains]
        senders = [f"team-bounces+{c * 16}@lists.test" for c in "abcdefgh"]
        q = yield self.commit_verp(rcpts, senders)
        self.manager.submit(q)
        self.assertEqual(len(self.remote.calls), 3)
        self.remote.release(2)
        self.assertEqual(len(self.remote.calls), 5)
        for _ in range(8):
            self.remote.release()
        yield self.settle()
        self.assertEqual(sorted(c[1] for c in self.remote.calls), domains)
        self.assertEqual(self.queued(), [])

    @defer.inlineCallbacks
    def test_many_transactions_answered_at_once_behind_one_slow(self):
        """Transactions that end at once (a dead domain, an agent shutting down) each
        hand the slot on: hundreds in a row must not pile up on the stack."""
        self.manager.config = dataclasses.replace(
            self.config, delivery=dataclasses.replace(self.config.delivery,
                                                      max_connections=1))
        n = 600
        domains = [f"d{i}.test" for i in range(n)]
        self.remote.hang.add("d0.test")          # only the first transaction is slow
        senders = [f"team-bounces+{i:016x}@lists.test" for i in range(n)]
        q = yield self.commit_verp([f"m@{d}" for d in domains], senders)
        self.manager.submit(q)
        self.assertEqual(len(self.remote.calls), 1)
        self.remote.release()
        yield self.settle()
        self.assertEqual(len(self.remote.calls), n)
        self.assertEqual(self.flushLoggedErrors(RecursionError), [])
        self.assertEqual(self.queued(), [])

    @defer.inlineCallbacks
    def test_sent_copies_recorded_while_the_distribution_goes_on(self):
        """A crash in the middle of a long distribution must not send the copies
        already sent again: they are recorded done a batch at a time."""
        self.patch(manager_module._Checkpoint, "EVERY", 2)
        domains = [f"d{i}.test" for i in range(5)]
        self.remote.hang.update(domains)
        rcpts = [f"m@{d}" for d in domains]
        senders = [f"team-bounces+{c * 16}@lists.test" for c in "abcde"]
        q = yield self.commit_verp(rcpts, senders)
        self.manager.submit(q)
        self.remote.release(3)
        for _ in range(50):
            if read_queue_file(q.qid, q.path).done:
                break
            yield task.deferLater(reactor, 0.01, lambda: None)
        on_disk = read_queue_file(q.qid, q.path).done
        self.assertEqual(len(on_disk), 2, on_disk)      # one batch of two; the third waits
        # A new process would skip those two copies.
        sent = {c[2][0] for c in self.remote.calls[:2]}
        self.assertEqual({rcpts[int(k.partition(":")[0])] for k in on_disk}, sent)
        self.remote.release()
        yield self.settle()
        self.assertEqual(self.queued(), [])

    @defer.inlineCallbacks
    def test_no_early_records_when_a_success_notice_is_asked_for(self):
        self.patch(manager_module._Checkpoint, "EVERY", 1)
        self.remote.hang.update({"d0.test", "d1.test"})
        q = yield self.commit_verp(["m@d0.test", "m@d1.test"], [S1, S2],
                                   notify=["SUCCESS", "SUCCESS"], orcpt=["", ""])
        self.manager.submit(q)
        self.remote.release(1)
        yield task.deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(read_queue_file(q.qid, q.path).done, set())
        self.remote.release()
        yield self.settle()


class SlotsTests(unittest.TestCase):
    """The slots the queue caps a message's transactions with (``slots.Slots``)."""

    def test_reentrant_release_keeps_the_count(self):
        slots = Slots(2)
        held = [slots.acquire() for _ in range(2)]
        self.assertTrue(all(d.called for d in held))
        woken = []
        for i in range(50):
            slots.acquire().addCallback(lambda _, i=i: (woken.append(i), slots.release()))
        self.assertEqual(woken, [])
        slots.release()
        self.assertEqual(woken, list(range(50)))
        self.assertEqual((slots.free, len(slots.waiting)), (1, 0))
        slots.release()
        self.assertEqual(slots.free, 2)

    def test_cancelled_waiter_does_not_keep_the_slot(self):
        slots = Slots(1)
        self.assertTrue(slots.acquire().called)
        second = slots.acquire()
        second.cancel()
        self.failureResultOf(second, defer.CancelledError)
        slots.release()
        self.assertTrue(slots.acquire().called)


class EnvelopeSendersTests(unittest.TestCase):

    def test_round_trip(self):
        env = Envelope(sender="team-bounces@lists.test", recipients=["a@x.test", "b@y.test"],
                       arrival=5.0, protocol="local", senders=[S1, S2])
        data = env.to_json()
        self.assertEqual(json.loads(data)["senders"], [S1, S2])
        back = Envelope.from_json(data)
        self.assertEqual(back, env)
        self.assertEqual((back.sender_of(0), back.sender_of(1)), (S1, S2))

    def test_key_left_out_when_empty(self):
        env = Envelope(sender="a@x.test", recipients=["b@y.test"])
        self.assertNotIn("senders", json.loads(env.to_json()))
        back = Envelope.from_json(env.to_json())
        self.assertEqual(back.senders, [])
        self.assertEqual(back.sender_of(0), "a@x.test")

    def test_sender_of_falls_back_to_the_envelope_sender(self):
        env = Envelope(sender="own@x.test", recipients=["a@x", "b@x", "c@x"], senders=[S1, ""])
        self.assertEqual([env.sender_of(i) for i in range(3)], [S1, "own@x.test", "own@x.test"])

    def test_bad_types_are_refused(self):
        good = json.loads(Envelope(sender="a@x.test", recipients=["b@y.test"],
                                   senders=[S1]).to_json())
        for bad in ([1], [None], "team-bounces@lists.test", {"0": S1}, [[S1]]):
            raw = dict(good, senders=bad)
            with self.assertRaises(ValueError, msg=repr(bad)):
                Envelope.from_json(json.dumps(raw).encode())
