"""HTTP side of the simulator: job files with scripted faults, S3-style uploads,
the printer make list.

``GET /files/<name>`` serves files added with :meth:`HttpSide.add_file` in one
of :data:`FILE_MODES`.  ``POST /upload`` checks an S3 POST-policy multipart
form against the form issued in a ``getUrlResponse`` (docs/protocol.md,
section 9).  ``GET /api/v1/printer_makes?filter=<machine type>`` answers
``{"printerMakes": [...]}`` from :attr:`HttpSide.printer_makes` like
polar3d.com's REST API (the request is counted as ``printer_makes``);
``hold_printer_makes(True)`` keeps the answers waiting until it is called
with False, so a test can be listening before they arrive.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import secrets
import shutil
import socket
import struct
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Callable
from urllib.parse import quote

from aiohttp import BodyPartReader, web

from .records import Recorder

FILE_MODES = (
    "ok",  # 200 with the content
    "404",  # any 3-digit status works: "403", "500", "503", ...
    "500",
    "slow",  # trickle `rate` bytes per second
    "stall",  # send half, then hang until the simulator stops
    "truncate",  # full Content-Length, half the body, then FIN
    "reset",  # TCP RST before any byte of the response
    "reset_half",  # full Content-Length, half the body, then RST
    "lying_length",  # Content-Length = len + length_delta (may be negative)
    "no_length",  # chunked transfer encoding, no Content-Length
    "html",  # 200 text/html error page instead of the content
    "redirect",  # 302 to `target`, or a chain of `hops` redirects to the content
)

# A few real names per machine type (polar3d.com's list has about 110)
PRINTER_MAKES = {
    "cartesian": [
        "Bambu X1C",
        "Cartesian",
        "Cartesian 200 x 200",
        "Dremel DigiLab 3D45",
        "Elegoo Neptune 3 Pro",
        "Ender 3 S1 Plus",
        "Ender 3 V2",
        "Flashforge Adventurer 5M",
        "Prusa Mk3S",
        "Sovol SV06",
        "Ultimaker S5",
    ],
    "delta": ["Delta", "SeeMeCNC Rostock Max V3"],
    "belt": ["Belt", "Printrbot Printrbelt"],
}

UPLOAD_FIELDS = (
    "bucket",
    "key",
    "acl",
    "X-Amz-Algorithm",
    "X-Amz-Credential",
    "X-Amz-Date",
    "Policy",
    "X-Amz-Signature",
)
UPLOAD_HARD_CAP = 64 * 1024 * 1024
_SIGNING_SECRET = secrets.token_bytes(32)

HTML_ERROR_PAGE = (
    b"<!DOCTYPE html>\n<html><head><title>503 Service Unavailable</title></head>"
    b"<body><h1>Service Unavailable</h1><p>The server is temporarily unable to "
    b"service your request.</p></body></html>\n"
)


def reset_transport(transport: asyncio.BaseTransport | None) -> None:
    """Abort a connection with a TCP RST (SO_LINGER 0) instead of a FIN."""
    if transport is None or transport.is_closing():
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
            )
        except OSError:
            pass
    transport.abort()  # type: ignore[attr-defined]


def probe_video(data: bytes) -> dict[str, Any]:
    """What ffprobe reads in an uploaded timelapse: format, codec, size,
    frames and duration; {"error": ...} when it reads no video."""
    ffprobe = shutil.which("ffprobe")
    if ffprobe is None:
        return {"error": "ffprobe is not installed (apt install ffmpeg)"}
    with tempfile.NamedTemporaryFile(suffix=".mp4") as f:
        f.write(data)
        f.flush()
        proc = subprocess.run(
            [ffprobe, "-v", "error", "-count_frames", "-select_streams", "v:0",
             "-show_entries",
             "format=format_name,duration:stream=codec_name,width,height,"
             "nb_read_frames,avg_frame_rate,pix_fmt",
             "-of", "json", f.name],
            capture_output=True, text=True, timeout=60, check=False)
    try:
        info = json.loads(proc.stdout or "{}")
        stream = info["streams"][0]
        fmt = info["format"]
        return {
            "format": fmt["format_name"],
            "duration": float(fmt["duration"]),
            "codec": stream["codec_name"],
            "width": int(stream["width"]),
            "height": int(stream["height"]),
            "frames": int(stream["nb_read_frames"]),
            "fps": stream.get("avg_frame_rate", ""),
            "pix_fmt": stream.get("pix_fmt", ""),
        }
    except (ValueError, KeyError, IndexError, TypeError):
        return {"error": "not a video ffprobe can read: %s"
                % (proc.stderr.strip()[-200:] or "no stream",)}


def video_problems(video: dict[str, Any]) -> list[str]:
    if "error" in video:
        return [video["error"]]
    problems = []
    if "mp4" not in video["format"].split(","):
        problems.append(f"format {video['format']!r} is not MP4")
    if video["codec"] != "h264":
        problems.append(f"codec {video['codec']!r} is not H.264")
    if video["frames"] < 2 or video["duration"] <= 0:
        problems.append("no moving picture (%d frames, %.2f s)"
                        % (video["frames"], video["duration"]))
    return problems


def s3_error(status: int, code: str, message: str) -> web.Response:
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>{message}</Message>"
        f"<RequestId>{secrets.token_hex(8).upper()}</RequestId></Error>"
    )
    return web.Response(status=status, text=body, content_type="application/xml")


@dataclass
class SimFile:
    name: str
    content: bytes
    mode: str = "ok"
    content_type: str = "application/octet-stream"
    rate: float = 64.0
    length_delta: int = 1000
    target: str | None = None
    status: int = 302


@dataclass
class UploadForm:
    fields: dict[str, str]
    issued: float
    expires: int
    max_size: int
    content_type: str
    serial: str | None
    type: str
    job_id: str | None

    def expired(self, now: float | None = None) -> bool:
        return (
            now if now is not None else time.monotonic()
        ) > self.issued + self.expires


@dataclass
class _Parsed:
    fields: list[tuple[str, str]] = field(default_factory=list)
    after_file: list[str] = field(default_factory=list)
    file_parts: int = 0
    filename: str | None = None
    content_type: str | None = None
    data: bytes = b""
    size: int = 0


class HttpSide:
    def __init__(
        self,
        recorder: Recorder,
        base_url: Callable[[], str],
        stopping: Callable[[], asyncio.Event],
    ) -> None:
        self.rec = recorder
        self._base_url = base_url
        self._stopping = stopping
        self.files: dict[str, SimFile] = {}
        self.forms: dict[str, UploadForm] = {}
        self.upload_fail: int | None = None  # fault: answer every upload with this
        self.printer_makes: dict[str, list[str]] = {
            k: list(v) for k, v in PRINTER_MAKES.items()
        }
        self.makes_open = asyncio.Event()  # cleared: answers wait
        self.makes_open.set()

    def add_routes(self, app: web.Application) -> None:
        app.router.add_route("GET", "/files/{name:.+}", self.handle_file)
        app.router.add_post("/upload", self.handle_upload)
        app.router.add_get("/api/v1/printer_makes", self.handle_printer_makes)

    async def hold_printer_makes(self, on: bool) -> None:
        if on:
            self.makes_open.clear()
        else:
            self.makes_open.set()

    async def handle_printer_makes(self, request: web.Request) -> web.Response:
        self.rec.hit("printer_makes")
        if not self.makes_open.is_set():
            waits = [
                asyncio.ensure_future(self.makes_open.wait()),
                asyncio.ensure_future(self._stopping().wait()),
            ]
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            for w in waits:
                w.cancel()
        wanted = request.query.get("filter", "")
        with self.rec.lock:
            makes = list(self.printer_makes.get(wanted, []))
        return web.json_response({"printerMakes": makes})

    # -- files ---------------------------------------------------------------

    def file_url(self, name: str) -> str:
        return f"{self._base_url()}/files/{quote(name)}"

    def add_file(
        self,
        name: str,
        content: bytes = b"",
        mode: str = "ok",
        *,
        content_type: str | None = None,
        rate: float = 64.0,
        length_delta: int = 1000,
        target: str | None = None,
        hops: int = 1,
        status: int = 302,
    ) -> str:
        mode = str(mode)
        if mode not in FILE_MODES and not (mode.isdigit() and len(mode) == 3):
            raise ValueError(
                f"unknown file mode {mode!r}; known: {', '.join(FILE_MODES)}"
            )
        if isinstance(content, str):
            content = content.encode()
        ctype = content_type or "application/octet-stream"
        with self.rec.lock:
            if mode == "redirect" and target is None:
                # name -> name.r1 -> ... -> name.final (served "ok")
                final = f"{name}.final"
                self.files[final] = SimFile(final, content, "ok", ctype)
                chain = [name] + [f"{name}.r{i}" for i in range(1, max(1, hops))]
                for i, hop in enumerate(chain):
                    nxt = chain[i + 1] if i + 1 < len(chain) else final
                    self.files[hop] = SimFile(
                        hop, b"", "redirect", ctype, target=nxt, status=status
                    )
            else:
                self.files[name] = SimFile(
                    name, content, mode, ctype, rate, length_delta, target, status
                )
        return self.file_url(name)

    async def _sleep(self, seconds: float) -> bool:
        """Sleep unless the simulator stops first; True means stopping."""
        try:
            await asyncio.wait_for(self._stopping().wait(), seconds)
            return True
        except asyncio.TimeoutError:
            return False

    async def handle_file(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        with self.rec.lock:
            f = self.files.get(name)
        self.rec.hit(name)
        if f is None:
            return s3_error(404, "NoSuchKey", "The specified key does not exist.")
        body, mode = f.content, f.mode
        half = body[: len(body) // 2]
        headers = {"Content-Type": f.content_type}
        try:
            if mode == "ok":
                return web.Response(body=body, headers=headers)
            if mode.isdigit():
                return s3_error(int(mode), "SimulatedError", f"simulated HTTP {mode}")
            if mode == "html":
                return web.Response(body=HTML_ERROR_PAGE, content_type="text/html")
            if mode == "redirect":
                target = f.target or ""
                location = target if "://" in target else self.file_url(target)
                return web.Response(status=f.status, headers={"Location": location})
            if mode == "reset":
                reset_transport(request.transport)
                return web.Response()
            if mode in ("truncate", "reset_half", "lying_length"):
                length = len(body) + (f.length_delta if mode == "lying_length" else 0)
                payload = body if mode == "lying_length" else half
                self._raw_response(request, max(0, length), f.content_type, payload)
                if mode == "reset_half":
                    await asyncio.sleep(0.05)  # let the half reach the client first
                    reset_transport(request.transport)
                elif request.transport is not None:
                    request.transport.close()
                return web.Response()
            resp = web.StreamResponse(headers=headers)
            if mode == "no_length":
                resp.enable_chunked_encoding()
                await resp.prepare(request)
                for i in range(0, len(body), 4096):
                    await resp.write(body[i : i + 4096])
            else:
                resp.content_length = len(body)
                await resp.prepare(request)
                if mode == "slow":
                    chunk = max(1, int(f.rate // 10))
                    for i in range(0, len(body), chunk):
                        await resp.write(body[i : i + chunk])
                        if await self._sleep(chunk / f.rate):
                            break
                elif mode == "stall":
                    await resp.write(half)
                    await self._stopping().wait()
                    reset_transport(request.transport)
                    return resp
            await resp.write_eof()
            return resp
        except (ConnectionError, RuntimeError):  # the client went away
            return web.Response()

    @staticmethod
    def _raw_response(
        request: web.Request, length: int, ctype: str, body: bytes
    ) -> None:
        transport = request.transport
        if transport is None:
            return
        head = (
            "HTTP/1.1 200 OK\r\n"
            f"Content-Type: {ctype}\r\n"
            f"Content-Length: {length}\r\n"
            "Connection: close\r\n\r\n"
        )
        transport.write(head.encode() + body)

    # -- upload forms ----------------------------------------------------------

    def issue_form(
        self,
        serial: str | None,
        url_type: str,
        job_id: str | None,
        expires: int,
        max_size: int,
        content_type: str,
    ) -> UploadForm:
        """Mint a unique S3 POST-policy form (all field values are unique)."""
        now = datetime.now(timezone.utc)
        form_id = secrets.token_hex(8)
        ext = "mp4" if url_type == "timelapse" else "jpg"
        key = f"printers/{serial}/{url_type}/{form_id}.{ext}"
        date = now.strftime("%Y%m%d")
        credential = f"SIMAKIA{form_id.upper()}/{date}/us-east-1/s3/aws4_request"
        policy_doc = {
            "expiration": (now + timedelta(seconds=expires)).strftime(
                "%Y-%m-%dT%H:%M:%S.000Z"
            ),
            "conditions": [
                {"bucket": "polar-sim-uploads"},
                ["eq", "$key", key],
                {"acl": "public-read"},
                ["content-length-range", 0, max_size],
                {"x-amz-credential": credential},
            ],
        }
        policy = base64.b64encode(json.dumps(policy_doc).encode()).decode()
        signature = hmac.new(
            _SIGNING_SECRET, policy.encode(), hashlib.sha256
        ).hexdigest()
        fields = {
            "bucket": "polar-sim-uploads",
            "key": key,
            "acl": "public-read",
            "X-Amz-Algorithm": "AWS4-HMAC-SHA256",
            "X-Amz-Credential": credential,
            "X-Amz-Date": now.strftime("%Y%m%dT%H%M%SZ"),
            "Policy": policy,
            "X-Amz-Signature": signature,
        }
        form = UploadForm(
            fields,
            time.monotonic(),
            expires,
            max_size,
            content_type,
            serial,
            url_type,
            job_id,
        )
        with self.rec.lock:
            self.forms[signature] = form
        return form

    # -- upload endpoint -------------------------------------------------------

    async def handle_upload(self, request: web.Request) -> web.Response:
        t = time.monotonic()
        attempt: dict[str, Any] = {"t": t, "status": None, "reason": None}

        def finish(status: int, reason: str | None, violation: bool = True) -> None:
            attempt.update(status=status, reason=reason)
            with self.rec.cond:
                self.rec.upload_attempts.append(attempt)
                self.rec.cond.notify_all()
            if reason and violation:
                self.rec.violation(
                    f"upload rejected with HTTP {status}: {reason}", "upload"
                )

        def reject(status: int, code: str, message: str) -> web.Response:
            finish(status, f"{code}: {message}")
            return s3_error(status, code, message)

        if not request.content_type.startswith("multipart/form-data"):
            await request.read()
            return reject(
                400, "MalformedPOSTRequest", "body must be multipart/form-data"
            )
        try:
            parsed = await self._parse_form(request)
        except ValueError as e:
            return reject(400, "MalformedPOSTRequest", str(e))
        got = dict(parsed.fields)
        attempt.update(fields=got, filename=parsed.filename, size=parsed.size)
        if self.upload_fail is not None:
            finish(self.upload_fail, "fault upload_fail", violation=False)
            return s3_error(
                self.upload_fail, "InternalError", "simulated upload failure"
            )
        if parsed.file_parts != 1:
            return reject(
                400,
                "InvalidArgument",
                "POST requires exactly one file upload per request",
            )
        with self.rec.lock:
            form = self.forms.get(got.get("X-Amz-Signature", ""))
        if form is None:
            return reject(
                403, "AccessDenied", "unknown or missing X-Amz-Signature / Policy"
            )
        if len(got) != len(parsed.fields):
            return reject(400, "InvalidArgument", "a form field appears more than once")
        for name, value in form.fields.items():
            if name not in got:
                where = (
                    " (sent after the file part)" if name in parsed.after_file else ""
                )
                return reject(
                    403, "AccessDenied", f"missing form field {name!r}{where}"
                )
            if got[name] != value:
                return reject(
                    403,
                    "AccessDenied",
                    f"Invalid according to Policy: field {name!r} altered",
                )
        extra = [n for n in got if n not in form.fields]
        if extra:
            return reject(
                403,
                "AccessDenied",
                f"Invalid according to Policy: Extra input fields: {extra}",
            )
        if form.expired(t):
            return reject(
                403, "AccessDenied", "Invalid according to Policy: Policy expired."
            )
        if parsed.size > form.max_size:
            return reject(
                400,
                "EntityTooLarge",
                f"{parsed.size} bytes exceed maxSize {form.max_size}",
            )
        if parsed.content_type != form.content_type:
            return reject(
                403,
                "AccessDenied",
                f"file Content-Type {parsed.content_type!r} != {form.content_type!r}",
            )
        who = form.serial or "upload"
        if [n for n, _ in parsed.fields] != list(form.fields):
            self.rec.violation("upload: form fields not in the issued order", who)
        if parsed.after_file:
            self.rec.violation(
                f"upload: fields after the file part: {parsed.after_file}", who
            )
        if parsed.size == 0:
            self.rec.violation(
                "upload: empty file (zero-length images must be skipped)", who
            )
        elif form.content_type == "image/jpeg" and not (
            parsed.data.startswith(b"\xff\xd8\xff")
            and parsed.data.endswith(b"\xff\xd9")
        ):
            self.rec.violation("upload: file is not a complete JPEG (SOI..EOI)", who)
        video = None
        if form.type == "timelapse" and parsed.size:
            if parsed.filename != "timelapse.mp4":
                self.rec.violation(
                    f"upload: timelapse named {parsed.filename!r}, not"
                    " 'timelapse.mp4'",
                    who,
                )
            video = await asyncio.get_running_loop().run_in_executor(
                None, probe_video, parsed.data
            )
            for problem in video_problems(video):
                self.rec.violation(f"upload: timelapse: {problem}", who)
        upload = {
            "t": t,
            "fields": got,
            "filename": parsed.filename,
            "content_type": parsed.content_type,
            "data": parsed.data,
            "serial": form.serial,
            "type": form.type,
            "jobId": form.job_id,
            "video": video,
        }
        with self.rec.cond:
            self.rec.uploads.append(upload)
        finish(204, None)
        return web.Response(status=204)

    async def _parse_form(self, request: web.Request) -> _Parsed:
        parsed = _Parsed()
        reader = await request.multipart()
        while True:
            part = await reader.next()
            if part is None:
                break
            if not isinstance(part, BodyPartReader):
                raise ValueError("nested multipart is not allowed")
            if part.name == "file":
                parsed.file_parts += 1
                if parsed.file_parts > 1:
                    await part.release()
                    continue
                parsed.filename = part.filename
                parsed.content_type = part.headers.get("Content-Type")
                with self.rec.lock:
                    known = self.forms.get(
                        dict(parsed.fields).get("X-Amz-Signature", "")
                    )
                limit = known.max_size if known else UPLOAD_HARD_CAP
                buf = bytearray()
                while True:
                    chunk = await part.read_chunk(65536)
                    if not chunk:
                        break
                    parsed.size += len(chunk)
                    if len(buf) <= limit:
                        buf += chunk[: limit + 1 - len(buf)]
                    if parsed.size > UPLOAD_HARD_CAP:
                        raise ValueError("upload exceeds the simulator's hard cap")
                parsed.data = bytes(buf)
            elif parsed.file_parts:
                parsed.after_file.append(part.name or "")
                await part.release()
            else:
                parsed.fields.append((part.name or "", await part.text()))
        return parsed
