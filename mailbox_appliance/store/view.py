"""What a folder looks like at one moment, and what changed between two moments.

:class:`MailboxView` holds a folder's messages in compact parallel arrays in
UID order: UIDs (``array('I')``), Maildir base names, info suffixes (``:2,RS``,
interned, so the flags of 100,000 messages cost one pointer each), new/ or
cur/, internal dates and wire sizes. A view never changes once made; the
next one shares whatever did not change. :class:`Changes` tells front ends
what to announce (EXISTS, EXPUNGE, FETCH FLAGS).

Flags are the Maildir info letters (``:2,`` + D F R S T in ASCII order; other
letters, such as P or Dovecot's keyword letters, are kept but not reported).
"""

from __future__ import annotations

import bisect
import functools
import os
import sys
from array import array
from collections import namedtuple
from dataclasses import dataclass, replace

NEW, CUR, UNKNOWN = 0, 1, 2
SUBDIR = ("new", "cur")

MessageInfo = namedtuple("MessageInfo", "uid flags internaldate size")

SYSTEM_FLAGS = frozenset({"\\Answered", "\\Deleted", "\\Draft", "\\Flagged", "\\Seen"})
_LETTER_FLAG = {"D": "\\Draft", "F": "\\Flagged", "R": "\\Answered", "S": "\\Seen",
                "T": "\\Deleted"}
_FLAG_LETTER = {v: k for k, v in _LETTER_FLAG.items()}
_BY_LOWER = {f.lower(): f for f in SYSTEM_FLAGS}
EMPTY = frozenset()


def canonical_flag(flag: str) -> str | None:
    """``\\seen`` -> ``\\Seen``; None for flags the store does not keep
    (keywords, \\Recent)."""
    return _BY_LOWER.get(flag.lower())


@functools.lru_cache(maxsize=4096)
def suffix_flags(suffix: str) -> frozenset:
    """The IMAP system flags of a Maildir info suffix (``:2,FS`` -> {\\Flagged, \\Seen})."""
    if suffix.startswith(":2,"):
        return frozenset(_LETTER_FLAG[c] for c in suffix[3:] if c in _LETTER_FLAG)
    return EMPTY


def suffix_extras(suffix: str) -> str:
    if suffix.startswith(":2,"):
        return "".join(c for c in suffix[3:] if c not in _LETTER_FLAG)
    return ""


def make_suffix(flags, extras: str = "") -> str:
    letters = {_FLAG_LETTER[f] for f in flags} | set(extras)
    return ":2," + "".join(sorted(letters))


