"""Tests of the DMARC filter (RFC 7489) against policies in a loopback DNS server.

The SPF and DKIM results DMARC builds on are given as the facts the door
and the DKIM verifier leave (``message.facts["spf"]``, ``["dkim"]``), so
each case states exactly what passed for which domain. Time is a Clock
(``ClockedReactor``): a policy lookup that gets no answer is a temperror
when the test advances the clock.
"""

from __future__ import annotations

from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from mailbox_appliance import config as config_module
from mailbox_appliance import dns as appliance_dns
from mailbox_appliance.antispam import dmarc
from mailbox_appliance.antispam.message import ScannedMessage
from tests.dns_helpers import start_fake_dns
from tests.sink_helpers import ClockedReactor

ZONE = {
    "_dmarc.bank.test": {"TXT": ["v=DMARC1; p=reject; rua=mailto:d@bank.test"]},
    "_dmarc.shop.test": {"TXT": ["v=DMARC1; p=quarantine"]},
    "_dmarc.news.test": {"TXT": ["v=DMARC1; p=none"]},
    "_dmarc.strict.test": {"TXT": ["v=DMARC1; p=reject; adkim=s; aspf=s"]},
    "_dmarc.parent.test": {"TXT": ["v=DMARC1; p=none; sp=reject"]},
    "_dmarc.example.co.uk": {"TXT": ["v=DMARC1; p=reject"]},
    "_dmarc.half.test": {"TXT": ["v=DMARC1; p=reject; pct=50"]},
    "_dmarc.twice.test": {"TXT": ["v=DMARC1; p=reject", "v=DMARC1; p=none"]},
    "_dmarc.other.test": {"TXT": ["v=spf1 -all", "not dmarc"]},
    "_dmarc.nop.test": {"TXT": ["v=DMARC1; rua=mailto:x@nop.test"]},
    "_dmarc.Mixed.test": {"TXT": ["v = DMARC1 ; P=Reject"]},
}


def message(from_=b"Alice <alice@bank.test>", spf=("none", ""), dkim=(), extra=b""):
    head = b"".join(b"From: " + f + b"\r\n" for f in
                    ([from_] if isinstance(from_, bytes) else list(from_)))
    raw = head + extra + b"To: bob@local.test\r\nSubject: hi\r\n\r\nbody\r\n"
    m = ScannedMessage.parse(raw)
    m.facts["spf"] = spf
    m.facts["dkim"] = [{"domain": d, "selector": "s", "result": r, "reason": ""}
                       for d, r in dkim]
    return m


class DMARCTestBase(unittest.TestCase):

    @defer.inlineCallbacks
    def setUp(self):
        self.fake = yield start_fake_dns(self, ZONE, servfail={"_dmarc.broken.test"},
                                         silent={"_dmarc.slow.test"})
        self.reactor = ClockedReactor()
        cfg = config_module.Config(dns=config_module.DNSConfig(servers=(self.fake.server,),
                                                               timeout=2))
        self.resolver = appliance_dns.make_resolver(self.reactor, cfg)

    def filter(self, **kw):
        kw.setdefault("timeout", 5)
        return dmarc.DMARCFilter(self.reactor, self.resolver, **kw)

    def scan(self, msg, **kw):
        return defer.maybeDeferred(self.filter(**kw).scan, msg, None)


