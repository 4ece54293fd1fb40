"""IMAP SEARCH: parsing of every key, bounds, charsets and matching rules."""

import base64
import datetime
import re
import time

from twisted.trial import unittest

from mailbox_appliance.imap import search as search_module
from mailbox_appliance.imap.search import (
    Query, SearchBadCharset, SearchSyntaxError, parse_search,
)
from mailbox_appliance.imap.tokens import Atom

UTC = datetime.timezone.utc
_TOKEN = re.compile(rb'\s*(?:(\()|(\))|"((?:[^"\\]|\\.)*)"|\{(\d+)\}\r\n|([^\s()"]+))')


def T(text):
    """Tokens as the command parser makes them: Atom, bytes, lists.

    ``{n}\\r\\n`` followed by n octets stands for a literal.
    """
    if isinstance(text, str):
        text = text.encode("utf-8")
    elif isinstance(text, (list, tuple)):
        text = b" ".join(t.encode("utf-8") if isinstance(t, str) else t for t in text)
    stack = [[]]
    i = 0
    while i < len(text):
        m = _TOKEN.match(text, i)
        if m is None:
            break
        i = m.end()
        if m.group(1):
            stack.append([])
        elif m.group(2):
            done = stack.pop()
            stack[-1].append(done)
        elif m.group(3) is not None:
            stack[-1].append(re.sub(rb"\\(.)", rb"\1", m.group(3)))
        elif m.group(4):
            n = int(m.group(4))
            stack[-1].append(text[i:i + n])
            i += n
        else:
            stack[-1].append(Atom(m.group(5).decode("ascii")))
    assert len(stack) == 1, "unbalanced test input"
    return stack[0]


def L(text):
    """A literal holding ``text`` in UTF-8, for ``T``."""
    data = text.encode("utf-8") if isinstance(text, str) else text
    return b"{%d}\r\n" % len(data) + data


def utc(y, mo, d, h=12, mi=0):
    return datetime.datetime(y, mo, d, h, mi, tzinfo=UTC).timestamp()


class Msg:
    """A message-access object that counts reads of its header and text."""

    def __init__(self, uid, data=b"", flags=(), recent=False, internaldate=None, size=None):
        if isinstance(data, str):
            data = data.encode("utf-8")
        self.uid, self.data = uid, data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        self.flags = set(flags)
        self.recent = recent
        self.internaldate = utc(2020, 6, 15) if internaldate is None else internaldate
        self.size = len(self.data) if size is None else size
        self.header_reads = self.text_reads = 0

    def header(self):
        self.header_reads += 1
        i = self.data.find(b"\r\n\r\n")
        return self.data if i < 0 else self.data[:i + 4]

    def text(self):
        self.text_reads += 1
        return self.data


def run(query, messages):
    """Sequence numbers of the matching messages."""
    largest_uid = max((m.uid for m in messages), default=0)
    return [seq for seq, m in enumerate(messages, 1)
            if query.matches(m, seq, len(messages), largest_uid)]


def q(text, tz=UTC):
    return parse_search(T(text), tz=tz)[1]


class Case(unittest.TestCase):
    def assertMatches(self, text, messages, expected, tz=UTC):
        self.assertEqual(run(q(text, tz), messages), expected, text)


