"""The SPF check (RFC 7208) against a loopback DNS server.

pyspf resolves through dnspython in the reactor's thread pool, asking the
fake DNS of ``tests/dns_helpers.py``; the deadline runs on a Clock
(``ClockedReactor``), so timeouts are advanced by the tests, never waited for.
"""

import socket
import threading

from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from mailbox_appliance import config as config_module
from mailbox_appliance.antispam import spf
from mailbox_appliance.antispam.spf import SPFCheck
from mailbox_appliance.smtp.address import Path
from mailbox_appliance.smtp.policy import Verdict
from mailbox_appliance.smtp.session import SessionState
from tests.dns_helpers import start_fake_dns
from tests.sink_helpers import ClockedReactor
from tests.smtp_helpers import ApplianceMixin, RawClient

CLIENT = "192.0.2.1"
RECEIVER = "mail.example.test"

ZONE = {
    "pass.test": {"TXT": ["v=spf1 ip4:192.0.2.0/24 -all"], "A": ["198.51.100.9"]},
    "fail.test": {"TXT": ["v=spf1 ip4:198.51.100.1 -all"]},
    "exp.test": {"TXT": ["v=spf1 -all exp=why.exp.test"]},
    "why.exp.test": {"TXT": ["%{i} is not one of %{d}'s hosts\r\n250 OK\x00"]},
    "soft.test": {"TXT": ["v=spf1 ip4:198.51.100.1 ~all"]},
    "neutral.test": {"TXT": ["v=spf1 ?all"]},
    "nospf.test": {"TXT": ["some other text record"], "A": ["198.51.100.2"]},
    "syntax.test": {"TXT": ["v=spf1 moo -all"]},
    "quote.test": {"TXT": ['v=spf1 x(y)"\\z -all']},
    "two.test": {"TXT": ["v=spf1 -all", "v=spf1 +all"]},
    # Lookup limits (RFC 7208 4.6.4).
    "many.test": {"TXT": ["v=spf1 " + " ".join(f"include:i{n}.many.test" for n in range(1, 12))
                          + " -all"]},
    "ten.test": {"TXT": ["v=spf1 " + " ".join(f"include:i{n}.many.test" for n in range(1, 10))
                         + " ip4:192.0.2.1 -all"]},
    "loop.test": {"TXT": ["v=spf1 include:loop.test -all"]},
    "loopa.test": {"TXT": ["v=spf1 include:loopb.test -all"]},
    "loopb.test": {"TXT": ["v=spf1 include:loopa.test -all"]},
    "void3.test": {"TXT": ["v=spf1 a:v1.void.test a:v2.void.test a:v3.void.test -all"]},
    "void2.test": {"TXT": ["v=spf1 a:v1.void.test a:v2.void.test -all"]},
    "mx20.test": {"TXT": ["v=spf1 mx -all"],
                  "MX": [(n, f"mx{n}.mx20.test") for n in range(20)]},
    "mx2.test": {"TXT": ["v=spf1 mx -all"], "MX": [(10, "mx.mx2.test")]},
    "mx.mx2.test": {"A": [CLIENT]},
    # The HELO identity of a null sender.
    "mta.helo.test": {"TXT": ["v=spf1 ip4:192.0.2.1 -all"]},
    "bad.helo.test": {"TXT": ["v=spf1 -all"]},
    "broken-include.test": {"TXT": ["v=spf1 include:broken.test -all"]},
}
for _n in range(1, 12):
    ZONE[f"i{_n}.many.test"] = {"TXT": ["v=spf1 ip4:198.51.100.1 -all"]}
for _n in range(20):
    ZONE[f"mx{_n}.mx20.test"] = {"A": ["198.51.100.3"]}

SERVFAIL = {"broken.test"}


def sender(address):
    if address == "":
        return Path(null=True)
    local, _, domain = address.rpartition("@")
    return Path(local=local, domain=domain)


