"""End-to-end: outbound delivery of the real process, its notices and its retries.

The remote domains live on loopback: a twisted.names authority started by
the test (MX, A and null-MX records, SERVFAIL) names the hosts, and real
MTAs receive there, all on one port (the sender's ``[delivery] smtp_port``)
at different loopback addresses:

    127.0.0.2  the appliance under test, example.test (MX, and submission)
    127.0.0.3  a second appliance, remote.test, with its own directory
    127.0.0.4  nothing: a dead MX host (connection refused)
    127.0.0.5  Postfix's smtp-sink, or the scriptable sink of tests/sink_helpers.py
    127.0.0.6  a scriptable sink that will not take mail

The second appliance resolves example.test through the same DNS server, so
what it owes our senders (its own delivery notices) comes back to us.

The DNS server runs in this test's reactor: nothing here may block it while
an appliance could be asking, so every client (smtplib, swaks, the admin
command) runs in a thread and waits are polled on the reactor
(``harness.wait_until``).
"""

import email
import imaplib
import json
import os
import re
import shutil
import smtplib
import socket
import subprocess

from twisted.internet import defer, threads
from twisted.trial import unittest

from tests.dns_helpers import start_fake_dns
from tests.e2e.harness import ApplianceProcess, PostfixSink, free_port, run_cli, wait_until
from tests.imap_helpers import client_context
from tests.sink_helpers import start_sink

LOCAL, REMOTE, DOWN, SINK = "127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"
BUSY = "127.0.0.6"          # a scripted sink that greets with 421

ZONE = {
    "example.test": {"MX": [(10, "mx.example.test")]},
    "mx.example.test": {"A": [LOCAL]},
    "remote.test": {"MX": [(10, "mx.remote.test")]},
    "mx.remote.test": {"A": [REMOTE]},
    # The preferred host is down; the second one is the sink.
    "backup.test": {"MX": [(10, "down.backup.test"), (20, "up.backup.test")]},
    "down.backup.test": {"A": [DOWN]},
    "up.backup.test": {"A": [SINK]},
    "sink.test": {"MX": [(10, "mx.sink.test")]},
    "mx.sink.test": {"A": [SINK]},
    "nullmx.test": {"MX": [(0, ".")]},          # RFC 7505: accepts no mail
}
SERVFAIL = {"broken.test"}

# The second appliance's directory: one user at remote.test.
REMOTE_LDIF = """\
dn: dc=remote,dc=test
objectClass: dcObject
objectClass: organization
dc: remote
o: Remote Organisation

dn: ou=people,dc=remote,dc=test
objectClass: organizationalUnit
ou: people

dn: uid=rita,ou=people,dc=remote,dc=test
objectClass: inetOrgPerson
objectClass: inetLocalMailRecipient
uid: rita
cn: Rita Remote
sn: Remote
mail: rita@remote.test
userPassword: rita-secret
"""


def common_port(addresses):
    """A port free on every one of ``addresses`` (the MX hosts share it)."""
    for _ in range(50):
        port = free_port()
        try:
            for address in addresses:
                with socket.socket() as s:
                    s.bind((address, port))
        except OSError:
            continue
        return port
    raise RuntimeError("no port free on every loopback address")


def parse(raw):
    return email.message_from_bytes(raw)


def is_dsn(raw):
    return parse(raw).get_content_type() == "multipart/report"


def dsn_parts(raw):
    """(the notice, its per-message fields, [per-recipient fields], the returned part)."""
    msg = parse(raw)
    parts = msg.get_payload()
    status = parts[1]
    blocks = status.get_payload()
    return msg, blocks[0], blocks[1:], parts[2] if len(parts) > 2 else None


