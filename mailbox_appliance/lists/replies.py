"""The command robot's answers (lists.md section 1.3) and when it keeps quiet (1.1 step 1).

``drop_reason`` is asked first about every mail to the robot: it names why the
mail must be dropped without a reply (null sender, a DSN, an auto-reply, bulk
mail, our own loop, another robot, spam, a Message-ID seen today, no single
From mailbox) or says None. Robots answering robots is how list servers melt
down, so this errs on the side of silence.

``Results`` collects what happened to each command under Done, Pending,
Refused and Errors; ``build_reply`` makes the one reply per command mail from
it: from the robot, to the ``From:`` mailbox that was authorized (never
Reply-To: a forged request then only ever answers the real owner of the
address), ``Auto-Submitted: auto-replied`` and ``X-Loop``, UTF-8, at most
64 KiB, the original never attached.

``WindowLimit`` is the bounded in-memory counter behind the reply rate limit
(``ReplyRateLimit``, 10 replies per address per day) and the failed token
look-ups; ``RecentMessageIds`` remembers Message-IDs for a day. Clocks are
injected (a function returning seconds).
"""

from __future__ import annotations

import collections
import email.utils
import re
import urllib.parse
from dataclasses import dataclass, field
from email.header import decode_header, make_header
from email.message import EmailMessage

from mailbox_appliance.lists.addresses import address_ok

MAX_REPLY = 64 * 1024
MAX_HEADER = 998
SUBJECT = "Results of your commands"

# Senders that are robots (section 1.1 step 1), matched against the local part.
ROBOT_SENDERS = re.compile(
    r"^(mailer-daemon|listserv|majordomo|sympa|mailman|no-?reply|owner-.*|.*-request"
    r"|.*-bounces)$", re.IGNORECASE)
_MESSAGE_ID = re.compile(r"^<[!-;=?-~]{1,900}>$")   # printable ASCII without < >
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029]")

DONE, PENDING, REFUSED, ERRORS = "Done", "Pending", "Refused", "Errors"
SECTIONS = (DONE, PENDING, REFUSED, ERRORS)


# -- bounded counters ----------------------------------------------------------------------

class WindowLimit:
    """At most ``limit`` events per key in any ``window`` seconds, in bounded memory.

    ``hit(key)`` records an event and returns ALLOW, ALLOW_AND_ALERT (the event
    that reaches the limit: go ahead, and raise the one alert) or DENY (over
    the limit; not recorded, so a flood does not extend its own ban).
    At most ``max_keys`` keys are kept; beyond that the least recently used
    key is forgotten (memory stays bounded whatever the senders).
    """

    ALLOW = "allow"
    ALLOW_AND_ALERT = "allow+alert"
    DENY = "deny"

    def __init__(self, clock, limit, window, max_keys=10000):
        if limit < 1 or window <= 0 or max_keys < 1:
            raise ValueError("limit, window and max_keys must be positive")
        self._clock = clock
        self._limit = int(limit)
        self._window = float(window)
        self._max = int(max_keys)
        self._keys: collections.OrderedDict = collections.OrderedDict()

    def _recent(self, key, now):
        times = self._keys.get(key)
        if times is None:
            return None
        while times and times[0] <= now - self._window:
            times.popleft()
        if not times:
            del self._keys[key]
            return None
        return times

    def exhausted(self, key) -> bool:
        """Whether ``key`` has used its events in the current window (nothing recorded)."""
        times = self._recent(key, self._clock())
        return times is not None and len(times) >= self._limit

    def count(self, key) -> int:
        times = self._recent(key, self._clock())
        return len(times) if times else 0

    def hit(self, key) -> str:
        now = self._clock()
        times = self._recent(key, now)
        if times is None:
            times = collections.deque(maxlen=self._limit)
            self._keys[key] = times
            while len(self._keys) > self._max:
                self._keys.popitem(last=False)
        elif len(times) >= self._limit:
            self._keys.move_to_end(key)
            return self.DENY
        self._keys.move_to_end(key)
        times.append(now)
        return self.ALLOW_AND_ALERT if len(times) == self._limit else self.ALLOW

    def __len__(self):
        return len(self._keys)


