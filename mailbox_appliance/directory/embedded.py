"""The embedded, read-only LDAP server that serves the LDIF directory.

When no external LDAP server is configured, the appliance loads its LDIF file
into an ldaptor in-memory tree and serves it on a random loopback port.  The
directory client (:mod:`mailbox_appliance.directory.ldap`) then talks to it
exactly as it would talk to an external OpenLDAP, so there is one code path.

Compared with ldaptor's stock ``LDAPServer`` the server here is hardened:

* it is read-only: add, delete, modify, modify DN and extended operations are
  refused with ``unwillingToPerform``;
* ``userPassword`` is never returned by a search, cannot be used in a search
  filter or a compare (an anonymous client could otherwise guess passwords);
* a simple bind with a DN and an empty password (RFC 4513 5.1.2
  "unauthenticated bind") is refused, SASL binds are refused, and only
  cleartext, ``{SSHA}``, ``{SHA}``, ``{SSHA256}``, ``{SSHA512}`` password
  values are understood -- any other ``{SCHEME}`` value never matches, instead
  of being compared as cleartext as ldaptor would do;
* the size limit of a search is enforced (``sizeLimitExceeded``);
* equality filters on ``mail``, ``mailLocalAddress``, ``uid``, ``cn`` and
  ``rfc822MailMember`` use an index instead of walking the whole tree;
* stopping the service also closes the connections of its clients.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re

from twisted.application import service
from twisted.internet import defer, endpoints, protocol
from twisted.logger import Logger
from twisted.python import components

from ldaptor import inmemory, interfaces as ldaptor_interfaces
from ldaptor.protocols import pureldap
from ldaptor.protocols.ldap import distinguishedname, ldaperrors, ldapserver

from mailbox_appliance.outcome import Outcome

log = Logger()

#: Entries a single search may return when the client asks for no limit.
SERVER_SIZE_LIMIT = 500

_PASSWORD_ATTRIBUTES = {b"userpassword", b"2.5.4.35"}

_SCHEME = re.compile(rb"^\{([A-Za-z0-9.-]+)\}(.*)$", re.S)

# scheme -> (hash constructor, digest length, salted)
_HASHES = {
    b"SSHA": (hashlib.sha1, 20, True),
    b"SHA": (hashlib.sha1, 20, False),
    b"SSHA256": (hashlib.sha256, 32, True),
    b"SHA256": (hashlib.sha256, 32, False),
    b"SSHA512": (hashlib.sha512, 64, True),
    b"SHA512": (hashlib.sha512, 64, False),
}


def check_password(stored: bytes, password: bytes) -> bool:
    """Whether ``password`` matches one ``userPassword`` value.

    Values are cleartext or ``{SCHEME}base64``.  Unknown schemes never match.
    An empty password never matches.
    """
    if not password or not stored:
        return False
    m = _SCHEME.match(stored)
    if m is None:
        return hmac.compare_digest(stored, password)
    scheme, encoded = m.group(1).upper(), m.group(2)
    known = _HASHES.get(scheme)
    if known is None:
        return False
    algorithm, size, salted = known
    try:
        raw = base64.b64decode(encoded.strip(), validate=False)
    except (ValueError, TypeError):
        return False
    if len(raw) < size or (not salted and len(raw) != size):
        return False
    digest, salt = raw[:size], raw[size:]
    return hmac.compare_digest(algorithm(password + salt).digest(), digest)


def _as_bytes(value) -> bytes:
    if isinstance(value, bytes):
        return value
    return str(value).encode("utf-8")


def _filter_mentions_password(f) -> bool:
    """Whether a filter object refers to ``userPassword`` anywhere."""
    if isinstance(f, (pureldap.LDAPFilter_and, pureldap.LDAPFilter_or)):
        return any(_filter_mentions_password(x) for x in f)
    if isinstance(f, pureldap.LDAPFilter_not):
        return _filter_mentions_password(f.value)
    if isinstance(f, pureldap.LDAPFilter_present):
        name = f.value
    elif isinstance(f, pureldap.LDAPFilter_substrings):
        name = f.type
    elif isinstance(f, pureldap.LDAPFilter_extensibleMatch):
        if f.type is None:
            return True  # could match any attribute, including the password
        name = f.type.value
    elif isinstance(f, pureldap.LDAPAttributeValueAssertion):
        name = f.attributeDesc.value
    else:
        return True  # unknown: refuse rather than risk an oracle
    name = getattr(name, "value", name)
    return _as_bytes(name).split(b";")[0].lower() in _PASSWORD_ATTRIBUTES


class ReadOnlyLDAPServer(ldapserver.LDAPServer):
    """One client connection to the embedded server (see module docstring)."""

    def connectionMade(self):
        super().connectionMade()
        self.factory.connectionMade(self)

    def connectionLost(self, reason=protocol.connectionDone):
        super().connectionLost(reason)
        self.factory.connectionLost(self)

    # -- bind -------------------------------------------------------------

    def handle_LDAPBindRequest(self, request, controls, reply):
        if request.version != 3:
            raise ldaperrors.LDAPProtocolError("Version %u not supported" % request.version)
        self.checkControls(controls)
        if request.sasl:
            raise ldaperrors.LDAPAuthMethodNotSupported("SASL is not supported")
        password = _as_bytes(request.auth)
        if request.dn in (b"", ""):
            if password:
                # RFC 4513 5.1.3 / 5.1.2: a password without a name is not a login.
                raise ldaperrors.LDAPUnwillingToPerform("password without a name")
            self.boundUser = None
            return pureldap.LDAPBindResponse(resultCode=ldaperrors.Success.resultCode)
        if not password:
            # RFC 4513 5.1.2: unauthenticated bind, refused.
            raise ldaperrors.LDAPUnwillingToPerform("unauthenticated bind not allowed")
        self.boundUser = None
        try:
            dn = distinguishedname.DistinguishedName(request.dn)
        except Exception:
            raise ldaperrors.LDAPInvalidCredentials()
        root = ldaptor_interfaces.IConnectedLDAPEntry(self.factory)
        d = root.lookup(dn)

        def found(entry):
            for value in entry.get("userPassword", ()):
                if check_password(_as_bytes(value), password):
                    self.boundUser = entry
                    return pureldap.LDAPBindResponse(
                        resultCode=ldaperrors.Success.resultCode)
            raise ldaperrors.LDAPInvalidCredentials()

        def missing(failure):
            failure.trap(ldaperrors.LDAPNoSuchObject)
            raise ldaperrors.LDAPInvalidCredentials()

        d.addCallbacks(found, missing)
        return d

    # -- search -----------------------------------------------------------

    def handle_LDAPSearchRequest(self, request, controls, reply):
        self.checkControls(controls)
        if (request.baseObject in (b"", "")
                and request.scope == pureldap.LDAP_SCOPE_baseObject
                and request.filter == pureldap.LDAPFilter_present("objectClass")):
            return self.getRootDSE(request, reply)
        if _filter_mentions_password(request.filter):
            # Evaluates to Undefined for us: nothing matches.
            return pureldap.LDAPSearchResultDone(resultCode=ldaperrors.Success.resultCode)
        limit = request.sizeLimit or SERVER_SIZE_LIMIT
        limit = min(limit, SERVER_SIZE_LIMIT)
        dn = distinguishedname.DistinguishedName(request.baseObject)
        root = ldaptor_interfaces.IConnectedLDAPEntry(self.factory)
        d = root.lookup(dn)
        d.addCallback(self._search, request)

        def send(entries):
            for entry in entries[:limit]:
                reply(pureldap.LDAPSearchResultEntry(
                    objectName=entry.dn.getText(),
                    attributes=self._attributes(entry, request)))
            code = ldaperrors.Success.resultCode
            if len(entries) > limit:
                code = ldaperrors.LDAPSizeLimitExceeded.resultCode
            return pureldap.LDAPSearchResultDone(resultCode=code)

        d.addCallback(send)
        d.addErrback(self._cbSearchLDAPError)
        d.addErrback(defer.logError)
        d.addErrback(self._cbSearchOtherError)
        return d

    def _search(self, base, request):
        candidates = self.factory.index.candidates(request.filter)
        if candidates is None:
            return base.search(filterObject=request.filter, scope=request.scope,
                               derefAliases=request.derefAliases)
        return [e for e in candidates
                if _in_scope(base, e, request.scope) and e.match(request.filter)]

    @staticmethod
    def _attributes(entry, request):
        wanted = [_as_bytes(a).lower() for a in request.attributes]
        everything = not wanted or b"*" in wanted
        result = []
        for key, values in entry.items():
            name = _as_bytes(key).lower()
            if name in _PASSWORD_ATTRIBUTES:
                continue
            if not everything and name not in wanted:
                continue
            values = [] if request.typesOnly else sorted(_as_bytes(v) for v in values)
            result.append((key, values))
        return result

    def handle_LDAPCompareRequest(self, request, controls, reply):
        name = _as_bytes(getattr(request.ava.attributeDesc, "value",
                                 request.ava.attributeDesc))
        if name.split(b";")[0].lower() in _PASSWORD_ATTRIBUTES:
            raise ldaperrors.LDAPInsufficientAccessRights("no compare on passwords")
        return super().handle_LDAPCompareRequest(request, controls, reply)

    # -- writes: refused ------------------------------------------------

    def _read_only(self, request, controls, reply):
        raise ldaperrors.LDAPUnwillingToPerform("the embedded directory is read-only")

    handle_LDAPAddRequest = _read_only
    handle_LDAPDelRequest = _read_only
    handle_LDAPModifyRequest = _read_only
    handle_LDAPModifyDNRequest = _read_only
    handle_LDAPExtendedRequest = _read_only


#: Attributes with an equality index in the embedded server.
INDEXED_ATTRIBUTES = (b"mail", b"maillocaladdress", b"uid", b"cn", b"rfc822mailmember")


class _EqualityIndex:
    """Equality index of a read-only tree, so a lookup does not walk it all.

    Only a pre-filter: candidates are still checked with ``entry.match``.
    Keys mirror ldaptor's equality matching (attribute name and value
    compared case-insensitively, as bytes).
    """

    def __init__(self, root, attributes=INDEXED_ATTRIBUTES):
        self.attributes = set(attributes)
        self.order = {}     # id(entry) -> position in tree order
        self.keys = {}      # (attribute, value) -> [entry, ...]
        entries = []
        root.subtree(callback=entries.append)  # synchronous for the in-memory tree
        for position, entry in enumerate(entries):
            self.order[id(entry)] = position
            for name in entry.keys():
                attribute = _as_bytes(name).lower()
                if attribute not in self.attributes:
                    continue
                for value in entry.get(name, ()):
                    self.keys.setdefault((attribute, _as_bytes(value).lower()), []).append(entry)

    def candidates(self, f):
        """Entries that may match filter ``f`` (tree order), or C{None}: scan all."""
        found = self._candidates(f)
        if found is None:
            return None
        return sorted(found.values(), key=lambda e: self.order[id(e)])

    def _candidates(self, f):
        if isinstance(f, pureldap.LDAPFilter_equalityMatch):
            attribute = _as_bytes(f.attributeDesc.value).lower()
            if attribute not in self.attributes:
                return None
            value = _as_bytes(f.assertionValue.value).lower()
            return {id(e): e for e in self.keys.get((attribute, value), ())}
        if isinstance(f, pureldap.LDAPFilter_or):
            union = {}
            for part in f:
                found = self._candidates(part)
                if found is None:
                    return None
                union.update(found)
            return union
        if isinstance(f, pureldap.LDAPFilter_and):
            best = None
            for part in f:
                found = self._candidates(part)
                if found is not None and (best is None or len(found) < len(best)):
                    best = found
            return best
        return None


def _in_scope(base, entry, scope):
    if scope == pureldap.LDAP_SCOPE_baseObject:
        return entry.dn == base.dn
    if scope == pureldap.LDAP_SCOPE_singleLevel:
        return entry.dn.up() == base.dn
    return base.dn.contains(entry.dn)


class _DirectoryFactory(protocol.ServerFactory):
    """Serves one in-memory tree; remembers its live connections."""

    def __init__(self, root, protocol_class):
        self.root = root
        self.index = _EqualityIndex(root)
        self.protocol = protocol_class
        self.connections = {}  # protocol -> Deferreds waiting for its end

    def connectionMade(self, proto):
        self.connections[proto] = []

    def connectionLost(self, proto):
        for d in self.connections.pop(proto, ()):
            d.callback(None)

    def closeAll(self):
        """Close every client connection; a Deferred firing once all are gone."""
        waiting = []
        for proto, waiters in list(self.connections.items()):
            d = defer.Deferred()
            waiters.append(d)
            waiting.append(d)
            proto.transport.loseConnection()
        return defer.gatherResults(waiting)


components.registerAdapter(lambda factory: factory.root, _DirectoryFactory,
                           ldaptor_interfaces.IConnectedLDAPEntry)


def load_ldif(path):
    """Load an LDIF file into an in-memory tree.

    @return: a Deferred firing with the root entry (the first entry of the
        file; every other entry must be below it, parents before children).
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        return defer.fail(e)
    # ldaptor's parser wants LF line ends and a blank line after the last entry.
    data = data.replace(b"\r\n", b"\n").rstrip(b"\n") + b"\n\n"
    parser = inmemory.InMemoryLDIFProtocol()
    try:
        parser.dataReceived(data)
        parser.connectionLost(protocol.connectionDone)
    except Exception as e:
        return defer.fail(e)
    return parser.completed


