"""The Bayesian filter: tokens of a message, their spam odds, one probability.

A message becomes a set of *tokens*: the words of its decoded text (HTML
already reduced to text by ``ScannedMessage``), the words of a few
decoded header fields prefixed by the field's name (``subject:cheap``),
the hosts of its links (``url:example.com``), the hosts and networks of
its Received: trail, the MIME types of its parts and the HTML elements
used, and words written in capitals apart (``caps:free``). Words are lower-cased and 3 to 20 characters long; a longer
run is summarised by its first character and its length in tens
(``skip:a 70``: a base64 line, a URL-ish blob), numbers by their digit
count (``num:4``). Every product is bounded (the text read, the values
read, the tokens kept): a 5 MB token, half a million distinct words or
10 MB of random base64 cost the same bounded time and memory as a big
ordinary message (security.md H6).

Each token's spam probability is Gary Robinson's f(w): the ratio of the
token's frequency in learned spam to its frequency in both, pulled
towards x = 0.5 with strength s = 1 when it has been seen rarely. The
``MAX_CLUES`` tokens farthest from 0.5 (at least ``MIN_STRENGTH`` away)
are combined with Fisher's chi-square method (as SpamBayes does): the
result is near 1 for spam, near 0 for ham, and near 0.5 when the evidence
is weak or contradictory.

The probability becomes one of SpamAssassin's hits, ``BAYES_00`` (below
0.01) ... ``BAYES_99`` (0.99 and above), which the rules score, and
``message.facts["bayes"]``. Until the database has learned ``min_spam``
spam and ``min_ham`` ham messages the filter gives no opinion (no hit,
the fact is None) and says so in an ``X-Spam-Bayes:`` field.

Tokens are stored as 64-bit hashes (``token_id``): the database holds no
words of anybody's mail, and lookups compare integers.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass, field

from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from mailbox_appliance.antispam.content import ContentResult, IContentFilter

log = Logger(namespace="mailbox_appliance.antispam.bayes")

# -- bounds of the tokeniser ---------------------------------------------------------------

MAX_TOKENS = 3000           # distinct tokens kept per message
MIN_WORD, MAX_WORD = 3, 20  # word lengths kept as such
MAX_TEXT = 256 * 1024       # characters of decoded text read
MAX_VALUE = 2048            # characters of one header value read
MAX_RECEIVED = 20           # Received: fields read (the newest first)
MAX_ADDRESSES = 20          # addresses of one To:/Cc: read
MAX_URIS = 100              # links read
MAX_BODY_SCAN = 64 * 1024   # octets of raw body searched for part headers
MAX_PART_TYPES = 50
MAX_TAGS = 500              # HTML start tags read

# -- the classifier ---------------------------------------------------------------------------

ROBINSON_S = 1.0            # strength of the prior for rare tokens
ROBINSON_X = 0.5            # the prior: a token never seen says nothing
# |f(w) - 0.5| a token needs to be a clue. SpamBayes uses 0.1; on the
# public corpus 0.2 caught 97% of spam at BAYES_95 instead of 96% with the
# same false positives (bench/bayes_eval.py): fewer weak, correlated clues
# (mailing-list fields) pulling spam sent through lists towards 0.5.
MIN_STRENGTH = 0.2
MAX_CLUES = 150

# The bands of SpamAssassin's BAYES_ rules: (lower bound, hit, default score).
# The rules file rescores them; these defaults are the default rules' own.
BANDS = (
    (0.99, "BAYES_99", 3.6),
    (0.95, "BAYES_95", 3.0),
    (0.80, "BAYES_80", 2.1),
    (0.60, "BAYES_60", 1.2),
    (0.40, "BAYES_50", 0.6),
    (0.20, "BAYES_40", 0.0),
    (0.05, "BAYES_20", -0.2),
    (0.01, "BAYES_05", -0.7),
    (0.0, "BAYES_00", -2.0),
)
SPAM_THRESHOLD = 0.95       # BAYES_95 and above: what bench/bayes_eval.py calls spam


def band(probability):
    """(hit name, default score) of a probability."""
    for low, name, score in BANDS:
        if probability >= low:
            return name, score
    return BANDS[-1][1], BANDS[-1][2]


# -- tokens -----------------------------------------------------------------------------------

_STRIP = "\"'`.,;:!?()[]{}<>*_=~|+-/\\#&^%"
_LINK_IN_TEXT = re.compile(r"(?i)\b(?:https?://|ftp://|www\.)\S+")
_NUMBER = re.compile(r"^[$£€]?[0-9][0-9.,]*[%]?$")
_ADDRESS = re.compile(r"[^\s<>\"',;:()@]{1,64}@([A-Za-z0-9.-]{1,253})")
_RECEIVED_NAME = re.compile(r"(?i)\b([a-z0-9-]{1,63}(?:\.[a-z0-9-]{1,63}){1,10})\b")
_RECEIVED_WITH = re.compile(r"(?i)\bwith\s+([a-z0-9-]{1,20})")
_IPV4 = re.compile(r"\[?(\d{1,3})\.(\d{1,3})\.(\d{1,3})\.\d{1,3}\]?")
_PART_TYPE = re.compile(rb"(?im)^content-type:[ \t]*([a-z0-9.+-]{1,40}/[a-z0-9.+-]{1,60})"
                        rb"(?:[^\r\n]{0,200}?charset=\"?([a-z0-9._-]{1,40}))?")
_PART_ENCODING = re.compile(rb"(?im)^content-transfer-encoding:[ \t]*([a-z0-9-]{1,30})")
_TAG = re.compile(r"<([a-zA-Z][a-zA-Z0-9]{0,15})\b")
_HOST = re.compile(r"^[a-z0-9.-]{1,253}$")

# Header fields whose words are tokens (prefixed with the name); addresses
# are handled apart.
_WORD_FIELDS = ("subject",)
_WHOLE_FIELDS = {"x-mailer": "xmailer", "user-agent": "xmailer", "x-mimeole": "xmimeole",
                 "precedence": "precedence", "list-id": "listid", "importance": "importance",
                 "x-priority": "xpriority", "content-transfer-encoding": "cte"}
def token_id(token: str) -> int:
    """The signed 64-bit integer a token is stored under."""
    digest = hashlib.blake2b(token.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


class _Tokens:
    """A bounded set of tokens (insertion stops at MAX_TOKENS)."""

    def __init__(self, limit=MAX_TOKENS):
        self.seen = set()
        self.limit = limit

    @property
    def full(self):
        return len(self.seen) >= self.limit

    def add(self, token):
        if len(self.seen) < self.limit:
            self.seen.add(token)


def _words(text, prefix, out, limit=None):
    """The word tokens of ``text`` (module docstring), each with ``prefix``.

    ``text`` is bounded by the caller (MAX_TEXT, MAX_VALUE). The runs are
    split and de-duplicated in C (first occurrence order, so which tokens a
    message over MAX_TOKENS keeps does not vary): a 10 KiB message has
    some 1,500 runs but only a few hundred distinct ones to look at here.
    """
    if limit is not None:
        text = text[:limit]
    seen, cap = out.seen, out.limit
    for run in dict.fromkeys(text.split()):
        if len(seen) >= cap:
            return
        n = len(run)
        if n > 3 * MAX_WORD:
            seen.add(f"{prefix}skip:{run[0].lower()} {min(n, 1000) // 10 * 10}")
            continue
        bare = run.strip(_STRIP)
        n = len(bare)
        if n < MIN_WORD:
            continue
        word = bare.lower()
        if n > MAX_WORD:
            if "@" in word:
                _address_tokens(word, prefix + "email:", out)
            else:
                seen.add(f"{prefix}skip:{word[0]} {n // 10 * 10}")
        elif word[0].isdigit() or word[0] in "$£€":
            if _NUMBER.match(word):
                digits = sum(c.isdigit() for c in word)
                seen.add(f"{prefix}num:{'' if word[0].isdigit() else word[0]}{digits}")
            else:
                seen.add(prefix + word)
        else:
            seen.add(prefix + word)
            # SHOUTED words apart: "FREE" is not as innocent as "free".
            if n >= 4 and bare.isupper() and bare.isalpha():
                seen.add(prefix + "caps:" + word)


def _domain_tokens(host, prefix, out, levels=3):
    """``prefix`` + the host and its parent domains (at most ``levels`` + 1)."""
    host = host.strip(".").lower()
    if not host or not _HOST.match(host):
        return
    if _IPV4.fullmatch(host):
        out.add(prefix + "ip")
        out.add(prefix + ".".join(host.split(".")[:3]))
        return
    labels = host.split(".")
    out.add(prefix + host)
    for k in range(1, min(len(labels) - 1, levels) + 1):
        out.add(prefix + ".".join(labels[k:]))


def _address_tokens(value, prefix, out):
    for m in _ADDRESS.finditer(value[:MAX_VALUE]):
        _domain_tokens(m.group(1), prefix, out, levels=1)
        break


def _header_tokens(message, out):
    # Only chosen fields: the words of every field, and which fields are
    # present, were tried and cost recall (bench/bayes_eval.py), since the
    # many correlated fields of a mailing list outvote the spam sent
    # through it.
    for name in _WORD_FIELDS:
        for value in message.get_all(name)[:2]:
            _words(value, name + ":", out, MAX_VALUE)
            # Shouting and punctuation in the subject are clues themselves.
            if re.search(r"[!?$]{2}", value[:MAX_VALUE]):
                out.add(name + ":punct")
            letters = [c for c in value[:200] if c.isalpha()]
            if len(letters) >= 8 and sum(c.isupper() for c in letters) > 0.7 * len(letters):
                out.add(name + ":upper")
    for name, tag in _WHOLE_FIELDS.items():
        value = message.get(name)
        if value:
            out.add(f"{tag}:{' '.join(value[:60].lower().split())}")

    sender = message.get("from") or ""
    if sender:
        value = sender[:MAX_VALUE]
        m = _ADDRESS.search(value)
        if m:
            out.add("from:addr:" + m.group(0).lower())
            _domain_tokens(m.group(1), "from:domain:", out, levels=1)
            value = value.replace(m.group(0), " ")
        else:
            out.add("from:noaddr")
        _words(value, "from:", out)
    else:
        out.add("from:none")
    for name in ("to", "cc"):
        count = 0
        for value in message.get_all(name)[:3]:
            for m in _ADDRESS.finditer(value[:MAX_VALUE]):
                count += 1
                if count <= MAX_ADDRESSES:
                    _domain_tokens(m.group(1), name + ":domain:", out, levels=1)
        if message.get_all(name):
            out.add(f"{name}:count:{_bucket(count)}")
    reply = message.get("reply-to")
    if reply:
        _address_tokens(reply, "reply-to:", out)
    mid = message.get("message-id")
    if mid:
        host = mid[:MAX_VALUE].rsplit("@", 1)[-1].strip("<> ") if "@" in mid else ""
        _domain_tokens(host, "msgid:", out, levels=1) if host else out.add("msgid:nohost")
    else:
        out.add("msgid:none")

    for value in message.get_all("received")[:MAX_RECEIVED]:
        value = value[:MAX_VALUE]
        for host in _RECEIVED_NAME.findall(value):
            if "." in host:
                _domain_tokens(host, "rcvd:", out, levels=1)
        for m in _IPV4.finditer(value):
            out.add("rcvd:net:" + ".".join(m.groups()))
        for word in _RECEIVED_WITH.findall(value):
            out.add("rcvd:with:" + word.lower())

    ctype = message.get("content-type")
    if ctype:
        main = ctype[:200].split(";", 1)[0].strip().lower()
        out.add("ctype:" + main[:60])
        cs = re.search(r"(?i)charset=\"?([a-z0-9._-]{1,40})", ctype[:MAX_VALUE])
        if cs:
            out.add("charset:" + cs.group(1).lower())


def _bucket(n):
    """A count as a coarse bucket (0, 1, 2, 3-5, 6-10, more)."""
    return n if n <= 2 else ("3-5" if n <= 5 else ("6-10" if n <= 10 else "many"))


def _body_tokens(message, out):
    # The MIME types, charsets and encodings of the parts: found in the raw
    # body (bounded), since ScannedMessage keeps only the text.
    body = message.body[:MAX_BODY_SCAN]
    for i, m in enumerate(_PART_TYPE.finditer(body)):
        if i >= MAX_PART_TYPES:
            break
        out.add("part:" + m.group(1).decode("ascii").lower())
        if m.group(2):
            out.add("part:charset:" + m.group(2).decode("ascii").lower())
    for i, m in enumerate(_PART_ENCODING.finditer(body)):
        if i >= MAX_PART_TYPES:
            break
        out.add("part:cte:" + m.group(1).decode("ascii").lower())

    for uri in message.uris[:MAX_URIS]:
        if out.full:
            break
        _uri_tokens(uri, out)

    # The names of the HTML elements used (their attributes were tried
    # too: they flagged newsletters as spam).
    if "<" in message.rawbody:
        for i, m in enumerate(_TAG.finditer(message.rawbody, 0, MAX_TEXT)):
            if i >= MAX_TAGS:
                break
            out.add("html:" + m.group(1).lower())
    text = message.text[:MAX_TEXT]
    if not text.strip():
        out.add("text:empty")
    # Links were tokenised by host above: here they would be long runs.
    text = _LINK_IN_TEXT.sub(" ", text)
    _words(text, "", out)


def _uri_tokens(uri, out):
    u = uri[:500].strip()
    low = u.lower()
    if low.startswith("mailto:"):
        _address_tokens(u[7:], "mailto:", out)
        return
    scheme, sep, rest = low.partition("://")
    if not sep:
        scheme, rest = ("http" if low.startswith("www.") else "other"), low
    out.add("proto:" + scheme[:10])
    host = re.split(r"[/?#]", rest, 1)[0]
    host = host.rsplit("@", 1)[-1].split(":", 1)[0]
    _domain_tokens(host, "url:", out, levels=2)
    if "%" in rest[:200] and re.search(r"%[0-9a-f]{2}", rest[:200]):
        out.add("url:escaped")


def tokenise(message) -> set:
    """The distinct tokens of a ScannedMessage (at most MAX_TOKENS; CPU work)."""
    out = _Tokens()
    _header_tokens(message, out)
    _body_tokens(message, out)
    return out.seen


def token_ids(tokens) -> list:
    return [token_id(t) for t in tokens]


# -- the classifier --------------------------------------------------------------------------

def chi2q(x2, v):
    """P(chi-square with ``v`` (even) degrees of freedom >= ``x2``)."""
    m = x2 / 2.0
    term = total = math.exp(-m)
    for i in range(1, v // 2):
        term *= m / i
        total += term
    return min(total, 1.0)


def token_probability(spam, ham, nspam, nham):
    """Robinson's f(w) of a token seen in ``spam`` of ``nspam`` spam and
    ``ham`` of ``nham`` ham messages learned."""
    n = spam + ham
    if n == 0:
        return ROBINSON_X
    spam_ratio = spam / nspam if nspam else 0.0
    ham_ratio = ham / nham if nham else 0.0
    if spam_ratio + ham_ratio == 0:
        return ROBINSON_X
    p = spam_ratio / (spam_ratio + ham_ratio)
    return (ROBINSON_S * ROBINSON_X + n * p) / (ROBINSON_S + n)


def combine(probabilities):
    """Fisher's chi-square combining of token probabilities: 0 (ham) .. 1 (spam)."""
    n = len(probabilities)
    if not n:
        return 0.5
    log_ham = sum(math.log(p) for p in probabilities)
    log_spam = sum(math.log(1.0 - p) for p in probabilities)
    spamminess = 1.0 - chi2q(-2.0 * log_spam, 2 * n)
    hamminess = 1.0 - chi2q(-2.0 * log_ham, 2 * n)
    return (spamminess - hamminess + 1.0) / 2.0


