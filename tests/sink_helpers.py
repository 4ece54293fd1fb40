"""A scriptable SMTP server for tests of outbound delivery ("the sink").

    sink = yield start_sink(self, "127.0.0.2", port=0, dsn=True,
                            rcpt={"bad@ext.test": "550 5.1.1 User unknown"})
    ... deliver to 127.0.0.2:sink.port ...
    yield sink.when(lambda s: len(s.transactions) == 1)
    sink.transactions[0].rcpts, .accepted, .data, .mail_params

It records every connection (``sink.connections``: peer, every command line
with whether it came inside TLS, its transactions) and answers per script,
the keyword arguments of :class:`SinkScript`: greeting (None: never greet),
EHLO extensions (STARTTLS with a given server certificate, DSN, AUTH PLAIN),
replies to MAIL, each RCPT, DATA and the final dot, a recipient limit (452),
closing after the dot without a reply, a stage where it stops answering
("hang"), a delay before every reply, a reply flood, and the exact bytes of
the STARTTLS reply (to inject extra lines after the 220).

It parses what the client sends strictly (CRLF lines, dot-unstuffing) so the
tests see the wire as another MTA would.
"""

from __future__ import annotations

import base64
import os
from dataclasses import dataclass, field

from twisted.internet import defer, error, protocol
from twisted.internet import ssl as tssl

from mailbox_appliance import tls


@dataclass
class SinkScript:
    """How the sink answers; every field has a well-behaved default."""

    greeting: str | None = "220 sink.test ESMTP"
    ehlo: str | None = None                 # e.g. "502 5.5.1 no EHLO": then HELO
    extensions: tuple = ("PIPELINING", "8BITMIME", "SIZE 10485760", "ENHANCEDSTATUSCODES")
    starttls: object = None                 # server CertificateOptions: offer STARTTLS
    starttls_reply: bytes = b"220 2.0.0 Ready to start TLS\r\n"
    tls_broken: bool = False                # answer 220 to STARTTLS, then plain junk
    dsn: bool = False
    auth: dict | None = None                # user -> password: offer AUTH PLAIN
    auth_before_tls: bool = False           # also offer AUTH outside TLS
    mail: str = "250 2.1.0 Ok"
    rcpt: dict = field(default_factory=dict)    # address -> reply
    rcpt_default: str = "250 2.1.5 Ok"
    max_rcpt: int = 0                       # >0: 452 4.5.3 after this many per transaction
    data: str = "354 End data with <CR><LF>.<CR><LF>"
    eod: object = "250 2.0.0 Ok: queued"    # a reply, or a list used one per transaction
    close_after_dot: bool = False           # drop the connection instead of the reply
    hang: str = ""                          # stop answering at: greeting, ehlo, mail, rcpt,
                                            # data, eod, starttls
    delay: float = 0                        # seconds before each reply
    hold: str = ""                          # "eod": keep the reply to the dot until
                                            # Sink.release()
    flood: str = ""                         # "lines" (250- forever) or "long" (no CRLF)
    flood_at: str = "greeting"              # greeting or ehlo


@dataclass
class Transaction:
    """One MAIL ... DATA as the sink saw it."""

    sender: str
    mail_params: list
    tls: bool
    rcpts: list = field(default_factory=list)      # (address, params, reply code)
    accepted: list = field(default_factory=list)
    raw: bytes = b""                               # the DATA lines as sent (stuffed)
    data: bytes = b""                              # after dot-unstuffing
    eod_code: int = 0

    @property
    def rcpt_params(self):
        return {a: p for a, p, _ in self.rcpts}


@dataclass
class SinkConnection:
    """Everything one client connection did."""

    peer: tuple
    commands: list = field(default_factory=list)   # (line, inside_tls)
    transactions: list = field(default_factory=list)
    tls: bool = False
    auth_user: str = ""
    closed: bool = False

    def lines(self, tls=None):
        return [l for l, t in self.commands if tls is None or t == tls]


