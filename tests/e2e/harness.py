"""Runs the real ``twistd -n mailappliance`` process for end-to-end tests.

Each test gets its own temporary config, data_dir and free loopback ports, so
e2e tests can run side by side.
"""

import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
TWISTD = [sys.executable, "-c",
          "import sys; sys.argv[0] = 'twistd'; from twisted.scripts.twistd import run; run()"]


# The door checks stay out of tests that are not about them: no greylisting,
# no SPF or sender-domain lookups, no connection limits worth the name.
DOOR_CHECKS_OFF = """
[antispam.connection]
max_connections_per_ip = 100000
max_connection_rate = 1000000
max_message_rate = 1000000
bad_rcpt_throttle = 100000
bad_rcpt_limit = 100000
[antispam.helo]
reject_invalid = false
reject_our_name = false
[antispam.dns]
check_sender_mx = false
[antispam.spf]
enabled = false
[antispam.greylist]
enabled = false
"""
# ... and the content filters too.
ANTISPAM_OFF = DOOR_CHECKS_OFF + """[antispam.content]
enabled = false
[antispam.dkim]
sign = false
"""


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env():
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def greets(address, port):
    """True when an SMTP server answers 220 there (then leaves politely)."""
    with socket.create_connection((address, port), timeout=2) as s:
        s.settimeout(5)
        if s.recv(100).startswith(b"220"):
            s.sendall(b"QUIT\r\n")
            return True
    return False


def run_twistd(config_path, timeout=30):
    """Run twistd once in the foreground (for configurations that must fail)."""
    return subprocess.run(TWISTD + ["-n", "--pidfile=", "mailappliance", "--config", config_path],
                          capture_output=True, text=True, timeout=timeout, env=child_env(),
                          cwd=os.path.dirname(config_path))


def run_cli(*args, timeout=30):
    return subprocess.run([sys.executable, "-m", "mailbox_appliance.cli", *args],
                          capture_output=True, text=True, timeout=timeout, env=child_env(),
                          cwd=ROOT)


class ApplianceProcess:
    """One appliance process with its own folder, config and ports."""

    def __init__(self, workdir, domains=("example.test",), extra="", ldif=None,
                 directory_url="", directory_extra="", listeners=(), smtp_interface="127.0.0.1",
                 smtp_port=None, dns_server=None, hostname="mx.example.test",
                 base_dn="dc=example,dc=test", server_extra=""):
        self.workdir = os.path.abspath(workdir)
        os.makedirs(self.workdir, exist_ok=True)
        self.smtp_interface = smtp_interface
        self.smtp_port = smtp_port or free_port()
        # More listeners by name (lmtp, pop3, imap, ...), each on a free port.
        self.ports = {name: free_port() for name in listeners}
        self.data_dir = os.path.join(self.workdir, "var")
        self.log_path = os.path.join(self.workdir, "twistd.log")
        ldif_name = "directory.ldif"
        shutil.copy(ldif or os.path.join(FIXTURES, "directory.ldif"),
                    os.path.join(self.workdir, ldif_name))
        doms = ", ".join(f'"{d}"' for d in domains)
        directory = (f'url = "{directory_url}"\n' if directory_url
                     else f'ldif = "{ldif_name}"\n') + directory_extra
        self.config_path = os.path.join(self.workdir, "mailappliance.toml")
        if "[antispam" not in extra:
            extra = extra + ANTISPAM_OFF
        if "[dns]" not in extra:
            # No test reaches the outside: a resolver where nobody answers
            # makes remote mail wait in the queue (a temporary failure)
            # instead of asking the machine's DNS.
            extra = extra + (f'\n[dns]\nservers = ["{dns_server or f"127.0.0.1:{free_port()}"}"]\n'
                             'timeout = 2\n')
        listen_lines = "\n".join(f'{name} = "tcp:{port}:interface=127.0.0.1"'
                                 for name, port in self.ports.items())
        with open(self.config_path, "w") as f:
            f.write(textwrap.dedent(f"""\
                [server]
                hostname = "{hostname}"
                domains = [{doms}]
                data_dir = "var"
                {server_extra}
                [listen]
                smtp = "tcp:{self.smtp_port}:interface={smtp_interface}"
                {listen_lines}
                [directory]
                base_dn = "{base_dn}"
                cache_ttl = 5
                """) + directory + extra)
        self.proc = None

    def start(self, wait=30):
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            TWISTD + ["-n", "--pidfile=", "--logfile=-", "mailappliance",
                      "--config", self.config_path],
            stdout=self._log, stderr=subprocess.STDOUT, env=child_env(), cwd=self.workdir)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"appliance exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if greets(self.smtp_interface, self.smtp_port):
                    return self
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("appliance did not start:\n" + self.log())

    def stop(self, sig=signal.SIGTERM, wait=20):
        if self.proc is None or self.proc.poll() is not None:
            return
        proc, log = self.proc, self._log
        proc.send_signal(sig)
        try:
            proc.wait(wait)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        # The log this process was started with, not whatever a restart
        # from another thread has opened since.
        log.close()

    def kill(self):
        self.stop(signal.SIGKILL)

    def log(self):
        try:
            with open(self.log_path, "r", errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def maildir(self, local, domain="example.test"):
        return os.path.join(self.data_dir, "mail", domain, local, "Maildir")

    def messages(self, local, domain="example.test"):
        """Contents of every message in the user's new/ and cur/."""
        out = []
        for sub in ("new", "cur"):
            d = os.path.join(self.maildir(local, domain), sub)
            if os.path.isdir(d):
                for n in sorted(os.listdir(d)):
                    with open(os.path.join(d, n), "rb") as f:
                        out.append(f.read())
        return out

    def queue_ids(self):
        d = os.path.join(self.data_dir, "queue", "active")
        if not os.path.isdir(d):
            return []
        return sorted(n for n in os.listdir(d) if "." not in n)

    def wait_for(self, predicate, timeout=20, what="condition"):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}\n{self.log()[-3000:]}")


