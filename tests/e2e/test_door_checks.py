"""End-to-end: the checks at the door (issue 5) in the real process.

Each test starts the appliance with the ``[antispam.*]`` tables it needs
switched on and everything else explicitly off (the harness leaves the
checks on their defaults - greylisting, SPF, the sender MX check all on -
as soon as the extra TOML names an ``[antispam`` table). Clients bind to
distinct loopback addresses to play different hosts, none of them in
``relay_networks`` (empty: trusted clients would skip every check):

    127.0.0.1  the appliance's listener (and the harness' start-up probe)
    127.0.0.2  a client (listed on the test block list)
    127.0.0.3  another client (not listed; allowed by the SPF test record)

The DNS the appliance asks is a twisted.names authority run in this
test's reactor, so every client (sockets, smtplib, swaks, the admin
command) runs in a thread and waits are polled on the reactor.

Refused mail is checked for the exact reply code and for leaving nothing
behind: the recipient's Maildir and the queue stay empty.
"""

import json
import shutil
import smtplib
import socket
import subprocess
import time

from twisted.internet import defer, reactor, task, threads
from twisted.trial import unittest

from tests.dns_helpers import start_fake_dns
from tests.e2e.harness import ApplianceProcess, run_cli, wait_until

LISTED, CLEAN = "127.0.0.2", "127.0.0.3"
HELO = "client.ext.test"

# Every door check off or out of reach; each test switches on its own.
QUIET = {
    "connection": {"greet_pause": "0s", "max_connections_per_ip": 100000,
                   "max_connection_rate": 1000000, "max_message_rate": 1000000,
                   "rate_window": "60s", "bad_rcpt_throttle": 100000,
                   "bad_rcpt_limit": 100000},
    "helo": {"reject_invalid": False, "reject_our_name": False, "require_resolvable": False},
    "dns": {"check_sender_mx": False, "require_rdns": "off", "dnsbl": [], "rhsbl": [],
            "timeout": "2s"},
    "spf": {"enabled": False},
    "greylist": {"enabled": False},
    "content": {"enabled": False},
    "dkim": {"sign": False},
}

MSG = "From: <{sender}>\r\nTo: <{rcpt}>\r\nSubject: {subject}\r\n\r\ndoor check test\r\n"


def door_toml(dns_server, **tables):
    """``[antispam.*]`` tables (QUIET, updated by ``tables``) and ``[dns]``."""
    out = []
    for name, values in QUIET.items():
        merged = dict(values, **tables.get(name, {}))
        out.append(f"[antispam.{name}]\n" + "".join(
            f"{k} = {json.dumps(v)}\n" for k, v in merged.items()))
    out.append(f'[dns]\nservers = ["{dns_server}"]\ntimeout = 2\n')
    return "\n" + "\n".join(out)


def read_reply(sock, limit=8192):
    """One SMTP reply (every line of it) as text; "" when the server closed first."""
    data = b""
    while len(data) < limit:
        lines = data.split(b"\r\n")
        if len(lines) > 1 and any(len(line) >= 4 and line[3:4] == b" " for line in lines[:-1]):
            break
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data.decode("ascii", "replace")


def read_to_end(sock, limit=65536):
    """Everything the server sends until it closes (a reset counts as closing)."""
    data = b""
    try:
        while len(data) < limit:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
    except ConnectionResetError:
        pass
    return data.decode("ascii", "replace")


def pause(seconds):
    """A Deferred firing after ``seconds`` on the reactor (which keeps serving the DNS)."""
    return task.deferLater(reactor, seconds, lambda: None)


def connect(port, source, timeout=15):
    return socket.create_connection(("127.0.0.1", port), timeout=timeout,
                                    source_address=(source, 0))


