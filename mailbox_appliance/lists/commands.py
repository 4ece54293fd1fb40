"""Reading the commands of a mail to the robot (lists.md sections 1.1 and 1.2).

``parse_message(msg)`` finds the commands as the spec says: a Subject that is
a command (after any Re:/Fwd: prefixes) is the only command and the body is
not read, so a reply to a CONFIRM mail never runs its quoted text; otherwise
the first ``text/plain`` part (else ``text/html`` reduced to text) is read
line by line up to a signature, a stop word (END, QUIT, STOP, ``-``) or the
first line that is not a command, at most 100 non-blank lines and 20
commands, a line at most 1000 octets with no control character.

``parse_line(text)`` reads one command with the strict grammars of 1.1 step 7
and returns a ``Command`` or raises ``CommandError``. Arguments are data:
list names, addresses and tokens are checked against their syntax here, so
nothing that reaches the caller can carry a line break, a control character,
a path or a quote into a header, a file name or SQL text.

INDEX, GET and LAST are recognised (so they do not end the parsing) but their
execution is not part of this package yet.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from html.parser import HTMLParser

from mailbox_appliance.lists import replies
from mailbox_appliance.lists.addresses import LIST_NAME, address_ok
from mailbox_appliance.lists.replies import decoded_header, raw_header

MAX_COMMANDS = 20
MAX_LINES = 100               # non-blank lines examined
MAX_LINE_OCTETS = 1000
MAX_DISPLAY_NAME = 100
MAX_REASON = 200
MAX_PARTS = 100               # MIME parts looked at when finding the body
MAX_PREFIXES = 20             # Re: Fwd: ... stripped from a subject
MAX_BODY_CHARS = 1024 * 1024  # text looked at; more is counted as ignored lines only

# Canonical keyword -> accepted spellings (section 1.2: only these short forms).
KEYWORDS = {
    "HELP": ("HELP", "HEL", "SOS"),
    "LISTS": ("LISTS", "LIS", "LIST"),
    "INFO": ("INFO", "INF"),
    "WHICH": ("WHICH", "WHI", "STATUS"),
    "SUBSCRIBE": ("SUBSCRIBE", "SUB", "JOIN"),
    "SIGNOFF": ("SIGNOFF", "SIG", "UNSUBSCRIBE", "UNSUB", "UNS", "LEAVE"),
    "REVIEW": ("REVIEW", "REV", "WHO"),
    "SET": ("SET",),
    "CONFIRM": ("CONFIRM", "CON"),
    "AUTH": ("AUTH",),
    "DECLINE": ("DECLINE",),
    "INVITE": ("INVITE", "INV"),
    "INDEX": ("INDEX", "IND"),
    "GET": ("GET",),
    "LAST": ("LAST", "LAS"),
    "ADD": ("ADD",),
    "DEL": ("DEL", "DELETE"),
    "REMIND": ("REMIND", "REM"),
    "DISTRIBUTE": ("DISTRIBUTE", "DIS"),
    "REJECT": ("REJECT", "REJ"),
    "MODINDEX": ("MODINDEX", "MOD"),
    "QUIET": ("QUIET",),
}
STOP_WORDS = frozenset({"END", "QUIT", "STOP", "-"})
_SPELLINGS = {s: k for k, spellings in KEYWORDS.items() for s in spellings}

# Reception modes of SET (section 1.2), spelling -> canonical (lower-case) mode.
MODES = {"MAIL": "mail", "EACH": "mail", "NORMAL": "mail", "NODIGEST": "mail",
         "NOMAIL": "nomail", "DIGEST": "digest", "DIGESTPLAIN": "digestplain",
         "SUMMARY": "summary", "NOTICE": "notice", "NOT_ME": "not_me",
         "CONCEAL": "conceal", "NOCONCEAL": "noconceal"}

# QUIET means something only on these; elsewhere it is ignored with a warning.
QUIET_TAKES = frozenset({"ADD", "DEL", "DISTRIBUTE", "REJECT"})
# What AUTH may carry: the requests that are held for confirmation.
AUTH_TAKES = frozenset({"SUBSCRIBE", "SIGNOFF", "ADD", "DEL", "INVITE", "SET"})

# One-line syntax of each command, for errors and a short HELP.
SYNTAX = {
    "HELP": "HELP [command]",
    "LISTS": "LISTS",
    "INFO": "INFO list",
    "WHICH": "WHICH",
    "SUBSCRIBE": "SUBSCRIBE list [your name]",
    "SIGNOFF": "SIGNOFF list|* [address]",
    "REVIEW": "REVIEW list",
    "SET": "SET list|* MAIL|NOMAIL|DIGEST|DIGESTPLAIN|SUMMARY|NOTICE|NOT_ME|CONCEAL|NOCONCEAL",
    "CONFIRM": "CONFIRM token",
    "AUTH": "AUTH token command",
    "DECLINE": "DECLINE token [reason]",
    "INVITE": "INVITE list address [name]",
    "INDEX": "INDEX list",
    "GET": "GET list YYYY-MM",
    "LAST": "LAST list",
    "ADD": "ADD list address [name]",
    "DEL": "DEL list address",
    "REMIND": "REMIND list",
    "DISTRIBUTE": "DISTRIBUTE list key",
    "REJECT": "REJECT list key [reason]",
    "MODINDEX": "MODINDEX list",
    "QUIET": "QUIET ADD|DEL|DISTRIBUTE|REJECT ...",
}
SHORT_HELP = ("SUBSCRIBE list [your name]", "SIGNOFF list", "SET list MAIL|NOMAIL|DIGEST",
              "INFO list", "LISTS", "WHICH", "HELP", "END")

_TOKEN = re.compile(r"^[0-9a-fA-F]{32}$")
_MONTH = re.compile(r"^(\d{4})-(0[1-9]|1[0-2])$")
# Control characters (tab aside, it is white space), Unicode line breaks and the
# bidirectional overrides that make a name read other than it is.
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
# Reply and forward prefixes in the languages seen in the wild, with optional
# counters ("Re[2]:", "RE^3:") and a space before the colon ("RE :").
_PREFIX = re.compile(
    r"^\s*(re|aw|sv|vs|antw|odp|ynt|r|rif|res|fw|fwd|wg|tr|doorst|enc|vl|rv|fs|ref|"
    r"antwort|réf|πρθ|回复|转发|答复)\s*(\[\d{1,4}\]|\^\d{1,4}|\(\d{1,4}\))?\s*[:：]\s*",
    re.IGNORECASE)


class CommandError(ValueError):
    """A line that is a known command with bad arguments, or not acceptable as a line."""


class NotACommand(ValueError):
    """The line does not start with a command keyword."""


@dataclass(frozen=True)
class Command:
    """One parsed command, arguments checked and normalised.

    ``verb`` is the canonical keyword (``SUBSCRIBE`` for ``JOIN``...). ``list_name``
    is lower-case (or ``*`` for SIGNOFF/SET on every list); ``address`` lower-case;
    ``token`` (token or moderation key) lower-case hex; ``mode`` a canonical
    reception mode; ``month`` ``YYYY-MM`` for GET; ``topic`` a canonical keyword
    for HELP. ``inner`` is the command an AUTH carries. ``warnings`` say what was
    ignored (QUIET on a command it does not apply to). ``line`` is the text as
    given, for quoting in the reply.
    """

    verb: str
    line: str = ""
    list_name: str | None = None
    address: str | None = None
    name: str = ""
    mode: str | None = None
    token: str | None = None
    reason: str = ""
    topic: str | None = None
    month: str | None = None
    quiet: bool = False
    inner: "Command | None" = None
    warnings: tuple = ()

    def canonical(self) -> str:
        """One normalised text of the command (what AUTH must repeat; stored with a token)."""
        if self.verb == "AUTH" and self.inner is not None:
            return f"AUTH {self.token} {self.inner.canonical()}"
        words = [("QUIET " if self.quiet else "") + self.verb]
        for value in (self.topic, self.list_name, self.address, self.token, self.month,
                      self.mode.upper() if self.mode else None):
            if value:
                words.append(value)
        if self.name:
            words.append(self.name)
        if self.reason:
            words.append(self.reason)
        return " ".join(words)


@dataclass(frozen=True)
class LineError:
    """A line that could not be taken: its text (control characters as ``?``, cut) and why."""

    line: str
    reason: str
    lineno: int = 0

    @classmethod
    def of(cls, line, reason, lineno=0):
        text = _CONTROL.sub("?", line)
        return cls(text if len(text) <= 200 else text[:200] + "...", reason, lineno)


@dataclass
class ParseResult:
    """What a command mail says, in order.

    ``items``: ``Command`` and ``LineError`` objects in the order of the lines.
    ``not_understood``: the line that ended parsing when a command preceded it
    (reported "not understood"); ``no_command``: nothing was a command (answer
    "no command found" with ``SHORT_HELP``). ``ignored_lines``: non-blank lines
    left unread because of the limits or after a line not understood.
    ``from_subject``: the command came from the Subject (the body was not read).
    ``notes``: things to say once (other MIME parts ignored, limits reached).
    """

    items: list = field(default_factory=list)
    not_understood: str | None = None
    no_command: bool = False
    ignored_lines: int = 0
    from_subject: bool = False
    notes: list = field(default_factory=list)

    @property
    def commands(self) -> list:
        return [i for i in self.items if isinstance(i, Command)]

    @property
    def errors(self) -> list:
        return [i for i in self.items if isinstance(i, LineError)]


# -- one line ------------------------------------------------------------------------------

def keyword(word) -> str | None:
    """The canonical keyword a word spells, or None (case-insensitive, ASCII only)."""
    if not isinstance(word, str) or not word.isascii():
        return None
    return _SPELLINGS.get(word.upper())


def is_stop_word(word) -> bool:
    return isinstance(word, str) and word.upper() in STOP_WORDS


def check_line(line):
    """Raise CommandError for a line too long or carrying a control character."""
    if len(line.encode("utf-8", "surrogateescape")) > MAX_LINE_OCTETS:
        raise CommandError(f"line longer than {MAX_LINE_OCTETS} octets")
    if _CONTROL.search(line):
        raise CommandError("control character in the line")


def _list_arg(word, star=False):
    if star and word == "*":
        return "*"
    name = word.lower()
    if not name.isascii() or not LIST_NAME.match(name):
        raise CommandError(f"not a list name: {_show(word)}")
    return name


def _address_arg(word):
    if not address_ok(word):
        raise CommandError(f"not an address: {_show(word)}")
    return word.lower()


def _token_arg(word, what="token"):
    if not _TOKEN.match(word):
        raise CommandError(f"not a {what} (32 hexadecimal digits): {_show(word)}")
    return word.lower()


def _rest(words, limit, what):
    text = " ".join(words)
    if len(text) > limit:
        raise CommandError(f"{what} longer than {limit} characters")
    return text


def _show(word, limit=60):
    text = _CONTROL.sub("?", word)
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _arity(verb, args, least, most):
    if not least <= len(args) <= most:
        raise CommandError(f"usage: {SYNTAX[verb]}")


def _fill_list(verb, args, default):
    """At ``LIST-request``: the arguments with LIST put in where the list name is missing.

    Missing means the arguments only make sense without it (``SUB``, ``SET
    NOMAIL``, ``ADD a@b.example``); ``SUB other`` still names another list.
    """
    if not default:
        return args
    missing = {
        "SUBSCRIBE": not args,
        "SIGNOFF": not args or (len(args) == 1 and "@" in args[0]),
        "SET": len(args) == 1,
        "GET": len(args) == 1,
        "ADD": bool(args) and "@" in args[0],
        "INVITE": bool(args) and "@" in args[0],
        "DEL": len(args) == 1,
        "DISTRIBUTE": len(args) == 1,
        "REJECT": bool(args) and _TOKEN.match(args[0]) is not None,
    }.get(verb, not args and verb in ("INFO", "REVIEW", "REMIND", "MODINDEX", "INDEX", "LAST"))
    return [default] + args if missing else args


def parse_line(text, default_list=None, _nested=False) -> Command:
    """The command of one line; CommandError if the keyword is known but the rest is bad.

    A line whose first word is no keyword raises ``NotACommand``.
    ``default_list``: the list of a ``LIST-request`` address, meant where a
    command leaves out its list name.
    """
    check_line(text)
    words = text.split()
    if not words:
        raise NotACommand(text)
    verb = keyword(words[0])
    if verb is None:
        raise NotACommand(text)
    args = _fill_list(verb, words[1:], default_list)
    line = text.strip()
    if verb == "QUIET":
        if _nested or not args or keyword(args[0]) in (None, "QUIET"):
            raise CommandError(f"usage: {SYNTAX['QUIET']}")
        inner = parse_line(" ".join(args), default_list, _nested=True)
        if inner.verb in QUIET_TAKES:
            return _with(inner, line=line, quiet=True)
        return _with(inner, line=line,
                     warnings=inner.warnings + (f"QUIET ignored: it does not apply to {inner.verb}",))
    if verb == "AUTH":
        _arity(verb, args, 2, 10 ** 6)
        token = _token_arg(args[0])
        if _nested or keyword(args[1]) not in AUTH_TAKES:
            raise CommandError("AUTH carries SUBSCRIBE, SIGNOFF, ADD, DEL, INVITE or SET")
        inner = parse_line(" ".join(args[1:]), default_list, _nested=True)
        return Command("AUTH", line, token=token, inner=inner, list_name=inner.list_name)
    if verb in ("LISTS", "WHICH"):
        _arity(verb, args, 0, 0)
        return Command(verb, line)
    if verb == "HELP":
        _arity(verb, args, 0, 1)
        topic = None
        if args:
            topic = keyword(args[0])
            if topic is None:
                raise CommandError(f"no help on {_show(args[0])}")
        return Command(verb, line, topic=topic)
    if verb in ("INFO", "REVIEW", "REMIND", "MODINDEX", "INDEX", "LAST"):
        _arity(verb, args, 1, 1)
        return Command(verb, line, list_name=_list_arg(args[0]))
    if verb == "GET":
        _arity(verb, args, 2, 2)
        if not _MONTH.match(args[1]):
            raise CommandError(f"not a month (YYYY-MM): {_show(args[1])}")
        return Command(verb, line, list_name=_list_arg(args[0]), month=args[1])
    if verb == "SUBSCRIBE":
        _arity(verb, args, 1, 10 ** 6)
        return Command(verb, line, list_name=_list_arg(args[0]),
                       name=_rest(args[1:], MAX_DISPLAY_NAME, "name"))
    if verb == "SIGNOFF":
        _arity(verb, args, 1, 2)
        return Command(verb, line, list_name=_list_arg(args[0], star=True),
                       address=_address_arg(args[1]) if len(args) > 1 else None)
    if verb == "SET":
        _arity(verb, args, 2, 2)
        mode = MODES.get(args[1].upper()) if args[1].isascii() else None
        if mode is None:
            raise CommandError(f"not a reception mode: {_show(args[1])}")
        return Command(verb, line, list_name=_list_arg(args[0], star=True), mode=mode)
    if verb == "CONFIRM":
        _arity(verb, args, 1, 1)
        return Command(verb, line, token=_token_arg(args[0]))
    if verb == "DECLINE":
        _arity(verb, args, 1, 10 ** 6)
        return Command(verb, line, token=_token_arg(args[0]),
                       reason=_rest(args[1:], MAX_REASON, "reason"))
    if verb in ("ADD", "INVITE"):
        _arity(verb, args, 2, 10 ** 6)
        return Command(verb, line, list_name=_list_arg(args[0]),
                       address=_address_arg(args[1]),
                       name=_rest(args[2:], MAX_DISPLAY_NAME, "name"))
    if verb == "DEL":
        _arity(verb, args, 2, 2)
        return Command(verb, line, list_name=_list_arg(args[0]), address=_address_arg(args[1]))
    if verb == "DISTRIBUTE":
        _arity(verb, args, 2, 2)
        return Command(verb, line, list_name=_list_arg(args[0]),
                       token=_token_arg(args[1], "key"))
    if verb == "REJECT":
        _arity(verb, args, 2, 10 ** 6)
        return Command(verb, line, list_name=_list_arg(args[0]),
                       token=_token_arg(args[1], "key"),
                       reason=_rest(args[2:], MAX_REASON, "reason"))
    raise AssertionError(verb)   # every keyword is handled above


def _with(cmd, **changes):
    return replace(cmd, **changes)


# -- the subject ---------------------------------------------------------------------------

def strip_prefixes(subject) -> str:
    """A subject without its reply/forward prefixes (any number, bounded)."""
    text = subject.strip()
    for _ in range(MAX_PREFIXES):
        m = _PREFIX.match(text)
        if not m:
            break
        text = text[m.end():]
    return text.strip()


def subject_command(msg, default_list=None):
    """The Subject's command: None when the subject is not one, else Command or LineError."""
    raw = raw_header(msg, "Subject", limit=4 * MAX_LINE_OCTETS)
    if raw is None:
        return None
    decoded = decoded_header(raw)
    text = strip_prefixes(decoded)
    # Words are split on white space only here: a control character inside the
    # first word still makes it "not a keyword", one after it an error below.
    first = text.split(None, 1)[0] if text.split(None, 1) else ""
    if keyword(first) is None:
        return None
    try:
        check_line(decoded)     # before stripping, as for body lines
        return parse_line(text, default_list)
    except NotACommand:
        return None
    except CommandError as e:
        return LineError.of(text, str(e), 0)


