"""POP3 protocol: states, STLS, AUTH PLAIN, listing, retrieval, deletion at QUIT, locking."""

import base64
import poplib
import ssl

from twisted.internet import defer, reactor, threads
from twisted.trial import unittest

from mailbox_appliance import config as config_module, tls
from mailbox_appliance.authn import Authenticator
from mailbox_appliance.pop3.server import MaildropLocked, POP3ServerFactory, _dot_stuff, _top
from tests.fakes import FakeDirectory

M1 = b"From: a@ext.test\r\nSubject: one\r\n\r\nfirst\r\n.dot line\r\n"
M2 = b"From: b@ext.test\r\nSubject: two\r\n\r\nl1\r\nl2\r\nl3\r\n"


class FakeMessage:
    def __init__(self, uid, data):
        self.uid, self.data, self.size = uid, data, len(data)
        self.uidl = f"{7:08X}{uid:08X}"


class FakeMaildrop:
    def __init__(self, owner, messages):
        self.owner, self.messages, self.deleted, self.released = owner, messages, None, False

    def read(self, msg):
        return defer.succeed(msg.data)

    def delete(self, numbers):
        self.deleted = numbers
        return defer.succeed(None)

    def release(self):
        self.released = True
        self.owner.locked.discard("alice")


class FakeMaildrops:
    def __init__(self):
        self.locked = set()
        self.opened = []

    def open(self, user):
        if user.uid in self.locked:
            raise MaildropLocked(user.uid)
        self.locked.add(user.uid)
        m = FakeMaildrop(self, [FakeMessage(1, M1), FakeMessage(2, M2)])
        self.opened.append(m)
        return m


class Directory(FakeDirectory):
    def authenticate(self, login, password):
        user = self.users.get(login.lower()) or self.users.get(f"{login.lower()}@example.test")
        if self.down:
            from mailbox_appliance.interfaces import DirectoryUnavailable
            return defer.fail(DirectoryUnavailable("down"))
        return defer.succeed(user if user and password == "secret" else None)


def client_context():
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


