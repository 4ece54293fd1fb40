"""Teaching the Bayesian filter: from mailboxes on disk and from users' actions.

``train_command`` is ``mailappliance bayes train --spam|--ham PATH [--user
ADDRESS]``: it reads a Maildir (``cur/`` and ``new/``), a directory of
message files, an mbox file or one message file, and learns every message
as spam or as ham, for the global database or for one user. It works on
the database file directly (WAL mode: safe beside the running appliance).

``MoveLearner`` learns from what users do over IMAP: a message moved (or
copied) into the Junk folder is learned as spam for that user; one moved
out of Junk into any folder but Trash is learned as ham, and if it had been
learned as spam before, that is untrained first. The IMAP server calls its
``on_moved`` once per message after the command has been answered;
learning runs in the token database's thread and a failure there is only
logged: it never fails the user's command.

A message is known by its digest (Message-ID and body), so learning the
same message again, from a Maildir or from a second move, changes nothing.
"""

from __future__ import annotations

import hashlib
import os
import re

from twisted.internet import defer
from twisted.logger import Logger

from mailbox_appliance.antispam import bayes, bayes_store
from mailbox_appliance.antispam.message import ScannedMessage, split_message

log = Logger(namespace="mailbox_appliance.antispam.bayes_train")

EXIT_OK, EXIT_FAILED, EXIT_CONFIG = 0, 1, 2
MAX_MESSAGE = 4 * 1024 * 1024   # octets of a message read for learning
MAX_FILES = 1000000             # files of one directory looked at
JUNK, TRASH = "Junk", "Trash"

_MESSAGE_ID = re.compile(rb"(?im)^message-id:[ \t]*([^\r\n]{1,500})")


def message_digest(raw: bytes) -> bytes:
    """What identifies a message for learning: its Message-ID and its body.

    Header fields added on the way (Received:, our X-Spam fields, the
    mbox From_ line) do not change it; line ends are normalised, since a
    Maildir file has LF and the same message over IMAP has CRLF.
    """
    block, body = split_message(raw)
    m = _MESSAGE_ID.search(block)
    h = hashlib.blake2b(digest_size=16)
    h.update((m.group(1).strip() if m else b"").lower() + b"\0")
    h.update(body.replace(b"\r\n", b"\n")[:MAX_MESSAGE])
    return h.digest()


def message_tokens(raw: bytes):
    """(token ids, digest) of a raw message (CPU work: call it in a thread)."""
    raw = raw[:MAX_MESSAGE]
    message = ScannedMessage.parse(raw)
    return bayes.token_ids(bayes.tokenise(message)), message_digest(raw)


def learn_raw(conn, user, raw, spam, now=None):
    """Learn one raw message on ``conn``: "learned", "relearned" or "already"."""
    ids, digest = message_tokens(raw)
    return bayes_store.learn(conn, user, ids, digest, spam, now)


def forget_raw(conn, user, raw):
    """Untrain one raw message on ``conn``; True if it had been learned."""
    ids, digest = message_tokens(raw)
    return bayes_store.forget(conn, user, ids, digest)


# -- reading mailboxes ------------------------------------------------------------------

def _read_file(path):
    with open(path, "rb") as f:
        return f.read(MAX_MESSAGE)


def is_mbox(path) -> bool:
    with open(path, "rb") as f:
        return f.read(5) == b"From "


def mbox_messages(path):
    """The messages of an mbox file, one at a time (each at most MAX_MESSAGE octets).

    A message starts at a ``From `` line after a blank line (or at the top);
    ``>From `` quoting (mboxrd/mboxo) is undone.
    """
    current, size, blank = None, 0, True
    with open(path, "rb") as f:
        for line in f:
            if line.startswith(b"From ") and blank:
                if current is not None:
                    yield b"".join(current)
                current, size = [], 0
                blank = False
                continue
            blank = line in (b"\n", b"\r\n")
            if current is None:
                continue
            if re.match(rb">+From ", line):
                line = line[1:]
            if size + len(line) <= MAX_MESSAGE:
                current.append(line)
                size += len(line)
    if current is not None:
        yield b"".join(current)


def messages_at(path):
    """(name, raw bytes) of every message at ``path``: a Maildir, a directory
    of message files, an mbox file or one message file. Unreadable files
    yield (name, None)."""
    if os.path.isdir(path):
        subdirs = [os.path.join(path, d) for d in ("cur", "new")]
        dirs = [d for d in subdirs if os.path.isdir(d)] or [path]
        for d in dirs:
            with os.scandir(d) as it:
                names = sorted(e.name for _, e in zip(range(MAX_FILES), it)
                               if not e.name.startswith(".") and e.is_file())
            for name in names:
                full = os.path.join(d, name)
                try:
                    yield full, _read_file(full)
                except OSError:
                    yield full, None
        return
    if is_mbox(path):
        for i, raw in enumerate(mbox_messages(path)):
            yield f"{path}#{i + 1}", raw
        return
    yield path, _read_file(path)


