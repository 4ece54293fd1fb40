"""The milter client against a fake milter speaking the server side of the protocol.

The fake milter parses what we send, records it, and answers from a script
per command; client and server are joined by an in-memory pump and time is
a Clock, so the conversations are deterministic and the timeouts exact.
"""

import dataclasses
import struct

from twisted.internet import defer, endpoints, error, task
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.test import iosim
from twisted.trial import unittest
from zope.interface import implementer

from mailbox_appliance.antispam import milter as m
from mailbox_appliance.antispam.content import ContentResult
from mailbox_appliance.antispam.message import ScannedMessage
from mailbox_appliance.antispam.milter_filter import (
    MilterFilter, apply_edits, field_value, filters, header_fields)
from mailbox_appliance.config import Config, MilterConfig
from mailbox_appliance.smtp.policy import Verdict
from mailbox_appliance.smtp.session import SessionState

RAW = (b"Received: from client.ext.test (client.ext.test [192.0.2.7])\r\n"
       b"\tby mx.example.test with ESMTP id Q1; Sat, 28 Nov 2026 10:00:00 +0000\r\n"
       b"From: Alice <alice@ext.test>\r\n"
       b"To: bob@example.test\r\n"
       b"Subject:  two spaces\r\n"
       b"X-Tag: one\r\n"
       b"X-Tag: two\r\n"
       b"\r\n"
       b"Hello Bob.\r\n"
       b"Bye.\r\n")

CONTINUE = m.packet(b"c")


def strings(data):
    return data.split(b"\0")[:-1]


class FakeMilter(Protocol):
    """The milter side: records each packet, answers from ``script``.

    ``script`` maps a command to bytes to send back (one or more packets),
    a list of such (one per occurrence of the command, the last repeated),
    or None for no answer at all. Unscripted answered steps get continue.
    ``actions``/``protocol`` are what it asks for at negotiation;
    ``symlists`` is appended to its negotiation reply.
    """

    NO_ANSWER = {b"D", b"A", b"Q", b"K"}

    def __init__(self, script=None, actions=m.OUR_ACTIONS, protocol=0, symlists=b"",
                 version=6):
        self.script = dict(script or {})
        self.actions, self.protocol = actions, protocol
        self.symlists, self.version = symlists, version
        self.received = []          # (cmd, data) of every packet
        self.macros = {}            # stage command -> {name: value}
        self.offered = None
        self.counts = {}
        self._buf = b""
        self.closed = False

    def dataReceived(self, data):
        self._buf += data
        while len(self._buf) >= 4:
            n = struct.unpack("!I", self._buf[:4])[0]
            if len(self._buf) < 4 + n:
                return
            cmd, body = self._buf[4:5], self._buf[5:4 + n]
            self._buf = self._buf[4 + n:]
            self.received.append((cmd, body))
            self.handle(cmd, body)

    def handle(self, cmd, data):
        if cmd == b"O":
            self.offered = struct.unpack("!III", data)
            self.transport.write(m.packet(b"O", struct.pack(
                "!III", self.version, self.actions, self.protocol) + self.symlists))
            return
        if cmd == b"D":
            parts = strings(data[1:])
            self.macros[data[:1]] = dict(zip(parts[::2], parts[1::2]))
            return
        if cmd in self.NO_ANSWER:
            return
        noreply = {b"C": m.SMFIP_NR_CONN, b"H": m.SMFIP_NR_HELO, b"M": m.SMFIP_NR_MAIL,
                   b"R": m.SMFIP_NR_RCPT, b"T": m.SMFIP_NR_DATA, b"L": m.SMFIP_NR_HDR,
                   b"N": m.SMFIP_NR_EOH, b"B": m.SMFIP_NR_BODY}
        if self.protocol & noreply.get(cmd, 0):
            return
        n = self.counts[cmd] = self.counts.get(cmd, 0) + 1
        answer = self.script.get(cmd, CONTINUE)
        if isinstance(answer, list):
            answer = answer[min(n, len(answer)) - 1]
        if answer is not None:
            self.transport.write(answer)

    def commands(self):
        return b"".join(c for c, _ in self.received if c != b"D")

    def packets(self, cmd):
        return [d for c, d in self.received if c == cmd]

    def connectionLost(self, reason):
        self.closed = True


