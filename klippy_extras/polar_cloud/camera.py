# Webcam snapshots: fetch, transform, shrink and upload to Polar Cloud
#
# The session thread drives a Camera with cheap calls that do no I/O; the
# work runs on one short-lived worker thread at a time.  Fetching the frame
# and the image work (Pillow) run in a short-lived child process at idle
# CPU priority (imaging.py): klippy never reads the camera's megabytes nor
# loads Pillow, both of which hold the GIL and make the reactor late; it
# only uploads the finished JPEG (uploads.py).  The child processes are
# run by children.py.
#
# This file may be distributed under the terms of the GNU GPLv3 license.
from __future__ import annotations

import dataclasses
import io
import logging
import os
import re
import sys
import tempfile
import threading
import urllib.parse
from dataclasses import dataclass
from typing import Callable, Optional

from . import children, imaging, messages, netpolicy, protocol
from .options import MAX_FETCH, CameraOptions
from .uploads import (  # noqa: F401 (UploadSlot, parse_url_response: API)
    UPLOAD_MARGIN,
    URL_EXPIRED,
    UploadError,
    UploadSlot,
    parse_url_response,
    post_form,
)

log = logging.getLogger("polar_cloud")

SNAPSHOT_KINDS = ("idle", "printing")

# Fetching from the camera
FETCH_CONNECT_TIMEOUT = 5.
FETCH_READ_TIMEOUT = 10.
FETCH_DEADLINE = 20.
FETCH_CHUNK = 64 * 1024
# Image work in a child process (imaging.py)
IMAGING_SCRIPT = imaging.SCRIPT
IMAGING_TIMEOUT = 60.      # the fetch (FETCH_DEADLINE) and the image work
# Scheduling
REFRESH_BEFORE = 30.
REQUEST_WAIT = 15.
REQUEST_WAIT_CAP = 600.
BACKOFF_AFTER = 3
BACKOFF_INTERVAL = 300.



# hello hints

def lan_stream_url(stream_url: str, local_ip: str) -> str:
    """The stream URL as seen from the LAN (Polar's page opens it there)."""
    if not stream_url:
        return ""
    host = "[%s]" % (local_ip,) if ":" in local_ip else local_ip
    if stream_url.startswith("/"):
        return "http://%s%s" % (host, stream_url)
    parts = urllib.parse.urlsplit(stream_url)
    if parts.hostname and protocol.is_loopback_host(parts.hostname):
        netloc = host if parts.port is None else "%s:%d" % (host, parts.port)
        return urllib.parse.urlunsplit(parts._replace(netloc=netloc))
    return stream_url


def camera_hints(opts: CameraOptions, local_ip: str,
                 available: bool) -> messages.CameraHints:
    if opts.enabled is False or (opts.enabled is None and not available):
        return messages.CameraHints()
    # transformImg with the OctoPrint client's meaning, rotateImg with
    # Polar's agent's (docs/protocol.md, section 2.4)
    return messages.CameraHints(
        cam_url=lan_stream_url(opts.stream_url, local_ip), cam_off=0,
        rotate_img=messages.rotate_bit(opts.rotation),
        transform_img=messages.transform_bits(
            opts.flip_horizontal, opts.flip_vertical, opts.rotation))


# Errors (worker thread)

class CameraError(Exception):
    """The camera did not deliver a usable JPEG."""


class SnapshotError(Exception):
    def __init__(self, text: str, status: int = 0, counts: bool = True):
        super().__init__(text)
        self.status = status
        self.counts = counts        # a failure for the backoff


FETCHED_RE = re.compile(r"^fetched (\d+)$", re.M)


def _last_line(text: str) -> str:
    """The child's error: its last line that is not the fetched count."""
    lines = [line for line in text.strip().splitlines()
             if not FETCHED_RE.match(line)]
    return lines[-1][:200] if lines else ""


def _input_file(data: bytes):
    """The child's stdin as a file: one write, where a pipe would take
    thousands of 512-byte writes from this thread for a 2 MB frame."""
    # The caller closes it (with ... as)
    try:
        f = open(os.memfd_create("polar_cloud-snapshot"), "w+b")  # noqa: SIM115
    except (AttributeError, OSError):
        f = tempfile.TemporaryFile()  # noqa: SIM115
    try:
        f.write(data)
        f.seek(0)
    except OSError as e:
        f.close()
        raise SnapshotError("cannot hand the snapshot to the image"
                            " processing (%s)" % (e.strerror or e,)) from None
    return f


def run_imaging(kids: children.Children,
                request: bytes) -> tuple[int, bytes, str, int]:
    """(exit code, stdout, last stderr line, bytes fetched) of imaging.py
    (also for timelapse frames); the child is killed on a timeout or when
    the session stops (children.ChildTimeout, ChildStopped)."""
    if not sys.executable:
        raise children.ChildError("no Python interpreter to run it")
    with _input_file(request) as stdin:
        code, out, err = kids.run([sys.executable, IMAGING_SCRIPT],
                                  IMAGING_TIMEOUT, "image work", stdin=stdin)
    fetched = FETCHED_RE.search(err)
    return (code, out, _last_line(err),
            int(fetched.group(1)) if fetched else 0)


# The camera

def _where(url: str) -> str:
    """For log lines: never the path, query or credentials."""
    parts = urllib.parse.urlsplit(url)
    where = parts.hostname or "?"
    if parts.port:
        where += ":%d" % (parts.port,)
    return where


