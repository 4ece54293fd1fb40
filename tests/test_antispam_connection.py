"""Connection control at the door: rate, concurrency, greet pause, bad-RCPT throttle.

Each check alone with a Clock; then in the receiver (a string transport and
a Clock, and real sockets for the concurrency limit across two ports).
"""

import dataclasses

from twisted.internet import defer, reactor
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial import unittest

from mailbox_appliance import config as config_module
from mailbox_appliance.antispam import connection
from mailbox_appliance.antispam.connection import (
    BadRecipientThrottle, ConnectionCount, ConnectionRate, GreetPause, client_key)
from mailbox_appliance.smtp.policy import PolicyChain, RecipientExists, RelayAccess, Verdict
from mailbox_appliance.smtp.server import SMTPServerFactory
from mailbox_appliance.smtp.session import SessionState
from tests.fakes import FakeDirectory
from tests.smtp_helpers import ApplianceMixin, RawClient


def session(ip="192.0.2.1", listener="smtp", **kw):
    return SessionState(client_ip=ip, listener=listener, **kw)


def config(**connection):
    cfg = config_module.Config()
    return dataclasses.replace(cfg, antispam=dataclasses.replace(
        cfg.antispam, connection=dataclasses.replace(cfg.antispam.connection, **connection)))


class ClientKeyTests(unittest.TestCase):

    def test_ipv4_is_itself(self):
        self.assertEqual(client_key("192.0.2.1"), "192.0.2.1")

    def test_ipv4_mapped_is_the_ipv4_address(self):
        self.assertEqual(client_key("::ffff:192.0.2.1"), "192.0.2.1")

    def test_ipv6_counts_per_64(self):
        keys = {client_key(f"2001:db8:1:2:{i:x}::{i:x}") for i in range(1000)}
        self.assertEqual(keys, {"2001:db8:1:2::/64"})
        self.assertNotEqual(client_key("2001:db8:1:3::1"), client_key("2001:db8:1:2::1"))

    def test_not_an_address(self):
        self.assertEqual(client_key("/run/sock"), "/run/sock")


class RateTests(unittest.TestCase):

    def setUp(self):
        self.clock = Clock()
        self.rate = ConnectionRate(self.clock, limit=3, window=60)

    def connect(self, ip="192.0.2.1", **kw):
        return self.rate.check("connect", session(ip, **kw), None)

    def test_over_the_rate_is_421(self):
        self.assertEqual([self.connect() for _ in range(3)], [None] * 3)
        v = self.connect()
        self.assertEqual(v.reply, "421 4.7.0 Error: too many connections from 192.0.2.1")
        # Another client is not affected.
        self.assertIsNone(self.connect("192.0.2.2"))

    def test_window_ends(self):
        for _ in range(4):
            self.connect()
        self.clock.advance(59)
        self.assertIsNotNone(self.connect())
        self.clock.advance(1)
        self.assertIsNone(self.connect())

    def test_refused_attempts_count(self):
        for _ in range(10):
            self.connect()
        self.clock.advance(30)
        self.assertIsNotNone(self.connect())

    def test_sixty_first_connection_in_a_minute(self):
        rate = ConnectionRate(self.clock, limit=60, window=60)
        answers = []
        for _ in range(61):
            answers.append(rate.check("connect", session(), None))
            self.clock.advance(0.5)
        self.assertEqual(answers[:60], [None] * 60)
        self.assertEqual(answers[60].code, 421)

    def test_thousand_addresses_of_one_64_are_one_client(self):
        answers = [self.connect(f"2001:db8::{i:x}") for i in range(1000)]
        self.assertEqual(answers[:3], [None] * 3)
        self.assertTrue(all(v is not None and v.code == 421 for v in answers[3:]))
        self.assertEqual(answers[3].text, "Error: too many connections from 2001:db8::3")
        self.assertIsNone(self.connect("2001:db8:0:1::1"))

    def test_trusted_clients_are_not_counted(self):
        for _ in range(10):
            self.assertIsNone(self.connect(trusted=True))
        self.assertEqual(len(self.rate), 0)

    def test_counters_expire(self):
        for i in range(100):
            self.connect(f"198.51.100.{i}")
        self.assertEqual(len(self.rate), 100)
        self.clock.advance(61)
        self.connect()
        self.assertEqual(len(self.rate), 1)

    def test_table_is_capped(self):
        rate = ConnectionRate(self.clock, limit=3, window=60, max_clients=50)
        for i in range(1000):
            rate.check("connect", session(f"10.0.{i // 256}.{i % 256}"), None)
            self.assertLessEqual(len(rate), 50)
        self.assertEqual(len(rate), 50)


