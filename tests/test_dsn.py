"""Delivery status notices: each part and field read back with the stdlib email package."""

import email
import email.policy
import email.utils

from twisted.trial import unittest

from mailbox_appliance.queue.dsn import (DSNRecipient, build_dsn, clean, header_block,
                                         xtext_decode)
from mailbox_appliance.queue.spool import Envelope

NOW = 1700003600.0
ORIGINAL = (b"Received: from client.ext.test ([192.0.2.7])\r\n\tby mx.example.test\r\n"
            b"From: Alice <alice@ext.test>\r\nTo: bob@remote.test\r\nSubject: the plan\r\n"
            b"Message-ID: <plan@ext.test>\r\n\r\nThe body of the plan.\r\n")


def envelope(**kw):
    kw.setdefault("sender", "alice@ext.test")
    kw.setdefault("recipients", ["bob@remote.test"])
    kw.setdefault("arrival", 1700000000.0)
    kw.setdefault("client_ip", "192.0.2.7")
    kw.setdefault("helo", "client.ext.test")
    return Envelope(**kw)


def failed(**kw):
    kw.setdefault("address", "bob@remote.test")
    kw.setdefault("action", "failed")
    kw.setdefault("status", "5.1.1")
    kw.setdefault("diagnostic", "550 5.1.1 <bob@remote.test>: Recipient address rejected")
    kw.setdefault("remote_mta", "mx.remote.test")
    kw.setdefault("from_remote", True)
    kw.setdefault("last_attempt", NOW)
    return DSNRecipient(**kw)


def build(recipients=None, env=None, original=ORIGINAL, **kw):
    kw.setdefault("hostname", "mx.example.test")
    kw.setdefault("qid", "0123456789ABCDEF")
    kw.setdefault("now", NOW)
    kw.setdefault("to", "alice@ext.test")
    return build_dsn(envelope=env or envelope(), recipients=recipients or [failed()],
                     original=original, **kw)


def parse(data):
    return email.message_from_bytes(data, policy=email.policy.default)


class Structure:
    """Helpers to take a notice apart."""

    def parts(self, data):
        msg = parse(data)
        self.assertEqual(msg.get_content_type(), "multipart/report")
        self.assertEqual(msg.get_param("report-type"), "delivery-status")
        parts = list(msg.iter_parts())
        self.assertEqual(len(parts), 3)
        self.assertEqual(parts[0].get_content_type(), "text/plain")
        self.assertEqual(parts[1].get_content_type(), "message/delivery-status")
        self.assertEqual(msg.defects, [])
        for p in msg.walk():
            self.assertEqual(list(p.defects), [], p.get_content_type())
        return msg, parts

    def blocks(self, data):
        _, parts = self.parts(data)
        blocks = parts[1].get_payload()
        return blocks[0], blocks[1:]

    def assertWellFormed(self, data):
        self.assertNotIn(b"\n", data.replace(b"\r\n", b""))
        self.assertNotIn(b"\r", data.replace(b"\r\n", b""))
        self.assertNotIn(b"\x00", data)
        for line in data.split(b"\r\n"):
            self.assertLessEqual(len(line), 998)


