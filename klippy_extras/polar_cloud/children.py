# Child processes at idle CPU priority: the snapshot image work
# (imaging.py), the job download (fetcher.py) and the key work
# (keyhelper.py), forked by the helper host (helperhost.py), and the
# timelapse render (ffmpeg), started directly
#
# A child runs under `chrt --idle 0` from its first instruction (or, where
# SCHED_IDLE is refused, at nice 19 set on it at once), so it only gets
# the CPU klippy does not want.  The waiting thread looks at the stop
# event twice a second: a child is killed on its time limit and when the
# session stops.  Nothing here runs on klippy's reactor.
#
# This file may be distributed under the terms of the GNU GPLv3 license.
from __future__ import annotations

import array
import json
import logging
import os
import selectors
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import Optional

from . import pacing

log = logging.getLogger("polar_cloud")

POLL = .5               # how often a wait looks at the stop event
HERE = os.path.dirname(os.path.abspath(__file__))
HOST_SCRIPT = os.path.join(HERE, "helperhost.py")
HELPERS = [os.path.join(HERE, name)
           for name in ("fetcher.py", "imaging.py", "keyhelper.py",
                        "uploader.py")]
HOST_START_TIMEOUT = 30.    # a Python start on a busy Pi
REAP_TIMEOUT = 5.           # a killed child reaped by the host
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


def _exit_code(said: bytes) -> Optional[int]:
    """The exit code in what the host said on a task socket, once there."""
    for line in said.split(b"\n")[:-1]:
        word, _, value = line.decode("ascii", "replace").partition(" ")
        if word == "exit":
            return int(value)
        if word == "error":
            raise ChildError(value)
    return None


def _end_task(task: socket.socket) -> None:
    """A child still running is killed (by the host, on the task socket's
    end), and gone once this returns: the host says so once it reaped it,
    and closes the socket (at once, unless the host itself is stuck)."""
    try:
        task.shutdown(socket.SHUT_WR)
        task.settimeout(REAP_TIMEOUT)
        while task.recv(4096):
            pass
    except OSError:
        pass
    task.close()


def read_answer(out: bytes) -> dict:
    """A helper's answer: its last line, a JSON object; {} for anything else."""
    lines = out.strip().splitlines()
    try:
        result = json.loads(lines[-1]) if lines else {}
    except ValueError:
        return {}
    return result if isinstance(result, dict) else {}


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


class HelperHost:
    """klippy's end of the helper host (helperhost.py): one per klippy
    process, kept across RESTART (it touches no files), started when the
    session starts or the first helper is wanted, again if it ended.  It
    ends by itself when klippy's process does (its socket closes)."""

    def __init__(self, scripts: list[str]):
        self.scripts = scripts
        self.lock = threading.Lock()
        self.proc: Optional[subprocess.Popen] = None
        self.control: Optional[socket.socket] = None
        self.env: dict[str, str] = {}
    def start(self) -> None:
        """Start it now, from a thread that may wait (its warm-up)."""
        with self.lock:
            self._ensure()
    def stop(self) -> None:
        """End it, and with it its children (their parent-death signal)."""
        with self.lock:
            self._forget()
    def launch(self, script: str, args: list[str], stdin: int,
               cwd: Optional[str]) -> tuple[socket.socket, int, int]:
        """Fork script in the host: (the task's socket, the child's stdout,
        its stderr).  Raises ChildError."""
        for attempt in (1, 2):
            with self.lock:
                self._ensure()      # raises before anything is opened
                control = self.control
                header = json.dumps({
                    "script": os.path.abspath(script), "args": args,
                    "cwd": cwd, "env": self._env_changes()}).encode()
            out_r, out_w = os.pipe()
            err_r, err_w = os.pipe()
            task, theirs = socket.socketpair()
            fds = array.array("i", [stdin, out_w, err_w, theirs.fileno()])
            try:
                control.sendmsg([header], [(socket.SOL_SOCKET,
                                            socket.SCM_RIGHTS, fds)])
                return task, out_r, err_r
            except OSError as e:
                for fd in (out_r, err_r):
                    os.close(fd)
                task.close()
                with self.lock:
                    if self.control is control:
                        self._forget()
                if attempt == 2:
                    raise ChildError("the helper host: %s"
                                     % (e.strerror or e,)) from None
            finally:
                for fd in (out_w, err_w):
                    os.close(fd)
                theirs.close()
        raise AssertionError("not reached")
    def _env_changes(self) -> dict[str, Optional[str]]:
        """What changed in klippy's environment since the host started: a
        helper sees the environment of the moment, as if started then."""
        now = dict(os.environ)
        changes: dict[str, Optional[str]] = {
            k: v for k, v in now.items() if self.env.get(k) != v}
        changes.update((k, None) for k in self.env if k not in now)
        return changes
    def _ensure(self) -> None:
        global _use_chrt
        if self.proc is not None and self.proc.poll() is None:
            return
        self._forget()
        idle = _idle_prefix() if _use_chrt else []
        proc, control, err = self._spawn(idle)
        if proc is None and idle and err.startswith("chrt:"):
            log.info("polar_cloud: %s; helpers run at nice 19", err)
            _use_chrt = False
            proc, control, err = self._spawn([])
        if proc is None:
            raise ChildError("the helper host did not start (%s)"
                             % (err or "no answer",))
        self.proc, self.control = proc, control
    def _spawn(self, idle: list[str]):
        ours, theirs = socket.socketpair(socket.AF_UNIX,
                                         socket.SOCK_SEQPACKET)
        args = [sys.executable, "-I", HOST_SCRIPT,
                str(theirs.fileno())] + self.scripts
        self.env = dict(os.environ)
        try:
            proc = subprocess.Popen(idle + args, pass_fds=(theirs.fileno(),),
                                    stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE)
        except OSError as e:
            ours.close()
            return None, None, e.strerror or str(e)
        finally:
            theirs.close()
        if not idle:
            pacing.lower_priority(proc.pid)
        ours.settimeout(HOST_START_TIMEOUT)
        try:
            ready = ours.recv(64)
        except OSError:
            ready = b""
        if ready == b"ready\n":
            ours.settimeout(None)
            proc.stderr.close()     # a crash later has nobody to tell
            return proc, ours, ""
        ours.close()
        proc.kill()
        try:
            _out, err = proc.communicate(timeout=5.)
        except subprocess.TimeoutExpired:
            err = b""
        return None, None, _last_line(err.decode("utf-8", "replace"))
    def _forget(self) -> None:
        if self.control is not None:
            self.control.close()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        self.proc = self.control = None


