"""Reading what the cloud sends: lenient, and never a crash."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from klippy_extras.polar_cloud import inbound
from klippy_extras.polar_cloud import protocol as p


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
    r = inbound.parse_register_response(reply)
    assert (r.ok, r.reason, r.terminal) == (ok, reason, terminal)
    if not ok:
        assert r.message


def test_hello_response():
    assert inbound.parse_hello_response({"status": "SUCCESS"}) == ("SUCCESS", "")
    assert inbound.parse_hello_response({"status": "DELETED"})[0] == "DELETED"
    assert inbound.parse_hello_response(
        {"status": "FAILED", "message": "Printer has been deleted"})[0] \
        == "DELETED"
    assert inbound.parse_hello_response({"status": "FAILED", "message": "x"}) \
        == ("FAILED", "x")
    assert inbound.parse_hello_response(None)[0] == "FAILED"


@pytest.mark.parametrize("message", [
    "Printer key mismatch; the old key was deleted",
    "deleted", "Printer has been deleted; it was restored",
    "Printer has been deleted\nagain",
])
def test_failed_hello_mentioning_deleted_is_not_a_deletion(message):
    status, text = inbound.parse_hello_response({"status": "FAILED",
                                           "message": message})
    assert status == "FAILED" and text == p.cloud_text(message)


def test_parse_print():
    r = inbound.parse_print({"serialNumber": "KL1", "jobId": "abc-1",
                       "jobName": "Benchy", "gcodeFile": "https://x/y.gcode"},
                      "KL1")
    assert (r.job_id, r.kind, r.url, r.problem) == (
        "abc-1", "gcodeFile", "https://x/y.gcode", "")
    assert inbound.parse_print({"jobId": 77, "stlFile": "https://x/y.stl"},
                         "KL1").kind == "stlFile"
    # No id to answer to, or not for this printer: nothing to answer
    for bad in ({"jobId": ""}, {"jobId": " \t"}, {"jobId": "x" * 129},
                {"jobId": True}, {"jobId": None}, {}, {"jobId": [1]},
                {"jobId": float("inf")}, [], "print",
                {"jobId": "a", "serialNumber": "KL2"},
                {"jobId": "a", "serialNumber": 7}):
        with pytest.raises(p.ProtocolError):
            inbound.parse_print(bad, "KL1")


def test_values_with_a_trailing_newline_are_refused():
    assert not inbound.parse_register_response(
        {"status": "SUCCESS", "serialNumber": "KL000001\n"}).ok
    assert p.validate_email("a@b.co\n") and p.validate_pin("1234\n")
    with pytest.raises(p.ProtocolError):
        inbound.parse_temperature({"tool0\n": 200}, None)
    with pytest.raises(p.ProtocolError):
        inbound.parse_temperature({"tool0": "200\nM112"}, None)


@pytest.mark.parametrize("value,job_id", [
    ("abc-1", "abc-1"), ("job 7/ä", "job 7/ä"), ("../../x", "../../x"),
    ("a\nb", "a\nb"), ("x" * 128, "x" * 128), (77, "77"), (0, "0"),
    (12.0, "12"), (1.5, "1.5"), ("007", "007"), (" j ", " j "),
])
def test_job_id_is_read_leniently_and_kept_verbatim(value, job_id):
    assert inbound.read_job_id(value) == job_id
    r = inbound.parse_print({"jobId": value, "gcodeFile": "https://x/y.gcode"},
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
    r = inbound.parse_print(dict(data, jobId="j1"), "KL1")
    assert (r.job_id, r.kind, r.url, r.problem, r.field) == (
        "j1", kind, url, problem, field)


def test_parse_temperature():
    assert inbound.parse_temperature({"tool0": 200, "bed": "60", "x": 1}, None) == {
        "tool0": 200., "bed": 60.}
    for bad in ({"tool0": "200\nM112"}, {"tool0": "abc"}, {"bed": True},
                {"tool0": float("nan")}, {}, {"serialNumber": "KL1"}):
        with pytest.raises(p.ProtocolError):
            inbound.parse_temperature(bad, None)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda inner: st.lists(inner) | st.dictionaries(st.text(), inner),
    max_leaves=20)


@given(json_values)
def test_inbound_parsers_never_crash(data):
    """Whatever the cloud sends, parsers return or raise ProtocolError."""
    for parse in (inbound.parse_welcome, lambda d: inbound.parse_print(d, "KL1"),
                  lambda d: inbound.parse_temperature(d, "KL1")):
        try:
            parse(data)
        except p.ProtocolError:
            pass
    inbound.parse_register_response(data)
    inbound.parse_hello_response(data)
    inbound.parse_status_reply(data, "x")
