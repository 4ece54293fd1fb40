"""MIME structure of stored messages for IMAP FETCH (RFC 3501 6.4.5, 7.4.2).

``envelope``, ``bodystructure`` and ``section`` are pure functions of the message
octets (CRLF line ends) that return the exact bytes FETCH sends.  Header values are
unfolded but never decoded (encoded words stay as they are, like Dovecot).

Everything here is bounded on hostile input:

* header fields are read from the first ``HEADER_CAP`` octets of a header only, and
  MIME parameters from the first ``PARAM_CAP`` octets of a field;
* MIME nesting deeper than ``MAX_DEPTH`` and parts beyond ``MAX_PARTS`` are opaque
  (reported as ``APPLICATION/OCTET-STREAM``, no part numbers below them);
* nothing recurses: the structure is built and rendered with explicit stacks, and a
  multipart is split by searching its own body for its boundary lines (no email
  package, whose parser is quadratic on some input and can raise RecursionError);
* the work for one message is budgeted (``WORK_BASE`` plus ``WORK_PER_KIB`` per KiB
  of message, in units of roughly a microsecond: one parameter, address token or
  boundary candidate, 32 octets of header or 2 KiB of body searched), separately
  for parsing the structure and for rendering it.  Parts met once the parsing
  budget is spent are opaque; parameters and addresses met once a budget is spent
  are left out.  So a crafted message (many parts with many parameters, deep
  nesting over a big body, boundary look-alike lines) costs a bounded fraction of a
  second, and as the budget depends on the octets only, BODYSTRUCTURE and section
  numbers always agree.
"""

from __future__ import annotations

import re
from functools import lru_cache

HEADER_CAP = 64 * 1024
PARAM_CAP = 16 * 1024
MAX_DEPTH = 100
MAX_PARTS = 10000
WORK_BASE = 50_000
WORK_PER_KIB = 4
FIELD_MATCHES = 64

__all__ = [
    "HEADER_CAP", "MAX_DEPTH", "MAX_PARTS", "PARAM_CAP", "MimeTree", "Section",
    "SectionSyntaxError", "bodystructure", "envelope", "header_fields", "imap_string",
    "parse", "parse_section", "section",
]


class _Budget:
    """Work left for one message (see the module docstring)."""

    __slots__ = ("left",)

    def __init__(self, size):
        self.left = WORK_BASE + WORK_PER_KIB * (size >> 10)


# -- IMAP strings --------------------------------------------------------------------

_UNSAFE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f-\xff]")


def imap_string(value):
    """``value`` (bytes or None) as an IMAP nstring: NIL, a quoted string when every
    octet may appear in one, else a literal (NUL, which no literal may hold, sent as
    0x80 like Dovecot does)."""
    if value is None:
        return b"NIL"
    if _UNSAFE.search(value) is None:
        if b"\\" in value or b'"' in value:
            value = value.replace(b"\\", b"\\\\").replace(b'"', b'\\"')
        return b'"' + value + b'"'
    if b"\x00" in value:
        value = value.replace(b"\x00", b"\x80")
    return b"{%d}\r\n%s" % (len(value), value)


_q = imap_string


# -- headers -------------------------------------------------------------------------

def _body_start(data, start, end):
    """Offset of the body of the entity at [start, end): just after the blank line
    that ends its header, or ``end`` when there is none (all header, no body)."""
    if data.startswith(b"\r\n", start, end):
        return start + 2
    if data.startswith(b"\n", start, end):
        return start + 1
    i = data.find(b"\n\r\n", start, end)
    j = data.find(b"\n\n", start, end if i < 0 else i + 2)
    if j >= 0 and (i < 0 or j < i):
        return j + 2
    if i >= 0:
        return i + 3
    return end


_ENV_FIELDS = (b"date", b"subject", b"from", b"sender", b"reply-to", b"to", b"cc",
               b"bcc", b"in-reply-to", b"message-id")
_MIME_FIELDS = (b"content-type", b"content-transfer-encoding", b"content-id",
                b"content-description", b"content-md5", b"content-disposition",
                b"content-language", b"content-location")
