"""The end-of-data content scan on a running MX: scores, verdicts, edits, Junk, hold.

Filters here are small stand-ins with scripted findings, put into the
running appliance's ContentScan; the real filters have tests of their own.
"""

import os

from twisted.internet import defer
from twisted.trial import unittest

from mailbox_appliance.antispam.content import ContentResult, ContentScan, remove_fields
from mailbox_appliance.queue.spool import read_queue_file
from mailbox_appliance.smtp.policy import Verdict
from tests.e2e.harness import ANTISPAM_OFF
from tests.smtp_helpers import ApplianceMixin, RawClient

CONTENT_ON = ANTISPAM_OFF.replace("[antispam.content]\nenabled = false",
                                  "[antispam.content]\nenabled = true\nscan_timeout = \"2s\"")


class Scripted:
    """A filter that answers what the test says and remembers what it saw."""

    def __init__(self, name="scripted", result=None, fail=False, hang=False):
        self.name = name
        self.result = result
        self.fail = fail
        self.hang = hang
        self.seen = []

    def scan(self, message, session):
        self.seen.append(message)
        if self.fail:
            raise RuntimeError("filter broke")
        if self.hang:
            return defer.Deferred()
        return self.result


MESSAGE = (b"From: Sender <sender@ext.test>\r\n"
           b"Authentication-Results: mx.example.test; dkim=pass header.d=forged.test\r\n"
           b"Authentication-Results: other.test; spf=pass smtp.mailfrom=ext.test\r\n"
           b"X-Spam-Flag: NO\r\n"
           b"Subject: hello\r\n\r\nThe body.\r\n")


