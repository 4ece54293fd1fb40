"""Authorization scenarios: who may post, subscribe, review... on a list.

A scenario is a small text file named ``OPERATION.NAME`` (``send.private``)
holding rules, one per line::

    title members only
    # a comment
    is_subscriber([listname],[sender])  smtp,dkim,md5,smime  ->  do_it
    true()                              smtp,dkim,md5,smime  ->  reject(reason='members_only')

The text is read by a parser of our own into a tree of plain objects (never
``eval``): a condition with its arguments, the authentication methods the
rule accepts, and an action with its modifiers. Everything is bounded (file
size, line length, rule count, argument pieces, regular expression length
and shape), and a file that does not compile still yields a `Scenario`
that rejects every request (fail closed), carrying the error as
``name:line: problem`` so the listmaster can be told.

Evaluation walks the rules top to bottom: the first rule whose method list
holds the request's method and whose condition is true decides; no match
is a reject (default deny). Facts about the request and membership
questions come from an `IScenarioContext`, whose methods may answer at once
or with a Deferred (the list tables live in SQLite behind a thread).

`ScenarioLibrary` finds ``OPERATION.NAME`` in a list's own folders first,
then in site folders, then among the files shipped in ``scenari/``, and
caches what it compiled.
"""

from __future__ import annotations

import email.utils
import ipaddress
import os
import re
from email.header import decode_header, make_header

from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import Attribute, Interface, implementer

log = Logger()

# Bounds on what a scenario file may hold.
MAX_FILE_BYTES = 64 * 1024
MAX_LINE = 1000
MAX_RULES = 200            # in one compiled scenario, includes counted
MAX_INCLUDE_DEPTH = 4
MAX_PIECES = 8             # variables and literal runs glued into one argument
MAX_LITERAL = 256
MAX_REGEX = 256
MAX_REPEATS = 2            # repeating quantifiers (* + {n,m}) in one regex
MAX_OPTIONALS = 4          # ? quantifiers in one regex
MAX_BRACE = 100            # largest bound in {n,m}
# Bounds on what a message contributes to a condition.
MAX_VALUE = 998            # one header line (RFC 5322 2.1.1)
MAX_HEADER_VALUES = 50
MAX_PARTS = 100

# Strongest last: a request is authenticated by one method, the strongest
# that applies (lists.md 2.3).
METHODS = ("smtp", "dkim", "md5", "smime")
_STRENGTH = {m: i for i, m in enumerate(METHODS)}

# Which operation may use which action (lists.md 2.4); do_it and reject
# are allowed everywhere.
OPERATIONS = ("send", "subscribe", "unsubscribe", "review", "info", "visibility", "add",
              "del", "invite", "remind", "archive_mail_access", "create_list")
_REQUEST_AUTH_OPS = frozenset(("send", "subscribe", "unsubscribe", "review", "add", "del",
                               "invite", "remind"))
_ACTION_OPS = {
    "do_it": frozenset(OPERATIONS),
    "reject": frozenset(OPERATIONS),
    "request_auth": _REQUEST_AUTH_OPS,
    "owner": frozenset(("subscribe", "unsubscribe")),
    "editorkey": frozenset(("send",)),
    "editor": frozenset(("send",)),
    "listmaster": frozenset(("create_list",)),
}
MODIFIERS = ("quiet", "notify")

# The scenario each operation uses unless the list chose another: the
# appliance's safer defaults (lists.md 2.7).
DEFAULTS = {
    "send": "private_auth",
    "subscribe": "auth",
    "unsubscribe": "auth_dkim",
    "add": "auth_dkim",
    "del": "auth_dkim",
    "review": "owner",
    "info": "open",
    "visibility": "conceal",
    "invite": "private",
    "remind": "owner",
    "archive_mail_access": "private",
}

SHIPPED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "scenari")

_NAME = re.compile(r"^[a-z][a-z0-9_]{0,40}$")
_INCLUDE_NAME = re.compile(r"^[a-z][a-z0-9_]{0,40}(\.[a-z][a-z0-9_]{0,40}){0,2}$")
_HEADER_FIELD = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]{0,75}$")
_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,39}$")
_TEMPLATE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")
_FILTER = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def strongest(methods):
    """The strongest of the methods that vouch for a request (smime > md5 > dkim > smtp);
    ``smtp`` when none is given."""
    best = "smtp"
    for m in methods:
        if m not in _STRENGTH:
            raise ValueError(f"unknown authentication method {m!r}")
        if _STRENGTH[m] > _STRENGTH[best]:
            best = m
    return best


class ScenarioError(ValueError):
    """A scenario file that does not compile; ``str()`` is ``name:line: problem``."""

    def __init__(self, name, line, problem):
        self.name, self.line, self.problem = name, line, problem
        super().__init__(f"{name}:{line}: {problem}")


class IScenarioContext(Interface):
    """The facts of one request, as a scenario sees them.

    Attributes are plain values. Methods may return their answer or a
    Deferred firing with it; an exception (or failure) in one makes the
    rule being tried a runtime error, and the request is rejected.
    Addresses are passed as written in the request; implementations
    compare them case-insensitively.
    """

    operation = Attribute("the operation asked for: 'send', 'subscribe', ... (OPERATIONS)")
    sender = Attribute("the single mailbox of From (or the web user), or None when there is none")
    email = Attribute("the target address of subscribe/unsubscribe/add/del/invite, or None")
    listname = Attribute("the list's local name, e.g. 'team'")
    domain = Attribute("the list's domain, e.g. 'lists.example.org'")
    auth_method = Attribute("the strongest method vouching for the request: one of METHODS")
    remote_addr = Attribute("the client IP of a web request as text; None for mail")
    message = Attribute("the email.message.Message of a post or command mail, or None")

    def now():
        """The current time, seconds since the epoch."""

    def variable(namespace, key):
        """The value of ``[namespace->key]`` for namespace ``list``, ``subscriber``
        (the sender's membership), ``user``, ``custom_vars`` or ``env``: a string,
        a number, a list of strings, or None when unknown. ``("list", "status")``
        is asked before every send and visibility decision: anything but None or
        ``"open"`` rejects them (lists.md 2.5)."""

    def is_subscriber(list_address, address):
        """Whether address is a member of the list ``name@domain``."""

    def is_owner(list_address, address):
        """Whether address is an owner of the list ``name@domain``."""

    def is_editor(list_address, address):
        """Whether address is a moderator of the list ``name@domain``."""

    def is_listmaster(address):
        """Whether address is a listmaster of the site."""

    def search(filter_name, value):
        """Whether value is matched by the named filter (lists.md 2.2 ``search``)."""


