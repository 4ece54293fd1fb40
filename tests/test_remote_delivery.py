"""The remote delivery agent end to end: a loopback DNS server, SMTP sinks, real sockets.

Each test serves a zone from tests/dns_helpers.py and runs one or more
scripted sinks (tests/sink_helpers.py) on 127.0.0.x, all on the port given
as ``[delivery] smtp_port``; addresses where no sink listens refuse
connections. Tests where a timeout matters give the agent a reactor whose
time is a Clock (real sockets, time advanced by the test).
"""

import os
import random

from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from mailbox_appliance import config, dns
from mailbox_appliance.delivery.remote import RemoteDelivery
from mailbox_appliance.delivery.result import (
    BOUNCED, DEFERRED, SENT, RecipientResult, RemoteRecipient)
from mailbox_appliance.interfaces import IRemoteDelivery
from mailbox_appliance.queue.spool import Envelope, QueuedMessage
from tests.dns_helpers import start_fake_dns
from tests.sink_helpers import ClockedReactor, server_tls, start_sinks

ZONE = {
    "ext.test": {"MX": [(10, "mx1.ext.test"), (20, "mx2.ext.test")]},
    "mx1.ext.test": {"A": ["127.0.0.2"]},
    "mx2.ext.test": {"A": ["127.0.0.3"]},
    "one.test": {"MX": [(10, "mx1.ext.test")]},
    "other.test": {"MX": [(10, "mx1.ext.test")]},
    "refused.test": {"MX": [(10, "dead.ext.test"), (20, "mx1.ext.test")]},
    "dead.ext.test": {"A": ["127.0.0.4"]},
    "dead2.ext.test": {"A": ["127.0.0.5"]},
    "down.test": {"MX": [(10, "dead.ext.test"), (20, "dead2.ext.test")]},
    "nullmx.test": {"MX": [(0, ".")]},
    "smart.test": {"A": ["127.0.0.2"]},
}

BODY = b"From: s@example.test\r\nSubject: hello\r\n\r\n.a line with a dot\r\nbye\r\n"


def message(qid="Q1", body=BODY, sender="s@example.test", **env):
    return QueuedMessage(qid, Envelope(sender, [], **env), "/nonexistent", 0, len(body),
                         data=body)


def rcpts(*addresses):
    return [RemoteRecipient(i, a) for i, a in enumerate(addresses)]


def wait(sink, predicate):
    return sink.when(predicate)


class RemoteTestBase(unittest.TestCase):

    @defer.inlineCallbacks
    def start(self, sinks=({},), delivery=None, clocked=False, zone=None, servfail=(),
              server=None):
        """Sinks on 127.0.0.2, .3, ... with the given scripts; the agent under test."""
        ips = [f"127.0.0.{i + 2}" for i in range(len(sinks))]
        self.port, self.sinks = start_sinks(self, ips, list(sinks))
        self.dns = yield start_fake_dns(self, zone or ZONE, servfail=servfail)
        settings = dict(smtp_port=self.port)
        settings.update(delivery or {})
        if "%d" in settings.get("smarthost", ""):
            settings["smarthost"] %= self.port
        self.config = config.Config(
            server=config.ServerConfig(hostname="me.example.test", **(server or {})),
            dns=config.DNSConfig(servers=(self.dns.server,), timeout=2),
            delivery=config.DeliveryConfig(**settings))
        self.reactor = ClockedReactor() if clocked else reactor
        # DNS answers on real time, whatever the agent's clock.
        resolver = dns.make_resolver(reactor, self.config)
        self.remote = RemoteDelivery(self.reactor, self.config, resolver=resolver,
                                     rng=random.Random(3))
        self.addCleanup(self.remote.close)
        return self.remote

    @defer.inlineCallbacks
    def until(self, predicate):
        """Let the real reactor run until ``predicate()`` holds."""
        while not predicate():
            yield task.deferLater(reactor, 0.005, lambda: None)

    def connected(self):
        """The agent holds a connection (the client side is up, not only the sink's)."""
        return self.until(lambda: self.remote._sessions)

    def all_commands(self, sink):
        return [line for c in sink.connections for line, _ in c.commands]


