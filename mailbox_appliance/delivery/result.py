"""What a delivery agent reports for each recipient of one attempt.

The queue manager turns these into done-records, retries and delivery status
notices (RFC 3464), so they carry what a DSN needs: the status code, the
other side's reply as the diagnostic, and which host gave it.
"""

from __future__ import annotations

from dataclasses import dataclass

SENT = "sent"
DEFERRED = "deferred"
BOUNCED = "bounced"


@dataclass(frozen=True)
class RemoteRecipient:
    """One envelope recipient handed to the remote agent."""

    idx: int            # index in the envelope's recipients
    address: str        # the address to send RCPT TO for
    notify: str = ""    # NOTIFY= to pass on ("" = not given)
    orcpt: str = ""     # ORCPT= to pass on ("rfc822;xtext", "" = not given)


@dataclass(frozen=True)
class RecipientResult:
    """The outcome of one recipient in one attempt."""

    status: str                 # SENT, DEFERRED or BOUNCED
    enhanced: str               # RFC 3463 status, e.g. "2.0.0", "4.4.1", "5.1.1"
    reply: str                  # human text, e.g. "550 5.1.1 <x@y>: User unknown"
    remote_mta: str = ""        # the host that answered, "" when none did
    # The reply came from the other side's SMTP dialogue (a DSN gives it as
    # "Diagnostic-Code: smtp; ..."); False for our own reasons (DNS, timeouts).
    from_remote: bool = False
    # The next hop advertised DSN and was given the recipient's NOTIFY=: it
    # now owes the sender any further notice (RFC 3461 5.2.2), so a success
    # is not reported by us. False on success to a hop without DSN: a
    # NOTIFY=SUCCESS sender then gets a "relayed" notice from us.
    dsn_passed_on: bool = False

    @property
    def permanent(self) -> bool:
        return self.status == BOUNCED