class FlagKeys(Case):
    def setUp(self):
        self.msgs = [
            Msg(1, flags={"\\Seen"}),
            Msg(2, flags={"\\Answered", "\\Seen"}),
            Msg(3, flags={"\\Deleted"}),
            Msg(4, flags={"\\Draft", "$Forwarded"}),
            Msg(5, flags={"\\Flagged", "\\Seen"}, recent=True),
            Msg(6, recent=True),
        ]

    def test_all(self):
        self.assertMatches("ALL", self.msgs, [1, 2, 3, 4, 5, 6])

    def test_system_flags(self):
        for key, want in [("ANSWERED", [2]), ("DELETED", [3]), ("DRAFT", [4]),
                          ("FLAGGED", [5]), ("SEEN", [1, 2, 5])]:
            every = [1, 2, 3, 4, 5, 6]
            self.assertMatches(key, self.msgs, want)
            self.assertMatches("UN" + key, self.msgs, [n for n in every if n not in want])

    def test_keys_are_case_insensitive(self):
        self.assertMatches("unseen", self.msgs, [3, 4, 6])
        self.assertMatches("Flagged", self.msgs, [5])

    def test_recent_new_old(self):
        self.assertMatches("RECENT", self.msgs, [5, 6])
        self.assertMatches("NEW", self.msgs, [6])
        self.assertMatches("OLD", self.msgs, [1, 2, 3, 4])

    def test_keyword(self):
        self.assertMatches("KEYWORD $Forwarded", self.msgs, [4])
        self.assertMatches("KEYWORD $forwarded", self.msgs, [4])
        self.assertMatches("UNKEYWORD $FORWARDED", self.msgs, [1, 2, 3, 5, 6])
        self.assertMatches("KEYWORD Junk", self.msgs, [])

    def test_keyword_with_system_flag(self):
        self.assertMatches("KEYWORD \\Seen", self.msgs, [1, 2, 5])
        self.assertMatches("KEYWORD \\Recent", self.msgs, [5, 6])
        self.assertMatches("UNKEYWORD \\Recent", self.msgs, [1, 2, 3, 4])

    def test_keyword_needs_a_flag(self):
        for text in ['KEYWORD ""', "KEYWORD", "KEYWORD (A)", 'KEYWORD "a b"']:
            self.assertRaises(SearchSyntaxError, parse_search, T(text))


class SizeKeys(Case):
    def test_larger_smaller(self):
        msgs = [Msg(1, size=100), Msg(2, size=200), Msg(3, size=300)]
        self.assertMatches("LARGER 200", msgs, [3])
        self.assertMatches("SMALLER 200", msgs, [1])
        self.assertMatches("LARGER 99 SMALLER 300", msgs, [1, 2])
        self.assertMatches("LARGER 0", msgs, [1, 2, 3])

    def test_numbers(self):
        parse_search(T("LARGER 4294967295"))
        for text in ["LARGER 4294967296", "LARGER -1", 'LARGER "10"', "SMALLER x",
                     "SMALLER", "LARGER 1e3", "LARGER " + "9" * 5000]:
            self.assertRaises(SearchSyntaxError, parse_search, T(text))


class SequenceSets(Case):
    def setUp(self):
        self.msgs = [Msg(uid) for uid in (10, 20, 30, 40, 50)]

    def test_message_numbers(self):
        self.assertMatches("2", self.msgs, [2])
        self.assertMatches("2:4", self.msgs, [2, 3, 4])
        self.assertMatches("4:2", self.msgs, [2, 3, 4])
        self.assertMatches("1,3,5", self.msgs, [1, 3, 5])
        self.assertMatches("1:2,2:3,5", self.msgs, [1, 2, 3, 5])
        self.assertMatches("6:9", self.msgs, [])

    def test_star_is_the_largest_number(self):
        self.assertMatches("*", self.msgs, [5])
        self.assertMatches("3:*", self.msgs, [3, 4, 5])
        self.assertMatches("*:4", self.msgs, [4, 5])
        self.assertMatches("9:*", self.msgs, [5])

    def test_uid(self):
        self.assertMatches("UID 20", self.msgs, [2])
        self.assertMatches("UID 15:35", self.msgs, [2, 3])
        self.assertMatches("UID 1:10,40:45", self.msgs, [1, 4])
        self.assertMatches("uid 60:70", self.msgs, [])

    def test_uid_star_is_the_largest_uid(self):
        self.assertMatches("UID *", self.msgs, [5])
        self.assertMatches("UID 35:*", self.msgs, [4, 5])
        # RFC 3501: 559:* includes the last message even when its UID is smaller.
        self.assertMatches("UID 90:*", self.msgs, [5])

    def test_star_follows_the_mailbox(self):
        query = q("UID 45:*")
        self.assertEqual(run(query, self.msgs), [5])
        self.assertEqual(run(query, self.msgs[:3]), [3])
        self.assertEqual(run(query, self.msgs), [5])

    def test_empty_mailbox(self):
        self.assertEqual(run(q("*"), []), [])
        self.assertEqual(run(q("UID 1:*"), []), [])

    def test_sets_combine_with_other_keys(self):
        self.msgs[1].flags.add("\\Seen")
        self.assertMatches("1:3 UNSEEN", self.msgs, [1, 3])
        self.assertMatches("(2:3) NOT UID 30", self.msgs, [2])

    def test_bad_sets(self):
        for text in ["0", "1:0", "UID 0", "1:", "1,,2", "UID", "UID x", 'UID "1"', "$", "1.5"]:
            self.assertRaises(SearchSyntaxError, parse_search, T(text))


