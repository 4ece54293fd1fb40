"""The command robot (``lists.robot``) on a real state database and the shipped scenarios.

Fixture of lists.md section 6: domain ``lists.example.org``, robot ``lists@``,
list ``team`` (appliance defaults, owner olga, moderator mo, members alice
and bob), list ``ann`` (send = editorkeyonly), list ``hidden`` (visibility
secret).
"""

import email
import email.policy
import os
import re
import shutil
import tempfile

from twisted.internet import defer
from twisted.trial import unittest

from mailbox_appliance.lists import addresses, tokens
from mailbox_appliance.lists.robot import CommandRobot, StoreScenarioContext
from mailbox_appliance.lists.scenario import IScenarioContext, ScenarioLibrary
from mailbox_appliance.state import SQLiteStateStore
from tests.sink_helpers import ClockedReactor
from zope.interface.verify import verifyObject

DOM = "lists.example.org"
ROBOT = "lists@" + DOM
TEAM = "team@" + DOM
ANN = "ann@" + DOM
OLGA, MO = "olga@example.net", "mo@example.net"
ALICE, BOB = "alice@a.example", "bob@b.example"
CAROL, DAVE = "carol@c.example", "dave@d.example"
LISTMASTER = "root@example.net"
_TOKEN = re.compile(r"\b[0-9a-f]{32}\b")


def mail(frm, body="", subject="commands", headers=()):
    lines = [f"From: {frm}", "To: " + ROBOT, f"Subject: {subject}",
             f"Message-ID: <{os.urandom(6).hex()}@test>"]
    lines += [f"{k}: {v}" for k, v in headers]
    return email.message_from_string("\n".join(lines) + "\n\n" + body,
                                     policy=email.policy.compat32)


def parsed(item):
    env, rcpts, data = item
    return env, rcpts, email.message_from_bytes(data, policy=email.policy.default)


class RobotCase(unittest.TestCase):

    timeout = 30

    @defer.inlineCallbacks
    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="robot-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.reactor = ClockedReactor()
        self.reactor.clock.advance(1_000_000)
        self.store = SQLiteStateStore(os.path.join(self.dir, "state.sqlite3"), self.reactor)
        self.addCleanup(self.store.close)
        yield self.store.open()
        s = self.store
        yield s.create_list(TEAM, subject="The team", now=1.0)
        yield s.add_role(TEAM, OLGA, "owner")
        yield s.add_role(TEAM, MO, "moderator")
        yield s.add_member(TEAM, ALICE, "Alice", now=1.0)
        yield s.add_member(TEAM, BOB, "Bob", now=1.0)
        yield s.create_list(ANN, settings={"scenarios": {"send": "editorkeyonly"}})
        yield s.add_role(ANN, OLGA, "owner")
        yield s.add_role(ANN, MO, "moderator")
        yield s.create_list("hidden@" + DOM, settings={"scenarios": {"visibility": "secret"}})
        self.distributed = []
        self.robot = CommandRobot(self.store, ScenarioLibrary(), self.reactor,
                                  listmasters=(LISTMASTER,), distribute=self._distribute)

    def _distribute(self, list_address, data, sender):
        self.distributed.append((list_address, data, sender))

    def run_mail(self, msg, kind=addresses.ROBOT, list_name=None, token=None, auth="smtp",
                 env=None):
        if env is None:
            env = replies_sender(msg)
        return self.robot.handle(msg, env, kind, DOM, list_name=list_name, token=token,
                                 auth_method=auth)

    def advance(self, seconds):
        self.reactor.clock.advance(seconds)

    def reply_of(self, outcome):
        mails = [parsed(o) for o in outcome.outgoing if o[0] == ROBOT and
                 parsed(o)[2]["Subject"] == "Results of your commands"]
        self.assertLessEqual(len(mails), 1)
        return mails[0] if mails else None

    def others(self, outcome):
        return [parsed(o) for o in outcome.outgoing
                if parsed(o)[2]["Subject"] != "Results of your commands"]

    def token_in(self, msg):
        return _TOKEN.search(msg.get_body(("plain",)).get_content()).group(0)

    def body(self, msg):
        return msg.get_body(("plain",)).get_content()

    def outcomes(self, outcome):
        return [(o.section, o.line, o.text) for o in outcome.results.outcomes if not o.silent]


def replies_sender(msg):
    from mailbox_appliance.lists.replies import sender_of
    return sender_of(msg) or "x@example.net"


