# Upload URLs from Polar Cloud (getUrlResponse) and the S3 POST-policy
# upload they allow: snapshots (camera.py) and timelapses (timelapse.py)
#
# parse_url_response is pure (klippy's side); post_form runs in the upload
# child (uploader.py) and streams the file, so a timelapse of megabytes
# is never held in memory.
# Presigned URLs and their policy fields are secrets: they never reach
# the log.
#
# This file may be distributed under the terms of the GNU GPLv3 license.
from __future__ import annotations

import os
import re
import secrets
import threading
import time
import urllib.parse
from dataclasses import dataclass
from typing import Any, BinaryIO, Callable, Optional

from . import inbound, netpolicy, pinned, protocol, tlstrust
from .netpolicy import check_url

KINDS = ("idle", "printing", "timelapse")
# What each kind of upload carries, and its default
CONTENT_TYPES = {
    "idle": (re.compile(r"image/p?jpe?g"), "image/jpeg"),
    "printing": (re.compile(r"image/p?jpe?g"), "image/jpeg"),
    "timelapse": (re.compile(r"video/mp4"), "video/mp4"),
}
UPLOAD_TIMEOUT = 30.          # each read and write
UPLOAD_MARGIN = 5.          # a URL this close to its expiry is not used
URL_EXPIRED = "upload URL expired"
S3_CODE_RE = re.compile(rb"<Code>([A-Za-z]{1,64})</Code>")
MAX_FIELDS = 32
MAX_FIELD_VALUE = 8192
MAX_EXPIRES = 7 * 24 * 3600.
BLOCK = 64 * 1024


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
    inbound.check_serial(data, serial, event)
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
    pattern, default = CONTENT_TYPES[kind]
    content_type = data.get("contentType") or default
    if not isinstance(content_type, str) or not pattern.fullmatch(content_type):
        raise protocol.ProtocolError("%s: contentType is not %s" % (
            event, "an MP4 video" if kind == "timelapse" else "a JPEG type"))
    job_id = inbound.read_job_id(data.get("jobId")) or ""
    return UploadSlot(kind, job_id, url, dict(fields),
                      _expiry(data.get("expires"), now), max_size,
                      content_type, received_at=now)


# The upload (worker threads)

class UploadError(Exception):
    def __init__(self, text: str, status: int = 0, counts: bool = True,
                 drop_slot: bool = False):
        super().__init__(text)
        self.status = status
        self.counts = counts            # a failure, for the camera's backoff
        self.drop_slot = drop_slot      # the URL is spent: ask for another


def _quote(name: str) -> str:
    # As browsers (and urllib3) write names in form-data headers
    return name.replace("\\", "\\\\").replace('"', "%22") \
        .replace("\r", "%0D").replace("\n", "%0A")


class FormBody:
    """multipart/form-data read piece by piece: the fields first, in order,
    then the file part (S3 ignores fields after it).  The length is known
    up front, so requests sends a Content-Length, which S3 requires."""

    def __init__(self, fields: dict, filename: str, content_type: str,
                 fileobj: BinaryIO, size: int, stop: threading.Event):
        self.boundary = secrets.token_hex(16)
        head = b"".join(
            b'--%s\r\nContent-Disposition: form-data; name="%s"\r\n\r\n'
            b"%s\r\n" % (self.boundary.encode(), _quote(k).encode(),
                         v.encode()) for k, v in fields.items())
        head += (b'--%s\r\nContent-Disposition: form-data; name="file";'
                 b' filename="%s"\r\nContent-Type: %s\r\n\r\n'
                 % (self.boundary.encode(), _quote(filename).encode(),
                    content_type.encode()))
        self.parts = [head, fileobj, b"\r\n--%s--\r\n" % (
            self.boundary.encode(),)]
        self.size = size
        self.length = len(head) + size + len(self.parts[2])
        self.stop = stop
        self.sent = 0
    def content_type(self) -> str:
        return "multipart/form-data; boundary=%s" % (self.boundary,)
    def __len__(self) -> int:
        return self.length
    def read(self, n: int = -1) -> bytes:
        if self.stop.is_set():
            raise OSError("stopped")
        n = BLOCK if n is None or n < 0 else n
        out = b""
        while self.parts and len(out) < n:
            part = self.parts[0]
            if isinstance(part, bytes):
                take = part[:n - len(out)]
                self.parts[0] = part[len(take):]
            else:
                take = part.read(min(n - len(out), self.size - self.sent))
                self.sent += len(take)
                if not take and self.sent < self.size:
                    raise OSError("the file got shorter while uploading")
            out += take
            if not self.parts[0] or (not isinstance(part, bytes)
                                     and self.sent >= self.size):
                self.parts.pop(0)
        return out
    def __iter__(self):
        while True:
            block = self.read(BLOCK)
            if not block:
                return
            yield block


