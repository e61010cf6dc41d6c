"""Plumbing for the bench: klippy processes with and without [polar_cloud],
the reactor probe, /proc readings, workloads and small statistics.

Everything here runs the real thing: klippy from the project venv on the
simulated MCU (tests/testbed), the local Polar Cloud simulator and the
loopback webcam, all on this machine.
"""

from __future__ import annotations

import array
import base64
import math
import os
import re
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.cgroup import CpuBudget
from tests.testbed.camera_server import CameraServer
from tests.testbed.klippy import REPO, Klippy, link_extra
from tests.testbed.polarsim import PolarSim
from tests.testbed.tlsproxy import TlsProxy, make_certs

EXTRA = REPO / "klippy_extras" / "polar_cloud"
# POLAR_BENCH_EXTRA=<dir>: measure a candidate copy of the module instead,
# linked as [polar_cloud_dev] so the shared polar_cloud link stays alone
DEV_EXTRA = os.environ.get("POLAR_BENCH_EXTRA")
NAME = "polar_cloud_dev" if DEV_EXTRA else "polar_cloud"
PROBE = REPO / "bench" / "extras" / "reactor_probe"
# klippy's environment: as on a printer (see klippy_env/sitecustomize.py)
KLIPPY_ENV = {"PYTHONPATH": str(REPO / "bench" / "klippy_env")}
FLAVOUR = "klipper"
EMAIL = "bench@school.example.org"
PIN = "Bench42"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024


# ----------------------------------------------------------------- /proc

def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, in seconds."""
    with open("/proc/%d/stat" % (pid,)) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def status_kb(pid: int, key: str) -> int:
    with open("/proc/%d/status" % (pid,)) as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def rss_kb(pid: int) -> int:
    with open("/proc/%d/statm" % (pid,)) as f:
        return int(f.read().split()[1]) * PAGE_KB


def anon_kb(pid: int) -> int:
    """Anonymous (private, not file-backed) memory of a process."""
    with open("/proc/%d/smaps_rollup" % (pid,)) as f:
        for line in f:
            if line.startswith("Anonymous:"):
                return int(line.split()[1])
    raise KeyError("Anonymous")


def reset_peak_rss(pid: int) -> None:
    """Reset VmHWM (Linux: write 5 to clear_refs of a process we own)."""
    with open("/proc/%d/clear_refs" % (pid,), "w") as f:
        f.write("5")


class RssSampler:
    """Samples a process' RSS every `period` seconds on a thread."""

    def __init__(self, pid: int, period: float = .01) -> None:
        self.pid = pid
        self.period = period
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append(rss_kb(self.pid))
            except OSError:
                return
            self._stop.wait(self.period)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def machine() -> dict:
    model = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    load = os.getloadavg()
    return {"nproc": os.cpu_count(), "cpu": model,
            "load": "%.2f %.2f %.2f" % load}


# -------------------------------------------------------------- statistics