def settle():
    return task.deferLater(reactor, 0.01, lambda: None)


@defer.inlineCallbacks
def until(predicate):
    """Let the real reactor run until ``predicate()`` (threads, loopback answers)."""
    for _ in range(500):
        if predicate():
            return
        yield settle()
    raise AssertionError("condition never met")


class SPFTestBase(unittest.TestCase):
    """A fake DNS, an SPF check asking it, a Clock for the deadline."""

    held = ()

    @defer.inlineCallbacks
    def setUp(self):
        self.fake = yield start_fake_dns(self, ZONE, servfail=SERVFAIL, held=self.held)
        self.reactor = ClockedReactor()
        self.spf = self.make_check()

    def make_check(self, **kw):
        host, _, port = self.fake.server.partition(":")
        kw.setdefault("timeout", 10)
        return SPFCheck(self.reactor, [(host, int(port))], receiver=RECEIVER, **kw)

    def session(self, **kw):
        kw.setdefault("client_ip", CLIENT)
        kw.setdefault("helo", "client.example")
        return SessionState(**kw)

    @defer.inlineCallbacks
    def mail(self, address, check=None, **kw):
        """(verdict or None, session) of MAIL FROM:<address>."""
        s = self.session(**kw)
        result = (check or self.spf).check("mail", s, sender(address))
        if isinstance(result, defer.Deferred):
            result = yield result
        return result, s

    def assertAccepted(self, verdict, session, result):
        self.assertIsNone(verdict)
        self.assertEqual(session.spf_result, result)
        self.assertEqual([h.split(":")[0] for h in session.trace_headers],
                         ["Received-SPF", "Authentication-Results"])
        self.assertTrue(session.trace_headers[0].startswith(f"Received-SPF: {result} ("))
        self.assertIn(f"; spf={result} ", session.trace_headers[1])

    def assertRefused(self, verdict, session, code, enhanced, text=None):
        self.assertIsInstance(verdict, Verdict)
        self.assertEqual((verdict.code, verdict.enhanced), (code, enhanced))
        if text is not None:
            self.assertEqual(verdict.text, text)
        self.assertEqual(session.trace_headers, [])


