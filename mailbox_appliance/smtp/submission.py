"""Message submission (RFC 6409) on the ``submission`` and ``submissions`` ports.

The same receiver as the MX, with what a submission port adds: SASL AUTH
(RFC 4954; PLAIN and LOGIN, offered only inside TLS, RFC 8314), mail only
from authenticated users, the envelope sender and the ``From:`` addresses
bound to the login (Postfix's reject_sender_login_mismatch), and the
fix-ups of ``smtp.fixup`` on every message. ``submission`` starts in
plaintext and offers STARTTLS (port 587); ``submissions`` is wrapped in TLS
from the first octet (port 465).
"""

from __future__ import annotations

import re
import secrets
from email.utils import getaddresses

from twisted.logger import Logger
from zope.interface import implementer

from mailbox_appliance.interfaces import DirectoryUnavailable, IPolicyCheck
from mailbox_appliance.smtp import sasl
from mailbox_appliance.smtp.fixup import SubmissionFixup
from mailbox_appliance.smtp.policy import (
    HopCount, PolicyChain, RecipientExists, RelayAccess, Verdict)
from mailbox_appliance.smtp.server import (
    CLOSING, SMTPServerFactory, SMTPServerProtocol, message_date)

# What of a login name may appear in a Received: comment; the rest is '?'.
_UNSAFE_IN_COMMENT = re.compile(r"[^A-Za-z0-9._@+-]")
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_ADDR_SPEC = re.compile(rf"^{_ATOM}(?:\.{_ATOM})*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*$")


class SubmissionServerProtocol(SMTPServerProtocol):
    """One submission session (see the module docstring)."""

    log = Logger()
    offers_etrn = False

    # -- AUTH ---------------------------------------------------------------

    def _line_limit(self, buf):
        # RFC 4954 4: AUTH lines may be far longer than other commands.
        if self._continuation is not None:
            return sasl.MAX_SASL_LINE, (500, "5.5.6",
                                        "Error: authentication exchange line is too long")
        if buf[:5].upper() == b"AUTH ":
            return sasl.MAX_SASL_LINE, (500, "5.5.6", "Error: AUTH command line is too long")
        return super()._line_limit(buf)

    def _ehlo_lines(self):
        lines = super()._ehlo_lines()
        if self._tls_active:
            # RFC 8314 / Postfix smtpd_tls_auth_only: passwords only inside TLS.
            lines.append("AUTH " + " ".join(sasl.MECHANISMS))
        return lines

    def smtp_AUTH(self, arg):
        s = self.session
        if not s.esmtp:
            return self._reply(503, "5.5.1", "Error: send EHLO first")
        if not self._tls_active:
            # Refused before looking at anything: no password is ever checked
            # (or counted) outside TLS.
            return self._reply(538, "5.7.11",
                               "Encryption required for requested authentication mechanism")
        if s.authenticated:
            return self._reply(503, "5.5.1", "Error: already authenticated")
        if s.sender is not None:
            return self._reply(503, "5.5.1", "Error: MAIL transaction in progress")
        mechanism, _, initial = arg.partition(" ")
        if not mechanism or " " in initial:
            return self._reply(501, "5.5.4", "Syntax: AUTH mechanism [initial-response]")
        if self.factory.auth_limiter.blocked(s.client_ip):
            return self._too_many_failures()
        try:
            exchange = sasl.start(mechanism)
            return self._sasl_step(exchange, sasl.decode_response(initial) if initial else None)
        except sasl.SASLError as e:
            return self._reply(e.code, e.enhanced, e.text)

    def _sasl_step(self, exchange, response):
        result = exchange.step(response)
        if isinstance(result, sasl.Credentials):
            return self._check_credentials(result, exchange.name)
        self._continuation = lambda line: self._sasl_response(exchange, line)
        self._reply(334, None, sasl.encode_challenge(result))
        return None

    def _sasl_response(self, exchange, line):
        try:
            try:
                text = line.decode("ascii")
            except UnicodeDecodeError:
                raise sasl.malformed() from None
            return self._sasl_step(exchange, sasl.decode_response(text))
        except sasl.SASLError as e:
            return self._reply(e.code, e.enhanced, e.text)

    def _check_credentials(self, creds, mechanism=""):
        s = self.session
        ip = s.client_ip
        authenticator = self.factory.authenticator
        d = authenticator.login(creds.login, creds.password, ip)

        def checked(user):
            if self._mode == CLOSING:
                return
            if user is not None and creds.authzid and not sasl.owns_identity(user, creds.authzid):
                # RFC 4616: acting for someone else needs a right nobody has here.
                authenticator.record_failure(ip, creds.login)
                user = None
            if user is None:
                self.factory.auth_limiter.failed(ip)
                self._reply(535, "5.7.8", "Error: authentication failed")
                return
            s.authenticated = user.uid
            s.user = user
            s.auth_mechanism = mechanism
            self.log.info("[{ip}]: authenticated as {uid} ({listener})", ip=ip,
                          uid=user.uid, listener=s.listener)
            self._reply(235, "2.7.0", "Authentication successful")

        def unavailable(f):
            f.trap(DirectoryUnavailable)
            self.log.warn("authentication from [{ip}] not checked: {why}", ip=ip,
                          why=f.getErrorMessage())
            self._reply(454, "4.7.0", "Temporary authentication failure")
        return d.addCallbacks(checked, unavailable)

    def _too_many_failures(self):
        self.log.warn("too many failed authentications from [{ip}]", ip=self.session.client_ip)
        self._reply(421, "4.7.0",
                    f"{self.factory.hostname} Error: too many failed authentications, "
                    "try again later")
        self._close()

    # -- the message ----------------------------------------------------------

    def _message_filter(self, qid):
        hostname = self.factory.hostname
        now = self.reactor.seconds()
        return SubmissionFixup(
            message_id=lambda: f"<{qid}.{secrets.token_hex(6)}@{hostname}>",
            date=lambda: message_date(now))

    def _received_comment(self):
        login = self.session.authenticated
        if not login or not self.factory.config.submission.authenticated_header:
            return ""
        return f"(Authenticated sender: {_UNSAFE_IN_COMMENT.sub('?', login)[:64]})"


