"""End-to-end: LDAPDirectory against a real OpenLDAP slapd.

Each test starts its own ``/usr/sbin/slapd`` on a free loopback port,
from a temporary ``slapd.conf`` (schemas core, cosine, inetorgperson, misc,
nis; one mdb database for ``dc=example,dc=test``) with the fixture LDIF
loaded by ``slapadd``, and kills it at the end.  Skipped when slapd is not
installed.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time

from twisted.internet import defer, reactor
from twisted.trial import unittest

from mailbox_appliance.directory.ldap import LDAPDirectory
from mailbox_appliance.directory.model import Resolution
from mailbox_appliance.interfaces import DirectoryUnavailable

from tests.ldap_helpers import BASE_DN, DOMAINS, FIXTURE, DirectoryChecks

SLAPD = "/usr/sbin/slapd"
SLAPADD = "/usr/sbin/slapadd"
SCHEMA_DIR = "/etc/ldap/schema"
MODULE_DIRS = ("/usr/lib/ldap", "/usr/lib64/openldap", "/usr/lib/openldap")
ROOT_DN = "cn=admin,dc=example,dc=test"
ROOT_PW = "root-secret"

CONFIG = """\
include {schemas}/core.schema
include {schemas}/cosine.schema
include {schemas}/inetorgperson.schema
include {schemas}/nis.schema
include {schemas}/misc.schema
pidfile {dir}/slapd.pid
argsfile {dir}/slapd.args
{modules}
database mdb
maxsize 16777216
suffix "{base}"
rootdn "{rootdn}"
rootpw {rootpw}
directory {dir}/data
access to attrs=userPassword
    by anonymous auth
    by * none
access to *
    by * read
"""


def _missing():
    for path in (SLAPD, SLAPADD, os.path.join(SCHEMA_DIR, "misc.schema")):
        if not os.path.exists(path):
            return f"{path} is missing (install the slapd package to run this test)"
    return None


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Slapd:
    """A throw-away slapd serving the fixture."""

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="slapd-test-")
        os.mkdir(os.path.join(self.dir, "data"))
        modules = ""
        for d in MODULE_DIRS:
            if os.path.exists(os.path.join(d, "back_mdb.so")):
                modules = f"modulepath {d}\nmoduleload back_mdb"
                break
        self.conf = os.path.join(self.dir, "slapd.conf")
        with open(self.conf, "w") as f:
            f.write(CONFIG.format(schemas=SCHEMA_DIR, dir=self.dir, modules=modules,
                                  base=BASE_DN, rootdn=ROOT_DN, rootpw=ROOT_PW))
        subprocess.run([SLAPADD, "-f", self.conf, "-l", FIXTURE], check=True,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=30)
        self.port = _free_port()
        self.process = None

    @property
    def url(self):
        return f"ldap://127.0.0.1:{self.port}"

    def start(self):
        """Run slapd in the foreground and wait until it accepts connections."""
        self.process = subprocess.Popen(
            [SLAPD, "-f", self.conf, "-h", f"{self.url}/", "-d", "0"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                out = self.process.stdout.read().decode(errors="replace")
                raise RuntimeError(f"slapd exited with {self.process.returncode}: {out}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError("slapd did not start listening within 15 s")

    def stop(self):
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)
        if self.process is not None:
            self.process.stdout.close()
        self.process = None

    def remove(self):
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class SlapdCase(unittest.TestCase):
    """Starts a fresh slapd for every test, killed when the test ends."""

    skip = _missing()

    def setUp(self):
        self.slapd = Slapd()
        self.addCleanup(self.slapd.remove)
        self.slapd.start()
        super().setUp()

    def make_directory(self, **kwargs):
        kwargs.setdefault("timeout", 5)
        d = LDAPDirectory(reactor, self.slapd.url, BASE_DN, DOMAINS, **kwargs)
        self.addCleanup(d.close)
        return d


class SlapdDirectoryTests(DirectoryChecks, SlapdCase):
    """The same checks as against the embedded server."""

    @defer.inlineCallbacks
    def test_bound_search_connection(self):
        d = self.make_directory(bind_dn=ROOT_DN, bind_password=ROOT_PW)
        r = yield d.lookup("alice@example.test")
        self.assertEqual(r.user.uid, "alice")
        u = yield d.authenticate("bob", "bob-secret")
        self.assertEqual(u.uid, "bob")
        wrong = self.make_directory(bind_dn=ROOT_DN, bind_password="wrong")
        yield self.assertFailure(wrong.lookup("alice@example.test"), DirectoryUnavailable)

    @defer.inlineCallbacks
    def test_wrong_base_is_unknown(self):
        d = LDAPDirectory(reactor, self.slapd.url, "ou=nowhere,dc=example,dc=test", DOMAINS,
                          timeout=5)
        self.addCleanup(d.close)
        r = yield d.lookup("alice@example.test")
        self.assertEqual(r.kind, Resolution.UNKNOWN)


class SlapdOutageTests(SlapdCase):
    """slapd going away and coming back."""

    @defer.inlineCallbacks
    def test_down_then_back(self):
        d = self.make_directory()
        self.assertTrue((yield d.lookup("alice@example.test")).known)
        self.slapd.stop()
        yield self.assertFailure(d.lookup("alice@example.test"), DirectoryUnavailable)
        yield self.assertFailure(d.expand("staff@example.test"), DirectoryUnavailable)
        yield self.assertFailure(d.authenticate("alice", "alice-secret"), DirectoryUnavailable)
        self.slapd.start()
        self.assertTrue((yield d.lookup("alice@example.test")).known)
        self.assertEqual((yield d.authenticate("alice", "alice-secret")).uid, "alice")