class Decision:
    """What a scenario decided for one request.

    ``action`` is one of ``do_it``, ``reject``, ``request_auth``, ``owner``,
    ``editorkey``, ``editor``, ``listmaster``; ``modifiers`` a frozenset of
    ``quiet`` / ``notify``; ``reason`` the explanation key and ``tt2`` the
    reply template of a reject (either may be None); ``auth_target`` is
    ``'sender'`` or ``'email'`` for request_auth (whom the token is mailed
    to), else None. ``rule`` names the deciding rule (``send.private:3``)
    for the log, None on default deny; ``error`` is set when the reject
    comes from a file that did not compile or a condition that failed at
    run time (the listmaster should hear of it); ``default`` is True when
    no rule matched.
    """

    __slots__ = ("action", "modifiers", "reason", "tt2", "auth_target", "rule", "error",
                 "default", "auth_method")

    def __init__(self, action, modifiers=frozenset(), reason=None, tt2=None, auth_target=None,
                 rule=None, error=None, default=False, auth_method=None):
        self.action = action
        self.modifiers = frozenset(modifiers)
        self.reason = reason
        self.tt2 = tt2
        self.auth_target = auth_target
        self.rule = rule
        self.error = error
        self.default = default
        self.auth_method = auth_method

    @property
    def quiet(self):
        return "quiet" in self.modifiers

    @property
    def notify(self):
        return "notify" in self.modifiers

    def __repr__(self):
        parts = [self.action] + sorted(self.modifiers)
        extra = "".join(f" {k}={getattr(self, k)!r}" for k in ("reason", "tt2", "auth_target",
                                                              "rule", "error")
                        if getattr(self, k) is not None)
        return f"<Decision {','.join(parts)}{extra}{' default' if self.default else ''}>"


# ---------------------------------------------------------------- the tree

class Var:
    """A variable reference ``[name]``, ``[name->key]`` or ``[msg_header->F][i]``."""

    __slots__ = ("name", "key", "index")

    # name -> whether it takes a ->key
    KNOWN = {"sender": False, "email": False, "listname": False, "domain": False,
             "msg_header": True, "msg_part": True, "msg_encrypted": False, "is_bcc": False,
             "list": True, "subscriber": True, "user": True, "custom_vars": True,
             "date": False, "current_date": False, "env": True}

    def __init__(self, name, key=None, index=None):
        self.name, self.key, self.index = name, key, index

    @property
    def multi(self):
        """Whether the value is a list (every header of a name, every part type)."""
        return (self.name == "msg_header" and self.index is None) or self.name == "msg_part"

    def __repr__(self):
        key = f"->{self.key}" if self.key is not None else ""
        idx = f"[{self.index}]" if self.index is not None else ""
        return f"[{self.name}{key}]{idx}"


class Regex:
    """A ``/.../`` argument of match; ``[domain]`` in it stands for the list domain."""

    __slots__ = ("source", "_cache")

    def __init__(self, source):
        self.source = source
        self._cache = {}

    def compiled(self, domain):
        pattern = self._cache.get(domain)
        if pattern is None:
            if len(self._cache) > 16:
                self._cache.clear()
            pattern = re.compile(self.source.replace("[domain]", re.escape(domain or "")),
                                 re.IGNORECASE)
            self._cache[domain] = pattern
        return pattern

    def __repr__(self):
        return f"/{self.source}/"


class Arg:
    """One condition argument: a quoted literal, a regex, or variables and bare text glued."""

    __slots__ = ("pieces", "regex")

    def __init__(self, pieces=(), regex=None):
        self.pieces = tuple(pieces)     # str literals and Var
        self.regex = regex

    @property
    def literal(self):
        """The text when the argument holds no variable, else None."""
        if self.regex is None and all(isinstance(p, str) for p in self.pieces):
            return "".join(self.pieces)
        return None


class Condition:
    """``[!]name(args)``."""

    __slots__ = ("name", "args", "negate")

    def __init__(self, name, args, negate=False):
        self.name, self.args, self.negate = name, tuple(args), negate


class Action:
    """``action[(param)][,modifier...]``."""

    __slots__ = ("name", "reason", "tt2", "auth_target", "modifiers")

    def __init__(self, name, reason=None, tt2=None, auth_target=None, modifiers=frozenset()):
        self.name, self.reason, self.tt2 = name, reason, tt2
        self.auth_target = auth_target
        self.modifiers = frozenset(modifiers)


class Rule:
    """One line: condition, accepted methods, action; ``where`` is ``file:line``."""

    __slots__ = ("condition", "methods", "action", "where", "text")

    def __init__(self, condition, methods, action, where, text):
        self.condition, self.methods, self.action = condition, frozenset(methods), action
        self.where, self.text = where, text


# ---------------------------------------------------------------- the parser

