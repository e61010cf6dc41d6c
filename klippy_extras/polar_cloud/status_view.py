# What get_status, POLAR_STATUS and the webhooks show of the session
#
# The supervisor builds a new dict and replaces CloudSession.public with
# it in one assignment (CloudSession.publish); the reactor only reads
# whichever dict is there, and nothing is ever changed in place.
#
# This file may be distributed under the terms of the GNU GPLv3 license.
from __future__ import annotations

import time

from . import protocol
from .states import ONLINE


def public_view(session) -> dict:
    """A new view of session (a CloudSession), on the session thread."""
    ident = session.identity
    online = session.state == ONLINE
    last = (session.reporter.last_status or {}) if online else {}
    return {
        "state": session.state,
        "connected": online,
        "registered": ident is not None,
        "serial_number": ident.serial if ident else "",
        "server": session.options.server_url,
        "proxy": session.proxy.address if session.proxy else "",
        "online_since": (protocol.utc_iso(time.time() - (
            time.monotonic() - session.online_at)) if session.online_at
            else ""),
        "last_error": session.last_error,
        "job_id": last.get("jobId", protocol.NO_JOB_ID),
        "status_code": last.get("status", -1),
        "retry_in": session.retry_in(),
        "retries": session.backoff.attempts if not online else 0,
        "camera": session.webcams.describe(),
        "timelapse": session.timelapse.describe(),
        "plate_clear": session.lab.plate_clear,
        "next_print": session.lab.next_print,
    }