HOST = HelperHost(HELPERS)


def start_host() -> None:
    """The session's start: the host's own start then, not at the first
    snapshot of a print.  Its failure shows at the first helper."""
    try:
        HOST.start()
    except ChildError as e:
        log.info("polar_cloud: %s", e)


class Children:
    """The children of one owner, so that stopping can kill them at once."""

    def __init__(self, stop: threading.Event,
                 host: Optional[HelperHost] = None):
        self.stop_event = stop
        self.host = host or HOST
        self.lock = threading.Lock()
        self.procs: set[subprocess.Popen] = set()
        self.tasks: set[socket.socket] = set()
    def kill_all(self) -> None:
        """From any thread (klippy's reactor too): never waits."""
        with self.lock:
            procs, tasks = list(self.procs), list(self.tasks)
        for proc in procs:
            try:
                proc.kill()
            except OSError:
                pass
        for task in tasks:      # the host kills the child
            try:
                task.shutdown(socket.SHUT_WR)
            except OSError:
                pass
    def run_helper(self, script: str, args: list[str], timeout: float,
                   stdin=subprocess.DEVNULL) -> tuple[int, bytes, str]:
        """(exit code, stdout, stderr) of one of the helper scripts,
        forked by the helper host.  Raises like run()."""
        if self.stop_event.is_set():
            raise ChildStopped()
        if not sys.executable:
            raise ChildError("no Python interpreter to run it")
        with open(os.devnull, "rb") as devnull:
            task, out_r, err_r = self.host.launch(
                script, args, (devnull if stdin is subprocess.DEVNULL
                               else stdin).fileno(), None)
        with self.lock:
            self.tasks.add(task)
        try:
            code, out, err = self._collect(task, out_r, err_r, timeout)
        finally:
            with self.lock:
                self.tasks.discard(task)
            _end_task(task)
            for fd in (out_r, err_r):
                os.close(fd)
        return code, out, err.decode("utf-8", "replace")
    def _collect(self, task: socket.socket, out_r: int, err_r: int,
                 timeout: float) -> tuple[int, bytes, bytes]:
        """Read the child's output to its end and its exit code from the
        host, until the time limit or the stop."""
        deadline = time.monotonic() + timeout
        output: dict[int, list[bytes]] = {out_r: [], err_r: []}
        said = b""
        code: Optional[int] = None
        with selectors.DefaultSelector() as selector:
            for fd in (out_r, err_r, task):
                selector.register(fd, selectors.EVENT_READ)
            while code is None or set(output) & set(selector.get_map()):
                if self.stop_event.is_set():
                    raise ChildStopped()
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ChildTimeout()
                for key, _events in selector.select(min(POLL, left)):
                    if key.fileobj is task:
                        data = task.recv(4096)
                        if not data:
                            selector.unregister(task)
                            if code is None and not self.stop_event.is_set():
                                raise ChildError("the helper host ended")
                        said += data
                        code = _exit_code(said) if code is None else code
                        continue
                    chunk = os.read(key.fd, 65536)
                    if chunk:
                        output[key.fd].append(chunk)
                    else:
                        selector.unregister(key.fd)
        if self.stop_event.is_set():
            raise ChildStopped()        # killed by kill_all, most likely
        return code, b"".join(output[out_r]), b"".join(output[err_r])
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