@implementer(IStreamClientEndpoint)
class PumpEndpoint:
    """Connects the filter's protocol to a FakeMilter in memory (one per connect)."""

    def __init__(self, milter):
        self.milter = milter
        self.pump = None

    def connect(self, factory):
        client = factory.buildProtocol(None)
        self.pump = iosim.connect(self.milter, iosim.makeFakeServer(self.milter),
                                  client, iosim.makeFakeClient(client), greet=False)
        return defer.succeed(client)


@implementer(IStreamClientEndpoint)
class NeverEndpoint:
    """A connection attempt that never completes (until cancelled)."""

    def __init__(self):
        self.cancelled = False

    def connect(self, factory):
        return defer.Deferred(lambda d: setattr(self, "cancelled", True))


@implementer(IStreamClientEndpoint)
class RefusedEndpoint:
    def connect(self, factory):
        return defer.fail(error.ConnectionRefusedError("refused"))


def message(raw=RAW, recipients=("bob@example.test", "carol@example.test")):
    msg = ScannedMessage.parse(raw, sender="alice@ext.test", recipients=recipients,
                               client_ip="192.0.2.7", helo="client.ext.test")
    msg.facts["qid"] = "Q1"
    return msg


def session(**kw):
    s = SessionState(client_ip="192.0.2.7", client_port=40000, server_ip="198.51.100.1",
                     helo="client.ext.test", tls="TLSv1.3 TLS_AES_256_GCM_SHA384",
                     envid="E1", ret="HDRS", notify=["SUCCESS,FAILURE", ""],
                     orcpt=["rfc822;bob@example.test", ""], **kw)
    s.client_name = "client.ext.test"
    return s


class MilterCase(unittest.TestCase):

    def setUp(self):
        self.clock = task.Clock()

    def make(self, milter=None, endpoint=None, **kw):
        self.milter = milter if milter is not None else FakeMilter()
        self.endpoint = endpoint or PumpEndpoint(self.milter)
        kw.setdefault("local_domains", ("example.test",))
        return MilterFilter("test", self.endpoint, self.clock, "mx.example.test", **kw)

    def run_scan(self, f, msg=None, sess=None, settle=True):
        d = f.scan(msg or message(), sess or session())
        if settle:
            self.flush()
        return d

    def flush(self):
        pump = getattr(self.endpoint, "pump", None)
        if pump is not None:
            for _ in range(50):
                if not pump.pump():
                    break

    def result(self, f, **kw):
        d = self.run_scan(f, **kw)
        return self.successResultOf(d)


