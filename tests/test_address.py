"""Tests of mailbox_appliance.smtp.address: envelope paths and ESMTP parameters."""

from twisted.trial import unittest

from mailbox_appliance.smtp.address import (
    MAX_DOMAIN, MAX_LOCAL, MAX_PATH, AddressError, Path, parse_params, parse_path,
    split_path_and_params)


class SplitTests(unittest.TestCase):

    def test_plain(self):
        self.assertEqual(split_path_and_params("FROM:<a@b.test>", "FROM"), ("<a@b.test>", []))
        self.assertEqual(split_path_and_params("TO:<a@b.test>", "TO"), ("<a@b.test>", []))

    def test_keyword_case_and_space_before_path(self):
        self.assertEqual(split_path_and_params("from: <a@b.test>", "FROM"), ("<a@b.test>", []))
        self.assertEqual(split_path_and_params("To:<a@b.test>", "TO"), ("<a@b.test>", []))

    def test_params(self):
        self.assertEqual(split_path_and_params("FROM:<a@b.test> SIZE=10  BODY=8BITMIME", "FROM"),
                         ("<a@b.test>", ["SIZE=10", "BODY=8BITMIME"]))
        self.assertEqual(split_path_and_params("FROM:<> SIZE=10", "FROM"), ("<>", ["SIZE=10"]))

    def test_quoted_gt_does_not_end_path(self):
        self.assertEqual(split_path_and_params('TO:<"a>b"@c.test> X=1', "TO"),
                         ('<"a>b"@c.test>', ["X=1"]))
        self.assertEqual(split_path_and_params('TO:<"a\\">b"@c.test>', "TO"),
                         ('<"a\\">b"@c.test>', []))

    def assertRefused(self, arg, keyword, code, enhanced):
        e = self.assertRaises(AddressError, split_path_and_params, arg, keyword)
        self.assertEqual((e.code, e.enhanced), (code, enhanced), e.text)

    def test_bad_keyword(self):
        self.assertRefused("FRM:<a@b.test>", "FROM", 501, "5.5.4")
        self.assertRefused("FROM <a@b.test>", "FROM", 501, "5.5.4")
        self.assertRefused("TO:<a@b.test>", "FROM", 501, "5.5.4")
        self.assertRefused("", "TO", 501, "5.5.4")

    def test_no_angle_brackets(self):
        self.assertRefused("FROM:a@b.test", "FROM", 501, "5.1.7")
        self.assertRefused("TO:a@b.test", "TO", 501, "5.1.3")

    def test_unterminated(self):
        self.assertRefused("FROM:<a@b.test", "FROM", 501, "5.1.7")
        self.assertRefused('TO:<"a>@b.test', "TO", 501, "5.1.3")

    def test_junk_glued_after_path(self):
        self.assertRefused("FROM:<a@b.test>SIZE=10", "FROM", 501, "5.5.4")
        self.assertRefused("TO:<a@b.test>>", "TO", 501, "5.5.4")