class ResultTests(SPFTestBase):

    @defer.inlineCallbacks
    def test_pass_and_its_headers(self):
        verdict, s = yield self.mail("user@pass.test")
        self.assertAccepted(verdict, s, "pass")
        self.assertEqual(s.trace_headers, [
            "Received-SPF: pass (mail.example.test: domain of user@pass.test designates "
            "192.0.2.1 as permitted sender)\r\n"
            '\tclient-ip=192.0.2.1; envelope-from="user@pass.test"; helo=client.example; '
            "receiver=mail.example.test; identity=mailfrom\r\n",
            "Authentication-Results: mail.example.test; spf=pass "
            "smtp.mailfrom=user@pass.test\r\n"])

    @defer.inlineCallbacks
    def test_fail_rejected(self):
        verdict, s = yield self.mail("user@fail.test")
        self.assertRefused(verdict, s, 550, "5.7.23",
                           "<user@fail.test>: SPF fail: 192.0.2.1 is not allowed to send "
                           "mail for fail.test")
        self.assertEqual(s.spf_result, "fail")

    @defer.inlineCallbacks
    def test_fail_explanation_of_the_domain_sanitised(self):
        verdict, s = yield self.mail("user@exp.test")
        # exp= text with macros expanded; its CR LF NUL cannot start a reply line.
        self.assertRefused(verdict, s, 550, "5.7.23",
                           "<user@exp.test>: SPF fail: 192.0.2.1 is not one of exp.test's "
                           "hosts 250 OK")

    @defer.inlineCallbacks
    def test_fail_tagged(self):
        verdict, s = yield self.mail("user@fail.test", check=self.make_check(fail="tag"))
        self.assertAccepted(verdict, s, "fail")
        self.assertEqual(s.trace_headers[0],
                         "Received-SPF: fail (mail.example.test: domain of user@fail.test does "
                         "not designate 192.0.2.1 as permitted sender)\r\n"
                         '\tclient-ip=192.0.2.1; envelope-from="user@fail.test"; '
                         "helo=client.example; receiver=mail.example.test; "
                         "identity=mailfrom\r\n")

    @defer.inlineCallbacks
    def test_softfail_accepted(self):
        verdict, s = yield self.mail("user@soft.test")
        self.assertAccepted(verdict, s, "softfail")
        self.assertIn("domain of transitioning user@soft.test does not designate",
                      s.trace_headers[0])

    @defer.inlineCallbacks
    def test_neutral_accepted(self):
        verdict, s = yield self.mail("user@neutral.test")
        self.assertAccepted(verdict, s, "neutral")

    @defer.inlineCallbacks
    def test_none_without_a_record(self):
        for address in ("user@nospf.test", "user@nxdomain.test"):
            verdict, s = yield self.mail(address)
            self.assertAccepted(verdict, s, "none")
            self.assertIn(f"domain of {address} does not provide an SPF record",
                          s.trace_headers[0])

    @defer.inlineCallbacks
    def test_none_without_asking_for_literals_and_single_labels(self):
        for address in ("user@[192.0.2.9]", "user@localhost"):
            verdict, s = yield self.mail(address)
            self.assertAccepted(verdict, s, "none")
        self.assertEqual(self.fake.queries, [])

    @defer.inlineCallbacks
    def test_servfail_is_temperror_451(self):
        for address in ("user@broken.test", "user@broken-include.test"):
            verdict, s = yield self.mail(address)
            self.assertRefused(verdict, s, 451, "4.7.24", "SPF temporary error, try again")
            self.assertEqual(s.spf_result, "temperror")

    @defer.inlineCallbacks
    def test_servfail_never_5xx_even_in_reject_modes(self):
        check = self.make_check(fail="reject", permerror="reject")
        verdict, s = yield self.mail("user@broken.test", check=check)
        self.assertEqual(verdict.code, 451)

    @defer.inlineCallbacks
    def test_mx_mechanism_passes(self):
        verdict, s = yield self.mail("user@mx2.test")
        self.assertAccepted(verdict, s, "pass")

    @defer.inlineCallbacks
    def test_ipv4_mapped_client_is_ipv4(self):
        verdict, s = yield self.mail("user@pass.test", client_ip="::ffff:192.0.2.1")
        self.assertAccepted(verdict, s, "pass")
        self.assertIn("client-ip=192.0.2.1;", s.trace_headers[0])

    @defer.inlineCallbacks
    def test_ipv6_client_quoted_in_header(self):
        verdict, s = yield self.mail("user@fail.test", client_ip="2001:db8::1",
                                    check=self.make_check(fail="tag"))
        self.assertAccepted(verdict, s, "fail")
        self.assertIn('client-ip="2001:db8::1";', s.trace_headers[0])