class ContractTests(RemoteTestBase):

    @defer.inlineCallbacks
    def test_provides_interface_and_delivers(self):
        remote = yield self.start()
        self.assertTrue(IRemoteDelivery.providedBy(remote))
        res = yield remote.deliver(message(), "one.test", rcpts("a@one.test", "b@one.test"))
        self.assertEqual(set(res), {0, 1})
        self.assertEqual(res[0], RecipientResult(SENT, "2.0.0", "250 2.0.0 Ok: queued",
                                                 "mx1.ext.test", True, False))
        sink = self.sinks[0]
        self.assertEqual(len(sink.delivered), 1)
        tx = sink.delivered[0]
        self.assertEqual((tx.sender, tx.accepted), ("s@example.test", ["a@one.test",
                                                                       "b@one.test"]))
        self.assertEqual(tx.data, BODY)
        self.assertIn(b"\r\n..a line with a dot\r\n", tx.raw)
        self.assertEqual(tx.mail_params, [f"SIZE={len(BODY)}"])

    @defer.inlineCallbacks
    def test_body_streamed_from_the_queue_file(self):
        remote = yield self.start()
        head = b"MAQ1\n{\"sender\":\"s@example.test\"}\n"
        body = b"Subject: big\r\n\r\n" + b"".join(b".%06d............................\r\n" % i
                                                 for i in range(20000))
        path = os.path.abspath(self.mktemp())
        with open(path, "wb") as f:
            f.write(head + body)
        msg = QueuedMessage("Q2", Envelope("s@example.test", []), path, len(head), len(body))
        res = yield remote.deliver(msg, "one.test", rcpts("a@one.test"))
        self.assertEqual(res[0].status, SENT)
        self.assertEqual(self.sinks[0].delivered[0].data, body)

    @defer.inlineCallbacks
    def test_never_fails(self):
        remote = yield self.start()
        remote._deliver = lambda *a: defer.fail(RuntimeError("boom"))
        res = yield remote.deliver(message(), "one.test", rcpts("a@one.test"))
        self.assertEqual((res[0].status, res[0].enhanced), (DEFERRED, "4.3.0"))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


class DNSOutcomeTests(RemoteTestBase):

    @defer.inlineCallbacks
    def test_nxdomain_bounces(self):
        remote = yield self.start()
        res = yield remote.deliver(message(), "nowhere.test", rcpts("a@nowhere.test"))
        self.assertEqual((res[0].status, res[0].enhanced), (BOUNCED, "5.1.2"))
        self.assertFalse(res[0].from_remote)
        self.assertEqual(self.sinks[0].connections, [])

    @defer.inlineCallbacks
    def test_null_mx_bounces_at_once(self):
        remote = yield self.start()
        res = yield remote.deliver(message(), "nullmx.test", rcpts("a@nullmx.test"))
        self.assertEqual((res[0].status, res[0].enhanced), (BOUNCED, "5.1.10"))

    @defer.inlineCallbacks
    def test_servfail_defers(self):
        remote = yield self.start(servfail={"broken.test"})
        res = yield remote.deliver(message(), "broken.test", rcpts("a@broken.test"))
        self.assertEqual((res[0].status, res[0].enhanced), (DEFERRED, "4.4.3"))
        # A DNS failure does not make the destination "dead": the next
        # message asks again.
        yield remote.deliver(message(), "broken.test", rcpts("a@broken.test"))
        self.assertEqual(self.dns.queries.count(("broken.test", "MX")), 2)

    @defer.inlineCallbacks
    def test_address_literal_domain(self):
        remote = yield self.start()
        res = yield remote.deliver(message(), "[127.0.0.2]", rcpts("a@[127.0.0.2]"))
        self.assertEqual(res[0].status, SENT)
        self.assertEqual(self.dns.queries, [])


