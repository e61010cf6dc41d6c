# Cloud-initiated G-code, one script at a time
#
# A script handed to the reactor while klippy's G-code mutex is held (a
# print waiting in M190, a G28, a full look-ahead queue) parks a reactor
# greenlet until the mutex is free.  A burst of them exhausts the stack and
# shuts klippy down mid-print.  So at most one cloud script is in flight
# on the reactor; the others wait here, on the session thread, coalesced
# by key: a newer request with the same key replaces the waiting one.
#
# This file may be distributed under the terms of the GNU GPLv3 license.
from __future__ import annotations

import collections
from typing import Callable

Reply = Callable[[bool, str], None]
MAX_WAITING = 32
OVERFLOW_ERROR = "too many cloud commands are waiting; dropped"


class GcodeQueue:
    """Used from the session thread only; `run` hands a script to the
    reactor and calls back on the reactor, `finished` brings the news back
    to the session thread, which then calls done()."""

    def __init__(self, run: Callable[[str, Reply], None],
                 finished: Callable[[], None], limit: int = MAX_WAITING):
        self.run = run
        self.finished = finished
        self.limit = limit
        self.waiting: collections.OrderedDict[str, tuple[str, Reply]] = \
            collections.OrderedDict()
        self.in_flight = ""
        self.in_flight_script = ""
        self.dropped = 0
    def submit(self, key: str, script: str, reply: Reply) -> bool:
        """Queue a script; False (and reply(False, ...)) when full."""
        if key not in self.waiting and len(self.waiting) >= self.limit:
            self.dropped += 1
            reply(False, OVERFLOW_ERROR)
            return False
        self.waiting[key] = (script, reply)
        self._next()
        return True
    def waiting_script(self, key: str) -> str:
        entry = self.waiting.get(key)
        return entry[0] if entry else ""
    def running_script(self, key: str) -> str:
        return self.in_flight_script if key == self.in_flight else ""
    def withdraw(self, key: str) -> bool:
        """Forget the script waiting for key, if any."""
        return self.waiting.pop(key, None) is not None
    def done(self) -> None:
        self.in_flight = self.in_flight_script = ""
        self._next()
    def _next(self) -> None:
        if self.in_flight or not self.waiting:
            return
        key, (script, reply) = self.waiting.popitem(last=False)
        self.in_flight, self.in_flight_script = key, script

        def on_reactor(ok: bool, error: str) -> None:
            try:
                reply(ok, error)
            finally:
                self.finished()
        self.run(script, on_reactor)
