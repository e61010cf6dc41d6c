# Webcam snapshots: fetch, transform, shrink and upload to Polar Cloud
#
# The session thread drives a Camera with cheap calls that do no I/O; the
# work runs on one short-lived worker thread at a time.  Fetching the frame
# and the image work (Pillow) run in a short-lived child process at idle
# CPU priority (imaging.py): klippy never reads the camera's megabytes nor
# loads Pillow, both of which hold the GIL and make the reactor late; it
# only uploads the finished JPEG.  Presigned upload URLs and their policy
# fields are secrets: they never reach the log.
#
# This file may be distributed under the terms of the GNU GPLv3 license.
from __future__ import annotations

import dataclasses
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from dataclasses import dataclass
from typing import Any, Callable, Optional

from . import imaging, netpolicy, protocol
from .jobs import check_resolved, check_url

log = logging.getLogger("polar_cloud")

DEFAULT_SNAPSHOT_URL = "http://127.0.0.1:8080/?action=snapshot"
DEFAULT_STREAM_URL = "/webcam/?action=stream"
ROTATIONS = {"0": 0, "90": 90, "180": 180, "270": 270}
TRISTATE = {"auto": None, "true": True, "yes": True, "on": True, "1": True,
            "false": False, "no": False, "off": False, "0": False}
KINDS = ("idle", "printing")

# Fetching from the camera
CONNECT_TIMEOUT = 5.
READ_TIMEOUT = 10.
FETCH_DEADLINE = 20.
MAX_FETCH = 10 * 1024 * 1024
CHUNK = 64 * 1024
# Image work in a child process (imaging.py)
IMAGING_SCRIPT = imaging.SCRIPT
IMAGING_TIMEOUT = 60.      # the fetch (FETCH_DEADLINE) and the image work
IMAGING_POLL = .5           # how often the wait looks at the stop event
# Uploading
UPLOAD_TIMEOUT = (10., 30.)
UPLOAD_MARGIN = 5.
URL_EXPIRED = "upload URL expired"
# Scheduling
REFRESH_BEFORE = 30.
REQUEST_WAIT = 15.
REQUEST_WAIT_CAP = 600.
BACKOFF_AFTER = 3
BACKOFF_INTERVAL = 300.

JPEG_SOI = b"\xff\xd8\xff"
JPEG_EOI = b"\xff\xd9"
CONTENT_TYPE_RE = re.compile(r"image/p?jpe?g")
S3_CODE_RE = re.compile(rb"<Code>([A-Za-z]{1,64})</Code>")
MAX_FIELDS = 32
MAX_FIELD_VALUE = 8192
MAX_EXPIRES = 7 * 24 * 3600.


# Options

@dataclass(frozen=True)
class CameraOptions:
    enabled: Optional[bool] = None      # None: on when the camera answers
    snapshot_url: str = DEFAULT_SNAPSHOT_URL
    stream_url: str = DEFAULT_STREAM_URL
    flip_horizontal: bool = False
    flip_vertical: bool = False
    rotation: int = 0                   # clockwise, like the front-ends
    max_image_size: int = 150000
    interval_idle: float = 60.
    interval_printing: float = 10.


