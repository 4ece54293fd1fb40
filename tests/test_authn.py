"""Login penalties: growing delays per client and per account, no oracle."""

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial import unittest

from mailbox_appliance.authn import FORGET_AFTER, Authenticator, login_key
from mailbox_appliance.directory.model import User
from mailbox_appliance.interfaces import DirectoryUnavailable

ALICE = User(dn="uid=alice,dc=example,dc=test", uid="alice", mail="alice@example.test")


class Directory:
    down = False

    def authenticate(self, login, password):
        if self.down:
            return defer.fail(DirectoryUnavailable("down"))
        ok = login_key(login) in ("alice", "alice@example.test") and password == "right"
        return defer.succeed(ALICE if ok else None)


class AuthenticatorTests(unittest.TestCase):

    def setUp(self):
        self.clock = Clock()
        self.dir = Directory()
        self.auth = Authenticator(self.dir, self.clock)

    def attempt(self, login, password, ip="192.0.2.1"):
        d = self.auth.login(login, password, ip)
        waited = 0.0
        while not d.called:
            self.clock.advance(0.5)
            waited += 0.5
        return self.successResultOf(d), waited

    def test_success_without_delay(self):
        self.assertEqual(self.attempt("alice", "right"), (ALICE, 0.0))

    def test_penalty_doubles_and_caps(self):
        waits = [self.attempt("alice", "wrong")[1] for _ in range(6)]
        self.assertEqual(waits, [0.0, 2.0, 4.0, 8.0, 15.0, 15.0])

    def test_unknown_user_and_wrong_password_look_alike(self):
        a = [self.attempt("alice", "wrong", ip="192.0.2.1") for _ in range(3)]
        b = [self.attempt("nobody", "wrong", ip="192.0.2.2") for _ in range(3)]
        self.assertEqual(a, b)

    def test_account_counter_spans_clients(self):
        for i in range(3):
            self.attempt("alice", "wrong", ip=f"198.51.100.{i}")
        # A new address guessing the same account waits too...
        self.assertEqual(self.auth.penalty("203.0.113.9", "ALICE "), 8.0)
        # ...and the owner is slowed, not locked out.
        self.assertEqual(self.attempt("alice", "right", ip="203.0.113.9"), (ALICE, 8.0))

    def test_login_variants_share_a_bucket(self):
        for login in ("alice", "ALICE", " alice", "alice\x00"):
            self.attempt(login, "wrong", ip=f"198.51.100.{len(login)}")
        self.assertEqual(self.auth.penalty("203.0.113.1", "Alice"), 15.0)  # 4 failures

    def test_success_forgives_the_client_only(self):
        self.attempt("alice", "wrong")
        self.attempt("alice", "right")
        self.assertEqual(self.auth.penalty("192.0.2.1", "bob"), 0.0)
        self.assertEqual(self.auth.penalty("192.0.2.200", "alice"), 2.0)

    def test_failures_are_forgotten(self):
        self.attempt("alice", "wrong")
        self.clock.advance(FORGET_AFTER + 1)
        self.assertEqual(self.auth.penalty("192.0.2.1", "alice"), 0.0)

    def test_directory_down_is_not_a_failure(self):
        self.dir.down = True
        self.failureResultOf(self.auth.login("alice", "wrong", "192.0.2.1"), DirectoryUnavailable)
        self.assertEqual(self.auth.penalty("192.0.2.1", "alice"), 0.0)
