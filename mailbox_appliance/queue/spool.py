"""The durable on-disk spool: one file per message under ``data_dir/queue/``.

Layout (plain files a person can inspect, as in Postfix):

* ``tmp/``     bodies being received; emptied when a Spool is created (never
                acknowledged)
* ``active/``  committed messages; a file is here only after its data was fsync'ed
* ``active/<qid>.done``  targets already delivered, one per line, fsync'ed
* ``active/<qid>.status`` what the queue manager knows of the attempts so far
                (JSON, see ``QueuedMessage.status_record``; informational, not
                fsync'ed: a lost one only costs a repeated delay notice)
* ``hold/``    messages the administrator put on hold, with their records
* ``corrupt/`` files that could not be parsed, kept for the administrator
* ``free/``    delivered message files kept to be overwritten by new ones

A message file is ``MAQ1\\n``, one line of JSON envelope, then the message as
received (CRLF line ends, Received header first). Commit = write, fsync(file)
and rename into ``active/`` in the spool's worker thread, then fsync(``active/``)
once for every message of the same batch (group commit, see
``durable.BatchWorker``); no caller hears of success before both fsyncs.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from dataclasses import dataclass, field

from twisted.internet import defer, threads
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailbox_appliance.durable import BatchWorker, fsync_dir

MAGIC = b"MAQ1\n"
MAX_ENVELOPE = 4 * 1024 * 1024


class SpoolError(Exception):
    """The spool could not take or read a message."""


@dataclass
class Envelope:
    """What the SMTP dialogue said about a message."""

    sender: str
    recipients: list
    arrival: float = 0.0
    client_ip: str = ""
    helo: str = ""
    protocol: str = "ESMTP"
    auth: str = ""
    # DSN (RFC 3461): RET= and ENVID= of MAIL ("" when not given), and per
    # recipient (same order as ``recipients``; empty lists when nobody gave
    # any) NOTIFY= as a comma list ("" = not given) and ORCPT= as received
    # ("rfc822;xtext", "" = not given).
    ret: str = ""
    envid: str = ""
    notify: list = field(default_factory=list)
    orcpt: list = field(default_factory=list)
    # "" for mail; "dsn" for a delivery status notice this appliance wrote;
    # "postmaster" for the copy of a failed null-sender message sent to the
    # postmaster, which is never reported on again (no bounce loops).
    notice: str = ""
    # The client declared BODY=8BITMIME (RFC 6152): passed on to the next hop.
    eight_bit: bool = False
    # The folder local delivery files the message into ("" = INBOX): "Junk"
    # when the content filters judged it spam without refusing it.
    folder: str = ""
    # Per-recipient envelope senders (same order as ``recipients``; empty
    # when every copy goes out with ``sender``): a list's distribution, whose
    # copies each carry their member's VERP address, is one queue entry.
    senders: list = field(default_factory=list)
    # The content scan judged the message and removed every
    # Authentication-Results field that claimed to be ours before adding its
    # own: only then may later stages (the list server) believe ours.
    scanned: bool = False
    # The domains whose DKIM signatures the scan verified as passing: what
    # later stages (the list server's dkim level) believe, never a header
    # field, whose text the sender can shape.
    dkim_pass: list = field(default_factory=list)

    def to_json(self) -> bytes:
        d = self.__dict__
        if not (self.ret or self.envid or self.notify or self.orcpt):
            # Most mail carries no DSN request: keep those files as they were.
            d = {k: v for k, v in d.items() if k not in ("ret", "envid", "notify", "orcpt")}
        if not self.notice:
            d = {k: v for k, v in d.items() if k != "notice"}
        if not self.eight_bit:
            d = {k: v for k, v in d.items() if k != "eight_bit"}
        if not self.folder:
            d = {k: v for k, v in d.items() if k != "folder"}
        if not self.senders:
            d = {k: v for k, v in d.items() if k != "senders"}
        if not self.scanned:
            d = {k: v for k, v in d.items() if k != "scanned"}
        if not self.dkim_pass:
            d = {k: v for k, v in d.items() if k != "dkim_pass"}
        return json.dumps(d, ensure_ascii=True, separators=(",", ":")).encode()

    def notify_of(self, idx) -> str:
        """NOTIFY= of recipient ``idx`` ("" when the client gave none)."""
        return self.notify[idx] if idx < len(self.notify) else ""

    def sender_of(self, idx) -> str:
        """The envelope sender of recipient ``idx``'s copy (VERP, else ``sender``)."""
        return (self.senders[idx] or self.sender) if idx < len(self.senders) else self.sender

    def orcpt_of(self, idx) -> str:
        """ORCPT= of recipient ``idx`` ("" when the client gave none)."""
        return self.orcpt[idx] if idx < len(self.orcpt) else ""

    @classmethod
    def from_json(cls, data: bytes) -> "Envelope":
        raw = json.loads(data)
        if not isinstance(raw, dict) or not isinstance(raw.get("recipients"), list):
            raise ValueError("envelope is not an object with recipients")
        env = cls(**{k: raw[k] for k in cls.__dataclass_fields__ if k in raw})
        # Every field is used later (log lines, Maildir names, headers): a
        # wrong type must make the file corrupt now, not crash each attempt.
        texts = (env.sender, env.client_ip, env.helo, env.protocol, env.auth, env.ret,
                 env.envid, env.notice)
        lists = (env.recipients, env.notify, env.orcpt, env.senders, env.dkim_pass)
        if not all(isinstance(t, str) for t in texts) or \
                not all(isinstance(l, list) and all(isinstance(r, str) for r in l)
                        for l in lists) or \
                isinstance(env.arrival, bool) or not isinstance(env.arrival, (int, float)) or \
                not isinstance(env.eight_bit, bool) or not isinstance(env.scanned, bool):
            raise ValueError("bad envelope types")
        return env


