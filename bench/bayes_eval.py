"""How well the Bayesian filter separates spam from ham, and how fast it judges.

    python bench/bayes_eval.py --corpus DIR [--train-share 0.7] [--seed S] [--db PATH]

DIR holds ``spam/`` and ``ham/``, one raw message per file. Each file goes
to the training or the test part by a hash of its name (deterministic, the
same split on every run, about ``--train-share`` for training). The
training part is learned into a fresh token database (the appliance's own
code and SQL: ``bayes_train.learn_raw``), then every test message is
classified as the filter would (tokenise, look up, combine) and counted at
the BAYES_95 threshold (probability >= 0.95, what the filter scores as
BAYES_95 or BAYES_99) and at the BAYES_99 one (>= 0.99).

Printed: spam recall and ham false-positive rate at both thresholds, the
unsure messages, the CPU time per classification (all messages, and
those of 8 to 12 KiB), and the time of security.md H6's hostile
messages. Not a test: nothing here fails.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mailbox_appliance.antispam import bayes, bayes_store, bayes_train  # noqa: E402
from mailbox_appliance.antispam.message import ScannedMessage  # noqa: E402


def split(names, share, seed=""):
    """(training, test) names, by a hash of each name (and ``seed``)."""
    train, test = [], []
    for n in names:
        h = int.from_bytes(hashlib.sha256((seed + n).encode()).digest()[:4], "big") / 2 ** 32
        (train if h < share else test).append(n)
    return train, test


def load(corpus, kind):
    d = os.path.join(corpus, kind)
    names = sorted(n for n in os.listdir(d) if not n.startswith("."))
    return {n: open(os.path.join(d, n), "rb").read() for n in names}


def hostile(conn):
    """security.md H6: parse + classification time of the hostile cases."""
    import base64
    import random

    def message(body):
        return b"From: a@b.example\r\nSubject: x\r\nContent-Type: text/plain\r\n\r\n" + body
    rnd = random.Random(6)
    cases = (("one 5 MB token", message(b"x" * 5 * 1024 * 1024)),
             ("500,000 unique tokens",
              message(" ".join(f"{i:x}z" for i in range(500000)).encode())),
             ("10 MB of random base64",
              message(base64.encodebytes(rnd.randbytes(7 * 1024 * 1024)))))
    for name, raw in cases:
        t0 = time.process_time()
        c = bayes.classify_in_thread(conn, ScannedMessage.parse(raw), "", 0, 0)
        print(f"hostile: {name}: {time.process_time() - t0:.3f} s CPU (parse included), "
              f"{c.tokens} tokens")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--corpus", required=True, help="directory with spam/ and ham/")
    p.add_argument("--train-share", type=float, default=0.7)
    p.add_argument("--seed", default="", help="another split of the corpus (any text)")
    p.add_argument("--db", default=None, help="database file (default: a temporary one)")
    p.add_argument("--show-errors", action="store_true", help="list misclassified files")
    args = p.parse_args(argv)

    spam, ham = load(args.corpus, "spam"), load(args.corpus, "ham")
    spam_train, spam_test = split(spam, args.train_share, args.seed)
    ham_train, ham_test = split(ham, args.train_share, args.seed)
    tmp = None
    if args.db is None:
        tmp = tempfile.mkdtemp(prefix="bayes-eval-")
        args.db = os.path.join(tmp, "bayes.sqlite3")
    conn = bayes_store.connect(args.db)

    started = time.process_time()
    # Interleaved, as real training would be.
    order = [(n, True) for n in spam_train] + [(n, False) for n in ham_train]
    order.sort(key=lambda x: hashlib.sha256(x[0].encode() + bytes([x[1]])).digest())
    for n, is_spam in order:
        bayes_train.learn_raw(conn, "", (spam if is_spam else ham)[n], is_spam)
    trained = time.process_time() - started
    nspam, nham = bayes_store.user_totals(conn, "")
    print(f"trained on {nspam} spam + {nham} ham in {trained:.1f} s CPU; "
          f"{bayes_store.count_tokens(conn)} tokens")

    results = {True: [], False: []}
    cpu = 0.0
    octets = 0
    near_10k = []           # CPU of the test messages of 8 to 12 KiB
    for is_spam, names, pool in ((True, spam_test, spam), (False, ham_test, ham)):
        for n in names:
            raw = pool[n]
            msg = ScannedMessage.parse(raw)
            t1 = time.process_time()
            c = bayes.classify_in_thread(conn, msg, "", 0, 0)
            spent = time.process_time() - t1
            cpu += spent
            if 8192 <= len(raw) <= 12288:
                near_10k.append(spent)
            octets += len(raw)
            results[is_spam].append((c.probability, n))
    hostile(conn)
    conn.close()

    total = len(results[True]) + len(results[False])
    print(f"tested on {len(results[True])} spam + {len(results[False])} ham")
    for threshold, label in ((bayes.SPAM_THRESHOLD, "BAYES_95 (p >= 0.95)"),
                             (0.99, "BAYES_99 (p >= 0.99)")):
        caught = sum(1 for p, _ in results[True] if p >= threshold)
        fps = [n for p, n in results[False] if p >= threshold]
        print(f"{label}: spam recall {100.0 * caught / len(results[True]):.2f}% "
              f"({caught}/{len(results[True])}), ham false positives "
              f"{100.0 * len(fps) / len(results[False]):.2f}% ({len(fps)}/{len(results[False])})")
        if args.show_errors:
            print("  false positives:", " ".join(fps))
            print("  missed spam:", " ".join(n for p, n in results[True] if p < threshold))
    unsure = sum(1 for k in results for p, _ in results[k] if 0.2 <= p < 0.8)
    print(f"unsure (0.2 <= p < 0.8): {unsure}")
    per = cpu / total
    print(f"classification CPU (tokenise + look up + combine, parse excluded, no cache): "
          f"{per * 1000:.2f} ms per message (mean size {octets / total / 1024:.1f} KiB); "
          f"{1000 * sum(near_10k) / max(1, len(near_10k)):.2f} ms per message of 8-12 KiB "
          f"({len(near_10k)} of them)")
    if tmp:
        for suffix in ("", "-wal", "-shm"):
            try:
                os.unlink(args.db + suffix)
            except OSError:
                pass
        os.rmdir(tmp)


if __name__ == "__main__":
    main()
