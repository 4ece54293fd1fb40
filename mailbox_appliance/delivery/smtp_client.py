"""The SMTP client that sends mail to other hosts (RFC 5321, 3207, 4954, 2920, 3461).

Hand-written rather than twisted.mail.smtp's client, for the controls an MTA
needs: replies are read with bounded lines and line counts (a reply flood is
a failed connection, not a memory leak); every wait has the RFC 5321 4.5.3.2
timeout through the injected reactor; after STARTTLS's 220 nothing else the
server sent in plain text is kept (response injection, CVE-2011-0411 class)
and only the EHLO reply received inside TLS counts; several recipients get one
transaction, pipelined when the server allows it, with a result per recipient.

Three layers:

* :class:`ReplyParser` turns bytes into :class:`Reply` objects.
* :class:`SMTPClientProtocol` sends command lines and hands out the replies
  in order, each with its timer; it streams the message body.
* :class:`SMTPSession` speaks the dialogue: greeting, EHLO/HELO, STARTTLS,
  AUTH, then one message after the other (:meth:`SMTPSession.send`).
"""

from __future__ import annotations

import base64
import collections
import re
from dataclasses import dataclass

from twisted.internet import defer, endpoints, error, protocol, threads
from twisted.internet.interfaces import IHandshakeListener, IPushProducer
from twisted.logger import Logger
from zope.interface import implementer

from mailbox_appliance.delivery.result import BOUNCED, DEFERRED, SENT, RecipientResult

MAX_REPLY_LINE = 2048           # octets of one reply line (RFC 5321 says 512)
MAX_REPLY_LINES = 100           # lines of one multi-line reply
MAX_REPLY_TEXT = 1000           # characters of a reply kept for logs and DSNs
MAX_RCPT_PER_TRANSACTION = 100  # RFC 5321 4.5.3.1.8: every server takes 100
CHUNK = 64 * 1024               # octets of the message read at once

_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})(?=\s|$)")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")
_XTEXT_SAFE = re.compile(r"^[\x21-\x7e]{1,100}$")


