"""POP3's view of a user's INBOX in the store, with the per-user session lock.

A maildrop is a snapshot taken at login (RFC 1939: message numbers do not
change during a session); UIDL values are made of the message's UID and the
folder's UIDVALIDITY, as Dovecot's default ``%08Xu%08Xv``, so they are the
IMAP UIDs, stable across sessions and restarts.
"""

from __future__ import annotations

from collections import namedtuple

from twisted.internet import defer

from mailbox_appliance.pop3.server import MaildropLocked

PopMessage = namedtuple("PopMessage", "uid size uidl")


class Maildrop:
    """The INBOX of one logged-in POP3 session."""

    def __init__(self, owner, key, mailbox):
        self._owner, self._key, self.mailbox = owner, key, mailbox
        view = mailbox.view
        self.messages = [PopMessage(m.uid, m.size, f"{m.uid:08X}{view.uidvalidity:08X}")
                         for m in view]

    def read(self, msg):
        return self.mailbox.read(msg.uid)

    def delete(self, numbers):
        """Remove the messages with these 1-based numbers (at QUIT)."""
        return self.mailbox.remove([self.messages[n - 1].uid for n in numbers])

    def release(self):
        self._owner._locked.discard(self._key)


class StoreMaildrops:
    """Opens maildrops; one POP3 session per user at a time (in this process)."""

    def __init__(self, store):
        self.store = store
        self._locked = set()

    def open(self, user):
        domain, local = user.mailbox_parts
        key = (domain, local.lower())
        if key in self._locked:
            raise MaildropLocked(user.mail)
        self._locked.add(key)
        userstore = self.store.open_user(domain, local)
        d = defer.maybeDeferred(userstore.ensure_special_folders)
        d.addCallback(lambda _: userstore.mailbox("INBOX"))
        d.addCallback(lambda mbox: mbox.sync().addCallback(lambda _: Maildrop(self, key, mbox)))

        def failed(f):
            self._locked.discard(key)
            return f
        return d.addErrback(failed)
