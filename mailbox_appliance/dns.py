"""The DNS resolver the appliance uses: twisted.names, built from ``[dns]``.

Lookups never block the reactor. ``[dns] servers`` lists the name servers to
ask ("127.0.0.1:5353", "[::1]:53", or a bare address for port 53); empty means
the name servers of the system's ``/etc/resolv.conf``, read once at start-up
(twisted.names would re-read it on a timer forever, a timer nothing could
stop). Only DNS is asked, not ``/etc/hosts`` (as Postfix's
``smtp_host_lookup = dns``): mail routing follows MX records, and the hosts
file would be read from disk on the reactor thread at every lookup.
``[dns] timeout`` bounds one lookup, its retries included.

:class:`CachingResolver` keeps answers in memory for their TTL, so that a
stream of mail to the same domains does not ask the same three questions
(MX, A, AAAA) for every message.
"""

from __future__ import annotations

import collections
import ipaddress

from twisted.internet import defer
from twisted.internet.interfaces import IResolver
from twisted.names import client, common, dns
from twisted.names.error import DNSNameError
from zope.interface import implementer

RESOLV_CONF = "/etc/resolv.conf"

# twisted.names opens a fresh UDP port per query (a random source port);
# its "starting on"/"stopping" lines would be two log lines per lookup.
dns.DNSDatagramProtocol.noisy = False


def parse_server(text: str) -> tuple[str, int]:
    """``"host:port"``, ``"[v6]:port"``, a bare IPv4/IPv6 address (port 53).

    The host must be an IP address: a name server cannot be found by name
    before there is a name server. Raises ValueError otherwise.
    """
    text = text.strip()
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep:
            raise ValueError(text)
        port = int(rest[1:]) if rest.startswith(":") else 53
        if rest and not rest.startswith(":"):
            raise ValueError(text)
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
        port = int(port_text)
    else:
        # A bare IPv4 address, or a bare IPv6 address (several colons).
        host, port = text, 53
    ipaddress.ip_address(host)
    if not 0 < port <= 65535:
        raise ValueError(text)
    return host, port


