"""Tests for the list server's authorization scenarios (mailbox_appliance.lists.scenario).

Parsing (good files, each kind of error, bounds, hostile regular
expressions), every condition and its negation, authentication methods,
actions and modifiers, first match and default deny, fail closed, the
library's lookup order and cache, the shipped files, and the scenario
cases of the list acceptance tests.
"""

import os
from email.message import Message
from email.parser import Parser

from twisted.internet import defer
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from mailbox_appliance.lists import scenario as sc
from mailbox_appliance.lists.scenario import (
    DEFAULTS, Decision, IScenarioContext, Scenario, ScenarioError, ScenarioLibrary,
    StaticScenarioContext, compile_scenario, regex_problem, strongest)

DOMAIN = "lists.example.org"
OLGA, MO, ALICE, BOB = "olga@example.net", "mo@example.net", "alice@a.example", "bob@b.example"
ROOT = "root@lists.example.org"


def team(operation="send", sender=ALICE, method="smtp", **kw):
    """The acceptance fixture's list ``team``."""
    kw.setdefault("members", [ALICE, BOB])
    kw.setdefault("owners", [OLGA])
    kw.setdefault("editors", [MO])
    kw.setdefault("listmasters", [ROOT])
    return StaticScenarioContext(operation, sender, "team", DOMAIN, method, **kw)


def message(text):
    return Parser().parsestr(text)


class Base(unittest.TestCase):

    def decide(self, scenario, ctx, **kw):
        if isinstance(scenario, str):
            scenario = compile_scenario(scenario, f"{ctx.operation}.test")
        return self.successResultOf(scenario.evaluate(ctx, **kw))

    def action(self, text, ctx, **kw):
        return self.decide(text, ctx, **kw).action

    def error(self, text, name="send.test", resolve=None):
        e = self.assertRaises(ScenarioError, compile_scenario, text, name, resolve)
        return str(e)


