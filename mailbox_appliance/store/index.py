"""The per-folder index file: UIDVALIDITY, UIDNEXT and the UID of each message.

One file per folder, ``mailbox_appliance.index`` inside the folder's Maildir
directory (INBOX: the Maildir itself), in UTF-8 text a person can read::

    MAILBOX_APPLIANCE_INDEX 1 <uidvalidity> <uidnext>
    <uid> <internaldate> <size> <basename>
    - <uid> <uid> ...

A record line gives a message its UID: ``internaldate`` in whole seconds since
the epoch, ``size`` the size on the IMAP wire (CRLF line ends), ``basename``
the Maildir file name without the ``:2,<flags>`` info (flags live only in the
file name, so Dovecot and mutt see them too). It is last on the line, so it
may hold spaces. A ``-`` line says those UIDs are expunged. UIDs only grow
down the file; a later record for the same basename replaces an earlier one
(the file came back after it was expunged, and was given a new UID).

Crash safety:

- New UIDs are appended and fsync'ed before anybody is told about them, so a
  UID that a client saw is never given to another message.
- UIDNEXT is the larger of the header's and the last record's UID + 1; the
  header is only rewritten by compaction, which writes a whole new file (tmp,
  fsync, rename, directory fsync), so a crash leaves the old or the new file.
- A torn last line (crash during an append, before its fsync returned) was
  never acknowledged; it is ignored and cut off before the next append. Its
  UID, if readable, is still skipped.
- A file whose header or any complete line is unreadable is corrupt: the
  caller then starts over with a NEW UIDVALIDITY, larger than the old one
  when the old header can still be read, and larger than every UIDVALIDITY
  handed out in this Maildir (``mailbox_appliance.uidvalidity`` remembers the
  last one), so old UIDs are never silently reused.

The file is changed only under an exclusive ``flock`` on the folder's
directory, so two processes of the appliance (the server and the admin
command) never assign UIDs at the same time.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import operator
import os
import time

from mailbox_appliance import durable

INDEX_NAME = "mailbox_appliance.index"
UIDVALIDITY_NAME = "mailbox_appliance.uidvalidity"
MAGIC = "MAILBOX_APPLIANCE_INDEX"
VERSION = 1
_ENC = ("utf-8", "surrogateescape")
MAX_UID = 0xFFFFFFFF
_DASH_CHUNK = 200


class IndexCorrupt(Exception):
    """The index cannot be trusted; ``uidvalidity`` is the old value if known."""

    def __init__(self, why, uidvalidity=None):
        super().__init__(why)
        self.uidvalidity = uidvalidity


class Loaded:
    """The live records of an index file, in UID order (parallel lists)."""

    __slots__ = ("uidvalidity", "uidnext", "uids", "dates", "sizes", "bases", "lines", "by_base")

    def __init__(self, uidvalidity, uidnext, uids, dates, sizes, bases, lines, by_base):
        self.uidvalidity = uidvalidity
        self.uidnext = uidnext
        self.uids = uids
        self.dates = dates
        self.sizes = sizes
        self.bases = bases
        self.lines = lines          # record and '-' lines in the file (not the header)
        self.by_base = by_base      # basename -> uid of the live records


def check_base(base: str) -> None:
    if not base or "\n" in base or "\r" in base or base.startswith("."):
        raise ValueError(f"unusable Maildir base name {base!r}")


class IndexFile:
    """Reads and writes one folder's index file.

    Only used from one thread at a time, under :meth:`locked`.
    """

    def __init__(self, path):
        self.path = path
        self.folder = os.path.dirname(path)
        self.lines = 0              # lines after the header, as far as we know
        self._identity = None       # (ino, size, mtime_ns) after our last read/write
        self._good_len = None       # torn tail: truncate here before appending

    # -- locking and change detection --

    @contextlib.contextmanager
    def locked(self):
        """Exclusive flock on the folder directory, across processes."""
        fd = os.open(self.folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)            # closing drops the lock

    def _stat_identity(self):
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def changed(self) -> bool:
        """Whether the file is not what we last read or wrote (another
        process appended or compacted, or it was removed)."""
        ident = self._stat_identity()
        return ident is None or ident != self._identity

    def exists(self) -> bool:
        return os.path.exists(self.path)

    # -- reading --

    def load(self) -> Loaded | None:
        """Parse the file; None if there is none. Raises IndexCorrupt."""
        try:
            with open(self.path, "rb") as f:
                st = os.fstat(f.fileno())
                data = f.read()
        except FileNotFoundError:
            return None
        good_len = data.rfind(b"\n") + 1
        text = data[:good_len].decode(*_ENC)
        torn = data[good_len:]
        lines = text.split("\n")
        lines.pop()                      # "" after the last newline
        if not lines:
            raise IndexCorrupt("index has no header")
        header = lines[0].split(" ")
        try:
            if len(header) != 4 or header[0] != MAGIC:
                raise ValueError
            uidvalidity = int(header[2])
            uidnext = int(header[3])
            if not (0 < uidvalidity <= MAX_UID and 0 < uidnext):
                raise ValueError
        except ValueError:
            raise IndexCorrupt("index header unreadable") from None
        if header[1] != str(VERSION):
            raise IndexCorrupt(f"index format {header[1]!r} unknown", uidvalidity)

        body = lines[1:]
        dash = [ln for ln in body if ln.startswith("-")]
        rows = [ln.split(" ", 3) for ln in body if not ln.startswith("-")] if dash \
            else [ln.split(" ", 3) for ln in body]
        try:
            uids = [int(r[0]) for r in rows]
            dates = [int(r[1]) for r in rows]
            sizes = [int(r[2]) for r in rows]
            bases = [r[3] for r in rows]
            dead = {int(tok) for ln in dash for tok in ln[1:].split()}
        except (ValueError, IndexError):
            raise IndexCorrupt("index line unreadable", uidvalidity) from None
        if uids and (uids[0] <= 0 or uids[-1] > MAX_UID
                     or any(map(operator.ge, uids, itertools.islice(uids, 1, None)))):
            raise IndexCorrupt("index UIDs out of order", uidvalidity)
        if not all(bases):
            raise IndexCorrupt("index line without a file name", uidvalidity)
        by_base = dict(zip(bases, uids))
        if len(by_base) != len(bases):
            # A file that came back after its expunge got a new UID: the last wins.
            dead.update(u for u, b in zip(uids, bases) if by_base[b] != u)
        if dead:
            keep = [i for i, u in enumerate(uids) if u not in dead]
            for i, u in enumerate(uids):
                if u in dead and by_base.get(bases[i]) == u:
                    del by_base[bases[i]]
            uids = [uids[i] for i in keep]
            dates = [dates[i] for i in keep]
            sizes = [sizes[i] for i in keep]
            bases = [bases[i] for i in keep]
        last = uids[-1] if uids else 0
        if rows:
            last = max(last, int(rows[-1][0]))
        uidnext = max(uidnext, last + 1)
        if torn:
            # Never acknowledged, but skip its UID anyway if it has one.
            tok = torn.split(b" ", 1)[0]
            if tok.isdigit():
                uidnext = max(uidnext, min(int(tok), MAX_UID) + 1)
            self._good_len = good_len
        else:
            self._good_len = None
        self.lines = len(body)
        self._identity = (st.st_ino, st.st_size, st.st_mtime_ns)
        return Loaded(uidvalidity, uidnext, uids, dates, sizes, bases, len(body), by_base)

    # -- writing --

    def append(self, records=(), expunged=()):
        """Append records ``(uid, date, size, base)`` and expunged UIDs, then fsync.

        Returns only once the lines are on disk.
        """
        out = []
        for uid, date, size, base in records:
            check_base(base)
            out.append(f"{uid} {int(date)} {int(size)} {base}\n")
        exp = list(expunged)
        for i in range(0, len(exp), _DASH_CHUNK):
            out.append("- " + " ".join(str(u) for u in exp[i:i + _DASH_CHUNK]) + "\n")
        if not out:
            return
        data = "".join(out).encode(*_ENC)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        try:
            st = os.fstat(fd)
            if self._identity is not None and st.st_ino != self._identity[0]:
                raise OSError("index file replaced while locked")
            if self._good_len is not None:
                os.ftruncate(fd, self._good_len)
                self._good_len = None
            durable_write(fd, data)
            os.fsync(fd)
            st = os.fstat(fd)
        finally:
            os.close(fd)
        self.lines += len(out)
        self._identity = (st.st_ino, st.st_size, st.st_mtime_ns)

    def rewrite(self, uidvalidity, uidnext, records):
        """Replace the whole file (header + records), atomically and durably."""
        tmp = self.path + ".tmp"
        parts = [f"{MAGIC} {VERSION} {uidvalidity} {uidnext}\n"]
        n = 0
        for uid, date, size, base in records:
            check_base(base)
            parts.append(f"{uid} {int(date)} {int(size)} {base}\n")
            n += 1
        data = "".join(parts).encode(*_ENC)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            durable_write(fd, data)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        os.close(fd)
        os.rename(tmp, self.path)
        durable.fsync_dir(self.folder)
        st = os.stat(self.path)
        self.lines = n
        self._good_len = None
        self._identity = (st.st_ino, st.st_size, st.st_mtime_ns)


durable_write = durable.write_all


def next_uidvalidity(path: str, at_least: int = 0) -> int:
    """A new UIDVALIDITY: the current time, but always larger than the last
    one handed out through ``path`` and than ``at_least``.

    ``path`` (``Maildir/mailbox_appliance.uidvalidity``) holds the last value
    in fixed width, rewritten in place under flock, so a folder deleted and
    created again in the same second still gets a new value.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        raw = os.pread(fd, 64, 0)
        try:
            last = int(raw.split(b"\n", 1)[0] or b"0")
        except ValueError:
            last = 0
        value = max(int(time.time()), last + 1, at_least + 1)
        if value > MAX_UID:
            raise OSError("UIDVALIDITY space exhausted")
        os.pwrite(fd, b"%010d\n" % value, 0)
        os.fsync(fd)
    finally:
        os.close(fd)
    if not raw:
        durable.fsync_dir(os.path.dirname(path) or ".")
    return value
