# Polar Cloud protocol: the printer's state as the cloud's status codes
#
# A printer sample (printer_state.py) and the cloud job make a status
# code, the job id to report with it, and the status message.
#
# This file may be distributed under the terms of the GNU GPLv3 license.
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

from .protocol import (
    CANCELLING,
    CHANGING_FILAMENT,
    CLEAR_PLATE,
    COLD_PAUSED,
    COMPLETE,
    ERROR,
    IDLE,
    LOCAL_JOB_ID,
    MAX_TEMP,
    MAX_TEXT,
    NO_JOB_ID,
    OFFLINE,
    PAUSE_CODES,
    PAUSED,
    POSTPROCESSING,
    PREPARING,
    PRINTING,
    PROTOCOL_VERSION,
    SERIAL,
    bounded_count,
    finite_number,
    fraction,
    usable_estimate,
    utc_iso,
)


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
