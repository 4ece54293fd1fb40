"""Delivery status notices: the multipart/report of RFC 3462/3464.

``build_dsn`` turns what the queue manager knows of one message's recipients
into the notice's bytes; it does no I/O and decides nothing about *whether*
a notice is owed (that is ``queue/notices.py``). The notice has three parts,
as RFC 3462 orders them:

1. ``text/plain``: a human explanation, one paragraph per recipient;
2. ``message/delivery-status``: the per-message fields, then one block of
   per-recipient fields each (RFC 3464);
3. the original: the whole message (``message/rfc822``) when a failure is
   reported and RET=HDRS was not asked for (RFC 3461 4.3) and it is not too
   big, else its header block only (``text/rfc822-headers``).

Every value that came from outside — addresses, ENVID, ORCPT, HELO names,
remote replies — is made a single line of printable ASCII before it goes
near a header (no CR, LF or NUL can start a field of its own), bounded in
length, and only ever concatenated: no ``%`` or ``str.format`` evaluation of
such text anywhere here.
"""

from __future__ import annotations

import datetime
import re
import secrets
from dataclasses import dataclass
from email.utils import format_datetime

CRLF = "\r\n"
# More of the original than this is returned as its headers only.
MAX_RETURNED = 10 * 1024 * 1024
# A header block bigger than this is cut at a line end (the notice stays small).
MAX_HEADERS = 256 * 1024
# Bounds for text from outside, in characters, after cleaning.
MAX_ADDRESS = 512
MAX_DIAGNOSTIC = 800
MAX_TOKEN = 255

ACTIONS = ("failed", "delayed", "delivered", "relayed", "expanded")
_STATUS = re.compile(r"^[245]\.\d{1,3}\.\d{1,3}$")
_DEFAULT_STATUS = {"failed": "5.0.0", "delayed": "4.0.0", "delivered": "2.0.0",
                   "relayed": "2.0.0", "expanded": "2.0.0"}
_CONTROLS = re.compile(r"[\x00-\x1f\x7f]+")
_XTEXT = re.compile(r"\+([0-9A-Fa-f]{2})")
_MESSAGE_ID_SAFE = re.compile(r"[^A-Za-z0-9.\-]")


@dataclass(frozen=True)
class DSNRecipient:
    """What one recipient's block of a notice says."""

    address: str            # Final-Recipient: rfc822;address
    action: str             # failed | delayed | delivered | relayed | expanded
    status: str             # RFC 3463 code, e.g. "5.1.1"
    orcpt: str = ""         # ORCPT= as received ("rfc822;xtext") -> Original-Recipient
    diagnostic: str = ""    # the reason, e.g. "550 5.1.1 <x@y>: User unknown"
    remote_mta: str = ""    # the host that answered -> Remote-MTA: dns; host
    last_attempt: float = 0.0       # -> Last-Attempt-Date
    will_retry_until: float = 0.0   # delayed only -> Will-Retry-Until
    # The diagnostic is the other side's SMTP reply ("Diagnostic-Code: smtp;
    # ...") rather than a reason of our own. None: it is when a remote MTA
    # is named.
    from_remote: bool | None = None


# -- making outside text safe --------------------------------------------------

def clean(value, limit=MAX_TOKEN) -> str:
    """One line of printable ASCII: controls become a space, other octets escapes.

    CR, LF and NUL (and every other control) turn into single spaces, so a
    value can neither end a header field nor start a new one (G6); non-ASCII
    is written as Python backslash escapes (readable, and plain ASCII).
    """
    text = value if isinstance(value, str) else str(value)
    text = _CONTROLS.sub(" ", text).strip()
    text = text.encode("ascii", "backslashreplace").decode("ascii")
    if len(text) > limit:
        text = text[:limit - 3] + "..."
    return text


def xtext_decode(value: str) -> str:
    """Undo RFC 3461 xtext ("+2B" -> "+"); the result is still to be cleaned."""
    return _XTEXT.sub(lambda m: chr(int(m.group(1), 16)), value)


