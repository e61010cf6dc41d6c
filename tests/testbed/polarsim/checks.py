"""Strict payload checks for printer -> cloud events (docs/protocol.md, 2-6).

Every check returns a list of human-readable problems; an empty list means
the payload conforms.  The simulator turns each problem into a violation.
Types are checked exactly: ``True`` is not an int, ``"3"`` is not a status.
"""

from __future__ import annotations

import ipaddress
import math
import re
from datetime import datetime
from typing import Any, Callable, Optional

MFG_CODES = frozenset({"kl", "op", "el", "CR", "ac", "mnsl", "bambu"})
STATUS_CODES = range(0, 16)
JOB_STATES = ("completed", "canceled")
URL_TYPES = ("idle", "printing", "timelapse")

MAC_RE = re.compile(r"^[0-9A-F]{2}(:[0-9A-F]{2}){5}$")
ISO_UTC_RE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,6})?Z$")
CUSTOM_COMMAND_RE = re.compile(r"^[^/\s]+/[^/\s]+$")

# A kind check returns None when the value is fine, else what is wrong.
Kind = Callable[[Any], Optional[str]]


def type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _str(value: Any) -> str | None:
    return (
        None if isinstance(value, str) else f"must be a string, not {type_name(value)}"
    )


def _nonempty_str(value: Any) -> str | None:
    if not isinstance(value, str):
        return f"must be a string, not {type_name(value)}"
    return None if value.strip() else "must be a non-empty string"


def _uint(value: Any) -> str | None:
    if type(value) is not int:
        return f"must be an integer, not {type_name(value)}"
    return None if value >= 0 else "must not be negative"


def _int(value: Any) -> str | None:
    return None if type(value) is int else f"must be an integer, not {type_name(value)}"


def _number(value: Any) -> str | None:
    if type(value) not in (int, float):
        return f"must be a number, not {type_name(value)}"
    return None if math.isfinite(value) else "must be finite"


def _flag01(value: Any) -> str | None:
    if type(value) is not int:
        return f"must be the integer 0 or 1, not {type_name(value)}"
    return None if value in (0, 1) else "must be 0 or 1"


def _bitmask07(value: Any) -> str | None:
    if type(value) is not int:
        return f"must be an integer bitmask 0..7, not {type_name(value)}"
    return None if 0 <= value <= 7 else "must be in 0..7"


def _status_code(value: Any) -> str | None:
    if type(value) is not int:
        return f"must be an integer status code, not {type_name(value)}"
    return None if value in STATUS_CODES else "must be in 0..15"


def _iso_utc(value: Any) -> str | None:
    if not isinstance(value, str):
        return f"must be an ISO-8601 UTC string, not {type_name(value)}"
    if not ISO_UTC_RE.match(value):
        return "must be ISO-8601 UTC ending in 'Z' (YYYY-MM-DDTHH:MM:SS[.ffffff]Z)"
    try:
        datetime.strptime(value[:19], "%Y-%m-%dT%H:%M:%S")
    except ValueError:
        return "is not a valid date/time"
    return None


def _mac(value: Any) -> str | None:
    if not isinstance(value, str):
        return f"must be a string, not {type_name(value)}"
    return (
        None
        if MAC_RE.match(value)
        else "must be upper-case hex pairs like B8:27:EB:12:34:56"
    )


def _ip(value: Any) -> str | None:
    if not isinstance(value, str):
        return f"must be a string, not {type_name(value)}"
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return "is not an IP address"
    return None


def _protocol(value: Any) -> str | None:
    if not isinstance(value, str):
        return f'must be the string "2", not {type_name(value)}'
    return None if value == "2" else 'must be "2"'


def _one_of(*allowed: str) -> Kind:
    def check(value: Any) -> str | None:
        return None if value in allowed else f"must be one of {', '.join(allowed)}"

    return check


