# Timelapses of cloud prints, uploaded to Polar Cloud's print history
#
# While a cloud job prints, frames are kept: one at each layer change when
# the file reports layers (SET_PRINT_STATS_INFO CURRENT_LAYER=...), else
# one per snapshot_interval_printing.  When the job completes, its `job`
# report has already gone (jobs.py); then status 5 is reported while the
# timelapse is made: a last frame, getUrl type "timelapse" (its maxSize
# sizes the video), an MP4 by ffmpeg, the upload.  An upload that fails
# is tried again after the next hello, for a day at most.
#
# The scheduling below runs on the session thread and does no I/O beyond
# reading a few small files at start-up.  Frames are fetched and written
# by the imaging child (imagingchild.run_imaging) on the frame worker; the
# render (render.py) and the upload (uploads.py) run on the post worker.
# Nothing here can fail or delay a job or its report.
#
# This file may be distributed under the terms of the GNU GPLv3 license.
from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import os
import time
from dataclasses import dataclass
from typing import Optional

from . import camera, children, cloud_status, protocol, render, uploadchild, uploads
from .frames import FrameStore, Stopped, capture
from .options import TimelapseOptions
from .worker import Worker, contained

log = logging.getLogger("polar_cloud")

URL_WAIT = 30.              # for getUrlResponse, before trying again later
RETRY_FOR = 24 * 3600.      # after the print; then the frames are deleted
UPLOAD_NAME = "timelapse.mp4"
NO_FFMPEG = "ffmpeg is not installed"


@dataclass
class Recording:
    job_id: str
    layer: Optional[int] = None
    last: float = 0.
    want: bool = False
    frames: int = 0


@dataclass
class Post:
    """One attempt to make and upload a job's timelapse."""
    job_id: str
    active: bool                # right after the print: status 5 meanwhile
    phase: str = "frames"       # frames, url, render, upload
    asked: float = 0.
    slot: Optional[uploads.UploadSlot] = None
    video: str = ""
    size: int = 0
    plan: Optional[render.Plan] = None
    took: float = 0.