class SubscribeTests(RobotCase):

    @defer.inlineCallbacks
    def test_double_opt_in(self):
        """Case 1: SUB -> token to carol, Pending; CONFIRM -> member with name, welcome."""
        out = yield self.run_mail(mail(CAROL, "SUB team Carol C\n"))
        self.assertIsNone(out.dropped)
        self.assertIsNone((yield self.store.get_member(TEAM, CAROL)))
        self.assertEqual(self.outcomes(out), [
            ("Pending", "SUB team Carol C", (f"A confirmation request was sent to {CAROL}.",))])
        [(env, rcpts, conf)] = self.others(out)
        self.assertEqual((env, rcpts), ("team-bounces@" + DOM, [CAROL]))
        token = self.token_in(conf)
        self.assertEqual(conf["Reply-To"], f"team-confirm+{token}@{DOM}")
        self.assertEqual(conf["Subject"], f"AUTH {token} SUBSCRIBE team Carol C")
        self.assertEqual(conf["Auto-Submitted"], "auto-generated")
        # The token is stored hashed only.
        held = yield self.store.find_held(tokens.hash_token(token), self.reactor.seconds())
        self.assertEqual((held.kind, held.target, held.requester), ("request", CAROL, CAROL))
        reply = self.reply_of(out)
        self.assertEqual(reply[1], [CAROL])
        # Confirmed by a plain reply to the confirm address: no results mail.
        out = yield self.run_mail(mail(CAROL, "> quoted stuff\n", subject="Re: whatever"),
                                  kind=addresses.CONFIRM, list_name="team", token=token)
        member = yield self.store.get_member(TEAM, CAROL)
        self.assertEqual(member.name, "Carol C")
        self.assertIsNone(self.reply_of(out))
        [(env, rcpts, welcome)] = self.others(out)
        self.assertEqual((env, rcpts, welcome["Subject"]),
                         ("team-bounces@" + DOM, [CAROL], "Welcome to team"))
        # Used once: a second CONFIRM says already handled.
        out = yield self.run_mail(mail(CAROL, f"CONFIRM {token}\n"))
        self.assertEqual(self.outcomes(out)[0][0], "Errors")
        self.assertIn("Already handled", self.outcomes(out)[0][2][0])

    @defer.inlineCallbacks
    def test_reply_subject_wins_and_late_confirm(self):
        """Case 3: Re: AUTH subject processed once, quoted body ignored; 4 days late: unknown."""
        out = yield self.run_mail(mail(CAROL, "SUB team\n"))
        [(_, _, conf)] = self.others(out)
        token = self.token_in(conf)
        quoted = "\n".join("> " + line for line in self.body(conf).splitlines())
        out = yield self.run_mail(mail(CAROL, quoted, subject="Re: " + conf["Subject"]))
        self.assertEqual([o[0] for o in self.outcomes(out)], ["Done"])
        self.assertIsNotNone((yield self.store.get_member(TEAM, CAROL)))
        # Another request, confirmed too late.
        out = yield self.run_mail(mail(DAVE, "SUB team\n"))
        token = self.token_in(self.others(out)[0][2])
        self.advance(4 * 86400)
        out = yield self.run_mail(mail(DAVE, f"CONFIRM {token}\n"))
        self.assertEqual(self.outcomes(out),
                         [("Errors", f"CONFIRM {token}", ("Unknown or expired token.",))])
        self.assertIsNone((yield self.store.get_member(TEAM, DAVE)))

    @defer.inlineCallbacks
    def test_subscribe_address(self):
        """Case 2: mail to team-subscribe: confirmation to the sender, no results, body ignored."""
        out = yield self.run_mail(mail(CAROL, "SIGNOFF team\nHELP\n"),
                                  kind=addresses.SUBSCRIBE, list_name="team")
        self.assertFalse(out.replied)
        [(_, rcpts, conf)] = [parsed(o) for o in out.outgoing]
        self.assertEqual(rcpts, [CAROL])
        self.assertTrue(conf["Subject"].startswith("AUTH "))

    @defer.inlineCallbacks
    def test_subscribe_someone_else_privacy(self):
        """Case 7 / 3.6: a third party's request: the target confirms, same answer either way."""
        out = yield self.run_mail(mail(CAROL, f"SIGNOFF team {DAVE}\n"))
        out2 = yield self.run_mail(mail(CAROL, f"SIGNOFF team {BOB}\n"))
        self.assertEqual(self.outcomes(out)[0][2],
                         (f"A confirmation request was sent to {DAVE}.",))
        self.assertEqual(self.outcomes(out2)[0][2],
                         (f"A confirmation request was sent to {BOB}.",))
        self.assertEqual([o[1] for o in self.others(out)], [[DAVE]])
        self.assertEqual([o[1] for o in self.others(out2)], [[BOB]])
        self.assertIsNotNone((yield self.store.get_member(TEAM, BOB)))
        # At most one notice a day to the target.
        out3 = yield self.run_mail(mail(ALICE, f"SIGNOFF team {BOB}\n"))
        self.assertEqual(self.outcomes(out3)[0][2],
                         (f"A confirmation request was sent to {BOB}.",))
        self.assertEqual(self.others(out3), [])
        # bob confirms: the target acts, so he is removed and told goodbye.
        token = self.token_in(self.others(out2)[0][2])
        out = yield self.run_mail(mail(BOB, f"CONFIRM {token}\n"))
        self.assertIsNone((yield self.store.get_member(TEAM, BOB)))
        self.assertEqual([(o[1], o[2]["Subject"]) for o in self.others(out)],
                         [([BOB], "You left team")])

    @defer.inlineCallbacks
    def test_owner_approval_and_first_owner_wins(self):
        """Case 4: subscribe = owner: forwarded; AUTH ADD with DKIM accepts; second owner late."""
        ml = yield self.store.get_list(TEAM)
        yield self.store.update_list(TEAM, settings=dict(
            ml.settings, scenarios={"subscribe": "owner"}))
        yield self.store.add_role(TEAM, "otto@example.net", "owner")
        out = yield self.run_mail(mail(DAVE, "SUB team Dave\n"))
        self.assertEqual(self.outcomes(out)[0][2],
                         ("Your request was forwarded to the list's owners.",))
        notices = self.others(out)
        self.assertEqual(sorted(n[1][0] for n in notices), ["olga@example.net",
                                                            "otto@example.net"])
        token = self.token_in(notices[0][2])
        self.assertIn(f"AUTH {token} ADD team {DAVE} Dave", self.body(notices[0][2]))
        out = yield self.run_mail(mail(OLGA, f"AUTH {token} ADD team {DAVE} Dave\n"),
                                  auth="dkim")
        self.assertEqual(self.outcomes(out)[0][0], "Done")
        self.assertEqual((yield self.store.get_member(TEAM, DAVE)).name, "Dave")
        self.assertIn(([DAVE], "Welcome to team"),
                      [(o[1], o[2]["Subject"]) for o in self.others(out)])
        out = yield self.run_mail(mail("otto@example.net", f"CONFIRM {token}\n"))
        self.assertEqual(self.outcomes(out),
                         [("Errors", f"CONFIRM {token}", (f"Already handled by {OLGA}.",))])

    @defer.inlineCallbacks
    def test_decline(self):
        """Case 5: DECLINE tok not staff: dave told with the reason; the request is gone."""
        yield self.store.update_list(TEAM, settings={"scenarios": {"subscribe": "owner"}})
        out = yield self.run_mail(mail(DAVE, "SUB team\n"))
        token = self.token_in(self.others(out)[0][2])
        # Not an owner: refused.
        out = yield self.run_mail(mail(BOB, f"DECLINE {token} no\n"))
        self.assertEqual(self.outcomes(out)[0][0], "Refused")
        out = yield self.run_mail(mail(OLGA, f"DECLINE {token} not staff\n"))
        self.assertEqual(self.outcomes(out)[0][0], "Done")
        [(_, rcpts, notice)] = self.others(out)
        self.assertEqual(rcpts, [DAVE])
        self.assertIn("Reason: not staff", self.body(notice))
        self.assertEqual((yield self.store.held_waiting(TEAM)), [])
        out = yield self.run_mail(mail(OLGA, f"AUTH {token} ADD team {DAVE}\n"), auth="dkim")
        self.assertIn("Already handled", self.outcomes(out)[0][2][0])
        self.assertIsNone((yield self.store.get_member(TEAM, DAVE)))


