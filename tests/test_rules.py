"""Rule scoring: the rule language, its safety checks, the built-in rules.

Messages are parsed with ``ScannedMessage`` as the content scan does; the
rules run synchronously (``RuleSet.evaluate``) or through ``RulesFilter``
in the reactor's thread pool. The time budget is driven by a fake timer,
never by the clock.
"""

import os
import re
import threading

from twisted.internet import defer
from twisted.trial import unittest

from mailbox_appliance.antispam import rules
from mailbox_appliance.antispam.content import ContentResult, IContentFilter
from mailbox_appliance.antispam.message import ScannedMessage
from mailbox_appliance.antispam.rules import (RuleError, RulesFilter, RuleSet,
                                              compile_pattern, load_rules,
                                              parse_expression, split_addresses)
from tests.e2e.harness import ANTISPAM_OFF
from tests.smtp_helpers import ApplianceMixin, RawClient

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "content")
CONTENT_ON = ANTISPAM_OFF.replace("[antispam.content]\nenabled = false",
                                  "[antispam.content]\nenabled = true\nscan_timeout = \"10s\"")


def message(headers=(), body="", hits=None, **envelope):
    """A ScannedMessage of header (name, value) pairs and a text body."""
    head = "".join(f"{n}: {v}\r\n" for n, v in headers)
    m = ScannedMessage.parse((head + "\r\n" + body).encode("utf-8"), **envelope)
    if hits is not None:
        m.facts["hits"] = dict(hits)        # as the content scan leaves them
    return m


def fixture(name, **envelope):
    with open(os.path.join(FIXTURES, name), "rb") as f:
        raw = f.read().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    return ScannedMessage.parse(raw, **envelope)


def ruleset(text, default=False):
    r = RuleSet()
    if default:
        r.add_text(rules.default_rules_text(), "default.rules")
    r.add_text(text, "local.rules")
    return r.build()


def hits_of(text, msg, **kw):
    r = ruleset(text)
    assert not r.errors, r.errors
    return r.evaluate(msg, **kw)[0]


def sync(f, *args):
    return defer.succeed(f(*args))


