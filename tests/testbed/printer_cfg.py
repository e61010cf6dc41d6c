"""printer.cfg for the test printer: a fast cartesian machine on the simulated MCU.

Pins follow tests/testbed/simmcu.py: the extruder heater is gpio20 read back
on analog0, the bed heater gpio21 on analog1 (both modelled thermally), the
endstops trigger after their homing stepper moved a few hundred steps.
"""

from __future__ import annotations

from pathlib import Path

BASE_CFG = """\
# Test printer for the polar_cloud test bed (simulated MCU, see simmcu.py)
[mcu]
serial: {pty}
restart_method: command

[printer]
kinematics: cartesian
max_velocity: 500
max_accel: 20000
max_z_velocity: 50
max_z_accel: 1000
square_corner_velocity: 20

[stepper_x]
step_pin: gpio0
dir_pin: gpio1
enable_pin: !gpio2
microsteps: 4
rotation_distance: 40
endstop_pin: ^gpio10
position_endstop: 0
position_max: 200
homing_speed: 100
second_homing_speed: 50
homing_retract_dist: 5

[stepper_y]
step_pin: gpio3
dir_pin: gpio4
enable_pin: !gpio5
microsteps: 4
rotation_distance: 40
endstop_pin: ^gpio11
position_endstop: 0
position_max: 200
homing_speed: 100
second_homing_speed: 50
homing_retract_dist: 5

[stepper_z]
step_pin: gpio6
dir_pin: gpio7
enable_pin: !gpio8
microsteps: 4
rotation_distance: 8
endstop_pin: ^gpio12
position_endstop: 0
position_max: 180
homing_speed: 25
second_homing_speed: 10
homing_retract_dist: 2

[extruder]
step_pin: gpio13
dir_pin: gpio14
enable_pin: !gpio15
microsteps: 4
rotation_distance: 33.5
nozzle_diameter: 0.400
filament_diameter: 1.750
max_extrude_only_distance: 500
max_extrude_cross_section: 50
heater_pin: gpio20
sensor_type: Generic 3950
sensor_pin: analog0
control: watermark
min_temp: 0
max_temp: 320
min_extrude_temp: 0

[heater_bed]
heater_pin: gpio21
sensor_type: Generic 3950
sensor_pin: analog1
control: watermark
min_temp: 0
max_temp: 150

[fan]
pin: gpio22

[virtual_sdcard]
path: {gcodes}

[pause_resume]

[display_status]

[idle_timeout]

[respond]
"""


def printer_cfg(pty: str | Path, gcodes_dir: str | Path, extra: str = "") -> str:
    """The test printer's printer.cfg, with `extra` sections appended."""
    text = BASE_CFG.format(pty=pty, gcodes=gcodes_dir)
    if extra:
        text += "\n" + extra.strip("\n") + "\n"
    return text
