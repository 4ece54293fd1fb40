"""Connection control at the door: rate and concurrency per client, greet pause, bad RCPTs.

Postfix's anvil limits (``smtpd_client_connection_rate_limit``,
``smtpd_client_connection_count_limit``), its ``postscreen_greet_wait`` and
sendmail's ``BadRcptThrottle`` as four policy checks:

- ``ratecontrol``: new connections of one client per ``rate_window``;
- ``conncontrol``: simultaneous connections of one client;
- ``greetpause``: the banner held for ``greet_pause`` seconds; a client that
  talks before it is refused by the receiver (554 5.5.0);
- ``bad_rcpt``: after ``bad_rcpt_throttle`` refused recipients in one session
  each further RCPT waits a second, after ``bad_rcpt_limit`` the session ends;
- ``msgrate``: messages (MAIL commands) of one client per ``rate_window``
  (anvil's message rate): past ``max_message_rate``, 450 4.7.1.

A client is its IP address, an IPv6 client its /64: one host can have a
whole /64 to itself, and counting its addresses one by one would give it
2**64 allowances. Clients in relay_networks are exempt from all of them; the
two limits do not look at the listener, so the same objects can guard the
submission ports (counts shared with the MX), the others only act on the MX.
Per-session state is keyed by the session object's id and dropped at the
"disconnect" notification of the receiver.
"""

from __future__ import annotations

import collections
import ipaddress

from twisted.internet import defer
from zope.interface import implementer

from mailbox_appliance.config import parse_duration
from mailbox_appliance.interfaces import IPolicyCheck
from mailbox_appliance.antispam.verdicts import note, refuse

# Clients whose connection rate is remembered at once; past this the ones
# seen longest ago are forgotten (a flood of spoofed-looking sources must not
# grow memory without end).
MAX_RATE_CLIENTS = 100000
# sendmail's BadRcptThrottle pause, seconds.
BAD_RCPT_DELAY = 1.0


def client_key(ip: str) -> str:
    """The unit a client is counted in: its IPv4 address, or its IPv6 /64.

    ``::ffff:192.0.2.1`` (an IPv4 client on an IPv6 socket) is its IPv4
    address; what is not an IP address (a UNIX socket) counts as itself.
    """
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return ip
    if addr.version == 4:
        return str(addr)
    if addr.ipv4_mapped:
        return str(addr.ipv4_mapped)
    prefix = ipaddress.IPv6Address(int(addr) & ~((1 << 64) - 1))
    return f"{prefix}/64"


def _exempt(session) -> bool:
    return session.trusted


def _delay(reactor, seconds):
    """(Deferred firing None after ``seconds``, its DelayedCall)."""
    d = defer.Deferred(lambda _: call.cancel() if call.active() else None)
    call = reactor.callLater(seconds, d.callback, None)
    return d, call


class _RateWindows:
    """Events per client in fixed windows of time, in a bounded table.

    A window starts with a client's first event and lasts ``window``
    seconds. The table is ordered by window start, so expired entries are
    dropped from its front, and it never holds more than ``max_clients``.
    """

    def __init__(self, reactor, limit, window, max_clients=MAX_RATE_CLIENTS):
        self.reactor = reactor
        self.limit = limit
        self.window = window
        self.max_clients = max_clients
        self._windows = collections.OrderedDict()      # key -> [start, count]

    def _expire(self, now):
        horizon = now - self.window
        table = self._windows
        while table:
            key, (start, _) = next(iter(table.items()))
            if start > horizon:
                break
            del table[key]

    def __len__(self):
        return len(self._windows)

    def over_limit(self, ip) -> bool:
        """Count one event of ``ip``; True once its window holds more than ``limit``."""
        now = self.reactor.seconds()
        self._expire(now)
        key = client_key(ip)
        entry = self._windows.get(key)
        if entry is None:
            while len(self._windows) >= self.max_clients:
                self._windows.popitem(last=False)
            entry = self._windows[key] = [now, 0]
        entry[1] += 1
        return entry[1] > self.limit


@implementer(IPolicyCheck)
class ConnectionRate(_RateWindows):
    """New connections per client in a window of time (anvil's connection rate).

    Past ``limit`` connections in a window the client gets 421 until the
    window is over. Refused attempts count too: a client hammering the port
    stays refused.
    """

    name = "ratecontrol"
    stages = frozenset({"connect"})

    def check(self, stage, session, argument):
        if _exempt(session):
            return None
        if self.over_limit(session.client_ip):
            return refuse(self.name, session, 421, "4.7.0",
                          f"Error: too many connections from {session.client_ip}")
        return None


@implementer(IPolicyCheck)
class MessageRate(_RateWindows):
    """Messages per client in a window of time (anvil's message rate).

    Counted at MAIL: past ``limit`` in a window, MAIL gets 450 4.7.1 until
    the window is over (the client may keep its connection and try later).
    Only on the MX: an authenticated user's mail is not a stranger's flood.
    """

    name = "msgrate"
    stages = frozenset({"mail"})

    def check(self, stage, session, argument):
        if session.may_relay or session.listener != "smtp":
            return None
        if self.over_limit(session.client_ip):
            return refuse(self.name, session, 450, "4.7.1",
                          f"Error: too much mail from {session.client_ip}")
        return None


