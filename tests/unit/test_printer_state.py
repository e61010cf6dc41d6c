"""Reading the printer (printer_state.py) from fake Klipper objects: what a
sample holds, finite numbers only, and which changes count as changes."""
from __future__ import annotations

import json
import math

import pytest

from klippy_extras.polar_cloud.printer_state import PrinterSampler, heater_key
from tests.unit.fakes import FakeObject, FakePrinter


def heater(temperature=20., target=0.) -> FakeObject:
    return FakeObject({"temperature": temperature, "target": target})


def printer(**overrides) -> FakePrinter:
    objects = {
        "print_stats": FakeObject({
            "state": "printing", "filename": "cube.gcode",
            "print_duration": 12.5, "total_duration": 20.,
            "filament_used": 101.5, "message": ""}),
        "virtual_sdcard": FakeObject({
            "progress": .25, "is_active": True, "file_position": 1000,
            "file_size": 4000, "file_path": "/gcodes/cube.gcode"}),
        "heaters": FakeObject({
            "available_heaters": ["extruder", "heater_bed",
                                  "heater_generic chamber"],
            "available_sensors": ["temperature_sensor chamber",
                                  "temperature_sensor mcu"]}),
        "extruder": heater(205., 210.), "heater_bed": heater(59.5, 60.),
        "heater_generic chamber": heater(30., 0.),
        "configfile": FakeObject({"settings": {
            "virtual_sdcard": {"path": "~/printer_data/gcodes"},
            "extruder": {"min_temp": 0., "max_temp": 300.},
            "heater_bed": {"min_temp": 0., "max_temp": 120.},
            "heater_generic chamber": {"min_temp": 0., "max_temp": 70.}}}),
    }
    objects.update(overrides)
    return FakePrinter(objects)


def sampler(p=None) -> PrinterSampler:
    s = PrinterSampler(p or printer())
    s.find_objects()
    return s


@pytest.mark.parametrize("name,key", [
    ("extruder", "tool0"), ("extruder1", "tool1"), ("extruder12", "tool12"),
    ("heater_bed", "bed"), ("heater_generic chamber", "chamber"),
    ("temperature_sensor chamber", "chamber"), ("heater_chamber", "chamber"),
    ("extruder_stepper", None), ("heater_generic dryer", None),
    ("temperature_sensor mcu", None)])
def test_heater_key(name, key):
    assert heater_key(name) == key


def test_a_sample_holds_what_the_cloud_shows():
    snap, changed = sampler().sample(100.)
    assert changed
    assert snap["klippy_state"] == "ready" and snap["state_message"] == ""
    assert (snap["print_state"], snap["filename"]) == ("printing",
                                                       "cube.gcode")
    assert (snap["print_duration"], snap["filament_used"]) == (12.5, 101.5)
    assert (snap["progress"], snap["is_active"], snap["file_size"]) == (
        .25, True, 4000)
    assert snap["heaters"] == {"tool0": (205., 210.), "bed": (59.5, 60.),
                               "chamber": (30., 0.)}
    static = snap["static"]
    assert static["sdcard_dir"].endswith("/printer_data/gcodes")
    assert "~" not in static["sdcard_dir"]
    assert static["heaters"]["tool0"] == {
        "name": "extruder", "gcode_name": "extruder", "min": 0., "max": 300.}
    assert static["heaters"]["chamber"]["gcode_name"] == "chamber"
    json.dumps(snap)                        # plain data for the session


def test_a_printer_without_sdcard_or_heaters():
    p = FakePrinter()
    snap, _ = sampler(p).sample(0.)
    assert snap["heaters"] == {} and "print_state" not in snap
    assert snap["static"] == {"sdcard_dir": "", "heaters": {}}


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan, "x", None])
def test_numbers_are_always_finite(bad):
    p = printer()
    p.objects["print_stats"].status.update(filament_used=bad,
                                           print_duration=bad)
    p.objects["virtual_sdcard"].status["progress"] = bad
    p.objects["extruder"].status["temperature"] = bad
    snap, _ = sampler(p).sample(0.)
    assert snap["filament_used"] == snap["print_duration"] == 0.
    assert snap["progress"] == 0. and snap["heaters"]["tool0"][0] == 0.
    json.dumps(snap, allow_nan=False)


def test_shutdown_carries_the_first_line_of_klippys_message():
    p = printer()
    p.state_message = ("MCU 'mcu' shutdown: Timer too close\nOnce the"
                       " underlying issue is corrected...", "shutdown")
    snap, _ = sampler(p).sample(0.)
    assert snap["klippy_state"] == "shutdown"
    assert snap["state_message"] == "MCU 'mcu' shutdown: Timer too close"
    p.state_message = ("Printer is ready\nmore", "ready")
    assert sampler(p).sample(0.)[0]["state_message"] == ""


def test_only_changes_that_matter_are_changes():
    p = printer()
    s = sampler(p)
    assert s.sample(0.)[1] is True
    assert s.sample(1.)[1] is False
    # temperatures and progress move all the time: not a change
    p.objects["extruder"].status["temperature"] = 206.
    p.objects["virtual_sdcard"].status["progress"] = .3
    assert s.sample(2.)[1] is False
    # a new target, a new print state, klippy's state: changes
    p.objects["heater_bed"].status["target"] = 0.
    assert s.sample(3.)[1] is True
    p.objects["print_stats"].status["state"] = "paused"
    assert s.sample(4.)[1] is True
    p.state_message = ("Lost communication with MCU", "shutdown")
    assert s.sample(5.)[1] is True
    assert s.sample(6.)[1] is False
