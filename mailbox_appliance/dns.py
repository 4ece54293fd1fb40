"""The DNS resolver the appliance uses: twisted.names, built from ``[dns]``.

Lookups never block the reactor. ``[dns] servers`` lists the name servers to
ask ("127.0.0.1:5353", "[::1]:53", or a bare address for port 53); empty means
the name servers of the system's ``/etc/resolv.conf``, read once at start-up
(twisted.names would re-read it on a timer forever, a timer nothing could
stop). Only DNS is asked, not ``/etc/hosts`` (as Postfix's
``smtp_host_lookup = dns``): mail routing follows MX records, and the hosts
file would be read from disk on the reactor thread at every lookup.
``[dns] timeout`` bounds one lookup, its retries included.
"""

from __future__ import annotations

import ipaddress

from twisted.names import client

RESOLV_CONF = "/etc/resolv.conf"


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
    return client.Resolver(servers=servers, timeout=timeout, reactor=reactor)
