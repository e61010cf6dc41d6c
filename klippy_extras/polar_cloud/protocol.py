# Polar Cloud printer protocol: message builders and validators
#
# Pure functions, no I/O: everything here is testable without a network,
# a printer or a thread.  Field names are the protocol's own, spelled
# exactly; docs/protocol.md describes the protocol as this module speaks it.
#
# This file may be distributed under the terms of the GNU GPLv3 license.
from __future__ import annotations

import datetime
import ipaddress
import math
import re
import unicodedata
from dataclasses import dataclass
from typing import Any, Optional

PROTOCOL_VERSION = "2"

# Printer status codes (docs/protocol.md, section 6.1)
IDLE = 0
SERIAL = 1          # printing a local job
PREPARING = 2       # downloading a cloud job, or heating before first move
PRINTING = 3        # printing a cloud job
PAUSED = 4
POSTPROCESSING = 5
CANCELLING = 6
COMPLETE = 7
COLD_PAUSED = 9     # paused, and the hotend heater was turned off
CHANGING_FILAMENT = 10  # paused for a filament runout or a filament change
ERROR = 12
OFFLINE = 13
CLEAR_PLATE = 15    # idle, but the build plate must be cleared first
PAUSE_CODES = (PAUSED, COLD_PAUSED, CHANGING_FILAMENT)

LOCAL_JOB_ID = "123"
NO_JOB_ID = "0"

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

# Whole values: use fullmatch (match() and "$" accept a trailing newline)
JOB_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
SERIAL_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
EMAIL_RE = re.compile(r"[^@\s;#\"']{1,64}@[^@\s;#\"']{1,255}\.[^@\s;#\"']{1,63}")
PIN_RE = re.compile(r"[A-Za-z0-9]{1,32}")
MAX_TEXT = 256
# Numbers sent are ints that fit in 32 bits: no count the cloud needs is
# larger, and any consumer can store them
MAX_COUNT = 2 ** 31 - 1
# A slicer estimate beyond this is a broken or hostile file, not a print
MAX_ESTIMATE = 366 * 86400.
MAX_TEMP = 9999.


class ProtocolError(ValueError):
    """An inbound message that does not match the protocol."""


def is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def finite_number(value: Any) -> bool:
    """A JSON number usable as a float (a huge integer is not)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def bounded_count(value: Any) -> int:
    """A number for a message: 0 unless finite, clamped to 0..MAX_COUNT."""
    if not finite_number(value):
        return 0
    return int(min(max(value, 0), MAX_COUNT))


def fraction(value: Any) -> float:
    if not finite_number(value):
        return 0.
    return min(max(float(value), 0.), 1.)


def usable_estimate(seconds: Any) -> bool:
    return finite_number(seconds) and 0. < seconds <= MAX_ESTIMATE


def cloud_text(value: Any, limit: int = 200) -> str:
    """Text from the cloud made fit to show or log: one line of printable
    characters, at most limit long.  Raw, a newline in it would print
    console lines that look like Klipper's own."""
    if not isinstance(value, str):
        return ""
    kept = []
    for char in value[:4 * limit]:
        category = unicodedata.category(char)
        if category in ("Cc", "Zs", "Zl", "Zp"):
            kept.append(" ")        # control characters, line breaks
        elif category[0] != "C":    # drops bidi overrides, surrogates
            kept.append(char)
    return " ".join("".join(kept).split())[:limit]


def utc_iso(timestamp: float) -> str:
    dt = datetime.datetime.fromtimestamp(timestamp, datetime.timezone.utc)
    return dt.strftime("%Y-%m-%dT%H:%M:%SZ")


# Before this the system clock cannot be right: certificates look "not yet
# valid" and upload policies expired (a Pi without an RTC boots in 1970 or
# at its last shutdown until NTP answers)
PLAUSIBLE_SINCE = 1735689600.       # 2025-01-01


def clock_problem(wall_time: float) -> str:
    if wall_time >= PLAUSIBLE_SINCE:
        return ""
    return "the system clock is not set (%s); waiting for NTP" % (
        utc_iso(wall_time)[:10],)


def redact_email(email: str) -> str:
    user, _, domain = email.partition("@")
    return "%s***@%s" % (user[:1], domain)


def validate_email(email: str) -> Optional[str]:
    """Return an error text, or None when the e-mail looks usable."""
    if not email:
        return "EMAIL is required"
    if not EMAIL_RE.fullmatch(email):
        return "EMAIL does not look like an e-mail address"
    return None


def validate_pin(pin: str) -> Optional[str]:
    if not pin:
        return "PIN is required"
    if not PIN_RE.fullmatch(pin):
        return "PIN must be letters and digits only (the Polar Cloud PIN)"
    return None


# Printer -> cloud messages