class PermErrorTests(SPFTestBase):

    @defer.inlineCallbacks
    def assertPermerror(self, address, problem):
        verdict, s = yield self.mail(address)
        self.assertAccepted(verdict, s, "permerror")
        self.assertIn(problem, s.trace_headers[0])
        self.assertIn("problem=", s.trace_headers[0])
        verdict, s = yield self.mail(address, check=self.make_check(permerror="reject"))
        self.assertRefused(verdict, s, 550, "5.7.24")
        self.assertTrue(verdict.text.startswith("SPF permanent error: "), verdict.text)
        self.assertIn(problem, verdict.text)
        self.assertEqual(s.spf_result, "permerror")
        return verdict

    def test_eleven_includes(self):
        return self.assertPermerror("user@many.test", "Too many DNS lookups")

    @defer.inlineCallbacks
    def test_ten_terms_are_allowed(self):
        verdict, s = yield self.mail("user@ten.test")
        self.assertAccepted(verdict, s, "pass")

    def test_self_include(self):
        return self.assertPermerror("user@loop.test", "include has trivial recursion")

    def test_include_loop(self):
        return self.assertPermerror("user@loopa.test", "Too many DNS lookups")

    def test_three_void_lookups(self):
        return self.assertPermerror("user@void3.test", "Void lookup limit of 2 exceeded")

    @defer.inlineCallbacks
    def test_two_void_lookups_are_allowed(self):
        verdict, s = yield self.mail("user@void2.test", check=self.make_check(fail="tag"))
        self.assertAccepted(verdict, s, "fail")

    @defer.inlineCallbacks
    def test_mx_with_twenty_hosts(self):
        yield self.assertPermerror("user@mx20.test", "More than 10 MX records returned")
        # No host of the 20 was looked up.
        self.assertFalse([q for q in self.fake.queries if q[0].endswith(".mx20.test")])

    def test_syntax_error(self):
        return self.assertPermerror("user@syntax.test", "Unknown mechanism found: moo")

    @defer.inlineCallbacks
    def test_problem_text_cannot_break_the_header(self):
        verdict, s = yield self.mail("user@quote.test")
        self.assertEqual(s.trace_headers[0],
                         "Received-SPF: permerror (mail.example.test: permanent error in "
                         "processing domain of user@quote.test: Unknown mechanism found: "
                         'xy"z)\r\n'
                         '\tclient-ip=192.0.2.1; envelope-from="user@quote.test"; '
                         "helo=client.example; receiver=mail.example.test; identity=mailfrom; "
                         'problem="Unknown mechanism found: x(y)\\"\\\\z"\r\n')

    def test_two_records(self):
        return self.assertPermerror("user@two.test", "Two or more type TXT spf records")


class NullSenderTests(SPFTestBase):

    @defer.inlineCallbacks
    def test_helo_identity_checked(self):
        verdict, s = yield self.mail("", helo="mta.helo.test")
        self.assertAccepted(verdict, s, "pass")
        self.assertEqual(s.trace_headers, [
            "Received-SPF: pass (mail.example.test: domain of postmaster@mta.helo.test "
            "designates 192.0.2.1 as permitted sender)\r\n"
            '\tclient-ip=192.0.2.1; envelope-from=""; helo=mta.helo.test; '
            "receiver=mail.example.test; identity=helo\r\n",
            "Authentication-Results: mail.example.test; spf=pass smtp.helo=mta.helo.test\r\n"])
        self.assertIn(("mta.helo.test", "TXT"), self.fake.queries)

    @defer.inlineCallbacks
    def test_helo_identity_fails(self):
        verdict, s = yield self.mail("", helo="bad.helo.test")
        self.assertRefused(verdict, s, 550, "5.7.23",
                           "<postmaster@bad.helo.test>: SPF fail: 192.0.2.1 is not allowed to "
                           "send mail for bad.helo.test")

    @defer.inlineCallbacks
    def test_helo_that_is_no_name_is_none(self):
        for helo in ("[192.0.2.1]", "localhost", ""):
            verdict, s = yield self.mail("", helo=helo)
            self.assertAccepted(verdict, s, "none")
        self.assertEqual(self.fake.queries, [])


