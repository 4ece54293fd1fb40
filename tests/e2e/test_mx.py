"""End-to-end: the real twistd process on the embedded directory, driven by real clients."""

import os
import re
import shutil
import smtplib
import subprocess
import threading
import time

from twisted.trial import unittest

from tests.e2e.harness import ApplianceProcess, run_cli

MSG = "From: x@ext.test\r\nTo: alice@example.test\r\nSubject: {subject}\r\n\r\n{body}\r\n"


class MXTests(unittest.TestCase):
    """Mail for users of the example directory lands in their Maildir."""

    def setUp(self):
        self.app = ApplianceProcess(self.mktemp()).start()
        self.addCleanup(self.app.stop)

    def test_smtplib_delivery_alias_and_unknown(self):
        with smtplib.SMTP("127.0.0.1", self.app.smtp_port) as s:
            code, _ = s.ehlo("client.ext.test")
            self.assertEqual(code, 250)
            self.assertEqual(s.rcpt("nobody@example.test")[0], 503)   # no MAIL yet
            s.mail("x@ext.test")
            self.assertEqual(s.rcpt("nobody@example.test")[0], 550)
            self.assertEqual(s.rcpt("a.liddell@example.test")[0], 250)
            self.assertEqual(s.rcpt("staff@example.test")[0], 250)
            code, text = s.data(MSG.format(subject="e2e", body="hello"))
            self.assertEqual(code, 250)
            qid = re.search(rb"queued as (\w+)", text).group(1).decode()
        self.app.wait_for(lambda: len(self.app.messages("alice")) == 1 and
                          len(self.app.messages("bob")) == 1, what="delivery")
        self.app.wait_for(lambda: not self.app.queue_ids(), what="empty queue")
        log = self.app.log()
        self.assertIn(f"{qid}: client=[127.0.0.1], from=<x@ext.test>", log)
        self.assertRegex(log, rf"{qid}: to=<alice@example.test>, orig_to=<a.liddell@example.test>"
                              r", delay=[\d.]+, dsn=2.0.0, status=sent")
        self.assertNotIn("Traceback", log)

    def test_swaks_plain_and_starttls(self):
        if not shutil.which("swaks"):
            raise unittest.SkipTest("swaks is not installed")
        for extra in ([], ["--tls"]):
            r = subprocess.run(["swaks", "--server", "127.0.0.1", "--port",
                                str(self.app.smtp_port), "--from", "x@ext.test", "--to",
                                "bob@example.test", "--helo", "client.ext.test",
                                "--header", "Subject: swaks" + "".join(extra)] + extra,
                               capture_output=True, text=True, timeout=60)
            self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
            self.assertIn("250 2.0.0 Ok: queued as", r.stdout)
        self.app.wait_for(lambda: len(self.app.messages("bob")) == 2, what="delivery")
        tls_copy = [m for m in self.app.messages("bob") if b"Subject: swaks--tls" in m][0]
        self.assertRegex(tls_copy, rb"\(using TLSv1\.[23] with cipher")

    def test_swaks_relay_denied_and_smuggling(self):
        if not shutil.which("swaks"):
            raise unittest.SkipTest("swaks is not installed")
        r = subprocess.run(["swaks", "--server", "127.0.0.1", "--port", str(self.app.smtp_port),
                            "--from", "x@ext.test", "--to", "victim@victim.test"],
                           capture_output=True, text=True, timeout=60)
        self.assertNotEqual(r.returncode, 0)
        self.assertIn("554 5.7.1", r.stdout)
        self.assertEqual(self.app.queue_ids(), [])

    def test_remote_forward_stays_queued_across_restart(self):
        with smtplib.SMTP("127.0.0.1", self.app.smtp_port) as s:
            s.sendmail("x@ext.test", ["carol@example.test"],
                       MSG.format(subject="fwd", body="x"))
        self.app.wait_for(lambda: "status=deferred" in self.app.log(), what="deferral")
        ids = self.app.queue_ids()
        self.assertEqual(len(ids), 1)
        listing = run_cli("--config", self.app.config_path, "queue")
        self.assertEqual(listing.returncode, 0, listing.stderr)
        self.assertIn(ids[0], listing.stdout)
        # The last reason is on record: nobody answers the DNS queries here.
        self.assertIn("carol@example.test  [deferred]", listing.stdout)
        self.app.stop()
        self.app.start()
        self.app.wait_for(lambda: "recovered from disk" in self.app.log(), what="recovery")
        self.assertEqual(self.app.queue_ids(), ids)


    def test_ldap_filter_injection_through_the_embedded_directory(self):
        strings = ["*", "*)(uid=*", "alice*", "admin)(|(objectClass=*", "a\\5c2a", "*)(mail=*"]
        with smtplib.SMTP("127.0.0.1", self.app.smtp_port) as s:
            s.ehlo("client.ext.test")
            s.mail("x@ext.test")
            for local in strings:
                # docmd: smtplib's own quoting would parse "(...)" as comments.
                code, text = s.docmd(f"RCPT TO:<{local}@example.test>")
                self.assertIn(code, (501, 550), local)
                if code == 550:
                    self.assertTrue(text.startswith(b"5.1.1"), (local, text))
            self.assertEqual(s.rcpt("alice@example.test")[0], 250)
        self.assertNotIn("Traceback", self.app.log())


