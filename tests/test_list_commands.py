"""Reading the robot's commands (lists.md sections 1.1 and 1.2), bad input included."""

import email
import email.policy
from email.message import EmailMessage

from twisted.trial import unittest

from mailbox_appliance.lists import commands as c
from mailbox_appliance.lists.commands import Command, CommandError, LineError, NotACommand

TOKEN = "0123456789abcdef0123456789abcdef"
KEY = "fedcba9876543210fedcba9876543210"


def mail(body="", subject=None, raw=None):
    if raw is not None:
        return email.message_from_bytes(raw, policy=email.policy.default)
    msg = EmailMessage()
    msg["From"] = "carol@c.example"
    msg["To"] = "lists@lists.example.org"
    if subject is not None:
        msg["Subject"] = subject
    msg.set_content(body)
    return msg


class GrammarTests(unittest.TestCase):

    def p(self, line):
        return c.parse_line(line)

    def bad(self, line):
        self.assertRaises(CommandError, c.parse_line, line)

    def test_short_forms_and_case(self):
        for spelling, verb in (("help", "HELP"), ("HEL", "HELP"), ("sos", "HELP"),
                               ("lists", "LISTS"), ("LIS", "LISTS"), ("list", "LISTS"),
                               ("which", "WHICH"), ("whi", "WHICH"), ("Status", "WHICH")):
            self.assertEqual(self.p(spelling).verb, verb, spelling)
        for spelling in ("SUBSCRIBE", "sub", "Join"):
            self.assertEqual(self.p(spelling + " team").verb, "SUBSCRIBE")
        for spelling in ("SIGNOFF", "sig", "UNSUBSCRIBE", "unsub", "uns", "leave"):
            self.assertEqual(self.p(spelling + " team").verb, "SIGNOFF")
        for spelling in ("REVIEW", "rev", "who"):
            self.assertEqual(self.p(spelling + " team").verb, "REVIEW")
        self.assertEqual(self.p("inf team").verb, "INFO")
        self.assertEqual(self.p("rem team").verb, "REMIND")
        self.assertEqual(self.p("mod team").verb, "MODINDEX")
        self.assertEqual(self.p("delete team a@b.example").verb, "DEL")
        self.assertEqual(self.p(f"dis team {KEY}").verb, "DISTRIBUTE")
        self.assertEqual(self.p(f"rej team {KEY}").verb, "REJECT")
        self.assertEqual(self.p(f"con {TOKEN}").verb, "CONFIRM")
        self.assertEqual(self.p("inv team a@b.example").verb, "INVITE")
        # Only the listed short forms: no prefix matching.
        for line in ("SUBS team", "SUBSCR team", "CONF " + TOKEN, "HE", "DISTRIB team " + KEY):
            self.assertRaises(NotACommand, c.parse_line, line)

    def test_subscribe(self):
        cmd = self.p("SUB Team   Carol   C")
        self.assertEqual((cmd.verb, cmd.list_name, cmd.name, cmd.address),
                         ("SUBSCRIBE", "team", "Carol C", None))
        self.assertEqual(self.p("sub team").name, "")
        self.assertEqual(self.p("SUB team Zoë Ünal").name, "Zoë Ünal")
        self.bad("SUB")
        self.bad("SUB team " + "x" * 101)

    def test_signoff(self):
        self.assertEqual(self.p("SIGNOFF team").address, None)
        cmd = self.p("signoff * Zed@Z.example")
        self.assertEqual((cmd.list_name, cmd.address), ("*", "zed@z.example"))
        self.bad("SIGNOFF")
        self.bad("SIGNOFF team zed")
        self.bad("SIGNOFF team a@b.example extra")

    def test_set(self):
        for word, mode in (("MAIL", "mail"), ("each", "mail"), ("NORMAL", "mail"),
                           ("nodigest", "mail"), ("NOMAIL", "nomail"), ("digest", "digest"),
                           ("DIGESTPLAIN", "digestplain"), ("summary", "summary"),
                           ("NOTICE", "notice"), ("not_me", "not_me"),
                           ("CONCEAL", "conceal"), ("noconceal", "noconceal")):
            self.assertEqual(self.p(f"SET team {word}").mode, mode, word)
        self.assertEqual(self.p("SET * NOMAIL").list_name, "*")
        self.bad("SET team")
        self.bad("SET team LOUD")
        self.bad("SET team MAIL extra")
        self.bad("SET team NOMAİL")

    def test_owner_commands(self):
        cmd = self.p("ADD team Dave@D.example Dave D")
        self.assertEqual((cmd.verb, cmd.list_name, cmd.address, cmd.name),
                         ("ADD", "team", "dave@d.example", "Dave D"))
        self.assertEqual(self.p("DEL team dave@d.example").address, "dave@d.example")
        self.assertEqual(self.p("REMIND team").list_name, "team")
        self.assertEqual(self.p("REVIEW team").list_name, "team")
        self.bad("ADD team")
        self.bad("DEL team dave@d.example Dave")
        self.bad("REMIND")
        self.bad("REMIND team extra")

    def test_moderator_commands(self):
        cmd = self.p(f"DISTRIBUTE ann {KEY.upper()}")
        self.assertEqual((cmd.list_name, cmd.token), ("ann", KEY))
        cmd = self.p(f"REJECT ann {KEY} off topic")
        self.assertEqual((cmd.token, cmd.reason), (KEY, "off topic"))
        self.assertEqual(self.p("MODINDEX ann").list_name, "ann")
        self.bad("DISTRIBUTE ann")
        self.bad("DISTRIBUTE ann 1234")
        self.bad(f"DISTRIBUTE ann {KEY} extra")
        self.bad(f"REJECT ann {KEY} " + "x" * 201)

    def test_tokens(self):
        self.assertEqual(self.p(f"CONFIRM {TOKEN.upper()}").token, TOKEN)
        self.bad("CONFIRM")
        self.bad(f"CONFIRM {TOKEN}0")
        self.bad(f"CONFIRM {TOKEN} extra")
        self.bad("CONFIRM " + "z" * 32)
        cmd = self.p(f"DECLINE {TOKEN} not staff")
        self.assertEqual((cmd.token, cmd.reason), (TOKEN, "not staff"))

    def test_auth_carries_a_request(self):
        cmd = self.p(f"AUTH {TOKEN} add TEAM dave@d.example Dave")
        self.assertEqual((cmd.verb, cmd.token, cmd.list_name), ("AUTH", TOKEN, "team"))
        self.assertEqual(cmd.inner.canonical(), "ADD team dave@d.example Dave")
        self.assertEqual(cmd.inner.verb, "ADD")
        self.bad(f"AUTH {TOKEN}")
        self.bad(f"AUTH {TOKEN} CONFIRM {TOKEN}")
        self.bad(f"AUTH {TOKEN} AUTH {TOKEN} SUB team")
        self.bad(f"AUTH {TOKEN} LISTS")
        self.bad(f"AUTH {TOKEN} hello")
        self.bad(f"AUTH {TOKEN} ADD team bad")
        self.bad("AUTH nottoken SUB team")

    def test_canonical_is_spelling_independent(self):
        self.assertEqual(self.p("join TEAM  Carol C").canonical(),
                         self.p("SUBSCRIBE team Carol C").canonical())
        self.assertEqual(self.p("SET team each").canonical(), "SET team MAIL")
        self.assertEqual(self.p("HELP sub").canonical(), "HELP SUBSCRIBE")

    def test_quiet(self):
        cmd = self.p(f"QUIET REJECT ann {KEY} spam")
        self.assertEqual((cmd.verb, cmd.quiet, cmd.reason), ("REJECT", True, "spam"))
        for line in ("quiet ADD team a@b.example", "QUIET DEL team a@b.example",
                     f"QUIET DIS ann {KEY}"):
            self.assertTrue(self.p(line).quiet, line)
        cmd = self.p("QUIET SUB team")
        self.assertEqual((cmd.verb, cmd.quiet), ("SUBSCRIBE", False))
        self.assertEqual(len(cmd.warnings), 1)
        self.bad("QUIET")
        self.bad("QUIET QUIET ADD team a@b.example")
        self.bad("QUIET hello")

    def test_help_lists_which_info(self):
        self.assertEqual(self.p("HELP").topic, None)
        self.assertEqual(self.p("help join").topic, "SUBSCRIBE")
        self.bad("HELP me please")
        self.bad("HELP nothing")
        self.bad("LISTS all")
        self.bad("WHICH team")
        self.bad("INFO")
        self.assertEqual(self.p("INFO Hidden").list_name, "hidden")

    def test_archive_commands_are_recognised(self):
        self.assertEqual(self.p("GET team 2026-11").month, "2026-11")
        self.assertEqual(self.p("IND team").verb, "INDEX")
        self.assertEqual(self.p("LAS team").verb, "LAST")
        self.bad("GET team 2026-13")
        self.bad("GET team ../x")

    def test_injection_is_a_syntax_error(self):
        # Section 6 case 22 and friends: nothing reaches a path, a shell or SQL.
        for line in ("INFO ../../etc", "INFO /etc/passwd", "SUB team;rm -rf /",
                     "ADD team a@b' OR 1=1", "ADD team a@b.example' OR '1'='1",
                     "SUB $(reboot)", "SUB te`id`am", "SIGNOFF team a@b.example;ls",
                     "DEL team <a@b.example>", "ADD team a@b.example\x00Bcc",
                     "SUB team X\r\nBcc: v@x", "SUB team X\nBcc: v@x",
                     "SUB team Mallory \u202eevil", "REVIEW team\x1b[2J", "INFO t\u00e9am",
                     "SUB " + "a" * 51):
            self.assertRaises(CommandError, c.parse_line, line)

    def test_lines_too_long(self):
        self.assertRaises(CommandError, c.parse_line, "SUB team " + "x" * 1000)
        self.assertRaises(CommandError, c.parse_line, "SUB team " + "é" * 500)


