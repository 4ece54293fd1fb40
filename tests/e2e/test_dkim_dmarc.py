"""End-to-end: DKIM and DMARC on the real process, with keys and policies in a test DNS.

The sending domains live in a twisted.names authority the test starts:
their DKIM keys (made here with ``dkim_keys``, or by ``mailappliance dkim
keygen`` for the appliance's own domain) and their DMARC policies.

- Inbound (the MX): mail signed by signed.test, sent by swaks, is delivered
  with ``dkim=pass`` and ``dmarc=pass`` in the one Authentication-Results
  field; a From: of bank.test (``p=reject``) that nothing vouches for is
  refused at end of data with ``550 5.7.1`` and nothing is stored; shop.test
  (``p=quarantine``) lands in the Junk folder.
- Outbound: a message submitted on 587 for example.test is signed with the
  key keygen made; a second appliance (remote.test), our verifier on the
  other side, receives it with ``dkim=pass header.d=example.test`` and
  ``dmarc=pass``.

The DNS server runs in this test's reactor, so every client (swaks,
smtplib, the admin command) runs in a thread.
"""

import os
import re
import shutil
import smtplib
import subprocess

from twisted.internet import defer, reactor, task, threads
from twisted.trial import unittest

from mailbox_appliance.antispam import dkim_keys, dkim_sign
from mailbox_appliance.store.names import folder_path
from tests.dns_helpers import start_fake_dns
from tests.e2e.harness import DOOR_CHECKS_OFF, ApplianceProcess, run_cli, wait_until
from tests.e2e.test_outbound import REMOTE_LDIF, common_port
from tests.imap_helpers import client_context

LOCAL, REMOTE = "127.0.0.2", "127.0.0.3"

ZONE = {
    "_dmarc.signed.test": {"TXT": ["v=DMARC1; p=reject"]},
    "_dmarc.bank.test": {"TXT": ["v=DMARC1; p=reject"]},
    "_dmarc.shop.test": {"TXT": ["v=DMARC1; p=quarantine"]},
    "_dmarc.example.test": {"TXT": ["v=DMARC1; p=reject"]},
    "example.test": {"MX": [(10, "mx.example.test")]},
    "mx.example.test": {"A": [LOCAL]},
    "remote.test": {"MX": [(10, "mx.remote.test")]},
    "mx.remote.test": {"A": [REMOTE]},
}


def antispam(sign=False, content=True):
    """The door checks off (as the harness has them), the content filters on:
    DKIM and DMARC only, so the score is theirs."""
    return DOOR_CHECKS_OFF + f"""[antispam.content]
enabled = {str(content).lower()}
[antispam.rules]
enabled = false
[antispam.bayes]
enabled = false
[antispam.dkim]
verify = true
sign = {str(sign).lower()}
"""


def txt_strings(record):
    """The strings of the zone-file TXT line keygen prints."""
    return re.findall(r'"([^"]*)"', record.split(" IN TXT ", 1)[1])


def message(from_, subject, body="Meeting at ten.\r\n"):
    return (f"From: {from_}\r\nTo: Alice <alice@example.test>\r\nSubject: {subject}\r\n"
            f"Date: Sat, 28 Nov 2026 11:00:00 +0000\r\nMessage-ID: <{subject}@x>\r\n"
            f"MIME-Version: 1.0\r\nContent-Type: text/plain\r\n\r\n{body}").encode()


def auth_results(raw):
    """The unfolded values of the Authentication-Results fields (Maildir has LF ends)."""
    head = raw.replace(b"\r\n", b"\n").split(b"\n\n", 1)[0].decode("utf-8", "replace")
    values = re.findall(r"(?im)^Authentication-Results:([^\n]*(?:\n[ \t][^\n]*)*)", head)
    return [re.sub(r"\s+", " ", v).strip() for v in values]


class DKIMDMARCCase(unittest.TestCase):

    timeout = 120

    @defer.inlineCallbacks
    def setUp(self):
        self.dns = yield start_fake_dns(self, ZONE)
        self.keys = os.path.abspath(self.mktemp())
        os.makedirs(self.keys)
        record = dkim_keys.generate(self.keys, "dkim", "signed.test", "s1", bits=1024)
        self.dns.set("s1._domainkey.signed.test", "TXT", [txt_strings(record)])

    def signed(self, raw):
        key = dkim_keys.read_key(dkim_keys.key_path(self.keys, "dkim", "signed.test", "s1"),
                                 "s1")
        data, value = dkim_sign.sign_message(raw, "signed.test", key)
        return b"DKIM-Signature: " + value.encode() + b"\r\n" + data

    @defer.inlineCallbacks
    def start_mx(self):
        app = ApplianceProcess(os.path.join(self.mktemp(), "mx"), extra=antispam(),
                               dns_server=self.dns.server)
        yield threads.deferToThread(app.start)
        self.addCleanup(app.stop)
        return app

    def until(self, app, predicate, what, timeout=30):
        return wait_until(predicate, timeout=timeout, what=what, log=app.log)

    def send(self, app, sender, raw, rcpt="alice@example.test"):
        """(code, text) of the reply to the message's final dot (smtplib, in a thread)."""
        def run():
            with smtplib.SMTP(app.smtp_interface, app.smtp_port, timeout=60) as s:
                s.ehlo("client.signed.test")
                code, text = s.mail(sender)
                assert code == 250, (code, text)
                code, text = s.rcpt(rcpt)
                assert code == 250, (code, text)
                code, text = s.data(raw)
                return code, text.decode("utf-8", "replace")
        return threads.deferToThread(run)

    def assertNothingStored(self, app):
        self.assertEqual(app.messages("alice"), [])
        self.assertEqual(app.queue_ids(), [])