class FailureTests(Structure, unittest.TestCase):

    def test_top_level_header(self):
        data = build()
        self.assertWellFormed(data)
        msg, _ = self.parts(data)
        self.assertEqual(msg["From"], "Mail Delivery System <MAILER-DAEMON@mx.example.test>")
        self.assertEqual(msg["To"].addresses[0].addr_spec, "alice@ext.test")
        self.assertIn(b"\r\nTo: <alice@ext.test>\r\n", data)
        self.assertEqual(msg["Subject"], "Undelivered Mail Returned to Sender")
        self.assertEqual(msg["Auto-Submitted"], "auto-replied")
        self.assertEqual(msg["MIME-Version"], "1.0")
        self.assertEqual(email.utils.parsedate_to_datetime(msg["Date"]).timestamp(), NOW)
        self.assertRegex(msg["Message-ID"], r"^<[^<>@\s]+@mx\.example\.test>$")
        self.assertTrue(data.isascii())

    def test_message_ids_differ_and_take_the_domain(self):
        a, b = parse(build()), parse(build(message_id_domain="example.test"))
        self.assertNotEqual(a["Message-ID"], b["Message-ID"])
        self.assertTrue(b["Message-ID"].endswith("@example.test>"))

    def test_human_part(self):
        _, parts = self.parts(build())
        text = parts[0].get_content()
        self.assertEqual(parts[0].get_content_charset(), "us-ascii")
        self.assertIn("This is the mail system at host mx.example.test.", text)
        self.assertIn("could not\r\nbe delivered", text)
        self.assertIn("<bob@remote.test>: host mx.remote.test said: 550 5.1.1", text)

    def test_per_message_fields(self):
        first, _ = self.blocks(build())
        self.assertEqual(first["Reporting-MTA"], "dns; mx.example.test")
        self.assertEqual(first["X-Queue-ID"], "0123456789ABCDEF")
        self.assertEqual(first["Received-From-MTA"], "dns; client.ext.test ([192.0.2.7])")
        self.assertEqual(email.utils.parsedate_to_datetime(first["Arrival-Date"]).timestamp(),
                         1700000000.0)
        self.assertIsNone(first["Original-Envelope-Id"])

    def test_per_recipient_fields(self):
        _, (r,) = self.blocks(build())
        self.assertIsNone(r["Original-Recipient"])
        self.assertEqual(r["Final-Recipient"], "rfc822; bob@remote.test")
        self.assertEqual(r["Action"], "failed")
        self.assertEqual(r["Status"], "5.1.1")
        self.assertEqual(r["Remote-MTA"], "dns; mx.remote.test")
        self.assertEqual(r["Diagnostic-Code"],
                         "smtp; 550 5.1.1 <bob@remote.test>: Recipient address rejected")
        self.assertEqual(email.utils.parsedate_to_datetime(r["Last-Attempt-Date"]).timestamp(),
                         NOW)
        self.assertIsNone(r["Will-Retry-Until"])

    def test_full_original_returned_by_default(self):
        _, parts = self.parts(build())
        self.assertEqual(parts[2].get_content_type(), "message/rfc822")
        inner = parts[2].get_payload()[0]
        self.assertEqual(inner["Subject"], "the plan")
        self.assertEqual(inner["Message-ID"], "<plan@ext.test>")
        self.assertEqual(inner.get_content(), "The body of the plan.\r\n")

    def test_ret_full(self):
        _, parts = self.parts(build(env=envelope(ret="FULL")))
        self.assertEqual(parts[2].get_content_type(), "message/rfc822")
        self.assertIn(b"The body of the plan.\r\n", build(env=envelope(ret="FULL")))

    def test_ret_hdrs_returns_headers_only(self):
        data = build(env=envelope(ret="HDRS"))
        _, parts = self.parts(data)
        self.assertEqual(parts[2].get_content_type(), "text/rfc822-headers")
        self.assertIn("Subject: the plan", parts[2].get_content())
        self.assertNotIn(b"The body of the plan", data)

    def test_too_big_original_returns_headers_only(self):
        data = build(original=ORIGINAL + b"x" * 200 + b"\r\n", max_returned=len(ORIGINAL))
        _, parts = self.parts(data)
        self.assertEqual(parts[2].get_content_type(), "text/rfc822-headers")
        self.assertNotIn(b"The body of the plan", data)

    def test_eight_bit_original_is_declared(self):
        data = build(original=ORIGINAL.replace(b"the plan", "der Plan \u00fc".encode()))
        _, parts = self.parts(data)
        self.assertEqual(parts[2]["Content-Transfer-Encoding"], "8bit")

    def test_envid_and_orcpt(self):
        data = build(env=envelope(envid="QQ+2B314", ret="HDRS"),
                     recipients=[failed(orcpt="rfc822;Bob+2BSales@remote.test")])
        first, (r,) = self.blocks(data)
        # Both are decoded from xtext (RFC 3461 6.3).
        self.assertEqual(first["Original-Envelope-Id"], "QQ+314")
        self.assertEqual(r["Original-Recipient"], "rfc822; Bob+Sales@remote.test")
        self.assertEqual(r["Final-Recipient"], "rfc822; bob@remote.test")

    def test_local_reason_is_not_called_smtp(self):
        data = build(recipients=[failed(remote_mta="", from_remote=False,
                                        diagnostic="Host or domain name not found",
                                        status="5.1.2")])
        _, (r,) = self.blocks(data)
        self.assertEqual(r["Diagnostic-Code"], "X-Mailbox-Appliance; Host or domain name not found")
        self.assertIsNone(r["Remote-MTA"])
        self.assertEqual(r["Status"], "5.1.2")

    def test_from_remote_follows_remote_mta_when_not_said(self):
        data = build(recipients=[DSNRecipient("b@r.test", "failed", "5.7.1",
                                              diagnostic="550 5.7.1 no", remote_mta="mx.r.test")])
        _, (r,) = self.blocks(data)
        self.assertEqual(r["Diagnostic-Code"], "smtp; 550 5.7.1 no")

    def test_bad_status_falls_back_to_the_action_class(self):
        data = build(recipients=[failed(status="5.1.1\r\nX-Evil: 1")])
        _, (r,) = self.blocks(data)
        self.assertEqual(r["Status"], "5.0.0")

    def test_no_arrival_or_client_no_fields(self):
        first, _ = self.blocks(build(env=envelope(arrival=0.0, client_ip="", helo="")))
        self.assertIsNone(first["Arrival-Date"])
        self.assertIsNone(first["Received-From-MTA"])

    def test_several_recipients_one_block_each(self):
        data = build(env=envelope(recipients=["a@r.test", "b@r.test"]),
                     recipients=[failed(address="a@r.test"),
                                 failed(address="b@r.test", status="5.2.2",
                                        diagnostic="552 5.2.2 mailbox full")])
        _, blocks = self.blocks(data)
        self.assertEqual([b["Final-Recipient"] for b in blocks],
                         ["rfc822; a@r.test", "rfc822; b@r.test"])
        self.assertEqual([b["Status"] for b in blocks], ["5.1.1", "5.2.2"])

    def test_postmaster_copy(self):
        data = build(env=envelope(sender=""), to="postmaster@example.test",
                     postmaster_copy=True)
        msg, parts = self.parts(data)
        self.assertEqual(msg["To"].addresses[0].addr_spec, "postmaster@example.test")
        self.assertEqual(msg["Subject"], "Postmaster Copy: Undelivered Mail Returned to Sender")
        self.assertIn("null sender", parts[0].get_content())

    def test_unknown_action_or_nobody_is_a_programming_error(self):
        self.assertRaises(ValueError, build, recipients=[failed(action="bounced")])
        self.assertRaises(ValueError, build_dsn, hostname="h", qid="q", envelope=envelope(),
                          recipients=[], original=ORIGINAL, now=NOW, to="a@b")


