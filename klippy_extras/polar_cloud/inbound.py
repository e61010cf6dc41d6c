# Polar Cloud protocol: reading what the cloud sends
#
# Lenient in what it accepts, and every value it returns is checked: a
# message that cannot be used raises ProtocolError, which the dispatcher
# logs and drops; a print with a problem comes back with the reason, to be
# answered canceled (docs/protocol.md).
#
# This file may be distributed under the terms of the GNU GPLv3 license.
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Optional

from .protocol import MAX_TEXT, SERIAL_RE, ProtocolError, cloud_text, finite_number

# Registration failures that need the user to act before trying again
TERMINAL_REGISTER_REASONS = {
    "EMAIL_PIN_ERROR": "the e-mail and PIN were not accepted by Polar Cloud;"
                       " check the PIN in your polar3d.com account settings",
    "FORBIDDEN": "this printer is already registered to another account",
    "MFG_MISSING": "the manufacturer code is missing (check 'manufacturer')",
    "MFG_UNKNOWN": "Polar Cloud does not know this manufacturer code"
                   " (check 'manufacturer')",
    "INVALID_KEY": "Polar Cloud rejected the printer's public key",
}
RETRYABLE_REGISTER_REASONS = {
    "SERVER_ERROR": "Polar Cloud could not add the printer; try again later",
}


def _obj(data: Any, event: str) -> dict:
    if not isinstance(data, dict):
        raise ProtocolError("%s: payload is not an object" % event)
    return data


def check_serial(data: dict, serial: Optional[str], event: str) -> None:
    """Reject a command addressed to another printer (when it says)."""
    if "serialNumber" not in data:
        return
    value = data["serialNumber"]
    if not isinstance(value, str) or (serial and value != serial):
        raise ProtocolError("%s: addressed to another printer" % event)


def parse_welcome(data: Any) -> str:
    data = _obj(data, "welcome")
    challenge = data.get("challenge")
    if not isinstance(challenge, str) or not challenge \
            or len(challenge) > 4096:
        raise ProtocolError("welcome: no usable challenge")
    return challenge


@dataclass(frozen=True)
class RegisterResult:
    ok: bool
    serial: str = ""
    reason: str = ""
    terminal: bool = False
    message: str = ""


def parse_register_response(data: Any) -> RegisterResult:
    # Success means a serial number and a status that is not FAILED
    # (docs/protocol.md, section 2.3): the reply's 'reason' is not reliable.
    if isinstance(data, str):
        data = {"status": data}
    if not isinstance(data, dict):
        return RegisterResult(False, reason="MALFORMED",
                              message="unexpected reply from Polar Cloud")
    status = data.get("status")
    serial = data.get("serialNumber")
    reason = data.get("reason")
    reason = reason if isinstance(reason, str) else ""
    shown = cloud_text(reason, 40)
    if status != "FAILED" and isinstance(serial, str) \
            and SERIAL_RE.fullmatch(serial):
        return RegisterResult(True, serial=serial)
    if status != "FAILED":
        return RegisterResult(False, reason="NO_SERIAL",
                              message="Polar Cloud accepted the registration"
                                      " but sent no serial number; try again")
    if reason in TERMINAL_REGISTER_REASONS:
        return RegisterResult(False, reason=reason, terminal=True,
                              message=TERMINAL_REGISTER_REASONS[reason])
    text = RETRYABLE_REGISTER_REASONS.get(
        reason, "Polar Cloud refused the registration (%s)"
        % (shown or "no reason given"))
    return RegisterResult(False, reason=shown or "FAILED", message=text)


DELETED_MESSAGE = "Printer has been deleted"


def parse_hello_response(data: Any) -> tuple[str, str]:
    """Return (SUCCESS|FAILED|DELETED, message)."""
    if isinstance(data, str):
        data = {"status": data}
    if not isinstance(data, dict):
        return "FAILED", "malformed helloResponse"
    status = data.get("status")
    message = cloud_text(data.get("message"))
    if status == "SUCCESS":
        return "SUCCESS", ""
    # Deletion wipes the key: only the DELETED status says so, or the one
    # FAILED message the server is known to send for it (protocol.md 3.2),
    # never a message that merely mentions the word
    if status == "DELETED" or (status == "FAILED"
                               and message == DELETED_MESSAGE):
        return "DELETED", message or "printer was deleted in Polar Cloud"
    return "FAILED", message or "Polar Cloud rejected the printer's hello"