def post_form(slot: UploadSlot, filename: str, fileobj: BinaryIO, size: int,
              allow_loopback: bool, stop: threading.Event,
              ca_file: str = "", pace: Optional[Callable[[], None]] = None,
              ) -> int:
    """POST fileobj (size bytes) to the slot's URL as an S3 POST-policy
    form, on a connection to an address checked for its host or through
    the proxy (pinned.py); the HTTP status on success, else UploadError.
    pace: the upload child's pacer, called after each block sent and
    while its TLS context loads."""
    if stop.is_set():
        raise UploadError("stopped", counts=False)
    if time.monotonic() >= slot.expires_at - UPLOAD_MARGIN:
        raise UploadError(URL_EXPIRED, counts=False, drop_slot=True)
    if slot.max_size and size > slot.max_size:
        raise UploadError("%d bytes are more than the %d the cloud allows"
                          % (size, slot.max_size), drop_slot=True)
    parts = urllib.parse.urlsplit(slot.url)
    try:
        proxy = netpolicy.proxy_for(slot.url)
    except netpolicy.ProxyError as e:
        raise UploadError("upload failed: %s" % (e,)) from None
    context = None
    if parts.scheme == "https":
        context = tlstrust.tls_context(ca_file, pace)
    try:
        conn = pinned.connection(parts, proxy, allow_loopback, context,
                                 UPLOAD_TIMEOUT)
    except pinned.Unreachable as e:
        if e.refused:
            raise UploadError("refused upload URL: %s" % (e,),
                              drop_slot=True) from None
        raise UploadError("upload failed: %s" % (e,)) from None
    body = FormBody(slot.fields, filename, slot.content_type, fileobj, size,
                    stop)
    try:
        status, head = _send(conn, parts, body, pace or (lambda: None))
    except (OSError, ValueError) as e:      # HTTPException is a ValueError
        if stop.is_set():
            raise UploadError("stopped", counts=False) from None
        if proxy is not None and not conn.reached:
            raise UploadError("upload failed: %s" % (netpolicy.proxy_failure(
                parts.hostname or "", proxy, e),)) from None
        raise UploadError("upload failed: %s" % (pinned.failure(e),)) \
            from None
    finally:
        conn.close()
    if status in (200, 201, 204):
        return status
    match = S3_CODE_RE.search(head)
    code = match.group(1).decode() if match else ""
    # 400 or 403: refused (expired policy, clock skew, too large): the
    # URL is spent, get a new one
    raise UploadError("upload refused: HTTP %d%s"
                      % (status, " " + code if code else ""), status=status,
                      drop_slot=status in (400, 403))


def _send(conn, parts: urllib.parse.SplitResult, body: FormBody,
          pace: Callable[[], None]) -> tuple[int, bytes]:
    """The request, block by block; the status and, for a failure, the
    start of the answer (S3's error code)."""
    conn.putrequest("POST", pinned.request_target(parts),
                    skip_accept_encoding=True)
    conn.putheader("Content-Type", body.content_type())
    conn.putheader("Content-Length", str(len(body)))
    conn.endheaders()
    for block in body:
        conn.send(block)
        pace()
    resp = conn.getresponse()
    head = b"" if resp.status in (200, 201, 204) else resp.read(4096)
    return resp.status, head


def post_file(slot: UploadSlot, filename: str, path: str,
              allow_loopback: bool, stop: threading.Event,
              ca_file: str = "", pace: Optional[Callable[[], None]] = None,
              ) -> int:
    """post_form for a file on disk, streamed from it."""
    try:
        f = open(path, "rb")  # noqa: SIM115 (closed below)
    except OSError as e:
        raise UploadError("cannot read %s: %s" % (
            os.path.basename(path), e.strerror or e)) from None
    with f:
        size = os.fstat(f.fileno()).st_size
        return post_form(slot, filename, f, size, allow_loopback, stop,
                         ca_file, pace)
