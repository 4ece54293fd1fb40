"""Tests of mailbox_appliance.imap.mime: ENVELOPE, BODYSTRUCTURE/BODY and BODY[section]
octets, exact wire bytes, and bounded work on hostile messages."""

import random
import re
import time

from twisted.trial import unittest

from mailbox_appliance.imap import mime
from mailbox_appliance.imap.mime import (
    MAX_DEPTH, MAX_PARTS, Section, SectionSyntaxError, bodystructure, envelope,
    imap_string, parse, parse_section, section)

# Generous bound for the hostile cases, which take well under a second here; the
# point is "bounded", not a benchmark.
SLOW = 5.0


def parse_imap(data):
    """An IMAP response value (parenthesized lists, atoms, numbers, NIL, quoted
    strings, literals) as Python values: list, str, int, None, bytes.  Raises
    ValueError if ``data`` is not exactly one well-formed value.  Iterative."""
    stack = [[]]
    pos = 0
    n = len(data)
    token = re.compile(rb'\(|\)| |NIL(?=[ )]|\Z)|[0-9]+(?=[ )]|\Z)|"((?:[^"\\\r\n]|\\["\\])*)"'
                       rb'|\{([0-9]+)\}\r\n|[^ ()"{\r\n\x00-\x1f\x7f-\xff]+')
    while pos < n:
        m = token.match(data, pos)
        if m is None:
            raise ValueError(f"bad IMAP syntax at {pos}: {data[pos:pos + 20]!r}")
        tok = m.group()
        pos = m.end()
        if tok == b"(":
            stack.append([])
        elif tok == b")":
            if len(stack) < 2:
                raise ValueError("unbalanced )")
            done = stack.pop()
            stack[-1].append(done)
        elif tok == b" ":
            continue
        elif tok == b"NIL":
            stack[-1].append(None)
        elif m.group(2) is not None:
            size = int(m.group(2))
            if pos + size > n:
                raise ValueError("short literal")
            stack[-1].append(data[pos:pos + size])
            pos += size
        elif m.group(1) is not None:
            stack[-1].append(re.sub(rb'\\(["\\])', rb"\1", m.group(1)))
        elif tok[:1].isdigit():
            stack[-1].append(int(tok))
        else:
            stack[-1].append(tok.decode("ascii"))
    if len(stack) != 1 or len(stack[0]) != 1:
        raise ValueError("not exactly one value")
    return stack[0][0]


def leaves(structure, extensible=True):
    """(part path, body) for every non-multipart body of a parsed BODYSTRUCTURE,
    checking the shape of each body on the way (iteratively).  Part numbers follow
    RFC 3501 6.4.5: the parts of a multipart message body are numbered from 1, a
    non-multipart message body is part 1 of its message."""
    out = []
    todo = [(structure, "", True)]
    while todo:
        body, path, message_body = todo.pop()
        if not isinstance(body, list) or not body:
            raise AssertionError(f"not a body: {body!r:.200}")
        if isinstance(body[0], list):                    # multipart
            count = 0
            while count < len(body) and isinstance(body[count], list):
                count += 1
            parts, rest = body[:count], body[count:]
            if not rest or not isinstance(rest[0], bytes):
                raise AssertionError(f"bad multipart: {body!r:.200}")
            if len(rest) != (5 if extensible else 1):
                raise AssertionError(f"multipart extension data: {rest!r:.200}")
            for i, part in enumerate(parts, 1):
                todo.append((part, f"{path}.{i}" if path else str(i), False))
            continue
        if message_body:
            path = f"{path}.1" if path else "1"
        mtype, subtype = body[0].upper(), body[1].upper()
        if mtype == b"MESSAGE" and subtype == b"RFC822":
            expected = 10
            if len(body[7]) != 10:
                raise AssertionError(f"bad envelope: {body[7]!r:.200}")
            todo.append((body[8], path, True))
        elif mtype == b"TEXT":
            expected = 8
        else:
            expected = 7
        if extensible:
            expected += 4
        if len(body) != expected:
            raise AssertionError(f"{len(body)} fields, expected {expected}: {body!r:.200}")
        out.append((path, body))
    return out


# What a multipart without any part reports (RFC 3501 wants at least one).
EMPTY_PART = [b"TEXT", b"PLAIN", [b"CHARSET", b"US-ASCII"], None, None, b"7BIT", 0, 0]


def check_consistency(test, message):
    """BODYSTRUCTURE and BODY parse; every body's size (and lines for text) matches
    the octets BODY[path] returns for it; nothing raises.  Returns the parsed
    BODYSTRUCTURE."""
    tree = parse(message)
    for extensible in (False, True):
        structure = parse_imap(bodystructure(tree, extensible))
        for path, body in leaves(structure, extensible):
            octets = section(tree, path)
            if octets is None and body[:8] == EMPTY_PART:
                continue
            test.assertIsNotNone(octets, path)
            test.assertEqual(len(octets), body[6], (path, body))
            mtype = body[0].upper()
            if mtype == b"TEXT" or mtype == b"MESSAGE" and body[1].upper() == b"RFC822":
                lines = octets.count(b"\n") + (1 if octets and not octets.endswith(b"\n") else 0)
                test.assertEqual(lines, body[-5 if extensible else -1], (path, body))
    parse_imap(envelope(message))
    return structure


