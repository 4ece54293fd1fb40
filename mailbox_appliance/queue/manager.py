"""The queue manager: takes due messages, routes and delivers them, retries.

It owns the in-memory schedule of the spool's messages (the spool itself is the
truth; a restart rebuilds the schedule from it). Each attempt walks the
envelope recipients, resolves them with the router and hands each target to
its delivery agent; successes are recorded durably, temporary failures wait
for the next slot of ``delivery.retry_schedule``.
"""

from __future__ import annotations

import collections

from twisted.application.service import Service
from twisted.internet import defer, threads
from twisted.logger import Logger

from mailbox_appliance.config import parse_duration
from mailbox_appliance.delivery.maildir import DeliveryError
from mailbox_appliance.interfaces import DirectoryUnavailable
from mailbox_appliance.maillog import mail_event


class QueueManager(Service):
    """Schedules and performs deliveries of spooled messages."""

    log = Logger()

    def __init__(self, reactor, config, spool, router, local_agent, remote_agent=None,
                 concurrency=20):
        self.reactor = reactor
        self.config = config
        self.spool = spool
        self.router = router
        self.local_agent = local_agent
        self.remote_agent = remote_agent
        self.concurrency = concurrency
        self.retry_schedule = [parse_duration(x) for x in config.delivery.retry_schedule]
        self._ready = collections.deque()
        self._active = 0
        self._timers = {}
        self._idle_waiters = []
        self._inflight = set()      # qids waiting in _ready or being attempted
        self._recovering = None     # qids submitted while recovery reads the disk

    def startService(self):
        super().startService()
        # The listeners take mail while recovery lists active/ in a thread: a
        # message committed meanwhile is submitted by its receiver and may be
        # listed too. It must not be attempted twice.
        self._recovering = set()
        d = threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(),
                                      self.spool.recover)

        def recovered(messages):
            seen, self._recovering = self._recovering, None
            messages = [m for m in messages if m.qid not in seen]
            if messages:
                self.log.info("queue: {n} message(s) recovered from disk", n=len(messages))
            for m in messages:
                self.submit(m)

        def failed(f):
            self._recovering = None
            self.log.failure("queue recovery failed", f)
        d.addCallbacks(recovered, failed)
        self.recovered = d
        return d

    def stopService(self):
        super().stopService()
        for t in self._timers.values():
            if t.active():
                t.cancel()
        self._timers.clear()
        for qmsg in self._ready:
            self._inflight.discard(qmsg.qid)
        self._ready.clear()
        # Let attempts in flight finish their disk work before the pools stop.
        return self.when_idle()

    def submit(self, qmsg):
        """Queue ``qmsg`` for an immediate attempt."""
        if self._recovering is not None:
            self._recovering.add(qmsg.qid)
        if qmsg.qid in self._inflight:
            return                  # already waiting or being attempted
        t = self._timers.pop(qmsg.qid, None)
        if t is not None and t.active():
            t.cancel()
        self._inflight.add(qmsg.qid)
        self._ready.append(qmsg)
        self._kick()

    def _kick(self):
        while self.running and self._ready and self._active < self.concurrency:
            qmsg = self._ready.popleft()
            self._active += 1
            d = self._attempt(qmsg)
            d.addErrback(lambda f, q=qmsg: self._attempt_failed(q, f))
            d.addBoth(lambda r, q=qmsg: self._inflight.discard(q.qid))
            d.addBoth(self._attempt_done)
        if not self._ready and not self._active:
            waiters, self._idle_waiters = self._idle_waiters, []
            for w in waiters:
                w.callback(None)

    def deliver_now(self, qmsg):
        """Attempt ``qmsg`` at once and fire with its per-recipient statuses.

        For LMTP, whose client waits for one answer per recipient: outside the
        concurrency limit, and recipients that failed temporarily are given
        back to the client (it retries them) instead of being kept here.
        """
        if self._recovering is not None:
            self._recovering.add(qmsg.qid)
        self._inflight.add(qmsg.qid)
        self._active += 1
        d = self._attempt(qmsg, give_back=True)

        def crashed(f):
            self._attempt_failed(qmsg, f)
            return {i: "deferred" for i in range(len(qmsg.envelope.recipients))}

        def finished(statuses):
            self._inflight.discard(qmsg.qid)
            self._attempt_done(None)
            return statuses
        return d.addErrback(crashed).addCallback(finished)

    def _attempt_done(self, _):
        self._active -= 1
        self._kick()

    def _attempt_failed(self, qmsg, failure):
        self.log.failure("{qid}: delivery attempt crashed", failure, qid=qmsg.qid)
        self._schedule_retry(qmsg)

    def when_idle(self):
        """A Deferred that fires once nothing is being delivered (for tests)."""
        if not self._ready and not self._active:
            return defer.succeed(None)
        d = defer.Deferred()
        self._idle_waiters.append(d)
        return d

    @defer.inlineCallbacks
    def _attempt(self, qmsg, give_back=False):
        """One delivery attempt; fires with {recipient index: status}.

        Status is "sent", "bounced", "deferred" (temporary failure, kept for a
        retry) or "queued" (accepted, waiting for remote delivery). With
        ``give_back`` (LMTP), recipients that failed temporarily are handed
        back to the client, which retries them: they are not kept.
        """
        qmsg.attempts += 1
        env = qmsg.envelope
        newly_done = []
        pending = False
        statuses = {}
        def done(key):
            # Known in memory at once, so that no later attempt in this
            # process (after a failed done-record or removal, or a crash of
            # this attempt) repeats it; on disk with mark_done below.
            newly_done.append(key)
            qmsg.done.add(key)

        # One copy per final destination and message, as Postfix does: a user
        # named directly and through an alias, or two aliases, gets it once.
        handled = {key.partition(":")[2] for key in qmsg.done}
        tried = set()

        for idx, rcpt in enumerate(env.recipients):
            if f"{idx}:*" in qmsg.done:
                continue
            try:
                route = yield self.router.route(rcpt)
            except DirectoryUnavailable as e:
                self._log_status(qmsg, rcpt, rcpt, "deferred", f"4.4.3 directory unavailable: {e}")
                statuses[idx] = "deferred"
                pending = True
                continue
            except Exception as e:
                self.log.failure("{qid}: routing <{rcpt}> failed", qid=qmsg.qid, rcpt=rcpt)
                self._log_status(qmsg, rcpt, rcpt, "deferred", f"4.3.0 routing failed: {e}")
                statuses[idx] = "deferred"
                pending = True
                continue
            if route.unknown:
                self._log_status(qmsg, rcpt, rcpt, "bounced", "5.1.1 user unknown")
                statuses[idx] = "bounced"
                done(f"{idx}:*")
                continue
            complete = True
            local_failed = remote_waiting = False
            for target in route.targets:
                key = f"{idx}:{target.key}"
                if key in qmsg.done:
                    continue
                if target.key in handled:
                    done(key)
                    continue
                if target.key in tried:
                    complete = False        # waits with the same target of another recipient
                    remote_waiting = True
                    continue
                tried.add(target.key)
                try:
                    outcome = yield self._deliver_target(qmsg, idx, rcpt, target)
                except Exception as e:
                    self.log.failure("{qid}: delivery to <{to}> failed", qid=qmsg.qid,
                                     to=target.address)
                    self._log_status(qmsg, target.address, rcpt, "deferred",
                                     f"4.3.0 delivery failed: {e}")
                    outcome = "deferred"
                if outcome == "sent" or outcome == "bounced":
                    done(key)
                    handled.add(target.key)
                else:
                    complete = False
                    if target.kind == "local":
                        local_failed = True
                    else:
                        remote_waiting = True
            if complete:
                statuses[idx] = "sent"
                done(f"{idx}:*")
            elif local_failed or not remote_waiting:
                statuses[idx] = "deferred"
                pending = True
            else:
                statuses[idx] = "queued"
                pending = True
        if give_back:
            for idx, status in statuses.items():
                if status == "deferred":
                    done(f"{idx}:*")
            pending = any(f"{i}:*" not in qmsg.done for i in range(len(env.recipients)))
        # Later attempts read the file: do not keep the bytes in memory.
        qmsg.data = None
        if not pending:
            yield self.spool.remove(qmsg)
            mail_event(self.log, f"{qmsg.qid}: removed", qid=qmsg.qid)
            return statuses
        if newly_done:
            yield self.spool.mark_done(qmsg, newly_done)
        self._schedule_retry(qmsg)
        return statuses

    @defer.inlineCallbacks
    def _deliver_target(self, qmsg, idx, rcpt, target):
        if target.kind == "local":
            try:
                written = yield self.local_agent.deliver(qmsg, target.user, target.address,
                                                         idx, target.key)
            except DeliveryError as e:
                status = "bounced" if e.permanent else "deferred"
                self._log_status(qmsg, target.address, rcpt, status, str(e))
                return status
            self._log_status(qmsg, target.address, rcpt, "sent",
                             "delivered to maildir" if written else "already delivered")
            return "sent"
        if self.remote_agent is None:
            # Outbound SMTP is not part of this build yet: keep the message
            # queued for it instead of losing or bouncing it.
            self._log_status(qmsg, target.address, rcpt, "deferred",
                             "4.4.0 remote delivery is not enabled")
            return "deferred"
        outcome = yield self.remote_agent.deliver(qmsg, target.address)
        return outcome

    def _schedule_retry(self, qmsg):
        if not self.running:
            return
        sched = self.retry_schedule
        delay = sched[min(qmsg.attempts - 1, len(sched) - 1)]
        old = self._timers.get(qmsg.qid)
        if old is not None and old.active():
            old.cancel()
        self._timers[qmsg.qid] = self.reactor.callLater(delay, self._retry, qmsg)

    def _retry(self, qmsg):
        self._timers.pop(qmsg.qid, None)
        self.submit(qmsg)

    def _log_status(self, qmsg, to, orig, status, reason):
        delay = max(0.0, self.reactor.seconds() - qmsg.envelope.arrival)
        orig_part = f", orig_to=<{orig}>" if orig.lower() != to.lower() else ""
        mail_event(self.log, f"{qmsg.qid}: to=<{to}>{orig_part}, delay={delay:.2f}, "
                             f"status={status} ({reason})", qid=qmsg.qid, status=status)
