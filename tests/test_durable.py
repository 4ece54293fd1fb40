"""BatchWorker: jobs in batches on a thread, one directory fsync per batch, answers in order."""

import errno
import os
import threading

from twisted.internet import defer, reactor
from twisted.trial import unittest

from mailbox_appliance import durable
from mailbox_appliance.durable import BatchWorker


class BatchWorkerTests(unittest.TestCase):

    timeout = 15

    def setUp(self):
        self.synced = []
        self.patch(durable, "fsync_dir", self.synced.append)

    def worker(self, **kw):
        w = BatchWorker(reactor, "test-io", **kw)
        self.addCleanup(w.stop)
        return w

    def hold(self, w):
        """Occupy the worker's thread until the returned event is set.

        Jobs submitted meanwhile wait and are then taken as one batch.
        """
        started, release = threading.Event(), threading.Event()

        def blocker():
            started.set()
            release.wait(10)
            return "held", None
        d = w.submit(blocker)
        self.assertTrue(started.wait(10))
        return d, release

    @defer.inlineCallbacks
    def test_runs_jobs_in_a_thread_and_answers_in_order(self):
        w = self.worker()
        ran = []

        def job(i):
            ran.append((i, threading.current_thread().name))
            return i * 10, None
        results = yield defer.gatherResults([w.submit(job, i) for i in range(50)])
        self.assertEqual(results, [i * 10 for i in range(50)])
        self.assertEqual([i for i, _ in ran], list(range(50)))
        self.assertTrue(all(name.startswith("test-io-") for _, name in ran))
        self.assertNotIn(threading.current_thread().name, {n for _, n in ran})

    @defer.inlineCallbacks
    def test_callbacks_fire_in_submission_order(self):
        w = self.worker()
        d0, release = self.hold(w)
        fired = []
        ds = []
        for i in range(10):
            d = w.submit(lambda i=i: (i, "/dir/%d" % (i % 3)))
            d.addCallback(fired.append)
            ds.append(d)
        release.set()
        yield defer.gatherResults([d0] + ds)
        self.assertEqual(fired, list(range(10)))

    @defer.inlineCallbacks
    def test_one_directory_fsync_per_directory_per_batch(self):
        w = self.worker()
        d0, release = self.hold(w)
        ds = [w.submit(lambda i=i: (i, "/a" if i % 2 else "/b")) for i in range(20)]
        ds.append(w.submit(lambda: ("no dir", None)))
        release.set()
        yield defer.gatherResults([d0] + ds)
        self.assertEqual(sorted(self.synced), ["/a", "/b"])

    @defer.inlineCallbacks
    def test_answer_only_after_the_directory_fsync(self):
        w = self.worker()
        order = []
        self.patch(durable, "fsync_dir", lambda p: order.append(("fsync", p)))
        d = w.submit(lambda: (order.append("job") or "v", "/d"))
        d.addCallback(lambda v: order.append(("answer", v)))
        yield d
        self.assertEqual(order, ["job", ("fsync", "/d"), ("answer", "v")])

    @defer.inlineCallbacks
    def test_max_batch_bounds_a_batch(self):
        w = self.worker(max_batch=4)
        d0, release = self.hold(w)
        ds = [w.submit(lambda: (None, "/a")) for _ in range(10)]
        release.set()
        yield defer.gatherResults([d0] + ds)
        self.assertEqual(self.synced, ["/a"] * 3)

    @defer.inlineCallbacks
    def test_a_failing_job_fails_only_itself(self):
        w = self.worker()
        d0, release = self.hold(w)

        def bad():
            raise OSError(errno.EIO, "boom")
        ok1 = w.submit(lambda: (1, "/a"))
        failing = w.submit(bad)
        ok2 = w.submit(lambda: (2, "/a"))
        release.set()
        self.assertEqual((yield ok1), 1)
        e = yield self.assertFailure(failing, OSError)
        self.assertEqual(e.errno, errno.EIO)
        self.assertEqual((yield ok2), 2)
        yield d0
        self.assertEqual(self.synced, ["/a"])

    @defer.inlineCallbacks
    def test_a_job_returning_garbage_fails_only_itself(self):
        w = self.worker()
        bad = w.submit(lambda: "not a pair of values")
        good = w.submit(lambda: (3, None))
        yield self.assertFailure(bad, ValueError)
        self.assertEqual((yield good), 3)

    @defer.inlineCallbacks
    def test_failing_directory_fsync_fails_the_jobs_of_that_directory(self):
        w = self.worker()

        def fsync_dir(path):
            self.synced.append(path)
            if path == "/bad":
                raise OSError(errno.EIO, "fsync failed")
        self.patch(durable, "fsync_dir", fsync_dir)
        d0, release = self.hold(w)
        bad = [w.submit(lambda: ("x", "/bad")) for _ in range(3)]
        good = [w.submit(lambda: ("y", "/good")) for _ in range(3)]
        nodir = w.submit(lambda: ("z", None))
        release.set()
        for d in bad:
            yield self.assertFailure(d, OSError)
        self.assertEqual((yield defer.gatherResults(good)), ["y"] * 3)
        self.assertEqual((yield nodir), "z")
        yield d0
        self.assertEqual(sorted(self.synced), ["/bad", "/good"])

    @defer.inlineCallbacks
    def test_unexpected_fsync_error_still_answers(self):
        # Whatever goes wrong in the shared fsync, no caller may wait forever.
        w = self.worker()

        def fsync_dir(path):
            raise TypeError("not a path")
        self.patch(durable, "fsync_dir", fsync_dir)
        yield self.assertFailure(w.submit(lambda: (1, "/x")), TypeError)
        self.patch(durable, "fsync_dir", self.synced.append)
        self.assertEqual((yield w.submit(lambda: (2, "/y"))), 2)

    @defer.inlineCallbacks
    def test_stop_finishes_submitted_jobs(self):
        w = self.worker()
        d0, release = self.hold(w)
        ran = []
        ds = [w.submit(lambda i=i: (ran.append(i) or i, "/a")) for i in range(5)]
        # stop() blocks the reactor thread: release the job from another one.
        timer = threading.Timer(0.05, release.set)
        timer.start()
        self.addCleanup(timer.cancel)
        w.stop()           # blocks until the queue is drained
        self.assertEqual(ran, list(range(5)))
        self.assertEqual(w._threads, [])
        # The answers reach the reactor thread afterwards.
        self.assertEqual((yield defer.gatherResults(ds)), list(range(5)))
        self.assertEqual((yield d0), "held")

    @defer.inlineCallbacks
    def test_submit_after_stop_starts_again(self):
        w = self.worker()
        self.assertEqual((yield w.submit(lambda: (1, None))), 1)
        w.stop()
        w.stop()           # idempotent
        self.assertEqual((yield w.submit(lambda: (2, None))), 2)

    @defer.inlineCallbacks
    def test_several_threads(self):
        w = self.worker(threads=3)
        names = set()
        lock = threading.Lock()

        def job(i):
            with lock:
                names.add(threading.current_thread().name)
            return i, "/d%d" % (i % 2)
        results = yield defer.gatherResults([w.submit(job, i) for i in range(100)])
        self.assertEqual(results, list(range(100)))
        self.assertTrue(names <= {"test-io-0", "test-io-1", "test-io-2"})


class FsyncDirTests(unittest.TestCase):

    def test_fsync_dir_on_a_real_directory(self):
        d = self.mktemp()
        os.makedirs(d)
        durable.fsync_dir(d)

    def test_fsync_dir_on_a_missing_directory(self):
        self.assertRaises(OSError, durable.fsync_dir, self.mktemp())