class ParsingTests(Base):

    def test_good_file(self):
        s = compile_scenario(
            "title members only\n"
            "title.fr membres\n"
            "# a comment\n"
            "\n"
            "   is_subscriber( [listname] , [sender] )   smtp , md5 ->  do_it  # trailing\r\n"
            "!is_owner([listname],[sender]) smime->reject(reason='no'),quiet\n"
            "true() -> reject(tt2=\"refused.tt2\")\n", "send.x")
        self.assertEqual(s.title, "members only")
        self.assertEqual(s.name, "send.x")
        self.assertEqual(s.operation, "send")
        self.assertEqual(len(s.rules), 3)
        r1, r2, r3 = s.rules
        self.assertEqual(r1.where, "send.x:5")
        self.assertEqual(r1.condition.name, "is_subscriber")
        self.assertEqual(r1.methods, {"smtp", "dkim", "md5"})     # compatibility rule
        self.assertTrue(r2.condition.negate)
        self.assertEqual(r2.action.reason, "no")
        self.assertEqual(r2.action.modifiers, {"quiet"})
        self.assertEqual(r2.methods, {"smime"})
        self.assertEqual(r3.methods, {"smtp", "dkim"})            # missing = smtp
        self.assertEqual(r3.action.tt2, "refused.tt2")

    def test_empty_file_denies(self):
        d = self.decide(compile_scenario("# nothing\n", "send.x"), team())
        self.assertEqual((d.action, d.default, d.rule), ("reject", True, None))

    def test_errors(self):
        cases = [
            ("nosuch() -> do_it", "send.test:1: unknown condition 'nosuch'"),
            ("custom(x,[sender]) -> do_it", "send.test:1: custom conditions are not supported"),
            ("true(1) -> do_it", "send.test:1: true takes 0 arguments, not 1"),
            ("equal([sender]) -> do_it", "send.test:1: equal takes 2 arguments, not 1"),
            ("is_listmaster([sender],x) -> do_it",
             "send.test:1: is_listmaster takes 1 argument, not 2"),
            ("equal(a,b,c,d,e) -> do_it", "send.test:1: too many arguments to equal"),
            ("equal(,b) -> do_it", "send.test:1: expected an argument to equal"),
            ("true -> do_it", "send.test:1: expected '(' after true, found '-> do_it'"),
            ("equal([sender],'x) -> do_it", "send.test:1: unterminated quoted string"),
            ("match([sender],/x) -> do_it", "send.test:1: unterminated /regular expression/"),
            ("match([sender],'x') -> do_it",
             "send.test:1: match needs a /regular expression/ as its second argument"),
            ("equal([sender],/x/) -> do_it",
             "send.test:1: a /regular expression/ is only allowed as match's second argument"),
            ("equal([nobody],x) -> do_it", "send.test:1: unknown variable [nobody]"),
            ("equal([sender,x) -> do_it", "send.test:1: bad variable '[sender,x) -> do_it'"),
            ("equal([list],x) -> do_it", "send.test:1: [list] needs a ->key"),
            ("equal([sender->x],x) -> do_it", "send.test:1: [sender] takes no ->key"),
            ("equal([msg_header->Bad:F],x) -> do_it",
             "send.test:1: bad header field name 'Bad:F'"),
            ("equal([list->a.b],x) -> do_it", "send.test:1: bad key 'a.b'"),
            ("equal([msg_part->body],x) -> do_it",
             "send.test:1: [msg_part->...] knows only 'type'"),
            ("equal([sender][0],x) -> do_it",
             "send.test:1: only [msg_header->...] takes an [index]"),
            ("equal([msg_header->To]x,y) -> do_it",
             "send.test:1: a many-valued variable must stand alone in an argument"),
            ("search([sender],[sender]) -> do_it",
             "send.test:1: search: the filter must be a plain name"),
            ("search(../x,[sender]) -> do_it",
             "send.test:1: search: the filter must be a plain name"),
            ("verify_netmask(10.0.0/33) -> do_it",
             "send.test:1: verify_netmask: '10.0.0/33' is not a network"),
            ("true() smtp,pgp -> do_it", "send.test:1: unknown authentication method 'pgp'"),
            ("true() smtp md5 -> do_it",
             "send.test:1: expected ',' between methods or '->', found 'md5 -> do_it'"),
            ("true() smtp", "send.test:1: expected ',' between methods or '->', "
                            "found 'end of line'"),
            ("true() ", "send.test:1: expected an authentication method or '->', "
                        "found 'end of line'"),
            ("true() -> go", "send.test:1: unknown action 'go'"),
            ("true() -> owner", "send.test:1: action 'owner' is not allowed for send"),
            ("true() -> listmaster", "send.test:1: action 'listmaster' is not allowed for send"),
            ("true() -> reject(why='x')", "send.test:1: reject takes reason= or tt2=, not why="),
            ("true() -> reject(reason=x)", "send.test:1: reason= needs a quoted value"),
            ("true() -> reject(reason='../x')", "send.test:1: bad reason '../x'"),
            ("true() -> request_auth([listname])",
             "send.test:1: request_auth takes [email] or [sender]"),
            ("true() -> do_it(x)", "send.test:1: do_it takes no parameter"),
            ("true() -> do_it,loud", "send.test:1: unknown modifier 'loud'"),
            ("true() -> reject,notify", "send.test:1: notify goes with do_it only"),
            ("true() -> do_it extra",
             "send.test:1: expected ',' before a modifier, or end of line, found 'extra'"),
            ("true() -> do_it\x1b", "send.test:1: control character"),
            ("# ok\ntrue() -> do_it\ninclude(../../etc/passwd)",
             "send.test:3: bad include name '../../etc/passwd'"),
            ("include(missing)", "send.test:1: included scenario send.missing not found"),
        ]
        for text, expected in cases:
            self.assertEqual(self.error(text), expected, text)

    def test_action_allowed_by_operation(self):
        self.assertEqual(self.error("true() -> request_auth", "info.x"),
                         "info.x:1: action 'request_auth' is not allowed for info")
        self.assertEqual(self.error("true() -> editorkey", "subscribe.x"),
                         "subscribe.x:1: action 'editorkey' is not allowed for subscribe")
        compile_scenario("true() -> listmaster", "create_list.x")
        compile_scenario("true() -> owner", "unsubscribe.x")

    def test_bad_names(self):
        self.assertEqual(self.error("true() -> do_it", "nosuchop.x"),
                         "nosuchop.x:0: the name must be OPERATION.NAME with a known operation")
        self.assertEqual(self.error("true() -> do_it", "send"),
                         "send:0: the name must be OPERATION.NAME with a known operation")

    def test_bounds(self):
        self.assertEqual(self.error(b"#" * (sc.MAX_FILE_BYTES + 1)),
                         f"send.test:0: file larger than {sc.MAX_FILE_BYTES} bytes")
        self.assertEqual(self.error("true() -> do_it\n" + "#" * (sc.MAX_LINE + 1)),
                         f"send.test:2: line longer than {sc.MAX_LINE} characters")
        self.assertEqual(self.error("true() -> do_it\n" * (sc.MAX_RULES + 1)),
                         f"send.test:{sc.MAX_RULES + 1}: more than {sc.MAX_RULES} rules")
        self.assertEqual(self.error("equal([sender],'%s') -> do_it" % ("x" * 300)),
                         "send.test:1: literal too long")
        self.assertEqual(self.error("equal(" + "a[sender]" * 5 + ",x) -> do_it"),
                         "send.test:1: argument has too many pieces")
        self.assertEqual(self.error("match([sender],/%s/) -> do_it" % ("x" * 300)),
                         "send.test:1: regular expression longer than 256 characters")
        self.assertEqual(self.error(b"true() -> do_it\n\xff\n"), "send.test:2: not valid UTF-8")

    def test_hostile_regexes(self):
        nested = "nested repetition in regular expression (catastrophic backtracking)"
        cases = {
            "(a+)+$": nested,
            "(a|a)*b": nested,
            "((a*)?)+": nested,
            "(a*)?(b*)?(c*)?": "more than 2 repeating quantifiers in regular expression",
            "((a*))*": nested,
            "(?:x|y){2,5}": nested,
            "a*a*a*b": "more than 2 repeating quantifiers in regular expression",
            "a?a?a?a?a?aaaaa": "more than 4 optional parts in regular expression",
            "(a)\\1": "backreferences are not allowed in a regular expression",
            "(?=a)b": "only (?:...) groups are allowed in a regular expression",
            "(?P<n>a)": "only (?:...) groups are allowed in a regular expression",
            "a{1000}": "repetition bound above 100 in regular expression",
            "a{5,2}": "bad repetition bounds in regular expression",
            "**": "misplaced quantifier in regular expression",
            "a**": "misplaced quantifier in regular expression",
            "(ab": "unbalanced ( in regular expression",
            "ab)": "unbalanced ) in regular expression",
            "[ab": "unterminated [ in regular expression",
            "ab\\": "regular expression ends with a backslash",
        }
        for pattern, problem in cases.items():
            self.assertEqual(regex_problem(pattern), problem, pattern)
        self.assertEqual(self.error("match([sender],/(a+)+$/) -> do_it"), "send.test:1: " + nested)
        for fine in ("@(.*\\.)?example\\.org$", "[domain]$", "^[^@]+@b\\.example$",
                     "(?:foo|bar)x", "a{2,10}b", "a*?b", "x[)(|*]y", "^\\s*multipart\\/"):
            self.assertIsNone(regex_problem(fine), fine)

    def test_includes(self):
        files = {
            "send.members": "is_subscriber([listname],[sender]) -> do_it\n",
            "send.loop": "include(loop2)\n",
            "send.loop2": "include(send.loop)\n",
            "send.deep": "include(send.deep1)\n",
            "send.deep1": "include(send.deep2)\n", "send.deep2": "include(send.deep3)\n",
            "send.deep3": "include(send.deep4)\n", "send.deep4": "include(send.deep5)\n",
            "send.deep5": "true() -> do_it\n",
            "send.broken": "\n\nnosuch() -> do_it\n",
        }
        s = compile_scenario("include(members)\ntrue() -> reject(reason='members_only')\n",
                             "send.x", files.get)
        self.assertEqual([r.where for r in s.rules], ["send.members:1", "send.x:2"])
        self.assertEqual(self.action(s, team()), "do_it")
        self.assertEqual(self.decide(s, team(sender="eve@e.example")).reason, "members_only")
        self.assertEqual(self.error("include(loop)", resolve=files.get),
                         "send.loop2:1: include loop through send.loop")
        self.assertEqual(self.error("include deep", resolve=files.get),
                         "send.deep3:1: includes nested too deep")
        self.assertEqual(self.error("include(broken)", resolve=files.get),
                         "send.broken:3: unknown condition 'nosuch'")

    def test_operation_header_prepended(self):
        files = {"include.send.header": "equal([sender],'spam@x.example') -> reject,quiet\n"}
        s = compile_scenario("true() -> do_it\n", "send.x", files.get)
        self.assertEqual([r.where for r in s.rules], ["include.send.header:1", "send.x:1"])
        d = self.decide(s, team(sender="SPAM@x.example"))
        self.assertEqual((d.action, d.quiet), ("reject", True))
        self.assertEqual(self.action(s, team()), "do_it")


