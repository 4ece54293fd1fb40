"""End-to-end: real mail clients (mbsync, fetchmail, curl) against the real process.

Each test starts its own appliance, delivers mail over SMTP and runs the Debian
client binaries as a user would, with their own configuration files in the test's
temporary folder. A test is skipped when its client is not installed.
"""

import datetime
import getpass
import hashlib
import imaplib
import os
import poplib
import re
import shutil
import smtplib
import stat
import subprocess
import textwrap
import time

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.trial import unittest

from tests.e2e.harness import ApplianceProcess
from tests.imap_helpers import client_context

HOSTNAME = "mx.example.test"          # server.hostname in the harness config
CLIENT_TIMEOUT = 60

MSG = ("From: Xavier <x@ext.test>\r\nTo: {to}\r\nSubject: clients {n}\r\n"
       "Date: Sat, 28 Nov 2026 10:00:00 +0000\r\nMessage-ID: <clients-{n}@ext.test>\r\n\r\n"
       "body number {n}\r\n.leading dot\r\n")


def require(binary):
    if not shutil.which(binary):
        raise unittest.SkipTest(f"{binary} is not installed (Debian package: "
                                f"{ {'mbsync': 'isync'}.get(binary, binary) })")


def crlf(data: bytes) -> bytes:
    """A stored message as IMAP/POP3 must send it: every line ending CRLF."""
    return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def subject_of(data: bytes) -> str:
    m = re.search(rb"^Subject: ([^\r\n]*)", data, re.M)
    return m.group(1).decode() if m else ""


