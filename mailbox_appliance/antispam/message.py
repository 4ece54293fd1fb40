"""A received message as the content filters see it: parsed once, bounded.

The content filters (DKIM, DMARC, rules, Bayes, milters) all look at the
same message at end of data. ``ScannedMessage`` parses it once, in a worker
thread, into what they need: the raw bytes (DKIM hashes them), the header
fields unfolded and decoded (rules, DMARC's From:), the decoded text of the
text parts with HTML reduced to text (rules, Bayes), and the URIs.

Hostile input is the norm here, so every product is bounded: the number of
header fields, of MIME parts and of nesting levels walked, the decoded text
kept and the URIs collected. A message over a bound is still judged, on
what was kept; ``truncated`` says that something was left out.
"""

from __future__ import annotations

import binascii
import email.header
import html.parser
import re
from dataclasses import dataclass, field

MAX_HEADERS = 500           # header fields parsed
MAX_HEADER_VALUE = 16384    # characters of one unfolded value
MAX_PARTS = 200             # MIME leaves looked at
MAX_DEPTH = 20              # multipart nesting followed
MAX_TEXT = 512 * 1024       # characters of decoded text kept (all parts)
MAX_URIS = 500

_URI = re.compile(r"""(?i)\b(?:https?://|ftp://|www\.)[^\s<>"'()\[\]{}]{1,2000}""")
_MAILTO = re.compile(r"(?i)\bmailto:[^\s<>\"']{1,500}")
_FOLD = re.compile(r"\r?\n[ \t]")
_SPACES = re.compile(r"[ \t\r\n]+")


def split_message(raw: bytes):
    """(header block, body) of a message; the block ends with its last line end."""
    for blank in (b"\r\n", b"\n"):
        if raw.startswith(blank):
            return b"", raw[len(blank):]
    found = [(i, sep) for sep in (b"\r\n\r\n", b"\n\n") if (i := raw.find(sep)) >= 0]
    if not found:
        return raw, b""
    end, sep = min(found)
    half = len(sep) // 2
    return raw[:end + half], raw[end + len(sep):]


def raw_header_fields(block: bytes, limit=MAX_HEADERS):
    """[(name, raw value bytes)] of a header block, folding kept, in order.

    Lines that are neither a field nor a continuation are skipped (a
    malformed line must not end the scan the way it ends a naive parser).
    """
    fields = []
    for line in block.splitlines(keepends=True):
        if line[:1] in (b" ", b"\t") and fields:
            name, value = fields[-1]
            if len(value) < MAX_HEADER_VALUE:
                fields[-1] = (name, value + line)
            continue
        colon = line.find(b":")
        if colon <= 0 or b" " in line[:colon].strip() or len(fields) >= limit:
            continue
        fields.append((line[:colon].strip().decode("ascii", "replace"), line[colon + 1:]))
    return fields


def decode_value(raw: bytes) -> str:
    """An unfolded header value with RFC 2047 encoded words decoded."""
    text = _FOLD.sub(" ", raw.decode("utf-8", "replace")).strip()[:MAX_HEADER_VALUE]
    if "=?" not in text:
        return text
    try:
        return str(email.header.make_header(email.header.decode_header(text)))
    except (ValueError, LookupError, UnicodeError, AssertionError):
        return text


class _HTMLText(html.parser.HTMLParser):
    """The visible text of an HTML part and the links in it, bounded."""

    SKIP = frozenset({"script", "style", "head", "title"})

    def __init__(self, limit):
        super().__init__(convert_charrefs=True)
        self.parts, self.links, self.size, self.limit = [], [], 0, limit
        self._skip = 0

    def handle_starttag(self, tag, attrs):
        if tag in self.SKIP:
            self._skip += 1
        for name, value in attrs:
            if name in ("href", "src", "action") and value and len(self.links) < MAX_URIS:
                self.links.append(value.strip()[:2000])
        if tag in ("br", "p", "div", "tr", "li"):
            self.handle_data("\n")

    def handle_endtag(self, tag):
        if tag in self.SKIP and self._skip:
            self._skip -= 1

    def handle_data(self, data):
        if self._skip or self.size >= self.limit:
            return
        data = data[:self.limit - self.size]
        self.parts.append(data)
        self.size += len(data)


