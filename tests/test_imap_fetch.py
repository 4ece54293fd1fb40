"""Tests of mailbox_appliance.imap.fetch: parsing FETCH items, what they read, and the
exact untagged FETCH responses."""

import time

from twisted.trial import unittest

from mailbox_appliance.imap import fetch, mime
from mailbox_appliance.imap.fetch import (
    HEADER, INDEX, MESSAGE, FetchSyntaxError, needs, parse_fetch_items, render_fetch,
    sets_seen, with_flags)
from mailbox_appliance.imap.tokens import Atom
from tests.test_imap_mime import RFC_MESSAGE, BodyStructureTests, parse_imap

A = Atom


def names(items):
    return [item.name for item in items]


class Msg:
    """A message-access object as render_fetch wants it; counts the reads."""

    def __init__(self, data, uid=7, flags=("\\Seen",), internaldate=837566665.0,
                 with_header=True):
        self.data = data
        self.uid = uid
        self.flags = flags
        self.internaldate = internaldate
        self.size = len(data)
        self.reads = []
        if not with_header:
            self.header = None      # as good as absent

    def text(self):
        self.reads.append("text")
        return self.data

    def header(self):
        self.reads.append("header")
        return self.data[:self.data.index(b"\r\n\r\n") + 4]


class IndexOnly:
    """Index data and cached envelope/bodystructure only: reading fails."""

    uid, flags, internaldate, size = 42, ["\\Answered", "$Label1"], 0.0, 1234
    envelope = b'(NIL "cached" NIL NIL NIL NIL NIL NIL NIL NIL)'
    bodystructure = b'("TEXT" "PLAIN" NIL NIL NIL "7BIT" 0 0 NIL NIL NIL NIL)'

    def text(self):
        raise AssertionError("text() read")

    def header(self):
        raise AssertionError("header() read")