def retry_timeouts(total: int) -> tuple:
    """Split one lookup's time budget into the resolver's retry intervals.

    twisted.names re-sends a query after each interval (rotating through the
    servers) and gives up after the last; the intervals grow, as in its own
    default (1, 3, 11, 45), and add up to ``total`` seconds.
    """
    total = max(1, total)
    if total < 4:
        return (total,)
    first = max(1, total // 10)
    second = max(1, (total * 3) // 10)
    return (first, second, total - first - second)


def system_servers(path=RESOLV_CONF) -> list:
    """The ``nameserver`` entries of resolv.conf; 127.0.0.1 when it names none
    (the resolver library's own default)."""
    servers = []
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = f.readlines()
    except OSError:
        lines = []
    for line in lines:
        words = line.split()
        if len(words) >= 2 and words[0] == "nameserver":
            host = words[1].split("%", 1)[0]       # fe80::1%eth0: no scope ids
            try:
                ipaddress.ip_address(host)
            except ValueError:
                continue
            servers.append((host, 53))
    return servers or [("127.0.0.1", 53)]


def make_resolver(reactor, config, resolv_conf=RESOLV_CONF):
    """A twisted.names IResolver for ``config.dns``."""
    servers = []
    for text in config.dns.servers:
        try:
            servers.append(parse_server(text))
        except ValueError:
            raise ValueError(f"[dns] servers: expected \"address:port\" entries with an IP "
                             f"address, got {text!r}") from None
    if not servers:
        servers = system_servers(resolv_conf)
    # Each interval is spent once per server, so the budget is shared.
    timeout = retry_timeouts(config.dns.timeout // len(servers))
    return BoundedResolver(servers=servers, timeout=timeout, reactor=reactor,
                           tcp_timeout=config.dns.timeout)


class BoundedResolver(client.Resolver):
    """twisted.names' resolver, with its TCP fallback bounded.

    A UDP answer marked truncated (a DKIM key of 4096 bits, a long SPF
    record) is asked again over TCP. twisted.names does that with its own
    10-second default, and asks again over TCP whenever the TCP answer is
    marked truncated too: a broken or hostile server could keep a lookup
    going for ever. Here the TCP query gets the configured deadline, and a
    TCP answer is taken as it is.
    """

    def __init__(self, *args, tcp_timeout=10, **kwargs):
        super().__init__(*args, **kwargs)
        self.tcp_timeout = tcp_timeout

    def queryTCP(self, queries, timeout=None):
        d = super().queryTCP(queries, self.tcp_timeout if timeout is None else timeout)

        def whole(message):
            message.trunc = 0
            return message
        return d.addCallback(whole)


# Answers are kept at most this long whatever their TTL, and "no such name" or
# "no such record" (RFC 2308 negative answers) at most NEGATIVE_MAX_TTL: a
# zone that is being fixed should not wait hours for us to notice.
MAX_TTL = 3600
NEGATIVE_MAX_TTL = 300
MAX_ENTRIES = 10000


def _negative_ttl(authority) -> int:
    """RFC 2308 5: a negative answer lives min(SOA TTL, SOA MINIMUM); 0 without SOA."""
    for rr in authority:
        if rr.type == dns.SOA:
            return max(0, min(rr.ttl, rr.payload.minimum, NEGATIVE_MAX_TTL))
    return 0


@implementer(IResolver)
class CachingResolver(common.ResolverBase):
    """An IResolver that answers repeated questions from memory.

    Each question (name, class, type) sent to ``resolver`` is remembered
    with its answer for the smallest TTL of the answer records (at most
    ``MAX_TTL``); an empty answer (NODATA) and NXDOMAIN for the negative TTL
    of the zone's SOA record (RFC 2308, at most ``NEGATIVE_MAX_TTL``), and
    not at all without one. Every other failure (SERVFAIL, refusals,
    timeouts) is never kept: the next question asks again. At most
    ``max_entries`` answers are kept, the least recently used dropped first.
    Expired entries are dropped when next asked for, so there are no timers.
    Answers from memory carry the TTLs left, as a caching server's would.
    """

    def __init__(self, resolver, reactor, max_entries=MAX_ENTRIES):
        super().__init__()
        self.resolver = resolver
        self.reactor = reactor
        self.max_entries = max_entries
        # (name, class, type) -> (expiry time, time stored, answer tuple or
        # DNSNameError); in order of last use.
        self._entries = collections.OrderedDict()

    def __len__(self):
        return len(self._entries)

    def clear(self):
        """Forget every answer."""
        self._entries.clear()

    def forget(self, domain):
        """Forget the answers about ``domain`` and the names under it."""
        try:
            name = dns.domainString(domain).lower().rstrip(b".")
        except UnicodeError:
            return          # not a name that could have been asked about
        suffix = b"." + name
        for key in [k for k in self._entries if k[0] == name or k[0].endswith(suffix)]:
            del self._entries[key]

    def _lookup(self, name, cls, type, timeout):
        key = (name.lower().rstrip(b"."), cls, type)
        entry = self._entries.get(key)
        if entry is not None:
            expires, stored, answer = entry
            now = self.reactor.seconds()
            if now < expires:
                self._entries.move_to_end(key)
                if isinstance(answer, DNSNameError):
                    # A fresh exception per hit: a stored one would collect
                    # the frames of every caller that re-raised it.
                    return defer.fail(DNSNameError(*answer.args))
                return defer.succeed(_aged(answer, int(now - stored)))
            del self._entries[key]
        method = getattr(self.resolver, common.typeToMethod.get(type, ""), None)
        if method is None:
            return self.resolver.query(dns.Query(name, type, cls), timeout)
        d = method(name) if timeout is None else method(name, timeout)
        return d.addCallbacks(self._answered, self._failed, callbackArgs=(key,),
                              errbackArgs=(key,))

    def _answered(self, result, key):
        answers, authority, _additional = result
        if answers:
            ttl = min(MAX_TTL, min(rr.ttl for rr in answers))
        else:
            ttl = _negative_ttl(authority)
        self._store(key, ttl, result)
        return result

    def _failed(self, failure, key):
        if failure.check(DNSNameError):
            message = failure.value.args[0] if failure.value.args else None
            ttl = _negative_ttl(getattr(message, "authority", ()))
            self._store(key, ttl, failure.value)
        return failure

    def _store(self, key, ttl, answer):
        if ttl <= 0 or self.max_entries <= 0:
            return
        now = self.reactor.seconds()
        self._entries.pop(key, None)
        while len(self._entries) >= self.max_entries:
            self._entries.popitem(last=False)
        self._entries[key] = (now + ttl, now, answer)


def _aged(result, elapsed):
    """``result`` with every record's TTL lowered by ``elapsed`` seconds."""
    if elapsed <= 0:
        return result
    return tuple([dns.RRHeader(rr.name.name, rr.type, rr.cls, max(0, rr.ttl - elapsed),
                               rr.payload, rr.auth) for rr in section]
                 for section in result)
