# Webcam snapshots: when to take one, where it may be uploaded, and what
# the camera and the uploads are doing
#
# The session thread drives a Camera with cheap calls that do no I/O; each
# snapshot runs on one short-lived worker thread at a time
# (snapshot_worker.py), which runs the imaging child and uploads, and
# reports back here.
#
# This file may be distributed under the terms of the GNU GPLv3 license.
from __future__ import annotations

import dataclasses
import logging
import threading
import urllib.parse
from dataclasses import dataclass
from typing import Callable, Optional

from . import children
from .options import CameraOptions
from .snapshot_worker import SnapshotResult, SnapshotWorker
from .uploads import (  # noqa: F401 (parse_url_response: API)
    UPLOAD_MARGIN,
    UploadSlot,
    parse_url_response,
)

log = logging.getLogger("polar_cloud")

SNAPSHOT_KINDS = ("idle", "printing")

# Scheduling
REFRESH_BEFORE = 30.
REQUEST_WAIT = 15.
REQUEST_WAIT_CAP = 600.
BACKOFF_AFTER = 3
BACKOFF_INTERVAL = 300.


def _where(url: str) -> str:
    """For log lines: never the path, query or credentials."""
    parts = urllib.parse.urlsplit(url)
    where = parts.hostname or "?"
    if parts.port:
        where += ":%d" % (parts.port,)
    return where


@dataclass
class _Request:
    job_id: str
    at: float
    attempts: int


