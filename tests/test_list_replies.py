"""The robot's replies, its silences and rate limits (lists.md 1.1 step 1, 1.3) and tokens (3.1)."""

import email
import email.policy
from email.message import EmailMessage

from twisted.trial import unittest

from mailbox_appliance.lists import replies as r
from mailbox_appliance.lists import tokens as t
from mailbox_appliance.lists.commands import parse_message

ROBOT = "lists@lists.example.org"
MID = "<abc.123@c.example>"


class Clock:
    def __init__(self, now=1_000_000.0):
        self.now = now

    def __call__(self):
        return self.now


def mail(headers=(), body="SUB team\n", sender="carol@c.example"):
    msg = EmailMessage()
    if sender is not None:
        msg["From"] = sender
    msg["To"] = ROBOT
    msg["Message-ID"] = MID
    for name, value in headers:
        msg[name] = value
    msg.set_content(body)
    return msg


def own(address):
    return address.endswith("@lists.example.org")


class DropTests(unittest.TestCase):

    def reason(self, msg, env="carol@c.example", **kw):
        return r.drop_reason(msg, env, ROBOT, own_address=own, **kw)

    def test_an_ordinary_command_mail_is_answered(self):
        self.assertIsNone(self.reason(mail()))
        self.assertIsNone(self.reason(mail([("Auto-Submitted", "no")])))
        self.assertIsNone(self.reason(mail([("Auto-Submitted", "No (a comment)")])))
        self.assertIsNone(self.reason(mail([("Precedence", "bulk"), ("X-Ack", "yes")])))
        self.assertIsNone(self.reason(mail([("X-Loop", "other@lists.example.net")])))

    def test_robots_answering_robots(self):
        # Section 6 case 19: DSN, vacation replies, our own loop; all silent.
        self.assertEqual(self.reason(mail(), env=""), "null envelope sender")
        self.assertEqual(self.reason(mail(), env="<>"), "null envelope sender")
        self.assertEqual(self.reason(mail(), env=None), "null envelope sender")
        report = mail()
        report.replace_header("Content-Type", "multipart/report; report-type=delivery-status")
        self.assertEqual(self.reason(report), "delivery or disposition report")
        for value in ("auto-replied", "auto-generated", "Auto-Replied; owner-email=x@y.z",
                      "auto-notified"):
            self.assertEqual(self.reason(mail([("Auto-Submitted", value)])), "auto-submitted")
        for name in ("X-Autoreply", "X-Autorespond"):
            self.assertEqual(self.reason(mail([(name, "yes")])), "auto-submitted")
        for value in ("bulk", "junk", "List", "auto_reply"):
            self.assertEqual(self.reason(mail([("Precedence", value)])),
                             f"precedence {value.lower()}")
        self.assertEqual(self.reason(mail([("X-Loop", ROBOT.upper())])), "X-Loop is ours")
        self.assertEqual(self.reason(mail([("X-Loop", "x@y.example"), ("X-Loop", f"<{ROBOT}>")])),
                         "X-Loop is ours")

    def test_robot_senders(self):
        for sender in ("MAILER-DAEMON@c.example", "listserv@c.example", "majordomo@c.example",
                       "sympa@c.example", "mailman@c.example", "noreply@c.example",
                       "no-reply@c.example", "owner-team@c.example", "team-request@c.example",
                       "team-bounces@c.example"):
            self.assertEqual(self.reason(mail(sender=sender)), "sender is a robot", sender)
            self.assertEqual(self.reason(mail(), env=sender), "sender is a robot", sender)

    def test_our_own_addresses(self):
        self.assertEqual(self.reason(mail(sender=ROBOT)), "sent by one of our own addresses")
        self.assertEqual(self.reason(mail(), env="team@lists.example.org"),
                         "sent by one of our own addresses")
        self.assertEqual(r.drop_reason(mail(), ROBOT, ROBOT), "sent by one of our own addresses")

    def test_no_single_sender(self):
        self.assertEqual(self.reason(mail(sender=None)), "no single From mailbox")
        self.assertEqual(self.reason(mail(sender="a@a.example, b@b.example")),
                         "no single From mailbox")
        self.assertEqual(self.reason(mail(sender="not an address")), "no single From mailbox")
        two = email.message_from_bytes(b"From: a@a.example\r\nFrom: b@b.example\r\n\r\nx\r\n",
                                       policy=email.policy.default)
        self.assertEqual(self.reason(two), "no single From mailbox")

    def test_spam_and_seen_message_ids(self):
        self.assertEqual(self.reason(mail(), spam=True), "spam")
        seen = r.RecentMessageIds(Clock())
        self.assertIsNone(self.reason(mail(), seen=seen.seen))
        self.assertEqual(self.reason(mail(), seen=seen.seen), "Message-ID already processed")

    def test_sender_of_ignores_reply_to(self):
        # Section 6 case 24: the reply goes to From, never Reply-To.
        msg = mail([("Reply-To", "attacker@x.example")], sender="Victim <Victim@V.example>")
        self.assertEqual(r.sender_of(msg), "victim@v.example")

    def test_sender_of_is_not_fooled_by_an_encoded_display_name(self):
        raw = (b"From: =?utf-8?q?attacker=40x=2Eexample=2C?= <victim@v.example>\r\n\r\nx\r\n")
        msg = email.message_from_bytes(raw, policy=email.policy.default)
        self.assertEqual(r.sender_of(msg), "victim@v.example")


