"""End-to-end: the rules and the Bayesian filter in the content scan of the real process.

A local rule file over reject_score refuses at end of data and stores
nothing; one over tag_score files into Junk with its name in X-Spam-Status;
SIGHUP reloads the rule file; a rule file with errors stops check-config.
The Bayesian filter learns from ``mailappliance bayes train`` and from a
user moving mail into and out of Junk over IMAP, and its band shows in the
next message's verdict.
"""

import glob
import imaplib
import json
import os
import re
import signal
import smtplib

from twisted.internet import defer, threads
from twisted.trial import unittest

from tests.e2e.harness import (DOOR_CHECKS_OFF, ApplianceProcess, run_cli, run_twistd,
                                wait_until)
from tests.imap_helpers import client_context

BAYES_FIXTURES = os.path.join(os.path.dirname(os.path.dirname(__file__)), "fixtures", "bayes")

# The door checks off as the harness has them; content filters on, without
# the DNS-bound ones, so the score is the rules' and Bayes's alone.
CONTENT_ON = DOOR_CHECKS_OFF + """[antispam.content]
enabled = true
tag_score = 5
reject_score = 15
[antispam.dkim]
verify = false
sign = false
[antispam.dmarc]
enabled = false
"""

LOCAL_RULES = r"""
body     LOCAL_BLOCKWORD   /\bzqxblockword\b/i
describe LOCAL_BLOCKWORD   A word our users never want to see
score    LOCAL_BLOCKWORD   20

header   LOCAL_TAG_SUBJECT Subject =~ /zqxtagword/i
describe LOCAL_TAG_SUBJECT A subject our users file as junk
score    LOCAL_TAG_SUBJECT 6
"""


def message(subject, body, n=1, sender="Xavier <x@ext.test>"):
    return (f"From: {sender}\r\nTo: Alice <alice@example.test>\r\nSubject: {subject}\r\n"
            f"Date: Sat, 28 Nov 2026 11:00:00 +0000\r\nMessage-ID: <{n}.content@ext.test>\r\n"
            f"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n"
            f"{body}\r\n").encode()


def spam_status(raw):
    """The unfolded X-Spam-Status value of a delivered message."""
    head = raw.replace(b"\r\n", b"\n").split(b"\n\n", 1)[0].decode("utf-8", "replace")
    m = re.search(r"(?im)^X-Spam-Status:([^\n]*(?:\n[ \t][^\n]*)*)", head)
    return re.sub(r"\s+", "", m.group(1)) if m else None


def folder_messages(app, folder, local="alice"):
    root = app.maildir(local) if folder == "INBOX" else os.path.join(app.maildir(local),
                                                                    "." + folder)
    out = []
    for name in sorted(glob.glob(os.path.join(root, "new", "*"))
                       + glob.glob(os.path.join(root, "cur", "*"))):
        with open(name, "rb") as f:
            out.append(f.read())
    return out


class ContentCase(unittest.TestCase):

    timeout = 120

    @defer.inlineCallbacks
    def start(self, extra, **kw):
        app = ApplianceProcess(self.mktemp(), extra=CONTENT_ON + extra, **kw)
        yield threads.deferToThread(app.start)
        self.addCleanup(app.stop)
        return app

    def send(self, app, raw, rcpt="alice@example.test"):
        """(code, text) of the answer to the final dot."""
        def run():
            with smtplib.SMTP("127.0.0.1", app.smtp_port, timeout=60) as s:
                s.ehlo("client.ext.test")
                code, text = s.mail("x@ext.test")
                assert code == 250, (code, text)
                code, text = s.rcpt(rcpt)
                assert code == 250, (code, text)
                code, text = s.data(raw)
                return code, text.decode("utf-8", "replace")
        return threads.deferToThread(run)

    def delivered(self, app, folder, count, what):
        return wait_until(
            lambda: len(folder_messages(app, folder)) >= count, 30, what, app.log)


