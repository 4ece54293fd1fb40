"""Arguments of the mailbox commands: flags, dates, LIST patterns, STORE and STATUS."""

from __future__ import annotations

import calendar
import datetime
import re
import time

from mailbox_appliance.imap.tokens import Atom

SYSTEM_FLAGS = {"\\SEEN": "\\Seen", "\\ANSWERED": "\\Answered", "\\FLAGGED": "\\Flagged",
                "\\DELETED": "\\Deleted", "\\DRAFT": "\\Draft"}
_KEYWORD = re.compile(r"^[!#$&'+,\-./0-9:;<=>?@A-Z^_`a-z|~]{1,64}$")
_MONTHS = {m: i for i, m in enumerate(
    ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"], 1)}
_DATE_TIME = re.compile(r"^ ?(\d{1,2})-([A-Za-z]{3})-(\d{4}) (\d\d):(\d\d):(\d\d) ([+-])(\d\d)(\d\d)$")
STATUS_ITEMS = ("MESSAGES", "RECENT", "UIDNEXT", "UIDVALIDITY", "UNSEEN")


class ArgumentError(ValueError):
    """A malformed argument (BAD)."""


def parse_flags(token, allow_recent=False):
    """A flag list (or a single flag) as a set of canonical flag names."""
    items = token if isinstance(token, list) else [token]
    flags = set()
    for item in items:
        if not isinstance(item, Atom):
            raise ArgumentError("flags must be atoms")
        name = str(item)
        if name.startswith("\\"):
            canonical = SYSTEM_FLAGS.get(name.upper())
            if canonical is None:
                if name.upper() == "\\RECENT" and allow_recent:
                    continue
                raise ArgumentError(f"unknown system flag {name[:30]}")
            flags.add(canonical)
        elif _KEYWORD.match(name):
            flags.add(name)
        else:
            raise ArgumentError("bad keyword")
    return flags


def parse_date_time(token) -> float:
    """An APPEND date-time ("17-Jul-1996 02:44:25 -0700") as an epoch."""
    text = token.decode("ascii", "replace") if isinstance(token, bytes) else str(token)
    m = _DATE_TIME.match(text)
    if not m or m.group(2).title() not in _MONTHS:
        raise ArgumentError("bad date-time")
    day, mon, year, hh, mm, ss, sign, zh, zm = m.groups()
    try:
        when = datetime.datetime(int(year), _MONTHS[mon.title()], int(day), int(hh), int(mm),
                                 int(ss), tzinfo=datetime.timezone.utc)
    except ValueError:
        raise ArgumentError("bad date-time")
    base = calendar.timegm(when.utctimetuple())
    offset = (int(zh) * 60 + int(zm)) * 60
    return float(base - offset if sign == "+" else base + offset)


def format_date_time(epoch: float) -> str:
    """An epoch as an IMAP date-time in UTC, e.g. ``17-Jul-1996 09:44:25 +0000``."""
    t = time.gmtime(epoch)
    return (f"{t.tm_mday:02d}-{list(_MONTHS)[t.tm_mon - 1]}-{t.tm_year:04d} "
            f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} +0000")


def parse_store_action(token):
    """(mode, silent) of a STORE data item: FLAGS, +FLAGS, -FLAGS and .SILENT."""
    if not isinstance(token, Atom):
        raise ArgumentError("bad STORE item")
    name = token.upper()
    silent = name.endswith(".SILENT")
    if silent:
        name = name[:-len(".SILENT")]
    mode = {"FLAGS": "set", "+FLAGS": "add", "-FLAGS": "remove"}.get(name)
    if mode is None:
        raise ArgumentError("bad STORE item")
    return mode, silent


def parse_status_items(token):
    if not isinstance(token, list) or not token:
        raise ArgumentError("STATUS needs a list of items")
    items = []
    for t in token:
        if not isinstance(t, Atom) or t.upper() not in STATUS_ITEMS:
            raise ArgumentError("unknown STATUS item")
        items.append(t.upper())
    return items


def list_matcher(reference: str, pattern: str, delimiter: str = "."):
    """A predicate for LIST: ``*`` matches anything, ``%`` anything but the delimiter.

    Mailbox names are compared as given, except INBOX, which is
    case-insensitive (RFC 3501 5.1): the store reports it as "INBOX".
    """
    full = reference + pattern
    if full[:5].upper() == "INBOX" and (len(full) == 5 or full[5] in (delimiter, "*", "%")):
        full = "INBOX" + full[5:]
    regex = []
    for c in full:
        if c == "*":
            regex.append(".*")
        elif c == "%":
            regex.append(f"[^{re.escape(delimiter)}]*")
        else:
            regex.append(re.escape(c))
    compiled = re.compile("^" + "".join(regex) + "$", re.DOTALL)
    return lambda name: compiled.match(name) is not None
