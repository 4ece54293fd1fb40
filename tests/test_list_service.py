"""The list server as the queue sees it (``lists.service.ListService``).

A real state database (SQLite in a temp dir) with the shipped scenarios, a
real spool whose committed messages are recorded through ``submit``, and a
reactor whose time is a Clock (threads are the real reactor's: the store and
the spool do their disk work there). Incoming mail is handed to ``deliver``
with its bytes in memory, as the queue does on a first attempt.

Fixture: list domain ``lists.example.org`` (robot ``lists@``), list ``team``
with the appliance defaults (send = private_auth), owner olga, moderator mo,
members alice and bob (mail), carol (nomail) and dave (mail, disabled).
"""

import dataclasses
import email
import email.policy
import os
import re

from twisted.internet import defer, reactor, task
from twisted.trial import unittest
from zope.interface import implementer

from mailbox_appliance import config
from mailbox_appliance.delivery.maildir import MaildirDelivery
from mailbox_appliance.delivery.result import BOUNCED, SENT, RecipientResult
from mailbox_appliance.delivery.router import Route, Router, Target
from mailbox_appliance.interfaces import IRemoteDelivery
from mailbox_appliance.lists import addresses, bounces, tokens
from mailbox_appliance.lists.addresses import ListAddress
from mailbox_appliance.lists.service import (NAMES_TTL, REVIEW_EVERY, ListService,
                                             auth_method_of, load_key)
from mailbox_appliance.queue.manager import QueueManager
from mailbox_appliance.queue.spool import Envelope, QueuedMessage, Spool, read_queue_file
from mailbox_appliance.smtp.address import Path
from mailbox_appliance.smtp.policy import RecipientExists
from mailbox_appliance.smtp.session import SessionState
from mailbox_appliance.state import SQLiteStateStore
from tests.fakes import FakeDirectory
from tests.sink_helpers import ClockedReactor

DOM = "lists.example.org"
HOST = "mail.example.org"
ROBOT = "lists@" + DOM
TEAM = "team@" + DOM
TEAM_BOUNCES = "team-bounces@" + DOM
OLGA, MO = "olga@example.net", "mo@example.net"
ALICE, BOB = "alice@a.example", "bob@b.example"
CAROL, DAVE = "carol@c.example", "dave@d.example"
EVE = "eve@e.example"
LISTMASTER = "root@example.net"
KEY = bytes(range(32))
START = 1_700_000_000.0
DAY = 86400.0
_TOKEN = re.compile(r"\b[0-9a-f]{32}\b")


def message(frm, to, subject="hello", body="Hi all.\r\n", headers=(), mid=None):
    """A small RFC 5322 message as bytes (CRLF)."""
    lines = [f"From: {frm}", f"To: {to}", f"Subject: {subject}",
             "Date: Tue, 14 Nov 2023 22:13:20 +0000",
             f"Message-ID: {mid or '<' + os.urandom(6).hex() + '@test>'}"]
    lines += [f"{k}: {v}" for k, v in headers]
    return ("\r\n".join(lines) + "\r\n\r\n" + body).encode()


def dsn(to, failed, status="5.1.1", action="failed"):
    """An RFC 3464 delivery report about ``failed``, sent to ``to``."""
    b = "=_report_1"
    return (
        f"From: MAILER-DAEMON@mx.b.example\r\nTo: {to}\r\n"
        "Subject: Undelivered Mail Returned to Sender\r\n"
        f"Message-ID: <{os.urandom(6).hex()}@mx.b.example>\r\n"
        "Auto-Submitted: auto-replied\r\nMIME-Version: 1.0\r\n"
        f'Content-Type: multipart/report; report-type=delivery-status; boundary="{b}"\r\n'
        "\r\n"
        f"--{b}\r\nContent-Type: text/plain\r\n\r\nYour message could not be delivered.\r\n"
        f"--{b}\r\nContent-Type: message/delivery-status\r\n\r\n"
        "Reporting-MTA: dns; mx.b.example\r\n\r\n"
        f"Final-Recipient: rfc822; {failed}\r\nAction: {action}\r\nStatus: {status}\r\n"
        f"Diagnostic-Code: smtp; 550 {status} no such user\r\n\r\n"
        f"--{b}--\r\n").encode()


def arf(to, about, feedback_type="abuse", list_id="team.lists.example.org"):
    """An RFC 5965 abuse report about a copy of list ``list_id`` sent to ``about``,
    sent to ``to``."""
    b = "=_arf_1"
    return (
        f"From: fbl@isp.example\r\nTo: {to}\r\nSubject: complaint\r\n"
        "MIME-Version: 1.0\r\n"
        f'Content-Type: multipart/report; report-type=feedback-report; boundary="{b}"\r\n'
        "\r\n"
        f"--{b}\r\nContent-Type: text/plain\r\n\r\nA complaint about this message.\r\n"
        f"--{b}\r\nContent-Type: message/feedback-report\r\n\r\n"
        f"Feedback-Type: {feedback_type}\r\nUser-Agent: fbl/1.0\r\nVersion: 1\r\n"
        f"Original-Rcpt-To: {about}\r\n\r\n"
        f"--{b}\r\nContent-Type: text/rfc822-headers\r\n\r\n"
        f"List-Id: The team <{list_id}>\r\nSubject: post\r\n\r\n"
        f"--{b}--\r\n").encode()


def parse(data):
    return email.message_from_bytes(data, policy=email.policy.default)


def text_of(msg):
    return msg.get_body(("plain",)).get_content()


class ServiceCase(unittest.TestCase):

    timeout = 30

    @defer.inlineCallbacks
    def setUp(self):
        self.root = os.path.abspath(self.mktemp())
        os.makedirs(self.root)
        self.reactor = ClockedReactor()
        self.clock = self.reactor.clock
        self.clock.advance(START)
        base = config.Config()
        self.config = dataclasses.replace(
            base,
            server=dataclasses.replace(base.server, hostname=HOST, data_dir=self.root,
                                       domains=("example.org", DOM)),
            lists=dataclasses.replace(base.lists, domains=(DOM,), listmasters=(LISTMASTER,)),
            # No DKIM keys in these tests (signing would make one in a thread).
            antispam=dataclasses.replace(
                base.antispam, dkim=dataclasses.replace(base.antispam.dkim, sign=False)))
        self.store = SQLiteStateStore(os.path.join(self.root, "state.sqlite3"), self.reactor)
        self.addCleanup(self.store.close)
        yield self.store.open()
        s = self.store
        yield s.create_list(TEAM, subject="The team", now=1.0)
        yield s.add_role(TEAM, OLGA, "owner")
        yield s.add_role(TEAM, MO, "moderator")
        yield s.add_member(TEAM, ALICE, "Alice", now=1.0)
        yield s.add_member(TEAM, BOB, "Bob", now=1.0)
        yield s.add_member(TEAM, CAROL, "Carol", mode="nomail", now=1.0)
        yield s.add_member(TEAM, DAVE, "Dave", now=1.0)
        yield s.set_member(TEAM, DAVE, bounce_score=5.0, last_bounce=START - DAY,
                           disabled_since=START - DAY)
        self.spool = Spool(self.reactor, os.path.join(self.root, "queue"))
        self.addCleanup(self.spool.worker.stop)
        self.queued = []
        self.service = self.make_service()
        self._n = 0

    def make_service(self, **kw):
        return ListService(self.reactor, self.config, self.store, self.spool,
                           submit=self.queued.append, key=KEY, **kw)

    def advance(self, seconds):
        self.clock.advance(seconds)

    def fail_first_queueing(self):
        """The list server's next queue write fails as on a full disk; later ones work."""
        real = self.service.queue_mail
        calls = []

        def queue_mail(*a, **kw):
            calls.append(a)
            if len(calls) == 1:
                return defer.fail(OSError(28, "No space left on device"))
            return real(*a, **kw)
        self.service.queue_mail = queue_mail

    @defer.inlineCallbacks
    def deliver(self, to, data, sender, auth="", folder="", scanned=False, dkim_pass=()):
        """Hand ``data`` for ``to`` to the list server as the queue would; the result."""
        where = yield self.service.classify(to)
        self.assertIsNotNone(where, f"{to} is not a list address")
        self._n += 1
        env = Envelope(sender=sender, recipients=[to], arrival=self.clock.seconds(),
                       auth=auth, folder=folder, scanned=scanned,
                       dkim_pass=list(dkim_pass))
        qmsg = QueuedMessage(qid=f"IN{self._n:04d}", envelope=env,
                             path=os.path.join(self.root, "nonexistent"), body_offset=0,
                             size=len(data), data=data)
        result = yield self.service.deliver(qmsg, Target("list", "T:" + to.lower(), to,
                                                         user=where))
        return result

    def take(self):
        """The messages queued since the last call: [(QueuedMessage, parsed message)]."""
        out, self.queued[:] = [(q, parse(q.data)) for q in self.queued], []
        return out

    @defer.inlineCallbacks
    def post_from_alice(self, **kw):
        result = yield self.deliver(TEAM, message(ALICE, TEAM, **kw), ALICE, auth="alice")
        self.assertEqual(result.status, SENT)
        return result

    def member(self, address):
        return self.store.get_member(TEAM, address)


