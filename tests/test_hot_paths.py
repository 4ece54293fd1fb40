"""Shortcuts on the per-message paths give the same results as the long way:
the DATA stream's dot-stuffing, the submission fix-ups' generated fields, and
the cached date of the Received: field; and outbound connections that log
nothing of their own."""

import random
import re
from email.utils import formatdate

from twisted.internet import defer, protocol, reactor
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest

from mailbox_appliance.delivery import smtp_client
from mailbox_appliance.delivery.smtp_client import ClientSettings, DotStuffer
from mailbox_appliance.smtp.fixup import SubmissionFixup
from mailbox_appliance.smtp.server import message_date


def stuff_the_long_way(chunks):
    """What DotStuffer did before its shortcut: always normalise line ends."""
    data = b"".join(chunks)
    data = re.sub(rb"\r\n|\r|\n", b"\r\n", data)
    if data and not data.endswith(b"\r\n"):
        data += b"\r\n"
    data = (b"\r\n" + data).replace(b"\r\n.", b"\r\n..")[2:]
    return data + b".\r\n"


class DotStufferShortcutTests(unittest.TestCase):

    def test_same_stream_as_normalising_everything(self):
        rng = random.Random(5)
        pieces = [b"abc", b"\r\n", b"\r", b"\n", b".", b"..", b"\r\n.", b" x"]
        for _ in range(2000):
            data = b"".join(rng.choice(pieces) for _ in range(rng.randint(0, 12)))
            cuts = sorted(rng.randint(0, len(data)) for _ in range(rng.randint(0, 3)))
            chunks = [data[a:b] for a, b in zip([0] + cuts, cuts + [len(data)])]
            s = DotStuffer()
            out = b"".join(s.feed(c) for c in chunks) + s.finish()
            self.assertEqual(out, stuff_the_long_way(chunks), chunks)

    def test_clean_message_only_stuffed(self):
        s = DotStuffer()
        self.assertEqual(s.feed(b".a\r\nb\r\n.\r\n"), b"..a\r\nb\r\n..\r\n")
        self.assertEqual(s.finish(), b".\r\n")


class LazyFixupFieldTests(unittest.TestCase):

    def make(self, calls):
        return SubmissionFixup(message_id=lambda: calls.append("id") or "<new@mx>",
                               date=lambda: calls.append("date") or "Thu, 1 Jan 2026 "
                                                                    "00:00:00 +0000")

    def test_not_made_when_present(self):
        calls = []
        f = self.make(calls)
        out = f.feed(b"Message-ID: <a@b>\r\nDate: x\r\nFrom: a@b\r\n\r\nbody\r\n")
        self.assertEqual(out, b"Message-ID: <a@b>\r\nDate: x\r\nFrom: a@b\r\n\r\nbody\r\n")
        self.assertEqual(calls, [])

    def test_made_once_when_missing(self):
        calls = []
        f = self.make(calls)
        out = f.feed(b"From: a@b\r\n\r\nbody\r\n")
        self.assertEqual(out, b"From: a@b\r\nMessage-ID: <new@mx>\r\n"
                              b"Date: Thu, 1 Jan 2026 00:00:00 +0000\r\n\r\nbody\r\n")
        self.assertEqual(calls, ["id", "date"])

    def test_strings_still_taken(self):
        f = SubmissionFixup("<id@mx>", "Mon, 1 Jan 2024 00:00:00 +0000")
        self.assertEqual(f.feed(b"From: a@b\r\n\r\n"),
                         b"From: a@b\r\nMessage-ID: <id@mx>\r\n"
                         b"Date: Mon, 1 Jan 2024 00:00:00 +0000\r\n\r\n")


class MessageDateTests(unittest.TestCase):

    def test_same_as_formatdate(self):
        for t in (0, 1.5, 1.999, 2, 1767225600.25, 1767225600.75, 1767225601, 1700000000):
            self.assertEqual(message_date(t), formatdate(t, localtime=True), t)


class QuietConnectTests(unittest.TestCase):
    """An outbound connection logs no "Starting/Stopping factory" lines."""

    @defer.inlineCallbacks
    def test_no_factory_lines(self):
        server = protocol.ServerFactory.forProtocol(protocol.Protocol)
        server.noisy = False
        port = reactor.listenTCP(0, server, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        settings = ClientSettings(helo_name="me.test", connect_timeout=5, command_timeout=5,
                                  data_timeout=5)
        session = yield smtp_client.connect(reactor, settings, "mx.test", "127.0.0.1",
                                            port.getHost().port)
        # The greeting that never came fails with the abort.
        session.proto.greeting.addErrback(lambda f: f.trap(smtp_client.ConnectionBroken))
        yield session.abort("done")
        texts = [formatEvent(e) for e in events]
        self.assertFalse([t for t in texts if "factory" in t.lower()], texts)
