"""``dkim_sign``: sign the mail our users submit with their domain's DKIM key (RFC 6376).

Runs on the submission ports only, after the submission fix-ups (Date,
Message-ID...), so the signature covers the message as it leaves. A message
is signed when its From: domain - or else its envelope sender's domain - is
one of ``[server] domains`` and a key for that domain is in
``data_dir/<key_dir>/`` (see ``dkim_keys``); otherwise it goes out
unsigned, as before.

The signature (RFC 6376 5.4, 5.4.2):

- relaxed/relaxed canonicalization: survives the header refolding and
  trailing-space changes that relays make;
- rsa-sha256, or ed25519-sha256 (RFC 8463) for an Ed25519 key when PyNaCl
  is installed (dkimpy needs it);
- the header fields that carry the message's meaning (From, Subject, To,
  Cc, Date, Message-ID, Reply-To, the MIME fields, the list and resent
  fields...), each as often as it occurs, and From, Subject, To, Cc,
  Reply-To, Date and the MIME fields once more ("over-signed"): a copy of
  one of these added on the way then breaks the signature instead of being
  displayed to the reader in place of the signed one.

A bare CR or LF in the message (not part of CRLF) is turned into CRLF first:
a relay would do it on the way, and the signature must be over what
arrives. The normalisation is the filter's ``rewrite`` and the signature is
computed over its result. Signing is CPU work (dkimpy's RSA is pure Python):
it runs in a worker thread, keys read from disk there too.
"""

from __future__ import annotations

import importlib.util
import os
import re

import dkim
from twisted.internet import defer, threads
from twisted.logger import Logger
from zope.interface import implementer

from mailbox_appliance.antispam.content import ContentResult, IContentFilter
from mailbox_appliance.antispam.dkim_keys import KeyStore
from mailbox_appliance.antispam.dmarc import from_domains
from mailbox_appliance.antispam.message import raw_header_fields, split_message
from mailbox_appliance.antispam.verdicts import note

log = Logger(namespace="mailbox_appliance.antispam.dkim_sign")

MAX_CONCURRENT = 2

# RFC 6376 5.4.1's list, plus the fields whose change alters what is shown.
SIGNED = ("from", "sender", "reply-to", "subject", "date", "message-id", "to", "cc",
          "mime-version", "content-type", "content-transfer-encoding", "content-id",
          "content-description", "resent-date", "resent-from", "resent-sender",
          "resent-to", "resent-cc", "resent-message-id", "in-reply-to", "references",
          "list-id", "list-help", "list-unsubscribe", "list-subscribe", "list-post",
          "list-owner", "list-archive", "list-unsubscribe-post")
# Listed once more than present: an added copy breaks the signature.
OVERSIGNED = frozenset({"from", "reply-to", "subject", "to", "cc", "date", "message-id",
                        "mime-version", "content-type", "content-transfer-encoding"})

_LINE_END = re.compile(rb"\r\n|\r|\n")


def normalise_line_ends(raw: bytes) -> bytes:
    """``raw`` with every bare CR and bare LF turned into CRLF."""
    return _LINE_END.sub(b"\r\n", raw)


def signed_fields(header_block: bytes) -> list:
    """The h= list for a header block: SIGNED fields present, OVERSIGNED ones once more."""
    present = [n.lower() for n, _ in raw_header_fields(header_block, limit=10000)]
    out = []
    for name in SIGNED:
        count = present.count(name)
        if count:
            out += [name] * (count + (1 if name in OVERSIGNED else 0))
    return out


def sign_message(raw, domain, key, nacl_ok=True):
    """(normalised message, DKIM-Signature value) or (normalised, None). Blocks."""
    data = normalise_line_ends(raw)
    block, _ = split_message(data)
    include = signed_fields(block)
    if "from" not in include:
        return data, None               # RFC 6376 5.4: From must be signed
    signer = dkim.DKIM(data, logger=None, signature_algorithm=key.algorithm)
    field = signer.sign(key.selector.encode("ascii"), domain.encode("ascii"), key.private,
                        canonicalize=(b"relaxed", b"relaxed"),
                        include_headers=[n.encode("ascii") for n in include])
    value = field.split(b":", 1)[1].strip().decode("ascii")
    return data, value


