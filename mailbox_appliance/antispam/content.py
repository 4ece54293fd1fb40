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

import re
import time
from dataclasses import dataclass, field

from twisted.internet import defer, threads
from twisted.logger import Logger
from zope.interface import Attribute, Interface, implementer

from mailbox_appliance.interfaces import IPolicyCheck
from mailbox_appliance.smtp.policy import Verdict
from mailbox_appliance.antispam.message import ScannedMessage, raw_header_fields, split_message
from mailbox_appliance.antispam.verdicts import note, refuse

log = Logger(namespace="mailbox_appliance.antispam.content")

# Header fields a client must not bring in under our name (RFC 8601 §5:
# remove A-R fields claiming our authserv-id; our spam fields likewise).
OUR_SPAM_FIELDS = ("x-spam-flag", "x-spam-score", "x-spam-status", "x-spam-level")


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
