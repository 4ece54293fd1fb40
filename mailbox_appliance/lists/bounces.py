"""Bounces of list mail: what a DSN says, and what it does to a member's score
(lists.md 4.7, the Mailman model with our defaults).

A copy of a post leaves with the envelope sender ``LIST-bounces+TAG@``,
the TAG naming the member and the post under an HMAC
(``addresses.verp_sender``), so a bounce names its member without parsing
and a forged bounce names nobody. ``dsn_statuses`` reads the RFC 3464 part
for the status codes of failed recipients (a delay warning is none); mail that is no
delivery report at all (an auto-reply sent to the envelope sender, a
mailer's home-made bounce) is not scored but counted for the owners' daily
summary, and a report of successful delivery is nothing. ``score`` turns a
member's bounce into the new (score, last bounce, disabled since) and what
to do:

- a permanent failure (5.x.x) adds 1, a temporary one (4.x.x) 0.5, and a
  policy refusal (5.7.x: reputation, not a dead address) counts as
  temporary; at most one increase per member per day;
- a score not raised for ``RESET_AFTER`` (7 days) starts again from zero;
- at ``DISABLE_AT`` (5) the member's delivery is disabled (the member is
  kept) and the owners are told; the member then gets ``NOTICES`` (3)
  notices ``NOTICE_EVERY`` (7 days) apart, each a way back in, and after
  the last one is removed (``review``);
- when ``MASS_BOUNCE`` (30 %) of one distribution bounces, nothing is
  scored and the owners are warned: that is our reputation or DNS, not
  dead addresses.
"""

from __future__ import annotations

import base64
import binascii
import email
import email.policy
import quopri
import re
from dataclasses import dataclass

DAY = 86400.0
PERMANENT, TEMPORARY = 1.0, 0.5
DISABLE_AT = 5.0
RESET_AFTER = 7 * DAY
NOTICES = 3
NOTICE_EVERY = 7 * DAY
MASS_BOUNCE = 0.30
MAX_STATUSES = 50

_STATUS = re.compile(r"^\s*([245])\.(\d{1,3})\.(\d{1,3})")

# What ``score`` says to do beside storing the new values.
# (DISABLE: store the state, stop the member's copies, tell the owners.)
NOTHING, DISABLE = "nothing", "disable"


@dataclass(frozen=True)
class BounceState:
    """A member's bounce record as stored (``state_lists.Member`` fields)."""

    score: float = 0.0
    last_bounce: float = 0.0
    disabled_since: float = 0.0


def dsn_statuses(raw: bytes) -> list | None:
    """The Status codes ("5.1.1", ...) of a delivery report's failed recipients
    ([] when it reports only delays or successes); None when the message is no
    RFC 3464 report."""
    try:
        msg = email.message_from_bytes(raw[:1024 * 1024], policy=email.policy.compat32)
    except Exception:
        return None
    out = None
    for part in msg.walk():
        if part.get_content_type() != "message/delivery-status":
            continue
        payload = part.get_payload()
        # compat32 parses each block of the report as a message of fields.
        blocks = payload if isinstance(payload, list) else [
            email.message_from_string(str(payload))]
        out = []
        for block in blocks[:MAX_STATUSES]:
            action = (block.get("Action") or "").strip().lower()
            m = _STATUS.match(block.get("Status") or "")
            # Only "failed": "delayed" is a warning about a copy that may
            # still arrive (RFC 3464 2.3.3), and the rest report success.
            if m and action == "failed":
                out.append(".".join(m.groups()))
        break
    return out


def _part_text(part) -> str:
    """The text of a report part, its transfer encoding undone ("" when broken)."""
    payload = part.get_payload()
    text = "".join(p.as_string() for p in payload) if isinstance(payload, list) else str(payload)
    cte = (part.get("Content-Transfer-Encoding") or "").strip().lower()
    try:
        if cte == "base64":
            text = base64.b64decode(text).decode("utf-8", "replace")
        elif cte == "quoted-printable":
            text = quopri.decodestring(text.encode("latin-1", "replace")).decode(
                "utf-8", "replace")
    except (ValueError, binascii.Error):
        return ""
    return text[:64 * 1024]


def is_complaint(raw: bytes, list_id: str) -> bool:
    """Whether ``raw`` is an abuse complaint about this list's mail: an RFC 5965
    feedback report of type ``abuse`` whose attached original (or its header)
    carries the list's List-Id. A member who reported the list as spam at the
    mailbox provider, which sent the report to the copy's envelope sender."""
    try:
        msg = email.message_from_bytes(raw[:1024 * 1024], policy=email.policy.compat32)
    except Exception:
        return False
    if msg.get_content_type() != "multipart/report" or \
            (msg.get_param("report-type") or "").lower() != "feedback-report":
        return False
    kind = ours = None
    # The report's own parts only (RFC 5965 2): not what the quoted original holds.
    parts = msg.get_payload() if isinstance(msg.get_payload(), list) else []
    for part in parts[:10]:
        ctype = part.get_content_type()
        if ctype == "message/feedback-report" and kind is None:
            fields = email.message_from_string(_part_text(part).lstrip("\r\n"))
            # RFC 5965 requires the field: a report without one is not taken as abuse.
            kind = (fields.get("Feedback-Type") or "").strip().lower()
        elif ctype in ("message/rfc822", "text/rfc822-headers") and ours is None:
            payload = part.get_payload()
            original = payload[0] if isinstance(payload, list) and payload else (
                email.message_from_string(_part_text(part).lstrip("\r\n")))
            ours = f"<{list_id.lower()}>" in " ".join(
                str(v) for v in original.get_all("List-Id") or ()).lower()
    return kind == "abuse" and bool(ours)


def weight(status: str | None) -> float:
    """What one bounce adds: 1 permanent, 0.5 temporary or policy (5.7.x), 0 success
    or no status at all (nothing says the copy failed)."""
    if not status or status.startswith("2."):
        return 0.0
    if status.startswith("4.") or status.startswith("5.7."):
        return TEMPORARY
    return PERMANENT


def score(state: BounceState, status: str | None, now: float):
    """(new BounceState, action) for one bounce of ``status`` at ``now``."""
    added = weight(status)
    if added == 0.0:
        return state, NOTHING
    current = state.score
    if state.last_bounce and now - state.last_bounce >= RESET_AFTER:
        current = 0.0
    elif state.last_bounce and now - state.last_bounce < DAY:
        # At most one increase a day: a full mailbox bounces every post.
        return state, NOTHING
    new = BounceState(current + added, now, state.disabled_since)
    if new.score >= DISABLE_AT and not state.disabled_since:
        return BounceState(new.score, now, now), DISABLE
    return new, NOTHING


def review(state: BounceState, now: float, notices_sent: int):
    """For a disabled member: "notice" (send the next notice), "remove", or None."""
    if not state.disabled_since:
        return None
    if notices_sent >= NOTICES:
        due = state.disabled_since + NOTICES * NOTICE_EVERY
        return "remove" if now >= due else None
    due = state.disabled_since + notices_sent * NOTICE_EVERY
    return "notice" if now >= due else None


def mass_bounce(bounced: int, sent: int) -> bool:
    """Whether one distribution bounced too much to blame the addresses."""
    return sent > 0 and bounced / sent >= MASS_BOUNCE