MAX_LINE = 65536


class _SinkProtocol(protocol.Protocol):

    def __init__(self, sink):
        self.sink = sink
        self.script = sink.script
        self.buffer = b""
        self.mode = "command"
        self.tx = None
        self.helo = False
        self.hung = False

    # -- helpers --------------------------------------------------------

    def reply(self, text):
        data = (text.replace("\n", "\r\n") + "\r\n").encode()
        if self.script.delay:
            self.sink.reactor.callLater(self.script.delay, self._write, data)
        else:
            self._write(data)

    def _write(self, data):
        if self.transport is not None and not self.conn.closed:
            self.transport.write(data)

    def stage(self, name):
        if self.script.hang == name:
            self.hung = True
        return self.hung

    def flood(self):
        if self.script.flood == "lines":
            self.transport.write(b"250-flooding the client with lines\r\n" * 5000)
        else:
            self.transport.write(b"2" * 200000)

    # -- connection -------------------------------------------------------

    def connectionMade(self):
        self.conn = SinkConnection(peer=(self.transport.getPeer().host,
                                         self.transport.getPeer().port))
        self.sink.connections.append(self.conn)
        self.sink.protocols.append(self)
        self.sink.max_open = max(self.sink.max_open, len(self.sink.protocols))
        self.sink.changed()
        if self.script.flood and self.script.flood_at == "greeting":
            self.flood()
            return
        if self.script.greeting is None or self.stage("greeting"):
            return
        self.reply(self.script.greeting)

    def connectionLost(self, reason=None):
        self.conn.closed = True
        if self in self.sink.protocols:
            self.sink.protocols.remove(self)
        self.sink.changed()

    def dataReceived(self, data):
        self.buffer += data
        while not self.hung and not self.conn.closed:
            end = self.buffer.find(b"\r\n")
            if end < 0:
                if len(self.buffer) > MAX_LINE:
                    self.transport.loseConnection()
                return
            line, self.buffer = self.buffer[:end], self.buffer[end + 2:]
            if self.mode == "data":
                self.data_line(line)
            else:
                self.command(line.decode("utf-8", "replace"))
            self.sink.changed()

    # -- commands ---------------------------------------------------------

    def command(self, line):
        self.conn.commands.append((line, self.conn.tls))
        verb, _, arg = line.partition(" ")
        verb = verb.upper()
        handler = getattr(self, "do_" + verb, None)
        if handler is None:
            self.reply("502 5.5.2 Command not recognized")
        else:
            handler(arg)

    def do_EHLO(self, arg):
        if self.script.flood and self.script.flood_at == "ehlo":
            self.flood()
            return
        if self.stage("ehlo"):
            return
        if self.script.ehlo:
            self.reply(self.script.ehlo)
            return
        self.helo = True
        self.tx = None
        ext = list(self.script.extensions)
        if self.script.starttls is not None and not self.conn.tls:
            ext.append("STARTTLS")
        if self.script.dsn:
            ext.append("DSN")
        if self.script.auth is not None and (self.conn.tls or self.script.auth_before_tls):
            ext.append("AUTH PLAIN")
        lines = ["sink.test"] + ext
        self.reply("\n".join(f"250-{l}" for l in lines[:-1]) + f"\n250 {lines[-1]}")

    def do_HELO(self, arg):
        self.helo = True
        self.reply("250 sink.test")

    def do_STARTTLS(self, arg):
        if self.script.starttls is None or self.conn.tls:
            self.reply("502 5.5.1 STARTTLS not available")
            return
        if self.stage("starttls"):
            return
        self.transport.write(self.script.starttls_reply)
        if self.script.tls_broken:
            self.transport.write(b"this is no TLS handshake\r\n" * 20)
            self.transport.loseConnection()
            return
        # What the client sent after STARTTLS in plain text is dropped
        # (RFC 3207 4.2 behaviour of a careful server).
        self.buffer = b""
        self.conn.tls = True
        self.helo = False
        self.tx = None
        self.transport.startTLS(self.script.starttls)

    def do_AUTH(self, arg):
        mech, _, initial = arg.partition(" ")
        if self.script.auth is None or mech.upper() != "PLAIN" or not initial:
            self.reply("504 5.5.4 Unrecognized authentication type")
            return
        try:
            _, user, password = base64.b64decode(initial).decode().split("\0")
        except ValueError:
            self.reply("501 5.5.2 Bad base64")
            return
        if self.script.auth.get(user) == password:
            self.conn.auth_user = user
            self.reply("235 2.7.0 Authentication successful")
        else:
            self.reply("535 5.7.8 Authentication credentials invalid")

    def do_MAIL(self, arg):
        if self.stage("mail"):
            return
        if not self.helo:
            self.reply("503 5.5.1 EHLO first")
            return
        if self.tx is not None:
            self.reply("503 5.5.1 Nested MAIL")
            return
        path, params = _path(arg, "FROM:")
        if path is None:
            self.reply("501 5.5.4 Syntax: MAIL FROM:<address>")
            return
        code = int(self.script.mail[:3])
        if code == 250:
            self.tx = Transaction(path, params, self.conn.tls)
            self.conn.transactions.append(self.tx)
            self.sink.transactions.append(self.tx)
        self.reply(self.script.mail)

    def do_RCPT(self, arg):
        if self.stage("rcpt"):
            return
        if self.tx is None:
            self.reply("503 5.5.1 Need MAIL")
            return
        path, params = _path(arg, "TO:")
        if path is None:
            self.reply("501 5.5.4 Syntax: RCPT TO:<address>")
            return
        if self.script.max_rcpt and len(self.tx.accepted) >= self.script.max_rcpt:
            text = "452 4.5.3 Error: too many recipients"
        else:
            text = self.script.rcpt.get(path, self.script.rcpt_default)
        code = int(text[:3])
        self.tx.rcpts.append((path, params, code))
        if 200 <= code < 300:
            self.tx.accepted.append(path)
        self.reply(text)

    def do_DATA(self, arg):
        if self.stage("data"):
            return
        if self.tx is None:
            self.reply("503 5.5.1 Need MAIL")
            return
        if not self.tx.accepted:
            self.reply("554 5.5.1 Error: no valid recipients")
            return
        self.mode = "data"
        self.reply(self.script.data)

    def data_line(self, line):
        if line == b".":
            self.mode = "command"
            tx, self.tx = self.tx, None
            self.sink.changed()
            if self.script.close_after_dot:
                self.transport.loseConnection()
                return
            if self.stage("eod"):
                return
            eod = self.script.eod
            if isinstance(eod, list):
                eod = eod.pop(0) if len(eod) > 1 else eod[0]
            if self.script.hold == "eod":
                self.sink.held.append((self, tx, eod))
                self.sink.changed()
                return
            tx.eod_code = int(eod[:3])
            self.reply(eod)
            return
        self.tx.raw += line + b"\r\n"
        self.tx.data += (line[1:] if line.startswith(b".") else line) + b"\r\n"

    def do_RSET(self, arg):
        self.tx = None
        self.reply("250 2.0.0 Ok")

    def do_NOOP(self, arg):
        self.reply("250 2.0.0 Ok")

    def do_QUIT(self, arg):
        self.reply("221 2.0.0 Bye")
        self.transport.loseConnection()


