# How long the printer has been offline, for a handful of log lines per
# outage instead of one per attempt
#
# This file may be distributed under the terms of the GNU GPLv3 license.
from __future__ import annotations

import logging
import time

from .ratelog import RateLimitedLog, duration_text

log = logging.getLogger("polar_cloud")

SUMMARY_AFTER = 60.


class Outage:
    def __init__(self, rlog: RateLimitedLog):
        self.rlog = rlog
        self.since = 0.         # 0: online, or not trying
        self.attempts = 0
    def retry(self, why: str, delay: float) -> None:
        """A failed attempt; the next one in delay seconds."""
        now = time.monotonic()
        if not self.since:
            self.since, self.attempts = now, 0
        self.attempts += 1
        # Repeats of the same reason are one line per 10 minutes, which
        # then says how long the outage has lasted
        summary = ""
        if now - self.since >= SUMMARY_AFTER:
            summary = " (offline for %s, %d attempts)" % (
                duration_text(now - self.since), self.attempts)
        self.rlog("retry:" + why[:40], "%s; retry in %.0f s%s", why, delay,
                  summary, level=logging.WARNING)
    def over(self, serial: str) -> None:
        """Online again."""
        if self.since:
            log.info("polar_cloud: online as %s after %s offline"
                     " (%d attempts)", serial,
                     duration_text(time.monotonic() - self.since),
                     self.attempts)
        else:
            log.info("polar_cloud: online as %s", serial)
        self.since = 0.
    def forget(self) -> None:
        """Not trying any more (unregistered, disabled, stopped)."""
        self.since = 0.
