"""klippy's own life cycle against the cloud session, in a real klippy on
the simulated MCU against the local Polar Cloud.  R-numbers refer to the
acceptance list in docs/testing.md.

- RESTART and FIRMWARE_RESTART in a loop, connected and while the cloud
  refuses connections (R20): exactly one live session, threads and file
  descriptors of the klippy process back to the baseline.
- RESTART during a download and during a registration (R21).
- An MCU shutdown mid-print (R22), commands during a print (R25).
- The final job report across a restart and a drop right after it was
  sent (R31).
"""
from __future__ import annotations

import os
import re
import threading
import time

import pytest

from tests.testbed.gcode_files import demo_print
from tests.testbed.helpers import (
    EMAIL,
    PIN,
    StateHistory,
    children_running,
    fd_kinds,
    fd_targets,
    final_reports,
    health_problems,
    log_size,
    polar_lines,
    poll_until,
    proc_stats,
    process_table,
    runs,
    send_marker,
    settle,
    thread_names,
    wait_online_again,
)
from tests.testbed.klippy import REPO, KlippyError

RESTARTS = {"ci": (10, 5), "full": (50, 20)}


@pytest.fixture(scope="module")
def k(online_klippy):
    return online_klippy()


@pytest.fixture(scope="module")
def plain(make_klippy):
    """The same printer without [polar_cloud]: klippy's own fds per
    restart, measured in the same run."""
    return make_klippy("klipper")


def klippy_pipes_per_restart(plain, restarts: int, firmware: int) -> int:
    """How many pipe fds klippy without the module gains over the same
    restarts (it keeps some per restart)."""
    before = fd_kinds(plain.pid).get("pipe", 0)
    for i in range(restarts + firmware):
        plain.restart(firmware=i >= restarts)
    return fd_kinds(plain.pid).get("pipe", 0) - before


@pytest.fixture(autouse=True)
def clean(sim):
    sim.clear_faults()
    yield
    sim.clear_faults()


def print_stall(k) -> int:
    stats = re.findall(r"print_stall=(\d+)", k.log_text())
    return int(stats[-1]) if stats else 0


# ------------------------------------------------------- restarts (R20)

def restart_loop(k, sim, restarts, firmware_restarts, reconnecting):
    serial = k.serial
    wait_online_again(k, sim)
    base = settle(k.pid, proc_stats(k.pid), timeout=5., fds=False)
    base_fds = fd_kinds(k.pid)
    if reconnecting:
        sim.set_fault("refuse_connections", "503")
    counts = []
    for i in range(restarts + firmware_restarts):
        hellos = sim.connects(serial)
        k.restart(firmware=i >= restarts)
        mark = k.hist.mark() - 1
        if reconnecting:
            # The new session meets the refusing cloud, and backs off
            k.hist.wait_for(lambda st: st["state"] == "backoff", since=mark)
            assert sim.live_sessions(serial) == 0
        else:
            k.hist.wait_for(lambda st: st["state"] == "online", since=mark)
            sim.wait_until(lambda: sim.live_sessions(serial) == 1,
                           timeout=30)
            # exactly one new hello per restart
            assert sim.connects(serial) == hellos + 1
        counts.append(proc_stats(k.pid))
    sim.set_fault("refuse_connections", False)
    wait_online_again(k, sim)
    end = settle(k.pid, base, tolerance=1, timeout=30., fds=False)
    return base, end, counts, base_fds, fd_kinds(k.pid)


@pytest.mark.parametrize("reconnecting", [False, True],
                         ids=["connected", "reconnecting"])
@pytest.mark.parametrize("size", [
    "ci", pytest.param("full", marks=pytest.mark.slow)])
