"""The IMAP commands that work on mailboxes and messages, over the store.

``IMAPSession`` is the connection layer of ``server.py`` plus these commands.
Names travel in modified UTF-7 and are converted at this edge; the store
checks them (no escape from the user's Maildir). Message data is read from
the store only when a FETCH or SEARCH item needs it, a batch at a time.
"""

from __future__ import annotations

from twisted.internet import defer, task
from twisted.logger import Logger

from mailbox_appliance.imap import fetch as fetch_mod, mime
from mailbox_appliance.imap.args import (
    ArgumentError, list_matcher, parse_date_time, parse_flags,
    parse_status_items, parse_store_action)
from mailbox_appliance.imap.search import SearchBadCharset, SearchError, parse_search
from mailbox_appliance.imap.selected import SelectedMailbox
from mailbox_appliance.imap.sequence import SequenceSetError, parse_sequence_set
from mailbox_appliance.imap.server import (
    AUTHED, AUTHENTICATED, SELECTED, IMAPServerFactory, IMAPServerProtocol, bad, no, quote)
from mailbox_appliance.imap.tokens import Atom, astring
from mailbox_appliance.store import names
from mailbox_appliance.store.errors import (
    FolderExists, FolderHasChildren, FolderNameError, NoSuchFolder, StoreError)

FETCH_BATCH = 200               # messages read from disk per thread hop
PERMANENT_FLAGS = "\\Answered \\Flagged \\Deleted \\Seen \\Draft"
# COPY/MOVE into or out of these folders are reported to the factory's
# ``on_moved`` hook (the Bayesian filter learns from them); at most
# MAX_REPORTED messages of one command, read one at a time.
REPORTED_FOLDERS = frozenset({"Junk"})
MAX_REPORTED = 500

log = Logger(namespace="mailbox_appliance.imap.commands")


def _store_error(f):
    """A store failure as the NO answer RFC 3501 and RFC 5530 expect."""
    e = f.value
    if isinstance(e, NoSuchFolder):
        raise no("Mailbox does not exist", "NONEXISTENT")
    if isinstance(e, FolderExists):
        raise no("Mailbox already exists", "ALREADYEXISTS")
    if isinstance(e, FolderHasChildren):
        raise no("Mailbox has children; delete them first", "HASCHILDREN")
    if isinstance(e, FolderNameError):
        raise no(f"Bad mailbox name: {e}", "CANNOT")
    if isinstance(e, StoreError):
        raise no(str(e) or "Mailbox error", "CANNOT")
    return f


class _Msg:
    """What FETCH and SEARCH may ask of one message (see fetch.py)."""

    __slots__ = ("uid", "flags", "internaldate", "size", "recent", "_data", "_header",
                 "envelope", "search_cache")

    def __init__(self, info, recent, data=None, header=None, envelope=None, search_cache=None):
        self.uid, self.flags, self.internaldate, self.size = info
        self.recent = recent
        self._data, self._header = data, header
        self.envelope = envelope
        self.search_cache = search_cache

    def text(self):
        return self._data

    def header(self):
        return self._header if self._header is not None else self._data


