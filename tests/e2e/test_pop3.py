"""End-to-end: POP3 (STLS and implicit TLS) on the real process, mail delivered over SMTP."""

import poplib
import shutil
import smtplib
import subprocess

from twisted.trial import unittest

from tests.e2e.harness import ApplianceProcess
from tests.imap_helpers import client_context

MSG = "From: x@ext.test\r\nSubject: pop {n}\r\n\r\nbody {n}\r\n.leading dot\r\n"


class POP3Tests(unittest.TestCase):

    def setUp(self):
        self.app = ApplianceProcess(self.mktemp(), listeners=("pop3", "pop3s")).start()
        self.addCleanup(self.app.stop)
        with smtplib.SMTP("127.0.0.1", self.app.smtp_port) as s:
            for n in (1, 2):
                s.sendmail("x@ext.test", ["bob@example.test"], MSG.format(n=n))
        self.app.wait_for(lambda: len(self.app.messages("bob")) == 2, what="delivery")

    def pop(self):
        p = poplib.POP3("127.0.0.1", self.app.ports["pop3"], timeout=10)
        p.stls(context=client_context())
        p.user("bob")
        p.pass_("bob-secret")
        return p

    def test_retrieve_delete_and_stable_uidl(self):
        p = self.pop()
        self.assertEqual(p.stat()[0], 2)
        uidl = p.uidl()[1]
        lines = p.retr(1)[1]
        self.assertIn(b"Subject: pop 1", lines)
        self.assertIn(b".leading dot", lines)
        p.quit()
        # Same UIDL in a new session and after a restart.
        p = self.pop()
        self.assertEqual(p.uidl()[1], uidl)
        p.quit()
        self.app.stop()
        self.app.start()
        p = self.pop()
        self.assertEqual(p.uidl()[1], uidl)
        p.dele(1)
        p.quit()
        self.assertEqual(len(self.app.messages("bob")), 1)

    def test_implicit_tls_and_lock(self):
        p = poplib.POP3_SSL("127.0.0.1", self.app.ports["pop3s"], context=client_context(),
                            timeout=10)
        p.user("bob@example.test")
        p.pass_("bob-secret")
        self.assertEqual(p.stat()[0], 2)
        other = poplib.POP3_SSL("127.0.0.1", self.app.ports["pop3s"], context=client_context(),
                                timeout=10)
        other.user("bob")
        with self.assertRaises(poplib.error_proto) as e:
            other.pass_("bob-secret")
        self.assertIn(b"[IN-USE]", e.exception.args[0])
        p.quit()

    def test_curl(self):
        if not shutil.which("curl"):
            raise unittest.SkipTest("curl is not installed")
        r = subprocess.run(["curl", "-s", "--ssl-reqd", "-k", "--user", "bob:bob-secret",
                            f"pop3://127.0.0.1:{self.app.ports['pop3']}/1"],
                           capture_output=True, timeout=30)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn(b"Subject: pop 1", r.stdout)
        r = subprocess.run(["curl", "-s", "-k", "--user", "bob:bob-secret",
                            f"pop3s://127.0.0.1:{self.app.ports['pop3s']}/"],
                           capture_output=True, timeout=30)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(len(r.stdout.strip().splitlines()), 2)     # the LIST answer
