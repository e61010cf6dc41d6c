"""Prints from Polar Cloud in a real klippy: download, start,
pause, resume, cancel, complete, exactly once, never lost."""
from __future__ import annotations

import math
import os

import pytest

from tests.testbed.gcode_files import demo_print, overflowing_numbers_print
from tests.testbed.helpers import (
    children_running,
    fd_targets,
    final_reports,
    polar_status,
    poll_until,
    tree_digest,
    wait_final,
    wait_objects,
    wait_polar,
    wait_status,
)

MACROS = """
[gcode_macro POLAR_TEST_MACRO]
gcode:
  M140 S41
"""


@pytest.fixture(scope="module")
def k(registered_klippy):
    return registered_klippy("klipper", extra_cfg=MACROS, max_job_size=1,
                             cloud_macros="POLAR_TEST_MACRO")


def gcode_files(k):
    return sorted(os.listdir(k.gcodes_dir))


def send_job(sim, k, job_id, text=None, mode="ok", name="Benchy", **kw):
    content = (text if text is not None else demo_print(
        moves=300, hotend=0, bed=0, feedrate=3000)).encode() \
        if not isinstance(text, bytes) else text
    url = sim.add_file("%s.gcode" % (job_id,), content, mode, **kw)
    since = sim.now()
    sim.push_print(k.serial, job_id, job_name=name, gcode_url=url)
    return since


def test_custom_command_list_sent_after_hello(k, sim):
    msg = sim.wait_for("customCommandList", serial=k.serial)
    assert msg["commandList"] == [{"label": "Polar Test Macro",
                                   "command": "macro/POLAR_TEST_MACRO"}]
    assert sim.received("capabilities", serial=k.serial)


def test_cloud_job_full_lifecycle(k, sim):
    since = send_job(sim, k, "job-1", name="../../config/printer.cfg")
    prep = wait_status(sim, k, since, lambda d: d["status"] == 2)
    assert prep["jobId"] == "job-1"
    printing = wait_status(sim, k, since, lambda d: d["status"] == 3)
    assert printing["jobId"] == "job-1" and printing["fileSize"] > 0
    assert printing["progressDetail"].startswith("Printing: ")
    # The file landed in the gcodes folder under a safe, readable name
    assert "config_printer.cfg_polar-job-1.gcode" in gcode_files(k)
    assert not [f for f in gcode_files(k) if f.endswith(".part")]
    assert polar_status(k)["job_id"] == "job-1"
    t = sim.now()
    sim.pause(k.serial)
    paused = wait_status(sim, k, t, lambda d: d["status"] == 4)
    assert paused["jobId"] == "job-1"
    assert k.query("pause_resume")["pause_resume"]["is_paused"]
    t = sim.now()
    sim.resume(k.serial)
    wait_status(sim, k, t, lambda d: d["status"] == 3)
    final = wait_final(sim, k, "job-1", since)
    assert final["state"] == "completed"
    assert isinstance(final["printSeconds"], int) and final["printSeconds"] > 0
    assert final["filamentUsed"] > 0
    complete = wait_status(sim, k, since, lambda d: d["status"] == 7)
    assert complete["jobId"] == "job-1"
    wait_status(sim, k, since, lambda d: d["status"] == 0
                and d["jobId"] == "0", timeout=90)
    assert len(final_reports(sim, k, "job-1")) == 1
    assert sim.violations == []


def numbers_in(msg):
    return [v for v in msg.values()
            if isinstance(v, (int, float)) and not isinstance(v, bool)]


def test_numbers_beyond_float_range_do_not_stop_reporting(k, sim):
    since = send_job(sim, k, "job-inf", text=overflowing_numbers_print())
    # Printing (3) rather than preparing: print_stats counts print time
    # once filament was used, so this status went out with it infinite
    printing = wait_status(sim, k, since, lambda d: d["status"] == 3)
    assert printing["jobId"] == "job-inf"
    final = wait_final(sim, k, "job-inf", since)
    wait_status(sim, k, since, lambda d: d["status"] == 0
                and d["jobId"] == "0", timeout=90)
    # Klipper counted infinite filament, the cloud was told finite numbers
    assert k.query("print_stats")["print_stats"]["filament_used"] \
        == math.inf
    assert len(final_reports(sim, k, "job-inf")) == 1
    assert final["state"] == "completed"
    for msg in sim.received("status", serial=k.serial, since=since) \
            + [final]:
        assert all(math.isfinite(v) for v in numbers_in(msg)), msg
    assert sim.violations == []


