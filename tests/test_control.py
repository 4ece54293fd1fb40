"""The control socket: requests over a real UNIX socket to a fake queue manager."""

import json
import os
import shutil
import socket
import stat
import tempfile

from twisted.internet import defer, reactor, task, threads
from twisted.internet.protocol import Factory, Protocol
from twisted.trial import unittest
from zope.interface import implementer
from zope.interface.verify import verifyObject

from mailbox_appliance.antispam.verdicts import Counters
from mailbox_appliance.queue.control import (MAX_LINE, ControlError, ControlServer,
                                             ControlUnavailable, IQueueControl, send_command)


@implementer(IQueueControl)
class FakeManager:
    """Records calls; answers from ``results`` (an int, a Deferred or an exception)."""

    def __init__(self):
        self.calls = []
        self.results = {}
        self.known = {"0123ABCD", "4567EF"}

    def _answer(self, op, target):
        self.calls.append((op, target))
        result = self.results.get(op, 1)
        if isinstance(result, Exception):
            raise result
        if callable(result):
            return result(target)
        return result

    def flush(self, target=None):
        return self._answer("flush", target)

    def _one(self, op, qid):
        if qid not in self.known:
            raise KeyError(qid)
        return self._answer(op, qid)

    def hold(self, qid):
        return self._one("hold", qid)

    def release(self, qid):
        return self._one("release", qid)

    def delete(self, qid):
        return self._one("delete", qid)


def short_dir(case):
    # UNIX socket paths are limited to ~100 octets: trial's temp folder is too deep.
    d = tempfile.mkdtemp(prefix="ctl-")
    case.addCleanup(shutil.rmtree, d, True)
    return d