# -- the body ------------------------------------------------------------------------------

class _TextOfHTML(HTMLParser):
    """Text of an HTML part: tags dropped, line breaks where blocks end."""

    _BREAKS = frozenset({"br", "p", "div", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6",
                         "pre", "blockquote", "table", "ul", "ol"})

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.out = []
        self._skip = 0

    def handle_starttag(self, tag, attrs):
        if tag in ("script", "style", "head", "title"):
            self._skip += 1
        elif tag in self._BREAKS:
            self.out.append("\n")

    def handle_endtag(self, tag):
        if tag in ("script", "style", "head", "title"):
            self._skip = max(0, self._skip - 1)
        elif tag in self._BREAKS:
            self.out.append("\n")

    def handle_data(self, data):
        if not self._skip:
            self.out.append(data)


def html_to_text(markup) -> str:
    parser = _TextOfHTML()
    try:
        parser.feed(markup[:MAX_BODY_CHARS])
        parser.close()
    except Exception:   # broken markup: take what was read
        pass
    # convert_charrefs already turned &amp; and friends into characters.
    return "".join(parser.out).replace("\xa0", " ")


def _part_text(part):
    payload = part.get_payload(decode=True)
    if payload is None:
        return ""
    payload = payload[:4 * MAX_BODY_CHARS]
    charset = part.get_content_charset() or "us-ascii"
    try:
        return payload.decode(charset, "replace")
    except LookupError:   # unknown charset name
        return payload.decode("utf-8", "replace")


