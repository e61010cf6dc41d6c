# Timelapse frames on disk: <state_path>/timelapse/<jobId>/
#
# One folder per cloud job: f00000001.jpg, f00000002.jpg, ... (written by
# the imaging child), meta.json (the job's state, when it completed, its
# upload attempts) and, once rendered, timelapse.mp4.  state_path is not
# served by Moonraker, so nobody on the network sees the frames.
#
# All the timelapse folders together stay under a cap: past it, the
# frames of the recording are thinned, oldest first, every other one (and
# timelapses still waiting for an upload give way first when they take
# more than half of it).
#
# capture() fetches a frame into the store with the imaging child, which
# writes the file itself: klippy's process never holds the picture.
#
# Only worker threads call this.  Every change to the disk is made under
# FILES with the stop event checked: FILES is module-wide and klippy does
# not re-import the module on RESTART, so a thread of a stopped session
# never touches files once the next session can see them.
#
# This file may be distributed under the terms of the GNU GPLv3 license.
from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import re
import shutil
import threading
import time
from typing import Optional

from . import children, imaging, imagingchild, options, protocol

log = logging.getLogger("polar_cloud")

FILES = threading.Lock()
FOLDER = "timelapse"
META = "meta.json"
VIDEO = "timelapse.mp4"
FRAME_RE = re.compile(r"^f(\d{8})\.jpg$")
MIN_FRAMES = 2              # thinning keeps at least the first and the last
FRAME_LIMIT = 300 * 1024    # bytes per frame (the imaging child shrinks)


class Stopped(Exception):
    """The session stopped: nothing more is written."""


