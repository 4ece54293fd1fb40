"""The outbound SMTP client: reply parsing, timeouts, STARTTLS, transactions.

The protocol and the session run over a string transport with a Clock, the
test playing the server line by line, so every reply, its timing and every
octet the client writes are exact.
"""

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial import unittest

from mailbox_appliance.delivery import smtp_client
from mailbox_appliance.delivery.result import BOUNCED, DEFERRED, SENT, RemoteRecipient
from mailbox_appliance.delivery.smtp_client import (
    ClientSettings, ConnectionBroken, DotStuffer, Reply, ReplyError, ReplyParser, ReplyTimeout,
    SessionError, SMTPClientProtocol, SMTPSession, StaleSession)
from mailbox_appliance.queue.spool import Envelope, QueuedMessage

SETTINGS = ClientSettings(helo_name="me.example.test", connect_timeout=30,
                          command_timeout=300, data_timeout=600)


class TLSStringTransport(StringTransport):
    """A string transport that records startTLS instead of doing it."""

    def __init__(self):
        super().__init__()
        self.tls_started_with = None
        self.value_at_tls = None

    def startTLS(self, creator):
        self.tls_started_with = creator
        self.value_at_tls = self.value()

    def abortConnection(self):
        self.aborted = True
        self.disconnecting = True


def message(body=b"Subject: t\r\n\r\nhello\r\n", sender="s@example.test", **env):
    envelope = Envelope(sender, ["r@ext.test"], **env)
    return QueuedMessage("Q1", envelope, "/nonexistent", 0, len(body), data=body)


def rcpts(*addresses, **kw):
    return [RemoteRecipient(i, a, **kw) for i, a in enumerate(addresses)]


class Wire:
    """The client protocol on a string transport; the test is the server."""

    def __init__(self, clock=None):
        self.clock = clock or Clock()
        self.proto = SMTPClientProtocol(self.clock, greeting_timeout=300)
        self.transport = TLSStringTransport()
        self.proto.makeConnection(self.transport)

    def sent(self):
        """Lines written since the last call."""
        data = self.transport.value()
        self.transport.clear()
        return data.decode().split("\r\n")[:-1] if data else []

    def raw(self):
        data = self.transport.value()
        self.transport.clear()
        return data

    def reply(self, data: bytes):
        self.proto.dataReceived(data)

    def session(self):
        return SMTPSession(self.clock, self.proto, SETTINGS, "mx.ext.test", "192.0.2.1", 25)


EHLO_OK = (b"250-mx.ext.test\r\n250-PIPELINING\r\n250-SIZE 1000000\r\n"
           b"250 ENHANCEDSTATUSCODES\r\n")


class ReplyParserTests(unittest.TestCase):

    def test_single_and_multiline(self):
        p = ReplyParser()
        replies = list(p.feed(b"220 hi\r\n250-a\r\n250-b\r\n250 c\r\n"))
        self.assertEqual(replies, [Reply(220, ("hi",)), Reply(250, ("a", "b", "c"))])
        self.assertEqual(replies[1].text, "250 a b c")

    def test_split_across_reads(self):
        p = ReplyParser()
        self.assertEqual(list(p.feed(b"250-fir")), [])
        self.assertEqual(list(p.feed(b"st\r\n250 sec")), [])
        self.assertEqual(list(p.feed(b"ond\r\n")), [Reply(250, ("first", "second"))])

    def test_bare_code_line(self):
        self.assertEqual(list(ReplyParser().feed(b"250\r\n")), [Reply(250, ("",))])

    def test_line_too_long(self):
        p = ReplyParser()
        with self.assertRaises(ReplyError):
            list(p.feed(b"250 " + b"x" * 3000 + b"\r\n"))

    def test_line_too_long_without_end(self):
        # 10 MB without a line end must fail as soon as the limit is passed.
        p = ReplyParser()
        with self.assertRaises(ReplyError):
            list(p.feed(b"2" * 3000))

    def test_too_many_lines(self):
        p = ReplyParser()
        with self.assertRaises(ReplyError):
            list(p.feed(b"250-x\r\n" * 150 + b"250 end\r\n"))

    def test_malformed(self):
        for bad in (b"hello\r\n", b"25\r\n", b"250xtext\r\n", b"650 no\r\n"):
            with self.assertRaises(ReplyError, msg=bad):
                list(ReplyParser().feed(bad))

    def test_mixed_codes(self):
        with self.assertRaises(ReplyError):
            list(ReplyParser().feed(b"250-a\r\n550 b\r\n"))


