"""Tokens and moderation keys of held requests (lists.md section 3.1).

A token is 32 lower-case hex digits from the operating system's CSPRNG (128
bits), used once. Only its SHA-256 hash is stored, so a copy of the database
releases nothing; look-ups go by that hash, and ``TokenRecord.check`` compares
in constant time all the same. A record binds the token to what it may do
(kind, list, action, target, requester) and carries its expiry, its failed
attempts and who handled it.

``FailedLookups`` bounds how often one sender may present a bad token (10 per
hour): past that, token commands from that sender are ignored and the
listmaster told once.

Storage is the caller's: ``TokenRecord`` holds exactly what a row needs.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass, replace

from mailbox_appliance.lists.replies import WindowLimit

TOKEN_BYTES = 16                          # 128 bits
_TOKEN = re.compile(r"^[0-9a-fA-F]{32}$")

# Kinds of held things (the names the list tables use) and the one-click URL.
REQUEST = "request"           # a subscription or removal awaiting its confirmation
POST = "post"                 # a post awaiting its author's confirmation
MODERATION = "moderation"     # a post awaiting a moderator
APPROVAL = "approval"         # a request awaiting an owner
ONE_CLICK = "oneclick"        # the per-member unsubscribe URL
KINDS = (REQUEST, POST, MODERATION, APPROVAL, ONE_CLICK)

DAY = 86400.0
MAX_ATTEMPTS = 5              # wrong AUTH commands on one token before it is void
MAX_ACTION = 1000             # the stored command (AUTH compares against it)

# Outcomes of TokenRecord.check.
OK = "ok"
UNKNOWN = "unknown"           # "unknown or expired token": also wrong, expired, void
HANDLED = "handled"           # "already handled" / "already moderated by X"
MISMATCH = "mismatch"         # AUTH with another command than the one stored


@dataclass(frozen=True)
class Lifetimes:
    """How long each kind of token lives, in seconds (configurable; spec defaults)."""

    request: float = 3 * DAY
    post: float = 7 * DAY
    moderation: float = 14 * DAY
    approval: float = 30 * DAY
    oneclick: float = 60 * DAY

    def of(self, kind) -> float:
        if kind not in KINDS:
            raise ValueError(f"no such token kind: {kind!r}")
        return float(getattr(self, kind))


def new_token() -> str:
    """A fresh token: 32 lower-case hex digits, 128 bits from ``secrets``."""
    return secrets.token_hex(TOKEN_BYTES)


def normalize(token) -> str | None:
    """The token in lower case if it has the token syntax (32 hex digits), else None."""
    if isinstance(token, str) and _TOKEN.match(token):
        return token.lower()
    return None


def hash_token(token) -> bytes:
    """What is stored for a token: SHA-256 of its lower-case form (32 bytes).

    Unsalted on purpose: rows are found by this hash, and 128 random bits
    cannot be recovered from it by trying.
    """
    t = normalize(token)
    if t is None:
        raise ValueError("a token is 32 hexadecimal digits")
    return hashlib.sha256(b"list-token\0" + t.encode("ascii")).digest()


def matches(token, token_hash) -> bool:
    """Whether ``token`` is the one whose hash is ``token_hash``, compared in constant time."""
    t = normalize(token)
    if t is None or not isinstance(token_hash, (bytes, bytearray)):
        return False
    return hmac.compare_digest(hash_token(t), bytes(token_hash))


def check_token(record, token, now, action=None) -> str:
    """OK, UNKNOWN, HANDLED or MISMATCH for ``token`` presented at ``now`` against ``record``.

    ``record`` is anything with ``token_hash``, ``expires``, ``attempts``,
    ``handled_by`` and ``action`` (a ``TokenRecord``, or a row object of the
    list tables). ``action``: for AUTH, the canonical text of the command
    given with the token (``Command.inner.canonical()``); it must equal the
    stored one. A used token says HANDLED (answer "already handled by X") for
    as long as its record is kept; expired, wrong or voided says UNKNOWN
    ("unknown or expired token").
    """
    if not matches(token, record.token_hash):
        return UNKNOWN
    if record.handled_by:
        return HANDLED
    if now >= record.expires or record.attempts >= MAX_ATTEMPTS:
        return UNKNOWN
    if action is not None and not hmac.compare_digest(
            _norm_action(action).encode("utf-8"), _norm_action(record.action).encode("utf-8")):
        return MISMATCH
    return OK


@dataclass(frozen=True)
class TokenRecord:
    """One held request's token as stored: what it may do and for how long.

    The fields are those of a held row in the list tables (kind, list, token
    hash, action, target, requester, name, subject, created, expires,
    attempts, handled by/at). ``action`` is the canonical command text
    (``Command.canonical()``) that an ``AUTH token command`` must repeat.
    """

    kind: str
    list_address: str
    token_hash: bytes
    created: float
    expires: float
    action: str = ""
    target: str = ""
    requester: str = ""
    name: str = ""
    subject: str = ""
    attempts: int = 0
    handled_by: str = ""
    handled_at: float = 0.0

    def matches(self, token) -> bool:
        """Whether ``token`` is this record's, compared in constant time."""
        return matches(token, self.token_hash)

    def check(self, token, now, action=None) -> str:
        """``check_token`` on this record."""
        return check_token(self, token, now, action)

    def failed(self) -> "TokenRecord":
        """The record after one more wrong attempt (an AUTH with another command)."""
        return replace(self, attempts=self.attempts + 1)

    def handled(self, by, now) -> "TokenRecord":
        """The record once used: single use, ``by`` is remembered for "already handled by"."""
        return replace(self, handled_by=str(by)[:254], handled_at=float(now))


def _printable(text, limit):
    return "".join(ch for ch in str(text) if ch.isprintable())[:limit]


def _norm_action(text):
    return " ".join(str(text).split())[:MAX_ACTION]


def issue(kind, list_address, now, lifetimes=None, action="", target="", requester="",
          name="", subject=""):
    """A new token and its record: ``(token, TokenRecord)``; only the record is kept.

    The token itself goes into the mail (``CONFIRM token``, ``LIST-confirm+token@``)
    and is forgotten.
    """
    lifetimes = lifetimes or Lifetimes()
    token = new_token()
    record = TokenRecord(kind=kind, list_address=str(list_address).lower(),
                         token_hash=hash_token(token), created=float(now),
                         expires=float(now) + lifetimes.of(kind),
                         action=_norm_action(action), target=str(target).lower(),
                         requester=str(requester).lower(), name=_printable(name, 100),
                         subject=_printable(subject, 200))
    return token, record


class FailedLookups:
    """At most 10 bad tokens or keys per sender per hour (section 3.1).

    ``record(sender)`` after a failed look-up returns ANSWER (say "unknown or
    expired token"), ANSWER_AND_ALERT (the one that reaches the limit: answer
    and tell the listmaster once) or IGNORE (past the limit: say nothing).
    ``blocked(sender)`` is asked before a look-up: a blocked sender's token
    commands are ignored. Memory is bounded (``max_senders``).
    """

    ANSWER = WindowLimit.ALLOW
    ANSWER_AND_ALERT = WindowLimit.ALLOW_AND_ALERT
    IGNORE = WindowLimit.DENY

    def __init__(self, clock, limit=10, window=3600.0, max_senders=10000):
        self._limit = WindowLimit(clock, limit, window, max_senders)

    def blocked(self, sender) -> bool:
        return self._limit.exhausted(str(sender).lower())

    def record(self, sender) -> str:
        return self._limit.hit(str(sender).lower())
