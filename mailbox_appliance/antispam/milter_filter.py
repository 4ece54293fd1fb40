"""A milter as a content filter: one conversation per received message.

Each ``[[antispam.milter]]`` entry becomes a ``MilterFilter`` named
"milter:<name>". Our content filters run at end of data with the whole
message at hand, so the milter's conversation is replayed in one go there,
as Postfix does for a pre-queue milter: connect (the client's address and
name), HELO, MAIL with its ESMTP parameters, each RCPT, DATA, the header
fields, end of headers, the body in chunks, end of message, each stage
with the macros Postfix sends at it (``{j}``, ``{daemon_name}``,
``{client_addr}``, ``{i}`` the queue id, ``{auth_authen}``,
``{tls_version}``, ``{mail_addr}``, ``{rcpt_addr}``...). Steps the milter
declined at negotiation are left out.

The milter's answers become a ContentResult:

- reject (``550 5.7.1 Command rejected``), tempfail (``451 4.7.1``) and a
  reply code of its own (4xx/5xx) at any step: the ``verdict``. As the
  conversation is replayed after the fact, a recipient refused by the
  milter refuses the whole message: we cannot refuse one recipient at end
  of data, and dropping it silently would lose mail.
- discard: ``action`` "discard"; quarantine: ``action`` "hold".
- accept before end of message: no opinion (and no edits).
- header additions, changes, insertions, deletions and a new body: one
  ``rewrite`` function over the whole message (CRLF kept, every other
  byte as it was); added and deleted recipients: the recipient lists.

A milter that cannot be reached, breaks the protocol or does not answer
in time gets the entry's ``default_action``: "tempfail" answers the
client ``451 4.7.1`` (it retries later, when the milter is back),
"accept" goes on without the milter's opinion. Either way it is logged
and counted.
"""

from __future__ import annotations

import functools
import re
import struct

from twisted.internet import defer, endpoints
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from zope.interface import implementer

from mailbox_appliance.antispam import milter as m
from mailbox_appliance.antispam.content import ContentResult, IContentFilter
from mailbox_appliance.antispam.message import split_message
from mailbox_appliance.antispam.verdicts import note
from mailbox_appliance.config import parse_duration
from mailbox_appliance.smtp.policy import Verdict

log = Logger(namespace="mailbox_appliance.antispam.milter")

REJECT = Verdict(550, "5.7.1", "Command rejected")
TEMPFAIL = Verdict(451, "4.7.1", "Service unavailable - try again later")
MAX_FIELDS = 2000               # header fields sent / edited (the message size bounds the rest)
MAX_RCPT_EDITS = 1000           # recipients added or removed
_LINE_BREAK = re.compile(rb"\r\n|\n|\r")
_BARE_LF = re.compile(rb"(?<!\r)\n")


def header_fields(block: bytes):
    """[(name bytes or None, field bytes)] of a header block, every byte kept.

    A field's bytes are its first line and its continuation lines with
    their line ends; a line that is no field (no name before a colon) is
    kept as it was, nameless.
    """
    out = []
    for line in block.splitlines(keepends=True):
        if line[:1] in (b" ", b"\t") and out:
            out[-1] = (out[-1][0], out[-1][1] + line)
            continue
        name, colon, _ = line.partition(b":")
        name = name.rstrip(b" \t")
        out.append((name if colon and m.header_name_ok(name) else None, line))
    return out


def field_value(raw_field: bytes, leadspc: bool) -> bytes:
    """What a milter is sent as a field's value: after the colon, lines joined by LF.

    Without ``SMFIP_HDR_LEADSPC`` the white space after the colon is left
    out, as Sendmail and Postfix do.
    """
    value = raw_field.partition(b":")[2]
    value = _LINE_BREAK.sub(b"\n", value)
    if value.endswith(b"\n"):
        value = value[:-1]
    return value if leadspc else value.lstrip(b" \t")


def render_field(name: bytes, value: bytes, leadspc: bool) -> bytes:
    """A header field from a milter's name and value, CRLF line ends.

    Each line after the first must be a continuation (start with white
    space) and none may be empty: a milter must not be able to end the
    header block or start a field of its own by a line break in a value.
    """
    lines = [l for l in _LINE_BREAK.split(value.replace(b"\0", b""))]
    first, rest = lines[0], [l for l in lines[1:] if l.strip(b" \t")]
    rest = [l if l[:1] in (b" ", b"\t") else b"\t" + l for l in rest]
    sep = b":" if leadspc else b": "
    return b"\r\n".join([name + sep + first] + rest) + b"\r\n"