class ImapStringTests(unittest.TestCase):

    def test_quoted_and_nil(self):
        self.assertEqual(imap_string(None), b"NIL")
        self.assertEqual(imap_string(b""), b'""')
        self.assertEqual(imap_string(b"a b\tc"), b'"a b\tc"')
        self.assertEqual(imap_string(b'say "hi" \\o/'), b'"say \\"hi\\" \\\\o/"')

    def test_literal_for_8bit_and_line_ends(self):
        self.assertEqual(imap_string(b"Caf\xc3\xa9"), b"{5}\r\nCaf\xc3\xa9")
        self.assertEqual(imap_string(b"a\r\nb"), b"{4}\r\na\r\nb")
        self.assertEqual(imap_string(b"a\rb"), b"{3}\r\na\rb")

    def test_nul_never_sent(self):
        self.assertEqual(imap_string(b"a\x00b"), b"{3}\r\na\x80b")


RFC_MESSAGE = (
    b"Date: Wed, 17 Jul 1996 02:23:25 -0700 (PDT)\r\n"
    b"From: Terry Gray <gray@cac.washington.edu>\r\n"
    b"Subject: IMAP4rev1 WG mtg summary and minutes\r\n"
    b"To: imap@cac.washington.edu\r\n"
    b"cc: minutes@CNRI.Reston.VA.US,\r\n"
    b"\tJohn Klensin <KLENSIN@MIT.EDU>\r\n"
    b"Message-Id: <B27397-0100000@cac.washington.edu>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: TEXT/PLAIN; CHARSET=US-ASCII\r\n"
    b"\r\n"
    b"Hello Terry,\r\n"
    b"the minutes are attached.\r\n")


