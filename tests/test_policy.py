"""The policy chain: order, verdicts, asynchronous checks, crashing checks."""

from twisted.internet import defer
from twisted.trial import unittest
from zope.interface import implementer
from zope.interface.verify import verifyObject

from mailbox_appliance.interfaces import IPolicyCheck
from mailbox_appliance.smtp.address import Path
from mailbox_appliance.smtp.policy import (
    ACCEPT, HopCount, PolicyChain, RecipientExists, RelayAccess, Verdict, then)
from mailbox_appliance.smtp.session import SessionState
from tests.fakes import FakeDirectory


@implementer(IPolicyCheck)
class Scripted:
    def __init__(self, name, answer, stages=("rcpt",)):
        self.name, self.answer, self.stages = name, answer, frozenset(stages)
        self.calls = []

    def check(self, stage, session, argument):
        self.calls.append((stage, argument))
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer() if callable(self.answer) else self.answer


REJECT = Verdict(554, "5.7.1", "no")


class ChainTests(unittest.TestCase):

    def test_checks_provide_the_interface(self):
        for check in (RelayAccess(["example.test"]), HopCount(50),
                      RecipientExists(FakeDirectory(), ["example.test"])):
            verifyObject(IPolicyCheck, check)

    def test_first_refusal_wins_and_stops(self):
        a, b, c = Scripted("a", None), Scripted("b", REJECT), Scripted("c", None)
        self.assertIs(PolicyChain([a, b, c]).run("rcpt", SessionState(), "x"), REJECT)
        self.assertEqual((len(a.calls), len(b.calls), len(c.calls)), (1, 1, 0))

    def test_other_stages_are_skipped(self):
        a = Scripted("a", REJECT, stages=("mail",))
        self.assertIsNone(PolicyChain([a]).run("rcpt", SessionState(), "x"))
        self.assertEqual(a.calls, [])

    def test_final_accept_skips_the_rest(self):
        b = Scripted("b", REJECT)
        self.assertIsNone(PolicyChain([Scripted("a", ACCEPT), b]).run("rcpt", SessionState(), "x"))
        self.assertEqual(b.calls, [])

    def test_asynchronous_check(self):
        waiting = defer.Deferred()
        c = Scripted("c", REJECT)
        result = PolicyChain([Scripted("a", lambda: waiting), c]).run("rcpt", SessionState(), "x")
        self.assertIsInstance(result, defer.Deferred)
        self.assertEqual(c.calls, [])
        got = []
        result.addCallback(got.append)
        waiting.callback(None)
        self.assertEqual(got, [REJECT])

    def test_crashing_check_is_a_temporary_failure(self):
        result = PolicyChain([Scripted("boom", ValueError("bug"))]).run("rcpt", SessionState(), "x")
        self.assertEqual((result.code, result.enhanced), (451, "4.3.0"))
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)

    def test_then(self):
        self.assertEqual(then(2, lambda x: x + 1), 3)
        d = defer.Deferred()
        r = then(d, lambda x: x + 1)
        d.callback(2)
        self.assertEqual(self.successResultOf(r), 3)


class BuiltinCheckTests(unittest.TestCase):

    def test_relay_access(self):
        check = RelayAccess(["example.test"])
        s = SessionState()
        self.assertIsNone(check.check("rcpt", s, Path("u", "example.test")))
        self.assertEqual(check.check("rcpt", s, Path("u", "other.test")).code, 554)
        self.assertEqual(check.check("rcpt", s, Path("u%other.test", "example.test")).code, 554)
        s.trusted = True
        self.assertIsNone(check.check("rcpt", s, Path("u", "other.test")))
        # Routing tricks are refused even for trusted clients.
        self.assertEqual(check.check("rcpt", s, Path("o.test!u", "example.test")).code, 554)
        s.trusted, s.authenticated = False, "alice"
        self.assertIsNone(check.check("rcpt", s, Path("u", "other.test")))

    def test_recipient_exists(self):
        d = FakeDirectory()
        d.add_user("alice", "alice@example.test")
        check = RecipientExists(d, ["example.test"])
        s = SessionState()
        self.assertIsNone(self.successResultOf(check.check("rcpt", s, Path("alice", "example.test"))))
        v = self.successResultOf(check.check("rcpt", s, Path("nobody", "example.test")))
        self.assertEqual((v.code, v.enhanced), (550, "5.1.1"))
        self.assertIsNone(check.check("rcpt", s, Path("x", "other.test")))
        d.down = True
        v = self.successResultOf(check.check("rcpt", s, Path("alice", "example.test")))
        self.assertEqual((v.code, v.enhanced), (451, "4.4.3"))

    def test_hop_count(self):
        class Msg:
            received_count = 49
        self.assertIsNone(HopCount(50).check("eod", SessionState(), Msg()))
        Msg.received_count = 50
        self.assertEqual(HopCount(50).check("eod", SessionState(), Msg()).reply,
                         "554 5.4.6 Too many hops (mail loop?)")
