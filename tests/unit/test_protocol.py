"""The pure protocol layer: message shapes, status mapping, validation."""
import math

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


INF, NAN = float("inf"), float("nan")
HUGE = float("9" * 309)         # what float() makes of 309 nines: inf
HUGE_INT = pytest.param(10 ** 400, id="huge-int")


def message_numbers(msg):
    return [v for v in msg.values()
            if isinstance(v, (int, float)) and not isinstance(v, bool)]


def assert_sendable(msg):
    for value in message_numbers(msg):
        assert math.isfinite(value) and abs(value) <= p.MAX_COUNT, msg


@pytest.mark.parametrize("bad", [INF, -INF, NAN, HUGE, 1e300, HUGE_INT])
def test_build_status_survives_non_finite_numbers(bad):
    s = snap(print_state="printing", filename="a.gcode", print_duration=bad,
             total_duration=bad, filament_used=bad, progress=.5,
             file_position=bad, file_size=bad,
             heaters={"tool0": (bad, bad)})
    for code in (p.SERIAL, p.PRINTING, p.PAUSED, p.COMPLETE):
        msg = p.build_status("KL1", s, code, "123", slicer_estimate=bad)
        assert_sendable(msg)


@pytest.mark.parametrize("bad", [INF, NAN, HUGE, 1e300, -5., 0.])
def test_a_bad_slicer_estimate_is_ignored(bad):
    s = snap(print_state="printing", print_duration=100., progress=.25)
    assert p.estimate_total_time(s, bad) == 400
    assert p.build_status("KL1", s, p.SERIAL, "123", bad)[
        "estimatedTime"] == 400


@pytest.mark.parametrize("progress", [INF, NAN, -1., 7.])
def test_progress_is_a_fraction(progress):
    s = snap(print_state="printing", print_duration=100., progress=progress)
    msg = p.build_status("KL1", s, p.SERIAL, "123")
    assert_sendable(msg)
    assert msg["progressDetail"] in ("Printing: 0.0%", "Printing: 100.0%")


@pytest.mark.parametrize("bad", [INF, -INF, NAN, HUGE, HUGE_INT])
def test_build_job_survives_non_finite_numbers(bad):
    msg = p.build_job("KL1", "j1", "completed", bad, bad)
    assert_sendable(msg)
    assert msg["state"] == "completed"
    big = p.build_job("KL1", "j1", "canceled", 1e300, 1e300)
    assert big["printSeconds"] == big["filamentUsed"] == p.MAX_COUNT


# transformImg as the OctoPrint client sends it: flipH 1, flipV 2, and its
# rotate90 (OctoPrint's 90 degrees counter-clockwise) 4.  Our rotation is
# clockwise, so 90 and 270 must not come out the other way round.
@pytest.mark.parametrize("flip_h,flip_v,rotation,bits", [
    (False, False, 0, 0), (True, False, 0, 1), (False, True, 0, 2),
    (True, True, 0, 3),
    (False, False, 90, 7), (True, False, 90, 6), (False, True, 90, 5),
    (True, True, 90, 4),
    (False, False, 180, 3), (True, False, 180, 2), (False, True, 180, 1),
    (True, True, 180, 0),
    (False, False, 270, 4), (True, False, 270, 5), (False, True, 270, 6),
    (True, True, 270, 7),
])
def test_transform_bits(flip_h, flip_v, rotation, bits):
    assert p.transform_bits(flip_h, flip_v, rotation) == bits
    # rotateImg as Polar's agent sends it: any rotation
    assert p.rotate_bit(rotation) == (1 if rotation else 0)


