#!/usr/bin/env python3
"""SELECT cost of a big folder: open + sync of a Maildir whose index exists.

    python bench/store_select.py [messages=100000] [--dir DIR] [--rounds N]

Builds a Maildir with <messages> files in cur/ (names as local delivery
writes them, with S= and W=, a third of them \\Seen) in a scratch directory
(on disk, under DIR or the system temp dir), opens it once so the index is
written, then times, in a fresh MailStore each round (as after a restart):
open + sync (what an IMAP SELECT does), and with the folder loaded: a sync
that finds nothing, a sync after one delivery into new/, and reading
flags/internal date/size of 10,000 messages (UID FETCH 1:10000 (FLAGS
INTERNALDATE RFC822.SIZE)). Prints medians. The scratch directory is removed.
"""

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from mailbox_appliance.store import MailStore, run_inline  # noqa: E402

BODY = b"Return-Path: <a@ext.test>\nSubject: bench\n\nhello\n"


def build(maildir, count):
    for sub in ("tmp", "new", "cur"):
        os.makedirs(os.path.join(maildir, sub))
    cur = os.path.join(maildir, "cur")
    size, wsize = len(BODY), len(BODY) + BODY.count(b"\n")
    t0 = 1_700_000_000
    for i in range(count):
        flags = "S" if i % 3 == 0 else ""
        name = f"{t0 + i}.Q0ABC{i:07d}R0T0.mx.example.test,S={size},W={wsize}:2,{flags}"
        fd = os.open(os.path.join(cur, name), os.O_WRONLY | os.O_CREAT, 0o600)
        os.write(fd, BODY)
        os.utime(fd, (t0 + i, t0 + i))
        os.close(fd)


def result(d):
    out = []
    d.addBoth(out.append)
    if not out:
        raise RuntimeError("did not finish synchronously")
    if hasattr(out[0], "raiseException"):
        out[0].raiseException()
    return out[0]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("messages", nargs="?", type=int, default=100_000)
    ap.add_argument("--dir", default=None)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    scratch = tempfile.mkdtemp(prefix="store-bench-", dir=args.dir)
    try:
        root = os.path.join(scratch, "mail")
        maildir = os.path.join(root, "example.test", "alice", "Maildir")
        t = time.perf_counter()
        build(maildir, args.messages)
        print(f"built {args.messages} messages in {time.perf_counter() - t:.1f} s ({scratch})")

        store = MailStore(None, root, hostname="bench", run_in_thread=run_inline)
        t = time.perf_counter()
        box = result(store.open_user("example.test", "alice").mailbox("INBOX"))
        print(f"first open, index built:        {time.perf_counter() - t:8.3f} s "
              f"({len(box)} messages, index "
              f"{os.path.getsize(os.path.join(maildir, 'mailbox_appliance.index')) >> 10} KiB)")
        del box, store

        select, nochange, delivery, fetch = [], [], [], []
        for r in range(args.rounds):
            store = MailStore(None, root, hostname="bench", run_in_thread=run_inline)
            t = time.perf_counter()
            box = result(store.open_user("example.test", "alice").mailbox("INBOX"))
            result(box.sync(take_recent=True))
            select.append(time.perf_counter() - t)
            assert len(box) >= args.messages

            time.sleep(1.1)          # let the directory times age past the racy window
            result(box.sync())       # the look after SELECT's own renames
            t = time.perf_counter()
            result(box.sync())
            nochange.append(time.perf_counter() - t)

            name = f"{int(time.time())}.Qbench{r}.mx.example.test,S={len(BODY)},W=0"
            with open(os.path.join(maildir, "new", name), "wb") as f:
                f.write(BODY)
            t = time.perf_counter()
            changes = result(box.sync())
            delivery.append(time.perf_counter() - t)
            assert len(changes.new) == 1, changes

            view = box.view
            t = time.perf_counter()
            rows = [view.info(uid) for uid in view.uids[:10_000]]
            fetch.append(time.perf_counter() - t)
            assert len(rows) == min(10_000, len(view))
            del box, store, view

        def med(xs):
            return statistics.median(xs)
        print(f"SELECT (open + sync, index exists): {med(select):8.3f} s   median of {args.rounds}")
        print(f"sync, nothing changed:              {med(nochange) * 1e3:8.2f} ms")
        print(f"sync after one delivery into new/:  {med(delivery) * 1e3:8.2f} ms")
        print(f"flags/date/size of 10,000 messages: {med(fetch) * 1e3:8.2f} ms")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
