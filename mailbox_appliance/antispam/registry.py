"""Which door checks run, in which order, on which listener.

Like Postfix's ``smtpd_*_restrictions``: the cheap, local checks first
(connection limits, greet pause, HELO), then those that ask DNS about the
client and the sender, then the appliance's own relay and recipient checks
(built by the Appliance), and last the ones that need a valid recipient
(block lists answered at RCPT, greylisting). Only the connection limits
apply to the submission ports.

At end of data the content filters judge the message (``content_scan``):
DKIM first, then DMARC (which needs DKIM's results), the milters, Bayes,
and the rules last (they score and combine every other filter's hits).
The submission ports get only the DKIM signer, after the submission
fix-ups, so the signature covers the message as it leaves.
"""

from __future__ import annotations

import os

from mailbox_appliance.antispam import connection, dnsbl, greylist, helo, rdns, sender_mx, spf
from mailbox_appliance.antispam.content import ContentScan
from mailbox_appliance.config import parse_duration

# Checks that also guard the authenticated ports.
SUBMISSION_CHECKS = frozenset({"ratecontrol", "conncontrol"})


def build_checks(config, reactor, resolver, state=None):
    """(checks before the recipient checks, checks after them) for the MX."""
    before = []
    for module in (connection, helo, rdns, sender_mx, spf):
        before += module.checks(config, reactor, resolver, state)
    after = []
    for module in (dnsbl, greylist):
        after += module.checks(config, reactor, resolver, state)
    return before, after


def submission_checks(mx_checks):
    """The same connection-limit objects for the submission ports (counts shared)."""
    return [c for c in mx_checks if c.name in SUBMISSION_CHECKS]


def content_filters(config, reactor, resolver, state=None):
    """The MX's content filters, in the order they run (module docstring)."""
    out = []
    for module in _content_modules():
        out += module.filters(config, reactor, resolver, state)
    return out


def _content_modules():
    from mailbox_appliance.antispam import bayes, dkim_verify, dmarc, milter_filter, rules
    return [dkim_verify, dmarc, milter_filter, bayes, rules]


def open_content_state(config, reactor, read_only=False):
    """The services the content filters keep their state in, by the name the
    filters look them up under in the shared state (not started: the caller
    starts them before the first message).

    ``read_only`` (``spam explain``): only databases that exist, opened so
    that nothing is written or swept.
    """
    from mailbox_appliance.antispam import bayes_store
    services = {}
    # With content filtering off nothing would read the tokens: no database,
    # and no learning from IMAP moves either.
    if config.antispam.bayes.enabled and (read_only or config.antispam.content.enabled):
        path = bayes_store.path_of(config)
        if not read_only:
            services["bayes"] = bayes_store.open_bayes(config, reactor)
        elif os.path.exists(path):
            services["bayes"] = bayes_store.BayesStore(path, reactor, read_only=True)
    return services


def content_scan(config, reactor, resolver, state=None, even_if_off=False):
    """The MX's end-of-data ContentScan, or None when content filtering is off
    (``even_if_off``: ``spam explain`` shows what it would say)."""
    c = config.antispam.content
    if not c.enabled and not even_if_off:
        return None
    return ContentScan(reactor, content_filters(config, reactor, resolver, state),
                       config.server.hostname, tag_score=c.tag_score,
                       reject_score=c.reject_score, max_scan_size=c.max_scan_size,
                       timeout=parse_duration(c.scan_timeout))


def signing_scan(config, reactor, resolver=None):
    """The submission ports' end-of-data runner of the milters and the DKIM signer, or None.

    Milters see submitted mail too, as Postfix's smtpd_milters do (a
    signing opendkim needs it); our own signer comes last, so its signature
    covers what the milters changed.
    """
    from mailbox_appliance.antispam import milter_filter
    signers = (milter_filter.filters(config, reactor, resolver)
               + _signers(config, reactor))
    if not signers:
        return None
    return ContentScan(reactor, signers, config.server.hostname, judge=False,
                       max_scan_size=config.server.max_message_size)


def _signers(config, reactor):
    from mailbox_appliance.antispam import dkim_sign
    return dkim_sign.signers(config, reactor)
