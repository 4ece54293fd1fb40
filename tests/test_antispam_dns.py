"""DNS door checks: block lists (client and sender domain), sender MX, reverse DNS.

Every lookup goes through twisted.names to a real DNS server on loopback
(``tests/dns_helpers.py``); time is a Clock (``ClockedReactor``), so the
deadlines and TTLs are advanced by the tests, never waited for.
"""

import dataclasses
import ipaddress
import socket

from twisted.internet import defer, reactor, task
from twisted.logger import globalLogPublisher
from twisted.trial import unittest

from mailbox_appliance import config as config_module
from mailbox_appliance import dns
from mailbox_appliance.antispam import dnsbl, rdns, sender_mx
from mailbox_appliance.antispam.dnsbl import (Blocklists, ClientBlocklist, SenderBlocklist,
                                              reverse_name, sanitise_reason)
from mailbox_appliance.antispam.rdns import RequireReverseDNS
from mailbox_appliance.antispam.sender_mx import SenderMX
from mailbox_appliance.smtp.address import Path
from mailbox_appliance.smtp.session import SessionState
from tests.dns_helpers import start_fake_dns
from tests.sink_helpers import ClockedReactor
from tests.smtp_helpers import ApplianceMixin, RawClient

V6 = "2001:db8::1"
V6_NAME = ".".join(reversed(ipaddress.ip_address(V6).exploded.replace(":", "")))

EVIL_TXT = "Listed\r\n250 OK\x00 see https://bl.test/q?ip=192.0.2.2 \xe9t\xe9 " + "x" * 400

ZONE = {
    # 192.0.2.2 listed with a reason that tries to inject a reply line.
    "2.2.0.192.bl.test": {"A": ["127.0.0.2"], "TXT": [EVIL_TXT]},
    # Spamhaus query errors, 127.0.0.1, and an answer outside 127/8.
    "3.2.0.192.bl.test": {"A": ["127.255.255.254"]},
    "4.2.0.192.bl.test": {"A": ["127.255.255.255"]},
    "5.2.0.192.bl.test": {"A": ["1.2.3.4"]},
    "6.2.0.192.bl.test": {"A": ["127.0.0.1"]},
    "11.2.0.192.bl.test": {"A": ["127.0.0.4", "127.255.255.254"]},
    # Listed only by the second zone, without a TXT record.
    "9.2.0.192.bl2.test": {"A": ["127.0.0.10"]},
    V6_NAME + ".bl.test": {"A": ["127.0.0.3"], "TXT": ["v6 spam source"]},
    # RHSBL
    "spam.example.rhs.test": {"A": ["127.0.0.2"], "TXT": ["Domain of a spammer"]},
    "refused.example.rhs.test": {"A": ["127.255.255.254"]},
}
SERVFAIL = {"7.2.0.192.bl.test", "broken.example.rhs.test"}
SILENT = {"8.2.0.192.bl.test", "8.2.0.192.bl2.test"}


def session(ip="192.0.2.1", **kw):
    return SessionState(client_ip=ip, **kw)


def warnings(testcase):
    """Warnings of the antispam checks logged during the test."""
    events = []

    def observer(event):
        if event.get("log_namespace") == "mailbox_appliance.antispam" and \
                getattr(event.get("log_level"), "name", "") == "warn":
            events.append(event)
    globalLogPublisher.addObserver(observer)
    testcase.addCleanup(globalLogPublisher.removeObserver, observer)
    return events


def settle():
    return task.deferLater(reactor, 0.01, lambda: None)


@defer.inlineCallbacks
def until(predicate):
    """Let the real reactor run until ``predicate()`` (answers travel on loopback)."""
    for _ in range(500):
        if predicate():
            return
        yield settle()
    raise AssertionError("condition never met")


def fired(d):
    out = []
    d.addBoth(out.append)
    return out


