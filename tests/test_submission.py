"""The submission ports in-process: AUTH only inside TLS, sender binding, fix-ups."""

import base64
import dataclasses
import email
import os

from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from mailbox_appliance.queue.spool import read_queue_file
from tests.imap_helpers import client_context
from tests.smtp_helpers import ApplianceMixin, RawClient

LISTENERS = ("submission", "submissions")
# Remote mail goes to a closed smarthost port: it stays queued, never leaves.
EXTRA = 'smarthost = "127.0.0.1:9"\n'
MSG = (b"From: Alice <alice@example.test>\r\nTo: bob@example.test\r\n"
       b"Subject: sub\r\n\r\nHello.\r\n")


def b64(data):
    if isinstance(data, str):
        data = data.encode()
    return base64.b64encode(data).decode()


def plain(login, password, authzid=""):
    return b64(f"{authzid}\0{login}\0{password}")


class Client(RawClient):
    """RawClient with STARTTLS, implicit TLS and AUTH helpers."""

    @classmethod
    def implicit(cls, port):
        c = cls(port)
        c.sock = client_context().wrap_socket(c.sock)
        return c

    def starttls(self):
        code, lines = self.cmd("STARTTLS")
        assert code == 220, (code, lines)
        self.sock = client_context().wrap_socket(self.sock)
        self.buf = b""

    def login(self, login="alice", password="secret"):
        return self.cmd("AUTH PLAIN " + plain(login, password))

    def mail(self, sender="alice@example.test", rcpts=("bob@example.test",), body=MSG):
        """MAIL, RCPTs, DATA and the body; the replies' codes, the last reply whole."""
        codes = [self.cmd(f"MAIL FROM:<{sender}>")[0]]
        codes += [self.cmd(f"RCPT TO:<{r}>")[0] for r in rcpts]
        codes.append(self.cmd("DATA")[0])
        if codes[-1] != 354:
            return codes, None
        self.send(body + b".\r\n")
        last = self.reply()
        return codes + [last[0]], last


class SubmissionMixin(ApplianceMixin):
    """An appliance with both submission ports, and session openers."""

    config_extra = EXTRA

    def setUp(self):
        return self.start_appliance(listeners=LISTENERS)

    def opened(self, tls=True, login=None, implicit=False):
        """A client past the greeting and EHLO (inside TLS unless told), logged in if asked."""
        if implicit:
            c = Client.implicit(self.ports["submissions"])
        else:
            c = Client(self.ports["submission"])
        assert c.code() == 220
        c.cmd("EHLO client.example.test")
        if tls and not implicit:
            c.starttls()
            c.cmd("EHLO client.example.test")
        if login:
            code, lines = c.login(*login)
            assert code == 235, (code, lines)
        return c

    def no_penalty(self):
        """Failed logins cost no time (tests of other things than the delay)."""
        self.app.authenticator.penalty = lambda ip, login: 0.0

    def count_directory_logins(self):
        calls = []
        real = self.directory.authenticate

        def counting(login, password):
            calls.append(login)
            return real(login, password)
        self.directory.authenticate = counting
        return calls

    def set_config(self, name="submission", **changes):
        """Change [submission]/[server]/[smtp] settings of a running listener."""
        factory = self.app.listeners[name].factory
        factory = getattr(factory, "wrappedFactory", factory)
        cfg = factory.config
        for section, values in changes.items():
            cfg = dataclasses.replace(cfg, **{section: dataclasses.replace(
                getattr(cfg, section), **values)})
        factory.config = cfg

    def queued(self):
        """Envelopes of the queue's committed messages."""
        active = os.path.join(self.config.server.data_dir, "queue", "active")
        return [read_queue_file(n, os.path.join(active, n)).envelope
                for n in self.queue_files() if "." not in n]

    @defer.inlineCallbacks
    def assertNothingStored(self):
        yield self.settle()
        self.assertEqual(self.delivered("bob"), [])
        self.assertEqual(self.queue_files(), [])