class ConversationTests(MilterCase):

    def test_whole_conversation_in_postfix_order(self):
        f = self.make()
        self.assertEqual(f.name, "milter:test")
        self.assertIsNone(self.result(f))
        fm = self.milter
        self.assertEqual(fm.offered, (6, m.OUR_ACTIONS, m.OUR_PROTOCOL))
        # Negotiation, connect, HELO, MAIL, 2 RCPT, DATA, 6 headers, EOH, body, EOM, QUIT.
        self.assertEqual(fm.commands(), b"OCHMRRTLLLLLLNBEQ")
        [conn] = fm.packets(b"C")
        self.assertEqual(conn, b"client.ext.test\0" + b"4" + struct.pack("!H", 40000)
                         + b"192.0.2.7\0")
        self.assertEqual(fm.packets(b"H"), [b"client.ext.test\0"])
        self.assertEqual(strings(fm.packets(b"M")[0]),
                         [b"<alice@ext.test>", b"RET=HDRS", b"ENVID=E1"])
        self.assertEqual([strings(p) for p in fm.packets(b"R")],
                         [[b"<bob@example.test>", b"NOTIFY=SUCCESS,FAILURE",
                           b"ORCPT=rfc822;bob@example.test"], [b"<carol@example.test>"]])
        headers = [tuple(strings(p)) for p in fm.packets(b"L")]
        self.assertEqual(headers[0], (b"Received", b"from client.ext.test (client.ext.test "
                                      b"[192.0.2.7])\n\tby mx.example.test with ESMTP id Q1; "
                                      b"Sat, 28 Nov 2026 10:00:00 +0000"))
        # Without HDR_LEADSPC the space after the colon is not sent.
        self.assertEqual(headers[3], (b"Subject", b"two spaces"))
        self.assertEqual(headers[4:], [(b"X-Tag", b"one"), (b"X-Tag", b"two")])
        self.assertEqual(fm.packets(b"B"), [b"Hello Bob.\r\nBye.\r\n"])
        self.assertEqual(fm.packets(b"E"), [b""])
        self.assertTrue(fm.closed)

    def test_macros_at_each_stage(self):
        sess = session(authenticated="alice")
        f = self.make(macros={"daemon_name": "ORIGINATING", "{extra}": "1"})
        self.result(f, sess=sess)
        mac = self.milter.macros
        c = mac[b"C"]
        self.assertEqual(c[b"j"], b"mx.example.test")
        self.assertEqual(c[b"{daemon_name}"], b"ORIGINATING")     # configured over ours
        self.assertEqual(c[b"{extra}"], b"1")
        self.assertEqual(c[b"{client_addr}"], b"192.0.2.7")
        self.assertEqual(c[b"{client_name}"], b"client.ext.test")
        self.assertEqual(c[b"{if_addr}"], b"198.51.100.1")
        self.assertEqual(c[b"_"], b"client.ext.test [192.0.2.7]")
        self.assertEqual(mac[b"H"], {b"{tls_version}": b"TLSv1.3",
                                     b"{cipher}": b"TLS_AES_256_GCM_SHA384"})
        self.assertEqual(mac[b"M"][b"i"], b"Q1")
        self.assertEqual(mac[b"M"][b"{mail_addr}"], b"alice@ext.test")
        self.assertEqual(mac[b"M"][b"{auth_authen}"], b"alice")
        # The last RCPT's macros (each RCPT gets its own).
        self.assertEqual(mac[b"R"], {b"i": b"Q1", b"{rcpt_addr}": b"carol@example.test",
                                     b"{rcpt_host}": b"example.test",
                                     b"{rcpt_mailer}": b"local"})
        for stage in (b"T", b"N", b"E"):
            self.assertEqual(mac[stage], {b"i": b"Q1"})
        # Each stage's macros come just before its command.
        order = b"".join(c if c != b"D" else b"D" + d[:1] for c, d in self.milter.received)
        self.assertTrue(order.startswith(b"ODCCDHHDMMDRRDRRDTT"), order)

    def test_no_auth_macro_when_not_authenticated(self):
        f = self.make()
        self.result(f)
        self.assertNotIn(b"{auth_authen}", self.milter.macros[b"M"])

    def test_symlist_limits_the_macros(self):
        lists = (struct.pack("!I", 0) + b"{client_addr} j\0"
                 + struct.pack("!I", 2) + b"{mail_addr}\0")
        f = self.make(FakeMilter(symlists=lists))
        self.result(f)
        mac = self.milter.macros
        self.assertEqual(mac[b"C"], {b"j": b"mx.example.test", b"{client_addr}": b"192.0.2.7"})
        self.assertEqual(mac[b"M"], {b"{mail_addr}": b"alice@ext.test"})
        self.assertEqual(mac[b"R"][b"i"], b"Q1")        # stages it did not list: all

    def test_steps_declined_are_not_sent(self):
        no = (m.SMFIP_NOCONNECT | m.SMFIP_NOHELO | m.SMFIP_NOHDRS | m.SMFIP_NOEOH
              | m.SMFIP_NOBODY | m.SMFIP_NODATA | m.SMFIP_NORCPT)
        f = self.make(FakeMilter(protocol=no))
        self.assertIsNone(self.result(f))
        self.assertEqual(self.milter.commands(), b"OMEQ")
        self.assertNotIn(b"C", self.milter.macros)

    def test_steps_without_reply(self):
        nr = (m.SMFIP_NR_CONN | m.SMFIP_NR_HELO | m.SMFIP_NR_MAIL | m.SMFIP_NR_RCPT
              | m.SMFIP_NR_DATA | m.SMFIP_NR_HDR | m.SMFIP_NR_EOH | m.SMFIP_NR_BODY)
        f = self.make(FakeMilter(protocol=nr))
        self.assertIsNone(self.result(f))
        self.assertEqual(self.milter.commands(), b"OCHMRRTLLLLLLNBEQ")

    def test_leading_space_kept_when_negotiated(self):
        f = self.make(FakeMilter(protocol=m.SMFIP_HDR_LEADSPC, script={
            b"E": m.packet(b"h", b"X-New\0 added\0") + m.packet(b"a")}))
        result = self.result(f)
        headers = [tuple(strings(p)) for p in self.milter.packets(b"L")]
        self.assertEqual(headers[3], (b"Subject", b"  two spaces"))
        self.assertIn(b"\r\nX-New: added\r\n\r\nHello", result.rewrite(RAW))

    def test_large_body_in_chunks(self):
        body = b"".join(b"%07d " % i + b"x" * 70 + b"\r\n" for i in range(2000))
        f = self.make()
        self.result(f, msg=message(RAW.split(b"\r\n\r\n")[0] + b"\r\n\r\n" + body))
        chunks = self.milter.packets(b"B")
        self.assertEqual([len(c) for c in chunks], [65535, 65535, len(body) - 131070])
        self.assertEqual(b"".join(chunks), body)

    def test_skip_stops_the_body(self):
        body = b"y" * 200000
        f = self.make(FakeMilter(script={b"B": m.packet(b"s")}))
        self.assertIsNone(self.result(f, msg=message(b"Subject: x\r\n\r\n" + body)))
        self.assertEqual(self.milter.commands(), b"OCHMRRTLNBEQ")

    def test_null_sender_and_unknown_client(self):
        msg = ScannedMessage.parse(RAW, sender="", recipients=("bob@example.test",))
        msg.facts["qid"] = "Q2"
        f = self.make()
        self.result(f, msg=msg, sess=SessionState())
        self.assertEqual(self.milter.packets(b"C"), [b"unknown\0U"])
        self.assertEqual(self.milter.packets(b"M"), [b"<>\0"])
        self.assertNotIn(b"H", self.milter.commands())      # no HELO was given