class InboundTests(DKIMDMARCCase):

    @defer.inlineCallbacks
    def test_signed_mail_from_swaks_delivered_with_dkim_and_dmarc_pass(self):
        if not shutil.which("swaks"):
            raise unittest.SkipTest("swaks is not installed")
        app = yield self.start_mx()
        path = os.path.join(self.mktemp() + ".eml")
        with open(path, "wb") as f:
            f.write(self.signed(message("Sam <sam@signed.test>", "signed")))
        done = yield threads.deferToThread(
            subprocess.run, ["swaks", "--server", "127.0.0.1", "--port", str(app.smtp_port),
                             "--helo", "client.signed.test", "--from", "sam@signed.test",
                             "--to", "alice@example.test", "--data", "@" + path],
            capture_output=True, text=True, timeout=60)
        self.assertEqual(done.returncode, 0, done.stdout + done.stderr)
        yield self.until(app, lambda: app.messages("alice"), "delivery")
        [raw] = app.messages("alice")
        [ar] = auth_results(raw)
        self.assertRegex(ar, r"^mx\.example\.test; ")
        self.assertRegex(ar, r"dkim=pass header\.d=signed\.test header\.s=s1 header\.b=\S{8}")
        self.assertIn("dmarc=pass (p=reject dis=none) header.from=signed.test", ar)
        self.assertNotIn(b"X-Spam-Flag: YES", raw)
        self.assertNotIn("Traceback", app.log())

    @defer.inlineCallbacks
    def test_forged_from_of_a_reject_domain_refused_and_nothing_stored(self):
        app = yield self.start_mx()
        raw = message("Bank Security <security@bank.test>", "forged")
        code, text = yield self.send(app, "phisher@spam.test", raw)
        self.assertEqual(code, 550)
        self.assertEqual(text, "5.7.1 Message rejected by DMARC policy of bank.test")
        self.assertNothingStored(app)

    @defer.inlineCallbacks
    def test_tampered_signed_mail_refused(self):
        # Signed by signed.test, then changed on the way: no DKIM pass, and
        # signed.test says p=reject.
        app = yield self.start_mx()
        raw = self.signed(message("Sam <sam@signed.test>", "tampered")).replace(
            b"Meeting at ten.", b"Meeting at two.")
        code, text = yield self.send(app, "sam@signed.test", raw)
        self.assertEqual((code, text),
                         (550, "5.7.1 Message rejected by DMARC policy of signed.test"))
        self.assertNothingStored(app)

    @defer.inlineCallbacks
    def test_quarantine_policy_delivers_into_junk(self):
        app = yield self.start_mx()
        code, _ = yield self.send(app, "promo@shop.test",
                                  message("Shop <promo@shop.test>", "quarantined"))
        self.assertEqual(code, 250)
        junk = folder_path(app.maildir("alice"), "Junk")

        def in_junk():
            return [n for sub in ("new", "cur") if os.path.isdir(os.path.join(junk, sub))
                    for n in os.listdir(os.path.join(junk, sub))]
        yield self.until(app, in_junk, "delivery into Junk")
        self.assertEqual(app.messages("alice"), [])
        [name] = in_junk()
        sub = "new" if os.path.exists(os.path.join(junk, "new", name)) else "cur"
        with open(os.path.join(junk, sub, name), "rb") as f:
            raw = f.read()
        [ar] = auth_results(raw)
        self.assertIn("dkim=none", ar)
        self.assertIn("dmarc=fail (p=quarantine dis=quarantine) header.from=shop.test", ar)

    @defer.inlineCallbacks
    def test_list_post_with_a_verified_signature_goes_out_without_confirmation(self):
        """The list server's dkim level (lists.md 2.3) comes from the signature this
        appliance verified: a member's signed post is distributed at once; the same
        post unsigned, with a forged Authentication-Results naming us, waits for the
        author's confirmation (nothing reaches the members)."""
        app = yield self.start_mx()
        for args in (("list", "create", "team@example.test", "--owner", "alice@example.test"),
                     ("list", "add", "team@example.test", "sam@signed.test"),
                     ("list", "add", "team@example.test", "ann@plain.test"),
                     ("list", "add", "team@example.test", "alice@example.test")):
            done = yield threads.deferToThread(run_cli, "--config", app.config_path, *args)
            self.assertEqual(done.returncode, 0, done.stderr)
        yield task.deferLater(reactor, 2.5, lambda: None)    # the list names are re-read
        post = message("Sam <sam@signed.test>", "signed-post").replace(
            b"To: Alice <alice@example.test>", b"To: team@example.test")
        code, _ = yield self.send(app, "sam@signed.test", self.signed(post),
                                  rcpt="team@example.test")
        self.assertEqual(code, 250)

        def copies():
            return [m for m in app.messages("alice") if b"List-Id: <team.example.test>" in m]
        yield self.until(app, copies, "the list's copy")
        [copy] = copies()
        self.assertIn(b"Subject: signed-post", copy)
        # (plain.test publishes no DMARC policy, so the MX takes the unsigned mail.)
        forged = (b"Authentication-Results: mx.example.test; dkim=pass header.d=plain.test"
                  b"\r\n" + message("Ann <ann@plain.test>", "forged-post"))
        code, _ = yield self.send(app, "ann@plain.test", forged.replace(
            b"To: Alice <alice@example.test>", b"To: team@example.test"),
            rcpt="team@example.test")
        self.assertEqual(code, 250)
        yield self.until(app, lambda: "post from ann@plain.test (smtp): request_auth"
                         in app.log(), "the post held for its author's confirmation")
        self.assertEqual(len(copies()), 1)
        self.assertIn("post from sam@signed.test (dkim): do_it", app.log())