def attempt(port, source, sender, rcpt, subject, helo=HELO):
    """One SMTP transaction with smtplib from ``source``.

    Returns {"greeting": (code, text), "mail": ..., "rcpt": ..., "data": ...}
    up to the first reply that is not a success (the later stages absent).
    """
    out = {}
    with smtplib.SMTP(timeout=30, source_address=(source, 0)) as s:
        out["greeting"] = s.connect("127.0.0.1", port)
        s.ehlo(helo)
        for stage, call in (("mail", lambda: s.mail(sender)),
                            ("rcpt", lambda: s.rcpt(rcpt)),
                            ("data", lambda: s.data(MSG.format(sender=sender, rcpt=rcpt,
                                                               subject=subject)))):
            code, text = call()
            out[stage] = (code, text.decode("utf-8", "replace"))
            if code >= 400:
                break
    return out


class DoorCase(unittest.TestCase):
    """A fake DNS per test, and the appliance started with the given door checks."""

    timeout = 120
    records = {}
    servfail = ()
    silent = ()

    @defer.inlineCallbacks
    def setUp(self):
        self.dns = yield start_fake_dns(self, self.records, servfail=self.servfail,
                                        silent=self.silent)
        self.app = None

    @defer.inlineCallbacks
    def start(self, dns_server=None, **tables):
        app = ApplianceProcess(self.mktemp(),
                               extra=door_toml(dns_server or self.dns.server, **tables))
        yield threads.deferToThread(app.start)
        self.addCleanup(app.stop)
        self.app = app
        return app

    def run_(self, f, *args, **kwargs):
        return threads.deferToThread(f, *args, **kwargs)

    def send(self, source, sender, subject, rcpt="alice@example.test"):
        return self.run_(attempt, self.app.smtp_port, source, sender, rcpt, subject)

    def swaks(self, source, sender, subject, rcpt="alice@example.test"):
        if not shutil.which("swaks"):
            raise unittest.SkipTest("swaks is not installed")
        return self.run_(
            subprocess.run,
            ["swaks", "--server", "127.0.0.1", "--port", str(self.app.smtp_port),
             "--local-interface", source, "--helo", HELO, "--from", sender, "--to", rcpt,
             "--header", f"Subject: {subject}", "--timeout", "30"],
            capture_output=True, text=True, timeout=60)

    def delivered(self, subject, local="alice"):
        return [m for m in self.app.messages(local) if f"Subject: {subject}".encode() in m]

    def until(self, predicate, what, timeout=30):
        return wait_until(predicate, timeout=timeout, what=what, log=self.app.log)

    @defer.inlineCallbacks
    def wait_delivered(self, subject, local="alice"):
        yield self.until(lambda: len(self.delivered(subject, local)) == 1,
                         f"delivery of {subject!r}")
        yield self.until(lambda: not self.app.queue_ids(), "an empty queue")
        return self.delivered(subject, local)[0]

    def assertNothingStored(self, local="alice"):
        self.assertEqual(self.app.messages(local), [])
        self.assertEqual(self.app.queue_ids(), [])

    def assertAccepted(self, result):
        self.assertEqual(result["greeting"][0], 220, result)
        self.assertEqual(result["mail"][0], 250, result)
        self.assertEqual(result["rcpt"][0], 250, result)
        self.assertEqual(result["data"][0], 250, result)

    def assertClean(self):
        self.assertNotIn("Traceback", self.app.log())


class GreetPauseTests(DoorCase):
    """``greet_pause``: a client that talks before the banner is cut off."""

    @defer.inlineCallbacks
    def test_early_talker_refused_patient_client_served(self):
        yield self.start(connection={"greet_pause": "2s"})
        port = self.app.smtp_port

        def early():
            # A bot: the whole transaction at once, without waiting for 220.
            with connect(port, LISTED) as s:
                s.sendall(b"EHLO x\r\nMAIL FROM:<bot@ext.test>\r\n"
                          b"RCPT TO:<alice@example.test>\r\nDATA\r\n"
                          b"Subject: early\r\n\r\nspam\r\n.\r\nQUIT\r\n")
                return read_to_end(s)
        seen = yield self.run_(early)
        self.assertTrue(seen.startswith("554 5.5.0 "), seen)
        # The banner never came and nothing after the refusal was answered.
        self.assertEqual(seen.count("\r\n"), 1, seen)
        self.assertNotIn("220", seen)
        self.assertIn("talked before the greeting", self.app.log())
        self.assertNothingStored()

        def patient():
            started = time.monotonic()
            result = attempt(port, CLEAN, "friend@ext.test", "alice@example.test", "patient")
            return result, time.monotonic() - started
        result, took = yield self.run_(patient)
        self.assertAccepted(result)
        # The server held the banner for the pause (a lower bound: no race).
        self.assertGreaterEqual(took, 1.9)
        yield self.wait_delivered("patient")
        self.assertClean()