class POP3Tests(unittest.TestCase):

    def setUp(self):
        tmp = self.mktemp()
        cfg = config_module.Config()
        import dataclasses, os
        cfg = dataclasses.replace(cfg, server=dataclasses.replace(cfg.server, data_dir=os.path.abspath(tmp)))
        os.makedirs(cfg.server.data_dir)
        ctx, _ = tls.server_context_factory(cfg)
        self.directory = Directory()
        self.directory.add_user("alice", "alice@example.test")
        self.maildrops = FakeMaildrops()
        factory = POP3ServerFactory(reactor, "pop.example.test",
                                    Authenticator(self.directory, reactor), self.maildrops,
                                    tls_context=ctx)
        self.port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)
        self.portno = self.port.getHost().port

    def run_client(self, f):
        return threads.deferToThread(f)

    def connect(self, tls_on=True):
        p = poplib.POP3("127.0.0.1", self.portno, timeout=10)
        if tls_on:
            p.stls(context=client_context())
        return p

    @defer.inlineCallbacks
    def test_session(self):
        def talk():
            p = self.connect()
            caps = p.capa()
            p.user("alice")
            p.pass_("secret")
            out = {"caps": caps, "stat": p.stat(), "list": p.list()[1], "uidl": p.uidl()[1],
                   "retr": p.retr(1)[1], "top": p.top(2, 1)[1], "uidl1": p.uidl(2)}
            p.dele(1)
            out["stat2"] = p.stat()
            out["rset"] = p.rset()
            p.dele(2)
            out["quit"] = p.quit()
            return out
        out = yield self.run_client(talk)
        self.assertIn("UIDL", out["caps"])
        self.assertIn("SASL", out["caps"])
        self.assertEqual(out["stat"], (2, len(M1) + len(M2)))
        self.assertEqual(out["list"], [b"1 %d" % len(M1), b"2 %d" % len(M2)])
        self.assertEqual(out["uidl"], [b"1 0000000700000001", b"2 0000000700000002"])
        self.assertEqual(out["retr"], [b"From: a@ext.test", b"Subject: one", b"", b"first",
                                       b".dot line"])
        self.assertEqual(out["top"], [b"From: b@ext.test", b"Subject: two", b"", b"l1"])
        self.assertEqual(out["stat2"], (1, len(M2)))
        self.assertTrue(out["quit"].startswith(b"+OK"))
        md = self.maildrops.opened[0]
        self.assertEqual(md.deleted, [2])
        self.assertTrue(md.released)

    @defer.inlineCallbacks
    def test_plaintext_login_refused_before_stls(self):
        def talk():
            p = self.connect(tls_on=False)
            caps = p.capa()
            errors = []
            for f in (lambda: p.user("alice"), lambda: p._shortcmd("AUTH PLAIN AGFsaWNlAHNlY3JldA==")):
                try:
                    f()
                except poplib.error_proto as e:
                    errors.append(e.args[0])
            p.quit()
            return caps, errors
        caps, errors = yield self.run_client(talk)
        self.assertIn("STLS", caps)
        self.assertNotIn("USER", caps)
        self.assertEqual(len(errors), 2)
        for e in errors:
            self.assertTrue(e.startswith(b"-ERR [AUTH]"), e)

    @defer.inlineCallbacks
    def test_stls_discards_pipelined_plaintext(self):
        import socket

        def talk():
            s = socket.create_connection(("127.0.0.1", self.portno), timeout=10)
            s.recv(100)
            s.sendall(b"STLS\r\nUSER alice\r\n")
            first = s.recv(100)
            t = client_context().wrap_socket(s)
            t.settimeout(1)
            try:
                extra = t.recv(100)
            except (socket.timeout, ssl.SSLError):
                extra = b""
            t.settimeout(10)
            t.sendall(b"NOOP\r\n")
            after = t.recv(100)
            t.close()
            return first, extra, after
        first, extra, after = yield self.run_client(talk)
        self.assertEqual(first, b"+OK Begin TLS negotiation\r\n")
        self.assertEqual(extra, b"")
        # NOOP is a TRANSACTION command: no login happened from the plaintext USER.
        self.assertTrue(after.startswith(b"-ERR"))

    @defer.inlineCallbacks
    def test_auth_plain_and_bad_credentials(self):
        def talk():
            p = self.connect()
            out = []
            for cmd in ("AUTH PLAIN " + base64.b64encode(b"\x00alice\x00wrong").decode(),
                        "AUTH PLAIN !!!", "AUTH FOO",
                        "AUTH PLAIN " + base64.b64encode(b"admin\x00alice\x00secret").decode()):
                try:
                    out.append(p._shortcmd(cmd))
                except poplib.error_proto as e:
                    out.append(e.args[0])
            out.append(p._shortcmd("AUTH PLAIN " + base64.b64encode(b"\x00alice\x00secret").decode()))
            out.append(p.stat())
            return out
        out = yield self.run_client(talk)
        self.assertTrue(out[0].startswith(b"-ERR [AUTH]"))
        self.assertTrue(out[1].startswith(b"-ERR"))
        self.assertTrue(out[2].startswith(b"-ERR"))
        self.assertTrue(out[3].startswith(b"-ERR [AUTH]"))
        self.assertTrue(out[4].startswith(b"+OK"))
        self.assertEqual(out[5], (2, len(M1) + len(M2)))

    @defer.inlineCallbacks
    def test_locked_maildrop_and_directory_down(self):
        self.maildrops.locked.add("alice")

        def talk():
            p = self.connect()
            p.user("alice")
            try:
                p.pass_("secret")
            except poplib.error_proto as e:
                return e.args[0]
        locked = yield self.run_client(talk)
        self.assertTrue(locked.startswith(b"-ERR [IN-USE]"), locked)
        self.directory.down = True

        def talk2():
            p = self.connect()
            p.user("alice")
            try:
                p.pass_("secret")
            except poplib.error_proto as e:
                return e.args[0]
        down = yield self.run_client(talk2)
        self.assertTrue(down.startswith(b"-ERR [SYS/TEMP]"), down)

    @defer.inlineCallbacks
    def test_disconnect_without_quit_deletes_nothing(self):
        def talk():
            p = self.connect()
            p.user("alice")
            p.pass_("secret")
            p.dele(1)
            p.sock.close()
        yield self.run_client(talk)
        d = defer.Deferred()
        reactor.callLater(0.2, d.callback, None)
        yield d
        md = self.maildrops.opened[0]
        self.assertIsNone(md.deleted)
        self.assertTrue(md.released)

    @defer.inlineCallbacks
    def test_long_line_and_unknown_command(self):
        def talk():
            p = self.connect(tls_on=False)
            out = []
            for cmd in ("X" * 300, "XYZZY", "RETR 1"):
                try:
                    out.append(p._shortcmd(cmd))
                except poplib.error_proto as e:
                    out.append(e.args[0])
            return out
        out = yield self.run_client(talk)
        self.assertEqual(out, [b"-ERR Line too long", b"-ERR Unknown command",
                               b"-ERR Command not valid in this state"])


class HelperTests(unittest.TestCase):

    def test_top(self):
        self.assertEqual(_top(M2, 0), b"From: b@ext.test\r\nSubject: two\r\n\r\n")
        self.assertEqual(_top(M2, 2), b"From: b@ext.test\r\nSubject: two\r\n\r\nl1\r\nl2\r\n")
        self.assertEqual(_top(M2, 99), M2)

    def test_dot_stuff(self):
        self.assertEqual(_dot_stuff(b".a\r\nb\r\n.\r\nc"), b"..a\r\nb\r\n..\r\nc\r\n")