def test_restarts_leave_one_session_and_no_leaks(k, sim, plain, size,
                                                 reconnecting):
    log_at = log_size(k)
    restarts, firmware = RESTARTS[size]
    if reconnecting and size == "ci":
        restarts, firmware = 5, 3
    base, end, counts, fds0, fds1 = restart_loop(k, sim, restarts,
                                                 firmware, reconnecting)
    names = thread_names(k.pid)
    assert abs(end.threads - base.threads) <= 1, (base, end, names)
    # Sockets and files are back where they were.  klippy itself keeps
    # some pipes per restart: compare with the same klippy without
    # polar_cloud over the same restarts.  polar_cloud's own pipes are
    # those of its short-lived key helper (at most one running: three
    # pipes); a leak of ours, per restart, would exceed that
    own = klippy_pipes_per_restart(plain, restarts, firmware)
    assert abs(fds1.get("socket", 0) - fds0.get("socket", 0)) <= 1, (
        fds0, fds1)
    assert fds1.get("file", 0) <= fds0.get("file", 0) + 1, (fds0, fds1)
    assert fds1.get("pipe", 0) - fds0.get("pipe", 0) <= own + 6, (
        fds0, fds1, own)
    # Memory: the loop itself does not grow klippy (generous: allocator)
    assert end.rss_kb - base.rss_kb < 10 * 1024, (base, end)
    assert max(c.threads for c in counts) <= base.threads + 3, counts
    assert sim.live_sessions(k.serial) == 1
    assert health_problems(k, log_at) == []
    assert sim.violations == []
    print("restart loop %s: %d+%d restarts, %s -> %s, fds %s -> %s" % (
        "reconnecting" if reconnecting else "connected", restarts, firmware,
        base, end, fds0, fds1))


@pytest.mark.slow
def test_restart_while_the_connect_hangs(k, sim):
    """RESTART while the session thread is stuck in a connect
    (the cloud accepts TCP but never answers the WebSocket handshake; the
    connect gives up after 20 s).  klippy restarts at once, the old thread
    ends by itself, and exactly one session comes back."""
    wait_online_again(k, sim)
    base = settle(k.pid, proc_stats(k.pid), timeout=5., fds=False)
    sim.set_fault("black_hole", "http")
    t0 = sim.now()
    sim.drop(k.serial, "reset")
    sim.wait_until(lambda: sim.connection_attempts(
        since=t0, outcome="black_hole_http"), timeout=30)
    k.restart()
    sim.set_fault("black_hole", False)
    sim.drop_all("reset")
    wait_online_again(k, sim)
    end = settle(k.pid, base, tolerance=1, timeout=60., fds=False)
    assert abs(end.threads - base.threads) <= 1, (base, end,
                                                  thread_names(k.pid))
    assert sim.live_sessions(k.serial) == 1
    assert "still busy; it will end by itself" in k.log_text()
    assert health_problems(k) == []


# ------------------------------------------- restart mid-way (R21)

def test_restart_during_a_download(k, sim):
    wait_online_again(k, sim)
    text = demo_print(moves=20000, hotend=0, bed=0).encode()
    url = sim.add_file("dl-restart.gcode", text, "slow", rate=32 * 1024)
    since = sim.now()
    sim.push_print(k.serial, "dl-restart", gcode_url=url)
    parts = []

    def partial():
        parts[:] = [f for f in os.listdir(k.gcodes_dir) if f.endswith(
            ".part")]
        return parts
    sim.wait_until(lambda: sim.file_requests("dl-restart.gcode") == 1)
    sim.wait_until(partial, timeout=30)
    k.restart()
    wait_online_again(k, sim)
    # The old instance deleted its temp file; the new one started nothing
    assert partial() == []
    assert not [f for f in os.listdir(k.gcodes_dir) if "dl-restart" in f]
    # The cloud hears the job ended (it cannot resume), exactly once
    final = sim.wait_for("job", lambda d: d["jobId"] == "dl-restart",
                         since=since, serial=k.serial, timeout=60)
    assert final["state"] == "canceled"
    # ...and a re-sent print is a duplicate: still nothing downloads
    sim.push_print(k.serial, "dl-restart", gcode_url=url)
    marker = sim.add_file("dl-marker.gcode", b"", "404")
    t = sim.now()
    sim.push_print(k.serial, "dl-marker", gcode_url=marker)
    sim.wait_for("job", lambda d: d["jobId"] == "dl-marker", since=t,
                 serial=k.serial, timeout=60)
    assert sim.file_requests("dl-restart.gcode") == 1
    assert len(final_reports(sim, k, "dl-restart")) == 1
    assert k.query("print_stats")["print_stats"]["state"] != "printing"
    st = k.query("polar_cloud")["polar_cloud"]
    assert st["status_code"] == 0, st
    assert sim.violations == []


DOWNLOAD_THREADS = "polar_cloud-dow"     # /proc cuts names at 15 chars


