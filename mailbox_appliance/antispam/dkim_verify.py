"""``dkim``: verify the DKIM signatures of inbound mail (RFC 6376, with dkimpy).

Each ``DKIM-Signature:`` field says that a domain (``d=``) vouches for the
header fields it lists (``h=``) and the body, with a key published at
``<s=>._domainkey.<d=>``. The verifier checks every signature, up to
``max_signatures`` of them (the topmost: the most recent), and reports one
result per signature in RFC 8601 terms:

- ``pass``: the signature verifies;
- ``fail``: it does not (body or header fields changed, a wrong key), or it
  uses what RFC 8301 forbids: rsa-sha1, an RSA key under 1024 bits;
- ``policy``: it verifies, but the body has text after the ``l=`` length
  that the signature does not cover (RFC 6376 8.2: anyone could have
  appended it, so it does not count as a pass - DMARC must not trust it);
- ``permerror``: the signature or the key cannot be used (a tag missing or
  malformed, From not signed, no key in DNS, a revoked or unusable key);
- ``temperror``: the key could not be looked up now (SERVFAIL, timeout) -
  never a reason to refuse the message.

An extra From: field added after signing makes the signature fail: dkimpy
hashes one more From than ``h=`` lists, so a second From cannot hide.

The results go to ``message.facts["dkim"]`` (a list of dicts: domain,
selector, result, reason) for DMARC, to the Authentication-Results field
("dkim=pass header.d=example.org header.s=s1 header.b=abcdefgh", one per
signature) and to the score as hits: ``DKIM_VALID`` (a signature passed),
``DKIM_INVALID`` (signed, none passed), ``DKIM_NONE`` (not signed),
``DKIM_TEMPERROR`` and ``DKIM_LENGTH_LIMIT`` (unsigned text after l=).

The keys are looked up on the reactor through the appliance's resolver
(``[dns] servers``, cached, under ``[dns] timeout``); the hashing and RSA
arithmetic (dkimpy is pure Python) run in a worker thread, a few at a time.
A key of more than 8192 bits or with a huge exponent is refused before any
arithmetic: it would cost seconds of CPU per message.
"""

from __future__ import annotations

import binascii
import logging
import re

import dkim
from dkim.canonicalization import CanonicalizationPolicy
from dkim.util import InvalidTagValueList, parse_tag_value
from twisted.internet import defer, threads
from twisted.logger import Logger
from zope.interface import implementer

from mailbox_appliance.antispam.content import ContentResult, IContentFilter
from mailbox_appliance.antispam.dnsquery import TempError, dns_name, lookup_txt
from mailbox_appliance.antispam.verdicts import note

log = Logger(namespace="mailbox_appliance.antispam.dkim")

MAX_SIGNATURES = 5
MIN_KEY_BITS = 1024         # RFC 8301 3.2
MAX_KEY_BITS = 8192         # beyond: refused, the modular arithmetic gets too slow
MAX_EXPONENT_BITS = 64
MAX_CONCURRENT = 4          # verifications in threads at once (per filter)
MAX_REASON = 100

SCORES = {"DKIM_VALID": -0.1, "DKIM_INVALID": 1.0, "DKIM_NONE": 0.0,
          "DKIM_TEMPERROR": 0.0, "DKIM_LENGTH_LIMIT": 1.0}