# condition name -> (number of arguments, whether argument 2 is a regex)
_CONDITIONS = {
    "true": 0, "all": 0, "equal": 2, "match": 2, "is_subscriber": 2, "is_owner": 2,
    "is_editor": 2, "is_listmaster": 1, "less_than": 2, "older": 2, "newer": 2,
    "search": 2, "verify_netmask": 1,
}
_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_VARIABLE = re.compile(r"\[([a-z_]+)(?:->([^\]\s]{1,80}))?\](?:\[(-?\d{1,3})\])?")
_BARE_STOP = set(",()[]'\"") | set(" \t")


class _Line:
    """A cursor over one line of a scenario file; errors carry the file and line."""

    def __init__(self, text, name, lineno):
        self.s, self.i, self.name, self.lineno = text, 0, name, lineno

    def fail(self, problem):
        raise ScenarioError(self.name, self.lineno, problem)

    def peek(self, n=1):
        return self.s[self.i:self.i + n]

    def at_end(self):
        return self.i >= len(self.s)

    def skip_ws(self):
        while self.i < len(self.s) and self.s[self.i] in " \t":
            self.i += 1

    def expect(self, text, what):
        if not self.s.startswith(text, self.i):
            got = self.s[self.i:self.i + 12] or "end of line"
            self.fail(f"expected {what}, found {got!r}")
        self.i += len(text)

    def word(self, what):
        m = _WORD.match(self.s, self.i)
        if not m:
            self.fail(f"expected {what}, found {self.s[self.i:self.i + 12] or 'end of line'!r}")
        self.i = m.end()
        return m.group(0)

    # -- conditions

    def condition(self):
        negate = False
        if self.peek() == "!":
            negate = True
            self.i += 1
            self.skip_ws()
        name = self.word("a condition")
        if name == "custom":
            self.fail("custom conditions are not supported")
        if name not in _CONDITIONS:
            self.fail(f"unknown condition {name!r}")
        self.skip_ws()
        self.expect("(", f"'(' after {name}")
        args = []
        self.skip_ws()
        if self.peek() != ")":
            while True:
                if len(args) >= 4:
                    self.fail(f"too many arguments to {name}")
                args.append(self.argument(name, len(args)))
                self.skip_ws()
                if self.peek() == ",":
                    self.i += 1
                    continue
                break
        self.expect(")", f"',' or ')' in {name}(...)")
        want = _CONDITIONS[name]
        if len(args) != want:
            self.fail(f"{name} takes {want} argument{'s' if want != 1 else ''}, not {len(args)}")
        self.check_args(name, args)
        return Condition(name, args, negate)

    def check_args(self, name, args):
        for n, arg in enumerate(args):
            if arg.regex is not None and not (name == "match" and n == 1):
                self.fail("a /regular expression/ is only allowed as match's second argument")
        if name == "match" and args[1].regex is None:
            self.fail("match needs a /regular expression/ as its second argument")
        if name in ("is_subscriber", "is_owner", "is_editor") and args[0].pieces and \
                any(isinstance(p, Var) and p.multi for p in args[0].pieces):
            self.fail(f"{name}: the list must be a single value")
        if name == "search":
            lit = args[0].literal
            if lit is None or not _FILTER.match(lit):
                self.fail("search: the filter must be a plain name")
        if name == "verify_netmask" and args[0].literal is not None:
            try:
                ipaddress.ip_network(args[0].literal, strict=False)
            except ValueError:
                self.fail(f"verify_netmask: {args[0].literal!r} is not a network")

    def argument(self, cond, position):
        self.skip_ws()
        c = self.peek()
        if c in ("'", '"'):
            return Arg([self.quoted()])
        if c == "/":
            return Arg(regex=self.regex())
        pieces = []
        while not self.at_end():
            c = self.peek()
            if c == "[":
                pieces.append(self.variable())
            elif c not in _BARE_STOP:
                start = self.i
                while not self.at_end() and self.s[self.i] not in _BARE_STOP:
                    self.i += 1
                text = self.s[start:self.i]
                if len(text) > MAX_LITERAL:
                    self.fail("literal too long")
                pieces.append(text)
            else:
                break
            if len(pieces) > MAX_PIECES:
                self.fail("argument has too many pieces")
        if not pieces:
            self.fail(f"expected an argument to {cond}")
        if len(pieces) > 1 and any(isinstance(p, Var) and p.multi for p in pieces):
            self.fail("a many-valued variable must stand alone in an argument")
        return Arg(pieces)

    def quoted(self):
        q = self.s[self.i]
        end = self.s.find(q, self.i + 1)
        if end < 0:
            self.fail("unterminated quoted string")
        text = self.s[self.i + 1:end]
        if len(text) > MAX_LITERAL:
            self.fail("literal too long")
        self.i = end + 1
        return text

    def regex(self):
        j = self.i + 1
        out = []
        while j < len(self.s) and self.s[j] != "/":
            if self.s[j] == "\\" and j + 1 < len(self.s):
                if self.s[j + 1] == "/":
                    out.append("/")
                else:
                    out.append(self.s[j:j + 2])
                j += 2
            else:
                out.append(self.s[j])
                j += 1
        if j >= len(self.s):
            self.fail("unterminated /regular expression/")
        source = "".join(out)
        self.i = j + 1
        problem = regex_problem(source)
        if problem:
            self.fail(problem)
        return Regex(source)

    def variable(self):
        m = _VARIABLE.match(self.s, self.i)
        if not m:
            self.fail(f"bad variable {self.s[self.i:self.i + 20]!r}")
        name, key, index = m.group(1), m.group(2), m.group(3)
        if name not in Var.KNOWN:
            self.fail(f"unknown variable [{name}]")
        if Var.KNOWN[name] and key is None:
            self.fail(f"[{name}] needs a ->key")
        if not Var.KNOWN[name] and key is not None:
            self.fail(f"[{name}] takes no ->key")
        if name == "msg_header":
            if not _HEADER_FIELD.match(key):
                self.fail(f"bad header field name {key!r}")
        elif key is not None:
            if name == "msg_part" and key != "type":
                self.fail("[msg_part->...] knows only 'type'")
            if not _KEY.match(key):
                self.fail(f"bad key {key!r}")
        if index is not None and name != "msg_header":
            self.fail("only [msg_header->...] takes an [index]")
        self.i = m.end()
        return Var(name, key, int(index) if index is not None else None)

    # -- methods and actions

    def methods(self):
        self.skip_ws()
        found = []
        while not self.s.startswith("->", self.i):
            if found:
                self.skip_ws()
                self.expect(",", "',' between methods or '->'")
                self.skip_ws()
            m = self.word("an authentication method or '->'")
            if m not in _STRENGTH:
                self.fail(f"unknown authentication method {m!r}")
            found.append(m)
            self.skip_ws()
            if len(found) > 8:
                self.fail("too many methods")
        self.i += 2
        return found or ["smtp"]

    def action(self, operation):
        self.skip_ws()
        name = self.word("an action")
        if name not in _ACTION_OPS:
            self.fail(f"unknown action {name!r}")
        if operation not in _ACTION_OPS[name]:
            self.fail(f"action {name!r} is not allowed for {operation}")
        reason = tt2 = None
        target = "sender" if name == "request_auth" else None
        self.skip_ws()
        if self.peek() == "(":
            self.i += 1
            self.skip_ws()
            if name == "reject":
                param = self.word("reason= or tt2=")
                if param not in ("reason", "tt2"):
                    self.fail(f"reject takes reason= or tt2=, not {param}=")
                self.skip_ws()
                self.expect("=", "'='")
                self.skip_ws()
                if self.peek() not in ("'", '"'):
                    self.fail(f"{param}= needs a quoted value")
                value = self.quoted()
                if not _TEMPLATE.match(value):
                    self.fail(f"bad {param} {value!r}")
                if param == "reason":
                    reason = value
                else:
                    tt2 = value
            elif name == "request_auth":
                v = self.variable()
                if v.name not in ("email", "sender") or v.index is not None:
                    self.fail("request_auth takes [email] or [sender]")
                target = v.name
            else:
                self.fail(f"{name} takes no parameter")
            self.skip_ws()
            self.expect(")", "')'")
        modifiers = set()
        while True:
            self.skip_ws()
            if self.at_end() or self.peek() == "#":
                break
            self.expect(",", "',' before a modifier, or end of line")
            self.skip_ws()
            mod = self.word("a modifier")
            if mod not in MODIFIERS:
                self.fail(f"unknown modifier {mod!r}")
            if mod == "notify" and name != "do_it":
                self.fail("notify goes with do_it only")
            modifiers.add(mod)
        return Action(name, reason, tt2, target, modifiers)


