"""The list server as the queue sees it: the delivery agent of list addresses.

The router asks ``classify`` whether a recipient is a list address (the robot,
``LIST@``, ``LIST-request@``, ... at a list domain) and hands such a recipient
to ``deliver`` as a target of kind "list". What the mail is for decides where
it goes:

* commands (robot, ``-request``, ``-subscribe``, ``-unsubscribe``,
  ``-confirm+TOKEN``) to the ``CommandRobot``;
* a post to ``LIST@`` through ``CommandRobot.post`` (input checks, the
  ``send`` scenario) and, when it may go out, to ``distribute``;
* ``-owner``, ``-editor`` and ``listmaster`` forwarded to the people behind
  them with an ``X-Loop`` field, never twice through the same address;
* ``-bounces+TAG`` to the bounce scoring of the member the HMAC-checked
  tag names (lists.md 4.7); other mail there is only logged.

``distribute`` writes ONE queue entry per post: the prepared copy, every
member who takes single copies as a recipient, and for each its own VERP
envelope sender ``LIST-bounces+TAG@domain`` (``Envelope.senders``), so the
queue sends one transaction per member and a bounce names the member.

Whatever the list server sends (replies, confirmations, notices, the
distribution) is committed to the spool before the mail that caused it counts
as delivered: a crash in between repeats the work, it never loses it.
"""

from __future__ import annotations

import collections
import email
import email.message
import email.policy
import email.utils
import os

from twisted.application.service import Service
from twisted.internet import defer, task, threads
from twisted.logger import Logger
from zope.interface import implementer

from mailbox_appliance.antispam import dmarc
from mailbox_appliance.antispam.dkim_keys import KeyStore
from mailbox_appliance.antispam.dkim_sign import nacl_available, sign_message
from mailbox_appliance.delivery.result import DEFERRED, SENT, RecipientResult
from mailbox_appliance.interfaces import IListAgent
from mailbox_appliance.lists import addresses, bounces, posting, replies, tokens
from mailbox_appliance.lists.replies import field_names, message_id_of
from mailbox_appliance.lists.robot import QUIET_HOLD, CommandRobot
from mailbox_appliance.lists.scenario import ScenarioLibrary
from mailbox_appliance.maillog import mail_event
from mailbox_appliance.queue.spool import Envelope

KEY_FILE = "verp.key"
KEY_BYTES = 32
NAMES_TTL = 2.0             # seconds a domain's list names are trusted before re-reading
MAX_READ = 64 * 1024 * 1024  # the queue's own bound is lower; this only guards memory
PAGE = 1000                 # members read at a time while distributing
MAX_SEQUENCES = 1000        # distributions whose bounce counts are kept for the mass-bounce guard
REVIEW_EVERY = 3600.0       # how often expiries and disabled members are looked at
SUMMARY_EVERY = 86400.0     # how often owners hear of mail to -bounces that was no report
SEEN_POSTS_FOR = 7 * 86400.0  # how long a post's Message-ID makes a resend a duplicate
COMPLAINT_POSTS = 100       # an abuse report counts for the latest so many posts
COMPLAINT_WELCOME_DAYS = 30  # ... and about the welcome so many days after joining
UNPARSED_DAYS = 7           # how long mail to -bounces that was no report is kept
UNPARSED_KEPT = 500         # ... at most so many per list
UNPARSED_BYTES = 256 * 1024  # ... and of each at most its first so many octets
# Delivery modes that take single copies (the digest of 4.8 will take "digest").
SINGLE_COPY_MODES = frozenset({"mail", "not_me", "txt", "html", "urlize"})


