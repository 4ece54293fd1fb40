"""The DNS answer cache (``dns.CachingResolver``): TTLs on a Clock, negative
answers per the zone's SOA, failures never kept, a bounded size, forgetting."""

import dataclasses

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.names import dns as tdns
from twisted.names import error
from twisted.trial import unittest

from mailbox_appliance import config, dns
from mailbox_appliance.delivery.mx import MXResolver
from tests.dns_helpers import start_fake_dns


def a_record(name, ip, ttl):
    return tdns.RRHeader(name, tdns.A, tdns.IN, ttl, tdns.Record_A(ip, ttl))


def soa(zone, ttl, minimum):
    return tdns.RRHeader(zone, tdns.SOA, tdns.IN, ttl,
                         tdns.Record_SOA(mname="ns." + zone, rname="hostmaster." + zone,
                                         minimum=minimum, ttl=ttl))


def nxdomain(authority=()):
    m = tdns.Message(rCode=tdns.ENAME)
    m.authority = list(authority)
    return error.DNSNameError(m)


class ScriptedResolver:
    """Answers each lookup with the next scripted result for (name, type).

    A result is an (answers, authority, additional) tuple or an exception;
    ``asked`` lists every question that reached it.
    """

    def __init__(self):
        self.script = {}
        self.asked = []

    def set(self, name, rtype, *results):
        self.script[(name, rtype)] = list(results)

    def _answer(self, name, rtype):
        name = name.decode() if isinstance(name, bytes) else name
        self.asked.append((name, rtype))
        results = self.script[(name, rtype)]
        result = results.pop(0) if len(results) > 1 else results[0]
        if isinstance(result, Exception):
            return defer.fail(result)
        return defer.succeed(result)

    def lookupAddress(self, name, timeout=None):
        return self._answer(name, "A")

    def lookupMailExchange(self, name, timeout=None):
        return self._answer(name, "MX")


