"""``mailappliance queue``: listing, showing and acting on a data_dir's queue.

The queue files are made by the real Spool. Offline actions run the command
directly; online ones run it in a thread while a ControlServer with a fake
manager listens on the data_dir's control socket.
"""

import io
import json
import os
import shutil
import tempfile

from twisted.internet import defer, reactor, threads
from twisted.trial import unittest

from mailbox_appliance import cli
from mailbox_appliance.queue.control import ControlServer
from mailbox_appliance.queue.spool import Envelope, Spool, read_queue_file
from tests.test_control import FakeManager

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
BODY = (b"Received: from client.ext.test\r\nFrom: Alice <alice@ext.test>\r\n"
        b"Subject: quarterly numbers\r\n\r\nThe numbers are fine.\r\n")


class QueueCLIMixin:

    timeout = 30

    def setUp(self):
        # A short folder: the control socket's path must stay under ~100 octets.
        self.dir = tempfile.mkdtemp(prefix="cliq-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        shutil.copy(os.path.join(FIXTURES, "directory.ldif"), self.dir)
        self.config = os.path.join(self.dir, "mailappliance.toml")
        with open(self.config, "w") as f:
            f.write('[server]\nhostname = "mx.example.test"\ndomains = ["example.test"]\n'
                    'data_dir = "var"\n[listen]\nsmtp = "tcp:0:interface=127.0.0.1"\n'
                    '[directory]\nldif = "directory.ldif"\n')
        self.data_dir = os.path.join(self.dir, "var")
        self.spool = Spool(reactor, os.path.join(self.data_dir, "queue"))
        self.addCleanup(self.spool.worker.stop)

    def run_cli(self, *argv):
        out, err = io.StringIO(), io.StringIO()
        code = cli.main(["--config", self.config, *argv], out=out, err=err)
        return code, out.getvalue(), err.getvalue()

    def run_cli_in_thread(self, *argv):
        return threads.deferToThread(self.run_cli, *argv)

    @defer.inlineCallbacks
    def queue(self, body=BODY, **kw):
        kw.setdefault("sender", "alice@ext.test")
        kw.setdefault("recipients", ["carol@example.test", "bob@remote.test"])
        kw.setdefault("arrival", 1700000000.0)
        kw.setdefault("client_ip", "192.0.2.7")
        kw.setdefault("helo", "client.ext.test")
        inc = self.spool.new_message(Envelope(**kw))
        inc.write_header()
        inc.write(body)
        qmsg = yield self.spool.commit(inc)
        return qmsg

    @defer.inlineCallbacks
    def populate(self):
        """One message half delivered and deferred, one fresh, one held."""
        a = yield self.queue(ret="HDRS", envid="ENV1", notify=["", "FAILURE,DELAY"],
                             orcpt=["", "rfc822;bob@remote.test"])
        yield self.spool.mark_done(a, ["0:*"])
        a.attempts = 3
        a.next_attempt = 1700009000.0
        a.last = {1: {"status": "deferred", "enhanced": "4.4.1",
                      "reply": "451 4.4.1 mx.remote.test: try again later",
                      "remote_mta": "mx.remote.test", "from_remote": True,
                      "at": 1700008000.0}}
        yield self.spool.write_status(a)
        b = yield self.queue(sender="", recipients=["dave@example.test"], arrival=1700000100.0)
        c = yield self.queue(recipients=["erin@remote.test"], arrival=1700000200.0)
        c = yield self.spool.move(c, to_hold=True)
        self.a, self.b, self.c = a, b, c

    def files(self, folder):
        path = os.path.join(self.data_dir, "queue", folder)
        return sorted(os.listdir(path)) if os.path.isdir(path) else []


class ListTests(QueueCLIMixin, unittest.TestCase):

    def test_empty(self):
        code, out, err = self.run_cli("queue")
        self.assertEqual((code, out, err), (0, "Mail queue is empty\n", ""))
        code, out, _ = self.run_cli("queue", "list", "--json")
        self.assertEqual((code, json.loads(out)), (0, []))

    @defer.inlineCallbacks
    def test_listing(self):
        yield self.populate()
        code, out, err = self.run_cli("queue", "list")
        self.assertEqual((code, err), (0, ""))
        lines = out.splitlines()
        first = next(l for l in lines if l.startswith(self.a.qid))
        self.assertIn(" alice@ext.test", first)
        self.assertIn(str(self.a.size), first)
        self.assertIn("(3 attempts, next ", out)
        self.assertIn("carol@example.test  [done]", out)
        self.assertIn("bob@remote.test  [deferred]", out)
        self.assertIn("(451 4.4.1 mx.remote.test: try again later, from mx.remote.test)", out)
        second = next(l for l in lines if l.startswith(self.b.qid))
        self.assertIn("MAILER-DAEMON", second)
        self.assertIn("dave@example.test  [pending]", out)
        # Held messages carry a "!" after their id, as in Postfix's mailq.
        self.assertTrue(any(l.startswith(self.c.qid + "!") for l in lines))
        self.assertFalse(any(l.startswith(self.a.qid + "!") for l in lines))
        self.assertIn("erin@remote.test  [pending]", out)
        self.assertTrue(lines[-1].startswith("-- "))
        self.assertIn("in 3 message(s), 1 held", lines[-1])
        # Oldest first.
        order = [l.split()[0].rstrip("!") for l in lines if l[:1].isalnum()]
        self.assertEqual(order, [self.a.qid, self.b.qid, self.c.qid])
        # Plain "queue" is the same listing.
        self.assertEqual(self.run_cli("queue")[1], out)

    @defer.inlineCallbacks
    def test_json_listing(self):
        yield self.populate()
        code, out, _ = self.run_cli("queue", "list", "--json")
        self.assertEqual(code, 0)
        doc = json.loads(out)
        self.assertEqual([m["id"] for m in doc], [self.a.qid, self.b.qid, self.c.qid])
        a = doc[0]
        self.assertEqual((a["held"], a["sender"], a["size"], a["attempts"]),
                         (False, "alice@ext.test", len(BODY), 3))
        self.assertEqual((a["ret"], a["envid"], a["next_attempt"]), ("HDRS", "ENV1", 1700009000.0))
        self.assertEqual(a["arrival"], 1700000000.0)
        self.assertEqual(a["arrival_date"], "2023-11-14T22:13:20+00:00")
        self.assertEqual([(r["address"], r["status"]) for r in a["recipients"]],
                         [("carol@example.test", "done"), ("bob@remote.test", "deferred")])
        self.assertEqual(a["recipients"][1]["notify"], "FAILURE,DELAY")
        self.assertEqual(a["recipients"][1]["orcpt"], "rfc822;bob@remote.test")
        self.assertEqual(a["recipients"][1]["last"]["reply"],
                         "451 4.4.1 mx.remote.test: try again later")
        self.assertIsNone(a["recipients"][0]["last"])
        self.assertTrue(doc[2]["held"])
        self.assertEqual(doc[1]["sender"], "")
        self.assertGreater(a["age"], 0)
        again = json.loads(self.run_cli("queue", "--json")[1])
        for m in again + doc:
            del m["age"]
        self.assertEqual(again, doc)

    @defer.inlineCallbacks
    def test_unreadable_file_is_named_not_fatal(self):
        yield self.populate()
        with open(os.path.join(self.data_dir, "queue", "active", "BADBAD"), "wb") as f:
            f.write(b"not a queue file")
        code, out, _ = self.run_cli("queue")
        self.assertEqual(code, 0)
        self.assertIn("BADBAD  (unreadable: bad magic)", out)
        self.assertIn("in 3 message(s)", out)
        # The admin command only reads: the file stays where it is.
        self.assertIn("BADBAD", self.files("active"))

    @defer.inlineCallbacks
    def test_terminal_controls_are_not_printed(self):
        a = yield self.queue(recipients=["x@remote.test"])
        a.attempts = 1
        a.last = {0: {"status": "deferred", "reply": "451 \x1b[2J\x1b]0;pwned\x07 later",
                      "at": 1700000001.0}}
        yield self.spool.write_status(a)
        _, out, _ = self.run_cli("queue")
        self.assertNotIn("\x1b", out)
        self.assertNotIn("\x07", out)
        self.assertIn("451 ?[2J?]0;pwned? later", out)

    def test_configuration_error(self):
        with open(self.config, "a") as f:
            f.write("[smtp]\nmax_recipients = 1\n")
        for argv in (("queue",), ("queue", "hold", "0123"), ("queue", "show", "0123")):
            code, out, err = self.run_cli(*argv)
            self.assertEqual(code, 2, argv)
            self.assertIn("configuration error", err)
            self.assertEqual(out, "")

    def test_check_config_still_works(self):
        code, out, err = self.run_cli("check-config")
        self.assertEqual((code, err), (0, ""))
        self.assertEqual(out, f"{self.config}: configuration ok\n")


class ShowTests(QueueCLIMixin, unittest.TestCase):

    @defer.inlineCallbacks
    def test_show(self):
        yield self.populate()
        code, out, err = self.run_cli("queue", "show", self.a.qid)
        self.assertEqual((code, err), (0, ""))
        self.assertIn(f"Queue ID:   {self.a.qid}\n", out)
        self.assertIn(f"Size:       {len(BODY)} bytes\n", out)
        self.assertIn("Sender:     <alice@ext.test>\n", out)
        self.assertIn("Client:     client.ext.test [192.0.2.7] (ESMTP)\n", out)
        self.assertIn("DSN:        RET=HDRS ENVID=ENV1\n", out)
        self.assertIn("Attempts:   3, next ", out)
        self.assertIn("  carol@example.test  [done]\n", out)
        self.assertIn("  bob@remote.test  [deferred]  NOTIFY=FAILURE,DELAY "
                      "ORCPT=rfc822;bob@remote.test\n", out)
        self.assertIn("      last: 451 4.4.1 mx.remote.test: try again later (at ", out)
        self.assertIn("from mx.remote.test)", out)
        self.assertIn("Subject: quarterly numbers\n", out)
        self.assertNotIn("The numbers are fine.", out)

    @defer.inlineCallbacks
    def test_show_body_and_held(self):
        yield self.populate()
        code, out, _ = self.run_cli("queue", "show", self.c.qid, "--body")
        self.assertEqual(code, 0)
        self.assertIn("(on hold)", out)
        self.assertIn("The numbers are fine.", out)
        self.assertIn("Subject: quarterly numbers", out)

    @defer.inlineCallbacks
    def test_show_json(self):
        yield self.populate()
        code, out, _ = self.run_cli("queue", "show", self.a.qid, "--json")
        self.assertEqual(code, 0)
        doc = json.loads(out)
        self.assertEqual(doc["id"], self.a.qid)
        self.assertEqual(doc["headers"], BODY.split(b"\r\n\r\n")[0].decode() + "\r\n")
        self.assertNotIn("message", doc)
        doc = json.loads(self.run_cli("queue", "show", self.a.qid, "--json", "--body")[1])
        self.assertEqual(doc["message"], BODY.decode())

    @defer.inlineCallbacks
    def test_unknown_and_hostile_ids(self):
        yield self.populate()
        for qid in ("FFFFFFFF", "../queue/active/" + self.a.qid, self.a.qid + ".done",
                    "/etc/passwd", ""):
            code, out, err = self.run_cli("queue", "show", qid)
            self.assertEqual((code, out), (1, ""), qid)
            self.assertIn("no such message in the queue", err)
            self.assertEqual(len(err.splitlines()), 1)
        code, out, _ = self.run_cli("queue", "show", "FFFF", "--json")
        self.assertEqual((code, json.loads(out)["ok"]), (1, False))


class OfflineActionTests(QueueCLIMixin, unittest.TestCase):
    """No appliance runs: the command moves and removes the files itself."""

    @defer.inlineCallbacks
    def test_hold_and_release(self):
        yield self.populate()
        a = self.a.qid
        code, out, err = self.run_cli("queue", "hold", a)
        self.assertEqual((code, out, err), (0, f"{a}: held\n", ""))
        self.assertNotIn(a, self.files("active"))
        self.assertNotIn(a + ".done", self.files("active"))
        self.assertNotIn(a + ".status", self.files("active"))
        self.assertTrue({a, a + ".done", a + ".status"} <= set(self.files("hold")))
        # Nothing lost on the way: the records still belong to it.
        m = read_queue_file(a, os.path.join(self.data_dir, "queue", "hold", a))
        self.assertEqual((m.done, m.attempts), ({"0:*"}, 3))
        self.assertIn(a + "!", self.run_cli("queue")[1])
        self.assertEqual(self.run_cli("queue", "hold", a)[:2], (0, f"{a}: already on hold\n"))

        code, out, _ = self.run_cli("queue", "release", a)
        self.assertEqual((code, out), (0, f"{a}: released\n"))
        self.assertTrue({a, a + ".done", a + ".status"} <= set(self.files("active")))
        self.assertNotIn(a, self.files("hold"))
        self.assertEqual(self.run_cli("queue", "release", a)[:2],
                         (0, f"{a}: was not on hold\n"))

    @defer.inlineCallbacks
    def test_the_spool_takes_back_what_the_command_moved(self):
        yield self.populate()
        self.run_cli("queue", "hold", self.a.qid)
        self.run_cli("queue", "release", self.c.qid)
        recovered = {m.qid: m for m in self.spool.recover()}
        held = {m.qid: m for m in self.spool.held()}
        self.assertEqual(set(recovered), {self.b.qid, self.c.qid})
        self.assertEqual(set(held), {self.a.qid})
        self.assertEqual(held[self.a.qid].done, {"0:*"})
        self.assertEqual(held[self.a.qid].last[1]["enhanced"], "4.4.1")

    @defer.inlineCallbacks
    def test_delete(self):
        yield self.populate()
        code, out, _ = self.run_cli("queue", "delete", self.a.qid)
        self.assertEqual((code, out), (0, f"{self.a.qid}: deleted\n"))
        self.assertFalse([n for n in self.files("active") if n.startswith(self.a.qid)])
        code, out, _ = self.run_cli("queue", "delete", self.c.qid, "--json")
        self.assertEqual((code, json.loads(out)), (0, {"ok": True, "count": 1}))
        self.assertEqual(self.files("hold"), [])
        self.assertEqual(self.files("active"), [self.b.qid])

    @defer.inlineCallbacks
    def test_unknown_ids_change_nothing(self):
        yield self.populate()
        before = (self.files("active"), self.files("hold"))
        outside = os.path.join(self.data_dir, "victim")
        with open(outside, "w") as f:
            f.write("keep me")
        for op in ("hold", "release", "delete"):
            for qid in ("FFFFFFFF", "../../victim", "../victim", self.a.qid + ".done", "."):
                code, out, err = self.run_cli("queue", op, qid)
                self.assertEqual((code, out), (1, ""), (op, qid))
                self.assertIn("no such message in the queue", err)
            code, out, _ = self.run_cli("queue", op, "FFFF", "--json")
            self.assertEqual((code, json.loads(out)["ok"]), (1, False))
        self.assertEqual((self.files("active"), self.files("hold")), before)
        self.assertTrue(os.path.exists(outside))

    @defer.inlineCallbacks
    def test_flush_says_the_queue_runs_at_start(self):
        yield self.populate()
        code, out, _ = self.run_cli("queue", "flush")
        self.assertEqual((code, out),
                         (0, "appliance not running: the queue is run at start\n"))
        code, out, _ = self.run_cli("queue", "flush", "remote.test", "--json")
        self.assertEqual(json.loads(out)["ok"], True)
        code, _, err = self.run_cli("queue", "flush", "remote.test\nx")
        self.assertEqual(code, 1)
        self.assertIn("not a queue id or domain", err)

    @defer.inlineCallbacks
    def test_stale_socket_means_offline(self):
        import socket
        yield self.populate()
        s = socket.socket(socket.AF_UNIX)
        s.bind(os.path.join(self.data_dir, "control.sock"))
        s.close()
        code, out, _ = self.run_cli("queue", "hold", self.b.qid)
        self.assertEqual((code, out), (0, f"{self.b.qid}: held\n"))
        self.assertIn(self.b.qid, self.files("hold"))


class OnlineActionTests(QueueCLIMixin, unittest.TestCase):
    """An appliance listens on control.sock: the command asks it and touches no file."""

    def setUp(self):
        super().setUp()
        self.manager = FakeManager()
        self.port = reactor.listenUNIX(os.path.join(self.data_dir, "control.sock"),
                                       ControlServer(self.manager), mode=0o600)
        self.addCleanup(self.port.stopListening)

    @defer.inlineCallbacks
    def test_actions_go_to_the_running_queue(self):
        yield self.populate()
        self.manager.known = {self.a.qid, self.c.qid}
        before = (self.files("active"), self.files("hold"))
        code, out, err = yield self.run_cli_in_thread("queue", "hold", self.a.qid)
        self.assertEqual((code, out, err), (0, f"{self.a.qid}: held\n", ""))
        code, out, _ = yield self.run_cli_in_thread("queue", "release", self.c.qid)
        self.assertEqual((code, out), (0, f"{self.c.qid}: released\n"))
        code, out, _ = yield self.run_cli_in_thread("queue", "delete", self.a.qid, "--json")
        self.assertEqual((code, json.loads(out)), (0, {"ok": True, "count": 1}))
        self.assertEqual(self.manager.calls, [("hold", self.a.qid), ("release", self.c.qid),
                                              ("delete", self.a.qid)])
        # The running appliance moves its own files; the command did not.
        self.assertEqual((self.files("active"), self.files("hold")), before)

    @defer.inlineCallbacks
    def test_stats(self):
        code, out, _ = yield self.run_cli_in_thread("stats")
        self.assertEqual((code, out), (0, "nothing counted yet\n"))
        from mailbox_appliance.antispam.verdicts import Counters
        counters = Counters()
        for check, outcome in (("greylist", "pass"), ("hit", "BAYES_99"), ("hit", "BAYES_99"),
                               ("hit", "\x1b[31mX")):
            counters.count(check, outcome)
        self.port.factory.stats = counters.snapshot
        code, out, _ = yield self.run_cli_in_thread("stats")
        self.assertEqual(code, 0)
        self.assertEqual(out.splitlines(), ["greylist  pass             1",
                                            "hit       ?[31mX           1",
                                            "hit       BAYES_99         2"])
        code, out, _ = yield self.run_cli_in_thread("stats", "--json")
        self.assertEqual(json.loads(out)["hit:BAYES_99"], 2)

    @defer.inlineCallbacks
    def test_stats_without_a_running_appliance(self):
        yield self.port.stopListening()
        code, _, err = yield self.run_cli_in_thread("stats")
        self.assertEqual(code, 1)
        self.assertIn("the appliance is not running", err)

    @defer.inlineCallbacks
    def test_flush(self):
        self.manager.results["flush"] = 4
        code, out, _ = yield self.run_cli_in_thread("queue", "flush")
        self.assertEqual((code, out), (0, "4 message(s) scheduled for delivery now\n"))
        code, out, _ = yield self.run_cli_in_thread("queue", "flush", "remote.test")
        self.assertEqual((code, out),
                         (0, "4 message(s) scheduled for delivery now for remote.test\n"))
        code, out, _ = yield self.run_cli_in_thread("queue", "flush", "--json")
        self.assertEqual(json.loads(out), {"ok": True, "count": 4})
        self.assertEqual(self.manager.calls, [("flush", None), ("flush", "remote.test"),
                                              ("flush", None)])

    @defer.inlineCallbacks
    def test_unknown_id(self):
        code, out, err = yield self.run_cli_in_thread("queue", "hold", "FFFF0000")
        self.assertEqual((code, out), (1, ""))
        self.assertEqual(err, "mailappliance: no such message in the queue: FFFF0000\n")
        # A malformed id never reaches the socket.
        code, _, _ = yield self.run_cli_in_thread("queue", "delete", "../x")
        self.assertEqual(code, 1)
        self.assertEqual(self.manager.calls, [])

    @defer.inlineCallbacks
    def test_failure_in_the_appliance(self):
        self.manager.results["flush"] = RuntimeError("scheduler stuck")
        code, out, err = yield self.run_cli_in_thread("queue", "flush")
        self.assertEqual((code, out), (1, ""))
        self.assertIn("request failed: scheduler stuck", err)
        self.flushLoggedErrors(RuntimeError)