class TLSAndAuthTests(SubmissionMixin, unittest.TestCase):
    """AUTH only inside TLS, the mechanisms, and who may send."""

    @defer.inlineCallbacks
    def test_no_auth_before_tls(self):
        calls = self.count_directory_logins()

        def talk():
            c = self.opened(tls=False)
            ehlo = c.cmd("EHLO client.example.test")
            out = [c.cmd("AUTH PLAIN " + plain("alice", "secret")),
                   c.cmd("AUTH PLAIN " + plain("alice", "wrong")),
                   c.cmd("AUTH LOGIN"),
                   c.cmd("MAIL FROM:<alice@example.test>")]
            return ehlo, out
        ehlo, out = yield self.in_thread(talk)
        self.assertIn("STARTTLS", ehlo[1])
        self.assertFalse([l for l in ehlo[1] if l.startswith("AUTH")])
        self.assertIn("DSN", ehlo[1])
        self.assertNotIn("ETRN", ehlo[1])
        self.assertEqual([r[0] for r in out], [538, 538, 538, 530])
        self.assertEqual(out[0][1][0],
                         "5.7.11 Encryption required for requested authentication mechanism")
        self.assertEqual(out[3][1][0], "5.7.0 Authentication required")
        # The password was never looked at: no directory call, no penalty.
        self.assertEqual(calls, [])
        self.assertEqual(self.app.authenticator.by_client.counts, {})
        self.assertEqual(self.app.authenticator.by_account.counts, {})

    @defer.inlineCallbacks
    def test_starttls_then_auth_plain_and_send(self):
        def talk():
            c = Client(self.ports["submission"])
            c.code()
            c.cmd("EHLO client.example.test")
            c.starttls()
            ehlo = c.cmd("EHLO client.example.test")
            before = c.cmd("MAIL FROM:<alice@example.test>")
            auth = c.login()
            again = c.login()
            codes, last = c.mail(rcpts=("bob@example.test", "friend@ext.test"))
            c.cmd("QUIT")
            return ehlo, before, auth, again, codes, last
        ehlo, before, auth, again, codes, last = yield self.in_thread(talk)
        self.assertIn("AUTH PLAIN LOGIN", ehlo[1])
        self.assertNotIn("STARTTLS", ehlo[1])
        self.assertEqual(before[0], 530)
        self.assertEqual(auth, (235, ["2.7.0 Authentication successful"]))
        self.assertEqual(again[0], 503)
        self.assertEqual(codes, [250, 250, 250, 354, 250])
        yield self.settle()
        msg = self.delivered("bob")[0]
        self.assertRegex(msg, rb"\tby mx\.example\.test \(mailbox_appliance\) with ESMTPSA id ")
        self.assertNotIn(b"Authenticated sender", msg)
        # The remote copy waits in the queue with the login in its envelope.
        env = [e for e in self.queued() if "friend@ext.test" in e.recipients]
        self.assertEqual(len(env), 1)
        self.assertEqual((env[0].auth, env[0].protocol, env[0].sender),
                         ("alice", "ESMTPSA", "alice@example.test"))

    @defer.inlineCallbacks
    def test_implicit_tls_port(self):
        def talk():
            c = Client.implicit(self.ports["submissions"])
            greeting = c.reply()
            ehlo = c.cmd("EHLO client.example.test")
            starttls = c.cmd("STARTTLS")
            auth = c.login()
            codes, _ = c.mail()
            return greeting, ehlo, starttls, auth, codes
        greeting, ehlo, starttls, auth, codes = yield self.in_thread(talk)
        self.assertEqual(greeting[0], 220)
        self.assertIn("AUTH PLAIN LOGIN", ehlo[1])
        self.assertNotIn("STARTTLS", ehlo[1])
        self.assertEqual(starttls[0], 503)
        self.assertEqual(auth[0], 235)
        self.assertEqual(codes, [250, 250, 354, 250])
        yield self.settle()
        msg = self.delivered("bob")[0]
        self.assertRegex(msg, rb"\(using TLSv1\.[23] with cipher \S+\)\n"
                              rb"\tby mx\.example\.test \(mailbox_appliance\) with ESMTPSA id ")

    @defer.inlineCallbacks
    def test_mechanisms_and_initial_responses(self):
        def talk():
            out = []
            c = self.opened()
            # PLAIN without an initial response: an empty challenge first.
            out.append(c.cmd("AUTH PLAIN"))
            out.append(c.cmd(plain("alice", "secret")))
            c = self.opened()
            out.append(c.cmd("AUTH LOGIN"))
            out.append(c.cmd(b64("alice")))
            out.append(c.cmd(b64("secret")))
            c = self.opened()
            # LOGIN with SASL-IR: the initial response is the user name.
            out.append(c.cmd("auth login " + b64("alice@example.test")))
            out.append(c.cmd(b64("secret")))
            return out
        out = yield self.in_thread(talk)
        self.assertEqual(out, [
            (334, [""]), (235, ["2.7.0 Authentication successful"]),
            (334, ["VXNlcm5hbWU6"]), (334, ["UGFzc3dvcmQ6"]),
            (235, ["2.7.0 Authentication successful"]),
            (334, ["UGFzc3dvcmQ6"]), (235, ["2.7.0 Authentication successful"])])

    @defer.inlineCallbacks
    def test_order_rules(self):
        def talk():
            c = Client.implicit(self.ports["submissions"])
            c.code()
            out = [c.cmd("AUTH PLAIN " + plain("alice", "secret"))]      # before EHLO
            c.cmd("EHLO client.example.test")
            out.append(c.cmd("AUTH"))
            out.append(c.cmd("AUTH PLAIN a b"))
            out.append(c.login())
            c.cmd("MAIL FROM:<alice@example.test>")
            out.append(c.cmd("AUTH PLAIN " + plain("bob", "secret")))   # in a transaction
            c.cmd("RSET")
            out.append(c.cmd("ETRN example.org"))                       # the MX's business
            return out
        out = yield self.in_thread(talk)
        self.assertEqual([r[0] for r in out], [503, 501, 501, 235, 503, 502])

    @defer.inlineCallbacks
    def test_bad_credentials_and_directory_down(self):
        self.no_penalty()

        def talk():
            c = self.opened()
            out = [c.login("alice", "wrong"), c.login("nobody", "secret")]
            self.directory.down = True
            out.append(c.login("alice", "secret"))
            self.directory.down = False
            out.append(c.login("alice", "secret"))
            return out
        out = yield self.in_thread(talk)
        self.assertEqual(out, [(535, ["5.7.8 Error: authentication failed"])] * 2 +
                         [(454, ["4.7.0 Temporary authentication failure"]),
                          (235, ["2.7.0 Authentication successful"])])

    @defer.inlineCallbacks
    def test_failure_waits_the_authenticators_penalty(self):
        clock = task.Clock()
        a = self.app.authenticator
        a.clock = a.by_client.clock = a.by_account.clock = clock
        c = yield self.in_thread(self.opened)
        first = yield self.in_thread(c.login, "alice", "wrong")
        self.assertEqual(first[0], 535)
        answer = self.in_thread(c.login, "alice", "wrong")
        # The second failure is answered only once 2 s have passed on the clock.
        for _ in range(500):
            if clock.getDelayedCalls():
                break
            yield task.deferLater(reactor, 0.01, lambda: None)
        self.assertEqual([d.getTime() for d in clock.getDelayedCalls()], [2.0])
        self.assertFalse(answer.called)
        clock.advance(2)
        second = yield answer
        self.assertEqual(second[0], 535)
        yield self.in_thread(c.close)

    @defer.inlineCallbacks
    def test_failure_cap_per_address_closes(self):
        self.no_penalty()
        limiter = self.app.listeners["submission"].factory.auth_limiter
        limiter.limit = 3
        calls = self.count_directory_logins()

        def talk():
            a = self.opened()
            first = [a.login("alice", "wrong")[0] for _ in range(2)]
            # A parallel session (on the other port) shares the count.
            b = self.opened(implicit=True)
            first.append(b.login("alice", "wrong")[0])
            blocked = b.login("alice", "secret")
            closed = b.closed()
            other = a.login("alice", "secret")
            return first, blocked, closed, other, a.closed()
        first, blocked, closed, other, a_closed = yield self.in_thread(talk)
        self.assertEqual(first, [535, 535, 535])
        self.assertEqual(blocked[0], 421)
        self.assertTrue(blocked[1][0].startswith("4.7.0 "), blocked)
        self.assertTrue(closed)
        self.assertEqual(other[0], 421)
        self.assertTrue(a_closed)
        # Past the cap not even the right password is checked.
        self.assertEqual(len(calls), 3)

    @defer.inlineCallbacks
    def test_mx_port_takes_no_auth(self):
        def talk():
            c = Client(self.port)
            c.code()
            ehlo = c.cmd("EHLO client.example.test")
            c.starttls()
            ehlo_tls = c.cmd("EHLO client.example.test")
            return ehlo, ehlo_tls, c.cmd("AUTH PLAIN " + plain("alice", "secret"))
        ehlo, ehlo_tls, auth = yield self.in_thread(talk)
        for e in (ehlo, ehlo_tls):
            self.assertFalse([l for l in e[1] if l.startswith("AUTH")])
        self.assertEqual(auth[0], 503)
        self.assertTrue(auth[1][0].startswith("5.5.1 "))

    @defer.inlineCallbacks
    def test_smuggling_after_auth_rejected(self):
        def talk():
            c = self.opened(login=("alice", "secret"))
            c.cmd("MAIL FROM:<alice@example.test>")
            c.cmd("RCPT TO:<bob@example.test>")
            c.cmd("DATA")
            c.send(b"From: alice@example.test\r\nSubject: one\r\n\r\nbody\n.\r\n"
                   b"MAIL FROM:<ceo@example.test>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\n"
                   b"From: ceo@example.test\r\n\r\nhi\r\n.\r\n")
            return c.reply(), c.cmd("NOOP")
        (code, lines), noop = yield self.in_thread(talk)
        self.assertEqual(code, 550)
        self.assertEqual(noop[0], 250)
        yield self.assertNothingStored()