def download_children(k) -> list[int]:
    return children_running(k.pid, "fetcher.py")


def download_leftovers(k) -> list[str]:
    """What a download holds: klippy's download thread, its child, and a
    .part file, open (by klippy or the child) or on disk."""
    children = download_children(k)
    return ([n for n in thread_names(k.pid) if n.startswith(DOWNLOAD_THREADS)]
            + ["child %d" % (pid,) for pid in children]
            + [t for pid in [k.pid] + children for t in fd_targets(pid)
               if ".part" in t]
            + [f for f in os.listdir(k.gcodes_dir) if f.endswith(".part")])


def child_part_files(k) -> list[str]:
    return [t for pid in download_children(k) for t in fd_targets(pid)
            if ".part" in t]


def start_dripping_job(k, sim, job_id: str) -> float:
    """A job whose file server sends one byte a second; returns once the
    download is under way (the download child has its .part file open)."""
    text = demo_print(moves=200, hotend=0, bed=0).encode()
    url = sim.add_file(job_id + ".gcode", text, "slow", rate=1)
    since = sim.now()
    sim.push_print(k.serial, job_id, gcode_url=url)
    poll_until(lambda: child_part_files(k), 30, "an open .part file")
    return since


@pytest.mark.parametrize("end_by", ["cancel", "restart"])
def test_a_dripping_download_ends_at_once(k, sim, end_by):
    """A file server that sends one byte a second: a cloud cancel, or a
    RESTART, ends the download at once: its child is killed, and no
    thread, socket or .part file stays; the cloud hears one 'canceled'."""
    wait_online_again(k, sim)
    sockets = fd_kinds(k.pid).get("socket", 0)
    job_id = "drip-" + end_by
    since = start_dripping_job(k, sim, job_id)
    # The connection is the child's; klippy's process has none for it
    [child] = download_children(k)
    assert fd_kinds(child).get("socket", 0) >= 1
    started = time.monotonic()
    if end_by == "cancel":
        sim.cancel(k.serial)
    else:
        k.restart()
    poll_until(lambda: not download_leftovers(k), 30,
               "the download to end")
    took = time.monotonic() - started
    final = sim.wait_for("job", lambda d: d["jobId"] == job_id, since=since,
                         serial=k.serial, timeout=60)
    assert final["state"] == "canceled"
    wait_online_again(k, sim)
    send_marker(sim, k.serial, "marker-" + job_id)
    assert len(final_reports(sim, k, job_id)) == 1
    assert sim.file_requests(job_id + ".gcode") == 1
    poll_until(lambda: fd_kinds(k.pid).get("socket", 0) <= sockets, 30,
               "the download's socket closed")
    assert k.query("print_stats")["print_stats"]["state"] != "printing"
    assert sim.violations == []
    print("%s ended a 1 byte/s download in %.2f s" % (end_by, took))


def test_restart_during_registration_keeps_one_key(polar_klippy, sim):
    k = polar_klippy("klipper")
    state = k.workdir / "polar_cloud"
    hist = StateHistory.attach(k)
    sim.set_fault("no_register_response", True)
    t0 = sim.now()
    k.gcode("POLAR_REGISTER EMAIL=%s PIN=%s" % (EMAIL, PIN))
    hist.wait_for(lambda st: st["state"] == "registering", since=0)
    k.restart()
    sim.set_fault("no_register_response", False)
    st = hist.wait_for(lambda s: s["state"] == "unregistered",
                       since=hist.mark() - 1)
    assert not st["registered"]
    key_before = (state / "key.pem").read_bytes()
    out = k.subscribe_output()
    k.gcode("POLAR_REGISTER EMAIL=%s PIN=%s" % (EMAIL, PIN))
    out.wait_for(r"registered, serial number \w+", timeout=90)
    out.close()
    hist.wait_for(lambda s: s["state"] == "online")
    regs = sim.received("register", since=t0)
    assert len(regs) == 2
    assert regs[0]["publicKey"] == regs[1]["publicKey"]
    assert (state / "key.pem").read_bytes() == key_before
    assert sorted(os.listdir(state)) in (
        ["identity.json", "key.pem"],
        ["identity.json", "job.json", "key.pem"],
        ["identity.json", "job.json", "key.pem", "outbox.json"])
    assert sim.violations == []
    k.stop()


# ---------------------------------------------- shutdown mid-print (R22)

