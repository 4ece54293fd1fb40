"""Shared pieces of the directory tests.

:class:`DirectoryChecks` holds the lookup/expand/authenticate checks run both
against the embedded server (``tests/test_directory.py``) and against a real
OpenLDAP ``slapd`` (``tests/e2e/test_slapd.py``): a test case mixing it in
provides ``make_directory(**kwargs)`` returning an ``LDAPDirectory`` on the
fixture ``tests/fixtures/directory.ldif``.
"""

from __future__ import annotations

import os

from twisted.internet import defer, protocol, reactor

from mailbox_appliance.directory.model import Expansion, Resolution
from mailbox_appliance.interfaces import DirectoryUnavailable

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures",
                       "directory.ldif")
BASE_DN = "dc=example,dc=test"
DOMAINS = ("example.test", "example.org")
ALICE_DN = "uid=alice,ou=people,dc=example,dc=test"
BOB_DN = "uid=bob,ou=people,dc=example,dc=test"

#: Logins and local parts trying to change the meaning of a filter or DN.
INJECTIONS = (
    "*",
    "*)(uid=*",
    "u*",
    "admin)(|(objectClass=*",
    "a\\5c2a",
    "u,ou=admins",
    "u+uid=admin",
    "admin)(uid=*",
    "*)(|(mail=*",
    "\\2a",
)


@defer.inlineCallbacks
def closed_port():
    """A loopback TCP port number nobody listens on (just closed)."""
    port = reactor.listenTCP(0, protocol.Factory.forProtocol(protocol.Protocol),
                             interface="127.0.0.1")
    number = port.getHost().port
    yield port.stopListening()
    return number


class Silent(protocol.Protocol):
    """Accepts a connection and never says a word."""

    def connectionMade(self):
        self.factory.connections.append(self)


def listen_silently(testcase):
    """Listen on loopback with L{Silent}; the URL.  Cleaned up with ``testcase``."""
    factory = protocol.Factory.forProtocol(Silent)
    factory.connections = []
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")

    def cleanup():
        for conn in factory.connections:
            conn.transport.abortConnection()
        return port.stopListening()

    testcase.addCleanup(cleanup)
    return f"ldap://127.0.0.1:{port.getHost().port}"


def dns(users):
    return {u.dn.lower() for u in users}