class ParseTests(unittest.TestCase):

    def test_single_atom_and_list(self):
        self.assertEqual(names(parse_fetch_items(A("flags"))), ["FLAGS"])
        self.assertEqual(names(parse_fetch_items([A("UID"), A("Rfc822.Size")])),
                         ["UID", "RFC822.SIZE"])
        # the list of arguments after the sequence set works too
        self.assertEqual(names(parse_fetch_items([[A("UID"), A("FLAGS")]])), ["UID", "FLAGS"])
        self.assertEqual(names(parse_fetch_items([A("ENVELOPE")])), ["ENVELOPE"])

    def test_every_simple_item(self):
        items = parse_fetch_items([A(n) for n in (
            "FLAGS", "INTERNALDATE", "RFC822.SIZE", "UID", "ENVELOPE", "BODY",
            "BODYSTRUCTURE", "RFC822", "RFC822.HEADER", "RFC822.TEXT")])
        self.assertEqual([(i.name, i.needs, i.sets_seen) for i in items], [
            ("FLAGS", INDEX, False), ("INTERNALDATE", INDEX, False),
            ("RFC822.SIZE", INDEX, False), ("UID", INDEX, False), ("ENVELOPE", HEADER, False),
            ("BODY", MESSAGE, False), ("BODYSTRUCTURE", MESSAGE, False),
            ("RFC822", MESSAGE, True), ("RFC822.HEADER", HEADER, False),
            ("RFC822.TEXT", MESSAGE, True)])

    def test_macros(self):
        self.assertEqual(names(parse_fetch_items(A("ALL"))),
                         ["FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE"])
        self.assertEqual(names(parse_fetch_items(A("fast"))),
                         ["FLAGS", "INTERNALDATE", "RFC822.SIZE"])
        self.assertEqual(names(parse_fetch_items([A("Full")])),
                         ["FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE", "BODY"])

    def test_body_sections(self):
        cases = {
            "BODY[]": ("BODY[]", None, MESSAGE, True),
            "body.peek[]": ("BODY[]", None, MESSAGE, False),
            "BODY[HEADER]": ("BODY[HEADER]", None, HEADER, True),
            "BODY.PEEK[header.fields (From to)]<0.100>":
                ("BODY[HEADER.FIELDS (FROM TO)]<0>", (0, 100), HEADER, False),
            'BODY[HEADER.FIELDS.NOT ("X-Spam" Received)]':
                ("BODY[HEADER.FIELDS.NOT (X-SPAM RECEIVED)]", None, HEADER, True),
            "BODY[TEXT]<10.5>": ("BODY[TEXT]<10>", (10, 5), MESSAGE, True),
            "BODY[1.2.MIME]": ("BODY[1.2.MIME]", None, MESSAGE, True),
            "BODY.PEEK[3.HEADER]": ("BODY[3.HEADER]", None, MESSAGE, False),
            "BODY[4.2.2.1]<4294967295.4294967295>":
                ("BODY[4.2.2.1]<4294967295>", (4294967295, 4294967295), MESSAGE, True),
        }
        for text, expected in cases.items():
            item, = parse_fetch_items(A(text))
            self.assertEqual((item.name, item.partial, item.needs, item.sets_seen), expected, text)

    def test_parse_errors(self):
        for arg in [A("ALLX"), A("BODY.PEEK"), A("BODY["), A("BODY]"), A("BODY[]<0.0>"),
                    A("BODY[]<1>"), A("BODY[]<1.>"), A("BODY[]<-1.2>"), A("BODY[]<4294967296.1>"),
                    A("BODY[]<0.4294967296>"), A("BODY[MIME]"), A("BODY[0]"), A("BODY[1.]"),
                    A("BODY[HEADER.FIELDS]"), A("BODY[HEADER.FIELDS ()]"), A("BODY[FOO]"),
                    A("BODY[]x"), A("BINARY[]"), A("RFC822.PEEK"), A("BODY.PEEK[TEXT]<0.1"),
                    [], [[A("ALL")]], [A("FLAGS"), A("FAST")], [A("FLAGS"), [A("UID")]],
                    [A("FLAGS"), b"UID"], b"FLAGS", None, [None], 5, [[]],
                    [[A("FLAGS")], [A("CHANGEDSINCE"), A("1")]]]:
            self.assertRaises(FetchSyntaxError, parse_fetch_items, arg)
        self.assertTrue(issubclass(FetchSyntaxError, ValueError))

    def test_uid_fetch_adds_uid_first(self):
        self.assertEqual(names(parse_fetch_items(A("FLAGS"), uid=True)), ["UID", "FLAGS"])
        self.assertEqual(names(parse_fetch_items([A("FLAGS"), A("UID")], uid=True)),
                         ["FLAGS", "UID"])
        self.assertEqual(names(parse_fetch_items(A("FAST"), uid=True)),
                         ["UID", "FLAGS", "INTERNALDATE", "RFC822.SIZE"])

    def test_duplicates_are_answered_once(self):
        items = parse_fetch_items([A("FLAGS"), A("BODY.PEEK[]"), A("flags"), A("BODY[]"),
                                   A("BODY[]<0.5>")])
        self.assertEqual(names(items), ["FLAGS", "BODY[]", "BODY[]<0>"])
        self.assertTrue(items[1].sets_seen)

    def test_needs_and_seen(self):
        self.assertEqual(needs(parse_fetch_items(A("FAST"))), INDEX)
        self.assertEqual(needs(parse_fetch_items(A("ALL"))), HEADER)
        self.assertEqual(needs(parse_fetch_items(A("BODY.PEEK[HEADER.FIELDS (A)]"))), HEADER)
        self.assertEqual(needs(parse_fetch_items([A("UID"), A("BODY.PEEK[1]")])), MESSAGE)
        self.assertEqual(needs(parse_fetch_items(A("FULL"))), MESSAGE)
        self.assertEqual(needs([]), INDEX)
        self.assertFalse(sets_seen(parse_fetch_items(A("FULL"))))
        self.assertFalse(sets_seen(parse_fetch_items([A("BODY.PEEK[]"), A("RFC822.HEADER")])))
        self.assertTrue(sets_seen(parse_fetch_items(A("RFC822"))))
        self.assertTrue(sets_seen(parse_fetch_items(A("RFC822.TEXT"))))
        self.assertTrue(sets_seen(parse_fetch_items(A("BODY[HEADER]"))))

    def test_with_flags(self):
        items = parse_fetch_items(A("BODY[]"))
        self.assertEqual(names(with_flags(items)), ["BODY[]", "FLAGS"])
        items = parse_fetch_items([A("FLAGS"), A("BODY[]")])
        self.assertIs(with_flags(items), items)


