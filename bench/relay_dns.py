"""A tiny authoritative DNS server for the relay benchmark.

    python bench/relay_dns.py --port-file FILE [--domains 200] [--address 127.0.0.1]

Answers for ``d000.bench`` ... ``dNNN.bench``: each domain has one MX record
(preference 10) naming ``mx.dNNN.bench``, whose A record is ``--address``
(AAAA: no data). Every other name under ``bench`` is NXDOMAIN; names outside
it are refused. It listens on UDP and TCP on one free loopback port, writes
that port into ``--port-file`` once both listen (the starter's readiness
signal), and runs until it gets SIGTERM.

Built on twisted.names' server factory with a resolver of our own, so the
benchmark needs nothing beyond the appliance's own dependencies.
"""

import argparse
import os
import sys

from twisted.internet import defer, error, reactor
from twisted.names import common, dns, server

TTL = 3600
ZONE = "bench"


class BenchZone(common.ResolverBase):
    """The records of the benchmark's zone, computed from the name asked."""

    def __init__(self, domains, address):
        super().__init__()
        self.domains = domains
        self.address = address
        self.soa = dns.RRHeader(
            ZONE, dns.SOA, dns.IN, TTL,
            dns.Record_SOA(mname="ns." + ZONE, rname="hostmaster." + ZONE,
                           serial=1, refresh=3600, retry=600, expire=86400,
                           minimum=TTL, ttl=TTL),
            auth=True)

    def _domain_index(self, label):
        """The number of a ``dNNN`` label, or None when not one of ours."""
        if len(label) == 4 and label[0] == "d" and label[1:].isdigit():
            n = int(label[1:])
            if n < self.domains:
                return n
        return None

    def _lookup(self, name, cls, type, timeout):
        name = name.decode("ascii", "replace").lower().rstrip(".")
        labels = name.split(".")
        if labels[-1] != ZONE:
            return defer.fail(dns.DomainError(name))
        nodata = ([], [self.soa], [])
        if name == ZONE:
            return defer.succeed(nodata)
        mx_host = len(labels) == 3 and labels[0] == "mx"
        domain = labels[1] if mx_host else labels[0]
        if len(labels) not in (2, 3) or (len(labels) == 3 and not mx_host) \
                or self._domain_index(domain) is None:
            return defer.fail(dns.AuthoritativeDomainError(name))
        host = "mx.%s.%s" % (domain, ZONE)
        a = dns.RRHeader(host, dns.A, dns.IN, TTL,
                         dns.Record_A(self.address, TTL), auth=True)
        if mx_host:
            return defer.succeed(([a], [], []) if type in (dns.A, dns.ALL_RECORDS) else nodata)
        if type in (dns.MX, dns.ALL_RECORDS):
            mx = dns.RRHeader(name, dns.MX, dns.IN, TTL,
                              dns.Record_MX(10, host, TTL), auth=True)
            return defer.succeed(([mx], [], [a]))
        return defer.succeed(nodata)


def listen(factory, attempts=20):
    """UDP and TCP on one free loopback port; returns the port number."""
    for _ in range(attempts):
        udp = reactor.listenUDP(0, dns.DNSDatagramProtocol(factory), interface="127.0.0.1")
        port = udp.getHost().port
        try:
            reactor.listenTCP(port, factory, interface="127.0.0.1")
        except error.CannotListenError:
            udp.stopListening()
            continue
        return port
    raise SystemExit("relay_dns.py: no free port for both UDP and TCP")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port-file", required=True)
    parser.add_argument("--domains", type=int, default=200)
    parser.add_argument("--address", default="127.0.0.1")
    args = parser.parse_args(argv)
    if not 0 < args.domains <= 10000:
        parser.error("--domains: 1 to 10000")
    factory = server.DNSServerFactory(authorities=[BenchZone(args.domains, args.address)])
    # Unanswerable names are NXDOMAIN, not logged failures.
    factory.noisy = False
    port = listen(factory)
    tmp = args.port_file + ".tmp"
    with open(tmp, "w") as f:
        f.write("%d\n" % port)
    os.replace(tmp, args.port_file)
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
