"""The list fan-out benchmark's two steps (bench/list_fanout.sh runs them).

    python bench/list_fanout_load.py members CONFIG LIST [--members 10000] [--domains 500]
    python bench/list_fanout_load.py post HOST PORT LIST --pid PID --sink-counter FILE
                                     [--expect N] [--size 4096] [--timeout 300]

``members`` subscribes ``mNNNNN@dKKK.bench`` (member n at domain n mod
``--domains``) to LIST in the appliance's state database, in one write
transaction, through the same functions the admin command uses
(``state.open_for_writing``, ``state_lists.add_member``): subscribing 10,000
addresses one admin command at a time would take longer than the
measurement. Run it before the appliance starts, so no cached list data is
stale. Needs the appliance's modules on ``sys.path`` (PYTHONPATH=checkout).

``post`` sends one post of ``--size`` octets to LIST over plain SMTP
(standard library only), notes when the 250 after DATA came, then watches the
counters of ``smtp-sink -c`` until ``--expect`` more messages arrived than
before the post. Every copy has its own envelope sender (VERP), so the
appliance sends each in a transaction of its own: the sink's message count
is the count of copies. It reads ``VmHWM`` (peak resident memory) and
``VmRSS`` of process ``--pid`` from /proc before the post and at the end.

``post`` prints one line whose first three fields are the seconds from the
250 to the last copy at the sink, the peak resident MB of the appliance and
its peak resident MB before the post, then a readable account; progress goes
to stderr every 10 s. Exits 1 when not every copy arrived before
``--timeout`` (counted from the 250) or the post was refused.
"""

import argparse
import os
import smtplib
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from relay_load import sink_count  # noqa: E402  (the -c counter reader, shared)

PROGRESS_EVERY = 10.0


def member_address(n, domains):
    return "m%05d@d%03d.bench" % (n, n % domains)


def add_members(a):
    from mailbox_appliance import config, state
    from mailbox_appliance import state_lists as sl
    cfg = config.load(a.config)
    path = os.path.join(cfg.server.data_dir, state.FILENAME)
    t0 = time.monotonic()
    conn = state.open_for_writing(path)
    try:
        def add_all(conn):
            added = 0
            for n in range(a.members):
                added += sl.add_member(conn, a.list, member_address(n, a.domains),
                                       now=time.time())
            return added
        added = state.in_transaction(conn, add_all)
        total = sl.count_members(conn, a.list)
    finally:
        conn.close()
    print("%s: %d members added (%d in all) at %d domains in %.1f s"
          % (a.list, added, total, min(a.domains, a.members), time.monotonic() - t0))
    return 0 if total >= a.members else 1


def proc_status(pid):
    """{field: kB} of VmHWM and VmRSS of ``pid`` (empty once it is gone)."""
    out = {}
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmHWM", "VmRSS"):
                    out[key] = int(value.split()[0])
    except (OSError, ValueError, IndexError):
        pass
    return out


def mb(kb):
    return kb / 1024.0


def make_post(sender, to, size):
    """A plain-text post of about ``size`` octets (CRLF line ends)."""
    head = ("From: Bench Poster <%s>\r\nTo: <%s>\r\nSubject: list fan-out bench\r\n"
            "Message-ID: <fanout-%d-%d@bench.test>\r\n"
            "Date: Thu, 01 Jan 2026 00:00:00 +0000\r\nMIME-Version: 1.0\r\n"
            "Content-Type: text/plain; charset=us-ascii\r\n\r\n"
            % (sender, to, os.getpid(), time.time_ns())).encode("ascii")
    line = b"The quick brown fox jumps over the lazy dog, again and again. 0123456789\r\n"
    body = line * max(1, (size - len(head)) // len(line))
    return head + body


def post(a):
    if not a.host.startswith("127.") and a.host not in ("localhost", "::1"):
        raise SystemExit("loopback targets only")
    before = proc_status(a.pid)
    if not before:
        print("no process %d" % a.pid, file=sys.stderr)
        return 1
    base = sink_count(a.sink_counter)
    data = make_post(a.sender, a.list, a.size)
    try:
        with smtplib.SMTP(a.host, a.port, local_hostname="client.bench.test",
                          timeout=60) as s:
            refused = s.sendmail(a.sender, [a.list], data)
            t250 = time.monotonic()
    except (smtplib.SMTPException, OSError) as e:
        print("the post was refused: %s" % e, file=sys.stderr)
        return 1
    if refused:
        print("the post was refused: %s" % refused, file=sys.stderr)
        return 1
    expect = base + a.expect
    deadline = t250 + a.timeout
    count, first, last = base, None, t250
    next_note = t250 + PROGRESS_EVERY
    while count < expect and time.monotonic() < deadline:
        time.sleep(0.01)
        now = sink_count(a.sink_counter)
        if now != count:
            t = time.monotonic()
            if first is None:
                first = t
            count, last = now, t
        if time.monotonic() >= next_note:
            st = proc_status(a.pid)
            print("  %3.0f s: %d of %d copies at the sink, appliance RSS %.0f MB" % (
                time.monotonic() - t250, count - base, a.expect, mb(st.get("VmRSS", 0))),
                file=sys.stderr)
            next_note += PROGRESS_EVERY
    after = proc_status(a.pid)
    got = count - base
    seconds = last - t250
    peak, start = mb(after.get("VmHWM", 0)), mb(before.get("VmHWM", 0))
    text = ("%d of %d copies at the sink %.1f s after the 250 (first after %s, %.0f copies/s); "
            "appliance peak RSS %.1f MB (%.1f MB before the post, %+.1f MB), RSS at the "
            "end %.1f MB" % (
                got, a.expect, seconds, "%.1f s" % (first - t250) if first else "-",
                got / seconds if seconds > 0 else 0.0, peak, start, peak - start,
                mb(after.get("VmRSS", 0))))
    print("%.1f %.1f %.1f %s" % (seconds, peak, start, text))
    return 0 if got >= a.expect else 1


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="step", required=True)
    m = sub.add_parser("members", help="subscribe the bench members, in one transaction")
    m.add_argument("config")
    m.add_argument("list")
    m.add_argument("--members", type=int, default=10000)
    m.add_argument("--domains", type=int, default=500)
    q = sub.add_parser("post", help="post once and wait for every copy at the sink")
    q.add_argument("host")
    q.add_argument("port", type=int)
    q.add_argument("list")
    q.add_argument("--pid", type=int, required=True, help="the appliance's process")
    q.add_argument("--sink-counter", required=True)
    q.add_argument("--expect", type=int, default=10000, help="copies the sink should get")
    q.add_argument("--sender", default="poster@d000.bench")
    q.add_argument("--size", type=int, default=4096)
    q.add_argument("--timeout", type=float, default=300.0)
    a = p.parse_args(argv)
    if a.step == "members":
        if not 0 < a.domains <= 1000 or not 0 < a.members <= 99999:
            p.error("--domains: 1 to 1000, --members: 1 to 99999")
        return add_members(a)
    return post(a)


if __name__ == "__main__":
    sys.exit(main())
