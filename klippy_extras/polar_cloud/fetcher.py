# The job download's helper child process
#
# download.Download starts it through children.py as
#
#     chrt --idle 0 python -I fetcher.py
#
# with one Request on stdin (JSON: the signed URL never goes on a command
# line, which other users can read).  It makes every check of the
# download policy (the URL and each redirect, one DNS lookup whose
# addresses are the only ones connected to, or the proxy, which resolves
# the name; the size limit, the free space, the G-code sniffer), streams
# the file into its own hidden temporary file (a leading BOM dropped) and
# writes one JSON line to stdout:
#
#     {"ok": true, "size": <bytes>}
#     {"ok": false, "error": "<for the console>"[, "detail": "<for the log>"]}
#
# It never renames the file: the parent does, once it knows the download
# is still wanted.  A cancel, a stop and the total timeout kill it, and
# it dies with the klippy thread that waits for it.
#
# This file may be distributed under the terms of the GNU GPLv3 license.
from __future__ import annotations

import os
import sys

if __name__ == "__main__" and not __package__:
    # Run as a script: pacing.py, found next to it, makes it a child
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import pacing
    # Ticks while it imports: they cut the modules' bodies (up to 2 ms of
    # CPU each); not while it waits for the network
    PACER = pacing.as_child(globals(), ticks=True)
else:
    PACER = None

import json  # noqa: E402
import logging  # noqa: E402
import shutil  # noqa: E402
import time  # noqa: E402
import urllib.parse  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402
from typing import Callable, Optional  # noqa: E402

from . import netpolicy, pinned, tlstrust  # noqa: E402
from .gcodefile import UTF8_BOM, GcodeSniffer  # noqa: E402

if PACER is not None:
    import http.client  # noqa: E402,F401  (its body is cut too)
    pacing.stop_ticks(PACER)

CHUNK = 64 * 1024
# A download flat out (LAN, loopback: hundreds of MB/s) loads the host
# enough to make klippy's reactor late by milliseconds; no cloud download
# needs more than this (bench/: 200 MB at 300 MB/s added 2-3 ms to the
# reactor's p99 lateness, at 64 MB/s nothing measurable)
MAX_RATE = 64 * 1024 * 1024
READ_TIMEOUT = 30.
MAX_REDIRECTS = 3
FREE_SPACE_MARGIN = 64 * 1024 * 1024
# Written back to the disk, and the free space checked, every this many
# bytes
SYNC_EVERY = 16 * CHUNK
REDIRECT_CODES = (301, 302, 303, 307, 308)


class DownloadError(Exception):
    """A download that failed; the text is for the console."""


@dataclass(frozen=True)
class Request:
    """What the parent asks the child for."""
    url: str
    dest_dir: str
    part: str               # the temporary file's name, in dest_dir
    max_bytes: int
    allow_loopback: bool
    ca_file: str = ""
    def encode(self) -> bytes:
        return json.dumps(asdict(self)).encode("utf-8")
    @classmethod
    def decode(cls, raw: bytes) -> Request:
        try:
            req = cls(**json.loads(raw.decode("utf-8")))
        except (ValueError, TypeError) as e:
            raise DownloadError("download failed: bad request (%s)"
                                % (str(e)[:80],)) from None
        if not (isinstance(req.url, str) and isinstance(req.dest_dir, str)
                and isinstance(req.part, str) and isinstance(req.ca_file, str)
                and isinstance(req.max_bytes, int)
                and isinstance(req.allow_loopback, bool)
                and os.path.isabs(req.dest_dir)
                and os.path.basename(req.part) == req.part
                and req.part.startswith(".") and req.part.endswith(".part")):
            raise DownloadError("download failed: bad request")
        return req