_QUANT_BRACE = re.compile(r"\{(\d{1,4})(,(\d{0,4}))?\}")


def regex_problem(source):
    """Why a match regex is refused, or None.

    Python's ``re`` backtracks without a time limit, so we accept only
    shapes whose worst case stays small on a 998-character value: no
    backreferences or look-arounds, no quantified group that itself holds a
    quantifier or an alternation, at most two repeating quantifiers and
    four ``?``.
    """
    if len(source) > MAX_REGEX:
        return f"regular expression longer than {MAX_REGEX} characters"
    if _CONTROL.search(source):
        return "control character in regular expression"
    groups = [[False, False]]    # per open group: holds a quantifier, holds an alternation
    last = None                  # None, "atom", "quant" or a closed group's flags
    repeats = optionals = 0
    i, n = 0, len(source)
    while i < n:
        c = source[i]
        if c == "\\":
            if i + 1 >= n:
                return "regular expression ends with a backslash"
            nxt = source[i + 1]
            if nxt.isdigit() and nxt != "0" or nxt in "gk":
                return "backreferences are not allowed in a regular expression"
            i += 2
            last = "atom"
        elif c == "[":
            j = i + 1
            if j < n and source[j] == "^":
                j += 1
            if j < n and source[j] == "]":
                j += 1
            while j < n and source[j] != "]":
                j += 2 if source[j] == "\\" else 1
            if j >= n:
                return "unterminated [ in regular expression"
            i = j + 1
            last = "atom"
        elif c == "(":
            if source.startswith("(?", i):
                if not source.startswith("(?:", i):
                    return "only (?:...) groups are allowed in a regular expression"
                i += 3
            else:
                i += 1
            groups.append([False, False])
            last = None
        elif c == ")":
            if len(groups) == 1:
                return "unbalanced ) in regular expression"
            flags = groups.pop()
            groups[-1][0] |= flags[0]
            groups[-1][1] |= flags[1]
            last = flags
            i += 1
        elif c == "|":
            groups[-1][1] = True
            last = None
            i += 1
        elif c in "*+?" or (c == "{" and _QUANT_BRACE.match(source, i)):
            if last is None or last == "quant":
                return "misplaced quantifier in regular expression"
            if c == "{":
                m = _QUANT_BRACE.match(source, i)
                lo = int(m.group(1))
                hi = lo if m.group(2) is None else (int(m.group(3)) if m.group(3) else None)
                if lo > MAX_BRACE or (hi is not None and hi > MAX_BRACE):
                    return f"repetition bound above {MAX_BRACE} in regular expression"
                if hi is not None and hi < lo:
                    return "bad repetition bounds in regular expression"
                i = m.end()
                repeating = hi is None or hi > 1
            else:
                i += 1
                repeating = c != "?"
            # (x*)? is harmless; (x*)* and (a|a)* backtrack exponentially.
            if repeating and isinstance(last, list) and (last[0] or last[1]):
                return "nested repetition in regular expression (catastrophic backtracking)"
            if repeating:
                repeats += 1
            else:
                optionals += 1
            if i < n and source[i] in "?+":
                i += 1          # lazy or possessive
            groups[-1][0] = True
            last = "quant"
        else:
            i += 1
            last = "atom"
    if len(groups) != 1:
        return "unbalanced ( in regular expression"
    if repeats > MAX_REPEATS:
        return f"more than {MAX_REPEATS} repeating quantifiers in regular expression"
    if optionals > MAX_OPTIONALS:
        return f"more than {MAX_OPTIONALS} optional parts in regular expression"
    try:
        re.compile(source.replace("[domain]", "example\\.org"), re.IGNORECASE)
    except re.error as e:
        return f"bad regular expression: {e}"
    return None