def wait_until(predicate, timeout=20, what="condition", log=None, interval=0.05):
    """``ApplianceProcess.wait_for`` for tests that run servers in the test's
    own reactor (a fake DNS, a sink): a Deferred polled on the reactor,
    which keeps answering meanwhile. ``log`` (a callable) adds the
    appliance's log to the failure."""
    from twisted.internet import reactor, task

    deadline = time.monotonic() + timeout

    def check():
        if predicate():
            return None
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out waiting for {what}"
                                 + (f"\n{log()[-3000:]}" if log else ""))
        return task.deferLater(reactor, interval, check)
    return task.deferLater(reactor, 0, check)


SMTP_SINK = "/usr/sbin/smtp-sink"


class PostfixSink:
    """Postfix's ``smtp-sink`` on one address and port, each message dumped
    to a file (``-d``) that :meth:`messages` reads back.

    ``options`` are smtp-sink's own, e.g. ``("-N",)`` (no DSN) or
    ``("-r", "RCPT")`` (4xx to every RCPT).
    """

    def __init__(self, address, port, *options):
        import tempfile
        self.address, self.port, self.options = address, port, options
        # smtp-sink drops root privileges (-u): its dump folder must be
        # reachable and writable for that user, wherever the tests run.
        self.dump_dir = tempfile.mkdtemp(prefix="smtp-sink-")
        os.chmod(self.dump_dir, 0o777)
        self.proc = None

    @staticmethod
    def available():
        return os.access(SMTP_SINK, os.X_OK)

    def start(self, wait=10):
        user = ["-u", "nobody"] if os.geteuid() == 0 else []
        self.proc = subprocess.Popen(
            [SMTP_SINK, *user, *self.options, "-d", os.path.join(self.dump_dir, "msg."),
             f"{self.address}:{self.port}", "100"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("smtp-sink exited: " + self.proc.stderr.read().decode())
            try:
                if greets(self.address, self.port):
                    return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("smtp-sink did not start")

    def restart(self, *options):
        """Stop, then listen again with exactly ``options``."""
        self.stop()
        self.options = options
        return self.start()

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        if self.proc is not None:
            self.proc.stderr.close()
        self.proc = None

    def messages(self):
        """Each dumped transaction: smtp-sink's X-* lines, its Received:, the message."""
        out = []
        for name in sorted(os.listdir(self.dump_dir)):
            with open(os.path.join(self.dump_dir, name), "rb") as f:
                out.append(f.read())
        return out

    def cleanup(self):
        self.stop()
        shutil.rmtree(self.dump_dir, ignore_errors=True)