class DirectoryChecks:
    """The behaviour every LDAP server behind LDAPDirectory must give."""

    # make_directory(**kwargs) comes from the concrete test case.

    def setUp(self):
        super().setUp()
        self.directory = self.make_directory()

    # -- lookup ---------------------------------------------------------

    @defer.inlineCallbacks
    def test_lookup_by_mail(self):
        r = yield self.directory.lookup("alice@example.test")
        self.assertEqual(r.kind, Resolution.USER)
        u = r.user
        self.assertEqual(u.dn.lower(), ALICE_DN)
        self.assertEqual(u.uid, "alice")
        self.assertEqual(u.mail, "alice@example.test")
        self.assertEqual(u.addresses, ("a.liddell@example.test", "Liddell@example.test"))
        self.assertEqual(u.mail_host, "")
        self.assertEqual(u.routing_address, "")
        self.assertEqual(u.mailbox_parts, ("example.test", "alice"))

    @defer.inlineCallbacks
    def test_lookup_by_mail_local_address(self):
        for address in ("a.liddell@example.test", "liddell@example.test",
                        "LIDDELL@example.test"):
            r = yield self.directory.lookup(address)
            self.assertEqual(r.kind, Resolution.USER, address)
            self.assertEqual(r.user.dn.lower(), ALICE_DN)

    @defer.inlineCallbacks
    def test_lookup_case_insensitive(self):
        for address in ("alice@EXAMPLE.TEST", "Alice@Example.Test", "ALICE@example.test"):
            r = yield self.directory.lookup(address)
            self.assertEqual(r.kind, Resolution.USER, address)
            self.assertEqual(r.user.mail, "alice@example.test")

    @defer.inlineCallbacks
    def test_lookup_fields(self):
        r = yield self.directory.lookup("bob@example.test")
        self.assertEqual(r.user.mail_host, "store2.example.test")
        r = yield self.directory.lookup("carol@example.test")
        self.assertEqual(r.user.routing_address, "carol@elsewhere.test")
        r = yield self.directory.lookup("grace@example.org")
        self.assertEqual(r.user.uid, "grace")

    @defer.inlineCallbacks
    def test_lookup_unknown(self):
        for address in ("nobody@example.test", "alice@example.org", "alice",
                        "hélène@example.test", "@example.test", "alice@"):
            r = yield self.directory.lookup(address)
            self.assertEqual(r.kind, Resolution.UNKNOWN, address)
            self.assertFalse(r.known)

    @defer.inlineCallbacks
    def test_lookup_unsafe(self):
        for address in ("alice@example.test\r\n", "alice\r\n@example.test",
                        "ali\x00ce@example.test", "alice\x7f@example.test",
                        "a" * 250 + "@example.test", b"\xff@example.test"):
            r = yield self.directory.lookup(address)
            self.assertEqual(r.kind, Resolution.UNKNOWN, address)

    @defer.inlineCallbacks
    def test_lookup_alias(self):
        r = yield self.directory.lookup("staff@example.test")
        self.assertEqual(r.kind, Resolution.ALIAS)
        self.assertEqual(sorted(r.members), ["alice@example.test", "bob@example.test"])
        self.assertIsNone(r.user)

    @defer.inlineCallbacks
    def test_lookup_bare_alias_first_domain_only(self):
        r = yield self.directory.lookup("sales@example.test")
        self.assertEqual(r.kind, Resolution.ALIAS)
        r = yield self.directory.lookup("SALES@Example.TEST")
        self.assertEqual(r.kind, Resolution.ALIAS)
        r = yield self.directory.lookup("sales@example.org")
        self.assertEqual(r.kind, Resolution.UNKNOWN)

    @defer.inlineCallbacks
    def test_lookup_ambiguous_is_unavailable(self):
        yield self.assertFailure(self.directory.lookup("dup@example.test"),
                                 DirectoryUnavailable)

    @defer.inlineCallbacks
    def test_lookup_injection(self):
        for local in INJECTIONS:
            r = yield self.directory.lookup(f"{local}@example.test")
            self.assertEqual(r.kind, Resolution.UNKNOWN, local)

    # -- expand ---------------------------------------------------------

    @defer.inlineCallbacks
    def test_expand_user(self):
        e = yield self.directory.expand("Alice@EXAMPLE.test")
        self.assertEqual(dns(e.local), {ALICE_DN})
        self.assertEqual((e.remote, e.unknown, e.loops), ((), (), ()))

    @defer.inlineCallbacks
    def test_expand_unknown_is_empty(self):
        e = yield self.directory.expand("nobody@example.test")
        self.assertEqual(e, Expansion())
        self.assertTrue(e.empty)

    @defer.inlineCallbacks
    def test_expand_routing_remote(self):
        e = yield self.directory.expand("carol@example.test")
        self.assertEqual(e.local, ())
        self.assertEqual(e.remote, ("carol@elsewhere.test",))

    @defer.inlineCallbacks
    def test_expand_routing_local(self):
        e = yield self.directory.expand("dave@example.test")
        self.assertEqual(dns(e.local), {ALICE_DN})
        e = yield self.directory.expand("erin@example.test")
        self.assertEqual([u.uid for u in e.local], ["erin"])
        self.assertEqual(e.loops, ())
        e = yield self.directory.expand("frank@example.test")
        self.assertEqual((e.local, e.unknown), ((), ("nobody@example.test",)))

    @defer.inlineCallbacks
    def test_expand_foreign_address(self):
        e = yield self.directory.expand("someone@Elsewhere.TEST")
        self.assertEqual(e.remote, ("someone@elsewhere.test",))

    @defer.inlineCallbacks
    def test_expand_nested_aliases(self):
        e = yield self.directory.expand("everyone@example.test")
        self.assertEqual(dns(e.local), {ALICE_DN, BOB_DN})
        self.assertEqual(len(e.local), 2)
        self.assertEqual(sorted(a.lower() for a in e.remote),
                         ["carol@elsewhere.test", "partner@elsewhere.test"])
        self.assertEqual(e.unknown, ("ghost@example.test",))
        self.assertEqual(e.loops, ())

    @defer.inlineCallbacks
    def test_expand_diamond_is_no_loop(self):
        e = yield self.directory.expand("team@example.test")
        self.assertEqual(dns(e.local), {ALICE_DN, BOB_DN})
        self.assertEqual(len(e.local), 2)
        self.assertEqual(e.loops, ())

    @defer.inlineCallbacks
    def test_expand_self_loop(self):
        e = yield self.directory.expand("self@example.test")
        self.assertEqual(e.loops, ("self@example.test",))
        self.assertEqual(dns(e.local), {BOB_DN})

    @defer.inlineCallbacks
    def test_expand_two_alias_loop(self):
        e = yield self.directory.expand("ping@example.test")
        self.assertEqual(e.loops, ("ping@example.test",))
        self.assertEqual(dns(e.local), {ALICE_DN})

    @defer.inlineCallbacks
    def test_expand_depth_bound(self):
        e = yield self.directory.expand("deep0@example.test")
        self.assertEqual(e.local, ())
        self.assertEqual(e.loops, ("deep9@example.test",))
        e = yield self.directory.expand("deep3@example.test")
        self.assertEqual(dns(e.local), {ALICE_DN})
        self.assertEqual(e.loops, ())
        shallow = self.make_directory(max_alias_depth=1)
        e = yield shallow.expand("everyone@example.test")
        # everyone (0) -> staff (1) -> alice, bob (2): too deep.
        self.assertEqual(sorted(e.loops), ["alice@example.test", "bob@example.test"])
        # Remote addresses are final, whatever their depth.
        self.assertEqual(sorted(a.lower() for a in e.remote),
                         ["carol@elsewhere.test", "partner@elsewhere.test"])
        self.assertEqual(e.unknown, ("ghost@example.test",))

    @defer.inlineCallbacks
    def test_expand_bare_alias(self):
        e = yield self.directory.expand("sales@example.test")
        self.assertEqual(dns(e.local), {BOB_DN})
        self.assertEqual(e.remote, ("external@elsewhere.test",))

    @defer.inlineCallbacks
    def test_expand_unsafe_member(self):
        e = yield self.directory.expand("evil@example.test")
        self.assertEqual(dns(e.local), {ALICE_DN})
        self.assertEqual(e.unknown, ("evil\r\nRCPT@example.test",))

    @defer.inlineCallbacks
    def test_expand_ambiguous_is_unavailable(self):
        yield self.assertFailure(self.directory.expand("dup@example.test"),
                                 DirectoryUnavailable)

    # -- authenticate ---------------------------------------------------

    @defer.inlineCallbacks
    def test_authenticate_uid_cleartext(self):
        u = yield self.directory.authenticate("alice", "alice-secret")
        self.assertEqual(u.dn.lower(), ALICE_DN)
        self.assertEqual(u.mail, "alice@example.test")

    @defer.inlineCallbacks
    def test_authenticate_uid_ssha(self):
        u = yield self.directory.authenticate("bob", "bob-secret")
        self.assertEqual(u.dn.lower(), BOB_DN)
        u = yield self.directory.authenticate("bob", b"bob-secret")
        self.assertEqual(u.dn.lower(), BOB_DN)

    @defer.inlineCallbacks
    def test_authenticate_mail(self):
        u = yield self.directory.authenticate("alice@example.test", "alice-secret")
        self.assertEqual(u.uid, "alice")
        u = yield self.directory.authenticate("a.liddell@EXAMPLE.test", "alice-secret")
        self.assertEqual(u.uid, "alice")
        u = yield self.directory.authenticate("grace@example.org", "grace-secret")
        self.assertEqual(u.uid, "grace")

    @defer.inlineCallbacks
    def test_authenticate_wrong_password(self):
        for login, password in (("alice", "wrong"), ("bob", "alice-secret"),
                                ("alice", "ALICE-SECRET"), ("alice", "alice-secret "),
                                ("bob", "{SSHA}jT4hLlMG/+bQP6cv15kgHH/AkJ54OUtxMm1adA=="),
                                ("nopass", "anything"), ("nopass", "")):
            u = yield self.directory.authenticate(login, password)
            self.assertIsNone(u, (login, password))

    @defer.inlineCallbacks
    def test_authenticate_empty(self):
        for login, password in (("alice", ""), ("alice", b""), ("", "alice-secret"),
                                ("alice@example.test", ""), (None, "x"), ("alice", None)):
            u = yield self.directory.authenticate(login, password)
            self.assertIsNone(u, (login, password))

    @defer.inlineCallbacks
    def test_authenticate_unknown_and_bad_logins(self):
        for login in ("nobody", "nobody@example.test", "alice\n", "alice\x00",
                      "a" * 300, "@example.test"):
            u = yield self.directory.authenticate(login, "alice-secret")
            self.assertIsNone(u, login)

    @defer.inlineCallbacks
    def test_authenticate_ambiguous(self):
        u = yield self.directory.authenticate("dup@example.test", "dup-secret")
        self.assertIsNone(u)
        u = yield self.directory.authenticate("dup1", "dup-secret")
        self.assertEqual(u.uid, "dup1")

    @defer.inlineCallbacks
    def test_authenticate_injection(self):
        for login in INJECTIONS + tuple(f"{i}@example.test" for i in INJECTIONS):
            for password in ("admin-secret", "u1-secret", "alice-secret", "*"):
                u = yield self.directory.authenticate(login, password)
                self.assertIsNone(u, (login, password))

    @defer.inlineCallbacks
    def test_concurrent(self):
        results = yield defer.gatherResults([
            self.directory.lookup("alice@example.test"),
            self.directory.lookup("bob@example.test"),
            self.directory.expand("everyone@example.test"),
            self.directory.authenticate("bob", "bob-secret"),
            self.directory.authenticate("alice", "nope"),
            self.directory.lookup("nobody@example.test"),
        ])
        self.assertEqual(results[0].user.uid, "alice")
        self.assertEqual(results[1].user.uid, "bob")
        self.assertEqual(len(results[2].local), 2)
        self.assertEqual(results[3].uid, "bob")
        self.assertIsNone(results[4])
        self.assertFalse(results[5].known)