def _split_name(name):
    operation, dot, rest = name.partition(".")
    return operation, rest


def _decode_text(data, name):
    if isinstance(data, bytes):
        if len(data) > MAX_FILE_BYTES:
            raise ScenarioError(name, 0, f"file larger than {MAX_FILE_BYTES} bytes")
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError as e:
            line = data[:e.start].count(b"\n") + 1
            raise ScenarioError(name, line, "not valid UTF-8") from None
    elif len(data) > MAX_FILE_BYTES:
        raise ScenarioError(name, 0, f"file larger than {MAX_FILE_BYTES} bytes")
    return data


def _compile_file(text, name, operation, resolve_include, depth, budget, seen):
    """Rules of one file (includes spliced), and its title lines."""
    text = _decode_text(text, name)
    rules, titles = [], []
    own = []                     # this file's own rules, for the dkim compatibility rule
    mentions_dkim = False
    for lineno, raw in enumerate(text.split("\n"), 1):
        line = raw.rstrip("\r")
        if len(line) > MAX_LINE:
            raise ScenarioError(name, lineno, f"line longer than {MAX_LINE} characters")
        if _CONTROL.search(line):
            raise ScenarioError(name, lineno, "control character")
        stripped = line.strip(" \t")
        if not stripped or stripped.startswith("#"):
            continue
        if re.match(r"title(\.[A-Za-z_-]{1,20})?([ \t]|$)", stripped):
            if not stripped.startswith("title."):
                titles.append(stripped[5:].strip())
            continue
        cur = _Line(stripped, name, lineno)
        m = re.match(r"include(?:[ \t]*\(([^)]*)\)|[ \t]+(\S+))[ \t]*$", stripped)
        if m:
            target = (m.group(1) if m.group(1) is not None else m.group(2)).strip()
            if not _INCLUDE_NAME.match(target):
                cur.fail(f"bad include name {target!r}")
            if "." not in target:
                target = f"{operation}.{target}"
            if depth >= MAX_INCLUDE_DEPTH:
                cur.fail("includes nested too deep")
            if target in seen:
                cur.fail(f"include loop through {target}")
            found = resolve_include(target) if resolve_include is not None else None
            if found is None:
                cur.fail(f"included scenario {target} not found")
            sub, _ = _compile_file(found, target, operation, resolve_include, depth + 1,
                                   budget, seen | {target})
            rules.extend(sub)
            continue
        condition = cur.condition()
        methods = cur.methods()
        if "dkim" in methods:
            mentions_dkim = True
        action = cur.action(operation)
        budget[0] += 1
        if budget[0] > MAX_RULES:
            cur.fail(f"more than {MAX_RULES} rules")
        rule = Rule(condition, methods, action, f"{name}:{lineno}", stripped)
        rules.append(rule)
        own.append(rule)
    if not mentions_dkim:
        # lists.md 2.3: a file that never names dkim lets it pass wherever smtp
        # passes, so signed mail is never treated worse than unsigned mail.
        for rule in own:
            if "smtp" in rule.methods:
                rule.methods = rule.methods | {"dkim"}
    return rules, titles


def compile_scenario(text, name, resolve_include=None):
    """Compile the text (str or bytes) of the scenario file ``name`` (``OPERATION.NAME``).

    ``resolve_include(file_name)`` returns the text of another file (for
    ``include(...)`` and the ``include.OPERATION.header`` prepended to every
    scenario), or None when there is none. Raises `ScenarioError`.
    """
    operation, rest = _split_name(name)
    if operation not in OPERATIONS or not rest:
        raise ScenarioError(name, 0, "the name must be OPERATION.NAME with a known operation")
    budget = [0]
    rules = []
    header = f"include.{operation}.header"
    if resolve_include is not None and name != header:
        found = resolve_include(header)
        if found is not None:
            rules, _ = _compile_file(found, header, operation, resolve_include, 1, budget,
                                     frozenset((name, header)))
    body, titles = _compile_file(text, name, operation, resolve_include, 0, budget,
                                 frozenset((name,)))
    return Scenario(name, rules + body, title=titles[0] if titles else "")


# ---------------------------------------------------------------- evaluation

_DURATION = re.compile(r"^(?:(\d{1,4})y)?(?:(\d{1,4})m(?!in))?(?:(\d{1,5})w)?(?:(\d{1,6})d)?"
                       r"(?:(\d{1,7})h)?(?:(\d{1,8})min)?(?:(\d{1,10})sec)?$")
_DURATION_UNITS = (365 * 86400, 30 * 86400, 7 * 86400, 86400, 3600, 60, 1)
_DATE = re.compile(r"^\s*(\d{1,12})\s*(?:([+-])\s*(\S+))?\s*$")


def duration_seconds(text):
    """``1y2m3w4d5h6min7sec`` (any part may be left out) or plain seconds, in seconds."""
    text = text.strip()
    if text.isdigit() and len(text) <= 12:
        return int(text)
    m = _DURATION.match(text)
    if not m or not text:
        raise ValueError(f"bad duration {text[:40]!r}")
    return sum(int(g) * unit for g, unit in zip(m.groups(), _DURATION_UNITS) if g)


