# imaging.py run as a child process, from klippy's side: what it fetches,
# the request on its stdin (request), and what its answer means
#
# Used by the snapshot worker (snapshot_worker.py) and the timelapse frame
# worker (frames.py); the child is run at idle priority by children.py.
#
# This file may be distributed under the terms of the GNU GPLv3 license.
from __future__ import annotations

import dataclasses
import json
import re
from typing import Any, Optional

from . import children, imaging, netpolicy
from .options import MAX_FETCH, CameraOptions

# Fetching from the camera
FETCH_CONNECT_TIMEOUT = 5.
FETCH_READ_TIMEOUT = 10.
FETCH_DEADLINE = 20.
FETCH_CHUNK = 64 * 1024
# Image work in a child process (imaging.py)
IMAGING_SCRIPT = imaging.SCRIPT
IMAGING_TIMEOUT = 60.      # the fetch (FETCH_DEADLINE) and the image work


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


def request(limit: int, opts: Any, fetch: Optional[imaging.Fetch] = None,
            out: str = "") -> bytes:
    """The header line for imaging.py's stdin (the JPEG follows it unless
    the child is to fetch the frame itself)."""
    header = {
        "limit": int(limit), "flip_horizontal": bool(opts.flip_horizontal),
        "flip_vertical": bool(opts.flip_vertical),
        "rotation": int(opts.rotation)}
    if fetch is not None:
        header["fetch"] = dataclasses.asdict(fetch)
    if out:
        header["out"] = out
    return json.dumps(header).encode() + b"\n"


def run_imaging(kids: children.Children,
                request: bytes) -> tuple[int, bytes, str, int]:
    """(exit code, stdout, last stderr line, bytes fetched) of imaging.py
    (also for timelapse frames); the child is killed on a timeout or when
    the session stops (children.ChildTimeout, ChildStopped)."""
    with children.input_file(request) as stdin:
        code, out, err = kids.run_helper(IMAGING_SCRIPT, [],
                                         IMAGING_TIMEOUT, stdin=stdin)
    fetched = FETCHED_RE.search(err)
    return (code, out, _last_line(err),
            int(fetched.group(1)) if fetched else 0)


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