def test_mcu_shutdown_mid_print(k, sim):
    wait_online_again(k, sim)
    text = demo_print(moves=2000, hotend=0, bed=0, feedrate=1200)
    url = sim.add_file("sd-1.gcode", text.encode())
    since = sim.now()
    sim.push_print(k.serial, "sd-1", gcode_url=url)
    sim.wait_for("status", lambda d: d["status"] == 3, since=since,
                 serial=k.serial, timeout=60)
    log_at = log_size(k)
    t = sim.now()
    k.mcu.shutdown("Timer too close")
    try:
        k.wait_state("shutdown")
        err = sim.wait_for("status", lambda d: d["status"] == 12, since=t,
                           serial=k.serial, timeout=30)
        assert err["progressDetail"]
        final = sim.wait_for("job", lambda d: d["jobId"] == "sd-1",
                             since=since, serial=k.serial, timeout=30)
        assert final["state"] == "canceled"
        # Cloud commands are refused while shut down; a marker job after
        # them shows they were all handled
        other = sim.add_file("sd-2.gcode", text.encode())
        t = sim.now()
        sim.push_print(k.serial, "sd-2", gcode_url=other)
        sim.resume(k.serial)
        sim.temperature(k.serial, bed=60)
        sim.push_print(k.serial, "sd-3", gcode_url=other)
        refused = sim.wait_for("job", lambda d: d["jobId"] == "sd-2",
                               since=t, serial=k.serial, timeout=30)
        assert refused["state"] == "canceled"
        sim.wait_for("job", lambda d: d["jobId"] == "sd-3", since=t,
                     serial=k.serial, timeout=30)
        assert sim.file_requests("sd-2.gcode") == 0
        lines = polar_lines(k, log_at)
        assert any("resume ignored: printer is not ready" in line
                   for line in lines), lines
        assert any("temperature: refused, printer not ready" in line
                   for line in lines), lines
        # No flood while shut down: a handful of lines in all
        assert len(lines) <= 12, lines
        assert k.query("heater_bed")["heater_bed"]["target"] == 0.
    finally:
        hellos = sim.connects(k.serial)
        t = sim.now()
        k.restart(firmware=True)
    wait_online_again(k, sim)
    sim.wait_for("status", lambda d: d["status"] == 0, since=t,
                 serial=k.serial, timeout=30)
    assert sim.connects(k.serial) == hellos + 1
    assert len(final_reports(sim, k, "sd-1")) == 1
    assert sim.violations == []


# ------------------------------------------- commands during a print (R25)

def test_commands_answer_during_a_print(k, sim):
    wait_online_again(k, sim)
    log_at = log_size(k)
    k.write_gcode("r25.gcode", demo_print(moves=120, hotend=0, bed=0,
                                          feedrate=1500))
    sub = k.subscribe_objects({"print_stats": ["state", "print_duration"]})
    k.gcode("SDCARD_PRINT_FILE FILENAME=r25.gcode")
    sub.wait_for(lambda s: s["print_stats"]["print_duration"] > 0)
    stall = print_stall(k)
    out = k.subscribe_output()
    durations = []
    for _ in range(10):
        k.gcode("POLAR_STATUS")
        with pytest.raises(KlippyError, match="already registered"):
            k.gcode("POLAR_REGISTER EMAIL=%s PIN=%s" % (EMAIL, PIN))
        k.call("polar_cloud/status")
        durations.append(k.query("print_stats")["print_stats"][
            "print_duration"])
    assert len([line for line in out.lines
                if line.startswith("// Polar Cloud: online")]) == 10
    out.close()
    # The print kept going all along, without stalls
    assert durations == sorted(durations) and durations[-1] > durations[0]
    sub.wait_for(lambda s: s["print_stats"]["state"] == "complete",
                 timeout=120)
    sub.close()
    assert print_stall(k) == stall
    assert health_problems(k, log_at) == []


# ----------------------------------------------- lost completion (R31)

