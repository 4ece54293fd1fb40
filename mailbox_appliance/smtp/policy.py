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
from zope.interface import implementer

from mailbox_appliance.interfaces import DirectoryUnavailable, IPolicyCheck

STAGES = ("connect", "helo", "mail", "rcpt", "data", "eod")


@dataclass(frozen=True)
class Verdict:
    """An answer of a check: accept, or a 4xx/5xx reply with its RFC 3463 code."""

    code: int
    enhanced: str
    text: str
    # Stop asking further checks and accept (e.g. a whitelist).
    final_accept: bool = False

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

    @defer.inlineCallbacks
    def run(self, stage, session, argument):
        """Fire with the first rejecting/tempfailing Verdict, or None to go on."""
        for check in self.checks:
            if stage not in check.stages:
                continue
            try:
                verdict = yield defer.maybeDeferred(check.check, stage, session, argument)
            except Exception:
                self.log.failure("policy check {name} failed at {stage}",
                                 name=check.name, stage=stage)
                verdict = Verdict(451, "4.3.0", "Temporary policy failure")
            if verdict is None:
                continue
            if verdict.final_accept:
                return None
            if not verdict.accepted:
                return verdict
        return None


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

    def __init__(self, directory, domains):
        self.directory = directory
        self.domains = frozenset(d.lower() for d in domains)

    @defer.inlineCallbacks
    def check(self, stage, session, path):
        if path.domain not in self.domains:
            return None
        try:
            resolution = yield self.directory.lookup(f"{path.local}@{path.domain}")
        except DirectoryUnavailable as e:
            self.log.warn("recipient lookup for <{addr}> failed: {why}",
                          addr=path.address, why=str(e))
            return Verdict(451, "4.4.3", "Temporary lookup failure, try again later")
        if not resolution.known:
            return Verdict(550, "5.1.1", f"<{path.address}>: Recipient address rejected: "
                                         "User unknown")
        return None


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