def apply_edits(raw: bytes, edits=(), body=None, leadspc=False) -> bytes:
    """``raw`` with a milter's header ``edits`` and new ``body`` (None: kept).

    ``edits`` are ("add", name, value), ("insert", index, name, value)
    (index 0 is the top) and ("change", index, name, value) (the
    index-th field of that name, from 1; an empty value deletes it; a
    change of a field that is not there adds it), applied in order.
    """
    block, old_body = split_message(raw)
    sep = raw[len(block):len(raw) - len(old_body)] or b"\r\n"
    fields = header_fields(block)
    for edit in edits:
        if edit[0] == "add":
            _, name, value = edit
            fields.append((name, render_field(name, value, leadspc)))
        elif edit[0] == "insert":
            _, index, name, value = edit
            fields.insert(min(index, len(fields)), (name, render_field(name, value, leadspc)))
        elif edit[0] == "change":
            _, index, name, value = edit
            want, seen, at = name.lower(), 0, None
            for i, (n, _) in enumerate(fields):
                if n is not None and n.lower() == want:
                    seen += 1
                    if seen == max(index, 1):
                        at = i
                        break
            if at is None:
                if value.strip():
                    fields.append((name, render_field(name, value, leadspc)))
            elif not value.strip():
                del fields[at]
            else:
                fields[at] = (name, render_field(name, value, leadspc))
    new_block = b"".join(f for _, f in fields)
    if new_block and not new_block.endswith(b"\n"):
        new_block += b"\r\n"
    return new_block + sep + (old_body if body is None else body)


def normalise_body(body: bytes) -> bytes:
    """A replacement body with CRLF line ends (a milter may send bare LF)."""
    return _BARE_LF.sub(b"\r\n", body)


def _strip_brackets(addr: bytes) -> str:
    text = addr.decode("utf-8", "replace").strip()
    if text.startswith("<") and text.endswith(">"):
        text = text[1:-1]
    return "".join(ch for ch in text if ch.isprintable() and ch not in " <>")[:320]