class EnvelopeTests(unittest.TestCase):

    def test_rfc3501_example(self):
        self.assertEqual(
            envelope(RFC_MESSAGE),
            b'("Wed, 17 Jul 1996 02:23:25 -0700 (PDT)" "IMAP4rev1 WG mtg summary and minutes"'
            b' (("Terry Gray" NIL "gray" "cac.washington.edu"))'
            b' (("Terry Gray" NIL "gray" "cac.washington.edu"))'
            b' (("Terry Gray" NIL "gray" "cac.washington.edu"))'
            b' ((NIL NIL "imap" "cac.washington.edu"))'
            b' ((NIL NIL "minutes" "CNRI.Reston.VA.US")("John Klensin" NIL "KLENSIN" "MIT.EDU"))'
            b' NIL NIL "<B27397-0100000@cac.washington.edu>")')

    def test_header_alone_or_whole_message_same(self):
        header = RFC_MESSAGE[:RFC_MESSAGE.index(b"\r\n\r\n") + 4]
        self.assertEqual(envelope(header), envelope(RFC_MESSAGE))
        self.assertEqual(envelope(header[:-2]), envelope(RFC_MESSAGE))

    def test_groups(self):
        env = envelope(b'To: A Group:a@b.c,"Q" <d@e.f>;, x@y.z\r\n'
                       b"Cc: undisclosed-recipients:;\r\n"
                       b"Bcc: Empty:;, Open: p@q\r\n\r\n")
        self.assertEqual(
            env,
            b"(NIL NIL NIL NIL NIL"
            b' ((NIL NIL "A Group" NIL)(NIL NIL "a" "b.c")("Q" NIL "d" "e.f")(NIL NIL NIL NIL)'
            b'(NIL NIL "x" "y.z"))'
            b' ((NIL NIL "undisclosed-recipients" NIL)(NIL NIL NIL NIL))'
            b' ((NIL NIL "Empty" NIL)(NIL NIL NIL NIL)(NIL NIL "Open" NIL)(NIL NIL "p" "q")'
            b"(NIL NIL NIL NIL))"
            b" NIL NIL)")

    def test_missing_headers(self):
        self.assertEqual(envelope(b"\r\nbody only\r\n"),
                         b"(NIL NIL NIL NIL NIL NIL NIL NIL NIL NIL)")
        self.assertEqual(envelope(b""), b"(NIL NIL NIL NIL NIL NIL NIL NIL NIL NIL)")

    def test_sender_and_reply_to_default_to_from_when_absent_or_empty(self):
        self.assertEqual(
            envelope(b"Subject: only\r\nSender:\r\nReply-To:  \r\nFrom: a@b\r\n\r\n"),
            b'(NIL "only" ((NIL NIL "a" "b")) ((NIL NIL "a" "b")) ((NIL NIL "a" "b"))'
            b" NIL NIL NIL NIL NIL)")
        self.assertEqual(
            envelope(b"From: a@b\r\nSender: s@b\r\nReply-To: r@b\r\n\r\n"),
            b'(NIL NIL ((NIL NIL "a" "b")) ((NIL NIL "s" "b")) ((NIL NIL "r" "b"))'
            b" NIL NIL NIL NIL NIL)")

    def test_quoted_names_with_backslashes_and_quotes(self):
        env = envelope(b'From: "A \\"B\\" C\\\\D" <a@b>\r\nIn-Reply-To: <x@y>\r\n\r\n')
        self.assertEqual(
            env,
            b'(NIL NIL (("A \\"B\\" C\\\\D" NIL "a" "b")) (("A \\"B\\" C\\\\D" NIL "a" "b"))'
            b' (("A \\"B\\" C\\\\D" NIL "a" "b")) NIL NIL NIL "<x@y>" NIL)')
        self.assertEqual(parse_imap(env)[2][0][0], b'A "B" C\\D')

    def test_raw_8bit_is_a_literal(self):
        env = envelope(b"Subject: Caf\xc3\xa9 \xff\r\nFrom: J\xc3\xb6rg <j@x>\r\n\r\n")
        self.assertEqual(
            env,
            b"(NIL {7}\r\nCaf\xc3\xa9 \xff ((" + b"{5}\r\nJ\xc3\xb6rg" + b' NIL "j" "x"))'
            b" ((" + b"{5}\r\nJ\xc3\xb6rg" + b' NIL "j" "x")) ((' + b"{5}\r\nJ\xc3\xb6rg"
            + b' NIL "j" "x")) NIL NIL NIL NIL NIL)')

    def test_encoded_words_unfolded_not_decoded(self):
        env = envelope(b"From: =?utf-8?q?Andr=C3=A9?= Pirard <PIRARD@vm1.ulg.ac.be>\r\n"
                       b"Subject: =?ISO-8859-1?Q?a?=\r\n =?ISO-8859-1?Q?b?=\r\n\r\n")
        value = parse_imap(env)
        self.assertEqual(value[1], b"=?ISO-8859-1?Q?a?= =?ISO-8859-1?Q?b?=")
        self.assertEqual(value[2], [[b"=?utf-8?q?Andr=C3=A9?= Pirard", None, b"PIRARD",
                                     b"vm1.ulg.ac.be"]])

    def test_address_forms(self):
        env = envelope(b'To: <@hosta.int,@jkl.org:userc@d.bar.org>, root,\r\n'
                       b' John Q. Public <jqp@[1.2.3.4]>, jdoe@one.test (John Doe),\r\n'
                       b' "a b"@c (x (nested) y), <>, ,,\r\n\r\n')
        self.assertEqual(parse_imap(env)[5], [
            [None, b"@hosta.int,@jkl.org", b"userc", b"d.bar.org"],
            [None, None, b"root", b""],
            [b"John Q. Public", None, b"jqp", b"[1.2.3.4]"],
            [b"John Doe", None, b"jdoe", b"one.test"],
            [b"x (nested) y", None, b'"a b"', b"c"],
            [None, None, b"", b""],
        ])

    def test_simple_address_fast_path_agrees_with_the_parser(self):
        rng = random.Random(2822)
        alphabet = [b"a", b"b", b" ", b"\t", b",", b"<", b">", b"@", b".", b"x.y", b"Name",
                    b"\xc3\xa9", b"=?u?q?a?=", b"-", b"\r\n "]
        for _ in range(20000):
            value = mime._unfold(b"".join(rng.choice(alphabet) for _ in range(rng.randint(0, 14))))
            self.assertEqual(mime._address_list(value, mime._Budget(0), simple=True),
                             mime._address_list(value, mime._Budget(0), simple=False), value)

    def test_field_names_case_insensitive_first_wins(self):
        env = envelope(b"SUBJECT: one\r\nsubject: two\r\nmessage-id: <m@x>\r\n\r\n")
        self.assertEqual(env, b'(NIL "one" NIL NIL NIL NIL NIL NIL NIL "<m@x>")')

    def test_empty_and_unparseable_values(self):
        env = envelope(b"Subject:\r\nTo: ,;:\r\nCc: (just a comment)\r\nDate: \r\n\r\n")
        value = parse_imap(env)
        self.assertEqual(value[0], b"")
        self.assertEqual(value[1], b"")
        self.assertIsNone(value[6])

    def test_control_characters(self):
        env = envelope(b"Subject: a\x00b\rc\r\n\r\n")
        self.assertEqual(env, b"(NIL {5}\r\na\x80b\rc NIL NIL NIL NIL NIL NIL NIL NIL)")

    def test_lf_only_message(self):
        self.assertEqual(envelope(b"Subject: x\n y\nFrom: a@b\n\nbody\n"),
                         b'(NIL "x y" ((NIL NIL "a" "b")) ((NIL NIL "a" "b")) ((NIL NIL "a" "b"))'
                         b" NIL NIL NIL NIL NIL)")

    def test_only_the_first_64k_of_a_header(self):
        header = b"X-Pad: " + b"x" * (mime.HEADER_CAP + 10) + b"\r\nSubject: late\r\n\r\n"
        self.assertEqual(envelope(header), b"(NIL NIL NIL NIL NIL NIL NIL NIL NIL NIL)")


def text_part(body, headers=b"Content-Type: text/plain; charset=us-ascii\r\n"):
    return headers + b"\r\n" + body


