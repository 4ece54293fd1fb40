"""The Bayesian filter: tokeniser, classifier, token database, training, IMAP moves."""

import base64
import dataclasses
import os
import random
import shutil
import sqlite3

from twisted.internet import defer, reactor
from twisted.internet.task import Clock
from twisted.trial import unittest

from mailbox_appliance import config as config_module
from mailbox_appliance.antispam import bayes, bayes_store, bayes_train
from mailbox_appliance.antispam.message import ScannedMessage
from tests.imap_helpers import RawIMAP
from tests.smtp_helpers import ApplianceMixin

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "bayes")


def fixture_files(kind):
    d = os.path.join(FIXTURES, kind)
    return [os.path.join(d, n) for n in sorted(os.listdir(d))]


def read(path):
    with open(path, "rb") as f:
        return f.read()


def message(body, subject="Hello", sender="someone@example.org", ctype="text/plain",
            extra=""):
    raw = (f"From: {sender}\r\nTo: alice@example.test\r\nSubject: {subject}\r\n{extra}"
           f"Content-Type: {ctype}; charset=utf-8\r\n\r\n").encode() + (
        body if isinstance(body, bytes) else body.encode())
    return raw


def tokens_of(raw, **envelope):
    return bayes.tokenise(ScannedMessage.parse(raw, **envelope))


NEW_SPAM = message("Cheap pills and replica watches, best prices! Click now to claim your "
                   "free prize money: http://www.pharma-offers.example/buy", "Cheap prize offer!!",
                   "promo@pharma-offers.example")
NEW_HAM = message("Hi, the review of the scheduler branch is done; the database migration "
                  "plan looks fine for the release on Thursday.\nRegards, Alice",
                  "Re: review of the scheduler", "alice@colleagues.example")


class TokeniserTests(unittest.TestCase):

    def test_words_lower_cased_and_bounded(self):
        t = tokens_of(message("Hello WORLD ab abc, (quoted) word."))
        self.assertTrue({"hello", "world", "abc", "quoted", "word"} <= t)
        self.assertIn("caps:world", t)
        self.assertNotIn("ab", t)
        self.assertNotIn("abc,", t)

    def test_header_tokens_are_prefixed(self):
        t = tokens_of(message("x", subject="Cheap Offer!!", sender='"Big Shop" <deals@shop.example>',
                              extra="Received: from mx.shop.example (mx.shop.example "
                                    "[198.51.100.7]) by mx.example.test\r\n"))
        for token in ("subject:cheap", "subject:offer", "subject:punct",
                      "from:addr:deals@shop.example", "from:domain:shop.example", "from:big",
                      "to:domain:example.test", "rcvd:mx.shop.example", "rcvd:shop.example",
                      "rcvd:net:198.51.100", "ctype:text/plain", "charset:utf-8"):
            self.assertIn(token, t)
        self.assertNotIn("cheap", t)

    def test_numbers_bucketed_and_long_words_summarised(self):
        t = tokens_of(message("pay 12345 or $4000 now, supercalifragilisticexpialidocious"))
        self.assertIn("num:5", t)
        self.assertIn("num:$4", t)
        self.assertIn("skip:s 30", t)
        self.assertNotIn("12345", t)

    def test_links_become_host_tokens(self):
        t = tokens_of(message('<p>Visit <a href="https://www.shop.example/x?y=1">us</a></p>',
                              ctype="text/html"))
        for token in ("url:www.shop.example", "url:shop.example", "proto:https", "html:p",
                      "html:a", "visit"):
            self.assertIn(token, t)
        self.assertFalse(any(tok.startswith("https") for tok in t), t)

    def test_our_own_fields_are_not_tokens(self):
        plain = tokens_of(message("words here"))
        marked = tokens_of(message("words here", extra="X-Spam-Flag: YES\r\nX-Spam-Status: "
                                   "Yes, score=9\r\nAuthentication-Results: mx; none\r\n"))
        self.assertEqual(plain, marked)

    def test_token_ids_are_stable_64_bit(self):
        self.assertEqual(bayes.token_id("hello"), bayes.token_id("hello"))
        self.assertNotEqual(bayes.token_id("hello"), bayes.token_id("hellp"))
        self.assertTrue(-2 ** 63 <= bayes.token_id("x") < 2 ** 63)

    # security.md H6: hostile input is bounded

    def assertBounded(self, t):
        self.assertLessEqual(len(t), bayes.MAX_TOKENS)
        self.assertLessEqual(max(len(tok) for tok in t), 200)

    def test_one_5mb_token(self):
        t = tokens_of(message(b"x" * (5 * 1024 * 1024)))
        self.assertBounded(t)
        self.assertIn("skip:x 1000", t)

    def test_half_a_million_unique_words(self):
        words = " ".join(f"w{i:07d}" for i in range(500000))
        t = tokens_of(message(words))
        self.assertBounded(t)
        self.assertEqual(len(t), bayes.MAX_TOKENS)

    def test_ten_mb_of_random_base64(self):
        rnd = random.Random(6)
        blob = base64.encodebytes(rnd.randbytes(7 * 1024 * 1024))
        t = tokens_of(message(blob))
        self.assertBounded(t)
        # Base64 lines are 76 characters: a handful of summary tokens.
        self.assertLess(len([x for x in t if x.startswith("skip:")]), 100)

    def test_header_flood_bounded(self):
        extra = "".join(f"Received: from h{i}.flood.example (h{i}.flood.example "
                        f"[203.0.113.{i % 250}])\r\n" for i in range(400))
        extra += "To: " + ", ".join(f"u{i}@d{i}.example" for i in range(2000)) + "\r\n"
        t = tokens_of(message("x", extra=extra))
        self.assertBounded(t)
        self.assertLessEqual(len([x for x in t if x.startswith("rcvd:net:")]),
                             bayes.MAX_RECEIVED)
        self.assertIn("to:count:many", t)


