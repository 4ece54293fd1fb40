"""Greylisting at RCPT: the triplet's life, its grouping and case, the whitelists,
the longer delay of block-listed clients, and a failing store that accepts.

The check runs on a real SQLite state store (its thread answers on the real
reactor) while time is a Clock (``ClockedReactor``): the delays and windows
are advanced, never waited for. Block lists are asked of a DNS server on
loopback (``tests/dns_helpers.py``).
"""

import io
import json
import os
import shutil
import sqlite3
import tempfile
import time

from twisted.internet import defer
from twisted.trial import unittest
from zope.interface import implementer

from mailbox_appliance import cli, state
from mailbox_appliance import config as config_module
from mailbox_appliance import dns
from mailbox_appliance.antispam import greylist
from mailbox_appliance.antispam.greylist import Greylist, client_network, path_text, triplet
from mailbox_appliance.smtp.address import Path
from mailbox_appliance.smtp.session import SessionState
from mailbox_appliance.state import IStateStore, SQLiteStateStore
from tests.dns_helpers import start_fake_dns
from tests.e2e.harness import ANTISPAM_OFF
from tests.sink_helpers import ClockedReactor
from tests.smtp_helpers import ApplianceMixin, RawClient
from tests.test_antispam_dns import settle

DELAY, WINDOW, AUTO, DNSBL_DELAY = 300, 4 * 3600, 36 * 86400, 12 * 3600
ALICE = Path(local="alice", domain="ext.test")
BOB = Path(local="bob", domain="example.test")
CAROL = Path(local="carol", domain="example.test")


def session(ip="192.0.2.1", sender=ALICE, **kw):
    return SessionState(client_ip=ip, sender=sender, **kw)


def reply(verdict):
    return None if verdict is None else verdict.reply


