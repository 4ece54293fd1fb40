"""Folder names: IMAP names, modified UTF-7, and where a folder lives on disk.

The layout is Maildir++ (Courier's, and Dovecot's default for Maildir): the
user's ``Maildir`` itself is INBOX; every other folder is a directory
``Maildir/.<name>`` with the hierarchy delimiter ``.`` kept inside the one
directory name (``a.b`` is ``Maildir/.a.b``). So a folder is always exactly one
level below the Maildir, whatever its name.

Names are handled as Python text inside the appliance. On the IMAP wire and on
disk they are modified UTF-7 (RFC 3501 section 5.1.3), as Dovecot and Courier
store them, so a Maildir stays readable by both.

A name is refused with :class:`FolderNameError` when it is empty, starts or
ends with the delimiter, has an empty component (``a..b``), contains ``/``,
NUL or another control character, or is too long for one directory name
(the on-disk ``.<encoded>`` must fit in 255 bytes). The case-insensitive name
``INBOX`` is the Maildir itself; a first component ``inbox`` is written
``INBOX`` (``inbox.x`` and ``INBOX.x`` are one folder).
"""

from __future__ import annotations

import base64
import os
import re

from mailbox_appliance.store.errors import FolderNameError

DELIMITER = "."
INBOX = "INBOX"
MAX_NAME_BYTES = 254          # "." + encoded name fits NAME_MAX (255)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_WILDCARDS = re.compile(r"[*%]")

# --- modified UTF-7 (RFC 3501 5.1.3) ---------------------------------------


def _b64_utf16(text: str) -> str:
    raw = text.encode("utf-16-be")
    return base64.b64encode(raw).decode("ascii").rstrip("=").replace("/", ",")


def encode_mutf7(name: str) -> str:
    """Text -> modified UTF-7: printable ASCII as is (``&`` as ``&-``), the rest
    as ``&<modified base64 of UTF-16BE>-``."""
    out = []
    run = []
    for ch in name:
        if " " <= ch <= "~":
            if run:
                out.append("&" + _b64_utf16("".join(run)) + "-")
                run = []
            out.append("&-" if ch == "&" else ch)
        else:
            run.append(ch)
    if run:
        out.append("&" + _b64_utf16("".join(run)) + "-")
    return "".join(out)


def decode_mutf7(wire: str) -> str:
    """Modified UTF-7 -> text. Strict: only the canonical encoding of a name is
    accepted (no raw 8-bit, no encoded printable ASCII, no bad padding bits,
    no lone surrogates), so every name has exactly one wire form."""
    out = []
    i, n = 0, len(wire)
    while i < n:
        ch = wire[i]
        if not (" " <= ch <= "~"):
            raise FolderNameError("mailbox name is not valid modified UTF-7")
        if ch != "&":
            out.append(ch)
            i += 1
            continue
        end = wire.find("-", i + 1)
        if end < 0:
            raise FolderNameError("mailbox name is not valid modified UTF-7")
        chunk = wire[i + 1:end]
        if not chunk:
            out.append("&")
        else:
            if not re.fullmatch(r"[A-Za-z0-9+,]+", chunk):
                raise FolderNameError("mailbox name is not valid modified UTF-7")
            b64 = chunk.replace(",", "/")
            b64 += "=" * (-len(b64) % 4)
            try:
                raw = base64.b64decode(b64, validate=True)
                if len(raw) % 2:
                    raise ValueError("odd length")
                out.append(raw.decode("utf-16-be"))
            except ValueError:
                raise FolderNameError("mailbox name is not valid modified UTF-7") from None
        i = end + 1
    text = "".join(out)
    if encode_mutf7(text) != wire:
        raise FolderNameError("mailbox name is not in canonical modified UTF-7")
    return text


# --- validation and paths --------------------------------------------------

def is_inbox(name: str) -> bool:
    return name.upper() == INBOX


