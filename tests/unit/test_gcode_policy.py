"""The raw G-code policy (gcode_policy.py, allow_raw_gcode): every line is
read the way Klipper and Kalico read it, and only allow-listed commands
ever run (through RemoteCommands, with a fake session).

The last tests feed the same lines to each klippy flavour's own G-code
dispatcher (tests/testbed/gcode_oracle.py, klippy's code in a child
Python, no klippy process) to check that what runs is exactly what was
checked."""
from __future__ import annotations

import json
import random
import subprocess

import pytest

from klippy_extras.polar_cloud import gcode_policy
from klippy_extras.polar_cloud.commands import RemoteCommands
from tests.testbed.klippy import REPO, get_flavour
from tests.unit.fakes import MACROS, READY, FakePort, trusted_port

# Each of these reaches a command that must never run from the cloud, in at
# least one klippy flavour (checked against klippy itself below)
BYPASSES = [
    "N1 SAVE_CONFIG", "N2 RESTART", "RESTART\tA=1", "SAVE_CONFIG\u00a0A=1",
    "N1 RUN_SHELL_COMMAND CMD=hello", "n7 save_config", "M23 part.gcode",
    "M24", "save_config", "  restart ; comment", "N4 SAVE_CONFIG*12",
    "N1SAVE_CONFIG", "\u017fave_config", "SAVE_CONFIG\u2003",
    "\u2028SAVE_CONFIG", "FIRMWARE_RESTART", "SET_KINEMATIC_POSITION Z=0",
    "SDCARD_PRINT_FILE FILENAME=part.gcode", "M112", "UNLISTED_MACRO",
    "N3 M23 part.gcode*7", "m24",
]
# The command each bypass should be refused under (None: the line is not
# plain G-code, and the refusal quotes it instead)
NAMED = {
    "N1 SAVE_CONFIG": "SAVE_CONFIG", "N2 RESTART": "RESTART",
    "RESTART\tA=1": "RESTART", "n7 save_config": "SAVE_CONFIG",
    "N1 RUN_SHELL_COMMAND CMD=hello": "RUN_SHELL_COMMAND",
    "M23 part.gcode": "M23", "M24": "M24", "N1SAVE_CONFIG": "SAVE_CONFIG",
    "N4 SAVE_CONFIG*12": "SAVE_CONFIG", "  restart ; comment": "RESTART",
    "m24": "M24", "SAVE_CONFIG\u00a0A=1": "SAVE_CONFIG",
}
ALLOWED = [
    "G28", "G28 X Y", "G1 X10 Y10 F3000", "g1 x10 y10", "G1X10Y10", "G0 Z5",
    "G4 P100", "G90", "G91", "G92 E0", "M82", "M83", "M84", "M18",
    "M104 S200", "M109 S200", "M140 S60", "M190 S60", "M106 S255", "M107",
    "M105", "M114", "M220 S100", "M221 S95", "M400",
    "SET_HEATER_TEMPERATURE HEATER=extruder TARGET=200",
    "set_fan_speed fan=part speed=0.5", "TURN_OFF_HEATERS",
    "SET_VELOCITY_LIMIT VELOCITY=100", "STATUS", "QUERY_ENDSTOPS",
    "SET_PRESSURE_ADVANCE ADVANCE=0.05", "SET_GCODE_OFFSET Z=0.1",
    "G28 ; home first", "M140 S60 ;", "\tG28\t",
]


def send(script: str, **options) -> FakePort:
    session = trusted_port(**options)
    RemoteCommands(session).raw_gcode({"command": script}, READY)
    return session


def refusal(session: FakePort) -> str:
    assert session.bridge.scripts == []
    lines = [a for a in session.audits if a.startswith("cloud command: ref")]
    assert len(lines) == 1, session.audits
    assert len(session.bridge.console_lines) == 1
    assert session.bridge.console_lines[0].endswith(lines[0][
        len("cloud command: refused, "):])
    return lines[0]


# ------------------------------------------------------------ the policy

@pytest.mark.parametrize("line", BYPASSES)
def test_bypass_forms_are_refused(line):
    audit = refusal(send(line))
    assert NAMED.get(line, "") in audit


@pytest.mark.parametrize("line", BYPASSES)
def test_bypass_forms_are_refused_anywhere_in_a_script(line):
    refusal(send("G28\nM140 S60\n%s\nG1 X1" % (line,)))


@pytest.mark.parametrize("line", ALLOWED)
def test_allowed_lines_run_as_sent(line):
    session = send(line)
    assert session.bridge.scripts == [line]
    assert session.audits == ["cloud command: running 1 line(s)"]


@pytest.mark.parametrize("form", ["N5 %s", "%s*42", "N5 %s*42", "N5%s",
                                  "%s ; N5 SAVE_CONFIG"])
def test_line_numbers_and_checksums_change_nothing(form):
    for line in ALLOWED:
        assert gcode_policy.check_script(form % (line.strip(),)) == "", line
    for line in BYPASSES:
        if line in NAMED:
            assert gcode_policy.check_script(form % (line.strip(),)) != ""