@dataclass
class SnapshotResult:
    ok: bool = False
    fetched: int = 0
    final: int = 0
    uploaded: bool = False
    http_status: int = 0
    error: str = ""
    kind: str = "idle"
    job_id: str = ""
    manual: bool = False
    settings: int = 0           # which options it was taken with


@dataclass
class _Request:
    job_id: str
    at: float
    attempts: int


def fetch_spec(opts: CameraOptions) -> imaging.Fetch:
    """What the imaging child fetches, and through which proxy (a LAN
    camera, the usual case, never goes through one)."""
    try:
        proxy = netpolicy.proxy_for(opts.snapshot_url)
    except netpolicy.ProxyError as e:
        raise CameraError(str(e)) from None
    return imaging.Fetch(opts.snapshot_url, FETCH_CONNECT_TIMEOUT, FETCH_READ_TIMEOUT,
                         FETCH_DEADLINE, MAX_FETCH, FETCH_CHUNK,
                         proxy=proxy.url if proxy is not None else "")


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
        self._logged_crash = False
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
            target=self._run, args=(result, slot, expired), daemon=True,
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
    # Worker thread
    def _run(self, result: SnapshotResult, slot: Optional[UploadSlot],
             expired: bool) -> None:
        failed: Optional[bool] = True
        try:
            self._work(result, slot, expired)
            failed = False
        except CameraError as e:
            result.error = "camera: %s" % (e,)
            if self.stop_event.is_set():
                failed = None
            else:
                self._camera_state(False, str(e), result.settings)
        except SnapshotError as e:
            result.error = str(e)
            result.http_status = e.status
            failed = True if e.counts else None
            if e.counts and not result.manual:
                self._upload_state(False, str(e))
        except Exception:
            if not self._logged_crash:
                self._logged_crash = True
                log.exception("polar_cloud: snapshot failed")
            result.error = "internal error; see klippy.log"
        with self.lock:
            self._busy = False
            if not result.manual and failed is not None:
                self._failures = self._failures + 1 if failed else 0
        try:
            self.on_result(result)
        except Exception:
            log.exception("polar_cloud: snapshot result handler failed")
    def _work(self, result: SnapshotResult, slot: Optional[UploadSlot],
              expired: bool) -> None:
        if self.stop_event.is_set():
            raise CameraError("stopped")
        limit = self.opts.max_image_size
        if slot is not None and slot.max_size:
            limit = min(limit, slot.max_size)
        image = self._snapshot(limit, result)
        result.final = len(image)
        if slot is None:
            if result.manual:
                result.ok = True
                return
            raise SnapshotError(URL_EXPIRED if expired
                                else "no upload URL yet", counts=False)
        result.http_status = self._upload(slot, image)
        result.uploaded = result.ok = True
        if not result.manual:
            self._upload_state(True, "")
    def _snapshot(self, limit: int, result: SnapshotResult) -> bytes:
        """The JPEG to upload: fetched from the camera, checked,
        transformed and shrunk to at most limit bytes, all by imaging.py
        in a child process."""
        spec = fetch_spec(self.opts)
        code, out, err, result.fetched = self._run_imaging(
            imaging.request(limit, self.opts, spec))
        if code == imaging.EXIT_BAD_JPEG:
            raise CameraError(err or "broken JPEG from the camera")
        if code in (imaging.EXIT_OK, imaging.EXIT_CANNOT_SHRINK,
                    imaging.EXIT_NO_PILLOW):
            self._camera_state(True, "", result.settings)
        if code in (imaging.EXIT_CANNOT_SHRINK, imaging.EXIT_NO_PILLOW):
            raise SnapshotError(err or "cannot shrink the snapshot to %d"
                                " bytes; skipped" % (limit,))
        if code != imaging.EXIT_OK:
            detail = "killed by signal %d" % (-code,) if code < 0 \
                else "exit code %d" % (code,)
            raise SnapshotError("image processing failed (%s%s)"
                                % (detail, ": " + err if err else ""))
        if len(out) > limit or not out.startswith(imaging.JPEG_SOI) \
                or not out.endswith(imaging.JPEG_EOI):
            raise SnapshotError("image processing failed (no usable JPEG)")
        return out
    def _run_imaging(self, request: bytes) -> tuple[int, bytes, str, int]:
        try:
            return run_imaging(self.children, request)
        except children.ChildStopped:
            raise CameraError("stopped") from None
        except children.ChildTimeout:
            raise SnapshotError("image processing took longer than %d s;"
                                " skipped" % (IMAGING_TIMEOUT,)) from None
        except children.ChildError as e:
            raise SnapshotError("cannot start the image processing (%s)"
                                % (e,)) from None
    def _upload(self, slot: UploadSlot, image: bytes) -> int:
        try:
            return post_form(slot, "image.jpg", io.BytesIO(image), len(image),
                             self.allow_loopback_http, self.stop_event,
                             self.ca_file)
        except UploadError as e:
            if e.drop_slot:
                self._drop_slot(slot)
            raise SnapshotError(str(e), status=e.status,
                                counts=e.counts) from None
    def _drop_slot(self, slot: UploadSlot) -> None:
        with self.lock:
            if self._slots.get(slot.type) is slot:
                del self._slots[slot.type]
    # One log line per state change
    def _camera_state(self, reachable: bool, error: str,
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
    def _upload_state(self, ok: bool, error: str) -> None:
        with self.lock:
            old, self._upload_ok = self._upload_ok, ok
        if old is ok:
            return
        if ok:
            log.info("polar_cloud: snapshot uploads %s",
                     "work again" if old is False else "work")
        else:
            log.warning("polar_cloud: snapshot not uploaded: %s", error)
