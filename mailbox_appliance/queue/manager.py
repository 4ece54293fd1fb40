"""The queue manager: takes due messages, routes and delivers them, retries.

It owns the in-memory schedule of the spool's messages (the spool itself is the
truth; a restart rebuilds the schedule from it). Each attempt resolves the
envelope recipients with the router, delivers local targets through the
Maildir agent and remote ones through the SMTP agent (one transaction per
destination domain), records what was done durably, and waits for the next
slot of ``delivery.retry_schedule`` for the rest. Permanent failures and mail
too old to keep trying become delivery status notices (``queue/notices.py``);
so do delay warnings and the successes a sender asked for.

Fresh mail and retries have separate lanes ("several speeds"): a backlog of
deferred mail to a dead destination can only take ``retry_concurrency`` of
the attempt slots, and never delays a new message.
"""

from __future__ import annotations

import collections
import dataclasses

from twisted.application.service import Service
from twisted.internet import defer, threads
from twisted.logger import Logger
from zope.interface import implementer

from mailbox_appliance.config import parse_duration
from mailbox_appliance.delivery.maildir import DeliveryError
from mailbox_appliance.delivery.result import (
    BOUNCED, DEFERRED, SENT, RecipientResult, RemoteRecipient)
from mailbox_appliance.interfaces import DirectoryUnavailable
from mailbox_appliance.maillog import mail_event
from mailbox_appliance.queue.control import IQueueControl
from mailbox_appliance.queue.notices import Notices
from mailbox_appliance.slots import Slots


class _Lane:
    """A FIFO of messages waiting for an attempt, with its own slot count."""

    def __init__(self, name, slots):
        self.name = name
        self.slots = slots
        self.waiting = collections.deque()
        self.active = 0

    def can_start(self):
        return self.waiting and self.active < self.slots


class SenderView:
    """A queued message as seen by one transaction with another envelope sender
    (a list member's VERP address); everything else is the message's own."""

    def __init__(self, qmsg, sender):
        self._qmsg = qmsg
        self.envelope = dataclasses.replace(qmsg.envelope, sender=sender, senders=[])

    def __getattr__(self, name):
        return getattr(self._qmsg, name)


class _Checkpoint:
    """Done-records of one attempt's sent copies, written a batch at a time while
    the attempt goes on (the attempt writes them all again at its end)."""

    EVERY = 500

    def __init__(self, spool, qmsg, log):
        self.spool, self.qmsg, self.log = spool, qmsg, log
        self.keys = []
        self.writes = []

    def add(self, keys):
        self.keys.extend(keys)
        if len(self.keys) >= self.EVERY:
            batch, self.keys = self.keys, []
            self.writes.append(self.spool.mark_done(self.qmsg, batch).addErrback(
                lambda f: self.log.failure("{qid}: done-records not written (written at the "
                                           "end of the attempt)", f, qid=self.qmsg.qid)))

    def finished(self):
        """Fires once every batch is written: the attempt must not move or remove
        the queue file while one is still to land beside it."""
        return defer.DeferredList(self.writes, consumeErrors=True)


