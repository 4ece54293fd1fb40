"""List addresses at a list domain (lists.md section 0) and VERP tags (section 4.7)."""

import base64

from twisted.trial import unittest

from mailbox_appliance.lists import addresses as a

DOM = "lists.example.org"
NAMES = frozenset({"team", "ann", "hidden", "a+b"})
KEY = b"0123456789abcdef-verp-key"
TOKEN = "0123456789abcdef0123456789abcdef"


class ClassifyTests(unittest.TestCase):

    def kind(self, local, names=NAMES, robot="lists"):
        got = a.classify(local, DOM, names, robot)
        return None if got is None else (got.kind, got.list_name, got.token, got.tag)

    def test_every_address_of_a_list(self):
        self.assertEqual(self.kind("team"), ("post", "team", None, None))
        self.assertEqual(self.kind("team-request"), ("request", "team", None, None))
        self.assertEqual(self.kind("team-subscribe"), ("subscribe", "team", None, None))
        self.assertEqual(self.kind("team-unsubscribe"), ("unsubscribe", "team", None, None))
        self.assertEqual(self.kind("team-owner"), ("owner", "team", None, None))
        self.assertEqual(self.kind("team-editor"), ("editor", "team", None, None))
        self.assertEqual(self.kind("team-bounces"), ("bounces", "team", None, None))
        self.assertEqual(self.kind("team-confirm+" + TOKEN), ("confirm", "team", TOKEN, None))

    def test_robot_and_listmaster(self):
        self.assertEqual(self.kind("lists"), ("robot", None, None, None))
        self.assertEqual(self.kind("LISTS"), ("robot", None, None, None))
        self.assertEqual(self.kind("listmaster"), ("listmaster", None, None, None))
        self.assertEqual(self.kind("sympa", robot="sympa"), ("robot", None, None, None))
        self.assertIsNone(self.kind("lists", robot="sympa"))

    def test_case_is_ignored_and_the_token_lowered(self):
        got = a.classify("Team-Confirm+" + TOKEN.upper(), "Lists.Example.ORG", NAMES)
        self.assertEqual((got.kind, got.list_name, got.token, got.domain),
                         ("confirm", "team", TOKEN, DOM))
        self.assertEqual(got.list_address, "team@" + DOM)
        self.assertEqual(self.kind("TEAM-OWNER"), ("owner", "team", None, None))

    def test_a_list_name_with_a_plus(self):
        self.assertEqual(self.kind("a+b"), ("post", "a+b", None, None))
        self.assertEqual(self.kind("a+b-confirm+" + TOKEN), ("confirm", "a+b", TOKEN, None))
        self.assertEqual(self.kind("a+b-owner"), ("owner", "a+b", None, None))

    def test_what_is_not_a_list_address(self):
        for local in ("nosuchlist", "nosuchlist-request", "team-foo", "team+x", "-request",
                      "team-confirm", "team-confirm+", "team-confirm+1234",
                      "team-confirm+" + TOKEN + "0", "team-confirm+" + "g" * 32,
                      "team-bounces+!!!", "team-bounces+ab", "postmaster", "",
                      "t\u00e9am", "team\r\nBcc", "x" * 200, "team-request+x",
                      "other-confirm+" + TOKEN):
            self.assertIsNone(self.kind(local), local)

    def test_not_strings(self):
        self.assertIsNone(a.classify(None, DOM, NAMES))
        self.assertIsNone(a.classify("team", None, NAMES))

    def test_list_names(self):
        for good in ("team", "a", "a.b_c-d+e", "x" * 50):
            self.assertTrue(a.list_name_ok(good), good)
        for bad in ("", "Team", "-x", ".x", "x" * 51, "team-request", "team-bounces",
                    "listmaster", "postmaster", "lists", "a/b", "../etc", "t\u00e9am", None):
            self.assertFalse(a.list_name_ok(bad), bad)
        self.assertTrue(a.list_name_ok("lists", robot="sympa"))

    def test_addresses(self):
        self.assertTrue(a.address_ok("alice@a.example"))
        for bad in ("alice", "alice@localhost", "a@b'", "a b@c.d", "a@b.c\r\nBcc: x@y.z",
                    "<a@b.c>", "a..b@c.d", "x" * 250 + "@c.de", "\u00e9@a.example", None):
            self.assertFalse(a.address_ok(bad), bad)

    def test_addresses_written(self):
        self.assertEqual(a.robot_address("Lists.Example.Org"), "lists@" + DOM)
        self.assertEqual(a.list_address("team", DOM, a.OWNER), "team-owner@" + DOM)
        self.assertEqual(a.list_address("team", DOM), "team@" + DOM)
        self.assertEqual(a.confirm_address("team", DOM, TOKEN.upper()),
                         f"team-confirm+{TOKEN}@{DOM}")
        self.assertRaises(ValueError, a.confirm_address, "team", DOM, "x\r\nBcc: y")