def test_report_survives_a_restart_right_after_completion(k, sim):
    wait_online_again(k, sim)
    text = demo_print(moves=60, hotend=0, bed=0, feedrate=3000)
    url = sim.add_file("r31-restart.gcode", text.encode())
    since = sim.now()
    sub = k.subscribe_objects({"print_stats": ["state", "filename"]})
    sim.push_print(k.serial, "r31-restart", gcode_url=url)
    # RESTART the moment klippy says the print is complete, before the
    # session's next look at the printer
    sub.wait_for(lambda s: s["print_stats"]["state"] == "complete"
                 and "r31-restart" in s["print_stats"]["filename"],
                 timeout=120)
    k.restart()
    sub.close()
    wait_online_again(k, sim)
    final = sim.wait_for("job", lambda d: d["jobId"] == "r31-restart",
                         since=since, serial=k.serial, timeout=60)
    assert final["state"] == "completed"
    # Settled: a further restart and a later job bring no repeat
    k.restart()
    wait_online_again(k, sim)
    send_marker(sim, k.serial, "r31-restart-marker")
    assert len(final_reports(sim, k, "r31-restart")) == 1
    assert sim.violations == []


def test_report_survives_a_drop_right_after_it_was_received(k, sim):
    """The cloud got the report and the link dies at once, before the
    cloud's Socket.IO ack can reach the printer.  The printer cannot know
    the report arrived and sends it again after the reconnect: at least
    once, never lost, never altered.  (Lost in flight before the cloud got
    it, it arrives exactly once: tests/klippy/test_network_faults.py.)"""
    wait_online_again(k, sim)
    text = demo_print(moves=60, hotend=0, bed=0, feedrate=3000)
    url = sim.add_file("r31-drop.gcode", text.encode())
    since = sim.now()
    dropped = threading.Event()

    def drop_on_report():
        sim.wait_for("job", lambda d: d["jobId"] == "r31-drop", since=since,
                     serial=k.serial, timeout=120)
        sim.drop(k.serial, "reset")
        dropped.set()
    watcher = threading.Thread(target=drop_on_report, daemon=True)
    watcher.start()
    mark = k.hist.mark()
    sim.push_print(k.serial, "r31-drop", gcode_url=url)
    watcher.join(150)
    assert dropped.is_set()
    lost = k.hist.wait_index(lambda st: st["state"] != "online", since=mark)
    k.hist.wait_for(lambda st: st["state"] == "online", since=lost)
    send_marker(sim, k.serial, "r31-drop-marker")
    reports = final_reports(sim, k, "r31-drop")
    assert 1 <= len(reports) <= 2, reports
    assert all(r == reports[0] for r in reports)
    assert reports[0]["state"] == "completed"
    # The only thing the cloud may have noticed is that very repeat
    assert [v for v in sim.violations
            if "second terminal report for jobId 'r31-drop'" not in v] == []


# ------------------------------------------------- klippy stopped (R23)

HELPER_SCRIPTS = ("helperhost.py", "imaging.py", "keyhelper.py",
                  "fetcher.py")


def polar_children() -> list[str]:
    """This checkout's helper processes (the helper host and the key,
    image and download children it forks) that outlived their klippy:
    their parent is none of ours any more (not this test, not a klippy,
    not a helper host), they were reparented.  Other checkouts' tests on
    the same machine are not counted."""
    ours = os.path.join(str(REPO), "")
    procs = process_table()
    found = []
    for pid, proc in procs.items():
        if not any(arg.startswith(ours) and arg.endswith(HELPER_SCRIPTS)
                   for arg in proc.args):
            continue
        parent = procs.get(proc.ppid)
        if proc.ppid == os.getpid() or parent is not None and (
                runs(parent, "klippy.klippy") or runs(parent, "helperhost.py")):
            continue
        found.append("%d %s" % (pid, " ".join(proc.args)[:80]))
    return found


def test_stopping_klippy_leaves_nothing_behind(online_klippy, sim):
    """Moonraker's [power] (or systemctl) stops klippy, here right
    after a RESTART, while the new session starts (reads and checks its
    key, connects, signs): the cloud sees the printer go, and no process
    of ours outlives klippy."""
    k = online_klippy()
    assert polar_children() == []
    k.restart()
    pid = k.pid
    k.stop()
    assert not os.path.exists("/proc/%d/status" % (pid,))
    sim.wait_until(lambda: sim.live_sessions(k.serial) == 0, timeout=30)
    # A helper that was running ends with its pipe (nothing to wait on
    # but /proc itself)
    deadline = time.monotonic() + 30.
    while polar_children() and time.monotonic() < deadline:
        time.sleep(.1)
    assert polar_children() == []
