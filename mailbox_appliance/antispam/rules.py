"""Rule scoring: regular-expression tests on a message, combined and scored.

In the manner of SpamAssassin, but with a rule language of its own: many
small tests, each worth a few points, whose sum (together with what the
other content filters found) decides whether a message is spam. The
built-in rules are ``default.rules`` next to this module; the administrator
adds files of their own (``[antispam.rules] files``), which are read after
the built-in ones and may redefine, rescore or neutralise any rule.

The language
============

One statement per line; blank lines and lines whose first non-blank
character is ``#`` are ignored (there are no comments at the end of a line:
``#`` may be part of a pattern or a description). A statement is a kind,
a rule NAME (letters, digits and ``_``, at most 64, not starting with a
digit) and the rest of the line::

    header   NAME  Field =~ /pattern/flags    # some value of Field matches
    header   NAME  Field !~ /pattern/flags    # no value matches (or no Field)
    header   NAME  Field:raw =~ /pattern/     # the undecoded value
    header   NAME  Field:addr =~ /pattern/    # the addresses in it
    header   NAME  Field:name =~ /pattern/    # the display names in it
    header   NAME  Field:count >= 12          # how many times Field occurs
    header   NAME  exists:Field               # Field is present
    body     NAME  /pattern/flags             # the text the reader sees
    rawbody  NAME  /pattern/flags             # the text parts, HTML unreduced
    uri      NAME  /pattern/flags             # the links
    full     NAME  /pattern/flags             # the whole message as stored
    eval     NAME  function                   # a built-in test (below)
    meta     NAME  expression                 # a combination of other rules
    describe NAME  text                       # what the rule means
    score    NAME  number                     # points when it hits (default 1)

Patterns are Python regular expressions between slashes (a ``/`` inside is
written ``\\/``), followed by any of the flags ``i`` (ignore case), ``m``
(``^``/``$`` at every line), ``s`` (``.`` matches a line end too), ``x``
(verbose) and ``a`` (ASCII-only ``\\w``, ``\\d``, ``\\s``, ``\\b``).

What each kind sees:

* ``header``: the value of every occurrence of the field, unfolded and with
  RFC 2047 encoded words decoded, joined by line ends; field names ignore
  case. ``:raw`` keeps the encoded words, ``:addr`` gives the addresses of
  an address list (``a@b.example``, one per line) and ``:name`` their
  display names. Pseudo-fields: ``ALL`` (every field as ``Name: value``
  lines), ``ToCc`` (To and Cc), ``EnvelopeFrom`` (the MAIL FROM address)
  and ``HELO``. ``:count`` compares with ``<``, ``<=``, ``>``, ``>=``,
  ``==`` or ``!=`` and a whole number.
* ``body``: the Subject, then the decoded text of every text part (HTML
  reduced to its visible text), one paragraph per line, every run of white
  space a single space, invisible characters (soft hyphens, zero-width
  spaces) removed. ``.`` therefore stays inside a paragraph; very long
  paragraphs are cut into lines of about 1 KiB.
* ``rawbody``: the decoded text parts as they are (HTML markup kept).
* ``uri``: every link of the message, one per line, so ``^`` and ``$`` (the
  ``m`` flag is implied) anchor at each link.
* ``full``: the message bytes as stored, decoded as Latin-1 (every byte one
  character; lines end in ``\\r\\n``, so match a line's end with ``\\r?$``).
* ``eval``: ``from_name_other_address`` (the From display name holds an
  address of another domain than the real one), ``html_only`` (HTML and no
  plain-text part), ``base64_plain_text`` (a text part in base64 although
  all the text is ASCII), ``mime_truncated`` (the message was past the
  parser's bounds).
* ``meta``: an expression over rule names with ``&&``, ``||``, ``!``,
  ``+``, ``-``, ``*``, ``/``, comparisons (``<`` ``<=`` ``>`` ``>=`` ``==``
  ``!=``), numbers and parentheses, C precedence; a name is 1 when that
  rule hit and 0 otherwise, e.g. ``(A && !B) || (C + D + E >= 2)``. A name
  that no rule defines is a hit of another filter (``SPF_FAIL``,
  ``DKIM_VALID``, ``BAYES_99``, ``RCVD_IN_DNSBL``...): 1 when that filter
  reported it. Metas may use metas; a cycle is an error.

``score`` also applies to the other filters' hits: with ``score SPF_FAIL
2.5``, a message on which the SPF check reported ``SPF_FAIL`` gets that hit
re-emitted at 2.5. Rules whose name starts with ``__`` are building blocks
for metas: evaluated, never reported, never scored. A NAME defined again
(in the same or a later file) replaces the earlier definition; the last
``score`` and ``describe`` win.

Robustness
==========

A statement with an error is reported as ``file:line: problem`` and
skipped; the rest of the file still loads. The appliance's configuration
check refuses to start on such a file (as on any bad setting), but a
reload of the running appliance keeps what parses, so a typo never takes
a running MX down. Rules are compiled once, when the files are read at
start-up and on ``reload()`` (the appliance calls it on SIGHUP).

Hostile messages meet the rules in a worker thread, never in the reactor
thread, on bounded text (each kind sees at most a fixed number of
characters), under a time budget per message: past it, no further rule is
tried and the hit ``RULES_TIMEOUT`` (score 0) says so. A single regular
expression match cannot be interrupted (and holds the interpreter lock),
so the patterns whose matching time can explode are refused when loaded:
backreferences; nested repeats that can split the same text in many ways
(``(a+)+``, ``(\\w+\\s?)+``) and repeated alternatives that can start alike
(``(a|aa)*``); two long repeats over the same characters when the first can
swallow what lies between them (``\\s*\\s*``, ``a.*b.*c``, ``\\S+@\\S+``:
bound one, ``.{0,40}``); and an unanchored pattern that starts with an
unbounded repeat (``.*foo``: write ``foo``; ``\\d+x``: write ``\\dx`` or
``\\b\\d+x``). Every unbounded repeat is further bounded to
``REPEAT_CAP`` characters (a ``.*`` spans at most 1,024 of them), so what
remains is at worst the text's length times that bound. The budget is
measured in the worker thread's CPU time and looked at every few rules.

Speed
=====

Most rules do not match most mail, so a pattern is not searched until the
literal text every match must contain is there: from the pattern's parse
tree each rule gets a few needed strings (``\\b(?:cash|free) gift\\b``
needs "cash gift" or "free gift", in the case-folded text when the rule
ignores case), whose whole words are first looked up in the set of the
body's words, then found with ``str.find``, once per message for all the
rules that share them. When a pattern's matches are short, only the text
around each occurrence is searched. ``bench/rules_speed.py`` measures
300 rules on a 10 KiB message.
"""

from __future__ import annotations

import math
import os
import re
import time
from dataclasses import dataclass, field
from importlib import resources
from itertools import repeat

from twisted.internet import defer, threads
from twisted.logger import Logger
from zope.interface import implementer

from mailbox_appliance.antispam.content import ContentResult, IContentFilter
from mailbox_appliance.antispam.message import decode_value
from mailbox_appliance.config import parse_duration

try:                                # the regular expression parser and compiler
    from re import _compiler as sre_compile, _parser as sre_parse
except ImportError:                 # pragma: no cover - Python < 3.11
    import sre_compile
    import sre_parse

log = Logger(namespace="mailbox_appliance.antispam.rules")

TIMEOUT_HIT = "RULES_TIMEOUT"
DEFAULT_SCORE = 1.0
DEFAULT_BUDGET = 0.2

# Bounds on the rule files.
MAX_FILE_SIZE = 1024 * 1024
MAX_LINE = 4096
MAX_PATTERN = 1024
MAX_RULES = 5000
MAX_EXPRESSION = 2000
MAX_NESTING = 50
MAX_TOKENS = 256
MAX_DESCRIPTION = 200
MAX_ABS_SCORE = 1000.0

