# Cloud print jobs: validation, download, start, tracking, final report
#
# The JobManager runs on the cloud session's thread; downloads run on
# their own thread; printer actions go through the reactor bridge.
#
# This file may be distributed under the terms of the GNU GPLv3 license.
from __future__ import annotations

import collections
import ipaddress
import logging
import os
import re
import shutil
import socket
import threading
import time
import unicodedata
import urllib.parse
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional

from . import protocol
from .identity import IdentityError, read_json, write_json

log = logging.getLogger("polar_cloud")

JOB_FILE = "job.json"
OUTBOX_FILE = "outbox.json"
SEEN_LIMIT = 100
CHUNK = 64 * 1024
# A download flat out (LAN, loopback: hundreds of MB/s) loads the host
# enough to make klippy's reactor late by milliseconds; no cloud download
# needs more than this (bench/: 200 MB at 300 MB/s added 2-3 ms to the
# reactor's p99 lateness, at 64 MB/s nothing measurable)
MAX_RATE = 64 * 1024 * 1024
CONNECT_TIMEOUT = 15.
READ_TIMEOUT = 30.
TOTAL_TIMEOUT = 3600.
MAX_REDIRECTS = 3
FREE_SPACE_MARGIN = 64 * 1024 * 1024
FINAL_REPORTS = 3
OUTBOX_SETTLE = 5.
PAUSE_RESUME = "pause-resume"      # the G-code queue's key for both
JOB_FILE_RE = re.compile(r"_polar-([A-Za-z0-9_-]{1,64})\.gcode$")
GCODE_LINE_RE = re.compile(
    rb"^\s*(;.*|[GMTgmt]\d+.*|[A-Z][A-Z0-9_]*(\s.*)?|N\d+.*)?\s*$")


# Pure helpers

def safe_job_filename(job_name: str, job_id: str) -> str:
    """A file name readable in Mainsail/Fluidd, never taken raw from the
    cloud: ASCII letters, digits, '_', '-' and '.' only, no leading dot."""
    text = unicodedata.normalize("NFKD", job_name or "")
    text = text.encode("ascii", "ignore").decode("ascii")
    text = re.sub(r"\.(gcode|gco|g|stl|3mf)$", "", text, flags=re.I)
    text = re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("._-")
    text = re.sub(r"\.{2,}", ".", text)[:60].strip("._-") or "polar_job"
    return "%s_polar-%s.gcode" % (text, job_id)


def job_id_from_filename(filename: str) -> Optional[str]:
    match = JOB_FILE_RE.search(filename or "")
    return match.group(1) if match else None


def _address_is_public(addr: str) -> bool:
    ip = ipaddress.ip_address(addr)
    return not (ip.is_private or ip.is_loopback or ip.is_link_local
                or ip.is_multicast or ip.is_reserved or ip.is_unspecified)