class KeyAndAuthTests(ServiceCase):

    def test_load_key_is_made_once_and_kept_private(self):
        key = load_key(self.root)
        self.assertGreaterEqual(len(key), 16)
        self.assertEqual(load_key(self.root), key)
        path = os.path.join(self.root, "lists", "verp.key")
        self.assertEqual(os.stat(path).st_mode & 0o777, 0o600)
        # A service without an explicit key uses the stored one.
        svc = ListService(self.reactor, self.config, self.store, self.spool)
        self.assertEqual(svc.key, key)

    def test_auth_method(self):
        msg = parse(message(ALICE, TEAM))
        plain = Envelope(sender=ALICE, recipients=[TEAM])
        logged_in = Envelope(sender=ALICE, recipients=[TEAM], auth="alice")
        self.assertEqual(auth_method_of(msg, plain, True), "smtp")
        self.assertEqual(auth_method_of(msg, logged_in, True), "dkim")
        self.assertEqual(auth_method_of(msg, logged_in, False), "smtp")

        def scanned(*domains):
            return Envelope(sender=ALICE, recipients=[TEAM], scanned=True,
                            dkim_pass=list(domains))
        # The From: domain (a.example) or a parent, verified by the scan.
        self.assertEqual(auth_method_of(msg, scanned("a.example"), True), "dkim")
        sub = parse(message("x@mail.a.example", TEAM))
        self.assertEqual(auth_method_of(sub, scanned("a.example"), True), "dkim")
        self.assertEqual(auth_method_of(msg, scanned("evil.example"), True), "smtp")
        self.assertEqual(auth_method_of(msg, scanned("ba.example"), True), "smtp")
        # Never a public suffix's signature (a platform signing for its tenants).
        tenant = parse(message("x@victim.github.io", TEAM))
        self.assertEqual(auth_method_of(tenant, scanned("github.io"), True), "smtp")
        self.assertEqual(auth_method_of(parse(message("x@a.co.uk", TEAM)), scanned("co.uk"),
                                        True), "smtp")
        self.assertEqual(auth_method_of(tenant, scanned("victim.github.io"), True), "dkim")
        self.assertEqual(auth_method_of(msg, scanned(), True), "smtp")
        # A passing domain on an envelope the scan did not judge is not believed.
        self.assertEqual(auth_method_of(msg, dataclasses.replace(
            scanned("a.example"), scanned=False), True), "smtp")
        # Header fields never count, whatever they say (the scan's list does).
        for forged in (f"{HOST}; dkim=pass header.d=a.example",
                       "=?utf-8?q?" + f"{HOST}; dkim=pass header.d=a.example".replace(
                           " ", "_") + "?=",
                       f'{HOST}; dkim=permerror header.d=x.test header.s="s.dkim=pass.header.d=a.example"'):
            signed = parse(message(ALICE, TEAM, headers=[("Authentication-Results", forged)]))
            self.assertEqual(auth_method_of(signed, scanned(), True), "smtp")
            self.assertEqual(auth_method_of(signed, scanned("x.test"), True), "smtp")


class ClassifyTests(ServiceCase):

    @defer.inlineCallbacks
    def test_list_addresses(self):
        c = self.service.classify
        self.assertEqual((yield c(TEAM)), ListAddress(addresses.POST, DOM, "team"))
        self.assertEqual((yield c("Team@Lists.Example.ORG")),
                         ListAddress(addresses.POST, DOM, "team"))
        self.assertEqual((yield c("team-request@" + DOM)),
                         ListAddress(addresses.REQUEST, DOM, "team"))
        for suffix, kind in (("-subscribe", addresses.SUBSCRIBE),
                             ("-unsubscribe", addresses.UNSUBSCRIBE),
                             ("-owner", addresses.OWNER), ("-editor", addresses.EDITOR),
                             ("-bounces", addresses.BOUNCES)):
            self.assertEqual((yield c(f"team{suffix}@{DOM}")), ListAddress(kind, DOM, "team"))
        token = "0123456789abcdef0123456789ABCDEF"
        self.assertEqual((yield c(f"team-confirm+{token}@{DOM}")),
                         ListAddress(addresses.CONFIRM, DOM, "team", token=token.lower()))
        # A malformed token is no address of ours.
        self.assertIsNone((yield c(f"team-confirm+1234@{DOM}")))
        verp = addresses.verp_sender("team", DOM, 7, 3, KEY)
        where = yield c(verp)
        self.assertEqual((where.kind, where.list_name), (addresses.BOUNCES, "team"))
        self.assertEqual(addresses.verify_bounce_recipient(where, KEY), (7, 3))
        self.assertEqual((yield c(ROBOT)), ListAddress(addresses.ROBOT, DOM))
        self.assertEqual((yield c("LISTS@" + DOM)), ListAddress(addresses.ROBOT, DOM))
        self.assertEqual((yield c("listmaster@" + DOM)), ListAddress(addresses.LISTMASTER, DOM))

    @defer.inlineCallbacks
    def test_not_list_addresses(self):
        c = self.service.classify
        self.assertIsNone((yield c("nosuchlist@" + DOM)))
        self.assertIsNone((yield c("nosuchlist-request@" + DOM)))
        self.assertIsNone((yield c("postmaster@" + DOM)))
        # Other domains are never list domains, whatever the local part.
        self.assertIsNone((yield c("team@example.org")))
        self.assertIsNone((yield c("lists@example.org")))
        self.assertIsNone((yield c("listmaster@example.org")))
        self.assertIsNone((yield c("team@elsewhere.example")))
        self.assertIsNone((yield c("no-at-sign")))
        self.assertTrue(self.service.is_list_domain("Lists.Example.Org."))
        self.assertFalse(self.service.is_list_domain("example.org"))

    @defer.inlineCallbacks
    def test_list_names_read_again_after_ttl(self):
        self.assertIsNone((yield self.service.classify("fresh@" + DOM)))
        yield self.store.create_list("fresh@" + DOM)
        # Still the names read a moment ago...
        self.advance(NAMES_TTL / 2)
        self.assertIsNone((yield self.service.classify("fresh@" + DOM)))
        # ... until they are older than the TTL.
        self.advance(NAMES_TTL)
        self.assertEqual((yield self.service.classify("fresh@" + DOM)),
                         ListAddress(addresses.POST, DOM, "fresh"))
        self.assertEqual((yield self.service.classify("fresh-owner@" + DOM)).kind,
                         addresses.OWNER)
        # A removed list goes the same way.
        yield self.store.delete_list("fresh@" + DOM)
        self.advance(NAMES_TTL + 0.1)
        self.assertIsNone((yield self.service.classify("fresh@" + DOM)))

    @defer.inlineCallbacks
    def test_trailing_dot_domain(self):
        """``is_list_domain`` accepts "lists.example.org." but the names are read
        for the domain with the dot: no list is found there."""
        self.assertEqual((yield self.service.classify(TEAM + ".")),
                         ListAddress(addresses.POST, DOM, "team"))