def build_register(mfg: str, email: str, pin: str, public_key_pem: str,
                   mfg_sn: str, mac: str, machine_type: str,
                   printer_make: str) -> dict:
    return {
        "mfg": mfg, "email": email, "pin": pin,
        "publicKey": public_key_pem, "mfgSn": mfg_sn,
        "myInfo": {"MAC": mac, "protocolVersion": PROTOCOL_VERSION,
                   "machineType": machine_type, "printerType": printer_make},
    }


@dataclass(frozen=True)
class CameraHints:
    cam_url: str = ""
    cam_off: int = 1
    rotate_img: int = 0
    transform_img: int = 0


def build_hello(serial: str, signature: str, mac: str, mfg_sn: str,
                printer_make: str, version: str, local_ip: str,
                camera: CameraHints) -> dict:
    return {
        "serialNumber": serial, "signature": signature, "MAC": mac,
        "protocol": PROTOCOL_VERSION, "mfgSn": mfg_sn,
        "printerMake": printer_make, "version": version,
        "localIP": local_ip, "camUrl": camera.cam_url,
        "camOff": camera.cam_off, "rotateImg": camera.rotate_img,
        "transformImg": camera.transform_img,
    }


def build_job(serial: str, job_id: str, state: str, print_seconds: float,
              filament_used: float) -> dict:
    if state not in ("completed", "canceled"):
        raise ValueError("job state must be completed or canceled")
    return {"serialNumber": serial, "jobId": job_id, "state": state,
            "printSeconds": bounded_count(print_seconds),
            "filamentUsed": bounded_count(filament_used)}


def transform_bits(flip_h: bool, flip_v: bool, rotation: int) -> int:
    """transformImg as the OctoPrint client means it: 1 flip horizontal,
    2 flip vertical, 4 rotate 90 degrees counter-clockwise (OctoPrint's
    rotate90), the flips applied first.  rotation is clockwise, after the
    flips (camera.py, imaging.py): 270 clockwise is the counter-clockwise
    quarter turn; 180 is both flips; 90 clockwise is the counter-clockwise
    quarter turn after both flips."""
    bits = (1 if flip_h else 0) | (2 if flip_v else 0)
    if rotation in (90, 180):
        bits ^= 3
    if rotation in (90, 270):
        bits |= 4
    return bits


def rotate_bit(rotation: int) -> int:
    """rotateImg as Polar's own agent sends it: 1 when a rotation is set."""
    return 1 if rotation else 0


# Status

@dataclass(frozen=True)
class JobView:
    """What the status mapping needs to know about the cloud job."""
    job_id: str
    phase: str          # downloading, starting, printing, cancelling, done
    filename: str = ""
    final_code: int = IDLE


def is_cloud_print(snap: dict, job: Optional[JobView]) -> bool:
    """Is the printer busy with the cloud job (rather than a local one)?"""
    if job is None:
        return False
    if job.phase in ("downloading", "starting"):
        return True
    same_file = bool(job.filename) and snap.get("filename") == job.filename
    if job.phase == "done":
        # Its final reports, unless a local print began meanwhile
        return same_file or snap.get("print_state") not in ("printing",
                                                             "paused")
    return same_file


def runout_sensor(snap: dict) -> str:
    """The first enabled filament sensor that sees no filament, or ''."""
    for name, (detected, enabled) in sorted(
            snap.get("filament_sensors", {}).items()):
        if enabled and not detected:
            return name
    return ""


def pause_code(snap: dict) -> int:
    """Why the print is paused: a filament runout or change (10), the
    hotend heater turned off during the pause (9), or anything else (4)."""
    if snap.get("filament_pause") or runout_sensor(snap):
        return CHANGING_FILAMENT
    hotend = snap.get("heaters", {}).get("tool0")
    if hotend is not None and hotend[1] <= 0. \
            and snap.get("print_hotend_target", 0.) > 0.:
        return COLD_PAUSED
    return PAUSED


def status_code(snap: dict, job: Optional[JobView],
                plate_clear: bool = True) -> int:
    """Map a printer snapshot and the cloud job to a Polar status code;
    an idle printer whose build plate was not cleared reports 15."""
    code = _printer_code(snap, job)
    if code == IDLE and not plate_clear:
        return CLEAR_PLATE
    return code


def _printer_code(snap: dict, job: Optional[JobView]) -> int:
    klippy_state = snap.get("klippy_state")
    if klippy_state in ("shutdown", "error"):
        return ERROR
    if klippy_state != "ready":
        return OFFLINE
    state = snap.get("print_state", "standby")
    if job is not None and job.phase == "done" and is_cloud_print(snap, job):
        return job.final_code
    if is_cloud_print(snap, job) and job is not None:
        if job.phase in ("downloading", "starting"):
            return PREPARING
        if job.phase == "cancelling":
            return CANCELLING
        if state == "paused":
            return pause_code(snap)
        if state == "printing":
            if snap.get("print_duration", 0.) <= 0.:
                return PREPARING
            return PRINTING
        return PRINTING
    if state == "printing":
        return SERIAL
    if state == "paused":
        return pause_code(snap)
    return IDLE


