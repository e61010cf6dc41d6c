# The outbox: a cloud job's final report ("job": completed or canceled)
# until the cloud has it
#
# Reports wait in outbox.json over disconnects and restarts.  A sent
# report leaves the file at once (a clean disconnect still delivers it)
# but stays in memory until it is settled: acknowledged by the cloud (a
# Socket.IO ack), or followed by traffic from the cloud a few seconds
# later.  If the link drops before that, it goes out again.  Runs on the
# cloud session's thread.
#
# This file may be distributed under the terms of the GNU GPLv3 license.
from __future__ import annotations

import logging
import os
import time

from . import messages, protocol
from .jobnames import shown_id
from .port import CloudPort
from .ratelog import LineBudget
from .statefiles import read_json, write_json

log = logging.getLogger("polar_cloud")

OUTBOX_FILE = "outbox.json"
OUTBOX_SETTLE = 5.


class Outbox:
    """Final job reports not yet settled with the cloud."""

    def __init__(self, session: CloudPort):
        self.session = session
        self.path = os.path.join(session.options.state_path, OUTBOX_FILE)
        self.pending: list[dict] = []
        self.saved: list[dict] = []         # as on disk
        self.unsettled: list[tuple[float, dict]] = []
        self.report_lines = LineBudget(60, 60.)
    def __len__(self) -> int:
        return len(self.pending)
    def load(self) -> None:
        """Raises StateFileError for an unreadable file."""
        stored = read_json(self.path) or []
        self.pending = [m for m in stored if isinstance(m, dict)
                        and m.get("state") in ("completed", "canceled")]
        self.saved = list(self.pending)
    def save(self) -> None:
        if self.session.abandoned or self.pending == self.saved:
            return
        try:
            write_json(self.path, self.pending)
            self.saved = list(self.pending)
        except OSError as e:
            log.warning("polar_cloud: cannot save the outbox: %s", e)
    def queue(self, job_id: str, state: str, seconds: float,
              filament: float) -> None:
        serial = self.session.serial()
        if serial is None:
            # Unregistered: the job's printer is gone, nobody to tell
            log.info("polar_cloud: job %s %s; not reported (not registered)",
                     shown_id(job_id), state)
            return
        self.pending.append(messages.build_job(serial, job_id, state,
                                               seconds, filament))
        self.flush()
    def flush(self) -> None:
        """Send what is pending; settle what the cloud has."""
        now = time.monotonic()
        last_rx = self.session.last_rx()
        self.unsettled = [(t, m) for t, m in self.unsettled
                          if not (last_rx > t and now - t >= OUTBOX_SETTLE)]
        if not self.pending or not self.session.is_online():
            self.save()
            return
        serial = self.session.serial()
        pending, self.pending = self.pending, []
        for msg in pending:
            if msg.get("serialNumber") != serial:
                # Made for another identity (deleted, unregistered, or
                # registered again since): never sent under this one
                log.info("polar_cloud: job %s report of printer %s dropped",
                         shown_id(str(msg.get("jobId"))),
                         protocol.cloud_text(msg.get("serialNumber"), 64)
                         or "(none)")
                continue
            if self.session.emit("job", msg, callback=self._ack(msg)):
                if self.report_lines.allow():
                    log.info("polar_cloud: job %s reported %s",
                             shown_id(msg["jobId"]), msg["state"])
                self.unsettled.append((now, msg))
            else:
                self.pending.append(msg)
        self.save()
    def _ack(self, msg: dict):
        def ack(*args) -> None:     # on the Socket.IO read thread
            self.session.post(self.acknowledged, msg)
        return ack
    def acknowledged(self, msg: dict) -> None:
        self.unsettled = [(t, m) for t, m in self.unsettled if m is not msg]
    def link_lost(self) -> None:
        """Reports sent just before the link dropped go out again."""
        if self.unsettled:
            self.pending = [m for _t, m in self.unsettled] + self.pending
            self.unsettled = []
            self.save()
    def forget(self) -> int:
        """Drop every report (the printer's identity is gone); how many."""
        dropped = len(self.pending) + len(self.unsettled)
        self.pending, self.unsettled = [], []
        self.save()
        return dropped