@implementer(IPolicyCheck)
class ConnectionCount:
    """Simultaneous connections per client (anvil's connection count).

    Counted at connect, released at the receiver's "disconnect"
    notification. A refused connection is not counted (it ends at once), and
    a disconnect of a session never counted is a no-op, so a connection
    refused by an earlier check is released correctly too. The table holds
    only clients with open connections.
    """

    name = "conncontrol"
    stages = frozenset({"connect", "disconnect"})

    def __init__(self, limit):
        self.limit = limit
        self._counts = {}           # key -> open connections
        self._sessions = {}         # id(session) -> (session, key)

    def open_connections(self, ip) -> int:
        return self._counts.get(client_key(ip), 0)

    def check(self, stage, session, argument):
        if stage == "disconnect":
            return self._release(session)
        if _exempt(session) or id(session) in self._sessions:
            return None
        key = client_key(session.client_ip)
        count = self._counts.get(key, 0)
        if count >= self.limit:
            return refuse(self.name, session, 421, "4.7.0",
                          f"Error: too many connections from {session.client_ip}")
        self._counts[key] = count + 1
        # The session itself is kept so its id cannot be reused while counted.
        self._sessions[id(session)] = (session, key)
        return None

    def _release(self, session):
        held = self._sessions.pop(id(session), None)
        if held is None:
            return None
        key = held[1]
        left = self._counts[key] - 1
        if left:
            self._counts[key] = left
        else:
            del self._counts[key]
        return None


@implementer(IPolicyCheck)
class GreetPause:
    """Hold the banner ``seconds`` (Postfix's postscreen_greet_wait, sendmail's greet_pause).

    Answers the connect stage with a Deferred firing after the pause; the
    receiver then refuses a client that sent anything meanwhile (554 5.5.0,
    spam bots do not wait for the banner). Only on the MX port: some MUAs
    talk first on the submission ports. The timer of a client that leaves
    is cancelled.
    """

    name = "greetpause"
    stages = frozenset({"connect", "disconnect"})

    def __init__(self, reactor, seconds):
        self.reactor = reactor
        self.seconds = seconds
        self._pending = {}          # id(session) -> DelayedCall

    def check(self, stage, session, argument):
        if stage == "disconnect":
            call = self._pending.pop(id(session), None)
            if call is not None and call.active():
                call.cancel()
            return None
        if _exempt(session) or session.listener != "smtp":
            return None
        d, call = _delay(self.reactor, self.seconds)
        self._pending[id(session)] = call

        def over(_):
            self._pending.pop(id(session), None)
            return None
        return d.addCallback(over)


@implementer(IPolicyCheck)
class BadRecipientThrottle:
    """Slow down, then end, a session that tries many unknown recipients.

    The receiver reports every RCPT answered 5xx ("rcpt_refused"). Once a
    session has ``throttle`` of them, each further RCPT is answered only
    after ``delay`` seconds (a dictionary attack gets slow); once it has
    ``limit``, the next RCPT ends the session with 421 4.7.0. Authenticated
    and trusted clients are exempt.
    """

    name = "bad_rcpt"
    stages = frozenset({"rcpt", "rcpt_refused", "disconnect"})

    def __init__(self, reactor, throttle, limit, delay=BAD_RCPT_DELAY):
        self.reactor = reactor
        self.throttle = throttle
        self.limit = limit
        self.delay = delay
        self._bad = {}              # id(session) -> refused RCPTs so far
        self._pending = {}          # id(session) -> DelayedCall

    def refused(self, session) -> int:
        return self._bad.get(id(session), 0)

    def check(self, stage, session, argument):
        sid = id(session)
        if stage == "disconnect":
            self._bad.pop(sid, None)
            call = self._pending.pop(sid, None)
            if call is not None and call.active():
                call.cancel()
            return None
        if session.may_relay:
            return None
        if stage == "rcpt_refused":
            self._bad[sid] = self._bad.get(sid, 0) + 1
            return None
        bad = self._bad.get(sid, 0)
        if bad >= self.limit:
            return refuse(self.name, session, 421, "4.7.0", "Error: too many bad recipients")
        if bad < self.throttle:
            return None
        note(self.name, "delay")
        d, self._pending[sid] = _delay(self.reactor, self.delay)

        def over(_):
            self._pending.pop(sid, None)
            return None
        return d.addCallback(over)


def checks(config, reactor, resolver, state=None):
    """The connection checks ``[antispam.connection]`` enables, in their order.

    Rate and count come first (cheapest, and the only ones for the
    submission ports); the greet pause only when ``greet_pause`` > 0.
    """
    c = config.antispam.connection
    window = parse_duration(c.rate_window)
    out = [ConnectionRate(reactor, c.max_connection_rate, window),
           ConnectionCount(c.max_connections_per_ip),
           MessageRate(reactor, c.max_message_rate, window)]
    pause = parse_duration(c.greet_pause)
    if pause > 0:
        out.append(GreetPause(reactor, pause))
    out.append(BadRecipientThrottle(reactor, c.bad_rcpt_throttle, c.bad_rcpt_limit))
    return out