class CrashTests(unittest.TestCase):
    """SIGKILL mid-load: every message that got a 250 is delivered exactly once."""

    def test_kill_mid_data_keeps_nothing(self):
        app = ApplianceProcess(self.mktemp()).start()
        self.addCleanup(app.stop)
        s = smtplib.SMTP("127.0.0.1", app.smtp_port)
        s.ehlo("client.ext.test")
        s.mail("x@ext.test")
        s.rcpt("alice@example.test")
        s.putcmd("DATA")
        self.assertEqual(s.getreply()[0], 354)
        # Over the in-memory limit, so part of it is already in queue/tmp.
        s.send(b"Subject: half\r\n\r\n" + (b"y" * 998 + b"\r\n") * 400)
        time.sleep(0.5)
        app.kill()
        s.close()
        app.start()
        time.sleep(0.5)
        self.assertEqual(app.messages("alice"), [])
        self.assertEqual(app.queue_ids(), [])
        self.assertEqual(os.listdir(os.path.join(app.data_dir, "queue", "tmp")), [])

    def test_kill_during_load(self):
        app = ApplianceProcess(self.mktemp()).start()
        self.addCleanup(app.stop)
        # Each attempt carries its own token: a retry after an unanswered
        # attempt may legitimately duplicate that attempt, never an acked one.
        acked, attempts, lock = set(), {}, threading.Lock()
        killed = threading.Event()
        todo = list(range(200))

        deadline = time.monotonic() + 300

        def client():
            # Bounded, so a failed restart never leaves threads retrying
            # for ever (they would keep the test run from exiting).
            while time.monotonic() < deadline:
                with lock:
                    if not todo:
                        return
                    n = todo.pop(0)
                    attempts[n] = attempts.get(n, 0) + 1
                    token = f"crash-{n:04d}-{attempts[n]}"
                try:
                    with smtplib.SMTP("127.0.0.1", app.smtp_port, timeout=20) as s:
                        s.sendmail("x@ext.test", ["alice@example.test"],
                                   MSG.format(subject=token, body=f"ID {token}"))
                    with lock:
                        acked.add(token)
                        if len(acked) == 80 and not killed.is_set():
                            # Killed before the main thread hears of it, so
                            # its restart never races this stop.
                            app.kill()
                            killed.set()
                except (OSError, smtplib.SMTPException):
                    with lock:
                        todo.append(n)
                    time.sleep(0.2)

        threads = [threading.Thread(target=client, daemon=True) for _ in range(10)]
        for t in threads:
            t.start()
        self.addCleanup(todo.clear)
        self.assertTrue(killed.wait(120))
        app.proc.wait(10)
        app.start()
        for t in threads:
            t.join(180)
        self.assertEqual(len(acked), 200)

        def counts():
            found = {}
            for m in app.messages("alice"):
                for token in re.findall(rb"ID (crash-\d{4}-\d+)", m):
                    found[token.decode()] = found.get(token.decode(), 0) + 1
            return found
        app.wait_for(lambda: acked <= set(counts()) and not app.queue_ids(), timeout=60,
                     what="all deliveries")
        found = counts()
        self.assertEqual({k: v for k, v in found.items() if v != 1}, {})
        self.assertTrue(acked <= set(found))
        self.assertNotIn("Traceback", app.log())