class ReplyTests(unittest.TestCase):

    def test_enhanced(self):
        self.assertEqual(Reply(550, ("5.1.1 <x@y>: User unknown",)).enhanced, "5.1.1")
        self.assertEqual(Reply(450, ("4.7.1 greylisted",)).enhanced, "4.7.1")
        self.assertEqual(Reply(550, ("User unknown",)).enhanced, "5.0.0")
        # A status whose class contradicts the code is not believed.
        self.assertEqual(Reply(550, ("2.0.0 fine",)).enhanced, "5.0.0")
        self.assertEqual(Reply(250, ("2.1.5 Ok",)).enhanced, "2.1.5")

    def test_text_clean_and_capped(self):
        r = Reply(550, ("bad\x00thing\rhere\nand", "x" * 2000))
        text = r.text
        self.assertNotIn("\x00", text)
        self.assertNotIn("\r", text)
        self.assertNotIn("\n", text)
        self.assertTrue(text.startswith("550 bad thing here and x"))
        self.assertLessEqual(len(text), smtp_client.MAX_REPLY_TEXT)


class DotStufferTests(unittest.TestCase):

    def stuff(self, *chunks):
        s = DotStuffer()
        return b"".join(s.feed(c) for c in chunks) + s.finish()

    def test_leading_dots(self):
        self.assertEqual(self.stuff(b".a\r\nb\r\n..c\r\n.\r\n"),
                         b"..a\r\nb\r\n...c\r\n..\r\n.\r\n")

    def test_boundaries(self):
        # A line start split over chunks in every way still gets its dot.
        body = b"x\r\n.y\r\n"
        for i in range(len(body) + 1):
            self.assertEqual(self.stuff(body[:i], body[i:]), b"x\r\n..y\r\n.\r\n", i)

    def test_bare_line_ends_normalised(self):
        # security A6: no bare LF or CR leaves, so "\n.\n" cannot end data
        # for a lenient receiver.
        self.assertEqual(self.stuff(b"a\n.\nb\r.\rc\r\n"),
                         b"a\r\n..\r\nb\r\n..\r\nc\r\n.\r\n")

    def test_final_line_end_added(self):
        self.assertEqual(self.stuff(b"no end"), b"no end\r\n.\r\n")
        self.assertEqual(self.stuff(b"cr end\r"), b"cr end\r\n.\r\n")
        self.assertEqual(self.stuff(b""), b".\r\n")


