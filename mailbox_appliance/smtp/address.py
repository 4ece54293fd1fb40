"""Strict parsing of SMTP envelope paths and ESMTP parameters (RFC 5321 4.1.2).

Twisted's own ``Address`` drops source routes and lets quoted local parts hold
anything; here every path is parsed by hand, lengths are bounded (RFC 5321
4.5.3.1), control characters are refused, and routing characters in local parts
(``%``, ``!``, ``@``) are reported so the relay check can refuse them.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

MAX_LOCAL = 64
MAX_DOMAIN = 255
MAX_PATH = 256

_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
_DOT_STRING = re.compile(rf"^{_ATEXT}+(\.{_ATEXT}+)*$")
# qtext and quoted-pair in the printable ASCII range only.
_QUOTED = re.compile(r'^"((?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*)"$')
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DOMAIN = re.compile(rf"^{_LABEL}(\.{_LABEL})*$")
_IPV4_LITERAL = re.compile(r"^\d{1,3}(\.\d{1,3}){3}$")
_IPV6_TAG = "ipv6:"
_ROUTE = re.compile(r"^@[^,:]+(,@[^,:]+)*:")
_ESMTP_KEYWORD = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]*$")
_ESMTP_VALUE = re.compile(r"^[\x21-\x3c\x3e-\x7e]+$")


class AddressError(ValueError):
    """A path that cannot be accepted; ``code``/``enhanced`` say how to answer."""

    def __init__(self, code: int, enhanced: str, text: str):
        super().__init__(text)
        self.code, self.enhanced, self.text = code, enhanced, text


@dataclass(frozen=True)
class Path:
    """A parsed envelope address; ``null`` for ``<>``."""

    local: str = ""
    domain: str = ""               # lower-cased, trailing dot removed
    quoted: bool = False
    null: bool = False

    @property
    def address(self) -> str:
        if self.null:
            return ""
        local = self.local
        if self.quoted:
            local = '"' + local.replace("\\", "\\\\").replace('"', '\\"') + '"'
        return f"{local}@{self.domain}" if self.domain else local

    @property
    def has_routing(self) -> bool:
        """True if the local part hides another destination (relay tricks)."""
        return any(c in self.local for c in "@%!")

    @property
    def is_literal(self) -> bool:
        return self.domain.startswith("[")


def split_path_and_params(arg: str, keyword: str):
    """Split ``FROM:<path> PARAM=...`` into (path text, [params]).

    ``keyword`` is ``FROM`` or ``TO``. Raises AddressError on bad syntax.
    """
    head = arg[:len(keyword) + 1]
    if head.upper() != keyword + ":":
        raise AddressError(501, "5.5.4", f"Syntax: {'MAIL FROM' if keyword == 'FROM' else 'RCPT TO'}:<address>")
    rest = arg[len(keyword) + 1:].lstrip(" ")
    if not rest.startswith("<"):
        raise AddressError(501, "5.1.7" if keyword == "FROM" else "5.1.3",
                           "Address must be enclosed in <>")
    end = _find_path_end(rest)
    if end < 0:
        raise AddressError(501, "5.1.7" if keyword == "FROM" else "5.1.3", "Unterminated address")
    path, params = rest[:end + 1], rest[end + 1:]
    if params and not params.startswith(" "):
        raise AddressError(501, "5.5.4", "Syntax error after address")
    return path, params.split()


def _find_path_end(text: str) -> int:
    """Index of the '>' closing the path, honouring quoted strings."""
    in_quote = escaped = False
    for i, c in enumerate(text):
        if escaped:
            escaped = False
        elif c == "\\" and in_quote:
            escaped = True
        elif c == '"':
            in_quote = not in_quote
        elif c == ">" and not in_quote:
            return i
    return -1


def parse_path(text: str, sender: bool, smtputf8: bool = False) -> Path:
    """Parse ``<...>`` into a Path. ``sender`` selects 5.1.7 versus 5.1.3 codes."""
    enh = "5.1.7" if sender else "5.1.3"
    if any(ord(c) < 0x20 or c == "\x7f" for c in text):
        raise AddressError(501, "5.5.2", "Control characters are not allowed in addresses")
    if not smtputf8 and any(ord(c) > 0x7e for c in text):
        raise AddressError(553, "5.6.7", "Non-ASCII address needs SMTPUTF8")
    if len(text) < 2 or text[0] != "<" or text[-1] != ">":
        raise AddressError(501, enh, "Address must be enclosed in <>")
    # RFC 5321 4.5.3.1.3: 256 octets, punctuation (the angle brackets) included.
    if len(text.encode()) > MAX_PATH:
        raise AddressError(501, enh, "Path too long")
    inner = text[1:-1]
    if inner == "":
        if sender:
            return Path(null=True)
        raise AddressError(501, enh, "Empty recipient")
    # Source routes are obsolete; they are parsed and ignored (RFC 5321 C),
    # so every decision below is made on the final address.
    m = _ROUTE.match(inner)
    if m:
        for hop in inner[:m.end() - 1].split(","):
            _check_domain(hop[1:], enh)
        inner = inner[m.end():]
    local, domain, quoted = _split_mailbox(inner, enh)
    return Path(local=local, domain=domain, quoted=quoted)


def _split_mailbox(inner: str, enh: str):
    if inner.startswith('"'):
        end = _find_quote_end(inner)
        if end < 0:
            raise AddressError(501, enh, "Bad quoted local part")
        qlocal, rest = inner[:end + 1], inner[end + 1:]
        m = _QUOTED.match(qlocal)
        if not m:
            raise AddressError(501, enh, "Bad quoted local part")
        local = re.sub(r"\\(.)", r"\1", m.group(1))
        quoted = True
        if rest == "":
            return _check_local(local, "", enh, quoted)
        if not rest.startswith("@"):
            raise AddressError(501, enh, "Bad address syntax")
        domain = rest[1:]
        if not domain:
            raise AddressError(501, enh, "Bad domain")
    else:
        local, at, domain = inner.rpartition("@")
        if not at:
            local, domain = inner, ""
        quoted = False
        # A bare "@" inside the local part (user@other@ours) is a relay trick:
        # keep it visible for the relay check instead of calling it syntax.
        for piece in local.split("@"):
            if piece and not _DOT_STRING.match(piece):
                raise AddressError(501, enh, "Bad address syntax")
        if local == "" and domain:
            raise AddressError(501, enh, "Empty local part")
        if at and not domain:
            raise AddressError(501, enh, "Bad domain")
    return _check_local(local, _check_domain(domain, enh) if domain else "", enh, quoted)


def _find_quote_end(text: str) -> int:
    escaped = False
    for i, c in enumerate(text[1:], 1):
        if escaped:
            escaped = False
        elif c == "\\":
            escaped = True
        elif c == '"':
            return i
    return -1


def _check_local(local: str, domain: str, enh: str, quoted: bool):
    # The limit is on the local part as sent, quotes and backslashes included.
    wire = Path(local=local, quoted=quoted).address if quoted else local
    if len(wire.encode()) > MAX_LOCAL:
        raise AddressError(501, enh, "Local part too long")
    if not local:
        raise AddressError(501, enh, "Empty local part")
    return local, domain, quoted


def _check_domain(domain: str, enh: str) -> str:
    if domain.endswith(".") and not domain.startswith("["):
        domain = domain[:-1]
    if len(domain) > MAX_DOMAIN or not domain:
        raise AddressError(501, enh, "Bad domain")
    if domain.startswith("["):
        literal = _address_literal(domain)
        if literal is None:
            raise AddressError(501, enh, "Bad address literal")
        return literal
    if not _DOMAIN.match(domain):
        raise AddressError(501, enh, "Bad domain")
    return domain.lower()


def _address_literal(domain: str):
    """``[192.0.2.1]`` or ``[IPv6:2001:db8::1]`` in canonical form, else None.

    RFC 5321 4.1.3: IPv4 octets are 0-255, an IPv6 literal is tagged ``IPv6:``
    (case-insensitive, like every ABNF string). General literals are refused.
    """
    if not (domain.startswith("[") and domain.endswith("]")):
        return None
    body = domain[1:-1]
    if _IPV4_LITERAL.match(body):
        if any(int(octet) > 255 for octet in body.split(".")):
            return None
        return domain
    if body[:len(_IPV6_TAG)].lower() == _IPV6_TAG:
        text = body[len(_IPV6_TAG):]
        if not re.match(r"^[0-9A-Fa-f:.]+$", text):
            return None
        try:
            ipaddress.IPv6Address(text)
        except ValueError:
            return None
        return f"[IPv6:{text.lower()}]"
    return None


def parse_params(params: list) -> dict:
    """ESMTP parameters as {KEYWORD: value or None}; refuses duplicates and junk."""
    out = {}
    for p in params:
        key, eq, value = p.partition("=")
        if not _ESMTP_KEYWORD.match(key) or (eq and not _ESMTP_VALUE.match(value)):
            raise AddressError(501, "5.5.4", "Bad parameter syntax")
        key = key.upper()
        if key in out:
            raise AddressError(501, "5.5.4", f"Duplicate parameter {key}")
        out[key] = value if eq else None
    return out


# -- DSN parameters (RFC 3461) and AUTH= (RFC 4954 5) ---------------------

MAX_ENVID = 100
MAX_ORCPT = 500
_XTEXT = re.compile(r"^(?:[\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-Fa-f]{2})*$")
_NOTIFY_WORDS = ("SUCCESS", "FAILURE", "DELAY")
_ORCPT_TYPES = ("rfc822", "utf-8")


def xtext_decode(value: str) -> str:
    """The text an xtext (RFC 3461 4) stands for; AddressError if it is not one."""
    if not _XTEXT.match(value):
        raise AddressError(501, "5.5.4", "Bad xtext encoding")
    return re.sub(r"\+([0-9A-Fa-f]{2})", lambda m: chr(int(m.group(1), 16)), value)


def _printable(text: str) -> bool:
    return all(0x20 <= ord(c) <= 0x7e for c in text)


def parse_ret(value) -> str:
    """MAIL RET=FULL|HDRS, upper-cased."""
    if value is None or value.upper() not in ("FULL", "HDRS"):
        raise AddressError(501, "5.5.4", "Bad RET parameter, use RET=FULL or RET=HDRS")
    return value.upper()


def parse_envid(value) -> str:
    """MAIL ENVID=xtext, kept encoded as received (at most 100 characters)."""
    if not value or len(value) > MAX_ENVID:
        raise AddressError(501, "5.5.4", f"Bad ENVID parameter (1 to {MAX_ENVID} characters)")
    # Decoded, it will be written into a DSN header: no control characters.
    if not _printable(xtext_decode(value)):
        raise AddressError(501, "5.5.4", "Bad ENVID parameter: control characters")
    return value


def parse_notify(value) -> str:
    """RCPT NOTIFY=NEVER or a list of SUCCESS, FAILURE, DELAY (upper-cased)."""
    if not value:
        raise AddressError(501, "5.5.4", "Bad NOTIFY parameter")
    words = value.upper().split(",")
    if words == ["NEVER"]:
        return "NEVER"
    if "NEVER" in words:
        raise AddressError(501, "5.5.4", "Bad NOTIFY parameter: NEVER must stand alone")
    if len(set(words)) != len(words) or any(w not in _NOTIFY_WORDS for w in words):
        raise AddressError(501, "5.5.4",
                           "Bad NOTIFY parameter, use NEVER or SUCCESS,FAILURE,DELAY")
    return ",".join(words)


def parse_orcpt(value) -> str:
    """RCPT ORCPT=addr-type;xtext, as ``type;xtext`` with the type lower-cased."""
    if not value or len(value) > MAX_ORCPT:
        raise AddressError(501, "5.5.4", f"Bad ORCPT parameter (at most {MAX_ORCPT} characters)")
    addr_type, semi, text = value.partition(";")
    if not semi or addr_type.lower() not in _ORCPT_TYPES or not text:
        raise AddressError(501, "5.5.4", "Bad ORCPT parameter, use ORCPT=rfc822;address")
    if not _printable(xtext_decode(text)):
        raise AddressError(501, "5.5.4", "Bad ORCPT parameter: control characters")
    return f"{addr_type.lower()};{text}"


def parse_auth_param(value) -> str:
    """MAIL AUTH=<> or AUTH=xtext (RFC 4954 5): checked, the decoded identity returned."""
    if value == "<>":
        return ""
    if not value:
        raise AddressError(501, "5.5.4", "Bad AUTH parameter")
    text = xtext_decode(value)
    if not _printable(text):
        raise AddressError(501, "5.5.4", "Bad AUTH parameter: control characters")
    return text


def parse_domain(text: str) -> str:
    """A bare domain name (no address literal), lower-cased; AddressError if not one."""
    if not text or text.startswith("["):
        raise AddressError(501, "5.5.4", "Bad domain")
    return _check_domain(text, "5.5.4")
