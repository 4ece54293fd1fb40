"""Time limits and disk failures of the receiver, with a Clock and a string transport."""

import errno

from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial import unittest

from mailbox_appliance import config as config_module
from mailbox_appliance.queue import spool as spool_module
from mailbox_appliance.smtp.policy import PolicyChain, RecipientExists, RelayAccess
from mailbox_appliance.smtp.server import SMTPServerFactory
from tests.fakes import FakeDirectory
from tests.smtp_helpers import ApplianceMixin, RawClient


class _NoQueue:
    def submit(self, qmsg):
        raise AssertionError("nothing should be queued")


class TimeoutTests(unittest.TestCase):

    def setUp(self):
        self.clock = Clock()
        cfg = config_module.Config()
        directory = FakeDirectory()
        directory.add_user("alice", "alice@example.test")
        policy = PolicyChain([RelayAccess(["example.test"]),
                              RecipientExists(directory, ["example.test"])])
        self.factory = SMTPServerFactory(self.clock, cfg, policy, spool=None, queue=_NoQueue())
        self.proto = self.factory.buildProtocol(None)
        self.transport = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.1", 4321))
        self.proto.makeConnection(self.transport)

    def lines(self):
        out = self.transport.value().decode().splitlines()
        self.transport.clear()
        return out

    def test_greeting_then_idle_timeout(self):
        self.assertTrue(self.lines()[0].startswith("220 mail.example.test ESMTP"))
        self.clock.advance(299)
        self.assertFalse(self.transport.disconnecting)
        self.clock.advance(2)
        self.assertEqual(self.lines(), ["421 4.4.2 mail.example.test Error: timeout exceeded"])
        self.assertTrue(self.transport.disconnecting)

    def test_partial_line_does_not_reset_the_timer(self):
        self.lines()
        for _ in range(30):
            self.clock.advance(20)
            self.proto.dataReceived(b"x")
        self.assertTrue(self.transport.disconnecting)
        self.assertIn("421 4.4.2", self.lines()[-1])

    def test_session_deadline_is_absolute(self):
        self.lines()
        for _ in range(40):
            self.clock.advance(100)
            self.proto.dataReceived(b"HELO client.example.org\r\n")
        self.assertTrue(self.transport.disconnecting)
        self.assertIn("421 4.4.2 mail.example.test Error: session too long", self.lines())

    def test_connection_lost_cancels_timers(self):
        self.proto.connectionLost(None)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class DiskFailureTests(ApplianceMixin, unittest.TestCase):
    """A queue write that fails is a 451, and nothing is kept."""

    def setUp(self):
        return self.start_appliance()

    @defer.inlineCallbacks
    def test_disk_full_at_commit(self):
        def full(self, final_path, recycled=None):
            raise OSError(errno.ENOSPC, "No space left on device")
        self.patch(spool_module.IncomingMessage, "finish_in_thread", full)

        def talk():
            c = RawClient(self.port)
            c.code()
            c.cmd("EHLO client.ext.test")
            c.cmd("MAIL FROM:<a@ext.test>")
            c.cmd("RCPT TO:<alice@example.test>")
            c.cmd("DATA")
            c.send(b"Subject: full\r\n\r\nx\r\n.\r\n")
            return c.reply(), c.cmd("NOOP")
        (code, lines), noop = yield self.in_thread(talk)
        self.assertEqual((code, lines[0][:5]), (451, "4.3.0"))
        self.assertEqual(noop[0], 250)
        yield self.settle()
        self.assertEqual(self.queue_files(), [])
        self.assertEqual(self.delivered("alice"), [])