def test_duplicate_print_starts_once_and_busy_printer_refuses(k, sim):
    since = send_job(sim, k, "job-2")
    sim.push_print(k.serial, "job-2", job_name="Benchy",
                   gcode_url=sim.file_url("job-2.gcode"))
    sim.push_print(k.serial, "job-2", job_name="Benchy",
                   gcode_url=sim.file_url("job-2.gcode"))
    wait_status(sim, k, since, lambda d: d["status"] == 3)
    # Another job while this one prints is refused, and the cloud is told
    other = send_job(sim, k, "job-3")
    refused = wait_final(sim, k, "job-3", other)
    assert refused["state"] == "canceled"
    assert sim.file_requests("job-3.gcode") == 0
    # Cancel from the cloud: 6 while cancelling, then one canceled report
    t = sim.now()
    sim.cancel(k.serial)
    final = wait_final(sim, k, "job-2", since)
    assert final["state"] == "canceled"
    wait_status(sim, k, t, lambda d: d["status"] in (6, 0))
    assert k.query("print_stats")["print_stats"]["state"] == "cancelled"
    assert sim.file_requests("job-2.gcode") == 1
    assert len(final_reports(sim, k, "job-2")) == 1
    # The same job id again (as after a reconnect) starts nothing
    sim.push_print(k.serial, "job-2", job_name="Benchy",
                   gcode_url=sim.file_url("job-2.gcode"))
    marker = send_job(sim, k, "job-2b", mode="404")
    wait_final(sim, k, "job-2b", marker)
    assert sim.file_requests("job-2.gcode") == 1
    assert sim.violations == []


@pytest.mark.parametrize("job_id,content,mode,kw,reason", [
    ("bad-404", None, "404", {}, "HTTP 404"),
    ("bad-trunc", None, "truncate", {}, "interrupted"),
    ("bad-big", b"G28\n" + b"G1 X1 Y1\n" * 200000, "ok", {}, "max_job_size"),
    ("bad-big-nolen", b"G28\n" + b"G1 X1 Y1\n" * 200000, "no_length", {},
     "max_job_size"),
    ("bad-html", None, "html", {}, "HTML"),
    ("bad-bin", b"PK\x03\x04" + os.urandom(2000), "ok", {},
     "not a G-code file"),
    ("bad-elf", b"\x7fELF" + os.urandom(2000), "ok", {}, "not a G-code"),
    ("bad-empty", b"", "ok", {}, "empty"),
])
def test_failed_downloads_end_canceled_and_leave_nothing(
        k, sim, job_id, content, mode, kw, reason):
    before = gcode_files(k)
    out = k.subscribe_output()
    since = send_job(sim, k, job_id, text=content, mode=mode, **kw)
    final = wait_final(sim, k, job_id, since)
    line = out.wait_for(r"job %s failed: .*" % (job_id,))
    out.close()
    assert final["state"] == "canceled" and reason in line
    assert gcode_files(k) == before
    assert k.query("print_stats")["print_stats"]["state"] != "printing"
    wait_status(sim, k, since, lambda d: d["status"] == 0)


def test_stalled_download_times_out(k, sim):
    before = gcode_files(k)
    since = send_job(sim, k, "bad-stall", mode="stall")
    final = wait_final(sim, k, "bad-stall", since, timeout=120)
    assert final["state"] == "canceled"
    assert gcode_files(k) == before


def test_the_download_runs_in_a_child_not_in_klippy(k, sim):
    """Issue #14: a helper child downloads the job; klippy's process
    never opens the file it streams into; a cancel kills the child."""
    before = gcode_files(k)
    since = send_job(sim, k, "in-child", mode="stall")
    [child] = poll_until(lambda: children_running(k.pid, "fetcher.py"), 30,
                         "the download child")
    part = poll_until(lambda: [p for p in fd_targets(child)
                               if p.endswith(".part")], 30, "its part file")
    assert os.path.dirname(part[0]) == str(k.gcodes_dir)
    assert not [p for p in fd_targets(k.pid) if p.endswith(".part")]
    sim.cancel(k.serial)
    final = wait_final(sim, k, "in-child", since)
    assert final["state"] == "canceled"
    poll_until(lambda: not children_running(k.pid, "fetcher.py"), 30,
               "the child killed")
    poll_until(lambda: gcode_files(k) == before, 30, "the part file gone")


@pytest.mark.parametrize("payload", [
    {"jobId": "../../etc/x", "gcodeFile": "http://127.0.0.1:1/x.gcode"},
    {"jobId": "a/b", "gcodeFile": "http://127.0.0.1:1/x.gcode"},
    {"jobId": "x" * 100, "gcodeFile": "http://127.0.0.1:1/x.gcode"},
    {"jobId": "x" * 129, "gcodeFile": "http://127.0.0.1:1/x.gcode"},
    {"jobId": None, "gcodeFile": "http://127.0.0.1:1/x.gcode"},
    {"jobId": "ok-1", "gcodeFile": "file:///etc/passwd"},
    {"jobId": "ok-2", "gcodeFile": "https://169.254.169.254/x.gcode"},
    {"jobId": "ok-3", "gcodeFile": "http://192.168.1.10/x.gcode"},
])
def test_hostile_jobs_create_nothing(k, sim, payload):
    config_before = tree_digest(k.config_dir)
    files_before = gcode_files(k)
    since = sim.now()
    sim.push("print", dict(payload, serialNumber=k.serial), serial=k.serial)
    job_id = payload["jobId"]
    if isinstance(job_id, str) and len(job_id) <= 128:
        # Any readable id is answered, verbatim (the download fails)
        final = wait_final(sim, k, job_id, since)
        assert final["state"] == "canceled"
        assert len(final_reports(sim, k, job_id)) == 1
    else:
        # No id that can be answered to: dropped; prove it was handled by
        # sending a marker job after it (events are handled in order)
        marker_id = "marker-%d" % (len(sim.received("job")),)
        marker = send_job(sim, k, marker_id, mode="404")
        wait_final(sim, k, marker_id, marker)
        assert [j for j in sim.received("job", since=since)
                if j["jobId"] != marker_id] == []
    assert tree_digest(k.config_dir) == config_before
    assert gcode_files(k) == files_before
    assert not os.path.exists(os.path.join(k.workdir, "etc"))