@pytest.mark.parametrize("rotation", [0, 90, 180, 270])
@pytest.mark.parametrize("flip_v", [False, True])
@pytest.mark.parametrize("flip_h", [False, True])
def test_transform_bits_describe_the_snapshot(flip_h, flip_v, rotation):
    """The view the bits ask for, applied the way the OctoPrint client
    applies them (flips, then Pillow's ROTATE_90, counter-clockwise), is
    the very picture imaging.py uploads."""
    Image = pytest.importorskip("PIL.Image")
    from klippy_extras.polar_cloud import imaging
    src = Image.new("L", (3, 2))
    src.putdata([1, 2, 3, 4, 5, 6])     # no symmetry: every view differs
    ours = imaging._transform(src, Image, imaging.Transform(
        flip_h, flip_v, rotation))
    bits = p.transform_bits(flip_h, flip_v, rotation)
    ops = Image.Transpose
    view = src
    if bits & 1:
        view = view.transpose(ops.FLIP_LEFT_RIGHT)
    if bits & 2:
        view = view.transpose(ops.FLIP_TOP_BOTTOM)
    if bits & 4:
        view = view.transpose(ops.ROTATE_90)
    assert (view.size, list(view.getdata())) == (ours.size,
                                                list(ours.getdata()))


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


FAKE_LINE = "// Klipper state: Ready"
BREAKS = ["\n", "\r", "\r\n", "\t", "\x00", "\x1b[2J", "\x7f", "\x85", "\x9b",
          "\u2028", "\u2029", "\u202e", "\ud800"]


@pytest.mark.parametrize("brk", BREAKS)
def test_cloud_text_is_one_clean_line(brk):
    text = p.cloud_text("refused" + brk + FAKE_LINE)
    assert text.startswith("refused") and text.endswith(FAKE_LINE)
    assert text.isprintable()


def test_cloud_text_is_bounded():
    assert p.cloud_text("x" * 10000) == "x" * 200
    assert p.cloud_text("x" * 100, limit=40) == "x" * 40
    assert p.cloud_text("  a \n\n b  ") == "a b"
    assert p.cloud_text(None) == "" and p.cloud_text(5) == ""


@given(st.text())
def test_cloud_text_never_breaks_a_line(value):
    text = p.cloud_text(value, limit=50)
    assert len(text) <= 50
    assert text.isprintable()


@pytest.mark.parametrize("brk", BREAKS)
def test_cloud_messages_are_one_line(brk):
    said = "Printer key mismatch" + brk + FAKE_LINE
    texts = [
        p.parse_hello_response({"status": "FAILED", "message": said})[1],
        p.parse_status_reply({"status": "FAILED", "message": said}, "x")[1],
        p.parse_register_response({"status": "FAILED", "reason": said}
                                  ).message,
        p.parse_register_response({"status": "FAILED", "reason": said}
                                  ).reason,
    ]
    for text in texts:
        assert "\n" not in text and "\r" not in text and text.isprintable()


@pytest.mark.parametrize("message", [
    "Printer key mismatch; the old key was deleted",
    "deleted", "Printer has been deleted; it was restored",
    "Printer has been deleted\nagain",
])
def test_failed_hello_mentioning_deleted_is_not_a_deletion(message):
    status, text = p.parse_hello_response({"status": "FAILED",
                                           "message": message})
    assert status == "FAILED" and text == p.cloud_text(message)


def test_parse_print():
    r = p.parse_print({"serialNumber": "KL1", "jobId": "abc-1",
                       "jobName": "Benchy", "gcodeFile": "https://x/y.gcode"},
                      "KL1")
    assert (r.job_id, r.kind, r.url, r.problem) == (
        "abc-1", "gcodeFile", "https://x/y.gcode", "")
    assert p.parse_print({"jobId": 77, "stlFile": "https://x/y.stl"},
                         "KL1").kind == "stlFile"
    # No id to answer to, or not for this printer: nothing to answer
    for bad in ({"jobId": ""}, {"jobId": " \t"}, {"jobId": "x" * 129},
                {"jobId": True}, {"jobId": None}, {}, {"jobId": [1]},
                {"jobId": float("inf")}, [], "print",
                {"jobId": "a", "serialNumber": "KL2"},
                {"jobId": "a", "serialNumber": 7}):
        with pytest.raises(p.ProtocolError):
            p.parse_print(bad, "KL1")


