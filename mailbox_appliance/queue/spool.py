"""The durable on-disk spool: one file per message under ``data_dir/queue/``.

Layout (plain files a person can inspect, as in Postfix):

* ``tmp/``     bodies being received; removed at start-up (never acknowledged)
* ``active/``  committed messages; a file is here only after its data was fsync'ed
* ``active/<qid>.done``  targets already delivered, one per line, fsync'ed
* ``corrupt/`` files that could not be parsed, kept for the administrator

A message file is ``MAQ1\\n``, one line of JSON envelope, then the message as
received (CRLF line ends, Received header first). Commit = fsync(file) in a
worker thread, then rename into ``active/`` and fsync(``active/``) - the directory
fsync is shared by every message committed at the same time (group commit), and
no caller hears of success before its own fsync and the shared one are done.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from dataclasses import dataclass, field

from twisted.internet import defer, threads
from twisted.logger import Logger

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

    def to_json(self) -> bytes:
        return json.dumps(self.__dict__, ensure_ascii=True, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes) -> "Envelope":
        raw = json.loads(data)
        if not isinstance(raw, dict) or not isinstance(raw.get("recipients"), list):
            raise ValueError("envelope is not an object with recipients")
        env = cls(**{k: raw[k] for k in cls.__dataclass_fields__ if k in raw})
        if not isinstance(env.sender, str) or not all(isinstance(r, str) for r in env.recipients):
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


class IncomingMessage:
    """A message being received: a tmp file that DATA chunks are appended to."""

    def __init__(self, spool, qid, envelope):
        self.spool = spool
        self.qid = qid
        self.envelope = envelope
        self.tmp_path = os.path.join(spool.tmp_dir, qid)
        self.fd = os.open(self.tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        self._chunks = []
        self._pending = 0
        self.size = 0
        self.error = None
        self.header_len = 0

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
        # Small writes are gathered; the page cache write itself is quick.
        if self._pending >= 65536:
            self._flush_chunks()

    def _flush_chunks(self):
        if not self._chunks or self.error:
            return
        try:
            os.writev(self.fd, self._chunks) if len(self._chunks) > 1 else os.write(self.fd, self._chunks[0])
        except OSError as e:
            self.error = e
        self._chunks = []
        self._pending = 0

    def abort(self):
        """Forget the message: close and remove the tmp file."""
        self._chunks = []
        if self.fd is not None:
            try:
                os.close(self.fd)
            except OSError:
                pass
            self.fd = None
        try:
            os.unlink(self.tmp_path)
        except OSError:
            pass


class Spool:
    """The queue directory, with group-committed durable writes."""

    log = Logger()

    def __init__(self, reactor, root):
        self.reactor = reactor
        self.root = root
        self.tmp_dir = os.path.join(root, "tmp")
        self.active_dir = os.path.join(root, "active")
        self.corrupt_dir = os.path.join(root, "corrupt")
        for d in (self.tmp_dir, self.active_dir, self.corrupt_dir):
            os.makedirs(d, mode=0o700, exist_ok=True)
        self._counter = itertools.count()
        self._waiting = []          # (incoming, deferred) synced, awaiting rename
        self._renaming = False

    def _thread(self, f, *a):
        return threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(), f, *a)

    def new_qid(self) -> str:
        # Time-ordered and unique within this process; O_EXCL catches the rest.
        return "%011X%04X" % (int(time.time() * 1e6) & 0xFFFFFFFFFFF,
                              next(self._counter) & 0xFFFF)

    def new_message(self, envelope: Envelope) -> IncomingMessage:
        """Open a tmp file for a message about to be received."""
        for _ in range(5):
            try:
                return IncomingMessage(self, self.new_qid(), envelope)
            except FileExistsError:
                continue
        raise SpoolError("cannot allocate a queue file")

    def commit(self, msg: IncomingMessage):
        """Make ``msg`` durable; fires with a QueuedMessage after both fsyncs."""
        msg._flush_chunks()
        if msg.error:
            err = msg.error
            msg.abort()
            return defer.fail(SpoolError(f"write failed: {err}"))
        fd, msg.fd = msg.fd, None

        def sync():
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

        d = self._thread(sync)
        done = defer.Deferred()

        def synced(_):
            self._waiting.append((msg, done))
            if not self._renaming:
                self._rename_batch()

        def failed(f):
            msg.abort()
            done.errback(SpoolError(f"fsync failed: {f.getErrorMessage()}"))

        d.addCallbacks(synced, failed)
        return done

    def _rename_batch(self):
        batch, self._waiting = self._waiting, []
        self._renaming = True

        def work():
            results = []
            for m, _ in batch:
                try:
                    os.rename(m.tmp_path, os.path.join(self.active_dir, m.qid))
                    results.append(None)
                except OSError as e:
                    results.append(e)
            _fsync_dir(self.active_dir)
            return results

        def finished(results):
            for (m, d), err in zip(batch, results):
                if err is None:
                    d.callback(QueuedMessage(
                        qid=m.qid, envelope=m.envelope,
                        path=os.path.join(self.active_dir, m.qid),
                        body_offset=m.header_len, size=m.size))
                else:
                    m.abort()
                    d.errback(SpoolError(f"rename failed: {err}"))

        def failed(f):
            for m, d in batch:
                d.errback(SpoolError(f"directory fsync failed: {f.getErrorMessage()}"))

        def next_batch(_):
            self._renaming = False
            if self._waiting:
                self._rename_batch()

        self._thread(work).addCallbacks(finished, failed).addBoth(next_batch)

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
        return self._thread(work)

    def remove(self, qmsg: QueuedMessage):
        """Drop a fully delivered message (no fsync: a survivor is re-checked)."""
        def work():
            for p in (qmsg.path, qmsg.path + ".done"):
                try:
                    os.unlink(p)
                except FileNotFoundError:
                    pass
        return self._thread(work)

    def recover(self):
        """Read every committed message left on disk (blocking; for start-up)."""
        for name in os.listdir(self.tmp_dir):
            try:
                os.unlink(os.path.join(self.tmp_dir, name))
            except OSError:
                pass
        found = []
        for name in sorted(os.listdir(self.active_dir)):
            if name.endswith(".done"):
                if not os.path.exists(os.path.join(self.active_dir, name[:-5])):
                    os.unlink(os.path.join(self.active_dir, name))
                continue
            path = os.path.join(self.active_dir, name)
            try:
                found.append(self.read(name, path))
            except Exception as e:
                self.log.error("{qid}: corrupt queue file moved to corrupt/: {why}",
                               qid=name, why=str(e))
                os.rename(path, os.path.join(self.corrupt_dir, name))
        return found

    def read(self, qid, path) -> QueuedMessage:
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
        return QueuedMessage(qid=qid, envelope=envelope, path=path, body_offset=offset,
                             size=size, done=done, recovered=True)


def _fsync_dir(path):
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
