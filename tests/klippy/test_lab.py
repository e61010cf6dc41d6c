"""What a school lab needs, in a real klippy against the strict local Polar
Cloud: the build plate gate (status 15, refused jobs, every way to confirm,
across RESTART and a reboot), continuous printing (sendNextPrint after a
completed job only), why a print paused (runout 10, filament change 10,
cold 9) with a real filament_switch_sensor on the simulated MCU, and the
printer make checked against Polar Cloud's list.

One klippy for the module; each test leaves the printer idle with the
plate cleared.
"""
from __future__ import annotations

import json

import pytest

from tests.testbed.gcode_files import demo_print
from tests.testbed.helpers import (
    polar_status,
    print_local,
    start_provisioned,
    wait_objects,
    wait_polar,
    wait_status,
)
from tests.testbed.klippy import KlippyError

RUNOUT_PIN = "gpio30"
BUTTON_PIN = "gpio31"
LAB_CFG = """
[filament_switch_sensor runout]
switch_pin: ^%s
pause_on_runout: True

[gcode_button plate_button]
pin: ^!%s
press_gcode:
  POLAR_PLATE_CLEARED

[gcode_macro M600]
gcode:
  PAUSE

[gcode_macro POLAR_TEST_MACRO]
gcode:
  M140 S0
""" % (RUNOUT_PIN, BUTTON_PIN)
PLATE_BUTTON = {"label": "Build Plate Cleared",
                "command": "polar/plate_cleared"}


@pytest.fixture(scope="module")
def k(make_klippy, sim):
    # The printer make list is held back until the console is listened to
    sim.hold_printer_makes(True)
    try:
        k = start_provisioned(make_klippy, sim, extra_cfg=LAB_CFG,
                              require_plate_clear="True",
                              continuous_printing="True",
                              cloud_macros="POLAR_TEST_MACRO",
                              printer_make="Ender 3 V3", web_url=sim.url)
        k.start_output = k.subscribe_output()
    finally:
        sim.hold_printer_makes(False)
    wait_polar(k, lambda st: st.get("state") == "online")
    return k


def test_an_unknown_printer_make_is_pointed_out_at_start(k, sim):
    line = k.start_output.wait_for(r"printer_make 'Ender 3 V3' is not one")
    k.start_output.close()
    assert "closest: Ender 3 V2, Ender 3 S1 Plus" in line
    assert "Cartesian" in line and "POLAR_PRINTER_MAKES" in line
    assert k.log_text().count("is not one of Polar Cloud's") == 1
    assert sim.file_requests("printer_makes") == 1
    # The list is cached: the command asks the cloud no more
    out = k.subscribe_output()
    k.gcode("POLAR_PRINTER_MAKES FILTER=ender")
    head = out.wait_for(r"printer makes matching")
    names = [out.wait_for(r"^// - ") for _ in range(2)]
    out.close()
    assert head == "// Polar Cloud: 2 Cartesian printer makes matching 'ender'"
    assert names == ["// - Ender 3 S1 Plus", "// - Ender 3 V2"]
    assert sim.file_requests("printer_makes") == 1


def send_job(sim, k, job_id, moves=60, hotend=0, feedrate=3000):
    url = sim.add_file("%s.gcode" % (job_id,), demo_print(
        moves=moves, hotend=hotend, bed=0, feedrate=feedrate).encode())
    since = sim.now()
    assert sim.push_print(k.serial, job_id, job_name="Lab", gcode_url=url)
    return since


def wait_final(sim, k, job_id, since, timeout=90.):
    return sim.wait_for("job", lambda d: d["jobId"] == job_id, since=since,
                        serial=k.serial, timeout=timeout)


def status_line(k, pattern):
    out = k.subscribe_output()
    try:
        k.gcode("POLAR_STATUS")
        return out.wait_for(pattern)
    finally:
        out.close()


def lab_file(k):
    return json.loads((k.state_path / "lab.json").read_text())


def clear_plate(k, sim):
    since = sim.now()
    k.gcode("POLAR_PLATE_CLEARED")
    wait_status(sim, k, since, lambda d: d["status"] == 0)
    assert polar_status(k)["plate_clear"] is True


def test_the_cloud_button_is_offered(k, sim):
    msg = sim.wait_for("customCommandList", serial=k.serial)
    assert msg["commandList"] == [
        {"label": "Polar Test Macro", "command": "macro/POLAR_TEST_MACRO"},
        PLATE_BUTTON]
    assert polar_status(k)["plate_clear"] is True