def clean_text(text: str, limit: int = MAX_REPLY_TEXT) -> str:
    """One line of printable text: CR, LF, NUL and other controls become spaces."""
    text = " ".join(_CONTROL.sub(" ", text).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


@dataclass(frozen=True)
class Reply:
    """One SMTP reply: the code and the text of each line."""

    code: int
    lines: tuple

    @property
    def text(self) -> str:
        """``"550 5.1.1 <x@y>: User unknown"``: code once, the lines joined by a space."""
        return clean_text(f"{self.code} " + " ".join(self.lines))

    @property
    def enhanced(self) -> str:
        """The RFC 3463 status of the first line, or x.0.0 from the code."""
        m = _ENHANCED.match(self.lines[0] if self.lines else "")
        first = str(self.code)[0]
        if m and m.group(1) == first:
            return f"{m.group(1)}.{int(m.group(2))}.{int(m.group(3))}"
        return f"{first}.0.0" if first in "245" else "4.0.0"

    @property
    def positive(self) -> bool:
        return 200 <= self.code < 300

    @property
    def transient(self) -> bool:
        return 400 <= self.code < 500

    @property
    def permanent(self) -> bool:
        return 500 <= self.code < 600


class ReplyError(Exception):
    """The server's replies broke the protocol or its limits."""


class ReplyParser:
    """Splits the server's bytes into replies, with every buffer bounded."""

    def __init__(self, max_line=MAX_REPLY_LINE, max_lines=MAX_REPLY_LINES):
        self.max_line = max_line
        self.max_lines = max_lines
        self._buffer = b""
        self._lines = []
        self._code = None

    def feed(self, data: bytes):
        """Yield each complete Reply in ``data``; raises ReplyError on a violation."""
        self._buffer += data
        while True:
            end = self._buffer.find(b"\n")
            if end < 0:
                if len(self._buffer) > self.max_line:
                    raise ReplyError(f"reply line longer than {self.max_line} octets")
                return
            line, self._buffer = self._buffer[:end], self._buffer[end + 1:]
            if len(line) > self.max_line:
                raise ReplyError(f"reply line longer than {self.max_line} octets")
            reply = self._line(line.rstrip(b"\r"))
            if reply is not None:
                yield reply

    def discard(self) -> int:
        """Forget every octet not yet parsed; returns how many there were."""
        n = len(self._buffer)
        self._buffer = b""
        return n

    def _line(self, line: bytes):
        code_text = line[:3]
        sep = line[3:4]
        if not (len(code_text) == 3 and code_text.isdigit() and code_text[:1] in b"12345"
                and sep in (b"", b" ", b"-")):
            raise ReplyError("malformed reply line " + repr(clean_text(
                line[:80].decode("utf-8", "replace"))))
        code = int(code_text)
        if self._code is not None and code != self._code:
            raise ReplyError("reply lines with different codes")
        self._code = code
        self._lines.append(line[4:].decode("utf-8", "replace"))
        if len(self._lines) > self.max_lines:
            raise ReplyError(f"reply of more than {self.max_lines} lines")
        if sep == b"-":
            return None
        reply = Reply(code, tuple(self._lines))
        self._lines, self._code = [], None
        return reply


class ReplyTimeout(Exception):
    """The server did not answer in time."""


class ConnectionBroken(Exception):
    """The connection ended or was cut while something was still expected."""


@dataclass
class _Pending:
    deferred: defer.Deferred
    timeout: float
    what: str
    tls: object = None          # a connection creator: start TLS on a 220


@implementer(IHandshakeListener, IPushProducer)
class SMTPClientProtocol(protocol.Protocol):
    """Sends command lines and gives each expected reply to its Deferred, in order.

    One timer runs for the oldest expected reply; it starts again, with the
    next reply's timeout, each time a reply arrives, so pipelined commands
    each get their full time. Any violation (a reply nobody waits for, too
    long, too many lines, a timeout) cuts the connection and fails every
    waiting Deferred.
    """

    def __init__(self, reactor, greeting_timeout=300):
        self.reactor = reactor
        self.greeting_timeout = greeting_timeout
        self.greeting = None            # the Deferred of the 220, from connectionMade
        self.parser = ReplyParser()
        self._pending = collections.deque()
        self._timer = None
        self._handshake = None
        self._handshake_timer = None
        self._resume = None
        self.paused = False
        self.broken = None              # why the connection is unusable, or None
        self.closing = False            # QUIT sent
        self.tls = False
        self.discarded_after_starttls = 0
        self.on_lost = []               # callables run once, when the connection ends
        self.closed = defer.Deferred()  # fires when the connection has ended

    def connectionMade(self):
        # Expected from the first moment: a greeting that arrives before
        # anyone asked for it is still the greeting.
        self.greeting = self.expect(self.greeting_timeout, "greeting")

    # -- sending --------------------------------------------------------

    def expect(self, timeout, what="reply", tls=None) -> defer.Deferred:
        """A Deferred for the next reply not yet claimed."""
        d = defer.Deferred()
        if self.broken is not None:
            d.errback(ConnectionBroken(self.broken))
            return d
        self._pending.append(_Pending(d, timeout, what, tls))
        if len(self._pending) == 1:
            self._start_timer()
        return d

    def command(self, line: str, timeout, what=None) -> defer.Deferred:
        """Send one command line and a Deferred for its reply."""
        d = self.expect(timeout, what or line.split(" ", 1)[0].upper())
        if self.broken is None:
            self.transport.write(line.encode("utf-8") + b"\r\n")
        return d

    def pipeline(self, lines, timeout) -> list:
        """Send several commands in one write; a Deferred for each reply."""
        ds = [self.expect(timeout, line.split(" ", 1)[0].upper()) for line in lines]
        if self.broken is None:
            self.transport.write(b"".join(l.encode("utf-8") + b"\r\n" for l in lines))
        return ds

    def starttls(self, creator, timeout) -> defer.Deferred:
        """Send STARTTLS; on a 220 start TLS at once and fire after the handshake.

        Fires with the reply (a refusal fires at once, TLS not started). The
        handshake is started from inside the receive loop, before any other
        octet is read, and whatever else arrived with the 220 is dropped: a
        man in the middle cannot have plain text taken as a reply inside TLS.
        """
        d = self.expect(timeout, "STARTTLS", tls=creator)
        if self.broken is None:
            self.transport.write(b"STARTTLS\r\n")
        return d

    def write(self, data: bytes):
        if self.broken is None:
            self.transport.write(data)

    def abort(self, why: str):
        """Cut the connection now (no QUIT)."""
        self._fail(why)
        if self.transport is not None:
            self.transport.abortConnection()

    # -- receiving --------------------------------------------------------

    def dataReceived(self, data):
        if self.broken is not None:
            return
        try:
            for reply in self.parser.feed(data):
                if not self._pending:
                    raise ReplyError("reply nobody asked for: " + reply.text[:80])
                pending = self._pending.popleft()
                self._stop_timer()
                if self._pending:
                    self._start_timer()
                if pending.tls is not None and reply.code == 220:
                    self._begin_tls(pending, reply)
                    return
                if pending.tls is not None:
                    # A refused STARTTLS: anything after it was not asked for.
                    self.discarded_after_starttls += self.parser.discard()
                pending.deferred.callback(reply)
                if self.broken is not None:
                    return
        except ReplyError as e:
            self.abort(str(e))

    def _begin_tls(self, pending, reply):
        self.discarded_after_starttls += self.parser.discard()
        self.parser = ReplyParser()
        self._handshake = (pending.deferred, reply)
        self._handshake_timer = self.reactor.callLater(pending.timeout, self._tls_timeout)
        self.tls = True
        self.transport.startTLS(pending.tls)

    def handshakeCompleted(self):
        if self._handshake is None:
            return              # a renegotiation: nothing waits for it
        d, reply = self._handshake
        self._handshake = None
        if self._handshake_timer is not None and self._handshake_timer.active():
            self._handshake_timer.cancel()
        self._handshake_timer = None
        d.callback(reply)

    def _tls_timeout(self):
        self._handshake_timer = None
        self.abort("timed out in the TLS handshake")

    def connectionLost(self, reason=None):
        why = "connection closed"
        if reason is not None and not reason.check(error.ConnectionDone):
            why = f"connection lost ({_describe(reason.value)})"
        self._fail(why)
        if self._resume is not None:
            d, self._resume = self._resume, None
            d.errback(ConnectionBroken(self.broken))
        for f in self.on_lost:
            f(self)
        self.on_lost = []
        if not self.closed.called:
            self.closed.callback(None)

    def _fail(self, why):
        if self.broken is None:
            self.broken = why
        self._stop_timer()
        if self._handshake_timer is not None and self._handshake_timer.active():
            self._handshake_timer.cancel()
        self._handshake_timer = None
        waiting = [p.deferred for p in self._pending]
        self._pending.clear()
        if self._handshake is not None:
            waiting.insert(0, self._handshake[0])
            self._handshake = None
        for d in waiting:
            d.errback(ConnectionBroken(self.broken))

    # -- timers -----------------------------------------------------------

    def _start_timer(self):
        head = self._pending[0]
        self._timer = self.reactor.callLater(head.timeout, self._timed_out, head)

    def _stop_timer(self):
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _timed_out(self, head):
        self._timer = None
        timeout = head.timeout
        self.broken = self.broken or f"timed out after {timeout:g}s waiting for the " \
                                     f"{head.what} reply"
        d = head.deferred
        self._pending.popleft()
        d.errback(ReplyTimeout(self.broken))
        self.abort(self.broken)

    # -- flow control while streaming the message (IPushProducer) ---------

    def pauseProducing(self):
        self.paused = True

    def resumeProducing(self):
        self.paused = False
        if self._resume is not None:
            d, self._resume = self._resume, None
            d.callback(None)

    def stopProducing(self):
        self.abort("the connection stopped the message stream")

    def wait_writable(self, timeout) -> defer.Deferred:
        """Fires once the transport takes data again; fails after ``timeout``."""
        if not self.paused or self.broken is not None:
            return defer.succeed(None)
        d = defer.Deferred()
        self._resume = d

        def stalled():
            if self._resume is d:
                self.abort(f"timed out after {timeout:g}s sending the message")
        timer = self.reactor.callLater(timeout, stalled)

        def stop(result):
            if timer.active():
                timer.cancel()
            return result
        return d.addBoth(stop)


def _describe(exc) -> str:
    text = str(exc) or type(exc).__name__
    return clean_text(text, 200)


# -- the message body -------------------------------------------------------

class DotStuffer:
    """Turns message octets into the DATA stream (RFC 5321 4.5.2).

    Lines are normalised to CRLF (a stray CR or LF becomes a line end, so no
    "<LF>.<LF>" ever leaves here for a receiver to misread, security A6) and a
    line starting with "." gets another one. A chunk ending in CR waits for
    the next, so a CRLF split between chunks stays one line end.
    """

    _LINE_ENDS = re.compile(rb"\r\n|\r|\n")

    def __init__(self):
        self._at_line_start = True
        self._held = b""

    def feed(self, chunk: bytes) -> bytes:
        data = self._held + chunk
        self._held = b""
        if data.endswith(b"\r"):
            data, self._held = data[:-1], b"\r"
        if not data:
            return b""
        crlf = data.count(b"\r\n")
        if data.count(b"\r") != crlf or data.count(b"\n") != crlf:
            # Counting is far cheaper than the substitution, and queued mail
            # has CRLF line ends already: only a stray CR or LF needs it.
            data = self._LINE_ENDS.sub(b"\r\n", data)
        out = data.replace(b"\r\n.", b"\r\n..")
        if self._at_line_start and out.startswith(b"."):
            out = b"." + out
        self._at_line_start = out.endswith(b"\r\n")
        return out

    def finish(self) -> bytes:
        """The rest, a final line end if the message lacked one, and the dot."""
        tail = b""
        if self._held:
            tail = b"\r\n"
            self._held = b""
            self._at_line_start = True
        if not self._at_line_start:
            tail += b"\r\n"
        return tail + b".\r\n"


class BodyReader:
    """The octets of a queued message, in chunks; the file is read in a thread."""

    def __init__(self, reactor, message, chunk=CHUNK):
        self.reactor = reactor
        self.data = message.data
        self.path = message.path
        self.offset = message.body_offset
        self.chunk = chunk
        self._pos = 0
        self._file = None

    def _in_thread(self, f, *args):
        return threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(), f, *args)

    @defer.inlineCallbacks
    def read(self):
        """The next chunk; b"" at the end."""
        if self.data is not None:
            chunk = self.data[self._pos:self._pos + self.chunk]
            self._pos += len(chunk)
            return chunk
        if self._file is None:
            self._file = yield self._in_thread(self._open)
        chunk = yield self._in_thread(self._file.read, self.chunk)
        return chunk

    def _open(self):
        f = open(self.path, "rb")
        try:
            f.seek(self.offset)
        except OSError:
            f.close()
            raise
        return f

    def close(self):
        if self._file is not None:
            f, self._file = self._file, None
            return self._in_thread(f.close)
        return defer.succeed(None)


