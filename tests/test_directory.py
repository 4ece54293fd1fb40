"""Tests of mailbox_appliance.directory against the embedded LDAP server."""

from __future__ import annotations

import base64
import hashlib

from twisted.internet import defer, protocol, reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from ldaptor.protocols import pureldap
from ldaptor.protocols.ldap import ldapclient, ldaperrors

from mailbox_appliance.config import Config, DirectoryConfig, ServerConfig
from mailbox_appliance.directory import embedded
from mailbox_appliance.directory.cache import CachingDirectory
from mailbox_appliance.directory.embedded import EmbeddedLDAPServer, check_password
from mailbox_appliance.directory.ldap import (
    LDAPDirectory, alias_filter, lookup_filter, normalize_address, parse_url,
    uid_filter, user_filter)
from mailbox_appliance.directory.model import Expansion, Resolution, User
from mailbox_appliance.directory.service import DirectoryService
from mailbox_appliance.interfaces import DirectoryUnavailable, IDirectory

from tests.ldap_helpers import (
    ALICE_DN, BASE_DN, DOMAINS, FIXTURE, DirectoryChecks, closed_port, listen_silently)


@defer.inlineCallbacks
def start_embedded(testcase, server_class=EmbeddedLDAPServer, path=FIXTURE, **kwargs):
    """Start an embedded server on ``path``; stopped when the test ends."""
    server = server_class(path, reactor=reactor, **kwargs)
    server.startService()
    url = yield server.whenReady()
    testcase.addCleanup(lambda: server.stopService() if server.running else None)
    return server, url


def directory_on(testcase, url, **kwargs):
    """An LDAPDirectory on ``url``, closed when the test ends."""
    d = LDAPDirectory(reactor, url, BASE_DN, DOMAINS, **kwargs)
    testcase.addCleanup(d.close)
    return d


class EmbeddedDirectoryTests(DirectoryChecks, unittest.TestCase):
    """The shared checks through LDAPDirectory against the embedded server."""

    @defer.inlineCallbacks
    def setUp(self):
        self.server, self.url = yield start_embedded(self)
        self.directory = self.make_directory()

    def make_directory(self, **kwargs):
        return directory_on(self, self.url, **kwargs)

    def test_provides_interface(self):
        verifyObject(IDirectory, self.directory)

    @defer.inlineCallbacks
    def test_service_bind(self):
        bound = self.make_directory(bind_dn="uid=admin,ou=admins,dc=example,dc=test",
                                    bind_password="admin-secret")
        r = yield bound.lookup("alice@example.test")
        self.assertEqual(r.user.uid, "alice")
        wrong = self.make_directory(bind_dn="uid=admin,ou=admins,dc=example,dc=test",
                                    bind_password="wrong")
        yield self.assertFailure(wrong.lookup("alice@example.test"), DirectoryUnavailable)

    @defer.inlineCallbacks
    def test_wrong_base_is_unknown(self):
        d = LDAPDirectory(reactor, self.url, "dc=nowhere,dc=test", DOMAINS)
        self.addCleanup(d.close)
        r = yield d.lookup("alice@example.test")
        self.assertEqual(r.kind, Resolution.UNKNOWN)


# ---------------------------------------------------------------------------