def test_stl_job_is_refused_with_a_reason(k, sim):
    out = k.subscribe_output()
    since = sim.now()
    sim.push_print(k.serial, "stl-1", job_name="Model",
                   stl_url=sim.add_file("m.stl", b"solid x"),
                   config_url=sim.add_file("m.ini", b"x=1"))
    final = wait_final(sim, k, "stl-1", since)
    line = out.wait_for(r"job stl-1 refused: .*")
    out.close()
    assert final["state"] == "canceled"
    assert "slicing on the printer is not supported" in line


def test_temperature_is_clamped_and_validated(k, sim):
    sim.temperature(k.serial, tool0=999, bed=60)
    # Each heater is its own script (the latest target per heater wins):
    # wait for both; 999 is clamped to the extruder's max_temp
    st = wait_objects(k, {"extruder": ["target"], "heater_bed": [
        "target"]}, lambda s: s["heater_bed"]["target"] == 60.
        and s["extruder"]["target"] != 0.)
    assert st["extruder"]["target"] == 320.
    for bad in ({"tool0": "200\nM112"}, {"bed": "abc"}, {"bed": -5}):
        sim.push("temperature", dict(bad, serialNumber=k.serial),
                 serial=k.serial)
    sim.temperature(k.serial, tool0=0, bed=0)
    st = wait_objects(k, {"extruder": ["target"], "heater_bed": [
        "target"]}, lambda s: s["heater_bed"]["target"] == 0.
                             and s["extruder"]["target"] == 0.)
    assert k.info()["state"] == "ready"


def test_raw_gcode_is_refused_by_default(k, sim):
    sim.command(k.serial, "M140 S77")
    sim.temperature(k.serial, bed=33)
    # The temperature came after the command: once it shows, the command
    # has been handled, and it did not run
    wait_objects(k, {"heater_bed": ["target"]},
                 lambda s: s["heater_bed"]["target"] == 33.)
    assert "allow_raw_gcode is off" in k.log_text()
    sim.temperature(k.serial, bed=0)


def test_cloud_macro_button_runs_only_listed_macros(k, sim):
    sim.custom_command(k.serial, "macro/SAVE_CONFIG")
    sim.custom_command(k.serial, "macro/POLAR_TEST_MACRO")
    wait_objects(k, {"heater_bed": ["target"]},
                 lambda s: s["heater_bed"]["target"] == 41.)
    assert "refused, not a listed macro" in k.log_text()
    k.gcode("M140 S0")


def test_job_report_survives_a_connection_drop_at_completion(k, sim):
    since = send_job(sim, k, "drop-1", text=demo_print(
        moves=120, hotend=0, bed=0, feedrate=3000))
    wait_status(sim, k, since, lambda d: d["status"] == 3)
    sim.set_fault("refuse_connections", "503")
    try:
        sim.drop(k.serial)
        wait_polar(k, lambda s: s["state"] in ("backoff", "connecting"))
        wait_objects(k, {"print_stats": ["state"]},
                     lambda s: s["print_stats"]["state"] == "complete",
                     timeout=90)
        assert final_reports(sim, k, "drop-1") == []
    finally:
        sim.set_fault("refuse_connections", False)
    final = wait_final(sim, k, "drop-1", since, timeout=240)
    assert final["state"] == "completed"
    wait_status(sim, k, sim.now(), lambda d: d["status"] == 0, timeout=120)
    assert len(final_reports(sim, k, "drop-1")) == 1


def test_restart_mid_job_keeps_the_job_identity(k, sim):
    since = send_job(sim, k, "restart-1")
    wait_status(sim, k, since, lambda d: d["status"] == 3)
    k.restart()
    # klippy's RESTART ends the print; the cloud hears it, for this job
    final = wait_final(sim, k, "restart-1", since)
    assert final["state"] == "canceled"
    wait_status(sim, k, since, lambda d: d["status"] == 0)
    assert len(final_reports(sim, k, "restart-1")) == 1
    assert sim.violations == [], sim.violations


def test_delete_from_cloud_leaves_the_print_alone(k, sim):
    since = send_job(sim, k, "del-1")
    wait_status(sim, k, since, lambda d: d["status"] == 3)
    out = k.subscribe_output()
    sim.delete(k.serial)
    out.wait_for(r"was deleted in Polar Cloud")
    out.close()
    st = wait_polar(k, lambda s: s["state"] == "unregistered")
    assert not st["registered"]
    assert not (k.state_path / "key.pem").exists()
    assert k.query("print_stats")["print_stats"]["state"] == "printing"
    k.gcode("CANCEL_PRINT")

