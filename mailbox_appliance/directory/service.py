"""The directory as a Twisted service: embedded LDAP server or external one.

:class:`DirectoryService` is what the appliance plugs in.  With
``[directory] url`` set it talks to that server; otherwise it starts an
:class:`~mailbox_appliance.directory.embedded.EmbeddedLDAPServer` on the LDIF
file and talks to that, through the very same LDAP client.  Either way
``service.directory`` is a cached IDirectory that can be handed out at once:
calls made before the client is ready wait for it (at most ``timeout``
seconds, then DirectoryUnavailable).
"""

from __future__ import annotations

from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from mailbox_appliance.directory.cache import CachingDirectory
from mailbox_appliance.directory.embedded import EmbeddedLDAPServer
from mailbox_appliance.directory.ldap import LDAPDirectory
from mailbox_appliance.interfaces import DirectoryUnavailable, IDirectory
from mailbox_appliance.outcome import Outcome

log = Logger()


@implementer(IDirectory)
class GatedDirectory:
    """Forwards to a directory once there is one; earlier calls wait for it.

    A call waiting longer than ``timeout`` seconds, or while the directory
    could not be started, fails with DirectoryUnavailable.
    """

    def __init__(self, reactor, timeout):
        self._reactor = reactor
        self._timeout = timeout
        self._target = None
        self._problem = None
        self._waiting = []

    def open(self, directory):
        """Start forwarding to ``directory``; waiting calls go ahead."""
        self._target, self._problem = directory, None
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(directory)

    def broken(self, reason):
        """The directory cannot be started: waiting and later calls fail."""
        self._target, self._problem = None, reason
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.errback(DirectoryUnavailable(reason))

    def close(self):
        """Stop forwarding (the service stops); later calls wait again."""
        self._target = None
        self.broken("the directory is stopped")
        self._problem = None

    def _call(self, name, *args):
        if self._target is not None:
            return getattr(self._target, name)(*args)
        if self._problem is not None:
            return defer.fail(DirectoryUnavailable(self._problem))
        d = defer.Deferred(lambda d: d in self._waiting and self._waiting.remove(d))
        self._waiting.append(d)
        d.addTimeout(self._timeout, self._reactor)

        def late(failure):
            failure.trap(defer.TimeoutError)
            raise DirectoryUnavailable("the directory is not ready yet")

        d.addErrback(late)
        d.addCallback(lambda target: getattr(target, name)(*args))
        return d

    def lookup(self, address):
        return self._call("lookup", address)

    def expand(self, address):
        return self._call("expand", address)

    def authenticate(self, login, password):
        return self._call("authenticate", login, password)


class DirectoryService(service.MultiService):
    """Runs the directory of the appliance (see the module docstring).

    @ivar directory: the cached IDirectory to hand to protocol code; usable
        at once, calls wait until the service is ready.
    @ivar ldap: the L{LDAPDirectory} while running and ready, else C{None}.
    @ivar embedded: the L{EmbeddedLDAPServer}, or C{None} with an external URL.
    """

    def __init__(self, reactor, config):
        super().__init__()
        self._reactor = reactor
        self.config = config
        settings = config.directory
        self.embedded = None
        if not settings.url:
            self.embedded = EmbeddedLDAPServer(settings.ldif, reactor=reactor)
            self.embedded.setServiceParent(self)
        self._gate = GatedDirectory(reactor, settings.timeout)
        self.directory = CachingDirectory(self._gate, ttl=settings.cache_ttl, clock=reactor)
        self.ldap = None
        self._ready = Outcome()

    def whenReady(self):
        """A Deferred firing with L{directory} once the LDAP client is set up.

        Fails (DirectoryUnavailable) when the embedded server could not start.
        """
        return self._ready.wait()

    def startService(self):
        self._ready.reset()
        super().startService()
        if self.embedded is not None:
            d = self.embedded.whenReady()
        else:
            d = defer.succeed(self.config.directory.url)
        d.addCallback(self._connect)
        d.addErrback(self._failed)

    def _connect(self, url):
        if not self.running:
            return
        settings = self.config.directory
        self.ldap = LDAPDirectory(
            self._reactor, url, settings.base_dn, self.config.server.domains,
            bind_dn=settings.bind_dn, bind_password=settings.bind_password,
            timeout=settings.timeout, max_alias_depth=settings.max_alias_depth)
        self._gate.open(self.ldap)
        log.info("directory ready at {url} (base {base})", url=url, base=settings.base_dn)
        self._ready.settle(True, self.directory)

    def _failed(self, failure):
        reason = f"the directory could not start: {failure.getErrorMessage()}"
        log.error("{reason}", reason=reason)
        self._gate.broken(reason)
        self._ready.settle(False, DirectoryUnavailable(reason))

    def stopService(self):
        """Close the client connections and stop the embedded server."""
        ldap, self.ldap = self.ldap, None
        self._gate.close()
        self.directory.clear()
        self._ready.reset()
        closing = [defer.maybeDeferred(super().stopService)]
        if ldap is not None:
            closing.append(ldap.close())
        return defer.gatherResults(closing).addCallback(lambda _: None)