class FilterTests(unittest.TestCase):
    """Filters are objects; printed they are RFC 4515 escaped."""

    classes = "(|(objectClass=inetOrgPerson)(objectClass=inetLocalMailRecipient))"

    def test_user_filter(self):
        self.assertEqual(
            user_filter("alice@example.test").asText(),
            f"(&{self.classes}(|(mail=alice@example.test)"
            "(mailLocalAddress=alice@example.test)))")

    def test_user_filter_escapes(self):
        self.assertEqual(
            user_filter("*)(uid=*@example.test").asText(),
            f"(&{self.classes}(|(mail=\\2a\\29\\28uid=\\2a@example.test)"
            "(mailLocalAddress=\\2a\\29\\28uid=\\2a@example.test)))")

    def test_uid_filter_escapes(self):
        cases = {
            "*": "\\2a",
            "u*": "u\\2a",
            "admin)(|(objectClass=*": "admin\\29\\28|\\28objectClass=\\2a",
            "a\\5c2a": "a\\5c5c2a",
            "u,ou=admins": "u,ou=admins",
            "u+uid=admin": "u+uid=admin",
            "nul\x00": "nul\\00",
        }
        for raw, escaped in cases.items():
            self.assertEqual(uid_filter(raw).asText(), f"(&{self.classes}(uid={escaped}))")

    def test_alias_filter(self):
        self.assertEqual(alias_filter(["a*@example.test", "a*"]).asText(),
                         "(&(objectClass=nisMailAlias)(|(cn=a\\2a@example.test)(cn=a\\2a)))")
        self.assertEqual(alias_filter(["x@example.test"]).asText(),
                         "(&(objectClass=nisMailAlias)(cn=x@example.test))")

    def test_lookup_filter(self):
        self.assertEqual(
            lookup_filter("s@example.test", bare_alias=True).asText(),
            f"(|{user_filter('s@example.test').asText()}"
            "(&(objectClass=nisMailAlias)(|(cn=s@example.test)(cn=s))))")

    def test_normalize_address(self):
        self.assertEqual(normalize_address("Alice@EXAMPLE.Test"), "Alice@example.test")
        self.assertEqual(normalize_address("a@b@Example.TEST"), "a@b@example.test")
        for bad in ("", "alice", "@x.test", "x@", "a\r\n@x.test", "a\x00@x.test",
                    "a\x85@x.test", "a" * 255, None, 42, b"\xff@x.test"):
            self.assertIsNone(normalize_address(bad), bad)

    def test_parse_url(self):
        self.assertEqual(parse_url("ldap://127.0.0.1:3890"), (False, "127.0.0.1", 3890))
        self.assertEqual(parse_url("ldap://ldap.example.test/"), (False, "ldap.example.test", 389))
        self.assertEqual(parse_url("ldaps://[::1]"), (True, "::1", 636))
        for bad in ("http://x", "ldap://", "ldap://x/dc=a", "x"):
            self.assertRaises(ValueError, parse_url, bad)


class RecordingServer(embedded.ReadOnlyLDAPServer):
    """Remembers the search filters it was sent."""

    received = []

    def handle_LDAPSearchRequest(self, request, controls, reply):
        RecordingServer.received.append(request)
        return super().handle_LDAPSearchRequest(request, controls, reply)


class RecordingEmbedded(EmbeddedLDAPServer):
    protocol = RecordingServer


class WireTests(unittest.TestCase):
    """What actually goes over the wire."""

    @defer.inlineCallbacks
    def setUp(self):
        RecordingServer.received = []
        self.server, self.url = yield start_embedded(self, RecordingEmbedded)
        self.directory = directory_on(self, self.url)

    @defer.inlineCallbacks
    def test_injection_sent_escaped(self):
        r = yield self.directory.lookup("*)(uid=*@example.test")
        self.assertFalse(r.known)
        (request,) = RecordingServer.received
        expected = lookup_filter("*)(uid=*@example.test", bare_alias=True)
        self.assertEqual(request.filter.toWire(), expected.toWire())
        # The value arrived as one literal assertion value.
        users, _ = list(request.filter)
        _, mails = list(users)
        values = {m.assertionValue.value for m in mails}
        self.assertEqual(values, {b"*)(uid=*@example.test"})
        self.assertEqual(request.sizeLimit, 50)
        self.assertEqual(request.baseObject, BASE_DN.encode())

    @defer.inlineCallbacks
    def test_authenticate_sent_escaped(self):
        u = yield self.directory.authenticate("admin)(|(objectClass=*", "admin-secret")
        self.assertIsNone(u)
        (request,) = RecordingServer.received
        self.assertEqual(request.filter.toWire(),
                         uid_filter("admin)(|(objectClass=*").toWire())

    @defer.inlineCallbacks
    def test_unsafe_not_sent(self):
        yield self.directory.lookup("a\r\nb@example.test")
        yield self.directory.authenticate("alice", "")
        yield self.directory.authenticate("al\x00ice", "alice-secret")
        self.assertEqual(RecordingServer.received, [])

    @defer.inlineCallbacks
    def test_one_connection_for_searches(self):
        yield defer.gatherResults([self.directory.lookup(f"u{i}@example.test")
                                   for i in range(20)])
        yield self.directory.lookup("alice@example.test")
        self.assertEqual(len(self.server._factory.connections), 1)