class CachingResolverTests(unittest.TestCase):

    def setUp(self):
        self.clock = Clock()
        self.upstream = ScriptedResolver()
        self.cache = dns.CachingResolver(self.upstream, self.clock)

    def lookup(self, name="h.test"):
        return self.successResultOf(self.cache.lookupAddress(name))

    def test_answer_kept_for_its_smallest_ttl(self):
        self.upstream.set("h.test", "A", ([a_record("h.test", "192.0.2.1", 300),
                                           a_record("h.test", "192.0.2.2", 120)], [], []))
        first = self.lookup()
        self.assertEqual([rr.ttl for rr in first[0]], [300, 120])
        self.clock.advance(119)
        again = self.lookup()
        self.assertEqual(len(self.upstream.asked), 1)
        # From memory: the records carry the TTL left, the same data.
        self.assertEqual([rr.ttl for rr in again[0]], [181, 1])
        self.assertEqual([rr.payload.dottedQuad() for rr in again[0]],
                         ["192.0.2.1", "192.0.2.2"])
        self.clock.advance(1)
        self.lookup()
        self.assertEqual(len(self.upstream.asked), 2)

    def test_names_without_case_and_types_apart(self):
        self.upstream.set("h.test", "A", ([a_record("h.test", "192.0.2.1", 60)], [], []))
        self.upstream.set("H.Test.", "A", ([a_record("h.test", "192.0.2.9", 60)], [], []))
        self.upstream.set("h.test", "MX", ([], [soa("test", 60, 60)], []))
        self.lookup("h.test")
        self.lookup("H.Test.")
        self.assertEqual(len(self.upstream.asked), 1)
        self.successResultOf(self.cache.lookupMailExchange("h.test"))
        self.assertEqual(self.upstream.asked, [("h.test", "A"), ("h.test", "MX")])

    def test_ttl_capped(self):
        self.upstream.set("h.test", "A", ([a_record("h.test", "192.0.2.1", 7 * 86400)], [], []))
        self.lookup()
        self.clock.advance(dns.MAX_TTL - 1)
        self.lookup()
        self.assertEqual(len(self.upstream.asked), 1)
        self.clock.advance(1)
        self.lookup()
        self.assertEqual(len(self.upstream.asked), 2)

    def test_zero_ttl_not_kept(self):
        self.upstream.set("h.test", "A", ([a_record("h.test", "192.0.2.1", 0)], [], []))
        self.lookup()
        self.lookup()
        self.assertEqual(len(self.upstream.asked), 2)

    def test_nodata_kept_for_the_soa_negative_ttl(self):
        # RFC 2308 5: min(TTL of the SOA record, its MINIMUM field).
        self.upstream.set("h.test", "A", ([], [soa("test", 100, 30)], []))
        self.assertEqual(self.lookup()[0], [])
        self.clock.advance(29)
        self.assertEqual(self.lookup()[0], [])
        self.assertEqual(len(self.upstream.asked), 1)
        self.clock.advance(1)
        self.lookup()
        self.assertEqual(len(self.upstream.asked), 2)

    def test_negative_ttl_capped(self):
        self.upstream.set("h.test", "A", ([], [soa("test", 86400, 86400)], []))
        self.lookup()
        self.clock.advance(dns.NEGATIVE_MAX_TTL)
        self.lookup()
        self.assertEqual(len(self.upstream.asked), 2)

    def test_nodata_without_soa_not_kept(self):
        self.upstream.set("h.test", "A", ([], [], []))
        self.lookup()
        self.lookup()
        self.assertEqual(len(self.upstream.asked), 2)

    def test_nxdomain_kept_for_the_soa_negative_ttl(self):
        self.upstream.set("gone.test", "A", nxdomain([soa("test", 60, 60)]))
        self.failureResultOf(self.cache.lookupAddress("gone.test"), error.DNSNameError)
        self.clock.advance(59)
        self.failureResultOf(self.cache.lookupAddress("gone.test"), error.DNSNameError)
        self.assertEqual(len(self.upstream.asked), 1)
        self.clock.advance(1)
        self.failureResultOf(self.cache.lookupAddress("gone.test"), error.DNSNameError)
        self.assertEqual(len(self.upstream.asked), 2)

    def test_cached_nxdomain_a_fresh_failure_each_time(self):
        # One stored exception would gather the frames of every re-raise.
        self.upstream.set("gone.test", "A", nxdomain([soa("test", 60, 60)]))
        first = self.failureResultOf(self.cache.lookupAddress("gone.test"),
                                     error.DNSNameError).value
        second = self.failureResultOf(self.cache.lookupAddress("gone.test"),
                                      error.DNSNameError).value
        third = self.failureResultOf(self.cache.lookupAddress("gone.test"),
                                     error.DNSNameError).value
        self.assertIsNot(second, third)
        self.assertEqual(second.args, first.args)

    def test_nxdomain_without_soa_not_kept(self):
        self.upstream.set("gone.test", "A", nxdomain(), error.DNSNameError())
        for _ in range(3):
            self.failureResultOf(self.cache.lookupAddress("gone.test"), error.DNSNameError)
        self.assertEqual(len(self.upstream.asked), 3)

    def test_servfail_and_timeouts_never_kept(self):
        answer = ([a_record("h.test", "192.0.2.1", 60)], [], [])
        self.upstream.set("h.test", "A", error.DNSServerError(tdns.Message(rCode=tdns.ESERVER)),
                          error.DNSQueryTimeoutError(None), error.DNSQueryRefusedError(None),
                          answer)
        self.failureResultOf(self.cache.lookupAddress("h.test"), error.DNSServerError)
        self.failureResultOf(self.cache.lookupAddress("h.test"), error.DNSQueryTimeoutError)
        self.failureResultOf(self.cache.lookupAddress("h.test"), error.DNSQueryRefusedError)
        # The name server is back: its answer is taken, then kept.
        self.assertEqual(self.lookup()[0][0].payload.dottedQuad(), "192.0.2.1")
        self.lookup()
        self.assertEqual(len(self.upstream.asked), 4)
        self.assertEqual(len(self.cache), 1)

    def test_size_bounded_least_recently_used_dropped(self):
        cache = dns.CachingResolver(self.upstream, self.clock, max_entries=3)
        for i in range(4):
            self.upstream.set(f"h{i}.test", "A",
                              ([a_record(f"h{i}.test", f"192.0.2.{i}", 600)], [], []))
        for name in ("h0.test", "h1.test", "h2.test", "h0.test", "h3.test"):
            self.successResultOf(cache.lookupAddress(name))
        self.assertEqual(len(cache), 3)
        self.assertEqual(len(self.upstream.asked), 4)
        # h1 was the least recently used: gone; h0 (used again) stays.
        self.successResultOf(cache.lookupAddress("h0.test"))
        self.assertEqual(len(self.upstream.asked), 4)
        self.successResultOf(cache.lookupAddress("h1.test"))
        self.assertEqual(len(self.upstream.asked), 5)
        self.assertEqual(len(cache), 3)

    def test_many_names_stay_bounded(self):
        cache = dns.CachingResolver(self.upstream, self.clock, max_entries=50)
        for i in range(500):
            self.upstream.set(f"h{i}.test", "A",
                              ([a_record(f"h{i}.test", "192.0.2.1", 600)], [], []))
            self.successResultOf(cache.lookupAddress(f"h{i}.test"))
        self.assertEqual(len(cache), 50)

    def test_forget_a_domain_and_clear(self):
        for name in ("d.test", "mx.d.test", "other.test", "xd.test"):
            self.upstream.set(name, "A", ([a_record(name, "192.0.2.1", 600)], [], []))
            self.lookup(name)
        self.cache.forget("D.test")
        self.assertEqual(len(self.cache), 2)
        for name in ("d.test", "mx.d.test", "other.test", "xd.test"):
            self.lookup(name)
        self.assertEqual([n for n, _ in self.upstream.asked],
                         ["d.test", "mx.d.test", "other.test", "xd.test", "d.test",
                          "mx.d.test"])
        self.cache.clear()
        self.assertEqual(len(self.cache), 0)

    def test_forget_names_that_are_not_names(self):
        # Flush targets come from the administrator and ETRN: whatever IDNA
        # cannot encode was never asked about, and is no error.
        self.upstream.set("d.test", "A", ([a_record("d.test", "192.0.2.1", 600)], [], []))
        self.lookup("d.test")
        for target in ("a..b", "x" * 300, "\udcff.test", "", "."):
            self.cache.forget(target)
        self.assertEqual(len(self.cache), 1)

    def test_no_timers(self):
        self.upstream.set("h.test", "A", ([a_record("h.test", "192.0.2.1", 60)], [], []))
        self.lookup()
        self.assertEqual(self.clock.getDelayedCalls(), [])


