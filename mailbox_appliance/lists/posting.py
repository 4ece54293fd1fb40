"""A post to a list: the input checks before the ``send`` scenario, and the copy
that goes out (lists.md 4.2 to 4.5).

``check_post`` says whether a message to ``LIST@`` may go on at all: loops
(our own ``X-Loop``, this list's ``List-Id`` or ``List-Post``), a
Message-ID this list already took, automatic mail, a post over the size
limit, and commands sent to the posting address by mistake.

``prepare_post`` makes the copy to distribute from the message bytes. It
works on the bytes rather than re-serialising a parsed message: every field
and body line it does not mean to change goes out exactly as it came, so an
author's signature over the body and the untouched fields stays valid as
far as the list's changes allow, and nothing is re-encoded twice. It
removes the fields a list must not pass on (receipts, Precedence, Sender,
Approved, a parent list's List-* fields), adds the RFC 2369/2919 fields,
``Precedence: list`` and ``X-Loop``, puts the subject tag in, and the
footer where it cannot break the message: appended to a plain text part,
as its own part of a ``multipart/mixed``, or around anything else in a new
``multipart/mixed``; signed or encrypted messages (``multipart/signed``,
``application/pkcs7-mime``) keep their body untouched.
"""

from __future__ import annotations

import email.header
import email.utils
import re
import secrets
from dataclasses import dataclass

from mailbox_appliance.antispam.message import (content_type, field_text, raw_header_fields,
                                                split_message)
from mailbox_appliance.lists import commands, replies
from mailbox_appliance.lists.addresses import list_address as address_of

MAX_SIZE = 5 * 1024 * 1024          # lists.md 4.2: Sympa's max_size
MAX_SUBJECT = 998

# Removed from every post before our own fields are added (lists.md 4.3).
REMOVED = frozenset({
    "return-receipt-to", "disposition-notification-to", "precedence", "x-sequence",
    "sender", "errors-to", "approved", "approve", "list-id", "list-help",
    "list-subscribe", "list-unsubscribe", "list-unsubscribe-post", "list-post",
    "list-owner", "list-archive", "archived-at"})
REMOVED_PREFIXES = ("x-appliance-",)

DISCARD, REFUSE = "discard", "refuse"


@dataclass(frozen=True)
class PostCheck:
    """Why a post stops before the ``send`` scenario: ``action`` DISCARD (silently,
    logged) or REFUSE (the author is told ``reason``); ``command`` names a
    misaddressed command ("subscribe", "unsubscribe", "set")."""

    action: str
    reason: str
    command: str | None = None


def list_id(name, domain) -> str:
    """The RFC 2919 list identifier: ``name.domain`` (a dot in the name kept)."""
    return f"{name}.{domain}".lower()


def _all(fields, name):
    return [" ".join(v.decode("latin-1").split()) for n, v in fields if n.lower() == name]


def check_post(raw, msg, list_name, domain, seen_message_id=None, max_size=MAX_SIZE,
               robot_senders=replies.ROBOT_SENDERS):
    """A PostCheck when the post must not go on, else None (lists.md 4.2).

    ``msg`` is ``raw`` parsed (``email.message_from_bytes``);
    ``seen_message_id(mid) -> bool`` says whether this list took that
    Message-ID in the last days.
    """
    block, _ = split_message(raw)
    fields = raw_header_fields(block)
    posting = address_of(list_name, domain).lower()
    for value in _all(fields, "x-loop"):
        if replies.field_names(value, posting):
            return PostCheck(DISCARD, "loop: our X-Loop")
    lid = field_text(fields, "list-id").lower()
    if lid and f"<{list_id(list_name, domain)}>" in lid:
        return PostCheck(DISCARD, "loop: our List-Id")
    if any(replies.field_names(v, posting) for v in _all(fields, "list-post")):
        return PostCheck(DISCARD, "loop: our List-Post")
    auto = field_text(fields, "auto-submitted").lower()
    if auto and auto.split(";")[0].strip() != "no":
        return PostCheck(DISCARD, "automatic mail (Auto-Submitted)")
    if field_text(fields, "content-identifier") or field_text(fields, "x400-content-identifier"):
        return PostCheck(DISCARD, "automatic mail (X.400 marker)")
    sender = replies.sender_of(msg)
    if sender is None:
        return PostCheck(DISCARD, "no single From: mailbox")
    if robot_senders.match(sender.partition("@")[0]):
        return PostCheck(DISCARD, f"sent by a robot ({sender})")
    mid = field_text(fields, "message-id")
    if mid and seen_message_id is not None and seen_message_id(mid):
        return PostCheck(DISCARD, f"Message-ID {mid[:100]} already distributed")
    if len(raw) > max_size:
        return PostCheck(REFUSE, f"the message is larger than the list's limit of "
                                 f"{max_size} octets (5.2.3)")
    command = commands.misaddressed(msg, list_name)
    if command is not None:
        return PostCheck(REFUSE, f"a {command} command sent to the list itself", command)
    return None