def _leaves(msg):
    """The non-multipart parts in order, at most MAX_PARTS looked at, attached mails not entered."""
    stack = [msg]
    seen = 0
    while stack and seen < MAX_PARTS:
        part = stack.pop()
        seen += 1
        if part.is_multipart() and part.get_content_maintype() == "multipart":
            payload = part.get_payload()
            if isinstance(payload, list):
                stack.extend(reversed(payload[:MAX_PARTS]))
            continue
        yield part


def body_text(msg):
    """(text, other_parts_ignored) of the body: first text/plain, else first text/html.

    A forwarded mail (``message/rfc822``) is one part, never read into: its
    text is someone else's.
    """
    plain = markup = None
    leaves = 0
    for part in _leaves(msg):
        leaves += 1
        ctype = part.get_content_type()
        if (part.get_content_disposition() or "") == "attachment":
            continue
        if ctype == "text/plain" and plain is None:
            plain = part
        elif ctype == "text/html" and markup is None:
            markup = part
    chosen = plain if plain is not None else markup
    if chosen is None:
        return "", leaves > 0
    text = _part_text(chosen)
    if chosen is markup:
        text = html_to_text(text)
    # The HTML twin of the plain text (multipart/alternative) is not "another part".
    expected = 2 if plain is not None and markup is not None else 1
    return text[:MAX_BODY_CHARS], leaves > expected


