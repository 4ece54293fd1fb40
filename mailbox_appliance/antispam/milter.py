"""A client of the Sendmail milter protocol (version 6, as Postfix speaks it).

A milter is an external filter process (opendkim, rspamd, clamav-milter...)
that an MTA asks at every stage of an SMTP transaction. The protocol is a
stream of packets, each a 4-octet big-endian length (counting the command
octet), one command octet and its data; strings are NUL-terminated.

The MTA opens with option negotiation (``SMFIC_OPTNEG``): the protocol
version, the *actions* it allows the milter (add a header, replace the
body...) and the *protocol steps* the milter may leave out (``SMFIP_NO*``:
"do not send me the HELO") or leave unanswered (``SMFIP_NR_*``). The milter
answers with the subset it wants, and may add the macros it wants per stage
(``SMFIR_SETSYMLIST``). Then the stages follow, each preceded by its macros
(``SMFIC_MACRO``): connect, HELO, MAIL, RCPT (one per recipient), DATA, the
header fields, end of headers, body chunks, end of message. Every answered
step gets "continue" or a decision (accept, reject, tempfail, discard, a
reply code) that ends the conversation; at end of message the milter also
sends its edits of the message before its final answer.

``MilterProtocol`` is the framing: packets out, packets in, each bounded.
``MilterSession`` is one conversation on a connected protocol, one method
per stage returning a Deferred ``Reply``; it knows the negotiated options,
skips the steps the milter declined and waits for no answer where the
milter said it gives none. Timeouts are per answer (``SMFIR_PROGRESS``
restarts the clock). What to do with the answers is ``milter_filter``'s
business.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass, field

from twisted.internet import defer
from twisted.internet.protocol import Protocol
from twisted.logger import Logger

log = Logger(namespace="mailbox_appliance.antispam.milter")

VERSION = 6

# Commands, MTA -> milter.
SMFIC_ABORT = b"A"
SMFIC_BODY = b"B"
SMFIC_CONNECT = b"C"
SMFIC_MACRO = b"D"
SMFIC_BODYEOB = b"E"
SMFIC_HELO = b"H"
SMFIC_QUIT_NC = b"K"
SMFIC_HEADER = b"L"
SMFIC_MAIL = b"M"
SMFIC_EOH = b"N"
SMFIC_OPTNEG = b"O"
SMFIC_QUIT = b"Q"
SMFIC_RCPT = b"R"
SMFIC_DATA = b"T"
SMFIC_UNKNOWN = b"U"

# Replies, milter -> MTA.
SMFIR_ADDRCPT = b"+"
SMFIR_DELRCPT = b"-"
SMFIR_ADDRCPT_PAR = b"2"
SMFIR_SHUTDOWN = b"4"
SMFIR_ACCEPT = b"a"
SMFIR_REPLBODY = b"b"
SMFIR_CONTINUE = b"c"
SMFIR_DISCARD = b"d"
SMFIR_CHGFROM = b"e"
SMFIR_CONN_FAIL = b"f"
SMFIR_ADDHEADER = b"h"
SMFIR_INSHEADER = b"i"
SMFIR_SETSYMLIST = b"l"
SMFIR_CHGHEADER = b"m"
SMFIR_PROGRESS = b"p"
SMFIR_QUARANTINE = b"q"
SMFIR_REJECT = b"r"
SMFIR_SKIP = b"s"
SMFIR_TEMPFAIL = b"t"
SMFIR_REPLYCODE = b"y"
SMFIR_OPTNEG = b"O"

# Actions the milter may take (SMFIF_*).
SMFIF_ADDHDRS = 0x01
SMFIF_CHGBODY = 0x02
SMFIF_ADDRCPT = 0x04
SMFIF_DELRCPT = 0x08
SMFIF_CHGHDRS = 0x10
SMFIF_QUARANTINE = 0x20
SMFIF_CHGFROM = 0x40
SMFIF_ADDRCPT_PAR = 0x80
SMFIF_SETSYMLIST = 0x100
# Everything but changing the envelope sender (nothing downstream of the
# content filters can carry a new sender).
OUR_ACTIONS = (SMFIF_ADDHDRS | SMFIF_CHGBODY | SMFIF_ADDRCPT | SMFIF_DELRCPT | SMFIF_CHGHDRS
               | SMFIF_QUARANTINE | SMFIF_ADDRCPT_PAR | SMFIF_SETSYMLIST)

# Protocol steps the milter may decline (SMFIP_*).
SMFIP_NOCONNECT = 0x01
SMFIP_NOHELO = 0x02
SMFIP_NOMAIL = 0x04
SMFIP_NORCPT = 0x08
SMFIP_NOBODY = 0x10
SMFIP_NOHDRS = 0x20
SMFIP_NOEOH = 0x40
SMFIP_NR_HDR = 0x80
SMFIP_NOUNKNOWN = 0x100
SMFIP_NODATA = 0x200
SMFIP_SKIP = 0x400
SMFIP_RCPT_REJ = 0x800
SMFIP_NR_CONN = 0x1000
SMFIP_NR_HELO = 0x2000
SMFIP_NR_MAIL = 0x4000
SMFIP_NR_RCPT = 0x8000
SMFIP_NR_DATA = 0x10000
SMFIP_NR_UNKN = 0x20000
SMFIP_NR_EOH = 0x40000
SMFIP_NR_BODY = 0x80000
SMFIP_HDR_LEADSPC = 0x100000
# All of the above: we can leave out or go without the answer of any step.
OUR_PROTOCOL = 0x1FFFFF

# Macro stages of SMFIR_SETSYMLIST (SMFIM_*), with the command they precede.
STAGE_COMMANDS = {0: SMFIC_CONNECT, 1: SMFIC_HELO, 2: SMFIC_MAIL, 3: SMFIC_RCPT,
                  4: SMFIC_DATA, 5: SMFIC_BODYEOB, 6: SMFIC_EOH}

MAX_PACKET = 1024 * 1024        # any reply but a body replacement chunk
MAX_BODY_CHUNK = 65535          # what we send per SMFIC_BODY
MAX_MACRO_BYTES = 64 * 1024     # one SMFIC_MACRO packet
MAX_SYMLIST = 100               # macro names asked per stage
MAX_EDITS = 10000               # edit packets at end of message
MAX_EDIT_BYTES = 4 * 1024 * 1024    # their size together, a replaced body aside

# The decisions that end a conversation (besides "continue").
FINAL = {SMFIR_ACCEPT: "accept", SMFIR_REJECT: "reject", SMFIR_TEMPFAIL: "tempfail",
         SMFIR_DISCARD: "discard", SMFIR_REPLYCODE: "replycode", SMFIR_CONTINUE: "continue",
         SMFIR_SKIP: "skip", SMFIR_SHUTDOWN: "tempfail", SMFIR_CONN_FAIL: "tempfail"}
# Edits of the message, allowed at end of message only, with the action
# that must have been negotiated for each.
EDITS = {SMFIR_ADDHEADER: SMFIF_ADDHDRS, SMFIR_INSHEADER: SMFIF_ADDHDRS,
         SMFIR_CHGHEADER: SMFIF_CHGHDRS, SMFIR_REPLBODY: SMFIF_CHGBODY,
         SMFIR_ADDRCPT: SMFIF_ADDRCPT, SMFIR_ADDRCPT_PAR: SMFIF_ADDRCPT_PAR,
         SMFIR_DELRCPT: SMFIF_DELRCPT, SMFIR_QUARANTINE: SMFIF_QUARANTINE}

_HEADER_NAME = re.compile(rb"^[!-9;-~]{1,200}$")        # RFC 5322 ftext
_REPLY = re.compile(r"^([45][0-9][0-9])(?:[ -]([45]\.[0-9]{1,3}\.[0-9]{1,3}))?(?:[ -](.*))?$")


class MilterError(Exception):
    """The milter broke the protocol, closed the connection or did not answer."""


class MilterTimeout(MilterError):
    """No answer within the stage's time."""


