"""The delivery router: where each envelope recipient must go.

Recipients of our domains are expanded through the directory (forwarding and
aliases) into local mailboxes and remote addresses; other domains are remote.
Addresses of the list server (the robot, a list and its administrative
addresses) are handed to it whole. Each destination gets a stable key so the
queue can record it as done.
"""

from __future__ import annotations

from dataclasses import dataclass

from twisted.internet import defer


@dataclass(frozen=True)
class Target:
    """One final destination of one envelope recipient."""

    kind: str          # "local", "remote" or "list" (user: its ListAddress)
    key: str           # stable identity for the queue's done-records
    address: str       # the address delivered to (Delivered-To / RCPT TO)
    user: object = None


@dataclass(frozen=True)
class Route:
    """The targets of a recipient, or why it could not be routed."""

    targets: tuple = ()
    unknown: bool = False          # no such user: bounce (5.1.1)


class Router:
    """Resolves envelope recipients with the directory."""

    def __init__(self, directory, domains, lists=None):
        self.directory = directory
        self.domains = frozenset(d.lower() for d in domains)
        # The list server (``IListAgent``): its addresses come before the
        # directory's users at a list domain.
        self.lists = lists

    def is_local(self, addr: str) -> bool:
        return addr.rpartition("@")[2].lower() in self.domains

    @defer.inlineCallbacks
    def route(self, recipient: str):
        """Fire with a Route; fails with DirectoryUnavailable when the directory is down."""
        if not self.is_local(recipient):
            return Route(targets=(Target("remote", "R:" + recipient.lower(), recipient),))
        if self.lists is not None:
            where = yield self.lists.classify(recipient)
            if where is not None:
                return Route(targets=(Target("list", "T:" + recipient.lower(), recipient,
                                             user=where),))
        expansion = yield self.directory.expand(recipient)
        if expansion.empty:
            return Route(unknown=True)
        targets = [Target("local", "L:" + u.dn.lower(), u.mail, user=u) for u in expansion.local]
        targets += [Target("remote", "R:" + a.lower(), a) for a in expansion.remote]
        return Route(targets=tuple(targets))
