"""End-to-end: ``mailappliance queue`` beside the real process, and without it.

A message for a forwarded user waits in the queue (its smarthost refuses
connections); the admin command lists, shows, holds, releases, flushes and
deletes it through the control socket while the appliance runs, and on the
files while it is stopped.
"""

import json
import os
import smtplib

from twisted.trial import unittest

from tests.e2e.harness import ApplianceProcess, free_port, run_cli

MSG = "From: x@ext.test\r\nTo: carol@example.test\r\nSubject: {subject}\r\n\r\nbody\r\n"


class QueueAdminTests(unittest.TestCase):

    def setUp(self):
        # Nobody listens on the smarthost's port: remote mail stays deferred.
        self.app = ApplianceProcess(
            self.mktemp(),
            extra=f'[delivery]\nsmarthost = "127.0.0.1:{free_port()}"\n').start()
        self.addCleanup(self.app.stop)

    def cli(self, *args):
        return run_cli("--config", self.app.config_path, "queue", *args)

    def folder(self, name):
        path = os.path.join(self.app.data_dir, "queue", name)
        return sorted(os.listdir(path)) if os.path.isdir(path) else []

    def queue_one(self, subject="held back"):
        with smtplib.SMTP("127.0.0.1", self.app.smtp_port) as s:
            s.sendmail("x@ext.test", ["carol@example.test"], MSG.format(subject=subject))
        self.app.wait_for(lambda: any(n.endswith(".status") for n in self.folder("active")),
                          what="a deferred attempt")
        (qid,) = [n for n in self.folder("active") if "." not in n]
        return qid

    def test_admin_through_the_running_appliance(self):
        qid = self.queue_one()
        listing = self.cli("list")
        self.assertEqual(listing.returncode, 0, listing.stderr)
        self.assertIn(qid, listing.stdout)
        self.assertIn("carol@example.test  [deferred]", listing.stdout)
        self.assertIn("1 message(s)", listing.stdout)

        shown = self.cli("show", qid, "--json")
        self.assertEqual(shown.returncode, 0, shown.stderr)
        doc = json.loads(shown.stdout)
        self.assertEqual((doc["id"], doc["sender"], doc["held"]), (qid, "x@ext.test", False))
        self.assertEqual(doc["recipients"][0]["status"], "deferred")
        self.assertGreaterEqual(doc["attempts"], 1)
        self.assertIn("Subject: held back", doc["headers"])

        r = self.cli("hold", qid)
        self.assertEqual((r.returncode, r.stdout), (0, f"{qid}: held\n"), r.stderr)
        self.app.wait_for(lambda: qid in self.folder("hold"), what="the move to hold/")
        self.assertIn(qid + "!", self.cli("list").stdout)
        self.assertIn(f"{qid}: held by the administrator", self.app.log())

        r = self.cli("release", qid)
        self.assertEqual((r.returncode, r.stdout), (0, f"{qid}: released\n"), r.stderr)
        self.app.wait_for(lambda: qid in self.folder("active"), what="the move back")

        r = self.cli("flush", "--json")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertTrue(json.loads(r.stdout)["ok"])

        r = self.cli("hold", "FFFFFFFFFFFFFFF")
        self.assertEqual(r.returncode, 1)
        self.assertIn("no such message", r.stderr)

        r = self.cli("delete", qid)
        self.assertEqual((r.returncode, r.stdout), (0, f"{qid}: deleted\n"), r.stderr)
        self.app.wait_for(lambda: not [n for n in self.folder("active") + self.folder("hold")
                                       if n.startswith(qid)], what="the removal")
        self.assertEqual(self.cli("list").stdout, "Mail queue is empty\n")
        self.assertNotIn("Traceback", self.app.log())

    def test_admin_while_stopped_and_after_restart(self):
        qid = self.queue_one()
        self.app.stop()
        r = self.cli("hold", qid)
        self.assertEqual((r.returncode, r.stdout), (0, f"{qid}: held\n"), r.stderr)
        self.assertIn(qid, self.folder("hold"))
        self.assertEqual([n for n in self.folder("active") if n.startswith(qid)], [])
        r = self.cli("flush")
        self.assertEqual((r.returncode, r.stdout),
                         (0, "appliance not running: the queue is run at start\n"))

        # The restarted appliance keeps it held, and takes it back when asked.
        self.app.start()
        self.assertIn(qid + "!", self.cli("list").stdout)
        r = self.cli("release", qid)
        self.assertEqual((r.returncode, r.stdout), (0, f"{qid}: released\n"), r.stderr)
        self.app.wait_for(lambda: qid in self.folder("active"), what="the release")
        self.app.stop()
        r = self.cli("delete", qid)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(self.cli("list").stdout, "Mail queue is empty\n")
        self.assertNotIn("Traceback", self.app.log())
