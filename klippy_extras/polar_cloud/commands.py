# Cloud commands besides print jobs: heater targets, macro buttons, and
# the opt-in raw G-code and jogging.  Runs on the session thread; every
# G-code built here comes from validated numbers or listed names only.
#
# This file may be distributed under the terms of the GNU GPLv3 license.
from __future__ import annotations

import logging
from typing import Any, Optional

from . import gcode_policy, inbound, protocol
from .lab import PLATE_COMMAND
from .port import CloudPort

log = logging.getLogger("polar_cloud")

MACRO_PREFIX = "macro/"
MAX_RAW = 1000
MAX_JOG = 1000.
MAX_FEED = 12000.
# Every jog runs between these, so that it leaves no G91, M83 or feed
# rate behind; a failing line skips the rest of a script, so a failed
# jog restores at once from its reply
SAVE_JOG_STATE = "SAVE_GCODE_STATE NAME=polar_jog"
RESTORE_JOG_STATE = "RESTORE_GCODE_STATE NAME=polar_jog"


def _number(value: Any, what: str) -> float:
    if not protocol.finite_number(value):
        raise protocol.ProtocolError("%s is not a number" % (what,))
    return float(value)


class RemoteCommands:
    def __init__(self, session: CloudPort):
        self.session = session
        self.options = session.options
        self.sequence = 0
        for event, method in (("temperature", "temperature"),
                              ("command", "raw_gcode"),
                              ("customCommand", "custom_command"),
                              ("jogPrinter", "jog")):
            session.on(event, lambda data, method=method: getattr(
                self, method)(data, session.snapshot()))
        for event in ("connectPrinter", "update"):
            # Updates come through Moonraker's update_manager, never the
            # cloud
            session.on(event, lambda data, event=event: self.refuse(event))
    def _unique(self, kind: str) -> str:
        """A queue key for commands that must each run (never coalesced)."""
        self.sequence += 1
        return "%s:%d" % (kind, self.sequence)
    def _ready(self, snap: Optional[dict]) -> bool:
        return snap is not None and snap.get("klippy_state") == "ready"
    def _audit(self, event: str, decision: str, key: str = "") -> None:
        self.session.rlog("cmd:%s:%s" % (event, key or decision[:30]),
                          "cloud %s: %s", event, decision)
    # temperature
    def temperature(self, data: Any, snap: Optional[dict]) -> None:
        targets = inbound.parse_temperature(data, self.session.serial())
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
        inbound.check_serial(data, self.session.serial(), "customCommand")
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
        inbound.check_serial(data, self.session.serial(), "command")
        script = data.get("command")
        if isinstance(script, list) and all(isinstance(x, str)
                                            for x in script):
            script = "\n".join(script)
        if not isinstance(script, str) or len(script) > MAX_RAW:
            raise protocol.ProtocolError("command: not a G-code string")
        problem = gcode_policy.check_script(script,
                                            self.options.cloud_macros)
        if problem:
            self._refuse_gcode(problem)
            return
        if not self._ready(snap):
            self._audit("command", "refused, printer not ready")
            return
        self._audit("command", "running %d line(s)"
                    % (len(script.splitlines()),))
        self.session.run_gcode(self._unique("raw"), script,
                               self.session.report_failure("G-code"))
    def _refuse_gcode(self, problem: str) -> None:
        # One key for all of them: the log stays bounded in a flood, and
        # the console tells the user about each one
        self._audit("command", "refused, %s" % (problem,), key="refused")
        self.session.bridge.console("Polar Cloud: refused G-code: %s"
                                    % (problem,), error=True, log=False)
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
        script = "\n".join((SAVE_JOG_STATE, self._jog_script(
            data["jogPrinter"]), RESTORE_JOG_STATE))
        self.session.run_gcode(self._unique("jog"), script, self._jog_reply())
    def _jog_reply(self):
        """On a failure, restore the state before anything else runs."""
        bridge = self.session.bridge
        report = self.session.report_failure("jog")
        def reply(ok: bool, error: str) -> None:
            if not ok:
                problem = bridge.run_gcode_now(RESTORE_JOG_STATE)
                if problem:
                    log.warning("polar_cloud: jog state not restored: %s",
                                problem)
            report(ok, error)
        return reply
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
            return "%s\nG1 %s F%.0f" % (mode, " ".join(moves),
                                         max(speed, 60.))
        raise protocol.ProtocolError("jogPrinter: unknown command")
    def refuse(self, event: str) -> None:
        self._audit(event, "not supported by this printer")