class BodyStructureTests(unittest.TestCase):

    def test_text_plain(self):
        self.assertEqual(
            bodystructure(RFC_MESSAGE),
            b'("TEXT" "PLAIN" ("CHARSET" "US-ASCII") NIL NIL "7BIT" 41 2 NIL NIL NIL NIL)')
        self.assertEqual(bodystructure(RFC_MESSAGE, extensible=False),
                         b'("TEXT" "PLAIN" ("CHARSET" "US-ASCII") NIL NIL "7BIT" 41 2)')

    def test_defaults_without_content_type(self):
        self.assertEqual(bodystructure(b"Subject: x\r\n\r\nab\r\ncd", extensible=False),
                         b'("TEXT" "PLAIN" ("CHARSET" "US-ASCII") NIL NIL "7BIT" 6 2)')
        self.assertEqual(bodystructure(b"", extensible=False),
                         b'("TEXT" "PLAIN" ("CHARSET" "US-ASCII") NIL NIL "7BIT" 0 0)')
        # an invalid Content-Type is the default too (RFC 2045 5.2)
        self.assertEqual(bodystructure(b"Content-Type: garbage\r\n\r\nx", extensible=False),
                         b'("TEXT" "PLAIN" ("CHARSET" "US-ASCII") NIL NIL "7BIT" 1 1)')

    def test_rfc3501_example_body(self):
        part1 = b"\r\n".join([b"a" * 48] * 22 + [b"b" * 52])                 # 1152, 23 lines
        part2 = b"\r\n".join([b"Q" * 60] * 72 + [b"R" * 90])                 # 4554, 73 lines
        message = (b"Content-Type: MULTIPART/MIXED; BOUNDARY=\"--x--\"\r\n\r\n"
                   b"----x--\r\n"
                   b"Content-Type: TEXT/PLAIN; CHARSET=US-ASCII\r\n\r\n" + part1 + b"\r\n"
                   b"----x--\r\n"
                   b"Content-Type: TEXT/PLAIN; CHARSET=US-ASCII; NAME=cc.diff\r\n"
                   b"Content-ID: <960723163407.20117h@cac.washington.edu>\r\n"
                   b"Content-Description: Compiler diff\r\n"
                   b"Content-Transfer-Encoding: BASE64\r\n\r\n" + part2 + b"\r\n"
                   b"----x----\r\n")
        self.assertEqual(
            bodystructure(message, extensible=False),
            b'(("TEXT" "PLAIN" ("CHARSET" "US-ASCII") NIL NIL "7BIT" 1152 23)'
            b'("TEXT" "PLAIN" ("CHARSET" "US-ASCII" "NAME" "cc.diff")'
            b' "<960723163407.20117h@cac.washington.edu>" "Compiler diff" "BASE64" 4554 73)'
            b' "MIXED")')
        check_consistency(self, message)

    def test_multipart_alternative(self):
        message = (b"From: a@b\r\nMIME-Version: 1.0\r\n"
                   b"Content-Type: multipart/alternative; boundary=\"=_alt\"\r\n\r\n"
                   b"This is a multi-part message in MIME format.\r\n"
                   b"--=_alt\r\n"
                   b"Content-Type: text/plain; charset=\"utf-8\"\r\n"
                   b"Content-Transfer-Encoding: quoted-printable\r\n\r\n"
                   b"Hello =E2=82=AC\r\n"
                   b"--=_alt  \r\n"
                   b"Content-Type: text/html; charset=utf-8\r\n\r\n"
                   b"<p>Hello &euro;</p>\r\n\r\n"
                   b"--=_alt--\r\n"
                   b"epilogue\r\n")
        self.assertEqual(
            bodystructure(message),
            b'(("TEXT" "PLAIN" ("CHARSET" "utf-8") NIL NIL "QUOTED-PRINTABLE" 15 1'
            b" NIL NIL NIL NIL)"
            b'("TEXT" "HTML" ("CHARSET" "utf-8") NIL NIL "7BIT" 21 1 NIL NIL NIL NIL)'
            b' "ALTERNATIVE" ("BOUNDARY" "=_alt") NIL NIL NIL)')
        check_consistency(self, message)

    MIXED = (b"From: Alice <alice@example.test>\r\n"
             b"Subject: report\r\n"
             b"Content-Type: multipart/mixed;\r\n boundary=\"outer\"\r\n\r\n"
             b"--outer\r\n"
             b"Content-Type: multipart/related; boundary=inner; type=\"text/html\"\r\n\r\n"
             b"--inner\r\n"
             b"Content-Type: text/html; charset=utf-8\r\n"
             b"Content-Language: en, de (German)\r\n\r\n"
             b"<img src=\"cid:logo\">\r\n"
             b"--inner\r\n"
             b"Content-Type: image/png\r\n"
             b"Content-ID: <logo>\r\n"
             b"Content-Location: http://example.test/logo.png\r\n"
             b"Content-Transfer-Encoding: base64\r\n\r\n"
             b"iVBORw0KGgo=\r\n"
             b"--inner--\r\n"
             b"--outer\r\n"
             b"Content-Type: application/pdf; name=\"report.pdf\"\r\n"
             b"Content-Transfer-Encoding: base64\r\n"
             b"Content-Disposition: attachment;\r\n\tfilename=\"report.pdf\"; size=9\r\n"
             b"Content-MD5: Q2hlY2sgSW50ZWdyaXR5IQ==\r\n"
             b"Content-Language: fr\r\n\r\n"
             b"JVBERi0x\r\nLjQK\r\n"
             b"--outer\r\n"
             b"Content-Type: message/rfc822\r\n"
             b"Content-Description: forwarded\r\n\r\n"
             b"From: Bob <bob@example.test>\r\n"
             b"Subject: original\r\n"
             b"Content-Type: multipart/mixed; boundary=fwd\r\n\r\n"
             b"--fwd\r\n\r\nplain default\r\n"
             b"--fwd\r\n"
             b"Content-Type: text/plain; charset=iso-8859-1\r\n\r\n"
             b"caf\xe9\r\n"
             b"--fwd--\r\n"
             b"\r\n--outer--\r\n")

    def test_multipart_mixed_with_attachment_and_message(self):
        self.assertEqual(
            bodystructure(self.MIXED),
            b'((("TEXT" "HTML" ("CHARSET" "utf-8") NIL NIL "7BIT" 20 1 NIL NIL ("en" "de") NIL)'
            b'("IMAGE" "PNG" NIL "<logo>" NIL "BASE64" 12 NIL NIL NIL'
            b' "http://example.test/logo.png")'
            b' "RELATED" ("BOUNDARY" "inner" "TYPE" "text/html") NIL NIL NIL)'
            b'("APPLICATION" "PDF" ("NAME" "report.pdf") NIL NIL "BASE64" 14'
            b' "Q2hlY2sgSW50ZWdyaXR5IQ==" ("ATTACHMENT" ("FILENAME" "report.pdf" "SIZE" "9"))'
            b' "fr" NIL)'
            b'("MESSAGE" "RFC822" NIL NIL "forwarded" "7BIT" 190'
            b' (NIL "original" (("Bob" NIL "bob" "example.test")) (("Bob" NIL "bob" "example.test"))'
            b' (("Bob" NIL "bob" "example.test")) NIL NIL NIL NIL NIL)'
            b' (("TEXT" "PLAIN" ("CHARSET" "US-ASCII") NIL NIL "7BIT" 13 1 NIL NIL NIL NIL)'
            b'("TEXT" "PLAIN" ("CHARSET" "iso-8859-1") NIL NIL "7BIT" 4 1 NIL NIL NIL NIL)'
            b' "MIXED" ("BOUNDARY" "fwd") NIL NIL NIL)'
            b" 12 NIL NIL NIL NIL)"
            b' "MIXED" ("BOUNDARY" "outer") NIL NIL NIL)')
        self.assertEqual(
            bodystructure(self.MIXED, extensible=False),
            b'((("TEXT" "HTML" ("CHARSET" "utf-8") NIL NIL "7BIT" 20 1)'
            b'("IMAGE" "PNG" NIL "<logo>" NIL "BASE64" 12) "RELATED")'
            b'("APPLICATION" "PDF" ("NAME" "report.pdf") NIL NIL "BASE64" 14)'
            b'("MESSAGE" "RFC822" NIL NIL "forwarded" "7BIT" 190'
            b' (NIL "original" (("Bob" NIL "bob" "example.test")) (("Bob" NIL "bob" "example.test"))'
            b' (("Bob" NIL "bob" "example.test")) NIL NIL NIL NIL NIL)'
            b' (("TEXT" "PLAIN" ("CHARSET" "US-ASCII") NIL NIL "7BIT" 13 1)'
            b'("TEXT" "PLAIN" ("CHARSET" "iso-8859-1") NIL NIL "7BIT" 4 1) "MIXED")'
            b" 12)"
            b' "MIXED")')
        check_consistency(self, self.MIXED)

    def test_rfc2231_parameters(self):
        message = (b"Content-Type: application/octet-stream;\r\n"
                   b" name*0=\"long \"; name*1=\"name.txt\"\r\n"
                   b"Content-Disposition: attachment;\r\n"
                   b" filename*0*=utf-8''%E2%82%AC; filename*1=\" rate.txt\"; filename*3=lost;\r\n"
                   b" title*=us-ascii'en'This%20is\r\n\r\ndata")
        structure = parse_imap(bodystructure(message))
        self.assertEqual(structure[2], [b"NAME", b"long name.txt"])
        self.assertEqual(structure[8], [b"ATTACHMENT", [
            b"FILENAME*", b"utf-8''%E2%82%AC%20rate.txt", b"TITLE*", b"us-ascii'en'This%20is"]])

    def test_comments_and_odd_spacing_in_mime_fields(self):
        message = (b"Content-Type: text/plain (comment; boundary=x) ; charset = \"utf-8\" (c)\r\n"
                   b"Content-Transfer-Encoding: (enc) Base64\r\n\r\naGk=")
        self.assertEqual(bodystructure(message, extensible=False),
                         b'("TEXT" "PLAIN" ("CHARSET" "utf-8") NIL NIL "BASE64" 4 1)')

    def test_digest_parts_default_to_message(self):
        message = (b"Content-Type: multipart/digest; boundary=d\r\n\r\n"
                   b"--d\r\n\r\nSubject: one\r\n\r\nbody one\r\n"
                   b"--d\r\nContent-Type: text/plain\r\n\r\nnot a message\r\n--d--\r\n")
        self.assertEqual(
            bodystructure(message, extensible=False),
            b'(("MESSAGE" "RFC822" NIL NIL NIL "7BIT" 24'
            b' (NIL "one" NIL NIL NIL NIL NIL NIL NIL NIL)'
            b' ("TEXT" "PLAIN" ("CHARSET" "US-ASCII") NIL NIL "7BIT" 8 1) 3)'
            b'("TEXT" "PLAIN" NIL NIL NIL "7BIT" 13 1) "DIGEST")')
        check_consistency(self, message)

    def test_multipart_without_parts_or_boundary(self):
        empty = b"Content-Type: multipart/mixed; boundary=b\r\n\r\nno delimiter here\r\n"
        self.assertEqual(bodystructure(empty, extensible=False),
                         b'(("TEXT" "PLAIN" ("CHARSET" "US-ASCII") NIL NIL "7BIT" 0 0) "MIXED")')
        self.assertIsNone(section(empty, "1"))
        no_boundary = b"Content-Type: multipart/mixed\r\n\r\n--b\r\n\r\nx\r\n--b--\r\n"
        self.assertEqual(bodystructure(no_boundary, extensible=False),
                         b'("APPLICATION" "OCTET-STREAM" NIL NIL NIL "7BIT" 17)')
        self.assertEqual(section(no_boundary, "1"), b"--b\r\n\r\nx\r\n--b--\r\n")

    def test_boundary_lookalikes_and_unclosed_parts(self):
        message = (b"Content-Type: multipart/mixed; boundary=b\r\n\r\n"
                   b"--b\r\n\r\none\r\n--bb\r\n--b junk\r\n"
                   b"--b\r\nContent-Type: multipart/mixed; boundary=c\r\n\r\n"
                   b"--c\r\n\r\ninner, never closed\r\n"
                   b"--b\r\n\r\nlast, no close delimiter")
        self.assertEqual(section(message, "1"), b"one\r\n--bb\r\n--b junk")
        self.assertEqual(section(message, "2.1"), b"inner, never closed")
        self.assertEqual(section(message, "3"), b"last, no close delimiter")
        check_consistency(self, message)

    def test_lf_only_message(self):
        message = (b"Content-Type: multipart/mixed; boundary=b\n\n--b\n"
                   b"Content-Type: text/plain\n\nline one\nline two\n--b--\n")
        self.assertEqual(bodystructure(message, extensible=False),
                         b'(("TEXT" "PLAIN" NIL NIL NIL "7BIT" 17 2) "MIXED")')
        self.assertEqual(section(message, "1"), b"line one\nline two")