# ---------------------------------------------------------------------------


class UnavailableTests(unittest.TestCase):
    """A server that cannot answer is never "unknown" nor "bad password"."""

    @defer.inlineCallbacks
    def test_refused(self):
        port = yield closed_port()
        d = directory_on(self, f"ldap://127.0.0.1:{port}", timeout=5)
        yield self.assertFailure(d.lookup("alice@example.test"), DirectoryUnavailable)
        yield self.assertFailure(d.expand("alice@example.test"), DirectoryUnavailable)
        yield self.assertFailure(d.authenticate("alice", "alice-secret"),
                                 DirectoryUnavailable)
        # Concurrent calls share the failed attempt and all fail.
        results = yield defer.DeferredList(
            [d.lookup(f"x{i}@example.test") for i in range(5)], consumeErrors=True)
        for ok, failure in results:
            self.assertFalse(ok)
            failure.trap(DirectoryUnavailable)

    @defer.inlineCallbacks
    def test_no_query_needed(self):
        """Refused inputs are answered without the server."""
        port = yield closed_port()
        d = directory_on(self, f"ldap://127.0.0.1:{port}", timeout=5)
        r = yield d.lookup("a\nb@example.test")
        self.assertFalse(r.known)
        self.assertIsNone((yield d.authenticate("alice", "")))
        e = yield d.expand("x" * 300)
        self.assertEqual(e, Expansion())

    @defer.inlineCallbacks
    def test_timeout(self):
        url = listen_silently(self)
        d = directory_on(self, url, timeout=0.3)
        start = reactor.seconds()
        yield self.assertFailure(d.lookup("alice@example.test"), DirectoryUnavailable)
        self.assertLess(reactor.seconds() - start, 3)
        yield self.assertFailure(d.expand("alice@example.test"), DirectoryUnavailable)
        yield self.assertFailure(d.authenticate("alice", "alice-secret"),
                                 DirectoryUnavailable)

    @defer.inlineCallbacks
    def test_timeout_during_service_bind(self):
        url = listen_silently(self)
        d = directory_on(self, url, timeout=0.3, bind_dn="cn=x,dc=example,dc=test",
                         bind_password="x")
        yield self.assertFailure(d.lookup("alice@example.test"), DirectoryUnavailable)

    @defer.inlineCallbacks
    def test_timeout_during_password_bind(self):
        """The search answers, the password bind never does."""

        class Mute(embedded.ReadOnlyLDAPServer):
            def handle_LDAPBindRequest(self, request, controls, reply):
                return defer.Deferred()  # never

        class MuteEmbedded(EmbeddedLDAPServer):
            protocol = Mute

        _, url = yield start_embedded(self, MuteEmbedded)
        d = directory_on(self, url, timeout=0.3)
        yield self.assertFailure(d.authenticate("alice", "alice-secret"),
                                 DirectoryUnavailable)

    @defer.inlineCallbacks
    def test_server_error_is_unavailable(self):
        class Broken(embedded.ReadOnlyLDAPServer):
            def handle_LDAPSearchRequest(self, request, controls, reply):
                return pureldap.LDAPSearchResultDone(
                    resultCode=ldaperrors.LDAPBusy.resultCode)

        class BrokenEmbedded(EmbeddedLDAPServer):
            protocol = Broken

        _, url = yield start_embedded(self, BrokenEmbedded)
        d = directory_on(self, url, timeout=5)
        yield self.assertFailure(d.lookup("alice@example.test"), DirectoryUnavailable)
        yield self.assertFailure(d.authenticate("alice", "alice-secret"),
                                 DirectoryUnavailable)

    @defer.inlineCallbacks
    def test_size_limit_exceeded_is_unavailable(self):
        self.patch(embedded, "SERVER_SIZE_LIMIT", 1)
        _, url = yield start_embedded(self)
        d = directory_on(self, url, timeout=5)
        # staff@ alone fits; everyone's members do not matter: one entry each.
        r = yield d.lookup("staff@example.test")
        self.assertTrue(r.known)
        yield self.assertFailure(d.lookup("dup@example.test"), DirectoryUnavailable)

    @defer.inlineCallbacks
    def test_password_bind_error_is_unavailable(self):
        class Busy(embedded.ReadOnlyLDAPServer):
            def handle_LDAPBindRequest(self, request, controls, reply):
                raise ldaperrors.LDAPBusy("try later")

        class BusyEmbedded(EmbeddedLDAPServer):
            protocol = Busy

        _, url = yield start_embedded(self, BusyEmbedded)
        d = directory_on(self, url, timeout=5)
        yield self.assertFailure(d.authenticate("alice", "alice-secret"),
                                 DirectoryUnavailable)

    @defer.inlineCallbacks
    def test_recovery(self):
        server, url = yield start_embedded(self)
        port = int(url.rpartition(":")[2])
        d = directory_on(self, url, timeout=5)
        r = yield d.lookup("alice@example.test")
        self.assertTrue(r.known)
        yield server.stopService()
        yield self.assertFailure(d.lookup("alice@example.test"), DirectoryUnavailable)
        yield self.assertFailure(d.authenticate("alice", "alice-secret"),
                                 DirectoryUnavailable)
        again, _ = yield start_embedded(self, endpoint=f"tcp:{port}:interface=127.0.0.1")
        r = yield d.lookup("alice@example.test")
        self.assertTrue(r.known)
        u = yield d.authenticate("alice", "alice-secret")
        self.assertEqual(u.uid, "alice")

    @defer.inlineCallbacks
    def test_server_drops_idle_connection(self):
        server, url = yield start_embedded(self)
        d = directory_on(self, url, timeout=5)
        yield d.lookup("alice@example.test")
        # Close the server side of the idle connection, keep listening.
        yield server._factory.closeAll()
        r = yield d.lookup("alice@example.test")
        self.assertTrue(r.known)

    @defer.inlineCallbacks
    def test_closed(self):
        _, url = yield start_embedded(self)
        d = LDAPDirectory(reactor, url, BASE_DN, DOMAINS)
        yield d.lookup("alice@example.test")
        yield d.close()
        yield self.assertFailure(d.lookup("alice@example.test"), DirectoryUnavailable)