class OutboundCase(unittest.TestCase):
    """DNS and addresses shared by the outbound tests; appliances on demand."""

    timeout = 120

    @defer.inlineCallbacks
    def setUp(self):
        self.port = common_port([LOCAL, REMOTE, DOWN, SINK, BUSY])
        self.dns = yield start_fake_dns(self, ZONE, servfail=SERVFAIL)
        self.local = None

    # -- the parties ----------------------------------------------------------

    def delivery(self, **settings):
        """A [delivery] table: short timeouts, retries only when asked."""
        values = {"smtp_port": self.port, "retry_schedule": ["1h"], "connect_timeout": 3,
                  "command_timeout": 15, "data_timeout": 15}
        values.update(settings)

        def toml(v):
            if isinstance(v, dict):
                return "{" + ", ".join(f"{json.dumps(k)} = {toml(x)}" for k, x in v.items()) + "}"
            return json.dumps(v)
        return "[delivery]\n" + "".join(f"{k} = {toml(v)}\n" for k, v in values.items())

    @defer.inlineCallbacks
    def start_local(self, server_extra="", listeners=("submission",), **settings):
        """The appliance under test: example.test on 127.0.0.2, submission on 127.0.0.1."""
        app = ApplianceProcess(os.path.join(self.mktemp(), "local"), extra=self.delivery(**settings),
                               listeners=listeners, smtp_interface=LOCAL,
                               smtp_port=self.port, dns_server=self.dns.server,
                               server_extra=server_extra)
        yield threads.deferToThread(app.start)
        self.addCleanup(app.stop)
        self.local = app
        return app

    @defer.inlineCallbacks
    def start_remote(self, **settings):
        """The second appliance: remote.test (user rita) on 127.0.0.3."""
        work = os.path.join(self.mktemp(), "remote")
        os.makedirs(work)
        ldif = os.path.join(work, "remote.ldif")
        with open(ldif, "w") as f:
            f.write(REMOTE_LDIF)
        app = ApplianceProcess(work, domains=("remote.test",), ldif=ldif,
                               extra=self.delivery(**settings), smtp_interface=REMOTE,
                               smtp_port=self.port, dns_server=self.dns.server,
                               hostname="mx.remote.test", base_dn="dc=remote,dc=test")
        yield threads.deferToThread(app.start)
        self.addCleanup(app.stop)
        return app

    @defer.inlineCallbacks
    def start_sink(self, *options):
        """Postfix's smtp-sink on 127.0.0.5 (skips the test where it is missing)."""
        if not PostfixSink.available():
            raise unittest.SkipTest("Postfix's smtp-sink is not installed")
        sink = PostfixSink(SINK, self.port, *options)
        self.addCleanup(sink.cleanup)
        yield threads.deferToThread(sink.start)
        return sink

    # -- clients (in threads: the reactor serves the DNS) ----------------------

    def submit(self, rcpts, subject, sender="alice@example.test", login=("alice", "alice-secret"),
               mail_options=(), rcpt_options=(), body="hello from example.test"):
        """Send one message through 587 as ``login``; fires with its queue id."""
        app = self.local
        msg = (f"From: <{sender}>\r\nTo: {', '.join(rcpts)}\r\nSubject: {subject}\r\n"
               f"\r\n{body}\r\n")

        def send():
            with smtplib.SMTP("127.0.0.1", app.ports["submission"], timeout=30) as s:
                s.starttls(context=client_context())
                s.login(*login)
                code, text = s.mail(sender, list(mail_options))
                self.assertEqual(code, 250, text)
                for rcpt in rcpts:
                    code, text = s.rcpt(rcpt, list(rcpt_options))
                    self.assertEqual(code, 250, text)
                code, text = s.data(msg)
                self.assertEqual(code, 250, text)
                return re.search(rb"queued as (\w+)", text).group(1).decode()
        return threads.deferToThread(send)

    def swaks(self, *args):
        if not shutil.which("swaks"):
            raise unittest.SkipTest("swaks is not installed")
        return threads.deferToThread(
            subprocess.run, ["swaks", "--server", "127.0.0.1", "--port",
                             str(self.local.ports["submission"]),
                             "--helo", "client.example.test"] + list(args),
            capture_output=True, text=True, timeout=60)

    def queue(self, *args):
        return threads.deferToThread(run_cli, "--config", self.local.config_path, "queue", *args)

    def until(self, predicate, what, timeout=30, app=None):
        app = app or self.local
        return wait_until(predicate, timeout=timeout, what=what,
                          log=app.log if app is not None else None)

    def imap_inbox(self, login=("alice", "alice-secret")):
        """Every message of the user's INBOX over IMAP (STARTTLS), in order."""
        def run():
            m = imaplib.IMAP4("127.0.0.1", self.local.ports["imap"], timeout=30)
            try:
                m.starttls(client_context())
                m.login(*login)
                typ, _ = m.select("INBOX", readonly=True)
                self.assertEqual(typ, "OK")
                typ, data = m.uid("FETCH", "1:*", "(BODY.PEEK[])")
                self.assertEqual(typ, "OK")
                return [item[1] for item in data if isinstance(item, tuple)]
            finally:
                m.logout()
        return threads.deferToThread(run)

    def notices(self, local="alice", app=None, domain="example.test"):
        return [m for m in (app or self.local).messages(local, domain) if is_dsn(m)]

    def sink_got(self, sink, subject, count=1):
        """The sink has ``count`` whole transactions carrying ``subject``."""
        def check():
            return len([m for m in sink.messages()
                        if f"Subject: {subject}".encode() in m
                        and m.rstrip().endswith(b"hello from example.test")]) == count
        return check

    def assertClean(self, *apps):
        for app in apps or (self.local,):
            self.assertNotIn("Traceback", app.log())

    def assertFailedRecipient(self, block, address, status, diagnostic, remote_mta):
        self.assertEqual(block["Final-Recipient"], f"rfc822; {address}")
        self.assertEqual(block["Action"], "failed")
        self.assertEqual(block["Status"], status)
        self.assertEqual(block["Remote-MTA"], f"dns; {remote_mta}")
        self.assertRegex(block["Diagnostic-Code"], diagnostic)
        self.assertTrue(block["Last-Attempt-Date"])