class ConditionTests(Base):

    def check(self, condition, ctx, expected):
        """The condition, and its negation, decide as expected."""
        for negate, want in (("", expected), ("!", not expected)):
            text = f"{negate}{condition} smtp,dkim,md5,smime -> do_it"
            got = self.action(text, ctx) == "do_it"
            self.assertEqual(got, want, f"{text} with sender {ctx.sender}")

    def test_true(self):
        self.check("true()", team(), True)
        self.check("all()", team(), True)

    def test_equal(self):
        self.check("equal([sender],'ALICE@A.example')", team(), True)
        self.check("equal([sender],[email])", team(email="alice@A.EXAMPLE"), True)
        self.check("equal([sender],[email])", team(email=BOB), False)
        self.check("equal([listname],team)", team(), True)
        self.check("equal([listname]@[domain],'team@lists.example.org')", team(), True)
        self.check("equal([listname]-request,team)", team(), False)
        self.check("equal([listname]@[domain],team@lists.example.org)", team(), True)
        self.check("equal([sender],'')", team(sender=None), True)

    def test_equal_many_values(self):
        msg = message("X-Tag: one\nX-Tag: two\n\nbody\n")
        self.check("equal([msg_header->X-Tag],two)", team(message=msg), True)
        self.check("equal([msg_header->X-Tag][0],two)", team(message=msg), False)
        self.check("equal([msg_header->X-Tag][-1],two)", team(message=msg), True)
        self.check("equal([msg_header->X-Tag][5],'')", team(message=msg), True)
        self.check("equal([msg_header->X-Tag],two)", team(), False)

    def test_match(self):
        self.check("match([sender],/@a\\.example$/)", team(), True)
        self.check("match([sender],/@A\\.EXAMPLE$/)", team(), True)      # case-insensitive
        self.check("match([sender],/@b\\.example$/)", team(), False)
        self.check("match([sender],/[domain]$/)", team(sender="x@lists.example.org"), True)
        self.check("match([sender],/[domain]$/)", team(sender="x@listsXexample.org"), False)

    def test_match_value_capped(self):
        msg = message("Subject: " + "a" * 1200 + "END\n\n")
        self.check("match([msg_header->Subject],/END/)", team(message=msg), False)
        self.check("match([msg_header->Subject],/^a{100}/)", team(message=msg), True)

    def test_match_decoded_header(self):
        msg = message("Subject: =?utf-8?B?w6l0w6k=?=\n\n")
        self.check("match([msg_header->Subject],/^\u00e9t\u00e9$/)", team(message=msg), True)

    def test_roles(self):
        self.check("is_subscriber([listname],[sender])", team(), True)
        self.check("is_subscriber([listname],[sender])", team(sender="ALICE@a.example"), True)
        self.check("is_subscriber(team,[sender])", team(), True)
        self.check("is_subscriber(team@lists.example.org,[sender])", team(), True)
        self.check("is_subscriber([listname],[sender])", team(sender="eve@e.example"), False)
        self.check("is_subscriber([listname],[sender])", team(sender=None), False)
        self.check("is_owner([listname],[sender])", team(sender=OLGA), True)
        self.check("is_owner([listname],[sender])", team(), False)
        self.check("is_editor([listname],[sender])", team(sender=MO), True)
        self.check("is_editor([listname],[sender])", team(sender=OLGA), False)
        self.check("is_listmaster([sender])", team(sender=ROOT), True)
        self.check("is_listmaster([sender])", team(), False)

    def test_less_than(self):
        ctx = team(variables={("list", "total"): 9})
        self.check("less_than([list->total],10)", ctx, True)
        self.check("less_than([list->total],9)", ctx, False)
        self.check("less_than(abc,abd)", ctx, True)

    def test_older_newer(self):
        ctx = team(now=10_000_000, variables={("subscriber", "date"): 10_000_000 - 40 * 86400})
        self.check("older([subscriber->date],[current_date]-30d)", ctx, True)
        self.check("newer([subscriber->date],[current_date]-30d)", ctx, False)
        self.check("older([subscriber->date],[current_date]-1m2w)", ctx, False)
        self.check("older(100,100)", ctx, True)
        self.check("newer(101,100)", ctx, True)
        self.check("older(100,50+1min)", ctx, True)
        self.check("older(200,50+1min)", ctx, False)

    def test_date_variables(self):
        msg = message("Date: Thu, 01 Jan 1970 00:16:40 +0000\n\n")
        self.check("equal([date],1000)", team(message=msg, now=5), True)
        self.check("equal([date],5)", team(now=5), True)
        self.check("equal([current_date],5)", team(message=msg, now=5), True)

    def test_durations(self):
        self.assertEqual(sc.duration_seconds("1y2m3w4d5h6min7sec"),
                         365 * 86400 + 60 * 86400 + 21 * 86400 + 4 * 86400 + 5 * 3600 + 367)
        self.assertEqual(sc.duration_seconds("90"), 90)
        self.assertEqual(sc.date_seconds("100+1h"), 3700)
        for bad in ("", "1x", "d", "1d1y"):
            self.assertRaises(ValueError, sc.duration_seconds, bad)

    def test_search(self):
        ctx = team(filters={"blocked": ["eve@e.example"]})
        self.check("search(blocked,[sender])", team(sender="EVE@e.example", filters={
            "blocked": ["eve@e.example"]}), True)
        self.check("search(blocked,[sender])", ctx, False)

    def test_verify_netmask(self):
        self.check("verify_netmask(192.0.2.0/24)", team(), False)      # mail: no client
        self.check("verify_netmask(192.0.2.0/24)", team(remote_addr="192.0.2.9"), True)
        self.check("verify_netmask(192.0.2.0/24)", team(remote_addr="198.51.100.1"), False)
        self.check("verify_netmask('2001:db8::/32')", team(remote_addr="2001:db8::1"), True)

    def test_message_variables(self):
        multi = message("To: team@lists.example.org\nContent-Type: multipart/mixed; boundary=b\n"
                        "\n--b\nContent-Type: text/plain\n\nx\n--b\nContent-Type: image/png\n\n"
                        "y\n--b--\n")
        self.check("equal([msg_part->type],image/png)", team(message=multi), True)
        self.check("equal([msg_part->type],text/html)", team(message=multi), False)
        self.check("equal([is_bcc],0)", team(message=multi), True)
        bcc = message("To: someone@x.example\nCc: Other <o@x.example>\n\nhi\n")
        self.check("equal([is_bcc],1)", team(message=bcc), True)
        self.check("equal([msg_encrypted],smime)", team(message=bcc), False)
        enc = message('Content-Type: application/pkcs7-mime; smime-type=enveloped-data\n\nx\n')
        self.check("equal([msg_encrypted],smime)", team(message=enc), True)
        signed = message('Content-Type: application/pkcs7-mime; smime-type=signed-data\n\nx\n')
        self.check("equal([msg_encrypted],smime)", team(message=signed), False)

    def test_context_variables(self):
        ctx = team(variables={("list", "status"): "open", ("custom_vars", "topic"): "x",
                              ("user", "lang"): "fr", ("env", "REMOTE_ADDR"): "192.0.2.1"})
        self.check("equal([custom_vars->topic],x)", ctx, True)
        self.check("equal([user->lang],fr)", ctx, True)
        self.check("equal([env->REMOTE_ADDR],192.0.2.1)", ctx, True)
        self.check("equal([subscriber->reception],'')", ctx, True)      # unknown = empty