def packet(cmd: bytes, data: bytes = b"") -> bytes:
    """One packet on the wire: length (command octet included), command, data."""
    return struct.pack("!I", len(data) + 1) + cmd + data


def _cstr(value) -> bytes:
    """A NUL-terminated string; a NUL inside would end it early, so it is dropped."""
    if isinstance(value, str):
        value = value.encode("utf-8", "replace")
    return value.replace(b"\0", b"") + b"\0"


def _strings(data: bytes, count: int, what: str):
    """The first ``count`` NUL-terminated strings of ``data`` (bytes each)."""
    parts = data.split(b"\0")
    if len(parts) <= count:
        raise MilterError(f"{what}: expected {count} NUL-terminated strings")
    return parts[:count]


class MilterProtocol(Protocol):
    """The framing: send packets, hand received ones to whoever waits, bounded.

    A reply longer than ``max_packet`` is a protocol error, except a body
    replacement chunk (``SMFIR_REPLBODY``), which is bounded by
    ``max_body``: what is left of the whole replaced body's allowance.
    """

    def __init__(self, max_packet=MAX_PACKET, max_body=MAX_PACKET):
        self.max_packet = max_packet
        self.max_body = max_body
        self._buf = bytearray()
        self._packets = []
        self._waiting = None
        self._error = None
        self.connected_d = defer.Deferred()

    def connectionMade(self):
        self.connected_d.callback(self)

    def send(self, cmd: bytes, data: bytes = b""):
        if self._error is None:
            self.transport.write(packet(cmd, data))

    def dataReceived(self, data):
        if self._error is not None:
            return
        self._buf += data
        while len(self._buf) >= 5:
            length, cmd = struct.unpack("!I", self._buf[:4])[0], bytes(self._buf[4:5])
            limit = self.max_body if cmd == SMFIR_REPLBODY else self.max_packet
            if length < 1 or length - 1 > limit:
                self._fail(MilterError(f"reply {cmd!r} of {length} octets is out of bounds"))
                self.transport.abortConnection()
                return
            if len(self._buf) < 4 + length:
                return
            body = bytes(self._buf[5:4 + length])
            del self._buf[:4 + length]
            if cmd == SMFIR_REPLBODY:
                self.max_body -= len(body)
            self._deliver((cmd, body))

    def connectionLost(self, reason):
        self._fail(MilterError(f"connection lost: {reason.getErrorMessage()}"))

    def _deliver(self, item):
        if self._waiting is not None:
            d, self._waiting = self._waiting, None
            d.callback(item)
        else:
            self._packets.append(item)

    def _fail(self, error):
        if self._error is None:
            self._error = error
        if self._waiting is not None:
            d, self._waiting = self._waiting, None
            d.errback(error)

    def read(self):
        """Deferred (command, data) of the next reply; fails with MilterError."""
        if self._packets:
            return defer.succeed(self._packets.pop(0))
        if self._error is not None:
            return defer.fail(self._error)
        assert self._waiting is None, "one reader at a time"
        self._waiting = defer.Deferred(lambda d: setattr(self, "_waiting", None))
        return self._waiting

    def close(self):
        if self.transport is not None:
            self.transport.loseConnection()

    def abort(self):
        if self.transport is not None:
            self.transport.abortConnection()