class StoreMixin:

    timeout = 30

    def make_store(self):
        self.dir = tempfile.mkdtemp(prefix="grey-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.reactor = ClockedReactor()
        self.reactor.clock.advance(1_000_000)
        self.store = SQLiteStateStore(os.path.join(self.dir, "state.sqlite3"), self.reactor)
        self.addCleanup(self.store.close)
        return self.store.open()

    def greylist(self, **kw):
        kw.setdefault("delay", DELAY)
        kw.setdefault("retry_window", WINDOW)
        kw.setdefault("auto_whitelist", AUTO)
        return Greylist(self.store, self.reactor, **kw)

    def advance(self, seconds):
        self.reactor.clock.advance(seconds)

    def rcpt(self, check, sess, recipient=BOB):
        return defer.maybeDeferred(check.check, "rcpt", sess, recipient).addCallback(reply)

    def entry(self, ip="192.0.2.1", sender=ALICE, recipient=BOB):
        return self.store.greylist_get(*triplet(ip, sender, recipient))

    def settle_store(self):
        # The store's thread answers in order: a read waits for earlier writes.
        return self.store.greylist_count()


class TripletLifeTests(StoreMixin, unittest.TestCase):

    def setUp(self):
        return self.make_store()

    @defer.inlineCallbacks
    def test_first_sight_then_early_retry_then_pass(self):
        check = self.greylist()
        start = self.reactor.seconds()
        self.assertEqual((yield self.rcpt(check, session())),
                         "451 4.7.1 Greylisted, try again in 300 seconds")
        e = yield self.entry()
        self.assertEqual((e.first_seen, e.attempts, e.passes, e.whitelisted_until),
                         (start, 1, 0, 0))
        self.advance(100)
        self.assertEqual((yield self.rcpt(check, session())),
                         "451 4.7.1 Greylisted, try again in 200 seconds")
        e = yield self.entry()
        # Retrying early does not move the first-seen time.
        self.assertEqual((e.first_seen, e.attempts, e.last_seen), (start, 2, start + 100))
        self.advance(200)
        self.assertIsNone((yield self.rcpt(check, session())))
        e = yield self.entry()
        self.assertEqual((e.passes, e.whitelisted_until), (1, start + 300 + AUTO))

    @defer.inlineCallbacks
    def test_whitelisted_triplet_passes_at_once_and_is_refreshed(self):
        check = self.greylist()
        yield self.rcpt(check, session())
        self.advance(DELAY)
        self.assertIsNone((yield self.rcpt(check, session())))
        self.advance(30 * 86400)
        self.assertIsNone((yield self.rcpt(check, session())))
        e = yield self.entry()
        self.assertEqual((e.passes, e.whitelisted_until), (2, self.reactor.seconds() + AUTO))
        # Still whitelisted 36 days after that refresh (66 after the first pass).
        self.advance(AUTO - 1)
        self.assertIsNone((yield self.rcpt(check, session())))

    @defer.inlineCallbacks
    def test_known_sender_answered_from_memory_then_counted(self):
        check = self.greylist()
        yield self.rcpt(check, session())
        self.advance(DELAY)
        yield self.rcpt(check, session())
        calls = []
        get = self.store.greylist_get
        self.store.greylist_get = lambda *a: calls.append(a) or get(*a)
        for _ in range(5):
            # Synchronous: no store, no thread.
            self.assertIsNone(check.check("rcpt", session(), BOB))
            self.advance(10)
        self.assertEqual(calls, [])
        self.assertEqual((yield self.entry()).passes, 1)
        del calls[:]
        # A minute after the store last said so, it is asked again and
        # learns of the passes answered meanwhile.
        self.advance(greylist.CONFIRM_EVERY)
        self.assertIsNone((yield self.rcpt(check, session())))
        self.assertEqual(len(calls), 1)
        e = yield self.entry()
        self.assertEqual((e.passes, e.whitelisted_until),
                         (7, self.reactor.seconds() + AUTO))

    @defer.inlineCallbacks
    def pass_from_memory(self, check, n, ip="192.0.2.1"):
        yield self.rcpt(check, session(ip))
        self.advance(DELAY)
        yield self.rcpt(check, session(ip))
        for _ in range(n):
            self.assertIsNone(check.check("rcpt", session(ip), BOB))

    @defer.inlineCallbacks
    def test_passes_written_when_the_sender_falls_silent(self):
        check = self.greylist()
        yield self.pass_from_memory(check, 4)
        # Another sender's message after a quiet minute sweeps the memory.
        self.advance(greylist.CONFIRM_EVERY)
        yield self.rcpt(check, session("198.51.100.1"))
        yield self.settle_store()
        self.assertEqual((yield self.entry()).passes, 5)
        self.assertEqual(len(check._remembered), 0)

    @defer.inlineCallbacks
    def test_passes_written_at_a_stop_and_on_eviction(self):
        check = self.greylist()
        check.max_remembered = 1
        yield self.pass_from_memory(check, 2)
        yield self.pass_from_memory(check, 1, ip="198.51.100.1")     # pushes the first out
        yield self.settle_store()
        self.assertEqual((yield self.entry()).passes, 3)
        yield check.flush_now()
        self.assertEqual((yield self.entry("198.51.100.1")).passes, 2)

    @defer.inlineCallbacks
    def test_deleted_triplet_not_brought_back_by_late_passes(self):
        check = self.greylist()
        yield self.pass_from_memory(check, 3)
        yield self.store.greylist_delete(*triplet("192.0.2.1", ALICE, BOB))
        yield check.flush_now()
        self.assertIsNone((yield self.entry()))

    @defer.inlineCallbacks
    def test_deleted_triplet_greylisted_after_the_memory_expires(self):
        check = self.greylist()
        yield self.rcpt(check, session())
        self.advance(DELAY)
        yield self.rcpt(check, session())
        yield self.store.greylist_delete(*triplet("192.0.2.1", ALICE, BOB))
        self.assertIsNone((yield self.rcpt(check, session())))
        self.advance(greylist.CONFIRM_EVERY)
        self.assertEqual((yield self.rcpt(check, session())),
                         "451 4.7.1 Greylisted, try again in 300 seconds")

    @defer.inlineCallbacks
    def test_memory_bounded(self):
        check = self.greylist()
        check.max_remembered = 2
        for n in range(3):
            yield self.rcpt(check, session(f"192.0.{n}.1"))
        self.advance(DELAY)
        for n in range(3):
            self.assertIsNone((yield self.rcpt(check, session(f"192.0.{n}.1"))))
        self.assertEqual(len(check._remembered), 2)

    @defer.inlineCallbacks
    def test_whitelisting_ends(self):
        check = self.greylist()
        yield self.rcpt(check, session())
        self.advance(DELAY)
        yield self.rcpt(check, session())
        self.advance(AUTO + 1)
        self.assertEqual((yield self.rcpt(check, session())),
                         "451 4.7.1 Greylisted, try again in 300 seconds")
        e = yield self.entry()
        self.assertEqual((e.first_seen, e.whitelisted_until, e.attempts),
                         (self.reactor.seconds(), 0, 1))

    @defer.inlineCallbacks
    def test_retry_at_the_end_of_the_window_passes(self):
        check = self.greylist()
        yield self.rcpt(check, session())
        self.advance(DELAY + WINDOW)
        self.assertIsNone((yield self.rcpt(check, session())))

    @defer.inlineCallbacks
    def test_retry_after_the_window_is_a_first_sight(self):
        check = self.greylist()
        yield self.rcpt(check, session())
        self.advance(DELAY + WINDOW + 1)
        self.assertEqual((yield self.rcpt(check, session())),
                         "451 4.7.1 Greylisted, try again in 300 seconds")
        e = yield self.entry()
        self.assertEqual((e.first_seen, e.attempts), (self.reactor.seconds(), 1))
        self.advance(DELAY)
        self.assertIsNone((yield self.rcpt(check, session())))

    @defer.inlineCallbacks
    def test_each_recipient_is_its_own_triplet(self):
        check = self.greylist()
        yield self.rcpt(check, session(), BOB)
        self.advance(DELAY)
        s = session()
        self.assertIsNone((yield self.rcpt(check, s, BOB)))
        self.assertEqual((yield self.rcpt(check, s, CAROL)),
                         "451 4.7.1 Greylisted, try again in 300 seconds")

    @defer.inlineCallbacks
    def test_other_sender_is_another_triplet(self):
        check = self.greylist()
        yield self.rcpt(check, session())
        self.advance(DELAY)
        self.assertIsNotNone((yield self.rcpt(check, session(sender=Path(local="eve",
                                                                          domain="ext.test")))))

    @defer.inlineCallbacks
    def test_null_sender(self):
        check = self.greylist()
        null = Path(null=True)
        self.assertIsNotNone((yield self.rcpt(check, session(sender=null))))
        e = yield self.entry(sender=null)
        self.assertEqual(e.sender, "")
        self.advance(DELAY)
        self.assertIsNone((yield self.rcpt(check, session(sender=null))))

    @defer.inlineCallbacks
    def test_case_variants_hit_the_same_entry(self):
        check = self.greylist()
        yield self.rcpt(check, session(sender=Path(local="Alice", domain="ext.test")),
                        Path(local="BOB", domain="example.test"))
        self.advance(DELAY)
        self.assertIsNone((yield self.rcpt(check, session(sender=Path(local="aLiCe",
                                                                       domain="ext.test")),
                                           Path(local="bob", domain="example.test"))))
        self.assertEqual((yield self.store.greylist_count()), 1)
        e = yield self.entry()
        self.assertEqual((e.sender, e.recipient), ("alice@ext.test", "bob@example.test"))


class NetworkGroupingTests(StoreMixin, unittest.TestCase):

    def setUp(self):
        return self.make_store()

    def test_networks(self):
        self.assertEqual(client_network("192.0.2.77"), "192.0.2.0/24")
        self.assertEqual(client_network("::ffff:192.0.2.77"), "192.0.2.0/24")
        self.assertEqual(client_network("2001:db8:1:2:3:4:5:6"), "2001:db8:1:2::/64")
        self.assertEqual(client_network("fe80::1%eth0"), "fe80::/64")
        self.assertIsNone(client_network(""))
        self.assertIsNone(client_network("/run/socket"))

    def test_path_text(self):
        self.assertEqual(path_text(Path(null=True)), "")
        self.assertEqual(path_text("<>"), "")
        self.assertEqual(path_text("<Bob@Example.TEST>"), "bob@example.test")
        self.assertEqual(path_text(Path(local="Bob", domain="example.test")),
                         "bob@example.test")

    @defer.inlineCallbacks
    def test_ipv4_slash_24(self):
        check = self.greylist()
        yield self.rcpt(check, session("192.0.2.1"))
        self.advance(DELAY)
        # Another server of the same /24 (a sender's outbound pool) retries.
        self.assertIsNone((yield self.rcpt(check, session("192.0.2.200"))))
        # An IPv4 client seen on an IPv6 socket is the same network.
        self.assertIsNone((yield self.rcpt(check, session("::ffff:192.0.2.9"))))
        self.assertIsNotNone((yield self.rcpt(check, session("192.0.3.1"))))

    @defer.inlineCallbacks
    def test_ipv6_slash_64(self):
        check = self.greylist()
        yield self.rcpt(check, session("2001:db8:1:2::1"))
        self.advance(DELAY)
        self.assertIsNone((yield self.rcpt(check, session("2001:db8:1:2:ffff::9"))))
        self.assertIsNotNone((yield self.rcpt(check, session("2001:db8:1:3::1"))))

    @defer.inlineCallbacks
    def test_client_without_an_address_is_not_greylisted(self):
        check = self.greylist()
        self.assertIsNone((yield self.rcpt(check, session(""))))
        self.assertEqual((yield self.store.greylist_count()), 0)


class WhitelistTests(StoreMixin, unittest.TestCase):

    def setUp(self):
        return self.make_store()

    @defer.inlineCallbacks
    def assertPasses(self, check, sess, recipient=BOB):
        self.assertIsNone((yield self.rcpt(check, sess, recipient)))
        # Nothing is written for a whitelisted delivery.
        self.assertEqual((yield self.store.greylist_count()), 0)

    @defer.inlineCallbacks
    def assertGreylisted(self, check, sess, recipient=BOB):
        got = yield self.rcpt(check, sess, recipient)
        self.assertEqual(got, "451 4.7.1 Greylisted, try again in 300 seconds")

    @defer.inlineCallbacks
    def test_authenticated_trusted_and_other_listeners(self):
        check = self.greylist()
        yield self.assertPasses(check, session(authenticated="alice"))
        yield self.assertPasses(check, session(trusted=True))
        yield self.assertPasses(check, session(listener="submission"))
        yield self.assertPasses(check, session(listener="lmtp"))

    @defer.inlineCallbacks
    def test_networks(self):
        check = self.greylist(whitelist_networks=("198.51.100.0/24", "2001:db8:9::/48"))
        yield self.assertPasses(check, session("198.51.100.20"))
        yield self.assertPasses(check, session("::ffff:198.51.100.20"))
        yield self.assertPasses(check, session("2001:db8:9:1::5"))
        yield self.assertGreylisted(check, session("198.51.101.20"))

    @defer.inlineCallbacks
    def test_sender_domains_and_their_subdomains(self):
        check = self.greylist(whitelist_senders=("Partner.TEST",))
        yield self.assertPasses(check, session(sender=Path(local="x", domain="partner.test")))
        yield self.assertPasses(check, session(sender=Path(local="x",
                                                            domain="mail.partner.test")))
        yield self.assertGreylisted(check, session(sender=Path(local="x",
                                                                domain="notpartner.test")))

    @defer.inlineCallbacks
    def test_null_sender_matches_no_sender_domain(self):
        check = self.greylist(whitelist_senders=("partner.test",))
        yield self.assertGreylisted(check, session(sender=Path(null=True)))

    @defer.inlineCallbacks
    def test_recipients_by_address_and_domain(self):
        check = self.greylist(whitelist_recipients=("Postmaster@example.test", "@open.test"))
        yield self.assertPasses(check, session(), Path(local="POSTMASTER",
                                                        domain="example.test"))
        yield self.assertPasses(check, session(), Path(local="anyone", domain="open.test"))
        yield self.assertGreylisted(check, session(), Path(local="anyone",
                                                            domain="notopen.test"))

    @defer.inlineCallbacks
    def test_spf_pass(self):
        check = self.greylist(whitelist_spf_pass=True)
        passed = session()
        passed.spf_result = "pass"
        yield self.assertPasses(check, passed)
        softfail = session()
        softfail.spf_result = "softfail"
        yield self.assertGreylisted(check, softfail)

    @defer.inlineCallbacks
    def test_spf_pass_ignored_unless_configured(self):
        check = self.greylist()
        passed = session()
        passed.spf_result = "pass"
        yield self.assertGreylisted(check, passed)

    @defer.inlineCallbacks
    def test_no_spf_attribute_is_no_pass(self):
        check = self.greylist(whitelist_spf_pass=True)
        yield self.assertGreylisted(check, session())


class FloodTests(StoreMixin, unittest.TestCase):
    """Random one-off triplets through the check cannot grow the store past its cap."""

    @defer.inlineCallbacks
    def test_random_triplets_are_bounded_and_whitelisted_ones_survive(self):
        yield self.make_store()
        self.store.max_entries = 50
        self.store._cap_every = 1
        check = self.greylist()
        yield self.rcpt(check, session("192.0.2.1"))
        self.advance(DELAY)
        self.assertIsNone((yield self.rcpt(check, session("192.0.2.1"))))
        for n in range(400):
            ip = f"10.{n // 256}.{n % 256}.1"
            sender = Path(local=f"x{n}", domain="spam.test")
            self.assertIsNotNone((yield self.rcpt(check, session(ip, sender=sender))))
            self.advance(1)
        self.assertEqual((yield self.store.greylist_count()), 50)
        # The correspondent that proved it retries was not pushed out.
        self.assertIsNone((yield self.rcpt(check, session("192.0.2.1"))))


@implementer(IStateStore)
class BrokenStore:
    """A store whose every query fails as a full or corrupt disk would."""

    max_entries = 10

    def _fail(self, *args, **kw):
        return defer.fail(sqlite3.OperationalError("disk I/O error"))

    greylist_get = greylist_put = greylist_whitelist = greylist_expire = _fail
    greylist_add_passes = _fail
    greylist_list = greylist_delete = greylist_count = _fail


class FailOpenTests(StoreMixin, unittest.TestCase):

    @defer.inlineCallbacks
    def test_failing_store_accepts_and_logs(self):
        self.reactor = ClockedReactor()
        self.store = BrokenStore()
        check = self.greylist()
        self.assertIsNone((yield self.rcpt(check, session())))
        self.assertEqual(len(self.flushLoggedErrors(sqlite3.OperationalError)), 1)

    @defer.inlineCallbacks
    def test_failing_write_accepts(self):
        # Reads work, the write of a first sight fails (a full disk).
        yield self.make_store()
        self.store.greylist_put = BrokenStore()._fail
        self.assertIsNone((yield self.rcpt(self.greylist(), session())))
        self.assertEqual(len(self.flushLoggedErrors(sqlite3.OperationalError)), 1)

    @defer.inlineCallbacks
    def test_closed_store_accepts(self):
        yield self.make_store()
        yield self.store.close()
        self.assertIsNone((yield self.rcpt(self.greylist(), session())))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_needs_a_state_store(self):
        self.reactor = ClockedReactor()
        self.store = object()
        self.assertRaises(TypeError, self.greylist)


ZONE = {
    "66.2.0.192.bl.test": {"A": ["127.0.0.2"], "TXT": ["spam source"]},
    "67.2.0.192.bl.test": {"A": ["127.255.255.254"]},      # a refused query
}


class BlocklistDelayTests(StoreMixin, unittest.TestCase):
    """A client listed on a ``[antispam.greylist] dnsbl`` zone waits ``dnsbl_delay``."""

    @defer.inlineCallbacks
    def setUp(self):
        self.fake = yield start_fake_dns(self, ZONE, servfail={"68.2.0.192.bl.test"},
                                         silent={"69.2.0.192.bl.test"})
        yield self.make_store()
        cfg = config_module.Config(
            dns=config_module.DNSConfig(servers=(self.fake.server,), timeout=2),
            antispam=config_module.AntispamConfig(
                greylist=config_module.GreylistConfig(dnsbl=("bl.test",))))
        self.resolver = dns.make_resolver(self.reactor, cfg)
        [self.check] = greylist.checks(cfg, self.reactor, self.resolver, self.store)

    @defer.inlineCallbacks
    def test_listed_client_waits_longer(self):
        s = session("192.0.2.66")
        self.assertEqual((yield self.rcpt(self.check, s)),
                         "451 4.7.1 Greylisted, try again in 43200 seconds")
        self.advance(DELAY)
        self.assertEqual((yield self.rcpt(self.check, s)),
                         f"451 4.7.1 Greylisted, try again in {DNSBL_DELAY - DELAY} seconds")
        self.advance(DNSBL_DELAY - DELAY)
        self.assertIsNone((yield self.rcpt(self.check, s)))
        # Once whitelisted, the block list is not asked again.
        asked = len(self.fake.queries)
        self.assertIsNone((yield self.rcpt(self.check, s)))
        self.assertEqual(len(self.fake.queries), asked)

    @defer.inlineCallbacks
    def test_window_counts_from_the_end_of_the_longer_delay(self):
        s = session("192.0.2.66")
        yield self.rcpt(self.check, s)
        self.advance(DNSBL_DELAY + WINDOW)
        self.assertIsNone((yield self.rcpt(self.check, s)))

    @defer.inlineCallbacks
    def test_unlisted_client_gets_the_short_delay(self):
        self.assertEqual((yield self.rcpt(self.check, session("192.0.2.65"))),
                         "451 4.7.1 Greylisted, try again in 300 seconds")
        self.assertIn(("65.2.0.192.bl.test", "A"), self.fake.queries)

    @defer.inlineCallbacks
    def test_error_codes_and_servfail_are_not_listings(self):
        for ip in ("192.0.2.67", "192.0.2.68"):
            self.assertEqual((yield self.rcpt(self.check, session(ip))),
                             "451 4.7.1 Greylisted, try again in 300 seconds", ip)

    @defer.inlineCallbacks
    def test_timeout_is_not_a_listing(self):
        d = self.rcpt(self.check, session("192.0.2.69"))
        yield settle()
        self.assertNoResult(d)
        self.advance(10)            # [antispam.dns] timeout, the lookup's deadline
        self.assertEqual((yield d), "451 4.7.1 Greylisted, try again in 300 seconds")
        # Let the resolver give up on the unanswered query (its port closes).
        self.advance(60)
        yield settle()


class ChecksTests(unittest.TestCase):

    def setUp(self):
        self.store = BrokenStore()

    def config(self, **kw):
        return config_module.Config(antispam=config_module.AntispamConfig(
            greylist=config_module.GreylistConfig(**kw)))

    def test_disabled_or_no_store_is_empty(self):
        self.assertEqual(greylist.checks(self.config(enabled=False), None, None, self.store), [])
        self.assertEqual(greylist.checks(self.config(), None, None, None), [])
        self.assertEqual(greylist.checks(self.config(), None, None, {"other": 1}), [])

    def test_durations_from_the_config(self):
        [check] = greylist.checks(self.config(delay="1m", retry_window="2h",
                                              auto_whitelist="7d", dnsbl_delay="1h"),
                                  None, None, self.store)
        self.assertEqual((check.delay, check.retry_window, check.auto_whitelist,
                          check.dnsbl_delay), (60, 7200, 7 * 86400, 3600))
        self.assertEqual(check.name, "greylist")
        self.assertEqual(check.stages, {"rcpt"})
        self.assertIsNone(check.blocklists)

    def test_store_found_in_a_state_dict(self):
        [check] = greylist.checks(self.config(), None, None, {"store": self.store})
        self.assertIs(check.store, self.store)


class GreylistCLITests(unittest.TestCase):
    """``mailappliance greylist`` against a temporary data_dir."""

    timeout = 30

    def setUp(self):
        self.state = state
        self.dir = tempfile.mkdtemp(prefix="grey-cli-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        shutil.copy(os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures",
                                 "directory.ldif"), self.dir)
        self.config = os.path.join(self.dir, "mailappliance.toml")
        with open(self.config, "w") as f:
            f.write('[server]\nhostname = "mx.example.test"\ndomains = ["example.test"]\n'
                    'data_dir = "var"\n[listen]\nsmtp = "tcp:0:interface=127.0.0.1"\n'
                    '[directory]\nldif = "directory.ldif"\n'
                    '[antispam.greylist]\nauto_whitelist = "2d"\n')
        self.path = os.path.join(self.dir, "var", state.FILENAME)

    def run_cli(self, *argv):
        out, err = io.StringIO(), io.StringIO()
        code = cli.main(["--config", self.config, *argv], out=out, err=err)
        return code, out.getvalue(), err.getvalue()

    def seed(self):
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        conn = self.state.connect(self.path)
        self.addCleanup(conn.close)
        now = time.time()
        self.state.put_entry(conn, self.state.GreylistEntry(
            "192.0.2.0/24", "alice@ext.test", "bob@example.test", now - 60, now - 30,
            attempts=2, expires=now + 3600))
        self.state.whitelist_entry(conn, "2001:db8:1:2::/64", "", "carol@example.test",
                                   now - 10, now + 86400)
        self.state.put_entry(conn, self.state.GreylistEntry(
            "198.51.100.0/24", "\x1b[31mevil@ext.test", "bob@example.test", now, now,
            expires=now + 3600))

    def test_list_without_a_database_creates_nothing(self):
        self.assertEqual(self.run_cli("greylist"), (0, "Greylist is empty\n", ""))
        self.assertEqual(self.run_cli("greylist", "list", "--json"), (0, "[]\n", ""))
        self.assertFalse(os.path.exists(self.path))

    def test_list(self):
        self.seed()
        code, out, err = self.run_cli("greylist", "list")
        self.assertEqual((code, err), (0, ""))
        self.assertIn("192.0.2.0/24", out)
        self.assertIn("pending, 2 deferred", out)
        self.assertIn("<alice@ext.test> -> <bob@example.test>", out)
        self.assertIn("whitelisted until", out)
        self.assertIn("<> -> <carol@example.test>", out)
        # A sender's escape sequence never reaches the terminal.
        self.assertNotIn("\x1b", out)
        self.assertIn("-- 3 triplet(s), 1 whitelisted", out)

    def test_list_json(self):
        self.seed()
        code, out, _ = self.run_cli("greylist", "--json")
        self.assertEqual(code, 0)
        docs = {d["sender"]: d for d in json.loads(out)}
        self.assertEqual(docs["alice@ext.test"]["attempts"], 2)
        self.assertIsNone(docs["alice@ext.test"]["whitelisted_until"])
        self.assertEqual(docs[""]["network"], "2001:db8:1:2::/64")
        self.assertEqual(docs[""]["passes"], 1)
        self.assertTrue(docs[""]["whitelisted_until_date"])

    def test_whitelist_by_hand_creates_the_database(self):
        code, out, err = self.run_cli("greylist", "whitelist", "192.0.2.77",
                                      "Alice@Ext.Test", "<BOB@example.test>")
        self.assertEqual((code, err), (0, ""))
        self.assertIn("192.0.2.0/24 <alice@ext.test> -> <bob@example.test>: whitelisted", out)
        conn = self.state.connect(self.path)
        self.addCleanup(conn.close)
        e = self.state.get_entry(conn, "192.0.2.0/24", "alice@ext.test", "bob@example.test")
        self.assertLess(abs(e.whitelisted_until - (time.time() + 2 * 86400)), 60)

    def test_whitelist_null_sender_and_network_as_listed(self):
        code, _, _ = self.run_cli("greylist", "whitelist", "2001:db8:1:2::/64", "<>",
                                  "carol@example.test")
        self.assertEqual(code, 0)
        conn = self.state.connect(self.path)
        self.addCleanup(conn.close)
        self.assertIsNotNone(self.state.get_entry(conn, "2001:db8:1:2::/64", "",
                                                  "carol@example.test"))

    def test_delete(self):
        self.seed()
        code, out, err = self.run_cli("greylist", "delete", "192.0.2.1", "alice@ext.test",
                                      "bob@example.test")
        self.assertEqual((code, err), (0, ""))
        self.assertIn("deleted", out)
        code, out, err = self.run_cli("greylist", "delete", "192.0.2.1", "alice@ext.test",
                                      "bob@example.test", "--json")
        self.assertEqual(code, 1)
        self.assertIn('"ok": false', out)
        self.assertIn("no such greylist triplet", err)

    def test_delete_without_a_database(self):
        code, _, err = self.run_cli("greylist", "delete", "192.0.2.1", "a@ext.test",
                                    "b@example.test")
        self.assertEqual(code, 1)
        self.assertFalse(os.path.exists(self.path))

    def test_bad_arguments(self):
        for argv in (("not-an-ip", "a@ext.test", "b@example.test"),
                     ("192.0.2.1", "a@ext.test", "<>"),
                     ("192.0.2.1", "a b@ext.test", "b@example.test"),
                     ("192.0.2.1", "a@ext.test", "b\r\n@example.test"),
                     ("192.0.2.1", "nodomain", "b@example.test")):
            code, _, err = self.run_cli("greylist", "whitelist", *argv)
            self.assertEqual(code, 1, argv)
            self.assertIn("not a", err)
        self.assertFalse(os.path.exists(self.path))

    def test_config_error(self):
        with open(self.config, "a") as f:
            f.write('delay = "soon"\n')
        self.assertEqual(self.run_cli("greylist")[0], 2)

    def test_corrupt_database_is_an_error_not_a_crash(self):
        os.makedirs(os.path.dirname(self.path))
        with open(self.path, "wb") as f:
            f.write(b"not a database" * 100)
        code, _, err = self.run_cli("greylist", "list")
        self.assertEqual(code, 1)
        self.assertIn("state database", err)

    @defer.inlineCallbacks
    def test_beside_a_running_store(self):
        # The appliance's store is open on the file; the command whitelists a
        # triplet and the check lets it through at once.
        reactor = ClockedReactor()
        reactor.clock.advance(time.time())
        store = SQLiteStateStore(self.path, reactor)
        self.addCleanup(store.close)
        yield store.open()
        check = Greylist(store, reactor, DELAY, WINDOW, AUTO)
        verdict = yield defer.maybeDeferred(check.check, "rcpt", session("192.0.2.5"), BOB)
        self.assertEqual(verdict.code, 451)
        code, out, _ = self.run_cli("greylist", "list", "--json")
        self.assertIn("alice@ext.test", out)
        code, _, err = self.run_cli("greylist", "whitelist", "192.0.2.5", "alice@ext.test",
                                    "bob@example.test")
        self.assertEqual((code, err), (0, ""))
        verdict = yield defer.maybeDeferred(check.check, "rcpt", session("192.0.2.5"), BOB)
        self.assertIsNone(verdict)


