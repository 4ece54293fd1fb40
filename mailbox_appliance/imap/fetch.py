"""FETCH data items (RFC 3501 6.4.5, 7.4.2): parsing and rendering, no I/O.

``parse_fetch_items`` turns the argument after the sequence set into FetchItems;
each says what it reads (``needs``: INDEX, HEADER or MESSAGE) and whether it sets
\\Seen, and ``render_fetch`` writes the untagged response for one message.

The message-access object given to ``render_fetch`` provides:

* ``uid`` (int), ``flags`` (iterable of str), ``internaldate`` (float, seconds since
  the epoch; sent in UTC, "+0000"), ``size`` (int, the RFC822.SIZE in CRLF octets);
* ``text()`` -> bytes: the whole message with CRLF line ends (the same callable
  SEARCH uses), called at most once per render_fetch and only for items whose
  ``needs`` is MESSAGE (or HEADER ones when there is no ``header``);
* ``header()`` -> bytes (optional): the header block including the blank line that
  ends it (a longer prefix of the message does too), used for HEADER items unless
  ``text()`` was already read;
* ``envelope`` / ``bodystructure`` (optional; bytes, or None when not known):
  cached results of ``mime.envelope()`` / ``mime.bodystructure()``, sent instead of
  reading the message.
"""

from __future__ import annotations

import re
import time

from mailbox_appliance.imap import mime

__all__ = [
    "HEADER", "INDEX", "MESSAGE", "FetchItem", "FetchSyntaxError", "needs",
    "parse_fetch_items", "render_fetch", "sets_seen", "with_flags",
]

# What an item reads, in increasing cost: index data (flags, date, size, uid), the
# header only, the whole message.
INDEX, HEADER, MESSAGE = 0, 1, 2


class FetchSyntaxError(ValueError):
    """The FETCH items are not valid (tagged BAD)."""


_MONTHS = (b"Jan", b"Feb", b"Mar", b"Apr", b"May", b"Jun", b"Jul", b"Aug", b"Sep", b"Oct",
           b"Nov", b"Dec")


def _internaldate(when):
    try:
        t = None if when is None else time.gmtime(when)
    except (OverflowError, OSError, ValueError, TypeError):
        t = None
    if t is None or not 0 < t.tm_year < 10000:      # date-year is 4DIGIT
        t = time.gmtime(0)
    return b'"%2d-%s-%04d %02d:%02d:%02d +0000"' % (
        t.tm_mday, _MONTHS[t.tm_mon - 1], t.tm_year, t.tm_hour, t.tm_min, t.tm_sec)


def _literal(data):
    """Message octets as a literal ("" when empty or absent); NUL, which no literal
    may hold, is sent as 0x80 (same length, so sizes and partials stay right)."""
    if not data:
        return b'""'
    if b"\x00" in data:
        data = data.replace(b"\x00", b"\x80")
    return b"{%d}\r\n%s" % (len(data), data)


# -- access to the message, once per render_fetch --------------------------------------

def _message(msg, cache):
    data = cache.get("m")
    if data is None:
        data = msg.text()
        if data.__class__ is not bytes:
            data = bytes(data)
        cache["m"] = data
    return data


def _header(msg, cache):
    """The header section (with its blank line)."""
    hdr = cache.get("h")
    if hdr is None:
        data = cache.get("m")
        if data is None:
            reader = getattr(msg, "header", None)
            if reader is None:
                data = _message(msg, cache)
            else:
                data = reader()
                if data.__class__ is not bytes:
                    data = bytes(data)
        hdr = cache["h"] = data[:mime._body_start(data, 0, len(data))]
    return hdr


def _tree(msg, cache):
    tree = cache.get("t")
    if tree is None:
        tree = cache["t"] = mime.parse(_message(msg, cache))
    return tree


# -- items -----------------------------------------------------------------------------

def _r_flags(item, msg, cache):
    return b"FLAGS (%s)" % " ".join(msg.flags).encode("ascii", "replace")


