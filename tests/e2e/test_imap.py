"""End-to-end: IMAP on the real process with imaplib, mail delivered over SMTP."""

import imaplib
import smtplib
import socket
import time

from twisted.trial import unittest

from tests.e2e.harness import ApplianceProcess
from tests.imap_helpers import client_context

MSG = ("From: Xavier <x@ext.test>\r\nTo: alice@example.test\r\nSubject: imap {n}\r\n"
       "Date: Sat, 28 Nov 2026 10:00:00 +0000\r\nMessage-ID: <{n}@ext.test>\r\n\r\n"
       "body number {n}\r\n")


class IMAPTests(unittest.TestCase):

    def setUp(self):
        self.app = ApplianceProcess(self.mktemp(), listeners=("imap", "imaps")).start()
        self.addCleanup(self.app.stop)
        self.send(1, 2)

    def send(self, *numbers):
        with smtplib.SMTP("127.0.0.1", self.app.smtp_port) as s:
            for n in numbers:
                s.sendmail("x@ext.test", ["alice@example.test"], MSG.format(n=n))

    def login(self):
        m = imaplib.IMAP4("127.0.0.1", self.app.ports["imap"], timeout=10)
        m.starttls(client_context())
        m.login("alice", "alice-secret")
        self.addCleanup(self._shutdown, m)
        return m

    @staticmethod
    def _shutdown(m):
        try:
            m.shutdown()
        except OSError:
            pass

    def test_read_flag_copy_move_expunge(self):
        self.app.wait_for(lambda: len(self.app.messages("alice")) == 2, what="delivery")
        m = self.login()
        typ, boxes = m.list()
        listing = b"\n".join(boxes)
        for special in (b"\\Sent", b"\\Drafts", b"\\Trash", b"\\Junk", b"\\Archive"):
            self.assertIn(special, listing)
        typ, data = m.select("INBOX")
        self.assertEqual((typ, data), ("OK", [b"2"]))
        typ, data = m.fetch("1:*", "(FLAGS INTERNALDATE RFC822.SIZE ENVELOPE)")
        self.assertEqual(typ, "OK")
        self.assertIn(b'"imap 1"', data[0])
        self.assertIn(b'(("Xavier" NIL "x" "ext.test"))', data[0])
        typ, data = m.uid("FETCH", "1", "(BODY.PEEK[])")
        self.assertIn(b"body number 1", data[0][1])
        typ, data = m.search(None, "FROM", "xavier", "SUBJECT", "imap 2")
        self.assertEqual(data, [b"2"])
        typ, data = m.store("1", "+FLAGS", "(\\Seen \\Flagged)")
        self.assertIn(b"\\Flagged", data[0])
        typ, data = m.copy("1", "Archive")
        self.assertEqual(typ, "OK")
        self.assertRegex(m.response("COPYUID")[1][0], rb"\d+ 1 1")
        typ, data = m._simple_command("MOVE", "2", "Trash")
        self.assertEqual(typ, "OK")
        typ, data = m.store("1", "+FLAGS", "(\\Deleted)")
        typ, data = m.expunge()
        # imaplib also returns the EXPUNGE the MOVE caused.
        self.assertEqual(data, [b"2", b"1"])
        typ, data = m.status("Archive", "(MESSAGES UNSEEN UIDNEXT)")
        self.assertEqual(data, [b'"Archive" (MESSAGES 1 UNSEEN 0 UIDNEXT 2)'])
        typ, data = m.status("Trash", "(MESSAGES)")
        self.assertEqual(data, [b'"Trash" (MESSAGES 1)'])
        m.logout()

    def test_append_and_folders(self):
        m = self.login()
        typ, data = m.append("Drafts", "(\\Draft)", imaplib.Time2Internaldate(time.time()),
                             b"Subject: draft\r\n\r\nunfinished\r\n")
        self.assertEqual(typ, "OK")
        self.assertRegex(data[0], rb"\[APPENDUID \d+ 1\]")
        self.assertEqual(m.create("Projects.Q1")[0], "OK")
        self.assertEqual(m.rename("Projects.Q1", "Projects.Q2")[0], "OK")
        typ, boxes = m.list('""', "Projects*")
        self.assertIn(b"Projects.Q2", b"".join(boxes))
        self.assertEqual(m.delete("Projects.Q2")[0], "OK")
        for bad in ("../escape", "a/b", "..", "x" * 300):
            typ, data = m.create(bad)
            self.assertEqual(typ, "NO", bad)
        self.assertEqual(m.select("Nonexistent")[0], "NO")
        typ, data = m.select("Drafts")
        self.assertEqual(data, [b"1"])
        m.logout()

    def test_idle_sees_new_mail(self):
        self.app.wait_for(lambda: len(self.app.messages("alice")) == 2, what="delivery")
        raw = socket.create_connection(("127.0.0.1", self.app.ports["imaps"]), timeout=10)
        s = client_context().wrap_socket(raw)
        f = s.makefile("rb")
        f.readline()
        s.sendall(b"a LOGIN alice alice-secret\r\nb SELECT INBOX\r\n")
        while not f.readline().startswith(b"b OK"):
            pass
        s.sendall(b"c IDLE\r\n")
        self.assertTrue(f.readline().startswith(b"+"))
        start = time.monotonic()
        self.send(3)
        line = f.readline()
        self.assertEqual(line, b"* 3 EXISTS\r\n")
        self.assertLess(time.monotonic() - start, 2.0)
        s.sendall(b"DONE\r\n")
        rest = []
        while True:
            l = f.readline()
            rest.append(l)
            if l.startswith(b"c "):
                break
        self.assertEqual(rest[-1], b"c OK IDLE terminated\r\n")
        s.close()


