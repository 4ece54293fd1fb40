"""The command robot: executes one command mail against the list tables (lists.md 1-3).

``CommandRobot.handle`` takes one incoming mail to the robot, ``LIST-request``,
``LIST-subscribe``, ``LIST-unsubscribe`` or ``LIST-confirm+TOKEN`` and:

1. drops it silently when ``replies.drop_reason`` says so (loops, robots,
   auto-replies, DSNs, a Message-ID already seen);
2. reads its commands (``commands.parse_message``; the subscribe and
   unsubscribe addresses imply one SUBSCRIBE or SIGNOFF, the confirm address
   one CONFIRM);
3. decides each command with the list's scenario (``ScenarioLibrary``) over
   a ``StoreScenarioContext`` backed by the ``IListStore``, and performs it,
   holds it for confirmation (a 128-bit token, stored hashed), forwards it to
   the owners, or refuses it;
4. returns the mail to send as ``(envelope_sender, [recipients], bytes)``:
   the one results reply (never to Reply-To, rate limited), confirmation
   requests, owner and moderator notices, welcomes and goodbyes.

Nothing here touches the queue or the distribution: the caller queues the
outgoing mail and passes a ``distribute(list_address, message_bytes, sender)``
callable for posts released by DISTRIBUTE or CONFIRM.

Mail about a list goes out with the envelope sender ``LIST-bounces@domain``
(bounces reach the bounce processor, never a person); the results reply and
listmaster alerts with the robot's own address, whose mail drops DSNs
silently. Never the member's address.
"""

from __future__ import annotations

import contextlib
import dataclasses
import email.policy
import email.utils
from dataclasses import dataclass, field
from email.message import EmailMessage

from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from mailbox_appliance.lists import addresses, commands, posting, replies, tokens
from mailbox_appliance.lists.commands import Command
from mailbox_appliance.lists.replies import DONE, ERRORS, PENDING, REFUSED, Results
from mailbox_appliance.lists.scenario import IScenarioContext
from mailbox_appliance.state_lists import ListError

log = Logger()

# Bounds.
MAX_ALERTS_PER_HOUR = 20
MAX_HELD_PER_HOUR = 30          # requests one sender may have held per hour
# The action of a moderation hold whose author must not be told anything (spam, quiet).
QUIET_HOLD = "quiet"
MAX_OPEN_CONFIRMATIONS = 3      # open confirmation requests per (list, target), section 3.4
MAX_REVIEW = 2000               # members named in one REVIEW reply (the reply is 64 KiB anyway)
PAGE = 500                      # members read at a time
MAX_MODINDEX = 200
MAX_LISTED = 500                # lists named by LISTS / WHICH

# Reception modes a list offers unless its settings say otherwise: digests
# (DIGEST, DIGESTPLAIN, SUMMARY, NOTICE) wait for the digest builder, and a
# member must not choose a mode that would silently stop their mail.
OFFERED_MODES = ("mail", "nomail", "not_me")

# Explanations of the reject reasons used by the shipped scenarios.
REASONS = {
    "members_only": "Only members of the list may do this.",
    "owners_only": "Only the list's owners may do this.",
    "review_owner": "Only the list's owners may see its members.",
    "list_not_open": "The list is not open.",
    "auth_loop": "The confirmed request asked for confirmation again; refused.",
    "blocklisted": "Refused.",
}
DEFAULT_REASON = "Not allowed by the list's rules."

# Who a request token was mailed to, kept in the held row's subject: the one
# who confirms becomes the sender of the confirmed request (lists.md 2.5).
BY_TARGET = "confirm by target"
BY_REQUESTER = "confirm by requester"

# Verbs whose list must be visible to the sender (else "no list named X here").
_VISIBLE_VERBS = frozenset({"INFO", "REVIEW"})


def _clock_of(clock):
    """A function returning seconds from a reactor (``seconds()``) or a callable."""
    return clock.seconds if hasattr(clock, "seconds") else clock


def _canonical_owner_command(verb, list_name, address, name=""):
    return Command(verb, list_name=list_name, address=address, name=name).canonical()


@dataclass
class RobotOutcome:
    """What one command mail came to.

    ``dropped``: why it was dropped silently (None when it was read);
    ``outgoing``: ``[(envelope_sender, [recipients], message_bytes)]`` to queue;
    ``results``: the ``replies.Results`` (None when dropped);
    ``replied``: whether the results reply is among ``outgoing``;
    ``message_id``: the Message-ID to count as processed (the robot's
    ``seen``, a list's distributed posts) once ``outgoing`` is committed;
    ``committed``: the work it asked for (a distribution, a held post) is
    already done, so it counts as processed even if ``outgoing`` fails.
    """

    dropped: str | None = None
    outgoing: list = field(default_factory=list)
    results: Results | None = None
    replied: bool = False
    message_id: str | None = None
    committed: bool = False


@implementer(IScenarioContext)
class StoreScenarioContext:
    """An ``IScenarioContext`` answered from an ``IListStore``.

    ``is_editor`` is true for the list's moderators, or for its owners when
    it has no moderator (owners then moderate). ``is_listmaster`` answers from
    the configured set. ``search`` knows the named filters given (sets of
    lower-case addresses); an unknown filter is a runtime error (reject).
    """

    def __init__(self, store, ml, operation, sender, auth_method="smtp", email=None,
                 message=None, now=0.0, listmasters=frozenset(), filters=None):
        self.store = store
        self.ml = ml
        self.operation = operation
        self.sender = sender
        self.email = email
        self.listname = ml.name
        self.domain = ml.domain
        self.auth_method = auth_method
        self.remote_addr = None
        self.message = message
        self._now = now
        self._listmasters = frozenset(a.lower() for a in listmasters)
        self._filters = filters or {}

    def now(self):
        return self._now

    @defer.inlineCallbacks
    def variable(self, namespace, key):
        if namespace == "list":
            if key == "status":
                return self.ml.settings.get("status", "open")
            if key == "name":
                return self.ml.name
            if key == "subject":
                return self.ml.subject
            if key == "total":
                n = yield self.store.count_members(self.ml.address)
                return n
            return None
        if namespace == "subscriber" and self.sender:
            member = yield self.store.get_member(self.ml.address, self.sender)
            if member is None:
                return None
            return {"reception": member.mode, "date": str(int(member.joined)),
                    "email": member.address, "gecos": member.name}.get(key)
        return None

    def is_subscriber(self, list_address, address):
        return self.store.get_member(list_address, address).addCallback(
            lambda m: m is not None)

    def is_owner(self, list_address, address):
        return self.store.has_role(list_address, address, "owner")

    @defer.inlineCallbacks
    def is_editor(self, list_address, address):
        moderators = yield self.store.role_holders(list_address, "moderator")
        if moderators:
            return address.lower() in {a for a, _ in moderators}
        owner = yield self.store.has_role(list_address, address, "owner")
        return owner

    def is_listmaster(self, address):
        return address.lower() in self._listmasters

    def search(self, filter_name, value):
        if filter_name not in self._filters:
            raise LookupError(f"unknown filter {filter_name}")
        return value.lower() in self._filters[filter_name]