# A field ENVELOPE or BODYSTRUCTURE uses: name, optional blanks, colon, the rest of the
# line and its continuation lines ('.' stops at LF only, so a CR before the LF stays
# in the value, and is stripped).  Other fields are skipped by the regex engine.
_FIELD = re.compile(rb"^(" + b"|".join(re.escape(n) for n in _ENV_FIELDS + _MIME_FIELDS)
                    + rb")[ \t]*:(.*(?:\n[ \t].*)*)", re.M | re.I)


def _unfold(raw):
    return raw.replace(b"\r\n", b"").replace(b"\n", b"").strip(b" \t\r")


def _fields(data, start, end, budget):
    """The first occurrence of each field ENVELOPE or BODYSTRUCTURE uses, as a dict
    lower-case name -> unfolded raw value, from the header at [start, end) read up to
    HEADER_CAP octets and FIELD_MATCHES such fields."""
    end = min(end, start + HEADER_CAP)
    budget.left -= (end - start) >> 5
    found = {}
    for i, m in enumerate(_FIELD.finditer(data, start, end)):
        if i == FIELD_MATCHES:
            break
        budget.left -= 1
        name = m.group(1).lower()
        if name not in found:
            found[name] = _unfold(m.group(2))
    return found


# -- ENVELOPE ------------------------------------------------------------------------

_ATOK = re.compile(rb"""
    ([ \t\r\n]+)                              # 1 blanks
  | "((?:[^"\\]|\\.)*)"?                      # 2 quoted string (unterminated: to the end)
  | (\[(?:[^\[\]\\]|\\.)*\]?)                 # 3 domain literal
  | (\()                                      # 4 comment
  | ([<>@,;:.])                               # 5 specials
  | ([^ \t\r\n"\[()<>@,;:.]+)                 # 6 atom text (stray ']' and '\' included)
  | (\))                                      # 7 stray ')'
""", re.X | re.S)
_CTOK = re.compile(rb"[^()\\]+|\\.?|[()]", re.S)
_UNESCAPE = re.compile(rb"\\(.)", re.S)

# token kinds besides the special characters themselves
_ATOM, _QUOTED, _LITERAL, _COMMENT = 0, 1, 2, 3


class _OutOfWork(Exception):
    """The budget ran out in the middle of a header value."""


def _skip_comment(value, pos, budget):
    """(end, text) of the comment whose '(' is just before ``pos``."""
    depth = 1
    start = pos
    n = len(value)
    while pos < n:
        budget.left -= 1
        if budget.left < 0:
            raise _OutOfWork
        m = _CTOK.match(value, pos)
        tok = m.group()
        pos = m.end()
        if tok == b"(":
            depth += 1
        elif tok == b")":
            depth -= 1
            if not depth:
                return pos, value[start:pos - 1]
    return pos, value[start:pos]


def _address_tokens(value, budget):
    """(kind, text, blank_before) triples; kind is _ATOM, _QUOTED (text still
    escaped), _LITERAL, _COMMENT or a special character (as bytes)."""
    toks = []
    pos = 0
    n = len(value)
    blank = False
    while pos < n:
        budget.left -= 1
        if budget.left < 0:
            raise _OutOfWork
        m = _ATOK.match(value, pos)
        pos = m.end()
        g = m.lastindex
        if g == 1:
            blank = True
        elif g == 4:
            pos, text = _skip_comment(value, pos, budget)
            toks.append((_COMMENT, text, blank))
            blank = True
        elif g == 2:
            toks.append((_QUOTED, m.group(2), blank))
            blank = False
        elif g == 3:
            toks.append((_LITERAL, m.group(3), blank))
            blank = False
        elif g == 5:
            toks.append((m.group(5), m.group(5), blank))
            blank = False
        elif g == 6:
            toks.append((_ATOM, m.group(6), blank))
            blank = False
    return toks