class Fetch:
    """One download into the request's temporary file, on the child's
    only thread.  Failures raise DownloadError and remove the file."""

    def __init__(self, req: Request, pace: Callable[[], None] = lambda: None):
        self.req = req
        self.pace = pace            # called after each piece of work
        self.tmp_path = os.path.join(req.dest_dir, req.part)
        self.synced = 0
    def run(self) -> int:
        try:
            return self._download()
        except BaseException:
            try:
                os.unlink(self.tmp_path)
            except OSError:
                pass
            raise
    def _connection(self, parts: urllib.parse.SplitResult,
                    proxy: Optional[netpolicy.Proxy]):
        context = None
        if parts.scheme == "https":
            context = tlstrust.tls_context(self.req.ca_file, self.pace)
        try:
            return pinned.connection(parts, proxy, self.req.allow_loopback,
                                     context, READ_TIMEOUT)
        except pinned.Unreachable as e:
            raise DownloadError("refused download URL: %s" % (e,)
                                if e.refused else str(e)) from e
    def _request(self, url: str):
        """One GET, to an address checked for the URL's host or through
        the proxy for the URL."""
        import http.client
        problem = netpolicy.check_url(url, self.req.allow_loopback)
        if problem:
            raise DownloadError("refused download URL: %s" % (problem,))
        parts = urllib.parse.urlsplit(url)
        try:
            proxy = netpolicy.proxy_for(url)
        except netpolicy.ProxyError as e:
            raise DownloadError(str(e)) from None
        if proxy is not None and parts.scheme != "https":
            # Only loopback test servers use http, and never a proxy
            raise DownloadError("refused download URL: plain http through"
                                " a proxy")
        conn = self._connection(parts, proxy)
        try:
            conn.request("GET", pinned.request_target(parts),
                         headers={"Accept-Encoding": "identity"})
            resp = conn.getresponse()
        except BaseException as e:
            conn.close()
            if proxy is not None and not conn.reached \
                    and isinstance(e, OSError):
                raise DownloadError(netpolicy.proxy_failure(
                    parts.hostname, proxy, e)) from e
            if isinstance(e, (http.client.HTTPException, OSError)):
                raise DownloadError("download failed: %s"
                                    % (e.__class__.__name__,)) from e
            raise
        return conn, resp
    def _open(self):
        url = self.req.url
        for _ in range(MAX_REDIRECTS + 1):
            conn, resp = self._request(url)
            location = resp.getheader("location")
            if resp.status not in REDIRECT_CODES or not location:
                return conn, resp
            conn.close()
            url = urllib.parse.urljoin(url, location)
            self.pace()
        raise DownloadError("too many redirects")
    def _download(self) -> int:
        free = shutil.disk_usage(self.req.dest_dir).free
        if free < FREE_SPACE_MARGIN:
            raise DownloadError("insufficient disk space")
        conn, resp = self._open()
        try:
            self._check_headers(resp, free)
            return self._stream(resp)
        finally:
            conn.close()
    def _check_headers(self, resp, free: int) -> None:
        if resp.status != 200:
            raise DownloadError("download failed: HTTP %d" % (resp.status,))
        length = resp.getheader("content-length")
        if length is not None and length.isdigit():
            if int(length) > self.req.max_bytes:
                raise DownloadError("the file is larger than max_job_size")
            if int(length) + FREE_SPACE_MARGIN > free:
                raise DownloadError("insufficient disk space")
        if "text/html" in (resp.getheader("content-type") or ""):
            raise DownloadError("not a G-code file (an HTML page)")
    def _stream(self, resp) -> int:
        import http.client
        size = 0
        sniffer = GcodeSniffer()
        # O_EXCL: the name is the child's own; nothing is there to follow
        fd = os.open(self.tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL,
                     0o644)
        paced_from = time.monotonic()
        with os.fdopen(fd, "wb") as f:
            try:
                while True:
                    try:
                        chunk = resp.read(CHUNK)
                    except (http.client.HTTPException, OSError) as e:
                        raise DownloadError("download interrupted: %s" % (
                            e.__class__.__name__,)) from e
                    if not chunk:
                        break
                    if not sniffer.decided:
                        problem = sniffer.feed(chunk)
                        if problem:
                            raise DownloadError(problem)
                    size += len(chunk)
                    if size > self.req.max_bytes:
                        raise DownloadError("the file is larger than"
                                            " max_job_size")
                    if size == len(chunk) and chunk.startswith(UTF8_BOM):
                        # klippy does not skip a BOM: "Malformed command"
                        chunk = chunk[len(UTF8_BOM):]
                    f.write(chunk)
                    ahead = paced_from + size / MAX_RATE - time.monotonic()
                    if ahead > 0.:
                        time.sleep(ahead)
                    if size % SYNC_EVERY < len(chunk):
                        self._write_back(f)
                        if shutil.disk_usage(self.req.dest_dir).free \
                                < FREE_SPACE_MARGIN:
                            raise DownloadError("insufficient disk space")
                    self.pace()
            except OSError as e:
                raise DownloadError("cannot write the file: %s"
                                    % (e.strerror,)) from e
            problem = sniffer.finish()
            if problem:
                raise DownloadError(problem)
            length = resp.getheader("content-length")
            if length is not None and length.isdigit() and int(length) != size:
                raise DownloadError("download interrupted (truncated)")
            f.flush()
            os.fsync(f.fileno())
        return size
    def _write_back(self, f) -> None:
        """Start writing what is written so far to the disk, a piece at a
        time (paced like the rest), not all of it in the final fsync; the
        pages go from the cache."""
        f.flush()
        end = f.tell()
        try:
            os.posix_fadvise(f.fileno(), self.synced, end - self.synced,
                             os.POSIX_FADV_DONTNEED)
        except (OSError, AttributeError):
            pass
        self.synced = end


def answer(raw: bytes, pace: Callable[[], None]) -> dict:
    """The outcome of the request in raw, for the parent."""
    try:
        size = Fetch(Request.decode(raw), pace).run()
    except DownloadError as e:
        return {"ok": False, "error": str(e)}
    except Exception as e:
        # The parent logs the detail; a signed URL's query never goes
        detail = "%s: %s" % (e.__class__.__name__, e)
        return {"ok": False, "error": "download failed: %s"
                % (e.__class__.__name__,),
                "detail": netpolicy.URL_QUERY_RE.sub("?...", detail)[:300]}
    return {"ok": True, "size": size}


def main() -> int:
    # Nothing on stderr but a crash: no log lines, no warnings
    import warnings
    logging.getLogger().addHandler(logging.NullHandler())
    warnings.simplefilter("ignore")
    result = answer(sys.stdin.buffer.read(), PACER or (lambda: None))
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    pacing.leave(main())    # no teardown of ssl and http.client: unpaced CPU