class ConnectionLimitTests(DoorCase):
    """``max_connections_per_ip`` and ``max_connection_rate`` per client address."""

    @defer.inlineCallbacks
    def test_concurrent_connections_per_client(self):
        yield self.start(connection={"max_connections_per_ip": 20})
        port = self.app.smtp_port
        held = []
        self.addCleanup(lambda: [s.close() for s in held])

        def open_twenty():
            for _ in range(20):
                s = connect(port, LISTED)
                held.append(s)
                reply = read_reply(s)
                if not reply.startswith("220 "):
                    return reply
            return None
        bad = yield self.run_(open_twenty)
        self.assertIsNone(bad)

        def refused():
            with connect(port, LISTED) as s:
                return read_to_end(s)
        seen = yield self.run_(refused)
        self.assertTrue(seen.startswith("421 4.7.0 "), seen)
        self.assertIn("too many connections from 127.0.0.2", seen)

        def greeted(source):
            with connect(port, source) as s:
                reply = read_reply(s)
                if reply.startswith("220 "):
                    s.sendall(b"QUIT\r\n")
                    read_reply(s)
                return reply
        # Another client is not affected.
        other = yield self.run_(greeted, CLEAN)
        self.assertTrue(other.startswith("220 "), other)

        # One of the twenty leaves: its slot is free once the server has
        # seen the disconnect (asynchronous, so polled).
        first = held.pop(0)
        first.sendall(b"QUIT\r\n")
        yield self.run_(read_to_end, first)
        first.close()
        replies = []

        def again():
            replies.append(greeted(LISTED))
            return replies[-1].startswith("220 ")

        @defer.inlineCallbacks
        def poll():
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                ok = yield self.run_(again)
                if ok:
                    return
                self.assertTrue(replies[-1].startswith("421 4.7.0 "), replies[-1])
                yield pause(0.1)
            self.fail(f"no slot came free: {replies[-3:]}")
        yield poll()
        self.assertNothingStored()
        self.assertClean()

    @defer.inlineCallbacks
    def test_connection_rate_per_client(self):
        yield self.start(connection={"max_connection_rate": 5, "rate_window": "60s"})
        port = self.app.smtp_port

        def greetings(source, n):
            out = []
            for _ in range(n):
                with connect(port, source) as s:
                    reply = read_reply(s)
                    if reply.startswith("220 "):
                        s.sendall(b"QUIT\r\n")
                        read_reply(s)
                    else:
                        reply += read_to_end(s)
                    out.append(reply)
            return out
        seen = yield self.run_(greetings, LISTED, 6)
        for reply in seen[:5]:
            self.assertTrue(reply.startswith("220 "), seen)
        self.assertTrue(seen[5].startswith("421 4.7.0 "), seen)
        self.assertIn("too many connections from 127.0.0.2", seen[5])
        # Refused attempts count too: the client stays refused in its window.
        again = yield self.run_(greetings, LISTED, 1)
        self.assertTrue(again[0].startswith("421 4.7.0 "), again)
        # Another client has its own allowance.
        other = yield self.run_(greetings, CLEAN, 1)
        self.assertTrue(other[0].startswith("220 "), other)
        self.assertNothingStored()
        self.assertClean()


