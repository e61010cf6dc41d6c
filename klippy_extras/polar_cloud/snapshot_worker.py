# One snapshot, on its own short-lived worker thread: the imaging child
# fetches, checks, transforms and shrinks the frame (imagingchild.py), the
# upload child uploads the JPEG (uploadchild.py), and the result goes
# back to the camera (camera.py), which keeps the schedule and the state.
#
# This file may be distributed under the terms of the GNU GPLv3 license.
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

from . import children, imaging, imagingchild, uploadchild
from .imagingchild import CameraError, SnapshotError, fetch_spec, run_imaging
from .uploads import URL_EXPIRED, UploadError, UploadSlot

log = logging.getLogger("polar_cloud")


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
    settings: int = 0           # which options it was taken with


class SnapshotWorker:
    """The thread body of one snapshot for camera (a camera.Camera), which
    it reports to: the camera's state, then finished()."""

    def __init__(self, camera):
        self.camera = camera
    def run(self, result: SnapshotResult, slot: Optional[UploadSlot],
            expired: bool) -> None:
        failed: Optional[bool] = True
        try:
            self._work(result, slot, expired)
            failed = False
        except CameraError as e:
            result.error = "camera: %s" % (e,)
            if self.camera.stop_event.is_set():
                failed = None
            else:
                self.camera.camera_state(False, str(e), result.settings)
        except SnapshotError as e:
            result.error = str(e)
            result.http_status = e.status
            failed = True if e.counts else None
            if e.counts and not result.manual:
                self.camera.upload_state(False, str(e))
        except Exception:
            if not self.camera.logged_crash:
                self.camera.logged_crash = True
                log.exception("polar_cloud: snapshot failed")
            result.error = "internal error; see klippy.log"
        self.camera.finished(result, failed)
    def _work(self, result: SnapshotResult, slot: Optional[UploadSlot],
              expired: bool) -> None:
        if self.camera.stop_event.is_set():
            raise CameraError("stopped")
        limit = self.camera.opts.max_image_size
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
            self.camera.upload_state(True, "")
    def _snapshot(self, limit: int, result: SnapshotResult) -> bytes:
        """The JPEG to upload: fetched from the camera, checked,
        transformed and shrunk to at most limit bytes, all by imaging.py
        in a child process."""
        spec = fetch_spec(self.camera.opts)
        code, out, err, result.fetched = self._run_imaging(
            imagingchild.request(limit, self.camera.opts, spec))
        if code == imaging.EXIT_BAD_JPEG:
            raise CameraError(err or "broken JPEG from the camera")
        if code in (imaging.EXIT_OK, imaging.EXIT_CANNOT_SHRINK,
                    imaging.EXIT_NO_PILLOW):
            self.camera.camera_state(True, "", result.settings)
        if code in (imaging.EXIT_CANNOT_SHRINK, imaging.EXIT_NO_PILLOW):
            raise SnapshotError(err or "cannot shrink the snapshot to %d"
                                " bytes; skipped" % (limit,))
        if code != imaging.EXIT_OK:
            detail = "killed by signal %d" % (-code,) if code < 0 \
                else "exit code %d" % (code,)
            raise SnapshotError("image processing failed (%s%s)"
                                % (detail, ": " + err if err else ""))
        if len(out) > limit or not out.startswith(imaging.JPEG_SOI) \
                or not out.endswith(imaging.JPEG_EOI):
            raise SnapshotError("image processing failed (no usable JPEG)")
        return out
    def _run_imaging(self, request: bytes) -> tuple[int, bytes, str, int]:
        try:
            return run_imaging(self.camera.children, request)
        except children.ChildStopped:
            raise CameraError("stopped") from None
        except children.ChildTimeout:
            raise SnapshotError("image processing took longer than %d s;"
                                " skipped" % (imagingchild.IMAGING_TIMEOUT,)) from None
        except children.ChildError as e:
            raise SnapshotError("cannot start the image processing (%s)"
                                % (e,)) from None
    def _upload(self, slot: UploadSlot, image: bytes) -> int:
        try:
            return uploadchild.upload(
                self.camera.children, slot, "image.jpg",
                self.camera.allow_loopback_http, self.camera.ca_file,
                data=image)
        except UploadError as e:
            if e.drop_slot:
                self.camera.drop_slot(slot)
            raise SnapshotError(str(e), status=e.status,
                                counts=e.counts) from None
