"""A session's view of its selected mailbox: sequence numbers and what it was told.

The store's Mailbox is shared by every session of a user. Each session keeps
the UIDs its client knows, in sequence order, and collects the store's change
notices; they are announced as EXPUNGE, FETCH FLAGS, EXISTS and RECENT when
RFC 3501 allows (expunges never while a command uses sequence numbers).
"""

from __future__ import annotations

import bisect
from array import array

from mailbox_appliance.imap.sequence import resolve


class SelectedMailbox:
    """Per-session state of a SELECTed or EXAMINEd mailbox."""

    def __init__(self, name, mailbox, readonly, recent=(), on_change=None):
        self.name = name
        self.mailbox = mailbox
        self.readonly = readonly
        # The view's UID array is shared (views never change) until this
        # session's numbering departs from it: 200 idle sessions on a big
        # mailbox must not hold 200 copies.
        self.uids = mailbox.view.uids
        self._own_uids = False
        self.recent = set(recent)
        self._new = set()
        self._expunged = set()
        self._flags = set()
        self._on_change = on_change
        mailbox.add_listener(self._changed, take_recent=not readonly)

    def close(self):
        self.mailbox.remove_listener(self._changed)

    def _changed(self, changes):
        if changes.uidvalidity_changed or changes.gone:
            self._expunged.update(self.uids)
        mine = changes.origin is self
        if not mine:
            # Our own STORE and EXPUNGE answer for themselves.
            self._flags.update(changes.flags)
            self._expunged.update(changes.expunged)
        self._new.update(changes.new)
        self._new.difference_update(changes.expunged)
        self.recent.update(changes.recent)
        if self._on_change is not None:
            self._on_change()

    @property
    def pending(self):
        return bool(self._new or self._expunged or self._flags)

    @property
    def exists(self):
        return len(self.uids)

    def seq_of(self, uid):
        i = bisect.bisect_left(self.uids, uid)
        return i + 1 if i < len(self.uids) and self.uids[i] == uid else None

    def select(self, ranges, by_uid):
        """[(seq, uid)] named by a parsed sequence set, in sequence order.

        Raises IndexError for a message number that does not exist (BAD);
        UIDs that do not exist are simply left out (RFC 3501 6.4.8).
        """
        if by_uid:
            if not self.uids:
                return []
            picked = set()
            # "*" is the largest UID in the mailbox.
            for lo, hi in resolve(ranges, self.uids[-1]):
                i = bisect.bisect_left(self.uids, lo)
                j = bisect.bisect_right(self.uids, hi)
                picked.update(range(i, j))
            return [(i + 1, self.uids[i]) for i in sorted(picked)]
        n = len(self.uids)
        seqs = set()
        for lo, hi in resolve(ranges, n):
            if lo < 1 or hi > n:
                raise IndexError("no such message")
            seqs.update(range(lo, hi + 1))
        return [(s, self.uids[s - 1]) for s in sorted(seqs)]

    def _writable_uids(self):
        if not self._own_uids:
            self.uids = array("I", self.uids)
            self._own_uids = True
        return self.uids

    def forget(self, uids):
        """Drop UIDs this session expunged itself; returns the EXPUNGE lines."""
        lines = []
        for uid in sorted(uids, reverse=True):
            seq = self.seq_of(uid)
            if seq is not None:
                del self._writable_uids()[seq - 1]
                lines.append(b"* %d EXPUNGE" % seq)
            self.recent.discard(uid)
            self._expunged.discard(uid)
            self._flags.discard(uid)
        return lines

    def updates(self, allow_expunge=True):
        """Untagged lines for the changes not yet told to the client."""
        lines = []
        if allow_expunge and self._expunged:
            gone, self._expunged = self._expunged, set()
            lines += self.forget(gone)
        if self._flags:
            changed, self._flags = self._flags, set()
            view = self.mailbox.view
            for uid in sorted(changed):
                seq = self.seq_of(uid)
                flags = view.flags(uid)
                if seq is not None and flags is not None:
                    lines.append(b"* %d FETCH (FLAGS (%s))" % (
                        seq, self.flag_text(uid, flags).encode()))
        if self._new:
            last = self.uids[-1] if self.uids else 0
            fresh = sorted(u for u in self._new if u > last)
            self._new = set()
            if fresh:
                self._writable_uids().extend(fresh)
                lines.append(b"* %d EXISTS" % len(self.uids))
                lines.append(b"* %d RECENT" % len(self.recent))
        return lines

    def flag_text(self, uid, flags):
        out = sorted(flags)
        if uid in self.recent:
            out.append("\\Recent")
        return " ".join(out)
