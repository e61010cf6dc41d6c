# How a helper child process (fetcher.py, uploader.py, keyhelper.py,
# imaging.py) spends CPU: at idle priority (lower_priority), and paced
#
# A child at idle priority (SCHED_IDLE) never delays klippy while the
# CPU has time to spare.  Where klippy and the processes it starts share a
# CPU quota (a cgroup: systemd's CPUQuota= on klipper.service, or a
# container), that is not enough: every millisecond the child burns while
# klippy sleeps is one klippy may not have when its next timer is due,
# and the whole group waits for the next period.  Measured with a 30 %
# quota in 5 ms periods: a plain Python start-up (100 ms of imports) at
# idle priority made klippy's reactor 8 ms late at the 99th percentile;
# the same CPU time spread out at 10 % in slices of 0.5 ms, not at all.
#
# So a helper child (fetcher.py, uploader.py, keyhelper.py, imaging.py)
# keeps its CPU time (user and system) to a share of one core, in short
# slices: a quarter of its group's quota when there is one (half a core
# when there is none), measured after each piece of work and before each
# module it imports.  Under a quota the share also gives way to klippy:
# when the group was throttled (its quota used up, klippy's reactor
# waiting for the next period), the share halves, and it grows back while
# the group is not (_adapt, from cpu.stat).  Measured with the bench's
# 30 % quota, a 50 MB job at 12.5 MB/s over HTTPS: without it 1 % of
# klippy's timers were over 3 ms late; with it none, and the job still
# printed within 9 s (halving down to an eighth: 15 s).
# A single long call into C (an RSA signature) is not cut, only
# followed by a pause as long as it asks for; Pillow's decoders and
# encoders are fed in small blocks, paced after each (pace_pillow), its
# resizes and transposes run in strips (resize, transpose), and the
# imaging child also calls the pacer on a 0.5 ms wall-clock tick (tick).
# The one thing a child cannot pace, the interpreter's own start, is paid
# once per klippy by the helper host that forks them (helperhost.py).
# It imports nothing from its package: a child loads it before anything
# else.
#
# This file may be distributed under the terms of the GNU GPLv3 license.
from __future__ import annotations

import atexit
import os
import signal
import sys
import time
import types
from typing import Optional

QUOTA_SHARE = .25       # of the cgroup's quota, when it has one
MAX_SHARE = .5          # of one core, without a quota
MAX_BURST = .002        # the most CPU time spent at once, seconds
TICK = .0005            # tick(): a call of the pacer every 0.5 ms
# Under a quota, how the share follows the group's throttling
LOOK_EVERY = .02        # seconds between looks at cpu.stat
MIN_SHARE = .5          # of the share, after throttling
GROWTH = .02            # of the share, added each look without throttling
CGROUP_ROOTS = ("/sys/fs/cgroup/cpu,cpuacct", "/sys/fs/cgroup/cpu",
                "/sys/fs/cgroup")


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def _quota(directory: str) -> Optional[tuple[float, float]]:
    """(quota, period) in seconds of one cgroup directory; None without."""
    text = _read(os.path.join(directory, "cpu.max"))            # v2
    if text:
        quota, _, period = text.partition(" ")
        if quota != "max" and quota.isdigit() and period.isdigit():
            return int(quota) / 1e6, int(period) / 1e6
        return None
    quota = _read(os.path.join(directory, "cpu.cfs_quota_us"))  # v1
    period = _read(os.path.join(directory, "cpu.cfs_period_us"))
    if quota.isdigit() and period.isdigit():
        return int(quota) / 1e6, int(period) / 1e6
    return None


def cgroup_quota() -> Optional[tuple[float, float]]:
    """The tightest CPU quota over this process's cgroup and its parents,
    as (cores, period in seconds); None when there is none."""
    found = cgroup_limit()
    return None if found is None else found[:2]


def cgroup_limit() -> Optional[tuple[float, float, str]]:
    """cgroup_quota, and the directory of the cgroup that sets it."""
    best: Optional[tuple[float, float, str]] = None
    for line in _read("/proc/self/cgroup").splitlines():
        hierarchy, controllers, path = line.split(":", 2)
        if hierarchy != "0" and "cpu" not in controllers.split(","):
            continue
        for root in CGROUP_ROOTS:
            if not os.path.isdir(root):
                continue
            directory = os.path.join(root, path.lstrip("/"))
            while directory.startswith(root) and os.path.isdir(directory):
                found = _quota(directory)
                if found is not None and found[1] > 0 and (
                        best is None or found[0] / found[1] < best[0]):
                    best = (found[0] / found[1], found[1], directory)
                if directory == root:
                    break
                directory = os.path.dirname(directory)
            break
    return best