class SubmissionServerFactory(SMTPServerFactory):
    """Builds submission sessions; both ports share the Authenticator and limiter."""

    protocol = SubmissionServerProtocol

    def __init__(self, reactor, config, policy, spool, queue, tls_context, authenticator,
                 auth_limiter, implicit_tls=False, listener="submission"):
        super().__init__(reactor, config, policy, spool, queue, tls_context=tls_context)
        self.authenticator = authenticator
        self.auth_limiter = auth_limiter
        self.implicit_tls = implicit_tls
        self.listener = listener


# -- the policy checks of the submission ports ----------------------------------

def owns_address(user, address: str) -> bool:
    """True if ``address`` is the user's mail or one of its addresses.

    The domain is compared without case, the local part as the directory
    has it.
    """
    local, at, domain = address.rpartition("@")
    if not at:
        return False
    for own in (user.mail,) + tuple(user.addresses):
        own_local, _, own_domain = own.rpartition("@")
        if own_local == local and own_domain.lower() == domain.lower():
            return True
    return False


@implementer(IPolicyCheck)
class AuthenticationRequired:
    """RFC 6409 4.3 / 6: no mail without a login (530 5.7.0 at MAIL)."""

    name = "authentication_required"
    stages = frozenset({"mail"})

    def check(self, stage, session, path):
        if session.authenticated:
            return None
        return Verdict(530, "5.7.0", "Authentication required")


@implementer(IPolicyCheck)
class SenderLoginMatch:
    """The envelope sender must be one of the user's own addresses, or ``<>``."""

    name = "sender_login_match"
    stages = frozenset({"mail"})

    def check(self, stage, session, path):
        if path.null:
            return None
        if session.user is not None and not path.quoted and \
                owns_address(session.user, f"{path.local}@{path.domain}"):
            return None
        return Verdict(553, "5.7.1", f"<{path.address}>: Sender address rejected: "
                                     f"not owned by user {session.authenticated}")


