"""IMAP framing and tokenizing: literals, bounds, sections kept whole."""

from twisted.trial import unittest

from mailbox_appliance.imap.parser import (
    Command, CommandReader, LineTooLong, LiteralTooBig, ParseError, tokenize)
from mailbox_appliance.imap.tokens import Atom


def feed_all(reader, *chunks):
    events = []
    for c in chunks:
        events += reader.feed(c)
    return events


class ReaderTests(unittest.TestCase):

    def test_simple_command(self):
        (cmd,) = CommandReader().feed(b"a1 login alice secret\r\n")
        self.assertIsInstance(cmd, Command)
        self.assertEqual((cmd.tag, cmd.name), ("a1", "LOGIN"))
        self.assertEqual(cmd.arguments(), [Atom("alice"), Atom("secret")])

    def test_synchronizing_literal(self):
        r = CommandReader()
        events = r.feed(b"a2 LOGIN {5}\r\n")
        self.assertEqual(events, [("continue", None)])
        events = feed_all(r, b"al", b"ice \"pa\\\"ss\"\r\n")
        self.assertEqual(events[0].arguments(), [b"alice", b'pa"ss'])

    def test_non_synchronizing_literal_in_one_write(self):
        (cmd,) = CommandReader().feed(b"a3 APPEND INBOX (\\Seen) {12+}\r\nHello\r\nWorld\r\n")
        self.assertEqual(cmd.arguments(), [Atom("INBOX"), [Atom("\\Seen")], b"Hello\r\nWorld"])

    def test_literal_too_big_is_refused_before_buffering(self):
        r = CommandReader(max_literal=100, max_append=1000)
        (e,) = r.feed(b"a4 LOGIN {101}\r\n")
        self.assertIsInstance(e, LiteralTooBig)
        self.assertEqual((e.tag, e.synchronizing), ("a4", True))
        # The client did not get "+", so the next line is a new command.
        (cmd,) = r.feed(b"a5 NOOP\r\n")
        self.assertEqual(cmd.name, "NOOP")
        (e,) = r.feed(b"a6 APPEND INBOX {1001}\r\n")
        self.assertIsInstance(e, LiteralTooBig)
        self.assertEqual(r.feed(b"a7 APPEND INBOX {1000}\r\n"), [("continue", None)])

    def test_huge_non_synchronizing_literal_is_swallowed(self):
        r = CommandReader(max_literal=10)
        events = r.feed(b"a8 LOGIN {20+}\r\n" + b"x" * 20 + b" y\r\na9 NOOP\r\n")
        self.assertIsInstance(events[0], LiteralTooBig)
        self.assertFalse(events[0].synchronizing)
        self.assertEqual(events[1].name, "NOOP")

    def test_absurd_literal_sizes(self):
        for marker in (b"{99999999999999999999}", b"{-1}", b"{ 5}"):
            events = CommandReader().feed(b"b1 LOGIN " + marker + b"\r\n")
            self.assertEqual(len(events), 1)
            self.assertNotIsInstance(events[0], tuple)   # never a continuation

    def test_line_too_long(self):
        r = CommandReader(max_line=100)
        (e,) = r.feed(b"c1 NOOP " + b"x" * 200)
        self.assertIsInstance(e, LineTooLong)
        self.assertEqual(e.tag, "c1")
        self.assertEqual(r.feed(b"xxxx\r\n"), [])        # the rest of that line is dropped
        (cmd,) = r.feed(b"c2 NOOP\r\n")
        self.assertEqual(cmd.tag, "c2")

    def test_total_size_with_literals_is_bounded(self):
        r = CommandReader(max_line=50, max_literal=40)
        events = r.feed(b"d1 LOGIN {30}\r\n")
        events += r.feed(b"x" * 30 + b" {30}\r\n")
        self.assertIsInstance(events[-1], LiteralTooBig)

    def test_bad_tags(self):
        for line in (b"\r\n", b"* NOOP\r\n", b"a+ NOOP\r\n", b"lonely\r\n"):
            (e,) = CommandReader().feed(line)
            self.assertIsInstance(e, ParseError, line)


class TokenizeTests(unittest.TestCase):

    def tok(self, text):
        return tokenize([("text", text)])

    def test_fetch_items_with_sections(self):
        self.assertEqual(
            self.tok(b"a FETCH 1:* (FLAGS BODY.PEEK[HEADER.FIELDS (FROM TO)]<0.100> BODY[])"),
            ["a", "FETCH", "1:*", ["FLAGS", "BODY.PEEK[HEADER.FIELDS (FROM TO)]<0.100>",
                                   "BODY[]"]])

    def test_quoted_and_nested(self):
        self.assertEqual(self.tok(b'a SEARCH OR (FROM "a b") NOT SUBJECT "\\\\x"'),
                         ["a", "SEARCH", "OR", ["FROM", b"a b"], "NOT", "SUBJECT", b"\\x"])

    def test_errors(self):
        for bad in (b'a X "open', b"a X (b", b"a X b)", b'a X "\\q"', b"a X [b",
                    b"a X \xff", b"a X " + b"(" * 200):
            self.assertRaises(ParseError, self.tok, bad)
