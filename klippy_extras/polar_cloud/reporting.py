# What the printer tells Polar Cloud unasked: status and version reports.
# A status goes out when something the cloud shows changed, or when its
# interval is up; runs on the session thread.
#
# This file may be distributed under the terms of the GNU GPLv3 license.
from __future__ import annotations

from typing import Any, Callable, Optional

from . import cloud_status, protocol
from .jobs import JobManager
from .port import CloudPort

VERSION_INTERVAL = 24 * 3600.


class Reporter:
    def __init__(self, session: CloudPort, jobs: JobManager):
        self.session = session
        self.jobs = jobs
        self.options = session.options
        self.last_status: Optional[dict] = None
        self.last_key = None
        self.last_time = 0.
        self.version_sent_at = 0.
        self.count = 0
        self.now_flag = False
        # A last word on the status code (timelapse.py: 5 while rendering)
        self.status_filter: Callable[[int, Any], int] = lambda code, job: code
    def status_now(self) -> None:
        """Send a status at the next chance, changed or not."""
        self.now_flag = True
    def online(self, now: float) -> None:
        """A new session: everything goes out again."""
        self.last_key = None
        self.send_version(now)
    def work(self, now: float) -> None:
        if now - self.version_sent_at > VERSION_INTERVAL:
            self.send_version(now)
        self.maybe_send_status(now)
    def send_version(self, now: float) -> None:
        self.version_sent_at = now
        self.session.emit("setVersion", {
            "serialNumber": self.session.serial(),
            "runningVersion": self.session.version})
    def status_message(self) -> Optional[dict]:
        session = self.session
        snap = session.snapshot()
        if snap is None:
            return None
        job = self.jobs.view(snap)
        code = self.status_filter(cloud_status.status_code(
            snap, job, self.session.lab.plate_clear), job)
        job_id = cloud_status.status_job_id(snap, job, code)
        return cloud_status.build_status(
            session.serial(), snap, code, job_id,
            slicer_estimate=self.jobs.slicer_estimate(snap),
            error_text=snap.get("state_message", ""))
    def maybe_send_status(self, now: float) -> None:
        msg = self.status_message()
        if msg is None:
            return
        targets = tuple(v for k, v in sorted(msg.items())
                        if k.startswith("target"))
        key = (msg["status"], msg["jobId"], targets)
        active = msg["status"] not in (protocol.IDLE, protocol.OFFLINE,
                                       protocol.ERROR, protocol.CLEAR_PLATE) \
            or any(targets)
        interval = (self.options.active_interval if active
                    else self.options.status_interval)
        if key == self.last_key and not self.now_flag \
                and now - self.last_time < interval:
            return
        self.now_flag = False
        if self.session.emit("status", msg):
            self.jobs.status_sent(msg["status"])
            self.count += 1
            self.last_key = key
            self.last_time = now
            self.last_status = msg
            self.session.publish()
