"""The LDAP directory client: address lookup, expansion and authentication.

:class:`LDAPDirectory` implements :class:`~mailbox_appliance.interfaces.IDirectory`
with ldaptor's client protocol only, against an ``ldap://host:port`` URL.  The
same code serves the embedded server (:mod:`.embedded`) and an external
OpenLDAP.

Rules it keeps:

* Searches share one persistent, multiplexed connection, bound as ``bind_dn``
  when configured (anonymous otherwise), opened on demand and opened again
  after it broke: the client recovers by itself once the server is back.
  Password checks bind on a separate short-lived connection each.
* Every operation is bounded by ``timeout`` seconds.  A server that cannot
  answer -- refused, reset, timed out, any LDAP error but ``noSuchObject`` --
  makes the operation fail with :class:`DirectoryUnavailable`; it never turns
  into "unknown address" or "bad password".
* Filters are pureldap filter objects built from the values (printed, they
  are RFC 4515 escaped); no filter or DN is ever made by string formatting of
  input.  Inputs with control characters or over-long ones are refused before
  any query.  More answers than a unique key allows is a directory error
  (temporary), never "first one wins".
"""

from __future__ import annotations

import urllib.parse

from twisted.internet import defer, error, protocol
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.endpoints import (HostnameEndpoint, TCP4ClientEndpoint,
                                        TCP6ClientEndpoint, wrapClientTLS)
from twisted.logger import Logger
from zope.interface import implementer

from ldaptor.protocols import pureldap
from ldaptor.protocols.ldap import ldapclient, ldaperrors

from mailbox_appliance.directory.model import Expansion, Resolution, User
from mailbox_appliance.interfaces import DirectoryUnavailable, IDirectory

log = Logger()

#: Longest address looked up (RFC 5321 path limit minus the angle brackets).
MAX_ADDRESS_LENGTH = 254
#: Longest login accepted by :meth:`LDAPDirectory.authenticate`.
MAX_LOGIN_LENGTH = 256
#: Size limit sent with every search.
SIZE_LIMIT = 50

USER_CLASSES = ("inetOrgPerson", "inetLocalMailRecipient")
ALIAS_CLASS = "nisMailAlias"
USER_ATTRIBUTES = ("objectClass", "uid", "mail", "mailLocalAddress", "mailHost",
                   "mailRoutingAddress")
ALIAS_ATTRIBUTES = ("objectClass", "cn", "rfc822MailMember")

_INVALID_CREDENTIALS = {ldaperrors.LDAPInvalidCredentials.resultCode,
                        ldaperrors.LDAPInappropriateAuthentication.resultCode}


# ---------------------------------------------------------------------------
# Input checks and filters


def _has_control(text: str) -> bool:
    return any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 for c in text)


def normalize_address(address):
    """``local@domain`` with the domain lower-cased, or C{None} when unsafe.

    Unsafe: not text (or bytes that are not UTF-8), control characters (NUL,
    CR, LF, ...), longer than 254 characters, no ``@``, empty local part or
    domain.  The local part is left alone: LDAP compares it.
    """
    if isinstance(address, bytes):
        try:
            address = address.decode("utf-8")
        except UnicodeDecodeError:
            return None
    if not isinstance(address, str):
        return None
    if not address or len(address) > MAX_ADDRESS_LENGTH or _has_control(address):
        return None
    local, at, domain = address.rpartition("@")
    if not at or not local or not domain:
        return None
    return f"{local}@{domain.lower()}"


def _equal(attribute, value):
    return pureldap.LDAPFilter_equalityMatch(
        attributeDesc=pureldap.LDAPAttributeDescription(attribute),
        assertionValue=pureldap.LDAPAssertionValue(value))


def _any_of(filters):
    filters = list(filters)
    return filters[0] if len(filters) == 1 else pureldap.LDAPFilter_or(filters)


def _user_class_filter():
    return _any_of(_equal("objectClass", c) for c in USER_CLASSES)