class PolicyAndRouterTests(ServiceCase):

    def directory(self):
        d = FakeDirectory(domains=("example.org", DOM))
        d.add_user("alice", "alice@example.org")
        d.add_user("pm", "postmaster@" + DOM)
        return d

    @defer.inlineCallbacks
    def test_recipient_exists_with_lists(self):
        check = RecipientExists(self.directory(), ("example.org", DOM), lists=self.service)
        s = SessionState()

        def verdict(local, domain):
            return defer.maybeDeferred(check.check, "rcpt", s, Path(local, domain))
        for local in ("team", "team-request", "team-subscribe", "team-owner", "lists",
                      "listmaster", "team-confirm+" + "a" * 32,
                      addresses.verp_sender("team", DOM, 1, 1, KEY).partition("@")[0]):
            self.assertIsNone((yield verdict(local, DOM)), local)
        # A directory user at the list domain is still a recipient.
        self.assertIsNone((yield verdict("postmaster", DOM)))
        for local in ("nosuchlist", "team-nonsense", "nosuchlist-request"):
            v = yield verdict(local, DOM)
            self.assertEqual((v.code, v.enhanced), (550, "5.1.1"), local)
        # Other local domains: the directory alone decides.
        self.assertIsNone((yield verdict("alice", "example.org")))
        v = yield verdict("team", "example.org")
        self.assertEqual((v.code, v.enhanced), (550, "5.1.1"))
        self.assertIsNone((yield verdict("team", "elsewhere.example")))

    @defer.inlineCallbacks
    def test_router_routes_list_addresses_to_the_list_server(self):
        router = Router(self.directory(), ("example.org", DOM), lists=self.service)
        route = yield router.route("Team@" + DOM)
        [target] = route.targets
        self.assertEqual((target.kind, target.key, target.address),
                         ("list", "T:team@" + DOM, "Team@" + DOM))
        self.assertEqual(target.user, ListAddress(addresses.POST, DOM, "team"))
        [target] = (yield router.route("team-request@" + DOM)).targets
        self.assertEqual((target.kind, target.user.kind), ("list", addresses.REQUEST))
        [target] = (yield router.route("alice@example.org")).targets
        self.assertEqual(target.kind, "local")
        [target] = (yield router.route("postmaster@" + DOM)).targets
        self.assertEqual(target.kind, "local")
        self.assertEqual((yield router.route("nosuchlist@" + DOM)), Route(unknown=True))
        [target] = (yield router.route(TEAM.replace(DOM, "far.example"))).targets
        self.assertEqual(target.kind, "remote")