class MessageRateTests(unittest.TestCase):
    """security.md H5: 101 messages a minute from one client: 450 4.7.1."""

    def setUp(self):
        self.clock = Clock()
        self.check = connection.MessageRate(self.clock, 100, 60)

    def test_hundred_and_first_message_in_a_minute(self):
        s = session()
        for _ in range(100):
            self.assertIsNone(self.check.check("mail", s, None))
        v = self.check.check("mail", s, None)
        self.assertEqual(v.reply, "450 4.7.1 Error: too much mail from 192.0.2.1")
        # Another client is not affected; the window ends.
        self.assertIsNone(self.check.check("mail", session("192.0.2.2"), None))
        self.clock.advance(60)
        self.assertIsNone(self.check.check("mail", s, None))

    def test_one_64_is_one_client(self):
        for i in range(100):
            self.assertIsNone(self.check.check("mail", session(f"2001:db8::{i:x}"), None))
        self.assertEqual(self.check.check("mail", session("2001:db8::ffff"), None).code, 450)

    def test_submission_authenticated_and_trusted_exempt(self):
        for s in (session(listener="submission"), session(authenticated="alice"),
                  session(trusted=True)):
            for _ in range(150):
                self.assertIsNone(self.check.check("mail", s, None))
        self.assertEqual(len(self.check), 0)


class CountTests(unittest.TestCase):

    def setUp(self):
        self.count = ConnectionCount(limit=2)

    def test_over_the_limit_is_421_until_one_leaves(self):
        a, b, c, d = (session() for _ in range(4))
        self.assertIsNone(self.count.check("connect", a, None))
        self.assertIsNone(self.count.check("connect", b, None))
        v = self.count.check("connect", c, None)
        self.assertEqual(v.reply, "421 4.7.0 Error: too many connections from 192.0.2.1")
        # The refused one leaving does not free a place...
        self.count.check("disconnect", c, None)
        self.assertEqual(self.count.open_connections("192.0.2.1"), 2)
        self.assertIsNotNone(self.count.check("connect", session(), None))
        # ...one that was counted does, once.
        self.count.check("disconnect", a, None)
        self.count.check("disconnect", a, None)
        self.assertEqual(self.count.open_connections("192.0.2.1"), 1)
        self.assertIsNone(self.count.check("connect", d, None))
        self.assertIsNone(self.count.check("connect", session("192.0.2.9"), None))

    def test_ipv6_per_64(self):
        s = [session(f"2001:db8::{i}") for i in (1, 2, 3)]
        self.assertIsNone(self.count.check("connect", s[0], None))
        self.assertIsNone(self.count.check("connect", s[1], None))
        self.assertEqual(self.count.check("connect", s[2], None).code, 421)

    def test_table_only_holds_open_connections(self):
        sessions = [session(f"198.51.100.{i}") for i in range(50)]
        for s in sessions:
            self.count.check("connect", s, None)
        for s in sessions:
            self.count.check("disconnect", s, None)
        self.assertEqual((self.count._counts, self.count._sessions), ({}, {}))

    def test_trusted_not_counted(self):
        for _ in range(5):
            s = session(trusted=True)
            self.assertIsNone(self.count.check("connect", s, None))
        self.assertEqual(self.count.open_connections("192.0.2.1"), 0)


class GreetPauseTests(unittest.TestCase):

    def setUp(self):
        self.clock = Clock()
        self.pause = GreetPause(self.clock, 5)

    def test_answer_waits(self):
        d = self.pause.check("connect", session(), None)
        got = []
        d.addCallback(got.append)
        self.clock.advance(4.9)
        self.assertEqual(got, [])
        self.clock.advance(0.1)
        self.assertEqual(got, [None])
        self.assertEqual(self.pause._pending, {})

    def test_client_leaving_cancels_the_timer(self):
        s = session()
        self.pause.check("connect", s, None)
        self.pause.check("disconnect", s, None)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.pause._pending, {})

    def test_not_on_submission_nor_for_trusted(self):
        self.assertIsNone(self.pause.check("connect", session(listener="submission"), None))
        self.assertIsNone(self.pause.check("connect", session(listener="submissions"), None))
        self.assertIsNone(self.pause.check("connect", session(trusted=True), None))
        self.assertEqual(self.clock.getDelayedCalls(), [])