class DecisionTests(MilterCase):

    def test_reject_at_rcpt_refuses_the_message(self):
        f = self.make(FakeMilter(script={b"R": [CONTINUE, m.packet(b"r")]}))
        result = self.result(f)
        self.assertEqual(result.verdict, Verdict(550, "5.7.1", "Command rejected"))
        # Nothing after the refusal but ABORT and QUIT.
        self.assertEqual(self.milter.commands(), b"OCHMRRAQ")

    def test_tempfail_at_connect(self):
        f = self.make(FakeMilter(script={b"C": m.packet(b"t")}))
        result = self.result(f)
        self.assertEqual(result.verdict,
                         Verdict(451, "4.7.1", "Service unavailable - try again later"))
        self.assertEqual(self.milter.commands(), b"OCQ")

    def test_reply_code_at_end_of_message(self):
        f = self.make(FakeMilter(script={
            b"E": m.packet(b"h", b"X-Ignored\0yes\0") + m.packet(b"y", b"554 5.7.0 Go away\0")}))
        result = self.result(f)
        self.assertEqual(result.verdict, Verdict(554, "5.7.0", "Go away"))
        self.assertIsNone(result.rewrite)       # edits do not matter when refused

    def test_multiline_reply_code(self):
        f = self.make(FakeMilter(script={
            b"M": m.packet(b"y", b"451-4.7.0 Greylisted\r\n451 4.7.0 see you later\0")}))
        self.assertEqual(self.result(f).verdict,
                         Verdict(451, "4.7.0", "Greylisted see you later"))

    def test_reply_code_without_enhanced_code(self):
        f = self.make(FakeMilter(script={b"H": m.packet(b"y", b"550 Not you\0")}))
        self.assertEqual(self.result(f).verdict, Verdict(550, "5.7.1", "Not you"))

    def test_reply_code_that_accepts_is_a_protocol_error(self):
        f = self.make(FakeMilter(script={b"E": m.packet(b"y", b"250 2.0.0 fine\0")}))
        self.assertEqual(self.result(f).verdict.code, 451)

    def test_discard(self):
        f = self.make(FakeMilter(script={b"M": m.packet(b"d")}))
        result = self.result(f)
        self.assertEqual(result.action, "discard")
        self.assertIsNone(result.verdict)

    def test_accept_early_ends_without_opinion(self):
        f = self.make(FakeMilter(script={b"H": m.packet(b"a")}))
        self.assertIsNone(self.result(f))
        self.assertEqual(self.milter.commands(), b"OCHQ")

    def test_quarantine_holds(self):
        f = self.make(FakeMilter(script={
            b"E": m.packet(b"q", b"looks odd\0") + m.packet(b"c")}))
        result = self.result(f)
        self.assertEqual(result.action, "hold")
        self.assertIn("quarantined: looks odd", result.reason)

    def test_recipients_added_and_removed(self):
        f = self.make(FakeMilter(script={b"E": m.packet(b"+", b"<dave@example.test>\0")
                                         + m.packet(b"2", b"<erin@example.test>\0NOTIFY=NEVER\0")
                                         + m.packet(b"-", b"<carol@example.test>\0")
                                         + m.packet(b"c")}))
        result = self.result(f)
        self.assertEqual(result.add_recipients, ["dave@example.test", "erin@example.test"])
        self.assertEqual(result.remove_recipients, ["carol@example.test"])
        self.assertIsNone(result.rewrite)

    def test_progress_restarts_the_clock(self):
        f = self.make(FakeMilter(script={b"E": None}), eom_timeout=30)
        d = self.run_scan(f)
        fm = self.milter
        self.assertEqual(fm.commands()[-1:], b"E")
        self.clock.advance(29)
        fm.transport.write(m.packet(b"p"))
        self.flush()
        self.clock.advance(29)
        self.assertNoResult(d)
        fm.transport.write(m.packet(b"h", b"X-Late\0yes\0") + m.packet(b"a"))
        self.flush()
        result = self.successResultOf(d)
        self.assertIn(b"X-Late: yes\r\n", result.rewrite(RAW))