class ReplyTests(unittest.TestCase):

    def results(self):
        res = r.Results()
        res.add(r.ERRORS, "SUB ../x", "not a list name")
        res.add(r.DONE, "SET team NOMAIL", "You receive no mail from team.")
        res.add(r.PENDING, "SUB team Carol", "A confirmation was sent to carol@c.example.")
        res.add(r.REFUSED, "REVIEW team", "Only owners may review team.")
        res.ignored_lines = 3
        return res

    def test_headers(self):
        msg = r.build_reply(self.results(), ROBOT, "carol@c.example", in_reply_to=MID,
                            references="<x@y.z> bad-ref", date="Sat, 28 Nov 2026 15:00:00 +0000",
                            message_id="<r1@lists.example.org>")
        self.assertEqual(msg["From"], ROBOT)
        self.assertEqual(msg["To"], "carol@c.example")
        self.assertEqual(msg["Subject"], "Results of your commands")
        self.assertEqual(msg["In-Reply-To"], MID)
        self.assertEqual(msg["References"], f"<x@y.z> {MID}")
        self.assertEqual(msg["Auto-Submitted"], "auto-replied")
        self.assertEqual(msg["X-Loop"], ROBOT)
        self.assertEqual(msg["Message-ID"], "<r1@lists.example.org>")
        self.assertEqual(msg.get_content_type(), "text/plain")
        self.assertEqual(msg.get_content_charset(), "utf-8")
        self.assertIsNone(msg["Reply-To"])
        self.assertFalse(msg.is_multipart())   # the original is never attached

    def test_body_sections_in_order(self):
        body = self.results().body()
        self.assertEqual(body, "\n".join([
            "Done:", "", "> SET team NOMAIL", "  You receive no mail from team.", "",
            "Pending:", "", "> SUB team Carol", "  A confirmation was sent to carol@c.example.",
            "",
            "Refused:", "", "> REVIEW team", "  Only owners may review team.", "",
            "Errors:", "", "> SUB ../x", "  not a list name", "",
            "3 lines ignored."]) + "\n")

    def test_silent_outcomes_give_no_reply(self):
        res = r.Results()
        res.add(r.REFUSED, "REVIEW team", "x", silent=True)
        self.assertIsNone(r.build_reply(res, ROBOT, "carol@c.example"))
        self.assertIsNone(r.build_reply(r.Results(), ROBOT, "carol@c.example"))
        res.add(r.DONE, "WHICH", "none")
        self.assertIsNotNone(r.build_reply(res, ROBOT, "carol@c.example"))
        self.assertNotIn("REVIEW", r.build_reply(res, ROBOT, "carol@c.example").get_content())

    def test_bad_in_reply_to_is_dropped(self):
        for bad in ("<a@b>\r\nBcc: x@y.z", "no brackets", "<" + "a" * 1000 + ">", ""):
            msg = r.build_reply(self.results(), ROBOT, "carol@c.example", in_reply_to=bad)
            self.assertIsNone(msg["In-Reply-To"], bad)
            self.assertIsNone(msg["References"], bad)

    def test_bad_recipient_refused(self):
        for to in (None, "", "a@b.c\r\nBcc: x@y.z", "victim"):
            self.assertRaises(ValueError, r.build_reply, self.results(), ROBOT, to)

    def test_no_header_injection_from_commands(self):
        # Section 6 case 21: the command text only ever appears in the body, cleaned.
        raw = (b"From: carol@c.example\r\nMessage-ID: <m@c.example>\r\n"
               b"Subject: =?utf-8?B?U1VCIHRlYW0gWA0KQmNjOiB2QHg=?=\r\n\r\n")
        cmd_mail = email.message_from_bytes(raw, policy=email.policy.default)
        parsed = parse_message(cmd_mail)
        res = r.Results()
        for err in parsed.errors:
            res.add(r.ERRORS, err.line, err.reason)
        out = r.build_reply(res, ROBOT, r.sender_of(cmd_mail), in_reply_to="<m@c.example>")
        data = out.as_bytes()
        again = email.message_from_bytes(data, policy=email.policy.default)
        self.assertIsNone(again["Bcc"])
        self.assertEqual(sorted(set(again.keys())),
                         sorted({"From", "To", "Subject", "Date", "Message-ID", "In-Reply-To",
                                 "References", "Auto-Submitted", "X-Loop",
                                 "X-Auto-Response-Suppress", "Content-Type",
                                 "Content-Transfer-Encoding", "MIME-Version"}))
        self.assertIn("> SUB team X??Bcc: v@x", again.get_content())

    def test_reply_at_most_64_kib(self):
        res = r.Results(max_outcomes=10_000)
        for i in range(5000):
            res.add(r.ERRORS, "SUB " + "x" * 190, "é" * 300)
        msg = r.build_reply(res, ROBOT, "carol@c.example", in_reply_to=MID)
        self.assertLessEqual(len(msg.as_bytes()), r.MAX_REPLY)
        self.assertIn("more results were not shown", msg.get_content())

    def test_outcomes_bounded(self):
        res = r.Results()
        for i in range(1000):
            res.add(r.DONE, "x")
        self.assertEqual(len(res.outcomes), 200)
        self.assertRaises(ValueError, res.add, "Maybe", "x")

    def test_quote_line(self):
        self.assertEqual(r.quote_line("a\r\nb\x00c\u2028d"), "a??b?c?d")
        self.assertEqual(r.quote_line("x" * 300), "x" * 200 + "...")