def _utf8_addr_xtext(address: str) -> str:
    """An address in RFC 6533's utf-8-addr-xtext form (for non-ASCII addresses)."""
    out = []
    for ch in address:
        code = ord(ch)
        if 0x21 <= code <= 0x7E and ch not in "+=\\":
            out.append(ch)
        else:
            out.append("\\x{" + format(code, "X") + "}")
    return "".join(out)


def _typed_address(address: str) -> str:
    """``rfc822; addr``, or ``utf-8; addr-xtext`` when the address is not ASCII."""
    address = _CONTROLS.sub(" ", address).strip()
    if address.isascii():
        return "rfc822; " + clean(address, MAX_ADDRESS)
    return "utf-8; " + clean(_utf8_addr_xtext(address), MAX_ADDRESS)


def _original_recipient(orcpt: str) -> str:
    """The Original-Recipient value of an ORCPT= ("" when there is none).

    RFC 3461 has the ORCPT address decoded from xtext for this field; the
    decoded text is cleaned like any other outside value.
    """
    kind, semi, value = orcpt.partition(";")
    kind = re.sub(r"[^A-Za-z0-9\-]", "", kind)[:40]
    if not semi or not kind or not value.strip():
        return ""
    if kind.lower() == "rfc822":
        decoded = xtext_decode(value.strip())
        if not decoded.isascii():
            return "utf-8; " + clean(_utf8_addr_xtext(_CONTROLS.sub(" ", decoded)),
                                    MAX_ADDRESS)
        return "rfc822; " + clean(decoded, MAX_ADDRESS)
    return kind + "; " + clean(value, MAX_ADDRESS)


def _date(ts: float) -> str:
    return format_datetime(datetime.datetime.fromtimestamp(ts, datetime.timezone.utc))


def _field(name: str, value: str) -> str:
    # Values are cleaned and bounded above; the cap keeps even a long
    # combination inside RFC 5322's 998 octets.
    return (name + ": " + value)[:998]


# -- the parts ----------------------------------------------------------------

def _subject(actions, postmaster_copy):
    if "failed" in actions:
        text = "Undelivered Mail Returned to Sender"
    elif "delayed" in actions:
        text = "Delayed Mail (still being retried)"
    else:
        text = "Successful Mail Delivery Report"
    return ("Postmaster Copy: " + text) if postmaster_copy else text


def _diagnostic(r: DSNRecipient) -> str:
    text = clean(r.diagnostic, MAX_DIAGNOSTIC)
    if not text:
        return ""
    remote = r.from_remote if r.from_remote is not None else bool(r.remote_mta)
    # "smtp" is the registered type for an SMTP reply (RFC 3464 2.3.6);
    # our own reasons (DNS, timeouts, local delivery) carry a private type.
    return ("smtp; " if remote else "X-Mailbox-Appliance; ") + text


def _explanation(hostname, envelope, recipients, now, postmaster_copy):
    """The human part: what happened, then one paragraph per recipient."""
    actions = {r.action for r in recipients}
    lines = ["This is the mail system at host " + hostname + ".", ""]
    if postmaster_copy:
        lines += ["This is a copy, for the postmaster, of a delivery failure report",
                  "for a message that came from the null sender (a notice or another",
                  "automatic message): it cannot be returned to its sender.", ""]
    if "failed" in actions:
        lines += ["I'm sorry to have to inform you that your message could not",
                  "be delivered to one or more recipients. It is attached below.", "",
                  "For further assistance, please send mail to postmaster.", "",
                  "If you do so, please include this problem report. You can",
                  "delete your own text from the attached returned message.", ""]
    if "delayed" in actions:
        age = max(0.0, now - envelope.arrival) if envelope.arrival else 0.0
        lines += ["Your message could not be delivered for " + _duration(age) + ".",
                  "It will be retried until it is " + _retry_age(envelope, recipients)
                  + " old; you need not send it again.", ""]
    if actions & {"delivered", "relayed", "expanded"}:
        lines += ["Your message was successfully delivered to the destination(s)",
                  "listed below. If the message was delivered to a mailbox you will",
                  "receive no further notifications. Otherwise you may still receive",
                  "notifications of mail delivery errors from other systems.", ""]
    lines += ["                   The mail system", ""]
    for r in recipients:
        lines += _recipient_paragraph(r) + [""]
    return lines