def date_seconds(text):
    """A date argument: epoch seconds, optionally ``+DURATION`` or ``-DURATION``."""
    m = _DATE.match(text)
    if not m:
        raise ValueError(f"bad date {text[:40]!r}")
    base = int(m.group(1))
    if m.group(2):
        delta = duration_seconds(m.group(3))
        base = base + delta if m.group(2) == "+" else base - delta
    return base


class _RuntimeError(Exception):
    """A condition that could not be evaluated."""


def _cap(value):
    return value if len(value) <= MAX_VALUE else value[:MAX_VALUE]


def _header_text(value):
    """An unfolded, decoded (RFC 2047) header value, capped."""
    text = str(value)[:4 * MAX_VALUE]     # bound the decoding work as well
    try:
        text = str(make_header(decode_header(text)))
    except Exception:
        pass
    return _cap(re.sub(r"[\r\n]+[ \t]*", " ", text))


def _scalar(value):
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return _scalar(value[0]) if value else ""
    return _cap(str(value))


def _values(value):
    if isinstance(value, (list, tuple)):
        return [_scalar(v) for v in value[:MAX_HEADER_VALUES]]
    return [_scalar(value)]


class Scenario:
    """A compiled scenario: ``evaluate(context)`` decides a request.

    A scenario built with ``error`` set (a file that did not compile)
    rejects everything, the error carried in each `Decision`.
    """

    def __init__(self, name, rules=(), title="", error=None):
        self.name = name
        self.operation = _split_name(name)[0]
        self.rules = tuple(rules)
        self.title = title
        self.error = error

    @classmethod
    def failed(cls, name, error):
        """The fail-closed stand-in for a file that did not compile."""
        return cls(name, (), error=str(error))

    def __repr__(self):
        state = f"error={self.error!r}" if self.error else f"{len(self.rules)} rules"
        return f"<Scenario {self.name} {state}>"

    def evaluate(self, context, confirmed=False, blocklist=False):
        """Decide the request described by ``context`` (an `IScenarioContext`).

        ``confirmed``: the request comes back after CONFIRM/AUTH (so with
        md5); asking for confirmation again is then refused, never looped.
        ``blocklist``: try the site blocklist first (``search(blocklist,
        [sender])`` by any method -> reject,quiet). Returns a Deferred
        firing with a `Decision`; it never fails.
        """
        d = defer.ensureDeferred(self._evaluate(context, confirmed, blocklist))

        def crashed(failure):
            log.failure("scenario {name}: evaluation failed", failure, name=self.name)
            return Decision("reject", error=f"{self.name}: internal error")
        return d.addErrback(crashed)

    async def _evaluate(self, ctx, confirmed, blocklist):
        method = getattr(ctx, "auth_method", None) or "smtp"
        if method not in _STRENGTH:
            return self._reject(f"{self.name}: unknown authentication method {method!r}", method)
        if self.error is not None:
            log.error("scenario {name} does not compile, request rejected: {error}",
                      name=self.name, error=self.error)
            return Decision("reject", error=self.error, auth_method=method)
        if self.operation != getattr(ctx, "operation", self.operation):
            return self._reject(f"{self.name} used for operation {ctx.operation!r}", method)
        if self.operation in ("send", "visibility"):
            try:
                status = await defer.maybeDeferred(ctx.variable, "list", "status")
            except Exception as e:
                return self._reject(f"{self.name}: list status: {e}", method)
            if status is not None and str(status) != "open":
                return Decision("reject", reason="list_not_open", auth_method=method,
                                rule="list status")
        if blocklist and getattr(ctx, "sender", None):
            try:
                hit = await defer.maybeDeferred(ctx.search, "blocklist", ctx.sender)
            except Exception as e:
                return self._reject(f"{self.name}: blocklist: {e}", method)
            if hit:
                return Decision("reject", {"quiet"}, reason="blocklisted", auth_method=method,
                                rule="blocklist")
        for rule in self.rules:
            if method not in rule.methods:
                continue
            try:
                ok = await self._condition(rule.condition, ctx)
            except Exception as e:
                problem = e.args[0] if isinstance(e, _RuntimeError) else f"{type(e).__name__}: {e}"
                return self._reject(f"{rule.where}: {problem}", method, rule.where)
            if not ok:
                continue
            a = rule.action
            if confirmed and a.name == "request_auth":
                log.warn("scenario {rule}: confirmation asked again after CONFIRM, rejected",
                         rule=rule.where)
                return Decision("reject", reason="auth_loop", rule=rule.where,
                                auth_method=method)
            return Decision(a.name, a.modifiers, a.reason, a.tt2, a.auth_target, rule.where,
                            auth_method=method)
        log.info("scenario {name}: no rule matched ({method}), request rejected",
                 name=self.name, method=method)
        return Decision("reject", default=True, auth_method=method)

    def _reject(self, error, method, rule=None):
        log.error("scenario error, request rejected: {error}", error=error)
        return Decision("reject", error=error, rule=rule, auth_method=method)

    async def _condition(self, cond, ctx):
        value = await self._test(cond, ctx)
        return (not value) if cond.negate else bool(value)

    async def _arg(self, arg, ctx):
        """A string, or a list of strings for a lone many-valued variable."""
        if len(arg.pieces) == 1 and isinstance(arg.pieces[0], Var):
            return await self._var(arg.pieces[0], ctx)
        out = []
        for p in arg.pieces:
            out.append(p if isinstance(p, str) else _scalar(await self._var(p, ctx)))
        return _cap("".join(out))

    async def _scalar_arg(self, arg, ctx):
        return _scalar(await self._arg(arg, ctx))

    async def _list_address(self, arg, ctx):
        name = (await self._scalar_arg(arg, ctx)).strip()
        if not name:
            raise _RuntimeError("empty list name")
        return name if "@" in name else f"{name}@{ctx.domain}"

    async def _test(self, cond, ctx):
        n, args = cond.name, cond.args
        if n in ("true", "all"):
            return True
        if n == "equal":
            a = _values(await self._arg(args[0], ctx))
            b = _values(await self._arg(args[1], ctx))
            return any(x.casefold() == y.casefold() for x in a for y in b)
        if n == "match":
            pattern = args[1].regex.compiled(ctx.domain)
            return any(pattern.search(v) for v in _values(await self._arg(args[0], ctx)))
        if n in ("is_subscriber", "is_owner", "is_editor"):
            lst = await self._list_address(args[0], ctx)
            addr = (await self._scalar_arg(args[1], ctx)).strip()
            if not addr:
                return False
            return bool(await defer.maybeDeferred(getattr(ctx, n), lst, addr))
        if n == "is_listmaster":
            addr = (await self._scalar_arg(args[0], ctx)).strip()
            return bool(addr) and bool(await defer.maybeDeferred(ctx.is_listmaster, addr))
        if n == "less_than":
            a = await self._scalar_arg(args[0], ctx)
            b = await self._scalar_arg(args[1], ctx)
            try:
                return float(a) < float(b)
            except ValueError:
                return a < b
        if n in ("older", "newer"):
            try:
                a = date_seconds(await self._scalar_arg(args[0], ctx))
                b = date_seconds(await self._scalar_arg(args[1], ctx))
            except ValueError as e:
                raise _RuntimeError(f"{n}: {e}") from None
            return a <= b if n == "older" else a > b
        if n == "search":
            value = (await self._scalar_arg(args[1], ctx)).strip()
            if not value:
                return False
            return bool(await defer.maybeDeferred(ctx.search, args[0].literal, value))
        if n == "verify_netmask":
            remote = getattr(ctx, "remote_addr", None)
            if not remote:
                return False     # mail has no client address that means anything here
            try:
                net = ipaddress.ip_network(await self._scalar_arg(args[0], ctx), strict=False)
                return ipaddress.ip_address(remote) in net
            except ValueError as e:
                raise _RuntimeError(f"verify_netmask: {e}") from None
        raise _RuntimeError(f"unknown condition {n}")   # the parser lets none through

    async def _var(self, var, ctx):
        n = var.name
        if n in ("sender", "email"):
            return _scalar(getattr(ctx, n, None))
        if n == "listname":
            return _scalar(ctx.listname)
        if n == "domain":
            return _scalar(ctx.domain)
        if n == "current_date":
            return str(int(ctx.now()))
        msg = getattr(ctx, "message", None)
        if n == "date":
            if msg is not None and msg.get("Date"):
                try:
                    parsed = email.utils.parsedate_tz(str(msg.get("Date")))
                    if parsed:
                        return str(int(email.utils.mktime_tz(parsed)))
                except (TypeError, ValueError, OverflowError):
                    pass
            return str(int(ctx.now()))
        if n == "msg_header":
            values = [] if msg is None else \
                [_header_text(v) for v in (msg.get_all(var.key) or [])[:MAX_HEADER_VALUES]]
            if var.index is None:
                return values
            try:
                return values[var.index]
            except IndexError:
                return ""
        if n == "msg_part":
            if msg is None:
                return []
            types = []
            for part in msg.walk():
                types.append(part.get_content_type())
                if len(types) >= MAX_PARTS:
                    break
            return types
        if n == "msg_encrypted":
            if msg is None:
                return ""
            ctype = msg.get_content_type()
            if ctype in ("application/pkcs7-mime", "application/x-pkcs7-mime") and \
                    (msg.get_param("smime-type") or "enveloped-data").lower() != "signed-data":
                return "smime"
            if ctype == "multipart/encrypted":
                return "pgp"
            return ""
        if n == "is_bcc":
            if msg is None:
                return "0"
            list_address = f"{ctx.listname}@{ctx.domain}".casefold()
            fields = (msg.get_all("To") or []) + (msg.get_all("Cc") or [])
            shown = [_cap(str(f)) for f in fields[:MAX_HEADER_VALUES]]
            for _, addr in email.utils.getaddresses(shown):
                if addr.casefold() == list_address:
                    return "0"
            return "1"
        # list, subscriber, user, custom_vars, env
        value = await defer.maybeDeferred(ctx.variable, n, var.key)
        if isinstance(value, (list, tuple)):
            return [_scalar(v) for v in value[:MAX_HEADER_VALUES]]
        return _scalar(value)


