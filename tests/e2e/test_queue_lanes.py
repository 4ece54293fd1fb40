"""End-to-end: a thousand deferred messages do not hold up new mail.

Fresh mail and retries have their own lanes in the queue manager. Here the
real process holds 1,000 messages for a dead domain and is made to retry
them all at once, each retry stuck on a DNS query that is never answered;
a new local message and a new remote one still go through within seconds.
Without the lanes they would wait behind the backlog (1,000 attempts of
the DNS timeout each, a few dozen at a time: about a minute).

The setting (DNS on loopback, the appliance on 127.0.0.2, a sink on
127.0.0.5) is ``test_outbound``'s.
"""

import json
import os
import re
import smtplib

from twisted.internet import defer, threads

from tests.e2e.test_outbound import DOWN, LOCAL, SINK, OutboundCase
from tests.sink_helpers import start_sink

BACKLOG = 1000
CONNECTIONS = 4
MSG = "From: <batch@client.test>\r\nTo: <{to}>\r\nSubject: {subject}\r\n\r\nhello\r\n"


class LaneTests(OutboundCase):
    """The fresh lane stays free while the retry lane is full."""

    timeout = 300

    def send(self, rcpts, subject):
        """One message into the MX port from 127.0.0.1 (in relay_networks)."""
        def run():
            with smtplib.SMTP(LOCAL, self.port, timeout=60) as s:
                s.sendmail("batch@client.test", rcpts, MSG.format(to=rcpts[0], subject=subject))
        return threads.deferToThread(run)

    def inject(self, first, count):
        """``count`` messages to the dead domain over one connection."""
        def run():
            with smtplib.SMTP(LOCAL, self.port, timeout=60) as s:
                s.ehlo("relay.client.test")
                for n in range(first, first + count):
                    to = f"user{n}@dead.test"
                    s.sendmail("batch@client.test", [to],
                               MSG.format(to=to, subject=f"backlog {n}"))
        return threads.deferToThread(run)

    def status_records(self):
        active = os.path.join(self.local.data_dir, "queue", "active")
        return sum(1 for n in os.listdir(active) if n.endswith(".status"))

    @defer.inlineCallbacks
    def test_fresh_mail_passes_a_thousand_deferred_messages(self):
        # dead.test's only MX host refuses connections: the first attempt
        # marks the destination dead and the others are deferred at once.
        self.dns.set("dead.test", "MX", [(10, "mx.dead.test")])
        self.dns.set("mx.dead.test", "A", [DOWN])
        local = yield self.start_local(server_extra='relay_networks = ["127.0.0.1/32"]')
        sink = yield start_sink(self, SINK, port=self.port)
        share = BACKLOG // CONNECTIONS
        yield defer.gatherResults([self.inject(i * share, share) for i in range(CONNECTIONS)])
        yield self.until(lambda: self.status_records() == BACKLOG,
                         "every message deferred once", timeout=120)
        self.assertEqual(len(local.queue_ids()), BACKLOG)

        # Now every retry of the backlog hangs on DNS until the resolver's
        # timeout; the administrator asks for all of them at once.
        self.dns.silent.add("dead.test")
        asked = len(self.dns.queries)
        r = yield self.queue("flush")
        self.assertEqual((r.returncode, r.stdout),
                         (0, f"{BACKLOG} message(s) scheduled for delivery now\n"), r.stderr)
        yield self.until(lambda: ("dead.test", "MX") in self.dns.queries[asked:],
                         "the retries to start")

        # New mail, local and remote, is delivered at once all the same.
        yield self.send(["bob@example.test"], "fresh local")
        yield self.send(["friend@sink.test"], "fresh remote")
        yield self.until(lambda: len(local.messages("bob")) == 1, "the local delivery",
                         timeout=10)
        yield self.until(lambda: len(sink.delivered) == 1, "the remote delivery", timeout=10)
        self.assertIn(b"Subject: fresh local", local.messages("bob")[0])
        self.assertIn(b"Subject: fresh remote", sink.delivered[0].data)
        # ... while the whole backlog still waits.
        self.assertEqual(len(local.queue_ids()), BACKLOG)

        # The admin command copes with the backlog.
        listing = yield self.queue("list")
        self.assertEqual(listing.returncode, 0, listing.stderr)
        self.assertRegex(listing.stdout, rf"\n-- \d+ Kbytes in {BACKLOG} message\(s\)\n$")
        self.assertEqual(len(re.findall(r"user\d+@dead\.test  \[deferred\]", listing.stdout)),
                         BACKLOG)
        listing = yield self.queue("list", "--json")
        self.assertEqual(listing.returncode, 0, listing.stderr)
        documents = json.loads(listing.stdout)
        self.assertEqual(sorted(d["recipients"][0]["address"] for d in documents),
                         sorted(f"user{n}@dead.test" for n in range(BACKLOG)))
        self.assertEqual({d["sender"] for d in documents}, {"batch@client.test"})
        self.assertNotIn("Traceback", local.log())
