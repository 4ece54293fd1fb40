"""The control socket: the admin command's way into a running queue manager.

The appliance listens on a UNIX socket, ``data_dir/control.sock`` (mode
0600: only the appliance's own user may talk to it). The admin command asks
the running queue manager to flush, hold, release or delete instead of
moving queue files under its scheduler's feet.

The protocol is one JSON object per line, in both directions::

    -> {"op": "hold", "target": "0123456789ABCDEF"}
    <- {"ok": true, "count": 1}
    <- {"ok": false, "error": "no such message", "code": "not_found"}

``op`` is flush, hold, release or delete; ``target`` a queue id, for flush
also a domain or null (everything). ``stats`` (no target) answers the
counters of the checks and filters since start-up,
``{"ok": true, "counters": {"greylist:pass": 3, ...}}``. Requests are answered one at a time and
in order; a line longer than ``MAX_LINE`` ends the connection.
"""

from __future__ import annotations

import json
import os
import socket

from twisted.internet import defer
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver
from twisted.protocols.policies import TimeoutMixin
from zope.interface import Interface

OPS = ("flush", "hold", "release", "delete", "stats")
MAX_LINE = 4096
MAX_TARGET = 255
# The longest path a UNIX socket address takes, with room for the NUL.
_MAX_SUN_PATH = 100


class IQueueControl(Interface):
    """What the control socket asks of the queue manager.

    Each method returns the number of messages affected, as an int or a
    Deferred firing with one, and raises (or fails with) ``KeyError`` when
    ``qid`` names no message in the queue.
    """

    def flush(target=None):
        """Attempt now every waiting message, or those of one queue id or domain."""

    def hold(qid):
        """Stop delivering a message until it is released."""

    def release(qid):
        """Take a held message back into the queue and attempt it."""

    def delete(qid):
        """Remove a message for good, delivering nothing and notifying nobody."""


class ControlError(Exception):
    """The control socket could not be used (or answered nonsense)."""


class ControlUnavailable(ControlError):
    """Nothing listens on the control socket: the appliance is not running."""


def _reply(ok, **fields) -> bytes:
    return json.dumps({"ok": ok, **fields}, ensure_ascii=True,
                      separators=(",", ":")).encode("ascii")


def parse_request(line: bytes):
    """(op, target) of one request line; ValueError saying what is wrong."""
    try:
        raw = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        raise ValueError("request is not JSON") from None
    if not isinstance(raw, dict):
        raise ValueError("request is not a JSON object")
    op, target = raw.get("op"), raw.get("target")
    if op not in OPS:
        raise ValueError("unknown op (expected one of " + ", ".join(OPS) + ")")
    if target is not None:
        if not isinstance(target, str) or not target or len(target) > MAX_TARGET \
                or not target.isascii() or not target.isprintable() or " " in target:
            raise ValueError("bad target")
    elif op not in ("flush", "stats"):
        raise ValueError(op + " needs a queue id")
    return op, target


class ControlProtocol(LineReceiver, TimeoutMixin):
    """One admin connection: requests in, one answer line each, in order."""

    delimiter = b"\n"
    MAX_LENGTH = MAX_LINE
    log = Logger()

    def connectionMade(self):
        self.factory.connections += 1
        if self.factory.connections > self.factory.max_connections:
            self.transport.write(_reply(False, error="too many connections",
                                        code="busy") + b"\n")
            self.transport.loseConnection()
            return
        self.callLater = self.factory.reactor.callLater
        self.setTimeout(self.factory.timeout)

    def connectionLost(self, reason):
        self.factory.connections -= 1
        self.setTimeout(None)

    def timeoutConnection(self):
        self.transport.loseConnection()

    def lineLengthExceeded(self, line):
        self.transport.write(_reply(False, error="request too long", code="bad_request")
                             + b"\n")
        self.transport.loseConnection()

    def lineReceived(self, line):
        self.resetTimeout()
        line = line.rstrip(b"\r")
        if not line.strip():
            return
        try:
            op, target = parse_request(line)
        except ValueError as e:
            self._answer(_reply(False, error=str(e), code="bad_request"))
            return
        # One request at a time: stop reading until this one is answered,
        # so a client cannot pile up work (or replies) without bound.
        self.pauseProducing()
        d = defer.maybeDeferred(self._call, op, target)
        d.addCallbacks(self._done, self._failed, errbackArgs=(op, target))
        d.addCallback(self._answer)
        d.addCallback(lambda _: self.resumeProducing())

    def _call(self, op, target):
        manager = self.factory.manager
        if op == "stats":
            stats = self.factory.stats
            return {"counters": stats() if stats is not None else {}}
        if op == "flush":
            return manager.flush(target)
        return getattr(manager, op)(target)

    def _done(self, count):
        if isinstance(count, dict):
            return _reply(True, **count)
        if isinstance(count, bool) or not isinstance(count, int):
            count = 0 if count is None else int(count)
        return _reply(True, count=count)

    def _failed(self, failure, op, target):
        if failure.check(KeyError):
            return _reply(False, error="no such message", code="not_found")
        self.log.failure("control request {op} {target} failed", failure,
                         op=op, target=target)
        return _reply(False, error="request failed: " + failure.getErrorMessage()[:200],
                      code="failed")

    def _answer(self, data):
        if self.transport is not None and self.transport.connected:
            self.transport.write(data + b"\n")


class ControlServer(Factory):
    """The factory of the control socket, over an ``IQueueControl`` manager."""

    protocol = ControlProtocol

    def __init__(self, manager, reactor=None, timeout=300, max_connections=16, stats=None):
        if reactor is None:
            from twisted.internet import reactor
        self.manager = manager
        # () -> {"check:outcome": count}: what ``stats`` answers.
        self.stats = stats
        self.reactor = reactor
        self.timeout = timeout
        self.max_connections = max_connections
        self.connections = 0


def send_command(path, op, target=None, timeout=60.0) -> dict:
    """Send one request to the control socket at ``path``; the decoded answer.

    Blocking (for the admin command). ControlUnavailable when no appliance
    listens there; ControlError for any other trouble.
    """
    if op not in OPS:
        raise ValueError("unknown op: " + repr(op))
    if not os.path.lexists(path):
        raise ControlUnavailable(f"nothing listens on {path}")
    address = path
    if len(os.fsencode(address)) >= _MAX_SUN_PATH:
        # A deep data_dir: the appliance put the socket elsewhere and left
        # a symbolic link here (see appliance.py).
        address = os.path.realpath(path)
    request = json.dumps({"op": op, "target": target}, ensure_ascii=True).encode() + b"\n"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        try:
            sock.connect(address)
        except (FileNotFoundError, ConnectionRefusedError, NotADirectoryError) as e:
            raise ControlUnavailable(f"nothing listens on {path}") from e
        except OSError as e:
            raise ControlError(f"cannot use {path}: {e.strerror or e}") from e
        try:
            sock.sendall(request)
            answer = b""
            while not answer.endswith(b"\n"):
                chunk = sock.recv(4096)
                if not chunk:
                    break
                answer += chunk
                if len(answer) > 65536:
                    raise ControlError("answer too long")
        except OSError as e:
            raise ControlError(f"control socket {path}: {e.strerror or e}") from e
    finally:
        sock.close()
    try:
        reply = json.loads(answer)
    except ValueError:
        reply = None
    if not isinstance(reply, dict) or "ok" not in reply:
        raise ControlError("the appliance gave no answer" if not answer
                           else "the appliance's answer is not understood")
    return reply