# -- the dialogue -----------------------------------------------------------

@dataclass(frozen=True)
class ClientSettings:
    """What the session needs from the configuration."""

    helo_name: str
    connect_timeout: float = 30
    command_timeout: float = 300
    data_timeout: float = 600


class SessionError(Exception):
    """A host could not take mail before any transaction began.

    ``unreachable``: the host never completed its greeting (refused, timed
    out, 4xx/5xx banner); when all hosts of a destination are like that it is
    remembered as dead for a while. ``tls_failed``: the TLS handshake failed
    (an opportunistic destination may then be tried once in plain text).
    """

    def __init__(self, enhanced, reply, from_remote=False, unreachable=False, tls_failed=False,
                 remote_mta=""):
        super().__init__(reply)
        self.enhanced = enhanced
        self.reply = clean_text(reply)
        self.from_remote = from_remote
        self.remote_mta = remote_mta
        self.unreachable = unreachable
        self.tls_failed = tls_failed


class StaleSession(Exception):
    """A reused connection died before the first reply of a new transaction."""


class _Lost(Exception):
    """Internal: the connection broke inside a transaction."""

    before_mail_reply = False   # nothing of this transaction was answered
    finished = frozenset()      # recipient indexes already given a result


@dataclass
class SendOutcome:
    """What :meth:`SMTPSession.send` did: a result per recipient index, and
    which deferred ones another host may take now (those not answered after
    the final dot: a lost 250 there may mean the message went through)."""

    results: dict
    retry: set