def _r_uid(item, msg, cache):
    return b"UID %d" % msg.uid


def _r_internaldate(item, msg, cache):
    return b"INTERNALDATE " + _internaldate(msg.internaldate)


def _r_size(item, msg, cache):
    return b"RFC822.SIZE %d" % msg.size


def _r_envelope(item, msg, cache):
    env = getattr(msg, "envelope", None)
    if env is None:
        env = mime.envelope(_header(msg, cache))
    return b"ENVELOPE " + env


def _r_bodystructure(item, msg, cache):
    bs = getattr(msg, "bodystructure", None)
    if bs is None:
        bs = mime.bodystructure(_tree(msg, cache))
    return b"BODYSTRUCTURE " + bs


def _r_body(item, msg, cache):
    return b"BODY " + mime.bodystructure(_tree(msg, cache), extensible=False)


def _r_rfc822(item, msg, cache):
    return b"RFC822 " + _literal(_message(msg, cache))


def _r_rfc822_header(item, msg, cache):
    return b"RFC822.HEADER " + _literal(_header(msg, cache))


def _r_rfc822_text(item, msg, cache):
    data = _message(msg, cache)
    return b"RFC822.TEXT " + _literal(data[mime._body_start(data, 0, len(data)):])


def _r_section(item, msg, cache):
    sec = item.section
    if not sec.path and sec.text in ("HEADER", "HEADER.FIELDS", "HEADER.FIELDS.NOT"):
        hdr = _header(msg, cache)
        if sec.text == "HEADER":
            data = hdr
        else:
            data = mime.header_fields(hdr, sec.fields, sec.text == "HEADER.FIELDS.NOT")
    elif not sec.path:
        data = _message(msg, cache)
        if sec.text == "TEXT":
            data = data[mime._body_start(data, 0, len(data)):]
    else:
        data = mime.section(_tree(msg, cache), sec)
    if item.partial is not None and data:
        offset, count = item.partial
        data = data[offset:offset + count]
    return item.name_bytes + b" " + _literal(data)


class FetchItem:
    """One FETCH data item.

    ``name``: the name in the response (e.g. "BODY[HEADER.FIELDS (FROM TO)]<0>");
    ``needs``: INDEX, HEADER or MESSAGE; ``sets_seen``: whether fetching it sets
    \\Seen; ``section`` (mime.Section) and ``partial`` ((offset, count)) for
    BODY[...]; ``render(msg, cache=None)`` -> b"name value"."""

    __slots__ = ("name", "name_bytes", "needs", "sets_seen", "section", "partial", "_render")

    def __init__(self, name, needs, sets_seen, render, section=None, partial=None):
        self.name = name
        self.name_bytes = name.encode("ascii")
        self.needs = needs
        self.sets_seen = sets_seen
        self.section = section
        self.partial = partial
        self._render = render

    def render(self, msg, cache=None):
        return self._render(self, msg, {} if cache is None else cache)

    def __repr__(self):
        return f"FetchItem({self.name!r})"

    def __eq__(self, other):
        return isinstance(other, FetchItem) and self.name == other.name \
            and self.partial == other.partial and self.sets_seen == other.sets_seen

    def __hash__(self):
        return hash((self.name, self.partial))


_SIMPLE = {item.name: item for item in (
    FetchItem("FLAGS", INDEX, False, _r_flags),
    FetchItem("UID", INDEX, False, _r_uid),
    FetchItem("INTERNALDATE", INDEX, False, _r_internaldate),
    FetchItem("RFC822.SIZE", INDEX, False, _r_size),
    FetchItem("ENVELOPE", HEADER, False, _r_envelope),
    FetchItem("BODYSTRUCTURE", MESSAGE, False, _r_bodystructure),
    FetchItem("BODY", MESSAGE, False, _r_body),
    FetchItem("RFC822", MESSAGE, True, _r_rfc822),
    FetchItem("RFC822.HEADER", HEADER, False, _r_rfc822_header),
    FetchItem("RFC822.TEXT", MESSAGE, True, _r_rfc822_text),
)}