class RateLimitTests(unittest.TestCase):

    def test_ten_replies_a_day_then_one_alert_then_silence(self):
        # Section 6 case 20: ping-pong with another robot.
        clock = Clock()
        start = clock.now
        limit = r.ReplyRateLimit(clock)
        verdicts = []
        for i in range(15):
            clock.now += 60
            verdicts.append(limit.check("Robot@Other.example"))
        self.assertEqual(verdicts, [r.ReplyRateLimit.SEND] * 9 + [r.ReplyRateLimit.SEND_AND_ALERT]
                         + [r.ReplyRateLimit.DROP] * 5)
        self.assertEqual(limit.check("someone@else.example"), r.ReplyRateLimit.SEND)
        # The first reply was at start + 60: a day later one more may go, and it
        # is the 10th of that day again (one notice a day at most).
        clock.now = start + 60 + 86400 - 1
        self.assertEqual(limit.check("robot@other.example"), r.ReplyRateLimit.DROP)
        clock.now += 1
        self.assertEqual(limit.check("robot@other.example"), r.ReplyRateLimit.SEND_AND_ALERT)
        self.assertEqual(limit.check("robot@other.example"), r.ReplyRateLimit.DROP)

    def test_memory_is_bounded(self):
        clock = Clock()
        limit = r.WindowLimit(clock, 2, 100, max_keys=50)
        for i in range(1000):
            limit.hit(f"a{i}@x.example")
        self.assertEqual(len(limit), 50)
        self.assertEqual(limit.count("a999@x.example"), 1)
        self.assertEqual(limit.count("a0@x.example"), 0)

    def test_recent_message_ids(self):
        clock = Clock()
        ids = r.RecentMessageIds(clock, max_ids=3)
        self.assertFalse(ids.seen("<a@x>"))
        self.assertTrue(ids.seen("<a@x>"))
        clock.now += 86401
        self.assertFalse(ids.seen("<a@x>"))
        for m in ("<b@x>", "<c@x>", "<d@x>"):
            ids.seen(m)
        self.assertFalse(ids.seen("<a@x>"))     # pushed out by the bound


