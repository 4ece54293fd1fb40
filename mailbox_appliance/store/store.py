"""The mail store: users' Maildir++ folders, shared Mailbox objects, change hooks.

``mail_root/<domain>/<local>/Maildir`` is a user's INBOX (the path local
delivery writes, with its safety checks); ``Maildir/.<name>`` are the other
folders (see ``store.names``). Beside the folders the Maildir holds
``subscriptions`` (one modified UTF-7 name per line, as Dovecot and Courier
write it) and ``mailbox_appliance.uidvalidity`` (the last UIDVALIDITY handed
out). Each folder holds its own ``mailbox_appliance.index``.

One :class:`Mailbox` object per folder per process: sessions of the same
user share it (a few recently used ones stay loaded even when no session
holds them).
"""

from __future__ import annotations

import collections
import os
import shutil
import weakref

from twisted.internet import defer, threads
from twisted.logger import Logger
from zope.interface import implementer

from mailbox_appliance import durable
from mailbox_appliance.delivery.maildir import DeliveryError, ensure_maildir, maildir_path
from mailbox_appliance.store import names
from mailbox_appliance.store.errors import (FolderExists, FolderHasChildren, FolderNameError,
                                            NoSuchFolder, StoreError)
from mailbox_appliance.store.index import UIDVALIDITY_NAME
from mailbox_appliance.store.interfaces import IMailStore, IUserStore
from mailbox_appliance.store.mailbox import (Mailbox, map_os_error, safe_hostname, unique_name,
                                             write_new_message)

log = Logger()

SPECIAL_USE = {"Sent": "\\Sent", "Drafts": "\\Drafts", "Trash": "\\Trash", "Junk": "\\Junk",
               "Archive": "\\Archive"}
SPECIAL_FOLDERS = tuple(SPECIAL_USE)
SUBSCRIPTIONS = "subscriptions"

FolderInfo = collections.namedtuple("FolderInfo", "name attributes special_use")
FolderInfo.__doc__ = """One LIST entry: ``name`` (text), ``attributes`` (a frozenset such
as {"\\\\HasNoChildren", "\\\\Sent"}), ``special_use`` ("\\\\Sent" or None)."""


@implementer(IMailStore)
class MailStore:
    """All users' mail under ``mail_root``."""

    def __init__(self, reactor, mail_root, hostname=None, run_in_thread=None, keep_loaded=32):
        self.reactor = reactor
        self.mail_root = os.path.abspath(mail_root)
        self.hostname = hostname
        if run_in_thread is None:
            def run_in_thread(fn, *args, **kw):
                return threads.deferToThreadPool(reactor, reactor.getThreadPool(), fn,
                                                 *args, **kw)
        self.run_in_thread = run_in_thread
        self._users = weakref.WeakValueDictionary()
        self._mailboxes = weakref.WeakValueDictionary()
        self._loaded = collections.OrderedDict()     # path -> Mailbox, recently used
        self._keep_loaded = keep_loaded

    def maildir_of(self, domain, local):
        try:
            return maildir_path(self.mail_root, domain, local)
        except DeliveryError as e:
            raise FolderNameError(str(e)) from None

    def open_user(self, domain, local) -> "UserStore":
        path = self.maildir_of(domain, local)
        user = self._users.get(path)
        if user is None:
            user = self._users[path] = UserStore(self, path)
        return user

    def notify_delivered(self, domain, local, folder=""):
        """Local delivery wrote into ``local@domain``'s INBOX (or ``folder``):
        sync it if a session has it open, so IDLE and the next command see it
        at once."""
        try:
            path = self.maildir_of(domain, local)
            if folder:
                path = names.folder_path(path, folder)
        except (StoreError, FolderNameError):
            return defer.succeed(None)
        return self.folder_changed(path)

    def folder_changed(self, path):
        """Something was written into the folder at ``path``: sync its
        Mailbox if a session listens to it. Never fails."""
        mbox = self._mailboxes.get(path)
        if mbox is None or mbox.gone or not mbox.listeners:
            return defer.succeed(None)

        def failed(f):
            log.failure("sync after delivery to {path} failed", f, path=path)
        return mbox.sync().addCallbacks(lambda _: None, failed)

    # -- shared Mailbox objects --

    def cached_mailbox(self, path):
        mbox = self._mailboxes.get(path)
        if mbox is not None and mbox.gone:
            return None
        return mbox

    def _mailbox(self, path, name, uidvalidity_path):
        mbox = self.cached_mailbox(path)
        if mbox is None:
            mbox = Mailbox(path, name, run_in_thread=self.run_in_thread,
                           hostname=self.hostname, uidvalidity_path=uidvalidity_path)
            self._mailboxes[path] = mbox
        self._loaded[path] = mbox
        self._loaded.move_to_end(path)
        while len(self._loaded) > self._keep_loaded:
            self._loaded.popitem(last=False)
        return mbox

    def _forget(self, path):
        """A folder (and its children) was deleted or renamed away."""
        for key in list(self._mailboxes.keys()):
            if key == path or key.startswith(path + names.DELIMITER):
                mbox = self._mailboxes.pop(key, None)
                self._loaded.pop(key, None)
                if mbox is not None:
                    mbox.mark_gone()