_MACROS = {
    "ALL": ("FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE"),
    "FAST": ("FLAGS", "INTERNALDATE", "RFC822.SIZE"),
    "FULL": ("FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE", "BODY"),
}

_BODY_SECTION = re.compile(r"BODY(\.PEEK)?\[(.*)\](?:<([0-9]{1,10})\.([0-9]{1,10})>)?\Z",
                           re.S | re.I)


def _item(text):
    if not isinstance(text, str):
        raise FetchSyntaxError("fetch attributes must be atoms")
    simple = _SIMPLE.get(text.upper())
    if simple is not None:
        return simple
    m = _BODY_SECTION.match(text)
    if m is None:
        raise FetchSyntaxError(f"unknown fetch attribute {text[:40]!r}")
    try:
        sec = mime.parse_section(m.group(2))
    except mime.SectionSyntaxError as e:
        raise FetchSyntaxError(f"bad section: {e}") from None
    partial = None
    name = f"BODY[{sec}]"
    if m.group(3) is not None:
        offset, count = int(m.group(3)), int(m.group(4))
        if offset >= 1 << 32 or not 0 < count < 1 << 32:
            raise FetchSyntaxError("bad partial range")
        partial = (offset, count)
        name += f"<{offset}>"
    if not sec.path and sec.text in ("HEADER", "HEADER.FIELDS", "HEADER.FIELDS.NOT"):
        need = HEADER
    else:
        need = MESSAGE
    return FetchItem(name, need, m.group(1) is None, _r_section, sec, partial)


def parse_fetch_items(arg, uid=False):
    """The FetchItems of the argument after FETCH's sequence set: an Atom (one item
    or a macro ALL, FAST, FULL) or a list of Atoms; a one-element list of arguments
    holding either is accepted too.  With ``uid`` (UID FETCH) a UID item comes first
    unless asked for.  Raises FetchSyntaxError."""
    if isinstance(arg, list) and len(arg) == 1 and (
            isinstance(arg[0], list) or isinstance(arg[0], str) and arg[0].upper() in _MACROS):
        arg = arg[0]
    if isinstance(arg, list):
        if not arg:
            raise FetchSyntaxError("empty fetch attribute list")
        items = [_item(a) for a in arg]
    elif isinstance(arg, str):
        macro = _MACROS.get(arg.upper())
        items = [_SIMPLE[n] for n in macro] if macro else [_item(arg)]
    else:
        raise FetchSyntaxError("fetch attributes must be an atom or a list")
    # One response item per name: BODY[] and BODY.PEEK[] asked together are one
    # BODY[] that sets \Seen.
    index = {}
    unique = []
    for item in items:
        key = (item.name, item.partial)
        at = index.get(key)
        if at is None:
            index[key] = len(unique)
            unique.append(item)
        elif item.sets_seen and not unique[at].sets_seen:
            unique[at] = item
    if uid and not any(item.name == "UID" for item in unique):
        unique.insert(0, _SIMPLE["UID"])
    return unique


def needs(items):
    """The most any of the items reads: INDEX, HEADER or MESSAGE."""
    return max((item.needs for item in items), default=INDEX)


def sets_seen(items):
    """Whether fetching these items sets \\Seen (BODY[...], RFC822, RFC822.TEXT)."""
    return any(item.sets_seen for item in items)


def with_flags(items):
    """The items plus FLAGS if absent: when the fetch has just set \\Seen, the new
    flags are sent with it (RFC 3501 6.4.5)."""
    if any(item.name == "FLAGS" for item in items):
        return items
    return list(items) + [_SIMPLE["FLAGS"]]


def render_fetch(seq, items, msg):
    """The untagged response ``* seq FETCH (...)\\r\\n`` for one message."""
    cache = {}
    return b"* %d FETCH (%s)\r\n" % (
        seq, b" ".join([item._render(item, msg, cache) for item in items]))