class BlocklistTests(DoorCase):
    """``[antispam.dns] dnsbl``: listed clients refused at RCPT, DNS trouble never."""

    records = {
        # 127.0.0.2 is listed by bl.test, with a reason.
        "2.0.0.127.bl.test": {"A": ["127.0.0.2"], "TXT": ["listed for testing"]},
        # err.test answers Spamhaus' "query through a public resolver" code.
        "2.0.0.127.err.test": {"A": ["127.255.255.254"], "TXT": ["open resolver"]},
        "3.0.0.127.err.test": {"A": ["127.255.255.254"]},
    }
    servfail = {"2.0.0.127.broken.test", "3.0.0.127.broken.test"}

    @defer.inlineCallbacks
    def test_listed_client_refused_at_rcpt_other_client_delivered(self):
        yield self.start(dns={"dnsbl": ["bl.test"]})
        result = yield self.send(LISTED, "someone@ext.test", "from listed")
        self.assertEqual(result["mail"][0], 250, result)
        code, text = result["rcpt"]
        self.assertEqual(code, 554, result)
        self.assertTrue(text.startswith("5.7.1 "), text)
        self.assertIn("client [127.0.0.2] blocked using bl.test", text)
        self.assertIn("listed for testing", text)
        self.assertNotIn("data", result)
        self.assertNothingStored()
        self.assertIn(("2.0.0.127.bl.test", "A"), self.dns.queries)

        result = yield self.send(CLEAN, "someone@ext.test", "from clean")
        self.assertAccepted(result)
        yield self.wait_delivered("from clean")
        self.assertIn(("3.0.0.127.bl.test", "A"), self.dns.queries)
        self.assertClean()

    @defer.inlineCallbacks
    def test_query_error_code_is_not_a_listing(self):
        yield self.start(dns={"dnsbl": ["err.test"]})
        result = yield self.send(LISTED, "someone@ext.test", "error code")
        self.assertAccepted(result)
        yield self.wait_delivered("error code")
        self.assertIn(("2.0.0.127.err.test", "A"), self.dns.queries)
        self.assertIn("a query error, not a listing", self.app.log())
        self.assertClean()

    @defer.inlineCallbacks
    def test_servfail_does_not_reject(self):
        yield self.start(dns={"dnsbl": ["broken.test"]})
        result = yield self.send(LISTED, "someone@ext.test", "servfail list")
        self.assertAccepted(result)
        yield self.wait_delivered("servfail list")
        self.assertIn(("2.0.0.127.broken.test", "A"), self.dns.queries)
        self.assertClean()


class SPFTests(DoorCase):
    """``[antispam.spf]`` through swaks: fail refused, pass tagged, DNS trouble 4xx."""

    records = {
        "spffail.test": {"TXT": ["v=spf1 -all"], "MX": [(10, "mx.spffail.test")]},
        "spfpass.test": {"TXT": ["v=spf1 ip4:127.0.0.3 -all"],
                         "MX": [(10, "mx.spfpass.test")]},
        "mx.spffail.test": {"A": ["192.0.2.25"]},
        "mx.spfpass.test": {"A": ["192.0.2.26"]},
    }
    servfail = {"spfbroken.test"}

    def tables(self):
        return {"spf": {"enabled": True, "fail": "reject", "permerror": "tag"}}

    @defer.inlineCallbacks
    def test_spf_fail_refused_at_mail(self):
        yield self.start(**self.tables())
        r = yield self.swaks(CLEAN, "someone@spffail.test", "spf fail")
        self.assertEqual(r.returncode, 23, r.stdout + r.stderr)     # MAIL FROM refused
        self.assertIn("<** 550 5.7.23 <someone@spffail.test>: SPF fail", r.stdout)
        self.assertNotIn("RCPT TO", r.stdout)
        self.assertNothingStored()
        self.assertIn(("spffail.test", "TXT"), self.dns.queries)
        self.assertClean()

    @defer.inlineCallbacks
    def test_spf_pass_delivered_with_headers(self):
        yield self.start(**self.tables())
        r = yield self.swaks(CLEAN, "someone@spfpass.test", "spf pass")
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        self.assertIn("250 2.0.0 Ok: queued as", r.stdout)
        message = yield self.wait_delivered("spf pass")
        head = message.split(b"\r\n\r\n", 1)[0].split(b"\n\n", 1)[0].decode("ascii", "replace")
        self.assertRegex(head, r"(?m)^Received-SPF: pass ")
        self.assertRegex(head, r"(?m)^Authentication-Results: mx\.example\.test;[\s\S]*"
                               r"spf=pass[\s\S]*smtp\.mailfrom=")
        # Both above our Received: (trace fields of this hop, RFC 5321 4.4).
        self.assertLess(head.index("Received-SPF:"), head.index("Received: from"))
        self.assertClean()

    @defer.inlineCallbacks
    def test_spf_servfail_is_a_temporary_error(self):
        yield self.start(**self.tables())
        r = yield self.swaks(CLEAN, "someone@spfbroken.test", "spf servfail")
        self.assertEqual(r.returncode, 23, r.stdout + r.stderr)
        self.assertIn("<** 451 4.7.24 SPF temporary error", r.stdout)
        self.assertNotRegex(r.stdout, r"<\*\* 5\d\d")
        self.assertNothingStored()
        self.assertClean()


