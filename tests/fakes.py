"""Test doubles for the seams: an in-memory directory with scriptable failures."""

from twisted.internet import defer
from zope.interface import implementer

from mailbox_appliance.directory.model import Expansion, Resolution, User
from mailbox_appliance.interfaces import DirectoryUnavailable, IDirectory


@implementer(IDirectory)
class FakeDirectory:
    """Users and aliases in dicts; ``down`` makes every call a temporary failure."""

    def __init__(self, domains=("example.test",)):
        self.domains = {d.lower() for d in domains}
        self.users = {}
        self.aliases = {}
        self.down = False
        self.delay = None          # a Deferred to wait on before answering
        self.queries = []
        self.passwords = {}

    def add_user(self, uid, mail, *extra, routing="", password="secret"):
        user = User(dn=f"uid={uid},ou=people,dc=example,dc=test", uid=uid, mail=mail,
                    addresses=tuple(extra), routing_address=routing)
        self.passwords[uid] = (user, password)
        for a in (mail,) + tuple(extra):
            self.users[a.lower()] = user
        return user

    def _norm(self, address):
        local, _, domain = address.rpartition("@")
        return f"{local}@{domain.lower()}".lower()

    @defer.inlineCallbacks
    def lookup(self, address):
        self.queries.append(address)
        if self.delay is not None:
            yield self.delay
        if self.down:
            raise DirectoryUnavailable("directory is down")
        a = self._norm(address)
        if a in self.users:
            return Resolution(Resolution.USER, user=self.users[a])
        if a in self.aliases:
            return Resolution(Resolution.ALIAS, members=tuple(self.aliases[a]))
        return Resolution(Resolution.UNKNOWN)

    @defer.inlineCallbacks
    def expand(self, address, _depth=0, _seen=None):
        r = yield self.lookup(address)
        if r.kind == Resolution.USER:
            if r.user.routing_address:
                return Expansion(remote=(r.user.routing_address,))
            return Expansion(local=(r.user,))
        if r.kind == Resolution.ALIAS:
            local, remote = [], []
            for m in r.members:
                if m.rpartition("@")[2].lower() in self.domains:
                    sub = yield self.expand(m)
                    local += [u for u in sub.local if u not in local]
                    remote += list(sub.remote)
                else:
                    remote.append(m)
            return Expansion(local=tuple(local), remote=tuple(remote))
        return Expansion()

    def authenticate(self, login, password):
        if self.down:
            return defer.fail(DirectoryUnavailable("directory is down"))
        key = login.lower()
        for uid, (user, secret) in self.passwords.items():
            if key in (uid, user.mail.lower()) and password and password == secret:
                return defer.succeed(user)
        return defer.succeed(None)
