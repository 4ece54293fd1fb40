"""The mail store: Maildir++ folders, per-folder UID index, the API IMAP/POP3/LMTP use.

See ``interfaces.py`` for the seams, ``names.py`` for folder names,
``index.py`` for the index file format, ``mailbox.py`` for one folder and
``store.py`` for users and their folders.
"""

from mailbox_appliance.store.errors import (FolderExists, FolderHasChildren, FolderNameError,
                                            NoSuchFolder, NoSuchMessage, StoreError,
                                            StoreUnavailable)
from mailbox_appliance.store.mailbox import (SYSTEM_FLAGS, Changes, Mailbox, MailboxView,
                                             MessageInfo, run_inline)
from mailbox_appliance.store.store import (SPECIAL_USE, FolderInfo, MailStore, UserStore)

__all__ = [
    "Changes", "FolderExists", "FolderHasChildren", "FolderInfo", "FolderNameError",
    "MailStore", "Mailbox", "MailboxView", "MessageInfo", "NoSuchFolder", "NoSuchMessage",
    "SPECIAL_USE", "SYSTEM_FLAGS", "StoreError", "StoreUnavailable", "UserStore", "run_inline",
]