@dataclass
class QueuedMessage:
    """A committed message as the queue manager sees it."""

    qid: str
    envelope: Envelope
    path: str
    body_offset: int
    size: int
    done: set = field(default_factory=set)
    recovered: bool = False
    attempts: int = 0
    # The message bytes while still in memory from receipt (small messages,
    # first attempt only), so the first delivery need not read the file.
    data: bytes | None = field(default=None, repr=False)
    # When the next attempt is due (epoch seconds; 0: not scheduled).
    next_attempt: float = 0.0
    # A delay notice (DSN "delayed") went out for these recipient indexes.
    warned: set = field(default_factory=set)
    # The last result of each recipient not yet done: index -> dict with
    # "status" (deferred, queued), "reply" (the remote or local reason, e.g.
    # "451 4.3.0 try later") and "at" (epoch seconds).
    last: dict = field(default_factory=dict)
    held: bool = False

    def status_record(self) -> bytes:
        return json.dumps({"attempts": self.attempts, "next": self.next_attempt,
                           "warned": sorted(self.warned),
                           "rcpt": {str(k): v for k, v in self.last.items()}},
                          ensure_ascii=True, separators=(",", ":")).encode()

    def load_status_record(self, data: bytes):
        """Take back what ``status_record`` wrote; a damaged record is ignored."""
        try:
            raw = json.loads(data)
            attempts = int(raw.get("attempts", 0))
            nxt = float(raw.get("next", 0.0))
            warned = {int(i) for i in raw.get("warned", [])}
            last = {int(k): dict(v) for k, v in raw.get("rcpt", {}).items()
                    if isinstance(v, dict)}
        except (ValueError, TypeError, AttributeError):
            return
        self.attempts, self.next_attempt, self.warned, self.last = attempts, nxt, warned, last


