"""The SMTP policy chain: named checks run at each stage of a session.

Like Postfix's restriction lists, each check is one small object with a name
and the stages it cares about; the chain asks them in order and stops at the
first verdict that is not "continue". Anti-spam checks plug in here without the
protocol code knowing about them.
"""

from __future__ import annotations

from dataclasses import dataclass

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mailbox_appliance.interfaces import DirectoryUnavailable, IPolicyCheck

STAGES = ("connect", "helo", "mail", "rcpt", "data", "eod")
# Notifications: the receiver tells the checks what happened, their answers
# are ignored (``PolicyChain.notify``). "disconnect" when a connection ends,
# however it ended (refused at connect included): argument None.
# "rcpt_refused" after a RCPT was answered 5xx by the chain: argument
# (recipient Path, Verdict).
NOTIFICATIONS = ("disconnect", "rcpt_refused")


@dataclass(frozen=True)
class Verdict:
    """An answer of a check: accept, or a 4xx/5xx reply with its RFC 3463 code."""

    code: int
    enhanced: str
    text: str
    # Stop asking further checks and accept (e.g. a whitelist).
    final_accept: bool = False
    # Answer the client with this (2xx) reply but drop the message: a
    # content filter's "discard".
    discard: bool = False

    @property
    def accepted(self) -> bool:
        return self.code < 400

    @property
    def reply(self) -> str:
        return f"{self.code} {self.enhanced} {self.text}"


ACCEPT = Verdict(250, "2.0.0", "Ok", final_accept=True)


class PolicyChain:
    """Runs the registered checks of a stage in order."""

    log = Logger()

    def __init__(self, checks=()):
        self.checks = list(checks)

    def add(self, check, first=False):
        if first:
            self.checks.insert(0, check)
        else:
            self.checks.append(check)

    def run(self, stage, session, argument):
        """The first rejecting/tempfailing Verdict, or None to go on.

        Answers directly when every check did (the common case, with cached
        lookups), and with a Deferred only when some check has to wait.
        """
        return self._run_from(0, stage, session, argument)

    def notify(self, stage, session, argument):
        """Tell every check of ``stage`` about an event; their answers are ignored.

        Unlike ``run`` nothing stops the round: every check that keeps state
        about the session (a connection count, a delay timer) must hear it.
        """
        for check in list(self.checks):
            if stage not in check.stages:
                continue
            try:
                result = check.check(stage, session, argument)
            except Exception:
                self.log.failure("policy check {name} failed at {stage}", Failure(),
                                 name=check.name, stage=stage)
                continue
            if isinstance(result, defer.Deferred):
                result.addErrback(lambda f, name=check.name: self.log.failure(
                    "policy check {name} failed at {stage}", f, name=name, stage=stage))

    def _run_from(self, i, stage, session, argument):
        checks = self.checks
        while i < len(checks):
            check = checks[i]
            i += 1
            if stage not in check.stages:
                continue
            try:
                verdict = check.check(stage, session, argument)
            except Exception:
                verdict = self._crashed(Failure(), check, stage)
            if isinstance(verdict, defer.Deferred):
                def judged(v, i=i):
                    decided, result = self._decide(v)
                    return result if decided else self._run_from(i, stage, session, argument)
                return verdict.addErrback(self._crashed, check, stage).addCallback(judged)
            decided, result = self._decide(verdict)
            if decided:
                return result
        return None

    @staticmethod
    def _decide(verdict):
        if verdict is None:
            return False, None
        if verdict.final_accept:
            return True, None
        if not verdict.accepted or verdict.discard:
            return True, verdict
        return False, None

    def _crashed(self, failure, check, stage):
        self.log.failure("policy check {name} failed at {stage}", failure,
                         name=check.name, stage=stage)
        return Verdict(451, "4.3.0", "Temporary policy failure")


def then(result, f):
    """Apply ``f`` to a value that may or may not be a Deferred yet."""
    if isinstance(result, defer.Deferred):
        return result.addCallback(f)
    return f(result)


@implementer(IPolicyCheck)
class RelayAccess:
    """reject_unauth_destination: only our domains, unless trusted or authenticated.

    Routing characters in local parts (``user%other@ours``, ``"a@b"@ours``,
    ``host!user@ours``) are refused for everybody: the appliance does no
    percent or bang-path routing, so such an address is always a relay trick.
    """

    name = "relay_access"
    stages = frozenset({"rcpt"})

    def __init__(self, domains):
        self.domains = frozenset(d.lower() for d in domains)

    def check(self, stage, session, path):
        if path.has_routing:
            return Verdict(554, "5.7.1", f"<{path.address}>: Relay access denied")
        if path.domain in self.domains:
            return None
        if not path.domain and path.local.lower() == "postmaster":
            return None
        if session.may_relay:
            return None
        return Verdict(554, "5.7.1", f"<{path.address}>: Relay access denied")


@implementer(IPolicyCheck)
class RecipientExists:
    """reject_unlisted_recipient: refuse unknown local users at RCPT time."""

    name = "recipient_exists"
    stages = frozenset({"rcpt"})
    log = Logger()

    def __init__(self, directory, domains, lists=None):
        self.directory = directory
        self.domains = frozenset(d.lower() for d in domains)
        # The list server: its addresses exist; anything else at a list
        # domain must be a directory user (else 550 5.1.1, never a bounce).
        self.lists = lists

    def check(self, stage, session, path):
        if path.domain not in self.domains:
            return None
        if self.lists is not None and self.lists.is_list_domain(path.domain):
            def classified(where):
                return None if where is not None else self._lookup(path)
            return self.lists.classify(f"{path.local}@{path.domain}").addCallback(classified)
        return self._lookup(path)

    def _lookup(self, path):
        def answered(resolution):
            if not resolution.known:
                return Verdict(550, "5.1.1", f"<{path.address}>: Recipient address rejected: "
                                             "User unknown")
            return None

        def failed(f):
            f.trap(DirectoryUnavailable)
            self.log.warn("recipient lookup for <{addr}> failed: {why}",
                          addr=path.address, why=f.getErrorMessage())
            return Verdict(451, "4.4.3", "Temporary lookup failure, try again later")
        return self.directory.lookup(f"{path.local}@{path.domain}").addCallbacks(answered, failed)


@implementer(IPolicyCheck)
class HopCount:
    """Refuse mail that went through too many relays (a mail loop)."""

    name = "hop_count"
    stages = frozenset({"eod"})

    def __init__(self, limit):
        self.limit = limit

    def check(self, stage, session, message):
        if message.received_count >= self.limit:
            return Verdict(554, "5.4.6", "Too many hops (mail loop?)")
        return None