class ReplyRateLimit:
    """At most 10 robot replies per address per 24 hours (section 1.3).

    ``check(address)`` before sending: SEND, SEND_AND_ALERT (the 10th: send it
    and send the listmaster one notice) or DROP (log it, send nothing).
    """

    SEND = WindowLimit.ALLOW
    SEND_AND_ALERT = WindowLimit.ALLOW_AND_ALERT
    DROP = WindowLimit.DENY

    def __init__(self, clock, limit=10, window=86400.0, max_addresses=100000):
        self._limit = WindowLimit(clock, limit, window, max_addresses)

    def check(self, address) -> str:
        return self._limit.hit(str(address).lower())


class RecentMessageIds:
    """Message-IDs the robot processed in the last 24 hours, at most ``max_ids`` of them.

    ``seen(message_id)`` says whether it was seen and remembers it;
    ``known`` only asks and ``remember`` only records, for callers that count
    a Message-ID as processed only once what it caused is committed (a mail
    whose work failed and is tried again must not be taken for a duplicate).
    An in-memory stand-in for a table; the oldest are forgotten first.
    """

    def __init__(self, clock, window=86400.0, max_ids=100000):
        self._clock = clock
        self._window = float(window)
        self._max = int(max_ids)
        self._ids: collections.OrderedDict = collections.OrderedDict()

    def _expire(self):
        now = self._clock()
        while self._ids:
            oldest, at = next(iter(self._ids.items()))
            if at > now - self._window:
                break
            del self._ids[oldest]
        return now

    @staticmethod
    def _key(message_id):
        return str(message_id).strip()[:MAX_HEADER]

    def known(self, message_id) -> bool:
        self._expire()
        return self._key(message_id) in self._ids

    def remember(self, message_id):
        now = self._expire()
        key = self._key(message_id)
        if not key:
            return
        self._ids.pop(key, None)
        self._ids[key] = now
        while len(self._ids) > self._max:
            self._ids.popitem(last=False)

    def seen(self, message_id) -> bool:
        if self.known(message_id):
            return True
        self.remember(message_id)
        return False


# -- headers of the incoming mail ----------------------------------------------------------

def message_id_of(msg) -> str | None:
    """The Message-ID of ``msg`` as received (unfolded, stripped), or None: the key
    of the duplicate checks."""
    return (raw_header(msg, "Message-ID") or "").strip() or None


def raw_header(msg, name, limit=8192) -> str | None:
    """The first ``name`` field of ``msg`` as received (unfolded, not decoded), bounded."""
    values = raw_headers(msg, name, limit, most=1)
    return values[0] if values else None


def raw_headers(msg, name, limit=8192, most=50) -> list[str]:
    """Up to ``most`` ``name`` fields as received, unfolded, each cut at ``limit``."""
    out = []
    lname = name.lower()
    for key, value in msg.raw_items():
        if key.lower() == lname:
            text = str(value)[:limit]
            out.append(re.sub(r"\r?\n[ \t]", " ", text).replace("\r", "").replace("\n", ""))
            if len(out) >= most:
                break
    return out


def decoded_header(value) -> str:
    """An unfolded field value with its RFC 2047 words decoded (bad charsets replaced)."""
    if value is None:
        return ""
    try:
        return str(make_header(decode_header(value)))
    except Exception:   # malformed encoded words: the raw text is the best we have
        return value


def sender_of(msg) -> str | None:
    """The single mailbox of ``From:`` in lower case, or None (zero, several, malformed)."""
    values = raw_headers(msg, "From", most=2)
    if len(values) != 1:
        return None
    # Parsed undecoded: an address is never RFC 2047-encoded, and decoding first
    # would let an encoded display name smuggle in a second address.
    pairs = email.utils.getaddresses([values[0]])
    addrs = [a for _, a in pairs if a]
    if len(addrs) != 1 or not address_ok(addrs[0]):
        return None
    return addrs[0].lower()