class PostTests(ServiceCase):

    @defer.inlineCallbacks
    def test_member_post_with_dkim_is_distributed_with_verp(self):
        yield self.post_from_alice(subject="Plans", mid="<plans@a.example>")
        [(q, copy)] = self.take()
        # Members taking mail: alice and bob; not carol (nomail) nor dave (disabled).
        self.assertEqual(q.envelope.recipients, [ALICE, BOB])
        self.assertEqual(q.envelope.sender, TEAM_BOUNCES)
        self.assertEqual(len(q.envelope.senders), 2)
        alice = yield self.member(ALICE)
        bob = yield self.member(BOB)
        for who, sender in zip((alice, bob), q.envelope.senders):
            self.assertTrue(sender.startswith("team-bounces+"), sender)
            self.assertTrue(sender.endswith("@" + DOM), sender)
            tag = sender.partition("+")[2].partition("@")[0]
            self.assertEqual(addresses.verify_verp_tag(TEAM, tag, KEY, who.address), (who.id, 1))
            # Another key does not vouch for it.
            self.assertIsNone(addresses.verify_verp_tag(TEAM, tag, b"x" * 32, who.address))
            self.assertIsNone(addresses.verify_verp_tag(TEAM, tag, KEY, EVE))
        self.assertEqual(q.envelope.sender_of(1), q.envelope.senders[1])
        self.assertEqual((yield self.store.get_list(TEAM)).post_sequence, 1)
        # The copy: the list's fields, the author's fields kept.
        self.assertEqual(copy["List-Id"], "The team <team.lists.example.org>")
        self.assertEqual(copy["List-Post"], f"<mailto:{TEAM}>")
        self.assertEqual(copy["List-Help"], f"<mailto:{ROBOT}?subject=help>")
        self.assertEqual(copy["List-Subscribe"], f"<mailto:team-subscribe@{DOM}>")
        self.assertEqual(copy["List-Unsubscribe"],
                         f"<mailto:team-unsubscribe@{DOM}?subject=unsubscribe>")
        self.assertEqual(copy["List-Owner"], f"<mailto:team-owner@{DOM}>")
        self.assertEqual(copy["Precedence"], "list")
        self.assertEqual(copy["X-Loop"], TEAM)
        self.assertEqual((copy["From"], copy["Subject"], copy["Message-ID"]),
                         (ALICE, "Plans", "<plans@a.example>"))
        self.assertIn("Hi all.", text_of(copy))
        # The entry on disk keeps every member's sender.
        on_disk = read_queue_file(q.qid, q.path)
        self.assertEqual(on_disk.envelope.senders, q.envelope.senders)
        self.assertEqual(on_disk.envelope.recipients, [ALICE, BOB])
        # A second post has the next sequence in its tags.
        yield self.post_from_alice(subject="More")
        [(q2, _)] = self.take()
        tag = q2.envelope.senders[1].partition("+")[2].partition("@")[0]
        self.assertEqual(addresses.verify_verp_tag(TEAM, tag, KEY, BOB), (bob.id, 2))

    @defer.inlineCallbacks
    def test_post_with_our_own_authentication_results(self):
        ours = f"{HOST}; dkim=pass header.d=b.example header.s=sel"
        data = message(BOB, TEAM, headers=[("Authentication-Results", ours)])
        result = yield self.deliver(TEAM, data, BOB, scanned=True, dkim_pass=["b.example"])
        self.assertEqual(result.status, SENT)
        [(q, _)] = self.take()
        self.assertEqual(q.envelope.recipients, [ALICE, BOB])

    @defer.inlineCallbacks
    def test_our_authentication_results_on_unscanned_mail_is_not_believed(self):
        """The same field without the scan's own record (mail it skipped, too large
        or from a relay client, may carry a forged one): the post waits for its
        author's confirmation."""
        ours = f"{HOST}; dkim=pass header.d=b.example header.s=sel"
        data = message(BOB, TEAM, headers=[("Authentication-Results", ours)])
        yield self.deliver(TEAM, data, BOB)
        [(q, conf)] = self.take()
        self.assertEqual(q.envelope.recipients, [BOB])
        self.assertTrue(conf["Subject"].startswith("CONFIRM "))

    @defer.inlineCallbacks
    def test_not_me_member_gets_no_copy_of_own_post(self):
        yield self.store.set_member(TEAM, ALICE, mode="not_me")
        yield self.post_from_alice()
        [(q, _)] = self.take()
        self.assertEqual(q.envelope.recipients, [BOB])
        self.assertEqual(len(q.envelope.senders), 1)

    @defer.inlineCallbacks
    def test_member_post_without_dkim_is_held_for_confirmation(self):
        result = yield self.deliver(TEAM, message(ALICE, TEAM, subject="Unsigned"), ALICE)
        self.assertEqual(result.status, SENT)
        [(q, conf)] = self.take()
        self.assertEqual((q.envelope.sender, q.envelope.recipients, q.envelope.senders),
                         (TEAM_BOUNCES, [ALICE], []))
        token = _TOKEN.search(conf["Subject"]).group(0)
        self.assertEqual(conf["Reply-To"], f"team-confirm+{token}@{DOM}")
        self.assertEqual((yield self.store.get_list(TEAM)).post_sequence, 0)
        # A plain reply to the confirm address distributes it.
        result = yield self.deliver(conf["Reply-To"], message(ALICE, conf["Reply-To"],
                                                             subject="Re: " + conf["Subject"]),
                                    ALICE)
        self.assertEqual(result.status, SENT)
        [(q, copy)] = self.take()
        self.assertEqual(q.envelope.recipients, [ALICE, BOB])
        self.assertEqual(copy["Subject"], "Unsigned")

    @defer.inlineCallbacks
    def test_non_member_post_is_refused_with_a_notice(self):
        result = yield self.deliver(TEAM, message(EVE, TEAM, subject="Buy"), EVE, auth="eve")
        self.assertEqual(result.status, SENT)
        [(q, notice)] = self.take()
        self.assertEqual((q.envelope.sender, q.envelope.recipients), (TEAM_BOUNCES, [EVE]))
        self.assertEqual(notice["Subject"], "Not distributed: Buy")
        self.assertEqual(notice["Auto-Submitted"], "auto-replied")
        self.assertIn("Only members of the list may do this.", text_of(notice))
        self.assertEqual((yield self.store.get_list(TEAM)).post_sequence, 0)

    @defer.inlineCallbacks
    def test_spam_from_non_member_gets_no_notice(self):
        result = yield self.deliver(TEAM, message(EVE, TEAM), EVE, folder="Junk")
        self.assertEqual(result.status, SENT)
        self.assertEqual(self.take(), [])

    @defer.inlineCallbacks
    def test_post_with_our_x_loop_is_dropped(self):
        result = yield self.deliver(TEAM, message(ALICE, TEAM, headers=[("X-Loop", TEAM)]),
                                    ALICE, auth="alice")
        self.assertEqual(result.status, SENT)
        self.assertEqual(self.take(), [])
        self.assertEqual((yield self.store.get_list(TEAM)).post_sequence, 0)

    @defer.inlineCallbacks
    def test_own_copy_coming_back_is_dropped(self):
        """A distributed copy sent to the list again (a member forwarding to it, or a
        list subscribed to itself) is a loop: nothing is queued."""
        yield self.post_from_alice()
        [(_, copy)] = self.take()
        result = yield self.deliver(TEAM, copy.as_bytes(), ALICE, auth="alice")
        self.assertEqual(result.status, SENT)
        self.assertEqual(self.take(), [])

    @defer.inlineCallbacks
    def test_another_lists_x_loop_is_no_loop(self):
        """A copy of list ``bigteam`` (X-Loop and List-Post naming bigteam@) posted to
        team@ by a member: only this list's own address is a loop (lists.md 4.2)."""
        big = "bigteam@" + DOM
        result = yield self.deliver(TEAM, message(ALICE, TEAM, headers=[
            ("X-Loop", big), ("List-Post", f"<mailto:{big}>")]), ALICE, auth="alice")
        self.assertEqual(result.status, SENT)
        [(q, _)] = self.take()
        self.assertEqual(q.envelope.recipients, [ALICE, BOB])

    @defer.inlineCallbacks
    def test_same_message_id_distributed_once(self):
        yield self.post_from_alice(mid="<once@a.example>")
        self.assertEqual(len(self.take()), 1)
        yield self.post_from_alice(mid="<once@a.example>")
        self.assertEqual(self.take(), [])

    @defer.inlineCallbacks
    def test_same_message_id_after_a_restart(self):
        """The Message-IDs are kept in the state database: a queue entry recovered
        after a crash, or a resend after a restart, is not distributed twice; after
        seven days the same Message-ID is a new post."""
        data = message(ALICE, TEAM, mid="<restart@a.example>")
        yield self.deliver(TEAM, data, ALICE, auth="alice")
        self.assertEqual(len(self.take()), 1)
        self.service = self.make_service()          # a new process
        yield self.deliver(TEAM, data, ALICE, auth="alice")
        self.assertEqual(self.take(), [])
        self.advance(7 * DAY + 1)
        yield self.service.review()
        self.take()                                   # (dave's notice)
        yield self.deliver(TEAM, data, ALICE, auth="alice")
        self.assertEqual(len(self.take()), 1)

    @defer.inlineCallbacks
    def test_null_sender_post_is_dropped(self):
        result = yield self.deliver(TEAM, message(ALICE, TEAM), "", auth="alice")
        self.assertEqual(result.status, SENT)
        self.assertEqual(self.take(), [])

    @defer.inlineCallbacks
    def test_misaddressed_unsubscribe_is_refused_with_pointer(self):
        yield self.deliver(TEAM, message(BOB, TEAM, subject="unsubscribe", body=""), BOB,
                           auth="bob")
        [(q, notice)] = self.take()
        self.assertEqual(q.envelope.recipients, [BOB])
        self.assertIn(f"team-unsubscribe@{DOM}", text_of(notice))

    @defer.inlineCallbacks
    def test_failed_distribution_is_deferred_and_redone(self):
        """When queueing the distribution fails the delivery is deferred (the queue
        tries again); the next attempt must distribute the post."""
        self.fail_first_queueing()
        data = message(ALICE, TEAM, mid="<retry@a.example>")
        result = yield self.deliver(TEAM, data, ALICE, auth="alice")
        self.assertEqual((result.status, result.enhanced), ("deferred", "4.3.0"))
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
        self.assertEqual(self.take(), [])
        result = yield self.deliver(TEAM, data, ALICE, auth="alice")
        self.assertEqual(result.status, SENT)
        [(q, _)] = self.take()
        self.assertEqual(q.envelope.recipients, [ALICE, BOB])

    @defer.inlineCallbacks
    def test_refused_post_does_not_block_a_later_one(self):
        """A post refused (not a member yet) is not 'accepted by the list' (4.2): sent
        again with the same Message-ID after subscribing, it is distributed."""
        data = message(EVE, TEAM, mid="<again@e.example>")
        yield self.deliver(TEAM, data, EVE, auth="eve")
        self.assertEqual(len(self.take()), 1)          # the refusal
        yield self.store.add_member(TEAM, EVE)
        yield self.deliver(TEAM, data, EVE, auth="eve")
        [(q, _)] = self.take()
        self.assertIn(EVE, q.envelope.recipients)


