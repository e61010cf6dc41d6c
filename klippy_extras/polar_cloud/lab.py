# What a school lab needs between prints: the build plate gate and
# continuous printing
#
# require_plate_clear: after every print (cloud or local, completed,
# cancelled or failed) the printer reports status 15 and refuses cloud
# jobs until someone confirms the build plate is clear (POLAR_PLATE_CLEARED,
# the /polar-cloud/ page, or the cloud button).  continuous_printing:
# after a completed cloud job (and the gate), ask Polar Cloud for the next
# queued job with sendNextPrint.
#
# Runs on the cloud session's thread; the gate is kept in lab.json in
# state_path so it survives RESTART and reboots.
#
# This file may be distributed under the terms of the GNU GPLv3 license.
from __future__ import annotations

import logging
import os
from typing import Optional

from .statefiles import StateFileError, ensure_state_dir, read_json, write_json

log = logging.getLogger("polar_cloud")

LAB_FILE = "lab.json"
# The cloud button (customCommandList / customCommand)
PLATE_COMMAND = "polar/plate_cleared"
PLATE_LABEL = "Build Plate Cleared"
NEXT_PRINT_CAPABILITY = "sendNextPrint"
NOT_CLEARED = "the build plate has not been cleared"


class LabWorkflow:
    def __init__(self, session):
        self.session = session
        options = session.options
        self.required = options.require_plate_clear
        self.continuous = options.continuous_printing
        self.path = os.path.join(options.state_path, LAB_FILE)
        # Until lab.json has been read a gated printer counts as not
        # cleared: a restart never opens the gate by itself
        self.plate_clear = not self.required
        # A sendNextPrint owed for a completed cloud job
        self.next_print = False
        # Prints that ended in this klippy (printer_state counts them)
        self.ends_seen = 0
        self.capabilities_noted = False
    # Persistence (session thread)
    def load(self) -> None:
        if not (self.required or self.continuous):
            return
        try:
            data = read_json(self.path)
            if data is not None and not isinstance(data, dict):
                raise StateFileError("%s is not an object" % (self.path,))
        except StateFileError as e:
            # Unreadable: the safe side is a plate nobody confirmed
            log.warning("polar_cloud: %s; the build plate counts as not"
                        " cleared", e)
            data = {"plate_clear": False}
        data = data or {}
        self.plate_clear = not self.required \
            or data.get("plate_clear", True) is not False
        self.next_print = self.continuous and data.get("next_print") is True
        self.session.publish()
    def save(self) -> None:
        """Write lab.json, then show the change (printer.polar_cloud)."""
        if not self.session.abandoned:
            try:
                ensure_state_dir(os.path.dirname(self.path))
                write_json(self.path, {"plate_clear": self.plate_clear,
                                       "next_print": self.next_print})
            except (OSError, StateFileError) as e:
                log.warning("polar_cloud: cannot save %s: %s", LAB_FILE, e)
        self.session.publish()
    # Watching the printer
    def watch(self, snap: Optional[dict]) -> None:
        """Each tick: did a print end since the last look?"""
        if snap is None:
            return
        ends = snap.get("print_ends", 0)
        if ends != self.ends_seen:
            self.ends_seen = ends
            self.print_ended()
        elif self.next_print and snap.get("print_state") == "printing":
            # Somebody started a print here first: no job to ask for now
            log.info("polar_cloud: a print started; not asking Polar Cloud"
                     " for the next job")
            self.next_print = False
            self.save()
    def stopping(self, snap: Optional[dict]) -> None:
        """klippy is restarting or stopping: a print still running ends
        with it, and leaves the plate as it is."""
        self.watch(snap)
        if snap is not None and snap.get("klippy_state") == "ready" \
                and snap.get("print_state") in ("printing", "paused"):
            self.print_ended()
    def print_ended(self) -> None:
        if not self.required or not self.plate_clear:
            return
        self.plate_clear = False
        self.save()
        log.info("polar_cloud: a print ended; waiting for the build plate"
                 " to be cleared")
        self.session.console("Polar Cloud: clear the build plate, then"
                             " confirm with POLAR_PLATE_CLEARED")
        self.session.status_now()
    # Hooks for jobs and commands
    def refusal(self) -> str:
        """Why a cloud print cannot start now, '' if it can."""
        if self.required and not self.plate_clear:
            return NOT_CLEARED
        return ""
    def job_finished(self, state: str) -> None:
        """A cloud job ended: completed ones may ask for the next."""
        owed = self.continuous and state == "completed"
        if owed != self.next_print:
            self.next_print = owed
            self.save()
    def command_list(self) -> list[dict]:
        if not self.required:
            return []
        return [{"label": PLATE_LABEL, "command": PLATE_COMMAND}]
    def plate_cleared(self, source: str) -> None:
        """Someone confirmed the plate is clear (console, page, cloud)."""
        if not self.required:
            self.session.console("Polar Cloud: require_plate_clear is off;"
                                 " nothing to confirm")
            return
        was_clear, self.plate_clear = self.plate_clear, True
        if not was_clear:
            self.save()
            log.info("polar_cloud: build plate cleared (%s)", source)
            self.session.status_now()
        self.session.console("Polar Cloud: build plate cleared (%s); ready"
                             " for the next print" % (source,))
    def capabilities(self, names: list) -> None:
        if self.continuous and NEXT_PRINT_CAPABILITY not in names \
                and not self.capabilities_noted:
            self.capabilities_noted = True
            log.info("polar_cloud: Polar Cloud does not list %s among its"
                     " capabilities (%s); continuous printing may not work",
                     NEXT_PRINT_CAPABILITY, ", ".join(names[:8]) or "none")
    # Online work: the next print
    def online_work(self) -> None:
        if not (self.next_print and self.plate_clear):
            return
        if self.session.jobs.outbox:
            return          # the cloud hears of the finished job first
        if self.session.emit(NEXT_PRINT_CAPABILITY,
                             {"serialNumber": self.session.serial()}):
            self.next_print = False
            self.save()
            log.info("polar_cloud: asked Polar Cloud for the next job")
            self.session.console("Polar Cloud: asking for the next job in"
                                 " the queue")


def status_lines(options, public: dict) -> list[str]:
    """POLAR_STATUS lines, from the session's public view (reactor)."""
    lines = []
    if options.require_plate_clear:
        lines.append("build plate: %s" % (
            "clear" if public["plate_clear"] else
            "not cleared (confirm with POLAR_PLATE_CLEARED)"))
    if options.continuous_printing and public["next_print"]:
        lines.append("next job: will be requested%s" % (
            "" if public["plate_clear"] else " once the plate is cleared"))
    return lines