class MalformedSASLTests(SubmissionMixin, unittest.TestCase):
    """Security catalogue E1-E3: exact codes, no traceback, the session goes on."""

    @defer.inlineCallbacks
    def test_malformed_exchanges(self):
        calls = self.count_directory_logins()

        def talk():
            c = self.opened()
            out = [c.cmd("AUTH PLAIN !!!")]
            out += [c.cmd("AUTH PLAIN"), c.cmd("*")]
            out += [c.cmd("AUTH LOGIN"), c.cmd("*")]
            out += [c.cmd("AUTH PLAIN " + b64(p)) for p in (b"\x00u", b"\x00\x00pw",
                                                            b"\x00\x00\x00", b"\xff\x00u\x00pw")]
            out.append(c.cmd("AUTH PLAIN ="))
            out += [c.cmd("AUTH PLAIN"), c.cmd("")]
            out.append(c.cmd("AUTH FOO"))
            out.append(c.cmd("AUTH CRAM-MD5"))
            out.append(c.cmd("NOOP"))
            return out
        out = yield self.in_thread(talk)
        self.assertEqual([r[0] for r in out],
                         [501, 334, 501, 334, 501, 501, 501, 501, 501, 501, 334, 501, 504, 504,
                          250])
        self.assertEqual(out[0][1][0][:5], "5.5.2")
        self.assertEqual(out[2][1][0], "5.5.2 Error: authentication cancelled")
        self.assertEqual(out[12][1][0][:5], "5.5.4")
        self.assertEqual(calls, [])

    @defer.inlineCallbacks
    def test_line_limits(self):
        self.no_penalty()

        def talk():
            c = self.opened()
            out = [c.cmd("AUTH LOGIN"), c.cmd("A" * 20000), c.cmd("NOOP")]
            # An initial response longer than a command line but within 12288.
            out.append(c.cmd("AUTH PLAIN " + plain("alice", "x" * 3000)))
            out.append(c.cmd("AUTH PLAIN " + "A" * 12300))
            out.append(c.cmd("NOOP"))
            out.append(c.login())
            return out
        out = yield self.in_thread(talk)
        self.assertEqual([r[0] for r in out], [334, 500, 250, 535, 500, 250, 235])
        self.assertEqual(out[1][1][0][:5], "5.5.6")
        self.assertEqual(out[4][1][0][:5], "5.5.6")

    @defer.inlineCallbacks
    def test_identity_confusion_and_empty_password(self):
        self.no_penalty()
        calls = self.count_directory_logins()

        def talk():
            c = self.opened()
            out = [c.cmd("AUTH PLAIN " + plain("alice", "secret", authzid="bob")),
                   c.cmd("AUTH PLAIN " + plain("alice", "")),
                   c.cmd("AUTH LOGIN " + b64("alice")), c.cmd("=")]
            # An authorization identity naming the user itself is fine.
            out.append(c.cmd("AUTH PLAIN " + plain("alice", "secret",
                                                   authzid="alice@example.test")))
            return out
        out = yield self.in_thread(talk)
        self.assertEqual([r[0] for r in out], [535, 535, 334, 535, 235])
        # Empty passwords never reach the directory.
        self.assertEqual(calls, ["alice", "alice"])
        # The failures were counted against the account.
        self.assertEqual(self.app.authenticator.by_account.count("alice"), 3)

    @defer.inlineCallbacks
    def test_login_variants_share_one_bucket(self):
        self.no_penalty()

        def talk():
            c = self.opened()
            out = [c.login(v, "wrong")[0] for v in ("alice", "ALICE", "alice ")]
            out += [c.cmd("AUTH LOGIN " + b64("Alice\x00"))[0], c.cmd(b64("wrong"))[0]]
            return out
        out = yield self.in_thread(talk)
        self.assertEqual(out, [535, 535, 535, 334, 535])
        self.assertEqual(list(self.app.authenticator.by_account.counts), ["alice"])
        self.assertEqual(self.app.authenticator.by_account.count("alice"), 4)