class PolicyTests(DMARCTestBase):

    @defer.inlineCallbacks
    def test_spf_aligned_pass(self):
        res = yield self.scan(message(spf=("pass", "bank.test")))
        self.assertEqual(res.auth, ["dmarc=pass (p=reject dis=none) header.from=bank.test"])
        self.assertEqual(res.hits, {"DMARC_PASS": -0.5})
        self.assertIsNone(res.verdict)
        self.assertIsNone(res.action)

    @defer.inlineCallbacks
    def test_dkim_aligned_pass(self):
        res = yield self.scan(message(dkim=[("bank.test", "pass")]))
        self.assertEqual(res.hits, {"DMARC_PASS": -0.5})

    @defer.inlineCallbacks
    def test_relaxed_alignment_accepts_the_same_organisational_domain(self):
        res = yield self.scan(message(spf=("pass", "bounces.mail.bank.test")))
        self.assertIn("DMARC_PASS", res.hits)
        res = yield self.scan(message(b"<a@news.bank.test>", dkim=[("bank.test", "pass")]))
        self.assertIn("DMARC_PASS", res.hits)

    @defer.inlineCallbacks
    def test_strict_alignment_needs_the_same_name(self):
        res = yield self.scan(message(b"<a@strict.test>", spf=("pass", "mail.strict.test"),
                                      dkim=[("sub.strict.test", "pass")]))
        self.assertEqual(res.verdict.code, 550)
        res = yield self.scan(message(b"<a@strict.test>", dkim=[("strict.test", "pass")]))
        self.assertIn("DMARC_PASS", res.hits)

    @defer.inlineCallbacks
    def test_reject_policy_refuses_with_550(self):
        res = yield self.scan(message(spf=("pass", "spammer.test"),
                                      dkim=[("spammer.test", "pass"), ("bank.test", "fail")]))
        self.assertEqual((res.verdict.code, res.verdict.enhanced, res.verdict.text),
                         (550, "5.7.1", "Message rejected by DMARC policy of bank.test"))
        self.assertEqual(res.hits, {"DMARC_FAIL_REJECT": 2.0})
        self.assertEqual(res.auth, ["dmarc=fail (p=reject dis=reject) header.from=bank.test"])

    @defer.inlineCallbacks
    def test_spf_fail_or_softfail_does_not_align(self):
        for result in ("fail", "softfail", "neutral", "temperror"):
            res = yield self.scan(message(spf=(result, "bank.test")))
            self.assertIsNotNone(res.verdict, result)

    @defer.inlineCallbacks
    def test_reject_policy_as_junk_or_tag(self):
        res = yield self.scan(message(), reject_action="junk")
        self.assertIsNone(res.verdict)
        self.assertEqual(res.action, "junk")
        self.assertEqual(res.auth, ["dmarc=fail (p=reject dis=quarantine) header.from=bank.test"])
        res = yield self.scan(message(), reject_action="tag")
        self.assertIsNone(res.verdict)
        self.assertIsNone(res.action)
        self.assertEqual(res.hits, {"DMARC_FAIL_REJECT": 2.0})
        self.assertEqual(res.auth, ["dmarc=fail (p=reject dis=none) header.from=bank.test"])

    @defer.inlineCallbacks
    def test_quarantine_policy_files_into_junk(self):
        res = yield self.scan(message(b"<a@shop.test>"))
        self.assertIsNone(res.verdict)
        self.assertEqual(res.action, "junk")
        self.assertEqual(res.hits, {"DMARC_FAIL_QUARANTINE": 1.5})
        self.assertEqual(res.auth, ["dmarc=fail (p=quarantine dis=quarantine) "
                                    "header.from=shop.test"])
        res = yield self.scan(message(b"<a@shop.test>"), quarantine_action="tag")
        self.assertIsNone(res.action)
        self.assertEqual(res.auth, ["dmarc=fail (p=quarantine dis=none) header.from=shop.test"])

    @defer.inlineCallbacks
    def test_none_policy_only_scores(self):
        res = yield self.scan(message(b"<a@news.test>"))
        self.assertIsNone(res.verdict)
        self.assertIsNone(res.action)
        self.assertEqual(res.hits, {"DMARC_FAIL_NONE": 0.1})
        self.assertEqual(res.auth, ["dmarc=fail (p=none dis=none) header.from=news.test"])

    @defer.inlineCallbacks
    def test_no_record_is_none(self):
        res = yield self.scan(message(b"<a@nowhere.test>"))
        self.assertEqual(res.auth, ["dmarc=none header.from=nowhere.test"])
        self.assertEqual(res.hits, {"DMARC_NONE": 0.0})
        self.assertIn(("_dmarc.nowhere.test", "TXT"), self.fake.queries)

    @defer.inlineCallbacks
    def test_records_not_dmarc_are_ignored(self):
        res = yield self.scan(message(b"<a@other.test>"))
        self.assertEqual(res.auth, ["dmarc=none header.from=other.test"])

    @defer.inlineCallbacks
    def test_several_records_mean_no_policy(self):
        res = yield self.scan(message(b"<a@twice.test>"))
        self.assertEqual(res.auth, ["dmarc=none header.from=twice.test"])
        self.assertIsNone(res.verdict)

    @defer.inlineCallbacks
    def test_missing_p_is_none_and_tags_are_case_insensitive(self):
        res = yield self.scan(message(b"<a@nop.test>"))
        self.assertEqual(res.auth, ["dmarc=fail (p=none dis=none) header.from=nop.test"])
        res = yield self.scan(message(b"<a@mixed.test>"))
        self.assertEqual(res.verdict.code, 550)

    @defer.inlineCallbacks
    def test_organisational_domain_fallback_uses_sp(self):
        res = yield self.scan(message(b"<a@deep.sub.parent.test>"))
        self.assertEqual(res.auth, ["dmarc=fail (p=reject dis=reject) "
                                    "header.from=deep.sub.parent.test"])
        self.assertEqual(self.fake.queries, [("_dmarc.deep.sub.parent.test", "TXT"),
                                             ("_dmarc.parent.test", "TXT")])
        # The organisational domain itself gets p=.
        res = yield self.scan(message(b"<a@parent.test>"))
        self.assertEqual(res.auth, ["dmarc=fail (p=none dis=none) header.from=parent.test"])

    @defer.inlineCallbacks
    def test_public_suffix_list_decides_the_organisational_domain(self):
        # co.uk is a public suffix: example.co.uk is the organisational domain.
        res = yield self.scan(message(b"<a@mail.example.co.uk>"))
        self.assertEqual(res.verdict.code, 550)
        self.assertIn(("_dmarc.example.co.uk", "TXT"), self.fake.queries)
        self.assertNotIn(("_dmarc.co.uk", "TXT"), self.fake.queries)
        # Aligned across the organisational domain, not across the suffix.
        res = yield self.scan(message(b"<a@mail.example.co.uk>",
                                      spf=("pass", "other.co.uk")))
        self.assertEqual(res.verdict.code, 550)
        res = yield self.scan(message(b"<a@mail.example.co.uk>",
                                      spf=("pass", "bounce.example.co.uk")))
        self.assertIsNone(res.verdict)

    def test_organisational_domains(self):
        od = dmarc.organisational_domain
        self.assertEqual(od("a.b.example.org"), "example.org")
        self.assertEqual(od("www.example.co.uk"), "example.co.uk")
        self.assertEqual(od("co.uk"), "co.uk")
        self.assertEqual(od("Mail.Example.TEST"), "example.test")
        self.assertTrue(dmarc.aligned("a.example.org", "example.org", "r"))
        self.assertFalse(dmarc.aligned("a.example.org", "example.org", "s"))
        self.assertFalse(dmarc.aligned("example.co.uk", "other.co.uk", "r"))
        self.assertFalse(dmarc.aligned("", "example.org", "r"))

    @defer.inlineCallbacks
    def test_pct_applies_the_policy_to_a_share(self):
        res = yield self.scan(message(b"<a@half.test>"), sample=lambda: 0.2)
        self.assertEqual(res.verdict.code, 550)
        res = yield self.scan(message(b"<a@half.test>"), sample=lambda: 0.7)
        # Outside the share: the next weaker policy (RFC 7489 6.6.4).
        self.assertIsNone(res.verdict)
        self.assertEqual(res.action, "junk")
        self.assertEqual(res.hits, {"DMARC_FAIL_QUARANTINE": 1.5})

    def test_record_parsing(self):
        r = dmarc.Record.parse(b"v=DMARC1; p=quarantine; sp=bogus; pct=abc; adkim=s")
        self.assertEqual((r.p, r.sp, r.adkim, r.aspf, r.pct), ("quarantine", "quarantine",
                                                                "s", "r", 100))
        r = dmarc.Record.parse(b"v=DMARC1;p=reject;pct=200;sp=none")
        self.assertEqual((r.p, r.sp, r.pct), ("reject", "none", 100))


