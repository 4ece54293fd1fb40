"""Errors of the store. Their text is meant for a NO reply (IMAP) or -ERR (POP3)."""


class StoreError(Exception):
    """A request the store refuses; the text says why, fit for a NO reply."""


class FolderNameError(StoreError):
    """A folder name that is not allowed (empty, escaping the Maildir, too long...)."""


class NoSuchFolder(StoreError):
    """The folder does not exist (or was deleted or renamed meanwhile)."""


class FolderExists(StoreError):
    """CREATE or RENAME onto a folder that is already there."""


class FolderHasChildren(StoreError):
    """DELETE of a folder that still has subfolders."""


class NoSuchMessage(StoreError):
    """The message is gone (expunged, here or by another program)."""


class StoreUnavailable(StoreError):
    """The disk failed (full, read-only, I/O error): temporary, try again later."""

    def __init__(self, text, errno=None):
        super().__init__(text)
        self.errno = errno
