# When to take webcam snapshots, and where their results go.  The camera
# (camera.py) keeps the schedule and its worker does the work
# (snapshot_worker.py); this decides when, on the session thread.
#
# This file may be distributed under the terms of the GNU GPLv3 license.
from __future__ import annotations

import time
from typing import Any, Optional

from . import camera, protocol
from .jobs import JobManager
from .port import CloudPort
from .snapshot_worker import SnapshotResult


class Snapshots:
    def __init__(self, session: CloudPort, jobs: JobManager):
        self.session = session
        self.jobs = jobs
        self.camera = camera.Camera(
            session.options.camera, session.loopback_test_server(),
            session.stop_event,
            lambda result: session.post(self.done, result),
            ca_file=session.options.ca_file)
        self.last: Optional[SnapshotResult] = None
        # Where timelapse upload URLs go (timelapse.py, set by the session)
        self.timelapse = None
        session.on("getUrlResponse", self.on_url_response)
    def kind(self) -> tuple[str, str]:
        job = self.jobs.view()
        if job is not None and job.phase in ("downloading", "starting",
                                             "printing"):
            return "printing", job.job_id
        return "idle", protocol.NO_JOB_ID
    def probe(self) -> None:
        """A first snapshot, so the hello can say whether there is a
        camera."""
        now = time.monotonic()
        if self.camera.due("idle", now):
            self.camera.start("idle", protocol.NO_JOB_ID, now)
    def work(self, now: float) -> None:
        kind, job_id = self.kind()
        cam = self.camera
        if cam.needs_url(kind, job_id, now) and self.session.emit("getUrl", {
                "serialNumber": self.session.serial(), "method": "post",
                "type": kind, "jobId": job_id}):
            cam.url_requested(kind, job_id, now)
        if cam.due(kind, now, job_id):
            cam.start(kind, job_id, now)
    def manual(self) -> None:
        kind, job_id = self.kind()
        if not self.camera.start(kind, job_id, time.monotonic(), manual=True):
            self.session.console("Polar Cloud: a snapshot is already running"
                                 " (or the session is stopping)")
    def on_url_response(self, data: Any) -> None:
        slot = camera.parse_url_response(
            data, self.session.serial(), self.session.loopback_test_server(),
            time.monotonic())
        owner = self.timelapse if slot.type == "timelapse" else self.camera
        owner.set_slot(slot)
    def done(self, result: SnapshotResult) -> None:
        self.last = result
        self.session.publish()  # the camera may answer now, or no more
        if not result.manual:
            return
        if result.fetched:
            text = "snapshot %d bytes, %d bytes after processing" % (
                result.fetched, result.final)
        else:
            text = "no snapshot"
        if result.uploaded:
            text += "; uploaded to Polar Cloud"
        elif result.error:
            text += "; %s" % (result.error,)
        else:
            text += "; not uploaded (no upload URL yet)"
        self.session.console("Polar Cloud: " + text, error=not result.ok)
