"""The ESMTP receiver (RFC 5321) of the MX port, and the base of the other SMTP listeners.

Written on a bare ``Protocol`` rather than ``twisted.mail.smtp.ESMTP`` because
the receiver must own its framing: CRLF-only line ends with bare CR/LF refused
(SMTP smuggling), the 512/1000-octet limits, plaintext dropped after STARTTLS,
pipelined commands answered strictly in order while directory lookups run, and
message bodies handled a chunk of many lines at a time instead of one Python
call per line. Decisions are left to the policy chain; storage to the spool.

The MX uses it as it is; submission (``smtp.submission``) and LMTP
(``smtp.lmtp``) subclass it through a few hooks: ``_line_limit`` (AUTH lines
are longer), ``_continuation`` (the next line belongs to a command, as in a
SASL exchange), ``_message_filter`` (fix-ups while the message arrives),
``_received_comment`` and ``_answer_transaction``/``_accepted``. DSN
parameters (RFC 3461) are taken on every listener and kept in the envelope;
ETRN (RFC 1985) only on the MX, for relay_networks clients.
"""

from __future__ import annotations

import re
from email.utils import formatdate

from twisted.internet import defer, tcp
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger

from mailbox_appliance.maillog import mail_event
from mailbox_appliance.netaddr import networks_predicate
from mailbox_appliance.queue.spool import Envelope
from mailbox_appliance.smtp import address
from mailbox_appliance.smtp.fixup import HeaderBlockTooLarge
from mailbox_appliance.smtp.policy import Verdict, then
from mailbox_appliance.smtp.session import SessionState

MAX_COMMAND_LINE = 512          # octets including CRLF (RFC 5321 4.5.3.1.4)
# Extensions lengthen MAIL and RCPT (RFC 5321 4.5.3.1.4): RFC 3461 4 by 110
# (ENVID, RET) and 500 (NOTIFY, ORCPT), RFC 4954 5 by 500 (AUTH=).
MAIL_PARAMS_EXTRA = 110 + 500
RCPT_PARAMS_EXTRA = 500
_TOO_LONG = (500, "5.5.2", "Error: line too long")
MAX_TEXT_LINE = 1000            # octets including CRLF (RFC 5321 4.5.3.1.6)
MAX_JUNK_LINE = 65536           # past this an unterminated command line ends the session
MAX_PENDING_INPUT = 65536       # stop reading while this much waits behind a slow command
MAX_JUNK_COMMANDS = 100
_HELO_NAME = re.compile(r"^[A-Za-z0-9._:\[\]-]{1,255}$")
_RECEIVED = re.compile(rb"(?im)^received:")
_FORBIDDEN = {"GET", "POST", "PUT", "HEAD", "CONNECT", "OPTIONS", "USER"}

CMD, DATA, CLOSING = range(3)


_last_date = (None, "")


def message_date(seconds) -> str:
    """RFC 5322 date-time of ``seconds`` in local time, as email.utils.formatdate.

    Every message gets one in its Received: field; formatting it is not
    free, and under load many messages arrive within the same second.
    """
    global _last_date
    whole = int(seconds)
    if _last_date[0] != whole:
        _last_date = (whole, formatdate(whole, localtime=True))
    return _last_date[1]


def _drop_all_but_cr(buf):
    """Throw away buffered octets of an overlong line, except a last CR that
    may be the first half of the CRLF ending it."""
    del buf[:len(buf) - (1 if buf.endswith(b"\r") else 0)]


class MessageView:
    """What the end-of-data policy checks may see of a received message.

    ``from_values`` holds the raw values of the ``From:`` fields when the
    listener collected them (submission), else None.
    """

    def __init__(self, incoming, received_count, size, from_values=None):
        self.incoming = incoming
        self.received_count = received_count
        self.size = size
        self.from_values = from_values

    @property
    def qid(self):
        return self.incoming.qid


