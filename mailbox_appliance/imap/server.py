"""The IMAP4rev1 server (RFC 3501) with IDLE, UIDPLUS, MOVE, LITERAL+, ID, ENABLE,
NAMESPACE, UNSELECT and SPECIAL-USE.

Hand-written on ``Protocol``: the framing (``parser.CommandReader``) bounds
every line and literal, STARTTLS drops what was pipelined in plaintext, and
commands run one at a time in order, each answered by its tag. This module
holds the connection and the states; mailbox commands are in ``commands.py``.
"""

from __future__ import annotations

import base64
import binascii

from twisted.internet import defer
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger

from mailbox_appliance.imap.parser import (
    Command, CommandReader, LineTooLong, LiteralTooBig, ParseError)
from mailbox_appliance.imap.tokens import Atom, astring
from mailbox_appliance.interfaces import DirectoryUnavailable

NOT_AUTHENTICATED, AUTHENTICATED, SELECTED, LOGOUT = range(4)
ANY = (NOT_AUTHENTICATED, AUTHENTICATED, SELECTED)
AUTHED = (AUTHENTICATED, SELECTED)
MAX_BAD = 20


class IMAPError(Exception):
    """A command failed: answered as ``tag NO|BAD [code] text``."""

    def __init__(self, kind, text, code=None):
        super().__init__(text)
        self.kind, self.text, self.code = kind, text, code


def no(text, code=None):
    return IMAPError("NO", text, code)


def bad(text, code=None):
    return IMAPError("BAD", text, code)


def quote(text) -> bytes:
    """An IMAP string: quoted when it can be, a literal otherwise."""
    data = text.encode("utf-8") if isinstance(text, str) else text
    if len(data) < 1024 and not any(c in data for c in b'\r\n\x00') and all(c < 0x80 for c in data):
        return b'"' + data.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'
    return b"{%d}\r\n" % len(data) + data