def _open_for_writing(path):
    """The database, created if needed with the owner of data_dir (the appliance's user)."""
    from mailbox_appliance.state import open_for_writing
    return open_for_writing(path, bayes_store.connect)


def train_command(config, path, spam, user=None):
    """``mailappliance bayes train``: (exit code, text to print)."""
    if not os.path.exists(path):
        return EXIT_FAILED, f"bayes train: {path}: no such file or directory"
    who = bayes.user_key(user) if user else ""
    if user and ("@" not in who or any(c.isspace() for c in who)):
        return EXIT_FAILED, f"bayes train: --user {user!r}: expected an address"
    db = bayes_store.path_of(config)
    try:
        conn = _open_for_writing(db)
    except (OSError, bayes_store.sqlite3.Error) as e:
        return EXIT_FAILED, f"bayes train: {db}: {e}"
    counts = {"learned": 0, "relearned": 0, "already": 0, "unreadable": 0}
    try:
        for name, raw in messages_at(path):
            if not raw or not raw.strip():
                counts["unreadable"] += 1
                continue
            counts[learn_raw(conn, who, raw, spam)] += 1
        nspam, nham = bayes_store.user_totals(conn, who)
    except (OSError, bayes_store.sqlite3.Error) as e:
        return EXIT_FAILED, f"bayes train: {e}"
    finally:
        conn.close()
    kind = "spam" if spam else "ham"
    lines = [f"{counts['learned'] + counts['relearned']} message(s) learned as {kind} "
             f"for {who or 'everybody (global)'}"
             + (f" ({counts['relearned']} of them untrained from the other class first)"
                if counts["relearned"] else "")]
    if counts["already"]:
        lines.append(f"{counts['already']} already learned as {kind}")
    if counts["unreadable"]:
        lines.append(f"{counts['unreadable']} empty or unreadable file(s) skipped")
    lines.append(f"{who or 'global'} database: {nspam} spam and {nham} ham learned")
    b = config.antispam.bayes
    if who and not b.per_user:
        lines.append("note: [antispam.bayes] per_user is off: per-user tokens are not used")
    if not who and (nspam < b.min_spam or nham < b.min_ham):
        lines.append(f"the filter gives no opinion until {b.min_spam} spam and "
                     f"{b.min_ham} ham are learned")
    return EXIT_OK, "\n".join(lines)


# -- learning from users' actions ------------------------------------------------------

def verdict_of_move(source, dest, junk=JUNK, trash=TRASH):
    """True (learn as spam), False (as ham) or None for a move from ``source`` to ``dest``."""
    if source == dest:
        return None
    if dest == junk:
        return True
    if source == junk and dest != trash:
        return False
    return None


class MoveLearner:
    """Learns from messages users move into or out of Junk (module docstring).

    ``on_moved(domain, local, source, dest, data)`` is the IMAP server's
    hook: it returns a Deferred that fires (with the learning's outcome or
    None) when the message has been learned, and never fails. With
    ``per_user`` the user's own tokens learn, else the global ones.
    At most ``max_pending`` messages wait at once; more are dropped (logged).
    """

    def __init__(self, store, per_user=True, junk=JUNK, trash=TRASH, max_pending=1000):
        self.store = store
        self.per_user = per_user
        self.junk = junk
        self.trash = trash
        self.max_pending = max_pending
        self.pending = 0

    def wants(self, source, dest) -> bool:
        """Whether a move from ``source`` to ``dest`` teaches anything."""
        return verdict_of_move(source, dest, self.junk, self.trash) is not None

    def on_moved(self, domain, local, source, dest, data):
        spam = verdict_of_move(source, dest, self.junk, self.trash)
        if spam is None or not data:
            return defer.succeed(None)
        if self.pending >= self.max_pending:
            log.warn("bayes: learning queue full, a message moved by {local}@{domain} "
                     "was not learned", local=local, domain=domain)
            return defer.succeed(None)
        user = bayes.user_key(f"{local}@{domain}") if self.per_user else ""
        self.pending += 1
        d = self.store.learn(user, bytes(data), spam)

        def done(outcome):
            log.info("bayes: message moved from {source} to {dest} by {user} {outcome} "
                     "as {kind}", source=source, dest=dest, user=f"{local}@{domain}",
                     outcome=outcome, kind="spam" if spam else "ham")
            return outcome

        def failed(f):
            if f.check(RuntimeError) and "not open" in str(f.value):
                # The database closed (the appliance is stopping): this one
                # message goes unlearned; nothing is wrong.
                log.warn("bayes: a message moved by {user} was not learned: the database "
                         "closed first", user=f"{local}@{domain}")
                return None
            log.failure("bayes: learning a message moved by {user} failed", f,
                        user=f"{local}@{domain}")
            return None

        def finished(result):
            self.pending -= 1
            return result
        return d.addCallbacks(done, failed).addBoth(finished)


def move_learner(config, store):
    """The IMAP hook's learner for the running ``store``, or None when Bayes is off."""
    if store is None or not config.antispam.bayes.enabled:
        return None
    return MoveLearner(store, per_user=config.antispam.bayes.per_user)