class SkipTests(SPFTestBase):

    def test_not_checked(self):
        for kw in ({"trusted": True}, {"authenticated": "alice"},
                   {"listener": "submission"}, {"listener": "lmtp"}):
            s = self.session(**kw)
            self.assertIsNone(self.spf.check("mail", s, sender("user@fail.test")), kw)
            self.assertEqual(s.trace_headers, [])
        self.assertEqual(self.fake.queries, [])

    def test_client_without_ip_address(self):
        s = self.session(client_ip="unix-socket")
        self.assertIsNone(self.spf.check("mail", s, sender("user@fail.test")))
        self.assertEqual(self.fake.queries, [])

    def test_checks_factory(self):
        cfg = config_module.Config(dns=config_module.DNSConfig(servers=("127.0.0.1:5353",
                                                                        "[::1]:53")))
        [check] = spf.checks(cfg, self.reactor, None)
        self.assertEqual(check.lookups.servers, (("127.0.0.1", 5353), ("::1", 53)))
        self.assertEqual(check.timeout, 10)
        self.assertEqual(check.receiver, cfg.server.hostname)
        self.assertEqual((check.reject_fail, check.reject_permerror), (True, False))
        self.assertEqual(check.stages, frozenset({"mail"}))
        off = config_module.Config(antispam=config_module.AntispamConfig(
            spf=config_module.SPFCheckConfig(enabled=False)))
        self.assertEqual(spf.checks(off, self.reactor, None), [])

    def test_lookups_never_reach_another_resolver(self):
        """The hook sends a check's lookups to its own servers, not pyspf's default."""
        spf.install_dns_hook()
        self.assertIs(spf.pyspf.DNSLookup, spf._dispatch)
        # Installing again (a second Appliance) keeps the dispatcher.
        spf.install_dns_hook()
        self.assertIsNot(spf._original_lookup, spf._dispatch)


class CacheTests(SPFTestBase):
    """Outcomes and DNS answers are reused while the answers live."""

    def counted(self):
        evaluations = []
        run = self.spf._run_in_thread

        def counting(f, *args):
            evaluations.append(args[1:3])
            return run(f, *args)
        self.spf._run_in_thread = counting
        return evaluations

    @defer.inlineCallbacks
    def test_outcome_reused_until_its_shortest_ttl(self):
        evaluations = self.counted()
        first, s1 = yield self.mail("user@pass.test")
        asked = len(self.fake.queries)
        again, s2 = yield self.mail("user@pass.test")
        self.assertAccepted(again, s2, "pass")
        self.assertEqual(s2.trace_headers, s1.trace_headers)
        self.assertEqual(len(evaluations), 1)
        self.assertEqual(len(self.fake.queries), asked)
        # The zone's TTL is 60 s: the outcome is kept no longer.
        self.reactor.clock.advance(61)
        verdict, s3 = yield self.mail("user@pass.test")
        self.assertAccepted(verdict, s3, "pass")
        self.assertEqual(len(evaluations), 2)

    @defer.inlineCallbacks
    def test_other_sender_client_or_helo_evaluated_apart(self):
        evaluations = self.counted()
        yield self.mail("user@pass.test")
        yield self.mail("other@pass.test")
        yield self.mail("user@pass.test", helo="other.example")
        verdict, s = yield self.mail("user@pass.test", client_ip="198.51.100.77")
        self.assertRefused(verdict, s, 550, "5.7.23")
        self.assertEqual(len(evaluations), 4)
        # The record itself came from the DNS cache after the first time.
        self.assertEqual(self.fake.queries.count(("pass.test", "TXT")), 1)

    @defer.inlineCallbacks
    def test_temperror_never_kept(self):
        evaluations = self.counted()
        for _ in range(2):
            verdict, s = yield self.mail("user@broken-include.test")
            self.assertRefused(verdict, s, 451, "4.7.24")
        self.assertEqual(len(evaluations), 2)

    @defer.inlineCallbacks
    def test_negative_answers_kept_briefly(self):
        evaluations = self.counted()
        verdict, s = yield self.mail("user@void2.test")
        self.assertEqual(s.spf_result, "fail")
        expiry = max(e for e, _ in self.spf._outcomes.values())
        self.assertLessEqual(expiry - self.reactor.seconds(), spf.NEGATIVE_TTL)
        self.reactor.clock.advance(spf.NEGATIVE_TTL + 1)
        yield self.mail("user@void2.test")
        self.assertEqual(len(evaluations), 2)

    def test_dns_answers_kept_no_longer_than_our_limits(self):
        import time
        from types import SimpleNamespace
        from mailbox_appliance import dns as appliance_dns
        cache = spf._BoundedCache(10)
        far = time.time() + 86400
        cache.put(("a", 1, 1), SimpleNamespace(rrset=object(), expiration=far))
        cache.put(("b", 1, 1), SimpleNamespace(rrset=None, expiration=far))
        self.assertLessEqual(cache.data[("a", 1, 1)].value.expiration,
                             time.time() + appliance_dns.MAX_TTL)
        self.assertLessEqual(cache.data[("b", 1, 1)].value.expiration,
                             time.time() + spf.NEGATIVE_TTL)

    @defer.inlineCallbacks
    def test_cache_bounded(self):
        self.spf.max_outcomes = 2
        for local in ("a", "b", "c"):
            yield self.mail(f"{local}@pass.test")
        self.assertEqual(len(self.spf._outcomes), 2)


