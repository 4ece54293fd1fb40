"""The content filters at end of data: one scan, several judges, one verdict.

After the door checks, the message itself is judged while the client still
waits for the answer to its final dot, so spam is refused with a 5xx (the
sending MTA tells its user) and never accepted and bounced later.

``ContentScan`` is the end-of-data policy check that runs them: it reads
the received message back from the spool, parses it once in a worker
thread (``message.ScannedMessage``), hands it to each ``IContentFilter``
in turn (DKIM, DMARC, milters, Bayes, the rules), and adds up what they
found. Each filter answers with a ``ContentResult``: named *hits* with
scores (``DKIM_VALID``, ``BAYES_99``, a rule's name...), method results
for the ``Authentication-Results:`` field, header fields to add, edits of
the message (milters), and at most one decision that ends the scan at once
(``verdict``: reject or tempfail) or marks the message (``action``: "junk",
"hold", "discard").

The sum of the hits' scores is then compared with two thresholds: at
``tag_score`` the message is marked as spam (``X-Spam-Flag: YES``) and filed
into the recipients' Junk folder; at ``reject_score`` it is refused with
``550 5.7.1``. Every message that was scanned gets one
``Authentication-Results:`` field naming this host (RFC 8601) and the
``X-Spam-Status:`` summary; fields with those names that came from outside
and claim to be ours are removed, since a client could otherwise vouch for
itself.

A filter that fails or takes too long is logged and ignored: a broken
filter must not refuse mail (nor accept it as clean silently: the log and
the counters say so).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

from twisted.internet import defer, threads
from twisted.logger import Logger
from zope.interface import Attribute, Interface, implementer

from mailbox_appliance.interfaces import IPolicyCheck
from mailbox_appliance.smtp.policy import Verdict
from mailbox_appliance.antispam.message import ScannedMessage, split_message
from mailbox_appliance.antispam.verdicts import note, refuse

log = Logger(namespace="mailbox_appliance.antispam.content")

# Header fields a client must not bring in under our name (RFC 8601 §5:
# remove A-R fields claiming our authserv-id; our spam fields likewise).
OUR_SPAM_FIELDS = ("x-spam-flag", "x-spam-score", "x-spam-status", "x-spam-level",
                   "x-spam-bayes")


class IContentFilter(Interface):
    """One judge of a received message's content (DKIM, rules, Bayes, a milter...)."""

    name = Attribute("Short name: logs, counters, the X-Spam-Status field.")

    def scan(message, session):
        """Judge ``message`` (a ScannedMessage) of ``session`` (SessionState).

        Returns a ContentResult, None (no opinion), or a Deferred of either.
        Filters earlier in the list have left their findings in
        ``message.facts`` and their hits in ``message.hits``. A filter must
        bound its own time and memory; one that raises is logged and skipped.
        """


@dataclass
class ContentResult:
    """What one filter found. Every field is optional.

    ``hits``: name -> score; a later filter naming a hit again replaces its
    score (the rules' ``score`` lines rescore the others' hits).
    ``auth``: method results for Authentication-Results, e.g.
    ``"dkim=pass header.d=example.org header.s=s1"``.
    ``headers``: (name, value) fields to add on top of the message.
    ``rewrite``: a function bytes -> bytes applied to the whole message
    (a milter's header changes or new body).
    ``add_recipients`` / ``remove_recipients``: envelope addresses.
    ``verdict``: a Verdict (4xx/5xx) that ends the scan and answers the
    client. ``action``: "junk" (file into Junk), "hold" (keep the message in
    the queue's hold state), "discard" (accept and drop).
    """

    hits: dict = field(default_factory=dict)
    auth: list = field(default_factory=list)
    headers: list = field(default_factory=list)
    rewrite: object = None
    add_recipients: list = field(default_factory=list)
    remove_recipients: list = field(default_factory=list)
    verdict: Verdict | None = None
    action: str | None = None
    reason: str = ""


ACTIONS = ("junk", "hold", "discard")


