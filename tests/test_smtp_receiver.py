"""The MX receiver end to end in-process: replies, limits, smuggling, relay, delivery."""

import ipaddress

from twisted.internet import defer
from twisted.trial import unittest

from mailbox_appliance.netaddr import networks_predicate
from tests.smtp_helpers import ApplianceMixin, RawClient

MSG = b"From: a@ext.test\r\nTo: alice@example.test\r\nSubject: hi\r\n\r\nHello.\r\n"


class BasicDeliveryTests(ApplianceMixin, unittest.TestCase):

    def setUp(self):
        return self.start_appliance()

    @defer.inlineCallbacks
    def test_ehlo_advertises_extensions(self):
        def talk():
            c = RawClient(self.port)
            assert c.code() == 220
            code, lines = c.cmd("EHLO client.ext.test")
            c.cmd("QUIT")
            return code, lines
        code, lines = yield self.in_thread(talk)
        self.assertEqual(code, 250)
        self.assertEqual(lines[0], "mx.example.test")
        for ext in ("PIPELINING", "8BITMIME", "SIZE 100000", "ENHANCEDSTATUSCODES", "STARTTLS"):
            self.assertIn(ext, lines)

    @defer.inlineCallbacks
    def test_message_lands_in_maildir(self):
        def talk():
            c = RawClient(self.port)
            c.code()
            c.cmd("EHLO client.ext.test")
            r = [c.cmd("MAIL FROM:<a@ext.test>"), c.cmd("RCPT TO:<Alice@EXAMPLE.test>")]
            r.append(c.cmd("DATA"))
            c.send(MSG + b"..dot line\r\n.\r\n")
            r.append(c.reply())
            c.cmd("QUIT")
            return r
        r = yield self.in_thread(talk)
        self.assertEqual([x[0] for x in r], [250, 250, 354, 250])
        self.assertTrue(r[3][1][0].startswith("2.0.0 Ok: queued as "))
        yield self.settle()
        msgs = self.delivered("alice")
        self.assertEqual(len(msgs), 1)
        m = msgs[0]
        self.assertTrue(m.startswith(b"Return-Path: <a@ext.test>\nDelivered-To: alice@example.test\nReceived: from client.ext.test ([127.0.0.1])"))
        self.assertIn(b"\nSubject: hi\n\nHello.\n.dot line\n", m)
        self.assertNotIn(b"\r", m)
        self.assertEqual(self.queue_files(), [])

    @defer.inlineCallbacks
    def test_alias_and_forward(self):
        def talk():
            c = RawClient(self.port)
            c.code()
            c.cmd("HELO client.ext.test")
            c.cmd("MAIL FROM:<>")
            codes = [c.cmd("RCPT TO:<staff@example.test>")[0],
                     c.cmd("RCPT TO:<carol@example.test>")[0]]
            c.cmd("DATA")
            c.send(MSG + b".\r\n")
            codes.append(c.code())
            return codes
        codes = yield self.in_thread(talk)
        self.assertEqual(codes, [250, 250, 250])
        yield self.settle()
        self.assertEqual(len(self.delivered("alice")), 1)
        self.assertEqual(len(self.delivered("bob")), 1)
        # carol forwards to a remote address: it stays queued, not lost or bounced.
        self.assertEqual(len(self.queue_files()), 2)   # message + its done-record


SMUGGLE_VARIANTS = [b"\n.\n", b"\n.\r\n", b"\r\n.\n", b"\r.\r", b"\r.\r\n", b"\r\n.\r",
                    b"\r\r\n.\r\r\n"]


def smuggle_payload(x):
    return (b"From: a@ext.test\r\nSubject: one\r\n\r\nbody" + x +
            b"MAIL FROM:<ceo@example.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n"
            b"From: ceo@example.test\r\nSubject: smuggled\r\n\r\nhi\r\n.\r\n")


class Session:
    """Runs a raw dialogue in a thread; helpers for the usual opening."""

    def __init__(self, port):
        self.c = RawClient(port)
        assert self.c.code() == 220

    def open(self, sender="a@ext.test", rcpts=("alice@example.test",), ehlo=True):
        self.c.cmd(("EHLO" if ehlo else "HELO") + " client.ext.test")
        assert self.c.cmd(f"MAIL FROM:<{sender}>")[0] == 250
        for r in rcpts:
            assert self.c.cmd(f"RCPT TO:<{r}>")[0] == 250, r
        assert self.c.cmd("DATA")[0] == 354