class EmbeddedLDAPServer(service.Service):
    """Serve an LDIF file read-only over LDAP on a loopback port.

    @ivar url: ``"ldap://127.0.0.1:PORT"`` once listening, else C{None}.
    @ivar port: the listening port once listening, else C{None}.
    """

    protocol = ReadOnlyLDAPServer

    def __init__(self, ldif_path, reactor=None, endpoint="tcp:0:interface=127.0.0.1"):
        if reactor is None:
            from twisted.internet import reactor
        self._reactor = reactor
        self.ldif_path = ldif_path
        self.endpoint = endpoint
        self.url = None
        self.port = None
        self.root = None
        self._factory = None
        self._ready_outcome = Outcome()
        self._starting = None

    def whenReady(self):
        """A Deferred firing with the URL once listening (fails if start-up failed).

        May be called before or after startService; every call gets its own
        Deferred.
        """
        return self._ready_outcome.wait()

    def startService(self):
        """Load the LDIF and listen.

        Returns a Deferred firing with the URL, or with C{None} when start-up
        failed (logged; L{whenReady} fails then).  It never fails, so a parent
        service may drop it.
        """
        service.Service.startService(self)
        self._ready_outcome.reset()
        self._starting = d = load_ldif(self.ldif_path)
        d.addCallback(self._listen)
        d.addCallbacks(self._ready, self._failed)
        return self.whenReady().addErrback(lambda _: None)

    def _listen(self, root):
        self.root = root
        self._factory = _DirectoryFactory(root, self.protocol)
        ep = endpoints.serverFromString(self._reactor, self.endpoint)
        return ep.listen(self._factory)

    def _ready(self, port):
        self._starting = None
        self.port = port
        host = port.getHost()
        self.url = f"ldap://{host.host}:{host.port}"
        log.info("embedded LDAP directory from {path} listening on {url}",
                 path=self.ldif_path, url=self.url)
        self._ready_outcome.settle(True, self.url)

    def _failed(self, failure):
        self._starting = None
        log.failure("embedded LDAP directory could not start from {path}",
                    failure, path=self.ldif_path)
        self._ready_outcome.settle(False, failure)

    def stopService(self):
        """Stop listening and close the connections of our clients."""
        service.Service.stopService(self)
        if self._starting is not None:
            self._starting.cancel()
        port, self.port = self.port, None
        self.url = None
        self._ready_outcome.reset()
        results = []
        if port is not None:
            results.append(defer.maybeDeferred(port.stopListening))
        if self._factory is not None:
            results.append(self._factory.closeAll())
        return defer.gatherResults(results).addCallback(lambda _: None)