_FOLD = re.compile(rb"\r?\n[ \t]")
_TOKEN = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`{|}~-]+$")

# dkimpy logs what it finds wrong at error level; the result says it already.
_quiet = logging.getLogger("mailbox_appliance.dkimpy")
_quiet.addHandler(logging.NullHandler())
_quiet.propagate = False


def printable(text, limit=MAX_REASON) -> str:
    """One line of printable ASCII, at most ``limit`` characters."""
    if isinstance(text, bytes):
        text = text.decode("ascii", "replace")
    text = " ".join("".join(c if " " <= c <= "~" else " " for c in str(text)).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def pvalue(text) -> str:
    """An RFC 8601 property or reason value: a token, else a quoted-string."""
    text = printable(text)
    if _TOKEN.match(text):
        return text
    return '"' + text.replace("\\", "").replace('"', "'") + '"'


class Signature:
    """What the reactor side reads from one DKIM-Signature before verifying:
    the signing domain, selector, the start of b=, and the key's DNS name
    (None when d= or s= cannot be a DNS name)."""

    def __init__(self, raw_value: bytes):
        self.domain = self.selector = self.b = ""
        self.key_name = None
        self.problem = ""
        try:
            tags = parse_tag_value(_FOLD.sub(b" ", raw_value))
        except (InvalidTagValueList, ValueError) as e:
            self.problem = f"malformed signature ({type(e).__name__})"
            return
        self.domain = printable(tags.get(b"d", b""), 253)
        self.selector = printable(tags.get(b"s", b""), 253)
        self.b = printable(re.sub(rb"\s+", b"", tags.get(b"b", b""))[:8], 8)
        domain, selector = dns_name(tags.get(b"d", b"")), tags.get(b"s", b"")
        if domain is not None and selector:
            self.key_name = dns_name(selector + b"._domainkey." + domain.encode())
        if self.key_name is None:
            self.problem = "d= or s= is not a domain name"


# --- the verification proper (in a worker thread) -------------------------

def _key_problem(ktag, pk, bits, min_bits):
    """(result, reason) when a parsed key may not be used, else None."""
    if pk is None:
        return "permerror", "key not for email (s= tag)"
    if ktag == b"rsa":
        if bits > MAX_KEY_BITS:
            return "permerror", f"RSA key of {bits} bits is too large"
        if pk["publicExponent"].bit_length() > MAX_EXPONENT_BITS:
            return "permerror", "RSA key with an oversized exponent"
        if bits < min_bits:
            return "fail", f"RSA key of {bits} bits is too small (RFC 8301)"
    return None


def _verify_one(d, idx, keys, min_bits):
    """(result, reason) of signature ``idx`` (0 = topmost) of the DKIM object ``d``."""
    try:
        prep = d.verify_headerprep(idx)
    except dkim.DKIMException as e:
        return "permerror", str(e)
    if not prep:
        return "permerror", "signature not found"
    sig, include, sigheaders = prep
    if b"from" not in include:
        # RFC 6376 6.1.1: a signature must cover From.
        return "permerror", "From is not signed"
    if sig[b"a"] == b"rsa-sha1":
        return "fail", "rsa-sha1 is not acceptable (RFC 8301)"
    name = dns_name(sig[b"s"] + b"._domainkey." + sig[b"d"])
    if name is None:
        return "permerror", "d= or s= is not a domain name"
    found = keys.get(name)
    if found is None:
        return "permerror", "key not looked up"
    kind, text = found
    if kind == "temperror":
        return "temperror", text
    if kind == "none":
        return "permerror", f"no key at {name}"
    try:
        pk, bits, ktag, tlsrpt = dkim.evaluate_pk(name, text)
    except dkim.NaClNotFoundError:
        return "permerror", "ed25519 keys are not supported here"
    except (dkim.DKIMException, binascii.Error, ValueError, TypeError, KeyError, IndexError):
        if re.search(rb"(^|;)\s*p\s*=\s*(;|$)", text):
            return "permerror", "key revoked (empty p=)"
        return "permerror", "unusable key"
    problem = _key_problem(ktag, pk, bits or 0, min_bits)
    if problem is not None:
        return problem
    d.pk, d.keysize, d.ktag, d.seqtlsrpt = pk, bits, ktag, tlsrpt
    try:
        ok = d.verify_sig_process(sig, include, sigheaders[idx], None)
    except dkim.ValidationError as e:
        text = str(e)
        return ("fail", "body hash mismatch") if "body hash" in text else ("permerror", text)
    except dkim.KeyFormatError as e:
        return "fail", str(e)
    except dkim.DKIMException as e:
        return "permerror", str(e)
    if not ok:
        return "fail", "signature did not verify"
    if b"l" in sig:
        canon = CanonicalizationPolicy.from_c_value(sig.get(b"c", b"simple/simple"))
        extra = len(canon.canonicalize_body(d.body)) - int(sig[b"l"])
        if extra > 0:
            return "policy", f"{extra} body octets after l= are not signed"
    return "pass", ""


def verify_signatures(raw, count, keys, min_bits=MIN_KEY_BITS):
    """[(result, reason)] for the first ``count`` signatures of ``raw``. Blocks.

    ``keys`` maps each key's DNS name to ("ok", TXT bytes), ("none", "") or
    ("temperror", reason): the lookups were made beforehand.
    """
    try:
        d = dkim.DKIM(raw, logger=_quiet, minkey=min_bits)
    except dkim.DKIMException as e:
        return [("permerror", f"message cannot be parsed: {e}")] * count
    out = []
    for idx in range(count):
        try:
            result, reason = _verify_one(d, idx, keys, min_bits)
        except Exception as e:      # dkimpy on input it did not expect
            log.failure("dkim: verifying signature {idx} failed", idx=idx)
            result, reason = "permerror", f"internal error {type(e).__name__}"
        out.append((result, printable(reason)))
    return out


# --- the filter -----------------------------------------------------------

def _choose_key(texts):
    """The key record among the TXT records at a key name (RFC 6376 3.6.2.2)."""
    for t in texts:
        if t.lstrip().startswith(b"v=DKIM1"):
            return t
    return texts[0]


@implementer(IContentFilter)
class DKIMVerifier:
    """The ``dkim`` content filter (module docstring).

    ``resolver`` is a twisted.names IResolver (``lookupText``); ``timeout``
    bounds each key lookup, on ``reactor``'s clock. ``run_in_thread``
    (``f, *args`` -> Deferred) defaults to the reactor's thread pool.
    ``scores`` overrides entries of ``SCORES``.
    """

    name = "dkim"

    def __init__(self, reactor, resolver, timeout=10.0, max_signatures=MAX_SIGNATURES,
                 min_key_bits=MIN_KEY_BITS, scores=None, run_in_thread=None,
                 max_concurrent=MAX_CONCURRENT):
        self.reactor = reactor
        self.resolver = resolver
        self.timeout = timeout
        self.max_signatures = max(1, max_signatures)
        self.min_key_bits = min_key_bits
        self.scores = dict(SCORES, **(scores or {}))
        self._run_in_thread = run_in_thread or self._in_pool
        self._slots = defer.DeferredSemaphore(max_concurrent)

    def _in_pool(self, f, *args):
        return threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(), f, *args)

    def scan(self, message, session):
        values = [v for n, v in message.raw_headers if n.lower() == "dkim-signature"]
        if not values:
            message.facts["dkim"] = []
            note(self.name, "none")
            return ContentResult(hits={"DKIM_NONE": self.scores["DKIM_NONE"]},
                                 auth=["dkim=none"])
        if len(values) > self.max_signatures:
            log.info("{qid}: {n} DKIM signatures, only the first {max} verified",
                     qid=message.facts.get("qid", "-"), n=len(values), max=self.max_signatures)
        sigs = [Signature(v) for v in values[:self.max_signatures]]
        return defer.ensureDeferred(self._scan(message, sigs))

    async def _scan(self, message, sigs):
        names = sorted({s.key_name for s in sigs if s.key_name})
        found = await defer.gatherResults([self._key(n) for n in names])
        keys = dict(zip(names, found))
        outcomes = await self._slots.run(self._run_in_thread, verify_signatures,
                                         message.raw, len(sigs), keys, self.min_key_bits)
        return self._result(message, sigs, outcomes)

    def _key(self, name):
        d = lookup_txt(self.resolver, self.reactor, name, self.timeout)

        def found(texts):
            return ("ok", _choose_key(texts)) if texts else ("none", "")

        def failed(failure):
            failure.trap(TempError)
            return ("temperror", str(failure.value))
        return d.addCallbacks(found, failed)

    def _result(self, message, sigs, outcomes):
        facts, auth = [], []
        for sig, (result, reason) in zip(sigs, outcomes):
            if sig.problem and result == "permerror" and not sig.domain:
                reason = sig.problem
            facts.append({"domain": sig.domain.lower(), "selector": sig.selector,
                          "result": result, "reason": reason})
            entry = f"dkim={result}"
            if reason and result != "pass":
                entry += f" reason={pvalue(reason)}"
            if sig.domain:
                entry += f" header.d={pvalue(sig.domain)}"
            if sig.selector:
                entry += f" header.s={pvalue(sig.selector)}"
            if sig.b:
                entry += f" header.b={pvalue(sig.b)}"
            auth.append(entry)
        message.facts["dkim"] = facts
        results = {f["result"] for f in facts}
        hits = {}
        if "pass" in results:
            hits["DKIM_VALID"] = self.scores["DKIM_VALID"]
        elif results & {"fail", "permerror", "policy"}:
            hits["DKIM_INVALID"] = self.scores["DKIM_INVALID"]
        else:
            hits["DKIM_TEMPERROR"] = self.scores["DKIM_TEMPERROR"]
        if "policy" in results:
            hits["DKIM_LENGTH_LIMIT"] = self.scores["DKIM_LENGTH_LIMIT"]
        for f in facts:
            note(self.name, f["result"])
        log.info("{qid}: dkim {results}", qid=message.facts.get("qid", "-"),
                 results="; ".join(f"{f['domain']}/{f['selector']}={f['result']}"
                                   + (f" ({f['reason']})" if f["reason"] else "")
                                   for f in facts))
        return ContentResult(hits=hits, auth=auth)


def filters(config, reactor, resolver, state=None, run_in_thread=None):
    """[DKIMVerifier] when ``[antispam.dkim] verify``; keys through ``resolver``."""
    dk = config.antispam.dkim
    if not dk.verify:
        return []
    return [DKIMVerifier(reactor, resolver, timeout=config.dns.timeout,
                         max_signatures=dk.max_signatures, run_in_thread=run_in_thread)]