class CommandTests(ServiceCase):

    @defer.inlineCallbacks
    def test_subscribe_address_sends_a_confirmation_to_the_sender(self):
        sub = "team-subscribe@" + DOM
        result = yield self.deliver(sub, message(EVE, sub, subject="please", body="SIGNOFF x\r\n"),
                                    EVE)
        self.assertEqual(result.status, SENT)
        [(q, conf)] = self.take()
        self.assertEqual((q.envelope.sender, q.envelope.recipients), (TEAM_BOUNCES, [EVE]))
        token = _TOKEN.search(conf["Subject"]).group(0)
        self.assertEqual(conf["Subject"], f"AUTH {token} SUBSCRIBE team")
        self.assertEqual(conf["Reply-To"], f"team-confirm+{token}@{DOM}")
        self.assertEqual(conf["X-Loop"], ROBOT)
        self.assertIsNone((yield self.member(EVE)))
        # A reply to the confirm address makes eve a member and welcomes her.
        confirm = conf["Reply-To"]
        yield self.deliver(confirm, message(EVE, confirm, subject="Re: x"), EVE)
        [(q, welcome)] = self.take()
        self.assertEqual((q.envelope.recipients, welcome["Subject"]), ([EVE], "Welcome to team"))
        self.assertIsNotNone((yield self.member(EVE)))

    @defer.inlineCallbacks
    def test_welcome_goes_out_with_verp(self):
        """lists.md 4.7: welcomes go out with VERP so a dead new address is found at once."""
        sub = "team-subscribe@" + DOM
        yield self.deliver(sub, message(EVE, sub), EVE)
        [(_, conf)] = self.take()
        yield self.deliver(conf["Reply-To"], message(EVE, conf["Reply-To"]), EVE)
        [(q, _)] = self.take()
        eve = yield self.member(EVE)
        where = yield self.service.classify(q.envelope.sender_of(0))
        self.assertEqual(addresses.verify_bounce_recipient(where, KEY, EVE)[0], eve.id)

    @defer.inlineCallbacks
    def test_failed_command_queueing_is_redone(self):
        """When queueing the confirmation fails the delivery is deferred; the queue's
        next attempt must still produce a confirmation request."""
        self.fail_first_queueing()
        sub = "team-subscribe@" + DOM
        data = message(EVE, sub, mid="<sub@e.example>")
        result = yield self.deliver(sub, data, EVE)
        self.assertEqual(result.status, "deferred")
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
        result = yield self.deliver(sub, data, EVE)
        self.assertEqual(result.status, SENT)
        [(q, conf)] = self.take()
        self.assertEqual(q.envelope.recipients, [EVE])
        self.assertTrue(conf["Subject"].startswith("AUTH "))

    @defer.inlineCallbacks
    def test_same_command_mail_executed_once(self):
        """A command mail delivered twice (a client resending it) is answered once."""
        data = message(BOB, ROBOT, body="WHICH\r\n", mid="<twice@b.example>")
        yield self.deliver(ROBOT, data, BOB)
        self.assertEqual(len(self.take()), 1)
        result = yield self.deliver(ROBOT, data, BOB)
        self.assertEqual(result.status, SENT)
        self.assertEqual(self.take(), [])

    @defer.inlineCallbacks
    def test_robot_and_request_address_reply(self):
        result = yield self.deliver(ROBOT, message(BOB, ROBOT, body="WHICH\r\n"), BOB)
        self.assertEqual(result.status, SENT)
        [(q, reply)] = self.take()
        self.assertEqual((q.envelope.sender, q.envelope.recipients), (ROBOT, [BOB]))
        self.assertEqual(reply["Subject"], "Results of your commands")
        self.assertIn("team (member)", text_of(reply))
        req = "team-request@" + DOM
        yield self.deliver(req, message(BOB, req, body="SET nomail\r\n"), BOB)
        [(q, reply)] = self.take()
        self.assertEqual(q.envelope.recipients, [BOB])
        self.assertEqual((yield self.member(BOB)).mode, "nomail")

    @defer.inlineCallbacks
    def test_unsubscribe_address_with_dkim(self):
        unsub = "team-unsubscribe@" + DOM
        yield self.deliver(unsub, message(BOB, unsub), BOB, auth="bob")
        self.assertIsNone((yield self.member(BOB)))
        [(q, goodbye)] = self.take()
        self.assertEqual((q.envelope.recipients, goodbye["Subject"]), ([BOB], "You left team"))

    @defer.inlineCallbacks
    def test_command_from_a_list_address_is_dropped(self):
        yield self.service.classify(TEAM)         # the domain's list names are known
        result = yield self.deliver(ROBOT, message(TEAM, ROBOT, body="HELP\r\n"), TEAM)
        self.assertEqual(result.status, SENT)
        self.assertEqual(self.take(), [])

    @defer.inlineCallbacks
    def test_command_from_a_list_address_is_dropped_before_names_are_read(self):
        """The same mail as the first one after a start: no list address was
        classified yet, so ``is_own`` has no names of the domain."""
        result = yield self.deliver(ROBOT, message(TEAM, ROBOT, body="HELP\r\n"), TEAM)
        self.assertEqual(result.status, SENT)
        self.assertEqual(self.take(), [])


class FailureTests(ServiceCase):
    """A queue write that fails (a full disk) must never lose a post."""

    @defer.inlineCallbacks
    def test_failed_distribute_leaves_the_key_usable(self):
        key = tokens.new_token()
        now = self.clock.seconds()
        yield self.store.hold(TEAM, tokens.MODERATION, tokens.hash_token(key), now + 14 * DAY,
                              now=now, target=ALICE, requester=ALICE, subject="held",
                              message=message(ALICE, TEAM, subject="held"))
        self.fail_first_queueing()
        command = message(MO, ROBOT, body=f"DISTRIBUTE team {key}\r\n")
        yield self.deliver(ROBOT, command, MO, auth="mo")
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
        # The moderator hears of an internal error, the listmaster gets an alert.
        told = {q.envelope.recipients[0]: m for q, m in self.take()}
        self.assertEqual(sorted(told), sorted([LISTMASTER, MO]))
        self.assertIn("Internal error", text_of(told[MO]))
        # The moderator tries again (another mail): distributed once.
        yield self.deliver(ROBOT, message(MO, ROBOT, body=f"DISTRIBUTE team {key}\r\n"),
                           MO, auth="mo")
        copies = [q for q, m in self.take() if m["List-Id"]]
        self.assertEqual([q.envelope.recipients for q in copies], [[ALICE, BOB]])
        self.assertEqual((yield self.store.held_waiting(TEAM, tokens.MODERATION)), [])

    @defer.inlineCallbacks
    def test_failed_moderation_mail_is_sent_on_the_retry(self):
        ml = yield self.store.get_list(TEAM)
        yield self.store.update_list(TEAM, settings=dict(
            ml.settings, scenarios={"send": "editorkeyonly"}))
        self.fail_first_queueing()
        data = message(ALICE, TEAM, mid="<mod@a.example>")
        result = yield self.deliver(TEAM, data, ALICE, auth="alice")
        self.assertEqual(result.status, "deferred")
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
        result = yield self.deliver(TEAM, data, ALICE, auth="alice")
        self.assertEqual(result.status, SENT)
        mails = [m for q, m in self.take() if str(m["Subject"]).startswith("Moderation")]
        self.assertEqual(len(mails), 1)
        self.assertRegex(text_of(mails[0]), r"DISTRIBUTE team [0-9a-f]{32}")
        # Once held and announced, the same Message-ID is a duplicate.
        yield self.deliver(TEAM, data, ALICE, auth="alice")
        self.assertEqual(self.take(), [])

    @defer.inlineCallbacks
    def test_a_failing_review_step_does_not_stop_the_hourly_round(self):
        calls = []
        real = self.store.expire_held

        def expire_held(now):
            calls.append(now)
            if len(calls) == 1:
                return defer.fail(RuntimeError("database is locked"))
            return real(now)
        self.store.expire_held = expire_held
        # review() itself never fails (a LoopingCall stops at the first error)...
        yield self.service.review()
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        # ...and the round's other steps still ran: dave, disabled, got his notice.
        [(q, _)] = self.take()
        self.assertEqual(q.envelope.recipients, [DAVE])
        self.advance(REVIEW_EVERY)
        yield self.service.review()
        self.assertEqual(len(calls), 2)


