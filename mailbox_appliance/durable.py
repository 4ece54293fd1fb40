"""Blocking disk work done in batches, off the reactor thread.

``BatchWorker`` owns one or a few threads. Callers submit small blocking jobs (write and
fsync a queue file and rename it; write a Maildir file; unlink); the thread
takes the jobs that are waiting, runs them one after the other, then fsyncs
each directory those jobs changed exactly once, and only then answers all of
them with one wake-up of the reactor. This is group commit: under load one
directory fsync and one thread hand-off cover many messages, and no caller
hears of success before the fsync of its file and of its directory.
"""

from __future__ import annotations

import os
import threading

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure


class BatchWorker:
    """Threads running submitted jobs in batches with shared directory fsyncs.

    With several threads, batches run side by side, so their fsyncs can
    share the file system's journal commits too.
    """

    log = Logger()

    def __init__(self, reactor, name, threads=1, max_batch=64):
        self.reactor = reactor
        self.name = name
        self.nthreads = threads
        self.max_batch = max_batch
        self._cond = threading.Condition()
        self._jobs = []
        self._threads = []
        self._stopping = False

    def start(self):
        if not self._threads:
            self._stopping = False
            self._threads = [threading.Thread(target=self._loop, name=f"{self.name}-{i}",
                                              daemon=True) for i in range(self.nthreads)]
            for t in self._threads:
                t.start()

    def stop(self):
        """Finish the jobs already submitted, then end the threads."""
        if not self._threads:
            return
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        for t in self._threads:
            t.join()
        self._threads = []
        # Jobs submitted after the thread was told to stop are failed, not lost.
        jobs, self._jobs = self._jobs, []
        for job in jobs:
            job[2].errback(Failure(RuntimeError(f"{self.name} is stopped")))

    def submit(self, fn, *args):
        """Run ``fn(*args)`` in the worker thread.

        ``fn`` returns ``(value, directory)``: the directory (or None) whose
        entries it changed and that must be fsync'ed before the caller hears
        ``value``.
        """
        if not self._threads:
            self.start()
        d = defer.Deferred()
        with self._cond:
            self._jobs.append((fn, args, d))
            self._cond.notify()
        return d

    def _loop(self):
        while True:
            with self._cond:
                while not self._jobs and not self._stopping:
                    self._cond.wait()
                if not self._jobs:
                    return
                batch = self._jobs[:self.max_batch]
                del self._jobs[:self.max_batch]
            try:
                results = self._run_batch(batch)
            except BaseException:
                # Never leave a caller waiting: a batch that broke fails whole.
                results = [Failure()] * len(batch)
            self.reactor.callFromThread(self._answer, batch, results)

    @staticmethod
    def _run_batch(batch):
        results, dirs = [], {}
        for i, (fn, args, _) in enumerate(batch):
            try:
                value, directory = fn(*args)
            except BaseException:
                results.append(Failure())
                continue
            results.append(value)
            if directory:
                dirs.setdefault(directory, []).append(i)
        for directory, members in dirs.items():
            try:
                fsync_dir(directory)
            except BaseException:
                f = Failure()
                for i in members:
                    results[i] = f
        return results

    @staticmethod
    def _answer(batch, results):
        for (_, _, d), result in zip(batch, results):
            if isinstance(result, Failure):
                d.errback(result)
            else:
                d.callback(result)


def fsync_dir(path):
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_all(fd, data):
    """Write every octet of ``data`` to ``fd`` (os.write may write less)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def unlink_quietly(path):
    try:
        os.unlink(path)
    except OSError:
        pass


def write_synced(path, write, mode=0o600, exclusive=True, mtime=None):
    """Create ``path``, let ``write(fd)`` fill it, fsync it; returns write's result.

    On any failure the file is closed and removed, so nothing half-written
    is left for a later rename to publish.
    """
    flags = os.O_WRONLY | os.O_CREAT | (os.O_EXCL if exclusive else os.O_TRUNC)
    fd = os.open(path, flags, mode)
    try:
        result = write(fd)
        os.fsync(fd)
        if mtime is not None:
            os.utime(fd, (mtime, mtime))
    except BaseException:
        os.close(fd)
        unlink_quietly(path)
        raise
    os.close(fd)
    return result


def replace_file(path, data, mode=0o600, sync_dir=True):
    """Put ``data`` at ``path`` so a crash leaves the old file or the new one.

    Written to ``path.tmp`` and fsync'ed, renamed over ``path``, and the
    folder fsync'ed (unless ``sync_dir`` is false).
    """
    tmp = path + ".tmp"
    write_synced(tmp, lambda fd: write_all(fd, data), mode, exclusive=False)
    os.replace(tmp, path)
    if sync_dir:
        fsync_dir(os.path.dirname(path) or ".")