TLS_NONE, TLS_MAY, TLS_ENCRYPT, TLS_VERIFY = "none", "may", "encrypt", "verify"


class SMTPSession:
    """One SMTP connection to one host, from greeting to QUIT."""

    log = Logger()

    def __init__(self, reactor, proto, settings: ClientSettings, host: str, address: str,
                 port: int):
        self.reactor = reactor
        self.proto = proto
        self.settings = settings
        self.host = host                    # the name (MX host) for logs, DSNs, TLS checks
        self.address = address
        self.port = port
        self.extensions = {}
        self.esmtp = False
        self.verified = False
        self.messages = 0                   # transactions tried on this connection
        self.transactions_ok = True         # False once the state is unknown

    @property
    def label(self) -> str:
        return f"{self.host}[{self.address}]:{self.port}"

    @property
    def usable(self) -> bool:
        return self.proto.broken is None and not self.proto.closing and self.transactions_ok

    def _error(self, enhanced, text, **kw):
        """A SessionError from this host, after it greeted us."""
        return SessionError(enhanced, text, remote_mta=self.host, **kw)

    # -- opening ------------------------------------------------------------

    @defer.inlineCallbacks
    def open(self, tls_level=TLS_MAY, tls_creator=None, auth=None):
        """Greeting, EHLO, STARTTLS and AUTH as ``tls_level`` and ``auth`` ask.

        ``tls_creator(verify)`` gives the connection creator for STARTTLS;
        ``auth`` is (user, password) or None. Raises SessionError.
        """
        try:
            greeting = yield self.proto.greeting
        except (ReplyTimeout, ConnectionBroken) as e:
            raise SessionError("4.4.2", f"4.4.2 {self.label}: {e} before the greeting",
                               unreachable=True)
        if greeting.code != 220:
            self.quit()
            # Even a 5xx banner only says "not this host": try the next one.
            raise self._error(self._soft(greeting), greeting.text, from_remote=True,
                              unreachable=True)
        yield self._ehlo()
        if tls_level != TLS_NONE and "STARTTLS" in self.extensions:
            yield self._starttls(tls_level, tls_creator)
        elif tls_level in (TLS_ENCRYPT, TLS_VERIFY):
            self.quit()
            raise self._error("4.7.4", f"4.7.4 TLS is required, but was not offered by host "
                                       f"{self.label}")
        if auth is not None:
            yield self._auth(*auth)

    @defer.inlineCallbacks
    def _ehlo(self):
        name = self.settings.helo_name
        reply = yield self._command(f"EHLO {name}", "EHLO")
        if reply.positive:
            self.esmtp = True
            self.extensions = _extensions(reply)
            return
        if reply.permanent and not self.proto.tls:
            # An old server without ESMTP: HELO, no extensions.
            reply = yield self._command(f"HELO {name}", "HELO")
            if reply.positive:
                self.esmtp = False
                self.extensions = {}
                return
        self.quit()
        raise self._error(self._soft(reply), reply.text, from_remote=True)

    @defer.inlineCallbacks
    def _starttls(self, tls_level, tls_creator):
        verify = tls_level == TLS_VERIFY
        creator = tls_creator(verify)
        try:
            reply = yield self.proto.starttls(creator, self.settings.command_timeout)
        except (ReplyTimeout, ConnectionBroken) as e:
            raise self._error("4.7.5", f"4.7.5 TLS with {self.label} failed: {e}",
                              tls_failed=True)
        if self.proto.discarded_after_starttls:
            self.log.warn("{label}: dropped {n} octets sent in plain text with the STARTTLS "
                          "reply", label=self.label, n=self.proto.discarded_after_starttls)
        if reply.code != 220:
            if tls_level in (TLS_ENCRYPT, TLS_VERIFY):
                self.quit()
                raise self._error("4.7.4", f"4.7.4 TLS is required, but host {self.host} "
                                           f"refused to start TLS: {reply.text}")
            self.log.info("{label}: STARTTLS refused ({reply}), continuing in plain text",
                          label=self.label, reply=reply.text)
            return
        self.verified = verify
        self.log.info("{label}: TLS started ({how})", label=self.label,
                      how="verified" if verify else "unverified")
        # RFC 3207 4.2: forget all the server said before TLS; ask again.
        self.extensions = {}
        reply = yield self._command(f"EHLO {self.settings.helo_name}", "EHLO")
        if not reply.positive:
            self.quit()
            raise self._error(self._soft(reply), reply.text, from_remote=True)
        self.extensions = _extensions(reply)

    @defer.inlineCallbacks
    def _auth(self, user, password):
        if not self.proto.tls:
            # Never send credentials in plain text, whatever the policy says.
            self.quit()
            raise self._error("4.7.0", f"4.7.0 not sending credentials to {self.label} "
                                       f"without TLS")
        if "PLAIN" not in self.extensions.get("AUTH", "").upper().split():
            self.quit()
            raise self._error("4.7.0", f"4.7.0 host {self.label} does not offer AUTH PLAIN")
        token = base64.b64encode(b"\0" + user.encode("utf-8") + b"\0" +
                                 password.encode("utf-8")).decode("ascii")
        reply = yield self._command(f"AUTH PLAIN {token}", "AUTH")
        if reply.code != 235:
            self.quit()
            # A refused login is our configuration's problem: defer, never bounce.
            raise self._error("4.7.0", reply.text, from_remote=True)

    @defer.inlineCallbacks
    def _command(self, line, what):
        try:
            reply = yield self.proto.command(line, self.settings.command_timeout, what)
        except (ReplyTimeout, ConnectionBroken) as e:
            raise self._error("4.4.2", f"4.4.2 {self.label}: {e}")
        return reply

    @staticmethod
    def _soft(reply):
        # Before any transaction a 5xx still only means "not this host".
        return reply.enhanced if reply.transient else "4" + reply.enhanced[1:]

    # -- sending messages ---------------------------------------------------

    @defer.inlineCallbacks
    def send(self, message, recipients):
        """Send ``message`` to ``recipients`` (RemoteRecipient); fires with SendOutcome.

        Raises StaleSession when the connection was found dead before the
        first MAIL got a reply (a reused connection the server had closed).
        """
        results, retry = {}, set()
        todo = []
        env = message.envelope
        utf8 = not _ascii(env.sender) or any(not _ascii(r.address) for r in recipients)
        for r in recipients:
            if not _safe_address(r.address):
                results[r.idx] = self._own(BOUNCED, "5.1.3", "5.1.3 bad recipient address "
                                                             "syntax")
            elif utf8 and "SMTPUTF8" not in self.extensions and not _ascii(r.address):
                results[r.idx] = self._own(BOUNCED, "5.6.7", f"5.6.7 SMTPUTF8 is required, "
                                                             f"but was not offered by host "
                                                             f"{self.host}")
            else:
                todo.append(r)
        refusal = self._message_refusal(message, utf8)
        if refusal is not None:
            for r in todo:
                results[r.idx] = refusal
            return SendOutcome(results, retry)
        first = True
        while todo:
            batch, todo = todo[:MAX_RCPT_PER_TRANSACTION], todo[MAX_RCPT_PER_TRANSACTION:]
            try:
                carry = yield self._transaction(message, batch, results, retry, utf8)
            except _Lost as e:
                if first and e.before_mail_reply:
                    raise StaleSession(str(e))
                reason = self._own(DEFERRED, "4.4.2", f"4.4.2 lost connection with {self.label} "
                                                      f"({e})")
                for r in batch + todo:
                    if r.idx not in e.finished:
                        results[r.idx] = reason
                        retry.add(r.idx)
                return SendOutcome(results, retry)
            first = False
            todo = carry + todo
        return SendOutcome(results, retry)

    def _message_refusal(self, message, utf8):
        env = message.envelope
        if not _safe_address(env.sender):
            return self._own(BOUNCED, "5.1.7", "5.1.7 bad sender address syntax")
        if utf8 and not _ascii(env.sender) and "SMTPUTF8" not in self.extensions:
            return self._own(BOUNCED, "5.6.7", f"5.6.7 SMTPUTF8 is required, but was not "
                                               f"offered by host {self.host}")
        limit = _size_limit(self.extensions)
        if limit and message.size > limit:
            return self._own(BOUNCED, "5.3.4", f"5.3.4 message size {message.size} exceeds "
                                               f"size limit {limit} of server {self.host}")
        return None

    def _mail_line(self, message, utf8):
        env = message.envelope
        line = f"MAIL FROM:<{env.sender}>"
        if "SIZE" in self.extensions:
            line += f" SIZE={message.size}"
        if "DSN" in self.extensions:
            if env.ret.upper() in ("FULL", "HDRS"):
                line += f" RET={env.ret.upper()}"
            if env.envid and _XTEXT_SAFE.match(env.envid):
                line += f" ENVID={env.envid}"
        if getattr(env, "eight_bit", False) and "8BITMIME" in self.extensions:
            # RFC 6152: declared by our client, passed on. A next hop without
            # 8BITMIME gets the bytes as they are, as Postfix sends them.
            line += " BODY=8BITMIME"
        if utf8 and "SMTPUTF8" in self.extensions:
            line += " SMTPUTF8"
        return line

    def _rcpt_line(self, r):
        line = f"RCPT TO:<{r.address}>"
        if "DSN" in self.extensions:
            if r.notify and _XTEXT_SAFE.match(r.notify):
                line += f" NOTIFY={r.notify}"
            if r.orcpt and _XTEXT_SAFE.match(r.orcpt):
                line += f" ORCPT={r.orcpt}"
        return line

    @defer.inlineCallbacks
    def _transaction(self, message, batch, results, retry, utf8):
        """One MAIL/RCPT/DATA for ``batch``; fills results; returns the recipients
        to carry into another transaction (after a 452 "too many recipients")."""
        self.messages += 1
        timeout = self.settings.command_timeout
        mail_line = self._mail_line(message, utf8)
        rcpt_lines = [self._rcpt_line(r) for r in batch]
        finished = set()
        got_mail_reply = False
        ds = []
        try:
            if "PIPELINING" in self.extensions:
                # RFC 2920: MAIL, every RCPT and DATA in one write; DATA is
                # the last command of the group.
                ds = self.proto.pipeline([mail_line] + rcpt_lines + ["DATA"], timeout)
                mail_reply = yield ds[0]
                got_mail_reply = True
                rcpt_replies = []
                for d in ds[1:-1]:
                    rcpt_replies.append((yield d))
                data_d = ds[-1]
            else:
                mail_reply = yield self.proto.command(mail_line, timeout, "MAIL")
                got_mail_reply = True
                rcpt_replies, data_d = [], None
                if mail_reply.positive:
                    for line in rcpt_lines:
                        reply = yield self.proto.command(line, timeout, "RCPT")
                        rcpt_replies.append(reply)
                        if _too_many(reply):
                            break
            accepted, carry = [], []
            if not mail_reply.positive:
                for r in batch:
                    results[r.idx] = self._remote(mail_reply)
                    finished.add(r.idx)
                    if mail_reply.transient:
                        retry.add(r.idx)
            else:
                split = False
                for r, reply in zip(batch, rcpt_replies):
                    if _too_many(reply) and (accepted or split):
                        split = True
                    if split and _too_many(reply):
                        carry.append(r)
                    elif reply.positive:
                        accepted.append(r)
                    else:
                        results[r.idx] = self._remote(reply)
                        finished.add(r.idx)
                        if not reply.permanent:
                            retry.add(r.idx)
                # Recipients whose RCPT was never sent (after a 452 without pipelining).
                carry += batch[len(rcpt_replies):]
                if not accepted:
                    # Nobody to send to: the rest are not "too many" any more.
                    for r in carry:
                        results[r.idx] = self._own(DEFERRED, "4.5.3", "4.5.3 too many "
                                                                      "recipients")
                        retry.add(r.idx)
                    carry = []
            if data_d is None and accepted:
                data_d = self.proto.command("DATA", timeout, "DATA")
            if data_d is None:
                yield self._reset()
                return carry
            data_reply = yield data_d
            if data_reply.code != 354:
                if accepted:
                    for r in accepted:
                        results[r.idx] = self._remote(data_reply)
                        finished.add(r.idx)
                        if not data_reply.permanent:
                            retry.add(r.idx)
                yield self._reset()
                return carry
            if not accepted:
                # RFC 2920 3.1: DATA taken although no RCPT was: end it empty.
                self.proto.write(b".\r\n")
                yield self.proto.expect(self.settings.data_timeout, "end of data")
                yield self._reset()
                return carry
            eod_d, = yield self._stream(message)
            try:
                eod = yield eod_d
            except (ReplyTimeout, ConnectionBroken) as e:
                # RFC 1047: the message may well have been taken; deferring
                # risks a duplicate, never a loss. Not retried elsewhere now.
                for r in accepted:
                    results[r.idx] = self._own(DEFERRED, "4.4.2", f"4.4.2 {self.label}: {e} "
                                                                  f"after end of data")
                    finished.add(r.idx)
                self.transactions_ok = False
                return carry
            for r in accepted:
                results[r.idx] = self._remote(eod, r)
                finished.add(r.idx)
                if not (eod.positive or eod.permanent):
                    retry.add(r.idx)
            return carry
        except (ReplyTimeout, ConnectionBroken) as e:
            self.transactions_ok = False
            for d in ds:
                d.addErrback(lambda _: None)    # replies that will never come
            lost = _Lost(str(e))
            lost.before_mail_reply = not got_mail_reply
            lost.finished = finished
            raise lost

    @defer.inlineCallbacks
    def _stream(self, message):
        """Send the body and the final dot; fires with (the Deferred of the
        end-of-data reply,)."""
        reader = BodyReader(self.reactor, message)
        stuffer = DotStuffer()
        self.proto.transport.registerProducer(self.proto, True)
        try:
            while True:
                try:
                    chunk = yield reader.read()
                except OSError as e:
                    # The file went away (deleted from the queue meanwhile):
                    # cut the connection so the dot is never sent.
                    self.proto.abort(f"cannot read the message ({e.strerror})")
                    raise ConnectionBroken(self.proto.broken)
                if self.proto.broken is not None:
                    raise ConnectionBroken(self.proto.broken)
                if not chunk:
                    break
                self.proto.write(stuffer.feed(chunk))
                yield self.proto.wait_writable(self.settings.command_timeout)
            # Expected before the dot goes: the reply can arrive while the
            # file is still being closed, and would be a reply nobody asked for.
            eod = self.proto.expect(self.settings.data_timeout, "end of data")
            self.proto.write(stuffer.finish())
        finally:
            if self.proto.transport is not None:
                self.proto.transport.unregisterProducer()
            yield reader.close()
        # In a tuple: returned bare, the Deferred would be waited for here.
        return (eod,)

    @defer.inlineCallbacks
    def _reset(self):
        """RSET after a transaction that did not end with the data."""
        try:
            reply = yield self.proto.command("RSET", self.settings.command_timeout, "RSET")
        except (ReplyTimeout, ConnectionBroken):
            self.transactions_ok = False
            return
        if not reply.positive:
            self.transactions_ok = False

    def quit(self):
        """Say QUIT and close once answered (or after a short wait); never fails."""
        if self.proto.broken is not None or self.proto.closing:
            return self.proto.closed
        d = self.proto.command("QUIT", min(self.settings.command_timeout, 30), "QUIT")
        self.proto.closing = True

        def close(_):
            if self.proto.transport is not None:
                self.proto.transport.loseConnection()
        d.addBoth(close)
        return self.proto.closed

    def abort(self, why="aborted"):
        self.proto.abort(why)
        return self.proto.closed

    # -- results --------------------------------------------------------------

    def _remote(self, reply, recipient=None):
        if reply.positive:
            # RFC 3461 5.2.2: a DSN-capable hop given NOTIFY= owes the
            # sender any further notice; without DSN we say "relayed".
            passed_on = bool(recipient is not None and recipient.notify
                             and "DSN" in self.extensions)
            return RecipientResult(SENT, reply.enhanced, reply.text, self.host, True, passed_on)
        if reply.permanent:
            return RecipientResult(BOUNCED, reply.enhanced, reply.text, self.host, True)
        enhanced = reply.enhanced if reply.transient else "4.0.0"
        return RecipientResult(DEFERRED, enhanced, reply.text, self.host, True)

    def _own(self, status, enhanced, text):
        return RecipientResult(status, enhanced, clean_text(text), self.host, False)


