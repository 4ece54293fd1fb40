"""End-to-end: the submission ports of the real process, driven by swaks and smtplib."""

import os
import re
import shutil
import smtplib
import subprocess

from twisted.trial import unittest

from mailbox_appliance.queue.spool import read_queue_file
from tests.imap_helpers import client_context
from tests.e2e.harness import ApplianceProcess, free_port


class SubmissionTests(unittest.TestCase):
    """Users of the example directory send through 587 (STARTTLS) and 465 (TLS)."""

    def setUp(self):
        # Remote mail goes to a smarthost port nobody listens on, so it stays
        # in the queue where the test can look at it.
        extra = ("[delivery]\n"
                 f'smarthost = "127.0.0.1:{free_port()}"\n'
                 'retry_schedule = ["1h"]\n')
        self.app = ApplianceProcess(self.mktemp(), extra=extra,
                                    listeners=("submission", "submissions")).start()
        self.addCleanup(self.app.stop)

    def swaks(self, *args, port="submission"):
        if not shutil.which("swaks"):
            raise unittest.SkipTest("swaks is not installed")
        return subprocess.run(["swaks", "--server", "127.0.0.1", "--port",
                               str(self.app.ports[port]), "--helo", "client.example.test"]
                              + list(args), capture_output=True, text=True, timeout=60)

    def queued_envelopes(self):
        active = os.path.join(self.app.data_dir, "queue", "active")
        return [read_queue_file(q, os.path.join(active, q)).envelope
                for q in self.app.queue_ids() if "." not in q]

    def test_swaks_starttls_plain_to_local_user(self):
        r = self.swaks("--tls", "--auth", "PLAIN", "--au", "alice", "--ap", "alice-secret",
                       "--from", "alice@example.test", "--to", "bob@example.test",
                       "--header", "Subject: via 587")
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        self.assertIn("235 2.7.0 Authentication successful", r.stdout)
        self.assertRegex(r.stdout, r"250 2\.0\.0 Ok: queued as \w+")
        self.app.wait_for(lambda: len(self.app.messages("bob")) == 1, what="delivery")
        msg = self.app.messages("bob")[0]
        self.assertIn(b"Subject: via 587", msg)
        self.assertRegex(msg, rb"\(using TLSv1\.[23] with cipher \S+\)\n"
                              rb"\tby mx\.example\.test \(mailbox_appliance\) with ESMTPSA id ")
        self.assertNotIn("Traceback", self.app.log())

    def test_swaks_implicit_tls_login_to_remote(self):
        r = self.swaks("--tlsc", "--auth", "LOGIN", "--au", "alice@example.test",
                       "--ap", "alice-secret", "--from", "a.liddell@example.test",
                       "--to", "friend@elsewhere.test", port="submissions")
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        self.assertIn("334 VXNlcm5hbWU6", r.stdout)
        self.assertIn("235 2.7.0", r.stdout)
        envelopes = self.queued_envelopes()
        self.assertEqual(len(envelopes), 1)
        env = envelopes[0]
        self.assertEqual((env.sender, env.recipients, env.auth, env.protocol),
                         ("a.liddell@example.test", ["friend@elsewhere.test"], "alice",
                          "ESMTPSA"))

    def test_swaks_refusals(self):
        # Without TLS, AUTH is not offered: swaks gives up before any password.
        r = self.swaks("--auth", "PLAIN", "--au", "alice", "--ap", "alice-secret",
                       "--from", "alice@example.test", "--to", "bob@example.test")
        self.assertNotEqual(r.returncode, 0)
        self.assertNotIn("235 ", r.stdout)
        # Without AUTH, MAIL is refused.
        r = self.swaks("--tls", "--from", "alice@example.test", "--to", "bob@example.test")
        self.assertNotEqual(r.returncode, 0)
        self.assertIn("530 5.7.0 Authentication required", r.stdout)
        # Somebody else's From: header is refused after the data.
        r = self.swaks("--tls", "--auth", "PLAIN", "--au", "bob", "--ap", "bob-secret",
                       "--from", "bob@example.test", "--to", "alice@example.test",
                       "--header", "From: Alice <alice@example.test>")
        self.assertNotEqual(r.returncode, 0)
        self.assertIn("553 5.7.1 <alice@example.test>: From: address not owned by user bob",
                      r.stdout)
        # A wrong password.
        r = self.swaks("--tls", "--auth", "PLAIN", "--au", "carol", "--ap", "wrong",
                       "--from", "carol@example.test", "--to", "bob@example.test")
        self.assertNotEqual(r.returncode, 0)
        self.assertIn("535 5.7.8 Error: authentication failed", r.stdout)
        self.assertEqual(self.app.queue_ids(), [])
        self.assertEqual(self.app.messages("alice") + self.app.messages("bob"), [])

    def test_smtplib_both_ports_with_fixups(self):
        body = ("From: Bob <bob@example.test>\r\nTo: alice@example.test\r\n"
                "Bcc: hidden@elsewhere.test\r\nSubject: {}\r\n\r\nhello\r\n")
        with smtplib.SMTP("127.0.0.1", self.app.ports["submission"]) as s:
            s.starttls(context=client_context())
            s.login("bob", "bob-secret")
            with self.assertRaises(smtplib.SMTPSenderRefused) as e:
                s.sendmail("alice@example.test", ["alice@example.test"], "x")
            self.assertEqual(e.exception.smtp_code, 553)
            s.sendmail("bob@example.test", ["alice@example.test", "hidden@elsewhere.test"],
                       body.format("port 587"))
        with smtplib.SMTP_SSL("127.0.0.1", self.app.ports["submissions"],
                              context=client_context()) as s:
            s.login("bob@example.test", "bob-secret")
            s.sendmail("bob@example.test", ["alice@example.test"], body.format("port 465"))
        self.app.wait_for(lambda: len(self.app.messages("alice")) == 2, what="delivery")
        for m in self.app.messages("alice"):
            self.assertNotIn(b"hidden", m)
            self.assertRegex(m, rb"\nMessage-ID: <\w+\.[0-9a-f]+@mx\.example\.test>\n"
                                rb"Date: [^\n]+\n\nhello\n$")
        # The Bcc recipient's copy waits in the queue, without its Bcc: line either.
        self.app.wait_for(lambda: len(self.app.queue_ids()) == 1, what="the other removed")
        envelopes = self.queued_envelopes()
        self.assertEqual([e.recipients for e in envelopes], [["alice@example.test",
                                                              "hidden@elsewhere.test"]])
        qid = self.app.queue_ids()[0]
        with open(os.path.join(self.app.data_dir, "queue", "active", qid), "rb") as f:
            self.assertNotIn(b"Bcc:", f.read())
        log = self.app.log()
        self.assertTrue(re.search(r"authenticated as bob \(submissions\)", log), log[-2000:])
        self.assertNotIn("Traceback", log)
