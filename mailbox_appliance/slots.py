"""A counting semaphore for the queue and the delivery agent.

Waiters are served first come, first served, and woken from a loop rather
than from inside ``release``: Twisted's DeferredSemaphore (like a plain
"call the next waiter" release) runs the next waiter within the releasing
call, so when that waiter's work ends at once (a domain known dead, an
agent shutting down) it releases in turn one stack frame deeper, and a few
hundred such in a row overflow the stack and lose the waiters.
"""

from __future__ import annotations

import collections

from twisted.internet import defer


class Slots:
    """``limit`` slots; ``acquire()`` a Deferred firing when one is ours, ``release()``
    to give it back (straight to the next waiter, if any). A waiter may be
    cancelled: it leaves the queue, and never keeps a slot."""

    def __init__(self, limit):
        self.limit = limit
        self.used = 0
        self.waiting = collections.deque()
        self._ready = collections.deque()
        self._waking = False

    @property
    def free(self) -> int:
        return self.limit - self.used

    @property
    def idle(self) -> bool:
        return self.used == 0 and not self.waiting

    def acquire(self) -> defer.Deferred:
        if self.used < self.limit and not self.waiting:
            self.used += 1
            return defer.succeed(None)
        d = defer.Deferred(self._cancel)
        self.waiting.append(d)
        return d

    def _cancel(self, d):
        if d in self.waiting:
            self.waiting.remove(d)

    def release(self):
        if not self.waiting:
            self.used -= 1
            return
        # The slot passes straight to the next waiter.
        self._ready.append(self.waiting.popleft())
        if self._waking:
            return                      # the loop below, further up the stack, wakes it
        self._waking = True
        try:
            while self._ready:
                d = self._ready.popleft()
                if d.called:
                    self.release()      # cancelled on the way: its slot goes on
                else:
                    d.callback(None)
        finally:
            self._waking = False