def test_only_listed_macros_run():
    session = send("LOAD_FILAMENT TEMP=210\nload_filament")
    assert session.bridge.scripts == ["LOAD_FILAMENT TEMP=210\nload_filament"]
    assert "UNLOAD_FILAMENT" in refusal(send("UNLOAD_FILAMENT"))
    assert "LOAD_FILAMENT" in refusal(send("LOAD_FILAMENT", cloud_macros=()))


@pytest.mark.parametrize("script,reason", [
    ("M140 S{66}", "template"), ("M140 S60\n}", "template"),
    ("M140 S60 ; INTERRUPT", "INTERRUPT"), ("HEATER_INTERRUPT", "INTERRUPT"),
    ("G28\x00", "plain"), ("G28\rSAVE_CONFIG", "plain"), ("G1 X1\x0b", "plain"),
    ("M140 S60 ; caf\u00e9", "plain"), ("N1", "parse"), ("/G28", "parse"),
    ("G1 123", "parse"), ("=G1 X1", "parse"), ("1 G28", "parse"),
])
def test_anything_unclear_is_refused(script, reason):
    assert reason in refusal(send(script))


def test_refusals_are_safe_to_log():
    audit = refusal(send("SAVE_CONFIG\u00a0A=1\u202e" + "x" * 500))
    assert audit.isascii() and audit.isprintable() and len(audit) < 200


# ------------------------------------- what klippy itself makes of a line

def fuzz_lines(count: int = 4000) -> list[str]:
    pieces = ["N1", "n7", "N", " ", "  ", "\t", "\u00a0", "\u2003", "*",
              "*12", ";", "=", "1", "10", ".5", "-", "/", "_", "G", "g1",
              "G1", "G28", "M", "M23", "m24", "M140", "M117", "X10", " X",
              "S60", " S60", "E-1", "F3000", "SAVE_CONFIG", "save_config",
              "RESTART", "SET_FAN_SPEED", " FAN=part", " SPEED=1",
              "SET_HEATER_TEMPERATURE", "HEATER=extruder", "LOAD_FILAMENT",
              "UNLISTED_MACRO", "STATUS", "\u017f", "\u0131", "\u00df",
              "\r", "\x0c", "#", '"', "'"]
    rng = random.Random(20240611)
    return ["".join(rng.choice(pieces) for _ in range(rng.randint(1, 7)))
            for _ in range(count)]


CORPUS = sorted(set(BYPASSES + ALLOWED + fuzz_lines() + [
    form % (line,) for line in ALLOWED + list(NAMED)
    for form in ("N5 %s", "%s*42", "N5 %s*42", "n5 %s")]))
KNOWN = sorted(gcode_policy.ALLOWED_COMMANDS | set(MACROS) | {
    "SAVE_CONFIG", "RESTART", "FIRMWARE_RESTART", "RUN_SHELL_COMMAND",
    "SET_KINEMATIC_POSITION", "SDCARD_PRINT_FILE", "M23", "M24", "M112",
    "M117", "UNLISTED_MACRO", "HEATER_INTERRUPT"})


def ask_klippy(flavour: str, lines: list[str]) -> list[dict]:
    """What the flavour's own G-code dispatcher does with each line."""
    python = get_flavour(flavour).python
    result = subprocess.run(
        [str(python), str(REPO / "tests" / "testbed" / "gcode_oracle.py")],
        input=json.dumps({"commands": KNOWN, "lines": lines}),
        capture_output=True, text=True, check=True, timeout=120, cwd="/")
    return json.loads(result.stdout)


@pytest.fixture(scope="module", params=[
    "klipper", pytest.param("kalico", marks=pytest.mark.kalico)])
def klippy_reading(request):
    """{line: what the flavour's dispatcher did with it}"""
    return dict(zip(CORPUS, ask_klippy(request.param, CORPUS)))


def accepted_command(line: str):
    try:
        return gcode_policy.line_command(line, MACROS)
    except gcode_policy.Refused:
        return None


def test_an_accepted_line_runs_exactly_its_command(klippy_reading):
    accepted = 0
    for line, reading in klippy_reading.items():
        command = accepted_command(line)
        if command is None:
            continue
        accepted += 1
        assert reading["lookups"] == [command], (line, reading)
        assert set(reading["calls"]) <= {command}, (line, reading)
    assert accepted > len(klippy_reading) // 10     # not a vacuous check


def test_every_bypass_really_escapes_in_klipper_or_kalico():
    """Each refused bypass runs something off the allow-list in at least
    one flavour: the refusals are not only about lines klippy ignores."""
    readings = [ask_klippy(flavour, BYPASSES)
                for flavour in ("klipper", "kalico")]
    allowed = gcode_policy.ALLOWED_COMMANDS | set(MACROS)
    for i, line in enumerate(BYPASSES):
        ran = set().union(*(set(r[i]["calls"]) for r in readings))
        assert ran - allowed, (line, ran)
