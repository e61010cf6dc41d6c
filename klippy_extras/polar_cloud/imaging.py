# Snapshot image work: fetch from the camera, decode, transform, shrink
# and re-encode a JPEG
#
# Runs as a short-lived child process at idle CPU priority, never inside
# klippy (Pillow holds the GIL for parts of its work), and paces its CPU
# time from its first import on (pacing.py: Pillow's decoding, encoding
# and resizing in small pieces).  imagingchild.py starts it as
#
#     python /path/to/imaging.py
#
# with one JSON header line on stdin, either with a "fetch" object (the
# camera's URL and limits: the child fetches the frame itself) or followed
# by the JPEG (imagingchild.request writes it):
#
#     {"limit": 150000, "flip_horizontal": false, "flip_vertical": false,
#      "rotation": 0, "fetch": {"url": ..., ...}}\n
#
# and reads the resulting JPEG (at most limit bytes) from stdout; stderr
# says "fetched <bytes>".  With "out": <path> in the header (a timelapse
# frame) the JPEG is written to that file instead, complete or not at all
# (a temporary file renamed into place).  On failure it exits with one of
# the EXIT_* codes and writes one short line to stderr.  Pillow and
# camerafetch.py are loaded only when there is work to do: klippy imports
# this file for its constants, as extras.polar_cloud.imaging, without
# loading either.
#
# This file may be distributed under the terms of the GNU GPLv3 license.
from __future__ import annotations

import importlib.util
import os
import sys

SCRIPT = os.path.abspath(__file__)
if __name__ == "__main__":
    # Run by path: the package's other modules must not shadow anything
    # Pillow imports.  pacing.py (by its path: no package in the child)
    # paces the child from here on, its imports too
    sys.path[:] = [p for p in sys.path
                   if os.path.abspath(p or ".") != os.path.dirname(SCRIPT)]


