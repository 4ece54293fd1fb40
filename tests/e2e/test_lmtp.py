"""End-to-end: LMTP into the store of the real process."""

import smtplib

from twisted.trial import unittest

from tests.e2e.harness import ApplianceProcess

MSG = "From: x@ext.test\r\nSubject: lmtp e2e\r\n\r\nhello\r\n"


class LMTPTests(unittest.TestCase):

    def test_deliver_over_lmtp(self):
        app = ApplianceProcess(self.mktemp(), listeners=("lmtp",)).start()
        self.addCleanup(app.stop)
        with smtplib.LMTP("127.0.0.1", app.ports["lmtp"]) as s:
            code, caps = s.docmd("LHLO", "client.example.test")
            self.assertEqual(code, 250)
            self.assertEqual(s.sendmail("x@ext.test", ["bob@example.test"], MSG), {})
            s.mail("x@ext.test")
            self.assertEqual(s.rcpt("nobody@example.test")[0], 550)
            self.assertEqual(s.rcpt("someone@elsewhere.test")[0], 550)
        # Delivered before the answer: it is there at once, and nothing is queued.
        self.assertEqual(len(app.messages("bob")), 1)
        self.assertEqual(app.queue_ids(), [])
        self.assertIn("with LMTP id", app.messages("bob")[0].decode())