class HostOrderTests(RemoteTestBase):

    @defer.inlineCallbacks
    def test_first_mx_refused_second_used(self):
        remote = yield self.start()
        res = yield remote.deliver(message(), "refused.test", rcpts("a@refused.test"))
        self.assertEqual((res[0].status, res[0].remote_mta), (SENT, "mx1.ext.test"))
        self.assertEqual(len(self.sinks[0].delivered), 1)

    @defer.inlineCallbacks
    def test_4xx_greeting_next_host(self):
        remote = yield self.start([{"greeting": "421 4.3.2 too busy"}, {}])
        res = yield remote.deliver(message(), "ext.test", rcpts("a@ext.test"))
        self.assertEqual((res[0].status, res[0].remote_mta), (SENT, "mx2.ext.test"))
        self.assertEqual(self.all_commands(self.sinks[0]), ["QUIT"])
        self.assertEqual(len(self.sinks[1].delivered), 1)

    @defer.inlineCallbacks
    def test_5xx_greeting_is_not_a_bounce(self):
        remote = yield self.start([{"greeting": "554 5.7.1 no"}, {"greeting": "554 5.7.1 no"}])
        res = yield remote.deliver(message(), "ext.test", rcpts("a@ext.test"))
        self.assertEqual(res[0].status, DEFERRED)
        self.assertEqual(res[0].enhanced, "4.7.1")
        self.assertEqual(res[0].reply, "554 5.7.1 no")
        self.assertEqual(res[0].remote_mta, "mx2.ext.test")
        self.assertTrue(res[0].from_remote)
        self.assertEqual(res[0].remote_mta, "mx2.ext.test")

    @defer.inlineCallbacks
    def test_mixed_recipients_deferred_ones_to_the_next_mx(self):
        remote = yield self.start([
            {"rcpt": {"b@ext.test": "450 4.2.1 try later", "c@ext.test": "550 5.1.1 unknown"}},
            {}])
        res = yield remote.deliver(message(), "ext.test",
                                   rcpts("a@ext.test", "b@ext.test", "c@ext.test"))
        self.assertEqual((res[0].status, res[0].remote_mta), (SENT, "mx1.ext.test"))
        self.assertEqual((res[1].status, res[1].remote_mta), (SENT, "mx2.ext.test"))
        self.assertEqual((res[2].status, res[2].enhanced, res[2].reply),
                         (BOUNCED, "5.1.1", "550 5.1.1 unknown"))
        self.assertEqual(self.sinks[1].delivered[0].accepted, ["b@ext.test"])

    @defer.inlineCallbacks
    def test_mixed_recipients_single_mx(self):
        remote = yield self.start([{"rcpt": {"b@one.test": "450 4.2.1 try later",
                                             "c@one.test": "550 5.1.1 unknown"}}])
        res = yield remote.deliver(message(), "one.test",
                                   rcpts("a@one.test", "b@one.test", "c@one.test"))
        self.assertEqual([res[i].status for i in range(3)], [SENT, DEFERRED, BOUNCED])
        self.assertEqual(res[1].reply, "450 4.2.1 try later")
        self.assertTrue(res[1].from_remote)

    @defer.inlineCallbacks
    def test_mail_5xx_bounces_4xx_tries_next(self):
        remote = yield self.start([{"mail": "550 5.7.1 sender refused"}])
        res = yield remote.deliver(message(), "one.test", rcpts("a@one.test", "b@one.test"))
        self.assertEqual({r.status for r in res.values()}, {BOUNCED})
        self.assertEqual(res[0].reply, "550 5.7.1 sender refused")
        remote = yield self.start([{"mail": "451 4.3.0 later"}, {}])
        res = yield remote.deliver(message(), "ext.test", rcpts("a@ext.test"))
        self.assertEqual((res[0].status, res[0].remote_mta), (SENT, "mx2.ext.test"))

    @defer.inlineCallbacks
    def test_452_split_on_one_connection(self):
        remote = yield self.start([{"max_rcpt": 2}])
        addresses = [f"r{i}@one.test" for i in range(5)]
        res = yield remote.deliver(message(), "one.test", rcpts(*addresses))
        self.assertEqual([res[i].status for i in range(5)], [SENT] * 5)
        sink = self.sinks[0]
        self.assertEqual(len(sink.connections), 1)
        self.assertEqual([t.accepted for t in sink.delivered],
                         [addresses[:2], addresses[2:4], addresses[4:]])

    @defer.inlineCallbacks
    def test_drop_after_dot_defers_and_is_not_resent_elsewhere(self):
        remote = yield self.start([{"close_after_dot": True}, {}])
        res = yield remote.deliver(message(), "ext.test", rcpts("a@ext.test"))
        self.assertEqual((res[0].status, res[0].enhanced), (DEFERRED, "4.4.2"))
        self.assertIn("after end of data", res[0].reply)
        # The data did arrive at the first host (a duplicate may follow on
        # the retry, RFC 1047); the second host saw nothing now.
        self.assertEqual(len(self.sinks[0].transactions), 1)
        self.assertEqual(self.sinks[1].connections, [])

    @defer.inlineCallbacks
    def test_reply_flood_is_a_failed_connection(self):
        for flood in ("lines", "long"):
            remote = yield self.start([{"flood": flood}])
            res = yield remote.deliver(message(), "one.test", rcpts("a@one.test"))
            self.assertEqual(res[0].status, DEFERRED, flood)
            self.assertEqual(self.sinks[0].transactions, [])
            yield wait(self.sinks[0], lambda s: all(c.closed for c in s.connections))


