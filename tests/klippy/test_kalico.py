"""The same extra, unchanged, on Kalico (the second klippy flavour):
register, status through a local print, a filament runout and change, a
cloud job, RESTART."""
from __future__ import annotations

import pytest

from tests.testbed.gcode_files import demo_print
from tests.testbed.helpers import (
    gcode_then_status,
    print_local,
    register,
    wait_objects,
    wait_polar,
    wait_status,
)

pytestmark = pytest.mark.kalico

RUNOUT_CFG = """
[filament_switch_sensor runout]
switch_pin: ^gpio30
pause_on_runout: True

[gcode_macro M600]
gcode:
  PAUSE
"""


@pytest.fixture(scope="module")
def k(polar_klippy, sim):
    k = polar_klippy("kalico", extra_cfg=RUNOUT_CFG)
    k.serial = register(k, sim)
    return k


def test_local_print_status_on_kalico(k, sim):
    since = print_local(k, sim, "local.gcode", moves=300, hotend=0, bed=0,
                        feedrate=3000)
    assert wait_status(sim, k, since, lambda d: d["status"] == 1)["jobId"] == "123"
    gcode_then_status(sim, k, "PAUSE", 4)
    t = sim.now()
    k.gcode("RESUME")
    wait_status(sim, k, t, lambda d: d["status"] == 1)
    wait_status(sim, k, t, lambda d: d["status"] == 0, timeout=120)
    assert sim.violations == []


def test_filament_pauses_on_kalico(k, sim):
    """Kalico's own filament sensor and a wrapped M600 both give 10."""
    since = print_local(k, sim, "long.gcode", moves=2000, hotend=0, bed=0,
                        feedrate=600)
    wait_status(sim, k, since, lambda d: d["status"] == 1)
    t = sim.now()
    k.mcu.set_pin("gpio30", 0)
    assert wait_status(sim, k, t, lambda d: d["status"] == 10)["jobId"] == "123"
    wait_objects(k, {"pause_resume": ["is_paused"]},
                 lambda st: st["pause_resume"]["is_paused"])
    k.mcu.set_pin("gpio30", 1)
    gcode_then_status(sim, k, "RESUME", 1)
    gcode_then_status(sim, k, "M600", 10)
    gcode_then_status(sim, k, "CANCEL_PRINT", 0)
    assert sim.violations == []


def test_cloud_job_on_kalico(k, sim):
    url = sim.add_file("kal.gcode", demo_print(
        moves=100, hotend=0, bed=0, feedrate=3000).encode())
    since = sim.now()
    sim.push_print(k.serial, "kal-1", job_name="Kalico part", gcode_url=url)
    wait_status(sim, k, since, lambda d: d["status"] == 3)
    final = sim.wait_for("job", lambda d: d["jobId"] == "kal-1", since=since,
                         serial=k.serial, timeout=120)
    assert final["state"] == "completed"
    assert (k.gcodes_dir / "Kalico_part_polar-kal-1.gcode").exists()


def test_restart_on_kalico_keeps_one_session(k, sim):
    for _ in range(3):
        hellos = sim.connects(k.serial)
        k.restart()
        sim.wait_until(lambda h=hellos: sim.connects(k.serial) > h,
                       timeout=60)
        sim.wait_until(lambda: sim.live_sessions(k.serial) == 1, timeout=30)
    wait_polar(k, lambda s: s["state"] == "online")
    assert sim.violations == []
