"""The bench's measurements.  Each figure with the module is matched by the
same workload on the same printer.cfg without [polar_cloud] (the baseline),
in the same run.

Order: start-ups (the two klippys alternating); idle and printing, both
klippys measured side by side over the same windows; then, with both
running, the polar klippy's status latency, 200 MB downloads, 50 MB jobs
paced at 12.5 MB/s and the reconnect storm (the baseline measured over the
same storm window; after each download an idle window of the baseline as
long, alternating); then both
fresh again with a webcam: memory cycles of each, snapshot rounds
alternating with baseline windows.  The same downloads and snapshots done
by a separate process are measured on the baseline for context.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from dataclasses import dataclass, field

from bench.harness import (
    KLIPPY_ENV,
    NAME,
    Bed,
    Lateness,
    RssSampler,
    anon_kb,
    big_gcode,
    cpu_seconds,
    dwell_gcode,
    print_gcode,
    probe_reset,
    probe_stats,
    renice,
    reset_peak_rss,
    rss_kb,
    status_kb,
    transition_time,
)
from tests.testbed.camera_server import noisy_jpeg
from tests.testbed.gcode_files import demo_print
from tests.testbed.helpers import helper_hosts, process_table
from tests.testbed.klippy import FLAVOURS, REPO, Klippy

MB = 1024 * 1024
# A cloud-sized job over a good home link: 50 MB at 12.5 MB/s (100 Mbit/s),
# paced by the simulator; on the printer it should be printing within
# PACED_TARGET seconds of the cloud's print
PACED_SIZE = 50 * 1000 * 1000
PACED_RATE = 12.5e6
PACED_TARGET = 10.
SNAPSHOT_RATE = 2.      # per second, in the snapshot window
SNAPSHOT_ROUNDS = 3
OUTSIDE_SNAPSHOTS = """
import json, sys, threading, time
from klippy_extras.polar_cloud import camera, options
cfg = json.loads(sys.argv[1])
opts = options.CameraOptions(enabled=True, snapshot_url=cfg["snapshot_url"])
done = threading.Event()
results = []
cam = camera.Camera(opts, True, threading.Event(),
                    lambda r: (results.append(r), done.set()), cfg["ca_file"])
cam.set_slot(camera.UploadSlot("idle", "", cfg["url"], cfg["fields"],
                               time.monotonic() + 3600, 1000000,
                               "image/jpeg"))
end = time.monotonic() + cfg["seconds"]
spans = []
while time.monotonic() < end:
    done.clear()
    t0 = time.monotonic()
    cam.start("idle", "0", t0, manual=True)
    done.wait(60)
    spans.append((t0, time.monotonic()))
    time.sleep(max(0., t0 + 1. / cfg["rate"] - time.monotonic()))
print(json.dumps({"spans": spans, "uploaded": sum(r.uploaded
                                                  for r in results)}))
