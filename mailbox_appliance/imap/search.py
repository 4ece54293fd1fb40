"""IMAP SEARCH (RFC 3501 6.4.4): parsing the search keys and matching messages.

Pure code, no I/O: the server hands ``parse_search`` the command's arguments
after ``SEARCH`` (or ``UID SEARCH``) as ``tokens.py`` values and gets back
``(charset, query)``. It then asks ``query.needs`` what it must read:

* ``"index"``: flags, UID, sequence number, size, internal date, \\Recent;
* ``"header"``: the message header as well (FROM, TO, CC, BCC, SUBJECT,
  HEADER, SENTBEFORE/SENTON/SENTSINCE);
* ``"full"``: the whole message (BODY, TEXT).

and calls ``query.matches(msg, seq, largest_seq, largest_uid)`` for each
message. ``msg`` provides ``uid``, ``flags`` (a set of str, system flags in
their canonical spelling such as ``"\\Seen"``), ``recent`` (bool; \\Recent is
not among ``flags``), ``internaldate`` (float, epoch seconds), ``size`` (int)
and the callables ``header()`` and ``text()`` returning bytes (the header
block, the whole message with CRLF). Those two are called lazily, at most once
each per ``matches`` call, and only when a key that needs them is reached:
keys are evaluated cheapest first, so ``UNSEEN FROM x`` reads no header of a
seen message. If ``text()`` has been called, the header is taken from it
rather than from ``header()``.

Matching rules:

* Strings match as case-insensitive (Unicode case folding) substrings, with
  runs of whitespace treated as one space in both the key and the message.
* Header values are unfolded, RFC 2047 encoded words are decoded (adjacent
  words of one charset joined before decoding, so a character split between
  them survives), and raw 8-bit octets are read as UTF-8 with replacement.
  ``HEADER name ""`` matches every message that has the field.
* BODY searches the body, TEXT the header and the body. Both match on the raw
  body (read as UTF-8 with replacement, first ``RAW_CAP`` octets) and on the
  decoded content of text/* parts (quoted-printable and base64 undone, the
  part's charset applied), walking multipart/* and message/rfc822 entities up
  to ``MAX_MIME_DEPTH`` levels and ``MAX_MIME_PARTS`` parts, with at most
  ``DECODED_CAP`` decoded characters per message.
* BEFORE/ON/SINCE compare the internal date's calendar day in the server's
  local time zone (or the ``tz`` given to ``parse_search``): the day
  boundaries are computed once at parse time, so a message is compared with
  two floats. SENTBEFORE/SENTON/SENTSINCE use the day written in the Date:
  header, ignoring its time and zone as RFC 3501 says; a message without a
  readable Date: header matches none of them (so it matches ``NOT SENTON``).
* Flags: system flags must appear in ``msg.flags`` in their canonical case;
  KEYWORD/UNKEYWORD compare case-insensitively.

Charsets: ``CHARSET UTF-8`` and ``CHARSET US-ASCII`` (case-insensitive).
Any other raises ``SearchBadCharset`` (``NO [BADCHARSET (UTF-8 US-ASCII)]``).
Without CHARSET, strings are read as UTF-8, of which US-ASCII is a subset.
Strings that are not valid in the declared charset are a syntax error.

Hostile input is bounded: nesting of NOT, OR and parenthesized lists goes to
``MAX_DEPTH`` levels and a search has at most ``MAX_KEYS`` keys (operators
count), so neither parsing nor matching recurses deeply or runs long.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import datetime
import email.utils
import math
import re
import time

from mailbox_appliance.imap.sequence import SequenceSetError, parse_sequence_set, resolve

__all__ = [
    "SearchError", "SearchSyntaxError", "SearchBadCharset", "Query",
    "parse_search", "SUPPORTED_CHARSETS",
]

SUPPORTED_CHARSETS = ("UTF-8", "US-ASCII")
MAX_DEPTH = 100               # levels of NOT / OR / ( ) around a key
MAX_KEYS = 1000               # search keys in one command, operators included
HEADER_CAP = 1024 * 1024      # octets of a header that are parsed
RAW_CAP = 16 * 1024 * 1024    # octets of a body searched raw
DECODED_CAP = 4 * 1024 * 1024  # characters of decoded text/* content
MAX_MIME_DEPTH = 20
MAX_MIME_PARTS = 500

_NEEDS = ("index", "header", "full")
INDEX, HEADER, FULL = range(3)


class SearchError(ValueError):
    """A SEARCH command that cannot be run."""


class SearchSyntaxError(SearchError):
    """Malformed search keys: answered with BAD."""


class SearchBadCharset(SearchError):
    """A charset we do not support: answered with NO [BADCHARSET (...)]."""

    supported = SUPPORTED_CHARSETS
    response_code = "BADCHARSET (" + " ".join(SUPPORTED_CHARSETS) + ")"

    def __init__(self, charset):
        super().__init__(f"unsupported charset {charset[:60]!r}")
        self.charset = charset


# --------------------------------------------------------------------------
# Parsing

_MONTHS = {m: i for i, m in enumerate(
    ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC"), 1)}
_DATE = re.compile(r"^(\d{1,2})-([A-Za-z]{3})-(\d{4})$")
_NUMBER = re.compile(r"^\d{1,10}$")
_SEQ_START = re.compile(r"^[\d*]")

_FLAG_KEYS = {
    "ANSWERED": ("\\Answered", True), "UNANSWERED": ("\\Answered", False),
    "DELETED": ("\\Deleted", True), "UNDELETED": ("\\Deleted", False),
    "DRAFT": ("\\Draft", True), "UNDRAFT": ("\\Draft", False),
    "FLAGGED": ("\\Flagged", True), "UNFLAGGED": ("\\Flagged", False),
    "SEEN": ("\\Seen", True), "UNSEEN": ("\\Seen", False),
}
_HEADER_KEYS = {"FROM": "from", "TO": "to", "CC": "cc", "BCC": "bcc", "SUBJECT": "subject"}


def parse_search(tokens, tz=None):
    """``(charset, query)`` for the arguments of SEARCH.

    ``charset`` is the canonical name given with CHARSET ("UTF-8" or
    "US-ASCII"), or None when there was none. ``tz`` is the time zone of
    BEFORE/ON/SINCE (a ``tzinfo``); None means the server's local time zone.
    Raises ``SearchBadCharset`` or ``SearchSyntaxError``.
    """
    if not isinstance(tokens, list):
        raise SearchSyntaxError("search keys expected")
    charset = None
    i = 0
    if tokens and isinstance(tokens[0], str) and tokens[0].upper() == "CHARSET":
        if len(tokens) < 2:
            raise SearchSyntaxError("CHARSET needs a charset name")
        name = _astring(tokens[1], "UTF-8")
        canonical = {"UTF-8": "UTF-8", "US-ASCII": "US-ASCII"}.get(name.upper())
        if canonical is None:
            raise SearchBadCharset(name)
        charset = canonical
        i = 2
    if i >= len(tokens):
        raise SearchSyntaxError("no search keys")
    parser = _Parser(charset or "UTF-8", tz)
    nodes = []
    while i < len(tokens):
        node, i = parser.key(tokens, i, 0)
        nodes.append(node)
    return charset, Query(_and(nodes))


def _astring(token, charset):
    """An astring argument as text; NIL (atom or None) is the text "NIL"."""
    if token is None:
        return "NIL"
    if isinstance(token, str):
        return str(token)
    if isinstance(token, (bytes, bytearray)):
        codec = "ascii" if charset == "US-ASCII" else "utf-8"
        try:
            return bytes(token).decode(codec)
        except UnicodeDecodeError:
            raise SearchSyntaxError(f"string is not valid {charset}") from None
    raise SearchSyntaxError("string expected")


class _Parser:
    def __init__(self, charset, tz):
        self.charset = charset
        self.tz = tz
        self.count = 0

    def key(self, tokens, i, depth):
        """The node of the key at ``tokens[i]`` and the index after it."""
        self.count += 1
        if self.count > MAX_KEYS:
            raise SearchSyntaxError(f"more than {MAX_KEYS} search keys")
        if depth > MAX_DEPTH:
            raise SearchSyntaxError(f"search keys nested more than {MAX_DEPTH} levels")
        token = tokens[i]
        if isinstance(token, list):
            if not token:
                raise SearchSyntaxError("empty parenthesized list")
            nodes = []
            j = 0
            while j < len(token):
                node, j = self.key(token, j, depth + 1)
                nodes.append(node)
            return _and(nodes), i + 1
        if not isinstance(token, str):
            raise SearchSyntaxError("search key expected")
        name = token.upper()
        i += 1
        if name == "ALL":
            return _All(), i
        if name in _FLAG_KEYS:
            flag, present = _FLAG_KEYS[name]
            return _Flag(flag, present), i
        if name == "RECENT":
            return _Recent(True), i
        if name == "OLD":
            return _Recent(False), i
        if name == "NEW":
            return _and([_Recent(True), _Flag("\\Seen", False)]), i
        if name in ("KEYWORD", "UNKEYWORD"):
            word = self._arg(tokens, i, name, self._keyword)
            if word.upper() == "\\RECENT":
                return _Recent(name == "KEYWORD"), i + 1
            return _Keyword(word, name == "KEYWORD"), i + 1
        if name in ("LARGER", "SMALLER"):
            n = self._arg(tokens, i, name, _number)
            return _Size(n, name == "LARGER"), i + 1
        if name in ("BEFORE", "ON", "SINCE"):
            day = self._arg(tokens, i, name, _date)
            return _InternalDate(name, day, self.tz), i + 1
        if name in ("SENTBEFORE", "SENTON", "SENTSINCE"):
            day = self._arg(tokens, i, name, _date)
            return _SentDate(name[4:], day), i + 1
        if name in _HEADER_KEYS:
            text = self._arg(tokens, i, name, self._string)
            return _Header(_HEADER_KEYS[name], text), i + 1
        if name == "HEADER":
            field = self._arg(tokens, i, name, self._string)
            text = self._arg(tokens, i + 1, name, self._string)
            return _Header(field.lower(), text), i + 2
        if name in ("BODY", "TEXT"):
            text = self._arg(tokens, i, name, self._string)
            return _Text(text, name == "TEXT"), i + 1
        if name == "UID":
            ranges = self._arg(tokens, i, name, _sequence_set)
            return _Set(ranges, True), i + 1
        if name == "NOT":
            if i >= len(tokens):
                raise SearchSyntaxError("NOT needs a search key")
            node, i = self.key(tokens, i, depth + 1)
            return _Not(node), i
        if name == "OR":
            if i >= len(tokens):
                raise SearchSyntaxError("OR needs two search keys")
            left, i = self.key(tokens, i, depth + 1)
            if i >= len(tokens):
                raise SearchSyntaxError("OR needs two search keys")
            right, i = self.key(tokens, i, depth + 1)
            return _Or([left, right]), i
        if _SEQ_START.match(token):
            return _Set(_sequence_set(token), False), i
        raise SearchSyntaxError(f"unknown search key {token[:40]!r}")

    @staticmethod
    def _arg(tokens, i, name, convert):
        if i >= len(tokens):
            raise SearchSyntaxError(f"{name} needs an argument")
        return convert(tokens[i])

    def _string(self, token):
        return _astring(token, self.charset)

    def _keyword(self, token):
        word = _astring(token, self.charset)
        if not word or any(c in word for c in ' (){%*"]') or not word.isprintable():
            raise SearchSyntaxError("not a flag keyword")
        return word


def _number(token):
    if isinstance(token, str) and _NUMBER.match(token):
        n = int(token)
        if n <= 0xFFFFFFFF:
            return n
    raise SearchSyntaxError("number expected")


def _date(token):
    if isinstance(token, (bytes, bytearray)):
        token = bytes(token).decode("ascii", "replace")
    if isinstance(token, str):
        m = _DATE.match(token)
        if m and m.group(2).upper() in _MONTHS:
            try:
                return datetime.date(int(m.group(3)), _MONTHS[m.group(2).upper()], int(m.group(1)))
            except ValueError:
                pass
    raise SearchSyntaxError("date expected (like 1-Feb-1994)")


def _sequence_set(token):
    if isinstance(token, str):
        try:
            return parse_sequence_set(str(token))
        except SequenceSetError:
            pass
    raise SearchSyntaxError("bad sequence set")


# --------------------------------------------------------------------------
# The query and its nodes

class Query:
    """A parsed search: ``needs`` and ``matches(msg, seq, largest_seq, largest_uid)``."""

    __slots__ = ("root", "needs")

    def __init__(self, root):
        self.root = root
        self.needs = _NEEDS[root.cost]

    def matches(self, msg, seq, largest_seq, largest_uid):
        """Whether message ``msg`` (sequence number ``seq``) satisfies the search."""
        return self.root.test(_Context(msg, seq, largest_seq, largest_uid))

    def __repr__(self):
        return f"Query({self.root!r})"


class _Context:
    """One message under test, with what has been read or decoded of it."""

    __slots__ = ("msg", "seq", "largest_seq", "largest_uid",
                 "_text", "_fields", "_values", "_body", "_sent", "_keywords")

    def __init__(self, msg, seq, largest_seq, largest_uid):
        self.msg, self.seq = msg, seq
        self.largest_seq, self.largest_uid = largest_seq, largest_uid
        self._text = self._fields = self._body = self._keywords = None
        self._values = {}
        self._sent = False

    def text(self):
        if self._text is None:
            self._text = bytes(self.msg.text())
        return self._text

    def fields(self):
        """[(lower-case name, raw value)] of the header."""
        if self._fields is None:
            head = _split(self._text)[0] if self._text is not None else bytes(self.msg.header())
            self._fields = _parse_fields(head)
        return self._fields

    def values(self, name):
        """The normalized decoded values of the header fields called ``name``.

        A message may bring ``search_cache`` (get/put by key): the values are
        kept there joined by newlines (a normalized needle holds none), so a
        repeated SEARCH FROM or SUBJECT decodes nothing.
        """
        got = self._values.get(name)
        if got is None:
            cache = getattr(self.msg, "search_cache", None)
            key = (self.msg.uid, name)
            joined = cache.get(key) if cache is not None else None
            if joined is not None:
                got = [joined]
            else:
                got = [_norm(_decode_value(v)) for n, v in self.fields() if n == name]
                if cache is not None:
                    cache.put(key, "\n".join(got))
            self._values[name] = got
        return got

    def sent_date(self):
        if self._sent is False:
            self._sent = None
            dates = [v for n, v in self.fields() if n == "date"]
            if dates:
                self._sent = _header_date(_decode_value(dates[0]))
        return self._sent

    def body(self):
        """The normalized haystacks of the body: raw, then decoded text parts."""
        if self._body is None:
            text = self.text()
            raw = _split(text)[1][:RAW_CAP]
            self._body = [_norm(raw.decode("utf-8", "replace"))]
            self._body.extend(_norm(s) for s in _decoded_parts(text))
        return self._body

    def body_contains(self, needle):
        """Whether ``needle`` (normalized) is in the body, deciding cheaply when it can.

        For an ASCII needle without spaces and an ASCII body, a byte search in
        the lower-cased raw body says the same as the normalized one; only
        encoded (quoted-printable, base64) parts then need decoding.
        """
        if self._body is not None or not _PLAIN_NEEDLE.match(needle):
            return any(needle in hay for hay in self.body())
        text = self.text()
        raw = _split(text)[1][:RAW_CAP]
        if not raw.isascii():
            return any(needle in hay for hay in self.body())
        low = text.lower()
        if needle.encode("ascii") in low[len(text) - len(raw):]:
            return True
        if b"base64" not in low and b"quoted-printable" not in low:
            return False
        return any(needle in _norm(part) for part in _decoded_parts(text))

    def header_contains(self, needle):
        """Whether ``needle`` is in the decoded header (TEXT), cheaply when it can."""
        if _PLAIN_NEEDLE.match(needle):
            head = _split(self.text())[0]
            if head.isascii() and b"=?" not in head:
                return needle.encode("ascii") in head.lower()
        return needle in self.header_text()

    def header_text(self):
        got = self._values.get(None)
        if got is None:
            got = "\n".join(_norm(n + ": " + _decode_value(v)) for n, v in self.fields())
            self._values[None] = got
        return got

    def keywords(self):
        if self._keywords is None:
            self._keywords = {f.casefold() for f in self.msg.flags}
        return self._keywords


class _Node:
    __slots__ = ()
    cost = INDEX


class _All(_Node):
    __slots__ = ()

    def test(self, ctx):
        return True

    def __repr__(self):
        return "ALL"


class _Flag(_Node):
    __slots__ = ("flag", "present")

    def __init__(self, flag, present):
        self.flag, self.present = flag, present

    def test(self, ctx):
        return (self.flag in ctx.msg.flags) == self.present

    def __repr__(self):
        return f"{'' if self.present else 'UN'}{self.flag[1:].upper()}"


class _Recent(_Node):
    __slots__ = ("present",)

    def __init__(self, present):
        self.present = present

    def test(self, ctx):
        return bool(ctx.msg.recent) == self.present

    def __repr__(self):
        return "RECENT" if self.present else "OLD"


class _Keyword(_Node):
    __slots__ = ("word", "folded", "present")

    def __init__(self, word, present):
        self.word, self.folded, self.present = word, word.casefold(), present

    def test(self, ctx):
        found = self.word in ctx.msg.flags or self.folded in ctx.keywords()
        return found == self.present

    def __repr__(self):
        return f"{'' if self.present else 'UN'}KEYWORD {self.word}"


class _Size(_Node):
    __slots__ = ("n", "larger")

    def __init__(self, n, larger):
        self.n, self.larger = n, larger

    def test(self, ctx):
        size = ctx.msg.size
        return size > self.n if self.larger else size < self.n

    def __repr__(self):
        return f"{'LARGER' if self.larger else 'SMALLER'} {self.n}"


def _midnight(day, tz):
    """The epoch time at which ``day`` starts in ``tz`` (None: local time)."""
    try:
        if tz is None:
            return time.mktime((day.year, day.month, day.day, 0, 0, 0, 0, 0, -1))
        return datetime.datetime(day.year, day.month, day.day, tzinfo=tz).timestamp()
    except (OverflowError, ValueError, OSError):
        return -math.inf if day.year < 1970 else math.inf


class _InternalDate(_Node):
    """BEFORE / ON / SINCE as a half-open interval of epoch times."""

    __slots__ = ("name", "day", "lo", "hi")

    def __init__(self, name, day, tz):
        self.name, self.day = name, day
        start = _midnight(day, tz)
        try:
            end = _midnight(day + datetime.timedelta(days=1), tz)
        except OverflowError:
            end = math.inf
        self.lo, self.hi = {"BEFORE": (-math.inf, start), "ON": (start, end),
                            "SINCE": (start, math.inf)}[name]

    def test(self, ctx):
        return self.lo <= ctx.msg.internaldate < self.hi

    def __repr__(self):
        return f"{self.name} {self.day.isoformat()}"


class _Set(_Node):
    """A sequence set (``uid`` False) or UID set, ``*`` resolved per mailbox size."""

    __slots__ = ("ranges", "uid", "_largest", "_los", "_his")

    def __init__(self, ranges, uid):
        self.ranges, self.uid = ranges, uid
        self._largest = None

    def _resolve(self, largest):
        merged = []
        for lo, hi in sorted(resolve(self.ranges, largest)):
            if merged and lo <= merged[-1][1] + 1:
                if hi > merged[-1][1]:
                    merged[-1][1] = hi
            else:
                merged.append([lo, hi])
        self._los = [lo for lo, _ in merged]
        self._his = [hi for _, hi in merged]
        self._largest = largest

    def test(self, ctx):
        if self.uid:
            largest, value = ctx.largest_uid, ctx.msg.uid
        else:
            largest, value = ctx.largest_seq, ctx.seq
        if largest != self._largest:
            self._resolve(largest)
        i = bisect.bisect_right(self._los, value) - 1
        return i >= 0 and value <= self._his[i]

    def __repr__(self):
        def num(n):
            return "*" if n is None else str(n)
        text = ",".join(num(lo) if lo == hi else f"{num(lo)}:{num(hi)}" for lo, hi in self.ranges)
        return ("UID " if self.uid else "") + text


class _SentDate(_Node):
    __slots__ = ("name", "day")
    cost = HEADER

    def __init__(self, name, day):
        self.name, self.day = name, day

    def test(self, ctx):
        sent = ctx.sent_date()
        if sent is None:
            return False
        if self.name == "BEFORE":
            return sent < self.day
        if self.name == "ON":
            return sent == self.day
        return sent >= self.day

    def __repr__(self):
        return f"SENT{self.name} {self.day.isoformat()}"


class _Header(_Node):
    __slots__ = ("field", "text", "needle")
    cost = HEADER

    def __init__(self, field, text):
        self.field, self.text, self.needle = field, text, _norm(text)

    def test(self, ctx):
        needle = self.needle
        return any(needle in value for value in ctx.values(self.field))

    def __repr__(self):
        return f"HEADER {self.field} {self.text!r}"


class _Text(_Node):
    """BODY (``whole`` False) or TEXT (header and body)."""

    __slots__ = ("text", "needle", "whole")
    cost = FULL

    def __init__(self, text, whole):
        self.text, self.needle, self.whole = text, _norm(text), whole

    def test(self, ctx):
        needle = self.needle
        if self.whole:
            ctx.text()          # so that the header comes from the same read
            if ctx.header_contains(needle):
                return True
        return ctx.body_contains(needle)

    def __repr__(self):
        return f"{'TEXT' if self.whole else 'BODY'} {self.text!r}"


class _Not(_Node):
    __slots__ = ("node", "cost")

    def __init__(self, node):
        self.node, self.cost = node, node.cost

    def test(self, ctx):
        return not self.node.test(ctx)

    def __repr__(self):
        return f"NOT {self.node!r}"


class _Group(_Node):
    """Keys tested cheapest first: a failing flag test spares reading the message."""

    __slots__ = ("nodes", "cost")

    def __init__(self, nodes):
        self.nodes = sorted(nodes, key=lambda n: n.cost)
        self.cost = self.nodes[-1].cost


class _And(_Group):
    __slots__ = ()

    def test(self, ctx):
        return all(node.test(ctx) for node in self.nodes)

    def __repr__(self):
        return "(" + " ".join(repr(n) for n in self.nodes) + ")"


class _Or(_Group):
    __slots__ = ()

    def test(self, ctx):
        return any(node.test(ctx) for node in self.nodes)

    def __repr__(self):
        return "OR " + " ".join(repr(n) for n in self.nodes)


def _and(nodes):
    flat = []
    for node in nodes:
        if isinstance(node, _And):
            flat.extend(node.nodes)
        else:
            flat.append(node)
    return flat[0] if len(flat) == 1 else _And(flat)


# --------------------------------------------------------------------------
# Message text

_WS = re.compile(r"\s+")


_PLAIN_NEEDLE = re.compile(r"^[\x21-\x7e]+$")


def _norm(text):
    """Case-folded text with whitespace runs made one space."""
    return _WS.sub(" ", text.casefold())


def _split(entity):
    """(header, body) of a message or MIME entity."""
    if entity.startswith(b"\r\n"):
        return b"", entity[2:]
    if entity.startswith(b"\n"):
        return b"", entity[1:]
    best = None
    i = entity.find(b"\n\r\n")
    if i >= 0:
        best = (i + 1, i + 3)
    j = entity.find(b"\n\n", 0, i if i >= 0 else len(entity))
    if j >= 0:
        best = (j + 1, j + 2)
    if best is None:
        return entity, b""
    return entity[:best[0]], entity[best[1]:]


def _parse_fields(head):
    """[(lower-case name, raw unfolded value)] of a header block."""
    fields = []
    for line in head[:HEADER_CAP].split(b"\n"):
        if line.endswith(b"\r"):
            line = line[:-1]
        if not line:
            break
        if line[:1] in (b" ", b"\t"):
            if fields:
                fields[-1][1].extend(line)
            continue
        name, colon, value = line.partition(b":")
        if not colon:
            continue
        fields.append((name.strip().decode("ascii", "replace").lower(), bytearray(value.lstrip())))
    return [(n, bytes(v)) for n, v in fields]


_ENCODED_WORD = re.compile(rb"=\?([^?\s]+)\?([QqBb])\?([^?\s]*)\?=")
_CHARSET_ALIASES = {
    "gb2312": "gb18030", "gbk": "gb18030", "x-gbk": "gb18030",
    "ks_c_5601-1987": "cp949", "euc-kr": "cp949",
    "iso-8859-1": "cp1252", "latin1": "cp1252", "latin-1": "cp1252",
    "us-ascii": "utf-8", "ascii": "utf-8", "utf8": "utf-8",
    "shift_jis": "cp932", "x-sjis": "cp932",
}


def _decode_charset(data, charset):
    """``data`` in ``charset``, falling back to UTF-8; never raises."""
    charset = _CHARSET_ALIASES.get(charset, charset)
    if charset and charset != "utf-8":
        try:
            return data.decode(charset, "replace")
        except Exception:       # unknown charset, or a codec that is not text
            pass
    return data.decode("utf-8", "replace")


def _b64(data):
    data = re.sub(rb"[^A-Za-z0-9+/]", b"", data)
    data = data[:len(data) - len(data) % 4] if len(data) % 4 == 1 else data + b"=" * (-len(data) % 4)
    try:
        return base64.b64decode(data)
    except (binascii.Error, ValueError):
        return None


def _encoded_word_bytes(encoding, payload):
    if encoding in (b"B", b"b"):
        return _b64(payload)
    try:
        return binascii.a2b_qp(payload, header=True)
    except (binascii.Error, ValueError):
        return None


def _decode_value(raw):
    """A header value as text: RFC 2047 encoded words decoded, 8-bit as UTF-8."""
    if b"=?" not in raw:
        return raw.decode("utf-8", "replace")
    out = []
    pending = bytearray()
    pending_charset = None
    last_was_word = False
    pos = 0

    def flush():
        nonlocal pending_charset
        if pending_charset is not None:
            out.append(_decode_charset(bytes(pending), pending_charset))
            pending.clear()
            pending_charset = None

    for m in _ENCODED_WORD.finditer(raw):
        gap = raw[pos:m.start()]
        if not (last_was_word and not gap.strip()):
            flush()
            out.append(gap.decode("utf-8", "replace"))
        pos = m.end()
        data = _encoded_word_bytes(m.group(2), m.group(3))
        if data is None:
            flush()
            out.append(m.group(0).decode("ascii", "replace"))
            last_was_word = False
            continue
        charset = m.group(1).split(b"*")[0].decode("ascii", "replace").lower()
        if charset != pending_charset:
            flush()
            pending_charset = charset
        pending.extend(data)
        last_was_word = True
    flush()
    out.append(raw[pos:].decode("utf-8", "replace"))
    return "".join(out)


def _header_date(value):
    """The calendar day written in a Date: header, or None."""
    try:
        parsed = email.utils.parsedate_tz(value)
        if parsed is None:
            return None
        return datetime.date(parsed[0], parsed[1], parsed[2])
    except Exception:           # the date parser is not hardened against junk
        return None


_PARAM = re.compile(r';\s*([^\s=;]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^\s;]*)')


def _content_type(fields, default):
    """(type/subtype lower-case, {param: value}) of an entity."""
    values = [v for n, v in fields if n == "content-type"]
    if not values:
        return default, {}
    value = values[0].decode("utf-8", "replace")
    ctype = value.split(";", 1)[0].strip().lower()
    if "/" not in ctype:
        return default, {}
    params = {}
    for m in _PARAM.finditer(value):
        v = m.group(2)
        if v.startswith('"'):
            v = re.sub(r"\\(.)", r"\1", v[1:-1])
        params.setdefault(m.group(1).lower(), v)
    return ctype, params


def _transfer_decode(data, fields):
    cte = [v for n, v in fields if n == "content-transfer-encoding"]
    cte = cte[0].strip().lower() if cte else b""
    if cte == b"base64":
        return _b64(data) or b"", True
    if cte == b"quoted-printable":
        return binascii.a2b_qp(data), True
    return data, False


def _decoded_parts(message):
    """Decoded text of the text/* parts (and nested message headers), bounded."""
    budget = DECODED_CAP
    out = []
    stack = [(message, 0, "text/plain", False)]
    parts = 0
    while stack and budget > 0 and parts < MAX_MIME_PARTS:
        entity, depth, default, nested = stack.pop()
        parts += 1
        head, body = _split(entity)
        fields = _parse_fields(head)
        if nested and fields:
            text = "\n".join(n + ": " + _decode_value(v) for n, v in fields)[:budget]
            out.append(text)
            budget -= len(text)
        ctype, params = _content_type(fields, default)
        if ctype.startswith("multipart/"):
            boundary = params.get("boundary", "").encode("utf-8", "replace")
            if boundary and len(boundary) <= 200 and depth < MAX_MIME_DEPTH:
                child_default = "message/rfc822" if ctype == "multipart/digest" else "text/plain"
                children = _split_multipart(body, boundary, MAX_MIME_PARTS - parts)
                stack.extend((c, depth + 1, child_default, False) for c in reversed(children))
            continue
        if ctype == "message/rfc822" and depth < MAX_MIME_DEPTH:
            data, _ = _transfer_decode(body, fields)
            stack.append((data, depth + 1, "text/plain", True))
            continue
        if not ctype.startswith("text/"):
            continue
        charset = params.get("charset", "").strip().lower()
        data, transformed = _transfer_decode(body[:2 * budget + 1024], fields)
        if not transformed and charset in ("", "utf-8", "utf8", "us-ascii", "ascii"):
            continue            # the raw body already says the same
        text = _decode_charset(data[:budget], charset)[:budget]
        out.append(text)
        budget -= len(text)
    return out


def _split_multipart(body, boundary, limit):
    """The body parts of a multipart body (preamble and epilogue left out)."""
    delimiter = re.compile(rb"(?m)^--" + re.escape(boundary) + rb"(--)?[ \t]*\r?$")
    children = []
    start = None
    for m in delimiter.finditer(body):
        if start is not None:
            end = m.start()
            if body[end - 2:end] == b"\r\n":
                end -= 2
            elif body[end - 1:end] == b"\n":
                end -= 1
            children.append(body[start:end])
            if len(children) >= limit:
                break
        if m.group(1):
            break
        start = m.end() + 1     # past the line's \n
    return children
