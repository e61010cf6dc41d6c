"""Opt-in cloud control for trusted setups (allow_raw_gcode, allow_jog):
what is allowed runs, what is never allowed still doesn't."""
from __future__ import annotations

import pytest

from tests.testbed.helpers import wait_objects


@pytest.fixture(scope="module")
def k(registered_klippy):
    return registered_klippy("klipper", allow_raw_gcode="True",
                             allow_jog="True")


def bed_target(k, value):
    return wait_objects(k, {"heater_bed": ["target"]},
                        lambda s: s["heater_bed"]["target"] == value)


def test_raw_gcode_runs_when_allowed(k, sim):
    sim.command(k.serial, "M140 S55")
    bed_target(k, 55.)
    sim.command(k.serial, "M140 S0")
    bed_target(k, 0.)


def test_raw_gcode_line_numbers_checksums_and_case_run(k, sim):
    sim.command(k.serial, "N7 M140 S56*33")
    bed_target(k, 56.)
    sim.command(k.serial, "m140 s57 ; lower case")
    bed_target(k, 57.)
    sim.command(k.serial, "N8 SET_HEATER_TEMPERATURE HEATER=heater_bed"
                          " TARGET=58*12")
    bed_target(k, 58.)
    sim.command(k.serial, "M140 S0")
    bed_target(k, 0.)


# Each script, and the name its refusal must give
REFUSED = [
    ("SAVE_CONFIG", "SAVE_CONFIG"),
    ("FIRMWARE_RESTART", "FIRMWARE_RESTART"),
    ("RESTART\nM140 S66", "RESTART"),
    ("M140 S{66}", "templates"),
    ("  restart ; comment", "RESTART"),
    ("N1 SAVE_CONFIG", "SAVE_CONFIG"),
    ("N2 RESTART", "RESTART"),
    ("RESTART\tA=1", "RESTART"),
    ("SAVE_CONFIG\u00a0A=1", "SAVE_CONFIG"),
    ("N1 RUN_SHELL_COMMAND CMD=hello", "RUN_SHELL_COMMAND"),
    ("n7 save_config", "SAVE_CONFIG"),
    ("\u017fave_config", "ave_config"),
    ("M140 S66\nM23 part.gcode\nM24", "M23"),
    ("M24", "M24"),
    ("SDCARD_PRINT_FILE FILENAME=part.gcode", "SDCARD_PRINT_FILE"),
]


@pytest.mark.parametrize("script,named", REFUSED)
def test_dangerous_gcode_is_never_run(k, sim, script, named):
    k.write_gcode("part.gcode", "M140 S66\n")
    out = k.subscribe_output()
    try:
        sim.command(k.serial, script)
        refused = out.wait_for(r"Polar Cloud: refused G-code")
    finally:
        out.close()
    assert named in refused
    sim.command(k.serial, "M140 S12")      # handled after, in order
    bed_target(k, 12.)
    assert k.info()["state"] == "ready"
    assert k.query("print_stats")["print_stats"]["state"] == "standby"
    sim.command(k.serial, "M140 S0")
    bed_target(k, 0.)


def test_jog_homes_and_moves(k, sim):
    sim.jog_printer(k.serial, {"command": "home", "axes": ["x", "y", "z"]})
    wait_objects(k, {"toolhead": ["homed_axes"]},
                 lambda s: s["toolhead"]["homed_axes"] == "xyz", timeout=60)
    sim.jog_printer(k.serial, {"command": "jog", "x": 10, "y": 5,
                               "speed": 3000})
    pos = wait_objects(k, {"gcode_move": ["gcode_position"]},
                       lambda s: s["gcode_move"]["gcode_position"][0] > 9.)
    assert pos["gcode_move"]["gcode_position"][1] == pytest.approx(5., 0.01)
    # Nonsense is refused without moving anything
    for bad in ({"command": "jog", "x": 1e9}, {"command": "jog", "x": "1;M112"},
                {"command": "format-disk"}, {"command": "home", "axes": ["q"]}):
        sim.jog_printer(k.serial, bad)
    sim.command(k.serial, "M140 S13")
    bed_target(k, 13.)
    k.gcode("M140 S0")
    assert k.info()["state"] == "ready"


def modal_state(k):
    move = k.query("gcode_move")["gcode_move"]
    return move["absolute_coordinates"], move["absolute_extrude"], \
        move["speed"]


def test_jogs_leave_no_modal_state_behind(k, sim):
    k.gcode("G28\nG90\nM82\nG1 X20 Y20 F1200")
    before = modal_state(k)
    assert before[:2] == (True, True)
    out = k.subscribe_output()
    try:
        # Past the end of the X axis: the move fails half-way through the
        # jog's script
        sim.jog_printer(k.serial, {"command": "jog", "x": 900, "speed": 6000})
        assert "out of range" in out.wait_for(r"Polar Cloud: jog failed")
        assert modal_state(k) == before
        sim.jog_printer(k.serial, {"command": "extrude", "amount": 2})
        sim.jog_printer(k.serial, {"command": "jog", "y": 5, "speed": 6000})
        sim.command(k.serial, "M140 S14")     # runs after both jogs
        bed_target(k, 14.)
        assert modal_state(k) == before
        assert not [line for line in out.lines if "failed" in line][1:]
    finally:
        out.close()
    k.gcode("M140 S0")
