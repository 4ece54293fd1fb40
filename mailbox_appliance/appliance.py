"""The Appliance: one MultiService that builds and owns every part of the system.

Like Postfix's master it only composes: the directory, the spool and queue
manager, the delivery agents and the listeners are built here from the
configuration and handed what they need (reactor, config, collaborators).
"""

from __future__ import annotations

import os
import socket
import tempfile

from twisted.application import internet, service
from twisted.internet import defer, endpoints
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory

from mailbox_appliance import tls
from mailbox_appliance.authn import Authenticator
from mailbox_appliance.durable import BatchWorker
from mailbox_appliance.imap.commands import IMAPSessionFactory
from mailbox_appliance.netaddr import networks_predicate
from mailbox_appliance.delivery.maildir import MaildirDelivery
from mailbox_appliance.delivery.router import Router
from mailbox_appliance.pop3.maildrop import StoreMaildrops
from mailbox_appliance.pop3.server import POP3ServerFactory
from mailbox_appliance.queue.manager import QueueManager
from mailbox_appliance.queue.spool import Spool
from mailbox_appliance.smtp.policy import HopCount, PolicyChain, RecipientExists, RelayAccess
from mailbox_appliance.smtp.lmtp import (
    LMTPClientAccess, LMTPServerFactory, LocalRecipientsOnly)
from mailbox_appliance.smtp.server import SMTPServerFactory
from mailbox_appliance.store.store import MailStore


class ListenerError(Exception):
    """A listener could not be bound; names it for a one-line start-up error."""

    def __init__(self, name, description, reason):
        super().__init__(f"[listen] {name}: cannot listen on {description!r}: {reason}")
        self.name, self.description, self.reason = name, description, reason


class _Listener(internet.StreamServerEndpointService):
    """An endpoint service whose bind failure says which listener it was."""

    def __init__(self, name, description, endpoint, factory):
        super().__init__(endpoint, factory)
        self.listener_name = name
        self.description = description
        # A port that cannot be bound must stop start-up, not be logged and ignored.
        self._raiseSynchronously = True

    def privilegedStartService(self):
        try:
            super().privilegedStartService()
        except Exception as e:
            reason = getattr(e, "socketError", None) or e
            reason = getattr(reason, "strerror", None) or str(reason)
            raise ListenerError(self.listener_name, self.description, reason) from e


def _control_socket(data_dir):
    """Where the control socket listens; ``data_dir/control.sock`` names it.

    A UNIX socket path is limited to about 100 octets. A deeper data_dir
    gets its socket in a private folder of the system's temporary space,
    and ``control.sock`` becomes a symbolic link to it (the admin command
    connects to the link's target).
    """
    link = os.path.join(data_dir, "control.sock")
    if os.path.islink(link) or os.path.exists(link):
        target = os.path.realpath(link)
        probe = socket.socket(socket.AF_UNIX)
        try:
            probe.connect(target)
        except OSError:
            pass                # left by a process that is gone
        else:
            probe.close()
            raise ListenerError("control", link, "another appliance is running on this "
                                                 "data_dir")
        finally:
            probe.close()
        _remove_control_socket(link)
    if len(link.encode()) < 100:
        return link
    folder = tempfile.mkdtemp(prefix="mailappliance-")
    target = os.path.join(folder, "control.sock")
    os.symlink(target, link)
    return target


def _remove_control_socket(link):
    target = os.path.realpath(link)
    for p in {target, link}:
        try:
            os.unlink(p)
        except OSError:
            pass
    folder = os.path.dirname(target)
    if target != link and os.path.basename(folder).startswith("mailappliance-"):
        try:
            os.rmdir(folder)
        except OSError:
            pass


