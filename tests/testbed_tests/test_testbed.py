"""The test bed itself: a real klippy of each flavour on the simulated MCU.

One klippy per flavour for the whole module; the tests run in order and
each leaves the printer ready for the next.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.testbed.fixtures import make_klippy  # noqa: F401  (fixture)
from tests.testbed.gcode_files import demo_print
from tests.testbed.klippy import Klippy, KlippyError, link_extra

EXTRA_SRC = Path(__file__).parents[1] / "testbed" / "extras" / "probe_extra"
FLAVOURS = ["klipper", "kalico"]

# printer_cfg.py: steps per mm = full_steps * microsteps / rotation_distance
STEPS_PER_MM = {"gpio0": 200 * 4 / 40, "gpio3": 200 * 4 / 40, "gpio6": 200 * 4 / 8}
E_STEPS_PER_MM = 200 * 4 / 33.5


@pytest.fixture(scope="module", params=FLAVOURS)
def klippy(request: pytest.FixtureRequest, make_klippy):  # noqa: F811
    flavour = request.param
    k = make_klippy(flavour, extra_cfg="[probe_extra]\n",
                    extras={"probe_extra": EXTRA_SRC})
    yield k
    k.stop()


def flavour_of(k: Klippy) -> str:
    return k.flavour.name


def stepper_positions(k: Klippy) -> dict[str, int]:
    return {pin: s["position"] for pin, s in k.mcu.stats()["steppers"].items()}


def test_reaches_ready(klippy: Klippy) -> None:
    info = klippy.call("info")
    assert info["state"] == "ready"
    mcu = klippy.query("mcu")["mcu"]
    assert mcu["mcu_version"] == "simmcu-1.0"
    sim = klippy.mcu.stats()
    assert sim["is_config"] and not sim["is_shutdown"]
    # every configured stepper reached the MCU
    assert set(sim["steppers"]) == {"gpio0", "gpio3", "gpio6", "gpio13"}


def test_linked_extra_loads(klippy: Klippy) -> None:
    flavour = flavour_of(klippy)
    link = link_extra(flavour, EXTRA_SRC, "probe_extra")  # idempotent
    assert link.is_symlink() and link.resolve() == EXTRA_SRC.resolve()
    assert link.parent.name == ("plugins" if flavour == "kalico" else "extras")
    assert os.readlink(link) == str(EXTRA_SRC.resolve())

    tail = klippy.subscribe_output()
    klippy.gcode("PROBE_EXTRA")
    tail.wait_for(r"probe_extra: ok count=1$")
    assert klippy.call("probe_extra/ping") == {"pong": True, "count": 1}
    status = klippy.query("probe_extra")["probe_extra"]
    assert status == {"count": 1, "message": "ok", "ready": True}
    # G-code errors come back as API errors
    with pytest.raises(KlippyError, match="Must home axis first"):
        klippy.gcode("G1 X9999")


def test_home_and_move(klippy: Klippy) -> None:
    klippy.gcode("G28\nM400")  # Kalico retracts after homing: let it finish
    toolhead = klippy.query("toolhead")["toolhead"]
    assert toolhead["homed_axes"] == "xyz"
    start = toolhead["position"]
    before = stepper_positions(klippy)
    klippy.gcode("G90\nG1 X50 Y20 Z10 F6000\nM400")
    end = klippy.query("toolhead")["toolhead"]["position"]
    assert end[:3] == [50.0, 20.0, 10.0]
    after = stepper_positions(klippy)
    for axis, pin in enumerate(("gpio0", "gpio3", "gpio6")):
        moved = abs(after[pin] - before[pin])
        expected = (end[axis] - start[axis]) * STEPS_PER_MM[pin]
        assert moved == pytest.approx(expected, abs=1), pin


def test_heat_bed_and_hotend(klippy: Klippy) -> None:
    klippy.gcode("M190 S50")
    klippy.gcode("M109 S200")
    status = klippy.query("extruder", "heater_bed")
    extruder, bed = status["extruder"], status["heater_bed"]
    assert extruder["target"] == 200.0 and bed["target"] == 50.0
    # control: watermark (max_delta 2) releases M109/M190 at target - 2
    assert extruder["temperature"] >= 198.0
    assert bed["temperature"] >= 48.0
    sim = klippy.mcu.stats()["heaters"]
    assert sim["extruder"]["temp"] == pytest.approx(extruder["temperature"], abs=40)
    assert sim["heater_bed"]["temp"] == pytest.approx(bed["temperature"], abs=15)


def test_print_from_virtual_sdcard(klippy: Klippy) -> None:
    moves, per_move = 300, 0.08
    klippy.write_gcode("demo.gcode", demo_print(moves, extrude_per_move=per_move,
                                                feedrate=12000))
    e_before = stepper_positions(klippy)["gpio13"]
    sub = klippy.subscribe_objects({"print_stats": None, "virtual_sdcard": None})
    assert sub.status["print_stats"]["state"] in ("standby", "complete", "cancelled")
    klippy.gcode("SDCARD_PRINT_FILE FILENAME=demo.gcode")
    sub.wait_for(lambda s: s["print_stats"]["state"] == "printing", timeout=30)
    done = sub.wait_for(lambda s: s["print_stats"]["state"] == "complete", 120)
    stats = done["print_stats"]
    assert stats["filename"] == "demo.gcode"
    # print_stats samples filament only while printing (at each status poll),
    # so the last moves before "complete" may be missing from it
    assert 0.5 * moves * per_move < stats["filament_used"] <= moves * per_move + 1e-6
    assert stats["print_duration"] > 0
    klippy.gcode("M400")  # "complete" means read to the end; let the moves finish
    e_moved = stepper_positions(klippy)["gpio13"] - e_before
    assert abs(e_moved) == pytest.approx(moves * per_move * E_STEPS_PER_MM, abs=2)
    sub.close()


def test_pause_resume_cancel(klippy: Klippy) -> None:
    klippy.write_gcode("long.gcode", demo_print(5000, home=False))
    sub = klippy.subscribe_objects({"print_stats": ["state", "filename"],
                                    "pause_resume": ["is_paused"]})
    klippy.gcode("SDCARD_PRINT_FILE FILENAME=long.gcode")
    sub.wait_for(lambda s: s["print_stats"]["state"] == "printing", timeout=30)
    klippy.gcode("PAUSE")
    st = sub.wait_for(lambda s: s["print_stats"]["state"] == "paused", timeout=30)
    assert st["pause_resume"]["is_paused"] is True
    klippy.gcode("RESUME")
    st = sub.wait_for(lambda s: s["print_stats"]["state"] == "printing", timeout=30)
    assert st["pause_resume"]["is_paused"] is False
    klippy.gcode("CANCEL_PRINT")
    st = sub.wait_for(lambda s: s["print_stats"]["state"] == "cancelled", timeout=30)
    assert st["print_stats"]["filename"] == "long.gcode"
    assert klippy.query("virtual_sdcard")["virtual_sdcard"]["is_active"] is False
    sub.close()


def test_restart_keeps_process_and_mcu(klippy: Klippy) -> None:
    tail = klippy.subscribe_output()
    pid = klippy.pid
    resets = klippy.mcu.stats()["resets"]
    info = klippy.restart()
    assert info["state"] == "ready"
    assert klippy.pid == pid and klippy.is_running()
    sim = klippy.mcu.stats()
    assert sim["resets"] == resets and sim["is_config"]
    assert klippy.query("toolhead")["toolhead"]["homed_axes"] == ""
    # the output subscription came back with the new printer object
    klippy.gcode("M118 after-restart")
    tail.wait_for(r"after-restart")
    assert klippy.query("probe_extra")["probe_extra"]["count"] == 0


def test_mcu_shutdown_then_firmware_restart(klippy: Klippy) -> None:
    resets = klippy.mcu.stats()["resets"]
    klippy.mcu.shutdown("Timer too close")
    info = klippy.wait_state("shutdown", timeout=30)
    assert "Timer too close" in info["state_message"]
    assert klippy.mcu.stats()["shutdown_reason"] == "Timer too close"
    with pytest.raises(KlippyError):
        klippy.gcode("G28")
    klippy.restart(firmware=True)
    sim = klippy.mcu.stats()
    assert sim["resets"] == resets + 1
    assert sim["is_config"] and not sim["is_shutdown"]
    klippy.gcode("G28")
    assert klippy.query("toolhead")["toolhead"]["homed_axes"] == "xyz"


def test_heater_fault_shuts_down(klippy: Klippy) -> None:
    klippy.mcu.heater_fault("extruder", "open")
    try:
        info = klippy.wait_state("shutdown", timeout=30)
    finally:
        klippy.mcu.heater_fault("extruder", None)
    assert "ADC out of range" in info["state_message"]
    klippy.restart(firmware=True)
    assert klippy.call("info")["state"] == "ready"


@pytest.mark.slow
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_clock_wrap_lost_mcu_and_estop(make_klippy, flavour: str) -> None:  # noqa: F811
    """Print across the MCU's 32-bit clock wrap, lose the MCU, power-cycle it."""
    # the 20 MHz clock wraps 2**32 / 20e6 = 214.7 s after it starts
    k = make_klippy(flavour, simmcu_args=["--clock-start", "209"])
    try:
        k.write_gcode("wrap.gcode", demo_print(700, hotend=0, bed=0, feedrate=12000))
        sub = k.subscribe_objects({"print_stats": ["state"]})
        k.gcode("SDCARD_PRINT_FILE FILENAME=wrap.gcode")
        st = sub.wait_for(
            lambda s: s["print_stats"]["state"] in ("complete", "error"), 120)
        assert st["print_stats"]["state"] == "complete"
        assert k.mcu.stats()["clock"] > 2**32
        k.mcu.mute(True)
        info = k.wait_state("shutdown", timeout=30)
        assert "Lost communication with MCU" in info["state_message"]
        k.mcu.mute(False)
        k.mcu.reset()  # klippy cannot reset an MCU it lost: power-cycle it
        k.restart(firmware=True)
        k.emergency_stop()
        info = k.wait_state("shutdown", timeout=30)
        assert k.mcu.stats()["shutdown_reason"] == "Command request"
        k.restart(firmware=True)
        k.gcode("G28")
    finally:
        k.stop()
