"""One Maildir folder with its UID index: the object IMAP, POP3 and LMTP share.

The state of a folder is a :class:`MailboxView`: compact parallel arrays in UID
order (UIDs, Maildir base names, info suffixes such as ``:2,RS``, new/ or cur/,
internal dates, wire sizes). A view is never changed once published: every
operation computes the next view off the reactor thread and the reactor
thread swaps it in. So a front end can hold a view (its snapshot) across
callbacks, and readers never see a half-done change.

Operations on one folder run one after the other (a DeferredLock in the
process, an flock on the folder directory across processes); their blocking
part runs through ``run_in_thread`` (``deferToThread`` by default).

Flags live in the Maildir file names only (``:2,`` + letters D F R S T in ASCII
order, other letters such as Dovecot keyword letters are kept), so Dovecot and
mutt see them, and their changes are seen here. \\Recent follows Maildir: a
message is recent while it is in new/; a sync that takes \\Recent moves
new/ files to cur/ and reports them as recent to exactly one listener.
"""

from __future__ import annotations

import collections
import errno
import itertools
import os
import re
import socket
import stat
import sys
import time
from array import array
from dataclasses import replace

from twisted.internet import defer, threads
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mailbox_appliance import durable
from mailbox_appliance.store.errors import NoSuchFolder, NoSuchMessage, StoreUnavailable
from mailbox_appliance.store.index import (INDEX_NAME, UIDVALIDITY_NAME, MAX_UID, IndexCorrupt,
                                           IndexFile, next_uidvalidity)
from mailbox_appliance.store.interfaces import IMailbox
from mailbox_appliance.store.view import (CUR, NEW, SUBDIR, SYSTEM_FLAGS, UNKNOWN, Changes,
                                          MailboxView, MessageInfo, canonical_flag, make_suffix,
                                          suffix_extras, suffix_flags)

__all__ = ["Changes", "Mailbox", "MailboxView", "MessageInfo", "SYSTEM_FLAGS", "run_inline",
           "to_crlf", "wire_size"]

log = Logger()

RACY_NS = 1_000_000_000       # a directory changed less than this before our look: look again
COMPACT_MIN_DEAD = 1000
READ_CHUNK = 1 << 20

_W_TAG = re.compile(r",W=(\d+)(?=,|$)")
_S_TAG = re.compile(r",S=(\d+)(?=,|$)")
_counter = itertools.count()


def to_crlf(data: bytes) -> bytes:
    """LF -> CRLF for line ends that have no CR yet (files by others may be CRLF)."""
    if b"\r" not in data:
        return data.replace(b"\n", b"\r\n")
    return re.sub(rb"(?<!\r)\n", b"\r\n", data)


def wire_size(data: bytes) -> int:
    """len(to_crlf(data)) without building it."""
    return len(data) + data.count(b"\n") - data.count(b"\r\n")


def _crlf_chunks(f, chunk=None):
    """A file's content with CRLF line ends, block by block."""
    chunk = chunk or READ_CHUNK
    prev_cr = False
    while True:
        block = f.read(chunk)
        if not block:
            return
        out = to_crlf(b"\r" + block)[1:] if prev_cr else to_crlf(block)
        prev_cr = block.endswith(b"\r")
        yield out


def _file_wire_size(path) -> int:
    with open(path, "rb") as f:
        return sum(len(c) for c in _crlf_chunks(f))


def safe_hostname(name=None) -> str:
    name = name or socket.gethostname() or "localhost"
    return (name.replace("/", "\\057").replace(":", "\\072").replace(",", "\\054")
            .replace(" ", "_").replace("\n", "_"))


class _Result:
    __slots__ = ("view", "changes", "value", "error")

    def __init__(self, view, changes, value=None, error=None):
        self.view, self.changes, self.value, self.error = view, changes, value, error


class _Gone(Exception):
    pass


def run_inline(fn, *args, **kw):
    """A ``run_in_thread`` that runs in the calling thread (tests, tools)."""
    return defer.maybeDeferred(fn, *args, **kw)


# --- the mailbox -----------------------------------------------------------