class ForwardTests(ServiceCase):

    @defer.inlineCallbacks
    def test_owner_address_forwarded_with_x_loop_once(self):
        owner = "team-owner@" + DOM
        data = message(EVE, owner, subject="Question")
        result = yield self.deliver(owner, data, EVE)
        self.assertEqual(result.status, SENT)
        [(q, fwd)] = self.take()
        self.assertEqual((q.envelope.sender, q.envelope.recipients), (TEAM_BOUNCES, [OLGA]))
        self.assertTrue(q.data.startswith(f"X-Loop: {owner}\r\n".encode()), q.data[:80])
        self.assertEqual(q.data[len(f"X-Loop: {owner}\r\n"):], data)
        self.assertEqual((fwd["From"], fwd["Subject"]), (EVE, "Question"))
        # The forwarded mail coming back to -owner (an owner forwarding to it) stops.
        result = yield self.deliver(owner, q.data, EVE)
        self.assertEqual(result.status, SENT)
        self.assertEqual(self.take(), [])

    @defer.inlineCallbacks
    def test_another_lists_owner_x_loop_is_no_loop(self):
        """Mail that went through bigteam-owner@ (an owner of bigteam forwarding it
        to team-owner@) is forwarded: it never went through team-owner@."""
        owner = "team-owner@" + DOM
        result = yield self.deliver(owner, message(EVE, owner, headers=[
            ("X-Loop", "bigteam-owner@" + DOM)]), EVE)
        self.assertEqual(result.status, SENT)
        [(q, _)] = self.take()
        self.assertEqual(q.envelope.recipients, [OLGA])

    @defer.inlineCallbacks
    def test_spam_to_the_owner_address_is_not_forwarded(self):
        owner = "team-owner@" + DOM
        result = yield self.deliver(owner, message(EVE, owner, subject="pills"), EVE,
                                    folder="Junk")
        self.assertEqual(result.status, SENT)
        self.assertEqual(self.take(), [])

    @defer.inlineCallbacks
    def test_editor_address_goes_to_moderators_else_owners(self):
        editor = "team-editor@" + DOM
        yield self.deliver(editor, message(EVE, editor), EVE)
        [(q, fwd)] = self.take()
        self.assertEqual(q.envelope.recipients, [MO])
        self.assertEqual(fwd["X-Loop"], editor)
        yield self.store.remove_role(TEAM, MO, "moderator")
        yield self.deliver(editor, message(EVE, editor), EVE)
        [(q, _)] = self.take()
        self.assertEqual(q.envelope.recipients, [OLGA])

    @defer.inlineCallbacks
    def test_listmaster_address_goes_to_the_listmasters(self):
        lm = "listmaster@" + DOM
        yield self.deliver(lm, message(EVE, lm), EVE)
        [(q, fwd)] = self.take()
        self.assertEqual((q.envelope.sender, q.envelope.recipients), (ROBOT, [LISTMASTER]))
        self.assertEqual(fwd["X-Loop"], lm)
        # Even from the null sender (a bounce is the listmasters' business).
        yield self.deliver(lm, message(EVE, lm), "")
        self.assertEqual(len(self.take()), 1)

    @defer.inlineCallbacks
    def test_null_sender_mail_to_owner_is_dropped(self):
        owner = "team-owner@" + DOM
        yield self.deliver(owner, dsn(owner, OLGA), "")
        self.assertEqual(self.take(), [])

    @defer.inlineCallbacks
    def test_owners_of_a_list_without_owners_are_the_listmasters(self):
        yield self.store.create_list("orphan@" + DOM)
        self.advance(NAMES_TTL + 1)
        owner = "orphan-owner@" + DOM
        yield self.deliver(owner, message(EVE, owner), EVE)
        [(q, _)] = self.take()
        self.assertEqual((q.envelope.sender, q.envelope.recipients),
                         ("orphan-bounces@" + DOM, [LISTMASTER]))