def _phrase(toks):
    """A display name: words joined by one space where the header had blanks,
    quoted strings unquoted; None when empty."""
    out = []
    for kind, text, blank in toks:
        if kind == _COMMENT:
            continue
        if kind == _QUOTED and b"\\" in text:
            text = _UNESCAPE.sub(rb"\1", text)
        if out and blank:
            out.append(b" ")
        out.append(text)
    return b"".join(out) or None


def _raw(toks):
    """A local part, domain or route as written, without blanks and comments."""
    out = []
    for kind, text, _ in toks:
        if kind == _QUOTED:
            out.append(b'"' + text + b'"')
        elif kind != _COMMENT:
            out.append(text)
    return b"".join(out)


def _addr_spec(toks):
    """(mailbox, host) of an addr-spec; a missing part is "" (NIL would mean a group)."""
    for i, t in enumerate(toks):
        if t[0] == b"@":
            return _raw(toks[:i]), _raw(toks[i + 1:])
    return _raw(toks), b""


# The common case, a comma-separated list of "addr@host" and "Some Name <addr@host>"
# without quotes, comments, groups or routes, is answered by one regex per address;
# it gives the same bytes as the general parser below (a test checks).
_HARD = re.compile(rb'["()\\:;\[\]]')
_SIMPLE_ADDRESS = re.compile(
    rb"[ \t]*(?:([^<>@,\s][^<>@,]*?)?[ \t]*<([^<>@,\s]+)@([^<>@,\s]+)>"
    rb"|([^<>@,\s]+)@([^<>@,\s]+))[ \t]*\Z")


def _simple_address_list(value, budget):
    """The address list of a simple value, or None if it is not simple."""
    out = []
    for element in value.split(b","):
        budget.left -= 4
        m = _SIMPLE_ADDRESS.match(element)
        if m is None:
            if element.strip(b" \t"):
                return None
            continue
        if m.group(2) is None:
            out.append(b"(NIL NIL %s %s)" % (_q(m.group(4)), _q(m.group(5))))
        else:
            name = m.group(1)
            if name is not None:
                name = b" ".join(name.split()) or None
            out.append(b"(%s NIL %s %s)" % (_q(name), _q(m.group(2)), _q(m.group(3))))
    if not out:
        return None
    return b"(" + b"".join(out) + b")"


def _address_list(value, budget, simple=True):
    """The IMAP address list of a header value (RFC 3501 7.4.2, group syntax
    included): b"((...)(...))", or b"NIL" if absent or empty."""
    if value is None:
        return b"NIL"
    if simple and _HARD.search(value) is None and budget.left > 0:
        result = _simple_address_list(value, budget)
        if result is not None:
            return result
    try:
        toks = _address_tokens(value, budget)
    except _OutOfWork:
        return b"NIL"
    out = []
    in_group = False
    words = []      # tokens of the current address outside <...>
    angle = None    # tokens inside <...>, None if no '<' yet
    closed = False  # '>' seen

    def finish():
        nonlocal angle, closed
        budget.left -= 4
        comments = [t[1] for t in words if t[0] == _COMMENT]
        if angle is not None:
            name = _phrase(words) or (comments[-1] if comments else None)
            route = None
            inner = angle
            for i in range(len(inner) - 1, -1, -1):
                if inner[i][0] == b":":
                    route = _raw(inner[:i]) or None
                    inner = inner[i + 1:]
                    break
            mailbox, host = _addr_spec(inner)
            out.append(b"(%s %s %s %s)" % (_q(name), _q(route), _q(mailbox), _q(host)))
        elif len(comments) < len(words):
            mailbox, host = _addr_spec([t for t in words if t[0] != _COMMENT])
            name = comments[-1] if comments else None
            out.append(b"(%s NIL %s %s)" % (_q(name or None), _q(mailbox), _q(host)))
        words.clear()
        angle = None
        closed = False

    for tok in toks:
        kind = tok[0]
        if angle is not None and not closed:
            if kind == b">":
                closed = True
            elif kind != b"<" and kind != _COMMENT:
                angle.append(tok)
            continue
        if kind == b",":
            finish()
        elif kind == b";":
            finish()
            if in_group:
                out.append(b"(NIL NIL NIL NIL)")
                in_group = False
        elif kind == b":":
            if in_group or angle is not None:
                continue
            name = _phrase(words) or b""
            words.clear()
            out.append(b"(NIL NIL %s NIL)" % _q(name))
            in_group = True
        elif kind == b"<":
            if angle is None:
                angle = []
        elif closed:
            if kind == _COMMENT:
                words.append(tok)
        elif kind != b">":
            words.append(tok)
    finish()
    if in_group:
        out.append(b"(NIL NIL NIL NIL)")
    if not out:
        return b"NIL"
    return b"(" + b"".join(out) + b")"