class ClassifierTests(unittest.TestCase):

    def test_robinson_token_probability(self):
        self.assertEqual(bayes.token_probability(0, 0, 10, 10), 0.5)
        self.assertAlmostEqual(bayes.token_probability(1, 0, 10, 10), 0.75)
        self.assertAlmostEqual(bayes.token_probability(0, 1, 10, 10), 0.25)
        # Frequencies, not counts: 10 of 100 spam against 10 of 1000 ham.
        p = 10 / 100 / (10 / 100 + 10 / 1000)
        self.assertAlmostEqual(bayes.token_probability(10, 10, 100, 1000),
                               (0.5 + 20 * p) / 21)

    def test_chi2q(self):
        self.assertAlmostEqual(bayes.chi2q(0.0, 2), 1.0)
        self.assertLess(bayes.chi2q(2000.0, 300), 1e-100)
        self.assertAlmostEqual(bayes.chi2q(2.0, 2), 0.36787944, places=6)

    def test_fisher_combining(self):
        self.assertEqual(bayes.combine([]), 0.5)
        self.assertGreater(bayes.combine([0.99] * 20), 0.99)
        self.assertLess(bayes.combine([0.01] * 20), 0.01)
        self.assertAlmostEqual(bayes.combine([0.99] * 10 + [0.01] * 10), 0.5, places=6)
        self.assertGreater(bayes.combine([0.9, 0.8, 0.7]), 0.5)

    def test_clues_are_the_strongest(self):
        counts = {i: (100, 1) for i in range(200)}
        counts.update({1000 + i: (1, 0) for i in range(50)})    # 0.75: weaker
        p, used = bayes.classify_counts(list(counts) + [5000], counts, 100, 100)
        self.assertEqual(used, bayes.MAX_CLUES)
        self.assertGreater(p, 0.99)

    def test_bands(self):
        for p, name in ((0.0, "BAYES_00"), (0.0099, "BAYES_00"), (0.01, "BAYES_05"),
                        (0.3, "BAYES_40"), (0.5, "BAYES_50"), (0.7, "BAYES_60"),
                        (0.9, "BAYES_80"), (0.96, "BAYES_95"), (0.995, "BAYES_99"),
                        (1.0, "BAYES_99")):
            self.assertEqual(bayes.band(p)[0], name, p)


