"""Plain values the directory hands out: users, resolutions and expansions."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class User:
    """A mail user of the directory (inetOrgPerson + inetLocalMailRecipient)."""

    dn: str
    uid: str
    mail: str                      # primary address, lower-cased domain
    addresses: tuple = ()          # mailLocalAddress values
    mail_host: str = ""            # store node; "" means this appliance
    routing_address: str = ""      # mailRoutingAddress: forward everything there

    @property
    def mailbox_parts(self):
        """(domain, local part) of the primary address, naming the Maildir."""
        local, _, domain = self.mail.rpartition("@")
        return domain.lower(), local


@dataclass(frozen=True)
class Resolution:
    """What one address is: a user, an alias, or nothing."""

    UNKNOWN = "unknown"
    USER = "user"
    ALIAS = "alias"

    kind: str
    user: User | None = None
    members: tuple = ()            # rfc822MailMember values of an alias

    @property
    def known(self) -> bool:
        return self.kind != self.UNKNOWN


@dataclass(frozen=True)
class Expansion:
    """Final destinations of one address after forwarding and aliases."""

    local: tuple = ()              # User values to deliver into
    remote: tuple = ()             # addresses outside our domains
    unknown: tuple = ()            # our-domain addresses nobody has (alias members)
    loops: tuple = ()              # addresses dropped because they looped or nested too deep

    @property
    def empty(self) -> bool:
        return not (self.local or self.remote)
