"""Fix-ups of submitted messages (RFC 6409 8), done while the header block arrives.

A message from a mail user agent may lack what RFC 5322 requires, and may
carry what must not travel: this adds ``Message-ID:`` and ``Date:`` when
missing and removes every ``Bcc:`` field (with its continuation lines), as
Postfix's cleanup does for submitted mail. Everything else is kept byte for
byte, in order; added fields go at the end of the header block.

The header block is held in memory until it ends (the first empty line, or
the first line that is not a header field), so it is bounded: past
``limit`` octets the message is refused (552 5.3.4). The raw values of the
``From:`` fields are kept for the sender check at the end of data.
"""

from __future__ import annotations

import re

MAX_HEADER_BLOCK = 1024 * 1024

# RFC 5322 3.6.8: field-name is printable ASCII except ':'; obsolete syntax
# (4.5) allows white space before the colon.
_FIELD = re.compile(rb"^([\x21-\x39\x3b-\x7e]+)[ \t]*:")


class HeaderBlockTooLarge(Exception):
    """The header block passed its limit."""


class SubmissionFixup:
    """Rewrites the header block of one submitted message as it streams by.

    ``feed`` takes the message (dot-unstuffed, CRLF lines) in chunks and
    returns what may be written now; ``finish`` returns the rest at the end
    of the data. Once the header block is over, chunks pass unchanged.
    """

    def __init__(self, message_id, date, limit: int = MAX_HEADER_BLOCK):
        # Each may be a string or a function that makes it, called only when
        # the field is missing: most clients send both.
        self.message_id = message_id
        self.date = date
        self.limit = limit
        self.done = False
        self.from_values = []           # raw bytes after "From:", one per field
        self.removed_bcc = 0
        # (lower-case name, [its lines]): joining lines at the end keeps a
        # field of many continuation lines linear, not quadratic.
        self._fields = []
        self._pending = b""
        self._size = 0

    def feed(self, chunk: bytes) -> bytes:
        if self.done:
            return chunk
        data = self._pending + chunk
        start = 0
        while True:
            end = data.find(b"\r\n", start)
            if end < 0:
                self._pending = data[start:]
                self._check(len(self._pending))
                return b""
            line = data[start:end + 2]
            start = end + 2
            self._check(len(line))
            self._size += len(line)
            if line == b"\r\n":
                return self._header_block() + data[start - 2:]
            if line[:1] in (b" ", b"\t"):
                if self._fields:
                    self._fields[-1][1].append(line)
                    continue
            else:
                m = _FIELD.match(line)
                if m:
                    self._fields.append((m.group(1).lower(), [line]))
                    continue
            # Not a header field: the body starts here without an empty
            # line. Put one in: otherwise what follows our added fields could
            # be read as more header (a continuation, then a forged From:).
            return self._header_block() + b"\r\n" + data[start - len(line):]

    def _check(self, n):
        """Refuse the message once the header block (so far, plus ``n``) is too big."""
        if self._size + n > self.limit:
            # Keep nothing more: the message will be refused anyway.
            self._fields = []
            self._pending = b""
            raise HeaderBlockTooLarge()

    def finish(self) -> bytes:
        """What is left at the end of the data (a message of headers only)."""
        if self.done:
            return b""
        rest = self._pending
        self._pending = b""
        return self._header_block() + rest

    def _header_block(self) -> bytes:
        self.done = True
        out = []
        names = set()
        for name, lines in self._fields:
            names.add(name)
            raw = b"".join(lines)
            if name == b"bcc":
                self.removed_bcc += 1
                continue
            if name == b"from":
                self.from_values.append(raw[raw.index(b":") + 1:])
            out.append(raw)
        if b"message-id" not in names:
            out.append(f"Message-ID: {_value(self.message_id)}\r\n".encode("ascii"))
        if b"date" not in names:
            out.append(f"Date: {_value(self.date)}\r\n".encode("ascii"))
        self._fields = []
        self._pending = b""
        return b"".join(out)


def _value(v):
    return v() if callable(v) else v