@dataclass
class Reply:
    """A milter's answer to one step.

    ``action``: "continue", "accept", "reject", "tempfail", "discard",
    "replycode" (``text`` is the reply, e.g. "550 5.7.1 No thanks") or
    "skip" (no more body, please). ``edits`` (end of message only): the
    (command, data) packets of the milter's edits, in the order sent.
    ``skipped``: the step was not sent (negotiated away); ``noreply``: sent,
    but the milter answers none.
    """

    action: str = "continue"
    text: str = ""
    edits: list = field(default_factory=list)
    skipped: bool = False
    noreply: bool = False

    @property
    def final(self) -> bool:
        """A decision that ends the conversation."""
        return self.action not in ("continue", "skip")


@dataclass
class Options:
    """What was negotiated: version, the milter's actions and protocol flags, macros."""

    version: int = VERSION
    actions: int = 0
    protocol: int = 0
    # command -> [macro names] the milter asked for at that stage (SETSYMLIST)
    symlists: dict = field(default_factory=dict)

    def has(self, flag: int) -> bool:
        return bool(self.protocol & flag)


# The steps a milter may decline / leave unanswered, by command.
_NO_STEP = {SMFIC_CONNECT: SMFIP_NOCONNECT, SMFIC_HELO: SMFIP_NOHELO, SMFIC_MAIL: SMFIP_NOMAIL,
            SMFIC_RCPT: SMFIP_NORCPT, SMFIC_DATA: SMFIP_NODATA, SMFIC_HEADER: SMFIP_NOHDRS,
            SMFIC_EOH: SMFIP_NOEOH, SMFIC_BODY: SMFIP_NOBODY}
_NO_REPLY = {SMFIC_CONNECT: SMFIP_NR_CONN, SMFIC_HELO: SMFIP_NR_HELO, SMFIC_MAIL: SMFIP_NR_MAIL,
             SMFIC_RCPT: SMFIP_NR_RCPT, SMFIC_DATA: SMFIP_NR_DATA, SMFIC_HEADER: SMFIP_NR_HDR,
             SMFIC_EOH: SMFIP_NR_EOH, SMFIC_BODY: SMFIP_NR_BODY}


def macro_name(name: str) -> str:
    """A macro name as sent: one character bare ("j", "i"), longer in braces."""
    name = name.strip()
    if name.startswith("{") and name.endswith("}"):
        name = name[1:-1]
    return name if len(name) == 1 else "{" + name + "}"