class TimeoutTests(RemoteTestBase):

    @defer.inlineCallbacks
    def test_no_greeting_times_out_then_next_host(self):
        remote = yield self.start([{"greeting": None}, {}], clocked=True)
        d = remote.deliver(message(), "ext.test", rcpts("a@ext.test"))
        yield self.connected()
        self.assertNoResult(d)
        self.reactor.clock.advance(299)
        self.assertNoResult(d)
        self.reactor.clock.advance(2)
        res = yield d
        self.assertEqual((res[0].status, res[0].remote_mta), (SENT, "mx2.ext.test"))
        yield wait(self.sinks[0], lambda s: s.connections[0].closed)

    @defer.inlineCallbacks
    def test_no_greeting_anywhere_defers(self):
        remote = yield self.start([{"greeting": None}], clocked=True)
        d = remote.deliver(message(), "one.test", rcpts("a@one.test"))
        yield self.connected()
        self.reactor.clock.advance(301)
        res = yield d
        self.assertEqual((res[0].status, res[0].enhanced), (DEFERRED, "4.4.2"))
        self.assertIn("before the greeting", res[0].reply)
        self.assertFalse(res[0].from_remote)

    @defer.inlineCallbacks
    def test_end_of_data_timeout(self):
        remote = yield self.start([{"hang": "eod"}], clocked=True)
        d = remote.deliver(message(), "one.test", rcpts("a@one.test"))
        yield wait(self.sinks[0], lambda s: s.transactions and s.transactions[0].data)
        yield wait(self.sinks[0], lambda s: s.protocols[0].mode == "command")
        self.reactor.clock.advance(599)
        self.assertNoResult(d)
        self.reactor.clock.advance(2)
        res = yield d
        self.assertEqual((res[0].status, res[0].enhanced), (DEFERRED, "4.4.2"))