def _envelope(fields, budget):
    get = fields.get
    frm = _address_list(get(b"from"), budget)
    sender = _address_list(get(b"sender"), budget)
    reply_to = _address_list(get(b"reply-to"), budget)
    return b"(%s)" % b" ".join((
        _q(get(b"date")), _q(get(b"subject")), frm,
        frm if sender == b"NIL" else sender,
        frm if reply_to == b"NIL" else reply_to,
        _address_list(get(b"to"), budget), _address_list(get(b"cc"), budget),
        _address_list(get(b"bcc"), budget),
        _q(get(b"in-reply-to")), _q(get(b"message-id"))))


def envelope(header_bytes):
    """The ENVELOPE of a message (RFC 3501 7.4.2) as the exact wire bytes.

    ``header_bytes`` is the message header, or the whole message (read up to the
    blank line); only its first HEADER_CAP octets are looked at."""
    end = min(len(header_bytes), HEADER_CAP)
    budget = _Budget(end)
    return _envelope(_fields(header_bytes, 0, _body_start(header_bytes, 0, end), budget),
                     budget)


# -- MIME header values --------------------------------------------------------------

_MCOMMENT = re.compile(rb'"(?:[^"\\]|\\.)*"?|\\.?|[()]|[^"\\()]+', re.S)
_CTYPE = re.compile(rb"[ \t]*([^\s;/]+)[ \t]*/[ \t]*([^\s;]+)[ \t]*(?=;|\Z)")
_DTYPE = re.compile(rb"[ \t]*([^\s;/]+)[ \t]*(?=;|\Z)")
_PARAM = re.compile(
    rb';[ \t]*([^\s;=]+)[ \t]*=[ \t]*(?:"((?:[^"\\]|\\.)*)"?|([^;]*?))[ \t]*(?=;|\Z)', re.S)
_TOKEN = re.compile(rb"[!#-'*+.0-9A-Z^-~-]+")
_ATTR_UNSAFE = re.compile(rb"[^A-Za-z0-9!#$&+.^_`|~-]")


def _mime_value(value, budget):
    """A Content-* value cut to PARAM_CAP octets, without its comments."""
    value = value[:PARAM_CAP]
    if b"(" not in value:
        return value
    out = []
    depth = 0
    for m in _MCOMMENT.finditer(value):
        budget.left -= 1
        if budget.left < 0:
            break
        tok = m.group()
        if tok == b"(":
            depth += 1
        elif tok == b")":
            if depth:
                depth -= 1
            else:
                out.append(tok)
        elif not depth:
            out.append(tok)
    return b"".join(out)


def _pct(value):
    return _ATTR_UNSAFE.sub(lambda m: b"%%%02X" % m.group()[0], value)


