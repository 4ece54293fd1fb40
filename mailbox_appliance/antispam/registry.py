"""Which door checks run, in which order, on which listener.

Like Postfix's ``smtpd_*_restrictions``: the cheap, local checks first
(connection limits, greet pause, HELO), then those that ask DNS about the
client and the sender, then the appliance's own relay and recipient checks
(built by the Appliance), and last the ones that need a valid recipient
(block lists answered at RCPT, greylisting). Only the connection limits
apply to the submission ports.
"""

from __future__ import annotations

from mailbox_appliance.antispam import connection, dnsbl, greylist, helo, rdns, sender_mx, spf

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
