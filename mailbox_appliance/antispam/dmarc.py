"""``dmarc``: the From: domain's DMARC policy (RFC 7489), applied at end of data.

The domain in the From: field - the one the reader sees - publishes at
``_dmarc.<domain>`` what to do with mail that no mechanism ties to it. The
message *passes* when SPF passed for an envelope domain, or a DKIM
signature passed for a ``d=`` domain, that is aligned with the From:
domain: the same organisational domain (relaxed, the default) or exactly
the same name (``aspf=s`` / ``adkim=s``). The organisational domain is the
registered one, one label under a public suffix (RFC 7489 3.2), from the
Public Suffix List shipped in the ``publicsuffixlist`` package: nothing is
downloaded at run time.

Policy discovery (RFC 7489 6.6.3): the TXT records at ``_dmarc.<From
domain>`` that start ``v=DMARC1``; if there are none, those at
``_dmarc.<organisational domain>``, whose ``sp=`` (else ``p=``) then
applies to the subdomain. Several DMARC records at one name: no policy.
``pct=`` is honoured (a message outside the percentage gets the next
weaker policy, RFC 7489 6.6.4).

What a failing message gets:

- ``p=reject``: ``550 5.7.1 Message rejected by DMARC policy of <domain>``
  at end of data when ``[antispam.dmarc] reject_action = "reject"``
  (the default); delivered to Junk with "junk"; only scored with "tag";
- ``p=quarantine``: delivered to the recipients' Junk folder
  (``quarantine_action = "junk"``) or only scored ("tag");
- ``p=none``: only scored.

DNS trouble is ``temperror``: never a refusal (the SMTP client would not
try again for a 5xx; RFC 7489 says to apply no policy).

From: fields that do not name exactly one domain (RFC 7489 6.6.1): no
From at all, several From fields, several addresses, or a value the parser
calls malformed (the address-parser differential of CVE-2023-27043) get the
``DMARC_BAD_FROM`` hit, and *every* domain that appears in them is checked,
the strongest failing policy winning - a second From: cannot be a way
around the first one's policy.

The Authentication-Results entry is RFC 7489 11.2's
``dmarc=pass (p=reject dis=none) header.from=example.org``.
"""

from __future__ import annotations

import email.policy
import random
import re
import threading

from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from mailbox_appliance.antispam.content import ContentResult, IContentFilter
from mailbox_appliance.antispam.dnsquery import TempError, dns_name, lookup_txt
from mailbox_appliance.antispam.verdicts import note
from mailbox_appliance.smtp.policy import Verdict

log = Logger(namespace="mailbox_appliance.antispam.dmarc")

MAX_FROM_DOMAINS = 5        # domains checked for one message
MAX_FROM_VALUE = 2000       # characters of a From value given to the parser

SCORES = {"DMARC_PASS": -0.5, "DMARC_FAIL_REJECT": 2.0, "DMARC_FAIL_QUARANTINE": 1.5,
          "DMARC_FAIL_NONE": 0.1, "DMARC_NONE": 0.0, "DMARC_TEMPERROR": 0.0,
          "DMARC_BAD_FROM": 2.0}

POLICIES = ("none", "quarantine", "reject")
_WEAKER = {"reject": "quarantine", "quarantine": "none", "none": "none"}
_FOLD = re.compile(r"\r?\n[ \t]")
_AT_DOMAIN = re.compile(r"@\s*([A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?)")
_DMARC1 = re.compile(rb"^\s*v\s*=\s*DMARC1\s*(;|$)")

_psl_lock = threading.Lock()
_psl = None


def public_suffix_list():
    """The Public Suffix List (loaded once, about 60 ms)."""
    global _psl
    with _psl_lock:
        if _psl is None:
            from publicsuffixlist import PublicSuffixList
            _psl = PublicSuffixList()
        return _psl


def organisational_domain(domain: str) -> str:
    """RFC 7489 3.2: the public suffix plus one label; a public suffix itself as it is."""
    return public_suffix_list().privatesuffix(domain.lower()) or domain.lower()


def aligned(a: str, b: str, mode: str) -> bool:
    """``a`` and ``b`` aligned in ``mode`` ("s": the same name, "r": the same org domain)."""
    a, b = (a or "").lower().rstrip("."), (b or "").lower().rstrip(".")
    if not a or not b:
        return False
    if a == b:
        return True
    return mode != "s" and organisational_domain(a) == organisational_domain(b)


# --- the From: domains -----------------------------------------------------

def _ascii(domain: str):
    try:
        return dns_name(domain.encode("idna").decode("ascii") if not domain.isascii()
                        else domain)
    except UnicodeError:
        return None