# ---------------------------------------------------------------------------


class EmbeddedServerTests(unittest.TestCase):
    """The embedded server itself: read-only, passwords hidden, binds strict."""

    @defer.inlineCallbacks
    def setUp(self):
        self.server, self.url = yield start_embedded(self)
        port = int(self.url.rpartition(":")[2])
        self.client = yield TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(
            protocol.Factory.forProtocol(ldapclient.LDAPClient))
        self.addCleanup(self.client.transport.loseConnection)

    @defer.inlineCallbacks
    def test_start_returns_url(self):
        server = EmbeddedLDAPServer(FIXTURE, reactor=reactor)
        url = yield server.startService()
        self.addCleanup(server.stopService)
        self.assertEqual(url, server.url)
        self.assertNotEqual(url, self.url)

    def test_url(self):
        self.assertTrue(self.url.startswith("ldap://127.0.0.1:"))
        self.assertEqual(self.server.url, self.url)
        self.assertEqual(self.server.port.getHost().host, "127.0.0.1")

    @defer.inlineCallbacks
    def search(self, filter_object, attributes=(), size=0):
        done, entries = defer.Deferred(), []

        def handler(msg):
            if isinstance(msg, pureldap.LDAPSearchResultEntry):
                entries.append(msg)
                return False
            done.callback(msg.resultCode)
            return True

        self.client.send_multiResponse(pureldap.LDAPSearchRequest(
            baseObject=BASE_DN, filter=filter_object, attributes=list(attributes),
            sizeLimit=size), handler)
        code = yield done
        return code, entries

    def bind(self, dn, password):
        d = self.client.send(pureldap.LDAPBindRequest(dn=dn, auth=password))
        return d.addCallback(lambda r: r.resultCode)

    @defer.inlineCallbacks
    def test_password_never_returned(self):
        code, entries = yield self.search(pureldap.LDAPFilter_present("uid"))
        self.assertEqual(code, 0)
        self.assertTrue(entries)
        for e in entries:
            names = {n.lower() for n, _ in e.attributes}
            self.assertNotIn(b"userpassword", names)
        code, entries = yield self.search(pureldap.LDAPFilter_present("uid"),
                                          attributes=["userPassword", "uid"])
        for e in entries:
            self.assertEqual([n for n, _ in e.attributes], [b"uid"])

    @defer.inlineCallbacks
    def test_password_not_searchable(self):
        for f in (pureldap.LDAPFilter_present("userPassword"),
                  pureldap.LDAPFilter_equalityMatch(
                      attributeDesc=pureldap.LDAPAttributeDescription("userpassword"),
                      assertionValue=pureldap.LDAPAssertionValue("alice-secret")),
                  pureldap.LDAPFilter_or([
                      pureldap.LDAPFilter_present("cn"),
                      pureldap.LDAPFilter_not(pureldap.LDAPFilter_present("userPassword"))])):
            code, entries = yield self.search(f)
            self.assertEqual((code, entries), (0, []), f.asText())

    @defer.inlineCallbacks
    def test_binds(self):
        self.assertEqual((yield self.bind(ALICE_DN, "alice-secret")), 0)
        self.assertEqual((yield self.bind(ALICE_DN, "bad")), 49)
        self.assertEqual((yield self.bind(ALICE_DN, "")), 53)  # RFC 4513 5.1.2
        self.assertEqual((yield self.bind("uid=ghost,dc=example,dc=test", "x")), 49)
        self.assertEqual((yield self.bind("", "")), 0)  # anonymous
        self.assertEqual((yield self.bind("uid=nopass,ou=people,dc=example,dc=test", "")), 53)

    @defer.inlineCallbacks
    def test_read_only(self):
        response = yield self.client.send(pureldap.LDAPDelRequest(entry=ALICE_DN))
        self.assertEqual(response.resultCode, ldaperrors.LDAPUnwillingToPerform.resultCode)
        response = yield self.client.send(pureldap.LDAPAddRequest(
            entry="uid=eve,ou=people,dc=example,dc=test",
            attributes=[(pureldap.LDAPAttributeDescription("objectClass"),
                         pureber_set("inetOrgPerson"))]))
        self.assertEqual(response.resultCode, ldaperrors.LDAPUnwillingToPerform.resultCode)
        code, entries = yield self.search(pureldap.LDAPFilter_equalityMatch(
            attributeDesc=pureldap.LDAPAttributeDescription("uid"),
            assertionValue=pureldap.LDAPAssertionValue("alice")))
        self.assertEqual(len(entries), 1)

    @defer.inlineCallbacks
    def test_size_limit(self):
        code, entries = yield self.search(pureldap.LDAPFilter_present("uid"), size=2)
        self.assertEqual(code, ldaperrors.LDAPSizeLimitExceeded.resultCode)
        self.assertEqual(len(entries), 2)

    @defer.inlineCallbacks
    def test_stop_closes_clients(self):
        lost = defer.Deferred()
        self.client.connectionLost = lambda reason: lost.callback(None)
        yield self.server.stopService()
        yield lost
        self.assertIsNone(self.server.url)