class TLSTests(RemoteTestBase):

    def cert(self, hostname):
        folder = os.path.abspath(self.mktemp())
        os.makedirs(folder)
        return server_tls(folder, hostname)

    @defer.inlineCallbacks
    def test_opportunistic_tls(self):
        options, _ = self.cert("whatever.test")
        remote = yield self.start([{"starttls": options}])
        res = yield remote.deliver(message(), "one.test", rcpts("a@one.test"))
        self.assertEqual(res[0].status, SENT)
        conn = self.sinks[0].connections[0]
        self.assertEqual(conn.lines(tls=False), ["EHLO me.example.test", "STARTTLS"])
        self.assertEqual(conn.lines(tls=True)[0], "EHLO me.example.test")
        self.assertTrue(self.sinks[0].delivered[0].tls)

    @defer.inlineCallbacks
    def test_starttls_reply_injection_ignored(self):
        options, _ = self.cert("mx1.ext.test")
        remote = yield self.start([{
            "starttls": options,
            "starttls_reply": b"220 go\r\n250-evil\r\n250 AUTH PLAIN\r\n"}])
        res = yield remote.deliver(message(), "one.test", rcpts("a@one.test"))
        self.assertEqual(res[0].status, SENT)
        conn = self.sinks[0].connections[0]
        # Nothing after STARTTLS in plain text; inside TLS a fresh EHLO first.
        self.assertEqual(conn.lines(tls=False), ["EHLO me.example.test", "STARTTLS"])
        self.assertEqual(conn.lines(tls=True)[0], "EHLO me.example.test")
        self.assertFalse(any(l.startswith("AUTH") for l in conn.lines()))

    @defer.inlineCallbacks
    def test_tls_required_not_offered_defers_and_sends_nothing(self):
        remote = yield self.start([{}], delivery={"tls_policy": {"one.test": "encrypt"}})
        res = yield remote.deliver(message(), "one.test", rcpts("a@one.test"))
        self.assertEqual((res[0].status, res[0].enhanced), (DEFERRED, "4.7.4"))
        yield wait(self.sinks[0], lambda s: s.connections[0].closed)
        self.assertEqual(self.all_commands(self.sinks[0]), ["EHLO me.example.test", "QUIT"])
        self.assertEqual(self.sinks[0].transactions, [])

    @defer.inlineCallbacks
    def test_encrypt_accepts_any_certificate(self):
        options, _ = self.cert("wrong.test")
        remote = yield self.start([{"starttls": options}],
                                  delivery={"tls_policy": {"one.test": "encrypt"}})
        res = yield remote.deliver(message(), "one.test", rcpts("a@one.test"))
        self.assertEqual(res[0].status, SENT)
        self.assertTrue(self.sinks[0].delivered[0].tls)

    @defer.inlineCallbacks
    def test_verify_wrong_name_defers(self):
        options, cert_path = self.cert("wrong.test")
        remote = yield self.start([{"starttls": options}],
                                  delivery={"tls_policy": {"one.test": "verify"},
                                            "tls_ca_file": cert_path})
        res = yield remote.deliver(message(), "one.test", rcpts("a@one.test"))
        self.assertEqual((res[0].status, res[0].enhanced), (DEFERRED, "4.7.5"))
        # Never in plain text after that: one connection, no MAIL.
        self.assertEqual(len(self.sinks[0].connections), 1)
        self.assertEqual(self.sinks[0].transactions, [])
        self.assertFalse(any(l.startswith("MAIL") for l in self.all_commands(self.sinks[0])))

    @defer.inlineCallbacks
    def test_verify_untrusted_defers(self):
        # The right name, but no CA vouches for it (system CAs).
        options, _ = self.cert("mx1.ext.test")
        remote = yield self.start([{"starttls": options}],
                                  delivery={"tls_policy": {"one.test": "verify"}})
        res = yield remote.deliver(message(), "one.test", rcpts("a@one.test"))
        self.assertEqual((res[0].status, res[0].enhanced), (DEFERRED, "4.7.5"))
        self.assertEqual(self.sinks[0].transactions, [])

    @defer.inlineCallbacks
    def test_verify_right_name_delivers(self):
        options, cert_path = self.cert("mx1.ext.test")
        remote = yield self.start([{"starttls": options}],
                                  delivery={"tls_policy": {"one.test": "verify"},
                                            "tls_ca_file": cert_path})
        res = yield remote.deliver(message(), "one.test", rcpts("a@one.test"))
        self.assertEqual(res[0].status, SENT)
        self.assertTrue(self.sinks[0].delivered[0].tls)

    @defer.inlineCallbacks
    def test_opportunistic_tls_failure_falls_back_to_plain_text(self):
        options, _ = self.cert("mx1.ext.test")
        remote = yield self.start([{"starttls": options, "tls_broken": True}])
        res = yield remote.deliver(message(), "one.test", rcpts("a@one.test"))
        self.assertEqual(res[0].status, SENT)
        first, second = self.sinks[0].connections
        self.assertEqual(first.lines(), ["EHLO me.example.test", "STARTTLS"])
        self.assertNotIn("STARTTLS", second.lines())
        self.assertFalse(self.sinks[0].delivered[0].tls)

    @defer.inlineCallbacks
    def test_required_tls_failure_never_falls_back(self):
        options, _ = self.cert("mx1.ext.test")
        remote = yield self.start([{"starttls": options, "tls_broken": True}],
                                  delivery={"tls_policy": {"one.test": "encrypt"}})
        res = yield remote.deliver(message(), "one.test", rcpts("a@one.test"))
        self.assertEqual((res[0].status, res[0].enhanced), (DEFERRED, "4.7.5"))
        self.assertEqual(len(self.sinks[0].connections), 1)

    @defer.inlineCallbacks
    def test_policy_none_never_starttls(self):
        options, _ = self.cert("mx1.ext.test")
        remote = yield self.start([{"starttls": options}],
                                  delivery={"tls_policy": {"one.test": "none"}})
        res = yield remote.deliver(message(), "one.test", rcpts("a@one.test"))
        self.assertEqual(res[0].status, SENT)
        self.assertNotIn("STARTTLS", self.all_commands(self.sinks[0]))