# Bounds on what one rule looks at (characters).
MAX_HEADER_TEXT = 32 * 1024
MAX_ALL_HEADERS = 64 * 1024
MAX_BODY = 64 * 1024
MAX_RAWBODY = 64 * 1024
MAX_URI_TEXT = 64 * 1024
MAX_FULL = 128 * 1024
BODY_LINE = 1024
MAX_ADDRESSES = 100
# What an unbounded repeat (*, +, {n,}) may match at most.
REPEAT_CAP = 1024
# Patterns whose matches are at most this long are searched only around
# the literals they need, when there are at most MAX_WINDOWS of them.
MAX_WINDOW_WIDTH = 512
MAX_WINDOWS = 64
# Splitting a text into words costs about as much as this many scans of it.
WORTH_SPLITTING = 24
# The time budget is looked at before every CHECK_EVERY-th rule.
CHECK_EVERY = 8
# Literal strings one clause of a pattern's needs may list.
MAX_EXPANSION = 32
# Repeats longer than this count as long when two of them meet.
WIDE_REPEAT = 64
# Largest number of ways a repeated group may split a text before a
# pattern is refused as exponential.
MAX_SPLITS = 10000

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}\Z")
_FIELD = re.compile(r"[!-9;-~]{1,128}\Z")
_NUMBER = re.compile(r"[+-]?(?:\d{1,6}(?:\.\d{0,6})?|\.\d{1,6})\Z")
_COUNT = re.compile(r"(<=|>=|==|!=|<|>)\s*(\d{1,6})\Z")
_FLAGS = {"i": re.IGNORECASE, "m": re.MULTILINE, "s": re.DOTALL, "x": re.VERBOSE,
          "a": re.ASCII}
_VARIANTS = ("raw", "addr", "name", "count")
_PSEUDO = {"all": "ALL", "tocc": "ToCc", "envelopefrom": "EnvelopeFrom", "helo": "HELO"}
TEXT_KINDS = ("body", "rawbody", "uri", "full")
KINDS = ("header", "eval", "meta", "describe", "score") + TEXT_KINDS
# Prefixes of the hits the other filters report (a meta naming one is fine).
EXTERNAL_PREFIXES = ("SPF_", "DKIM_", "DMARC_", "BAYES_", "RCVD_IN_", "MILTER_")


class RuleError(ValueError):
    """A statement that cannot be used, phrased for the administrator."""


# ---------------------------------------------------------------------------
# Patterns: parsed, checked for explosive shapes, bounded, compiled.

_C = sre_parse
_REPEATS = (_C.MAX_REPEAT, _C.MIN_REPEAT, _C.POSSESSIVE_REPEAT)
_ANCHORS = (_C.AT_BEGINNING, _C.AT_BEGINNING_STRING, _C.AT_BEGINNING_LINE, _C.AT_BOUNDARY)
_UNBOUNDED = _C.MAXREPEAT
# Characters on which character classes are compared; each pattern adds
# its own literals and range ends.
_ALPHABET = frozenset(chr(c) for c in range(9, 127)) | frozenset(
    "\x85\xa0\xe9\xdf\u017f\u212a\u0130\u0131\u20ac\u4e2d\u2028\U0001F600")
_item_matchers = {}


@dataclass
class Pattern:
    """A compiled pattern and the literal text a match cannot do without.

    ``needs`` is a tuple of (string, folded, words) of which at least one
    string must occur in the text (in its case-folded form when ``folded``)
    for the pattern to have a chance, and with it its whole ``words``: a set
    lookup and a ``str.find`` that spare most searches.
    """

    source: str
    regex: object
    needs: tuple | None = None
    # The longest match (None: unknown, or the pattern looks ahead): a match
    # holding a needed literal lies within ``width`` characters of it.
    width: int | None = None


def compile_pattern(source: str, flags: int = 0) -> Pattern:
    """Check and compile ``source``; RuleError says why it is refused."""
    if len(source) > MAX_PATTERN:
        raise RuleError(f"pattern longer than {MAX_PATTERN} characters")
    try:
        tree = sre_parse.parse(source, flags)
    except (re.error, OverflowError, RecursionError) as e:
        raise RuleError(f"bad regular expression: {e}")
    flags = tree.state.flags
    try:
        _Checker(source, flags).check(tree)
        needs = _required(tree.data, flags)
        _bound_repeats(tree)
        width = tree.getwidth()[1]
    except RecursionError:
        raise RuleError("pattern nested too deeply")
    if width > MAX_WINDOW_WIDTH or _looks_ahead(tree.data):
        width = None
    try:
        regex = sre_compile.compile(tree, flags)
    except (re.error, OverflowError, RecursionError, RuntimeError) as e:
        raise RuleError(f"bad regular expression: {e}")
    return Pattern(source, regex, needs, width)


def _looks_ahead(items):
    for op, av in items:
        if op in (_C.ASSERT, _C.ASSERT_NOT) and av[0] == 1:
            return True
        if op in _REPEATS and _looks_ahead(av[2]):
            return True
        if op is _C.SUBPATTERN and _looks_ahead(av[3]):
            return True
        if op is _C.ATOMIC_GROUP and _looks_ahead(av):
            return True
        if op is _C.BRANCH and any(_looks_ahead(alt) for alt in av[1]):
            return True
        if op in (_C.ASSERT, _C.ASSERT_NOT) and _looks_ahead(av[1]):
            return True
    return False


def search(pattern, target, kind) -> bool:
    """Does ``pattern`` match the ``kind`` text of ``target``?

    The needed literals are looked for first (``str.find``, fast); none
    there, no search. Otherwise, when the pattern's matches are short, only
    the text around each occurrence is searched: a match must hold one, so
    it lies in ``[q + len - width - 1, q + width + 1]`` for an occurrence
    at q (one character more on each side, for ``\\b`` and ``$``); merged,
    such windows cannot create a match the whole text would not have (the
    search's start sees the real text before it for ``\\b`` and look-behinds).
    """
    text = target.text(kind)
    needs = pattern.needs
    if needs is None:
        return pattern.regex.search(text) is not None
    width = pattern.width
    found = []
    words = False
    for literal, folded, whole in needs:
        if whole:
            if words is False:
                words = target.words(kind)
            if words is not None and not all(w in words for w in whole):
                continue
        places = target.occurrences(kind, literal, folded)
        if places:
            found.extend(zip(places, repeat(len(literal))))
            if len(found) > MAX_WINDOWS:
                width = None
                break
    if not found:
        return False
    if width is None or not target.aligned(kind):
        return pattern.regex.search(text) is not None
    end = len(text)
    windows = sorted((max(0, at + size - width - 1), min(end, at + width + 1))
                     for at, size in found)
    merged = [list(windows[0])]
    for start, stop in windows[1:]:
        if start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], stop)
        else:
            merged.append([start, stop])
    if sum(stop - start for start, stop in merged) * 2 > end:
        return pattern.regex.search(text) is not None
    regex = pattern.regex
    for start, stop in merged:
        if regex.search(text, start, stop) is not None:
            return True
    return False


def _bound_repeats(sub):
    """Bound every unbounded repeat to REPEAT_CAP (the tree is ours to change)."""
    sub.width = None            # widths are cached; the changes invalidate them
    for i, (op, av) in enumerate(sub.data):
        if op in _REPEATS:
            lo, hi, body = av
            if hi == _UNBOUNDED:
                sub.data[i] = (op, (lo, max(lo, REPEAT_CAP), body))
            _bound_repeats(body)
        elif op is _C.SUBPATTERN:
            _bound_repeats(av[3])
        elif op is _C.BRANCH:
            for alt in av[1]:
                _bound_repeats(alt)
        elif op in (_C.ASSERT, _C.ASSERT_NOT):
            _bound_repeats(av[1])
        elif op is _C.ATOMIC_GROUP:
            _bound_repeats(av)