class SignoffAndOwnerTests(RobotCase):

    @defer.inlineCallbacks
    def test_signoff_dkim_then_smtp(self):
        """Case 6: with DKIM removed at once with a goodbye; without, a confirmation first."""
        out = yield self.run_mail(mail(ALICE, "SIGNOFF team\n"), auth="dkim")
        self.assertIsNone((yield self.store.get_member(TEAM, ALICE)))
        self.assertEqual([o[2]["Subject"] for o in self.others(out)], ["You left team"])
        yield self.store.add_member(TEAM, ALICE)
        out = yield self.run_mail(mail(ALICE, "SIGNOFF team\n"))
        self.assertEqual(self.outcomes(out)[0][0], "Pending")
        self.assertIsNotNone((yield self.store.get_member(TEAM, ALICE)))
        token = self.token_in(self.others(out)[0][2])
        out = yield self.run_mail(mail(ALICE, f"CONFIRM {token}\n"))
        self.assertIsNone((yield self.store.get_member(TEAM, ALICE)))

    @defer.inlineCallbacks
    def test_unsubscribe_address(self):
        out = yield self.run_mail(mail(BOB, "whatever"), kind=addresses.UNSUBSCRIBE,
                                  list_name="team", auth="dkim")
        self.assertFalse(out.replied)
        self.assertIsNone((yield self.store.get_member(TEAM, BOB)))

    @defer.inlineCallbacks
    def test_owner_add_del(self):
        """auth_dkim: olga with DKIM adds/deletes at once; smtp-only gets a confirmation."""
        out = yield self.run_mail(mail(OLGA, f"ADD team {CAROL} Carol\nDEL team {BOB}\n"),
                                  auth="dkim")
        self.assertEqual([o[0] for o in self.outcomes(out)], ["Done", "Done"])
        self.assertIsNotNone((yield self.store.get_member(TEAM, CAROL)))
        self.assertIsNone((yield self.store.get_member(TEAM, BOB)))
        self.assertEqual(sorted((o[1][0], o[2]["Subject"]) for o in self.others(out)),
                         [(BOB, "You left team"), (CAROL, "Welcome to team")])
        # QUIET: nobody told.
        out = yield self.run_mail(mail(OLGA, f"QUIET ADD team {BOB}\n"), auth="dkim")
        self.assertEqual(self.others(out), [])
        self.assertIsNotNone((yield self.store.get_member(TEAM, BOB)))

    @defer.inlineCallbacks
    def test_forged_owner_add(self):
        """Case 23: ADD with a forged From olga, no DKIM: confirmation and results to olga only."""
        msg = mail(OLGA, "ADD team evil@x.example\n", headers=[("Reply-To", "evil@x.example")])
        out = yield self.run_mail(msg, env="evil@x.example")
        self.assertIsNone((yield self.store.get_member(TEAM, "evil@x.example")))
        self.assertEqual(self.outcomes(out)[0][0], "Pending")
        self.assertEqual(sorted(o[1] for o in out.outgoing), [[OLGA], [OLGA]])
        self.assertTrue(all("evil" not in r for o in out.outgoing for r in o[1]))
        # olga confirms: done with md5.
        token = self.token_in(self.others(out)[0][2])
        out = yield self.run_mail(mail(OLGA, f"CONFIRM {token}\n"))
        self.assertIsNotNone((yield self.store.get_member(TEAM, "evil@x.example")))

    @defer.inlineCallbacks
    def test_non_owner_add_refused(self):
        out = yield self.run_mail(mail(BOB, f"ADD team {CAROL}\n"), auth="dkim")
        self.assertEqual(self.outcomes(out), [
            ("Refused", f"ADD team {CAROL}", ("Only the list's owners may do this.",))])

    @defer.inlineCallbacks
    def test_review(self):
        """Case 25: bob refused; olga sees all members incl. concealed, and the total."""
        yield self.store.set_member(TEAM, BOB, concealed=True)
        out = yield self.run_mail(mail(BOB, "REVIEW team\n"))
        self.assertEqual(self.outcomes(out), [
            ("Refused", "REVIEW team", ("Only the list's owners may see its members.",))])
        out = yield self.run_mail(mail(OLGA, "REVIEW team\n"))
        [(section, _, text)] = self.outcomes(out)
        self.assertEqual(section, "Done")
        self.assertEqual(text[0], "team: 2 members.")
        self.assertIn(BOB, text[1])
        self.assertIn(ALICE, text[1])

    @defer.inlineCallbacks
    def test_remind(self):
        out = yield self.run_mail(mail(OLGA, "REMIND team\n"))
        self.assertEqual(self.outcomes(out)[0][0], "Pending")     # smtp: confirm first
        token = self.token_in(self.others(out)[0][2])
        out = yield self.run_mail(mail(OLGA, f"CONFIRM {token}\n"))
        self.assertEqual(sorted(o[1][0] for o in self.others(out)), [ALICE, BOB])

    @defer.inlineCallbacks
    def test_set_and_which_and_info(self):
        out = yield self.run_mail(mail(BOB, "SET team NOMAIL\nSET team CONCEAL\nWHICH\n"
                                            "INFO team\nINFO hidden\nINFO nosuchlist\n"))
        member = yield self.store.get_member(TEAM, BOB)
        self.assertEqual((member.mode, member.concealed), ("nomail", True))
        results = self.outcomes(out)
        self.assertEqual(results[2][2][1], "team (member)")
        self.assertEqual(results[3][0], "Done")
        self.assertIn("team-owner@" + DOM, results[3][2][1])
        # Case 18: a hidden list and a missing one answer alike.
        self.assertEqual(results[4][2], ("No list named hidden here.",))
        self.assertEqual(results[5][2], ("No list named nosuchlist here.",))
        out = yield self.run_mail(mail(CAROL, "SET team DIGEST\n"))
        self.assertEqual(self.outcomes(out)[0][0], "Refused")
        # Digests are not built yet: a member may not pick a mode that
        # would silently stop their mail.
        out = yield self.run_mail(mail(BOB, "SET team DIGEST\nSET team MAIL\n"))
        self.assertEqual([r[0] for r in self.outcomes(out)], ["Refused", "Done"])
        member = yield self.store.get_member(TEAM, BOB)
        self.assertEqual(member.mode, "mail")