class RequestAddressTests(unittest.TestCase):
    """At LIST-request a command without its list name means LIST (section 0)."""

    def p(self, line):
        return c.parse_line(line, default_list="team")

    def test_missing_list_names_mean_the_list(self):
        for line, canonical in (
                ("SUB", "SUBSCRIBE team"), ("SUB team Carol", "SUBSCRIBE team Carol"),
                ("SUB other", "SUBSCRIBE other"), ("SIGNOFF", "SIGNOFF team"),
                ("SIGNOFF zed@z.example", "SIGNOFF team zed@z.example"),
                ("SIGNOFF *", "SIGNOFF *"), ("SET nomail", "SET team NOMAIL"),
                ("SET * digest", "SET * DIGEST"), ("INFO", "INFO team"),
                ("REVIEW", "REVIEW team"), ("REMIND", "REMIND team"),
                ("MODINDEX", "MODINDEX team"), ("GET 2026-01", "GET team 2026-01"),
                ("ADD d@d.example Dave", "ADD team d@d.example Dave"),
                ("ADD other d@d.example", "ADD other d@d.example"),
                ("DEL d@d.example", "DEL team d@d.example"),
                (f"DISTRIBUTE {KEY}", f"DISTRIBUTE team {KEY}"),
                (f"REJECT {KEY} no", f"REJECT team {KEY} no"),
                (f"QUIET REJECT {KEY}", f"QUIET REJECT team {KEY}"),
                (f"AUTH {TOKEN} ADD d@d.example", f"AUTH {TOKEN} ADD team d@d.example"),
                ("LISTS", "LISTS"), (f"CONFIRM {TOKEN}", f"CONFIRM {TOKEN}")):
            self.assertEqual(self.p(line).canonical(), canonical, line)

    def test_message_at_the_request_address(self):
        res = c.parse_message(mail("SUB\nSET digest\n"), default_list="team")
        self.assertEqual([x.canonical() for x in res.commands],
                         ["SUBSCRIBE team", "SET team DIGEST"])
        res = c.parse_message(mail("", subject="Re: unsubscribe"), default_list="team")
        self.assertEqual([x.canonical() for x in res.commands], ["SIGNOFF team"])
        self.assertRaises(ValueError, c.parse_message, mail("SUB"), default_list="../x")
        self.assertRaises(CommandError, c.parse_line, "SUB")


