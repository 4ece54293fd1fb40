"""LMTP (RFC 2033): LHLO, local recipients only, one answer per recipient."""

import smtplib

from twisted.internet import defer
from twisted.trial import unittest

from mailbox_appliance.delivery.maildir import DeliveryError
from mailbox_appliance.smtp.lmtp import LMTPClientAccess
from mailbox_appliance.smtp.session import SessionState
from tests.smtp_helpers import ApplianceMixin, RawClient

MSG = b"From: a@ext.test\r\nSubject: via lmtp\r\n\r\nHello.\r\n"


class LMTPTests(ApplianceMixin, unittest.TestCase):

    def setUp(self):
        return self.start_appliance(lmtp=True)

    def session(self):
        c = RawClient(self.lmtp_port)
        code, lines = c.reply()
        assert code == 220 and "LMTP" in lines[0], lines
        return c

    @defer.inlineCallbacks
    def test_one_answer_per_recipient(self):
        def talk():
            c = self.session()
            out = [c.cmd("HELO client"), c.cmd("LHLO client.example.test")]
            out += [c.cmd("MAIL FROM:<a@ext.test>"), c.cmd("RCPT TO:<alice@example.test>"),
                    c.cmd("RCPT TO:<nobody@example.test>"), c.cmd("RCPT TO:<bob@example.test>"),
                    c.cmd("RCPT TO:<r@other.test>"), c.cmd("DATA")]
            c.send(MSG + b".\r\n")
            out += [c.reply(), c.reply()]
            out.append(c.cmd("NOOP"))
            return out
        r = yield self.in_thread(talk)
        self.assertEqual([x[0] for x in r], [500, 250, 250, 250, 550, 250, 550, 354, 250, 250, 250])
        self.assertIn("PIPELINING", r[1][1])
        self.assertTrue(r[8][1][0].startswith("2.0.0 <alice@example.test> Ok: delivered"))
        self.assertTrue(r[9][1][0].startswith("2.0.0 <bob@example.test> Ok: delivered"))
        # Delivered before the answers were given; nothing left queued.
        self.assertEqual(len(self.delivered("alice")), 1)
        self.assertEqual(len(self.delivered("bob")), 1)
        self.assertIn(b"by mx.example.test (mailbox_appliance) with LMTP id",
                      self.delivered("alice")[0])
        yield self.settle()
        self.assertEqual(self.queue_files(), [])

    @defer.inlineCallbacks
    def test_temporary_failure_is_given_back(self):
        real = self.app.local_delivery.deliver

        def flaky(qmsg, user, delivered_to, index, key):
            if user.uid == "bob":
                return defer.fail(DeliveryError("cannot write mailbox: No space left"))
            return real(qmsg, user, delivered_to, index, key)
        self.patch(self.app.local_delivery, "deliver", flaky)

        # smtplib reads one answer after the data: speak LMTP by hand.
        def talk():
            c = self.session()
            c.cmd("LHLO client.example.test")
            c.cmd("MAIL FROM:<a@ext.test>")
            c.cmd("RCPT TO:<alice@example.test>")
            c.cmd("RCPT TO:<bob@example.test>")
            c.cmd("DATA")
            c.send(MSG + b".\r\n")
            return [c.reply(), c.reply()]
        alice, bob = yield self.in_thread(talk)
        self.assertEqual(alice[0], 250)
        self.assertEqual((bob[0], bob[1][0][:5]), (451, "4.3.0"))
        self.assertEqual(len(self.delivered("alice")), 1)
        yield self.settle()
        # The client retries bob: the appliance keeps nothing for him.
        self.assertEqual(self.queue_files(), [])

    @defer.inlineCallbacks
    def test_forwarding_recipient_stays_queued(self):
        def talk():
            with smtplib.LMTP("127.0.0.1", self.lmtp_port) as s:
                return s.sendmail("a@ext.test", ["carol@example.test"], MSG)
        refused = yield self.in_thread(talk)
        self.assertEqual(refused, {})
        yield self.settle()
        self.assertEqual(len([f for f in self.queue_files() if not f.endswith(".done")]), 1)

    @defer.inlineCallbacks
    def test_bad_data_answers_every_recipient(self):
        def talk():
            c = self.session()
            c.cmd("LHLO client.example.test")
            c.cmd("MAIL FROM:<a@ext.test>")
            c.cmd("RCPT TO:<alice@example.test>")
            c.cmd("RCPT TO:<bob@example.test>")
            c.cmd("DATA")
            c.send(b"Subject: x\r\n\r\nbare\nline\r\n.\r\n")
            return [c.reply(), c.reply(), c.cmd("NOOP")]
        r = yield self.in_thread(talk)
        self.assertEqual([x[0] for x in r], [550, 550, 250])
        self.assertTrue(r[0][1][0].startswith("5.6.0 <alice@example.test> "))
        self.assertTrue(r[1][1][0].startswith("5.6.0 <bob@example.test> "))
        self.assertEqual(self.delivered("alice"), [])


class AccessTests(unittest.TestCase):

    def test_only_loopback_and_trusted(self):
        check = LMTPClientAccess(lambda ip: ip == "192.0.2.9")
        for ip, ok in (("127.0.0.1", True), ("::1", True), ("192.0.2.9", True),
                       ("198.51.100.1", False), ("", True)):
            v = check.check("connect", SessionState(client_ip=ip), None)
            self.assertEqual(v is None, ok, ip)
            if not ok:
                self.assertEqual((v.code, v.enhanced), (554, "5.7.1"))