class IMAPSession(IMAPServerProtocol):
    """An IMAP session with the mailbox commands."""

    selected = None
    userstore = None
    _idle_tag = None

    # -- session life ---------------------------------------------------------

    def logged_in(self, user):
        answer = super().logged_in(user)
        domain, local = user.mailbox_parts
        self.userstore = self.factory.store.open_user(domain, local)
        return self.userstore.ensure_special_folders().addCallback(lambda _: answer)

    def session_closed(self):
        self._unselect()

    def _unselect(self):
        if self.selected is not None:
            self.selected.close()
            self.selected = None
        if self.state == SELECTED:
            self.state = AUTHENTICATED

    def _changed(self):
        if self._idle_tag is not None:
            self._flush_updates()

    def _flush_updates(self, allow_expunge=True):
        if self.selected is not None:
            for line in self.selected.updates(allow_expunge):
                self.send_line(line)

    def _finish(self, tag, result):
        # Unsolicited updates go out before every tagged answer; expunges only
        # after commands that do not use message numbers.
        if self.selected is not None and self.state == SELECTED and result is not False:
            self._flush_updates(allow_expunge=self._expunge_ok)
        self._expunge_ok = True
        return super()._finish(tag, result)

    _expunge_ok = True

    def poll_changes(self):
        if self.selected is None:
            return defer.succeed(None)
        mbox = self.selected.mailbox
        if mbox.changed_on_disk():
            return mbox.sync().addErrback(lambda f: None)
        return defer.succeed(None)

    def _mailbox_name(self, token):
        text = astring(token)
        if text is None:
            raise bad("Mailbox name expected")
        try:
            return names.from_wire(text)
        except (FolderNameError, ValueError) as e:
            raise no(f"Bad mailbox name: {e}", "CANNOT")

    # -- authenticated state ------------------------------------------------

    def _select(self, tag, args, readonly):
        if len(args) != 1:
            raise bad("Syntax: SELECT mailbox")
        name = self._mailbox_name(args[0])
        self._unselect()
        d = self.userstore.mailbox(name)

        def opened(mbox):
            return mbox.sync(take_recent=not readonly).addCallback(lambda ch: (mbox, ch))

        def ready(result):
            mbox, changes = result
            sel = SelectedMailbox(name, mbox, readonly, recent=changes.recent,
                                  on_change=self._changed)
            self.selected = sel
            self.state = SELECTED
            view = mbox.view
            self.send_line(b"* FLAGS (" + PERMANENT_FLAGS.encode() + b")")
            self.send_line(b"* OK [PERMANENTFLAGS (" + (b"" if readonly else
                           PERMANENT_FLAGS.encode()) + b")] Flags permitted")
            self.send_line(b"* %d EXISTS" % sel.exists)
            self.send_line(b"* %d RECENT" % len(sel.recent))
            first = view.first_without("\\Seen")
            if first >= 0:
                self.send_line(b"* OK [UNSEEN %d] First unseen" % (first + 1))
            self.send_line(b"* OK [UIDVALIDITY %d] UIDs valid" % view.uidvalidity)
            self.send_line(b"* OK [UIDNEXT %d] Predicted next UID" % view.uidnext)
            return ("[READ-ONLY] EXAMINE completed" if readonly
                    else "[READ-WRITE] SELECT completed")
        return d.addCallback(opened).addCallbacks(ready, _store_error)

    def cmd_SELECT(self, tag, args):
        return self._select(tag, args, False)
    cmd_SELECT.states = AUTHED

    def cmd_EXAMINE(self, tag, args):
        return self._select(tag, args, True)
    cmd_EXAMINE.states = AUTHED

    def cmd_CREATE(self, tag, args):
        if len(args) != 1:
            raise bad("Syntax: CREATE mailbox")
        name = self._mailbox_name(args[0])
        return defer.maybeDeferred(self.userstore.create, name).addCallbacks(
            lambda _: "CREATE completed", _store_error)
    cmd_CREATE.states = AUTHED

    def cmd_DELETE(self, tag, args):
        if len(args) != 1:
            raise bad("Syntax: DELETE mailbox")
        name = self._mailbox_name(args[0])
        if self.selected is not None and self.selected.name == name:
            self._unselect()
        return defer.maybeDeferred(self.userstore.delete, name).addCallbacks(
            lambda _: "DELETE completed", _store_error)
    cmd_DELETE.states = AUTHED

    def cmd_RENAME(self, tag, args):
        if len(args) != 2:
            raise bad("Syntax: RENAME old new")
        old, new = self._mailbox_name(args[0]), self._mailbox_name(args[1])
        return defer.maybeDeferred(self.userstore.rename, old, new).addCallbacks(
            lambda _: "RENAME completed", _store_error)
    cmd_RENAME.states = AUTHED

    def cmd_SUBSCRIBE(self, tag, args):
        if len(args) != 1:
            raise bad("Syntax: SUBSCRIBE mailbox")
        name = self._mailbox_name(args[0])
        return defer.maybeDeferred(self.userstore.subscribe, name).addCallbacks(
            lambda _: "SUBSCRIBE completed", _store_error)
    cmd_SUBSCRIBE.states = AUTHED

    def cmd_UNSUBSCRIBE(self, tag, args):
        if len(args) != 1:
            raise bad("Syntax: UNSUBSCRIBE mailbox")
        name = self._mailbox_name(args[0])
        return defer.maybeDeferred(self.userstore.unsubscribe, name).addCallbacks(
            lambda _: "UNSUBSCRIBE completed", _store_error)
    cmd_UNSUBSCRIBE.states = AUTHED

    def _list_args(self, args):
        if len(args) < 2:
            raise bad("Syntax: LIST reference pattern")
        reference, pattern = astring(args[-2]), astring(args[-1])
        if reference is None or pattern is None:
            raise bad("Syntax: LIST reference pattern")
        try:
            return names.decode_mutf7(reference), names.decode_mutf7(pattern)
        except (FolderNameError, ValueError):
            raise bad("Bad modified UTF-7 in LIST arguments")

    def cmd_LIST(self, tag, args):
        # RFC 5258 selection options, e.g. LIST (SPECIAL-USE) "" "*".
        special_only = False
        if args and isinstance(args[0], list):
            opts = {str(a).upper() for a in args[0] if isinstance(a, Atom)}
            special_only = "SPECIAL-USE" in opts
            args = args[1:]
        reference, pattern = self._list_args(args)
        if pattern == "":
            self.send_line(b'* LIST (\\Noselect) "." ""')
            return "LIST completed"
        match = list_matcher(reference, pattern)
        d = self.userstore.list_folders("*")

        def listed(folders):
            for f in folders:
                if not match(f.name) or (special_only and not f.special_use):
                    continue
                attrs = " ".join(sorted(f.attributes))
                self.send_line(b"* LIST (" + attrs.encode() + b') "." ' +
                               quote(names.to_wire(f.name)))
            return "LIST completed"
        return d.addCallbacks(listed, _store_error)
    cmd_LIST.states = AUTHED

    def cmd_LSUB(self, tag, args):
        reference, pattern = self._list_args(args)
        match = list_matcher(reference, pattern)
        d = defer.maybeDeferred(self.userstore.subscriptions)

        def listed(subscribed):
            for name in sorted(subscribed):
                if match(name):
                    self.send_line(b'* LSUB () "." ' + quote(names.to_wire(name)))
            return "LSUB completed"
        return d.addCallbacks(listed, _store_error)
    cmd_LSUB.states = AUTHED

    def cmd_STATUS(self, tag, args):
        if len(args) != 2:
            raise bad("Syntax: STATUS mailbox (items)")
        name = self._mailbox_name(args[0])
        try:
            items = parse_status_items(args[1])
        except ArgumentError as e:
            raise bad(str(e))
        d = self.userstore.mailbox(name)

        def got(mbox):
            return mbox.sync().addCallback(lambda _: mbox)

        def answer(mbox):
            view = mbox.view
            values = {"MESSAGES": len(view), "RECENT": len(view.pending_recent()),
                      "UIDNEXT": view.uidnext, "UIDVALIDITY": view.uidvalidity,
                      "UNSEEN": view.count_without("\\Seen")}
            body = " ".join(f"{i} {values[i]}" for i in items)
            self.send_line(b"* STATUS " + quote(names.to_wire(name)) + b" (" +
                           body.encode() + b")")
            return "STATUS completed"
        return d.addCallback(got).addCallbacks(answer, _store_error)
    cmd_STATUS.states = AUTHED

    def cmd_APPEND(self, tag, args):
        if len(args) < 2:
            raise bad("Syntax: APPEND mailbox [(flags)] [date-time] literal")
        name = self._mailbox_name(args[0])
        rest = args[1:]
        flags, when = set(), None
        try:
            if isinstance(rest[0], list):
                flags = parse_flags(rest.pop(0))
            if len(rest) == 2:
                when = parse_date_time(rest.pop(0))
        except ArgumentError as e:
            raise bad(str(e))
        if len(rest) != 1 or not isinstance(rest[0], bytes):
            raise bad("APPEND needs the message as a literal")
        data = rest[0]
        d = self.userstore.mailbox(name)

        def got(mbox):
            return mbox.append(data, flags=flags, internaldate=when).addCallback(
                lambda uid: (mbox, uid))

        def done(result):
            mbox, uid = result
            return f"[APPENDUID {mbox.view.uidvalidity} {uid}] APPEND completed"

        def failed(f):
            if f.check(NoSuchFolder):
                raise no("Mailbox does not exist", "TRYCREATE")
            return _store_error(f)
        return d.addCallback(got).addCallbacks(done, failed)
    cmd_APPEND.states = AUTHED

    # -- selected state -------------------------------------------------------

    def cmd_CHECK(self, tag, args):
        return self.poll_changes().addCallback(lambda _: "CHECK completed")
    cmd_CHECK.states = (SELECTED,)

    def cmd_UNSELECT(self, tag, args):
        self._unselect()
        return "UNSELECT completed"
    cmd_UNSELECT.states = (SELECTED,)

    def cmd_CLOSE(self, tag, args):
        sel = self.selected
        self._unselect()
        if sel.readonly:
            return "CLOSE completed"
        # Expunge silently (RFC 3501 6.4.2).
        return sel.mailbox.expunge(origin=sel).addCallbacks(
            lambda _: "CLOSE completed", _store_error)
    cmd_CLOSE.states = (SELECTED,)

    def _expunge(self, uids):
        sel = self.selected
        if sel.readonly:
            raise no("Mailbox is read-only", "READ-ONLY")

        def done(gone):
            for line in sel.forget(gone):
                self.send_line(line)
            return "EXPUNGE completed"
        return sel.mailbox.expunge(uids, origin=sel).addCallbacks(done, _store_error)

    def cmd_EXPUNGE(self, tag, args):
        return self._expunge(None)
    cmd_EXPUNGE.states = (SELECTED,)

    def _message_set(self, token, by_uid):
        if not isinstance(token, Atom):
            raise bad("Sequence set expected")
        try:
            ranges = parse_sequence_set(str(token))
            return self.selected.select(ranges, by_uid)
        except SequenceSetError:
            raise bad("Bad sequence set")
        except IndexError:
            raise bad("No such message")

    def cmd_UID(self, tag, args):
        if not args or not isinstance(args[0], Atom):
            raise bad("Syntax: UID command ...")
        sub = args[0].upper()
        handler = {"FETCH": self._fetch, "STORE": self._store, "SEARCH": self._search,
                   "COPY": self._copy, "MOVE": self._move,
                   "EXPUNGE": self._uid_expunge}.get(sub)
        if handler is None:
            raise bad("Unknown UID command")
        return handler(args[1:], True)
    cmd_UID.states = (SELECTED,)

    def _uid_expunge(self, args, by_uid):
        if len(args) != 1:
            raise bad("Syntax: UID EXPUNGE set")
        return self._expunge([uid for _, uid in self._message_set(args[0], True)])

    # FETCH --------------------------------------------------------------

    def cmd_FETCH(self, tag, args):
        return self._fetch(args, False)
    cmd_FETCH.states = (SELECTED,)

    def _fetch(self, args, by_uid):
        if len(args) < 2:
            raise bad("Syntax: FETCH set items")
        self._expunge_ok = by_uid
        wanted = self._message_set(args[0], by_uid)
        try:
            items = fetch_mod.parse_fetch_items(args[1] if len(args) == 2 else args[1:],
                                                uid=by_uid)
        except fetch_mod.FetchSyntaxError as e:
            raise bad(f"Bad FETCH items: {e}")
        sel = self.selected
        need = fetch_mod.needs(items)
        seen = fetch_mod.sets_seen(items) and not sel.readonly
        if seen:
            items = fetch_mod.with_flags(items)
        return self._fetch_batches(sel, wanted, items, need, seen).addCallback(
            lambda _: "FETCH completed")

    @defer.inlineCallbacks
    def _fetch_batches(self, sel, wanted, items, need, seen):
        mbox = sel.mailbox
        if seen:
            unseen = [uid for _, uid in wanted
                      if "\\Seen" not in (mbox.view.flags(uid) or ())]
            if unseen:
                yield mbox.set_flags(unseen, {"\\Seen"}, "add", origin=sel)
        want_env = any(item.name == "ENVELOPE" for item in items)
        envelopes = mbox.derived
        for start in range(0, len(wanted), FETCH_BATCH):
            batch = wanted[start:start + FETCH_BATCH]
            uids = [uid for _, uid in batch]
            data, headers = {}, {}
            if need == fetch_mod.MESSAGE:
                data = yield mbox.read_many(uids)
            elif need == fetch_mod.HEADER:
                headers = yield mbox.read_many(uids, headers=True)
            elif want_env:
                # ENVELOPE alone: only messages whose envelope is not cached yet.
                missing = [u for u in uids if envelopes.get(u) is None]
                if missing:
                    headers = yield mbox.read_many(missing, headers=True)
            view = mbox.view
            out = []
            for seq, uid in batch:
                info = view.info(uid)
                if info is None:
                    continue        # expunged meanwhile by someone else
                env = None
                if want_env:
                    env = envelopes.get(uid)
                    if env is None:
                        header = headers.get(uid) or data.get(uid)
                        if header is not None:
                            env = mime.envelope(header)
                            envelopes.put(uid, env)
                msg = _Msg(info, uid in sel.recent, data.get(uid),
                           headers.get(uid) or data.get(uid), env)
                out.append(fetch_mod.render_fetch(seq, items, msg))
            self.send(b"".join(out))
            if start + FETCH_BATCH < len(wanted):
                # Let other sessions have the reactor between batches.
                yield task.deferLater(self.reactor, 0, lambda: None)

    # STORE --------------------------------------------------------------

    def cmd_STORE(self, tag, args):
        return self._store(args, False)
    cmd_STORE.states = (SELECTED,)

    def _store(self, args, by_uid):
        if len(args) != 3:
            raise bad("Syntax: STORE set item flags")
        self._expunge_ok = by_uid
        sel = self.selected
        wanted = self._message_set(args[0], by_uid)
        try:
            mode, silent = parse_store_action(args[1])
            flags = parse_flags(args[2])
        except ArgumentError as e:
            raise bad(str(e))
        if sel.readonly:
            raise no("Mailbox is read-only", "READ-ONLY")
        # Keywords are not kept by this store (PERMANENTFLAGS lists none).
        flags = {f for f in flags if f.startswith("\\")}
        uids = [uid for _, uid in wanted]
        d = sel.mailbox.set_flags(uids, flags, mode, origin=sel)

        def done(_):
            if not silent:
                view = sel.mailbox.view
                lines = []
                for seq, uid in wanted:
                    current = view.flags(uid)
                    if current is None:
                        continue
                    extra = b" UID %d" % uid if by_uid else b""
                    lines.append(b"* %d FETCH (FLAGS (%s)%s)\r\n" % (
                        seq, sel.flag_text(uid, current).encode(), extra))
                self.send(b"".join(lines))
            return "STORE completed"
        return d.addCallbacks(done, _store_error)

    # SEARCH -------------------------------------------------------------

    def cmd_SEARCH(self, tag, args):
        return self._search(args, False)
    cmd_SEARCH.states = (SELECTED,)

    def _search(self, args, by_uid):
        self._expunge_ok = by_uid
        try:
            _, query = parse_search(args)
        except SearchBadCharset:
            raise no("Unsupported charset", "BADCHARSET (UTF-8 US-ASCII)")
        except SearchError as e:
            raise bad(f"Bad SEARCH: {e}")
        return self._run_search(query, by_uid)

    @defer.inlineCallbacks
    def _run_search(self, query, by_uid):
        sel = self.selected
        mbox = sel.mailbox
        uids = list(sel.uids)
        largest_seq, largest_uid = len(uids), (uids[-1] if uids else 0)
        hits = []
        step = FETCH_BATCH if query.needs != "index" else max(1, len(uids))
        for start in range(0, len(uids), step):
            batch = uids[start:start + step]
            data = {}
            if query.needs == "full":
                data = yield mbox.read_many(batch)
            elif query.needs == "header":
                data = yield mbox.read_many(batch, headers=True)
            view = mbox.view
            for i, uid in enumerate(batch, start + 1):
                info = view.info(uid)
                if info is None:
                    continue
                msg = _Msg(info, uid in sel.recent, data.get(uid, b""), data.get(uid, b""),
                           search_cache=mbox.search_values)
                if query.matches(msg, i, largest_seq, largest_uid):
                    hits.append(uid if by_uid else i)
        self.send_line(b"* SEARCH" + b"".join(b" %d" % h for h in hits))
        return "SEARCH completed"

    # COPY / MOVE ----------------------------------------------------------

    def cmd_COPY(self, tag, args):
        return self._copy(args, False)
    cmd_COPY.states = (SELECTED,)

    def cmd_MOVE(self, tag, args):
        return self._move(args, False)
    cmd_MOVE.states = (SELECTED,)

    def _copy_args(self, args, by_uid):
        if len(args) != 2:
            raise bad("Syntax: COPY set mailbox")
        wanted = self._message_set(args[0], by_uid)
        return wanted, self._mailbox_name(args[1])

    def _copyuid(self, dest, pairs):
        if not pairs:
            return ""
        src = ",".join(str(a) for a, _ in pairs)
        dst = ",".join(str(b) for _, b in pairs)
        return f"[COPYUID {dest.view.uidvalidity} {src} {dst}] "

    def _copy(self, args, by_uid):
        wanted, name = self._copy_args(args, by_uid)
        sel = self.selected
        d = self.userstore.mailbox(name)

        def got(dest):
            def copied(pairs):
                self._report_moved(sel.name, name, dest, pairs)
                return self._copyuid(dest, pairs) + "COPY completed"
            return sel.mailbox.copy([u for _, u in wanted], dest, origin=sel).addCallback(copied)

        def failed(f):
            if f.check(NoSuchFolder):
                raise no("Mailbox does not exist", "TRYCREATE")
            return _store_error(f)
        return d.addCallback(got).addErrback(failed)

    def _move(self, args, by_uid):
        wanted, name = self._copy_args(args, by_uid)
        sel = self.selected
        if sel.readonly:
            raise no("Mailbox is read-only", "READ-ONLY")
        d = self.userstore.mailbox(name)

        def got(dest):
            return sel.mailbox.move([u for _, u in wanted], dest, origin=sel).addCallback(
                lambda pairs: (dest, pairs))

        def moved(result):
            dest, pairs = result
            # RFC 6851: COPYUID in an untagged OK, then the EXPUNGEs.
            self.send_line(b"* OK " + self._copyuid(dest, pairs).strip().encode() + b" Moved")
            for line in sel.forget([a for a, _ in pairs]):
                self.send_line(line)
            self._report_moved(sel.name, name, dest, pairs)
            return "MOVE completed"

        def failed(f):
            if f.check(NoSuchFolder):
                raise no("Mailbox does not exist", "TRYCREATE")
            return _store_error(f)
        return d.addCallback(got).addCallbacks(moved, failed)

    def _report_moved(self, source, dest_name, dest, pairs):
        """Hand the messages copied or moved into or out of Junk to the
        factory's ``on_moved`` hook, one at a time, after the command.

        Reading and the hook's work never delay or fail the command: the
        answer does not wait for them and errors are only logged.
        """
        hook = getattr(self.factory, "on_moved", None)
        if (hook is None or not pairs or source == dest_name
                or not ({source, dest_name} & REPORTED_FOLDERS)):
            return
        domain, local = self.user.mailbox_parts
        uids = [b for _, b in pairs][:MAX_REPORTED]

        @defer.inlineCallbacks
        def report():
            for uid in uids:
                try:
                    data = yield dest.read(uid)
                    yield defer.maybeDeferred(hook, domain, local, source, dest_name, data)
                except Exception:
                    log.failure("reporting a message moved from {source} to {dest}",
                                source=source, dest=dest_name)
        report()

    # IDLE -------------------------------------------------------------------

    def cmd_IDLE(self, tag, args):
        self._idle_tag = tag
        self.send_line(b"+ idling")
        self._flush_updates()
        return False
    cmd_IDLE.states = AUTHED

    def dataReceived(self, data):
        if self._idle_tag is not None:
            self._idle_buf = getattr(self, "_idle_buf", b"") + data
            if b"\r\n" not in self._idle_buf:
                if len(self._idle_buf) > 1024:
                    self._end_idle(bad_line=True)
                return
            line, rest = self._idle_buf.split(b"\r\n", 1)
            self._idle_buf = b""
            self._end_idle(bad_line=line.upper() != b"DONE")
            if rest:
                super().dataReceived(rest)
            return
        return super().dataReceived(data)

    def _end_idle(self, bad_line):
        tag, self._idle_tag = self._idle_tag, None
        if bad_line:
            self._answer_bad(tag, "Expected DONE")
        else:
            self.send_line(f"{tag} OK IDLE terminated".encode())


class IMAPSessionFactory(IMAPServerFactory):
    """Builds full IMAP sessions over the store.

    ``on_moved(domain, local, source folder, dest folder, message bytes)``,
    if set, is told of every message a user copies or moves into or out of
    Junk (the Bayesian filter learns from it); it may return a Deferred,
    which is waited for before the next message is read.
    """

    protocol = IMAPSession
    on_moved = None

    def __init__(self, *args, on_moved=None, **kw):
        super().__init__(*args, **kw)
        self.on_moved = on_moved
