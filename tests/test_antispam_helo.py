"""HELO/EHLO name checks: syntax, "you are not me", resolvability (fake resolver and fake DNS)."""

import dataclasses

from twisted.internet import defer, reactor
from twisted.internet.error import DNSLookupError
from twisted.names import dns as tdns
from twisted.names import error
from twisted.trial import unittest

from mailbox_appliance import config as config_module
from mailbox_appliance import dns
from mailbox_appliance.antispam import helo
from mailbox_appliance.antispam.helo import HeloNotOurs, HeloResolvable, HeloSyntax, classify
from mailbox_appliance.smtp.session import SessionState
from tests.dns_helpers import start_fake_dns
from tests.smtp_helpers import ApplianceMixin, RawClient


def session(server_ip="198.51.100.25", **kw):
    s = SessionState(client_ip="192.0.2.1", **kw)
    s.server_ip = server_ip
    return s


def answer(value):
    """A settled lookup: a list of A/AAAA addresses, or an exception."""
    if isinstance(value, Exception):
        return defer.fail(value)
    rrs = []
    for ip in value:
        if ":" in ip:
            rrs.append(tdns.RRHeader(b"h", tdns.AAAA, tdns.IN, 60, tdns.Record_AAAA(ip)))
        else:
            rrs.append(tdns.RRHeader(b"h", tdns.A, tdns.IN, 60, tdns.Record_A(ip)))
    return defer.succeed((rrs, [], []))


class FakeResolver:
    """A and AAAA answers per name; ``asked`` lists the questions."""

    def __init__(self, a=None, aaaa=None):
        self.a = a or {}
        self.aaaa = aaaa or {}
        self.asked = []

    def lookupAddress(self, name, timeout=None):
        self.asked.append((name, "A"))
        return answer(self.a.get(name, error.DNSNameError()))

    def lookupIPV6Address(self, name, timeout=None):
        self.asked.append((name, "AAAA"))
        return answer(self.aaaa.get(name, error.DNSNameError()))


def result(d):
    """The result of a Deferred that has already fired."""
    out = []
    d.addBoth(out.append)
    assert out, "not fired"
    return out[0]


class ClassifyTests(unittest.TestCase):

    def test_names(self):
        cases = {
            "mail.example.org": "fqdn", "MAIL.Example.ORG.": "fqdn", "a-b.c0.example": "fqdn",
            "x1.y": "fqdn",
            "localhost": "single", "bot": "single",
            "[192.0.2.1]": "literal", "[IPv6:2001:db8::1]": "literal",
            "[ipv6:::ffff:192.0.2.1]": "literal",
            "192.0.2.1": "invalid", "[192.0.2.256]": "invalid", "[2001:db8::1]": "invalid",
            "[IPv6:192.0.2.1]": "invalid", "-bad.example.org": "invalid",
            "bad-.example.org": "invalid", "a..example.org": "invalid", ".example.org": "invalid",
            "under_score.example.org": "invalid", "example.123": "invalid",
            "[mail.example.org]": "invalid", "a:b.example": "invalid",
            ("a" * 64) + ".example.org": "invalid",
            ".".join(["abcdefghi"] * 26): "invalid",
        }
        for name, kind in cases.items():
            self.assertEqual((name, classify(name)), (name, kind))


class SyntaxTests(unittest.TestCase):

    def test_replies(self):
        c = HeloSyntax()
        self.assertEqual(c.check("helo", session(), "localhost").reply,
                         "504 5.5.2 <localhost>: Helo command rejected: need fully-qualified "
                         "hostname")
        self.assertEqual(c.check("helo", session(), "192.0.2.1").reply,
                         "501 5.5.2 <192.0.2.1>: Helo command rejected: Invalid name")
        self.assertIsNone(c.check("helo", session(), "mail.example.org"))
        self.assertIsNone(c.check("helo", session(), "[192.0.2.1]"))

    def test_exempt(self):
        c = HeloSyntax()
        for s in (session(trusted=True), session(authenticated="alice"),
                  session(listener="submission")):
            self.assertIsNone(c.check("helo", s, "localhost"))