def _params(value, pos, budget):
    """The parameters after ``pos``: [(NAME, value)] with names upper-cased, quoted
    values unquoted, and RFC 2231 continuations (name*0, name*1*, ...) joined into
    one parameter (``name*`` with the raw charset'lang'%xx value if any section is
    extended, like Dovecot); nothing is decoded."""
    found = []
    conts = {}
    for m in _PARAM.finditer(value, pos):
        budget.left -= 2        # parsing it, and sending it
        if budget.left < 0:
            break
        name = m.group(1).upper()
        v = m.group(2)
        if v is None:
            v = m.group(3)
        elif b"\\" in v:
            v = _UNESCAPE.sub(rb"\1", v)
        extended = name.endswith(b"*")
        base, star, num = (name[:-1] if extended else name).rpartition(b"*")
        if star and base and num.isdigit() and len(num) <= 5:
            sections = conts.get(base)
            if sections is None:
                sections = conts[base] = {}
                found.append((base, None))
            sections.setdefault(int(num), (v, extended))
        else:
            found.append((name, v))
    if not conts:
        return found
    out = []
    for name, v in found:
        if v is not None:
            out.append((name, v))
            continue
        sections = conts[name]
        pieces = []
        while len(pieces) in sections:
            pieces.append(sections[len(pieces)])
        if not pieces:
            continue
        if any(ext for _, ext in pieces):
            joined = [v if ext else _pct(v) for v, ext in pieces]
            if not pieces[0][1]:
                joined[0] = b"''" + joined[0]
            out.append((name + b"*", b"".join(joined)))
        else:
            out.append((name, b"".join(v for v, _ in pieces)))
    return out


def _content_type(value, budget):
    """(TYPE, SUBTYPE, params) or None if absent or invalid."""
    if value is None:
        return None
    value = _mime_value(value, budget)
    m = _CTYPE.match(value)
    if m is None or not _TOKEN.fullmatch(m.group(1).upper()) \
            or not _TOKEN.fullmatch(m.group(2).upper()):
        return None
    return m.group(1).upper(), m.group(2).upper(), _params(value, m.end(), budget)


def _disposition(value, budget):
    if value is None:
        return b"NIL"
    value = _mime_value(value, budget)
    m = _DTYPE.match(value)
    if m is None:
        return b"NIL"
    return b"(%s %s)" % (_q(m.group(1).upper()),
                         _param_list(_params(value, m.end(), budget)))


def _param_list(params):
    if not params:
        return b"NIL"
    return b"(%s)" % b" ".join([b"%s %s" % (_q(k), _q(v)) for k, v in params])


def _language(value, budget):
    if value is None:
        return b"NIL"
    tags = [t.strip(b" \t") for t in _mime_value(value, budget).split(b",")]
    tags = [t for t in tags if t]
    budget.left -= len(tags)
    if not tags or budget.left < 0:
        return b"NIL"
    if len(tags) == 1:
        return _q(tags[0])
    return b"(%s)" % b" ".join([_q(t) for t in tags])


def _encoding(value, budget):
    if value is None:
        return b"7BIT"
    words = _mime_value(value, budget).split()
    return words[0].upper() if words else b"7BIT"


# -- structure -----------------------------------------------------------------------

_LEAF, _MULTI, _MSG, _OPAQUE = 0, 1, 2, 3
_DEFAULT_TEXT = (b"TEXT", b"PLAIN", [(b"CHARSET", b"US-ASCII")])
_DEFAULT_DIGEST = (b"MESSAGE", b"RFC822", [])
_PAD = re.compile(rb"[ \t\r]*")


class _Part:
    """One MIME entity: header at [start, body), body at [body, end)."""

    __slots__ = ("start", "body", "end", "depth", "digest", "kind", "children",
                 "fields", "ctype")

    def __init__(self, start, end, depth, digest):
        self.start, self.end, self.depth, self.digest = start, end, depth, digest
        self.kind = None
        self.children = ()