class InternalDates(Case):
    def setUp(self):
        self.msgs = [
            Msg(1, internaldate=utc(1994, 1, 31, 23, 59)),
            Msg(2, internaldate=utc(1994, 2, 1, 0, 0)),
            Msg(3, internaldate=utc(1994, 2, 1, 23, 59)),
            Msg(4, internaldate=utc(1994, 2, 2, 0, 0)),
        ]

    def test_before_on_since(self):
        self.assertMatches("BEFORE 1-Feb-1994", self.msgs, [1])
        self.assertMatches("ON 1-Feb-1994", self.msgs, [2, 3])
        self.assertMatches("SINCE 1-Feb-1994", self.msgs, [2, 3, 4])
        self.assertMatches("SINCE 2-Feb-1994", self.msgs, [4])
        self.assertMatches('ON "01-feb-1994"', self.msgs, [2, 3])

    def test_time_zone(self):
        east = datetime.timezone(datetime.timedelta(hours=2))
        # 31 Jan 23:59 UTC is 1 Feb 01:59 at UTC+2, 1 Feb 23:59 UTC is 2 Feb.
        self.assertMatches("ON 1-Feb-1994", self.msgs, [1, 2], tz=east)

    def test_local_time_by_default(self):
        noon = time.mktime((1994, 2, 1, 12, 0, 0, 0, 0, -1))
        msgs = [Msg(1, internaldate=noon), Msg(2, internaldate=noon + 86400)]
        self.assertMatches("ON 1-Feb-1994", msgs, [1], tz=None)
        self.assertMatches("BEFORE 2-Feb-1994", msgs, [1], tz=None)

    def test_extreme_years(self):
        self.assertMatches("SINCE 1-Jan-0001", self.msgs, [1, 2, 3, 4])
        self.assertMatches("BEFORE 31-Dec-9999", self.msgs, [1, 2, 3, 4])
        self.assertMatches("ON 31-Dec-9999", self.msgs, [])

    def test_bad_dates(self):
        for text in ["ON 31-Feb-1994", "ON 1-Foo-1994", "ON 1994-02-01", "BEFORE",
                     "SINCE 1-Feb-94", "ON 001-Feb-1994", "ON (1-Feb-1994)", "ON 1-Feb-1994x"]:
            self.assertRaises(SearchSyntaxError, parse_search, T(text))


class SentDates(Case):
    def setUp(self):
        self.msgs = [
            Msg(1, "Date: Mon, 31 Jan 1994 10:00:00 +0000\n\nx"),
            # Late on 1 Feb in California: 2 Feb in UTC; the written day counts.
            Msg(2, "Date: Tue, 1 Feb 1994 23:30:00 -0800\n\nx"),
            Msg(3, "Date: 2 Feb 94 01:00 +1300\n\nx"),
            Msg(4, "Subject: no date\n\nx"),
            Msg(5, "Date: garbage\n\nx"),
        ]

    def test_sent_dates(self):
        self.assertMatches("SENTBEFORE 1-Feb-1994", self.msgs, [1])
        self.assertMatches("SENTON 1-Feb-1994", self.msgs, [2])
        self.assertMatches("SENTSINCE 1-Feb-1994", self.msgs, [2, 3])
        self.assertMatches("SENTON 2-Feb-1994", self.msgs, [3])

    def test_no_date_matches_none(self):
        self.assertMatches("NOT SENTON 1-Feb-1994", self.msgs, [1, 3, 4, 5])

    def test_needs_only_the_header(self):
        query = q("SENTSINCE 1-Jan-1990")
        self.assertEqual(query.needs, "header")
        run(query, self.msgs)
        self.assertEqual([m.text_reads for m in self.msgs], [0] * 5)
        self.assertEqual([m.header_reads for m in self.msgs], [1] * 5)