class VerpTests(unittest.TestCase):

    def test_round_trip(self):
        sender = a.verp_sender("team", DOM, 42, 7, KEY)
        local, _, domain = sender.partition("@")
        self.assertEqual(domain, DOM)
        self.assertTrue(local.startswith("team-bounces+"))
        got = a.classify(local, domain, NAMES)
        self.assertEqual(got.kind, a.BOUNCES)
        self.assertEqual(a.verify_bounce_recipient(got, KEY), (42, 7))

    def test_upper_cased_by_a_relay_still_verifies(self):
        local = a.verp_sender("team", DOM, 1, 2, KEY).partition("@")[0].upper()
        self.assertEqual(a.verify_bounce_recipient(a.classify(local, DOM, NAMES), KEY), (1, 2))

    def test_large_numbers_and_compact_tags(self):
        tag = a.make_verp_tag("team@" + DOM, 2 ** 63 - 1, 2 ** 63 - 1, KEY)
        self.assertEqual(a.verify_verp_tag("team@" + DOM, tag, KEY), (2 ** 63 - 1, 2 ** 63 - 1))
        self.assertLessEqual(len(a.make_verp_tag("team@" + DOM, 100000, 100000, KEY)), 24)
        for n in (-1, 2 ** 63, 1.5, True, "1"):
            self.assertRaises(ValueError, a.make_verp_tag, "team@" + DOM, n, 1, KEY)

    def test_short_key_refused(self):
        self.assertRaises(ValueError, a.verp_sender, "team", DOM, 1, 1, b"short")

    def test_forged_tags_are_refused(self):
        lst = "team@" + DOM
        tag = a.make_verp_tag(lst, 42, 7, KEY)
        raw = bytearray(base64.b32decode(tag.upper() + "=" * (-len(tag) % 8)))
        # Another member id with the old MAC (what a forger who read one bounce can do).
        forged = bytearray(raw)
        forged[0] ^= 1
        forged_tag = base64.b32encode(bytes(forged)).decode().rstrip("=").lower()
        self.assertIsNone(a.verify_verp_tag(lst, forged_tag, KEY))
        # The MAC flipped, cut, or made with another key, for another list.
        raw[-1] ^= 0x80
        self.assertIsNone(a.verify_verp_tag(
            lst, base64.b32encode(bytes(raw)).decode().rstrip("=").lower(), KEY))
        self.assertIsNone(a.verify_verp_tag(lst, tag[:-2], KEY))
        self.assertIsNone(a.verify_verp_tag(lst, tag, b"another key of 16+ bytes"))
        self.assertIsNone(a.verify_verp_tag("ann@" + DOM, tag, KEY))
        # Plain addresses (Sympa style) and garbage.
        for bad in ("alice=a.example", "", "a" * 16, "a" * 48, "!" * 20, None, "x" * 1000):
            self.assertIsNone(a.verify_verp_tag(lst, bad, KEY), bad)

    def test_untagged_or_other_kinds_do_not_verify(self):
        self.assertIsNone(a.verify_bounce_recipient(a.classify("team-bounces", DOM, NAMES), KEY))
        self.assertIsNone(a.verify_bounce_recipient(a.classify("team", DOM, NAMES), KEY))
        self.assertIsNone(a.verify_bounce_recipient(None, KEY))
