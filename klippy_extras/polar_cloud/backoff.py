# Reconnect delays: exponential with proportional jitter
#
# This file may be distributed under the terms of the GNU GPLv3 license.
from __future__ import annotations

import random
from typing import Callable, Optional


class Backoff:
    """Attempt n waits uniform(0.5, 1.5) * min(cap, base * 2**n) seconds.

    Proportional jitter (not python-socketio's additive +/-0.5 s) keeps a
    fleet of printers that lost the cloud at the same moment from coming
    back at the same moment.  The attempt count is only reset once a
    session has been stable, so a flapping link keeps backing off.
    """

    def __init__(self, base: float = 2., cap: float = 120., jitter: float = .5,
                 rand: Optional[Callable[[], float]] = None):
        self.base = base
        self.cap = cap
        self.jitter = jitter
        self.rand = rand or random.random
        self.attempts = 0
    def nominal(self) -> float:
        return min(self.cap, self.base * (2 ** min(self.attempts, 30)))
    def next_delay(self) -> float:
        nominal = self.nominal()
        self.attempts += 1
        factor = 1. - self.jitter + 2. * self.jitter * self.rand()
        return nominal * factor
    def reset(self) -> None:
        self.attempts = 0
