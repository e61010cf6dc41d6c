# Cloud print jobs: validation, start, tracking, the final report
#
# The JobManager runs on the cloud session's thread; the download runs
# in a helper child process (download.py, fetcher.py); printer actions go
# through the reactor bridge; final reports wait in the outbox
# (outbox.py).
#
# This file may be distributed under the terms of the GNU GPLv3 license.
from __future__ import annotations

import collections
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from . import cloud_status, inbound, netpolicy, protocol
from .download import Download
from .gcodefile import read_slicer_estimate
from .jobnames import safe_job_filename, shown_id
from .outbox import Outbox
from .port import CloudPort
from .ratelog import LineBudget
from .statefiles import StateFileError, read_json, write_json

log = logging.getLogger("polar_cloud")

JOB_FILE = "job.json"
SEEN_LIMIT = 100
FINAL_REPORTS = 3
# klippy's own start of a print (the file opened, the first moves queued)
# is milliseconds of CPU right after SDCARD_PRINT_FILE answers; under a
# CPU quota the job's save and status on top of it throttled the group
# twice in a row.  They wait it out.
PRINT_START_SETTLE = .1
PAUSE_RESUME = "pause-resume"      # the G-code queue's key for both


# Job tracking

@dataclass
class Job:
    job_id: str
    name: str
    filename: str
    phase: str = "downloading"   # downloading, starting, printing,
    #                              cancelling, done
    final_code: int = protocol.IDLE
    final_reports: int = 0
    started: float = field(default_factory=time.time)
    # Snapshots sampled before the print started say nothing about it
    start_mono: float = 0.