class RenderTests(unittest.TestCase):

    def render(self, arg, msg, seq=1, uid=False):
        return render_fetch(seq, parse_fetch_items(arg, uid=uid), msg)

    def test_index_items(self):
        msg = IndexOnly()
        self.assertEqual(
            self.render(A("FAST"), msg, seq=3, uid=True),
            b'* 3 FETCH (UID 42 FLAGS (\\Answered $Label1) INTERNALDATE " 1-Jan-1970 00:00:00 +0000"'
            b" RFC822.SIZE 1234)\r\n")

    def test_internaldate_format(self):
        msg = Msg(RFC_MESSAGE, internaldate=837566665.9)   # 1996-07-17 01:24:25 UTC
        self.assertEqual(self.render(A("INTERNALDATE"), msg),
                         b'* 1 FETCH (INTERNALDATE "17-Jul-1996 01:24:25 +0000")\r\n')
        for impossible in (1e300, 1e12, float("nan"), None):
            msg.internaldate = impossible
            self.assertEqual(self.render(A("INTERNALDATE"), msg),
                             b'* 1 FETCH (INTERNALDATE " 1-Jan-1970 00:00:00 +0000")\r\n')

    def test_empty_flags(self):
        self.assertEqual(self.render(A("FLAGS"), Msg(RFC_MESSAGE, flags=set())),
                         b"* 1 FETCH (FLAGS ())\r\n")

    def test_cached_envelope_and_bodystructure_read_nothing(self):
        self.assertEqual(
            self.render(A("ALL"), IndexOnly()),
            b'* 1 FETCH (FLAGS (\\Answered $Label1) INTERNALDATE " 1-Jan-1970 00:00:00 +0000"'
            b' RFC822.SIZE 1234 ENVELOPE (NIL "cached" NIL NIL NIL NIL NIL NIL NIL NIL))\r\n')
        self.assertEqual(self.render(A("BODYSTRUCTURE"), IndexOnly()),
                         b'* 1 FETCH (BODYSTRUCTURE ("TEXT" "PLAIN" NIL NIL NIL "7BIT" 0 0'
                         b" NIL NIL NIL NIL))\r\n")

    def test_envelope_from_the_header_only(self):
        msg = Msg(RFC_MESSAGE)
        out = self.render([A("UID"), A("ENVELOPE")], msg)
        self.assertEqual(out, b"* 1 FETCH (UID 7 ENVELOPE " + mime.envelope(RFC_MESSAGE) + b")\r\n")
        self.assertEqual(msg.reads, ["header"])

    def test_header_items_read_the_header_only(self):
        msg = Msg(RFC_MESSAGE)
        header = RFC_MESSAGE[:RFC_MESSAGE.index(b"\r\n\r\n") + 4]
        out = self.render([A("RFC822.HEADER"), A("BODY.PEEK[HEADER]"),
                           A("BODY.PEEK[HEADER.FIELDS (subject)]")], msg)
        self.assertEqual(
            out,
            b"* 1 FETCH (RFC822.HEADER {%d}\r\n%s BODY[HEADER] {%d}\r\n%s"
            b" BODY[HEADER.FIELDS (SUBJECT)] {49}\r\n"
            b"Subject: IMAP4rev1 WG mtg summary and minutes\r\n\r\n)\r\n"
            % (len(header), header, len(header), header))
        self.assertEqual(msg.reads, ["header"])

    def test_without_header_callable_the_message_is_read(self):
        msg = Msg(RFC_MESSAGE, with_header=False)
        self.render([A("ENVELOPE"), A("RFC822.HEADER")], msg)
        self.assertEqual(msg.reads, ["text"])

    def test_message_read_once_for_many_items(self):
        msg = Msg(BodyStructureTests.MIXED)
        out = self.render([A("BODYSTRUCTURE"), A("BODY"), A("ENVELOPE"), A("RFC822.HEADER"),
                           A("BODY[1.2]"), A("BODY.PEEK[3.HEADER.FIELDS (SUBJECT)]"),
                           A("RFC822.TEXT")], msg)
        self.assertEqual(msg.reads, ["text"])
        self.assertIn(b"BODYSTRUCTURE " + mime.bodystructure(BodyStructureTests.MIXED) + b" BODY "
                      + mime.bodystructure(BodyStructureTests.MIXED, False) + b" ENVELOPE ", out)
        self.assertIn(b" BODY[1.2] {12}\r\niVBORw0KGgo= BODY[3.HEADER.FIELDS (SUBJECT)] {21}\r\n"
                      b"Subject: original\r\n\r\n RFC822.TEXT {", out)

    def test_whole_message_items(self):
        msg = Msg(RFC_MESSAGE)
        body = RFC_MESSAGE.partition(b"\r\n\r\n")[2]
        self.assertEqual(self.render(A("RFC822"), msg),
                         b"* 1 FETCH (RFC822 {%d}\r\n%s)\r\n" % (len(RFC_MESSAGE), RFC_MESSAGE))
        self.assertEqual(self.render(A("BODY[]"), msg),
                         b"* 1 FETCH (BODY[] {%d}\r\n%s)\r\n" % (len(RFC_MESSAGE), RFC_MESSAGE))
        self.assertEqual(self.render(A("RFC822.TEXT"), msg),
                         b"* 1 FETCH (RFC822.TEXT {%d}\r\n%s)\r\n" % (len(body), body))
        self.assertEqual(self.render(A("BODY.PEEK[TEXT]"), msg),
                         b"* 1 FETCH (BODY[TEXT] {%d}\r\n%s)\r\n" % (len(body), body))
        self.assertEqual(self.render(A("BODY[1]"), msg),
                         b"* 1 FETCH (BODY[1] {%d}\r\n%s)\r\n" % (len(body), body))

    def test_partials(self):
        msg = Msg(RFC_MESSAGE)
        self.assertEqual(self.render(A("BODY[]<0.10>"), msg),
                         b"* 1 FETCH (BODY[]<0> {10}\r\nDate: Wed,)\r\n")
        self.assertEqual(self.render(A("BODY.PEEK[TEXT]<6.100000>"), msg),
                         b"* 1 FETCH (BODY[TEXT]<6> {35}\r\nTerry,\r\nthe minutes are attached.\r\n)\r\n")
        self.assertEqual(self.render(A("BODY[]<%d.10>" % len(RFC_MESSAGE)), msg),
                         b'* 1 FETCH (BODY[]<%d> "")\r\n' % len(RFC_MESSAGE))
        self.assertEqual(self.render(A("BODY[HEADER.FIELDS (FROM TO)]<0.4>"), msg),
                         b"* 1 FETCH (BODY[HEADER.FIELDS (FROM TO)]<0> {4}\r\nFrom)\r\n")

    def test_missing_part_is_an_empty_string(self):
        msg = Msg(RFC_MESSAGE)
        self.assertEqual(self.render([A("BODY[2]"), A("BODY[1.HEADER]"), A("BODY[3]<0.5>")], msg),
                         b'* 1 FETCH (BODY[2] "" BODY[1.HEADER] "" BODY[3]<0> "")\r\n')

    def test_header_fields_case_insensitive(self):
        msg = Msg(b"FROM: a@b\r\nsubject: s\r\nTo: c@d\r\nX-From: no\r\n\r\nbody")
        self.assertEqual(self.render(A("BODY.PEEK[HEADER.FIELDS (from Subject)]"), msg),
                         b"* 1 FETCH (BODY[HEADER.FIELDS (FROM SUBJECT)] {25}\r\n"
                         b"FROM: a@b\r\nsubject: s\r\n\r\n)\r\n")
        self.assertEqual(self.render(A("BODY.PEEK[HEADER.FIELDS.NOT (from Subject)]"), msg),
                         b"* 1 FETCH (BODY[HEADER.FIELDS.NOT (FROM SUBJECT)] {23}\r\n"
                         b"To: c@d\r\nX-From: no\r\n\r\n)\r\n")

    def test_nul_sent_as_0x80(self):
        data = b"Subject: x\r\n\r\na\x00b\r\n"
        out = self.render(A("BODY[TEXT]"), Msg(data))
        self.assertEqual(out, b"* 1 FETCH (BODY[TEXT] {5}\r\na\x80b\r\n)\r\n")

    def test_header_and_text_accept_buffers(self):
        class Buffers(Msg):
            def text(self):
                return memoryview(self.data)

            def header(self):
                return bytearray(Msg.header(self))
        msg = Buffers(RFC_MESSAGE)
        self.assertEqual(self.render(A("BODY.PEEK[HEADER.FIELDS (TO)]"), msg),
                         b"* 1 FETCH (BODY[HEADER.FIELDS (TO)] {31}\r\n"
                         b"To: imap@cac.washington.edu\r\n\r\n)\r\n")
        self.assertIn(b"BODYSTRUCTURE (", self.render(A("BODYSTRUCTURE"), msg))

    def test_response_parses(self):
        msg = Msg(BodyStructureTests.MIXED, flags=["\\Seen", "\\Flagged"])
        line = self.render([A("UID"), A("FLAGS"), A("INTERNALDATE"), A("RFC822.SIZE"),
                            A("ENVELOPE"), A("BODY"), A("BODYSTRUCTURE"), A("BODY[]"),
                            A("BODY[3.TEXT]<5.20>")], msg, seq=12)
        self.assertTrue(line.startswith(b"* 12 FETCH ("))
        self.assertTrue(line.endswith(b")\r\n"))
        value = parse_imap(line[len(b"* 12 FETCH "):-2])
        self.assertEqual(value[:8], ["UID", 7, "FLAGS", ["\\Seen", "\\Flagged"], "INTERNALDATE",
                                     b"17-Jul-1996 01:24:25 +0000", "RFC822.SIZE",
                                     len(BodyStructureTests.MIXED)])
        self.assertEqual(value[-4:-2], ["BODY[]", BodyStructureTests.MIXED])
        self.assertEqual(value[-2], "BODY[3.TEXT]<5>")
        self.assertEqual(len(value[-1]), 20)

    def test_10000_messages_with_cached_envelopes(self):
        data = (b"Date: Mon, 7 Feb 1994 21:52:25 -0800\r\nFrom: Terry Gray <gray@cac.washington.edu>\r\n"
                b"To: imap@cac.washington.edu\r\nSubject: afternoon meeting\r\n"
                b"Message-ID: <B27397-0100000@cac.washington.edu>\r\n\r\nbody\r\n")
        env = mime.envelope(data)
        messages = []
        for uid in range(1, 10001):
            msg = IndexOnly()
            msg.uid, msg.flags, msg.internaldate, msg.size = uid, {"\\Seen"}, 1.7e9 + uid, 1000
            msg.envelope = env
            messages.append(msg)
        items = parse_fetch_items([[A("FLAGS"), A("INTERNALDATE"), A("RFC822.SIZE"), A("ENVELOPE")]],
                                  uid=True)
        started = time.process_time()
        out = [render_fetch(seq, items, msg) for seq, msg in enumerate(messages, 1)]
        elapsed = time.process_time() - started
        self.assertLess(elapsed, 0.3)
        self.assertEqual(out[0], b'* 1 FETCH (UID 1 FLAGS (\\Seen) INTERNALDATE "14-Nov-2023 22:13:21'
                                 b' +0000" RFC822.SIZE 1000 ENVELOPE ' + env + b")\r\n")


class FetchItemTests(unittest.TestCase):

    def test_render_alone(self):
        item, = parse_fetch_items(A("RFC822.SIZE"))
        self.assertEqual(item.render(IndexOnly()), b"RFC822.SIZE 1234")
        self.assertEqual(repr(item), "FetchItem('RFC822.SIZE')")

    def test_section_object(self):
        item, = parse_fetch_items(A("BODY.PEEK[2.HEADER.FIELDS (A B)]<1.2>"))
        self.assertEqual(str(item.section), "2.HEADER.FIELDS (A B)")
        self.assertEqual(item.section.path, (2,))
        self.assertEqual(item.partial, (1, 2))

    def test_module_constants(self):
        self.assertEqual((fetch.INDEX, fetch.HEADER, fetch.MESSAGE), (0, 1, 2))
        self.assertLess(INDEX, HEADER)
        self.assertLess(HEADER, MESSAGE)
