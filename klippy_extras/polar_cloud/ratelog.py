# Log lines the cloud cannot multiply: one line per category per period
#
# This file may be distributed under the terms of the GNU GPLv3 license.
from __future__ import annotations

import collections
import logging
import time

log = logging.getLogger("polar_cloud")


def duration_text(seconds: float) -> str:
    if seconds < 120.:
        return "%d s" % (seconds,)
    if seconds < 7200.:
        return "%d min" % (seconds // 60,)
    return "%.1f h" % (seconds / 3600.,)


class RateLimitedLog:
    """One line per key per period; repeats are counted.  Keys name a
    category of message, never a value the cloud chose; the table is
    bounded all the same."""

    def __init__(self, period: float = 600., max_keys: int = 256):
        self.period = period
        self.max_keys = max_keys
        self.last: dict[str, float] = {}
        self.suppressed: dict[str, int] = collections.Counter()
    def __call__(self, key: str, msg: str, *args, level=logging.INFO,
                 exc_info=None) -> bool:
        """Log unless key was logged within the period; True if logged."""
        now = time.monotonic()
        last = self.last.get(key)
        if last is not None and now - last < self.period:
            self.suppressed[key] += 1
            return False
        if last is None and len(self.last) >= self.max_keys:
            self._forget_old(now)
        self.last[key] = now
        count = self.suppressed.pop(key, 0)
        if count:
            msg += " (%d similar suppressed)" % (count,)
        log.log(level, "polar_cloud: " + msg, *args, exc_info=exc_info)
        return True
    def _forget_old(self, now: float) -> None:
        expired = [k for k, t in self.last.items() if now - t >= self.period]
        if len(expired) < self.max_keys // 2:
            # Still crowded: forget the oldest half
            expired = sorted(self.last, key=self.last.get)[
                :self.max_keys // 2]
        for key in expired:
            del self.last[key]
            self.suppressed.pop(key, None)


class LineBudget:
    """At most `count` lines per `period` seconds."""

    def __init__(self, count: int, period: float):
        self.period = period
        self.times: collections.deque = collections.deque(maxlen=count)
    def allow(self) -> bool:
        now = time.monotonic()
        if len(self.times) == self.times.maxlen \
                and now - self.times[0] < self.period:
            return False
        self.times.append(now)
        return True
