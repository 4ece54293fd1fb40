"""End-to-end: the list server in the real process, driven by mail (lists.md section 6).

One appliance per test serves ``example.test`` (its people, with Maildirs) and
the list domain ``lists.example.test``; its smarthost is Postfix's smtp-sink,
which catches the copies for remote members with their envelope (VERP)
senders. Lists are made with the admin command before the start, as an
administrator would. Commands and posts go in through the MX port (the
``smtp`` auth level) or the submission port with a login (which the list
server counts like an aligned DKIM signature); replies are read from the
Maildirs, and over IMAP where the user's view matters.
"""

import email
import email.policy
import imaplib
import json
import os
import re
import shutil
import smtplib
import subprocess
import time

import dkim
from twisted.trial import unittest

from tests.e2e.harness import DOOR_CHECKS_OFF, ApplianceProcess, PostfixSink, free_port, run_cli
from tests.imap_helpers import client_context

DOM = "example.test"
LDOM = "lists.example.test"
FOOTER = "To leave the team, write to team-unsubscribe@lists.example.test"
PEOPLE = ("alice", "bob", "dave", "eve", "olga", "mo")
PASSWORD = "secret-{}"
LDIF_HEAD = """\
dn: dc=example,dc=test
objectClass: dcObject
objectClass: organization
dc: example
o: Example

dn: ou=people,dc=example,dc=test
objectClass: organizationalUnit
ou: people
"""
PERSON = """
dn: uid={uid},ou=people,dc=example,dc=test
objectClass: inetOrgPerson
objectClass: inetLocalMailRecipient
uid: {uid}
cn: {uid}
sn: {uid}
mail: {uid}@example.test
userPassword: secret-{uid}
"""


def _ldif(workdir):
    path = os.path.join(workdir, "people.ldif")
    os.makedirs(workdir, exist_ok=True)
    with open(path, "w") as f:
        f.write(LDIF_HEAD + "".join(PERSON.format(uid=u) for u in PEOPLE))
    return path


def parse(raw):
    return email.message_from_bytes(raw, policy=email.policy.default)


def mail(sender, to, subject, body="", extra=()):
    lines = [f"From: {sender}", f"To: {to}", f"Subject: {subject}",
             f"Message-ID: <{time.monotonic_ns()}.{os.getpid()}@{sender.partition('@')[2]}>",
             "Date: Sat, 28 Nov 2026 12:00:00 +0000", *extra]
    return ("\r\n".join(lines) + "\r\n\r\n" + body.replace("\n", "\r\n") + "\r\n").encode()


