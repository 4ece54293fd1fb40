"""End-to-end: the appliance process with an external directory.

A real OpenLDAP ``slapd`` (started by the test on a loopback port) serves the
users; the appliance is pointed at it with ``directory.url``. When the
directory goes away, recipients get a temporary failure, never "unknown", and
service comes back by itself with the directory.
"""

import smtplib

from twisted.trial import unittest

from tests.e2e.harness import ApplianceProcess, free_port
from tests.e2e.test_slapd import Slapd, _missing

MSG = "From: x@ext.test\r\nSubject: via slapd\r\n\r\nhello\r\n"


def rcpt_codes(port, *rcpts):
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
        s.ehlo("client.ext.test")
        s.mail("x@ext.test")
        return [s.rcpt(r) for r in rcpts]


class SlapdDirectoryTests(unittest.TestCase):

    skip = _missing()

    def setUp(self):
        self.slapd = Slapd()
        self.addCleanup(self.slapd.remove)
        self.slapd.start()
        self.app = ApplianceProcess(self.mktemp(), directory_url=self.slapd.url,
                                    directory_extra="timeout = 3\n").start()
        self.addCleanup(self.app.stop)

    def test_delivery_through_openldap(self):
        with smtplib.SMTP("127.0.0.1", self.app.smtp_port) as s:
            s.ehlo("client.ext.test")
            s.mail("x@ext.test")
            self.assertEqual(s.rcpt("nobody@example.test")[0], 550)
            self.assertEqual(s.rcpt("a.liddell@example.test")[0], 250)
            self.assertEqual(s.rcpt("staff@example.test")[0], 250)
            self.assertEqual(s.data(MSG)[0], 250)
        self.app.wait_for(lambda: len(self.app.messages("alice")) == 1 and
                          len(self.app.messages("bob")) == 1, what="delivery")
        self.assertIn(b"Delivered-To: alice@example.test\n", self.app.messages("alice")[0])

    def test_outage_is_temporary_and_recovers(self):
        self.slapd.stop()
        replies = rcpt_codes(self.app.smtp_port, "bob@example.test", "nobody@example.test")
        for code, text in replies:
            self.assertEqual((code, text[:5]), (451, b"4.4.3"))
        self.assertEqual(self.app.queue_ids(), [])
        self.slapd.start()
        self.app.wait_for(lambda: rcpt_codes(self.app.smtp_port, "bob@example.test",
                                             "nobody@example.test")[0][0] == 250,
                          timeout=30, what="directory back")
        self.assertEqual(rcpt_codes(self.app.smtp_port, "nobody@example.test")[0][0], 550)


class UnreachableDirectoryTests(unittest.TestCase):
    """Started while the directory is down: it answers, and only with 4xx."""

    def test_closed_port(self):
        app = ApplianceProcess(self.mktemp(), directory_url=f"ldap://127.0.0.1:{free_port()}",
                               directory_extra="timeout = 2\n").start()
        self.addCleanup(app.stop)
        for code, text in rcpt_codes(app.smtp_port, "alice@example.test",
                                     "nobody@example.test"):
            self.assertEqual((code, text[:5]), (451, b"4.4.3"))
        self.assertNotIn("Traceback", app.log())