def nacl_available() -> bool:
    """Whether PyNaCl, which dkimpy signs Ed25519 with, is installed."""
    try:
        return importlib.util.find_spec("nacl.signing") is not None
    except ImportError:
        return False


@implementer(IContentFilter)
class DKIMSigner:
    """The ``dkim_sign`` content filter (module docstring).

    ``domains``: the local domains; ``key_dir``: the folder of the keys;
    ``selector``: the one tried first. ``run_in_thread`` (``f, *args`` ->
    Deferred) defaults to the reactor's thread pool.
    """

    name = "dkim_sign"

    def __init__(self, reactor, domains, key_dir, selector="mail", run_in_thread=None,
                 max_concurrent=MAX_CONCURRENT):
        self.reactor = reactor
        self.domains = {d.lower().rstrip(".") for d in domains}
        self.keys = KeyStore(key_dir, selector)
        self.nacl = nacl_available()
        self._run_in_thread = run_in_thread or self._in_pool
        self._slots = defer.DeferredSemaphore(max_concurrent)

    def _in_pool(self, f, *args):
        return threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(), f, *args)

    def signing_domain(self, message):
        """The local domain to sign for: From's, else the envelope sender's; or None."""
        domains, _ = from_domains(message)
        for d in domains:
            if d in self.domains:
                return d
        sender = str(message.sender or "")
        domain = sender.rpartition("@")[2].lower().rstrip(".")
        if "@" in sender and domain in self.domains:
            return domain
        return None

    def scan(self, message, session):
        domain = self.signing_domain(message)
        if domain is None:
            note(self.name, "not-local")
            return None
        return self._slots.run(self._run_in_thread, self._sign, message.raw, domain
                               ).addCallback(self._result, message, domain)

    def _sign(self, raw, domain):
        key, problem = self.keys.get_with_problem(domain)
        if key is None or (key.kind == "ed25519" and not self.nacl):
            return raw, None, key, problem
        data, value = sign_message(raw, domain, key)
        return data, value, key, problem

    def _result(self, signed, message, domain):
        data, value, key, problem = signed
        qid = message.facts.get("qid", "-")
        if problem:
            log.error("DKIM key for {domain} unusable: {problem}", domain=domain,
                      problem=problem)
        if key is None:
            note(self.name, "no-key")
            log.debug("{qid}: no DKIM key for {domain}", qid=qid, domain=domain)
            return None
        if value is None:
            note(self.name, "not-signed")
            why = ("Ed25519 key but PyNaCl is not installed" if key.kind == "ed25519"
                   else "no From field")
            log.warn("{qid}: not DKIM-signed for {domain}: {why}", qid=qid, domain=domain,
                     why=why)
            return None
        note(self.name, "signed")
        log.info("{qid}: DKIM-signed d={domain} s={selector} ({kind})", qid=qid,
                 domain=domain, selector=key.selector, kind=key.kind)
        original = message.raw

        def rewrite(raw):
            # The scan hands back the message it gave us: the signed bytes.
            return data if raw is original or raw == original else normalise_line_ends(raw)
        return ContentResult(headers=[("DKIM-Signature", value)], rewrite=rewrite)


def signers(config, reactor, run_in_thread=None):
    """[DKIMSigner] when ``[antispam.dkim] sign``; keys in data_dir/<key_dir>."""
    dk = config.antispam.dkim
    if not dk.sign:
        return []
    return [DKIMSigner(reactor, config.server.domains,
                       os.path.join(config.server.data_dir, dk.key_dir), dk.selector,
                       run_in_thread=run_in_thread)]