def _locked(method):
    """The store is shared by the frame and the post-processing worker."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with self.lock:
            return method(self, *args, **kwargs)
    return wrapper


def _size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return 0


class FrameStore:
    def __init__(self, state_path: str, cap: int, stop: threading.Event):
        self.root = os.path.join(state_path, FOLDER)
        self.cap = cap
        self.stop = stop
        self.lock = threading.RLock()
        # Per job: {frame name: bytes}, read from the disk when first needed
        self.sizes: dict[str, dict[str, int]] = {}
        self.next_index: dict[str, int] = {}
        self.others: Optional[int] = None   # bytes of the other folders
        # The job whose video is being made: never dropped for room
        self.protected = ""
    @contextlib.contextmanager
    def changing(self):
        with FILES:
            if self.stop.is_set():
                raise Stopped()
            yield
    def folder(self, job_id: str) -> str:
        if not protocol.JOB_ID_RE.match(job_id):
            raise ValueError("bad job id %r" % (job_id,))
        return os.path.join(self.root, job_id)
    def video_path(self, job_id: str) -> str:
        return os.path.join(self.folder(job_id), VIDEO)
    # The recording
    @_locked
    def begin(self, job_id: str) -> None:
        """A folder for a job that starts printing."""
        folder = self.folder(job_id)
        with self.changing():
            os.makedirs(self.root, mode=0o700, exist_ok=True)
            os.makedirs(folder, mode=0o700, exist_ok=True)
            if not os.path.exists(os.path.join(folder, META)):
                self._write_meta(job_id, {"job_id": job_id,
                                          "state": "recording",
                                          "started": time.time()})
        self.others = None
    @_locked
    def new_frame(self, job_id: str) -> str:
        """Where the next frame goes."""
        frames = self._frames(job_id)
        index = self.next_index.get(job_id)
        if index is None:
            index = 1 + max((int(FRAME_RE.match(n).group(1)) for n in frames),
                            default=0)
        self.next_index[job_id] = index + 1
        return os.path.join(self.folder(job_id), "f%08d.jpg" % (index,))
    @_locked
    def added(self, job_id: str, path: str) -> int:
        """A frame was written: count it and keep under the cap.  Returns
        the number of frames kept."""
        size = _size(path)
        frames = self._frames(job_id)
        if size:
            frames[os.path.basename(path)] = size
        self._keep_under_cap(job_id)
        return len(frames)
    @_locked
    def frame_count(self, job_id: str) -> int:
        return len(self._frames(job_id))
    @_locked
    def frame_bytes(self, job_id: str) -> int:
        return sum(self._frames(job_id).values())
    @_locked
    def last_frame(self, job_id: str) -> str:
        frames = self._frames(job_id)
        return os.path.join(self.folder(job_id), max(frames)) if frames \
            else ""
    def _frames(self, job_id: str) -> dict[str, int]:
        frames = self.sizes.get(job_id)
        if frames is None:
            folder = self.folder(job_id)
            try:
                names = os.listdir(folder)
            except OSError:
                names = []
            frames = {n: _size(os.path.join(folder, n)) for n in names
                      if FRAME_RE.match(n)}
            self.sizes[job_id] = frames
        return frames
    # The cap
    def _keep_under_cap(self, job_id: str) -> None:
        if self.others is None:
            self.others = sum(self.usage(j) for j in self.job_ids()
                              if j != job_id)
        if self.others > self.cap // 2:
            # Timelapses still waiting for their upload give way, oldest
            # first, to the one being recorded
            waiting = sorted((self.meta(j).get("started", 0.), j)
                             for j in self.job_ids()
                             if j not in (job_id, self.protected))
            others = self.others
            for _started, other in waiting:
                if others <= self.cap // 2:
                    break
                log.info("polar_cloud: timelapse of job %s dropped to make"
                         " room for the one being recorded", other)
                others -= self.usage(other)
                self.remove(other)
            self.others = others
        folder = self.folder(job_id)
        extra = _size(os.path.join(folder, VIDEO)) \
            + _size(os.path.join(folder, META))
        self.thin(job_id, self.cap - self.others - extra)
    @_locked
    def thin(self, job_id: str, budget: int) -> int:
        """Drop every other frame, oldest first, until the frames take at
        most budget bytes; the first and the last frame stay.  Returns the
        number of frames removed."""
        frames = self._frames(job_id)
        total = sum(frames.values())
        removed = 0
        folder = self.folder(job_id)
        while total > budget and len(frames) > MIN_FRAMES:
            names = sorted(frames)
            for i in range(1, len(names) - 1, 2):
                if total <= budget:
                    break
                with self.changing():
                    try:
                        os.unlink(os.path.join(folder, names[i]))
                    except FileNotFoundError:
                        pass
                total -= frames.pop(names[i])
                removed += 1
        return removed
    @_locked
    def usage(self, job_id: str) -> int:
        folder = self.folder(job_id)
        try:
            return sum(_size(os.path.join(folder, n))
                       for n in os.listdir(folder))
        except OSError:
            return 0
    @_locked
    def total(self) -> int:
        return sum(self.usage(j) for j in self.job_ids())
    # Jobs on disk
    @_locked
    def job_ids(self) -> list[str]:
        try:
            names = os.listdir(self.root)
        except OSError:
            return []
        return sorted(n for n in names if protocol.JOB_ID_RE.match(n)
                      and os.path.isdir(os.path.join(self.root, n)))
    @_locked
    def meta(self, job_id: str) -> dict:
        try:
            with open(os.path.join(self.folder(job_id), META)) as f:
                data = json.load(f)
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}
    @_locked
    def update_meta(self, job_id: str, **fields) -> None:
        data = self.meta(job_id)
        data.update(fields, job_id=job_id)
        with self.changing():
            if os.path.isdir(self.folder(job_id)):
                self._write_meta(job_id, data)
    def _write_meta(self, job_id: str, data: dict) -> None:
        path = os.path.join(self.folder(job_id), META)
        tmp = path + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f)
        os.replace(tmp, path)
    @_locked
    def install_video(self, job_id: str, rendered: str) -> str:
        """Move a finished render into place."""
        path = self.video_path(job_id)
        with self.changing():
            os.replace(rendered, path)
        return path
    @_locked
    def remove(self, job_id: str) -> None:
        """The job's folder and everything in it."""
        with self.changing():
            shutil.rmtree(self.folder(job_id), ignore_errors=True)
        self.sizes.pop(job_id, None)
        self.next_index.pop(job_id, None)
        self.others = None


def capture(store: FrameStore, kids: children.Children,
            opts: options.CameraOptions, job_id: str) -> str:
    """Frame worker: one frame into the job's folder, fetched, turned and
    shrunk by the imaging child, which writes the file itself.  An error
    text, or "" when the frame was kept."""
    try:
        spec = imagingchild.fetch_spec(opts)
        path = store.new_frame(job_id)
        code, _out, err, _fetched = imagingchild.run_imaging(
            kids, imagingchild.request(FRAME_LIMIT, opts, spec, out=path))
        if code != imaging.EXIT_OK:
            return err or "image processing failed (exit code %d)" % (code,)
        store.added(job_id, path)
    except (Stopped, children.ChildStopped):
        return "stopped"
    except children.ChildTimeout:
        return "the frame took longer than %d s" % (
            imagingchild.IMAGING_TIMEOUT,)
    except (children.ChildError, imagingchild.CameraError,
            imagingchild.SnapshotError, OSError) as e:
        return str(e)
    return ""
