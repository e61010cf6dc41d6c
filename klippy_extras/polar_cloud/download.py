# Job downloads: klippy's side of the download child (fetcher.py)
#
# A download thread inside klippy's process competed with the reactor
# for the GIL and, where klippy runs under a CPU quota (a Pi, a K1, a
# container), for klippy's share of the CPU (issue #14).  So the download
# runs in a helper child process at idle priority (children.py), which
# makes every check of the policy and streams into a hidden temporary
# file of its own; klippy's process never reads the file's bytes.  This
# side hands it the request on stdin, waits for its one-line answer on a
# thread of its own (never the reactor), and renames the file to its
# final name only when the download is still wanted.  cancel(), a stop
# (JobManager.stop) and the total timeout kill the child at once: an old
# child never writes on after a RESTART, and the temporary file goes.
#
# This file may be distributed under the terms of the GNU GPLv3 license.
from __future__ import annotations

import logging
import os
import secrets
import sys
import threading
from typing import Callable

from . import children, netpolicy
from .fetcher import DownloadError, Request

log = logging.getLogger("polar_cloud")

TOTAL_TIMEOUT = 3600.
# The child's fork and exit are each one to two milliseconds of CPU;
# under a CPU quota shared with klippy, the job's acceptance right before
# the fork (its state saved, the console, the status) and the print's
# start right after the exit (klippy opening the file) throttled the group
# twice in a row.  A tenth of a second apart they do not, and a job does
# not mind starting that much later.
SETTLE = .1
FETCHER = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                       "fetcher.py")


def part_name(filename: str) -> str:
    """A hidden temporary name of one download's own."""
    return ".%s.%s.part" % (filename, secrets.token_hex(4))


class Download:
    """A G-code URL streamed into dest_dir/filename by a helper child.

    on_done(error, size) is called on the download's thread, once."""

    def __init__(self, url: str, dest_dir: str, filename: str, max_bytes: int,
                 allow_loopback: bool, stop: threading.Event,
                 on_done: Callable[[str, int], None], ca_file: str = ""):
        self.dest_dir = dest_dir
        self.filename = filename
        self.stop = stop
        self.on_done = on_done
        self.request = Request(url, dest_dir, part_name(filename), max_bytes,
                               allow_loopback, ca_file)
        self.tmp_path = os.path.join(dest_dir, self.request.part)
        self.cancelled = threading.Event()
        self.children = children.Children(self.cancelled)
        self.thread = threading.Thread(target=self._run, daemon=True,
                                       name="polar_cloud-download")
    def start(self) -> None:
        self.thread.start()
    def cancel(self) -> None:
        """Any thread; never blocks: the child is killed."""
        self.cancelled.set()
        self.children.kill_all()
    def join(self, timeout: float) -> None:
        self.thread.join(timeout)
    def _aborted(self) -> bool:
        return self.cancelled.is_set() or self.stop.is_set()
    def _run(self) -> None:
        error = ""
        size = 0
        try:
            self.cancelled.wait(SETTLE)
            size = self._download()
            self.cancelled.wait(SETTLE)
        except DownloadError as e:
            error = str(e)
        except Exception as e:
            log.exception("polar_cloud: download failed")
            error = "download failed: %s" % (e.__class__.__name__,)
        finally:
            try:
                os.unlink(self.tmp_path)
            except OSError:
                pass
        self.on_done(error, size)
    def _download(self) -> int:
        result = self._run_child()
        if self._aborted():
            raise DownloadError("download aborted")
        if not result.get("ok"):
            if result.get("detail"):
                log.warning("polar_cloud: download failed: %s",
                            result["detail"])
            raise DownloadError(str(result.get("error"))[:300])
        size = result.get("size")
        if not isinstance(size, int):
            raise DownloadError("download failed: no answer")
        os.replace(self.tmp_path, os.path.join(self.dest_dir, self.filename))
        return size
    def _run_child(self) -> dict:
        if not sys.executable:
            raise DownloadError("download failed: no Python interpreter")
        try:
            with children.input_file(self.request.encode()) as stdin:
                code, out, err = self.children.run_helper(
                    FETCHER, [], TOTAL_TIMEOUT, stdin=stdin)
        except children.ChildStopped:
            raise DownloadError("download aborted") from None
        except children.ChildTimeout:
            raise DownloadError("download took too long") from None
        except children.ChildError as e:
            raise DownloadError("download failed: cannot start it (%s)"
                                % (e,)) from None
        result = children.read_answer(out)
        if not result and not self._aborted():
            lines = err.strip().splitlines() or [""]
            log.warning("polar_cloud: the download process ended (exit"
                        " code %s): %s", code,
                        netpolicy.URL_QUERY_RE.sub("?...", lines[-1][:200]))
            raise DownloadError("download failed: the download process"
                                " ended")
        return result