@dataclass
class Judgement:
    """Every filter's findings on one message, added up by ContentScan.evaluate.

    ``results`` lists (filter name, ContentResult or None, problem text)
    in the order the filters ran; ``verdict`` is the refusal (by
    ``decided_by``), if any; ``spam`` says the score reached tag_score.
    """

    hits: dict = field(default_factory=dict)
    auth: list = field(default_factory=list)
    headers: list = field(default_factory=list)
    rewrites: list = field(default_factory=list)
    add_recipients: list = field(default_factory=list)
    remove_recipients: list = field(default_factory=list)
    reasons: list = field(default_factory=list)
    results: list = field(default_factory=list)
    action: str | None = None
    verdict: Verdict | None = None
    decided_by: str = ""
    score: float = 0.0
    spam: bool = False
    elapsed: float = 0.0
# Which action wins when filters disagree: the strongest.
_STRENGTH = {None: 0, "junk": 1, "hold": 2, "discard": 3}


def _authserv_id(value: bytes) -> str:
    """The authserv-id an Authentication-Results value starts with (lower-case)."""
    text = value.decode("latin-1").strip()
    return text.split(";", 1)[0].split(None, 1)[0].lower() if text else ""


def remove_fields(raw: bytes, unwanted) -> bytes:
    """``raw`` without the header fields for which ``unwanted(name, value)`` is true.

    Works on the lines of the header block so that everything kept stays
    byte for byte as it was (a DKIM signature over it still verifies).
    """
    block, body = split_message(raw)
    if not block:
        return raw
    kept, field_lines, drop = [], [], False
    for line in block.splitlines(keepends=True):
        if line[:1] in (b" ", b"\t") and field_lines:
            field_lines.append(line)
            continue
        if field_lines and not drop:
            kept += field_lines
        field_lines = [line]
        name, colon, value = line.partition(b":")
        drop = bool(colon) and unwanted(name.strip().decode("latin-1").lower(), value)
    if field_lines and not drop:
        kept += field_lines
    sep = raw[len(block):len(raw) - len(body)]
    return b"".join(kept) + sep + body


def _fold_list(names) -> str:
    """Rule names for X-Spam-Status, folded so no line gets too long."""
    lines, line = [], ""
    for n in names:
        piece = n if not line else "," + n
        if line and len(line) + len(piece) > 70:
            lines.append(line + ",")
            line = n
        else:
            line += piece
    lines.append(line)
    return "\r\n\t".join(lines)


def _strongest(a, b):
    return a if _STRENGTH.get(a, 0) >= _STRENGTH.get(b, 0) else b