class DelayAndSuccessTests(Structure, unittest.TestCase):

    def delayed(self, **kw):
        kw.setdefault("address", "bob@remote.test")
        kw.setdefault("action", "delayed")
        kw.setdefault("status", "4.4.1")
        kw.setdefault("diagnostic", "connect to mx.remote.test: Connection refused")
        kw.setdefault("last_attempt", NOW)
        kw.setdefault("will_retry_until", 1700000000.0 + 5 * 86400)
        return DSNRecipient(**kw)

    def test_delayed(self):
        data = build(recipients=[self.delayed()])
        msg, parts = self.parts(data)
        self.assertEqual(msg["Subject"], "Delayed Mail (still being retried)")
        text = parts[0].get_content()
        self.assertIn("could not be delivered for 60 minutes", text)
        self.assertIn("retried until it is 5 days old", text)
        _, (r,) = self.blocks(data)
        self.assertEqual(r["Action"], "delayed")
        self.assertEqual(r["Status"], "4.4.1")
        self.assertEqual(r["Diagnostic-Code"],
                         "X-Mailbox-Appliance; connect to mx.remote.test: Connection refused")
        self.assertEqual(
            email.utils.parsedate_to_datetime(r["Will-Retry-Until"]).timestamp(),
            1700000000.0 + 5 * 86400)
        # A delay returns the headers only, whatever RET says.
        self.assertEqual(parts[2].get_content_type(), "text/rfc822-headers")
        self.assertNotIn(b"The body of the plan", data)
        full = build(env=envelope(ret="FULL"), recipients=[self.delayed()])
        self.assertNotIn(b"The body of the plan", full)

    def test_relayed_and_delivered(self):
        data = build(env=envelope(recipients=["bob@remote.test", "carol@example.test"]),
                     recipients=[DSNRecipient("bob@remote.test", "relayed", "2.0.0",
                                              diagnostic="250 2.0.0 Ok: queued as 77",
                                              remote_mta="mx.remote.test", from_remote=True),
                                 DSNRecipient("carol@example.test", "delivered", "2.0.0",
                                              diagnostic="delivered to mailbox")])
        msg, parts = self.parts(data)
        self.assertEqual(msg["Subject"], "Successful Mail Delivery Report")
        self.assertIn("successfully delivered", parts[0].get_content())
        _, blocks = self.blocks(data)
        self.assertEqual([b["Action"] for b in blocks], ["relayed", "delivered"])
        self.assertEqual(blocks[0]["Remote-MTA"], "dns; mx.remote.test")
        self.assertIsNone(blocks[1]["Will-Retry-Until"])
        self.assertEqual(parts[2].get_content_type(), "text/rfc822-headers")

    def test_failure_and_delay_together(self):
        data = build(env=envelope(recipients=["a@r.test", "b@r.test"]),
                     recipients=[failed(address="a@r.test"), self.delayed(address="b@r.test")])
        msg, parts = self.parts(data)
        self.assertEqual(msg["Subject"], "Undelivered Mail Returned to Sender")
        self.assertEqual(parts[2].get_content_type(), "message/rfc822")
        _, blocks = self.blocks(data)
        self.assertEqual([b["Action"] for b in blocks], ["failed", "delayed"])
        self.assertIsNone(blocks[0]["Will-Retry-Until"])
        self.assertIsNotNone(blocks[1]["Will-Retry-Until"])


