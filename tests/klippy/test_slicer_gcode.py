"""G-code from real slicers prints; wrong downloads are refused; every
cloud `print` with a job id is answered (a real klippy, the simulator).

The cube is sliced once per session by each slicer (tests/testbed/
slicers.py); each print is cancelled from the cloud once it runs."""
from __future__ import annotations

import io
import itertools
import os
import re
import struct
import zipfile

import pytest

from klippy_extras.polar_cloud.jobnames import shown_id
from tests.testbed import slicers
from tests.testbed.gcode_files import demo_print
from tests.testbed.helpers import (
    final_reports,
    polar_status,
    wait_final,
    wait_status,
)

# The start G-code's macros, as a Klipper user's printer.cfg has them; each
# says on the console that it ran
MACROS = """
[gcode_macro PRINT_START]
gcode:
  G28
  RESPOND MSG="macro print_start EXTRUDER={params.EXTRUDER} BED={params.BED}"
[gcode_macro _HEAT_SOAK]
gcode:
  RESPOND MSG="macro _heat_soak"
[exclude_object]
"""
BOM = b"\xef\xbb\xbf"
FILE_NUMBERS = itertools.count(1)


@pytest.fixture(scope="session")
def sliced(tmp_path_factory):
    """slicer name -> G-code bytes, each slicer run once per session."""
    cache: dict[str, bytes] = {}

    def get(name: str) -> bytes:
        if name not in cache:
            workdir = tmp_path_factory.mktemp("slice-" + name)
            if name == "3mf":
                cache[name] = slicers.export_3mf(workdir)
            else:
                cache[name], took = slicers.slice_cube(name, workdir)
                print("sliced with %s in %.2f s" % (name, took))
        return cache[name]
    return get


@pytest.fixture(scope="module")
def k(registered_klippy):
    return registered_klippy("klipper", extra_cfg=MACROS)


def send(sim, k, job_id, content, name="cube", url_suffix="", **kw):
    url = sim.add_file("f%d.gcode" % (next(FILE_NUMBERS),), content, **kw)
    since = sim.now()
    sim.push_print(k.serial, job_id, job_name=name, gcode_url=url + url_suffix)
    return since


def cancel_running(sim, k, job_id, since):
    """Cancel the running cloud print; it ends in one canceled report."""
    t = sim.now()
    sim.cancel(k.serial)
    final = wait_final(sim, k, job_id, since)
    assert final["state"] == "canceled"
    wait_status(sim, k, t, lambda d: d["status"] == 0)
    assert len(final_reports(sim, k, job_id)) == 1
    assert k.query("print_stats")["print_stats"]["state"] == "cancelled"


def gcode_files(k):
    return sorted(os.listdir(k.gcodes_dir))


def crlf(data: bytes) -> bytes:
    return data.replace(b"\n", b"\r\n")