class ProtocolTests(unittest.TestCase):

    def test_greeting_timeout(self):
        w = Wire()
        failures = []
        w.proto.greeting.addErrback(failures.append)
        w.clock.advance(299)
        self.assertEqual(failures, [])
        w.clock.advance(2)
        self.assertTrue(failures[0].check(ReplyTimeout))
        self.assertTrue(w.transport.aborted)

    def test_reply_flood_cuts_the_connection(self):
        w = Wire()
        failures = []
        w.proto.greeting.addErrback(failures.append)
        w.reply(b"220-flood\r\n" * 200)
        self.assertTrue(failures[0].check(ConnectionBroken))
        self.assertIn("more than 100 lines", failures[0].getErrorMessage())
        self.assertTrue(w.transport.aborted)
        # Anything after that is ignored.
        w.reply(b"220 late\r\n")

    def test_long_line_cuts_the_connection(self):
        w = Wire()
        failures = []
        w.proto.greeting.addErrback(failures.append)
        for _ in range(10):
            w.reply(b"2" * 1000)
        self.assertTrue(failures[0].check(ConnectionBroken))
        self.assertTrue(w.transport.aborted)

    def test_unsolicited_reply_cuts_the_connection(self):
        w = Wire()
        w.reply(b"220 hi\r\n")
        self.successResultOf(w.proto.greeting)
        w.reply(b"250 nobody asked\r\n")
        self.assertTrue(w.transport.aborted)
        self.assertIsNotNone(w.proto.broken)

    def test_pipelined_replies_in_order_each_with_its_timer(self):
        w = Wire()
        w.reply(b"220 hi\r\n")
        ds = w.proto.pipeline(["MAIL FROM:<a@b>", "RCPT TO:<c@d>", "DATA"], 100)
        self.assertEqual(w.sent(), ["MAIL FROM:<a@b>", "RCPT TO:<c@d>", "DATA"])
        w.clock.advance(90)
        w.reply(b"250 ok\r\n")
        # The next reply gets its own full timeout from now.
        w.clock.advance(90)
        w.reply(b"250 ok\r\n354 go\r\n")
        self.assertEqual([self.successResultOf(d).code for d in ds], [250, 250, 354])
        self.assertEqual(w.clock.getDelayedCalls(), [])

    def test_starttls_drops_injected_plaintext(self):
        # security B6: the 220 and two forged lines in one segment.
        w = Wire()
        w.reply(b"220 hi\r\n")
        d = w.proto.starttls("creator", 100)
        self.assertEqual(w.sent(), ["STARTTLS"])
        w.reply(b"220 go\r\n250-evil\r\n250 AUTH PLAIN\r\n")
        self.assertEqual(w.transport.tls_started_with, "creator")
        self.assertEqual(w.proto.discarded_after_starttls, len(b"250-evil\r\n250 AUTH PLAIN\r\n"))
        self.assertNoResult(d)
        w.proto.handshakeCompleted()
        self.assertEqual(self.successResultOf(d).code, 220)
        # The forged replies are not waiting for the next command.
        e = w.proto.command("EHLO me", 100)
        self.assertNoResult(e)
        w.reply(b"250 mx\r\n")
        self.assertEqual(self.successResultOf(e).lines, ("mx",))

    def test_handshake_timeout(self):
        w = Wire()
        w.reply(b"220 hi\r\n")
        d = w.proto.starttls("creator", 100)
        w.reply(b"220 go\r\n")
        w.clock.advance(101)
        self.failureResultOf(d, ConnectionBroken)
        self.assertTrue(w.transport.aborted)

    def test_connection_lost_fails_pending(self):
        w = Wire()
        w.reply(b"220 hi\r\n")
        d = w.proto.command("NOOP", 100)
        w.proto.connectionLost(None)
        self.failureResultOf(d, ConnectionBroken)
        self.assertEqual(w.clock.getDelayedCalls(), [])
        # Commands after that fail at once and write nothing.
        w.transport.clear()
        self.failureResultOf(w.proto.command("NOOP", 100), ConnectionBroken)
        self.assertEqual(w.transport.value(), b"")