def _path(arg, prefix):
    if not arg.upper().startswith(prefix):
        return None, []
    rest = arg[len(prefix):].strip()
    if not rest.startswith("<") or ">" not in rest:
        return None, []
    path, _, params = rest[1:].partition(">")
    return path, params.split()


class Sink(protocol.Factory):
    """The listening sink; see the module docstring."""

    def __init__(self, reactor=None, **script):
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor
        self.script = SinkScript(**script)
        self.connections = []
        self.transactions = []
        self.protocols = []
        self.held = []                  # (protocol, transaction, reply) kept by hold=
        self.max_open = 0               # most connections open at once
        self.port = None
        self.listening = []
        self._watchers = []

    def buildProtocol(self, addr):
        return _SinkProtocol(self)

    def listen(self, interface="127.0.0.1", port=0):
        listening = self.reactor.listenTCP(port, self, interface=interface)
        self.listening.append(listening)
        self.port = listening.getHost().port
        return self.port

    def when(self, predicate):
        """A Deferred firing (with the sink) once ``predicate(sink)`` holds."""
        d = defer.Deferred()
        if predicate(self):
            d.callback(self)
        else:
            self._watchers.append((predicate, d))
        return d

    def changed(self):
        for item in list(self._watchers):
            predicate, d = item
            if predicate(self):
                self._watchers.remove(item)
                d.callback(self)

    def release(self, keep_holding=False):
        """Send the replies kept by ``hold``; later ones are not held unless asked."""
        if not keep_holding:
            self.script.hold = ""
        held, self.held = self.held, []
        for proto, tx, text in held:
            tx.eod_code = int(text[:3])
            proto.reply(text)
        self.changed()

    @property
    def delivered(self):
        """Transactions the sink answered with 2xx after the dot."""
        return [t for t in self.transactions if 200 <= t.eod_code < 300]

    @defer.inlineCallbacks
    def stop(self):
        for listening in self.listening:
            yield listening.stopListening()
        closing = []
        for p in list(self.protocols):
            d = defer.Deferred()
            self._watchers.append((lambda s, p=p: p not in s.protocols, d))
            closing.append(d)
            p.transport.abortConnection()
        yield defer.gatherResults(closing)


