"""The printer's state as Polar Cloud status codes and the status message."""

import pytest

from klippy_extras.polar_cloud import cloud_status
from klippy_extras.polar_cloud import protocol as p
from tests.unit.fakes import HUGE, HUGE_INT, INF, NAN, assert_sendable


def snap(**kw):
    base = {"klippy_state": "ready", "print_state": "standby", "filename": "",
            "print_duration": 0., "total_duration": 0., "filament_used": 0.,
            "progress": 0., "file_position": 0, "file_size": 0,
            "wall_time": 1_700_000_000., "heaters": {
                "tool0": (20.04, 0.), "bed": (21.0, 60.)}}
    base.update(kw)
    return base


@pytest.mark.parametrize("kw,job,code", [
    ({}, None, p.IDLE),
    ({"klippy_state": "shutdown"}, None, p.ERROR),
    ({"klippy_state": "error"}, None, p.ERROR),
    ({"klippy_state": "startup"}, None, p.OFFLINE),
    ({"print_state": "printing", "filename": "a.gcode"}, None, p.SERIAL),
    ({"print_state": "paused", "filename": "a.gcode"}, None, p.PAUSED),
    ({"print_state": "complete", "filename": "a.gcode"}, None, p.IDLE),
    ({"print_state": "cancelled"}, None, p.IDLE),
    ({}, cloud_status.JobView("j1", "downloading"), p.PREPARING),
    ({"print_state": "printing", "filename": "j.gcode",
      "print_duration": 0.}, cloud_status.JobView("j1", "printing", "j.gcode"),
     p.PREPARING),
    ({"print_state": "printing", "filename": "j.gcode",
      "print_duration": 5.}, cloud_status.JobView("j1", "printing", "j.gcode"),
     p.PRINTING),
    ({"print_state": "paused", "filename": "j.gcode", "print_duration": 5.},
     cloud_status.JobView("j1", "printing", "j.gcode"), p.PAUSED),
    ({"print_state": "printing", "filename": "j.gcode"},
     cloud_status.JobView("j1", "cancelling", "j.gcode"), p.CANCELLING),
    ({"print_state": "complete", "filename": "j.gcode"},
     cloud_status.JobView("j1", "done", "j.gcode", p.COMPLETE), p.COMPLETE),
    # A local print while a cloud job record lingers is still local
    ({"print_state": "printing", "filename": "other.gcode"},
     cloud_status.JobView("j1", "printing", "j.gcode"), p.SERIAL),
    # ... also while the finished job's final reports are still going out
    ({"print_state": "printing", "filename": "other.gcode"},
     cloud_status.JobView("j1", "done", "j.gcode", p.IDLE), p.SERIAL),
])
def test_status_code(kw, job, code):
    assert cloud_status.status_code(snap(**kw), job) == code


RUNOUT = {"runout": (False, True)}
PAUSED_JOB = {"print_state": "paused", "filename": "j.gcode",
              "print_duration": 5.}
CLOUD_JOB = cloud_status.JobView("j1", "printing", "j.gcode")


@pytest.mark.parametrize("kw,job,code", [
    # a filament sensor that sees none while paused: changing filament
    (dict(PAUSED_JOB, filament_sensors=RUNOUT), CLOUD_JOB,
     p.CHANGING_FILAMENT),
    (dict(PAUSED_JOB, filament_sensors=RUNOUT), None, p.CHANGING_FILAMENT),
    # a disabled sensor, or one that sees filament, says nothing
    (dict(PAUSED_JOB, filament_sensors={"runout": (False, False)}),
     CLOUD_JOB, p.PAUSED),
    (dict(PAUSED_JOB, filament_sensors={"runout": (True, True)}),
     CLOUD_JOB, p.PAUSED),
    # a pause remembered as a filament change (M600) stays one
    (dict(PAUSED_JOB, filament_pause="filament change (M600)"), CLOUD_JOB,
     p.CHANGING_FILAMENT),
    # the hotend was heated for the print and is off now: cold pause
    (dict(PAUSED_JOB, print_hotend_target=210.,
          heaters={"tool0": (150., 0.)}), CLOUD_JOB, p.COLD_PAUSED),
    (dict(PAUSED_JOB, print_hotend_target=210.,
          heaters={"tool0": (150., 0.)}), None, p.COLD_PAUSED),
    # still hot, or a print that never heated the hotend: a plain pause
    (dict(PAUSED_JOB, print_hotend_target=210.,
          heaters={"tool0": (210., 210.)}), CLOUD_JOB, p.PAUSED),
    (dict(PAUSED_JOB, print_hotend_target=0.,
          heaters={"tool0": (20., 0.)}), CLOUD_JOB, p.PAUSED),
    # a runout beats a cold hotend
    (dict(PAUSED_JOB, print_hotend_target=210., filament_sensors=RUNOUT,
          heaters={"tool0": (150., 0.)}), CLOUD_JOB, p.CHANGING_FILAMENT),
    # the sensors mean nothing while printing
    (dict(PAUSED_JOB, print_state="printing", filament_sensors=RUNOUT),
     CLOUD_JOB, p.PRINTING),
])
def test_pause_reasons(kw, job, code):
    s = snap(**kw)
    assert cloud_status.status_code(s, job) == code
    assert cloud_status.status_job_id(s, job, code) == ("j1" if job else "123")