class Appliance(service.MultiService):
    """Every service of one mail appliance, built from one Config."""

    log = Logger()

    def __init__(self, config, reactor=None, directory=None):
        super().__init__()
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor
        self.config = config
        data_dir = config.server.data_dir
        os.makedirs(data_dir, mode=0o700, exist_ok=True)
        self.tls_context, self.certificate_path = tls.server_context_factory(config)

        if directory is None:
            from mailbox_appliance.directory.service import DirectoryService
            self.directory_service = DirectoryService(reactor, config)
            self.directory_service.setServiceParent(self)
            directory = self.directory_service.directory
        self.directory = directory

        domains = config.server.domains
        # Greylist triplets and other state that must outlive a restart.
        from mailbox_appliance.state import SQLiteStateStore
        self.state = SQLiteStateStore(os.path.join(data_dir, "state.sqlite3"), reactor)
        self.state.setServiceParent(self)
        # Accepting mail must not wait behind deliveries: each side has its
        # own disk thread. They are not child services because they must
        # outlive every service that still has disk work in flight.
        self.receive_worker = BatchWorker(reactor, "receive-io", threads=2)
        self.delivery_worker = BatchWorker(reactor, "delivery-io", threads=1)
        self.spool = Spool(reactor, os.path.join(data_dir, "queue"), worker=self.receive_worker)
        # The list server takes the mail of list addresses; what it sends goes
        # through the queue like any other mail.
        from mailbox_appliance.lists.service import ListService
        self.lists = ListService(reactor, config, self.state, self.spool)
        self.lists.setServiceParent(self)
        self.router = Router(directory, domains, lists=self.lists)
        self.store = MailStore(reactor, os.path.join(data_dir, "mail"),
                               hostname=config.server.hostname)
        self.local_delivery = MaildirDelivery(reactor, os.path.join(data_dir, "mail"),
                                              config.server.hostname,
                                              worker=self.delivery_worker,
                                              on_delivered=self.store.notify_delivered)
        from mailbox_appliance.delivery.remote import RemoteDelivery
        from mailbox_appliance.dns import CachingResolver, make_resolver
        # One answer cache for everything that asks DNS: outbound MX lookups,
        # the door checks (the sender's MX, reverse DNS, HELO names), DKIM keys
        # and DMARC records; a stream of mail from one sender asks once per TTL.
        self.resolver = CachingResolver(make_resolver(reactor, config), reactor)
        self.remote_delivery = RemoteDelivery(reactor, config, resolver=self.resolver)
        self.queue = QueueManager(reactor, config, self.spool, self.router, self.local_delivery,
                                  remote_agent=self.remote_delivery, list_agent=self.lists)
        self.lists.submit = self.queue.submit
        self.queue.setServiceParent(self)

        self.listeners = {}
        self._control(config)
        self._receivers(config, directory, domains)
        self._readers(config, directory)

    def _receivers(self, config, directory, domains):
        """The MX, submission and LMTP listeners, each with its policy chain."""
        from mailbox_appliance.smtp.sasl import AuthFailureLimiter
        from mailbox_appliance.smtp.submission import (
            SubmissionServerFactory, submission_policy)
        reactor = self.reactor
        # One Authenticator for every front end that takes passwords: failed
        # logins over SMTP AUTH slow down IMAP and POP3 guesses too.
        self.authenticator = Authenticator(directory, reactor)
        from mailbox_appliance.antispam.registry import (
            build_checks, content_scan, signing_scan, submission_checks)
        from mailbox_appliance.antispam.registry import open_content_state
        # A dict: the checks share what they keep there (the block-list
        # cache, the Bayes token database, the directory for per-user tokens).
        shared = {"store": self.state, "directory": directory}
        for name, svc in open_content_state(config, reactor).items():
            # Added before the listeners: started before any message arrives.
            svc.setServiceParent(self)
            shared[name] = svc
        self.bayes = shared.get("bayes")
        door, door_after = build_checks(config, reactor, self.resolver, shared)
        self.content_scan = content_scan(config, reactor, self.resolver, shared)
        self.policy = PolicyChain(door + [
            RelayAccess(domains),
            RecipientExists(directory, domains, lists=self.lists),
            HopCount(config.smtp.max_received_headers),
        ] + door_after + ([self.content_scan] if self.content_scan else []))
        if config.listen.smtp:
            factory = SMTPServerFactory(reactor, config, self.policy, self.spool, self.queue,
                                        tls_context=self.tls_context)
            self._listen("smtp", config.listen.smtp, factory)
        if config.listen.lmtp:
            self.lmtp_policy = PolicyChain()
            factory = LMTPServerFactory(reactor, config, self.lmtp_policy, self.spool,
                                        self.queue, tls_context=self.tls_context)
            for check in (LMTPClientAccess(factory.is_trusted), LocalRecipientsOnly(domains),
                          RecipientExists(directory, domains, lists=self.lists),
                          HopCount(config.smtp.max_received_headers)):
                self.lmtp_policy.add(check)
            self._listen("lmtp", config.listen.lmtp, factory)
        # Both submission ports share one policy and one failed-login count.
        self.submission_policy = submission_policy(config, directory, domains,
                                                   lists=self.lists)
        for check in reversed(submission_checks(door)):
            self.submission_policy.add(check, first=True)
        # Last: the signature must cover the message as the other checks left it.
        self.signing_scan = signing_scan(config, reactor, self.resolver)
        if self.signing_scan is not None:
            self.submission_policy.add(self.signing_scan)
        limiter = AuthFailureLimiter(reactor, config.submission.max_auth_failures_per_minute)
        for name, implicit in (("submission", False), ("submissions", True)):
            description = getattr(config.listen, name)
            if description:
                factory = SubmissionServerFactory(
                    reactor, config, self.submission_policy, self.spool, self.queue,
                    self.tls_context, self.authenticator, limiter, implicit_tls=implicit,
                    listener=name)
                self._listen(name, description, factory, implicit_tls=implicit)

    def _readers(self, config, directory):
        """The POP3 and IMAP listeners (plain with STLS/STARTTLS, and implicit TLS)."""
        reactor = self.reactor
        plaintext_ok = networks_predicate(config.plaintext_auth_nets())
        maildrops = StoreMaildrops(self.store)
        from mailbox_appliance.antispam.bayes_train import move_learner
        # Users teach the Bayesian filter by moving mail into and out of Junk.
        learner = move_learner(config, getattr(self, "bayes", None))
        for name, implicit in (("pop3", False), ("pop3s", True)):
            description = getattr(config.listen, name)
            if description:
                factory = POP3ServerFactory(reactor, config.server.hostname, self.authenticator,
                                            maildrops, tls_context=self.tls_context,
                                            implicit_tls=implicit, plaintext_ok=plaintext_ok)
                self._listen(name, description, factory, implicit_tls=implicit)
        for name, implicit in (("imap", False), ("imaps", True)):
            description = getattr(config.listen, name)
            if description:
                factory = IMAPSessionFactory(
                    reactor, config.server.hostname, self.authenticator, self.store,
                    tls_context=self.tls_context, implicit_tls=implicit,
                    plaintext_ok=plaintext_ok, max_append=config.imap.max_append,
                    max_command=config.imap.max_command,
                    idle_timeout=config.imap.idle_timeout,
                    max_user_ip_connections=config.imap.max_user_ip_connections,
                    on_moved=learner.on_moved if learner is not None else None)
                self._listen(name, description, factory, implicit_tls=implicit)

    def _control(self, config):
        """The admin command's socket: queue flush/hold/release/delete on the live queue."""
        from mailbox_appliance.antispam.verdicts import COUNTERS
        from mailbox_appliance.queue.control import ControlServer
        path = _control_socket(config.server.data_dir)
        self._listen("control", f"unix:{path.replace(':', chr(92) + ':')}:mode=600",
                     ControlServer(self.queue, reactor=self.reactor,
                                   stats=COUNTERS.snapshot))

    def startService(self):
        self.receive_worker.start()
        self.delivery_worker.start()
        super().startService()
        self._install_sighup()

    def _install_sighup(self):
        """SIGHUP reloads what can change without a restart (the rule files)."""
        import signal
        import threading
        if threading.current_thread() is not threading.main_thread():
            return
        try:
            self._previous_sighup = signal.signal(
                signal.SIGHUP, lambda *_: self.reactor.callFromThread(self.reload))
        except (ValueError, OSError, AttributeError):
            self._previous_sighup = None

    def reload(self):
        """Reload every content filter that can (``reload()``); errors are logged."""
        scan = getattr(self, "content_scan", None)
        for f in scan.filters if scan is not None else ():
            reload = getattr(f, "reload", None)
            if reload is None:
                continue
            try:
                reload()
                self.log.info("reloaded {name}", name=f.name)
            except Exception:
                self.log.failure("reloading {name} failed", name=f.name)

    def stopService(self):
        previous = getattr(self, "_previous_sighup", None)
        if previous is not None:
            import signal
            signal.signal(signal.SIGHUP, previous)
            self._previous_sighup = None

        def workers_down(result):
            if "control" in self.listeners:
                _remove_control_socket(os.path.join(self.config.server.data_dir,
                                                    "control.sock"))
            self.receive_worker.stop()
            self.delivery_worker.stop()
            return result
        # What the checks keep in memory (the greylist's passes) is written
        # while the state store is still open: it stops with the children.
        flushes = [defer.maybeDeferred(c.flush_now)
                   for c in getattr(getattr(self, "policy", None), "checks", ())
                   if hasattr(c, "flush_now")]
        d = defer.gatherResults(flushes, consumeErrors=True)
        d.addErrback(lambda f: self.log.failure("writing the checks' state at stop", f))
        d.addCallback(lambda _: super(Appliance, self).stopService())
        return d.addBoth(workers_down)

    def _listen(self, name, description, factory, implicit_tls=False):
        endpoint = endpoints.serverFromString(self.reactor, description)
        if implicit_tls:
            factory = TLSMemoryBIOFactory(self.tls_context, False, factory)
        svc = _Listener(name, description, endpoint, factory)
        svc.setName(f"listen-{name}")
        svc.setServiceParent(self)
        self.listeners[name] = svc

    def listening_port(self, name):
        """A Deferred firing with the IListeningPort of listener ``name``."""
        d = defer.Deferred()

        def got(port):
            d.callback(port)
            return port     # the service still needs it to stop listening
        self.listeners[name]._waitingForPort.addCallback(got)
        return d
