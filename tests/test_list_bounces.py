"""Bounce scoring of list members (lists.md 4.7) and reading delivery reports."""

import base64

from twisted.trial import unittest

from mailbox_appliance.lists import bounces
from mailbox_appliance.lists.bounces import DAY, DISABLE, NOTHING, BounceState, score

DSN = (b"From: MAILER-DAEMON@mx.example.org\r\nTo: team-bounces+abc@lists.test\r\n"
       b"Subject: Undelivered\r\nMIME-Version: 1.0\r\n"
       b'Content-Type: multipart/report; report-type=delivery-status; boundary="r"\r\n\r\n'
       b"--r\r\nContent-Type: text/plain\r\n\r\nIt failed.\r\n"
       b"--r\r\nContent-Type: message/delivery-status\r\n\r\n"
       b"Reporting-MTA: dns; mx.example.org\r\n\r\n"
       b"Final-Recipient: rfc822; gone@example.org\r\nAction: failed\r\n"
       b"Status: 5.1.1 (no such user)\r\n\r\n"
       b"Final-Recipient: rfc822; full@example.org\r\nAction: delayed\r\n"
       b"Status: 4.2.2\r\n\r\n"
       b"--r--\r\n")


class ReportTests(unittest.TestCase):

    def test_statuses_of_a_report(self):
        # The delay warning (4.2.2, Action: delayed) is no failure.
        self.assertEqual(bounces.dsn_statuses(DSN), ["5.1.1"])

    def test_not_a_report(self):
        self.assertIsNone(bounces.dsn_statuses(b"Subject: hi\r\n\r\nout of office\r\n"))
        self.assertIsNone(bounces.dsn_statuses(b"\x00\xff garbage"))

    def test_success_report_has_no_failure(self):
        ok = DSN.replace(b"Action: failed", b"Action: delivered").replace(
            b"Status: 5.1.1 (no such user)", b"Status: 2.0.0").replace(
            b"Action: delayed", b"Action: relayed").replace(b"Status: 4.2.2", b"Status: 2.0.0")
        self.assertEqual(bounces.dsn_statuses(ok), [])

    def test_abuse_complaints(self):
        def arf(report=b"Feedback-Type: abuse\r\nVersion: 1\r\n", cte=b"",
                original=b"Content-Type: message/rfc822\r\n\r\n"
                         b"List-Id: <team.lists.test>\r\nSubject: x\r\n\r\nhi\r\n"):
            return (b"From: fbl@isp.example\r\nMIME-Version: 1.0\r\n"
                    b'Content-Type: multipart/report; report-type=feedback-report; '
                    b'boundary="f"\r\n'
                    b"\r\n--f\r\nContent-Type: text/plain\r\n\r\nComplaint.\r\n"
                    b"--f\r\nContent-Type: message/feedback-report\r\n" + cte + b"\r\n"
                    + report + b"\r\n--f\r\n" + original + b"\r\n--f--\r\n")
        lid = "team.lists.test"
        self.assertTrue(bounces.is_complaint(arf(), lid))
        self.assertFalse(bounces.is_complaint(arf(), "other.lists.test"))
        self.assertFalse(bounces.is_complaint(arf(original=b"Content-Type: text/plain\r\n"
                                                           b"\r\nnothing\r\n"), lid))
        self.assertTrue(bounces.is_complaint(arf(original=(
            b"Content-Type: text/rfc822-headers\r\n\r\nList-Id: Team <team.lists.test>\r\n"
            b"Subject: x\r\n")), lid))
        self.assertFalse(bounces.is_complaint(arf(b"Feedback-Type: not-spam\r\n"), lid))
        self.assertFalse(bounces.is_complaint(arf(b"Version: 1\r\n"), lid))   # no type
        # Encoded report parts are read decoded.
        for kind, expected in ((b"not-spam", False), (b"abuse", True)):
            encoded = base64.encodebytes(b"Feedback-Type: " + kind + b"\r\nVersion: 1\r\n")
            self.assertEqual(bounces.is_complaint(arf(
                encoded, cte=b"Content-Transfer-Encoding: base64\r\n"), lid), expected)
        self.assertFalse(bounces.is_complaint(DSN, lid))
        self.assertFalse(bounces.is_complaint(b"Subject: hi\r\n\r\nspam!\r\n", lid))
        self.assertIsNone(bounces.dsn_statuses(arf()))

    def test_weights(self):
        self.assertEqual([bounces.weight(s) for s in ("5.1.1", "4.2.2", "5.7.1", None, "2.0.0")],
                         [1.0, 0.5, 0.5, 0.0, 0.0])


class ScoreTests(unittest.TestCase):

    def test_one_increase_a_day(self):
        state, action = score(BounceState(), "5.1.1", 1000.0)
        self.assertEqual((state, action), (BounceState(1.0, 1000.0, 0.0), NOTHING))
        again, action = score(state, "5.1.1", 1000.0 + DAY - 1)
        self.assertEqual((again, action), (state, NOTHING))
        later, _ = score(state, "4.2.2", 1000.0 + DAY)
        self.assertEqual(later.score, 1.5)

    def test_disabled_at_five_once(self):
        state, now = BounceState(), 0.0
        actions = []
        for _ in range(6):
            now += DAY
            state, action = score(state, "5.1.1", now)
            actions.append(action)
        self.assertEqual(actions, [NOTHING] * 4 + [DISABLE, NOTHING])
        self.assertEqual(state.disabled_since, 5 * DAY)

    def test_reset_after_a_quiet_week(self):
        state = BounceState(4.0, 1.0, 0.0)
        state, action = score(state, "5.1.1", 1.0 + bounces.RESET_AFTER)
        self.assertEqual((state.score, action), (1.0, NOTHING))

    def test_policy_refusals_are_temporary(self):
        state, now = BounceState(), 0.0
        for _ in range(9):
            now += DAY
            state, action = score(state, "5.7.1", now)
            self.assertEqual(action, NOTHING)
        self.assertEqual(state.score, 4.5)

    def test_notices_then_removal(self):
        state = BounceState(5.0, 0.0, 100.0)
        self.assertEqual(bounces.review(state, 100.0, 0), "notice")
        self.assertIsNone(bounces.review(state, 100.0 + bounces.NOTICE_EVERY - 1, 1))
        self.assertEqual(bounces.review(state, 100.0 + bounces.NOTICE_EVERY, 1), "notice")
        self.assertEqual(bounces.review(state, 100.0 + 2 * bounces.NOTICE_EVERY, 2), "notice")
        self.assertIsNone(bounces.review(state, 100.0 + 3 * bounces.NOTICE_EVERY - 1, 3))
        self.assertEqual(bounces.review(state, 100.0 + 3 * bounces.NOTICE_EVERY, 3), "remove")
        self.assertIsNone(bounces.review(BounceState(), 1e9, 0))

    def test_mass_bounce(self):
        self.assertTrue(bounces.mass_bounce(30, 100))
        self.assertFalse(bounces.mass_bounce(29, 100))
        self.assertFalse(bounces.mass_bounce(0, 0))