@implementer(IScenarioContext)
class StaticScenarioContext:
    """An `IScenarioContext` over plain in-memory facts: for tests, and for
    checking a scenario from the admin command without a database."""

    def __init__(self, operation, sender, listname, domain, auth_method="smtp", email=None,
                 message=None, remote_addr=None, members=(), owners=(), editors=(),
                 listmasters=(), variables=None, filters=None, now=0):
        self.operation, self.sender, self.email = operation, sender, email
        self.listname, self.domain, self.auth_method = listname, domain, auth_method
        self.message, self.remote_addr = message, remote_addr
        self.list_address = f"{listname}@{domain}".lower()
        low = lambda xs: frozenset(x.lower() for x in xs)   # noqa: E731
        self.members, self.owners = low(members), low(owners)
        self.editors, self.listmasters = low(editors), low(listmasters)
        self.variables = dict(variables or {})      # {("list", "status"): "open"}
        self.filters = {k: low(v) for k, v in (filters or {}).items()}
        self._now = now

    def now(self):
        return self._now

    def variable(self, namespace, key):
        return self.variables.get((namespace, key))

    def _role(self, roles, list_address, address):
        if list_address.lower() != self.list_address:
            raise LookupError(f"unknown list {list_address}")
        return address.lower() in roles

    def is_subscriber(self, list_address, address):
        return self._role(self.members, list_address, address)

    def is_owner(self, list_address, address):
        return self._role(self.owners, list_address, address)

    def is_editor(self, list_address, address):
        return self._role(self.editors, list_address, address)

    def is_listmaster(self, address):
        return address.lower() in self.listmasters

    def search(self, filter_name, value):
        if filter_name not in self.filters:
            raise LookupError(f"unknown filter {filter_name}")
        return value.lower() in self.filters[filter_name]