class GreylistTests(DoorCase):
    """``[antispam.greylist]`` with a 3 s delay: refused, retried, passed, remembered."""

    @defer.inlineCallbacks
    def test_triplet_greylisted_then_passed_and_remembered(self):
        yield self.start(greylist={"enabled": True, "delay": "3s", "retry_window": "1h",
                                   "auto_whitelist": "1d"})
        started = time.monotonic()
        first = yield self.send(LISTED, "sender@ext.test", "greylisted")
        self.assertEqual(first["mail"][0], 250, first)
        code, text = first["rcpt"]
        self.assertEqual(code, 451, first)
        self.assertRegex(text, r"^4\.7\.1 Greylisted, try again in [1-3] seconds")
        self.assertNothingStored()

        # At once again: still greylisted (the first-seen time is kept).
        again = yield self.send(LISTED, "sender@ext.test", "greylisted")
        self.assertEqual(again["rcpt"][0], 451, again)
        self.assertTrue(again["rcpt"][1].startswith("4.7.1 Greylisted"), again)
        self.assertNothingStored()

        # Retry like an MTA (more often than one would) until it passes.
        tries = []

        @defer.inlineCallbacks
        def retry():
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                result = yield self.send(LISTED, "sender@ext.test", "greylisted")
                tries.append(result)
                if result["rcpt"][0] != 451:
                    return result
                self.assertNothingStored()
                yield pause(0.5)
            self.fail(f"never passed greylisting: {tries[-2:]}")
        passed = yield retry()
        self.assertAccepted(passed)
        # Not before the delay (a lower bound, measured around the server's).
        self.assertGreaterEqual(time.monotonic() - started, 2.9)
        yield self.wait_delivered("greylisted")

        # The triplet is whitelisted now: the next message passes at once.
        second = yield self.send(LISTED, "sender@ext.test", "second message")
        self.assertAccepted(second)
        yield self.wait_delivered("second message")

        # Another sender from the same client is a new triplet.
        other = yield self.send(LISTED, "other@ext.test", "other sender")
        self.assertEqual(other["rcpt"][0], 451, other)
        self.assertTrue(other["rcpt"][1].startswith("4.7.1 Greylisted"), other)
        self.assertEqual(len(self.app.messages("alice")), 2)
        self.assertEqual(self.app.queue_ids(), [])

        listing = yield self.run_(run_cli, "--config", self.app.config_path, "greylist", "list")
        self.assertEqual(listing.returncode, 0, listing.stderr)
        lines = listing.stdout.splitlines()
        passed_line = [line for line in lines
                       if "<sender@ext.test> -> <alice@example.test>" in line]
        other_line = [line for line in lines
                      if "<other@ext.test> -> <alice@example.test>" in line]
        self.assertEqual(len(passed_line), 1, listing.stdout)
        self.assertEqual(len(other_line), 1, listing.stdout)
        self.assertIn("127.0.0.0/24", passed_line[0])
        self.assertIn("whitelisted until", passed_line[0])
        self.assertIn("pending", other_line[0])
        self.assertIn("2 triplet(s), 1 whitelisted", listing.stdout)
        self.assertClean()