class StoreFunctionTests(unittest.TestCase):
    """The SQL on a connection, as the command line uses it."""

    def setUp(self):
        self.path = os.path.join(os.path.abspath(self.mktemp()), "bayes.sqlite3")
        os.makedirs(os.path.dirname(self.path))
        self.conn = bayes_store.connect(self.path)
        self.addCleanup(self.conn.close)

    def counts(self, ids, user=""):
        return bayes_store.lookup(self.conn, ids, user)

    def test_wal_and_schema(self):
        self.assertEqual(self.conn.execute("PRAGMA journal_mode").fetchone()[0], "wal")
        self.assertEqual(bayes_store.user_totals(self.conn), (0, 0))
        bayes_store.connect(self.path).close()      # opening again is harmless

    def test_learn_once_then_relearn_as_the_other_class(self):
        c = self.conn
        self.assertEqual(bayes_store.learn(c, "", [1, 2, 3], b"d1", True), "learned")
        self.assertEqual(bayes_store.learn(c, "", [1, 2, 3], b"d1", True), "already")
        self.assertEqual(bayes_store.learn(c, "", [2, 4], b"d2", False), "learned")
        counts, nspam, nham = self.counts([1, 2, 3, 4, 5])
        self.assertEqual((nspam, nham), (1, 1))
        self.assertEqual(counts, {1: (1, 0), 2: (1, 1), 3: (1, 0), 4: (0, 1)})
        self.assertEqual(bayes_store.learn(c, "", [1, 2, 3], b"d1", False), "relearned")
        counts, nspam, nham = self.counts([1, 2, 3, 4])
        self.assertEqual((nspam, nham), (0, 2))
        self.assertEqual(counts, {1: (0, 1), 2: (0, 2), 3: (0, 1), 4: (0, 1)})
        self.assertFalse(bayes_store.learned_as(c, "", b"d1"))
        self.assertTrue(bayes_store.forget(c, "", [2, 4], b"d2"))
        self.assertFalse(bayes_store.forget(c, "", [2, 4], b"d2"))
        counts, _, nham = self.counts([1, 2, 3, 4])
        self.assertEqual(nham, 1)
        self.assertEqual(counts, {1: (0, 1), 2: (0, 1), 3: (0, 1)})

    def test_untraining_never_goes_negative(self):
        bayes_store.learn(self.conn, "", [1], b"d", True)
        # Relearned with tokens it never had (the message changed meanwhile).
        bayes_store.learn(self.conn, "", [7, 8], b"d", False)
        counts, nspam, nham = self.counts([1, 7, 8])
        self.assertEqual((nspam, nham), (0, 1))
        self.assertEqual(counts, {1: (1, 0), 7: (0, 1), 8: (0, 1)})

    def test_users_add_to_the_global_counts(self):
        c = self.conn
        bayes_store.learn(c, "", [1, 2], b"g", True)
        bayes_store.learn(c, "alice@example.test", [2, 3], b"a", False)
        self.assertEqual(self.counts([1, 2, 3]), ({1: (1, 0), 2: (1, 0)}, 1, 0))
        self.assertEqual(self.counts([1, 2, 3], "alice@example.test"),
                         ({1: (1, 0), 2: (1, 1), 3: (0, 1)}, 1, 1))
        self.assertEqual(self.counts([1, 2, 3], "bob@example.test")[1:], (1, 0))
        self.assertEqual(bayes_store.user_totals(c, "alice@example.test"), (0, 1))
        # The same message learned by a user and globally are two records.
        self.assertEqual(bayes_store.learn(c, "alice@example.test", [1, 2], b"g", True),
                         "learned")

    def test_lookup_of_many_ids_in_chunks(self):
        ids = list(range(3000))
        bayes_store.learn(self.conn, "", ids, b"big", True)
        counts, _, _ = self.counts(ids + [-5])
        self.assertEqual(len(counts), 3000)

    def test_cache_follows_writes_of_any_connection(self):
        cache = bayes_store.CountCache()
        bayes_store.learn(self.conn, "", [1], b"a", True)
        self.assertEqual(bayes_store.lookup(self.conn, [1, 2], "", cache)[0], {1: (1, 0)})
        self.assertEqual(cache.entries, {(0, 1): (1, 0), (0, 2): None})
        self.assertEqual(bayes_store.lookup(self.conn, [1, 2], "", cache)[0], {1: (1, 0)})
        other = bayes_store.connect(self.path)      # the train command, say
        bayes_store.learn(other, "", [1, 2], b"b", True)
        other.close()
        self.assertEqual(bayes_store.lookup(self.conn, [1, 2], "", cache)[0],
                         {1: (2, 0), 2: (1, 0)})
        bayes_store.learn(self.conn, "", [2], b"c", False)     # this connection
        self.assertEqual(bayes_store.lookup(self.conn, [1, 2], "", cache)[0],
                         {1: (2, 0), 2: (1, 1)})

    def test_expiry_by_age(self):
        day = bayes_store.DAY
        bayes_store.learn(self.conn, "", [1, 2], b"old", True, now=1000 * day)
        bayes_store.learn(self.conn, "", [2, 3], b"new", False, now=1200 * day)
        deleted = bayes_store.expire(self.conn, 1200 * day, max_age=100 * day)
        self.assertEqual(deleted, 1)        # token 1; token 2 was learned again
        self.assertEqual(self.counts([1, 2, 3])[0], {2: (1, 1), 3: (0, 1)})
        self.assertIsNone(bayes_store.learned_as(self.conn, "", b"old"))
        self.assertFalse(bayes_store.learned_as(self.conn, "", b"new"))

    def test_cap_drops_the_rarest_first(self):
        for k in range(3):
            bayes_store.learn(self.conn, "", [1, 2], b"c%d" % k, True, now=100 * bayes_store.DAY)
        bayes_store.learn(self.conn, "", [10, 11, 12], b"once", True, now=50 * bayes_store.DAY)
        bayes_store.learn(self.conn, "", [13], b"later", True, now=60 * bayes_store.DAY)
        deleted = bayes_store.expire(self.conn, 100 * bayes_store.DAY, max_age=1e9,
                                     max_tokens=3)
        self.assertEqual(deleted, 3)
        self.assertEqual(sorted(self.counts(range(20))[0]), [1, 2, 13])
        self.assertEqual(bayes_store.count_tokens(self.conn), 3)

    def test_newer_schema_refused(self):
        self.conn.execute("PRAGMA user_version=99")
        self.assertRaises(sqlite3.DatabaseError, bayes_store.connect, self.path)