def from_domains(message):
    """(domains, problem) of a message's From: fields (RFC 7489 6.6.1).

    ``domains``: the distinct domains named, in order, at most
    ``MAX_FROM_DOMAINS``; ``problem``: "" when there is exactly one From
    field naming one domain, else what is wrong. A value the parser finds
    defective also contributes every ``@domain`` it contains.
    """
    values = [v for n, v in message.raw_headers if n.lower() == "from"]
    if not values:
        return [], "no From field"
    problems, found = [], []
    if len(values) > 1:
        problems.append("several From fields")
    for raw in values:
        text = _FOLD.sub(" ", raw.decode("utf-8", "replace")).strip()
        names, defective = [], len(text) > MAX_FROM_VALUE
        if not defective:
            try:
                header = email.policy.default.header_factory("From", text)
                names = [a.domain for a in header.addresses]
                defective = bool(header.defects) or not names
            except Exception:           # RecursionError on "((((...", and the like
                defective = True
        if defective:
            problems.append("malformed From field")
            names += _AT_DOMAIN.findall(text[:MAX_FROM_VALUE * 4])
        for name in names:
            d = _ascii(name or "")
            if d is None:
                if "unusable From domain" not in problems:
                    problems.append("unusable From domain")
            elif d not in found:
                found.append(d)
    if len(found) > 1 and "several From fields" not in problems:
        problems.append("several From domains")
    if not found and "no From domain" not in problems:
        problems.append("no From domain")
    return found[:MAX_FROM_DOMAINS], ", ".join(dict.fromkeys(problems))


# --- records ----------------------------------------------------------------

class Record:
    """A parsed ``v=DMARC1`` record: p, sp, adkim, aspf, pct."""

    def __init__(self, p="none", sp=None, adkim="r", aspf="r", pct=100):
        self.p, self.sp, self.adkim, self.aspf, self.pct = p, sp or p, adkim, aspf, pct

    @classmethod
    def parse(cls, text: bytes) -> "Record":
        tags = {}
        for part in text.decode("ascii", "replace").split(";"):
            key, eq, value = part.partition("=")
            if eq:
                tags.setdefault(key.strip().lower(), value.strip())
        p = tags.get("p", "").lower()
        sp = tags.get("sp", "").lower()
        # RFC 7489 6.6.3: a missing or unknown p= is read as "none".
        p = p if p in POLICIES else "none"
        sp = sp if sp in POLICIES else p
        adkim = "s" if tags.get("adkim", "r").lower() == "s" else "r"
        aspf = "s" if tags.get("aspf", "r").lower() == "s" else "r"
        try:
            pct = min(100, max(0, int(tags.get("pct", "100"))))
        except ValueError:
            pct = 100
        return cls(p, sp, adkim, aspf, pct)


class Evaluation:
    """The DMARC result for one From domain."""

    def __init__(self, domain, result, policy="none", disposition="none", record=None,
                 reason=""):
        self.domain = domain
        self.result = result            # pass | fail | none | temperror
        self.policy = policy            # the policy that applied (p or sp)
        self.disposition = disposition  # what the policy asks for, after pct=
        self.applied = disposition      # what we did (reject_action...): dis=
        self.record = record
        self.reason = reason

    def auth(self) -> str:
        if self.result in ("pass", "fail"):
            return (f"dmarc={self.result} (p={self.policy} dis={self.applied}) "
                    f"header.from={self.domain}")
        return f"dmarc={self.result} header.from={self.domain}"


# --- the filter -------------------------------------------------------------

