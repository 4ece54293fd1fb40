"""The storage seams: what IMAP, POP3 and LMTP may call (Dovecot's lib-storage role).

Nothing outside ``store/`` touches Maildir files or index files. Every
method that does disk work returns a Deferred; the blocking work runs off the
reactor thread. Folder names are Python text (see ``store.names`` for the
modified UTF-7 wire form). Errors are ``store.errors.StoreError`` subclasses
whose text fits a NO reply; ``StoreUnavailable`` means a temporary disk problem.
"""

from zope.interface import Attribute, Interface


class IMailStore(Interface):
    """All users' mail under one ``mail_root`` (``data_dir/mail``)."""

    def open_user(domain, local):
        """The L{IUserStore} of the mailbox ``local@domain`` (no disk access).

        Raises L{mailbox_appliance.store.errors.StoreError} for names that
        could leave ``mail_root``.
        """

    def notify_delivered(domain, local):
        """Local delivery wrote into this user's INBOX: sessions that have it
        open learn at once (EXISTS, IDLE). Returns a Deferred (never fails)."""


class IUserStore(Interface):
    """One user's Maildir++ folders."""

    maildir = Attribute("Absolute path of the user's Maildir (INBOX).")

    def mailbox(name):
        """Deferred firing with the shared L{IMailbox} of a folder, loaded and
        synced; fails with NoSuchFolder."""

    def deliver(data, folder="INBOX"):
        """Write a message into the folder's new/ (Maildir delivery, durable
        before it fires), without loading the index; open sessions are told.
        Deferred firing with the file's base name."""

    def list_folders(pattern="*"):
        """Deferred firing with a list of L{mailbox_appliance.store.store.FolderInfo}
        (name, attributes such as \\HasChildren, \\Noselect, \\Sent), INBOX
        first, for the LIST pattern (``*``, ``%``)."""

    def ensure_special_folders():
        """Make the Maildir, Sent, Drafts, Trash, Junk and Archive (subscribed)
        if missing; Deferred firing with the names created."""

    def create(name):
        """Deferred; fails with FolderExists or FolderNameError."""

    def delete(name):
        """Deferred; refuses INBOX, missing folders and folders with children."""

    def rename(old, new):
        """Deferred; renames the children too. Renaming INBOX moves its
        messages into the new folder and leaves INBOX empty (RFC 3501)."""

    def subscribe(name):
        """Deferred."""

    def unsubscribe(name):
        """Deferred firing with whether the name was subscribed."""

    def subscriptions():
        """Deferred firing with the list of subscribed names."""


class IMailbox(Interface):
    """One folder: messages by UID, flags, internal dates and wire sizes.

    Shared by every session of the process that has the folder open; per
    session state (sequence numbers, \\Recent seen by that session) belongs
    to the front ends, which follow the changes through listeners.
    """

    name = Attribute("The folder name (text).")
    uidvalidity = Attribute("UIDVALIDITY of the current view.")
    uidnext = Attribute("UIDNEXT of the current view.")
    view = Attribute("The current immutable MailboxView (snapshot).")

    def sync(take_recent=False, force=False):
        """Deferred firing with the Changes found on disk."""

    def changed_on_disk():
        """Cheap synchronous check whether sync() would find changes."""

    def add_listener(callback, take_recent=False):
        """Call ``callback(changes)`` after every change (reactor thread)."""

    def remove_listener(callback):
        """Stop calling ``callback``."""

    def read(uid):
        """Deferred firing with the message in CRLF form."""

    def read_headers(uid):
        """Deferred firing with the header section in CRLF form."""

    def read_range(uid, start, length):
        """Deferred firing with a slice of the CRLF form."""

    def append(data, flags=(), internaldate=None, origin=None):
        """Deferred firing with the new UID, once durable."""

    def set_flags(uids, flags, mode="set", origin=None):
        """Deferred firing with {uid: flags}."""

    def expunge(uids=None, origin=None):
        """Deferred firing with the expunged UIDs (\\Deleted ones)."""

    def remove(uids, origin=None):
        """Deferred firing with the removed UIDs (whatever their flags)."""

    def copy(uids, dest, origin=None):
        """Deferred firing with [(uid, new uid in dest)]."""

    def move(uids, dest, origin=None):
        """copy, then remove those UIDs here; same result as copy."""
