"""The list server's tables in the state database (``state.sqlite3``).

Lists, their members (display name, reception mode, bounce score), their
owners and moderators, and the held requests (posts awaiting confirmation
or moderation, subscriptions awaiting confirmation or approval) with the
hash of the token that releases them. The SQL is in plain functions taking
a connection, as in ``state.py``: the running appliance calls them through
``state.SQLiteStateStore`` (``IListStore``, one thread), the admin command
directly. Every text stored is bounded; a list holds at most
``MAX_MEMBERS`` members and ``MAX_HELD`` held requests.

Addresses are stored lower-cased: two spellings of one mailbox are one
member (the local part is case-sensitive in RFC 5321, but no mail system
in use treats it so, and a list must not mail someone twice).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

# The naming and address rules are the list addresses' (lists.md section 0).
from mailbox_appliance.lists.addresses import MAX_ADDRESS, address_ok, list_name_ok

SCHEMA = """
CREATE TABLE IF NOT EXISTS lists (
    id INTEGER PRIMARY KEY,
    address TEXT NOT NULL UNIQUE,
    subject TEXT NOT NULL DEFAULT '',
    settings TEXT NOT NULL DEFAULT '{}',
    created REAL NOT NULL,
    post_sequence INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS list_members (
    list_id INTEGER NOT NULL REFERENCES lists (id) ON DELETE CASCADE,
    address TEXT NOT NULL,
    name TEXT NOT NULL DEFAULT '',
    mode TEXT NOT NULL DEFAULT 'mail',
    joined REAL NOT NULL,
    bounce_score REAL NOT NULL DEFAULT 0,
    last_bounce REAL NOT NULL DEFAULT 0,
    disabled_since REAL NOT NULL DEFAULT 0,
    concealed INTEGER NOT NULL DEFAULT 0,
    bounce_notices INTEGER NOT NULL DEFAULT 0,
    id INTEGER PRIMARY KEY,
    UNIQUE (list_id, address)
);
CREATE TABLE IF NOT EXISTS list_roles (
    list_id INTEGER NOT NULL REFERENCES lists (id) ON DELETE CASCADE,
    address TEXT NOT NULL,
    role TEXT NOT NULL,
    name TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (list_id, address, role)
);
CREATE TABLE IF NOT EXISTS list_held (
    id INTEGER PRIMARY KEY,
    list_id INTEGER NOT NULL REFERENCES lists (id) ON DELETE CASCADE,
    kind TEXT NOT NULL,
    token_hash BLOB NOT NULL UNIQUE,
    action TEXT NOT NULL DEFAULT '',
    target TEXT NOT NULL DEFAULT '',
    requester TEXT NOT NULL DEFAULT '',
    name TEXT NOT NULL DEFAULT '',
    subject TEXT NOT NULL DEFAULT '',
    message BLOB,
    created REAL NOT NULL,
    expires REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    handled_by TEXT NOT NULL DEFAULT '',
    handled_at REAL NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS list_posts_seen (
    list_id INTEGER NOT NULL REFERENCES lists (id) ON DELETE CASCADE,
    message_id TEXT NOT NULL,
    seen REAL NOT NULL,
    PRIMARY KEY (list_id, message_id)
);
CREATE INDEX IF NOT EXISTS list_posts_seen_time ON list_posts_seen (seen);
CREATE INDEX IF NOT EXISTS list_held_expires ON list_held (expires);
CREATE INDEX IF NOT EXISTS list_held_list ON list_held (list_id, created)
"""

ROLES = ("owner", "moderator")
# Reception modes (SET LIST mode, lists.md 1.2); CONCEAL/NOCONCEAL set ``concealed``.
MODES = ("mail", "nomail", "digest", "digestplain", "summary", "notice", "not_me")
HELD_KINDS = ("post", "moderation", "request", "approval")

MAX_NAME = 100
MAX_SUBJECT = 200
MAX_SETTINGS = 16 * 1024
MAX_MESSAGE = 50 * 1024 * 1024
# Held message bytes per list and in all: held posts share the state file
# (and its thread) with the greylist, so a flood of posts to a moderated
# list must not fill the disk.
MAX_HELD_BYTES = 256 * 1024 * 1024
MAX_ALL_HELD_BYTES = 2 * 1024 * 1024 * 1024
MAX_MEMBERS = 1_000_000
MAX_HELD = 10_000
MAX_LISTS = 10_000



class ListError(ValueError):
    """A request the list tables refuse (bad name, no such list, a bound reached)."""


@dataclass(frozen=True)
class MailingList:
    """One list as stored."""

    id: int
    address: str
    subject: str
    settings: dict = field(default_factory=dict)
    created: float = 0.0
    post_sequence: int = 0

    @property
    def name(self) -> str:
        return self.address.partition("@")[0]

    @property
    def domain(self) -> str:
        return self.address.partition("@")[2]


@dataclass(frozen=True)
class Member:
    """One member of a list."""

    id: int
    address: str
    name: str = ""
    mode: str = "mail"
    joined: float = 0.0
    bounce_score: float = 0.0
    last_bounce: float = 0.0
    disabled_since: float = 0.0
    concealed: bool = False     # left out of REVIEW for everyone but owners
    bounce_notices: int = 0     # notices sent since delivery was disabled


@dataclass(frozen=True)
class Held:
    """A held post or request, released by the token whose hash it keeps."""

    id: int
    list_address: str
    kind: str
    token_hash: bytes
    action: str = ""
    target: str = ""
    requester: str = ""
    name: str = ""
    subject: str = ""
    created: float = 0.0
    expires: float = 0.0
    attempts: int = 0
    handled_by: str = ""
    handled_at: float = 0.0


def _address(address):
    if not address_ok(address):
        raise ListError(f"not an address: {str(address)[:80]!r}")
    return address.lower()


def _text(value, limit):
    text = "".join(c for c in str(value or "") if c.isprintable())
    return text[:limit]


def _list_row(row):
    if row is None:
        return None
    return MailingList(row[0], row[1], row[2], json.loads(row[3]), row[4], row[5])


# -- lists ---------------------------------------------------------------------------------

def create_list(conn, address, subject="", settings=None, now=0.0, robot="lists"):
    """A new list; ListError when the name is taken, reserved or malformed."""
    address = _address(address)
    if not list_name_ok(address.partition("@")[0], robot):
        raise ListError(f"not a valid list name: {address.partition('@')[0]!r}")
    encoded = json.dumps(settings or {}, sort_keys=True)
    if len(encoded) > MAX_SETTINGS:
        raise ListError("list settings too large")
    if conn.execute("SELECT count(*) FROM lists").fetchone()[0] >= MAX_LISTS:
        raise ListError(f"at most {MAX_LISTS} lists")
    try:
        cur = conn.execute("INSERT INTO lists (address, subject, settings, created) "
                           "VALUES (?,?,?,?)", (address, _text(subject, MAX_SUBJECT),
                                                encoded, now))
    except Exception as e:
        if "UNIQUE" in str(e):
            raise ListError(f"{address} already exists") from None
        raise
    return get_list(conn, address) if cur.lastrowid else None


def get_list(conn, address):
    """The MailingList at ``address``, or None."""
    if not isinstance(address, str) or len(address) > MAX_ADDRESS:
        return None
    row = conn.execute("SELECT id, address, subject, settings, created, post_sequence "
                       "FROM lists WHERE address = ?", (address.lower(),)).fetchone()
    return _list_row(row)


def all_lists(conn, domain=None):
    sql = "SELECT id, address, subject, settings, created, post_sequence FROM lists"
    if domain is None:
        rows = conn.execute(sql + " ORDER BY address")
    else:
        rows = conn.execute(sql + " WHERE address LIKE ? ESCAPE '\\' ORDER BY address",
                            ("%@" + domain.lower().replace("%", "\\%").replace("_", "\\_"),))
    return [_list_row(r) for r in rows]


def update_list(conn, address, subject=None, settings=None):
    """Change a list's subject or settings (a dict replacing the old one)."""
    ml = _existing(conn, address)
    if subject is not None:
        conn.execute("UPDATE lists SET subject = ? WHERE id = ?",
                     (_text(subject, MAX_SUBJECT), ml.id))
    if settings is not None:
        encoded = json.dumps(settings, sort_keys=True)
        if len(encoded) > MAX_SETTINGS:
            raise ListError("list settings too large")
        conn.execute("UPDATE lists SET settings = ? WHERE id = ?", (encoded, ml.id))
    return get_list(conn, address)


def delete_list(conn, address):
    """Delete a list with its members, roles and held requests; 1 if it existed."""
    ml = get_list(conn, address)
    if ml is None:
        return 0
    for table in ("list_members", "list_roles", "list_held", "list_posts_seen"):
        conn.execute(f"DELETE FROM {table} WHERE list_id = ?", (ml.id,))
    return conn.execute("DELETE FROM lists WHERE id = ?", (ml.id,)).rowcount


def next_post(conn, address):
    """The next post sequence number of the list (for VERP tags and archives)."""
    ml = _existing(conn, address)
    conn.execute("UPDATE lists SET post_sequence = post_sequence + 1 WHERE id = ?", (ml.id,))
    return ml.post_sequence + 1


def _existing(conn, address):
    ml = get_list(conn, address)
    if ml is None:
        raise ListError(f"no such list: {str(address)[:80]}")
    return ml


# -- members -------------------------------------------------------------------------------

_MEMBER = ("id, address, name, mode, joined, bounce_score, last_bounce, disabled_since, "
           "concealed, bounce_notices")


def add_member(conn, list_address, address, name="", mode="mail", now=0.0):
    """Subscribe ``address``: True if added, False if already a member."""
    ml = _existing(conn, list_address)
    address = _address(address)
    if mode not in MODES:
        raise ListError(f"unknown reception mode {mode!r}")
    if conn.execute("SELECT 1 FROM list_members WHERE list_id = ? AND address = ?",
                    (ml.id, address)).fetchone():
        return False
    if count_members(conn, list_address) >= MAX_MEMBERS:
        raise ListError(f"{ml.address} has {MAX_MEMBERS} members, the most a list may have")
    conn.execute("INSERT INTO list_members (list_id, address, name, mode, joined) "
                 "VALUES (?,?,?,?,?)", (ml.id, address, _text(name, MAX_NAME), mode, now))
    return True


def remove_member(conn, list_address, address):
    """Unsubscribe ``address``: True if it was a member."""
    ml = _existing(conn, list_address)
    if not address_ok(address):
        return False
    return conn.execute("DELETE FROM list_members WHERE list_id = ? AND address = ?",
                        (ml.id, address.lower())).rowcount > 0


def get_member(conn, list_address, address):
    ml = get_list(conn, list_address)
    if ml is None or not address_ok(address):
        return None
    row = conn.execute(f"SELECT {_MEMBER} FROM list_members WHERE list_id = ? AND address = ?",
                       (ml.id, address.lower())).fetchone()
    return Member(*row) if row else None


MAX_MESSAGE_ID = 998


def post_seen(conn, list_address, message_id, since):
    """Whether the list took a post with this Message-ID after ``since``."""
    ml = get_list(conn, list_address)
    if ml is None or not message_id:
        return False
    return conn.execute("SELECT 1 FROM list_posts_seen WHERE list_id = ? AND message_id = ? "
                        "AND seen > ?", (ml.id, str(message_id)[:MAX_MESSAGE_ID],
                                         since)).fetchone() is not None


def remember_post(conn, list_address, message_id, now):
    """Record that the list took the post with this Message-ID (lists.md 4.2: the
    duplicate check keeps them 7 days, across restarts)."""
    ml = get_list(conn, list_address)
    if ml is None or not message_id:
        return
    conn.execute("INSERT OR REPLACE INTO list_posts_seen (list_id, message_id, seen) "
                 "VALUES (?, ?, ?)", (ml.id, str(message_id)[:MAX_MESSAGE_ID], now))


def forget_posts(conn, before):
    """Drop the Message-IDs recorded before ``before``; how many."""
    return conn.execute("DELETE FROM list_posts_seen WHERE seen < ?", (before,)).rowcount


def member_by_id(conn, list_address, member_id):
    """The Member whose id is ``member_id`` (a VERP tag names members by id), or None."""
    ml = get_list(conn, list_address)
    if ml is None or not isinstance(member_id, int):
        return None
    row = conn.execute(f"SELECT {_MEMBER} FROM list_members WHERE list_id = ? AND id = ?",
                       (ml.id, member_id)).fetchone()
    return Member(*row) if row else None


def members(conn, list_address, limit=None, after=""):
    """Members in address order, ``limit`` at a time after the address ``after``
    (a list of 10,000 is read in pages, never all into memory at once)."""
    ml = _existing(conn, list_address)
    sql = (f"SELECT {_MEMBER} FROM list_members WHERE list_id = ? AND address > ? "
           "ORDER BY address")
    args = (ml.id, after.lower())
    if limit is not None:
        sql += " LIMIT ?"
        args += (int(limit),)
    return [Member(*r) for r in conn.execute(sql, args)]


def count_members(conn, list_address):
    ml = _existing(conn, list_address)
    return conn.execute("SELECT count(*) FROM list_members WHERE list_id = ?",
                        (ml.id,)).fetchone()[0]


def set_member(conn, list_address, address, name=None, mode=None, bounce_score=None,
               last_bounce=None, disabled_since=None, concealed=None, bounce_notices=None):
    """Change what is given of a member; True if the member exists."""
    ml = _existing(conn, list_address)
    changes = []
    if name is not None:
        changes.append(("name", _text(name, MAX_NAME)))
    if mode is not None:
        if mode not in MODES:
            raise ListError(f"unknown reception mode {mode!r}")
        changes.append(("mode", mode))
    for column, value in (("bounce_score", bounce_score), ("last_bounce", last_bounce),
                          ("disabled_since", disabled_since)):
        if value is not None:
            changes.append((column, float(value)))
    if concealed is not None:
        changes.append(("concealed", 1 if concealed else 0))
    if bounce_notices is not None:
        changes.append(("bounce_notices", int(bounce_notices)))
    if not changes or not address_ok(address):
        return get_member(conn, list_address, address) is not None
    sets = ", ".join(f"{c} = ?" for c, _ in changes)
    return conn.execute(f"UPDATE list_members SET {sets} WHERE list_id = ? AND address = ?",
                        tuple(v for _, v in changes) + (ml.id, address.lower())).rowcount > 0


# -- owners and moderators -----------------------------------------------------------------

def add_role(conn, list_address, address, role, name=""):
    """Make ``address`` an owner or moderator: True if it was not one yet."""
    ml = _existing(conn, list_address)
    if role not in ROLES:
        raise ListError(f"unknown role {role!r}")
    address = _address(address)
    return conn.execute("INSERT OR IGNORE INTO list_roles (list_id, address, role, name) "
                        "VALUES (?,?,?,?)",
                        (ml.id, address, role, _text(name, MAX_NAME))).rowcount > 0


def remove_role(conn, list_address, address, role):
    ml = _existing(conn, list_address)
    if not address_ok(address):
        return False
    return conn.execute("DELETE FROM list_roles WHERE list_id = ? AND address = ? AND role = ?",
                        (ml.id, address.lower(), role)).rowcount > 0


def role_holders(conn, list_address, role):
    """[(address, name)] of the list's owners or moderators, in address order."""
    ml = _existing(conn, list_address)
    return [tuple(r) for r in conn.execute(
        "SELECT address, name FROM list_roles WHERE list_id = ? AND role = ? ORDER BY address",
        (ml.id, role))]


def has_role(conn, list_address, address, role):
    ml = get_list(conn, list_address)
    if ml is None or not address_ok(address):
        return False
    return conn.execute("SELECT 1 FROM list_roles WHERE list_id = ? AND address = ? AND role = ?",
                        (ml.id, address.lower(), role)).fetchone() is not None


# -- held posts and requests ---------------------------------------------------------------

_HELD = ("h.id, l.address, h.kind, h.token_hash, h.action, h.target, h.requester, h.name, "
         "h.subject, h.created, h.expires, h.attempts, h.handled_by, h.handled_at")


def hold(conn, list_address, kind, token_hash, expires, now=0.0, action="", target="",
         requester="", name="", subject="", message=None):
    """Keep a post or request until its token comes back; the Held record."""
    ml = _existing(conn, list_address)
    if kind not in HELD_KINDS:
        raise ListError(f"unknown held kind {kind!r}")
    if not isinstance(token_hash, bytes) or not 16 <= len(token_hash) <= 64:
        raise ListError("a token hash is 16 to 64 bytes")
    if message is not None and len(message) > MAX_MESSAGE:
        raise ListError("held message too large")
    if conn.execute("SELECT count(*) FROM list_held WHERE list_id = ? AND handled_at = 0",
                    (ml.id,)).fetchone()[0] >= MAX_HELD:
        raise ListError(f"{ml.address} has {MAX_HELD} requests waiting, the most it may have")
    if message is not None:
        mine, everyone = conn.execute(
            "SELECT coalesce(sum(CASE WHEN list_id = ? THEN length(message) END), 0), "
            "coalesce(sum(length(message)), 0) FROM list_held", (ml.id,)).fetchone()
        if mine + len(message) > MAX_HELD_BYTES or everyone + len(message) > MAX_ALL_HELD_BYTES:
            raise ListError(f"{ml.address}: too many held messages' bytes waiting")
    cur = conn.execute(
        "INSERT INTO list_held (list_id, kind, token_hash, action, target, requester, name, "
        "subject, message, created, expires) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
        (ml.id, kind, token_hash, _text(action, 1000), _text(target, MAX_ADDRESS),
         _text(requester, MAX_ADDRESS), _text(name, MAX_NAME), _text(subject, MAX_SUBJECT),
         message, now, expires))
    return _held_by_id(conn, cur.lastrowid)


def _held_by_id(conn, held_id):
    row = conn.execute(f"SELECT {_HELD} FROM list_held h JOIN lists l ON l.id = h.list_id "
                       "WHERE h.id = ?", (held_id,)).fetchone()
    return Held(*row) if row else None


def find_held(conn, token_hash, now):
    """The unexpired request of ``token_hash``, or None. A handled one is
    returned too (``handled_by`` set): its token's owner is told "already
    handled by ..." rather than "unknown token"."""
    row = conn.execute(f"SELECT {_HELD} FROM list_held h JOIN lists l ON l.id = h.list_id "
                       "WHERE h.token_hash = ? AND h.expires > ?",
                       (bytes(token_hash), now)).fetchone()
    return Held(*row) if row else None


def held_message(conn, held_id):
    row = conn.execute("SELECT message FROM list_held WHERE id = ?", (held_id,)).fetchone()
    return bytes(row[0]) if row and row[0] is not None else None


def settle_held(conn, held_id, by, now):
    """Mark a request handled by ``by``: True for the first to act, False when
    someone already had (lists.md 3.3, 3.5: "already handled")."""
    return conn.execute("UPDATE list_held SET handled_by = ?, handled_at = ?, message = NULL "
                        "WHERE id = ? AND handled_at = 0",
                        (_text(by, MAX_ADDRESS), now, held_id)).rowcount > 0


def held_failed(conn, held_id):
    """Count a wrong use of a request's token (an AUTH with another command);
    the new count."""
    conn.execute("UPDATE list_held SET attempts = attempts + 1 WHERE id = ?", (held_id,))
    row = conn.execute("SELECT attempts FROM list_held WHERE id = ?", (held_id,)).fetchone()
    return row[0] if row else 0


def held_waiting(conn, list_address, kind=None):
    """The list's requests still waiting, oldest first."""
    ml = _existing(conn, list_address)
    sql = (f"SELECT {_HELD} FROM list_held h JOIN lists l ON l.id = h.list_id "
           "WHERE h.list_id = ? AND h.handled_at = 0")
    args = (ml.id,)
    if kind is not None:
        sql += " AND h.kind = ?"
        args += (kind,)
    return [Held(*r) for r in conn.execute(sql + " ORDER BY h.created, h.id", args)]


def expire_held(conn, now, keep_handled=7 * 86400):
    """The waiting requests whose time is up (deleted, returned so their authors
    can be told), and handled ones older than ``keep_handled`` (deleted)."""
    expired = [Held(*r) for r in conn.execute(
        f"SELECT {_HELD} FROM list_held h JOIN lists l ON l.id = h.list_id "
        "WHERE h.handled_at = 0 AND h.expires <= ?", (now,))]
    conn.execute("DELETE FROM list_held WHERE handled_at = 0 AND expires <= ?", (now,))
    conn.execute("DELETE FROM list_held WHERE handled_at > 0 AND handled_at <= ?",
                 (now - keep_handled,))
    return expired