class Timelapse:
    def __init__(self, session):
        self.session = session
        self.opts: TimelapseOptions = session.options.timelapse
        self.camera: camera.Camera = session.camera
        self.stop_event = session.stop_event
        self.store = FrameStore(session.options.state_path,
                                self.opts.max_bytes, self.stop_event)
        self.children = children.Children(self.stop_event)
        self.frames = Worker("polar_cloud-frames", self.stop_event)
        self.post = Worker("polar_cloud-timelapse", self.stop_event)
        self.ffmpeg = ""
        self.off = ""               # why there are no timelapses
        self.loaded = False
        self.rec: Optional[Recording] = None
        self.orphans: list[str] = []    # recordings found at start-up
        self.current: Optional[Post] = None
        self.ready: collections.deque[Post] = collections.deque()
        self.waiting: dict[str, float] = {}  # job id -> completed (wall)
    # Session-thread API
    @contained()
    def tick(self, now: float, snap: Optional[dict]) -> None:
        self._load()
        job = self.session.jobs.view(snap)
        if self.orphans:
            self._adopt(job)
        self._record(now, snap, job)
        self._advance(now)
    @contained()
    def online_work(self, now: float) -> None:
        cur = self.current
        if cur is None or cur.phase != "url" or cur.asked:
            return
        if self.session.emit("getUrl", {
                "serialNumber": self.session.serial(), "method": "post",
                "type": "timelapse", "jobId": cur.job_id}):
            cur.asked = now
    @contained()
    def set_slot(self, slot: uploads.UploadSlot) -> None:
        cur = self.current
        if cur is None or slot.job_id not in ("", cur.job_id):
            return
        cur.slot = dataclasses.replace(slot, job_id=cur.job_id)
        cur.asked = 0.
        self._advance(time.monotonic())
    @contained()
    def hello_done(self) -> None:
        """Uploads that failed are tried again, once per connection."""
        self._load()
        now = time.time()
        for job_id, completed in sorted(self.waiting.items(),
                                        key=lambda item: item[1]):
            if now - completed > RETRY_FOR:
                log.info("polar_cloud: timelapse of job %s not uploaded for"
                         " a day; deleted", job_id)
                self.post.submit(self.store.remove, job_id)
            else:
                self.ready.append(Post(job_id, active=False))
        self.waiting.clear()
    @contained(lambda code, job: code)
    def status_code(self, code: int, job: Optional[cloud_status.JobView]) -> int:
        """5 (post-processing) instead of 7 while the timelapse of the job
        that just completed is made."""
        cur = self.current
        if code == protocol.COMPLETE and cur is not None and cur.active \
                and job is not None and job.job_id == cur.job_id:
            return protocol.POSTPROCESSING
        return code
    @contained()
    def forget(self) -> None:
        """Unregistered or deleted: the timelapses belong to the old
        serial number."""
        jobs = list(self.waiting) + [p.job_id for p in self.ready]
        if self.current is not None:
            jobs.append(self.current.job_id)
        self.current = None
        self.ready.clear()
        self.waiting.clear()
        for job_id in jobs:
            self.post.submit(self.store.remove, job_id)
    @contained("")
    def describe(self) -> str:
        if self.off:
            return "off (%s)" % (self.off,)
        cur, rec = self.current, self.rec
        if cur is not None:
            return "%s job %s" % ({"render": "rendering",
                                   "upload": "uploading"}.get(
                                       cur.phase, "finishing"), cur.job_id)
        if rec is not None:
            return "recording job %s (%d frames)" % (rec.job_id, rec.frames)
        if self.opts.enabled is None and self.camera.available() is not True:
            return "auto (on when the camera answers)"
        return "on"
    @contained()
    def stop(self, timeout: float) -> None:
        """From klippy's reactor at disconnect: the children are killed
        at once, so the workers end quickly; a worker still busy (an
        upload) writes nothing once the stop event is set."""
        self.children.kill_all()
        self.frames.join(timeout)
        self.post.join(timeout)
    # Start-up
    def _load(self) -> None:
        if self.loaded:
            return
        self.loaded = True
        if self.opts.enabled is False:
            self.off = "timelapse: False"
        elif self.camera.opts.enabled is False:
            self.off = "webcam_enabled is False"
        else:
            self.ffmpeg = render.find_ffmpeg()
            if not self.ffmpeg:
                self.off = NO_FFMPEG
        # Said once: ffmpeg missing, or timelapse: True that cannot be
        if self.off and self.opts.enabled is not False and (
                self.opts.enabled or self.off == NO_FFMPEG):
            level = logging.WARNING if self.opts.enabled else logging.INFO
            log.log(level, "polar_cloud: timelapses are off: %s%s", self.off,
                    " (./install.sh --timelapse, or: sudo apt install ffmpeg)"
                    if self.off == NO_FFMPEG else "")
        now = time.time()
        for job_id in self.store.job_ids():
            meta = self.store.meta(job_id)
            completed = meta.get("completed")
            if meta.get("state") == "recording":
                self.orphans.append(job_id)
            elif meta.get("state") == "completed" and not self.off \
                    and isinstance(completed, (int, float)) \
                    and now - completed <= RETRY_FOR:
                self.waiting[job_id] = float(completed)
            else:
                self.post.submit(self.store.remove, job_id)
    def _adopt(self, job: Optional[cloud_status.JobView]) -> None:
        """Recordings of the klippy before a RESTART."""
        for job_id in self.orphans:
            if job is not None and job.job_id == job_id and not self.off:
                if job.phase == "printing" and self.rec is None:
                    self.rec = Recording(job_id)
                    continue
                if job.phase == "done" and job.final_code == protocol.COMPLETE:
                    self._completed(job_id, active=False)
                    continue
            self.frames.submit(self.store.remove, job_id)
        self.orphans = []
    # Frames
    def _on(self) -> bool:
        if self.off:
            return False
        return self.opts.enabled is True or self.camera.available() is True
    def _record(self, now: float, snap: Optional[dict],
                job: Optional[cloud_status.JobView]) -> None:
        rec = self.rec
        if rec is not None and (job is None or job.job_id != rec.job_id
                                or job.phase == "done"):
            self.rec = None
            if job is not None and job.job_id == rec.job_id \
                    and job.final_code == protocol.COMPLETE:
                log.info("polar_cloud: timelapse of job %s: %d frames;"
                         " making the video", rec.job_id, rec.frames)
                self._completed(rec.job_id, active=True)
            else:
                self.frames.submit(self.store.remove, rec.job_id)
        if job is None or job.phase != "printing" or snap is None:
            return
        if self.rec is None:
            if not self._on():
                return
            self.rec = Recording(job.job_id)
            self.frames.submit(self.store.begin, job.job_id)
            log.info("polar_cloud: timelapse of job %s: recording", job.job_id)
        rec = self.rec
        if snap.get("print_state") != "printing" \
                or snap.get("filename") != job.filename \
                or not snap.get("print_duration"):
            return          # paused, heating, or not this job's file yet
        layer = snap.get("current_layer")
        if layer is not None:
            if layer != rec.layer:
                rec.layer, rec.want = layer, True
        elif now - rec.last >= self.camera.opts.interval_printing:
            rec.want = True
        if rec.want and not self.frames.busy():
            rec.want, rec.last = False, now
            self._capture(rec.job_id)
    def _capture(self, job_id: str) -> None:
        self.frames.submit(capture, self.store, self.children,
                           self.camera.opts, job_id, done=lambda error: (
                               self.session.post(
                                   self._frame_done, job_id, error)))
    @contained()
    def _frame_done(self, job_id: str, error: Optional[str]) -> None:
        if error is None:
            error = "internal error; see klippy.log"
        rec = self.rec
        if not error and rec is not None and rec.job_id == job_id:
            rec.frames += 1
        elif error and error != "stopped":
            self.session.rlog("timelapse-frame", "timelapse frame skipped: %s",
                              error)
    # Making and uploading the video
    def _completed(self, job_id: str, active: bool) -> None:
        self.frames.submit(functools.partial(
            self.store.update_meta, job_id, state="completed",
            completed=time.time()))
        if active:
            self._capture(job_id)       # the finished print
            self.ready.appendleft(Post(job_id, active=True))
        else:
            self.ready.append(Post(job_id, active=False))
    def _advance(self, now: float) -> None:
        if self.current is None and self.ready:
            self.current = self.ready.popleft()
            self.store.protected = self.current.job_id
        cur = self.current
        if cur is None:
            return
        if cur.phase == "frames":
            if self.frames.busy():
                return
            cur.phase = "url"
            video = self.store.video_path(cur.job_id)
            if os.path.exists(video):       # made by an earlier attempt
                cur.video, cur.size = video, os.path.getsize(video)
        if cur.phase != "url":
            return
        slot = cur.slot
        if slot is not None and now < slot.expires_at - uploads.UPLOAD_MARGIN:
            if cur.video and (not slot.max_size or cur.size <= slot.max_size):
                cur.phase = "upload"
                self.post.submit(self._upload, cur.job_id, cur.video, slot,
                                 done=self._done(self._upload_done, cur))
            else:
                cur.phase = "render"
                self.post.submit(self._render, cur.job_id, slot.max_size,
                                 done=self._done(self._render_done, cur))
        elif not self.session.is_online():
            self._failed(cur, "offline")
        elif cur.asked and now - cur.asked > URL_WAIT:
            self._failed(cur, "no upload URL from Polar Cloud")
    def _done(self, handler, post: Post):
        return lambda result: self.session.post(handler, post,
                                                            result)
    def _render(self, job_id: str, budget: int):
        """Post worker: the MP4, moved into place."""
        store = self.store
        try:
            result = render.render(
                self.children, self.ffmpeg, store.folder(job_id),
                store.frame_count(job_id),
                render.jpeg_size(store.last_frame(job_id)), budget)
            path = store.install_video(job_id, result.path)
        except render.RenderError as e:
            return str(e)
        except (Stopped, children.ChildStopped):
            return "stopped"
        except OSError as e:
            return "cannot keep the video: %s" % (e.strerror or e,)
        return path, result
    @contained()
    def _render_done(self, post: Post, result) -> None:
        if post is not self.current:
            return
        if not isinstance(result, tuple):
            error = result or "internal error; see klippy.log"
            if "too few" in error:
                log.info("polar_cloud: no timelapse of job %s: %s",
                         post.job_id, error)
                self._finished(post)
            else:
                self._failed(post, error)
            return
        post.video, rendered = result
        post.size, post.plan, post.took = rendered.size, rendered.plan, \
            rendered.took
        post.phase = "url"
        self._advance(time.monotonic())
    def _upload(self, job_id: str, path: str, slot: uploads.UploadSlot):
        try:
            return uploadchild.upload(self.children, slot, UPLOAD_NAME,
                                      self.session.loopback_test_server(),
                                      self.session.options.ca_file, path=path)
        except uploads.UploadError as e:
            return e
    @contained()
    def _upload_done(self, post: Post, result) -> None:
        if post is not self.current:
            return
        if isinstance(result, int):
            p = post.plan
            log.info("polar_cloud: timelapse of job %s uploaded: %s%d bytes",
                     post.job_id, "%d frames, %.1f s, %dx%d, rendered in"
                     " %.1f s, " % (p.frames, p.seconds, p.width, p.height,
                                    post.took) if p else "", post.size)
            self._finished(post)
            return
        if isinstance(result, uploads.UploadError) and result.drop_slot:
            post.slot = None
        self._failed(post, str(result or "internal error; see klippy.log"))
    def _finished(self, post: Post) -> None:
        self.current = None
        self.store.protected = ""
        self.post.submit(self.store.remove, post.job_id)
    def _failed(self, post: Post, why: str) -> None:
        self.current = None
        self.store.protected = ""
        if why == "stopped":
            return
        self.session.rlog("timelapse-failed:" + why[:40], "timelapse of job"
                          " %s not uploaded (%s); trying again after the next"
                          " connection", post.job_id, why,
                          level=logging.WARNING)
        meta = self.store.meta(post.job_id)
        completed = meta.get("completed")
        self.waiting[post.job_id] = float(completed) if isinstance(
            completed, (int, float)) else time.time()