class _Checker:
    """Refuses the pattern shapes whose backtracking explodes (see module doc)."""

    def __init__(self, source, flags):
        self.flags = flags
        extra = set()
        for ch in source:       # the pattern's own characters and their cases
            extra.update((ch, ch.lower(), ch.upper()))
        self.alphabet = tuple(sorted(_ALPHABET | {c for c in extra if len(c) == 1}))
        self._sets = {}

    def check(self, tree):
        self._walk(tree.data, frozenset(), self.flags, 1)
        self._leading(tree.data, self.flags)

    # -- character sets and first sets, on a sample alphabet

    def charset(self, item, flags) -> frozenset:
        op, av = item
        if op is _C.ANY:
            return frozenset(c for c in self.alphabet if flags & re.DOTALL or c != "\n")
        key = (op, repr(av), flags & (re.IGNORECASE | re.ASCII | re.DOTALL | re.UNICODE))
        found = self._sets.get(key)
        if found is None:
            matcher = _item_matchers.get(key)
            if matcher is None:
                state = sre_parse.State()
                state.flags = flags
                matcher = sre_compile.compile(sre_parse.SubPattern(state, [item]), flags)
                if len(_item_matchers) < 4096:
                    _item_matchers[key] = matcher
            found = self._sets[key] = frozenset(
                c for c in self.alphabet if matcher.fullmatch(c))
        return found

    def first(self, items, flags):
        """(characters a match of the sequence can start with, can it be empty)."""
        out = set()
        for item in items:
            chars, nullable = self.first_item(item, flags)
            out |= chars
            if not nullable:
                return frozenset(out), False
        return frozenset(out), True

    def first_item(self, item, flags):
        op, av = item
        if op in (_C.LITERAL, _C.NOT_LITERAL, _C.ANY, _C.IN):
            return self.charset(item, flags), False
        if op in _REPEATS:
            chars, nullable = self.first(av[2], flags)
            return chars, nullable or av[0] == 0
        if op is _C.SUBPATTERN:
            return self.first(av[3], _sub_flags(flags, av))
        if op is _C.ATOMIC_GROUP:
            return self.first(av, flags)
        if op is _C.BRANCH:
            out, nullable = set(), False
            for alt in av[1]:
                chars, n = self.first(alt, flags)
                out |= chars
                nullable = nullable or n
            return frozenset(out), nullable
        return frozenset(), True        # anchors, lookarounds: zero width

    # -- the checks

    def _walk(self, items, follow, flags, outer):
        """Check a sequence; ``follow``: what may come after it, ``outer``:
        how many times the enclosing repeats may run it (1: not repeated)."""
        for k, item in enumerate(items):
            rest, nullable = self.first(items[k + 1:], flags)
            after = rest | follow if nullable else rest
            self._item(item, after, flags, outer)
        self._gaps(items, flags)

    def _item(self, item, follow, flags, outer):
        op, av = item
        if op in (_C.GROUPREF, _C.GROUPREF_EXISTS):
            raise RuleError("backreferences are not supported")
        if op in _REPEATS:
            lo, hi, body = av
            if hi != lo:
                # A choice at every step: one more time, or what follows.
                more, _ = self.first(body, flags)
                if outer > 1 and more & follow and _explodes(hi - lo + 1, outer):
                    raise RuleError("nested repeats can split the same text in too many "
                                    "ways (like (a+)+): make the parts distinct")
            inner = follow
            if hi > 1:
                inner = follow | self.first(body, flags)[0]
                outer = min(outer * hi, _UNBOUNDED)
            self._walk(body, inner, flags, outer)
        elif op is _C.SUBPATTERN:
            self._walk(av[3], follow, _sub_flags(flags, av), outer)
        elif op is _C.ATOMIC_GROUP:
            self._walk(av, follow, flags, outer)
        elif op is _C.BRANCH:
            alts = av[1]
            if outer > 1:
                starts = []
                for alt in alts:
                    chars, nullable = self.first(alt, flags)
                    starts.append(chars | follow if nullable else chars)
                for i in range(len(starts)):
                    for j in range(i + 1, len(starts)):
                        if starts[i] & starts[j] and _explodes(len(alts), outer):
                            raise RuleError("a repeated group has alternatives that can "
                                            "start alike (like (a|aa)*): make them distinct")
            for alt in alts:
                self._walk(alt, follow, flags, outer)
        elif op in (_C.ASSERT, _C.ASSERT_NOT):
            self._walk(av[1], frozenset(), flags, 1)

    def all_chars(self, items, flags):
        """Every character a match of the sequence may contain."""
        out = set()
        for op, av in items:
            if op in (_C.LITERAL, _C.NOT_LITERAL, _C.ANY, _C.IN):
                out |= self.charset((op, av), flags)
            elif op in _REPEATS:
                out |= self.all_chars(av[2], flags)
            elif op is _C.SUBPATTERN:
                out |= self.all_chars(av[3], _sub_flags(flags, av))
            elif op is _C.ATOMIC_GROUP:
                out |= self.all_chars(av, flags)
            elif op is _C.BRANCH:
                for alt in av[1]:
                    out |= self.all_chars(alt, flags)
        return frozenset(out)

    def last(self, items, flags):
        """Characters a match of the sequence can end with."""
        out = set()
        for op, av in reversed(items):
            if op in (_C.LITERAL, _C.NOT_LITERAL, _C.ANY, _C.IN):
                out |= self.charset((op, av), flags)
                return frozenset(out)
            if op in _REPEATS:
                out |= self.last(av[2], flags)
            elif op is _C.SUBPATTERN:
                out |= self.last(av[3], _sub_flags(flags, av))
            elif op is _C.ATOMIC_GROUP:
                out |= self.last(av, flags)
            elif op is _C.BRANCH:
                for alt in av[1]:
                    out |= self.last(alt, flags)
            if not self.first_item((op, av), flags)[1]:
                return frozenset(out)
        return frozenset(out)

    def wide(self, item, flags):
        """The characters a long repeat in ``item`` can go on taking at its
        end (empty: no long repeat, or one walled in by what follows it).
        A long repeat of a group continues only on what the group ends with:
        ``(?:[a-z]+\\.)+`` goes on past a dot, never past a letter."""
        op, av = item
        if op in _REPEATS:
            if av[1] > WIDE_REPEAT:
                return self.last(av[2], flags)
            return self._wide_seq(av[2], flags)
        if op is _C.SUBPATTERN:
            return self._wide_seq(av[3], _sub_flags(flags, av))
        if op is _C.ATOMIC_GROUP:
            return self._wide_seq(av, flags)
        if op is _C.BRANCH:
            return frozenset().union(*(self._wide_seq(alt, flags) for alt in av[1]))
        return frozenset()

    def _wide_seq(self, items, flags):
        for k in range(len(items) - 1, -1, -1):
            found = self.wide(items[k], flags)
            if found:
                for item in items[k + 1:]:
                    if (not self.first_item(item, flags)[1]
                            and not self.all_chars([item], flags) <= found):
                        return frozenset()      # walled in
                return found
        return frozenset()

    def _gaps(self, items, flags):
        """Two long repeats over the same characters, the first able to
        swallow what lies between them (``a.*b.*c``, ``\\s*\\s*``): each
        split of the text between them is tried, a power of its length."""
        wides = [self.wide(item, flags) for item in items]
        for i, mine in enumerate(wides):
            if not mine:
                continue
            for j in range(i + 1, len(items)):
                if wides[j] & mine:
                    raise RuleError("two long repeats match the same characters with "
                                    "nothing they cannot both match between them (like "
                                    "a.*b.*c or \\s*\\s*): bound them (.{0,40}) or "
                                    "use a character the first cannot match")
                _, nullable = self.first_item(items[j], flags)
                if not nullable and not self.all_chars([items[j]], flags) <= mine:
                    break

    def _leading(self, items, flags):
        """An unanchored pattern must not start with an unbounded repeat."""
        for op, av in items:
            if op is _C.AT and av in _ANCHORS:
                return
            if op in _REPEATS and av[1] == _UNBOUNDED:
                raise RuleError("the pattern starts with an unbounded repeat, tried from "
                                "every position: drop it (a search finds the rest anyway) "
                                "or anchor the pattern")
            if op is _C.SUBPATTERN:
                self._leading(av[3], _sub_flags(flags, av))
            elif op is _C.BRANCH:
                for alt in av[1]:
                    self._leading(alt, flags)
            if not self.first_item((op, av), flags)[1]:
                return