VARIANTS = {
    # as the slicer wrote it
    "prusa-slicer": lambda get: get("prusa-slicer"),
    "slic3r": lambda get: get("slic3r"),
    # a 300x300 thumbnail (5,000 comment lines) in front, a BOM, CRLF
    "prusa-thumbnail-bom-crlf": lambda get: BOM + crlf(
        slicers.with_thumbnail(get("prusa-slicer"))),
    # a BOM right before a lower-case macro call (klippy itself would
    # call that line malformed: the BOM must go)
    "slic3r-bom-first-line-macro": lambda get: BOM
    + b"print_start EXTRUDER=200 BED=50\n" + get("slic3r"),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_real_slicer_gcode_prints(k, sim, sliced, variant):
    content = VARIANTS[variant](sliced)
    job_id = "slice-" + variant
    out = k.subscribe_output()
    try:
        since = send(sim, k, job_id, content)
        printing = wait_status(sim, k, since, lambda d: d["status"] == 3)
        assert printing["jobId"] == job_id
        # The start G-code's macros ran, with the slicer's values
        out.wait_for(r"macro print_start EXTRUDER=200 BED=50")
        if variant.startswith("prusa"):
            out.wait_for(r"macro _heat_soak")
            info = k.query("print_stats")["print_stats"]["info"]
            assert info["total_layer"] == 6
        else:
            pa = k.query("extruder")["extruder"]["pressure_advance"]
            assert pa == pytest.approx(0.04)
        lines = out.lines
    finally:
        out.close()
    assert not [x for x in lines if "Malformed" in x or "Unknown command"
                in x], lines
    # The file on disk is what Klipper reads: the BOM is gone
    st = k.query("print_stats")["print_stats"]
    with open(os.path.join(k.gcodes_dir, st["filename"]), "rb") as f:
        assert not f.read(3).startswith(BOM)
    cancel_running(sim, k, job_id, since)
    if variant == "slic3r":
        k.gcode("SET_PRESSURE_ADVANCE ADVANCE=0")


def _bgcode() -> bytes:
    """The start of a binary G-code file (.bgcode, PrusaSlicer 2.7+):
    magic, version 1, CRC32 checksums, then a file metadata block."""
    header = b"GCDE" + struct.pack("<IH", 1, 1)
    meta = b"Producer=PrusaSlicer 2.7.0\n"
    block = struct.pack("<HHI", 0, 0, len(meta)) + struct.pack("<H", 0)
    return header + block + meta + os.urandom(4096)


def _html() -> bytes:
    return (b"<!DOCTYPE html>\n<html><head><title>Sign in</title></head>"
            b"<body><form>...</form></body></html>\n")


def _json() -> bytes:
    return b'{"error": {"code": "AccessDenied", "message": "expired"}}\n'


def _zip_of(name: str, data: bytes) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr(name, data)
    return buf.getvalue()


WRONG_FILES = {
    # served as application/octet-stream, as an object store may: the
    # content itself gives it away
    "html": (lambda get: _html(), "HTML"),
    "json": (lambda get: _json(), "JSON"),
    "3mf": (lambda get: get("3mf"), "3MF"),
    "zipped-gcode": (lambda get: _zip_of("cube.gcode", get("slic3r")),
                     "ZIP"),
    "bgcode": (lambda get: _bgcode(), "bgcode"),
    "empty": (lambda get: b"", "empty"),
    "only-comments": (lambda get: b"; nothing to print\n" * 50, "comments"),
    "junk": (lambda get: os.urandom(8192), "not a G-code file"),
}


@pytest.mark.parametrize("kind", list(WRONG_FILES))
def test_wrong_download_is_refused_with_a_reason(k, sim, sliced, kind):
    make, reason = WRONG_FILES[kind]
    before = gcode_files(k)
    job_id = "wrong-" + kind
    out = k.subscribe_output()
    try:
        since = send(sim, k, job_id, make(sliced))
        final = wait_final(sim, k, job_id, since)
        line = out.wait_for(r"job %s failed: .*" % (job_id,))
    finally:
        out.close()
    assert final["state"] == "canceled"
    assert reason in line, line
    assert gcode_files(k) == before
    assert len(final_reports(sim, k, job_id)) == 1


def test_odd_job_id_prints_and_is_echoed_verbatim(k, sim):
    job_id = "job 7/ä"
    since = send(sim, k, job_id, demo_print(moves=300, hotend=0, bed=0,
                                            feedrate=3000),
                 name="Odd/ name")
    printing = wait_status(sim, k, since, lambda d: d["status"] == 3)
    assert printing["jobId"] == job_id
    assert polar_status(k)["job_id"] == job_id
    # The file is named from a hash of the id, inside the gcodes folder
    filename = k.query("print_stats")["print_stats"]["filename"]
    assert re.fullmatch(r"Odd_name_polar\.[0-9a-f]{16}\.gcode", filename)
    assert filename in gcode_files(k)
    cancel_running(sim, k, job_id, since)
    assert sim.violations == []


def test_long_presigned_url_prints(k, sim):
    job_id = "long-url"
    # An S3 pre-signed URL with a session token: about 3 KB
    suffix = "?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Security-Token=" \
        + "IQoJb3JpZ2luX2VjE" * 170 + "&X-Amz-Signature=" + "ab12" * 16
    assert len(suffix) > 3000
    since = send(sim, k, job_id, demo_print(moves=300, hotend=0, bed=0,
                                            feedrate=3000),
                 url_suffix=suffix)
    printing = wait_status(sim, k, since, lambda d: d["status"] == 3)
    assert printing["jobId"] == job_id
    cancel_running(sim, k, job_id, since)


@pytest.mark.parametrize("job_id,fields,reason", [
    ("job 8/ö", {"stlFile": "stl", "configFile": "ini"},
     "slicing on the printer is not supported (STL jobs) [stlFile]"),
    (9, {"threemfFile": "3mf"},
     "slicing on the printer is not supported (3MF jobs) [threemfFile]"),
    ("stl-picked", {"gcodeFile": "gcode", "stlFile": "stl",
                    "fileToPrint": "stlFile"},
     "slicing on the printer is not supported (STL jobs) [fileToPrint]"),
    ("bad\nline", {"gcodeFile": ["not", "a", "url"]},
     "not a URL [gcodeFile]"),
    ("x" * 128, {"fileToPrint": "pdfFile", "gcodeFile": "gcode"},
     "[fileToPrint]"),
    ("no-file", {"jobName": {"not": "text"}}, "no G-code file [gcodeFile]"),
], ids=["stl-only", "3mf-only-numeric-id", "fileToPrint-stl",
        "url-not-text", "unknown-fileToPrint", "no-file"])
def test_unprintable_print_is_answered_once(k, sim, job_id, fields, reason):
    """Lenient reading, one answer: canceled, the id echoed as text."""
    content = {"gcode": b"G28\n", "stl": b"solid x\nendsolid x\n",
               "ini": b"layer_height = 0.2\n", "3mf": b"PK\x03\x04"}
    payload = {"serialNumber": k.serial, "jobId": job_id,
               "jobName": "Model"}
    served = []
    for key, value in fields.items():
        if key.endswith("File") and isinstance(value, str) \
                and value in content:
            served.append("f%d.%s" % (next(FILE_NUMBERS), value))
            value = sim.add_file(served[-1], content[value])
        payload[key] = value
    answer_id = str(job_id)
    out = k.subscribe_output()
    try:
        since = sim.now()
        sim.push("print", payload, serial=k.serial)
        final = wait_final(sim, k, answer_id, since)
        line = out.wait_for(r"job %s refused: .*"
                            % (re.escape(shown_id(answer_id)),))
    finally:
        out.close()
    assert final["state"] == "canceled" and final["jobId"] == answer_id
    assert reason in line, line
    assert len(final_reports(sim, k, answer_id)) == 1
    assert [sim.file_requests(name) for name in served] == [0] * len(served)
    assert k.query("print_stats")["print_stats"]["state"] != "printing"
    assert sim.violations == []
