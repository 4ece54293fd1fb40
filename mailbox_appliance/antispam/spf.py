"""``spf``: the Sender Policy Framework check of the envelope sender (RFC 7208), at MAIL.

The sender's domain says, in a ``v=spf1`` TXT record, which hosts may send
its mail; pyspf evaluates the record (its processing limits included: at
most 10 DNS-querying terms, at most 2 lookups that find nothing, at most 10
MX or PTR names, all a permerror beyond - RFC 7208 4.6.4). For the null
sender ``<>`` the identity checked is ``postmaster@<HELO name>`` (RFC 7208
2.4). What the client is told:

- pass, none, neutral, softfail: accepted;
- fail: ``550 5.7.23 <sender>: SPF fail: <explanation>`` (RFC 7372 codes)
  when ``[antispam.spf] fail = "reject"``, else accepted and tagged;
- temperror (SERVFAIL, timeouts, no answer within ``[antispam.dns]
  timeout``): ``451 4.7.24 SPF temporary error, try again`` - DNS trouble is
  never a 5xx;
- permerror (a broken record, a limit exceeded): ``550 5.7.24 SPF permanent
  error: <problem>`` when ``[antispam.spf] permerror = "reject"``, else
  accepted and tagged.

Accepted mail gets a ``Received-SPF:`` field (RFC 7208 9.1) and an
``Authentication-Results:`` field (RFC 8601) above our Received:, and
``session.spf_result`` holds the result for the checks after this one (the
greylist lets SPF-pass senders through). Trusted and authenticated clients,
and listeners other than the MX, are not checked.

pyspf is synchronous: it resolves through dnspython, blocking. So the whole
evaluation runs in the reactor's thread pool (at most ``MAX_CONCURRENT`` at
once, so that SPF cannot take every thread the disk work needs), pyspf's own
time budget is the configured timeout, and a reactor-side deadline answers
temperror if the thread has not finished by then. Its lookups go to the
``[dns] servers``, never to the system resolver: pyspf asks its
module-level ``DNSLookup`` function, which is replaced once by a dispatcher
that hands each lookup to the function the running check installed for its
own thread (so two appliances with different servers in one process - the
tests - do not share one).

A stream of mail from one sender would otherwise cost a thread hop and a
pyspf evaluation per message. The DNS answers are kept (dnspython's LRU
cache, for their TTL) and so is each outcome, per client address, sender
and HELO name, for as long as the shortest-lived answer it read (at most
``MAX_OUTCOME_TTL``; answers that a name does not exist count as
``NEGATIVE_TTL``); a temperror is never kept.
"""

from __future__ import annotations

import collections
import ipaddress
import re
import threading
import time

import dns.exception
import dns.nameserver
import dns.name
import dns.resolver
import spf as pyspf
from twisted.internet import defer, threads
from twisted.logger import Logger
from zope.interface import implementer

from mailbox_appliance import dns as appliance_dns
from mailbox_appliance.config import parse_duration
from mailbox_appliance.interfaces import IPolicyCheck
from mailbox_appliance.antispam.verdicts import note, refuse

log = Logger(namespace="mailbox_appliance.antispam")

# SPF evaluations running in threads at once; the others wait (their
# deadline running) for a free slot.
MAX_CONCURRENT = 4
# Longest explanation or problem text put in a reply or header (they come
# from DNS, i.e. from whoever runs the sender's domain).
MAX_TEXT = 200
# The caches of answers and of outcomes: entries, and how long an outcome lives.
MAX_CACHED = 10000
MAX_OUTCOME_TTL = 300
NEGATIVE_TTL = 30

RESULTS = frozenset({"pass", "fail", "softfail", "neutral", "none", "temperror", "permerror"})

