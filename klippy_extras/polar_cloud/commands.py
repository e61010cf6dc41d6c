# Cloud commands besides print jobs: heater targets, macro buttons, and
# the opt-in raw G-code and jogging.  Runs on the session thread; every
# G-code built here comes from validated numbers or listed names only.
#
# This file may be distributed under the terms of the GNU GPLv3 license.
from __future__ import annotations

import logging
from typing import Any, Optional

from . import protocol
from .lab import PLATE_COMMAND

log = logging.getLogger("polar_cloud")

MACRO_PREFIX = "macro/"
MAX_RAW = 1000
DENIED_COMMANDS = {"SAVE_CONFIG", "RESTART", "FIRMWARE_RESTART",
                   "SET_KINEMATIC_POSITION", "RUN_SHELL_COMMAND",
                   "SDCARD_PRINT_FILE", "POLAR_REGISTER", "POLAR_UNREGISTER"}
MAX_JOG = 1000.
MAX_FEED = 12000.


def _number(value: Any, what: str) -> float:
    if not protocol.finite_number(value):
        raise protocol.ProtocolError("%s is not a number" % (what,))
    return float(value)


class RemoteCommands:
    def __init__(self, session):
        self.session = session
        self.options = session.options
        self.sequence = 0
    def _unique(self, kind: str) -> str:
        """A queue key for commands that must each run (never coalesced)."""
        self.sequence += 1
        return "%s:%d" % (kind, self.sequence)
    def _ready(self, snap: Optional[dict]) -> bool:
        return snap is not None and snap.get("klippy_state") == "ready"
    def _audit(self, event: str, decision: str) -> None:
        self.session.rlog("cmd:%s:%s" % (event, decision[:30]),
                          "cloud %s: %s", event, decision)
    # temperature
    def temperature(self, data: Any, snap: Optional[dict]) -> None:
        targets = protocol.parse_temperature(data, self.session.serial())
        if not self._ready(snap):
            self._audit("temperature", "refused, printer not ready")
            return
        heaters = snap["static"]["heaters"]
        for key, target in sorted(targets.items()):
            heater = heaters.get(key)
            if heater is None or heater.get("max") is None:
                self._audit("temperature", "no heater for %s" % (key,))
                continue
            clamped = min(max(target, 0.), heater["max"])
            if clamped != target:
                self._audit("temperature", "%s %.1f clamped to %.1f"
                            % (key, target, clamped))
            # The latest target per heater wins over one still waiting
            self.session.run_gcode(
                "heater:" + key, "SET_HEATER_TEMPERATURE HEATER=%s TARGET=%.1f"
                % (heater["gcode_name"], clamped),
                self.session.report_failure("temperature"))
    # macro buttons (customCommandList / customCommand)
    def command_list(self) -> list[dict]:
        return [{"label": name.replace("_", " ").title(),
                 "command": MACRO_PREFIX + name}
                for name in self.options.cloud_macros] \
            + self.session.lab.command_list()
    def custom_command(self, data: Any, snap: Optional[dict]) -> None:
        if not isinstance(data, dict):
            raise protocol.ProtocolError("customCommand: not an object")
        protocol.check_serial(data, self.session.serial(), "customCommand")
        command = data.get("command")
        if command == PLATE_COMMAND and self.session.lab.command_list():
            self._audit("customCommand", "build plate cleared")
            self.session.lab.plate_cleared("Polar Cloud")
            return
        name = command[len(MACRO_PREFIX):] if isinstance(command, str) \
            and command.startswith(MACRO_PREFIX) else None
        if name not in self.options.cloud_macros:
            self._audit("customCommand", "refused, not a listed macro")
            return
        if not self._ready(snap):
            self._audit("customCommand", "refused, printer not ready")
            return
        self._audit("customCommand", "running %s" % (name,))
        self.session.run_gcode("macro:" + name, name,
                               self.session.report_failure(name))
    # raw G-code (allow_raw_gcode)
    def raw_gcode(self, data: Any, snap: Optional[dict]) -> None:
        if not self.options.allow_raw_gcode:
            self._audit("command", "refused (allow_raw_gcode is off)")
            return
        if not isinstance(data, dict):
            raise protocol.ProtocolError("command: not an object")
        protocol.check_serial(data, self.session.serial(), "command")
        script = data.get("command")
        if isinstance(script, list) and all(isinstance(x, str)
                                            for x in script):
            script = "\n".join(script)
        if not isinstance(script, str) or len(script) > MAX_RAW:
            raise protocol.ProtocolError("command: not a G-code string")
        problem = self._check_script(script)
        if problem or not self._ready(snap):
            self._audit("command", "refused, %s"
                        % (problem or "printer not ready"))
            return
        self._audit("command", "running %d line(s)"
                    % (len(script.splitlines()),))
        self.session.run_gcode(self._unique("raw"), script,
                               self.session.report_failure("G-code"))
    def _check_script(self, script: str) -> str:
        if "{" in script or "}" in script:
            return "templates are not allowed"
        for line in script.splitlines():
            word = line.split(";", 1)[0].strip().split(" ", 1)[0].upper()
            if word in DENIED_COMMANDS:
                return "%s is never run from the cloud" % (word,)
        return ""
    # jogging (allow_jog)
    def jog(self, data: Any, snap: Optional[dict]) -> None:
        if not self.options.allow_jog:
            self._audit("jogPrinter", "refused (allow_jog is off)")
            return
        if not isinstance(data, dict) or not isinstance(
                data.get("jogPrinter"), dict):
            raise protocol.ProtocolError("jogPrinter: not an object")
        if not self._ready(snap) or snap.get("print_state") in ("printing",
                                                                "paused"):
            self._audit("jogPrinter", "refused, printer busy or not ready")
            return
        self.session.run_gcode(self._unique("jog"),
                               self._jog_script(data["jogPrinter"]),
                               self.session.report_failure("jog"))
    def _jog_script(self, req: dict) -> str:
        command = req.get("command")
        if command == "home":
            axes = req.get("axes", ["x", "y", "z"])
            if not isinstance(axes, list) or not set(map(str, axes)) <= {
                    "x", "y", "z"}:
                raise protocol.ProtocolError("jogPrinter: bad axes")
            return "G28 " + " ".join(a.upper() for a in sorted(set(axes)))
        if command == "extrude":
            amount = _number(req.get("amount"), "amount")
            if abs(amount) > 100.:
                raise protocol.ProtocolError("jogPrinter: amount too large")
            return "M83\nG1 E%.3f F300" % (amount,)
        if command == "jog":
            moves = []
            for axis in ("x", "y", "z"):
                if axis in req:
                    value = _number(req[axis], axis)
                    if abs(value) > MAX_JOG:
                        raise protocol.ProtocolError("jogPrinter: too far")
                    moves.append("%s%.3f" % (axis.upper(), value))
            if not moves:
                raise protocol.ProtocolError("jogPrinter: nothing to move")
            speed = min(_number(req.get("speed", 3000), "speed"), MAX_FEED)
            mode = "G90" if req.get("absolute") is True else "G91"
            return "SAVE_GCODE_STATE NAME=polar_jog\n%s\nG1 %s F%.0f\n" \
                "RESTORE_GCODE_STATE NAME=polar_jog" % (
                    mode, " ".join(moves), max(speed, 60.))
        raise protocol.ProtocolError("jogPrinter: unknown command")
    def refuse(self, event: str) -> None:
        self._audit(event, "not supported by this printer")

