"""A post to a list: the input checks (lists.md 4.2) and the copy that goes out (4.3-4.5)."""

import email
import email.header
import email.policy

from twisted.trial import unittest

from mailbox_appliance.lists import posting
from mailbox_appliance.lists.posting import DISCARD, REFUSE, check_post, prepare_post


def post(*fields, body=b"Hello all.\r\n"):
    head = b"".join(f.encode() + b"\r\n" for f in fields) if fields else b""
    base = (b"From: Ann <ann@example.org>\r\nTo: team@lists.test\r\n"
            b"Subject: Meeting\r\nMessage-ID: <1@example.org>\r\n"
            b"Date: Sat, 28 Nov 2026 10:00:00 +0000\r\n")
    return base + head + b"\r\n" + body


def parsed(raw):
    return email.message_from_bytes(raw, policy=email.policy.compat32)


def check(raw, **kw):
    return check_post(raw, parsed(raw), "team", "lists.test", **kw)


class CheckTests(unittest.TestCase):

    def test_ordinary_post_goes_on(self):
        self.assertIsNone(check(post()))

    def test_loops_discarded(self):
        for field in ("X-Loop: team@lists.test", "X-Loop: TEAM@Lists.Test",
                      "List-Id: Team <team.lists.test>",
                      "List-Post: <mailto:team@lists.test>"):
            result = check(post(field))
            self.assertEqual(result.action, DISCARD, field)
            self.assertIn("loop", result.reason)
        # Another list's fields are no loop (a list subscribed to a list).
        self.assertIsNone(check(post("List-Id: <other.example.net>",
                                     "X-Loop: other@example.net")))

    def test_automatic_mail_discarded(self):
        for field in ("Auto-Submitted: auto-replied", "Auto-Submitted: auto-generated (x)",
                      "Content-Identifier: foo"):
            self.assertEqual(check(post(field)).action, DISCARD, field)
        self.assertIsNone(check(post("Auto-Submitted: no")))
        raw = post().replace(b"ann@example.org", b"mailer-daemon@example.org")
        self.assertEqual(check(raw).action, DISCARD)
        raw = post().replace(b"From: Ann <ann@example.org>",
                             b"From: a@example.org, b@example.org")
        self.assertEqual(check(raw).reason, "no single From: mailbox")

    def test_duplicate_message_id(self):
        seen = {"<1@example.org>"}
        self.assertEqual(check(post(), seen_message_id=seen.__contains__).action, DISCARD)
        raw = post().replace(b"<1@example.org>", b"<2@example.org>")
        self.assertIsNone(check(raw, seen_message_id=seen.__contains__))

    def test_too_large_refused(self):
        result = check(post(body=b"x" * 2000 + b"\r\n"), max_size=1000)
        self.assertEqual(result.action, REFUSE)
        self.assertIn("5.2.3", result.reason)

    def test_misaddressed_command_refused(self):
        raw = post().replace(b"Subject: Meeting", b"Subject: unsubscribe")
        result = check(raw)
        self.assertEqual((result.action, result.command), (REFUSE, "unsubscribe"))
        raw = post(body=b"subscribe team\r\n")
        self.assertEqual(check(raw).command, "subscribe")
        # A long body that starts like a command is a post.
        self.assertIsNone(check(post(body=b"subscribe team\r\n" + b"more words\r\n" * 8)))


class SubjectTagTests(unittest.TestCase):

    def test_tag_once_reply_prefixes_collapsed(self):
        self.assertEqual(posting.tagged_subject("Meeting", "[team]"), "[team] Meeting")
        self.assertEqual(posting.tagged_subject("Re: [team] Meeting", "[team]"),
                         "Re: [team] Meeting")
        self.assertEqual(posting.tagged_subject("RE: AW: Re: [team] Meeting [team]", "[team]"),
                         "Re: [team] Meeting")
        self.assertEqual(posting.tagged_subject("[team] Re: Meeting", "[team]"),
                         "Re: [team] Meeting")
        self.assertEqual(posting.tagged_subject("Fwd: Meeting", "[team]"), "[team] Meeting")


