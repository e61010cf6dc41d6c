# Cloud print jobs: validation, download, start, tracking, final report
#
# The JobManager runs on the cloud session's thread; downloads run on
# their own thread; printer actions go through the reactor bridge.
#
# This file may be distributed under the terms of the GNU GPLv3 license.
from __future__ import annotations

import collections
import errno
import functools
import logging
import os
import select
import shutil
import socket
import threading
import time
import urllib.parse
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional

from . import netpolicy, protocol
from .gcodefile import UTF8_BOM, GcodeSniffer, read_slicer_estimate
from .jobnames import safe_job_filename, shown_id
from .outbox import Outbox
from .port import CloudPort
from .ratelog import LineBudget
from .statefiles import StateFileError, read_json, write_json

log = logging.getLogger("polar_cloud")

JOB_FILE = "job.json"
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
PAUSE_RESUME = "pause-resume"      # the G-code queue's key for both


# Download

class DownloadError(Exception):
    pass


REDIRECT_CODES = (301, 302, 303, 307, 308)
DEFAULT_PORTS = {"http": 80, "https": 443}
class Connections:
    """A download's sockets.  They connect only to the addresses checked
    for the download, and another thread can interrupt whatever they wait
    for (a connect, a TLS handshake, a read): shutdown() wakes it."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        # Duplicates: ssl's wrap_socket() detaches the original socket
        self.handles: list[socket.socket] = []
        self.aborted = False
    def connect(self, addresses: list[netpolicy.Address],
                timeout: float) -> socket.socket:
        error = OSError("no address to connect to")
        for family, sockaddr in addresses:
            try:
                return self._connect(family, sockaddr, timeout)
            except OSError as e:
                error = e
        raise error
    def _connect(self, family: int, sockaddr: tuple,
                 timeout: float) -> socket.socket:
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            self._start_connect(sock, sockaddr)
            poller = select.poll()
            poller.register(sock, select.POLLOUT)
            if not poller.poll(int(timeout * 1000)):
                raise socket.timeout("connect timed out")
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if not err and self.aborted:
                err = errno.ECONNABORTED
            if err:
                raise OSError(err, os.strerror(err))
            sock.settimeout(timeout)
            return sock
        except BaseException:
            sock.close()
            raise
    def _start_connect(self, sock: socket.socket, sockaddr: tuple) -> None:
        # Under the lock: abort() comes either before (no connect at all)
        # or after the socket is connecting (its shutdown ends the connect)
        with self.lock:
            if self.aborted:
                raise ConnectionAbortedError(errno.ECONNABORTED, "aborted")
            self.handles.append(sock.dup())
            sock.setblocking(False)
            err = sock.connect_ex(sockaddr)
        if err not in (0, errno.EINPROGRESS):
            raise OSError(err, os.strerror(err))
    def abort(self) -> None:
        """Any thread; never blocks."""
        with self.lock:
            self.aborted = True
            for handle in self.handles:
                try:
                    handle.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
    def close(self) -> None:
        with self.lock:
            handles, self.handles = self.handles, []
        for handle in handles:
            handle.close()


@functools.cache
def _pool_classes() -> dict:
    """urllib3 pools whose connections go through Connections (imported
    late: klippy loads this module even when urllib3 is missing)."""
    from urllib3 import connection, connectionpool
    from urllib3.exceptions import ConnectTimeoutError, NewConnectionError

    def pinned(base):
        class PinnedConnection(base):
            # self.host stays the name: the Host header, SNI and the
            # certificate check use it; only the peer address is pinned
            def __init__(self, *args, addresses=(), connections=None, **kw):
                super().__init__(*args, **kw)
                self.addresses = addresses
                self.connections = connections
            def _new_conn(self):
                try:
                    return self.connections.connect(self.addresses,
                                                    CONNECT_TIMEOUT)
                except socket.timeout as e:
                    raise ConnectTimeoutError(self, "timed out") from e
                except OSError as e:
                    raise NewConnectionError(self, str(e)) from e
        return PinnedConnection

    class HTTPPool(connectionpool.HTTPConnectionPool):
        ConnectionCls = pinned(connection.HTTPConnection)

    class HTTPSPool(connectionpool.HTTPSConnectionPool):
        ConnectionCls = pinned(connection.HTTPSConnection)
    return {"http": HTTPPool, "https": HTTPSPool}


def _request_target(parts: urllib.parse.SplitResult) -> str:
    return (parts.path or "/") + ("?" + parts.query if parts.query else "")


class Download:
    """Stream a G-code URL into a hidden temp file, then rename it.

    cancel(), a stop and the total timeout end it within moments whatever
    the server does: they shut its socket down under any blocking call.
    Directly, it connects only to the addresses it checked for the URL's
    name; through a proxy (netpolicy.proxy_for) it connects to the proxy,
    which resolves the name, and asks it for a CONNECT tunnel.  Either
    way the certificate is verified for the name, against the usual CAs
    and ca_file's."""

    def __init__(self, url: str, dest_dir: str, filename: str, max_bytes: int,
                 allow_loopback: bool, stop: threading.Event,
                 on_done: Callable[[str, int], None], ca_file: str = ""):
        self.url = url
        self.dest_dir = dest_dir
        self.filename = filename
        self.max_bytes = max_bytes
        self.allow_loopback = allow_loopback
        self.stop = stop
        self.on_done = on_done
        self.ca_file = ca_file
        self.cancelled = threading.Event()
        self.expired = threading.Event()
        self.connections = Connections()
        self.tmp_path = os.path.join(dest_dir, ".%s.part" % (filename,))
        self.thread = threading.Thread(target=self._run, daemon=True,
                                       name="polar_cloud-download")
        self.deadline = threading.Timer(TOTAL_TIMEOUT, self._expire)
        self.deadline.daemon = True
        self.deadline.name = "polar_cloud-download-deadline"
    def start(self) -> None:
        self.thread.start()
    def cancel(self) -> None:
        """Any thread; never blocks."""
        self.cancelled.set()
        self.connections.abort()
    def join(self, timeout: float) -> None:
        self.thread.join(timeout)
    def _expire(self) -> None:
        self.expired.set()
        self.connections.abort()
    def _abort_reason(self) -> str:
        if self.expired.is_set():
            return "download took too long"
        if self.cancelled.is_set() or self.stop.is_set():
            return "download aborted"
        return ""
    def _check_aborted(self) -> None:
        reason = self._abort_reason()
        if reason:
            raise DownloadError(reason)
    def _run(self) -> None:
        netpolicy.hide_url_queries()
        error = ""
        size = 0
        try:
            self.deadline.start()
            size = self._download()
        except Exception as e:
            error = self._failure(e)
        finally:
            self._stop_deadline()
            self.connections.close()
            try:
                os.unlink(self.tmp_path)
            except OSError:
                pass
        self.on_done(error, size)
    def _stop_deadline(self) -> None:
        self.deadline.cancel()
        if self.deadline.ident is not None:
            self.deadline.join()        # wakes at once: it waits on an Event
    def _failure(self, e: Exception) -> str:
        # An aborted download fails in whatever way the shut socket made
        # it fail: report why it was aborted instead
        reason = self._abort_reason()
        if reason:
            return reason
        if isinstance(e, DownloadError):
            return str(e)
        log.exception("polar_cloud: download failed")
        return "download failed: %s" % (e.__class__.__name__,)
    def _checked_addresses(self, host: str,
                           port: int) -> list[netpolicy.Address]:
        """One lookup, every address checked: the download connects to
        these only, never to a second lookup's answer (DNS rebinding)."""
        try:
            addresses = netpolicy.resolve(host, port)
        except OSError as e:
            raise DownloadError("cannot resolve %s: %s" % (host, e)) from e
        problem = netpolicy.refused_address(addresses, self.allow_loopback)
        if problem:
            raise DownloadError("refused download URL: %s" % (problem,))
        return addresses
    def _proxy_addresses(self, host: str,
                         proxy: netpolicy.Proxy) -> list[netpolicy.Address]:
        """The proxy's addresses (the administrator's choice: a LAN address
        is fine), from one lookup."""
        try:
            return netpolicy.resolve(proxy.host, proxy.port)
        except OSError as e:
            raise DownloadError(netpolicy.proxy_failure(host, proxy, e)) \
                from e
    def _pool(self, parts: urllib.parse.SplitResult,
              addresses: list[netpolicy.Address],
              proxy: Optional[netpolicy.Proxy] = None):
        from urllib3.util import Timeout, make_headers, parse_url
        options = {"port": parts.port or DEFAULT_PORTS[parts.scheme],
                   "maxsize": 1, "retries": False,
                   "timeout": Timeout(connect=CONNECT_TIMEOUT,
                                      read=READ_TIMEOUT),
                   "addresses": addresses, "connections": self.connections}
        if parts.scheme == "https":
            options.update(cert_reqs="CERT_REQUIRED",
                           ssl_context=netpolicy.tls_context(self.ca_file))
        if proxy is not None:
            # The pool's connections go to the proxy and tunnel through it
            auth = proxy.basic_auth()
            options.update(_proxy=parse_url(proxy.shown), _proxy_headers=(
                make_headers(proxy_basic_auth=auth) if auth else {}))
        return _pool_classes()[parts.scheme](parts.hostname, **options)
    def _request(self, url: str):
        """One GET, to an address checked for the URL's host or through
        the proxy for the URL."""
        from urllib3.exceptions import HTTPError, ProxyError
        problem = netpolicy.check_url(url, self.allow_loopback)
        if problem:
            raise DownloadError("refused download URL: %s" % (problem,))
        self._check_aborted()
        parts = urllib.parse.urlsplit(url)
        port = parts.port or DEFAULT_PORTS[parts.scheme]
        try:
            proxy = netpolicy.proxy_for(url)
        except netpolicy.ProxyError as e:
            raise DownloadError(str(e)) from None
        if proxy is not None and parts.scheme != "https":
            # Only loopback test servers use http, and never a proxy
            raise DownloadError("refused download URL: plain http through"
                                " a proxy")
        if proxy is None:
            pool = self._pool(parts, self._checked_addresses(parts.hostname,
                                                             port))
        else:
            pool = self._pool(parts, self._proxy_addresses(parts.hostname,
                                                           proxy), proxy)
        try:
            resp = pool.urlopen("GET", _request_target(parts),
                                redirect=False, retries=False,
                                preload_content=False)
        except BaseException as e:
            pool.close()
            if proxy is not None and isinstance(e, ProxyError):
                raise DownloadError(netpolicy.proxy_failure(
                    parts.hostname, proxy, e)) from e
            if isinstance(e, (HTTPError, OSError)):
                raise DownloadError("download failed: %s"
                                    % (e.__class__.__name__,)) from e
            raise
        return pool, resp
    def _open(self):
        url = self.url
        for _ in range(MAX_REDIRECTS + 1):
            pool, resp = self._request(url)
            location = resp.headers.get("location")
            if resp.status not in REDIRECT_CODES or not location:
                return pool, resp
            resp.close()
            pool.close()
            url = urllib.parse.urljoin(url, location)
        raise DownloadError("too many redirects")
    def _download(self) -> int:
        free = shutil.disk_usage(self.dest_dir).free
        if free < FREE_SPACE_MARGIN:
            raise DownloadError("insufficient disk space")
        pool, resp = self._open()
        try:
            self._check_headers(resp, free)
            return self._stream(resp)
        finally:
            resp.close()
            pool.close()
    def _check_headers(self, resp, free: int) -> None:
        if resp.status != 200:
            raise DownloadError("download failed: HTTP %d" % (resp.status,))
        length = resp.headers.get("content-length")
        if length is not None and length.isdigit():
            if int(length) > self.max_bytes:
                raise DownloadError("the file is larger than max_job_size")
            if int(length) + FREE_SPACE_MARGIN > free:
                raise DownloadError("insufficient disk space")
        if "text/html" in resp.headers.get("content-type", ""):
            raise DownloadError("not a G-code file (an HTML page)")
    def _stream(self, resp) -> int:
        from urllib3.exceptions import HTTPError
        self._check_aborted()
        size = 0
        sniffer = GcodeSniffer()
        fd = os.open(self.tmp_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
                     0o644)
        paced_from = time.monotonic()
        with os.fdopen(fd, "wb") as f:
            try:
                for chunk in resp.stream(CHUNK):
                    self._check_aborted()
                    if not sniffer.decided:
                        problem = sniffer.feed(chunk)
                        if problem:
                            raise DownloadError(problem)
                    size += len(chunk)
                    if size > self.max_bytes:
                        raise DownloadError("the file is larger than"
                                            " max_job_size")
                    if size == len(chunk) and chunk.startswith(UTF8_BOM):
                        # klippy does not skip a BOM: "Malformed command"
                        chunk = chunk[len(UTF8_BOM):]
                    f.write(chunk)
                    ahead = paced_from + size / MAX_RATE - time.monotonic()
                    if ahead > 0.:
                        self.cancelled.wait(ahead)
                    if size % (16 * CHUNK) < len(chunk) and \
                            shutil.disk_usage(self.dest_dir).free \
                            < FREE_SPACE_MARGIN:
                        raise DownloadError("insufficient disk space")
            except HTTPError as e:
                raise DownloadError("download interrupted: %s"
                                    % (e.__class__.__name__,)) from e
            except OSError as e:
                raise DownloadError("cannot write the file: %s"
                                    % (e.strerror,)) from e
            problem = sniffer.finish()
            if problem:
                raise DownloadError(problem)
            length = resp.headers.get("content-length")
            if length is not None and length.isdigit() and int(length) != size:
                raise DownloadError("download interrupted (truncated)")
            f.flush()
            os.fsync(f.fileno())
        self._check_aborted()
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
                and protocol.read_job_id(job["job_id"]) is not None:
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
        req = protocol.parse_print(data, serial)
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
    def _refusal(self, req: protocol.PrintRequest,
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
        """Any thread: the download ends by itself (it watches the
        session's stop event)."""
        download = self.download
        if download is not None:
            download.cancel()