class RulesTests(ContentCase):

    def write_rules(self, text):
        with open(self.rules_path, "w") as f:
            f.write(text)

    @defer.inlineCallbacks
    def setUp(self):
        workdir = os.path.abspath(self.mktemp())
        os.makedirs(workdir)
        self.rules_path = os.path.join(workdir, "local.rules")
        self.write_rules(LOCAL_RULES)
        self.app = yield self.start(
            f'[antispam.rules]\nfiles = ["{self.rules_path}"]\n[antispam.bayes]\n'
            'enabled = false\n')

    @defer.inlineCallbacks
    def test_rule_over_reject_score_refuses_and_stores_nothing(self):
        code, text = yield self.send(self.app, message("Hello", "Buy zqxblockword today."))
        self.assertEqual(code, 550, text)
        self.assertTrue(text.startswith("5.7.1"), text)
        self.assertEqual(folder_messages(self.app, "INBOX"), [])
        self.assertEqual(folder_messages(self.app, "Junk"), [])
        self.assertEqual(self.app.queue_ids(), [])

    @defer.inlineCallbacks
    def test_rule_over_tag_score_files_into_junk(self):
        code, text = yield self.send(self.app, message("zqxtagword offer", "Details inside.", 2))
        self.assertEqual(code, 250, text)
        yield self.delivered(self.app, "Junk", 1, "delivery into Junk")
        raw = folder_messages(self.app, "Junk")[0]
        self.assertIn(b"X-Spam-Flag: YES", raw)
        status = spam_status(raw)
        self.assertTrue(status.startswith("Yes,"), status)
        self.assertIn("LOCAL_TAG_SUBJECT", status)
        self.assertEqual(folder_messages(self.app, "INBOX"), [])

    @defer.inlineCallbacks
    def test_stats_count_the_filters_and_the_rules(self):
        yield self.send(self.app, message("Hello", "Buy zqxblockword today.", 7))
        yield self.send(self.app, message("zqxtagword offer", "Details inside.", 8))
        r = yield threads.deferToThread(run_cli, "--config", self.app.config_path,
                                        "stats", "--json")
        self.assertEqual(r.returncode, 0, r.stderr)
        counters = json.loads(r.stdout)
        self.assertEqual(counters["hit:LOCAL_BLOCKWORD"], 1)
        self.assertEqual(counters["hit:LOCAL_TAG_SUBJECT"], 1)
        self.assertEqual(counters["rules:ran"], 2)
        self.assertEqual(counters["content:reject"], 1)
        self.assertEqual(counters["content:spam"], 1)
        r = yield threads.deferToThread(run_cli, "--config", self.app.config_path, "stats")
        self.assertRegex(r.stdout, r"(?m)^hit\s+LOCAL_BLOCKWORD\s+1$")

    @defer.inlineCallbacks
    def test_ordinary_mail_in_the_inbox_with_its_status(self):
        code, text = yield self.send(self.app, message("Lunch", "Shall we meet at noon?", 3))
        self.assertEqual(code, 250, text)
        yield self.delivered(self.app, "INBOX", 1, "delivery into INBOX")
        raw = folder_messages(self.app, "INBOX")[0]
        self.assertNotIn(b"X-Spam-Flag", raw)
        self.assertTrue(spam_status(raw).startswith("No,"), spam_status(raw))

    @defer.inlineCallbacks
    def test_sighup_reloads_the_rule_file(self):
        raw = message("Hello", "The zqxnewword is here.", 4)
        code, text = yield self.send(self.app, raw)
        self.assertEqual(code, 250, text)
        self.write_rules(LOCAL_RULES + "body LOCAL_NEW /zqxnewword/\nscore LOCAL_NEW 30\n")
        loaded = self.app.log().count("rules loaded")
        os.kill(self.app.proc.pid, signal.SIGHUP)
        yield wait_until(
            lambda: self.app.log().count("rules loaded") > loaded, 30,
            "the rules reloaded", self.app.log)
        code, text = yield self.send(self.app, message("Hello", "The zqxnewword is here.", 5))
        self.assertEqual(code, 550, text)
        # Still running, and still taking other mail.
        code, text = yield self.send(self.app, message("Hi", "An ordinary note.", 6))
        self.assertEqual(code, 250, text)


class RuleFileErrorTests(unittest.TestCase):

    def test_check_config_names_the_bad_line(self):
        workdir = os.path.abspath(self.mktemp())
        os.makedirs(workdir)
        path = os.path.join(workdir, "bad.rules")
        with open(path, "w") as f:
            f.write("body GOOD /fine/\nscore GOOD 1\nbody BROKEN /unclosed(/\n")
        app = ApplianceProcess(workdir, extra=CONTENT_ON + f'[antispam.rules]\nfiles = ["{path}"]\n')
        r = run_cli("--config", app.config_path, "check-config")
        self.assertEqual(r.returncode, 2, r.stdout + r.stderr)
        lines = r.stderr.strip().splitlines()
        self.assertEqual(len(lines), 1, r.stderr)
        self.assertIn("[antispam.rules] files:", lines[0])
        self.assertIn("bad.rules:3", lines[0])
        # The admin commands still work: a typo must not block a queue flush.
        r = run_cli("--config", app.config_path, "queue", "list")
        self.assertEqual(r.returncode, 0, r.stderr)
        # And the appliance refuses to start on it, with the same line.
        r = run_twistd(app.config_path)
        self.assertEqual(r.returncode, 2, r.stderr)
        self.assertIn("bad.rules:3", r.stderr + r.stdout)

    def test_time_budget_out_of_range(self):
        app = ApplianceProcess(os.path.abspath(self.mktemp()),
                               extra=CONTENT_ON + '[antispam.rules]\ntime_budget = "2m"\n')
        r = run_cli("--config", app.config_path, "check-config")
        self.assertEqual(r.returncode, 2, r.stdout + r.stderr)
        self.assertIn("time_budget", r.stderr)