class DNSTestBase(unittest.TestCase):
    """A fake DNS server, a resolver on it, a Clock for every timer."""

    zone = ZONE
    servfail = SERVFAIL
    silent = SILENT
    held = ()

    @defer.inlineCallbacks
    def setUp(self):
        self.fake = yield start_fake_dns(self, self.zone, servfail=self.servfail,
                                         silent=self.silent, held=self.held)
        self.reactor = ClockedReactor()
        cfg = config_module.Config(dns=config_module.DNSConfig(servers=(self.fake.server,),
                                                               timeout=2))
        self.resolver = dns.make_resolver(self.reactor, cfg)
        self.warnings = warnings(self)

    @defer.inlineCallbacks
    def finish_silent(self):
        """Let the resolver give up on unanswered queries (its ports close)."""
        self.reactor.clock.advance(3)
        yield settle()


class NameTests(unittest.TestCase):

    def test_reverse_names(self):
        self.assertEqual(reverse_name("192.0.2.1"), "1.2.0.192")
        self.assertEqual(reverse_name("::ffff:192.0.2.1"), "1.2.0.192")
        self.assertEqual(reverse_name("2001:db8::1"),
                         "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2")
        self.assertRaises(ValueError, reverse_name, "not-an-ip")

    def test_listing_codes(self):
        for code in ("127.0.0.2", "127.0.0.11", "127.0.1.2", "127.1.2.3"):
            self.assertTrue(dnsbl.is_listing_code(code), code)
        for code in ("127.0.0.1", "127.255.255.252", "127.255.255.254", "127.255.255.255",
                     "1.2.3.4", "10.0.0.2", "::1"):
            self.assertFalse(dnsbl.is_listing_code(code), code)

    def test_domain_query_names(self):
        q = dnsbl.domain_query_name
        self.assertEqual(q("Spam.Example.", "rhs.test"), "spam.example.rhs.test")
        self.assertEqual(q("café.example", "rhs.test"), "xn--caf-dma.example.rhs.test")
        for bad in ("[192.0.2.1]", "", "a b.example", "evil\r\n.example", ("a" * 60 + ".") * 5):
            self.assertIsNone(q(bad, "rhs.test"), bad)

    def test_reason_sanitised(self):
        text = sanitise_reason([EVIL_TXT.encode("latin-1")])
        self.assertNotIn("\r", text)
        self.assertNotIn("\n", text)
        self.assertNotIn("\x00", text)
        self.assertTrue(text.startswith("Listed 250 OK see https://bl.test/q?ip=192.0.2.2 ?t? "))
        self.assertLessEqual(len(text), dnsbl.MAX_REASON)
        self.assertTrue(text.endswith("..."))
        self.assertTrue(all(0x20 <= ord(c) < 0x7f for c in text))


