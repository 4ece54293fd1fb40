"""The seams of the appliance, as zope.interface interfaces.

Protocol code talks to storage, the directory and policy only through these,
so each side can be replaced (an external LDAP server for the embedded one, a
fake directory in tests, new anti-spam checks in the policy chain).
"""

from zope.interface import Attribute, Interface


class DirectoryUnavailable(Exception):
    """The directory could not answer; callers must treat it as temporary (4xx)."""


class IDirectory(Interface):
    """Address resolution and authentication (``directory/``)."""

    def lookup(address):
        """Resolve one envelope address of one of our domains.

        @param address: ``local@domain`` as text; the domain is one of ours.
        @return: Deferred firing with a L{mailbox_appliance.directory.model.Resolution}
            (``Resolution.UNKNOWN`` kind when nobody has that address), or failing
            with L{DirectoryUnavailable}.
        """

    def expand(address):
        """Resolve ``address`` to its final destinations.

        Follows ``mailRoutingAddress`` forwarding and ``nisMailAlias`` members,
        nested up to a bounded depth with loops detected.

        @return: Deferred firing with a L{mailbox_appliance.directory.model.Expansion}
            (local mailboxes and remote addresses; empty when unknown), or failing
            with L{DirectoryUnavailable}.
        """

    def authenticate(login, password):
        """Check a login (``uid`` or ``mail``) and password by an LDAP bind.

        @return: Deferred firing with the L{mailbox_appliance.directory.model.User}
            on success, C{None} on bad credentials, or failing with
            L{DirectoryUnavailable}.
        """


class IPolicyCheck(Interface):
    """One named check in the SMTP policy chain (Postfix's smtpd_*_restrictions)."""

    name = Attribute("Short name used in logs.")
    stages = Attribute("The stages this check runs at: a set of "
                       "'connect', 'helo', 'mail', 'rcpt', 'data', 'eod', and the "
                       "notifications 'disconnect' and 'rcpt_refused' (answers ignored).")

    def check(stage, session, argument):
        """Judge one stage of a session.

        @param session: the L{mailbox_appliance.smtp.session.SessionState}.
        @param argument: stage dependent: the HELO name, the sender or recipient
            address, or the queued message file for 'eod'.
        @return: a L{mailbox_appliance.smtp.policy.Verdict}, or a Deferred of one;
            C{None} means no opinion (continue with the next check).
        """


class IDeliveryAgent(Interface):
    """Delivers one queued message to one kind of destination."""

    def deliver(message, recipients):
        """Deliver the message to the given recipients.

        @return: Deferred firing with a dict mapping each recipient to a
            L{mailbox_appliance.queue.model.Outcome}.
        """


class IMessageQueue(Interface):
    """The durable spool the receivers hand accepted mail to."""

    def store(envelope, body_path):
        """Move a fully written body into the queue and make it durable.

        @return: Deferred firing with the queue id once file and directory are
            fsync'ed; only then may the receiver answer 250.
        """


class IListAgent(Interface):
    """The list server's side of delivery: takes mail for list addresses."""

    def classify(address):
        """A Deferred firing with the list address kind of ``address``, or None."""

    def deliver(message, target):
        """Take ``message`` for the list address of ``target`` (a router Target of
        kind "list"); a Deferred firing with a RecipientResult."""


class IRemoteDelivery(Interface):
    """Sends queued mail to other domains over SMTP (``delivery/remote.py``)."""

    def deliver(message, domain, recipients):
        """Deliver ``message`` to ``recipients``, all at ``domain``.

        One SMTP transaction for them all where the other side allows it
        (a 452 for some RCPTs moves the rest to another transaction).

        @param message: the L{mailbox_appliance.queue.spool.QueuedMessage}; its
            bytes are ``message.data`` when not None, else the file
            ``message.path`` from ``message.body_offset`` (read off the
            reactor thread). The envelope gives the sender, RET= and ENVID=.
        @param domain: the destination domain (lower case); with a smarthost,
            still the recipients' domain (for logs and limits).
        @param recipients: a list of
            L{mailbox_appliance.delivery.result.RemoteRecipient}.
        @return: Deferred firing with {recipient idx:
            L{mailbox_appliance.delivery.result.RecipientResult}}, one per
            recipient given; it never fails.
        """

    def flush(domain=None):
        """Forget that ``domain`` (or every destination) was found dead."""