def _lines(text):
    # Split on LF only: str.splitlines would also split on form feeds and other
    # separators and so hide control characters inside a line.
    for line in text.split("\n"):
        yield line[:-1] if line.endswith("\r") else line


def _is_signature(line):
    return line in ("-- ", "--")


def _count_rest(lines):
    count = 0
    for line in lines:
        stripped = line.strip()
        if _is_signature(line) or stripped == "--":
            break
        if stripped:
            count += 1
    return count


def parse_body(text, default_list=None) -> ParseResult:
    """The commands of a body text (section 1.1 steps 4 to 6)."""
    result = ParseResult()
    lines = _lines(text)
    examined = 0
    commands = 0
    for lineno, raw in enumerate(lines, 1):
        if _is_signature(raw):
            return _finish(result, commands)
        try:
            # Before any stripping: str.strip() would eat a trailing form feed.
            check_line(raw)
        except CommandError as e:
            examined += 1
            result.items.append(LineError.of(raw.strip(" \t"), str(e), lineno))
            if examined >= MAX_LINES:
                return _at_limit(result, lines)
            continue
        line = raw.strip()
        if line.startswith(">"):
            line = line[1:].strip()    # one quote marker only
        if not line or line.startswith("#"):
            if line:
                examined += 1
            if examined >= MAX_LINES:
                return _at_limit(result, lines)
            continue
        if line == "--":
            return _finish(result, commands)
        examined += 1
        if is_stop_word(line.split(None, 1)[0]):
            return _finish(result, commands)
        try:
            cmd = parse_line(line, default_list)
        except NotACommand:
            if result.items:
                result.not_understood = line
            else:
                result.no_command = True
            result.ignored_lines = _count_rest(lines)
            return result
        except CommandError as e:
            result.items.append(LineError.of(line, str(e), lineno))
        else:
            result.items.append(cmd)
            commands += 1
        if commands >= MAX_COMMANDS or examined >= MAX_LINES:
            return _at_limit(result, lines)
    return _finish(result, commands)


