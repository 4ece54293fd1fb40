"""Per-connection state of an SMTP session, handed to the policy checks."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SessionState:
    """What is known about one SMTP connection and its current transaction."""

    client_ip: str = ""
    client_port: int = 0
    listener: str = "smtp"          # smtp, submission, submissions, lmtp
    trusted: bool = False           # client in relay_networks
    helo: str = ""
    esmtp: bool = False
    tls: str = ""                   # "TLSv1.3 TLS_AES_256_GCM_SHA384" once encrypted
    authenticated: str = ""         # the user's uid once AUTH succeeded
    user: object = None             # the directory's User once AUTH succeeded
    sender: object = None           # address.Path
    recipients: list = field(default_factory=list)   # address.Path
    body_8bit: bool = False
    # DSN (RFC 3461) of the transaction: RET and ENVID of MAIL, and per
    # recipient (aligned with ``recipients``) NOTIFY and ORCPT, "" if not given.
    ret: str = ""
    envid: str = ""
    notify: list = field(default_factory=list)
    orcpt: list = field(default_factory=list)

    @property
    def may_relay(self) -> bool:
        return self.trusted or bool(self.authenticated)

    def reset_transaction(self):
        self.sender = None
        self.recipients = []
        self.body_8bit = False
        self.ret = self.envid = ""
        self.notify = []
        self.orcpt = []