def test_values_with_a_trailing_newline_are_refused():
    assert not p.parse_register_response(
        {"status": "SUCCESS", "serialNumber": "KL000001\n"}).ok
    assert p.validate_email("a@b.co\n") and p.validate_pin("1234\n")
    with pytest.raises(p.ProtocolError):
        p.parse_temperature({"tool0\n": 200}, None)
    with pytest.raises(p.ProtocolError):
        p.parse_temperature({"tool0": "200\nM112"}, None)


@pytest.mark.parametrize("value,job_id", [
    ("abc-1", "abc-1"), ("job 7/ä", "job 7/ä"), ("../../x", "../../x"),
    ("a\nb", "a\nb"), ("x" * 128, "x" * 128), (77, "77"), (0, "0"),
    (12.0, "12"), (1.5, "1.5"), ("007", "007"), (" j ", " j "),
])
def test_job_id_is_read_leniently_and_kept_verbatim(value, job_id):
    assert p.read_job_id(value) == job_id
    r = p.parse_print({"jobId": value, "gcodeFile": "https://x/y.gcode"},
                      "KL1")
    assert r.job_id == job_id and r.problem == ""


@pytest.mark.parametrize("data,kind,url,problem,field", [
    # fileToPrint selects; a G-code URL prints even with STL and config
    ({"fileToPrint": "gcodeFile", "gcodeFile": "https://x/a.gcode",
      "stlFile": "https://x/a.stl", "configFile": "https://x/a.ini"},
     "gcodeFile", "https://x/a.gcode", "", ""),
    ({"fileToPrint": "stlFile", "gcodeFile": "https://x/a.gcode",
      "stlFile": "https://x/a.stl"}, "stlFile", "",
     "slicing on the printer is not supported (STL jobs)", "fileToPrint"),
    ({"stlFile": "https://x/a.stl", "configFile": "https://x/a.ini"},
     "stlFile", "", "slicing on the printer is not supported (STL jobs)",
     "stlFile"),
    ({"threemfFile": "https://x/a.3mf"}, "threemfFile", "",
     "slicing on the printer is not supported (3MF jobs)", "threemfFile"),
    ({"fileToPrint": " gcode ", "gcodeFile": "https://x/a.gcode"},
     "gcodeFile", "https://x/a.gcode", "", ""),
    ({"fileToPrint": "", "gcodeFile": "https://x/a.gcode"},
     "gcodeFile", "https://x/a.gcode", "", ""),
    ({"fileToPrint": None, "gcodeFile": "https://x/a.gcode"},
     "gcodeFile", "https://x/a.gcode", "", ""),
    ({"fileToPrint": "other", "gcodeFile": "https://x/a.gcode"}, "", "",
     "fileToPrint names no known file", "fileToPrint"),
    ({"fileToPrint": 3, "gcodeFile": "https://x/a.gcode"}, "", "",
     "fileToPrint names no known file", "fileToPrint"),
    ({}, "gcodeFile", "", "the job has no G-code file", "gcodeFile"),
    ({"gcodeFile": 5}, "gcodeFile", "", "the G-code file is not a URL",
     "gcodeFile"),
    ({"gcodeFile": "https://x/a.gcode?" + "s" * (16 * 1024)}, "gcodeFile",
     "https://x/a.gcode?" + "s" * (16 * 1024), "", ""),
    ({"gcodeFile": "https://x/a.gcode?" + "s" * (64 * 1024)}, "gcodeFile",
     "", "the download URL is too long", "gcodeFile"),
    # unknown fields, odd names and an empty serial are no reason to refuse
    ({"gcodeFile": "https://x/a.gcode", "jobName": ["x"], "future": {},
      "serialNumber": ""}, "gcodeFile", "https://x/a.gcode", "", ""),
])
def test_parse_print_selects_the_file(data, kind, url, problem, field):
    r = p.parse_print(dict(data, jobId="j1"), "KL1")
    assert (r.job_id, r.kind, r.url, r.problem, r.field) == (
        "j1", kind, url, problem, field)


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