def html_to_text(markup: str, limit=MAX_TEXT):
    """(visible text, links) of an HTML document."""
    p = _HTMLText(limit)
    try:
        p.feed(markup)
        p.close()
    except (AssertionError, ValueError):
        pass            # malformed markup: keep what was read
    return "".join(p.parts), p.links


@dataclass
class ScannedMessage:
    """One message at end of data, parsed for the content filters.

    ``raw`` is the message exactly as it will be stored (our Received: and
    trace fields on top). ``headers`` are (name, decoded value) pairs,
    ``raw_headers`` (name, raw value bytes) pairs, both in order. ``text``
    is the decoded text of every text part (HTML reduced to its visible
    text), ``rawbody`` the same without the HTML reduction; ``uris`` the
    links found in both. ``facts`` is where filters leave what later ones
    use (``"dkim"``: the DKIM results, ``"spf"``: the door's SPF result...).
    """

    raw: bytes
    sender: str = ""
    recipients: tuple = ()
    client_ip: str = ""
    helo: str = ""
    authenticated: str | None = None
    header_block: bytes = b""
    body: bytes = b""
    raw_headers: list = field(default_factory=list)
    headers: list = field(default_factory=list)
    text: str = ""
    rawbody: str = ""
    uris: list = field(default_factory=list)
    parts: int = 0
    truncated: bool = False
    facts: dict = field(default_factory=dict)

    @classmethod
    def parse(cls, raw: bytes, **envelope) -> "ScannedMessage":
        """Parse ``raw`` (CPU work: call it in a worker thread)."""
        m = cls(raw=raw, **envelope)
        m.header_block, m.body = split_message(raw)
        m.raw_headers = raw_header_fields(m.header_block)
        m.truncated = len(m.raw_headers) >= MAX_HEADERS
        m.headers = [(n, decode_value(v)) for n, v in m.raw_headers]
        m._walk_body()
        return m

    def get_all(self, name) -> list:
        """Decoded values of every field called ``name`` (any case), in order."""
        name = name.lower()
        return [v for n, v in self.headers if n.lower() == name]

    def get(self, name, default=None):
        values = self.get_all(name)
        return values[0] if values else default

    def _walk_body(self):
        """Collect the text of the MIME tree, depth first, within the bounds.

        A walker of our own rather than the stdlib parser: that one parses
        every part of a 100,000-part message and every parameter of a
        Content-Type flood before we could stop it, and recurses once per
        nesting level. This one reads only what it keeps.
        """
        texts, raws, links = [], [], []
        size = 0
        # (header fields, body bytes, depth)
        stack = [(self.raw_headers, self.body, 0)]
        while stack:
            fields, body, depth = stack.pop()
            ctype, params = content_type(field_text(fields, "content-type"))
            if ctype.startswith("multipart/") or ctype == "message/rfc822":
                if depth >= MAX_DEPTH:
                    self.truncated = True
                    continue
                if ctype == "message/rfc822":
                    block, inner = split_message(body)
                    stack.append((raw_header_fields(block, 100), inner, depth + 1))
                    continue
                parts = _split_multipart(body, params.get("boundary", ""),
                                         MAX_PARTS - self.parts + 1)
                for part in reversed(parts):
                    block, inner = split_message(part)
                    stack.append((raw_header_fields(block, 100), inner, depth + 1))
                continue
            self.parts += 1
            if self.parts > MAX_PARTS:
                self.parts = MAX_PARTS
                self.truncated = True
                break
            if not ctype.startswith("text/") or size >= MAX_TEXT:
                continue
            text = decode_body(body, field_text(fields, "content-transfer-encoding"),
                               params.get("charset", ""), MAX_TEXT - size)
            raws.append(text)
            if ctype == "text/html":
                text, found = html_to_text(text, MAX_TEXT - size)
                links += found
            texts.append(text)
            size += len(text)
        if size >= MAX_TEXT:
            self.truncated = True
        self.text = "\n".join(texts)
        self.rawbody = "\n".join(raws)
        self.uris = _uris(links, self.text + "\n" + self.rawbody)


_PARAM = re.compile(r"""\s*([A-Za-z0-9*_.-]{1,64})\s*=\s*("(?:[^"\\]|\\.){0,998}"|[^;\s]{0,998})""")
MAX_PARAMS = 20