class SessionOpenTests(unittest.TestCase):

    def test_ehlo_and_extensions(self):
        w = Wire()
        s = w.session()
        d = s.open(tls_level="none")
        w.reply(b"220 mx ESMTP\r\n")
        self.assertEqual(w.sent(), ["EHLO me.example.test"])
        w.reply(b"250-mx\r\n250-PIPELINING\r\n250-dsn\r\n250 SIZE 100\r\n")
        self.successResultOf(d)
        self.assertEqual(s.extensions, {"PIPELINING": "", "DSN": "", "SIZE": "100"})

    def test_helo_fallback_on_5xx(self):
        w = Wire()
        s = w.session()
        d = s.open()
        w.reply(b"220 old\r\n")
        w.sent()
        w.reply(b"502 5.5.1 what\r\n")
        self.assertEqual(w.sent(), ["HELO me.example.test"])
        w.reply(b"250 hi\r\n")
        self.successResultOf(d)
        self.assertFalse(s.esmtp)
        self.assertEqual(s.extensions, {})

    def test_greeting_4xx_and_5xx_are_not_bounces(self):
        for banner in (b"421 4.3.2 busy\r\n", b"554 5.7.1 go away\r\n"):
            w = Wire()
            d = w.session().open()
            w.reply(banner)
            e = self.failureResultOf(d, SessionError).value
            self.assertTrue(e.unreachable)
            self.assertTrue(e.from_remote)
            self.assertEqual(e.enhanced[0], "4")
            self.assertEqual(e.reply, banner.decode().strip())
            self.assertEqual(w.sent(), ["QUIT"])

    def test_no_greeting_timeout(self):
        w = Wire()
        d = w.session().open()
        w.clock.advance(301)
        e = self.failureResultOf(d, SessionError).value
        self.assertTrue(e.unreachable)
        self.assertIn("before the greeting", e.reply)

    def test_tls_required_but_not_offered(self):
        w = Wire()
        d = w.session().open(tls_level="encrypt", tls_creator=lambda v: "c")
        w.reply(b"220 mx\r\n")
        w.sent()
        w.reply(EHLO_OK)
        e = self.failureResultOf(d, SessionError).value
        self.assertEqual(e.enhanced, "4.7.4")
        self.assertEqual(w.sent(), ["QUIT"])
        self.assertIsNone(w.transport.tls_started_with)

    def test_tls_may_refused_continues_plain(self):
        w = Wire()
        s = w.session()
        d = s.open(tls_level="may", tls_creator=lambda v: "c")
        w.reply(b"220 mx\r\n")
        w.sent()
        w.reply(b"250-mx\r\n250 STARTTLS\r\n")
        self.assertEqual(w.sent(), ["STARTTLS"])
        w.reply(b"454 4.7.0 TLS not available\r\n")
        self.successResultOf(d)
        self.assertFalse(w.proto.tls)

    def test_starttls_then_only_the_new_ehlo_counts(self):
        w = Wire()
        s = w.session()
        d = s.open(tls_level="verify", tls_creator=lambda verify: ("creator", verify))
        w.reply(b"220 mx\r\n")
        w.sent()
        w.reply(b"250-mx\r\n250-AUTH PLAIN\r\n250-DSN\r\n250 STARTTLS\r\n")
        self.assertEqual(w.sent(), ["STARTTLS"])
        w.reply(b"220 go\r\n250-evil\r\n250 AUTH PLAIN\r\n")
        self.assertEqual(w.transport.tls_started_with, ("creator", True))
        self.assertEqual(w.sent(), [])
        w.proto.handshakeCompleted()
        self.assertEqual(w.sent(), ["EHLO me.example.test"])
        w.reply(b"250-mx\r\n250 PIPELINING\r\n")
        self.successResultOf(d)
        self.assertEqual(s.extensions, {"PIPELINING": ""})
        self.assertTrue(s.verified)

    def test_auth_never_without_tls(self):
        w = Wire()
        d = w.session().open(tls_level="none", auth=("u", "pw"))
        w.reply(b"220 mx\r\n")
        w.sent()
        w.reply(b"250-mx\r\n250 AUTH PLAIN\r\n")
        e = self.failureResultOf(d, SessionError).value
        self.assertEqual(e.enhanced, "4.7.0")
        self.assertEqual(w.sent(), ["QUIT"])

    def test_auth_plain_inside_tls(self):
        w = Wire()
        d = w.session().open(tls_level="encrypt", tls_creator=lambda v: "c", auth=("u", "pw"))
        w.reply(b"220 mx\r\n")
        w.sent()
        w.reply(b"250-mx\r\n250 STARTTLS\r\n")
        w.sent()
        w.reply(b"220 go\r\n")
        w.proto.handshakeCompleted()
        w.sent()
        w.reply(b"250-mx\r\n250 AUTH LOGIN PLAIN\r\n")
        self.assertEqual(w.sent(), ["AUTH PLAIN AHUAcHc="])
        w.reply(b"235 2.7.0 ok\r\n")
        self.successResultOf(d)

    def test_auth_refused_defers(self):
        w = Wire()
        w.proto.tls = True          # as if STARTTLS had happened
        d = w.session().open(tls_level="none", auth=("u", "bad"))
        w.reply(b"220 mx\r\n")
        w.sent()
        w.reply(b"250-mx\r\n250 AUTH PLAIN\r\n")
        w.sent()
        w.reply(b"535 5.7.8 no\r\n")
        e = self.failureResultOf(d, SessionError).value
        self.assertEqual(e.enhanced[0], "4")
        self.assertFalse(e.unreachable)