"""


@dataclass(frozen=True)
class Plan:
    quick: bool
    cpu_window: float           # idle and printing windows (CPU + lateness)
    scenario_window: float      # snapshot and reconnect-storm windows
    latency_samples: int        # per kind of state change
    startups: int               # per klippy
    downloads: int              # 200 MB downloads
    download_size: int
    paced_downloads: int        # 50 MB jobs at 12.5 MB/s
    memory_cycles: int
    snapshots_per_cycle: int
    heater_changes: int         # per memory cycle, a multiple of 4 (ends at 0)

    @classmethod
    def make(cls, quick: bool) -> Plan:
        if quick:
            return cls(True, 60., 20., 10, 3, 1, 200 * MB, 2, 3, 8, 12)
        return cls(False, 300., 60., 24, 7, 3, 200 * MB, 4, 10, 30, 28)


@dataclass
class Results:
    startup: dict = field(default_factory=lambda: {"base": [], "polar": []})
    online_after_start: list = field(default_factory=list)
    import_ms: float = 0.
    lateness: dict = field(default_factory=dict)     # (scenario, who)
    cpu: dict = field(default_factory=dict)          # (scenario, who) -> %
    status_latency: dict = field(default_factory=dict)
    status_from_call: dict = field(default_factory=dict)
    download: list = field(default_factory=list)
    paced: list = field(default_factory=list)
    rss_cycles: dict = field(default_factory=lambda: {"base": [],
                                                      "polar": []})
    rss_start: dict = field(default_factory=dict)
    host_kb: tuple = ()     # the helper host's (Pss, anonymous), kB
    anon_end: dict = field(default_factory=dict)
    agent_anon_kb: int = 0
    activity: dict = field(default_factory=dict)
    agent_rss_kb: int = 0
    storm_attempts: int = 0
    snapshots: int = 0
    notes: list = field(default_factory=list)
    # (scenario, who) -> {"process", "reactor", thread name: ms}
    threads: dict = field(default_factory=dict)


def add_thread_cpu(r: Results, key: str, who: str, k: Klippy) -> None:
    """klippy's CPU time since the probe's reset, by thread, added to
    r.threads[(key, who)]."""
    res = k.call("reactor_probe/cpu")
    total = r.threads.setdefault((key, who), {})
    for name, ms in [("process", res["process"]), ("reactor", res["reactor"])
                     ] + sorted(res["threads"].items()):
        if name != "MainThread":
            total[name] = total.get(name, 0.) + ms


def thread_notes(r: Results) -> list[str]:
    notes = []
    for (key, who), ms in sorted(r.threads.items()):
        others = ", ".join("%s %.0f" % (name, v) for name, v in ms.items()
                           if name not in ("process", "reactor") and v >= 1.)
        notes.append("%s, %s klippy: CPU %.0f ms, of which the reactor %.0f"
                     " (threads alive at the end: %s)" % (
                         key, who, ms["process"], ms["reactor"],
                         others or "none over 1 ms"))
    return notes


def helper_host_kb(klippy_pid: int) -> tuple[int, int]:
    """(Pss, anonymous) in kB of klippy's helper host (helperhost.py, a
    child process of klippy for its lifetime); (0, 0) without one."""
    for pid in helper_hosts(klippy_pid, process_table()):
        try:
            with open("/proc/%d/smaps_rollup" % (pid,)) as f:
                fields = dict(line.split()[:2] for line in f
                              if line.startswith(("Pss:", "Anonymous:")))
            return int(fields["Pss:"]), int(fields["Anonymous:"])
        except (OSError, ValueError, KeyError):
            continue
    return 0, 0


def say(text: str) -> None:
    print("[%s] %s" % (time.strftime("%H:%M:%S"), text), file=sys.stderr,
          flush=True)


def pause(low: float = .3, high: float = .6) -> None:
    """A random gap between samples, so they do not lock onto the phase of
    the module's 0.25 s sampling timer."""
    time.sleep(random.uniform(low, high))