def _split(data, start, end, boundary, limit, budget):
    """The [start, end) ranges of the parts of a multipart body at [start, end) with
    this boundary (RFC 2046 5.1.1: the CRLF before a delimiter belongs to it; the
    preamble and epilogue are dropped), and whether they were cut short: at most
    ``limit`` ranges, the last one running to ``end`` when there would be more.
    None if the budget runs out."""
    budget.left -= (end - start) >> 11
    delim = b"--" + boundary
    needle = b"\n" + delim
    ranges = []
    part_start = None
    if data.startswith(delim, start, end):
        cand = start
    else:
        cand = data.find(needle, start, end)
        cand = cand + 1 if cand >= 0 else -1
    while cand >= 0:
        budget.left -= 1
        if budget.left < 0:
            return None
        after = cand + len(delim)
        eol = data.find(b"\n", after, end)
        line_end = end if eol < 0 else eol
        close = data.startswith(b"--", after, line_end)
        if close or _PAD.fullmatch(data, after, line_end):
            if part_start is not None:
                e = cand - 1
                if e > part_start and data[e - 1] == 13:
                    e -= 1
                ranges.append((part_start, max(e, part_start)))
                part_start = None
            if close:
                break
            if len(ranges) >= limit:
                ranges[-1] = (ranges[-1][0], end)
                return ranges, True
            part_start = end if eol < 0 else eol + 1
        cand = data.find(needle, after, end)
        cand = cand + 1 if cand >= 0 else -1
    if part_start is not None:
        ranges.append((part_start, end))
    return ranges, False


class MimeTree:
    """The MIME structure of a message, parsed once for BODYSTRUCTURE and sections."""

    __slots__ = ("data", "root")

    def __init__(self, data):
        self.data = data
        self.root = root = _Part(0, len(data), 0, False)
        budget = _Budget(len(data))
        parts_left = MAX_PARTS - 1
        stack = [root]
        while stack:
            part = stack.pop()
            part.body = _body_start(data, part.start, part.end)
            if budget.left <= 0:
                part.fields, part.ctype, part.kind = {}, _DEFAULT_TEXT, _OPAQUE
                continue
            part.fields = fields = _fields(data, part.start, part.body, budget)
            ctype = _content_type(fields.get(b"content-type"), budget)
            if ctype is None:
                ctype = _DEFAULT_DIGEST if part.digest and b"content-type" not in fields \
                    else _DEFAULT_TEXT
            part.ctype = ctype
            if part.kind is not None:      # made opaque by the part limit
                continue
            mtype, subtype, params = ctype
            if mtype == b"MULTIPART":
                boundary = next((v for k, v in params if k == b"BOUNDARY"), None)
                split = None
                if boundary and part.depth < MAX_DEPTH and parts_left > 0:
                    split = _split(data, part.body, part.end, boundary, parts_left, budget)
                if split is None:
                    part.kind = _OPAQUE
                    continue
                ranges, truncated = split
                parts_left -= len(ranges)
                digest = subtype == b"DIGEST"
                part.children = [_Part(s, e, part.depth + 1, digest) for s, e in ranges]
                part.kind = _MULTI
                if truncated:
                    part.children[-1].kind = _OPAQUE
                stack.extend(reversed(part.children))
            elif mtype == b"MESSAGE" and subtype == b"RFC822":
                if part.depth >= MAX_DEPTH or parts_left <= 0:
                    part.kind = _OPAQUE
                    continue
                parts_left -= 1
                child = _Part(part.body, part.end, part.depth + 1, False)
                part.children = [child]
                part.kind = _MSG
                stack.append(child)
            else:
                part.kind = _LEAF


def parse(message_bytes):
    """The MimeTree of a message, to share between bodystructure() and section()."""
    return message_bytes if isinstance(message_bytes, MimeTree) else MimeTree(message_bytes)


# -- BODYSTRUCTURE -------------------------------------------------------------------

def _lines(data, start, end):
    if end <= start:
        return 0
    return data.count(b"\n", start, end) + (data[end - 1] != 10)


_EMPTY_PART = b'("TEXT" "PLAIN" ("CHARSET" "US-ASCII") NIL NIL "7BIT" 0 0)'
_EMPTY_PART_EXT = b'("TEXT" "PLAIN" ("CHARSET" "US-ASCII") NIL NIL "7BIT" 0 0 NIL NIL NIL NIL)'


def _ext_tail(fields, budget):
    return b" %s %s %s" % (_disposition(fields.get(b"content-disposition"), budget),
                           _language(fields.get(b"content-language"), budget),
                           _q(fields.get(b"content-location")))