class OurNameTests(unittest.TestCase):

    def setUp(self):
        self.check = HeloNotOurs("mx.example.test", ("example.test", "Other.Test"))

    def test_our_names(self):
        for name in ("mx.example.test", "MX.EXAMPLE.TEST.", "example.test", "other.test",
                     "[198.51.100.25]"):
            self.assertEqual(self.check.check("helo", session(), name).reply,
                             f"550 5.7.1 <{name}>: Helo command rejected: You are not me")

    def test_address_of_the_interface_reached(self):
        s = session(server_ip="2001:db8::25")
        self.assertEqual(self.check.check("helo", s, "[IPv6:2001:DB8:0::25]").code, 550)
        self.assertIsNone(self.check.check("helo", s, "[IPv6:2001:db8::26]"))
        s = session(server_ip="::ffff:198.51.100.25")
        self.assertEqual(self.check.check("helo", s, "[198.51.100.25]").code, 550)
        self.assertIsNone(self.check.check("helo", session(), "[198.51.100.26]"))

    def test_other_names(self):
        for name in ("mail.example.org", "sub.example.test", "mx.example.test.evil.org"):
            self.assertIsNone(self.check.check("helo", session(), name))

    def test_exempt(self):
        for s in (session(trusted=True), session(authenticated="alice"),
                  session(listener="submissions")):
            self.assertIsNone(self.check.check("helo", s, "mx.example.test"))


class ResolvableTests(unittest.TestCase):

    def test_a_or_aaaa_is_enough(self):
        r = FakeResolver(a={"v4.example.org": ["192.0.2.7"]},
                         aaaa={"v6.example.org": ["2001:db8::7"]})
        c = HeloResolvable(r)
        self.assertIsNone(result(c.check("helo", session(), "v4.example.org")))
        self.assertIsNone(result(c.check("helo", session(), "v6.example.org.")))

    def test_unknown_is_450(self):
        c = HeloResolvable(FakeResolver())
        v = result(c.check("helo", session(), "nowhere.example.org"))
        self.assertEqual(v.reply,
                         "450 4.7.1 <nowhere.example.org>: Helo command rejected: Host not found")

    def test_no_address_records_is_450(self):
        # NODATA for both (a name with only other records, or CNAME answers).
        cname = tdns.RRHeader(b"h", tdns.CNAME, tdns.IN, 60, tdns.Record_CNAME(b"x.example"))
        r = FakeResolver()
        r.lookupAddress = lambda name, timeout=None: defer.succeed(([cname], [], []))
        r.lookupIPV6Address = lambda name, timeout=None: defer.succeed(([], [], []))
        v = result(HeloResolvable(r).check("helo", session(), "alias.example.org"))
        self.assertEqual(v.code, 450)

    def test_dns_failure_accepts(self):
        for failure in (error.DNSServerError(), DNSLookupError("timeout"), defer.TimeoutError()):
            r = FakeResolver()
            r.lookupAddress = lambda name, timeout=None, f=failure: defer.fail(f)
            self.assertIsNone(result(HeloResolvable(r).check("helo", session(), "a.example.org")))

    def test_literals_and_exempt_not_looked_up(self):
        r = FakeResolver()
        c = HeloResolvable(r)
        self.assertIsNone(c.check("helo", session(), "[192.0.2.1]"))
        self.assertIsNone(c.check("helo", session(), "localhost"))
        self.assertIsNone(c.check("helo", session(trusted=True), "nowhere.example.org"))
        self.assertIsNone(c.check("helo", session(authenticated="bob"), "nowhere.example.org"))
        self.assertEqual(r.asked, [])