class EditTests(MilterCase):

    def test_header_edits_and_new_body(self):
        edits = (m.packet(b"h", b"X-Added\0bottom\0")
                 + m.packet(b"i", struct.pack("!I", 0) + b"X-Top\0first\0")
                 + m.packet(b"m", struct.pack("!I", 2) + b"x-tag\0changed\n\tfolded\0")
                 + m.packet(b"m", struct.pack("!I", 1) + b"Subject\0\0")
                 + m.packet(b"m", struct.pack("!I", 1) + b"X-Missing\0now here\0")
                 + m.packet(b"b", b"New body\nline two\n")
                 + m.packet(b"b", b"third\r\n")
                 + m.packet(b"a"))
        f = self.make(FakeMilter(script={b"E": edits}))
        result = self.result(f)
        self.assertIsInstance(result, ContentResult)
        out = result.rewrite(RAW)
        self.assertEqual(out, (
            b"X-Top: first\r\n"
            + RAW.split(b"From:")[0]
            + b"From: Alice <alice@ext.test>\r\n"
              b"To: bob@example.test\r\n"
              b"X-Tag: one\r\n"
              b"x-tag: changed\r\n\tfolded\r\n"
              b"X-Added: bottom\r\n"
              b"X-Missing: now here\r\n"
              b"\r\n"
              b"New body\r\nline two\r\nthird\r\n"))

    def test_value_cannot_start_a_field_of_its_own(self):
        f = self.make(FakeMilter(script={
            b"E": m.packet(b"h", b"X-Evil\0a\r\nBcc: x@evil.test\n\r\n\0") + m.packet(b"c")}))
        out = self.result(f).rewrite(RAW)
        self.assertIn(b"X-Evil: a\r\n\tBcc: x@evil.test\r\n\r\nHello", out)

    def test_bad_header_name_is_a_protocol_error(self):
        f = self.make(FakeMilter(script={
            b"E": m.packet(b"h", b"Bad Name\0x\0") + m.packet(b"c")}))
        result = self.result(f)
        self.assertEqual(result.verdict.code, 451)
        self.assertIn("bad header name", result.reason)

    def test_edit_not_negotiated_is_refused(self):
        f = self.make(FakeMilter(actions=m.SMFIF_ADDHDRS, script={
            b"E": m.packet(b"b", b"new body") + m.packet(b"c")}))
        result = self.result(f)
        self.assertEqual(result.verdict.code, 451)
        self.assertIn("without the negotiated action", result.reason)

    def test_edit_before_end_of_message_is_a_protocol_error(self):
        f = self.make(FakeMilter(script={b"M": m.packet(b"h", b"X-A\0b\0")}))
        self.assertEqual(self.result(f).verdict.code, 451)

    def test_apply_edits_keeps_what_it_does_not_touch(self):
        raw = b"A: 1\r\nB:  2\r\n  folded\r\nnot a field\r\n\r\nbody\r\n"
        self.assertEqual(apply_edits(raw), raw)
        self.assertEqual(apply_edits(raw, [("change", 1, b"B", b"")]),
                         b"A: 1\r\nnot a field\r\n\r\nbody\r\n")
        self.assertEqual(apply_edits(raw, [("insert", 99, b"C", b"3")]),
                         b"A: 1\r\nB:  2\r\n  folded\r\nnot a field\r\nC: 3\r\n\r\nbody\r\n")
        self.assertEqual(apply_edits(b"A: 1\r\n\r\n", body=b"new\r\n"), b"A: 1\r\n\r\nnew\r\n")

    def test_header_fields_and_values(self):
        fields = header_fields(b"A: 1\r\nB:\r\n\tx\r\n")
        self.assertEqual(fields, [(b"A", b"A: 1\r\n"), (b"B", b"B:\r\n\tx\r\n")])
        self.assertEqual(field_value(fields[1][1], False), b"\n\tx")