class PrepareTests(unittest.TestCase):

    def prepare(self, raw, **kw):
        out = prepare_post(raw, "team", "lists.test", **kw)
        return out, parsed(out)

    def test_list_fields_added_dangerous_ones_removed(self):
        raw = post("Return-Receipt-To: ann@example.org", "Disposition-Notification-To: x@y.z",
                   "Precedence: bulk", "Sender: someone@example.org", "Approved: secret",
                   "List-Id: Parent <parent.example.net>", "X-Appliance-Internal: 1",
                   "X-Loop: parent@example.net")
        out, msg = self.prepare(raw, description="Our team")
        for gone in ("Return-Receipt-To", "Disposition-Notification-To", "Sender",
                     "Approved", "X-Appliance-Internal"):
            self.assertIsNone(msg[gone], gone)
        self.assertEqual(msg.get_all("List-Id"), ["Our team <team.lists.test>"])
        self.assertEqual(msg.get_all("Precedence"), ["list"])
        self.assertEqual(msg["List-Post"], "<mailto:team@lists.test>")
        self.assertEqual(msg["List-Help"], "<mailto:lists@lists.test?subject=help>")
        self.assertEqual(msg["List-Subscribe"], "<mailto:team-subscribe@lists.test>")
        self.assertEqual(msg["List-Unsubscribe"],
                         "<mailto:team-unsubscribe@lists.test?subject=unsubscribe>")
        self.assertEqual(msg["List-Owner"], "<mailto:team-owner@lists.test>")
        # X-Loop kept and ours added, never replaced.
        self.assertEqual(msg.get_all("X-Loop"), ["team@lists.test", "parent@example.net"])
        self.assertEqual(msg["Message-ID"], "<1@example.org>")
        self.assertTrue(out.endswith(b"\r\n\r\nHello all.\r\n"))
        # The output itself passes the loop check: it is never distributed twice.
        self.assertEqual(check(out).action, DISCARD)

    def test_untouched_fields_go_out_byte_for_byte(self):
        folded = b"X-Long: one\r\n two\r\n\tthree\r\n"
        raw = post().replace(b"\r\n\r\n", b"\r\n" + folded + b"\r\n", 1)
        out, _ = self.prepare(raw)
        self.assertIn(folded, out)
        self.assertIn(b"Date: Sat, 28 Nov 2026 10:00:00 +0000\r\n", out)

    def test_announce_list_and_missing_message_id(self):
        raw = post().replace(b"Message-ID: <1@example.org>\r\n", b"")
        out, msg = self.prepare(raw, announce=True, hostname="mx.lists.test")
        self.assertEqual(msg["List-Post"], "NO")
        self.assertTrue(msg["Message-ID"].endswith("@mx.lists.test>"))

    def test_subject_tag_in_its_charset(self):
        raw = post().replace(b"Subject: Meeting", b"Subject: =?iso-8859-1?q?R=E9union?=")
        out, msg = self.prepare(raw, subject_tag="[team]")
        self.assertIn(b"iso-8859-1", out.split(b"\r\n\r\n")[0].lower())
        text = str(email.header.make_header(email.header.decode_header(msg["Subject"])))
        self.assertEqual(text, "[team] R\xe9union")
        out2, _ = self.prepare(out, subject_tag="[team]")
        msg2 = parsed(out2)
        self.assertEqual(str(email.header.make_header(email.header.decode_header(
            msg2["Subject"]))), "[team] R\xe9union")

    def test_long_non_ascii_fields_are_folded_with_crlf(self):
        """A long encoded Subject or List-Id phrase is folded: with CRLF, never a bare
        LF; specials in the description cannot end the List-Id phrase early."""
        long = "R\xe9union tr\xe8s importante \xe0 propos de l'\xe9t\xe9 " * 3
        subject = email.header.Header(long, "utf-8").encode()
        raw = post().replace(b"Subject: Meeting", b"Subject: " + subject.encode())
        out, msg = self.prepare(raw, subject_tag="[team]",
                                description="\xc9quipe <x@y> " * 10)
        head = out.split(b"\r\n\r\n", 1)[0]
        self.assertNotIn(b"\n", head.replace(b"\r\n", b""))
        self.assertNotIn(b"\r", head.replace(b"\r\n", b""))
        self.assertTrue(str(email.header.make_header(email.header.decode_header(
            msg["Subject"]))).startswith("[team] R\xe9union"))
        lid = str(email.header.make_header(email.header.decode_header(msg["List-Id"])))
        self.assertTrue(lid.endswith("<team.lists.test>"), lid)
        self.assertEqual(lid.count("<"), 1, lid)

    def test_footer_appended_to_plain_text(self):
        out, msg = self.prepare(post(), footer="--\r\nTo leave: team-unsubscribe@lists.test")
        self.assertTrue(out.endswith(b"Hello all.\r\n\r\n--\r\nTo leave: "
                                     b"team-unsubscribe@lists.test\r\n"))

    def test_footer_as_a_part_of_multipart_mixed(self):
        raw = post("MIME-Version: 1.0", 'Content-Type: multipart/mixed; boundary="b1"',
                   body=b"--b1\r\nContent-Type: text/plain\r\n\r\nHi\r\n"
                        b"--b1\r\nContent-Type: application/pdf\r\n\r\nPDF\r\n--b1--\r\n")
        out, msg = self.prepare(raw, footer="Footer text")
        parts = msg.get_payload()
        self.assertEqual([p.get_content_type() for p in parts],
                         ["text/plain", "application/pdf", "text/plain"])
        self.assertEqual(parts[2].get_payload().strip(), "Footer text")

    def test_alternative_and_encoded_text_wrapped(self):
        for ctype, body, cte in (
                ('multipart/alternative; boundary="a1"',
                 b"--a1\r\nContent-Type: text/plain\r\n\r\nHi\r\n--a1\r\n"
                 b"Content-Type: text/html\r\n\r\n<p>Hi</p>\r\n--a1--\r\n", None),
                ("text/plain; charset=utf-8", b"SGk=\r\n", "base64")):
            fields = ["MIME-Version: 1.0", f"Content-Type: {ctype}"]
            if cte:
                fields.append(f"Content-Transfer-Encoding: {cte}")
            out, msg = self.prepare(post(*fields, body=body), footer="Footer")
            self.assertEqual(msg.get_content_type(), "multipart/mixed")
            first, second = msg.get_payload()
            self.assertEqual(first.get_content_type(), ctype.split(";")[0])
            if cte:
                self.assertEqual(first.get_payload(decode=True), b"Hi")
            else:
                self.assertEqual(len(first.get_payload()), 2)
            self.assertEqual(second.get_payload().strip(), "Footer")
            self.assertEqual(len(msg.get_all("MIME-Version")), 1)

    def test_signed_messages_never_altered(self):
        body = (b"--s1\r\nContent-Type: text/plain\r\n\r\nSigned text\r\n"
                b"--s1\r\nContent-Type: application/pgp-signature\r\n\r\nSIG\r\n--s1--\r\n")
        raw = post("MIME-Version: 1.0",
                   'Content-Type: multipart/signed; boundary="s1"; protocol="x"', body=body)
        out, msg = self.prepare(raw, footer="Footer", subject_tag="[team]")
        self.assertTrue(out.endswith(b"\r\n\r\n" + body))
        self.assertEqual(msg["Subject"], "[team] Meeting")