class BadInputTests(ApplianceMixin, unittest.TestCase):
    """Security catalogue cases: exact replies, nothing stored, server still answering."""

    def setUp(self):
        return self.start_appliance()

    @defer.inlineCallbacks
    def assertNothingStored(self):
        yield self.settle()
        self.assertEqual(self.delivered("alice"), [])
        self.assertEqual(self.queue_files(), [])

    @defer.inlineCallbacks
    def test_smuggling_variants_rejected(self):
        def talk(x):
            s = Session(self.port)
            s.open()
            s.c.send(smuggle_payload(x))
            r = s.c.reply()
            after = s.c.cmd("NOOP")
            return r, after
        for x in SMUGGLE_VARIANTS:
            (code, lines), after = yield self.in_thread(talk, x)
            self.assertEqual((code, lines[0][:5]), (550, "5.6.0"), x)
            # The embedded commands were never answered: the next reply is the NOOP's.
            self.assertEqual(after[0], 250, x)
        yield self.assertNothingStored()

    @defer.inlineCallbacks
    def test_message_beginning_with_white_space_is_refused(self):
        # It would continue our Received: field: text smuggled into a trace header.
        def talk(first):
            s = Session(self.port)
            s.open()
            s.c.send(first + b"Subject: x\r\n\r\nbody\r\n.\r\n")
            return s.c.reply()
        for first in (b" forged\r\n", b"\tby evil.test\r\n"):
            code, lines = yield self.in_thread(talk, first)
            self.assertEqual((code, lines[0][:5]), (550, "5.6.0"), first)
        yield self.assertNothingStored()

    @defer.inlineCallbacks
    def test_lone_dot_variants_do_not_end_data(self):
        def talk():
            s = Session(self.port)
            s.open()
            s.c.send(b"Subject: x\r\n\r\n. \r\n.x\r\nend\r\n.\r\n")
            return s.c.reply()
        code, lines = yield self.in_thread(talk)
        self.assertEqual(code, 250)
        yield self.settle()
        # RFC 5321 4.5.2: the leading dot of any line is removed.
        self.assertIn(b"\nSubject: x\n\n \nx\nend\n", self.delivered("alice")[0])

    @defer.inlineCallbacks
    def test_starttls_discards_pipelined_plaintext(self):
        import ssl

        def talk():
            s = Session.__new__(Session)
            s.c = RawClient(self.port)
            s.c.code()
            s.c.cmd("EHLO client.ext.test")
            s.c.send(b"STARTTLS\r\nRSET\r\nMAIL FROM:<a@ext.test>\r\n")
            first = s.c.reply()
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            s.c.sock = ctx.wrap_socket(s.c.sock)
            s.c.buf = b""
            s.c.sock.settimeout(1)
            try:
                extra = s.c.sock.recv(100)
            except Exception:
                extra = b""
            s.c.sock.settimeout(10)
            early_rcpt = s.c.cmd("RCPT TO:<alice@example.test>")
            ehlo = s.c.cmd("EHLO client.ext.test")
            mail = s.c.cmd("MAIL FROM:<a@ext.test>")
            again = s.c.cmd("STARTTLS")
            return first, extra, early_rcpt, ehlo, mail, again
        first, extra, early_rcpt, ehlo, mail, again = yield self.in_thread(talk)
        self.assertEqual(first[0], 220)
        self.assertEqual(extra, b"")
        self.assertEqual(early_rcpt[0], 503)
        self.assertEqual(ehlo[0], 250)
        self.assertNotIn("STARTTLS", ehlo[1])
        self.assertEqual(mail[0], 250)
        self.assertEqual(again[0], 503)

    @defer.inlineCallbacks
    def test_tls_received_header_names_cipher(self):
        import smtplib
        import ssl

        def talk():
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            with smtplib.SMTP("127.0.0.1", self.port) as s:
                s.starttls(context=ctx)
                s.sendmail("a@ext.test", ["bob@example.test"], MSG)
        yield self.in_thread(talk)
        yield self.settle()
        m = self.delivered("bob")[0]
        self.assertRegex(m, rb"Received: from \[?[\w.]+\]? \(\[127\.0\.0\.1\]\) \(using TLSv1\.[23] with cipher \S+\)\n\tby mx\.example\.test \(mailbox_appliance\) with ESMTPS id")

    @defer.inlineCallbacks
    def test_relay_matrix_denied(self):
        rcpts = ["r@victim.test", "r%victim.test@example.test", "r%victim.test@[127.0.0.1]",
                 '"r@victim.test"', '"r%victim.test"', "r@victim.test@example.test",
                 '"r@victim.test"@example.test', "@example.test:r@victim.test",
                 "@[127.0.0.1]:r@victim.test", "victim.test!r", "victim.test!r@example.test",
                 "r@VICTIM.TEST", "r@victim.test.", "alice@example.test.victim.test",
                 "alice@xexample.test", "alice@[127.0.0.1]", "alice@[IPv6:::1]",
                 "alice@[300.1.1.1]"]
        senders = ["", "x@victim.test", "x@example.test", "x@[127.0.0.1]"]

        def talk():
            out = []
            c = RawClient(self.port)
            c.code()
            c.cmd("EHLO client.ext.test")
            for snd in senders:
                c.cmd("RSET")
                assert c.cmd(f"MAIL FROM:<{snd}>")[0] == 250, snd
                for r in rcpts:
                    out.append((snd, r, c.cmd(f"RCPT TO:<{r}>")))
                # keep under the error limit: new connection per sender
                c.close()
                c = RawClient(self.port)
                c.code()
                c.cmd("EHLO client.ext.test")
            return out
        results = yield self.in_thread(self._with_error_limit, talk)
        for snd, r, (code, lines) in results:
            self.assertTrue(500 <= code < 600, (snd, r, code, lines))
        yield self.assertNothingStored()

    def _with_error_limit(self, f):
        # The relay matrix sends more bad RCPTs than the hard error limit allows.
        import dataclasses
        factory = self.app.listeners["smtp"].factory
        factory.config = dataclasses.replace(
            factory.config, smtp=dataclasses.replace(factory.config.smtp, max_errors=1000))
        return f()

    @defer.inlineCallbacks
    def test_local_normalisation(self):
        def talk():
            c = RawClient(self.port)
            c.code()
            c.cmd("EHLO client.ext.test")
            c.cmd("MAIL FROM:<a@ext.test>")
            return [c.cmd(f"RCPT TO:<{r}>") for r in
                    ("alice@EXAMPLE.TEST", "alice@example.test.", "Postmaster", "postmaster",
                     "nobody@example.test")]
        r = yield self.in_thread(talk)
        self.assertEqual([x[0] for x in r], [250, 250, 250, 250, 550])
        self.assertTrue(r[4][1][0].startswith("5.1.1 "))

    @defer.inlineCallbacks
    def test_injection_characters_in_arguments(self):
        cases = [b"EHLO a\nX-Injected: 1\r\n",
                 b"MAIL FROM:<\"a\rb\nReceived: forged\"@ext.test>\r\n",
                 b"MAIL FROM:<a\x00b@ext.test>\r\n",
                 b"MAIL FROM:<a@ext.test> AUTH=<>\nX: y\r\n"]

        def talk():
            out = []
            for case in cases:
                c = RawClient(self.port)
                c.code()
                if not case.startswith(b"EHLO"):
                    c.cmd("EHLO client.ext.test")
                c.send(case)
                out.append(c.reply())
                c.close()
            c = RawClient(self.port)
            c.code()
            c.cmd("EHLO client.ext.test")
            c.cmd("MAIL FROM:<a@ext.test>")
            c.send(b"RCPT TO:<alice@example.test>\x00x\r\n")
            out.append(c.reply())
            return out
        r = yield self.in_thread(talk)
        for code, lines in r:
            self.assertEqual(code, 501, lines)
            self.assertTrue(lines[0].startswith("5.5.2"), lines)

    @defer.inlineCallbacks
    def test_esmtp_parameters(self):
        def talk():
            c = RawClient(self.port)
            c.code()
            c.cmd("EHLO client.ext.test")
            out = [c.cmd(x) for x in (
                "MAIL FROM:<a@ext.test> FOO=bar",
                "MAIL FROM:<a@ext.test> SIZE=1 SIZE=2",
                "MAIL FROM:<a@ext.test> SIZE=-1",
                "MAIL FROM:<a@ext.test> SIZE=99999999999999999999",
                "MAIL FROM:<a@ext.test> SIZE=999999999999",
                "MAIL FROM:<a@ext.test> ENVID=" + "x" * 5000,
                "MAIL FROM:<a@ext.test> BODY=8BITMIME SIZE=100")]
            out.append(c.cmd("RCPT TO:<alice@example.test> FOO=bar"))
            out.append(c.cmd("RCPT TO:<alice@example.test> NOTIFY=SUCCESS ORCPT=rfc822;a"))
            return out
        r = yield self.in_thread(talk)
        # DSN parameters (RFC 3461) are taken; tests/test_smtp_dsn_params.py has the rest.
        self.assertEqual([x[0] for x in r], [555, 501, 501, 552, 552, 500, 250, 555, 250])
        self.assertEqual(r[3][1][0][:5], "5.3.4")

    @defer.inlineCallbacks
    def test_lengths(self):
        def talk():
            c = RawClient(self.port)
            c.code()
            c.cmd("EHLO client.ext.test")
            c.cmd("MAIL FROM:<a@ext.test>")
            out = [c.cmd("RCPT TO:<" + "a" * 65 + "@example.test>"),
                   c.cmd("RCPT TO:<a@" + ("d" * 60 + ".") * 5 + "test>"),
                   c.cmd("NOOP " + "x" * 520),
                   c.cmd("EHLO " + "x" * 10000)]
            try:
                c.send(b"x" * (1 << 20))
            except OSError:
                pass        # the server hung up once the line passed its cap
            out.append(c.reply())
            out.append(c.closed())
            return out
        r = yield self.in_thread(talk)
        self.assertEqual([x[0] for x in r[:5]], [501, 501, 500, 500, 421])
        self.assertTrue(r[5])

    @defer.inlineCallbacks
    def test_non_ascii_address_without_smtputf8(self):
        def talk():
            c = RawClient(self.port)
            c.code()
            c.cmd("EHLO client.ext.test")
            c.send("MAIL FROM:<josé@ext.test>\r\n".encode())
            a = c.reply()
            c.send(b"MAIL FROM:<\xff\xfe@ext.test> SMTPUTF8\r\n")
            return a, c.reply(), c.cmd("NOOP")
        a, b, n = yield self.in_thread(talk)
        self.assertEqual(a[0], 553)
        self.assertEqual(a[1][0][:5], "5.6.7")
        self.assertEqual(b[0], 553)
        self.assertEqual(n[0], 250)

    @defer.inlineCallbacks
    def test_helo_pipelining_is_a_sync_error(self):
        def talk():
            c = RawClient(self.port)
            c.code()
            c.send(b"HELO x.test\r\nMAIL FROM:<a@ext.test>\r\n")
            return c.reply(), c.closed()
        (code, lines), closed = yield self.in_thread(talk)
        self.assertEqual((code, lines[0][:5]), (554, "5.5.0"))
        self.assertTrue(closed)

    @defer.inlineCallbacks
    def test_body_before_354_is_refused(self):
        def talk():
            c = RawClient(self.port)
            c.code()
            c.cmd("EHLO client.ext.test")
            c.send(b"MAIL FROM:<a@ext.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n"
                   b"Subject: x\r\n\r\nbody\r\n.\r\n")
            return [c.reply() for _ in range(3)], c.closed()
        replies, closed = yield self.in_thread(talk)
        self.assertEqual([r[0] for r in replies], [250, 250, 554])
        self.assertTrue(closed)
        yield self.assertNothingStored()

    @defer.inlineCallbacks
    def test_pipelined_replies_in_order_with_slow_directory(self):
        from twisted.internet import reactor
        gate = defer.Deferred()
        self.directory.delay = gate
        reactor.callLater(0.5, lambda: (setattr(self.directory, "delay", None),
                                        gate.callback(None)))

        def talk():
            c = RawClient(self.port)
            c.code()
            c.cmd("EHLO client.ext.test")
            c.send(b"MAIL FROM:<a@ext.test>\r\nRCPT TO:<alice@example.test>\r\n"
                   b"RCPT TO:<nobody@example.test>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\n")
            codes = [c.code() for _ in range(5)]
            c.send(MSG + b".\r\n")
            codes.append(c.code())
            return codes
        codes = yield self.in_thread(talk)
        self.assertEqual(codes, [250, 250, 550, 250, 354, 250])

    @defer.inlineCallbacks
    def test_recipient_limit_and_error_limit(self):
        def talk():
            c = RawClient(self.port)
            c.code()
            c.cmd("EHLO client.ext.test")
            c.cmd("MAIL FROM:<a@ext.test>")
            c.send(b"RCPT TO:<alice@example.test>\r\n" * 1000)
            ok = [c.code() for _ in range(1000)]
            c.send(b"RCPT TO:<alice@example.test>\r\n" * 5000)
            more = []
            try:
                while True:
                    more.append(c.code())
            except (EOFError, OSError):
                pass
            return ok, more
        ok, more = yield self.in_thread(talk)
        self.assertEqual(set(ok), {250})
        self.assertEqual(more[:19], [452] * 19)
        self.assertEqual(more[-1], 421)
        self.assertLess(len(more), 25)

    @defer.inlineCallbacks
    def test_vrfy_expn_junk(self):
        def talk():
            c = RawClient(self.port)
            c.code()
            v, e = c.cmd("VRFY alice"), c.cmd("EXPN staff")
            c.send(b"NOOP\r\n" * 150)
            codes = []
            try:
                while True:
                    codes.append(c.code())
            except (EOFError, OSError):
                pass
            return v, e, codes
        v, e, codes = yield self.in_thread(talk)
        self.assertEqual(v[0], 252)
        self.assertEqual(e[0], 502)
        self.assertEqual(codes[-1], 421)
        self.assertLess(len(codes), 101)

    @defer.inlineCallbacks
    def test_http_is_refused(self):
        def talk():
            c = RawClient(self.port)
            c.code()
            c.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            return c.reply(), c.closed()
        (code, _), closed = yield self.in_thread(talk)
        self.assertEqual(code, 221)
        self.assertTrue(closed)

    @defer.inlineCallbacks
    def test_message_too_big(self):
        def talk():
            s = Session(self.port)
            s.open()
            s.c.send(b"Subject: big\r\n\r\n" + (b"x" * 998 + b"\r\n") * 200 + b".\r\n")
            return s.c.reply(), s.c.cmd("NOOP")
        (code, lines), noop = yield self.in_thread(talk)
        self.assertEqual((code, lines[0][:5]), (552, "5.3.4"))
        self.assertEqual(noop[0], 250)
        yield self.assertNothingStored()

    @defer.inlineCallbacks
    def test_text_line_too_long(self):
        def talk():
            s = Session(self.port)
            s.open()
            s.c.send(b"Subject: long\r\n\r\n" + b"y" * 999 + b"\r\nok\r\n.\r\n")
            first = s.c.reply()
            s.c.cmd("MAIL FROM:<a@ext.test>")
            s.c.cmd("RCPT TO:<alice@example.test>")
            s.c.cmd("DATA")
            s.c.send(b"Subject: long\r\n\r\n" + b"z" * 5000)
            s.c.send(b"z" * 5000 + b"\r\n.\r\n")
            return first, s.c.reply()
        first, second = yield self.in_thread(talk)
        self.assertEqual((first[0], first[1][0][:5]), (500, "5.5.2"))
        self.assertEqual((second[0], second[1][0][:5]), (500, "5.5.2"))
        yield self.assertNothingStored()

    @defer.inlineCallbacks
    def test_directory_down_is_temporary(self):
        self.directory.down = True

        def talk():
            c = RawClient(self.port)
            c.code()
            c.cmd("EHLO client.ext.test")
            c.cmd("MAIL FROM:<a@ext.test>")
            return c.cmd("RCPT TO:<alice@example.test>")
        code, lines = yield self.in_thread(talk)
        self.assertEqual((code, lines[0][:5]), (451, "4.4.3"))

    @defer.inlineCallbacks
    def test_mail_loop_refused(self):
        def talk():
            s = Session(self.port)
            s.open()
            s.c.send(b"Received: from x by y; now\r\n" * 50 + b"Subject: loop\r\n\r\nx\r\n.\r\n")
            return s.c.reply()
        code, lines = yield self.in_thread(talk)
        self.assertEqual((code, lines[0][:5]), (554, "5.4.6"))
        yield self.assertNothingStored()

    @defer.inlineCallbacks
    def test_sequence_errors(self):
        def talk():
            c = RawClient(self.port)
            c.code()
            out = [c.cmd("MAIL FROM:<a@ext.test>"), c.cmd("XYZZY")]
            c.cmd("EHLO client.ext.test")
            out += [c.cmd("RCPT TO:<alice@example.test>"), c.cmd("DATA")]
            c.cmd("MAIL FROM:<a@ext.test>")
            out += [c.cmd("MAIL FROM:<a@ext.test>"), c.cmd("DATA"),
                    c.cmd("MAIL FROM:<;sleep 66;>")]
            return out
        r = yield self.in_thread(talk)
        self.assertEqual([x[0] for x in r], [503, 502, 503, 503, 503, 554, 503])