# -- the outgoing copy ---------------------------------------------------------------------

def _encode(value, charset):
    """An unstructured field value, RFC 2047-encoded in ``charset`` when not ASCII."""
    if value.isascii():
        return value
    # Folded with CRLF like the rest of the message (the default is a bare LF).
    return email.header.Header(value, charset or "utf-8", maxlinelen=76).encode(
        linesep="\r\n")


def _decoded_subject(raw_value: bytes):
    """(text, charset of its first encoded word or None)."""
    text = " ".join(raw_value.decode("latin-1").split())
    charset = None
    try:
        parts = email.header.decode_header(text)
    except Exception:
        return text, None
    out = []
    for chunk, cs in parts:
        if isinstance(chunk, bytes):
            if cs and charset is None:
                charset = cs
            try:
                out.append(chunk.decode(cs or "ascii", "replace"))
            except LookupError:
                out.append(chunk.decode("ascii", "replace"))
        else:
            out.append(chunk)
    return "".join(out), charset


_REPLY = re.compile(r"^\s*(?:(?:re|aw|sv|antw|fw|fwd|wg|tr|rif)\s*(?:\[\d+\])?\s*:\s*)+",
                    re.IGNORECASE)


def tagged_subject(subject, tag):
    """``Re: [tag] text`` (lists.md 4.4): every copy of the tag removed, reply
    prefixes collapsed into one ``Re: `` kept in front."""
    if not tag:
        return subject
    text = subject.replace(tag, " ")
    reply = False
    for _ in range(20):
        m = _REPLY.match(text)
        if not m:
            break
        reply = reply or m.group(0).strip().lower().startswith(("re", "aw", "sv", "antw"))
        text = text[m.end():].replace(tag, " ")
    text = " ".join(text.split())
    return ("Re: " if reply else "") + f"{tag} {text}".strip()


def _footer_part(footer, boundary):
    body = footer.encode("utf-8")
    encoding = "8bit" if not footer.isascii() else "7bit"
    return (f"--{boundary}\r\nContent-Type: text/plain; charset=utf-8\r\n"
            f"Content-Transfer-Encoding: {encoding}\r\nContent-Disposition: inline\r\n\r\n"
            ).encode("ascii") + body + b"\r\n"


_CONTENT_FIELDS = ("content-type", "content-transfer-encoding", "content-disposition",
                   "content-id", "content-description", "content-language", "content-md5")