def _recipient_paragraph(r):
    who = "<" + clean(r.address, MAX_ADDRESS) + ">"
    reason = clean(r.diagnostic, MAX_DIAGNOSTIC)
    if r.remote_mta and r.action in ("failed", "delayed"):
        text = who + ": host " + clean(r.remote_mta) + " said: " + (reason or _status(r))
    elif r.action == "failed":
        text = who + ": " + (reason or "delivery failed (" + _status(r) + ")")
    elif r.action == "delayed":
        text = who + ": delivery temporarily suspended: " + (reason or _status(r))
    elif r.action == "relayed":
        text = who + ": delivery via " + (clean(r.remote_mta) or "another system") + \
            ": " + (reason or "relayed to a system that does not report delivery")
    elif r.action == "expanded":
        text = who + ": expanded to other recipients" + (": " + reason if reason else "")
    else:
        text = who + ": delivery via " + (clean(r.remote_mta) or "this system") + \
            ": " + (reason or "delivered")
    return _wrap(text)


def _wrap(text, width=76):
    """Break at spaces into lines of about ``width`` (never past 998)."""
    lines, line = [], ""
    for word in text.split(" "):
        while len(word) > 900:
            if line:
                lines.append(line)
                line = ""
            lines.append(word[:900])
            word = word[900:]
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = "    " + word
        else:
            line = (line + " " + word) if line else word
    if line:
        lines.append(line)
    return lines


