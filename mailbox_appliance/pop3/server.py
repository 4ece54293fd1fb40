"""POP3 (RFC 1939, RFC 2449 CAPA, RFC 2595 STLS, RFC 5034 AUTH PLAIN) over the store.

Hand-written on ``Protocol`` for the same reasons as the SMTP receiver: it owns
its framing (bounded lines, plaintext purged after STLS) and talks to storage
only through a maildrop object (see ``maildrop.py``). Passwords are accepted
only once the connection is encrypted. The maildrop is locked for the length
of the session; deletions happen at QUIT (the UPDATE state), never before.
"""

from __future__ import annotations

import base64
import binascii

from twisted.internet import defer
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger

from mailbox_appliance.interfaces import DirectoryUnavailable

MAX_LINE = 255                   # RFC 2449: commands up to 255 octets with CRLF
MAX_SASL_LINE = 12288            # an AUTH continuation line
MAX_ERRORS = 20
AUTHORIZATION, TRANSACTION, CLOSING = range(3)


class MaildropLocked(Exception):
    """Another session holds this maildrop."""


class POP3ServerProtocol(Protocol):
    """One POP3 session."""

    log = Logger()

    def __init__(self, factory):
        self.factory = factory
        self.reactor = factory.reactor
        self._buf = bytearray()
        self._state = AUTHORIZATION
        self._busy = False
        self._discarding = False
        self._tls_active = factory.implicit_tls
        self._user = None             # login given with USER
        self._sasl = None             # waiting for an AUTH PLAIN response
        self.maildrop = None
        self._deleted = set()
        self._errors = 0
        self._timer = None
        self.client_ip = ""

    # -- connection -------------------------------------------------------

    def connectionMade(self):
        self.client_ip = getattr(self.transport.getPeer(), "host", "")
        self._secure = self._tls_active or self.factory.plaintext_ok(self.client_ip)
        self._timer = self.reactor.callLater(self.factory.idle_timeout, self._timed_out)
        self._send(f"+OK {self.factory.hostname} POP3 ready")

    def connectionLost(self, reason):
        self._state = CLOSING
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        if self.maildrop is not None:
            # No QUIT: nothing is deleted (RFC 1939 6), the lock is released.
            self.maildrop.release()
            self.maildrop = None

    def _timed_out(self):
        self._send("-ERR Autologout; idle for too long")
        self._close()

    def _close(self):
        self._state = CLOSING
        self._buf.clear()
        self.transport.loseConnection()

    def _send(self, line):
        self.transport.write(line.encode("utf-8", "replace") + b"\r\n")

    def _ok(self, text=""):
        self._send("+OK" + (" " + text if text else ""))

    def _err(self, text):
        self._send("-ERR " + text)
        self._errors += 1
        if self._errors >= MAX_ERRORS:
            self._send("-ERR Too many errors, closing")
            self._close()

    # -- input ------------------------------------------------------------

    def dataReceived(self, data):
        if self._state == CLOSING:
            return
        self._buf += data
        self._pump()

    def _pump(self):
        while self._state != CLOSING and not self._busy:
            limit = MAX_SASL_LINE if self._sasl is not None else MAX_LINE
            i = self._buf.find(b"\r\n")
            if self._discarding:
                if i < 0:
                    self._buf.clear()
                    return
                del self._buf[:i + 2]
                self._discarding = False
                self._err("Line too long")
                continue
            if i < 0:
                if len(self._buf) > limit:
                    self._discarding = True
                    self._buf.clear()
                return
            line = bytes(self._buf[:i])
            del self._buf[:i + 2]
            if i + 2 > limit:
                self._err("Line too long")
                continue
            if self._timer is not None and self._timer.active():
                self._timer.reset(self.factory.idle_timeout)
            d = self._line(line)
            if isinstance(d, defer.Deferred) and not (d.called and not d.paused):
                self._busy = True
                d.addErrback(self._internal_error)
                d.addBoth(self._resume)
            elif isinstance(d, defer.Deferred):
                d.addErrback(self._internal_error)

    def _resume(self, _):
        self._busy = False
        if self._state != CLOSING:
            self._pump()

    def _internal_error(self, failure):
        self.log.failure("internal error in POP3 session", failure)
        if self._state != CLOSING:
            self._send("-ERR [SYS/TEMP] Internal error")
            self._close()

    def _line(self, line: bytes):
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            return self._err("Bad characters")
        if "\x00" in text or "\r" in text or "\n" in text:
            return self._err("Bad characters")
        if self._sasl is not None:
            return self._sasl_response(text)
        cmd, _, arg = text.partition(" ")
        handler = getattr(self, f"pop_{cmd.upper()}", None)
        if handler is None or not cmd.isalpha():
            return self._err("Unknown command")
        allowed = handler.states
        if self._state not in allowed:
            return self._err("Command not valid in this state")
        return handler(arg)

    # -- AUTHORIZATION ------------------------------------------------------

    def _capabilities(self):
        caps = ["TOP", "UIDL", "RESP-CODES", "AUTH-RESP-CODE", "PIPELINING",
                "EXPIRE NEVER", "LOGIN-DELAY 0"]
        if self._state == AUTHORIZATION:
            if not self._tls_active and self.factory.tls_context is not None:
                caps.append("STLS")
            if self._secure:
                caps += ["USER", "SASL PLAIN"]
        caps.append("IMPLEMENTATION mailbox_appliance")
        return caps

    def pop_CAPA(self, arg):
        self._ok("Capability list follows")
        for c in self._capabilities():
            self._send(c)
        self._send(".")
    pop_CAPA.states = (AUTHORIZATION, TRANSACTION)

    def pop_STLS(self, arg):
        if self._tls_active or self.factory.tls_context is None:
            return self._err("TLS not available" if not self._tls_active
                             else "Already using TLS")
        self._ok("Begin TLS negotiation")
        # Whatever the client pipelined in plaintext is forgotten (RFC 2595 4).
        self._buf.clear()
        self.transport.startTLS(self.factory.tls_context)
        self._tls_active = self._secure = True
        self._user = None
    pop_STLS.states = (AUTHORIZATION,)

    def _plaintext_refused(self):
        if self._secure:
            return False
        self._err("[AUTH] Plaintext authentication disallowed without TLS (use STLS)")
        return True

    def pop_USER(self, arg):
        if self._plaintext_refused():
            return None
        if not arg or len(arg) > 256:
            return self._err("Syntax: USER name")
        self._user = arg
        self._ok("Send your password")
    pop_USER.states = (AUTHORIZATION,)

    def pop_PASS(self, arg):
        if self._plaintext_refused():
            return None
        if self._user is None:
            return self._err("USER first")
        login, self._user = self._user, None
        return self._login(login, arg)
    pop_PASS.states = (AUTHORIZATION,)

    def pop_AUTH(self, arg):
        if not arg:
            # RFC 5034 / the old "AUTH" listing of mechanisms.
            self._ok("Methods follow")
            if self._secure:
                self._send("PLAIN")
            self._send(".")
            return None
        if self._plaintext_refused():
            return None
        mech, _, initial = arg.partition(" ")
        if mech.upper() != "PLAIN":
            return self._err("Unsupported authentication mechanism")
        if initial:
            return self._sasl_plain(initial)
        self._sasl = "PLAIN"
        self._send("+ ")
    pop_AUTH.states = (AUTHORIZATION,)

    def _sasl_response(self, text):
        self._sasl = None
        if text == "*":
            return self._err("Authentication cancelled")
        return self._sasl_plain(text)

    def _sasl_plain(self, b64):
        if b64 == "=":
            b64 = ""
        try:
            raw = base64.b64decode(b64.encode("ascii"), validate=True)
            authzid, authcid, password = raw.decode("utf-8").split("\x00")
        except (binascii.Error, UnicodeError, ValueError):
            return self._err("Bad AUTH PLAIN response")
        if authzid and authzid != authcid:
            return self._err("[AUTH] Authentication failed")
        return self._login(authcid, password)

    def _login(self, login, password):
        d = self.factory.authenticator.login(login, password, self.client_ip)

        def checked(user):
            if user is None:
                return self._err("[AUTH] Authentication failed")
            return self._open_maildrop(user)

        def unavailable(f):
            f.trap(DirectoryUnavailable)
            self._send("-ERR [SYS/TEMP] Authentication service unavailable, try later")
        return d.addCallbacks(checked, unavailable)

    def _open_maildrop(self, user):
        d = defer.maybeDeferred(self.factory.maildrops.open, user)

        def opened(maildrop):
            if self._state == CLOSING:
                maildrop.release()
                return
            self.maildrop = maildrop
            self._state = TRANSACTION
            self._deleted = set()
            self.log.info("pop3 login: user={uid} ip=[{ip}] messages={n}", uid=user.uid,
                          ip=self.client_ip, n=len(maildrop.messages))
            self._ok(f"Logged in, {len(maildrop.messages)} messages")

        def failed(f):
            if f.check(MaildropLocked):
                self._send("-ERR [IN-USE] Mailbox is locked by another POP3 session")
                return
            self.log.failure("cannot open maildrop of {uid}", f, uid=user.uid)
            self._send("-ERR [SYS/TEMP] Cannot open the mailbox, try later")
        return d.addCallbacks(opened, failed)

    def pop_QUIT(self, arg):
        if self._state != TRANSACTION:
            self._ok("Bye")
            self._close()
            return None
        maildrop, deleted = self.maildrop, sorted(self._deleted)
        d = maildrop.delete(deleted) if deleted else defer.succeed(None)

        def done(_):
            # The UPDATE state is over: free the maildrop before saying so.
            self.maildrop = None
            maildrop.release()
            self._ok(f"Bye, {len(deleted)} messages deleted")
            self._close()

        def failed(f):
            self.log.failure("QUIT could not delete messages", f)
            self._send("-ERR [SYS/TEMP] Some messages could not be deleted")
            self._close()
        return d.addCallbacks(done, failed)
    pop_QUIT.states = (AUTHORIZATION, TRANSACTION)

    # -- TRANSACTION --------------------------------------------------------

    def _message(self, arg):
        """The (number, message) named by ``arg``, or None after an -ERR."""
        try:
            n = int(arg)
        except ValueError:
            self._err("Syntax: a message number")
            return None
        msgs = self.maildrop.messages
        if not 1 <= n <= len(msgs) or n in self._deleted or len(arg) > 10:
            self._err("No such message")
            return None
        return n, msgs[n - 1]

    def _live(self):
        return [(i, m) for i, m in enumerate(self.maildrop.messages, 1) if i not in self._deleted]

    def pop_STAT(self, arg):
        live = self._live()
        self._ok(f"{len(live)} {sum(m.size for _, m in live)}")
    pop_STAT.states = (TRANSACTION,)

    def pop_LIST(self, arg):
        if arg:
            found = self._message(arg)
            if found:
                self._ok(f"{found[0]} {found[1].size}")
            return None
        live = self._live()
        lines = [f"+OK {len(live)} messages"] + [f"{i} {m.size}" for i, m in live] + ["."]
        self.transport.write(("\r\n".join(lines) + "\r\n").encode())
    pop_LIST.states = (TRANSACTION,)

    def pop_UIDL(self, arg):
        if arg:
            found = self._message(arg)
            if found:
                self._ok(f"{found[0]} {found[1].uidl}")
            return None
        lines = ["+OK"] + [f"{i} {m.uidl}" for i, m in self._live()] + ["."]
        self.transport.write(("\r\n".join(lines) + "\r\n").encode())
    pop_UIDL.states = (TRANSACTION,)

    def pop_DELE(self, arg):
        found = self._message(arg)
        if found:
            self._deleted.add(found[0])
            self._ok(f"Message {found[0]} deleted")
    pop_DELE.states = (TRANSACTION,)

    def pop_RSET(self, arg):
        self._deleted = set()
        self._ok(f"{len(self.maildrop.messages)} messages")
    pop_RSET.states = (TRANSACTION,)

    def pop_NOOP(self, arg):
        self._ok()
    pop_NOOP.states = (TRANSACTION,)

    def pop_RETR(self, arg):
        found = self._message(arg)
        if not found:
            return None
        return self._send_message(found[1], None)
    pop_RETR.states = (TRANSACTION,)

    def pop_TOP(self, arg):
        number, _, lines = arg.partition(" ")
        found = self._message(number)
        if not found:
            return None
        if not lines.isdigit() or len(lines) > 9:
            return self._err("Syntax: TOP message lines")
        return self._send_message(found[1], int(lines))
    pop_TOP.states = (TRANSACTION,)

    def _send_message(self, msg, body_lines):
        def got(data):
            if self._state == CLOSING:
                return
            if body_lines is not None:
                data = _top(data, body_lines)
            self.transport.write(b"+OK " + str(msg.size).encode() + b" octets\r\n" +
                                 _dot_stuff(data) + b".\r\n")

        def failed(f):
            self.log.failure("cannot read message {uid}", f, uid=msg.uid)
            self._send("-ERR [SYS/TEMP] Cannot read the message")
        return self.maildrop.read(msg).addCallbacks(got, failed)