@defer.inlineCallbacks
def connect(reactor, settings: ClientSettings, host: str, address: str, port: int):
    """Open a TCP connection to ``address``:``port``; fires with an SMTPSession.

    Raises SessionError (unreachable) when the connection cannot be made
    within ``settings.connect_timeout``. The greeting is read by
    :meth:`SMTPSession.open`.
    """
    cls = endpoints.TCP6ClientEndpoint if ":" in address else endpoints.TCP4ClientEndpoint
    # The endpoint's own timer is only a backstop: ours runs on the injected
    # reactor, so tests drive it with a Clock.
    endpoint = cls(reactor, address, port, timeout=settings.connect_timeout + 30)
    factory = protocol.Factory.forProtocol(
        lambda: SMTPClientProtocol(reactor, settings.command_timeout))
    # Not two "Starting/Stopping factory" log lines around every connection.
    factory.noisy = False
    d = endpoint.connect(factory)
    timed_out = []

    def give_up():
        timed_out.append(True)
        d.cancel()
    timer = reactor.callLater(settings.connect_timeout, give_up)
    label = f"{host}[{address}]:{port}"
    try:
        proto = yield d
    except Exception as e:
        if timed_out:
            raise SessionError("4.4.1", f"4.4.1 connect to {label}: timed out after "
                                        f"{settings.connect_timeout:g}s", unreachable=True)
        raise SessionError("4.4.1", f"4.4.1 connect to {label}: {_connect_error(e)}",
                           unreachable=True)
    finally:
        if timer.active():
            timer.cancel()
    return SMTPSession(reactor, proto, settings, host, address, port)