class ListServerCase(unittest.TestCase):
    """The appliance with lists, the sink, and helpers to talk to them."""

    timeout = 120
    # The copies are DKIM-signed for the list domain when signing is on.
    sign = False

    def setUp(self):
        if not PostfixSink.available():
            raise unittest.SkipTest("smtp-sink (postfix) is not installed")
        self.sink = PostfixSink("127.0.0.1", free_port())
        self.sink.start()
        self.addCleanup(self.sink.cleanup)
        work = self.mktemp()
        self.app = ApplianceProcess(
            work, domains=(DOM, LDOM), ldif=_ldif(work), listeners=("submission", "imap"),
            extra=f'[delivery]\nsmarthost = "[127.0.0.1]:{self.sink.port}"\n'
                  'retry_schedule = ["1h"]\n'
                  f'[lists]\ndomains = ["{LDOM}"]\nlistmasters = ["olga@{DOM}"]\n'
                  + DOOR_CHECKS_OFF + "[antispam.content]\nenabled = false\n"
                  f"[antispam.dkim]\nsign = {'true' if self.sign else 'false'}\n")
        self.addCleanup(self.app.stop)
        if self.sign:
            self.dkim_record = re.sub(r'"\s*"', "", re.search(
                r'TXT "(.*)"', self.cli("dkim", "keygen", LDOM)).group(1))
        self.cli("list", "create", f"team@{LDOM}", "--owner", f"olga@{DOM}",
                 "--subject", "The team", "--tag", "[team]", "--footer", FOOTER)
        for who in ("alice", "bob"):
            self.cli("list", "add", f"team@{LDOM}", f"{who}@{DOM}")
        self.cli("list", "add", f"team@{LDOM}", "zed@far.test")
        self.app.start()

    # -- talking to the appliance -------------------------------------------------------

    def cli(self, *args):
        done = run_cli("--config", self.app.config_path, *args)
        self.assertEqual(done.returncode, 0, done.stderr + done.stdout)
        return done.stdout

    def show(self, name="team"):
        return json.loads(self.cli("list", "show", f"{name}@{LDOM}", "--json"))

    def members(self, name="team"):
        return {m["address"]: m for m in self.show(name)["members"]}

    def send(self, sender, rcpts, data, envelope=None):
        """Through the MX port, as any correspondent would."""
        with smtplib.SMTP("127.0.0.1", self.app.smtp_port) as s:
            return s.sendmail(sender if envelope is None else envelope, rcpts, data)

    def submit(self, user, rcpts, data):
        """Through the submission port with the user's login (STARTTLS + AUTH)."""
        with smtplib.SMTP("127.0.0.1", self.app.ports["submission"]) as s:
            s.starttls(context=client_context())
            s.login(user, PASSWORD.format(user))
            return s.sendmail(f"{user}@{DOM}", rcpts, data)

    def inbox(self, user):
        return [parse(m) for m in self.app.messages(user, DOM)]

    def wait_mail(self, user, predicate=lambda m: True, count=1, what=None):
        """The messages of ``user`` satisfying ``predicate`` once there are ``count``."""
        found = []

        def ready():
            found[:] = [m for m in self.inbox(user) if predicate(m)]
            return len(found) >= count
        self.app.wait_for(ready, what=what or f"{count} message(s) for {user}")
        return found

    def settle(self):
        """Wait until the queue is empty (whatever was to happen has happened)."""
        self.app.wait_for(lambda: not self.app.queue_ids(), what="an empty queue")
        time.sleep(0.3)
        self.app.wait_for(lambda: not self.app.queue_ids(), what="an empty queue")

    def sink_copies(self):
        return [m.decode("latin-1") for m in self.sink.messages()]

    @staticmethod
    def subject(m):
        return str(m["Subject"] or "")

    @staticmethod
    def body(m):
        part = m.get_body(("plain",))
        return part.get_content() if part is not None else ""