def check_fields(
    event: str,
    payload: Any,
    spec: dict[str, Kind],
    required: tuple[str, ...] | frozenset[str] = (),
) -> list[str]:
    """Check a payload against ``spec``: required keys, no unknown keys, types."""
    if not isinstance(payload, dict):
        return [f"{event}: payload must be a JSON object, not {type_name(payload)}"]
    problems = [f"{event}: missing field {k!r}" for k in required if k not in payload]
    for key, value in payload.items():
        kind = spec.get(key)
        if kind is None:
            problems.append(f"{event}: unexpected field {key!r}")
            continue
        err = kind(value)
        if err:
            problems.append(f"{event}.{key} {err} (got {_short(value)})")
    return problems


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --- register (docs/protocol.md 2.3) -----------------------------------------

MY_INFO_SPEC: dict[str, Kind] = {
    "MAC": _mac,
    "protocolVersion": _str,
    "machineType": _str,
    "printerType": _str,
}

REGISTER_SPEC: dict[str, Kind] = {
    "mfg": _str,
    "email": _str,
    "pin": _str,
    "publicKey": _str,
    "mfgSn": _str,
    "myInfo": lambda v: None if isinstance(v, dict) else "must be an object",
}


def check_register(payload: Any) -> list[str]:
    problems = check_fields(
        "register", payload, REGISTER_SPEC, ("mfg", "email", "pin", "publicKey")
    )
    if isinstance(payload, dict):
        info = payload.get("myInfo")
        if info is None:
            problems.append("register: missing field 'myInfo' (with MAC)")
        elif isinstance(info, dict):
            problems += check_fields("register.myInfo", info, MY_INFO_SPEC, ("MAC",))
    return problems


# --- hello (docs/protocol.md 2.4) --------------------------------------------

HELLO_SPEC: dict[str, Kind] = {
    "serialNumber": _nonempty_str,
    "signature": _nonempty_str,
    "MAC": _mac,
    "protocol": _protocol,
    "mfgSn": _nonempty_str,
    "printerMake": _nonempty_str,
    "version": _nonempty_str,
    "localIP": _ip,
    "camUrl": _str,
    "camOff": _flag01,
    "rotateImg": _flag01,
    "transformImg": _bitmask07,
    # legacy OctoPrint extras, tolerated
    "machineType": _str,
    "printerType": _str,
}

HELLO_REQUIRED = (
    "serialNumber",
    "signature",
    "MAC",
    "protocol",
    "mfgSn",
    "printerMake",
    "version",
)


def check_hello(payload: Any, required: tuple[str, ...] = HELLO_REQUIRED) -> list[str]:
    return check_fields("hello", payload, HELLO_SPEC, required)


# --- status (docs/protocol.md 6.2) -------------------------------------------

TEMPERATURE_FIELDS = (
    "tool0",
    "targetTool0",
    "tool1",
    "targetTool1",
    "bed",
    "targetBed",
    "chamber",
    "targetChamber",
)

STATUS_SPEC: dict[str, Kind] = {
    "serialNumber": _nonempty_str,
    "status": _status_code,
    "protocol": _protocol,
    "jobId": _nonempty_str,
    "progress": _str,
    "progressDetail": _str,
    "estimatedTime": _uint,
    "filamentUsed": _uint,
    "startTime": _iso_utc,
    "printSeconds": _uint,
    "bytesRead": _uint,
    "fileSize": _uint,
    "door": _int,
    "file": _str,
    "config": _str,
    "sliceDetails": _str,
    "securityCode": _str,
    **{name: _number for name in TEMPERATURE_FIELDS},
}


# Codes that belong to a print (its jobId: the cloud job's, "123" for a local
# print) and codes that cannot (jobId "0")
PRINT_CODES = (1, 3, 4, 9, 10)
IDLE_CODES = (0, 15)