def _finish(result, commands):
    if not result.items and result.not_understood is None:
        result.no_command = True
    return result


def _at_limit(result, lines):
    result.ignored_lines = _count_rest(lines)
    if result.ignored_lines:
        result.notes.append(f"At most {MAX_COMMANDS} commands and {MAX_LINES} lines are read "
                            "from one mail.")
    return _finish(result, 0)


def parse_message(msg, default_list=None) -> ParseResult:
    """The commands of a mail to the robot or to ``LIST-request`` (section 1.1 steps 2 to 6).

    ``msg`` is an ``email.message.Message`` (any policy). The caller has already
    asked ``replies.drop_reason``. ``default_list``: LIST for mail to
    ``LIST-request`` (a command without a list name means LIST), else None.
    """
    if default_list is not None and not LIST_NAME.match(default_list):
        raise ValueError("not a list name")
    subject = subject_command(msg, default_list)
    if subject is not None:
        return ParseResult(items=[subject], from_subject=True)
    text, others = body_text(msg)
    result = parse_body(text, default_list)
    if others:
        result.notes.insert(0, "Only the first text part was read; other parts were ignored.")
    return result


def report_parse(parsed, results):
    """Put what parsing found into a ``replies.Results``: syntax errors, the line not
    understood, "no command found" with a short help, ignored lines and notes.

    The commands themselves are the caller's to execute and report; so are
    their ``warnings`` (e.g. QUIET ignored), which go with their outcome.
    """
    for item in parsed.items:
        if isinstance(item, LineError):
            results.add(replies.ERRORS, item.line, item.reason)
    if parsed.not_understood is not None:
        results.add(replies.ERRORS, parsed.not_understood,
                    "not understood: reading stopped here")
    if parsed.no_command:
        results.note("No command found. Commands are one per line, for example:\n"
                     + "\n".join("  " + s for s in SHORT_HELP))
    for note in parsed.notes:
        results.note(note)
    results.ignored_lines += parsed.ignored_lines
    return results