def field_text(fields, name) -> str:
    """The first raw value of field ``name`` as text (unfolded), or ""."""
    for n, v in fields:
        if n.lower() == name:
            return _FOLD.sub(" ", v.decode("latin-1"))[:4096].strip()
    return ""


def content_type(value: str):
    """(type/subtype lower-case, {param: value}) of a Content-Type value.

    No Content-Type, or one that does not parse, is text/plain (RFC 2045
    §5.2). At most MAX_PARAMS parameters are read (RFC 2231 floods).
    """
    main, _, rest = value.partition(";")
    main = main.strip().lower()
    if not re.match(r"^[a-z0-9!#$&.+^_-]+/[a-z0-9!#$&.+^_-]+$", main):
        main = "text/plain"
    params = {}
    for m in _PARAM.finditer(rest):
        if len(params) >= MAX_PARAMS:
            break
        v = m.group(2)
        if v.startswith('"'):
            v = re.sub(r"\\(.)", r"\1", v[1:-1])
        params.setdefault(m.group(1).lower(), v)
    return main, params


def _split_multipart(body: bytes, boundary: str, limit: int) -> list:
    """The parts of a multipart body (at most ``limit``), preamble and epilogue dropped."""
    if not boundary or len(boundary) > 200:
        return []
    delim = re.compile(rb"(?m)^--" + re.escape(boundary.encode("latin-1", "replace"))
                       + rb"(--)?[ \t]*\r?$")
    parts, start = [], None
    for m in delim.finditer(body):
        if start is not None:
            # The line end before a delimiter belongs to the delimiter.
            end = m.start()
            end -= 2 if body[end - 2:end] == b"\r\n" else (1 if body[end - 1:end] == b"\n" else 0)
            parts.append(body[start:max(start, end)])
            if len(parts) >= limit:
                break
        if m.group(1):
            break
        start = m.end()
        start += 2 if body[start:start + 2] == b"\r\n" else (1 if body[start:start + 1] == b"\n" else 0)
    return parts


def decode_body(body: bytes, encoding: str, charset: str, limit: int) -> str:
    """A leaf's text: transfer encoding and charset undone, never raising."""
    encoding = encoding.strip().lower()
    data = body[:limit * 8]
    if encoding == "base64":
        # Padding and stray characters dropped, then padding made right
        # again: a damaged part still yields what it holds.
        data = re.sub(rb"[^A-Za-z0-9+/]", b"", data)
        if len(data) % 4 == 1:
            data = data[:-1]
        data += b"=" * (-len(data) % 4)
        try:
            data = binascii.a2b_base64(data)
        except binascii.Error:
            data = b""
    elif encoding == "quoted-printable":
        try:
            data = binascii.a2b_qp(data)
        except binascii.Error:
            pass
    charset = charset.strip().lower() or "us-ascii"
    try:
        return data.decode(charset, "replace")[:limit]
    except (LookupError, ValueError):
        return data.decode("latin-1")[:limit]


def _matches_at(pattern, text, low, starts, limit):
    """``pattern``'s matches that begin where one of the lower-case literals
    ``starts`` stands at a word start: found with str.find first (a
    case-blind alternation tried at every position costs ten times more)."""
    if len(low) != len(text):
        # Lower-casing changed the length (a dotted capital I...): positions
        # differ, so the plain search it is.
        return [m.group(0) for m in pattern.finditer(text)][:limit]
    out = []
    for literal in starts:
        at = low.find(literal)
        while at >= 0 and len(out) < limit:
            if at == 0 or not (text[at - 1].isalnum() or text[at - 1] == "_"):
                m = pattern.match(text, at)
                if m:
                    out.append((at, m.group(0)))
            at = low.find(literal, at + 1)
    return [u for _, u in sorted(out)]


def _uris(links, text) -> list:
    seen, out = set(), []
    low = text.lower()
    found = (_matches_at(_URI, text, low, ("http", "ftp://", "www."), MAX_URIS * 4)
             + _matches_at(_MAILTO, text, low, ("mailto:",), MAX_URIS * 4))
    for u in list(links) + found:
        u = u.rstrip(".,;:!?")
        if u and u not in seen:
            seen.add(u)
            out.append(u)
            if len(out) >= MAX_URIS:
                break
    return out


def normalise_space(text: str) -> str:
    """Runs of white space as one space (what body rules match against)."""
    return _SPACES.sub(" ", text)