class OffTheReactorTests(SPFTestBase):
    """The evaluation runs in a thread; the reactor answers at the deadline."""

    held = {("pass.test", "TXT")}

    @defer.inlineCallbacks
    def test_returns_a_deferred_and_runs_in_a_thread(self):
        seen = []
        lookups = self.spf.lookups

        def recording(*args):
            seen.append(threading.current_thread())
            return lookups(*args)
        self.spf.lookups = recording
        s = self.session()
        d = self.spf.check("mail", s, sender("user@pass.test"))
        self.assertIsInstance(d, defer.Deferred)
        yield until(lambda: ("pass.test", "TXT") in self.fake.queries)
        self.assertFalse(d.called)          # the reactor runs while DNS is out
        self.fake.release()
        verdict = yield d
        self.assertAccepted(verdict, s, "pass")
        self.assertTrue(seen)
        self.assertNotIn(threading.main_thread(), seen)

    @defer.inlineCallbacks
    def test_deadline_is_temperror(self):
        s = self.session()
        d = self.spf.check("mail", s, sender("user@pass.test"))
        yield until(lambda: ("pass.test", "TXT") in self.fake.queries)
        self.reactor.clock.advance(9)
        self.assertFalse(d.called)
        self.reactor.clock.advance(1)
        verdict = yield d
        self.assertRefused(verdict, s, 451, "4.7.24", "SPF temporary error, try again")
        # The late answer changes nothing; the thread ends.
        self.fake.release()
        yield until(lambda: self.spf._slots.tokens == self.spf._slots.limit)
        self.assertEqual(s.trace_headers, [])

    @defer.inlineCallbacks
    def test_waiting_for_a_thread_counts_against_the_deadline(self):
        check = self.make_check(max_concurrent=1)
        first = check.check("mail", self.session(), sender("user@pass.test"))
        yield until(lambda: ("pass.test", "TXT") in self.fake.queries)
        s = self.session()
        second = check.check("mail", s, sender("user@fail.test"))
        self.assertFalse(second.called)
        self.reactor.clock.advance(10)
        verdicts = yield defer.gatherResults([first, second])
        self.assertEqual([v.code for v in verdicts], [451, 451])
        self.fake.release()
        yield until(lambda: check._slots.tokens == 1)
        # The queued check never ran: its domain was never asked about.
        self.assertNotIn(("fail.test", "TXT"), self.fake.queries)