def parse_status_reply(data: Any, event: str) -> tuple[bool, str]:
    """For unregisterResponse and similar {status, message} replies."""
    if isinstance(data, str):
        data = {"status": data}
    if not isinstance(data, dict):
        return False, "malformed %s" % event
    message = cloud_text(data.get("message"))
    return data.get("status") == "SUCCESS", message


# A print's job id is echoed verbatim in every report about it, whatever
# characters it has (files are named from a safe token, see jobs.py); only
# an id too long to be sane, or no id at all, cannot be answered
MAX_JOB_ID = 128
# Pre-signed download URLs carry long signatures and session tokens
MAX_URL = 64 * 1024
PRINT_FILE_FIELDS = ("gcodeFile", "stlFile", "threemfFile")
_FILE_TO_PRINT = {"gcodefile": "gcodeFile", "gcode": "gcodeFile",
                  "stlfile": "stlFile", "stl": "stlFile",
                  "threemffile": "threemfFile", "threemf": "threemfFile",
                  "3mffile": "threemfFile", "3mf": "threemfFile"}


def read_job_id(value: Any) -> Optional[str]:
    """A cloud job id as text (a string as is, a number as its decimal
    text), or None when there is none that could be echoed back."""
    if isinstance(value, bool):
        return None
    if isinstance(value, float) and finite_number(value):
        value = int(value) if value.is_integer() else repr(value)
    if isinstance(value, int):
        value = str(value)
    if not isinstance(value, str) or not value.strip() \
            or len(value) > MAX_JOB_ID:
        return None
    return value


def _lenient_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if finite_number(value):
        return str(value)
    return ""


@dataclass(frozen=True)
class PrintRequest:
    job_id: str
    job_name: str
    url: str
    kind: str           # gcodeFile, stlFile, threemfFile
    # Why the job cannot be printed, and the field that says so
    problem: str = ""
    field: str = ""


def parse_print(data: Any, serial: Optional[str]) -> PrintRequest:
    """Read a print leniently.  ProtocolError only when the message is not
    for this printer or has no job id to answer to; every other problem
    comes back as a request with a problem, to be answered canceled."""
    data = _obj(data, "print")
    target = data.get("serialNumber")
    if target not in (None, "") and serial and str(target) != serial:
        raise ProtocolError("print: addressed to another printer")
    job_id = read_job_id(data.get("jobId"))
    if job_id is None:
        raise ProtocolError("print: jobId is missing or unreadable")
    # A long name is the user's file name, not an attack: keep the start
    # (the file name made from it is cut much shorter anyway)
    job_name = _lenient_text(data.get("jobName"))[:MAX_TEXT]
    choice = data.get("fileToPrint")
    if choice is None or (isinstance(choice, str) and not choice.strip()):
        kind = next((k for k in PRINT_FILE_FIELDS if data.get(k)),
                    "gcodeFile")
        field = kind
    else:
        kind = _FILE_TO_PRINT.get(str(choice).strip().lower(), "")
        field = "fileToPrint"
        if not kind:
            return PrintRequest(job_id, job_name, "", "", "fileToPrint"
                                " names no known file", field)
    if kind != "gcodeFile":
        return PrintRequest(
            job_id, job_name, "", kind, "slicing on the printer is not"
            " supported (%s jobs)" % ("STL" if kind == "stlFile" else "3MF"),
            field)
    url = data.get(kind)
    problem = ""
    if url is None or url == "":
        problem = "the job has no G-code file"
    elif not isinstance(url, str):
        problem = "the G-code file is not a URL"
    elif len(url) > MAX_URL:
        problem = "the download URL is too long"
    if problem:
        return PrintRequest(job_id, job_name, "", kind, problem, kind)
    return PrintRequest(job_id, job_name, url.strip(), kind)


TEMPERATURE_KEY_RE = re.compile(r"tool\d{1,2}|bed|chamber")


def parse_temperature(data: Any, serial: Optional[str]) -> dict:
    """Return {cloud key: float target}; rejects non-numbers."""
    data = _obj(data, "temperature")
    check_serial(data, serial, "temperature")
    targets = {}
    for key, value in data.items():
        if key == "serialNumber":
            continue
        if not TEMPERATURE_KEY_RE.fullmatch(key):
            continue
        if isinstance(value, bool):
            raise ProtocolError("temperature: %s is not a number" % key)
        if isinstance(value, str):
            if not re.fullmatch(r"\s*-?\d{1,4}(\.\d{1,3})?\s*", value):
                raise ProtocolError("temperature: %s is not a number" % key)
            value = float(value)
        if not finite_number(value):
            raise ProtocolError("temperature: %s is not a number" % key)
        targets[key] = float(value)
    if not targets:
        raise ProtocolError("temperature: no heater given")
    return targets