def _explodes(choices, times):
    """Would ``choices`` ways per step over ``times`` steps exceed MAX_SPLITS?"""
    if times >= _UNBOUNDED or choices >= _UNBOUNDED:
        return True
    return times * math.log(max(choices, 2)) > math.log(MAX_SPLITS)


def _sub_flags(flags, av):
    _, add, remove, _ = av
    return (flags | add) & ~remove


# Characters that match an ASCII letter when ignoring case although their
# lower-case form is not that letter (Python's re documents these four).
_FOLD_MAP = str.maketrans({"\u017f": "s", "\u212a": "k", "\u0130": "i", "\u0131": "i"})


_FOLD_CHARS = re.compile("[\u017f\u212a\u0130\u0131]")


def fold(text: str) -> str:
    """The case-folded text the ``folded`` needs of a Pattern are looked for in."""
    if not text.isascii() and _FOLD_CHARS.search(text):
        text = text.translate(_FOLD_MAP)    # slow (a dict per character): rarely needed
    return text.lower()


def _required(items, flags, most=MAX_EXPANSION, left=False, right=False):
    """The best clause of literals every match contains (of at most
    ``most`` strings), or None. ``left``/``right``: a \\b before/after."""
    best = None
    for clause in _clauses(items, flags, left, right):
        if len(clause) <= most and (best is None or _strength(clause) > _strength(best)):
            best = clause
    return best


def _strength(clause):
    """How well a clause filters: long strings (eight characters are rare
    enough) and few of them (each is one more scan of the text, unless its
    whole words are looked up first)."""
    cost = sum(0.5 if words else 2 for _, _, words in clause)   # a word: a set lookup
    common = sum(len(s) == 1 and s in _COMMON for s, _, _ in clause) * 10
    return min(8, min(len(s) for s, _, _ in clause)) * 4 - cost - common


# Single characters found in nearly every text: poor needs.
_COMMON = frozenset(" .,:;-'\"/()!?abcdefghijklmnopqrstuvwxyz0123456789\n")


def _literal(value, flags):
    """(character as looked for, folded) of a LITERAL, or None when its case
    folding is not str.lower()'s (outside ASCII)."""
    ch, folded = chr(value), bool(flags & re.IGNORECASE)
    if folded and not ch.isascii():
        return None
    return (ch.lower() if folded else ch), folded


def _in_chars(av, flags):
    """The strings of a small character class of literals (``[$\u20ac\u00a3]``),
    as (set, folded), or None."""
    chars = []
    for op, value in av:
        if op is _C.LITERAL:
            chars.append(value)
        elif op is _C.RANGE and value[1] - value[0] < 8:
            chars.extend(range(value[0], value[1] + 1))
        else:
            return None
    found = [_literal(c, flags) for c in chars]
    if not found or len(found) > 8 or any(f is None for f in found):
        return None
    return {f[0] for f in found}, found[0][1]


def _expand(items, flags):
    """(strings, folded) when every match of the sequence is one of a few
    literal strings (``you(?:'ve| have)``), else None. ``folded`` is None
    while only empty strings were seen."""
    strings, mode = {""}, None
    for op, av in items:
        if op is _C.LITERAL:
            found = _literal(av, flags)
            if found is None or (mode is not None and found[1] != mode):
                return None
            strings = {s + found[0] for s in strings}
            mode = found[1]
            continue
        if op is _C.SUBPATTERN:
            part = _expand(av[3], _sub_flags(flags, av))
        elif op is _C.IN:
            part = _in_chars(av, flags)
        elif op is _C.BRANCH:
            part, parts = None, [_expand(alt, flags) for alt in av[1]]
            if all(p is not None for p in parts):
                modes = {p[1] for p in parts} - {None}
                if len(modes) <= 1:
                    part = (set().union(*(p[0] for p in parts)), modes.pop() if modes else None)
        else:
            return None
        if part is None or (mode is not None and part[1] not in (None, mode)):
            return None
        if len(strings) * len(part[0]) > MAX_EXPANSION:
            return None
        strings = {s + t for s in strings for t in part[0]}
        mode = part[1] if part[1] is not None else mode
    return strings, mode


_WORD = re.compile(r"\w+")
# ASCII bytes that are not \w, as spaces (the others as they are).
_NOT_WORD = bytes(c if chr(c).isalnum() or c == 95 or c > 127 else 32 for c in range(256))


def _words(string, left, right):
    """The whole words of a needed string: its \\w runs that a non-word
    character or a \\b of the pattern closes on both sides (lower-cased,
    ASCII only). A text holding the string holds each as a word."""
    out = []
    for m in _WORD.finditer(string):
        word = m.group()
        if (m.start() > 0 or left) and (m.end() < len(string) or right) and word.isascii():
            out.append(word.lower())
    return tuple(out)