HEADERS = (
    "From: Alice Example <alice@example.org>\n"
    "To: Bob <bob@example.net>, carol@example.com\n"
    "Cc: Dave <dave@example.com>\n"
    "Bcc: eve@example.com\n"
    "Subject: Quarterly report\n"
    "   for the board\n"
    "X-Mailer: Test\tMailer 1.0\n"
    "X-Empty:\n"
    "\n"
    "The body mentions bananas.\n"
)


class AddressAndHeaderKeys(Case):
    def setUp(self):
        self.msgs = [Msg(1, HEADERS), Msg(2, "From: zed@example.org\nSubject: other\n\nbody\n")]

    def test_address_keys(self):
        self.assertMatches("FROM alice", self.msgs, [1])
        self.assertMatches('FROM "ALICE example"', self.msgs, [1])
        self.assertMatches("FROM example.org", self.msgs, [1, 2])
        self.assertMatches("TO carol@", self.msgs, [1])
        self.assertMatches("TO bob@example.net", self.msgs, [1])
        self.assertMatches("CC dave", self.msgs, [1])
        self.assertMatches("BCC eve", self.msgs, [1])
        self.assertMatches("CC bob", self.msgs, [])

    def test_subject_is_unfolded(self):
        self.assertMatches('SUBJECT "report for the"', self.msgs, [1])
        self.assertMatches("SUBJECT QUARTERLY", self.msgs, [1])

    def test_header_does_not_match_body(self):
        self.assertMatches("SUBJECT bananas", self.msgs, [])

    def test_header_key(self):
        self.assertMatches('HEADER X-Mailer "test mailer"', self.msgs, [1])
        self.assertMatches('HEADER x-mailer "1.0"', self.msgs, [1])
        self.assertMatches('HEADER Subject other', self.msgs, [2])

    def test_empty_string_matches_presence(self):
        self.assertMatches('HEADER X-Empty ""', self.msgs, [1])
        self.assertMatches('HEADER X-Missing ""', self.msgs, [])
        self.assertMatches('CC ""', self.msgs, [1])

    def test_literal_and_nil(self):
        self.assertMatches("FROM {5}\r\nALICE", self.msgs, [1])
        msgs = [Msg(1, "Subject: NIL here\n\n"), Msg(2, "Subject: x\n\n")]
        self.assertMatches("SUBJECT NIL", msgs, [1])
        query = parse_search([Atom("SUBJECT"), None])[1]
        self.assertEqual(run(query, msgs), [1])

    def test_header_field_as_first_field_and_without_body(self):
        msgs = [Msg(1, "Subject: only a header"), Msg(2, "Subject: hi\n")]
        self.assertMatches("SUBJECT header", msgs, [1])
        self.assertMatches("SUBJECT hi", msgs, [2])

    def test_missing_arguments(self):
        for text in ["FROM", "HEADER X-Mailer", "SUBJECT (a)", "TO (a b)", "HEADER (a) b"]:
            self.assertRaises(SearchSyntaxError, parse_search, T(text))

    def test_reads_the_header_only(self):
        query = q("FROM alice")
        self.assertEqual(query.needs, "header")
        run(query, self.msgs)
        self.assertEqual([(m.header_reads, m.text_reads) for m in self.msgs], [(1, 0), (1, 0)])