class SenderBindingTests(SubmissionMixin, unittest.TestCase):
    """E5 and G6: the envelope sender and From: belong to the login."""

    @defer.inlineCallbacks
    def test_envelope_sender(self):
        def talk():
            c = self.opened(login=("alice", "secret"))
            out = []
            for sender in ("bob@example.test", "Alice@example.test", "alice@ext.test",
                           "alice@example.test", "a.l@EXAMPLE.TEST", "", '"alice"@example.test'):
                out.append(c.cmd(f"MAIL FROM:<{sender}>"))
                c.cmd("RSET")
            return out
        out = yield self.in_thread(talk)
        self.assertEqual([r[0] for r in out], [553, 553, 553, 250, 250, 250, 553])
        self.assertEqual(out[0][1][0], "5.7.1 <bob@example.test>: Sender address rejected: "
                                       "not owned by user alice")

    @defer.inlineCallbacks
    def test_sender_check_can_be_off(self):
        self.app.submission_policy.checks = [
            c for c in self.app.submission_policy.checks if c.name != "sender_login_match"]

        def talk():
            c = self.opened(login=("alice", "secret"))
            return c.mail(sender="bob@example.test")[0]
        self.assertEqual((yield self.in_thread(talk)), [250, 250, 354, 250])

    @defer.inlineCallbacks
    def test_from_header(self):
        bodies = {
            b"From: bob@example.test\r\n": 553,
            b"From: alice@example.test\r\nFrom: alice@example.test\r\n": 553,
            b"From: alice@example.test(<bob@example.test>\r\n": 553,
            b"From: alice@example.test, bob@example.test\r\n": 553,
            b"From: alice@example.test bob@example.test\r\n": 553,
            b"From: group: alice@example.test;\r\n": 553,
            b"From: <@route:alice@example.test>\r\n": 553,
            b"From: Alice\r\n <bob@example.test>\r\n": 553,
            b"From: \"bob@example.test\" <alice@example.test>\r\n": 250,
            b"From: alice@example.test, Al <a.l@example.test>\r\n": 250,
            b"From: alice@example.test (Alice)\r\n": 250,
            b"To: bob@example.test\r\n": 250,       # no From: nothing to check
        }

        def talk():
            c = self.opened(login=("alice", "secret"))
            out = {}
            for head, _ in bodies.items():
                codes, last = c.mail(body=head + b"Subject: x\r\n\r\nbody\r\n")
                out[head] = last
            return out
        out = yield self.in_thread(talk)
        for head, code in bodies.items():
            self.assertEqual(out[head][0], code, (head, out[head]))
            if code == 553:
                self.assertTrue(out[head][1][0].startswith("5.7.1 "), out[head])
        yield self.settle()
        self.assertEqual(len(self.delivered("bob")), 4)
        self.assertEqual(self.queue_files(), [])

    @defer.inlineCallbacks
    def test_header_block_ended_by_a_non_field_line_cannot_hide_a_from(self):
        # The first non-field line starts the body; a From: after it must stay
        # body text, never become a header after our added fields.
        def talk():
            c = self.opened(login=("alice", "secret"))
            return c.mail(body=b"Subject: x\r\nnot a field\r\nFrom: bob@example.test\r\n"
                               b"\r\nhello\r\n")[0]
        self.assertEqual((yield self.in_thread(talk)), [250, 250, 354, 250])
        yield self.settle()
        [m] = self.delivered("bob")
        msg = email.message_from_bytes(m)
        self.assertIsNone(msg["From"])
        self.assertIn("From: bob@example.test", msg.get_payload())
        self.assertRegex(m, rb"\nDate: [^\n]+\n\nnot a field\nFrom: bob")

    @defer.inlineCallbacks
    def test_from_header_check_can_be_off(self):
        self.app.submission_policy.checks = [
            c for c in self.app.submission_policy.checks if c.name != "from_header_match"]

        def talk():
            c = self.opened(login=("alice", "secret"))
            return c.mail(body=b"From: bob@example.test\r\n\r\nx\r\n")[0]
        self.assertEqual((yield self.in_thread(talk)), [250, 250, 354, 250])


