"""End to end: a bad configuration stops the real process with ONE clear line.

For each bad case both ``twistd -n mailappliance --config PATH`` and
``mailappliance check-config PATH`` must exit non-zero with exactly one
non-empty line on stderr naming the file, the key and what is expected, and no
traceback anywhere.
"""

import os
import shutil
import socket
import subprocess
import textwrap
from concurrent.futures import ThreadPoolExecutor

from twisted.trial import unittest

from tests.e2e.harness import FIXTURES, TWISTD, child_env, run_cli, run_twistd

GOOD = """\
    [server]
    hostname = "mx.example.test"
    domains = ["example.test"]
    data_dir = "var"
    [listen]
    smtp = "tcp:0:interface=127.0.0.1"
    [directory]
    ldif = "directory.ldif"
    """


class _Case:

    def setUp(self):
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        shutil.copy(os.path.join(FIXTURES, "directory.ldif"),
                    os.path.join(self.dir, "directory.ldif"))
        self.path = os.path.join(self.dir, "mailappliance.toml")

    def write(self, text, name="mailappliance.toml", mode="w"):
        path = os.path.join(self.dir, name)
        with open(path, mode) as f:
            f.write(textwrap.dedent(text) if isinstance(text, str) else text)
        return path

    def assertOneLine(self, result, *fragments):
        """Non-zero exit, one non-empty stderr line holding every fragment, no traceback."""
        what = f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
        self.assertNotEqual(result.returncode, 0, what)
        self.assertNotIn("Traceback", result.stdout + result.stderr, what)
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        self.assertEqual(len(lines), 1, what)
        for fragment in fragments:
            self.assertIn(fragment, lines[0], what)
        return lines[0]

    def both(self, *fragments, path=None):
        """Run twistd and check-config side by side on the config; same verdict."""
        path = path or self.path
        with ThreadPoolExecutor(2) as pool:
            started = pool.submit(run_twistd, path)
            checked = pool.submit(run_cli, "check-config", path)
            started, checked = started.result(), checked.result()
        a = self.assertOneLine(started, path, *fragments)
        b = self.assertOneLine(checked, path, *fragments)
        # The same message, whichever way it was found.
        self.assertEqual(a.split(path, 1)[1], b.split(path, 1)[1])
        # Nothing was started: no data_dir made.
        self.assertFalse(os.path.exists(os.path.join(self.dir, "var")))
        return a


class BadConfigTests(_Case, unittest.TestCase):

    def test_missing_file(self):
        self.both("configuration file not found", path=os.path.join(self.dir, "nope.toml"))

    def test_toml_syntax_error(self):
        self.write(GOOD + '[delivery]\nwarn_after = "4h\n')
        self.both("TOML syntax error", "line")

    def test_not_utf8(self):
        self.write(textwrap.dedent(GOOD).encode() + b'[delivery]\nsmarthost = "\xff"\n',
                   mode="wb")
        self.both("expected a UTF-8 TOML file")

    def test_unknown_section(self):
        self.write(GOOD + "[sever]\nhostname = 'x'\n")
        self.both("unknown section [sever]", "expected one of")

    def test_unknown_key(self):
        self.write(GOOD.replace("data_dir", "datadir"))
        self.both("unknown key 'datadir'", "[server]", "expected one of")

    def test_wrong_type(self):
        self.write(GOOD.replace('data_dir = "var"',
                                'data_dir = "var"\n    max_message_size = "big"'))
        self.both("[server] max_message_size", "expected an integer", "'big'")

    def test_list_of_non_strings(self):
        self.write(GOOD.replace('["example.test"]', '["example.test", 42]'))
        self.both("[server] domains", "expected a list of strings", "42")

    def test_bad_endpoint_string(self):
        self.write(GOOD.replace("tcp:0:interface=127.0.0.1", "tcpp:25"))
        self.both("[listen] smtp", "expected a Twisted endpoint string", "'tcpp:25'")

    def test_missing_ldif(self):
        os.remove(os.path.join(self.dir, "directory.ldif"))
        self.write(GOOD)
        self.both("[directory] ldif", "cannot read", os.path.join(self.dir, "directory.ldif"))

    def test_ldif_that_does_not_parse(self):
        self.write("dn: dc=example,dc=test\nobjectClass: dcObject\n\nthis is not LDIF\n",
                   "directory.ldif")
        self.write(GOOD)
        self.both("[directory] ldif", "expected an LDIF file", "does not load")

    def test_certificate_that_does_not_load(self):
        self.write("-----BEGIN CERTIFICATE-----\nnonsense\n-----END CERTIFICATE-----\n",
                   "cert.pem")
        self.write("not a key\n", "key.pem")
        self.write(GOOD + '[tls]\ncertificate = "cert.pem"\nkey = "key.pem"\n')
        self.both("[tls] certificate/key", "expected a matching PEM pair")

    def test_certificate_without_key(self):
        self.write(GOOD + '[tls]\ncertificate = "cert.pem"\n')
        self.both("[tls] certificate and key", "expected both or neither")

    def test_bad_relay_network(self):
        self.write(GOOD.replace('data_dir = "var"',
                                'data_dir = "var"\n    relay_networks = ["10.0.0.0/40"]'))
        self.both("[server] relay_networks", "expected CIDR networks", "10.0.0.0/40")

    def test_bad_duration(self):
        self.write(GOOD + '[delivery]\nmax_age = "five days"\n')
        self.both("[delivery] max_age", "expected a duration")

    def test_too_few_recipients(self):
        self.write(GOOD + '[smtp]\nmax_recipients = 10\n')
        self.both("[smtp] max_recipients", "expected at least 100")

    def test_data_dir_below_a_file(self):
        self.write(GOOD.replace('data_dir = "var"', 'data_dir = "directory.ldif/var"'))
        self.both("[server] data_dir", "expected a folder")


class StartUpTests(_Case, unittest.TestCase):
    """Problems only start-up can see, the help, and a good configuration."""

    def test_good_config_checks_ok(self):
        self.write(GOOD)
        result = run_cli("check-config", self.path)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.stdout.strip(), f"{self.path}: configuration ok")
        self.assertEqual(result.stderr, "")
        result = run_cli("--config", self.path, "check-config")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("configuration ok", result.stdout)
        self.assertFalse(os.path.exists(os.path.join(self.dir, "var")))

    def test_port_in_use(self):
        holder = socket.socket()
        self.addCleanup(holder.close)
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        self.write(GOOD.replace("tcp:0:", f"tcp:{port}:"))
        result = run_twistd(self.path)
        self.assertOneLine(result, self.path, "[listen] smtp", f"tcp:{port}:",
                           "Address already in use")

    def test_unix_socket_in_missing_folder(self):
        self.write(GOOD.replace("tcp:0:interface=127.0.0.1",
                                f"unix:{self.dir}/no/such/folder/smtp.sock"))
        result = run_twistd(self.path)
        self.assertOneLine(result, self.path, "[listen] smtp", "cannot listen")

    def test_help_documents_options(self):
        result = subprocess.run(TWISTD + ["mailappliance", "--help"], capture_output=True,
                                text=True, timeout=30, env=child_env(), cwd=self.dir)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("--config", result.stdout)
        self.assertIn("MAILAPPLIANCE_CONFIG", result.stdout)
        self.assertIn("check-config", result.stdout)