class RemoteApplianceTests(OutboundCase):
    """Mail between two appliances: relayed, refused, partly refused, notified."""

    @defer.inlineCallbacks
    def test_swaks_submission_reaches_the_remote_appliance(self):
        local = yield self.start_local()
        remote = yield self.start_remote()
        r = yield self.swaks("--tls", "--auth", "PLAIN", "--au", "alice", "--ap", "alice-secret",
                             "--from", "alice@example.test", "--to", "rita@remote.test",
                             "--header", "Subject: across the loopback")
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        qid = re.search(r"250 2\.0\.0 Ok: queued as (\w+)", r.stdout).group(1)
        yield self.until(lambda: len(remote.messages("rita", "remote.test")) == 1,
                         "delivery at the remote appliance", app=remote)
        yield self.until(lambda: not local.queue_ids(), "the sender's queue to empty")
        msg = parse(remote.messages("rita", "remote.test")[0])
        self.assertEqual(msg["Subject"], "across the loopback")
        received = msg.get_all("Received")
        self.assertEqual(len(received), 2, received)
        # The remote appliance's, for the hop from us (STARTTLS is opportunistic) ...
        self.assertRegex(received[0], r"^from mx\.example\.test \(\[127\.0\.0\.\d+\]\) "
                                      r"\(using TLSv1\.[23] with cipher \S+\)\s+"
                                      r"by mx\.remote\.test \(mailbox_appliance\) with ESMTPS ")
        # ... and ours, for the submission.
        self.assertRegex(received[1], rf"by mx\.example\.test \(mailbox_appliance\) with ESMTPSA"
                                      rf" id {qid}\s+for <rita@remote\.test>;")
        log = local.log()
        self.assertRegex(log, rf"{qid}: to=<rita@remote\.test>, relay=mx\.remote\.test\S*, "
                              r"delay=[\d.]+, dsn=2\.\d\.\d, status=sent")
        self.assertIn(f"{qid}: removed", log)
        self.assertEqual(self.notices(), [])
        self.assertClean(local, remote)

    @defer.inlineCallbacks
    def test_unknown_user_bounces_to_the_senders_inbox(self):
        local = yield self.start_local(listeners=("submission", "imap"))
        remote = yield self.start_remote()
        qid = yield self.submit(["nobody@remote.test"], "to nobody")
        yield self.until(lambda: len(self.notices()) == 1, "the bounce")
        yield self.until(lambda: not local.queue_ids(), "the queue to empty")
        # Alice reads it in her INBOX.
        inbox = yield self.imap_inbox()
        self.assertEqual(len(inbox), 1)
        raw = inbox[0]
        msg, per_message, recipients, returned = dsn_parts(raw)
        self.assertEqual(msg.get_content_type(), "multipart/report")
        self.assertEqual(msg.get_param("report-type"), "delivery-status")
        self.assertEqual(msg["From"], "Mail Delivery System <MAILER-DAEMON@mx.example.test>")
        self.assertEqual(msg["To"], "<alice@example.test>")
        self.assertEqual(msg["Subject"], "Undelivered Mail Returned to Sender")
        self.assertEqual(msg["Auto-Submitted"], "auto-replied")
        # The envelope sender of a notice is null (RFC 5321 4.5.5).
        self.assertRegex(raw, rb"^Return-Path: <>\r?\n")
        parts = msg.get_payload()
        self.assertEqual([p.get_content_type() for p in parts],
                         ["text/plain", "message/delivery-status", "message/rfc822"])
        self.assertIn("<nobody@remote.test>: host mx.remote.test said: 550 5.1.1",
                      parts[0].get_payload(decode=True).decode())
        self.assertEqual(per_message["Reporting-MTA"], "dns; mx.example.test")
        self.assertEqual(per_message["X-Queue-ID"], qid)
        self.assertTrue(per_message["Arrival-Date"])
        self.assertEqual(len(recipients), 1)
        self.assertFailedRecipient(recipients[0], "nobody@remote.test", "5.1.1",
                                   r"^smtp; 550 5\.1\.1 <nobody@remote\.test>: Recipient address "
                                   r"rejected: User unknown$", "mx.remote.test")
        # The original comes back whole.
        original = returned.get_payload()[0]
        self.assertEqual(original["Subject"], "to nobody")
        self.assertEqual(original.get_payload().strip(), "hello from example.test")
        self.assertRegex(local.log(), rf"{qid}: to=<nobody@remote\.test>, relay=mx\.remote\.test"
                                      r"\S*, delay=[\d.]+, dsn=5\.1\.1, status=bounced")
        self.assertEqual(remote.messages("rita", "remote.test"), [])
        self.assertClean(local, remote)

    @defer.inlineCallbacks
    def test_partial_success_delivers_once_and_bounces_the_rest(self):
        local = yield self.start_local()
        remote = yield self.start_remote()
        yield self.submit(["rita@remote.test", "nobody@remote.test"], "half of it")
        yield self.until(lambda: len(self.notices()) == 1, "the bounce")
        yield self.until(lambda: not local.queue_ids(), "the queue to empty")
        yield self.until(lambda: len(remote.messages("rita", "remote.test")) == 1,
                         "the delivery", app=remote)
        _msg, _per_message, recipients, returned = dsn_parts(self.notices()[0])
        self.assertEqual([b["Final-Recipient"] for b in recipients],
                         ["rfc822; nobody@remote.test"])
        self.assertFailedRecipient(recipients[0], "nobody@remote.test", "5.1.1",
                                   r"^smtp; 550 5\.1\.1 ", "mx.remote.test")
        self.assertEqual(returned.get_payload()[0]["Subject"], "half of it")
        # One transaction carried it: nothing is sent twice, nothing more is owed.
        self.assertEqual(parse(remote.messages("rita", "remote.test")[0])["Subject"],
                         "half of it")
        self.assertEqual(len(self.notices()), 1)
        self.assertEqual(remote.queue_ids(), [])
        self.assertClean(local, remote)

    @defer.inlineCallbacks
    def test_notify_success_is_passed_on_to_a_dsn_server(self):
        local = yield self.start_local()
        remote = yield self.start_remote()
        qid = yield self.submit(["rita@remote.test"], "tell me", mail_options=["ENVID=env-42"],
                                rcpt_options=["NOTIFY=SUCCESS,DELAY",
                                              "ORCPT=rfc822;rita@remote.test"])
        # The remote appliance delivers, and it owes alice the notice now:
        # it comes back to our MX from there, and none is made here.
        yield self.until(lambda: len(self.notices()) == 1, "the remote appliance's notice")
        yield self.until(lambda: not local.queue_ids() and not remote.queue_ids(),
                         "both queues to empty")
        msg, per_message, recipients, returned = dsn_parts(self.notices()[0])
        self.assertEqual(msg["From"], "Mail Delivery System <MAILER-DAEMON@mx.remote.test>")
        self.assertEqual(msg["Subject"], "Successful Mail Delivery Report")
        self.assertEqual(per_message["Reporting-MTA"], "dns; mx.remote.test")
        # ENVID and ORCPT travelled with the message.
        self.assertEqual(per_message["Original-Envelope-Id"], "env-42")
        self.assertEqual(len(recipients), 1)
        self.assertEqual(recipients[0]["Original-Recipient"], "rfc822; rita@remote.test")
        self.assertEqual(recipients[0]["Final-Recipient"], "rfc822; rita@remote.test")
        self.assertEqual(recipients[0]["Action"], "delivered")
        self.assertEqual(recipients[0]["Status"], "2.0.0")
        # A success returns the headers only.
        self.assertEqual(returned.get_content_type(), "text/rfc822-headers")
        self.assertNotIn(f"{qid}: sender", local.log())
        self.assertEqual(len(remote.messages("rita", "remote.test")), 1)
        self.assertClean(local, remote)