class DSNTests(RemoteTestBase):

    @defer.inlineCallbacks
    def test_passed_on_when_advertised(self):
        remote = yield self.start([{"dsn": True}])
        msg = message(ret="HDRS", envid="ID+2B1")
        res = yield remote.deliver(msg, "one.test", [
            RemoteRecipient(0, "a@one.test", "SUCCESS,FAILURE", "rfc822;orig@example.test"),
            RemoteRecipient(1, "b@one.test", "NEVER")])
        tx = self.sinks[0].delivered[0]
        self.assertEqual(tx.mail_params, [f"SIZE={len(BODY)}", "RET=HDRS", "ENVID=ID+2B1"])
        self.assertEqual(tx.rcpt_params, {
            "a@one.test": ["NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;orig@example.test"],
            "b@one.test": ["NOTIFY=NEVER"]})
        self.assertTrue(res[0].dsn_passed_on)
        self.assertTrue(res[1].dsn_passed_on)

    @defer.inlineCallbacks
    def test_omitted_when_not_advertised(self):
        remote = yield self.start([{"dsn": False}])
        msg = message(ret="FULL", envid="ID1")
        res = yield remote.deliver(msg, "one.test", [
            RemoteRecipient(0, "a@one.test", "SUCCESS", "rfc822;orig@example.test")])
        tx = self.sinks[0].delivered[0]
        self.assertEqual(tx.mail_params, [f"SIZE={len(BODY)}"])
        self.assertEqual(tx.rcpt_params, {"a@one.test": []})
        self.assertFalse(res[0].dsn_passed_on)


class ConnectionReuseTests(RemoteTestBase):

    @defer.inlineCallbacks
    def test_two_messages_one_connection(self):
        remote = yield self.start()
        r1 = yield remote.deliver(message("Q1"), "one.test", rcpts("a@one.test"))
        # Another domain with the same MX host uses the same connection.
        r2 = yield remote.deliver(message("Q2"), "other.test", rcpts("b@other.test"))
        self.assertEqual([r1[0].status, r2[0].status], [SENT, SENT])
        sink = self.sinks[0]
        self.assertEqual(len(sink.connections), 1)
        self.assertEqual(len(sink.delivered), 2)
        self.assertEqual([l for l in sink.connections[0].lines() if l.startswith("EHLO")],
                         ["EHLO me.example.test"])

    @defer.inlineCallbacks
    def test_max_messages_per_connection(self):
        remote = yield self.start(delivery={"connection_max_messages": 1})
        for qid in ("Q1", "Q2"):
            yield remote.deliver(message(qid), "one.test", rcpts("a@one.test"))
        self.assertEqual(len(self.sinks[0].connections), 2)
        yield wait(self.sinks[0], lambda s: s.connections[0].closed)
        self.assertEqual(self.sinks[0].connections[0].lines()[-1], "QUIT")

    @defer.inlineCallbacks
    def test_idle_connection_closed_after_connection_idle(self):
        remote = yield self.start(delivery={"connection_idle": 5}, clocked=True)
        yield remote.deliver(message("Q1"), "one.test", rcpts("a@one.test"))
        self.reactor.clock.advance(4)
        self.assertFalse(self.sinks[0].connections[0].closed)
        self.reactor.clock.advance(2)
        yield wait(self.sinks[0], lambda s: s.connections[0].closed)
        self.assertEqual(self.sinks[0].connections[0].lines()[-1], "QUIT")
        yield remote.deliver(message("Q2"), "one.test", rcpts("a@one.test"))
        self.assertEqual(len(self.sinks[0].connections), 2)

    @defer.inlineCallbacks
    def test_connection_closed_by_the_server_while_idle(self):
        remote = yield self.start()
        yield remote.deliver(message("Q1"), "one.test", rcpts("a@one.test"))
        self.sinks[0].protocols[0].transport.loseConnection()
        yield wait(self.sinks[0], lambda s: s.connections[0].closed)
        res = yield remote.deliver(message("Q2"), "one.test", rcpts("a@one.test"))
        self.assertEqual(res[0].status, SENT)
        self.assertEqual(len(self.sinks[0].connections), 2)


class LimitTests(RemoteTestBase):

    @defer.inlineCallbacks
    def test_per_domain_limit(self):
        remote = yield self.start([{"hold": "eod"}], delivery={"max_per_domain": 1})
        sink = self.sinks[0]
        d1 = remote.deliver(message("Q1"), "one.test", rcpts("a@one.test"))
        d2 = remote.deliver(message("Q2"), "one.test", rcpts("b@one.test"))
        yield wait(sink, lambda s: len(s.held) == 1)
        # Another domain is not held up by one.test's limit.
        d3 = remote.deliver(message("Q3"), "other.test", rcpts("c@other.test"))
        yield wait(sink, lambda s: len(s.held) == 2)
        self.assertEqual(len(sink.connections), 2)
        self.assertEqual(sorted(t.accepted[0] for t in sink.transactions),
                         ["a@one.test", "c@other.test"])
        self.assertNoResult(d2)
        sink.release()
        results = yield defer.gatherResults([d1, d2, d3])
        self.assertEqual([r[0].status for r in results], [SENT] * 3)
        # The second one.test message reused a connection.
        self.assertEqual(len(sink.connections), 2)

    @defer.inlineCallbacks
    def test_total_connection_limit(self):
        remote = yield self.start([{"hold": "eod"}], delivery={"max_connections": 1})
        sink = self.sinks[0]
        d1 = remote.deliver(message("Q1"), "one.test", rcpts("a@one.test"))
        d2 = remote.deliver(message("Q2"), "other.test", rcpts("b@other.test"))
        yield wait(sink, lambda s: len(s.held) == 1)
        self.assertEqual(len(sink.connections), 1)
        self.assertNoResult(d2)
        sink.release()
        results = yield defer.gatherResults([d1, d2])
        self.assertEqual([r[0].status for r in results], [SENT, SENT])
        self.assertEqual(sink.max_open, 1)


