"""Job file names and job ids as shown (jobnames.py)."""
import os
import re

import pytest

from klippy_extras.polar_cloud import jobnames


@pytest.mark.parametrize("name,job_id,expected", [
    ("Benchy", "j1", "Benchy_polar-j1.gcode"),
    ("My Part v2.gcode", "42", "My_Part_v2_polar-42.gcode"),
    ("../../config/printer.cfg", "j1", "config_printer.cfg_polar-j1.gcode"),
    ("/etc/passwd", "j1", "etc_passwd_polar-j1.gcode"),
    ("..\\x", "j1", "x_polar-j1.gcode"),
    ("a\x00b", "j1", "a_b_polar-j1.gcode"),
    (".hidden", "j1", "hidden_polar-j1.gcode"),
    ("", "j1", "polar_job_polar-j1.gcode"),
    ("Ünïcödé 部品", "j1", "Unicode_polar-j1.gcode"),
    ("x" * 300, "j1", "x" * 60 + "_polar-j1.gcode"),
])
def test_safe_job_filename(name, job_id, expected):
    filename = jobnames.safe_job_filename(name, job_id)
    assert filename == expected
    assert os.sep not in filename and not filename.startswith(".")
    assert jobnames.job_id_from_filename(filename) == job_id


@pytest.mark.parametrize("filename", [
    "Benchy_polar-77.gcode\n", "Benchy_polar-77.gcode\nx",
    "Benchy_polar-77.gcode.bak", "Benchy_polar-.gcode"])
def test_job_id_from_other_file_names(filename):
    assert jobnames.job_id_from_filename(filename) is None


@pytest.mark.parametrize("job_id", [
    "job 7/ä", "../../etc/passwd", "a\nb", "x" * 65, "x" * 128, "\ud800",
    "C:\\x", ".", "..", "🙂"])
def test_unsafe_job_ids_get_a_hashed_file_name(job_id):
    filename = jobnames.safe_job_filename("Benchy", job_id)
    assert re.fullmatch(r"Benchy_polar\.[0-9a-f]{16}\.gcode", filename)
    # not mistaken for a safe id's name; the id is kept in the job state
    assert jobnames.job_id_from_filename(filename) is None
    assert jobnames.safe_job_filename("Benchy", job_id + "x") != filename
    shown = jobnames.shown_id(job_id)
    assert shown.isprintable() and len(shown) <= 64