@dataclass
class Classification:
    """What the database said about a message.

    ``probability`` is None when the database has not learned enough
    (``nspam`` < min_spam or ``nham`` < min_ham); ``clues`` are the tokens'
    probabilities used, ``user`` whose counts joined the global ones.
    """

    probability: float | None
    nspam: int
    nham: int
    user: str = ""
    clues: int = 0
    tokens: int = 0
    details: list = field(default_factory=list)


def classify_counts(ids, counts, nspam, nham):
    """(probability, clues used) for token ids given their {id: (spam, ham)}."""
    clues = []
    for tid in ids:
        c = counts.get(tid)
        if c is None:
            continue
        f = token_probability(c[0], c[1], nspam, nham)
        strength = abs(f - 0.5)
        if strength >= MIN_STRENGTH:
            clues.append((strength, f))
    if len(clues) > MAX_CLUES:
        clues.sort(reverse=True)
        clues = clues[:MAX_CLUES]
    return combine([f for _, f in clues]), len(clues)


def classify_in_thread(conn, message, user, min_spam, min_ham, cache=None):
    """Tokenise ``message`` and judge it with the database on ``conn`` (a thread's).

    ``user``'s counts are added to the global ones ("" = global only);
    ``cache`` is the thread's ``bayes_store.CountCache``, if any.
    """
    from mailbox_appliance.antispam import bayes_store
    ids = token_ids(tokenise(message))
    counts, nspam, nham = bayes_store.lookup(conn, ids, user, cache)
    result = Classification(None, nspam, nham, user=user, tokens=len(ids))
    if nspam < min_spam or nham < min_ham:
        return result
    result.probability, result.clues = classify_counts(ids, counts, nspam, nham)
    return result


