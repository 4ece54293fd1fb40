"""What every door check does with a verdict: count it and log it with its reason.

Counters are kept per check name and outcome ("reject", "tempfail", "accept",
"skip", "dns-error", ...), in memory, for ``mailappliance stats`` (through
the control socket).
"""

from __future__ import annotations

import collections

from twisted.logger import Logger

from mailbox_appliance.smtp.policy import Verdict

log = Logger(namespace="mailbox_appliance.antispam")


class Counters:
    """Per-check, per-outcome counts.

    The names are the checks', the filters' and the rules' own (fixed
    strings and the names in the rule files); past ``max_keys`` distinct
    pairs, new ones are not counted.
    """

    def __init__(self, max_keys=20000):
        self.counts = collections.Counter()
        self.max_keys = max_keys

    def count(self, check, outcome):
        key = (check, outcome)
        if key in self.counts or len(self.counts) < self.max_keys:
            self.counts[key] += 1

    def snapshot(self):
        return {f"{c}:{o}": n for (c, o), n in sorted(self.counts.items())}


# One set for the process; the checks are built once per listener.
COUNTERS = Counters()


def refuse(check, session, code, enhanced, text, counters=COUNTERS):
    """A 4xx/5xx Verdict from ``check``, counted and logged with the client."""
    outcome = "tempfail" if code < 500 else "reject"
    counters.count(check, outcome)
    log.info("{check}: {outcome} [{ip}] helo={helo}: {code} {enhanced} {text}", check=check,
             outcome=outcome, ip=session.client_ip, helo=session.helo or "-", code=code,
             enhanced=enhanced, text=text)
    return Verdict(code, enhanced, text)


def note(check, outcome, counters=COUNTERS):
    """Count an outcome that does not answer the client (pass, skip, dns-error...)."""
    counters.count(check, outcome)
