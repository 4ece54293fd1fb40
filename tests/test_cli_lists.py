"""``mailappliance list``: the administrator's list commands on a temporary data_dir."""

import io
import json
import os
import shutil
import tempfile

from twisted.trial import unittest

from mailbox_appliance import cli, cli_lists, state

LIST = "team@lists.example.test"


class ListCLITests(unittest.TestCase):

    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="list-cli-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        shutil.copy(os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures",
                                 "directory.ldif"), self.dir)
        self.config = os.path.join(self.dir, "mailappliance.toml")
        with open(self.config, "w") as f:
            f.write('[server]\nhostname = "mx.example.test"\n'
                    'domains = ["example.test", "lists.example.test"]\n'
                    'data_dir = "var"\n[listen]\nsmtp = "tcp:0:interface=127.0.0.1"\n'
                    '[directory]\nldif = "directory.ldif"\n'
                    '[lists]\ndomains = ["lists.example.test"]\n')
        self.path = os.path.join(self.dir, "var", state.FILENAME)

    def run_cli(self, *argv):
        out, err = io.StringIO(), io.StringIO()
        code = cli.main(["--config", self.config, "list", *argv], out=out, err=err)
        return code, out.getvalue(), err.getvalue()

    def create(self, *extra):
        code, out, err = self.run_cli("create", LIST, "--owner", "own@example.test", *extra)
        self.assertEqual(code, 0, err)
        return out

    def test_nothing_yet_creates_nothing(self):
        self.assertEqual(self.run_cli(), (0, "no lists\n", ""))
        self.assertEqual(self.run_cli("list", "--json"), (0, "[]\n", ""))
        self.assertFalse(os.path.exists(self.path))
        code, _, err = self.run_cli("show", LIST)
        self.assertEqual((code, err), (1, f"mailappliance: no such list: {LIST}\n"))

    def test_create_show_add_del_delete(self):
        self.assertEqual(self.create("--moderator", "mod@example.test", "--subject", "Our team"),
                         f"{LIST}: created\n")
        self.assertEqual(self.run_cli("add", LIST, "Ann@Example.Test", "Ann", "Smith"),
                         (0, f"{LIST}: ann@example.test subscribed\n", ""))
        self.assertEqual(self.run_cli("add", LIST, "ann@example.test"),
                         (0, f"{LIST}: ann@example.test already a member\n", ""))
        code, out, _ = self.run_cli("show", LIST)
        self.assertEqual(code, 0)
        self.assertIn("owners:      own@example.test\n", out)
        self.assertIn("moderators:  mod@example.test\n", out)
        self.assertIn("members:     1\n  ann@example.test (Ann Smith)", out)
        code, out, _ = self.run_cli("show", LIST, "--json")
        doc = json.loads(out)
        self.assertEqual((doc["list"], doc["subject"], doc["owners"], doc["member_count"]),
                         (LIST, "Our team", ["own@example.test"], 1))
        self.assertEqual(doc["members"], [{"address": "ann@example.test", "name": "Ann Smith",
                                           "mode": "mail", "bounce_score": 0.0}])
        self.assertEqual(self.run_cli("del", LIST, "ann@example.test"),
                         (0, f"{LIST}: ann@example.test unsubscribed\n", ""))
        self.assertEqual(self.run_cli("del", LIST, "ann@example.test"),
                         (1, "", f"mailappliance: {LIST}: ann@example.test is not a member\n"))
        self.assertEqual(self.run_cli(), (0, f"{LIST}: 0 member(s), 1 owner(s), 0 held\n", ""))
        self.assertEqual(self.run_cli("delete", LIST), (0, f"{LIST}: deleted\n", ""))
        self.assertEqual(self.run_cli(), (0, "no lists\n", ""))

    def test_create_refuses_names_the_directory_has(self):
        """A list at a domain with users must not take a user's or alias's address
        (mail to it would go to the list): users by mail and mailLocalAddress,
        aliases by full name and, at the first domain, by bare name."""
        with open(self.config) as f:
            text = f.read()
        with open(self.config, "w") as f:
            f.write(text.replace('[lists]\ndomains = ["lists.example.test"]\n', "[lists]\n"))
        for address in ("alice@example.test", "a.liddell@example.test",
                        "staff@example.test", "sales@example.test"):
            code, out, err = self.run_cli("create", address, "--owner", "own@example.test")
            self.assertEqual((code, out), (1, ""), address)
            self.assertIn(f"{address}: already a user's or alias's address", err)
        self.assertEqual(self.run_cli(), (0, "no lists\n", ""))
        # Names the directory does not have are free, at both domains.
        for address in ("alice-list@example.test", LIST):
            code, _, err = self.run_cli("create", address, "--owner", "own@example.test")
            self.assertEqual((code, err), (0, ""))

    def test_tag_footer_and_size(self):
        self.create("--tag", "[team]", "--footer", "Leave: team-unsubscribe@", "--max-size",
                    "100000")
        code, out, _ = self.run_cli("show", LIST, "--json")
        settings = json.loads(out)["settings"]
        self.assertEqual((settings["subject_tag"], settings["footer"], settings["max_size"]),
                         ("[team]", "Leave: team-unsubscribe@", 100000))
        self.assertIn("tag:         [team]\n", self.run_cli("show", LIST)[1])
        code, _, err = self.run_cli("create", "other@lists.example.test", "--owner",
                                    "o@example.test", "--tag", "x\r\nBcc: v@x")
        self.assertEqual(code, 1)
        self.assertIn("--tag is at most 50 printable characters", err)

    def test_refusals_change_nothing(self):
        cases = [
            (("create", "team@example.test", "--owner", "o@example.test"),
             "example.test is not a list domain"),
            (("create", "team", "--owner", "o@example.test"), "expected LIST@DOMAIN"),
            (("create", "team-request@lists.example.test", "--owner", "o@example.test"),
             "not a valid list name"),
            (("create", "lists@lists.example.test", "--owner", "o@example.test"),
             "not a valid list name"),
            (("create", LIST, "--owner", "not an address"), "not an address"),
            (("create", LIST, "--owner", "o@example.test", "--scenario", "post=public"),
             "unknown operation"),
            (("create", LIST, "--owner", "o@example.test", "--scenario",
              "send=../../etc/passwd"), "no scenario send."),
            (("add", LIST, "x@example.test"), "no such list"),
        ]
        for argv, message in cases:
            code, out, err = self.run_cli(*argv)
            self.assertEqual(code, 1, argv)
            self.assertIn(message, err, argv)
        self.assertEqual(self.run_cli(), (0, "no lists\n", ""))
        self.create()
        code, _, err = self.run_cli("create", LIST, "--owner", "o@example.test")
        self.assertEqual((code, err), (1, f"mailappliance: {LIST} already exists\n"))
        code, _, err = self.run_cli("add", LIST, "x@example.test\r\nBcc: y@example.test")
        self.assertEqual(code, 1)
        self.assertIn("not an address", err)

    def test_reads_leave_the_database_alone(self):
        self.create()
        with open(self.path, "rb") as f:
            before = f.read()
        # A writer holding the lock does not stop a read.
        conn = state.connect(self.path)
        self.addCleanup(conn.close)
        conn.execute("BEGIN IMMEDIATE")
        try:
            for argv in (("show", LIST), ("held", LIST), ()):
                code, _, err = self.run_cli(*argv)
                self.assertEqual(code, 0, err)
        finally:
            conn.execute("ROLLBACK")
        with open(self.path, "rb") as f:
            self.assertEqual(f.read(), before)

    def test_list_outside_the_list_domains_still_shown_and_deleted(self):
        self.create()
        with open(self.config) as f:
            text = f.read()
        with open(self.config, "w") as f:
            f.write(text.replace('[lists]\ndomains = ["lists.example.test"]',
                                 '[lists]\ndomains = ["example.test"]'))
        self.assertEqual(self.run_cli("show", LIST)[0], 0)
        code, _, err = self.run_cli("add", LIST, "x@example.test")
        self.assertIn("not a list domain", err)
        self.assertEqual(self.run_cli("delete", LIST), (0, f"{LIST}: deleted\n", ""))

    def test_scenarios_kept_in_the_settings(self):
        if not cli_lists.scenario_exists("send", "private"):
            raise unittest.SkipTest("the standard scenario files are not installed")
        self.create("--scenario", "send=private", "--scenario", "subscribe=owner")
        doc = json.loads(self.run_cli("show", LIST, "--json")[1])
        self.assertEqual(doc["settings"], {"scenarios": {"send": "private",
                                                         "subscribe": "owner"}})
        code, _, err = self.run_cli("create", "other@lists.example.test", "--owner",
                                    "o@example.test", "--scenario", "send=nonesuch")
        self.assertEqual(code, 1)
        self.assertIn("no scenario send.nonesuch", err)

    def test_held_requests_listed(self):
        self.create()
        conn = state.connect(self.path)
        self.addCleanup(conn.close)
        from mailbox_appliance import state_lists
        state.in_transaction(conn, state_lists.hold, LIST, "moderation", bytes(range(32)),
                             expires=2e9, now=1e9, requester="ann@example.test",
                             subject="Hello \x1b[31mall")
        code, out, _ = self.run_cli("held", LIST)
        self.assertEqual(code, 0)
        self.assertIn("moderation", out)
        self.assertIn("ann@example.test", out)
        self.assertNotIn("\x1b", out)
        held = json.loads(self.run_cli("held", LIST, "--json")[1])
        self.assertEqual([h["kind"] for h in held], ["moderation"])