@implementer(IUserStore)
class UserStore:
    """One user's folders. Folder operations run one at a time."""

    def __init__(self, store, maildir):
        self.store = store
        self.maildir = maildir
        self._uv_path = os.path.join(maildir, UIDVALIDITY_NAME)
        self._lock = defer.DeferredLock()

    def __repr__(self):
        return f"<UserStore {self.maildir!r}>"

    def folder_path(self, name):
        return names.folder_path(self.maildir, name)

    def _run(self, fn, *args):
        return self.store.run_in_thread(fn, *args).addErrback(map_os_error)

    def _locked(self, fn, *args):
        return self._lock.run(self._run, fn, *args)

    # -- opening --

    def mailbox(self, name):
        """The shared Mailbox of a folder, loaded (synced without taking \\Recent)."""
        try:
            name = names.normalize(name)
            path = self.folder_path(name)
        except StoreError:
            return defer.fail()
        mbox = self.store.cached_mailbox(path)
        if mbox is not None and mbox.loaded:
            self.store._mailbox(path, name, self._uv_path)      # mark as recently used
            return defer.succeed(mbox)
        d = self._run(self._t_check_folder, name, path)

        def opened(_):
            mbox = self.store._mailbox(path, name, self._uv_path)
            if mbox.loaded:
                return mbox
            return mbox.sync().addCallback(lambda _: mbox)
        return d.addCallback(opened)

    def _t_check_folder(self, name, path):
        if name == names.INBOX:
            ensure_maildir(self.maildir)
        elif not os.path.isdir(os.path.join(path, "cur")) or os.path.islink(path):
            raise NoSuchFolder(f"mailbox {name} does not exist")

    def exists(self, name):
        """Deferred firing with whether the folder can be selected."""
        try:
            name = names.normalize(name)
            path = self.folder_path(name)
        except StoreError:
            return defer.succeed(False)
        if name == names.INBOX:
            return defer.succeed(True)
        return self._run(lambda: os.path.isdir(os.path.join(path, "cur"))
                         and not os.path.islink(path))

    # -- delivering --

    def deliver(self, data, folder="INBOX"):
        """Deliver a message (LMTP, a filter) into a folder's new/ the Maildir
        way, without loading the folder's index; sessions that have the
        folder open learn at once. Fires with the file's base name."""
        try:
            folder = names.normalize(folder)
            path = self.folder_path(folder)
        except StoreError:
            return defer.fail()
        hostname = safe_hostname(self.store.hostname)

        def write():
            self._t_check_folder(folder, path)
            return write_new_message(path, bytes(data), hostname)

        def written(base):
            return self.store.folder_changed(path).addCallback(lambda _: base)
        return self._run(write).addCallback(written)

    # -- listing --

    def list_folders(self, pattern="*"):
        match = names.pattern_matcher(pattern)
        return self._run(self._t_scan_folders).addCallback(self._folder_infos, match)

    def _t_scan_folders(self):
        found = {}
        try:
            it = os.scandir(self.maildir)
        except FileNotFoundError:
            return found
        with it:
            for e in it:
                if not e.name.startswith(names.DELIMITER) or not e.is_dir(follow_symlinks=False):
                    continue
                name = names.name_from_dirname(e.name)
                if name is None or name == names.INBOX:
                    continue
                found[name] = os.path.isdir(os.path.join(e.path, "cur"))
        return found

    @staticmethod
    def _folder_infos(found, match):
        selectable = dict(found)
        selectable[names.INBOX] = True
        every = set(selectable)
        has_children = set()
        for n in selectable:
            for p in names.parent_names(n):
                every.add(p)
                has_children.add(p)
        out = []
        for n in every:
            if not match(n):
                continue
            attrs = {"\\HasChildren" if n in has_children else "\\HasNoChildren"}
            if not selectable.get(n, False):
                attrs.add("\\Noselect")
            special = SPECIAL_USE.get(n) if n in selectable else None
            if special:
                attrs.add(special)
            out.append(FolderInfo(n, frozenset(attrs), special))
        out.sort(key=lambda f: (f.name != names.INBOX, f.name))
        return out

    # -- creating, deleting, renaming --

    def ensure_special_folders(self):
        """Make the Maildir and the special-use folders that are missing, and
        subscribe the ones made. Fires with the names created."""
        d = self._locked(self._t_ensure_special)

        def subscribe(created):
            if not created:
                return created
            return self._locked(self._t_change_subscriptions, created, ()) \
                .addCallback(lambda _: created)
        return d.addCallback(subscribe)

    def _t_ensure_special(self):
        ensure_maildir(self.maildir)
        created = []
        for name in SPECIAL_FOLDERS:
            path = self.folder_path(name)
            if os.path.isdir(os.path.join(path, "cur")):
                continue
            if os.path.isdir(path):
                # A folder dir without its Maildir subdirs (an old crash, a
                # tool): complete it instead of failing on it.
                for sub in ("tmp", "new", "cur"):
                    os.makedirs(os.path.join(path, sub), mode=0o700, exist_ok=True)
                durable.fsync_dir(path)
                continue
            self._t_make_folder(name, path)
            created.append(name)
        return created

    def create(self, name):
        """Create a folder (a trailing delimiter is dropped, as RFC 3501 asks).

        Parents are not created: in Maildir++ ``a.b`` needs no ``a``; a
        missing parent lists as \\Noselect, as with Dovecot.
        """
        try:
            if len(name) > 1 and name.endswith(names.DELIMITER):
                name = name[:-1]
            name = names.normalize(name, creating=True)
            if name == names.INBOX:
                raise FolderExists("INBOX already exists")
            path = self.folder_path(name)
        except StoreError:
            return defer.fail()
        return self._locked(self._t_create, name, path)

    def _t_create(self, name, path):
        ensure_maildir(self.maildir)
        if os.path.lexists(path):
            raise FolderExists(f"mailbox {name} already exists")
        self._t_make_folder(name, path)

    def _t_make_folder(self, name, path):
        """Build the folder in tmp/, then rename it into place: a crash leaves
        either no folder or a whole one."""
        stage = os.path.join(self.maildir, "tmp", ".mkfolder." + unique_name())
        os.mkdir(stage, 0o700)
        try:
            for sub in ("tmp", "new", "cur"):
                os.mkdir(os.path.join(stage, sub), 0o700)
            with open(os.path.join(stage, "maildirfolder"), "wb"):
                pass
            durable.fsync_dir(stage)
            try:
                os.rename(stage, path)
            except OSError as e:
                if os.path.lexists(path):
                    raise FolderExists(f"mailbox {name} already exists") from e
                raise
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            raise
        durable.fsync_dir(self.maildir)

    def delete(self, name):
        """Delete a folder and its messages. INBOX cannot be deleted, nor a
        folder that has subfolders (delete those first)."""
        try:
            name = names.normalize(name)
            if name == names.INBOX:
                raise StoreError("INBOX cannot be deleted")
            path = self.folder_path(name)
        except StoreError:
            return defer.fail()
        d = self._locked(self._t_delete, name, path)
        return d.addCallback(lambda _: self.store._forget(path))

    def _children(self, path):
        prefix = os.path.basename(path) + names.DELIMITER
        try:
            with os.scandir(self.maildir) as it:
                return sorted(e.name for e in it if e.name.startswith(prefix)
                              and e.is_dir(follow_symlinks=False))
        except FileNotFoundError:
            return []

    def _t_delete(self, name, path):
        if not os.path.isdir(path) or os.path.islink(path):
            raise NoSuchFolder(f"mailbox {name} does not exist")
        if self._children(path):
            raise FolderHasChildren(f"mailbox {name} has subfolders: delete them first")
        trash = os.path.join(self.maildir, "tmp", ".deleted." + unique_name())
        os.rename(path, trash)
        durable.fsync_dir(self.maildir)
        shutil.rmtree(trash, ignore_errors=True)

    def rename(self, old, new):
        """Rename a folder and its subfolders. Renaming INBOX moves all its
        messages into the new folder (RFC 3501); INBOX stays, empty."""
        try:
            old = names.normalize(old)
            new = names.normalize(new, creating=True)
            if new == names.INBOX:
                raise FolderExists("INBOX already exists")
            if new == old:
                raise FolderExists(f"mailbox {new} already exists")
            if new.startswith(old + names.DELIMITER):
                raise StoreError("a mailbox cannot be renamed into itself")
            old_path, new_path = self.folder_path(old), self.folder_path(new)
        except StoreError:
            return defer.fail()
        if old == names.INBOX:
            return self._rename_inbox(new)
        d = self._locked(self._t_rename, old, new, old_path, new_path)
        return d.addCallback(lambda _: self.store._forget(old_path))

    def _t_rename(self, old, new, old_path, new_path):
        if not os.path.isdir(old_path) or os.path.islink(old_path):
            raise NoSuchFolder(f"mailbox {old} does not exist")
        if os.path.lexists(new_path):
            raise FolderExists(f"mailbox {new} already exists")
        moves = [(old_path, new_path)]
        old_entry, new_entry = os.path.basename(old_path), os.path.basename(new_path)
        for child in self._children(old_path):
            child_name = names.name_from_dirname(child)
            if child_name is None:
                continue
            target_name = names.normalize(new + child_name[len(old):])
            target = self.folder_path(target_name)
            if os.path.basename(target) != new_entry + child[len(old_entry):]:
                raise FolderNameError("mailbox name cannot be renamed")
            if os.path.lexists(target):
                raise FolderExists(f"mailbox {target_name} already exists")
            moves.append((os.path.join(self.maildir, child), target))
        for src, dst in moves:
            os.rename(src, dst)
        durable.fsync_dir(self.maildir)

    @defer.inlineCallbacks
    def _rename_inbox(self, new):
        yield self.create(new)
        inbox = yield self.mailbox(names.INBOX)
        dest = yield self.mailbox(new)
        yield inbox.sync()
        yield inbox.move(list(inbox.uids), dest)

    # -- subscriptions --

    def subscriptions(self):
        return self._locked(self._t_read_subscriptions)

    def subscribe(self, name):
        try:
            name = names.normalize(name)
        except StoreError:
            return defer.fail()
        return self._locked(self._t_change_subscriptions, [name], ())

    def unsubscribe(self, name):
        try:
            name = names.normalize(name)
        except StoreError:
            return defer.fail()
        return self._locked(self._t_change_subscriptions, (), [name])

    def _t_read_subscriptions(self):
        try:
            with open(os.path.join(self.maildir, SUBSCRIPTIONS), "rb") as f:
                lines = f.read().decode("utf-8", "replace").split("\n")
        except FileNotFoundError:
            return []
        v2 = bool(lines) and lines[0].startswith("V\t")
        out = []
        for line in lines[1:] if v2 else lines:
            line = line.rstrip("\r")
            if not line:
                continue
            if v2:
                line = line.replace("\t", names.DELIMITER)
            try:
                name = names.from_wire(line)
            except FolderNameError:
                try:
                    name = names.normalize(line)     # Dovecot v2 files may hold UTF-8
                except FolderNameError:
                    continue
            if name not in out:
                out.append(name)
        return out

    def _t_change_subscriptions(self, add, remove):
        """Returns whether anything in ``remove`` was subscribed."""
        subs = self._t_read_subscriptions()
        before = list(subs)
        for name in add:
            if name not in subs:
                subs.append(name)
        removed = False
        for name in remove:
            if name in subs:
                subs.remove(name)
                removed = True
        if subs != before:
            ensure_maildir(self.maildir)
            data = "".join(names.to_wire(n) + "\n" for n in subs).encode("ascii")
            durable.replace_file(os.path.join(self.maildir, SUBSCRIPTIONS), data)
        return removed