def check_url(url: str, allow_loopback_http: bool) -> str:
    """Return an error text for a download URL the policy refuses."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return "not a URL"
    host = parts.hostname or ""
    if not host or parts.username or parts.password:
        return "not an acceptable URL"
    loopback = host == "localhost"
    try:
        loopback = loopback or ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    if parts.scheme == "http" and not (allow_loopback_http and loopback):
        return "plain http is not allowed"
    if parts.scheme not in ("http", "https"):
        return "only https downloads are allowed"
    if loopback and not allow_loopback_http:
        return "the address is not public"
    try:
        if not loopback and not _address_is_public(host):
            return "the address is not public"
    except ValueError:
        pass
    return ""


def check_resolved(host: str, allow_loopback: bool) -> str:
    """After DNS: refuse names that resolve to private addresses."""
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError as e:
        return "cannot resolve %s: %s" % (host, e)
    for info in infos:
        addr = info[4][0]
        if allow_loopback and ipaddress.ip_address(addr).is_loopback:
            continue
        if not _address_is_public(addr):
            return "the address is not public"
    return ""


def sniff_gcode(head: bytes) -> str:
    """Return an error when the start of a file is clearly not G-code."""
    if not head.strip():
        return "the file is empty"
    if b"\0" in head:
        return "not a G-code file (binary data)"
    low = head[:512].lstrip().lower()
    if head.startswith((b"PK\x03\x04", b"\x7fELF")) or low.startswith(
            (b"<!doctype", b"<html", b"<?xml", b"{")):
        return "not a G-code file"
    lines = head.split(b"\n")
    if len(lines) > 1:
        lines = lines[:-1]          # the last line may be cut mid-way
    for line in lines[:200]:
        if not GCODE_LINE_RE.match(line.rstrip(b"\r")):
            return "not a G-code file"
    return ""


ESTIMATE_PATTERNS = [
    re.compile(r"^;TIME:(\d+(?:\.\d+)?)", re.M),                      # Cura
    re.compile(r"^; estimated printing time(?: \(normal mode\))? = (.+)$",
               re.M),                                   # Prusa/SuperSlicer
    re.compile(r"^; total estimated time: ([^;\n]+)", re.M),        # Orca
    re.compile(r"^;\s*Build time: (.+)$", re.M),                # Simplify3D
]


def _duration(text: str) -> float:
    text = text.strip()
    try:
        return float(text)
    except ValueError:
        pass
    total = 0.
    units = {"d": 86400., "day": 86400., "days": 86400., "h": 3600.,
             "hour": 3600., "hours": 3600., "m": 60., "minute": 60.,
             "minutes": 60., "s": 1., "second": 1., "seconds": 1.}
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]+)", text):
        total += float(number) * units.get(unit, 0.)
    return total


def parse_slicer_estimate(text: str) -> float:
    for pattern in ESTIMATE_PATTERNS:
        match = pattern.search(text)
        if match:
            return _duration(match.group(1))
    return 0.


def read_slicer_estimate(path: str) -> float:
    """Slicers write the estimate in the first or last few KB."""
    try:
        with open(path, "rb") as f:
            head = f.read(64 * 1024)
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 64 * 1024))
            tail = f.read()
    except OSError:
        return 0.
    text = (head + b"\n" + tail).decode("utf-8", "replace")
    return parse_slicer_estimate(text)


# Download

class DownloadError(Exception):
    pass


class Download:
    """Stream a G-code URL into a hidden temp file, then rename it."""

    def __init__(self, url: str, dest_dir: str, filename: str, max_bytes: int,
                 allow_loopback: bool, stop: threading.Event,
                 on_done: Callable[[str, int], None]):
        self.url = url
        self.dest_dir = dest_dir
        self.filename = filename
        self.max_bytes = max_bytes
        self.allow_loopback = allow_loopback
        self.stop = stop
        self.on_done = on_done
        self.cancelled = threading.Event()
        self.tmp_path = os.path.join(dest_dir, ".%s.part" % (filename,))
        self.thread = threading.Thread(target=self._run, daemon=True,
                                       name="polar_cloud-download")
    def start(self) -> None:
        self.thread.start()
    def cancel(self) -> None:
        self.cancelled.set()
    def join(self, timeout: float) -> None:
        self.thread.join(timeout)
    def _run(self) -> None:
        error = ""
        size = 0
        try:
            size = self._download()
        except DownloadError as e:
            error = str(e)
        except Exception as e:
            log.exception("polar_cloud: download failed")
            error = "download failed: %s" % (e.__class__.__name__,)
        finally:
            try:
                os.unlink(self.tmp_path)
            except OSError:
                pass
        self.on_done(error, size)
    def _open(self, session):
        url = self.url
        for _ in range(MAX_REDIRECTS + 1):
            problem = check_url(url, self.allow_loopback)
            if not problem:
                host = urllib.parse.urlsplit(url).hostname
                problem = check_resolved(host, self.allow_loopback)
            if problem:
                raise DownloadError("refused download URL: %s" % (problem,))
            resp = session.get(url, stream=True, allow_redirects=False,
                               timeout=(CONNECT_TIMEOUT, READ_TIMEOUT))
            if resp.is_redirect:
                url = urllib.parse.urljoin(url, resp.headers.get(
                    "location", ""))
                resp.close()
                continue
            return resp
        raise DownloadError("too many redirects")
    def _download(self) -> int:
        import requests
        free = shutil.disk_usage(self.dest_dir).free
        if free < FREE_SPACE_MARGIN:
            raise DownloadError("insufficient disk space")
        started = time.monotonic()
        with requests.Session() as session:
            try:
                resp = self._open(session)
            except requests.RequestException as e:
                raise DownloadError("download failed: %s"
                                    % (e.__class__.__name__,)) from e
            with resp:
                if resp.status_code != 200:
                    raise DownloadError("download failed: HTTP %d"
                                        % (resp.status_code,))
                length = resp.headers.get("content-length")
                if length is not None and length.isdigit():
                    if int(length) > self.max_bytes:
                        raise DownloadError("the file is larger than"
                                            " max_job_size")
                    if int(length) + FREE_SPACE_MARGIN > free:
                        raise DownloadError("insufficient disk space")
                if "text/html" in resp.headers.get("content-type", ""):
                    raise DownloadError("not a G-code file (an HTML page)")
                return self._stream(resp, started)
    def _stream(self, resp, started: float) -> int:
        import requests
        size = 0
        checked = False
        fd = os.open(self.tmp_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
                     0o644)
        paced_from = time.monotonic()
        with os.fdopen(fd, "wb") as f:
            try:
                for chunk in resp.iter_content(CHUNK):
                    if self.stop.is_set() or self.cancelled.is_set():
                        raise DownloadError("download aborted")
                    if time.monotonic() - started > TOTAL_TIMEOUT:
                        raise DownloadError("download took too long")
                    if not checked:
                        problem = sniff_gcode(chunk[:4096])
                        if problem:
                            raise DownloadError(problem)
                        checked = True
                    size += len(chunk)
                    if size > self.max_bytes:
                        raise DownloadError("the file is larger than"
                                            " max_job_size")
                    f.write(chunk)
                    ahead = paced_from + size / MAX_RATE - time.monotonic()
                    if ahead > 0.:
                        time.sleep(ahead)
                    if size % (16 * CHUNK) < len(chunk) and \
                            shutil.disk_usage(self.dest_dir).free \
                            < FREE_SPACE_MARGIN:
                        raise DownloadError("insufficient disk space")
            except requests.RequestException as e:
                raise DownloadError("download interrupted: %s"
                                    % (e.__class__.__name__,)) from e
            except OSError as e:
                raise DownloadError("cannot write the file: %s"
                                    % (e.strerror,)) from e
            if not checked:
                raise DownloadError("the file is empty")
            length = resp.headers.get("content-length")
            if length is not None and length.isdigit() and int(length) != size:
                raise DownloadError("download interrupted (truncated)")
            f.flush()
            os.fsync(f.fileno())
        os.replace(self.tmp_path, os.path.join(self.dest_dir, self.filename))
        return size


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

    def __init__(self, session):
        self.session = session
        self.options = session.options
        state_dir = session.options.state_path
        self.job_path = os.path.join(state_dir, JOB_FILE)
        self.outbox_path = os.path.join(state_dir, OUTBOX_FILE)
        self.job: Optional[Job] = None
        self.seen: collections.deque = collections.deque(maxlen=SEEN_LIMIT)
        self.outbox: list[dict] = []
        self.saved_outbox: list[dict] = []      # as on disk
        self.unsettled: list[tuple[float, dict]] = []
        self.download: Optional[Download] = None
        self.last_print: dict[str, float] = {}
        self.estimate_path = ""
        self.estimate = 0.
    # Persistence (session thread)
    def load(self) -> None:
        try:
            data = read_json(self.job_path) or {}
            outbox = read_json(self.outbox_path) or []
        except IdentityError as e:
            log.warning("polar_cloud: ignoring job state: %s", e)
            return
        job = data.get("job")
        if isinstance(job, dict) and protocol.JOB_ID_RE.match(
                str(job.get("job_id", ""))):
            fields = {k: job[k] for k in Job.__dataclass_fields__ if k in job}
            self.job = Job(**fields)
            self.job.start_mono = 0.
        self.seen.extend(i for i in data.get("seen", []) if isinstance(i, str))
        self.outbox = [m for m in outbox if isinstance(m, dict)
                       and m.get("state") in ("completed", "canceled")]
        self.saved_outbox = list(self.outbox)
        if self.job is not None and self.job.phase in ("downloading",
                                                       "starting"):
            # Its download (or start) died with the previous klippy and
            # cannot resume: end it, or the printer stays "busy" for good
            log.info("polar_cloud: job %s was interrupted by a restart",
                     self.job.job_id)
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
    def save_outbox(self) -> None:
        if self.session.abandoned or self.outbox == self.saved_outbox:
            return
        try:
            write_json(self.outbox_path, self.outbox)
            self.saved_outbox = list(self.outbox)
        except OSError as e:
            log.warning("polar_cloud: cannot save the outbox: %s", e)
    # Views for the status message
    def view(self, snap: Optional[dict] = None) -> Optional[protocol.JobView]:
        job = self.job
        if job is None:
            return None
        phase = job.phase
        if phase == "printing" and snap is not None \
                and snap.get("mono", 0.) < job.start_mono:
            phase = "starting"      # the snapshot predates the start
        return protocol.JobView(job.job_id, phase, job.filename,
                                job.final_code)
    def slicer_estimate(self, snap: dict) -> float:
        path = snap.get("file_path") or ""
        if path != self.estimate_path:
            self.estimate_path = path
            self.estimate = read_slicer_estimate(path) if path else 0.
        return self.estimate
    def status_sent(self, code: int) -> None:
        job = self.job
        if job is not None and job.phase == "done":
            job.final_reports += 1
            if job.final_reports >= FINAL_REPORTS:
                self.job = None
                self.save()
    # Cloud commands
    def handle_print(self, data: Any, snap: Optional[dict]) -> None:
        serial = self.session.serial()
        req = protocol.parse_print(data, serial)
        job = self.job
        if (job is not None and job.job_id == req.job_id) \
                or req.job_id in self.seen:
            # a flood of repeats stays quiet
            self.session.rlog("repeat", "print %s already handled; ignoring"
                              " the repeat", req.job_id)
            return
        self.seen.append(req.job_id)
        reason = self._refusal(req, snap)
        if reason:
            # Kept in memory only: a refused job sent again after a
            # restart is simply judged again
            self._refuse(req.job_id, reason)
            return
        static = snap["static"]
        filename = safe_job_filename(req.job_name, req.job_id)
        self.job = Job(req.job_id, req.job_name[:80], filename)
        self.save()
        log.info("polar_cloud: job %s: downloading as %s", req.job_id,
                 filename)
        self.session.console("Polar Cloud: downloading job '%s'"
                             % (filename,))
        self.download = Download(
            req.url, static["sdcard_dir"], filename,
            self.options.max_job_size, self.session.loopback_test_server(),
            self.session.stop_event,
            lambda err, size, jid=req.job_id: self.session.inbox.put_local(
                self.download_done, jid, err, size))
        self.download.start()
        self.session.status_now()
    def _refusal(self, req: protocol.PrintRequest, snap) -> str:
        if req.kind != "gcodeFile":
            return "slicing on the printer is not supported (%s jobs)" % (
                "STL" if req.kind == "stlFile" else "3MF")
        if not req.url:
            return "the job has no G-code file"
        if snap is None or snap.get("klippy_state") != "ready":
            return "the printer is not ready"
        if not snap.get("static", {}).get("sdcard_dir"):
            return "no [virtual_sdcard] is configured"
        if self.job is not None and self.job.phase != "done":
            return "the printer is busy with job %s" % (self.job.job_id,)
        if snap.get("print_state") in ("printing", "paused") \
                or snap.get("is_active"):
            return "the printer is busy printing"
        if self.session.lab.refusal():
            return self.session.lab.refusal()
        problem = check_url(req.url, self.session.loopback_test_server())
        if problem:
            return "refused download URL: %s" % (problem,)
        return ""
    def refuse_unread(self, job_id: str, reason: str) -> None:
        """A print whose message could not be read in full."""
        if job_id not in self.seen:
            self.seen.append(job_id)
            self._refuse(job_id, reason)
    def _refuse(self, job_id: str, reason: str) -> None:
        # Every refused job is answered; a flood of them logs little
        if self.session.rlog("refused:" + reason[:40], "job %s refused: %s",
                             job_id, reason):
            self.session.console("Polar Cloud: job %s refused: %s"
                                 % (job_id, reason), error=True, log=False)
        self.queue_final(job_id, "canceled", 0., 0.)
    def download_done(self, job_id: str, error: str, size: int) -> None:
        self.download = None
        job = self.job
        if job is None or job.job_id != job_id or job.phase != "downloading":
            return
        if error:
            self.session.console("Polar Cloud: job %s failed: %s"
                                 % (job_id, error), error=True)
            log.info("polar_cloud: job %s: %s", job_id, error)
            self.finish("canceled", None)
            return
        log.info("polar_cloud: job %s: downloaded %d bytes", job_id, size)
        job.phase = "starting"
        self.save()
        self.session.run_gcode(
            "print:" + job_id,
            'SDCARD_PRINT_FILE FILENAME="%s"' % (job.filename,),
            lambda ok, err, jid=job_id: self.session.inbox.put_local(
                self.print_started, jid, ok, err))
    def print_started(self, job_id: str, ok: bool, error: str) -> None:
        job = self.job
        if job is None or job.job_id != job_id or job.phase != "starting":
            return
        if not ok:
            self.session.console("Polar Cloud: job %s could not start: %s"
                                 % (job_id, error), error=True)
            self.finish("canceled", None)
            return
        job.phase = "printing"
        job.start_mono = time.monotonic()
        self.save()
        self.session.console("Polar Cloud: printing job '%s'" % (job.filename,))
        self.session.status_now()
    def control(self, action: str, data: Any, snap: Optional[dict]) -> None:
        """pause, resume and cancel from the cloud."""
        if data is not None:
            if not isinstance(data, dict):
                raise protocol.ProtocolError("%s: payload is not an object"
                                             % (action,))
            protocol.check_serial(data, self.session.serial(), action)
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
        elif not same_file or state in ("cancelled", "error", "standby"):
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
        log.info("polar_cloud: job %s %s", job.job_id, state)
        if state == "completed":
            self.session.console("Polar Cloud: job '%s' completed"
                                 % (job.filename,))
        self.session.status_now()
    # Outbox: final job reports survive disconnects and restarts
    def queue_final(self, job_id: str, state: str, seconds: float,
                    filament: float) -> None:
        serial = self.session.serial() or ""
        self.outbox.append(protocol.build_job(serial, job_id, state, seconds,
                                              filament))
        self.flush()
    def flush(self) -> None:
        """Send what is pending.  A sent report leaves the durable outbox at
        once (a clean disconnect still delivers it) but stays in memory
        until it is settled: acknowledged by the cloud (a Socket.IO ack),
        or followed by traffic from the cloud a few seconds later.  If the
        link drops before that, it goes out again."""
        now = time.monotonic()
        last_rx = self.session.last_rx()
        self.unsettled = [(t, m) for t, m in self.unsettled
                          if not (last_rx > t and now - t >= OUTBOX_SETTLE)]
        if not self.outbox or not self.session.is_online():
            self.save_outbox()
            return
        serial = self.session.serial()
        pending, self.outbox = self.outbox, []
        for msg in pending:
            wire = dict(msg, serialNumber=serial)
            if self.session.emit("job", wire, callback=self._ack(msg)):
                self.session.rlog("reported:" + msg["state"], "job %s"
                                  " reported %s", msg["jobId"], msg["state"])
                self.unsettled.append((now, msg))
            else:
                self.outbox.append(msg)
        self.save_outbox()
    def _ack(self, msg: dict):
        def ack(*args) -> None:     # on the Socket.IO read thread
            self.session.inbox.put_local(self.acknowledged, msg)
        return ack
    def acknowledged(self, msg: dict) -> None:
        self.unsettled = [(t, m) for t, m in self.unsettled if m is not msg]
    def link_lost(self) -> None:
        """Reports sent just before the link dropped go out again."""
        if self.unsettled:
            self.outbox = [m for _t, m in self.unsettled] + self.outbox
            self.unsettled = []
            self.save_outbox()
    def stop(self) -> None:
        if self.download is not None:
            self.download.join(2.)