def _connect_error(exc) -> str:
    if isinstance(exc, error.ConnectionRefusedError):
        return "Connection refused"
    if isinstance(exc, (error.TimeoutError, error.TCPTimedOutError)):
        return "Connection timed out"
    if isinstance(exc, error.NoRouteError):
        return "No route to host"
    return _describe(exc)


def _extensions(reply) -> dict:
    """EHLO keywords (upper case) and their parameters, from the lines after the first."""
    ext = {}
    for line in reply.lines[1:]:
        words = line.strip().split(None, 1)
        if words:
            ext[words[0].upper()] = words[1] if len(words) > 1 else ""
    return ext


def _size_limit(extensions):
    value = extensions.get("SIZE", "").strip()
    return int(value) if value.isdigit() else 0


def _too_many(reply) -> bool:
    """452 "too many recipients" (RFC 5321 4.5.3.1.10), not "mailbox full"."""
    if reply.code != 452:
        return False
    text = " ".join(reply.lines).lower()
    return reply.enhanced in ("4.5.3", "4.0.0") or "too many" in text


def _ascii(text: str) -> bool:
    return text.isascii()


def _safe_address(address: str) -> bool:
    # The envelope was checked on the way in; this only makes sure nothing
    # can end a command line early or add one (a queue file edited by hand).
    return len(address) <= 512 and not any(c in address for c in "\r\n\0<> ") and \
        not _CONTROL.search(address)
