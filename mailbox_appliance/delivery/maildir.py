"""Local delivery into ``data_dir/mail/<domain>/<local part>/Maildir``.

The Maildir protocol: write into ``tmp/``, fsync, rename into ``new/``, fsync
``new/`` (once per batch of deliveries into the same Maildir). Messages are stored with LF line ends, as Postfix's local(8) and
Dovecot do, so mutt and Dovecot read them unchanged; the file name carries
``S=`` (size on disk) and ``W=`` (size with CRLF, what IMAP reports).

The name of a delivered file is derived from the queue id, the recipient's
position and the target, so after a crash a recovered queue entry can tell
whether that copy already landed and must not be written twice.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re

from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from mailbox_appliance import durable
from mailbox_appliance.durable import (
    BatchWorker, unlink_quietly as _unlink, write_all as _write_all, write_synced)
from mailbox_appliance.interfaces import IDeliveryAgent

_SAFE_PART = re.compile(r"^[A-Za-z0-9!#$%&'*+=?^_`{|}~.-]{1,64}$")
COPY_CHUNK = 1 << 20


class DeliveryError(Exception):
    """A delivery attempt failed; ``permanent`` says whether to bounce."""

    def __init__(self, text, permanent=False):
        super().__init__(text)
        self.permanent = permanent


def maildir_path(mail_root: str, domain: str, local: str) -> str:
    """The Maildir of a primary address; refuses names that could leave mail_root."""
    domain, local = domain.lower(), local.lower()
    for part in (domain, local):
        if not _SAFE_PART.match(part) or part.startswith(".") or ".." in part:
            raise DeliveryError(f"unsafe mailbox name {part!r}", permanent=True)
    return os.path.join(mail_root, domain, local, "Maildir")


def ensure_maildir(path: str) -> None:
    """Create the Maildir's folders, durably: a new mailbox's directory entries
    are fsync'ed too, or a crash could take the first message with them."""
    created = []
    top = path
    while not os.path.isdir(top):
        created.append(top)
        parent = os.path.dirname(top) or "."
        if parent == top:
            break
        top = parent
    for sub in ("tmp", "new", "cur"):
        p = os.path.join(path, sub)
        if not os.path.isdir(p):
            os.makedirs(p, mode=0o700, exist_ok=True)
            created.append(p)
    if os.path.basename(path).startswith(".") and created:
        # A Maildir++ folder (Junk) made by delivery: marked as the store
        # marks the folders it creates.
        with open(os.path.join(path, "maildirfolder"), "wb"):
            pass
    for parent in sorted({os.path.dirname(p) or "." for p in created}, key=len, reverse=True):
        durable.fsync_dir(parent)