class ModerationTests(RobotCase):

    @defer.inlineCallbacks
    def held_post(self, author=ALICE, subject="hello"):
        key = tokens.new_token()
        now = self.reactor.seconds()
        yield self.store.hold(ANN, "moderation", tokens.hash_token(key), now + 14 * 86400,
                              now=now, target=author, requester=author, subject=subject,
                              message=f"From: {author}\r\nSubject: {subject}\r\n\r\nhi\r\n"
                              .encode())
        return key

    @defer.inlineCallbacks
    def test_distribute_once_and_reject(self):
        """Case 14: DISTRIBUTE twice; REJECT with a reason; QUIET REJECT tells nobody."""
        k1 = yield self.held_post(ALICE)
        k2 = yield self.held_post(BOB, "off")
        k3 = yield self.held_post(CAROL, "spam")
        out = yield self.run_mail(mail(MO, f"DISTRIBUTE ann {k1}\nDISTRIBUTE ann {k1}\n"))
        self.assertEqual(len(self.distributed), 1)
        self.assertEqual(self.distributed[0][0::2], (ANN, ALICE))
        self.assertEqual([o[0] for o in self.outcomes(out)], ["Done", "Errors"])
        self.assertEqual(self.outcomes(out)[1][2], (f"Already moderated by {MO}.",))
        self.assertEqual([o[1] for o in self.others(out)], [[ALICE]])
        out = yield self.run_mail(mail(OLGA, f"REJECT ann {k2} off topic\n"
                                             f"QUIET REJECT ann {k3}\n"))
        self.assertEqual([o[0] for o in self.outcomes(out)], ["Done", "Done"])
        [(_, rcpts, notice)] = self.others(out)
        self.assertEqual(rcpts, [BOB])
        self.assertIn("Reason: off topic", self.body(notice))
        self.assertEqual(len(self.distributed), 1)
        self.assertEqual((yield self.store.held_waiting(ANN)), [])

    @defer.inlineCallbacks
    def test_modindex(self):
        yield self.held_post(ALICE, "first")
        out = yield self.run_mail(mail(MO, "MODINDEX ann\n"))
        [(section, _, text)] = self.outcomes(out)
        self.assertEqual((section, text[0]), ("Done", "1 messages await moderation."))
        self.assertIn("first", text[1])
        out = yield self.run_mail(mail(ALICE, "MODINDEX ann\n"))
        self.assertEqual(self.outcomes(out)[0][0], "Refused")

    @defer.inlineCallbacks
    def test_wrong_keys_limited(self):
        """Case 15: 11 wrong keys: each 'unknown key', the 10th alerts, the 11th is ignored."""
        # Spread over mails (one reply each would hit the reply limit, which is separate).
        body = "".join(f"DISTRIBUTE ann {tokens.new_token()}\n" for _ in range(11))
        out = yield self.run_mail(mail(MO, body))
        visible = self.outcomes(out)
        self.assertEqual(len(visible), 10)
        self.assertTrue(all(o[2] == ("Unknown or expired key.",) for o in visible))
        alerts = [o for o in self.others(out) if o[1] == [LISTMASTER]]
        self.assertEqual(len(alerts), 1)
        # Even a good key is now ignored for this sender.
        key = yield self.held_post()
        out = yield self.run_mail(mail(MO, f"DISTRIBUTE ann {key}\n"))
        self.assertEqual(self.outcomes(out), [])
        self.assertEqual(self.distributed, [])