def _with_footer(fields, body, footer):
    """(fields, body) with the footer placed so the message stays whole."""
    ctype, params = content_type(field_text(fields, "content-type") or "text/plain")
    cte = field_text(fields, "content-transfer-encoding").lower() or "7bit"
    if ctype in ("multipart/signed", "multipart/encrypted", "application/pkcs7-mime",
                 "application/x-pkcs7-mime"):
        return fields, body
    charset = params.get("charset", "us-ascii").lower()
    if ctype == "text/plain" and cte in ("7bit", "8bit") and (
            footer.isascii() or charset in ("utf-8", "utf8")):
        text = body if body.endswith(b"\n") or not body else body + b"\r\n"
        return fields, text + b"\r\n" + footer.encode("utf-8") + b"\r\n"
    boundary = "=_list_" + secrets.token_hex(12)
    if ctype == "multipart/mixed" and params.get("boundary"):
        closing = b"--" + params["boundary"].encode("latin-1") + b"--"
        at = body.rfind(closing)
        if at >= 0:
            part = _footer_part(footer, params["boundary"])
            return fields, body[:at] + part + body[at:]
    # Anything else: the original content becomes the first part of a new
    # multipart/mixed, the footer the second.
    inner = [(n, v) for n, v in fields if n.lower() in _CONTENT_FIELDS]
    outer = [(n, v) for n, v in fields if n.lower() not in _CONTENT_FIELDS
             and n.lower() != "mime-version"]
    if not inner:
        inner = [("Content-Type", b" text/plain; charset=us-ascii\r\n")]
    head = b"".join(n.encode("latin-1") + b":" + v for n, v in inner)
    new_body = (b"This is a multi-part message in MIME format.\r\n\r\n--"
                + boundary.encode() + b"\r\n" + head + b"\r\n" + body
                + (b"" if body.endswith(b"\n") else b"\r\n")
                + _footer_part(footer, boundary) + b"--" + boundary.encode() + b"--\r\n")
    outer += [("MIME-Version", b" 1.0\r\n"),
              ("Content-Type", f' multipart/mixed; boundary="{boundary}"\r\n'.encode())]
    return outer, new_body


def _whole_fields(block):
    """Every field of a header block as (name, raw value with its line end),
    nothing dropped or cut (what comes in goes out); a line that is no
    field stays with the field before it."""
    fields = []
    for line in block.splitlines(keepends=True):
        colon = line.find(b":")
        is_field = (line[:1] not in (b" ", b"\t") and colon > 0
                    and b" " not in line[:colon].strip())
        if is_field or not fields:
            name = line[:colon].strip().decode("ascii", "replace") if is_field else "X-Junk"
            fields.append((name, line[colon + 1:] if is_field else b" " + line))
        else:
            name, value = fields[-1]
            fields[-1] = (name, value + line)
    return [(n, v if v.endswith(b"\n") else v + b"\r\n") for n, v in fields]


def prepare_post(raw, list_name, domain, robot="lists", description="", subject_tag="",
                 footer="", announce=False, hostname=None):
    """The copy of a post to distribute (module docstring): message bytes."""
    block, body = split_message(raw)
    fields = _whole_fields(block)
    kept = [(n, v) for n, v in fields
            if n.lower() not in REMOVED and not n.lower().startswith(REMOVED_PREFIXES)]
    if not any(n.lower() == "message-id" for n, _ in kept):
        mid = email.utils.make_msgid(domain=hostname or domain)
        kept.append(("Message-ID", f" {mid}\r\n".encode()))
    if subject_tag:
        for i, (n, v) in enumerate(kept):
            if n.lower() == "subject":
                text, charset = _decoded_subject(v)
                new = tagged_subject(text, subject_tag)[:MAX_SUBJECT]
                kept[i] = (n, f" {_encode(new, charset)}\r\n".encode("ascii", "replace"))
                break
        else:
            kept.append(("Subject", f" {subject_tag}\r\n".encode("ascii", "replace")))
    if footer:
        kept, body = _with_footer(kept, body, footer)
    posting = address_of(list_name, domain)
    # The List-Id phrase (RFC 2919) without the specials that would end it early.
    label = " ".join(re.sub(r'[<>()\[\]:;@,"\\\x00-\x1f\x7f]', " ", description or "").split())
    ours = [
        ("List-Id", f"{_encode(label, 'utf-8') + ' ' if label else ''}"
                    f"<{list_id(list_name, domain)}>"),
        ("List-Help", f"<mailto:{robot}@{domain}?subject=help>"),
        ("List-Subscribe", f"<mailto:{list_name}-subscribe@{domain}>"),
        ("List-Unsubscribe", f"<mailto:{list_name}-unsubscribe@{domain}?subject=unsubscribe>"),
        ("List-Post", "NO" if announce else f"<mailto:{posting}>"),
        ("List-Owner", f"<mailto:{list_name}-owner@{domain}>"),
        ("Precedence", "list"),
        ("X-Loop", posting),
    ]
    head = b"".join(f"{n}: {v}\r\n".encode("ascii", "replace") for n, v in ours)
    head += b"".join(n.encode("latin-1") + b":" + v for n, v in kept)
    return head + b"\r\n" + body