class CommandTests(ListServerCase):
    """Subscription by mail: confirmation tokens, the -subscribe address, owners."""

    def test_subscribe_confirm_by_reply(self):
        """Case 1 and 3: SUB with a name, the token by mail, a plain reply confirms."""
        self.send(f"dave@{DOM}", [f"lists@{LDOM}"],
                  mail(f"dave@{DOM}", f"lists@{LDOM}", "", "SUB team Dave D"))
        [ask] = self.wait_mail("dave", lambda m: self.subject(m).startswith("AUTH "))
        [results] = self.wait_mail("dave", lambda m: "Results" in self.subject(m)
                                   or "results" in self.subject(m).lower())
        self.assertIn("Pending", results.get_body(("plain",)).get_content())
        self.assertNotIn(f"dave@{DOM}", self.members())
        token = re.search(r"CONFIRM ([0-9a-f]{32})", self.body(ask)).group(1)
        self.assertEqual(str(ask["Reply-To"]), f"team-confirm+{token}@{LDOM}")
        # The reply quotes the whole mail: the address alone confirms.
        quoted = "\n".join("> " + line for line in self.body(ask).splitlines())
        self.send(f"dave@{DOM}", [str(ask["Reply-To"])],
                  mail(f"dave@{DOM}", str(ask["Reply-To"]), f"Re: {self.subject(ask)}", quoted))
        self.app.wait_for(lambda: f"dave@{DOM}" in self.members(), what="dave a member")
        self.assertEqual(self.members()[f"dave@{DOM}"]["name"], "Dave D")
        self.wait_mail("dave", lambda m: "welcome" in self.subject(m).lower()
                       or "Welcome" in self.body(m))
        # The same token again: unknown or expired, nothing changes.
        self.send(f"dave@{DOM}", [f"lists@{LDOM}"],
                  mail(f"dave@{DOM}", f"lists@{LDOM}", "", f"CONFIRM {token}"))
        [again] = self.wait_mail("dave", lambda m: "already" in self.body(m).lower()
                                 or "unknown" in self.body(m).lower())
        self.assertEqual(len(self.show()["members"]), 4)

    def test_subscribe_address_needs_no_command(self):
        """Case 2: any mail to team-subscribe@ asks for confirmation; no results mail."""
        self.send(f"eve@{DOM}", [f"team-subscribe@{LDOM}"],
                  mail(f"eve@{DOM}", f"team-subscribe@{LDOM}", "hello", "please let me in"))
        self.wait_mail("eve", lambda m: self.subject(m).startswith("AUTH "))
        self.settle()
        self.assertEqual(len(self.inbox("eve")), 1, [self.subject(m) for m in self.inbox("eve")])

    def test_unknown_list_addresses_refused_at_rcpt(self):
        """Case 18: unknown names at the list domain get 550 5.1.1, never a bounce."""
        with smtplib.SMTP("127.0.0.1", self.app.smtp_port) as s:
            s.ehlo("client.example.net")
            s.mail(f"eve@{DOM}")
            for rcpt in (f"nosuchlist@{LDOM}", f"nosuchlist-request@{LDOM}",
                         f"team-confirm+xyz@{LDOM}", f"team-bounces+zz@{LDOM}"):
                code, text = s.rcpt(rcpt)
                self.assertEqual(code, 550, rcpt)
                self.assertTrue(text.startswith(b"5.1.1"), text)
            for rcpt in (f"team@{LDOM}", f"TEAM-request@{LDOM}", f"lists@{LDOM}",
                         f"team-owner@{LDOM}", f"listmaster@{LDOM}"):
                self.assertEqual(s.rcpt(rcpt)[0], 250, rcpt)
            s.rset()
        self.settle()
        self.assertEqual(self.inbox("eve"), [])

    def test_owner_address_forwarded(self):
        """-owner reaches the owners with our X-Loop; the listmaster address too."""
        self.send(f"eve@{DOM}", [f"team-owner@{LDOM}"],
                  mail(f"eve@{DOM}", f"team-owner@{LDOM}", "question for the owners", "hi"))
        [fwd] = self.wait_mail("olga", lambda m: self.subject(m) == "question for the owners")
        self.assertIn(f"team-owner@{LDOM}", fwd.get_all("X-Loop"))
        self.assertEqual(fwd["Return-Path"], f"<team-bounces@{LDOM}>")

    def test_signoff_with_login_at_once(self):
        """Case 6: SIGNOFF from a logged-in member is done at once, with a goodbye."""
        self.submit("bob", [f"lists@{LDOM}"], mail(f"bob@{DOM}", f"lists@{LDOM}", "",
                                                    "SIGNOFF team"))
        self.app.wait_for(lambda: f"bob@{DOM}" not in self.members(), what="bob removed")
        [results] = self.wait_mail("bob", lambda m: "Done" in self.body(m))
        self.assertNotIn("Reply-To", results)

    def swaks(self, *args):
        if not shutil.which("swaks"):
            raise unittest.SkipTest("swaks is not installed")
        return subprocess.run(["swaks", "--server", "127.0.0.1", "--port",
                               str(self.app.smtp_port), "--helo", "client.example.net"]
                              + list(args), capture_output=True, text=True, timeout=60)

    def test_swaks_signoff_without_proof_is_confirmed_first(self):
        """Case 6 (second half) with swaks: -unsubscribe over plain SMTP asks alice
        first; she stays a member until she confirms. An unknown list: 550 5.1.1."""
        r = self.swaks("--from", f"alice@{DOM}", "--to", f"team-unsubscribe@{LDOM}",
                       "--header", f"From: alice@{DOM}", "--header", "Subject: bye",
                       "--body", "please remove me")
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        [ask] = self.wait_mail("alice", lambda m: self.subject(m).startswith("AUTH "))
        self.assertIn(f"alice@{DOM}", self.members())
        r = self.swaks("--from", f"alice@{DOM}", "--to", str(ask["Reply-To"]),
                       "--header", f"From: alice@{DOM}", "--header",
                       f"Subject: Re: {self.subject(ask)}", "--body", "yes")
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        self.app.wait_for(lambda: f"alice@{DOM}" not in self.members(), what="alice removed")
        r = self.swaks("--from", f"alice@{DOM}", "--to", f"nosuchlist-subscribe@{LDOM}")
        self.assertNotEqual(r.returncode, 0)
        self.assertIn("550 5.1.1", r.stdout)

    def test_owner_approval_and_decline(self):
        """Cases 4 and 5: subscribe = owner; the owner accepts one request, declines another."""
        self.app.stop()
        self.cli("list", "create", f"club@{LDOM}", "--owner", f"olga@{DOM}",
                 "--scenario", "subscribe=owner")
        self.app.start()
        self.send(f"dave@{DOM}", [f"lists@{LDOM}"],
                  mail(f"dave@{DOM}", f"lists@{LDOM}", "", "SUB club Dave D"))
        self.wait_mail("dave", lambda m: "forwarded to the list's owners" in self.body(m))
        [ask] = self.wait_mail("olga", lambda m: self.subject(m).startswith("Approval asked"))
        accept = re.search(r"AUTH [0-9a-f]{32} .*", self.body(ask)).group(0)
        self.submit("olga", [f"lists@{LDOM}"], mail(f"olga@{DOM}", f"lists@{LDOM}", "", accept))
        self.app.wait_for(lambda: f"dave@{DOM}" in self.members("club"), what="dave added")
        self.assertEqual(self.members("club")[f"dave@{DOM}"]["name"], "Dave D")
        self.send(f"eve@{DOM}", [f"lists@{LDOM}"],
                  mail(f"eve@{DOM}", f"lists@{LDOM}", "", "SUB club"))
        [ask] = self.wait_mail("olga", lambda m: f"eve@{DOM}" in self.subject(m))
        token = re.search(r"DECLINE ([0-9a-f]{32})", self.body(ask)).group(1)
        self.submit("olga", [f"lists@{LDOM}"], mail(f"olga@{DOM}", f"lists@{LDOM}", "",
                                                     f"DECLINE {token} not staff"))
        [told] = self.wait_mail("eve", lambda m: "declined" in self.subject(m))
        self.assertIn("not staff", self.body(told))
        self.assertNotIn(f"eve@{DOM}", self.members("club"))

    def test_forged_owner_command_goes_to_the_real_owner(self):
        """Case 23: ADD with a forged From olga over the MX: not done; olga is asked."""
        self.send(f"olga@{DOM}", [f"lists@{LDOM}"],
                  mail(f"olga@{DOM}", f"lists@{LDOM}", "", "ADD team evil@x.test",
                       extra=(f"Reply-To: eve@{DOM}",)))
        self.wait_mail("olga", lambda m: self.subject(m).startswith("AUTH "))
        self.settle()
        self.assertNotIn("evil@x.test", self.members())
        self.assertEqual(self.inbox("eve"), [])

    def test_review_owner_only_and_reply_to_ignored(self):
        """Cases 24 and 25: REVIEW is for owners; a Reply-To never gets the answer."""
        self.submit("bob", [f"lists@{LDOM}"],
                    mail(f"bob@{DOM}", f"lists@{LDOM}", "", "REVIEW team",
                         extra=(f"Reply-To: eve@{DOM}",)))
        [refused] = self.wait_mail("bob", lambda m: "Refused" in self.body(m))
        self.assertNotIn(f"alice@{DOM}", self.body(refused))
        self.submit("olga", [f"lists@{LDOM}"],
                    mail(f"olga@{DOM}", f"lists@{LDOM}", "", "REVIEW team"))
        [review] = self.wait_mail("olga", lambda m: "Done" in self.body(m))
        for member in (f"alice@{DOM}", f"bob@{DOM}", "zed@far.test"):
            self.assertIn(member, self.body(review))
        self.settle()
        self.assertEqual(self.inbox("eve"), [])

    def test_long_command_mail_and_injection(self):
        """Cases 16 and 21: three commands then prose, one reply; no header injection."""
        body = "WHICH\nINFO team\nLISTS\nHello, I would like to know more.\n" + \
            "".join(f"prose line {i}\n" for i in range(496))
        self.send(f"dave@{DOM}", [f"lists@{LDOM}"], mail(f"dave@{DOM}", f"lists@{LDOM}", "",
                                                          body))
        [reply] = self.wait_mail("dave")
        text = self.body(reply)
        for line in ("> WHICH", "> INFO team", "> LISTS",
                     "> Hello, I would like to know more.\n  not understood",
                     "496 lines ignored"):
            self.assertIn(line, text)
        injected = "=?utf-8?B?" + __import__("base64").b64encode(
            b"SUB team X\r\nBcc: eve@example.test").decode() + "?="
        self.send(f"bob@{DOM}", [f"lists@{LDOM}"],
                  mail(f"bob@{DOM}", f"lists@{LDOM}", injected, ""))
        [reply] = self.wait_mail("bob")
        self.assertIsNone(reply["Bcc"])
        self.settle()
        self.assertEqual(self.inbox("eve"), [])
        self.assertEqual(len(self.members()), 3)


