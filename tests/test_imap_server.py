"""IMAP connection layer: greeting, STARTTLS, LOGINDISABLED, LOGIN/AUTHENTICATE, limits."""

import base64
import dataclasses
import imaplib
import os

from twisted.internet import defer, reactor, threads
from twisted.trial import unittest

from mailbox_appliance import config as config_module, tls
from mailbox_appliance.authn import Authenticator
from mailbox_appliance.imap.server import IMAPServerFactory
from tests.imap_helpers import RawIMAP, client_context
from tests.test_pop3 import Directory


class IMAPServerTests(unittest.TestCase):

    factory_class = IMAPServerFactory

    def setUp(self):
        cfg = config_module.Config()
        data = os.path.abspath(self.mktemp())
        os.makedirs(data)
        cfg = dataclasses.replace(cfg, server=dataclasses.replace(cfg.server, data_dir=data))
        ctx, _ = tls.server_context_factory(cfg)
        self.directory = Directory()
        self.directory.add_user("alice", "alice@example.test")
        self.factory = self.factory_class(reactor, "imap.example.test",
                                          Authenticator(self.directory, reactor), None,
                                          tls_context=ctx, max_append=1000)
        self.port = reactor.listenTCP(0, self.factory, interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)
        self.portno = self.port.getHost().port

    def thread(self, f):
        return threads.deferToThread(f)

    @defer.inlineCallbacks
    def test_greeting_and_logindisabled(self):
        def talk():
            c = RawIMAP(self.portno)
            out = [c.greeting, c.cmd("a", "LOGIN alice secret"),
                   c.cmd("b", 'AUTHENTICATE PLAIN AGFsaWNlAHNlY3JldA==')]
            return out
        greeting, login, auth = yield self.thread(talk)
        self.assertIn(b"STARTTLS", greeting)
        self.assertIn(b"LOGINDISABLED", greeting)
        self.assertNotIn(b"AUTH=PLAIN", greeting)
        self.assertTrue(greeting.startswith(b"* OK [CAPABILITY IMAP4rev1 "))
        self.assertEqual(login[-1], b"a NO [PRIVACYREQUIRED] Plaintext authentication "
                                    b"disallowed without TLS")
        self.assertTrue(auth[-1].startswith(b"b NO [PRIVACYREQUIRED]"))
        # The password was never checked: no penalty counted.
        self.assertEqual(self.factory.authenticator.penalty("127.0.0.1", "alice"), 0.0)

    @defer.inlineCallbacks
    def test_starttls_drops_pipelined_commands(self):
        def talk():
            c = RawIMAP(self.portno)
            c.send(b"a STARTTLS\r\nb LOGIN alice secret\r\n")
            first = c.until_tag(b"a")
            c.sock = client_context().wrap_socket(c.sock)
            c.buf = b""
            extra = c.quiet()
            caps = c.cmd("c", "CAPABILITY")
            return first, extra, caps
        first, extra, caps = yield self.thread(talk)
        self.assertEqual(first, [b"a OK Begin TLS negotiation now"])
        self.assertEqual(extra, b"")
        self.assertIn(b"AUTH=PLAIN", caps[0])
        self.assertNotIn(b"STARTTLS", caps[0])
        self.assertNotIn(b"LOGINDISABLED", caps[0])

    @defer.inlineCallbacks
    def test_login_with_imaplib(self):
        def talk():
            m = imaplib.IMAP4("127.0.0.1", self.portno)
            m.starttls(client_context())
            try:
                m.login("alice", "wrong")
            except imaplib.IMAP4.error as e:
                bad = str(e)
            ok = m.login("alice", "secret")
            ns = m.namespace()
            m.logout()
            return bad, ok, ns
        bad, ok, ns = yield self.thread(talk)
        self.assertIn("AUTHENTICATIONFAILED", bad)
        self.assertEqual(ok[0], "OK")
        self.assertEqual(ns[1], [b'(("" ".")) NIL NIL'])

    @defer.inlineCallbacks
    def test_authenticate_plain_continuation_and_cancel(self):
        def talk():
            c = RawIMAP(self.portno)
            c.starttls()
            c.send(b"a AUTHENTICATE PLAIN\r\n")
            cont = c.line()
            c.send(b"*\r\n")
            cancelled = c.until_tag(b"a")
            c.send(b"b AUTHENTICATE PLAIN\r\n")
            c.line()
            c.send(base64.b64encode(b"\x00alice\x00secret") + b"\r\n")
            ok = c.until_tag(b"b")
            return cont, cancelled, ok
        cont, cancelled, ok = yield self.thread(talk)
        self.assertEqual(cont, b"+ ")
        self.assertTrue(cancelled[-1].startswith(b"a BAD"))
        self.assertTrue(ok[-1].startswith(b"b OK [CAPABILITY"))

    @defer.inlineCallbacks
    def test_directory_down(self):
        self.directory.down = True

        def talk():
            c = RawIMAP(self.portno)
            c.starttls()
            return c.cmd("a", "LOGIN alice secret")
        r = yield self.thread(talk)
        self.assertTrue(r[-1].startswith(b"a NO [UNAVAILABLE]"), r)

    @defer.inlineCallbacks
    def test_limits_and_bad_commands(self):
        def talk():
            c = RawIMAP(self.portno)
            out = [c.cmd("a", "XYZZY"), c.cmd("b", "ENABLE IMAP4rev2")]
            c.send(b"c LOGIN {999999999}\r\n")
            out.append(c.until_tag(b"c"))
            c.send(b"d APPEND INBOX {1001}\r\n")
            out.append(c.until_tag(b"d"))
            out.append(c.cmd("e", "NOOP"))
            c.send(b"f LOGOUT\r\n")
            out.append(c.until_tag(b"f"))
            return out
        r = yield self.thread(talk)
        self.assertEqual(r[0], [b"a BAD Unknown command"])
        self.assertEqual(r[1], [b"b BAD Command not valid in this state"])
        self.assertTrue(r[2][-1].startswith(b"c NO [TOOBIG]"))
        self.assertTrue(r[3][-1].startswith(b"d NO [TOOBIG]"))
        self.assertEqual(r[4], [b"e OK NOOP completed"])
        self.assertEqual(r[5], [b"* BYE Logging out", b"f OK Logout completed"])