class BadInputTests(RobotCase):

    @defer.inlineCallbacks
    def test_loops_dropped(self):
        """Case 19: auto-replies, bulk, our X-Loop, DSN: dropped, nothing sent."""
        for headers in ([("Auto-Submitted", "auto-replied")], [("Precedence", "bulk")],
                        [("X-Loop", ROBOT)]):
            out = yield self.run_mail(mail(ALICE, "SIGNOFF team\n", headers=headers))
            self.assertIsNotNone(out.dropped, headers)
            self.assertEqual(out.outgoing, [])
        out = yield self.run_mail(mail(ALICE, "SIGNOFF team\n"), env="")
        self.assertEqual(out.dropped, "null envelope sender")
        self.assertIsNotNone((yield self.store.get_member(TEAM, ALICE)))

    @defer.inlineCallbacks
    def test_reply_never_to_reply_to(self):
        """Case 24: everything to victim@v, nothing to the Reply-To."""
        msg = mail("victim@v.example", "SUB team\n",
                   headers=[("Reply-To", "attacker@x.example")])
        out = yield self.run_mail(msg, env="attacker@x.example")
        self.assertEqual(sorted(r for o in out.outgoing for r in o[1]),
                         ["victim@v.example", "victim@v.example"])
        self.assertTrue(all(o[0] != "attacker@x.example" for o in out.outgoing))

    @defer.inlineCallbacks
    def test_500_lines(self):
        """Cases 16, 17: three commands then prose; 500 commands -> 20 executed, one reply."""
        body = "WHICH\nLISTS\nHELP\nthis is prose\n" + "more prose\n" * 496
        out = yield self.run_mail(mail(BOB, body))
        results = self.outcomes(out)
        self.assertEqual([r[0] for r in results], ["Done"] * 3 + ["Errors"])
        self.assertEqual(results[3][1], "this is prose")
        self.assertEqual(out.results.ignored_lines, 496)
        self.assertTrue(out.replied)
        out = yield self.run_mail(mail(BOB, "SET team NOMAIL\n" * 500))
        self.assertEqual(len(self.outcomes(out)), 20)
        self.assertEqual(out.results.ignored_lines, 480)
        [reply] = [o for o in out.outgoing if o[0] == ROBOT]
        self.assertLessEqual(len(reply[2]), 64 * 1024)
        self.assertIn(b"480 lines ignored.", reply[2])

    @defer.inlineCallbacks
    def test_injection_in_subject(self):
        """Case 21: an encoded subject with CRLF and Bcc: a syntax error, nothing subscribed."""
        msg = mail(CAROL, "", subject="=?utf-8?B?U1VCIHRlYW0gWA0KQmNjOiB2QHg=?=")
        out = yield self.run_mail(msg)
        self.assertEqual([o[0] for o in self.outcomes(out)], ["Errors"])
        self.assertEqual([o[1] for o in out.outgoing], [[CAROL]])
        head = out.outgoing[0][2].split(b"\r\n\r\n", 1)[0]
        self.assertNotIn(b"Bcc", head)
        self.assertIsNone((yield self.store.get_member(TEAM, CAROL)))

    @defer.inlineCallbacks
    def test_forged_from_on_private_list(self):
        """Case 10 (command side): REVIEW from a forged owner without DKIM on review=owner
        works by the scenario (smtp), but SUB for someone else always goes to the target."""
        out = yield self.run_mail(mail(ALICE, f"SIGNOFF team {ALICE}\n"), env="eve@e.example")
        self.assertEqual(self.outcomes(out)[0][0], "Pending")
        self.assertEqual({r for o in out.outgoing for r in o[1]}, {ALICE})
        self.assertIsNotNone((yield self.store.get_member(TEAM, ALICE)))

    @defer.inlineCallbacks
    def test_reply_rate_limit(self):
        """Case 20: at most 10 replies a day to one address, one listmaster alert."""
        replied = alerts = 0
        for _ in range(12):
            out = yield self.run_mail(mail(CAROL, "LISTS\n"))
            replied += out.replied
            alerts += sum(1 for o in out.outgoing if o[1] == [LISTMASTER])
        self.assertEqual((replied, alerts), (10, 1))

    @defer.inlineCallbacks
    def test_unknown_token_and_auth_mismatch(self):
        out = yield self.run_mail(mail(CAROL, f"CONFIRM {'0' * 32}\n"))
        self.assertEqual(self.outcomes(out)[0][2], ("Unknown or expired token.",))
        out = yield self.run_mail(mail(CAROL, "SUB team\n"))
        token = self.token_in(self.others(out)[0][2])
        out = yield self.run_mail(mail(CAROL, f"AUTH {token} SUBSCRIBE ann\n"))
        self.assertEqual(self.outcomes(out)[0][0], "Refused")
        self.assertIsNone((yield self.store.get_member(TEAM, CAROL)))
        # Guessing the command: after MAX_ATTEMPTS wrong ones the token is void.
        for _ in range(tokens.MAX_ATTEMPTS - 1):
            yield self.run_mail(mail(CAROL, f"AUTH {token} SUBSCRIBE ann\n"))
        out = yield self.run_mail(mail(CAROL, f"CONFIRM {token}\n"))
        self.assertEqual(self.outcomes(out)[0][2], ("Unknown or expired token.",))
        self.assertIsNone((yield self.store.get_member(TEAM, CAROL)))

    def test_context_interface(self):
        from mailbox_appliance.state_lists import MailingList
        ctx = StoreScenarioContext(self.store, MailingList(1, TEAM, ""), "send", ALICE)
        verifyObject(IScenarioContext, ctx)


