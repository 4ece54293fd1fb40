"""Submission load for the relay benchmark (standard library only).

    python3 bench/relay_load.py HOST PORT [options]

Sends ``--messages`` messages of ``--size`` octets over ``--connections``
parallel SMTP sessions (STARTTLS, then AUTH PLAIN as ``--user``), each to one
of ``--domains`` remote domains in turn (``rNNNN@dMMM.bench``). By default every
session stays open and carries its share of the messages, as a busy client
that keeps its connection would; ``--per-session 1`` opens a new session (and
TLS handshake) for every message instead.

With ``--sink-counter FILE`` (the running counters ``smtp-sink -c`` writes)
it then waits until the sink has received as many messages as were accepted
(counted from the sink's figure at the start) and reports
the end-to-end delivery rate: messages at the sink / time from the first
connection to the last message at the sink.

Prints one line whose first two fields are accepted/s and delivered/s (0 when
not measured), then a readable account. Exits 1 when any message was refused
or the sink did not get every message before ``--timeout``.
"""

import argparse
import os
import smtplib
import ssl
import sys
import threading
import time

LINE = 76


def make_message(sender, rcpt, number, size):
    """A plain RFC 5322 message of exactly ``size`` octets (CRLF line ends)."""
    head = ("From: Bench <%s>\r\nTo: <%s>\r\nSubject: relay bench %d\r\n"
            "Message-ID: <relay-%d-%d@bench.test>\r\n"
            "Date: Thu, 01 Jan 2026 00:00:00 +0000\r\nMIME-Version: 1.0\r\n"
            "Content-Type: text/plain; charset=us-ascii\r\n\r\n"
            % (sender, rcpt, number, os.getpid(), number)).encode("ascii")
    body = bytearray()
    filler = b"abcdefghijklmnopqrstuvwxyz0123456789" * 3
    while len(head) + len(body) < size:
        body += filler[:LINE - 2] + b"\r\n"
    data = bytes(head + body)[:size]
    # End on a complete line, whatever the size.
    return data[:-2] + b"\r\n" if len(data) >= 2 else data


def sink_count(path):
    """The ``mesg=N`` of the last counter line smtp-sink -c wrote, or 0."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 128))
            tail = f.read()
    except OSError:
        return 0
    for record in reversed(tail.replace(b"\n", b"\r").split(b"\r")):
        for field in record.split():
            if field.startswith(b"mesg="):
                try:
                    return int(field[5:])
                except ValueError:
                    break
    return 0


class Load:
    """Runs the sessions and counts what the server answered."""

    def __init__(self, args):
        self.args = args
        self.lock = threading.Lock()
        self.next = 0
        self.accepted = 0
        self.refused = 0
        self.errors = []
        self.tls = ssl.create_default_context()
        # The servers under test use self-signed certificates.
        self.tls.check_hostname = False
        self.tls.verify_mode = ssl.CERT_NONE

    def take(self):
        """The next message number, or None when all have been handed out."""
        with self.lock:
            if self.next >= self.args.messages:
                return None
            self.next += 1
            return self.next - 1

    def record(self, ok, error=None):
        with self.lock:
            if ok:
                self.accepted += 1
            else:
                self.refused += 1
                if len(self.errors) < 5:
                    self.errors.append(error)

    def open(self):
        a = self.args
        s = smtplib.SMTP(a.host, a.port, local_hostname="client.bench.test", timeout=a.timeout)
        s.ehlo()
        if a.tls:
            s.starttls(context=self.tls)
            s.ehlo()
        if a.user:
            s.user, s.password = a.user, a.password
            s.auth("PLAIN", s.auth_plain)
        return s

    def session(self):
        a = self.args
        s = None
        sent = 0
        while True:
            n = self.take()
            if n is None:
                break
            rcpt = "r%04d@d%03d.bench" % (n, n % a.domains)
            try:
                if s is None:
                    s = self.open()
                s.sendmail(a.sender, [rcpt], make_message(a.sender, rcpt, n, a.size))
                self.record(True)
            except (smtplib.SMTPException, OSError) as e:
                self.record(False, "%s: %s" % (rcpt, e))
                s = self.close(s)
                continue
            sent += 1
            if a.per_session and sent % a.per_session == 0:
                s = self.close(s)
        self.close(s)

    @staticmethod
    def close(s):
        if s is not None:
            try:
                s.quit()
            except (smtplib.SMTPException, OSError):
                s.close()
        return None

    def run(self):
        threads = [threading.Thread(target=self.session, daemon=True)
                   for _ in range(self.args.connections)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()


def wait_for_sink(path, expect, deadline):
    """Poll the sink's counter; (count, time of the last increase)."""
    count, last_change = sink_count(path), time.monotonic()
    while count < expect and time.monotonic() < deadline:
        time.sleep(0.01)
        now = sink_count(path)
        if now != count:
            count, last_change = now, time.monotonic()
    return count, last_change


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("--messages", type=int, default=2000)
    p.add_argument("--connections", type=int, default=20)
    p.add_argument("--size", type=int, default=10240)
    p.add_argument("--domains", type=int, default=200)
    p.add_argument("--per-session", type=int, default=0,
                   help="messages per session, then a new one (0: keep it)")
    p.add_argument("--sender", default="bench@example.test")
    p.add_argument("--user", default="", help="AUTH PLAIN as this user (empty: no AUTH)")
    p.add_argument("--password", default="")
    p.add_argument("--no-tls", dest="tls", action="store_false")
    p.add_argument("--sink-counter", default="")
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--label", default="server")
    a = p.parse_args(argv)
    if not a.host.startswith("127.") and a.host not in ("localhost", "::1"):
        p.error("loopback targets only")
    if a.user and not a.tls:
        p.error("AUTH is only sent inside TLS")

    load = Load(a)
    # One sink serves several measurements: count only what arrives from now on.
    base = sink_count(a.sink_counter) if a.sink_counter else 0
    t0 = time.monotonic()
    load.run()
    t1 = time.monotonic()
    for e in load.errors:
        print("refused: %s" % e, file=sys.stderr)
    acc_rate = load.accepted / (t1 - t0)
    mode = "%s%s, %s" % ("STARTTLS" if a.tls else "plain",
                         " + AUTH PLAIN" if a.user else ", no AUTH",
                         "%d msgs/session" % a.per_session if a.per_session else "sessions kept")
    text = ("%s: %.1f msgs/s accepted (%d of %d msgs, %d B, %d connections, %s, %d domains, "
            "%.3f s)" % (a.label, acc_rate, load.accepted, a.messages, a.size, a.connections,
                         mode, a.domains, t1 - t0))
    del_rate = 0.0
    ok = load.refused == 0
    if a.sink_counter:
        got, last = wait_for_sink(a.sink_counter, base + load.accepted, t0 + a.timeout)
        got -= base
        del_rate = got / (last - t0) if got else 0.0
        text += "; %.1f msgs/s delivered (%d at the sink after %.3f s)" % (del_rate, got, last - t0)
        ok = ok and got >= load.accepted
    print("%.1f %.1f %s" % (acc_rate, del_rate, text))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
