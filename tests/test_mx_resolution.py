"""MX resolution against a real DNS server on loopback, and the resolver from [dns].

Each case is a zone in Python data served by tests/dns_helpers.py; the
resolver is the one the appliance builds (``dns.make_resolver``).
"""

import random

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.names import client
from twisted.trial import unittest

from mailbox_appliance import config, dns
from mailbox_appliance.delivery.mx import MXLookupError, MXResolver, order_by_preference
from tests.dns_helpers import start_fake_dns
from tests.sink_helpers import ClockedReactor

ZONE = {
    "ext.test": {"MX": [(20, "mx2.ext.test"), (10, "mx1.ext.test"), (30, "mx3.ext.test")]},
    "mx1.ext.test": {"A": ["127.0.0.2"], "AAAA": ["::1"]},
    "mx2.ext.test": {"A": ["127.0.0.3", "127.0.0.4"]},
    "mx3.ext.test": {"AAAA": ["::1"]},
    "tie.test": {"MX": [(10, "a.tie.test"), (10, "b.tie.test"), (10, "c.tie.test"),
                        (5, "first.tie.test")]},
    "a.tie.test": {"A": ["127.0.1.1"]},
    "b.tie.test": {"A": ["127.0.1.2"]},
    "c.tie.test": {"A": ["127.0.1.3"]},
    "first.tie.test": {"A": ["127.0.1.9"]},
    "implicit.test": {"A": ["127.0.0.5"], "TXT": ["v=spf1 -all"]},
    "nothing.test": {"TXT": ["exists, but no MX and no address"]},
    "nullmx.test": {"MX": [(0, ".")], "A": ["127.0.0.6"]},
    "dangling.test": {"MX": [(10, "gone.dangling.test"), (20, "empty.dangling.test"),
                             (30, "ok.dangling.test")]},
    "empty.dangling.test": {"TXT": ["no address"]},
    "ok.dangling.test": {"A": ["127.0.0.7"]},
    "alldangling.test": {"MX": [(10, "gone.dangling.test"), (20, "empty.dangling.test")]},
    "halfbroken.test": {"MX": [(10, "broken.halfbroken.test"), (20, "gone.halfbroken.test")]},
    "alias.test": {"CNAME": "ext.test"},
    "many.test": {"MX": [(i, f"h{i}.many.test") for i in range(15)]},
    "xn--caf-dma.test": {"MX": [(10, "mx1.ext.test")]},
    "badaddr.test": {"MX": [(10, "zero.badaddr.test")]},
    # Binary labels are possible in DNS: such an MX host is no host at all.
    "hostile.test": {"MX": [(10, "evil\r\nx.hostile.test"), (20, "bad name.hostile.test"),
                            (30, "ok.dangling.test")]},
    "zero.badaddr.test": {"A": ["0.0.0.0", "224.0.0.1", "127.0.0.8"]},
}
for i in range(15):
    ZONE[f"h{i}.many.test"] = {"A": [f"127.0.2.{i + 1}"]}


class MXTestBase(unittest.TestCase):

    @defer.inlineCallbacks
    def setUp(self):
        self.dns = yield start_fake_dns(self, ZONE, servfail={"broken.test",
                                                              "broken.halfbroken.test"},
                                        silent={("slow.test", "MX")})
        cfg = config.Config(dns=config.DNSConfig(servers=(self.dns.server,), timeout=2))
        from twisted.internet import reactor
        self.mx = MXResolver(dns.make_resolver(reactor, cfg), rng=random.Random(7))

    @defer.inlineCallbacks
    def fails(self, domain):
        try:
            yield self.mx.resolve(domain)
        except MXLookupError as e:
            return e
        self.fail(f"{domain} resolved")