def exchange(path, data, lines, timeout=10):
    """Blocking: send ``data``, read ``lines`` answer lines (fewer if closed)."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(timeout)
        s.connect(path)
        try:
            s.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass        # the server answered and closed first (busy, say): read that
        got = b""
        while got.count(b"\n") < lines:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            got += chunk
    return [json.loads(l) for l in got.split(b"\n") if l]


class ControlServerTests(unittest.TestCase):

    timeout = 20

    def setUp(self):
        self.manager = FakeManager()
        self.dir = short_dir(self)
        self.path = os.path.join(self.dir, "control.sock")
        self.factory = ControlServer(self.manager)
        self.port = reactor.listenUNIX(self.path, self.factory, mode=0o600)
        self.addCleanup(self.port.stopListening)

    def send(self, op, target=None):
        return threads.deferToThread(send_command, self.path, op, target)

    def talk(self, data, lines=1):
        return threads.deferToThread(exchange, self.path, data, lines)

    def test_manager_contract(self):
        verifyObject(IQueueControl, self.manager)

    def test_socket_is_private(self):
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)

    @defer.inlineCallbacks
    def test_flush_everything_and_a_domain(self):
        self.manager.results["flush"] = 3
        reply = yield self.send("flush")
        self.assertEqual(reply, {"ok": True, "count": 3})
        reply = yield self.send("flush", "remote.test")
        self.assertEqual(reply, {"ok": True, "count": 3})
        self.assertEqual(self.manager.calls, [("flush", None), ("flush", "remote.test")])

    @defer.inlineCallbacks
    def test_hold_release_delete(self):
        for op in ("hold", "release", "delete"):
            reply = yield self.send(op, "0123ABCD")
            self.assertEqual(reply, {"ok": True, "count": 1})
        self.assertEqual(self.manager.calls, [("hold", "0123ABCD"), ("release", "0123ABCD"),
                                              ("delete", "0123ABCD")])

    @defer.inlineCallbacks
    def test_stats(self):
        reply = yield self.send("stats")
        self.assertEqual(reply, {"ok": True, "counters": {}})
        counters = Counters()
        counters.count("greylist", "pass")
        counters.count("hit", "BAYES_99")
        counters.count("hit", "BAYES_99")
        self.factory.stats = counters.snapshot
        reply = yield self.send("stats")
        self.assertEqual(reply, {"ok": True, "counters": {"greylist:pass": 1,
                                                          "hit:BAYES_99": 2}})
        # Nothing asked of the queue.
        self.assertEqual(self.manager.calls, [])

    def test_counters_bounded(self):
        counters = Counters(max_keys=2)
        for name in ("A", "B", "C", "A"):
            counters.count("hit", name)
        self.assertEqual(counters.snapshot(), {"hit:A": 2, "hit:B": 1})

    @defer.inlineCallbacks
    def test_deferred_results(self):
        pending = defer.Deferred()
        self.manager.results["hold"] = lambda target: pending
        d = self.send("hold", "0123ABCD")
        yield self.eventually(lambda: self.manager.calls)
        self.assertFalse(d.called)
        pending.callback(0)
        reply = yield d
        self.assertEqual(reply, {"ok": True, "count": 0})

    @defer.inlineCallbacks
    def test_unknown_queue_id(self):
        reply = yield self.send("delete", "FFFF")
        self.assertEqual(reply, {"ok": False, "error": "no such message", "code": "not_found"})
        self.manager.results["release"] = lambda target: defer.fail(KeyError(target))
        reply = yield self.send("release", "0123ABCD")
        self.assertEqual(reply["code"], "not_found")

    @defer.inlineCallbacks
    def test_manager_failure_is_reported_and_logged(self):
        self.manager.results["flush"] = RuntimeError("disk on fire")
        reply = yield self.send("flush")
        self.assertEqual(reply, {"ok": False, "error": "request failed: disk on fire",
                                 "code": "failed"})
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    @defer.inlineCallbacks
    def test_bad_requests_change_nothing(self):
        bad = [b"not json", b"[1, 2]", b'"hold"', b'{"op": "purge", "target": null}',
               b'{"op": "hold"}', b'{"op": "delete", "target": null}',
               b'{"op": "hold", "target": 7}', b'{"op": "hold", "target": ""}',
               b'{"op": "hold", "target": "a b"}', b'{"op": "hold", "target": "a\\nb"}',
               b'{"op": "hold", "target": "\\u00e9"}',
               b'{"op": "flush", "target": "' + b"x" * 300 + b'"}',
               b"\xff\xfe{}"]
        replies = yield self.talk(b"\n".join(bad) + b"\n", lines=len(bad))
        self.assertEqual(len(replies), len(bad))
        for reply in replies:
            self.assertFalse(reply["ok"])
            self.assertEqual(reply["code"], "bad_request")
        self.assertEqual(self.manager.calls, [])

    @defer.inlineCallbacks
    def test_connection_stays_usable_after_garbage(self):
        replies = yield self.talk(b"garbage\r\n\n" + b'{"op": "hold", "target": "4567EF"}\r\n',
                                  lines=2)
        self.assertEqual([r["ok"] for r in replies], [False, True])
        self.assertEqual(self.manager.calls, [("hold", "4567EF")])

    @defer.inlineCallbacks
    def test_oversized_line_closes_the_connection(self):
        request = b'{"op": "hold", "target": "0123ABCD", "pad": "' + b"x" * MAX_LINE + b'"}\n'
        replies = yield self.talk(request + b'{"op": "flush"}\n', lines=3)
        self.assertEqual(replies, [{"ok": False, "error": "request too long",
                                    "code": "bad_request"}])
        self.assertEqual(self.manager.calls, [])

    @defer.inlineCallbacks
    def test_pipelined_requests_one_at_a_time_in_order(self):
        gates = []

        def slow(target):
            gates.append(defer.Deferred())
            return gates[-1]
        self.manager.results["hold"] = slow
        self.manager.results["delete"] = 5
        d = self.talk(b'{"op": "hold", "target": "0123ABCD"}\n'
                      b'{"op": "delete", "target": "4567EF"}\n', lines=2)
        yield self.eventually(lambda: gates)
        # The second request waits for the first one's answer.
        yield task.deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(self.manager.calls, [("hold", "0123ABCD")])
        gates[0].callback(1)
        replies = yield d
        self.assertEqual(replies, [{"ok": True, "count": 1}, {"ok": True, "count": 5}])
        self.assertEqual(self.manager.calls, [("hold", "0123ABCD"), ("delete", "4567EF")])

    @defer.inlineCallbacks
    def test_too_many_connections(self):
        self.factory.max_connections = 1
        held = socket.socket(socket.AF_UNIX)
        self.addCleanup(held.close)
        yield threads.deferToThread(held.connect, self.path)
        yield self.eventually(lambda: self.factory.connections == 1)
        replies = yield self.talk(b'{"op": "flush"}\n')
        self.assertEqual(replies[0]["code"], "busy")
        self.assertEqual(self.manager.calls, [])

    @defer.inlineCallbacks
    def eventually(self, predicate):
        for _ in range(1000):
            if predicate():
                return
            yield task.deferLater(reactor, 0.01, lambda: None)
        self.fail("condition never became true")


class IdleTimeoutTests(unittest.TestCase):

    timeout = 20

    @defer.inlineCallbacks
    def test_idle_connection_is_closed(self):
        clock = task.Clock()
        d = short_dir(self)
        path = os.path.join(d, "control.sock")
        factory = ControlServer(FakeManager(), reactor=clock, timeout=30)
        port = reactor.listenUNIX(path, factory)
        self.addCleanup(port.stopListening)

        def idle():
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(10)
                s.connect(path)
                return s.recv(10)
        result = threads.deferToThread(idle)
        for _ in range(1000):
            if clock.getDelayedCalls():
                break
            yield task.deferLater(reactor, 0.01, lambda: None)
        clock.advance(31)
        self.assertEqual((yield result), b"")


class SendCommandTests(unittest.TestCase):

    timeout = 20

    def test_missing_socket(self):
        d = short_dir(self)
        self.assertRaises(ControlUnavailable, send_command, os.path.join(d, "control.sock"),
                          "flush")
        self.assertRaises(ControlUnavailable, send_command,
                          os.path.join(d, "nowhere", "control.sock"), "flush")

    def test_long_paths_without_a_socket(self):
        deep = os.path.abspath(os.path.join(self.mktemp(), "d" * 60, "e" * 60))
        os.makedirs(deep)
        link = os.path.join(deep, "control.sock")
        self.assertRaises(ControlUnavailable, send_command, link, "flush")
        # The appliance was killed and its private folder is gone.
        os.symlink(os.path.join(short_dir(self), "gone", "control.sock"), link)
        self.assertRaises(ControlUnavailable, send_command, link, "flush")

    def test_stale_socket_file(self):
        path = os.path.join(short_dir(self), "control.sock")
        s = socket.socket(socket.AF_UNIX)
        s.bind(path)
        s.close()               # the file stays, nobody listens: a crashed appliance
        self.assertTrue(os.path.exists(path))
        self.assertRaises(ControlUnavailable, send_command, path, "flush")

    def test_a_plain_file_is_nobody_listening(self):
        path = os.path.join(short_dir(self), "control.sock")
        with open(path, "w") as f:
            f.write("x")
        self.assertRaises(ControlUnavailable, send_command, path, "flush")

    def test_unknown_op(self):
        self.assertRaises(ValueError, send_command, "/nonexistent/control.sock", "purge")

    @defer.inlineCallbacks
    def test_long_path_through_a_link(self):
        # A deep data_dir gets a link to a socket elsewhere (see appliance.py).
        real = os.path.join(short_dir(self), "control.sock")
        port = reactor.listenUNIX(real, ControlServer(FakeManager()))
        self.addCleanup(port.stopListening)
        deep = os.path.abspath(os.path.join(self.mktemp(), "d" * 60, "e" * 60))
        os.makedirs(deep)
        link = os.path.join(deep, "control.sock")
        os.symlink(real, link)
        reply = yield threads.deferToThread(send_command, link, "flush")
        self.assertEqual(reply, {"ok": True, "count": 1})

    @defer.inlineCallbacks
    def test_nonsense_answer(self):
        class Liar(Protocol):
            def dataReceived(self, data):
                self.transport.write(b"HTTP/1.0 200 OK\n")
                self.transport.loseConnection()

        class Mute(Protocol):
            def dataReceived(self, data):
                self.transport.loseConnection()
        for proto, text in ((Liar, "not understood"), (Mute, "no answer")):
            path = os.path.join(short_dir(self), "control.sock")
            port = reactor.listenUNIX(path, Factory.forProtocol(proto))
            self.addCleanup(port.stopListening)
            try:
                yield threads.deferToThread(send_command, path, "flush")
            except ControlError as e:
                self.assertNotIsInstance(e, ControlUnavailable)
                self.assertIn(text, str(e))
            else:
                self.fail("no ControlError")