_MAILTO = re.compile(r"mailto:([^>?,\s]+)", re.I)


def field_names(value, address) -> bool:
    """Whether a field value (X-Loop, List-Post) names exactly ``address``, as a
    mailbox or a ``mailto:`` URI; another address that merely contains it
    (``bigteam@`` for ``team@``) is not it."""
    text = str(value or "")[:8192]
    found = {urllib.parse.unquote(m).lower() for m in _MAILTO.findall(text)}
    found.update(a.lower() for _, a in email.utils.getaddresses([text]) if a)
    found.add(text.strip().strip("<>").strip().lower())
    return address.lower() in found


def drop_reason(msg, envelope_sender, robot_address, own_address=None, spam=False,
                seen=None, robot_senders=ROBOT_SENDERS) -> str | None:
    """Why a mail to the robot gets no reply and no action (logged only), or None.

    ``envelope_sender``: MAIL FROM without brackets ("" for the null sender).
    ``own_address(addr) -> bool``: whether an address is one of ours (a list
    or robot address); mail from ourselves is a loop. ``seen(message_id) ->
    bool``: whether the robot processed that Message-ID in the last 24 hours
    (``RecentMessageIds.known``, the caller remembering it once the reply is
    committed; or ``RecentMessageIds.seen``), asked last so that only mail
    otherwise acceptable is remembered.
    """
    env = (envelope_sender or "").strip().strip("<>").strip()
    if not env:
        return "null envelope sender"
    ctype = (msg.get_content_type() or "").lower()
    if ctype == "multipart/report":
        return "delivery or disposition report"
    auto = raw_header(msg, "Auto-Submitted")
    if auto is not None:
        m = re.match(r"\s*([A-Za-z0-9-]*)", auto)     # the keyword, before ; or a comment
        if m.group(1).lower() != "no":
            return "auto-submitted"
    # Vacation programs that predate RFC 3834 mark their answers so.
    for legacy in ("X-Autoreply", "X-Autorespond", "X-Autoresponder"):
        if raw_header(msg, legacy) is not None:
            return "auto-submitted"
    for precedence in raw_headers(msg, "Precedence"):
        if precedence.strip().lower() in ("bulk", "junk", "list", "auto_reply"):
            ack = raw_header(msg, "X-Ack") or ""
            if ack.strip().lower() != "yes":
                return f"precedence {precedence.strip().lower()}"
    robot = robot_address.lower()
    for loop in raw_headers(msg, "X-Loop"):
        if field_names(loop, robot):
            return "X-Loop is ours"
    sender = sender_of(msg)
    if sender is None:
        return "no single From mailbox"
    for who in (env.lower(), sender):
        if who == robot or (own_address is not None and own_address(who)):
            return "sent by one of our own addresses"
        if robot_senders.match(who.rpartition("@")[0] or who):
            return "sender is a robot"
    if spam:
        return "spam"
    if seen is not None:
        mid = (raw_header(msg, "Message-ID") or "").strip()
        if mid and seen(mid):
            return "Message-ID already processed"
    return None


# -- the reply ---------------------------------------------------------------------------

def quote_line(line, limit=200) -> str:
    """A command line made safe to show: control characters as ``?``, cut at ``limit``."""
    text = _CONTROL.sub("?", str(line))
    return text if len(text) <= limit else text[:limit] + "..."


@dataclass
class Outcome:
    """What happened to one command: its section, the line as given, one or two lines said."""

    section: str
    line: str
    text: tuple[str, ...] = ()
    silent: bool = False      # ``reject,quiet``: nothing to say about it