def percentile(values, q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty sequence."""
    data = sorted(values)
    if not data:
        return float("nan")
    rank = max(1, math.ceil(q / 100. * len(data)))
    return data[rank - 1]


def median(values) -> float:
    data = sorted(values)
    n = len(data)
    if not n:
        return float("nan")
    return data[n // 2] if n % 2 else (data[n // 2 - 1] + data[n // 2]) / 2.


# ---------------------------------------------------------- reactor probe

@dataclass
class Lateness:
    """Reactor timer lateness (ms) over one or more windows."""

    samples: array.array = field(default_factory=lambda: array.array("f"))
    seconds: float = 0.
    # time.monotonic() each tick was due (run time minus lateness)
    due: array.array = field(default_factory=lambda: array.array("d"))
    # garbage collections klippy ran on the reactor: (generation, ms)
    gc: list = field(default_factory=list)

    def add(self, other: Lateness) -> None:
        self.samples.extend(other.samples)
        self.due.extend(other.due)
        self.gc.extend(other.gc)
        self.seconds += other.seconds

    def gc_max(self, generation: int | None = None) -> float:
        return max([ms for gen, ms in self.gc
                    if generation is None or gen == generation] or [0.])

    def within(self, intervals: list[tuple[float, float]]) -> Lateness:
        """The ticks that were due inside one of the (start, end) intervals."""
        out = Lateness(seconds=sum(b - a for a, b in intervals))
        spans = sorted(intervals)
        i = 0
        for late, due in sorted(zip(self.samples, self.due),
                                key=lambda p: p[1]):
            while i < len(spans) and spans[i][1] < due:
                i += 1
            if i == len(spans):
                break
            if spans[i][0] <= due:
                out.samples.append(late)
                out.due.append(due)
        return out

    @property
    def count(self) -> int:
        return len(self.samples)

    def p(self, q: float) -> float:
        return percentile(self.samples, q)

    @property
    def max(self) -> float:
        return max(self.samples) if self.samples else float("nan")


def probe_reset(k: Klippy) -> None:
    k.call("reactor_probe/reset")


def probe_stats(k: Klippy) -> tuple[Lateness, list, float]:
    """(lateness since the last reset, transitions, ready time)."""
    res = k.call("reactor_probe/stats")
    samples = array.array("f")
    samples.frombytes(base64.b64decode(res["samples"]))
    times = array.array("d")
    times.frombytes(base64.b64decode(res["times"]))
    due = array.array("d", (t - late / 1000. for t, late in zip(times,
                                                                 samples)))
    return (Lateness(samples, res["window_s"], due,
                     [tuple(g) for g in res["gc"]]),
            [tuple(t) for t in res["transitions"]], res["ready_mono"])


def transition_time(transitions: list, what: str, pattern: str,
                    after: float = 0.) -> float | None:
    rx = re.compile(pattern)
    for t, name, value in transitions:
        if name == what and t >= after and rx.search(str(value)):
            return t
    return None


# ------------------------------------------------------------- workloads

def print_gcode(seconds: float, home: bool = True) -> str:
    """A cold print (no heating) of 2 mm segments at 100 mm/s around a
    160 mm square, rising 0.2 mm a lap, lasting about `seconds`."""
    lines = ["; polar_cloud bench print, about %d s" % (seconds,)]
    if home:
        lines.append("G28")
    lines += ["G90", "M83", "G1 Z0.3 F3000", "G1 X20 Y20 F12000"]
    corners = [(180., 20.), (180., 180.), (20., 180.), (20., 20.)]
    moves, z, x, y = 0, .3, 20., 20.
    total = int(seconds * 50)
    while moves < total:
        for cx, cy in corners:
            steps = int(max(abs(cx - x), abs(cy - y)) / 2.)
            for i in range(1, steps + 1):
                lines.append("G1 X%.1f Y%.1f E0.05 F6000" % (
                    x + (cx - x) * i / steps, y + (cy - y) * i / steps))
            moves += steps
            x, y = cx, cy
        z += .2
        lines.append("G1 Z%.2f" % (z,))
    lines += ["G1 Z%.2f F3000" % (z + 10,), "; end", ""]
    return "\n".join(lines)


def big_gcode(size: int) -> bytes:
    """`size` bytes of harmless G-code (short dwells), built by repetition."""
    line = b"G4 P20 ; polar_cloud bench padding, a 200 MB job file ........\n"
    block = line * (1024 * 1024 // len(line))
    head = b"; polar_cloud bench: big job\n"
    body = block * (size // len(block) + 1)
    return (head + body)[:size - 1] + b"\n"


def dwell_gcode(ms: int = 300, count: int = 2) -> bytes:
    return ("; polar_cloud bench: short job\n" + "G4 P%d\n" % (ms,) * count
            ).encode()


# --------------------------------------------------------------- klippys

def polar_section(sim: PolarSim, cam: CameraServer | None, ca_file: str,
                  **options) -> str:
    lines = ["[%s]" % (NAME,), "server_url: %s" % (sim.url,),
             "ca_file: %s" % (ca_file,)]
    if cam is None:
        lines.append("webcam_enabled: False")
    else:
        lines += ["webcam_enabled: True",
                  "snapshot_url: %s" % (cam.snapshot_url,),
                  "snapshot_interval: 3600",
                  "snapshot_interval_printing: 3600"]
    lines += ["%s: %s" % (k, v) for k, v in options.items()]
    return "\n".join(lines) + "\n"


# The simulated MCU, the cloud, S3 and the webcam stand in for hardware and
# services that do not share the printer host's CPU; on a 2-core bench box
# they would compete with klippy for it.  The bench process (simulator and
# webcam threads) and the simulated MCUs it starts run at this nice value;
# klippy, and anything that stands for work on the printer host, at 0.
TESTBED_NICE = 10


def renice(pid: int, value: int = 0) -> None:
    """Set the nice value of every thread of a process (Linux: per thread;
    threads started later inherit it from the thread that starts them)."""
    try:
        tids = os.listdir("/proc/%d/task" % (pid,))
    except OSError:
        return
    for tid in tids:
        try:
            os.setpriority(os.PRIO_PROCESS, int(tid), value)
        except OSError:
            pass


class Bed:
    """The simulator, the webcam and the two klippys of a bench run."""

    def __init__(self, keep: bool = False) -> None:
        self.keep = keep
        os.setpriority(os.PRIO_PROCESS, 0, TESTBED_NICE)
        self.root = Path(tempfile.mkdtemp(prefix="polar-bench-"))
        link_extra(FLAVOUR, DEV_EXTRA or EXTRA, NAME)
        link_extra(FLAVOUR, PROBE, "reactor_probe")
        self.sim = PolarSim().start()
        self.sim.add_account(EMAIL, PIN)
        # Job files and S3 over HTTPS, as the real ones: the TLS work
        # (context, CA bundle, handshake, decryption) is part of the cost
        certs = make_certs(self.root / "certs")
        self.ca_file = certs["ca"]["cert"]
        self.tls = TlsProxy(("127.0.0.1", self.sim.port), certs["good"]).start()
        self.sim.public_url = self.tls.url
        self.cam = CameraServer().start()
        self.file_hits: list[tuple[float, str]] = []
        hit = self.sim.rec.hit

        def timed_hit(name: str) -> None:
            self.file_hits.append((time.monotonic(), name))
            hit(name)
        self.sim.rec.hit = timed_hit
        self.base = Klippy(self.root / "base", FLAVOUR, "[reactor_probe]\n",
                           KLIPPY_ENV)
        self.polar = Klippy(self.root / "polar", FLAVOUR, "", KLIPPY_ENV)
        self.polar.serial = ""
        self.use_camera(False)
        # Each klippy's own CPU budget, while one is set (constrain())
        self.budgets: dict[str, CpuBudget] = {}

    def constrain(self, percent: float) -> str:
        """From the next start on, each klippy (and whatever it starts)
        runs in its own cgroup limited to `percent` of one core."""
        self.unconstrain()
        for who in ("polar", "base"):
            self.budgets[who] = CpuBudget(who, percent)
        return self.budgets["polar"].describe()

    def unconstrain(self) -> None:
        for budget in self.budgets.values():
            budget.close()
        self.budgets = {}

    def who(self, k: Klippy) -> str:
        return "polar" if k is self.polar else "base"

    def throttled(self) -> dict[str, tuple[int, float]]:
        return {who: b.throttled() for who, b in self.budgets.items()}

    def use_camera(self, on: bool) -> None:
        """The polar klippy's config (takes effect at its next start)."""
        self.polar.extra_cfg = "[reactor_probe]\n" + polar_section(
            self.sim, self.cam if on else None, self.ca_file)

    def start(self, k: Klippy) -> float:
        """Start k (simulated MCU first); return the klippy launch time."""
        k._start_simmcu(60)
        t0 = time.monotonic()
        k.start(wait_ready=False)
        budget = self.budgets.get(self.who(k))
        if budget is not None:
            budget.add(k.pid)
        renice(k.pid)
        k.wait_state("ready", 60)
        renice(k.pid)
        return t0

    def online(self, k: Klippy, timeout: float = 120.) -> None:
        """Wait until the polar klippy is online (registering if needed)."""
        sub = k.subscribe_objects({NAME: None})
        try:
            state = sub.wait_for(lambda s: s[NAME]["state"] in (
                "online", "unregistered"), timeout)[NAME]
            if state["state"] == "unregistered":
                out = k.subscribe_output()
                k.gcode("POLAR_REGISTER EMAIL=%s PIN=%s" % (EMAIL, PIN))
                out.wait_for(r"registered, serial number", timeout=timeout)
                out.close()
            state = sub.wait_for(lambda s: s[NAME]["state"]
                                 == "online", timeout)[NAME]
        finally:
            sub.close()
        k.serial = state["serial_number"]

    def close(self) -> None:
        for k in (self.base, self.polar):
            k.stop()
        self.unconstrain()
        self.cam.stop()
        self.tls.stop()
        self.sim.stop()
        if not self.keep:
            import shutil
            shutil.rmtree(self.root, ignore_errors=True)