class CachedMXResolutionTests(unittest.TestCase):
    """MX resolution through the cache against a real DNS server."""

    @defer.inlineCallbacks
    def test_second_resolution_asks_nothing(self):
        server = yield start_fake_dns(self, {
            "ext.test": {"MX": [(10, "mx1.ext.test"), (20, "mx2.ext.test")]},
            "mx1.ext.test": {"A": ["127.0.0.2"], "AAAA": ["::1"]},
            "mx2.ext.test": {"A": ["127.0.0.3"], "AAAA": ["::1"]},
        })
        from twisted.internet import reactor
        cfg = config.Config(dns=config.DNSConfig(servers=(server.server,), timeout=2))
        # (Every name has records: this server's NODATA carries no SOA, so
        # an empty answer would not be kept.)
        mx = MXResolver(dns.CachingResolver(dns.make_resolver(reactor, cfg), reactor))
        first = yield mx.resolve("ext.test")
        asked = len(server.queries)
        self.assertEqual(asked, 5)          # MX, then A and AAAA of both hosts
        second = yield mx.resolve("EXT.test")
        self.assertEqual(len(server.queries), asked)
        self.assertEqual(first, second)


class LargeAnswerTests(unittest.TestCase):
    """Answers over 512 octets: truncated over UDP, asked again over TCP, never for ever."""

    timeout = 30

    def resolver(self, fake):
        from twisted.internet import reactor
        cfg = config.Config()
        cfg = dataclasses.replace(cfg, dns=dataclasses.replace(cfg.dns, servers=(fake.server,),
                                                               timeout=2))
        return dns.make_resolver(reactor, cfg)

    @defer.inlineCallbacks
    def test_long_txt_record_comes_whole_over_tcp(self):
        key = "v=DKIM1; k=rsa; p=" + "A" * 2800          # a 16384-bit key's record
        fake = yield start_fake_dns(self, {"s._domainkey.big.test": {"TXT": [key]}})
        answers, _, _ = yield self.resolver(fake).lookupText("s._domainkey.big.test")
        self.assertEqual(b"".join(answers[0].payload.data).decode(), key)
        self.assertIn(("s._domainkey.big.test", "TXT"), fake.queries)

    @defer.inlineCallbacks
    def test_server_cutting_tcp_answers_too_does_not_loop(self):
        # twisted.names alone asks again over TCP as long as the answer is
        # marked truncated: with this server, for ever.
        fake = yield start_fake_dns(self, {"big.test": {"TXT": ["x" * 700]}})
        fake.tcp_max_size = 512
        try:
            yield self.resolver(fake).lookupText("big.test")
        except Exception:
            pass            # a cut answer may not parse: an error is fine, a hang is not
        self.assertLessEqual(len(fake.queries), 3)
