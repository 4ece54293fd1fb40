"""The message as the content filters see it: MIME walk, decoding, and hostile input.

security.md G1-G4: nesting, part and parameter floods, header bombs and
broken encodings are parsed within fixed bounds and never raise.
"""

from twisted.trial import unittest

from mailbox_appliance.antispam import message
from mailbox_appliance.antispam.message import ScannedMessage, content_type, split_message

ALTERNATIVE = (b"From: a@ext.test\r\nSubject: =?utf-8?q?h=C3=A9llo?=\r\n  folded\r\n"
               b'Content-Type: multipart/alternative; boundary="x y"\r\n\r\n'
               b"preamble\r\n--x y\r\nContent-Type: text/plain\r\n\r\nhi http://x.test/a.\r\n"
               b"--x y\r\nContent-Type: text/html; charset=utf-8\r\n"
               b"Content-Transfer-Encoding: base64\r\n\r\n"
               b"PGI+Ym9sZDwvYj48YSBocmVmPSJodHRwOi8veS50ZXN0L2IiPmxpbms8L2E+PHNjcmlwdD5l"
               b"dmlsPC9zY3JpcHQ+\r\n--x y--\r\nepilogue\r\n")


def nested(levels):
    head = b"From: a@b.test\r\n"
    opening = b"".join(b"Content-Type: multipart/mixed; boundary=b%d\r\n\r\n--b%d\r\n" % (i, i)
                       for i in range(levels))
    closing = b"".join(b"\r\n--b%d--" % i for i in reversed(range(levels)))
    return head + opening + b"Content-Type: text/plain\r\n\r\ndeep" + closing + b"\r\n"


class WalkTests(unittest.TestCase):

    def test_alternative_parts_decoded_html_reduced(self):
        m = ScannedMessage.parse(ALTERNATIVE, sender="a@ext.test")
        self.assertEqual(m.get("subject"), "héllo  folded")
        self.assertEqual(m.text, "hi http://x.test/a.\nboldlink")
        self.assertIn('<a href="http://y.test/b">', m.rawbody)
        self.assertEqual(m.uris, ["http://y.test/b", "http://x.test/a"])
        self.assertEqual((m.parts, m.truncated), (2, False))
        self.assertNotIn("preamble", m.text)
        self.assertNotIn("epilogue", m.text)

    def test_message_rfc822_part_is_walked(self):
        raw = (b"Content-Type: multipart/mixed; boundary=z\r\n\r\n--z\r\n"
               b"Content-Type: message/rfc822\r\n\r\nSubject: inner\r\n"
               b"Content-Type: text/plain; charset=iso-8859-1\r\n"
               b"Content-Transfer-Encoding: quoted-printable\r\n\r\ncaf=E9\r\n--z--\r\n")
        m = ScannedMessage.parse(raw)
        self.assertEqual(m.text, "caf\u00e9")

    def test_no_content_type_is_text_plain_and_lf_messages(self):
        m = ScannedMessage.parse(b"Subject: x\n\nplain body\n")
        self.assertEqual(m.text, "plain body\n")
        self.assertEqual(m.get_all("SUBJECT"), ["x"])

    def test_split_message(self):
        self.assertEqual(split_message(b"A: b\nC: d\n\nbody\r\n\r\nx"),
                         (b"A: b\nC: d\n", b"body\r\n\r\nx"))
        self.assertEqual(split_message(b"\r\nbody"), (b"", b"body"))
        self.assertEqual(split_message(b"A: b\r\n"), (b"A: b\r\n", b""))

    def test_content_type(self):
        self.assertEqual(content_type('Multipart/Mixed; Boundary="a\\"b"; charset=x'),
                         ("multipart/mixed", {"boundary": 'a"b', "charset": "x"}))
        self.assertEqual(content_type("garbage"), ("text/plain", {}))
        self.assertEqual(content_type(""), ("text/plain", {}))