class IndexTests(unittest.TestCase):
    """The equality index gives what a full tree walk gives."""

    @defer.inlineCallbacks
    def test_same_as_walk(self):
        root = yield embedded.load_ldif(FIXTURE)
        index = embedded._EqualityIndex(root)
        people = yield root.lookup("ou=people,dc=example,dc=test")
        filters = [
            user_filter("alice@example.test"),
            user_filter("LIDDELL@example.test"),
            user_filter("dup@example.test"),
            user_filter("*)(uid=*@example.test"),
            lookup_filter("sales@example.test", bare_alias=True),
            lookup_filter("staff@example.test"),
            uid_filter("bob"),
            uid_filter("BOB"),
            alias_filter(["everyone@example.test"]),
            pureldap.LDAPFilter_equalityMatch(
                attributeDesc=pureldap.LDAPAttributeDescription("rfc822MailMember"),
                assertionValue=pureldap.LDAPAssertionValue("alice@example.test")),
        ]
        checked = 0
        for f in filters:
            for base in (root, people):
                for scope in (pureldap.LDAP_SCOPE_wholeSubtree,
                              pureldap.LDAP_SCOPE_singleLevel,
                              pureldap.LDAP_SCOPE_baseObject):
                    walked = yield base.search(filterObject=f, scope=scope)
                    candidates = index.candidates(f)
                    self.assertIsNotNone(candidates, f.asText())
                    indexed = [e for e in candidates
                               if embedded._in_scope(base, e, scope) and e.match(f)]
                    self.assertEqual(sorted(e.dn.getText() for e in indexed),
                                     sorted(e.dn.getText() for e in walked), f.asText())
                    checked += len(walked)
        self.assertGreater(checked, 10)
        self.assertIsNone(index.candidates(pureldap.LDAPFilter_present("uid")))
        self.assertIsNone(index.candidates(pureldap.LDAPFilter_or([
            uid_filter("bob"), pureldap.LDAPFilter_present("uid")])))