@implementer(IQueueControl)
class QueueManager(Service):
    """Schedules and performs deliveries of spooled messages."""

    log = Logger()

    def __init__(self, reactor, config, spool, router, local_agent, remote_agent=None,
                 concurrency=None, retry_concurrency=None, local_concurrency=2,
                 list_agent=None):
        self.reactor = reactor
        self.config = config
        self.spool = spool
        self.router = router
        self.local_agent = local_agent
        self.remote_agent = remote_agent
        self.list_agent = list_agent
        dl = config.delivery
        self.fresh = _Lane("fresh", concurrency or dl.concurrency)
        self.retries = _Lane("retry", retry_concurrency or dl.retry_concurrency)
        # Two local deliveries at a time, as Postfix's local(8): they share
        # one disk thread anyway, and receiving keeps the reactor's attention.
        self._local_slots = defer.DeferredSemaphore(local_concurrency)
        self.retry_schedule = [parse_duration(x) for x in dl.retry_schedule]
        self.warn_after = parse_duration(dl.warn_after)
        self.max_age = parse_duration(dl.max_age)
        self.notices = Notices(reactor, config, spool, submit=self.submit)
        self._timers = {}
        self._idle_waiters = []
        self._inflight = set()      # qids waiting in a lane or being attempted
        self._recovering = None     # qids submitted while recovery reads the disk
        self._messages = {}         # qid -> QueuedMessage, every message in active/
        self._held = {}             # qid -> QueuedMessage in hold/
        self._after_attempt = {}    # qid -> "hold" or "delete", asked during an attempt
        self._answers = {}          # qid -> statuses an LMTP attempt has decided

    # -- service ------------------------------------------------------------

    def startService(self):
        super().startService()
        # The listeners take mail while recovery lists active/ in a thread: a
        # message committed meanwhile is submitted by its receiver and may be
        # listed too. It must not be attempted twice.
        self._recovering = set()
        d = threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(),
                                      lambda: (self.spool.recover(), self.spool.held()))

        def recovered(found):
            messages, held = found
            seen, self._recovering = self._recovering, None
            messages = [m for m in messages if m.qid not in seen]
            if messages:
                self.log.info("queue: {n} message(s) recovered from disk", n=len(messages))
            for m in held:
                self._held[m.qid] = m
            now = self.reactor.seconds()
            for m in messages:
                if m.attempts and m.next_attempt > now:
                    # Waiting for its next slot before the restart: keep it
                    # (a restart is not a reason to hammer dead destinations).
                    self._messages[m.qid] = m
                    self._schedule_retry(m, delay=m.next_attempt - now)
                else:
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
        for lane in (self.fresh, self.retries):
            for qmsg in lane.waiting:
                self._inflight.discard(qmsg.qid)
            lane.waiting.clear()
        # Remote deliveries in flight end as deferred (they are tried again
        # after the restart); then let attempts finish their disk work
        # before the pools stop.
        close = getattr(self.remote_agent, "close", None)
        if close is not None:
            close()
        return self.when_idle()

    # -- scheduling -----------------------------------------------------------

    def submit(self, qmsg):
        """Queue ``qmsg`` for an immediate attempt (a held one just waits for release)."""
        if qmsg.held:
            self._held[qmsg.qid] = qmsg
            mail_event(self.log, f"{qmsg.qid}: held by a content filter", qid=qmsg.qid)
            return
        if self._recovering is not None:
            self._recovering.add(qmsg.qid)
        self._messages[qmsg.qid] = qmsg
        if qmsg.qid in self._inflight:
            return                  # already waiting or being attempted
        t = self._timers.pop(qmsg.qid, None)
        if t is not None and t.active():
            t.cancel()
        self._inflight.add(qmsg.qid)
        lane = self.fresh if qmsg.attempts == 0 and not qmsg.recovered else self.retries
        lane.waiting.append(qmsg)
        self._kick()

    def _kick(self):
        for lane in (self.fresh, self.retries):
            while self.running and lane.can_start():
                qmsg = lane.waiting.popleft()
                lane.active += 1
                d = self._attempt(qmsg)
                d.addErrback(lambda f, q=qmsg: self._attempt_failed(q, f))
                d.addBoth(lambda r, q=qmsg: self._attempt_finished(q))
                d.addBoth(lambda r, lane=lane: self._lane_done(lane))
        if self._idle():
            waiters, self._idle_waiters = self._idle_waiters, []
            for w in waiters:
                w.callback(None)

    def _idle(self):
        return not (self.fresh.waiting or self.retries.waiting or self.fresh.active
                    or self.retries.active)

    def _lane_done(self, lane):
        lane.active -= 1
        self._kick()

    def _attempt_finished(self, qmsg):
        self._inflight.discard(qmsg.qid)
        wish = self._after_attempt.pop(qmsg.qid, None)
        if wish is not None and qmsg.qid in self._messages:
            self._unschedule(qmsg.qid)
            if wish == "hold":
                return self._move_to_hold(qmsg)
            return self._delete(qmsg)

    def deliver_now(self, qmsg):
        """Attempt ``qmsg`` at once and fire with its per-recipient statuses.

        For LMTP, whose client waits for one answer per recipient: outside the
        lanes, and recipients that failed temporarily are given back to the
        client (it retries them) instead of being kept here.
        """
        if self._recovering is not None:
            self._recovering.add(qmsg.qid)
        self._messages[qmsg.qid] = qmsg
        self._inflight.add(qmsg.qid)
        self.fresh.active += 1
        d = self._attempt(qmsg, give_back=True)

        def crashed(f):
            # What the attempt decided before it failed (a disk error at
            # the end, say) stands: delivered recipients are not handed
            # back to be sent twice; those handed back are not ours any more.
            statuses = self._answers.pop(qmsg.qid, None) or {
                i: "sent" if f"{i}:*" in qmsg.done else "deferred"
                for i in range(len(qmsg.envelope.recipients))}
            for i, status in statuses.items():
                if status == "deferred":
                    qmsg.done.add(f"{i}:*")
            self._attempt_failed(qmsg, f)
            return statuses

        def finished(statuses):
            self._answers.pop(qmsg.qid, None)
            self._attempt_finished(qmsg)
            self._lane_done(self.fresh)
            return statuses
        return d.addErrback(crashed).addCallback(finished)

    def _attempt_failed(self, qmsg, failure):
        self.log.failure("{qid}: delivery attempt crashed", failure, qid=qmsg.qid)
        self._schedule_retry(qmsg)

    def when_idle(self):
        """A Deferred that fires once nothing is being delivered (for tests)."""
        if self._idle():
            return defer.succeed(None)
        d = defer.Deferred()
        self._idle_waiters.append(d)
        return d

    def _retry_delay(self, qmsg):
        sched = self.retry_schedule
        delay = sched[min(max(qmsg.attempts, 1) - 1, len(sched) - 1)]
        # The last try falls on max_age, not a whole retry interval later.
        expiry = qmsg.envelope.arrival + self.max_age - self.reactor.seconds()
        return max(1, min(delay, expiry)) if expiry > 0 else delay

    def _schedule_retry(self, qmsg, delay=None):
        if not self.running or qmsg.qid not in self._messages:
            return
        if delay is None:
            delay = self._retry_delay(qmsg)
        old = self._timers.get(qmsg.qid)
        if old is not None and old.active():
            old.cancel()
        qmsg.next_attempt = self.reactor.seconds() + delay
        self._timers[qmsg.qid] = self.reactor.callLater(delay, self._retry, qmsg)

    def _retry(self, qmsg):
        self._timers.pop(qmsg.qid, None)
        self.submit(qmsg)

    def _unschedule(self, qid):
        t = self._timers.pop(qid, None)
        if t is not None and t.active():
            t.cancel()
        for lane in (self.fresh, self.retries):
            for q in list(lane.waiting):
                if q.qid == qid:
                    lane.waiting.remove(q)
                    self._inflight.discard(qid)

    # -- one attempt --------------------------------------------------------

    @defer.inlineCallbacks
    def _attempt(self, qmsg, give_back=False):
        """One delivery attempt; fires with {recipient index: status}.

        Status is "sent", "bounced", "deferred" (temporary failure, kept for a
        retry) or "queued" (a local part is done and a remote one waits).
        With ``give_back`` (LMTP), recipients that failed temporarily are
        handed back to the client, which retries them: they are not kept.
        """
        qmsg.attempts += 1
        env = qmsg.envelope
        now = self.reactor.seconds()
        newly_done = []

        def done(key):
            # Known in memory at once, so that no later attempt in this
            # process (after a failed done-record or removal, or a crash of
            # this attempt) repeats it; on disk with mark_done below.
            newly_done.append(key)
            qmsg.done.add(key)

        # Recipients a notice reports on (bounced, expired) are ended only
        # once that notice is safely queued: if queueing it fails, the next
        # attempt finds them again and reports them then.
        owed = []

        # One copy per final destination and message, as Postfix does: a user
        # named directly and through an alias, or two aliases, gets it once.
        handled = {key.partition(":")[2] for key in qmsg.done}
        plan = {}                  # idx -> [Target] still to deliver
        owners = {}                # target key -> (Target, [idx, ...])
        failed_routes = {}         # idx -> RecipientResult (routing failure)
        for idx, rcpt in enumerate(env.recipients):
            if f"{idx}:*" in qmsg.done:
                continue
            try:
                route = yield self.router.route(rcpt)
            except DirectoryUnavailable as e:
                failed_routes[idx] = RecipientResult(
                    DEFERRED, "4.4.3", f"4.4.3 directory unavailable: {e}")
                continue
            except Exception as e:
                self.log.failure("{qid}: routing <{rcpt}> failed", qid=qmsg.qid, rcpt=rcpt)
                failed_routes[idx] = RecipientResult(DEFERRED, "4.3.0",
                                                     f"4.3.0 routing failed: {e}")
                continue
            if route.unknown:
                failed_routes[idx] = RecipientResult(BOUNCED, "5.1.1", "5.1.1 user unknown")
                continue
            plan[idx] = []
            for target in route.targets:
                key = f"{idx}:{target.key}"
                if key in qmsg.done:
                    continue
                if target.key in handled:
                    done(key)
                    continue
                plan[idx].append(target)
                owners.setdefault(target.key, (target, []))[1].append(idx)

        # LMTP waits for its answers: only the local part is delivered now,
        # anything remote is left to the queue's own attempt right after.
        results = yield self._deliver_targets(qmsg, owners, remote=not give_back)
        remote_left = give_back and any(t.kind == "remote" for t, _ in owners.values())

        statuses = {}
        failures, delays, successes = [], [], []
        for idx, result in failed_routes.items():
            rcpt = env.recipients[idx]
            self._log_status(qmsg, rcpt, rcpt, result)
            if result.status == BOUNCED:
                failures.append((idx, rcpt, result))
                statuses[idx] = "bounced"
            else:
                statuses[idx] = "deferred"
                qmsg.last[idx] = self._last(result, now)
        for idx, targets in plan.items():
            rcpt = env.recipients[idx]
            local_failed = remote_waiting = False
            for target in targets:
                result = results[target.key]
                if result.status == SENT:
                    done(f"{idx}:{target.key}")
                    handled.add(target.key)
                    if target.kind in ("local", "list"):
                        successes.append((idx, target.address, result, "delivered"))
                    elif not result.dsn_passed_on:
                        successes.append((idx, target.address, result, "relayed"))
                elif result.status == BOUNCED:
                    owed.append(f"{idx}:{target.key}")
                    handled.add(target.key)
                    failures.append((idx, target.address, result))
                elif target.kind in ("local", "list"):
                    local_failed = True
                else:
                    remote_waiting = True
                if result.status == DEFERRED:
                    qmsg.last[idx] = dict(self._last(result, now), to=target.address)
            if not (local_failed or remote_waiting):
                statuses[idx] = "bounced" if any(f[0] == idx for f in failures) else "sent"
                qmsg.last.pop(idx, None)
            elif local_failed:
                statuses[idx] = "deferred"
            else:
                # Only a remote part waits (forwarding, an outside alias
                # member, or plain remote mail): it stays in our queue.
                statuses[idx] = "queued"
        for idx, status in statuses.items():
            if status == "sent":
                done(f"{idx}:*")
            elif status == "bounced":
                owed.append(f"{idx}:*")

        if give_back:
            # The LMTP client hears each failure (5xx, or 4xx given back to
            # it) and reports it itself: no notice from us on top.
            failures = []
            for key in owed:
                done(key)
            owed = []
            for idx, status in statuses.items():
                if status == "deferred":
                    done(f"{idx}:*")
                    qmsg.last.pop(idx, None)
            self._answers[qmsg.qid] = statuses
        else:
            delays, expired = self._age_out(qmsg, statuses, now)
            for idx, rcpt, result in expired:
                failures.append((idx, rcpt, result))
                owed.append(f"{idx}:*")
                statuses[idx] = "bounced"

        # Notices are queued before the done-records that end the recipients
        # they report on: a crash in between repeats a notice, never loses one.
        if failures or delays or successes:
            yield self.notices.report(qmsg, failures=failures, delays=delays,
                                      successes=successes, now=now,
                                      will_retry_until=env.arrival + self.max_age)
        for key in owed:
            done(key)
        qmsg.warned.update(idx for idx, _, _ in delays)
        pending = any(f"{i}:*" not in qmsg.done for i in range(len(env.recipients)))
        # Later attempts read the file: do not keep the bytes in memory.
        qmsg.data = None
        if not pending:
            yield self.spool.remove(qmsg)
            self._messages.pop(qmsg.qid, None)
            mail_event(self.log, f"{qmsg.qid}: removed", qid=qmsg.qid)
            return statuses
        if newly_done:
            yield self.spool.mark_done(qmsg, newly_done)
        if remote_left:
            qmsg.attempts = 0           # the remote part's first try is still to come
            for idx in list(qmsg.last):
                qmsg.last.pop(idx)
            self._schedule_retry(qmsg, delay=0)
        else:
            self._schedule_retry(qmsg)
        try:
            yield self.spool.write_status(qmsg)
        except Exception as e:
            self.log.warn("{qid}: could not save the status record: {e}", qid=qmsg.qid, e=e)
        return statuses

    def _age_out(self, qmsg, statuses, now):
        """Delay warnings due and recipients past max_age, after an attempt."""
        env = qmsg.envelope
        age = now - env.arrival
        delays, expired = [], []
        for idx, status in statuses.items():
            if status not in ("deferred", "queued"):
                continue
            last = qmsg.last.get(idx, {})
            if age >= self.max_age:
                enhanced = last.get("enhanced") or "4.4.7"
                reason = last.get("reply") or "no further detail"
                expired.append((idx, env.recipients[idx], RecipientResult(
                    BOUNCED, enhanced, f"delivery time expired; last error: {reason}",
                    remote_mta=last.get("remote_mta", ""),
                    from_remote=bool(last.get("from_remote")))))
                self._log_status(qmsg, env.recipients[idx], env.recipients[idx],
                                 RecipientResult(BOUNCED, enhanced,
                                                 "message expired; last error: " + reason))
            elif age >= self.warn_after and idx not in qmsg.warned:
                delays.append((idx, env.recipients[idx], RecipientResult(
                    DEFERRED, last.get("enhanced") or "4.0.0",
                    last.get("reply") or "delivery is being retried",
                    remote_mta=last.get("remote_mta", ""),
                    from_remote=bool(last.get("from_remote")))))
        return delays, expired

    @staticmethod
    def _last(result, now):
        return {"status": result.status, "enhanced": result.enhanced, "reply": result.reply,
                "remote_mta": result.remote_mta, "from_remote": result.from_remote, "at": now}

    @defer.inlineCallbacks
    def _deliver_targets(self, qmsg, owners, remote=True):
        """Deliver each distinct target once; fire with {target key: RecipientResult}.

        Local targets one after the other (they share one disk thread);
        remote ones grouped per domain, the domains in parallel.
        """
        env = qmsg.envelope
        results = {}
        by_domain = {}
        for key, (target, idxs) in owners.items():
            if target.kind == "remote" and not remote:
                results[key] = RecipientResult(DEFERRED, "4.0.0", "queued for delivery")
            elif target.kind == "remote":
                domain = target.address.rpartition("@")[2].lower()
                by_domain.setdefault(domain, []).append((key, target, idxs))
        # One message never has more transactions started than there can be
        # connections: the rest would only wait in the delivery agent, each
        # with its MX look-ups and state (a list post to 500 domains made
        # 5,000 of them at once, 100 MB for 50 connections).
        slots = Slots(max(1, self.config.delivery.max_connections))
        checkpoint = None
        if env.senders and not any(env.notify):
            # A list's distribution goes out for many seconds: its sent copies
            # are recorded as it goes, so a crash in between does not send
            # them all again. (Only without NOTIFY: a success notice must be
            # queued before the record that ends its recipient.)
            checkpoint = _Checkpoint(self.spool, qmsg, self.log)
        remote_ds = [self._deliver_domain(qmsg, domain, group, results, slots, checkpoint)
                     for domain, group in by_domain.items()]
        for key, (target, idxs) in owners.items():
            if target.kind == "list":
                result = yield self._deliver_list(qmsg, target)
            elif target.kind == "local":
                result = yield self._local_slots.run(self._deliver_local, qmsg, idxs[0],
                                                     target)
            else:
                continue
            results[key] = result
            for idx in idxs:
                self._log_status(qmsg, target.address, env.recipients[idx], result)
        if remote_ds:
            yield defer.DeferredList(remote_ds, consumeErrors=True)
        if checkpoint is not None:
            yield checkpoint.finished()
        return results

    def _deliver_list(self, qmsg, target):
        if self.list_agent is None:
            return defer.succeed(RecipientResult(DEFERRED, "4.3.0",
                                                 "4.3.0 the list server is not running"))
        return self.list_agent.deliver(qmsg, target)

    @defer.inlineCallbacks
    def _deliver_local(self, qmsg, idx, target):
        try:
            written = yield self.local_agent.deliver(qmsg, target.user, target.address,
                                                     idx, target.key)
        except DeliveryError as e:
            if e.permanent:
                return RecipientResult(BOUNCED, "5.2.0", str(e))
            return RecipientResult(DEFERRED, "4.2.0", str(e))
        except Exception as e:
            self.log.failure("{qid}: delivery to <{to}> failed", qid=qmsg.qid,
                             to=target.address)
            return RecipientResult(DEFERRED, "4.3.0", f"4.3.0 delivery failed: {e}")
        return RecipientResult(SENT, "2.0.0", "delivered to maildir" if written
                               else "already delivered")

    @defer.inlineCallbacks
    def _deliver_domain(self, qmsg, domain, group, results, slots, checkpoint=None):
        env = qmsg.envelope
        missing = RecipientResult(DEFERRED, "4.3.0", "4.3.0 no result from the delivery agent")
        if self.remote_agent is None:
            outcome = {n: RecipientResult(DEFERRED, "4.4.0", "4.4.0 remote delivery is "
                                          "not enabled") for n in range(len(group))}
        else:
            # Copies with their own envelope sender (a list's VERP) go in
            # transactions of their own, one per sender, as many at a time
            # as the domain may have deliveries: a list of 10,000 members at
            # one domain never has 10,000 deliveries waiting in memory.
            by_sender = {}
            for n, (key, target, idxs) in enumerate(group):
                by_sender.setdefault(env.sender_of(idxs[0]), []).append(RemoteRecipient(
                    idx=n, address=target.address, notify=env.notify_of(idxs[0]),
                    orcpt=env.orcpt_of(idxs[0])))
            outcome = {}
            todo = iter(by_sender.items())
            crashes = []

            @defer.inlineCallbacks
            def sender_worker():
                for sender, rcpts in todo:
                    view = qmsg if sender == env.sender else SenderView(qmsg, sender)
                    yield slots.acquire()
                    try:
                        got = yield self.remote_agent.deliver(view, domain, rcpts)
                        outcome.update(got)
                        if checkpoint is not None:
                            checkpoint.add(f"{i}:{group[n][0]}" for n, r in got.items()
                                           if r.status == SENT for i in group[n][2])
                    except Exception as e:
                        self.log.failure("{qid}: remote delivery to {domain} crashed",
                                         qid=qmsg.qid, domain=domain)
                        crashes.append(e)
                    finally:
                        slots.release()
            workers = min(len(by_sender), max(1, self.config.delivery.max_per_domain))
            yield defer.gatherResults([sender_worker() for _ in range(workers)])
            if crashes:
                missing = RecipientResult(DEFERRED, "4.3.0",
                                          f"4.3.0 delivery failed: {crashes[-1]}")
        for n, (key, target, idxs) in enumerate(group):
            result = outcome.get(n) or missing
            results[key] = result
            for idx in idxs:
                self._log_status(qmsg, target.address, env.recipients[idx], result)

    def _log_status(self, qmsg, to, orig, result):
        delay = max(0.0, self.reactor.seconds() - qmsg.envelope.arrival)
        orig_part = f", orig_to=<{orig}>" if orig.lower() != to.lower() else ""
        relay = f", relay={result.remote_mta}" if result.remote_mta else ""
        mail_event(self.log, f"{qmsg.qid}: to=<{to}>{orig_part}{relay}, delay={delay:.2f}, "
                             f"dsn={result.enhanced}, status={result.status} ({result.reply})",
                   qid=qmsg.qid, status=result.status)

    # -- the administrator's controls (IQueueControl) ------------------------

    def flush(self, target=None):
        """Attempt now every waiting message, those of one queue id, or those with
        a recipient at one domain (ETRN, ``queue flush``); returns the count."""
        domains = None                      # None: every destination
        if target is None:
            chosen = list(self._messages.values())
        elif target in self._messages:
            chosen = [self._messages[target]]
            domains = self._pending_domains(chosen[0])
        else:
            # RFC 1985: "@example.org" is the domain and its subdomains.
            domain = target.lower().lstrip("@")
            subdomains = target.startswith("@")

            def matches(d):
                return d == domain or (subdomains and d.endswith("." + domain))
            domains = set()
            chosen = []
            for m in self._messages.values():
                hit = {d for d in self._pending_domains(m) if matches(d)}
                if hit:
                    chosen.append(m)
                    domains |= hit
            domains.add(domain)
        if self.remote_agent is not None:
            for d in (None,) if domains is None else sorted(domains):
                self.remote_agent.flush(d)
        count = 0
        for m in chosen:
            if m.qid not in self._inflight:
                self.submit(m)
                count += 1
        return count

    @staticmethod
    def _pending_domains(qmsg):
        """Domains of the recipients of ``qmsg`` not yet done, and of the remote
        destinations they were routed to (forwarding, alias members)."""
        out = set()
        for i, r in enumerate(qmsg.envelope.recipients):
            if f"{i}:*" not in qmsg.done:
                out.add(r.rpartition("@")[2].lower())
        for last in qmsg.last.values():
            if last.get("to"):
                out.add(last["to"].rpartition("@")[2].lower())
        return out

    def hold(self, qid):
        """Put a message on hold (no delivery until released); 1, or KeyError."""
        qmsg = self._messages.get(qid)
        if qmsg is None:
            if qid in self._held:
                return 0
            raise KeyError(qid)
        if self._busy(qid):
            self._after_attempt[qid] = "hold"
            return 1
        self._unschedule(qid)
        return self._move_to_hold(qmsg).addCallback(lambda _: 1)

    def _busy(self, qid):
        return qid in self._inflight and not any(
            q.qid == qid for lane in (self.fresh, self.retries) for q in lane.waiting)

    def _move_to_hold(self, qmsg):
        self._messages.pop(qmsg.qid, None)
        self._held[qmsg.qid] = qmsg
        mail_event(self.log, f"{qmsg.qid}: held by the administrator", qid=qmsg.qid)
        return self.spool.move(qmsg, to_hold=True)

    def release(self, qid):
        """Take a message off hold and attempt it now; 1, or KeyError."""
        qmsg = self._held.pop(qid, None)
        if qmsg is None:
            if self._after_attempt.get(qid) == "hold":
                del self._after_attempt[qid]        # asked during an attempt: never mind
                return 1
            if qid in self._messages:
                return 0
            raise KeyError(qid)
        mail_event(self.log, f"{qid}: released by the administrator", qid=qid)

        def moved(m):
            self.submit(m)
            return 1
        return self.spool.move(qmsg, to_hold=False).addCallback(moved)

    def delete(self, qid):
        """Remove a message without delivering it or notifying anybody; 1, or KeyError."""
        qmsg = self._messages.get(qid) or self._held.get(qid)
        if qmsg is None:
            raise KeyError(qid)
        if qid in self._messages and self._busy(qid):
            self._after_attempt[qid] = "delete"
            return 1
        self._unschedule(qid)
        return self._delete(qmsg).addCallback(lambda _: 1)

    def _delete(self, qmsg):
        self._messages.pop(qmsg.qid, None)
        self._held.pop(qmsg.qid, None)
        mail_event(self.log, f"{qmsg.qid}: removed (deleted by the administrator)",
                   qid=qmsg.qid)
        return self.spool.delete(qmsg)