class Camera:
    """Snapshot scheduling for the session thread plus one worker."""

    def __init__(self, opts: CameraOptions, allow_loopback_http: bool,
                 stop: threading.Event,
                 on_result: Callable[[SnapshotResult], None],
                 ca_file: str = ""):
        self.opts = opts
        self.allow_loopback_http = allow_loopback_http
        self.ca_file = ca_file          # trusted for uploads, besides the
        #                                 usual CAs
        self.stop_event = stop
        self.on_result = on_result
        self.where = _where(opts.snapshot_url)
        self.lock = threading.Lock()
        self._held = False
        self._settings = 0
        self.children = children.Children(stop)
        # Shared with the worker (under lock)
        self._slots: dict[str, UploadSlot] = {}
        self._busy = False
        self._available: Optional[bool] = None
        self._failures = 0
        self._upload_ok: Optional[bool] = None
        self.logged_crash = False    # the worker's traceback, once
        # Session thread only
        self._requests: dict[str, _Request] = {}
        self._last_attempt: Optional[float] = None
        self._worker: Optional[threading.Thread] = None
    # Session-thread API: no I/O, returns at once
    def probing(self) -> bool:
        """Is the first look at the camera still under way?"""
        with self.lock:
            return self._held or (self._available is None and self._busy)
    def hold(self, held: bool) -> None:
        """While the camera's settings are being looked up (webcams.py):
        no probe of the old URL, and probing() says to wait."""
        with self.lock:
            self._held = held
    def set_options(self, opts: CameraOptions) -> None:
        """New settings (Mainsail's webcam); a new snapshot URL is looked
        at afresh."""
        with self.lock:
            if opts.snapshot_url != self.opts.snapshot_url:
                self._settings += 1
                self._available = None
                self._failures = 0
                self._last_attempt = None
                self.where = _where(opts.snapshot_url)
            self.opts = opts
    def available(self) -> Optional[bool]:
        with self.lock:
            return self._available
    def needs_url(self, kind: str, job_id: str, now: float) -> bool:
        if self.opts.enabled is False or kind not in SNAPSHOT_KINDS or not job_id:
            return False
        with self.lock:
            available = self._available
            slot = self._slots.get(kind)
        if self.opts.enabled is None and available is not True:
            return False
        if slot is not None and self._matches(slot, job_id) \
                and now < self._refresh_at(slot):
            return False
        req = self._requests.get(kind)
        if req is None or req.job_id != job_id:
            return True
        # An unanswered request is repeated, each time after longer
        wait = REQUEST_WAIT * 2 ** min(req.attempts - 1, 16)
        return now - req.at >= min(REQUEST_WAIT_CAP, wait)
    def url_requested(self, kind: str, job_id: str, now: float) -> None:
        req = self._requests.get(kind)
        attempts = req.attempts + 1 if req and req.job_id == job_id else 1
        self._requests[kind] = _Request(job_id, now, attempts)
    def set_slot(self, slot: UploadSlot) -> None:
        req = self._requests.pop(slot.type, None)
        if not slot.job_id and req is not None:
            # The reply does not say which job it is for: the one we asked
            slot = dataclasses.replace(slot, job_id=req.job_id)
        with self.lock:
            self._slots[slot.type] = slot       # the old one is gone at once
    def forget_urls(self) -> None:
        """After an unregister or delete: the URLs belong to the old serial."""
        self._requests.clear()
        with self.lock:
            self._slots.clear()
    def due(self, kind: str, now: float, job_id: Optional[str] = None) -> bool:
        if self.opts.enabled is False:
            return False
        with self.lock:
            if self._busy or self._held:
                return False
            failures = self._failures
            available = self._available
            slot = self._slots.get(kind)
        interval = (self.opts.interval_printing if kind == "printing"
                    else self.opts.interval_idle)
        if failures >= BACKOFF_AFTER:
            interval = max(interval, BACKOFF_INTERVAL)
        if self._last_attempt is not None \
                and now - self._last_attempt < interval:
            return False
        if available is not True:
            return True         # a probe: is there a camera (again)?
        # The camera works; nothing to do until an upload URL arrives
        return slot is not None and now < slot.expires_at - UPLOAD_MARGIN \
            and (job_id is None or self._matches(slot, job_id))
    def start(self, kind: str, job_id: str, now: float,
              manual: bool = False) -> bool:
        if kind not in SNAPSHOT_KINDS:
            raise ValueError("unknown snapshot kind %r" % (kind,))
        if (self.opts.enabled is False and not manual) \
                or self.stop_event.is_set():
            return False
        expired = False
        with self.lock:
            if self._busy:
                return False
            slot = self._slots.get(kind)
            if slot is not None and not self._matches(slot, job_id):
                slot = None
            elif slot is not None and now >= slot.expires_at - UPLOAD_MARGIN:
                # Never post to an expired URL; needs_url asks for another
                del self._slots[kind]
                slot, expired = None, True
            if self.opts.enabled is False:
                slot = None
            self._busy = True
        if not manual:
            self._last_attempt = now
        result = SnapshotResult(kind=kind, job_id=job_id, manual=manual,
                                settings=self._settings)
        self._worker = threading.Thread(
            target=SnapshotWorker(self).run, args=(result, slot, expired),
            daemon=True,
            name="polar_cloud-snapshot")
        try:
            self._worker.start()
        except RuntimeError as e:         # out of threads: skip this one
            with self.lock:
                self._busy = False
            log.warning("polar_cloud: cannot start a snapshot: %s", e)
            return False
        return True
    def stop(self, timeout: float) -> None:
        worker = self._worker
        if worker is not None:
            worker.join(timeout)
    def _matches(self, slot: UploadSlot, job_id: str) -> bool:
        # idle URLs are not tied to a job; printing URLs are
        # (docs/protocol.md, section 9)
        return slot.type == "idle" or slot.job_id == job_id
    def _refresh_at(self, slot: UploadSlot) -> float:
        lifetime = slot.expires_at - slot.received_at
        return slot.expires_at - min(REFRESH_BEFORE, max(0., lifetime / 2.))
    # What the worker reports (worker thread)
    def finished(self, result: SnapshotResult,
                 failed: Optional[bool]) -> None:
        """The snapshot is over; failed: None if it says nothing about
        the camera or the upload (stopped, no URL yet)."""
        with self.lock:
            self._busy = False
            if not result.manual and failed is not None:
                self._failures = self._failures + 1 if failed else 0
        try:
            self.on_result(result)
        except Exception:
            log.exception("polar_cloud: snapshot result handler failed")
    def drop_slot(self, slot: UploadSlot) -> None:
        with self.lock:
            if self._slots.get(slot.type) is slot:
                del self._slots[slot.type]
    # One log line per state change
    def camera_state(self, reachable: bool, error: str,
                      settings: int) -> None:
        with self.lock:
            if settings != self._settings:
                return      # taken with the settings before set_options
            old, self._available = self._available, reachable
        if old is reachable:
            return
        if reachable:
            log.info("polar_cloud: camera at %s %s", self.where,
                     "is reachable again" if old is False else "answers")
        elif old is None and self.opts.enabled is None:
            log.info("polar_cloud: no camera at %s (%s); snapshots stay off"
                     " until it answers", self.where, error)
        else:
            log.warning("polar_cloud: camera at %s is unreachable: %s",
                        self.where, error)
    def upload_state(self, ok: bool, error: str) -> None:
        with self.lock:
            old, self._upload_ok = self._upload_ok, ok
        if old is ok:
            return
        if ok:
            log.info("polar_cloud: snapshot uploads %s",
                     "work again" if old is False else "work")
        else:
            log.warning("polar_cloud: snapshot not uploaded: %s", error)