class CloseTests(RemoteTestBase):

    @defer.inlineCallbacks
    def test_close_ends_deliveries_in_progress_and_waiting(self):
        remote = yield self.start([{"hold": "eod"}], delivery={"max_per_domain": 1})
        d1 = remote.deliver(message("Q1"), "one.test", rcpts("a@one.test"))
        d2 = remote.deliver(message("Q2"), "one.test", rcpts("b@one.test"))
        yield wait(self.sinks[0], lambda s: len(s.held) == 1)
        yield remote.close()
        r1, r2 = yield defer.gatherResults([d1, d2])
        self.assertEqual(r1[0].status, DEFERRED)
        self.assertEqual((r2[0].status, r2[0].enhanced), (DEFERRED, "4.3.2"))
        r3 = yield remote.deliver(message("Q3"), "one.test", rcpts("c@one.test"))
        self.assertEqual(r3[0].status, DEFERRED)
        self.assertEqual(len(self.sinks[0].connections), 1)


class DeadDestinationTests(RemoteTestBase):

    @defer.inlineCallbacks
    def test_dead_destination_deferred_at_once_until_flush(self):
        remote = yield self.start(delivery={"dead_destination_time": "60s"})
        res = yield remote.deliver(message(), "down.test", rcpts("a@down.test"))
        self.assertEqual((res[0].status, res[0].enhanced), (DEFERRED, "4.4.1"))
        self.assertIn("Connection refused", res[0].reply)
        queries = len(self.dns.queries)
        # A thousand more: no DNS, no connection, the same reason.
        for i in range(1000):
            again = yield remote.deliver(message(f"Q{i}"), "down.test", rcpts("a@down.test"))
            self.assertEqual(again[0], res[0])
        self.assertEqual(len(self.dns.queries), queries)
        # Other domains are not affected.
        ok = yield remote.deliver(message(), "one.test", rcpts("a@one.test"))
        self.assertEqual(ok[0].status, SENT)
        remote.flush("down.test")
        yield remote.deliver(message(), "down.test", rcpts("a@down.test"))
        self.assertGreater(self.dns.queries.count(("down.test", "MX")), 1)

    @defer.inlineCallbacks
    def test_dead_destination_expires(self):
        remote = yield self.start(delivery={"dead_destination_time": "60s"}, clocked=True)
        yield remote.deliver(message(), "down.test", rcpts("a@down.test"))
        self.reactor.clock.advance(59)
        yield remote.deliver(message(), "down.test", rcpts("a@down.test"))
        self.assertEqual(self.dns.queries.count(("down.test", "MX")), 1)
        self.reactor.clock.advance(2)
        yield remote.deliver(message(), "down.test", rcpts("a@down.test"))
        self.assertEqual(self.dns.queries.count(("down.test", "MX")), 2)

    @defer.inlineCallbacks
    def test_flush_all(self):
        remote = yield self.start()
        yield remote.deliver(message(), "down.test", rcpts("a@down.test"))
        remote.flush()
        yield remote.deliver(message(), "down.test", rcpts("a@down.test"))
        self.assertEqual(self.dns.queries.count(("down.test", "MX")), 2)

    @defer.inlineCallbacks
    def test_host_that_talked_is_not_dead(self):
        remote = yield self.start([{"rcpt_default": "450 4.2.0 later"}])
        yield remote.deliver(message(), "one.test", rcpts("a@one.test"))
        yield remote.deliver(message(), "one.test", rcpts("a@one.test"))
        self.assertEqual(self.sinks[0].delivered, [])
        self.assertEqual(sum(1 for c in self.sinks[0].connections
                             for l in c.lines() if l.startswith("RCPT")), 2)