class ClientBlocklistTests(DNSTestBase):

    def make(self, zones=("bl.test",)):
        self.lists = Blocklists(self.resolver, self.reactor, 1)
        return ClientBlocklist(self.lists, zones)

    @defer.inlineCallbacks
    def verdict(self, ip, zones=("bl.test",), check=None):
        check = check or self.make(zones)
        s = session(ip)
        self.assertIsNone(check.check("connect", s, None))
        v = yield check.check("rcpt", s, Path("bob", "example.test"))
        return v

    @defer.inlineCallbacks
    def test_listed(self):
        v = yield self.verdict("192.0.2.2")
        self.assertEqual((v.code, v.enhanced), (554, "5.7.1"))
        self.assertTrue(v.text.startswith(
            "Service unavailable; client [192.0.2.2] blocked using bl.test; Listed 250 OK see "))
        self.assertNotIn("\n", v.reply)
        self.assertNotIn("\r", v.reply)
        self.assertLess(len(v.reply), 300)

    @defer.inlineCallbacks
    def test_not_listed(self):
        v = yield self.verdict("192.0.2.1")
        self.assertIsNone(v)
        self.assertEqual(self.warnings, [])

    @defer.inlineCallbacks
    def test_error_codes_are_not_listings(self):
        # 127.255.255.254/.255 (Spamhaus: query refused), 127.0.0.1, an
        # address outside 127/8, and a listing next to an error code.
        for ip in ("192.0.2.3", "192.0.2.4", "192.0.2.5", "192.0.2.6", "192.0.2.11"):
            v = yield self.verdict(ip)
            self.assertIsNone(v, ip)
        self.assertEqual(len(self.warnings), 5)
        # The reason is never asked for an answer that is not a listing.
        self.assertFalse([q for q in self.fake.queries if q[1] == "TXT"])

    @defer.inlineCallbacks
    def test_servfail_is_not_a_listing(self):
        v = yield self.verdict("192.0.2.7")
        self.assertIsNone(v)
        self.assertEqual(len(self.warnings), 1)
        self.assertIn("SERVFAIL", self.warnings[0]["why"])

    @defer.inlineCallbacks
    def test_ipv6_nibbles(self):
        v = yield self.verdict(V6)
        self.assertEqual(v.reply, f"554 5.7.1 Service unavailable; client [{V6}] blocked "
                                  f"using bl.test; v6 spam source")
        self.assertIn((V6_NAME + ".bl.test", "A"), self.fake.queries)

    @defer.inlineCallbacks
    def test_second_zone_without_reason(self):
        v = yield self.verdict("192.0.2.9", zones=("bl.test", "bl2.test"))
        self.assertEqual(v.reply, "554 5.7.1 Service unavailable; client [192.0.2.9] blocked "
                                  "using bl2.test")

    @defer.inlineCallbacks
    def test_zones_in_parallel_under_a_deadline(self):
        # Neither zone answers 192.0.2.8: both are asked at connect, before
        # any answer, and the RCPT gets its answer when the deadline passes.
        check = self.make(("bl.test", "bl2.test"))
        s = session("192.0.2.8")
        self.assertIsNone(check.check("connect", s, None))
        yield until(lambda: len(self.fake.queries) == 2)
        self.assertEqual(sorted(self.fake.queries), [("8.2.0.192.bl.test", "A"),
                                                     ("8.2.0.192.bl2.test", "A")])
        out = fired(check.check("rcpt", s, Path("bob", "example.test")))
        self.reactor.clock.advance(0.9)
        self.assertEqual(out, [])
        self.reactor.clock.advance(0.1)
        self.assertEqual(out, [None])
        self.assertEqual(len(self.warnings), 2)
        self.assertTrue(all(w["why"] == "timeout" for w in self.warnings))
        yield self.finish_silent()

    @defer.inlineCallbacks
    def test_listing_found_while_another_zone_is_silent(self):
        self.fake.silent.add("2.2.0.192.bl2.test")
        check = self.make(("bl2.test", "bl.test"))
        s = session("192.0.2.2")
        check.check("connect", s, None)
        yield until(lambda: ("2.2.0.192.bl.test", "TXT") in self.fake.queries)
        yield settle()
        out = fired(check.check("rcpt", s, Path("bob", "example.test")))
        self.assertEqual(out, [])
        self.reactor.clock.advance(1)
        self.assertEqual(out[0].code, 554)
        self.assertIn("blocked using bl.test;", out[0].text)
        yield self.finish_silent()

    @defer.inlineCallbacks
    def test_session_answered_from_memory(self):
        # Not listed (NXDOMAIN, no SOA: nothing cached): asked once per
        # session however many recipients.
        check = self.make()
        s = session("192.0.2.1")
        check.check("connect", s, None)
        for rcpt in ("a", "b", "c"):
            v = yield check.check("rcpt", s, Path(rcpt, "example.test"))
            self.assertIsNone(v)
        self.assertEqual(self.fake.queries, [("1.2.0.192.bl.test", "A")])
        check.check("disconnect", s, None)
        self.assertEqual(len(check.sessions), 0)
        # Without a connect stage (a check placed elsewhere) the RCPT asks.
        v = yield check.check("rcpt", session("192.0.2.2"), Path("a", "example.test"))
        self.assertEqual(v.code, 554)

    @defer.inlineCallbacks
    def test_cached_for_ttl(self):
        lists = Blocklists(self.resolver, self.reactor, 1)
        for _ in range(3):
            listed = yield lists.is_listed("192.0.2.2", ["bl.test"])
            self.assertTrue(listed)
        self.assertEqual(self.fake.queries, [("2.2.0.192.bl.test", "A"),
                                             ("2.2.0.192.bl.test", "TXT")])
        self.reactor.clock.advance(59)
        yield lists.is_listed("192.0.2.2", ["bl.test"])
        self.assertEqual(len(self.fake.queries), 2)
        self.reactor.clock.advance(2)       # the fake's TTL is 60 s
        listed = yield lists.is_listed("192.0.2.2", ["bl.test"])
        self.assertTrue(listed)
        self.assertEqual(len(self.fake.queries), 4)

    @defer.inlineCallbacks
    def test_cache_bounded(self):
        lists = Blocklists(self.resolver, self.reactor, 1, max_entries=2)
        for ip in ("192.0.2.2", "192.0.2.3", "192.0.2.4", "192.0.2.5"):
            yield lists.is_listed(ip, ["bl.test"])
        self.assertEqual(len(lists), 2)

    @defer.inlineCallbacks
    def test_same_name_asked_once_at_a_time(self):
        self.fake.held.add("2.2.0.192.bl.test")
        lists = Blocklists(self.resolver, self.reactor, 1)
        first = lists.is_listed("192.0.2.2", ["bl.test"])
        second = lists.is_listed("192.0.2.2", ["bl.test"])
        yield until(lambda: self.fake.queries)
        self.fake.held.clear()
        self.fake.release()
        results = yield defer.gatherResults([first, second])
        self.assertEqual(results, [True, True])
        self.assertEqual(self.fake.queries.count(("2.2.0.192.bl.test", "A")), 1)

    @defer.inlineCallbacks
    def test_late_reason_keeps_the_listing(self):
        self.fake.held.add(("2.2.0.192.bl.test", "TXT"))
        check = self.make()
        s = session("192.0.2.2")
        check.check("connect", s, None)
        yield until(lambda: ("2.2.0.192.bl.test", "TXT") in self.fake.queries)
        out = fired(check.check("rcpt", s, Path("bob", "example.test")))
        self.reactor.clock.advance(1)
        self.assertEqual(out[0].reply, "554 5.7.1 Service unavailable; client [192.0.2.2] "
                                       "blocked using bl.test")
        self.fake.release()
        yield self.finish_silent()

    @defer.inlineCallbacks
    def test_exempt_sessions_ask_nothing(self):
        check = self.make()
        for s in (session("192.0.2.2", trusted=True),
                  session("192.0.2.2", listener="submission"),
                  session("192.0.2.2", authenticated="alice")):
            self.assertIsNone(check.check("connect", s, None))
            self.assertIsNone(check.check("rcpt", s, Path("bob", "example.org")))
        yield settle()
        self.assertEqual(self.fake.queries, [])