def _duration(seconds):
    if seconds >= 2 * 86400:
        return str(int(seconds // 86400)) + " days"
    if seconds >= 2 * 3600:
        return str(int(seconds // 3600)) + " hours"
    if seconds >= 120:
        return str(int(seconds // 60)) + " minutes"
    return "a moment"


def _retry_age(envelope, recipients):
    until = max((r.will_retry_until for r in recipients if r.action == "delayed"), default=0.0)
    if until and envelope.arrival:
        return _duration(until - envelope.arrival)
    return "several days"


def _status(r):
    return r.status if _STATUS.match(r.status or "") else _DEFAULT_STATUS[r.action]


def _delivery_status(hostname, qid, envelope, recipients):
    """The message/delivery-status body: per-message block, then per recipient."""
    blocks = []
    first = [_field("Reporting-MTA", "dns; " + hostname)]
    if qid:
        first.append(_field("X-Queue-ID", clean(qid, 64)))
    envid = clean(xtext_decode(envelope.envid), 100) if envelope.envid else ""
    if envid:
        first.append(_field("Original-Envelope-Id", envid))
    helo, ip = clean(envelope.helo), clean(envelope.client_ip, 64)
    if helo or ip:
        value = (helo + " ([" + ip + "])") if helo and ip else (helo or "[" + ip + "]")
        first.append(_field("Received-From-MTA", "dns; " + value))
    if envelope.arrival:
        first.append(_field("Arrival-Date", _date(envelope.arrival)))
    blocks.append(first)
    for r in recipients:
        block = []
        original = _original_recipient(r.orcpt) if r.orcpt else ""
        if original:
            block.append(_field("Original-Recipient", original))
        block.append(_field("Final-Recipient", _typed_address(r.address)))
        block.append(_field("Action", r.action))
        block.append(_field("Status", _status(r)))
        if r.remote_mta:
            block.append(_field("Remote-MTA", "dns; " + clean(r.remote_mta)))
        diagnostic = _diagnostic(r)
        if diagnostic:
            block.append(_field("Diagnostic-Code", diagnostic))
        if r.last_attempt:
            block.append(_field("Last-Attempt-Date", _date(r.last_attempt)))
        if r.action == "delayed" and r.will_retry_until:
            block.append(_field("Will-Retry-Until", _date(r.will_retry_until)))
        blocks.append(block)
    return (CRLF + CRLF).join(CRLF.join(b) for b in blocks) + CRLF


def header_block(original: bytes) -> bytes:
    """The header section of a message (CRLF ended, without the empty line).

    A block longer than MAX_HEADERS is cut at its last whole line before
    the limit; a message without a body is all header.
    """
    end = original.find(b"\r\n\r\n", 0, MAX_HEADERS + 4)
    if end >= 0:
        return original[:end + 2]
    if original.startswith(b"\r\n"):
        return b""
    head = original[:MAX_HEADERS]
    if len(original) > MAX_HEADERS or not head.endswith(b"\r\n"):
        cut = head.rfind(b"\r\n")
        head = head[:cut + 2] if cut >= 0 else b""
    return head


def _with_crlf_end(data: bytes) -> bytes:
    return data if not data or data.endswith(b"\r\n") else data + b"\r\n"


def _encoding(data: bytes) -> bytes:
    # 8-bit originals (SMTPUTF8, 8BITMIME) travel as they came, declared.
    return b"8bit" if not data.isascii() else b"7bit"


def build_dsn(*, hostname, qid, envelope, recipients, original: bytes, now: float,
              to: str, postmaster_copy: bool = False, message_id_domain=None,
              max_returned: int = MAX_RETURNED) -> bytes:
    """The whole notice (RFC 5322 message, CRLF line ends) about ``recipients``.

    ``envelope`` is the reported message's Envelope, ``original`` its bytes
    as queued (more than ``max_returned`` of them: only its headers are
    returned), ``to`` the notice's recipient (the sender, or the postmaster
    for ``postmaster_copy``).
    """
    recipients = list(recipients)
    if not recipients:
        raise ValueError("a notice needs at least one recipient")
    for r in recipients:
        if r.action not in ACTIONS:
            raise ValueError("unknown DSN action: " + repr(r.action))
    hostname = clean(hostname) or "localhost"
    domain = _MESSAGE_ID_SAFE.sub("", message_id_domain or hostname) or "localhost"
    actions = {r.action for r in recipients}
    token = secrets.token_hex(8)
    safe_qid = _MESSAGE_ID_SAFE.sub("", qid or "")[:64]
    boundary = (safe_qid or "dsn") + "." + str(int(now)) + "/" + token

    # RFC 3461 4.3: RET= applies to failure reports; any other notice
    # returns the headers only.
    full = ("failed" in actions and envelope.ret.upper() != "HDRS"
            and len(original) <= max_returned)
    if full:
        returned = _with_crlf_end(original)
        returned_type = b"message/rfc822"
    else:
        returned = header_block(original)
        returned_type = b"text/rfc822-headers"

    head = [
        _field("From", "Mail Delivery System <MAILER-DAEMON@" + hostname + ">"),
        _field("To", "<" + clean(to, MAX_ADDRESS) + ">"),
        _field("Subject", _subject(actions, postmaster_copy)),
        _field("Date", _date(now)),
        _field("Message-ID", "<" + str(int(now)) + "." + token + "."
               + (safe_qid or "dsn") + "@" + domain + ">"),
        _field("Auto-Submitted", "auto-replied"),
        _field("MIME-Version", "1.0"),
        _field("Content-Type", "multipart/report; report-type=delivery-status;"),
        "\tboundary=\"" + boundary + "\"",
        "",
        "This is a MIME-encapsulated message.",
        "",
    ]
    text = _explanation(hostname, envelope, recipients, now, postmaster_copy)
    parts = [
        "--" + boundary,
        "Content-Description: Notification",
        "Content-Type: text/plain; charset=us-ascii",
        "",
    ] + text + [
        "--" + boundary,
        "Content-Description: Delivery report",
        "Content-Type: message/delivery-status",
        "",
        _delivery_status(hostname, qid, envelope, recipients),
    ]
    # The CRLF before a boundary belongs to the boundary (RFC 2046 5.1.1):
    # one more keeps the last field's own line end inside the part.
    pre = (CRLF.join(head) + CRLF + CRLF.join(parts) + CRLF + "--" + boundary + CRLF).encode("ascii")
    description = b"Undelivered Message" if full else b"Message Headers"
    returned_head = (b"Content-Description: " + description + b"\r\n"
                     b"Content-Type: " + returned_type + b"\r\n"
                     b"Content-Transfer-Encoding: " + _encoding(returned) + b"\r\n\r\n")
    return (pre + returned_head + returned
            + b"\r\n--" + boundary.encode("ascii") + b"--\r\n")