class FailureTests(MilterCase):

    def test_refused_connection_tempfails(self):
        f = self.make(endpoint=RefusedEndpoint())
        result = self.result(f)
        self.assertEqual(result.verdict,
                         Verdict(451, "4.7.1", "Service unavailable - try again later"))
        self.assertIn("failed", result.reason)

    def test_refused_connection_with_default_accept(self):
        f = self.make(endpoint=RefusedEndpoint(), default_action="accept")
        self.assertIsNone(self.result(f))

    def test_connect_timeout(self):
        ep = NeverEndpoint()
        f = self.make(endpoint=ep, connect_timeout=5)
        d = self.run_scan(f)
        self.clock.advance(4.9)
        self.assertNoResult(d)
        self.clock.advance(0.2)
        self.assertTrue(ep.cancelled)
        self.assertEqual(self.successResultOf(d).verdict.code, 451)

    def test_command_timeout(self):
        f = self.make(FakeMilter(script={b"H": None}), command_timeout=10, eom_timeout=30)
        d = self.run_scan(f)
        self.clock.advance(9.9)
        self.assertNoResult(d)
        self.clock.advance(0.2)
        self.assertEqual(self.successResultOf(d).verdict.code, 451)
        self.flush()
        self.assertTrue(self.milter.closed)

    def test_eom_timeout_with_default_accept(self):
        f = self.make(FakeMilter(script={b"E": None}), eom_timeout=30, default_action="accept")
        d = self.run_scan(f)
        self.clock.advance(29)
        self.assertNoResult(d)
        self.clock.advance(1)
        self.assertIsNone(self.successResultOf(d))

    def test_milter_hangs_up(self):
        class HangUp(FakeMilter):
            def handle(self, cmd, data):
                if cmd == b"M":
                    self.transport.loseConnection()
                else:
                    super().handle(cmd, data)
        f = self.make(HangUp())
        self.assertEqual(self.result(f).verdict.code, 451)

    def test_oversized_reply_is_refused(self):
        # A reply claiming 16 MiB: refused from its length, before it arrives.
        f = self.make(FakeMilter(script={b"C": struct.pack("!I", 16 * 1024 * 1024) + b"c"}))
        result = self.result(f)
        self.assertEqual(result.verdict.code, 451)
        self.assertIn("out of bounds", result.reason)
        self.assertTrue(self.milter.closed)

    def test_replaced_body_bounded(self):
        f = self.make(FakeMilter(script={
            b"E": m.packet(b"b", b"x" * 60000) + m.packet(b"b", b"x" * 60000) + m.packet(b"c")}),
            max_body=100000)
        result = self.result(f)
        self.assertEqual(result.verdict.code, 451)
        self.assertIn("out of bounds", result.reason)

    def test_edits_bounded(self):
        flood = m.packet(b"h", b"X-A\0b\0") * (m.MAX_EDITS + 1) + m.packet(b"c")
        f = self.make(FakeMilter(script={b"E": flood}))
        result = self.result(f)
        self.assertEqual(result.verdict.code, 451)
        self.assertIn("too many edits", result.reason)
        big = m.packet(b"h", b"X-A\0" + b"v" * 1000000 + b"\0") * 5 + m.packet(b"c")
        f = self.make(FakeMilter(script={b"E": big}))
        self.assertIn("too many edits", self.result(f).reason)

    def test_bad_negotiation(self):
        for milter in (FakeMilter(version=1), FakeMilter(protocol=1 << 30)):
            f = self.make(milter)
            self.assertEqual(self.result(f).verdict.code, 451)

    def test_cancelled_scan_hangs_up(self):
        f = self.make(FakeMilter(script={b"E": None}))
        d = self.run_scan(f)
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)
        self.flush()
        self.assertTrue(self.milter.closed)


