"""DSN parameters (RFC 3461) and AUTH= (RFC 4954 5) on the SMTP listeners."""

from twisted.internet import defer
from twisted.trial import unittest

from mailbox_appliance.queue.spool import read_queue_file
from tests.smtp_helpers import ApplianceMixin, RawClient
from tests.test_submission import Client

MSG = b"From: alice@example.test\r\nSubject: dsn\r\n\r\nbody\r\n"


class RecordingQueue:
    """Stands in for the queue manager: keeps what was committed, delivers nothing."""

    def __init__(self):
        self.messages = []

    def submit(self, qmsg):
        self.messages.append(qmsg)


class DSNParameterTests(ApplianceMixin, unittest.TestCase):

    def setUp(self):
        return self.start_appliance(lmtp=True, listeners=("submission",))

    def record(self, name="smtp"):
        queue = RecordingQueue()
        self.app.listeners[name].factory.queue = queue
        return queue

    def session(self):
        c = RawClient(self.port)
        c.code()
        c.cmd("EHLO client.ext.test")
        return c

    @defer.inlineCallbacks
    def test_advertised_everywhere(self):
        def talk():
            out = []
            c = RawClient(self.port)
            c.code()
            out.append(c.cmd("EHLO client.ext.test")[1])
            c = RawClient(self.lmtp_port)
            c.code()
            out.append(c.cmd("LHLO client.ext.test")[1])
            c = Client(self.ports["submission"])
            c.code()
            out.append(c.cmd("EHLO client.ext.test")[1])
            return out
        for lines in (yield self.in_thread(talk)):
            self.assertIn("DSN", lines)

    @defer.inlineCallbacks
    def test_stored_in_the_envelope(self):
        queue = self.record()

        def talk():
            c = self.session()
            r = [c.cmd("MAIL FROM:<a@ext.test> RET=hdrs ENVID=QQ+2Bid.1 AUTH=<>"),
                 c.cmd("RCPT TO:<alice@example.test> notify=success,delay "
                       "ORCPT=RFC822;Alice+40example.test"),
                 c.cmd("RCPT TO:<bob@example.test>"),
                 c.cmd("RCPT TO:<staff@example.test> NOTIFY=NEVER"),
                 c.cmd("DATA")]
            c.send(MSG + b".\r\n")
            r.append(c.reply())
            # The next transaction starts clean.
            r += [c.cmd("MAIL FROM:<a@ext.test>"), c.cmd("RCPT TO:<bob@example.test>"),
                  c.cmd("DATA")]
            c.send(MSG + b".\r\n")
            r.append(c.reply())
            return r
        r = yield self.in_thread(talk)
        self.assertEqual([x[0] for x in r], [250, 250, 250, 250, 354, 250, 250, 250, 354, 250])
        first, second = queue.messages
        env = first.envelope
        self.assertEqual((env.ret, env.envid), ("HDRS", "QQ+2Bid.1"))
        self.assertEqual(env.recipients,
                         ["alice@example.test", "bob@example.test", "staff@example.test"])
        self.assertEqual(env.notify, ["SUCCESS,DELAY", "", "NEVER"])
        self.assertEqual(env.orcpt, ["rfc822;Alice+40example.test", "", ""])
        # The queue file reads back to the same envelope (C7: nothing injected).
        self.assertEqual(read_queue_file(first.qid, first.path).envelope, env)
        env = second.envelope
        self.assertEqual((env.ret, env.envid, env.notify, env.orcpt), ("", "", [], []))
        self.assertEqual(read_queue_file(second.qid, second.path).envelope, env)

    @defer.inlineCallbacks
    def test_bad_mail_parameters(self):
        cases = [
            "RET=", "RET", "RET=PART", "RET=FULL RET=HDRS", "ENVID=" + "x" * 101, "ENVID=",
            "ENVID=a+zz", "ENVID=a+4", "ENVID=a+0D+0Ab", "ENVID=a+7F", "ENVID=a=b",
            "AUTH=", "AUTH=+zz", "AUTH=a+0A", "ENVID=a ENVID=b",
        ]

        def talk():
            c = self.session()
            out = [(p, c.cmd(f"MAIL FROM:<a@ext.test> {p}")) for p in cases]
            out.append(("ok", c.cmd("MAIL FROM:<a@ext.test> ENVID=" + "x" * 100 +
                                    " RET=FULL AUTH=alice+40example.test")))
            return out
        out = yield self.in_thread(self._many_errors, talk)
        self.assertRefusedThenAccepted(out)

    def assertRefusedThenAccepted(self, out):
        """Every (parameter, reply) but the last is 501 5.5.4; the last is 250."""
        for p, (code, lines) in out[:-1]:
            self.assertEqual(code, 501, (p, lines))
            self.assertTrue(lines[0].startswith("5.5.4 "), (p, lines))
        self.assertEqual(out[-1][1][0], 250)

    @defer.inlineCallbacks
    def test_bad_rcpt_parameters(self):
        cases = [
            "NOTIFY=", "NOTIFY", "NOTIFY=NEVER,SUCCESS", "NOTIFY=SUCCESS,SUCCESS",
            "NOTIFY=SOMETIMES", "NOTIFY=SUCCESS,", "NOTIFY=SUCCESS NOTIFY=DELAY",
            "ORCPT=alice@example.test", "ORCPT=x400;a", "ORCPT=rfc822;", "ORCPT=;a",
            "ORCPT=rfc822;a+0Ab", "ORCPT=rfc822;a+zz", "ORCPT=rfc822;" + "a" * 494,
        ]

        def talk():
            c = self.session()
            c.cmd("MAIL FROM:<a@ext.test>")
            out = [(p, c.cmd(f"RCPT TO:<alice@example.test> {p}")) for p in cases]
            out.append(("ok", c.cmd("RCPT TO:<alice@example.test> NOTIFY=FAILURE "
                                    "ORCPT=utf-8;" + "a" * 494)))
            return out
        out = yield self.in_thread(self._many_errors, talk)
        self.assertRefusedThenAccepted(out)

    @defer.inlineCallbacks
    def test_longer_lines_for_mail_and_rcpt_only(self):
        def talk():
            c = self.session()
            orcpt = " ORCPT=rfc822;" + "a" * 487
            return [c.cmd("MAIL FROM:<a@ext.test> RET=FULL ENVID=" + "e" * 100 +
                          " AUTH=" + "a" * 400 + " SIZE=10"),
                    c.cmd("RCPT TO:<alice@" + ("d" * 60 + ".") * 3 + "test> NOTIFY=SUCCESS" + orcpt),
                    c.cmd("RCPT TO:<alice@example.test> NOTIFY=SUCCESS" + orcpt + " X" * 300),
                    c.cmd("NOOP " + "x" * 600)]
        r = yield self.in_thread(talk)
        # The second RCPT is past 512 + 500 octets; NOOP keeps the plain limit.
        self.assertEqual([x[0] for x in r], [250, 554, 500, 500])

    @defer.inlineCallbacks
    def test_injection_and_helo(self):
        def talk():
            c = self.session()
            out = [c.cmd("MAIL FROM:<a@ext.test>")]
            c.send(b"RCPT TO:<alice@example.test> NOTIFY=SUCCESS ORCPT=rfc822;a\nb@x\r\n")
            out.append(c.reply())
            c.send(b"RCPT TO:<alice@example.test> ORCPT=rfc822;a\rb\r\n")
            out.append(c.reply())
            c = RawClient(self.port)
            c.code()
            c.cmd("HELO client.ext.test")
            out.append(c.cmd("MAIL FROM:<a@ext.test> RET=FULL"))
            out.append(c.cmd("MAIL FROM:<a@ext.test>"))
            out.append(c.cmd("RCPT TO:<alice@example.test> NOTIFY=NEVER"))
            return out
        out = yield self.in_thread(talk)
        self.assertEqual([x[0] for x in out], [250, 501, 501, 555, 250, 555])
        self.assertTrue(out[1][1][0].startswith("5.5.2 "))

    @defer.inlineCallbacks
    def test_lmtp_takes_them(self):
        queue = RecordingQueue()
        factory = self.app.listeners["lmtp"].factory
        statuses = defer.Deferred()
        queue.deliver_now = lambda qmsg: (queue.messages.append(qmsg), statuses)[1]
        factory.queue = queue

        def talk():
            c = RawClient(self.lmtp_port)
            c.code()
            c.cmd("LHLO client.ext.test")
            r = [c.cmd("MAIL FROM:<a@ext.test> RET=FULL ENVID=e1"),
                 c.cmd("RCPT TO:<alice@example.test> NOTIFY=FAILURE ORCPT=rfc822;a+40b"),
                 c.cmd("DATA")]
            c.send(MSG + b".\r\n")
            return r, c
        r, c = yield self.in_thread(talk)
        self.assertEqual([x[0] for x in r], [250, 250, 354])
        while not queue.messages:
            yield self._tick()
        statuses.callback({0: "sent"})
        answer = yield self.in_thread(c.reply)
        self.assertEqual(answer[0], 250)
        env = queue.messages[0].envelope
        self.assertEqual((env.ret, env.envid, env.notify, env.orcpt),
                         ("FULL", "e1", ["FAILURE"], ["rfc822;a+40b"]))

    def _tick(self):
        from twisted.internet import reactor, task
        return task.deferLater(reactor, 0.01, lambda: None)

    def _many_errors(self, f):
        import dataclasses
        factory = self.app.listeners["smtp"].factory
        factory.config = dataclasses.replace(
            factory.config, smtp=dataclasses.replace(factory.config.smtp, max_errors=1000))
        return f()