@pytest.mark.parametrize("kw,job,code", [
    ({}, None, p.CLEAR_PLATE),
    ({"print_state": "complete", "filename": "a.gcode"}, None,
     p.CLEAR_PLATE),
    # a cancelled cloud job's final reports: 15 instead of 0
    ({"print_state": "cancelled", "filename": "j.gcode"},
     cloud_status.JobView("j1", "done", "j.gcode", p.IDLE), p.CLEAR_PLATE),
    # 7 is still reported for a completed job, and prints go on as usual
    ({"print_state": "complete", "filename": "j.gcode"},
     cloud_status.JobView("j1", "done", "j.gcode", p.COMPLETE), p.COMPLETE),
    ({"print_state": "printing", "filename": "a.gcode"}, None, p.SERIAL),
    ({"klippy_state": "shutdown"}, None, p.ERROR),
])
def test_uncleared_plate(kw, job, code):
    s = snap(**kw)
    assert cloud_status.status_code(s, job, plate_clear=False) == code
    assert cloud_status.status_code(s, job) == (p.IDLE if code == p.CLEAR_PLATE
                                     else code)
    if code == p.CLEAR_PLATE:
        assert cloud_status.status_job_id(s, job, code) == p.NO_JOB_ID
        msg = cloud_status.build_status("KL000001", s, code, p.NO_JOB_ID)
        assert msg["progress"] == "Clear the build plate"


def test_build_status_of_a_filament_pause():
    s = snap(**dict(PAUSED_JOB, progress=.5, filament_sensors=RUNOUT))
    msg = cloud_status.build_status("KL000001", s, p.CHANGING_FILAMENT, "j1")
    assert msg["status"] == 10 and msg["progressDetail"] == "Paused: 50.0%"
    assert msg["printSeconds"] == 5


def test_build_status_types_and_times():
    s = snap(print_state="printing", filename="a.gcode", print_duration=100.,
             total_duration=130., filament_used=1234.7, progress=.25,
             file_position=250, file_size=1000)
    msg = cloud_status.build_status("KL000001", s, p.SERIAL, p.LOCAL_JOB_ID)
    assert msg["status"] == 1 and isinstance(msg["status"], int)
    assert msg["jobId"] == "123"
    assert msg["estimatedTime"] == 400          # 100 s for 25 %
    assert msg["printSeconds"] == 100 and msg["filamentUsed"] == 1234
    assert msg["bytesRead"] == 250 and msg["fileSize"] == 1000
    assert msg["startTime"] == "2023-11-14T22:11:10Z"
    assert msg["tool0"] == 20.0 and msg["targetBed"] == 60.0
    assert msg["progressDetail"] == "Printing: 25.0%"
    # The slicer's estimate wins over the extrapolation
    assert cloud_status.build_status("KL1", s, p.SERIAL, "123", 5000.)[
        "estimatedTime"] == 5000
    idle = cloud_status.build_status("KL1", snap(), p.IDLE, p.NO_JOB_ID)
    assert "startTime" not in idle and idle["jobId"] == "0"


@pytest.mark.parametrize("bad", [INF, -INF, NAN, HUGE, 1e300, HUGE_INT])
def test_build_status_survives_non_finite_numbers(bad):
    s = snap(print_state="printing", filename="a.gcode", print_duration=bad,
             total_duration=bad, filament_used=bad, progress=.5,
             file_position=bad, file_size=bad,
             heaters={"tool0": (bad, bad)})
    for code in (p.SERIAL, p.PRINTING, p.PAUSED, p.COMPLETE):
        msg = cloud_status.build_status("KL1", s, code, "123", slicer_estimate=bad)
        assert_sendable(msg)


@pytest.mark.parametrize("bad", [INF, NAN, HUGE, 1e300, -5., 0.])
def test_a_bad_slicer_estimate_is_ignored(bad):
    s = snap(print_state="printing", print_duration=100., progress=.25)
    assert cloud_status.estimate_total_time(s, bad) == 400
    assert cloud_status.build_status("KL1", s, p.SERIAL, "123", bad)[
        "estimatedTime"] == 400


@pytest.mark.parametrize("progress", [INF, NAN, -1., 7.])
def test_progress_is_a_fraction(progress):
    s = snap(print_state="printing", print_duration=100., progress=progress)
    msg = cloud_status.build_status("KL1", s, p.SERIAL, "123")
    assert_sendable(msg)
    assert msg["progressDetail"] in ("Printing: 0.0%", "Printing: 100.0%")
