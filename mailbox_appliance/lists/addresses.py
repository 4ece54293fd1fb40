"""The list server's addresses: what a recipient at a list domain means, and VERP.

``classify`` tells the router what a local part at a list domain is: the command
robot, a list's posting address, one of its administrative addresses
(``-request``, ``-subscribe``, ``-unsubscribe``, ``-confirm+TOKEN``, ``-owner``,
``-editor``, ``-bounces[+TAG]``) or ``listmaster``; anything else is not a list
address and is refused at RCPT time (``550 5.1.1``), never bounced later.

``verp_sender`` builds the per-member envelope sender ``LIST-bounces+TAG@domain``.
The tag carries the member id and the post sequence and a 64-bit HMAC over them
and the list address, so a bounce naming a tag we did not make (a forged DSN
trying to unsubscribe someone) is recognised and ignored (``verify_verp_tag``).

Pure functions: the list names of a domain and the HMAC key are passed in.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from dataclasses import dataclass

DEFAULT_ROBOT = "lists"

# A list's name (section 0): lower-case, at most 50 characters.
LIST_NAME = re.compile(r"^[a-z0-9][a-z0-9._+-]{0,49}$")
RESERVED_SUFFIXES = ("-request", "-owner", "-editor", "-subscribe", "-unsubscribe",
                     "-confirm", "-bounces")
RESERVED_NAMES = frozenset({"listmaster", "postmaster", "abuse", "mailer-daemon", "root",
                            "hostmaster", "webmaster", "noreply", "no-reply"})

MAX_ADDRESS = 254
MAX_LOCAL_PART = 128    # longer than RFC 5321's 64 so a long list name still gets VERP
_ADDRESS = re.compile(r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
                      r"@[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)+$")
_TOKEN = re.compile(r"^[0-9a-fA-F]{32}$")
# base32 without padding, either case (some relays lower-case local parts).
_TAG = re.compile(r"^[a-zA-Z2-7]{10,48}$")

# What each kind of address is for (section 0).
ROBOT = "robot"
POST = "post"
REQUEST = "request"
SUBSCRIBE = "subscribe"
UNSUBSCRIBE = "unsubscribe"
CONFIRM = "confirm"
OWNER = "owner"
EDITOR = "editor"
BOUNCES = "bounces"
LISTMASTER = "listmaster"

# Fixed suffixes; the tagged ones (-confirm+, -bounces+) are handled apart.
_SUFFIXES = (("-request", REQUEST), ("-subscribe", SUBSCRIBE), ("-unsubscribe", UNSUBSCRIBE),
             ("-owner", OWNER), ("-editor", EDITOR), ("-bounces", BOUNCES))

VERP_MAC_BYTES = 8          # 64-bit HMAC (section 4.7)
_MAX_VERP_NUMBER = 2 ** 63 - 1


def address_ok(address) -> bool:
    """A dot-atom ``local@domain`` of at most 254 octets, with a dot in the domain."""
    return (isinstance(address, str) and len(address) <= MAX_ADDRESS and address.isascii()
            and _ADDRESS.match(address) is not None)


def list_name_ok(name, robot=DEFAULT_ROBOT) -> bool:
    """A name a list may have: the syntax, no reserved name or suffix, not the robot's."""
    return (isinstance(name, str) and LIST_NAME.match(name) is not None
            and name not in RESERVED_NAMES and name != robot.lower()
            and not name.endswith(RESERVED_SUFFIXES))


@dataclass(frozen=True)
class ListAddress:
    """What a recipient at a list domain is.

    ``kind`` is one of the module constants (ROBOT, POST, REQUEST, ...);
    ``list_name`` is None for the robot and listmaster; ``token`` (lower-case
    hex) only for CONFIRM, ``tag`` only for a tagged BOUNCES address (its HMAC
    not yet checked: ``verify_verp_tag``).
    """

    kind: str
    domain: str
    list_name: str | None = None
    token: str | None = None
    tag: str | None = None

    @property
    def list_address(self) -> str | None:
        """The list's posting address, e.g. ``team@lists.example.org``."""
        return f"{self.list_name}@{self.domain}" if self.list_name else None


def classify(local_part, domain, list_names, robot=DEFAULT_ROBOT) -> ListAddress | None:
    """What ``local_part@domain`` is at a list domain, or None when it is nothing of ours.

    ``list_names``: the names of the lists at ``domain`` (anything supporting
    ``in`` with lower-case names). Local parts are compared without regard to
    case (a list must not be missed because a correspondent wrote ``Team@``);
    tokens and tags are case-insensitive too. A malformed token or tag makes the
    address unknown: nothing can be confirmed or bounced through it.
    """
    if not isinstance(local_part, str) or not isinstance(domain, str):
        return None
    if not local_part or len(local_part) > MAX_LOCAL_PART or not local_part.isascii():
        return None
    lp = local_part.lower()
    dom = domain.lower().rstrip(".")
    if lp == robot.lower():
        return ListAddress(ROBOT, dom)
    if lp == "listmaster":
        return ListAddress(LISTMASTER, dom)
    if LIST_NAME.match(lp) and lp in list_names:
        return ListAddress(POST, dom, lp)
    head, plus, tail = lp.rpartition("+")
    if plus:
        # A token or a tag never contains "+" or "-", so the last "+" splits it off
        # even when the list name itself has a "+".
        if head.endswith("-confirm"):
            name = head[:-len("-confirm")]
            if _TOKEN.match(tail) and _known(name, list_names):
                return ListAddress(CONFIRM, dom, name, token=tail.lower())
        elif head.endswith("-bounces"):
            name = head[:-len("-bounces")]
            if _TAG.match(tail) and _known(name, list_names):
                return ListAddress(BOUNCES, dom, name, tag=tail.lower())
        # Otherwise the "+" may be part of a list name: try the fixed suffixes.
    for suffix, kind in _SUFFIXES:
        if lp.endswith(suffix):
            name = lp[:-len(suffix)]
            if _known(name, list_names):
                return ListAddress(kind, dom, name)
    return None