def test_completed_job_closes_the_gate_and_refuses_jobs(k, sim):
    since = send_job(sim, k, "lab-1")
    final = wait_final(sim, k, "lab-1", since)
    assert final["state"] == "completed"
    wait_polar(k, lambda s: s["plate_clear"] is False and s["next_print"])
    assert lab_file(k) == {"plate_clear": False, "next_print": True}
    # Another job meanwhile is answered at once, with the reason
    out = k.subscribe_output()
    other = send_job(sim, k, "lab-refused")
    refused = wait_final(sim, k, "lab-refused", other)
    line = out.wait_for(r"job lab-refused refused")
    out.close()
    assert refused["state"] == "canceled"
    assert "the build plate has not been cleared" in line
    assert sim.file_requests("lab-refused.gcode") == 0
    # 7 for the completed job, then 15 until the plate is cleared
    wait_status(sim, k, since, lambda d: d["status"] == 7)
    clear = wait_status(sim, k, since, lambda d: d["status"] == 15)
    assert clear["jobId"] == "0"
    assert clear["progress"] == "Clear the build plate"
    assert "POLAR_PLATE_CLEARED" in status_line(k, r"build plate: not cleared")
    assert "once the plate is cleared" in status_line(k, r"next job: ")
    # Not cleared yet: no next job asked for
    assert sim.received("sendNextPrint", serial=k.serial) == []
    assert sim.violations == []


def test_clearing_asks_for_the_next_job_which_prints(k, sim):
    sim.queue_print(k.serial, "lab-next", "Next",
                    gcode_url=sim.add_file("lab-next.gcode", demo_print(
                        moves=60, hotend=0, bed=0, feedrate=3000).encode()))
    since = sim.now()
    out = k.subscribe_output()
    k.gcode("POLAR_PLATE_CLEARED")
    out.wait_for(r"build plate cleared \(G-code\)")
    out.close()
    asked = sim.wait_for("sendNextPrint", since=since, serial=k.serial)
    assert asked == {"serialNumber": k.serial}
    # The cloud's next job comes and prints, and ends in the gate again
    final = wait_final(sim, k, "lab-next", since)
    assert final["state"] == "completed"
    printing = [d for d in sim.received("status", k.serial, since)
                if d["jobId"] == "lab-next"]
    assert any(d["status"] == 3 for d in printing)
    wait_status(sim, k, since, lambda d: d["status"] == 15)
    assert len(sim.received("sendNextPrint", k.serial, since)) == 1
    # Cleared again: the next request finds the cloud's queue empty
    again = sim.now()
    clear_plate(k, sim)
    sim.wait_for("sendNextPrint", since=again, serial=k.serial)
    assert sim.violations == []


def test_cancelled_job_closes_the_gate_without_a_next_job(k, sim):
    since = send_job(sim, k, "lab-cancel", moves=2000, feedrate=600)
    wait_status(sim, k, since, lambda d: d["status"] == 3)
    t = sim.now()
    sim.cancel(k.serial)
    assert wait_final(sim, k, "lab-cancel", since)["state"] == "canceled"
    wait_status(sim, k, t, lambda d: d["status"] == 15)
    assert polar_status(k)["next_print"] is False
    # Confirmed from the /polar-cloud/ page: the webhooks endpoint wants
    # the token only a read of polar_cloud/status gives
    with pytest.raises(KlippyError, match="token"):
        k.call("polar_cloud/plate_cleared", {"token": "guess"})
    token = k.call("polar_cloud/status")["token"]
    cleared = sim.now()
    assert k.call("polar_cloud/plate_cleared", {"token": token}) == {
        "plate_clear": True}
    wait_status(sim, k, cleared, lambda d: d["status"] == 0)
    # A status after the clearing: a sendNextPrint would have gone first
    assert sim.received("sendNextPrint", k.serial, t) == []


def test_local_print_closes_the_gate_and_a_button_opens_it(k, sim):
    since = print_local(k, sim, "local.gcode", moves=60, hotend=0, bed=0,
                        feedrate=3000)
    wait_status(sim, k, since, lambda d: d["status"] == 1)
    wait_status(sim, k, since, lambda d: d["status"] == 15)
    # A physical button (gcode_button) runs POLAR_PLATE_CLEARED
    pressed = sim.now()
    k.mcu.set_pin(BUTTON_PIN, 0)
    wait_objects(k, {"gcode_button plate_button": ["state"]},
                 lambda st: st["gcode_button plate_button"]["state"]
                 == "PRESSED")
    k.mcu.set_pin(BUTTON_PIN, 1)
    wait_status(sim, k, pressed, lambda d: d["status"] == 0)
    assert polar_status(k)["plate_clear"] is True
    assert sim.received("sendNextPrint", k.serial, since) == []