@implementer(IContentFilter)
class MilterFilter:
    """One ``[[antispam.milter]]``: asks the milter about each message (module docstring).

    ``endpoint`` is an IStreamClientEndpoint (a fresh connection per
    message). ``reactor`` times the connection and the answers.
    ``max_body`` bounds a replaced body. ``macros`` are extra macros
    (name -> value) sent with the connect stage's, overriding ours (e.g.
    ``{daemon_name}``, which opendkim's ``MTA`` list matches).
    """

    def __init__(self, name, endpoint, reactor, hostname, connect_timeout=5.0,
                 command_timeout=10.0, eom_timeout=30.0, default_action="tempfail",
                 macros=None, local_domains=(), max_body=25 * 1024 * 1024):
        self.name = f"milter:{name}"
        self.endpoint = endpoint
        self.reactor = reactor
        self.hostname = hostname
        self.connect_timeout = connect_timeout
        self.command_timeout = command_timeout
        self.eom_timeout = eom_timeout
        self.default_action = default_action
        self.macros = dict(macros or {})
        self.local_domains = {d.lower() for d in local_domains}
        self.max_body = max_body

    def scan(self, message, session):
        return defer.ensureDeferred(self._scan(message, session))

    async def _scan(self, message, session):
        qid = message.facts.get("qid", "-")
        try:
            result = await self._converse(message, session, qid)
        except defer.CancelledError:
            raise
        except Exception as e:
            note(self.name, "error")
            why = e if isinstance(e, m.MilterError) else f"{type(e).__name__}: {e}"
            if self.default_action == "accept":
                log.warn("{qid}: {name} failed, going on without it: {why}",
                         qid=qid, name=self.name, why=why)
                return None
            log.warn("{qid}: {name} failed, telling the client to try later: {why}",
                     qid=qid, name=self.name, why=why)
            return ContentResult(verdict=TEMPFAIL, reason=f"failed: {why}")
        return result

    async def _connect(self):
        factory = Factory.forProtocol(lambda: m.MilterProtocol(max_body=self.max_body))
        d = self.endpoint.connect(factory)
        d.addTimeout(self.connect_timeout, self.reactor,
                     onTimeoutCancel=lambda r, t: _raise(m.MilterTimeout(
                         f"no connection in {t} s")))
        return await d

    async def _converse(self, message, session, qid):
        proto = await self._connect()
        s = m.MilterSession(proto, self.reactor, self.command_timeout, self.eom_timeout)
        in_message = done = failed = False
        try:
            opts = await s.negotiate()
            mac = self._macro_values(message, session, qid)
            ip = session.client_ip or message.client_ip
            name = getattr(session, "client_name", "") or (f"[{ip}]" if ip else "unknown")
            reply = await s.connect(name, ip, session.client_port or 0, mac["connect"])
            if reply.final:
                return self._early(reply, "connect", qid)
            helo = session.helo or message.helo
            if helo:
                reply = await s.helo(helo, mac["helo"])
                if reply.final:
                    return self._early(reply, "helo", qid)
            in_message = True
            reply = await s.mail(message.sender, self._mail_args(session), mac["mail"])
            if reply.final:
                return self._early(reply, "mail", qid)
            for i, rcpt in enumerate(message.recipients):
                reply = await s.rcpt(rcpt, self._rcpt_args(session, i), mac["rcpt"][i])
                if reply.final:
                    return self._early(reply, f"rcpt <{rcpt}>", qid)
            reply = await s.data(mac["data"])
            if reply.final:
                return self._early(reply, "data", qid)
            leadspc = opts.has(m.SMFIP_HDR_LEADSPC)
            block, body = split_message(message.raw)
            if not opts.has(m.SMFIP_NOHDRS):
                for fname, raw_field in header_fields(block)[:MAX_FIELDS]:
                    if fname is None:
                        continue
                    reply = await s.header(fname, field_value(raw_field, leadspc))
                    if reply.final:
                        return self._early(reply, "header", qid)
            reply = await s.eoh(mac["eoh"])
            if reply.final:
                return self._early(reply, "end of headers", qid)
            if not opts.has(m.SMFIP_NOBODY):
                for at in range(0, len(body), m.MAX_BODY_CHUNK):
                    reply = await s.body(body[at:at + m.MAX_BODY_CHUNK])
                    if reply.action == "skip":
                        break
                    if reply.final:
                        return self._early(reply, "body", qid)
            reply = await s.eom(mac["eom"])
            done = True
            return self._final(reply, leadspc, qid)
        except BaseException:
            # A broken or silent milter (or our own time out): hang up.
            failed = True
            proto.abort()
            raise
        finally:
            if not failed:
                if in_message and not done:
                    s.abort()
                s.quit()

    # -- what the milter is told --------------------------------------

    def _macro_values(self, message, session, qid):
        ip = session.client_ip or message.client_ip
        client_name = getattr(session, "client_name", "") or ""
        server_ip = getattr(session, "server_ip", "") or ""
        connect = {
            "j": self.hostname, "{daemon_name}": self.hostname, "v": "mailbox_appliance",
            "{daemon_addr}": server_ip, "{if_addr}": server_ip, "{if_name}": self.hostname,
            "{client_addr}": ip, "{client_port}": str(session.client_port or 0),
            "{client_name}": client_name or "unknown",
            "{client_ptr}": client_name or "unknown",
            "_": f"{client_name or 'unknown'} [{ip}]",
        }
        connect = {k: v for k, v in connect.items() if v}
        connect.update({m.macro_name(k): str(v) for k, v in self.macros.items()})
        helo = {}
        if session.tls:
            version, _, cipher = session.tls.partition(" ")
            helo = {"{tls_version}": version, "{cipher}": cipher}
        mail = {"i": qid, "{mail_addr}": message.sender}
        user = session.authenticated or message.authenticated
        if user:
            mail["{auth_authen}"] = user
            mechanism = getattr(session, "auth_mechanism", "")
            if mechanism:
                mail["{auth_type}"] = mechanism
        if message.sender and "@" in message.sender:
            mail["{mail_host}"] = message.sender.rsplit("@", 1)[1]
        rcpts = []
        for r in message.recipients:
            domain = r.rsplit("@", 1)[1].lower() if "@" in r else ""
            local = not domain or domain in self.local_domains
            rcpts.append({"i": qid, "{rcpt_addr}": r, "{rcpt_host}": domain or self.hostname,
                          "{rcpt_mailer}": "local" if local else "smtp"})
        return {"connect": connect, "helo": helo, "mail": mail, "rcpt": rcpts,
                "data": {"i": qid}, "eoh": {"i": qid}, "eom": {"i": qid}}

    @staticmethod
    def _mail_args(session):
        args = []
        if getattr(session, "body_8bit", False):
            args.append("BODY=8BITMIME")
        if getattr(session, "ret", ""):
            args.append(f"RET={session.ret}")
        if getattr(session, "envid", ""):
            args.append(f"ENVID={session.envid}")
        if getattr(session, "authenticated", ""):
            args.append(f"AUTH=<{session.authenticated}>")
        return args

    @staticmethod
    def _rcpt_args(session, i):
        args = []
        notify = getattr(session, "notify", None) or []
        orcpt = getattr(session, "orcpt", None) or []
        if i < len(notify) and notify[i]:
            args.append(f"NOTIFY={notify[i]}")
        if i < len(orcpt) and orcpt[i]:
            args.append(f"ORCPT={orcpt[i]}")
        return args

    # -- what its answers mean ----------------------------------------

    def _verdict(self, reply):
        if reply.action == "reject":
            return REJECT
        if reply.action == "tempfail":
            return TEMPFAIL
        code, enhanced, text = m.parse_replycode(reply.text)
        return Verdict(code, enhanced, text)

    def _early(self, reply, stage, qid):
        """A decision before end of message: ends the conversation, no edits."""
        note(self.name, reply.action)
        if reply.action == "accept":
            log.info("{qid}: {name} accepted at {stage}", qid=qid, name=self.name, stage=stage)
            return None
        if reply.action == "discard":
            log.info("{qid}: {name} discards at {stage}", qid=qid, name=self.name, stage=stage)
            return ContentResult(action="discard", reason=f"discard at {stage}")
        verdict = self._verdict(reply)
        return ContentResult(verdict=verdict, reason=f"{verdict.code} at {stage}")

    def _final(self, reply, leadspc, qid):
        """The end of message's answer and edits as a ContentResult."""
        note(self.name, reply.action)
        if reply.action in ("reject", "tempfail", "replycode"):
            verdict = self._verdict(reply)
            return ContentResult(verdict=verdict, reason=f"{verdict.code} at end of message")
        if reply.action == "discard":
            return ContentResult(action="discard", reason="discard at end of message")
        result = ContentResult()
        header_edits, body_chunks, reasons = [], None, []
        for cmd, data in reply.edits:
            if cmd == m.SMFIR_ADDHEADER:
                name, value = m._strings(data, 2, "add header")
                header_edits.append(("add", _checked_name(name), value))
            elif cmd in (m.SMFIR_INSHEADER, m.SMFIR_CHGHEADER):
                if len(data) < 4:
                    raise m.MilterError("header edit without an index")
                index = struct.unpack("!I", data[:4])[0]
                name, value = m._strings(data[4:], 2, "header edit")
                kind = "insert" if cmd == m.SMFIR_INSHEADER else "change"
                header_edits.append((kind, index, _checked_name(name), value))
            elif cmd == m.SMFIR_REPLBODY:
                body_chunks = (body_chunks or []) + [data]
            elif cmd in (m.SMFIR_ADDRCPT, m.SMFIR_ADDRCPT_PAR):
                addr = _strip_brackets(m._strings(data, 1, "add recipient")[0])
                if addr and len(result.add_recipients) < MAX_RCPT_EDITS:
                    result.add_recipients.append(addr)
            elif cmd == m.SMFIR_DELRCPT:
                addr = _strip_brackets(m._strings(data, 1, "delete recipient")[0])
                if addr and len(result.remove_recipients) < MAX_RCPT_EDITS:
                    result.remove_recipients.append(addr)
            elif cmd == m.SMFIR_QUARANTINE:
                why = m._strings(data, 1, "quarantine")[0].decode("utf-8", "replace")
                result.action = "hold"
                reasons.append("quarantined: " + "".join(
                    ch for ch in why if ch.isprintable())[:200])
        if header_edits or body_chunks is not None:
            body = None if body_chunks is None else normalise_body(b"".join(body_chunks))
            result.rewrite = functools.partial(apply_edits, edits=tuple(header_edits),
                                               body=body, leadspc=leadspc)
            reasons.append(f"{len(header_edits)} header edits"
                           + (", new body" if body is not None else ""))
        if result.add_recipients or result.remove_recipients:
            reasons.append(f"recipients +{len(result.add_recipients)} "
                           f"-{len(result.remove_recipients)}")
        result.reason = "; ".join(reasons)
        log.info("{qid}: {name} {action}{edits}", qid=qid, name=self.name, action=reply.action,
                 edits=f": {result.reason}" if result.reason else "")
        if result.rewrite is None and not result.reason:
            return None
        return result


def _checked_name(name: bytes) -> bytes:
    if not m.header_name_ok(name):
        raise m.MilterError(f"bad header name {name[:100]!r}")
    return name


def _raise(error):
    raise error


def filters(config, reactor, resolver, state=None):
    """One MilterFilter per ``[[antispam.milter]]`` entry, in their order."""
    out = []
    for entry in config.antispam.milter:
        out.append(MilterFilter(
            entry.name, endpoints.clientFromString(reactor, entry.endpoint), reactor,
            config.server.hostname, connect_timeout=parse_duration(entry.connect_timeout),
            command_timeout=parse_duration(entry.command_timeout),
            eom_timeout=parse_duration(entry.eom_timeout),
            default_action=entry.default_action, macros=entry.macros,
            local_domains=config.server.domains,
            max_body=config.server.max_message_size))
    return out