# -- commands sent to the posting address (section 4.2) ----------------------------------

_MISADDRESSED = re.compile(
    r"^(?:(subscribe|unsubscribe|signoff)(?:\s+(\S+))?|set\s+(\S+)\s+(?:mail|nomail|digest))$",
    re.IGNORECASE)


def misaddressed(msg, list_name) -> str | None:
    """What a post to LIST@ really asks for: "subscribe", "unsubscribe", "set" or None.

    A command is a Subject (reply prefixes stripped) that is only ``subscribe``,
    ``unsubscribe`` or ``signoff`` (optionally with this list's name) or ``set
    LIST mail|nomail|digest``, or such a first non-blank line in a body of at
    most 5 non-blank lines. The post is then not distributed and the author is
    pointed to ``LIST-subscribe@``, ``LIST-unsubscribe@`` or (for "set")
    ``LIST-request@``.
    """
    def kind(text):
        m = _MISADDRESSED.match(" ".join(text.split()))
        if not m:
            return None
        named = m.group(2) or m.group(3)
        if named is not None and named.lower() != list_name.lower():
            return None
        if m.group(3) is not None:
            return "set"
        return "subscribe" if m.group(1).lower() == "subscribe" else "unsubscribe"

    subject = raw_header(msg, "Subject", limit=4 * MAX_LINE_OCTETS)
    if subject is not None:
        found = kind(strip_prefixes(decoded_header(subject)))
        if found:
            return found
    text, _ = body_text(msg)
    lines = []
    for line in _lines(text[:64 * 1024]):
        if _is_signature(line):
            break
        if line.strip():
            lines.append(line.strip())
            if len(lines) > 5:
                return None
    return kind(lines[0]) if lines else None