class ReportTests(unittest.TestCase):

    def test_parse_outcomes_in_the_reply(self):
        from mailbox_appliance.lists import replies
        res = c.report_parse(c.parse_body("SUB ../x\nSUB team\nhello\nmore\nmore\n"),
                             replies.Results())
        self.assertEqual([(o.section, o.line) for o in res.outcomes],
                         [("Errors", "SUB ../x"), ("Errors", "hello")])
        self.assertEqual(res.ignored_lines, 2)
        res = c.report_parse(c.parse_body("hello\nworld\n"), replies.Results())
        body = res.body()
        self.assertIn("No command found", body)
        self.assertIn("  SUBSCRIBE list [your name]\n", body)
        self.assertIn("1 line ignored.", body)


class BodyTests(unittest.TestCase):

    def test_commands_until_the_signature(self):
        # Section 6 case 31.
        res = c.parse_body("SUB team\nSIGNOFF old\n-- \nSUB other\n")
        self.assertEqual([x.canonical() for x in res.commands], ["SUBSCRIBE team", "SIGNOFF old"])
        self.assertEqual((res.ignored_lines, res.not_understood, res.no_command), (0, None, False))
        res = c.parse_body("SUB team\n--\nSUB other\n")
        self.assertEqual(len(res.commands), 1)

    def test_quotes_comments_and_blank_lines(self):
        res = c.parse_body("\n  # a comment\n> SUB team\n   \n  >  INFO team\r\n>> SUB other\n")
        self.assertEqual([x.verb for x in res.items], ["SUBSCRIBE", "INFO"])
        self.assertEqual(res.not_understood, "> SUB other")

    def test_stop_words(self):
        for stop in ("END", "quit", "Stop", "-", "end of commands"):
            res = c.parse_body(f"SUB team\n{stop}\nSUB other\nprose\n")
            self.assertEqual(len(res.commands), 1, stop)
            self.assertEqual((res.ignored_lines, res.not_understood), (0, None))

    def test_first_line_prose_means_no_command(self):
        res = c.parse_body("Hello, please add me.\nSUB team\n")
        self.assertEqual((res.no_command, res.items, res.not_understood, res.ignored_lines),
                         (True, [], None, 1))
        self.assertTrue(c.parse_body("").no_command)
        self.assertTrue(c.parse_body("\n\n-- \nSUB team").no_command)

    def test_errors_do_not_stop_the_parsing(self):
        res = c.parse_body("SUB ../x\nSUB team\n")
        self.assertIsInstance(res.items[0], LineError)
        self.assertEqual(res.items[0].lineno, 1)
        self.assertIsInstance(res.items[1], Command)

    def test_500_lines_three_commands_then_prose(self):
        # Section 6 case 16.
        body = "SUB team\nSET team NOMAIL\nWHICH\n" + "".join(
            f"line {i} of my life story\n" for i in range(497))
        res = c.parse_body(body)
        self.assertEqual([x.verb for x in res.items], ["SUBSCRIBE", "SET", "WHICH"])
        self.assertEqual(res.not_understood, "line 0 of my life story")
        self.assertEqual(res.ignored_lines, 496)

    def test_500_valid_commands(self):
        # Section 6 case 17: 20 executed, 480 lines ignored.
        res = c.parse_body("SET team NOMAIL\n" * 500)
        self.assertEqual(len(res.commands), 20)
        self.assertEqual(res.ignored_lines, 480)
        self.assertEqual(len(res.notes), 1)

    def test_100_lines_examined_at_most(self):
        body = "SUB ../x\n" * 150 + "SUB team\n"
        res = c.parse_body(body)
        self.assertEqual(len(res.errors), 100)
        self.assertEqual(res.commands, [])
        self.assertEqual(res.ignored_lines, 51)
        body = "# note\n" * 150 + "SUB team\n"
        res = c.parse_body(body)
        self.assertEqual((res.items, res.ignored_lines), ([], 51))

    def test_a_huge_single_line(self):
        res = c.parse_body("SUB team " + "x" * 5_000_000)
        self.assertEqual(len(res.errors), 1)
        self.assertIn("longer than 1000", res.errors[0].reason)
        self.assertLessEqual(len(res.errors[0].line), 203)

    def test_control_characters_in_a_body_line(self):
        res = c.parse_body("SUB team X\x0bBcc: v@x\nSUB team\x0c\nSUB team X\x00\n"
                           "\x1cSUB team\nSUB team\u2028Bcc: v@x\nSUB team\r\rBcc: x\n")
        self.assertEqual(len(res.errors), 6)
        self.assertEqual(res.commands, [])
        for err in res.errors:
            self.assertNotRegex(err.line, "[\x00-\x1f]")