class Bench:
    def __init__(self, bed: Bed, plan: Plan, only: set[str] | None = None,
                 tag: str = ""):
        self.bed = bed
        # Prefixes the job ids: the module ignores a job id it has seen
        self.tag = tag
        self.sim = bed.sim
        self.plan = plan
        self.only = only
        self.r = Results()
        self.durations: dict[str, float] = {}

    def want(self, name: str) -> bool:
        return self.only is None or name in self.only

    # ------------------------------------------------------------ driver
    def run(self) -> Results:
        if self.want("startup"):
            self.startup()
        self.idle_and_printing()
        self.polar_plain()
        self.polar_camera()
        self.r.notes += thread_notes(self.r)
        return self.r

    # ---------------------------------------------------------- start-up
    def startup(self) -> None:
        bed, r = self.bed, self.r
        say("start-up: %d starts of each klippy" % (self.plan.startups,))
        for k in (bed.base, bed.polar):            # warm-up, registers
            bed.start(k)
            if k is bed.polar:
                bed.online(k)
            k.stop()
        for i in range(self.plan.startups):
            order = [("base", bed.base), ("polar", bed.polar)]
            for who, k in order if i % 2 else order[::-1]:
                t0 = bed.start(k)
                _lat, _tr, ready = probe_stats(k)
                r.startup[who].append(ready - t0)
                if who == "polar":
                    ev = self.sim.wait_event("authenticated", since=t0,
                                             serial=k.serial, direction="conn",
                                             ok=None, timeout=60)
                    r.online_after_start.append(ev.t - t0)
                k.stop()
        out = subprocess.run(
            [str(FLAVOURS["klipper"].python), "-X", "importtime", "-c",
             "import klippy.extras." + NAME],
            capture_output=True, text=True, check=True,
            env=dict(os.environ, **KLIPPY_ENV)).stderr
        for line in out.splitlines():
            parts = [p.strip() for p in line.split("|")]
            if len(parts) == 3 and parts[2] == "klippy.extras." + NAME:
                r.import_ms = int(parts[1]) / 1000.

    def agent_rss(self) -> None:
        """What a separate-process agent costs before it does anything."""
        out = subprocess.run(
            [str(FLAVOURS["klipper"].python), "-c",
             "import socketio, requests, cryptography\n"
             "rss = int(open('/proc/self/statm').read().split()[1]) * 4\n"
             "anon = [line.split()[1] for line in open("
             "'/proc/self/smaps_rollup') if line.startswith('Anonymous:')]\n"
             "print(rss, anon[0])"],
            capture_output=True, text=True, check=True, cwd=REPO,
            env=dict(os.environ, **KLIPPY_ENV)).stdout
        rss, anon = out.split()
        self.r.agent_rss_kb, self.r.agent_anon_kb = int(rss), int(anon)

    # ------------------------------------------------------ windows
    def side_by_side(self, key: str, klippys: dict[str, Klippy],
                     seconds: float) -> None:
        """Both klippys measured over the same window: whatever else the
        machine does meanwhile (other users, the kernel) hits both alike."""
        for k in klippys.values():
            probe_reset(k)
        cpu0 = {who: cpu_seconds(k.pid) for who, k in klippys.items()}
        t0 = time.monotonic()
        time.sleep(seconds)
        cpu1 = {who: cpu_seconds(k.pid) for who, k in klippys.items()}
        t1 = time.monotonic()
        for who, k in klippys.items():
            self.r.lateness[(key, who)] = probe_stats(k)[0]
            self.r.cpu[(key, who)] = (cpu1[who] - cpu0[who]) / (t1 - t0) * 100.

    def start_print(self, k: Klippy, seconds: float) -> None:
        k.write_gcode("bench_print.gcode", print_gcode(seconds))
        k.gcode("SDCARD_PRINT_FILE FILENAME=bench_print.gcode")
        sub = k.subscribe_objects({"toolhead": ["homed_axes"],
                                   "print_stats": ["state"]})
        sub.wait_for(lambda s: s["toolhead"]["homed_axes"] == "xyz"
                     and s["print_stats"]["state"] == "printing", 60)
        sub.close()

    def end_print(self, k: Klippy) -> None:
        k.gcode("CANCEL_PRINT")
        sub = k.subscribe_objects({"print_stats": ["state"]})
        sub.wait_for(lambda s: s["print_stats"]["state"] != "printing", 60)
        sub.close()

    def idle_and_printing(self) -> None:
        """Idle and printing, the klippy with the module (connected) and the
        one without it side by side over the same windows."""
        if not (self.want("idle") or self.want("printing")):
            return
        bed, w = self.bed, self.plan.cpu_window
        klippys = {"polar": bed.polar, "base": bed.base}
        bed.use_camera(False)
        try:
            for k in klippys.values():
                bed.start(k)
            bed.online(bed.polar)
            time.sleep(3.)      # let start-up work settle
            if self.want("idle"):
                say("idle window %.0f s, both klippys" % (w,))
                self.side_by_side("idle", klippys, w)
            if self.want("printing"):
                say("printing window %.0f s, both klippys" % (w,))
                for k in klippys.values():
                    self.start_print(k, w + 30.)
                time.sleep(1.)  # past the first moves after homing
                self.side_by_side("printing", klippys, w)
                for k in klippys.values():
                    self.end_print(k)
        finally:
            for k in klippys.values():
                k.stop()

    # ----------------------------------------------------- polar, plain
    def polar_plain(self) -> None:
        """Status latency, downloads and the reconnect storm.  The klippy
        without the module runs too, idle: measured right after each
        download for as long, and over the storm window itself."""
        names = {"latency", "download", "storm"}
        if self.only is not None and not self.only & names:
            return
        bed = self.bed
        k, base = bed.polar, bed.base
        bed.use_camera(False)
        try:
            bed.start(base)
            bed.start(k)
            bed.online(k)
            if self.want("latency"):
                self.status_latency(k)
            if self.want("download"):
                self.downloads(k, base)
                self.paced_downloads(k, base)
                self.outside_download(base)
            if self.want("storm"):
                self.storm(k, base)
        finally:
            k.stop()
            base.stop()

    def base_window(self, base: Klippy, key: str, seconds: float) -> None:
        """An idle window of the baseline klippy, added to `key`."""
        probe_reset(base)
        time.sleep(seconds)
        lat = probe_stats(base)[0]
        add_thread_cpu(self.r, key, "base", base)
        self.r.lateness.setdefault((key, "base"), Lateness()).add(lat)

    def base_job_window(self, base: Klippy, key: str, content: bytes,
                        seconds: float, start_after: float) -> None:
        """The baseline's side of a cloud job, added to `key`: the same
        file copied into its G-code folder by another process (this one,
        outside any budget), then printed, in a window as long as the
        module's, the print starting as late in it."""
        probe_reset(base)
        t0 = time.monotonic()
        path = base.gcodes_dir / "bench_job.gcode"
        path.write_bytes(content)
        time.sleep(max(0., start_after - (time.monotonic() - t0)))
        sub = base.subscribe_objects({"print_stats": ["state"]})
        base.gcode("SDCARD_PRINT_FILE FILENAME=bench_job.gcode")
        sub.wait_for(lambda s: s["print_stats"]["state"] == "printing", 60)
        sub.close()
        time.sleep(max(0., seconds - (time.monotonic() - t0)))
        lat = probe_stats(base)[0]
        add_thread_cpu(self.r, key, "base", base)
        self.r.lateness.setdefault((key, "base"), Lateness()).add(lat)
        self.end_print(base)
        path.unlink()

    def wait_status(self, k: Klippy, since: float, predicate,
                    timeout: float = 30.):
        return self.sim.wait_event("status", predicate, since=since,
                                   serial=k.serial, timeout=timeout)

    def status_latency(self, k: Klippy) -> None:
        """State change in klippy -> status at the cloud, per kind.

        The change is timed by the probe (the tick that first saw it, at
        most 5 ms late); for commanded changes the time of the G-code call
        is kept too (it includes klippy's own work, e.g. PAUSE waiting for
        the SD card reader)."""
        n = self.plan.latency_samples
        say("status latency: %d samples per kind" % (n,))
        probe_reset(k)
        # (kind, probe item, value pattern, call time, cloud time)
        samples: list[tuple[str, str, str, float, float]] = []

        def commanded(kind, script, what, value, predicate):
            pause()
            t0 = time.monotonic()
            k.gcode(script)
            ev = self.wait_status(k, t0, predicate)
            samples.append((kind, what, value, t0, ev.t))
        for i in range(n):
            target = 45. if i % 2 == 0 else 0.
            commanded("heater target", "M140 S%g" % (target,),
                      "heater_bed.target", "^%s$" % (target,),
                      lambda d, v=target: d["targetBed"] == v)
        self.start_print(k, 600.)
        time.sleep(1.)
        for _ in range(n):
            commanded("pause", "PAUSE", "print_state", "^paused ",
                      lambda d: d["status"] == 4)
            commanded("resume", "RESUME", "print_state", "^printing ",
                      lambda d: d["status"] == 1)
        self.end_print(k)
        # Completion of cloud jobs: no command to time, only the change
        for i in range(n):
            job_id = "%sdone-%d" % (self.tag, i)
            url = self.sim.add_file(job_id + ".gcode", dwell_gcode())
            pause()
            t0 = time.monotonic()
            self.sim.push_print(k.serial, job_id, job_name="bench",
                                gcode_url=url)
            ev = self.wait_status(k, t0, lambda d, j=job_id: d["status"] == 7
                                  and d["jobId"] == j, 90.)
            samples.append(("complete", "print_state",
                            r"^complete .*_polar-%s\.gcode$" % (job_id,),
                            0., ev.t))
        _lat, transitions, _ready = probe_stats(k)
        for kind, what, value, t_call, t_cloud in samples:
            changed = transition_time(transitions, what, value, after=t_call)
            if changed is None or changed > t_cloud:
                self.r.notes.append("status latency: no %s change seen by"
                                    " the probe" % (kind,))
                continue
            self.r.status_latency.setdefault(kind, []).append(
                t_cloud - changed)
            if t_call:
                self.r.status_from_call.setdefault(kind, []).append(
                    t_cloud - t_call)

    def downloads(self, k: Klippy, base: Klippy) -> None:
        size = self.plan.download_size
        say("downloads: %d x %d MB" % (self.plan.downloads, size // MB))
        content = big_gcode(size)
        total = Lateness()
        for i in range(self.plan.downloads):
            job_id = "%sbig-%d" % (self.tag, i)
            name = job_id + ".gcode"
            url = self.sim.add_file(name, content)
            sub = k.subscribe_objects({"print_stats": ["state", "filename"]})
            time.sleep(2.)
            reset_peak_rss(k.pid)
            rss0 = rss_kb(k.pid)
            probe_reset(k)
            t_push = time.monotonic()
            with RssSampler(k.pid) as sampler:
                self.sim.push_print(k.serial, job_id, job_name="bench",
                                    gcode_url=url)
                lat, t_req, t_start = self.job_timing(k, sub, job_id, name,
                                                      300)
            add_thread_cpu(self.r, "download", "polar", k)
            peak = max([status_kb(k.pid, "VmHWM")] + sampler.samples)
            total.add(lat)
            self.r.download.append({
                "seconds": t_start - t_req, "push_to_start": t_start - t_push,
                "mb_s": size / 1e6 / (t_start - t_req),
                "rss0": rss0, "peak": peak, "growth": peak - rss0})
            say("download %d: %.2f s, %.0f MB/s, peak RSS +%d kB"
                % (i, t_start - t_req, size / 1e6 / (t_start - t_req),
                   peak - rss0))
            self.cancel_job(k, job_id, name)
            self.base_job_window(base, "download", content, lat.seconds,
                                 t_start - t_push)
        self.r.lateness[("download", "polar")] = total

    def job_timing(self, k: Klippy, sub, job_id: str, name: str,
                   timeout: float) -> tuple[Lateness, float, float]:
        """Once the pushed job prints: the reactor's lateness meanwhile,
        when its file was asked for, and when printing began."""
        sub.wait_for(lambda s: s["print_stats"]["state"] == "printing"
                     and s["print_stats"]["filename"].endswith(
                         "_polar-%s.gcode" % job_id), timeout)
        lat, transitions, _ready = probe_stats(k)
        sub.close()
        t_req = min(t for t, n in self.bed.file_hits if n == name)
        t_start = transition_time(transitions, "print_state",
                                  r"^printing .*_polar-%s\.gcode$"
                                  % job_id)
        worst = sorted(zip(lat.samples, lat.due), reverse=True)[:3]
        self.r.notes.append(
            "job %s: the latest reactor ticks %s, in seconds from the file"
            " request (printing at %+.2f s)" % (
                job_id, ", ".join("%.1f ms at %+.2f" % (ms, due - t_req)
                                  for ms, due in worst), t_start - t_req))
        return lat, t_req, t_start

    def cancel_job(self, k: Klippy, job_id: str, name: str) -> None:
        """Cancel a cloud job, wait for its report, forget its files."""
        since = time.monotonic()
        k.gcode("CANCEL_PRINT")
        self.sim.wait_for("job", lambda d: d["jobId"] == job_id,
                          since=since - 1, serial=k.serial, timeout=60)
        for f in k.gcodes_dir.glob("*_polar-%s.gcode" % (job_id,)):
            f.unlink()
        with self.sim.rec.lock:
            self.sim.http.files.pop(name, None)

    def paced_downloads(self, k: Klippy, base: Klippy) -> None:
        """A 50 MB job the simulator sends at 12.5 MB/s: the cloud's print
        -> printing, and the reactor's lateness meanwhile (each followed by
        an idle window of the baseline as long)."""
        n = self.plan.paced_downloads
        say("paced downloads: %d x %d MB at %.1f MB/s"
            % (n, PACED_SIZE // 1000000, PACED_RATE / 1e6))
        content = big_gcode(PACED_SIZE)
        total = Lateness()
        for i in range(n):
            job_id = "%spaced-%d" % (self.tag, i)
            name = job_id + ".gcode"
            url = self.sim.add_file(name, content, "slow", rate=PACED_RATE)
            sub = k.subscribe_objects({"print_stats": ["state", "filename"]})
            pause()
            probe_reset(k)
            t_push = time.monotonic()
            self.sim.push_print(k.serial, job_id, job_name="bench",
                                gcode_url=url)
            lat, t_req, t_start = self.job_timing(k, sub, job_id, name, 120)
            add_thread_cpu(self.r, "paced", "polar", k)
            total.add(lat)
            self.r.paced.append({"push_to_start": t_start - t_push,
                                 "req_to_start": t_start - t_req})
            say("paced download %d: printing %.2f s after the print"
                % (i, t_start - t_push))
            self.cancel_job(k, job_id, name)
            self.base_job_window(base, "paced", content, lat.seconds,
                                 t_start - t_push)
        self.r.lateness[("paced", "polar")] = total

    def outside_download(self, k: Klippy) -> None:
        """Context for the download figures: the baseline klippy while a
        separate process downloads the same file from the simulator (the
        machine's load without the module in klippy)."""
        size = self.plan.download_size
        url = self.sim.add_file("outside.gcode", big_gcode(size))
        dest = k.workdir / "outside.part"
        script = (
            "import os, sys, requests\n"
            "for _ in range(int(sys.argv[3])):\n"
            "    with requests.get(sys.argv[1], stream=True,"
            " verify=sys.argv[4]) as r, "
            "open(sys.argv[2], 'wb') as f:\n"
            "        for chunk in r.iter_content(64 * 1024):\n"
            "            f.write(chunk)\n"
            "        f.flush(); os.fsync(f.fileno())\n")
        say("base: %d x %d MB downloaded by a separate process"
            % (self.plan.downloads, size // MB))
        probe_reset(k)
        proc = subprocess.Popen([str(FLAVOURS["klipper"].python), "-c",
                                 script, url, str(dest),
                                 str(self.plan.downloads), self.bed.ca_file])
        renice(proc.pid)        # it stands for an agent on the printer host
        if proc.wait():
            raise RuntimeError("the outside download failed")
        lat, _tr, _ready = probe_stats(k)
        dest.unlink()
        with self.sim.rec.lock:
            self.sim.http.files.pop("outside.gcode", None)
        self.r.lateness[("download-outside", "base")] = lat

    def outside_snapshots(self, k: Klippy) -> None:
        """Context for the snapshot figures: the baseline klippy while a
        separate process runs the module's own camera code (fetch, shrink,
        upload) back to back for as long as the polar snapshot window."""
        form = self.sim.http.issue_form("BENCH", "idle", None, 3600,
                                        1_000_000, "image/jpeg")
        cfg = {"snapshot_url": self.bed.cam.snapshot_url,
               "url": self.bed.tls.url + "/upload", "fields": form.fields,
               "ca_file": self.bed.ca_file,
               "seconds": self.durations["snapshot"], "rate": SNAPSHOT_RATE}
        say("base: %.0f s of snapshots by a separate process"
            % (cfg["seconds"],))
        probe_reset(k)
        proc = subprocess.Popen([str(FLAVOURS["klipper"].python), "-c",
                                 OUTSIDE_SNAPSHOTS, json.dumps(cfg)],
                                cwd=REPO, stdout=subprocess.PIPE, text=True)
        renice(proc.pid)        # it stands for an agent on the printer host
        out, _err = proc.communicate()
        if proc.returncode:
            raise RuntimeError("the outside snapshots failed")
        lat, _tr, _ready = probe_stats(k)
        res = json.loads(out)
        during = lat.within([tuple(s) for s in res["spans"]])
        self.r.lateness[("snapshot-outside", "base")] = during
        self.r.notes.append("snapshots by a separate process: %d (%d"
                            " uploaded), %d reactor ticks due during them"
                            % (len(res["spans"]), res["uploaded"],
                               during.count))

    def storm(self, k: Klippy, base: Klippy) -> None:
        """Drops and refusals for a window; the klippy without the module is
        measured over the same window (the storm costs the machine next to
        nothing, so the two can share it and share the machine's noise)."""
        w = self.plan.scenario_window
        say("reconnect storm: %.0f s, both klippys measured" % (w,))
        probe_reset(k)
        probe_reset(base)
        t0 = time.monotonic()
        half, end = t0 + w / 2., t0 + w
        last = t0
        # First half: drop the link each time the printer is back online
        self.sim.drop(k.serial)
        while time.monotonic() < half:
            try:
                ev = self.sim.wait_event(
                    "authenticated", since=last, serial=k.serial,
                    direction="conn", ok=None,
                    timeout=max(.1, half - time.monotonic()))
            except TimeoutError:
                break
            last = ev.t + 1e-6
            self.sim.drop(k.serial)
        # Second half: refuse every connection attempt
        self.sim.set_fault("refuse_connections", "reset")
        self.sim.drop(k.serial)
        time.sleep(max(0., end - time.monotonic()))
        lat, _tr, _ready = probe_stats(k)
        self.sim.set_fault("refuse_connections", False)
        self.r.lateness[("storm", "polar")] = lat
        self.r.lateness[("storm", "base")] = probe_stats(base)[0]
        attempts = self.sim.connection_attempts(since=t0)
        self.r.storm_attempts = len(attempts)
        for who, late in (("polar", lat), ("base", self.r.lateness[
                ("storm", "base")])):
            worst = sorted(zip(late.samples, late.due), reverse=True)[:3]
            self.r.notes.append(
                "storm, %s klippy: the latest reactor ticks %s, in seconds"
                " from the storm's start (connection attempts at %s)" % (
                    who, ", ".join("%.1f ms at %+.2f" % (ms, due - t0)
                                   for ms, due in worst),
                    " ".join("%+.2f" % (t - t0) for t in attempts)))
        say("storm started at monotonic %.4f" % (t0,))

    # ---------------------------------------------------- polar, camera
    def polar_camera(self) -> None:
        """Memory cycles (both klippys fresh) and snapshot processing, the
        klippy with the module on a webcam serving noisy 1080p frames.  Its
        automatic snapshots are off (interval 3600 s): the bench takes them
        with POLAR_SNAPSHOT, so none run while the baseline is measured."""
        if self.only is not None and not self.only & {"memory", "snapshot"}:
            return
        bed = self.bed
        k, base = bed.polar, bed.base
        bed.cam.picture = noisy_jpeg((1920, 1080))
        bed.use_camera(True)
        try:
            bed.start(base)
            bed.start(k)
            bed.online(k)
            # camera found (probed at start), upload URL issued
            self.sim.wait_for("getUrlResponse", serial=k.serial, timeout=60)
            out = k.subscribe_output()
            if self.want("memory"):
                self.agent_rss()
                self.memory(k, "polar", out)
                self.memory(base, "base")
            if self.want("snapshot"):
                self.snapshot_window(k, out, base)
                self.outside_snapshots(base)
        finally:
            k.stop()
            base.stop()
            bed.use_camera(False)

    def snapshot(self, k: Klippy, out) -> tuple[float, float] | None:
        """One POLAR_SNAPSHOT; (call time, result time) when it ran."""
        out.mark()
        t0 = time.monotonic()
        k.gcode("POLAR_SNAPSHOT")
        line = out.wait_for(r"Polar Cloud: (snapshot \d+|no snapshot|a "
                            r"snapshot is already running)", timeout=60)
        if "already running" in line:
            time.sleep(.05)
            return None
        return t0, time.monotonic()

    def snapshot_window(self, k: Klippy, out, base: Klippy) -> None:
        """Lateness of the reactor ticks due while a snapshot was being
        taken, shrunk and uploaded (POLAR_SNAPSHOT to its console line),
        SNAPSHOT_RATE a second: faster than any schedule the module has (5 s
        at least), slow enough that the bench's own servers do not saturate
        the machine.  In SNAPSHOT_ROUNDS, each followed by an idle window of
        the baseline klippy as long."""
        w = self.plan.scenario_window
        say("snapshot processing: %.0f s of 1080p snapshots, %g a second"
            % (w, SNAPSHOT_RATE))
        t0 = time.monotonic()
        spans: list[tuple[float, float]] = []
        during = Lateness()
        for _ in range(SNAPSHOT_ROUNDS):
            probe_reset(k)
            start, mine = time.monotonic(), []
            while time.monotonic() - start < w / SNAPSHOT_ROUNDS:
                span = self.snapshot(k, out)
                if span is not None:
                    mine.append(span)
                    time.sleep(max(0., span[0] + 1. / SNAPSHOT_RATE
                                   - time.monotonic()))
            lat = probe_stats(k)[0]
            add_thread_cpu(self.r, "snapshot", "polar", k)
            during.add(lat.within(mine))
            spans += mine
            self.base_window(base, "snapshot", lat.seconds)
        self.r.lateness[("snapshot", "polar")] = during
        self.durations["snapshot"] = w
        self.r.snapshots = len([u for u in self.sim.uploads
                                if u.get("t", 0) >= t0])
        self.r.notes.append(
            "snapshot window: %d POLAR_SNAPSHOTs of a %d kB noisy 1080p JPEG"
            " (%d uploads), %.0f ms each on average; %d reactor ticks were"
            " due during them"
            % (len(spans), len(self.bed.cam.picture) // 1024,
               self.r.snapshots, 1000. * during.seconds / max(1, len(spans)),
               during.count))

    # ------------------------------------------------------------ memory
    def memory(self, k: Klippy, who: str, out=None) -> None:
        cycles = self.plan.memory_cycles
        say("%s: %d memory cycles" % (who, cycles))
        job_text = demo_print(moves=150, hotend=0, bed=0, feedrate=6000)
        time.sleep(5.)
        self.r.rss_start[who] = rss_kb(k.pid)
        statuses0 = len(self.sim.received("status"))
        uploads0 = len(self.sim.uploads)
        for c in range(cycles):
            # Heater target changes (each one a status message)
            for i in range(self.plan.heater_changes):
                heater = "M140" if i % 2 == 0 else "M104"
                target = 0. if i % 4 >= 2 else 40.
                t0 = time.monotonic()
                k.gcode("%s S%g" % (heater, target))
                if who == "polar":
                    key = "targetBed" if heater == "M140" else "targetTool0"
                    self.wait_status(k, t0, lambda d, key=key, v=target:
                                     d[key] == v)
            # A print with a pause and a resume: a cloud job with the
            # module, the same file printed locally without it
            if who == "polar":
                job_id = "%smem-%d" % (self.tag, c)
                url = self.sim.add_file(job_id + ".gcode", job_text)
                t0 = time.monotonic()
                self.sim.push_print(k.serial, job_id, job_name="bench",
                                    gcode_url=url)
                self.wait_status(k, t0, lambda d: d["status"] == 3, 60)
                self.sim.pause(k.serial)
                self.wait_status(k, t0, lambda d: d["status"] == 4)
                self.sim.resume(k.serial)
                t1 = time.monotonic()
                # printing again, or already complete if little was left
                self.wait_status(k, t1, lambda d: d["status"] in (3, 7))
                self.sim.wait_for("job", lambda d, j=job_id: d["jobId"] == j,
                                  since=t0, serial=k.serial, timeout=120)
                for _ in range(self.plan.snapshots_per_cycle):
                    while self.snapshot(k, out) is None:
                        pass
            else:
                k.write_gcode("mem.gcode", job_text)
                k.gcode("SDCARD_PRINT_FILE FILENAME=mem.gcode")
                sub = k.subscribe_objects({"print_stats": ["state",
                                                           "print_duration"]})
                sub.wait_for(lambda s: s["print_stats"]["print_duration"] > 0,
                             60)
                k.gcode("PAUSE")
                k.gcode("RESUME")
                sub.wait_for(lambda s: s["print_stats"]["state"]
                             == "complete", 120)
                sub.close()
            self.r.rss_cycles[who].append(rss_kb(k.pid))
            self.r.anon_end[who] = anon_kb(k.pid)
            if who == "polar":
                self.r.host_kb = helper_host_kb(k.pid)
            say("%s: cycle %d RSS %d kB" % (who, c + 1,
                                            self.r.rss_cycles[who][-1]))
        if who == "polar":
            self.r.activity = {
                "statuses": len(self.sim.received("status")) - statuses0,
                "jobs": cycles,
                "snapshots": len(self.sim.uploads) - uploads0}
