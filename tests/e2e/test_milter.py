"""End-to-end: a real milter, Debian's opendkim, signing mail the appliance receives.

opendkim runs in the foreground as this test's own process, on a free
loopback port, signing for example.test with a key ``opendkim-genkey``
made in the test's folder; it signs what comes from its InternalHosts
(127.0.0.1 here), which is where swaks connects from.

- In-process: the milter filter asks opendkim about a message; the
  rewrite it returns carries opendkim's DKIM-Signature, which our DKIM
  verifier (``dkim_verify.verify_signatures``) finds valid with the key
  opendkim-genkey printed. From outside (a client not in InternalHosts)
  nothing is signed.
- The real process: ``[[antispam.milter]]`` points at opendkim; a
  message sent with swaks to the MX is delivered signed, and the
  signature verifies. With opendkim stopped, the client is told
  ``451 4.7.1`` and nothing is stored (``default_action = "tempfail"``).
- The real process against the unit tests' fake milter (in this test's
  reactor): a reply code refuses the message (nothing stored), header
  edits and a new body are delivered, quarantine holds the message in the
  queue, discard accepts and drops it.

The opendkim tests are skipped when opendkim (packages ``opendkim`` and
``opendkim-tools``) or swaks is not installed.
"""

import os
import re
import shutil
import smtplib
import socket
import struct
import subprocess
import time

from twisted.internet import defer, endpoints, reactor, threads
from twisted.trial import unittest

from mailbox_appliance.antispam import milter as m
from mailbox_appliance.antispam.dkim_verify import verify_signatures
from mailbox_appliance.antispam.message import ScannedMessage
from mailbox_appliance.antispam.milter_filter import MilterFilter
from mailbox_appliance.smtp.session import SessionState
from tests.e2e.harness import DOOR_CHECKS_OFF, ApplianceProcess, free_port, wait_until

OPENDKIM = shutil.which("opendkim") or "/usr/sbin/opendkim"
GENKEY = shutil.which("opendkim-genkey") or "/usr/sbin/opendkim-genkey"
SELECTOR = "milt"
KEY_NAME = f"{SELECTOR}._domainkey.example.test"


def message(subject, from_="Alice <alice@example.test>", to="bob@example.test"):
    return (f"From: {from_}\r\nTo: {to}\r\nSubject: {subject}\r\n"
            f"Date: Sat, 28 Nov 2026 11:00:00 +0000\r\nMessage-ID: <{subject}@example.test>\r\n"
            f"MIME-Version: 1.0\r\nContent-Type: text/plain\r\n\r\n"
            f"Lunch at noon.\r\n\r\n-- \r\nAlice\r\n").encode()


class OpenDKIM:
    """opendkim in the foreground on 127.0.0.1:``port``, signing ``domain``."""

    def __init__(self, workdir, domain="example.test", selector=SELECTOR,
                 canonicalization="simple/simple"):
        self.workdir = os.path.abspath(workdir)
        os.makedirs(self.workdir, exist_ok=True)
        self.domain, self.selector = domain, selector
        self.port = free_port()
        self.conf = os.path.join(self.workdir, "opendkim.conf")
        self.log_path = os.path.join(self.workdir, "opendkim.log")
        self.canonicalization = canonicalization
        self.proc = None

    @staticmethod
    def available():
        return os.access(OPENDKIM, os.X_OK) and os.access(GENKEY, os.X_OK)

    def start(self, wait=15):
        """Make the key, write the configuration, run it until it listens. Blocks."""
        subprocess.run([GENKEY, "-b", "2048", "-D", self.workdir, "-d", self.domain,
                        "-s", self.selector], check=True, capture_output=True, timeout=60)
        with open(self.conf, "w") as f:
            f.write(f"""Syslog no
LogWhy yes
Mode sv
Domain {self.domain}
Selector {self.selector}
KeyFile {self.workdir}/{self.selector}.private
Socket inet:{self.port}@127.0.0.1
Canonicalization {self.canonicalization}
InternalHosts 127.0.0.1
RequireSafeKeys no
""")
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([OPENDKIM, "-f", "-x", self.conf], stdout=self._log,
                                     stderr=subprocess.STDOUT, cwd=self.workdir)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"opendkim exited with {self.proc.returncode}: {self.log()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("opendkim did not start: " + self.log())

    def stop(self):
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()

    def log(self):
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def public_key(self) -> bytes:
        """The TXT record opendkim-genkey wrote, as one string."""
        with open(os.path.join(self.workdir, self.selector + ".txt")) as f:
            return "".join(re.findall(r'"([^"]*)"', f.read())).encode()


def signatures(raw):
    """The DKIM-Signature fields of a message (Maildir has LF ends)."""
    head = raw.replace(b"\r\n", b"\n").split(b"\n\n", 1)[0]
    return re.findall(rb"(?im)^DKIM-Signature:[^\n]*(?:\n[ \t][^\n]*)*", head)