class EncodedHeaders(Case):
    def test_base64_encoded_word(self):
        word = base64.b64encode("Grüße aus Köln".encode()).decode()
        msgs = [Msg(1, f"Subject: =?UTF-8?B?{word}?=\n\n"), Msg(2, "Subject: Gruesse\n\n")]
        self.assertMatches(["CHARSET UTF-8 SUBJECT", L("GRÜSSE")], msgs, [1])
        self.assertMatches(["CHARSET UTF-8 SUBJECT", L("köln")], msgs, [1])
        self.assertMatches("SUBJECT aus", msgs, [1])

    def test_q_encoded_word_in_another_charset(self):
        msgs = [Msg(1, "Subject: =?iso-8859-1?q?caf=E9_cr=E8me?=\n\n")]
        self.assertMatches(["SUBJECT", L("café crème")], msgs, [1])

    def test_adjacent_words_are_joined(self):
        # A character split over two encoded words, and the space between them dropped.
        data = "€uro".encode()
        a, b = base64.b64encode(data[:2]).decode(), base64.b64encode(data[2:]).decode()
        msgs = [Msg(1, f"Subject: =?utf-8?b?{a}?=\n =?utf-8?b?{b}?= and =?utf-8?q?more?=\n\n")]
        self.assertMatches(["SUBJECT", L("€uro and")], msgs, [1])
        self.assertMatches(["SUBJECT", L("€uro a")], msgs, [1])

    def test_encoded_words_in_addresses(self):
        msgs = [Msg(1, "From: =?UTF-8?Q?Zo=C3=AB_Smith?= <zoe@example.org>\n\n")]
        self.assertMatches(["FROM", L("zoë smith")], msgs, [1])
        self.assertMatches("FROM zoe@", msgs, [1])

    def test_malformed_encoded_words_stay_text(self):
        msgs = [Msg(1, "Subject: =?x-unknown?B?aGVsbG8=?= =?utf-8?B?###?= tail\n\n")]
        self.assertMatches("SUBJECT hello", msgs, [1])
        self.assertMatches("SUBJECT tail", msgs, [1])

    def test_raw_eight_bit_is_utf8(self):
        msgs = [Msg(1, "Subject: naïve 日本語\n\n".encode()),
                Msg(2, b"Subject: caf\xe9 \xff\xfe broken\n\n")]
        self.assertMatches(["CHARSET UTF-8 SUBJECT", L("日本語")], msgs, [1])
        self.assertMatches(["SUBJECT", L("NAÏVE")], msgs, [1])
        self.assertMatches("SUBJECT broken", msgs, [2])


def mime(*parts, boundary="b1", subtype="mixed"):
    body = "".join(f"--{boundary}\n{p}\n" for p in parts)
    return (f"Content-Type: multipart/{subtype}; boundary=\"{boundary}\"\n\n"
            f"preamble\n{body}--{boundary}--\nepilogue\n")