@implementer(IMailbox)
class Mailbox:
    """A Maildir folder: its messages, UIDs, flags; one object per folder per process."""

    def __init__(self, path, name="INBOX", run_in_thread=None, hostname=None,
                 uidvalidity_path=None):
        self.path = os.path.abspath(path)
        self.name = name
        self.hostname = safe_hostname(hostname)
        self._run = run_in_thread or threads.deferToThread
        self._index = IndexFile(os.path.join(self.path, INDEX_NAME))
        self._uv_path = uidvalidity_path or os.path.join(self.path, UIDVALIDITY_NAME)
        self._view = None
        self._lock = defer.DeferredLock()
        self._listeners = []
        self._queued_syncs = {}
        self.gone = False
        # Header sections by UID (UIDs are never reused, so entries never go
        # stale): FETCH ENVELOPE and SEARCH FROM/SUBJECT read them over and
        # over, Dovecot keeps the same in its cache file.
        self.headers = BoundedCache(HEADER_CACHE_BYTES)
        # Front ends keep what they derive from a message here (IMAP ENVELOPE,
        # decoded header values for SEARCH).
        self.derived = BoundedCache(DERIVED_CACHE_BYTES)
        self.search_values = BoundedCache(DERIVED_CACHE_BYTES)

    def __repr__(self):
        return f"<Mailbox {self.name!r} at {self.path!r}>"

    # -- state accessors (the current view) --

    @property
    def view(self) -> MailboxView:
        """The current snapshot (empty, UIDVALIDITY 0, before the first sync)."""
        return self._view if self._view is not None else _EMPTY

    @property
    def loaded(self):
        return self._view is not None

    uidvalidity = property(lambda self: self.view.uidvalidity)
    uidnext = property(lambda self: self.view.uidnext)
    uids = property(lambda self: self.view.uids)
    messages = property(lambda self: self.view)
    exists = property(lambda self: len(self.view))

    def __len__(self):
        return len(self.view)

    def info(self, uid):
        return self.view.info(uid)

    def flags(self, uid):
        return self.view.flags(uid)

    def position(self, uid):
        return self.view.position(uid)

    def pending_recent(self):
        return self.view.pending_recent()

    # -- listeners --

    def add_listener(self, callback, take_recent=False):
        """Call ``callback(changes)`` on the reactor thread after every change.

        With ``take_recent`` (an IMAP SELECT, not EXAMINE) every sync moves
        new/ messages to cur/, and the first such listener gets them in
        ``changes.recent``; the other listeners get the same changes without.
        """
        self.remove_listener(callback)
        self._listeners.append((callback, take_recent))

    def remove_listener(self, callback):
        self._listeners = [(cb, t) for cb, t in self._listeners if cb != callback]

    @property
    def listeners(self):
        return [cb for cb, _ in self._listeners]

    def _notify(self, changes):
        if not changes:
            return
        owner = next((cb for cb, t in self._listeners if t), None)
        without = replace(changes, recent=()) if changes.recent else changes
        for cb, _ in list(self._listeners):
            try:
                cb(changes if cb is owner else without)
            except Exception:
                log.failure("mailbox listener failed for {mailbox}", mailbox=self.name)

    # -- the operation machinery --

    def _op(self, fn, *args, origin=None):
        """Run ``fn(view, *args)`` in a thread, under the folder's locks; apply
        the view it returns and tell the listeners."""
        def start():
            if self.gone:
                return defer.fail(NoSuchFolder(f"mailbox {self.name} does not exist"))
            d = self._run(self._guarded, fn, self._view, *args)
            d.addCallback(self._apply, origin)
            d.addErrback(map_os_error)
            return d
        return self._lock.run(start)

    def _guarded(self, fn, view, *args):
        try:
            with self._index.locked():
                return fn(view, *args)
        except (_Gone, FileNotFoundError):
            if os.path.isdir(self.path):
                raise
            old = tuple(view.uids) if view is not None else ()
            return _Result(None, Changes(expunged=old, gone=True),
                           error=NoSuchFolder(f"mailbox {self.name} does not exist"))

    def _apply(self, result, origin):
        if result.view is not None:
            self._view = result.view
        changes = result.changes
        if result.error is not None and isinstance(result.error, NoSuchFolder) and changes.gone:
            self.gone = True
        if origin is not None and changes:
            changes = replace(changes, origin=origin)
        self._notify(changes)
        if result.error is not None:
            raise result.error
        return result.value

    def mark_gone(self):
        """The folder was deleted or renamed away by the store: tell the listeners."""
        if self.gone:
            return
        self.gone = True
        self._notify(Changes(expunged=tuple(self.view.uids), gone=True))

    # -- sync --

    def sync(self, take_recent=False, force=False):
        """Look at the folder on disk and bring the index up to date.

        Picks up files anybody wrote (new/ and cur/, one scandir each, only
        when the directory changed), gives unknown files UIDs in (internal
        date, name) order and records them durably first, drops messages
        whose files are gone, sees flag changes made by renaming. With
        ``take_recent`` (or a listener that takes it) moves new/ to cur/.
        Fires with the :class:`Changes` (listeners get them too).
        """
        take_recent = take_recent or any(t for _, t in self._listeners)
        key = (take_recent, force)
        waiting = self._queued_syncs.get(key)
        if waiting is not None:
            # One waiting sync serves every caller that comes before it starts.
            d = defer.Deferred()
            waiting.append(d)
            return d
        waiting = self._queued_syncs[key] = []

        def start():
            if self._queued_syncs.get(key) is waiting:
                del self._queued_syncs[key]
            if self.gone:
                return defer.fail(NoSuchFolder(f"mailbox {self.name} does not exist"))
            d = self._run(self._guarded, self._t_sync, self._view, take_recent, force)
            d.addCallback(self._apply, None)
            d.addErrback(map_os_error)
            return d

        def share(result):
            for w in waiting:
                if isinstance(result, Failure):
                    w.errback(result)
                else:
                    w.callback(result)
            return result
        return self._lock.run(start).addBoth(share)

    def changed_on_disk(self) -> bool:
        """Cheap check (three stats) whether a sync would find anything: new/
        or cur/ changed since the last look (or changed too recently to
        trust their times), or another process wrote the index."""
        view = self._view
        if view is None:
            return True
        for sub, rec in zip(SUBDIR, view.mtimes):
            if rec is None or rec[1]:
                return True
            try:
                if os.stat(os.path.join(self.path, sub)).st_mtime_ns != rec[0]:
                    return True
            except OSError:
                return True
        return self._index.changed()

    def _t_sync(self, view, take_recent, force):
        view, changes = self._refresh(view, disk=True, force=force)
        if take_recent:
            view, more = self._take_recent(view)
            changes = changes.then(more)
        return _Result(self._maybe_compact(view), changes, changes)

    def _refresh(self, view, disk=False, force=False):
        """Bring ``view`` up to date under the lock: full reload when the index
        file is not what we last saw; with ``disk`` also a directory scan when
        new/ or cur/ changed."""
        if view is None or self._index.changed():
            return self._full_sync(view)
        if not disk:
            return view, Changes()
        return self._quick_sync(view, force)

    def _scan(self, where, out):
        """scandir one of new/ cur/ into ``out``: base -> (where, suffix)."""
        path = os.path.join(self.path, SUBDIR[where])
        t0 = time.time_ns()
        try:
            st = os.stat(path)
        except FileNotFoundError:
            if not os.path.isdir(self.path):
                raise _Gone() from None
            # A damaged Maildir (someone removed new/ or cur/): make it again,
            # as Dovecot does.
            for sub in ("tmp", "new", "cur"):
                os.makedirs(os.path.join(self.path, sub), mode=0o700, exist_ok=True)
            durable.fsync_dir(self.path)
            st = os.stat(path)
        intern = sys.intern
        here = (where, "")
        for name in os.listdir(path):
            if name[0] == "." or "\n" in name or "\r" in name:
                continue
            i = name.find(":")
            if i < 0:
                if where == NEW and name in out:
                    continue
                out[name] = here
            else:
                base = name[:i]
                if where == NEW and base in out:
                    continue
                out[base] = (where, intern(name[i:]))
        return (st.st_mtime_ns, t0 - st.st_mtime_ns < RACY_NS)

    def _dir_changed(self, where, rec):
        if rec is None or rec[1]:
            return True
        try:
            return os.stat(os.path.join(self.path, SUBDIR[where])).st_mtime_ns != rec[0]
        except FileNotFoundError:
            return True

    def _quick_sync(self, view, force):
        need_cur = force or self._dir_changed(CUR, view.mtimes[1])
        need_new = need_cur or self._dir_changed(NEW, view.mtimes[0])
        if not need_new:
            return view, Changes()
        if not need_cur:
            done = self._sync_new_only(view)
            if done is not None:
                return done
        return self._sync_all(view)

    def _sync_new_only(self, view):
        """Only new/ changed (a delivery): look at new/ alone. None when that
        is not enough (a known new/ file left, so cur/ must be read too)."""
        scan = {}
        mt_new = self._scan(NEW, scan)
        bases, suffixes, where = view.bases, view.suffixes, view.where
        new_suffixes = None
        flagged = []
        i = where.find(NEW)
        while i >= 0:
            hit = scan.pop(bases[i], None)
            if hit is None:
                return None
            suf = hit[1]
            if suf != suffixes[i]:
                if new_suffixes is None:
                    new_suffixes = list(suffixes)
                new_suffixes[i] = suf
                if suffix_flags(suf) != suffix_flags(suffixes[i]):
                    flagged.append(view.uids[i])
            i = where.find(NEW, i + 1)
        if any(b in view.by_base for b in scan):
            return None
        mtimes = (mt_new, view.mtimes[1])
        return self._finish(view, new_suffixes, None, (), scan, flagged, mtimes)

    def _sync_all(self, view):
        scan = {}
        mt_new = self._scan(NEW, scan)
        mt_cur = self._scan(CUR, scan)
        return self._reconcile(view, scan, (mt_new, mt_cur))

    def _reconcile(self, view, scan, mtimes):
        """Match every known message with the scan of both directories."""
        bases, old_suffixes, old_where, uids = view.bases, view.suffixes, view.where, view.uids
        suffixes = list(old_suffixes)
        where = bytearray(old_where)
        gone, flagged = [], []
        pop = scan.pop
        for i in range(len(bases)):
            hit = pop(bases[i], None)
            if hit is None:
                gone.append(i)
                continue
            w, suf = hit
            where[i] = w
            old = old_suffixes[i]
            if suf != old:
                suffixes[i] = suf
                if old_where[i] != UNKNOWN and suffix_flags(suf) != suffix_flags(old):
                    flagged.append(uids[i])
        return self._finish(view, suffixes, where, gone, scan, flagged, mtimes)

    def _finish(self, view, suffixes, where, gone, unknown, flagged, mtimes):
        """Give the unknown files UIDs (durably), drop the gone ones."""
        found = []
        for base, (w, suf) in unknown.items():
            path = os.path.join(self.path, SUBDIR[w], base + suf)
            try:
                st = os.stat(path)
                if not stat.S_ISREG(st.st_mode):
                    continue
                m = _W_TAG.search(base)
                size = int(m.group(1)) if m else _file_wire_size(path)
            except FileNotFoundError:
                continue        # taken away meanwhile; the next sync sees where
            found.append((int(st.st_mtime), base, w, suf, size))
        found.sort()
        uidnext = view.uidnext
        add = []
        for date, base, w, suf, size in found:
            if uidnext > MAX_UID:
                log.error("mailbox {path}: UIDs exhausted", path=self.path)
                break
            add.append((uidnext, base, date, size, w, suf))
            uidnext += 1
        gone_uids = [view.uids[i] for i in gone]
        self._index.append([(u, d, s, b) for u, b, d, s, _, _ in add], gone_uids)
        new_view = view.derive(suffixes, where, gone, add, uidnext, mtimes)
        changes = Changes(new=tuple(a[0] for a in add), expunged=tuple(gone_uids),
                          flags=tuple(u for u in flagged))
        return new_view, changes

    def _full_sync(self, prev):
        """(Re)load the index file and scan both directories."""
        try:
            loaded = self._index.load()
            hint = None
        except IndexCorrupt as e:
            loaded, hint = None, e.uidvalidity
            log.warn("mailbox {path}: {why}", path=self.path, why=str(e))
        if loaded is None and prev is not None:
            # The file went away or broke under us, but we know everything
            # clients were told: write it again, same UIDVALIDITY.
            self._index.rewrite(prev.uidvalidity, prev.uidnext, prev.records())
            base = prev
        elif loaded is None:
            uv = next_uidvalidity(self._uv_path, hint or 0)
            self._index.rewrite(uv, 1, [])
            base = MailboxView.empty(uv, 1)
        else:
            n = len(loaded.uids)
            base = MailboxView(loaded.uidvalidity, loaded.uidnext, array("I", loaded.uids),
                               loaded.bases, [""] * n, bytearray([UNKNOWN]) * n,
                               array("q", loaded.dates), array("q", loaded.sizes),
                               loaded.by_base)
        scan = {}
        mt_new = self._scan(NEW, scan)
        mt_cur = self._scan(CUR, scan)
        view, changes = self._reconcile(base, scan, (mt_new, mt_cur))
        if base is prev:
            return view, changes
        if prev is None:
            return view, Changes()
        if view.uidvalidity != prev.uidvalidity:
            return view, Changes(new=tuple(view.uids), expunged=tuple(prev.uids),
                                 uidvalidity_changed=True)
        before, after = set(prev.uids), set(view.uids)
        flags = tuple(u for u in sorted(before & after) if prev.flags(u) != view.flags(u))
        return view, Changes(new=tuple(sorted(after - before)),
                             expunged=tuple(sorted(before - after)), flags=flags)

    def _take_recent(self, view):
        i = view.where.find(NEW)
        if i < 0:
            return view, Changes()
        suffixes, where = list(view.suffixes), bytearray(view.where)
        recent = []
        newdir, curdir = os.path.join(self.path, "new"), os.path.join(self.path, "cur")
        while i >= 0:
            base, suf = view.bases[i], view.suffixes[i]
            target = suf if suf.startswith(":2,") else ":2,"
            try:
                os.rename(os.path.join(newdir, base + suf), os.path.join(curdir, base + target))
            except FileNotFoundError:
                pass            # moved by someone else: the next scan finds it
            else:
                suffixes[i], where[i] = target, CUR
                recent.append(view.uids[i])
            i = view.where.find(NEW, i + 1)
        # Our renames changed both directories: look again next time.
        return view.derive(suffixes, where, mtimes=(None, None)), Changes(recent=tuple(recent))

    def _maybe_compact(self, view):
        dead = self._index.lines - len(view)
        if dead > COMPACT_MIN_DEAD and dead > len(view):
            self._index.rewrite(view.uidvalidity, view.uidnext, view.records())
        return view

    def compact(self):
        """Rewrite the index file without its dead lines (also done by itself)."""
        def run(view):
            view, changes = self._refresh(view)
            self._index.rewrite(view.uidvalidity, view.uidnext, view.records())
            return _Result(view, changes)
        return self._op(run)

    # -- finding files --

    def _find(self, base):
        """(where, suffix) of the file with this base, wherever it is now."""
        for w in (CUR, NEW):
            try:
                with os.scandir(os.path.join(self.path, SUBDIR[w])) as it:
                    for e in it:
                        n = e.name
                        if n == base or (n.startswith(base) and n[len(base)] == ":"):
                            return w, n[len(base):]
            except FileNotFoundError:
                continue
        return None

    def _path_of(self, view, uid):
        pos = view.position(uid)
        if pos < 0:
            raise NoSuchMessage(f"message UID {uid} does not exist")
        return os.path.join(self.path, view.relpath(pos)), view.bases[pos]

    def _open(self, path, base):
        try:
            return open(path, "rb")
        except FileNotFoundError:
            hit = self._find(base)
            if hit is None:
                raise NoSuchMessage("message was expunged") from None
            return open(os.path.join(self.path, SUBDIR[hit[0]], base + hit[1]), "rb")

    # -- reading --

    def read(self, uid):
        """The whole message with CRLF line ends (bytes)."""
        return self._read(uid, self._t_read_all)

    def read_headers(self, uid):
        """The header section with CRLF line ends, including the empty line."""
        return self._read(uid, self._t_read_headers)

    def read_many(self, uids, headers=False):
        """{uid: bytes} of these messages (CRLF), or only their header sections,
        in one trip to the disk thread; expunged ones are left out. Headers
        come from the cache when it has them."""
        view, out, items = self.view, {}, []
        for uid in uids:
            if headers:
                hit = self.headers.get(uid)
                if hit is not None:
                    out[uid] = hit
                    continue
            pos = view.position(uid)
            if pos >= 0:
                items.append((uid, os.path.join(self.path, view.relpath(pos)), view.bases[pos]))
        if not items:
            return defer.succeed(out)
        reader = self._t_read_headers if headers else self._t_read_all

        def work():
            found = {}
            for uid, path, base in items:
                try:
                    found[uid] = reader(path, base)
                except NoSuchMessage:
                    continue
            return found

        def got(found):
            if headers:
                for uid, data in found.items():
                    self.headers.put(uid, data)
            out.update(found)
            return out
        return self._run(work).addCallbacks(got, map_os_error)

    def read_range(self, uid, start, length):
        """``length`` bytes from ``start`` of the CRLF form (partial FETCH)."""
        return self._read(uid, self._t_read_range, start, length)

    def path_of(self, uid):
        """The current file of a message (for tools; may move at any time)."""
        return self._path_of(self.view, uid)[0]

    def _read(self, uid, fn, *args):
        try:
            path, base = self._path_of(self.view, uid)
        except NoSuchMessage:
            return defer.fail()
        return self._run(fn, path, base, *args).addErrback(map_os_error)

    def _t_read_all(self, path, base):
        with self._open(path, base) as f:
            return to_crlf(f.read())

    def _t_read_headers(self, path, base):
        buf = b""
        with self._open(path, base) as f:
            for chunk in _crlf_chunks(f, 1 << 16):
                from_ = max(0, len(buf) - 3)
                buf += chunk
                if buf.startswith(b"\r\n"):
                    return b"\r\n"
                end = buf.find(b"\r\n\r\n", from_)
                if end >= 0:
                    return buf[:end + 4]
        return buf

    def _t_read_range(self, path, base, start, length):
        out, pos, stop = [], 0, start + length
        with self._open(path, base) as f:
            for chunk in _crlf_chunks(f):
                end = pos + len(chunk)
                if end > start:
                    out.append(chunk[max(0, start - pos):stop - pos])
                pos = end
                if pos >= stop:
                    break
        return b"".join(out)

    # -- changing --

    def _unique(self):
        return maildir_unique(self.hostname)

    def append(self, data, flags=(), internaldate=None, origin=None):
        """Store a new message (bytes, CRLF or LF); fires with its UID once the
        file, its directory entry and its index line are on disk."""
        flags = _check_flags(flags)
        date = int(time.time() if internaldate is None else internaldate)
        return self._op(self._t_append, bytes(data), flags, date, origin=origin)

    def _t_append(self, view, data, flags, date):
        lf = data.replace(b"\r\n", b"\n")
        size = wire_size(lf)
        base = f"{self._unique()},S={len(lf)},W={size}"
        tmp = os.path.join(self.path, "tmp", base)
        durable.write_synced(tmp, lambda fd: _write_all(fd, lf), mtime=date)
        view, changes = self._refresh(view)
        suffix = make_suffix(flags)
        final = os.path.join(self.path, "cur", base + suffix)
        try:
            os.rename(tmp, final)
        except BaseException:
            _unlink(tmp)
            raise
        try:
            durable.fsync_dir(os.path.join(self.path, "cur"))
            uid = view.uidnext
            self._index.append([(uid, date, size, base)])
        except BaseException:
            _unlink(final)      # the client hears of a failure: keep nothing
            raise
        view = view.derive(add=[(uid, base, date, size, CUR, suffix)], uidnext=uid + 1,
                           mtimes=(view.mtimes[0], None))
        return _Result(self._maybe_compact(view), changes.then(Changes(new=(uid,))), uid)

    def set_flags(self, uids, flags, mode="set", origin=None):
        """Change the system flags of messages by renaming their files.

        ``mode``: 'set' (replace), 'add' or 'remove'. Fires with a dict
        uid -> flags now, for the UIDs that still exist.
        """
        if mode not in ("set", "add", "remove"):
            raise ValueError(f"mode {mode!r}")
        flags = _check_flags(flags)
        return self._op(self._t_set_flags, list(uids), flags, mode, origin=origin)

    def _t_set_flags(self, view, uids, flags, mode):
        view, changes = self._refresh(view)
        suffixes, where = list(view.suffixes), bytearray(view.where)
        result, changed, moved = {}, [], False
        for uid in uids:
            pos = view.position(uid)
            if pos < 0:
                continue
            base, was_suf, was_w = view.bases[pos], suffixes[pos], where[pos]
            old, w, target = was_suf, was_w, None
            for _ in range(2):
                have = suffix_flags(old)
                want = flags if mode == "set" else have | flags if mode == "add" \
                    else have - flags
                if want == have:
                    target = old
                    break
                target = make_suffix(want, suffix_extras(old))
                try:
                    os.rename(os.path.join(self.path, SUBDIR[w], base + old),
                              os.path.join(self.path, "cur", base + target))
                    w = CUR
                    break
                except FileNotFoundError:
                    # Renamed by another program (its own flag change): start
                    # from the flags in the file's new name.
                    target = None
                    hit = self._find(base)
                    if hit is None:
                        break
                    w, old = hit
            if target is None:
                continue        # expunged by someone else: the next sync says so
            result[uid] = want
            if (w, target) != (was_w, was_suf):
                suffixes[pos], where[pos] = sys.intern(target), w
                moved = True
                if want != suffix_flags(was_suf):
                    changed.append(uid)
        if not moved:
            return _Result(view, changes, result)
        durable.fsync_dir(os.path.join(self.path, "cur"))
        # Our renames changed the directories: look again at the next sync.
        view = view.derive(suffixes, where, mtimes=(None, None))
        return _Result(view, changes.then(Changes(flags=tuple(changed))), result)

    def expunge(self, uids=None, origin=None):
        """Remove the messages flagged \\Deleted (among ``uids`` if given: UID
        EXPUNGE); fires with the list of expunged UIDs."""
        return self._op(self._t_expunge, None if uids is None else set(uids), True,
                        origin=origin)

    def remove(self, uids, origin=None):
        """Remove these messages whatever their flags (MOVE, POP3 DELE+QUIT)."""
        return self._op(self._t_expunge, set(uids), False, origin=origin)

    def _t_expunge(self, view, only, deleted_only):
        view, changes = self._refresh(view)
        drop, touched = [], set()
        for pos in range(len(view)):
            if only is not None and view.uids[pos] not in only:
                continue
            if deleted_only and "\\Deleted" not in suffix_flags(view.suffixes[pos]):
                continue
            w, base, suf = view.where[pos], view.bases[pos], view.suffixes[pos]
            try:
                os.unlink(os.path.join(self.path, SUBDIR[w], base + suf))
            except FileNotFoundError:
                hit = self._find(base)
                if hit is not None:
                    w = hit[0]
                    _unlink(os.path.join(self.path, SUBDIR[w], base + hit[1]))
            touched.add(w)
            drop.append(pos)
        if not drop:
            return _Result(view, changes, [])
        for w in touched:
            durable.fsync_dir(os.path.join(self.path, SUBDIR[w]))
        gone = [view.uids[i] for i in drop]
        self._index.append(expunged=gone)
        mtimes = tuple(None if w in touched else view.mtimes[w] for w in (NEW, CUR))
        view = view.derive(drop=drop, mtimes=mtimes)
        return _Result(self._maybe_compact(view), changes.then(Changes(expunged=tuple(gone))),
                       gone)

    def copy(self, uids, dest, origin=None):
        """Copy messages into ``dest`` (a Mailbox), keeping flags and internal
        dates (hard links when possible). Fires with [(uid here, uid there)]."""
        view = self.view
        items = []
        for uid in sorted(set(uids)):
            pos = view.position(uid)
            if pos < 0:
                continue
            items.append((uid, self.path, view.relpath(pos), view.bases[pos],
                          view.dates[pos], view.sizes[pos], view.suffixes[pos]))
        if not items:
            return defer.succeed([])
        return dest._op(dest._t_copy_in, items, origin=origin)

    def _t_copy_in(self, view, items):
        view, changes = self._refresh(view)
        cur = os.path.join(self.path, "cur")
        made = []
        try:
            for olduid, src_folder, rel, src_base, date, size, suffix in items:
                m = _S_TAG.search(src_base)
                base = f"{self._unique()}{',S=' + m.group(1) if m else ''},W={size}"
                target = make_suffix(suffix_flags(suffix))
                dst = os.path.join(cur, base + target)
                src = os.path.join(src_folder, rel)
                try:
                    self._link_or_copy(src, dst, date)
                except FileNotFoundError:
                    hit = _find_in(src_folder, src_base)
                    if hit is None:
                        continue        # expunged meanwhile
                    self._link_or_copy(hit, dst, date)
                made.append((olduid, base, date, size, target, dst))
            if made:
                durable.fsync_dir(cur)
                uid0 = view.uidnext
                self._index.append([(uid0 + k, d, s, b)
                                    for k, (_, b, d, s, _, _) in enumerate(made)])
        except BaseException:
            for m in made:
                _unlink(m[5])
            raise
        if not made:
            return _Result(view, changes, [])
        add = [(uid0 + k, b, d, s, CUR, t) for k, (_, b, d, s, t, _) in enumerate(made)]
        pairs = [(m[0], uid0 + k) for k, m in enumerate(made)]
        view = view.derive(add=add, uidnext=uid0 + len(made), mtimes=(view.mtimes[0], None))
        return _Result(self._maybe_compact(view),
                       changes.then(Changes(new=tuple(a[0] for a in add))), pairs)

    def _link_or_copy(self, src, dst, date):
        try:
            os.link(src, dst)
            return
        except FileNotFoundError:
            raise
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.EOPNOTSUPP,
                               errno.ENOTSUP, errno.EACCES):
                raise
        tmp = os.path.join(self.path, "tmp", os.path.basename(dst).split(":", 1)[0])
        def copy(fd):
            with open(src, "rb") as f:
                while True:
                    block = f.read(READ_CHUNK)
                    if not block:
                        break
                    _write_all(fd, block)
        durable.write_synced(tmp, copy, mtime=date)
        os.rename(tmp, dst)

    @defer.inlineCallbacks
    def move(self, uids, dest, origin=None):
        """Copy to ``dest``, then remove exactly those messages here (IMAP MOVE).
        A crash in between leaves a copy in both, never in none."""
        pairs = yield self.copy(uids, dest, origin=origin)
        if pairs:
            yield self.remove([old for old, _ in pairs], origin=origin)
        return pairs


