"""Process plumbing shared by the test bed's helpers (klippy, simmcu,
Moonraker, nginx, chromium).

    with open(log_path, "ab") as log:
        proc = launch(cmd, stdout=log, stderr=subprocess.STDOUT)
    ...
    stop_process(proc)              # SIGTERM, 10 s grace, then SIGKILL

Every process is started through a small launcher so that it cannot outlive
a test run that is killed, and is stopped the same way: a polite signal,
a grace period, then SIGKILL.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

# Started in front of every test bed process: asks Linux to SIGTERM the
# process when the test process goes away (PR_SET_PDEATHSIG survives exec),
# then execs the real command, so the pid stays the same.
_LAUNCHER = (
    "import ctypes, os, sys\n"
    "try:\n"
    "    ctypes.CDLL(None, use_errno=True).prctl(1, 15)\n"
    "except (OSError, AttributeError):\n"
    "    pass\n"
    "if os.getppid() != int(sys.argv[1]):\n"
    "    sys.exit(1)\n"
    "os.execv(sys.argv[2], sys.argv[2:])\n"
)


def launch(cmd: list[str], **kwargs: Any) -> subprocess.Popen:
    """Popen(cmd, **kwargs), but the process dies with the test process.

    A test run that is killed (timeout, ^C) would otherwise leave klippy,
    Moonraker or a browser running and holding ports and sockets."""
    wrapped = [sys.executable, "-c", _LAUNCHER, str(os.getpid()), *cmd]
    return subprocess.Popen(wrapped, **kwargs)


def stop_process(proc: subprocess.Popen | None, sig: int = signal.SIGTERM,
                 grace: float = 10.0) -> bool:
    """Send `sig`, wait up to `grace` seconds, then SIGKILL.

    Returns False (and does nothing) when there was no process or it had
    already exited, so a caller can skip clean-up meant for a live one."""
    if proc is None or proc.poll() is not None:
        return False
    proc.send_signal(sig)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)
    return True


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_log(path: Path) -> str:
    """A log file's text; "" before the process has written it."""
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def log_tail(path: Path, lines: int = 40) -> str:
    """The last `lines` lines of a log, for error messages."""
    return "\n".join(read_log(path).splitlines()[-lines:])