def verify(raw, key):
    """Our DKIM verifier's results for the first signature (CRLF restored)."""
    crlf = re.sub(rb"(?<!\r)\n", b"\r\n", raw)
    return verify_signatures(crlf, 1, {KEY_NAME: ("ok", key)})


class MilterCase(unittest.TestCase):

    timeout = 120

    @defer.inlineCallbacks
    def setUp(self):
        if not OpenDKIM.available():
            raise unittest.SkipTest("opendkim is not installed (apt-get install opendkim "
                                    "opendkim-tools)")
        self.opendkim = OpenDKIM(self.mktemp())
        yield threads.deferToThread(self.opendkim.start)
        self.addCleanup(self.opendkim.stop)

    def milter_filter(self, **kw):
        ep = endpoints.clientFromString(reactor, f"tcp:127.0.0.1:{self.opendkim.port}")
        return MilterFilter("opendkim", ep, reactor, "mx.example.test",
                            local_domains=("example.test",), **kw)


class InProcessTests(MilterCase):

    def scan(self, raw, client_ip):
        msg = ScannedMessage.parse(
            b"Received: from client.example.test ([%s])\r\n\tby mx.example.test with ESMTP "
            b"id Q1; Sat, 28 Nov 2026 11:00:01 +0000\r\n" % client_ip.encode() + raw,
            sender="alice@example.test", recipients=("bob@example.test",),
            client_ip=client_ip, helo="client.example.test")
        msg.facts["qid"] = "Q1"
        session = SessionState(client_ip=client_ip, client_port=40000, helo=msg.helo,
                               server_ip="127.0.0.1")
        d = self.milter_filter().scan(msg, session)
        return d.addCallback(lambda result: (msg, result))

    @defer.inlineCallbacks
    def test_internal_client_signed_and_signature_verifies(self):
        msg, result = yield self.scan(message("signed"), "127.0.0.1")
        self.assertIsNotNone(result, self.opendkim.log())
        self.assertIsNone(result.verdict)
        signed = result.rewrite(msg.raw)
        [sig] = signatures(signed)
        self.assertIn(b"d=example.test", sig)
        self.assertIn(b"s=" + SELECTOR.encode(), sig)
        # Only a field was added: the message below it is byte for byte the same.
        self.assertTrue(signed.startswith(b"DKIM-Signature:"))
        self.assertTrue(signed.endswith(msg.raw))
        outcome = yield threads.deferToThread(verify, signed, self.opendkim.public_key())
        self.assertEqual(outcome, [("pass", "")])
        # Tampered with afterwards: the verifier notices.
        bad = yield threads.deferToThread(
            verify, signed.replace(b"Lunch at noon", b"Lunch at one"),
            self.opendkim.public_key())
        self.assertEqual(bad[0][0], "fail")

    @defer.inlineCallbacks
    def test_external_client_not_signed(self):
        msg, result = yield self.scan(message("outside"), "192.0.2.7")
        signed = result.rewrite(msg.raw) if result and result.rewrite else msg.raw
        self.assertEqual(signatures(signed), [])
        self.assertIsNone(result.verdict if result else None)


CONTENT = DOOR_CHECKS_OFF + """[antispam.content]
enabled = true
[antispam.rules]
enabled = false
[antispam.bayes]
enabled = false
[antispam.dmarc]
enabled = false
[antispam.dkim]
verify = false
sign = false
[[antispam.milter]]
name = "opendkim"
endpoint = "tcp:127.0.0.1:{port}"
connect_timeout = "2s"
command_timeout = "10s"
eom_timeout = "20s"
default_action = "tempfail"
"""