class MessageTests(unittest.TestCase):

    def test_subject_command_wins(self):
        # Section 6 case 3: a reply quoting the confirmation mail runs once.
        quoted = "\n".join(f"> {line}" for line in (
            f"CONFIRM {TOKEN}", "SUB team", "SIGNOFF team", "To confirm, reply."))
        res = c.parse_message(mail(quoted, subject=f"Re: CONFIRM {TOKEN}"))
        self.assertTrue(res.from_subject)
        self.assertEqual([x.canonical() for x in res.items], [f"CONFIRM {TOKEN}"])
        self.assertEqual((res.ignored_lines, res.not_understood, res.no_command), (0, None, False))

    def test_reply_prefixes(self):
        for prefix in ("Re: ", "RE : ", "Fwd: ", "AW: ", "SV: ", "Antw: ", "Re: Re[2]: ",
                       "Fw: RE: aw:", "WG: ", "Tr: ", "RV: ", "回复：", "Re^3: "):
            res = c.parse_message(mail("", subject=prefix + "sub team"))
            self.assertEqual([x.verb for x in res.items], ["SUBSCRIBE"], prefix)
        # The number of prefixes stripped is bounded.
        self.assertEqual(c.strip_prefixes("Re: " * 100 + "x"), "Re: " * 80 + "x")
        self.assertEqual(c.strip_prefixes("Re: Re : FWD:  sub team "), "sub team")

    def test_subject_with_bad_arguments_is_still_the_only_command(self):
        res = c.parse_message(mail("SUB team\n", subject="SUB ../../etc"))
        self.assertEqual(len(res.items), 1)
        self.assertIsInstance(res.items[0], LineError)

    def test_non_command_subject_is_ignored(self):
        res = c.parse_message(mail("SUB team\n", subject="Please add me"))
        self.assertEqual([x.verb for x in res.items], ["SUBSCRIBE"])
        self.assertFalse(res.from_subject)
        res = c.parse_message(mail("SUB team\n", subject="END"))
        self.assertEqual([x.verb for x in res.items], ["SUBSCRIBE"])

    def test_encoded_subject_with_a_header_injection(self):
        # Section 6 case 21: =?utf-8?B?...?= decoding to "SUB team X\r\nBcc: v@x".
        raw = (b"From: carol@c.example\r\nTo: lists@lists.example.org\r\n"
               b"Subject: =?utf-8?B?U1VCIHRlYW0gWA0KQmNjOiB2QHg=?=\r\n\r\nSUB team\r\n")
        res = c.parse_message(mail(raw=raw))
        self.assertTrue(res.from_subject)
        self.assertEqual(res.commands, [])
        self.assertEqual(len(res.errors), 1)
        self.assertIn("control character", res.errors[0].reason)
        self.assertNotIn("\n", res.errors[0].line)
        self.assertNotIn("\r", res.errors[0].line)

    def test_encoded_subject_ending_in_a_line_break(self):
        raw = (b"From: carol@c.example\r\nSubject: =?utf-8?Q?SUB_team=0D=0A?=\r\n\r\nSUB team\r\n")
        res = c.parse_message(mail(raw=raw))
        self.assertEqual((res.commands, len(res.errors)), ([], 1))

    def test_folded_and_encoded_subject(self):
        raw = (b"From: carol@c.example\r\nSubject: Re:\r\n =?iso-8859-1?Q?SUB_team_Zo=EB?=\r\n"
               b"\r\nignored\r\n")
        res = c.parse_message(mail(raw=raw))
        self.assertEqual([(x.verb, x.name) for x in res.items], [("SUBSCRIBE", "Zoë")])

    def test_first_plain_part_and_other_parts_noted(self):
        msg = mail("SUB team\n")
        msg.add_attachment(b"SUB other\n", maintype="application", subtype="octet-stream",
                           filename="x.bin")
        res = c.parse_message(msg)
        self.assertEqual([x.list_name for x in res.commands], ["team"])
        self.assertEqual(len(res.notes), 1)

    def test_alternative_is_not_another_part(self):
        msg = mail("SUB team\n")
        msg.add_alternative("<p>SUB other</p>", subtype="html")
        res = c.parse_message(msg)
        self.assertEqual(([x.list_name for x in res.commands], res.notes), (["team"], []))

    def test_html_only(self):
        msg = EmailMessage()
        msg["From"] = "carol@c.example"
        msg.set_content("<html><head><title>SUB x</title></head><body><p>SUB&nbsp;team</p>"
                        "<div>SET team digest</div><br>thanks</body></html>", subtype="html")
        res = c.parse_message(msg)
        self.assertEqual([x.verb for x in res.items], ["SUBSCRIBE", "SET"])
        self.assertEqual(res.not_understood, "thanks")

    def test_forwarded_mail_is_not_read(self):
        inner = mail("SUB evil\n")
        outer = EmailMessage()
        outer["From"] = "carol@c.example"
        outer.set_content("SUB team\n")
        outer.add_attachment(inner)
        res = c.parse_message(outer)
        self.assertEqual([x.list_name for x in res.commands], ["team"])
        only = EmailMessage()
        only["From"] = "carol@c.example"
        only.set_content(inner)
        self.assertTrue(c.parse_message(only).no_command)

    def test_many_parts_are_bounded(self):
        msg = EmailMessage()
        msg["From"] = "carol@c.example"
        msg.make_mixed()
        for i in range(300):
            part = EmailMessage()
            part.set_content(b"x", maintype="application", subtype="octet-stream")
            msg.attach(part)
        part = EmailMessage()
        part.set_content("SUB team\n")
        msg.attach(part)
        res = c.parse_message(msg)
        self.assertTrue(res.no_command)

    def test_bad_charset(self):
        raw = (b"From: carol@c.example\r\nContent-Type: text/plain; charset=x-no-such\r\n\r\n"
               b"SUB team Zo\xc3\xab\r\n")
        res = c.parse_message(mail(raw=raw))
        self.assertEqual([(x.verb, x.name) for x in res.items], [("SUBSCRIBE", "Zoë")])