# -- the filter -----------------------------------------------------------------------------

def user_key(address) -> str:
    """The key a user's tokens are kept under: the address, lower-case."""
    return str(address).strip().strip("<>").lower()[:320]


@implementer(IContentFilter)
class BayesFilter:
    """The content filter "bayes" (module docstring).

    ``store`` is the running token database (``state.IBayesStore``). With ``per_user``,
    a message for one recipient of a ``local_domains`` domain is judged
    with that recipient's learned tokens added to the global ones. Users
    learn under their primary address (their Maildir's, what IMAP knows);
    with a ``directory`` (IDirectory) a recipient that is another address
    of a user is judged with that user's tokens.
    """

    name = "bayes"

    def __init__(self, store, min_spam=200, min_ham=200, per_user=True, local_domains=(),
                 directory=None):
        self.store = store
        self.min_spam = min_spam
        self.min_ham = min_ham
        self.per_user = per_user
        self.local_domains = {d.lower() for d in local_domains}
        self.directory = directory

    def user_for(self, message) -> str:
        """The user whose tokens join the global ones for ``message`` ("" = none)."""
        if not self.per_user or len(message.recipients) != 1:
            return ""
        address = user_key(message.recipients[0])
        domain = address.rpartition("@")[2]
        if not domain or (self.local_domains and domain not in self.local_domains):
            return ""
        return address

    def scan(self, message, session):
        d = defer.succeed(self.user_for(message))
        if self.directory is not None:
            d.addCallback(self._primary)
        d.addCallback(lambda user: self.store.classify(message, user, self.min_spam,
                                                       self.min_ham))
        return d.addCallback(self._result, message)

    def _primary(self, address):
        """The primary address of the user ``address`` belongs to (else itself)."""
        if not address:
            return address

        def found(resolution):
            user = getattr(resolution, "user", None)
            return user_key(user.mail) if resolution.known and user is not None else address
        # The directory being down costs only the per-user part.
        return defer.maybeDeferred(self.directory.lookup, address).addCallbacks(
            found, lambda f: address)

    def _result(self, c, message):
        message.facts["bayes"] = c.probability
        if c.probability is None:
            return ContentResult(headers=[(
                "X-Spam-Bayes", f"not enough training ({c.nspam} spam, {c.nham} ham "
                                f"learned; {self.min_spam} spam and {self.min_ham} ham needed)")])
        name, score = band(c.probability)
        return ContentResult(hits={name: score})


def filters(config, reactor, resolver, state=None):
    """The Bayes filter of the configuration: [] when off or without its store.

    ``state`` is the dict of shared services the registry passes: the
    running ``BayesStore`` is ``state["bayes"]`` (``open_bayes`` made it),
    the directory (optional: aliases judged as their user) ``state["directory"]``.
    """
    b = config.antispam.bayes
    if not b.enabled:
        return []
    store = state.get("bayes") if isinstance(state, dict) else None
    if store is None:
        log.warn("Bayes filter enabled but no token database was opened: not run")
        return []
    return [BayesFilter(store, min_spam=b.min_spam, min_ham=b.min_ham,
                        per_user=b.per_user, local_domains=config.server.domains,
                        directory=state.get("directory"))]


def open_bayes(config, reactor):
    """The token database service on ``data_dir/bayes.sqlite3`` (not started), or
    None when the filter is off."""
    from mailbox_appliance.antispam import bayes_store
    return bayes_store.open_bayes(config, reactor)