class ApplianceTests(MilterCase):

    @defer.inlineCallbacks
    def setUp(self):
        yield super().setUp()
        self.app = ApplianceProcess(os.path.join(self.mktemp(), "mx"),
                                    extra=CONTENT.format(port=self.opendkim.port))
        yield threads.deferToThread(self.app.start)
        self.addCleanup(self.app.stop)

    def swaks(self, subject):
        path = os.path.abspath(self.mktemp() + ".eml")
        with open(path, "wb") as f:
            f.write(message(subject))
        return threads.deferToThread(
            subprocess.run, ["swaks", "--server", "127.0.0.1", "--port", str(self.app.smtp_port),
                             "--helo", "client.example.test", "--from", "alice@example.test",
                             "--to", "bob@example.test", "--data", "@" + path],
            capture_output=True, text=True, timeout=60)

    @defer.inlineCallbacks
    def test_mail_through_the_mx_signed_by_opendkim(self):
        if not shutil.which("swaks"):
            raise unittest.SkipTest("swaks is not installed")
        done = yield self.swaks("through-the-mx")
        self.assertEqual(done.returncode, 0, done.stdout + done.stderr + self.app.log()[-3000:])
        yield wait_until(lambda: self.app.messages("bob"), what="delivery", log=self.app.log)
        [raw] = self.app.messages("bob")
        [sig] = signatures(raw)
        self.assertIn(b"d=example.test", sig)
        outcome = yield threads.deferToThread(verify, raw, self.opendkim.public_key())
        self.assertEqual(outcome, [("pass", "")], raw.decode("utf-8", "replace"))
        self.assertNotIn("Traceback", self.app.log())

    @defer.inlineCallbacks
    def test_milter_down_tempfails_and_nothing_stored(self):
        if not shutil.which("swaks"):
            raise unittest.SkipTest("swaks is not installed")
        yield threads.deferToThread(self.opendkim.stop)
        done = yield self.swaks("milter-down")
        self.assertNotEqual(done.returncode, 0)
        self.assertIn("<** 451 4.7.1 Service unavailable - try again later", done.stdout)
        self.assertEqual(self.app.messages("bob"), [])
        self.assertEqual(self.app.queue_ids(), [])
        self.assertIn("milter:opendkim failed", self.app.log())


class ScriptedMilterTests(unittest.TestCase):
    """The real process against the unit tests' fake milter, on a loopback port
    in this test's reactor: what each answer of a milter does to the mail."""

    timeout = 120

    @defer.inlineCallbacks
    def setUp(self):
        from twisted.internet.protocol import Factory
        from tests.test_milter import FakeMilter
        self.script = {}
        self.milters = []

        def build():
            fm = FakeMilter(script=self.script)
            self.milters.append(fm)
            return fm
        port = reactor.listenTCP(0, Factory.forProtocol(build), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.app = ApplianceProcess(os.path.join(self.mktemp(), "mx"),
                                    extra=CONTENT.format(port=port.getHost().port))
        yield threads.deferToThread(self.app.start)
        self.addCleanup(self.app.stop)

    def send(self, subject):
        def run():
            with smtplib.SMTP("127.0.0.1", self.app.smtp_port, timeout=60) as s:
                s.ehlo("client.ext.test")
                s.mail("sender@ext.test")
                s.rcpt("bob@example.test")
                code, text = s.data(message(subject, from_="Sender <sender@ext.test>"))
                return code, text.decode("utf-8", "replace")
        return threads.deferToThread(run)

    def held(self):
        hold = os.path.join(self.app.data_dir, "queue", "hold")
        return sorted(n for n in os.listdir(hold) if "." not in n) if os.path.isdir(hold) else []

    @defer.inlineCallbacks
    def test_reply_code_refuses_and_nothing_stored(self):
        self.script[b"E"] = m.packet(b"y", b"554 5.7.0 Virus found\0")
        code, text = yield self.send("virus")
        self.assertEqual((code, text), (554, "5.7.0 Virus found"))
        self.assertEqual(self.app.messages("bob"), [])
        self.assertEqual(self.app.queue_ids(), [])
        [fm] = self.milters
        self.assertEqual(fm.macros[b"C"][b"{client_addr}"], b"127.0.0.1")
        self.assertTrue(fm.macros[b"M"][b"i"])       # the queue id

    @defer.inlineCallbacks
    def test_edits_delivered(self):
        self.script[b"E"] = (m.packet(b"h", b"X-Scanned\0by fake\0")
                             + m.packet(b"m", struct.pack("!I", 1) + b"Subject\0[milter] edited\0")
                             + m.packet(b"b", b"A new body.\r\n")
                             + m.packet(b"a"))
        code, _ = yield self.send("edits")
        self.assertEqual(code, 250)
        yield wait_until(lambda: self.app.messages("bob"), what="delivery", log=self.app.log)
        [raw] = self.app.messages("bob")
        head, body = raw.split(b"\n\n", 1)
        head += b"\n"
        self.assertIn(b"\nX-Scanned: by fake\n", head)
        self.assertIn(b"\nSubject: [milter] edited\n", head)
        self.assertNotIn(b"Subject: edits", head)
        self.assertEqual(body, b"A new body.\n")

    @defer.inlineCallbacks
    def test_quarantine_holds_the_message(self):
        self.script[b"E"] = m.packet(b"q", b"suspicious\0") + m.packet(b"c")
        code, _ = yield self.send("quarantine")
        self.assertEqual(code, 250)
        yield wait_until(lambda: self.held(), what="hold", log=self.app.log)
        self.assertEqual(self.app.messages("bob"), [])

    @defer.inlineCallbacks
    def test_discard_accepts_and_drops(self):
        self.script[b"R"] = m.packet(b"d")
        code, _ = yield self.send("discard")
        self.assertEqual(code, 250)
        self.assertEqual(self.app.messages("bob"), [])
        self.assertEqual(self.app.queue_ids(), [])