class SinkTests(OutboundCase):
    """Delivery to Postfix's smtp-sink: MX fallback, 4xx, NOTIFY, delays, expiry."""

    @defer.inlineCallbacks
    def test_preferred_mx_down_second_used(self):
        local = yield self.start_local()
        sink = yield self.start_sink()
        qid = yield self.submit(["someone@backup.test"], "via the backup MX")
        yield self.until(self.sink_got(sink, "via the backup MX"), "delivery at the sink")
        yield self.until(lambda: not local.queue_ids(), "the queue to empty")
        dump = sink.messages()[0]
        self.assertIn(b"X-Mail-Args: <alice@example.test>", dump)
        self.assertIn(b"X-Rcpt-Args: <someone@backup.test>", dump)
        log = local.log()
        # The first host was tried, and refused the connection.
        self.assertRegex(log, r"connect to down\.backup\.test\[127\.0\.0\.4\]:\d+: "
                              r"[Cc]onnection refused")
        self.assertRegex(log, rf"{qid}: to=<someone@backup\.test>, relay=up\.backup\.test\S*, "
                              r"delay=[\d.]+, dsn=2\.\d\.\d, status=sent")
        self.assertEqual(self.notices(), [])
        self.assertClean()

    @defer.inlineCallbacks
    def test_4xx_then_success_after_flush(self):
        local = yield self.start_local()
        sink = yield self.start_sink("-r", "RCPT")
        qid = yield self.submit(["someone@sink.test"], "try again later")
        yield self.until(lambda: f"{qid}: to=<someone@sink.test>" in local.log(),
                         "the first attempt")
        self.assertRegex(local.log(), rf"{qid}: to=<someone@sink\.test>, relay=mx\.sink\.test"
                                      r"\S*, delay=[\d.]+, dsn=4\.3\.0, status=deferred "
                                      r"\(450 4\.3\.0 Error: command failed\)")
        yield self.until(lambda: os.path.exists(os.path.join(
            local.data_dir, "queue", "active", qid + ".status")), "the status record")
        listing = yield self.queue("list")
        self.assertEqual(listing.returncode, 0, listing.stderr)
        self.assertIn("someone@sink.test  [deferred]", listing.stdout)
        self.assertIn("(450 4.3.0 Error: command failed, from mx.sink.test", listing.stdout)
        self.assertIn("(1 attempt, next ", listing.stdout)
        self.assertEqual(sink.messages(), [])
        # The sink takes mail again; the administrator flushes the queue.
        yield threads.deferToThread(sink.restart, "-N")
        r = yield self.queue("flush")
        self.assertEqual((r.returncode, r.stdout),
                         (0, "1 message(s) scheduled for delivery now\n"), r.stderr)
        yield self.until(self.sink_got(sink, "try again later"), "delivery at the sink")
        yield self.until(lambda: not local.queue_ids(), "the queue to empty")
        self.assertRegex(local.log(), rf"{qid}: to=<someone@sink\.test>, relay=mx\.sink\.test"
                                      r"\S*, delay=[\d.]+, dsn=2\.\d\.\d, status=sent")
        listing = yield self.queue("list")
        self.assertEqual(listing.stdout, "Mail queue is empty\n")
        self.assertEqual(self.notices(), [])
        self.assertClean()

    @defer.inlineCallbacks
    def test_notify_delay_then_relayed_to_a_server_without_dsn(self):
        local = yield self.start_local(retry_schedule=["1s"], warn_after="2s")
        # -N: no DSN in the EHLO reply, so NOTIFY cannot be passed on.
        sink = yield self.start_sink("-N", "-r", "RCPT")
        qid = yield self.submit(["someone@sink.test"], "slow but sure",
                                rcpt_options=["NOTIFY=SUCCESS,DELAY"])
        yield self.until(lambda: len(self.notices()) == 1, "the delay notice")
        msg, per_message, recipients, returned = dsn_parts(self.notices()[0])
        self.assertEqual(msg["Subject"], "Delayed Mail (still being retried)")
        self.assertEqual(per_message["X-Queue-ID"], qid)
        (block,) = recipients
        self.assertEqual(block["Final-Recipient"], "rfc822; someone@sink.test")
        self.assertEqual(block["Action"], "delayed")
        self.assertEqual(block["Status"], "4.3.0")
        self.assertEqual(block["Remote-MTA"], "dns; mx.sink.test")
        self.assertEqual(block["Diagnostic-Code"], "smtp; 450 4.3.0 Error: command failed")
        self.assertTrue(block["Will-Retry-Until"])
        self.assertEqual(returned.get_content_type(), "text/rfc822-headers")
        self.assertEqual(local.queue_ids(), [qid])
        # The sink accepts now: the success is "relayed", from us. (A retry
        # that found the sink away while it restarted marked it dead for a
        # while: the flush forgets that.)
        yield threads.deferToThread(sink.restart, "-N")
        r = yield self.queue("flush")
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        yield self.until(self.sink_got(sink, "slow but sure"), "delivery at the sink")
        yield self.until(lambda: len(self.notices()) == 2, "the relayed notice")
        yield self.until(lambda: not local.queue_ids(), "the queue to empty")
        relayed = [m for m in self.notices() if b"Action: relayed" in m]
        self.assertEqual(len(relayed), 1)
        msg, per_message, recipients, _returned = dsn_parts(relayed[0])
        self.assertEqual(msg["Subject"], "Successful Mail Delivery Report")
        (block,) = recipients
        self.assertEqual((block["Final-Recipient"], block["Action"], block["Status"],
                          block["Remote-MTA"]),
                         ("rfc822; someone@sink.test", "relayed", "2.0.0", "dns; mx.sink.test"))
        # One delay notice however many attempts were deferred; NOTIFY never
        # reached a server that did not offer DSN.
        self.assertEqual(len(self.notices()), 2)
        self.assertIn(b"X-Rcpt-Args: <someone@sink.test>\n", sink.messages()[0])
        self.assertClean()

    @defer.inlineCallbacks
    def test_a_restart_keeps_the_retry_state(self):
        local = yield self.start_local(retry_schedule=["1s"], warn_after="2s")
        sink = yield self.start_sink("-r", "RCPT")
        qid = yield self.submit(["someone@sink.test"], "across a restart")
        yield self.until(lambda: len(self.notices()) == 1, "the delay notice")
        yield threads.deferToThread(local.stop)
        deferred = re.compile(rf"{qid}: to=<someone@sink\.test>, relay=\S+, delay=[\d.]+, "
                              r"dsn=4\.3\.0, status=deferred")
        before = len(deferred.findall(local.log()))
        shown = yield self.queue("show", qid, "--json")
        attempts = json.loads(shown.stdout)["attempts"]
        self.assertEqual(attempts, before)
        yield threads.deferToThread(local.start)
        yield self.until(lambda: "1 message(s) recovered from disk" in local.log(), "recovery")
        yield self.until(lambda: len(deferred.findall(local.log())) >= before + 2,
                         "more attempts after the restart")
        # The warning was given before the restart: not again.
        self.assertEqual(len(self.notices()), 1)
        shown = yield self.queue("show", qid, "--json")
        doc = json.loads(shown.stdout)
        self.assertGreaterEqual(doc["attempts"], before + 2)
        self.assertEqual(doc["recipients"][0]["last"]["reply"],
                         "450 4.3.0 Error: command failed")
        yield threads.deferToThread(sink.restart)
        yield self.queue("flush")
        yield self.until(self.sink_got(sink, "across a restart"), "delivery at the sink")
        yield self.until(lambda: not local.queue_ids(), "the queue to empty")
        self.assertEqual(len(self.notices()), 1)
        self.assertClean()

    @defer.inlineCallbacks
    def test_expiry_bounces_and_empties_the_queue(self):
        local = yield self.start_local(retry_schedule=["2s"], max_age="8s")
        yield self.start_sink("-r", "RCPT")
        qid = yield self.submit(["someone@sink.test"], "too late")
        yield self.until(lambda: len(self.notices()) == 1, "the expiry bounce", timeout=40)
        yield self.until(lambda: not local.queue_ids(), "the queue to empty")
        msg, _per_message, recipients, returned = dsn_parts(self.notices()[0])
        self.assertEqual(msg["Subject"], "Undelivered Mail Returned to Sender")
        (block,) = recipients
        self.assertEqual(block["Final-Recipient"], "rfc822; someone@sink.test")
        self.assertEqual(block["Action"], "failed")
        # A transient failure that lasted too long (RFC 3463: 4.X.X).
        self.assertRegex(block["Status"], r"^4\.\d+\.\d+$")
        self.assertEqual(block["Remote-MTA"], "dns; mx.sink.test")
        self.assertEqual(block["Diagnostic-Code"], "smtp; delivery time expired; last error: "
                                                   "450 4.3.0 Error: command failed")
        self.assertEqual(returned.get_payload()[0]["Subject"], "too late")
        log = local.log()
        # The log line and the notice agree on the status: the last error's.
        self.assertRegex(log, rf"{qid}: to=<someone@sink\.test>, delay=[\d.]+, dsn=4\.3\.0, "
                              r"status=bounced \(message expired; last error: 450 ")
        # Several attempts, none after max_age.
        attempts = re.findall(rf"{qid}: to=<someone@sink\.test>, relay=\S+, delay=([\d.]+), "
                              r"dsn=4\.3\.0, status=deferred", log)
        self.assertGreaterEqual(len(attempts), 3, log[-3000:])
        self.assertLessEqual(max(float(a) for a in attempts), 8 + 1.5)
        self.assertClean()