class BodyAndText(Case):
    def setUp(self):
        self.msgs = [
            Msg(1, "Subject: apples\n\nThe body mentions\nbananas twice: BANANAS.\n"),
            Msg(2, "Subject: bananas\n\nnothing here\n"),
        ]

    def test_body(self):
        self.assertMatches("BODY bananas", self.msgs, [1])
        self.assertMatches('BODY "mentions bananas"', self.msgs, [1])   # across a line break
        self.assertMatches("BODY apples", self.msgs, [])
        self.assertMatches('BODY ""', self.msgs, [1, 2])

    def test_text(self):
        self.assertMatches("TEXT bananas", self.msgs, [1, 2])
        self.assertMatches("TEXT apples", self.msgs, [1])
        self.assertMatches('TEXT "subject: apples"', self.msgs, [1])

    def test_needs_full(self):
        query = q("BODY x")
        self.assertEqual(query.needs, "full")
        run(query, self.msgs)
        self.assertEqual([(m.header_reads, m.text_reads) for m in self.msgs], [(0, 1), (0, 1)])

    def test_text_and_header_keys_read_once(self):
        query = q("TEXT apples SUBJECT apples BODY body TEXT subject")
        self.assertEqual(run(query, self.msgs), [1])
        # The subject of message 2 fails before its text is needed.
        self.assertEqual([(m.header_reads, m.text_reads) for m in self.msgs], [(1, 1), (1, 0)])

    def test_quoted_printable(self):
        msgs = [Msg(1, "Content-Transfer-Encoding: quoted-printable\n"
                       "Content-Type: text/plain; charset=utf-8\n\n"
                       "Caf=C3=A9 con le=\nche\n")]
        self.assertMatches(["BODY", L("café")], msgs, [1])
        self.assertMatches("BODY leche", msgs, [1])
        self.assertMatches(["BODY", L("le=\r")], msgs, [1])  # the raw text too

    def test_base64_part_in_latin1(self):
        payload = base64.encodebytes("Überweisung für Müller".encode("latin-1")).decode()
        msgs = [Msg(1, mime("Content-Type: text/plain\n\nplain part",
                            "Content-Type: text/plain; charset=ISO-8859-1\n"
                            "Content-Transfer-Encoding: base64\n\n" + payload,
                            "Content-Type: image/png\nContent-Transfer-Encoding: base64\n\n"
                            + base64.encodebytes(b"secret image words").decode()))]
        self.assertMatches(["BODY", L("müller")], msgs, [1])
        self.assertMatches('BODY "plain part"', msgs, [1])
        self.assertMatches('BODY "image words"', msgs, [])
        self.assertMatches("BODY preamble", msgs, [1])      # raw text

    def test_nested_multipart_and_attached_message(self):
        inner = ("Subject: =?utf-8?q?inner_subj=C3=A9ct?=\n"
                 "Content-Transfer-Encoding: base64\n\n"
                 + base64.encodebytes(b"deep inner words").decode())
        msgs = [Msg(1, mime(mime("Content-Type: text/html\nContent-Transfer-Encoding: base64\n\n"
                                 + base64.encodebytes(b"<b>html words</b>").decode(),
                                 boundary="b2", subtype="alternative"),
                            "Content-Type: message/rfc822\n\n" + inner))]
        self.assertMatches('BODY "html words"', msgs, [1])
        self.assertMatches('BODY "deep inner"', msgs, [1])
        self.assertMatches(["BODY", L("inner subjéct")], msgs, [1])

    def test_eight_bit_body(self):
        msgs = [Msg(1, "Content-Type: text/plain; charset=utf-8\n\nÀ bientôt\n".encode()),
                Msg(2, b"Content-Type: text/plain; charset=windows-1252\n\n\x93quoted\x94 na\xefve\n")]
        self.assertMatches(["CHARSET UTF-8 BODY", L("à BIENTÔT")], msgs, [1])
        self.assertMatches(["BODY", L("naïve")], msgs, [2])
        self.assertMatches(["BODY", L("“quoted”")], msgs, [2])

    def test_hostile_mime_is_bounded(self):
        # Thousands of nested multiparts, each declaring a base64 text part.
        data = "".join(f'Content-Type: multipart/mixed; boundary="{i}"\n\n--{i}\n' for i in range(3000))
        data += "Content-Transfer-Encoding: base64\n\n" + base64.b64encode(b"needle").decode() + "\n"
        msgs = [Msg(1, "Subject: x\n" + data)]
        started = time.monotonic()
        self.assertMatches("BODY needle", msgs, [])     # too deep to decode
        self.assertMatches("BODY multipart", msgs, [1])  # raw text still searched
        self.assertLess(time.monotonic() - started, 1.0)

    def test_many_parts_are_bounded(self):
        msgs = [Msg(1, mime(*["Content-Transfer-Encoding: base64\n\naGVsbG8="] * 5000))]
        started = time.monotonic()
        self.assertMatches("BODY hello", msgs, [1])
        self.assertLess(time.monotonic() - started, 1.0)

    def test_decoded_text_is_capped(self):
        self.patch(search_module, "DECODED_CAP", 10)
        payload = base64.encodebytes(b"0123456789 late words").decode()
        msgs = [Msg(1, "Content-Transfer-Encoding: base64\n\n" + payload)]
        self.assertMatches("BODY 0123", msgs, [1])
        self.assertMatches('BODY "late"', msgs, [])