class PostTests(ListServerCase):
    """Posts: distribution with VERP, confirmation, refusal, loops."""

    sign = True

    def copies_for(self, user):
        return [m for m in self.inbox(user) if m["List-Id"]]

    def test_post_distributed_to_every_member_once(self):
        """Case 9: a logged-in member's post reaches all members with the list fields."""
        self.submit("alice", [f"team@{LDOM}"],
                    mail(f"alice@{DOM}", f"team@{LDOM}", "plans", "The plan is ready."))
        [copy] = self.wait_mail("bob", lambda m: m["List-Id"] is not None)
        self.assertEqual(copy["List-Id"], "The team <team.lists.example.test>")
        self.assertEqual(copy["List-Post"], f"<mailto:team@{LDOM}>")
        self.assertEqual(copy["List-Unsubscribe"],
                         f"<mailto:team-unsubscribe@{LDOM}?subject=unsubscribe>")
        self.assertEqual(copy["Precedence"], "list")
        self.assertEqual(copy["X-Loop"], f"team@{LDOM}")
        self.assertIn("The plan is ready.", self.body(copy))
        self.assertEqual(self.subject(copy), "[team] plans")
        self.assertTrue(self.body(copy).rstrip().endswith(FOOTER), self.body(copy))
        # Signed for the list domain, and the signature verifies on the copy received.
        raw = [m for m in self.app.messages("bob", DOM) if b"List-Id" in m][0]
        raw = raw.split(b"\n", 2)[2].replace(b"\n", b"\r\n")    # Return-Path, Delivered-To
        self.assertIn(f"d={LDOM}", str(copy["DKIM-Signature"]).replace(" ", ""))
        record = self.dkim_record.encode()
        self.assertTrue(dkim.verify(raw, dnsfunc=lambda name, timeout=5: record))
        # VERP: bob's copy came with his own tagged envelope sender.
        self.assertRegex(copy["Return-Path"], r"^<team-bounces\+[a-z2-7]+@lists\.example\.test>$")
        self.wait_mail("alice", lambda m: m["List-Id"] is not None)
        self.app.wait_for(lambda: self.sink_copies(), what="the remote member's copy")
        self.settle()
        [remote] = self.sink_copies()
        sender = re.search(r"X-Mail-Args: <([^>]*)>", remote).group(1)
        self.assertRegex(sender, r"^team-bounces\+[a-z2-7]+@lists\.example\.test$")
        self.assertNotEqual(f"<{sender}>", copy["Return-Path"])
        self.assertIn("zed@far.test", remote)
        self.assertEqual(len(self.copies_for("bob")), 1)
        self.assertEqual(len(self.copies_for("alice")), 1)
        self.assertEqual(self.show()["posts"], 1)

    def test_unauthenticated_post_waits_for_the_author(self):
        """Case 10: From alice without proof: held, the real alice confirms by reply."""
        self.send(f"alice@{DOM}", [f"team@{LDOM}"],
                  mail(f"alice@{DOM}", f"team@{LDOM}", "forged?", "is this me?"))
        [ask] = self.wait_mail("alice", lambda m: self.subject(m).startswith("CONFIRM "))
        self.settle()
        self.assertEqual(self.copies_for("bob"), [])
        self.assertEqual(len(self.show()["held"]), 1)
        self.send(f"alice@{DOM}", [str(ask["Reply-To"])],
                  mail(f"alice@{DOM}", str(ask["Reply-To"]), "Re: " + self.subject(ask), "yes"))
        [copy] = self.wait_mail("bob", lambda m: m["List-Id"] is not None)
        self.assertEqual(copy["X-Validation-By"], f"alice@{DOM}")
        self.assertEqual(self.show()["held"], [])

    def test_outsider_refused_with_notice(self):
        """Case 12: a non-member's post is refused; the author is told, automatically."""
        self.submit("eve", [f"team@{LDOM}"],
                    mail(f"eve@{DOM}", f"team@{LDOM}", "buy now", "cheap things"))
        [notice] = self.wait_mail("eve", lambda m: "Not distributed" in self.subject(m))
        self.assertEqual(notice["Auto-Submitted"], "auto-replied")
        self.assertIn("members", self.body(notice).lower())
        self.settle()
        self.assertEqual(self.copies_for("bob"), [])
        self.assertEqual(self.sink_copies(), [])

    def test_misaddressed_unsubscribe_not_distributed(self):
        """Case 29: Subject 'unsubscribe' to the list points the author to -unsubscribe."""
        self.submit("alice", [f"team@{LDOM}"],
                    mail(f"alice@{DOM}", f"team@{LDOM}", "unsubscribe", ""))
        [notice] = self.wait_mail("alice", lambda m: "Not distributed" in self.subject(m))
        self.assertIn(f"team-unsubscribe@{LDOM}", self.body(notice))
        self.settle()
        self.assertEqual(self.copies_for("bob"), [])

    def test_loops_and_automatic_mail_dropped(self):
        """Case 19: our X-Loop, a repeated Message-ID, auto-replies and DSNs: silence."""
        looped = mail(f"alice@{DOM}", f"team@{LDOM}", "loop", "x",
                      extra=(f"X-Loop: team@{LDOM}",))
        self.submit("alice", [f"team@{LDOM}"], looped)
        vacation = mail(f"bob@{DOM}", f"lists@{LDOM}", "Out of office", "away",
                        extra=("Auto-Submitted: auto-replied",))
        self.send(f"bob@{DOM}", [f"lists@{LDOM}", f"team@{LDOM}"], vacation)
        self.send("", [f"lists@{LDOM}"], mail(f"MAILER-DAEMON@{DOM}", f"lists@{LDOM}",
                                              "Undelivered Mail", "SUB team"), envelope="")
        first = mail(f"alice@{DOM}", f"team@{LDOM}", "once", "only once")
        self.submit("alice", [f"team@{LDOM}"], first)
        self.wait_mail("bob", lambda m: self.subject(m) == "[team] once")
        self.submit("alice", [f"team@{LDOM}"], first)
        self.settle()
        self.assertEqual([self.subject(m) for m in self.inbox("bob")], ["[team] once"])
        self.assertEqual([self.subject(m) for m in self.inbox("alice")], ["[team] once"])
        self.assertEqual(self.show()["posts"], 1)
        log = self.app.log()
        self.assertIn("loop: our X-Loop", log)
        self.assertIn("already distributed", log)

    def test_bounce_of_a_copy_scores_its_member(self):
        """Case 28 (start): a copy that bounces comes back to its VERP address and
        raises that member's score; a forged tag changes nothing."""
        self.cli("list", "add", f"team@{LDOM}", f"ghost@{DOM}")
        self.app.wait_for(lambda: f"ghost@{DOM}" in self.members(), what="ghost added")
        self.submit("alice", [f"team@{LDOM}"],
                    mail(f"alice@{DOM}", f"team@{LDOM}", "hello all", "hi"))
        self.wait_mail("bob", lambda m: m["List-Id"] is not None)
        self.app.wait_for(lambda: self.members()[f"ghost@{DOM}"]["bounce_score"] == 1.0,
                          what="ghost's bounce scored")
        self.assertEqual(self.members()[f"bob@{DOM}"]["bounce_score"], 0.0)
        # A DSN to a tag we did not make is ignored (and never reaches a person).
        self.send("", [f"team-bounces+aaaaaaaaaaaaaaaaaaaa@{LDOM}"],
                  mail(f"MAILER-DAEMON@{DOM}", "x", "Undelivered", "5.1.1"), envelope="")
        self.settle()
        self.assertIn("without a valid tag", self.app.log())
        self.assertEqual(self.members()[f"bob@{DOM}"]["bounce_score"], 0.0)