def from_addresses(raw: bytes):
    """The addresses of one ``From:`` field value, or None if it is not plainly a list.

    ``email.utils.getaddresses`` of Python 3.11 guesses at broken input
    (CVE-2023-27043: ``alice@a(<bob@b>`` gives alice, another parser may
    say bob). So the value is first split by hand (quotes, comments and
    angle brackets balanced, no groups or routes), and each mailbox must
    give getaddresses exactly the address written in it; anything else is
    called unparseable.
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    text = text.replace("\r\n", "")
    if any((ord(c) < 0x20 and c != "\t") or c == "\x7f" for c in text):
        return None
    items = _split_mailboxes(text)
    if not items:
        return None
    out = []
    for item, written in items:
        parsed = getaddresses([item])
        if len(parsed) != 1 or parsed[0][1] != written or not _ADDR_SPEC.match(written):
            return None
        out.append(written)
    return out


def _split_mailboxes(text):
    """[(item text, address as written)] of a mailbox list, or None if malformed."""
    items = []
    start = 0
    bare, angle = [], None          # address text outside / inside <...>
    in_angle = in_quote = escaped = False
    depth = 0                       # nesting of (comments)
    for i, c in enumerate(text):
        target = angle if in_angle else bare
        if escaped:
            escaped = False
            if not depth:
                target.append(c)
            continue
        if in_quote:
            target.append(c)
            if c == "\\":
                escaped = True
            elif c == '"':
                in_quote = False
            continue
        if depth:
            if c == "\\":
                escaped = True
            elif c == "(":
                depth += 1
            elif c == ")":
                depth -= 1
            continue
        if c == "(":
            depth = 1
        elif c == '"':
            in_quote = True
            target.append(c)
        elif in_angle:
            if c == ">":
                in_angle = False
            elif c == "<":
                return None
            else:
                angle.append(c)
        elif c == "<":
            if angle is not None:
                return None
            in_angle, angle = True, []
        elif c in ">:;)":
            return None             # stray bracket, group syntax or a route
        elif c == ",":
            if not _item(items, text[start:i], bare, angle):
                return None
            start = i + 1
            bare, angle = [], None
        else:
            if angle is not None and not c.isspace():
                return None         # text after <address>
            bare.append(c)
    if in_angle or in_quote or escaped or depth:
        return None
    if not _item(items, text[start:], bare, angle):
        return None
    return items


def _item(items, item, bare, angle):
    written = "".join(angle if angle is not None else bare).strip()
    if not written:
        return False
    items.append((item, written))
    return True


@implementer(IPolicyCheck)
class FromHeaderMatch:
    """Every ``From:`` address must be the user's own (checked at end of data)."""

    name = "from_header_match"
    stages = frozenset({"eod"})

    def check(self, stage, session, message):
        values = message.from_values
        if not values:
            return None         # not collected, or no From: at all
        if len(values) > 1:
            return Verdict(553, "5.7.1", "Error: more than one From: header")
        addresses = from_addresses(values[0])
        if addresses is None:
            return Verdict(553, "5.7.1", "Error: unparseable From: header")
        for a in addresses:
            if session.user is None or not owns_address(session.user, a):
                return Verdict(553, "5.7.1", f"<{a}>: From: address not owned by user "
                                             f"{session.authenticated}")
        return None


def submission_policy(config, directory, domains, lists=None) -> PolicyChain:
    """The checks of the submission ports, in order."""
    chain = PolicyChain([AuthenticationRequired()])
    if config.submission.sender_login_match:
        chain.add(SenderLoginMatch())
    # Authenticated users relay anywhere; RelayAccess still refuses routing
    # tricks in local parts, and our own recipients must exist.
    for check in (RelayAccess(domains), RecipientExists(directory, domains, lists=lists),
                  HopCount(config.smtp.max_received_headers)):
        chain.add(check)
    if config.submission.from_header_match:
        chain.add(FromHeaderMatch())
    return chain
