"""Tests of DKIM: keys (keygen, the TXT record, the key store), the signer, the verifier.

Keys are published in a real twisted.names server on loopback
(``tests/dns_helpers.py``); the verifier asks it through the appliance's
resolver. Time is a Clock (``ClockedReactor``): a key lookup that gets no
answer is a temperror when the test advances the clock, never by waiting.
The security.md H3 cases are here: 50 signatures (at most 5 verified), a
512-bit key, a lookup timeout, ``l=`` with appended text, a From added
after signing.
"""

from __future__ import annotations

import base64
import os
import random
import re
import stat

import dkim
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from mailbox_appliance import config as config_module
from mailbox_appliance import dns as appliance_dns
from mailbox_appliance.antispam import dkim_keys, dkim_sign, dkim_verify
from mailbox_appliance.antispam.content import ContentResult
from mailbox_appliance.antispam.message import ScannedMessage
from tests.dns_helpers import start_fake_dns
from tests.sink_helpers import ClockedReactor

MESSAGE = (b"Received: from client (client [192.0.2.1])\r\n\tby mx.local.test; now\r\n"
           b"From: Alice <alice@example.org>\r\n"
           b"To: Bob <bob@ext.test>\r\n"
           b"Subject: Quarterly figures\r\n"
           b"Date: Sat, 28 Nov 2026 11:00:00 +0000\r\n"
           b"Message-ID: <1@example.org>\r\n"
           b"MIME-Version: 1.0\r\n"
           b"Content-Type: text/plain; charset=us-ascii\r\n"
           b"\r\n"
           b"Hello Bob,\r\n\r\nthe figures are attached.\r\n")


def txt_value(record: str) -> list:
    """The strings of a zone-file TXT line as dkim_keys writes it."""
    return re.findall(r'"([^"]*)"', record.split(" IN TXT ", 1)[1])