class SectionTests(unittest.TestCase):
    MIXED = BodyStructureTests.MIXED

    def test_whole_header_text(self):
        header, _, text = RFC_MESSAGE.partition(b"\r\n\r\n")
        self.assertIs(section(RFC_MESSAGE, ""), RFC_MESSAGE)
        self.assertEqual(section(RFC_MESSAGE, "HEADER"), header + b"\r\n\r\n")
        self.assertEqual(section(RFC_MESSAGE, "TEXT"), text)
        self.assertEqual(section(RFC_MESSAGE, "text"), text)

    def test_non_multipart_part_one_is_the_body(self):
        text = RFC_MESSAGE.partition(b"\r\n\r\n")[2]
        self.assertEqual(section(RFC_MESSAGE, "1"), text)
        self.assertEqual(section(RFC_MESSAGE, "1.MIME"),
                         RFC_MESSAGE.partition(b"\r\n\r\n")[0] + b"\r\n\r\n")
        self.assertIsNone(section(RFC_MESSAGE, "2"))
        self.assertIsNone(section(RFC_MESSAGE, "1.1"))
        self.assertIsNone(section(RFC_MESSAGE, "1.HEADER"))
        self.assertIsNone(section(RFC_MESSAGE, "1.TEXT"))

    def test_header_fields(self):
        self.assertEqual(section(RFC_MESSAGE, "HEADER.FIELDS (FROM CC)"),
                         b"From: Terry Gray <gray@cac.washington.edu>\r\n"
                         b"cc: minutes@CNRI.Reston.VA.US,\r\n\tJohn Klensin <KLENSIN@MIT.EDU>\r\n"
                         b"\r\n")
        self.assertEqual(section(RFC_MESSAGE, 'header.fields (from "Cc")'),
                         section(RFC_MESSAGE, "HEADER.FIELDS (FROM CC)"))
        self.assertEqual(section(RFC_MESSAGE, "HEADER.FIELDS (X-NONE)"), b"\r\n")
        self.assertEqual(section(b"Subject: no body", "HEADER.FIELDS (SUBJECT)"),
                         b"Subject: no body\r\n\r\n")
        self.assertEqual(section(b"\r\nbody", "HEADER.FIELDS (SUBJECT)"), b"\r\n")

    def test_header_fields_names_are_whole_names(self):
        message = b"To: a@b\r\nTo-Do: x\r\nX-To: y\r\nto : z\r\n\r\n"
        self.assertEqual(section(message, "HEADER.FIELDS (TO)"), b"To: a@b\r\nto : z\r\n\r\n")

    def test_header_fields_not(self):
        self.assertEqual(
            section(RFC_MESSAGE, "HEADER.FIELDS.NOT (Date Subject To cc Message-ID MIME-Version"
                                 " content-type)"),
            b"From: Terry Gray <gray@cac.washington.edu>\r\n\r\n")
        self.assertEqual(section(b"A: 1\r\nB: 2\r\n \r\n", "HEADER.FIELDS.NOT (B)"),
                         b"A: 1\r\n\r\n")

    def test_parts(self):
        m = self.MIXED
        self.assertEqual(section(m, "1.1"), b'<img src="cid:logo">')
        self.assertEqual(section(m, "1.2"), b"iVBORw0KGgo=")
        self.assertEqual(section(m, "1.2.MIME"),
                         b"Content-Type: image/png\r\nContent-ID: <logo>\r\n"
                         b"Content-Location: http://example.test/logo.png\r\n"
                         b"Content-Transfer-Encoding: base64\r\n\r\n")
        self.assertEqual(section(m, "1"), m[m.index(b"--inner\r\n"):m.index(b"\r\n--outer\r\nContent-Type: app")])
        self.assertEqual(section(m, "2"), b"JVBERi0x\r\nLjQK")
        self.assertIsNone(section(m, "2.1"))
        self.assertIsNone(section(m, "5"))
        self.assertIsNone(section(m, "1.3"))
        self.assertIsNone(section(m, "2.HEADER"))

    def test_message_rfc822_parts(self):
        m = self.MIXED
        inner = m[m.index(b"From: Bob"):m.index(b"\r\n--outer--")]
        self.assertEqual(section(m, "3"), inner)
        self.assertEqual(section(m, "3.HEADER"), inner[:inner.index(b"\r\n\r\n") + 4])
        self.assertEqual(section(m, "3.TEXT"), inner[inner.index(b"\r\n\r\n") + 4:])
        self.assertEqual(section(m, "3.HEADER.FIELDS (subject)"), b"Subject: original\r\n\r\n")
        self.assertEqual(section(m, "3.HEADER.FIELDS.NOT (subject content-type)"),
                         b"From: Bob <bob@example.test>\r\n\r\n")
        self.assertEqual(section(m, "3.MIME"),
                         b"Content-Type: message/rfc822\r\nContent-Description: forwarded\r\n\r\n")
        self.assertEqual(section(m, "3.1"), b"plain default")
        self.assertEqual(section(m, "3.2"), b"caf\xe9")
        self.assertEqual(section(m, "3.2.MIME"),
                         b"Content-Type: text/plain; charset=iso-8859-1\r\n\r\n")
        self.assertIsNone(section(m, "3.3"))
        self.assertIsNone(section(m, "3.1.HEADER"))

    def test_single_part_inner_message(self):
        m = (b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n"
             b"Content-Type: message/rfc822\r\n\r\nSubject: in\r\n\r\ninner text\r\n--b--\r\n")
        self.assertEqual(section(m, "1.1"), b"inner text")
        self.assertEqual(section(m, "1.TEXT"), b"inner text")
        self.assertEqual(section(m, "1.1.MIME"), b"Subject: in\r\n\r\n")
        self.assertIsNone(section(m, "1.2"))

    def test_tree_shared(self):
        tree = parse(self.MIXED)
        self.assertEqual(section(tree, "3.2"), section(self.MIXED, "3.2"))
        self.assertEqual(bodystructure(tree), bodystructure(self.MIXED))
        self.assertIs(parse(tree), tree)

    def test_parse_section(self):
        self.assertEqual(str(parse_section("")), "")
        self.assertEqual(str(parse_section("1.2.3")), "1.2.3")
        self.assertEqual(str(parse_section("header")), "HEADER")
        self.assertEqual(str(parse_section("4.2.mime")), "4.2.MIME")
        s = parse_section('1.header.fields.not (from "X-Y" subject)')
        self.assertEqual((s.path, s.text, s.fields),
                         ((1,), "HEADER.FIELDS.NOT", ("FROM", "X-Y", "SUBJECT")))
        self.assertEqual(str(s), "1.HEADER.FIELDS.NOT (FROM X-Y SUBJECT)")
        self.assertEqual(parse_section("TEXT"), Section((), "TEXT"))

    def test_bad_sections(self):
        for spec in ["0", "1.", "1..2", ".1", "MIME", "HEADER.FIELDS", "HEADER.FIELDS ()",
                     "HEADER.FIELDS (A:B)", 'HEADER.FIELDS ("")', "HEADER.FIELDS  (A)",
                     "HEADER.FIELDS (A  B)", "HEADER.FIELDS (A", "FOO", "1.2.FOO", "1.0",
                     "01", "99999999999", "4294967296", "TEXT.1", "HEADER ", "1.MIME.TEXT"]:
            self.assertRaises(SectionSyntaxError, parse_section, spec)
        self.assertTrue(issubclass(SectionSyntaxError, ValueError))


