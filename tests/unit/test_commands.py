"""Cloud commands besides print jobs (commands.py), with a fake session:
heater targets, macro buttons, the opt-in raw G-code and jogging, and the
commands this printer never takes from the cloud.  The raw G-code policy
itself: test_gcode_policy.py."""
from __future__ import annotations

import pytest

from klippy_extras.polar_cloud import protocol
from klippy_extras.polar_cloud.commands import RemoteCommands
from tests.unit.fakes import MACROS, READY, SERIAL, FakePort, snapshot, trusted_port


def send(script: str, **options) -> FakePort:
    session = trusted_port(**options)
    RemoteCommands(session).raw_gcode({"command": script}, READY)
    return session


def commands(**options) -> tuple[FakePort, RemoteCommands]:
    options.setdefault("cloud_macros", MACROS)
    session = FakePort(**options)
    return session, RemoteCommands(session)


# ------------------------------------------------------------ what is heard

def test_every_command_event_has_a_handler():
    session, _ = commands()
    assert sorted(session.handlers) == [
        "command", "connectPrinter", "customCommand", "jogPrinter",
        "temperature", "update"]


def test_handlers_read_the_latest_sample():
    session, _ = commands()
    session.sample = snapshot()
    session.handlers["temperature"]({"bed": 60})
    assert session.bridge.scripts == [
        "SET_HEATER_TEMPERATURE HEATER=heater_bed TARGET=60.0"]


@pytest.mark.parametrize("event", ["connectPrinter", "update"])
def test_what_the_printer_never_takes_from_the_cloud(event):
    session, _ = commands()
    session.handlers[event]({"serialNumber": SERIAL})
    assert session.bridge.scripts == []
    assert session.audits == ["cloud %s: not supported by this printer"
                              % (event,)]


# ----------------------------------------------------------- temperature

def test_targets_are_clamped_to_the_heaters_range():
    session, cmds = commands()
    cmds.temperature({"tool0": 999, "bed": -5}, snapshot())
    assert session.bridge.scripts == [
        "SET_HEATER_TEMPERATURE HEATER=heater_bed TARGET=0.0",
        "SET_HEATER_TEMPERATURE HEATER=extruder TARGET=300.0"]
    assert sorted(session.audits) == [
        "cloud temperature: bed -5.0 clamped to 0.0",
        "cloud temperature: tool0 999.0 clamped to 300.0"]


def test_a_failed_target_is_told_on_the_console():
    session, cmds = commands()
    cmds.temperature({"bed": 50}, snapshot())
    session.bridge.replies[0](False, "Heater not found")
    assert session.failures == [("temperature", "Heater not found")]


def test_no_target_for_a_heater_the_printer_lacks():
    session, cmds = commands()
    cmds.temperature({"chamber": 40}, snapshot())
    assert session.bridge.scripts == []
    assert session.audits == ["cloud temperature: no heater for chamber"]


@pytest.mark.parametrize("klippy_state", ["shutdown", "startup", None])
def test_no_target_unless_klippy_is_ready(klippy_state):
    session, cmds = commands()
    snap = None if klippy_state is None else snapshot(
        klippy_state=klippy_state)
    cmds.temperature({"bed": 60}, snap)
    assert session.bridge.scripts == []
    assert session.audits == ["cloud temperature: refused, printer not ready"]


@pytest.mark.parametrize("data", [
    {"bed": "abc"}, {"tool0": "200\nM112"}, {"bed": None}, {"bed": [200]},
    {"bed": float("nan")}, [], "hot"])
def test_a_bad_target_is_a_protocol_error(data):
    session, cmds = commands()
    with pytest.raises(protocol.ProtocolError):
        cmds.temperature(data, snapshot())
    assert session.bridge.scripts == []


# ------------------------------------------------------------ macro buttons

def test_the_command_list_names_each_listed_macro():
    _, cmds = commands(cloud_macros=("LOAD_FILAMENT", "PURGE_LINE"))
    assert cmds.command_list() == [
        {"label": "Load Filament", "command": "macro/LOAD_FILAMENT"},
        {"label": "Purge Line", "command": "macro/PURGE_LINE"}]


def test_a_listed_macro_runs_by_its_name_alone():
    session, cmds = commands()
    cmds.custom_command({"command": "macro/LOAD_FILAMENT"}, snapshot())
    assert session.bridge.scripts == ["LOAD_FILAMENT"]
    assert session.audits == ["cloud customCommand: running LOAD_FILAMENT"]


