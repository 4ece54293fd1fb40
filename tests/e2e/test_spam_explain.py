"""``mailappliance spam explain``: the content filters' verdict on a file, nothing delivered."""

import json
import os

from twisted.internet import defer, threads
from twisted.trial import unittest

from tests.dns_helpers import start_fake_dns
from tests.e2e.harness import ApplianceProcess, run_cli

CONFIG = """
[antispam.dkim]
sign = false
[antispam.greylist]
enabled = false
[dns]
servers = ["{dns}"]
timeout = 2
"""

FORGED = (b"From: Bank <alerts@strict.test>\n"
          b"To: bob@example.test\nSubject: verify your account\n"
          b"Date: Sat, 28 Nov 2026 10:00:00 +0000\nMessage-ID: <1@x.test>\n\n"
          b"Please log in.\n")


class SpamExplainTests(unittest.TestCase):

    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        self.dns = yield start_fake_dns(self, {
            "_dmarc.strict.test": {"TXT": ["v=DMARC1; p=reject"]},
            "strict.test": {"A": ["192.0.2.1"]},
        })
        self.app = ApplianceProcess(self.mktemp(), extra=CONFIG.format(dns=self.dns.server))
        self.file = os.path.join(self.app.workdir, "message.eml")

    def explain(self, message, *options):
        with open(self.file, "wb") as f:
            f.write(message)
        return threads.deferToThread(run_cli, "--config", self.app.config_path, "spam",
                                     "explain", self.file, *options)

    @defer.inlineCallbacks
    def test_forged_from_of_a_reject_domain(self):
        r = yield self.explain(FORGED)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("dmarc: DMARC_FAIL_REJECT=", r.stdout)
        self.assertIn("    dmarc=fail (p=reject dis=reject) header.from=strict.test", r.stdout)
        self.assertIn("outcome: refused: 550 5.7.1 Message rejected by DMARC policy of "
                      "strict.test", r.stdout)
        self.assertIn(("_dmarc.strict.test", "TXT"), self.dns.queries)
        # Nothing was delivered or queued: the command has no data_dir side effects.
        self.assertFalse(os.path.exists(os.path.join(self.app.data_dir, "queue")))

    @defer.inlineCallbacks
    def test_json_for_ordinary_mail(self):
        r = yield self.explain(FORGED.replace(b"strict.test", b"plain.test"), "--json")
        self.assertEqual(r.returncode, 0, r.stderr)
        doc = json.loads(r.stdout)
        self.assertEqual(doc["outcome"], "delivered into the inbox")
        self.assertEqual([f["filter"] for f in doc["filters"]][:2], ["dkim", "dmarc"])
        self.assertEqual(doc["filters"][0]["hits"], {"DKIM_NONE": 0.0})
        self.assertTrue(doc["fields"][0].startswith("Authentication-Results: mx.example.test;"))
        self.assertFalse(doc["spam"])

    @defer.inlineCallbacks
    def test_bayes_database_read_never_written(self):
        bayes_db = os.path.join(self.app.data_dir, "bayes.sqlite3")
        r = yield self.explain(FORGED.replace(b"strict.test", b"plain.test"))
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertFalse(os.path.exists(bayes_db))          # nothing created
        fixtures = os.path.join(os.path.dirname(os.path.dirname(__file__)), "fixtures",
                                "bayes")
        with open(self.app.config_path, "a") as f:
            f.write("[antispam.bayes]\nmin_spam = 5\nmin_ham = 5\n")
        for kind in ("spam", "ham"):
            r = yield threads.deferToThread(run_cli, "--config", self.app.config_path, "bayes",
                                            "train", f"--{kind}", os.path.join(fixtures, kind))
            self.assertEqual(r.returncode, 0, r.stderr)
        with open(bayes_db, "rb") as f:
            before = f.read()
        with open(os.path.join(fixtures, "spam", "01.eml"), "rb") as f:
            spam = f.read()
        r = yield self.explain(spam, "--json")
        self.assertEqual(r.returncode, 0, r.stderr)
        bayes = [f for f in json.loads(r.stdout)["filters"] if f["filter"] == "bayes"]
        self.assertEqual(list(bayes[0]["hits"]), ["BAYES_99"])
        with open(bayes_db, "rb") as f:
            self.assertEqual(f.read(), before)

    @defer.inlineCallbacks
    def test_unreadable_file_and_bad_config(self):
        r = yield threads.deferToThread(run_cli, "--config", self.app.config_path, "spam",
                                        "explain", os.path.join(self.app.workdir, "none.eml"))
        self.assertEqual(r.returncode, 1)
        self.assertIn("cannot read", r.stderr)
        r = yield threads.deferToThread(run_cli, "--config", self.file + ".missing", "spam",
                                        "explain", self.file)
        self.assertEqual(r.returncode, 2)