class _Session:
    """What the filter is handed besides the message (it needs nothing of it)."""


class FilterTests(unittest.TestCase):
    """The filter over a running BayesStore (queries in its own thread)."""

    def setUp(self):
        self.dir = os.path.abspath(self.mktemp())
        self.store = bayes_store.BayesStore(os.path.join(self.dir, "bayes.sqlite3"), reactor)
        self.store.startService()
        self.addCleanup(self.store.stopService)
        return self.store.open()

    def learn_fixtures(self, user="", only=None):
        conn = bayes_store.connect(self.store.path)
        try:
            for kind in ("spam", "ham"):
                for path in fixture_files(kind)[:only]:
                    bayes_train.learn_raw(conn, user, read(path), kind == "spam")
        finally:
            conn.close()

    def scan(self, raw, recipients=("alice@example.test",), **kw):
        f = bayes.BayesFilter(self.store, local_domains=("example.test",), **kw)
        msg = ScannedMessage.parse(raw, recipients=recipients)
        return f.scan(msg, _Session()).addCallback(lambda r: (r, msg))

    @defer.inlineCallbacks
    def test_no_opinion_until_enough_learned(self):
        self.learn_fixtures(only=2)
        result, msg = yield self.scan(NEW_SPAM, min_spam=3, min_ham=3)
        self.assertEqual(result.hits, {})
        self.assertEqual(result.headers, [(
            "X-Spam-Bayes", "not enough training (2 spam, 2 ham learned; 3 spam and 3 ham "
                            "needed)")])
        self.assertIsNone(msg.facts["bayes"])

    @defer.inlineCallbacks
    def test_spam_and_ham_told_apart(self):
        self.learn_fixtures()
        result, msg = yield self.scan(NEW_SPAM, min_spam=5, min_ham=5)
        self.assertEqual(list(result.hits), ["BAYES_99"], msg.facts)
        self.assertEqual(result.hits["BAYES_99"], 3.6)
        self.assertGreater(msg.facts["bayes"], 0.99)
        self.assertEqual(result.headers, [])
        result, msg = yield self.scan(NEW_HAM, min_spam=5, min_ham=5)
        self.assertEqual(list(result.hits), ["BAYES_00"], msg.facts)
        self.assertLess(msg.facts["bayes"], 0.01)

    @defer.inlineCallbacks
    def test_a_users_training_counts_for_that_user_only(self):
        self.learn_fixtures()
        conn = bayes_store.connect(self.store.path)
        # Alice wants the pharmacy's offers: she learned three of them as ham.
        for i in range(3):
            bayes_train.learn_raw(conn, "alice@example.test",
                                  NEW_SPAM.replace(b"Click now", b"Click now %d" % i), False)
        conn.close()
        alice, msg_a = yield self.scan(NEW_SPAM, min_spam=5, min_ham=5)
        bob, msg_b = yield self.scan(NEW_SPAM, recipients=("bob@example.test",),
                                     min_spam=5, min_ham=5)
        both, msg_2 = yield self.scan(NEW_SPAM, recipients=("alice@example.test",
                                                            "bob@example.test"),
                                      min_spam=5, min_ham=5)
        self.assertLess(msg_a.facts["bayes"], msg_b.facts["bayes"])
        self.assertEqual(msg_b.facts["bayes"], msg_2.facts["bayes"])
        self.assertIn("BAYES_99", bob.hits)
        self.assertNotIn("BAYES_99", alice.hits)
        # per_user off: everybody gets the global verdict.
        off, msg_off = yield self.scan(NEW_SPAM, min_spam=5, min_ham=5, per_user=False)
        self.assertEqual(msg_off.facts["bayes"], msg_b.facts["bayes"])

    @defer.inlineCallbacks
    def test_other_addresses_of_a_user_use_the_users_tokens(self):
        from tests.fakes import FakeDirectory
        self.learn_fixtures()
        conn = bayes_store.connect(self.store.path)
        for i in range(3):
            bayes_train.learn_raw(conn, "alice@example.test",
                                  NEW_SPAM.replace(b"Click now", b"Click now %d" % i), False)
        conn.close()
        directory = FakeDirectory()
        directory.add_user("alice", "alice@example.test", "a.l@example.test")
        f = bayes.BayesFilter(self.store, min_spam=5, min_ham=5,
                              local_domains=("example.test",), directory=directory)
        scores = []
        for rcpt in ("alice@example.test", "a.l@example.test", "nobody@example.test"):
            msg = ScannedMessage.parse(NEW_SPAM, recipients=(rcpt,))
            yield f.scan(msg, _Session())
            scores.append(msg.facts["bayes"])
        self.assertEqual(scores[0], scores[1])
        self.assertLess(scores[1], scores[2])
        directory.down = True
        msg = ScannedMessage.parse(NEW_SPAM, recipients=("a.l@example.test",))
        yield f.scan(msg, _Session())
        self.assertEqual(msg.facts["bayes"], scores[2])

    def test_user_for(self):
        f = bayes.BayesFilter(None, local_domains=("example.test",))
        one = ScannedMessage.parse(NEW_HAM, recipients=("<Alice@Example.TEST>",))
        self.assertEqual(f.user_for(one), "alice@example.test")
        remote = ScannedMessage.parse(NEW_HAM, recipients=("x@elsewhere.test",))
        self.assertEqual(f.user_for(remote), "")

    @defer.inlineCallbacks
    def test_closed_store_fails_the_filter_only(self):
        yield self.store.stopService()
        f = bayes.BayesFilter(self.store)
        d = f.scan(ScannedMessage.parse(NEW_HAM), _Session())
        yield self.assertFailure(d, RuntimeError)
        self.store.startService()

    @defer.inlineCallbacks
    def test_expiry_sweep_runs_on_the_clock(self):
        clock = Clock()
        store = bayes_store.BayesStore(os.path.join(self.dir, "other.sqlite3"), reactor,
                                       max_tokens=2, expire_every=60.0, clock=clock)
        yield store.open()
        self.addCleanup(store.close)
        yield store.call(bayes_store.learn, "", [1, 2, 3, 4], b"m", True)
        self.assertEqual((yield store.call(bayes_store.count_tokens)), 4)
        clock.advance(60.0)
        while store._sweeping:
            yield store.call(lambda conn: None)
        self.assertEqual((yield store.call(bayes_store.count_tokens)), 2)


