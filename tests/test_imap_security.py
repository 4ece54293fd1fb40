"""IMAP and POP3 bad input against the real store (security catalogue J and K)."""

import os

from twisted.internet import defer
from twisted.trial import unittest

from tests.imap_helpers import RawIMAP
from tests.smtp_helpers import ApplianceMixin


class IMAPBadInputTests(ApplianceMixin, unittest.TestCase):

    def setUp(self):
        return self.start_appliance(listeners=("imap", "pop3"))

    def session(self, select=True):
        c = RawIMAP(self.ports["imap"])
        c.starttls()
        assert c.cmd("l", "LOGIN alice secret")[-1].startswith(b"l OK")
        if select:
            assert c.cmd("s", "SELECT INBOX")[-1].startswith(b"s OK")
        return c

    def user_tree(self):
        """Every path under the data dir except alice's Maildir and the queue."""
        out = set()
        for root, dirs, files in os.walk(self.config.server.data_dir):
            for n in dirs + files:
                p = os.path.join(root, n)
                if "/alice/Maildir" not in p and "/queue/" not in p:
                    out.add(p)
        return out

    @defer.inlineCallbacks
    def test_literal_sizes(self):
        def talk():
            c = RawIMAP(self.ports["imap"])
            out = []
            for marker in (b"{4294967296}", b"{99999999999999999999}", b"{-1}", b"{5"):
                c.send(b"a LOGIN " + marker + b"\r\n")
                out.append(c.until_tag(b"a"))
            c.starttls()
            c.cmd("l", "LOGIN alice secret")
            c.send(b"b APPEND INBOX {50000000000}\r\n")
            out.append(c.until_tag(b"b"))
            c.send(b"c SEARCH {-100}zzz\r\n")
            out.append(c.until_tag(b"c"))
            out.append(c.cmd("d", "NOOP"))
            c.send(b"e APPEND INBOX {100000000+}\r\n")
            out.append(c.until_tag(b"e"))
            out.append(c.quiet(1.0))
            return out
        out = yield self.in_thread(talk)
        for lines in out[:4]:
            self.assertFalse(any(l.startswith(b"+") for l in lines), lines)
            self.assertRegex(lines[-1], rb"^a (BAD|NO) ")
        self.assertTrue(out[4][-1].startswith(b"b NO [TOOBIG]"), out[4])
        self.assertTrue(out[5][-1].startswith(b"c BAD"), out[5])
        self.assertEqual(out[6][-1], b"d OK NOOP completed")
        self.assertTrue(out[7][-1].startswith(b"e NO [TOOBIG]"), out[7])

    @defer.inlineCallbacks
    def test_mailbox_name_traversal(self):
        yield self.in_thread(lambda: self.session(select=False).close())   # first login
        before = self.user_tree()
        names = ['"../../x"', '"~root"', '"/etc"', '"a//b"', '"a/../b"', '".hidden"',
                 '"&AC8-x"', '"INBOX/../../bob/INBOX"', '"x' + "y" * 400 + '"', '"a.."',
                 '"..a"', '"."']

        def talk():
            c = self.session(select=False)
            out = [c.cmd("c", "CREATE " + n) for n in names]
            out.append(c.cmd("r", 'RENAME INBOX "../x"'))
            out.append(c.cmd("s", 'SELECT "../bob"'))
            c.send(b"k CREATE {19}\r\n")
            c.line()
            c.send(b"x\r\n* OK [ALERT] pwn\r\n")
            out.append(c.until_tag(b"k"))
            listing = c.cmd("l", 'LIST "" "*"')
            return out, listing
        out, listing = yield self.in_thread(talk)
        for lines in out:
            self.assertRegex(lines[-1], rb"^\w (NO|BAD) ", lines)
        self.assertEqual(self.user_tree(), before)
        for line in listing:
            self.assertNotIn(b"pwn", line)

    @defer.inlineCallbacks
    def test_parser_depth_and_numbers(self):
        import smtplib

        def deliver():
            with smtplib.SMTP("127.0.0.1", self.port) as s:
                s.sendmail("x@ext.test", ["alice@example.test"], b"Subject: a\r\n\r\nb\r\n")
        yield self.in_thread(deliver)
        yield self.settle()

        def talk():
            c = self.session()
            out = [c.cmd("a", "SEARCH " + "(" * 5000 + "ALL" + ")" * 5000),
                   c.cmd("b", "SEARCH " + "NOT " * 5000 + "ALL"),
                   c.cmd("c", "FETCH 1 BODY[" + ".".join(["1"] * 10000) + "]"),
                   c.cmd("d", "FETCH 0 FLAGS"),
                   c.cmd("e", "FETCH 4294967296 FLAGS"),
                   c.cmd("f", "FETCH 1 BODY[]<0.4294967296>"),
                   c.cmd("g", "STORE 1 +FLAGS (" + " ".join(f"k{i}" for i in range(1000)) + ")"),
                   c.cmd("h", "FETCH 1 (FLAGS)")]
            return out
        out = yield self.in_thread(talk)
        for lines in out[:5]:
            self.assertRegex(lines[-1], rb"^\w (NO|BAD|OK) ", lines)
        self.assertTrue(out[3][-1].startswith(b"d BAD"))
        self.assertTrue(out[4][-1].startswith(b"e BAD"))
        self.assertTrue(out[7][-1].startswith(b"h OK"))

    @defer.inlineCallbacks
    def test_pop3_arguments(self):
        import poplib
        from tests.imap_helpers import client_context

        def talk():
            p = poplib.POP3("127.0.0.1", self.ports["pop3"], timeout=10)
            p.stls(context=client_context())
            p.user("alice")
            p.pass_("secret")
            out = []
            for cmd in ("RETR 0", "RETR -1", "RETR 4294967296", "TOP 1 -5",
                        "LIST 99999999999999999999", "X" * 300):
                try:
                    out.append(p._shortcmd(cmd))
                except poplib.error_proto as e:
                    out.append(e.args[0])
            out.append(p.noop())
            return out
        out = yield self.in_thread(talk)
        for r in out[:-1]:
            self.assertTrue(r.startswith(b"-ERR"), r)
        self.assertTrue(out[-1].startswith(b"+OK"))