class ResolvableDNSTests(unittest.TestCase):
    """Through twisted.names against a loopback DNS server, as the appliance asks."""

    @defer.inlineCallbacks
    def setUp(self):
        self.fake = yield start_fake_dns(self, {
            "good.example.org": {"A": ["192.0.2.7"]},
            "six.example.org": {"AAAA": ["2001:db8::7"]},
            "mxonly.example.org": {"MX": [(10, "good.example.org")]},
        }, servfail={"broken.example.org"})
        cfg = config_module.Config()
        cfg = dataclasses.replace(cfg, dns=dataclasses.replace(cfg.dns, servers=(self.fake.server,),
                                                               timeout=2))
        self.check = HeloResolvable(dns.make_resolver(reactor, cfg))

    @defer.inlineCallbacks
    def test_answers(self):
        codes = {}
        for name in ("good.example.org", "six.example.org", "mxonly.example.org",
                     "missing.example.org", "broken.example.org"):
            v = yield self.check.check("helo", session(), name)
            codes[name] = v.code if v is not None else None
        self.assertEqual(codes, {"good.example.org": None, "six.example.org": None,
                                 "mxonly.example.org": 450, "missing.example.org": 450,
                                 "broken.example.org": None})


class ChecksTests(unittest.TestCase):

    def config(self, **h):
        cfg = config_module.Config()
        return dataclasses.replace(cfg, antispam=dataclasses.replace(
            cfg.antispam, helo=dataclasses.replace(cfg.antispam.helo, **h)))

    def test_enabled(self):
        self.assertEqual([c.name for c in helo.checks(self.config(), reactor, None)],
                         ["helo_invalid", "helo_our_name"])
        self.assertEqual([c.name for c in helo.checks(
            self.config(require_resolvable=True), reactor, FakeResolver())],
            ["helo_invalid", "helo_our_name", "helo_resolvable"])
        self.assertEqual(helo.checks(self.config(reject_invalid=False, reject_our_name=False),
                                     reactor, None), [])


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
"""


class ReceiverTests(ApplianceMixin, unittest.TestCase):
    """The HELO checks on the MX port of a running appliance."""

    @defer.inlineCallbacks
    def setUp(self):
        yield self.start_appliance(extra=_INERT, listeners=("submission",))
        # The configuration's own HELO checks are off; these are the defaults.
        cfg = dataclasses.replace(self.config, antispam=dataclasses.replace(
            self.config.antispam, helo=config_module.HeloCheckConfig()))
        for check in reversed(helo.checks(cfg, reactor, None)):
            self.app.policy.add(check, first=True)
            # There too, to show that the checks themselves stay off that port.
            self.app.submission_policy.add(check, first=True)

    @defer.inlineCallbacks
    def test_bad_names_refused_and_nothing_accepted_after(self):
        def talk(name):
            c = RawClient(self.port)
            try:
                c.code()
                r = c.cmd(f"EHLO {name}")
                return r, c.cmd("MAIL FROM:<a@ext.test>")[0]
            finally:
                c.close()
        expected = {
            "localhost": "504 5.5.2 <localhost>: Helo command rejected: need fully-qualified "
                         "hostname",
            "127.0.0.1": "501 5.5.2 <127.0.0.1>: Helo command rejected: Invalid name",
            "mx.example.test": "550 5.7.1 <mx.example.test>: Helo command rejected: You are "
                               "not me",
            "Example.Test": "550 5.7.1 <Example.Test>: Helo command rejected: You are not me",
            "[127.0.0.1]": "550 5.7.1 <[127.0.0.1]>: Helo command rejected: You are not me",
        }
        for name, reply in expected.items():
            (code, lines), mail = yield self.in_thread(talk, name)
            self.assertEqual(f"{code} {lines[0]}", reply)
            self.assertEqual(mail, 503)          # no HELO was taken
        (code, lines), mail = yield self.in_thread(talk, "client.example.org")
        self.assertEqual((code, mail), (250, 250))
        (code, lines), mail = yield self.in_thread(talk, "[127.0.0.2]")
        self.assertEqual((code, mail), (250, 250))
        self.assertEqual(self.queue_files(), [])

    @defer.inlineCallbacks
    def test_not_on_submission(self):
        def talk():
            c = RawClient(self.ports["submission"])
            try:
                c.code()
                return c.cmd("EHLO localhost")[0]
            finally:
                c.close()
        code = yield self.in_thread(talk)
        self.assertEqual(code, 250)