class MilterSession:
    """One conversation with a milter over a connected ``MilterProtocol``.

    ``reactor`` times the answers: ``command_timeout`` seconds for each
    step, ``eom_timeout`` for the end of message (the milter's real work).
    Call ``negotiate`` first, then the stages in order; each returns a
    Deferred Reply and fails with MilterError on a broken or silent milter.
    """

    def __init__(self, proto: MilterProtocol, reactor, command_timeout=10.0, eom_timeout=30.0):
        self.proto = proto
        self.reactor = reactor
        self.command_timeout = command_timeout
        self.eom_timeout = eom_timeout
        self.options = Options()

    # -- negotiation --------------------------------------------------

    @defer.inlineCallbacks
    def negotiate(self, actions=OUR_ACTIONS, protocol=OUR_PROTOCOL):
        """Offer version 6, ``actions`` and ``protocol``; keep what the milter takes."""
        self.proto.send(SMFIC_OPTNEG, struct.pack("!III", VERSION, actions, protocol))
        cmd, data = yield self._read(self.command_timeout)
        if cmd != SMFIR_OPTNEG or len(data) < 12:
            raise MilterError(f"option negotiation: unexpected reply {cmd!r}")
        version, m_actions, m_protocol = struct.unpack("!III", data[:12])
        if version < 2:
            raise MilterError(f"option negotiation: protocol version {version} not supported")
        if m_actions & ~actions:
            # libmilter asks only for what was offered; a milter that asks
            # for more gets what we offered (its edits beyond are refused).
            log.warn("milter asked for actions {extra:#x} not offered",
                     extra=m_actions & ~actions)
        if m_protocol & ~protocol:
            raise MilterError(f"option negotiation: protocol flags "
                              f"{m_protocol & ~protocol:#x} not offered")
        opts = Options(version=min(version, VERSION), actions=m_actions & actions,
                       protocol=m_protocol)
        rest = data[12:]
        while rest and opts.actions & SMFIF_SETSYMLIST:
            if len(rest) < 5:
                raise MilterError("option negotiation: truncated macro list")
            stage = struct.unpack("!I", rest[:4])[0]
            names, sep, rest = rest[4:].partition(b"\0")
            if not sep:
                raise MilterError("option negotiation: unterminated macro list")
            if stage in STAGE_COMMANDS:
                opts.symlists[STAGE_COMMANDS[stage]] = [
                    macro_name(n) for n in names.decode("ascii", "replace").split()
                ][:MAX_SYMLIST]
        self.options = opts
        return opts

    # -- stages -------------------------------------------------------

    def connect(self, hostname, address="", port=0, macros=None):
        """SMFIC_CONNECT: the client's name and address ("" = unknown family)."""
        if not address:
            data = _cstr(hostname) + b"U"
        else:
            family = b"6" if ":" in address else b"4"
            data = _cstr(hostname) + family + struct.pack("!H", port & 0xFFFF) + _cstr(address)
        return self._step(SMFIC_CONNECT, data, macros)

    def helo(self, name, macros=None):
        return self._step(SMFIC_HELO, _cstr(name), macros)

    def mail(self, sender, args=(), macros=None):
        """SMFIC_MAIL: ``sender`` without brackets ("" for <>), ESMTP ``args``."""
        return self._step(SMFIC_MAIL, _cstr(f"<{sender}>") + b"".join(_cstr(a) for a in args),
                          macros)

    def rcpt(self, recipient, args=(), macros=None):
        return self._step(SMFIC_RCPT,
                          _cstr(f"<{recipient}>") + b"".join(_cstr(a) for a in args), macros)

    def data(self, macros=None):
        if self.options.version < 4:
            return defer.succeed(Reply(skipped=True))
        return self._step(SMFIC_DATA, b"", macros)

    def header(self, name: bytes, value: bytes):
        """SMFIC_HEADER: ``value`` as in the message (folded lines joined by LF)."""
        return self._step(SMFIC_HEADER, _cstr(name) + _cstr(value), None)

    def eoh(self, macros=None):
        return self._step(SMFIC_EOH, b"", macros)

    def body(self, chunk: bytes):
        """SMFIC_BODY: one chunk of at most MAX_BODY_CHUNK octets."""
        if len(chunk) > MAX_BODY_CHUNK:
            raise ValueError("body chunk too large")
        return self._step(SMFIC_BODY, chunk, None)

    @defer.inlineCallbacks
    def eom(self, macros=None):
        """SMFIC_BODYEOB: collect the milter's edits up to its final answer."""
        self._macros(SMFIC_BODYEOB, macros)
        self.proto.send(SMFIC_BODYEOB)
        edits, size = [], 0
        while True:
            cmd, data = yield self._read(self.eom_timeout)
            if cmd in EDITS:
                if not self.options.actions & EDITS[cmd]:
                    raise MilterError(f"edit {cmd!r} without the negotiated action")
                # A replaced body is bounded by the protocol (max_body);
                # the other edits together by MAX_EDIT_BYTES / MAX_EDITS.
                if cmd != SMFIR_REPLBODY:
                    size += len(data) + 16
                if size > MAX_EDIT_BYTES or len(edits) >= MAX_EDITS:
                    raise MilterError("too many edits at end of message")
                edits.append((cmd, data))
                continue
            reply = self._decision(cmd, data, SMFIC_BODYEOB)
            if reply.action == "skip":
                raise MilterError("skip at end of message")
            reply.edits = edits
            return reply

    def abort(self):
        """SMFIC_ABORT: forget the current message (no answer)."""
        self.proto.send(SMFIC_ABORT)

    def quit(self):
        """SMFIC_QUIT and close the connection."""
        self.proto.send(SMFIC_QUIT)
        self.proto.close()

    # -- internals ----------------------------------------------------

    def _macros(self, cmd, macros):
        """SMFIC_MACRO for the stage of ``cmd``: what the milter asked for, or all."""
        if not macros:
            return
        wanted = self.options.symlists.get(cmd)
        items = [(macro_name(k), v) for k, v in macros.items()]
        if wanted is not None:
            items = [(k, v) for k, v in items if k in wanted]
        data, size = [cmd], 1
        for k, v in items:
            piece = _cstr(k) + _cstr(str(v))
            if size + len(piece) > MAX_MACRO_BYTES:
                break
            data.append(piece)
            size += len(piece)
        self.proto.send(SMFIC_MACRO, b"".join(data))

    @defer.inlineCallbacks
    def _step(self, cmd, data, macros):
        opts = self.options
        if opts.has(_NO_STEP[cmd]):
            return Reply(skipped=True)
        self._macros(cmd, macros)
        self.proto.send(cmd, data)
        if opts.has(_NO_REPLY[cmd]):
            return Reply(noreply=True)
        reply_cmd, reply_data = yield self._read(self.command_timeout)
        return self._decision(reply_cmd, reply_data, cmd)

    def _decision(self, cmd, data, stage):
        if cmd not in FINAL:
            raise MilterError(f"unexpected reply {cmd!r} to {stage!r}")
        action = FINAL[cmd]
        if action == "skip" and stage != SMFIC_BODY:
            raise MilterError(f"skip in reply to {stage!r}")
        text = ""
        if action == "replycode":
            text = _strings(data, 1, "reply code")[0].decode("utf-8", "replace")
        return Reply(action=action, text=text)

    @defer.inlineCallbacks
    def _read(self, timeout):
        """The next reply but progress notes, each restarting the clock."""
        while True:
            d = self.proto.read()
            d.addTimeout(timeout, self.reactor, onTimeoutCancel=_timed_out)
            cmd, data = yield d
            if cmd != SMFIR_PROGRESS:
                return (cmd, data)