class MisaddressedTests(unittest.TestCase):
    """Commands sent to the posting address (section 4.2; section 6 case 29)."""

    def test_subject_unsubscribe(self):
        self.assertEqual(c.misaddressed(mail("please", subject="unsubscribe"), "team"),
                         "unsubscribe")
        self.assertEqual(c.misaddressed(mail("x", subject="Re: SIGNOFF team"), "team"),
                         "unsubscribe")
        self.assertEqual(c.misaddressed(mail("x", subject="subscribe"), "team"), "subscribe")
        self.assertEqual(c.misaddressed(mail("x", subject="set team nomail"), "team"), "set")

    def test_short_body(self):
        self.assertEqual(c.misaddressed(mail("\n  unsubscribe\n\nthanks\n-- \nCarol\nA\nB\nC\n",
                                             subject="hi"), "team"), "unsubscribe")
        self.assertIsNone(c.misaddressed(mail("unsubscribe\n" + "text\n" * 5, subject="hi"),
                                         "team"))

    def test_ordinary_posts(self):
        for subject, body in (("Unsubscribe me from the other list?", "x"),
                              ("subscribe other", "x"), ("set team MAIL now", "x"),
                              ("Meeting", "Let us talk about unsubscribe rates\n"),
                              ("Meeting", "")):
            self.assertIsNone(c.misaddressed(mail(body, subject=subject), "team"), subject)
