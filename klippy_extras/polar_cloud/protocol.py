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

JOB_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
SERIAL_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
EMAIL_RE = re.compile(r"^[^@\s;#\"']{1,64}@[^@\s;#\"']{1,255}\.[^@\s;#\"']{1,63}$")
PIN_RE = re.compile(r"^[A-Za-z0-9]{1,32}$")
MAX_TEXT = 256


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
    if not EMAIL_RE.match(email):
        return "EMAIL does not look like an e-mail address"
    return None


def validate_pin(pin: str) -> Optional[str]:
    if not pin:
        return "PIN is required"
    if not PIN_RE.match(pin):
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
            "printSeconds": int(max(0., print_seconds)),
            "filamentUsed": int(max(0., filament_used))}


def transform_bits(flip_h: bool, flip_v: bool, rotation: int) -> int:
    """transformImg bitmask: 1 flip horizontal, 2 flip vertical, 4 rot 90."""
    bits = (1 if flip_h else 0) | (2 if flip_v else 0)
    if rotation in (90, 270):
        bits |= 4
    if rotation in (180, 270):
        # 180 degrees is both flips; 270 is 90 plus both flips
        bits ^= 3
    return bits


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
    if slicer_estimate > 0.:
        return int(slicer_estimate)
    progress = snap.get("progress", 0.)
    duration = snap.get("print_duration", 0.)
    if progress >= 0.01 and duration > 0.:
        return int(duration / progress)
    return 0


def _temp(value: Any) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return 0.
    if not math.isfinite(value):
        return 0.
    return round(value, 1)


def build_status(serial: str, snap: dict, code: int, job_id: str,
                 slicer_estimate: float = 0., error_text: str = "") -> dict:
    progress = float(snap.get("progress", 0.) or 0.)
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
        msg["printSeconds"] = int(snap.get("print_duration", 0.) or 0.)
        msg["filamentUsed"] = int(snap.get("filament_used", 0.) or 0.)
        msg["bytesRead"] = int(snap.get("file_position", 0) or 0)
        msg["fileSize"] = int(snap.get("file_size", 0) or 0)
        msg["estimatedTime"] = estimate_total_time(snap, slicer_estimate)
        total = float(snap.get("total_duration", 0.) or 0.)
        if total > 0.:
            msg["startTime"] = utc_iso(snap.get("wall_time", 0.) - total)
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
    if status != "FAILED" and isinstance(serial, str) \
            and SERIAL_RE.match(serial):
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
        % (reason[:40] or "no reason given"))
    return RegisterResult(False, reason=reason or "FAILED", message=text)


def parse_hello_response(data: Any) -> tuple[str, str]:
    """Return (SUCCESS|FAILED|DELETED, message)."""
    if isinstance(data, str):
        data = {"status": data}
    if not isinstance(data, dict):
        return "FAILED", "malformed helloResponse"
    status = data.get("status")
    message = data.get("message")
    message = message[:MAX_TEXT] if isinstance(message, str) else ""
    if status == "SUCCESS":
        return "SUCCESS", ""
    if status == "DELETED" or "deleted" in message.lower():
        return "DELETED", message or "printer was deleted in Polar Cloud"
    return "FAILED", message or "Polar Cloud rejected the printer's hello"


def parse_status_reply(data: Any, event: str) -> tuple[bool, str]:
    """For unregisterResponse and similar {status, message} replies."""
    if isinstance(data, str):
        data = {"status": data}
    if not isinstance(data, dict):
        return False, "malformed %s" % event
    message = data.get("message")
    message = message[:MAX_TEXT] if isinstance(message, str) else ""
    return data.get("status") == "SUCCESS", message


@dataclass(frozen=True)
class PrintRequest:
    job_id: str
    job_name: str
    url: str
    kind: str           # gcodeFile, stlFile, threemfFile


def parse_print(data: Any, serial: Optional[str]) -> PrintRequest:
    data = _obj(data, "print")
    check_serial(data, serial, "print")
    job_id = data.get("jobId")
    if isinstance(job_id, int) and not isinstance(job_id, bool):
        job_id = str(job_id)
    if not isinstance(job_id, str) or not JOB_ID_RE.match(job_id):
        raise ProtocolError("print: jobId is missing or not a safe token")
    # A long name is the user's file name, not an attack: keep the start
    # (the file name made from it is cut much shorter anyway)
    job_name = _opt_str(data, "jobName", "print", 65536)[:MAX_TEXT]
    kind = data.get("fileToPrint")
    if kind is None or kind == "":
        kind = "gcodeFile" if data.get("gcodeFile") else (
            "stlFile" if data.get("stlFile") else (
                "threemfFile" if data.get("threemfFile") else "gcodeFile"))
    if kind not in ("gcodeFile", "stlFile", "threemfFile"):
        raise ProtocolError("print: unknown fileToPrint")
    url = _opt_str(data, kind, "print")
    return PrintRequest(job_id, job_name, url, kind)


TEMPERATURE_KEY_RE = re.compile(r"^(tool(\d{1,2})|bed|chamber)$")


def parse_temperature(data: Any, serial: Optional[str]) -> dict:
    """Return {cloud key: float target}; rejects non-numbers."""
    data = _obj(data, "temperature")
    check_serial(data, serial, "temperature")
    targets = {}
    for key, value in data.items():
        if key == "serialNumber":
            continue
        if not TEMPERATURE_KEY_RE.match(key):
            continue
        if isinstance(value, bool):
            raise ProtocolError("temperature: %s is not a number" % key)
        if isinstance(value, str):
            if not re.match(r"^\s*-?\d{1,4}(\.\d{1,3})?\s*$", value):
                raise ProtocolError("temperature: %s is not a number" % key)
            value = float(value)
        if not finite_number(value):
            raise ProtocolError("temperature: %s is not a number" % key)
        targets[key] = float(value)
    if not targets:
        raise ProtocolError("temperature: no heater given")
    return targets