class FactoryTests(unittest.TestCase):

    def test_one_filter_per_entry(self):
        config = Config()
        entries = (MilterConfig(name="dkim", endpoint="tcp:127.0.0.1:8891",
                                command_timeout="3s", default_action="accept"),
                   MilterConfig(name="av", endpoint="unix:/tmp/av.sock"))
        config = dataclasses.replace(config, antispam=dataclasses.replace(
            config.antispam, milter=entries))
        from twisted.internet import reactor
        built = filters(config, reactor, None)
        self.assertEqual([f.name for f in built], ["milter:dkim", "milter:av"])
        self.assertEqual(built[0].command_timeout, 3)
        self.assertEqual(built[0].default_action, "accept")
        self.assertEqual(built[1].eom_timeout, 30)
        self.assertEqual(built[1].default_action, "tempfail")
        self.assertEqual(filters(Config(), reactor, None), [])

    @defer.inlineCallbacks
    def test_real_connection_refused(self):
        from twisted.internet import reactor
        port = reactor.listenTCP(0, _NoFactory(), interface="127.0.0.1")
        number = port.getHost().port
        yield port.stopListening()
        f = MilterFilter("gone", endpoints.clientFromString(reactor, f"tcp:127.0.0.1:{number}"),
                         reactor, "mx.example.test")
        result = yield f.scan(message(), session())
        self.assertEqual(result.verdict.code, 451)


class _NoFactory(Factory):
    protocol = Protocol