class ConfigTests(unittest.TestCase):

    def config(self, **bayes_opts):
        cfg = config_module.Config()
        data = os.path.abspath(self.mktemp())
        antispam = dataclasses.replace(
            cfg.antispam, bayes=dataclasses.replace(cfg.antispam.bayes, **bayes_opts))
        return dataclasses.replace(cfg, antispam=antispam,
                                   server=dataclasses.replace(cfg.server, data_dir=data))

    def test_open_bayes_and_filters(self):
        cfg = self.config(min_spam=7, token_max_age="10d", max_tokens=1234)
        store = bayes.open_bayes(cfg, reactor)
        self.assertEqual(store.path, os.path.join(cfg.server.data_dir, "bayes.sqlite3"))
        self.assertEqual((store.max_tokens, store.max_age), (1234, 10 * 86400))
        self.assertEqual(bayes.filters(cfg, reactor, None, {}), [])
        [f] = bayes.filters(cfg, reactor, None, {"bayes": store, "store": object()})
        self.assertEqual((f.name, f.min_spam, f.store), ("bayes", 7, store))

    def test_disabled(self):
        cfg = self.config(enabled=False)
        self.assertIsNone(bayes.open_bayes(cfg, reactor))
        self.assertEqual(bayes.filters(cfg, reactor, None, {"bayes": object()}), [])


