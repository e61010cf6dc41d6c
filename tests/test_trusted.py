"""Opt-in cloud control for trusted setups (allow_raw_gcode, allow_jog):
what is allowed runs, what is never allowed still doesn't."""
from __future__ import annotations

import pytest

from tests.conftest import register, wait_objects


@pytest.fixture(scope="module")
def k(polar_klippy, sim):
    k = polar_klippy("klipper", allow_raw_gcode="True", allow_jog="True")
    k.serial = register(k, sim)
    return k


def bed_target(k, value):
    return wait_objects(k, {"heater_bed": ["target"]},
                        lambda s: s["heater_bed"]["target"] == value)


def test_raw_gcode_runs_when_allowed(k, sim):
    sim.command(k.serial, "M140 S55")
    bed_target(k, 55.)
    sim.command(k.serial, "M140 S0")
    bed_target(k, 0.)


@pytest.mark.parametrize("script", [
    "SAVE_CONFIG", "FIRMWARE_RESTART", "RESTART\nM140 S66",
    "M140 S{66}", "  restart ; comment"])
def test_dangerous_gcode_is_never_run(k, sim, script):
    sim.command(k.serial, script)
    sim.command(k.serial, "M140 S12")      # handled after, in order
    bed_target(k, 12.)
    assert k.info()["state"] == "ready"
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
