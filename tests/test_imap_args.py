"""Arguments of IMAP mailbox commands."""

from twisted.trial import unittest

from mailbox_appliance.imap.args import (
    ArgumentError, format_date_time, list_matcher, parse_date_time, parse_flags,
    parse_status_items, parse_store_action)
from mailbox_appliance.imap.tokens import Atom


class ArgsTests(unittest.TestCase):

    def test_flags(self):
        self.assertEqual(parse_flags([Atom("\\seen"), Atom("\\DELETED"), Atom("$Junk")]),
                         {"\\Seen", "\\Deleted", "$Junk"})
        self.assertEqual(parse_flags(Atom("\\Flagged")), {"\\Flagged"})
        for bad in ([Atom("\\Bogus")], [b"quoted"], [Atom("\\Recent")], [Atom("a" * 65)]):
            self.assertRaises(ArgumentError, parse_flags, bad)
        self.assertEqual(parse_flags([Atom("\\Recent")], allow_recent=True), set())

    def test_date_time(self):
        self.assertEqual(parse_date_time(b"17-Jul-1996 02:44:25 -0700"), 837596665.0)
        self.assertEqual(parse_date_time(b" 7-Jul-1996 02:44:25 +0000"), 836707465.0)
        self.assertEqual(format_date_time(837596665.0), "17-Jul-1996 09:44:25 +0000")
        for bad in (b"31-Feb-2020 00:00:00 +0000", b"1-Foo-2020 00:00:00 +0000",
                    b"17-Jul-1996 02:44:25", b"17-Jul-1996 25:44:25 +0000"):
            self.assertRaises(ArgumentError, parse_date_time, bad)

    def test_store_and_status(self):
        self.assertEqual(parse_store_action(Atom("+FLAGS.SILENT")), ("add", True))
        self.assertEqual(parse_store_action(Atom("flags")), ("set", False))
        self.assertRaises(ArgumentError, parse_store_action, Atom("FLAGS.LOUD"))
        self.assertEqual(parse_status_items([Atom("messages"), Atom("UIDNEXT")]),
                         ["MESSAGES", "UIDNEXT"])
        self.assertRaises(ArgumentError, parse_status_items, [Atom("SIZE")])

    def test_list_patterns(self):
        names = ["INBOX", "Sent", "Archive", "Archive.2024", "Archive.2024.Q1", "Drafts"]
        m = lambda ref, pat: [n for n in names if list_matcher(ref, pat)(n)]
        self.assertEqual(m("", "*"), names)
        self.assertEqual(m("", "%"), ["INBOX", "Sent", "Archive", "Drafts"])
        self.assertEqual(m("Archive.", "%"), ["Archive.2024"])
        self.assertEqual(m("", "Archive.*"), ["Archive.2024", "Archive.2024.Q1"])
        self.assertEqual(m("", "inbox"), ["INBOX"])
        self.assertEqual(m("", "a%"), [])