class PreferenceTests(MXTestBase):

    @defer.inlineCallbacks
    def test_preference_order_and_addresses(self):
        hosts = yield self.mx.resolve("ext.test")
        self.assertEqual([(h.name, h.preference) for h in hosts],
                         [("mx1.ext.test", 10), ("mx2.ext.test", 20), ("mx3.ext.test", 30)])
        # IPv4 before IPv6 for each host.
        self.assertEqual(hosts[0].addresses, ("127.0.0.2", "::1"))
        self.assertEqual(hosts[1].addresses, ("127.0.0.3", "127.0.0.4"))
        self.assertEqual(hosts[2].addresses, ("::1",))

    @defer.inlineCallbacks
    def test_equal_preferences_shuffled(self):
        orders = set()
        for seed in range(12):
            self.mx.rng = random.Random(seed)
            hosts = yield self.mx.resolve("tie.test")
            # The best preference stays first whatever the shuffle.
            self.assertEqual(hosts[0].name, "first.tie.test")
            orders.add(tuple(h.name for h in hosts[1:]))
        self.assertGreater(len(orders), 1)
        for order in orders:
            self.assertEqual(sorted(order), ["a.tie.test", "b.tie.test", "c.tie.test"])

    def test_order_by_preference_unit(self):
        records = [(20, "b"), (10, "a"), (20, "c"), (0, "z")]
        seen = {tuple(order_by_preference(records, random.Random(s))) for s in range(20)}
        self.assertEqual({o[:2] for o in seen}, {((0, "z"), (10, "a"))})
        self.assertEqual({o[2:] for o in seen},
                         {((20, "b"), (20, "c")), ((20, "c"), (20, "b"))})

    @defer.inlineCallbacks
    def test_host_count_capped(self):
        hosts = yield self.mx.resolve("many.test")
        self.assertEqual(len(hosts), 10)
        self.assertEqual([h.name for h in hosts], [f"h{i}.many.test" for i in range(10)])
        # The hosts past the cap were never looked up.
        self.assertNotIn(("h12.many.test", "A"), self.dns.queries)

    @defer.inlineCallbacks
    def test_cname_to_a_domain_with_mx(self):
        hosts = yield self.mx.resolve("alias.test")
        self.assertEqual(hosts[0].name, "mx1.ext.test")

    @defer.inlineCallbacks
    def test_international_domain(self):
        hosts = yield self.mx.resolve("café.test")
        self.assertEqual(hosts[0].name, "mx1.ext.test")

    @defer.inlineCallbacks
    def test_unusable_addresses_dropped(self):
        hosts = yield self.mx.resolve("badaddr.test")
        self.assertEqual(hosts[0].addresses, ("127.0.0.8",))


class ImplicitAndLiteralTests(MXTestBase):

    @defer.inlineCallbacks
    def test_implicit_mx(self):
        hosts = yield self.mx.resolve("implicit.test")
        self.assertEqual([(h.name, h.addresses) for h in hosts],
                         [("implicit.test", ("127.0.0.5",))])

    @defer.inlineCallbacks
    def test_no_mx_and_no_address_is_permanent(self):
        e = yield self.fails("nothing.test")
        self.assertTrue(e.permanent)
        self.assertEqual(e.enhanced, "5.1.2")

    @defer.inlineCallbacks
    def test_address_literals_skip_dns(self):
        hosts = yield self.mx.resolve("[127.0.0.9]")
        self.assertEqual([(h.name, h.addresses) for h in hosts], [("127.0.0.9", ("127.0.0.9",))])
        hosts = yield self.mx.resolve("[IPv6:::1]")
        self.assertEqual(hosts[0].addresses, ("::1",))
        self.assertEqual(self.dns.queries, [])

    @defer.inlineCallbacks
    def test_bad_literals_and_names(self):
        for bad in ("[300.1.1.1]", "[IPv6:127.0.0.1]", "[::1]", "a..b.test", "x" * 70 + ".test",
                    "sp ace.test"):
            e = yield self.fails(bad)
            self.assertTrue(e.permanent, bad)
            self.assertEqual(e.enhanced, "5.1.2", bad)
        self.assertEqual(self.dns.queries, [])


class FailureTests(MXTestBase):

    @defer.inlineCallbacks
    def test_null_mx(self):
        e = yield self.fails("nullmx.test")
        self.assertTrue(e.permanent)
        self.assertEqual(e.enhanced, "5.1.10")
        # At once: not even the A record of the domain is asked for.
        self.assertEqual(self.dns.queries, [("nullmx.test", "MX")])

    @defer.inlineCallbacks
    def test_nxdomain(self):
        e = yield self.fails("nowhere.test")
        self.assertTrue(e.permanent)
        self.assertEqual(e.enhanced, "5.1.2")
        self.assertIn("Host or domain name not found", e.reply)

    @defer.inlineCallbacks
    def test_servfail_is_temporary(self):
        e = yield self.fails("broken.test")
        self.assertFalse(e.permanent)
        self.assertEqual(e.enhanced, "4.4.3")
        self.assertIn("SERVFAIL", e.reply)

    @defer.inlineCallbacks
    def test_dangling_hosts_skipped(self):
        hosts = yield self.mx.resolve("dangling.test")
        self.assertEqual([h.name for h in hosts], ["ok.dangling.test"])

    @defer.inlineCallbacks
    def test_hosts_with_unusable_names_are_skipped(self):
        hosts = yield self.mx.resolve("hostile.test")
        self.assertEqual([h.name for h in hosts], ["ok.dangling.test"])

    @defer.inlineCallbacks
    def test_all_hosts_dangling_is_permanent(self):
        e = yield self.fails("alldangling.test")
        self.assertTrue(e.permanent)
        self.assertEqual(e.enhanced, "5.4.4")

    @defer.inlineCallbacks
    def test_one_host_unresolvable_now_is_temporary(self):
        # One host SERVFAILs, the other does not exist: maybe the first
        # works in a minute, so no bounce.
        e = yield self.fails("halfbroken.test")
        self.assertFalse(e.permanent)
        self.assertEqual(e.enhanced, "4.4.3")


