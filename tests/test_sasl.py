"""SASL messages, the failed-login cap, the fix-ups and the From: parser, without sockets."""

import dataclasses

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial import unittest

from mailbox_appliance import config as config_module
from mailbox_appliance.authn import Authenticator
from mailbox_appliance.directory.model import User
from mailbox_appliance.smtp import sasl
from mailbox_appliance.smtp.fixup import HeaderBlockTooLarge, SubmissionFixup
from mailbox_appliance.smtp.submission import (
    from_addresses, owns_address, submission_policy)

ALICE = User(dn="uid=alice,dc=example,dc=test", uid="alice", mail="alice@example.test",
             addresses=("a.l@example.test", "Team@Example.test"))


class ResponseTests(unittest.TestCase):

    def assertSASLError(self, code, enhanced, f, *a):
        e = self.assertRaises(sasl.SASLError, f, *a)
        self.assertEqual((e.code, e.enhanced), (code, enhanced))
        return e

    def test_decode(self):
        self.assertEqual(sasl.decode_response("="), b"")
        self.assertEqual(sasl.decode_response("YWI="), b"ab")
        for bad in ("!!!", "YWI", "YW I=", "\u00e9", ""):
            self.assertSASLError(501, "5.5.2", sasl.decode_response, bad)
        e = self.assertSASLError(501, "5.5.2", sasl.decode_response, "*")
        self.assertIn("cancelled", e.text)

    def test_plain(self):
        x = sasl.start("plain")
        self.assertEqual(x.step(None), b"")
        self.assertEqual(x.step(b"\x00alice\x00pw"), sasl.Credentials("alice", "pw"))
        self.assertEqual(sasl.start("PLAIN").step(b"bob\x00alice\x00pw"),
                         sasl.Credentials("alice", "pw", authzid="bob"))
        # An empty password is a failed login for the Authenticator, not a syntax error.
        self.assertEqual(sasl.start("PLAIN").step(b"\x00alice\x00"),
                         sasl.Credentials("alice", ""))
        for bad in (b"\x00u", b"\x00\x00pw", b"\x00\x00\x00", b"u", b"\x00\xff\x00pw", b""):
            self.assertSASLError(501, "5.5.2", sasl.start("PLAIN").step, bad)

    def test_login(self):
        x = sasl.start("LOGIN")
        self.assertEqual(x.step(None), b"Username:")
        self.assertEqual(x.step(b"alice"), b"Password:")
        self.assertEqual(x.step(b"pw"), sasl.Credentials("alice", "pw"))
        self.assertSASLError(501, "5.5.2", sasl.start("LOGIN").step, b"")
        self.assertSASLError(501, "5.5.2", sasl.start("LOGIN").step, b"\xff")

    def test_unknown_mechanism(self):
        for m in ("FOO", "CRAM-MD5", "", "PLAIN\x00"):
            self.assertSASLError(504, "5.5.4", sasl.start, m)

    def test_challenge_encoding(self):
        self.assertEqual(sasl.encode_challenge(b"Username:"), "VXNlcm5hbWU6")
        self.assertEqual(sasl.encode_challenge(b""), "")

    def test_owns_identity(self):
        for name in ("alice", "ALICE", "alice@example.test", "a.l@example.test",
                     "team@example.test"):
            self.assertTrue(sasl.owns_identity(ALICE, name), name)
        for name in ("bob", "admin", "alice@other.test", ""):
            self.assertFalse(sasl.owns_identity(ALICE, name), name)


class LimiterTests(unittest.TestCase):

    def test_window_and_cap(self):
        clock = Clock()
        lim = sasl.AuthFailureLimiter(clock, 3)
        for _ in range(2):
            lim.failed("192.0.2.1")
        self.assertFalse(lim.blocked("192.0.2.1"))
        clock.advance(30)
        lim.failed("192.0.2.1")
        self.assertTrue(lim.blocked("192.0.2.1"))
        self.assertFalse(lim.blocked("192.0.2.2"))
        # The first two age out of the minute: one more try.
        clock.advance(31)
        self.assertFalse(lim.blocked("192.0.2.1"))
        clock.advance(30)
        self.assertFalse(lim.blocked("192.0.2.1"))
        self.assertEqual(lim._failures, {})

    def test_zero_is_no_limit(self):
        lim = sasl.AuthFailureLimiter(Clock(), 0)
        for _ in range(100):
            lim.failed("192.0.2.1")
        self.assertFalse(lim.blocked("192.0.2.1"))

    def test_memory_bounded(self):
        clock = Clock()
        lim = sasl.AuthFailureLimiter(clock, 2, max_tracked=10)
        for i in range(100):
            lim.failed(f"198.51.100.{i}")
            lim.failed(f"198.51.100.{i}")
        self.assertEqual(len(lim._failures), 10)
        self.assertTrue(lim.blocked("198.51.100.99"))
        self.assertTrue(all(len(t) <= 2 for t in lim._failures.values()))


class AuthenticatorEmptyPasswordTests(unittest.TestCase):

    def test_empty_password_never_asks_the_directory(self):
        calls = []

        class Directory:
            def authenticate(self, login, password):
                calls.append(login)
                return defer.succeed(ALICE)         # a directory that says yes to anything
        auth = Authenticator(Directory(), Clock())
        self.assertIsNone(self.successResultOf(auth.login("alice", "", "192.0.2.1")))
        self.assertEqual(calls, [])
        self.assertEqual(auth.by_account.count("alice"), 1)
        auth.record_failure("192.0.2.1", "ALICE ")
        self.assertEqual(auth.by_account.count("alice"), 2)
        self.assertEqual(auth.by_client.count("192.0.2.1"), 2)


