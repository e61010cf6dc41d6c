"""Thread-safe event log shared by the simulator's loop thread and the tests.

Everything the simulator sees or does is appended here under one lock; a
condition variable wakes waiters, so tests block on state changes instead of
polling with sleeps.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

from ..servers import wait_until

IN, OUT, CONN = "in", "out", "conn"


@dataclass(frozen=True)
class SimEvent:
    """One recorded event.

    direction: ``"in"`` (printer -> cloud), ``"out"`` (cloud -> printer) or
    ``"conn"`` (connection life cycle: ``connect``, ``authenticated``,
    ``disconnect``, ``refused``).  ``ok`` is False for inbound events the
    cloud did not accept (e.g. ``status`` before a successful ``hello``).
    """

    seq: int
    t: float
    sid: Optional[str]
    serial: Optional[str]
    direction: str
    name: str
    data: Any
    ok: bool = True


class Recorder:
    def __init__(
        self,
        on_event: Callable[[SimEvent], None] | None = None,
        on_violation: Callable[[str], None] | None = None,
    ) -> None:
        self.lock = threading.RLock()
        self.cond = threading.Condition(self.lock)
        self.log: list[SimEvent] = []
        self.violations: list[str] = []
        self.attempts: list[tuple[float, str]] = []
        self.uploads: list[dict[str, Any]] = []
        self.upload_attempts: list[dict[str, Any]] = []
        self.file_hits: dict[str, int] = {}
        self._seq = 0
        self.on_event = on_event
        self.on_violation = on_violation

    # -- writers (any thread) ------------------------------------------------

    def record(
        self,
        sid: str | None,
        serial: str | None,
        direction: str,
        name: str,
        data: Any,
        ok: bool = True,
    ) -> SimEvent:
        with self.cond:
            self._seq += 1
            ev = SimEvent(
                self._seq, time.monotonic(), sid, serial, direction, name, data, ok
            )
            self.log.append(ev)
            self.cond.notify_all()
        if self.on_event:
            try:
                self.on_event(ev)
            except Exception:  # a printing callback must never break the server
                pass
        return ev

    def violation(self, message: str, who: str | None = None) -> None:
        text = f"[{who}] {message}" if who else message
        with self.cond:
            self.violations.append(text)
            self.cond.notify_all()
        if self.on_violation:
            try:
                self.on_violation(text)
            except Exception:
                pass

    def attempt(self, outcome: str) -> None:
        with self.cond:
            self.attempts.append((time.monotonic(), outcome))
            self.cond.notify_all()

    def hit(self, name: str) -> None:
        with self.cond:
            self.file_hits[name] = self.file_hits.get(name, 0) + 1
            self.cond.notify_all()

    def notify(self) -> None:
        with self.cond:
            self.cond.notify_all()

    def clear(self) -> None:
        with self.cond:
            self.log.clear()
            self.violations.clear()
            self.attempts.clear()
            self.uploads.clear()
            self.upload_attempts.clear()
            self.file_hits.clear()
            self.cond.notify_all()

    # -- readers -------------------------------------------------------------

    def select(
        self,
        name: str | None = None,
        direction: str | None = None,
        serial: str | None = None,
        since: float | None = None,
        ok: bool | None = None,
        sid: str | None = None,
    ) -> list[SimEvent]:
        with self.lock:
            return [
                ev
                for ev in self.log
                if (name is None or ev.name == name)
                and (direction is None or ev.direction == direction)
                and (serial is None or ev.serial == serial)
                and (since is None or ev.t >= since)
                and (ok is None or ev.ok == ok)
                and (sid is None or ev.sid == sid)
            ]

    def wait_until(self, check: Callable[[], Any], timeout: float, what: str) -> Any:
        """Block until ``check()`` returns something truthy; return it.

        ``check`` runs under the lock each time anything is recorded or any
        session changes.  Raises TimeoutError with ``what`` on timeout.
        """
        return wait_until(self.cond, check, timeout, what)