_LABEL = re.compile(r"^[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?$")
_DOT_ATOM = re.compile(r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*$")


# --- pyspf's DNS, through dnspython to the configured servers -------------

class _BoundedCache(dns.resolver.LRUCache):
    """dnspython's LRU cache, answers kept no longer than the appliance's own
    cache keeps them (``dns.MAX_TTL``, negative ones ``NEGATIVE_TTL``): a
    zone's SOA can ask for hours, and a newly published record must count."""

    def put(self, key, value):
        rrset = getattr(value, "rrset", None)
        longest = appliance_dns.MAX_TTL if rrset is not None else NEGATIVE_TTL
        value.expiration = min(value.expiration, time.time() + longest)
        super().put(key, value)


class DNSLookups:
    """pyspf's ``DNSLookup(name, qtype, strict, timeout)`` asking only ``servers``.

    ``servers`` are (address, port) pairs. Returns pyspf's list of
    ((name, qtype), value); a name that does not exist or has no such
    records is an empty list (pyspf counts it as a void lookup); SERVFAIL,
    refusals and timeouts raise pyspf's TempError.
    """

    def __init__(self, servers, cache_size=MAX_CACHED):
        self.servers = tuple(servers)
        # Thread-safe; shared by the threads of concurrent checks.
        self.cache = _BoundedCache(cache_size) if cache_size else None

    def resolver(self):
        # A fresh resolver per lookup: cheap, and no state but the cache
        # shared between the threads of concurrent checks.
        r = dns.resolver.Resolver(configure=False)
        r.nameservers = [dns.nameserver.Do53Nameserver(host, port)
                         for host, port in self.servers]
        r.retry_servfail = False
        r.cache = self.cache
        return r

    @staticmethod
    def _lived(seconds):
        """The evaluation in this thread read an answer good for ``seconds``."""
        current = getattr(_per_thread, "ttl", None)
        if current is not None:
            _per_thread.ttl = min(current, max(0, int(seconds)))

    def __call__(self, name, qtype, strict=True, timeout=20):
        if not self.servers:
            raise pyspf.TempError("DNS no name servers configured")
        try:
            answers = self.resolver().resolve(name, qtype, lifetime=max(0.01, timeout),
                                              search=False)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer, dns.resolver.YXDOMAIN):
            self._lived(NEGATIVE_TTL)
            return []
        except (dns.name.EmptyLabel, dns.name.LabelTooLong, dns.name.NameTooLong,
                dns.name.IDNAException, UnicodeError):
            return []          # not a name DNS could hold: nothing there
        except dns.exception.Timeout:
            raise pyspf.TempError(f"DNS timeout looking up {qtype} {name}")
        except dns.resolver.NoNameservers:
            raise pyspf.TempError(f"DNS server failure looking up {qtype} {name}")
        except (dns.exception.DNSException, OSError) as e:
            raise pyspf.TempError(f"DNS error looking up {qtype} {name}: "
                                  f"{type(e).__name__}")
        # What is left of the TTL (less than the record's when cached).
        self._lived(answers.expiration - time.time())
        out = []
        for rdata in answers:
            if qtype in ("A", "AAAA"):
                out.append(((name, qtype), rdata.address))
            elif qtype == "MX":
                out.append(((name, qtype), (rdata.preference, rdata.exchange.to_text())))
            elif qtype == "PTR":
                out.append(((name, qtype), rdata.target.to_text(True)))
            elif qtype in ("TXT", "SPF"):
                out.append(((name, qtype), rdata.strings))
        return out


_per_thread = threading.local()
_hook_lock = threading.Lock()
_original_lookup = None


def _dispatch(name, qtype, strict=True, timeout=20):
    """pyspf's DNSLookup: the lookups of the check running in this thread."""
    lookup = getattr(_per_thread, "lookup", None)
    if lookup is None:
        # Not one of our checks (some other user of pyspf in the process).
        return _original_lookup(name, qtype, strict, timeout)
    return lookup(name, qtype, strict, timeout)


def install_dns_hook():
    """Point pyspf's DNS lookups at :func:`_dispatch` (once; idempotent)."""
    global _original_lookup
    with _hook_lock:
        if pyspf.DNSLookup is not _dispatch:
            _original_lookup = pyspf.DNSLookup
            pyspf.DNSLookup = _dispatch