class ModerationTests(ListServerCase):
    """Case 13 and 14: a moderated list, read over IMAP by its moderator."""

    def setUp(self):
        super().setUp()
        self.app.stop()
        self.cli("list", "create", f"ann@{LDOM}", "--owner", f"olga@{DOM}",
                 "--moderator", f"mo@{DOM}", "--scenario", "send=editorkeyonly")
        self.cli("list", "add", f"ann@{LDOM}", f"bob@{DOM}")
        self.app.start()

    def imap_messages(self, user):
        with imaplib.IMAP4("127.0.0.1", self.app.ports["imap"]) as c:
            c.starttls(ssl_context=client_context())
            c.login(user, PASSWORD.format(user))
            c.select("INBOX")
            _, data = c.search(None, "ALL")
            out = []
            for n in data[0].split():
                _, parts = c.fetch(n, "(RFC822)")
                out.append(parse(parts[0][1]))
            return out

    def test_moderated_post_distributed_once(self):
        self.submit("mo", [f"ann@{LDOM}"], mail(f"mo@{DOM}", f"ann@{LDOM}", "news", "big news"))
        self.wait_mail("mo", lambda m: self.subject(m) == "Moderation: ann")
        [notice] = [m for m in self.imap_messages("mo") if self.subject(m) == "Moderation: ann"]
        key = re.search(r"DISTRIBUTE ann ([0-9a-f]{32})", self.body(notice)).group(1)
        self.settle()
        self.assertEqual([m for m in self.inbox("bob") if m["List-Id"]], [])
        for _ in range(2):
            self.submit("mo", [f"lists@{LDOM}"],
                        mail(f"mo@{DOM}", f"lists@{LDOM}", "", f"DISTRIBUTE ann {key}"))
        [copy] = self.wait_mail("bob", lambda m: m["List-Id"] is not None)
        self.assertEqual(self.subject(copy), "news")
        self.wait_mail("mo", lambda m: "already moderated" in self.body(m).lower())
        self.settle()
        self.assertEqual(len([m for m in self.inbox("bob") if m["List-Id"]]), 1)