class BounceTests(ServiceCase):

    @defer.inlineCallbacks
    def bounce(self, address, member, status="5.1.1", action="failed"):
        result = yield self.deliver(address, dsn(address, member, status, action), "")
        self.assertEqual(result.status, SENT)

    @defer.inlineCallbacks
    def verp_of(self, who, sequence=1):
        m = yield self.member(who)
        return addresses.verp_sender("team", DOM, m.id, sequence, KEY, m.address)

    @defer.inlineCallbacks
    def test_bounce_of_a_distributed_copy_scores_its_member(self):
        yield self.post_from_alice()
        [(q, _)] = self.take()
        bob_verp = q.envelope.senders[q.envelope.recipients.index(BOB)]
        yield self.bounce(bob_verp, BOB)
        bob = yield self.member(BOB)
        self.assertEqual((bob.bounce_score, bob.last_bounce, bob.disabled_since),
                         (1.0, START, 0.0))
        alice = yield self.member(ALICE)
        self.assertEqual(alice.bounce_score, 0.0)
        self.assertEqual(self.take(), [])

    @defer.inlineCallbacks
    def test_tampered_or_foreign_tag_changes_nothing(self):
        good = yield self.verp_of(BOB)
        local, _, domain = good.partition("@")
        head, _, tag = local.partition("+")
        flipped = tag[:-1] + ("a" if tag[-1] != "a" else "b")
        yield self.bounce(f"{head}+{flipped}@{domain}", BOB)
        # A tag another appliance (key) made for the same member and post.
        bob = yield self.member(BOB)
        yield self.bounce(addresses.verp_sender("team", DOM, bob.id, 1, b"k" * 32, BOB), BOB)
        # A tag made for another address (bob's id before bob had it).
        yield self.bounce(addresses.verp_sender("team", DOM, bob.id, 1, KEY, EVE), BOB)
        # The plain bounce address names nobody.
        yield self.bounce(TEAM_BOUNCES, BOB)
        bob = yield self.member(BOB)
        self.assertEqual((bob.bounce_score, bob.last_bounce), (0.0, 0.0))
        self.assertEqual(self.take(), [])

    @defer.inlineCallbacks
    def test_temporary_and_policy_failures_count_half(self):
        # A copy given up on with a temporary status (a mailbox full for days).
        yield self.bounce((yield self.verp_of(BOB)), BOB, status="4.2.2")
        self.assertEqual((yield self.member(BOB)).bounce_score, 0.5)
        self.advance(DAY)
        yield self.bounce((yield self.verp_of(BOB)), BOB, status="5.7.1")
        self.assertEqual((yield self.member(BOB)).bounce_score, 1.0)

    @defer.inlineCallbacks
    def test_five_bounces_on_five_days_disable_and_tell_the_owners(self):
        verp = yield self.verp_of(BOB)
        for day in range(5):
            yield self.bounce(verp, BOB)
            # The same day's further bounces count once.
            yield self.bounce(verp, BOB)
            bob = yield self.member(BOB)
            self.assertEqual(bob.bounce_score, day + 1.0)
            if day < 4:
                self.assertEqual(bob.disabled_since, 0.0)
                self.assertEqual(self.take(), [])
                self.advance(DAY)
        self.assertEqual(bob.disabled_since, self.clock.seconds())
        [(q, notice)] = self.take()
        self.assertEqual((q.envelope.sender, q.envelope.recipients), (TEAM_BOUNCES, [OLGA]))
        self.assertEqual(notice["Subject"], "Bounces on team")
        self.assertIn(BOB, text_of(notice))
        self.assertEqual(notice["Auto-Submitted"], "auto-generated")
        # bob is kept but gets no copies any more.
        yield self.post_from_alice()
        [(q, _)] = self.take()
        self.assertEqual(q.envelope.recipients, [ALICE])
        # A further bounce of the disabled member does not tell the owners again.
        self.advance(DAY)
        yield self.bounce(verp, BOB)
        self.assertEqual(self.take(), [])

    @defer.inlineCallbacks
    def test_score_starts_again_after_a_quiet_week(self):
        verp = yield self.verp_of(BOB)
        for _ in range(4):
            yield self.bounce(verp, BOB)
            self.advance(DAY)
        self.assertEqual((yield self.member(BOB)).bounce_score, 4.0)
        self.advance(bounces.RESET_AFTER)
        yield self.bounce(verp, BOB)
        bob = yield self.member(BOB)
        self.assertEqual((bob.bounce_score, bob.disabled_since), (1.0, 0.0))

    @defer.inlineCallbacks
    def test_bounce_for_a_former_member_is_ignored(self):
        verp = yield self.verp_of(BOB)
        yield self.store.remove_member(TEAM, BOB)
        yield self.bounce(verp, BOB)
        self.assertEqual(self.take(), [])
        # Subscribing again makes a new member id: the old tag still names nobody.
        yield self.store.add_member(TEAM, BOB)
        yield self.bounce(verp, BOB)
        self.assertEqual((yield self.member(BOB)).bounce_score, 0.0)

    @defer.inlineCallbacks
    def test_late_bounce_of_a_removed_member_never_scores_its_ids_next_owner(self):
        """SQLite gives the id of the last member removed to the next one added: the
        tag's HMAC covers the address, so the old tag names nobody."""
        yield self.store.add_member(TEAM, "typo@b.example", now=1.0)
        old = yield self.member("typo@b.example")
        verp = addresses.verp_sender("team", DOM, old.id, 0, KEY, "typo@b.example")
        yield self.store.remove_member(TEAM, "typo@b.example")
        yield self.store.add_member(TEAM, "right@b.example", now=2.0)
        right = yield self.member("right@b.example")
        self.assertEqual(right.id, old.id)           # what makes the case
        yield self.bounce(verp, "typo@b.example")
        self.assertEqual((yield self.member("right@b.example")).bounce_score, 0.0)

    @defer.inlineCallbacks
    def test_abuse_report_unsubscribes_the_member(self):
        """lists.md 4.7: an ARF complaint naming a member (by the copy's VERP
        address) unsubscribes it and the owners are told."""
        yield self.post_from_alice()
        self.take()
        verp = yield self.verp_of(BOB)
        result = yield self.deliver(verp, arf(verp, BOB), "")
        self.assertEqual(result.status, SENT)
        self.assertIsNone((yield self.member(BOB)))
        told = {q.envelope.recipients[0]: m for q, m in self.take()}
        self.assertEqual(sorted(told), [BOB, OLGA])
        self.assertIn(f"{BOB} reported mail from {TEAM} as spam", text_of(told[OLGA]))
        self.assertIn(f"team-subscribe@{DOM}", text_of(told[BOB]))
        # Other feedback (a "not spam"), a report about another list's mail, or a
        # forged tag change nothing.
        alice = yield self.verp_of(ALICE)
        yield self.deliver(alice, arf(alice, ALICE, feedback_type="not-spam"), "")
        yield self.deliver(alice, arf(alice, ALICE, list_id="other.lists.example.org"), "")
        yield self.deliver(TEAM_BOUNCES.replace("@", "+aaaaaaaaaaaaaaaaaaaaaaaaaa@"),
                           arf(TEAM_BOUNCES, ALICE), "")
        self.assertIsNotNone((yield self.member(ALICE)))

    @defer.inlineCallbacks
    def test_abuse_report_about_an_old_post_is_ignored(self):
        """A tag seen long ago (a forwarded copy shows it) cannot remove its member."""
        old = yield self.verp_of(ALICE, sequence=1)
        for _ in range(101):
            yield self.store.next_post(TEAM)
        yield self.deliver(old, arf(old, ALICE), "")
        self.assertIsNotNone((yield self.member(ALICE)))
        # The welcome's tag (sequence 0) never changes: only for a new membership.
        welcome = yield self.verp_of(ALICE, sequence=0)
        yield self.deliver(welcome, arf(welcome, ALICE), "")
        self.assertIsNotNone((yield self.member(ALICE)))
        recent = yield self.verp_of(ALICE, sequence=101)
        yield self.deliver(recent, arf(recent, ALICE), "")
        self.assertIsNone((yield self.member(ALICE)))
        yield self.store.add_member(TEAM, ALICE, now=self.clock.seconds())
        welcome = yield self.verp_of(ALICE, sequence=0)
        yield self.deliver(welcome, arf(welcome, ALICE), "")
        self.assertIsNone((yield self.member(ALICE)))

    @defer.inlineCallbacks
    def test_delay_warning_is_not_a_bounce(self):
        """RFC 3464 "delayed" is a warning: the copy may still arrive."""
        verp = yield self.verp_of(BOB)
        yield self.bounce(verp, BOB, status="4.4.1", action="delayed")
        self.assertEqual((yield self.member(BOB)).bounce_score, 0.0)

    @defer.inlineCallbacks
    def test_mass_bounce_is_not_scored_and_owners_warned_once(self):
        people = [f"m{i:02d}@m.example" for i in range(10)]
        for p in people:
            yield self.store.add_member(TEAM, p)
        yield self.post_from_alice()
        [(q, _)] = self.take()
        self.assertEqual(len(q.envelope.recipients), 12)
        by_rcpt = dict(zip(q.envelope.recipients, q.envelope.senders))
        for p in people[:6]:
            yield self.bounce(by_rcpt[p], p, status="5.7.1")
        scored = []
        for p in people[:6]:
            scored.append((yield self.member(p)).bounce_score)
        # 3 of 12 copies (25%) are scored; from the 4th (30%) on nothing is.
        self.assertEqual(scored, [0.5, 0.5, 0.5, 0.0, 0.0, 0.0])
        [(q, warning)] = self.take()
        self.assertEqual(q.envelope.recipients, [OLGA, LISTMASTER])
        self.assertIn("Many copies of post #1", text_of(warning))

    @defer.inlineCallbacks
    def test_mass_bounce_warns_the_listmasters_too(self):
        """lists.md 4.7: at 30 % bounces "owners and listmaster are warned"."""
        people = [f"m{i:02d}@m.example" for i in range(10)]
        for p in people:
            yield self.store.add_member(TEAM, p)
        yield self.post_from_alice()
        [(q, _)] = self.take()
        by_rcpt = dict(zip(q.envelope.recipients, q.envelope.senders))
        for p in people[:4]:
            yield self.bounce(by_rcpt[p], p)
        told = set()
        for q, _ in self.take():
            told.update(q.envelope.recipients)
        self.assertEqual(told, {OLGA, LISTMASTER})

    @defer.inlineCallbacks
    def test_success_report_is_no_bounce(self):
        """A delivery report saying the copy was delivered (2.0.0) scores nothing."""
        yield self.bounce((yield self.verp_of(BOB)), BOB, status="2.0.0", action="delivered")
        self.assertEqual((yield self.member(BOB)).bounce_score, 0.0)

    @defer.inlineCallbacks
    def test_vacation_reply_to_verp_address_is_no_bounce(self):
        """An auto-reply sent to the envelope sender (RFC 3834) is no delivery failure:
        lists.md 4.7 has unparseable bounces counted in a summary, not scored."""
        verp = yield self.verp_of(BOB)
        reply = message(BOB, verp, subject="Out of office",
                        headers=[("Auto-Submitted", "auto-replied")],
                        body="I am away until Monday.\r\n")
        result = yield self.deliver(verp, reply, BOB)
        self.assertEqual(result.status, SENT)
        self.assertEqual((yield self.member(BOB)).bounce_score, 0.0)
        self.assertEqual(self.take(), [])        # nothing forwarded one by one

    @defer.inlineCallbacks
    def test_owners_get_a_daily_count_of_non_reports(self):
        verp = yield self.verp_of(BOB)
        for _ in range(2):
            yield self.deliver(verp, message(BOB, verp, subject="Away"), BOB)

        def summaries():
            # (dave, disabled in the fixture, gets his notices in the same rounds)
            return [(q, m) for q, m in self.take() if m["Subject"].startswith("Bounces on")]
        yield self.service.review()                  # the hour's round: not a day yet
        self.assertEqual(summaries(), [])
        self.advance(DAY)
        yield self.service.review()
        [(q, summary)] = summaries()
        self.assertEqual(q.envelope.recipients, [OLGA])
        self.assertIn("2 mail(s) sent to the bounce addresses of " + TEAM, text_of(summary))
        self.advance(DAY)
        yield self.service.review()                  # nothing new: no summary
        self.assertEqual(summaries(), [])

    @defer.inlineCallbacks
    def test_non_reports_kept_for_a_week(self):
        verp = yield self.verp_of(BOB)
        away = message(BOB, verp, subject="Away")
        for _ in range(2):
            yield self.deliver(verp, away, BOB)
        folder = os.path.join(self.root, "lists", "unparsed", TEAM)
        kept = sorted(os.listdir(folder))
        self.assertEqual(len(kept), 2)
        with open(os.path.join(folder, kept[0]), "rb") as f:
            self.assertEqual(f.read(), away)
        self.advance(6 * DAY)
        yield self.service.review()
        self.assertEqual(len(os.listdir(folder)), 2)
        self.advance(DAY + 1)
        yield self.service.review()
        self.assertEqual(os.listdir(folder), [])