class SMTPServerProtocol(Protocol):
    """One ESMTP session. See the module docstring for why it is hand-written."""

    log = Logger()
    protocol_name = "ESMTP"
    # ETRN (RFC 1985) belongs to the MX: it asks for the queue to be run.
    offers_etrn = True

    def __init__(self, factory):
        self.factory = factory
        self.reactor = factory.reactor
        self.session = SessionState(listener=factory.listener)
        self._buf = bytearray()
        self._mode = CMD
        self._busy = False
        self._paused = False
        self._discarding = 0            # length of an overlong line being skipped
        self._errors = 0
        self._junk = 0
        self._timer = None
        self._deadline = None
        self._tls_active = factory.implicit_tls
        self._incoming = None
        self._disk_paused = False
        # Set while a command waits for more lines of its own (the responses
        # of an AUTH exchange): the next line goes to it, not to _dispatch.
        self._continuation = None
        self._too_long = None
        self._filter = None

    # -- connection -------------------------------------------------------

    def connectionMade(self):
        t = self.transport
        # Only a plain TCP connection: a wrapper (implicit TLS) forwards unknown
        # attributes to the socket below it, which would bypass the encryption.
        self._direct_send = isinstance(t, tcp.Connection) and all(
            hasattr(t, a) for a in ("socket", "TLS", "dataBuffer", "_tempDataBuffer",
                                    "connected", "disconnecting"))
        peer = self.transport.getPeer()
        self.session.client_ip = getattr(peer, "host", "")
        self.session.client_port = getattr(peer, "port", 0)
        # The local address the client reached (HELO checks: "you are not me").
        self.session.server_ip = getattr(self.transport.getHost(), "host", "")
        self.session.trusted = self.factory.is_trusted(self.session.client_ip)
        self._reset_timer()
        self._deadline = self.reactor.callLater(self.factory.config.smtp.session_deadline,
                                                self._deadline_passed)
        self._busy = True
        r = then(self.factory.policy.run("connect", self.session, None), self._greet)
        if isinstance(r, defer.Deferred):
            r.addErrback(self._internal_error)

    def _greet(self, verdict):
        if self._mode == CLOSING:
            return          # the client left while a check was deciding
        if verdict is not None:
            self._reply_verdict(verdict)
            self._close()
            return
        if self._buf and self.session.listener == "smtp":
            # The client talked while the greeting was held (a greet pause or
            # a slow check): a bot that does not wait for answers. Not on the
            # submission ports, where some MUAs do talk first.
            self.log.warn("[{ip}] talked before the greeting", ip=self.session.client_ip)
            self._reply(554, "5.5.0", "Error: SMTP protocol synchronization", False)
            self._close()
            return
        self._reply(220, None, f"{self.factory.hostname} {self.protocol_name} mailbox_appliance")
        self._unbusy()

    def connectionLost(self, reason):
        self._mode = CLOSING
        # Checks that keep state per connection (counts, timers) let it go,
        # also when the connection was refused at connect.
        self.factory.policy.notify("disconnect", self.session, None)
        for t in (self._timer, self._deadline):
            if t is not None and t.active():
                t.cancel()
        if self._incoming is not None:
            self._incoming.abort()
            self._incoming = None

    def _close(self):
        self._mode = CLOSING
        self._buf.clear()
        self.transport.loseConnection()

    def _reset_timer(self):
        timeout = (self.factory.config.smtp.data_timeout if self._mode == DATA
                   else self.factory.config.smtp.command_timeout)
        if self._timer is not None and self._timer.active():
            self._timer.reset(timeout)
        else:
            self._timer = self.reactor.callLater(timeout, self._timed_out)

    def _timed_out(self):
        self._reply(421, "4.4.2", f"{self.factory.hostname} Error: timeout exceeded")
        self._close()

    def _deadline_passed(self):
        self._reply(421, "4.4.2", f"{self.factory.hostname} Error: session too long")
        self._close()

    # -- replies ----------------------------------------------------------

    def _reply(self, code, enhanced, text, count_error=True):
        if self._mode == CLOSING and code != 421 and code != 221:
            return
        if enhanced:
            text = f"{enhanced} {text}"
        self._send(f"{code} {text}\r\n".encode("ascii", "replace"))
        if count_error and code >= 400 and code != 421:
            self._errors += 1
            if self._errors >= self.factory.config.smtp.max_errors:
                self._send(b"421 4.7.0 Error: too many errors\r\n")
                self._close()

    def _reply_lines(self, code, lines):
        out = [f"{code}-{l}" for l in lines[:-1]] + [f"{code} {lines[-1]}"]
        self._send(("\r\n".join(out) + "\r\n").encode("ascii", "replace"))

    def _send(self, data):
        """Write a reply, straight to the socket when nothing is queued before it.

        A reply is one small write per command; through the transport's
        buffer each costs two epoll changes and a reactor turn, which showed
        as a large share of the receiver's time under load. When the
        transport has nothing pending (and no TLS layer), sending at once
        keeps the order and skips all that; anything the kernel does not take
        goes through the transport as usual.
        """
        t = self.transport
        if (self._direct_send and t.connected and not t.disconnecting and not t.TLS
                and not t.dataBuffer and not t._tempDataBuffer):
            try:
                sent = t.socket.send(data)
            except BlockingIOError:
                sent = 0
            except OSError:
                sent = 0        # the transport will notice and report the loss
            if sent == len(data):
                return
            data = data[sent:]
        t.write(data)

    def _reply_verdict(self, verdict: Verdict):
        self._reply(verdict.code, verdict.enhanced, verdict.text)
        if verdict.code == 421:
            # RFC 5321 3.8: 421 says the service is closing the channel.
            self._close()

    def _internal_error(self, failure):
        self.log.failure("internal error in SMTP session", failure)
        if self._mode != CLOSING:
            self._reply(421, "4.3.0", f"{self.factory.hostname} Error: internal error")
            self._close()

    # -- input ------------------------------------------------------------

    def dataReceived(self, data):
        if self._mode == CLOSING:
            return
        self._buf += data
        self._pump()

    def _pump(self):
        while self._mode != CLOSING and not self._busy:
            if self._mode == DATA:
                if not self._process_data():
                    break
            elif not self._process_command():
                break
        if self._mode == CLOSING:
            return
        if self._busy and len(self._buf) > MAX_PENDING_INPUT and not self._paused:
            self._paused = True
            self.transport.pauseProducing()

    def _unbusy(self):
        self._busy = False
        if self._paused:
            self._paused = False
            if not self._disk_paused:
                self.transport.resumeProducing()
        self._pump()

    def _line_limit(self, buf):
        """(octets allowed for the line starting ``buf``, CRLF included; reply if longer)."""
        verb = bytes(buf[:5]).upper()
        if verb == b"MAIL ":
            return MAX_COMMAND_LINE + MAIL_PARAMS_EXTRA, _TOO_LONG
        if verb == b"RCPT ":
            return MAX_COMMAND_LINE + RCPT_PARAMS_EXTRA, _TOO_LONG
        return MAX_COMMAND_LINE, _TOO_LONG

    def _process_command(self) -> bool:
        """Handle one command line from the buffer; False when more input is needed."""
        buf = self._buf
        i = buf.find(b"\r\n")
        if self._discarding:
            if i < 0:
                self._discarding += len(buf)
                _drop_all_but_cr(buf)
                if self._discarding > MAX_JUNK_LINE:
                    self._reply(421, "4.7.0", "Error: line too long, closing")
                    self._close()
                return False
            del buf[:i + 2]
            self._discarding = 0
            self._reply(*self._too_long)
            return True
        limit, self._too_long = self._line_limit(buf)
        if i < 0:
            if len(buf) >= limit:
                self._discarding = len(buf)
                self._continuation = None
                _drop_all_but_cr(buf)
            return False
        line = bytes(buf[:i])
        del buf[:i + 2]
        self._reset_timer()
        if i + 2 > limit:
            self._continuation = None
            self._reply(*self._too_long)
            return True
        if self._continuation is not None:
            handler, self._continuation = self._continuation, None
            self._await(handler(line))
            return True
        self._await(self._dispatch(line))
        return True

    def _await(self, d):
        """Hold further input until ``d`` (a command's answer) has fired."""
        if not isinstance(d, defer.Deferred):
            return
        d.addErrback(self._internal_error)
        if d.called and not d.paused:
            return          # answered at once: the caller's loop goes on
        self._busy = True
        d.addBoth(self._resume)

    def _resume(self, _):
        if self._mode != CLOSING:
            self._unbusy()

    def _dispatch(self, line: bytes):
        try:
            text = line.decode("ascii")
        except UnicodeDecodeError:
            text = None
        if text is None or "\r" in text or "\n" in text or "\x00" in text:
            # A raw CR, LF or NUL inside a command would end up in headers or logs.
            verb = line.split(b" ", 1)[0].upper()
            if verb in (b"MAIL", b"RCPT") and text is None:
                return self._reply(553, "5.6.7", "Error: non-ASCII address needs SMTPUTF8")
            return self._reply(501, "5.5.2", "Error: bad characters in command")
        verb, _, arg = text.partition(" ")
        verb = verb.upper()
        handler = getattr(self, "smtp_" + verb, None)
        if verb in _FORBIDDEN or verb.endswith(":"):
            self.log.warn("non-SMTP command from {ip}: {verb}", ip=self.session.client_ip,
                          verb=ascii(verb[:20]))
            self._reply(221, "2.7.0", "Error: I can break rules, too. Goodbye.", False)
            self._close()
            return None
        if handler is None:
            self._junk_command()
            return self._reply(502, "5.5.2", "Error: command not recognized")
        return handler(arg)

    def _junk_command(self):
        self._junk += 1
        if self._junk > MAX_JUNK_COMMANDS:
            self._reply(421, "4.7.0", "Error: too many junk commands")
            self._close()

    def _pipelined_input(self) -> bool:
        return bool(self._buf)

    # -- commands ---------------------------------------------------------

    def _ehlo_lines(self):
        f = self.factory
        lines = [f.hostname, "PIPELINING", f"SIZE {f.config.server.max_message_size}",
                 "8BITMIME", "ENHANCEDSTATUSCODES", "DSN"]
        if f.tls_context is not None and not self._tls_active:
            lines.append("STARTTLS")
        if self.offers_etrn and self.session.trusted:
            lines.append("ETRN")
        return lines

    def _helo(self, arg, esmtp):
        name = arg.strip()
        if not _HELO_NAME.match(name):
            return self._reply(501, "5.5.4", "Syntax: EHLO hostname")

        def answered(verdict):
            if verdict is not None:
                return self._reply_verdict(verdict)
            self.session.helo = name
            self.session.esmtp = esmtp
            self.session.reset_transaction()
            self._abort_incoming()
            if esmtp:
                self._reply_lines(250, self._ehlo_lines())
            else:
                # HELO clients did not ask for PIPELINING: talking ahead is a bot.
                if self._pipelined_input():
                    return self._sync_error()
                self._reply(250, None, self.factory.hostname)
        return then(self.factory.policy.run("helo", self.session, name), answered)

    def smtp_HELO(self, arg):
        return self._helo(arg, False)

    def smtp_EHLO(self, arg):
        return self._helo(arg, True)

    def _sync_error(self):
        self.log.warn("improper command pipelining from {ip}", ip=self.session.client_ip)
        self._reply(554, "5.5.0", "Error: SMTP protocol synchronization", False)
        self._close()

    def smtp_STARTTLS(self, arg):
        if arg:
            return self._reply(501, "5.5.4", "Syntax: STARTTLS")
        if self.factory.tls_context is None or self._tls_active:
            return self._reply(503, "5.5.1", "Error: TLS not available" if not self._tls_active
                               else "Error: TLS already active")
        self._reply(220, "2.0.0", "Ready to start TLS")
        # Anything pipelined behind STARTTLS was sent in plaintext: forget it
        # (CVE-2011-0411), and forget what was said before the handshake.
        self._buf.clear()
        self.transport.startTLS(self.factory.tls_context)
        self._tls_active = True
        self.session.helo = ""
        self.session.esmtp = False
        self.session.authenticated = ""
        self.session.user = None
        self.session.auth_mechanism = ""
        self.session.reset_transaction()
        return None

    def smtp_AUTH(self, arg):
        # Only the submission ports take logins; the MX is for incoming mail.
        self._junk_command()
        return self._reply(503, "5.5.1", "Error: authentication not enabled")

    def smtp_ETRN(self, arg):
        """RFC 1985: run the queue for a domain, for relay_networks clients only."""
        self._junk_command()
        if not self.offers_etrn:
            return self._reply(502, "5.5.1", "Error: command not implemented")
        s = self.session
        if not s.helo:
            return self._reply(503, "5.5.1", "Error: send HELO/EHLO first")
        if s.sender is not None:
            return self._reply(503, "5.5.1", "Error: MAIL transaction in progress")
        arg = arg.strip()
        if not arg:
            return self._reply(501, "5.5.4", "Syntax: ETRN domain")
        try:
            if arg.startswith("#"):
                # A queue id (RFC 1985 5.3): asks for that one message.
                if not re.match(r"^[0-9A-Za-z]{1,32}$", arg[1:]):
                    raise address.AddressError(501, "5.5.4", "Bad queue id")
                target = arg[1:]
            elif arg.startswith("@"):
                target = "@" + address.parse_domain(arg[1:])
            else:
                target = address.parse_domain(arg)
        except address.AddressError:
            return self._reply(501, "5.5.4", "Syntax: ETRN domain")
        if not s.trusted:
            return self._reply(459, "4.7.1", f"{arg}: client not authorised")
        flush = getattr(self.factory.queue, "flush", None)
        if flush is None:
            return self._reply(458, "4.3.0", f"Unable to queue messages for node {arg}")

        def started(count):
            self.log.info("ETRN {arg} from [{ip}]: {count} messages", arg=arg,
                          ip=s.client_ip, count=count)
            self._reply(250, "2.0.0", f"Queuing for node {arg} started")

        def failed(f):
            self.log.failure("ETRN {arg} failed", f, arg=arg)
            self._reply(458, "4.3.0", f"Unable to queue messages for node {arg}")
        return defer.maybeDeferred(flush, target).addCallbacks(started, failed)

    def smtp_NOOP(self, arg):
        self._junk_command()
        self._reply(250, "2.0.0", "Ok")

    def smtp_RSET(self, arg):
        self._junk_command()
        self.session.reset_transaction()
        self._abort_incoming()
        self._reply(250, "2.0.0", "Ok")

    def smtp_QUIT(self, arg):
        self._reply(221, "2.0.0", "Bye")
        self._close()

    def smtp_VRFY(self, arg):
        # No user enumeration: the RFC 5321 3.5.3 "cannot verify" answer.
        self._junk_command()
        self._reply(252, "2.5.2", "Cannot VRFY user, but will accept message and attempt delivery")

    def smtp_EXPN(self, arg):
        self._junk_command()
        self._reply(502, "5.5.1", "Error: EXPN not available")

    def smtp_HELP(self, arg):
        self._junk_command()
        self._reply(214, "2.0.0", "See RFC 5321")

    def smtp_MAIL(self, arg):
        s = self.session
        if not s.helo:
            return self._reply(503, "5.5.1", "Error: send HELO/EHLO first")
        if s.sender is not None:
            return self._reply(503, "5.5.1", "Error: nested MAIL command")
        try:
            path_text, params = address.split_path_and_params(arg, "FROM")
            params = address.parse_params(params)
            if params and not s.esmtp:
                raise address.AddressError(555, "5.5.4", "Parameters need EHLO")
            path = address.parse_path(path_text, sender=True)
            body_8bit, ret, envid = self._mail_params(params)
        except address.AddressError as e:
            return self._reply(e.code, e.enhanced, e.text)

        def answered(verdict):
            if verdict is not None:
                return self._reply_verdict(verdict)
            headers = s.trace_headers       # added by the checks just now: keep them
            s.reset_transaction()
            s.trace_headers = headers
            s.sender = path
            s.body_8bit = body_8bit
            s.ret, s.envid = ret, envid
            self._reply(250, "2.1.0", "Ok")
        s.trace_headers = []        # what checks add at MAIL is for this transaction
        return then(self.factory.policy.run("mail", s, path), answered)

    def _mail_params(self, params):
        """(BODY=8BITMIME given, RET, ENVID) of MAIL's parameters, checked."""
        body_8bit = False
        ret = envid = ""
        for key, value in params.items():
            if key == "SIZE":
                if value is None or not value.isdigit() or len(value) > 20:
                    raise address.AddressError(501, "5.5.4", "Bad SIZE parameter")
                if int(value) > self.factory.config.server.max_message_size:
                    raise address.AddressError(552, "5.3.4", "Message size exceeds fixed limit")
            elif key == "BODY":
                if value is None or value.upper() not in ("7BIT", "8BITMIME"):
                    raise address.AddressError(501, "5.5.4", "Bad BODY parameter")
                body_8bit = value.upper() == "8BITMIME"
            elif key == "RET":
                ret = address.parse_ret(value)
            elif key == "ENVID":
                envid = address.parse_envid(value)
            elif key == "AUTH":
                # RFC 4954 5: checked for syntax, then ignored; a client's
                # claim about who submitted the mail earlier is not trusted.
                address.parse_auth_param(value)
            else:
                raise address.AddressError(555, "5.5.4", f"Unsupported parameter {key}")
        return body_8bit, ret, envid

    @staticmethod
    def _rcpt_params(params):
        """(NOTIFY, ORCPT) of RCPT's parameters, checked; "" when not given."""
        notify = orcpt = ""
        for key, value in params.items():
            if key == "NOTIFY":
                notify = address.parse_notify(value)
            elif key == "ORCPT":
                orcpt = address.parse_orcpt(value)
            else:
                raise address.AddressError(555, "5.5.4", f"Unsupported parameter {key}")
        return notify, orcpt

    def smtp_RCPT(self, arg):
        s = self.session
        if s.sender is None:
            return self._reply(503, "5.5.1", "Error: need MAIL command")
        if len(s.recipients) >= self.factory.config.smtp.max_recipients:
            return self._reply(452, "4.5.3", "Error: too many recipients")
        try:
            path_text, params = address.split_path_and_params(arg, "TO")
            params = address.parse_params(params)
            if params and not s.esmtp:
                raise address.AddressError(555, "5.5.4", "Parameters need EHLO")
            path = address.parse_path(path_text, sender=False)
            notify, orcpt = self._rcpt_params(params)
        except address.AddressError as e:
            return self._reply(e.code, e.enhanced, e.text)
        if not path.domain and not path.has_routing and path.local.lower() == "postmaster":
            # RFC 5321 4.5.1: <Postmaster> without a domain must be accepted.
            path = address.Path(local="postmaster", domain=self.factory.domains[0])

        def answered(verdict):
            if verdict is not None:
                if verdict.code >= 500:
                    # Unknown users and the like: counted (dictionary attacks).
                    self.factory.policy.notify("rcpt_refused", s, (path, verdict))
                return self._reply_verdict(verdict)
            s.recipients.append(path)
            s.notify.append(notify)
            s.orcpt.append(orcpt)
            self._reply(250, "2.1.5", "Ok")
        return then(self.factory.policy.run("rcpt", s, path), answered)

    def smtp_DATA(self, arg):
        s = self.session
        if arg:
            return self._reply(501, "5.5.4", "Syntax: DATA")
        if s.sender is None:
            return self._reply(503, "5.5.1", "Error: need MAIL command")
        if not s.recipients:
            return self._reply(554, "5.5.1", "Error: no valid recipients")
        if self._pipelined_input():
            # RFC 2920: DATA ends a pipelined group; a body sent before 354 is
            # a client not waiting for our answers.
            return self._sync_error()

        def answered(verdict):
            if verdict is not None:
                return self._reply_verdict(verdict)
            self._start_data()
            self._reply(354, None, "End data with <CR><LF>.<CR><LF>")
        return then(self.factory.policy.run("data", s, None), answered)

    # -- message body -------------------------------------------------------

    def _start_data(self):
        s = self.session
        env = Envelope(sender=s.sender.address, recipients=[r.address for r in s.recipients],
                       arrival=self.reactor.seconds(), client_ip=s.client_ip, helo=s.helo,
                       protocol=self._with_protocol(), auth=s.authenticated,
                       ret=s.ret, envid=s.envid,
                       # Lists only when some recipient asked for something.
                       notify=list(s.notify) if any(s.notify) else [],
                       orcpt=list(s.orcpt) if any(s.orcpt) else [],
                       eight_bit=s.body_8bit)
        self._incoming = inc = self.factory.spool.new_message(env)
        inc.write_header()
        # Header fields the policy checks asked for (Received-SPF,
        # Authentication-Results, ...) go on top, then our Received:.
        for field in self.session.trace_headers:
            inc.write(field.encode("ascii", "replace"))
        inc.write(self._received_header(inc.qid).encode("ascii", "replace"))
        self._filter = self._message_filter(inc.qid)
        self._mode = DATA
        self._reset_timer()
        self._data_error = None
        self._in_headers = True
        self._mid_line = False
        self._received_count = 0
        self._body_size = 0

    def _message_filter(self, qid):
        """An object rewriting the message as it arrives (feed/finish), or None."""
        return None

    def _with_protocol(self):
        p = self.protocol_name if self.session.esmtp else "SMTP"
        if self._tls_active:
            p += "S"
        if self.session.authenticated:
            p += "A"
        return p

    def _tls_description(self):
        if not self._tls_active:
            return ""
        try:
            conn = self.transport.getHandle()
            return f" (using {conn.get_protocol_version_name()} with cipher {conn.get_cipher_name()})"
        except Exception:
            return " (using TLS)"

    def _received_comment(self):
        """An extra comment line of our Received: field ("" for none)."""
        return ""

    def _received_header(self, qid):
        s = self.session
        rcpt = f"\r\n\tfor <{s.recipients[0].address}>" if len(s.recipients) == 1 else ""
        comment = self._received_comment()
        comment = f"\r\n\t{comment}" if comment else ""
        return (f"Received: from {s.helo} ([{s.client_ip}]){self._tls_description()}{comment}\r\n"
                f"\tby {self.factory.hostname} (mailbox_appliance) with {self._with_protocol()}"
                f" id {qid}{rcpt};\r\n\t{message_date(self.reactor.seconds())}\r\n")

    def _process_data(self) -> bool:
        """Consume whole lines of the body; True when the terminator was seen."""
        buf = self._buf
        self._reset_timer()
        if self._mid_line:
            # Rest of an overlong line that was already flagged and dropped.
            i = buf.find(b"\r\n")
            if i < 0:
                _drop_all_but_cr(buf)
                return False
            del buf[:i + 2]
            self._mid_line = False
        if buf.startswith(b".\r\n"):
            del buf[:3]
            self._end_of_data()
            return True
        j = buf.find(b"\r\n.\r\n")
        if j >= 0:
            chunk = bytes(buf[:j + 2])
            del buf[:j + 5]
            self._body_chunk(chunk)
            self._end_of_data()
            return True
        k = buf.rfind(b"\r\n")
        if k >= 0:
            chunk = bytes(buf[:k + 2])
            del buf[:k + 2]
            self._body_chunk(chunk)
            if self._incoming.backlogged and not self._disk_paused:
                # The disk is slower than the client: stop reading until the
                # writer thread catches up, so memory does not follow input.
                self._disk_paused = True
                self.transport.pauseProducing()
                self._incoming.when_drained(self._disk_drained)
        if len(buf) >= MAX_TEXT_LINE:
            # A line longer than the limit and no end in sight: drop it now
            # rather than buffer it (a CR at the end may begin the CRLF).
            self._flag(500, "5.5.2", "Error: message line too long")
            _drop_all_but_cr(buf)
            self._mid_line = True
        return False

    def _disk_drained(self):
        self._disk_paused = False
        if self._mode != CLOSING and not self._paused:
            self.transport.resumeProducing()

    def _flag(self, code, enhanced, text):
        if self._data_error is None:
            self._data_error = (code, enhanced, text)

    def _body_chunk(self, chunk: bytes):
        crlf = chunk.count(b"\r\n")
        if chunk.count(b"\n") != crlf or chunk.count(b"\r") != crlf:
            if self.session.trusted:
                chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
                crlf = chunk.count(b"\r\n")
            else:
                self.log.warn("bare <CR> or <LF> received from {ip}", ip=self.session.client_ip)
                self._flag(550, "5.6.0", "Error: bare <CR> or <LF> received")
        if len(chunk) > MAX_TEXT_LINE - 2 and crlf and \
                max(map(len, chunk.split(b"\r\n"))) > MAX_TEXT_LINE - 2:
            self._flag(500, "5.5.2", "Error: message line too long")
        if chunk[:1] == b"." or b"\r\n." in chunk:
            chunk = (b"\r\n" + chunk).replace(b"\r\n.", b"\r\n")[2:]
        if self._body_size == 0 and chunk[:1] in (b" ", b"\t"):
            # It would continue our own Received: field (or whatever header
            # comes before it): a way to smuggle text into trace headers.
            self._flag(550, "5.6.0", "Error: message begins with white space")
        if self._in_headers:
            if chunk.startswith(b"\r\n"):
                head, self._in_headers = b"", False
            else:
                end = chunk.find(b"\r\n\r\n")
                head = chunk if end < 0 else chunk[:end + 2]
                if end >= 0:
                    self._in_headers = False
            self._received_count += len(_RECEIVED.findall(head))
        self._body_size += len(chunk)
        if self._body_size > self.factory.config.server.max_message_size:
            self._flag(552, "5.3.4", "Error: message size exceeds fixed limit")
        if self._data_error is None:
            if self._filter is not None:
                chunk = self._filter_chunk(self._filter.feed, chunk)
            if chunk:
                self._incoming.write(chunk)

    def _filter_chunk(self, step, chunk):
        try:
            return step(chunk)
        except HeaderBlockTooLarge:
            self._flag(552, "5.3.4", "Error: message header size exceeds limit")
            return b""

    def _end_of_data(self):
        self._mode = CMD
        self._reset_timer()
        inc, self._incoming = self._incoming, None
        fixup, self._filter = self._filter, None
        s = self.session
        if fixup is not None and self._data_error is None:
            tail = self._filter_chunk(lambda _: fixup.finish(), b"")
            if tail and self._data_error is None:
                inc.write(tail)
        if self._data_error is not None:
            inc.abort()
            self._answer_transaction(*self._data_error)
            s.reset_transaction()
            return
        view = MessageView(inc, self._received_count, self._body_size,
                           getattr(fixup, "from_values", None))

        def judged(verdict):
            if verdict is not None:
                inc.abort()
                self._answer_transaction(verdict.code, verdict.enhanced, verdict.text)
                return None
            return self.factory.spool.commit(inc).addCallbacks(queued, failed)

        def queued(qmsg):
            mail_event(self.log, f"{qmsg.qid}: client=[{s.client_ip}], "
                                 f"from=<{qmsg.envelope.sender}>, size={qmsg.size}, "
                                 f"nrcpt={len(qmsg.envelope.recipients)}", qid=qmsg.qid)
            return self._accepted(qmsg)

        def failed(f):
            self.log.error("{qid}: queue write failed: {why}", qid=inc.qid,
                           why=f.getErrorMessage())
            self._answer_transaction(451, "4.3.0", "Error: queue file write error")

        def finish(result):
            s.reset_transaction()
            return result

        result = then(self.factory.policy.run("eod", s, view), judged)
        if isinstance(result, defer.Deferred):
            result.addBoth(finish)
        else:
            finish(None)
        self._await(result)

    def _answer_transaction(self, code, enhanced, text):
        """The answer to a whole message (LMTP gives one per recipient)."""
        self._reply(code, enhanced, text)

    def _accepted(self, qmsg):
        """The message is durable in the queue: say so, and start delivering."""
        self._reply(250, "2.0.0", f"Ok: queued as {qmsg.qid}")
        self.factory.queue.submit(qmsg)

    def _abort_incoming(self):
        if self._incoming is not None:
            self._incoming.abort()
            self._incoming = None


class SMTPServerFactory(Factory):
    """Builds MX sessions; holds what they share (config, policy, spool, queue)."""

    protocol = SMTPServerProtocol
    listener = "smtp"
    noisy = False
    # True when the listener wraps every connection in TLS (port 465 style).
    implicit_tls = False

    def __init__(self, reactor, config, policy, spool, queue, tls_context=None):
        self.reactor = reactor
        self.config = config
        self.hostname = config.server.hostname
        self.domains = [d.lower() for d in config.server.domains]
        self.policy = policy
        self.spool = spool
        self.queue = queue
        self.tls_context = tls_context
        self.is_trusted = networks_predicate(config.relay_nets())

    def buildProtocol(self, addr):
        p = self.protocol(self)
        return p