class HostileValueTests(Structure, unittest.TestCase):
    """G6 and C5: nothing from outside can add a field, a part or a format directive."""

    INJECT = "\r\nX-Injected: 1\r\n\r\n--boundary\r\n"

    def test_crlf_nul_everywhere(self):
        env = envelope(sender="a@ext.test", helo="evil" + self.INJECT, client_ip="1.2.3.4\n5",
                       envid="id\r\nX-Injected: 2", recipients=["b\r\nX-Injected: 3@r.test"])
        r = failed(address="b\r\nX-Injected: 3@r.test\x00",
                   orcpt="rfc822;b+0D+0AX-Injected:+204@r.test",
                   diagnostic="550 no\r\nX-Injected: 5\r\n\r\nFinal-Recipient: rfc822; x@y",
                   remote_mta="mx\r\nX-Injected: 6")
        data = build(env=env, recipients=[r], to="a@ext.test\r\nBcc: victim@else.test",
                     hostname="mx.example.test")
        self.assertWellFormed(data)
        self.assertNotIn(b"\r\nX-Injected", data.split(b"\r\n\r\nReceived:")[0])
        self.assertNotIn(b"\r\nBcc:", data)
        msg, parts = self.parts(data)
        self.assertIsNone(msg["Bcc"])
        self.assertIn(b"\r\nTo: <a@ext.test Bcc: victim@else.test>\r\n", data)
        first, blocks = self.blocks(data)
        self.assertEqual(len(blocks), 1)
        (b,) = blocks
        self.assertIsNone(b["X-Injected"])
        self.assertIsNone(first["X-Injected"])
        self.assertEqual(b["Final-Recipient"], "rfc822; b X-Injected: 3@r.test")
        self.assertEqual(b["Original-Recipient"], "rfc822; b X-Injected: 4@r.test")
        self.assertEqual(b["Diagnostic-Code"],
                         "smtp; 550 no X-Injected: 5 Final-Recipient: rfc822; x@y")
        self.assertEqual(b["Remote-MTA"], "dns; mx X-Injected: 6")
        self.assertEqual(first["Original-Envelope-Id"], "id X-Injected: 2")
        self.assertTrue(first["Received-From-MTA"].startswith("dns; evil X-Injected: 1"))

    def test_format_directives_are_text(self):
        nasty = ["{0.__class__.__mro__}@r.test", "%(password)s@r.test", "%s%n@r.test",
                 "${run{/bin/sh\t-c\tid}}@r.test"]
        data = build(env=envelope(recipients=nasty),
                     recipients=[failed(address=a, diagnostic="550 " + a) for a in nasty])
        _, blocks = self.blocks(data)
        self.assertEqual([b["Final-Recipient"] for b in blocks],
                         ["rfc822; " + a.replace("\t", " ") for a in nasty])
        self.assertEqual(blocks[0]["Diagnostic-Code"], "smtp; 550 {0.__class__.__mro__}@r.test")

    def test_non_ascii_is_made_safe(self):
        r = failed(address="j\u00f6rg@r\u00e9mote.test", diagnostic="550 5.1.1 n\u00e9e",
                   orcpt="rfc822;j+C3+B6rg@r.test")
        data = build(recipients=[r], env=envelope(helo="h\u00e9lo"))
        self.assertTrue(data.split(b"\r\n\r\nReceived:")[0].isascii())
        first, (b,) = self.blocks(data)
        # RFC 6533: an address that is not ASCII is a utf-8 type, xtext-escaped.
        self.assertEqual(b["Final-Recipient"], "utf-8; j\\x{F6}rg@r\\x{E9}mote.test")
        self.assertEqual(b["Original-Recipient"], "utf-8; j\\x{C3}\\x{B6}rg@r.test")
        self.assertEqual(b["Diagnostic-Code"], "smtp; 550 5.1.1 n\\xe9e")

    def test_long_values_keep_lines_short(self):
        r = failed(address="a" * 5000 + "@r.test", diagnostic="550 " + "z" * 5000,
                   remote_mta="m" * 3000)
        data = build(recipients=[r], env=envelope(envid="e" * 3000, helo="h" * 3000))
        self.assertWellFormed(data)
        self.parts(data)


class HelperTests(unittest.TestCase):

    def test_clean(self):
        self.assertEqual(clean("a\r\nb\x00c\td"), "a b c d")
        self.assertEqual(clean("x" * 10, 6), "xxx...")
        self.assertEqual(clean("\u00e9"), "\\xe9")

    def test_xtext_decode(self):
        self.assertEqual(xtext_decode("a+2Bb+3Dc+"), "a+b=c+")

    def test_header_block(self):
        self.assertEqual(header_block(b"A: 1\r\nB: 2\r\n\r\nbody\r\n"), b"A: 1\r\nB: 2\r\n")
        self.assertEqual(header_block(b"A: 1\r\nB: 2"), b"A: 1\r\n")
        self.assertEqual(header_block(b"A: 1\r\n"), b"A: 1\r\n")
        self.assertEqual(header_block(b"\r\nbody"), b"")