class _SlowContext(StaticScenarioContext):
    """Answers membership questions later, as the SQLite-backed context will."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.pending = []

    def is_subscriber(self, list_address, address):
        d = defer.Deferred()
        self.pending.append((d, super().is_subscriber(list_address, address)))
        return d


class EvaluationTests(Base):

    def test_interface(self):
        verifyObject(IScenarioContext, team())

    def test_strongest(self):
        self.assertEqual(strongest([]), "smtp")
        self.assertEqual(strongest(["dkim", "smtp"]), "dkim")
        self.assertEqual(strongest(["dkim", "smime", "md5"]), "smime")
        self.assertRaises(ValueError, strongest, ["pgp"])

    def test_method_list(self):
        text = "true() md5 -> do_it\ntrue() smtp,dkim,md5,smime -> reject(reason='r')\n"
        self.assertEqual(self.action(text, team(method="md5")), "do_it")
        for method in ("smtp", "dkim", "smime"):
            self.assertEqual(self.action(text, team(method=method)), "reject", method)
        d = self.decide(text, team(method="md5"))
        self.assertEqual(d.auth_method, "md5")

    def test_dkim_compatibility_rule(self):
        # A file that never names dkim lets dkim through wherever smtp goes...
        self.assertEqual(self.action("true() smtp -> do_it", team(method="dkim")), "do_it")
        # ...but a file that names dkim anywhere means exactly what it says.
        text = "true() smtp -> do_it\nequal(a,b) dkim -> reject\n"
        self.assertEqual(self.decide(text, team(method="dkim")).default, True)

    def test_unknown_method_rejected(self):
        d = self.decide("true() -> do_it", team(method="pgp"))
        self.assertEqual((d.action, d.error), ("reject", "send.test: unknown authentication "
                                                         "method 'pgp'"))

    def test_first_match_wins(self):
        text = ("equal([sender],nobody@x) -> reject(reason='a')\n"
                "is_subscriber([listname],[sender]) -> do_it,notify\n"
                "true() -> reject(reason='b')\n")
        d = self.decide(text, team())
        self.assertEqual((d.action, d.notify, d.quiet, d.rule), ("do_it", True, False,
                                                                 "send.test:2"))
        d = self.decide(text, team(sender="eve@e.example"))
        self.assertEqual((d.action, d.reason, d.rule), ("reject", "b", "send.test:3"))

    def test_default_deny(self):
        d = self.decide("is_owner([listname],[sender]) -> do_it", team())
        self.assertEqual((d.action, d.default, d.error, d.rule), ("reject", True, None, None))

    def test_every_action(self):
        cases = [
            ("send", "true() -> do_it", ("do_it", frozenset(), None, None, None)),
            ("send", "true() -> do_it,quiet", ("do_it", {"quiet"}, None, None, None)),
            ("send", "true() -> do_it, notify , quiet",
             ("do_it", {"quiet", "notify"}, None, None, None)),
            ("send", "true() -> reject", ("reject", frozenset(), None, None, None)),
            ("send", "true() -> reject(reason='members_only'),quiet",
             ("reject", {"quiet"}, "members_only", None, None)),
            ("send", "true() -> reject(tt2='x.tt2')",
             ("reject", frozenset(), None, "x.tt2", None)),
            ("send", "true() -> request_auth",
             ("request_auth", frozenset(), None, None, "sender")),
            ("subscribe", "true() -> request_auth([email])",
             ("request_auth", frozenset(), None, None, "email")),
            ("subscribe", "true() -> owner", ("owner", frozenset(), None, None, None)),
            ("send", "true() -> editorkey,quiet", ("editorkey", {"quiet"}, None, None, None)),
            ("send", "true() -> editor", ("editor", frozenset(), None, None, None)),
            ("create_list", "true() -> listmaster", ("listmaster", frozenset(), None, None, None)),
        ]
        for operation, text, expected in cases:
            d = self.decide(text, team(operation=operation))
            self.assertEqual((d.action, d.modifiers, d.reason, d.tt2, d.auth_target),
                             (expected[0], frozenset(expected[1]),) + expected[2:], text)

    def test_fail_closed(self):
        s = Scenario.failed("send.bad", "send.bad:3: unknown condition 'x'")
        d = self.decide(s, team())
        self.assertEqual((d.action, d.error), ("reject", "send.bad:3: unknown condition 'x'"))
        self.assertIn("error=", repr(s))

    def test_runtime_error_rejects(self):
        d = self.decide("is_subscriber(otherlist,[sender]) -> do_it", team())
        self.assertEqual((d.action, d.rule, d.default), ("reject", "send.test:1", False))
        self.assertEqual(d.error, "send.test:1: LookupError: unknown list "
                                  "otherlist@lists.example.org")
        d = self.decide("older(abc,1) -> do_it", team())
        self.assertEqual(d.error, "send.test:1: older: bad date 'abc'")
        d = self.decide("search(nofilter,[sender]) -> do_it", team())
        self.assertEqual(d.action, "reject")
        self.assertIn("unknown filter", d.error)

    def test_runtime_error_not_masked_by_negation(self):
        d = self.decide("!is_subscriber(otherlist,[sender]) -> do_it", team())
        self.assertEqual(d.action, "reject")

    def test_no_confirmation_loop(self):
        text = "true() smtp,md5 -> request_auth\n"
        d = self.decide(text, team(method="md5"), confirmed=True)
        self.assertEqual((d.action, d.reason, d.rule), ("reject", "auth_loop", "send.test:1"))
        self.assertEqual(self.action(text, team(method="md5")), "request_auth")

    def test_blocklist(self):
        ctx = team(filters={"blocklist": [ALICE]})
        d = self.decide("true() md5 -> do_it", ctx, blocklist=True)
        self.assertEqual((d.action, d.quiet, d.reason), ("reject", True, "blocklisted"))
        self.assertEqual(self.action("true() -> do_it", ctx), "do_it")
        self.assertEqual(self.action("true() -> do_it", team(sender=BOB, filters=ctx.filters),
                                     blocklist=True), "do_it")

    def test_list_not_open(self):
        closed = team(variables={("list", "status"): "closed"})
        d = self.decide("true() -> do_it", closed)
        self.assertEqual((d.action, d.reason), ("reject", "list_not_open"))
        self.assertEqual(self.action("true() -> do_it", team(operation="visibility",
                                                               variables=closed.variables)),
                         "reject")
        self.assertEqual(self.action("true() -> do_it", team(operation="info",
                                                               variables=closed.variables)),
                         "do_it")
        self.assertEqual(self.action("true() -> do_it", team(variables={("list", "status"):
                                                                         "open"})), "do_it")

    def test_operation_mismatch(self):
        s = compile_scenario("true() -> do_it", "subscribe.x")
        d = self.decide(s, team(operation="send"))
        self.assertEqual((d.action, d.error), ("reject", "subscribe.x used for operation 'send'"))

    def test_deferred_context(self):
        ctx = _SlowContext("send", ALICE, "team", DOMAIN, members=[ALICE])
        s = compile_scenario("is_subscriber([listname],[sender]) -> do_it", "send.x")
        d = s.evaluate(ctx)
        self.assertNoResult(d)
        pending, answer = ctx.pending.pop()
        pending.callback(answer)
        self.assertEqual(self.successResultOf(d).action, "do_it")

    def test_failing_deferred_context(self):
        ctx = _SlowContext("send", ALICE, "team", DOMAIN, members=[ALICE])
        d = compile_scenario("is_subscriber([listname],[sender]) -> do_it", "send.x").evaluate(ctx)
        ctx.pending.pop()[0].errback(RuntimeError("database locked"))
        decision = self.successResultOf(d)
        self.assertEqual((decision.action, decision.error),
                         ("reject", "send.x:1: RuntimeError: database locked"))

    def test_decision_repr(self):
        r = repr(Decision("reject", {"quiet"}, reason="x", default=True))
        self.assertEqual(r, "<Decision reject,quiet reason='x' default>")


class LibraryTests(Base):

    def setUp(self):
        self.root = self.mktemp()
        self.list_dir = os.path.join(self.root, "list")
        self.site_dir = os.path.join(self.root, "site")
        os.makedirs(self.list_dir)
        os.makedirs(self.site_dir)
        self.told = []
        self.lib = ScenarioLibrary(site_dirs=[self.site_dir], notify_listmaster=self.told.append)

    def write(self, folder, name, text):
        with open(os.path.join(folder, name), "w") as f:
            f.write(text)

    def test_every_shipped_scenario_compiles(self):
        names = sorted(os.listdir(sc.SHIPPED_DIR))
        self.assertGreaterEqual(len(names), 60)
        for file_name in names:
            operation, _, name = file_name.partition(".")
            s = ScenarioLibrary().get(operation, name)
            self.assertIsNone(s.error, file_name)
            self.assertTrue(s.rules, file_name)
            self.assertTrue(s.title, file_name)

    def test_standard_names_shipped(self):
        expected = {
            "send": "public private private_auth privateorpublickey publickey privatekey "
                    "privateoreditorkey privateandeditorkey editorkey editorkeyonly "
                    "editorkeyonlyauth owner ownerauth newsletter confidential closed "
                    "public_nobcc publicnomultipart",
            "subscribe": "open open_notify open_quiet auth owner auth_owner closed",
            "unsubscribe": "open open_notify auth auth_notify auth_dkim owner closed",
            "review": "public private owner listmaster closed",
            "info": "open private conceal",
            "visibility": "noconceal conceal secret identified",
            "add": "owner owner_notify auth auth_dkim closed",
            "del": "owner owner_notify auth auth_dkim closed",
            "invite": "public private owner closed",
            "remind": "owner listmaster",
            "archive_mail_access": "public private owner closed",
        }
        for operation, names in expected.items():
            self.assertEqual(self.lib.shipped_names(operation), sorted(names.split()))

    def test_defaults(self):
        self.assertEqual(DEFAULTS, {
            "send": "private_auth", "subscribe": "auth", "unsubscribe": "auth_dkim",
            "add": "auth_dkim", "del": "auth_dkim", "review": "owner", "info": "open",
            "visibility": "conceal", "invite": "private", "remind": "owner",
            "archive_mail_access": "private"})
        for operation, name in DEFAULTS.items():
            self.assertEqual(self.lib.default_name(operation), name)
            self.assertEqual(self.lib.get(operation).name, f"{operation}.{name}")
            self.assertIsNone(self.lib.get(operation).error)

    def test_precedence(self):
        self.assertEqual(self.action(self.lib.get("send", "public"), team(sender="e@e")),
                         "do_it")
        self.write(self.site_dir, "send.public", "true() -> reject(reason='site')\n")
        self.assertEqual(self.decide(self.lib.get("send", "public"), team()).reason, "site")
        self.write(self.list_dir, "send.public", "true() -> reject(reason='list')\n")
        s = self.lib.get("send", "public", list_dirs=[self.list_dir])
        self.assertEqual(self.decide(s, team()).reason, "list")
        # another list (no folder of its own) still gets the site's file
        self.assertEqual(self.decide(self.lib.get("send", "public"), team()).reason, "site")

    def test_list_include_reaches_shipped_files(self):
        self.write(self.list_dir, "send.mine", "equal([sender],bob@b.example) -> reject\n"
                                               "include(private)\n")
        s = self.lib.get("send", "mine", [self.list_dir])
        self.assertIsNone(s.error)
        self.assertEqual(self.action(s, team(sender=BOB)), "reject")
        self.assertEqual(self.action(s, team()), "do_it")

    def test_cache(self):
        self.write(self.list_dir, "send.mine", "true() -> do_it\n")
        first = self.lib.get("send", "mine", [self.list_dir])
        self.assertIs(self.lib.get("send", "mine", [self.list_dir]), first)
        self.write(self.list_dir, "send.mine", "true() -> reject(reason='changed')\n")
        second = self.lib.get("send", "mine", [self.list_dir])
        self.assertIsNot(second, first)
        self.assertEqual(self.decide(second, team()).reason, "changed")
        # a header file appearing later is noticed too
        self.write(self.list_dir, "include.send.header", "true() -> do_it,quiet\n")
        self.assertTrue(self.decide(self.lib.get("send", "mine", [self.list_dir]),
                                    team()).quiet)

    def test_broken_file_fails_closed_and_tells_listmaster_once(self):
        self.write(self.list_dir, "send.mine", "true() -> do_it\nnosuch() -> do_it\n")
        for _ in range(3):
            s = self.lib.get("send", "mine", [self.list_dir])
            d = self.decide(s, team())
            self.assertEqual((d.action, d.error),
                             ("reject", "send.mine:2: unknown condition 'nosuch'"))
        self.lib._cache.clear()
        self.lib.get("send", "mine", [self.list_dir])
        self.assertEqual(self.told, ["send.mine:2: unknown condition 'nosuch'"])

    def test_missing_and_bad_names(self):
        for operation, name, text in (
                ("send", "nosuch", "send.nosuch:0: no such scenario"),
                ("send", "../../etc/passwd", "send.../../etc/passwd:0: no such scenario"),
                ("nosuchop", "open", "nosuchop.open:0: no such scenario"),
                ("send", "", "send.:0: no such scenario")):
            d = self.decide(self.lib.get(operation, name), team())
            self.assertEqual((d.action, d.error), ("reject", text))

    def test_check_folder(self):
        self.write(self.list_dir, "send.good", "include(private)\n")
        self.write(self.list_dir, "send.bad", "true() -> owner\n")
        self.write(self.list_dir, "info.bad", "include(nosuch)\n")
        self.write(self.list_dir, "notes.txt", "not a scenario\n")
        self.assertEqual(self.lib.check(self.list_dir, [self.list_dir]), [
            "info.bad:1: included scenario info.nosuch not found",
            "send.bad:1: action 'owner' is not allowed for send"])
        self.assertEqual(self.lib.check(sc.SHIPPED_DIR), [])
        self.assertEqual(self.told, [])

    def test_library_evaluate(self):
        d = self.successResultOf(self.lib.evaluate(team(method="dkim")))
        self.assertEqual((d.action, d.rule), ("do_it", "send.private_auth:3"))


class AcceptanceTests(Base):
    """The scenario side of the list acceptance cases (team uses the defaults)."""

    def setUp(self):
        self.lib = ScenarioLibrary()

    def run_default(self, ctx, name=None, **kw):
        return self.successResultOf(self.lib.evaluate(ctx, name, **kw))

    def test_post_from_member_with_dkim_is_distributed(self):          # case 9
        self.assertEqual(self.run_default(team(method="dkim")).action, "do_it")

    def test_forged_member_without_dkim_is_held_for_confirmation(self):    # case 10
        d = self.run_default(team(method="smtp"))
        self.assertEqual((d.action, d.auth_target), ("request_auth", "sender"))
        # confirmed by the real alice: md5 -> distributed
        self.assertEqual(self.run_default(team(method="md5"), confirmed=True).action, "do_it")

    def test_outsider_refused_members_only(self):                       # case 12
        for method in ("smtp", "dkim"):
            d = self.run_default(team(sender="eve@e.example", method=method))
            self.assertEqual((d.action, d.reason, d.quiet), ("reject", "members_only", False))

    def test_moderator_post_to_editorkeyonly_is_held(self):             # case 13
        d = self.run_default(team(sender=MO, method="dkim"), "editorkeyonly")
        self.assertEqual((d.action, d.quiet), ("editorkey", False))

    def test_sympa_private_lets_forged_from_post(self):                 # why 2.7 diverges
        self.assertEqual(self.run_default(team(method="smtp"), "private").action, "do_it")

    def test_subscribe_needs_confirmation_even_with_dkim(self):         # case 1
        for method in ("smtp", "dkim"):
            d = self.run_default(team("subscribe", "carol@c.example", method,
                                      email="carol@c.example"))
            self.assertEqual((d.action, d.auth_target), ("request_auth", "email"), method)
        d = self.run_default(team("subscribe", "carol@c.example", "md5", email="carol@c.example"),
                             confirmed=True)
        self.assertEqual(d.action, "do_it")

    def test_subscribing_someone_else_asks_them(self):                  # cases 7, 24
        for target in ("victim@v.example", ALICE):       # member or not: same answer
            d = self.run_default(team("subscribe", "eve@e.example", "dkim", email=target))
            self.assertEqual((d.action, d.auth_target), ("request_auth", "email"))

    def test_subscribe_owner_approval(self):                            # case 4
        d = self.run_default(team("subscribe", "dave@d.example", "md5", email="dave@d.example"),
                             "owner")
        self.assertEqual(d.action, "owner")
        d = self.run_default(team("subscribe", OLGA, "smtp", email=OLGA), "owner")
        self.assertEqual(d.action, "do_it")
        # auth_owner: confirmation first, then the owners
        d = self.run_default(team("subscribe", "dave@d.example", "smtp", email="dave@d.example"),
                             "auth_owner")
        self.assertEqual(d.action, "request_auth")
        d = self.run_default(team("subscribe", "dave@d.example", "md5", email="dave@d.example"),
                             "auth_owner", confirmed=True)
        self.assertEqual(d.action, "owner")

    def test_signoff_with_and_without_dkim(self):                       # case 6
        d = self.run_default(team("unsubscribe", ALICE, "dkim", email=ALICE))
        self.assertEqual(d.action, "do_it")
        d = self.run_default(team("unsubscribe", ALICE, "smtp", email=ALICE))
        self.assertEqual((d.action, d.auth_target), ("request_auth", "email"))

    def test_signoff_of_non_member_on_their_behalf(self):               # case 7
        d = self.run_default(team("unsubscribe", ALICE, "dkim", email="zed@z.example"))
        self.assertEqual((d.action, d.auth_target), ("request_auth", "email"))

    def test_forged_owner_add(self):                                    # case 23
        d = self.run_default(team("add", OLGA, "smtp", email="evil@x.example"))
        self.assertEqual((d.action, d.auth_target), ("request_auth", "sender"))
        d = self.run_default(team("add", OLGA, "dkim", email="dave@d.example"))
        self.assertEqual(d.action, "do_it")
        d = self.run_default(team("del", BOB, "md5", email=ALICE))
        self.assertEqual((d.action, d.reason), ("reject", "owners_only"))

    def test_review(self):                                              # case 25
        self.assertEqual(self.run_default(team("review", BOB, "dkim")).action, "reject")
        self.assertEqual(self.run_default(team("review", OLGA, "dkim")).action, "do_it")

    def test_secret_visibility(self):                                   # case 18
        d = self.run_default(team("visibility", "eve@e.example", "dkim"), "secret")
        self.assertEqual((d.action, d.quiet), ("reject", True))
        self.assertEqual(self.run_default(team("visibility", MO, "smtp"), "secret").action,
                         "do_it")

    def test_confidential_drops_outsiders_quietly(self):
        d = self.run_default(team(sender="eve@e.example"), "confidential")
        self.assertEqual((d.action, d.quiet), ("reject", True))

    def test_bcc_and_multipart(self):
        bcc = message("To: other@x.example\n\nhi\n")
        d = self.run_default(team(sender="eve@e.example", message=bcc), "public_nobcc")
        self.assertEqual((d.action, d.reason), ("reject", "list_in_bcc"))
        multi = message("To: team@lists.example.org\nContent-Type: multipart/mixed; boundary=b\n"
                        "\n--b\n\nx\n--b--\n")
        d = self.run_default(team(sender="eve@e.example", message=multi), "publicnomultipart")
        self.assertEqual((d.action, d.reason), ("reject", "multipart"))
        plain = Message()
        plain["To"] = "team@lists.example.org"
        for name in ("public_nobcc", "publicnomultipart"):
            self.assertEqual(self.run_default(team(sender="e@e", message=plain), name).action,
                             "do_it")

    def test_editorkey_last_x_sender(self):
        msg = message(f"X-Sender: {ALICE}\nX-Sender: {MO}\n\nhi\n")
        self.assertEqual(self.run_default(team(message=msg), "editorkey").action, "do_it")
        msg = message(f"X-Sender: {MO}\nX-Sender: {ALICE}\n\nhi\n")
        self.assertEqual(self.run_default(team(message=msg), "editorkey").action, "editorkey")