def check_snapshot_url(url: str) -> str:
    """Return an error text for an unusable snapshot_url, '' when fine."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return "is not a URL"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "must be an http:// or https:// URL"
    if re.search(r"\s", url) or parts.fragment:
        return "must not contain spaces or a fragment"
    return ""


def check_stream_url(url: str) -> str:
    """camUrl goes to the cloud: a path on this host or an http(s) URL."""
    if not url:
        return ""
    if re.search(r"\s", url):
        return "must not contain spaces"
    if url.startswith("/") and not url.startswith("//"):
        return ""
    if check_snapshot_url(url):
        return "must be a path such as /webcam/?action=stream or an" \
            " http(s):// URL"
    if "@" in urllib.parse.urlsplit(url).netloc:
        return "must not carry credentials (it is sent to Polar Cloud)"
    return ""


def read_camera_options(config) -> CameraOptions:
    section = config.get_name()

    def error(option: str, text: str):
        return config.error("Option '%s' in section '%s' %s"
                            % (option, section, text))
    text = config.get("webcam_enabled", "auto").strip().lower()
    if text not in TRISTATE:
        raise error("webcam_enabled", "must be True, False or auto")
    snapshot_url = config.get("snapshot_url", DEFAULT_SNAPSHOT_URL).strip()
    problem = check_snapshot_url(snapshot_url)
    if problem:
        raise error("snapshot_url", problem)
    stream_url = config.get("stream_url", DEFAULT_STREAM_URL).strip()
    problem = check_stream_url(stream_url)
    if problem:
        raise error("stream_url", problem)
    return CameraOptions(
        enabled=TRISTATE[text], snapshot_url=snapshot_url,
        stream_url=stream_url,
        flip_horizontal=config.getboolean("flip_horizontal", False),
        flip_vertical=config.getboolean("flip_vertical", False),
        rotation=config.getchoice("rotation", ROTATIONS, "0"),
        max_image_size=config.getint("max_image_size", 150000,
                                     minval=10000, maxval=MAX_FETCH),
        interval_idle=config.getfloat("snapshot_interval", 60., minval=5.,
                                      maxval=3600.),
        interval_printing=config.getfloat("snapshot_interval_printing", 10.,
                                          minval=5., maxval=3600.))


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
                 available: bool) -> protocol.CameraHints:
    if opts.enabled is False or (opts.enabled is None and not available):
        return protocol.CameraHints()
    # transformImg with the OctoPrint client's meaning, rotateImg with
    # Polar's agent's (docs/protocol.md, section 2.4)
    return protocol.CameraHints(
        cam_url=lan_stream_url(opts.stream_url, local_ip), cam_off=0,
        rotate_img=protocol.rotate_bit(opts.rotation),
        transform_img=protocol.transform_bits(
            opts.flip_horizontal, opts.flip_vertical, opts.rotation))


# getUrlResponse

@dataclass
class UploadSlot:
    type: str
    job_id: str
    url: str
    fields: dict
    expires_at: float           # time.monotonic() based
    max_size: int               # 0 when the cloud gave no limit
    content_type: str
    received_at: float = 0.


def _expiry(value: Any, now: float) -> float:
    if not protocol.finite_number(value) or value <= 0:
        raise protocol.ProtocolError("getUrlResponse: bad expires")
    if value > 1e12:            # epoch milliseconds
        value = value / 1000. - time.time()
    elif value > 1e9:           # epoch seconds
        value = value - time.time()
    if value <= 0:
        raise protocol.ProtocolError("getUrlResponse: URL already expired")
    return now + min(float(value), MAX_EXPIRES)


def parse_url_response(data: Any, serial: Optional[str],
                       allow_loopback_http: bool, now: float) -> UploadSlot:
    event = "getUrlResponse"
    if not isinstance(data, dict):
        raise protocol.ProtocolError("%s: payload is not an object" % (event,))
    if data.get("status") != "SUCCESS":
        message = protocol.cloud_text(data.get("message"))
        raise protocol.ProtocolError("%s: %s" % (
            event, message or "status %.20r" % (data.get("status"),)))
    protocol.check_serial(data, serial, event)
    kind = data.get("type")
    if kind not in KINDS:
        raise protocol.ProtocolError("%s: unsupported type %.20r"
                                     % (event, kind))
    method = data.get("method", "post")
    if not isinstance(method, str) or method.lower() != "post":
        raise protocol.ProtocolError("%s: method is not post" % (event,))
    url = data.get("url")
    if not isinstance(url, str) or not url or len(url) > 2048:
        raise protocol.ProtocolError("%s: no usable url" % (event,))
    problem = check_url(url, allow_loopback_http)
    if problem:
        raise protocol.ProtocolError("%s: refused upload URL (%s)"
                                     % (event, problem))
    fields = data.get("fields")
    if not isinstance(fields, dict) or len(fields) > MAX_FIELDS:
        raise protocol.ProtocolError("%s: fields is not a form" % (event,))
    for key, value in fields.items():
        if not isinstance(key, str) or not isinstance(value, str) \
                or not 0 < len(key) <= 128 or len(value) > MAX_FIELD_VALUE \
                or key == "file":
            raise protocol.ProtocolError("%s: bad form field" % (event,))
    max_size = data.get("maxSize", 0)
    if max_size is None:
        max_size = 0
    if isinstance(max_size, bool) or not isinstance(max_size, int) \
            or max_size < 0 or (max_size and max_size < 1024):
        raise protocol.ProtocolError("%s: bad maxSize" % (event,))
    content_type = data.get("contentType") or "image/jpeg"
    if not isinstance(content_type, str) \
            or not CONTENT_TYPE_RE.fullmatch(content_type):
        raise protocol.ProtocolError("%s: contentType is not a JPEG type"
                                     % (event,))
    job_id = data.get("jobId")
    job_id = job_id if isinstance(job_id, str) \
        and protocol.JOB_ID_RE.fullmatch(job_id) else ""
    return UploadSlot(kind, job_id, url, dict(fields),
                      _expiry(data.get("expires"), now), max_size,
                      content_type, received_at=now)


# Errors (worker thread)

class CameraError(Exception):
    """The camera did not deliver a usable JPEG."""


class SnapshotError(Exception):
    def __init__(self, text: str, status: int = 0, counts: bool = True):
        super().__init__(text)
        self.status = status
        self.counts = counts        # a failure for the backoff


# Starting the image work

_use_chrt = True


def _idle_prefix() -> list[str]:
    """Run the child at idle priority from its first instruction.  Started
    at normal priority and lowered a moment later, Python's start-up
    competed with klippy for the CPU: +3 ms reactor p99 per start on two
    cores, against +0.3 ms under chrt."""
    chrt = shutil.which("chrt")
    return [chrt, "--idle", "0"] if chrt else []


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


# The camera

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
        parts = urllib.parse.urlsplit(opts.snapshot_url)
        # For log lines: never the path, query or credentials
        self.where = parts.hostname or "?"
        if parts.port:
            self.where += ":%d" % (parts.port,)
        self.lock = threading.Lock()
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
            return self._available is None and self._busy
    def available(self) -> Optional[bool]:
        with self.lock:
            return self._available
    def needs_url(self, kind: str, job_id: str, now: float) -> bool:
        if self.opts.enabled is False or kind not in KINDS or not job_id:
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
            if self._busy:
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
        if kind not in KINDS:
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
        result = SnapshotResult(kind=kind, job_id=job_id, manual=manual)
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
                self._camera_state(False, str(e))
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
        try:
            # A LAN camera (the usual case) never goes through a proxy
            proxy = netpolicy.proxy_for(self.opts.snapshot_url)
        except netpolicy.ProxyError as e:
            raise CameraError(str(e)) from None
        spec = imaging.Fetch(self.opts.snapshot_url, CONNECT_TIMEOUT,
                             READ_TIMEOUT, FETCH_DEADLINE, MAX_FETCH, CHUNK,
                             proxy=proxy.url if proxy is not None else "")
        code, out, err, result.fetched = self._run_imaging(
            imaging.request(limit, self.opts, spec))
        if code == imaging.EXIT_BAD_JPEG:
            raise CameraError(err or "broken JPEG from the camera")
        if code in (imaging.EXIT_OK, imaging.EXIT_CANNOT_SHRINK,
                    imaging.EXIT_NO_PILLOW):
            self._camera_state(True, "")
        if code in (imaging.EXIT_CANNOT_SHRINK, imaging.EXIT_NO_PILLOW):
            raise SnapshotError(err or "cannot shrink the snapshot to %d"
                                " bytes; skipped" % (limit,))
        if code != imaging.EXIT_OK:
            detail = "killed by signal %d" % (-code,) if code < 0 \
                else "exit code %d" % (code,)
            raise SnapshotError("image processing failed (%s%s)"
                                % (detail, ": " + err if err else ""))
        if len(out) > limit or not out.startswith(JPEG_SOI) \
                or not out.endswith(JPEG_EOI):
            raise SnapshotError("image processing failed (no usable JPEG)")
        return out
    def _run_imaging(self, request: bytes) -> tuple[int, bytes, str, int]:
        """(exit code, stdout, last stderr line, bytes fetched) of
        imaging.py; the child is killed on a timeout or when the session
        stops."""
        if not sys.executable:
            raise SnapshotError("image processing failed (no Python"
                                " interpreter to run it)")
        global _use_chrt
        idle = _idle_prefix() if _use_chrt else []
        with _input_file(request) as stdin:
            code, out, err = self._spawn_imaging(idle, stdin)
            if idle and code == 1 and _last_line(err).startswith("chrt:"):
                # SCHED_IDLE refused here (a container?): the child still
                # lowers its own priority as soon as it runs
                log.info("polar_cloud: %s; image work runs at nice 19",
                         _last_line(err))
                _use_chrt = False
                stdin.seek(0)
                code, out, err = self._spawn_imaging([], stdin)
        fetched = FETCHED_RE.search(err)
        return (code, out, _last_line(err),
                int(fetched.group(1)) if fetched else 0)
    def _spawn_imaging(self, prefix: list[str],
                       stdin) -> tuple[int, bytes, str]:
        try:
            proc = subprocess.Popen(
                prefix + [sys.executable, IMAGING_SCRIPT], stdin=stdin,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        except OSError as e:
            raise SnapshotError("cannot start the image processing (%s)"
                                % (e.strerror or e,)) from None
        with proc:
            try:
                if not prefix:
                    imaging.lower_priority(proc.pid)
                out, err = self._wait_imaging(proc)
            finally:
                if proc.poll() is None:     # a timeout, a stop or a bug
                    proc.kill()
        return proc.returncode, out, err.decode("utf-8", "replace")
    def _wait_imaging(self, proc: subprocess.Popen) -> tuple[bytes, bytes]:
        deadline = time.monotonic() + IMAGING_TIMEOUT
        while True:
            if self.stop_event.is_set():
                raise CameraError("stopped")
            left = deadline - time.monotonic()
            if left <= 0:
                raise SnapshotError("image processing took longer than %d s;"
                                    " skipped" % (IMAGING_TIMEOUT,))
            try:
                return proc.communicate(timeout=min(IMAGING_POLL, left))
            except subprocess.TimeoutExpired:
                pass
    def _upload(self, slot: UploadSlot, image: bytes) -> int:
        import requests
        if self.stop_event.is_set():
            raise SnapshotError("stopped", counts=False)
        if time.monotonic() >= slot.expires_at - UPLOAD_MARGIN:
            self._drop_slot(slot)
            raise SnapshotError(URL_EXPIRED, counts=False)
        host = urllib.parse.urlsplit(slot.url).hostname or ""
        try:
            proxy = netpolicy.proxy_for(slot.url)
        except netpolicy.ProxyError as e:
            raise SnapshotError("upload failed: %s" % (e,)) from None
        # Through a proxy the proxy resolves the name (parse_url_response
        # has refused private literal addresses)
        problem = "" if proxy is not None \
            else check_resolved(host, self.allow_loopback_http)
        if problem:
            self._drop_slot(slot)
            raise SnapshotError("refused upload URL: %s" % (problem,))
        try:
            with netpolicy.requests_session(proxy, self.ca_file) as http:
                # S3 POST policy: the issued fields first, in order, then
                # the file (S3 ignores fields after it)
                resp = http.post(
                    slot.url, data=list(slot.fields.items()),
                    files=[("file", ("image.jpg", image, slot.content_type))],
                    timeout=UPLOAD_TIMEOUT, allow_redirects=False,
                    stream=True)
                with resp:
                    status = resp.status_code
                    head = b""
                    if status not in (200, 201, 204):
                        head = next(resp.iter_content(4096), b"")
        except requests.exceptions.ProxyError as e:
            raise SnapshotError("upload failed: %s" % (
                netpolicy.proxy_failure(host, proxy, e),)) from None
        except requests.RequestException as e:
            raise SnapshotError("upload failed: %s"
                                % (imaging.request_error(e),)) from None
        if status in (200, 201, 204):
            return status
        match = S3_CODE_RE.search(head)
        code = match.group(1).decode() if match else ""
        if status in (400, 403):
            # Refused (expired policy, clock skew, too large): get a new URL
            self._drop_slot(slot)
        raise SnapshotError("upload refused: HTTP %d%s"
                            % (status, " " + code if code else ""),
                            status=status)
    def _drop_slot(self, slot: UploadSlot) -> None:
        with self.lock:
            if self._slots.get(slot.type) is slot:
                del self._slots[slot.type]
    # One log line per state change
    def _camera_state(self, reachable: bool, error: str) -> None:
        with self.lock:
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