class FixupTests(unittest.TestCase):

    def run_fixup(self, message, chunks=1, limit=1 << 20):
        f = SubmissionFixup("<id@mx>", "Mon, 1 Jan 2024 00:00:00 +0000", limit=limit)
        step = max(1, len(message) // chunks)
        out = b"".join(f.feed(message[i:i + step]) for i in range(0, len(message), step))
        return out + f.finish(), f

    def test_byte_exact_apart_from_the_fixes(self):
        msg = (b"Received: x\r\n\tcontinued\r\nBcc: a@b,\r\n c@d\r\nFrom:  A <a@b>\r\n"
               b"BCC:e@f\r\nSubject: s\r\n\r\nBcc: body\r\n\r\nmore\r\n")
        for chunks in (1, 3, len(msg)):
            out, f = self.run_fixup(msg, chunks)
            self.assertEqual(out, b"Received: x\r\n\tcontinued\r\nFrom:  A <a@b>\r\n"
                                  b"Subject: s\r\nMessage-ID: <id@mx>\r\n"
                                  b"Date: Mon, 1 Jan 2024 00:00:00 +0000\r\n"
                                  b"\r\nBcc: body\r\n\r\nmore\r\n")
            self.assertEqual(f.from_values, [b"  A <a@b>\r\n"])
            self.assertEqual(f.removed_bcc, 2)

    def test_present_fields_not_added(self):
        msg = b"message-id: <x>\r\nDate : today\r\n\r\nb\r\n"
        self.assertEqual(self.run_fixup(msg)[0], msg)

    def test_body_without_empty_line(self):
        out, _ = self.run_fixup(b"Subject: s\r\nthis is body text\r\n")
        # An empty line is put in, so the body cannot be read as more header.
        self.assertEqual(out, b"Subject: s\r\nMessage-ID: <id@mx>\r\n"
                              b"Date: Mon, 1 Jan 2024 00:00:00 +0000\r\n\r\n"
                              b"this is body text\r\n")

    def test_empty_message(self):
        self.assertEqual(self.run_fixup(b"")[0], b"Message-ID: <id@mx>\r\n"
                                                  b"Date: Mon, 1 Jan 2024 00:00:00 +0000\r\n")

    def test_limit(self):
        msg = b"X-A: a\r\n" + b" b\r\n" * 1000 + b"\r\nbody\r\n"
        self.assertRaises(HeaderBlockTooLarge, self.run_fixup, msg, 7, 4000)
        # A big body after a small header block is fine.
        out, _ = self.run_fixup(b"S: x\r\n\r\n" + b"y" * 10000 + b"\r\n", 1, 100)
        self.assertTrue(out.endswith(b"y" * 10000 + b"\r\n"))

    def test_many_continuations_are_linear(self):
        # 200,000 continuation lines (security catalogue G3) in one field.
        msg = b"X-A: a\r\n" + b" b\r\n" * 200000 + b"\r\n"
        out, _ = self.run_fixup(msg, 50, limit=2 << 20)
        self.assertEqual(len(out), len(msg) + len(b"Message-ID: <id@mx>\r\n"
                                                  b"Date: Mon, 1 Jan 2024 00:00:00 +0000\r\n"))


class FromParserTests(unittest.TestCase):

    def test_plain_lists(self):
        cases = {
            b" alice@example.test\r\n": ["alice@example.test"],
            b" Alice <alice@example.test>": ["alice@example.test"],
            b' "bob@x.test" <alice@y.test>': ["alice@y.test"],
            b' "a, b" <a@x.test>, c@y.test (C)': ["a@x.test", "c@y.test"],
            b" =?utf-8?q?J=C3=B6rg?= <j@x.test>": ["j@x.test"],
            " J\u00f6rg <j@x.test>".encode(): ["j@x.test"],
            b' "quoted \\" <a@b>" <c@d.test>': ["c@d.test"],
        }
        for raw, want in cases.items():
            self.assertEqual(from_addresses(raw), want, raw)

    def test_unparseable(self):
        for raw in (b" alice@example.org(<bob@example.org>", b" a@x.test b@y.test",
                    b" g: a@x.test;", b" <@r:a@x.test>", b" a@x.test,, b@y.test", b"",
                    b" <a@x.test> <b@y.test>", b" <a@x.test> trailing", b' "open <a@x.test>',
                    b" a@x.test)", b" <a@x.test", b" \xff@x.test", b" a\x00@x.test",
                    b" a@[127.0.0.1]", b' "a b"@x.test', b" Name Only"):
            self.assertIsNone(from_addresses(raw), raw)

    def test_owns_address(self):
        self.assertTrue(owns_address(ALICE, "alice@EXAMPLE.test"))
        self.assertTrue(owns_address(ALICE, "Team@example.TEST"))
        self.assertFalse(owns_address(ALICE, "Alice@example.test"))
        self.assertFalse(owns_address(ALICE, "alice"))
        self.assertFalse(owns_address(ALICE, "alice@example.test.evil"))


class PolicyBuilderTests(unittest.TestCase):

    def names(self, **submission):
        cfg = config_module.Config()
        cfg = dataclasses.replace(cfg, submission=dataclasses.replace(cfg.submission,
                                                                      **submission))
        return [c.name for c in submission_policy(cfg, None, ["example.test"]).checks]

    def test_defaults_and_switches(self):
        self.assertEqual(self.names(), ["authentication_required", "sender_login_match",
                                        "relay_access", "recipient_exists", "hop_count",
                                        "from_header_match"])
        self.assertEqual(self.names(sender_login_match=False, from_header_match=False),
                         ["authentication_required", "relay_access", "recipient_exists",
                          "hop_count"])