class SenderBlocklistTests(DNSTestBase):

    def setUp(self):
        d = super().setUp()

        def made(_):
            self.check = SenderBlocklist(Blocklists(self.resolver, self.reactor, 1),
                                         ("rhs.test",))
        return d.addCallback(made)

    @defer.inlineCallbacks
    def test_listed_sender(self):
        v = yield self.check.check("mail", session(), Path("joe", "spam.example"))
        self.assertEqual(v.reply, "554 5.7.1 <joe@spam.example>: Sender address rejected: "
                                  "spam.example listed by rhs.test; Domain of a spammer")

    @defer.inlineCallbacks
    def test_not_listed(self):
        for domain in ("clean.example", "refused.example", "broken.example"):
            v = yield self.check.check("mail", session(), Path("joe", domain))
            self.assertIsNone(v, domain)
        self.assertEqual(len(self.warnings), 2)     # the error code and the SERVFAIL

    @defer.inlineCallbacks
    def test_not_asked(self):
        for sender in (Path(null=True), Path("joe", "[192.0.2.1]"), Path("postmaster")):
            v = yield self.check.check("mail", session(), sender)
            self.assertIsNone(v)
        v = yield self.check.check("mail", session(trusted=True), Path("joe", "spam.example"))
        self.assertIsNone(v)
        yield settle()
        self.assertEqual(self.fake.queries, [])