class ContentScanTests(ApplianceMixin, unittest.TestCase):

    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        self.assertIn("scan_timeout", CONTENT_ON)
        yield self.start_appliance(extra=CONTENT_ON)
        self.scan = self.app.content_scan
        self.assertIsInstance(self.scan, ContentScan)

    def use(self, *filters):
        self.scan.filters = list(filters)

    def send(self, message=MESSAGE, rcpts=("bob@example.test",)):
        c = RawClient(self.port)
        try:
            c.code()
            c.cmd("EHLO client.ext.test")
            c.cmd("MAIL FROM:<sender@ext.test>")
            for r in rcpts:
                c.cmd(f"RCPT TO:<{r}>")
            if c.cmd("DATA")[0] != 354:
                return None
            c.send(message + b".\r\n")
            code, lines = c.reply()
            c.cmd("QUIT")
            return f"{code} {lines[0]}"
        finally:
            c.close()

    def folder(self, local, name):
        new = os.path.join(self.maildir(local), "." + name, "new")
        if not os.path.isdir(new):
            return []
        out = []
        for n in sorted(os.listdir(new)):
            with open(os.path.join(new, n), "rb") as f:
                out.append(f.read())
        return out

    def held(self):
        hold = os.path.join(self.config.server.data_dir, "queue", "hold")
        return sorted(n for n in os.listdir(hold) if "." not in n)

    @defer.inlineCallbacks
    def test_ham_delivered_with_one_authentication_results(self):
        f = Scripted(result=ContentResult(hits={"SMALL": 0.5},
                                          auth=["dkim=none"]))
        self.use(f)
        reply = yield self.in_thread(self.send)
        self.assertTrue(reply.startswith("250 2.0.0 Ok: queued as"), reply)
        yield self.settle()
        [msg] = self.delivered("bob")
        head = msg.split(b"\n\n")[0]
        self.assertIn(b"Authentication-Results: mx.example.test;\n\tdkim=none\n", head)
        self.assertIn(b"X-Spam-Status: No, score=0.5 required=5.0\n\ttests=SMALL\n", head)
        self.assertIn(b"X-Spam-Score: 0.5\n", head)
        # Ours from outside removed (the forged A-R and X-Spam-Flag), others kept.
        self.assertNotIn(b"forged.test", msg)
        self.assertNotIn(b"X-Spam-Flag", msg)
        self.assertIn(b"Authentication-Results: other.test; spf=pass", msg)
        self.assertIn(b"The body.", msg)
        # The filter saw the parsed message with the envelope.
        [seen] = f.seen
        self.assertEqual(seen.sender, "sender@ext.test")
        self.assertEqual(seen.get("Subject"), "hello")
        self.assertTrue(seen.facts["qid"])
        self.assertEqual(self.folder("bob", "Junk"), [])

    @defer.inlineCallbacks
    def test_spam_over_tag_score_goes_to_junk(self):
        self.use(Scripted("one", ContentResult(hits={"A_RULE": 3.0})),
                 Scripted("two", ContentResult(hits={"B_RULE": 2.5})))
        reply = yield self.in_thread(self.send)
        self.assertTrue(reply.startswith("250 "), reply)
        yield self.settle()
        self.assertEqual(self.delivered("bob"), [])
        [msg] = self.folder("bob", "Junk")
        self.assertIn(b"X-Spam-Flag: YES\n", msg)
        self.assertIn(b"X-Spam-Status: Yes, score=5.5 required=5.0\n\ttests=A_RULE,B_RULE\n",
                      msg)
        self.assertTrue(os.path.exists(os.path.join(self.maildir("bob"), ".Junk",
                                                    "maildirfolder")))

    @defer.inlineCallbacks
    def test_later_filter_rescores_a_hit(self):
        self.use(Scripted("one", ContentResult(hits={"A_RULE": 9.0})),
                 Scripted("rules", ContentResult(hits={"A_RULE": 0.1})))
        yield self.in_thread(self.send)
        yield self.settle()
        [msg] = self.delivered("bob")
        self.assertIn(b"score=0.1", msg)

    @defer.inlineCallbacks
    def test_over_reject_score_refused_nothing_stored(self):
        self.use(Scripted(result=ContentResult(hits={"HUGE": 20.0})))
        reply = yield self.in_thread(self.send)
        self.assertEqual(reply, "550 5.7.1 Message rejected as spam (score 20.0)")
        yield self.settle()
        self.assertEqual(self.delivered("bob"), [])
        self.assertEqual(self.folder("bob", "Junk"), [])
        self.assertEqual(self.queue_files(), [])

    @defer.inlineCallbacks
    def test_filter_verdict_ends_the_scan(self):
        later = Scripted("later", ContentResult(hits={"X": 1.0}))
        self.use(Scripted("dmarc", ContentResult(
            verdict=Verdict(550, "5.7.1", "Rejected by DMARC policy of ext.test"))), later)
        reply = yield self.in_thread(self.send)
        self.assertEqual(reply, "550 5.7.1 Rejected by DMARC policy of ext.test")
        self.assertEqual(later.seen, [])
        yield self.settle()
        self.assertEqual(self.delivered("bob"), [])
        self.assertEqual(self.queue_files(), [])

    @defer.inlineCallbacks
    def test_broken_or_slow_filter_does_not_refuse(self):
        self.use(Scripted("broken", fail=True), Scripted("slow", hang=True),
                 Scripted("after", ContentResult(hits={"LATE": 1.0})))
        reply = yield self.in_thread(self.send)
        self.assertTrue(reply.startswith("250 "), reply)
        yield self.settle()
        [msg] = self.delivered("bob")
        # The slow one used up the time: the one after it never ran.
        self.assertIn(b"tests=none", msg)
        self.flushLoggedErrors(RuntimeError)

    @defer.inlineCallbacks
    def test_hold_keeps_the_message_in_the_queue(self):
        self.use(Scripted("milter:q", ContentResult(action="hold")))
        reply = yield self.in_thread(self.send)
        self.assertTrue(reply.startswith("250 "), reply)
        yield self.settle()
        self.assertEqual(self.delivered("bob"), [])
        self.assertEqual(len(self.held()), 1)

    def held_envelope(self):
        [qid] = self.held()
        path = os.path.join(self.config.server.data_dir, "queue", "hold", qid)
        return read_queue_file(qid, path).envelope

    @defer.inlineCallbacks
    def test_judged_message_is_marked_scanned(self):
        """A message the scan judged is marked, with the domains whose DKIM signatures
        it verified (what the list server's dkim level believes, never a field)."""
        class DKIMFacts(Scripted):
            def scan(self, message, session):
                message.facts["dkim"] = [
                    {"domain": "ext.test", "selector": "s", "result": "pass", "reason": ""},
                    {"domain": "other.test", "selector": "s", "result": "fail", "reason": ""}]
                return super().scan(message, session)
        self.use(DKIMFacts("dkim", ContentResult()), Scripted("milter:q",
                                                              ContentResult(action="hold")))
        yield self.in_thread(self.send)
        yield self.settle()
        env = self.held_envelope()
        self.assertTrue(env.scanned)
        self.assertEqual(env.dkim_pass, ["ext.test"])

    @defer.inlineCallbacks
    def test_unjudged_message_is_not_marked(self):
        """Filters that only add fields, without judging (no tag/reject scores): no mark."""
        self.scan.judge = False
        self.use(Scripted("milter:q", ContentResult(action="hold")))
        yield self.in_thread(self.send)
        yield self.settle()
        self.assertFalse(self.held_envelope().scanned)
        self.assertEqual(self.held_envelope().dkim_pass, [])

    @defer.inlineCallbacks
    def test_discard_answers_250_and_stores_nothing(self):
        self.use(Scripted("milter:d", ContentResult(action="discard")))
        reply = yield self.in_thread(self.send)
        self.assertEqual(reply, "250 2.0.0 Ok")
        yield self.settle()
        self.assertEqual(self.delivered("bob"), [])
        self.assertEqual(self.queue_files(), [])
        self.assertEqual(self.held(), [])

    @defer.inlineCallbacks
    def test_rewrite_and_recipient_changes(self):
        def add_field(raw):
            return b"X-Milter: seen\r\n" + raw
        self.use(Scripted("milter:e", ContentResult(
            rewrite=add_field, headers=[("X-Added", "yes")],
            add_recipients=["alice@example.test"], remove_recipients=["bob@example.test"])))
        reply = yield self.in_thread(self.send)
        self.assertTrue(reply.startswith("250 "), reply)
        yield self.settle()
        self.assertEqual(self.delivered("bob"), [])
        [msg] = self.delivered("alice")
        self.assertIn(b"X-Added: yes\n", msg)
        self.assertIn(b"X-Milter: seen\n", msg)

    @defer.inlineCallbacks
    def test_too_large_not_scanned(self):
        f = Scripted(result=ContentResult(hits={"HUGE": 20.0}))
        self.use(f)
        self.scan.max_scan_size = 100
        reply = yield self.in_thread(self.send)
        self.assertTrue(reply.startswith("250 "), reply)
        yield self.settle()
        [msg] = self.delivered("bob")
        self.assertEqual(f.seen, [])
        self.assertNotIn(b"X-Spam-Status", msg)

    @defer.inlineCallbacks
    def test_header_values_cannot_inject_fields(self):
        self.use(Scripted(result=ContentResult(headers=[("X-Note", "a\r\nInjected: 1\nB: 2")])))
        yield self.in_thread(self.send)
        yield self.settle()
        [msg] = self.delivered("bob")
        self.assertIn(b"X-Note: a\n\tInjected: 1B: 2\n", msg)
        self.assertNotIn(b"\nInjected:", msg)


class RemoveFieldsTests(unittest.TestCase):

    def test_folded_fields_removed_whole_others_byte_exact(self):
        raw = (b"A: 1\r\nX-Spam-Status: Yes,\r\n\tscore=9\r\nB: 2\r\n  cont\r\n\r\n"
               b"X-Spam-Status: in the body\r\n")
        out = remove_fields(raw, lambda n, v: n == "x-spam-status")
        self.assertEqual(out, b"A: 1\r\nB: 2\r\n  cont\r\n\r\nX-Spam-Status: in the body\r\n")

    def test_no_header_block(self):
        self.assertEqual(remove_fields(b"\r\nbody", lambda n, v: True), b"\r\nbody")