class DNSOutcomeTests(OutboundCase):
    """What DNS says decides between a bounce and a retry."""

    @defer.inlineCallbacks
    def test_null_mx_bounces_at_once(self):
        local = yield self.start_local()
        qid = yield self.submit(["anyone@nullmx.test"], "to a null MX")
        yield self.until(lambda: len(self.notices()) == 1, "the bounce")
        yield self.until(lambda: not local.queue_ids(), "the queue to empty")
        _msg, _per_message, recipients, _returned = dsn_parts(self.notices()[0])
        (block,) = recipients
        self.assertEqual((block["Final-Recipient"], block["Action"], block["Status"]),
                         ("rfc822; anyone@nullmx.test", "failed", "5.1.10"))
        self.assertIsNone(block["Remote-MTA"])
        self.assertRegex(local.log(), rf"{qid}: to=<anyone@nullmx\.test>, delay=[\d.]+, "
                                      r"dsn=5\.1\.10, status=bounced")
        self.assertClean()

    @defer.inlineCallbacks
    def test_servfail_defers_and_never_bounces(self):
        local = yield self.start_local(retry_schedule=["1s"])
        qid = yield self.submit(["anyone@broken.test"], "to a broken zone")
        pattern = re.compile(rf"{qid}: to=<anyone@broken\.test>, delay=[\d.]+, dsn=4\.\d+\.\d+, "
                             r"status=deferred")
        yield self.until(lambda: len(pattern.findall(local.log())) >= 3, "three attempts")
        self.assertEqual(local.queue_ids(), [qid])
        self.assertEqual(self.notices(), [])
        self.assertNotIn("status=bounced", local.log())
        listing = yield self.queue("list")
        self.assertIn("anyone@broken.test  [deferred]", listing.stdout)
        self.assertClean()