def _known(name, list_names):
    return bool(name) and LIST_NAME.match(name) is not None and name in list_names


# -- addresses we write --------------------------------------------------------------------

def robot_address(domain, robot=DEFAULT_ROBOT) -> str:
    """The command robot of a list domain."""
    return f"{robot.lower()}@{domain.lower()}"


def list_address(name, domain, kind=POST) -> str:
    """A list's posting or administrative address (not the tagged ones)."""
    suffix = {POST: "", REQUEST: "-request", SUBSCRIBE: "-subscribe",
              UNSUBSCRIBE: "-unsubscribe", OWNER: "-owner", EDITOR: "-editor",
              BOUNCES: "-bounces"}[kind]
    return f"{name.lower()}{suffix}@{domain.lower()}"


def confirm_address(name, domain, token) -> str:
    """``LIST-confirm+TOKEN@domain``: a plain reply to it confirms (the Reply-To of the mail)."""
    if not isinstance(token, str) or not _TOKEN.match(token):
        raise ValueError("a token is 32 hexadecimal digits")
    return f"{name.lower()}-confirm+{token.lower()}@{domain.lower()}"


# -- VERP (section 4.7) --------------------------------------------------------------------

def _uvarint(n):
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _read_uvarint(data, pos):
    n = shift = 0
    for i in range(pos, min(len(data), pos + 10)):
        b = data[i]
        n |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return n, i + 1
    raise ValueError("bad number")


def _mac(key, list_addr, payload, member):
    if not isinstance(key, (bytes, bytearray)) or len(key) < 16:
        raise ValueError("the VERP key is at least 16 bytes")
    # The list address is under the MAC so a tag of one list is worthless at
    # another; the member's address so that a tag of a removed member names
    # nobody once its id is given to someone else (SQLite reuses the last id).
    msg = (b"verp\0" + list_addr.lower().encode("ascii") + b"\0"
           + str(member).lower().encode("utf-8") + b"\0" + payload)
    return hmac.new(bytes(key), msg, hashlib.sha256).digest()[:VERP_MAC_BYTES]


def make_verp_tag(list_addr, member_id, sequence, key, member="") -> str:
    """The TAG of ``LIST-bounces+TAG@``: base32 of (member id, post sequence) and the
    HMAC of those with the list and the member's address."""
    for n in (member_id, sequence):
        if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= _MAX_VERP_NUMBER:
            raise ValueError("member id and sequence are integers from 0 to 2**63-1")
    payload = _uvarint(member_id) + _uvarint(sequence)
    raw = payload + _mac(key, list_addr, payload, member)
    return base64.b32encode(raw).decode("ascii").rstrip("=").lower()


def _decode_tag(tag):
    """(member id, sequence, payload, mac) of a well-formed tag, else None."""
    if not isinstance(tag, str) or not _TAG.match(tag):
        return None
    text = tag.upper()
    try:
        raw = base64.b32decode(text + "=" * (-len(text) % 8))
    except (ValueError, TypeError):
        return None
    if len(raw) <= VERP_MAC_BYTES:
        return None
    payload, mac = raw[:-VERP_MAC_BYTES], raw[-VERP_MAC_BYTES:]
    try:
        member_id, pos = _read_uvarint(payload, 0)
        sequence, pos = _read_uvarint(payload, pos)
    except ValueError:
        return None
    if pos != len(payload) or member_id > _MAX_VERP_NUMBER or sequence > _MAX_VERP_NUMBER:
        return None
    return member_id, sequence, payload, mac


def verp_tag_member(tag) -> int | None:
    """The member id a tag claims, NOT verified: which member to look up so that
    ``verify_verp_tag`` can check the tag with that member's address."""
    decoded = _decode_tag(tag)
    return decoded[0] if decoded else None


def verify_verp_tag(list_addr, tag, key, member="") -> tuple[int, int] | None:
    """(member id, post sequence) of a tag this key made for this list and member
    address, else None.

    The HMAC is compared in constant time; anything malformed is None, never an
    exception, since the tag comes from whoever sent the bounce.
    """
    decoded = _decode_tag(tag)
    if decoded is None:
        return None
    member_id, sequence, payload, mac = decoded
    if not hmac.compare_digest(mac, _mac(key, list_addr, payload, member)):
        return None
    # One encoding per value: a re-encoded tag (e.g. a padded varint) is not ours.
    if make_verp_tag(list_addr, member_id, sequence, key, member) != tag.lower():
        return None
    return member_id, sequence


def verp_sender(list_name, domain, member_id, sequence, key, member="") -> str:
    """The envelope sender of one member's copy: ``LIST-bounces+TAG@domain``."""
    name, dom = list_name.lower(), domain.lower()
    tag = make_verp_tag(f"{name}@{dom}", member_id, sequence, key, member)
    return f"{name}-bounces+{tag}@{dom}"


def verify_bounce_recipient(address, key, member="") -> tuple[int, int] | None:
    """For a ``ListAddress`` of kind BOUNCES with a tag made for ``member`` (its
    address): (member id, sequence) or None."""
    if not isinstance(address, ListAddress) or address.kind != BOUNCES or not address.tag:
        return None
    return verify_verp_tag(address.list_address, address.tag, key, member)