@defer.inlineCallbacks
def start_sink(testcase, interface="127.0.0.1", port=0, **script):
    """A Sink listening on ``interface``:``port``, stopped at cleanup."""
    sink = Sink(**script)
    sink.listen(interface, port)
    testcase.addCleanup(sink.stop)
    yield defer.succeed(None)
    return sink


def start_sinks(testcase, interfaces, scripts=None):
    """One sink per loopback address, all on the same port (MX hosts share
    ``[delivery] smtp_port``); returns (port, [sinks]). ``scripts`` gives each
    sink's keyword arguments."""
    scripts = scripts or [{} for _ in interfaces]
    for _ in range(50):
        sinks = []
        try:
            port = 0
            for interface, script in zip(interfaces, scripts):
                sink = Sink(**script)
                sinks.append(sink)
                port = sink.listen(interface, port)
        except error.CannotListenError:
            for sink in sinks:
                for listening in sink.listening:
                    listening.stopListening()
            continue
        for sink in sinks:
            testcase.addCleanup(sink.stop)
        return port, sinks
    raise RuntimeError("no common free port")


def server_tls(directory, hostname):
    """A throwaway self-signed certificate for ``hostname``: (CertificateOptions, cert_path).

    The certificate file doubles as a CA bundle (``tls_ca_file``) for tests
    of verified TLS: it is its own issuer.
    """
    cert_path = os.path.join(directory, f"{hostname}.crt")
    key_path = os.path.join(directory, f"{hostname}.key")
    tls.generate_self_signed(hostname, cert_path, key_path)
    cert, key = tls.load_pair(cert_path, key_path)
    return tssl.CertificateOptions(privateKey=key, certificate=cert), cert_path


class ClockedReactor:
    """The real reactor for network and threads, a Clock for time.

    Code under test gets this as its reactor: connections are real, while
    timeouts fire only when the test advances ``clock``.
    """

    def __init__(self, clock=None):
        from twisted.internet import reactor
        from twisted.internet.task import Clock
        self._real = reactor
        self.clock = clock or Clock()

    def callLater(self, *args, **kwargs):
        return self.clock.callLater(*args, **kwargs)

    def seconds(self):
        return self.clock.seconds()

    def getDelayedCalls(self):
        return self.clock.getDelayedCalls()

    def __getattr__(self, name):
        return getattr(self._real, name)