class TrainCommandTests(unittest.TestCase):

    def setUp(self):
        cfg = config_module.Config()
        self.data = os.path.abspath(self.mktemp())
        antispam = dataclasses.replace(
            cfg.antispam, bayes=dataclasses.replace(cfg.antispam.bayes, min_spam=3, min_ham=3))
        self.cfg = dataclasses.replace(cfg, antispam=antispam, server=dataclasses.replace(
            cfg.server, data_dir=self.data))
        self.db = os.path.join(self.data, "bayes.sqlite3")

    def maildir(self, kind):
        root = os.path.abspath(self.mktemp())
        for sub in ("cur", "new", "tmp"):
            os.makedirs(os.path.join(root, sub))
        for i, path in enumerate(fixture_files(kind)):
            sub = "cur" if i % 2 else "new"
            shutil.copy(path, os.path.join(root, sub, f"{i}.host:2,S" if i % 2 else f"{i}.host"))
        with open(os.path.join(root, "tmp", "partial"), "wb") as f:
            f.write(b"From: half")
        return root

    def totals(self, user=""):
        conn = bayes_store.connect(self.db)
        try:
            return bayes_store.user_totals(conn, user)
        finally:
            conn.close()

    def test_maildir_then_again(self):
        code, text = bayes_train.train_command(self.cfg, self.maildir("spam"), True)
        self.assertEqual(code, 0, text)
        self.assertIn("6 message(s) learned as spam for everybody (global)", text)
        self.assertIn("no opinion until 3 spam and 3 ham", text)
        code, text = bayes_train.train_command(self.cfg, self.maildir("spam"), True)
        self.assertIn("0 message(s) learned", text)
        self.assertIn("6 already learned as spam", text)
        self.assertEqual(self.totals(), (6, 0))

    def test_directory_of_files_mbox_and_single_file(self):
        code, text = bayes_train.train_command(self.cfg, os.path.join(FIXTURES, "ham"), False)
        self.assertIn("6 message(s) learned as ham", text)
        code, text = bayes_train.train_command(self.cfg, os.path.join(FIXTURES, "ham.mbox"),
                                               False)
        self.assertEqual(code, 0, text)
        self.assertIn("6 message(s) learned as ham", text)
        code, text = bayes_train.train_command(self.cfg, fixture_files("spam")[0], True)
        self.assertIn("1 message(s) learned as spam", text)
        self.assertEqual(self.totals(), (1, 12))

    def test_relearning_untrains_first(self):
        spam_file = fixture_files("spam")[0]
        bayes_train.train_command(self.cfg, spam_file, False)
        code, text = bayes_train.train_command(self.cfg, spam_file, True)
        self.assertIn("1 message(s) learned as spam for everybody (global) (1 of them "
                      "untrained from the other class first)", text)
        self.assertEqual(self.totals(), (1, 0))

    def test_per_user(self):
        code, text = bayes_train.train_command(self.cfg, os.path.join(FIXTURES, "spam"), True,
                                               user="Alice@Example.test")
        self.assertEqual(code, 0, text)
        self.assertIn("for alice@example.test", text)
        self.assertEqual(self.totals("alice@example.test"), (6, 0))
        self.assertEqual(self.totals(), (0, 0))

    def test_refusals(self):
        code, text = bayes_train.train_command(self.cfg, "/nonexistent/path", True)
        self.assertEqual(code, 1)
        self.assertIn("no such file", text)
        code, text = bayes_train.train_command(self.cfg, FIXTURES, True, user="not an address")
        self.assertEqual(code, 1)
        self.assertIn("expected an address", text)
        self.assertFalse(os.path.exists(self.db))

    def test_mbox_reading(self):
        msgs = list(bayes_train.mbox_messages(os.path.join(FIXTURES, "ham.mbox")))
        self.assertEqual(len(msgs), 6)
        self.assertTrue(msgs[0].startswith(b"Received: "))
        self.assertIn(b"\nFrom the desk of Alice", msgs[0])
        self.assertNotIn(b">From", msgs[0])

    def test_digest_ignores_added_fields_and_line_ends(self):
        raw = read(fixture_files("ham")[0])
        stored = b"X-Spam-Score: 0.1\r\nReturn-Path: <a@b>\r\n" + raw.replace(b"\n", b"\r\n")
        self.assertEqual(bayes_train.message_digest(raw), bayes_train.message_digest(stored))
        self.assertNotEqual(bayes_train.message_digest(raw),
                            bayes_train.message_digest(read(fixture_files("ham")[1])))