MX_ZONE = {
    "good.test": {"MX": [(10, "mx.good.test")]},
    "mx.good.test": {"A": ["192.0.2.25"]},
    "six.test": {"MX": [(10, "mx.six.test")]},
    "mx.six.test": {"AAAA": ["2001:db8::25"]},
    "implicit.test": {"A": ["192.0.2.30"]},
    "nullmx.test": {"MX": [(0, ".")]},
    "noaddr.test": {"TXT": ["v=spf1 -all"]},
    "private.test": {"MX": [(10, "mx1.private.test"), (20, "mx2.private.test")]},
    "mx1.private.test": {"A": ["10.1.2.3", "192.168.7.7"]},
    "mx2.private.test": {"AAAA": ["fd00::25", "fe80::1"]},
    "mixed.test": {"MX": [(10, "mx1.private.test"), (20, "mx.good.test")]},
    "loop.test": {"MX": [(10, "mx.loop.test")]},
    "mx.loop.test": {"A": ["127.0.0.1"], "AAAA": ["::1"]},
    "dangling.test": {"MX": [(10, "nothere.dangling.test")]},
    "halfbroken.test": {"MX": [(10, "mx1.private.test"), (20, "mx.broken.test")]},
    "implicitprivate.test": {"A": ["172.16.0.5"]},
}
TEST_NETWORKS = tuple(ipaddress.ip_network(n) for n in (
    "0.0.0.0/8", "10.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12", "192.168.0.0/16",
    "fc00::/7", "fe80::/10"))


class SenderMXTests(DNSTestBase):

    zone = MX_ZONE
    servfail = {"broken.test", "mx.broken.test"}
    silent = {("slow.test", "MX")}

    def make(self, networks=TEST_NETWORKS):
        return SenderMX(self.resolver, self.reactor, 1, our_domains=("example.test",),
                        unreachable=networks)

    @defer.inlineCallbacks
    def reply(self, domain, networks=TEST_NETWORKS):
        v = yield self.make(networks).check("mail", session(), Path("joe", domain))
        return v.reply if v is not None else None

    @defer.inlineCallbacks
    def test_good_domains(self):
        for domain in ("good.test", "six.test", "implicit.test", "mixed.test", "loop.test"):
            r = yield self.reply(domain)
            self.assertIsNone(r, domain)

    @defer.inlineCallbacks
    def test_not_found(self):
        for domain in ("missing.test", "noaddr.test"):
            r = yield self.reply(domain)
            self.assertEqual(r, f"553 5.1.8 <joe@{domain}>: Sender address rejected: "
                                "Domain not found")

    @defer.inlineCallbacks
    def test_null_mx(self):
        r = yield self.reply("nullmx.test")
        self.assertEqual(r, "550 5.7.27 <joe@nullmx.test>: Sender address rejected: "
                            "Domain nullmx.test does not accept mail (nullMX)")

    @defer.inlineCallbacks
    def test_bad_mx(self):
        for domain in ("private.test", "dangling.test", "implicitprivate.test"):
            r = yield self.reply(domain)
            self.assertEqual(r, f"553 5.1.8 <joe@{domain}>: Sender address rejected: "
                                f"Domain {domain} has bad MX")

    @defer.inlineCallbacks
    def test_loopback_mx_with_the_default_networks(self):
        r = yield self.reply("loop.test", sender_mx.UNREACHABLE_NETWORKS)
        self.assertEqual(r, "553 5.1.8 <joe@loop.test>: Sender address rejected: "
                            "Domain loop.test has bad MX")

    @defer.inlineCallbacks
    def test_dns_trouble_is_451(self):
        # The domain SERVFAILs; or its only reachable-looking host does.
        for domain in ("broken.test", "halfbroken.test"):
            r = yield self.reply(domain)
            self.assertEqual(r, f"451 4.1.8 <joe@{domain}>: Sender address rejected: "
                                "Domain lookup failed, try again")

    @defer.inlineCallbacks
    def test_timeout_is_451(self):
        d = self.make().check("mail", session(), Path("joe", "slow.test"))
        out = fired(d)
        yield until(lambda: self.fake.queries)
        self.reactor.clock.advance(1)
        self.assertEqual(out[0].code, 451)
        self.assertEqual(out[0].enhanced, "4.1.8")
        yield self.finish_silent()

    @defer.inlineCallbacks
    def test_skipped(self):
        check = self.make()
        for s, sender in ((session(), Path(null=True)),
                          (session(), Path("joe", "example.test")),
                          (session(), Path("joe", "[192.0.2.1]")),
                          (session(trusted=True), Path("joe", "missing.test")),
                          (session(authenticated="alice"), Path("joe", "missing.test")),
                          (session(listener="submission"), Path("joe", "missing.test"))):
            self.assertIsNone(check.check("mail", s, sender))
        yield settle()
        self.assertEqual(self.fake.queries, [])