# ---------------------------------------------------------------- the library

class ScenarioLibrary:
    """Finds, compiles and caches scenario files.

    ``OPERATION.NAME`` is looked for in the folders given for the request
    (the list's own, then its domain's), then in ``site_dirs``, then in the
    shipped ``scenari/`` folder: the first folder holding the file wins, and
    includes are resolved through the same folders. Files are small and
    local, so they are read synchronously; a compiled scenario is reused
    until one of the files it was built from changes (size or mtime).
    ``notify_listmaster(text)`` is called once per distinct compile error.
    """

    MAX_CACHED = 512

    def __init__(self, shipped_dir=SHIPPED_DIR, site_dirs=(), notify_listmaster=None):
        self.shipped_dir = shipped_dir
        self.site_dirs = tuple(site_dirs)
        self.notify_listmaster = notify_listmaster
        self._cache = {}
        self._told = set()

    @staticmethod
    def default_name(operation):
        """The scenario an operation uses when the list chose none (lists.md 2.7)."""
        return DEFAULTS.get(operation)

    def shipped_names(self, operation):
        """The names of the scenarios shipped for an operation, sorted."""
        prefix = operation + "."
        try:
            files = os.listdir(self.shipped_dir)
        except OSError:
            return []
        return sorted(f[len(prefix):] for f in files
                      if f.startswith(prefix) and _NAME.match(f[len(prefix):]))

    def _dirs(self, list_dirs):
        return tuple(d for d in tuple(list_dirs) + self.site_dirs + (self.shipped_dir,) if d)

    def _find(self, dirs, file_name):
        for d in dirs:
            path = os.path.join(d, file_name)
            try:
                st = os.stat(path)
            except OSError:
                continue
            if os.path.isfile(path):
                return path, (path, st.st_mtime_ns, st.st_size)
        return None, None

    def get(self, operation, name=None, list_dirs=()):
        """The compiled scenario ``OPERATION.NAME`` (name None: the default);
        never raises: a missing or broken file gives a fail-closed scenario."""
        if name is None:
            name = self.default_name(operation)
        full = f"{operation}.{name}"
        if operation not in OPERATIONS or not name or not _NAME.match(name):
            return self._failed(full, ScenarioError(full, 0, "no such scenario"))
        dirs = self._dirs(list_dirs)
        key = (dirs, full)
        cached = self._cache.get(key)
        if cached is not None:
            scenario, stamps = cached
            if all(self._find(dirs, f)[1] == stamp for f, stamp in stamps):
                return scenario
        stamps = []

        def read(file_name):
            path, stamp = self._find(dirs, file_name)
            stamps.append((file_name, stamp))
            if path is None:
                return None
            with open(path, "rb") as f:
                data = f.read(MAX_FILE_BYTES + 1)
            return data

        text = read(full)
        if text is None:
            scenario = self._failed(full, ScenarioError(full, 0, "no such scenario"))
        else:
            try:
                scenario = compile_scenario(text, full, read)
            except ScenarioError as e:
                scenario = self._failed(full, e)
        if len(self._cache) >= self.MAX_CACHED:
            self._cache.clear()
        self._cache[key] = (scenario, tuple(stamps))
        return scenario

    def _failed(self, name, error):
        text = str(error)
        log.error("scenario {name} fails closed: {error}", name=name, error=text)
        # Once per distinct error; past the bound the log alone carries them.
        if text not in self._told and len(self._told) < 1000:
            self._told.add(text)
            if self.notify_listmaster is not None:
                try:
                    self.notify_listmaster(text)
                except Exception:
                    log.failure("telling the listmaster about {name}", name=name)
        return Scenario.failed(name, text)

    def check(self, folder, list_dirs=()):
        """Compile every ``OPERATION.NAME`` file in ``folder`` (includes looked up as
        for a list whose folders are ``list_dirs``, then the site's and the shipped
        ones) and return the errors as ``name:line: problem`` texts, sorted; for an
        admin command checking files before a list uses them. Nobody is notified."""
        dirs = self._dirs(list_dirs)
        errors = []
        try:
            files = sorted(os.listdir(folder))
        except OSError as e:
            return [f"{folder}: {e.strerror}"]

        def read(file_name):
            path, _ = self._find(dirs, file_name)
            if path is None:
                return None
            with open(path, "rb") as f:
                return f.read(MAX_FILE_BYTES + 1)

        for file_name in files:
            operation, _, name = file_name.partition(".")
            if operation not in OPERATIONS or not _NAME.match(name):
                continue        # include.OPERATION.header and other files: checked through use
            with open(os.path.join(folder, file_name), "rb") as f:
                text = f.read(MAX_FILE_BYTES + 1)
            try:
                compile_scenario(text, file_name, read)
            except ScenarioError as e:
                errors.append(str(e))
        return errors

    def evaluate(self, context, name=None, list_dirs=(), confirmed=False, blocklist=False):
        """``get(context.operation, name, list_dirs).evaluate(...)``: a Deferred Decision."""
        return self.get(context.operation, name, list_dirs).evaluate(
            context, confirmed=confirmed, blocklist=blocklist)