class TrustedNetworkTests(ApplianceMixin, unittest.TestCase):
    """Clients in relay_networks may relay, and bare line ends are normalised."""

    def setUp(self):
        return self.start_appliance()

    @defer.inlineCallbacks
    def test_normalises_bare_lf(self):
        factory = self.app.listeners["smtp"].factory
        factory.is_trusted = networks_predicate([ipaddress.ip_network("127.0.0.0/8")])

        def talk():
            s = Session(self.port)
            s.open()
            s.c.send(smuggle_payload(b"\n.\n"))
            return s.c.reply(), s.c.cmd("RCPT TO:<r@victim.test>")
        (code, _), relay = yield self.in_thread(talk)
        self.assertEqual(code, 250)
        self.assertEqual(relay[0], 503)      # the transaction ended with the message
        yield self.settle()
        msgs = self.delivered("alice")
        self.assertEqual(len(msgs), 1)
        self.assertIn(b"smuggled", msgs[0])


class InjectionTests(ApplianceMixin, unittest.TestCase):
    """Shell, template and filter metacharacters are only ever data (C4, C5)."""

    def setUp(self):
        return self.start_appliance()

    @defer.inlineCallbacks
    def test_metacharacters_in_paths(self):
        cases = {
            '"|/bin/sh -c id"@example.test': 550,
            "|id@example.test": 550,
            "u$(id)@example.test": 501,
            "${run{/bin/sh\t-c\tid}}@example.test": 501,
            "{0.__class__.__mro__}@example.test": 550,
            "%(password)s@example.test": 501,
            "%s%n@example.test": 554,
            "*@example.test": 550,
            "*)(uid=*@example.test": 501,
            "alice*@example.test": 550,
        }

        def talk():
            c = RawClient(self.port)
            c.code()
            c.cmd("EHLO client.ext.test")
            out = {"<;sleep 66;>": c.cmd("MAIL FROM:<;sleep 66;>")[0]}
            c.cmd("MAIL FROM:<`id`@ext.test>")
            for rcpt in cases:
                out[rcpt] = c.cmd(f"RCPT TO:<{rcpt}>")[0]
            return out
        self._raise_error_limit()
        got = yield self.in_thread(talk)
        self.assertEqual(got.pop("<;sleep 66;>"), 501)
        self.assertEqual(got, cases)
        # Lookups saw the strings verbatim; nothing was expanded or formatted.
        self.assertIn("{0.__class__.__mro__}@example.test", self.directory.queries)
        yield self.settle()
        self.assertEqual(self.queue_files(), [])

    def _raise_error_limit(self):
        import dataclasses
        factory = self.app.listeners["smtp"].factory
        factory.config = dataclasses.replace(
            factory.config, smtp=dataclasses.replace(factory.config.smtp, max_errors=1000))


