"""A tiny authoritative DNS server for the door-checks benchmark.

    python bench/checks_dns.py --port-file FILE [--domain bench.test]
        [--mx-address 192.0.2.10] [--client 127.0.0.1] [--zones bl1.test,bl2.test]
        [--negative-ttl 60] [--stats-file FILE]

Serves what the checks of ``bench/accept_checks.sh`` ask about a client
``--client`` sending as ``someone@--domain``:

- the sender's domain: MX 10 ``mx.<domain>``, whose A record is
  ``--mx-address`` (by default in TEST-NET-1, so that the sender-MX check does
  not count it as a bad MX the way it would a loopback one), an A record of
  the domain itself (the same address), no AAAA, and the SPF policy
  ``v=spf1 ip4:127.0.0.0/8 -all`` in a TXT record (the client passes);
- the block list zones (``--zones``): nothing is listed, every query is
  NXDOMAIN, as for a client no list knows;
- the client's reverse name (``1.0.0.127.in-addr.arpa``): PTR
  ``client.<domain>``, and that name's A record is the client, so a
  forward-confirmed reverse DNS check passes too;
- every other name: NXDOMAIN.

Negative answers (NXDOMAIN, NODATA) carry the zone's SOA in the authority
section, as real zones do, so a resolver may cache them for the SOA's
negative TTL (RFC 2308): ``--negative-ttl`` seconds (0: no SOA, nothing a
resolver could cache). Positive records have a TTL of one hour.

It listens on UDP and TCP on one free loopback port, writes that port into
``--port-file`` once both listen (the starter's readiness signal), and runs
until it gets SIGTERM. With ``--stats-file``, SIGUSR1 writes there the
number of queries answered so far by type ("A 120\nMX 40\n...", atomically).
Built on twisted.names' server factory with a
resolver of our own, so the benchmark needs nothing beyond the appliance's
own dependencies.
"""

import argparse
import collections
import ipaddress
import os
import signal
import sys

from twisted.internet import defer, error, reactor
from twisted.names import common, dns, server

TTL = 3600
SPF_POLICY = b"v=spf1 ip4:127.0.0.0/8 -all"


class NoSuchName(dns.AuthoritativeDomainError):
    """NXDOMAIN from one of our zones; ``soa`` goes in the authority section."""

    def __init__(self, name, soa):
        super().__init__(name)
        self.soa = soa


class ChecksZones(common.ResolverBase):
    """The records of the benchmark's zones, computed from the name asked."""

    def __init__(self, domain, mx_address, client, zones, negative_ttl):
        super().__init__()
        self.domain = domain.lower().rstrip(".")
        self.mx_host = "mx." + self.domain
        self.client_host = "client." + self.domain
        self.mx_address = mx_address
        self.client = client
        self.reverse = ipaddress.ip_address(client).reverse_pointer
        self.negative_ttl = negative_ttl
        # The zones we are authoritative for, longest first (most specific).
        names = [self.domain, "in-addr.arpa"] + [z.lower().rstrip(".") for z in zones]
        self.zones = sorted(set(names), key=len, reverse=True)

    def _soa(self, zone):
        if self.negative_ttl <= 0:
            return None
        return dns.RRHeader(
            zone, dns.SOA, dns.IN, self.negative_ttl,
            dns.Record_SOA(mname="ns." + zone, rname="hostmaster." + zone, serial=1,
                           refresh=3600, retry=600, expire=86400,
                           minimum=self.negative_ttl, ttl=self.negative_ttl),
            auth=True)

    def _zone_of(self, name):
        for zone in self.zones:
            if name == zone or name.endswith("." + zone):
                return zone
        return None

    def _records(self, name):
        """{type: [RRHeader]} for ``name``, or None if the name does not exist."""
        def rr(type_, payload):
            return dns.RRHeader(name, type_, dns.IN, TTL, payload, auth=True)
        if name == self.domain:
            return {dns.MX: [rr(dns.MX, dns.Record_MX(10, self.mx_host, TTL))],
                    dns.A: [rr(dns.A, dns.Record_A(self.mx_address, TTL))],
                    dns.TXT: [rr(dns.TXT, dns.Record_TXT(SPF_POLICY, ttl=TTL))]}
        if name == self.mx_host:
            return {dns.A: [rr(dns.A, dns.Record_A(self.mx_address, TTL))]}
        if name == self.client_host:
            return {dns.A: [rr(dns.A, dns.Record_A(self.client, TTL))]}
        if name == self.reverse:
            return {dns.PTR: [rr(dns.PTR, dns.Record_PTR(self.client_host, TTL))]}
        return None

    def _lookup(self, name, cls, type, timeout):
        name = name.decode("ascii", "replace").lower().rstrip(".")
        zone = self._zone_of(name)
        if zone is None:
            # Not ours: refused-ish (twisted.names answers NXDOMAIN).
            return defer.fail(dns.DomainError(name))
        soa = self._soa(zone)
        records = self._records(name)
        if records is None:
            return defer.fail(NoSuchName(name, soa))
        if type == dns.ALL_RECORDS:
            answers = [r for rs in records.values() for r in rs]
        else:
            answers = records.get(type, [])
        if not answers:
            return defer.succeed(([], [soa] if soa else [], []))
        additional = []
        if type == dns.MX:
            additional = self._records(self.mx_host)[dns.A]
        return defer.succeed((answers, [], additional))