class IMAPServerProtocol(Protocol):
    """One IMAP session: framing, states, and the commands of any state."""

    log = Logger()

    def __init__(self, factory):
        self.factory = factory
        self.reactor = factory.reactor
        self.reader = CommandReader(max_line=factory.max_command,
                                    max_literal=factory.max_command,
                                    max_append=factory.max_append)
        self.state = NOT_AUTHENTICATED
        self.tls_active = factory.implicit_tls
        self.user = None
        self.client_ip = ""
        self._queue = []
        self._busy = False
        self._bad = 0
        self._timer = None
        self._sasl = None           # tag of an AUTHENTICATE waiting for its response
        self.enabled = set()

    # -- connection -------------------------------------------------------

    def connectionMade(self):
        self.client_ip = getattr(self.transport.getPeer(), "host", "")
        # Passwords may travel in plaintext only from plaintext_auth_networks.
        self.secure = self.tls_active or self.factory.plaintext_ok(self.client_ip)
        self._timer = self.reactor.callLater(self.factory.login_timeout, self._timed_out)
        self.send_line(b"* OK [CAPABILITY " + self.capabilities().encode() + b"] "
                       + self.factory.hostname.encode() + b" IMAP4rev1 ready")

    _session_key = None

    def connectionLost(self, reason):
        self.state = LOGOUT
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        key, self._session_key = self._session_key, None
        if key is not None:
            left = self.factory.sessions.get(key, 1) - 1
            if left > 0:
                self.factory.sessions[key] = left
            else:
                self.factory.sessions.pop(key, None)
        self.session_closed()

    def session_closed(self):
        """Hook for the mailbox layer: forget the selected mailbox, stop IDLE."""

    def _timed_out(self):
        self.send_line(b"* BYE Autologout; idle for too long")
        self.close()

    def close(self):
        self.state = LOGOUT
        self._queue = []
        self.transport.loseConnection()

    def send_line(self, data: bytes):
        self.transport.write(data + b"\r\n")

    def send(self, data: bytes):
        self.transport.write(data)

    def capabilities(self) -> str:
        caps = ["IMAP4rev1", "LITERAL+", "SASL-IR", "ID", "ENABLE", "IDLE", "NAMESPACE",
                "UNSELECT", "UIDPLUS", "MOVE", "SPECIAL-USE", "CHILDREN"]
        if self.state == NOT_AUTHENTICATED:
            if not self.tls_active and self.factory.tls_context is not None:
                caps.append("STARTTLS")
            caps.append("AUTH=PLAIN" if self.secure else "LOGINDISABLED")
        return " ".join(caps)

    # -- input ------------------------------------------------------------

    def dataReceived(self, data):
        if self.state == LOGOUT:
            return
        if self._sasl is not None:
            return self._sasl_data(data)
        for event in self.reader.feed(data):
            self._queue.append(event)
        self._pump()

    def _pump(self):
        while self._queue and not self._busy and self.state != LOGOUT:
            event = self._queue.pop(0)
            if isinstance(event, tuple):
                self.send_line(b"+ Ready for literal data")
                continue
            if isinstance(event, LiteralTooBig):
                self.send_line(f"{event.tag} NO [TOOBIG] Literal of {event.size} octets is "
                               f"over the limit of {event.limit}".encode())
                if not event.synchronizing:
                    self.close()
                continue
            if isinstance(event, LineTooLong):
                self._answer_bad(event.tag, "Command line too long")
                continue
            if isinstance(event, ParseError):
                self._answer_bad(str(event) or "*", "Malformed command")
                continue
            self._run(event)

    def _answer_bad(self, tag, text):
        self.send_line(f"{tag} BAD {text}".encode())
        self._bad += 1
        if self._bad >= MAX_BAD:
            self.send_line(b"* BYE Too many invalid commands")
            self.close()

    def _run(self, cmd: Command):
        if self._timer is not None and self._timer.active():
            self._timer.reset(self.factory.idle_timeout if self.user else
                              self.factory.login_timeout)
        handler = getattr(self, "cmd_" + cmd.name.replace(".", "_"), None)
        if handler is None or not cmd.name.isalpha():
            return self._answer_bad(cmd.tag, "Unknown command")
        if self.state not in handler.states:
            return self._answer_bad(cmd.tag, "Command not valid in this state")
        try:
            args = cmd.arguments()
            result = handler(cmd.tag, args)
        except IMAPError as e:
            return self._finish(cmd.tag, e)
        except ParseError:
            return self._answer_bad(cmd.tag, "Malformed arguments")
        except Exception:
            self.log.failure("IMAP command {name} failed", name=cmd.name)
            return self._finish(cmd.tag, no("Internal error, try again later", "SERVERBUG"))
        if isinstance(result, defer.Deferred):
            self._busy = True
            result.addCallbacks(lambda r: self._finish(cmd.tag, r),
                                lambda f: self._failed(cmd.tag, f))
            result.addBoth(self._resume)
        else:
            self._finish(cmd.tag, result)

    def _resume(self, _):
        self._busy = False
        self._pump()

    def _failed(self, tag, failure):
        if failure.check(IMAPError):
            return self._finish(tag, failure.value)
        self.log.failure("IMAP command failed", failure)
        return self._finish(tag, no("Internal error, try again later", "SERVERBUG"))

    def _finish(self, tag, result):
        """Send the tagged completion: OK text, or the NO/BAD of an IMAPError."""
        if self.state == LOGOUT and not isinstance(result, IMAPError) and result is None:
            return
        if isinstance(result, IMAPError):
            code = f"[{result.code}] " if result.code else ""
            if result.kind == "BAD":
                return self._answer_bad(tag, code + result.text)
            return self.send_line(f"{tag} NO {code}{result.text}".encode())
        if result is False:
            return                      # the command answers by itself (IDLE, AUTHENTICATE)
        self.send_line(f"{tag} OK {result or 'Completed'}".encode())

    # -- any state ----------------------------------------------------------

    def cmd_CAPABILITY(self, tag, args):
        self.send_line(b"* CAPABILITY " + self.capabilities().encode())
        return "Capability completed"
    cmd_CAPABILITY.states = ANY

    def cmd_NOOP(self, tag, args):
        return self.poll_changes().addCallback(lambda _: "NOOP completed") \
            if self.state == SELECTED else "NOOP completed"
    cmd_NOOP.states = ANY

    def poll_changes(self):
        """Hook for the mailbox layer: report changes of the selected mailbox."""
        return defer.succeed(None)

    def cmd_LOGOUT(self, tag, args):
        self.send_line(b"* BYE Logging out")
        self.send_line(f"{tag} OK Logout completed".encode())
        self.close()
        return None
    cmd_LOGOUT.states = ANY

    def cmd_ID(self, tag, args):
        self.send_line(b'* ID ("name" "mailbox_appliance")')
        return "ID completed"
    cmd_ID.states = ANY

    # -- not authenticated --------------------------------------------------

    def cmd_STARTTLS(self, tag, args):
        if self.tls_active or self.factory.tls_context is None:
            raise bad("TLS is already active" if self.tls_active else "TLS not available")
        self.send_line(f"{tag} OK Begin TLS negotiation now".encode())
        # Commands pipelined behind STARTTLS were sent in plaintext: drop them.
        self._queue = []
        self.reader = CommandReader(max_line=self.factory.max_command,
                                    max_literal=self.factory.max_command,
                                    max_append=self.factory.max_append)
        self.transport.startTLS(self.factory.tls_context)
        self.tls_active = self.secure = True
        return False
    cmd_STARTTLS.states = (NOT_AUTHENTICATED,)

    def cmd_LOGIN(self, tag, args):
        if not self.secure:
            raise no("Plaintext authentication disallowed without TLS", "PRIVACYREQUIRED")
        if len(args) != 2:
            raise bad("Syntax: LOGIN user password")
        login, password = astring(args[0]), astring(args[1])
        if login is None or password is None:
            raise bad("Syntax: LOGIN user password")
        return self._login(login, password)
    cmd_LOGIN.states = (NOT_AUTHENTICATED,)

    def cmd_AUTHENTICATE(self, tag, args):
        if not self.secure:
            raise no("Plaintext authentication disallowed without TLS", "PRIVACYREQUIRED")
        if not args or not isinstance(args[0], Atom) or len(args) > 2:
            raise bad("Syntax: AUTHENTICATE mechanism [initial-response]")
        if args[0].upper() != "PLAIN":
            raise no("Unsupported authentication mechanism")
        if len(args) == 2:
            return self._sasl_plain(str(args[1]) if isinstance(args[1], Atom) else "")
        self._sasl = tag
        self._sasl_buf = bytearray()
        self.send_line(b"+ ")
        return False
    cmd_AUTHENTICATE.states = (NOT_AUTHENTICATED,)

    def _sasl_data(self, data):
        self._sasl_buf += data
        i = self._sasl_buf.find(b"\r\n")
        if i < 0:
            if len(self._sasl_buf) > 12288:
                tag, self._sasl = self._sasl, None
                self._answer_bad(tag, "SASL response too long")
                self.close()
            return
        line, rest = bytes(self._sasl_buf[:i]), bytes(self._sasl_buf[i + 2:])
        tag, self._sasl = self._sasl, None
        if line == b"*":
            self._answer_bad(tag, "Authentication cancelled")
            result = None
        else:
            try:
                result = self._sasl_plain(line.decode("ascii"))
            except UnicodeDecodeError:
                result = bad("Bad SASL response")
            except IMAPError as e:
                result = e
        if isinstance(result, defer.Deferred):
            self._busy = True
            result.addCallbacks(lambda r: self._finish(tag, r), lambda f: self._failed(tag, f))
            result.addBoth(self._resume)
        elif result is not None:
            self._finish(tag, result)
        if rest:
            self.dataReceived(rest)

    def _sasl_plain(self, b64):
        try:
            raw = base64.b64decode(b64.encode("ascii"), validate=True) if b64 != "=" else b""
            authzid, authcid, password = raw.decode("utf-8").split("\x00")
        except (binascii.Error, UnicodeError, ValueError):
            raise bad("Bad AUTHENTICATE PLAIN response")
        if authzid and authzid != authcid:
            raise no("Authentication failed", "AUTHENTICATIONFAILED")
        return self._login(authcid, password)

    def _login(self, login, password):
        d = self.factory.authenticator.login(login, password, self.client_ip)

        def checked(user):
            if user is None:
                raise no("Authentication failed", "AUTHENTICATIONFAILED")
            return self.logged_in(user)

        def unavailable(f):
            f.trap(DirectoryUnavailable)
            raise no("Authentication service unavailable, try again later", "UNAVAILABLE")
        return d.addCallbacks(checked, unavailable)

    def logged_in(self, user):
        """Enter the authenticated state (the mailbox layer extends this)."""
        key = (user.dn, self.client_ip)
        if self.factory.sessions.get(key, 0) >= self.factory.max_user_ip_connections:
            raise no("Too many connections of this user from this address", "LIMIT")
        self.factory.sessions[key] = self.factory.sessions.get(key, 0) + 1
        self._session_key = key
        self.user = user
        self.state = AUTHENTICATED
        self.log.info("imap login: user={uid} ip=[{ip}]", uid=user.uid, ip=self.client_ip)
        return f"[CAPABILITY {self.capabilities()}] Logged in"

    # -- authenticated ------------------------------------------------------

    def cmd_ENABLE(self, tag, args):
        # Nothing we know needs enabling yet (CONDSTORE, UTF8=ACCEPT later).
        self.send_line(b"* ENABLED")
        return "ENABLE completed"
    cmd_ENABLE.states = AUTHED

    def cmd_NAMESPACE(self, tag, args):
        self.send_line(b'* NAMESPACE (("" ".")) NIL NIL')
        return "NAMESPACE completed"
    cmd_NAMESPACE.states = AUTHED


class IMAPServerFactory(Factory):
    """Builds IMAP sessions; ``implicit_tls`` for the imaps port."""

    protocol = IMAPServerProtocol
    noisy = False

    def __init__(self, reactor, hostname, authenticator, store, tls_context=None,
                 implicit_tls=False, max_append=50 * 1024 * 1024, max_command=65536,
                 idle_timeout=30 * 60, login_timeout=60, plaintext_ok=lambda ip: False,
                 max_user_ip_connections=20):
        self.reactor = reactor
        self.hostname = hostname
        self.authenticator = authenticator
        self.store = store
        self.tls_context = tls_context
        self.implicit_tls = implicit_tls
        self.max_append = max_append
        self.max_command = max_command
        self.idle_timeout = idle_timeout
        self.login_timeout = login_timeout
        self.plaintext_ok = plaintext_ok
        self.max_user_ip_connections = max_user_ip_connections
        self.sessions = {}          # (user dn, client ip) -> number of sessions

    def buildProtocol(self, addr):
        return self.protocol(self)