class TokenTests(unittest.TestCase):

    def test_new_tokens(self):
        seen = {t.new_token() for _ in range(200)}
        self.assertEqual(len(seen), 200)
        for tok in seen:
            self.assertRegex(tok, "^[0-9a-f]{32}$")

    def test_hash(self):
        tok = "0123456789ABCDEF0123456789abcdef"
        self.assertEqual(t.hash_token(tok), t.hash_token(tok.lower()))
        self.assertEqual(len(t.hash_token(tok)), 32)
        self.assertNotIn(tok.lower().encode(), t.hash_token(tok))
        for bad in ("", "x" * 32, tok + "0", None, tok[:-1]):
            self.assertRaises(ValueError, t.hash_token, bad)
            self.assertIsNone(t.normalize(bad))

    def test_issue_and_check(self):
        tok, rec = t.issue(t.REQUEST, "Team@Lists.Example.Org", 1000.0,
                           action="ADD team dave@d.example   Dave", target="Dave@D.example",
                           requester="olga@example.net")
        self.assertEqual(rec.token_hash, t.hash_token(tok))
        self.assertEqual((rec.list_address, rec.target, rec.action, rec.expires),
                         ("team@lists.example.org", "dave@d.example",
                          "ADD team dave@d.example Dave", 1000.0 + 3 * 86400))
        self.assertEqual(rec.check(tok, 2000.0), t.OK)
        self.assertEqual(rec.check(tok.upper(), 2000.0), t.OK)
        self.assertEqual(rec.check(t.new_token(), 2000.0), t.UNKNOWN)
        self.assertEqual(rec.check("not a token", 2000.0), t.UNKNOWN)
        # Section 6 case 3: four days later it is "unknown or expired".
        self.assertEqual(rec.check(tok, 1000.0 + 4 * 86400), t.UNKNOWN)
        self.assertEqual(rec.check(tok, 2000.0, action="ADD team dave@d.example Dave"), t.OK)
        self.assertEqual(rec.check(tok, 2000.0, action="ADD team evil@x.example Dave"),
                         t.MISMATCH)
        used = rec.handled("olga@example.net", 3000.0)
        self.assertEqual(used.check(tok, 3001.0), t.HANDLED)
        self.assertEqual(used.handled_by, "olga@example.net")

    def test_check_any_stored_row(self):
        import types
        tok = t.new_token()
        row = types.SimpleNamespace(token_hash=t.hash_token(tok), expires=100.0, attempts=0,
                                    handled_by="", action="SUBSCRIBE team")
        self.assertEqual(t.check_token(row, tok, 50.0, action="SUBSCRIBE  team"), t.OK)
        self.assertEqual(t.check_token(row, tok, 100.0), t.UNKNOWN)
        row.handled_by = "mo@example.net"
        self.assertEqual(t.check_token(row, tok, 50.0), t.HANDLED)
        self.assertFalse(t.matches(tok, None))

    def test_names_are_printable(self):
        _, rec = t.issue(t.REQUEST, "team@lists.example.org", 0.0, name="Carol\r\nBcc: x",
                         subject="s" * 500)
        self.assertEqual((rec.name, len(rec.subject)), ("CarolBcc: x", 200))

    def test_attempts_void_a_token(self):
        tok, rec = t.issue(t.APPROVAL, "team@lists.example.org", 0.0)
        for _ in range(t.MAX_ATTEMPTS):
            rec = rec.failed()
        self.assertEqual(rec.check(tok, 1.0), t.UNKNOWN)

    def test_lifetimes(self):
        life = t.Lifetimes()
        self.assertEqual([life.of(k) for k in t.KINDS],
                         [3 * 86400, 7 * 86400, 14 * 86400, 30 * 86400, 60 * 86400])
        self.assertEqual(t.Lifetimes(request=60).of(t.REQUEST), 60)
        self.assertRaises(ValueError, life.of, "forever")
        _, rec = t.issue(t.MODERATION, "ann@lists.example.org", 10.0)
        self.assertEqual(rec.expires, 10.0 + 14 * 86400)

    def test_failed_lookups(self):
        # Section 6 case 15: 11 wrong keys in an hour; the 10th alerts, the 11th is ignored.
        clock = Clock()
        failed = t.FailedLookups(clock)
        verdicts = []
        for i in range(11):
            clock.now += 60
            verdicts.append(("blocked" if failed.blocked("Eve@E.example")
                             else failed.record("eve@e.example")))
        self.assertEqual(verdicts, [t.FailedLookups.ANSWER] * 9
                         + [t.FailedLookups.ANSWER_AND_ALERT, "blocked"])
        clock.now += 3600
        self.assertFalse(failed.blocked("eve@e.example"))