class ParsePathTests(unittest.TestCase):

    def assertRefused(self, text, code, enhanced, sender=False):
        e = self.assertRaises(AddressError, parse_path, text, sender)
        self.assertEqual((e.code, e.enhanced), (code, enhanced), (text, e.text))
        return e

    def test_simple(self):
        p = parse_path("<alice@example.test>", sender=False)
        self.assertEqual(p, Path(local="alice", domain="example.test"))
        self.assertEqual(p.address, "alice@example.test")
        self.assertFalse(p.has_routing)
        self.assertFalse(p.is_literal)
        self.assertFalse(p.null)

    def test_null_sender(self):
        p = parse_path("<>", sender=True)
        self.assertTrue(p.null)
        self.assertEqual(p.address, "")

    def test_null_recipient_refused(self):
        self.assertRefused("<>", 501, "5.1.3", sender=False)

    def test_domain_case_folded_local_part_kept(self):
        p = parse_path("<Alice.Smith@EXAMPLE.Test>", sender=False)
        self.assertEqual((p.local, p.domain), ("Alice.Smith", "example.test"))

    def test_trailing_dot_domain(self):
        p = parse_path("<alice@Example.Test.>", sender=False)
        self.assertEqual(p.domain, "example.test")
        self.assertRefused("<alice@.>", 501, "5.1.3")
        self.assertRefused("<alice@example..test>", 501, "5.1.3")

    def test_source_route_ignored(self):
        for text in ["<@relay.test:alice@example.test>",
                     "<@one.test,@two.test:alice@example.test>",
                     "<@[192.0.2.1]:alice@example.test>",
                     "<@relay.test.:alice@Example.test>"]:
            p = parse_path(text, sender=False)
            self.assertEqual((p.local, p.domain), ("alice", "example.test"), text)
            self.assertEqual(p.address, "alice@example.test")

    def test_source_route_to_elsewhere_keeps_final_domain(self):
        # The final address decides: a route through our host to another
        # domain is a relay attempt to that domain.
        p = parse_path("<@example.test:r@victim.test>", sender=False)
        self.assertEqual(p.domain, "victim.test")

    def test_bad_source_route(self):
        self.assertRefused("<@bad..route:alice@example.test>", 501, "5.1.3")
        self.assertRefused("<@[300.1.1.1]:alice@example.test>", 501, "5.1.3")
        self.assertRefused("<@relay.test:>", 501, "5.1.3")

    def test_quoted_local_part(self):
        p = parse_path('<"john doe"@example.test>', sender=False)
        self.assertEqual((p.local, p.domain, p.quoted), ("john doe", "example.test", True))
        self.assertEqual(p.address, '"john doe"@example.test')
        p = parse_path('<"a\\"b\\\\c"@example.test>', sender=False)
        self.assertEqual(p.local, 'a"b\\c')
        self.assertEqual(p.address, '"a\\"b\\\\c"@example.test')
        p = parse_path('<"plain"@example.test>', sender=False)
        self.assertEqual(p.local, "plain")

    def test_bad_quoted_local_part(self):
        self.assertRefused('<"unterminated@example.test>', 501, "5.1.3")
        self.assertRefused('<"a"b@example.test>', 501, "5.1.3")
        self.assertRefused('<""@example.test>', 501, "5.1.3")
        self.assertRefused('<"a"@>', 501, "5.1.3")

    def test_has_routing(self):
        for text in ["<r%victim.test@example.test>", "<victim.test!r@example.test>",
                     "<victim.test!r>", "<r@victim.test@example.test>",
                     '<"r@victim.test"@example.test>', '<"r%victim.test">',
                     '<"r@victim.test">']:
            self.assertTrue(parse_path(text, sender=False).has_routing, text)
        self.assertFalse(parse_path('<"r.victim"@example.test>', sender=False).has_routing)

    def test_at_in_local_part_keeps_last_domain(self):
        p = parse_path("<r@victim.test@example.test>", sender=False)
        self.assertEqual((p.local, p.domain), ("r@victim.test", "example.test"))

    def test_local_part_without_domain(self):
        p = parse_path("<Postmaster>", sender=False)
        self.assertEqual((p.local, p.domain), ("Postmaster", ""))

    def test_empty_parts(self):
        self.assertRefused("<@example.test>", 501, "5.1.3")
        self.assertRefused("<alice@>", 501, "5.1.3")
        self.assertRefused("<alice@>", 501, "5.1.7", sender=True)
        self.assertRefused("<@>", 501, "5.1.3")

    def test_bad_syntax(self):
        for text in ["<a b@example.test>", "<.a@example.test>", "<a.@example.test>",
                     "<a..b@example.test>", "<a@exa mple.test>", "<a@-example.test>",
                     "<a@example-.test>", "<a@exa_mple.test>", "<a(b)@example.test>",
                     "<a,b@example.test>", "<a@b@>"]:
            self.assertRefused(text, 501, "5.1.3")

    def test_not_enclosed(self):
        self.assertRefused("alice@example.test", 501, "5.1.3")
        self.assertRefused("<alice@example.test", 501, "5.1.3")

    def test_address_literals(self):
        p = parse_path("<a@[192.0.2.1]>", sender=False)
        self.assertEqual(p.domain, "[192.0.2.1]")
        self.assertTrue(p.is_literal)
        p = parse_path("<a@[255.255.255.255]>", sender=False)
        self.assertTrue(p.is_literal)
        p = parse_path("<a@[IPv6:2001:DB8::1]>", sender=False)
        self.assertEqual(p.domain, "[IPv6:2001:db8::1]")
        # The tag is case-insensitive like every ABNF string (RFC 5234 2.3).
        self.assertEqual(parse_path("<a@[ipv6:::1]>", sender=False).domain, "[IPv6:::1]")
        self.assertEqual(parse_path("<a@[IPv6:::ffff:192.0.2.1]>", sender=False).domain,
                         "[IPv6:::ffff:192.0.2.1]")

    def test_bad_address_literals(self):
        for text in ["<a@[300.1.1.1]>", "<a@[1.2.3.256]>", "<a@[1.2.3]>",
                     "<a@[1.2.3.4.5]>", "<a@[1234.1.1.1]>", "<a@[IPv6:1::2::3]>",
                     "<a@[IPv6:12345::]>", "<a@[IPv6:192.0.2.1]>", "<a@[::1]>",
                     "<a@[x-tag:stuff]>", "<a@[]>", "<a@[192.0.2.1>", "<a@[192.0.2.1].>",
                     "<a@[IPv6:fe80::1%eth0]>"]:
            self.assertRefused(text, 501, "5.1.3")

    def test_local_part_length(self):
        parse_path("<" + "a" * MAX_LOCAL + "@example.test>", sender=False)
        self.assertRefused("<" + "a" * (MAX_LOCAL + 1) + "@example.test>", 501, "5.1.3")
        # Counted as sent: the quotes of a quoted local part count.
        parse_path('<"' + "a" * (MAX_LOCAL - 2) + '"@example.test>', sender=False)
        self.assertRefused('<"' + "a" * (MAX_LOCAL - 1) + '"@example.test>', 501, "5.1.3")

    def test_domain_length_and_label_length(self):
        self.assertRefused("<a@" + "d" * 64 + ".test>", 501, "5.1.3")
        parse_path("<a@" + "d" * 63 + ".test>", sender=False)
        # 255 octets of domain is fine on its own...
        domain = ".".join(["d" * 63] * 3 + ["d" * 63])
        self.assertEqual(len(domain), 255)
        self.assertEqual(MAX_DOMAIN, 255)
        # ...but not inside a 256-octet path with the local part and brackets.
        self.assertRefused("<a@" + domain + ">", 501, "5.1.3")
        self.assertRefused("<a@" + domain + "d>", 501, "5.1.3")

    def test_path_length(self):
        # RFC 5321 4.5.3.1.3: 256 octets including the angle brackets.
        self.assertEqual(MAX_PATH, 256)
        local = "a" * 60
        labels = ["d" * 60, "d" * 60, "d" * 60]
        base = f"{local}@{'.'.join(labels)}."
        tail = "e" * (MAX_PATH - 2 - len(base))
        text = f"<{base}{tail}>"
        self.assertEqual(len(text), MAX_PATH)
        parse_path(text, sender=False)
        self.assertRefused(f"<{base}{tail}e>", 501, "5.1.3")
        self.assertRefused(f"<{base}{tail}e>", 501, "5.1.7", sender=True)

    def test_control_characters(self):
        for c in ["\x00", "\x01", "\t", "\r", "\n", "\x1b", "\x7f"]:
            self.assertRefused(f"<al{c}ice@example.test>", 501, "5.5.2")
            self.assertRefused(f'<"al{c}ice"@example.test>', 501, "5.5.2")
            self.assertRefused(f"<alice@example.test{c}>", 501, "5.5.2", sender=True)

    def test_non_ascii(self):
        self.assertRefused("<josé@example.test>", 553, "5.6.7")
        self.assertRefused("<jose@exämple.test>", 553, "5.6.7", sender=True)
        self.assertRefused('<"jos\u00e9"@example.test>', 553, "5.6.7")
        self.assertRefused("<a@example.test\u0085>", 553, "5.6.7")


