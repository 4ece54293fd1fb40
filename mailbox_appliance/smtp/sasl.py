"""SASL for SMTP AUTH (RFC 4954): the PLAIN (RFC 4616) and LOGIN exchanges.

Only the message formats live here, with no I/O: an exchange is fed the
decoded client responses and answers either the next challenge or the
credentials to check. The protocol code sends the challenges, enforces the
line limit and asks the Authenticator. Every malformed input is a SASLError
carrying the RFC 4954 reply to give, so nothing a client sends can raise
anything else.

Also here: the per-address count of failed logins behind
``[submission] max_auth_failures_per_minute``.
"""

from __future__ import annotations

import base64
import binascii
import collections
from dataclasses import dataclass

# RFC 4954 4: a server must take AUTH lines (command or response) of 12288
# octets; Postfix's smtpd_sasl_response_limit is the same number.
MAX_SASL_LINE = 12288

MECHANISMS = ("PLAIN", "LOGIN")


class SASLError(Exception):
    """A refused step of an exchange, with the SMTP reply it calls for."""

    def __init__(self, code: int, enhanced: str, text: str):
        super().__init__(text)
        self.code, self.enhanced, self.text = code, enhanced, text


def malformed(text="Error: malformed authentication response"):
    return SASLError(501, "5.5.2", text)


@dataclass(frozen=True)
class Credentials:
    """What a finished exchange asks to be checked."""

    login: str
    password: str
    authzid: str = ""       # the identity to act as; "" = the login's own


def decode_response(text: str) -> bytes:
    """A client response line as octets: base64, ``=`` for empty, ``*`` cancels."""
    if text == "*":
        raise SASLError(501, "5.5.2", "Error: authentication cancelled")
    if text == "=":
        return b""
    if not text:
        # An empty line is not a valid (empty) response: that is "=".
        raise malformed("Error: empty authentication response, send = for none")
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, ValueError, UnicodeError):
        raise malformed("Error: invalid base64 data in authentication response") from None


def encode_challenge(challenge: bytes) -> str:
    return base64.b64encode(challenge).decode("ascii")


def _text(raw: bytes, what: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise malformed(f"Error: {what} is not UTF-8") from None


class PlainExchange:
    """RFC 4616: one message ``[authzid] NUL authcid NUL passwd``."""

    name = "PLAIN"

    def step(self, response):
        """``response`` None asks for the (empty) first challenge."""
        if response is None:
            return b""
        parts = response.split(b"\x00")
        if len(parts) != 3:
            raise malformed("Error: malformed PLAIN response")
        authzid, authcid, password = (_text(p, "PLAIN response") for p in parts)
        if not authcid:
            raise malformed("Error: PLAIN response without a user name")
        # An empty password is left for the Authenticator to refuse: it is a
        # failed login (counted and slowed down), not a protocol error.
        return Credentials(login=authcid, password=password, authzid=authzid)


class LoginExchange:
    """The non-standard but universal LOGIN: user name, then password.

    An initial response (SASL-IR) is taken as the user name, as Postfix,
    Dovecot and the draft describing LOGIN do.
    """

    name = "LOGIN"
    USERNAME = b"Username:"
    PASSWORD = b"Password:"

    def __init__(self):
        self._login = None

    def step(self, response):
        if response is None:
            return self.USERNAME
        if self._login is None:
            login = _text(response, "user name")
            if not login:
                raise malformed("Error: empty user name")
            self._login = login
            return self.PASSWORD
        return Credentials(login=self._login, password=_text(response, "password"))


_EXCHANGES = {"PLAIN": PlainExchange, "LOGIN": LoginExchange}


def start(mechanism: str):
    """A new exchange for ``mechanism`` (any case), or SASLError 504."""
    cls = _EXCHANGES.get(mechanism.upper())
    if cls is None:
        raise SASLError(504, "5.5.4", "Error: unsupported authentication mechanism")
    return cls()


def owns_identity(user, identity: str) -> bool:
    """True if the authorization identity ``identity`` names ``user`` itself."""
    wanted = identity.strip().lower()
    names = (user.uid, user.mail) + tuple(user.addresses)
    return any(wanted == n.lower() for n in names)


class AuthFailureLimiter:
    """Failed logins per client address in the last minute, shared by sessions.

    Past ``limit`` failures an address gets no more tries until the oldest
    of them is a minute old. Memory is bounded: each address keeps at most
    ``limit`` times, and past ``max_tracked`` addresses the stalest go.
    """

    WINDOW = 60.0

    def __init__(self, clock, limit: int, max_tracked: int = 50000):
        self.clock = clock
        self.limit = limit
        self.max_tracked = max_tracked
        self._failures = collections.OrderedDict()     # ip -> deque of times

    def _recent(self, ip):
        times = self._failures.get(ip)
        if times is None:
            return None
        horizon = self.clock.seconds() - self.WINDOW
        while times and times[0] <= horizon:
            times.popleft()
        if not times:
            del self._failures[ip]
            return None
        return times

    def blocked(self, ip) -> bool:
        """True if ``ip`` has used up its failures for now (0 = no limit)."""
        if self.limit <= 0:
            return False
        times = self._recent(ip)
        return times is not None and len(times) >= self.limit

    def failed(self, ip):
        """Count one failed login of ``ip``."""
        if self.limit <= 0:
            return
        times = self._recent(ip)
        if times is None:
            while len(self._failures) >= self.max_tracked:
                self._failures.popitem(last=False)
            times = self._failures[ip] = collections.deque(maxlen=self.limit)
        else:
            self._failures.move_to_end(ip)
        times.append(self.clock.seconds())