def user_filter(address):
    """The filter finding the user owning ``address`` (mail or mailLocalAddress).

    ``address`` is used as given: normalise it first.
    """
    return pureldap.LDAPFilter_and([
        _user_class_filter(),
        pureldap.LDAPFilter_or([_equal("mail", address),
                                _equal("mailLocalAddress", address)]),
    ])


def uid_filter(uid):
    """The filter finding the user whose ``uid`` is ``uid``."""
    return pureldap.LDAPFilter_and([_user_class_filter(), _equal("uid", uid)])


def alias_filter(names):
    """The filter finding a ``nisMailAlias`` whose ``cn`` is one of ``names``."""
    return pureldap.LDAPFilter_and([
        _equal("objectClass", ALIAS_CLASS),
        _any_of(_equal("cn", n) for n in names),
    ])


def lookup_filter(address, bare_alias=False):
    """One filter finding both a user and an alias for ``address``.

    With ``bare_alias`` an alias named by the local part alone also matches
    (classic NIS aliases, used for the first of our domains).
    """
    names = [address]
    if bare_alias:
        names.append(address.rpartition("@")[0])
    return pureldap.LDAPFilter_or([user_filter(address), alias_filter(names)])


# ---------------------------------------------------------------------------
# Protocol helpers


class _Entry:
    """One search result: its DN and attributes (names lower-cased, text values)."""

    __slots__ = ("dn", "attributes")

    def __init__(self, dn, attributes):
        self.dn = dn
        self.attributes = attributes

    @classmethod
    def fromResult(cls, msg):
        attributes = {}
        for name, values in msg.attributes:
            attributes.setdefault(_text(name).lower(), []).extend(_text(v) for v in values)
        return cls(_text(msg.objectName), attributes)

    def get(self, name):
        return self.attributes.get(name.lower(), [])

    def classes(self):
        return {c.lower() for c in self.get("objectClass")}


def _text(value):
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


class _Client(ldapclient.LDAPClient):
    """ldaptor's client protocol, telling its owner when the connection ends."""

    def __init__(self):
        super().__init__()
        self.onLost = []
        self.uses = 0

    def connectionLost(self, reason=protocol.connectionDone):
        super().connectionLost(reason)
        lost, self.onLost = self.onLost, []
        for callback in lost:
            callback(self)

    def abort(self):
        if self.transport is not None and self.connected:
            self.transport.abortConnection()


def _search_on(client, request):
    """Send ``request``; a Deferred firing with (resultCode, message, entries)."""
    result = defer.Deferred()
    entries = []

    def handler(msg):
        if isinstance(msg, pureldap.LDAPSearchResultEntry):
            entries.append(msg)
            return False
        if isinstance(msg, pureldap.LDAPSearchResultDone):
            if not result.called:
                result.callback((msg.resultCode, msg.errorMessage, entries))
            return True
        return False  # references and anything else: ignored

    try:
        wire = client.send_multiResponse(request, handler)
    except Exception:
        return defer.fail()
    # Only fires (as a failure) when the connection is lost first.
    wire.addErrback(lambda f: None if result.called else result.errback(f))
    return result


def _bind_on(client, dn, password):
    """Simple bind; a Deferred firing with the result code."""
    try:
        d = client.send(pureldap.LDAPBindRequest(dn=dn, auth=password))
    except Exception:
        return defer.fail()
    return d.addCallback(lambda response: response.resultCode)


def _describe(failure):
    """A short human reason for a failed directory operation."""
    if failure.check(defer.TimeoutError, defer.CancelledError):
        return "no answer in time"
    if failure.check(ldaperrors.LDAPException):
        return f"LDAP error: {failure.value}"
    if failure.check(error.ConnectError):
        return f"cannot connect: {failure.getErrorMessage()}"
    if failure.check(error.ConnectionLost, error.ConnectionDone):
        return "connection lost"
    return f"{failure.type.__name__}: {failure.getErrorMessage()}"


