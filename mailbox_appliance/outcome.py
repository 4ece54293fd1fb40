"""A one-time outcome that any number of callers may wait for, before or after it is known."""

from twisted.internet import defer


class Outcome:
    """Remembers success or failure once; each waiter gets its own Deferred.

    Used for readiness ("the directory is listening") where callers may ask
    before start-up finished or long after; ``reset`` forgets it again (stop).
    """

    def __init__(self):
        self._result = None          # None while unknown; else (ok, value)
        self._waiting = []

    @property
    def known(self):
        return self._result is not None

    def wait(self):
        if self._result is not None:
            ok, value = self._result
            return defer.succeed(value) if ok else defer.fail(value)
        d = defer.Deferred(lambda d: d in self._waiting and self._waiting.remove(d))
        self._waiting.append(d)
        return d

    def settle(self, ok, value):
        self._result = (ok, value)
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            if ok:
                d.callback(value)
            else:
                d.errback(value)

    def reset(self):
        self._result = None