class ReenableAndReviewTests(ServiceCase):

    @defer.inlineCallbacks
    def test_set_mail_by_a_disabled_member_enables_it_again(self):
        dave = yield self.member(DAVE)
        self.assertTrue(dave.disabled_since)
        yield self.deliver(ROBOT, message(DAVE, ROBOT, body="SET team MAIL\r\n"), DAVE)
        [(q, reply)] = self.take()
        self.assertEqual(q.envelope.recipients, [DAVE])
        self.assertIn("Your setting on team is now MAIL.", text_of(reply))
        dave = yield self.member(DAVE)
        self.assertEqual((dave.mode, dave.bounce_score, dave.disabled_since,
                          dave.bounce_notices), ("mail", 0.0, 0.0, 0))
        yield self.post_from_alice()
        [(q, _)] = self.take()
        self.assertEqual(q.envelope.recipients, [ALICE, BOB, DAVE])

    @defer.inlineCallbacks
    def test_set_nomail_keeps_a_disabled_member_disabled(self):
        yield self.deliver(ROBOT, message(DAVE, ROBOT, body="SET team NOMAIL\r\n"), DAVE)
        dave = yield self.member(DAVE)
        self.assertEqual((dave.mode, dave.disabled_since), ("nomail", START - DAY))

    @defer.inlineCallbacks
    def test_review_sends_three_notices_then_removes(self):
        disabled = START - DAY
        yield self.service.review_disabled()
        [(q, notice)] = self.take()
        self.assertEqual((q.envelope.sender, q.envelope.recipients), (TEAM_BOUNCES, [DAVE]))
        self.assertEqual(notice["Subject"], "Your membership of team")
        token = _TOKEN.search(text_of(notice)).group(0)
        self.assertIn(f"CONFIRM {token}", text_of(notice))
        self.assertEqual(notice["Reply-To"], f"team-confirm+{token}@{DOM}")
        self.assertEqual((yield self.member(DAVE)).bounce_notices, 1)
        # Nothing more until the next week.
        yield self.service.review_disabled()
        self.assertEqual(self.take(), [])
        for n in (2, 3):
            self.clock.advance(disabled + (n - 1) * bounces.NOTICE_EVERY
                               - self.clock.seconds())
            yield self.service.review_disabled()
            [(q, _)] = self.take()
            self.assertEqual(q.envelope.recipients, [DAVE])
            self.assertEqual((yield self.member(DAVE)).bounce_notices, n)
        # After the third notice's week: still there a moment before, removed at it.
        self.clock.advance(disabled + 3 * bounces.NOTICE_EVERY - 1 - self.clock.seconds())
        yield self.service.review_disabled()
        self.assertEqual(self.take(), [])
        self.assertIsNotNone((yield self.member(DAVE)))
        self.advance(1)
        yield self.service.review_disabled()
        self.assertIsNone((yield self.member(DAVE)))
        [(q, told)] = self.take()
        self.assertEqual(q.envelope.recipients, [OLGA])
        self.assertIn(f"{DAVE} was removed from {TEAM}", text_of(told))
        # Members in good standing were never touched.
        self.assertIsNotNone((yield self.member(ALICE)))
        self.assertIsNotNone((yield self.member(BOB)))

    @defer.inlineCallbacks
    def test_reply_to_a_notice_enables_delivery_again(self):
        yield self.service.review_disabled()
        [(_, notice)] = self.take()
        confirm = notice["Reply-To"]
        result = yield self.deliver(confirm, message(DAVE, confirm, subject="Re: x"), DAVE)
        self.assertEqual(result.status, SENT)
        dave = yield self.member(DAVE)
        self.assertEqual((dave.mode, dave.bounce_score, dave.disabled_since,
                          dave.bounce_notices), ("mail", 0.0, 0.0, 0))
        self.take()
        # The token is spent: a second reply changes nothing and says so.
        yield self.store.set_member(TEAM, DAVE, disabled_since=START)
        yield self.deliver(confirm, message(DAVE, confirm, subject="Re: x"), DAVE)
        self.assertEqual((yield self.member(DAVE)).disabled_since, START)

    @defer.inlineCallbacks
    def test_expired_moderated_post_author_told(self):
        ann = "ann@" + DOM
        yield self.store.create_list(ann, settings={"scenarios": {"send": "editorkeyonly"}})
        yield self.store.add_role(ann, MO, "moderator")
        yield self.store.add_member(ann, ALICE)
        self.advance(NAMES_TTL + 1)
        yield self.deliver(ann, message(ALICE, ann, subject="News"), ALICE, auth="alice")
        held = self.take()
        self.assertEqual(sorted(q.envelope.recipients[0] for q, _ in held), [ALICE, MO])
        self.advance(15 * DAY)
        yield self.service.expire_held()
        [(q, told)] = self.take()
        self.assertEqual(q.envelope.recipients, [ALICE])
        self.assertIn("not approved", text_of(told))

    @defer.inlineCallbacks
    def test_expired_spam_post_author_not_told(self):
        """A spam-tagged outsider post held quietly (3.3): nothing goes to its
        (probably forged) From, not even when it expires."""
        ml = yield self.store.get_list(TEAM)
        yield self.store.update_list(TEAM, settings=dict(
            ml.settings, scenarios={"send": "privateoreditorkey"}))
        spammer = "forged@victim.example"
        yield self.deliver(TEAM, message(spammer, TEAM, subject="cheap pills"), spammer,
                           folder="Junk")
        self.assertEqual([q.envelope.recipients for q, _ in self.take()], [[MO]])
        self.advance(15 * DAY)
        yield self.service.expire_held()
        self.assertEqual(self.take(), [])


@implementer(IRemoteDelivery)
class BouncingRemote:
    """Sends everything except to the addresses in ``gone`` (5.1.1); records
    (envelope sender, domain, [addresses]) of each call."""

    def __init__(self, gone=()):
        self.gone = set(gone)
        self.calls = []

    def deliver(self, message, domain, recipients):
        self.calls.append((message.envelope.sender, domain, [r.address for r in recipients]))
        out = {}
        for r in recipients:
            if r.address in self.gone:
                out[r.idx] = RecipientResult(BOUNCED, "5.1.1",
                                             f"550 5.1.1 <{r.address}>: User unknown",
                                             "mx." + domain, True)
            else:
                out[r.idx] = RecipientResult(SENT, "2.0.0", "250 2.0.0 Ok", "mx." + domain, True)
        return defer.succeed(out)

    def flush(self, domain=None):
        pass


class ThroughTheQueueTests(ServiceCase):
    """The list server behind a real queue manager: a post to team@ is routed to it,
    its copies go out with their VERP senders, and the queue's own bounce of one
    copy comes back to the list server and scores that member."""

    @defer.inlineCallbacks
    def test_post_distribution_and_bounce_round_trip(self):
        directory = FakeDirectory(domains=("example.org", DOM))
        router = Router(directory, ("example.org", DOM), lists=self.service)
        local = MaildirDelivery(reactor, os.path.join(self.root, "mail"), HOST)
        self.addCleanup(local.worker.stop)
        remote = BouncingRemote(gone={BOB})
        manager = QueueManager(self.reactor, self.config, self.spool, router, local,
                               remote_agent=remote, list_agent=self.service)
        self.service.submit = manager.submit
        yield manager.startService()
        self.addCleanup(lambda: manager.stopService() if manager.running else None)
        inc = self.spool.new_message(Envelope(sender=ALICE, recipients=[TEAM],
                                              arrival=self.clock.seconds(), auth="alice"))
        inc.write_header()
        inc.write(message(ALICE, TEAM, subject="Round trip"))
        manager.submit((yield self.spool.commit(inc)))
        for _ in range(200):
            yield manager.when_idle()
            yield task.deferLater(reactor, 0, lambda: None)
            if (yield self.member(BOB)).bounce_score:
                break
        alice, bob = (yield self.member(ALICE)), (yield self.member(BOB))
        senders = {rcpts[0]: sender for sender, _, rcpts in remote.calls}
        self.assertEqual(sorted(senders), [ALICE, BOB])
        self.assertEqual(senders[ALICE],
                         addresses.verp_sender("team", DOM, alice.id, 1, KEY, ALICE))
        self.assertEqual(senders[BOB], addresses.verp_sender("team", DOM, bob.id, 1, KEY, BOB))
        self.assertEqual(len(remote.calls), 2)
        # The queue's notice about bob went to bob's VERP address, i.e. back to the list.
        self.assertEqual((bob.bounce_score, alice.bounce_score), (1.0, 0.0))
        yield manager.when_idle()
        self.assertEqual(sorted(n for n in os.listdir(self.spool.active_dir)
                                if not n.endswith(".status")), [])