def parse_url(url):
    """(tls, host, port) of an ``ldap://host[:port]`` or ``ldaps://`` URL."""
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("ldap", "ldaps") or not parts.hostname:
        raise ValueError(f"expected ldap://host:port, got {url!r}")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"expected ldap://host:port, got {url!r}")
    tls = scheme == "ldaps"
    port = parts.port or (636 if tls else 389)
    return tls, parts.hostname, port


# ---------------------------------------------------------------------------
# The persistent search connection


class _Connection:
    """One persistent connection for searches, (re)opened on demand."""

    def __init__(self, reactor, endpoint, bind_dn, bind_password, timeout):
        self._reactor = reactor
        self._endpoint = endpoint
        self._bind_dn = bind_dn
        self._bind_password = bind_password
        self._timeout = timeout
        self._client = None
        self._waiting = None       # list of Deferreds while connecting
        self._attempt = None
        self.closed = False

    def get(self):
        """A Deferred firing with a connected (and bound) client."""
        if self.closed:
            return defer.fail(DirectoryUnavailable("directory client is closed"))
        if self._client is not None and self._client.connected:
            return defer.succeed(self._client)
        d = defer.Deferred(self._forget)
        if self._waiting is None:
            self._waiting = [d]
            self._attempt = self._open()
            self._attempt.addTimeout(self._timeout, self._reactor)
            self._attempt.addBoth(self._opened)
        else:
            self._waiting.append(d)
        return d

    def _forget(self, d):
        if self._waiting is not None and d in self._waiting:
            self._waiting.remove(d)

    @defer.inlineCallbacks
    def _open(self):
        client = yield self._endpoint.connect(protocol.Factory.forProtocol(_Client))
        try:
            if self._bind_dn:
                code = yield _bind_on(client, self._bind_dn, self._bind_password)
                if code != ldaperrors.Success.resultCode:
                    raise ldaperrors.get(code, f"bind as {self._bind_dn} refused")
        except BaseException:
            client.abort()
            raise
        return client

    def _opened(self, result):
        self._attempt = None
        waiting, self._waiting = self._waiting or [], None
        if isinstance(result, _Client):
            if self.closed:
                result.abort()
                result = DirectoryUnavailable("directory client is closed")
            elif not result.connected:
                result = DirectoryUnavailable("connection lost")
            else:
                self._client = result
                result.onLost.append(self._lost)
                for d in waiting:
                    d.callback(result)
                return None
        elif self.closed:
            result = DirectoryUnavailable("directory client is closed")
        else:
            reason = _describe(result)
            log.warn("cannot open a directory connection: {reason}", reason=reason)
            result = DirectoryUnavailable(f"directory unreachable: {reason}")
        for d in waiting:
            d.errback(result)
        return None

    def _lost(self, client):
        if self._client is client:
            self._client = None

    def close(self):
        """Close the connection; a Deferred firing once it is gone."""
        self.closed = True
        if self._attempt is not None:
            self._attempt.cancel()
        client, self._client = self._client, None
        if client is None or not client.connected:
            return defer.succeed(None)
        d = defer.Deferred()
        client.onLost.append(lambda _: d.callback(None))
        try:
            client.unbind()
        except Exception:
            client.abort()
        return d


# ---------------------------------------------------------------------------
# The directory


class _ExpansionState:
    """What :meth:`LDAPDirectory.expand` has found so far."""

    def __init__(self):
        self.local = {}
        self.remote = {}
        self.unknown = {}
        self.loops = {}
        self.done = set()

    def result(self):
        return Expansion(local=tuple(self.local.values()),
                         remote=tuple(self.remote.values()),
                         unknown=tuple(self.unknown.values()),
                         loops=tuple(self.loops.values()))