class ParamsTests(unittest.TestCase):

    def assertRefused(self, params, code=501, enhanced="5.5.4"):
        e = self.assertRaises(AddressError, parse_params, params)
        self.assertEqual((e.code, e.enhanced), (code, enhanced), params)

    def test_params(self):
        self.assertEqual(parse_params([]), {})
        self.assertEqual(parse_params(["size=100", "BODY=8BITMIME", "SMTPUTF8"]),
                         {"SIZE": "100", "BODY": "8BITMIME", "SMTPUTF8": None})
        self.assertEqual(parse_params(["X-FOO=a+b/c"]), {"X-FOO": "a+b/c"})

    def test_duplicates(self):
        self.assertRefused(["SIZE=1", "SIZE=2"])
        self.assertRefused(["SIZE=1", "size=1"])
        self.assertRefused(["SMTPUTF8", "smtputf8"])

    def test_junk(self):
        for params in [["=1"], ["-X=1"], ["SI_ZE=1"], ["SIZE="], ["SIZE=a=b"],
                       ["SIZE=\x01"], ["SIZE=é"], ["S\u00e9=1"], ["SIZE=\x7f"], ["@"]]:
            self.assertRefused(params)

    def test_split_then_params(self):
        path, params = split_path_and_params("FROM:<a@b.test> SIZE=1 SIZE=2", "FROM")
        self.assertEqual(path, "<a@b.test>")
        self.assertRefused(params)