class Laziness(Case):
    def test_index_keys_read_nothing(self):
        msgs = [Msg(1, HEADERS, flags={"\\Seen"}), Msg(2, HEADERS)]
        query = q("OR SEEN (UID 2 LARGER 10 NOT DELETED SINCE 1-Jan-2000 NOT 5:7)")
        self.assertEqual(query.needs, "index")
        self.assertEqual(run(query, msgs), [1, 2])
        self.assertEqual([(m.header_reads, m.text_reads) for m in msgs], [(0, 0), (0, 0)])

    def test_cheap_keys_first(self):
        msgs = [Msg(1, HEADERS, flags={"\\Seen"}), Msg(2, HEADERS)]
        query = q("BODY bananas FROM alice UNSEEN")
        self.assertEqual(query.needs, "full")
        self.assertEqual(run(query, msgs), [2])
        self.assertEqual([(m.header_reads, m.text_reads) for m in msgs], [(0, 0), (1, 1)])

    def test_or_tries_cheap_side_first(self):
        msgs = [Msg(1, HEADERS, flags={"\\Seen"}), Msg(2, HEADERS)]
        query = q("OR TEXT zebra SEEN")
        self.assertEqual(run(query, msgs), [1])
        self.assertEqual([m.text_reads for m in msgs], [0, 1])

    def test_needs_of_combinations(self):
        self.assertEqual(q("NOT SUBJECT x").needs, "header")
        self.assertEqual(q("OR SEEN TEXT x").needs, "full")
        self.assertEqual(q("(SEEN (HEADER a b))").needs, "header")
        self.assertEqual(q("NEW").needs, "index")


class Combinations(Case):
    def setUp(self):
        self.msgs = [
            Msg(1, "Subject: a\n\n", flags={"\\Seen"}),
            Msg(2, "Subject: b\n\n", flags={"\\Flagged"}),
            Msg(3, "Subject: c\n\n", flags={"\\Seen", "\\Flagged"}),
            Msg(4, "Subject: d\n\n"),
        ]

    def test_and_is_implicit(self):
        self.assertMatches("SEEN FLAGGED", self.msgs, [3])

    def test_not(self):
        self.assertMatches("NOT SEEN", self.msgs, [2, 4])
        self.assertMatches("NOT NOT SEEN", self.msgs, [1, 3])
        self.assertMatches("NOT (SEEN FLAGGED)", self.msgs, [1, 2, 4])

    def test_or(self):
        self.assertMatches("OR SEEN FLAGGED", self.msgs, [1, 2, 3])
        self.assertMatches("OR SUBJECT a OR SUBJECT b SUBJECT d", self.msgs, [1, 2, 4])
        self.assertMatches("OR (SEEN NOT FLAGGED) (FLAGGED NOT SEEN)", self.msgs, [1, 2])
        self.assertMatches("NOT OR SEEN FLAGGED", self.msgs, [4])

    def test_parenthesized(self):
        self.assertMatches("(((SEEN)))", self.msgs, [1, 3])
        self.assertMatches("(SEEN) (FLAGGED)", self.msgs, [3])
        self.assertMatches("1:3 (OR 1 3)", self.msgs, [1, 3])

    def test_operators_need_keys(self):
        for text in ["NOT", "OR SEEN", "OR", "()", "SEEN ()", "(SEEN) NOT"]:
            self.assertRaises(SearchSyntaxError, parse_search, T(text))


