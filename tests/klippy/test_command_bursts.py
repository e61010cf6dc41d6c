"""Cloud commands arriving in bursts while klippy's G-code queue is busy:
a print waiting in M190 holds the G-code mutex, and every cloud command
that reaches the reactor then waits for it.  At most one may wait; the
rest wait in the session, coalesced."""
from __future__ import annotations

import pytest

from tests.testbed.gcode_files import demo_print
from tests.testbed.helpers import health_problems, log_size, send_marker

MACROS = """
[gcode_macro POLAR_NOTE]
gcode:
  M117 polar
"""
BURST = 300


@pytest.fixture(scope="module", params=["klipper", "kalico"])
def k(request, online_klippy):
    return online_klippy(flavour=request.param, extra_cfg=MACROS,
                         cloud_macros="POLAR_NOTE")


def heater_bed(k) -> dict:
    return k.query("heater_bed")["heater_bed"]


def wait_print(k, predicate, timeout=90.):
    sub = k.subscribe_objects({"print_stats": ["state"],
                               "heater_bed": ["target"]})
    try:
        return sub.wait_for(predicate, timeout=timeout)
    finally:
        sub.close()


def test_command_burst_during_m190_keeps_the_print(k, sim):
    start = log_size(k)
    k.mcu.set_heater("heater_bed", 25.)      # M190 waits until released
    k.write_gcode("burst.gcode", demo_print(moves=200, hotend=0, bed=60,
                                            home=True))
    k.gcode('SDCARD_PRINT_FILE FILENAME="burst.gcode"')
    wait_print(k, lambda st: st["print_stats"]["state"] == "printing"
               and st["heater_bed"]["target"] == 60.)
    targets = [50 + (i % 9) for i in range(BURST)] + [57]
    for target in targets:
        sim.temperature(k.serial, bed=target)
    for _ in range(BURST // 3):
        sim.custom_command(k.serial, "macro/POLAR_NOTE")
        sim.pause(k.serial)
        sim.resume(k.serial)
    # Events are handled in order: once the marker is reported, the
    # session has taken every command above
    send_marker(sim, k.serial, "after-burst")
    assert health_problems(k, start) == []
    k.mcu.set_heater("heater_bed", None)
    # The last word of the burst was resume: the print goes on
    final = wait_print(k, lambda st: st["heater_bed"]["target"] == 57.
                       and st["print_stats"]["state"] in ("printing",
                                                          "complete"))
    assert final["heater_bed"]["target"] == 57.
    assert health_problems(k, start) == []
    assert k.query("pause_resume")["pause_resume"]["is_paused"] is False
    if final["print_stats"]["state"] == "printing":
        k.gcode("CANCEL_PRINT")