class ETRNTests(OutboundCase):
    """ETRN from a relay_networks client runs the queue for a domain."""

    @defer.inlineCallbacks
    def test_etrn_delivers_a_waiting_domain(self):
        local = yield self.start_local(server_extra='relay_networks = ["127.0.0.1/32"]')
        qid = yield self.submit(["someone@sink.test"], "wait for ETRN")
        # Nobody listens yet: deferred, next try in an hour.
        yield self.until(lambda: "status=deferred" in local.log(), "the deferral")
        sink = yield self.start_sink()

        def etrn(source):
            with smtplib.SMTP(LOCAL, self.port, timeout=30, source_address=(source, 0)) as s:
                s.ehlo("client.example.test")
                return s.docmd("ETRN", "sink.test")
        # Not from another address, even on loopback ...
        code, text = yield threads.deferToThread(etrn, "127.0.0.6")
        self.assertEqual((code, text), (459, b"4.7.1 sink.test: client not authorised"))
        # ... but from a relay_networks client.
        code, text = yield threads.deferToThread(etrn, "127.0.0.1")
        self.assertEqual((code, text), (250, b"2.0.0 Queuing for node sink.test started"))
        yield self.until(self.sink_got(sink, "wait for ETRN"), "delivery at the sink")
        yield self.until(lambda: not local.queue_ids(), "the queue to empty")
        self.assertRegex(local.log(), rf"{qid}: to=<someone@sink\.test>, relay=mx\.sink\.test"
                                      r"\S*, delay=[\d.]+, dsn=2\.\d\.\d, status=sent")
        self.assertClean()