class PlaintextNetworkTests(IMAPServerTests):
    """With plaintext_auth_networks covering the client, LOGIN works without TLS."""

    def setUp(self):
        super().setUp()
        self.factory.plaintext_ok = lambda ip: ip == "127.0.0.1"

    @defer.inlineCallbacks
    def test_greeting_and_logindisabled(self):
        def talk():
            c = RawIMAP(self.portno)
            return c.greeting, c.cmd("a", "LOGIN alice secret")
        greeting, login = yield self.thread(talk)
        self.assertIn(b"AUTH=PLAIN", greeting)
        self.assertNotIn(b"LOGINDISABLED", greeting)
        self.assertTrue(login[-1].startswith(b"a OK"))


class ConnectionCapTests(IMAPServerTests):

    @defer.inlineCallbacks
    def test_sessions_per_user_and_address(self):
        self.factory.max_user_ip_connections = 2

        def talk():
            clients = [RawIMAP(self.portno) for _ in range(3)]
            answers = []
            for c in clients:
                c.starttls()
                answers.append(c.cmd("a", "LOGIN alice secret")[-1])
            clients[0].cmd("z", "LOGOUT")
            clients[0].close()
            import time
            time.sleep(0.3)
            answers.append(clients[2].cmd("b", "LOGIN alice secret")[-1])
            return answers
        answers = yield self.thread(talk)
        self.assertTrue(answers[0].startswith(b"a OK"))
        self.assertTrue(answers[1].startswith(b"a OK"))
        self.assertTrue(answers[2].startswith(b"a NO [LIMIT]"), answers[2])
        self.assertTrue(answers[3].startswith(b"b OK"), answers[3])