def load_sibling(name: str):
    """A standard-library-only module next to this file, by its path (the
    child has no package)."""
    key = "polar_cloud_" + name
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            key, os.path.join(os.path.dirname(SCRIPT), name + ".py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules[key] = module
    return sys.modules[key]


pacing = load_sibling("pacing")
PACER = pacing.start(ticks=True) if __name__ == "__main__" else None

import dataclasses  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
from typing import Any, Optional  # noqa: E402

MAX_PIXELS = 3840 * 2160
# Shrinking: JPEG size relative to quality 85, roughly, for typical frames
QUALITY_RATIO = {85: 1., 70: .7, 55: .55, 40: .45}
MAX_ENCODES = 8
MIN_SIDE = 120
JPEG_EOI = b"\xff\xd9"
ROTATIONS = (0, 90, 180, 270)
MAX_HEADER = 8192
JPEG_SOI = b"\xff\xd8"

# Exit codes of the script; 1 is an unexpected error (a traceback)
EXIT_OK = 0
EXIT_BAD_JPEG = 3           # the camera's data: maps to CameraError
EXIT_CANNOT_SHRINK = 4      # maps to SnapshotError
EXIT_NO_PILLOW = 5          # Pillow is not installed for this Python
EXIT_BAD_REQUEST = 6        # the header on stdin is unusable (a bug)


@dataclasses.dataclass(frozen=True)
class Transform:
    """What to do with the picture (options.CameraOptions fits too)."""
    flip_horizontal: bool = False
    flip_vertical: bool = False
    rotation: int = 0           # clockwise, like the front-ends


@dataclasses.dataclass(frozen=True)
class Fetch:
    """Where and how the child gets the frame (imagingchild.py's limits)."""
    url: str
    connect_timeout: float
    read_timeout: float
    deadline: float             # seconds for the whole answer
    max_bytes: int
    chunk: int = 64 * 1024
    # The proxy (imagingchild.py asks netpolicy); "": none (a LAN camera)
    proxy: str = dataclasses.field(default="", repr=False)


class ImagingError(Exception):
    exit_code = 1


class BadJpeg(ImagingError):
    """The camera did not deliver a usable JPEG."""
    exit_code = EXIT_BAD_JPEG


class CannotShrink(ImagingError):
    exit_code = EXIT_CANNOT_SHRINK


class NoPillow(ImagingError):
    exit_code = EXIT_NO_PILLOW


class BadRequest(ImagingError):
    exit_code = EXIT_BAD_REQUEST


def pillow():
    """PIL.Image, or raise NoPillow."""
    try:
        from PIL import Image, ImageFile
    except ImportError as e:
        raise NoPillow("Pillow is not installed (%s)"
                       % (str(e)[:80] or e.__class__.__name__,)) from None
    if PACER is not None:
        pacing.pace_pillow(Image, ImageFile, PACER)
    return Image


def needs_transform(opts: Any) -> bool:
    return bool(opts.flip_horizontal or opts.flip_vertical or opts.rotation)


def _transform(img, Image, opts: Any):
    ops = getattr(Image, "Transpose", Image)
    if opts.flip_horizontal:
        img = pacing.transpose(img, ops.FLIP_LEFT_RIGHT, Image, PACER)
    if opts.flip_vertical:
        img = pacing.transpose(img, ops.FLIP_TOP_BOTTOM, Image, PACER)
    if opts.rotation:   # Pillow's ROTATE_* turn counter-clockwise
        img = pacing.transpose(img, {90: ops.ROTATE_270, 180: ops.ROTATE_180,
                                     270: ops.ROTATE_90}[opts.rotation], Image, PACER)
    return img


def _encode(img, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _shrink(img, limit: int, Image, at85: float = 0.) -> Optional[bytes]:
    """Re-encode, lowering quality and then size, until it fits.

    at85 estimates the size at quality 85 for the current picture size;
    each encode measures it again, so a poor first guess costs one more
    encode, while a good one saves the full-size encode of a big frame."""
    resample = getattr(Image, "Resampling", Image).BILINEAR
    quality = 85
    for _ in range(MAX_ENCODES):
        if at85:
            fitting = [q for q in QUALITY_RATIO if q <= quality
                       and at85 * QUALITY_RATIO[q] <= limit * .9]
            if fitting:
                quality = fitting[0]
            else:
                # Quality alone will not do: scale down, aiming a bit under
                quality = 70
                factor = math.sqrt(limit * .85 / (at85 * QUALITY_RATIO[70]))
                factor = min(.9, max(.25, factor))
                size = (int(img.width * factor), int(img.height * factor))
                if min(size) < MIN_SIDE:
                    return None
                img = pacing.resize(img, size, resample, Image, PACER)
        out = _encode(img, quality)
        if len(out) <= limit:
            return out
        at85 = len(out) / QUALITY_RATIO[quality]
    return None


def decode_jpeg(data: bytes, limit: int, opts: Any, Image=None):
    """(picture, estimated size at quality 85), or (None, 0) when data can
    go out as it is.  Raises BadJpeg."""
    if Image is None:
        Image = pillow()
    try:
        img = Image.open(io.BytesIO(data))
        if img.format != "JPEG":
            raise BadJpeg("not a JPEG image")
        width, height = img.size
        if not needs_transform(opts) and len(data) <= limit \
                and data.endswith(JPEG_EOI):
            # Decoding at 1/8 scale is cheap and still reads every byte
            img.draft("RGB", (max(1, width // 8), max(1, height // 8)))
            img.load()
            return None, 0.
        scale = 1.
        if len(data) > 2 * limit:
            scale = math.sqrt(2. * limit / len(data))
        if width * height * scale * scale > MAX_PIXELS:
            scale = math.sqrt(MAX_PIXELS / (width * height))
        if scale < 1.:
            # Decode at 1/2, 1/4 or 1/8 scale straight from the DCT
            img.draft("RGB", (max(1, int(width * scale)),
                              max(1, int(height * scale))))
        if img.width * img.height > 4 * MAX_PIXELS:
            raise BadJpeg("image too large (%dx%d)" % (width, height))
        img.load()
    except BadJpeg:
        raise
    except (OSError, SyntaxError, ValueError, EOFError,
            Image.DecompressionBombError) as e:
        raise BadJpeg("broken JPEG from the camera (%s)"
                      % (str(e)[:80] or e.__class__.__name__,)) from None
    # Cameras encode at about quality 85 too; size goes with the pixels
    at85 = len(data) * img.width * img.height / float(width * height)
    return img, at85


def fit_jpeg(img, limit: int, opts: Any, Image=None, at85: float = 0.) -> bytes:
    """Transform and re-encode; never cut bytes off to make it fit."""
    if Image is None:
        Image = pillow()
    if img.mode not in ("RGB", "L"):
        img = img.convert("RGB")
    out = _shrink(_transform(img, Image, opts), limit, Image, at85)
    if out is None:
        raise CannotShrink("cannot shrink the snapshot to %d bytes; skipped"
                           % (limit,))
    return out


def process_jpeg(data: bytes, limit: int, opts: Any, Image=None) -> bytes:
    """A complete JPEG of at most limit bytes, transformed; or raise
    BadJpeg, CannotShrink or NoPillow."""
    if Image is None:
        Image = pillow()
    img, at85 = decode_jpeg(data, limit, opts, Image)
    return data if img is None else fit_jpeg(img, limit, opts, Image, at85)


def fit_without_pillow(data: bytes, limit: int, opts: Any) -> bytes:
    """Without Pillow a frame can only go out as it is."""
    if not data.endswith(JPEG_EOI):
        raise BadJpeg("incomplete JPEG from the camera")
    if needs_transform(opts) or len(data) > limit:
        raise NoPillow("Pillow is not installed (needed to shrink or rotate"
                       " the snapshot)")
    return data


# Fetching (in the child too)

def fetch(spec: Fetch) -> bytes:
    """One frame from the camera's snapshot URL (camerafetch.py), or raise
    BadJpeg."""
    camerafetch = load_sibling("camerafetch")
    try:
        buf = camerafetch.fetch(spec, PACER or (lambda: None))
    except camerafetch.FetchFailed as e:
        raise BadJpeg(str(e)) from None
    if not buf:
        raise BadJpeg("empty answer")
    if not buf.startswith(JPEG_SOI):
        raise BadJpeg("the answer is not a JPEG image")
    return buf


# The script

def write_file(path: str, data: bytes) -> None:
    """All of data at path, or nothing there."""
    tmp = path + ".part"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def parse_request(raw: bytes) -> tuple[int, Transform, bytes,
                                       Optional[Fetch]]:
    head, newline, data = raw[:MAX_HEADER].partition(b"\n")
    try:
        if not newline:
            raise ValueError("no header line")
        header = json.loads(head)
        limit = header["limit"]
        opts = Transform(header["flip_horizontal"], header["flip_vertical"],
                         header["rotation"])
        spec = Fetch(**header["fetch"]) if "fetch" in header else None
    except (ValueError, KeyError, TypeError) as e:
        raise BadRequest("bad request header (%s)" % (str(e)[:80],)) from None
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1 \
            or opts.rotation not in ROTATIONS \
            or not isinstance(opts.flip_horizontal, bool) \
            or not isinstance(opts.flip_vertical, bool):
        raise BadRequest("bad request header")
    return limit, opts, raw[len(head) + 1:], spec


def output_path(raw: bytes) -> str:
    """The header's "out" path, "" when the JPEG goes to stdout."""
    head = raw[:MAX_HEADER].partition(b"\n")[0]
    try:
        out = json.loads(head).get("out", "")
    except (ValueError, AttributeError):
        return ""
    return out if isinstance(out, str) and os.path.isabs(out) else ""


def _one_line(text: str) -> str:
    return " ".join(text.split())[:200] or "error"


def main() -> int:
    pacing.lower_priority()
    raw = sys.stdin.buffer.read()
    try:
        limit, opts, data, spec = parse_request(raw)
        if spec is not None:
            data = fetch(spec)
            sys.stderr.write("fetched %d\n" % (len(data),))
        try:
            out = process_jpeg(data, limit, opts)
        except NoPillow:
            out = fit_without_pillow(data, limit, opts)
    except ImagingError as e:
        sys.stderr.write(_one_line(str(e)) + "\n")
        return e.exit_code
    path = output_path(raw)
    if path:
        write_file(path, out)
        return EXIT_OK
    sys.stdout.buffer.write(out)
    sys.stdout.buffer.flush()
    return EXIT_OK


if __name__ == "__main__":
    pacing.leave(main())