class ScriptedSinkTests(OutboundCase):
    """Replies Postfix's sink cannot give, from the scriptable sink of the tests."""

    @defer.inlineCallbacks
    def test_a_deferred_recipient_is_retried_alone(self):
        local = yield self.start_local(retry_schedule=["1s"])
        sink = yield start_sink(self, SINK, port=self.port,
                                rcpt={"later@sink.test": "450 4.2.1 Mailbox busy"})
        qid = yield self.submit(["now@sink.test", "later@sink.test"], "in two goes")
        yield self.until(lambda: len(sink.delivered) == 1, "the first delivery")
        yield self.until(lambda: "dsn=4.2.1, status=deferred" in local.log(), "the deferral")
        sink.script.rcpt = {}
        yield self.until(lambda: len(sink.delivered) == 2, "the second delivery")
        yield self.until(lambda: not local.queue_ids(), "the queue to empty")
        first, second = sink.delivered
        self.assertEqual(first.accepted, ["now@sink.test"])
        self.assertEqual([r[0] for r in second.rcpts], ["later@sink.test"])
        for tx in (first, second):
            self.assertEqual(tx.sender, "alice@example.test")
            self.assertIn(b"Subject: in two goes", tx.data)
        self.assertRegex(local.log(), rf"{qid}: to=<later@sink\.test>, relay=mx\.sink\.test\S*, "
                                      r"delay=[\d.]+, dsn=2\.\d\.\d, status=sent")
        self.assertEqual(self.notices(), [])
        self.assertClean()

    @defer.inlineCallbacks
    def test_one_connection_carries_consecutive_messages(self):
        local = yield self.start_local()
        sink = yield start_sink(self, SINK, port=self.port)
        for n in range(4):
            yield self.submit([f"r{n}@sink.test"], f"pooled {n}")
            yield self.until(lambda: len(sink.delivered) == n + 1, f"delivery {n}")
        yield self.until(lambda: not local.queue_ids(), "the queue to empty")
        # An idle connection is kept a few seconds and reused: one EHLO in all.
        self.assertEqual(len(sink.connections), 1)
        conn = sink.connections[0]
        self.assertEqual([tx.accepted for tx in conn.transactions],
                         [[f"r{n}@sink.test"] for n in range(4)])
        self.assertEqual([line.split()[0].upper() for line in conn.lines()
                          if line.split()[0].upper() in ("EHLO", "HELO")], ["EHLO"])
        self.assertClean()

    @defer.inlineCallbacks
    def test_refused_data_bounces_every_recipient(self):
        local = yield self.start_local()
        sink = yield start_sink(self, SINK, port=self.port,
                                eod="554 5.7.1 Message content refused")
        qid = yield self.submit(["one@sink.test", "two@sink.test"], "refused content")
        yield self.until(lambda: len(self.notices()) == 1, "the bounce")
        yield self.until(lambda: not local.queue_ids(), "the queue to empty")
        self.assertEqual(len(sink.transactions), 1)
        _msg, per_message, recipients, returned = dsn_parts(self.notices()[0])
        self.assertEqual(per_message["X-Queue-ID"], qid)
        self.assertEqual([b["Final-Recipient"] for b in recipients],
                         ["rfc822; one@sink.test", "rfc822; two@sink.test"])
        for block in recipients:
            self.assertFailedRecipient(block, block["Final-Recipient"][8:], "5.7.1",
                                       r"^smtp; 554 5\.7\.1 Message content refused$",
                                       "mx.sink.test")
        self.assertEqual(returned.get_payload()[0]["Subject"], "refused content")
        self.assertClean()

    @defer.inlineCallbacks
    def test_busy_greeting_moves_on_to_the_next_mx(self):
        self.dns.set("busy.test", "MX", [(10, "mx1.busy.test"), (20, "mx2.busy.test")])
        self.dns.set("mx1.busy.test", "A", [BUSY])
        self.dns.set("mx2.busy.test", "A", [SINK])
        local = yield self.start_local()
        busy = yield start_sink(self, BUSY, port=self.port,
                                greeting="421 4.3.2 Service not available, try later")
        sink = yield start_sink(self, SINK, port=self.port)
        qid = yield self.submit(["someone@busy.test"], "past a busy host")
        yield self.until(lambda: len(sink.delivered) == 1, "delivery at the second MX")
        yield self.until(lambda: not local.queue_ids(), "the queue to empty")
        self.assertEqual(len(busy.connections), 1)
        self.assertEqual(busy.transactions, [])
        self.assertRegex(local.log(), rf"{qid}: to=<someone@busy\.test>, relay=mx2\.busy\.test"
                                      r"\S*, delay=[\d.]+, dsn=2\.\d\.\d, status=sent")
        self.assertClean()