def load_key(data_dir) -> bytes:
    """The VERP HMAC key of this appliance (``data_dir/lists/verp.key``), made on first use.

    Kept across restarts so that bounces of copies sent before a restart are
    still recognised; 0600 because whoever has it can forge bounce tags.
    """
    folder = os.path.join(data_dir, "lists")
    os.makedirs(folder, mode=0o700, exist_ok=True)
    path = os.path.join(folder, KEY_FILE)
    try:
        with open(path, "rb") as f:
            key = f.read()
        if len(key) >= 16:
            return key
    except FileNotFoundError:
        pass
    key = os.urandom(KEY_BYTES)
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, key)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    return key


def auth_method_of(msg, envelope, from_match):
    """The scenario auth level a message earned: "dkim" or "smtp" (lists.md 2.3).

    "dkim": a DKIM signature of the From: domain (or its parent) that the
    content scan verified for this very message (``envelope.dkim_pass``, the
    domains it found passing; never the text of a header field, which the
    sender can shape); or mail submitted by a logged-in user whose From: the
    submission port checks.
    """
    if envelope.auth and from_match:
        return "dkim"
    if not envelope.scanned or not envelope.dkim_pass:
        return "smtp"
    author = replies.sender_of(msg)
    domain = (author or "").rpartition("@")[2].rstrip(".")
    if not domain:
        return "smtp"
    for d in envelope.dkim_pass:
        d = str(d).lower().rstrip(".")
        if d == domain:
            return "dkim"
        # A parent's signature counts (relaxed alignment), a public suffix's
        # never: a platform signing for github.io does not vouch for each tenant.
        if d and domain.endswith("." + d) and \
                dmarc.public_suffix_list().privatesuffix(d) is not None:
            return "dkim"
    return "smtp"