def times_throttled(directory: str) -> int:
    """How many periods the cgroup was throttled in so far (its quota
    used up: every task of it, klippy's reactor too, waited for the next
    period); -1 if unknown."""
    for line in _read(os.path.join(directory, "cpu.stat")).splitlines():
        name, _, value = line.partition(" ")
        if name == "nr_throttled" and value.isdigit():
            return int(value)
    return -1


def lower_priority(pid: int = 0) -> None:
    """Idle CPU priority: run only when nothing else wants the CPU."""
    try:
        os.sched_setscheduler(pid, os.SCHED_IDLE, os.sched_param(0))
    except (OSError, AttributeError):
        pass
    try:
        # Also, or instead where SCHED_IDLE is missing: the lowest nice
        os.setpriority(os.PRIO_PROCESS, pid, 19)
    except (OSError, AttributeError):
        pass


class CpuPacer:
    """Keep this process's CPU time below `share` of one core: a bucket of
    at most `burst` seconds, refilled at `share`; when it runs dry, sleep
    until it is even again.  Call it after each piece of work."""

    def __init__(self, share: float, burst: float):
        self.share = share
        self.burst = burst
        self.tokens = burst
        self.wall = time.monotonic()
        self.cpu = time.process_time()
        self.slept = 0.
        self.calls = 0
        self.tick = 0.          # the interval of tick(), while it runs
        self._busy = False
        self.full_share = share
        self.group = ""         # the cgroup whose quota it shares
        self.throttled = -1
        self.next_look = 0.
    @classmethod
    def for_this_process(cls) -> CpuPacer:
        limit = cgroup_limit()
        if limit is None:
            return cls(MAX_SHARE, MAX_BURST)
        cores, period, group = limit
        share = min(MAX_SHARE, cores * QUOTA_SHARE)
        pacer = cls(share, min(MAX_BURST, share * period))
        pacer.group = group
        pacer.throttled = times_throttled(group)
        return pacer
    def renewed(self) -> CpuPacer:
        """A pacer with these limits whose clocks start now: a forked
        child's (its CPU time counts from the fork)."""
        pacer = CpuPacer(self.full_share, self.burst)
        pacer.group, pacer.throttled = self.group, self.throttled
        return pacer
    def _adapt(self, wall: float) -> None:
        """Under a quota: each time the group was throttled, halve the
        share (down to MIN_SHARE of it); while it was not, grow it back
        slowly.  The helper gives way while klippy needs the quota."""
        if not self.group or wall < self.next_look:
            return
        self.next_look = wall + LOOK_EVERY
        throttled = times_throttled(self.group)
        if throttled > self.throttled >= 0:
            self.share = max(self.full_share * MIN_SHARE, self.share / 2.)
        else:
            self.share = min(self.full_share,
                             self.share + self.full_share * GROWTH)
        self.throttled = throttled
    def __call__(self) -> None:
        if self._busy:          # tick()'s signal in the middle of a call
            return
        self._busy = True
        self.calls += 1
        wall, cpu = time.monotonic(), time.process_time()
        self._adapt(wall)
        self.tokens = min(self.burst, self.tokens + (wall - self.wall)
                          * self.share) - (cpu - self.cpu)
        self.wall, self.cpu = wall, cpu
        if self.tokens < 0.:
            pause = -self.tokens / self.share
            self.slept += pause
            if self.tick:       # no ticks while asleep
                signal.setitimer(signal.ITIMER_REAL, 0.)
            time.sleep(pause)
            if self.tick:
                signal.setitimer(signal.ITIMER_REAL, self.tick, self.tick)
        self._busy = False


class PacedImports:
    """A meta path entry that finds nothing: it paces before every import
    (a module's import is a few milliseconds of CPU at most; a package's
    imports are a hundred together)."""

    def __init__(self, pacer: CpuPacer):
        self.pacer = pacer
    def find_spec(self, _name, _path=None, _target=None):
        self.pacer()
        return None


def pace_imports(pacer: CpuPacer) -> PacedImports:
    finder = PacedImports(pacer)
    sys.meta_path.insert(0, finder)
    return finder


def tick(pacer: CpuPacer, interval: float = TICK) -> None:
    """Also call the pacer every interval of wall time (SIGALRM; Python
    runs the handler between bytecodes, so a module's body or a long
    stretch of Python is cut too; not a single call into C).  ITIMER_PROF
    would count CPU time, but only at the kernel's tick, every 4 ms.
    Interrupted system calls are retried (PEP 475).  Stopped at exit: a
    SIGALRM after Python has put back the default handler would kill it."""
    signal.signal(signal.SIGALRM, lambda _signum, _frame: pacer())
    atexit.register(stop_ticks, pacer)
    pacer.tick = interval
    signal.setitimer(signal.ITIMER_REAL, interval, interval)


def stop_ticks(pacer: CpuPacer) -> None:
    pacer.tick = 0.
    signal.setitimer(signal.ITIMER_REAL, 0.)


