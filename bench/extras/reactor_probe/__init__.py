"""Bench-only klippy extra: how late does the reactor run a 5 ms timer?

    [reactor_probe]
    interval: 0.005     # optional, seconds

A reactor timer asks to run every `interval` seconds and records how late it
actually ran (reactor.monotonic() at the callback minus the wake time it
asked for).  The same tick notes every change of print_stats' state and of
the heater targets, stamped with time.monotonic() (the clock the Polar Cloud
simulator stamps its events with), so the bench can time "state changed in
klippy" -> "status arrived in the cloud".

Webhooks endpoints (the bench reads them through klippy's API socket):

    reactor_probe/stats   {"samples": base64 float32 lateness in ms,
                           "times": base64 float64 time.monotonic() of
                           each tick, "count", "max_ms", "window_s",
                           "ready_mono", "gc": [[generation, ms], ...]
                           (klippy runs the collector itself, on the
                           reactor, when it looks idle),
                           "transitions": [[mono, what, value], ...]}
    reactor_probe/reset   start a new window (samples and transitions)
    reactor_probe/cpu     klippy's CPU time since the last reset, in ms:
                          {"process", "reactor" (this thread), "threads":
                          {name: ms} of the threads alive now (a thread
                          that ended is in "process" only)}

Imports nothing from klippy, so it loads in every flavour.  Not part of the
product: only bench/ links it into klippy.
"""

from __future__ import annotations

import array
import base64
import gc
import os
import threading
import time

MAX_SAMPLES = 2_000_000     # about 2.7 hours at 5 ms
MAX_TRANSITIONS = 100_000


def thread_cpu() -> dict:
    """CPU time (ns) of each thread of this process alive now, by the
    thread's name (C threads, klippy's serial queue: by their id)."""
    names = {t.native_id: t.name for t in threading.enumerate()}
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open("/proc/self/task/%s/schedstat" % (tid,)) as f:
                ns = int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            continue
        name = names.get(int(tid), "C thread")
        out[name] = out.get(name, 0) + ns
    return out


class ReactorProbe:
    def __init__(self, config):
        self.printer = config.get_printer()
        self.reactor = self.printer.get_reactor()
        self.interval = config.getfloat("interval", .005, above=0.)
        self.samples = array.array("f")
        self.times = array.array("d")
        self.transitions: list = []
        self.window_start = time.monotonic()
        self.ready_mono = 0.
        self.waketime = 0.
        self.timer = None
        self.print_stats = None
        self.heaters: list = []
        self.last: dict = {}
        self.gc_runs: list = []
        self.gc_start = 0.
        if self._gc_callback not in gc.callbacks:
            gc.callbacks.append(self._gc_callback)
        self.printer.register_event_handler("klippy:ready", self._handle_ready)
        self.printer.register_event_handler("klippy:disconnect",
                                            self._handle_disconnect)
        webhooks = self.printer.lookup_object("webhooks")
        webhooks.register_endpoint("reactor_probe/stats", self._handle_stats)
        webhooks.register_endpoint("reactor_probe/reset", self._handle_reset)
        webhooks.register_endpoint("reactor_probe/cpu", self._handle_cpu)
        self.cpu_start = self._cpu()

    @staticmethod
    def _cpu():
        return time.process_time(), time.thread_time(), thread_cpu()

    def _handle_ready(self):
        self.ready_mono = time.monotonic()
        self.print_stats = self.printer.lookup_object("print_stats", None)
        self.heaters = [(name, self.printer.lookup_object(name, None))
                        for name in ("extruder", "heater_bed")]
        self.heaters = [(n, h) for n, h in self.heaters if h is not None]
        self.waketime = self.reactor.monotonic() + self.interval
        self.timer = self.reactor.register_timer(self._tick, self.waketime)

    def _handle_disconnect(self):
        if self._gc_callback in gc.callbacks:
            gc.callbacks.remove(self._gc_callback)

    def _gc_callback(self, phase, info):
        if phase == "start":
            self.gc_start = time.perf_counter()
        elif len(self.gc_runs) < MAX_TRANSITIONS:
            self.gc_runs.append((info["generation"],
                                 (time.perf_counter() - self.gc_start) * 1e3))

    def _note(self, what, value):
        if self.last.get(what, object()) != value:
            self.last[what] = value
            if len(self.transitions) < MAX_TRANSITIONS:
                self.transitions.append((time.monotonic(), what, value))

    def _tick(self, eventtime):
        now = self.reactor.monotonic()
        if len(self.samples) < MAX_SAMPLES:
            self.samples.append((now - self.waketime) * 1000.)
            self.times.append(time.monotonic())
        ps = self.print_stats
        if ps is not None:
            self._note("print_state", "%s %s" % (ps.state, ps.filename))
        for name, heater in self.heaters:
            self._note(name + ".target",
                       heater.get_status(eventtime).get("target"))
        # Keep the cadence; after a stall go on from now (one sample each)
        self.waketime += self.interval
        if self.waketime < now:
            self.waketime = now + self.interval
        return self.waketime

    def _handle_stats(self, web_request):
        samples = self.samples
        web_request.send({
            "samples": base64.b64encode(samples.tobytes()).decode("ascii"),
            "times": base64.b64encode(self.times.tobytes()).decode("ascii"),
            "count": len(samples),
            "max_ms": max(samples) if samples else 0.,
            "window_s": time.monotonic() - self.window_start,
            "ready_mono": self.ready_mono,
            "transitions": list(self.transitions),
            "gc": list(self.gc_runs)})

    def _handle_cpu(self, web_request):
        process, reactor, threads = self._cpu()
        process0, reactor0, threads0 = self.cpu_start
        web_request.send({
            "process": (process - process0) * 1e3,
            "reactor": (reactor - reactor0) * 1e3,
            "threads": {name: (ns - threads0.get(name, 0)) / 1e6
                        for name, ns in threads.items()}})

    def _handle_reset(self, web_request):
        self.cpu_start = self._cpu()
        self.samples = array.array("f")
        self.times = array.array("d")
        self.transitions = []
        self.gc_runs = []
        self.window_start = time.monotonic()
        web_request.send({"ok": True})


def load_config(config):
    return ReactorProbe(config)
