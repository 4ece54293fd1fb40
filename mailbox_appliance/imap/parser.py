"""IMAP command framing and tokenizing (RFC 3501 section 9, RFC 7888 LITERAL+).

``CommandReader`` cuts the client's byte stream into complete commands: a line
ending in ``{n}`` (or ``{n+}``) announces a literal of n octets that follows,
after which the command goes on. Every part is bounded: a command line, the
literals of ordinary commands, and the message literal of APPEND; a literal
that is too big is refused before a single octet of it is buffered.
``tokenize`` then turns a command's text and literals into the values of
``tokens.py``.
"""

from __future__ import annotations

import re

from mailbox_appliance.imap.tokens import Atom

_LITERAL = re.compile(rb"\{(\d{1,20})(\+?)\}$")
_ATOM_END = frozenset(b' ()"{\r\n')


class ParseError(ValueError):
    """The command cannot be parsed; answered with BAD."""


class Command:
    """One complete command: its tag, its name (upper case) and raw segments."""

    __slots__ = ("tag", "name", "segments")

    def __init__(self, tag, name, segments):
        self.tag, self.name, self.segments = tag, name, segments

    def arguments(self):
        """The tokens after the tag and the command name."""
        tokens = tokenize(self.segments)
        return tokens[2:] if len(tokens) >= 2 else []


class LiteralTooBig(Exception):
    """A client announced a literal over the limit."""

    def __init__(self, tag, size, limit, synchronizing):
        super().__init__(tag, size, limit)
        self.tag, self.size, self.limit, self.synchronizing = tag, size, limit, synchronizing


class LineTooLong(Exception):
    """A command line went past the limit without ending."""

    def __init__(self, tag):
        super().__init__(tag)
        self.tag = tag


class CommandReader:
    """Incremental framing of commands with bounded lines and literals.

    ``feed(data)`` returns a list of events: ``Command`` objects,
    ``("continue", None)`` when a synchronizing literal may be sent, and the
    exceptions ``LiteralTooBig`` / ``LineTooLong`` (as values, not raised).
    """

    def __init__(self, max_line=65536, max_literal=65536, max_append=50 * 1024 * 1024):
        # max_line bounds a whole command, its literals included, except the
        # message literals of APPEND, each bounded by max_append.
        self.max_line = max_line
        self.max_literal = max_literal
        self.max_append = max_append
        self._buf = bytearray()
        self._segments = []
        self._size = 0              # octets of the current command so far
        self._literal = 0           # octets of literal still expected
        self._discard_line = False
        self._skip = 0              # octets of a refused literal to throw away

    def feed(self, data):
        self._buf += data
        events = []
        buf = self._buf
        while buf:
            if self._skip:
                n = min(self._skip, len(buf))
                del buf[:n]
                self._skip -= n
                continue
            if self._literal:
                n = min(self._literal, len(buf))
                self._segments[-1][1].extend(buf[:n])
                del buf[:n]
                self._literal -= n
                continue
            i = buf.find(b"\r\n")
            if self._discard_line:
                if i < 0:
                    buf.clear()
                    break
                del buf[:i + 2]
                self._discard_line = False
                continue
            if i < 0:
                if len(buf) + self._size > self.max_line:
                    events.append(LineTooLong(self._tag(bytes(buf[:100]))))
                    self._reset()
                    self._discard_line = True
                    buf.clear()
                break
            line = bytes(buf[:i])
            del buf[:i + 2]
            self._size += len(line)
            if self._size > self.max_line:
                events.append(LineTooLong(self._tag(line)))
                self._reset()
                continue
            m = _LITERAL.search(line)
            if m is None:
                self._segments.append(("text", line))
                events.append(self._complete())
                continue
            self._segments.append(("text", line[:m.start()]))
            size, sync = int(m.group(1)), not m.group(2)
            if self._is_append():
                limit = self.max_append
            else:
                # Literals of other commands count towards the command's size.
                limit = min(self.max_literal, self.max_line - self._size)
            if size > limit:
                events.append(LiteralTooBig(self._tag(), size, limit, sync))
                self._reset()
                if not sync:
                    # The client sends it anyway: swallow it, then its line end.
                    self._skip = size
                    self._discard_line = True
                continue
            self._segments.append(("literal", bytearray()))
            self._literal = size
            if not self._is_append():
                self._size += size
            if sync:
                events.append(("continue", None))
        return events

    def _reset(self):
        self._segments = []
        self._size = 0
        self._literal = 0

    def _first_line(self):
        return self._segments[0][1] if self._segments else b""

    def _tag(self, line=b""):
        """The tag of the command being read, for an error answer ("*" if none)."""
        first = self._first_line() if self._segments else line
        tag = first.split(b" ", 1)[0]
        try:
            return tag.decode("ascii") if tag and _valid_tag(tag) else "*"
        except UnicodeDecodeError:
            return "*"

    def _is_append(self):
        parts = self._first_line().split(b" ", 3)
        return len(parts) >= 2 and parts[1].upper() == b"APPEND"

    def _complete(self):
        segments, self._segments, self._size = self._segments, [], 0
        first = segments[0][1]
        words = first.split(b" ", 3)
        tag = words[0]
        if not tag or not _valid_tag(tag) or len(words) < 2:
            return ParseError("*" if not tag or not _valid_tag(tag) else tag.decode())
        name = words[1].upper().decode("ascii", "replace")
        return Command(tag.decode("ascii"), name, segments)


def _valid_tag(tag: bytes) -> bool:
    return all(0x21 <= c <= 0x7e and c not in b'(){%*"\\+' for c in tag)


def tokenize(segments):
    """The tokens of a command (tag and name included)."""
    stack = [[]]
    for kind, data in segments:
        if kind == "literal":
            stack[-1].append(bytes(data))
            continue
        _tokenize_text(bytes(data), stack)
    if len(stack) != 1:
        raise ParseError("unbalanced parentheses")
    return stack[0]


def _tokenize_text(text: bytes, stack):
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == 0x20:
            i += 1
        elif c == 0x28:                         # (
            if len(stack) > 100:
                raise ParseError("lists nested too deeply")
            new = []
            stack[-1].append(new)
            stack.append(new)
            i += 1
        elif c == 0x29:                         # )
            if len(stack) == 1:
                raise ParseError("unbalanced parentheses")
            stack.pop()
            i += 1
        elif c == 0x22:                         # "
            out = bytearray()
            i += 1
            while True:
                if i >= n:
                    raise ParseError("unterminated quoted string")
                c = text[i]
                if c == 0x5c:                   # backslash
                    if i + 1 >= n or text[i + 1] not in b'"\\':
                        raise ParseError("bad escape in quoted string")
                    out.append(text[i + 1])
                    i += 2
                elif c == 0x22:
                    i += 1
                    break
                else:
                    out.append(c)
                    i += 1
            stack[-1].append(bytes(out))
        else:
            start = i
            while i < n and text[i] not in _ATOM_END:
                if text[i] == 0x5b:             # [ : a section runs to its ]
                    j = text.find(b"]", i)
                    if j < 0:
                        raise ParseError("unterminated [")
                    i = j + 1
                else:
                    i += 1
            if i == start:
                raise ParseError(f"unexpected character {chr(c)!r}")
            try:
                stack[-1].append(Atom(text[start:i].decode("ascii")))
            except UnicodeDecodeError:
                raise ParseError("8-bit characters in an atom")