class SmarthostTests(RemoteTestBase):

    def cert(self, hostname):
        folder = os.path.abspath(self.mktemp())
        os.makedirs(folder)
        return server_tls(folder, hostname)

    def smarthost(self, script, **delivery):
        delivery.setdefault("smarthost", "[127.0.0.2]:%d")     # %d: the sink's port
        return self.start([script], delivery=delivery)

    @defer.inlineCallbacks
    def test_auth_plain_inside_tls(self):
        options, _ = self.cert("smart.test")
        remote = yield self.smarthost(
            {"starttls": options, "auth": {"relay": "s3cret"}, "auth_before_tls": True},
            smarthost_user="relay", smarthost_password="s3cret",
            tls_policy={"127.0.0.2": "encrypt"})
        res = yield remote.deliver(message(), "anywhere.test", rcpts("x@anywhere.test"))
        self.assertEqual(res[0].status, SENT)
        conn = self.sinks[0].connections[0]
        self.assertEqual(conn.auth_user, "relay")
        self.assertEqual(conn.lines(tls=False), ["EHLO me.example.test", "STARTTLS"])
        self.assertTrue(any(l.startswith("AUTH PLAIN ") for l in conn.lines(tls=True)))
        # All mail goes there: no MX lookup at all.
        self.assertEqual(self.dns.queries, [])

    @defer.inlineCallbacks
    def test_no_starttls_no_credentials(self):
        remote = yield self.smarthost(
            {"auth": {"relay": "s3cret"}, "auth_before_tls": True},
            smarthost_user="relay", smarthost_password="s3cret",
            tls_policy={"127.0.0.2": "may"})
        res = yield remote.deliver(message(), "anywhere.test", rcpts("x@anywhere.test"))
        self.assertEqual((res[0].status, res[0].enhanced), (DEFERRED, "4.7.4"))
        lines = self.all_commands(self.sinks[0])
        self.assertFalse(any(l.startswith("AUTH") for l in lines))
        self.assertFalse(any(l.startswith("MAIL") for l in lines))

    @defer.inlineCallbacks
    def test_credentials_need_a_verified_server_by_default(self):
        options, _ = self.cert("smart.test")
        remote = yield self.smarthost(
            {"starttls": options, "auth": {"relay": "s3cret"}},
            smarthost_user="relay", smarthost_password="s3cret")
        res = yield remote.deliver(message(), "anywhere.test", rcpts("x@anywhere.test"))
        self.assertEqual((res[0].status, res[0].enhanced), (DEFERRED, "4.7.5"))
        self.assertFalse(any(l.startswith("AUTH") for l in self.all_commands(self.sinks[0])))

    @defer.inlineCallbacks
    def test_smarthost_by_name_uses_its_address_not_mx(self):
        remote = yield self.smarthost({}, smarthost="smart.test:%d")
        res = yield remote.deliver(message(), "anywhere.test", rcpts("x@anywhere.test"))
        self.assertEqual((res[0].status, res[0].remote_mta), (SENT, "smart.test"))
        self.assertNotIn("MX", {t for _, t in self.dns.queries})

    @defer.inlineCallbacks
    def test_smarthost_unknown_name_defers(self):
        remote = yield self.smarthost({}, smarthost="nosuch.test:%d")
        res = yield remote.deliver(message(), "anywhere.test", rcpts("x@anywhere.test"))
        self.assertEqual(res[0].status, DEFERRED)

    @defer.inlineCallbacks
    def test_dead_smarthost_covers_every_domain_until_flush(self):
        remote = yield self.smarthost({}, smarthost="[127.0.0.9]:%d")
        res = yield remote.deliver(message(), "a.test", rcpts("x@a.test"))
        self.assertEqual((res[0].status, res[0].enhanced), (DEFERRED, "4.4.1"))
        res2 = yield remote.deliver(message(), "b.test", rcpts("x@b.test"))
        self.assertEqual(res2[0], res[0])
        self.assertEqual(list(remote._dead), ["[smarthost]"])
        # Flushing any domain wakes the smarthost up for all.
        remote.flush("b.test")
        self.assertEqual(remote._dead, {})
        res3 = yield remote.deliver(message(), "c.test", rcpts("x@c.test"))
        self.assertEqual(res3[0].enhanced, "4.4.1")
        self.assertIn("Connection refused", res3[0].reply)