class HostileInputTests(unittest.TestCase):
    """Bounded work and no exceptions; only correctness is asserted, with a rough
    CPU time guard."""

    def setUp(self):
        self.started = time.process_time()

    def tearDown(self):
        self.assertLess(time.process_time() - self.started, SLOW)

    def test_2000_nested_multiparts(self):
        message = b"".join(b"Content-Type: multipart/mixed; boundary=b%d\r\n\r\n--b%d\r\n" % (i, i)
                           for i in range(2000)) + b"\r\nleaf\r\n"
        structure = check_consistency(self, message)
        depth = 0
        body = structure
        while isinstance(body[0], list):
            body = body[0]
            depth += 1
        self.assertEqual(depth, MAX_DEPTH)
        self.assertEqual(body[:2], [b"APPLICATION", b"OCTET-STREAM"])
        self.assertIsNotNone(section(message, ".".join(["1"] * MAX_DEPTH)))
        self.assertIsNone(section(message, ".".join(["1"] * (MAX_DEPTH + 1))))

    def test_2000_nested_multiparts_same_boundary(self):
        message = b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n" * 2000 + b"\r\nleaf"
        structure = check_consistency(self, message)
        self.assertEqual(len(leaves(structure)), 2000)

    def test_100000_sibling_parts(self):
        message = (b"Content-Type: multipart/mixed; boundary=x\r\n\r\n"
                   + b"--x\r\nContent-Type: text/plain\r\n\r\np\r\n" * 100000 + b"--x--\r\n")
        structure = check_consistency(self, message)
        parts = dict(leaves(structure))
        self.assertEqual(len(parts), MAX_PARTS - 1)
        self.assertEqual(parts["1"][:2], [b"TEXT", b"PLAIN"])
        self.assertEqual(parts[str(MAX_PARTS - 1)][:2], [b"APPLICATION", b"OCTET-STREAM"])
        last = section(message, str(MAX_PARTS - 1))
        self.assertTrue(last.startswith(b"p\r\n--x\r\n"))
        self.assertTrue(last.endswith(b"--x--\r\n"))
        self.assertIsNone(section(message, str(MAX_PARTS)))

    def test_100000_rfc2231_sections(self):
        message = (b"Content-Type: text/plain; "
                   + b"; ".join(b"a*%d=x" % i for i in range(100000)) + b"\r\n\r\nbody\r\n")
        structure = check_consistency(self, message)
        name, value = structure[2]
        self.assertEqual(name, b"A")
        self.assertTrue(value and set(value) == {ord("x")}, value[:20])
        self.assertEqual(section(message, "TEXT"), b"body\r\n")

    def test_rfc2231_sections_out_of_order_and_huge_numbers(self):
        message = (b"Content-Type: text/plain; a*2=c; a*1=b; a*0=a; a*99999999999=z; "
                   b"b*1=orphan; c*00=q\r\n\r\n")
        structure = parse_imap(bodystructure(message))
        self.assertEqual(structure[2][:2], [b"A", b"abc"])

    def test_5000_nested_messages(self):
        message = b"Content-Type: message/rfc822\r\nSubject: s\r\n\r\n" * 5000 + b"\r\nleaf\r\n"
        check_consistency(self, message)

    def test_huge_header_without_blank_line(self):
        message = b"Subject: " + b"x" * 5_000_000
        self.assertEqual(section(message, "HEADER"), message)
        self.assertEqual(section(message, "TEXT"), b"")
        self.assertEqual(section(message, "HEADER.FIELDS (SUBJECT)"), message + b"\r\n\r\n")
        check_consistency(self, message)

    def test_many_header_lines(self):
        message = b"Received: x\r\n" * 500_000 + b"To: a@b\r\n\r\n"
        self.assertEqual(section(message, "HEADER.FIELDS (TO)"), b"To: a@b\r\n\r\n")
        self.assertEqual(len(section(message, "HEADER.FIELDS.NOT (TO)")), 13 * 500_000 + 2)
        check_consistency(self, message)

    def test_boundary_lookalike_lines(self):
        message = (b"Content-Type: multipart/mixed; boundary=x\r\n\r\n--x\r\n\r\n"
                   + b"--xy\r\n" * 1_000_000 + b"--x--\r\n")
        check_consistency(self, message)

    def test_deep_nesting_over_a_big_body(self):
        message = b"".join(b"Content-Type: multipart/mixed; boundary=b%d\r\n\r\n--b%d\r\n" % (i, i)
                           for i in range(100)) + b"\r\n" + b"z" * 10_000_000
        check_consistency(self, message)

    def test_many_parts_with_many_parameters_and_addresses(self):
        message = (b"Content-Type: multipart/mixed; boundary=x\r\n\r\n"
                   + (b"--x\r\nContent-Type: message/rfc822" + b";a=b" * 300 + b"\r\n\r\n"
                      b"To: " + b"a," * 600 + b"\r\n\r\np\r\n") * 2000 + b"--x--\r\n")
        check_consistency(self, message)

    def test_hostile_address_headers(self):
        for value in [b"(" * 60000, b'"' + b"\\" * 60001, b"<" * 60000, b"[" * 60000,
                      b"a:" * 30000, b";" * 60000, b"@" * 60000, b"\\" * 60000,
                      b"a," * 30000 + b"b", b"(a" * 20000 + b")" * 20000]:
            for name in [b"From", b"To", b"Sender"]:
                env = envelope(name + b": " + value + b"\r\n\r\n")
                self.assertEqual(len(parse_imap(env)), 10)

    def test_hostile_mime_headers(self):
        for value in [b"(" * 60000, b'text/plain; a="' + b"\\" * 60001,
                      b"multipart/mixed; boundary=" + b"b" * 60000,
                      b"text/plain" + b";" * 60000, b"text/plain; a*=" + b"'" * 60000,
                      b"message/rfc822" + b" (x" * 20000]:
            message = (b"Content-Type: " + value + b"\r\nContent-Disposition: " + value
                       + b"\r\nContent-Language: " + value + b"\r\n\r\nbody")
            check_consistency(self, message)

    def test_fuzzed_messages(self):
        rng = random.Random(3501)
        samples = [RFC_MESSAGE, BodyStructureTests.MIXED]
        pieces = [b"\r\n", b"\n", b"--", b"--outer", b"--inner--", b"--fwd", b":", b";", b"(",
                  b")", b'"', b"\\", b"<", b">", b"\x00", b"\xff", b"Content-Type: multipart/x;"
                  b" boundary=outer\r\n", b"Content-Type: message/rfc822\r\n", b"\r\n\r\n", b"*0*="]
        for _ in range(300):
            data = bytearray(rng.choice(samples))
            for _ in range(rng.randint(1, 8)):
                at = rng.randrange(len(data) + 1)
                op = rng.random()
                if op < 0.4:
                    data[at:at] = rng.choice(pieces)
                elif op < 0.7:
                    del data[at:at + rng.randint(1, 40)]
                else:
                    data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 5)))
            data = bytes(data)
            check_consistency(self, data)
            for spec in ["1", "2", "3", "1.1", "3.1", "3.2", "3.HEADER", "3.TEXT", "2.MIME",
                         "HEADER.FIELDS (FROM)", "HEADER.FIELDS.NOT (FROM)"]:
                out = section(data, spec)
                self.assertTrue(out is None or isinstance(out, bytes))
