"""Why a print paused: PauseReasons on the reactor (wrapped change macros,
sensors), PauseNotes on the session thread (one console line a pause)."""
from __future__ import annotations

import logging

from klippy_extras.polar_cloud import pauses
from tests.unit.fakes import FakeObject, FakePrinter

RUNOUT = {"runout": (False, True)}
FILLED = {"runout": (True, True)}


def printer_with(macros=("M600",)):
    paused = {"is_paused": False}
    printer = FakePrinter({"pause_resume": FakeObject(lambda _t: paused)})
    gcode = printer.lookup_object("gcode")
    for name in macros:
        gcode.register_command(name, lambda gcmd, name=name: (
            paused.update(is_paused=True), ran.append(name)))
    ran: list = []
    return printer, gcode, paused, ran


def run(gcode, name):
    gcode.commands[name][0](None)


def test_a_change_macro_makes_the_pause_about_filament():
    printer, gcode, paused, ran = printer_with(("M600", "CHANGE_FILAMENT"))
    reasons = pauses.PauseReasons(printer, ("M600", "CHANGE_FILAMENT"))
    reasons.wrap_macros()
    run(gcode, "CHANGE_FILAMENT")
    assert ran == ["CHANGE_FILAMENT"]            # the macro ran unchanged
    assert reasons.sample(True, FILLED) == "filament change (CHANGE_FILAMENT)"
    # New filament inserted: still a filament change until the print resumes
    assert reasons.sample(True, FILLED) == "filament change (CHANGE_FILAMENT)"
    paused["is_paused"] = False
    assert reasons.sample(False, FILLED) == ""
    paused["is_paused"] = True                   # a plain PAUSE afterwards
    assert reasons.sample(True, FILLED) == ""


def test_a_sensor_names_the_runout():
    printer, _gcode, _paused, _ran = printer_with()
    reasons = pauses.PauseReasons(printer, ("M600",))
    reasons.wrap_macros()
    assert reasons.sample(True, RUNOUT) == "filament runout (sensor 'runout')"
    assert reasons.sample(True, FILLED) == "filament runout (sensor 'runout')"
    assert reasons.sample(False, FILLED) == ""


def test_a_missing_macro_is_only_noted(caplog):
    printer, gcode, _paused, _ran = printer_with(())
    reasons = pauses.PauseReasons(printer, ("M600", "CHANGE_FILAMENT"))
    with caplog.at_level(logging.INFO, logger="polar_cloud"):
        reasons.wrap_macros()
    assert gcode.commands == {}
    assert [r.message for r in caplog.records] == [
        "polar_cloud: there is no CHANGE_FILAMENT command to watch for"
        " filament changes"]


def test_a_macro_that_did_not_pause_is_forgotten():
    printer = FakePrinter({"pause_resume": FakeObject({"is_paused": False})})
    gcode = printer.lookup_object("gcode")
    gcode.register_command("M600", lambda gcmd: None)
    reasons = pauses.PauseReasons(printer, ("M600",))
    reasons.wrap_macros()
    run(gcode, "M600")
    assert reasons.sample(True, {}) == ""


def snap(state="paused", **kw):
    return dict({"klippy_state": "ready", "print_state": state}, **kw)


def test_one_console_line_per_filament_pause():
    lines: list = []
    notes = pauses.PauseNotes(lines.append)
    notes.watch(None)
    notes.watch(snap(filament_pause="filament change (M600)"))
    notes.watch(snap(filament_pause="filament change (M600)"))
    notes.watch(snap("printing"))
    notes.watch(snap(filament_sensors=RUNOUT))
    notes.watch(snap())                          # a plain pause: no line
    assert lines == [
        "Polar Cloud: print paused for a filament change (M600)",
        "Polar Cloud: print paused for a filament runout (sensor 'runout')"]