class ChecksServerFactory(server.DNSServerFactory):
    """twisted.names' server, with the zone's SOA in its NXDOMAIN answers.

    ``counts`` holds the queries received by type name.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.counts = collections.Counter()

    def handleQuery(self, message, protocol, address):
        for query in message.queries[:1]:
            self.counts[dns.QUERY_TYPES.get(query.type, str(query.type))] += 1
        return super().handleQuery(message, protocol, address)

    def gotResolverError(self, failure, protocol, message, address):
        if failure.check(NoSuchName) and failure.value.soa is not None:
            response = self._responseFromMessage(
                message=message, rCode=dns.ENAME, authority=[failure.value.soa])
            response.auth = True
            self.sendReply(protocol, response, address)
            return
        return super().gotResolverError(failure, protocol, message, address)


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
    raise SystemExit("checks_dns.py: no free port for both UDP and TCP")


def write_stats(path, counts):
    """The query counts into ``path``, one "TYPE N" a line, replaced atomically."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        for name, n in sorted(counts.items()):
            f.write("%s %d\n" % (name, n))
    os.replace(tmp, path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port-file", required=True)
    parser.add_argument("--domain", default="bench.test")
    parser.add_argument("--mx-address", default="192.0.2.10")
    parser.add_argument("--client", default="127.0.0.1")
    parser.add_argument("--zones", default="bl1.test,bl2.test")
    parser.add_argument("--negative-ttl", type=int, default=60)
    parser.add_argument("--stats-file")
    args = parser.parse_args(argv)
    try:
        ipaddress.IPv4Address(args.mx_address)
        ipaddress.IPv4Address(args.client)
    except ValueError as e:
        parser.error(str(e))
    if not 0 <= args.negative_ttl <= 86400:
        parser.error("--negative-ttl: 0 to 86400")
    zones = [z for z in args.zones.split(",") if z]
    resolver = ChecksZones(args.domain, args.mx_address, args.client, zones,
                           args.negative_ttl)
    factory = ChecksServerFactory(authorities=[resolver])
    # Unanswerable names are NXDOMAIN, not logged failures.
    factory.noisy = False
    if args.stats_file:
        # The file is written by the reactor, not inside the signal handler.
        signal.signal(signal.SIGUSR1, lambda *_: reactor.callFromThread(
            write_stats, args.stats_file, factory.counts))
    port = listen(factory)
    tmp = args.port_file + ".tmp"
    with open(tmp, "w") as f:
        f.write("%d\n" % port)
    os.replace(tmp, args.port_file)
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