def is_prime(n):
    if n < 2:
        return False
    for p in (2, 3, 5, 7, 11, 13, 17, 19, 23, 29):
        if n % p == 0:
            return n == p
    d, s = n - 1, 0
    while d % 2 == 0:
        d, s = d // 2, s + 1
    for _ in range(20):
        x = pow(random.randrange(2, n - 1), d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = pow(x, 2, n)
            if x == n - 1:
                break
        else:
            return False
    return True


def small_rsa_key(bits=512):
    """An RSA key too small for DKIM (cryptography refuses to make one)."""
    def prime(b):
        while True:
            c = random.getrandbits(b) | (1 << b - 1) | (1 << b - 2) | 1
            if (c - 1) % 65537 and is_prime(c):
                return c
    p, q, e = prime(bits // 2), prime(bits // 2), 65537
    n = p * q
    d = pow(e, -1, (p - 1) * (q - 1))
    nums = rsa.RSAPrivateNumbers(p, q, d, d % (p - 1), d % (q - 1), pow(q, -1, p),
                                 rsa.RSAPublicNumbers(e, n))
    return nums.private_key(unsafe_skip_rsa_key_validation=True)


def pem_and_p(key):
    pem = key.private_bytes(serialization.Encoding.PEM,
                            serialization.PrivateFormat.TraditionalOpenSSL,
                            serialization.NoEncryption())
    return pem, dkim_keys.public_b64(key)[1]


def dkimpy_sign(raw, domain, selector, pem, **kw):
    """A DKIM-Signature field made by dkimpy itself (for the odd cases)."""
    kw.setdefault("canonicalize", (b"relaxed", b"relaxed"))
    return dkim.DKIM(raw).sign(selector.encode(), domain.encode(), pem, **kw)


class KeyTests(unittest.TestCase):
    """keygen: the file, its mode, the record, refusals; the key store."""

    def setUp(self):
        self.data_dir = os.path.abspath(self.mktemp())
        os.makedirs(self.data_dir)

    def config(self, **dkim_kw):
        return config_module.Config(
            server=config_module.ServerConfig(domains=("example.org", "Local.TEST"),
                                              data_dir=self.data_dir),
            antispam=config_module.AntispamConfig(dkim=config_module.DKIMConfig(**dkim_kw)))

    def test_generate_writes_a_private_file_and_returns_the_record(self):
        record = dkim_keys.generate(self.data_dir, "dkim", "example.org", "s1", bits=1024)
        path = os.path.join(self.data_dir, "dkim", "example.org.s1.key")
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        self.assertEqual(stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode), 0o700)
        with open(path, "rb") as f:
            self.assertTrue(f.read().startswith(b"-----BEGIN RSA PRIVATE KEY-----\n"))
        self.assertTrue(record.startswith('s1._domainkey.example.org. IN TXT "v=DKIM1; k=rsa; p='),
                        record)
        strings = txt_value(record)
        self.assertTrue(all(len(s) <= 255 for s in strings))
        p = "".join(strings).split("p=", 1)[1]
        public = serialization.load_der_public_key(base64.b64decode(p))
        self.assertEqual(public.key_size, 1024)

    def test_record_of_a_2048_bit_key_is_split_into_dns_strings(self):
        record = dkim_keys.generate(self.data_dir, "dkim", "example.org", "mail")
        strings = txt_value(record)
        self.assertEqual(len(strings), 2)
        self.assertEqual(len(strings[0]), 255)

    def test_existing_key_not_overwritten_without_force(self):
        dkim_keys.generate(self.data_dir, "dkim", "example.org", "s1", bits=1024)
        path = dkim_keys.key_path(self.data_dir, "dkim", "example.org", "s1")
        with open(path, "rb") as f:
            before = f.read()
        self.assertRaises(FileExistsError, dkim_keys.generate, self.data_dir, "dkim",
                          "example.org", "s1", bits=1024)
        dkim_keys.generate(self.data_dir, "dkim", "example.org", "s1", bits=1024, force=True)
        with open(path, "rb") as f:
            self.assertNotEqual(f.read(), before)
        self.assertEqual(os.listdir(os.path.dirname(path)), ["example.org.s1.key"])

    def test_small_sizes_and_bad_selectors_refused(self):
        self.assertRaises(ValueError, dkim_keys.generate, self.data_dir, "dkim",
                          "example.org", "s1", bits=512)
        for selector in ("../x", "a/b", "", "-x", "a..b"):
            self.assertRaises(ValueError, dkim_keys.generate, self.data_dir, "dkim",
                              "example.org", selector, bits=1024)
        self.assertFalse(os.path.exists(os.path.join(self.data_dir, "dkim", "x.key")))

    def test_keygen_command(self):
        cfg = self.config(selector="mail")
        code, text = dkim_keys.keygen_command(cfg, "Example.ORG", None, 1024, False)
        self.assertEqual(code, 0, text)
        self.assertIn("mail._domainkey.example.org. IN TXT", text)
        self.assertTrue(os.path.exists(os.path.join(self.data_dir, "dkim",
                                                    "example.org.mail.key")))
        code, again = dkim_keys.keygen_command(cfg, "example.org", "mail", 1024, False)
        self.assertEqual(code, 1)
        self.assertIn("--force", again)
        # The existing key's record is shown, the same as when it was made.
        self.assertIn(text.splitlines()[-1], again)
        code, forced = dkim_keys.keygen_command(cfg, "example.org", "mail", 1024, True)
        self.assertEqual(code, 0)
        self.assertNotEqual(forced.splitlines()[-1], text.splitlines()[-1])

    def test_keygen_command_refuses_other_domains(self):
        cfg = self.config()
        code, text = dkim_keys.keygen_command(cfg, "gmail.com", "mail", 1024, False)
        self.assertEqual(code, 1)
        self.assertIn("not one of this server's domains", text)
        code, _ = dkim_keys.keygen_command(cfg, "local.test", "s2", 1024, False)
        self.assertEqual(code, 0)
        code, text = dkim_keys.keygen_command(cfg, "local.test", "../../etc", 1024, False)
        self.assertEqual(code, 1)
        self.assertFalse(os.path.exists(os.path.join(self.data_dir, "etc")))

    def test_ed25519_key(self):
        record = dkim_keys.generate(self.data_dir, "dkim", "example.org", "ed",
                                    algorithm="ed25519-sha256")
        self.assertIn("k=ed25519; p=", record)
        p = "".join(txt_value(record)).split("p=", 1)[1]
        self.assertEqual(len(base64.b64decode(p)), 32)
        key = dkim_keys.KeyStore(os.path.join(self.data_dir, "dkim"), "ed").get("example.org")
        self.assertEqual((key.kind, key.algorithm), ("ed25519", b"ed25519-sha256"))
        self.assertEqual(len(base64.b64decode(key.private)), 32)

    def test_store_reads_once_and_again_after_a_change(self):
        folder = os.path.join(self.data_dir, "dkim")
        dkim_keys.generate(self.data_dir, "dkim", "example.org", "mail", bits=1024)
        store = dkim_keys.KeyStore(folder, "mail")
        first = store.get("example.org")
        self.assertIs(store.get("EXAMPLE.org."), first)
        dkim_keys.generate(self.data_dir, "dkim", "example.org", "mail", bits=1024, force=True)
        second = store.get("example.org")
        self.assertIsNot(second, first)
        self.assertNotEqual(second.private, first.private)
        self.assertIsNone(store.get("other.test"))
        self.assertIsNone(store.get("../dkim/example.org"))

    def test_store_falls_back_to_the_newest_key_of_another_selector(self):
        folder = os.path.join(self.data_dir, "dkim")
        dkim_keys.generate(self.data_dir, "dkim", "example.org", "old", bits=1024)
        dkim_keys.generate(self.data_dir, "dkim", "example.org", "new", bits=1024)
        os.utime(os.path.join(folder, "example.org.old.key"), (1, 1))
        store = dkim_keys.KeyStore(folder, "mail")
        self.assertEqual(store.get("example.org").selector, "new")
        dkim_keys.generate(self.data_dir, "dkim", "example.org", "mail", bits=1024)
        self.assertEqual(store.get("example.org").selector, "mail")

    def test_store_passes_over_a_broken_file(self):
        folder = os.path.join(self.data_dir, "dkim")
        os.makedirs(folder)
        with open(os.path.join(folder, "example.org.mail.key"), "wb") as f:
            f.write(b"not a key\n")
        store = dkim_keys.KeyStore(folder, "mail")
        key, problem = store.get_with_problem("example.org")
        self.assertIsNone(key)
        self.assertIn("not a PEM private key", problem)
        # Said once per change of the file.
        self.assertEqual(store.get_with_problem("example.org"), (None, ""))

    def test_store_refuses_a_key_too_small_for_dkim(self):
        folder = os.path.join(self.data_dir, "dkim")
        os.makedirs(folder)
        pem, _ = pem_and_p(small_rsa_key(512))
        with open(os.path.join(folder, "example.org.mail.key"), "wb") as f:
            f.write(pem)
        key, problem = dkim_keys.KeyStore(folder, "mail").get_with_problem("example.org")
        self.assertIsNone(key)
        self.assertIn("512 bits", problem)


class DNSTestBase(unittest.TestCase):
    """Keys made in setUp and published in a loopback DNS server."""

    timeout = 5

    @defer.inlineCallbacks
    def setUp(self):
        self.data_dir = os.path.abspath(self.mktemp())
        os.makedirs(self.data_dir)
        self.fake = yield start_fake_dns(self, {})
        self.reactor = ClockedReactor()
        cfg = config_module.Config(dns=config_module.DNSConfig(servers=(self.fake.server,),
                                                               timeout=2))
        self.resolver = appliance_dns.make_resolver(self.reactor, cfg)
        self.key_dir = os.path.join(self.data_dir, "dkim")
        self.publish("example.org", "s1")

    def publish(self, domain, selector, bits=1024, algorithm="rsa"):
        record = dkim_keys.generate(self.data_dir, "dkim", domain, selector, bits=bits,
                                    algorithm=algorithm, force=True)
        self.fake.set(f"{selector}._domainkey.{domain}", "TXT", [txt_value(record)])
        return record

    def key(self, domain, selector):
        return dkim_keys.read_key(dkim_keys.key_path(self.data_dir, "dkim", domain, selector),
                                  selector)

    def sign(self, raw=MESSAGE, domain="example.org", selector="s1"):
        data, value = dkim_sign.sign_message(raw, domain, self.key(domain, selector))
        return b"DKIM-Signature: " + value.encode() + b"\r\n" + data

    def verifier(self, **kw):
        kw.setdefault("timeout", self.timeout)
        return dkim_verify.DKIMVerifier(self.reactor, self.resolver, **kw)

    @defer.inlineCallbacks
    def verify(self, raw, **kw):
        msg = ScannedMessage.parse(raw, sender="alice@example.org")
        result = yield defer.maybeDeferred(self.verifier(**kw).scan, msg, None)
        return msg, result

    @defer.inlineCallbacks
    def assertResult(self, raw, result, reason=None, **kw):
        msg, res = yield self.verify(raw, **kw)
        facts = msg.facts["dkim"]
        self.assertEqual([f["result"] for f in facts], [result], facts)
        if reason is not None:
            self.assertIn(reason, facts[0]["reason"])
        return msg, res


class VerifyTests(DNSTestBase):

    @defer.inlineCallbacks
    def test_signed_message_passes(self):
        raw = self.sign()
        msg, res = yield self.verify(raw)
        self.assertEqual(msg.facts["dkim"], [{"domain": "example.org", "selector": "s1",
                                              "result": "pass", "reason": ""}])
        b = re.search(rb"\bb=([A-Za-z0-9+/]{8})", raw.replace(b"\r\n ", b"")).group(1).decode()
        shown = b if re.match("^[A-Za-z0-9+]+$", b) else f'"{b}"'
        self.assertEqual(res.auth, [f"dkim=pass header.d=example.org header.s=s1 "
                                    f"header.b={shown}"])
        self.assertEqual(res.hits, {"DKIM_VALID": -0.1})
        self.assertIsNone(res.verdict)

    @defer.inlineCallbacks
    def test_unsigned_message_is_none(self):
        msg, res = yield self.verify(MESSAGE)
        self.assertEqual(msg.facts["dkim"], [])
        self.assertEqual(res.hits, {"DKIM_NONE": 0.0})
        self.assertEqual(res.auth, ["dkim=none"])
        self.assertEqual(self.fake.queries, [])

    @defer.inlineCallbacks
    def test_tampered_body_fails(self):
        raw = self.sign().replace(b"figures are attached", b"figures are not attached")
        msg, res = yield self.assertResult(raw, "fail", "body hash mismatch")
        self.assertEqual(res.hits, {"DKIM_INVALID": 1.0})
        self.assertTrue(res.auth[0].startswith(
            'dkim=fail reason="body hash mismatch" header.d=example.org header.s=s1 header.b='),
            res.auth)
        self.assertIsNone(res.verdict)

    @defer.inlineCallbacks
    def test_changed_subject_fails(self):
        raw = self.sign().replace(b"Subject: Quarterly", b"Subject: Urgent quarterly")
        yield self.assertResult(raw, "fail", "did not verify")

    @defer.inlineCallbacks
    def test_relaxed_survives_refolding_and_trailing_space(self):
        raw = self.sign().replace(b"Subject: Quarterly figures",
                                  b"Subject:   Quarterly\r\n\tfigures  ")
        raw = raw.replace(b"attached.\r\n", b"attached.   \r\n\r\n\r\n")
        yield self.assertResult(raw, "pass")

    @defer.inlineCallbacks
    def test_from_added_after_signing_fails(self):
        # security.md H3: a second From above or below the signed one.
        signed = self.sign()
        above = signed.replace(b"From: Alice", b"From: Bank <alice@example.org>\r\nFrom: Alice")
        yield self.assertResult(above, "fail")
        below = signed.replace(b"To: Bob", b"From: Bank <ceo@example.org>\r\nTo: Bob")
        yield self.assertResult(below, "fail")

    @defer.inlineCallbacks
    def test_from_is_oversigned_and_singletons_too(self):
        raw = self.sign()
        h = re.search(rb"h=([^;]*);", raw.replace(b"\r\n ", b"")).group(1)
        names = [n.strip() for n in h.decode().split(":")]
        self.assertEqual(names.count("from"), 2)
        self.assertEqual(names.count("subject"), 2)
        self.assertNotIn("received", names)
        # A Subject added later (one the reader might be shown) breaks it.
        added = raw.replace(b"To: Bob", b"Subject: Invoice\r\nTo: Bob")
        yield self.assertResult(added, "fail")

    @defer.inlineCallbacks
    def test_forged_signature_of_another_key_fails(self):
        # Signed with a key that is not the one published for example.org.
        other = rsa.generate_private_key(public_exponent=65537, key_size=1024)
        pem, _ = pem_and_p(other)
        raw = dkimpy_sign(MESSAGE, "example.org", "s1", pem) + MESSAGE
        yield self.assertResult(raw, "fail", "did not verify")

    @defer.inlineCallbacks
    def test_512_bit_key_fails(self):
        # security.md H3, RFC 8301 3.2.
        pem, p = pem_and_p(small_rsa_key(512))
        self.fake.set("weak._domainkey.example.org", "TXT", [f"v=DKIM1; k=rsa; p={p}"])
        raw = dkimpy_sign(MESSAGE, "example.org", "weak", pem) + MESSAGE
        msg, res = yield self.assertResult(raw, "fail", "512 bits is too small")
        self.assertEqual(res.hits, {"DKIM_INVALID": 1.0})

    @defer.inlineCallbacks
    def test_rsa_sha1_fails(self):
        pem = self.key("example.org", "s1").private
        raw = dkimpy_sign(MESSAGE, "example.org", "s1", pem,
                          signature_algorithm=b"rsa-sha1") + MESSAGE
        yield self.assertResult(raw, "fail", "rsa-sha1")

    @defer.inlineCallbacks
    def test_oversized_exponent_refused_before_any_arithmetic(self):
        # A 100-bit public exponent: harmless here, but one of thousands of
        # bits makes each verification cost seconds. Refused without trying.
        key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
        n = key.public_key().public_numbers().n
        odd = rsa.RSAPublicNumbers((1 << 99) | 1, n).public_key()
        p = base64.b64encode(odd.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)).decode()
        self.fake.set("odd._domainkey.example.org", "TXT", [f"v=DKIM1; p={p}"])
        pem, _ = pem_and_p(key)
        raw = dkimpy_sign(MESSAGE, "example.org", "odd", pem) + MESSAGE
        yield self.assertResult(raw, "permerror", "oversized exponent")

    def test_key_size_limits(self):
        problem = dkim_verify._key_problem
        self.assertEqual(problem(b"rsa", {"publicExponent": 65537}, 16384, 1024)[0],
                         "permerror")
        self.assertEqual(problem(b"rsa", {"publicExponent": 65537}, 1023, 1024)[0], "fail")
        self.assertIsNone(problem(b"rsa", {"publicExponent": 65537}, 8192, 1024))
        self.assertIsNone(problem(b"ed25519", object(), 256, 1024))
        self.assertEqual(problem(b"rsa", None, 0, 1024)[0], "permerror")

    @defer.inlineCallbacks
    def test_no_key_in_dns_is_permerror(self):
        pem = self.key("example.org", "s1").private
        raw = dkimpy_sign(MESSAGE, "example.org", "gone", pem) + MESSAGE
        msg, res = yield self.assertResult(raw, "permerror", "no key at gone._domainkey")
        self.assertEqual(res.hits, {"DKIM_INVALID": 1.0})

    @defer.inlineCallbacks
    def test_revoked_key_is_permerror(self):
        self.fake.set("s1._domainkey.example.org", "TXT", ["v=DKIM1; k=rsa; p="])
        yield self.assertResult(self.sign(), "permerror", "revoked")

    @defer.inlineCallbacks
    def test_servfail_is_temperror(self):
        self.fake.servfail.add("s1._domainkey.example.org")
        msg, res = yield self.assertResult(self.sign(), "temperror")
        self.assertEqual(res.hits, {"DKIM_TEMPERROR": 0.0})
        self.assertIsNone(res.verdict)
        self.assertTrue(res.auth[0].startswith("dkim=temperror reason="), res.auth)

    @defer.inlineCallbacks
    def test_lookup_timeout_is_temperror(self):
        # security.md H3: the key's server never answers.
        self.fake.silent.add("s1._domainkey.example.org")
        msg = ScannedMessage.parse(self.sign())
        d = defer.maybeDeferred(self.verifier(timeout=5).scan, msg, None)
        for _ in range(500):
            if self.fake.queries:
                break
            yield task.deferLater(reactor, 0.01, lambda: None)
        self.assertFalse(d.called)
        self.reactor.clock.advance(5)
        res = yield d
        self.assertEqual([f["result"] for f in msg.facts["dkim"]], ["temperror"])
        self.assertIn("timeout", msg.facts["dkim"][0]["reason"])
        self.assertIsNone(res.verdict)
        self.reactor.clock.advance(10)         # the resolver's own retries give up

    @defer.inlineCallbacks
    def test_fifty_signatures_verify_at_most_five(self):
        # security.md H3: each signature names its own key; five are looked up.
        pem = self.key("example.org", "s1").private
        raw = MESSAGE
        for i in range(50):
            raw = dkimpy_sign(raw, "example.org", f"sel{i}", pem) + raw
        msg, res = yield self.verify(raw)
        self.assertEqual(len(msg.facts["dkim"]), 5)
        self.assertEqual(len(res.auth), 5)
        self.assertEqual(len(self.fake.queries), 5)
        # The topmost (latest) signatures are the ones checked.
        self.assertEqual([f["selector"] for f in msg.facts["dkim"]],
                         [f"sel{i}" for i in range(49, 44, -1)])

    @defer.inlineCallbacks
    def test_one_good_among_bad_is_valid(self):
        pem = self.key("example.org", "s1").private
        raw = self.sign()
        raw = dkimpy_sign(raw, "example.org", "nokey", pem) + raw
        msg, res = yield self.verify(raw)
        self.assertEqual([f["result"] for f in msg.facts["dkim"]], ["permerror", "pass"])
        self.assertEqual(res.hits, {"DKIM_VALID": -0.1})

    @defer.inlineCallbacks
    def test_length_limit_with_appended_text_is_not_a_pass(self):
        # security.md H3: l= covers the original body; what is appended is unsigned.
        pem = self.key("example.org", "s1").private
        raw = dkimpy_sign(MESSAGE, "example.org", "s1", pem, length=True) + MESSAGE
        yield self.assertResult(raw, "pass")
        appended = raw + b"\r\nClick http://evil.test/login to confirm your account.\r\n"
        msg, res = yield self.assertResult(appended, "policy", "not signed")
        self.assertEqual(res.hits, {"DKIM_INVALID": 1.0, "DKIM_LENGTH_LIMIT": 1.0})
        self.assertTrue(res.auth[0].startswith("dkim=policy reason="), res.auth)

    @defer.inlineCallbacks
    def test_signature_without_from_is_permerror(self):
        pem = self.key("example.org", "s1").private
        # dkimpy insists on From when signing: sign, then take From out of h=.
        field = dkimpy_sign(MESSAGE, "example.org", "s1", pem,
                            include_headers=[b"from", b"subject"])
        field = field.replace(b"h=from : subject", b"h=subject")
        yield self.assertResult(field + MESSAGE, "permerror", "From is not signed")

    @defer.inlineCallbacks
    def test_malformed_signatures_are_permerror(self):
        for field in (b"DKIM-Signature: v=1; a=rsa-sha256; d=example.org\r\n",
                      b"DKIM-Signature: garbage\r\n",
                      b"DKIM-Signature: v=1; a=rsa-sha256; d=exa\xffmple.org; s=s1; h=from;"
                      b" bh=AAAA; b=AAAA\r\n",
                      b"DKIM-Signature: v=1; a=rsa-sha256; d=ex;ample.org; s=s1; h=from;"
                      b" bh=AAAA; b=AAAA\r\n"):
            msg, res = yield self.verify(field + MESSAGE)
            self.assertEqual([f["result"] for f in msg.facts["dkim"]], ["permerror"], field)
            self.assertEqual(res.hits, {"DKIM_INVALID": 1.0})
            for entry in res.auth:
                # Nothing from the field reaches our header unquoted.
                self.assertNotIn("\xff", entry)
                self.assertNotIn(";", entry.replace('"ex;ample.org"', ""))

    @defer.inlineCallbacks
    def test_ed25519_signature_passes(self):
        if not dkim_sign.nacl_available():
            raise unittest.SkipTest("PyNaCl is not installed")
        self.publish("example.org", "ed", algorithm="ed25519")
        raw = self.sign(selector="ed")
        self.assertIn(b"a=ed25519-sha256", raw)
        yield self.assertResult(raw, "pass")
        yield self.assertResult(raw.replace(b"Hello Bob", b"Hello Eve"), "fail")

    def test_factory_reads_the_config(self):
        cfg = config_module.Config(
            dns=config_module.DNSConfig(timeout=3),
            antispam=config_module.AntispamConfig(
                dkim=config_module.DKIMConfig(max_signatures=2)))
        [f] = dkim_verify.filters(cfg, self.reactor, self.resolver)
        self.assertEqual((f.name, f.max_signatures, f.timeout), ("dkim", 2, 3))
        off = config_module.Config(antispam=config_module.AntispamConfig(
            dkim=config_module.DKIMConfig(verify=False)))
        self.assertEqual(dkim_verify.filters(off, self.reactor, self.resolver), [])