@implementer(IPolicyCheck)
class ContentScan:
    """The end-of-data check that runs the content filters (module docstring).

    ``judge`` False makes it a plain runner (the submission port's DKIM
    signer): no score, no spam fields, no Authentication-Results.
    ``run_in_thread`` (``f, *args`` -> Deferred) defaults to the reactor's
    thread pool.
    """

    name = "content"
    stages = frozenset({"eod"})

    def __init__(self, reactor, filters, hostname, tag_score=5.0, reject_score=15.0,
                 max_scan_size=4 * 1024 * 1024, timeout=30.0, judge=True, run_in_thread=None):
        self.reactor = reactor
        self.filters = list(filters)
        self.hostname = hostname
        self.authserv_id = hostname.lower()
        self.tag_score = tag_score
        self.reject_score = reject_score
        self.max_scan_size = max_scan_size
        self.timeout = timeout
        self.judge = judge
        self._run_in_thread = run_in_thread or self._in_pool

    def _in_pool(self, f, *args, **kw):
        return threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(), f,
                                         *args, **kw)

    def check(self, stage, session, view):
        if not self.filters and not self.judge:
            return None
        if self.judge and session.may_relay:
            # relay_networks and authenticated users are not judged on the
            # MX, as the door checks do not judge them.
            return None
        if view.size > self.max_scan_size:
            note(self.name, "too-large")
            log.info("{qid}: content not scanned: {size} octets", qid=view.qid, size=view.size)
            return None
        inc = view.incoming
        d = inc.content()
        d.addCallback(lambda raw: self._run_in_thread(
            ScannedMessage.parse, raw, sender=inc.envelope.sender,
            recipients=tuple(inc.envelope.recipients), client_ip=session.client_ip,
            helo=session.helo, authenticated=session.authenticated or None))
        d.addCallback(lambda msg: defer.ensureDeferred(self._scan(msg, session, view)))
        return d

    async def evaluate(self, msg, session, qid="-"):
        """Run the filters on ``msg`` and add up their findings: a Judgement.

        ``msg.facts`` gets what the session knows (queue id, SPF result).
        Nothing is changed or logged as a decision: ``spam explain`` calls
        this too.
        """
        started = time.monotonic()
        msg.facts["qid"] = qid
        sender = session.sender
        msg.facts["spf"] = (session.spf_result, sender.domain
                            if sender is not None and not sender.null else session.helo)
        msg.facts.setdefault("dnsbl", list(getattr(session, "dnsbl_listed", ()) or ()))
        j = Judgement(hits={})
        msg.facts["hits"] = j.hits
        if session.spf_auth:
            j.auth.append(session.spf_auth)
        # The door's findings join the score as hits (scored by the rules).
        if session.spf_result:
            j.hits[f"SPF_{session.spf_result.upper()}"] = 0.0
        if msg.facts["dnsbl"]:
            j.hits["RCVD_IN_DNSBL"] = 0.0
        deadline = self.reactor.seconds() + self.timeout
        for f in self.filters:
            left = deadline - self.reactor.seconds()
            if left <= 0:
                note(self.name, "timeout")
                log.warn("{qid}: content scan out of time before {name}", qid=qid, name=f.name)
                j.results.append((f.name, None, "not run: out of time"))
                break
            try:
                result = await defer.maybeDeferred(f.scan, msg, session).addTimeout(
                    left, self.reactor)
            except defer.TimeoutError:
                note(self.name, "timeout")
                log.warn("{qid}: content filter {name} out of time", qid=qid, name=f.name)
                j.results.append((f.name, None, "out of time"))
                continue
            except Exception as e:
                note(self.name, "filter-error")
                log.failure("{qid}: content filter {name} failed", qid=qid, name=f.name)
                j.results.append((f.name, None, f"failed: {e}"))
                continue
            j.results.append((f.name, result, ""))
            if result is None:
                continue
            j.hits.update(result.hits)
            j.auth += result.auth
            j.headers += result.headers
            if result.rewrite is not None:
                j.rewrites.append(result.rewrite)
            j.add_recipients += result.add_recipients
            j.remove_recipients += result.remove_recipients
            if result.reason:
                j.reasons.append(f"{f.name}: {result.reason}")
            if result.verdict is not None:
                j.verdict, j.decided_by = result.verdict, f.name
                break
            if result.action in ACTIONS:
                j.action = _strongest(j.action, result.action)
        j.score = round(sum(j.hits.values()), 1)
        if self.judge and j.verdict is None:
            if j.score >= self.reject_score:
                j.verdict = Verdict(550, "5.7.1", f"Message rejected as spam (score {j.score:.1f})")
                j.decided_by = self.name
            elif j.score >= self.tag_score:
                j.spam = True
                j.action = _strongest(j.action, "junk")
        j.elapsed = time.monotonic() - started
        return j

    async def _scan(self, msg, session, view):
        j = await self.evaluate(msg, session, view.qid)
        # Counted per filter and per hit (rule, band, DKIM result...), for
        # ``mailappliance stats``: which rules fire, which filters fail.
        for name, _result, problem in j.results:
            note(name, "failed" if problem else "ran")
        for hit in j.hits:
            note("hit", hit)
        if self.judge:
            log.info("{qid}: content score {score} ({tests}) in {ms:.1f} ms{why}",
                     qid=view.qid, score=j.score, tests=",".join(sorted(j.hits)) or "none",
                     ms=j.elapsed * 1000, why=("; " + "; ".join(j.reasons)) if j.reasons else "")
        if j.verdict is not None:
            log.info("{qid}: refused by content filter {name}: {reply}", qid=view.qid,
                     name=j.decided_by, reply=j.verdict.reply)
            return refuse(j.decided_by, session, j.verdict.code, j.verdict.enhanced,
                          j.verdict.text)
        if self.judge:
            note(self.name, "spam" if j.spam else "ham")
        envelope = view.incoming.envelope
        if j.action == "discard" or (j.remove_recipients and not j.add_recipients and {
                a.lower() for a in j.remove_recipients} >= {
                str(r).lower() for r in envelope.recipients}):
            note(self.name, "discard")
            log.info("{qid}: discarded by the content filters", qid=view.qid)
            return Verdict(250, "2.0.0", "Ok", discard=True)
        if not (self.judge or j.headers or j.rewrites or j.add_recipients
                or j.remove_recipients or j.action):
            return None
        fields = self.summary_fields(j) if self.judge else []
        fields += j.headers
        raw = msg.raw
        for rewrite in j.rewrites:
            raw = rewrite(raw)
        if self.judge:
            raw = remove_fields(raw, self._forged)
        top = "".join(f"{n}: {_clean(v)}\r\n" for n, v in fields).encode("utf-8", "replace")
        self._amend(view.incoming, top + raw, j.action, j.add_recipients, j.remove_recipients,
                    scanned=bool(self.judge),
                    dkim_pass=[f.get("domain", "") for f in msg.facts.get("dkim") or ()
                               if f.get("result") == "pass" and f.get("domain")]
                    if self.judge else [])
        return None

    def summary_fields(self, j):
        """Authentication-Results and the X-Spam fields for a Judgement."""
        auth = j.auth
        fields = [("Authentication-Results",
                   f"{self.hostname};" + ("\r\n\t" + ";\r\n\t".join(auth) if auth
                                          else " none"))]
        if j.spam:
            fields.append(("X-Spam-Flag", "YES"))
        fields.append(("X-Spam-Score", f"{j.score:.1f}"))
        fields.append(("X-Spam-Status", f"{'Yes' if j.spam else 'No'}, score={j.score:.1f} "
                       f"required={self.tag_score:.1f}\r\n\ttests="
                       + (_fold_list(sorted(j.hits)) if j.hits else "none")))
        return fields

    def _forged(self, name, value) -> bool:
        if name == "authentication-results":
            return _authserv_id(value) == self.authserv_id
        return name in OUR_SPAM_FIELDS

    def _amend(self, inc, data, action, add_rcpts, remove_rcpts, scanned=False,
               dkim_pass=()):
        env = copy.copy(inc.envelope)
        env.scanned = scanned
        env.dkim_pass = list(dkim_pass)
        if action == "junk" and not env.folder:
            env.folder = "Junk"
        if add_rcpts or remove_rcpts:
            gone = {a.lower() for a in remove_rcpts}
            keep = [i for i, r in enumerate(env.recipients) if str(r).lower() not in gone]
            env.recipients = [env.recipients[i] for i in keep]
            if env.notify:
                env.notify = [env.notify[i] for i in keep]
            if env.orcpt:
                env.orcpt = [env.orcpt[i] for i in keep]
            for a in add_rcpts:
                if a.lower() not in {str(r).lower() for r in env.recipients}:
                    env.recipients.append(a)
                    if env.notify:
                        env.notify.append("")
                    if env.orcpt:
                        env.orcpt.append("")
        inc.replace(data, env)
        if action == "hold":
            inc.hold = True


def _clean(value: str) -> str:
    """A header value with no line break other than CRLF + white space (folding)."""
    lines = [l.replace("\r", "").replace("\n", "").replace("\x00", "")
             for l in value.split("\r\n")]
    return "\r\n".join([lines[0]] + [l if l[:1] in (" ", "\t") else "\t" + l
                                     for l in lines[1:] if l])