class HostileTests(unittest.TestCase):
    """Each case parses without raising, and what it keeps stays within the bounds."""

    def test_g1_two_thousand_nested_levels(self):
        m = ScannedMessage.parse(nested(2000))
        self.assertTrue(m.truncated)
        self.assertEqual(m.text, "")
        shallow = ScannedMessage.parse(nested(5))
        self.assertEqual(shallow.text, "deep")

    def test_g2_hundred_thousand_siblings_and_rfc822_parts(self):
        raw = (b"Content-Type: multipart/mixed; boundary=x\r\n\r\n"
               + b"--x\r\nContent-Type: text/plain\r\n\r\nhello\r\n" * 100000 + b"--x--\r\n")
        m = ScannedMessage.parse(raw)
        self.assertEqual(m.parts, message.MAX_PARTS)
        self.assertTrue(m.truncated)
        raw = (b"Content-Type: multipart/mixed; boundary=x\r\n\r\n"
               + b"--x\r\nContent-Type: message/rfc822\r\n\r\nSubject: in\r\n\r\ninner\r\n"
               * 10000 + b"--x--\r\n")
        m = ScannedMessage.parse(raw)
        self.assertEqual(m.parts, message.MAX_PARTS)

    def test_g2_rfc2231_parameter_flood(self):
        params = b"; ".join(b"a*%d=x" % i for i in range(99999))
        m = ScannedMessage.parse(b"Content-Type: text/plain; " + params + b"\r\n\r\nbody\r\n")
        self.assertEqual(m.text, "body\r\n")

    def test_g3_header_bombs(self):
        m = ScannedMessage.parse(b"X-A: a\r\n" + b" b\r\n" * 200000 + b"\r\nbody\r\n")
        self.assertEqual(len(m.headers), 1)
        self.assertLessEqual(len(m.headers[0][1]), message.MAX_HEADER_VALUE)
        m = ScannedMessage.parse(b"To: x@y.test\r\n" * 200000 + b"\r\nbody\r\n")
        self.assertEqual(len(m.headers), message.MAX_HEADERS)
        self.assertTrue(m.truncated)
        m = ScannedMessage.parse(b"X-Big: " + b"a" * 10000000 + b"\r\n\r\nbody\r\n")
        self.assertLessEqual(len(m.get("x-big")), message.MAX_HEADER_VALUE)
        m = ScannedMessage.parse(b"".join(b"X-H%d: v\r\n" % i for i in range(20000)) + b"\r\nb")
        self.assertEqual(len(m.headers), message.MAX_HEADERS)

    def test_g4_broken_encodings(self):
        cases = [
            (b"Content-Transfer-Encoding: base64\r\n\r\n====\r\nA===\r\n", ""),
            (b"Content-Transfer-Encoding: base64\r\n\r\n" + b"A" * 4000000 + b"\r\n", None),
            (b"Content-Transfer-Encoding: quoted-printable\r\n\r\nabc=\r\n=4", "abc=4"),
            (b"Content-Transfer-Encoding: base64\r\nContent-Transfer-Encoding: 7bit\r\n\r\n"
             b"aGk=\r\n", "hi"),
            (b"Content-Type: text/plain; charset=x-unknown\r\n\r\nh\xffi", "h\xffi"),
        ]
        for head, text in cases:
            m = ScannedMessage.parse(b"Subject: =?x-unknown?B?aGVsbG8=?=\r\nFrom: \xff@x\r\n"
                                     + head)
            if text is not None:
                self.assertEqual(m.text, text, head[:60])
            self.assertLessEqual(len(m.text), message.MAX_TEXT)
            self.assertEqual(m.get("subject"), "=?x-unknown?B?aGVsbG8=?=")

    def test_html_bounded_and_links_capped(self):
        html = (b"Content-Type: text/html\r\n\r\n"
                + b'<a href="http://h%d.test/">x</a>' * 5000)
        m = ScannedMessage.parse(html.replace(b"%d", b"1") + b"<p>" + b"<b>" * 100000)
        self.assertLessEqual(len(m.uris), message.MAX_URIS)
        many = b"Content-Type: text/html\r\n\r\n" + b"".join(
            b'<a href="http://h%d.test/">x</a>' % i for i in range(5000))
        self.assertEqual(len(ScannedMessage.parse(many).uris), message.MAX_URIS)


class LinkTests(unittest.TestCase):

    def test_links_found_at_word_starts_only(self):
        from mailbox_appliance.antispam.message import _uris
        text = ("See HTTP://Example.COM/a, www.b.example and xhttp://no.example "
                "_www.no.example mailto:ann@example.org.")
        self.assertEqual(_uris([], text), ["HTTP://Example.COM/a", "www.b.example",
                                           "mailto:ann@example.org"])

    def test_text_whose_lower_case_is_longer(self):
        from mailbox_appliance.antispam.message import _uris
        text = "\u0130" * 50 + " https://a.example/x " + "\u0130" * 10 + " www.b.example"
        self.assertEqual(_uris([], text), ["https://a.example/x", "www.b.example"])