@implementer(IDeliveryAgent)
class MaildirDelivery:
    """Writes one queued message into a user's Maildir (off the reactor thread)."""

    log = Logger()

    def __init__(self, reactor, mail_root, hostname, worker=None, on_delivered=None):
        self.reactor = reactor
        self.mail_root = mail_root
        self.hostname = re.sub(r"[^A-Za-z0-9.-]", "_", hostname)
        self.worker = worker or BatchWorker(reactor, "maildir")
        # Told (domain, local) after each new message, so open IMAP sessions
        # of that user hear of it at once (IDLE).
        self.on_delivered = on_delivered

    def unique_name(self, qmsg, index, target_key):
        tag = hashlib.sha1(target_key.encode()).hexdigest()[:8]
        return f"{int(qmsg.envelope.arrival)}.Q{qmsg.qid}R{index}T{tag}.{self.hostname}"

    def deliver(self, qmsg, user, delivered_to, index, target_key):
        """Deliver ``qmsg`` to ``user``; fires with True (written) or False (already there)."""
        domain, local = user.mailbox_parts
        folder = qmsg.envelope.folder
        try:
            path = maildir_path(self.mail_root, domain, local)
        except DeliveryError as e:
            return defer.fail(e)
        if folder:
            # Imported here: the store package imports this module.
            from mailbox_appliance.store.errors import FolderNameError
            from mailbox_appliance.store.names import folder_path
            try:
                path = folder_path(path, folder)
            except FolderNameError:
                # Not a name this appliance writes; the INBOX is never wrong.
                folder = ""
        base = self.unique_name(qmsg, index, target_key)
        sender = qmsg.envelope.sender_of(index)
        d = self.worker.submit(self._write, qmsg, path, base, delivered_to, qmsg.recovered,
                               sender)

        def failed(f):
            if f.check(OSError):
                raise DeliveryError(f"cannot sync mailbox: {f.getErrorMessage()}")
            return f

        def written(new):
            if new and self.on_delivered is not None:
                self.on_delivered(domain, local, folder)
            return new
        return d.addCallbacks(written, failed)

    def _write(self, qmsg, path, base, delivered_to, check_existing, sender):
        try:
            if check_existing:
                ensure_maildir(path)
                if _already_delivered(path, base):
                    return False, None
            head = (f"Return-Path: <{_one_line(sender)}>\n"
                    f"Delivered-To: {_one_line(delivered_to)}\n").encode("utf-8", "replace")
            tmp = os.path.join(path, "tmp", base)
            write = lambda fd: _copy_lf(qmsg, fd, head)
            try:
                size, crlf_size = write_synced(tmp, write, exclusive=False)
            except FileNotFoundError:
                ensure_maildir(path)
                size, crlf_size = write_synced(tmp, write, exclusive=False)
            final = os.path.join(path, "new", f"{base},S={size},W={crlf_size}")
            try:
                os.rename(tmp, final)
            except OSError:
                _unlink(tmp)
                raise
            # The rename is durable once new/ is fsync'ed; the worker does that
            # once for all deliveries of a batch into this Maildir.
            return True, os.path.join(path, "new")
        except DeliveryError:
            raise
        except OSError as e:
            # A full or failing disk is temporary: keep the message queued.
            raise DeliveryError(f"cannot write mailbox: {os.strerror(e.errno)}",
                                permanent=e.errno in (errno.ENAMETOOLONG,))


def _copy_lf(qmsg, fd, head):
    """Write the message into ``fd`` with LF line ends; returns the two sizes."""
    if qmsg.data is not None:
        out = head + qmsg.data.replace(b"\r\n", b"\n")
        _write_all(fd, out)
        return len(out), len(out) + out.count(b"\n")
    size = crlf_size = 0
    _write_all(fd, head)
    size += len(head)
    crlf_size += len(head) + head.count(b"\n")
    carry = b""
    with open(qmsg.path, "rb") as src:
        src.seek(qmsg.body_offset)
        while True:
            block = src.read(COPY_CHUNK)
            if not block:
                break
            block = carry + block
            # Keep a trailing CR for the next block: it may start a CRLF.
            carry = b""
            if block.endswith(b"\r"):
                block, carry = block[:-1], b"\r"
            out = block.replace(b"\r\n", b"\n")
            _write_all(fd, out)
            size += len(out)
            crlf_size += len(out) + out.count(b"\n")
    if carry:
        _write_all(fd, carry)
        size += 1
        crlf_size += 1
    return size, crlf_size


def _one_line(text):
    """A header value that cannot start another header."""
    return text.replace("\r", "").replace("\n", "")


def _already_delivered(path, base):
    """Whether ``base`` is in new/ or cur/, with any size and flag suffixes.

    ``base`` itself must end there: ``...mx.example.test`` is not
    ``...mx.example.test2,S=...`` (another host's copy).
    """
    def ours(n):
        return n == base or (n.startswith(base) and n[len(base)] in ",:")
    for sub in ("new", "cur"):
        if any(ours(n) for n in os.listdir(os.path.join(path, sub))):
            return True
    return False


