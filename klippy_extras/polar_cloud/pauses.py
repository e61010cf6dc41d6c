# Why a print paused: a filament runout, a filament change or a cold pause
#
# The status mapping itself is cloud_status.pause_code (pure).  Here are the
# two pieces with state: PauseReasons, on the reactor, notices the user's
# filament-change macros and remembers, for the whole pause, that it is
# about filament; PauseNotes, on the session thread, tells the console
# once per pause why it happened.
#
# This file may be distributed under the terms of the GNU GPLv3 license.
from __future__ import annotations

import logging
from typing import Callable, Optional

from . import cloud_status, protocol

log = logging.getLogger("polar_cloud")


class PauseReasons:
    """Is the current pause about filament, and why?

    A pause is about filament when an enabled filament sensor sees none
    while paused, or when one of the configured change macros (M600,
    CHANGE_FILAMENT, ...) paused the print.  Klipper tells nobody which
    command is running, so each listed command is wrapped: the wrapper
    notes the macro and runs it unchanged (its errors are its own).  The
    reason holds until the print is no longer paused, so inserting new
    filament does not turn a filament change into a plain pause.  Runs on
    the reactor only.
    """

    def __init__(self, printer, macro_names: tuple):
        self.printer = printer
        self.macro_names = macro_names
        self.pause_resume = None
        self.running = 0
        self.macro = ""
        self.reason = ""
    def wrap_macros(self) -> None:
        """At klippy:ready, once every macro is registered."""
        gcode = self.printer.lookup_object("gcode")
        self.pause_resume = self.printer.lookup_object("pause_resume", None)
        for name in self.macro_names:
            original = gcode.register_command(name, None)
            if original is None:
                if name != "M600":      # the default need not exist
                    log.info("polar_cloud: there is no %s command to watch"
                             " for filament changes", name)
                continue
            try:
                gcode.register_command(name, self._wrapper(name, original))
            except Exception:
                logging.exception("polar_cloud: cannot watch %s", name)
                gcode.register_command(name, original)
    def _wrapper(self, name: str, original: Callable):
        def run_change_macro(gcmd):
            self.running += 1
            self.macro = name
            try:
                original(gcmd)
            finally:
                self.running -= 1
                if not self.running and not self._paused():
                    self.macro = ""     # it did not pause the print
        return run_change_macro
    def _paused(self) -> bool:
        try:
            return bool(self.pause_resume is not None and
                        self.pause_resume.get_status(0.)["is_paused"])
        except Exception:
            logging.exception("polar_cloud: reading pause_resume failed")
            return False
    def sample(self, paused: bool, sensors: dict) -> str:
        """Called with each printer sample: the filament reason of the
        current pause in plain words, '' when there is none."""
        if self.macro and not self.running and not self._paused():
            self.macro = ""             # resumed or cancelled
        if not paused:
            self.reason = ""
            return ""
        if not self.reason:
            empty = [name for name, (detected, enabled)
                     in sorted(sensors.items()) if enabled and not detected]
            if empty:
                self.reason = "filament runout (sensor '%s')" % (empty[0],)
            elif self.macro:
                self.reason = "filament change (%s)" % (self.macro,)
        return self.reason


class PauseNotes:
    """One console line per filament pause, naming the sensor or macro."""

    def __init__(self, console: Callable[[str], None]):
        self.console = console
        self.noted = False
    def watch(self, snap: Optional[dict]) -> None:
        if snap is None:
            return
        if snap.get("print_state") != "paused" \
                or snap.get("klippy_state") != "ready":
            self.noted = False
            return
        if self.noted or cloud_status.pause_code(snap) \
                != protocol.CHANGING_FILAMENT:
            return
        self.noted = True
        why = snap.get("filament_pause") or "filament runout (sensor '%s')" \
            % (cloud_status.runout_sensor(snap),)
        self.console("Polar Cloud: print paused for a %s" % (why,))