def pureber_set(*values):
    from ldaptor.protocols import pureber
    return pureber.BERSet([pureber.BEROctetString(v) for v in values])


class PasswordTests(unittest.TestCase):
    """userPassword schemes of the embedded server."""

    def hashed(self, scheme, algorithm, password, salt=b""):
        digest = algorithm(password + salt).digest()
        return b"{" + scheme + b"}" + base64.b64encode(digest + salt)

    def test_schemes(self):
        for scheme, algorithm in ((b"SSHA", hashlib.sha1), (b"SSHA256", hashlib.sha256),
                                  (b"SSHA512", hashlib.sha512)):
            stored = self.hashed(scheme, algorithm, b"pw", b"saltsalt")
            self.assertTrue(check_password(stored, b"pw"))
            self.assertTrue(check_password(stored.replace(scheme, scheme.lower(), 1), b"pw"))
            self.assertFalse(check_password(stored, b"pw2"))
            self.assertFalse(check_password(stored, stored))
        stored = self.hashed(b"SHA", hashlib.sha1, b"pw")
        self.assertTrue(check_password(stored, b"pw"))
        self.assertTrue(check_password(b"clear", b"clear"))
        self.assertFalse(check_password(b"clear", b"Clear"))

    def test_never(self):
        self.assertFalse(check_password(b"", b""))
        self.assertFalse(check_password(b"x", b""))
        self.assertFalse(check_password(b"{CRYPT}abcdef", b"{CRYPT}abcdef"))
        self.assertFalse(check_password(b"{SSHA}!!!", b"x"))
        self.assertFalse(check_password(b"{SHA}" + base64.b64encode(b"short"), b"x"))


class LoadTests(unittest.TestCase):
    """Loading LDIF files."""

    def write(self, data):
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(data)
        return path

    @defer.inlineCallbacks
    def test_crlf_and_no_final_newline(self):
        data = (b"dn: dc=example,dc=test\r\nobjectClass: dcObject\r\ndc: example\r\n\r\n"
                b"dn: uid=x,dc=example,dc=test\r\nobjectClass: inetOrgPerson\r\n"
                b"uid: x\r\nmail: x@example.test\r\nuserPassword: pw")
        _, url = yield start_embedded(self, path=self.write(data))
        d = directory_on(self, url)
        r = yield d.lookup("x@example.test")
        self.assertEqual(r.user.uid, "x")
        self.assertEqual((yield d.authenticate("x", "pw")).uid, "x")

    @defer.inlineCallbacks
    def test_bad_ldif(self):
        path = self.write(b"dn: dc=example,dc=test\nobjectClass: dcObject\n\n"
                          b"dn: uid=x,ou=missing,dc=example,dc=test\nuid: x\n\n")
        server = EmbeddedLDAPServer(path, reactor=reactor)
        early = server.whenReady()
        started = yield server.startService()
        self.assertIsNone(started)
        self.addCleanup(server.stopService)
        yield self.assertFailure(early, Exception)
        yield self.assertFailure(server.whenReady(), Exception)
        self.assertIsNone(server.url)
        self.flushLoggedErrors()

    @defer.inlineCallbacks
    def test_missing_file(self):
        server = EmbeddedLDAPServer(self.mktemp(), reactor=reactor)
        server.startService()
        yield self.assertFailure(server.whenReady(), OSError)
        self.flushLoggedErrors()
        yield server.stopService()