def leave(code: int) -> None:
    """Exit without the interpreter's teardown (freeing every module is
    about 10 ms of CPU once Pillow and requests are loaded, and nothing
    paces it), stdout and stderr flushed first."""
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)


def start(ticks: bool = False) -> CpuPacer:
    """Pace this process from now on: its imports, every call of the
    pacer returned, and with ticks every TICK of wall time."""
    pacer = CpuPacer.for_this_process()
    pace_imports(pacer)
    if ticks:
        tick(pacer)
    return pacer


CHILD_PACKAGE = "polar_cloud_child"


def as_child(script: dict, ticks: bool = False) -> CpuPacer:
    """For a helper script run by its path (fetcher.py, uploader.py), with
    its globals: the folder's modules load under a package name of their
    own, without its __init__ (klippy's side), and the folder goes off
    sys.path (its modules must not shadow the standard library's).  The
    child is paced from here on, and dies with the klippy thread that
    waits for it, even a klippy that crashed."""
    here = os.path.dirname(os.path.abspath(script["__file__"]))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]
    package = types.ModuleType(CHILD_PACKAGE)
    package.__path__ = [here]
    sys.modules[CHILD_PACKAGE] = package
    sys.modules[CHILD_PACKAGE + ".pacing"] = sys.modules[__name__]
    script["__package__"] = CHILD_PACKAGE
    pacer = start(ticks)
    parent = os.getppid()
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, 9)   # PDEATHSIG, SIGKILL
    except (OSError, AttributeError, ImportError):
        pass
    if os.getppid() != parent:
        sys.exit(1)
    return pacer


# Pillow (the imaging child): its decoders and encoders work in a Python
# loop over calls into C, one per block of compressed bytes; in blocks of
# 4 kB each call is a fraction of a millisecond (a 1080p frame's decode is
# tens of milliseconds in one 64 kB block's calls otherwise)
PILLOW_BLOCK = 4096


class PacedCodec:
    """A Pillow decoder or encoder that calls the pacer after each block."""

    def __init__(self, codec, pacer):
        self._codec = codec
        self._pacer = pacer
    def __getattr__(self, name):
        return getattr(self._codec, name)
    def decode(self, data):
        try:
            return self._codec.decode(data)
        finally:
            self._pacer()
    def encode(self, bufsize):
        try:
            return self._codec.encode(bufsize)
        finally:
            self._pacer()


def pace_pillow(Image, ImageFile, pacer, block: int = PILLOW_BLOCK) -> None:
    """Every image Pillow opens or saves from now on, decoded and encoded
    block by block with the pacer between blocks (saved to a file object
    without a file descriptor: the blocks go through Python)."""
    if getattr(Image._getdecoder, "paced", False):
        return
    getdecoder, getencoder = Image._getdecoder, Image._getencoder

    def paced_decoder(*args, **kwargs):
        return PacedCodec(getdecoder(*args, **kwargs), pacer)

    def paced_encoder(*args, **kwargs):
        return PacedCodec(getencoder(*args, **kwargs), pacer)
    paced_decoder.paced = paced_encoder.paced = True
    Image._getdecoder, Image._getencoder = paced_decoder, paced_encoder
    ImageFile.MAXBLOCK = block      # also each new image's decodermaxblock


RESIZE_ROWS = 16        # output rows per call into C


def resize(img, size: tuple[int, int], resample, Image,
           pacer: Optional[CpuPacer] = None):
    """img.resize in strips of rows, paced between them: at once, a 1080p
    frame's resize is milliseconds of CPU in one call."""
    out = Image.new(img.mode, size)
    scale = img.height / size[1]
    for top in range(0, size[1], RESIZE_ROWS):
        rows = min(RESIZE_ROWS, size[1] - top)
        out.paste(img.resize((size[0], rows), resample, box=(
            0, top * scale, img.width, (top + rows) * scale)), (0, top))
        if pacer is not None:
            pacer()
    return out


TRANSPOSE_ROWS = 32     # source rows per call into C


def transpose(img, method, Image, pacer: Optional[CpuPacer] = None):
    """img.transpose(method) in strips of rows, paced between them (the
    same pixels: each strip lands where the whole picture's rows would)."""
    ops = getattr(Image, "Transpose", Image)
    width, height = img.size
    turned = method in (ops.ROTATE_90, ops.ROTATE_270)
    out = Image.new(img.mode, (height, width) if turned else img.size)
    for top in range(0, height, TRANSPOSE_ROWS):
        bottom = min(height, top + TRANSPOSE_ROWS)
        strip = img.crop((0, top, width, bottom)).transpose(method)
        out.paste(strip, {ops.FLIP_LEFT_RIGHT: (0, top),
                          ops.ROTATE_90: (top, 0),
                          ops.ROTATE_270: (height - bottom, 0)}.get(
                              method, (0, height - bottom)))
        if pacer is not None:
            pacer()
    return out