class DuplicateTargetTests(ApplianceMixin, unittest.TestCase):

    def setUp(self):
        return self.start_appliance()

    @defer.inlineCallbacks
    def test_one_copy_per_user(self):
        import smtplib

        def talk():
            with smtplib.SMTP("127.0.0.1", self.port) as s:
                s.sendmail("x@ext.test", ["alice@example.test", "staff@example.test",
                                          "a.l@example.test"], MSG)
        yield self.in_thread(talk)
        yield self.settle()
        self.assertEqual(len(self.delivered("alice")), 1)
        self.assertEqual(len(self.delivered("bob")), 1)
        self.assertEqual(self.queue_files(), [])


class FlushRecorder:
    """A queue whose flush (ETRN) is recorded; ``answer`` is what flush gives back."""

    def __init__(self, answer=0, later=False):
        self.calls = []
        self.answer = answer
        self.later = later

    def flush(self, target=None):
        self.calls.append(target)
        if isinstance(self.answer, Exception):
            raise self.answer
        return defer.succeed(self.answer) if self.later else self.answer


class ETRNTests(ApplianceMixin, unittest.TestCase):
    """RFC 1985 on the MX: relay_networks clients may ask for the queue to run."""

    def setUp(self):
        return self.start_appliance(lmtp=True)

    def trust(self):
        factory = self.app.listeners["smtp"].factory
        factory.is_trusted = networks_predicate([ipaddress.ip_network("127.0.0.0/8")])

    def use_queue(self, queue):
        self.app.listeners["smtp"].factory.queue = queue
        return queue

    def dialogue(self, *commands, port=None, hello="EHLO client.ext.test"):
        c = RawClient(port or self.port)
        c.code()
        ehlo = c.cmd(hello) if hello else None
        return ehlo, [c.cmd(x) for x in commands]

    @defer.inlineCallbacks
    def test_untrusted_refused(self):
        queue = self.use_queue(FlushRecorder())
        ehlo, r = yield self.in_thread(self.dialogue, "ETRN example.org", "ETRN")
        self.assertNotIn("ETRN", ehlo[1])
        self.assertEqual(r[0], (459, ["4.7.1 example.org: client not authorised"]))
        self.assertEqual(r[1], (501, ["5.5.4 Syntax: ETRN domain"]))
        self.assertEqual(queue.calls, [])

    @defer.inlineCallbacks
    def test_trusted_flushes(self):
        self.trust()
        queue = self.use_queue(FlushRecorder(answer=3, later=True))
        ehlo, r = yield self.in_thread(
            self.dialogue, "ETRN Example.ORG", "ETRN @sub.example.org", "ETRN #0123ABCDEF",
            "ETRN", "ETRN bad..domain", "ETRN [127.0.0.1]", "ETRN #../x")
        self.assertIn("ETRN", ehlo[1])
        self.assertEqual(r[0], (250, ["2.0.0 Queuing for node Example.ORG started"]))
        self.assertEqual([x[0] for x in r[1:]], [250, 250, 501, 501, 501, 501])
        self.assertEqual(queue.calls, ["example.org", "@sub.example.org", "0123ABCDEF"])

    @defer.inlineCallbacks
    def test_order_and_queue_trouble(self):
        self.trust()
        self.use_queue(object())            # a queue without flush yet
        _, r = yield self.in_thread(lambda: self.dialogue("ETRN example.org", hello=None))
        self.assertEqual(r[0][0], 503)      # HELO/EHLO first
        _, r = yield self.in_thread(self.dialogue, "ETRN example.org", "MAIL FROM:<a@ext.test>",
                                    "ETRN example.org")
        self.assertEqual([x[0] for x in r], [458, 250, 503])
        self.use_queue(FlushRecorder(answer=RuntimeError("boom")))
        _, r = yield self.in_thread(self.dialogue, "ETRN example.org")
        self.assertEqual(r[0], (458, ["4.3.0 Unable to queue messages for node example.org"]))
        self.flushLoggedErrors(RuntimeError)

    @defer.inlineCallbacks
    def test_not_on_lmtp(self):
        _, r = yield self.in_thread(lambda: self.dialogue(
            "ETRN example.org", port=self.lmtp_port, hello="LHLO client.ext.test"))
        self.assertEqual(r[0][0], 502)