def _top(data: bytes, n: int) -> bytes:
    """The header, the blank line and the first ``n`` body lines."""
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return data
    head, body = data[:end + 4], data[end + 4:]
    if body.endswith(b"\r\n"):
        body = body[:-2]
    lines = body.split(b"\r\n", n)[:n] if body else []
    return head + b"".join(line + b"\r\n" for line in lines)


def _dot_stuff(data: bytes) -> bytes:
    """Byte-stuff lines starting with '.', and end with CRLF (RFC 1939 3)."""
    if data.startswith(b"."):
        data = b"." + data
    data = data.replace(b"\r\n.", b"\r\n..")
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    return data


class POP3ServerFactory(Factory):
    """Builds POP3 sessions; ``implicit_tls`` for the pop3s port."""

    protocol = POP3ServerProtocol
    noisy = False

    def __init__(self, reactor, hostname, authenticator, maildrops, tls_context=None,
                 implicit_tls=False, idle_timeout=600, plaintext_ok=lambda ip: False):
        self.reactor = reactor
        self.hostname = hostname
        self.authenticator = authenticator
        self.maildrops = maildrops
        self.tls_context = tls_context
        self.implicit_tls = implicit_tls
        self.idle_timeout = idle_timeout
        self.plaintext_ok = plaintext_ok

    def buildProtocol(self, addr):
        return self.protocol(self)