# Every door check of the configuration off; the tests add the SPF check.
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
[antispam.dkim]
verify = false
sign = false
[antispam.dmarc]
enabled = false
[antispam.rules]
enabled = false
[antispam.bayes]
enabled = false
"""


def client_from(port, source):
    """A RawClient whose connection comes from ``source`` (another loopback address)."""
    c = RawClient.__new__(RawClient)
    c.sock = socket.create_connection(("127.0.0.1", port), timeout=10,
                                      source_address=(source, 0))
    c.buf = b""
    return c


class ReceiverTests(ApplianceMixin, unittest.TestCase):
    """The SPF check on the MX port of a running appliance."""

    @defer.inlineCallbacks
    def setUp(self):
        self.fake = yield start_fake_dns(self, {
            "spf.test": {"TXT": ["v=spf1 ip4:127.0.0.2 -all"]},
        }, servfail={"broken.test"})
        yield self.start_appliance(extra=_INERT, listeners=("submission",))
        host, _, port = self.fake.server.partition(":")
        check = SPFCheck(reactor, [(host, int(port))], 10, "mx.example.test")
        self.app.policy.add(check, first=True)
        self.app.submission_policy.add(check)

    def talk(self, source, sender, port=None):
        c = client_from(port or self.port, source)
        try:
            c.code()
            c.cmd("EHLO client.example.org")
            mail = c.cmd(f"MAIL FROM:<{sender}>")
            if mail[0] != 250:
                c.cmd("QUIT")
                return mail, None
            c.cmd("RCPT TO:<bob@example.test>")
            data = c.cmd("DATA")
            if data[0] == 354:
                c.send(b"Subject: hi\r\n\r\nhello\r\n.\r\n")
                data = c.reply()
            c.cmd("QUIT")
            return mail, data
        finally:
            c.close()

    @defer.inlineCallbacks
    def test_pass_delivered_with_the_headers_on_top(self):
        mail, data = yield self.in_thread(self.talk, "127.0.0.2", "joe@spf.test")
        self.assertEqual((mail[0], data[0]), (250, 250))
        yield self.settle()
        [message] = self.delivered("bob")
        head = message.split(b"\n\n")[0].split(b"\n")
        head = [line for line in head if not line.startswith((b"Return-Path:",
                                                               b"Delivered-To:"))]
        # The content scan (on by default) merges SPF's result into its one
        # Authentication-Results field and drops the SPF check's own.
        self.assertEqual(head[:7], [
            b"Authentication-Results: mx.example.test;",
            b"\tspf=pass smtp.mailfrom=joe@spf.test",
            b"X-Spam-Score: 0.0",
            b"X-Spam-Status: No, score=0.0 required=5.0",
            b"\ttests=SPF_PASS",
            b"Received-SPF: pass (mx.example.test: domain of joe@spf.test designates "
            b"127.0.0.2 as permitted sender)",
            b'\tclient-ip=127.0.0.2; envelope-from="joe@spf.test"; helo=client.example.org; '
            b"receiver=mx.example.test; identity=mailfrom"])
        self.assertTrue(head[7].startswith(b"Received: "), head[7])
        self.assertEqual(message.count(b"Authentication-Results:"), 1)

    @defer.inlineCallbacks
    def test_fail_refused_at_mail_nothing_stored(self):
        mail, _ = yield self.in_thread(self.talk, "127.0.0.3", "joe@spf.test")
        self.assertEqual(f"{mail[0]} {mail[1][0]}",
                         "550 5.7.23 <joe@spf.test>: SPF fail: 127.0.0.3 is not allowed to "
                         "send mail for spf.test")
        yield self.settle()
        self.assertEqual(self.queue_files(), [])
        self.assertEqual(self.delivered("bob"), [])

    @defer.inlineCallbacks
    def test_servfail_is_451(self):
        mail, _ = yield self.in_thread(self.talk, "127.0.0.2", "joe@broken.test")
        self.assertEqual(f"{mail[0]} {mail[1][0]}", "451 4.7.24 SPF temporary error, try again")
        yield self.settle()
        self.assertEqual(self.queue_files(), [])
        self.assertEqual(self.delivered("bob"), [])

    @defer.inlineCallbacks
    def test_submission_port_not_checked(self):
        mail, _ = yield self.in_thread(self.talk, "127.0.0.3", "joe@spf.test",
                                       self.ports["submission"])
        self.assertNotEqual(mail[0], 550)
        self.assertEqual(self.fake.queries, [])