@dataclass
class Results:
    """All outcomes of one command mail, and the notes that go with them."""

    outcomes: list = field(default_factory=list)
    notes: list = field(default_factory=list)   # e.g. "other parts were ignored"
    ignored_lines: int = 0
    max_outcomes: int = 200

    def add(self, section, line, *text, silent=False):
        """Record an outcome (beyond ``max_outcomes`` only counted, to bound the reply)."""
        if section not in SECTIONS:
            raise ValueError(f"no such section: {section!r}")
        if len(self.outcomes) < self.max_outcomes:
            self.outcomes.append(Outcome(section, line, tuple(str(t) for t in text[:2]),
                                         silent))

    def note(self, text):
        if len(self.notes) < 20 and text not in self.notes:
            self.notes.append(str(text))

    def needs_reply(self) -> bool:
        """False when there is nothing to say (all outcomes silent, no notes, none ignored)."""
        return bool(self.notes or self.ignored_lines
                    or any(not o.silent for o in self.outcomes))

    def body(self, limit=MAX_REPLY - 4096) -> str:
        """The text: sections in order, each entry quoting its line; bounded to ``limit`` bytes."""
        parts = []
        size = 0
        dropped = 0
        for section in SECTIONS:
            entries = [o for o in self.outcomes if o.section == section and not o.silent]
            if not entries:
                continue
            block = [f"{section}:", ""]
            for o in entries:
                entry = [f"> {quote_line(o.line)}"] + [
                    "  " + quote_line(t, 400) for t in o.text] + [""]
                cost = sum(len(e.encode("utf-8")) + 1 for e in entry)
                if size + cost > limit:
                    dropped += 1
                    continue
                size += cost
                block.extend(entry)
            parts.append("\n".join(block))
        tail = [quote_line(line, 400) for n in self.notes for line in n.split("\n")[:20]]
        if dropped:
            tail.append(f"{dropped} more results were not shown.")
        if self.ignored_lines:
            n = self.ignored_lines
            tail.append(f"{n} line{'' if n == 1 else 's'} ignored.")
        if tail:
            parts.append("\n".join(tail))
        return "\n".join(parts).rstrip("\n") + "\n"


def build_reply(results, robot_address, to, in_reply_to=None, references=None, date=None,
                message_id=None) -> EmailMessage | None:
    """The one results mail for a command mail, or None when there is nothing to say.

    ``to`` is the authorized ``From:`` mailbox of the command mail (``sender_of``),
    never its Reply-To. ``in_reply_to`` is the original Message-ID; malformed
    ids are left out rather than copied into a header. ``date`` (an RFC 5322
    date string) and ``message_id`` are made here when not given.
    """
    if not results.needs_reply():
        return None
    if not address_ok(to) or not address_ok(robot_address):
        raise ValueError("the reply needs a valid sender and recipient")
    msg = EmailMessage()
    msg["From"] = robot_address
    msg["To"] = to
    msg["Subject"] = SUBJECT
    msg["Date"] = date or email.utils.formatdate(usegmt=True)
    msg["Message-ID"] = message_id or email.utils.make_msgid(
        domain=robot_address.rpartition("@")[2])
    mid = (in_reply_to or "").strip()
    if _MESSAGE_ID.match(mid):
        msg["In-Reply-To"] = mid
        refs = [r for r in (references or "").split() if _MESSAGE_ID.match(r)][-10:]
        if mid not in refs:
            refs.append(mid)
        msg["References"] = " ".join(refs)
    msg["Auto-Submitted"] = "auto-replied"
    msg["X-Loop"] = robot_address
    # Asks Exchange-style responders not to answer the robot (one more loop closed).
    msg["X-Auto-Response-Suppress"] = "All"
    # The text is cut to a byte budget, but the transfer encoding (quoted-printable
    # or base64 for non-ASCII) inflates it: shrink until the whole mail fits.
    budget = MAX_REPLY - 4096
    for _ in range(12):
        msg.set_content(results.body(budget), charset="utf-8")
        if len(msg.as_bytes()) <= MAX_REPLY:
            break
        budget = budget * 2 // 3
    return msg