def bodystructure(message_bytes, extensible=True):
    """BODYSTRUCTURE (``extensible=True``, with extension data) or BODY of a message
    (bytes or MimeTree), as the exact wire bytes."""
    tree = parse(message_bytes)
    data = tree.data
    budget = _Budget(len(data))
    out = []
    stack = [tree.root]
    while stack:
        part = stack.pop()
        if part.__class__ is bytes:
            out.append(part)
            continue
        budget.left -= 4
        fields = part.fields
        kind = part.kind
        if kind == _MULTI:
            out.append(b"(")
            tail = b" " + _q(part.ctype[1])
            if extensible:
                tail += b" " + _param_list(part.ctype[2]) + _ext_tail(fields, budget)
            stack.append(tail + b")")
            if part.children:
                stack.extend(reversed(part.children))
            else:
                stack.append(_EMPTY_PART_EXT if extensible else _EMPTY_PART)
            continue
        if kind == _OPAQUE:
            head = b'"APPLICATION" "OCTET-STREAM" NIL'
        else:
            mtype, subtype, params = part.ctype
            head = b"%s %s %s" % (_q(mtype), _q(subtype), _param_list(params))
        basic = b"(%s %s %s %s %d" % (
            head, _q(fields.get(b"content-id")), _q(fields.get(b"content-description")),
            _q(_encoding(fields.get(b"content-transfer-encoding"), budget)),
            part.end - part.body)
        tail = b""
        if kind == _MSG or (kind == _LEAF and part.ctype[0] == b"TEXT"):
            tail = b" %d" % _lines(data, part.body, part.end)
        if extensible:
            tail += b" " + _q(fields.get(b"content-md5")) + _ext_tail(fields, budget)
        if kind == _MSG:
            child = part.children[0]
            out.append(basic + b" " + _envelope(child.fields, budget) + b" ")
            stack.append(tail + b")")
            stack.append(child)
        else:
            out.append(basic + tail + b")")
    return b"".join(out)


# -- sections ------------------------------------------------------------------------

class SectionSyntaxError(ValueError):
    """Not a valid section-spec (RFC 3501 6.4.5)."""


_PATH = re.compile(r"([1-9][0-9]{0,9}(?:\.[1-9][0-9]{0,9})*)(\.|\Z)")
_FIELDS_SPEC = re.compile(r"HEADER\.FIELDS(\.NOT)? \((.*)\)\Z", re.S | re.I)
_FIELD_NAMES = re.compile(
    r'(?:"(?:[^"\\]|\\.)*"|[^\s()"]+)(?: (?:"(?:[^"\\]|\\.)*"|[^\s()"]+))*\Z', re.S)
_FIELD_NAME = re.compile(r'"((?:[^"\\]|\\.)*)"|([^\s()"]+)', re.S)
_FTEXT = re.compile(r"[!-9;-~]+\Z")


class Section:
    """A parsed section-spec: ``path`` (tuple of part numbers), ``text`` (None,
    "HEADER", "HEADER.FIELDS", "HEADER.FIELDS.NOT", "TEXT" or "MIME") and ``fields``
    (upper-case names for HEADER.FIELDS[.NOT]).  ``str()`` is the canonical form used
    in the FETCH response."""

    __slots__ = ("path", "text", "fields", "_str")

    def __init__(self, path=(), text=None, fields=()):
        self.path, self.text, self.fields = tuple(path), text, tuple(fields)
        s = ".".join(str(n) for n in self.path)
        if text:
            s = s + "." + text if s else text
        if fields:
            s += " (" + " ".join(fields) + ")"
        self._str = s

    def __str__(self):
        return self._str

    def __repr__(self):
        return f"Section({self._str!r})"

    def __eq__(self, other):
        return isinstance(other, Section) and self._str == other._str

    def __hash__(self):
        return hash(self._str)


