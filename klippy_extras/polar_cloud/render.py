# The timelapse video: an H.264 MP4 of a job's frames, a few seconds long
# and small enough for the upload the cloud grants, made by ffmpeg in a
# child process at idle CPU priority (children.py), never in klippy.
#
# plan() and command() are pure; render() runs on a worker thread.
#
# This file may be distributed under the terms of the GNU GPLv3 license.
from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from fractions import Fraction
from typing import Optional

from . import children

MIN_VIDEO_FRAMES = 2
FRAMES_PER_SECOND = 15.     # how fast frames go by, within the limits:
MIN_SECONDS = 3.            # a short print still gives a watchable clip,
MAX_SECONDS = 10.           # a long one a short clip
MAX_FPS = 30                # more frames than that are dropped evenly
HEIGHTS = (1080, 720, 540, 480, 360, 240)
MAX_KBPS = 6000
MIN_KBPS = 64
BITS_PER_PIXEL = .06        # per frame: the bitrate a size needs to look fine
DEFAULT_BUDGET = 32 * 1024 * 1024   # when the cloud sets no maxSize
HEADROOM = .85              # of the budget for the video stream
CONTAINER = 16 * 1024       # MP4 headers and index, roughly
RENDER_TIMEOUT = 600.
ATTEMPTS = 3                # a video over the budget is made again, smaller
TMP_NAME = ".render.mp4"
THREADS = 2


class RenderError(Exception):
    pass


@dataclass(frozen=True)
class Plan:
    frames: int
    rate: Fraction              # frames per second read
    out_fps: int                # 0: as read; else fewer (frames dropped)
    seconds: float
    width: int
    height: int
    kbps: int


def find_ffmpeg() -> str:
    return shutil.which("ffmpeg") or ""


def seconds_for(frames: int) -> float:
    return min(MAX_SECONDS, max(MIN_SECONDS, frames / FRAMES_PER_SECOND))


def _even(value: float) -> int:
    return max(2, int(round(value / 2.)) * 2)


def plan(frames: int, source: Optional[tuple[int, int]], budget: int,
         smaller: int = 0) -> Plan:
    """How to render frames into at most budget bytes; smaller > 0 after
    a video came out too big (lower bitrate, next size down)."""
    if frames < MIN_VIDEO_FRAMES:
        raise RenderError("%d frame%s, too few for a timelapse"
                          % (frames, "" if frames == 1 else "s"))
    seconds = seconds_for(frames)
    rate = Fraction(frames) / Fraction(seconds).limit_denominator(1000)
    out_fps = MAX_FPS if rate > MAX_FPS else 0
    fps = float(out_fps or rate)
    budget = budget or DEFAULT_BUDGET
    kbps = (budget - CONTAINER) * HEADROOM * 8. / seconds / 1000.
    kbps = kbps * .7 ** smaller
    kbps = int(max(MIN_KBPS, min(MAX_KBPS, kbps)))
    src_w, src_h = source or (1280, 720)
    # The largest standard height the bitrate can fill, not above the
    # camera's own
    heights = [h for h in HEIGHTS if h <= src_h] or [src_h]
    fitting = [h for h in heights
               if h * h * src_w / src_h * fps * BITS_PER_PIXEL
               <= kbps * 1000.]
    index = heights.index(fitting[0]) if fitting else len(heights) - 1
    height = heights[min(len(heights) - 1, index + smaller)]
    return Plan(frames, rate, out_fps, seconds,
                _even(src_w * height / src_h), _even(height), kbps)


def command(ffmpeg: str, p: Plan, out: str) -> list[str]:
    """ffmpeg's arguments, run in the frames' folder."""
    size = "%d:%d" % (p.width, p.height)
    # Frames beyond MAX_FPS are dropped evenly by the fps filter (-r adds
    # a frame or two at the ends)
    video_filter = ("scale=%s:force_original_aspect_ratio=decrease,"
                    "pad=%s:(ow-iw)/2:(oh-ih)/2,setsar=1,%sformat=yuv420p"
                    % (size, size, "fps=%d," % (p.out_fps,) if p.out_fps
                       else ""))
    return [
        ffmpeg, "-nostdin", "-hide_banner", "-loglevel", "error", "-y",
        "-framerate", "%d/%d" % (p.rate.numerator, p.rate.denominator),
        "-pattern_type", "glob", "-i", "f*.jpg", "-vf", video_filter,
        "-c:v", "libx264", "-preset", "veryfast", "-profile:v", "high",
        "-b:v", "%dk" % (p.kbps,), "-maxrate", "%dk" % (p.kbps * 3 // 2,),
        "-bufsize", "%dk" % (p.kbps * 2,), "-threads", str(THREADS),
        "-movflags", "+faststart", "-an", "-f", "mp4", out]


SOF_MARKERS = frozenset(range(0xc0, 0xd0)) - {0xc4, 0xc8, 0xcc}


def jpeg_size(path: str) -> Optional[tuple[int, int]]:
    """(width, height) from a JPEG's header, without decoding it."""
    try:
        with open(path, "rb") as f:
            data = f.read(256 * 1024)
    except OSError:
        return None
    i = 2
    while data.startswith(b"\xff\xd8") and i + 9 < len(data):
        if data[i] != 0xff:
            return None
        marker = data[i + 1]
        if marker == 0xff:
            i += 1
            continue
        length = int.from_bytes(data[i + 2:i + 4], "big")
        if marker in SOF_MARKERS:
            height = int.from_bytes(data[i + 5:i + 7], "big")
            width = int.from_bytes(data[i + 7:i + 9], "big")
            return (width, height) if width and height else None
        i += 2 + length
    return None


@dataclass
class Rendered:
    path: str                   # the temporary file in the frames' folder
    size: int
    plan: Plan
    took: float                 # seconds of wall time


def render(kids: children.Children, ffmpeg: str, folder: str, frames: int,
           source: Optional[tuple[int, int]], budget: int,
           timeout: float = RENDER_TIMEOUT) -> Rendered:
    """The frames in folder as an MP4 of at most budget bytes (0: no
    limit from the cloud).  Raises RenderError, or children.ChildStopped
    when the session stops."""
    started = time.monotonic()
    out = os.path.join(folder, TMP_NAME)
    size = 0
    for smaller in range(ATTEMPTS):
        p = plan(frames, source, budget, smaller)
        left = started + timeout - time.monotonic()
        if left <= 0:
            break
        try:
            code, _out, err = kids.run(command(ffmpeg, p, out), left,
                                       "video work", cwd=folder)
        except children.ChildTimeout:
            break
        except children.ChildError as e:
            raise RenderError("cannot start ffmpeg (%s)" % (e,)) from None
        if code != 0:
            lines = err.strip().splitlines()
            detail = "killed by signal %d" % (-code,) if code < 0 \
                else "exit code %d" % (code,)
            raise RenderError("ffmpeg failed (%s%s)" % (
                detail, ": " + lines[-1][:160] if lines else ""))
        try:
            size = os.path.getsize(out)
        except OSError:
            raise RenderError("ffmpeg wrote no video") from None
        if size and (not budget or size <= budget):
            return Rendered(out, size, p, time.monotonic() - started)
    if size:
        raise RenderError("the video stays larger than the %d bytes allowed"
                          % (budget,))
    raise RenderError("rendering took longer than %d s" % (timeout,))