class MoveLearnerTests(unittest.TestCase):

    def test_which_moves_teach(self):
        v = bayes_train.verdict_of_move
        self.assertIs(v("INBOX", "Junk"), True)
        self.assertIs(v("Archive", "Junk"), True)
        self.assertIs(v("Junk", "INBOX"), False)
        self.assertIs(v("Junk", "Work.Projects"), False)
        self.assertIsNone(v("Junk", "Trash"))
        self.assertIsNone(v("Junk", "Junk"))
        self.assertIsNone(v("INBOX", "Archive"))

    @defer.inlineCallbacks
    def test_moves_learn_for_the_user(self):
        store = bayes_store.BayesStore(os.path.join(os.path.abspath(self.mktemp()), "b.sqlite3"),
                                       reactor)
        yield store.open()
        self.addCleanup(store.close)
        learner = bayes_train.MoveLearner(store)
        raw = read(fixture_files("spam")[0])
        self.assertEqual((yield learner.on_moved("example.test", "Alice", "INBOX", "Junk", raw)),
                         "learned")
        self.assertEqual((yield store.totals("alice@example.test")), (1, 0))
        self.assertEqual((yield learner.on_moved("example.test", "alice", "Junk", "INBOX", raw)),
                         "relearned")
        self.assertEqual((yield store.totals("alice@example.test")), (0, 1))
        self.assertIsNone((yield learner.on_moved("example.test", "alice", "Junk", "Trash", raw)))
        self.assertEqual((yield store.totals("")), (0, 0))
        # A closed database (a stop) is a warning, never raised to the IMAP side.
        yield store.close()
        self.assertIsNone((yield learner.on_moved("example.test", "alice", "INBOX", "Junk", raw)))
        self.assertEqual(self.flushLoggedErrors(RuntimeError), [])
        self.assertEqual(learner.pending, 0)
        # Any other failure is logged as one.
        broken = bayes_train.MoveLearner(BrokenLearnStore())
        self.assertIsNone((yield broken.on_moved("example.test", "alice", "INBOX", "Junk", raw)))
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)
        yield store.open()


