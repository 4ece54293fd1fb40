"""LMTP (RFC 2033): mail handed over for final delivery into the store.

The same receiver as the MX (framing, limits, policy chain), with the LMTP
differences: LHLO instead of HELO/EHLO, only our own users as recipients, and
after the data one answer per accepted recipient, given once delivery into
that recipient's mailbox has been tried. A recipient that failed temporarily
gets a 4xx and is left to the client to retry; forwarding to outside stays in
the queue like any other mail.
"""

from __future__ import annotations

import ipaddress

from zope.interface import implementer

from mailbox_appliance.interfaces import IPolicyCheck
from mailbox_appliance.smtp.policy import Verdict
from mailbox_appliance.smtp.server import SMTPServerFactory, SMTPServerProtocol

_ANSWERS = {
    "sent": (250, "2.0.0", "Ok: delivered"),
    "queued": (250, "2.0.0", "Ok: queued for forwarding"),
    "bounced": (550, "5.1.1", "User unknown"),
    "deferred": (451, "4.3.0", "Temporary delivery failure, try again later"),
}


class LMTPServerProtocol(SMTPServerProtocol):
    """One LMTP session."""

    protocol_name = "LMTP"
    offers_etrn = False

    def smtp_LHLO(self, arg):
        return self._helo(arg, True)

    def smtp_HELO(self, arg):
        return self._reply(500, "5.5.1", "Error: this is LMTP, use LHLO")

    smtp_EHLO = smtp_HELO

    def _answer_transaction(self, code, enhanced, text):
        for path in self.session.recipients:
            self._reply(code, enhanced, f"<{path.address}> {text}")

    def _accepted(self, qmsg):
        recipients = list(self.session.recipients)

        def answer(statuses):
            for idx, path in enumerate(recipients):
                code, enhanced, text = _ANSWERS[statuses.get(idx, "deferred")]
                self._reply(code, enhanced, f"<{path.address}> {text} ({qmsg.qid})")
        return self.factory.queue.deliver_now(qmsg).addCallback(answer)


@implementer(IPolicyCheck)
class LMTPClientAccess:
    """LMTP takes mail from loopback and relay_networks clients only."""

    name = "lmtp_client_access"
    stages = frozenset({"connect"})

    def __init__(self, is_trusted):
        self.is_trusted = is_trusted

    def check(self, stage, session, argument):
        try:
            if ipaddress.ip_address(session.client_ip).is_loopback:
                return None
        except ValueError:
            if not session.client_ip:
                return None     # a UNIX socket: local by definition
        if self.is_trusted(session.client_ip):
            return None
        return Verdict(554, "5.7.1", "LMTP is for local and trusted clients only")


@implementer(IPolicyCheck)
class LocalRecipientsOnly:
    """LMTP delivers into this store: every recipient must be one of our domains."""

    name = "local_recipients_only"
    stages = frozenset({"rcpt"})

    def __init__(self, domains):
        self.domains = frozenset(d.lower() for d in domains)

    def check(self, stage, session, path):
        if path.has_routing or path.domain not in self.domains:
            return Verdict(550, "5.1.1", f"<{path.address}>: not a local recipient")
        return None


class LMTPServerFactory(SMTPServerFactory):
    """Builds LMTP sessions."""

    protocol = LMTPServerProtocol
    listener = "lmtp"