class JobManager:
    """The current cloud job, the jobs already seen and the outbox."""

    def __init__(self, session: CloudPort):
        self.session = session
        self.options = session.options
        state_dir = session.options.state_path
        self.job_path = os.path.join(state_dir, JOB_FILE)
        self.job: Optional[Job] = None
        self.seen: collections.deque = collections.deque(maxlen=SEEN_LIMIT)
        self.outbox = Outbox(session)
        self.download: Optional[Download] = None
        self.last_print: dict[str, float] = {}
        self.estimate_path = ""
        self.estimate = 0.
        # A flood of refused prints is answered in full, but not written
        # out in full
        self.refusal_lines = LineBudget(60, 60.)
        session.on("print", lambda data: self.handle_print(
            data, session.snapshot()))
        for action in ("pause", "resume", "cancel"):
            session.on(action, lambda data, action=action: self.control(
                action, data, session.snapshot()))
    # Persistence (session thread)
    def load(self) -> None:
        try:
            data = read_json(self.job_path) or {}
            self.outbox.load()
        except StateFileError as e:
            log.warning("polar_cloud: ignoring job state: %s", e)
            return
        job = data.get("job")
        if isinstance(job, dict) and isinstance(job.get("job_id"), str) \
                and inbound.read_job_id(job["job_id"]) is not None:
            fields = {k: job[k] for k in Job.__dataclass_fields__ if k in job}
            self.job = Job(**fields)
            self.job.start_mono = 0.
        self.seen.extend(i for i in data.get("seen", []) if isinstance(i, str))
        if self.job is not None and self.job.phase in ("downloading",
                                                       "starting"):
            # Its download (or start) died with the previous klippy and
            # cannot resume: end it, or the printer stays "busy" for good
            log.info("polar_cloud: job %s was interrupted by a restart",
                     shown_id(self.job.job_id))
            self.finish("canceled", None)
    def save(self) -> None:
        if self.session.abandoned:
            return
        try:
            write_json(self.job_path, {
                "job": asdict(self.job) if self.job else None,
                "seen": list(self.seen)})
        except OSError as e:
            log.warning("polar_cloud: cannot save job state: %s", e)
    # Views for the status message
    def view(self, snap: Optional[dict] = None) -> Optional[cloud_status.JobView]:
        job = self.job
        if job is None:
            return None
        phase = job.phase
        if phase == "printing" and snap is not None \
                and snap.get("mono", 0.) < job.start_mono:
            phase = "starting"      # the snapshot predates the start
        return cloud_status.JobView(job.job_id, phase, job.filename,
                                job.final_code)
    def slicer_estimate(self, snap: dict) -> float:
        path = snap.get("file_path") or ""
        if path != self.estimate_path:
            self.estimate_path = path
            self.estimate = read_slicer_estimate(path) if path else 0.
        return self.estimate
    def status_sent(self, code: int) -> None:
        job = self.job
        # Status 5 (a timelapse being made) is not one of the final three
        if job is not None and job.phase == "done" \
                and code != protocol.POSTPROCESSING:
            job.final_reports += 1
            if job.final_reports >= FINAL_REPORTS:
                self.job = None
                self.save()
    # Cloud commands
    def handle_print(self, data: Any, snap: Optional[dict]) -> None:
        """Every print with a job id ends in a print or a 'canceled' report
        (a print without one, or for another printer, raises
        ProtocolError: there is nobody to answer)."""
        serial = self.session.serial()
        req = inbound.parse_print(data, serial)
        job = self.job
        if (job is not None and job.job_id == req.job_id) \
                or req.job_id in self.seen:
            # a flood of repeats stays quiet
            self.session.rlog("repeat", "print %s already handled; ignoring"
                              " the repeat", shown_id(req.job_id))
            return
        self.seen.append(req.job_id)
        reason, cause = self._refusal(req, snap)
        if reason:
            # Kept in memory only: a refused job sent again after a
            # restart is simply judged again
            self._refuse(req.job_id, reason, cause)
            return
        static = snap["static"]
        filename = safe_job_filename(req.job_name, req.job_id)
        self.job = Job(req.job_id, req.job_name[:80], filename)
        self.save()
        log.info("polar_cloud: job %s: downloading as %s",
                 shown_id(req.job_id), filename)
        self.session.console("Polar Cloud: downloading job '%s'"
                             % (filename,))
        self.download = Download(
            req.url, static["sdcard_dir"], filename,
            self.options.max_job_size, self.session.loopback_test_server(),
            self.session.stop_event,
            lambda err, size, jid=req.job_id: self.session.post(
                self.download_done, jid, err, size),
            ca_file=self.options.ca_file)
        self.download.start()
        self.session.status_now()
    def _refusal(self, req: inbound.PrintRequest,
                 snap) -> tuple[str, str]:
        """Why the job cannot be printed, and the message field at fault
        ("" when the printer's state is the reason)."""
        if req.problem:
            return req.problem, req.field
        if snap is None or snap.get("klippy_state") != "ready":
            return "the printer is not ready", ""
        if not snap.get("static", {}).get("sdcard_dir"):
            return "no [virtual_sdcard] is configured", ""
        if self.job is not None and self.job.phase != "done":
            return "the printer is busy with job %s" % (
                shown_id(self.job.job_id),), ""
        if snap.get("print_state") in ("printing", "paused") \
                or snap.get("is_active"):
            return "the printer is busy printing", ""
        if self.session.lab.refusal():
            return self.session.lab.refusal(), ""
        problem = netpolicy.check_url(req.url,
                                      self.session.loopback_test_server())
        if problem:
            return "refused download URL: %s" % (problem,), req.kind
        return "", ""
    def refuse_unread(self, job_id: str, reason: str) -> None:
        """A print whose message could not be read in full."""
        if job_id not in self.seen:
            self.seen.append(job_id)
            self._refuse(job_id, reason)
    def _refuse(self, job_id: str, reason: str, cause: str = "") -> None:
        # Every refused job is answered; a flood of them is not a flood of
        # console and log lines
        if self.refusal_lines.allow():
            self.session.console("Polar Cloud: job %s refused: %s%s" % (
                shown_id(job_id), reason, " [%s]" % (cause,) if cause
                else ""), error=True)
        self.queue_final(job_id, "canceled", 0., 0.)
    def download_done(self, job_id: str, error: str, size: int) -> None:
        self.download = None
        job = self.job
        if job is None or job.job_id != job_id or job.phase != "downloading":
            return
        if error:
            self.session.console("Polar Cloud: job %s failed: %s"
                                 % (shown_id(job_id), error), error=True)
            self.finish("canceled", None)
            return
        log.info("polar_cloud: job %s: downloaded %d bytes",
                 shown_id(job_id), size)
        job.phase = "starting"
        self.save()
        self.session.run_gcode(
            "print:" + job_id,
            'SDCARD_PRINT_FILE FILENAME="%s"' % (job.filename,),
            lambda ok, err, jid=job_id: self.session.post(
                self.print_started, jid, ok, err))
    def print_started(self, job_id: str, ok: bool, error: str) -> None:
        job = self.job
        if job is None or job.job_id != job_id or job.phase != "starting":
            return
        if not ok:
            self.session.console("Polar Cloud: job %s could not start: %s"
                                 % (shown_id(job_id), error), error=True)
            self.finish("canceled", None)
            return
        job.start_mono = time.monotonic()
        if self.session.stop_event.wait(PRINT_START_SETTLE):
            return      # klippy is going: the next one finds "starting"
        job.phase = "printing"
        self.save()
        self.session.console("Polar Cloud: printing job '%s'" % (job.filename,))
        self.session.status_now()
    def control(self, action: str, data: Any, snap: Optional[dict]) -> None:
        """pause, resume and cancel from the cloud."""
        if data is not None:
            if not isinstance(data, dict):
                raise protocol.ProtocolError("%s: payload is not an object"
                                             % (action,))
            inbound.check_serial(data, self.session.serial(), action)
        state = (snap or {}).get("print_state")
        ready = (snap or {}).get("klippy_state") == "ready"
        if action in ("pause", "resume") and ready:
            state = self._expected_state(action, state)
            if state is None:
                return
        applies = ready and {"pause": state == "printing",
                             "resume": state == "paused",
                             "cancel": state in ("printing", "paused")
                             }[action]
        job = self.job
        if action == "cancel" and job is not None and job.phase in (
                "downloading", "starting"):
            if self.download is not None:
                self.download.cancel()
            self.finish("canceled", snap)
            return
        if not applies:
            log.info("polar_cloud: cloud %s ignored: printer is %s", action,
                     state if ready else "not ready")
            return
        if action == "cancel" and job is not None and job.phase == "printing":
            job.phase = "cancelling"
            self.save()
        script = {"pause": "PAUSE", "resume": "RESUME",
                  "cancel": "CANCEL_PRINT"}[action]
        log.info("polar_cloud: cloud %s -> %s", action, script)
        key = "cancel" if action == "cancel" else PAUSE_RESUME
        self.session.run_gcode(key, script,
                               self.session.report_failure(script))
        self.session.status_now()
    def _expected_state(self, action: str, state: str) -> Optional[str]:
        """The print state once the pause or resume already on its way to
        klippy has run; None when the new one just undoes a waiting one,
        or repeats it."""
        queue = self.session.gcode
        script = "PAUSE" if action == "pause" else "RESUME"
        waiting = queue.waiting_script(PAUSE_RESUME)
        if waiting:
            if waiting != script:
                queue.withdraw(PAUSE_RESUME)
                log.info("polar_cloud: cloud %s undoes the waiting %s",
                         action, waiting)
                self.session.status_now()
            return None
        running = queue.running_script(PAUSE_RESUME)
        if running and state in ("printing", "paused"):
            return "paused" if running == "PAUSE" else "printing"
        return state
    # Watching the print
    def watch(self, snap: Optional[dict]) -> None:
        job = self.job
        if snap is None or job is None or job.phase not in ("printing",
                                                            "cancelling"):
            return
        if snap.get("mono", 0.) < job.start_mono:
            return
        if snap.get("klippy_state") != "ready":
            if snap.get("klippy_state") in ("shutdown", "error"):
                self.finish("canceled", snap)
            return
        state = snap.get("print_state")
        same_file = snap.get("filename") == job.filename
        if same_file and state == "complete":
            self.finish("completed", snap)
        elif same_file and state == "standby":
            # Loaded, not started yet: virtual_sdcard starts the print on
            # its next timer, after SDCARD_PRINT_FILE has answered (a reset
            # clears the file name)
            return
        elif not same_file or state in ("cancelled", "error"):
            # cancelled, failed, reset, or replaced by another print
            self.finish("canceled", snap)
    def finish(self, state: str, snap: Optional[dict]) -> None:
        job = self.job
        if job is None:
            return
        seconds = filament = 0.
        if snap is not None and snap.get("filename") == job.filename:
            seconds = snap.get("print_duration", 0.)
            filament = snap.get("filament_used", 0.)
        job.phase = "done"
        job.final_code = protocol.COMPLETE if state == "completed" \
            else protocol.IDLE
        job.final_reports = 0
        self.save()
        self.queue_final(job.job_id, state, seconds, filament)
        self.session.lab.job_finished(state)
        log.info("polar_cloud: job %s %s", shown_id(job.job_id), state)
        if state == "completed":
            self.session.console("Polar Cloud: job '%s' completed"
                                 % (job.filename,))
        self.session.status_now()
    # Final reports (the outbox)
    def queue_final(self, job_id: str, state: str, seconds: float,
                    filament: float) -> None:
        self.outbox.queue(job_id, state, seconds, filament)
    def flush(self) -> None:
        self.outbox.flush()
    def link_lost(self) -> None:
        self.outbox.link_lost()
    def forget_identity(self) -> None:
        """The printer was deleted or unregistered: its pending reports and
        its cloud job belong to that serial and never go out under another
        one.  A print keeps running, as a local print."""
        dropped = self.outbox.forget()
        job, self.job = self.job, None
        if job is not None:
            if self.download is not None:
                self.download.cancel()
            self.save()
            log.info("polar_cloud: job %s is no longer a cloud job",
                     shown_id(job.job_id))
        if dropped:
            log.info("polar_cloud: %d job report(s) of the old printer"
                     " dropped", dropped)
    def stop(self) -> None:
        """Any thread; never blocks: the download's child is killed."""
        download = self.download
        if download is not None:
            download.cancel()
