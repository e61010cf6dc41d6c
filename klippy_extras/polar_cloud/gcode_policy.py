# What raw G-code from the cloud may run (allow_raw_gcode)
#
# A line is checked by the command klippy will run for it, found the way
# klippy's gcode.py finds it (GCodeDispatch._process_commands, in both
# upstream Klipper and Kalico): line numbers, checksums, comments, any case
# and whitespace.  Only plain ASCII lines that both flavours read as the
# same allow-listed command may run; anything else is refused.
#
# This file may be distributed under the terms of the GNU GPLv3 license.
from __future__ import annotations

import re
from collections.abc import Iterable

# Classic G/M codes: motion, temperatures, fans, reporting
ALLOWED_GCODES = frozenset({
    "G0", "G1", "G2", "G3", "G4", "G10", "G11", "G28", "G90", "G91", "G92",
    "M18", "M82", "M83", "M84", "M104", "M105", "M106", "M107", "M109",
    "M114", "M115", "M119", "M140", "M190", "M220", "M221", "M400"})
# Extended commands that change nothing beyond this power cycle
ALLOWED_EXTENDED = frozenset({
    "SET_HEATER_TEMPERATURE", "TEMPERATURE_WAIT", "TURN_OFF_HEATERS",
    "SET_FAN_SPEED", "SET_VELOCITY_LIMIT", "SET_PRESSURE_ADVANCE",
    "SET_GCODE_OFFSET", "BED_MESH_CALIBRATE", "STATUS", "QUERY_ENDSTOPS",
    "GET_POSITION"})
ALLOWED_COMMANDS = ALLOWED_GCODES | ALLOWED_EXTENDED

# Printable ASCII and tabs; a CR only where klippy strips it, at the end
_PLAIN_RE = re.compile(r"[\t\x20-\x7e]*\r*")
# An upper-cased line without its comment: an optional line number, the
# command, its parameters and an optional checksum
_LINE_RE = re.compile(r"""
    [ \t]*(?:N[0-9]+[ \t]*)?
    (?P<cmd>[A-Z][0-9]+(?:\.[0-9]+)?(?![0-9.])
           |[A-Z_][A-Z0-9_]*(?=[ \t*]|$))
    .*""", re.VERBOSE | re.DOTALL)
# gcode.py's args_r in Klipper and in Kalico
_KLIPPER_ARGS_RE = re.compile(r"([A-Z_]+|[A-Z*/])")
_KALICO_ARGS_RE = re.compile(r"([A-Z_]+|[A-Z*])")
_SHOWN = 60


class Refused(ValueError):
    """Why a line may not run; the text is plain ASCII, safe to log."""


def shown(line: str) -> str:
    """A line quoted for a log line: escaped, quoted and short."""
    text = ascii(line[:_SHOWN])
    return text if len(line) <= _SHOWN else text + "..."


def klipper_command(code: str) -> str:
    """The command upstream Klipper dispatches for a stripped line."""
    parts = _KLIPPER_ARGS_RE.split(code.upper())
    if len(parts) >= 3 and parts[1] != "N":
        return parts[1] + parts[2].strip()
    if len(parts) >= 5 and parts[1] == "N":
        return parts[3] + parts[4].strip()
    return ""


def kalico_command(code: str) -> str:
    """The command Kalico dispatches for a stripped line."""
    parts = _KALICO_ARGS_RE.split(code.upper())
    if "".join(parts[:2]) == "N":
        return "".join(parts[3:5]).strip()
    return "".join(parts[:3]).strip()


def line_command(line: str, macros: Iterable[str] = ()) -> str:
    """The allowed command a line runs ('' for none), or raise Refused."""
    command = parse_line(line)
    if command and command not in ALLOWED_COMMANDS \
            and command not in macros:
        raise Refused("%s is not allowed from the cloud" % (command,))
    return command


def parse_line(line: str) -> str:
    """The one command both klippy flavours run for a line ('' for none)."""
    if not _PLAIN_RE.fullmatch(line):
        raise Refused("not plain G-code: %s" % (shown(line),))
    code = line.strip().split(";", 1)[0]
    if not code:
        return ""
    match = _LINE_RE.fullmatch(code.upper())
    command = match.group("cmd") if match else None
    if command is None or command != klipper_command(code) \
            or command != kalico_command(code):
        raise Refused("cannot parse %s" % (shown(line),))
    return command


def check_script(script: str, macros: Iterable[str] = ()) -> str:
    """'' when every line of a script may run, else why not."""
    if "{" in script or "}" in script:
        return "templates are not allowed"
    if "INTERRUPT" in script.upper():
        # Kalico runs such a script outside the G-code lock
        return "INTERRUPT is not allowed"
    macros = frozenset(macros)
    # klippy splits a script at "\n" only
    for number, line in enumerate(script.split("\n"), 1):
        try:
            line_command(line, macros)
        except Refused as e:
            return "line %d: %s" % (number, e)
    return ""