# ---------------------------------------------------------------------------


ALICE = User(dn=ALICE_DN, uid="alice", mail="alice@example.test")


class FakeDirectory:
    """Counts calls; answers when the test says so."""

    def __init__(self):
        self.calls = []
        self.pending = []

    def _call(self, *args):
        self.calls.append(args)
        d = defer.Deferred()
        self.pending.append(d)
        return d

    def lookup(self, address):
        return self._call("lookup", address)

    def expand(self, address):
        return self._call("expand", address)

    def authenticate(self, login, password):
        return self._call("authenticate", login, password)


class CacheTests(unittest.TestCase):
    """CachingDirectory with a Clock."""

    def setUp(self):
        self.clock = task.Clock()
        self.fake = FakeDirectory()
        self.cache = CachingDirectory(self.fake, ttl=60, clock=self.clock, max_entries=3)

    def answer(self, value, index=-1):
        self.fake.pending.pop(index).callback(value)

    def test_interface(self):
        verifyObject(IDirectory, self.cache)

    def test_positive_and_negative_cached_until_ttl(self):
        for address, value in (("alice@example.test", Resolution(Resolution.USER, user=ALICE)),
                               ("nobody@example.test", Resolution(Resolution.UNKNOWN))):
            d = self.cache.lookup(address)
            self.answer(value)
            self.assertEqual(self.successResultOf(d), value)
            self.clock.advance(59)
            self.assertEqual(self.successResultOf(self.cache.lookup(address)), value)
            self.assertEqual(len(self.fake.pending), 0)
            self.clock.advance(1)
            d = self.cache.lookup(address)
            self.assertNoResult(d)
            self.answer(value)
            self.assertEqual(self.successResultOf(d), value)
        self.assertEqual(len(self.fake.calls), 4)

    def test_domain_case_shares_entry(self):
        self.cache.lookup("alice@example.test")
        self.answer(Resolution(Resolution.USER, user=ALICE))
        self.successResultOf(self.cache.lookup("alice@EXAMPLE.TEST"))
        self.assertEqual(len(self.fake.calls), 1)

    def test_expand_cached_separately(self):
        self.cache.lookup("alice@example.test")
        self.answer(Resolution(Resolution.USER, user=ALICE))
        d = self.cache.expand("alice@example.test")
        self.assertNoResult(d)
        self.answer(Expansion(local=(ALICE,)))
        self.assertEqual(self.successResultOf(d).local, (ALICE,))
        self.assertEqual(self.successResultOf(self.cache.expand("alice@example.test")).local,
                         (ALICE,))
        self.assertEqual([c[0] for c in self.fake.calls], ["lookup", "expand"])

    def test_failures_not_cached(self):
        d = self.cache.lookup("alice@example.test")
        self.fake.pending.pop().errback(DirectoryUnavailable("down"))
        self.failureResultOf(d, DirectoryUnavailable)
        d = self.cache.lookup("alice@example.test")
        self.assertNoResult(d)
        self.answer(Resolution(Resolution.USER, user=ALICE))
        self.assertEqual(self.successResultOf(d).user, ALICE)
        self.assertEqual(len(self.fake.calls), 2)

    def test_concurrent_share_one_query(self):
        ds = [self.cache.lookup("alice@example.test") for _ in range(5)]
        self.assertEqual(len(self.fake.calls), 1)
        self.answer(Resolution(Resolution.USER, user=ALICE))
        for d in ds:
            self.assertEqual(self.successResultOf(d).user, ALICE)

    def test_concurrent_share_failure(self):
        ds = [self.cache.expand("alice@example.test") for _ in range(3)]
        self.fake.pending.pop().errback(DirectoryUnavailable("down"))
        for d in ds:
            self.failureResultOf(d, DirectoryUnavailable)
        self.assertEqual(len(self.cache), 0)

    def test_bounded_evicts_oldest(self):
        for i in range(4):
            self.cache.lookup(f"u{i}@example.test")
            self.answer(Resolution(Resolution.UNKNOWN))
        self.assertEqual(len(self.cache), 3)
        self.successResultOf(self.cache.lookup("u3@example.test"))
        self.successResultOf(self.cache.lookup("u1@example.test"))
        self.assertNoResult(self.cache.lookup("u0@example.test"))

    def test_authenticate_not_cached(self):
        for _ in range(2):
            d = self.cache.authenticate("alice", "pw")
            self.answer(ALICE)
            self.assertEqual(self.successResultOf(d), ALICE)
        self.assertEqual(len(self.fake.calls), 2)

    def test_ttl_zero_keeps_nothing(self):
        cache = CachingDirectory(self.fake, ttl=0, clock=self.clock)
        for _ in range(2):
            d = cache.lookup("alice@example.test")
            self.answer(Resolution(Resolution.UNKNOWN))
            self.successResultOf(d)
        self.assertEqual(len(self.fake.calls), 2)

    def test_clear(self):
        self.cache.lookup("alice@example.test")
        self.answer(Resolution(Resolution.UNKNOWN))
        self.cache.clear()
        self.assertNoResult(self.cache.lookup("alice@example.test"))