class SilentDNSTests(DoorCase):
    """DNS that never answers: the checks that need it defer or pass, never refuse."""

    # Every name the checks could ask about for these senders and clients.
    silent = {"ext.test", "2.0.0.127.bl.test", "3.0.0.127.bl.test", "client.ext.test",
              "2.0.0.127.in-addr.arpa", "3.0.0.127.in-addr.arpa"}

    def mute_server(self):
        """A UDP and TCP "server" on one port that never reads or answers."""
        for _ in range(50):
            tcp = socket.socket()
            tcp.bind(("127.0.0.1", 0))
            port = tcp.getsockname()[1]
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                udp.bind(("127.0.0.1", port))
            except OSError:
                tcp.close()
                udp.close()
                continue
            tcp.listen(16)
            self.addCleanup(tcp.close)
            self.addCleanup(udp.close)
            return f"127.0.0.1:{port}"
        raise RuntimeError("no free port for the mute DNS server")

    def all_on(self):
        return {"dns": {"dnsbl": ["bl.test"], "check_sender_mx": True, "timeout": "2s"},
                "spf": {"enabled": True}}

    def assertNeverRefused(self, result):
        for stage in ("greeting", "mail", "rcpt", "data"):
            if stage in result:
                self.assertLess(result[stage][0], 500, result)

    @defer.inlineCallbacks
    def check_never_5xx(self, subject):
        for source in (LISTED, CLEAN):
            result = yield self.send(source, "someone@ext.test", f"{subject} {source}")
            self.assertNeverRefused(result)
            if result.get("data", (0,))[0] == 250:
                yield self.wait_delivered(f"{subject} {source}")
            else:
                last = [result[s] for s in ("mail", "rcpt", "data") if s in result][-1]
                self.assertTrue(400 <= last[0] < 500, result)
                self.assertEqual(self.delivered(f"{subject} {source}"), [])
                self.assertEqual(self.app.queue_ids(), [])
        self.assertClean()

    @defer.inlineCallbacks
    def test_silent_names_never_5xx(self):
        yield self.start(**self.all_on())
        yield self.check_never_5xx("silent names")
        self.assertIn(("ext.test", "MX"), self.dns.queries)

    @defer.inlineCallbacks
    def test_mute_server_never_5xx(self):
        yield self.start(dns_server=self.mute_server(), **self.all_on())
        yield self.check_never_5xx("mute server")

    @defer.inlineCallbacks
    def test_silent_spf_alone_tempfails(self):
        # Only SPF: its deadline passes, a temporary error (not the SERVFAIL path).
        yield self.start(spf={"enabled": True}, dns={"timeout": "2s"})
        result = yield self.send(CLEAN, "someone@ext.test", "silent spf")
        self.assertEqual(result["mail"][0], 451, result)
        self.assertTrue(result["mail"][1].startswith("4.7.24 SPF temporary error"), result)
        self.assertNothingStored()
        self.assertIn(("ext.test", "TXT"), self.dns.queries)
        self.assertClean()

    @defer.inlineCallbacks
    def test_silent_blocklist_alone_accepts(self):
        # Only the block list, which cannot answer: not listed, delivered.
        yield self.start(dns={"dnsbl": ["bl.test"], "timeout": "2s"})
        result = yield self.send(LISTED, "someone@ext.test", "silent list")
        self.assertAccepted(result)
        yield self.wait_delivered("silent list")
        self.assertIn(("2.0.0.127.bl.test", "A"), self.dns.queries)
        self.assertClean()