class SignerTests(DNSTestBase):

    def signer(self, domains=("example.org", "local.test"), selector="s1"):
        return dkim_sign.DKIMSigner(self.reactor, domains, self.key_dir, selector)

    @defer.inlineCallbacks
    def run_signer(self, raw, sender="alice@example.org", **kw):
        msg = ScannedMessage.parse(raw, sender=sender)
        result = yield defer.maybeDeferred(self.signer(**kw).scan, msg, None)
        if result is None:
            return None, raw
        self.assertIsInstance(result, ContentResult)
        # What ContentScan does with it: rewrite, then the fields on top.
        out = result.rewrite(msg.raw)
        top = b"".join(f"{n}: {v}\r\n".encode() for n, v in result.headers)
        return result, top + out

    @defer.inlineCallbacks
    def test_signed_message_verifies(self):
        result, out = yield self.run_signer(MESSAGE)
        [(name, value)] = result.headers
        self.assertEqual(name, "DKIM-Signature")
        for tag in ("a=rsa-sha256", "c=relaxed/relaxed", "d=example.org", "s=s1"):
            self.assertIn(tag, value)
        self.assertIsNone(result.verdict)
        self.assertIsNone(result.action)
        yield self.assertResult(out, "pass")

    @defer.inlineCallbacks
    def test_stray_line_ends_normalised_before_signing(self):
        raw = MESSAGE.replace(b"the figures", b"the\rfigures").replace(
            b"Hello Bob,\r\n", b"Hello Bob,\n") + b"bare LF\nend\r\n"
        result, out = yield self.run_signer(raw)
        self.assertNotIn(b"\rf", out)
        self.assertEqual(out.count(b"\r\n"), out.count(b"\n"))
        self.assertEqual(out.count(b"\r\n"), out.count(b"\r"))
        self.assertIn(b"the\r\nfigures", out)
        yield self.assertResult(out, "pass")
        self.assertEqual(dkim_sign.normalise_line_ends(b"a\rb\nc\r\nd\n\r"),
                         b"a\r\nb\r\nc\r\nd\r\n\r\n")

    @defer.inlineCallbacks
    def test_envelope_sender_domain_when_from_is_not_local(self):
        raw = MESSAGE.replace(b"alice@example.org", b"alice@elsewhere.test")
        result, out = yield self.run_signer(raw, sender="alice@example.org")
        self.assertIn("d=example.org", result.headers[0][1])
        yield self.assertResult(out, "pass")

    @defer.inlineCallbacks
    def test_other_domains_not_signed(self):
        raw = MESSAGE.replace(b"alice@example.org", b"alice@elsewhere.test")
        result, _ = yield self.run_signer(raw, sender="alice@elsewhere.test")
        self.assertIsNone(result)

    @defer.inlineCallbacks
    def test_local_domain_without_key_not_signed(self):
        raw = MESSAGE.replace(b"alice@example.org", b"alice@local.test")
        result, _ = yield self.run_signer(raw, sender="alice@local.test")
        self.assertIsNone(result)

    @defer.inlineCallbacks
    def test_new_key_used_without_restart(self):
        signer = self.signer()
        msg = ScannedMessage.parse(MESSAGE, sender="alice@example.org")
        first = yield signer.scan(msg, None)
        self.publish("example.org", "s1")
        second = yield signer.scan(msg, None)
        out = second.rewrite(msg.raw)
        raw = f"DKIM-Signature: {second.headers[0][1]}\r\n".encode() + out
        yield self.assertResult(raw, "pass")
        stale = f"DKIM-Signature: {first.headers[0][1]}\r\n".encode() + out
        yield self.assertResult(stale, "fail")

    def test_signed_fields(self):
        block = (b"From: a@example.org\r\nTo: b@x.test\r\nTo: c@x.test\r\nReceived: x\r\n"
                 b"Subject: s\r\nX-Mailer: m\r\nBcc: secret@x.test\r\nList-Id: <l.x.test>\r\n")
        self.assertEqual(dkim_sign.signed_fields(block),
                         ["from", "from", "subject", "subject", "to", "to", "to", "list-id"])

    def test_factory_reads_the_config(self):
        cfg = config_module.Config(
            server=config_module.ServerConfig(domains=("example.org",), data_dir=self.data_dir),
            antispam=config_module.AntispamConfig(
                dkim=config_module.DKIMConfig(selector="s9", key_dir="keys")))
        [s] = dkim_sign.signers(cfg, self.reactor)
        self.assertEqual(s.name, "dkim_sign")
        self.assertEqual(s.keys.folder, os.path.join(self.data_dir, "keys"))
        self.assertEqual(s.keys.selector, "s9")
        off = config_module.Config(antispam=config_module.AntispamConfig(
            dkim=config_module.DKIMConfig(sign=False)))
        self.assertEqual(dkim_sign.signers(off, self.reactor), [])