MULTIPART = (b"From: a@ext.test\r\nTo: alice@example.test\r\nSubject: parts\r\n"
             b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"b1\"\r\n\r\n"
             b"--b1\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nhello part one\r\n"
             b"--b1\r\nContent-Type: application/pdf; name=\"x.pdf\"\r\n"
             b"Content-Disposition: attachment; filename=\"x.pdf\"\r\n"
             b"Content-Transfer-Encoding: base64\r\n\r\nJVBERi0xLjQK\r\n--b1--\r\n")


class IMAPStructureTests(unittest.TestCase):
    """FETCH of structure and sections through the real process."""

    def test_bodystructure_sections_partial(self):
        app = ApplianceProcess(self.mktemp(), listeners=("imaps",)).start()
        self.addCleanup(app.stop)
        m = imaplib.IMAP4_SSL("127.0.0.1", app.ports["imaps"], ssl_context=client_context())
        m.login("alice", "alice-secret")
        typ, data = m.append("INBOX", None, None, MULTIPART)
        self.assertEqual(typ, "OK")
        m.select("INBOX")
        typ, data = m.fetch("1", "(BODYSTRUCTURE)")
        self.assertIn(b'("TEXT" "PLAIN" ("CHARSET" "utf-8")', data[0])
        self.assertIn(b'"APPLICATION" "PDF" ("NAME" "x.pdf")', data[0])
        self.assertIn(b'"MIXED" ("BOUNDARY" "b1")', data[0])
        typ, data = m.fetch("1", "(BODY.PEEK[1] BODY.PEEK[2.MIME] BODY.PEEK[TEXT]<0.6> "
                                 "RFC822.HEADER FLAGS)")
        joined = b"".join(part if isinstance(part, bytes) else b"".join(part) for part in data)
        self.assertIn(b"hello part one", joined)
        self.assertIn(b"Content-Disposition: attachment", joined)
        self.assertIn(b"BODY[TEXT]<0> {6}", joined)
        self.assertIn(b"Subject: parts", joined)
        self.assertNotIn(b"\\Seen", joined)        # PEEK and RFC822.HEADER do not set it
        typ, data = m.fetch("1", "(BODY[1])")
        self.assertIn(b"\\Seen", b"".join(p if isinstance(p, bytes) else b"".join(p)
                                          for p in data))
        m.logout()