def parse_section(spec):
    """The Section for the text between the brackets of BODY[...]; raises
    SectionSyntaxError."""
    if isinstance(spec, Section):
        return spec
    path = ()
    rest = spec
    m = _PATH.match(spec)
    if m:
        path = tuple(int(n) for n in m.group(1).split("."))
        if any(n >= 1 << 32 for n in path):
            raise SectionSyntaxError("part number out of range")
        rest = spec[m.end():]
        if m.group(2) == "." and not rest:
            raise SectionSyntaxError("empty section text")
    upper = rest.upper()
    if not rest:
        return Section(path)
    if upper in ("HEADER", "TEXT") or (upper == "MIME" and path):
        return Section(path, upper)
    m = _FIELDS_SPEC.match(rest)
    if m is None or not _FIELD_NAMES.match(m.group(2)):
        raise SectionSyntaxError("unknown section text")
    names = []
    for q, a in _FIELD_NAME.findall(m.group(2)):
        name = a or re.sub(r"\\(.)", r"\1", q, flags=re.S)
        if not _FTEXT.match(name):
            raise SectionSyntaxError("bad header field name")
        names.append(name.upper())
    return Section(path, "HEADER.FIELDS.NOT" if m.group(1) else "HEADER.FIELDS", names)


@lru_cache(maxsize=128)
def _fields_regex(names):
    alt = b"|".join(re.escape(n.encode("ascii")) for n in names)
    return re.compile(rb"^(?:" + alt + rb")[ \t]*:.*(?:\n[ \t].*)*\n?", re.M | re.I)


def header_fields(header, names, negate=False):
    """HEADER.FIELDS (``negate``: HEADER.FIELDS.NOT) of a header section (the header
    with its blank line): the matching (or other) field lines as they are, then the
    blank line."""
    if header.endswith(b"\n\r\n"):
        header = header[:-2]
    elif header.endswith(b"\n\n"):
        header = header[:-1]
    elif header in (b"\r\n", b"\n"):
        header = b""
    rx = _fields_regex(tuple(sorted(set(n.upper() for n in names))))
    if negate:
        result = rx.sub(b"", header)
    else:
        result = b"".join(rx.findall(header))
    if result and not result.endswith(b"\n"):
        result += b"\r\n"
    return result + b"\r\n"


def _message_text(data, start, end, sec):
    """HEADER / HEADER.FIELDS[.NOT] / TEXT of the message at [start, end)."""
    body = _body_start(data, start, end)
    if sec.text == "TEXT":
        return data[body:end]
    if sec.text == "HEADER":
        return data[start:body]
    return header_fields(data[start:body], sec.fields, sec.text == "HEADER.FIELDS.NOT")


def _select(root, path):
    """The part a part path names, or None."""
    part = None
    for n in path:
        if part is None:
            ctx = root
        elif part.kind == _MULTI:
            part = part.children[n - 1] if n <= len(part.children) else None
            if part is None:
                return None
            continue
        elif part.kind == _MSG:
            ctx = part.children[0]
        else:
            return None
        # part n of a message: its n-th part if it is multipart, else (n == 1) its body
        if ctx.kind == _MULTI:
            part = ctx.children[n - 1] if n <= len(ctx.children) else None
        else:
            part = ctx if n == 1 else None
        if part is None:
            return None
    return part


def section(message_bytes, spec):
    """The octets of BODY[spec] (RFC 3501 6.4.5) of a message (bytes or MimeTree), or
    None when that part does not exist.  ``spec`` is the text between the brackets
    (e.g. "", "1.2.HEADER", "HEADER.FIELDS (FROM TO)") or a Section; raises
    SectionSyntaxError for an invalid one."""
    sec = parse_section(spec)
    data = message_bytes.data if isinstance(message_bytes, MimeTree) else message_bytes
    if not sec.path:
        if sec.text is None:
            return data
        return _message_text(data, 0, len(data), sec)
    part = _select(parse(message_bytes).root, sec.path)
    if part is None:
        return None
    if sec.text is None:
        return data[part.body:part.end]
    if sec.text == "MIME":
        return data[part.start:part.body]
    if part.kind != _MSG:
        return None
    child = part.children[0]
    return _message_text(data, child.start, child.end, sec)
