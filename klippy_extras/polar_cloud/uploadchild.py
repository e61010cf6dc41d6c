# uploader.py run as a child process, from klippy's side: the snapshot
# worker (snapshot_worker.py) and the timelapse's post worker
# (timelapse.py) wait here, on their own threads, for an upload that a
# helper child makes (children.py runs it at idle priority)
#
# This file may be distributed under the terms of the GNU GPLv3 license.
from __future__ import annotations

import logging
import os
import time
from typing import Optional

from . import children, netpolicy, uploader
from .uploads import UPLOAD_MARGIN, URL_EXPIRED, UploadError, UploadSlot

log = logging.getLogger("polar_cloud")

UPLOADER = os.path.abspath(uploader.__file__)
# A timelapse of tens of MB on a slow uplink; each read and write has its
# own timeout besides (uploads.UPLOAD_TIMEOUT)
TOTAL_TIMEOUT = 1800.


def upload(kids: children.Children, slot: UploadSlot, filename: str,
           allow_loopback: bool, ca_file: str, data: Optional[bytes] = None,
           path: str = "") -> int:
    """The HTTP status of the upload of data, or of the file at path, to
    the slot's URL; else UploadError, as uploads.post_form."""
    if time.monotonic() >= slot.expires_at - UPLOAD_MARGIN:
        raise UploadError(URL_EXPIRED, counts=False, drop_slot=True)
    header = uploader.request(slot, filename, len(data or b""),
                              allow_loopback, ca_file, path)
    try:
        with children.input_file(header + (data or b"")) as stdin:
            code, out, err = kids.run_helper(UPLOADER, [], TOTAL_TIMEOUT,
                                             stdin=stdin)
    except children.ChildStopped:
        raise UploadError("stopped", counts=False) from None
    except children.ChildTimeout:
        raise UploadError("upload took longer than %d s"
                          % (TOTAL_TIMEOUT,)) from None
    except children.ChildError as e:
        raise UploadError("upload failed: cannot start it (%s)"
                          % (e,)) from None
    result = children.read_answer(out)
    if result.get("ok") and isinstance(result.get("status"), int):
        return result["status"]
    if not result:
        lines = err.strip().splitlines() or [""]
        log.warning("polar_cloud: the upload process ended (exit code %s):"
                    " %s", code,
                    netpolicy.URL_QUERY_RE.sub("?...", lines[-1][:200]))
        raise UploadError("upload failed: the upload process ended")
    status = result.get("status")
    raise UploadError(str(result.get("error"))[:300],
                      status=status if isinstance(status, int) else 0,
                      counts=result.get("counts") is not False,
                      drop_slot=result.get("drop_slot") is True)