class TimeoutTests(unittest.TestCase):
    """A server that never answers: the lookup's timeout, on a Clock."""

    @defer.inlineCallbacks
    def test_timeout_is_temporary(self):
        fake = yield start_fake_dns(self, ZONE, silent={("slow.test", "MX")})
        reactor = ClockedReactor()
        cfg = config.Config(dns=config.DNSConfig(servers=(fake.server,), timeout=10))
        mx = MXResolver(dns.make_resolver(reactor, cfg))
        d = mx.resolve("slow.test")
        for _ in range(3):
            # Each retry is asked for real, then its interval runs out.
            count = len(fake.queries)
            while len(fake.queries) == count:
                yield deferLater()
            reactor.clock.advance(10)
        e = yield self.assertFailure(d, MXLookupError)
        self.assertFalse(e.permanent)
        self.assertEqual(e.enhanced, "4.4.3")
        self.assertIn("timeout", e.reply)
        self.assertEqual(fake.queries, [("slow.test", "MX")] * 3)


def deferLater():
    from twisted.internet import reactor, task
    return task.deferLater(reactor, 0.01, lambda: None)


class StubResolver:
    """An IResolver stand-in whose lookups all fail with ``exc``."""

    def __init__(self, exc):
        self.exc = exc

    def lookupMailExchange(self, name):
        return defer.fail(self.exc)


class ErrorMappingTests(unittest.TestCase):

    def test_every_other_dns_error_is_temporary(self):
        from twisted.names import error
        for exc in (error.DNSServerError(None), error.DNSQueryRefusedError(None),
                    error.DNSFormatError(None), error.DNSQueryTimeoutError(None),
                    defer.TimeoutError(), OSError("network down")):
            mx = MXResolver(StubResolver(exc))
            e = self.failureResultOf(mx.resolve("x.test"), MXLookupError).value
            self.assertFalse(e.permanent, exc)
            self.assertEqual(e.enhanced, "4.4.3")


class MakeResolverTests(unittest.TestCase):

    def test_parse_server(self):
        self.assertEqual(dns.parse_server("127.0.0.1:5353"), ("127.0.0.1", 5353))
        self.assertEqual(dns.parse_server("10.0.0.1"), ("10.0.0.1", 53))
        self.assertEqual(dns.parse_server("[::1]:5353"), ("::1", 5353))
        self.assertEqual(dns.parse_server("[::1]"), ("::1", 53))
        self.assertEqual(dns.parse_server("2001:db8::1"), ("2001:db8::1", 53))
        for bad in ("ns.example.test:53", "1.2.3.4:0", "1.2.3.4:99999", "[::1", "[::1]x",
                    "1.2.3.4:x"):
            with self.assertRaises(ValueError, msg=bad):
                dns.parse_server(bad)

    def test_retry_timeouts_add_up(self):
        for total in (1, 2, 3, 4, 10, 30, 60):
            parts = dns.retry_timeouts(total)
            self.assertEqual(sum(parts), total)
            self.assertEqual(list(parts), sorted(parts))

    def test_configured_servers(self):
        cfg = config.Config(dns=config.DNSConfig(servers=("127.0.0.1:5353", "[::1]:53"),
                                                 timeout=10))
        r = dns.make_resolver(Clock(), cfg)
        self.assertIsInstance(r, client.Resolver)
        self.assertEqual(r.servers, [("127.0.0.1", 5353), ("::1", 53)])
        # Two servers share the ten seconds.
        self.assertEqual(sum(r.timeout), 5)

    def test_hostname_server_refused(self):
        cfg = config.Config(dns=config.DNSConfig(servers=("ns.example.test:53",)))
        with self.assertRaises(ValueError) as e:
            dns.make_resolver(Clock(), cfg)
        self.assertIn("[dns] servers", str(e.exception))

    def test_system_resolver(self):
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("# comment\nsearch example.test\nnameserver 192.0.2.53\n"
                    "nameserver fe80::1%eth0\nnameserver not-an-ip\noptions ndots:1\n")
        clock = Clock()
        r = dns.make_resolver(clock, config.Config(dns=config.DNSConfig(timeout=10)),
                              resolv_conf=path)
        self.assertEqual(r.servers, [("192.0.2.53", 53), ("fe80::1", 53)])
        self.assertEqual(sum(r.timeout), 5)
        # Read once: no timer left behind to re-read it.
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_system_resolver_without_servers(self):
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("search example.test\n")
        self.assertEqual(dns.system_servers(path), [("127.0.0.1", 53)])
        self.assertEqual(dns.system_servers(path + ".missing"), [("127.0.0.1", 53)])
