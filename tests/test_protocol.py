"""The pure protocol layer: message shapes, status mapping, validation."""
import pytest
from hypothesis import given
from hypothesis import strategies as st

from klippy_extras.polar_cloud import protocol as p


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
    ({}, p.JobView("j1", "downloading"), p.PREPARING),
    ({"print_state": "printing", "filename": "j.gcode",
      "print_duration": 0.}, p.JobView("j1", "printing", "j.gcode"),
     p.PREPARING),
    ({"print_state": "printing", "filename": "j.gcode",
      "print_duration": 5.}, p.JobView("j1", "printing", "j.gcode"),
     p.PRINTING),
    ({"print_state": "paused", "filename": "j.gcode", "print_duration": 5.},
     p.JobView("j1", "printing", "j.gcode"), p.PAUSED),
    ({"print_state": "printing", "filename": "j.gcode"},
     p.JobView("j1", "cancelling", "j.gcode"), p.CANCELLING),
    ({"print_state": "complete", "filename": "j.gcode"},
     p.JobView("j1", "done", "j.gcode", p.COMPLETE), p.COMPLETE),
    # A local print while a cloud job record lingers is still local
    ({"print_state": "printing", "filename": "other.gcode"},
     p.JobView("j1", "printing", "j.gcode"), p.SERIAL),
    # ... also while the finished job's final reports are still going out
    ({"print_state": "printing", "filename": "other.gcode"},
     p.JobView("j1", "done", "j.gcode", p.IDLE), p.SERIAL),
])
def test_status_code(kw, job, code):
    assert p.status_code(snap(**kw), job) == code


RUNOUT = {"runout": (False, True)}
PAUSED_JOB = {"print_state": "paused", "filename": "j.gcode",
              "print_duration": 5.}
CLOUD_JOB = p.JobView("j1", "printing", "j.gcode")


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
    assert p.status_code(s, job) == code
    assert p.status_job_id(s, job, code) == ("j1" if job else "123")


@pytest.mark.parametrize("kw,job,code", [
    ({}, None, p.CLEAR_PLATE),
    ({"print_state": "complete", "filename": "a.gcode"}, None,
     p.CLEAR_PLATE),
    # a cancelled cloud job's final reports: 15 instead of 0
    ({"print_state": "cancelled", "filename": "j.gcode"},
     p.JobView("j1", "done", "j.gcode", p.IDLE), p.CLEAR_PLATE),
    # 7 is still reported for a completed job, and prints go on as usual
    ({"print_state": "complete", "filename": "j.gcode"},
     p.JobView("j1", "done", "j.gcode", p.COMPLETE), p.COMPLETE),
    ({"print_state": "printing", "filename": "a.gcode"}, None, p.SERIAL),
    ({"klippy_state": "shutdown"}, None, p.ERROR),
])
def test_uncleared_plate(kw, job, code):
    s = snap(**kw)
    assert p.status_code(s, job, plate_clear=False) == code
    assert p.status_code(s, job) == (p.IDLE if code == p.CLEAR_PLATE
                                     else code)
    if code == p.CLEAR_PLATE:
        assert p.status_job_id(s, job, code) == p.NO_JOB_ID
        msg = p.build_status("KL000001", s, code, p.NO_JOB_ID)
        assert msg["progress"] == "Clear the build plate"


def test_build_status_of_a_filament_pause():
    s = snap(**dict(PAUSED_JOB, progress=.5, filament_sensors=RUNOUT))
    msg = p.build_status("KL000001", s, p.CHANGING_FILAMENT, "j1")
    assert msg["status"] == 10 and msg["progressDetail"] == "Paused: 50.0%"
    assert msg["printSeconds"] == 5


def test_build_status_types_and_times():
    s = snap(print_state="printing", filename="a.gcode", print_duration=100.,
             total_duration=130., filament_used=1234.7, progress=.25,
             file_position=250, file_size=1000)
    msg = p.build_status("KL000001", s, p.SERIAL, p.LOCAL_JOB_ID)
    assert msg["status"] == 1 and isinstance(msg["status"], int)
    assert msg["jobId"] == "123"
    assert msg["estimatedTime"] == 400          # 100 s for 25 %
    assert msg["printSeconds"] == 100 and msg["filamentUsed"] == 1234
    assert msg["bytesRead"] == 250 and msg["fileSize"] == 1000
    assert msg["startTime"] == "2023-11-14T22:11:10Z"
    assert msg["tool0"] == 20.0 and msg["targetBed"] == 60.0
    assert msg["progressDetail"] == "Printing: 25.0%"
    # The slicer's estimate wins over the extrapolation
    assert p.build_status("KL1", s, p.SERIAL, "123", 5000.)[
        "estimatedTime"] == 5000
    idle = p.build_status("KL1", snap(), p.IDLE, p.NO_JOB_ID)
    assert "startTime" not in idle and idle["jobId"] == "0"