class RunningMXTests(ApplianceMixin, unittest.TestCase):
    """Greylisting wired into a running appliance's MX (its own state file).

    ``delay = "0s"`` makes any retry come after the delay, so the real
    reactor's time never matters: the first RCPT is greylisted, the next
    connection's passes.
    """

    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        extra = ANTISPAM_OFF.replace("[antispam.greylist]\nenabled = false",
                                     '[antispam.greylist]\nenabled = true\ndelay = "0s"')
        self.assertIn('delay = "0s"', extra)
        yield self.start_appliance(extra=extra)

    def deliver(self, sender="<Alice@Ext.Test>", rcpt="<BOB@example.test>"):
        c = RawClient(self.port)
        try:
            c.code()
            c.cmd("EHLO client.ext.test")
            mail = c.cmd(f"MAIL FROM:{sender}")
            r = c.cmd(f"RCPT TO:{rcpt}")
            data = c.cmd("DATA")[0]
            if data == 354:
                c.send(b"Subject: hi\r\n\r\nhello\r\n.\r\n")
                data = c.reply()[0]
            c.cmd("QUIT")
            return mail[0], f"{r[0]} {r[1][0]}", data
        finally:
            c.close()

    @defer.inlineCallbacks
    def test_first_sight_deferred_then_retry_delivered(self):
        mail, rcpt, data = yield self.in_thread(self.deliver)
        self.assertEqual(mail, 250)
        self.assertEqual(rcpt, "451 4.7.1 Greylisted, try again in 1 seconds")
        self.assertEqual(data, 554)          # no valid recipient: nothing taken
        self.assertEqual(self.delivered("bob"), [])
        self.assertEqual(self.queue_files(), [])
        # The retry, in other case: the same triplet.
        mail, rcpt, data = yield self.in_thread(self.deliver, "<alice@ext.test>",
                                                "<bob@Example.Test>")
        self.assertEqual(rcpt[:3], "250")
        self.assertEqual(data, 250)
        yield self.settle()
        self.assertEqual(len(self.delivered("bob")), 1)
        listed = yield self.app.state.greylist_list()
        self.assertEqual([(e.network, e.sender, e.recipient, e.passes) for e in listed],
                         [("127.0.0.0/24", "alice@ext.test", "bob@example.test", 1)])

    @defer.inlineCallbacks
    def test_passes_from_memory_written_at_stop(self):
        for _ in range(2):
            yield self.in_thread(self.deliver)
        for _ in range(3):                   # answered from memory
            mail, rcpt, data = yield self.in_thread(self.deliver)
            self.assertEqual(data, 250)
        yield self.app.stopService()
        conn = state.connect(os.path.join(self.config.server.data_dir, state.FILENAME))
        self.addCleanup(conn.close)
        self.assertEqual([e.passes for e in state.list_entries(conn)], [4])

    def test_one_dns_cache_for_everything(self):
        from mailbox_appliance.dns import CachingResolver
        self.assertIsInstance(self.app.resolver, CachingResolver)
        self.assertIs(self.app.remote_delivery.dns_cache, self.app.resolver)

    @defer.inlineCallbacks
    def test_state_file_in_data_dir(self):
        yield self.app.state.greylist_count()
        self.assertTrue(os.path.exists(os.path.join(self.config.server.data_dir,
                                                    "state.sqlite3")))