RDNS_ZONE = {
    "1.2.0.192.in-addr.arpa": {"PTR": ["host.good.test"]},
    "host.good.test": {"A": ["192.0.2.1"]},
    "3.2.0.192.in-addr.arpa": {"PTR": ["liar.test"]},
    "liar.test": {"A": ["192.0.2.99"]},
    "5.2.0.192.in-addr.arpa": {"PTR": ["fwdbroken.test"]},
    # Two names: the second confirms.
    "6.2.0.192.in-addr.arpa": {"PTR": ["liar.test", "second.good.test"]},
    "second.good.test": {"A": ["192.0.2.6"]},
    ".".join(reversed(ipaddress.ip_address("2001:db8::5").exploded.replace(":", "")))
    + ".ip6.arpa": {"PTR": ["six.good.test"]},
    "six.good.test": {"AAAA": ["2001:db8::5"], "A": ["192.0.2.5"]},
}


class ReverseDNSTests(DNSTestBase):

    zone = RDNS_ZONE
    servfail = {"4.2.0.192.in-addr.arpa", "fwdbroken.test"}
    silent = {"8.2.0.192.in-addr.arpa"}

    @defer.inlineCallbacks
    def verdict(self, ip, mode="tempfail", s=None):
        check = RequireReverseDNS(self.resolver, self.reactor, 1, mode)
        s = s or session(ip)
        self.assertIsNone(check.check("connect", s, None))
        v = yield check.check("rcpt", s, Path("bob", "example.test"))
        return v, s

    @defer.inlineCallbacks
    def test_confirmed(self):
        for ip, name in (("192.0.2.1", "host.good.test"), ("192.0.2.6", "second.good.test"),
                         ("2001:db8::5", "six.good.test"), ("::ffff:192.0.2.1", "host.good.test")):
            v, s = yield self.verdict(ip, "reject")
            self.assertIsNone(v, ip)
            self.assertEqual(s.client_name, name)

    @defer.inlineCallbacks
    def test_missing_or_unconfirmed(self):
        for ip in ("192.0.2.2", "192.0.2.3"):
            v, s = yield self.verdict(ip)
            self.assertEqual(v.reply, f"450 4.7.25 Client host rejected: cannot find your "
                                      f"hostname, [{ip}]")
            self.assertFalse(hasattr(s, "client_name"))
            v, _ = yield self.verdict(ip, "reject")
            self.assertEqual(v.reply, f"550 5.7.25 Client host rejected: cannot find your "
                                      f"hostname, [{ip}]")

    @defer.inlineCallbacks
    def test_dns_errors_never_5xx(self):
        # SERVFAIL on the PTR, or on the forward lookup of its name.
        for ip in ("192.0.2.4", "192.0.2.5"):
            v, _ = yield self.verdict(ip, "reject")
            self.assertEqual(v.reply, f"450 4.7.25 Client host rejected: cannot find your "
                                      f"hostname, [{ip}]")

    @defer.inlineCallbacks
    def test_timeout_never_5xx(self):
        check = RequireReverseDNS(self.resolver, self.reactor, 1, "reject")
        s = session("192.0.2.8")
        check.check("connect", s, None)
        yield until(lambda: self.fake.queries)
        out = fired(check.check("rcpt", s, Path("bob", "example.test")))
        self.assertEqual(out, [])
        self.reactor.clock.advance(1)
        self.assertEqual(out[0].code, 450)
        self.assertEqual(out[0].enhanced, "4.7.25")
        check.check("disconnect", s, None)
        self.assertEqual(len(check.sessions), 0)
        yield self.finish_silent()

    @defer.inlineCallbacks
    def test_asked_once_per_session(self):
        check = RequireReverseDNS(self.resolver, self.reactor, 1, "reject")
        s = session("192.0.2.1")
        check.check("connect", s, None)
        for rcpt in ("a", "b"):
            v = yield check.check("rcpt", s, Path(rcpt, "example.test"))
            self.assertIsNone(v)
        self.assertEqual(self.fake.queries, [("1.2.0.192.in-addr.arpa", "PTR"),
                                             ("host.good.test", "A")])

    @defer.inlineCallbacks
    def test_exempt(self):
        check = RequireReverseDNS(self.resolver, self.reactor, 1, "reject")
        for s in (session("192.0.2.2", trusted=True), session("192.0.2.2", listener="submission"),
                  session("192.0.2.2", authenticated="alice")):
            self.assertIsNone(check.check("connect", s, None))
            self.assertIsNone(check.check("rcpt", s, Path("bob", "example.org")))
        yield settle()
        self.assertEqual(self.fake.queries, [])