class Charsets(unittest.TestCase):
    def test_charset_is_returned(self):
        self.assertEqual(parse_search(T("CHARSET UTF-8 ALL"))[0], "UTF-8")
        self.assertEqual(parse_search(T('CHARSET "us-ascii" ALL'))[0], "US-ASCII")
        self.assertEqual(parse_search(T("charset utf-8 ALL"))[0], "UTF-8")
        self.assertEqual(parse_search(T("ALL"))[0], None)

    def test_unknown_charset(self):
        e = self.assertRaises(SearchBadCharset, parse_search, T("CHARSET ISO-8859-1 FROM x"))
        self.assertEqual(e.charset, "ISO-8859-1")
        self.assertEqual(e.response_code, "BADCHARSET (UTF-8 US-ASCII)")
        self.assertRaises(SearchBadCharset, parse_search, T("CHARSET NIL ALL"))

    def test_charset_syntax(self):
        for text in ["CHARSET", "CHARSET UTF-8", "CHARSET (UTF-8) ALL", "ALL CHARSET UTF-8"]:
            self.assertRaises(SearchSyntaxError, parse_search, T(text))

    def test_strings_must_fit_the_charset(self):
        parse_search(T("CHARSET UTF-8 BODY {2}\r\n\xc3\xa9".encode("latin-1")))
        self.assertRaises(SearchSyntaxError, parse_search,
                          T("CHARSET US-ASCII BODY {2}\r\n\xc3\xa9".encode("latin-1")))
        self.assertRaises(SearchSyntaxError, parse_search,
                          T("CHARSET UTF-8 BODY {1}\r\n\xe9".encode("latin-1")))
        self.assertRaises(SearchSyntaxError, parse_search, T(b"BODY {1}\r\n\xe9"))

    def test_default_is_utf8(self):
        _, query = parse_search(T("SUBJECT {2}\r\n\xc3\xa9".encode("latin-1")))
        self.assertEqual(run(query, [Msg(1, "Subject: café\n\n")]), [1])


class SyntaxAndBounds(unittest.TestCase):
    def test_unknown_and_misplaced(self):
        for tokens in [[], T("FOO"), T("SEEN BAR"), [b"SEEN"], T("ALL ALL x"), [Atom("SEEN"), 5],
                       T('"ALL"')]:
            self.assertRaises(SearchSyntaxError, parse_search, tokens)
        self.assertRaises(SearchSyntaxError, parse_search, "ALL")

    def test_plain_strings_work_as_atoms(self):
        self.assertEqual(run(parse_search(["seen"])[1], [Msg(1, flags={"\\Seen"})]), [1])

    def test_nesting_limit(self):
        depth = search_module.MAX_DEPTH
        query = parse_search(T("NOT " * depth + "SEEN"))[1]
        self.assertEqual(run(query, [Msg(1, flags={"\\Seen"})]), [1])
        self.assertRaises(SearchSyntaxError, parse_search, T("NOT " * (depth + 1) + "SEEN"))
        self.assertRaises(SearchSyntaxError, parse_search, T("OR SEEN " * (depth + 1) + "SEEN"))
        parse_search(T("(" * depth + "SEEN" + ")" * depth))
        self.assertRaises(SearchSyntaxError, parse_search,
                          T("(" * (depth + 1) + "SEEN" + ")" * (depth + 1)))

    def test_hostile_nesting_does_not_recurse(self):
        nested = ["SEEN"]
        for _ in range(100000):
            nested = [nested]
        self.assertRaises(SearchSyntaxError, parse_search, nested)
        self.assertRaises(SearchSyntaxError, parse_search, [Atom("NOT")] * 100000 + [Atom("ALL")])

    def test_key_limit(self):
        limit = search_module.MAX_KEYS
        parse_search(T("SEEN " * limit))
        self.assertRaises(SearchSyntaxError, parse_search, T("SEEN " * (limit + 1)))
        # Operators count too.
        self.assertRaises(SearchSyntaxError, parse_search, T("NOT SEEN " * (limit // 2 + 1)))
        self.assertRaises(SearchSyntaxError, parse_search, T("(SEEN) " * (limit // 2 + 1)))

    def test_large_sequence_sets_stay_fast(self):
        text = ",".join(str(n) for n in range(1, 20000, 2))
        query = parse_search([Atom(text)])[1]
        msgs = [Msg(uid) for uid in range(1, 2001)]
        started = time.monotonic()
        self.assertEqual(len(run(query, msgs)), 1000)
        self.assertLess(time.monotonic() - started, 1.0)

    def test_repr(self):
        self.assertEqual(repr(parse_search(T("OR SEEN UID 1:* NOT 2,4:5"))[1]),
                         "Query((OR SEEN UID 1:* NOT 2,4:5))")

    def test_query_is_public(self):
        self.assertIsInstance(parse_search(T("ALL"))[1], Query)