class BadRecipientTests(unittest.TestCase):

    def setUp(self):
        self.clock = Clock()
        self.throttle = BadRecipientThrottle(self.clock, throttle=2, limit=4)

    def test_delay_then_421(self):
        s = session()
        bad = (None, Verdict(550, "5.1.1", "User unknown"))
        for _ in range(2):
            self.assertIsNone(self.throttle.check("rcpt", s, None))
            self.throttle.check("rcpt_refused", s, bad)
        d = self.throttle.check("rcpt", s, None)
        got = []
        d.addCallback(got.append)
        self.clock.advance(0.9)
        self.assertEqual(got, [])
        self.clock.advance(0.1)
        self.assertEqual(got, [None])
        self.throttle.check("rcpt_refused", s, bad)
        self.assertIsInstance(self.throttle.check("rcpt", s, None), defer.Deferred)
        self.clock.advance(1)
        self.throttle.check("rcpt_refused", s, bad)
        v = self.throttle.check("rcpt", s, None)
        self.assertEqual(v.reply, "421 4.7.0 Error: too many bad recipients")
        # Counts are per session.
        self.assertIsNone(self.throttle.check("rcpt", session(), None))
        self.throttle.check("disconnect", s, None)
        self.assertEqual(self.throttle.refused(s), 0)

    def test_disconnect_cancels_a_delay(self):
        s = session()
        for _ in range(2):
            self.throttle.check("rcpt_refused", s, None)
        self.throttle.check("rcpt", s, None)
        self.throttle.check("disconnect", s, None)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_exempt(self):
        for s in (session(trusted=True), session(authenticated="alice")):
            for _ in range(10):
                self.throttle.check("rcpt_refused", s, None)
            self.assertIsNone(self.throttle.check("rcpt", s, None))


class ChecksTests(unittest.TestCase):

    def test_defaults(self):
        names = [c.name for c in connection.checks(config(), Clock(), None)]
        self.assertEqual(names, ["ratecontrol", "conncontrol", "msgrate", "bad_rcpt"])

    def test_greet_pause_enabled(self):
        cs = connection.checks(config(greet_pause="6s", max_connection_rate=5,
                                      rate_window="2m", max_connections_per_ip=3,
                                      bad_rcpt_throttle=4, bad_rcpt_limit=9), Clock(), None)
        self.assertEqual([c.name for c in cs],
                         ["ratecontrol", "conncontrol", "msgrate", "greetpause", "bad_rcpt"])
        self.assertEqual((cs[0].limit, cs[0].window, cs[1].limit, cs[2].limit, cs[2].window,
                          cs[3].seconds, cs[4].throttle, cs[4].limit),
                         (5, 120, 3, 100, 120, 6, 4, 9))


class NotifyTests(unittest.TestCase):
    """PolicyChain.notify: every check of the stage hears it, whatever the others do."""

    def test_all_hear_it(self):
        heard = []

        class Check:
            stages = frozenset({"disconnect"})

            def __init__(self, name, answer):
                self.name, self.answer = name, answer

            def check(self, stage, session, argument):
                heard.append(self.name)
                if self.answer == "crash":
                    raise RuntimeError("boom")
                return self.answer

        class Other(Check):
            stages = frozenset({"connect"})
        chain = PolicyChain([Check("a", Verdict(554, "5.7.1", "no")), Check("b", "crash"),
                             Other("c", None), Check("d", defer.fail(RuntimeError("later"))),
                             Check("e", None)])
        self.assertIsNone(chain.notify("disconnect", session(), None))
        self.assertEqual(heard, ["a", "b", "d", "e"])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 2)


class _NoQueue:
    def submit(self, qmsg):
        raise AssertionError("nothing should be queued")


class _Refuse:
    """A connect check after the connection checks that refuses everybody."""
    name = "refuse_all"
    stages = frozenset({"connect"})

    def check(self, stage, session, argument):
        return Verdict(554, "5.7.1", "Go away")