def _clauses(items, flags, left_edge=False, right_edge=False):
    """Clauses (tuples of (string, folded, words), one of which must occur);
    ``left_edge``/``right_edge``: the sequence has a \\b before/after it."""
    out = []
    cur, mode, left = {""}, None, False
    bounded = not flags & re.ASCII      # our words are Unicode \w runs, like \b's

    def emit(right):
        if mode is not None and all(cur):
            out.append(tuple(sorted((s, mode, _words(s, left, right)) for s in cur)))

    def close(right=False):
        nonlocal cur, mode
        emit(right)
        cur, mode = {""}, None

    def is_boundary(item):
        return bounded and item[0] is _C.AT and item[1] is _C.AT_BOUNDARY

    boundary = bounded and left_edge    # is the previous item \b?
    for index, (op, av) in enumerate(items):
        after, boundary = boundary, is_boundary((op, av))
        if cur == {""}:
            left = after
        if op is _C.LITERAL:
            found = _literal(av, flags)
            if found is None:
                close()         # case folding outside ASCII is not str.lower()
                continue
            if mode is not None and found[1] != mode:
                close()
                left = False
            cur = {s + found[0] for s in cur}
            mode = found[1]
            continue
        if op in (_C.SUBPATTERN, _C.BRANCH, _C.IN):
            sub = _sub_flags(flags, av) if op is _C.SUBPATTERN else flags
            part = _expand(av[3] if op is _C.SUBPATTERN else [(op, av)], sub)
            if part is not None and part[1] is not None and (mode in (None, part[1])) \
                    and len(cur) * len(part[0]) <= MAX_EXPANSION:
                emit(False)     # the shorter strings so far: fewer, maybe better
                cur = {s + t for s in cur for t in part[0]}
                mode = part[1]
                continue
        close(boundary)
        if (op is _C.MAX_REPEAT or op is _C.MIN_REPEAT) and 2 <= av[0] <= 16 \
                and len(av[2]) == 1 and av[2][0][0] is _C.LITERAL:
            found = _literal(av[2][0][1], flags)        # a{4}: "aaaa"
            if found is not None:
                out.append(((found[0] * av[0], found[1], ()),))
        elif op is _C.SUBPATTERN:
            behind = (is_boundary(items[index + 1]) if index + 1 < len(items)
                      else bounded and right_edge)
            out += _clauses(av[3], _sub_flags(flags, av), after, behind)
        elif op is _C.ATOMIC_GROUP:
            out += _clauses(av, flags)
        elif op in _REPEATS and av[0] >= 1:
            out += _clauses(av[2], flags)
        elif op is _C.ASSERT:
            out += _clauses(av[1], flags)
        elif op is _C.BRANCH:
            either = []
            share = max(1, MAX_EXPANSION // len(av[1]))
            before = after
            behind = (is_boundary(items[index + 1]) if index + 1 < len(items)
                      else bounded and right_edge)
            for alt in av[1]:
                best = _required(alt, flags, share, before, behind)
                if best is None:
                    either = None
                    break
                either += best
            if either and len(either) <= 32:
                out.append(tuple(either))
    close(bounded and right_edge)
    return out


# ---------------------------------------------------------------------------
# Meta expressions: tokens, a small AST, closures. Never eval().

_TOKEN = re.compile(r"\s*(?:(\d{1,9}(?:\.\d{1,9})?)|([A-Za-z_][A-Za-z0-9_]{0,63})"
                    r"|(&&|\|\||<=|>=|==|!=|[!<>()+\-*/]))")
_COMPARISONS = ("<", "<=", ">", ">=", "==", "!=")


def parse_expression(text: str):
    """The AST of a meta expression: ("num", v) ("name", n) ("not", e)
    ("neg", e) (op, a, b); RuleError on a syntax error."""
    if len(text) > MAX_EXPRESSION:
        raise RuleError(f"expression longer than {MAX_EXPRESSION} characters")
    tokens, pos = [], 0
    text = text.rstrip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m or m.end() == pos:
            raise RuleError(f"unexpected {text[pos:].strip()[:20]!r} in expression")
        number, name, op = m.groups()
        tokens.append(("num", float(number)) if number else
                      ("name", name) if name else ("op", op))
        if len(tokens) > MAX_TOKENS:
            # The tree's depth, and so the evaluation's recursion, stays bounded.
            raise RuleError(f"expression of more than {MAX_TOKENS} names and operators")
        pos = m.end()
    p = _ExpressionParser(tokens)
    tree = p.parse()
    return tree


class _ExpressionParser:
    """Recursive descent, C precedence: || && comparison +- */ unary."""

    LEVELS = (("||",), ("&&",), _COMPARISONS, ("+", "-"), ("*", "/"))

    def __init__(self, tokens):
        self.tokens, self.pos, self.depth = tokens, 0, 0

    def parse(self):
        if not self.tokens:
            raise RuleError("empty expression")
        tree = self.binary(0)
        if self.pos < len(self.tokens):
            raise RuleError(f"unexpected {self.tokens[self.pos][1]!r} in expression")
        return tree

    def peek(self):
        return self.tokens[self.pos] if self.pos < len(self.tokens) else (None, None)

    def binary(self, level):
        if level == len(self.LEVELS):
            return self.unary()
        left = self.binary(level + 1)
        while True:
            kind, value = self.peek()
            if kind != "op" or value not in self.LEVELS[level]:
                return left
            self.pos += 1
            right = self.binary(level + 1)
            if value in _COMPARISONS and self.peek()[1] in _COMPARISONS:
                raise RuleError("comparisons do not chain: use parentheses")
            left = (value, left, right)

    def unary(self):
        kind, value = self.peek()
        self.depth += 1
        if self.depth > MAX_NESTING:
            raise RuleError("expression nested too deeply")
        try:
            if kind == "op" and value in ("!", "-"):
                self.pos += 1
                return ("not" if value == "!" else "neg", self.unary())
            if kind == "op" and value == "(":
                self.pos += 1
                inner = self.binary(0)
                if self.peek() != ("op", ")"):
                    raise RuleError("missing ')' in expression")
                self.pos += 1
                return inner
            if kind in ("num", "name"):
                self.pos += 1
                return (kind, value)
            raise RuleError("expression ends too soon" if kind is None
                            else f"unexpected {value!r} in expression")
        finally:
            self.depth -= 1


def expression_names(tree) -> set:
    """The rule names an expression uses."""
    if tree[0] == "name":
        return {tree[1]}
    if tree[0] == "num":
        return set()
    return set().union(*(expression_names(t) for t in tree[1:]))


def _truth(x):
    return 1.0 if x else 0.0


_BINARY = {
    "+": lambda a, b: a + b,
    "-": lambda a, b: a - b,
    "*": lambda a, b: a * b,
    "/": lambda a, b: a / b if b else 0.0,
    "<": lambda a, b: _truth(a < b),
    "<=": lambda a, b: _truth(a <= b),
    ">": lambda a, b: _truth(a > b),
    ">=": lambda a, b: _truth(a >= b),
    "==": lambda a, b: _truth(a == b),
    "!=": lambda a, b: _truth(a != b),
}


def compile_expression(tree):
    """A function values -> float of the AST; ``values`` maps names to 1.0
    (missing names are 0)."""
    kind = tree[0]
    if kind == "num":
        value = tree[1]
        return lambda v: value
    if kind == "name":
        name = tree[1]
        return lambda v: v.get(name, 0.0)
    if kind == "not":
        inner = compile_expression(tree[1])
        return lambda v: 0.0 if inner(v) else 1.0
    if kind == "neg":
        inner = compile_expression(tree[1])
        return lambda v: -inner(v)
    a, b = compile_expression(tree[1]), compile_expression(tree[2])
    if kind == "&&":
        return lambda v: 1.0 if a(v) and b(v) else 0.0
    if kind == "||":
        return lambda v: 1.0 if a(v) or b(v) else 0.0
    op = _BINARY[kind]
    return lambda v: op(a(v), b(v))


# ---------------------------------------------------------------------------
# Built-in tests (``eval``): what a regular expression cannot say.

_DOMAIN_AFTER_AT = re.compile(r"@([A-Za-z0-9-]{1,63}(?:\.[A-Za-z0-9-]{1,63}){1,10})")
_MEDIA_TYPE = re.compile(r"[ \t]*([a-z0-9!#$&^_.+-]{1,64}/[a-z0-9!#$&^_.+-]{1,64})")
_BASE64_CTE = re.compile(r"(?m)^content-transfer-encoding:[ \t]*\"?base64")
MAX_MIME_HEADERS = 200


def _related(a, b):
    """Is one domain the other or below it?"""
    return a == b or a.endswith("." + b) or b.endswith("." + a)


def eval_from_name_other_address(t) -> bool:
    for name, addr in t.addresses("from"):
        real = addr.rpartition("@")[2].lower()
        for m in _DOMAIN_AFTER_AT.finditer(name):
            if real and not _related(m.group(1).lower(), real):
                return True
    return False


def eval_html_only(t) -> bool:
    types = {media for media, _ in t.content_types()}
    return "text/html" in types and "text/plain" not in types


def eval_base64_plain_text(t) -> bool:
    text = t.message.text
    if not text or not text.isascii():
        return False
    full = t.mime_text()
    for media, at in t.content_types():
        if not media.startswith("text/"):
            continue
        # The header block of that part: from the blank line before to the next.
        start = full.rfind("\n\n", 0, at) + 1
        end = full.find("\n\n", at)
        if _BASE64_CTE.search(full, start, end if end >= 0 else len(full)):
            return True
    return False


def eval_mime_truncated(t) -> bool:
    return bool(t.message.truncated)


EVALS = {
    "from_name_other_address": eval_from_name_other_address,
    "html_only": eval_html_only,
    "base64_plain_text": eval_base64_plain_text,
    "mime_truncated": eval_mime_truncated,
}


# ---------------------------------------------------------------------------
# What the rules look at, prepared once per message (lazily: only what some
# rule needs).

_PARAGRAPH = re.compile(r"\n[^\S\n]*\n")
_INVISIBLE = re.compile("[\u00ad\u034f\u180e\u200b-\u200f\u2060-\u2064\ufeff]")
_UNFOLD = re.compile(r"\r?\n(?=[ \t])")


def split_addresses(value: str, limit=MAX_ADDRESSES):
    """[(display name, address)] of an address-list value, leniently.

    Quoted strings, comments (a comment is the name when there is no
    other), angle brackets and groups are understood; any input gives a
    list, never an exception. Encoded words in names are decoded after the
    split, so a decoded comma or bracket cannot change it.
    """
    out = []
    phrase, addr, comment = [], None, []
    depth, quoted, escaped, in_angle = 0, False, False, False

    def finish():
        if addr is not None:
            address, name = "".join(addr).strip(), "".join(phrase).strip()
        else:
            address, name = "".join(phrase).strip(), ""
        name = name or " ".join("".join(comment).split())
        if address or name:
            if "=?" in name:
                name = decode_value(name.encode("utf-8", "replace"))
            out.append((name, address))

    for ch in value:
        if len(out) >= limit:
            return out
        sink = comment if depth else addr if in_angle else phrase
        if escaped:
            escaped = False
            sink.append(ch)
        elif ch == "\\" and (quoted or depth):
            escaped = True
        elif depth:
            if ch == "(":
                depth = min(depth + 1, 100)
            elif ch == ")":
                depth -= 1
            else:
                comment.append(ch)
        elif quoted:
            if ch == '"':
                quoted = False
            else:
                sink.append(ch)
        elif ch == '"':
            quoted = True
        elif ch == "(":
            depth = 1
            comment.append(" ")
        elif in_angle:
            if ch == ">":
                in_angle = False
            else:
                addr.append(ch)
        elif ch == "<":
            in_angle, addr = True, []
        elif ch in ",;":
            finish()
            phrase, addr, comment = [], None, []
        elif ch == ":" and addr is None and "@" not in phrase:
            phrase, comment = [], []        # the name of a group
        else:
            phrase.append(ch)
    if len(out) < limit:
        finish()
    return out


class Target:
    """One message as the rules see it; every view computed at most once.

    ``word_kinds``: the kinds whose text is split into words (worth it when
    many rules' needs can be looked up as words, see RuleSet.build).
    """

    def __init__(self, message, word_kinds=("body",)):
        self.message = message
        self.word_kinds = word_kinds
        self._fields = None
        self._cache = {}

    def _index(self):
        if self._fields is None:
            fields = {}
            for i, (name, _) in enumerate(self.message.headers):
                fields.setdefault(name.lower(), []).append(i)
            self._fields = fields
        return self._fields

    def values(self, field):
        """Decoded values of a field (lower-case name)."""
        headers = self.message.headers
        return [headers[i][1] for i in self._index().get(field, ())]

    def raw_values(self, field):
        raw = self.message.raw_headers
        return [_UNFOLD.sub("", raw[i][1].decode("utf-8", "replace")).strip()
                for i in self._index().get(field, ())]

    def addresses(self, field):
        key = ("addresses", field)
        found = self._cache.get(key)
        if found is None:
            found = []
            for value in self.raw_values(field):
                found += split_addresses(value, MAX_ADDRESSES - len(found))
            self._cache[key] = found
        return found

    def header(self, field, variant):
        """The text (or count) a header test looks at."""
        key = ("header", field, variant)
        found = self._cache.get(key)
        if found is not None:
            return found
        m = self.message
        if field == "ALL":
            source = m.raw_headers if variant == "raw" else m.headers
            lines = []
            size = 0
            for name, value in source:
                if isinstance(value, bytes):
                    value = _UNFOLD.sub("", value.decode("utf-8", "replace")).strip()
                lines.append(f"{name}: {value}")
                size += len(lines[-1]) + 1
                if size > MAX_ALL_HEADERS:
                    break
            found = "\n".join(lines)[:MAX_ALL_HEADERS]
        elif field == "EnvelopeFrom":
            found = m.sender or ""
        elif field == "HELO":
            found = m.helo or ""
        else:
            names = ("to", "cc") if field == "ToCc" else (field,)
            if variant == "count":
                found = sum(len(self._index().get(n, ())) for n in names)
            elif variant in ("addr", "name"):
                pairs = [p for n in names for p in self.addresses(n)]
                found = "\n".join(p[1] if variant == "addr" else p[0] for p in pairs)
            elif variant == "raw":
                found = "\n".join(v for n in names for v in self.raw_values(n))
            else:
                found = "\n".join(v for n in names for v in self.values(n))
        if isinstance(found, str):
            found = found[:MAX_HEADER_TEXT]
        self._cache[key] = found
        return found

    def text(self, kind):
        found = self._cache.get(kind)
        if found is None:
            m = self.message
            if kind == "body":
                found = body_text(m.get("Subject", "") or "", m.text)
            elif kind == "rawbody":
                found = m.rawbody[:MAX_RAWBODY]
            elif kind == "uri":
                found = "\n".join(m.uris)[:MAX_URI_TEXT]
            else:
                found = m.raw[:MAX_FULL].decode("latin-1")
            self._cache[kind] = found
        return found

    def folded(self, kind):
        key = ("folded", kind)
        found = self._cache.get(key)
        if found is None:
            found = self._cache[key] = fold(self.text(kind))
        return found

    def occurrences(self, kind, literal, folded):
        """Where ``literal`` is in the (folded) text, at most MAX_WINDOWS + 1
        places; rules sharing a literal share the scan."""
        key = (kind, literal, folded)
        found = self._cache.get(key)
        if found is None:
            haystack = self.folded(kind) if folded else self.text(kind)
            found = []
            at = haystack.find(literal)
            while at >= 0 and len(found) <= MAX_WINDOWS:
                found.append(at)
                at = haystack.find(literal, at + 1)
            self._cache[key] = found
        return found

    def words(self, kind):
        """The set of \\w runs of the folded text, or None when its kind is
        not split or the text is not ASCII (splitting it would then cost more
        than the scans it spares)."""
        key = ("words", kind)
        found = self._cache.get(key, False)
        if found is False:
            text = self.folded(kind)
            found = None
            if kind in self.word_kinds and text.isascii():
                # bytes.translate: a table, no Python code per character.
                found = set(text.encode("ascii").translate(_NOT_WORD).decode("ascii").split())
            self._cache[key] = found
        return found

    def aligned(self, kind):
        """Are the folded text's positions those of the text?"""
        return len(self.folded(kind)) == len(self.text(kind))

    def mime_text(self):
        """The message lower-cased with bare line ends (MIME header scans)."""
        found = self._cache.get("mime")
        if found is None:
            found = self._cache["mime"] = self.text("full").lower().replace("\r\n", "\n")
        return found

    def content_types(self):
        """[(media type, where its field starts)] of the message and its parts."""
        found = self._cache.get("types")
        if found is None:
            found = []
            text = self.mime_text()
            at = text.find("content-type:")
            while at >= 0 and len(found) <= MAX_MIME_HEADERS:
                if at == 0 or text[at - 1] == "\n":
                    m = _MEDIA_TYPE.match(text, at + 13)
                    if m:
                        found.append((m.group(1), at))
                at = text.find("content-type:", at + 13)
            self._cache["types"] = found
        return found


def body_text(subject: str, text: str) -> str:
    """What ``body`` rules see: the subject and one paragraph per line."""
    lines = [" ".join(subject.split())]
    text = text[:MAX_BODY]
    if not text.isascii() and _INVISIBLE.search(text):
        text = _INVISIBLE.sub("", text)
    for paragraph in _PARAGRAPH.split(text):
        p = " ".join(paragraph.split())     # str.split: white space as \s has it
        while len(p) > BODY_LINE:
            cut = p.rfind(" ", BODY_LINE // 2, BODY_LINE)
            if cut < 0:
                cut = BODY_LINE
            lines.append(p[:cut])
            p = p[cut:].lstrip()
        if p:
            lines.append(p)
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# Rule files.

@dataclass
class Rule:
    """One test, where it was defined, and what it needs."""

    name: str
    kind: str
    where: str
    pattern: Pattern | None = None
    field: str = ""
    variant: str = ""
    op: str = "=~"
    number: int = 0
    function: object = None
    expression: object = None
    uses: frozenset = frozenset()


@dataclass
class RuleSet:
    """Compiled rules, ready to run on messages (never changed after build)."""

    rules: dict = field(default_factory=dict)
    scores: dict = field(default_factory=dict)
    descriptions: dict = field(default_factory=dict)
    errors: list = field(default_factory=list)
    warnings: list = field(default_factory=list)
    files: list = field(default_factory=list)
    # Filled by build(): the evaluation plan.
    plan: list = field(default_factory=list)
    metas: list = field(default_factory=list)
    word_kinds: tuple = ()

    def score(self, name) -> float:
        return self.scores.get(name, DEFAULT_SCORE)

    def describe(self, name) -> str:
        return self.descriptions.get(name, "")

    def __len__(self):
        return len(self.rules)

    # -- loading

    def add_text(self, text: str, origin: str):
        """Read the statements of one file's text; errors are kept, not raised."""
        for number, line in enumerate(text.splitlines(), 1):
            where = f"{origin}:{number}"
            stripped = line.strip()
            if not stripped or stripped.startswith("#"):
                continue
            try:
                if len(line) > MAX_LINE:
                    raise RuleError(f"line longer than {MAX_LINE} characters")
                self._statement(stripped, where)
            except RuleError as e:
                self.errors.append(f"{where}: {e}")

    def add_file(self, path: str):
        """Read one rule file; an unreadable file is an error, not a crash."""
        try:
            with open(path, "rb") as f:
                data = f.read(MAX_FILE_SIZE + 1)
        except OSError as e:
            self.errors.append(f"{path}: cannot read rule file: {e.strerror}")
            return
        if len(data) > MAX_FILE_SIZE:
            self.errors.append(f"{path}: rule file larger than {MAX_FILE_SIZE} bytes, "
                               "ignored")
            return
        self.files.append(path)
        self.add_text(data.decode("utf-8", "replace"), path)

    def _statement(self, line, where):
        parts = line.split(None, 2)
        kind = parts[0].lower()
        if kind not in KINDS:
            raise RuleError(f"unknown statement {parts[0][:32]!r}; expected one of "
                            + ", ".join(KINDS))
        if len(parts) < 2:
            raise RuleError(f"{kind} needs a rule name")
        name = parts[1]
        if not _NAME.match(name):
            raise RuleError(f"bad rule name {name[:70]!r} (letters, digits and _, "
                            "at most 64, not starting with a digit)")
        rest = parts[2].strip() if len(parts) > 2 else ""
        if kind == "score":
            if not _NUMBER.match(rest):
                raise RuleError(f"score {name}: expected a number, got {rest[:32]!r}")
            value = float(rest)
            if abs(value) > MAX_ABS_SCORE:
                raise RuleError(f"score {name}: more than {MAX_ABS_SCORE:g} points")
            self.scores[name] = value
            return
        if kind == "describe":
            self.descriptions[name] = "".join(
                c if c.isprintable() else " " for c in rest)[:MAX_DESCRIPTION]
            return
        if name == TIMEOUT_HIT:
            raise RuleError(f"{TIMEOUT_HIT} is reserved")
        if not rest:
            raise RuleError(f"{kind} {name}: nothing to test")
        rule = Rule(name, kind, where)
        if kind in TEXT_KINDS:
            source, flags = _slashed(rest)
            if kind == "uri":
                flags |= re.MULTILINE
            rule.pattern = compile_pattern(source, flags)
        elif kind == "header":
            _header(rule, rest)
        elif kind == "eval":
            rule.function = EVALS.get(rest)
            if rule.function is None:
                raise RuleError(f"unknown eval function {rest[:40]!r}; known: "
                                + ", ".join(sorted(EVALS)))
        elif kind == "meta":
            tree = parse_expression(rest)
            rule.expression = compile_expression(tree)
            rule.uses = frozenset(expression_names(tree))
            if name in rule.uses:
                raise RuleError(f"meta {name} uses itself")
        if name not in self.rules and len(self.rules) >= MAX_RULES:
            raise RuleError(f"more than {MAX_RULES} rules")
        self.rules.pop(name, None)      # redefined: its new place in the order
        self.rules[name] = rule

    # -- the evaluation plan

    def build(self):
        """Order the rules for evaluation (cheap kinds first, metas after what
        they use); metas in a cycle are reported and dropped."""
        order = {"header": 0, "eval": 1, "uri": 2, "body": 3, "rawbody": 4, "full": 5}
        tests = [r for r in self.rules.values() if r.kind != "meta"]
        tests.sort(key=lambda r: order[r.kind])
        self.plan = [(r.name, r.kind, r) for r in tests]
        worded = {}
        for r in tests:
            if r.kind in TEXT_KINDS and r.pattern.needs and any(w for _, _, w in r.pattern.needs):
                worded[r.kind] = worded.get(r.kind, 0) + 1
        self.word_kinds = tuple(k for k, n in worded.items() if n >= WORTH_SPLITTING)
        metas = {r.name: r for r in self.rules.values() if r.kind == "meta"}
        done, visiting, ordered = set(), set(), []

        def visit(rule, path):
            if rule.name in done:
                return True
            if rule.name in visiting:
                raise RuleError("meta cycle: " + " -> ".join(path + [rule.name]))
            visiting.add(rule.name)
            try:
                for used in sorted(rule.uses):
                    if used in metas:
                        visit(metas[used], path + [rule.name])
            finally:
                visiting.discard(rule.name)
            done.add(rule.name)
            ordered.append(rule)
            return True

        for rule in list(metas.values()):
            try:
                visit(rule, [])
            except RuleError as e:
                self.errors.append(f"{rule.where}: {e}")
                for name in _cycle_members(str(e)):
                    if name in metas:
                        del metas[name]
                        self.rules.pop(name, None)
        self.metas = [(r.name, r.expression,
                       frozenset(u for u in r.uses if u in self.rules), r)
                      for r in ordered if r.name in metas]
        for rule in metas.values():
            for used in sorted(rule.uses - set(self.rules)):
                if not used.startswith(EXTERNAL_PREFIXES) and used not in self.scores:
                    self.warnings.append(f"{rule.where}: meta {rule.name} uses {used}, "
                                         "which no rule defines (taken as another "
                                         "filter's hit)")
        return self

    # -- running

    def evaluate(self, message, budget=DEFAULT_BUDGET, timer=time.thread_time, others=None,
                 check_every=CHECK_EVERY):
        """(hits {NAME: score}, timed out?) of the rules on a ScannedMessage.

        ``others``: the hits of the filters that ran before (by default
        those the message carries, see ``other_hits``). CPU work: run it in
        a worker thread. ``budget`` seconds of ``timer`` at most, looked at
        before every ``check_every``-th rule (reading a thread's CPU clock
        is a system call: once per rule would cost more than most rules).
        """
        target = Target(message, self.word_kinds)
        if others is None:
            others = other_hits(message)
        fired = {name: 1.0 for name in others}
        start = timer()
        deadline = start + budget
        timed_out = False
        decided = None                  # None: everything ran
        for index, (name, kind, rule) in enumerate(self.plan):
            if index % check_every == 0 and timer() > deadline:
                timed_out = True
                decided = {n for n, _, _ in self.plan[:index]}
                break
            if kind == "header":
                hit = _header_hit(rule, target)
            elif kind == "eval":
                hit = rule.function(target)
            else:
                hit = search(rule.pattern, target, kind)
            if hit:
                fired[name] = 1.0
        for name, expression, uses, _ in self.metas:
            if decided is not None:
                if not uses <= decided:
                    continue
                decided.add(name)
            if expression(fired):
                fired[name] = 1.0
        hits = {}
        for name in fired:
            if name in self.rules:
                if not name.startswith("__"):
                    hits[name] = self.score(name)
            elif name in self.scores:
                hits[name] = self.scores[name]      # another filter's hit, rescored
        if timed_out:
            hits[TIMEOUT_HIT] = 0.0
        return hits, timed_out


def other_hits(message) -> dict:
    """A copy of the hits the earlier filters left on ``message``
    (``message.hits``, or the content scan's ``facts["hits"]``)."""
    found = getattr(message, "hits", None)
    if found is None:
        found = getattr(message, "facts", {}).get("hits")
    return dict(found or {})


def _cycle_members(message):
    return message.partition(": ")[2].split(" -> ")


def _slashed(text):
    """(pattern, flags) of ``/pattern/flags``."""
    if not text.startswith("/"):
        raise RuleError("expected /pattern/flags")
    i = 1
    while i < len(text):
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == "/":
            break
        i += 1
    else:
        raise RuleError("pattern has no closing /")
    source, tail = text[1:i], text[i + 1:].strip()
    flags = 0
    for letter in tail:
        if letter not in _FLAGS:
            raise RuleError(f"unknown flag {letter!r} after the pattern (flags: imsxa)")
        flags |= _FLAGS[letter]
    return source, flags


def _header(rule, rest):
    if rest.lower().startswith("exists:"):
        name = rest[7:].strip()
        if not _FIELD.match(name):
            raise RuleError(f"bad field name {name[:40]!r}")
        rule.op, rule.field = "exists", name.lower()
        return
    target, _, test = rest.partition(" ")
    test = test.strip()
    name, _, variant = target.partition(":")
    variant = variant.lower()
    if not _FIELD.match(name or "-"):
        raise RuleError(f"bad field name {name[:40]!r}")
    if variant and variant not in _VARIANTS:
        raise RuleError(f"unknown field variant :{variant[:20]} (expected :raw, :addr, "
                        ":name or :count)")
    rule.field = _PSEUDO.get(name.lower(), name.lower())
    rule.variant = variant
    if rule.field in ("EnvelopeFrom", "HELO") and variant:
        raise RuleError(f"{rule.field} has no :{variant}")
    if variant == "count":
        m = _COUNT.match(test)
        if not m:
            raise RuleError(f"{name}:count needs a comparison like '>= 12'")
        rule.op, rule.number = m.group(1), int(m.group(2))
        return
    op = test[:2]
    if op not in ("=~", "!~"):
        raise RuleError(f"header {rule.name}: expected =~ or !~ after the field name")
    source, flags = _slashed(test[2:].strip())
    rule.op = op
    rule.pattern = compile_pattern(source, flags)


_COUNT_OPS = {
    "<": lambda a, b: a < b, "<=": lambda a, b: a <= b, ">": lambda a, b: a > b,
    ">=": lambda a, b: a >= b, "==": lambda a, b: a == b, "!=": lambda a, b: a != b,
}


def _header_hit(rule, target):
    if rule.op == "exists":
        return bool(target._index().get(rule.field))
    value = target.header(rule.field, rule.variant)
    if rule.variant == "count":
        return _COUNT_OPS[rule.op](value, rule.number)
    found = rule.pattern.regex.search(value) is not None
    return found if rule.op == "=~" else not found


def default_rules_text() -> str:
    """The built-in rules shipped with the package."""
    return resources.files(__package__).joinpath("default.rules").read_text("utf-8")


def load_rules(paths=(), default_rules=True) -> RuleSet:
    """A RuleSet from the built-in rules (unless told not) and ``paths``, in
    order. Blocking file reads and CPU work: at start-up or in a thread."""
    ruleset = RuleSet()
    if default_rules:
        try:
            ruleset.add_text(default_rules_text(), "default.rules")
        except OSError as e:
            ruleset.errors.append(f"default.rules: cannot read: {e}")
    for path in paths:
        ruleset.add_file(path)
    return ruleset.build()


def check_file(path: str) -> list:
    """The problems of one rule file on its own ("file:line: problem")."""
    ruleset = RuleSet()
    ruleset.add_file(path)
    ruleset.build()
    return ruleset.errors + ruleset.warnings


# ---------------------------------------------------------------------------
# The content filter.

@implementer(IContentFilter)
class RulesFilter:
    """The rules as a content filter: hits scored, the other filters' hits
    rescored, in a worker thread under a time budget per message.

    ``paths``: the administrator's rule files (absolute). ``run_in_thread``
    (f, *args) -> Deferred runs the evaluation (the reactor's thread pool by
    default); ``timer`` measures the budget (this thread's CPU time).
    """

    name = "rules"

    def __init__(self, paths=(), default_rules=True, time_budget=DEFAULT_BUDGET,
                 reactor=None, run_in_thread=None, timer=time.thread_time):
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor
        self.paths = tuple(paths)
        self.default_rules = default_rules
        self.time_budget = time_budget
        self.timer = timer
        self._run_in_thread = run_in_thread or self._in_pool
        self.ruleset = load_rules(self.paths, default_rules)
        self._report(self.ruleset)

    def _in_pool(self, f, *args):
        return threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(), f, *args)

    def _report(self, ruleset):
        for problem in ruleset.errors:
            log.error("rules: {problem} (skipped)", problem=problem)
        for problem in ruleset.warnings:
            log.warn("rules: {problem}", problem=problem)
        log.info("rules: {count} rules loaded ({files} files, {errors} errors)",
                 count=len(ruleset), files=len(ruleset.files) + bool(self.default_rules),
                 errors=len(ruleset.errors))

    def reload(self):
        """Read the rule files again (in a thread); the new rules apply to the
        next message. Returns a Deferred firing with the new RuleSet; on an
        unexpected failure the old rules stay."""
        d = defer.maybeDeferred(self._run_in_thread, load_rules, self.paths,
                                self.default_rules)

        def loaded(ruleset):
            self.ruleset = ruleset
            self._report(ruleset)
            return ruleset

        def failed(f):
            log.failure("rules: reload failed, the previous rules stay", f)
            return self.ruleset

        return d.addCallbacks(loaded, failed)

    def describe(self, name) -> str:
        return self.ruleset.describe(name)

    def scan(self, message, session):
        ruleset = self.ruleset
        # Copied here, in the reactor thread: the scan's dict may change
        # while the worker reads it if the scan gives up waiting for us.
        others = other_hits(message)
        d = defer.maybeDeferred(self._run_in_thread, ruleset.evaluate, message,
                                self.time_budget, self.timer, others)

        def done(result):
            hits, timed_out = result
            if timed_out:
                log.warn("rules: time budget of {budget}s spent, later rules not tried "
                         "(from {client})", budget=self.time_budget,
                         client=getattr(message, "client_ip", "") or "?")
            return ContentResult(hits=hits) if hits else None

        return d.addCallback(done)


_BUDGET = re.compile(r"^\s*(\d+(?:\.\d+)?|\.\d+)\s*(ms|s)?\s*$")


def parse_budget(value) -> float:
    """Seconds in ``0.2``, ``"0.2s"``, ``"200ms"`` (or any configuration
    duration such as ``"1m"``), at most 60."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    else:
        m = _BUDGET.match(str(value))
        if m:
            seconds = float(m.group(1)) / (1000 if m.group(2) == "ms" else 1)
        else:
            try:
                seconds = float(parse_duration(value))
            except (ValueError, TypeError):
                raise ValueError(f"time_budget: expected seconds like '0.2s' or '200ms', "
                                 f"got {value!r}")
    if not 0 < seconds <= 60:
        raise ValueError(f"time_budget: {value!r} is not between 0 and 60 seconds")
    return seconds


def filters(config, reactor, resolver, state=None, base_dir=None, run_in_thread=None):
    """[RulesFilter] when ``[antispam.rules] enabled``.

    Relative ``files`` are taken from ``base_dir``, by default the folder of
    the configuration file. ``resolver`` and ``state`` are not used.
    """
    section = getattr(getattr(config, "antispam", None), "rules", None)
    if section is not None and not getattr(section, "enabled", True):
        return []
    if base_dir is None:
        path = getattr(config, "path", "")
        base_dir = os.path.dirname(os.path.abspath(path)) if path else os.getcwd()
    files = getattr(section, "files", ()) or ()
    paths = [p if os.path.isabs(p) else os.path.join(base_dir, p) for p in files]
    return [RulesFilter(paths, default_rules=getattr(section, "default_rules", True),
                        time_budget=parse_budget(getattr(section, "time_budget",
                                                         DEFAULT_BUDGET)),
                        reactor=reactor, run_in_thread=run_in_thread)]