class ChecksTests(unittest.TestCase):

    def config(self, **d):
        cfg = config_module.Config()
        return dataclasses.replace(cfg, antispam=dataclasses.replace(
            cfg.antispam, dns=dataclasses.replace(cfg.antispam.dns, **d)))

    def names(self, module, **d):
        return [c.name for c in module.checks(self.config(**d), reactor, None)]

    def test_enabled(self):
        self.assertEqual(self.names(dnsbl), [])
        self.assertEqual(self.names(dnsbl, dnsbl=("bl.test",), rhsbl=("rhs.test",)),
                         ["rhsbl", "dnsbl"])
        self.assertEqual(self.names(sender_mx), ["badmx"])
        self.assertEqual(self.names(sender_mx, check_sender_mx=False), [])
        self.assertEqual(self.names(rdns), [])
        self.assertEqual(self.names(rdns, require_rdns="reject"), ["require_rdns"])

    def test_shared_blocklists(self):
        state = {}
        cfg = self.config(dnsbl=("bl.test",))
        a = dnsbl.blocklists(cfg, reactor, None, state)
        self.assertIs(dnsbl.checks(cfg, reactor, None, state)[0].blocklists, a)
        self.assertEqual(a.timeout, 10)


# Every door check of the configuration off: the tests add what they are about.
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
    """The block list and sender MX checks on the MX port of a running appliance."""

    @defer.inlineCallbacks
    def setUp(self):
        self.fake = yield start_fake_dns(self, {
            "2.0.0.127.bl.test": {"A": ["127.0.0.2"], "TXT": ["Spam source\r\n250 ok"]},
            "3.0.0.127.bl.test": {"A": ["127.255.255.254"]},
            "good.test": {"MX": [(10, "mx.good.test")]},
            "mx.good.test": {"A": ["192.0.2.25"]},
            "nullmx.test": {"MX": [(0, ".")]},
        }, servfail={"4.0.0.127.bl.test", "broken.test"})
        yield self.start_appliance(extra=_INERT, listeners=("submission",))
        cfg = config_module.Config(dns=config_module.DNSConfig(servers=(self.fake.server,),
                                                               timeout=2))
        resolver = dns.make_resolver(reactor, cfg)
        lists = Blocklists(resolver, reactor, 5)
        self.app.policy.add(SenderMX(resolver, reactor, 5, ("example.test",), TEST_NETWORKS),
                            first=True)
        self.app.policy.add(ClientBlocklist(lists, ("bl.test",)))
        self.app.submission_policy.add(ClientBlocklist(lists, ("bl.test",)))

    def talk(self, source, sender="joe@good.test", port=None):
        c = client_from(port or self.port, source)
        try:
            c.code()
            c.cmd("EHLO client.example.org")
            mail = c.cmd(f"MAIL FROM:<{sender}>")
            if mail[0] != 250:
                return mail, None, None
            rcpt = c.cmd("RCPT TO:<bob@example.test>")
            data = c.cmd("DATA")
            if data[0] == 354:
                c.send(b"Subject: hi\r\n\r\nhello\r\n.\r\n")
                data = c.reply()
            c.cmd("QUIT")
            return mail, rcpt, data
        finally:
            c.close()

    @defer.inlineCallbacks
    def test_listed_client_refused_at_rcpt(self):
        mail, rcpt, data = yield self.in_thread(self.talk, "127.0.0.2")
        self.assertEqual(mail[0], 250)
        self.assertEqual(f"{rcpt[0]} {rcpt[1][0]}",
                         "554 5.7.1 Service unavailable; client [127.0.0.2] blocked using "
                         "bl.test; Spam source 250 ok")
        self.assertNotEqual(data[0], 250)
        yield self.settle()
        self.assertEqual(self.queue_files(), [])
        self.assertEqual(self.delivered("bob"), [])

    @defer.inlineCallbacks
    def test_errors_and_unlisted_clients_accepted(self):
        # Not listed, a Spamhaus error code, a SERVFAIL.
        for source in ("127.0.0.1", "127.0.0.3", "127.0.0.4"):
            mail, rcpt, data = yield self.in_thread(self.talk, source)
            self.assertEqual((rcpt[0], data[0]), (250, 250), source)
        yield self.settle()
        self.assertEqual(len(self.delivered("bob")), 3)

    @defer.inlineCallbacks
    def test_sender_domain_refused_at_mail(self):
        mail, _, _ = yield self.in_thread(self.talk, "127.0.0.1", "joe@nullmx.test")
        self.assertEqual(f"{mail[0]} {mail[1][0]}",
                         "550 5.7.27 <joe@nullmx.test>: Sender address rejected: Domain "
                         "nullmx.test does not accept mail (nullMX)")
        mail, _, _ = yield self.in_thread(self.talk, "127.0.0.1", "joe@broken.test")
        self.assertEqual(mail[0], 451)
        yield self.settle()
        self.assertEqual(self.queue_files(), [])
        self.assertEqual(self.delivered("bob"), [])

    @defer.inlineCallbacks
    def test_submission_port_not_checked(self):
        def talk():
            c = client_from(self.ports["submission"], "127.0.0.2")
            try:
                c.code()
                c.cmd("EHLO client.example.org")
                return c.cmd("MAIL FROM:<joe@good.test>")[0]
            finally:
                c.close()
        code = yield self.in_thread(talk)
        self.assertIn(code, (250, 530))     # whatever submission says, no 554
        self.assertEqual([q for q in self.fake.queries if "bl.test" in q[0]], [])