# ---------------------------------------------------------------------------


def make_config(**directory):
    return Config(server=ServerConfig(domains=DOMAINS),
                  directory=DirectoryConfig(**directory))


class ServiceTests(unittest.TestCase):
    """DirectoryService, embedded and external."""

    @defer.inlineCallbacks
    def test_embedded(self):
        svc = DirectoryService(reactor, make_config(ldif=FIXTURE))
        early = svc.directory.lookup("alice@example.test")  # before start: waits
        svc.startService()
        self.addCleanup(svc.stopService)
        directory = yield svc.whenReady()
        self.assertIs(directory, svc.directory)
        self.assertTrue(svc.embedded.url.startswith("ldap://127.0.0.1:"))
        self.assertEqual((yield early).user.uid, "alice")
        self.assertEqual((yield svc.directory.authenticate("bob", "bob-secret")).uid, "bob")
        e = yield svc.directory.expand("everyone@example.test")
        self.assertEqual(len(e.local), 2)

    @defer.inlineCallbacks
    def test_external_url(self):
        _, url = yield start_embedded(self)
        svc = DirectoryService(reactor, make_config(url=url, cache_ttl=0))
        self.assertIsNone(svc.embedded)
        svc.startService()
        self.addCleanup(svc.stopService)
        yield svc.whenReady()
        r = yield svc.directory.lookup("staff@example.test")
        self.assertEqual(r.kind, Resolution.ALIAS)

    @defer.inlineCallbacks
    def test_broken_ldif(self):
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(b"this is not LDIF\n")
        svc = DirectoryService(reactor, make_config(ldif=path))
        early = svc.directory.lookup("alice@example.test")
        svc.startService()
        self.addCleanup(svc.stopService)
        yield self.assertFailure(svc.whenReady(), DirectoryUnavailable)
        yield self.assertFailure(early, DirectoryUnavailable)
        yield self.assertFailure(svc.directory.lookup("alice@example.test"),
                                 DirectoryUnavailable)
        self.flushLoggedErrors()

    @defer.inlineCallbacks
    def test_not_started_times_out(self):
        svc = DirectoryService(reactor, make_config(ldif=FIXTURE, timeout=0))
        yield self.assertFailure(svc.directory.lookup("alice@example.test"),
                                 DirectoryUnavailable)

    @defer.inlineCallbacks
    def test_stop_and_restart(self):
        svc = DirectoryService(reactor, make_config(ldif=FIXTURE))
        svc.startService()
        yield svc.whenReady()
        yield svc.directory.lookup("alice@example.test")
        yield svc.stopService()
        svc.startService()
        self.addCleanup(svc.stopService)
        yield svc.whenReady()
        self.assertEqual((yield svc.directory.lookup("bob@example.test")).user.uid, "bob")