class OutboundTests(DKIMDMARCCase):
    """Submitted mail of example.test leaves signed; remote.test verifies it."""

    @defer.inlineCallbacks
    def test_submitted_mail_signed_and_verified_by_the_remote_appliance(self):
        port = common_port([LOCAL, REMOTE])
        delivery = (f"[delivery]\nsmtp_port = {port}\nretry_schedule = [\"1h\"]\n"
                    "connect_timeout = 3\ncommand_timeout = 15\ndata_timeout = 15\n")
        local = ApplianceProcess(os.path.join(self.mktemp(), "local"),
                                 extra=delivery + antispam(sign=True, content=False),
                                 listeners=("submission",), smtp_interface=LOCAL,
                                 smtp_port=port, dns_server=self.dns.server)
        yield threads.deferToThread(local.start)
        self.addCleanup(local.stop)

        # The administrator's step: make the key, publish the record it prints.
        done = yield threads.deferToThread(run_cli, "--config", local.config_path,
                                           "dkim", "keygen", "example.test")
        self.assertEqual(done.returncode, 0, done.stdout + done.stderr)
        [line] = [l for l in done.stdout.splitlines() if " IN TXT " in l]
        self.assertTrue(line.startswith("mail._domainkey.example.test. IN TXT "), line)
        self.dns.set("mail._domainkey.example.test", "TXT", [txt_strings(line)])
        key = os.path.join(local.data_dir, "dkim", "example.test.mail.key")
        self.assertEqual(os.stat(key).st_mode & 0o777, 0o600)

        work = os.path.join(self.mktemp(), "remote")
        os.makedirs(work)
        ldif = os.path.join(work, "remote.ldif")
        with open(ldif, "w") as f:
            f.write(REMOTE_LDIF)
        remote = ApplianceProcess(work, domains=("remote.test",), ldif=ldif,
                                  extra=delivery + antispam(), smtp_interface=REMOTE,
                                  smtp_port=port, dns_server=self.dns.server,
                                  hostname="mx.remote.test", base_dn="dc=remote,dc=test")
        yield threads.deferToThread(remote.start)
        self.addCleanup(remote.stop)

        body = "Hello Rita,\r\nthe report is ready.\r\nBye\r\n"
        msg = (f"From: Alice <alice@example.test>\r\nTo: rita@remote.test\r\n"
               f"Subject: signed on the way out\r\n\r\n{body}")

        def submit():
            with smtplib.SMTP("127.0.0.1", local.ports["submission"], timeout=30) as s:
                s.starttls(context=client_context())
                s.login("alice", "alice-secret")
                s.sendmail("alice@example.test", ["rita@remote.test"], msg.encode())
        yield threads.deferToThread(submit)
        yield wait_until(lambda: remote.messages("rita", "remote.test"), timeout=60,
                         what="delivery at remote.test", log=remote.log)
        [raw] = remote.messages("rita", "remote.test")
        self.assertIn(b"DKIM-Signature:", raw)
        [ar] = auth_results(raw)
        self.assertRegex(ar, r"^mx\.remote\.test; ")
        self.assertRegex(ar, r"dkim=pass header\.d=example\.test header\.s=mail ")
        self.assertIn("dmarc=pass (p=reject dis=none) header.from=example.test", ar)
        self.assertIn(b"the report is ready.", raw)
        self.assertNotIn("Traceback", local.log())
        self.assertNotIn("Traceback", remote.log())