class _Session:
    """One command mail being executed: who asked, how, and what it produced."""

    def __init__(self, domain, sender, auth_method, message, now, reply=True):
        self.reply = reply          # False at -subscribe/-unsubscribe/-confirm: no results mail
        self.domain = domain
        self.sender = sender
        self.auth_method = auth_method
        self.message = message
        self.now = now
        self.results = Results()
        self.outgoing = []


class CommandRobot:
    """Executes command mails (lists.md sections 1.2, 1.3, 3).

    ``store``: an ``IListStore``. ``library``: a ``ScenarioLibrary``.
    ``clock``: a reactor (``seconds()``) or a function returning seconds.
    ``robot_name``: the robot's local part. ``listmasters``: the site admins'
    addresses (``is_listmaster``, and where alerts go; ``listmaster@domain``
    when empty). ``lifetimes``: ``tokens.Lifetimes``. ``distribute``:
    ``distribute(list_address, message_bytes, sender)`` for released posts
    (may return a Deferred). ``list_dirs(ml)``: a list's own scenario folders.
    ``own_address(addr)``: whether an address is one of ours (mail from it is
    a loop). ``filters``: named address sets for ``search``. ``verp(ml,
    member)``: the VERP envelope sender of mail to a member, used for the
    welcome so that a dead new address bounces to its member (lists.md 4.7).
    """

    def __init__(self, store, library, clock, robot_name=addresses.DEFAULT_ROBOT,
                 listmasters=(), lifetimes=None, distribute=None, list_dirs=None,
                 own_address=None, filters=None, verp=None):
        self.store = store
        self.library = library
        self.clock = _clock_of(clock)
        self.robot_name = robot_name
        self.listmasters = tuple(a.lower() for a in listmasters)
        self.lifetimes = lifetimes or tokens.Lifetimes()
        self.distribute = distribute
        self.list_dirs = list_dirs or (lambda ml: ())
        self.own_address = own_address
        self.filters = filters or {}
        self.verp = verp
        self._claimed = set()       # ids of held posts being distributed right now
        self.reply_limit = replies.ReplyRateLimit(self.clock)
        self.failed_lookups = tokens.FailedLookups(self.clock)
        self.seen = replies.RecentMessageIds(self.clock)
        # Third-party requests: the target hears of them at most once a day (3.6).
        self.third_party = replies.WindowLimit(self.clock, 1, 86400.0)
        # Requests held for confirmation or approval, per requester and hour.
        self.held_requests = replies.WindowLimit(self.clock, MAX_HELD_PER_HOUR, 3600.0)
        # Listmaster alerts, all kinds together: a bug hit by every mail must not
        # become a flood in the listmaster's mailbox (the log keeps the rest).
        self.alerts = replies.WindowLimit(self.clock, MAX_ALERTS_PER_HOUR, 3600.0)

    # -- entry point -----------------------------------------------------------------------

    def handle(self, message, envelope_sender, recipient_kind, domain, list_name=None,
               token=None, auth_method="smtp", spam=False):
        """Execute one command mail; a Deferred firing with a ``RobotOutcome``.

        ``recipient_kind``: ``addresses.ROBOT``, ``REQUEST``, ``SUBSCRIBE``,
        ``UNSUBSCRIBE`` or ``CONFIRM`` (with ``list_name`` for all but ROBOT,
        ``token`` for CONFIRM). ``auth_method``: "smtp" or "dkim" as the
        inbound checks established it. ``spam``: the content filter's verdict.
        """
        return defer.ensureDeferred(self._handle(message, envelope_sender, recipient_kind,
                                                 domain.lower(), list_name, token,
                                                 auth_method, spam))

    def processed(self, outcome):
        """Count a command mail's Message-ID as processed: called once its
        ``outgoing`` mail is committed, so that a retry after a failure is
        executed again rather than dropped as a duplicate."""
        if outcome.message_id:
            self.seen.remember(outcome.message_id)

    def post(self, raw, message, envelope_sender, list_name, domain, auth_method="smtp",
             spam=False, seen_message_id=None):
        """Take one post to ``LIST@domain`` (lists.md 4.1-4.2, 3.2, 3.3).

        ``raw`` the message as received, ``message`` its parse. Loops and
        automatic mail are dropped, the ``send`` scenario decides with the
        author (the single From: mailbox) as sender: distributed through
        ``distribute``, held for the author's confirmation or for the
        moderators, or refused with a notice (none to spam or with ``quiet``).
        ``seen_message_id(mid) -> bool`` only asks whether the list took that
        Message-ID; the caller records the outcome's ``message_id``.
        A Deferred firing with a ``RobotOutcome``.
        """
        return defer.ensureDeferred(self._post(raw, message, envelope_sender, list_name,
                                               domain.lower(), auth_method, spam,
                                               seen_message_id))

    async def _post(self, raw, msg, envelope_sender, list_name, domain, auth_method, spam,
                    seen_message_id):
        ml = await self.store.get_list(addresses.list_address(list_name, domain))
        if ml is None:
            return RobotOutcome(dropped=f"no list {list_name}@{domain}")
        if not (envelope_sender or "").strip("<>"):
            return RobotOutcome(dropped="a post from the null sender (a bounce or notice)")
        check = posting.check_post(raw, msg, ml.name, domain, seen_message_id=seen_message_id,
                                   max_size=int(ml.settings.get("max_size")
                                                or posting.MAX_SIZE))
        author = replies.sender_of(msg)
        s = _Session(domain, author, auth_method, msg, self.clock(), reply=False)
        outcome = RobotOutcome(outgoing=s.outgoing)
        if check is not None and check.action == posting.DISCARD:
            log.info("list {ml}: post dropped: {why}", ml=ml.address, why=check.reason)
            outcome.dropped = check.reason
            return outcome
        subject = (replies.raw_header(msg, "Subject") or "")[:200]
        if check is not None:
            if not spam:
                text = f"Your message to {ml.address} was not distributed: {check.reason}.\n"
                if check.command == "subscribe":
                    text += ("\nTo join the list, send any mail to "
                             f"{addresses.list_address(ml.name, domain, addresses.SUBSCRIBE)}.\n")
                elif check.command in ("unsubscribe", "set"):
                    text += ("\nTo leave the list, send any mail to "
                             f"{addresses.list_address(ml.name, domain, addresses.UNSUBSCRIBE)}"
                             ".\nOther commands go to "
                             f"{addresses.list_address(ml.name, domain, addresses.REQUEST)}.\n")
                self._mail(s, ml, [author], f"Not distributed: {subject}"[:200], text,
                           auto="auto-replied")
            outcome.dropped = check.reason
            return outcome
        decision = await self._decide(s, ml, "send", author, auth_method)
        action = decision.action
        quiet = decision.quiet or spam
        log.info("list {ml}: post from {author} ({method}): {action} ({rule})", ml=ml.address,
                 author=author, method=auth_method, action=action, rule=decision.rule)
        # Counted as distributed only when accepted (lists.md 4.2): a refused
        # post sent again after subscribing is a new post.
        outcome.message_id = replies.message_id_of(msg)
        # Only a distribution is done for good before the outgoing mail: a held
        # post whose moderation mail failed is held again on the retry (its
        # key lived only in that mail).
        outcome.committed = action == "do_it"
        if action == "do_it":
            await self._hand_over(ml, raw, author)
            if decision.notify:
                self._to_owners_later(s, ml, f"{author} posted to {ml.address}: {subject}")
        elif action == "request_auth":
            token = tokens.new_token()
            await self.store.hold(ml.address, tokens.POST, tokens.hash_token(token),
                                  s.now + self.lifetimes.of(tokens.POST), now=s.now,
                                  target=author, requester=author, subject=subject,
                                  message=raw)
            robot = self.robot_address(domain)
            text = (f"A message was sent to {ml.address} in your name"
                    + (f" ({subject})" if subject else "") + ".\n\n"
                    "To have it distributed, reply to this mail, or send to "
                    f"{robot}:\n\n  CONFIRM {token}\n\n"
                    "If you did not send it, ignore this mail: nothing will be distributed.\n")
            self._mail(s, ml, [author], f"CONFIRM {token}", text,
                       reply_to=addresses.confirm_address(ml.name, domain, token), attach=raw)
        elif action in ("editorkey", "editor"):
            await self._hold_for_moderation(s, ml, raw, author, subject, attach=not spam,
                                            quiet=quiet)
            if not quiet:
                self._mail(s, ml, [author], f"Awaiting moderation: {subject}"[:200],
                           f"Your message to {ml.address}"
                           + (f" ({subject})" if subject else "")
                           + " awaits the list's moderators.\n", auto="auto-replied")
        elif action == "reject":
            if decision.error:
                self._alert(s, f"{ml.address}: the send scenario failed: {decision.error}")
            if not quiet:
                text = REASONS.get(decision.reason or "", DEFAULT_REASON)
                self._mail(s, ml, [author], f"Not distributed: {subject}"[:200],
                           f"Your message to {ml.address} was not distributed.\n{text}\n",
                           auto="auto-replied")
            outcome.dropped = f"refused by the send scenario ({decision.reason or 'deny'})"
            outcome.message_id = None
        else:
            self._alert(s, f"{ml.address}: the send scenario decided {action}, "
                           "which a post cannot do; the post was not distributed.")
            outcome.dropped = f"send decided {action}"
            outcome.message_id = None
        return outcome

    def robot_address(self, domain):
        return addresses.robot_address(domain, self.robot_name)

    def _own(self, domain):
        robot = self.robot_address(domain)

        def own(addr):
            if self.own_address is not None and self.own_address(addr):
                return True
            local, _, dom = addr.lower().rpartition("@")
            return addr.lower() == robot or (dom == domain and local == "listmaster")
        return own

    async def _handle(self, msg, envelope_sender, kind, domain, list_name, token,
                      auth_method, spam):
        robot = self.robot_address(domain)
        why = replies.drop_reason(msg, envelope_sender, robot, own_address=self._own(domain),
                                  spam=spam, seen=self.seen.known)
        if why is None and kind != addresses.ROBOT and not list_name:
            why = "no list named by the address"
        if why is None and kind == addresses.CONFIRM and tokens.normalize(token) is None:
            why = "no token in the confirm address"
        if why is None and kind not in (addresses.ROBOT, addresses.REQUEST, addresses.SUBSCRIBE,
                                        addresses.UNSUBSCRIBE, addresses.CONFIRM):
            why = f"not a command address ({kind})"
        if why is not None:
            log.info("list robot: mail dropped: {why}", why=why)
            return RobotOutcome(dropped=why)
        sender = replies.sender_of(msg)
        reply = kind in (addresses.ROBOT, addresses.REQUEST)
        session = _Session(domain, sender, auth_method, msg, self.clock(), reply)
        if kind == addresses.SUBSCRIBE:
            cmds = [Command("SUBSCRIBE", f"SUBSCRIBE {list_name}", list_name=list_name)]
        elif kind == addresses.UNSUBSCRIBE:
            cmds = [Command("SIGNOFF", f"SIGNOFF {list_name}", list_name=list_name)]
        elif kind == addresses.CONFIRM:
            t = tokens.normalize(token)
            cmds = [Command("CONFIRM", f"CONFIRM {t}", token=t)]
        else:
            parsed = commands.parse_message(
                msg, default_list=list_name if kind == addresses.REQUEST else None)
            cmds = parsed.items
        # Outcomes in the order of the lines: syntax errors among the commands.
        for cmd in cmds[:commands.MAX_COMMANDS + commands.MAX_LINES]:
            if not isinstance(cmd, Command):
                session.results.add(ERRORS, cmd.line, cmd.reason)
                continue
            try:
                await self._execute(session, cmd)
            except ListError as e:
                # A bound of the tables (held requests, members) or a bad value.
                session.results.add(ERRORS, cmd.line, f"Not possible: {e}")
            except Exception:
                log.failure("list robot: {line} failed", line=cmd.line)
                session.results.add(ERRORS, cmd.line, "Internal error; the listmaster was told.")
                self._alert(session, "A command failed with an internal error (see the log): "
                            + replies.quote_line(cmd.line))
            for warning in cmd.warnings:
                session.results.note(warning)
        if kind in (addresses.ROBOT, addresses.REQUEST):
            # What parsing found besides the commands: the line not understood,
            # "no command found", notes, ignored lines.
            commands.report_parse(dataclasses.replace(parsed, items=[]), session.results)
        outcome = RobotOutcome(outgoing=session.outgoing, results=session.results,
                               message_id=replies.message_id_of(msg))
        if reply:
            mail = replies.build_reply(session.results, robot, sender,
                                       in_reply_to=replies.raw_header(msg, "Message-ID"),
                                       references=replies.raw_header(msg, "References"))
            if mail is not None:
                verdict = self.reply_limit.check(sender)
                if verdict == replies.ReplyRateLimit.DROP:
                    log.info("list robot: reply to {to} dropped (rate limit)", to=sender)
                else:
                    session.outgoing.append((robot, [sender], _bytes(mail)))
                    outcome.replied = True
                    if verdict == replies.ReplyRateLimit.SEND_AND_ALERT:
                        self._alert(session, f"{sender} reached the limit of robot replies "
                                             "for 24 hours; further replies are dropped.")
        return outcome

    # -- dispatch ----------------------------------------------------------------------------

    async def _execute(self, s, cmd):
        verb = cmd.verb
        if verb == "HELP":
            return self._help(s, cmd)
        if verb == "LISTS":
            return await self._lists(s, cmd)
        if verb == "WHICH":
            return await self._which(s, cmd)
        if verb in ("CONFIRM", "AUTH"):
            return await self._confirm(s, cmd)
        if verb == "DECLINE":
            return await self._decline(s, cmd)
        if verb in ("INDEX", "GET", "LAST"):
            s.results.add(ERRORS, cmd.line, "Archives are not available by mail here.")
            return
        if cmd.list_name == "*" and verb in ("SIGNOFF", "SET"):
            return await self._every_list(s, cmd)
        ml = await self._list(s, cmd)
        if ml is None:
            return
        if verb in _VISIBLE_VERBS and not await self._visible(s, ml):
            return self._no_list(s, cmd)
        handler = {
            "INFO": self._info, "REVIEW": self._review, "SUBSCRIBE": self._request,
            "SIGNOFF": self._request, "ADD": self._request, "DEL": self._request,
            "INVITE": self._request, "REMIND": self._request, "SET": self._set,
            "DISTRIBUTE": self._moderate, "REJECT": self._moderate,
            "MODINDEX": self._modindex,
        }.get(verb)
        if handler is None:
            s.results.add(ERRORS, cmd.line, "This command is not available.")
            return
        await handler(s, cmd, ml)

    async def _list(self, s, cmd):
        ml = await self.store.get_list(f"{cmd.list_name}@{s.domain}")
        if ml is None:
            self._no_list(s, cmd)
        return ml

    def _no_list(self, s, cmd):
        # The same words for an unknown list and one the sender may not see.
        s.results.add(ERRORS, cmd.line, f"No list named {cmd.list_name} here.")

    def _context(self, s, ml, operation, sender, auth_method, email=None):
        return StoreScenarioContext(self.store, ml, operation, sender, auth_method, email,
                                    s.message, s.now, self.listmasters_for(), self.filters)

    def listmasters_for(self):
        return frozenset(self.listmasters)

    def _decide(self, s, ml, operation, sender, auth_method, email=None, confirmed=False):
        scen = (ml.settings.get("scenarios") or {}).get(operation)
        ctx = self._context(s, ml, operation, sender, auth_method, email)
        return self.library.evaluate(ctx, name=scen, list_dirs=tuple(self.list_dirs(ml)),
                                     confirmed=confirmed)

    async def _visible(self, s, ml, sender=None):
        d = await self._decide(s, ml, "visibility", sender or s.sender, s.auth_method)
        return d.action == "do_it"

    def _refuse(self, s, cmd, decision, line=None):
        line = line or cmd.line
        if decision.error:
            log.error("list robot: {line}: scenario error {e}", line=line, e=decision.error)
        text = REASONS.get(decision.reason or "", DEFAULT_REASON)
        s.results.add(REFUSED, line, text, silent=decision.quiet)

    # -- requests decided by a scenario ---------------------------------------------------

    _OPERATION = {"SUBSCRIBE": "subscribe", "SIGNOFF": "unsubscribe", "ADD": "add",
                  "DEL": "del", "INVITE": "invite", "REMIND": "remind"}

    def _target(self, cmd, sender):
        if cmd.verb == "SUBSCRIBE":
            return sender
        if cmd.verb == "SIGNOFF":
            return cmd.address or sender
        return cmd.address

    async def _request(self, s, cmd, ml, sender=None, auth_method=None, confirmed=False,
                       line=None):
        """Decide and carry out SUBSCRIBE, SIGNOFF, ADD, DEL, INVITE or REMIND."""
        sender = sender or s.sender
        auth_method = auth_method or s.auth_method
        line = line or cmd.line
        operation = self._OPERATION[cmd.verb]
        target = self._target(cmd, sender)
        decision = await self._decide(s, ml, operation, sender, auth_method, target, confirmed)
        action = decision.action
        if action == "do_it":
            await self._perform(s, cmd, ml, sender, target, decision, line)
        elif action == "reject":
            self._refuse(s, cmd, decision, line)
        elif action == "request_auth":
            to = target if decision.auth_target == "email" and target else sender
            await self._ask_confirmation(s, cmd, ml, sender, target, to, line)
        elif action == "owner":
            if self.held_requests.hit(s.sender) == replies.WindowLimit.DENY:
                s.results.add(REFUSED, line, "Too many requests from you; try again later.")
                return
            await self._ask_owners(s, cmd, ml, sender, target, line)
        else:
            log.error("list robot: {op} decided {a}, not an action for it", op=operation,
                      a=action)
            s.results.add(ERRORS, line, "Internal error; the listmaster was told.")
            self._alert(s, f"{ml.address}: scenario for {operation} decided {action}, "
                           "which that operation cannot do.")

    async def _perform(self, s, cmd, ml, sender, target, decision, line):
        verb, quiet = cmd.verb, cmd.quiet or decision.quiet
        if verb == "SUBSCRIBE" or verb == "ADD":
            added = await self.store.add_member(ml.address, target, cmd.name, now=s.now)
            if not added:
                s.results.add(DONE, line, f"{target} is already a member of {ml.name}.")
                return
            s.results.add(DONE, line, f"{target} is now a member of {ml.name}.")
            if not quiet:
                self._welcome(s, ml, target, await self._verp_of(ml, target))
        elif verb == "SIGNOFF" or verb == "DEL":
            removed = await self.store.remove_member(ml.address, target)
            if not removed:
                s.results.add(DONE, line, f"{target} is not a member of {ml.name}.")
                return
            s.results.add(DONE, line, f"{target} is no longer a member of {ml.name}.")
            if not quiet:
                self._goodbye(s, ml, target)
        elif verb == "INVITE":
            await self._invite(s, cmd, ml, sender, target, line)
            return
        elif verb == "REMIND":
            n = await self._remind(s, ml)
            s.results.add(DONE, line, f"A reminder was sent to {n} members.")
            return
        if decision.notify:
            self._to_owners_later(s, ml, f"{verb} {target} on {ml.address}, asked by {sender}.")

    async def _open_confirmations(self, ml, target):
        waiting = await self.store.held_waiting(ml.address, tokens.REQUEST)
        # (A disabled member's re-enable token, hold_reenable, is no request
        # of anyone's and must not block the member's own.)
        return sum(1 for h in waiting
                   if h.target == (target or "").lower() and h.expires > self.clock()
                   and not h.action.startswith("SET "))

    async def _ask_confirmation(self, s, cmd, ml, sender, target, to, line):
        """Hold the request and mail its token to ``to`` (section 3.4)."""
        third_party = to != (s.sender or "").lower()
        if self.held_requests.hit(s.sender) == replies.WindowLimit.DENY:
            # One sender cannot fill the held table (and so block everyone's
            # confirmations) by asking for thousands of them.
            s.results.add(REFUSED, line, "Too many requests from you; try again later.")
            return
        if await self._open_confirmations(ml, target or to) >= MAX_OPEN_CONFIRMATIONS:
            # Same answer as a fresh request: nothing about the target is disclosed.
            s.results.add(PENDING, line, f"A confirmation request was sent to {to}.")
            return
        if third_party and self.third_party.hit(to) == replies.WindowLimit.DENY:
            s.results.add(PENDING, line, f"A confirmation request was sent to {to}.")
            return
        token = tokens.new_token()
        action = cmd.canonical()
        await self.store.hold(ml.address, tokens.REQUEST, tokens.hash_token(token),
                              s.now + self.lifetimes.of(tokens.REQUEST), now=s.now,
                              action=action, target=target or "", requester=sender,
                              name=cmd.name,
                              subject=BY_TARGET if to == (target or "").lower() else BY_REQUESTER)
        self._confirmation_mail(s, ml, token, to, action, sender)
        s.results.add(PENDING, line, f"A confirmation request was sent to {to}.")

    async def _ask_owners(self, s, cmd, ml, sender, target, line):
        """Hold for owner approval and tell each owner (section 3.5)."""
        verb = "ADD" if cmd.verb == "SUBSCRIBE" else "DEL"
        action = _canonical_owner_command(verb, ml.name, target,
                                          cmd.name if verb == "ADD" else "")
        token = tokens.new_token()
        await self.store.hold(ml.address, tokens.APPROVAL, tokens.hash_token(token),
                              s.now + self.lifetimes.of(tokens.APPROVAL), now=s.now,
                              action=action, target=target, requester=sender, name=cmd.name,
                              subject=cmd.canonical())
        owners = await self.store.role_holders(ml.address, "owner")
        robot = self.robot_address(s.domain)
        what = "subscribe" if verb == "ADD" else "unsubscribe"
        text = (f"{sender} asks to {what} {target}"
                + (f" ({cmd.name})" if cmd.name else "") + f" on the list {ml.address}.\n\n"
                f"To accept, send to {robot}:\n\n  AUTH {token} {action}\n\n"
                f"(or simply reply to this mail). To refuse, send:\n\n"
                f"  DECLINE {token} [reason]\n\n"
                "The first owner to act decides; this request expires in "
                f"{int(self.lifetimes.of(tokens.APPROVAL) // 86400)} days.\n")
        for owner, _ in owners:
            self._mail(s, ml, [owner], f"Approval asked: {what} {target} on {ml.name}", text,
                       reply_to=addresses.confirm_address(ml.name, s.domain, token))
        if not owners:
            self._alert(s, f"{ml.address} has no owner to approve a request.")
        s.results.add(PENDING, line, "Your request was forwarded to the list's owners.")
        if not s.reply and s.sender:
            # No results mail at -subscribe/-confirm: the requester still hears of it.
            self._mail(s, ml, [s.sender], f"Your request on {ml.name}",
                       f"Your request on {ml.address} was forwarded to the list's owners; "
                       "you will hear from them.\n")

    # -- tokens: CONFIRM, AUTH, DECLINE ---------------------------------------------------

    async def _lookup(self, s, cmd, what="token"):
        """The Held record of ``cmd.token`` or None (failures counted and answered)."""
        if self.failed_lookups.blocked(s.sender):
            s.results.add(ERRORS, cmd.line, "ignored", silent=True)
            return None
        held = await self.store.find_held(tokens.hash_token(cmd.token), s.now)
        if held is None:
            self._failed_lookup(s, cmd, what)
        return held

    def _failed_lookup(self, s, cmd, what):
        verdict = self.failed_lookups.record(s.sender)
        if verdict == tokens.FailedLookups.IGNORE:
            s.results.add(ERRORS, cmd.line, "ignored", silent=True)
            return
        s.results.add(ERRORS, cmd.line, f"Unknown or expired {what}.")
        if verdict == tokens.FailedLookups.ANSWER_AND_ALERT:
            self._alert(s, f"{s.sender} presented too many unknown tokens or keys within an "
                           "hour; further ones are ignored.")

    async def _confirm(self, s, cmd):
        held = await self._lookup(s, cmd)
        if held is None:
            return
        given = cmd.inner.canonical() if cmd.verb == "AUTH" and cmd.inner is not None else None
        status = tokens.check_token(held, cmd.token, s.now, action=given)
        if status == tokens.UNKNOWN:
            self._failed_lookup(s, cmd, "token")
            return
        if status == tokens.HANDLED:
            s.results.add(ERRORS, cmd.line, f"Already handled by {held.handled_by}.")
            return
        if status == tokens.MISMATCH:
            # Counted: after tokens.MAX_ATTEMPTS wrong commands the token is void.
            await self.store.held_failed(held.id)
            s.results.add(REFUSED, cmd.line,
                          "The command given does not match the one this token is for.")
            return
        ml = await self.store.get_list(held.list_address)
        if ml is None:
            self._failed_lookup(s, cmd, "token")
            return
        if held.kind == tokens.MODERATION:
            await self._release(s, cmd, ml, held, distribute=True)
        elif held.kind == tokens.POST:
            await self._confirm_post(s, cmd, ml, held)
        elif held.kind in (tokens.REQUEST, tokens.APPROVAL):
            await self._confirm_request(s, cmd, ml, held)
        else:
            self._failed_lookup(s, cmd, "token")

    async def _confirm_request(self, s, cmd, ml, held):
        try:
            stored = commands.parse_line(held.action)
        except (commands.CommandError, commands.NotACommand):
            s.results.add(ERRORS, cmd.line, "Internal error: the held request is unreadable.")
            return
        if stored.verb == "SET" and held.kind == tokens.REQUEST and held.target:
            # A disabled member's way back in (hold_reenable): the token was
            # mailed to the member, who needs no scenario to set its own mode.
            if not await self.store.settle_held(held.id, s.sender, s.now):
                s.results.add(ERRORS, cmd.line, "Already handled by someone else.")
                return
            await self._set(s, stored, ml, cmd.line, who=held.target)
            return
        if held.kind == tokens.REQUEST:
            # The token is the proof: the one it was mailed to acts, with md5 (2.5).
            actor = held.target if held.subject == BY_TARGET and held.target else held.requester
        else:
            # Owner approval: the owner accepting is the sender of ADD/DEL (3.5).
            actor = s.sender
        operation = self._OPERATION.get(stored.verb)
        if operation is None:
            s.results.add(ERRORS, cmd.line, "Internal error: the held request is unreadable.")
            return
        target = self._target(stored, actor)
        if stored.verb == "SIGNOFF":
            target = held.target or target
        decision = await self._decide(s, ml, operation, actor, "md5", target, confirmed=True)
        if decision.action not in ("do_it", "owner"):
            if decision.action == "reject":
                self._refuse(s, cmd, decision)
            else:
                s.results.add(ERRORS, cmd.line, "Internal error; the listmaster was told.")
            return
        if not await self.store.settle_held(held.id, s.sender, s.now):
            s.results.add(ERRORS, cmd.line, "Already handled by someone else.")
            return
        if decision.action == "owner":
            await self._ask_owners(s, stored, ml, actor, target, cmd.line)
        else:
            await self._perform(s, stored, ml, actor, target, decision, cmd.line)
            if held.kind == tokens.APPROVAL and held.requester and \
                    held.requester not in (target, s.sender):
                self._mail(s, ml, [held.requester], f"Your request on {ml.name} was accepted",
                           f"Your request about {target} on {ml.address} was accepted by the "
                           "list's owners.\n")

    async def _confirm_post(self, s, cmd, ml, held):
        """A post confirmed by its author: ``send`` again with md5 (section 3.2)."""
        data = await self.store.held_message(held.id)
        decision = await self._decide(s, ml, "send", held.requester, "md5", None,
                                      confirmed=True)
        if decision.action == "reject":
            self._refuse(s, cmd, decision)
            return
        if decision.action not in ("do_it", "editorkey", "editor"):
            s.results.add(ERRORS, cmd.line, "Internal error; the listmaster was told.")
            return
        if data is None:
            s.results.add(ERRORS, cmd.line, "The message is no longer available.")
            return
        data = _prepend_header(data, "X-Validation-By", s.sender)
        with self._claim(held) as mine:
            if not mine:
                s.results.add(ERRORS, cmd.line, "Already handled by someone else.")
                return
            if decision.action == "do_it":
                await self._hand_over(ml, data, held.requester)
            else:
                await self._hold_for_moderation(s, ml, data, held.requester, held.subject)
            if not await self.store.settle_held(held.id, s.sender, s.now):
                s.results.add(ERRORS, cmd.line, "Already handled by someone else.")
                return
        if decision.action == "do_it":
            s.results.add(DONE, cmd.line, f"Your message to {ml.address} was distributed.")
        else:
            s.results.add(PENDING, cmd.line,
                          f"Your message to {ml.address} awaits the moderators.")

    @contextlib.contextmanager
    def _claim(self, held):
        """While a held post is being distributed, nobody else may act on it.

        The post is handed over first and the request settled after (settling
        drops the stored message): a distribution that fails leaves the
        request as it was, and the key or token works again, instead of a
        post marked handled that never went out.
        """
        if held.id in self._claimed:
            yield False
            return
        self._claimed.add(held.id)
        try:
            yield True
        finally:
            self._claimed.discard(held.id)

    async def _decline(self, s, cmd):
        held = await self._lookup(s, cmd)
        if held is None:
            return
        status = tokens.check_token(held, cmd.token, s.now)
        if status == tokens.UNKNOWN:
            self._failed_lookup(s, cmd, "token")
            return
        if status == tokens.HANDLED:
            s.results.add(ERRORS, cmd.line, f"Already handled by {held.handled_by}.")
            return
        ml = await self.store.get_list(held.list_address)
        if ml is None or held.kind not in (tokens.APPROVAL, tokens.MODERATION):
            s.results.add(REFUSED, cmd.line, "Nothing to decline with this token.")
            return
        if held.kind == tokens.MODERATION:
            await self._release(s, cmd, ml, held, distribute=False, reason=cmd.reason)
            return
        ctx = self._context(s, ml, "add", s.sender, s.auth_method)
        owner = await ctx.is_owner(ml.address, s.sender or "")
        if not owner and not ctx.is_listmaster(s.sender or ""):
            s.results.add(REFUSED, cmd.line, REASONS["owners_only"])
            return
        if not await self.store.settle_held(held.id, s.sender, s.now):
            s.results.add(ERRORS, cmd.line, "Already handled by someone else.")
            return
        s.results.add(DONE, cmd.line, f"The request about {held.target} was declined.")
        if held.requester:
            self._mail(s, ml, [held.requester], f"Your request on {ml.name} was declined",
                       f"Your request about {held.target} on {ml.address} was declined by the "
                       "list's owners." + (f"\nReason: {cmd.reason}" if cmd.reason else "")
                       + "\n")

    # -- moderation ------------------------------------------------------------------------

    async def _moderate(self, s, cmd, ml):
        held = await self._lookup(s, cmd, "key")
        if held is None:
            return
        status = tokens.check_token(held, cmd.token, s.now)
        if status == tokens.UNKNOWN or held.kind != tokens.MODERATION or \
                held.list_address != ml.address:
            self._failed_lookup(s, cmd, "key")
            return
        if status == tokens.HANDLED:
            s.results.add(ERRORS, cmd.line, f"Already moderated by {held.handled_by}.")
            return
        await self._release(s, cmd, ml, held, distribute=cmd.verb == "DISTRIBUTE",
                            reason=cmd.reason)

    async def _release(self, s, cmd, ml, held, distribute, reason=""):
        """DISTRIBUTE or REJECT a held post; the first moderator to act wins (3.3)."""
        data = await self.store.held_message(held.id) if distribute else None
        author = held.requester
        if distribute and data is None:
            s.results.add(ERRORS, cmd.line, "The message is no longer available.")
            return
        with self._claim(held) as mine:
            if mine and distribute:
                await self._hand_over(ml, data, author)
            if not mine or not await self.store.settle_held(held.id, s.sender, s.now):
                s.results.add(ERRORS, cmd.line, "Already moderated by someone else.")
                return
        if distribute:
            s.results.add(DONE, cmd.line, f"The message from {author} was distributed.")
            if not cmd.quiet and author:
                self._mail(s, ml, [author], f"Your message to {ml.name} was distributed",
                           f"Your message to {ml.address}"
                           + (f" ({held.subject})" if held.subject else "")
                           + " was approved by a moderator and distributed.\n")
        else:
            s.results.add(DONE, cmd.line, f"The message from {author} was rejected.")
            if not cmd.quiet and author:
                self._mail(s, ml, [author], f"Your message to {ml.name} was rejected",
                           f"Your message to {ml.address}"
                           + (f" ({held.subject})" if held.subject else "")
                           + " was rejected by a moderator."
                           + (f"\nReason: {reason}" if reason else "") + "\n")

    async def _hand_over(self, ml, data, sender):
        if self.distribute is None:
            raise RuntimeError("no distribution configured")
        await defer.maybeDeferred(self.distribute, ml.address, data, sender)

    async def _modindex(self, s, cmd, ml):
        ctx = self._context(s, ml, "send", s.sender, s.auth_method)
        if not await ctx.is_editor(ml.address, s.sender or ""):
            s.results.add(REFUSED, cmd.line, "Only the list's moderators may do this.")
            return
        held = await self.store.held_waiting(ml.address, tokens.MODERATION)
        lines = [f"{len(held)} messages await moderation."]
        for h in held[:MAX_MODINDEX]:
            lines.append(f"{_date(h.created)}  {h.requester}  {h.subject}")
        # Keys are stored hashed: they are in the moderation mails, not here.
        s.results.add(DONE, cmd.line, lines[0], "\n  ".join(lines[1:]) or "-")

    async def _hold_for_moderation(self, s, ml, data, author, subject, attach=True,
                                   quiet=False):
        """Hold a post with a key and mail the moderators (else owners, else listmasters).

        ``quiet`` (spam, or the scenario's ``quiet``): the author is not to hear
        of it, not even when it expires (``action`` QUIET_HOLD marks it so)."""
        key = tokens.new_token()
        await self.store.hold(ml.address, tokens.MODERATION, tokens.hash_token(key),
                              s.now + self.lifetimes.of(tokens.MODERATION), now=s.now,
                              action=QUIET_HOLD if quiet else "",
                              target=author, requester=author, subject=subject, message=data)
        mods = [a for a, _ in await self.store.role_holders(ml.address, "moderator")]
        if not mods:
            mods = [a for a, _ in await self.store.role_holders(ml.address, "owner")]
        if not mods:
            mods = list(self.listmasters) or [f"listmaster@{s.domain}"]
        robot = self.robot_address(s.domain)
        waiting = await self.store.held_waiting(ml.address, tokens.MODERATION)
        text = (f"A message from {author} to {ml.address} awaits moderation"
                f" ({len(waiting)} waiting).\nSubject: {subject}\n\n"
                f"To distribute it, send to {robot}:\n\n  DISTRIBUTE {ml.name} {key}\n\n"
                f"To reject it:\n\n  REJECT {ml.name} {key} [reason]\n")
        # A spam-tagged post is not put in front of the moderators (3.3).
        self._mail(s, ml, mods, f"Moderation: {ml.name}", text, attach=data if attach else None)
        return key

    # -- other list commands ---------------------------------------------------------------

    async def _set(self, s, cmd, ml, line=None, who=None):
        """SET by the sender, or by ``who`` when a token mailed to it is the proof."""
        line = line or cmd.line
        who = who or s.sender or ""
        member = await self.store.get_member(ml.address, who)
        if member is None:
            s.results.add(REFUSED, line, f"You are not a member of {ml.name}.")
            return
        if cmd.mode in ("conceal", "noconceal"):
            await self.store.set_member(ml.address, who, concealed=cmd.mode == "conceal")
        else:
            allowed = ml.settings.get("modes") or OFFERED_MODES
            if cmd.mode not in allowed:
                s.results.add(REFUSED, line, f"{ml.name} does not offer {cmd.mode.upper()}.")
                return
            if member.disabled_since and cmd.mode != "nomail":
                # The member says the address works again: delivery resumes
                # with a clean bounce record (lists.md 4.7).
                await self.store.set_member(ml.address, who, mode=cmd.mode,
                                            bounce_score=0.0, disabled_since=0.0,
                                            bounce_notices=0)
            else:
                await self.store.set_member(ml.address, who, mode=cmd.mode)
        s.results.add(DONE, line, f"Your setting on {ml.name} is now {cmd.mode.upper()}.")

    async def _every_list(self, s, cmd):
        """SIGNOFF * / SET *: every list of the domain where the target is a member."""
        target = cmd.address or s.sender
        third_party = target != s.sender
        if third_party:
            # Which lists the target is on is not the requester's business (3.6):
            # the per-list outcomes are kept from the reply, one answer is given.
            shown, s.results = s.results, Results()
        try:
            await self._each_list(s, cmd, target)
        finally:
            if third_party:
                s.results = shown
        if third_party:
            s.results.add(PENDING, cmd.line, f"A confirmation request was sent to {target}.")

    async def _each_list(self, s, cmd, target):
        found = 0
        for ml in (await self.store.all_lists(s.domain))[:MAX_LISTED]:
            if await self.store.get_member(ml.address, target) is None:
                continue
            found += 1
            one = Command(cmd.verb, cmd.line, list_name=ml.name, address=cmd.address,
                          mode=cmd.mode, quiet=cmd.quiet)
            line = f"{cmd.line} ({ml.name})"
            if cmd.verb == "SET":
                await self._set(s, one, ml, line)
            else:
                await self._request(s, one, ml, line=line)
        if not found and target == s.sender:
            s.results.add(DONE, cmd.line, "You are not a member of any list here.")

    async def _review(self, s, cmd, ml):
        decision = await self._decide(s, ml, "review", s.sender, s.auth_method)
        if decision.action != "do_it":
            if decision.action == "request_auth":
                s.results.add(REFUSED, cmd.line, "Confirm your identity first (use a "
                              "DKIM-signed mail).")
                return
            self._refuse(s, cmd, decision)
            return
        ctx = self._context(s, ml, "review", s.sender, s.auth_method)
        privileged = (await ctx.is_owner(ml.address, s.sender)) or \
            ctx.is_listmaster(s.sender)
        total = await self.store.count_members(ml.address)
        shown, after, hidden = [], "", 0
        while len(shown) < MAX_REVIEW:
            page = await self.store.members(ml.address, limit=PAGE, after=after)
            if not page:
                break
            for m in page:
                if m.concealed and not privileged:
                    hidden += 1
                    continue
                shown.append(f"{m.address} {m.name}".rstrip())
            after = page[-1].address
        lines = "\n  ".join(shown[:MAX_REVIEW])
        s.results.add(DONE, cmd.line, f"{ml.name}: {total} members"
                      + (f", {hidden} concealed" if hidden else "")
                      + (f", first {MAX_REVIEW} shown" if total > MAX_REVIEW else "") + ".",
                      lines or "-")

    async def _info(self, s, cmd, ml):
        decision = await self._decide(s, ml, "info", s.sender, s.auth_method)
        if decision.action != "do_it":
            if decision.quiet:
                return self._no_list(s, cmd)
            return self._refuse(s, cmd, decision)
        scen = ml.settings.get("scenarios") or {}
        policy = ", ".join(f"{op}: {scen.get(op) or self.library.default_name(op)}"
                           for op in ("send", "subscribe", "unsubscribe", "review"))
        modes = ml.settings.get("modes") or list(OFFERED_MODES)
        s.results.add(DONE, cmd.line, f"{ml.address}: {ml.subject or '(no description)'}",
                      f"Rules: {policy}. Reception: {', '.join(modes)}. Contact: "
                      f"{addresses.list_address(ml.name, ml.domain, addresses.OWNER)}")

    async def _visible_lists(self, s, lists):
        out = []
        for ml in lists[:MAX_LISTED]:
            if await self._visible(s, ml):
                out.append(ml)
        return out

    async def _lists(self, s, cmd):
        lists = await self._visible_lists(s, await self.store.all_lists(s.domain))
        s.results.add(DONE, cmd.line, f"{len(lists)} lists here.",
                      "\n  ".join(f"{ml.name}: {ml.subject}" for ml in lists) or "-")

    async def _which(self, s, cmd):
        mine = []
        for ml in (await self.store.all_lists(s.domain))[:MAX_LISTED]:
            member = await self.store.get_member(ml.address, s.sender)
            roles = [r for r in ("owner", "moderator")
                     if await self.store.has_role(ml.address, s.sender, r)]
            if member is None and not roles:
                continue
            if await self._visible(s, ml):
                what = (["member"] if member else []) + roles
                mine.append(f"{ml.name} ({', '.join(what)})")
        s.results.add(DONE, cmd.line, f"You are on {len(mine)} lists here.",
                      "\n  ".join(mine) or "-")

    def _help(self, s, cmd):
        if cmd.topic:
            s.results.add(DONE, cmd.line, commands.SYNTAX[cmd.topic])
            return
        everyone = ("HELP", "LISTS", "INFO", "WHICH", "SUBSCRIBE", "SIGNOFF", "SET",
                    "CONFIRM", "AUTH")
        owners = ("REVIEW", "ADD", "DEL", "REMIND", "DECLINE", "DISTRIBUTE", "REJECT",
                  "MODINDEX", "QUIET")
        s.results.add(DONE, cmd.line, "Commands, one per line: "
                      + "; ".join(commands.SYNTAX[v] for v in everyone),
                      "Owners and moderators: "
                      + "; ".join(commands.SYNTAX[v] for v in owners))

    async def hold_reenable(self, ml, address, now, lifetime):
        """A token with which a member whose delivery bounces disabled turns it on
        again (lists.md 4.7): ``CONFIRM token`` or a reply to the confirm address."""
        token = tokens.new_token()
        action = Command("SET", list_name=ml.name, mode="mail").canonical()
        await self.store.hold(ml.address, tokens.REQUEST, tokens.hash_token(token),
                              now + lifetime, now=now, action=action, target=address,
                              requester=address, subject=BY_TARGET)
        return token

    async def _invite(self, s, cmd, ml, sender, target, line):
        token = tokens.new_token()
        action = Command("SUBSCRIBE", list_name=ml.name, name=cmd.name).canonical()
        await self.store.hold(ml.address, tokens.REQUEST, tokens.hash_token(token),
                              s.now + self.lifetimes.of(tokens.REQUEST), now=s.now,
                              action=action, target=target, requester=sender,
                              name=cmd.name, subject=BY_TARGET)
        self._mail(s, ml, [target], f"Invitation to {ml.name}",
                   f"{sender} invites you to the list {ml.address}"
                   + (f" ({ml.subject})" if ml.subject else "") + ".\n\n"
                   "To join, reply to this mail, or send to "
                   f"{self.robot_address(s.domain)}:\n\n  CONFIRM {token}\n\n"
                   "If you do not want to join, ignore this mail.\n",
                   reply_to=addresses.confirm_address(ml.name, s.domain, token))
        s.results.add(DONE, line, f"An invitation was sent to {target}.")

    async def _remind(self, s, ml):
        n, after = 0, ""
        while True:
            page = await self.store.members(ml.address, limit=PAGE, after=after)
            if not page:
                return n
            for m in page:
                self._mail(s, ml, [m.address], f"Your subscription to {ml.name}",
                           f"You are subscribed to {ml.address} as {m.address}.\n\n"
                           + self._how_to_leave(ml))
                n += 1
            after = page[-1].address

    # -- outgoing mail ---------------------------------------------------------------------

    def _how_to_leave(self, ml):
        return ("To leave the list, send any mail to "
                f"{addresses.list_address(ml.name, ml.domain, addresses.UNSUBSCRIBE)}.\n")

    async def _verp_of(self, ml, target):
        if self.verp is None:
            return None
        member = await self.store.get_member(ml.address, target)
        return self.verp(ml, member) if member is not None else None

    def _welcome(self, s, ml, target, sender=None):
        self._mail(s, ml, [target], f"Welcome to {ml.name}",
                   f"You are now a member of {ml.address}"
                   + (f" ({ml.subject})" if ml.subject else "") + ".\n\n"
                   + self._how_to_leave(ml), sender=sender)

    def _goodbye(self, s, ml, target):
        self._mail(s, ml, [target], f"You left {ml.name}",
                   f"{target} is no longer a member of {ml.address}.\n")

    def _to_owners_later(self, s, ml, text):
        owner_address = addresses.list_address(ml.name, ml.domain, addresses.OWNER)
        self._mail(s, ml, [owner_address], f"Notice from {ml.name}", text + "\n")

    def _confirmation_mail(self, s, ml, token, to, action, requester):
        robot = self.robot_address(s.domain)
        by = "" if requester == to else f" (asked by {requester})"
        text = (f"A request was made{by} on the list {ml.address}:\n\n  {action}\n\n"
                "To confirm it, reply to this mail, or send to "
                f"{robot}:\n\n  CONFIRM {token}\n\n"
                "If you did not ask for this, ignore this mail: nothing will happen.\n")
        self._mail(s, ml, [to], f"AUTH {token} {action}", text,
                   reply_to=addresses.confirm_address(ml.name, s.domain, token))

    def _mail(self, s, ml, to, subject, text, reply_to=None, attach=None,
              auto="auto-generated", sender=None):
        """A notice about list ``ml``: from the robot, envelope ``sender`` or else
        LIST-bounces."""
        robot = self.robot_address(s.domain)
        msg = EmailMessage()
        msg["From"] = robot
        msg["To"] = ", ".join(to)
        msg["Subject"] = subject
        msg["Date"] = email.utils.formatdate(s.now, usegmt=True)
        msg["Message-ID"] = email.utils.make_msgid(domain=s.domain)
        if reply_to:
            msg["Reply-To"] = reply_to
        msg["Auto-Submitted"] = auto
        msg["X-Loop"] = robot
        msg["X-Auto-Response-Suppress"] = "All"
        msg.set_content(text, charset="utf-8")
        if attach is not None:
            inner = email.message_from_bytes(attach, policy=email.policy.default)
            msg.add_attachment(inner)
        bounces = sender or addresses.list_address(ml.name, ml.domain, addresses.BOUNCES)
        s.outgoing.append((bounces, list(to), _bytes(msg)))

    def _alert(self, s, text):
        log.warn("list robot alert: {text}", text=text)
        if self.alerts.hit("all") == replies.WindowLimit.DENY:
            return
        robot = self.robot_address(s.domain)
        to = list(self.listmasters) or [f"listmaster@{s.domain}"]
        msg = EmailMessage()
        msg["From"] = robot
        msg["To"] = ", ".join(to)
        msg["Subject"] = "List robot alert"
        msg["Date"] = email.utils.formatdate(s.now, usegmt=True)
        msg["Message-ID"] = email.utils.make_msgid(domain=s.domain)
        msg["Auto-Submitted"] = "auto-generated"
        msg["X-Loop"] = robot
        msg.set_content(text + "\n", charset="utf-8")
        s.outgoing.append((robot, to, _bytes(msg)))


def _bytes(msg):
    return msg.as_bytes(policy=msg.policy.clone(linesep="\r\n"))


def _date(t):
    return email.utils.formatdate(t, usegmt=True)


def _prepend_header(data, name, value):
    """``data`` with one header field added at the top (value checked to be an address)."""
    if not addresses.address_ok(value or ""):
        return data
    return f"{name}: {value}\r\n".encode("ascii") + data


__all__ = ["CommandRobot", "RobotOutcome", "StoreScenarioContext"]