class LanguageTests(unittest.TestCase):
    """Statements, their errors (file:line, skipped), redefinition."""

    def test_each_kind(self):
        text = """
# a comment
   # an indented comment
header   SUBJ    Subject =~ /hello/i
body     BODY    /cheap pills/
rawbody  RAW     /<b>bold<\\/b>/
uri      LINK    /^https:\\/\\/x\\.example\\//
full     FULL    /^X-Tag: yes\\r$/m
eval     HTML    html_only
meta     BOTH    SUBJ && BODY
describe BOTH    Subject and body
score    BOTH    2.5
score    SUBJ    -0.5
"""
        r = ruleset(text)
        self.assertEqual(r.errors, [])
        self.assertEqual(set(r.rules), {"SUBJ", "BODY", "RAW", "LINK", "FULL", "HTML", "BOTH"})
        msg = message([("Subject", "HELLO there"), ("X-Tag", "yes"),
                       ("Content-Type", "text/html")],
                      "<p>Buy <b>bold</b> cheap   pills at "
                      "<a href='https://x.example/a'>here</a></p>")
        hits, timed_out = r.evaluate(msg)
        self.assertFalse(timed_out)
        self.assertEqual(hits, {"SUBJ": -0.5, "BODY": 1.0, "RAW": 1.0, "LINK": 1.0,
                                "FULL": 1.0, "HTML": 1.0, "BOTH": 2.5})
        self.assertEqual(r.describe("BOTH"), "Subject and body")

    def test_errors_name_file_and_line_and_skip_the_rule(self):
        text = ("header OK1 Subject =~ /a/\n"
                "header BAD1 Subject =~ /(unclosed/\n"
                "bogus NAME /x/\n"
                "body 9BAD /x/\n"
                "body BAD2 /x/q\n"
                "body BAD3 /no end\n"
                "body BAD4 no slashes\n"
                "score OK1 lots\n"
                "meta BAD5 (OK1 &&\n"
                "header BAD6 Subject ~= /a/\n"
                "header BAD7 Subject:weird =~ /a/\n"
                "header BAD8 Received:count about 3\n"
                "eval BAD9 no_such_function\n"
                "body\n"
                "body OK2 /b/\n")
        r = ruleset(text)
        self.assertEqual(set(r.rules), {"OK1", "OK2"})
        lines = [int(e.split(":")[1]) for e in r.errors]
        self.assertEqual(lines, list(range(2, 15)))
        self.assertTrue(all(e.startswith("local.rules:") for e in r.errors))
        self.assertIn("bad regular expression", r.errors[0])
        self.assertIn("unknown statement 'bogus'", r.errors[1])
        self.assertIn("unknown flag 'q'", r.errors[3])

    def test_bad_file_does_not_stop_loading(self):
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(b"body GOOD /fine/\n\xff\xfe\x00garbage\nbody ALSO /ok/\n"
                    + b"body LONG /" + b"a" * 5000 + b"/\n")
        r = load_rules([path, path + ".missing"], default_rules=False)
        self.assertEqual(set(r.rules), {"GOOD", "ALSO"})
        self.assertEqual(len(r.errors), 3)
        self.assertIn(f"{path}:2:", r.errors[0])
        self.assertIn(f"{path}:4: line longer than", r.errors[1])
        self.assertIn("cannot read rule file", r.errors[2])

    def test_oversized_file_ignored(self):
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(b"# x\n" * (rules.MAX_FILE_SIZE // 4 + 1))
        r = load_rules([path], default_rules=False)
        self.assertEqual(len(r.rules), 0)
        self.assertIn("larger than", r.errors[0])

    def test_later_definition_wins(self):
        r = ruleset("body A /one/\nscore A 3\nbody A /two/\nscore A 0.5\n"
                    "describe A first\ndescribe A second\n")
        self.assertEqual(r.errors, [])
        self.assertEqual(hits_of("body A /one/\nbody A /two/\n", message(body="one")), {})
        self.assertEqual(r.evaluate(message(body="two"))[0], {"A": 0.5})
        self.assertEqual(r.describe("A"), "second")

    def test_local_file_rescores_default(self):
        r = ruleset("score PHARMA_NAMES 0\nscore SPF_FAIL 2.5\n", default=True)
        hits = r.evaluate(message([("Subject", "hi")], "viagra",
                                  hits={"SPF_FAIL": 0.0}))[0]
        self.assertEqual(hits["PHARMA_NAMES"], 0.0)
        self.assertEqual(hits["SPF_FAIL"], 2.5)

    def test_default_score_and_internal_rules(self):
        r = ruleset("body __PART /x/\nbody SHOWN /x/\nscore __PART 5\n")
        self.assertEqual(r.evaluate(message(body="x"))[0], {"SHOWN": 1.0})

    def test_reserved_and_limits(self):
        r = ruleset("body RULES_TIMEOUT /x/\nscore X 5000\nscore Y 1e9\n"
                    "describe D " + "\x07" + "bell\n")
        self.assertEqual(len(r.errors), 3)
        self.assertEqual(r.describe("D"), " bell")

    def test_flags(self):
        msg = message(body="Line one\nand line two")
        self.assertEqual(hits_of("body A /LINE ONE/i\nbody B /LINE ONE/\n"
                                 "rawbody C /one.and/s\nrawbody D /one.and/\n"
                                 "rawbody E /^and/m\nrawbody F /^and/\n"
                                 "body G / l i n e \\s t w o /x\n"
                                 "body H /\\w/a\n", msg),
                         {"A": 1.0, "C": 1.0, "E": 1.0, "G": 1.0, "H": 1.0})

    def test_slash_escapes(self):
        self.assertEqual(hits_of("body A /a\\/b/\nuri U /\\/p\\/q$/\n",
                                 message(body="a/b http://h.example/p/q")),
                         {"A": 1.0, "U": 1.0})


class HeaderTests(unittest.TestCase):
    """header tests: values, variants, pseudo-fields, counts, absence."""

    def setUp(self):
        self.msg = message(
            [("From", '"Support, Bank" <help@bank.example>'),
             ("To", "a@x.example, B <b@y.example>"),
             ("Cc", "c@z.example"),
             ("Subject", "=?utf-8?q?caf=C3=A9?="),
             ("Received", "from a"), ("Received", "from b"), ("Received", "from c")],
            "text", sender="bounce@bank.example", helo="mta.bank.example")

    def check(self, text, expected):
        self.assertEqual(set(hits_of(text, self.msg)), set(expected))

    def test_decoded_and_raw(self):
        self.check("header A Subject =~ /café/\nheader B Subject:raw =~ /=\\?utf-8\\?q\\?/\n"
                   "header C Subject =~ /=\\?/\nheader D subject =~ /CAFÉ/i\n",
                   {"A", "B", "D"})

    def test_addresses_and_names(self):
        self.check("header A From:addr =~ /^help@bank\\.example$/\n"
                   "header B From:name =~ /^Support, Bank$/\n"
                   "header C To:addr =~ /^b@y\\.example$/m\n"
                   "header D ToCc:addr =~ /^c@z\\.example$/m\n"
                   "header E ToCc =~ /a@x/\n"
                   "header F From:addr =~ /Support/\n", {"A", "B", "C", "D", "E"})

    def test_absent_field(self):
        self.check("header A X-None =~ /./\nheader B X-None !~ /./\n"
                   "header C Subject !~ /café/\nheader D exists:x-none\n"
                   "header E exists:SUBJECT\n", {"B", "E"})

    def test_counts(self):
        self.check("header A Received:count == 3\nheader B Received:count > 3\n"
                   "header C X-None:count < 1\nheader D Received:count >= 3\n"
                   "header E ToCc:count == 2\nheader F Received:count != 3\n",
                   {"A", "C", "D", "E"})

    def test_pseudo_fields(self):
        self.check("header A ALL =~ /^Cc: c@z\\.example$/m\n"
                   "header B EnvelopeFrom =~ /^bounce@bank\\.example$/\n"
                   "header C HELO =~ /^mta\\./\n"
                   "header D ALL:raw =~ /Subject: =\\?utf-8/\n", {"A", "B", "C", "D"})

    def test_multiple_values_joined(self):
        self.check("header A Received =~ /from a\\nfrom b\\nfrom c/\n"
                   "header B Received =~ /^from c$/m\n", {"A", "B"})


class AddressTests(unittest.TestCase):
    """The lenient address-list splitter behind :addr and :name."""

    def test_forms(self):
        self.assertEqual(split_addresses('"Doe, John" <j@x.example>, k@y.example (Kay)'),
                         [("Doe, John", "j@x.example"), ("Kay", "k@y.example")])
        self.assertEqual(split_addresses("Friends: a@x.example, B <b@x.example>;"),
                         [("", "a@x.example"), ("B", "b@x.example")])
        self.assertEqual(split_addresses('"a\\"b" <q@x.example>'), [('a"b', "q@x.example")])
        self.assertEqual(split_addresses("undisclosed-recipients:;"), [])

    def test_encoded_name_cannot_split(self):
        # A comma and a bracket decoded from an encoded word stay in the name.
        self.assertEqual(split_addresses("=?utf-8?q?bob@bank.example=2C_=3Cx=3E?= <e@evil.example>"),
                         [("bob@bank.example, <x>", "e@evil.example")])

    def test_hostile(self):
        self.assertEqual(len(split_addresses("a@b.example," * 10000)), rules.MAX_ADDRESSES)
        split_addresses("(" * 100000 + "x")
        split_addresses("<" * 100000)
        split_addresses('"' * 99999)


class BodyTests(unittest.TestCase):
    """What body, rawbody, uri and full rules see."""

    def test_body_is_normalised_text(self):
        msg = message([("Subject", "Weekly   offer"),
                       ("Content-Type", "text/html; charset=utf-8")],
                      "<p>free\n   money</p><script>hidden script</script>"
                      "<p>vi\u00adag\u200bra</p>")
        self.assertEqual(set(hits_of(
            "body A /free money/\nbody B /hidden script/\nbody C /^Weekly offer$/m\n"
            "body D /viagra/\nrawbody E /<script>/\nrawbody F /free money/\n"
            "body G /money viagra/\n", msg)),
            {"A", "C", "D", "E", "G"})

    def test_paragraphs_are_lines(self):
        msg = message([("Subject", "s")], "one\r\n  two\r\n \r\nthree")
        self.assertEqual(set(hits_of("body A /one two/\nbody B /two.three/\n"
                                     "body C /two\\sthree/\nbody D /^three$/m\n", msg)),
                         {"A", "C", "D"})

    def test_long_paragraph_is_cut(self):
        text = rules.body_text("s", "word " * 1000)
        self.assertTrue(all(len(line) <= rules.BODY_LINE for line in text.split("\n")))
        self.assertEqual(text.replace("\n", " ").split(), ["s"] + ["word"] * 1000)

    def test_uri_lines(self):
        msg = message([], "see http://a.example/x and https://b.example/y")
        self.assertEqual(set(hits_of("uri A /^https:\\/\\/b\\./\nuri B /x$/\n"
                                     "uri C /^see/\n", msg)), {"A", "B"})

    def test_full_sees_raw_bytes(self):
        msg = message([("Subject", "=?utf-8?q?caf=C3=A9?=")], "\xe9t\xe9")
        self.assertEqual(set(hits_of("full A /^Subject: =\\?utf-8/m\n"
                                     "full B /\\xc3\\xa9t/\nfull C /été/\n", msg)),
                         {"A", "B"})


class EvalTests(unittest.TestCase):
    """The built-in tests."""

    def test_from_name_other_address(self):
        rule = "eval F from_name_other_address\n"
        for value, expected in [
                ('"service@paypal.example" <x@evil.example>', {"F"}),
                ('"Bob bob@example.org" <bob@example.org>', set()),
                ('"bob@example.org" <bob@mail.example.org>', set()),
                ("Plain Name <p@example.org>", set()),
                ("p@example.org", set())]:
            self.assertEqual(set(hits_of(rule, message([("From", value)], "x"))), expected,
                             value)

    def test_html_only_and_base64(self):
        r = "eval H html_only\neval B base64_plain_text\n"
        self.assertEqual(set(hits_of(r, fixture("spam_lottery.eml"))), {"H"})
        self.assertEqual(set(hits_of(r, fixture("spam_pharma.eml"))), {"B"})
        self.assertEqual(set(hits_of(r, fixture("ham_newsletter.eml"))), set())
        utf8 = message([("Content-Type", "text/plain; charset=utf-8"),
                        ("Content-Transfer-Encoding", "base64")],
                       "Y2Fmw6kK\r\n")
        self.assertEqual(hits_of(r, utf8), {})

    def test_truncated(self):
        msg = message([("X-H%d" % i, "v") for i in range(600)], "x")
        self.assertEqual(hits_of("eval T mime_truncated\n", msg), {"T": 1.0})


class MetaTests(unittest.TestCase):
    """Meta expressions: an AST of our own, never eval()."""

    def value(self, expression, **names):
        tree = parse_expression(expression)
        return rules.compile_expression(tree)({k: float(v) for k, v in names.items()})

    def test_precedence_and_arithmetic(self):
        self.assertEqual(self.value("A || B && C", A=1), 1.0)
        self.assertEqual(self.value("(A || B) && C", A=1), 0.0)
        self.assertEqual(self.value("!A && B", B=1), 1.0)
        self.assertEqual(self.value("A + B + C >= 2", A=1, C=1), 1.0)
        self.assertEqual(self.value("A + B + C >= 2", A=1), 0.0)
        self.assertEqual(self.value("2 * A - -1"), 1.0)
        self.assertEqual(self.value("A / B"), 0.0)          # no division by zero
        self.assertEqual(self.value("(A && !B) || (C + D + E >= 2)", D=1, E=1), 1.0)
        self.assertEqual(self.value("1.5 * 2 == 3"), 1.0)
        self.assertEqual(self.value("A != B", A=1), 1.0)

    def test_syntax_errors(self):
        for bad in ["", "A &&", "(A", "A)", "A B", "A = B", "A < B < C", "A & B",
                    "__import__('os')", "A; B", "(" * 60 + "A" + ")" * 60,
                    "A" + " + A" * 1000, "A" + "+A" * 200]:
            self.assertRaises(RuleError, parse_expression, bad)

    def test_names_are_only_names(self):
        # Nothing is evaluated as Python: an unknown name is a (missing) hit.
        r = ruleset("meta M __import__ || exec || open\n")
        self.assertEqual(r.evaluate(message(body="x"))[0], {})

    def test_metas_of_metas_and_cycles(self):
        r = ruleset("body A /a/\nmeta M1 A && M2\nmeta M2 !B\nbody B /b/\n"
                    "meta C1 C2\nmeta C2 C3\nmeta C3 C1\nmeta SELF SELF || A\n")
        self.assertEqual(len([e for e in r.errors if "cycle" in e]), 1)
        self.assertIn("uses itself", " ".join(r.errors))
        self.assertNotIn("C1", r.rules)
        self.assertEqual(r.evaluate(message(body="a"))[0], {"A": 1.0, "M1": 1.0, "M2": 1.0})
        self.assertEqual(r.evaluate(message(body="ab"))[0], {"A": 1.0, "B": 1.0})

    def test_other_filters_hits(self):
        text = ("meta BAD_AUTH SPF_FAIL && !DKIM_VALID\nscore BAD_AUTH 1.5\n"
                "score SPF_FAIL 2.5\nscore DKIM_VALID -0.3\n")
        self.assertEqual(hits_of(text, message(body="x", hits={"SPF_FAIL": 0.7})),
                         {"BAD_AUTH": 1.5, "SPF_FAIL": 2.5})
        self.assertEqual(hits_of(text, message(body="x", hits={"SPF_FAIL": 0.7,
                                                               "DKIM_VALID": 0.0})),
                         {"SPF_FAIL": 2.5, "DKIM_VALID": -0.3})
        # Hits of others without a score line are left as the others scored them.
        self.assertEqual(hits_of(text, message(body="x", hits={"BAYES_50": 0.8})), {})

    def test_unknown_name_warned(self):
        r = ruleset("meta M TYPO_RULE || SPF_FAIL || BAYES_99\n")
        self.assertEqual(len(r.warnings), 1)
        self.assertIn("TYPO_RULE", r.warnings[0])


class PatternSafetyTests(unittest.TestCase):
    """Explosive shapes refused at load; allowed ones bounded."""

    REFUSED = [r"(a+)+", r"(a*)*b", r"(a|aa)*", r"(?:\w+\s?)+$", r"(x+x+)+y", r"(?:\s|.)*z",
               r"(\w)\1", r"(?P<q>a)(?P=q)", r"(a)?(?(1)b|c)", r"x\s*\s*", r"a.*b.*c",
               r"\S+@\S+", r"<a[^>]*href[^>]*>", r".*foo", r"[^<]*>", r"\d+x",
               r"(?:a|b)+c", r"(日+)+", r"(?:a{1,50}){1,50}z", "a" * 1100]

    ALLOWED = [r"\d{1,3}(?:\.\d{1,3}){3}", r"^https?://(?:[a-z0-9-]+\.)+[a-z]{2,}",
               r"\b(?:[a-z0-9-]+\.)+[a-z]{2,}\b", r"a.{0,40}b.{0,40}c", r"<a[^>]*href",
               r"\bfree\b.{0,20}\bmoney\b", r"\b(?:\w+\s)+x", r"^\s*x", r"(?:\d{1,3}){3}",
               r"\$\s?\d{1,3}(?:,\d{3})+", r"!(?:[^!\n]{0,300}!){9}", r"\d\.\d+\.\d+"]

    def test_refused(self):
        for source in self.REFUSED:
            self.assertRaises(RuleError, compile_pattern, source)

    def test_allowed(self):
        for source in self.ALLOWED:
            try:
                compile_pattern(source)
            except RuleError as e:          # pragma: no cover - the message helps
                self.fail(f"{source}: {e}")

    def test_deep_nesting(self):
        self.assertRaises(RuleError, compile_pattern, "(" * 510 + "a" + ")" * 510)
        r = ruleset("body DEEP /" + "(" * 510 + "a+" + ")" * 510 + "/\nbody OK /a/\n")
        self.assertEqual(list(r.rules), ["OK"])

    def test_refusal_in_file(self):
        r = ruleset("body NESTED /(?:\\w+\\s?)+!/\nbody FINE /fine/\n")
        self.assertEqual(list(r.rules), ["FINE"])
        self.assertIn("local.rules:1: nested repeats", r.errors[0])

    def test_unbounded_repeats_are_bounded(self):
        p = compile_pattern(r"a.*b")
        self.assertTrue(p.regex.search("a" + "x" * rules.REPEAT_CAP + "b"))
        self.assertFalse(p.regex.search("a" + "x" * (rules.REPEAT_CAP + 1) + "b"))
        self.assertTrue(compile_pattern(r"ax{2000,}").regex.search("a" + "x" * 2000))

    def test_prefilter_agrees_with_search(self):
        texts = ["Viagra here", "VIAGRA", "viaſ", "vi agra", "\u212aitten", "kitten",
                 "the BTC wallet", "bitcoin", "ab", "aaab", "x1234", "İstanbul", "ıi",
                 "Free  money", "free money", "$1,000", "mass mail", "MASSMAIL",
                 "You have won", "you've won", "ac", "abc", "CLICK HERE", "click below",
                 "xviagras viagra", "\u20ac5", "$5", "Viagra", "WIAGRA", "café", "caf!",
                 "a FREE GIFT!", "free gifts", "(cash)", "cashier", "Viagra!", "\u0130"]
        patterns = [r"(?i)\bviagra\b", r"viagra", r"(?i)kitten", r"(?i)\b(?:bitcoin|btc)\b",
                    r"a{3}b", r"x\d{4}", r"(?i)istanbul", r"(?i:free) money",
                    r"(?i)free\s?money", r"\$\d", r"(?i)mass ?mail", r"(?=.*wallet)BTC",
                    r"(?i)(?:a|b)c|ab", r"\byou(?:'ve| have) won", r"a(?:|b)c",
                    r"(?i)\bclick (?:here|below)\b", r"(?i)(?:ab|AC)", r"\bviagra\b$",
                    r"[$\u20ac]\d", r"[Vv]iagra", r"(?i)[v-x]iagra", r"[a-c]b",
                    r"(?a)\bcaf\b", r"\bcaf\b", r"(?i)\b(?:free gift|cash)\b",
                    r"(?i)\bfree gift\b", r"\bViagra\b", r"(?i)\bi\b"]
        for source in patterns:
            p = compile_pattern(source)
            plain = re.compile(source)
            for text in texts:
                target = rules.Target(message(body=text))
                body = target.text("body")
                expected = bool(plain.search(body))
                passes = p.needs is None or any(
                    lit in (target.folded("body") if folded else body)
                    and (target.words("body") is None or set(words) <= target.words("body"))
                    for lit, folded, words in p.needs)
                self.assertTrue(passes or not expected, (source, text, p.needs))
                self.assertEqual(bool(p.regex.search(body)), expected, (source, text))
                self.assertEqual(rules.search(p, target, "body"), expected, (source, text))


class BudgetTests(unittest.TestCase):
    """The time budget per message, on a fake timer."""

    def ticking(self, step):
        now = [0.0]

        def timer():
            now[0] += step
            return now[0]
        return timer

    def test_timeout_stops_and_is_noted(self):
        text = "".join(f"body R{i} /x/\n" for i in range(10))
        text += "meta LATE R9\nmeta EARLY R0 && !SPF_FAIL\nmeta OTHER SPF_FAIL\n"
        r = ruleset(text)
        # Each timer call advances 0.1 s: the start, then one call per rule.
        hits, timed_out = r.evaluate(message(body="x", hits={"SPF_FAIL": 1.0}), budget=0.35,
                                     timer=self.ticking(0.1), check_every=1)
        self.assertTrue(timed_out)
        self.assertEqual(hits, {"R0": 1.0, "R1": 1.0, "R2": 1.0, "OTHER": 1.0,
                                rules.TIMEOUT_HIT: 0.0})

    def test_checked_every_few_rules(self):
        r = ruleset("".join(f"body R{i:02} /x/\n" for i in range(40)))
        hits, timed_out = r.evaluate(message(body="x"), budget=0.35, timer=self.ticking(0.1))
        self.assertTrue(timed_out)
        self.assertEqual(len(hits), 3 * rules.CHECK_EVERY + 1)

    def test_no_timeout(self):
        r = ruleset("body R /x/\n")
        self.assertEqual(r.evaluate(message(body="x"), budget=1, timer=self.ticking(0.1)),
                         ({"R": 1.0}, False))

    def test_parse_budget(self):
        self.assertEqual(rules.parse_budget("0.2s"), 0.2)
        self.assertEqual(rules.parse_budget("200ms"), 0.2)
        self.assertEqual(rules.parse_budget(1), 1.0)
        self.assertEqual(rules.parse_budget(".5"), 0.5)
        self.assertEqual(rules.parse_budget("1m"), 60)
        for bad in ("", "fast", "-1s", "0", "100s", "2m", True):
            self.assertRaises(ValueError, rules.parse_budget, bad)


class HostileTests(unittest.TestCase):
    """Hostile messages against hostile-looking (but allowed) rules finish:
    with the input bounds and repeat caps, no match explodes."""

    RULES = ("rawbody A /<a[^>]*href/i\n"
             "body B /a.{0,60}b.{0,60}c/\n"
             "body C /\\bfree\\b.{0,20}\\bmoney\\b/i\n"
             "uri D /^https?:\\/\\/(?:[a-z0-9-]+\\.)+[a-z]{2,}\\/q/\n"
             "full E /\\bfilename=\"?[^\"\\r\\n;]{1,200}\\.exe/i\n"
             "rawbody F /x\\s{0,1000}y/\n"
             "header G Subject =~ /\\b(?:\\w+\\s)+!/\n"
             "body H /!(?:[^!\\n]{0,300}!){9}/\n")

    def run_all(self, msg):
        r = ruleset(self.RULES)
        self.assertEqual(r.errors, [])
        return r.evaluate(msg, budget=60)

    def test_bombs(self):
        self.run_all(message([("Subject", "a " * 5000)],
                             "<a" * 40000 + "ab" * 40000 + "free " * 20000 + "x" + " " * 50000))
        self.run_all(message([], " ".join("http://" + "a." * 900 + "x" for _ in range(80))))
        self.run_all(message([("Content-Type", "multipart/mixed; boundary=b")],
                             "--b\r\nContent-Disposition: attachment; filename=\""
                             + "a" * 100000 + "\r\n--b--\r\n"))
        self.run_all(message([], "!" + "a!" * 100000))

    def test_header_flood(self):
        raw = b"X-A: a\r\n" + b" b\r\n" * 200000 + b"To: x@y.example\r\n" * 20000 + b"\r\nx"
        hits, _ = load_rules().evaluate(ScannedMessage.parse(raw))
        self.assertIn("MIME_TRUNCATED", hits)

    def test_mime_bombs(self):
        nested = (b"".join(b"Content-Type: multipart/mixed; boundary=b%d\r\n\r\n--b%d\r\n"
                           % (i, i) for i in range(2000))
                  + b"Content-Type: text/plain\r\n\r\nviagra"
                  + b"".join(b"\r\n--b%d--" % i for i in reversed(range(2000))) + b"\r\n")
        hits, _ = load_rules().evaluate(ScannedMessage.parse(b"Subject: x\r\n" + nested))
        self.assertIn("MIME_TRUNCATED", hits)
        siblings = (b"Content-Type: multipart/mixed; boundary=b\r\n\r\n"
                    + b"--b\r\nContent-Type: text/html\r\n\r\n<p>x</p>\r\n" * 100000
                    + b"--b--\r\n")
        hits, _ = load_rules().evaluate(ScannedMessage.parse(siblings))
        self.assertIn("MIME_TRUNCATED", hits)

    def test_bad_encodings(self):
        raw = (b"Subject: =?x-unknown?B?AAAA?= \xff\xfe\r\nContent-Type: text/plain; "
               b"charset=nonsense\r\nContent-Transfer-Encoding: base64\r\n"
               b"Content-Transfer-Encoding: quoted-printable\r\n\r\n====\r\nA===\r\n=\r\n=4")
        load_rules().evaluate(ScannedMessage.parse(raw))


class FilterTests(unittest.TestCase):
    """RulesFilter: the IContentFilter, its thread, reload, the factory."""

    def write(self, text):
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(text)
        return path

    def test_interface_and_result(self):
        f = RulesFilter([self.write("body A /x/\nscore SPF_FAIL 2.5\n")],
                        default_rules=False, run_in_thread=sync)
        self.assertTrue(IContentFilter.providedBy(f))
        self.assertEqual(f.name, "rules")
        result = self.successResultOf(f.scan(message(body="x", hits={"SPF_FAIL": 1}), None))
        self.assertIsInstance(result, ContentResult)
        self.assertEqual(result.hits, {"A": 1.0, "SPF_FAIL": 2.5})
        self.assertIsNone(self.successResultOf(f.scan(message(body="y"), None)))

    def test_hits_copied_before_the_thread(self):
        calls = []
        f = RulesFilter([self.write("meta M SPF_FAIL && !LATER\n")], default_rules=False,
                        run_in_thread=lambda fn, *a: calls.append((fn, a)) or defer.Deferred())
        msg = message(body="x", hits={"SPF_FAIL": 0})
        f.scan(msg, None)
        msg.facts["hits"]["LATER"] = 1.0
        fn, args = calls[0]
        self.assertEqual(fn(*args), ({"M": 1.0}, False))

    def test_hits_attribute(self):
        msg = message(body="x")
        msg.hits = {"BAYES_99": 0.0}
        self.assertEqual(hits_of("meta M BAYES_99\nscore BAYES_99 3\n", msg),
                         {"M": 1.0, "BAYES_99": 3.0})

    @defer.inlineCallbacks
    def test_runs_in_a_worker_thread(self):
        seen = []

        def record(target):
            seen.append(threading.current_thread())
            return True
        rules.EVALS["test_record_thread"] = record
        self.addCleanup(rules.EVALS.pop, "test_record_thread")
        f = RulesFilter([self.write("eval T test_record_thread\n")], default_rules=False)
        result = yield f.scan(message(body="x"), None)
        self.assertEqual(result.hits, {"T": 1.0})
        self.assertNotEqual(seen, [threading.current_thread()])
        self.assertEqual(len(seen), 1)

    def test_timeout_logged(self):
        now = [0.0]

        def timer():
            now[0] += 1
            return now[0]
        f = RulesFilter([self.write("body A /x/\nbody B /x/\n")], default_rules=False,
                        run_in_thread=sync, timer=timer, time_budget=0.5)
        result = self.successResultOf(f.scan(message(body="x"), None))
        self.assertEqual(result.hits, {rules.TIMEOUT_HIT: 0.0})
        self.flushLoggedErrors()

    def test_reload(self):
        path = self.write("body A /x/\n")
        f = RulesFilter([path], default_rules=False, run_in_thread=sync)
        with open(path, "w") as out:
            out.write("body B /x/\nbody BROKEN /(/\n")
        ruleset = self.successResultOf(f.reload())
        self.assertIs(f.ruleset, ruleset)
        self.assertEqual(len(ruleset.errors), 1)
        self.assertEqual(self.successResultOf(f.scan(message(body="x"), None)).hits,
                         {"B": 1.0})

    def test_reload_failure_keeps_rules(self):
        f = RulesFilter([self.write("body A /x/\n")], default_rules=False, run_in_thread=sync)
        old = f.ruleset
        f._run_in_thread = lambda *a: defer.fail(RuntimeError("boom"))
        self.assertIs(self.successResultOf(f.reload()), old)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_factory(self):
        base = self.mktemp()
        os.makedirs(base)
        with open(os.path.join(base, "local.rules"), "w") as out:
            out.write("body LOCAL /x/\n")

        class Section:
            enabled, default_rules, files, time_budget = True, False, ["local.rules"], "150ms"

        class Antispam:
            rules = Section()

        class Config:
            antispam = Antispam()
            path = os.path.join(base, "mailappliance.toml")

        made = rules.filters(Config(), None, None)
        self.assertEqual(len(made), 1)
        self.assertEqual(made[0].time_budget, 0.15)
        self.assertEqual(list(made[0].ruleset.rules), ["LOCAL"])
        made = rules.filters(Config(), None, None, base_dir=self.mktemp())
        self.assertEqual(len(made[0].ruleset.errors), 1)
        Section.enabled = False
        self.assertEqual(rules.filters(Config(), None, None), [])


class DefaultRulesTests(unittest.TestCase):
    """The built-in rules: clean, sized, and right about the fixtures."""

    def setUp(self):
        self.rules = load_rules()

    def test_clean(self):
        self.assertEqual(self.rules.errors, [])
        self.assertEqual(self.rules.warnings, [])
        shown = [n for n in self.rules.rules if not n.startswith("__")]
        self.assertTrue(40 <= len(shown) <= 100, len(shown))
        for name in shown:
            self.assertTrue(self.rules.describe(name), name)
        for band in ("00", "05", "20", "40", "50", "60", "80", "95", "99"):
            self.assertIn("BAYES_" + band, self.rules.scores)

    def total(self, name, others=None, **envelope):
        msg = fixture(name, **envelope)
        msg.facts["hits"] = dict(others or {})
        hits, timed_out = self.rules.evaluate(msg)
        self.assertFalse(timed_out)
        # As the content scan adds them up: ours replace the others' scores.
        return sum({**msg.facts["hits"], **hits}.values()), hits

    def test_ham_scores_low(self):
        for name in ("ham_personal.eml", "ham_newsletter.eml"):
            score, hits = self.total(name, helo="mx.example.org")
            self.assertLess(score, 1.0, (name, hits))
            score, hits = self.total(name, {"SPF_PASS": 0, "DKIM_VALID": 0, "DMARC_PASS": 0,
                                            "BAYES_00": 0}, helo="mx.example.org")
            self.assertLess(score, -2.0, (name, hits))

    def test_spam_scores_high(self):
        score, hits = self.total("spam_lottery.eml", helo="localhost")
        self.assertGreater(score, 10, hits)
        for name in ("LOTTERY_TERMS", "URI_NUMERIC_HOST", "HTML_ONLY", "NO_MESSAGE_ID",
                     "SUBJECT_ALL_CAPS", "REPLY_TO_FREEMAIL", "DATE_MALFORMED"):
            self.assertIn(name, hits)
        score, hits = self.total("spam_pharma.eml")
        self.assertGreater(score, 10, hits)
        for name in ("PHARMA_NAMES", "URI_SHORTENER", "FROM_NAME_FOREIGN_ADDR",
                     "BASE64_PLAIN_TEXT", "SUBJECT_B64_NEEDLESS", "SPAM_TOPICS_SEVERAL"):
            self.assertIn(name, hits)

    def test_some_rules(self):
        cases = [
            ("URI_CREDENTIALS", [], "see http://paypal.example@evil.example/login"),
            ("INVISIBLE_IN_WORDS", [("Content-Type", "text/plain; charset=utf-8")],
             "buy vi\u200bagra"),
            ("PHARMA_NAMES", [("Content-Type", "text/plain; charset=utf-8")],
             "buy vi\u200bagra"),
            ("SHOUTING_LINE", [], "hello\n\nTHIS IS A VERY IMPORTANT MESSAGE FOR YOU, READ IT NOW\n"),
            ("EXCLAIM_MANY", [], "a! b! c! d! e! f! g! h! i! j!"),
            ("SEXTORTION", [], "I recorded you with your webcam. Pay 0.1 BTC."),
            ("MANY_RECEIVED", [("Received", "from x")] * 16, "x"),
            ("ATTACH_PROGRAM", [("Content-Type", "multipart/mixed; boundary=b")],
             "--b\r\nContent-Type: application/octet-stream\r\n"
             "Content-Disposition: attachment; filename=\"invoice.pdf.exe\"\r\n\r\nAA\r\n--b--\r\n"),
            ("URI_PUNYCODE", [], "http://xn--pypal-4ve.example/"),
            ("GIFT_CARD_REQUEST", [], "Please buy three Steam cards for me today"),
        ]
        for name, headers, body in cases:
            msg = message([("Subject", "s")] + headers, body)
            self.assertIn(name, self.rules.evaluate(msg)[0], name)
        self.assertNotIn("SHOUTING_LINE", self.rules.evaluate(
            message([("Subject", "s")], "Hello THIS IS A VERY IMPORTANT MESSAGE FOR YOU, READ IT"))[0])

    def test_other_filters_join(self):
        score, hits = self.total("ham_personal.eml", {"SPF_FAIL": 0, "DKIM_NONE": 0,
                                                      "BAYES_99": 0, "RCVD_IN_DNSBL": 0})
        self.assertEqual(hits["SPF_FAIL"], 2.0)
        self.assertIn("AUTH_FAILED_BOTH", hits)
        self.assertIn("LISTED_AND_BAYES", hits)
        self.assertGreater(score, 5)


class OnTheMXTests(ApplianceMixin, unittest.TestCase):
    """The rules as the running MX's content filter (in its ContentScan)."""

    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        self.assertIn("scan_timeout", CONTENT_ON)
        yield self.start_appliance(extra=CONTENT_ON)

    def use_rules(self, text):
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(text)
        self.app.content_scan.filters = [RulesFilter([path], default_rules=False)]

    def send(self, body):
        c = RawClient(self.port)
        try:
            c.code()
            c.cmd("EHLO client.ext.test")
            c.cmd("MAIL FROM:<sender@ext.test>")
            c.cmd("RCPT TO:<bob@example.test>")
            c.cmd("DATA")
            c.send(b"From: <sender@ext.test>\r\nSubject: offer\r\n\r\n" + body + b"\r\n.\r\n")
            code, lines = c.reply()
            c.cmd("QUIT")
            return f"{code} {lines[0]}"
        finally:
            c.close()

    def junk(self):
        new = os.path.join(self.maildir("bob"), ".Junk", "new")
        return [open(os.path.join(new, n), "rb").read() for n in sorted(os.listdir(new))] \
            if os.path.isdir(new) else []

    @defer.inlineCallbacks
    def test_spam_refused(self):
        self.use_rules("body PILLS /cheap pills/i\nscore PILLS 20\n")
        reply = yield self.in_thread(self.send, b"Cheap  PILLS here")
        self.assertTrue(reply.startswith("550 5.7.1"), reply)
        yield self.settle()
        self.assertEqual(self.delivered("bob"), [])
        self.assertEqual(self.junk(), [])

    @defer.inlineCallbacks
    def test_spam_tagged_into_junk_and_ham_delivered(self):
        self.use_rules("body PILLS /cheap pills/i\nscore PILLS 6\nbody __X /x/\n")
        reply = yield self.in_thread(self.send, b"cheap pills")
        self.assertTrue(reply.startswith("250 "), reply)
        reply = yield self.in_thread(self.send, b"a letter")
        self.assertTrue(reply.startswith("250 "), reply)
        yield self.settle()
        [spam] = self.junk()
        self.assertIn(b"X-Spam-Flag: YES", spam)
        self.assertIn(b"tests=PILLS", spam)
        [ham] = self.delivered("bob")
        self.assertIn(b"a letter", ham)
        self.assertNotIn(b"PILLS", ham)

    @defer.inlineCallbacks
    def test_hostile_message_accepted(self):
        self.use_rules(HostileTests.RULES)
        body = b"\r\n".join([b"<a" * 450] * 35 + [b"ab" * 450] * 35 + [b"free " * 180] * 20)
        reply = yield self.in_thread(self.send, body)
        self.assertTrue(reply.startswith("250 "), reply)