class MoreTests(RobotCase):

    @defer.inlineCallbacks
    def test_post_confirmation(self):
        """Case 10: a held post is released by its author's CONFIRM, re-evaluated with md5."""
        token = tokens.new_token()
        now = self.reactor.seconds()
        yield self.store.hold(TEAM, "post", tokens.hash_token(token), now + 7 * 86400, now=now,
                              requester=ALICE, target=ALICE, subject="hi",
                              message=b"From: alice@a.example\r\nSubject: hi\r\n\r\nhello\r\n")
        out = yield self.run_mail(mail(ALICE, "quoted"), kind=addresses.CONFIRM,
                                  list_name="team", token=token)
        self.assertEqual(out.outgoing, [])
        [(lst, data, sender)] = self.distributed
        self.assertEqual((lst, sender), (TEAM, ALICE))
        self.assertTrue(data.startswith(b"X-Validation-By: alice@a.example\r\nFrom:"))

    @defer.inlineCallbacks
    def test_post_confirmation_to_moderation(self):
        """On ann (editorkeyonly) a confirmed post goes to the moderators with a key."""
        token = tokens.new_token()
        now = self.reactor.seconds()
        yield self.store.hold(ANN, "post", tokens.hash_token(token), now + 7 * 86400, now=now,
                              requester=ALICE, subject="hi", message=b"Subject: hi\r\n\r\nx\r\n")
        out = yield self.run_mail(mail(ALICE, f"CONFIRM {token}\n"))
        self.assertEqual(self.distributed, [])
        self.assertEqual(self.outcomes(out)[0][0], "Pending")
        [(_, rcpts, note)] = self.others(out)
        self.assertEqual(rcpts, [MO])
        key = re.search(r"DISTRIBUTE ann ([0-9a-f]{32})", self.body(note)).group(1)
        out = yield self.run_mail(mail(MO, f"DISTRIBUTE ann {key}\n"))
        self.assertEqual(len(self.distributed), 1)

    @defer.inlineCallbacks
    def test_signoff_star_for_someone_else(self):
        """SIGNOFF * address: one answer whatever lists the target is on (3.6)."""
        out = yield self.run_mail(mail(CAROL, f"SIGNOFF * {BOB}\n"))
        self.assertEqual(self.outcomes(out), [
            ("Pending", f"SIGNOFF * {BOB}", (f"A confirmation request was sent to {BOB}.",))])
        out2 = yield self.run_mail(mail(CAROL, f"SIGNOFF * {DAVE}\n"))
        self.assertEqual(self.outcomes(out2), [
            ("Pending", f"SIGNOFF * {DAVE}", (f"A confirmation request was sent to {DAVE}.",))])
        self.assertIsNotNone((yield self.store.get_member(TEAM, BOB)))

    @defer.inlineCallbacks
    def test_request_address_default_list(self):
        out = yield self.run_mail(mail(ALICE, "SET NOMAIL\n"), kind=addresses.REQUEST,
                                  list_name="team")
        self.assertEqual((yield self.store.get_member(TEAM, ALICE)).mode, "nomail")
        self.assertTrue(out.replied)

    @defer.inlineCallbacks
    def test_confirm_address_unknown_token_is_silent(self):
        out = yield self.run_mail(mail(ALICE, ""), kind=addresses.CONFIRM, list_name="team",
                                  token="ab" * 16)
        self.assertEqual(out.outgoing, [])
        self.assertEqual(self.outcomes(out)[0][2], ("Unknown or expired token.",))

    @defer.inlineCallbacks
    def test_auth_owner(self):
        """subscribe auth_owner: the requester confirms, then the owners approve."""
        yield self.store.update_list(TEAM, settings={"scenarios": {"subscribe": "auth_owner"}})
        out = yield self.run_mail(mail(DAVE, "SUB team Dave\n"))
        token = self.token_in(self.others(out)[0][2])
        out = yield self.run_mail(mail(DAVE, f"CONFIRM {token}\n"))
        self.assertEqual(self.outcomes(out)[0][2],
                         ("Your request was forwarded to the list's owners.",))
        [(_, rcpts, notice)] = self.others(out)
        self.assertEqual(rcpts, [OLGA])
        approval = self.token_in(notice)
        out = yield self.run_mail(mail(OLGA, f"CONFIRM {approval}\n"))
        self.assertEqual((yield self.store.get_member(TEAM, DAVE)).name, "Dave")

    @defer.inlineCallbacks
    def test_moderation_key_expired(self):
        key = tokens.new_token()
        now = self.reactor.seconds()
        yield self.store.hold(ANN, "moderation", tokens.hash_token(key), now + 10, now=now,
                              requester=ALICE, message=b"x")
        self.advance(11)
        out = yield self.run_mail(mail(MO, f"DISTRIBUTE ann {key}\n"))
        self.assertEqual(self.outcomes(out)[0][2], ("Unknown or expired key.",))
        self.assertEqual(self.distributed, [])

    @defer.inlineCallbacks
    def test_owner_approval_at_subscribe_address(self):
        """No results mail at -subscribe, but the requester hears his request went to the owners."""
        yield self.store.update_list(TEAM, settings={"scenarios": {"subscribe": "owner"}})
        out = yield self.run_mail(mail(DAVE, "hello"), kind=addresses.SUBSCRIBE,
                                  list_name="team")
        self.assertFalse(out.replied)
        self.assertEqual(sorted(o[1][0] for o in out.outgoing), [DAVE, OLGA])

    @defer.inlineCallbacks
    def test_held_requests_bounded_per_sender(self):
        """At most 30 requests held per sender and hour, however many mails."""
        for first in (0, 20):
            body = "".join(f"SIGNOFF team user{i}@x.example\n" for i in range(first, first + 20))
            out = yield self.run_mail(mail(CAROL, body))
        sections = [o[0] for o in self.outcomes(out)]
        self.assertEqual(sections, ["Pending"] * 10 + ["Refused"] * 10)
        self.assertEqual(len((yield self.store.held_waiting(TEAM))), 30)

    @defer.inlineCallbacks
    def test_internal_error_reported_and_alerted(self):
        """A store failure: 'internal error' in the reply, one alert, the next command still runs."""
        def broken(*a, **kw):
            return defer.fail(RuntimeError("disk on fire"))
        self.patch(self.store, "count_members", broken)
        out = yield self.run_mail(mail(OLGA, "REVIEW team\nWHICH\n"))
        self.assertEqual([o[0] for o in self.outcomes(out)], ["Errors", "Done"])
        self.assertEqual(len([o for o in out.outgoing if o[1] == [LISTMASTER]]), 1)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