def status_job_id(snap: dict, job: Optional[JobView], code: int) -> str:
    """The cloud job id for a cloud job, "123" for a local print."""
    if job is not None and is_cloud_print(snap, job) and code in (
            PREPARING, PRINTING, POSTPROCESSING, CANCELLING,
            COMPLETE) + PAUSE_CODES:
        return job.job_id
    if code in (SERIAL,) + PAUSE_CODES:
        return LOCAL_JOB_ID
    return NO_JOB_ID


PROGRESS_TEXT = {
    IDLE: "Idle", SERIAL: "Printing", PREPARING: "Preparing",
    PRINTING: "Job Printing", PAUSED: "Job Paused",
    POSTPROCESSING: "Post processing job", CANCELLING: "Killing Job",
    COMPLETE: "Complete", ERROR: "Error", OFFLINE: "Offline",
    COLD_PAUSED: "Job Paused (cold)", CHANGING_FILAMENT: "Changing Filament",
    CLEAR_PLATE: "Clear the build plate",
}


def estimate_total_time(snap: dict, slicer_estimate: float) -> int:
    if usable_estimate(slicer_estimate):
        return int(slicer_estimate)
    progress = fraction(snap.get("progress"))
    duration = snap.get("print_duration")
    if progress >= 0.01 and finite_number(duration) and duration > 0.:
        return bounded_count(duration / progress)
    return 0


def _temp(value: Any) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError, OverflowError):
        return 0.
    if not math.isfinite(value):
        return 0.
    return round(min(max(value, -MAX_TEMP), MAX_TEMP), 1)


def _start_time(snap: dict) -> str:
    """When the print started, if the snapshot can say."""
    total = snap.get("total_duration")
    wall_time = snap.get("wall_time")
    if not (finite_number(total) and finite_number(wall_time)) \
            or not 0. < total < wall_time:
        return ""
    return utc_iso(wall_time - total)


def build_status(serial: str, snap: dict, code: int, job_id: str,
                 slicer_estimate: float = 0., error_text: str = "") -> dict:
    progress = fraction(snap.get("progress"))
    msg = {
        "serialNumber": serial, "status": code, "protocol": PROTOCOL_VERSION,
        "jobId": job_id, "progress": PROGRESS_TEXT.get(code, ""),
        "progressDetail": "",
        "estimatedTime": 0, "printSeconds": 0, "filamentUsed": 0,
        "bytesRead": 0, "fileSize": 0,
    }
    if code in (SERIAL, PRINTING, PREPARING, CANCELLING,
                COMPLETE) + PAUSE_CODES:
        pct = 100. if code == COMPLETE else progress * 100.
        label = {PAUSED: "Paused", COLD_PAUSED: "Paused",
                 CHANGING_FILAMENT: "Paused", COMPLETE: "Complete",
                 CANCELLING: "Cancelling", PREPARING: "Preparing"}.get(
                     code, "Printing")
        msg["progressDetail"] = "%s: %.1f%%" % (label, pct)
        if code == PREPARING and snap.get("print_state") != "printing":
            msg["progressDetail"] = "Downloading file for job: %s" % job_id
        msg["printSeconds"] = bounded_count(snap.get("print_duration"))
        msg["filamentUsed"] = bounded_count(snap.get("filament_used"))
        msg["bytesRead"] = bounded_count(snap.get("file_position"))
        msg["fileSize"] = bounded_count(snap.get("file_size"))
        msg["estimatedTime"] = estimate_total_time(snap, slicer_estimate)
        start = _start_time(snap)
        if start:
            msg["startTime"] = start
    elif code == ERROR:
        msg["progressDetail"] = error_text[:MAX_TEXT] or "Error"
    for key, (temp, target) in snap.get("heaters", {}).items():
        cap = key[0].upper() + key[1:]
        msg[key] = _temp(temp)
        msg["target" + cap] = _temp(target)
    return msg


# Cloud -> printer messages

def _obj(data: Any, event: str) -> dict:
    if not isinstance(data, dict):
        raise ProtocolError("%s: payload is not an object" % event)
    return data


def _opt_str(data: dict, key: str, event: str, limit: int = 2048) -> str:
    value = data.get(key, "")
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ProtocolError("%s: %s is not a string" % (event, key))
    if len(value) > limit:
        raise ProtocolError("%s: %s is too long" % (event, key))
    return value


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
