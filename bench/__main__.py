"""polar_cloud benchmarks: what the module costs klippy, and how fast it
reacts.  Run `bench/run.sh` (or `.venv/bin/python -m bench`) from the repo.

    bench/run.sh            full run, 5 minute CPU windows (about 20 min)
    bench/run.sh --quick    60 s windows, fewer samples (about 6 min)
    bench/run.sh --only download,storm    just some measurements
    bench/run.sh --cpu-budget 30          also under a CPU budget

Prints a table: each figure with the module, without it (the same
printer.cfg and workload, no [polar_cloud]), the difference, the target and
PASS/MISS.  Not part of the test suite: nothing here fails a build.

--cpu-budget P runs everything twice in the same run: unconstrained, then
with each klippy (and the processes it starts) in its own cgroup limited
to P % of one core in 5 ms periods (bench/cgroup.py; needs root), the way
a Raspberry Pi-class CPU shared with Moonraker, a front-end and a camera
streamer leaves klippy a slice of its time.  The simulated MCU, the cloud
simulator, the webcam and the baseline's own file copy stay outside it.
Two tables: unconstrained and under the budget.

Everything is real: klippy from the project venv on the simulated MCU, the
local Polar Cloud simulator, the loopback webcam.  Two modelling choices:
klippy's Python sees only what install.sh puts in a printer's klippy-env
(bench/klippy_env hides the simulator's aiohttp, which python-engineio
would otherwise import), and the stand-ins for things that are not on the
printer's host (simulated MCU, cloud, S3, webcam) run at nice 10 so that
on a 2-core box they do not take the CPU from klippy.  A reactor probe
(bench/extras/reactor_probe) times a 5 ms reactor timer inside klippy.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time

from bench import report
from bench.cgroup import BudgetError
from bench.harness import Bed, machine, median, percentile
from bench.report import Row, mb, ms, pct, secs
from bench.scenarios import (
    PACED_RATE,
    PACED_SIZE,
    PACED_TARGET,
    Bench,
    Plan,
    Results,
    say,
)

SECTIONS = ("startup", "idle", "printing", "latency", "download", "snapshot",
            "storm", "memory")
LATENCY_SCENARIOS = [
    ("idle", "idle, connected"),
    ("printing", "printing, connected"),
    ("download", "200 MB job download"),
    ("paced", "50 MB job at 12.5 MB/s"),
    ("snapshot", "1080p snapshot processing"),
    ("storm", "reconnect storm (%d connection attempts)"),
]
PEER_POLL = 5.


def lateness_rows(r: Results) -> list[Row]:
    rows = []
    for key, label in LATENCY_SCENARIOS:
        if "%d" in label:
            label = label % (r.storm_attempts,)
        polar, base = r.lateness.get((key, "polar")), r.lateness.get(
            (key, "base"))
        if polar is None or base is None or not polar.count or not base.count:
            continue
        p99 = polar.p(99) - base.p(99)
        worst = polar.max - base.max
        rows.append(Row("reactor lateness p99", "%s (%d/%d samples)"
                        % (label, polar.count, base.count),
                        ms(polar.p(99)), ms(base.p(99)), "%+.2f ms" % p99,
                        "< 1 ms added", p99 < 1.))
        rows.append(Row("reactor lateness max", label, ms(polar.max),
                        ms(base.max), "%+.2f ms" % worst, "< 5 ms added",
                        worst < 5.))
        if key in ("idle", "printing"):
            rows.append(Row("reactor gc", "%s: klippy's collections, longest"
                            " (count)" % (label,), "%s (%d)" % (
                                ms(polar.gc_max()), len(polar.gc)),
                            "%s (%d)" % (ms(base.gc_max()), len(base.gc)),
                            "", "", None))
    for key, label in (("download", "the same files downloaded flat out"),
                       ("snapshot", "the same snapshots (the module's"
                        " camera code)")):
        outside = r.lateness.get((key + "-outside", "base"))
        base = r.lateness.get((key, "base"))
        if outside is not None and base is not None and outside.count:
            rows.append(Row("reactor lateness", "context: %s by a separate"
                            " process, klippy without the module: p99 / max"
                            % (label,), "",
                            "%s / %s" % (ms(outside.p(99)), ms(outside.max)),
                            "%+.2f / %+.2f ms" % (outside.p(99) - base.p(99),
                                                  outside.max - base.max),
                            "", None))
    return rows


def status_rows(r: Results) -> list[Row]:
    rows = []
    worst = 0.
    for kind, values in r.status_latency.items():
        p95 = percentile(values, 95)
        worst = max(worst, p95)
        rows.append(Row("status latency p95", "%s: state change -> cloud"
                        " (%d samples, median %s)"
                        % (kind, len(values), secs(median(values))),
                        secs(p95), "-", "", "< 0.5 s", p95 < .5))
    for kind, values in r.status_from_call.items():
        rows.append(Row("status latency p95", "%s: G-code call -> cloud"
                        " (includes klippy's own command time)" % (kind,),
                        secs(percentile(values, 95)), "-", "", "", None))
    if rows:
        # A poller sees a change after a uniform share of its interval
        peer = PEER_POLL * .95
        rows.append(Row("status latency p95", "peer polling every %g s"
                        " (uniform phase) vs our worst kind"
                        % (PEER_POLL,), secs(worst), secs(peer),
                        "%.0fx faster" % (peer / worst), "", None))
    return rows


def cpu_rows(r: Results, plan: Plan) -> list[Row]:
    rows = []
    for key, target in (("idle", .5), ("printing", None)):
        polar, base = r.cpu.get((key, "polar")), r.cpu.get((key, "base"))
        if polar is None or base is None:
            continue
        added = polar - base
        rows.append(Row("klippy CPU", "%s, %.0f s window" % (
            "idle, connected" if key == "idle" else "printing, connected",
            plan.cpu_window), pct(polar), pct(base),
            "%+.2f %%" % (added,),
            "< %g %% of a core added" % target if target else "",
            added < target if target else None))
    return rows


def memory_rows(r: Results) -> list[Row]:
    polar, base = r.rss_cycles["polar"], r.rss_cycles["base"]
    rows = []
    if polar and base:
        added = polar[-1] - base[-1]
        a = r.activity
        rows.append(Row("klippy RSS", "after %d cycles (%d statuses, %d jobs,"
                        " %d snapshots)" % (len(polar), a.get("statuses", 0),
                                            a.get("jobs", 0),
                                            a.get("snapshots", 0)),
                        mb(polar[-1]), mb(base[-1]), "%+.1f MB" % (
                            added / 1024.), "< 25 MB added", added < 25 * 1024))
        mid = len(polar) // 2
        growth = polar[-1] - polar[mid - 1] if mid else 0
        base_growth = base[-1] - base[mid - 1] if mid else 0
        rows.append(Row("klippy RSS", "growth, cycle %d -> %d" % (
            mid, len(polar)), "%+.1f MB" % (growth / 1024.),
            "%+.1f MB" % (base_growth / 1024.),
            "%+.1f MB" % ((growth - base_growth) / 1024.),
            "< 1 MB (no growth)", growth - base_growth < 1024))
        if "polar" in r.anon_end and "base" in r.anon_end:
            anon = r.anon_end["polar"] - r.anon_end["base"]
            rows.append(Row("klippy RSS", "of which anonymous (heap, not"
                            " library code), after the cycles",
                            mb(r.anon_end["polar"]), mb(r.anon_end["base"]),
                            "%+.1f MB" % (anon / 1024.), "", None))
        if "polar" in r.rss_start and "base" in r.rss_start:
            start = r.rss_start["polar"] - r.rss_start["base"]
            rows.append(Row("klippy RSS", "online, before the cycles",
                            mb(r.rss_start["polar"]), mb(r.rss_start["base"]),
                            "%+.1f MB" % (start / 1024.), "", None))
        rows.append(Row("klippy RSS", "after each cycle (MB)", " ".join(
            "%.1f" % (v / 1024.) for v in polar), " ".join(
            "%.1f" % (v / 1024.) for v in base), "", "", None))
    if r.host_kb and r.host_kb[0]:
        rows.append(Row("helper host", "klippy's child process that forks the"
                        " helpers, after the cycles: Pss (anonymous)",
                        "%s (%s)" % (mb(r.host_kb[0]), mb(r.host_kb[1])),
                        "", "", "", None))
    if r.agent_rss_kb:
        rows.append(Row("peer", "a separate agent process: bare `python -c"
                        " 'import socketio, requests, cryptography'`,"
                        " RSS (anonymous)", "%s (%s)" % (
                            mb(r.agent_rss_kb), mb(r.agent_anon_kb)),
                        "", "", "", None))
    return rows


def download_rows(r: Results) -> list[Row]:
    if not r.download:
        return []
    rates = [d["mb_s"] for d in r.download]
    growth = max(d["growth"] for d in r.download)
    slowest = min(rates)
    return [
        Row("job download", "200 MB from the loopback sim: file request ->"
            " print started (slowest of %d)" % (len(rates),),
            "%.0f MB/s" % (slowest,), "", "", ">= 50 MB/s", slowest >= 50.),
        Row("job download", "klippy peak RSS growth during it",
            mb(growth), "", "", "< 8 MB", growth < 8 * 1024),
    ]


def paced_rows(r: Results) -> list[Row]:
    if not r.paced:
        return []
    slowest = max(p["push_to_start"] for p in r.paced)
    transfer = PACED_SIZE / PACED_RATE
    return [Row("job download", "%d MB at %.1f MB/s (%.1f s on the wire):"
                " cloud's print -> printing (slowest of %d; median %s)"
                % (PACED_SIZE // 1000000, PACED_RATE / 1e6, transfer,
                   len(r.paced), secs(median(
                       [p["push_to_start"] for p in r.paced]))),
                secs(slowest), "", "", "< %g s" % (PACED_TARGET,),
                slowest < PACED_TARGET)]


def startup_rows(r: Results) -> list[Row]:
    polar, base = r.startup["polar"], r.startup["base"]
    if not polar or not base:
        return []
    added = median(polar) - median(base)
    rows = [Row("start-up", "klippy start -> ready, median of %d"
                % (len(polar),), secs(median(polar)), secs(median(base)),
                "%+.0f ms" % (added * 1000.), "< 300 ms added", added < .3)]
    if r.online_after_start:
        rows.append(Row("start-up", "klippy start -> online in the cloud,"
                        " median", secs(median(r.online_after_start)), "", "",
                        "", None))
    if r.import_ms:
        rows.append(Row("start-up", "import of the module in a bare python"
                        " (-X importtime)", "%.0f ms" % (r.import_ms,), "",
                        "", "", None))
    return rows


def build_rows(r: Results, plan: Plan) -> list[Row]:
    return (lateness_rows(r) + status_rows(r) + cpu_rows(r, plan)
            + memory_rows(r) + download_rows(r) + paced_rows(r)
            + startup_rows(r))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench", description=__doc__.split(
        "\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="60 s windows and fewer samples")
    parser.add_argument("--only", default="",
                        help="comma-separated subset of: " + ",".join(SECTIONS))
    parser.add_argument("--keep", action="store_true",
                        help="keep the work directory (klippy logs)")
    parser.add_argument("--out", help="also write the report to this file")
    parser.add_argument("--cpu-budget", type=float, default=0., metavar="P",
                        help="also measure each klippy confined to P %% of"
                        " one core (5 ms periods; a cgroup, needs root)")
    args = parser.parse_args(argv)
    only = set(filter(None, args.only.split(","))) or None
    if only and only - set(SECTIONS):
        parser.error("unknown section(s): %s" % ", ".join(only - set(SECTIONS)))
    plan = Plan.make(args.quick)
    before = machine()
    started = time.monotonic()
    bed = Bed(keep=args.keep)
    say("work directory %s" % (bed.root,))
    passes: list[tuple[str, Results, dict]] = []
    try:
        results = Bench(bed, plan, only).run()
        passes.append(("unconstrained", results, {}))
        if args.cpu_budget:
            try:
                label = bed.constrain(args.cpu_budget)
            except BudgetError as e:
                parser.error(str(e))
            say("CPU budget: %s" % (label,))
            results = Bench(bed, plan, only, tag="cpu").run()
            passes.append(("CPU budget: each klippy and its children "
                           + label, results, bed.throttled()))
    finally:
        bed.close()
    after = machine()
    minutes = (time.monotonic() - started) / 60.
    lines = [
        "polar_cloud bench, %s run, %s, %.0f min" % (
            "quick" if plan.quick else "full", time.strftime("%Y-%m-%d"),
            minutes),
        "machine: %d cores, %s, Python %s, klippy %s flavour; load average"
        " %s before, %s after" % (before["nproc"], before["cpu"],
                                  platform.python_version(), "klipper",
                                  before["load"], after["load"]),
    ]
    for label, results, throttled in passes:
        lines += ["", "### " + label if len(passes) > 1 else "", "",
                  report.table(build_rows(results, plan))]
        notes = list(results.notes)
        for who, (periods, seconds) in sorted(throttled.items()):
            notes.append("%s klippy's cgroup: throttled in %d periods, %.1f s"
                         " in all" % (who, periods, seconds))
        if notes:
            lines += [""] + ["- " + n for n in notes]
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
