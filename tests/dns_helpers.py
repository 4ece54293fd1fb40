"""A real DNS server for tests: twisted.names on a loopback port, zones as Python data.

    dns = yield start_fake_dns(self, {
        "example.test": {"MX": [(10, "mx1.example.test"), (20, "mx2.example.test")]},
        "mx1.example.test": {"A": ["127.0.0.2"], "AAAA": ["::1"]},
        "nomail.test": {"MX": [(0, ".")]},                  # RFC 7505 null MX
        "txt.test": {"TXT": ["v=spf1 -all"]},
        "alias.test": {"CNAME": "example.test"},
    }, servfail={"broken.test"}, silent={("slow.test", "MX")})
    config: [dns] servers = [dns.server]       # "127.0.0.1:PORT"

A name present in the data with no record of the asked type answers NOERROR
with no records (NODATA); a name absent answers NXDOMAIN. ``servfail`` and
``silent`` hold names, or (name, type) pairs, that answer SERVFAIL or nothing
at all (the client times out). Everything can be changed while running
(``set``, ``remove``, the two sets), and ``queries`` lists every question
asked as (name, type) - e.g. to check that no lookup happened.

``held`` holds names, or (name, type) pairs, whose answers wait until
``release()`` (a delay under the test's control, no timing); ``delays`` maps
names or pairs to seconds to wait on the server's reactor before answering.

UDP and TCP listen on the same port, as resolvers expect.
"""

from __future__ import annotations

from twisted.internet import defer, error
from twisted.names import dns, server

TTL = 60
_TYPES = {"A": dns.A, "AAAA": dns.AAAA, "MX": dns.MX, "TXT": dns.TXT, "CNAME": dns.CNAME,
          "PTR": dns.PTR, "NS": dns.NS}
_NAMES = {v: k for k, v in _TYPES.items()}


def _norm(name) -> str:
    if isinstance(name, bytes):
        name = name.decode("ascii", "replace")
    return name.lower().rstrip(".")


def _record(rtype: str, value):
    """A twisted.names record of ``rtype`` from its Python form."""
    if rtype == "A":
        return dns.Record_A(value, ttl=TTL)
    if rtype == "AAAA":
        return dns.Record_AAAA(value, ttl=TTL)
    if rtype == "MX":
        pref, host = value
        # "." is the root: the null MX of RFC 7505.
        return dns.Record_MX(pref, b"" if host in (".", "") else host.encode(), ttl=TTL)
    if rtype == "TXT":
        strings = [value] if isinstance(value, (str, bytes)) else list(value)
        parts = []
        for s in strings:
            b = s.encode() if isinstance(s, str) else s
            parts += [b[i:i + 255] for i in range(0, len(b), 255)] or [b""]
        return dns.Record_TXT(*parts, ttl=TTL)
    if rtype in ("CNAME", "PTR", "NS"):
        cls = {"CNAME": dns.Record_CNAME, "PTR": dns.Record_PTR, "NS": dns.Record_NS}[rtype]
        return cls(value.encode(), ttl=TTL)
    raise ValueError(f"unsupported record type {rtype}")


