"""Who hears about a message's fate, and the queueing of that notice.

The queue manager reports failures, delays and successes of an attempt here.
This module applies the rules of RFC 3461 and RFC 5321 4.5.5 — each
recipient's NOTIFY= (none given: failures and delays), never a notice to the
null sender, a failed null-sender message reported once to the postmaster and
the postmaster's copy never reported on — builds the multipart/report with
``queue/dsn.py`` and commits it to the spool as a new message from ``<>``.
"""

from __future__ import annotations

from twisted.internet import defer, threads
from twisted.logger import Logger

from mailbox_appliance.maillog import mail_event
from mailbox_appliance.queue.dsn import MAX_RETURNED, DSNRecipient, build_dsn
from mailbox_appliance.queue.spool import Envelope


def wants(notify: str, kind: str) -> bool:
    """Whether a recipient's NOTIFY= asks for ``kind`` (SUCCESS, FAILURE, DELAY)."""
    if not notify:
        return kind in ("FAILURE", "DELAY")        # RFC 3461 4.1: the default
    return kind in notify.upper().split(",")


class Notices:
    """Builds and queues delivery status notices for the queue manager."""

    log = Logger()

    def __init__(self, reactor, config, spool, submit):
        self.reactor = reactor
        self.hostname = config.server.hostname
        self.postmaster = (config.delivery.postmaster
                           or f"postmaster@{config.server.domains[0]}")
        self.spool = spool
        self.submit = submit

    @defer.inlineCallbacks
    def report(self, qmsg, failures=(), delays=(), successes=(), now=0.0,
               will_retry_until=0.0):
        """Queue the notice owed for one attempt, if any.

        ``failures`` and ``delays`` are (idx, final address, RecipientResult);
        ``successes`` (idx, final address, RecipientResult, action) with action
        "delivered" or "relayed". Fires once the notice is durable in the
        queue (or at once when nobody is to be told).
        """
        env = qmsg.envelope
        owed = []                   # (idx, DSNRecipient)
        for idx, address, result in failures:
            if wants(env.notify_of(idx), "FAILURE"):
                owed.append((idx, self._entry(env, idx, address, result, "failed", now)))
        for idx, address, result in delays:
            if wants(env.notify_of(idx), "DELAY"):
                owed.append((idx, self._entry(env, idx, address, result, "delayed", now,
                                              will_retry_until)))
        for idx, address, result, action in successes:
            if "SUCCESS" in env.notify_of(idx).upper().split(","):
                owed.append((idx, self._entry(env, idx, address, result, action, now)))
        if not owed:
            return None
        if env.notice == "postmaster":
            mail_event(self.log, f"{qmsg.qid}: postmaster notice undeliverable, dropped",
                       qid=qmsg.qid)
            return None
        # Copies sent with their own envelope sender (a list's VERP) are
        # reported to that sender: one notice per sender.
        groups = {}
        for idx, entry in owed:
            groups.setdefault(env.sender_of(idx), []).append(entry)
        queued = None
        for sender, entries in groups.items():
            notice = yield self._report_to(qmsg, sender, entries, now)
            queued = queued or notice
        return queued

    @defer.inlineCallbacks
    def _report_to(self, qmsg, sender, entries, now):
        env = qmsg.envelope
        postmaster_copy = False
        if not sender:
            # RFC 5321 4.5.5: never to the null sender. A failure is told to
            # the postmaster, once (that copy is not reported on again).
            entries = [e for e in entries if e.action == "failed"]
            if not entries:
                return None
            to, notice, postmaster_copy = self.postmaster, "postmaster", True
        else:
            to, notice = sender, "dsn"
        original = yield self._original(qmsg)
        data = build_dsn(hostname=self.hostname, qid=qmsg.qid, envelope=env,
                         recipients=entries, original=original, now=now, to=to,
                         postmaster_copy=postmaster_copy)
        inc = self.spool.new_message(Envelope(sender="", recipients=[to], arrival=now,
                                              protocol="local", notice=notice))
        inc.write_header()
        inc.write(data)
        notice_msg = yield self.spool.commit(inc)
        kinds = sorted({e.action for e in entries})
        mail_event(self.log, f"{qmsg.qid}: sender {'/'.join(kinds)} notification: "
                             f"{notice_msg.qid}" if not postmaster_copy else
                             f"{qmsg.qid}: postmaster notification: {notice_msg.qid}",
                   qid=qmsg.qid)
        self.submit(notice_msg)
        return notice_msg

    def _entry(self, env, idx, address, result, action, now, will_retry_until=0.0):
        return DSNRecipient(
            address=address, action=action, status=result.enhanced, orcpt=env.orcpt_of(idx),
            diagnostic=result.reply, from_remote=result.from_remote,
            remote_mta=result.remote_mta, last_attempt=now,
            will_retry_until=will_retry_until if action == "delayed" else 0.0)

    def _original(self, qmsg):
        """The message as queued (bytes), read off the reactor thread when needed."""
        if qmsg.data is not None:
            return defer.succeed(qmsg.data)

        def read():
            with open(qmsg.path, "rb") as f:
                f.seek(qmsg.body_offset)
                return f.read(MAX_RETURNED + 1)
        return threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(), read)