_EMPTY = MailboxView.empty()
HEADER_CACHE_BYTES = 32 * 1024 * 1024
DERIVED_CACHE_BYTES = 16 * 1024 * 1024


class BoundedCache:
    """A dict of bytes values bounded by their total size; least recently used go first."""

    def __init__(self, max_bytes):
        self.max_bytes = max_bytes
        self._items = collections.OrderedDict()
        self._size = 0

    def get(self, key):
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
        return value

    def put(self, key, value):
        if len(value) > self.max_bytes // 4:
            return
        old = self._items.pop(key, None)
        if old is not None:
            self._size -= len(old)
        self._items[key] = value
        self._size += len(value)
        while self._size > self.max_bytes:
            _, dropped = self._items.popitem(last=False)
            self._size -= len(dropped)


def maildir_unique(hostname):
    """A Maildir base name: ``<sec>.M<usec>P<pid>Q<n>.<host>`` (unique per process
    counter, so two writers of one process never collide)."""
    t = time.time()
    sec = int(t)
    return f"{sec}.M{int((t - sec) * 1e6)}P{os.getpid()}Q{next(_counter)}.{hostname}"


def write_new_message(folder, data, hostname):
    """Maildir delivery into ``folder``/new (tmp, fsync, rename, fsync new/),
    stored with LF line ends and S=/W= in the name; returns the base name."""
    lf = data.replace(b"\r\n", b"\n")
    base = f"{maildir_unique(hostname)},S={len(lf)},W={wire_size(lf)}"
    tmp = os.path.join(folder, "tmp", base)
    durable.write_synced(tmp, lambda fd: _write_all(fd, lf))
    try:
        os.rename(tmp, os.path.join(folder, "new", base))
    except BaseException:
        _unlink(tmp)
        raise
    durable.fsync_dir(os.path.join(folder, "new"))
    return base


def unique_name():
    """A name no other process or call uses (staging directories)."""
    return f"{time.time_ns()}.P{os.getpid()}Q{next(_counter)}"


def _check_flags(flags) -> frozenset:
    out = set()
    for f in flags:
        c = canonical_flag(f)
        if c is None:
            if f.lower() == "\\recent":
                continue
            raise ValueError(f"flag {f!r} cannot be stored")
        out.add(c)
    return frozenset(out)


def _find_in(folder, base):
    for sub in ("cur", "new"):
        try:
            with os.scandir(os.path.join(folder, sub)) as it:
                for e in it:
                    n = e.name
                    if n == base or (n.startswith(base) and n[len(base)] == ":"):
                        return os.path.join(folder, sub, n)
        except FileNotFoundError:
            continue
    return None


def map_os_error(failure):
    if failure.check(NoSuchMessage, NoSuchFolder):
        return failure
    e = failure.check(OSError) and failure.value
    if e:
        raise StoreUnavailable(f"mail storage error: {e.strerror or e}", e.errno)
    return failure


_write_all = durable.write_all
_unlink = durable.unlink_quietly