class MailboxView:
    """An immutable snapshot of a folder: messages in UID order.

    ``uids`` is an ``array('I')``; do not change it. Position ``i`` (0-based)
    is message sequence number ``i + 1`` of this snapshot.
    """

    __slots__ = ("uidvalidity", "uidnext", "uids", "bases", "suffixes", "where", "dates",
                 "sizes", "by_base", "mtimes")

    def __init__(self, uidvalidity, uidnext, uids, bases, suffixes, where, dates, sizes,
                 by_base, mtimes=(None, None)):
        self.uidvalidity = uidvalidity
        self.uidnext = uidnext
        self.uids = uids
        self.bases = bases
        self.suffixes = suffixes
        self.where = where
        self.dates = dates
        self.sizes = sizes
        self.by_base = by_base
        self.mtimes = mtimes

    @classmethod
    def empty(cls, uidvalidity=0, uidnext=1):
        return cls(uidvalidity, uidnext, array("I"), [], [], bytearray(), array("q"),
                   array("q"), {})

    def __len__(self):
        return len(self.uids)

    @property
    def exists(self):
        return len(self.uids)

    def position(self, uid: int) -> int:
        """0-based position of ``uid`` in this view, or -1."""
        uids = self.uids
        i = bisect.bisect_left(uids, uid)
        if i < len(uids) and uids[i] == uid:
            return i
        return -1

    def __contains__(self, uid):
        return self.position(uid) >= 0

    def info_at(self, pos: int) -> MessageInfo:
        return MessageInfo(self.uids[pos], suffix_flags(self.suffixes[pos]),
                           float(self.dates[pos]), self.sizes[pos])

    def info(self, uid: int) -> MessageInfo | None:
        pos = self.position(uid)
        return None if pos < 0 else self.info_at(pos)

    def flags(self, uid: int) -> frozenset | None:
        pos = self.position(uid)
        return None if pos < 0 else suffix_flags(self.suffixes[pos])

    def flags_at(self, pos: int) -> frozenset:
        return suffix_flags(self.suffixes[pos])

    def __iter__(self):
        uids, suffixes, dates, sizes = self.uids, self.suffixes, self.dates, self.sizes
        for i in range(len(uids)):
            yield MessageInfo(uids[i], suffix_flags(suffixes[i]), float(dates[i]), sizes[i])

    @property
    def messages(self):
        return self

    def count_without(self, flag: str) -> int:
        """How many messages lack ``flag`` (STATUS UNSEEN with \\Seen)."""
        return sum(1 for s in self.suffixes if flag not in suffix_flags(s))

    def first_without(self, flag: str) -> int:
        """0-based position of the first message lacking ``flag``, or -1
        (SELECT's [UNSEEN n] is that + 1)."""
        for i, s in enumerate(self.suffixes):
            if flag not in suffix_flags(s):
                return i
        return -1

    def pending_recent(self) -> list:
        """UIDs of messages still in new/ (recent to whoever takes them)."""
        out, where, i = [], self.where, self.where.find(NEW)
        while i >= 0:
            out.append(self.uids[i])
            i = where.find(NEW, i + 1)
        return out

    def relpath(self, pos: int) -> str:
        return os.path.join(SUBDIR[self.where[pos] & 1], self.bases[pos] + self.suffixes[pos])

    def records(self):
        return zip(self.uids, self.dates, self.sizes, self.bases)

    def derive(self, suffixes=None, where=None, drop=(), add=(), uidnext=None, mtimes=None):
        """The next view: changed locations, ``drop`` positions removed, ``add``
        = [(uid, base, date, size, where, suffix)] appended (UIDs ascending)."""
        suffixes = self.suffixes if suffixes is None else suffixes
        where = self.where if where is None else where
        uids, bases, dates, sizes, by_base = (self.uids, self.bases, self.dates, self.sizes,
                                              self.by_base)
        if drop:
            dropset = set(drop)
            keep = [i for i in range(len(uids)) if i not in dropset]
            by_base = dict(by_base)
            for i in dropset:
                if by_base.get(bases[i]) == uids[i]:
                    del by_base[bases[i]]
            uids = array("I", [uids[i] for i in keep])
            bases = [bases[i] for i in keep]
            dates = array("q", [dates[i] for i in keep])
            sizes = array("q", [sizes[i] for i in keep])
            suffixes = [suffixes[i] for i in keep]
            where = bytearray(where[i] for i in keep)
        elif add:
            uids, bases, dates, sizes = array("I", uids), list(bases), array("q", dates), \
                array("q", sizes)
            by_base = dict(by_base)
            if suffixes is self.suffixes:
                suffixes = list(suffixes)
            if where is self.where:
                where = bytearray(where)
        for uid, base, date, size, w, suf in add:
            uids.append(uid)
            bases.append(base)
            dates.append(int(date))
            sizes.append(int(size))
            suffixes.append(sys.intern(suf))
            where.append(w)
            by_base[base] = uid
        return MailboxView(self.uidvalidity, self.uidnext if uidnext is None else uidnext,
                           uids, bases, suffixes, where, dates, sizes, by_base,
                           self.mtimes if mtimes is None else mtimes)


# --- changes ---------------------------------------------------------------

@dataclass(frozen=True)
class Changes:
    """What changed in a folder, for EXISTS / EXPUNGE / FETCH FLAGS replies.

    ``new``: UIDs that appeared (ascending). ``expunged``: UIDs gone.
    ``flags``: UIDs whose flags changed and that are still there. ``recent``:
    UIDs that became \\Recent for the receiver (only one listener gets them).
    ``uidvalidity_changed``: the index was rebuilt, every UID is new; an IMAP
    session must drop the folder. ``gone``: the folder was deleted or renamed.
    ``origin``: what the caller of the operation passed, so a session can tell
    its own changes.
    """

    new: tuple = ()
    expunged: tuple = ()
    flags: tuple = ()
    recent: tuple = ()
    uidvalidity_changed: bool = False
    gone: bool = False
    origin: object = None

    def __bool__(self):
        return bool(self.new or self.expunged or self.flags or self.recent
                    or self.uidvalidity_changed or self.gone)

    def then(self, later: "Changes") -> "Changes":
        """These changes followed by ``later``, as one."""
        if not self:
            return later if later.origin is not None or self.origin is None \
                else replace(later, origin=self.origin)
        if not later:
            return self
        gone_later = set(later.expunged)
        never_seen = set(self.new) & gone_later
        new = tuple(u for u in self.new if u not in gone_later) + tuple(later.new)
        expunged = tuple(sorted(set(self.expunged) | (gone_later - never_seen)))
        dead = set(expunged) | never_seen
        flags = tuple(sorted((set(self.flags) | set(later.flags)) - dead))
        recent = tuple(sorted((set(self.recent) | set(later.recent)) - dead))
        return Changes(new, expunged, flags, recent,
                       self.uidvalidity_changed or later.uidvalidity_changed,
                       self.gone or later.gone,
                       later.origin if later.origin is not None else self.origin)