def system_servers():
    """The name servers of the system's resolver configuration, read once, port 53."""
    try:
        return tuple((str(ns), 53) for ns in dns.resolver.Resolver().nameservers)
    except Exception:
        return ()


# --- the evaluation -------------------------------------------------------

class Outcome:
    """An SPF result with pyspf's explanation (fail) or problem (errors)."""

    def __init__(self, result, explanation="", problem="", ttl=0):
        self.result = result if result in RESULTS else "temperror"
        self.explanation = explanation
        self.problem = problem
        # How long the outcome may be reused: its shortest-lived DNS answer.
        self.ttl = ttl

    def __repr__(self):
        return f"Outcome({self.result!r}, {self.explanation!r}, {self.problem!r})"


def evaluate(lookups, ip, sender, helo, receiver, budget):
    """check_host() by pyspf with ``lookups`` for DNS: an :class:`Outcome`. Blocks."""
    _per_thread.lookup = lookups
    _per_thread.ttl = MAX_OUTCOME_TTL
    try:
        q = pyspf.query(i=ip, s=sender, h=helo, receiver=receiver, querytime=budget)
        result, _code, explanation = q.check()
        problem = ""
        if result in ("permerror", "temperror"):
            # pyspf's text names the term at fault ("...: moo"), its .prob not.
            problem = explanation.split(": ", 1)[1] if ": " in explanation else explanation
            explanation = ""
        if result == "fail" and explanation == pyspf.EXPLANATIONS["fail"]:
            explanation = ""        # pyspf's default: ours reads better
        return Outcome(result, printable(explanation), printable(problem),
                       ttl=0 if result == "temperror" else _per_thread.ttl)
    except Exception as e:
        # A bug, or a record pyspf chokes on: not the sender's fault for sure.
        log.failure("spf: evaluating {sender} from {ip} failed", sender=sender, ip=ip)
        return Outcome("temperror", problem=printable(f"internal error {type(e).__name__}"))
    finally:
        _per_thread.lookup = None
        _per_thread.ttl = None


def printable(text, limit=MAX_TEXT) -> str:
    """``text`` as one line of printable ASCII, at most ``limit`` characters."""
    if isinstance(text, bytes):
        text = text.decode("ascii", "replace")
    text = " ".join("".join(c if " " <= c <= "~" else " " for c in str(text)).split())
    if len(text) > limit:
        text = text[:limit - 3].rstrip() + "..."
    return text


def ascii_domain(domain):
    """``domain`` in DNS (IDNA) form if it is a multi-label host name, else None.

    RFC 7208 4.3: a malformed or single-label domain gives "none" without
    a lookup; an address literal has no DNS to ask.
    """
    try:
        name = domain.rstrip(".").lower().encode("idna").decode("ascii")
    except UnicodeError:
        return None
    labels = name.split(".")
    if len(name) > 253 or len(labels) < 2 or not all(_LABEL.match(l) for l in labels):
        return None
    return name


def client_address(text):
    """The client's IP for SPF (an IPv4-mapped IPv6 address as IPv4), or None."""
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return str(ip)


# --- the header fields ----------------------------------------------------