@implementer(IListAgent)
class ListService(Service):
    """The list server: classifies list addresses and takes the mail sent to them.

    ``store`` an ``IListStore``; ``spool`` where outgoing mail is committed and
    ``submit(qmsg)`` (the queue manager's, set once it exists) schedules it.
    """

    log = Logger()

    def __init__(self, reactor, config, store, spool, submit=None, key=None):
        self.reactor = reactor
        self.config = config
        self.store = store
        self.spool = spool
        self.submit = submit
        self.hostname = config.server.hostname
        self.domains = frozenset(config.lists.list_domains(config.server))
        self.robot_name = config.lists.robot
        self.key = key if key is not None else load_key(config.server.data_dir)
        self.postmaster = (config.delivery.postmaster
                           or f"postmaster@{config.server.domains[0]}")
        self.listmasters = tuple(a.lower() for a in config.lists.listmasters)
        self.from_match = config.submission.from_header_match
        dk = config.antispam.dkim
        # The copies are signed for the list domain like submitted mail
        # (lists.md 4.1): receivers judge the list, not the author.
        self.dkim_keys = KeyStore(os.path.join(config.server.data_dir, dk.key_dir),
                                  dk.selector) if dk.sign else None
        self.library = ScenarioLibrary()
        self.robot = CommandRobot(store, self.library, reactor, robot_name=self.robot_name,
                                  listmasters=self.listmasters or (self.postmaster,),
                                  distribute=self.distribute, own_address=self.is_own,
                                  verp=self._welcome_sender)
        self._names = {}                # domain -> (until, frozenset of list names)
        self._sent = collections.OrderedDict()   # (list, sequence) -> [copies, bounced, warned]
        self._review = None
        self._unparsed = collections.Counter()  # list address -> non-reports since the summary
        self._summary_due = reactor.seconds() + SUMMARY_EVERY

    def startService(self):
        super().startService()
        self._review = task.LoopingCall(self.review)
        self._review.clock = self.reactor
        self._review.start(REVIEW_EVERY, now=False).addErrback(
            lambda f: self.log.failure("list bounce review stopped", f))

    def stopService(self):
        super().stopService()
        if self._review is not None and self._review.running:
            self._review.stop()

    # -- what an address is ----------------------------------------------------------------

    def is_list_domain(self, domain) -> bool:
        return domain.lower().rstrip(".") in self.domains

    def list_names(self, domain):
        """The names of the lists at ``domain`` (a Deferred), read again every few seconds:
        lists are made and removed by the admin command in another process."""
        domain = domain.lower().rstrip(".")
        now = self.reactor.seconds()
        cached = self._names.get(domain)
        if cached is not None and cached[0] > now:
            return defer.succeed(cached[1])

        def got(lists):
            names = frozenset(ml.name for ml in lists)
            self._names[domain] = (self.reactor.seconds() + NAMES_TTL, names)
            return names
        return self.store.all_lists(domain).addCallback(got)

    def forget_names(self):
        self._names.clear()

    def classify(self, address):
        """A Deferred firing with the ``ListAddress`` of ``address``, or None when it is
        not a list address (also for every domain that is not a list domain)."""
        local, _, domain = address.rpartition("@")
        if not local or not self.is_list_domain(domain):
            return defer.succeed(None)
        if local.lower() in (self.robot_name, "listmaster"):
            return defer.succeed(addresses.classify(local, domain, (), self.robot_name))
        return self.list_names(domain).addCallback(
            lambda names: addresses.classify(local, domain, names, self.robot_name))

    @defer.inlineCallbacks
    def _know_names(self, msg, envelope_sender):
        """Read the list names of the list domains a mail comes from, so that
        ``is_own`` knows them even before any list address was classified."""
        for address in {envelope_sender or "", replies.sender_of(msg) or ""}:
            domain = address.rpartition("@")[2]
            if domain and self.is_list_domain(domain):
                yield self.list_names(domain)

    def is_own(self, address) -> bool:
        """Whether mail from ``address`` comes from the list server itself (a loop);
        the names of its domain are those last read (``_know_names``)."""
        local, _, domain = (address or "").lower().rpartition("@")
        if not self.is_list_domain(domain):
            return False
        cached = self._names.get(domain.rstrip("."))
        names = cached[1] if cached else ()
        return addresses.classify(local, domain, names, self.robot_name) is not None

    # -- IListAgent ----------------------------------------------------------------------

    @defer.inlineCallbacks
    def deliver(self, qmsg, target):
        """Take the mail for one list address (``target.user`` is its ``ListAddress``);
        fires with a RecipientResult (deferred when anything failed: tried again)."""
        where = target.user
        try:
            raw = yield self._read(qmsg)
            kind = where.kind
            if kind == addresses.POST:
                yield self._post(qmsg, raw, where)
            elif kind in (addresses.ROBOT, addresses.REQUEST, addresses.SUBSCRIBE,
                          addresses.UNSUBSCRIBE, addresses.CONFIRM):
                yield self._command(qmsg, raw, where)
            elif kind in (addresses.OWNER, addresses.EDITOR, addresses.LISTMASTER):
                yield self._forward(qmsg, raw, where)
            elif kind == addresses.BOUNCES:
                yield self._bounce(qmsg, raw, where)
        except Exception as e:
            self.log.failure("{qid}: list mail to <{to}> failed", qid=qmsg.qid,
                             to=target.address)
            return RecipientResult(DEFERRED, "4.3.0", f"4.3.0 list server failed: {e}")
        return RecipientResult(SENT, "2.0.0", "delivered to the list server")

    def _read(self, qmsg):
        if qmsg.data is not None:
            return defer.succeed(qmsg.data)

        def read():
            with open(qmsg.path, "rb") as f:
                f.seek(qmsg.body_offset)
                return f.read(MAX_READ)
        return threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(), read)

    def _parse(self, raw):
        return email.message_from_bytes(raw, policy=email.policy.default)

    def _spam(self, qmsg, msg):
        return qmsg.envelope.folder == "Junk" or (
            qmsg.envelope.scanned
            and str(msg.get("X-Spam-Flag", "")).strip().upper() == "YES")

    @defer.inlineCallbacks
    def _command(self, qmsg, raw, where):
        msg = self._parse(raw)
        env = qmsg.envelope
        yield self._know_names(msg, env.sender)
        outcome = yield self.robot.handle(
            msg, env.sender, where.kind, where.domain, list_name=where.list_name,
            token=where.token, spam=self._spam(qmsg, msg),
            auth_method=auth_method_of(msg, env, self.from_match))
        if outcome.dropped:
            mail_event(self.log, f"{qmsg.qid}: list robot dropped the mail: {outcome.dropped}",
                       qid=qmsg.qid)
        yield self._queue_all(qmsg, outcome.outgoing)
        self.robot.processed(outcome)

    @defer.inlineCallbacks
    def _post(self, qmsg, raw, where):
        msg = self._parse(raw)
        env = qmsg.envelope
        mid = message_id_of(msg)
        since = self.reactor.seconds() - SEEN_POSTS_FOR
        known = bool(mid) and (yield self.store.post_seen(where.list_address, mid, since))
        outcome = yield self.robot.post(
            raw, msg, env.sender, where.list_name, where.domain,
            auth_method=auth_method_of(msg, env, self.from_match),
            spam=self._spam(qmsg, msg), seen_message_id=lambda _mid: known)
        if outcome.dropped:
            mail_event(self.log, f"{qmsg.qid}: post to {where.list_address} not distributed: "
                                 f"{outcome.dropped}", qid=qmsg.qid)
        # A post counts as taken once what it caused is committed: a failure
        # before that defers the mail, and the queue's retry must not be
        # discarded as a duplicate (a distribution already made is).
        if outcome.message_id and outcome.committed:
            yield self.store.remember_post(where.list_address, outcome.message_id,
                                           self.reactor.seconds())
        yield self._queue_all(qmsg, outcome.outgoing)
        if outcome.message_id and not outcome.committed:
            yield self.store.remember_post(where.list_address, outcome.message_id,
                                           self.reactor.seconds())

    @defer.inlineCallbacks
    def _queue_all(self, qmsg, outgoing):
        for sender, rcpts, data in outgoing:
            yield self.queue_mail(sender, rcpts, data)

    @defer.inlineCallbacks
    def queue_mail(self, sender, recipients, data, senders=()):
        """Commit one message to the spool and schedule it; fires with its QueuedMessage."""
        env = Envelope(sender=sender, recipients=list(recipients),
                       arrival=self.reactor.seconds(), protocol="local",
                       senders=list(senders))
        inc = self.spool.new_message(env)
        inc.write_header()
        inc.write(data)
        queued = yield self.spool.commit(inc)
        if self.submit is not None:
            self.submit(queued)
        return queued

    # -- distribution (lists.md 4.3-4.5, 4.7) ----------------------------------------------

    @defer.inlineCallbacks
    def distribute(self, list_address, data, sender):
        """Queue one post to every member taking single copies, each with its VERP sender."""
        ml = yield self.store.get_list(list_address)
        if ml is None:
            raise ValueError(f"no list {list_address}")
        settings = ml.settings
        scenarios = settings.get("scenarios") or {}
        copy = posting.prepare_post(
            data, ml.name, ml.domain, robot=self.robot_name, description=ml.subject,
            subject_tag=settings.get("subject_tag", ""), footer=settings.get("footer", ""),
            announce=scenarios.get("send", "") in ("editorkeyonly", "owner"),
            hostname=self.hostname)
        copy = yield self._signed(copy, ml.domain)
        sequence = yield self.store.next_post(ml.address)
        rcpts, senders = [], []
        after = ""
        author = (sender or "").lower()
        while True:
            page = yield self.store.members(ml.address, limit=PAGE, after=after)
            if not page:
                break
            for m in page:
                if m.disabled_since or m.mode not in SINGLE_COPY_MODES:
                    continue
                if m.mode == "not_me" and m.address == author:
                    continue
                rcpts.append(m.address)
                senders.append(addresses.verp_sender(ml.name, ml.domain, m.id, sequence,
                                                     self.key, m.address))
            after = page[-1].address
            if len(page) < PAGE:
                break
        if not rcpts:
            self.log.info("list {ml}: post #{n} has nobody to go to", ml=ml.address, n=sequence)
            return None
        bounce_address = addresses.list_address(ml.name, ml.domain, addresses.BOUNCES)
        queued = yield self.queue_mail(bounce_address, rcpts, copy, senders)
        self._sent[(ml.address, sequence)] = [len(rcpts), 0, False]
        while len(self._sent) > MAX_SEQUENCES:
            self._sent.popitem(last=False)
        mail_event(self.log, f"{queued.qid}: list {ml.address} post #{sequence} from "
                             f"<{sender}> to {len(rcpts)} members", qid=queued.qid)
        return queued

    def _welcome_sender(self, ml, member):
        # Sequence 0: no post, so a bounce of it never counts towards a mass bounce.
        return addresses.verp_sender(ml.name, ml.domain, member.id, 0, self.key,
                                     member.address)

    def _signed(self, data, domain):
        """``data`` with a DKIM signature of ``domain`` when signing is on and a key exists."""
        if self.dkim_keys is None:
            return defer.succeed(data)
        keys = self.dkim_keys

        def sign():
            key, problem = keys.get_with_problem(domain)
            if key is None or (key.kind == "ed25519" and not nacl_available()):
                return data, problem
            normalised, value = sign_message(data, domain, key)
            if value is None:
                return data, "no From field"
            return b"DKIM-Signature: " + value.encode("ascii") + b"\r\n" + normalised, ""

        def signed(result):
            out, problem = result
            if problem:
                self.log.warn("list copies for {domain} not DKIM-signed: {problem}",
                              domain=domain, problem=problem)
            return out
        return threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(),
                                         sign).addCallback(signed)

    # -- owners, moderators, listmasters ---------------------------------------------------

    @defer.inlineCallbacks
    def _forward(self, qmsg, raw, where):
        if where.kind == addresses.LISTMASTER:
            via = f"listmaster@{where.domain}"
            to = list(self.listmasters) or [self.postmaster]
            bounce_to = addresses.robot_address(where.domain, self.robot_name)
        else:
            via = addresses.list_address(where.list_name, where.domain, where.kind)
            to = []
            if where.kind == addresses.EDITOR:
                to = [a for a, _ in (yield self.store.role_holders(where.list_address,
                                                                   "moderator"))]
            if not to:
                to = [a for a, _ in (yield self.store.role_holders(where.list_address,
                                                                   "owner"))]
            if not to:
                to = list(self.listmasters) or [self.postmaster]
            bounce_to = addresses.list_address(where.list_name, where.domain,
                                               addresses.BOUNCES)
        msg = self._parse(raw)
        if any(field_names(v, via) for v in msg.get_all("X-Loop") or ()):
            mail_event(self.log, f"{qmsg.qid}: mail to <{via}> dropped: it went through "
                                 "there before (X-Loop)", qid=qmsg.qid)
            return
        if self._spam(qmsg, msg):
            # Not relayed to (often remote) owners from our address.
            mail_event(self.log, f"{qmsg.qid}: spam to <{via}> not forwarded", qid=qmsg.qid)
            return
        if not qmsg.envelope.sender and where.kind != addresses.LISTMASTER:
            # A bounce or notice to -owner: the owners would only get noise.
            mail_event(self.log, f"{qmsg.qid}: mail from the null sender to <{via}> "
                                 "dropped", qid=qmsg.qid)
            return
        yield self.queue_mail(bounce_to, to, f"X-Loop: {via}\r\n".encode() + raw)
        mail_event(self.log, f"{qmsg.qid}: forwarded to {len(to)} address(es) of <{via}>",
                   qid=qmsg.qid)

    # -- bounces (lists.md 4.7) ------------------------------------------------------------

    @defer.inlineCallbacks
    def _bounce(self, qmsg, raw, where):
        claimed = addresses.verp_tag_member(where.tag)
        member = None
        if claimed is not None:
            member = yield self.store.member_by_id(where.list_address, claimed)
        found = None
        if member is not None:
            found = addresses.verify_bounce_recipient(where, self.key, member.address)
        if found is None:
            # A forged tag, or one of a former member (whose id may be someone
            # else's now: the tag's HMAC covers the address it was made for).
            mail_event(self.log, f"{qmsg.qid}: bounce to {where.list_address}-bounces "
                                 f"without a valid tag of a current member, ignored",
                       qid=qmsg.qid)
            return
        sequence = found[1]
        if bounces.is_complaint(raw, posting.list_id(where.list_name, where.domain)):
            yield self._complaint(qmsg, where, member, sequence)
            return
        statuses = bounces.dsn_statuses(raw)
        if statuses is None:
            # An auto-reply to the envelope sender or a home-made bounce:
            # nothing says the copy failed (lists.md 4.7: counted, not scored).
            self._unparsed[where.list_address] += 1
            kept = yield self._keep_unparsed(where.list_address, qmsg.qid, raw)
            mail_event(self.log, f"{qmsg.qid}: mail from {member.address} to the bounce "
                                 f"address of {where.list_address} is no delivery report, "
                                 "not scored" + (f"; kept as {kept}" if kept else ""),
                       qid=qmsg.qid)
            return
        failures = [st for st in statuses if not st.startswith("2.")]
        if not failures:
            mail_event(self.log, f"{qmsg.qid}: delivery report for {member.address} on "
                                 f"{where.list_address} reports no failure", qid=qmsg.qid)
            return
        status = failures[0]
        sent = self._sent.get((where.list_address, sequence))
        if sent is not None:
            sent[1] += 1
            if bounces.mass_bounce(sent[1], sent[0]) and sent[0] >= 10:
                if not sent[2]:
                    sent[2] = True
                    yield self._tell_owners(
                        where, f"Many copies of post #{sequence} to {where.list_address} "
                               "bounced: a reputation or DNS problem rather than dead "
                               "addresses. These bounces are not scored.",
                        listmasters=True)
                mail_event(self.log, f"{qmsg.qid}: bounce of {member.address} not scored "
                                     "(mass bounce)", qid=qmsg.qid)
                return
        now = self.reactor.seconds()
        state = bounces.BounceState(member.bounce_score, member.last_bounce,
                                    member.disabled_since)
        new, action = bounces.score(state, status, now)
        if new != state:
            yield self.store.set_member(where.list_address, member.address,
                                        bounce_score=new.score, last_bounce=new.last_bounce,
                                        disabled_since=new.disabled_since)
        mail_event(self.log, f"{qmsg.qid}: bounce from {member.address} on "
                             f"{where.list_address} ({status}): score "
                             f"{new.score:g}", qid=qmsg.qid)
        if action == bounces.DISABLE:
            yield self._tell_owners(
                where, f"Delivery to {member.address} on {where.list_address} was disabled "
                       f"after repeated bounces (score {new.score:g}, last status "
                       f"{status}). The member is removed after "
                       f"{bounces.NOTICES} weekly notices unless it works again.")

    @defer.inlineCallbacks
    def _complaint(self, qmsg, where, member, sequence):
        """lists.md 4.7: whoever calls the list spam does not get it any more. Only
        for a recent post (or the welcome): a tag that leaked long ago (a forwarded
        copy shows it in Return-Path) must not remove its member for ever after."""
        ml = yield self.store.get_list(where.list_address)
        if ml is None:
            return
        # (Sequence 0 is the welcome's tag, the same for ever: honoured while the
        # membership is new.)
        old = (sequence <= ml.post_sequence - COMPLAINT_POSTS if sequence else
               self.reactor.seconds() - member.joined > COMPLAINT_WELCOME_DAYS * 86400.0)
        if old:
            mail_event(self.log, f"{qmsg.qid}: abuse report about an old post (#{sequence}) "
                                 f"to {where.list_address}, ignored", qid=qmsg.qid)
            return
        yield self.store.remove_member(where.list_address, member.address)
        mail_event(self.log, f"{qmsg.qid}: abuse report about {member.address}: removed "
                             f"from {where.list_address}", qid=qmsg.qid)
        yield self._notice(
            where.list_address, [member.address], f"You left {where.list_name}",
            f"Your mail provider reported a message from {where.list_address} as spam in "
            "your name, so you were removed from the list. To join it again, send any "
            "mail to "
            f"{addresses.list_address(where.list_name, where.domain, addresses.SUBSCRIBE)}.")
        yield self._tell_owners(
            where, f"{member.address} reported mail from {where.list_address} as spam "
                   "(an abuse report from the member's mail provider) and was removed "
                   "from the list.")

    def _notice(self, ml_address, to, subject, text, reply_to=None):
        name, _, domain = ml_address.partition("@")
        robot = addresses.robot_address(domain, self.robot_name)
        msg = email.message.EmailMessage()
        msg["From"] = robot
        msg["To"] = ", ".join(to)
        msg["Subject"] = subject
        msg["Date"] = email.utils.formatdate(self.reactor.seconds(), usegmt=True)
        msg["Message-ID"] = email.utils.make_msgid(domain=domain)
        if reply_to:
            msg["Reply-To"] = reply_to
        msg["Auto-Submitted"] = "auto-generated"
        msg["X-Loop"] = robot
        msg.set_content(text + "\n", charset="utf-8")
        data = msg.as_bytes(policy=msg.policy.clone(linesep="\r\n"))
        bounce_to = addresses.list_address(name, domain, addresses.BOUNCES)
        return self.queue_mail(bounce_to, to, data)

    @defer.inlineCallbacks
    def _tell_owners(self, where, text, listmasters=False):
        """A bounce notice to the list's owners (the listmasters when it has none,
        or as well with ``listmasters``)."""
        owners = [a for a, _ in (yield self.store.role_holders(where.list_address, "owner"))]
        admins = list(self.listmasters) or [self.postmaster]
        to = owners or admins
        if listmasters:
            to = list(dict.fromkeys(to + admins))
        yield self._notice(where.list_address, to, f"Bounces on {where.list_name}", text)

    @defer.inlineCallbacks
    def review(self):
        """The hourly round: held requests whose time is up, disabled members, the
        daily summary. A step that fails is logged and tried again next hour
        (an error must not stop the LoopingCall for good)."""
        steps = [self.expire_held, self.review_disabled, self._forget_posts,
                 self._prune_unparsed]
        if self.reactor.seconds() >= self._summary_due:
            steps.append(self.summarise_unparsed)
        for step in steps:
            try:
                yield step()
            except Exception:
                self.log.failure("list review: {step} failed", step=step.__name__)

    def _forget_posts(self):
        return self.store.forget_posts(self.reactor.seconds() - SEEN_POSTS_FOR)

    @defer.inlineCallbacks
    def summarise_unparsed(self):
        """The owners' daily count of mail to a list's bounce addresses that was no
        delivery report (lists.md 4.7: never forwarded one by one)."""
        self._summary_due = self.reactor.seconds() + SUMMARY_EVERY
        counts, self._unparsed = self._unparsed, collections.Counter()
        for list_address, n in sorted(counts.items()):
            ml = yield self.store.get_list(list_address)
            if ml is None:
                continue
            where = addresses.classify(ml.name, ml.domain, {ml.name}, self.robot_name)
            yield self._tell_owners(
                where, f"{n} mail(s) sent to the bounce addresses of {list_address} in the "
                       "last day were no delivery reports (auto-replies or bounces in a "
                       "form that cannot be read); they were not scored. The appliance's "
                       "mail log names each of them; the site's administrator finds them "
                       f"for {UNPARSED_DAYS} days under lists/unparsed/ of the data folder.")

    def _keep_unparsed(self, list_address, qid, raw):
        """Keep a mail to a bounce address that was no report for the administrator
        (``data_dir/lists/unparsed/LIST/TIME.QID``, at most UNPARSED_KEPT per list and
        UNPARSED_BYTES of each); fires with its path, or None when not kept."""
        folder = os.path.join(self.config.server.data_dir, "lists", "unparsed",
                              list_address.replace("/", "_"))
        name = f"{int(self.reactor.seconds())}.{qid}"

        def keep():
            os.makedirs(folder, mode=0o700, exist_ok=True)
            if len(os.listdir(folder)) >= UNPARSED_KEPT:
                return None
            path = os.path.join(folder, name)
            with open(path, "wb") as f:
                f.write(raw[:UNPARSED_BYTES])
            return path
        return threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(), keep)

    def _prune_unparsed(self):
        """Remove kept non-reports older than UNPARSED_DAYS (by the time in their name)."""
        top = os.path.join(self.config.server.data_dir, "lists", "unparsed")
        before = self.reactor.seconds() - UNPARSED_DAYS * 86400.0

        def prune():
            if not os.path.isdir(top):
                return
            for sub in os.listdir(top):
                folder = os.path.join(top, sub)
                for name in os.listdir(folder):
                    stamp = name.partition(".")[0]
                    if not stamp.isdigit() or int(stamp) < before:
                        os.unlink(os.path.join(folder, name))
        return threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(), prune)

    @defer.inlineCallbacks
    def expire_held(self):
        """Forget held requests past their lifetime; a moderated post's author is told
        it was not approved in time (lists.md 3.3); other expiries are silent."""
        for held in (yield self.store.expire_held(self.reactor.seconds())):
            if held.kind == tokens.MODERATION and held.requester and \
                    held.action != QUIET_HOLD:
                yield self._notice(
                    held.list_address, [held.requester],
                    f"Not approved in time: {held.subject}"[:200],
                    f"Your message to {held.list_address}"
                    + (f" ({held.subject})" if held.subject else "")
                    + " was not approved by the moderators in time and was not distributed.")

    @defer.inlineCallbacks
    def review_disabled(self):
        """Weekly notices to disabled members, and their removal after the last one."""
        now = self.reactor.seconds()
        for ml in (yield self.store.all_lists()):
            after = ""
            while True:
                page = yield self.store.members(ml.address, limit=PAGE, after=after)
                for m in page:
                    if not m.disabled_since:
                        continue
                    state = bounces.BounceState(m.bounce_score, m.last_bounce,
                                                m.disabled_since)
                    step = bounces.review(state, now, m.bounce_notices)
                    if step == "notice":
                        token = yield defer.ensureDeferred(self.robot.hold_reenable(
                            ml, m.address, now, bounces.NOTICES * bounces.NOTICE_EVERY))
                        yield self._notice(
                            ml.address, [m.address], f"Your membership of {ml.name}",
                            f"Mail from {ml.address} to you has been bouncing, so it is not "
                            "sent to you any more. To receive it again, reply to this mail, "
                            "or send to "
                            f"{addresses.robot_address(ml.domain, self.robot_name)}:\n\n"
                            f"  CONFIRM {token}\n\nOtherwise you are removed from the "
                            "list after a few weeks.",
                            reply_to=addresses.confirm_address(ml.name, ml.domain, token))
                        yield self.store.set_member(ml.address, m.address,
                                                    bounce_notices=m.bounce_notices + 1)
                    elif step == "remove":
                        yield self.store.remove_member(ml.address, m.address)
                        yield self._tell_owners(
                            addresses.classify(ml.name, ml.domain, {ml.name}, self.robot_name),
                            f"{m.address} was removed from {ml.address} after its mail "
                            "kept bouncing.")
                if len(page) < PAGE:
                    break
                after = page[-1].address