class SessionSendTests(unittest.TestCase):

    def opened(self, ehlo=EHLO_OK):
        w = Wire()
        s = w.session()
        d = s.open(tls_level="none")
        w.reply(b"220 mx\r\n")
        w.reply(ehlo)
        self.successResultOf(d)
        w.sent()
        return w, s

    def test_pipelined_mixed_recipients(self):
        w, s = self.opened()
        d = s.send(message(), rcpts("a@ext.test", "b@ext.test", "c@ext.test"))
        # MAIL, every RCPT and DATA in one write.
        self.assertEqual(w.sent(), ["MAIL FROM:<s@example.test> SIZE=21", "RCPT TO:<a@ext.test>",
                                    "RCPT TO:<b@ext.test>", "RCPT TO:<c@ext.test>", "DATA"])
        w.reply(b"250 2.1.0 ok\r\n250 2.1.5 ok\r\n450 4.2.1 later\r\n550 5.1.1 unknown\r\n"
                b"354 go\r\n")
        self.assertEqual(w.raw(), b"Subject: t\r\n\r\nhello\r\n.\r\n")
        w.reply(b"250 2.0.0 queued as X\r\n")
        out = self.successResultOf(d)
        r = out.results
        self.assertEqual((r[0].status, r[0].enhanced, r[0].reply),
                         (SENT, "2.0.0", "250 2.0.0 queued as X"))
        self.assertEqual((r[1].status, r[1].enhanced), (DEFERRED, "4.2.1"))
        self.assertEqual((r[2].status, r[2].enhanced), (BOUNCED, "5.1.1"))
        self.assertTrue(all(x.from_remote and x.remote_mta == "mx.ext.test" for x in r.values()))
        self.assertEqual(out.retry, {1})
        self.assertTrue(s.usable)

    def test_without_pipelining_one_by_one(self):
        w, s = self.opened(b"250 mx\r\n")
        d = s.send(message(), rcpts("a@ext.test", "b@ext.test"))
        self.assertEqual(w.sent(), ["MAIL FROM:<s@example.test>"])
        w.reply(b"250 ok\r\n")
        self.assertEqual(w.sent(), ["RCPT TO:<a@ext.test>"])
        w.reply(b"550 no\r\n")
        self.assertEqual(w.sent(), ["RCPT TO:<b@ext.test>"])
        w.reply(b"250 ok\r\n")
        self.assertEqual(w.sent(), ["DATA"])
        w.reply(b"354 go\r\n")
        w.sent()
        w.reply(b"250 ok\r\n")
        r = self.successResultOf(d).results
        self.assertEqual([r[0].status, r[1].status], [BOUNCED, SENT])

    def test_all_recipients_refused_no_data(self):
        w, s = self.opened()
        d = s.send(message(), rcpts("a@ext.test"))
        w.sent()
        w.reply(b"250 ok\r\n550 5.1.1 no\r\n554 5.5.1 no valid recipients\r\n")
        self.assertEqual(w.sent(), ["RSET"])
        w.reply(b"250 ok\r\n")
        out = self.successResultOf(d)
        self.assertEqual(out.results[0].status, BOUNCED)
        self.assertTrue(s.usable)

    def test_mail_refused(self):
        w, s = self.opened()
        d = s.send(message(), rcpts("a@ext.test", "b@ext.test"))
        w.sent()
        w.reply(b"451 4.3.0 try later\r\n503 no\r\n503 no\r\n503 no\r\n")
        w.reply(b"250 reset\r\n")
        out = self.successResultOf(d)
        self.assertEqual({r.status for r in out.results.values()}, {DEFERRED})
        self.assertEqual(out.results[0].reply, "451 4.3.0 try later")
        self.assertEqual(out.retry, {0, 1})

    def test_452_moves_the_rest_to_another_transaction(self):
        w, s = self.opened()
        d = s.send(message(), rcpts("a@ext.test", "b@ext.test", "c@ext.test"))
        w.sent()
        w.reply(b"250 ok\r\n250 ok\r\n452 4.5.3 Too many recipients\r\n"
                b"452 4.5.3 Too many recipients\r\n354 go\r\n")
        w.raw()
        w.reply(b"250 2.0.0 first\r\n")
        # The same connection, a new transaction for the two left over.
        self.assertEqual(w.sent(), ["MAIL FROM:<s@example.test> SIZE=21",
                                    "RCPT TO:<b@ext.test>", "RCPT TO:<c@ext.test>", "DATA"])
        w.reply(b"250 ok\r\n250 ok\r\n250 ok\r\n354 go\r\n")
        w.raw()
        w.reply(b"250 2.0.0 second\r\n")
        r = self.successResultOf(d).results
        self.assertEqual([r[i].status for i in range(3)], [SENT] * 3)
        self.assertEqual(r[2].reply, "250 2.0.0 second")

    def test_452_first_recipient_is_a_deferral(self):
        # "too many" with nobody accepted cannot be split: deferred.
        w, s = self.opened()
        d = s.send(message(), rcpts("a@ext.test"))
        w.sent()
        w.reply(b"250 ok\r\n452 4.5.3 Too many recipients\r\n554 no\r\n")
        w.reply(b"250 reset\r\n")
        out = self.successResultOf(d)
        self.assertEqual(out.results[0].status, DEFERRED)

    def test_more_than_100_recipients_in_batches(self):
        w, s = self.opened()
        addresses = [f"r{i}@ext.test" for i in range(150)]
        d = s.send(message(), rcpts(*addresses))
        lines = w.sent()
        self.assertEqual(len(lines), 1 + 100 + 1)
        w.reply(b"250 ok\r\n" + b"250 ok\r\n" * 100 + b"354 go\r\n")
        w.raw()
        w.reply(b"250 ok\r\n")
        lines = w.sent()
        self.assertEqual(len(lines), 1 + 50 + 1)
        w.reply(b"250 ok\r\n" + b"250 ok\r\n" * 50 + b"354 go\r\n")
        w.raw()
        w.reply(b"250 ok\r\n")
        r = self.successResultOf(d).results
        self.assertEqual(len(r), 150)
        self.assertEqual({x.status for x in r.values()}, {SENT})

    def test_drop_after_dot_defers_without_retry_elsewhere(self):
        w, s = self.opened()
        d = s.send(message(), rcpts("a@ext.test"))
        w.sent()
        w.reply(b"250 ok\r\n250 ok\r\n354 go\r\n")
        w.raw()
        w.proto.connectionLost(None)
        out = self.successResultOf(d)
        self.assertEqual(out.results[0].status, DEFERRED)
        self.assertIn("after end of data", out.results[0].reply)
        self.assertEqual(out.retry, set())
        self.assertFalse(s.usable)

    def test_data_timeout(self):
        w, s = self.opened()
        d = s.send(message(), rcpts("a@ext.test"))
        w.sent()
        w.reply(b"250 ok\r\n250 ok\r\n354 go\r\n")
        w.clock.advance(599)
        self.assertNoResult(d)
        w.clock.advance(2)
        out = self.successResultOf(d)
        self.assertEqual(out.results[0].status, DEFERRED)
        self.assertTrue(w.transport.aborted)

    def test_lost_before_data_retries_elsewhere(self):
        w, s = self.opened()
        d = s.send(message(), rcpts("a@ext.test", "b@ext.test"))
        w.sent()
        w.reply(b"250 ok\r\n250 ok\r\n")
        w.proto.connectionLost(None)
        out = self.successResultOf(d)
        self.assertEqual({r.status for r in out.results.values()}, {DEFERRED})
        self.assertEqual(out.retry, {0, 1})

    def test_stale_connection(self):
        w, s = self.opened()
        w.proto.connectionLost(None)
        self.failureResultOf(s.send(message(), rcpts("a@ext.test")), StaleSession)

    def test_dsn_parameters_when_advertised(self):
        w, s = self.opened(b"250-mx\r\n250-DSN\r\n250 PIPELINING\r\n")
        msg = message(ret="HDRS", envid="QQ+2Bid")
        d = s.send(msg, [RemoteRecipient(0, "a@ext.test", "SUCCESS,FAILURE", "rfc822;a@ext.test"),
                         RemoteRecipient(1, "b@ext.test")])
        self.assertEqual(w.sent(), ["MAIL FROM:<s@example.test> RET=HDRS ENVID=QQ+2Bid",
                                    "RCPT TO:<a@ext.test> NOTIFY=SUCCESS,FAILURE "
                                    "ORCPT=rfc822;a@ext.test",
                                    "RCPT TO:<b@ext.test>", "DATA"])
        w.reply(b"250 ok\r\n250 ok\r\n250 ok\r\n354 go\r\n")
        w.raw()
        w.reply(b"250 ok\r\n")
        r = self.successResultOf(d).results
        self.assertTrue(r[0].dsn_passed_on)
        self.assertFalse(r[1].dsn_passed_on)    # nothing was asked for it

    def test_dsn_parameters_omitted_without_dsn(self):
        w, s = self.opened(b"250-mx\r\n250 PIPELINING\r\n")
        d = s.send(message(ret="FULL", envid="x"),
                   [RemoteRecipient(0, "a@ext.test", "SUCCESS", "rfc822;a@ext.test")])
        self.assertEqual(w.sent(), ["MAIL FROM:<s@example.test>", "RCPT TO:<a@ext.test>",
                                    "DATA"])
        w.reply(b"250 ok\r\n250 ok\r\n354 go\r\n")
        w.raw()
        w.reply(b"250 ok\r\n")
        self.assertFalse(self.successResultOf(d).results[0].dsn_passed_on)

    def test_8bitmime_passed_on_when_offered(self):
        for ehlo, expected in ((b"250-mx\r\n250 8BITMIME\r\n", " BODY=8BITMIME"),
                               (b"250 mx\r\n", "")):
            w, s = self.opened(ehlo)
            s.send(message(eight_bit=True), rcpts("a@ext.test"))
            self.assertEqual(w.sent()[0], "MAIL FROM:<s@example.test>" + expected)

    def test_size_over_the_servers_limit_bounces(self):
        w, s = self.opened(b"250-mx\r\n250 SIZE 10\r\n")
        out = self.successResultOf(s.send(message(), rcpts("a@ext.test")))
        self.assertEqual((out.results[0].status, out.results[0].enhanced), (BOUNCED, "5.3.4"))
        self.assertEqual(w.sent(), [])

    def test_smtputf8(self):
        w, s = self.opened(b"250-mx\r\n250 PIPELINING\r\n")
        out = self.successResultOf(s.send(message(), rcpts("josé@ext.test")))
        self.assertEqual((out.results[0].status, out.results[0].enhanced), (BOUNCED, "5.6.7"))
        w2, s2 = self.opened(b"250-mx\r\n250-SMTPUTF8\r\n250 PIPELINING\r\n")
        s2.send(message(), rcpts("josé@ext.test"))
        self.assertEqual(w2.sent()[:2], ["MAIL FROM:<s@example.test> SMTPUTF8",
                                         "RCPT TO:<josé@ext.test>"])

    def test_addresses_that_could_inject_commands(self):
        w, s = self.opened()
        out = self.successResultOf(s.send(message(), rcpts("a@ext.test\r\nRSET")))
        self.assertEqual(out.results[0].status, BOUNCED)
        out = self.successResultOf(s.send(message(sender="x\r\nRSET@e.test"),
                                          rcpts("a@ext.test")))
        self.assertEqual(out.results[0].status, BOUNCED)
        self.assertEqual(w.sent(), [])

    def test_body_dot_stuffed_and_normalised(self):
        w, s = self.opened()
        body = b"Subject: t\r\n\r\n.hidden\r\nx\n.\r\nMAIL FROM:<evil@x>\r\n."
        d = s.send(message(body), rcpts("a@ext.test"))
        w.sent()
        w.reply(b"250 ok\r\n250 ok\r\n354 go\r\n")
        self.assertEqual(w.raw(), b"Subject: t\r\n\r\n..hidden\r\nx\r\n..\r\n"
                                  b"MAIL FROM:<evil@x>\r\n..\r\n.\r\n")
        w.reply(b"250 ok\r\n")
        self.assertEqual(self.successResultOf(d).results[0].status, SENT)

    def test_null_sender(self):
        # Delivery status notices go out with MAIL FROM:<>.
        w, s = self.opened(b"250-mx\r\n250 PIPELINING\r\n")
        s.send(message(sender=""), rcpts("a@ext.test"))
        self.assertEqual(w.sent()[0], "MAIL FROM:<>")

    def test_quit(self):
        w, s = self.opened()
        closed = s.quit()
        self.assertEqual(w.sent(), ["QUIT"])
        self.assertFalse(s.usable)
        w.reply(b"221 bye\r\n")
        self.assertTrue(w.transport.disconnecting)
        w.proto.connectionLost(None)
        self.successResultOf(closed)


class BodyFromFileTests(unittest.TestCase):
    """The body streamed from the queue file, from body_offset, in chunks."""

    @defer.inlineCallbacks
    def test_file_in_chunks(self):
        from twisted.internet import reactor
        path = self.mktemp()
        head = b"MAQ1\n{}\n"
        body = b"".join(b".line %d\r\n" % i for i in range(20000))
        with open(path, "wb") as f:
            f.write(head + body)
        msg = QueuedMessage("Q", Envelope("s@x", ["r@y"]), path, len(head), len(body))
        reader = smtp_client.BodyReader(reactor, msg, chunk=4096)
        stuffer, out = DotStuffer(), []
        while True:
            chunk = yield reader.read()
            if not chunk:
                break
            out.append(stuffer.feed(chunk))
        yield reader.close()
        data = b"".join(out) + stuffer.finish()
        self.assertEqual(data, body.replace(b".line", b"..line") + b".\r\n")
