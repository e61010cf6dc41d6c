# A snapshot's or a timelapse's upload, in a helper child process
#
# uploadchild.py starts it through children.py (the helper host forks it,
# at idle priority) with one JSON header line on stdin: the upload slot,
# the file's name and size, the network policy, and either the path of
# the file (a timelapse) or nothing, the file's bytes following the line
# (a snapshot).  It makes the S3 POST-policy upload (uploads.post_form:
# the checks of the URL and its addresses, the proxy, TLS with ca_file)
# and writes one JSON line to stdout:
#
#     {"ok": true, "status": <HTTP status>}
#     {"ok": false, "error": "<for the console>", "status": <HTTP status>,
#      "counts": <a failure for the backoff>, "drop_slot": <URL spent>}
#
# Why a child: an upload over HTTPS is tens of milliseconds of CPU (a TLS
# context, the CA bundle, the handshake), and in klippy's process that
# was klippy's share of a CPU quota (issue #14).  Here it is paced.
#
# This file may be distributed under the terms of the GNU GPLv3 license.
from __future__ import annotations

import os
import sys

if __name__ == "__main__" and not __package__:
    # Run as a script: pacing.py, found next to it, makes it a child
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import pacing
    PACER = pacing.as_child(globals(), ticks=True)
else:
    PACER = None

import io  # noqa: E402
import json  # noqa: E402
import threading  # noqa: E402
from typing import BinaryIO  # noqa: E402

from .uploads import UploadError, UploadSlot, post_file, post_form  # noqa: E402


def request(slot: UploadSlot, filename: str, size: int,
            allow_loopback: bool, ca_file: str, path: str = "") -> bytes:
    """The header line on the child's stdin; without path, the file's
    size bytes follow it."""
    return json.dumps({
        "slot": slot.__dict__, "filename": filename, "size": size,
        "allow_loopback": allow_loopback, "ca_file": ca_file,
        "path": path}).encode("utf-8") + b"\n"


def _upload(header: dict, stdin: BinaryIO) -> int:
    slot = UploadSlot(**header["slot"])
    args = (header["allow_loopback"], threading.Event(), header["ca_file"],
            PACER)
    if header["path"]:
        return post_file(slot, header["filename"], header["path"], *args)
    data = stdin.read(header["size"])
    return post_form(slot, header["filename"], io.BytesIO(data), len(data),
                     *args)


def answer(stdin: BinaryIO) -> dict:
    """The outcome of the upload asked for on stdin, for the parent."""
    try:
        return {"ok": True, "status": _upload(json.loads(stdin.readline()),
                                              stdin)}
    except UploadError as e:
        return {"ok": False, "error": str(e), "status": e.status,
                "counts": e.counts, "drop_slot": e.drop_slot}
    except (ValueError, TypeError, KeyError) as e:
        return {"ok": False, "error": "upload failed: bad request (%s)"
                % (e.__class__.__name__,)}


def main() -> int:
    # Nothing on stderr but a crash: no log lines, no warnings
    import logging
    import warnings
    logging.getLogger().addHandler(logging.NullHandler())
    warnings.simplefilter("ignore")
    sys.stdout.write(json.dumps(answer(sys.stdin.buffer)) + "\n")
    return 0


if __name__ == "__main__":
    pacing.leave(main())    # no teardown of requests and ssl: unpaced CPU
