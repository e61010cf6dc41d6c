# Reading printer state from Klipper objects, on the reactor thread only
#
# This file may be distributed under the terms of the GNU GPLv3 license.
from __future__ import annotations

import os
import time
from typing import Any, Callable, Optional

from .protocol import finite_number

FILAMENT_SENSORS = ("filament_switch_sensor ", "filament_motion_sensor ")


def heater_key(name: str) -> Optional[str]:
    """Cloud field name for a Klipper heater object, if it has one."""
    if name == "extruder":
        return "tool0"
    if name.startswith("extruder") and name[8:].isdigit():
        return "tool%d" % (int(name[8:]),)
    if name == "heater_bed":
        return "bed"
    if name.split()[-1] == "chamber" or name == "heater_chamber":
        return "chamber"
    return None


def _number(value: Any) -> float:
    """A G-code file can drive Klipper's counters to inf or nan (G92 E1e999):
    the snapshot holds finite numbers only."""
    return float(value) if finite_number(value) else 0.


def _layer(value: Any) -> Optional[int]:
    """SET_PRINT_STATS_INFO CURRENT_LAYER, if it is a sane layer number."""
    if isinstance(value, int) and not isinstance(value, bool) \
            and 0 <= value < 10 ** 7:
        return value
    return None


class PrinterSampler:
    """Builds a small, JSON-safe snapshot of the printer for the cloud."""

    def __init__(self, printer,
                 pause_reason: Optional[Callable[[bool, dict], str]] = None):
        self.printer = printer
        self.print_stats = None
        self.sdcard = None
        self.heaters: dict[str, object] = {}
        self.sensors: dict[str, object] = {}
        # Asked on each sample (paused?, filament sensors): why the print
        # is paused if it is for filament, else '' (pauses.py)
        self.pause_reason = pause_reason
        self.last_key = None
        self.static: dict = {"sdcard_dir": "", "heaters": {}}
        # Prints that ended (printing or paused, then anything else) in
        # this klippy, counted here so the session cannot miss a short one
        self.in_print = False
        self.print_ends = 0
        self.print_hotend_target = 0.
    def find_objects(self) -> None:
        lookup = self.printer.lookup_object
        self.print_stats = lookup("print_stats", None)
        self.sdcard = lookup("virtual_sdcard", None)
        heaters = {}
        pheaters = lookup("heaters", None)
        names = []
        if pheaters is not None:
            status = pheaters.get_status(0.)
            names = list(status.get("available_heaters", []))
            # A plain chamber sensor reports a temperature without a target
            names += [n for n in status.get("available_sensors", [])
                      if heater_key(n) == "chamber"]
        for name in names:
            key = heater_key(name)
            obj = lookup(name, None)
            if key is not None and key not in heaters and obj is not None:
                heaters[key] = obj
        self.heaters = heaters
        self.sensors = {name.split()[-1]: obj for name, obj
                        in self.printer.lookup_objects()
                        if name.startswith(FILAMENT_SENSORS)}
        self.static = {"sdcard_dir": self._sdcard_dir(),
                       "heaters": self._heater_limits(heaters)}
    def _settings(self) -> dict:
        configfile = self.printer.lookup_object("configfile")
        return configfile.get_status(0.).get("settings", {})
    def _sdcard_dir(self) -> str:
        path = self._settings().get("virtual_sdcard", {}).get("path")
        if not path:
            return ""
        return os.path.normpath(os.path.expanduser(path))
    def _heater_limits(self, heaters: dict) -> dict:
        settings = self._settings()
        limits = {}
        for key, obj in heaters.items():
            name = self._object_name(obj)
            section = settings.get(name, {})
            limits[key] = {"name": name, "gcode_name": name.split()[-1],
                           "min": section.get("min_temp"),
                           "max": section.get("max_temp")}
        return limits
    def _object_name(self, obj) -> str:
        for name, candidate in self.printer.lookup_objects():
            if candidate is obj:
                return name
        return ""
    def sample(self, eventtime: float) -> tuple[dict, bool]:
        """Return (snapshot, changed since the last sample)."""
        message, category = self.printer.get_state_message()
        snap = {"klippy_state": category, "wall_time": time.time(),
                "mono": time.monotonic(),
                "static": self.static,
                "state_message": message.strip().split("\n")[0][:200]
                if category in ("shutdown", "error") else ""}
        if self.print_stats is not None:
            ps = self.print_stats.get_status(eventtime)
            # SET_PRINT_STATS_INFO CURRENT_LAYER=...: None unless the file
            # reports layers (timelapse frames follow them)
            info = ps.get("info") or {}
            snap.update(print_state=ps["state"], filename=ps["filename"],
                        print_duration=_number(ps["print_duration"]),
                        total_duration=_number(ps["total_duration"]),
                        filament_used=_number(ps["filament_used"]),
                        print_message=ps["message"],
                        current_layer=_layer(info.get("current_layer")))
        if self.sdcard is not None:
            sd = self.sdcard.get_status(eventtime)
            snap.update(progress=_number(sd["progress"]),
                        is_active=sd["is_active"],
                        file_position=sd["file_position"],
                        file_size=sd["file_size"],
                        file_path=sd["file_path"] or "")
        heaters = {}
        for key, heater in self.heaters.items():
            hs = heater.get_status(eventtime)
            heaters[key] = (_number(hs.get("temperature", 0.)),
                            _number(hs.get("target", 0.)))
        snap["heaters"] = heaters
        self._sample_print(snap, category, eventtime)
        key = (category, snap.get("print_state"), snap.get("filename"),
               snap.get("is_active"), snap.get("current_layer"),
               snap["filament_pause"],
               tuple(snap["filament_sensors"].values()),
               tuple(round(t[1], 1) for t in heaters.values()))
        changed = key != self.last_key
        self.last_key = key
        return snap, changed
    def _sample_print(self, snap: dict, category: str,
                      eventtime: float) -> None:
        """What the pause reasons and the build plate gate need."""
        state = snap.get("print_state")
        in_print = category == "ready" and state in ("printing", "paused")
        if self.in_print and not in_print:
            self.print_ends += 1
        self.in_print = in_print
        hotend = snap["heaters"].get("tool0")
        if state == "printing" and hotend is not None:
            self.print_hotend_target = hotend[1]
        snap["print_ends"] = self.print_ends
        snap["print_hotend_target"] = self.print_hotend_target
        sensors = {}
        for name, obj in self.sensors.items():
            st = obj.get_status(eventtime)
            sensors[name] = (bool(st.get("filament_detected")),
                             bool(st.get("enabled")))
        snap["filament_sensors"] = sensors
        snap["filament_pause"] = self.pause_reason(
            state == "paused", sensors) if self.pause_reason else ""