@pytest.mark.parametrize("command", [
    "macro/SAVE_CONFIG", "LOAD_FILAMENT", "macro/load_filament",
    "macro/LOAD_FILAMENT TEMP=300", 5, None])
def test_anything_but_a_listed_macro_is_refused(command):
    session, cmds = commands()
    cmds.custom_command({"command": command}, snapshot())
    assert session.bridge.scripts == []
    assert session.audits == [
        "cloud customCommand: refused, not a listed macro"]


def test_a_macro_waits_for_a_ready_printer():
    session, cmds = commands()
    cmds.custom_command({"command": "macro/LOAD_FILAMENT"},
                        snapshot(klippy_state="shutdown"))
    assert session.bridge.scripts == []


@pytest.mark.parametrize("data", [
    [], "macro/LOAD_FILAMENT",
    {"command": "macro/LOAD_FILAMENT", "serialNumber": "KL999999"}])
def test_a_malformed_macro_request_is_a_protocol_error(data):
    _, cmds = commands()
    with pytest.raises(protocol.ProtocolError):
        cmds.custom_command(data, snapshot())


# ------------------------------------------------------------- raw G-code

def test_raw_gcode_stays_off_unless_allowed():
    session = send("G28", allow_raw_gcode=False)
    assert session.bridge.scripts == []
    assert session.audits == ["cloud command: refused (allow_raw_gcode is"
                              " off)"]


# --------------------------------------------------------------- jogging

JOG_ERRORS = [{"command": "home", "axes": ["x", "w"]},
              {"command": "home", "axes": "xyz"},
              {"command": "extrude", "amount": 101},
              {"command": "extrude", "amount": "5"},
              {"command": "jog", "x": 1001},
              {"command": "jog"},
              {"command": "jog", "x": float("inf")},
              {"command": "spin"}]


JOGS = [{"command": "home", "axes": ["x", "y"]},
        {"command": "extrude", "amount": -3},
        {"command": "jog", "x": 5, "z": -1},
        {"command": "jog", "y": 10, "absolute": True}]


def jog(request: dict) -> FakePort:
    session = trusted_port()
    RemoteCommands(session).jog({"jogPrinter": request}, READY)
    return session


@pytest.mark.parametrize("request_", JOGS)
def test_every_jog_saves_and_restores_the_gcode_state(request_):
    [script] = jog(request_).bridge.scripts
    lines = script.split("\n")
    assert lines[0] == "SAVE_GCODE_STATE NAME=polar_jog"
    assert lines[-1] == "RESTORE_GCODE_STATE NAME=polar_jog"
    assert all("STATE" not in line for line in lines[1:-1])


@pytest.mark.parametrize("request_", JOGS)
def test_a_failed_jog_restores_the_state_before_reporting(request_):
    session = jog(request_)
    session.bridge.replies[0](False, "Move out of range")
    assert session.bridge.scripts[1:] == [
        "now: RESTORE_GCODE_STATE NAME=polar_jog"]
    assert session.failures == [("jog", "Move out of range")]


def test_a_jog_that_worked_restores_nothing_more():
    session = jog(JOGS[2])
    session.bridge.replies[0](True, "")
    assert len(session.bridge.scripts) == 1 and session.failures == []


@pytest.mark.parametrize("request_", JOG_ERRORS)
def test_a_nonsense_jog_is_a_protocol_error(request_):
    session = trusted_port()
    with pytest.raises(protocol.ProtocolError):
        RemoteCommands(session).jog({"jogPrinter": request_}, READY)
    assert session.bridge.scripts == []


def test_a_jog_is_clamped_to_a_sane_feed_rate():
    [script] = jog({"command": "jog", "x": 1, "speed": 10 ** 6}
                   ).bridge.scripts
    assert "G91\nG1 X1.000 F12000" in script
    [script] = jog({"command": "jog", "x": 1, "speed": 1}).bridge.scripts
    assert "F60" in script


@pytest.mark.parametrize("print_state", ["printing", "paused"])
def test_no_jog_during_a_print(print_state):
    session = trusted_port()
    RemoteCommands(session).jog({"jogPrinter": {"command": "home"}},
                                dict(READY, print_state=print_state))
    assert session.bridge.scripts == []
    assert session.audits == [
        "cloud jogPrinter: refused, printer busy or not ready"]


def test_jogging_stays_off_unless_allowed():
    session = trusted_port(allow_jog=False)
    RemoteCommands(session).jog({"jogPrinter": {"command": "home"}}, READY)
    assert session.bridge.scripts == []
    assert session.audits == ["cloud jogPrinter: refused (allow_jog is off)"]