def test_transform_bits():
    assert p.transform_bits(False, False, 0) == 0
    assert p.transform_bits(True, False, 0) == 1
    assert p.transform_bits(False, True, 0) == 2
    assert p.transform_bits(False, False, 90) == 4
    assert p.transform_bits(False, False, 180) == 3
    assert p.transform_bits(False, False, 270) == 7


@pytest.mark.parametrize("reply,ok,reason,terminal", [
    ({"status": "SUCCESS", "reason": "SUCCESS", "serialNumber": "KL000001"},
     True, "", False),
    # Protocol 11.1: reason missing but a serial present is a success
    ({"status": "SUCCESS", "serialNumber": "KL000001"}, True, "", False),
    ("SUCCESS", False, "NO_SERIAL", False),
    ({"status": "SUCCESS"}, False, "NO_SERIAL", False),
    ({"status": "FAILED", "reason": "EMAIL_PIN_ERROR"}, False,
     "EMAIL_PIN_ERROR", True),
    ({"status": "FAILED", "reason": "FORBIDDEN"}, False, "FORBIDDEN", True),
    ({"status": "FAILED", "reason": "MFG_UNKNOWN"}, False, "MFG_UNKNOWN",
     True),
    ({"status": "FAILED", "reason": "INVALID_KEY"}, False, "INVALID_KEY",
     True),
    ({"status": "FAILED", "reason": "SERVER_ERROR"}, False, "SERVER_ERROR",
     False),
    ({"status": "FAILED", "serialNumber": "KL1"}, False, "FAILED", False),
    ([1, 2], False, "MALFORMED", False),
])
def test_register_response(reply, ok, reason, terminal):
    r = p.parse_register_response(reply)
    assert (r.ok, r.reason, r.terminal) == (ok, reason, terminal)
    if not ok:
        assert r.message


def test_hello_response():
    assert p.parse_hello_response({"status": "SUCCESS"}) == ("SUCCESS", "")
    assert p.parse_hello_response({"status": "DELETED"})[0] == "DELETED"
    assert p.parse_hello_response(
        {"status": "FAILED", "message": "Printer has been deleted"})[0] \
        == "DELETED"
    assert p.parse_hello_response({"status": "FAILED", "message": "x"}) \
        == ("FAILED", "x")
    assert p.parse_hello_response(None)[0] == "FAILED"


def test_parse_print():
    r = p.parse_print({"serialNumber": "KL1", "jobId": "abc-1",
                       "jobName": "Benchy", "gcodeFile": "https://x/y.gcode"},
                      "KL1")
    assert (r.job_id, r.kind, r.url) == ("abc-1", "gcodeFile",
                                         "https://x/y.gcode")
    assert p.parse_print({"jobId": 77, "stlFile": "https://x/y.stl"},
                         "KL1").kind == "stlFile"
    for bad in ({"jobId": "../../x"}, {"jobId": ""}, {"jobId": "a/b"},
                {"jobId": "x" * 65}, {"jobId": True}, [],
                {"jobId": "a", "serialNumber": "KL2"},
                {"jobId": "a", "fileToPrint": "other"},
                {"jobId": "a", "gcodeFile": 5}):
        with pytest.raises(p.ProtocolError):
            p.parse_print(bad, "KL1")


def test_parse_temperature():
    assert p.parse_temperature({"tool0": 200, "bed": "60", "x": 1}, None) == {
        "tool0": 200., "bed": 60.}
    for bad in ({"tool0": "200\nM112"}, {"tool0": "abc"}, {"bed": True},
                {"tool0": float("nan")}, {}, {"serialNumber": "KL1"}):
        with pytest.raises(p.ProtocolError):
            p.parse_temperature(bad, None)


def test_validate_credentials():
    assert p.validate_email("a@b.co") is None
    assert p.validate_email("a@b") and p.validate_email("") \
        and p.validate_email("a;b@c.d")
    assert p.validate_pin("1234") is None
    assert p.validate_pin("") and p.validate_pin("12 34") \
        and p.validate_pin("1;2")
    assert p.redact_email("someone@example.com") == "s***@example.com"


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda inner: st.lists(inner) | st.dictionaries(st.text(), inner),
    max_leaves=20)


@given(json_values)
def test_inbound_parsers_never_crash(data):
    """Whatever the cloud sends, parsers return or raise ProtocolError."""
    for parse in (p.parse_welcome, lambda d: p.parse_print(d, "KL1"),
                  lambda d: p.parse_temperature(d, "KL1")):
        try:
            parse(data)
        except p.ProtocolError:
            pass
    p.parse_register_response(data)
    p.parse_hello_response(data)
    p.parse_status_reply(data, "x")


def test_clock_problem():
    assert p.clock_problem(978307200.) == (
        "the system clock is not set (2001-01-01); waiting for NTP")
    assert p.clock_problem(0.).startswith(
        "the system clock is not set (1970-01-01)")
    assert p.clock_problem(1795000000.) == ""
