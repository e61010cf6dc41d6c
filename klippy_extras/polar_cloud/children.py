# Child processes at idle CPU priority: the snapshot image work
# (imaging.py), the timelapse render (ffmpeg) and the job download
# (fetcher.py)
#
# A child runs under `chrt --idle 0` from its first instruction (or, where
# SCHED_IDLE is refused, at nice 19 set on it at once), so it only gets
# the CPU klippy does not want.  The waiting thread looks at the stop
# event twice a second: a child is killed on its time limit and when the
# session stops.  Nothing here runs on klippy's reactor.
#
# This file may be distributed under the terms of the GNU GPLv3 license.
from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
import threading
import time
from typing import Optional

from . import pacing

log = logging.getLogger("polar_cloud")

POLL = .5               # how often a wait looks at the stop event
_use_chrt = True


class ChildError(Exception):
    """The child could not be started."""


class ChildTimeout(Exception):
    """The child ran past its time limit and was killed."""


class ChildStopped(Exception):
    """The session stopped; the child was killed."""


def _idle_prefix() -> list[str]:
    """Run the child at idle priority from its first instruction.  Started
    at normal priority and lowered a moment later, Python's start-up
    competed with klippy for the CPU: +3 ms reactor p99 per start on two
    cores, against +0.3 ms under chrt."""
    chrt = shutil.which("chrt")
    return [chrt, "--idle", "0"] if chrt else []


def _last_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[-1][:200] if lines else ""


def input_file(data: bytes):
    """A child's stdin as a file in memory: one write, where a pipe would
    take many from the waiting thread, or block once it is full.  The
    caller closes it (with ... as)."""
    try:
        f = open(os.memfd_create("polar_cloud-child"), "w+b")  # noqa: SIM115
    except (AttributeError, OSError):
        f = tempfile.TemporaryFile()  # noqa: SIM115
    try:
        f.write(data)
        f.seek(0)
    except OSError as e:
        f.close()
        raise ChildError("cannot hand the request to the child (%s)"
                         % (e.strerror or e,)) from None
    return f


class Children:
    """The children of one owner, so that stopping can kill them at once."""

    def __init__(self, stop: threading.Event):
        self.stop_event = stop
        self.lock = threading.Lock()
        self.procs: set[subprocess.Popen] = set()
    def kill_all(self) -> None:
        """From any thread (klippy's reactor too): never waits."""
        with self.lock:
            procs = list(self.procs)
        for proc in procs:
            try:
                proc.kill()
            except OSError:
                pass
    def run(self, args: list[str], timeout: float, what: str,
            stdin=subprocess.DEVNULL, cwd: Optional[str] = None,
            ) -> tuple[int, bytes, str]:
        """(exit code, stdout, stderr) of args run at idle priority.

        stdin is a file (seekable: a refused chrt means a second start)
        or DEVNULL.  Raises ChildError, ChildTimeout or ChildStopped."""
        global _use_chrt
        idle = _idle_prefix() if _use_chrt else []
        code, out, err = self._spawn(idle + args, bool(idle), timeout, stdin,
                                     cwd)
        if idle and code == 1 and _last_line(err).startswith("chrt:"):
            # SCHED_IDLE refused here (a container?): the child still
            # runs, at nice 19 set on it at once
            log.info("polar_cloud: %s; %s runs at nice 19", _last_line(err),
                     what)
            _use_chrt = False
            if stdin is not subprocess.DEVNULL:
                stdin.seek(0)
            code, out, err = self._spawn(args, False, timeout, stdin, cwd)
        if idle and code in (126, 127) \
                and _last_line(err).startswith("chrt: failed to execute"):
            raise ChildError(_last_line(err).rpartition(": ")[2])
        return code, out, err
    def _spawn(self, args: list[str], idle: bool, timeout: float, stdin,
               cwd: Optional[str]) -> tuple[int, bytes, str]:
        if self.stop_event.is_set():
            raise ChildStopped()
        try:
            proc = subprocess.Popen(args, stdin=stdin, cwd=cwd,
                                    stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE)
        except OSError as e:
            raise ChildError(e.strerror or str(e)) from None
        with self.lock:
            self.procs.add(proc)
        with proc:
            try:
                if not idle:
                    pacing.lower_priority(proc.pid)
                out, err = self._wait(proc, timeout)
            finally:
                if proc.poll() is None:     # a timeout, a stop or a bug
                    proc.kill()
                with self.lock:
                    self.procs.discard(proc)
        return proc.returncode, out, err.decode("utf-8", "replace")
    def _wait(self, proc: subprocess.Popen,
              timeout: float) -> tuple[bytes, bytes]:
        deadline = time.monotonic() + timeout
        while True:
            if self.stop_event.is_set():
                raise ChildStopped()
            left = deadline - time.monotonic()
            if left <= 0:
                raise ChildTimeout()
            try:
                out, err = proc.communicate(timeout=min(POLL, left))
            except subprocess.TimeoutExpired:
                continue
            if self.stop_event.is_set():
                raise ChildStopped()        # killed by kill_all, most likely
            return out, err