class FakeDNS:
    """Zone data and scripted failures, answered by a real DNS server."""

    def __init__(self, records=None, servfail=(), silent=(), held=(), delays=None):
        self.records = {}
        for name, types in (records or {}).items():
            for rtype, values in types.items():
                self.set(name, rtype, values)
        self.servfail = set(servfail)
        self.silent = set(silent)
        # Octets of a TCP answer before it is cut and marked truncated (a
        # broken server may cut those too).
        self.tcp_max_size = 65535
        self.held = set(held)
        self.delays = dict(delays or {})
        self._holding = []          # (name, type, send) of held answers
        self._reactor = None
        self._delayed = []
        self.queries = []
        self.server = ""            # "127.0.0.1:PORT" once started
        self.port = None
        self._ports = []

    def set(self, name, rtype, values):
        """Replace the ``rtype`` records of ``name`` (a CNAME is one target, not a list)."""
        if rtype == "CNAME":
            values = [values]
        self.records.setdefault(_norm(name), {})[rtype.upper()] = list(values)

    def remove(self, name):
        """Make ``name`` not exist (NXDOMAIN)."""
        self.records.pop(_norm(name), None)

    def release(self, which=None):
        """Send the held answers (of one name or (name, type), or all); how many."""
        keep, sent = [], 0
        for name, rtype, send in self._holding:
            if which is None or which == name or which == (name, rtype):
                send()
                sent += 1
            else:
                keep.append((name, rtype, send))
        self._holding = keep
        return sent

    def _send(self, name, rtype, send):
        """Answer now, later (``delays``) or when released (``held``)."""
        if self._failing(self.held, name, rtype):
            self._holding.append((name, rtype, send))
            return
        delay = self.delays.get((name, rtype), self.delays.get(name))
        if delay:
            self._delayed = [c for c in self._delayed if c.active()]
            self._delayed.append(self._reactor.callLater(delay, send))
        else:
            send()

    def _failing(self, kind, name, rtype):
        return name in kind or (name, rtype) in kind

    def answer(self, name: str, rtype: str):
        """("ok", answers) / ("nxdomain", []) / ("servfail", []) / ("silent", [])."""
        self.queries.append((name, rtype))
        if self._failing(self.silent, name, rtype):
            return "silent", []
        if self._failing(self.servfail, name, rtype):
            return "servfail", []
        answers = []
        for _ in range(8):
            data = self.records.get(name)
            if data is None:
                return ("nxdomain", []) if not answers else ("ok", answers)
            if rtype != "CNAME" and "CNAME" in data:
                target = data["CNAME"][0]
                answers.append(dns.RRHeader(name, dns.CNAME, dns.IN, TTL,
                                            _record("CNAME", target), auth=True))
                name = _norm(target)
                continue
            for value in data.get(rtype, []):
                answers.append(dns.RRHeader(name, _TYPES[rtype], dns.IN, TTL,
                                            _record(rtype, value), auth=True))
            return "ok", answers
        return "ok", answers

    @defer.inlineCallbacks
    def start(self, reactor=None):
        """Listen on 127.0.0.1 (UDP and TCP, one port); fires with "127.0.0.1:PORT"."""
        if reactor is None:
            from twisted.internet import reactor
        self._reactor = reactor
        factory = self._factory = _Factory(self)
        for _ in range(50):
            tcp = reactor.listenTCP(0, factory, interface="127.0.0.1")
            port = tcp.getHost().port
            try:
                udp = reactor.listenUDP(port, dns.DNSDatagramProtocol(factory),
                                        interface="127.0.0.1")
            except error.CannotListenError:
                yield tcp.stopListening()
                continue
            self._ports = [tcp, udp]
            self.port = port
            self.server = f"127.0.0.1:{port}"
            return self.server
        raise RuntimeError("no free port for the fake DNS server")

    def stop(self):
        # Delayed answers still on the clock are dropped with the server.
        self._holding = []
        if self._reactor is not None:
            for call in list(self._delayed):
                if call.active():
                    call.cancel()
        ports, self._ports = self._ports, []
        stopped = defer.gatherResults([defer.maybeDeferred(p.stopListening) for p in ports])
        # TCP connections a resolver keeps open (it reuses them) are closed
        # too, and both ends given the time to see it.
        factory = getattr(self, "_factory", None)
        if factory is None or not factory.connections:
            return stopped
        for protocol in list(factory.connections):
            protocol.transport.loseConnection()
        from twisted.internet import task

        @defer.inlineCallbacks
        def closed(_):
            for _ in range(200):
                if not factory.connections:
                    break
                yield task.deferLater(self._reactor, 0.01, lambda: None)
            yield task.deferLater(self._reactor, 0.01, lambda: None)
        return stopped.addCallback(closed)


class _Factory(server.DNSServerFactory):
    """Answers every query from the FakeDNS data (no recursion, no logging of errors)."""

    noisy = False

    def __init__(self, fake):
        super().__init__()
        self.fake = fake

    def handleQuery(self, message, protocol, address):
        query = message.queries[0]
        rtype = _NAMES.get(query.type, str(query.type))
        outcome, answers = self.fake.answer(_norm(query.name.name), rtype)
        if outcome == "silent":
            return
        rcode = {"ok": dns.OK, "nxdomain": dns.ENAME, "servfail": dns.ESERVER}[outcome]
        # As a real server: a UDP answer over 512 octets is cut and marked
        # truncated (the client asks again over TCP), a TCP one is whole.
        response = dns.Message(id=message.id, answer=1, opCode=message.opCode,
                               recDes=message.recDes, recAv=1, auth=1, rCode=rcode,
                               maxSize=self.fake.tcp_max_size if address is None else 512)
        response.queries = message.queries
        response.answers = answers
        def send():
            if address is None:
                protocol.writeMessage(response)         # TCP
            else:
                protocol.writeMessage(response, address)
        self.fake._send(_norm(query.name.name), rtype, send)


@defer.inlineCallbacks
def start_fake_dns(testcase, records=None, servfail=(), silent=(), held=(), delays=None):
    """Start a FakeDNS for ``testcase`` (stopped at cleanup); fires with it."""
    fake = FakeDNS(records, servfail=servfail, silent=silent, held=held, delays=delays)
    yield fake.start()
    testcase.addCleanup(fake.stop)
    return fake