def test_the_gate_survives_restart_and_reboot(k, sim):
    since = print_local(k, sim, "local2.gcode", moves=30, hotend=0, bed=0,
                        feedrate=3000)
    wait_status(sim, k, since, lambda d: d["status"] == 15)
    for restart in (k.restart, lambda: reboot(k)):
        t = sim.now()
        restart()
        hello = sim.wait_event("authenticated", since=t, serial=k.serial,
                               direction="conn", ok=None)
        first = sim.wait_for("status", since=hello.t, serial=k.serial)
        assert first["status"] == 15, restart
        assert polar_status(k)["plate_clear"] is False
    # The cloud button clears it
    t = sim.now()
    sim.custom_command(k.serial, "polar/plate_cleared")
    wait_status(sim, k, t, lambda d: d["status"] == 0)
    assert lab_file(k)["plate_clear"] is True


def reboot(k):
    k.stop()
    k.start()
    wait_polar(k, lambda st: st.get("state") == "online")


def test_runout_pauses_with_status_10_and_resumes_to_3(k, sim):
    since = send_job(sim, k, "lab-runout", moves=2000, feedrate=600)
    wait_status(sim, k, since, lambda d: d["status"] == 3)
    out = k.subscribe_output()
    t = sim.now()
    k.mcu.set_pin(RUNOUT_PIN, 0)            # the filament runs out
    paused = wait_status(sim, k, t, lambda d: d["status"] == 10)
    assert paused["jobId"] == "lab-runout"
    assert paused["progressDetail"].startswith("Paused: ")
    line = out.wait_for(r"print paused for a filament runout")
    out.close()
    assert "sensor 'runout'" in line
    # klippy's own PAUSE follows the runout after pause_delay
    wait_objects(k, {"pause_resume": ["is_paused"]},
                 lambda st: st["pause_resume"]["is_paused"])
    k.mcu.set_pin(RUNOUT_PIN, 1)            # new filament, still paused
    t = sim.now()
    sim.resume(k.serial)
    wait_status(sim, k, t, lambda d: d["status"] == 3)
    statuses = [d["status"] for d in sim.received("status", k.serial, since)
                if d["jobId"] == "lab-runout"]
    assert 4 not in statuses and 9 not in statuses
    sim.cancel(k.serial)
    wait_final(sim, k, "lab-runout", since)
    wait_status(sim, k, since, lambda d: d["status"] == 15)
    clear_plate(k, sim)


def test_filament_change_and_cold_pause(k, sim):
    since = send_job(sim, k, "lab-pauses", moves=2000, hotend=200,
                     feedrate=600)
    wait_status(sim, k, since, lambda d: d["status"] == 3, timeout=120)
    # A plain pause, hotend still hot
    t = sim.now()
    sim.pause(k.serial)
    wait_status(sim, k, t, lambda d: d["status"] == 4)
    # ... becomes a cold pause when the hotend heater is turned off
    t = sim.now()
    k.gcode("SET_HEATER_TEMPERATURE HEATER=extruder TARGET=0")
    cold = wait_status(sim, k, t, lambda d: d["status"] == 9)
    assert cold["jobId"] == "lab-pauses"
    t = sim.now()
    sim.resume(k.serial)
    wait_status(sim, k, t, lambda d: d["status"] == 3)
    # The user's filament change macro (M600) pauses: 10, then back to 3
    out = k.subscribe_output()
    t = sim.now()
    k.gcode("M600")
    wait_status(sim, k, t, lambda d: d["status"] == 10)
    out.wait_for(r"print paused for a filament change \(M600\)")
    out.close()
    t = sim.now()
    k.gcode("RESUME")
    wait_status(sim, k, t, lambda d: d["status"] == 3)
    sim.cancel(k.serial)
    wait_final(sim, k, "lab-pauses", since)
    wait_status(sim, k, since, lambda d: d["status"] == 15)
    clear_plate(k, sim)
    assert sim.received("sendNextPrint", k.serial, since) == []
    assert sim.violations == []
