"""Per-connection state of an SMTP session, handed to the policy checks."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SessionState:
    """What is known about one SMTP connection and its current transaction."""

    client_ip: str = ""
    client_port: int = 0
    server_ip: str = ""             # the local address the client connected to
    listener: str = "smtp"          # smtp, submission, submissions, lmtp
    trusted: bool = False           # client in relay_networks
    helo: str = ""
    esmtp: bool = False
    tls: str = ""                   # "TLSv1.3 TLS_AES_256_GCM_SHA384" once encrypted
    authenticated: str = ""         # the user's uid once AUTH succeeded
    user: object = None             # the directory's User once AUTH succeeded
    auth_mechanism: str = ""        # the SASL mechanism it succeeded with (PLAIN, LOGIN)
    sender: object = None           # address.Path
    recipients: list = field(default_factory=list)   # address.Path
    body_8bit: bool = False
    trace_headers: list = field(default_factory=list)   # "Name: value\r\n" each
    # DSN (RFC 3461) of the transaction: RET and ENVID of MAIL, and per
    # recipient (aligned with ``recipients``) NOTIFY and ORCPT, "" if not given.
    ret: str = ""
    envid: str = ""
    notify: list = field(default_factory=list)
    orcpt: list = field(default_factory=list)
    # What the door's SPF check found for this transaction's sender ("" when
    # it did not run), and its Authentication-Results method part.
    spf_result: str = ""
    spf_auth: str = ""

    @property
    def may_relay(self) -> bool:
        return self.trusted or bool(self.authenticated)

    def add_trace_header(self, name, value):
        """A header field for the message of this transaction, above our Received:.

        ``value`` may be folded with CRLF + white space; any other CR, LF or
        NUL is dropped (it must not start a header of its own).
        """
        lines = [l.replace("\r", "").replace("\n", "").replace("\x00", "")
                 for l in value.split("\r\n")]
        value = "\r\n".join([lines[0]] + [l if l[:1] in (" ", "\t") else " " + l
                                            for l in lines[1:] if l])
        self.trace_headers.append(f"{name}: {value}\r\n")

    def reset_transaction(self):
        self.trace_headers = []
        self.sender = None
        self.recipients = []
        self.body_8bit = False
        self.ret = self.envid = ""
        self.notify = []
        self.orcpt = []