class FixupTests(SubmissionMixin, unittest.TestCase):
    """Message-ID and Date added when missing, Bcc removed, the rest kept as sent."""

    @defer.inlineCallbacks
    def test_added_and_removed_headers(self):
        body = (b"From: alice@example.test\r\nBcc: secret@ext.test,\r\n\tother@ext.test\r\n"
                b"To: bob@example.test\r\nbcc : x@ext.test\r\nSubject:  keep  me \r\n"
                b"\r\nBcc: in the body stays\r\n")

        def talk():
            c = self.opened(login=("alice", "secret"))
            return c.mail(body=body)[0]
        codes = yield self.in_thread(talk)
        self.assertEqual(codes, [250, 250, 354, 250])
        yield self.settle()
        m = self.delivered("bob")[0]
        head, _, rest = m.partition(b"\n\n")
        self.assertNotIn(b"secret@ext.test", m)
        self.assertNotIn(b"other@ext.test", m)
        self.assertNotIn(b"x@ext.test", m)
        self.assertEqual(rest, b"Bcc: in the body stays\n")
        self.assertRegex(head, rb"\nFrom: alice@example\.test\nTo: bob@example\.test\n"
                               rb"Subject:  keep  me \nMessage-ID: <\w+\.[0-9a-f]{12}"
                               rb"@mx\.example\.test>\nDate: \w{3}, \d{1,2} \w{3} \d{4} "
                               rb"\d\d:\d\d:\d\d [+-]\d{4}$")

    @defer.inlineCallbacks
    def test_existing_fields_kept_and_headers_only_message(self):
        def talk():
            c = self.opened(login=("alice", "secret"))
            a = c.mail(body=b"Message-id: <x@y>\r\nDATE: Mon, 1 Jan 2024 00:00:00 +0000\r\n"
                            b"From: alice@example.test\r\n\r\nbody\r\n")[0]
            b = c.mail(body=b"From: alice@example.test\r\nSubject: only headers\r\n")[0]
            return a, b
        a, b = yield self.in_thread(talk)
        self.assertEqual((a, b), ([250, 250, 354, 250], [250, 250, 354, 250]))
        yield self.settle()
        first, second = sorted(self.delivered("bob"), key=lambda m: b"only headers" in m)
        self.assertEqual(first.count(b"Message-"), 1)
        self.assertEqual(first.count(b"\nDate:"), 0)
        self.assertIn(b"\nMessage-id: <x@y>\nDATE: Mon, 1 Jan 2024 00:00:00 +0000\n", first)
        self.assertRegex(second, rb"\nSubject: only headers\nMessage-ID: <[^>]+>\nDate: [^\n]+\n$")

    @defer.inlineCallbacks
    def test_header_block_bounded(self):
        self.set_config(server={"max_message_size": 3 * 1024 * 1024})
        body = b"From: alice@example.test\r\nX-A: a\r\n" + b" b\r\n" * 300000 + b"\r\nx\r\n"

        def talk():
            c = self.opened(login=("alice", "secret"))
            return c.mail(body=body)[1], c.cmd("NOOP")
        last, noop = yield self.in_thread(talk)
        self.assertEqual(last, (552, ["5.3.4 Error: message header size exceeds limit"]))
        self.assertEqual(noop[0], 250)
        yield self.assertNothingStored()

    @defer.inlineCallbacks
    def test_authenticated_header_comment(self):
        self.set_config(submission={"authenticated_header": True})

        def talk():
            c = self.opened(login=("alice@example.test", "secret"))
            return c.mail()[0]
        self.assertEqual((yield self.in_thread(talk)), [250, 250, 354, 250])
        yield self.settle()
        m = self.delivered("bob")[0]
        # The uid from the directory, not what was typed; the address stays too.
        self.assertRegex(m, rb"Received: from client\.example\.test \(\[127\.0\.0\.1\]\) "
                            rb"\(using TLSv1\.[23] with cipher \S+\)\n"
                            rb"\t\(Authenticated sender: alice\)\n\tby mx\.example\.test ")