class IncomingMessage:
    """A message being received.

    Its bytes are kept in memory until they pass ``SPILL``; then (and for
    every later block) they are written to the tmp file in a worker thread,
    one write after the other. A small message thus touches the disk once, in
    the commit, and the reactor thread never waits for the file system.
    """

    SPILL = 256 * 1024
    # More than this handed to the writer thread and not yet written: the
    # receiver should stop reading from the client until it drains.
    MAX_UNWRITTEN = 4 * 1024 * 1024

    def __init__(self, spool, qid, envelope):
        self.spool = spool
        self.qid = qid
        self.envelope = envelope
        self.tmp_path = os.path.join(spool.tmp_dir, qid)
        self.fd = None
        self._chunks = []
        self._pending = 0
        self._io = None             # Deferred of the last spill, if any
        self.spilled = False
        self.unwritten = 0          # bytes spilled but not yet on disk
        self._on_drained = None
        self.size = 0
        self.error = None
        self.header_len = 0
        # Set by replace() on a message already partly on disk: the tmp
        # file is written anew at commit.
        self.rewrite = False
        # Committed into hold/ (a content filter's quarantine), not delivered.
        self.hold = False

    def write_header(self):
        """Write the magic and envelope; call once recipients are final."""
        head = MAGIC + self.envelope.to_json() + b"\n"
        self.header_len = len(head)
        self._append(head)

    def write(self, data: bytes):
        self.size += len(data)
        self._append(data)

    def _append(self, data):
        if self.error:
            return
        self._chunks.append(data)
        self._pending += len(data)
        if self._pending >= self.SPILL:
            self._spill()

    def content(self):
        """Deferred bytes: the message received (without the envelope header).

        For the end-of-data checks that read the message (content filters),
        called once nothing more will be written. A message partly on disk
        is read back in a worker thread after its pending writes.
        """
        if self.error is not None:
            return defer.fail(self.error)
        if not self.spilled:
            return defer.succeed(b"".join(self._chunks[1:]))
        tail = b"".join(self._chunks)
        start = self.header_len
        out = defer.Deferred()

        def read():
            with open(self.tmp_path, "rb") as f:
                f.seek(start)
                return f.read() + tail

        def step(_):
            if self.error is not None:
                out.errback(self.error)
                return None
            r = self.spool._thread(read)
            r.addCallbacks(out.callback, out.errback)
            return r.addErrback(lambda _: None)
        self._io.addCallback(step)
        return out

    def replace(self, data: bytes, envelope=None):
        """Commit ``data`` as the message (and ``envelope``, if given) instead.

        What the content filters changed (header fields added, a milter's
        edits, recipients, the Junk folder). The bytes already on disk are
        overwritten at commit.
        """
        if envelope is not None:
            self.envelope = envelope
        head = MAGIC + self.envelope.to_json() + b"\n"
        self.header_len = len(head)
        self.size = len(data)
        self._chunks = [head, data]
        self._pending = len(head) + len(data)
        self.rewrite = self.spilled

    @property
    def backlogged(self) -> bool:
        return self.unwritten > self.MAX_UNWRITTEN

    def when_drained(self, callback):
        """Call ``callback`` once the backlog of spilled bytes is small again."""
        if not self.backlogged:
            callback()
        else:
            self._on_drained = callback

    def _spill(self):
        chunks, self._chunks, self._pending = self._chunks, [], 0
        self.spilled = True
        size = sum(map(len, chunks))
        self.unwritten += size

        def work():
            if self.error is None:
                self._write_all(chunks)

        def failed(f):
            self.error = f.value

        def written(_):
            self.unwritten -= size
            if self._on_drained is not None and not self.backlogged:
                callback, self._on_drained = self._on_drained, None
                callback()
        step = lambda _=None: self.spool._thread(work).addErrback(failed).addCallback(written)
        self._io = step() if self._io is None else self._io.addCallback(step)

    def _write_all(self, chunks):
        """Write chunks to the tmp file (worker thread); opens it on first use."""
        if self.fd is None:
            self.fd = os.open(self.tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        if not chunks:
            return
        total = sum(map(len, chunks))
        done = os.writev(self.fd, chunks)
        if done < total:
            rest = memoryview(b"".join(chunks))[done:]
            while rest:
                rest = rest[os.write(self.fd, rest):]

    def finish_in_thread(self, final_path, recycled=None):
        """Write the tail, fsync, close and rename into the queue (worker thread).

        ``recycled`` names a spare file of ``free/`` to overwrite instead of
        creating a new one (see Spool.remove).
        """
        if self.error is not None:
            self._close()
            raise self.error
        chunks, self._chunks = self._chunks, []
        source = self.tmp_path
        if self.fd is None and recycled is not None:
            try:
                self.fd = os.open(recycled, os.O_WRONLY | os.O_TRUNC)
                source = recycled
            except OSError:
                pass
        try:
            if self.rewrite and self.fd is not None:
                os.ftruncate(self.fd, 0)
                os.lseek(self.fd, 0, os.SEEK_SET)
            self._write_all(chunks)
            os.fsync(self.fd)
        finally:
            self._close()
        os.rename(source, final_path)

    def _close(self):
        if self.fd is not None:
            fd, self.fd = self.fd, None
            try:
                os.close(fd)
            except OSError:
                pass

    def abort(self):
        """Forget the message: close and remove the tmp file, if any."""
        self._chunks = []
        self.error = self.error or SpoolError("aborted")

        def cleanup(_=None):
            if self.fd is not None:
                try:
                    os.close(self.fd)
                except OSError:
                    pass
                self.fd = None
            _unlink_quietly(self.tmp_path)
        if self._io is not None:
            self._io.addCallback(lambda _: self.spool._thread(cleanup)).addErrback(
                lambda _: cleanup())
        elif self.fd is not None:
            cleanup()


class Spool:
    """The queue directory, with group-committed durable writes."""

    log = Logger()
    MAX_FREE = 1024

    def __init__(self, reactor, root, worker=None):
        self.reactor = reactor
        self.root = root
        # Commits, done-records and removals: batched, one thread.
        self.worker = worker or BatchWorker(reactor, "spool")
        self.tmp_dir = os.path.join(root, "tmp")
        self.active_dir = os.path.join(root, "active")
        self.corrupt_dir = os.path.join(root, "corrupt")
        self.free_dir = os.path.join(root, "free")
        self.hold_dir = os.path.join(root, "hold")
        for d in (self.tmp_dir, self.active_dir, self.corrupt_dir, self.free_dir,
                  self.hold_dir):
            os.makedirs(d, mode=0o700, exist_ok=True)
        self._counter = itertools.count()
        self._free = []             # spare files in free/, to be overwritten
        self._freeing = 0
        self._free_names = itertools.count(int(time.time() * 1000))
        self._startup_cleanup()

    def _startup_cleanup(self):
        """Drop the bodies a previous run never acknowledged; list the spares.

        Done here, before this spool takes any message, and not in
        ``recover()``: recovery runs in a thread while the listeners may
        already receive, and must neither unlink the tmp file of a message
        being received nor race the reactor thread over the list of spares.
        """
        for name in os.listdir(self.tmp_dir):
            _unlink_quietly(os.path.join(self.tmp_dir, name))
        spares = sorted(os.path.join(self.free_dir, n) for n in os.listdir(self.free_dir))
        for extra in spares[self.MAX_FREE:]:
            _unlink_quietly(extra)
        self._free = spares[:self.MAX_FREE]

    def _thread(self, f, *a):
        return threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(), f, *a)

    def new_qid(self) -> str:
        # Time-ordered and unique within this process; O_EXCL catches the rest.
        return "%011X%04X" % (int(time.time() * 1e6) & 0xFFFFFFFFFFF,
                              next(self._counter) & 0xFFFF)

    def new_message(self, envelope: Envelope) -> IncomingMessage:
        """A new message to receive; nothing touches the disk until it grows."""
        return IncomingMessage(self, self.new_qid(), envelope)

    def commit(self, msg: IncomingMessage):
        """Make ``msg`` durable; fires with a QueuedMessage after both fsyncs."""
        folder = self.hold_dir if msg.hold else self.active_dir
        final = os.path.join(folder, msg.qid)
        data = None if msg.spilled and not msg.rewrite else b"".join(msg._chunks[1:])

        def durable(_):
            return QueuedMessage(qid=msg.qid, envelope=msg.envelope, path=final,
                                 body_offset=msg.header_len, size=msg.size, data=data,
                                 held=msg.hold)

        recycled = self._free.pop() if self._free and not msg.spilled else None

        def failed(f):
            _unlink_quietly(msg.tmp_path)
            if recycled:
                _unlink_quietly(recycled)
            # When only the fsync of active/ failed, the file is already
            # there: the client hears 4xx and sends again, so this copy must
            # not be found and delivered by a later restart as well.
            _unlink_quietly(final)
            raise SpoolError(f"commit failed: {f.getErrorMessage()}")

        def job():
            msg.finish_in_thread(final, recycled)
            return None, folder

        def finish(_=None):
            return self.worker.submit(job)
        d = finish() if msg._io is None else msg._io.addCallback(finish)
        return d.addCallbacks(durable, failed)

    def mark_done(self, qmsg: QueuedMessage, keys):
        """Record delivered targets durably so a restart does not repeat them."""
        qmsg.done.update(keys)
        path = qmsg.path + ".done"
        data = "".join(k.replace("\n", " ") + "\n" for k in keys).encode()

        def work():
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            return None, self.active_dir
        return self.worker.submit(work)

    def remove(self, qmsg: QueuedMessage):
        """Drop a fully delivered message (no fsync: a survivor is re-checked).

        The file is not unlinked but moved to ``free/`` and later overwritten
        by a new message: creating and deleting an inode per message is what
        costs most on some file systems (an ext4 without journal scans past
        every recently deleted inode for each new one).
        """
        spare = None
        if len(self._free) + self._freeing < self.MAX_FREE:
            spare = os.path.join(self.free_dir, "%X" % next(self._free_names))
            self._freeing += 1

        def work():
            # The message first, its done-record after: a crash in between
            # leaves an orphan record (dropped by recover), never a message
            # without the record of what was already delivered.
            moved = None
            if spare is not None:
                try:
                    os.rename(qmsg.path, spare)
                    moved = spare
                except FileNotFoundError:
                    pass
                except OSError:
                    # free/ cannot take it (full directory, ...): just drop it.
                    _remove_file(qmsg.path)
            else:
                _remove_file(qmsg.path)
            _unlink_quietly(qmsg.path + ".done")
            _unlink_quietly(qmsg.path + ".status")
            return moved, None

        def moved(result):
            if spare is not None:
                self._freeing -= 1
            if isinstance(result, Failure):
                return result
            if result:
                self._free.append(result)
        return self.worker.submit(work).addBoth(moved)

    def write_status(self, qmsg: QueuedMessage):
        """Save the attempt record of ``qmsg`` for the admin command and restarts."""
        data = qmsg.status_record()
        path = qmsg.path + ".status"

        def work():
            tmp = path + ".tmp"
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
            return None, None
        return self.worker.submit(work)

    def move(self, qmsg: QueuedMessage, to_hold: bool):
        """Move a message and its records between ``active/`` and ``hold/``.

        Fires with the message, its ``path`` changed, once the move is
        durable (both directories fsync'ed).
        """
        src_dir, dst_dir = ((self.active_dir, self.hold_dir) if to_hold
                            else (self.hold_dir, self.active_dir))
        name = os.path.basename(qmsg.path)
        dst = os.path.join(dst_dir, name)

        def work():
            # Records first: a crash between leaves a message whose records
            # wait beside it in the other folder, and recover() takes records
            # from either place.
            for ext in (".done", ".status"):
                try:
                    os.rename(os.path.join(src_dir, name + ext), dst + ext)
                except FileNotFoundError:
                    pass
            os.rename(os.path.join(src_dir, name), dst)
            fsync_dir(src_dir)
            return None, dst_dir

        def moved(_):
            qmsg.path = dst
            qmsg.held = to_hold
            return qmsg
        return self.worker.submit(work).addCallback(moved)

    def delete(self, qmsg: QueuedMessage):
        """Remove a message for good, without delivering it (the admin's delete)."""
        def work():
            _remove_file(qmsg.path)
            for ext in (".done", ".status"):
                _unlink_quietly(qmsg.path + ext)
            return None, os.path.dirname(qmsg.path)
        return self.worker.submit(work)

    def held(self):
        """Every message in ``hold/`` (blocking; for start-up and the admin command)."""
        return self._read_folder(self.hold_dir, held=True)

    def recover(self):
        """Read every committed message left on disk (blocking; for start-up).

        Uncommitted bodies in tmp/ were already dropped when the spool was
        created. A file that cannot be parsed is moved to corrupt/ with a log
        line, and recovery goes on with the others.
        """
        return self._read_folder(self.active_dir)

    def _read_folder(self, folder, held=False):
        found = []
        for name in sorted(os.listdir(folder)):
            path = os.path.join(folder, name)
            base, dot, ext = name.partition(".")
            if dot:
                if ext in ("done", "status") and not os.path.exists(os.path.join(folder, base)):
                    other = self.active_dir if held else self.hold_dir
                    if os.path.exists(os.path.join(other, base)):
                        # A move between active/ and hold/ was cut short.
                        os.replace(path, os.path.join(other, name))
                    else:
                        _unlink_quietly(path)
                continue
            other = self.active_dir if held else self.hold_dir
            for ext in (".done", ".status"):
                # A move between active/ and hold/ cut short by a crash left
                # the records (moved first) in the other folder: they belong
                # with the message, or what was delivered would be again.
                try:
                    os.replace(os.path.join(other, name + ext), path + ext)
                except FileNotFoundError:
                    pass
            try:
                m = self.read(name, path)
                m.held = held
                found.append(m)
            except FileNotFoundError:
                continue            # delivered and removed while we listed
            except Exception as e:
                self._quarantine(name, path, e)
        return found

    def _quarantine(self, name, path, why):
        try:
            os.rename(path, os.path.join(self.corrupt_dir, name))
        except FileNotFoundError:
            return
        except OSError as e:
            self.log.error("{qid}: corrupt queue file ({why}) could not be moved to "
                           "corrupt/: {error}; left in place", qid=name, why=str(why),
                           error=str(e))
            return
        try:
            # Its done-record goes along, for the administrator.
            os.rename(path + ".done", os.path.join(self.corrupt_dir, name + ".done"))
        except OSError:
            pass
        self.log.error("{qid}: corrupt queue file moved to corrupt/: {why}",
                       qid=name, why=str(why))

    def read(self, qid, path) -> QueuedMessage:
        return read_queue_file(qid, path)


def read_queue_file(qid, path) -> QueuedMessage:
    """Parse one committed queue file and its done-records (blocking)."""
    with open(path, "rb") as f:
        if f.read(len(MAGIC)) != MAGIC:
            raise SpoolError("bad magic")
        line = f.readline(MAX_ENVELOPE)
        if not line.endswith(b"\n"):
            raise SpoolError("truncated envelope")
        envelope = Envelope.from_json(line)
        offset = f.tell()
        size = os.fstat(f.fileno()).st_size - offset
    done = set()
    try:
        with open(path + ".done", "rb") as f:
            done = {l.decode("utf-8", "replace") for l in f.read().split(b"\n") if l}
    except FileNotFoundError:
        pass
    m = QueuedMessage(qid=qid, envelope=envelope, path=path, body_offset=offset,
                      size=size, done=done, recovered=True)
    try:
        with open(path + ".status", "rb") as f:
            m.load_status_record(f.read(65536))
    except FileNotFoundError:
        pass
    return m


def _remove_file(path):
    """Unlink ``path``; a file that is already gone is fine, other errors are not."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _unlink_quietly(path):
    try:
        os.unlink(path)
    except OSError:
        pass
