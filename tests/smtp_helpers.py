"""Helpers for SMTP tests: a raw line client and an appliance started in-process."""

import os
import socket
import textwrap

from twisted.internet import defer, reactor, threads

from mailbox_appliance import config as config_module
from mailbox_appliance.appliance import Appliance
from tests.e2e.harness import ANTISPAM_OFF
from tests.fakes import FakeDirectory


class RawClient:
    """A blocking SMTP client that sends exact bytes (no line-end repair)."""

    def __init__(self, port, host="127.0.0.1", timeout=10):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def send(self, data: bytes):
        self.sock.sendall(data)

    def line(self, decode=True):
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError(self.buf)
            self.buf += chunk
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line.decode("ascii", "replace") if decode else line

    def reply(self):
        """One whole reply: (code, [lines])."""
        lines = []
        while True:
            l = self.line()
            lines.append(l[4:])
            if l[3:4] != "-":
                return int(l[:3]), lines

    def code(self):
        return self.reply()[0]

    def cmd(self, text):
        self.send(text.encode() + b"\r\n")
        return self.reply()

    def closed(self, wait=5):
        """True if the server closed the connection (after any pending data)."""
        self.sock.settimeout(wait)
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return True
                self.buf += chunk
        except socket.timeout:
            return False
        except ConnectionResetError:
            return True

    def close(self):
        self.sock.close()


def _quiet_port():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(tmpdir, extra="", domains=("example.test",), lmtp=False, listeners=()):
    os.makedirs(tmpdir, exist_ok=True)
    ldif = os.path.join(tmpdir, "directory.ldif")
    with open(ldif, "w") as f:
        f.write("dn: dc=example,dc=test\nobjectClass: dcObject\ndc: example\n")
    path = os.path.join(tmpdir, "mailappliance.toml")
    doms = ", ".join(f'"{d}"' for d in domains)
    with open(path, "w") as f:
        f.write(textwrap.dedent(f"""\
            [server]
            hostname = "mx.example.test"
            domains = [{doms}]
            data_dir = "var"
            max_message_size = 100000
            [listen]
            smtp = "tcp:0:interface=127.0.0.1"
            {'lmtp = "tcp:0:interface=127.0.0.1"' if lmtp else ''}
            {chr(10).join(f'{n} = "tcp:0:interface=127.0.0.1"' for n in listeners)}
            [directory]
            ldif = "directory.ldif"
            [dns]
            # Nobody answers here: remote mail waits in the queue.
            servers = ["127.0.0.1:{_quiet_port()}"]
            timeout = 2
            [delivery]
            retry_schedule = ["1h"]
            """) + (extra if "[antispam" in extra else extra + ANTISPAM_OFF))
    return path


class ApplianceMixin:
    """Starts an Appliance with a FakeDirectory on a random loopback port."""

    config_extra = ""

    @defer.inlineCallbacks
    def start_appliance(self, extra=None, lmtp=False, listeners=()):
        self.tmp = os.path.abspath(self.mktemp())
        self.config = config_module.load(write_config(self.tmp, self.config_extra
                                                      if extra is None else extra, lmtp=lmtp,
                                                      listeners=listeners))
        self.directory = FakeDirectory()
        self.alice = self.directory.add_user("alice", "alice@example.test", "a.l@example.test")
        self.bob = self.directory.add_user("bob", "bob@example.test")
        self.directory.add_user("carol", "carol@example.test", routing="carol@elsewhere.test")
        self.directory.users["postmaster@example.test"] = self.alice
        self.directory.aliases["staff@example.test"] = ["alice@example.test", "bob@example.test"]
        self.app = Appliance(self.config, reactor, directory=self.directory)
        self.app.startService()
        self.addCleanup(self.app.stopService)
        port = yield self.app.listening_port("smtp")
        self.port = port.getHost().port
        if lmtp:
            port = yield self.app.listening_port("lmtp")
            self.lmtp_port = port.getHost().port
        self.ports = {}
        for name in listeners:
            port = yield self.app.listening_port(name)
            self.ports[name] = port.getHost().port

    def in_thread(self, f, *a):
        return threads.deferToThread(f, *a)

    def maildir(self, local, domain="example.test"):
        return os.path.join(self.config.server.data_dir, "mail", domain, local, "Maildir")

    def delivered(self, local):
        new = os.path.join(self.maildir(local), "new")
        if not os.path.isdir(new):
            return []
        out = []
        for n in sorted(os.listdir(new)):
            with open(os.path.join(new, n), "rb") as f:
                out.append(f.read())
        return out

    def queue_files(self):
        active = os.path.join(self.config.server.data_dir, "queue", "active")
        # (The .status records are informational and left out here.)
        return sorted(n for n in os.listdir(active) if not n.endswith(".status"))

    @defer.inlineCallbacks
    def settle(self):
        """Wait until the queue manager has nothing in flight."""
        yield self.app.queue.when_idle()
        d = defer.Deferred()
        reactor.callLater(0.05, d.callback, None)
        yield d
        yield self.app.queue.when_idle()