def check_status(payload: Any) -> list[str]:
    problems = check_fields("status", payload, STATUS_SPEC, ("serialNumber", "status"))
    if isinstance(payload, dict) and "jobId" in payload:
        code, job_id = payload.get("status"), payload["jobId"]
        if code in PRINT_CODES and job_id == "0":
            problems.append(f"status: code {code} is a print but jobId is '0'")
        if code in IDLE_CODES and job_id != "0":
            problems.append(f"status: code {code} is idle but jobId is {job_id!r}")
    if isinstance(payload, dict):
        read, size = payload.get("bytesRead"), payload.get("fileSize")
        if type(read) is int and type(size) is int and size > 0 and read > size:
            problems.append(f"status: bytesRead {read} > fileSize {size}")
    return problems


# --- other printer -> cloud events ------------------------------------------

JOB_SPEC: dict[str, Kind] = {
    "serialNumber": _nonempty_str,
    "jobId": _nonempty_str,
    "state": _one_of(*JOB_STATES),
    "printSeconds": _uint,
    "filamentUsed": _uint,
    "bytesRead": _uint,
    "fileSize": _uint,
}


def check_job(payload: Any) -> list[str]:
    problems = check_fields(
        "job", payload, JOB_SPEC, ("serialNumber", "jobId", "state")
    )
    if isinstance(payload, dict) and payload.get("state") == "cancelled":
        problems.append("job.state: use the American spelling 'canceled'")
    return problems


SET_VERSION_SPEC: dict[str, Kind] = {
    "serialNumber": _nonempty_str,
    "runningVersion": _nonempty_str,
    "latestVersion": _nonempty_str,
}


def check_set_version(payload: Any) -> list[str]:
    return check_fields(
        "setVersion", payload, SET_VERSION_SPEC, ("serialNumber", "runningVersion")
    )


GET_URL_SPEC: dict[str, Kind] = {
    "serialNumber": _nonempty_str,
    "method": _one_of("post"),
    "type": _one_of(*URL_TYPES),
    "jobId": _nonempty_str,
}


def check_get_url(payload: Any) -> list[str]:
    problems = check_fields(
        "getUrl", payload, GET_URL_SPEC, ("serialNumber", "method", "type")
    )
    if (
        isinstance(payload, dict)
        and payload.get("type") in ("printing", "timelapse")
        and "jobId" not in payload
    ):
        problems.append(f"getUrl: type {payload['type']!r} needs a jobId")
    return problems


def check_serial_only(event: str, payload: Any) -> list[str]:
    return check_fields(
        event, payload, {"serialNumber": _nonempty_str}, ("serialNumber",)
    )


COMMAND_ENTRY_SPEC: dict[str, Kind] = {
    "label": _nonempty_str,
    "command": lambda v: (
        _str(v)
        or (
            None if CUSTOM_COMMAND_RE.match(v) else "must look like '<source>/<action>'"
        )
    ),
    "confirmText": _str,
}


def check_custom_command_list(payload: Any) -> list[str]:
    spec: dict[str, Kind] = {
        "serialNumber": _nonempty_str,
        "commandList": lambda v: None if isinstance(v, list) else "must be a list",
    }
    problems = check_fields(
        "customCommandList", payload, spec, ("serialNumber", "commandList")
    )
    if isinstance(payload, dict) and isinstance(payload.get("commandList"), list):
        for i, entry in enumerate(payload["commandList"]):
            problems += check_fields(
                f"customCommandList.commandList[{i}]",
                entry,
                COMMAND_ENTRY_SPEC,
                ("label", "command"),
            )
    return problems


def check_serial_matches(event: str, payload: Any, serial: str | None) -> list[str]:
    """The payload's serialNumber must be the session's authenticated serial."""
    if (
        isinstance(payload, dict)
        and "serialNumber" in payload
        and payload["serialNumber"] != serial
    ):
        sent = payload["serialNumber"]
        return [f"{event}.serialNumber {sent!r} != session serial {serial!r}"]
    return []