@implementer(IContentFilter)
class DMARCFilter:
    """The ``dmarc`` content filter (module docstring).

    ``resolver``: a twisted.names IResolver (``lookupText``), each lookup
    bounded by ``timeout`` seconds on ``reactor``'s clock.
    ``reject_action``: reject | junk | tag; ``quarantine_action``: junk |
    tag. ``sample`` (a float in [0, 1)) decides ``pct=``.
    """

    name = "dmarc"

    def __init__(self, reactor, resolver, timeout=10.0, reject_action="reject",
                 quarantine_action="junk", scores=None, sample=random.random):
        self.reactor = reactor
        self.resolver = resolver
        self.timeout = timeout
        self.reject_action = reject_action
        self.quarantine_action = quarantine_action
        self.scores = dict(SCORES, **(scores or {}))
        self.sample = sample
        public_suffix_list()

    def scan(self, message, session):
        domains, problem = from_domains(message)
        return defer.ensureDeferred(self._scan(message, domains, problem))

    async def _scan(self, message, domains, problem):
        qid = message.facts.get("qid", "-")
        hits, auth = {}, []
        if problem:
            hits["DMARC_BAD_FROM"] = self.scores["DMARC_BAD_FROM"]
            log.info("{qid}: dmarc: {problem}", qid=qid, problem=problem)
        if not domains:
            note(self.name, "permerror")
            return ContentResult(hits=hits, auth=["dmarc=permerror"],
                                 reason=problem)
        evaluations = await defer.gatherResults(
            [defer.ensureDeferred(self.evaluate(message, d)) for d in domains])
        verdict, action, worst = None, None, None
        for ev in evaluations:
            if ev.result == "fail":
                ev.applied = self._applied(ev.disposition)
                if worst is None or POLICIES.index(ev.applied) > POLICIES.index(worst.applied):
                    worst = ev
            auth.append(ev.auth())
            note(self.name, ev.result)
            if ev.result == "pass":
                hits.setdefault("DMARC_PASS", self.scores["DMARC_PASS"])
            elif ev.result == "none":
                hits.setdefault("DMARC_NONE", self.scores["DMARC_NONE"])
            elif ev.result == "temperror":
                hits["DMARC_TEMPERROR"] = self.scores["DMARC_TEMPERROR"]
            else:
                hit = f"DMARC_FAIL_{ev.disposition.upper()}"
                hits[hit] = self.scores[hit]
            log.info("{qid}: dmarc={result} header.from={domain} p={policy} "
                     "dis={dis}{why}", qid=qid, result=ev.result, domain=ev.domain,
                     policy=ev.policy, dis=ev.applied,
                     why=f" ({ev.reason})" if ev.reason else "")
        if len(evaluations) > 1 and "DMARC_PASS" in hits and any(
                ev.result != "pass" for ev in evaluations):
            del hits["DMARC_PASS"]      # one of several From domains is not a pass
        reason = problem
        if worst is not None and worst.applied == "reject":
            verdict = Verdict(550, "5.7.1", f"Message rejected by DMARC policy of {worst.domain}")
        elif worst is not None and worst.applied == "quarantine":
            action = "junk"
        if worst is not None:
            reason = "; ".join(filter(None, [problem, f"DMARC fail for {worst.domain} "
                                             f"(p={worst.policy} dis={worst.applied})"]))
        return ContentResult(hits=hits, auth=auth, verdict=verdict, action=action,
                             reason=reason)

    def _applied(self, asked) -> str:
        """What we do for a failing message whose policy asks ``asked`` (the dis= value)."""
        if asked == "reject":
            return {"reject": "reject", "junk": "quarantine"}.get(self.reject_action, "none")
        if asked == "quarantine":
            return "quarantine" if self.quarantine_action == "junk" else "none"
        return "none"

    async def evaluate(self, message, domain) -> Evaluation:
        """The Evaluation of the message for From domain ``domain``."""
        try:
            found = await self.discover(domain)
        except TempError as e:
            return Evaluation(domain, "temperror", reason=str(e))
        if found is None:
            return Evaluation(domain, "none", reason="no DMARC record")
        record, at_org, why = found
        if record is None:
            return Evaluation(domain, "none", reason=why)
        policy = record.sp if at_org else record.p
        spf_result, spf_domain = _spf_fact(message)
        dkim_domains = [f.get("domain", "") for f in message.facts.get("dkim") or ()
                        if f.get("result") == "pass"]
        if spf_result == "pass" and aligned(spf_domain, domain, record.aspf):
            return Evaluation(domain, "pass", policy, "none", record, "SPF aligned")
        for d in dkim_domains:
            if aligned(d, domain, record.adkim):
                return Evaluation(domain, "pass", policy, "none", record,
                                  f"DKIM d={d} aligned")
        disposition = policy
        if record.pct < 100 and self.sample() * 100 >= record.pct:
            disposition = _WEAKER[policy]
        return Evaluation(domain, "fail", policy, disposition, record,
                          "no aligned SPF or DKIM pass")

    async def discover(self, domain):
        """RFC 7489 6.6.3: None (no record), or (Record | None, found at the
        org domain, why no Record). Raises TempError."""
        texts = await self._records(f"_dmarc.{domain}")
        at_org = False
        if not texts:
            org = organisational_domain(domain)
            if org == domain:
                return None
            texts = await self._records(f"_dmarc.{org}")
            if not texts:
                return None
            at_org = True
        if len(texts) > 1:
            return None, at_org, "several DMARC records"
        return Record.parse(texts[0]), at_org, ""

    async def _records(self, name):
        if dns_name(name) is None:
            return []
        texts = await lookup_txt(self.resolver, self.reactor, name, self.timeout)
        return [t for t in texts if _DMARC1.match(t)]


def _spf_fact(message):
    fact = message.facts.get("spf") or ("", "")
    try:
        result, domain = fact
    except (TypeError, ValueError):
        return "", ""
    return (result or "").lower(), (domain or "").lower()


def filters(config, reactor, resolver, state=None):
    """[DMARCFilter] when ``[antispam.dmarc] enabled``; policies through ``resolver``."""
    dm = config.antispam.dmarc
    if not dm.enabled:
        return []
    return [DMARCFilter(reactor, resolver, timeout=config.dns.timeout,
                        reject_action=dm.reject_action,
                        quarantine_action=dm.quarantine_action)]