def _timed_out(result, timeout):
    raise MilterTimeout(f"no answer in {timeout} s")


def parse_replycode(text: str):
    """(code, enhanced, text) of a SMFIR_REPLYCODE reply; multi-line joined.

    Raises MilterError unless it is a 4xx or 5xx reply (a milter cannot
    make us accept with a reply code).
    """
    lines = [l for l in re.split(r"\r\n|\n|\r", text) if l.strip()]
    if not lines:
        raise MilterError("empty reply code")
    code, enhanced, texts = None, None, []
    for line in lines:
        m = _REPLY.match(line.strip())
        if not m or (code is not None and m.group(1) != code):
            raise MilterError(f"bad reply code {line[:100]!r}")
        code = m.group(1)
        enhanced = enhanced or m.group(2)
        if m.group(3):
            texts.append(m.group(3).strip())
    if enhanced is None or enhanced[0] != code[0]:
        enhanced = "4.7.1" if code[0] == "4" else "5.7.1"
    words = " ".join(texts) or ("Service unavailable - try again later" if code[0] == "4"
                                else "Command rejected")
    clean = "".join(ch for ch in words if ch.isprintable())[:500]
    return int(code), enhanced, clean


def header_name_ok(name: bytes) -> bool:
    return bool(_HEADER_NAME.match(name))
