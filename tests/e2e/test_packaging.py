"""The installed package works without the checkout: console script and twistd plugin.

Runs only when the tests run from a virtualenv that has the appliance installed
(``pip install .``, as scripts/setup.sh does); it starts the installed commands
from a folder outside the checkout, with no PYTHONPATH.
"""

import os
import shutil
import subprocess
import sys

from twisted.trial import unittest

from tests.e2e.harness import FIXTURES

BIN = os.path.dirname(sys.executable)


def clean_env():
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    return env


class InstalledTests(unittest.TestCase):

    def setUp(self):
        if not os.path.exists(os.path.join(BIN, "mailappliance")):
            raise unittest.SkipTest("the package is not installed in this interpreter's prefix")
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        shutil.copy(os.path.join(FIXTURES, "directory.ldif"), self.dir)
        self.config = os.path.join(self.dir, "mailappliance.toml")
        with open(self.config, "w") as f:
            f.write('[server]\ndata_dir = "var"\n[listen]\nsmtp = "tcp:0:interface=127.0.0.1"\n'
                    '[directory]\nldif = "directory.ldif"\n')

    def run_installed(self, *argv):
        return subprocess.run(list(argv), capture_output=True, text=True, timeout=60,
                              cwd=self.dir, env=clean_env())

    def test_console_script(self):
        r = self.run_installed(os.path.join(BIN, "mailappliance"), "check-config", self.config)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("configuration ok", r.stdout)
        # The installed copy is used, not the checkout.
        r = self.run_installed(sys.executable, "-c",
                               "import mailbox_appliance, os; print(mailbox_appliance.__file__)")
        self.assertIn("site-packages", r.stdout)

    def test_data_files_installed(self):
        # The built-in rules and the standard list scenarios come with the package.
        r = self.run_installed(sys.executable, "-c",
                               "from mailbox_appliance.antispam import rules; "
                               "print(len(rules.load_rules()))")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertGreater(int(r.stdout), 50)
        r = self.run_installed(os.path.join(BIN, "mailappliance"), "--config", self.config,
                               "list", "create", "team@example.test", "--owner",
                               "o@example.test", "--scenario", "send=private")
        self.assertEqual(r.returncode, 0, r.stderr)

    def test_twistd_plugin(self):
        r = self.run_installed(os.path.join(BIN, "twistd"), "--help")
        self.assertIn("mailappliance", r.stdout)
        r = self.run_installed(os.path.join(BIN, "twistd"), "mailappliance", "--help")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("--config", r.stdout)