def write_pinned_pair(directory, hostname=HOSTNAME):
    """A self-signed *leaf* (CA:FALSE) certificate and key for ``hostname``.

    isync 1.4 splits its CertificateFile: CA:TRUE certificates become trust
    anchors and the server is then checked against ``Host``; only CA:FALSE ones
    are pinned (trusted on an exact match, whatever the name). The appliance's
    generated certificate is CA:TRUE for mx.example.test, so mbsync connecting to
    127.0.0.1 stops with "Error, certificate owner does not match hostname
    127.0.0.1". The mbsync test therefore gives the appliance this pair in
    ``[tls]`` (which also runs the configured-certificate path end to end).
    """
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder()
            .subject_name(name).issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path = os.path.join(directory, "pinned-cert.pem")
    key_path = os.path.join(directory, "pinned-key.pem")
    with open(cert_path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    return cert_path, key_path


class ClientTestCase(unittest.TestCase):

    def start(self, extra="", before=None):
        self.workdir = os.path.abspath(self.mktemp())
        os.makedirs(self.workdir)
        if before:
            before(self.workdir)
        self.app = ApplianceProcess(self.workdir, extra=extra,
                                    listeners=("imap", "imaps", "pop3", "pop3s")).start()
        self.addCleanup(self.app.stop)
        # The clients get a private HOME so no ~/.curlrc, ~/.fetchmailrc, ~/.mbsyncrc
        # or ~/.netrc of whoever runs the tests takes part.
        self.home = os.path.join(self.workdir, "home")
        os.makedirs(self.home, mode=0o700)
        self.env = dict(os.environ, HOME=self.home, LC_ALL="C")
        return self.app

    @property
    def cert_path(self):
        return os.path.join(self.app.data_dir, "tls", "cert.pem")

    def deliver(self, user, *numbers):
        """One SMTP transaction per message, each waited for, so UIDs follow ``numbers``."""
        for n in numbers:
            before = len(self.app.messages(user))
            with smtplib.SMTP("127.0.0.1", self.app.smtp_port, timeout=10) as s:
                s.sendmail("x@ext.test", [f"{user}@example.test"],
                           MSG.format(n=n, to=f"{user}@example.test"))
            self.app.wait_for(lambda: len(self.app.messages(user)) == before + 1,
                              what=f"delivery of message {n} to {user}")

    def stored(self, user, subject):
        """The bytes a client must receive for the message with ``subject``."""
        found = [m for m in self.app.messages(user) if subject_of(m) == subject]
        self.assertEqual(len(found), 1, f"{subject!r} in {user}'s INBOX")
        return crlf(found[0])

    def run_client(self, argv, what, ok=(0,)):
        r = subprocess.run(argv, capture_output=True, timeout=CLIENT_TIMEOUT, env=self.env,
                           cwd=self.workdir)
        if r.returncode not in ok:
            self.fail(f"{what}: {argv[0]} exited with {r.returncode}\n--- stdout\n"
                      f"{r.stdout.decode(errors='replace')[-6000:]}\n--- stderr\n"
                      f"{r.stderr.decode(errors='replace')[-6000:]}\n--- server log\n"
                      f"{self.app.log()[-3000:]}")
        return r

    def imap(self, user="alice", password="alice-secret"):
        m = imaplib.IMAP4("127.0.0.1", self.app.ports["imap"], timeout=10)
        m.starttls(client_context())
        m.login(user, password)
        self.addCleanup(self._shutdown, m)
        return m

    @staticmethod
    def _shutdown(m):
        try:
            m.shutdown()
        except OSError:
            pass


class MbsyncTests(ClientTestCase):
    """isync's mbsync: a two-way sync of every folder between IMAP and a local Maildir."""

    def setUp(self):
        require("mbsync")
        version = subprocess.run(["mbsync", "--version"], capture_output=True, text=True,
                                 timeout=10).stdout
        m = re.search(r"(\d+)\.(\d+)", version)
        self.isync = (int(m.group(1)), int(m.group(2))) if m else (0, 0)
        if self.isync < (1, 4):
            raise unittest.SkipTest(f"mbsync {version.strip()}: the config below needs isync "
                                    "1.4 or newer (Far/Near, SubFolders)")
        self.start(extra='[tls]\ncertificate = "pinned-cert.pem"\nkey = "pinned-key.pem"\n',
                   before=write_pinned_pair)
        self.local = os.path.join(self.workdir, "local")
        os.makedirs(self.local)
        self.rc = os.path.join(self.workdir, "mbsyncrc")
        # isync 1.5 renamed SSLType to TLSType (1.4 refuses the new name).
        tls_keyword = "TLSType" if self.isync >= (1, 5) else "SSLType"
        with open(self.rc, "w") as f:
            f.write(textwrap.dedent(f"""\
                IMAPAccount appliance
                Host 127.0.0.1
                Port {self.app.ports["imap"]}
                User alice
                Pass alice-secret
                {tls_keyword} STARTTLS
                SystemCertificates no
                CertificateFile "{os.path.join(self.workdir, "pinned-cert.pem")}"
                Timeout 20

                IMAPStore appliance-far
                Account appliance

                MaildirStore appliance-near
                Path "{self.local}/"
                Inbox "{self.local}/INBOX"
                SubFolders Verbatim

                Channel appliance
                Far :appliance-far:
                Near :appliance-near:
                Patterns *
                Create Both
                Expunge Both
                Sync All
                SyncState *
                """))

    def mbsync(self, what):
        # -Dn: the IMAP exchange (without message bodies), for the failure message.
        r = self.run_client(["mbsync", "-Dn", "-a", "-c", self.rc], what)
        out = (r.stdout + r.stderr).decode(errors="replace")
        noise = [l for l in out.splitlines()
                 if re.match(r"(Warning|Error|Notice|Socket error|IMAP error)", l)]
        self.assertEqual(noise, [], f"{what}: mbsync complained\n{out[-6000:]}")
        return out

    # The local side, by Subject (mbsync's U= numbers are its own, not the server's).

    def local_box(self, folder):
        box = os.path.join(self.local, folder)
        out = []
        for sub in ("new", "cur"):
            for name in sorted(os.listdir(os.path.join(box, sub))):
                with open(os.path.join(box, sub, name), "rb") as f:
                    data = f.read()
                flags = name.rsplit(":2,", 1)[1] if ":2," in name else ""
                out.append((subject_of(data), flags))
        return sorted(out)

    def local_file(self, folder, subject):
        box = os.path.join(self.local, folder)
        for sub in ("new", "cur"):
            for name in os.listdir(os.path.join(box, sub)):
                with open(os.path.join(box, sub, name), "rb") as f:
                    if subject_of(f.read()) == subject:
                        return sub, name
        self.fail(f"{subject!r} not in local {folder}: {self.local_box(folder)}")

    def local_snapshot(self):
        snap = {}
        for root, dirs, files in os.walk(self.local):
            if os.path.basename(root) in ("new", "cur"):
                for name in files:
                    with open(os.path.join(root, name), "rb") as f:
                        snap[os.path.relpath(os.path.join(root, name), self.local)] = \
                            hashlib.sha256(f.read()).hexdigest()
        return snap

    # The server side, over IMAP.

    def server_boxes(self):
        """{folder: (UIDVALIDITY, UIDNEXT, [(uid, subject, flags)])} for every folder."""
        m = self.imap()
        typ, listing = m.list()
        self.assertEqual(typ, "OK")
        # \Noselect: a parent that only exists because of its children (Clients).
        folders = sorted(re.search(rb'"([^"]*)"$', l).group(1).decode() for l in listing
                         if b"\\Noselect" not in l.split(b")")[0])
        out = {}
        for folder in folders:
            typ, data = m.status(f'"{folder}"', "(UIDVALIDITY UIDNEXT MESSAGES)")
            self.assertEqual(typ, "OK", (folder, data))
            st = dict(re.findall(rb"(UIDVALIDITY|UIDNEXT|MESSAGES) (\d+)", data[0]))
            messages = []
            if int(st[b"MESSAGES"]):
                typ, data = m.select(f'"{folder}"', readonly=True)
                self.assertEqual(typ, "OK", (folder, data))
                typ, data = m.uid("FETCH", "1:*", "(FLAGS)")
                flags = {int(u): frozenset(f.split())
                         for u, f in (re.search(rb"UID (\d+) FLAGS \(([^)]*)\)", l).groups()
                                      for l in data)}
                typ, data = m.uid("FETCH", "1:*", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
                for item in data:
                    if isinstance(item, tuple):
                        uid = int(re.search(rb"UID (\d+)", item[0]).group(1))
                        messages.append((uid, subject_of(item[1]),
                                         frozenset(f.decode() for f in flags[uid])))
                m.close()
            out[folder] = (int(st[b"UIDVALIDITY"]), int(st[b"UIDNEXT"]), sorted(messages))
        m.logout()
        return out

    @staticmethod
    def by_subject(box):
        return sorted((subject, set(flags)) for uid, subject, flags in box[2])

    def test_two_way_sync_of_all_folders(self):
        self.deliver("alice", 1, 2, 3)
        m = self.imap()
        self.assertEqual(m.create("Projects")[0], "OK")
        self.assertEqual(m.create("Projects.Q1")[0], "OK")     # a child, "." on the server
        typ, data = m.append("Projects", None, imaplib.Time2Internaldate(time.time()),
                             b"From: alice@example.test\r\nSubject: project plan\r\n"
                             b"Message-ID: <plan@example.test>\r\n\r\nmilestones\r\n")
        self.assertEqual(typ, "OK", data)
        m.logout()

        # 1. Far to near: every folder is created locally with its messages.
        self.mbsync("first sync")
        self.assertEqual(self.local_box("INBOX"),
                         [("clients 1", ""), ("clients 2", ""), ("clients 3", "")])
        self.assertEqual(self.local_box("Projects"), [("project plan", "")])
        self.assertEqual(self.local_box("Projects/Q1"), [])          # "/" locally (Verbatim)
        for special in ("Sent", "Drafts", "Trash", "Junk", "Archive"):
            self.assertEqual(self.local_box(special), [], special)
        sub, name = self.local_file("INBOX", "clients 2")
        with open(os.path.join(self.local, "INBOX", sub, name), "rb") as f:
            # mbsync adds its X-TUID tracking header to the copies it stores.
            local_copy = re.sub(rb"^X-TUID: [^\n]*\n", b"", crlf(f.read()), flags=re.M)
        self.assertEqual(local_copy, self.stored("alice", "clients 2"))

        # 2. Changes on both sides. Near: a new message in Archive, a new folder
        # Clients/ACME with one, "clients 1" read, "clients 2" trashed (Expunge Both:
        # gone on both sides). Far: "clients 3" flagged.
        for n, (folder, subject) in enumerate((("Archive", "archived locally"),
                                               ("Clients/ACME", "acme contract"))):
            for sub in ("cur", "new", "tmp"):
                os.makedirs(os.path.join(self.local, folder, sub), exist_ok=True)
            name = f"{int(time.time())}.P{os.getpid()}Q{n}.testhost"
            with open(os.path.join(self.local, folder, "new", name), "wb") as f:
                f.write(b"From: alice@example.test\r\nSubject: %s\r\n"
                        b"Message-ID: <%d@example.test>\r\n\r\nkeep this one\r\n"
                        % (subject.encode(), n))
        for subject, flags in (("clients 1", "S"), ("clients 2", "T")):
            sub, name = self.local_file("INBOX", subject)
            os.rename(os.path.join(self.local, "INBOX", sub, name),
                      os.path.join(self.local, "INBOX", "cur",
                                   name.split(":2,")[0] + ":2," + flags))
        m = self.imap()
        m.select("INBOX")
        typ, data = m.uid("SEARCH", None, "SUBJECT", '"clients 3"')
        self.assertEqual(typ, "OK")
        self.assertEqual(m.uid("STORE", data[0].decode(), "+FLAGS", r"(\Flagged)")[0], "OK")
        m.logout()

        self.mbsync("second sync")
        server = self.server_boxes()
        self.assertEqual(self.by_subject(server["INBOX"]),
                         [("clients 1", {"\\Seen"}), ("clients 3", {"\\Flagged"})])
        self.assertEqual(self.by_subject(server["Archive"]), [("archived locally", set())])
        self.assertEqual(self.by_subject(server["Projects"]), [("project plan", set())])
        self.assertEqual(self.by_subject(server["Clients.ACME"]), [("acme contract", set())])
        self.assertEqual(server["Projects.Q1"][2], [])
        for special in ("Sent", "Drafts", "Trash", "Junk"):
            self.assertEqual(server[special][2], [], special)
        self.assertEqual(len(self.app.messages("alice")), 2)       # the INBOX Maildir itself
        self.assertEqual(self.local_box("INBOX"), [("clients 1", "S"), ("clients 3", "F")])
        self.assertEqual(self.local_box("Archive"), [("archived locally", "")])
        # mbsync took the message into its state (it now carries a U= number).
        self.assertIn(",U=", self.local_file("Archive", "archived locally")[1])

        # 3. Nothing changed: the third run changes nothing on either side.
        local_before = self.local_snapshot()
        out = self.mbsync("third sync")
        self.assertEqual(self.local_snapshot(), local_before)
        self.assertEqual(self.server_boxes(), server)
        writes = [l for l in out.splitlines()
                  if re.search(r">>> \d+ (UID )?(APPEND|STORE|EXPUNGE|COPY|MOVE|CREATE)", l)]
        self.assertEqual(writes, [], "an idempotent sync sent changes to the server")


class FetchmailTests(ClientTestCase):
    """fetchmail over POP3 (STLS and pop3s): drain the maildrop, then keep + UIDL."""

    def setUp(self):
        require("fetchmail")
        self.start()
        self.fmhome = os.path.join(self.workdir, "fetchmail")
        self.outdir = os.path.join(self.workdir, "delivered")
        os.makedirs(self.fmhome, mode=0o700)
        os.makedirs(self.outdir)
        self.idfile = os.path.join(self.fmhome, "fetchids")
        mda = os.path.join(self.workdir, "mda.sh")
        with open(mda, "w") as f:
            # One file per message, so the test can count and read them.
            f.write(f'#!/bin/sh\nf=$(mktemp -p "{self.outdir}" msg.XXXXXX) && exec cat > "$f"\n')
        os.chmod(mda, 0o755)
        self.mda = mda
        self.env["FETCHMAILHOME"] = self.fmhome

    def write_rc(self, implicit_tls=False, extra=""):
        """A 0600 rcfile; the certificate is checked for real against the server's own
        cert.pem (sslcommonname: we connect to 127.0.0.1, not to the name it carries)."""
        if implicit_tls:
            port, tls = self.app.ports["pop3s"], "ssl"
        else:
            # sslproto without "ssl": STLS on the plain port, and required.
            port, tls = self.app.ports["pop3"], "sslproto 'tls1.2+'"
        self.rc = os.path.join(self.workdir, "fetchmailrc")
        fd = os.open(self.rc, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(textwrap.dedent(f"""\
                poll 127.0.0.1 service {port} protocol pop3 auth password timeout 20
                  user "bob" there with password "bob-secret" is "{getpass.getuser()}" here
                  {tls} sslcertck sslcertfile "{self.cert_path}" sslcommonname "{HOSTNAME}"
                  mda "{self.mda}" {extra}
                """))
        self.assertEqual(stat.S_IMODE(os.stat(self.rc).st_mode), 0o600)

    def fetchmail(self, what, *options, stls=True):
        # Run as root, fetchmail keeps its lock in /var/run whatever FETCHMAILHOME
        # says: a private pidfile lets tests run side by side.
        r = self.run_client(["fetchmail", "-f", self.rc, "--nodetach", "--nosyslog", "-v",
                             "--pidfile", os.path.join(self.fmhome, "fetchmail.pid"),
                             "-i", self.idfile, *options], what)
        out = (r.stdout + r.stderr).decode(errors="replace")
        if stls:
            self.assertIn("POP3> STLS", out)
            self.assertIn("upgrade to TLS succeeded", out)
        return out

    def fetched(self):
        """Subjects of what the MDA received since the last call (and forget them)."""
        out = []
        for name in sorted(os.listdir(self.outdir)):
            path = os.path.join(self.outdir, name)
            with open(path, "rb") as f:
                data = f.read()
            self.assertRegex(data, rb"\n\.leading dot\r?\n")    # dot-unstuffed on the way
            out.append(subject_of(data))
            os.unlink(path)
        return sorted(out)

    def server_uidls(self):
        p = poplib.POP3("127.0.0.1", self.app.ports["pop3"], timeout=10)
        p.stls(context=client_context())
        p.user("bob")
        p.pass_("bob-secret")
        uidls = {l.split()[1].decode() for l in p.uidl()[1]}
        p.quit()
        return uidls

    def test_nokeep_then_keep_with_uidl(self):
        self.write_rc()
        self.deliver("bob", 1, 2, 3)
        self.fetchmail("drain with --nokeep", "--nokeep")
        self.assertEqual(self.fetched(), ["clients 1", "clients 2", "clients 3"])
        self.assertEqual(self.app.messages("bob"), [])

        self.deliver("bob", 4, 5)
        self.fetchmail("first --keep --uidl", "--keep", "--uidl")
        self.assertEqual(self.fetched(), ["clients 4", "clients 5"])
        self.assertEqual(len(self.app.messages("bob")), 2)

        self.deliver("bob", 6)
        out = self.fetchmail("second --keep --uidl", "--keep", "--uidl")
        self.assertIn("3 messages (2 seen)", out)
        self.assertEqual(self.fetched(), ["clients 6"])
        self.assertEqual(len(self.app.messages("bob")), 3)
        with open(self.idfile) as f:
            ids = {l.split()[-1] for l in f if l.strip()}
        self.assertEqual(ids, self.server_uidls())

    def test_implicit_tls_fetchall_retr(self):
        # "fetchall" makes fetchmail use RETR (the test above reads with TOP n 99999999).
        self.write_rc(implicit_tls=True, extra="fetchall")
        self.deliver("bob", 1, 2)
        out = self.fetchmail("pop3s with fetchall", "--nokeep", stls=False)
        self.assertIn("POP3> RETR 2", out)
        self.assertEqual(self.fetched(), ["clients 1", "clients 2"])
        self.assertEqual(self.app.messages("bob"), [])


class CurlTests(ClientTestCase):
    """curl's IMAP and POP3, with STARTTLS/STLS (-k) and implicit TLS (pinned CA)."""

    def setUp(self):
        require("curl")
        self.start()
        self.deliver("alice", 1, 2)
        self.deliver("bob", 1, 2)

    def curl(self, url, user, *options, verify=False):
        argv = ["curl", "-q", "-sS", "--user", user]
        if verify:
            # Implicit TLS with real verification: the URL names the certificate's
            # host, resolved to the test's loopback port.
            port = re.search(r":(\d+)/", url).group(1)
            argv += ["--cacert", self.cert_path, "--resolve", f"{HOSTNAME}:{port}:127.0.0.1"]
        else:
            argv += ["--ssl-reqd", "-k"]
        return self.run_client(argv + list(options) + [url], f"curl {url}").stdout

    def check_imap(self, base, verify):
        listing = self.curl(base + "/", "alice:alice-secret", verify=verify)
        names = re.findall(rb'^\* LIST \(([^)]*)\) "\." "([^"]*)"\r?$', listing, re.M)
        self.assertEqual(sorted(n for f, n in names),
                         [b"Archive", b"Drafts", b"INBOX", b"Junk", b"Sent", b"Trash"], listing)
        for attrs, name in names:
            if name != b"INBOX":
                self.assertIn(b"\\" + name, attrs.split())
        body = self.curl(base + "/INBOX;UID=1", "alice:alice-secret", verify=verify)
        self.assertEqual(body, self.stored("alice", "clients 1"))
        body = self.curl(base + "/INBOX;UID=2;SECTION=HEADER.FIELDS%20(SUBJECT)",
                         "alice:alice-secret", verify=verify)
        self.assertEqual(body, b"Subject: clients 2\r\n\r\n")

    def check_pop3(self, base, verify):
        listing = self.curl(base + "/", "bob:bob-secret", verify=verify)
        sizes = [len(self.stored("bob", f"clients {n}")) for n in (1, 2)]
        self.assertEqual(listing, b"1 %d\r\n2 %d\r\n" % tuple(sizes))
        for n in (1, 2):
            body = self.curl(f"{base}/{n}", "bob:bob-secret", verify=verify)
            self.assertEqual(body, self.stored("bob", f"clients {n}"))

    def test_imap_starttls(self):
        self.check_imap(f"imap://127.0.0.1:{self.app.ports['imap']}", verify=False)

    def test_imaps(self):
        self.check_imap(f"imaps://{HOSTNAME}:{self.app.ports['imaps']}", verify=True)

    def test_pop3_stls(self):
        self.check_pop3(f"pop3://127.0.0.1:{self.app.ports['pop3']}", verify=False)

    def test_pop3s(self):
        self.check_pop3(f"pop3s://{HOSTNAME}:{self.app.ports['pop3s']}", verify=True)