def normalize(name: str, creating: bool = False) -> str:
    """The canonical form of a folder name, or FolderNameError (text for a NO).

    ``creating`` also refuses the LIST wildcards ``*`` and ``%`` (a folder
    with them could not be listed on its own); existing folders made by
    other programs may still have them.
    """
    if not isinstance(name, str):
        raise FolderNameError("mailbox name must be text")
    if not name:
        raise FolderNameError("empty mailbox name")
    if _CONTROL.search(name):
        raise FolderNameError("mailbox name contains a control character")
    if "/" in name:
        raise FolderNameError("mailbox name contains '/'")
    if name.startswith(DELIMITER) or name.endswith(DELIMITER):
        raise FolderNameError(f"mailbox name starts or ends with {DELIMITER!r}")
    parts = name.split(DELIMITER)
    if any(p == "" for p in parts):
        raise FolderNameError("mailbox name has an empty hierarchy level")
    if any(0xD800 <= ord(c) <= 0xDFFF for c in name):
        raise FolderNameError("mailbox name is not valid Unicode")
    if creating and name.startswith("~"):
        # Home-directory syntax in other servers' layouts; refused like Dovecot
        # does, so a Maildir shared with them cannot hold a surprise.
        raise FolderNameError("mailbox name starts with '~'")
    if creating and _WILDCARDS.search(name):
        raise FolderNameError("mailbox name contains a wildcard (* or %)")
    if parts[0].upper() == INBOX:
        parts[0] = INBOX
        name = DELIMITER.join(parts)
    if name != INBOX and len(encode_mutf7(name).encode("ascii")) > MAX_NAME_BYTES:
        raise FolderNameError("mailbox name is too long")
    return name


def from_wire(wire: str) -> str:
    """A mailbox name as an IMAP client sent it (modified UTF-7) -> canonical text."""
    return normalize(decode_mutf7(wire))


def to_wire(name: str) -> str:
    return encode_mutf7(name)


def folder_dirname(name: str) -> str | None:
    """The directory entry of a folder inside the Maildir; None for INBOX."""
    name = normalize(name)
    if name == INBOX:
        return None
    return DELIMITER + encode_mutf7(name)


def folder_path(maildir: str, name: str) -> str:
    """Absolute path of a folder's Maildir (INBOX: the Maildir itself).

    The result is always ``maildir`` or one directory directly inside it.
    """
    entry = folder_dirname(name)
    if entry is None:
        return maildir
    path = os.path.join(maildir, entry)
    if os.path.dirname(path) != maildir.rstrip(os.sep) or entry in (".", ".."):
        raise FolderNameError("mailbox name escapes the mail folder")
    return path


def name_from_dirname(entry: str) -> str | None:
    """The folder name of a ``.<encoded>`` directory entry; None if it is not
    a folder (not starting with ``.``, ``.``/``..``, or not a valid name)."""
    if not entry.startswith(DELIMITER) or entry in (".", ".."):
        return None
    try:
        name = normalize(decode_mutf7(entry[1:]))
    except FolderNameError:
        return None
    if DELIMITER + encode_mutf7(name) != entry:
        return None       # e.g. ".inbox.x": not the canonical directory of INBOX.x
    return name


def parent_names(name: str):
    """``a.b.c`` -> ``a``, ``a.b``."""
    parts = name.split(DELIMITER)
    return [DELIMITER.join(parts[:i]) for i in range(1, len(parts))]


def pattern_matcher(pattern: str):
    """A predicate for IMAP LIST patterns: ``*`` matches anything, ``%``
    anything but the delimiter; a pattern starting with INBOX in any case
    matches INBOX and its children."""
    def compile_(pat):
        parts = []
        for ch in pat:
            if ch == "*":
                parts.append(".*")
            elif ch == "%":
                parts.append("[^" + re.escape(DELIMITER) + "]*")
            else:
                parts.append(re.escape(ch))
        return re.compile("".join(parts), re.DOTALL)
    exact = compile_(pattern)
    alt = None
    if pattern[:len(INBOX)].upper() == INBOX and pattern[:len(INBOX)] != INBOX:
        alt = compile_(INBOX + pattern[len(INBOX):])

    def match(name: str) -> bool:
        return bool(exact.fullmatch(name) or (alt is not None and alt.fullmatch(name)))
    return match