BAYES_ON = """
[antispam.rules]
enabled = true
[antispam.bayes]
enabled = true
min_spam = 5
min_ham = 5
"""

SPAM = ("Cheap pills online",
        "Buy cheap pills online today, best prices and no prescription needed. "
        "Click http://www.pharma-offers.example/buy and save on every order.")
HAM = ("Project meeting minutes",
       "Hi team, the minutes of the project meeting: we review the database schema "
       "on Thursday and move the release to the next sprint. Regards, Alice")


def bayes_band(status):
    m = re.search(r"BAYES_\d\d", status or "")
    return m.group(0) if m else None


class BayesTests(ContentCase):

    @defer.inlineCallbacks
    def test_trained_by_the_admin_command(self):
        app = ApplianceProcess(self.mktemp(), extra=CONTENT_ON + BAYES_ON)
        for kind in ("spam", "ham"):
            r = yield threads.deferToThread(
                run_cli, "--config", app.config_path, "bayes", "train", f"--{kind}",
                os.path.join(BAYES_FIXTURES, kind))
            self.assertEqual(r.returncode, 0, r.stderr)
            self.assertIn(f"6 message(s) learned as {kind}", r.stdout)
        yield threads.deferToThread(app.start)
        self.addCleanup(app.stop)
        code, text = yield self.send(app, message(*SPAM, n=10))
        self.assertEqual(code, 250, text)
        code, text = yield self.send(app, message(*HAM, n=11))
        self.assertEqual(code, 250, text)
        yield self.delivered(app, "INBOX", 1, "the ham")
        yield wait_until(
            lambda: len(folder_messages(app, "INBOX") + folder_messages(app, "Junk"))
            >= 2, 30, "both messages", app.log)
        everything = folder_messages(app, "INBOX") + folder_messages(app, "Junk")
        bands = {b"Cheap pills" in raw: bayes_band(spam_status(raw)) for raw in everything}
        self.assertIn(bands[True], ("BAYES_95", "BAYES_99"), bands)
        self.assertIn(bands[False], ("BAYES_00", "BAYES_05"), bands)

    @defer.inlineCallbacks
    def test_moves_into_and_out_of_junk_teach_the_filter(self):
        app = yield self.start(BAYES_ON, listeners=("imap",))
        # Untrained: the filter says so and gives no band.
        code, text = yield self.send(app, message(*SPAM, n=20))
        self.assertEqual(code, 250, text)
        yield self.delivered(app, "INBOX", 1, "the first message")
        first = folder_messages(app, "INBOX")[0]
        self.assertIn(b"X-Spam-Bayes: not enough training", first)
        self.assertIsNone(bayes_band(spam_status(first)))

        def teach():
            m = imaplib.IMAP4("127.0.0.1", app.ports["imap"], timeout=30)
            m.starttls(client_context())
            m.login("alice", "alice-secret")
            try:
                for kind, folder in (("ham", "Junk"), ("spam", "INBOX")):
                    for name in sorted(os.listdir(os.path.join(BAYES_FIXTURES, kind))):
                        with open(os.path.join(BAYES_FIXTURES, kind, name), "rb") as f:
                            data = f.read().replace(b"\n", b"\r\n")
                        typ, _ = m.append(folder, None, None, data)
                        assert typ == "OK"
                # The user rescues the ham from Junk, and junks the spam.
                m.select("Junk")
                typ, out = m.uid("MOVE", "1:*", "INBOX")
                assert typ == "OK", out
                m.select("INBOX")
                # The six appended spam and the first message.
                typ, out = m.uid("SEARCH", None, "NOT", "HEADER", "Message-ID", "<ham")
                spam_uids = out[0].decode().split()
                assert len(spam_uids) == 7, spam_uids
                return m.uid("MOVE", ",".join(spam_uids), "Junk")
            finally:
                m.logout()
        typ, out = yield threads.deferToThread(teach)
        self.assertEqual(typ, "OK", out)
        yield wait_until(
            lambda: app.log().count("bayes: message moved") >= 13, 30,
            "thirteen messages learned", app.log)
        log = app.log()
        self.assertEqual(log.count("learned as ham"), 6, log[-3000:])
        self.assertEqual(log.count("learned as spam"), 7, log[-3000:])
        code, text = yield self.send(app, message(*SPAM, n=21))
        self.assertEqual(code, 250, text)

        def newest():
            return [raw for raw in folder_messages(app, "INBOX") + folder_messages(app, "Junk")
                    if b"<21.content@" in raw]
        yield wait_until(newest, 30, "the next spam", app.log)
        status = spam_status(newest()[0])
        self.assertIn(bayes_band(status), ("BAYES_95", "BAYES_99"), status)