class ReturnPathTests(OutboundCase):
    """Notices travel out like any mail, from the null sender, and never loop."""

    def mx_send(self, sender, rcpts, subject, body="hello from outside"):
        """A message into our MX port (127.0.0.2), as another MTA would send it."""
        msg = f"From: <{sender}>\r\nTo: {', '.join(rcpts)}\r\nSubject: {subject}\r\n\r\n{body}\r\n"

        def send():
            with smtplib.SMTP(LOCAL, self.port, timeout=30) as s:
                s.ehlo("mx.outside.test")
                s.sendmail(sender, rcpts, msg)
        return threads.deferToThread(send)

    @defer.inlineCallbacks
    def test_bounce_of_a_forward_goes_back_to_the_remote_sender(self):
        # carol@example.test forwards to carol@elsewhere.test: a null MX.
        self.dns.set("elsewhere.test", "MX", [(0, ".")])
        local = yield self.start_local()
        remote = yield self.start_remote()
        yield self.mx_send("rita@remote.test", ["carol@example.test"], "for carol")
        yield self.until(lambda: len(self.notices("rita", remote, "remote.test")) == 1, "the bounce at rita's",
                         app=remote)
        yield self.until(lambda: not local.queue_ids(), "our queue to empty")
        raw = remote.messages("rita", "remote.test")[0]
        # It came from the null sender, through our outbound path.
        self.assertTrue(raw.startswith(b"Return-Path: <>\n"), raw[:200])
        msg, per_message, recipients, returned = dsn_parts(raw)
        self.assertEqual(msg["From"], "Mail Delivery System <MAILER-DAEMON@mx.example.test>")
        self.assertEqual(msg["To"], "<rita@remote.test>")
        self.assertRegex(msg["Received"], r"^from mx\.example\.test \(\[127\.0\.0\.\d+\]\)")
        self.assertEqual(per_message["Reporting-MTA"], "dns; mx.example.test")
        (block,) = recipients
        self.assertEqual((block["Final-Recipient"], block["Action"], block["Status"]),
                         ("rfc822; carol@elsewhere.test", "failed", "5.1.10"))
        self.assertEqual(returned.get_payload()[0]["Subject"], "for carol")
        self.assertRegex(local.log(), r"to=<rita@remote\.test>, relay=mx\.remote\.test\S*, "
                                      r"delay=[\d.]+, dsn=2\.\d\.\d, status=sent")
        self.assertClean(local, remote)

    @defer.inlineCallbacks
    def test_undeliverable_bounce_goes_to_the_postmaster_once(self):
        # The sender's domain takes no mail either: its bounce fails in
        # turn, and that failure goes to our postmaster (alice has the
        # postmaster@ address), once, and nothing more.
        self.dns.set("elsewhere.test", "MX", [(0, ".")])
        local = yield self.start_local()
        yield self.mx_send("someone@nullmx.test", ["carol@example.test"], "double bounce")
        yield self.until(lambda: len(self.notices()) == 1, "the postmaster's copy")
        yield self.until(lambda: not local.queue_ids(), "the queue to empty")
        msg, _per_message, recipients, returned = dsn_parts(self.notices()[0])
        self.assertEqual(msg["To"], "<postmaster@example.test>")
        self.assertEqual(msg["Subject"], "Postmaster Copy: Undelivered Mail Returned to Sender")
        (block,) = recipients
        self.assertEqual((block["Final-Recipient"], block["Action"], block["Status"]),
                         ("rfc822; someone@nullmx.test", "failed", "5.1.10"))
        # What is returned is the first bounce, which returns the original.
        self.assertEqual(returned.get_content_type(), "message/rfc822")
        first_bounce = returned.get_payload()[0]
        self.assertEqual(first_bounce["Subject"], "Undelivered Mail Returned to Sender")
        self.assertIn("Subject: double bounce", first_bounce.as_string())
        # Stable: nothing else is made of it.
        yield wait_until(lambda: False, timeout=1.5, what="nothing").addErrback(lambda f: None)
        self.assertEqual(len(self.notices()), 1)
        self.assertEqual(local.queue_ids(), [])
        self.assertClean()

    @defer.inlineCallbacks
    def test_body_arrives_unchanged_through_dot_stuffing(self):
        local = yield self.start_local()
        remote = yield self.start_remote()
        body = ("first line\r\n.leading dot\r\n..two dots\r\n.\r\n"
                ". \r\n" + "x" * 990 + "\r\nlast line")
        yield self.submit(["rita@remote.test"], "transparency", body=body)
        yield self.until(lambda: len(remote.messages("rita", "remote.test")) == 1,
                         "delivery at the remote appliance", app=remote)
        yield self.until(lambda: not local.queue_ids(), "our queue to empty")
        raw = remote.messages("rita", "remote.test")[0]
        self.assertTrue(raw.endswith(b"\n\n" + body.replace("\r\n", "\n").encode() + b"\n"),
                        raw[-300:])
        self.assertClean(local, remote)


class TLSPolicyTests(OutboundCase):
    """Outbound STARTTLS as [delivery] tls_policy asks, between real servers."""

    @defer.inlineCallbacks
    def test_verified_tls_to_the_remote_appliance(self):
        remote = yield self.start_remote()
        # The remote's self-signed certificate (for mx.remote.test) is our CA.
        ca = os.path.join(remote.data_dir, "tls", "cert.pem")
        local = yield self.start_local(tls_policy={"remote.test": "verify"}, tls_ca_file=ca)
        qid = yield self.submit(["rita@remote.test"], "verified")
        yield self.until(lambda: len(remote.messages("rita", "remote.test")) == 1,
                         "delivery at the remote appliance", app=remote)
        yield self.until(lambda: not local.queue_ids(), "our queue to empty")
        self.assertIn("mx.remote.test[127.0.0.3]:%d: TLS started (verified" % self.port,
                      local.log())
        self.assertRegex(local.log(), rf"{qid}: to=<rita@remote\.test>, relay=mx\.remote\.test"
                                      r"\S*, delay=[\d.]+, dsn=2\.\d\.\d, status=sent")
        self.assertClean(local, remote)

    @defer.inlineCallbacks
    def test_unverifiable_certificate_defers(self):
        remote = yield self.start_remote()
        # The system's CAs do not know the remote's certificate.
        local = yield self.start_local(tls_policy={"remote.test": "verify"})
        qid = yield self.submit(["rita@remote.test"], "not verified")
        yield self.until(lambda: f"{qid}: to=<rita@remote.test>" in local.log(), "the attempt")
        self.assertRegex(local.log(), rf"{qid}: to=<rita@remote\.test>, relay=mx\.remote\.test"
                                      r"\S*, delay=[\d.]+, dsn=4\.7\.5, status=deferred")
        self.assertEqual(local.queue_ids(), [qid])
        self.assertEqual(remote.messages("rita", "remote.test"), [])
        self.assertNotIn("from=<alice@example.test>", remote.log())
        self.assertClean(local, remote)

    @defer.inlineCallbacks
    def test_required_tls_never_falls_back_to_plain_text(self):
        local = yield self.start_local(tls_policy={"sink.test": "encrypt"})
        sink = yield self.start_sink()          # smtp-sink offers no STARTTLS
        qid = yield self.submit(["someone@sink.test"], "secret")
        yield self.until(lambda: f"{qid}: to=<someone@sink.test>" in local.log(), "the attempt")
        self.assertRegex(local.log(), rf"{qid}: to=<someone@sink\.test>, relay=mx\.sink\.test"
                                      r"\S*, delay=[\d.]+, dsn=4\.7\.\d, status=deferred")
        self.assertEqual(sink.messages(), [])
        self.assertEqual(local.queue_ids(), [qid])
        self.assertClean()