class ReceiverTests(unittest.TestCase):
    """The checks in the receiver: a string transport per connection, one Clock."""

    def setUp(self):
        self.clock = Clock()
        directory = FakeDirectory()
        directory.add_user("alice", "alice@example.test")
        self.recipients = [RelayAccess(["example.test"]),
                           RecipientExists(directory, ["example.test"])]

    def factory(self, checks, listener="smtp", relay_networks=()):
        cfg = config_module.Config()
        if relay_networks:
            cfg = dataclasses.replace(cfg, server=dataclasses.replace(
                cfg.server, relay_networks=relay_networks))
        f = SMTPServerFactory(self.clock, cfg, PolicyChain(list(checks) + self.recipients),
                              spool=None, queue=_NoQueue())
        f.listener = listener
        return f

    def connect(self, factory, ip="192.0.2.1"):
        proto = factory.buildProtocol(None)
        t = StringTransport(peerAddress=IPv4Address("TCP", ip, 4321),
                            hostAddress=IPv4Address("TCP", "198.51.100.25", 25))
        proto.makeConnection(t)
        return proto, t

    @staticmethod
    def lines(t):
        out = t.value().decode().splitlines()
        t.clear()
        return out

    def leave(self, proto, t):
        t.loseConnection()
        proto.connectionLost(None)

    def test_greet_pause_holds_the_banner(self):
        f = self.factory([GreetPause(self.clock, 5)])
        proto, t = self.connect(f)
        self.assertEqual(t.value(), b"")
        self.clock.advance(5)
        self.assertEqual(self.lines(t), ["220 mail.example.test ESMTP mailbox_appliance"])
        proto.dataReceived(b"EHLO client.example.org\r\n")
        self.assertEqual(self.lines(t)[0], "250-mail.example.test")

    def test_talking_before_the_banner_is_554(self):
        f = self.factory([GreetPause(self.clock, 5)])
        proto, t = self.connect(f)
        self.clock.advance(2)
        proto.dataReceived(b"EHLO bot.example.org\r\nMAIL FROM:<spam@example.org>\r\n")
        self.assertEqual(t.value(), b"")
        self.clock.advance(3)
        self.assertEqual(self.lines(t), ["554 5.5.0 Error: SMTP protocol synchronization"])
        self.assertTrue(t.disconnecting)
        proto.connectionLost(None)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_client_leaving_during_the_pause(self):
        f = self.factory([GreetPause(self.clock, 5)])
        proto, t = self.connect(f)
        self.leave(proto, t)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(t.value(), b"")

    def test_no_pause_on_submission_or_for_trusted(self):
        f = self.factory([GreetPause(self.clock, 5)], listener="submission")
        proto, t = self.connect(f)
        self.assertEqual(self.lines(t)[0][:4], "220 ")
        f = self.factory([GreetPause(self.clock, 5)], relay_networks=("192.0.2.0/24",))
        proto, t = self.connect(f)
        self.assertEqual(self.lines(t)[0][:4], "220 ")

    def test_concurrent_connections(self):
        count = ConnectionCount(limit=2)
        f = self.factory([count])
        a = self.connect(f)
        b = self.connect(f)
        c = self.connect(f)
        self.assertEqual(self.lines(c[1]),
                         ["421 4.7.0 Error: too many connections from 192.0.2.1"])
        self.assertTrue(c[1].disconnecting)
        c[0].connectionLost(None)
        self.assertEqual(count.open_connections("192.0.2.1"), 2)
        self.leave(*a)
        self.assertEqual(count.open_connections("192.0.2.1"), 1)
        d = self.connect(f)
        self.assertEqual(self.lines(d[1])[0][:4], "220 ")
        for p in (b, d):
            self.leave(*p)
        self.assertEqual(count.open_connections("192.0.2.1"), 0)

    def test_connection_refused_by_a_later_check_is_released(self):
        count = ConnectionCount(limit=1)
        f = self.factory([count, _Refuse()])
        for _ in range(3):
            proto, t = self.connect(f)
            self.assertEqual(self.lines(t), ["554 5.7.1 Go away"])
            self.assertEqual(count.open_connections("192.0.2.1"), 1)
            proto.connectionLost(None)
            self.assertEqual(count.open_connections("192.0.2.1"), 0)

    def test_connection_rate(self):
        f = self.factory([ConnectionRate(self.clock, 2, 60)])
        for _ in range(2):
            self.assertEqual(self.lines(self.connect(f)[1])[0][:4], "220 ")
        proto, t = self.connect(f)
        self.assertEqual(self.lines(t), ["421 4.7.0 Error: too many connections from 192.0.2.1"])
        self.assertTrue(t.disconnecting)

    def test_bad_recipients_are_slowed_then_cut(self):
        throttle = BadRecipientThrottle(self.clock, throttle=2, limit=4)
        f = self.factory([throttle])
        proto, t = self.connect(f)
        proto.dataReceived(b"EHLO bot.example.org\r\nMAIL FROM:<a@example.org>\r\n")
        self.lines(t)
        unknown = "550 5.1.1 <nobody@example.test>: Recipient address rejected: User unknown"
        for _ in range(2):
            proto.dataReceived(b"RCPT TO:<nobody@example.test>\r\n")
            self.assertEqual(self.lines(t), [unknown])
        # Pipelined: each is answered a second after the one before it.
        proto.dataReceived(b"RCPT TO:<nobody@example.test>\r\nRCPT TO:<alice@example.test>\r\n"
                           b"RCPT TO:<nobody@example.test>\r\nRCPT TO:<x@example.test>\r\n")
        self.assertEqual(t.value(), b"")
        self.clock.advance(1)
        self.assertEqual(self.lines(t), [unknown])
        self.clock.advance(1)
        self.assertEqual(self.lines(t), ["250 2.1.5 Ok"])
        # The fourth refusal reaches the limit: the next RCPT ends the session.
        self.clock.advance(1)
        self.assertEqual(self.lines(t), [unknown, "421 4.7.0 Error: too many bad recipients"])
        self.assertEqual(throttle.refused(proto.session), 4)
        self.assertTrue(t.disconnecting)
        proto.connectionLost(None)
        self.assertEqual(throttle.refused(proto.session), 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_syntax_errors_are_not_bad_recipients(self):
        throttle = BadRecipientThrottle(self.clock, throttle=1, limit=2)
        f = self.factory([throttle])
        proto, t = self.connect(f)
        proto.dataReceived(b"EHLO c.example.org\r\nMAIL FROM:<a@example.org>\r\n")
        proto.dataReceived(b"RCPT TO:<bad address>\r\n" * 3)
        self.assertEqual(throttle.refused(proto.session), 0)
        self.leave(proto, t)

    def test_leaving_during_a_delay(self):
        throttle = BadRecipientThrottle(self.clock, throttle=1, limit=5)
        f = self.factory([throttle])
        proto, t = self.connect(f)
        proto.dataReceived(b"EHLO c.example.org\r\nMAIL FROM:<a@example.org>\r\n"
                           b"RCPT TO:<nobody@example.test>\r\nRCPT TO:<alice@example.test>\r\n")
        self.leave(proto, t)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class SharedLimitTests(ApplianceMixin, unittest.TestCase):
    """One ConnectionCount object guards the MX and the submission port together."""

    @defer.inlineCallbacks
    def setUp(self):
        yield self.start_appliance(extra=_INERT, listeners=("submission",))
        self.count = ConnectionCount(limit=2)
        self.app.policy.add(self.count, first=True)
        self.app.submission_policy.add(self.count, first=True)

    @defer.inlineCallbacks
    def wait_released(self, expected):
        for _ in range(200):
            if self.count.open_connections("127.0.0.1") == expected:
                return
            d = defer.Deferred()
            reactor.callLater(0.01, d.callback, None)
            yield d
        self.fail(f"still {self.count.open_connections('127.0.0.1')} connections")

    @defer.inlineCallbacks
    def test_third_connection_across_ports_is_refused(self):
        def two():
            a = RawClient(self.port)
            b = RawClient(self.ports["submission"])
            return a, b, a.code(), b.code()
        a, b, *codes = yield self.in_thread(two)
        self.assertEqual(codes, [220, 220])

        def third(port):
            c = RawClient(port)
            try:
                return c.reply(), c.closed()
            finally:
                c.close()
        for port in (self.port, self.ports["submission"]):
            reply, closed = yield self.in_thread(third, port)
            self.assertEqual(reply, (421, ["4.7.0 Error: too many connections from 127.0.0.1"]))
            self.assertTrue(closed)
        yield self.wait_released(2)
        a.close()
        yield self.wait_released(1)
        c = yield self.in_thread(RawClient, self.port)
        code = yield self.in_thread(c.code)
        self.assertEqual(code, 220)
        for client in (b, c):
            client.close()
        yield self.wait_released(0)
        self.assertEqual(self.queue_files(), [])


# The appliance's own door checks inert (whatever the configuration wires in):
# the tests add the objects they are about.
_INERT = """
[antispam.connection]
max_connections_per_ip = 100000
max_connection_rate = 1000000
bad_rcpt_throttle = 1000
bad_rcpt_limit = 1000
[antispam.helo]
reject_invalid = false
reject_our_name = false
[antispam.dns]
check_sender_mx = false
[antispam.spf]
enabled = false
[antispam.greylist]
enabled = false
"""