@implementer(IDirectory)
class LDAPDirectory:
    """IDirectory over LDAP (see the module docstring for the rules).

    @param reactor: the reactor (connections and timeouts).
    @param url: ``ldap://host:port`` (``ldaps://`` also works).
    @param base_dn: where users and aliases are searched (whole subtree).
    @param domains: our mail domains; the first one also matches aliases
        named by a bare local part.
    @param bind_dn: DN to bind the search connection as; anonymous when empty.
    @param timeout: seconds any one operation may take.
    @param max_alias_depth: how deep aliases and forwards may nest.
    """

    def __init__(self, reactor, url, base_dn, domains, bind_dn="", bind_password="",
                 timeout=10, max_alias_depth=8, max_auth_connections=8):
        self._reactor = reactor
        self.url = url
        self.base_dn = base_dn
        self.domains = tuple(d.lower().rstrip(".") for d in domains)
        if not timeout or timeout <= 0:
            log.warn("directory timeout {timeout!r} makes no sense; using 10 s",
                     timeout=timeout)
            timeout = 10
        self.timeout = timeout
        self.max_alias_depth = max(0, max_alias_depth)
        tls, host, port = parse_url(url)
        self._endpoint = self._make_endpoint(reactor, tls, host, port, timeout)
        self._search_connection = _Connection(reactor, self._endpoint, bind_dn,
                                              bind_password, timeout)
        self._auth_slots = defer.DeferredSemaphore(max_auth_connections)
        self._auth_clients = set()
        self._auth_attempts = set()
        self._closed = False

    @staticmethod
    def _make_endpoint(reactor, tls, host, port, timeout):
        if isIPAddress(host):
            endpoint = TCP4ClientEndpoint(reactor, host, port, timeout=timeout)
        elif isIPv6Address(host):
            endpoint = TCP6ClientEndpoint(reactor, host, port, timeout=timeout)
        else:
            endpoint = HostnameEndpoint(reactor, host, port, timeout=timeout)
        if tls:
            from twisted.internet.ssl import optionsForClientTLS
            endpoint = wrapClientTLS(optionsForClientTLS(host), endpoint)
        return endpoint

    # -- helpers --------------------------------------------------------

    def is_ours(self, domain):
        """Whether ``domain`` is one of our mail domains."""
        return domain.lower().rstrip(".") in self.domains

    def _timed(self, d, what):
        """Bound ``d`` by the timeout and turn every failure into DirectoryUnavailable."""
        d.addTimeout(self.timeout, self._reactor)

        def failed(failure):
            if failure.check(DirectoryUnavailable):
                reason = str(failure.value)
            else:
                reason = _describe(failure)
                if not failure.check(defer.TimeoutError, defer.CancelledError,
                                     ldaperrors.LDAPException, error.ConnectError,
                                     error.ConnectionLost, error.ConnectionDone):
                    log.failure("unexpected failure in directory {what}", failure, what=what)
            log.warn("directory {what} failed: {reason}", what=what, reason=reason)
            if failure.check(DirectoryUnavailable):
                return failure
            raise DirectoryUnavailable(f"{what}: {reason}")

        return d.addErrback(failed)

    @defer.inlineCallbacks
    def _search(self, filter, attributes, retry=True):
        """Search under base_dn on the shared connection; a list of _Entry."""
        client = yield self._search_connection.get()
        reused = client.uses > 0
        client.uses += 1
        request = pureldap.LDAPSearchRequest(
            baseObject=self.base_dn,
            scope=pureldap.LDAP_SCOPE_wholeSubtree,
            derefAliases=pureldap.LDAP_DEREF_neverDerefAliases,
            sizeLimit=SIZE_LIMIT,
            timeLimit=max(1, int(self.timeout)),
            typesOnly=0,
            filter=filter,
            attributes=list(attributes))
        try:
            code, message, entries = yield _search_on(client, request)
        except defer.CancelledError:
            client.abort()  # the server is stuck: start afresh next time
            raise
        except (error.ConnectionLost, error.ConnectionDone,
                ldapclient.LDAPClientConnectionLostException):
            if reused and retry:
                # The server may have closed an idle connection just now.
                result = yield self._search(filter, attributes, retry=False)
                return result
            raise
        if code == ldaperrors.LDAPNoSuchObject.resultCode:
            log.warn("directory base {base} does not exist", base=self.base_dn)
            return []
        if code != ldaperrors.Success.resultCode:
            raise ldaperrors.get(code, _text(message or ""))
        return [_Entry.fromResult(e) for e in entries]

    def _user(self, entry):
        mails = sorted((_lower_domain(m) for m in entry.get("mail") if m), key=str.lower)
        addresses = tuple(sorted({_lower_domain(a) for a in entry.get("mailLocalAddress") if a},
                                 key=str.lower))
        uids = sorted(entry.get("uid"))
        hosts = entry.get("mailHost")
        routes = sorted(r.strip() for r in entry.get("mailRoutingAddress") if r.strip())
        mail = mails[0] if mails else (addresses[0] if addresses else "")
        return User(dn=entry.dn, uid=uids[0] if uids else "", mail=mail,
                    addresses=addresses, mail_host=hosts[0] if hosts else "",
                    routing_address=routes[0] if routes else "")

    # -- IDirectory -----------------------------------------------------

    def lookup(self, address):
        """Resolve ``address`` to a user, an alias or unknown (see IDirectory)."""
        normalized = normalize_address(address)
        if normalized is None:
            return defer.succeed(Resolution(Resolution.UNKNOWN))
        d = self._lookup(normalized)
        return self._timed(d, f"lookup of {normalized!r}")

    @defer.inlineCallbacks
    def _lookup(self, address):
        domain = address.rpartition("@")[2]
        bare = bool(self.domains) and domain == self.domains[0]
        entries = yield self._search(lookup_filter(address, bare),
                                     USER_ATTRIBUTES + ALIAS_ATTRIBUTES[1:])
        users = [e for e in entries if e.classes() & {c.lower() for c in USER_CLASSES}]
        aliases = [e for e in entries if ALIAS_CLASS.lower() in e.classes()]
        if len(users) > 1:
            raise DirectoryUnavailable(
                f"{len(users)} directory entries claim {address!r}: "
                + ", ".join(e.dn for e in users))
        if users:
            return Resolution(Resolution.USER, user=self._user(users[0]))
        if aliases:
            exact = [a for a in aliases
                     if address.lower() in {c.lower() for c in a.get("cn")}]
            chosen = exact or aliases
            if len(chosen) > 1:
                raise DirectoryUnavailable(
                    f"{len(chosen)} aliases claim {address!r}: "
                    + ", ".join(e.dn for e in chosen))
            members = tuple(m.strip() for m in chosen[0].get("rfc822MailMember") if m.strip())
            return Resolution(Resolution.ALIAS, members=members)
        return Resolution(Resolution.UNKNOWN)

    def expand(self, address):
        """Follow forwards and aliases to final destinations (see IDirectory)."""
        state = _ExpansionState()
        d = self._expand(address, 0, (), state, top=True)
        d.addCallback(lambda _: state.result())

        def failed(failure):
            if not failure.check(DirectoryUnavailable):
                log.failure("unexpected failure expanding {address!r}", failure,
                            address=address)
                raise DirectoryUnavailable(f"expansion of {address!r}: {_describe(failure)}")
            return failure

        return d.addErrback(failed)

    def _member_address(self, member):
        """An alias member as an address (bare names get our first domain)."""
        member = member.strip()
        if "<" in member and member.endswith(">"):
            member = member[member.rindex("<") + 1:-1].strip()
        if member and "@" not in member and self.domains:
            member = f"{member}@{self.domains[0]}"
        return member

    @defer.inlineCallbacks
    def _expand(self, address, depth, path, state, top=False):
        normalized = normalize_address(address)
        if normalized is None:
            if not top:
                state.unknown.setdefault(str(address), str(address))
            return
        key = normalized.lower()
        if key in path:
            state.loops.setdefault(key, normalized)
            return
        if not self.is_ours(normalized.rpartition("@")[2]):
            # A final destination, however deep: costs no lookup.
            state.remote.setdefault(key, normalized)
            return
        if depth > self.max_alias_depth:
            state.loops.setdefault(key, normalized)
            return
        if key in state.done:
            return
        state.done.add(key)
        resolution = yield self.lookup(normalized)
        path = path + (key,)
        if resolution.kind == Resolution.USER:
            user = resolution.user
            route = normalize_address(user.routing_address) if user.routing_address else None
            if route is not None and route.lower() not in (key, user.mail.lower()):
                yield self._expand(route, depth + 1, path, state)
            elif user.routing_address and route is None:
                state.unknown.setdefault(user.routing_address.lower(), user.routing_address)
            else:
                state.local.setdefault(user.dn.lower(), user)
        elif resolution.kind == Resolution.ALIAS:
            for member in resolution.members:
                member = self._member_address(member)
                if member:
                    yield self._expand(member, depth + 1, path, state)
        elif not top:
            state.unknown.setdefault(key, normalized)

    def authenticate(self, login, password):
        """Check ``login`` (uid, or mail when it has an ``@``) and ``password``.

        Fires with the User, C{None} for bad credentials (including an empty
        password, which is never sent: RFC 4513 5.1.2), or fails with
        DirectoryUnavailable.
        """
        if isinstance(login, bytes):
            try:
                login = login.decode("utf-8")
            except UnicodeDecodeError:
                return defer.succeed(None)
        if isinstance(password, str):
            password = password.encode("utf-8")
        if (not isinstance(login, str) or not login or len(login) > MAX_LOGIN_LENGTH
                or _has_control(login) or not isinstance(password, bytes) or not password):
            return defer.succeed(None)
        if "@" in login:
            address = normalize_address(login)
            if address is None:
                return defer.succeed(None)
            filter = user_filter(address)
        else:
            filter = uid_filter(login)
        d = self._authenticate(login, filter, password)
        return self._timed(d, f"authentication of {login!r}")

    @defer.inlineCallbacks
    def _authenticate(self, login, filter, password):
        entries = yield self._search(filter, USER_ATTRIBUTES)
        if len(entries) != 1:
            if entries:
                log.warn("login {login!r} matches {n} directory entries; refused",
                         login=login, n=len(entries))
            return None
        entry = entries[0]
        code = yield self._auth_slots.run(self._check_bind, entry.dn, password)
        if code == ldaperrors.Success.resultCode:
            return self._user(entry)
        if code in _INVALID_CREDENTIALS:
            return None
        raise ldaperrors.get(code, "password check failed")

    @defer.inlineCallbacks
    def _check_bind(self, dn, password):
        """Bind as ``dn`` on a fresh connection; the result code."""
        if self._closed:
            raise DirectoryUnavailable("directory client is closed")
        attempt = self._endpoint.connect(protocol.Factory.forProtocol(_Client))
        self._auth_attempts.add(attempt)
        try:
            client = yield attempt
        finally:
            self._auth_attempts.discard(attempt)
        self._auth_clients.add(client)
        client.onLost.append(self._auth_clients.discard)
        try:
            code = yield _bind_on(client, dn, password)
        except BaseException:
            client.abort()
            raise
        try:
            client.unbind()
        except Exception:
            client.abort()
        return code

    # -- life cycle -----------------------------------------------------

    def close(self):
        """Close every connection; a Deferred firing once they are all gone.

        The directory cannot be used afterwards.
        """
        self._closed = True
        waiting = [self._search_connection.close()]
        for attempt in list(self._auth_attempts):
            attempt.cancel()
        for client in list(self._auth_clients):
            if client.connected:
                d = defer.Deferred()
                client.onLost.append(lambda _, d=d: d.callback(None))
                waiting.append(d)
                client.abort()
        return defer.gatherResults(waiting).addCallback(lambda _: None)


def _lower_domain(address):
    local, at, domain = address.strip().rpartition("@")
    if not at:
        return address.strip()
    return f"{local}@{domain.lower()}"