class TroubleTests(DMARCTestBase):

    @defer.inlineCallbacks
    def test_servfail_is_temperror_never_a_refusal(self):
        res = yield self.scan(message(b"<a@broken.test>"))
        self.assertIsNone(res.verdict)
        self.assertIsNone(res.action)
        self.assertEqual(res.auth, ["dmarc=temperror header.from=broken.test"])
        self.assertEqual(res.hits, {"DMARC_TEMPERROR": 0.0})

    @defer.inlineCallbacks
    def test_timeout_is_temperror(self):
        d = self.scan(message(b"<a@slow.test>"), timeout=5)
        for _ in range(500):
            if self.fake.queries:
                break
            yield task.deferLater(reactor, 0.01, lambda: None)
        self.assertFalse(d.called)
        self.reactor.clock.advance(5)
        res = yield d
        self.assertEqual(res.auth, ["dmarc=temperror header.from=slow.test"])
        self.assertIsNone(res.verdict)
        self.reactor.clock.advance(10)


class FromFieldTests(DMARCTestBase):
    """RFC 7489 6.6.1 and security.md G6: From fields that are not one domain."""

    def test_from_domains(self):
        def domains(*values):
            return dmarc.from_domains(message(tuple(values)))
        self.assertEqual(domains(b"Alice <alice@Bank.TEST>"), (["bank.test"], ""))
        self.assertEqual(domains(b'"bob@x.test" <alice@y.test>'), (["y.test"], ""))
        self.assertEqual(domains(b"=?utf-8?q?a@evil.test?= <a@good.test>"), (["good.test"], ""))
        self.assertEqual(domains(b"a@x.test, b@x.test"), (["x.test"], ""))
        self.assertEqual(domains(b"a@x.test, b@y.test"),
                         (["x.test", "y.test"], "several From domains"))
        self.assertEqual(domains(b"a@x.test", b"b@y.test")[0], ["x.test", "y.test"])
        self.assertIn("several From fields", domains(b"a@x.test", b"a@x.test")[1])
        # The parser differential of CVE-2023-27043: every domain in sight counts.
        found, problem = domains(b"alice@example.org(<bob@bank.test>")
        self.assertEqual(set(found), {"example.org", "bank.test"})
        self.assertIn("malformed", problem)
        self.assertEqual(domains(b"undisclosed-recipients")[0], [])
        self.assertEqual(dmarc.from_domains(ScannedMessage.parse(b"To: x@y.test\r\n\r\nb")),
                         ([], "no From field"))
        self.assertEqual(len(domains(*[f"a@d{i}.test".encode() for i in range(50)])[0]),
                         dmarc.MAX_FROM_DOMAINS)
        self.assertEqual(domains(b"(" * 5000)[0], [])
        self.assertEqual(domains(b"(" * 900 + b"a@bank.test")[0], ["bank.test"])

    @defer.inlineCallbacks
    def test_second_from_cannot_get_around_the_first_ones_policy(self):
        # The spammer's own domain passes; bank.test's p=reject still applies.
        msg = message((b"Bank <security@bank.test>", b"<me@spammer.test>"),
                      dkim=[("spammer.test", "pass")])
        res = yield self.scan(msg)
        self.assertEqual(res.verdict.code, 550)
        self.assertIn("bank.test", res.verdict.text)
        self.assertIn("DMARC_BAD_FROM", res.hits)
        self.assertNotIn("DMARC_PASS", res.hits)

    @defer.inlineCallbacks
    def test_malformed_from_checked_on_every_domain_in_it(self):
        msg = message(b"me@spammer.test(<security@bank.test>", spf=("pass", "spammer.test"))
        res = yield self.scan(msg)
        self.assertEqual(res.verdict.code, 550)

    @defer.inlineCallbacks
    def test_no_from_is_permerror_and_scored(self):
        msg = ScannedMessage.parse(b"To: x@y.test\r\n\r\nbody\r\n")
        res = yield self.scan(msg)
        self.assertEqual(res.auth, ["dmarc=permerror"])
        self.assertEqual(res.hits, {"DMARC_BAD_FROM": 2.0})
        self.assertIsNone(res.verdict)
        self.assertEqual(self.fake.queries, [])

    @defer.inlineCallbacks
    def test_several_passing_domains_pass(self):
        msg = message(b"a@bank.test, b@shop.test",
                      dkim=[("bank.test", "pass"), ("shop.test", "pass")])
        res = yield self.scan(msg)
        self.assertEqual(res.hits, {"DMARC_PASS": -0.5, "DMARC_BAD_FROM": 2.0})
        self.assertEqual(len(res.auth), 2)

    def test_factory_reads_the_config(self):
        cfg = config_module.Config(
            dns=config_module.DNSConfig(timeout=4),
            antispam=config_module.AntispamConfig(dmarc=config_module.DMARCConfig(
                reject_action="junk", quarantine_action="tag")))
        [f] = dmarc.filters(cfg, self.reactor, self.resolver)
        self.assertEqual((f.name, f.timeout, f.reject_action, f.quarantine_action),
                         ("dmarc", 4, "junk", "tag"))
        off = config_module.Config(antispam=config_module.AntispamConfig(
            dmarc=config_module.DMARCConfig(enabled=False)))
        self.assertEqual(dmarc.filters(off, self.reactor, self.resolver), [])