def header_value(text) -> str:
    """A key-value-pair value of RFC 7208 9.1: a dot-atom as it is, else a quoted-string."""
    text = printable(text, 255)
    if _DOT_ATOM.match(text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def comment_text(text) -> str:
    """Text safe inside an RFC 5322 comment (no parentheses or backslashes)."""
    return printable(text).replace("(", "").replace(")", "").replace("\\", "")


def explain(outcome, receiver, identity, ip) -> str:
    """The comment of Received-SPF, after RFC 7208 9.1's examples."""
    r = outcome.result
    if r == "pass":
        text = f"domain of {identity} designates {ip} as permitted sender"
    elif r == "fail":
        text = f"domain of {identity} does not designate {ip} as permitted sender"
    elif r == "softfail":
        text = f"domain of transitioning {identity} does not designate {ip} as permitted sender"
    elif r == "neutral":
        text = f"{ip} is neither permitted nor denied by domain of {identity}"
    elif r == "none":
        text = f"domain of {identity} does not provide an SPF record"
    elif r == "permerror":
        text = f"permanent error in processing domain of {identity}: {outcome.problem}"
    else:
        text = f"temporary error in processing during lookup of {identity}"
    return f"{receiver}: {comment_text(text)}"


def received_spf(outcome, receiver, ip, sender, helo, identity, kind) -> str:
    """The value of a Received-SPF field (RFC 7208 9.1), folded before the pairs."""
    pairs = [("client-ip", ip), ("envelope-from", sender), ("helo", helo or "unknown"),
             ("receiver", receiver), ("identity", kind)]
    if outcome.result == "permerror" and outcome.problem:
        pairs.append(("problem", outcome.problem))
    text = "; ".join(f"{k}={header_value(v)}" for k, v in pairs)
    return (f"{outcome.result} ({explain(outcome, receiver, identity, ip)})\r\n\t{text}")


def authentication_results(outcome, receiver, sender, helo, kind) -> str:
    """The value of an Authentication-Results field (RFC 8601) for SPF."""
    if kind == "helo":
        prop = f"smtp.helo={header_value(helo)}"
    else:
        prop = f"smtp.mailfrom={sender if _mailbox_ok(sender) else header_value(sender)}"
    return f"{receiver}; spf={outcome.result} {prop}"


def _mailbox_ok(address) -> bool:
    """True if ``address`` can stand unquoted as an RFC 8601 pvalue (dot-atom@domain)."""
    local, _, domain = address.rpartition("@")
    return bool(local) and bool(_DOT_ATOM.match(local)) and bool(
        re.match(r"^[A-Za-z0-9.-]+$", domain))


# --- the policy check -----------------------------------------------------

@implementer(IPolicyCheck)
class SPFCheck:
    """``spf``: RFC 7208 check of MAIL FROM (or of the HELO name for ``<>``).

    ``servers`` are the (address, port) pairs to ask; ``run_in_thread``
    (``f, *args`` -> Deferred) defaults to the reactor's thread pool.
    """

    name = "spf"
    stages = frozenset({"mail"})

    def __init__(self, reactor, servers, timeout, receiver, fail="reject", permerror="tag",
                 run_in_thread=None, max_concurrent=MAX_CONCURRENT):
        install_dns_hook()
        self.reactor = reactor
        self.lookups = DNSLookups(servers)
        self.timeout = timeout
        self.receiver = receiver
        self.reject_fail = fail == "reject"
        self.reject_permerror = permerror == "reject"
        self._run_in_thread = run_in_thread or self._in_pool
        self._slots = defer.DeferredSemaphore(max_concurrent)
        # (ip, sender, helo) -> (expiry, Outcome), least recently used first.
        self._outcomes = collections.OrderedDict()
        self.max_outcomes = MAX_CACHED

    def _in_pool(self, f, *args):
        return threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(), f, *args)

    def check(self, stage, session, sender):
        if (session.trusted or session.authenticated or session.listener != "smtp"
                or sender is None):
            return None
        session.spf_result = session.spf_auth = ""
        ip = client_address(session.client_ip)
        if ip is None:
            note(self.name, "skip")
            return None
        helo = session.helo or ""
        if sender.null:
            kind, domain = "helo", ascii_domain(helo)
            identity = f"postmaster@{helo}"
            pyspf_sender = ""
            envelope = ""
        else:
            kind, domain = "mailfrom", (None if sender.is_literal
                                        else ascii_domain(sender.domain))
            identity = envelope = sender.address
            pyspf_sender = f"{sender.local}@{domain}"
        if domain is None:
            # Nothing DNS could say about this identity (RFC 7208 4.3, 2.3).
            return self._verdict(Outcome("none"), session, ip, sender, helo, identity,
                                 envelope, kind)
        d = self._evaluate(ip, pyspf_sender, domain if kind == "helo" else (helo or "unknown"))
        return d.addCallback(self._verdict, session, ip, sender, helo, identity, envelope, kind)

    def _evaluate(self, ip, sender, helo):
        """A Deferred of the Outcome (kept while its DNS answers live), temperror
        at the deadline; never fails."""
        key = (ip, sender.lower(), helo.lower())
        now = self.reactor.seconds()
        kept = self._outcomes.get(key)
        if kept is not None:
            if kept[0] > now:
                self._outcomes.move_to_end(key)
                return defer.succeed(kept[1])
            del self._outcomes[key]
        return self._evaluate_now(ip, sender, helo).addCallback(self._keep, key)

    def _keep(self, outcome, key):
        if outcome.ttl > 0 and outcome.result != "temperror" and self.max_outcomes > 0:
            while len(self._outcomes) >= self.max_outcomes:
                self._outcomes.popitem(last=False)
            self._outcomes[key] = (self.reactor.seconds() + outcome.ttl, outcome)
        return outcome

    def _evaluate_now(self, ip, sender, helo):
        outcome = defer.Deferred()
        expired = []

        def deadline():
            expired.append(True)
            if not outcome.called:
                outcome.callback(Outcome("temperror", problem="timeout"))
        timer = self.reactor.callLater(self.timeout, deadline)

        def finished(result):
            self._slots.release()
            if timer.active():
                timer.cancel()
            if not outcome.called:
                outcome.callback(result)

        def crashed(failure):
            log.failure("spf: thread failed", failure)
            return Outcome("temperror", problem="internal error")

        def start(_):
            if expired:
                # Waited for a slot past the deadline: the client has had its answer.
                self._slots.release()
                return
            d = defer.maybeDeferred(self._run_in_thread, evaluate, self.lookups, ip, sender,
                                    helo, self.receiver, self.timeout)
            d.addErrback(crashed).addCallback(finished)
        self._slots.acquire().addCallback(start)
        return outcome

    def _verdict(self, outcome, session, ip, sender, helo, identity, envelope, kind):
        result = outcome.result
        session.spf_result = result
        if result == "temperror":
            note(self.name, "dns-error")
            return refuse(self.name, session, 451, "4.7.24", "SPF temporary error, try again")
        if result == "fail" and self.reject_fail:
            why = outcome.explanation or (f"{ip} is not allowed to send mail for "
                                          f"{identity.rpartition('@')[2]}")
            return refuse(self.name, session, 550, "5.7.23",
                          f"<{identity}>: SPF fail: {printable(why)}")
        if result == "permerror" and self.reject_permerror:
            return refuse(self.name, session, 550, "5.7.24",
                          f"SPF permanent error: {outcome.problem or 'invalid SPF record'}")
        note(self.name, result)
        if result in ("fail", "permerror", "softfail"):
            # Accepted but suspect: the reason goes to the log with the tag.
            log.info("spf: {result} tagged [{ip}] {identity}: {why}", result=result, ip=ip,
                     identity=identity, why=outcome.problem or outcome.explanation or "-")
        session.add_trace_header("Received-SPF", received_spf(
            outcome, self.receiver, ip, envelope, helo, identity, kind))
        auth = authentication_results(outcome, self.receiver, envelope, helo, kind)
        # The method part, for the content scan's one combined field.
        session.spf_auth = auth.partition("; ")[2]
        session.add_trace_header("Authentication-Results", auth)
        return None


def checks(config, reactor, resolver, state=None, run_in_thread=None):
    """[SPFCheck] when ``[antispam.spf] enabled``; DNS to ``[dns] servers``.

    ``resolver`` (twisted.names) is not used: pyspf needs a synchronous
    resolver, so it gets dnspython pointed at the same servers.
    """
    if not config.antispam.spf.enabled:
        return []
    if config.dns.servers:
        servers = tuple(appliance_dns.parse_server(s) for s in config.dns.servers)
    else:
        servers = system_servers()
    s = config.antispam.spf
    return [SPFCheck(reactor, servers, parse_duration(config.antispam.dns.timeout),
                     config.server.hostname, fail=s.fail, permerror=s.permerror,
                     run_in_thread=run_in_thread)]