class IMAPMoveHookTests(ApplianceMixin, unittest.TestCase):
    """COPY and MOVE into and out of Junk reach the IMAP factory's hook."""

    def setUp(self):
        return self.start_appliance(listeners=("imap",))

    def hook(self, fail=False):
        calls, waiting = [], []

        def on_moved(domain, local, source, dest, data):
            calls.append((domain, local, source, dest, data))
            while waiting and len(calls) >= waiting[0][0]:
                waiting.pop(0)[1].callback(None)
            if fail:
                raise ValueError("learning broke")
            return defer.succeed(None)
        self.app.listeners["imap"].factory.on_moved = on_moved

        def wait_for(n):
            if len(calls) >= n:
                return defer.succeed(None)
            d = defer.Deferred()
            waiting.append((n, d))
            return d
        return calls, wait_for

    def session(self):
        c = RawIMAP(self.ports["imap"])
        c.starttls()
        assert c.cmd("l", "LOGIN alice secret")[-1].startswith(b"l OK")
        return c

    def append(self, c, folder, data):
        c.send(f"a APPEND {folder} {{{len(data)}}}\r\n".encode())
        c.line()
        c.send(data + b"\r\n")
        return c.until_tag(b"a")

    @defer.inlineCallbacks
    def test_move_and_copy_reported(self):
        calls, wait_for = self.hook()
        spam = read(fixture_files("spam")[0]).replace(b"\n", b"\r\n")
        ham = read(fixture_files("ham")[0]).replace(b"\n", b"\r\n")

        def talk():
            c = self.session()
            out = [self.append(c, "INBOX", spam), self.append(c, "INBOX", ham)]
            out.append(c.cmd("s", "SELECT INBOX"))
            out.append(c.cmd("m", "MOVE 1 Junk"))
            out.append(c.cmd("c", "COPY 1 Archive"))        # not reported
            out.append(c.cmd("s2", "SELECT Junk"))
            out.append(c.cmd("c2", "UID COPY 1:* INBOX"))
            out.append(c.cmd("m2", "MOVE 1 Trash"))
            return out
        out = yield self.in_thread(talk)
        for lines in out:
            self.assertIn(b" OK", lines[-1], lines)
        yield wait_for(3)
        self.assertEqual([c[:4] for c in calls], [
            ("example.test", "alice", "INBOX", "Junk"),
            ("example.test", "alice", "Junk", "INBOX"),
            ("example.test", "alice", "Junk", "Trash")])
        self.assertEqual(calls[0][4], spam)
        self.assertEqual(calls[1][4], spam)

    @defer.inlineCallbacks
    def test_hook_failure_never_fails_the_command(self):
        calls, wait_for = self.hook(fail=True)

        def talk():
            c = self.session()
            self.append(c, "INBOX", read(fixture_files("spam")[1]).replace(b"\n", b"\r\n"))
            c.cmd("s", "SELECT INBOX")
            return c.cmd("m", "MOVE 1 Junk"), c.cmd("n", "NOOP")
        moved, noop = yield self.in_thread(talk)
        self.assertTrue(moved[-1].startswith(b"m OK"), moved)
        self.assertEqual(noop[-1], b"n OK NOOP completed")
        yield wait_for(1)
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)

    @defer.inlineCallbacks
    def test_no_hook_no_report(self):
        self.app.listeners["imap"].factory.on_moved = None

        def talk():
            c = self.session()
            self.append(c, "INBOX", read(fixture_files("ham")[1]).replace(b"\n", b"\r\n"))
            c.cmd("s", "SELECT INBOX")
            return c.cmd("m", "MOVE 1 Junk")
        moved = yield self.in_thread(talk)
        self.assertTrue(moved[-1].startswith(b"m OK"), moved)

    @defer.inlineCallbacks
    def test_moves_train_the_users_tokens(self):
        """The hook wired to the learner, as the appliance does."""
        store = bayes_store.BayesStore(os.path.join(self.config.server.data_dir,
                                                    "bayes.sqlite3"), reactor)
        yield store.open()
        self.addCleanup(store.close)
        learner = bayes_train.move_learner(self.config, store)
        learned = defer.DeferredQueue()

        def on_moved(*args):
            return learner.on_moved(*args).addCallback(learned.put)
        self.app.listeners["imap"].factory.on_moved = on_moved
        spam = read(fixture_files("spam")[2]).replace(b"\n", b"\r\n")

        def talk():
            c = self.session()
            self.append(c, "INBOX", spam)
            c.cmd("s", "SELECT INBOX")
            return c.cmd("m", "MOVE 1 Junk")
        yield self.in_thread(talk)
        self.assertEqual((yield learned.get()), "learned")
        self.assertEqual((yield store.totals("alice@example.test")), (1, 0))

        def back():
            c = self.session()
            c.cmd("s", "SELECT Junk")
            return c.cmd("m", "MOVE 1 INBOX")
        yield self.in_thread(back)
        self.assertEqual((yield learned.get()), "relearned")
        self.assertEqual((yield store.totals("alice@example.test")), (0, 1))


class InterfaceTests(unittest.TestCase):

    @defer.inlineCallbacks
    def test_the_store_provides_the_state_interface(self):
        from zope.interface.verify import verifyObject
        from mailbox_appliance.state import IBayesStore
        store = bayes_store.BayesStore(os.path.join(self.mktemp() + ".sqlite3"), reactor)
        verifyObject(IBayesStore, store)
        yield store.open()
        self.addCleanup(store.close)
        spam = read(fixture_files("spam")[0])
        self.assertEqual((yield store.learn("bob@example.test", spam, True)), "learned")
        self.assertEqual((yield store.learn("bob@example.test", spam, True)), "already")
        self.assertEqual((yield store.totals("bob@example.test")), (1, 0))
        c = yield store.classify(bayes_train.ScannedMessage.parse(spam), "bob@example.test",
                                 1, 1)
        self.assertIsNone(c.probability)       # no ham learned yet


class BrokenLearnStore:
    """A token database whose learning fails (a corrupt file)."""

    def learn(self, user, raw, spam):
        return defer.fail(ValueError("database disk image is malformed"))
