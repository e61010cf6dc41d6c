# Polar Cloud printer protocol: its codes, limits and value checks
#
# The words the other protocol modules share: status codes, id formats,
# and the checks that make any value fit to send or show.  Pure functions,
# no I/O.  docs/protocol.md describes the protocol as this module speaks
# it; messages.py builds what the printer sends, inbound.py reads what the
# cloud sends, cloud_status.py says what the printer's state means.
#
# This file may be distributed under the terms of the GNU GPLv3 license.
from __future__ import annotations

import datetime
import math
import re
import unicodedata
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
